"""The resources file (TOML, docs/resources.md): the application's KV buckets and streams
with their limits, its roles, and the external token issuers it trusts.

The stack's own buckets (auth_*, gw_durables) are not declared here: they are code
(shared/natsio.py). `load` validates everything at once and names the first bad entry, so
a typo stops `provision` and the servers at startup rather than at the first request.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from shared.capabilities import (
    DURABLES_BUCKET,
    Capabilities,
    is_internal_stream,
    is_nats_name,
    validate,
)
from shared.errors import CapabilityError
from shared.settings import Settings
from shared.subjects import overlaps, validate_pattern
from shared.users import ROLE_NAME_RE

DEFAULT_FILE = Path(__file__).resolve().parents[1] / "deploy" / "resources.toml"
# Never `none`, never HMAC: with a public key published in a JWKS an HMAC algorithm would
# let anyone holding the JWKS sign (the classic RS256 → HS256 confusion).
Algorithm = Literal["EdDSA", "ES256", "RS256"]
Storage = Literal["file", "memory"]


class BucketSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    history: int = 1  # revisions kept per key (1-64)
    max_age: float | None = None  # seconds a value is kept; None: forever
    max_bytes: int | None = None  # None: NATS_DATA_MAX_BYTES
    replicas: int | None = None  # None: NATS_REPLICAS
    storage: Storage = "file"
    # Per-message TTLs (`Nats-TTL`), and a delete marker kept this many seconds when one
    # expires, so watchers see the key go (presence, docs/protocol.md). None: neither.
    marker_ttl: float | None = None


class StreamSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    subjects: list[str]
    max_age: float | None = None  # None: NATS_<NAME>_MAX_AGE for chat/audit, else forever
    max_bytes: int | None = None  # None: NATS_STREAM_MAX_BYTES
    replicas: int | None = None
    storage: Storage = "file"


# An issuer's user ids: prefix + claim. Letters or digits, then '-': never a local id
# (`u` + hex, or one an admin gives without this form) and never another issuer's.
_PREFIX_RE = re.compile(r"^[A-Za-z0-9]{1,16}-\Z")
MAX_LEEWAY = 60.0
# What no stream of the application may capture: NATS's own, our command bus, replies.
_INTERNAL_SUBJECTS = ("$JS.>", "$KV.>", "$SYS.>", "$O.>", "$JSC.>", "cmd.>", "_INBOX.>")


class IssuerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """An external identity provider whose tokens are accepted like our own."""

    issuer: str  # the tokens' `iss`, exactly
    audience: str  # must be in the tokens' `aud`
    algorithms: list[Algorithm] = msgspec.field(default_factory=lambda: ["RS256"])
    jwks_url: str = ""  # one of jwks_url / jwks_file
    jwks_file: str = ""
    user_claim: str = "sub"  # the claim holding the user id
    user_prefix: str = ""  # prepended to it: keeps two issuers' ids apart
    default_role: str = ""  # a user without an auth_users record: "" = refused
    jwks_min_refresh: float = 30.0  # seconds between JWKS fetches caused by unknown kids
    jwks_max_age: float = 300.0  # keys older than this are fetched again before use
    leeway: float = 5.0


class Resources(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    buckets: dict[str, BucketSpec] = {}
    streams: dict[str, StreamSpec] = {}
    roles: dict[str, Capabilities] = {}
    issuers: dict[str, IssuerConfig] = {}


class ResourcesError(ValueError):
    """The resources file is invalid; the message names the entry."""


def path_of(settings: Settings) -> Path:
    return Path(settings.resources_file) if settings.resources_file else DEFAULT_FILE


def load(settings: Settings) -> Resources:
    return parse(path_of(settings).read_bytes(), settings, str(path_of(settings)))


def load_or_exit(settings: Settings) -> Resources:
    """`load` for a starting server: an unreadable or invalid file stops it, naming why."""
    try:
        return load(settings)
    except (OSError, ResourcesError) as e:
        raise SystemExit(f"invalid resources file: {e}") from None


def parse(data: bytes, settings: Settings, where: str = "resources") -> Resources:
    try:
        res = msgspec.convert(tomllib.loads(data.decode()), Resources)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, msgspec.ValidationError) as e:
        raise ResourcesError(f"{where}: {e}") from None
    try:
        _check(res, settings)
    except ResourcesError as e:
        raise ResourcesError(f"{where}: {e}") from None
    return res


def _check(res: Resources, settings: Settings) -> None:
    for name, b in res.buckets.items():
        if not is_nats_name(name) or name.startswith("auth_") or name == DURABLES_BUCKET:
            raise ResourcesError(f"buckets.{name}: not a bucket name of the application")
        if not 1 <= b.history <= 64:
            raise ResourcesError(f"buckets.{name}.history: 1 to 64")
        if b.marker_ttl is not None and b.marker_ttl < 1:
            raise ResourcesError(f"buckets.{name}.marker_ttl: at least 1 (seconds)")
    for name, s in res.streams.items():
        if not is_nats_name(name) or is_internal_stream(name):
            raise ResourcesError(f"streams.{name}: not a stream name of the application")
        if not s.subjects:
            raise ResourcesError(f"streams.{name}.subjects: at least one")
        for p in s.subjects:
            try:
                validate_pattern(p)
            except ValueError as e:
                raise ResourcesError(f"streams.{name}.subjects: {p!r}: {e}") from None
            if p.startswith("$") or any(overlaps(p, i) for i in _INTERNAL_SUBJECTS):
                raise ResourcesError(f"streams.{name}.subjects: {p!r} is internal")
    specs: list[BucketSpec | StreamSpec] = [*res.buckets.values(), *res.streams.values()]
    for spec in specs:
        for v in (spec.max_age, spec.max_bytes):
            if v is not None and v <= 0:
                raise ResourcesError("max_age and max_bytes are positive (or left out)")
        if spec.replicas is not None and not 1 <= spec.replicas <= 5:
            raise ResourcesError("replicas: 1 to 5")
    for name, caps in res.roles.items():
        if not ROLE_NAME_RE.fullmatch(name):
            raise ResourcesError(f"roles.{name}: 1-64 letters, digits, '_' or '-'")
        try:
            validate(caps)
        except CapabilityError as e:
            raise ResourcesError(f"roles.{name}: {e}") from None
    seen = {settings.jwt_issuer}
    for name, iss in res.issuers.items():
        where = f"issuers.{name}"
        if iss.issuer in seen:
            raise ResourcesError(f"{where}.issuer: {iss.issuer!r} is already trusted")
        seen.add(iss.issuer)
        if bool(iss.jwks_url) == bool(iss.jwks_file):
            raise ResourcesError(f"{where}: exactly one of jwks_url, jwks_file")
        if iss.jwks_url and not iss.jwks_url.startswith(("https://", "http://")):
            raise ResourcesError(f"{where}.jwks_url: http(s) only")
        if settings.production and iss.jwks_url and not iss.jwks_url.startswith("https://"):
            # Whoever is on the path could swap in keys of their own and sign any user.
            raise ResourcesError(f"{where}.jwks_url: https only in production")
        # The prefix keeps the issuer's users apart from ours and from other issuers': a
        # token must never name a local user (the admin's id is visible to members).
        if not _PREFIX_RE.fullmatch(iss.user_prefix):
            raise ResourcesError(
                f"{where}.user_prefix: letters or digits then '-', e.g. 'acme-' (required)"
            )
        for other, o in res.issuers.items():
            if other != name and o.user_prefix.startswith(iss.user_prefix):
                raise ResourcesError(f"{where}.user_prefix: a prefix of issuers.{other}'s")
        if not 0 <= iss.leeway <= MAX_LEEWAY:
            raise ResourcesError(f"{where}.leeway: 0 to {MAX_LEEWAY:g} seconds")
        if not iss.algorithms:
            raise ResourcesError(f"{where}.algorithms: at least one")
        if iss.default_role and iss.default_role not in res.roles:
            raise ResourcesError(f"{where}.default_role: no role {iss.default_role!r}")
        if iss.jwks_min_refresh < 1.0 or iss.jwks_max_age < iss.jwks_min_refresh:
            raise ResourcesError(f"{where}: jwks_min_refresh >= 1 and <= jwks_max_age")
