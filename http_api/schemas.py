"""Request and response bodies of the HTTP API, as msgspec Structs.

Inputs forbid unknown fields; the OpenAPI document is generated from these types.
Stored values (`Article`, `Todo`, `ChatMessage`, `AuditRecord`) are the JSON that lands in
NATS, so WebSocket clients see exactly these shapes.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from shared.capabilities import Capabilities
from shared.users import USER_ID_RE, USERNAME_RE, UserRecord

MAX_TITLE = 200
MAX_ARTICLE_BODY_BYTES = 100 * 1024

# One NATS token that is also a valid KV key: article ids, rooms, todo item ids (user ids
# are narrower: USER_ID_RE has no `_`).
# `(?!\n)$`: a bare `$` also matches before a trailing newline (msgspec uses re.search).
TOKEN_PATTERN = r"^[A-Za-z0-9_-]{1,64}(?!\n)$"
# The document's regex dialect is ECMA-262, which has no `\Z`: the same anchor as TOKEN_PATTERN.
USER_ID_PATTERN = USER_ID_RE.pattern.removesuffix("\\Z") + r"(?!\n)$"
USERNAME_PATTERN = USERNAME_RE.pattern.removesuffix("\\Z") + r"(?!\n)$"
Token = Annotated[str, Meta(pattern=TOKEN_PATTERN, description="letters, digits, '_' or '-'")]
Username = Annotated[str, Meta(pattern=USERNAME_PATTERN, min_length=1, max_length=32)]
LoginName = Annotated[str, Meta(min_length=1, max_length=64)]
Password = Annotated[str, Meta(min_length=1, max_length=1024)]
NewPassword = Annotated[str, Meta(min_length=8, max_length=1024)]
DisplayName = Annotated[str, Meta(max_length=100)]
Title = Annotated[str, Meta(min_length=1, max_length=MAX_TITLE)]
ArticleText = Annotated[
    str, Meta(max_length=MAX_ARTICLE_BODY_BYTES, description="at most 100 KiB of UTF-8")
]


class _In(Struct, forbid_unknown_fields=True):
    pass


# ---------------------------------------------------------------- auth


class LoginIn(_In):
    username: LoginName
    password: Password


class Me(Struct):
    id: str
    username: str
    display_name: str
    capabilities: Capabilities


class LoginOut(Struct):
    token: str
    expires_at: Annotated[int, Meta(description="token expiry, Unix seconds (the JWT `exp`)")]
    user: Me


# ---------------------------------------------------------------- users


class UserCreate(_In):
    username: Username
    password: NewPassword
    display_name: DisplayName = ""
    capabilities: Capabilities = msgspec.field(default_factory=Capabilities)
    disabled: bool = False
    # USER_ID_RE's rule, stated for the document: an id the gateway could confuse with
    # another user's (`_` names durables `u_<uid>_<name>`) is refused like any bad field.
    id: (
        Annotated[
            str,
            Meta(
                pattern=USER_ID_PATTERN,
                description="keep an id given by another system (1-64 letters, digits or "
                "'-'; no '_'); default: a new one, 'u' + 16 hex",
            ),
        ]
        | UnsetType
    ) = UNSET


class UserUpdate(_In, omit_defaults=True):
    """Only the fields present are replaced; the others are kept."""

    display_name: DisplayName | UnsetType = UNSET
    password: NewPassword | UnsetType = UNSET
    capabilities: Capabilities | UnsetType = UNSET
    disabled: bool | UnsetType = UNSET


class UserOut(Struct, omit_defaults=True):  # `roles` left out when none
    id: str
    username: str
    display_name: str
    disabled: bool
    capabilities: Capabilities
    revision: Annotated[int, Meta(description="KV revision of the record in auth_users")]
    roles: Annotated[
        list[str], Meta(description="roles held (their capabilities add to these)")
    ] = []

    @classmethod
    def of(cls, user: UserRecord, revision: int) -> UserOut:
        return cls(
            user.id,
            user.username,
            user.display_name,
            user.disabled,
            user.capabilities,
            revision,
            list(user.roles),
        )


class UserList(Struct):
    items: list[UserOut]


class Explain(Struct):
    allowed: bool
    rule: str | None
    reason: str


# ---------------------------------------------------------------- articles


class ArticleIn(_In):
    title: Title
    body: ArticleText = ""


class Article(Struct):
    """The value stored in KV `articles` under key = id."""

    id: str
    title: str
    body: str
    author: str
    created_at: dt.datetime
    updated_at: dt.datetime
    # The author's display name when the article was written: readers may not be allowed to
    # read user records, and a user id means nothing to them (older records have none).
    author_name: str = ""


class ArticleOut(Article, kw_only=True):
    revision: int


class ArticleList(Struct):
    items: list[ArticleOut]
    next_cursor: Annotated[
        str | None,
        Meta(description="pass as `cursor` for the next page; null on the last page"),
    ] = None


class Deleted(Struct):
    id: str
    revision: Annotated[int, Meta(description="KV revision of the delete marker")]


# ---------------------------------------------------------------- commands


class ChatSend(_In):
    room: Token
    text: Annotated[str, Meta(min_length=1, max_length=4000)]


class ChatMessage(Struct):
    """The JSON published on `chat.room.<room>` (stream `chat`)."""

    room: str
    text: str
    author: str
    author_name: str
    time: dt.datetime


class ChatSent(Struct):
    stream: str
    seq: int
    duplicate: bool


class TodoPut(_In):
    id: Token
    title: Annotated[str, Meta(max_length=500)]
    done: bool = False


class TodoDelete(_In):
    id: Token


class Todo(Struct):
    """The value stored in KV `todos` under key `user.<uid>.<id>`."""

    id: str
    title: str
    done: bool
    updated_at: dt.datetime


class TodoWritten(Struct):
    key: str
    revision: int


# ---------------------------------------------------------------- events and audit


class Actor(Struct):
    id: str
    username: str


class AuditWhat(Struct, omit_defaults=True):
    resource: str
    action: str
    id: str
    revision: int | None = None
    fields: list[str] | None = None


class AuditRecord(Struct):
    """Published on `audit.<resource>.<action>` (stream `audit`). Never a secret."""

    who: Actor | None
    what: AuditWhat
    when: dt.datetime


class Status(Struct, omit_defaults=True):
    status: str
    checks: dict[str, bool] | None = None  # readiness: each check and whether it passed


AnyJson = Any
