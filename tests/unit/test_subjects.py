"""Subject grammar and wildcard semantics (shared.subjects), checked against nats-server."""

from __future__ import annotations

import asyncio
import itertools
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

from shared.natsio import nats_connect
from shared.subjects import (
    MAX_SUBJECT_LENGTH,
    PATTERN_REGEX,
    SUBJECT_REGEX,
    is_subset,
    match,
    overlaps,
    subset_witness,
    tokens,
    validate_pattern,
    validate_subject,
)
from tests.natsd import NatsServer

# ----------------------------------------------------------------------------- grammar

# Invalid both as a literal subject and as a pattern.
INVALID_ALWAYS = [
    pytest.param("", id="empty"),
    pytest.param(".", id="lone-dot"),
    pytest.param(".a", id="leading-dot"),
    pytest.param("a.", id="trailing-dot"),
    pytest.param("a..b", id="double-dot"),
    pytest.param("a...b", id="triple-dot"),
    pytest.param("..", id="only-dots"),
    pytest.param("a*b", id="star-inside-token"),
    pytest.param("a*", id="star-suffix"),
    pytest.param("*a", id="star-prefix"),
    pytest.param("a>", id="gt-suffix"),
    pytest.param(">a", id="gt-prefix"),
    pytest.param("a.b>c", id="gt-inside-token"),
    pytest.param("**", id="double-star"),
    pytest.param(">>", id="double-gt"),
    pytest.param("*>", id="star-gt-token"),
    pytest.param(">.a", id="gt-first-not-last"),
    pytest.param("a.>.b", id="gt-middle"),
    pytest.param(">.>", id="gt-twice"),
    pytest.param("a b", id="space"),
    pytest.param(" a", id="leading-space"),
    pytest.param("a ", id="trailing-space"),
    pytest.param("a\tb", id="tab"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\rb", id="carriage-return"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\x01b", id="control-soh"),
    pytest.param("a\x1bb", id="escape"),
    pytest.param("a\x7fb", id="del"),
    pytest.param("a\x0bb", id="vertical-tab"),
    pytest.param("a\x0cb", id="form-feed"),
    pytest.param("a\u00a0b", id="nbsp"),
    pytest.param("a\u2028b", id="line-separator"),
    pytest.param("a\u3000b", id="ideographic-space"),
    pytest.param("a\x85b", id="next-line"),
    pytest.param("a" * (MAX_SUBJECT_LENGTH + 1), id="over-long-token"),
    pytest.param(".".join(["a"] * (MAX_SUBJECT_LENGTH // 2 + 1)), id="over-long-tokens"),
]

# Valid patterns that are not literal subjects.
WILDCARD_PATTERNS = ["*", ">", "a.*", "a.>", "*.>", "*.*", "a.*.c", "*.b.>", "a.b.c.>"]

VALID_SUBJECTS = [
    "a",
    "a.b",
    "chat.room.123",
    "$JS.API.INFO",
    "_INBOX.abc",
    "a-b_c/d=e",
    "UPPER.lower",
    "ünïcode.ok",
    "a" * MAX_SUBJECT_LENGTH,
]


@pytest.mark.parametrize("bad", INVALID_ALWAYS)
def test_validate_subject_rejects(bad: str) -> None:
    """Every malformed literal subject raises ValueError."""
    with pytest.raises(ValueError):
        validate_subject(bad)


@pytest.mark.parametrize("bad", INVALID_ALWAYS)
def test_validate_pattern_rejects(bad: str) -> None:
    """Every malformed pattern raises ValueError."""
    with pytest.raises(ValueError):
        validate_pattern(bad)


@pytest.mark.parametrize("bad", [None, 1, b"a.b", ["a"], 1.5])
def test_validate_rejects_non_strings(bad: object) -> None:
    """Non-string input raises ValueError, never TypeError."""
    with pytest.raises(ValueError):
        validate_subject(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        validate_pattern(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("pattern", WILDCARD_PATTERNS)
def test_wildcards_are_patterns_not_subjects(pattern: str) -> None:
    """A full-token wildcard is a valid pattern and an invalid literal subject."""
    assert validate_pattern(pattern) == pattern
    with pytest.raises(ValueError):
        validate_subject(pattern)


@pytest.mark.parametrize("subject", VALID_SUBJECTS)
def test_valid_subjects_accepted(subject: str) -> None:
    """Valid literal subjects are returned unchanged by both validators."""
    assert validate_subject(subject) == subject
    assert validate_pattern(subject) == subject


def test_max_length_is_the_boundary() -> None:
    """Exactly MAX_SUBJECT_LENGTH characters is accepted, one more is refused."""
    ok = "a." * (MAX_SUBJECT_LENGTH // 2 - 1) + "ab"
    assert len(ok) == MAX_SUBJECT_LENGTH
    assert validate_subject(ok) == ok
    with pytest.raises(ValueError, match="longer"):
        validate_subject(ok + "b")


def test_error_messages_name_the_reason() -> None:
    """The ValueError says what is wrong, so a client gets a useful reason."""
    with pytest.raises(ValueError, match="last token"):
        validate_pattern("a.>.b")
    with pytest.raises(ValueError, match="empty token"):
        validate_pattern("a..b")
    with pytest.raises(ValueError, match="mixes a wildcard"):
        validate_pattern("a*b")
    with pytest.raises(ValueError, match="whitespace or a control"):
        validate_pattern("a b")


def test_tokens_split_on_dots() -> None:
    """tokens() splits on every dot and keeps the wildcards as tokens."""
    assert tokens("a.*.>") == ("a", "*", ">")
    assert tokens("a") == ("a",)


# ------------------------------------------------------------------------------- match

MATCH_CASES = [
    ("a", "a", True),
    ("a", "b", False),
    ("a", "a.b", False),
    ("a.b", "a", False),
    ("a", "ab", False),
    ("ab", "a", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("*.b", "a.b", True),
    ("*.b", "a.c", False),
    ("a.*", "a", False),
    ("a.*", "a.b.c", False),
    (">", "a", True),
    (">", "a.b.c", True),
    ("a.>", "a", False),
    ("a.>", "a.b", True),
    ("a.>", "a.b.c.d", True),
    ("a.>", "b.a", False),
    ("*.>", "a", False),
    ("*.>", "a.b", True),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.b.d", False),
    ("a.*.>", "a.b", False),
    ("a.*.>", "a.b.c", True),
    ("chat.room.*", "chat.room.123", True),
    ("chat.room.*", "chat.room.123.x", False),
    ("Chat.>", "chat.x", False),
]


@pytest.mark.parametrize(("pattern", "subject", "expected"), MATCH_CASES)
def test_match(pattern: str, subject: str, expected: bool) -> None:
    """match() follows NATS semantics: `*` one token, `>` one or more trailing tokens."""
    assert match(pattern, subject) is expected


# -------------------------------------------------------------------- subset / overlap

SUBSET_CASES = [
    ("chat.room.*", "chat.>", True),
    ("chat.>", "chat.room.*", False),
    ("chat.room.1", "chat.room.*", True),
    ("chat.room.*", "chat.room.1", False),
    ("*.x", "a.*", False),
    ("a.*", "*.x", False),
    ("a.x", "*.x", True),
    ("a.>", "a.*", False),
    ("a.*", "a.>", True),
    ("a.b.c", "a.>", True),
    ("a", "a.>", False),
    ("a.>", "a.>", True),
    ("a.*.>", "a.>", True),
    ("a.>", "a.*.>", False),
    ("*.>", ">", True),
    (">", "*.>", False),
    (">", ">", True),
    ("*", ">", True),
    (">", "*", False),
    ("*", "*", True),
    ("*.*", "*.>", True),
    ("*.>", "*.*", False),
    ("a.b", "a.b", True),
    ("a.b", "a.c", False),
    ("a.b", "a.b.c", False),
    ("a.b.c", "a.b", False),
    ("a.*", "a.*.*", False),
    ("user.u1.>", "user.*.>", True),
    ("user.*.>", "user.u1.>", False),
    (">", "user.u1.>", False),
]


@pytest.mark.parametrize(("a", "b", "expected"), SUBSET_CASES)
def test_is_subset(a: str, b: str, expected: bool) -> None:
    """is_subset(a, b) is True exactly when every subject `a` matches, `b` matches."""
    assert is_subset(a, b) is expected


@pytest.mark.parametrize(("a", "b", "expected"), SUBSET_CASES)
def test_subset_witness_table(a: str, b: str, expected: bool) -> None:
    """subset_witness is None for subsets, else a literal matched by `a` and not by `b`."""
    w = subset_witness(a, b)
    if expected:
        assert w is None
    else:
        assert w is not None
        assert validate_subject(w) == w
        assert match(a, w)
        assert not match(b, w)


def test_subset_witness_avoids_literals_of_the_superset() -> None:
    """The fresh token of a witness is not one of the other pattern's literals."""
    w = subset_witness("*", "w")
    assert w is not None and w != "w" and match("*", w) and not match("w", w)
    w = subset_witness("a.*", "a.w")
    assert w is not None and not match("a.w", w)


OVERLAP_CASES = [
    ("a.*", "*.b", True),
    ("a.*", "b.*", False),
    ("a.>", "*.b", True),
    ("a.>", "a", False),
    ("a", "a", True),
    ("a", "b", False),
    (">", "a.b.c", True),
    ("*", "a.b", False),
    ("*.*", "a.>", True),
    ("a.*.c", "a.b.>", True),
    ("a.*.c", "a.b.d", False),
    ("*.x", "a.*", True),
    ("a.b", "a.b.c", False),
    ("a.*", "a.*.*", False),
    ("$JS.>", ">", True),
    ("_INBOX.>", "*.>", True),
    ("cmd.>", "chat.>", False),
]


@pytest.mark.parametrize(("a", "b", "expected"), OVERLAP_CASES)
def test_overlaps(a: str, b: str, expected: bool) -> None:
    """overlaps() is True exactly when some subject matches both patterns (symmetric)."""
    assert overlaps(a, b) is expected
    assert overlaps(b, a) is expected


# ------------------------------------------------- property: subset ⇔ set inclusion

LITERALS = ("a", "b")
pattern_tokens = st.lists(st.sampled_from((*LITERALS, "*")), min_size=1, max_size=4)
patterns = st.tuples(pattern_tokens, st.booleans()).map(
    lambda t: ".".join([*t[0][:-1], ">"] if t[1] else t[0])
)
# "c" is never a literal of a pattern, so it plays any token the patterns do not name.
ORACLE_ALPHABET = ("a", "b", "c")
_ORACLE = {
    n: [".".join(p) for k in range(1, n + 1) for p in itertools.product(ORACLE_ALPHABET, repeat=k)]
    for n in range(1, 6)
}


def instances(pattern: str) -> st.SearchStrategy[str]:
    """Subjects the pattern matches: each wildcard replaced by random tokens."""
    parts: list[st.SearchStrategy[list[str]]] = []
    for t in tokens(pattern):
        tok = st.sampled_from((*LITERALS, "c", "w", "ww"))
        if t == "*":
            parts.append(tok.map(lambda x: [x]))
        elif t == ">":
            parts.append(st.lists(tok, min_size=1, max_size=3))
        else:
            parts.append(st.just([t]))
    return st.tuples(*parts).map(lambda ps: ".".join(x for p in ps for x in p))


@settings(max_examples=2000, derandomize=True, database=None, deadline=None)
@given(st.data(), patterns, patterns)
def test_subset_property(data: st.DataObject, a: str, b: str) -> None:
    """is_subset(a,b) ⇒ b matches every subject a matches; otherwise the witness separates."""
    assert validate_pattern(a) and validate_pattern(b)
    subset = is_subset(a, b)
    for s in data.draw(st.lists(instances(a), min_size=1, max_size=8)):
        assert match(a, s)
        if subset:
            assert match(b, s), (a, b, s)
    w = subset_witness(a, b)
    if subset:
        assert w is None
    else:
        assert w is not None
        assert validate_subject(w) == w
        assert match(a, w) and not match(b, w), (a, b, w)
    # Exhaustive oracle: any counter-example needs at most max(len)+1 tokens over a,b,c.
    universe = _ORACLE[max(len(tokens(a)), len(tokens(b))) + 1]
    matched_a = [s for s in universe if match(a, s)]
    assert subset == all(match(b, s) for s in matched_a)
    assert overlaps(a, b) == any(match(b, s) for s in matched_a)
    if subset:
        assert overlaps(a, b)


# ------------------------------------------------------- differential vs nats-server

SEED = 20240601
DIFF_ALPHABET = ("a", "b", "ab")


def _random_pattern(rng: random.Random) -> str:
    n = rng.randint(1, 4)
    toks = [rng.choice((*DIFF_ALPHABET, "*", "*")) for _ in range(n)]
    if rng.random() < 0.3:
        toks[-1] = ">"
    return ".".join(toks)


def _random_subject(rng: random.Random) -> str:
    return ".".join(rng.choice(DIFF_ALPHABET) for _ in range(rng.randint(1, 5)))


def _sentinel(pattern: str) -> str:
    """A subject this pattern surely matches (wildcards filled with a token of their own)."""
    return ".".join("zz" if t in ("*", ">") else t for t in tokens(pattern))


async def test_match_agrees_with_nats_server(nats_server: NatsServer) -> None:
    """For generated (pattern, subject) pairs the server delivers exactly what match() accepts."""
    rng = random.Random(SEED)
    fixed = [">", "*", "*.>", "a.>", "a.*", "*.b", "a.*.>", "ab.*.b"]
    pats = list(dict.fromkeys(fixed + [_random_pattern(rng) for _ in range(60)]))
    subjects = list(dict.fromkeys(_random_subject(rng) for _ in range(150)))
    for p in pats:
        validate_pattern(p)
    for s in subjects:
        validate_subject(s)
    assert len(pats) * len(subjects) >= 2000

    nc = await nats_connect(nats_server.url)
    try:
        received: dict[str, list[str]] = {p: [] for p in pats}
        done: dict[str, asyncio.Event] = {p: asyncio.Event() for p in pats}

        def collector(p: str):  # type: ignore[no-untyped-def]
            marker = f"sentinel:{p}".encode()

            async def cb(msg: Msg) -> None:
                if msg.data == marker:
                    done[p].set()
                elif msg.data == b"corpus":
                    received[p].append(msg.subject)

            return cb

        for p in pats:
            await nc.subscribe(p, cb=collector(p))
        await nc.flush()
        for s in subjects:
            await nc.publish(s, b"corpus")
        # Each pattern's sentinel is published after the whole corpus; NATS keeps order per
        # publisher, so once a subscription sees its own sentinel it has seen its corpus.
        for p in pats:
            assert match(p, _sentinel(p))
            await nc.publish(_sentinel(p), f"sentinel:{p}".encode())
        await nc.flush()
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in done.values())), 5)
    finally:
        await nc.close()

    matched_pairs = 0
    for p in pats:
        expected = [s for s in subjects if match(p, s)]
        matched_pairs += len(expected)
        assert received[p] == expected, p
    # The alphabet is small on purpose: many pairs must match for the test to mean much.
    assert matched_pairs >= 300


# The regexes the API document states must accept exactly what the validators accept.
_GRAMMAR_ALPHABET = st.sampled_from(list("ab.*> \t\n\x00\x1f\x7f\xa0\u2028{}-_Z"))


def _accepts(check: object, s: str) -> bool:
    try:
        check(s)  # type: ignore[operator]
    except ValueError:
        return False
    return True


@settings(max_examples=3000)
@given(st.text(_GRAMMAR_ALPHABET, max_size=12) | st.text(max_size=8))
def test_the_documented_regexes_are_the_validators(s: str) -> None:
    assert _accepts(validate_subject, s) == bool(re.fullmatch(SUBJECT_REGEX, s))
    assert _accepts(validate_pattern, s) == bool(re.fullmatch(PATTERN_REGEX, s))
