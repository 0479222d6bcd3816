"""The sqlite exporter: every field stored, idempotent, order-free, retention."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time

import pytest

from collector import CALL_ID_ATTRIBUTE, SpanBatch, set_attribute
from collector.calls import CallRecord, SQLiteCallStore
from collector.query import CallFilter, TraceFilter
from collector.spans import CALL_KEY_ATTRIBUTE, CALL_SOURCE_ATTRIBUTE, ResourceSpans, Span
from collector.storage import write_lock
from exporters.sqlite import SQLiteConfig, SQLiteExporter, attribute_text, connect
from exporters.sqlite_query import SQLiteQueryStore
from tests.processors._util import FakeTelemetryHost
from tests.support import query


def call_resource(call_id: str | None, **attributes) -> ResourceSpans:
    rs = ResourceSpans()
    for key, value in {"service.name": "agent", **attributes}.items():
        set_attribute(rs.resource.attributes, key, value)
    if call_id:
        set_attribute(rs.resource.attributes, CALL_ID_ATTRIBUTE, call_id)
        set_attribute(rs.resource.attributes, CALL_KEY_ATTRIBUTE, "RM_x")
        set_attribute(rs.resource.attributes, CALL_SOURCE_ATTRIBUTE, "livekit.room.id")
    rs.scope_spans.add().scope.name = "livekit-agents"
    return rs


def add_span(
    rs: ResourceSpans, trace_id: bytes, name: str, start: int, end: int, parent=b"", **attributes
) -> Span:
    span = rs.scope_spans[0].spans.add(
        trace_id=trace_id,
        span_id=os.urandom(8),
        parent_span_id=parent,
        name=name,
        start_time_unix_nano=start,
        end_time_unix_nano=end,
        kind=Span.SPAN_KIND_INTERNAL,
    )
    for key, value in attributes.items():
        set_attribute(span.attributes, key, value)
    return span


@pytest.fixture(params=["process", "thread"])
async def exporter(tmp_path, request):
    config = SQLiteConfig(path=tmp_path / "db.sqlite", writer=request.param)
    exporter = SQLiteExporter("sqlite", config)
    await exporter.start(FakeTelemetryHost())
    yield exporter
    await exporter.shutdown()


async def test_children_before_parents_and_every_field_kept(exporter):
    trace = os.urandom(16)
    child_rs = call_resource("call_1", **{"roark.project.tag.customer": "acme"})
    root_id = os.urandom(8)
    child = add_span(
        child_rs,
        trace,
        "llm_node",
        2_000,
        5_000,
        parent=root_id,
        **{"lk.response.ttft": 0.1, "gen_ai.request.model": "gpt-4.1"},
    )
    child.events.add(name="generation", time_unix_nano=3_000)
    child.links.add(trace_id=os.urandom(16), span_id=os.urandom(8))
    child.status.code = 2
    child.status.message = "boom"
    await exporter.export(SpanBatch([child_rs], "p1"))  # the child first, as LiveKit does

    root_rs = call_resource("call_1")
    root = add_span(root_rs, trace, "agent_session", 1_000, 9_000)
    root.span_id = root_id
    await exporter.export(SpanBatch([root_rs], "p1"))

    db = exporter.path
    rows = query(
        db,
        "SELECT name, parent_span_id, call_id, project, duration_ns, status_code,"
        " span FROM spans ORDER BY start_ns",
    )
    assert [(r[0], r[2], r[3]) for r in rows] == [
        ("agent_session", "call_1", "p1"),
        ("llm_node", "call_1", "p1"),
    ]
    assert rows[1][1] == root_id and rows[1][4] == 3_000 and rows[1][5] == 2
    stored = Span.FromString(rows[1][6])
    assert stored == child  # attributes, events, links, status round-trip exactly
    assert query(db, "SELECT start_ns, end_ns, root_name, has_error FROM traces") == [
        (1_000, 9_000, "agent_session", 1)
    ]
    assert query(db, "SELECT room_id, source, start_ns, end_ns, service, tags FROM calls") == [
        ("RM_x", "livekit.room.id", 1_000, 9_000, "agent", '{"customer": "acme"}')
    ]
    names = "SELECT n.project, n.name, t.trace_id FROM trace_names n JOIN traces t ON t.seq = n.trace_seq"
    assert set(query(db, names)) == {
        ("p1", "llm_node", trace),
        ("p1", "agent_session", trace),
    }
    assert query(db, "SELECT project, call_id, trace_id FROM call_traces") == [
        ("p1", "call_1", trace)
    ]
    store = exporter.query_store()
    for pair in [
        ("gen_ai.request.model", "gpt-4.1"),
        ("lk.response.ttft", "0.1"),
        ("service.name", "agent"),
        ("roark.project.tag.customer", "acme"),
    ]:
        found = await store.traces("p1", TraceFilter(attributes=[pair]))
        assert [t["trace_id"] for t in found.items] == [trace.hex()], pair
        # Exact, and per project: no near value, no other project's trace.
        assert not (await store.traces("p1", TraceFilter(attributes=[(pair[0], "x")]))).items
        assert not (await store.traces("p2", TraceFilter(attributes=[pair]))).items
    by_tag = await store.calls("p1", CallFilter(tags=[("customer", "acme")]))
    assert [c["call_id"] for c in by_tag.items] == ["call_1"]


async def test_retried_batch_stores_nothing_twice(exporter):
    rs = call_resource("call_2")
    trace = os.urandom(16)
    for i in range(5):
        add_span(rs, trace, f"s{i}", i, i + 10)
    batch = SpanBatch([rs], "p1")
    await exporter.export(batch)
    await exporter.export(batch)
    assert query(exporter.path, "SELECT count(*) FROM spans")[0][0] == 5
    # The same ids in another project are another span.
    await exporter.export(SpanBatch([rs], "p2"))
    assert query(exporter.path, "SELECT count(*) FROM spans")[0][0] == 10


async def test_spans_without_call_are_stored(exporter):
    rs = call_resource(None)
    add_span(rs, os.urandom(16), "orphan", 1, 2)
    await exporter.export(SpanBatch([rs], None))
    assert query(exporter.path, "SELECT call_id, project FROM spans") == [(None, "")]
    assert query(exporter.path, "SELECT count(*) FROM calls")[0][0] == 0


async def test_retention_deletes_old_data(exporter):
    now = time.time_ns()
    old, new = call_resource("call_old"), call_resource("call_new")
    add_span(old, os.urandom(16), "old", now - 10**12, now - 10**12 + 5, **{"k": "v1"})
    add_span(new, os.urandom(16), "new", now, now + 5, **{"k": "v2"})
    await exporter.export(SpanBatch([old, new], "p1"))
    deleted = await exporter.expire(now - 10**9)
    assert deleted == 1
    db = exporter.path
    assert query(db, "SELECT name FROM spans") == [("new",)]
    assert query(db, "SELECT call_id FROM calls") == [("call_new",)]
    store = exporter.query_store()
    assert not (await store.traces("p1", TraceFilter(attributes=[("k", "v1")]))).items
    assert (await store.traces("p1", TraceFilter(attributes=[("k", "v2")]))).items
    assert query(db, "SELECT count(*) FROM trace_search")[0][0] == 1
    assert query(db, "SELECT count(*) FROM traces")[0][0] == 1
    assert query(db, "SELECT name FROM trace_names") == [("new",)]
    assert query(db, "SELECT call_id FROM call_traces") == [("call_new",)]


def a_call_with_another_service_in_its_trace() -> SpanBatch:
    """call_1's trace holds a span of a service without a room id; call_2 is apart."""
    trace, other = os.urandom(16), os.urandom(16)
    agent, tool, next_call = call_resource("call_1"), call_resource(None), call_resource("call_2")
    root = add_span(agent, trace, "agent_session", 1_000, 9_000)
    add_span(tool, trace, "tool_backend", 2_000, 3_000, parent=root.span_id)
    add_span(next_call, other, "agent_session", 10_000, 19_000)
    return SpanBatch([agent, tool, next_call], "p1")


