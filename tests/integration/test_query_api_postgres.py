"""The query API over PostgreSQL storage: the SQLite scenarios, answered the same way.

The dataset of ``tests/query_dataset.py`` is ingested through the real OTLP receiver into
a schema of its own on the test PostgreSQL server (127.0.0.1:5432, database test; the
schema is dropped afterwards), with ``service.query.storage: postgres``. The scenario
tests of ``test_query_api.py`` are collected here again, so each one runs against this
storage with the same expectations; every response is still validated against the
OpenAPI document. Below them, what is PostgreSQL's own: its summary cache, its plans, an
unreachable server. In CI (CI=true) an unreachable server fails these tests; elsewhere
they are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from collector.api import QueryAPI
from collector.query import CallFilter, StorageUnavailableError, TraceFilter, encode_cursor
from collector.spans import ExportTraceServiceRequest
from exporters.postgres_query import PostgresQueryStore, calls_sql, traces_sql
from tests.integration.test_query_api import Api, check_against_openapi
from tests.integration.test_query_api import api as api
from tests.integration.test_query_api import (
    test_a_cursor_of_another_shape_is_400 as test_a_cursor_of_another_shape_is_400,
)
from tests.integration.test_query_api import (
    test_a_key_sees_only_its_project as test_a_key_sees_only_its_project,
)
from tests.integration.test_query_api import (
    test_bad_parameters_are_400_with_a_message as test_bad_parameters_are_400_with_a_message,
)
from tests.integration.test_query_api import (
    test_call_filters as test_call_filters,
)
from tests.integration.test_query_api import (
    test_call_tree_livekit as test_call_tree_livekit,
)
from tests.integration.test_query_api import (
    test_call_tree_pipecat as test_call_tree_pipecat,
)
from tests.integration.test_query_api import (
    test_call_without_its_root_shows_orphans_under_placeholders as test_call_without_its_root_shows_orphans_under_placeholders,
)
from tests.integration.test_query_api import (
    test_calls_newest_first_with_turn_totals as test_calls_newest_first_with_turn_totals,
)
from tests.integration.test_query_api import (
    test_paging_has_no_gaps_or_repeats as test_paging_has_no_gaps_or_repeats,
)
from tests.integration.test_query_api import (
    test_span_names_are_returned_as_data as test_span_names_are_returned_as_data,
)
from tests.integration.test_query_api import (
    test_trace_search_filters as test_trace_search_filters,
)
from tests.integration.test_query_api import (
    test_trace_tree as test_trace_tree,
)
from tests.integration.test_query_api import (
    test_unknown_ids_are_404 as test_unknown_ids_are_404,
)
from tests.integration.test_query_api import (
    test_without_a_valid_key_is_401 as test_without_a_valid_key_is_401,
)
from tests.query_dataset import Dataset, make_dataset
from tests.support import (
    POSTGRES_DSN,
    fixture_requests,
    free_port,
    postgres_execute,
    running_service,
)

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataset]:
    """The query dataset with its spans in PostgreSQL (``api`` reads it through this)."""
    schema = f"ct_api_{uuid.uuid4().hex[:12]}"
    postgres_execute("SELECT 1")  # skip (or fail in CI) before ingesting anything
    try:
        yield make_dataset(tmp_path_factory.mktemp("query_pg"), postgres_schema=schema)
    finally:
        postgres_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
async def pg(dataset: Dataset) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    try:
        yield conn
    finally:
        await conn.close()


def test_every_scenario_of_the_sqlite_module_runs_here() -> None:
    """A scenario added to test_query_api.py must be collected here too (or listed as
    SQLite's own below), so the two storages cannot drift apart unnoticed."""
    import tests.integration.test_query_api as sqlite_module

    sqlite_only = {
        # These read the SQLite file directly; their PostgreSQL versions are below.
        "test_summary_cache_is_kept_and_used",
        "test_summary_is_recomputed_when_spans_arrive",
        "test_queries_walk_indexes",
        # Storage-independent: the document, the static files, how the service mounts.
        "test_openapi_document_is_served_and_valid",
        "test_explorer_files_are_served_with_a_strict_policy",
        "test_dataset_posts_each_framework_capture",
        "test_storage_must_offer_queries",
        "test_query_api_can_be_turned_off",
        "test_without_auth_the_api_shows_data_stored_without_a_project",
    }
    scenarios = {name for name in vars(sqlite_module) if name.startswith("test_")}
    here = {name for name in globals() if name.startswith("test_")}
    assert scenarios - sqlite_only - here == set()


# -- the summary cache ------------------------------------------------------------------


async def test_summary_cache_is_kept_and_used(
    api: Api, dataset: Dataset, pg: asyncpg.Connection
) -> None:
    schema = dataset.postgres_schema
    await api.ok("/api/v1/calls")
    cached = await pg.fetch(
        f"SELECT c.summary, c.summary_spans, (SELECT count(*) FROM {schema}.spans s"
        " WHERE s.project = c.project AND s.call_id = c.call_id) AS spans"
        f" FROM {schema}.calls c WHERE c.project = 'acme'"
    )
    assert len(cached) == len(dataset.rooms)
    assert all(row["summary_spans"] == row["spans"] for row in cached)
    # A second listing reads the cache: the very same totals, nothing rewritten.
    xmin = f"SELECT array_agg(xmin::text ORDER BY call_id) FROM {schema}.calls"
    before = await pg.fetchval(xmin)
    again = (await api.ok("/api/v1/calls"))["calls"]
    assert await pg.fetchval(xmin) == before
    livekit = next(c for c in again if c["room_id"] == "RM_test123")
    assert (livekit["turn_count"], livekit["worst_turn_ms"]) == (3, pytest.approx(710.510))


async def test_a_call_row_a_writer_holds_is_summarised_without_waiting(
    api: Api, dataset: Dataset, pg: asyncpg.Connection
) -> None:
    """The cache write skips a row locked by a writer (an exporter updating the call)
    instead of waiting for it: the listing answers, and a later one fills the cache."""
    schema = dataset.postgres_schema
    calls = {c["room_id"]: c for c in (await api.ok("/api/v1/calls"))["calls"]}
    call_id = calls["RM_errors"]["call_id"]
    summary_spans = f"SELECT summary_spans FROM {schema}.calls WHERE call_id = $1"
    await pg.execute(f"UPDATE {schema}.calls SET summary_spans = NULL WHERE call_id = $1", call_id)
    async with pg.transaction():
        await pg.execute(f"SELECT 1 FROM {schema}.calls WHERE call_id = $1 FOR UPDATE", call_id)
        listed = {c["room_id"]: c for c in (await api.ok("/api/v1/calls"))["calls"]}
        assert listed["RM_errors"] == calls["RM_errors"]  # recomputed, the same numbers
    assert await pg.fetchval(summary_spans, call_id) is None  # skipped while held
    await api.ok("/api/v1/calls")
    assert await pg.fetchval(summary_spans, call_id) == calls["RM_errors"]["span_count"]


async def test_summary_is_recomputed_when_spans_arrive(tmp_path: Path) -> None:
    from collector.keys import KeyStore

    schema = f"ct_api_{uuid.uuid4().hex[:12]}"
    postgres_execute("SELECT 1")
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    dataset = Dataset(db, key, key, postgres_schema=schema)
    port = free_port()
    requests = [
        ExportTraceServiceRequest.FromString(p.read_bytes()) for p in fixture_requests("pipecat")
    ]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-protobuf"}
    conn = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    try:
        async with running_service(dataset.config(port)), aiohttp.ClientSession() as session:
            api = Api(f"http://127.0.0.1:{port}", session, key)

            async def post(request: ExportTraceServiceRequest) -> None:
                url = f"http://127.0.0.1:{port}/v1/traces"
                async with session.post(
                    url, data=request.SerializeToString(), headers=headers
                ) as r:
                    assert r.status == 200

            for request in requests[:-1]:  # all but the root
                await post(request)
            await _until_stored(dataset, 13)
            [call] = (await api.ok("/api/v1/calls"))["calls"]
            assert (call["span_count"], call["turn_count"], call["error_count"]) == (13, 3, 0)
            assert await conn.fetchval(f"SELECT summary_spans FROM {schema}.calls") == 13

            last = requests[-1]
            last.resource_spans[0].scope_spans[0].spans[0].status.code = 2
            await post(last)
            await _until_stored(dataset, 14)
            [call] = (await api.ok("/api/v1/calls"))["calls"]
            assert (call["span_count"], call["error_count"]) == (14, 1)
            assert await conn.fetchval(f"SELECT summary_spans FROM {schema}.calls") == 14
            # The call's own page agrees, and leaves the (current) cache as it is.
            body = await api.ok(f"/api/v1/calls/{call['call_id']}")
            assert body["call"] == call and body["totals"]["errors"] == 1
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


async def _until_stored(dataset: Dataset, spans: int) -> None:
    deadline = time.monotonic() + 10
    while (count := await dataset.stored_spans()) != spans:
        assert time.monotonic() < deadline, f"{count} of {spans} spans stored"
        await asyncio.sleep(0.02)


# -- plans --------------------------------------------------------------------------------


def _statements(schema: str) -> list[tuple[str, list[Any]]]:
    return [
        calls_sql(schema, "acme", CallFilter()),
        calls_sql(schema, "acme", CallFilter(start_ns=1, end_ns=2, cursor=encode_cursor([5, "c"]))),
        calls_sql(schema, "acme", CallFilter(attributes=[("k", "v")], tags=[("customer", "x")])),
        traces_sql(schema, "acme", TraceFilter(cursor=encode_cursor([5, "ab"]))),
        traces_sql(
            schema, "acme", TraceFilter(name="llm", name_contains="ll", attributes=[("k", "v")])
        ),
        traces_sql(schema, "acme", TraceFilter(service="s", min_duration_ns=5, status="error")),
    ]


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(n for child in plan.get("Plans", []) for n in _nodes(child))]


