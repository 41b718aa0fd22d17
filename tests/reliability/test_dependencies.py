"""Security 8: the dependency audit over requirements.lock (`make lock` writes it, `make
install` installs exactly it).

The advisories come from pip-audit when its service answers. This machine reaches only the
package registries: PyPI's per-version records (what pip-audit asks for) are not served
here, its per-project records are, and PyPI lists on a project's record every known
advisory (from the PyPA advisory database / OSV) that affects the project's newest release.
So the fallback is exact for a pinned version that is the newest release, and says so by
name for one that is not (held back by another package's pin): that one is not checked,
never counted as clean. What the gateway and the API run on (the runtime closure) must be
checked in full; a development tool held back is reported.
"""

from __future__ import annotations

import asyncio
import importlib.metadata as md
import json
import sys
from pathlib import Path

import aiohttp
import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.reliability.conftest import Figures

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
PROJECT = "natsgate"


def locked() -> dict[str, str]:
    """requirements.lock as {canonical name: version}."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def closure(name: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """The distributions `name[extras]` needs, itself excluded, environment markers applied."""
    needed: set[str] = set()
    visited: set[tuple[str, frozenset[str]]] = set()
    todo = [(canonicalize_name(name), extras)]
    env = default_environment()
    while todo:
        item = todo.pop()
        if item in visited:
            continue
        visited.add(item)
        dist, want = item
        for spec in md.requires(dist) or ():
            req = Requirement(spec)
            if req.marker is not None and not any(
                req.marker.evaluate({**env, "extra": e}) for e in want or {""}
            ):
                continue
            needed.add(canonicalize_name(req.name))
            todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return needed


def test_the_lock_is_what_make_install_installs() -> None:
    """Every distribution the project and its dev extra need is pinned, at the installed
    version: the audited set is the set the tests and the stack run on."""
    pins = locked()
    needed = closure(PROJECT, frozenset({"dev"}))
    assert needed, "the project is not installed (make install)"
    unpinned = sorted(needed - pins.keys())
    mismatched = {
        n: (md.version(n), pins[n])
        for n in needed & pins.keys()
        if Version(md.version(n)) != Version(pins[n])
    }
    assert unpinned == [], f"not in requirements.lock (run `make lock`): {unpinned}"
    assert mismatched == {}, f"installed != locked (run `make install`): {mismatched}"


async def _pip_audit(tmp_path: Path) -> tuple[dict[str, list[str]], list[str], str]:
    """(vulnerable {name version: ids}, audited names, output) from pip-audit over the lock."""
    out = tmp_path / "audit.json"
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "pip-audit"),
        *("--requirement", str(LOCK), "--no-deps", "--disable-pip"),
        *("--progress-spinner", "off", "--format", "json", "--output", str(out)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(300):
        text = (await proc.communicate())[0].decode(errors="replace")
    try:
        deps = json.loads(out.read_text())["dependencies"]
    except (OSError, ValueError, KeyError):
        deps = []
    audited = [d for d in deps if "skip_reason" not in d]
    vulnerable = {
        f"{d['name']} {d['version']}": [v["id"] for v in d["vulns"]]
        for d in audited
        if d.get("vulns")
    }
    skipped = [d["skip_reason"] for d in deps if "skip_reason" in d]
    why = skipped[0] if skipped else text.strip()[-200:]
    return vulnerable, [canonicalize_name(d["name"]) for d in audited], why


async def _pypi_records(names: list[str]) -> dict[str, dict[str, object]]:
    """PyPI's per-project record (newest version, its advisories) for each name."""
    records: dict[str, dict[str, object]] = {}
    sem = asyncio.Semaphore(8)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:

        async def one(name: str) -> None:
            async with sem, http.get(f"https://pypi.org/pypi/{name}/json") as r:
                r.raise_for_status()
                doc = await r.json()
            records[name] = {"newest": doc["info"]["version"], "vulns": doc["vulnerabilities"]}

        await asyncio.gather(*(one(n) for n in names))
    return records


def _held_back_by(name: str, newest: str, pins: dict[str, str]) -> str | None:
    """The locked distribution whose requirement excludes `name`'s newest release."""
    for other in pins:
        try:
            requires = md.requires(other) or ()
        except md.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if canonicalize_name(req.name) == name and not req.specifier.contains(newest, True):
                return f"{other} ({req.name}{req.specifier})"
    return None


@pytest.mark.full_only
async def test_locked_dependencies_have_no_known_advisory(tmp_path: Path, figures: Figures) -> None:
    pins = locked()
    runtime = closure(PROJECT)
    vulnerable, audited, why = await _pip_audit(tmp_path)
    source = "pip-audit -r requirements.lock"
    unchecked: dict[str, str] = {}
    if not audited:
        # pip-audit could reach none of its data: PyPI's per-project records instead.
        source = f"PyPI project records (pip-audit checked none: {why[:120]})"
        # A control whose newest release has known advisories (pycrypto 2.6.1): the
        # source must report them, or an empty answer would pass for a clean one.
        records = await _pypi_records([*sorted(pins), "pycrypto"])
        control = [str(v["id"]) for v in records.pop("pycrypto")["vulns"]]  # type: ignore[attr-defined]
        assert control, "PyPI's records carry no advisories here: nothing can be checked"
        source += f"; control pycrypto 2.6.1: {len(control)} advisories found"
        for name, version in pins.items():
            rec = records[name]
            ids = [str(v["id"]) for v in rec["vulns"]]  # type: ignore[attr-defined]
            if Version(version) == Version(str(rec["newest"])):
                audited.append(name)
                if ids:
                    vulnerable[f"{name} {version}"] = ids
            else:
                why = _held_back_by(name, str(rec["newest"]), pins)
                unchecked[name] = f"{version} < newest {rec['newest']}, " + (
                    f"held back by {why}" if why else "the lock is stale: run `make lock`"
                )
    runtime_unchecked = sorted(runtime & unchecked.keys())
    figures.add(
        "S8",
        "test_locked_dependencies_have_no_known_advisory",
        f"every pin of requirements.lock ({len(pins)}: runtime {len(runtime)}, the rest dev "
        f"tools) against known advisories; source: {source}",
        f"{len(audited)} checked, {len(vulnerable)} with known advisories {vulnerable or ''}; "
        f"runtime dependencies checked {len(runtime) - len(runtime_unchecked)}/{len(runtime)}; "
        f"not checkable here {len(unchecked)} {unchecked or ''}",
    )
    assert vulnerable == {}
    assert runtime_unchecked == [], {n: unchecked[n] for n in runtime_unchecked}
    stale = {n: why for n, why in unchecked.items() if "held back" not in why}
    assert stale == {}
