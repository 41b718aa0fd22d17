"""Users: CRUD gated by the command capability `users.manage` (a user may GET itself).

Ids are generated (`u` + 16 hex) unless the creator gives one (an import); either way they
match `shared.users.USER_ID_RE`, which has no `_` (400 otherwise).

PUT replaces only the fields it carries. Capability documents are validated with
`shared.capabilities` (422 naming the bad pattern). Every change lands in KV `auth_users`,
which every gateway watches: capability changes take effect live on open sockets.
"""

from __future__ import annotations

import logging
import secrets

import msgspec
from aiohttp import web

from http_api.authz import USERS_MANAGE, check_an_admin_remains, require_command
from http_api.bodies import json_response, read_json
from http_api.problems import Problem
from http_api.schemas import (
    USER_ID_PATTERN,
    Deleted,
    Explain,
    UserCreate,
    UserList,
    UserOut,
    UserUpdate,
)
from http_api.state import EVENTS, PASSWORDS, STORE, VERIFIER, QueryParam, Route, principal
from http_api.store import Conflict, Exists, IdTaken, Versioned
from shared.capabilities import Capabilities, CompiledCapabilities, SubscriptionRef, validate
from shared.errors import CapabilityError
from shared.users import USER_ID_RE, UserRecord, effective

log = logging.getLogger("http_api.users")
EXPLAIN_OPS = ("sub", "kv_sub", "js_sub", "cmd")
_UPDATE_ATTEMPTS = 5


def new_user_id() -> str:
    return "u" + secrets.token_hex(8)


def check_capabilities(caps: Capabilities) -> None:
    try:
        validate(caps)
    except CapabilityError as e:
        raise Problem(422, str(e), extra={"where": e.where, "pattern": e.pattern}) from None


def _user_id(request: web.Request) -> str:
    uid = request.match_info["id"]
    if not USER_ID_RE.fullmatch(uid):
        raise Problem(404, "no such user")
    return uid


async def _get(request: web.Request, uid: str) -> Versioned[UserRecord]:
    found = await request.app[STORE].users.get(uid)
    if found is None:
        raise Problem(404, "no such user")
    return found


async def _an_admin_remains(request: web.Request, uid: str, after: UserRecord | None) -> None:
    """409 before a change that would leave no enabled admin (authz.check_an_admin_remains).
    Two admins demoting each other at the same instant could still both pass: the check
    reads the list, not a lock; the CLI recovers from that."""
    rows = await request.app[STORE].users.list()
    check_an_admin_remains((v.value for _, v in rows), uid, after)


async def list_users(request: web.Request) -> web.StreamResponse:
    require_command(principal(request), USERS_MANAGE)
    rows = await request.app[STORE].users.list()
    return json_response(UserList([UserOut.of(v.value, v.revision) for _, v in rows]))


