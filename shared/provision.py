"""Idempotent provisioning of every bucket and stream: the stack's own (auth_*, gw_durables:
code, below) and the application's (the resources file, shared/resources.py).

`provision` creates what is missing and brings existing ones to the declared config in
place. It never destroys data: a change NATS cannot make in place (storage), or a limit
lowered below what is stored (max_bytes, max_age, history), is not applied but reported
as drift; so is a stream in NATS that nothing declares. Run it again after fixing the
file or migrating the data by hand.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError

from shared import kvwire, resources
from shared.capabilities import DURABLES_BUCKET, DURABLES_WATCH
from shared.settings import Settings

log = logging.getLogger("shared.provision")


@dataclass(frozen=True, slots=True)
class Bucket:
    name: str
    history: int = 1
    ttl: float | None = None  # seconds; None = keep forever
    max_bytes: int | None = None  # None: the settings' default
    replicas: int | None = None
    storage: resources.Storage = "file"
    system: bool = False  # the stack's own
    marker_ttl: float | None = None  # per-message TTLs, expiries leave markers (seconds)


@dataclass(frozen=True, slots=True)
class Stream:
    name: str
    subjects: tuple[str, ...]
    max_age: float | None = None
    max_bytes: int | None = None
    replicas: int | None = None
    storage: resources.Storage = "file"


@dataclass(slots=True)
class Report:
    """What a provisioning run did, and what it left differing (each a readable line)."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return (
            [f"created {x}" for x in self.created]
            + [f"updated {x}" for x in self.updated]
            + [f"drift {x}" for x in self.drift]
        )


def _resources(settings: Settings, res: resources.Resources | None) -> resources.Resources:
    return resources.load(settings) if res is None else res


def buckets(settings: Settings, res: resources.Resources | None = None) -> tuple[Bucket, ...]:
    own = (
        Bucket("auth_users", history=5, system=True),
        Bucket("auth_credentials", system=True),
        # A revoked token id only matters until the token would have expired anyway.
        Bucket("auth_revoked", ttl=float(settings.token_ttl + 60), system=True),
        Bucket("auth_roles", history=5, system=True),
        # Durable js_subs (ws_gateway/durables.py): the latest record per durable (saved every
        # second while held). A delete leaves its marker, and a record unused past
        # DURABLE_INACTIVE is kept as "gone": a later open tells either from a new durable.
        # Both last twice DURABLE_INACTIVE, then go: what a user can leave behind is bounded.
        Bucket(DURABLES_BUCKET, ttl=2 * settings.durable_inactive, system=True),
    )
    app = tuple(
        Bucket(name, b.history, b.max_age, b.max_bytes, b.replicas, b.storage, False, b.marker_ttl)
        for name, b in _resources(settings, res).buckets.items()
    )
    return own + app


def streams(settings: Settings, res: resources.Resources | None = None) -> tuple[Stream, ...]:
    return tuple(
        Stream(name, tuple(s.subjects), s.max_age, s.max_bytes, s.replicas, s.storage)
        for name, s in _resources(settings, res).streams.items()
    )


def limits(settings: Settings, res: resources.Resources | None = None) -> dict[str, dict[str, int]]:
    """The storage limits of every stream (bucket `b` is the stream `KV_b`), as fields of
    JetStream's stream config (`max_age` in nanoseconds; 0 = none). A full bucket refuses
    writes (KV discards new); a full stream drops its oldest messages."""
    res = _resources(settings, res)
    out: dict[str, dict[str, int]] = {}
    for b in buckets(settings, res):
        default = settings.nats_auth_max_bytes if b.system else settings.nats_data_max_bytes
        out[kvwire.stream_of(b.name)] = {
            "max_bytes": b.max_bytes or default,
            "max_msg_size": settings.nats_max_value_bytes,
            "max_msgs_per_subject": b.history,
            "max_consumers": settings.nats_max_consumers,
        }
    ages = {"chat": settings.nats_chat_max_age, "audit": settings.nats_audit_max_age}
    for s in streams(settings, res):
        out[s.name] = {
            "max_bytes": s.max_bytes or settings.nats_stream_max_bytes,
            "max_msg_size": settings.nats_max_value_bytes,
            "max_consumers": settings.nats_max_consumers,
            "max_age": int((s.max_age or ages.get(s.name, 0.0)) * 1e9),
        }
    return out


