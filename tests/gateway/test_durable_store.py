"""The durable store (ws_gateway/durables.py) against a real nats-server: create, take over
by compare-and-set, conflicts, delete and expiry as `gone`, the per-user cap, and one key
per durable however often it is opened."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError

from shared.capabilities import DURABLES_WATCH
from shared.kvlist import live_entries
from shared.settings import Settings
from ws_gateway.durables import (
    DURABLES_BUCKET,
    DurableConflict,
    DurableLimit,
    DurableRecord,
    DurableStore,
    TakenOver,
    durable_key,
)


@pytest.fixture
def store(nc: NATS, js: JetStreamContext, settings: Settings) -> DurableStore:
    return DurableStore(nc, js, settings)


async def _record(js: JetStreamContext, key: str) -> DurableRecord:
    entry = await (await js.key_value(DURABLES_BUCKET)).get(key)
    assert entry.value is not None
    return msgspec.json.decode(entry.value, type=DurableRecord)


async def test_a_new_durable_is_created_at_the_floor_given(
    store: DurableStore, js: JetStreamContext
) -> None:
    """First open: created, not gone, at floor_if_new, holder recorded."""
    lease = await store.open("chat", "u1", "d", "chat.room.1", False, "h1", 41)
    assert (lease.created, lease.gone, lease.floor) == (True, False, 41)
    assert lease.revision > 0
    record = await _record(js, "chat.u1.d")
    assert (record.filter, record.ack, record.floor, record.holder) == (
        "chat.room.1",
        False,
        41,
        "h1",
    )
    assert abs(record.updated - time.time()) < 5


async def test_another_holder_resumes_at_the_saved_floor_and_the_first_is_taken_over(
    store: DurableStore, js: JetStreamContext
) -> None:
    """Reopened by h2: resumed (not created, not gone) at h1's last floor; h1's next save
    raises TakenOver and leaves h2's record alone; h2 saves on."""
    first = await store.open("chat", "u1", "d", "chat.>", True, "h1", 0)
    await first.save(7)
    await first.save(7)  # unchanged floor: still a save
    second = await store.open("chat", "u1", "d", "chat.>", True, "h2", 100)
    assert (second.created, second.gone, second.floor) == (False, False, 7)
    with pytest.raises(TakenOver):
        await first.save(9)
    with pytest.raises(TakenOver):
        await first.save(9)  # and stays so
    await second.save(8)
    record = await _record(js, "chat.u1.d")
    assert (record.holder, record.floor) == ("h2", 8)


async def test_the_older_lease_learns_a_takeover_without_a_save_of_its_own(
    nc: NATS, js: JetStreamContext, settings: Settings
) -> None:
    """Two stores (two gateways): when the second takes the durable over, the first lease is
    `lost` at once, from the bucket's republished write; a delete by the holder ends a
    lease of the other store likewise. The holder's own writes never end its lease."""
    one, two = DurableStore(nc, js, settings), DurableStore(nc, js, settings)
    first = await one.open("chat", "u1", "d", ">", True, "h1", 0)
    await first.save(3)
    second = await two.open("chat", "u1", "d", ">", True, "h2", 0)
    await asyncio.wait_for(first.lost.wait(), 10)
    with pytest.raises(TakenOver):
        await first.save(4)
    third = await one.open("chat", "u1", "d", ">", True, "h3", 0)
    await asyncio.wait_for(second.lost.wait(), 10)
    await third.save(5)
    fourth = await two.open("chat", "u1", "d", ">", True, "h4", 0)
    await asyncio.wait_for(third.lost.wait(), 10)
    fourth.close()
    fifth = await one.open("chat", "u1", "d", ">", True, "h5", 0)
    await fifth.delete()
    assert not fifth.lost.is_set()
    await one.close()
    await two.close()


