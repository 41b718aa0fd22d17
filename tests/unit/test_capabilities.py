"""The capability document: decoding, `{uid}`, subset checks, internal names, revocation."""

from __future__ import annotations

import json

import msgspec
import pytest

from shared.capabilities import (
    DURABLES_BUCKET,
    INTERNAL_SUBJECT_PATTERNS,
    Capabilities,
    CompiledCapabilities,
    Decision,
    SubscriptionRef,
    decode,
    is_internal_bucket,
    is_internal_stream,
    is_internal_subject,
    overlaps_internal,
    render,
    revoked,
    validate,
)
from shared.errors import CapabilityError

DOC = {
    "subjects": ["chat.room.*", "articles.>", "user.{uid}.inbox"],
    "buckets": {"todos": ["user.{uid}.>"], "articles": [">"]},
    "streams": {"chat": ["chat.room.123", "chat.room.456"], "audit": [">"]},
    "commands": ["articles.create", "chat.send", "todos.*"],
}


def compiled(doc: object = DOC, uid: str = "u1") -> CompiledCapabilities:
    return CompiledCapabilities(decode(doc), uid)


# ------------------------------------------------------------------------------ decode


def test_decode_accepts_bytes_str_and_objects_alike() -> None:
    """JSON bytes, JSON text and a plain dict decode to the same Capabilities."""
    raw = json.dumps(DOC)
    a, b, c = decode(raw.encode()), decode(raw), decode(DOC)
    assert a == b == c
    assert a.buckets["todos"] == ["user.{uid}.>"]
    assert a.commands == DOC["commands"]


def test_decode_defaults_to_nothing_allowed() -> None:
    """An empty document decodes to empty lists and maps, which allow nothing."""
    caps = decode({})
    assert caps == Capabilities()
    cc = CompiledCapabilities(caps, "u1")
    assert not cc.allows_subject("chat.room.1")
    assert not cc.allows_kv("todos", "user.u1.x")
    assert not cc.allows_stream("chat", ">")
    assert not cc.allows_command("chat.send")


def test_decode_rejects_unknown_fields_and_wrong_types() -> None:
    """Unknown top-level fields and ill-typed values are refused by the decoder."""
    with pytest.raises(msgspec.ValidationError):
        decode({"subject": ["a"]})
    with pytest.raises(msgspec.ValidationError):
        decode({"subjects": "chat.>"})
    with pytest.raises(msgspec.ValidationError):
        decode({"buckets": {"todos": "x"}})
    with pytest.raises(msgspec.DecodeError):
        decode(b"{not json")


@pytest.mark.parametrize(
    ("doc", "where", "pattern"),
    [
        ({"subjects": ["ok.>", "chat..room"]}, "subjects", "chat..room"),
        ({"subjects": ["a.>.b"]}, "subjects", "a.>.b"),
        ({"subjects": ["chat.room*"]}, "subjects", "chat.room*"),
        ({"subjects": [""]}, "subjects", ""),
        ({"subjects": ["a b"]}, "subjects", "a b"),
        ({"commands": ["chat.send", "chat."]}, "commands", "chat."),
        (
            {"buckets": {"todos": ["user.{uid}.>", "user.{uid}..x"]}},
            "buckets.todos",
            "user.{uid}..x",
        ),
        ({"streams": {"chat": [">.x"]}}, "streams.chat", ">.x"),
        ({"buckets": {"to.dos": [">"]}}, "buckets", "to.dos"),
        ({"buckets": {"todo*": [">"]}}, "buckets", "todo*"),
        ({"streams": {"": [">"]}}, "streams", ""),
        ({"streams": {"a b": [">"]}}, "streams", "a b"),
    ],
)
def test_decode_names_the_bad_pattern(doc: object, where: str, pattern: str) -> None:
    """A bad pattern or name raises CapabilityError naming it and where it is."""
    with pytest.raises(CapabilityError) as ei:
        decode(doc)
    assert ei.value.pattern == pattern
    assert ei.value.where == where
    assert repr(pattern) in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_validate_accepts_uid_placeholders_and_wildcard_names() -> None:
    """`{uid}` inside a token and `*`/`>` bucket/stream keys pass validation."""
    validate(
        Capabilities(
            subjects=["user.{uid}.>", "x.pre-{uid}"],
            buckets={"*": ["{uid}.>"], ">": [">"]},
            streams={"*": [">"]},
        )
    )