def _extra(stream: str) -> dict[str, object]:
    """Config beyond limits: the durables bucket republishes each stored write for the
    gateways that hold durables (ws_gateway/durables.py watches them)."""
    if stream != kvwire.stream_of(DURABLES_BUCKET):
        return {}
    source = kvwire.subject_of(DURABLES_BUCKET, ">")
    return {"republish": {"src": source, "dest": f"{DURABLES_WATCH}.>"}}


async def _follow_ttl(js: JetStreamContext, b: Bucket) -> None:
    """An existing system bucket's TTL follows the settings (auth_revoked: TOKEN_TTL + 60):
    a TTL kept from the bucket's creation would forget revocations of tokens still valid.
    No request when it has it already; the config travels as the server's JSON (as in
    `_apply`), so fields nats-py does not know stay."""
    assert b.ttl is not None
    stream = kvwire.stream_of(b.name)
    info = await js._api_request(f"{js._prefix}.STREAM.INFO.{stream}")
    config: dict[str, object] = info["config"]
    want = int(b.ttl * 1e9)
    old = config.get("max_age")
    if old == want:
        return
    if isinstance(old, int) and old > want:
        # Tokens issued under the longer TTL outlive revocations kept for the shorter one.
        log.warning(
            "bucket ttl lowered",
            extra={"event": "bucket_ttl_lowered", "bucket": b.name, "old": old, "new": want},
        )
    window = config.get("duplicate_window")
    config["max_age"] = want
    config["duplicate_window"] = min(window, want) if isinstance(window, int) and window else want
    await js._api_request(f"{js._prefix}.STREAM.UPDATE.{stream}", json.dumps(config).encode())
    log.info(
        "bucket ttl updated",
        extra={"event": "bucket_ttl_updated", "bucket": b.name, "old": old, "new": want},
    )


def _first_age(state: dict[str, object]) -> float:
    """Seconds since the oldest stored message (0 when empty)."""
    ts = state.get("first_ts")
    if not state.get("messages") or not isinstance(ts, str) or ts.startswith("0001"):
        return 0.0
    head, _, frac = ts.rstrip("Z").partition(".")
    stamp = datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}+00:00")
    return time.time() - stamp.timestamp()


def _data_loss(key: str, old: object, new: object, state: dict[str, object]) -> str | None:
    """Why applying `key: old → new` would drop stored data, or None."""
    if not isinstance(old, int) or not isinstance(new, int):
        return None
    bytes_ = state.get("bytes")
    # A limit of 0 or -1 is none at all: any positive new one is a cut.
    cut = 0 < new and (old <= 0 or new < old)
    if key == "max_bytes" and cut and isinstance(bytes_, int) and bytes_ > new:
        return f"{bytes_} bytes are stored"
    if key == "max_age" and 0 < new and (old == 0 or new < old):
        if _first_age(state) > new / 1e9:
            return "stored messages are older than that"
    if key == "max_msgs_per_subject" and cut and state.get("messages"):
        return "keys may hold more revisions than that"
    return None


async def _apply(
    js: JetStreamContext, stream: str, want: dict[str, object], report: Report
) -> None:
    """Bring an existing stream to `want` where that keeps every stored message; no request
    when it has it already (so the API, whose NATS user may not update streams, can run
    `provision` after the admin CLI). The config travels as the server's JSON, so fields
    nats-py does not know stay."""
    info = await js._api_request(f"{js._prefix}.STREAM.INFO.{stream}")
    config: dict[str, object] = info["config"]
    state: dict[str, object] = info.get("state", {})
    changed: dict[str, object] = {}
    for k, v in want.items():
        old = config.get(k)
        if old == v:
            continue
        if k == "storage":
            report.drift.append(
                f"{stream}: storage is {old}, declared {v}; cannot change in place (kept)"
            )
            continue
        loss = _data_loss(k, old, v, state)
        if loss is not None:
            report.drift.append(f"{stream}: {k} {old} → {v} not applied: {loss}")
            continue
        changed[k] = v
    if not changed:
        return
    old_values = {k: config.get(k) for k in changed}
    config.update(changed)
    await js._api_request(f"{js._prefix}.STREAM.UPDATE.{stream}", json.dumps(config).encode())
    moved = ", ".join(f"{k} {old_values[k]} → {v}" for k, v in changed.items())
    report.updated.append(f"{stream}: {moved}")
    log.info(
        "stream limits updated",
        extra={"event": "limits_updated", "stream": stream, "old": old_values, "new": changed},
    )


