"""Authorisation of one request with the caller's compiled capabilities.

The same `CompiledCapabilities` checks the gateway makes: commands for writes, KV bucket
patterns for reads, each decided by `is_subset`, never by a plain match.
"""

from __future__ import annotations

from collections.abc import Iterable

from http_api.problems import Problem
from http_api.state import Principal
from shared.capabilities import CompiledCapabilities, Decision
from shared.users import UserRecord

USERS_MANAGE = "users.manage"
# Update or delete any article, not only one's own (with articles.update / articles.delete).
ARTICLES_MODERATE = "articles.moderate"


def _require(decision: Decision) -> Decision:
    if not decision.allowed:
        raise Problem(403, decision.reason)
    return decision


def require_command(p: Principal, name: str) -> Decision:
    try:
        return _require(p.caps.allows_command(name))
    except ValueError as e:
        raise Problem(400, f"invalid command name: {e}") from None


def require_kv(p: Principal, bucket: str, key: str) -> Decision:
    return _require(p.caps.allows_kv(bucket, key))


def is_admin(user: UserRecord) -> bool:
    """An enabled user who may manage users: someone who can administer the stack."""
    if user.disabled:
        return False
    try:
        return CompiledCapabilities(user.capabilities, user.id).allows_command(USERS_MANAGE).allowed
    except ValueError:
        return False


def check_an_admin_remains(users: Iterable[UserRecord], uid: str, after: UserRecord | None) -> None:
    """409 when changing user `uid` into `after` (None: deleting it) would leave no enabled
    admin: nobody could administer the stack through the API any more. (The CLI stays the
    way back in: `python -m http_api create-user` with users.manage.)"""
    admins = {u.id for u in users if is_admin(u)}
    if uid not in admins or (after is not None and is_admin(after)):
        return
    if admins - {uid}:
        return
    what = "deleted" if after is None else "disabled or lose users.manage"
    raise Problem(409, f"the last enabled admin cannot be {what}: no one could manage users")
