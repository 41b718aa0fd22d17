"""NATS users per role on the stack `make start` runs (security review finding 16): the
gateway reads, writes no bucket but its durables and creates no stream, the API never sees
`$SYS`, a service answers commands but sends none and reads no auth bucket, a client without
credentials is refused, and the stack still serves through nginx."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError, NotFoundError
from supervisor.options import ServerOptions  # type: ignore[import-untyped]

from deploy import stack as ops
from deploy.render import Layout, nats_server_binary, render
from shared import natsio
from shared.capabilities import DURABLES_BUCKET
from shared.client import GatewayClient
from shared.natsio import Role
from shared.settings import load
from tests.deploy import test_stack as serving
from tests.deploy.stackrun import Stack, clean_env, free_base_port, login
from tests.e2e.test_command_service import EXAMPLE


def test_rendered_nats_config_lists_a_user_per_role_and_stays_private(tmp_path: Path) -> None:
    """With credentials the config has a user per role (nats-server -t accepts it) and is
    0600; without any (the test suite's own servers) it has no authorization at all."""
    s = Stack(tmp_path / "var").settings
    layout = Layout.of(s)
    passwords = natsio.ensure_dev_credentials(s)
    render(s, layout)
    conf = layout.nats_dir / "n0.conf"
    text = conf.read_text()
    assert set(passwords) == set(natsio.ROLES)
    for role, password in passwords.items():
        assert f'{{user: {role}, password: "{password}"' in text
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    res = subprocess.run([nats_server_binary(), "-t", "-c", str(conf)], capture_output=True)
    assert res.returncode == 0, res.stdout + res.stderr

    bare = Stack(tmp_path / "bare").settings
    render(bare, Layout.of(bare))
    assert "authorization {" not in (Layout.of(bare).nats_dir / "n0.conf").read_text()


PRODUCTION_PASSWORDS: dict[Role, str] = {
    "gateway": 'g"w%1,x=y',  # what supervisord and NATS configs must quote
    "api": "a'p i$x",
    "provision": "p\\r{o}v",
    "service": "s}e r'v\"",
}


async def test_production_passwords_reach_nats_and_each_program_only_its_own(
    tmp_path: Path,
) -> None:
    """Production: passwords from the settings, quotes and all, open NATS as each role;
    in the supervisord config each program carries only its own role's (0600), and
    nothing carries the provision or the service password."""
    env = {natsio.PASSWORD_ENV[r]: p for r, p in PRODUCTION_PASSWORDS.items()}
    s = load(
        clean_env(
            BASE_PORT=str(free_base_port()),
            VAR_DIR=str(tmp_path / "var"),
            APP_ENV="production",
            **env,
        )
    )
    assert natsio.configured_passwords(s) == PRODUCTION_PASSWORDS
    layout = Layout.of(s)
    render(s, layout)
    assert not natsio.dev_credentials_path(s).exists()
    assert stat.S_IMODE(layout.supervisord_conf.stat().st_mode) == 0o600
    options = ServerOptions()
    options.realize(args=["-c", str(layout.supervisord_conf)])
    programs = {g.name: g.process_configs[0].environment for g in options.process_group_configs}
    roles: dict[str, Role] = {"http_api": "api", "ws_gateway": "gateway"}
    for program, environment in programs.items():
        held = {k: v for k, v in environment.items() if k in natsio.PASSWORD_ENV.values()}
        role = roles.get(program)
        assert held == ({natsio.PASSWORD_ENV[role]: PRODUCTION_PASSWORDS[role]} if role else {})

    conf = layout.nats_dir / "n0.conf"
    proc = await asyncio.create_subprocess_exec(
        nats_server_binary(),
        "-c",
        str(conf),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        healthz = f"http://127.0.0.1:{s.nats_monitor_port}/healthz"
        await asyncio.to_thread(
            ops._poll, "NATS", lambda: ops._http_status(healthz) == 200, time.monotonic() + 20
        )
        for role, password in PRODUCTION_PASSWORDS.items():
            assert natsio.credentials(s, role) == (role, password)
            nc = await natsio.connect(s, f"as {role}", role=role, connect_timeout=5)
            try:
                assert nc.is_connected
                assert (await nc.jetstream().account_info()).streams == 0
            finally:
                await nc.close()
    finally:
        proc.terminate()
        await proc.wait()


class Client:
    """A NATS connection as one role of the stack; every asynchronous server error (a
    permissions violation) lands in `errors`."""

    def __init__(self, nc: NATS, errors: asyncio.Queue[Exception]) -> None:
        self.nc, self.errors = nc, errors

    async def violation(self, action: Callable[[NATS], Awaitable[object]]) -> str:
        """Run `action`, and return the permissions violation the server answers it with."""
        await action(self.nc)
        await self.nc.flush()
        async with asyncio.timeout(10):
            err = await self.errors.get()
        assert "permissions violation" in str(err).lower(), err
        return str(err)


@pytest.fixture
async def as_role(stack: Stack) -> AsyncIterator[Callable[[Role], Awaitable[Client]]]:
    opened: list[NATS] = []

    async def open_as(role: Role) -> Client:
        creds = natsio.credentials(stack.settings, role)
        assert creds is not None, "make start generated no NATS credentials"
        errors: asyncio.Queue[Exception] = asyncio.Queue()

        async def on_error(e: Exception) -> None:
            errors.put_nowait(e)

        nc = await natsio.nats_connect(
            list(stack.settings.nats_url),
            user=creds[0],
            password=creds[1],
            error_cb=on_error,
            allow_reconnect=False,
            inbox_prefix=natsio.SERVICE_INBOX_PREFIX if role == "service" else "_INBOX",
        )
        opened.append(nc)
        return Client(nc, errors)

    yield open_as
    for nc in opened:
        await nc.close()


async def test_each_role_is_held_to_its_permissions_and_the_stack_still_serves(
    stack: Stack, as_role: Callable[[Role], Awaitable[Client]]
) -> None:
    """Without credentials: refused. Gateway: reads auth_users, but may not write it (nor
    any bucket but gw_durables, its own) nor create a stream. API: may not subscribe to $SYS
    nor delete a stream. Then alice still sees bob's article over /ws (test_stack's main
    test, unchanged)."""
    creds_file = natsio.dev_credentials_path(stack.settings)
    assert stat.S_IMODE(creds_file.stat().st_mode) == 0o600

    # Refused at CONNECT: the server's INFO asks for auth, and a CONNECT without it gets
    # -ERR (spoken raw: nats-py leaves the socket of a refused attempt unclosed).
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.settings.nats_port)
    try:
        async with asyncio.timeout(10):
            info = json.loads((await reader.readline()).removeprefix(b"INFO "))
            assert info["auth_required"] is True
            writer.write(b'CONNECT {"verbose": false}\r\nPING\r\n')
            assert await reader.readline() == b"-ERR 'Authorization Violation'\r\n"
    finally:
        writer.close()
        await writer.wait_closed()

    gateway = await as_role("gateway")
    api = await as_role("api")
    provision = await as_role("provision")
    users = await gateway.nc.jetstream().key_value("auth_users")
    assert await users.keys()  # reads: the seeded demo users
    err = await gateway.violation(lambda nc: nc.publish("$KV.auth_users.intruder", b"{}"))
    assert "$kv.auth_users.intruder" in err.lower()
    await gateway.violation(lambda nc: nc.publish("$KV.articles.intruder", b"{}"))
    durables = await gateway.nc.jetstream().key_value(DURABLES_BUCKET)
    revision = await durables.create("chat.probe.d", b"{}")
    await durables.delete("chat.probe.d", last=revision)
    assert gateway.errors.empty()
    await gateway.violation(
        lambda nc: nc.publish(
            "$JS.API.STREAM.CREATE.rogue",
            b'{"name": "rogue", "subjects": ["rogue.>"]}',
            reply=nc.new_inbox(),
        )
    )
    err = await api.violation(lambda nc: nc.subscribe("$SYS.>"))
    assert "subscription" in err.lower() and "$sys.>" in err.lower()
    await api.violation(
        lambda nc: nc.publish("$JS.API.STREAM.DELETE.chat", b"", reply=nc.new_inbox())
    )

    # Nothing of it reached JetStream (read back as the admin CLI's user).
    pjs = provision.nc.jetstream()
    for bucket in ("auth_users", "articles"):
        with pytest.raises(KeyNotFoundError):
            await (await pjs.key_value(bucket)).get("intruder")
    with pytest.raises(NotFoundError):
        await pjs.stream_info("rogue")
    assert (await pjs.stream_info("chat")).config.name == "chat"
    for client in (gateway, api, provision):
        await client.nc.close()

    async with aiohttp.ClientSession(base_url=stack.url) as http:
        await serving.test_make_start_serves_everything_through_nginx_and_make_stop_leaves_nothing(
            stack, http
        )


async def test_the_service_user_answers_commands_through_the_stack_and_is_no_api(
    stack: Stack, as_role: Callable[[Role], Awaitable[Client]]
) -> None:
    """examples/command_service.py as docs/guide.md runs it beside `make start`: as the NATS
    user `service` with its password from the dev credentials file. A vote through nginx is
    answered by it and its tally reaches a browser's `sub`. As that user: subscribing to an
    auth bucket or to every inbox, publishing a command, reading auth_credentials through
    the JetStream API and creating a consumer are refused; a KV read of `articles` works."""
    env = clean_env(
        NATS_URL=",".join(stack.settings.nats_url),
        NATS_USER="service",
        NATS_PASSWORD=natsio.ensure_dev_credentials(stack.settings)["service"],
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE), env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"ready\n"
        async with aiohttp.ClientSession(base_url=stack.url) as http:
            token, _ = await login(http, "admin")  # commands and subjects: all
            async with await GatewayClient.connect(
                stack.ws_url, token=token, open_timeout=10
            ) as browser:
                lunch = await browser.sub("polls.lunch")
                async with http.post(
                    "/api/commands/polls.vote",
                    json={"poll": "lunch", "choice": "pizza"},
                    headers={"Authorization": f"Bearer {token}"},
                ) as resp:
                    assert resp.status == 200, await resp.text()
                    tally = {"poll": "lunch", "counts": {"pizza": 1}}
                    assert await resp.json() == {**tally, "yours": "pizza"}
                live = await lunch.get()
                assert (live["op"], live["target"]) == ("sub_msg", "polls.lunch")
                assert live["data"]["payload"] == tally
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.communicate()

    service = await as_role("service")
    err = await service.violation(lambda nc: nc.subscribe("$KV.auth_users.>"))
    assert "subscription" in err.lower() and "$kv.auth_users.>" in err.lower()
    await service.violation(lambda nc: nc.subscribe("_INBOX.>"))
    err = await service.violation(lambda nc: nc.publish("cmd.x", b"{}", headers={"User-Id": "u"}))
    assert "publish" in err.lower() and '"cmd.x"' in err.lower()
    await service.violation(lambda nc: nc.publish("$KV.auth_users.intruder", b"{}"))
    await service.violation(
        lambda nc: nc.publish(
            "$JS.API.DIRECT.GET.KV_auth_credentials",
            b'{"last_by_subj": "$KV.auth_credentials.admin"}',
            reply=nc.new_inbox(),
        )
    )
    await service.violation(
        lambda nc: nc.publish(
            "$JS.API.CONSUMER.CREATE.chat",
            b'{"stream_name": "chat", "config": {"deliver_subject": "cmd.x"}}',
            reply=nc.new_inbox(),
        )
    )
    # Its own requests come back on its inboxes: an application bucket reads.
    articles = await service.nc.jetstream().key_value("articles")
    with pytest.raises(KeyNotFoundError):
        await articles.get("no-such-article")
    assert service.errors.empty()
