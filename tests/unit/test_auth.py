"""JWT issue/verify with Ed25519, the forged tokens it must refuse, and dev key creation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import multiprocessing
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.auth import (
    MAX_TOKEN_LENGTH,
    Claims,
    TokenIssuer,
    TokenVerifier,
    ensure_dev_keys,
    load_private_key,
    load_public_key,
    session_cookie_name,
)
from shared.errors import InvalidToken
from shared.settings import load

ISS, AUD = "natsgate", "natsgate"
KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
PUB_PEM = KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
PUB_RAW = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def seg(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    c: dict[str, Any] = {
        "sub": "u1",
        "jti": "j1",
        "iat": now,
        "exp": now + 600,
        "iss": ISS,
        "aud": AUD,
    }
    for k, v in over.items():
        if v is ...:
            c.pop(k)
        else:
            c[k] = v
    return c


def ed_sign(header: dict[str, Any], payload: dict[str, Any], key: Ed25519PrivateKey = KEY) -> str:
    """A token signed with a real Ed25519 key over hand-built header and payload."""
    signing_input = f"{seg(header)}.{seg(payload)}"
    return f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"


def ed_sign_raw(header: dict[str, Any], payload: bytes) -> str:
    """A correctly signed token whose payload segment holds arbitrary bytes."""
    signing_input = f"{seg(header)}.{b64url(payload)}"
    return f"{signing_input}.{b64url(KEY.sign(signing_input.encode()))}"


def hs_sign(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{seg(header)}.{seg(payload)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer(KEY, ISS, AUD, ttl=600)


@pytest.fixture
def verifier() -> TokenVerifier:
    return TokenVerifier(KEY.public_key(), ISS, AUD, leeway=5.0)


# -------------------------------------------------------------------------- round trip


def test_issue_then_verify_round_trip(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    """A token from TokenIssuer verifies to exactly the claims it was issued with."""
    token, issued = issuer.issue("user-1")
    assert isinstance(issued, Claims)
    assert issued.sub == "user-1"
    assert issued.exp - issued.iat == 600
    assert abs(issued.iat - time.time()) < 5
    assert verifier.verify(token) == issued
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "typ": "JWT"}


def test_each_token_has_a_fresh_jti(issuer: TokenIssuer) -> None:
    """Two tokens for the same user at the same second differ by jti (revocation key)."""
    now = time.time()
    (_, a), (_, b) = issuer.issue("u", now=now), issuer.issue("u", now=now)
    assert a.jti != b.jti and len(a.jti) >= 16


def test_issue_honours_now_and_ttl(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    """issue(now=, ttl=) sets iat/exp from them."""
    now = time.time()
    token, c = issuer.issue("u", now=now, ttl=30)
    assert (c.iat, c.exp) == (int(now), int(now) + 30)
    assert verifier.verify(token).exp == int(now) + 30


def test_hand_built_valid_token_is_accepted(verifier: TokenVerifier) -> None:
    """The forging helpers build acceptable tokens when nothing is wrong (controls the tests)."""
    assert verifier.verify(ed_sign({"alg": "EdDSA", "typ": "JWT"}, claims())).sub == "u1"
    assert verifier.verify(ed_sign({"alg": "EdDSA"}, claims())).jti == "j1"


def test_expiry_leeway_boundary(issuer: TokenIssuer, verifier: TokenVerifier) -> None:
    """A token expired within the leeway still verifies; beyond it, it does not."""
    now = time.time()
    within, _ = issuer.issue("u", now=now - 100, ttl=98)  # expired 2 s ago, leeway 5 s
    assert verifier.verify(within).sub == "u"
    beyond, _ = issuer.issue("u", now=now - 100, ttl=80)  # expired 20 s ago
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(beyond)


# -------------------------------------------------------------------------- forgeries


def tampered_payload() -> str:
    token = ed_sign({"alg": "EdDSA", "typ": "JWT"}, claims())
    h, _, s = token.split(".")
    return f"{h}.{seg(claims(sub='admin'))}.{s}"


def swapped_signature() -> str:
    a = ed_sign({"alg": "EdDSA"}, claims(sub="u1")).split(".")
    b = ed_sign({"alg": "EdDSA"}, claims(sub="admin")).split(".")
    return f"{b[0]}.{b[1]}.{a[2]}"


EDDSA = {"alg": "EdDSA", "typ": "JWT"}
HS = {"alg": "HS256", "typ": "JWT"}

FORGED: list[Any] = [
    # alg none, in any spelling, unsigned or with a junk signature
    pytest.param(f"{seg({'alg': 'none', 'typ': 'JWT'})}.{seg(claims())}.", id="alg-none"),
    pytest.param(f"{seg({'alg': 'None'})}.{seg(claims())}.", id="alg-None"),
    pytest.param(f"{seg({'alg': 'NONE'})}.{seg(claims())}.", id="alg-NONE"),
    pytest.param(f"{seg({'alg': 'nOnE'})}.{seg(claims())}.", id="alg-nOnE"),
    pytest.param(f"{seg({'alg': 'none'})}.{seg(claims())}.{b64url(b'x')}", id="alg-none-sig"),
    pytest.param(f"{seg({'alg': 'none'})}.{seg(claims())}", id="alg-none-2-segments"),
    pytest.param(f"{seg({})}.{seg(claims())}.", id="alg-missing"),
    # HMAC with the public key as secret (key confusion)
    pytest.param(hs_sign(HS, claims(), PUB_PEM), id="hs256-public-pem"),
    pytest.param(hs_sign(HS, claims(), PUB_RAW), id="hs256-public-raw"),
    pytest.param(hs_sign({"alg": "HS512"}, claims(), PUB_PEM), id="hs512-header-public-pem"),
    # other algorithms and spellings
    pytest.param(ed_sign({"alg": "eddsa"}, claims()), id="alg-lowercase-eddsa"),
    pytest.param(ed_sign({"alg": "Ed25519"}, claims()), id="alg-Ed25519"),
    pytest.param(ed_sign({"alg": "ES256"}, claims()), id="alg-ES256"),
    pytest.param(ed_sign({"alg": ["EdDSA"]}, claims()), id="alg-list"),
    # wrong key, missing/altered signature
    pytest.param(ed_sign(EDDSA, claims(), OTHER_KEY), id="other-ed25519-key"),
    pytest.param(ed_sign(EDDSA, claims()).rsplit(".", 1)[0] + ".", id="empty-signature"),
    pytest.param(ed_sign(EDDSA, claims()).rsplit(".", 1)[0], id="no-signature-segment"),
    pytest.param(ed_sign(EDDSA, claims())[:-4] + "AAAA", id="flipped-signature"),
    pytest.param(tampered_payload(), id="tampered-payload"),
    pytest.param(swapped_signature(), id="signature-of-other-payload"),
    # header parameters pointing at other keys or extensions
    pytest.param(ed_sign({**EDDSA, "kid": "k1"}, claims()), id="kid"),
    pytest.param(ed_sign({**EDDSA, "jku": "https://evil/jwks"}, claims()), id="jku"),
    pytest.param(ed_sign({**EDDSA, "x5u": "https://evil/cert"}, claims()), id="x5u"),
    pytest.param(
        ed_sign({**EDDSA, "jwk": {"kty": "OKP", "crv": "Ed25519", "x": b64url(PUB_RAW)}}, claims()),
        id="jwk",
    ),
    pytest.param(ed_sign({**EDDSA, "crit": ["exp"]}, claims()), id="crit"),
    pytest.param(ed_sign({**EDDSA, "x5c": ["MII"]}, claims()), id="x5c"),
    pytest.param(ed_sign({**EDDSA, "b64": False}, claims()), id="b64"),
    # audience and issuer
    pytest.param(ed_sign(EDDSA, claims(aud="other")), id="aud-wrong"),
    pytest.param(ed_sign(EDDSA, claims(aud=...)), id="aud-missing"),
    pytest.param(ed_sign(EDDSA, claims(aud=["other"])), id="aud-list-wrong"),
    pytest.param(ed_sign(EDDSA, claims(aud="natsgat")), id="aud-prefix"),
    pytest.param(ed_sign(EDDSA, claims(aud="natsgatex")), id="aud-suffix"),
    pytest.param(ed_sign(EDDSA, claims(aud="")), id="aud-empty"),
    pytest.param(ed_sign(EDDSA, claims(aud=None)), id="aud-null"),
    pytest.param(ed_sign(EDDSA, claims(iss="other")), id="iss-wrong"),
    pytest.param(ed_sign(EDDSA, claims(iss=...)), id="iss-missing"),
    pytest.param(ed_sign(EDDSA, claims(iss="natsgat")), id="iss-prefix"),
    pytest.param(ed_sign(EDDSA, claims(iss="natsgatex")), id="iss-suffix"),
    pytest.param(ed_sign(EDDSA, claims(iss="xnatsgate")), id="iss-leading"),
    pytest.param(ed_sign(EDDSA, claims(iss="nats")), id="iss-substring"),
    pytest.param(ed_sign(EDDSA, claims(iss="NATSGATE")), id="iss-case"),
    pytest.param(ed_sign(EDDSA, claims(iss="natsgate ")), id="iss-trailing-space"),
    pytest.param(ed_sign(EDDSA, claims(iss=["natsgate"])), id="iss-list"),
    pytest.param(ed_sign(EDDSA, claims(iss="")), id="iss-empty"),
    # required claims missing or ill-typed
    pytest.param(ed_sign(EDDSA, claims(exp=...)), id="exp-missing"),
    pytest.param(ed_sign(EDDSA, claims(exp=int(time.time()) - 3600)), id="exp-past"),
    pytest.param(ed_sign(EDDSA, claims(exp=str(int(time.time()) + 600))), id="exp-string"),
    pytest.param(ed_sign(EDDSA, claims(exp=time.time() + 600.5)), id="exp-float"),
    pytest.param(ed_sign(EDDSA, claims(exp=None)), id="exp-null"),
    pytest.param(ed_sign(EDDSA, claims(sub=...)), id="sub-missing"),
    pytest.param(ed_sign(EDDSA, claims(sub="")), id="sub-empty"),
    pytest.param(ed_sign(EDDSA, claims(sub=42)), id="sub-int"),
    pytest.param(ed_sign(EDDSA, claims(sub=None)), id="sub-null"),
    pytest.param(ed_sign(EDDSA, claims(jti=...)), id="jti-missing"),
    pytest.param(ed_sign(EDDSA, claims(jti="")), id="jti-empty"),
    pytest.param(ed_sign(EDDSA, claims(jti=7)), id="jti-int"),
    pytest.param(ed_sign(EDDSA, claims(iat=...)), id="iat-missing"),
    pytest.param(ed_sign(EDDSA, claims(iat="now")), id="iat-string"),
    pytest.param(ed_sign(EDDSA, claims(iat=float(int(time.time())))), id="iat-float"),
    # garbage
    pytest.param("", id="empty"),
    pytest.param("a", id="one-word"),
    pytest.param("a.b", id="two-words"),
    pytest.param("a.b.c", id="three-words"),
    pytest.param("....", id="dots"),
    pytest.param("..", id="two-dots"),
    pytest.param("Bearer x.y.z", id="bearer-prefix"),
    pytest.param("é.é.é", id="non-ascii"),
    pytest.param("\x00.\x00.\x00", id="nul-bytes"),
    pytest.param(f"{b64url(b'not json')}.{seg(claims())}.", id="header-not-json"),
    pytest.param(f"{seg([1, 2])}.{seg(claims())}.", id="header-list"),
    pytest.param(f"{seg('EdDSA')}.{seg(claims())}.", id="header-string"),
    pytest.param(f"{seg(EDDSA)}.{b64url(b'[1]')}.", id="payload-list-unsigned"),
    pytest.param(ed_sign_raw(EDDSA, b"x"), id="payload-not-json-signed"),
    pytest.param(ed_sign_raw(EDDSA, b"[1]"), id="payload-list-signed"),
    pytest.param(ed_sign_raw(EDDSA, b'"u1"'), id="payload-string-signed"),
    pytest.param(ed_sign_raw(EDDSA, b"\xff\xfe"), id="payload-not-utf8-signed"),
    pytest.param(ed_sign(EDDSA, claims()) + ".extra", id="four-segments"),
    pytest.param(ed_sign(EDDSA, claims()).replace(".", "..", 1), id="double-dot"),
    pytest.param(" " + ed_sign(EDDSA, claims()), id="leading-space"),
    pytest.param(ed_sign(EDDSA, claims(pad="x" * MAX_TOKEN_LENGTH)), id="over-long-signed"),
    pytest.param("a" * (MAX_TOKEN_LENGTH + 1), id="over-long-garbage"),
    pytest.param("a." * 100_000, id="huge"),
    pytest.param(None, id="none"),
    pytest.param(b"a.b.c", id="bytes"),
    pytest.param(123, id="int"),
]


@pytest.mark.parametrize("token", FORGED)
def test_forged_or_malformed_tokens_raise_invalid_token(
    token: Any, verifier: TokenVerifier
) -> None:
    """Every forged, tampered, mis-addressed or malformed token raises InvalidToken only."""
    with pytest.raises(InvalidToken):
        verifier.verify(token)


def test_token_from_another_issuer_config_is_rejected(verifier: TokenVerifier) -> None:
    """An issuer with the right key but another iss/aud does not produce accepted tokens."""
    for iss, aud in (("other", AUD), (ISS, "other")):
        token, _ = TokenIssuer(KEY, iss, aud, ttl=600).issue("u1")
        with pytest.raises(InvalidToken):
            verifier.verify(token)


def test_pyjwt_signed_with_other_key_is_rejected(verifier: TokenVerifier) -> None:
    """A well-formed EdDSA token from pyjwt with a foreign key fails verification."""
    token = jwt.encode(claims(), OTHER_KEY, algorithm="EdDSA")
    with pytest.raises(InvalidToken):
        verifier.verify(token)


def test_rejection_reasons_never_contain_the_token(verifier: TokenVerifier) -> None:
    """InvalidToken messages are safe to log: they never include the token itself."""
    token = ed_sign(EDDSA, claims(iss="evil"))
    with pytest.raises(InvalidToken) as ei:
        verifier.verify(token)
    assert token not in str(ei.value)
    assert token.split(".")[1] not in str(ei.value)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.lists(st.text(alphabet="ABCabc012-_=+/.", max_size=60), min_size=1, max_size=5).map(
            ".".join
        ),
    )
)
def test_arbitrary_strings_raise_invalid_token(text: str) -> None:
    """No string that is not a token we issued gets through, and none raises anything else."""
    verifier = TokenVerifier(KEY.public_key(), ISS, AUD)
    with pytest.raises(InvalidToken):
        verifier.verify(text)


# ------------------------------------------------------------------------ dev keys


def test_ensure_dev_keys_creates_a_matching_pair_once(tmp_path: Path) -> None:
    """The first call creates a private key (0600) and its public key; later calls keep them."""
    s = load({}, var_dir=str(tmp_path / "var"))
    assert not s.private_key_path.exists()
    ensure_dev_keys(s)
    priv, pub = s.private_key_path, s.public_key_path
    assert priv.is_relative_to(tmp_path) and pub.is_relative_to(tmp_path)
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    private = load_private_key(priv)
    public = load_public_key(pub)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert private.public_key().public_bytes(*raw) == public.public_bytes(*raw)
    before = priv.read_bytes(), pub.read_bytes()
    ensure_dev_keys(s)
    ensure_dev_keys(load({}, var_dir=str(tmp_path / "var")))
    assert (priv.read_bytes(), pub.read_bytes()) == before
    leftovers = [p.name for p in priv.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_reader_of_a_leftover_tmp_file_never_sees_the_new_key(tmp_path: Path) -> None:
    """A world-readable key `.tmp` left by a crashed run, opened by another local user: the
    new private key is written to a fresh 0600 file, never through that open file."""
    s = load({}, var_dir=str(tmp_path))
    tmp = s.private_key_path.with_suffix(".tmp")
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"")
    tmp.chmod(0o644)
    with tmp.open("rb") as reader:
        ensure_dev_keys(s)
        assert reader.read() == b""
    assert stat.S_IMODE(s.private_key_path.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in s.private_key_path.read_bytes()


def test_session_cookie_name_is_host_prefixed_when_secure() -> None:
    """`__Host-session` only with COOKIE_SECURE: browsers drop a `__Host-` cookie without
    Secure, so a plain-HTTP dev stack keeps `session`."""
    assert session_cookie_name(load({}, cookie_secure=True)) == "__Host-session"
    assert session_cookie_name(load({})) == "session"


def test_dev_keys_issue_and_verify_through_settings(tmp_path: Path) -> None:
    """Issuer and verifier built from the same settings share the generated key pair."""
    s = load({}, var_dir=str(tmp_path))
    token, c = TokenIssuer.from_settings(s).issue("u7")
    assert TokenVerifier.from_settings(s).verify(token) == c


def test_ensure_dev_keys_regenerates_a_half_pair(tmp_path: Path) -> None:
    """If only one of the two files exists, a fresh matching pair replaces it."""
    s = load({}, var_dir=str(tmp_path))
    ensure_dev_keys(s)
    s.public_key_path.unlink()
    ensure_dev_keys(s)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    priv = load_private_key(s.private_key_path).public_key().public_bytes(*raw)
    assert load_public_key(s.public_key_path).public_bytes(*raw) == priv


def test_ensure_dev_keys_never_generates_in_production(tmp_path: Path) -> None:
    """In production missing key files are fatal, and nothing is written."""
    s = load(
        {},
        app_env="production",
        jwt_private_key_file=str(tmp_path / "k.pem"),
        jwt_public_key_file=str(tmp_path / "k.pub.pem"),
    )
    with pytest.raises(SystemExit):
        ensure_dev_keys(s)
    assert list(tmp_path.iterdir()) == []


def _start_together(var_dirs: list[str], barrier: Any) -> None:
    for d in var_dirs:
        barrier.wait(30)
        try:
            ensure_dev_keys(load({}, var_dir=d))
        except BaseException:
            barrier.abort()  # the others fail at once instead of waiting for the timeout
            raise


def test_ensure_dev_keys_is_safe_when_every_process_starts_at_once(tmp_path: Path) -> None:
    """Processes creating the keys at the same moment all succeed and agree on one pair."""
    ctx = multiprocessing.get_context("spawn")
    n, rounds = 6, 12
    dirs = [str(tmp_path / f"r{i}") for i in range(rounds)]
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=_start_together, args=(dirs, barrier)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * n
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    for d in dirs:
        s = load({}, var_dir=d)
        private = load_private_key(s.private_key_path).public_key().public_bytes(*raw)
        assert load_public_key(s.public_key_path).public_bytes(*raw) == private, d
