"""JWT issue/verify with Ed25519, the forged tokens it must refuse, and dev key creation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import multiprocessing
import stat
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.auth import (
    MAX_TOKEN_LENGTH,
    VERIFIED_CACHE_ENTRIES,
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


# ------------------------------------------------------- the lean decode against PyJWT


def pyjwt_verify(token: Any, leeway: float) -> Claims:
    """The verifier as it was before the lean decode (PyJWT's header pass, then
    `jwt.decode`): the reference the lean one must agree with."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken("token missing or too long")
    try:
        header = jwt.get_unverified_header(token)
        if header.get("alg") != "EdDSA" or not set(header) <= {"alg", "typ"}:
            raise InvalidToken("token header not accepted")
        payload = jwt.decode(
            token,
            KEY.public_key(),
            algorithms=["EdDSA"],
            audience=AUD,
            issuer=ISS,
            leeway=leeway,
            options={
                "require": ["sub", "jti", "iat", "exp", "iss", "aud"],
                "verify_signature": True,
            },
        )
    except InvalidToken:
        raise
    except jwt.ExpiredSignatureError:
        raise InvalidToken("token expired") from None
    except Exception as e:
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


def outcome(verify: Callable[[Any], Claims], token: Any) -> Claims | str:
    """The claims, or how the token was refused; any other exception fails the test."""
    try:
        return verify(token)
    except InvalidToken as e:
        return "expired" if "expired" in str(e) else "rejected"


def sign_segments(header: str, payload: str, sig_pad: str = "") -> str:
    """A token signed over exactly these two segments (padding included)."""
    signing_input = f"{header}.{payload}"
    return f"{signing_input}.{b64url(KEY.sign(signing_input.encode()))}{sig_pad}"


def sign_bytes(header: bytes, payload: bytes) -> str:
    return sign_segments(b64url(header), b64url(payload))


def non_canonical(segment: str) -> str:
    """The same bytes with nonzero unused bits in the last character (PyJWT refuses it)."""
    assert len(segment) % 4 in (2, 3)
    return segment[:-1] + chr(ord(segment[-1]) + 1)


EDDSA_BYTES = json.dumps(EDDSA, separators=(",", ":")).encode()


