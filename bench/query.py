"""``make bench-query``: read latency on a database of about a million spans.

The database holds 10,000 calls built from the captured fixtures (re-keyed as in
``workload.py``: most calls are a LiveKit call with two agent sessions, some a single
session, some a Pipecat call with four conversations), written through the ``sqlite``
exporter's own write path (``SQLiteExporter.export``) after the ``correlate`` processor
stamped their call ids, as the collector stores them.

The queries are plain SQL on the schema of ``exporters/sqlite_schema.py`` (``SQLQueries``): call
list, a ~60-span call's detail with its spans parsed into a tree, trace search by span
name, by attribute and by duration. Each runs many times with varying arguments; the
median and p99 latency and the query plan (``EXPLAIN QUERY PLAN``) are printed and
written to ``bench/results/query.md``. ``SQLQueries`` has the shape a store class of the
query API would have, so the bench can later drive that class instead.

    python -m bench.query [--calls 10000] [--db PATH (kept and reused)] [--repeat 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.workload import FIXTURES, synthetic_call
from collector.signals import LogBatch, MetricBatch
from collector.spans import Span, SpanBatch
from exporters.sqlite import SQLiteConfig, SQLiteExporter
from exporters.sqlite_query import search_match
from processors.correlate import CorrelateConfig, CorrelateProcessor

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "bench"
DAY_NS = 86_400 * 10**9


class SQLQueries:
    """The read queries the explorer needs, as SQL on the sqlite exporter's schema."""

    def __init__(self, db: sqlite3.Connection, project: str = PROJECT):
        self.db = db
        self.project = project

    CALL_LIST = (
        "SELECT call_id, room_id, source, start_ns, end_ns, span_count, service, tags"
        " FROM calls WHERE project = ? AND start_ns >= ? AND start_ns < ?"
        " ORDER BY start_ns DESC, call_id DESC LIMIT ?"
    )

    def call_list(self, start_ns: int, end_ns: int, limit: int = 50) -> list[tuple]:
        return self.db.execute(self.CALL_LIST, (self.project, start_ns, end_ns, limit)).fetchall()

    CALL = (
        "SELECT call_id, room_id, source, first_seen_ns, last_seen_ns, start_ns, end_ns,"
        " span_count, skipped, service, tags FROM calls WHERE project = ? AND call_id = ?"
    )
    CALL_SPANS = (
        "SELECT trace_id, span_id, parent_span_id, name, kind, start_ns, end_ns, status_code,"
        " resource_id, span FROM spans WHERE project = ? AND trace_seq IN"
        " (SELECT t.seq FROM call_traces c JOIN traces t ON t.project = c.project"
        " AND t.trace_id = c.trace_id WHERE c.project = ? AND c.call_id = ?) ORDER BY start_ns"
    )

    def call_detail(self, call_id: str) -> dict[str, Any]:
        """The call and its spans as trees (children nested under parents by span id)."""
        call = self.db.execute(self.CALL, (self.project, call_id)).fetchone()
        rows = self.db.execute(self.CALL_SPANS, (self.project, self.project, call_id)).fetchall()
        nodes: dict[bytes, dict[str, Any]] = {}
        for trace_id, span_id, parent, name, kind, start, end, status, resource_id, blob in rows:
            span = Span.FromString(blob)
            nodes[span_id] = {
                "trace_id": trace_id.hex(),
                "span_id": span_id.hex(),
                "parent": parent,
                "name": name,
                "kind": kind,
                "start_ns": start,
                "end_ns": end,
                "status": status,
                "resource_id": resource_id,
                "attributes": {kv.key: kv.value for kv in span.attributes},
                "children": [],
            }
        roots = []
        for node in nodes.values():
            parent_node = nodes.get(node["parent"]) if node["parent"] else None
            (parent_node["children"] if parent_node else roots).append(node)
        return {"call": call, "spans": len(nodes), "roots": roots}

    _TRACE_COLUMNS = (
        "t.trace_id, t.call_id, t.service, t.start_ns, t.duration_ns, t.root_name, t.has_error"
    )
    TRACES_BY_NAME = (
        f"SELECT {_TRACE_COLUMNS} FROM traces t WHERE t.project = ? AND t.seq IN"
        " (SELECT n.trace_seq FROM trace_names n WHERE n.project = ? AND n.name = ?)"
        " AND t.start_ns >= ? AND t.start_ns < ?"
        " ORDER BY t.start_ns DESC LIMIT ?"
    )

    def traces_by_name(self, name: str, start_ns: int, end_ns: int, limit: int = 50) -> list:
        args = (self.project, self.project, name, start_ns, end_ns, limit)
        return self.db.execute(self.TRACES_BY_NAME, args).fetchall()

    TRACES_BY_NAME_PROBE = (
        f"SELECT {_TRACE_COLUMNS} FROM traces t WHERE t.project = ? AND t.start_ns >= ?"
        " AND t.start_ns < ? AND EXISTS (SELECT 1 FROM spans s INDEXED BY spans_by_trace"
        " WHERE s.trace_seq = t.seq AND s.name = ?) ORDER BY t.start_ns DESC LIMIT ?"
    )

    def traces_by_name_probe(self, name: str, start_ns: int, end_ns: int, limit: int = 50) -> list:
        """The same search walking traces newest first and probing each one's spans by
        trace id (``INDEXED BY``: left alone, SQLite probes by name instead)."""
        args = (self.project, start_ns, end_ns, name, limit)
        return self.db.execute(self.TRACES_BY_NAME_PROBE, args).fetchall()

    TRACES_BY_ATTR = (
        f"SELECT {_TRACE_COLUMNS} FROM traces t WHERE t.project = ? AND t.trace_id IN"
        " (SELECT f.trace_id FROM trace_search f WHERE trace_search MATCH ?)"
        " AND t.start_ns >= ? AND t.start_ns < ? ORDER BY t.start_ns DESC LIMIT ?"
    )

    def traces_by_attr(
        self, key: str, value: str, start_ns: int, end_ns: int, limit: int = 50
    ) -> list:
        args = (self.project, self.match(key, value), start_ns, end_ns, limit)
        return self.db.execute(self.TRACES_BY_ATTR, args).fetchall()

    def match(self, key: str, value: str) -> str:
        """The ``trace_search`` query for ``key`` = ``value`` (one exact term)."""
        return search_match(self.project, key, value)

    TRACES_BY_DURATION = (
        f"SELECT {_TRACE_COLUMNS} FROM traces t WHERE t.project = ? AND t.duration_ns >= ?"
        " AND t.start_ns >= ? AND t.start_ns < ? ORDER BY t.start_ns DESC LIMIT ?"
    )

    def traces_by_duration(
        self, min_duration_ns: int, start_ns: int, end_ns: int, limit: int = 50
    ) -> list:
        args = (self.project, min_duration_ns, start_ns, end_ns, limit)
        return self.db.execute(self.TRACES_BY_DURATION, args).fetchall()

    def plan(self, sql: str, args: tuple) -> list[str]:
        return [row[3] for row in self.db.execute(f"EXPLAIN QUERY PLAN {sql}", args)]


