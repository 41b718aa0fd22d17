"""External issuers (shared/issuers.py) against a real local IdP on loopback: key rotation,
the bounded refetch on unknown kids, and every forgery refused with its reason."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared import resources
from shared.auth import TokenIssuer, TokenVerifier
from shared.errors import InvalidToken
from shared.issuers import ExternalVerifier, Verifiers, parse_jwks
from shared.resources import IssuerConfig, ResourcesError
from shared.settings import load
from tests.idp import AUDIENCE, ISSUER, Idp

MIN_REFRESH = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _verifier(idp: Idp, clock: Clock, **kw: object) -> ExternalVerifier:
    config = IssuerConfig(
        issuer=ISSUER,
        audience=AUDIENCE,
        algorithms=["RS256", "ES256"],
        jwks_url=idp.jwks_url,
        user_prefix="idp-",
        jwks_min_refresh=MIN_REFRESH,
        **kw,  # type: ignore[arg-type]
    )
    return ExternalVerifier("testidp", config, max_ttl=3600, clock=clock)


async def _reason(v: ExternalVerifier | Verifiers, token: str) -> str:
    with pytest.raises(InvalidToken) as e:
        await (v.check(token) if isinstance(v, Verifiers) else v.verify(token))
    return str(e.value)


async def test_rs256_and_es256_tokens_verify_into_prefixed_claims(idp: Idp) -> None:
    v = _verifier(idp, Clock())
    try:
        for kid in ("rsa-1", "ec-1"):
            claims = await v.verify(idp.sign("alice", kid))
            assert (claims.sub, claims.source) == ("idp-alice", "testidp")
            assert claims.jti.startswith("x") and "." not in claims.jti
        assert idp.fetches == 1  # both keys from one fetch
    finally:
        await v.jwks.close()


async def test_rotation_new_kid_fetched_removed_kid_refused_flood_bounded(idp: Idp) -> None:
    """A new kid is fetched at once (the first unknown kid since the last fetch); the
    removed kid is refused after that fetch; 200 made-up kids within one interval cost no
    fetch, and one per interval afterwards."""
    clock = Clock()
    v = _verifier(idp, clock)
    try:
        old = idp.sign("alice", "rsa-1")
        assert (await v.verify(old)).sub == "idp-alice"
        assert idp.fetches == 1
        clock.now += MIN_REFRESH  # the rotation happens later than one interval
        idp.add_key("rsa-2", "RS256")
        idp.published.discard("rsa-1")
        assert (await v.verify(idp.sign("bob", "rsa-2"))).sub == "idp-bob"
        assert idp.fetches == 2
        assert await _reason(v, old) == "token key id (kid) unknown to its issuer"
        assert idp.fetches == 2  # within the interval: no fetch for it
        flood = [idp.sign("mallory", "rsa-2", headers={"kid": f"nope-{i}"}) for i in range(200)]
        for token in flood:
            assert await _reason(v, token) == "token key id (kid) unknown to its issuer"
        assert idp.fetches == 2
        clock.now += MIN_REFRESH
        for token in flood[:50]:
            await _reason(v, token)
        assert idp.fetches == 3  # one per interval, however many unknown kids
    finally:
        await v.jwks.close()


async def test_keys_past_max_age_are_fetched_again_before_use(idp: Idp) -> None:
    clock = Clock()
    v = _verifier(idp, clock, jwks_max_age=60.0)
    try:
        token = idp.sign("alice", "ec-1")
        await v.verify(token)
        idp.published.discard("ec-1")  # removed at the IdP; known kid here
        clock.now += 59
        assert (await v.verify(token)).sub == "idp-alice"
        clock.now += 1
        assert await _reason(v, token) == "token key id (kid) unknown to its issuer"
        assert idp.fetches == 2
    finally:
        await v.jwks.close()


async def test_idp_down_keeps_the_keys_it_had() -> None:
    """Past jwks_max_age with the IdP gone, the fetch fails and the keys fetched before
    still verify (an IdP outage does not log everyone out); the attempt is counted."""
    clock = Clock()
    down = Idp()
    down.add_key("rsa-1", "RS256")
    async with down.running():
        v = _verifier(down, clock, jwks_max_age=60.0)
        token = down.sign("alice", "rsa-1")
        await v.verify(token)
    try:
        clock.now += 61
        assert (await v.verify(token)).sub == "idp-alice"
        assert (down.fetches, v.jwks.fetches) == (1, 2)  # tried, and failed
    finally:
        await v.jwks.close()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _raw(header: dict[str, object], payload: dict[str, object], sig: bytes = b"x") -> str:
    return ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()), _b64(sig)]
    )


def forgeries(idp: Idp) -> list[tuple[str, str, str]]:
    """(name, token, reason) of tokens of the IdP's issuer that must be refused."""
    now = int(time.time())
    good = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
    rsa_pub = idp.keys["rsa-1"][1].public_key()
    pem = rsa_pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    valid = idp.sign("alice", "rsa-1")
    h, p, s = valid.split(".")
    flipped = s[:-2] + ("A" if s[-2] != "A" else "B") + s[-1]
    tampered = _b64(json.dumps({**good, "sub": "admin"}).encode())
    other = Idp()
    other.add_key("rsa-1", "RS256")  # same kid, another key
    hs = jwt.encode(good, pem.decode()[:64], algorithm="HS256", headers={"kid": "rsa-1"})
    out = [
        ("alg none", _raw({"alg": "none", "kid": "rsa-1"}, good, b""), "not accepted"),
        ("alg None", _raw({"alg": "None", "kid": "rsa-1"}, good, b""), "not accepted"),
        ("HS256 with the public key", hs, "not accepted"),
        ("RS512", idp.sign("alice", "rsa-1", alg="RS512"), "not accepted"),
        ("ES256 claimed on the RSA key", _raw({"alg": "ES256", "kid": "rsa-1"}, good), "match"),
        ("RS256 claimed on the EC key", _raw({"alg": "RS256", "kid": "ec-1"}, good), "match"),
        ("another key, same kid", other.sign("alice", "rsa-1"), "signature invalid"),
        ("flipped signature", f"{h}.{p}.{flipped}", "signature invalid"),
        ("empty signature", f"{h}.{p}.", "signature invalid"),
        ("tampered payload", f"{h}.{tampered}.{s}", "signature invalid"),
        ("no kid", _raw({"alg": "RS256"}, good), "kid) missing"),
        ("unknown kid", idp.sign("alice", "rsa-1", headers={"kid": "zz"}), "kid) unknown"),
        ("wrong audience", idp.sign("alice", "rsa-1", claims={"aud": "other"}), "audience"),
        ("other issuer", idp.sign("alice", "rsa-1", claims={"iss": "https://x/"}), "issuer"),
        ("expired", idp.sign("alice", "rsa-1", claims={"exp": now - 60}), "expired"),
        ("nbf in the future", idp.sign("alice", "rsa-1", claims={"nbf": now + 600}), "yet"),
        ("iat in the future", idp.sign("alice", "rsa-1", claims={"iat": now + 600}), "yet"),
        ("no exp", idp.sign("alice", "rsa-1", claims={"exp": None}), "missing: exp"),
        ("no sub", idp.sign("alice", "rsa-1", claims={"sub": None}), "missing: sub"),
        ("sub with a dot", idp.sign("a.b", "rsa-1"), "user id not accepted"),
        ("sub with _", idp.sign("a_b", "rsa-1"), "user id not accepted"),
        ("sub a number", idp.sign("x", "rsa-1", claims={"sub": 7}), "malformed"),
        ("not JSON", "eyJhbGciOi.eyJpc3Mi.AAAA", "malformed"),
    ]
    for param in ("jku", "x5u", "jwk", "x5c", "crit"):
        value: object = ["exp"] if param == "crit" else "https://evil.test/k"
        out.append(
            (f"header {param}", idp.sign("alice", "rsa-1", headers={param: value}), "header")
        )
    return out


