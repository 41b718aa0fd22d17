"""Bring the stack up in order, keep it in the foreground or the background, take it down.

`make run|start|stop|status|logs` call this (`python -m deploy …`). Order of `up`:

    render configs → dev keys → supervisord (starts NATS) → NATS healthy →
    `http_api provision` → `http_api seed-demo` (dev) → API workers, gateways, nginx →
    ready (`/api/readyz` through nginx and every gateway's `/readyz` answer 200)

Every process of a stack carries NATSGATE_STACK=<its VAR_DIR> in its environment; `stop`
ends supervisord (which stops its programs in priority order) and then checks, by that
marker, that no process of the stack is left, ending any orphan by pid.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xmlrpc.client
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from deploy.limits import Limits
from deploy.render import STACK_MARKER, Layout, nginx_binary, render, stack_env
from shared.natsio import PASSWORD_ENV, Role, ensure_dev_credentials
from shared.settings import DEFAULT_DEMO_PASSWORD, Settings

SUPERVISORD = str(Path(sys.executable).parent / "supervisord")
SUPERVISORCTL = str(Path(sys.executable).parent / "supervisorctl")
APP_GROUPS = ("http_api", "ws_gateway")  # started once NATS is provisioned; nginx once they
DEMO_USERS = ("admin", "alice", "bob")


class StackError(Exception):
    """The stack could not be brought up; the message says what to look at."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM while bringing the stack up."""


# ---------------------------------------------------------------- small helpers


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    # No proxy: an http_proxy in the environment must not see loopback health checks.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, ValueError):
        return None


def _poll(what: str, check: Callable[[], bool], deadline: float, *, every: float = 0.1) -> None:
    """Wait for `check()` until the deadline (monotonic); never a fixed sleep."""
    while not check():
        if time.monotonic() > deadline:
            raise StackError(f"timed out waiting for {what}")
        time.sleep(every)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def _environ(pid: str) -> list[bytes]:
    try:
        return (Path("/proc") / pid / "environ").read_bytes().split(b"\0")
    except OSError:
        return []


def stack_pids(layout: Layout) -> list[int]:
    """Every live process carrying this stack's marker (ours and our parents excluded)."""
    marker = f"{STACK_MARKER}={layout.var}".encode()
    skip = _ancestors()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        if marker in _environ(entry.name) and _pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def make_args(var: Path, base_port: int | str) -> str:
    """The `make` arguments that name one stack: VAR_DIR (its sockets and pids) and
    BASE_PORT (where `status` asks for readiness); nothing for the defaults."""
    args = []
    if var != Layout.of(Settings()).var:
        args.append(f"VAR_DIR={var}")
    if str(base_port) != str(Settings().base_port):
        args.append(f"BASE_PORT={base_port}")
    return "".join(" " + a for a in args)


