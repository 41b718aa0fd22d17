"""User records in KV `auth_users` (key = user id), read by both processes."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

import msgspec

from shared.capabilities import Capabilities, CompiledCapabilities

log = logging.getLogger("shared.users")

USERS_BUCKET = "auth_users"
CREDENTIALS_BUCKET = "auth_credentials"  # key = username → Credential; never exposed
REVOKED_BUCKET = "auth_revoked"  # key = token jti → expiry; never exposed
ROLES_BUCKET = "auth_roles"  # key = role name → Capabilities (a template with `{uid}`)
ROLE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
# The auth_revoked key of a user's "every token issued before T is revoked" mark. Token
# ids (secrets.token_urlsafe) never contain a dot, so it cannot collide with one.
USER_MARK = "user."
USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}\Z")
# One NATS token and one KV key token, without `_`: the gateway names a durable consumer
# `u_<uid>_<name>` and names may contain `_`, so a uid with one (`u1_x` + `d` against `u1` +
# `x_d`) would share a durable with another user. Generated ids (`u` + 16 hex) never have it.
USER_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}\Z")


class UserRecord(msgspec.Struct, omit_defaults=False):
    id: str
    username: str
    display_name: str = ""
    disabled: bool = False
    capabilities: Capabilities = msgspec.field(default_factory=Capabilities)
    # Named capability templates the user holds, and their union as it stood when last
    # written (http_api/roles.py rewrites it on every holder when a role changes, so the
    # gateways' auth_users watch applies a role change like any capability change).
    roles: list[str] = msgspec.field(default_factory=list)
    role_capabilities: Capabilities = msgspec.field(default_factory=Capabilities)


class Credential(msgspec.Struct):
    user_id: str
    hash: str  # argon2id


_user_decoder = msgspec.json.Decoder(UserRecord)


def decode_user(data: bytes) -> UserRecord:
    return _user_decoder.decode(data)


def encode_user(user: UserRecord) -> bytes:
    return msgspec.json.encode(user)


def union(docs: Iterable[Capabilities]) -> Capabilities:
    """Everything any of `docs` allows (patterns in order, without repeats)."""
    out = Capabilities(subjects=[], buckets={}, streams={}, commands=[])
    for d in docs:
        out.subjects.extend(p for p in d.subjects if p not in out.subjects)
        out.commands.extend(p for p in d.commands if p not in out.commands)
        for mine, theirs in ((out.buckets, d.buckets), (out.streams, d.streams)):
            for name, patterns in theirs.items():
                have = mine.setdefault(name, [])
                have.extend(p for p in patterns if p not in have)
    return out


def with_roles(
    user: UserRecord, names: Iterable[str], templates: Mapping[str, Capabilities]
) -> UserRecord:
    """The record holding `names`, its role_capabilities their current union (a role that
    no longer exists grants nothing)."""
    held = sorted(set(names))
    caps = union(templates[n] for n in held if n in templates)
    return msgspec.structs.replace(user, roles=held, role_capabilities=caps)


def effective(user: UserRecord) -> Capabilities:
    """The user's own capabilities and its roles' (templates: `{uid}` not yet rendered)."""
    return union([user.capabilities, user.role_capabilities]) if user.roles else user.capabilities


def compile_or_nothing(user: UserRecord) -> CompiledCapabilities:
    """The user's compiled capabilities (its own and its roles'); none at all (fail
    closed) if the stored document is invalid. The gateway and the API both use this:
    they must agree."""
    try:
        return CompiledCapabilities(effective(user), user.id)
    except ValueError:
        log.warning("invalid capabilities in auth_users; granting none", extra={"user": user.id})
        return CompiledCapabilities(Capabilities(), user.id)
