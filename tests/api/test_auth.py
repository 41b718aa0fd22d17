"""Login, logout, refresh, me; tokens, cookies, revocation, CSRF, rate limits."""

from __future__ import annotations

import argon2
from nats.js.client import JetStreamContext

from http_api.state import PASSWORDS, STORE, VERIFIER
from tests.api.conftest import ORIGIN, Api


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_login_returns_token_user_and_session_cookie(api: Api) -> None:
    """Login answers {token, expires_at, user} and sets an HttpOnly SameSite=Strict cookie."""
    resp = await api.client.post(
        "/api/auth/login", json={"username": "alice", "password": api.settings.demo_password}
    )
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"token", "expires_at", "user"}
    assert body["user"]["username"] == "alice"
    assert body["user"]["id"] == api.users["alice"].id
    uid = api.users["alice"].id
    assert body["user"]["capabilities"]["buckets"]["todos"] == [f"user.{uid}.>"]
    cookie = resp.cookies["session"]
    assert cookie.value == body["token"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    assert not cookie["secure"]  # cookie_secure is off in dev
    me = await api.client.get("/api/auth/me", headers=bearer(body["token"]))
    assert me.status == 200
    assert set(await me.json()) == {"id", "username", "display_name", "capabilities"}


async def test_unknown_user_and_wrong_password_do_the_same_hash_work(api: Api) -> None:
    """Both get the same 401 after exactly one argon2 verification, with real-hash parameters."""
    passwords = api.app[PASSWORDS]
    answers = []
    for username, password in (("alice", "wrong"), ("nobody", "wrong"), ("Not A Name!", "x")):
        before = passwords.verify_calls
        resp = await api.client.post(
            "/api/auth/login", json={"username": username, "password": password}
        )
        assert resp.status == 401
        assert passwords.verify_calls == before + 1
        answers.append(await resp.json())
    assert answers[0] == answers[1] == answers[2]
    cred = await api.app[STORE].credentials.get("alice")
    assert cred is not None
    assert argon2.extract_parameters(passwords.dummy_hash) == argon2.extract_parameters(
        cred.value.hash
    )
    assert argon2.extract_parameters(passwords.dummy_hash).type is argon2.Type.ID


async def test_login_bad_input(api: Api) -> None:
    """Malformed JSON is 400, a wrong shape or an unknown field 422, all problem JSON."""
    resp = await api.client.post("/api/auth/login", data=b"{not json")
    assert resp.status == 400
    assert resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert set(problem) == {"type", "title", "status", "detail"} and problem["status"] == 400
    resp = await api.client.post("/api/auth/login", json={"username": "alice"})
    assert resp.status == 422
    resp = await api.client.post(
        "/api/auth/login", json={"username": "alice", "password": "x", "admin": True}
    )
    assert resp.status == 422
    assert "admin" in (await resp.json())["detail"]


async def test_login_rate_limited_per_username(api: Api) -> None:
    """Past its per-minute budget a username gets 429 + Retry-After, even with the password."""
    for _ in range(api.settings.login_attempts_per_minute):
        resp = await api.client.post("/api/auth/login", json={"username": "bob", "password": "no"})
        assert resp.status == 401
    resp = await api.client.post(
        "/api/auth/login", json={"username": "bob", "password": api.settings.demo_password}
    )
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 1
    # Another username is not affected by bob's budget.
    await api.login("alice")


async def test_login_rate_limited_per_address(api: Api) -> None:
    """One client address trying many usernames is limited too."""
    budget = api.settings.login_attempts_per_minute * 5
    statuses = []
    for i in range(budget + 1):
        resp = await api.client.post(
            "/api/auth/login", json={"username": f"user{i}", "password": "no"}
        )
        statuses.append(resp.status)
    assert statuses[:-1] == [401] * budget
    assert statuses[-1] == 429


async def test_disabled_user_cannot_log_in_or_use_a_token(api: Api) -> None:
    """A disabled user's login and existing tokens are refused with 403."""
    token = api.token("bob")
    resp = await api.client.put(
        f"/api/users/{api.users['bob'].id}", json={"disabled": True}, headers=api.auth("admin")
    )
    assert resp.status == 200
    resp = await api.client.get("/api/auth/me", headers=bearer(token))
    assert resp.status == 403
    assert (await resp.json())["type"].endswith(":user_disabled")
    resp = await api.client.post(
        "/api/auth/login", json={"username": "bob", "password": api.settings.demo_password}
    )
    assert resp.status == 403


async def test_missing_or_bad_token_is_401(api: Api) -> None:
    """No token, a malformed header or a forged token: 401 problem JSON."""
    for headers in ({}, {"Authorization": "Basic abc"}, bearer("not-a-jwt")):
        resp = await api.client.get("/api/auth/me", headers=headers)
        assert resp.status == 401
        assert resp.content_type == "application/problem+json"


async def test_token_of_a_deleted_user_is_401(api: Api) -> None:
    token = api.token("bob")
    resp = await api.client.delete(f"/api/users/{api.users['bob'].id}", headers=api.auth("admin"))
    assert resp.status == 200
    resp = await api.client.get("/api/auth/me", headers=bearer(token))
    assert resp.status == 401


async def test_logout_revokes_the_token(api: Api, js: JetStreamContext) -> None:
    """Logout writes jti -> exp into auth_revoked; the token is then refused."""
    login = await api.login("alice")
    token = login["token"]
    resp = await api.client.post("/api/auth/logout", headers=bearer(token))
    assert resp.status == 204
    jti_claims = api.app[VERIFIER].verify(token)
    kv = await js.key_value("auth_revoked")
    entry = await kv.get(jti_claims.jti)
    assert entry.value == str(jti_claims.exp).encode()
    resp = await api.client.get("/api/auth/me", headers=bearer(token))
    assert resp.status == 401
    assert "revoked" in (await resp.json())["detail"]


async def test_cookie_auth_and_csrf_origin(api: Api) -> None:
    """Cookie requests work for reads; unsafe ones need an allowed Origin; bearer needs none."""
    login = await api.login("alice")
    assert api.client.session.cookie_jar.filter_cookies(api.client.make_url("/"))["session"]
    resp = await api.client.get("/api/auth/me")
    assert resp.status == 200
    resp = await api.client.post("/api/auth/refresh")
    assert resp.status == 403
    assert (await resp.json())["type"].endswith(":bad_origin")
    resp = await api.client.post("/api/auth/refresh", headers={"Origin": "https://evil.example"})
    assert resp.status == 403
    resp = await api.client.post("/api/auth/refresh", headers={"Origin": ORIGIN})
    assert resp.status == 200
    fresh = (await resp.json())["token"]
    # Bearer wins over the cookie and needs no Origin; the refreshed-away token is revoked.
    resp = await api.client.post("/api/auth/refresh", headers=bearer(login["token"]))
    assert resp.status == 401
    resp = await api.client.post("/api/auth/refresh", headers=bearer(fresh))
    assert resp.status == 200
    resp = await api.client.post("/api/auth/logout", headers={"Origin": ORIGIN})
    assert resp.status == 204
    resp = await api.client.get("/api/auth/me")
    assert resp.status == 401  # the cookie is gone


async def test_login_from_another_site_is_refused(api: Api) -> None:
    resp = await api.client.post(
        "/api/auth/login",
        json={"username": "alice", "password": api.settings.demo_password},
        headers={"Origin": "https://evil.example"},
    )
    assert resp.status == 403


async def test_refresh_issues_a_new_working_token(api: Api) -> None:
    """Refresh gives another token for the same user and rotates: the old one is revoked."""
    old = (await api.login("alice"))["token"]
    resp = await api.client.post("/api/auth/refresh", headers=bearer(old))
    assert resp.status == 200
    new = (await resp.json())["token"]
    assert new != old
    me = await api.client.get("/api/auth/me", headers=bearer(new))
    assert (await me.json())["username"] == "alice"
    me = await api.client.get("/api/auth/me", headers=bearer(old))
    assert me.status == 401
