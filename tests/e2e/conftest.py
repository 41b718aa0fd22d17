"""End to end: the API (as tests/api runs it) and a gateway on the same nats-server."""

from __future__ import annotations

from tests.api.conftest import api, api_settings  # noqa: F401
from tests.gateway.conftest import connect, gateway  # noqa: F401
