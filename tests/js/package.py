"""The JS client as its users get it: `npm pack` of clients/js, installed from the tarball into
a clean project that has nothing else (no network needed: the package has no dependencies)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from tests.deploy.stackrun import ROOT

PACKAGE = ROOT / "clients" / "js"
BIN = PACKAGE / "node_modules" / ".bin"


def npm(*args: str, cwd: Path, timeout: float = 120) -> str:
    """Run npm; a failure raises with its output (what a user would read)."""
    npm_path = shutil.which("npm")
    assert npm_path, "npm not found: `make test` installs node and npm (browser-deps)"
    res = subprocess.run(
        [npm_path, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, f"npm {' '.join(args)}:\n{res.stdout}{res.stderr}"
    return res.stdout


def tool(name: str) -> Path:
    """A dev tool of the package (typescript, publint, attw), as `npm ci` installed it."""
    path = BIN / name
    assert path.exists(), f"{path} missing: `make js-deps` (npm ci in clients/js) installs it"
    return path


def pack(dest: Path) -> Path:
    """`npm pack`, which runs `prepack` (tsc: the declarations from the JSDoc) first."""
    tool("tsc")
    out = json.loads(npm("pack", "--json", "--pack-destination", str(dest), cwd=PACKAGE))
    return dest / str(out[0]["filename"])


def consumer(root: Path, tarball: Path) -> Path:
    """A new project with only the tarball installed, offline."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"name": "consumer", "private": True, "type": "module"}
    (root / "package.json").write_text(json.dumps(manifest))
    npm("install", "--offline", "--no-audit", "--no-fund", str(tarball), cwd=root)
    return root


def typecheck(config: Mapping[str, object], where: Path) -> None:
    """`tsc -p` on a tsconfig.json written in `where`; any error fails with tsc's report."""
    (where / "tsconfig.json").write_text(json.dumps(config))
    res = subprocess.run(
        [str(tool("tsc")), "-p", str(where / "tsconfig.json")],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
