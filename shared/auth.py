"""JWT issue (http_api) and verification (ws_gateway) with Ed25519 (EdDSA).

Verification pins the algorithm, issuer and audience, requires every claim we issue and
refuses header parameters that point at other keys (`jku`, `x5u`, `jwk`, `kid`) or carry
extensions we do not understand (`crit`).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import InvalidToken
from shared.settings import Settings

ALGORITHM = "EdDSA"
MAX_TOKEN_LENGTH = 4096
_REQUIRED = ["sub", "jti", "iat", "exp", "iss", "aud"]
_ALLOWED_HEADER = frozenset({"alg", "typ"})


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


class TokenVerifier:
    def __init__(
        self, key: Ed25519PublicKey, issuer: str, audience: str, leeway: float = 5.0
    ) -> None:
        self._key, self._iss, self._aud, self._leeway = key, issuer, audience, leeway

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        ensure_dev_keys(settings)
        return cls(
            load_public_key(settings.public_key_path),
            settings.jwt_issuer,
            settings.jwt_audience,
            settings.jwt_leeway,
        )

    def verify(self, token: str) -> Claims:
        """Verified claims, or InvalidToken with a loggable reason."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("token missing or too long")
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != ALGORITHM or not set(header) <= _ALLOWED_HEADER:
                raise InvalidToken("token header not accepted")
            payload = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                audience=self._aud,
                issuer=self._iss,
                leeway=self._leeway,
                options={"require": _REQUIRED, "verify_signature": True},
            )
        except InvalidToken:
            raise
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except Exception as e:  # any malformed input is a 401, never a 500
            raise InvalidToken(f"token rejected: {type(e).__name__}") from None
        sub, jti, iat, exp = (payload.get(k) for k in ("sub", "jti", "iat", "exp"))
        if not (
            isinstance(sub, str)
            and sub
            and isinstance(jti, str)
            and jti
            and type(iat) is int
            and type(exp) is int
        ):
            raise InvalidToken("token claims malformed")
        return Claims(sub=sub, jti=jti, iat=iat, exp=exp)
