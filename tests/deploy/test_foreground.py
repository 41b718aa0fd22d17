"""`make run` as a newcomer uses it: in the foreground on a second stack (its own VAR_DIR and
BASE_PORT), showing the apps' logs; `make status`/`make stop` typed without those settings
say how to reach it instead of a bare "not running"; Ctrl-C stops it."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.deploy.stackrun import ROOT, Stack

pytestmark = pytest.mark.timeout(240)


async def line_with(out: asyncio.StreamReader, text: str, seen: list[str]) -> str:
    """Read `out` up to the first line containing `text` (every line read goes to `seen`)."""
    async with asyncio.timeout(120):
        while line := (await out.readline()).decode(errors="replace"):
            seen.append(line)
            if text in line:
                return line
    raise AssertionError(f"{text!r} never came; output:\n{''.join(seen)}")


async def test_make_run_shows_app_logs_and_another_var_dir_is_found(tmp_path: Path) -> None:
    """The foreground banner names the exact status/stop commands of this stack; after it,
    an API login's log line appears and none of supervisord's (no CRIT about HTTP
    authentication, no "spawned"). `make status` and `make stop` from another VAR_DIR print
    this stack's commands and leave it running; Ctrl-C then stops everything."""
    s = Stack(tmp_path / "var")
    proc = await asyncio.create_subprocess_exec(
        "make", "-s", "--no-print-directory", "run",
        cwd=ROOT, env=s.env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own process group: Ctrl-C as a terminal sends it
    )  # fmt: skip
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        await line_with(proc.stdout, "natsgate is up", seen)
        args = f"VAR_DIR={s.layout.var} BASE_PORT={s.settings.base_port}"
        assert f"`make status {args}`" in await line_with(proc.stdout, "make status", seen)

        async with aiohttp.ClientSession(base_url=s.url) as http:
            login = {"username": "alice", "password": "demo"}
            async with http.post("/api/auth/login", json=login) as r:
                assert r.status == 200
        await line_with(proc.stdout, "event=login ", seen)  # http_api's log line
        shown = "".join(seen)
        assert "CRIT" not in shown and "spawned:" not in shown and "success:" not in shown

        elsewhere = Stack(tmp_path / "other")  # nothing runs from this VAR_DIR
        res = await asyncio.to_thread(elsewhere.make, "status")
        assert res.returncode != 0 and f"`make status {args}`" in res.stdout, res.stdout
        res = await asyncio.to_thread(elsewhere.make, "stop")
        assert res.returncode == 0 and f"`make stop {args}`" in res.stdout, res.stdout
        assert (await asyncio.to_thread(s.make, "status")).returncode == 0  # still up
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGINT)
        await line_with(proc.stdout, "stopped", seen)
        # make got the SIGINT too: once its child is done it dies of it, as in a terminal.
        assert await proc.wait() in (0, -signal.SIGINT)
    assert s.leftovers() == []
