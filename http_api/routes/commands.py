"""`POST /api/commands/{command}`: built-in handlers, else a NATS request on `cmd.<command>`.

Allowed when the caller's `commands` capability covers the name. Built-ins:
- `chat.send` {room, text}: JetStream publish on `chat.room.<room>` (stream `chat`) of a
  ChatMessage; `Idempotency-Key` becomes `Nats-Msg-Id` (`<uid>:<key>`), so a retry within the
  stream's duplicate window is stored once and answered `duplicate: true`.
- `todos.put` {id, title, done} / `todos.delete` {id}: KV `todos`, key `user.<uid>.<id>`.
Anything else is forwarded to whatever service answers `cmd.<command>`: the request body as
is, the caller in headers `User-Id` and `Username`. The reply body is the response (JSON when
it parses, else octet-stream; an `Idempotency-Key` is passed on; an answered command is
audited as `audit.commands.<command>`); a reply with header `Nats-Service-Error-Code` (the NATS
micro-services convention) becomes a problem with that status. No responders → 404,
no reply within `settings.command_timeout` → 504.
"""

from __future__ import annotations

import logging
import re
import secrets

import msgspec
from aiohttp import web
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import PubAck

from http_api.authz import require_command
from http_api.bodies import decode, json_response, read_json
from http_api.events import now
from http_api.problems import Problem
from http_api.schemas import (
    AnyJson,
    ChatMessage,
    ChatSend,
    ChatSent,
    Deleted,
    Todo,
    TodoDelete,
    TodoPut,
    TodoWritten,
)
from http_api.state import EVENTS, JS, NC, SETTINGS, STORE, Principal, QueryParam, Route, principal
from http_api.store import Exists, todo_key
from shared.subjects import MAX_SUBJECT_LENGTH, SUBJECT_REGEX

log = logging.getLogger("http_api.commands")
MAX_IDEMPOTENCY_KEY = 128
# Printable ASCII, no space at either end (HTTP trims it, so the key would change in transit):
# the OpenAPI document states this very pattern.
IDEMPOTENCY_KEY_PATTERN = rf"^[!-~](?:[ -~]{{0,{MAX_IDEMPOTENCY_KEY - 2}}}[!-~])?(?!\n)$"
_IDEMPOTENCY_KEY_RE = re.compile(IDEMPOTENCY_KEY_PATTERN)


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise Problem(400, f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII")
    return key


async def chat_send(request: web.Request, p: Principal) -> web.StreamResponse:
    body = await read_json(request, ChatSend)
    key = idempotency_key(request)
    msg = ChatMessage(body.room, body.text, p.user.id, p.name, now())
    # Without a key of the client's, one of ours: our own retries through a NATS failover
    # are then stored once too.
    msg_id = f"{p.user.id}:{key}" if key else f"{p.user.id}:~{secrets.token_urlsafe(12)}"
    payload, tries = msgspec.json.encode(msg), 0

    async def publish() -> PubAck:
        nonlocal tries
        tries += 1
        return await request.app[JS].publish(
            f"chat.room.{body.room}", payload, stream="chat", headers={"Nats-Msg-Id": msg_id}
        )

    ack = await request.app[STORE].ride("command", publish)
    # A duplicate on a later try is our own earlier try, whose ack was lost.
    duplicate = bool(ack.duplicate) and tries == 1
    if not duplicate:
        await request.app[EVENTS].audit(p.actor, "chat", "send", body.room, revision=ack.seq)
    return json_response(ChatSent(ack.stream, ack.seq, duplicate))


async def todos_put(request: web.Request, p: Principal) -> web.StreamResponse:
    body = await read_json(request, TodoPut)
    key = todo_key(p.user.id, body.id)
    todo = Todo(body.id, body.title, body.done, now())
    todos = request.app[STORE].todos
    try:
        revision, action = await todos.create(key, todo), "created"
    except Exists:
        revision, action = await todos.put(key, todo), "updated"
    await request.app[EVENTS].write(
        p.actor, "todos", f"{p.user.id}.{body.id}", action, todo, revision=revision
    )
    return json_response(TodoWritten(key, revision))


async def todos_delete(request: web.Request, p: Principal) -> web.StreamResponse:
    body = await read_json(request, TodoDelete)
    key = todo_key(p.user.id, body.id)
    todos = request.app[STORE].todos
    if await todos.get(key) is None:
        raise Problem(404, "no such todo")
    revision = await todos.delete(key)
    await request.app[EVENTS].write(
        p.actor,
        "todos",
        f"{p.user.id}.{body.id}",
        "deleted",
        Deleted(body.id, revision),
        revision=revision,
    )
    return json_response(TodoWritten(key, revision))


BUILTINS = {"chat.send": chat_send, "todos.put": todos_put, "todos.delete": todos_delete}


async def forward(request: web.Request, p: Principal, command: str) -> web.StreamResponse:
    payload = await request.read()
    if payload:
        decode(payload, AnyJson)  # 400 on malformed JSON, before anything leaves
    settings = request.app[SETTINGS]
    headers = {"User-Id": p.user.id, "Username": p.user.username}
    if (key := idempotency_key(request)) is not None:
        headers["Idempotency-Key"] = key  # the service may dedupe retries with it
    try:
        reply = await request.app[NC].request(
            f"cmd.{command}", payload, timeout=settings.command_timeout, headers=headers
        )
    except NoRespondersError:
        raise Problem(404, f"no service handles command {command!r}") from None
    except NatsTimeoutError:
        raise Problem(504, f"command {command!r} got no reply in time") from None
    code = (reply.headers or {}).get("Nats-Service-Error-Code")
    if code is not None:
        status = int(code) if code.isdigit() and 400 <= int(code) <= 599 else 502
        detail = (reply.headers or {}).get("Nats-Service-Error", "command failed")
        raise Problem(status, detail[:500])
    await request.app[EVENTS].audit(p.actor, "commands", command, command)
    try:
        msgspec.json.decode(reply.data)
        content_type = "application/json"
    except msgspec.DecodeError:
        content_type = "application/octet-stream"
    return web.Response(body=reply.data, content_type=content_type)


async def run_command(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    command = request.match_info["command"]
    require_command(p, command)
    builtin = BUILTINS.get(command)
    response = await builtin(request, p) if builtin else await forward(request, p, command)
    log.info("command", extra={"event": "command", "command": command, "user": p.user.id})
    return response


ROUTES = [
    Route(
        "POST",
        "/api/commands/{command}",
        run_command,
        "Run a command: chat.send (ChatSend → ChatSent), todos.put (TodoPut → TodoWritten), "
        "todos.delete (TodoDelete → TodoWritten), or any other name forwarded to "
        "cmd.<command>",
        "commands",
        body=AnyJson,
        response=AnyJson,
        extra={
            # a command name is a literal subject: `cmd.<command>` is where it is sent
            "path": {"command": {"pattern": SUBJECT_REGEX, "maxLength": MAX_SUBJECT_LENGTH}},
            "body_variants": (ChatSend, TodoPut, TodoDelete),
            "response_variants": (ChatSent, TodoWritten),
        },
        headers=(
            QueryParam(
                "Idempotency-Key",
                "chat.send: a retry with the same key is stored once (becomes Nats-Msg-Id)",
                schema={"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
            ),
        ),
        errors=(400, 401, 403, 404, 413, 422, 504),
    ),
]
