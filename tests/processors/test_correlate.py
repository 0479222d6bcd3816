import asyncio
import sqlite3

import pytest

from collector.calls import RoomEvent, SQLiteCallStore, call_id_for, get_records
from collector.spans import CALL_ID_ATTRIBUTE, get_attribute
from processors.correlate import CorrelateConfig, CorrelateProcessor
from tests.processors._util import FakeTelemetryHost, batch, resource_spans


@pytest.fixture
async def correlate(tmp_path):
    processor = CorrelateProcessor("correlate", CorrelateConfig(store=tmp_path / "c.db"))
    await processor.start(FakeTelemetryHost())
    yield processor
    await processor.shutdown()


def call_of(rs):
    return get_attribute(rs.resource.attributes, CALL_ID_ATTRIBUTE)


async def test_room_id_on_resource_names_the_call(correlate, tmp_path):
    out = await correlate.process(batch(resource_spans({"livekit.room.id": "RM_1"}, [{}, {}])))
    assert call_of(out.resource_spans[0]) == call_id_for("p1", "RM_1")
    await correlate.flush()
    row = (
        sqlite3.connect(tmp_path / "c.db")
        .execute("SELECT room_id, source, span_count FROM calls")
        .fetchone()
    )
    assert row == ("RM_1", "livekit.room.id", 2)


async def test_same_room_same_call_across_requests_and_projects_differ(correlate):
    a = await correlate.process(batch(resource_spans({"livekit.room.id": "RM_1"}, [{}])))
    b = await correlate.process(batch(resource_spans({"livekit.room.id": "RM_1"}, [{}])))
    c = await correlate.process(
        batch(resource_spans({"livekit.room.id": "RM_1"}, [{}]), project="other")
    )
    assert call_of(a.resource_spans[0]) == call_of(b.resource_spans[0])
    assert call_of(c.resource_spans[0]) != call_of(a.resource_spans[0])


async def test_room_id_wins_over_later_keys(correlate):
    out = await correlate.process(
        batch(resource_spans({"vapi.call.id": "v1", "livekit.room.id": "RM_9"}, [{}]))
    )
    assert call_of(out.resource_spans[0]) == call_id_for("p1", "RM_9")


async def test_span_attribute_key_and_trace_inheritance(correlate):
    trace = b"\x01" * 16
    # Pipecat: only the turn span carries conversation.id; stt in the same trace inherits it.
    first = await correlate.process(
        batch(
            resource_spans(
                {"service.name": "bot"},
                [{"name": "turn", "attributes": {"conversation.id": "conv-1"}}, {"name": "stt"}],
                trace_id=trace,
            )
        )
    )
    assert len(first.resource_spans) == 1
    assert call_of(first.resource_spans[0]) == call_id_for("p1", "conv-1")
    later = await correlate.process(
        batch(resource_spans({"service.name": "bot"}, [{"name": "llm"}], trace_id=trace))
    )
    assert call_of(later.resource_spans[0]) == call_id_for("p1", "conv-1")


async def test_mixed_calls_in_one_resource_are_split(correlate):
    rs = resource_spans(
        {},
        [
            {"name": "a", "attributes": {"vapi.call.id": "v1"}, "trace_id": b"\x02" * 16},
            {"name": "b", "attributes": {"vapi.call.id": "v2"}, "trace_id": b"\x03" * 16},
            {"name": "c", "trace_id": b"\x04" * 16},
        ],
    )
    out = await correlate.process(batch(rs))
    by_call = {
        call_of(r): [s.name for ss in r.scope_spans for s in ss.spans] for r in out.resource_spans
    }
    assert by_call == {
        call_id_for("p1", "v1"): ["a"],
        call_id_for("p1", "v2"): ["b"],
        None: ["c"],
    }


async def test_spans_without_key_pass_without_call(correlate):
    out = await correlate.process(batch(resource_spans({"service.name": "x"}, [{}, {}])))
    assert out is not None and out.span_count == 2 and call_of(out.resource_spans[0]) is None


