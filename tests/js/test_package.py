"""clients/js as a package: its version is the project's, `npm pack` makes a tarball that a
clean project installs and imports (every subpath, from ESM and from CommonJS), whose types
type-check a TypeScript consumer, and that publint and attw find nothing wrong with."""

from __future__ import annotations

import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import shared
from shared.errors import CloseCode, ErrorCode
from tests.js.package import PACKAGE, consumer, pack, tool, typecheck

pytestmark = pytest.mark.timeout(300)

SUBPATHS = ["stores", "react", "vue", "svelte"]


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield pack(tmp_path_factory.mktemp("pack"))


@pytest.fixture(scope="module")
def project(tarball: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return consumer(tmp_path_factory.mktemp("consumer") / "app", tarball)


def node(script: str, cwd: Path, *, module: bool = True) -> str:
    args = ["node", f"--input-type={'module' if module else 'commonjs'}", "-"]
    res = subprocess.run(args, input=script, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stderr, res.stdout + res.stderr
    return res.stdout


def test_the_version_is_the_projects() -> None:
    """One version: shared.__version__ (pyproject.toml reads it); package.json and its lock
    say the same."""
    manifest = json.loads((PACKAGE / "package.json").read_text())
    lock = json.loads((PACKAGE / "package-lock.json").read_text())
    assert manifest["version"] == shared.__version__
    assert lock["version"] == lock["packages"][""]["version"] == shared.__version__


def test_the_packages_version_and_codes_are_the_servers(project: Path) -> None:
    """`VERSION`, `ErrorCode` and `CloseCode` as the installed package exports them: the
    project's version, and shared/errors.py's codes (CloseCode plus the client's own two)."""
    out = node(
        'import { CloseCode, ErrorCode, VERSION } from "natsgate";'
        "console.log(JSON.stringify({ CloseCode, ErrorCode, VERSION }));",
        project,
    )
    js = json.loads(out)
    assert js["VERSION"] == shared.__version__
    assert js["ErrorCode"] == {c.name: c.value for c in ErrorCode}
    server = {c.name: c.value for c in CloseCode}
    assert {k: v for k, v in js["CloseCode"].items() if k in server} == server
    assert set(js["CloseCode"]) - set(server) == {"ABNORMAL", "RECONNECT"}


def test_the_tarball_holds_the_modules_their_types_and_the_readme(tarball: Path) -> None:
    with tarfile.open(tarball) as tar:
        names = {n.removeprefix("package/") for n in tar.getnames()}
    sources = {f"src/{p.name}" for p in (PACKAGE / "src").glob("*.js")}
    assert sources <= names
    assert {f"types/{Path(s).stem}.d.ts" for s in sources} <= names
    assert {"package.json", "README.md"} <= names
    assert not [n for n in names if n.startswith(("test/", "node_modules/"))]


def test_a_clean_project_imports_every_entry_point(project: Path) -> None:
    out = node(
        """
        import * as natsgate from "natsgate";
        import { kvStore } from "natsgate/stores";
        import { bindReact } from "natsgate/react";
        import { bindVue } from "natsgate/vue";
        import { kv } from "natsgate/svelte";
        const client = natsgate.createClient({ url: "ws://127.0.0.1:9/ws", connect: false });
        console.log(client.state, client.kv("todos").state,
          [kvStore, bindReact, bindVue, kv, natsgate.createApi].map((f) => typeof f).join(","),
          natsgate.PROTOCOL_VERSION);
        client.close();
        """,
        project,
    )
    functions = ",".join(["function"] * 5)
    assert out.split() == ["connecting", "connecting", functions, "1"]
    # Node ≥ 20.19 loads an ES module from require(): CommonJS apps need no dynamic import.
    out = node('console.log(typeof require("natsgate").createClient)', project, module=False)
    assert out.strip() == "function"


CONSUMER_TS = """
import { createApi, createClient, SyncError, type KvChange, type StreamMessage } from "natsgate";
import { kvStore } from "natsgate/stores";

type Todo = { id: string; title: string; done: boolean };

const client = createClient({ url: "ws://127.0.0.1:9/ws", connect: false, token: "t" });
const todos = client.kv<Todo>("todos", { pattern: "user.u1.>" });
todos.on("change", (changes: KvChange<Todo>[]) => changes.map((c) => c.value?.title));
const title: string | undefined = todos.get("user.u1.t1")?.title;
const chat = client.stream<{ text: string }>("chat", { filter: "chat.room.1", startSeq: 1 });
chat.on("message", (m: StreamMessage<{ text: string }>) => m.payload.text.length);
chat.on("gap", (r) => r.expected);
client.on("state", (state, details) => `${state} ${details.retryIn ?? 0}`);
const api = createApi({ base: "/api" });
const stop = kvStore(client, "todos").subscribe(({ values }) => values.size);
const error: SyncError = new SyncError("closed", "client closed");

// @ts-expect-error: no such event
todos.on("message", () => {});
// @ts-expect-error: a state is a string
client.on("state", (state: number) => state);
// @ts-expect-error: a Todo has no `text`
todos.get("k")?.text;
// @ts-expect-error: startSeq is a number
client.stream("chat", { startSeq: "1" });

export { api, error, stop, title };
"""


def test_the_types_check_a_typescript_consumer(project: Path) -> None:
    """The declarations tsc made from the JSDoc type a consumer's code, and refuse misuse."""
    (project / "main.ts").write_text(CONSUMER_TS)
    config = {
        "compilerOptions": {
            "strict": True,
            "noEmit": True,
            "module": "nodenext",
            "moduleResolution": "nodenext",
            "target": "es2022",
            "lib": ["es2022", "dom"],
        },
        "files": ["main.ts"],
    }
    typecheck(config, project)


def test_publint_and_attw_find_nothing(tarball: Path) -> None:
    """Every publint rule (warnings as errors) and every attw resolution mode (node10,
    node16 from CJS and ESM, bundler). The one rule left out, cjs-resolves-to-esm, is the
    package's design: ES modules only, which Node ≥ 20.19 require()s (tested above)."""
    for args in (
        [str(tool("publint")), "run", str(tarball), "--strict"],
        [
            str(tool("attw")),
            str(tarball),
            "--profile",
            "strict",
            "--format",
            "ascii",
            "--ignore-rules",
            "cjs-resolves-to-esm",
        ],
    ):
        res = subprocess.run(args, cwd=PACKAGE, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr


def test_the_demo_spa_uses_only_what_the_package_exports(tmp_path: Path) -> None:
    """web/ imports `natsgate` (index.html's import map → clients/js/src, served by nginx):
    type-checked against the package, a name it no longer exports, or a view that uses a
    helper it does not import, fails here rather than in a browser."""
    web = PACKAGE.parents[1] / "web"
    config = {
        "compilerOptions": {
            "allowJs": True,
            "checkJs": True,
            "noEmit": True,
            "module": "esnext",
            "moduleResolution": "bundler",
            "target": "es2022",
            "lib": ["es2022", "dom", "dom.iterable"],
            "paths": {"natsgate": [str(PACKAGE / "src" / "index.js")]},
        },
        "files": [str(web / "app.js")],
    }
    typecheck(config, tmp_path)
    importmap = json.loads(
        (web / "index.html").read_text().split('<script type="importmap">')[1].split("</script>")[0]
    )
    assert importmap["imports"]["natsgate"] == "/natsgate/index.js"
