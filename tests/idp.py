"""A local identity provider for the tests: an aiohttp app on loopback serving a JWKS
(counting its fetches) and signing RS256 and ES256 tokens with the keys it publishes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

ISSUER = "https://idp.test/"
AUDIENCE = "natsgate-app"
JWKS_PATH = "/.well-known/jwks.json"


def new_key(alg: str) -> PrivateKeyTypes:
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


class Idp:
    def __init__(self) -> None:
        self.keys: dict[str, tuple[str, Any]] = {}  # kid -> (alg, private key)
        self.published: set[str] = set()
        self.fetches = 0
        self.url = ""
        # Send the JWKS in two writes, the second a moment later: as a large document
        # arrives from a real IdP (a reader must not stop at the first piece).
        self.in_pieces = False

    def add_key(self, kid: str, alg: str, *, publish: bool = True) -> None:
        self.keys[kid] = (alg, new_key(alg))
        if publish:
            self.published.add(kid)

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid in sorted(self.published):
            alg, key = self.keys[kid]
            algo = jwt.get_algorithm_by_name(alg)
            jwk = json.loads(algo.to_jwk(key.public_key()))
            out.append({**jwk, "kid": kid, "use": "sig"})
        return {"keys": out}

    def sign(
        self,
        sub: str,
        kid: str,
        *,
        ttl: int = 300,
        claims: dict[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
        alg: str | None = None,
    ) -> str:
        key_alg, key = self.keys[kid]
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": sub,
            "iat": now,
            "exp": now + ttl,
            "jti": f"j-{sub}-{now}-{len(self.keys)}",
        }
        payload.update(claims or {})
        return jwt.encode(
            {k: v for k, v in payload.items() if v is not None},
            key,
            algorithm=alg or key_alg,
            headers={"kid": kid, **(headers or {})},
        )

    @property
    def jwks_url(self) -> str:
        return self.url + JWKS_PATH

    async def _serve_jwks(self, request: web.Request) -> web.StreamResponse:
        self.fetches += 1
        if not self.in_pieces:
            return web.json_response(self.jwks())
        body = json.dumps(self.jwks()).encode()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[:100])
        await asyncio.sleep(0.05)  # not a wait for anything: the second piece comes later
        await resp.write(body[100:])
        await resp.write_eof()
        return resp

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Idp]:
        app = web.Application()
        app.router.add_get(JWKS_PATH, self._serve_jwks)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            await runner.cleanup()


def resources_file(path: Path, idp: Idp, *, default_role: str = "member", extra: str = "") -> Path:
    """The demo resources file plus an issuer section trusting `idp`."""
    demo = (Path(__file__).resolve().parents[1] / "deploy" / "resources.toml").read_text()
    role = f'default_role = "{default_role}"\n' if default_role else ""
    path.write_text(
        demo
        + f"""
[issuers.testidp]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
algorithms = ["RS256", "ES256"]
jwks_url = "{idp.jwks_url}"
user_prefix = "idp-"
{role}{extra}"""
    )
    return path


@pytest.fixture
async def idp() -> AsyncIterator[Idp]:
    """A running IdP publishing an RS256 key `rsa-1` and an ES256 key `ec-1`."""
    p = Idp()
    p.add_key("rsa-1", "RS256")
    p.add_key("ec-1", "ES256")
    async with p.running():
        yield p
