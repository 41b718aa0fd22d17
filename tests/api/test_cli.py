"""`python -m http_api`: admin subcommands and serving, as real processes.

The server test sends SIGTERM while a request is in flight (held by a real NATS responder)
and checks that the request still completes and the process exits cleanly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from argon2 import PasswordHasher
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from http_api import admin
from http_api.passwords import Passwords
from http_api.store import Store
from shared.auth import TokenIssuer, TokenVerifier
from shared.capabilities import Capabilities
from shared.settings import Settings
from tests.api.conftest import CHEAP_HASHER
from tests.natsd import free_port

ROOT = Path(__file__).resolve().parents[2]


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Only what the process needs: never the developer's own settings."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "NATS_URL": ",".join(settings.nats_url),
        "VAR_DIR": settings.var_dir,
        "DEMO_PASSWORD": "demo-pw",
        "LOG_FORMAT": "json",
        **extra,
    }
    return env


async def run_cli(
    settings: Settings, *args: str, stdin: bytes = b"", **env: str
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "http_api",
        *args,
        cwd=ROOT,
        env=cli_env(settings, **env),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("command", [[], ["provision"], ["create-user"], ["seed-demo"], ["token"]])
def test_every_command_has_help(command: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "http_api", *command, "--help"],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert b"usage: python -m http_api" in proc.stdout


async def test_provision_seed_demo_and_create_user(
    settings: Settings, nc: NATS, js: JetStreamContext
) -> None:
    code, out, _ = await run_cli(settings, "provision")
    # The buckets and streams exist (the fixture provisioned them); the file's roles not yet.
    assert (code, out.splitlines()) == (
        0,
        ["updated role member", "updated role reader", "provisioned"],
    )
    code, out, _ = await run_cli(settings, "provision")
    assert (code, out.strip()) == (0, "provisioned")  # idempotent: nothing to do
    code, out, err = await run_cli(settings, "seed-demo")
    assert code == 0, err
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["created", "admin"],
        ["created", "alice"],
        ["created", "bob"],
    ]
    code, again, _ = await run_cli(settings, "seed-demo")  # idempotent: same users, same ids
    assert code == 0
    assert again == out.replace("created", "updated")
    users = await js.key_value("auth_users")
    assert len(await users.keys()) == 3
    creds = await js.key_value("auth_credentials")
    cred = msgspec.json.decode((await creds.get("alice")).value or b"")
    assert PasswordHasher().verify(cred["hash"], "demo-pw")

    caps = '{"subjects": ["chat.room.*"], "commands": ["chat.send"]}'
    code, out, err = await run_cli(
        settings,
        "create-user",
        "--username",
        "carol",
        "--password",
        "-",
        "--capabilities",
        caps,
        stdin=b"carol-pw\n",
    )
    assert code == 0, err
    carol: dict[str, Any] = json.loads(out)
    assert carol["username"] == "carol" and carol["capabilities"]["commands"] == ["chat.send"]
    record = msgspec.json.decode((await users.get(carol["id"])).value or b"")
    assert record == carol
    code, _, err = await run_cli(settings, "create-user", "--username", "carol", "--password", "x")
    assert code == 1 and "taken" in err
    code, _, err = await run_cli(
        settings,
        "create-user",
        "--username",
        "dan",
        "--password",
        "x",
        "--capabilities",
        '{"subjects": ["a.>.b"]}',
    )
    assert code == 1 and "a.>.b" in err


async def test_token_prints_a_short_lived_token_for_an_existing_user(
    settings: Settings, nc: NATS, js: JetStreamContext
) -> None:
    """`python -m http_api token`: a token our verifier accepts for that user, expiring
    when asked; an unknown user or a ttl beyond TOKEN_TTL is refused (exit 1)."""
    assert (await run_cli(settings, "seed-demo"))[0] == 0
    store = Store(js)
    await store.open()
    found = await store.find_user_by_name("alice")
    assert found is not None
    alice = found.value
    code, out, err = await run_cli(settings, "token", "--user", alice.id, "--ttl", "60")
    assert code == 0, err
    claims = TokenVerifier.from_settings(settings).verify(out.strip())
    assert (claims.sub, claims.exp - claims.iat) == (alice.id, 60)
    code, _, err = await run_cli(settings, "token", "--user", "nobody")
    assert code == 1 and "no user" in err
    code, _, err = await run_cli(settings, "token", "--user", alice.id, "--ttl", "999999")
    assert code == 1 and "TOKEN_TTL" in err


async def test_seed_demo_refuses_in_production(settings: Settings, nc: NATS) -> None:
    code, _, err = await run_cli(settings, "seed-demo", APP_ENV="production")
    assert code == 1 and "production" in err


async def _next_event(stream: asyncio.StreamReader, event: str) -> dict[str, Any]:
    while True:
        line = await asyncio.wait_for(stream.readline(), 30)
        assert line, f"process ended before logging {event!r}"
        try:
            record: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == event:
            return record


async def test_sigterm_finishes_in_flight_requests(
    settings: Settings, nc: NATS, js: JetStreamContext
) -> None:
    """SIGTERM mid-request: the request still gets its 200, then the process exits 0."""
    store = Store(js)
    await store.open()
    user = await admin.create_user(
        store,
        Passwords(CHEAP_HASHER, 1),
        "ops",
        "ops-password",
        capabilities=Capabilities(commands=["slow"]),
    )
    token, _ = TokenIssuer.from_settings(settings).issue(user.id)

    received, release = asyncio.Event(), asyncio.Event()

    async def responder(msg: Msg) -> None:
        received.set()
        await release.wait()
        await msg.respond(b'{"done": true}')

    sub = await nc.subscribe("cmd.slow", cb=responder)
    await nc.flush()
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "http_api",
        "--port",
        str(port),
        cwd=ROOT,
        env=cli_env(settings, COMMAND_TIMEOUT="30"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        await _next_event(proc.stderr, "listening")
        async with aiohttp.ClientSession() as http:
            request = asyncio.create_task(
                http.post(
                    f"http://127.0.0.1:{port}/api/commands/slow",
                    json={},
                    headers={"Authorization": f"Bearer {token}"},
                )
            )
            await asyncio.wait_for(received.wait(), 30)
            proc.send_signal(signal.SIGTERM)
            await _next_event(proc.stderr, "draining")
            release.set()
            async with await request as resp:
                assert resp.status == 200
                assert await resp.json() == {"done": True}
        await _next_event(proc.stderr, "stopped")
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await sub.unsubscribe()
