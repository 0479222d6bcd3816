"""The read side of the ``sqlite`` exporter's file: what the query API asks of it.

Reads run on read-only connections in a small thread pool (one connection per
thread), so the event loop never waits on disk and never blocks the writer (WAL lets
readers and the one writer proceed together). Every statement is scoped to a project
and walks an index (see ``EXPLAIN QUERY PLAN`` in the tests):

- calls list: ``calls_by_start`` (project, start_ns DESC, call_id), the cursor a
  range bound on it; each call's turn totals come from the ``calls.summary`` cache,
  recomputed when ``summary_spans`` differs from the call's stored span count
  (``call_traces``, ``traces_identity`` for the traces' seqs, then ``spans_by_trace``,
  all covering);
- trace search: ``traces_by_start``, each condition an ``IN`` over an index:
  ``trace_search`` (full text, one term per project, key and value) for ``attr.*``,
  ``trace_names`` for names,
  ``span_names`` for name substrings;
- one call: its traces from ``call_traces``, their spans from ``spans_by_trace``; a
  call is every span of every trace that holds one of its spans (its full trace
  tree, a span of another service in the trace included);
- one trace: its seq from ``traces_identity``, its spans from ``spans_by_trace``.
- span search: traces newest first from ``traces_by_start`` (narrowed like trace
  search), each one's spans from ``spans_by_trace``, read until a page is found;
  attribute conditions are checked on each candidate's stored bytes;
- calls sorted or filtered by turn latency: the range of ``calls_by_start`` sorted by
  a ``json_extract`` of the summary cache, after one statement found the range's stale
  summaries and they were recomputed.

Attributes, events and links are decoded from each span's stored protobuf bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from collector.query import (
    CALL_SORTS,
    MAX_SUMMARY_REFRESH,
    SUMMARY_VERSION,
    TAG_PREFIX,
    CallFilter,
    CallSummaries,
    Page,
    ParsedSummaries,
    SpanFilter,
    StorageUnavailableError,
    TraceFilter,
    cached_summary,
    call_json,
    decode_cursor,
    decode_span_cursor,
    decode_trace_cursor,
    encode_cursor,
    encode_span_cursor,
    jsonable,
    matched_span_ids,
    payload_matches,
    span_hit_json,
    span_json,
    summary_cache_text,
    trace_json,
)
from collector.session_facts import SESSION_BODIES_SQL, outcome_tag, session_facts
from collector.turn_histograms import TURN_HISTOGRAMS
from collector.turns import summarize_call

__all__ = [
    "SQLiteQueryStore",
    "calls_sql",
    "search_match",
    "search_term",
    "spans_sql",
    "traces_sql",
]


def search_term(project: str, key: str, value: str) -> str:
    """The ``trace_search`` term standing for attribute ``key`` = ``value`` in
    ``project``: an 80-bit digest in hex, so any key and value (spaces, punctuation,
    case) is one exact token to the full-text index, and no project's term matches
    another's."""
    text = f"{project}\0{key}\0{value}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=10).hexdigest()


def search_match(project: str, key: str, value: str) -> str:
    """The FTS5 query matching the documents of traces with that attribute."""
    return f'"{search_term(project, key, value)}"'


_SPAN_COLUMNS = (
    "s.trace_id, s.span_id, s.parent_span_id, s.name, s.start_ns, s.end_ns, s.status_code,"
    " s.call_id, s.resource_id, sc.name, sc.version, s.span"
)
_TRACE_COLUMNS = (
    "trace_id, call_id, service, start_ns, end_ns, duration_ns, root_name, root_span_id, has_error"
)
_CALL_COLUMNS = (
    "call_id, room_id, source, room_name, service, start_ns, end_ns, tags, summary, summary_spans"
)
_CALL_SPANS = (
    "s.project = ? AND s.trace_seq IN (SELECT t.seq FROM call_traces c JOIN traces t"
    " ON t.project = c.project AND t.trace_id = c.trace_id"
    " WHERE c.project = ? AND c.call_id = ?)"
)
"""A call's spans: those of the traces holding one of its spans (args: project, project,
call id)."""
_CALL_SPAN_COUNT = (
    "SELECT count(*) FROM spans s WHERE s.trace_seq IN (SELECT t.seq FROM call_traces c"
    " JOIN traces t ON t.project = c.project AND t.trace_id = c.trace_id"
    " WHERE c.project = ? AND c.call_id = {call})"
)
"""How many spans a call has, from ``spans_by_trace`` alone (covering: the traces of
``call_traces`` are the project's, so the spans need no project check); ``{call}`` is
the call id's placeholder or column (args: project[, call id])."""
_TRACE_SPANS = "s.trace_seq = (SELECT seq FROM traces WHERE project = ? AND trace_id = ?)"
"""A trace's spans (args: project, trace id)."""


