"""The test harness itself: a real nats-server, provisioned; the NATS connection helper."""

import asyncio
import gc
import logging
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from shared import natsio
from shared.settings import Settings, load
from tests.natsd import NatsServer
from tests.waits import until


async def test_provisioned_server_has_every_bucket_and_stream(
    nc: NATS, js: JetStreamContext, settings: Settings
) -> None:
    """Provisioning creates every bucket and stream, and running it again changes nothing."""
    await natsio.provision(js, settings)
    names = {info.config.name for info in await js.streams_info()}
    assert {"chat", "audit"} <= names
    assert {f"KV_{b.name}" for b in natsio.buckets(settings)} <= names


def open_writers(port: int) -> list[asyncio.StreamWriter]:
    """This process's stream sockets to `port` not closed (nor closing)."""
    gc.collect()
    return [
        o
        for o in gc.get_objects()
        if isinstance(o, asyncio.StreamWriter)
        and not o.transport.is_closing()
        and (o.get_extra_info("peername") or ("", 0))[1] == port
    ]


async def test_an_outage_logs_each_kind_of_error_once(
    tmp_path: Path, keys_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While NATS is down the client retries every 0.5 s: its errors are logged once per
    kind, and counted on the reconnect, instead of a line (or a traceback) per attempt.
    The socket of each attempt the imposter cut is closed (nats-py alone leaves it open:
    natsio.Client), so the client holds one socket once reconnected."""
    srv = NatsServer(tmp_path / "nats").start()
    nc = await natsio.connect(load({}, nats_url=[srv.url], var_dir=str(keys_dir)), "probe")
    attempts = 0
    refused = asyncio.Event()

    def refuse(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        w.transport.abort()  # a server that takes the connection and drops it at once
        if attempts >= 6:
            refused.set()

    caplog.set_level(logging.INFO, logger="shared.natsio")
    try:
        srv.stop()
        imposter = await asyncio.start_server(refuse, "127.0.0.1", srv.port)
        await asyncio.wait_for(refused.wait(), 30)
        imposter.close()
        await imposter.wait_closed()
        srv.start()

        def reconnected() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.getMessage() == "nats reconnected"]

        await until(lambda: bool(reconnected()), "the log to say the client reconnected", 15)
        assert len(open_writers(srv.port)) == 1
    finally:
        await nc.close()
        srv.stop()
    errors = [r.error for r in caplog.records if r.getMessage() == "nats error"]  # type: ignore[attr-defined]
    assert len(errors) == len(set(errors)), errors  # each kind once
    counted = reconnected()[0].errors  # type: ignore[attr-defined]
    assert sum(counted.values()) >= attempts - 1, (counted, attempts)
