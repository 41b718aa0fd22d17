"""The repository's own documents stay true: links resolve, the settings are all documented,
`.env.example` is what the settings say, and the version is said once."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from urllib.parse import unquote

import msgspec
import pytest

from deploy import envfile
from http_api import openapi
from http_api.routes import ROUTES
from shared import __version__
from shared.settings import DESCRIPTIONS, Settings, load
from tests.docs.markdown import (
    ROOT,
    anchors,
    is_external,
    links,
    markdown_files,
    slug,
    table_first_column,
)

SETTING_NAMES = [f.name.upper() for f in msgspec.structs.fields(Settings)]


def test_markdown_files_are_found() -> None:
    """The scan sees the repo's documents and nothing installed (else the next test is void)."""
    found = {str(p.relative_to(ROOT)) for p in markdown_files()}
    assert {"README.md", "CHANGELOG.md", "deploy/README.md", "docs/security.md"} <= found
    assert not any(".venv" in p or "node_modules" in p for p in found)


def test_every_relative_link_resolves_inside_the_repo() -> None:
    """Every relative link or image of every *.md names a file of this repository, and its
    #anchor, if any, a heading of that file."""
    broken = []
    for path in markdown_files():
        text = path.read_text(encoding="utf-8")
        for line, target in links(text):
            if is_external(target):
                continue
            where = f"{path.relative_to(ROOT)}:{line}: {target}"
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / unquote(file_part)).resolve() if file_part else path
            if not dest.is_relative_to(ROOT):
                broken.append(f"{where} (outside the repository)")
            elif not dest.exists():
                broken.append(f"{where} (no such file)")
            elif (
                anchor
                and dest.suffix == ".md"
                and unquote(anchor) not in anchors(dest.read_text(encoding="utf-8"))
            ):
                broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_links_are_read_from_the_prose_not_from_code() -> None:
    text = (
        "see [a](docs/x.md#y) and ![i](p.png)\n`[no](code.md)`\n```\n[no](fence.md)\n```\n"
        '[ref]: ../shared/PROTOCOL.md\n<a href="z.md">z</a> [web](https://example.org)\n'
    )
    targets = [t for _, t in links(text)]
    assert targets == [
        "docs/x.md#y",
        "p.png",
        "../shared/PROTOCOL.md",
        "https://example.org",
        "z.md",
    ]
    assert [is_external(t) for t in targets] == [False, False, False, True, False]


def test_heading_anchors_follow_githubs_rules() -> None:
    assert slug("Long polling, the fallback transport") == "long-polling-the-fallback-transport"
    assert slug("Gateway metrics (`/metrics` on each gateway port)") == (
        "gateway-metrics-metrics-on-each-gateway-port"
    )
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_every_setting_is_in_the_readmes_settings_table() -> None:
    """The README's table lists every variable shared/settings.py reads, and only those."""
    documented = table_first_column((ROOT / "README.md").read_text(encoding="utf-8"), "Settings")
    missing = [n for n in SETTING_NAMES if n not in documented]
    unknown = [n for n in documented if n not in SETTING_NAMES]
    assert not missing, f"not in README.md's Settings table: {missing}"
    assert not unknown, f"in README.md's Settings table but not a setting: {unknown}"
    assert len(documented) == len(set(documented)), "a variable is listed twice"


def test_every_setting_has_a_description() -> None:
    assert sorted(DESCRIPTIONS) == sorted(f.name for f in msgspec.structs.fields(Settings))
    assert all(d.strip() for d in DESCRIPTIONS.values())


def test_env_example_is_generated_from_the_settings() -> None:
    """The committed .env.example is what `make env-example` writes now."""
    committed = (ROOT / ".env.example").read_text(encoding="utf-8")
    assert committed == envfile.render(), "stale .env.example: run `make env-example`"


def test_env_example_names_every_setting_with_a_default_that_loads() -> None:
    """Each variable once, after its description; uncommented, the file loads to exactly
    the defaults (so every value is spelled as the environment needs it)."""
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    assignments = re.findall(r"^# ([A-Z][A-Z0-9_]*)=(.*)$", text, re.MULTILINE)
    assert [name for name, _ in assignments] == SETTING_NAMES
    for name, _ in assignments:
        description = DESCRIPTIONS[name.lower()]
        assert f"# {description}\n# {name}=" in text, name
    assert load(dict(assignments)) == load({}) == Settings()


def test_the_version_is_said_in_one_place() -> None:
    """pyproject.toml reads shared.__version__; the OpenAPI document, CHANGELOG.md's latest
    release and docs/asyncapi.json (when there) say the same; no module sets another."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "shared.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)

    assert openapi.build(ROUTES)["info"]["version"] == __version__
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, re.M)
    assert releases and releases[0] == __version__, releases
    asyncapi = ROOT / "docs" / "asyncapi.json"
    if asyncapi.exists():
        assert json.loads(asyncapi.read_text())["info"]["version"] == __version__

    others = [
        str(p.relative_to(ROOT))
        for folder in ("shared", "ws_gateway", "http_api", "deploy")
        for p in (ROOT / folder).rglob("*.py")
        if re.search(r"^__version__\s*=", p.read_text(encoding="utf-8"), re.M)
    ]
    assert others == ["shared/__init__.py"]


@pytest.mark.parametrize("name", ["LICENSE", "CHANGELOG.md", ".env.example"])
def test_the_repository_files_a_newcomer_looks_for_exist(name: str) -> None:
    assert (ROOT / name).is_file()


def test_license_is_the_one_pyproject_declares() -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "MIT"
    assert license_text.startswith("MIT License\n")
    assert "natsgate contributors" in license_text


def test_changelog_keeps_the_format() -> None:
    """Keep a Changelog: an Unreleased section first, then releases newest first, each with
    its change types only."""
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## (.*)$", text, re.M)
    assert sections[0] == "[Unreleased]"
    kinds = set(re.findall(r"^### (.*)$", text, re.M))
    assert kinds <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
    versions = [tuple(map(int, v.split("."))) for v in re.findall(r"^## \[([\d.]+)\]", text, re.M)]
    assert versions == sorted(versions, reverse=True)


def test_readme_links_the_browsable_api_docs() -> None:
    assert "/api/docs" in Path(ROOT / "README.md").read_text(encoding="utf-8")
