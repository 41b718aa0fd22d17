"""Token verification cost per handshake: our own EdDSA tokens against an external
issuer's RS256 and ES256 tokens (keys already fetched; no verified-token cache).

    .venv/bin/python bench/verify.py [rounds per batch]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shared.auth import TokenIssuer, TokenVerifier
from shared.issuers import ExternalVerifier, parse_jwks
from shared.resources import IssuerConfig
from tests.idp import AUDIENCE, ISSUER, Idp

BATCHES = 7  # the best batch is reported (timeit's rule: the others measure the machine's load)


def per_call_us(rounds: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(BATCHES):
        t0 = time.perf_counter()
        for _ in range(rounds):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / rounds * 1e6


async def per_await_us(rounds: int, fn: Callable[[], Awaitable[object]]) -> float:
    best = float("inf")
    for _ in range(BATCHES):
        t0 = time.perf_counter()
        for _ in range(rounds):
            await fn()
        best = min(best, time.perf_counter() - t0)
    return best / rounds * 1e6


async def main(rounds: int) -> None:
    key = Ed25519PrivateKey.generate()
    own = TokenVerifier(key.public_key(), "natsgate", "natsgate", cache_entries=0)
    token, _ = TokenIssuer(key, "natsgate", "natsgate", 3600).issue("alice")
    print(f"EdDSA (own)     {per_call_us(rounds, lambda: own.verify(token)):7.1f} µs")
    idp = Idp()
    for alg in ("RS256", "ES256"):
        idp.add_key(alg, alg)
    config = IssuerConfig(
        issuer=ISSUER, audience=AUDIENCE, algorithms=["RS256", "ES256"], jwks_file="/unused"
    )
    ext = ExternalVerifier("bench", config, max_ttl=3600)
    ext.jwks._keys = parse_jwks(json.dumps(idp.jwks()).encode())
    ext.jwks._fetched_at = ext.jwks._tried_at = time.monotonic()
    for alg in ("RS256", "ES256"):
        tok = idp.sign("alice", alg)
        us = await per_await_us(rounds, lambda t=tok: ext.verify(t))  # type: ignore[misc]
        print(f"{alg} (external) {us:7.1f} µs")
    print(f"(PyJWT {jwt.__version__}; best of {BATCHES} batches of {rounds})")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 500))
