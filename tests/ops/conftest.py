"""A stack from `make start` for the operations tests, shared by the module (one start),
with JSON logs as production writes them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deploy.stackrun import Stack, started


@pytest.fixture(scope="module")
def ops_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with started(tmp_path_factory.mktemp("ops") / "var", LOG_FORMAT="json") as s:
        yield s