async def test_a_failed_compare_and_set_is_never_seen_as_a_takeover(
    store: DurableStore, nc: NATS, js: JetStreamContext
) -> None:
    """The bucket republishes stored writes only: a compare-and-set that lost (another
    gateway's stale open) reaches no watch, and the lease saves on."""
    seen: asyncio.Queue[int] = asyncio.Queue()

    async def on_write(msg: object) -> None:
        seen.put_nowait(int(msg.headers["Nats-Sequence"]))  # type: ignore[attr-defined]

    watch = await nc.subscribe(f"{DURABLES_WATCH}.chat.u1.d", cb=on_write)
    lease = await store.open("chat", "u1", "d", ">", True, "h1", 0)
    kv = await js.key_value(DURABLES_BUCKET)
    with pytest.raises(KeyWrongLastSequenceError):
        await kv.update("chat.u1.d", b"{}", last=lease.revision + 7)
    await lease.save(2)
    assert [await asyncio.wait_for(seen.get(), 10) for _ in range(2)] == [1, 2]
    assert seen.empty() and not lease.lost.is_set()
    await lease.save(3)
    await watch.unsubscribe()


async def test_a_durable_of_a_stream_made_again_is_gone(
    store: DurableStore, js: JetStreamContext
) -> None:
    """Opened with another stream creation time than its record's (the stream was deleted
    and made again): created afresh at floor_if_new, gone, with any filter; a record
    without one (an older gateway's) is resumed."""
    lease = await store.open("chat", "u1", "d", "chat.a", True, "h1", 0, stream_created="t1")
    await lease.save(9)
    again = await store.open("chat", "u1", "d", "chat.b", True, "h2", 2, stream_created="t2")
    assert (again.created, again.gone, again.floor) == (True, True, 2)
    assert (await _record(js, "chat.u1.d")).stream_created == "t2"
    old = await store.open("chat", "u1", "e", ">", True, "h3", 4)
    await old.save(5)
    resumed = await store.open("chat", "u1", "e", ">", True, "h4", 0, stream_created="t2")
    assert (resumed.created, resumed.floor) == (False, 5)


async def test_a_durable_asked_for_with_another_filter_or_ack_mode_conflicts(
    store: DurableStore, js: JetStreamContext
) -> None:
    """Another filter or ack mode is DurableConflict naming which; the record is untouched."""
    await store.open("chat", "u1", "d", "chat.room.1", False, "h1", 3)
    with pytest.raises(DurableConflict, match="another filter"):
        await store.open("chat", "u1", "d", "chat.room.2", False, "h2", 0)
    with pytest.raises(DurableConflict, match="another ack mode"):
        await store.open("chat", "u1", "d", "chat.room.1", True, "h2", 0)
    assert (await _record(js, "chat.u1.d")).holder == "h1"


async def test_a_deleted_durable_reopens_gone_and_afresh(
    store: DurableStore, js: JetStreamContext
) -> None:
    """delete() leaves a marker: the next open is created and gone, at floor_if_new, with
    any filter; the deleted lease saves no more."""
    lease = await store.open("chat", "u1", "d", "chat.room.1", True, "h1", 0)
    await lease.save(12)
    await lease.delete()
    with pytest.raises(TakenOver):
        await lease.save(13)
    again = await store.open("chat", "u1", "d", "chat.room.2", False, "h2", 50)
    assert (again.created, again.gone, again.floor) == (True, True, 50)
    assert (await _record(js, "chat.u1.d")).filter == "chat.room.2"


async def test_delete_by_a_lease_that_no_longer_holds_it_is_refused(
    store: DurableStore, js: JetStreamContext
) -> None:
    """Only the holder deletes: the old lease's delete raises TakenOver and the durable stays."""
    old = await store.open("chat", "u1", "d", ">", False, "h1", 0)
    await store.open("chat", "u1", "d", ">", False, "h2", 0)
    with pytest.raises(TakenOver):
        await old.delete()
    assert (await _record(js, "chat.u1.d")).holder == "h2"


async def test_a_lease_behind_its_own_record_saves_and_deletes_on(
    store: DurableStore, js: JetStreamContext
) -> None:
    """A write applied whose reply was lost leaves the lease a revision behind: the record is
    still its holder's, so the next save (and a delete) adopts the revision and succeeds."""
    lease = await store.open("chat", "u1", "d", ">", False, "h1", 0)
    behind = lease.revision
    await lease.save(3)
    lease.revision = behind
    await lease.save(4)
    assert (await _record(js, "chat.u1.d")).floor == 4
    lease.revision = behind
    await lease.delete()
    assert (await store.open("chat", "u1", "d", ">", False, "h2", 0)).gone


