"""The postgres exporter against the real PostgreSQL server (127.0.0.1:5432, database test).

Each test works in a schema of its own, dropped afterwards. In CI (CI=true) an
unreachable server fails the tests; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time

import pytest
import requests

from collector import SpanBatch
from collector.calls import call_id_for
from collector.keys import KeyStore
from exporters.postgres import PostgresConfig, PostgresExporter
from tests.exporters.test_sqlite import (
    a_call_with_another_service_in_its_trace,
    add_span,
    call_resource,
)
from tests.processors._util import FakeTelemetryHost
from tests.support import (
    POSTGRES_DSN,
    fixture_requests,
    free_port,
    pipeline_config,
    running_service,
)

DSN = POSTGRES_DSN

pytestmark = pytest.mark.postgres


@pytest.fixture
async def exporter(pg_schema):
    schema, _ = pg_schema
    exporter = PostgresExporter("postgres", PostgresConfig(dsn=DSN, schema=schema))
    await exporter.start(FakeTelemetryHost())
    yield exporter
    await exporter.shutdown()


async def test_spans_traces_calls_stored_idempotently(exporter, pg_schema):
    schema, conn = pg_schema
    trace = os.urandom(16)
    root_id = os.urandom(8)
    child_rs = call_resource("call_1", **{"roark.project.tag.customer": "acme"})
    child = add_span(
        child_rs,
        trace,
        "llm_node",
        2_000,
        5_000,
        parent=root_id,
        **{"gen_ai.request.model": "gpt-4.1"},
    )
    child.status.code = 2
    await exporter.export(SpanBatch([child_rs], "p1"))  # the child before its parent
    root_rs = call_resource("call_1")
    root = add_span(root_rs, trace, "agent_session", 1_000, 9_000)
    root.span_id = root_id
    batch = SpanBatch([root_rs], "p1")
    await exporter.export(batch)
    await exporter.export(batch)  # a retry stores nothing twice

    rows = await conn.fetch(
        f"SELECT name, parent_span_id, call_id, duration_ns, span FROM {schema}.spans"
        " ORDER BY start_ns"
    )
    assert [(r["name"], r["call_id"]) for r in rows] == [
        ("agent_session", "call_1"),
        ("llm_node", "call_1"),
    ]
    assert rows[1]["parent_span_id"] == root_id and rows[1]["duration_ns"] == 3_000
    assert bytes(rows[1]["span"]) == child.SerializeToString()
    trace_row = await conn.fetchrow(
        f"SELECT start_ns, end_ns, root_name, has_error FROM {schema}.traces"
    )
    assert tuple(trace_row) == (1_000, 9_000, "agent_session", True)
    call = await conn.fetchrow(f"SELECT room_id, start_ns, end_ns, tags FROM {schema}.calls")
    assert (call["room_id"], call["start_ns"], call["end_ns"]) == ("RM_x", 1_000, 9_000)
    assert call["tags"] == '{"customer": "acme"}'
    assert (
        await conn.fetchval(
            f"SELECT count(*) FROM {schema}.trace_attrs WHERE key = 'gen_ai.request.model'"
            " AND value = 'gpt-4.1'"
        )
        == 1
    )


async def test_retention(exporter, pg_schema):
    schema, conn = pg_schema
    now = time.time_ns()
    old, new = call_resource("call_old"), call_resource("call_new")
    add_span(old, os.urandom(16), "old", now - 10**12, now - 10**12 + 5)
    add_span(new, os.urandom(16), "new", now, now + 5)
    await exporter.export(SpanBatch([old, new], "p1"))
    assert await exporter.expire(now - 10**9) == 1
    assert [r[0] for r in await conn.fetch(f"SELECT name FROM {schema}.spans")] == ["new"]
    assert [r[0] for r in await conn.fetch(f"SELECT call_id FROM {schema}.calls")] == ["call_new"]


async def test_unreachable_server_is_retryable(pg_schema):
    from collector import RetryableError

    schema, _ = pg_schema
    exporter = PostgresExporter("postgres", PostgresConfig(dsn=DSN, schema=schema))
    await exporter.start(FakeTelemetryHost())
    await exporter._pool.close()  # the server "goes away" under the exporter
    rs = call_resource("call_x")
    add_span(rs, os.urandom(16), "s", 1, 2)
    with pytest.raises(RetryableError):
        await exporter.export(SpanBatch([rs], "p1"))
    exporter._pool = None


async def test_fixture_calls_through_the_pipeline(tmp_path, pg_schema):
    schema, conn = pg_schema
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    config = pipeline_config(port, db)
    config["exporters"] = {"postgres": {"dsn": DSN, "schema": schema}}
    config["service"]["pipelines"]["traces"]["exporters"] = ["postgres"]
    headers = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {key}"}
    async with running_service(config):
        for framework in ("livekit", "pipecat"):
            for path in fixture_requests(framework):
                response = await asyncio.to_thread(
                    requests.post,
                    f"http://127.0.0.1:{port}/v1/traces",
                    data=path.read_bytes(),
                    headers=headers,
                    timeout=10,
                )
                assert response.status_code == 200
        # Shutting the service down (leaving the block) delivers everything queued.
    for room, spans in (("RM_test123", 53), ("RM_test789", 14)):
        assert (
            await conn.fetchval(
                f"SELECT count(*) FROM {schema}.spans WHERE call_id = $1", call_id_for("acme", room)
            )
            == spans
        )
    assert await conn.fetchval(f"SELECT count(*) FROM {schema}.calls") == 2


async def test_values_postgresql_cannot_hold_lose_nothing(exporter, pg_schema):
    """A NaN resource attribute (jsonb has no NaN) or a NUL in a name (text refuses it)
    is stored in a form PostgreSQL accepts; the rest of the batch is not lost with it."""
    schema, conn = pg_schema
    odd = call_resource("call_odd", **{"x.ratio": math.nan, "roark.project.tag.nul": "a\x00b"})
    add_span(odd, os.urandom(16), "tts\x00node", 1_000, 2_000)
    plain = call_resource("call_plain")
    add_span(plain, os.urandom(16), "llm_node", 1_000, 2_000)
    await exporter.export(SpanBatch([odd, plain], "p1"))
    names = [r[0] for r in await conn.fetch(f"SELECT name FROM {schema}.spans ORDER BY name")]
    assert names == ["llm_node", "tts\ufffdnode"]
    attributes = await conn.fetchval(
        f"SELECT r.attributes->>'x.ratio' FROM {schema}.resources r JOIN {schema}.spans s"
        " ON s.resource_digest = r.digest WHERE s.call_id = 'call_odd'"
    )
    assert attributes == "nan"
    tags = await conn.fetchval(f"SELECT tags FROM {schema}.calls WHERE call_id = 'call_odd'")
    assert json.loads(tags) == {"nul": "a\ufffdb"}


async def test_a_schema_made_before_the_summary_cache_gets_its_columns(pg_schema):
    schema, conn = pg_schema
    await conn.execute(
        f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.calls (project TEXT NOT NULL,"
        " call_id TEXT NOT NULL, room_id TEXT NOT NULL, source TEXT NOT NULL,"
        " first_seen_ns BIGINT NOT NULL, last_seen_ns BIGINT NOT NULL, start_ns BIGINT,"
        " end_ns BIGINT, service TEXT, tags JSONB, skipped BOOLEAN NOT NULL DEFAULT false,"
        " room_name TEXT, metadata TEXT, PRIMARY KEY (project, call_id))"
    )
    exporter = PostgresExporter("postgres", PostgresConfig(dsn=DSN, schema=schema))
    await exporter.start(FakeTelemetryHost())
    try:
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = $1 AND table_name = 'calls'",
            schema,
        )
        assert {"summary", "summary_spans"} <= {r[0] for r in columns}
    finally:
        await exporter.shutdown()


async def test_a_call_is_the_whole_of_its_traces(exporter):
    """As in the sqlite store: a span of another service in the call's trace (no room id
    on its resource) is part of the call's tree and count; another call's trace is not."""
    from collector.query import CallFilter

    await exporter.export(a_call_with_another_service_in_its_trace())
    store = exporter.query_store()
    call = await store.call("p1", "call_1")
    assert call is not None
    assert sorted(span["name"] for span in call["spans"]) == ["agent_session", "tool_backend"]
    listed = {c["call_id"]: c["span_count"] for c in (await store.calls("p1", CallFilter())).items}
    assert listed == {"call_1": 2, "call_2": 1}
