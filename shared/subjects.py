"""NATS subject grammar and wildcard semantics, as nats-server has them.

Subjects are `.`-separated tokens. In a pattern `*` is exactly one token and `>`
one or more trailing tokens. We are stricter than the server in one place: a token
that *contains* `*` or `>` without being one (`a*b`) is refused, because a user who
writes it almost always means a wildcard and the server would treat it as a literal.

Everything here is pure: no I/O, no NATS.
"""

from __future__ import annotations

MAX_SUBJECT_LENGTH = 512
_FORBIDDEN_CHARS = frozenset(" \t\r\n\x00\x0b\x0c")

# The same grammar as regular expressions, for documents (OpenAPI, msgspec Meta) that must
# state what _check accepts; tests/unit/test_subjects.py checks the two agree. `\s` is
# str.isspace(); `(?!\n)$` because a bare `$` also matches before a final newline.
_TOKEN = r"[^\s\x00-\x1f\x7f.*>]+"
SUBJECT_REGEX = rf"^{_TOKEN}(?:\.{_TOKEN})*(?!\n)$"
PATTERN_REGEX = rf"^(?:(?:{_TOKEN}|\*)(?:\.(?:{_TOKEN}|\*))*(?:\.>)?|>)(?!\n)$"


def _check(s: object, *, wildcards: bool) -> list[str]:
    if not isinstance(s, str):
        raise ValueError("subject must be a string")
    if not s:
        raise ValueError("subject is empty")
    if len(s) > MAX_SUBJECT_LENGTH:
        raise ValueError(f"subject is longer than {MAX_SUBJECT_LENGTH} characters")
    for ch in s:
        if ch in _FORBIDDEN_CHARS or ord(ch) < 0x20 or ord(ch) == 0x7F or ch.isspace():
            raise ValueError("subject contains whitespace or a control character")
    tokens = s.split(".")
    last = len(tokens) - 1
    for i, tok in enumerate(tokens):
        if not tok:
            raise ValueError("subject has an empty token (leading, trailing or double dot)")
        if tok in ("*", ">"):
            if not wildcards:
                raise ValueError(f"wildcard {tok!r} is not allowed here")
            if tok == ">" and i != last:
                raise ValueError("'>' must be the last token")
        elif "*" in tok or ">" in tok:
            raise ValueError(f"token {tok!r} mixes a wildcard with other characters")
    return tokens


def validate_subject(s: str) -> str:
    """Return `s` if it is a valid literal subject; raise ValueError with the reason."""
    _check(s, wildcards=False)
    return s


def validate_pattern(p: str) -> str:
    """Return `p` if it is a valid subject pattern; raise ValueError with the reason."""
    _check(p, wildcards=True)
    return p


def tokens(p: str) -> tuple[str, ...]:
    return tuple(p.split("."))


def match_tokens(pattern: tuple[str, ...], subject: tuple[str, ...]) -> bool:
    n = len(subject)
    for i, pt in enumerate(pattern):
        if pt == ">":
            return n > i
        if i >= n:
            return False
        if pt != "*" and pt != subject[i]:
            return False
    return len(pattern) == n


def match(pattern: str, subject: str) -> bool:
    """True if the literal `subject` is matched by `pattern`."""
    return match_tokens(tokens(pattern), tokens(subject))


def subset_tokens(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    for i, at in enumerate(a):
        if i >= len(b):
            return False
        bt = b[i]
        if bt == ">":
            return True
        if at == ">":
            return False
        if bt != "*" and at != bt:
            return False
    return len(a) == len(b)


def is_subset(pattern: str, of: str) -> bool:
    """True if every subject that `pattern` matches is also matched by `of`."""
    return subset_tokens(tokens(pattern), tokens(of))


def overlap_tokens(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    for i in range(min(len(a), len(b))):
        at, bt = a[i], b[i]
        if at == ">" or bt == ">":
            return True
        if at != "*" and bt != "*" and at != bt:
            return False
    return len(a) == len(b)


def overlaps(a: str, b: str) -> bool:
    """True if some subject is matched by both patterns."""
    return overlap_tokens(tokens(a), tokens(b))


def subset_witness(pattern: str, of: str) -> str | None:
    """A subject matched by `pattern` but not by `of`, or None when `pattern` ⊆ `of`."""
    a, b = tokens(pattern), tokens(of)
    if subset_tokens(a, b):
        return None
    fresh = "w"
    while fresh in b:
        fresh += "w"
    # The most generic instantiation of `pattern`; `>` tried at two lengths, since `of`
    # may accept exactly one of them.
    for extra in (1, 2):
        out: list[str] = []
        for t in a:
            if t == "*":
                out.append(fresh)
            elif t == ">":
                out.extend([fresh] * extra)
            else:
                out.append(t)
        if not match_tokens(b, tuple(out)):
            return ".".join(out)
    return None  # unreachable for valid patterns; kept total for callers
