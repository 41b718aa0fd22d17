"""User ids: one NATS token, no `_` (the gateway's durable names are `u_<uid>_<name>`)."""

from __future__ import annotations

from http_api.routes.users import new_user_id
from shared.users import USER_ID_RE


def test_ids_that_would_make_durable_names_ambiguous_are_invalid() -> None:
    """uid `u1` + durable `x_d` and uid `u1_x` + durable `d` would both be `u_u1_x_d`."""
    assert USER_ID_RE.fullmatch("u1") and USER_ID_RE.fullmatch("ext-42")
    assert all(USER_ID_RE.fullmatch(new_user_id()) for _ in range(100))  # `u` + 16 hex
    for bad in ("u1_x", "_", "a_b", "", "a.b", "a*", "a>", "a b", "x" * 65, "u1\n"):
        assert not USER_ID_RE.fullmatch(bad), bad