async def test_every_forgery_is_refused_with_its_reason(idp: Idp) -> None:
    v = _verifier(idp, Clock())
    cases = forgeries(idp)
    try:
        reasons = {name: await _reason(v, token) for name, token, _ in cases}
    finally:
        await v.jwks.close()
    assert {name: reasons[name] for name, _, want in cases if want not in reasons[name]} == {}


def test_jwks_drops_symmetric_foreign_and_unusable_keys() -> None:
    doc = {
        "keys": [
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB"},  # no kid
            {"kty": "EC", "kid": "broken", "crv": "P-256", "x": "AA", "y": "AA"},
            "not an object",
        ]
    }
    assert parse_jwks(json.dumps(doc).encode()) == {}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('algorithms = ["HS256"]\njwks_url = "https://x/"', "algorithms"),
        ('algorithms = ["none"]\njwks_url = "https://x/"', "algorithms"),
        ('jwks_url = "https://x/"\njwks_file = "/k"', "exactly one"),
        ("", "exactly one"),
        ('jwks_url = "file:///etc/passwd"', "http(s) only"),
        ('jwks_url = "https://x/"\ndefault_role = "ghost"', "no role"),
        ('jwks_url = "https://x/"\njwks_min_refresh = 0.01', "jwks_min_refresh"),
        ('jwks_url = "https://x/"\nissuer_typo = 1', "unknown field"),
        ('jwks_url = "https://x/"\nleeway = 1e9', "leeway"),
    ],
)
def test_resources_file_refuses_unsafe_issuers(section: str, message: str) -> None:
    data = f'[issuers.x]\nissuer = "https://i/"\naudience = "a"\nuser_prefix = "x-"\n{section}\n'
    with pytest.raises(ResourcesError) as e:
        resources.parse(data.encode(), load({}))
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("prefixes", "message"),
    [
        ([""], "required"),  # an IdP's `sub` could be a local id, the admin's included
        (["a_b."], "required"),
        (["idp"], "required"),
        (["a-", "a-b-"], "a prefix of issuers.i1's"),  # i1's b-bob would be i0's bob
    ],
)
def test_every_issuer_has_a_prefix_of_its_own(prefixes: list[str], message: str) -> None:
    data = "".join(
        f'[issuers.i{n}]\nissuer = "https://i{n}/"\naudience = "a"\n'
        f'jwks_url = "https://x/"\nuser_prefix = "{p}"\n'
        for n, p in enumerate(prefixes)
    )
    with pytest.raises(ResourcesError) as e:
        resources.parse(data.encode(), load({}))
    assert message in str(e.value)


