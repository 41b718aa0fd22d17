"""The Markdown code blocks marked `<!-- runnable -->` run as written against a whole stack
(`make start` on free ports): only the address of `make run`'s nginx is swapped for the
test stack's. Shell blocks such as `make run` are not marked."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.stackrun import ROOT, Stack, started
from tests.docs.markdown import Snippet, markdown_files, runnable_snippets
from tests.js.package import consumer, pack

pytestmark = pytest.mark.timeout(300)

DEFAULT_ADDRESS = "127.0.0.1:8080"  # what the docs say: `make run` with its defaults
SNIPPETS = [s for path in markdown_files() for s in runnable_snippets(path)]
RUNNERS = {"python": [sys.executable, "-"], "js": ["node", "--input-type=module", "-"]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with started(tmp_path_factory.mktemp("stack") / "var") as s:
        yield s


@pytest.fixture(scope="module")
def js_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where JS snippets run: a clean project with only the packed clients/js installed, so
    `import ... from "natsgate"` resolves as it does for a user."""
    tmp = tmp_path_factory.mktemp("js")
    return consumer(tmp / "app", pack(tmp))


def run(snippet: Snippet, stack: Stack, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert snippet.lang in RUNNERS, f"{snippet.where}: no runner for {snippet.lang!r}"
    assert DEFAULT_ADDRESS in snippet.code, f"{snippet.where}: names no stack address"
    address = f"{stack.settings.host}:{stack.settings.base_port}"
    return subprocess.run(
        RUNNERS[snippet.lang],
        input=snippet.code.replace(DEFAULT_ADDRESS, address),
        cwd=cwd,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_readmes_python_client_snippet_is_marked_runnable() -> None:
    """The snippet the issue found broken is among those run (and so is every other one)."""
    readme = [s for s in SNIPPETS if s.path == Path(ROOT / "README.md")]
    assert any(s.lang == "python" and "natsgate_client" in s.code for s in readme)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.where for s in SNIPPETS])
def test_snippet_runs_as_written(
    snippet: Snippet, stack: Stack, request: pytest.FixtureRequest
) -> None:
    """It exits 0 with nothing on stderr and prints what it shows."""
    cwd = request.getfixturevalue("js_project") if snippet.lang == "js" else ROOT
    res = run(snippet, stack, cwd)
    assert res.returncode == 0 and not res.stderr, f"{snippet.where}:\n{res.stdout}{res.stderr}"
    assert res.stdout.strip(), f"{snippet.where} printed nothing"
    if "natsgate_client" in snippet.code:
        # The README's client: alice's own todo arrives over kv_sub, the chat message over
        # js_sub, each written through the API just before.
        assert "'key': 'user." in res.stdout and "'title': 'try natsgate'" in res.stdout
        assert "'text': 'hello'" in res.stdout
    if "natsgate" in snippet.code and snippet.lang == "js":
        # The package's README: the todo written over HTTP is in the live store, which is
        # open (long polling: Node has no WebSocket that carries a token).
        assert res.stdout.startswith("open polling {") and "title: 'try natsgate'" in res.stdout
