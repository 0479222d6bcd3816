"""``correlate`` with ``redis:``: call records shared by instances, and what happens
while Redis is away. Against a throwaway redis-server."""

from __future__ import annotations

import asyncio

import pytest

from collector.calls import CallRecord, RedisCallStore, call_id_for
from collector.redisconn import RedisSettings
from collector.spans import CALL_ID_ATTRIBUTE, get_attribute
from processors.correlate import CorrelateConfig, CorrelateProcessor
from tests.processors._util import FakeTelemetryHost, batch, resource_spans
from tests.support import query

pytestmark = pytest.mark.redis


def redis_correlate(url: str, store=None, **extra) -> CorrelateProcessor:
    config = CorrelateConfig.model_validate(
        {"store": store, "redis": {"url": url, "ttl": "24h"}, **extra}
    )
    return CorrelateProcessor("correlate", config)


def call_of(out):
    return get_attribute(out.resource_spans[0].resource.attributes, CALL_ID_ATTRIBUTE)


async def test_two_instances_share_one_call_record(redis_server, tmp_path):
    first = redis_correlate(redis_server.url, store=tmp_path / "a.db")
    second = redis_correlate(redis_server.url, store=tmp_path / "b.db")
    await first.start(FakeTelemetryHost())
    await second.start(FakeTelemetryHost())
    try:
        a = await first.process(batch(resource_spans({"livekit.room.id": "RM_1"}, [{}, {}])))
        await first.flush()  # records are created in the background; this one is first
        # The second instance meets the same room through another attribute, later.
        b = await second.process(batch(resource_spans({"roark.external_id": "RM_1"}, [{}] * 3)))
        await second.flush()
        call_id = call_id_for("p1", "RM_1")
        assert call_of(a) == call_of(b) == call_id

        record = await first.store.get("p1", call_id)
        assert record is not None
        assert (record.room_id, record.source, record.span_count) == (
            "RM_1",
            "livekit.room.id",
            5,
        )
        assert record == await second.store.get("p1", call_id)
        ttl = redis_server.client().ttl(f"calltrace:call:p1:{call_id}")
        assert 0 < ttl <= 24 * 3600
    finally:
        await first.shutdown()
        await second.shutdown()
    # Each instance's local copy holds the shared record's first sight and source.
    copies = [
        query(tmp_path / name, "SELECT room_id, source, first_seen_ns FROM calls")
        for name in ("a.db", "b.db")
    ]
    assert copies[0] == copies[1] == [("RM_1", "livekit.room.id", record.first_seen_ns)]


async def test_concurrent_creates_have_one_winner(redis_server):
    stores = [RedisCallStore(RedisSettings(url=redis_server.url)) for _ in range(8)]
    for store in stores:
        await store.start()
    try:
        records = await asyncio.gather(
            *(
                store.create(CallRecord("p", "call_x", "RM_x", f"source{i}", 100 + i, 100 + i))
                for i, store in enumerate(stores)
            )
        )
        final = await stores[0].get("p", "call_x")
    finally:
        for store in stores:
            await store.close()
    assert len({(r.source, r.room_id) for r in records}) == 1  # everyone got the winner's
    assert final is not None and final.source == records[0].source
    # a later writer may only move first sight earlier
    assert final.first_seen_ns == 100


async def test_calls_keep_flowing_while_redis_is_down(redis_server, tmp_path):
    processor = redis_correlate(
        redis_server.url,
        store=tmp_path / "c.db",
        flush_interval="50ms",
        store_retry_interval="50ms",
    )
    await processor.start(FakeTelemetryHost())
    try:
        redis_server.kill()
        out = await processor.process(batch(resource_spans({"livekit.room.id": "RM_down"}, [{}])))
        assert call_of(out) == call_id_for("p1", "RM_down")  # ids never wait for Redis
        out = await processor.process(batch(resource_spans({"livekit.room.id": "RM_down"}, [{}])))
        assert call_of(out) == call_id_for("p1", "RM_down")
        await asyncio.sleep(0.2)  # a few failed flushes
        redis_server.start()

        async def saved():
            record = await processor.store.get("p1", call_id_for("p1", "RM_down"))
            return record is not None and record.span_count == 2

        for _ in range(200):
            if await saved():
                break
            await asyncio.sleep(0.05)
        assert await saved()
    finally:
        await processor.shutdown()
    assert query(tmp_path / "c.db", "SELECT room_id, span_count FROM calls") == [("RM_down", 2)]


async def test_records_waiting_for_redis_are_bounded(redis_server):
    processor = redis_correlate(redis_server.url, cache_size=2, store_retry_interval="10s")
    await processor.start(FakeTelemetryHost())
    try:
        redis_server.kill()
        for room in ("RM_a", "RM_b", "RM_c"):
            await processor.process(batch(resource_spans({"livekit.room.id": room}, [{}])))
        # Records are created in the background: let those creations fail while Redis is
        # down (the flush itself fails too, and says so).
        with pytest.raises(Exception):  # noqa: B017 - any connection error will do
            await processor.flush()
        redis_server.start()
        await processor.flush()
        stored = {
            room
            for room in ("RM_a", "RM_b", "RM_c")
            if await processor.store.get("p1", call_id_for("p1", room)) is not None
        }
        assert stored == {"RM_b", "RM_c"}  # the oldest was forgotten
        # ... until its call shows up again
        await processor.process(batch(resource_spans({"livekit.room.id": "RM_a"}, [{}])))
        await processor.flush()
        assert await processor.store.get("p1", call_id_for("p1", "RM_a")) is not None
    finally:
        await processor.shutdown()


async def test_records_are_read_many_at_once_and_absent_ones_left_out(redis_server):
    store = RedisCallStore(RedisSettings(url=redis_server.url))
    await store.start()
    try:
        ids = [call_id_for("acme", "RM_many_a"), call_id_for("acme", "RM_many_b")]
        created = await store.create(
            CallRecord("acme", ids[0], "RM_many_a", "livekit.room.id", 1, 2)
        )
        missing = call_id_for("acme", "RM_never")
        found = await store.get_many("acme", [ids[0], missing])
        assert found == {ids[0]: created}
        assert await store.get("acme", ids[0]) == created
        assert await store.get("acme", missing) is None
        assert await store.get_many("acme", []) == {}
    finally:
        await store.close()