async def test_a_call_is_the_whole_of_its_traces(exporter):
    """A span of another service in the call's trace (no room id on its resource) is
    part of the call's tree; a trace of another call is not."""
    await exporter.export(a_call_with_another_service_in_its_trace())
    store = exporter.query_store()
    call = await store.call("p1", "call_1")
    assert call is not None
    assert sorted(span["name"] for span in call["spans"]) == ["agent_session", "tool_backend"]
    assert call["call"]["span_count"] == 2


async def test_every_resource_of_a_trace_is_searchable(exporter):
    """A trace with spans under two resources in one batch is found by either
    resource's attributes."""
    trace = os.urandom(16)
    agent, tool = call_resource("call_1"), call_resource(None, **{"service.name": "tools"})
    add_span(agent, trace, "agent_session", 1_000, 9_000)
    add_span(tool, trace, "tool_backend", 2_000, 3_000)
    await exporter.export(SpanBatch([agent, tool], "p1"))
    store = exporter.query_store()
    for service in ("agent", "tools"):
        found = await store.traces("p1", TraceFilter(attributes=[("service.name", service)]))
        assert [t["trace_id"] for t in found.items] == [trace.hex()], service


async def test_the_checkpointer_copies_the_wal_into_the_database(exporter):
    """Checkpoints run on their own thread while the writer keeps the file open (the
    writer's own automatic checkpoint is off): the database file grows without a
    shutdown."""
    rs = call_resource("call_1")
    trace = os.urandom(16)
    for i in range(2_000):
        add_span(rs, trace, f"span {i}", i, i + 10, **{"text": "x" * 200})
    before = exporter.path.stat().st_size
    await exporter.export(SpanBatch([rs], "p1"))
    deadline = time.monotonic() + 10
    while exporter.path.stat().st_size <= before + 400_000 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert exporter.path.stat().st_size > before + 400_000  # 2,000 spans of 200+ bytes


