"""`/api/docs`: the Swagger UI page, its own files, its CSP (the browser test renders it)."""

from __future__ import annotations

import re

from http_api.routes.docs import ASSETS
from tests.api.conftest import Api


async def test_docs_page_loads_only_our_files_under_a_strict_csp(api: Api) -> None:
    """The page needs no token, has no inline script, and every file it names is served
    by the API with its type; its CSP allows only the API's own origin, nothing inline."""
    resp = await api.client.get("/api/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    page = await resp.text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.DOTALL)
    assert scripts and all('src="/api/docs/' in attrs and not body for attrs, body in scripts)
    names = re.findall(r'(?:src|href)="/api/docs/([^"]+)"', page)
    assert set(names) == set(ASSETS)
    for name in names:
        asset = await api.client.get(f"/api/docs/{name}")
        assert asset.status == 200, name
        assert asset.content_type == ASSETS[name][1]
        assert len(await asset.read()) > 0
    init = await (await api.client.get("/api/docs/init.js")).text()
    assert 'url: "/api/openapi.json"' in init and "SwaggerUIBundle(" in init


async def test_docs_serves_no_other_file(api: Api) -> None:
    """Only the page's files: not the rest of the package, not a path outside it."""
    for name in ("index.html", "swagger-ui-bundle.js.map", "..%2Fapp.py", "oauth2-redirect.js"):
        resp = await api.client.get(f"/api/docs/{name}")
        assert resp.status == 404, name
        assert resp.content_type == "application/problem+json"


async def test_docs_page_is_documented_and_its_files_are_not(api: Api) -> None:
    doc = await (await api.client.get("/api/openapi.json")).json()
    assert doc["paths"]["/api/docs"]["get"]["security"] == []
    assert "/api/docs/{name}" not in doc["paths"]
