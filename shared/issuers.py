"""Tokens of external issuers (an IdP, an app's backend), verified with their JWKS, beside
our own (shared/auth.py). docs/auth.md describes the model and its security properties.

`Verifiers.check` routes a token by its (unverified) `iss`: a trusted external issuer's
string goes to that issuer's verifier, anything else to our own, which refuses foreign
issuers. The unverified peek only chooses which keys to verify with; every claim is
checked again after the signature.

An external token must name its key (`kid`) and use one of the issuer's algorithms, and
that algorithm must be the key's own (an RSA key never verifies an ES256 token). Keys are
fetched with aiohttp (URL) or read in a thread (file), so no fetch blocks the event loop;
fetches are serialised per issuer, keys older than `jwks_max_age` are fetched again before
use, and an unknown `kid` causes a fetch at most once per `jwks_min_refresh`: a flood of
made-up kids costs the IdP one request per interval, not one per token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import jwt

from shared.auth import MAX_TOKEN_LENGTH, Claims, TokenVerifier
from shared.errors import InvalidToken
from shared.resources import IssuerConfig, Resources
from shared.settings import Settings
from shared.users import USER_ID_RE

log = logging.getLogger("shared.issuers")

JWKS_MAX_BYTES = 256 * 1024
JWKS_FETCH_TIMEOUT = 5.0
# Header parameters that point at other keys or demand extensions: never followed.
_REFUSED_HEADER = frozenset({"jku", "x5u", "jwk", "x5c", "crit"})
_KEY_TYPES = frozenset({"RSA", "EC", "OKP"})  # never "oct": no shared secrets in a JWKS


class Jwks:
    """One issuer's keys by `kid`, fetched on demand (see the module's rate rules)."""

    def __init__(
        self,
        config: IssuerConfig,
        name: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config, self._name, self._clock = config, name, clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._tried_at: float | None = None  # last attempt, successful or not
        self._lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None
        self.fetches = 0  # attempts, for metrics and tests

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def key(self, kid: str) -> jwt.PyJWK:
        found = self._keys.get(kid)
        if found is not None and not self._stale():
            return found
        async with self._lock:  # one fetch at a time; waiters then see its result
            if self._stale() or (kid not in self._keys and self._may_retry()):
                await self._refresh()
        found = self._keys.get(kid)
        if found is None:
            raise InvalidToken("token key id (kid) unknown to its issuer")
        return found

    def _stale(self) -> bool:
        return (
            self._fetched_at is None
            or self._clock() - self._fetched_at >= self._config.jwks_max_age
        ) and self._may_retry()

    def _may_retry(self) -> bool:
        return (
            self._tried_at is None
            or self._clock() - self._tried_at >= self._config.jwks_min_refresh
        )

    async def _refresh(self) -> None:
        self._tried_at = self._clock()
        self.fetches += 1
        try:
            raw = await self._fetch()
            keys = parse_jwks(raw)
        except Exception as e:  # the IdP away or broken: keep the keys we have
            log.warning(
                "jwks fetch failed",
                extra={"event": "jwks_failed", "issuer": self._name, "error": repr(e)},
            )
            return
        self._keys, self._fetched_at = keys, self._clock()
        log.info(
            "jwks fetched",
            extra={"event": "jwks_fetched", "issuer": self._name, "kids": sorted(keys)},
        )

    async def _fetch(self) -> bytes:
        if self._config.jwks_file:
            return await asyncio.to_thread(Path(self._config.jwks_file).read_bytes)
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=JWKS_FETCH_TIMEOUT)
            )
        async with self._http.get(self._config.jwks_url, allow_redirects=False) as r:
            r.raise_for_status()
            # read(n) returns what has arrived so far: read to the end, bounded.
            body = bytearray()
            async for chunk in r.content.iter_chunked(16384):
                body += chunk
                if len(body) > JWKS_MAX_BYTES:
                    raise ValueError("JWKS too large")
            return bytes(body)


def parse_jwks(raw: bytes) -> dict[str, jwt.PyJWK]:
    """The signing keys of a JWKS document by kid; keys without a kid, of another use,
    of a symmetric type or that PyJWT cannot load are left out."""
    doc = json.loads(raw)
    out: dict[str, jwt.PyJWK] = {}
    for entry in doc["keys"]:
        if not isinstance(entry, dict):
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or entry.get("kty") not in _KEY_TYPES:
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            out[kid] = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            continue
    return out


def _segment(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def peek_issuer(token: str) -> str | None:
    """The `iss` of a token before any check (to choose its verifier), or None."""
    try:
        payload = _segment(token.split(".")[1])
    except Exception:
        return None
    iss = payload.get("iss") if isinstance(payload, dict) else None
    return iss if isinstance(iss, str) else None


class ExternalVerifier:
    def __init__(
        self,
        name: str,
        config: IssuerConfig,
        *,
        max_ttl: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name, self.config, self.max_ttl = name, config, max_ttl
        self.jwks = Jwks(config, name, clock=clock)

    async def verify(self, token: str) -> Claims:
        try:
            header = _segment(token.split(".")[0])
        except Exception:
            raise InvalidToken("token malformed") from None
        if not isinstance(header, dict):
            raise InvalidToken("token malformed")
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.config.algorithms:
            raise InvalidToken("token algorithm not accepted for its issuer")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("token key id (kid) missing")
        if header.keys() & _REFUSED_HEADER:
            raise InvalidToken("token header not accepted")
        key = await self.jwks.key(kid)
        if key.algorithm_name != alg:
            raise InvalidToken("token algorithm does not match its key")
        claim = self.config.user_claim
        try:
            payload = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=self.config.leeway,
                options={"require": ["exp", "iat", "iss", "aud", claim]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("token not yet valid") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("token signature invalid") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("token issuer not accepted") from None
        except jwt.MissingRequiredClaimError as e:
            raise InvalidToken(f"token claim missing: {e.claim}") from None
        except Exception:  # any other malformation: a 401 naming no library
            raise InvalidToken("token malformed") from None
        return self._claims(token, payload)

    def _claims(self, token: str, payload: dict[str, Any]) -> Claims:
        user = payload[self.config.user_claim]
        uid = self.config.user_prefix + user if isinstance(user, str) else ""
        if not USER_ID_RE.fullmatch(uid):
            raise InvalidToken("token user id not accepted (1-64 letters, digits or '-')")
        iat, exp = payload["iat"], payload["exp"]
        if not (isinstance(iat, int | float) and isinstance(exp, int | float)):
            raise InvalidToken("token claims malformed")
        if exp - iat > self.max_ttl:
            # A revocation (logout) is kept for TOKEN_TTL: a token living longer would
            # come back to life once its revocation expired.
            raise InvalidToken(f"token lifetime over {self.max_ttl} s not accepted")
        # A token id of our own namespace: `x` + hex never meets ours (token_urlsafe, 22
        # characters) nor the `user.` marks, and an IdP's jti (or the token itself, when
        # it has none) of any shape becomes one KV key token. Logout revokes it as ours.
        raw_jti = payload.get("jti")
        basis = raw_jti if isinstance(raw_jti, str) and raw_jti else token
        jti = "x" + hashlib.sha256(f"{self.name}\0{basis}".encode()).hexdigest()[:32]
        return Claims(sub=uid, jti=jti, iat=int(iat), exp=int(exp), source=self.name)


class Verifiers:
    """Our own verifier and those of the trusted external issuers."""

    def __init__(self, own: TokenVerifier, external: Sequence[ExternalVerifier] = ()) -> None:
        self.own = own
        self.external = {v.config.issuer: v for v in external}
        self.by_name = {v.name: v for v in external}

    @classmethod
    def from_settings(cls, settings: Settings, resources: Resources) -> Verifiers:
        return cls(
            TokenVerifier.from_settings(settings),
            [
                ExternalVerifier(name, c, max_ttl=settings.token_ttl)
                for name, c in resources.issuers.items()
            ],
        )

    def verify(self, token: str) -> Claims:
        """Our own tokens only, synchronously (tests and tools that hold one)."""
        return self.own.verify(token)

    async def check(self, token: str) -> Claims:
        """Verified claims of our own or a trusted issuer's token, or InvalidToken."""
        if self.external and isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_LENGTH:
            iss = peek_issuer(token)
            ext = self.external.get(iss or "")
            if ext is not None:
                return await ext.verify(token)
            if iss is not None and iss != self.own.issuer:
                # Said as such, rather than whatever of ours the foreign token fails first.
                raise InvalidToken("token issuer not accepted")
        return self.own.verify(token)

    async def close(self) -> None:
        for v in self.external.values():
            await v.jwks.close()