def _storage(name: resources.Storage) -> api.StorageType:
    return api.StorageType.MEMORY if name == "memory" else api.StorageType.FILE


async def provision(
    js: JetStreamContext, settings: Settings, res: resources.Resources | None = None
) -> Report:
    """Create every bucket and stream (system and declared) with its limits (`limits`),
    and bring existing ones to them without losing data; safe to run any number of times."""
    res = _resources(settings, res)
    report = Report()
    caps = limits(settings, res)
    wants: dict[str, dict[str, object]] = {}
    fresh: set[str] = set()  # created now: what `_apply` completes is not news
    for b in buckets(settings, res):
        stream = kvwire.stream_of(b.name)
        cap = caps[stream]
        replicas = b.replicas or settings.nats_replicas
        config = api.KeyValueConfig(
            bucket=b.name,
            history=b.history,
            ttl=b.ttl,
            replicas=replicas,
            storage=_storage(b.storage),
            max_bytes=cap["max_bytes"],
            max_value_size=cap["max_msg_size"],
        )
        wants[stream] = {**cap, "num_replicas": replicas, "storage": b.storage}
        if not b.system and b.ttl is not None:
            wants[stream]["max_age"] = int(b.ttl * 1e9)
        if b.marker_ttl is not None:
            # Set through the server's JSON (`_apply`), on new and old buckets alike: once
            # on, NATS never turns per-message TTLs off again.
            wants[stream]["allow_msg_ttl"] = True
            wants[stream]["subject_delete_marker_ttl"] = int(b.marker_ttl * 1e9)
        try:
            await js.key_value(b.name)
        except BucketNotFoundError:
            await js.create_key_value(config)
            fresh.add(stream)
            report.created.append(f"bucket {b.name}")
            log.info("created bucket %s", b.name)
            continue
        if b.system and b.ttl is not None:
            await _follow_ttl(js, b)
    for s in streams(settings, res):
        cap = caps[s.name]
        replicas = s.replicas or settings.nats_replicas
        config2 = api.StreamConfig(
            name=s.name,
            subjects=list(s.subjects),
            num_replicas=replicas,
            storage=_storage(s.storage),
            max_age=cap["max_age"] / 1e9 or None,
            max_bytes=cap["max_bytes"],
            max_msg_size=cap["max_msg_size"],
            max_consumers=cap["max_consumers"],
            duplicate_window=120.0,  # the Idempotency-Key window of chat.send
            allow_direct=True,  # the gateway's shared history reads (direct get batch)
        )
        wants[s.name] = {
            **cap,
            "subjects": list(s.subjects),
            "num_replicas": replicas,
            "storage": s.storage,
        }
        try:
            await js.stream_info(s.name)
        except NotFoundError:
            await js.add_stream(config2)
            fresh.add(s.name)
            report.created.append(f"stream {s.name}")
            log.info("created stream %s", s.name)
    for stream, want in wants.items():
        # allow_direct: also turned on for streams made before the gateway read history
        # through direct get (and for buckets, where nats-py already sets it).
        target = Report() if stream in fresh else report
        await _apply(js, stream, {**want, "allow_direct": True, **_extra(stream)}, target)
    for info in await js.streams_info():
        if info.config.name not in wants:
            report.drift.append(
                f"{info.config.name}: in NATS, not declared in the resources file (kept)"
            )
    for line in report.drift:
        log.warning("provisioning drift", extra={"event": "provision_drift", "drift": line})
    return report