async def test_client_supplied_call_id_is_replaced(correlate):
    out = await correlate.process(
        batch(resource_spans({CALL_ID_ATTRIBUTE: "call_forged", "service.name": "x"}, [{}]))
    )
    assert call_of(out.resource_spans[0]) is None


async def test_repeated_resources_are_stamped_alike_and_forged_stamps_removed(correlate, tmp_path):
    # A request repeats its resources (one per exported batch of an agent); the outcome
    # of the first is replayed on the others, client-sent call attributes included.
    forged = {"livekit.room.id": "RM_1", CALL_ID_ATTRIBUTE: "call_forged"}
    first = await correlate.process(
        batch(*(resource_spans(forged, [{}]) for _ in range(3)), resource_spans({}, [{}]))
    )
    again = await correlate.process(batch(resource_spans(forged, [{}, {}])))
    other = await correlate.process(batch(resource_spans(forged, [{}]), project="p2"))
    stamped = [*first.resource_spans[:3], *again.resource_spans]
    for rs in stamped:
        assert [kv.key for kv in rs.resource.attributes].count(CALL_ID_ATTRIBUTE) == 1
        assert call_of(rs) == call_id_for("p1", "RM_1")
    assert call_of(first.resource_spans[3]) is None
    assert call_of(other.resource_spans[0]) == call_id_for("p2", "RM_1")
    await correlate.flush()
    counts = sqlite3.connect(tmp_path / "c.db").execute("SELECT project, span_count FROM calls")
    assert sorted(counts) == [("p1", 5), ("p2", 1)]


async def test_a_flush_cancelled_mid_write_counts_its_spans_once(correlate, tmp_path):
    """Shutdown cancels the periodic flush. If the store already applied its counts and
    only the reply was pending (Redis over the network), putting the counts back would
    make the final flush count those spans twice."""
    room = {"livekit.room.id": "RM_once"}
    await correlate.process(batch(resource_spans(room, [{}, {}, {}])))
    await correlate.flush()  # the record exists, with 3 spans
    store = correlate.store
    applied, reply = asyncio.Event(), asyncio.Event()
    record_activity = store.record_activity

    async def applied_then_slow_reply(activity):
        missing = await record_activity(activity)
        applied.set()
        await reply.wait()
        return missing

    store.record_activity = applied_then_slow_reply
    await correlate.process(batch(resource_spans(room, [{}, {}])))
    flushing = asyncio.create_task(correlate.flush())
    await applied.wait()
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    reply.set()
    await correlate.flush()
    counts = sqlite3.connect(tmp_path / "c.db").execute("SELECT span_count FROM calls")
    assert list(counts) == [(5,)]


def _room(project: str, room: str, skipped: bool) -> RoomEvent:
    return RoomEvent(project, call_id_for(project, room), room, None, None, skipped)


async def test_a_batchs_new_calls_are_checked_for_skip_marks_in_one_read(tmp_path):
    """With ``drop_skipped_calls``, the calls a batch brings that are not in the cache are
    read from the store at once (a request of new calls waited for each read in turn),
    and the marks are cached for the next batches."""
    store = SQLiteCallStore(tmp_path / "c.db")
    await store.start()
    await store.record_room(_room("p1", "RM_skip", True))
    await store.record_room(_room("p1", "RM_keep", False))
    await store.close()
    processor = CorrelateProcessor(
        "correlate", CorrelateConfig(store=tmp_path / "c.db", drop_skipped_calls=True)
    )
    await processor.start(FakeTelemetryHost())
    reads: list[list[str]] = []
    get_many = processor.store.get_many

    async def counted(project, call_ids):
        reads.append(sorted(call_ids))
        return await get_many(project, call_ids)

    processor.store.get_many = counted
    rooms = ["RM_skip", "RM_keep", "RM_new"]
    try:
        request = batch(*(resource_spans({"livekit.room.id": r}, [{}, {}]) for r in rooms))
        out = await processor.process(request)
        assert sorted(get_attribute(rs.resource.attributes, "livekit.room.id") for rs in
                      out.resource_spans) == ["RM_keep", "RM_new"]  # fmt: skip
        assert reads == [sorted(call_id_for("p1", r) for r in rooms)]
        again = await processor.process(batch(resource_spans({"livekit.room.id": "RM_skip"}, [{}])))
        assert again is None and len(reads) == 1  # the mark came from the cache
        dropped = processor._telemetry.value(
            "calltrace_processor_dropped_spans_total", processor="correlate"
        )
        assert dropped == 3
    finally:
        await processor.shutdown()