# ------------------------------------------------------------------------------ render


def test_render_substitutes_uid_everywhere() -> None:
    """`{uid}` is replaced in subjects, buckets, streams and commands; names untouched."""
    caps = decode(
        {
            "subjects": ["user.{uid}.>"],
            "buckets": {"todos": ["user.{uid}.>"]},
            "streams": {"chat": ["chat.dm.{uid}"]},
            "commands": ["user.{uid}.rename"],
        }
    )
    r = render(caps, "u42")
    assert r.subjects == ["user.u42.>"]
    assert r.buckets == {"todos": ["user.u42.>"]}
    assert r.streams == {"chat": ["chat.dm.u42"]}
    assert r.commands == ["user.u42.rename"]
    assert caps.subjects == ["user.{uid}.>"]  # the stored document is not modified
    assert compiled(caps, "u42").document == r


@pytest.mark.parametrize("uid", ["*", ">", "a.b", "u1.>", "", "a b", "a*"])
def test_render_refuses_uids_that_would_widen_patterns(uid: str) -> None:
    """A user id that is not one plain token cannot render into a wider pattern."""
    with pytest.raises(CapabilityError) as ei:
        compiled(uid=uid)
    assert ei.value.pattern == uid


# ------------------------------------------------------------------------------ subjects


@pytest.mark.parametrize(
    ("request_", "allowed", "rule"),
    [
        ("chat.room.123", True, "subjects: chat.room.*"),
        ("chat.room.*", True, "subjects: chat.room.*"),
        ("chat.>", False, None),
        ("chat.*", False, None),
        ("chat.room.123.x", False, None),
        ("chat.*.123", False, None),
        ("articles.1.created", True, "subjects: articles.>"),
        ("articles.>", True, "subjects: articles.>"),
        ("articles.*", True, "subjects: articles.>"),
        ("articles", False, None),
        (">", False, None),
        ("*.>", False, None),
        ("user.u1.inbox", True, "subjects: user.u1.inbox"),
        ("user.u2.inbox", False, None),
        ("user.*.inbox", False, None),
    ],
)
def test_allows_subject_uses_subset_semantics(
    request_: str, allowed: bool, rule: str | None
) -> None:
    """A sub is allowed only when its pattern is a subset of a capability pattern."""
    d = compiled().allows_subject(request_)
    assert isinstance(d, Decision)
    assert d.allowed is allowed
    assert bool(d) is allowed
    assert d.rule == rule
    assert d.reason


def test_first_covering_pattern_decides() -> None:
    """Decision.rule names the first capability pattern that covers the request."""
    cc = compiled({"subjects": ["chat.room.*", "chat.>"]})
    assert cc.allows_subject("chat.room.1").rule == "subjects: chat.room.*"
    assert cc.allows_subject("chat.x.y").rule == "subjects: chat.>"


@pytest.mark.parametrize("bad", ["chat..x", "", "a.>.b", "a*"])
def test_allows_subject_validates_the_request(bad: str) -> None:
    """An invalid requested pattern raises ValueError rather than being decided."""
    with pytest.raises(ValueError):
        compiled().allows_subject(bad)


