"""`/api/docs`: Swagger UI over `/api/openapi.json`, no token needed, nothing from a CDN.

Swagger UI's files come from the `swagger-ui-bundle-v2` wheel (swagger-ui-dist's build);
the page and its initializer are ours (`http_api/apidocs/`), so the page needs no inline
script. The page carries its own CSP, which nginx keeps instead of its default
(deploy/templates/nginx.conf): as strict, without the SPA's import-map hashes, and the same
when the API is reached without nginx. Only the files the page loads are served.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

from http_api.problems import Problem
from http_api.state import Route

OURS = Path(__file__).resolve().parent.parent / "apidocs"
SWAGGER_UI = Path(str(swagger_ui_path))

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# name under /api/docs/ → (file, Content-Type)
ASSETS: dict[str, tuple[Path, str]] = {
    "swagger-ui.css": (SWAGGER_UI / "swagger-ui.css", "text/css"),
    "swagger-ui-bundle.js": (SWAGGER_UI / "swagger-ui-bundle.js", "text/javascript"),
    "favicon-32x32.png": (SWAGGER_UI / "favicon-32x32.png", "image/png"),
    "init.js": (OURS / "init.js", "text/javascript"),
}


def _file(path: Path, content_type: str, csp: str | None = None) -> web.FileResponse:
    # Revalidated by ETag each time: a new swagger-ui release is seen at once.
    headers = {"Cache-Control": "no-cache", "Content-Type": content_type}
    if csp is not None:
        headers["Content-Security-Policy"] = csp
    return web.FileResponse(path, headers=headers)


async def docs(request: web.Request) -> web.StreamResponse:
    return _file(OURS / "index.html", "text/html; charset=utf-8", CSP)


async def docs_asset(request: web.Request) -> web.StreamResponse:
    found = ASSETS.get(request.match_info["name"])
    if found is None:
        raise Problem(404, "no such file")
    return _file(*found)


ROUTES = [
    Route(
        "GET",
        "/api/docs",
        docs,
        "This API, browsable (Swagger UI)",
        "ops",
        auth=False,
        response=str,
        response_content_type="text/html",
    ),
    Route(
        "GET",
        "/api/docs/{name}",
        docs_asset,
        "A file of the Swagger UI page",
        "ops",
        auth=False,
        in_openapi=False,
    ),
]