@pytest.mark.parametrize("number", range(6))
async def test_queries_walk_indexes(dataset: Dataset, pg: asyncpg.Connection, number: int) -> None:
    """Every list and search statement reads through indexes, in index order: no table
    scan, no sort. The dataset is small, so the planner is told what a big one makes it
    prefer (sequential scans and sorts cost too much); had no index served, it would
    still have to scan and sort."""
    assert dataset.postgres_schema is not None
    sql, args = _statements(dataset.postgres_schema)[number]
    async with pg.transaction():
        await pg.execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off")
        [[explained]] = await pg.fetch("EXPLAIN (FORMAT JSON) " + sql, *args)
    plan = json.loads(explained)[0]
    nodes = _nodes(plan["Plan"])
    kinds = [node["Node Type"] for node in nodes]
    assert "Seq Scan" not in kinds and "Sort" not in kinds, kinds
    assert "Bitmap Heap Scan" not in kinds, kinds
    scans = [n for n in nodes if n["Node Type"] in ("Index Scan", "Index Only Scan")]
    assert scans[0]["Index Name"].endswith("_by_start"), kinds


# -- an unreachable server ----------------------------------------------------------------


async def test_an_unreachable_server_answers_503() -> None:
    """Every endpoint answers 503 with Retry-After (the OpenAPI document's answer), not 500."""
    port = free_port()  # nothing listens there
    store = PostgresQueryStore(f"postgresql://postgres@127.0.0.1:{port}/test", "calltrace")
    with pytest.raises(StorageUnavailableError, match="PostgreSQL"):
        await store.calls("acme", CallFilter())

    app = web.Application()
    app.add_routes(QueryAPI(store, None).routes())
    runner = web.AppRunner(app)
    await runner.setup()
    api_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", api_port).start()
    try:
        base = f"http://127.0.0.1:{api_port}"
        paths = (
            "/api/v1/calls",
            "/api/v1/calls/call_x",
            "/api/v1/traces",
            "/api/v1/traces/" + "0" * 32,
        )
        async with aiohttp.ClientSession() as session:
            for path in paths:
                async with session.get(base + path) as response:
                    body = await response.json()
                    assert response.status == 503 and response.headers["Retry-After"] == "1"
                    assert body["error"].startswith("storage unavailable: PostgreSQL")
                    check_against_openapi(path, 503, body)
    finally:
        await runner.cleanup()
        await store.close()
    with pytest.raises(StorageUnavailableError, match="closed"):
        await store.trace("acme", b"\0" * 16)