INTERNAL_REQUESTS = [
    "$JS.>",
    "$JS.API.>",
    "$JS.API.STREAM.INFO.chat",
    "$JSC.>",
    "$KV.>",
    "$KV.auth_credentials.alice",
    "$KV.*.>",
    "$O.>",
    "$SYS.>",
    "$SYS.REQ.SERVER.PING",
    "$NRG.>",
    "$SRV.>",
    "$anything.else",
    "_INBOX.>",
    "_INBOX.*",
    "_INBOX.abc.def",
    "cmd.>",
    "cmd.*",
    "cmd.chat.send",
]


@pytest.mark.parametrize("subject", INTERNAL_REQUESTS)
def test_internal_subjects_refused_whatever_the_caps(subject: str) -> None:
    """Internal subjects are never subscribable, even with `>` or the exact pattern."""
    cc = compiled({"subjects": [">", subject]})
    d = cc.allows_subject(subject)
    assert not d
    assert d.rule is None
    assert "internal" in d.reason


def test_broad_patterns_are_allowed_but_flagged_for_filtering() -> None:
    """`>` with a `>` capability is allowed, and overlaps_internal marks it for filtering."""
    cc = compiled({"subjects": [">"]})
    assert cc.allows_subject(">").rule == "subjects: >"
    assert cc.allows_subject("chat.>")
    assert overlaps_internal(">")
    assert overlaps_internal("*.>")
    assert overlaps_internal("*.chat")  # `cmd.chat`
    assert overlaps_internal("cmd.*")
    assert overlaps_internal("_INBOX.x")
    assert not overlaps_internal("chat.>")
    assert not overlaps_internal("chat.room.*")


@pytest.mark.parametrize("pattern", INTERNAL_SUBJECT_PATTERNS)
def test_is_internal_subject_covers_every_internal_pattern(pattern: str) -> None:
    """A literal under each internal prefix is internal; an ordinary subject is not."""
    literal = pattern.replace(">", "x.y")
    assert is_internal_subject(literal)


@pytest.mark.parametrize("subject", ["chat.room.1", "cmd", "commands.x", "INBOX.x", "_inbox.x"])
def test_ordinary_subjects_are_not_internal(subject: str) -> None:
    """Subjects merely resembling internal ones are not treated as internal."""
    assert not is_internal_subject(subject)


# ------------------------------------------------------------------------------ buckets


@pytest.mark.parametrize(
    ("bucket", "pattern", "allowed", "rule"),
    [
        ("todos", "user.u1.>", True, "buckets.todos: user.u1.>"),
        ("todos", "user.u1.item1", True, "buckets.todos: user.u1.>"),
        ("todos", "user.u1.*", True, "buckets.todos: user.u1.>"),
        ("todos", ">", False, None),
        ("todos", "user.*.>", False, None),
        ("todos", "user.>", False, None),
        ("todos", "user.u2.>", False, None),
        ("todos", "user.u1", False, None),
        ("todos", "*.u1.x", False, None),
        ("articles", ">", True, "buckets.articles: >"),
        ("articles", "a.b", True, "buckets.articles: >"),
        ("other", "x", False, None),
    ],
)
def test_allows_kv_uses_subset_semantics(
    bucket: str, pattern: str, allowed: bool, rule: str | None
) -> None:
    """A KV watch is allowed only for a key pattern within the bucket's capability."""
    d = compiled().allows_kv(bucket, pattern)
    assert d.allowed is allowed
    assert d.rule == rule


@pytest.mark.parametrize("bucket", ["auth_credentials", "auth_revoked", "auth_sessions", "auth_"])
def test_internal_buckets_refused_whatever_the_caps(bucket: str) -> None:
    """The credentials/revocation buckets (any auth_* but auth_users) are never readable."""
    assert is_internal_bucket(bucket)
    cc = compiled({"buckets": {bucket: [">"], "*": [">"], ">": [">"]}})
    d = cc.allows_kv(bucket, ">")
    assert not d
    assert "internal" in d.reason