class SQLiteQueryStore:
    """Queries over an SQLite file the ``sqlite`` exporter writes."""

    def __init__(self, path: str | Path, threads: int = 2):
        self.path = Path(path)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="calltrace-query")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._cache_db: sqlite3.Connection | None = None
        self._parsed = ParsedSummaries()

    # -- plumbing -------------------------------------------------------------------

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except sqlite3.OperationalError as exc:  # locked, busy, I/O: may pass
            raise StorageUnavailableError(str(exc)) from exc

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
            )
            db.execute("PRAGMA busy_timeout=10000")
            db.execute("PRAGMA query_only=1")
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    def _store_summary(self, project: str, call_id: str, summary: str, spans: int) -> None:
        """Cache a call's summary. Best effort: a busy writer only means a recompute later."""
        with self._lock:
            if self._cache_db is None:
                self._cache_db = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False
                )
                self._cache_db.execute("PRAGMA busy_timeout=200")
            with contextlib.suppress(sqlite3.OperationalError):
                self._cache_db.execute(
                    "UPDATE calls SET summary = ?, summary_spans = ?"
                    " WHERE project = ? AND call_id = ?",
                    (summary, spans, project, call_id),
                )

    async def shared_secret(self, name: str) -> bytes | None:
        """A random 32-byte secret named ``name``, kept in the file (table
        ``query_secrets``, created on first use): the same for every process reading it.
        None when the file refuses the write (read-only)."""
        return await self._run(self._shared_secret, name)

    def _shared_secret(self, name: str) -> bytes | None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout=10000")
            try:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS query_secrets"
                    " (name TEXT PRIMARY KEY, secret BLOB NOT NULL)"
                )
                db.execute(
                    "INSERT OR IGNORE INTO query_secrets (name, secret) VALUES (?, ?)",
                    (name, os.urandom(32)),
                )
            except sqlite3.OperationalError as exc:
                if "readonly" not in str(exc):
                    raise
            row = db.execute("SELECT secret FROM query_secrets WHERE name = ?", (name,)).fetchone()
            return None if row is None else bytes(row[0])
        finally:
            db.close()

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)
        with self._lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
            if self._cache_db is not None:
                self._cache_db.close()
                self._cache_db = None

    # -- calls ----------------------------------------------------------------------

    async def calls(self, project: str, query: CallFilter) -> Page:
        return await self._run(self._calls, project, query)

    def _calls(self, project: str, query: CallFilter) -> Page:
        db = self._db()
        pending = 0
        if query.needs_summaries:
            _fresh, pending = self._refresh_summaries(db, project, query.start_ns, query.end_ns)
        if (query.outcome or query.session_tag) and not _has_signal_tables(db):
            return Page([], None, pending)  # no session was ever stored in this file
        sql, args = calls_sql(project, query)
        rows = db.execute(sql, args).fetchall()
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        items = [self._call_item(db, project, row) for row in rows]
        facts = self._session_facts(db, project, [item["call_id"] for item in items])
        for item in items:
            item.update(facts[item["call_id"]])
        cursor = None
        if more and rows:
            if query.sort == "start":
                cursor = encode_cursor([rows[-1][5], rows[-1][0]])
            else:
                cursor = encode_cursor([float(rows[-1][10]), rows[-1][0]])
        return Page(items, cursor, pending)

    async def summaries(
        self, project: str, start_ns: int | None, end_ns: int | None
    ) -> CallSummaries:
        return await self._run(self._current_summaries, project, start_ns, end_ns)

    def _refresh_summaries(
        self, db: sqlite3.Connection, project: str, start_ns: int | None, end_ns: int | None
    ) -> tuple[dict[str, dict[str, Any]], int]:
        """Recompute (and write back) the cached summaries of the range's calls that are
        missing or stale, found in one statement, newest first, up to
        ``MAX_SUMMARY_REFRESH``; returns them by call id, and how many were left."""
        sql, args = _stale_calls_sql(project, start_ns, end_ns)
        stale = [call_id for (call_id,) in db.execute(sql, args).fetchall()]
        fresh = {}
        for call_id in stale[:MAX_SUMMARY_REFRESH]:
            spans, _ = self._spans(db, _CALL_SPANS, (project, project, call_id))
            cache_text = summary_cache_text(summarize_call(spans))
            self._store_summary(project, call_id, cache_text, len(spans))
            fresh[call_id] = json.loads(cache_text)
        return fresh, max(0, len(stale) - MAX_SUMMARY_REFRESH)

    def _current_summaries(
        self, project: str, start_ns: int | None, end_ns: int | None
    ) -> CallSummaries:
        """Every call starting in the range with its current summary."""
        db = self._db()
        fresh, pending = self._refresh_summaries(db, project, start_ns, end_ns)
        left_out = set()
        if pending:
            sql, args = _stale_calls_sql(project, start_ns, end_ns)
            left_out = {row[0] for row in db.execute(sql, args)} - set(fresh)
        sql = ["SELECT call_id, start_ns, service, tags, summary FROM calls"]
        sql.append("WHERE project = ? AND start_ns IS NOT NULL")
        args: list[Any] = [project]
        if start_ns is not None:
            sql.append("AND start_ns >= ?")
            args.append(start_ns)
        if end_ns is not None:
            sql.append("AND start_ns < ?")
            args.append(end_ns)
        found = []
        for call_id, start, service, tags, text in db.execute(" ".join(sql), args):
            if call_id in left_out:
                continue
            summary = fresh.get(call_id) or self._parsed.parse((project, call_id), text)
            found.append(
                {
                    "call_id": call_id,
                    "start_ns": start,
                    "service": service,
                    "tags": jsonable(json.loads(tags)) if tags else {},
                    "summary": summary,
                }
            )
        return CallSummaries(found, pending)

    def _call_item(
        self, db: sqlite3.Connection, project: str, row: tuple[Any, ...]
    ) -> dict[str, Any]:
        call_id, summary_json, summary_spans = row[0], row[8], row[9]
        (span_count,) = db.execute(_CALL_SPAN_COUNT.format(call="?"), (project, call_id)).fetchone()
        summary = cached_summary(summary_json, summary_spans, span_count)
        if summary is None:
            spans, _ = self._spans(db, _CALL_SPANS, (project, project, call_id))
            summary = summarize_call(spans)
            span_count = len(spans)
            self._store_summary(project, call_id, summary_cache_text(summary), span_count)
        return call_json(row, summary, span_count)

    async def call(self, project: str, call_id: str) -> dict[str, Any] | None:
        return await self._run(self._call, project, call_id)

    def _call(self, project: str, call_id: str) -> dict[str, Any] | None:
        db = self._db()
        row = db.execute(
            f"SELECT {_CALL_COLUMNS} FROM calls WHERE project = ? AND call_id = ?",
            (project, call_id),
        ).fetchone()
        if row is None:
            return None
        spans, resources = self._spans(db, _CALL_SPANS, (project, project, call_id))
        summary = summarize_call(spans)
        if row[9] != len(spans):
            self._store_summary(project, call_id, summary_cache_text(summary), len(spans))
        return {
            "call": {
                **call_json(row, summary, len(spans)),
                **self._session_facts(db, project, [call_id])[call_id],
            },
            "summary": summary,
            "spans": spans,
            "resources": resources,
        }

    def _session_facts(
        self, db: sqlite3.Connection, project: str, call_ids: list[str]
    ) -> dict[str, dict[str, Any]]:
        """Each call's LiveKit session facts (``collector.session_facts``), in three
        statements for the lot."""
        records: dict[str, list[tuple[Any, Any]]] = {c: [] for c in call_ids}
        summaries: dict[str, list[Any]] = {c: [] for c in call_ids}
        with_logs: set[str] = set()
        if call_ids and _has_signal_tables(db):
            marks = ", ".join("?" for _ in call_ids)
            args = (project, *call_ids)
            for call_id, body, attributes in db.execute(
                "SELECT call_id, body, attributes FROM log_records WHERE project = ?"
                f" AND call_id IN ({marks}) AND {SESSION_BODIES_SQL} ORDER BY time_ns",
                args,
            ):
                records[call_id].append((body, attributes))
            for (call_id,) in db.execute(
                "SELECT DISTINCT call_id FROM log_records WHERE project = ?"
                f" AND call_id IN ({marks})",
                args,
            ):
                with_logs.add(call_id)
            for call_id, summary in db.execute(
                "SELECT call_id, session_summary FROM recordings WHERE project = ?"
                f" AND call_id IN ({marks})",
                args,
            ):
                summaries[call_id].append(summary)
        return {c: session_facts(records[c], summaries[c], c in with_logs) for c in call_ids}

    async def turn_histograms(self, project: str, start_ns: int) -> list[dict[str, Any]]:
        return await self._run(self._turn_histograms, project, start_ns)

    def _turn_histograms(self, project: str, start_ns: int) -> list[dict[str, Any]]:
        db = self._db()
        if not _has_signal_tables(db):
            return []
        names = list(TURN_HISTOGRAMS)
        rows = db.execute(
            "SELECT m.name, m.unit, m.call_id, coalesce(c.start_ns, m.start_ns),"
            " coalesce(c.service, json_extract(m.resource, '$.\"service.name\"')), c.tags,"
            " json_extract(m.attributes, '$.model_name'), m.count, m.min, m.max,"
            " m.bucket_counts, m.explicit_bounds"
            " FROM metric_points m LEFT JOIN calls c"
            " ON c.project = m.project AND c.call_id = m.call_id"
            f" WHERE m.project = ? AND m.name IN ({', '.join('?' for _ in names)})"
            " AND m.kind = 'histogram' AND m.time_ns >= ?",
            [project, *names, start_ns],
        ).fetchall()
        return [_histogram_point(row) for row in rows]

    # -- traces ---------------------------------------------------------------------

    async def traces(self, project: str, query: TraceFilter) -> Page:
        return await self._run(self._traces, project, query)

    def _traces(self, project: str, query: TraceFilter) -> Page:
        db = self._db()
        sql, args = traces_sql(project, query)
        rows = db.execute(sql, args).fetchall()
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        items = [trace_json(row, self._span_count(db, project, row[0])) for row in rows]
        for item, row in zip(items, rows, strict=True):
            item["matched_spans"] = self._matched_spans(db, project, row[0], query)
        cursor = encode_cursor([rows[-1][3], rows[-1][0].hex()]) if more and rows else None
        return Page(items, cursor)

    def _matched_spans(
        self, db: sqlite3.Connection, project: str, trace_id: bytes, query: TraceFilter
    ) -> list[str]:
        """Ids of the trace's spans meeting one of the span conditions of ``query``."""
        if not query.span_conditions:
            return []
        where, args = _TRACE_SPANS, [project, trace_id]
        if not query.attributes:  # else every span is a candidate
            names = []
            if query.name is not None:
                names.append("s.name = ?")
                args.append(query.name)
            if query.name_contains is not None:
                names.append("instr(lower(s.name), lower(?)) > 0")
                args.append(query.name_contains)
            where += f" AND ({' OR '.join(names)})"
        rows = db.execute(
            f"SELECT s.span_id, s.name, s.span FROM spans s WHERE {where}"
            " ORDER BY s.start_ns, s.span_id",
            args,
        ).fetchall()
        return matched_span_ids(rows, query)

    def _span_count(self, db: sqlite3.Connection, project: str, trace_id: bytes) -> int:
        """Counted in ``spans_by_trace`` alone (covering): no span row is read."""
        (count,) = db.execute(
            f"SELECT count(*) FROM spans s WHERE {_TRACE_SPANS}", (project, trace_id)
        ).fetchone()
        return int(count)

    async def trace(self, project: str, trace_id: bytes) -> dict[str, Any] | None:
        return await self._run(self._trace, project, trace_id)

    def _trace(self, project: str, trace_id: bytes) -> dict[str, Any] | None:
        db = self._db()
        row = db.execute(
            f"SELECT {_TRACE_COLUMNS} FROM traces WHERE project = ? AND trace_id = ?",
            (project, trace_id),
        ).fetchone()
        if row is None:
            return None
        spans, resources = self._spans(db, _TRACE_SPANS, (project, trace_id))
        return {
            "trace": trace_json(row, len(spans)),
            "spans": spans,
            "resources": resources,
        }

    # -- span search ----------------------------------------------------------------

    async def spans(self, project: str, query: SpanFilter) -> Page:
        return await self._run(self._search_spans, project, query)

    def _search_spans(self, project: str, query: SpanFilter) -> Page:
        """Walks the candidate spans in result order, keeping those whose attributes
        match (they live in the span's protobuf bytes), and stops once it has a page:
        SQLite steps the one statement only as far as it is read."""
        db = self._db()
        position = decode_span_cursor(query.cursor) if query.cursor else None
        resources: dict[int, dict[str, Any]] = {}
        hits: list[tuple[dict[str, Any], tuple[int, bytes, int, bytes]]] = []
        sql, args = spans_sql(project, query, position, -1)
        for row in db.execute(sql, args):
            trace_row, service, resource_id, attributes = row[:4], row[4], row[5], row[6]
            span_row = row[7:]
            if resource_id not in resources:
                resources[resource_id] = json.loads(attributes) if attributes else {}
            resource = resources[resource_id]
            if not _resource_has(resource, query.resource_conditions()):
                continue
            if not payload_matches(span_row[11], resource, query.attributes):
                continue
            position = (row[1], row[0], span_row[4], span_row[1])
            hits.append((span_hit_json(span_json(span_row), service, trace_row), position))
            if len(hits) > query.limit:
                break
        more = len(hits) > query.limit
        hits = hits[: query.limit]
        cursor = encode_span_cursor(*hits[-1][1]) if more and hits else None
        return Page([hit for hit, _ in hits], cursor)

    # -- spans ----------------------------------------------------------------------

    def _spans(
        self, db: sqlite3.Connection, where: str, args: tuple[Any, ...]
    ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
        """Spans as dicts (attributes decoded), and the attributes of their resources."""
        rows = db.execute(
            f"SELECT {_SPAN_COLUMNS} FROM spans s LEFT JOIN scopes sc ON sc.scope_id = s.scope_id"
            f" WHERE {where}",
            args,
        ).fetchall()
        spans = [span_json(row) for row in rows]
        resource_ids = sorted({row[8] for row in rows})
        resources: dict[str, dict[str, Any]] = {}
        for chunk in range(0, len(resource_ids), 500):
            ids = resource_ids[chunk : chunk + 500]
            marks = ",".join("?" * len(ids))
            for resource_id, attributes in db.execute(
                f"SELECT resource_id, attributes FROM resources WHERE resource_id IN ({marks})",
                ids,
            ):
                resources[str(resource_id)] = jsonable(json.loads(attributes))
        return spans, resources


# -- statements -------------------------------------------------------------


def _stale_calls_sql(
    project: str, start_ns: int | None, end_ns: int | None
) -> tuple[str, list[Any]]:
    """The calls of the range whose cached summary is missing, of another version or
    made from another number of spans than the call now has."""
    sql = [
        "SELECT call_id FROM calls WHERE project = ? AND start_ns IS NOT NULL",
        "AND (summary IS NULL OR summary_spans IS NULL",
        " OR json_extract(summary, '$.version') IS NOT ?",
        f" OR summary_spans != ({_CALL_SPAN_COUNT.format(call='calls.call_id')}))",
    ]
    order = "ORDER BY start_ns DESC, call_id"
    args: list[Any] = [project, SUMMARY_VERSION, project]
    if start_ns is not None:
        sql.append("AND start_ns >= ?")
        args.append(start_ns)
    if end_ns is not None:
        sql.append("AND start_ns < ?")
        args.append(end_ns)
    sql.append(order)
    return " ".join(sql), args


def _histogram_point(row: Any) -> dict[str, Any]:
    point = dict(zip(_HISTOGRAM_FIELDS, tuple(row), strict=True))
    point["tags"] = _call_tags(point["tags"])
    return point


@functools.lru_cache(maxsize=4096)
def _call_tags(text: str | None) -> dict[str, Any]:
    """A call's tags column, parsed once per distinct text (read only)."""
    return jsonable(json.loads(text)) if text else {}


_HISTOGRAM_FIELDS = (
    "name",
    "unit",
    "call_id",
    "at_ns",
    "service",
    "tags",
    "model",
    "count",
    "min",
    "max",
    "bucket_counts",
    "explicit_bounds",
)


def _has_signal_tables(db: sqlite3.Connection) -> bool:
    """Whether the file has the logs and recordings tables (a file written before
    they existed, and never opened by the exporter since, has not)."""
    found = db.execute(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
        " AND name IN ('log_records', 'recordings', 'session_facts')"
    ).fetchone()
    return bool(found and found[0] == 3)


def _session_conditions(project: str, query: CallFilter) -> tuple[list[str], list[Any]]:
    """``calls_sql`` conditions for ``outcome`` and ``session_tag``, on the
    ``session_facts`` table the signal store keeps (``collector.signals_storage``)."""
    sql: list[str] = []
    args: list[Any] = []
    if query.session_tag is not None:
        sql.append(
            "AND call_id IN (SELECT call_id FROM session_facts WHERE project = ?"
            " AND kind = 'tag' AND value = ?)"
        )
        args += [project, query.session_tag]
    if query.outcome is not None:
        sql.append(
            "AND call_id IN (SELECT call_id FROM session_facts WHERE project = ?"
            " AND kind = 'outcome' AND value = ? UNION SELECT call_id FROM session_facts"
            " WHERE project = ? AND kind = 'tag' AND value = ?)"
        )
        args += [project, query.outcome, project, outcome_tag(query.outcome)]
    return sql, args


def _resource_has(resource: dict[str, Any], conditions: list[tuple[str, str]]) -> bool:
    from collector.storage import attribute_text

    return all(attribute_text(resource.get(key)) == text for key, text in conditions)


def _call_sort_key(sort: str) -> str:
    """The expression the calls list orders by for ``sort`` (never null: -1 for none)."""
    field = CALL_SORTS[sort]
    if field is not None:
        return f"coalesce(json_extract(summary, '$.totals.{field}'), -1)"
    return "coalesce(end_ns - start_ns, -1)"


def calls_sql(project: str, query: CallFilter) -> tuple[str, list[Any]]:
    """The calls list statement: a range scan of ``calls_by_start``; sorted by a summary
    field or the duration, every call of the range is read and sorted."""
    sort_key = None if query.sort == "start" else _call_sort_key(query.sort)
    columns = _CALL_COLUMNS if sort_key is None else f"{_CALL_COLUMNS}, {sort_key} AS sort_key"
    sql = [f"SELECT {columns} FROM calls WHERE project = ? AND start_ns IS NOT NULL"]
    args: list[Any] = [project]
    for field, minimum in query.summary_minimums():
        sql.append(f"AND json_extract(summary, '$.totals.{field}') >= ?")
        args.append(minimum)
    if query.min_duration_ns is not None:
        sql.append("AND end_ns - start_ns >= ?")
        args.append(query.min_duration_ns)
    if query.start_ns is not None:
        sql.append("AND start_ns >= ?")
        args.append(query.start_ns)
    if query.end_ns is not None:
        sql.append("AND start_ns < ?")
        args.append(query.end_ns)
    if query.cursor is not None and sort_key is None:
        start, call_id = decode_cursor(query.cursor, (int, str))
        sql.append("AND start_ns <= ? AND (start_ns < ? OR call_id > ?)")
        args += [start, start, call_id]
    elif query.cursor is not None:
        value, call_id = decode_cursor(query.cursor, (float, str))
        sql.append(f"AND ({sort_key} < ? OR ({sort_key} = ? AND call_id > ?))")
        args += [value, value, call_id]
    conditions = [*query.attributes, *((TAG_PREFIX + k, v) for k, v in query.tags)]
    for key, value in conditions:
        sql.append(
            "AND call_id IN (SELECT t.call_id FROM trace_search f JOIN traces t"
            " ON t.project = f.project AND t.trace_id = f.trace_id"
            " WHERE trace_search MATCH ?)"
        )
        args.append(search_match(project, key, value))
    session_sql, session_args = _session_conditions(project, query)
    sql += session_sql
    args += session_args
    if sort_key is None:
        sql.append("ORDER BY start_ns DESC, call_id LIMIT ?")
    else:
        sql.append("ORDER BY sort_key DESC, call_id LIMIT ?")
    args.append(query.limit + 1)
    return " ".join(sql), args


def traces_sql(project: str, query: TraceFilter) -> tuple[str, list[Any]]:
    """The trace search statement: ``traces_by_start`` with one indexed ``IN`` per condition."""
    sql = [f"SELECT {_TRACE_COLUMNS} FROM traces WHERE project = ?"]
    args: list[Any] = [project]
    if query.start_ns is not None:
        sql.append("AND start_ns >= ?")
        args.append(query.start_ns)
    if query.end_ns is not None:
        sql.append("AND start_ns < ?")
        args.append(query.end_ns)
    if query.cursor is not None:
        start, trace_id = decode_trace_cursor(query.cursor)
        sql.append("AND start_ns <= ? AND (start_ns < ? OR trace_id > ?)")
        args += [start, start, trace_id]
    if query.service is not None:
        sql.append("AND instr(lower(service), lower(?)) > 0")
        args.append(query.service)
    if query.min_duration_ns is not None:
        # "+": filter while walking traces_by_start (newest first, stops at the limit)
        # rather than sort every long-enough trace for each page.
        sql.append("AND +duration_ns >= ?")
        args.append(query.min_duration_ns)
    if query.status is not None:
        sql.append("AND has_error = ?")
        args.append(1 if query.status == "error" else 0)
    if query.name is not None:
        sql.append("AND seq IN (SELECT trace_seq FROM trace_names WHERE project = ? AND name = ?)")
        args += [project, query.name]
    if query.name_contains is not None:
        sql.append(
            "AND seq IN (SELECT trace_seq FROM trace_names WHERE project = ? AND name IN"
            " (SELECT name FROM span_names WHERE project = ?"
            " AND instr(lower(name), lower(?)) > 0))"
        )
        args += [project, project, query.name_contains]
    for key, value in [*query.attributes, *((TAG_PREFIX + k, v) for k, v in query.tags)]:
        sql.append("AND trace_id IN (SELECT trace_id FROM trace_search WHERE trace_search MATCH ?)")
        args.append(search_match(project, key, value))
    sql.append("ORDER BY start_ns DESC, trace_id LIMIT ?")
    args.append(query.limit + 1)
    return " ".join(sql), args


def spans_sql(
    project: str,
    query: SpanFilter,
    after: tuple[int, bytes, int, bytes] | None,
    limit: int,
) -> tuple[str, list[Any]]:
    """Span search candidates in result order (trace start descending, trace id, span
    start, span id): ``traces_by_start``, each trace's spans from ``spans_by_trace``; the
    column conditions here, attribute conditions narrowed to traces holding the
    attribute (``trace_search``) and checked on each span by the caller. ``limit`` -1:
    no limit (the caller stops reading)."""
    sql = [
        "SELECT t.trace_id, t.start_ns, t.root_name, t.duration_ns, r.service,"
        f" s.resource_id, r.attributes, {_SPAN_COLUMNS}"
        " FROM traces t JOIN spans s ON s.trace_seq = t.seq"
        " LEFT JOIN scopes sc ON sc.scope_id = s.scope_id"
        " LEFT JOIN resources r ON r.resource_id = s.resource_id"
        " WHERE t.project = ? AND s.project = ?"
    ]
    args: list[Any] = [project, project]
    if query.start_ns is not None:
        sql.append("AND t.end_ns >= ? AND s.start_ns >= ?")
        args += [query.start_ns, query.start_ns]
    if query.end_ns is not None:
        sql.append("AND t.start_ns < ? AND s.start_ns < ?")
        args += [query.end_ns, query.end_ns]
    if after is not None:
        trace_start, trace_id, start, span_id = after
        sql.append(
            "AND (t.start_ns < ? OR (t.start_ns = ? AND (t.trace_id > ? OR (t.trace_id = ?"
            " AND (s.start_ns > ? OR (s.start_ns = ? AND s.span_id > ?))))))"
        )
        args += [trace_start, trace_start, trace_id, trace_id, start, start, span_id]
    if query.name is not None:
        sql.append(
            "AND t.seq IN (SELECT trace_seq FROM trace_names WHERE project = ? AND name IN"
            " (SELECT name FROM span_names WHERE project = ?"
            " AND instr(lower(name), lower(?)) > 0))"
            " AND instr(lower(s.name), lower(?)) > 0"
        )
        args += [project, project, query.name, query.name]
    if query.service is not None:
        sql.append("AND instr(lower(r.service), lower(?)) > 0")
        args.append(query.service)
    if query.min_duration_ns is not None:
        sql.append("AND s.duration_ns >= ?")
        args.append(query.min_duration_ns)
    if query.status is not None:
        sql.append("AND s.status_code = 2" if query.status == "error" else "AND s.status_code != 2")
    for key, value in [*query.attributes, *query.resource_conditions()]:
        sql.append(
            "AND t.trace_id IN (SELECT trace_id FROM trace_search WHERE trace_search MATCH ?)"
        )
        args.append(search_match(project, key, value))
    sql.append("ORDER BY t.start_ns DESC, t.trace_id, s.start_ns, s.span_id LIMIT ?")
    args.append(limit)
    return " ".join(sql), args