async def test_commits_during_the_checkpointers_pause_are_checkpointed_after_it(exporter):
    """Checkpoints follow commits at most once an interval: a commit that comes while
    the checkpointer pauses is copied into the database once the pause is over."""
    before = exporter.path.stat().st_size
    for batch_number in range(5):  # one commit right after another
        rs = call_resource(f"call_{batch_number}")
        trace = os.urandom(16)
        for i in range(400):
            add_span(rs, trace, f"span {i}", i, i + 10, **{"text": "x" * 1000})
        await exporter.export(SpanBatch([rs], "p1"))
    deadline = time.monotonic() + 10
    while exporter.path.stat().st_size <= before + 2_000_000 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    # 2,000 spans of 1,000+ bytes: without the last batch it would be under 1.8 MB
    assert exporter.path.stat().st_size > before + 2_000_000


# The layout of files written before spans were keyed by trace seq (user_version 0).
LAYOUT_0 = """
CREATE TABLE IF NOT EXISTS spans (
  project TEXT NOT NULL, trace_id BLOB NOT NULL, span_id BLOB NOT NULL,
  parent_span_id BLOB, name TEXT NOT NULL, kind INTEGER NOT NULL,
  start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL, duration_ns INTEGER NOT NULL,
  status_code INTEGER NOT NULL, call_id TEXT, resource_id INTEGER NOT NULL,
  scope_id INTEGER NOT NULL, span BLOB NOT NULL);
-- The one index on spans (a trace's spans, and no span stored twice). Calls and names
-- find spans through their traces, in the per-trace tables below: an index per span on
-- call or name cost more than the span row itself (measured: 18 -> 11 us a span).
CREATE UNIQUE INDEX IF NOT EXISTS spans_identity ON spans (project, trace_id, span_id);
DROP INDEX IF EXISTS spans_by_name;
DROP INDEX IF EXISTS spans_by_start;
CREATE TABLE IF NOT EXISTS resources (
  resource_id INTEGER PRIMARY KEY, digest BLOB NOT NULL UNIQUE, service TEXT,
  attributes TEXT NOT NULL, resource BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS scopes (
  scope_id INTEGER PRIMARY KEY, digest BLOB NOT NULL UNIQUE, name TEXT, version TEXT,
  scope BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS traces (
  project TEXT NOT NULL, trace_id BLOB NOT NULL, call_id TEXT, service TEXT,
  start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL, duration_ns INTEGER NOT NULL,
  root_name TEXT, root_span_id BLOB, has_error INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (project, trace_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS traces_by_start ON traces (project, start_ns DESC, trace_id);
CREATE INDEX IF NOT EXISTS traces_by_duration ON traces (project, duration_ns DESC);
CREATE INDEX IF NOT EXISTS traces_by_call ON traces (project, call_id);
CREATE VIRTUAL TABLE IF NOT EXISTS trace_search USING fts5(
  project UNINDEXED, trace_id UNINDEXED, terms, detail=none, columnsize=0);
CREATE TABLE IF NOT EXISTS span_names (
  project TEXT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (project, name)) WITHOUT ROWID;
-- the traces holding a span of that name (trace search by name)
CREATE TABLE IF NOT EXISTS trace_names (
  project TEXT NOT NULL, name TEXT NOT NULL, trace_id BLOB NOT NULL,
  PRIMARY KEY (project, name, trace_id)) WITHOUT ROWID;
-- the traces holding a span of that call (a call's spans)
CREATE TABLE IF NOT EXISTS call_traces (
  project TEXT NOT NULL, call_id TEXT NOT NULL, trace_id BLOB NOT NULL,
  PRIMARY KEY (project, call_id, trace_id)) WITHOUT ROWID;
"""


