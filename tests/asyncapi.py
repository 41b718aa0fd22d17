"""docs/asyncapi.json's message schemas as validators, for tests that check real frames."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema_rs

ASYNCAPI_JSON = Path(__file__).resolve().parents[1] / "docs" / "asyncapi.json"


@cache
def validators() -> dict[str, jsonschema_rs.Validator]:
    """A validator per message of the committed document (`client.sub`, `server.ok`, …)."""
    doc = json.loads(ASYNCAPI_JSON.read_text())
    return {
        name: jsonschema_rs.validator_for(
            {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "components": doc["components"],
                "$ref": f"#/components/messages/{name}/payload",
            }
        )
        for name in doc["components"]["messages"]
    }


def problems(name: str, env: Any) -> list[str]:
    """Why `env` is not a valid `name` message (empty: it is)."""
    return [e.message for e in validators()[name].iter_errors(env)]