async def create_user(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    require_command(p, USERS_MANAGE)
    body = await read_json(request, UserCreate)
    uid = new_user_id() if isinstance(body.id, msgspec.UnsetType) else body.id
    if not USER_ID_RE.fullmatch(uid):
        # `_` included: the gateway's durable names `u_<uid>_<name>` must stay unambiguous.
        raise Problem(400, "id must be 1-64 letters, digits or '-'")
    check_capabilities(body.capabilities)
    user = UserRecord(
        id=uid,
        username=body.username,
        display_name=body.display_name or body.username,
        disabled=body.disabled,
        capabilities=body.capabilities,
    )
    hash = await request.app[PASSWORDS].hash(body.password)
    try:
        revision = await request.app[STORE].create_user(user, hash)
    except IdTaken:
        raise Problem(409, f"user id {uid!r} is taken") from None
    except Exists:
        raise Problem(409, f"username {body.username!r} is taken") from None
    out = UserOut.of(user, revision)
    await request.app[EVENTS].write(p.actor, "users", user.id, "created", out, revision=revision)
    log.info("user created", extra={"event": "user_created", "user": user.id, "by": p.user.id})
    return json_response(out, status=201, headers={"Location": f"/api/users/{user.id}"})


async def get_user(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    uid = _user_id(request)
    if uid != p.user.id:
        require_command(p, USERS_MANAGE)
    found = await _get(request, uid)
    return json_response(UserOut.of(found.value, found.revision))


async def update_user(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    require_command(p, USERS_MANAGE)
    uid = _user_id(request)
    body = await read_json(request, UserUpdate)
    changes: dict[str, object] = {}
    if not isinstance(body.display_name, msgspec.UnsetType):
        changes["display_name"] = body.display_name
    if not isinstance(body.capabilities, msgspec.UnsetType):
        check_capabilities(body.capabilities)
        changes["capabilities"] = body.capabilities
    if not isinstance(body.disabled, msgspec.UnsetType):
        changes["disabled"] = body.disabled
    fields = sorted(changes)
    store = request.app[STORE]
    found = await _get(request, uid)
    if not fields and isinstance(body.password, msgspec.UnsetType):
        # A PUT that carries no field replaces nothing: the user as it is, nothing written.
        return json_response(UserOut.of(found.value, found.revision))
    if "disabled" in changes or "capabilities" in changes:
        await _an_admin_remains(request, uid, msgspec.structs.replace(found.value, **changes))
    if not isinstance(body.password, msgspec.UnsetType):
        fields = sorted([*fields, "password"])
        await store.set_password(found.value, await request.app[PASSWORDS].hash(body.password))
    # Read, change, write with the revision read: a concurrent change makes us re-read.
    for _ in range(_UPDATE_ATTEMPTS):
        user = msgspec.structs.replace(found.value, **changes)
        try:
            revision = await store.users.update(uid, user, last=found.revision)
            break
        except Conflict:
            found = await _get(request, uid)
    else:
        raise Problem(409, "the user changed concurrently; retry")
    if "password" in fields or changes.get("disabled") is True:
        # Logged out everywhere: a stolen token must not outlive a password change, and a
        # disabled user keeps nothing. (Capability changes need no revocation: gateways
        # apply them live, the API reads them on every request.)
        await store.revoke_all(uid)
    out = UserOut.of(user, revision)
    await request.app[EVENTS].write(
        p.actor, "users", uid, "updated", out, revision=revision, fields=fields
    )
    log.info(
        "user updated",
        extra={"event": "user_updated", "user": uid, "by": p.user.id, "fields": fields},
    )
    return json_response(out)


async def delete_user(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    require_command(p, USERS_MANAGE)
    uid = _user_id(request)
    found = await _get(request, uid)
    await _an_admin_remains(request, uid, None)
    for issuer in request.app[VERIFIER].by_name.values():
        if issuer.config.default_role and uid.startswith(issuer.config.user_prefix):
            # Its next token would make it again from the default role: deleting would
            # not keep it out, disabling does.
            raise Problem(
                409, "a user of an issuer with a default role comes back: disable it instead"
            )
    revision = await request.app[STORE].delete_user(found.value)
    out = Deleted(uid, revision)
    await request.app[EVENTS].write(p.actor, "users", uid, "deleted", out, revision=revision)
    log.info("user deleted", extra={"event": "user_deleted", "user": uid, "by": p.user.id})
    return json_response(out)


async def explain(request: web.Request) -> web.StreamResponse:
    """Would this user's request be allowed, and which capability pattern decides it?"""
    require_command(principal(request), USERS_MANAGE)
    uid = _user_id(request)
    q = request.query
    op, target = q.get("op", ""), q.get("target", "")
    if op not in EXPLAIN_OPS:
        raise Problem(400, f"op must be one of {', '.join(EXPLAIN_OPS)}")
    if not target:
        raise Problem(400, "target is required")
    # sub and cmd name their pattern in `target`; kv_sub and js_sub default to everything.
    pattern = q.get("pattern") or (target if op in ("sub", "cmd") else ">")
    user = (await _get(request, uid)).value
    try:
        caps = CompiledCapabilities(effective(user), user.id)
        decision = caps.allows(SubscriptionRef("explain", op, target, pattern))
    except ValueError as e:
        # The question is well formed (the document's rules hold); the answer is no: the
        # gateway refuses such a request too, whatever the capabilities.
        return json_response(Explain(False, None, f"invalid target or pattern: {e}"))
    return json_response(Explain(decision.allowed, decision.rule, decision.reason))


_ID_PATH = {"id": {"pattern": USER_ID_PATTERN}}

ROUTES = [
    Route(
        "GET",
        "/api/users",
        list_users,
        "List users (users.manage)",
        "users",
        response=UserList,
        errors=(401, 403),
    ),
    Route(
        "POST",
        "/api/users",
        create_user,
        "Create a user (users.manage)",
        "users",
        body=UserCreate,
        response=UserOut,
        status=201,
        errors=(400, 401, 403, 409, 413, 422),
    ),
    Route(
        "GET",
        "/api/users/{id}",
        get_user,
        "Read a user (users.manage, or oneself)",
        "users",
        extra={"path": _ID_PATH},
        response=UserOut,
        errors=(401, 403, 404),
    ),
    Route(
        "PUT",
        "/api/users/{id}",
        update_user,
        "Replace the fields given (users.manage); capabilities apply live",
        "users",
        body=UserUpdate,
        extra={"path": _ID_PATH},
        response=UserOut,
        errors=(400, 401, 403, 404, 409, 413, 422),
    ),
    Route(
        "DELETE",
        "/api/users/{id}",
        delete_user,
        "Delete a user and its credentials (users.manage)",
        "users",
        extra={"path": _ID_PATH},
        response=Deleted,
        errors=(401, 403, 404, 409),
    ),
    Route(
        "GET",
        "/api/users/{id}/explain",
        explain,
        "Would the user be allowed this request, and by which rule (users.manage)",
        "users",
        extra={"path": _ID_PATH},
        response=Explain,
        errors=(400, 401, 403, 404),
        query=(
            QueryParam("op", "the operation", required=True, enum=EXPLAIN_OPS),
            QueryParam(
                "target",
                "subject (sub), bucket (kv_sub), stream (js_sub) or command name (cmd); "
                "one that is not valid for `op` is answered allowed: false",
                required=True,
                schema={"type": "string", "minLength": 1},
            ),
            QueryParam("pattern", "key pattern (kv_sub) or filter (js_sub); default '>'"),
        ),
    ),
]