def _layout_0_file(path):
    """A file as calltrace wrote it before (with per-span indexes older still): two
    traces, the second with a span of a call; no trace_names rows, as those files had."""
    db = sqlite3.connect(path)
    db.executescript(LAYOUT_0)
    db.execute("CREATE INDEX spans_by_call ON spans (project, call_id, start_ns)")
    db.execute("CREATE INDEX spans_by_name_trace ON spans (project, name, trace_id)")
    spans = [
        (b"\x01" * 16, b"\x01" * 8, None, "agent_session", 10, 50, None),
        (b"\x01" * 16, b"\x02" * 8, b"\x01" * 8, "llm_node", 20, 30, None),
        (b"\x02" * 16, b"\x03" * 8, None, "agent_session", 5, 8, "call_1"),
    ]
    for trace_id, span_id, parent, name, start, end, call_id in spans:
        db.execute(
            "INSERT INTO spans (project, trace_id, span_id, parent_span_id, name, kind,"
            " start_ns, end_ns, duration_ns, status_code, call_id, resource_id, scope_id, span)"
            " VALUES ('p1', ?, ?, ?, ?, 1, ?, ?, ?, 0, ?, 1, 1, ?)",
            (
                trace_id,
                span_id,
                parent,
                name,
                start,
                end,
                end - start,
                call_id,
                Span(trace_id=trace_id, span_id=span_id, name=name).SerializeToString(),
            ),
        )
    db.execute(
        "INSERT INTO traces (project, trace_id, call_id, start_ns, end_ns, duration_ns,"
        " root_name, has_error) VALUES ('p1', ?, NULL, 10, 50, 40, 'agent_session', 0)",
        (b"\x01" * 16,),
    )  # the second trace has no row: the migration makes one from its spans
    db.execute("INSERT INTO scopes (scope_id, digest, scope) VALUES (1, x'00', x'')")
    db.commit()
    db.close()


