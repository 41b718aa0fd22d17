"""What every benchmark script needs: a process's CPU and RSS, readiness, percentiles."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

CLK = os.sysconf("SC_CLK_TCK")


def proc_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def wait_http(
    port: int, path: str | None, deadline: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Until `GET path` answers 200 on the port (a starting process), or raise; with no
    path, until the port accepts a connection (a server with no 200 route)."""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            if path is None:
                w.close()
                return
            w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            line = await r.readline()
            w.close()
            if b" 200 " in line:
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)  # polling a starting process, not synchronising a test
    raise RuntimeError(f"{path or 'a connection'} on port {port} did not become ready")