def test_the_gateway_durables_bucket_is_refused_whatever_the_caps() -> None:
    """gw_durables (every user's durables, holders and floors) is never a kv_sub's, nor an
    explain's: not even with a wildcard bucket or its own name granted."""
    assert DURABLES_BUCKET == "gw_durables" and is_internal_bucket(DURABLES_BUCKET)
    cc = compiled({"buckets": {DURABLES_BUCKET: [">"], "*": [">"], ">": [">"]}})
    for pattern in (">", "chat.u1.>", "chat.u1.d"):
        d = cc.allows_kv(DURABLES_BUCKET, pattern)
        assert not d and "internal" in d.reason
    assert not cc.allows(SubscriptionRef("explain", "kv_sub", DURABLES_BUCKET, ">"))
    assert cc.allows_kv("gw_durables_other", ">")  # the name, not a prefix
    assert not cc.allows_stream("KV_gw_durables", ">")


def test_auth_users_allowed_when_the_caps_allow_it() -> None:
    """auth_users is an ordinary bucket: refused by default, allowed when granted."""
    assert not is_internal_bucket("auth_users")
    assert not compiled({}).allows_kv("auth_users", ">")
    d = compiled({"buckets": {"auth_users": ["{uid}"]}}).allows_kv("auth_users", "u1")
    assert d.rule == "buckets.auth_users: u1"
    assert not compiled({"buckets": {"auth_users": ["{uid}"]}}).allows_kv("auth_users", "u2")


@pytest.mark.parametrize("key", ["*", ">"])
def test_wildcard_bucket_key_matches_any_bucket(key: str) -> None:
    """A bucket key of `*` or `>` applies its patterns to every (non-internal) bucket."""
    cc = compiled({"buckets": {key: ["public.>"]}})
    for bucket in ("todos", "articles", "anything"):
        d = cc.allows_kv(bucket, "public.x")
        assert d.rule == f"buckets.{key}: public.>"
    assert not cc.allows_kv("todos", "private.x")


def test_bucket_names_match_exactly() -> None:
    """A bucket capability does not leak to buckets whose names merely share a prefix."""
    cc = compiled({"buckets": {"todos": [">"]}})
    assert cc.allows_kv("todos", ">")
    assert not cc.allows_kv("todos2", ">")
    assert not cc.allows_kv("todo", ">")
    assert not cc.allows_kv("TODOS", ">")


def test_later_bucket_entries_are_still_consulted() -> None:
    """When the exact-name entry refuses, a wildcard-name entry can still allow."""
    cc = compiled({"buckets": {"todos": ["a.>"], "*": ["b.>"]}})
    assert cc.allows_kv("todos", "a.x").rule == "buckets.todos: a.>"
    assert cc.allows_kv("todos", "b.x").rule == "buckets.*: b.>"
    assert not cc.allows_kv("todos", "c.x")


# ------------------------------------------------------------------------------ streams


@pytest.mark.parametrize(
    ("stream", "filter_", "allowed", "rule"),
    [
        ("chat", "chat.room.123", True, "streams.chat: chat.room.123"),
        ("chat", "chat.room.456", True, "streams.chat: chat.room.456"),
        ("chat", "chat.room.*", False, None),
        ("chat", ">", False, None),
        ("chat", "chat.room.789", False, None),
        ("audit", ">", True, "streams.audit: >"),
        ("audit", "audit.login.*", True, "streams.audit: >"),
        ("missing", "x", False, None),
    ],
)
def test_allows_stream_uses_subset_semantics(
    stream: str, filter_: str, allowed: bool, rule: str | None
) -> None:
    """A consumer is allowed only for a filter within the stream's capability."""
    d = compiled().allows_stream(stream, filter_)
    assert d.allowed is allowed
    assert d.rule == rule