def test_production_takes_jwks_over_https_only() -> None:
    data = (
        b'[issuers.x]\nissuer = "https://i/"\naudience = "a"\nuser_prefix = "x-"\n'
        b'jwks_url = "http://idp.example/jwks"\n'
    )
    resources.parse(data, load({}))  # dev: a local IdP over http is fine
    with pytest.raises(ResourcesError, match="https only in production"):
        resources.parse(data, load({"APP_ENV": "production"}))


@pytest.mark.parametrize("subject", ["*.>", ">", "*.articles.>", "_INBOX.x", "$FOO.x"])
def test_no_stream_may_capture_an_internal_subject(subject: str) -> None:
    data = f'[streams.s]\nsubjects = ["{subject}"]\n'.encode()
    with pytest.raises(ResourcesError, match="is internal"):
        resources.parse(data, load({}))


def test_role_names_are_checked_where_they_are_declared() -> None:
    with pytest.raises(ResourcesError, match=r"roles\.a b"):
        resources.parse(b'[roles."a b"]\ncommands = ["chat.send"]\n', load({}))


async def test_a_token_living_longer_than_token_ttl_is_refused(idp: Idp) -> None:
    """Logout keeps a revocation for TOKEN_TTL: a token living longer would come back to
    life after it, so the IdP's tokens may live at most that long (here 3600 s)."""
    v = _verifier(idp, Clock())
    try:
        assert (await v.verify(idp.sign("alice", "rsa-1", ttl=3600))).sub == "idp-alice"
        reason = await _reason(v, idp.sign("alice", "rsa-1", ttl=3601))
        assert reason == "token lifetime over 3600 s not accepted"
    finally:
        await v.jwks.close()


def test_our_own_issuer_cannot_be_declared_external() -> None:
    data = b'[issuers.x]\nissuer = "natsgate"\naudience = "a"\njwks_url = "https://x/"\n'
    with pytest.raises(ResourcesError, match="already trusted"):
        resources.parse(data, load({}))


def test_the_demo_file_is_valid_and_declares_the_demo_set(tmp_path: Path) -> None:
    res = resources.load(load({}))
    assert set(res.buckets) == {"articles", "todos", "presence"}
    assert set(res.streams) == {"chat", "audit"}
    assert set(res.roles) == {"member", "reader"}
    assert res.issuers == {}


async def test_tokens_are_routed_by_issuer_and_a_foreign_one_is_named(idp: Idp) -> None:
    key = Ed25519PrivateKey.generate()
    own = TokenVerifier(key.public_key(), "natsgate", "natsgate")
    verifiers = Verifiers(own, [_verifier(idp, Clock())])
    try:
        ours, _ = TokenIssuer(key, "natsgate", "natsgate", 60).issue("u1")
        assert (await verifiers.check(ours)).source == ""
        assert (await verifiers.check(idp.sign("bob", "ec-1"))).source == "testidp"
        foreign = idp.sign("bob", "rsa-1", claims={"iss": "https://other.test/"})
        assert await _reason(verifiers, foreign) == "token issuer not accepted"
    finally:
        await verifiers.close()


async def test_a_jwks_arriving_in_pieces_is_read_whole(idp: Idp) -> None:
    """A JWKS sent in two writes: read to its end (reading what had arrived cut it at the
    first piece, and every kid was then unknown)."""
    idp.in_pieces = True
    v = _verifier(idp, Clock())
    try:
        assert (await v.verify(idp.sign("alice", "ec-1"))).sub == "idp-alice"
        assert idp.fetches == 1
    finally:
        await v.jwks.close()
