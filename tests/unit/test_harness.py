"""The test harness itself: a real nats-server, provisioned."""

from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from shared import natsio
from shared.settings import Settings


async def test_provisioned_server_has_every_bucket_and_stream(
    nc: NATS, js: JetStreamContext, settings: Settings
) -> None:
    """Provisioning creates every bucket and stream, and running it again changes nothing."""
    await natsio.provision(js, settings)
    names = {info.config.name for info in await js.streams_info()}
    assert {"chat", "audit"} <= names
    assert {f"KV_{b.name}" for b in natsio.buckets(settings)} <= names