async def test_a_record_not_saved_for_durable_inactive_is_gone(
    store: DurableStore, js: JetStreamContext, settings: Settings
) -> None:
    """A record older than durable_inactive opens as gone, afresh: no conflict with its old
    filter, and the floor given."""
    old = DurableRecord(
        filter="chat.room.1",
        ack=True,
        floor=99,
        holder="h0",
        updated=time.time() - settings.durable_inactive - 60,
    )
    kv = await js.key_value(DURABLES_BUCKET)
    await kv.put(durable_key("chat", "u1", "d"), msgspec.json.encode(old))
    lease = await store.open("chat", "u1", "d", "chat.room.2", False, "h1", 5)
    assert (lease.created, lease.gone, lease.floor) == (True, True, 5)
    record = await _record(js, "chat.u1.d")
    assert (record.filter, record.floor, record.holder) == ("chat.room.2", 5, "h1")


async def test_new_durables_are_capped_per_user_and_stream(
    nc: NATS, js: JetStreamContext, settings: Settings
) -> None:
    """At the cap a new durable is DurableLimit; resuming one is free; other users and
    other streams have their own count; a deleted or expired durable frees its place."""
    store = DurableStore(nc, js, msgspec.structs.replace(settings, max_durables_per_user=3))
    leases = [await store.open("chat", "u1", f"d{i}", ">", False, "h", 0) for i in range(3)]
    with pytest.raises(DurableLimit, match="at most 3 durables"):
        await store.open("chat", "u1", "d3", ">", False, "h", 0)
    assert not (await store.open("chat", "u1", "d0", ">", False, "h2", 0)).created
    assert (await store.open("chat", "u2", "d3", ">", False, "h", 0)).created
    assert (await store.open("audit", "u1", "d3", ">", False, "h", 0)).created

    await leases[1].delete()
    await store.open("chat", "u1", "d3", ">", False, "h", 0)
    with pytest.raises(DurableLimit):
        await store.open("chat", "u1", "d4", ">", False, "h", 0)

    stale = DurableRecord(filter=">", ack=False, floor=0, holder="h", updated=0.0)
    kv = await js.key_value(DURABLES_BUCKET)
    await kv.put(durable_key("chat", "u1", "d2"), msgspec.json.encode(stale))
    assert (await store.open("chat", "u1", "d4", ">", False, "h", 0)).created


async def test_two_concurrent_opens_both_succeed_and_the_later_holds_it(
    store: DurableStore, js: JetStreamContext
) -> None:
    """Opened at once by two holders (new, then existing): both opens succeed one after the
    other; the later write's holder is recorded, the earlier lease's save is TakenOver."""
    for floor in (0, 1):
        if floor:
            await (await store.open("chat", "u1", "d", ">", True, "h0", 0)).save(floor)
        a, b = await asyncio.gather(
            store.open("chat", "u1", "d", ">", True, "ha", 0),
            store.open("chat", "u1", "d", ">", True, "hb", 0),
        )
        later, earlier = (a, b) if a.revision > b.revision else (b, a)
        assert (await _record(js, "chat.u1.d")).holder == later.holder
        assert later.floor == earlier.floor == floor
        if not floor:
            assert (earlier.created, later.created) == (True, False)
        with pytest.raises(TakenOver):
            await earlier.save(5)
        await later.save(5)
        await later.delete()


async def test_a_thousand_open_save_cycles_leave_one_key(
    store: DurableStore, js: JetStreamContext
) -> None:
    """1,000 connect/save/resume cycles of one durable: one live key, the last floor."""
    for i in range(1000):
        lease = await store.open("chat", "u1", "d", ">", True, f"h{i}", 0)
        assert lease.floor == i
        await lease.save(i + 1)
    entries = await live_entries(js, DURABLES_BUCKET, values=True)
    assert [e.key for e in entries] == ["chat.u1.d"]
    info = await js.stream_info(f"KV_{DURABLES_BUCKET}")
    assert info.state.messages == 1
    assert (await _record(js, "chat.u1.d")).floor == 1000


@pytest.mark.parametrize(
    ("stream", "uid", "name"),
    [
        ("ch.at", "u1", "d"),
        ("chat", "u.1", "d"),
        ("chat", "u_1", "d"),
        ("chat", "u1", "d*"),
        ("chat", "u1", ""),
    ],
)
def test_names_that_are_not_one_key_token_are_refused(stream: str, uid: str, name: str) -> None:
    """Dots, wildcards, `_` in a uid and empty names never make a key."""
    with pytest.raises(ValueError):
        durable_key(stream, uid, name)