def crafted(now: int) -> list[tuple[str, Any, bool]]:
    """(id, token, accepted) at the edges of PyJWT's rules, for a 60 s leeway."""

    def c(**over: Any) -> dict[str, Any]:
        return claims(**{"iat": now, "exp": now + 600, **over})

    def signed(payload: dict[str, Any], header: dict[str, Any] = EDDSA) -> str:
        return sign_segments(seg(header), seg(payload))

    good = json.dumps(c(), separators=(",", ":")).encode()
    valid = signed(c())
    h, p, s = valid.split(".")
    unpadded = next(ps for sub in ("u1", "u12", "u123") if len(ps := seg(c(sub=sub))) % 4 > 1)
    cases: list[tuple[str, Any, bool]] = [
        ("valid", valid, True),
        # padding: none, or exactly to a multiple of 4, on any segment
        *(
            (f"header-typ-{typ}-pad-{k}", sign_segments(hs + "=" * k, p), ok)
            for typ in ("JWT", "J", "JW")
            for hs in [seg({"alg": "EdDSA", "typ": typ})]
            for k in range(4)
            for ok in [k == 0 or (len(hs) + k) % 4 == 0]
        ),
        *(
            (f"payload-sub-{sub}-pad-{k}", sign_segments(h, ps + "=" * k), ok)
            for sub in ("u1", "u12", "u123")
            for ps in [seg(c(sub=sub))]
            for k in range(4)
            for ok in [k == 0 or (len(ps) + k) % 4 == 0]
        ),
        *((f"signature-pad-{k}", valid + "=" * k, k in (0, 2)) for k in range(4)),
        ("header-pad-inside", sign_segments(h[:4] + "=" + h[4:], p), False),
        # base64url strictness
        ("header-non-canonical", sign_segments(non_canonical(seg(EDDSA | {"typ": "J"})), p), False),
        ("payload-non-canonical", sign_segments(h, non_canonical(unpadded)), False),
        ("signature-non-canonical", f"{h}.{p}.{non_canonical(s)}", False),
        ("header-one-char-too-many", sign_segments(h + "A", p), False),
        ("header-std-alphabet", sign_segments(h.replace("J", "+", 1), p), False),
        ("signature-std-alphabet", f"{h}.{p}.{s[:-1]}/", False),
        ("payload-empty", sign_segments(h, ""), False),
        ("header-empty", sign_segments("", p), False),
        ("signature-63-bytes", f"{h}.{p}.{b64url(KEY.sign(f'{h}.{p}'.encode())[:63])}", False),
        ("signature-65-bytes", f"{h}.{p}.{b64url(KEY.sign(f'{h}.{p}'.encode()) + b'x')}", False),
        ("trailing-newline", valid + "\n", False),
        ("trailing-space", valid + " ", False),
        ("inner-space", f"{h}. {p}.{s}", False),
        ("lone-surrogate", valid[:-1] + "\ud800", False),
        ("fullwidth-digit", valid[:-1] + "\uff11", False),
        # header
        ("header-alg-only", signed(c(), {"alg": "EdDSA"}), True),
        ("header-typ-int", signed(c(), {"alg": "EdDSA", "typ": 5}), True),
        ("header-typ-other", signed(c(), {"alg": "EdDSA", "typ": "at+jwt"}), True),
        ("header-alg-null", signed(c(), {"alg": None}), False),
        ("header-duplicate-alg-ours-last", sign_bytes(b'{"alg":"none","alg":"EdDSA"}', good), True),
        (
            "header-duplicate-alg-none-last",
            sign_bytes(b'{"alg":"EdDSA","alg":"none"}', good),
            False,
        ),
        ("header-utf16", sign_bytes(json.dumps(EDDSA).encode("utf-16"), good), True),
        ("header-utf8-bom", sign_bytes(b"\xef\xbb\xbf" + json.dumps(EDDSA).encode(), good), True),
        ("header-deep", sign_bytes(b"[" * 1500 + b"]" * 1500, good), False),
        ("header-b64-false", signed(c(), {**EDDSA, "b64": False, "crit": ["b64"]}), False),
        ("header-kid-int", signed(c(), {**EDDSA, "kid": 1}), False),
        ("header-typ-upper", signed(c(), {"alg": "EdDSA", "TYP": "JWT"}), False),
        # not-before and issued-at
        ("nbf-past", signed(c(nbf=now - 1000)), True),
        ("nbf-within-leeway", signed(c(nbf=now + 30)), True),
        ("nbf-future", signed(c(nbf=now + 120)), False),
        ("nbf-null", signed(c(nbf=None)), False),
        ("nbf-string-past", signed(c(nbf=str(now - 1000))), True),
        ("nbf-string-future", signed(c(nbf=str(now + 120))), False),
        ("nbf-word", signed(c(nbf="soon")), False),
        ("nbf-float-past", signed(c(nbf=now - 1000.5)), True),
        ("nbf-true", signed(c(nbf=True)), True),
        ("nbf-list", signed(c(nbf=[1])), False),
        ("nbf-infinity", sign_bytes(EDDSA_BYTES, good[:-1] + b',"nbf":-Infinity}'), False),
        ("nbf-nan", sign_bytes(EDDSA_BYTES, good[:-1] + b',"nbf":NaN}'), False),
        ("iat-within-leeway", signed(c(iat=now + 30)), True),
        ("iat-future", signed(c(iat=now + 120)), False),
        ("iat-true", signed(c(iat=True)), False),
        ("iat-negative", signed(c(iat=-5)), True),
        # expiry
        ("exp-within-leeway", signed(c(exp=now - 30)), True),
        ("exp-beyond-leeway", signed(c(exp=now - 120)), False),
        ("exp-float-past", signed(c(exp=now - 120.5)), False),
        ("exp-true", signed(c(exp=True)), False),
        ("exp-huge", signed(c(exp=10**30)), True),
        ("exp-string-future", signed(c(exp=str(now + 600))), False),
        ("exp-infinity", sign_bytes(EDDSA_BYTES, good[:-1] + b',"exp":Infinity}'), False),
        # audience and issuer
        ("aud-list-ours", signed(c(aud=[AUD])), True),
        ("aud-list-several", signed(c(aud=["other", AUD])), True),
        ("aud-list-with-non-string", signed(c(aud=[AUD, 1])), False),
        ("aud-list-empty", signed(c(aud=[])), False),
        ("aud-dict", signed(c(aud={AUD: 1})), False),
        ("aud-zero", signed(c(aud=0)), False),
        ("aud-false", signed(c(aud=False)), False),
        ("aud-nested-list", signed(c(aud=[[AUD]])), False),
        ("iss-int", signed(c(iss=5)), False),
        ("iss-null", signed(c(iss=None)), False),
        # subject, id, other claims, payload encodings
        ("sub-list", signed(c(sub=["u1"])), False),
        ("jti-list", signed(c(jti=["j1"])), False),
        ("sub-space", signed(c(sub=" ")), True),
        ("extra-claims", signed(c(role="admin", nested={"a": [1]})), True),
        ("payload-indented", sign_bytes(EDDSA_BYTES, json.dumps(c(), indent=2).encode()), True),
        ("payload-utf16", sign_bytes(EDDSA_BYTES, json.dumps(c()).encode("utf-16")), True),
        ("payload-utf8-bom", sign_bytes(EDDSA_BYTES, b"\xef\xbb\xbf" + good), True),
        ("payload-duplicate-exp", sign_bytes(EDDSA_BYTES, b'{"exp":1,' + good[1:]), True),
        (
            "payload-duplicate-exp-past-last",
            sign_bytes(EDDSA_BYTES, good[:-1] + b',"exp":1}'),
            False,
        ),
        ("payload-deep", sign_bytes(EDDSA_BYTES, b"[" * 1500 + b"]" * 1500), False),
        ("payload-trailing-garbage", sign_bytes(EDDSA_BYTES, good + b"x"), False),
    ]
    return cases


