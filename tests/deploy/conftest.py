"""Fixtures of the stack tests: a whole stack from `make start`, on free ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.deploy.stackrun import Stack, started


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with started(tmp_path / "var") as s:
        yield s


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=stack.url) as session:
        yield session
