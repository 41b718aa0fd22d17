"""What nginx must say for the API when it answers by itself, rendered from the API's own
route table and problem types so that nginx and the API never disagree.

nginx answers some requests without asking the API: TRACE (always 405), bodies above
MAX_BODY_BYTES (413), a malformed request line or oversized headers (400, 414), no live
upstream (502, 504). Under `/api` every answer is problem+json (RFC 9457) and every 405
carries `Allow` (RFC 9110 15.5.6), the ones nginx makes included.
"""

from __future__ import annotations

import json
import re

from http_api.problems import DEFAULTS, PROBLEM_CONTENT_TYPE, TYPE_PREFIX
from http_api.routes import ROUTES

# The statuses nginx itself produces (494: request header too large, sent as 400).
NGINX_STATUSES = (400, 403, 404, 405, 408, 413, 414, 429, 500, 502, 503, 504)
_PARAM = re.compile(r"\{\w+\}")


def allowed_methods() -> dict[str, str]:
    """Path regex -> the `Allow` value for it, from the route table."""
    methods: dict[str, set[str]] = {}
    for r in ROUTES:
        regex = "^" + "[^/]+".join(re.escape(part) for part in _PARAM.split(r.path)) + "$"
        methods.setdefault(regex, set()).add(r.method)
    out = {}
    for regex, ms in methods.items():
        if "GET" in ms:
            ms.add("HEAD")  # aiohttp answers HEAD wherever GET is routed
        out[regex] = ", ".join(sorted(ms))
    return out


def _nginx_string(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def allow_map() -> str:
    """`map $uri $api_allow`: what to put in the Allow header of nginx's own 405."""
    # Regexes are tried in order, the first match wins: the routes, then the rest of /api.
    lines = ["    map $uri $api_allow {", '        default "GET, HEAD";']
    for regex, allow in allowed_methods().items():
        lines.append(f'        "~{regex}" "{allow}";')
    lines += ['        "~^/api/" "";', "    }"]
    # Only on a 405 nginx made itself ($upstream_status empty): the API's carry their own.
    lines += [
        "    map $status$upstream_status $nginx_allow {",
        "        405 $api_allow;",
        '        default "";',
        "    }",
    ]
    return "\n".join(lines)


# Set in every proxied location (each one that sets a header of its own loses the rest).
PROXY_HEADERS = (
    ("Host", "$host"),
    ("X-Real-IP", "$remote_addr"),
    ("X-Forwarded-For", "$remote_addr"),
    ("X-Forwarded-Proto", "$scheme"),
    ("X-Forwarded-Host", "$host"),
    ("X-Request-Id", "$request_id"),
)


def proxy_headers() -> str:
    return "\n".join(f"            proxy_set_header {k} {v};" for k, v in PROXY_HEADERS)


def problem(status: int, detail: str) -> str:
    slug, title = DEFAULTS[status]
    body = {"type": TYPE_PREFIX + slug, "title": title, "status": status, "detail": detail}
    return json.dumps(body, separators=(",", ":"))


_DETAILS = {
    400: "the request is malformed (request line or headers)",
    403: "not from here: this path is served to the local host only",
    404: "no such resource",
    405: "method not allowed here: see the Allow header",
    408: "the request was not received in time",
    413: "request body is too large",
    414: "the request URI is too long",
    429: "too many requests",
    500: "internal error",
    502: "no API process answered: retry later",
    503: "the service is unavailable: retry later",
    504: "the API process did not answer in time: retry later",
}


def problem_pages() -> str:
    """`error_page` for every status nginx makes, each a named location answering problem
    JSON with the same status."""
    lines = []
    for status in NGINX_STATUSES:
        lines.append(f"        error_page {status} @problem_{status};")
    lines.append("        error_page 494 =400 @problem_400;")
    for status in NGINX_STATUSES:
        lines += [
            f"        location @problem_{status} {{",
            f"            default_type {PROBLEM_CONTENT_TYPE};",
            f"            return {status} {_nginx_string(problem(status, _DETAILS[status]))};",
            "        }",
        ]
    return "\n".join(lines)
