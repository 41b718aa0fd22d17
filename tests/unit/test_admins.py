"""Who counts as an admin, and the rule that one always remains (http_api.authz)."""

from __future__ import annotations

import msgspec
import pytest

from http_api.authz import check_an_admin_remains, is_admin
from http_api.problems import Problem
from shared.capabilities import Capabilities
from shared.users import UserRecord

MANAGE = Capabilities(commands=["users.manage"])


def user(uid: str, caps: Capabilities = MANAGE, disabled: bool = False) -> UserRecord:
    return UserRecord(id=uid, username=uid, display_name=uid, disabled=disabled, capabilities=caps)


def test_an_admin_is_enabled_and_may_manage_users_by_any_pattern() -> None:
    assert is_admin(user("a"))
    assert is_admin(user("a", Capabilities(commands=["users.*"])))
    assert is_admin(user("a", Capabilities(commands=[">"])))
    assert not is_admin(user("a", disabled=True))
    assert not is_admin(user("a", Capabilities(commands=["chat.send"])))


@pytest.mark.parametrize(
    "after",
    [None, user("a", disabled=True), user("a", Capabilities(commands=["chat.send"]))],
)
def test_the_last_admin_cannot_go(after: UserRecord | None) -> None:
    users = [user("a"), user("b", Capabilities()), user("c", disabled=True)]
    with pytest.raises(Problem) as ei:
        check_an_admin_remains(users, "a", after)
    assert ei.value.status == 409


def test_any_change_that_leaves_an_admin_is_allowed() -> None:
    two = [user("a"), user("b")]
    check_an_admin_remains(two, "a", None)
    check_an_admin_remains(two, "a", user("a", disabled=True))
    one = [user("a"), user("b", Capabilities())]
    check_an_admin_remains(one, "b", None)  # not an admin: nothing to protect
    check_an_admin_remains(one, "a", msgspec.structs.replace(one[0], display_name="A"))