# -- building the database ----------------------------------------------------------

SHAPES = [("livekit", 2)] * 8 + [("livekit", 1), ("pipecat", 4)]
"""(framework, sessions) of each call, cycled: ~96 spans a call on average."""


RARE_TAG = "tier:gold"
"""A session tag one LiveKit call in a hundred carries (a selective filter)."""


class SessionSignals:
    """A LiveKit call's session logs and metrics, as livekit-agents sends them: the
    ``livekit_native`` capture's logs (session report, chat items, evaluations, tag,
    outcome) and metrics (the ``lk.agents.turn.*`` histograms among them), re-keyed to a
    room and moved to a start time; every fifth call fails (outcome ``fail``, session
    tag ``lk.fail``), one in a hundred carries ``RARE_TAG``."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
            ExportLogsServiceRequest,
        )
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
        )

        native = FIXTURES / "livekit_native"
        self.logs = ExportLogsServiceRequest.FromString((native / "009.pb").read_bytes())
        self.metrics = ExportMetricsServiceRequest.FromString((native / "010.pb").read_bytes())
        self.origin_ns = min(
            r.time_unix_nano
            for rl in self.logs.resource_logs
            for sl in rl.scope_logs
            for r in sl.log_records
        )

    @staticmethod
    def _rekey(attributes: Any, room: str) -> None:
        for kv in attributes:
            if kv.key == "room_id":
                kv.value.string_value = room

    def requests(self, index: int, room: str, start_ns: int) -> tuple[Any, Any]:
        logs, metrics = type(self.logs)(), type(self.metrics)()
        logs.CopyFrom(self.logs)
        metrics.CopyFrom(self.metrics)
        shift = start_ns - self.origin_ns
        outcome = "fail" if index % 5 == 0 else "success"
        for rl in logs.resource_logs:
            for sl in rl.scope_logs:
                for record in sl.log_records:
                    self._rekey(record.attributes, room)
                    record.time_unix_nano += shift
                    record.observed_time_unix_nano += shift
                    for kv in record.attributes:
                        if kv.key == "outcome":
                            for field in kv.value.kvlist_value.values:
                                if field.key == "outcome":
                                    field.value.string_value = outcome
                        if kv.key == "session.tags":
                            tags = kv.value.array_value.values
                            for tag in tags:
                                if tag.string_value == "lk.success":
                                    tag.string_value = "lk." + outcome
                            if index % 100 == 7:
                                tags.add().string_value = RARE_TAG
        for rm in metrics.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    kind = metric.WhichOneof("data")
                    for point in getattr(metric, kind).data_points:
                        self._rekey(point.attributes, room)
                        point.start_time_unix_nano += shift
                        point.time_unix_nano += shift
        return logs, metrics


async def build_database(path: Path, calls: int, *, end_ns: int, quiet: bool = False) -> int:
    """Write ``calls`` calls spread over the 10 days before ``end_ns``; returns spans."""
    exporter = SQLiteExporter("sqlite", SQLiteConfig(path=path))
    correlate = CorrelateProcessor("correlate", CorrelateConfig(store=None))

    class _Host:
        telemetry = None
        http_routes: list[Any] = []

        def component(self, component_id: str) -> Any:
            raise KeyError(component_id)

        def add_http_routes(self, routes: list[Any]) -> None:
            pass

    await exporter.start(_Host())  # type: ignore[arg-type]
    signals = SessionSignals()
    spans = 0
    pending: list[Any] = []
    pending_spans = 0
    began = time.perf_counter()
    span_of_calls = 10 * DAY_NS
    next_report = 999
    try:
        for index in range(calls):
            framework, sessions = SHAPES[index % len(SHAPES)]
            room = f"RM_q{index:06d}"
            call_start = (end_ns - span_of_calls + index * (span_of_calls // calls)) / 1e9
            for session in range(sessions):
                for request in synthetic_call(framework, room, call_start + 60 * session):
                    batch = SpanBatch(list(request.resource_spans), PROJECT)
                    batch = await correlate.process(batch)  # type: ignore[assignment]
                    pending.extend(batch.resource_spans)
                    pending_spans += batch.span_count
            if framework == "livekit":
                logs, metrics = signals.requests(index, room, int(call_start * 1e9))
                await exporter.export_logs(LogBatch(list(logs.resource_logs), PROJECT))
                await exporter.export_metrics(MetricBatch(list(metrics.resource_metrics), PROJECT))
            if pending_spans >= 8192 or index == calls - 1:
                await exporter.export(SpanBatch(pending, PROJECT))
                spans += pending_spans
                pending, pending_spans = [], 0
                if not quiet and index >= next_report:
                    next_report += 1000
                    rate = spans / (time.perf_counter() - began)
                    print(f"  {index + 1} calls, {spans} spans ({rate:,.0f} spans/s)", flush=True)
    finally:
        await exporter.shutdown()
    # The call store is not used here; the span counts it would keep are filled in.
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(
            "UPDATE calls SET span_count = (SELECT count(*) FROM spans s"
            " WHERE s.trace_seq IN (SELECT t.seq FROM call_traces c JOIN traces t"
            " ON t.project = c.project AND t.trace_id = c.trace_id"
            " WHERE c.project = calls.project AND c.call_id = calls.call_id))"
        )
        db.commit()
    return spans


# -- measuring ----------------------------------------------------------------------


def timed(
    fn: Callable[[], Any], repeat: int, budget_s: float = 8.0
) -> tuple[float, float, int, Any]:
    """Median and p99 of up to ``repeat`` runs, stopping early once ``budget_s`` is spent
    (a slow plan is reported, not waited for); also the number of runs made."""
    latencies = []
    result = None
    deadline = time.perf_counter() + budget_s
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        latencies.append((time.perf_counter() - t0) * 1000)
        if t0 > deadline:
            break
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return statistics.median(latencies), p99, len(latencies), result


def run_queries(
    db_path: Path, repeat: int, end_ns: int
) -> list[tuple[str, float, float, int, list]]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    q = SQLQueries(db)
    rng = random.Random(7)
    calls = [
        row[0] for row in db.execute("SELECT call_id FROM calls WHERE project = ?", (PROJECT,))
    ]
    sixty = db.execute(
        "SELECT call_id, span_count FROM calls WHERE project = ?"
        " ORDER BY abs(span_count - 60), call_id LIMIT 200",
        (PROJECT,),
    ).fetchall()
    sixty_ids = [c for c, _ in sixty]
    day = DAY_NS
    window = (end_ns - 10 * day, end_ns)

    def some_day() -> tuple[int, int]:
        start = end_ns - rng.randrange(1, 10) * day
        return start, start + day

    rooms = [f"RM_q{rng.randrange(len(calls)):06d}" for _ in range(repeat)]
    cases: list[tuple[str, Callable[[], Any], str, tuple]] = [
        (
            "call list, newest 50 (10-day window)",
            lambda: q.call_list(*window),
            q.CALL_LIST,
            (PROJECT, *window, 50),
        ),
        (
            "call list, 50 of a given day",
            lambda: q.call_list(*some_day()),
            q.CALL_LIST,
            (PROJECT, *some_day(), 50),
        ),
        (
            f"call detail, {sixty[0][1]}-span call, spans parsed into a tree",
            lambda: q.call_detail(rng.choice(sixty_ids)),
            q.CALL_SPANS,
            (PROJECT, PROJECT, sixty_ids[0]),
        ),
        (
            "traces by span name `llm_request` (common)",
            lambda: q.traces_by_name("llm_request", *window),
            q.TRACES_BY_NAME,
            (PROJECT, PROJECT, "llm_request", *window, 50),
        ),
        (
            "traces by span name `function_tool`, one day",
            lambda: q.traces_by_name("function_tool", *some_day()),
            q.TRACES_BY_NAME,
            (PROJECT, PROJECT, "function_tool", *some_day(), 50),
        ),
        (
            "traces by span name `llm_request` (common), probing each trace",
            lambda: q.traces_by_name_probe("llm_request", *window),
            q.TRACES_BY_NAME_PROBE,
            (PROJECT, *window, "llm_request", 50),
        ),
        (
            "traces by span name `function_tool`, one day, probing each trace",
            lambda: q.traces_by_name_probe("function_tool", *some_day()),
            q.TRACES_BY_NAME_PROBE,
            (PROJECT, *some_day(), "function_tool", 50),
        ),
        (
            "traces by attribute gen_ai.tool.name=get_weather (common)",
            lambda: q.traces_by_attr("gen_ai.tool.name", "get_weather", *window),
            q.TRACES_BY_ATTR,
            (PROJECT, q.match("gen_ai.tool.name", "get_weather"), *window, 50),
        ),
        (
            "traces by attribute lk.room_sid=<one room> (selective)",
            lambda: q.traces_by_attr("lk.room_sid", rng.choice(rooms), *window),
            q.TRACES_BY_ATTR,
            (PROJECT, q.match("lk.room_sid", rooms[0]), *window, 50),
        ),
        (
            "traces by duration >= 20 s",
            lambda: q.traces_by_duration(20 * 10**9, *window),
            q.TRACES_BY_DURATION,
            (PROJECT, 20 * 10**9, *window, 50),
        ),
        (
            "traces by duration >= 25 s, one day",
            lambda: q.traces_by_duration(25 * 10**9, *some_day()),
            q.TRACES_BY_DURATION,
            (PROJECT, 25 * 10**9, *some_day(), 50),
        ),
    ]
    results = []
    for label, fn, sql, args in cases:
        fn()  # warm the page cache
        median, p99, runs, result = timed(fn, repeat)
        size = result["spans"] if isinstance(result, dict) else len(result)
        results.append((label, median, p99, size, runs, q.plan(sql, args)))
    db.close()
    return results


def run_store_queries(
    db_path: Path, repeat: int, end_ns: int
) -> list[tuple[str, float, float, int, int, list]]:
    """The same questions through the query API's own store (``SQLiteQueryStore``, what
    ``GET /api/v1/...`` runs), timed as the API awaits it, with the plans of its SQL."""
    from collector.query import CallFilter, SpanFilter, TraceFilter
    from collector.turn_histograms import histogram_stats
    from collector.turn_stats import turn_stats
    from exporters.sqlite_query import SQLiteQueryStore, calls_sql, spans_sql, traces_sql

    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    q = SQLQueries(db)
    sixty = db.execute(
        "SELECT call_id, span_count FROM calls WHERE project = ?"
        " ORDER BY abs(span_count - 60), call_id LIMIT 200",
        (PROJECT,),
    ).fetchall()
    window = (end_ns - 10 * DAY_NS, end_ns)
    rng = random.Random(11)
    (calls,) = db.execute("SELECT count(*) FROM calls WHERE project = ?", (PROJECT,)).fetchone()
    room_sid = f"RM_q{rng.randrange(calls):06d}"  # as build_database names rooms
    traces = {
        "by name `llm_request`": TraceFilter(*window, name="llm_request"),
        "by name `function_tool`": TraceFilter(*window, name="function_tool"),
        "by name containing `tool`": TraceFilter(*window, name_contains="tool"),
        "by attribute gen_ai.tool.name=get_weather": TraceFilter(
            *window, attributes=[("gen_ai.tool.name", "get_weather")]
        ),
        "by attribute lk.room_sid=<one room> (selective, no time range)": TraceFilter(
            attributes=[("lk.room_sid", room_sid)]
        ),
        "by duration >= 20 s": TraceFilter(*window, min_duration_ns=20 * 10**9),
    }
    spans = {
        "`llm_request` over 300 ms": SpanFilter(
            *window, name="llm_request", min_duration_ns=300 * 10**6
        ),
        "`llm_request` over 2 s (none: walks the window)": SpanFilter(
            *window, name="llm_request", min_duration_ns=2 * 10**9
        ),
        "by attribute gen_ai.tool.name=get_weather": SpanFilter(
            *window, attributes=[("gen_ai.tool.name", "get_weather")]
        ),
        "by service containing `pipecat`": SpanFilter(*window, service="pipecat"),
    }

    async def measure() -> list[tuple[str, float, float, int, int, list]]:
        store = SQLiteQueryStore(db_path)
        results = []

        async def timed_async(label: str, make: Callable[[], Any], sql: tuple[str, list]) -> None:
            await make()  # warm: also fills the calls list's summary cache once
            latencies = []
            result: Any = None
            for _ in range(repeat):
                t0 = time.perf_counter()
                result = await make()
                latencies.append((time.perf_counter() - t0) * 1000)
            latencies.sort()
            p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
            if isinstance(result, dict) and "buckets" in result:
                size = sum(len(bucket["groups"]) for bucket in result["buckets"])
            elif isinstance(result, dict):
                size = result["call"]["span_count"]
            else:
                size = len(result.items)
            plan = q.plan(*sql) if sql[0] else []
            results.append((label, statistics.median(latencies), p99, size, repeat, plan))

        calls = CallFilter(*window)
        await timed_async(
            "API calls list, newest 50",
            lambda: store.calls(PROJECT, calls),
            _as_args(calls_sql(PROJECT, calls)),
        )
        ids = [c for c, _ in sixty]
        await timed_async(
            "API call detail of a ~60-span call: tree and turn summary (rows: its spans)",
            lambda: store.call(PROJECT, rng.choice(ids)),
            ("", []),
        )
        for label, query in traces.items():
            await timed_async(
                f"API trace search {label}",
                lambda query=query: store.traces(PROJECT, query),
                _as_args(traces_sql(PROJECT, query)),
            )
        for label, span_query in spans.items():
            await timed_async(
                f"API span search {label}",
                lambda span_query=span_query: store.spans(PROJECT, span_query),
                _as_args(spans_sql(PROJECT, span_query, None, span_query.limit + 1)),
            )
        # Fill the summary cache of the window first (each query recomputes at most
        # MAX_SUMMARY_REFRESH stale summaries), untimed, as the first visits would.
        filled = time.perf_counter()
        while (
            await store.calls(PROJECT, CallFilter(*window, sort="worst_turn"))
        ).pending_summaries:
            pass
        print(f"  summary cache of the window filled in {time.perf_counter() - filled:.1f} s")
        for sort in ("worst_turn", "e2e_p95", "errors", "duration"):
            sorted_calls = CallFilter(*window, sort=sort)
            await timed_async(
                f"API calls list sorted by {sort} (summary cache current)",
                lambda sorted_calls=sorted_calls: store.calls(PROJECT, sorted_calls),
                _as_args(calls_sql(PROJECT, sorted_calls)),
            )
        worst = CallFilter(*window, min_worst_turn_ms=3000)
        await timed_async(
            "API calls list, worst turn >= 3 s",
            lambda: store.calls(PROJECT, worst),
            _as_args(calls_sql(PROJECT, worst)),
        )
        session_filters = {
            "outcome=fail (a fifth of the LiveKit calls)": CallFilter(*window, outcome="fail"),
            f"session_tag={RARE_TAG} (one LiveKit call in a hundred)": CallFilter(
                *window, session_tag=RARE_TAG
            ),
            "outcome=success sorted by worst_turn": CallFilter(
                *window, outcome="success", sort="worst_turn"
            ),
        }
        for label, session_filter in session_filters.items():
            await timed_async(
                f"API calls list, {label}",
                lambda session_filter=session_filter: store.calls(PROJECT, session_filter),
                _as_args(calls_sql(PROJECT, session_filter)),
            )

        async def histogram_trends() -> Any:
            points = await store.turn_histograms(PROJECT, window[0])
            return histogram_stats(
                points,
                start_ns=window[0],
                end_ns=window[1],
                step_ns=DAY_NS // 4,
                group_by="model",
                tags=[],
            )

        await timed_async(
            "API stats/turns?source=metrics (lk.agents.turn.* histograms), 10 days in 6-hour"
            " buckets by model (rows: groups)",
            histogram_trends,
            ("", []),
        )
        for group_by in ("service", "model"):

            async def stats(group_by: str = group_by) -> Any:
                found = await store.summaries(PROJECT, *window)
                return turn_stats(
                    found.calls,
                    start_ns=window[0],
                    end_ns=window[1],
                    step_ns=DAY_NS // 4,
                    group_by=group_by,
                    tags=[],
                )

            await timed_async(
                f"API stats/turns, 10 days in 6-hour buckets by {group_by} (rows: groups)",
                stats,
                ("", []),
            )
        await store.close()
        return results

    try:
        return asyncio.run(measure())
    finally:
        db.close()


def _as_args(statement: tuple[str, list[Any]]) -> tuple[str, tuple]:
    return statement[0], tuple(statement[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--db", help="database to build once and reuse (default: a temp file)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "query.md"))
    args = parser.parse_args(argv)
    end_ns = (int(time.time()) // 86_400) * DAY_NS  # midnight UTC today: stable across runs
    with tempfile.TemporaryDirectory(prefix="calltrace-query-") as tmp:
        path = Path(args.db) if args.db else Path(tmp) / "query.db"
        build_s = 0.0
        if not path.exists():
            print(f"writing {args.calls} calls to {path} through the sqlite exporter...")
            t0 = time.perf_counter()
            asyncio.run(build_database(path, args.calls, end_ns=end_ns))
            build_s = time.perf_counter() - t0
        with contextlib.closing(sqlite3.connect(path)) as db:
            spans = db.execute("SELECT count(*) FROM spans").fetchone()[0]
            traces = db.execute("SELECT count(*) FROM traces").fetchone()[0]
            calls = db.execute("SELECT count(*) FROM calls").fetchone()[0]
            documents = db.execute("SELECT count(*) FROM trace_search").fetchone()[0]
            end_ns = db.execute("SELECT max(end_ns) FROM calls").fetchone()[0] + 1
        size_mib = path.stat().st_size / 2**20
        results = run_queries(path, args.repeat, end_ns)
        store_results = run_store_queries(path, min(args.repeat, 100), end_ns)
    lines = [
        "# calltrace query benchmark",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()},"
        f" SQLite {sqlite3.sqlite_version}. Database: {spans:,} spans, {traces:,} traces,"
        f" {calls:,} calls, {documents:,} trace_search documents, {size_mib:,.0f} MiB"
        + (f", written in {build_s:.0f} s ({spans / build_s:,.0f} spans/s)" if build_s else "")
        + f". Each query {args.repeat} times or for 8 s, whichever ends first (varying"
        " arguments where the label says so),"
        " one connection, warm page cache; plain SQL from `bench/query.py` on the schema of"
        " `exporters/sqlite_schema.py`. Shared machine: other work ran on the same cores.",
        "",
        "| query | rows | median ms | p99 ms | runs |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {label} | {size} | {median:.2f} | {p99:.2f} | {runs} |"
            for label, median, p99, size, runs, _ in results
        ],
        "",
        "The same questions through the query API's store (`SQLiteQueryStore`, what",
        "`GET /api/v1/calls`, `/calls/{id}`, `/traces`, `/spans` and `/stats/turns` run;",
        "the call detail includes building the tree and the per-turn summary; sorted calls",
        "lists and stats read the per-call summary cache, filled by the untimed warm-up run):",
        "",
        "| query | rows | median ms | p99 ms | runs |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {label} | {size} | {median:.2f} | {p99:.2f} | {runs} |"
            for label, median, p99, size, runs, _ in store_results
        ],
        "",
        "## Query plans",
        "",
    ]
    for label, _median, _p99, _size, _runs, plan in [*results, *store_results]:
        if not plan:
            continue
        lines += [f"**{label}**", "", "```", *plan, "```", ""]
    text = "\n".join(lines)
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