async def test_files_of_layout_0_are_migrated(tmp_path):
    """Traces get a seq in start order, spans and trace names are keyed by it, the
    per-span indexes go, and the query store reads the migrated file."""
    path = tmp_path / "old.db"
    _layout_0_file(path)
    db = connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (2,)
    indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert not indexes & {"spans_by_call", "spans_by_name_trace", "spans_identity"}
    assert {"spans_by_trace", "traces_identity", "traces_by_start"} <= indexes
    assert db.execute(
        "SELECT trace_id, seq, start_ns, end_ns FROM traces ORDER BY seq"
    ).fetchall() == [
        (b"\x01" * 16, 1, 10, 50),
        (b"\x02" * 16, 2, 5, 8),  # made from its spans, after the traces that had rows
    ]
    assert db.execute("SELECT name, trace_seq FROM spans ORDER BY rowid").fetchall() == [
        ("agent_session", 1),
        ("llm_node", 1),
        ("agent_session", 2),
    ]
    assert set(db.execute("SELECT * FROM trace_names").fetchall()) == {
        ("p1", "agent_session", 1),
        ("p1", "llm_node", 1),
        ("p1", "agent_session", 2),
    }
    assert db.execute("SELECT * FROM call_traces").fetchall() == [("p1", "call_1", b"\x02" * 16)]
    db.close()
    connect(path).close()  # opening again migrates nothing more
    store = SQLiteQueryStore(path)
    try:
        trace = await store.trace("p1", b"\x01" * 16)
        assert trace is not None and len(trace["spans"]) == 2
        found = await store.traces("p1", TraceFilter(name="llm_node"))
        assert [t["trace_id"] for t in found.items] == ["01" * 16]
    finally:
        await store.close()


async def test_new_spans_after_migration_join_their_traces(tmp_path):
    """A span of a migrated trace that arrives later gets the same seq."""
    path = tmp_path / "old.db"
    _layout_0_file(path)
    exporter = SQLiteExporter("sqlite", SQLiteConfig(path=path, writer="thread"))
    await exporter.start(FakeTelemetryHost())
    try:
        rs = call_resource(None)
        add_span(rs, b"\x01" * 16, "tts_node", 31, 40, parent=b"\x01" * 8)
        await exporter.export(SpanBatch([rs], "p1"))
        store = exporter.query_store()
        trace = await store.trace("p1", b"\x01" * 16)
        assert trace is not None
        assert sorted(s["name"] for s in trace["spans"]) == [
            "agent_session",
            "llm_node",
            "tts_node",
        ]
    finally:
        await exporter.shutdown()


def test_wal_mode_and_retention_config(tmp_path):
    config = SQLiteConfig.model_validate({"path": str(tmp_path / "x.db"), "retention": "720h"})
    assert config.retention == 720 * 3600


async def test_wal_mode(exporter):
    assert query(exporter.path, "PRAGMA journal_mode")[0][0] == "wal"


def test_attribute_text():
    assert attribute_text(True) == "true"
    assert attribute_text(3) == "3"
    assert attribute_text(2.0) == "2"
    assert attribute_text(0.25) == "0.25"
    assert attribute_text("x" * 300) is None
    assert attribute_text([1]) is None


async def test_retention_runs_on_its_own(tmp_path):
    from tests.support import eventually

    exporter = SQLiteExporter(
        "sqlite",
        SQLiteConfig.model_validate(
            {"path": str(tmp_path / "r.db"), "retention": "1h", "retention_check_interval": "50ms"}
        ),
    )
    await exporter.start(FakeTelemetryHost())
    try:
        now = time.time_ns()
        rs = call_resource("call_r")
        add_span(
            rs, os.urandom(16), "two-hours-old", now - 2 * 3600 * 10**9, now - 2 * 3600 * 10**9
        )
        add_span(rs, os.urandom(16), "fresh", now, now + 5)
        await exporter.export(SpanBatch([rs], "p1"))
        await eventually(lambda: query(exporter.path, "SELECT name FROM spans") == [("fresh",)])
    finally:
        await exporter.shutdown()


