"""Roles: named capability templates (`{uid}` = each holder's id) in KV `auth_roles`.

A user's record lists its roles and carries their union as `role_capabilities`. Changing
a role (or a user's roles) rewrites that union on every holder's record: the gateways'
auth_users watch then applies it to open sockets like any capability change (cap_update),
with nothing of the gateway involved. A crash half way leaves some holders on the old
role until the next change or `provision`, which rewrites every holder that differs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from http_api.store import Conflict, Exists, Store, Versioned
from shared.capabilities import Capabilities
from shared.users import UserRecord, with_roles

log = logging.getLogger("http_api.roles")
UPDATE_ATTEMPTS = 5  # per holder, against concurrent writers of the same record


async def templates(store: Store) -> dict[str, Capabilities]:
    return {name: v.value for name, v in await store.roles.list()}


async def refresh_holders(store: Store, only: set[str] | None = None) -> list[str]:
    """Rewrite every holder (of a role in `only`, or of any) whose role_capabilities
    differ from its roles' current union; the ids rewritten."""
    # Roles are read after the records (and again after a conflict): a role change that
    # lands later has its own pass, which then sees what this one wrote, or conflicts
    # with it. Read before, a stale template could be written over a fresh record.
    holders = await store.users.list()
    roles = await templates(store)
    changed: list[str] = []
    for uid, found in holders:
        if not found.value.roles or (only is not None and not only & set(found.value.roles)):
            continue
        for _ in range(UPDATE_ATTEMPTS):
            fresh = with_roles(found.value, found.value.roles, roles)
            if fresh == found.value:
                break
            try:
                await store.users.update(uid, fresh, last=found.revision)
                changed.append(uid)
                break
            except Conflict:
                again = await store.users.get(uid)
                if again is None:
                    break
                found = again
                roles = await templates(store)
    if changed:
        log.info("role holders updated", extra={"event": "roles_applied", "users": len(changed)})
    return changed


async def put_role(store: Store, name: str, caps: Capabilities) -> list[str]:
    """Create or change a role; every holder's record follows. The holders rewritten."""
    await store.roles.put(name, caps)
    return await refresh_holders(store, {name})


async def sync(store: Store, declared: Mapping[str, Capabilities]) -> list[str]:
    """Bring auth_roles to the resources file's roles (roles made through the API and not
    declared are kept) and every holder to them. The roles written."""
    have = await templates(store)
    written = [name for name, caps in declared.items() if have.get(name) != caps]
    for name in written:
        await store.roles.put(name, declared[name])
    await refresh_holders(store)
    return written


async def user_from_role(store: Store, uid: str, role: str) -> Versioned[UserRecord] | None:
    """The record of an external issuer's user seen for the first time, created holding
    `role` (the issuer's default_role); None if the role does not exist. Two requests at
    once create it once: the loser reads the winner's record."""
    found = await store.roles.get(role)
    if found is None:
        log.warning("default role missing", extra={"event": "role_missing", "role": role})
        return None
    user = with_roles(
        UserRecord(id=uid, username=uid, display_name=uid), [role], {role: found.value}
    )
    try:
        revision = await store.users.create(uid, user)
    except Exists:
        return await store.users.get(uid)
    log.info("user created from role", extra={"event": "user_from_role", "user": uid, "role": role})
    again = await store.roles.get(role)
    if again is None or again.value != found.value:
        # The role changed while the record was made: a change whose pass listed the
        # users before this one existed would never reach it.
        await refresh_holders(store, {role})
        return await store.users.get(uid)
    return Versioned(user, revision)
