"""`check-config` and `print-config`: the settings a process would run with, checked or
shown, before it runs (systemd's ExecStartPre, an operator at a prompt).

print-config never shows a secret: passwords are masked and a NATS URL's credentials are
cut out. The output is `NAME=value` lines, one per setting, as `.env.example` lists them.
"""

from __future__ import annotations

import os
import re
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec

from shared.settings import Settings

MASK = "********"
_SECRET = re.compile(r"password|secret", re.IGNORECASE)

Role = Literal["api", "gateway"]


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{MASK}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def shown(settings: Settings) -> dict[str, str]:
    """Every setting as its environment variable and a printable value, secrets masked."""
    out: dict[str, str] = {}
    for field in msgspec.structs.fields(Settings):
        value = getattr(settings, field.name)
        if _SECRET.search(field.name):
            text = MASK if value else ""
        elif isinstance(value, tuple):
            urls = (_without_credentials(v) for v in value) if field.name == "nats_url" else value
            text = ",".join(urls)
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
        out[field.name.upper()] = text
    return out


def print_config(settings: Settings) -> str:
    return "".join(f"{k}={v}\n" for k, v in shown(settings).items())


def problems(settings: Settings, role: Role) -> list[str]:
    """What would stop this process from starting, or make it unsafe: production's
    refusals, and the key file its role needs (API: the private key, to sign; gateway:
    the public key, to verify) missing or unreadable."""
    found: list[str] = []
    try:
        settings.check()
    except SystemExit as e:
        found.append(str(e))
    key = settings.private_key_path if role == "api" else settings.public_key_path
    if not os.access(key, os.R_OK):
        found.append(f"{role}: key file {key} is missing or not readable")
    return found