async def test_a_killed_writer_process_is_replaced_and_the_batch_retried(tmp_path):
    from collector import RetryableError

    exporter = SQLiteExporter("sqlite", SQLiteConfig(path=tmp_path / "k.db", writer="process"))
    await exporter.start(FakeTelemetryHost())
    try:
        rs = call_resource("call_k")
        add_span(rs, os.urandom(16), "s", 1, 2)
        batch = SpanBatch([rs], "p1")
        await exporter.export(batch)
        for process in list(exporter._pool._processes.values()):  # type: ignore[union-attr]
            process.kill()
            process.join()
        with pytest.raises(RetryableError, match="writer process died"):
            await exporter.export(batch)
        await exporter.export(batch)  # what the exporter helper does next: retry
        rs2 = call_resource("call_k")
        add_span(rs2, os.urandom(16), "after", 3, 4)
        await exporter.export(SpanBatch([rs2], "p1"))
    finally:
        await exporter.shutdown()
    assert sorted(query(exporter.path, "SELECT name FROM spans")) == [("after",), ("s",)]


async def test_exports_in_flight_when_the_writer_process_dies_restart_it_once(tmp_path):
    """The sqlite queue's two consumers can both have a batch in the writer process when
    it dies: both are retried, and one new process takes them (a second restart would
    shut down the first new one, and a retry already given to it)."""
    from collector import RetryableError

    exporter = SQLiteExporter("sqlite", SQLiteConfig(path=tmp_path / "k.db", writer="process"))
    await exporter.start(FakeTelemetryHost())
    made = []
    make = exporter._writer_process
    exporter._writer_process = lambda: made.append(1) or make()  # type: ignore[method-assign]
    try:
        await exporter.export(SpanBatch([call_resource("warm")], "p1"))  # the process is up
        batches = []
        for name, spans in (("a", 20_000), ("b", 1)):  # a's write takes a while
            rs = call_resource(f"call_{name}")
            trace = os.urandom(16)
            for i in range(spans):
                add_span(rs, trace, name, i, i + 1, text="x" * 100)
            batches.append(SpanBatch([rs], "p1"))
        exports = [asyncio.ensure_future(exporter.export(b)) for b in batches]
        while len(exporter._pool._pending_work_items) < 2:  # type: ignore[union-attr]
            await asyncio.sleep(0)  # until both are handed to the pool
        for process in list(exporter._pool._processes.values()):  # type: ignore[union-attr]
            process.kill()
            process.join()
        outcomes = await asyncio.gather(*exports, return_exceptions=True)
        assert all(isinstance(o, RetryableError) for o in outcomes), outcomes
        assert len(made) == 1
        for b in batches:
            await exporter.export(b)
    finally:
        await exporter.shutdown()
    names = query(exporter.path, "SELECT name, count(*) FROM spans GROUP BY name ORDER BY name")
    assert names == [("a", 20_000), ("b", 1)]


async def test_files_with_a_trace_attrs_table_are_migrated(tmp_path):
    """A file from before ``trace_search`` kept a row per (key, value, trace): opening
    it turns them into search documents, and search finds the traces."""
    path = tmp_path / "old.db"
    db = connect(path)
    db.executescript(
        "CREATE TABLE trace_attrs (project TEXT NOT NULL, key TEXT NOT NULL,"
        " value TEXT NOT NULL, trace_id BLOB NOT NULL,"
        " PRIMARY KEY (project, key, value, trace_id)) WITHOUT ROWID;"
        "INSERT INTO trace_attrs VALUES ('p1', 'k', 'v 1', x'01'), ('p1', 'j', 'w', x'01'),"
        " ('p1', 'k', 'v 1', x'02'), ('p2', 'k', 'v 1', x'03');"
        "INSERT INTO traces (project, trace_id, start_ns, end_ns, duration_ns)"
        " VALUES ('p1', x'01', 1, 2, 1), ('p1', x'02', 3, 4, 1), ('p2', x'03', 5, 6, 1);"
    )
    db.close()
    connect(path).close()
    assert not query(path, "SELECT name FROM sqlite_master WHERE name = 'trace_attrs'")
    assert query(path, "SELECT count(*) FROM trace_search")[0][0] == 3  # one per trace
    store = SQLiteQueryStore(path)
    try:
        found = await store.traces("p1", TraceFilter(attributes=[("k", "v 1")]))
        assert [t["trace_id"] for t in found.items] == ["02", "01"]
        found = await store.traces("p1", TraceFilter(attributes=[("k", "v 1"), ("j", "w")]))
        assert [t["trace_id"] for t in found.items] == ["01"]
    finally:
        await store.close()