def test_lean_verifier_decides_as_pyjwt_on_crafted_tokens() -> None:
    """On every forged token and on tokens at the edges of PyJWT's rules (padding, base64
    strictness, JSON oddities, nbf/iat/exp with leeway, aud lists, claim types), the lean
    decode accepts exactly what PyJWT accepts, with the same claims, and calls the same
    tokens expired."""
    lean = TokenVerifier(KEY.public_key(), ISS, AUD, leeway=60, cache_entries=0)
    cases = [
        *((str(p.id), p.values[0], False) for p in FORGED),
        *crafted(int(time.time())),
    ]
    for name, token, accepted in cases:
        reference = outcome(partial(pyjwt_verify, leeway=60), token)
        assert isinstance(reference, Claims) is accepted, f"{name}: the table is wrong"
        assert outcome(lean.verify, token) == reference, name
    assert sum(accepted for *_, accepted in cases) >= 30


def test_cached_verifier_decides_as_pyjwt_on_crafted_tokens() -> None:
    """Verified twice (the second from the cache when accepted), every crafted token gets
    the reference's answer both times."""
    cached = TokenVerifier(KEY.public_key(), ISS, AUD, leeway=60)
    for name, token, _ in crafted(int(time.time())):
        reference = outcome(partial(pyjwt_verify, leeway=60), token)
        assert outcome(cached.verify, token) == reference, name
        assert outcome(cached.verify, token) == reference, name
    assert 0 < cached.cached < len(crafted(int(time.time())))


