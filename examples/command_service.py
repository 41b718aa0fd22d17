"""A command service for natsgate: live polls (docs/guide.md, "A command service").

    NATS_URL=nats://127.0.0.1:4222 .venv/bin/python examples/command_service.py

Against `make start`/`make run`, as the NATS user `service` (the one user that may answer
commands), with its password from var/nats/credentials.json (dev) or NATS_SERVICE_PASSWORD:

    export NATS_USER=service NATS_PASSWORD="$(.venv/bin/python -c \
        'import json; print(json.load(open("var/nats/credentials.json"))["service"])')"
    .venv/bin/python examples/command_service.py

Browsers call it through the API, which forwards `POST /api/commands/<name>` as a NATS
request on `cmd.<name>` (http_api/routes/commands.py):

    POST /api/commands/polls.vote     {"poll": "lunch", "choice": "pizza"}
      → {"poll": "lunch", "counts": {"pizza": 1}, "yours": "pizza"}
    POST /api/commands/polls.results  {"poll": "lunch"}
      → {"poll": "lunch", "counts": {"pizza": 1}}

and see every vote live on the core subject `polls.<poll>` (`{"poll", "counts"}`), the
gateway delivering it to every socket whose `subjects` capability covers it. A user needs
`{"commands": ["polls.vote", "polls.results"], "subjects": ["polls.*"]}`.

What the API sends: the request body as is (JSON, already checked to parse), the caller in
the headers `User-Id` and `Username` (set by the API, never by the browser), and
`Idempotency-Key` when the client gave one. What it expects back: a reply, JSON or not,
within COMMAND_TIMEOUT (5 s); a refusal is a reply with the header
`Nats-Service-Error-Code` (an HTTP status, 400-599) and `Nats-Service-Error` (the detail).

Votes are kept in memory, so run one instance (its queue group already lets more share the
load once the state lives in NATS, e.g. a KV bucket). Plain nats-py, no natsgate imports:
copy it into your own backend. Prints "ready" once subscribed; SIGTERM or SIGINT drain it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

SUBJECT = "cmd.polls.*"  # one subscription for every command of the service
QUEUE = "polls"  # several instances: each request goes to one of them
# The inboxes of the `service` user (deploy/render.py): the replies to its own requests
# (JetStream publishes, KV gets, once votes live in a bucket) must come where it may read.
INBOX_PREFIX = "_INBOX.service"
log = logging.getLogger("polls")
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # one subject token: a poll name is a subject part


class Refused(Exception):
    """A request the service turns down: `status` becomes the API's HTTP status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Polls:
    """poll → user id → choice: one vote per user and poll, a new vote replaces the old."""

    def __init__(self) -> None:
        self.votes: dict[str, dict[str, str]] = {}

    def vote(self, poll: str, user: str, choice: str) -> None:
        self.votes.setdefault(poll, {})[user] = choice

    def counts(self, poll: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for choice in self.votes.get(poll, {}).values():
            out[choice] = out.get(choice, 0) + 1
        return dict(sorted(out.items()))


def field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise Refused(422, f"{name!r} must be 1-64 letters, digits, '_' or '-'")
    return value


async def handle(nc: Client, polls: Polls, msg: Msg) -> dict[str, Any]:
    """The answer to one command, or Refused."""
    command = msg.subject.removeprefix("cmd.")
    user = (msg.headers or {}).get("User-Id")
    if not user:
        raise Refused(400, "no User-Id: commands come through the natsgate API")
    body = json.loads(msg.data) if msg.data else {}
    if not isinstance(body, dict):
        raise Refused(422, "the body must be a JSON object")
    poll = field(body, "poll")
    if command == "polls.vote":
        choice = field(body, "choice")
        polls.vote(poll, user, choice)
        tally = {"poll": poll, "counts": polls.counts(poll)}
        # Every browser subscribed to polls.<poll> (or polls.*) gets the new tally.
        await nc.publish(f"polls.{poll}", json.dumps(tally).encode())
        return {**tally, "yours": choice}
    if command == "polls.results":
        # Core subjects have no history: a page that opens later asks for the state.
        return {"poll": poll, "counts": polls.counts(poll)}
    raise Refused(404, f"no command {command!r} here")


def refusal(status: int, detail: str) -> dict[str, str]:
    """The reply headers the API turns into a problem of this HTTP status and detail."""
    return {"Nats-Service-Error-Code": str(status), "Nats-Service-Error": detail}


async def serve(nc: Client) -> None:
    """Answer commands until SIGTERM or SIGINT, then drain (finish what was received)."""
    polls = Polls()

    async def on_request(msg: Msg) -> None:
        body, headers = b"", None
        try:
            body = json.dumps(await handle(nc, polls, msg)).encode()
        except Refused as e:
            headers = refusal(e.status, e.detail)
        except Exception:
            log.exception("command failed: %s", msg.subject)
            headers = refusal(500, "the polls service failed")  # rather than a 504 later
        # Not msg.respond(): nats-py's copies the request's headers into the reply.
        await nc.publish(msg.reply, body, headers=headers)

    await nc.subscribe(SUBJECT, queue=QUEUE, cb=on_request)
    await nc.flush()  # the server has the subscription: requests reach us from now on
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await nc.drain()


async def main() -> None:
    servers = os.environ.get("NATS_URL", "nats://127.0.0.1:4222").split(",")
    user, password = os.environ.get("NATS_USER"), os.environ.get("NATS_PASSWORD")
    nc = await nats.connect(
        servers, name="polls-service", user=user, password=password, inbox_prefix=INBOX_PREFIX
    )
    await serve(nc)


if __name__ == "__main__":
    asyncio.run(main())