def test_span_attributes_are_indexed_as_attribute_text_says():
    """build_rows converts span attribute values inline (its hot loop); the text must be
    what attribute_text gives, which resource attributes and searches use."""
    from collector.storage import build_rows

    values = {"b": True, "i": -3, "whole": 2.0, "frac": 0.25, "s": "x", "empty": ""}
    values |= {"long": "y" * 300, "list": [1, 2]}
    rs = call_resource(None)
    trace = os.urandom(16)
    add_span(rs, trace, "s", 1, 2, **values)
    rows = build_rows(SpanBatch([rs], "p1"), 0, lambda *_: 1, lambda _: 1)
    expected = {(k, attribute_text(v)) for k, v in values.items() if attribute_text(v) is not None}
    span_pairs = rows.trace_attrs[trace] - {("service.name", "agent")}
    assert span_pairs == expected
    assert ("empty", "") in expected and ("whole", "2") in expected


@pytest.mark.parametrize("native", [True, False])
async def test_each_span_points_at_its_own_resource(tmp_path, monkeypatch, native):
    """New resources are written after the batch's rows are built, and their ids put in
    place of stand-ins; resources already in the file (from before a restart: not in the
    writer's cache) keep their ids. Both ways: in C and through executemany."""
    from collector import sqlite_files
    from tests.native_support import native_module

    if native:
        native_module()  # the C writer: compared with executemany where it runs
        assert sqlite_files.NATIVE_SQLITE, "collector._wire found no SQLite functions"
    monkeypatch.setattr(sqlite_files, "NATIVE_SQLITE", native)
    config = SQLiteConfig(path=tmp_path / "db.sqlite")

    def batch(*markers: str) -> SpanBatch:
        resources = []
        for marker in markers:
            rs = call_resource(f"call_{marker}", marker=marker)
            add_span(rs, os.urandom(16), f"span of {marker}", 1, 2)
            add_span(rs, os.urandom(16), f"span of {marker}", 3, 4)
            resources.append(rs)
        return SpanBatch(resources, "p1")

    first = SQLiteExporter("sqlite", config)
    await first.start(FakeTelemetryHost())
    await first.export(batch("a", "b"))
    await first.shutdown()
    again = SQLiteExporter("sqlite", config)  # a restart: its cache is empty
    await again.start(FakeTelemetryHost())
    await again.export(batch("c", "a", "d", "c", "b"))
    await again.shutdown()
    rows = query(
        config.path,
        "SELECT s.name, json_extract(r.attributes, '$.marker') FROM spans s"
        " JOIN resources r USING (resource_id)",
    )
    assert len(rows) == 14
    assert all(name == f"span of {marker}" for name, marker in rows)
    assert query(config.path, "SELECT count(*) FROM resources") == [(4,)]


def test_connections_to_one_file_share_one_write_lock(tmp_path):
    lock = write_lock(tmp_path / "calltrace.db")
    assert write_lock(f"{tmp_path}/./calltrace.db") is lock
    assert write_lock(tmp_path / "other.db") is not lock


async def test_call_records_wait_for_the_span_writers_transaction(tmp_path):
    """correlate's call records and the exporter's spans share the default file: a
    record written while the writer holds the file's write lock waits for it (on the
    lock, not in SQLite's polling busy handler) and is written once it is let go."""
    path = tmp_path / "calltrace.db"
    store = SQLiteCallStore(path)
    await store.start()
    lock = write_lock(path)
    try:
        with lock:
            creating = asyncio.ensure_future(
                store.create_many([CallRecord("p", "c1", "RM_1", "livekit.room.id", 1, 1)])
            )
            await asyncio.sleep(0.2)
            assert not creating.done()
            assert query(path, "SELECT count(*) FROM calls") == [(0,)]
        await asyncio.wait_for(creating, 10)
        assert query(path, "SELECT call_id FROM calls") == [("c1",)]
    finally:
        await store.close()