def other_stacks(layout: Layout) -> dict[Path, str]:
    """Stacks running from another VAR_DIR than `layout`'s: their VAR_DIR → BASE_PORT, read
    from the marker and the settings every process of a stack carries."""
    skip = _ancestors()
    found: dict[Path, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        env = dict(v.split(b"=", 1) for v in _environ(entry.name) if b"=" in v)
        var = env.get(STACK_MARKER.encode())
        if var and Path(var.decode()) != layout.var:
            found[Path(var.decode())] = env.get(b"BASE_PORT", b"").decode()
    return found


def _elsewhere(layout: Layout, command: str) -> str:
    """What to type to reach the stacks that are up elsewhere (`make stop` without the
    start's VAR_DIR finds nothing: the walkthrough's stack stayed up)."""
    return "".join(
        f"\n  running with VAR_DIR {var}: `make {command}{make_args(var, port)}`"
        for var, port in sorted(other_stacks(layout).items())
    )


def _ports(settings: Settings) -> Iterator[tuple[int, str]]:
    yield settings.base_port, "nginx (BASE_PORT)"
    for p in settings.api_ports:
        yield p, "http_api"
    for p in settings.gateway_ports:
        yield p, "ws_gateway"
    for i in range(settings.nats_cluster):
        yield settings.nats_port + i, f"NATS n{i} client"
        yield settings.nats_monitor_port + i, f"NATS n{i} monitoring"
        if settings.nats_cluster > 1:
            yield settings.nats_cluster_port + i, f"NATS n{i} routes"


def _check_ports_free(settings: Settings) -> None:
    for port, what in _ports(settings):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((settings.host, port))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                raise StackError(
                    f"port {port} ({what}) is already in use: another stack may be up "
                    f"(`make status`, `make stop`), or choose another BASE_PORT"
                ) from None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"  ({path} is missing)"
    return "\n".join("  | " + line for line in text)


# ---------------------------------------------------------------- supervisord


def rpc(layout: Layout) -> Any:
    """A client for supervisord's XML-RPC interface on its unix socket."""
    from supervisor.xmlrpc import SupervisorTransport  # type: ignore[import-untyped]

    transport = SupervisorTransport(None, None, f"unix://{layout.supervisor_sock}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)


def supervisord_running(layout: Layout) -> bool:
    try:
        with rpc(layout) as server:
            return bool(server.supervisor.getState()["statecode"] == 1)
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        return False


def _process_info(layout: Layout) -> list[dict[str, Any]]:
    try:
        with rpc(layout) as server:
            return list(server.supervisor.getAllProcessInfo())
    except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
        return []


def _check_no_fatal(layout: Layout) -> list[dict[str, Any]]:
    """Fail fast when supervisord gave up on a program (it retries the others itself).
    Returns the process info it read."""
    info = _process_info(layout)
    for p in info:
        if p["statename"] == "FATAL":
            raise StackError(
                f"{p['group']}:{p['name']} is FATAL; last lines of its log:\n"
                + _tail(Path(p["stdout_logfile"]))
            )
    return info


def _gateways_ready(settings: Settings) -> bool:
    return all(
        _http_status(f"http://{settings.host}:{p}/readyz") == 200 for p in settings.gateway_ports
    )


def diagnose(layout: Layout) -> str:
    """Every program that should run but does not, with the end of its log."""
    lines = []
    for p in _process_info(layout):
        if p["statename"] not in ("RUNNING", "STOPPED"):
            lines.append(f"{p['group']}:{p['name']} is {p['statename']}:")
            lines.append(_tail(Path(p["stdout_logfile"])))
    return "\n".join(lines)


# ---------------------------------------------------------------- the steps of `up`


def _nats_healthy(settings: Settings) -> bool:
    return all(
        _http_status(f"http://127.0.0.1:{settings.nats_monitor_port + i}/healthz") == 200
        for i in range(settings.nats_cluster)
    )


def _only_role(env: dict[str, str], role: Role | None) -> dict[str, str]:
    """`env` without the NATS passwords of every role but `role`."""
    keep = PASSWORD_ENV[role] if role else None
    return {k: v for k, v in env.items() if k == keep or k not in PASSWORD_ENV.values()}


def _run_admin(layout: Layout, env: dict[str, str], *args: str, deadline: float) -> None:
    """`python -m http_api <args>`, retried until the deadline (NATS may still elect); as
    the NATS user `provision`, with no other role's password."""
    cmd = [sys.executable, "-m", "http_api", *args]
    env = _only_role(env, "provision")
    while True:
        remaining = max(1.0, deadline - time.monotonic())
        try:
            res = subprocess.run(
                cmd,
                cwd=layout.root,
                env=env,
                capture_output=True,
                text=True,
                timeout=remaining,
            )
        except subprocess.TimeoutExpired as e:
            raise StackError(f"`{' '.join(cmd[1:])}` did not finish in time") from e
        if res.returncode == 0:
            return
        if time.monotonic() > deadline or "No module named" in res.stderr:
            raise StackError(
                f"`{' '.join(cmd[1:])}` failed (exit {res.returncode}):\n"
                + (res.stdout + res.stderr).strip()
            )
        time.sleep(0.5)


def _apps_ready(settings: Settings, layout: Layout) -> bool:
    _check_no_fatal(layout)
    return all(
        _http_status(f"http://{settings.host}:{p}/api/readyz") == 200 for p in settings.api_ports
    ) and _gateways_ready(settings)


def _ready(settings: Settings, layout: Layout) -> bool:
    """Ready = every program RUNNING (past startsecs), `/api/readyz` answers 200 through
    nginx and every gateway's `/readyz` answers 200."""
    info = _check_no_fatal(layout)
    if not info or any(p["statename"] != "RUNNING" for p in info):
        return False
    if _http_status(f"{settings.public_url}/api/readyz") != 200:
        return False
    return _gateways_ready(settings)


def _start_apps(settings: Settings, layout: Layout, env: dict[str, str], deadline: float) -> None:
    _poll("NATS (monitoring /healthz)", lambda: _nats_healthy(settings), deadline)
    _run_admin(layout, env, "provision", deadline=deadline)
    if not settings.production:
        _run_admin(layout, env, "seed-demo", deadline=deadline)
    with rpc(layout) as server:
        for group in APP_GROUPS:
            server.supervisor.startProcessGroup(group, False)
    # nginx last, so that it never marks a worker that is still starting as failed.
    _poll("API workers and gateways (/readyz)", lambda: _apps_ready(settings, layout), deadline)
    with rpc(layout) as server:
        server.supervisor.startProcessGroup("nginx", False)
    _poll(
        "the stack to be ready (/api/readyz through nginx, gateways' /readyz)",
        lambda: _ready(settings, layout),
        deadline,
        every=0.2,
    )


def banner(settings: Settings, layout: Layout, *, foreground: bool) -> str:
    url = settings.public_url
    if settings.production:
        logins = "  production mode: no demo users"
    else:
        password = (
            DEFAULT_DEMO_PASSWORD
            if settings.demo_password == DEFAULT_DEMO_PASSWORD
            else "the DEMO_PASSWORD you set"
        )
        logins = f"  demo logins: {', '.join(DEMO_USERS)} — password: {password}"
    nats = ", ".join(settings.nats_url)
    args = make_args(layout.var, settings.base_port)  # the same make arguments find it again
    how = "Ctrl-C stops everything" if foreground else f"`make stop{args}` stops everything"
    return (
        f"\nnatsgate is up: {url}\n{logins}\n"
        f"  API {url}/api/ · WebSocket ws://{settings.host}:{settings.base_port}/ws · "
        f"NATS {nats}\n"
        f"  logs {layout.log_dir}/ (`make logs{args}`) · `make status{args}` · {how}\n"
    )


def _preflight(settings: Settings, layout: Layout) -> dict[str, str]:
    settings.check()
    if nginx_binary() is None:
        raise StackError(
            "nginx is not installed: `make ensure-nginx` installs it (as root, with apt-get, "
            "dnf or apk), or install it with your package manager"
        )
    leftovers = stack_pids(layout)
    if leftovers:
        print(f"ending processes left by an earlier run of this stack: {leftovers}")
        _end(leftovers)
    _check_ports_free(settings)
    # supervisord raises every program's fd limit to what MAX_CONNECTIONS needs; past the
    # hard limit it could not, and nginx would cut sockets instead of the gateways' 503.
    too_many = Limits.of(settings).problem(settings)
    if too_many:
        raise StackError(too_many)
    # NATS users' passwords before the NATS config that lists them: generated once into
    # VAR_DIR in dev; in production every role's password must be set (refused otherwise).
    ensure_dev_credentials(settings)
    render(settings, layout)
    if not settings.production:
        from shared.auth import ensure_dev_keys

        # Here, once, so the API workers and gateways never race to create them.
        ensure_dev_keys(settings)
    env = dict(os.environ)
    env.update(stack_env(settings, layout))
    return env


# ---------------------------------------------------------------- commands


def start(settings: Settings, layout: Layout, timeout: float) -> int:
    """Background: supervisord daemonizes; return once the stack is ready."""
    if supervisord_running(layout):
        # With the settings it was started with, which may differ from ours.
        print(
            f"already running from {layout.supervisord_conf}: `make status`; "
            "`make stop` first to change its settings"
        )
        return 0
    env = _preflight(settings, layout)
    # supervisord (and so every program) gets no role's password: each program has its own
    # in the rendered config.
    subprocess.run(
        [SUPERVISORD, "-c", str(layout.supervisord_conf)], env=_only_role(env, None), check=True
    )
    deadline = time.monotonic() + timeout
    try:
        _poll("supervisord", lambda: supervisord_running(layout), deadline)
        _start_apps(settings, layout, env, deadline)
    except BaseException as e:
        if isinstance(e, StackError):
            print(f"error: {e}\n{diagnose(layout)}", file=sys.stderr)
        print("stopping what was started …", file=sys.stderr)
        stop(layout, quiet=True)
        if isinstance(e, StackError):
            return 1
        raise
    print(banner(settings, layout, foreground=False))
    return 0


def run(settings: Settings, layout: Layout, timeout: float) -> int:
    """Foreground: supervisord is our child; Ctrl-C (or SIGTERM) stops everything."""
    if supervisord_running(layout):
        raise StackError("the stack is already running in the background: `make stop` first")
    env = _preflight(settings, layout)
    # -s: supervisord's own lines (spawned, success, its CRIT about the unix socket having
    # no HTTP authentication: the socket is 0700 in VAR_DIR/run) stay in supervisord.log;
    # the terminal shows the apps' logs (_follow_logs) once the stack is up.
    proc = subprocess.Popen(
        [SUPERVISORD, "-n", "-s", "-c", str(layout.supervisord_conf)], env=_only_role(env, None)
    )
    follower: subprocess.Popen[bytes] | None = None
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # supervisord stops its programs, then exits
        if not stopping:
            stopping = True
            raise Interrupted

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    code = 0
    try:
        deadline = time.monotonic() + timeout
        _poll("supervisord", lambda: proc.poll() is None and supervisord_running(layout), deadline)
        _start_apps(settings, layout, env, deadline)
        print(banner(settings, layout, foreground=True), flush=True)
        follower = _follow_logs(layout)
        code = proc.wait()
        if not stopping:
            print(f"supervisord exited ({code})", file=sys.stderr)
    except Interrupted:
        pass
    except StackError as e:
        print(f"error: {e}\n{diagnose(layout)}", file=sys.stderr)
        code = 1
    finally:
        stopping = True
        print("stopping …", file=sys.stderr, flush=True)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _wait_for(proc)
        _end(stack_pids(layout))
        if follower is not None:
            follower.terminate()
            _wait_for(follower)
    print("stopped", file=sys.stderr)
    return code


def _follow_logs(layout: Layout) -> subprocess.Popen[bytes]:
    """Every app's log (API workers, gateways, NATS, nginx) on our stdout from now on, each
    under its file's name, as `make logs` shows them; supervisord's own log is not among them."""
    files = sorted(str(p) for p in layout.log_dir.glob("*.log") if p.name != "supervisord.log")
    return subprocess.Popen(["tail", "-n", "0", "-F", *files], stdin=subprocess.DEVNULL)


def _wait_for(proc: subprocess.Popen[bytes]) -> None:
    # supervisord bounds every program's stop by stopwaitsecs, then SIGKILLs it.
    while True:
        try:
            proc.wait()
            return
        except Interrupted:
            print("still stopping (programs drain first) …", file=sys.stderr, flush=True)


def _end(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM these pids, SIGKILL any still alive after `grace` seconds."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _pid_alive(pid):
            print(f"pid {pid} ignored SIGTERM: killing it", file=sys.stderr)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def stop(layout: Layout, *, quiet: bool = False, timeout: float = 90.0) -> int:
    """Stop supervisord and its programs; end anything of this stack that is left."""
    pid = _read_pid(layout.supervisord_pid)
    was_running = supervisord_running(layout)
    if was_running:
        try:
            with rpc(layout) as server:
                server.supervisor.shutdown()
        except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
            pass
    elif pid and _pid_alive(pid) and pid in stack_pids(layout):
        os.kill(pid, signal.SIGTERM)
    if pid:
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    left = stack_pids(layout)
    if left:
        print(f"ending processes of this stack still alive: {left}", file=sys.stderr)
        _end(left)
    if not quiet:
        print("stopped" if was_running or left else f"not running{_elsewhere(layout, 'stop')}")
    return 0


def status(settings: Settings, layout: Layout) -> int:
    if not supervisord_running(layout):
        print(f"not running (VAR_DIR {layout.var}){_elsewhere(layout, 'status')}")
        return 3
    for p in _process_info(layout):
        print(f"{p['group'] + ':' + p['name']:<28} {p['statename']:<9} {p['description']}")
    code = _http_status(f"{settings.public_url}/api/readyz")
    print(f"{settings.public_url}/api/readyz → {code if code is not None else 'no answer'}")
    return 0 if code == 200 else 1


def logs(layout: Layout) -> int:
    files = sorted(str(p) for p in layout.log_dir.glob("*.log"))
    if not files:
        print(f"no logs under {layout.log_dir}")
        return 1
    os.execvp("tail", ["tail", "-n", "20", "-F", *files])


def ctl(layout: Layout, args: list[str]) -> int:
    os.execv(SUPERVISORCTL, [SUPERVISORCTL, "-c", str(layout.supervisord_conf), *args])
