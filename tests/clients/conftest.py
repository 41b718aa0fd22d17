"""Fixtures of the client SDK tests: one whole stack (`make start`: nginx, 2 gateways,
2 API workers, NATS) shared by the tests of this folder."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deploy.stackrun import Stack, started


@pytest.fixture(scope="session")
def client_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with started(tmp_path_factory.mktemp("clients") / "var") as s:
        yield s
