"""JWT issue (http_api) and verification (ws_gateway) with Ed25519 (EdDSA).

Verification pins the algorithm, issuer and audience, requires every claim we issue and
refuses header parameters that point at other keys (`jku`, `x5u`, `jwk`, `kid`) or carry
extensions we do not understand (`crit`).

`TokenVerifier.verify` decodes the compact JWS once and checks what `jwt.decode` checks with
our options (same base64url strictness, same JSON parser, same claim rules; tests compare
the two on crafted tokens), then the Ed25519 signature. Tokens that verified are remembered
by their exact string (at most `VERIFIED_CACHE_ENTRIES`, oldest dropped first) and answered
from memory only while before their `exp`; from `exp` on, the full check decides (leeway
included). Revocation is checked by the callers on every use, never here.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import InvalidToken
from shared.settings import Settings

ALGORITHM = "EdDSA"
MAX_TOKEN_LENGTH = 4096
_REQUIRED = ["sub", "jti", "iat", "exp", "iss", "aud"]
_ALLOWED_HEADER = frozenset({"alg", "typ"})
VERIFIED_CACHE_ENTRIES = 10_000  # per TokenVerifier; each entry is one token we issued
# header.payload.signature: base64url, each optionally followed by its exact padding
_B64 = r"([A-Za-z0-9_-]*)(={0,2})"
_COMPACT = re.compile(rf"{_B64}\.{_B64}\.{_B64}")


def bearer_token(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None when malformed. Both
    processes parse the header with this one function."""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


@dataclass(frozen=True, slots=True)
class Claims:
    sub: str
    jti: str
    iat: int
    exp: int
    # "" for our own tokens, else the name of the external issuer that signed it
    # (shared/issuers.py): its `default_role` decides about users without a record.
    source: str = ""