MUTABLE = [
    ed_sign(EDDSA, claims(iat=int(time.time()), exp=int(time.time()) + 3600)),
    ed_sign({"alg": "EdDSA", "typ": "J"}, claims(sub="u12")),
    ed_sign({"alg": "EdDSA", "typ": "JW"}, claims(sub="u123")),
]


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    st.sampled_from(MUTABLE),
    st.lists(
        st.tuples(
            st.sampled_from(["insert", "replace", "delete"]),
            st.integers(min_value=0),
            st.sampled_from(list("AQgwBRhx09-_=.+/ ")),
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_lean_verifier_decides_as_pyjwt_on_mutated_tokens(
    token: str, edits: list[tuple[str, int, str]]
) -> None:
    """Characters inserted, replaced or deleted anywhere in a valid token: the lean decode
    and PyJWT agree (almost always a refusal; the same claims when the edit was a no-op)."""
    for op, at, ch in edits:
        i = at % (len(token) + 1)
        if op == "insert":
            token = token[:i] + ch + token[i:]
        elif op == "replace":
            token = token[:i] + ch + token[i + 1 :]
        else:
            token = token[:i] + token[i + 1 :]
    lean = TokenVerifier(KEY.public_key(), ISS, AUD, cache_entries=0)
    assert outcome(lean.verify, token) == outcome(partial(pyjwt_verify, leeway=5.0), token)


# ---------------------------------------------------------------- verified-token cache

T0 = 1_900_000_000  # a fixed "now" for the verifier's clock


class Clock:
    """A settable clock for TokenVerifier: time moves only when the test says so."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingKey:
    """An Ed25519 public key that counts signature checks (a cache hit makes none)."""

    def __init__(self, key: Ed25519PublicKey) -> None:
        self.key, self.checks = key, 0

    def verify(self, signature: bytes, data: bytes) -> None:
        self.checks += 1
        self.key.verify(signature, data)


def counting_verifier(
    clock: Clock, *, leeway: float = 5.0, cache_entries: int = VERIFIED_CACHE_ENTRIES
) -> tuple[TokenVerifier, CountingKey]:
    key = CountingKey(KEY.public_key())
    verifier = TokenVerifier(
        cast(Ed25519PublicKey, key),
        ISS,
        AUD,
        leeway=leeway,
        cache_entries=cache_entries,
        clock=clock,
    )
    return verifier, key


def test_a_cache_hit_returns_the_same_claims_without_a_signature_check(
    issuer: TokenIssuer,
) -> None:
    """The second verify of a token is answered from memory with identical claims."""
    clock = Clock(T0)
    verifier, key = counting_verifier(clock)
    token, issued = issuer.issue("u1", now=T0)
    assert verifier.verify(token) == issued
    clock.now = T0 + 300
    assert verifier.verify(token) == issued
    assert (key.checks, verifier.cached) == (1, 1)


def test_a_cached_token_is_refused_after_its_exp(issuer: TokenIssuer) -> None:
    """Up to exp the cache answers; from exp the full check decides (accepting within the
    leeway, without caching again), and after exp + leeway the token is expired."""
    clock = Clock(T0)
    verifier, key = counting_verifier(clock, leeway=5.0)
    token, issued = issuer.issue("u1", now=T0, ttl=60)
    assert verifier.verify(token) == issued
    clock.now = T0 + 59.999
    assert verifier.verify(token) == issued
    assert key.checks == 1
    clock.now = T0 + 60  # at exp: within the leeway, checked in full, not remembered
    assert verifier.verify(token) == issued
    assert (key.checks, verifier.cached) == (2, 0)
    clock.now = T0 + 65
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(token)
    assert verifier.cached == 0


def test_a_cached_token_is_refused_at_exp_without_leeway(issuer: TokenIssuer) -> None:
    """With no leeway a cached token is refused from the second of its exp."""
    clock = Clock(T0)
    verifier, _ = counting_verifier(clock, leeway=0)
    token, _ = issuer.issue("u1", now=T0, ttl=60)
    verifier.verify(token)
    clock.now = T0 + 60
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(token)


def test_a_cached_token_follows_the_not_before_rule_when_the_clock_steps_back(
    issuer: TokenIssuer,
) -> None:
    """A clock stepped back past iat - leeway refuses a cached token as the full check would."""
    clock = Clock(T0)
    verifier, _ = counting_verifier(clock, leeway=5.0)
    token, _ = issuer.issue("u1", now=T0)
    verifier.verify(token)
    clock.now = T0 - 6
    with pytest.raises(InvalidToken, match="not yet valid"):
        verifier.verify(token)


def test_the_cache_holds_at_most_its_bound_and_drops_the_oldest(issuer: TokenIssuer) -> None:
    """Past the bound the cache stays at the bound; the oldest token is checked again."""
    clock = Clock(T0)
    verifier, key = counting_verifier(clock, cache_entries=8)
    tokens = [issuer.issue(f"u{i}", now=T0)[0] for i in range(20)]
    for token in tokens:
        verifier.verify(token)
        assert verifier.cached <= 8
    assert verifier.cached == 8
    checks = key.checks
    verifier.verify(tokens[-1])  # recent: a hit
    assert key.checks == checks
    verifier.verify(tokens[0])  # evicted: verified again
    assert (key.checks, verifier.cached) == (checks + 1, 8)


def test_the_default_bound_holds() -> None:
    """VERIFIED_CACHE_ENTRIES distinct tokens and one more: the size stays at the bound."""
    verifier = TokenVerifier(KEY.public_key(), ISS, AUD, clock=Clock(T0))
    for i in range(VERIFIED_CACHE_ENTRIES + 1):
        verifier.verify(ed_sign(EDDSA, claims(jti=f"j{i}", iat=T0, exp=T0 + 600)))
    assert verifier.cached == VERIFIED_CACHE_ENTRIES == 10_000


def test_failures_are_never_cached(issuer: TokenIssuer) -> None:
    """Refused tokens, and tokens accepted only thanks to the leeway, are not remembered."""
    clock = Clock(T0)
    verifier, _ = counting_verifier(clock)
    expired, _ = issuer.issue("u1", now=T0 - 100, ttl=50)
    in_leeway, _ = issuer.issue("u1", now=T0 - 100, ttl=98)
    for token in (expired, tampered_payload(), "a.b.c", ed_sign(EDDSA, claims(aud="x"))):
        with pytest.raises(InvalidToken):
            verifier.verify(token)
    assert verifier.verify(in_leeway).sub == "u1"
    assert verifier.cached == 0


def test_cache_entries_zero_disables_the_cache(issuer: TokenIssuer) -> None:
    """cache_entries=0 checks every token in full."""
    verifier, key = counting_verifier(Clock(T0), cache_entries=0)
    token, _ = issuer.issue("u1", now=T0)
    verifier.verify(token)
    verifier.verify(token)
    assert (key.checks, verifier.cached) == (2, 0)


def test_tampered_tokens_are_refused_after_the_genuine_one_was_cached(
    issuer: TokenIssuer,
) -> None:
    """The cache is keyed by the exact string: a changed signature, payload or header (or
    a token with text around it) is checked in full and refused; the genuine one still hits."""
    clock = Clock(T0)
    verifier, key = counting_verifier(clock)
    token, issued = issuer.issue("u1", now=T0)
    assert verifier.verify(token) == issued
    h, p, s = token.split(".")
    forged_payload = seg({**jwt.decode(token, options={"verify_signature": False}), "sub": "u2"})
    tampered = [
        f"{h}.{p}.{s[:-2]}{'B' if s[-2] == 'A' else 'A'}{s[-1]}",  # signature
        f"{h}.{p}.{b64url(OTHER_KEY.sign(f'{h}.{p}'.encode()))}",  # signature, other key
        f"{h}.{forged_payload}.{s}",  # payload
        f"{seg({'alg': 'EdDSA'})}.{p}.{s}",  # header, still EdDSA
        f"{seg({'alg': 'HS256', 'typ': 'JWT'})}.{p}.{s}",  # header, HMAC
        f"{seg({**EDDSA, 'kid': 'k1'})}.{p}.{s}",  # header, extra key
        f"{h}.{p}",  # signature dropped
        f"{h}.{p}.",  # signature emptied
        token + "A",
        token + ".x",
        "x" + token,
        f"{h}.{p}.{non_canonical(s)}",
    ]
    for forged in tampered:
        with pytest.raises(InvalidToken):
            verifier.verify(forged)
    checks = key.checks
    assert verifier.verify(token) == issued
    assert (key.checks, verifier.cached) == (checks, 1)


def test_each_verifier_has_its_own_cache(issuer: TokenIssuer) -> None:
    """A token one verifier cached is still refused by a verifier for another audience."""
    token, _ = issuer.issue("u1")
    TokenVerifier(KEY.public_key(), ISS, AUD).verify(token)
    with pytest.raises(InvalidToken):
        TokenVerifier(KEY.public_key(), ISS, "other").verify(token)


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
