"""examples/command_service.py as docs/guide.md runs it: a separate process on the same real
nats-server as the API and the gateway, called through `POST /api/commands/<name>`, its
core publishes delivered to gateway clients whose `subjects` capability covers them."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shared.capabilities import Capabilities
from shared.client import RequestError
from shared.settings import Settings
from tests.api.conftest import Api
from tests.gateway.conftest import ClientFactory

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "command_service.py"
VOTER = Capabilities(subjects=["polls.*"], commands=["polls.vote", "polls.results"])


@pytest.fixture
async def service(settings: Settings) -> AsyncIterator[asyncio.subprocess.Process]:
    """The example, started as the guide says, once it printed "ready" (subscribed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_USER", "NATS_PASSWORD")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        env={**env, "NATS_URL": settings.nats_url[0]},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line == b"ready\n", line
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()


async def command(api: Api, user: str, name: str, body: Any, status: int) -> Any:
    resp = await api.client.post(f"/api/commands/{name}", json=body, headers=api.auth(user))
    assert resp.status == status, await resp.text()
    return await resp.json()


async def test_votes_answer_over_http_and_reach_browsers_live(
    api: Api, connect: ClientFactory, service: asyncio.subprocess.Process
) -> None:
    """A vote is answered through the API and its tally arrives as sub_msg on polls.<poll>."""
    await api.add_user("voter1", VOTER)
    await api.add_user("voter2", VOTER)
    browser = await connect(api.token("voter1"))
    lunch = await browser.sub("polls.lunch")

    first = await command(api, "voter1", "polls.vote", {"poll": "lunch", "choice": "pizza"}, 200)
    assert first == {"poll": "lunch", "counts": {"pizza": 1}, "yours": "pizza"}
    await command(api, "voter2", "polls.vote", {"poll": "lunch", "choice": "sushi"}, 200)
    # One vote per user: voting again moves voter1's vote.
    await command(api, "voter1", "polls.vote", {"poll": "lunch", "choice": "sushi"}, 200)

    live = [await lunch.get() for _ in range(3)]
    assert {(m["op"], m["target"]) for m in live} == {("sub_msg", "polls.lunch")}
    assert [m["data"]["payload"]["counts"] for m in live] == [
        {"pizza": 1},
        {"pizza": 1, "sushi": 1},
        {"sushi": 2},
    ]
    results = await command(api, "voter2", "polls.results", {"poll": "lunch"}, 200)
    assert results == {"poll": "lunch", "counts": {"sushi": 2}}


async def test_refusals_capabilities_and_shutdown(
    api: Api, connect: ClientFactory, service: asyncio.subprocess.Process
) -> None:
    """Bad input → the service's 422; no capability → 403 (API) and forbidden (gateway);
    after SIGTERM the service drains and exits 0, and the command is 404."""
    await api.add_user("voter", VOTER)
    await api.add_user("outsider", Capabilities(commands=["chat.send"]))
    problem = await command(api, "voter", "polls.vote", {"poll": "lunch"}, 422)
    assert "'choice'" in problem["detail"]
    await command(api, "voter", "polls.vote", {"poll": "a.b", "choice": "x"}, 422)
    await command(api, "voter", "polls.vote", ["not", "an", "object"], 422)
    await command(api, "voter", "polls.other", {"poll": "lunch"}, 403)  # not in VOTER
    await command(api, "admin", "polls.other", {"poll": "lunch"}, 404)  # the service's own 404
    await command(api, "outsider", "polls.vote", {"poll": "lunch", "choice": "x"}, 403)

    outsider = await connect(api.token("outsider"))
    with pytest.raises(RequestError) as refused:
        await outsider.sub("polls.lunch")
    assert refused.value.code == "forbidden"

    service.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(service.wait(), 30) == 0
    problem = await command(api, "voter", "polls.vote", {"poll": "lunch", "choice": "x"}, 404)
    assert problem["detail"] == "no service handles command 'polls.vote'"
