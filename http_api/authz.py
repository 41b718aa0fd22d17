"""Authorisation of one request with the caller's compiled capabilities.

The same `CompiledCapabilities` checks the gateway makes: commands for writes, KV bucket
patterns for reads, each decided by `is_subset`, never by a plain match.
"""

from __future__ import annotations

from http_api.problems import Problem
from http_api.state import Principal
from shared.capabilities import Decision

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