async def test_stores_without_get_many_are_read_a_call_at_a_time(tmp_path):
    store = SQLiteCallStore(tmp_path / "c.db")
    await store.start()
    try:
        await store.record_room(_room("p1", "RM_a", True))
        ids = [call_id_for("p1", "RM_a"), call_id_for("p1", "RM_none")]

        class OnlyGet:  # a plugin's store: the CallStore protocol without get_many
            get = store.get

        many, one_by_one = await store.get_many("p1", ids), await get_records(OnlyGet(), "p1", ids)
        assert list(many) == list(one_by_one) == [ids[0]]
        assert many[ids[0]] == one_by_one[ids[0]] and many[ids[0]].skipped
        assert await store.get_many("p2", ids) == {}
    finally:
        await store.close()


async def test_new_calls_of_requests_during_a_creation_are_created_together_next(tmp_path):
    """While one request's new call records are being created, the next requests' wait
    and go in one creation after it (one a request made a transaction each, all waiting
    for SQLite's write lock); a flush waits for all of them, without the interval."""
    processor = CorrelateProcessor("correlate", CorrelateConfig(store=tmp_path / "c.db"))
    await processor.start(FakeTelemetryHost())
    created: list[list[str]] = []
    release = asyncio.Event()
    create_many = processor.store.create_many

    async def held(records):
        created.append(sorted(r.room_id for r in records))
        await release.wait()  # the first creation waits, as for the span writer's lock
        await create_many(records)

    processor.store.create_many = held
    try:
        for room in ("RM_1", "RM_2", "RM_3"):
            await processor.process(batch(resource_spans({"livekit.room.id": room}, [{}])))
        await asyncio.sleep(0.01)
        assert created == [["RM_1"]]  # the others wait for it
        await processor.process(batch(resource_spans({"livekit.room.id": "RM_2"}, [{}])))
        release.set()
        await processor.flush()
        assert created == [["RM_1"], ["RM_2", "RM_3"]]  # RM_2 once, though seen twice
        rows = sqlite3.connect(tmp_path / "c.db").execute(
            "SELECT room_id, span_count FROM calls ORDER BY room_id"
        )
        assert rows.fetchall() == [("RM_1", 1), ("RM_2", 2), ("RM_3", 1)]
    finally:
        await processor.shutdown()


async def test_creations_of_call_records_start_at_most_once_an_interval(tmp_path):
    processor = CorrelateProcessor("correlate", CorrelateConfig(store=tmp_path / "c.db"))
    processor.records.CREATE_INTERVAL = 0.3
    await processor.start(FakeTelemetryHost())
    created: list[list[str]] = []
    create_many = processor.store.create_many

    async def counted(records):
        created.append(sorted(r.room_id for r in records))
        await create_many(records)

    processor.store.create_many = counted
    try:
        await processor.process(batch(resource_spans({"livekit.room.id": "RM_1"}, [{}])))
        await asyncio.sleep(0.05)
        assert created == [["RM_1"]]  # the first at once
        for room in ("RM_2", "RM_3"):
            await processor.process(batch(resource_spans({"livekit.room.id": room}, [{}])))
        await asyncio.sleep(0.05)
        assert created == [["RM_1"]]  # the next wait for the interval, together
        for _ in range(100):
            if len(created) == 2:
                break
            await asyncio.sleep(0.05)
        assert created == [["RM_1"], ["RM_2", "RM_3"]]  # and start without a flush
    finally:
        await processor.shutdown()