@pytest.mark.parametrize("stream", ["KV_todos", "KV_auth_credentials", "KV_auth_users", "OBJ_x"])
def test_kv_and_object_streams_refused(stream: str) -> None:
    """Streams backing KV buckets and object stores are never reachable as streams."""
    assert is_internal_stream(stream)
    cc = compiled({"streams": {stream: [">"], "*": [">"]}})
    d = cc.allows_stream(stream, ">")
    assert not d
    assert "internal" in d.reason


@pytest.mark.parametrize("key", ["*", ">"])
def test_wildcard_stream_key_matches_any_stream(key: str) -> None:
    """A stream key of `*` or `>` applies its filters to every ordinary stream."""
    cc = compiled({"streams": {key: ["chat.room.1"]}})
    assert cc.allows_stream("chat", "chat.room.1").rule == f"streams.{key}: chat.room.1"
    assert cc.allows_stream("audit", "chat.room.1")
    assert not cc.allows_stream("chat", "chat.room.*")


def test_allows_stream_validates_the_filter() -> None:
    """An invalid stream filter raises ValueError."""
    with pytest.raises(ValueError):
        compiled().allows_stream("audit", "a..b")


# ------------------------------------------------------------------------------ commands


def test_allows_command() -> None:
    """Commands are literal names checked against (possibly wildcard) command patterns."""
    cc = compiled()
    assert cc.allows_command("chat.send").rule == "commands: chat.send"
    assert cc.allows_command("todos.toggle").rule == "commands: todos.*"
    assert not cc.allows_command("todos.toggle.now")
    assert not cc.allows_command("articles.delete")
    assert not cc.allows_command("chat")


@pytest.mark.parametrize("bad", ["chat.*", ">", "chat..send", ""])
def test_allows_command_requires_a_literal_name(bad: str) -> None:
    """A wildcard or malformed command name raises ValueError instead of matching."""
    with pytest.raises(ValueError):
        compiled({"commands": [">"]}).allows_command(bad)


# ------------------------------------------------------------------------------ revoked


def test_revoked_returns_exactly_the_subscriptions_a_change_ends() -> None:
    """After a capability change, revoked() lists the refs no longer allowed, in order."""
    live = [
        SubscriptionRef("i1", "sub", "chat.room.1", "chat.room.1"),
        SubscriptionRef("i2", "sub", "chat.room.*", "chat.room.*"),
        SubscriptionRef("i3", "sub", "articles.>", "articles.>"),
        SubscriptionRef("i4", "kv_sub", "todos", "user.u1.>"),
        SubscriptionRef("i5", "kv_sub", "articles", ">"),
        SubscriptionRef("i6", "js_sub", "chat", "chat.room.123"),
        SubscriptionRef("i7", "js_sub", "audit", ">"),
        SubscriptionRef("i8", "js_sub", "chat", "chat.room.456"),
    ]
    old = compiled()
    assert revoked(live, old) == []
    new = compiled(
        {
            "subjects": ["chat.room.1", "articles.>"],
            "buckets": {"todos": ["user.{uid}.>"]},
            "streams": {"chat": ["chat.room.123"]},
        }
    )
    assert [r.inbox for r in revoked(live, new)] == ["i2", "i5", "i7", "i8"]
    assert [r.inbox for r in revoked(live, compiled({}))] == [r.inbox for r in live]


def test_allows_dispatches_on_op() -> None:
    """allows() routes each op to its check; an unknown op is refused."""
    cc = compiled()
    assert cc.allows(SubscriptionRef("a", "sub", "chat.room.1", "chat.room.1"))
    assert cc.allows(SubscriptionRef("b", "kv_sub", "todos", "user.u1.x"))
    assert not cc.allows(SubscriptionRef("c", "kv_sub", "todos", ">"))
    assert cc.allows(SubscriptionRef("d", "js_sub", "audit", ">"))
    assert cc.allows(SubscriptionRef("e", "cmd", "chat.send", ""))
    d = cc.allows(SubscriptionRef("f", "bogus", "chat.room.1", "chat.room.1"))
    assert not d and "unknown op" in d.reason
