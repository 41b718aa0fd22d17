"""Roles (http_api/roles.py): list them, create or change one (every holder follows live),
and set which roles a user holds. All need the command `users.manage`."""

from __future__ import annotations

import logging
from typing import Annotated

from aiohttp import web
from msgspec import Meta, Struct

from http_api import roles
from http_api.authz import USERS_MANAGE, require_command
from http_api.bodies import json_response, read_json
from http_api.problems import Problem
from http_api.routes.users import check_capabilities
from http_api.schemas import UserOut
from http_api.state import STORE, Route, principal
from http_api.store import Conflict
from shared.capabilities import Capabilities
from shared.users import ROLE_NAME_RE, USER_ID_RE, with_roles

log = logging.getLogger("http_api.roles")
ROLE_PATTERN = ROLE_NAME_RE.pattern.removesuffix("\\Z") + r"(?!\n)$"
RoleName = Annotated[str, Meta(pattern=ROLE_PATTERN, description="letters, digits, '_' or '-'")]
_ATTEMPTS = 5


class RoleOut(Struct):
    name: str
    capabilities: Capabilities
    holders_updated: Annotated[
        int, Meta(description="holders whose records were rewritten by this change")
    ] = 0


class RoleList(Struct):
    items: list[RoleOut]


class UserRoles(Struct, forbid_unknown_fields=True):
    roles: Annotated[list[RoleName], Meta(max_length=32)]


def _role_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not ROLE_NAME_RE.fullmatch(name):
        raise Problem(404, "no such role")
    return name


async def list_roles(request: web.Request) -> web.StreamResponse:
    require_command(principal(request), USERS_MANAGE)
    found = await roles.templates(request.app[STORE])
    return json_response(RoleList([RoleOut(n, c) for n, c in sorted(found.items())]))


async def put_role(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    require_command(p, USERS_MANAGE)
    name = _role_name(request)
    caps = await read_json(request, Capabilities)
    check_capabilities(caps)
    changed = await roles.put_role(request.app[STORE], name, caps)
    log.info(
        "role written",
        extra={"event": "role_written", "role": name, "by": p.user.id, "holders": len(changed)},
    )
    return json_response(RoleOut(name, caps, len(changed)))


async def set_user_roles(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    require_command(p, USERS_MANAGE)
    uid = request.match_info["id"]
    if not USER_ID_RE.fullmatch(uid):
        raise Problem(404, "no such user")
    body = await read_json(request, UserRoles)
    store = request.app[STORE]
    for _ in range(_ATTEMPTS):
        found = await store.users.get(uid)
        if found is None:
            raise Problem(404, "no such user")
        # After the record (roles.refresh_holders says why): a role changed later either
        # conflicts with this write or sees it.
        templates = await roles.templates(store)
        missing = sorted(set(body.roles) - set(templates))
        if missing:
            raise Problem(404, f"no such role: {', '.join(missing)}")
        user = with_roles(found.value, body.roles, templates)
        try:
            revision = await store.users.update(uid, user, last=found.revision)
        except Conflict:
            continue  # changed meanwhile: apply to the newer record
        log.info(
            "user roles set",
            extra={"event": "user_roles", "user": uid, "roles": user.roles, "by": p.user.id},
        )
        return json_response(UserOut.of(user, revision))
    raise Problem(409, "the user changed too often meanwhile; retry")


ROUTES = [
    Route(
        "GET",
        "/api/roles",
        list_roles,
        "Every role: a named capability template",
        "users",
        response=RoleList,
        errors=(401, 403),
    ),
    Route(
        "PUT",
        "/api/roles/{name}",
        put_role,
        "Create or change a role; every holder's open sockets get the change (cap_update)",
        "users",
        body=Capabilities,
        response=RoleOut,
        errors=(400, 401, 403, 404, 413, 422, 429),
    ),
    Route(
        "PUT",
        "/api/users/{id}/roles",
        set_user_roles,
        "Set the roles a user holds (their capabilities add to the user's own)",
        "users",
        body=UserRoles,
        response=UserOut,
        errors=(400, 401, 403, 404, 409, 413, 422, 429),
    ),
]