def session_cookie_name(settings: Settings) -> str:
    """The session cookie's name, for the API (sets it) and the gateway (reads it).

    With `COOKIE_SECURE` it is `__Host-session`: browsers accept that name only with Secure,
    Path=/ and no Domain, so a sibling subdomain cannot plant (toss) a session of its own.
    """
    return "__Host-session" if settings.cookie_secure else "session"


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 by open(2) itself: no moment at which another local user could open it.
    # A leftover from a crashed run is removed first, and O_EXCL refuses whatever appears
    # at the path meanwhile (a symlink included), so an fd opened earlier on an old, more
    # readable file never sees the new key.
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def ensure_dev_keys(settings: Settings) -> None:
    """Generate a dev key pair on first use (never in production)."""
    priv, pub = settings.private_key_path, settings.public_key_path
    if priv.exists() and pub.exists():
        return
    if settings.production:
        raise SystemExit(f"JWT key files are missing: {priv}, {pub}")
    priv.parent.mkdir(parents=True, exist_ok=True)
    # Every process of a fresh dev deployment gets here at once: one of them creates the
    # pair while the others wait, so no process is left holding half of another's pair.
    with open(priv.parent / f".{priv.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if priv.exists() and pub.exists():
            return
        key = Ed25519PrivateKey.generate()
        tmp = priv.with_suffix(".tmp")
        _write_private(
            tmp,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        pub_tmp = pub.with_name(pub.name + ".tmp")
        pub_tmp.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        pub_tmp.replace(pub)
        tmp.replace(priv)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SystemExit(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise SystemExit(f"{path} is not an Ed25519 public key")
    return key


class TokenIssuer:
    def __init__(self, key: Ed25519PrivateKey, issuer: str, audience: str, ttl: int) -> None:
        self._key, self._iss, self._aud, self.ttl = key, issuer, audience, ttl

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenIssuer:
        ensure_dev_keys(settings)
        return cls(
            load_private_key(settings.private_key_path),
            settings.jwt_issuer,
            settings.jwt_audience,
            settings.token_ttl,
        )

    def issue(
        self,
        user_id: str,
        *,
        now: float | None = None,
        ttl: int | None = None,
    ) -> tuple[str, Claims]:
        iat = int(now if now is not None else time.time())
        claims = Claims(
            sub=user_id,
            jti=secrets.token_urlsafe(16),
            iat=iat,
            exp=iat + (self.ttl if ttl is None else ttl),
        )
        token = jwt.encode(
            {
                "sub": claims.sub,
                "jti": claims.jti,
                "iat": claims.iat,
                "exp": claims.exp,
                "iss": self._iss,
                "aud": self._aud,
            },
            self._key,
            algorithm=ALGORITHM,
            headers={"typ": "JWT"},
        )
        return token, claims


def _b64url(data: str, pad: str) -> bytes:
    """A base64url segment as PyJWT accepts it: canonical (unused bits zero), and padded
    either not at all or exactly to a multiple of 4. `data` is already in the alphabet."""
    n = len(data)
    if n % 4 == 1 or (pad and (n + len(pad)) % 4):
        raise InvalidToken("token malformed")
    raw = base64.urlsafe_b64decode(data + "=" * (-n % 4))
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != data.encode("ascii"):
        raise InvalidToken("token malformed")
    return raw


def _as_int(value: Any) -> int:
    """`int(value)` as PyJWT applies it to iat, nbf and exp before comparing them."""
    try:
        return int(value)
    except (ValueError, TypeError, OverflowError):
        raise InvalidToken("token claims malformed") from None


class TokenVerifier:
    def __init__(
        self,
        key: Ed25519PublicKey,
        issuer: str,
        audience: str,
        leeway: float = 5.0,
        *,
        cache_entries: int = VERIFIED_CACHE_ENTRIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key, self._iss, self._aud, self._leeway = key, issuer, audience, leeway
        self._clock, self._cache_entries = clock, cache_entries
        # token -> (claims, max(iat, nbf), exp); insertion order is age
        self._cache: dict[str, tuple[Claims, int, int]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        ensure_dev_keys(settings)
        return cls(
            load_public_key(settings.public_key_path),
            settings.jwt_issuer,
            settings.jwt_audience,
            settings.jwt_leeway,
        )

    @property
    def issuer(self) -> str:
        return self._iss

    @property
    def cached(self) -> int:
        """How many verified tokens are remembered."""
        return len(self._cache)

    def verify(self, token: str) -> Claims:
        """Verified claims, or InvalidToken with a loggable reason."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("token missing or too long")
        now = self._clock()
        hit = self._cache.get(token)
        if hit is not None:
            claims, not_before, exp = hit
            # Strictly before exp (the leeway after it is left to the full check below),
            # and the same not-before rule as the full check.
            if now < exp and exp > now - self._leeway and not_before <= now + self._leeway:
                return claims
            del self._cache[token]
        try:
            claims, not_before = self._verify(token, now)
        except InvalidToken:
            raise
        except Exception:  # any malformed input is a 401, never a 500, and names no library
            raise InvalidToken("token malformed") from None
        if now < claims.exp and self._cache_entries > 0:
            while len(self._cache) >= self._cache_entries:
                del self._cache[next(iter(self._cache))]
            self._cache[token] = (claims, not_before, claims.exp)
        return claims

    def _verify(self, token: str, now: float) -> tuple[Claims, int]:
        """The claims and their not-before time, checked as `jwt.decode` does with
        algorithms=[ALGORITHM], our audience, issuer and leeway, and require=_REQUIRED."""
        parts = _COMPACT.fullmatch(token)
        if parts is None:
            raise InvalidToken("token malformed")
        header = json.loads(_b64url(parts[1], parts[2]))
        if (
            not isinstance(header, dict)
            or header.get("alg") != ALGORITHM
            or not header.keys() <= _ALLOWED_HEADER
        ):
            raise InvalidToken("token header not accepted")
        payload_raw = _b64url(parts[3], parts[4])
        signature = _b64url(parts[5], parts[6])
        try:
            self._key.verify(signature, token[: parts.end(4)].encode("ascii"))
        except InvalidSignature:
            raise InvalidToken("token signature invalid") from None
        payload = json.loads(payload_raw)
        if not isinstance(payload, dict):
            raise InvalidToken("token malformed")
        return self._check_claims(payload, now)

    def _check_claims(self, payload: dict[str, Any], now: float) -> tuple[Claims, int]:
        # PyJWT's order: required claims, iat, nbf, exp, iss, aud, sub, jti.
        for name in _REQUIRED:
            if payload.get(name) is None:
                raise InvalidToken(f"token claim missing: {name}")
        not_before = _as_int(payload["iat"])
        if not_before > now + self._leeway:
            raise InvalidToken("token not yet valid")
        if "nbf" in payload:
            nbf = _as_int(payload["nbf"])
            if nbf > now + self._leeway:
                raise InvalidToken("token not yet valid")
            not_before = max(not_before, nbf)
        if _as_int(payload["exp"]) <= now - self._leeway:
            raise InvalidToken("token expired")
        iss = payload["iss"]
        if not isinstance(iss, str) or iss != self._iss:
            raise InvalidToken("token issuer not accepted")
        aud = payload["aud"]
        if not aud:
            raise InvalidToken("token claim missing: aud")
        if isinstance(aud, str):
            aud = [aud]
        if (
            not isinstance(aud, list)
            or not all(isinstance(a, str) for a in aud)
            or self._aud not in aud
        ):
            raise InvalidToken("token audience not accepted")
        sub, jti, iat, exp = (payload[k] for k in ("sub", "jti", "iat", "exp"))
        if not (
            isinstance(sub, str)
            and sub
            and isinstance(jti, str)
            and jti
            and type(iat) is int
            and type(exp) is int
        ):
            raise InvalidToken("token claims malformed")
        return Claims(sub=sub, jti=jti, iat=iat, exp=exp), not_before
