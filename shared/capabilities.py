"""The capability document (docs/protocol.md, "Capabilities") and the checks made with it.

A request is allowed when its pattern is a *subset* of some capability pattern, never
when a requested wildcard merely matches a pattern as if it were a literal subject.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated

import msgspec

from shared.errors import CapabilityError
from shared.subjects import (
    MAX_SUBJECT_LENGTH,
    PATTERN_REGEX,
    overlap_tokens,
    subset_tokens,
    tokens,
    validate_pattern,
    validate_subject,
)

# Subjects no `sub` may ever receive: NATS system/API subjects and our command bus.
# KV and streams are reached through kv_sub/js_sub and their own checks only.
INTERNAL_SUBJECT_PATTERNS: tuple[str, ...] = (
    "$JS.>",
    "$JSC.>",
    "$KV.>",
    "$O.>",
    "$SYS.>",
    "$NRG.>",
    "$SRV.>",
    "_INBOX.>",
    "cmd.>",
)
_INTERNAL_TOKENS = tuple(tokens(p) for p in INTERNAL_SUBJECT_PATTERNS)
EXPOSABLE_AUTH_BUCKET = "auth_users"
# The gateway's durable js_sub records (ws_gateway/durables.py): every user's durables, their
# holders and ack floors. Never a client's to read, whatever its capabilities say.
DURABLES_BUCKET = "gw_durables"
# Who is here (ws_gateway/presence.py): declared in the resources file like any bucket and
# read by kv_sub under `buckets.presence`, but only the gateways write it.
PRESENCE_BUCKET = "presence"
# Where that bucket republishes each stored write (`<DURABLES_WATCH>.<key>`): holders watch
# their keys there. `$`: an internal subject, never delivered to a client.
DURABLES_WATCH = "$GW.durables"


# The grammar `validate` checks, stated as a schema too (decoding checks it first, and the
# OpenAPI document shows it): `{uid}` stands for the user's id, itself one token.
Pattern = Annotated[
    str,
    msgspec.Meta(
        pattern=PATTERN_REGEX,
        min_length=1,
        max_length=MAX_SUBJECT_LENGTH,
        description="NATS subject pattern: '.'-separated tokens, '*' one token, '>' the rest",
    ),
]
ResourceName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^(?:\*|>|[^ .*>\t\r\n\x00/\\]{1,255})(?!\n)$",
        description="a bucket or stream name, or '*' / '>' for all",
    ),
]


class Capabilities(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    subjects: list[Pattern] = []
    buckets: dict[ResourceName, list[Pattern]] = {}
    streams: dict[ResourceName, list[Pattern]] = {}
    commands: list[Pattern] = []


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str | None  # the capability pattern that decided, e.g. "buckets.todos: user.u1.>"
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True, slots=True)
class SubscriptionRef:
    """What a live subscription asked for: enough to re-check it against new capabilities."""

    inbox: str
    op: str  # "sub" | "kv_sub" | "js_sub"
    target: str
    pattern: str  # subject pattern, key pattern or stream filter


def is_internal_subject(subject: str) -> bool:
    """True for a literal subject that is never delivered to clients."""
    return is_internal_tokens(tokens(subject))


def is_internal_tokens(t: tuple[str, ...]) -> bool:
    """`is_internal_subject` of a subject already split into tokens."""
    return t[0].startswith("$") or any(subset_tokens(t, p) for p in _INTERNAL_TOKENS)


def overlaps_internal(pattern: str) -> bool:
    """True if `pattern` could match an internal subject (then deliveries are filtered)."""
    t = tokens(pattern)
    return (
        t[0] in ("*", ">")
        or t[0].startswith("$")
        or any(overlap_tokens(t, p) for p in _INTERNAL_TOKENS)
    )


def is_internal_bucket(bucket: str) -> bool:
    """Buckets no kv_sub (nor the API's explain) may reach: auth_* but auth_users, and the
    gateway's durables."""
    if bucket == DURABLES_BUCKET:
        return True
    return bucket.startswith("auth_") and bucket != EXPOSABLE_AUTH_BUCKET


def is_internal_stream(stream: str) -> bool:
    # KV buckets and object stores are streams too; reaching them as streams would bypass
    # the bucket rules (KV_auth_credentials holds password hashes).
    return stream.startswith(("KV_", "OBJ_", "$"))


_NAME_BAD = frozenset(" .*>\t\r\n\x00/\\")


def is_nats_name(name: str) -> bool:
    """A stream or bucket name: 1-255 characters, no dots, wildcards, whitespace, slashes."""
    return 0 < len(name) <= 255 and not any(c in _NAME_BAD for c in name)


def _validate_name(name: str) -> None:
    if name in ("*", ">"):
        return
    if not is_nats_name(name):
        raise ValueError("a bucket or stream name is '*', '>' or a NATS name (no dots)")


def validate(caps: Capabilities) -> None:
    """Raise CapabilityError naming the first bad pattern."""

    def check(where: str, patterns: Iterable[str], literal: bool = False) -> None:
        for p in patterns:
            try:
                # `{uid}` is substituted later; a valid id is one plain token.
                q = p.replace("{uid}", "uid")
                validate_subject(q) if literal else validate_pattern(q)
            except ValueError as e:
                raise CapabilityError(where, p, str(e)) from None

    check("subjects", caps.subjects)
    check("commands", caps.commands)
    for kind, table in (("buckets", caps.buckets), ("streams", caps.streams)):
        for name, patterns in table.items():
            try:
                _validate_name(name)
            except ValueError as e:
                raise CapabilityError(kind, name, str(e)) from None
            check(f"{kind}.{name}", patterns)


def render(caps: Capabilities, uid: str) -> Capabilities:
    """Substitute `{uid}` with the user's id."""
    # `user.{uid}.>` must stay inside one user's space: an id with a dot or a wildcard
    # (`a.b`, `*`) would render into another user's keys or all of them.
    try:
        validate_subject(uid)
    except ValueError as e:
        raise CapabilityError("uid", uid, str(e)) from None
    if "." in uid:
        raise CapabilityError("uid", uid, "a user id is one token (no dots)")

    def sub(ps: list[str]) -> list[str]:
        return [p.replace("{uid}", uid) for p in ps]

    return Capabilities(
        subjects=sub(caps.subjects),
        buckets={k: sub(v) for k, v in caps.buckets.items()},
        streams={k: sub(v) for k, v in caps.streams.items()},
        commands=sub(caps.commands),
    )


_Compiled = tuple[tuple[str, tuple[str, ...]], ...]


def _compile(patterns: Iterable[str]) -> _Compiled:
    return tuple((p, tokens(p)) for p in patterns)


def _first_superset(request: str, t: tuple[str, ...], compiled: _Compiled, where: str) -> Decision:
    for p, pt in compiled:
        if subset_tokens(t, pt):
            return Decision(True, f"{where}: {p}", f"{request!r} is within {p!r}")
    return Decision(False, None, f"no {where} capability covers {request!r}")


def _name_matches(key: str, name: str) -> bool:
    return key in ("*", ">") or key == name


class CompiledCapabilities:
    """A user's rendered capabilities, tokenised once per session for fast checks."""

    __slots__ = ("_buckets", "_commands", "_streams", "_subjects", "document", "uid")

    def __init__(self, caps: Capabilities, uid: str) -> None:
        validate(caps)
        self.uid = uid
        self.document = render(caps, uid)
        self._subjects = _compile(self.document.subjects)
        self._commands = _compile(self.document.commands)
        self._buckets = {k: _compile(v) for k, v in self.document.buckets.items()}
        self._streams = {k: _compile(v) for k, v in self.document.streams.items()}

    def allows_subject(self, pattern: str) -> Decision:
        t = tokens(validate_pattern(pattern))
        if is_internal_tokens(t):
            return Decision(False, None, f"{pattern!r} is an internal subject")
        return _first_superset(pattern, t, self._subjects, "subjects")

    def _allows_named(
        self, table: Mapping[str, _Compiled], kind: str, name: str, pattern: str
    ) -> Decision:
        t = tokens(validate_pattern(pattern))
        for key, compiled in table.items():
            if _name_matches(key, name):
                d = _first_superset(pattern, t, compiled, f"{kind}.{key}")
                if d.allowed:
                    return d
        return Decision(False, None, f"no {kind} capability on {name!r} covers {pattern!r}")

    def allows_kv(self, bucket: str, key_pattern: str) -> Decision:
        if is_internal_bucket(bucket):
            return Decision(False, None, f"bucket {bucket!r} is internal")
        return self._allows_named(self._buckets, "buckets", bucket, key_pattern)

    def allows_stream(self, stream: str, filter: str) -> Decision:
        if is_internal_stream(stream):
            return Decision(False, None, f"stream {stream!r} is internal")
        if is_internal_tokens(tokens(filter)):
            # e.g. $KV.auth_credentials.> on a stream that happens to hold it
            return Decision(False, None, f"filter {filter!r} lies in internal subjects")
        return self._allows_named(self._streams, "streams", stream, filter)

    def allows_command(self, name: str) -> Decision:
        validate_subject(name)
        return _first_superset(name, tokens(name), self._commands, "commands")

    def allows(self, ref: SubscriptionRef) -> Decision:
        if ref.op == "sub":
            return self.allows_subject(ref.pattern)
        if ref.op == "kv_sub":
            return self.allows_kv(ref.target, ref.pattern)
        if ref.op == "js_sub":
            return self.allows_stream(ref.target, ref.pattern)
        if ref.op == "cmd":
            return self.allows_command(ref.target)
        return Decision(False, None, f"unknown op {ref.op!r}")


def revoked(
    subscriptions: Iterable[SubscriptionRef], new: CompiledCapabilities
) -> list[SubscriptionRef]:
    """The live subscriptions that `new` capabilities no longer allow."""
    return [s for s in subscriptions if not new.allows(s)]


class _Unchecked(msgspec.Struct, forbid_unknown_fields=True):
    """Capabilities' shape without its patterns: `decode` checks those itself, to name the
    bad one and where it is (CapabilityError) rather than quote a regex."""

    subjects: list[str] = []
    buckets: dict[str, list[str]] = {}
    streams: dict[str, list[str]] = {}
    commands: list[str] = []


def decode(raw: bytes | str | object) -> Capabilities:
    """Decode and validate a capability document (JSON bytes/str or a plain object)."""
    if isinstance(raw, (bytes, str)):
        loose = msgspec.json.decode(raw, type=_Unchecked)
    else:
        if isinstance(raw, Capabilities):
            raw = msgspec.to_builtins(raw)
        loose = msgspec.convert(raw, type=_Unchecked)
    caps = Capabilities(loose.subjects, loose.buckets, loose.streams, loose.commands)
    validate(caps)
    return msgspec.convert(msgspec.to_builtins(caps), type=Capabilities)
