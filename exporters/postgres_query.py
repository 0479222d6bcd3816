"""The read side of the ``postgres`` exporter's schema: what the query API asks of it.

The same semantics and JSON as the SQLite store (``collector/query.py`` builds both), so
a gateway of many collectors sharing PostgreSQL answers like one collector on SQLite.
Reads use a pool of their own, opened on first use with at most ``pool_size``
connections that close when idle, so queries never wait on the exporter's write
connections. Every statement is scoped to a project and walks an index (the tests read
``EXPLAIN``):

- calls list: ``calls_by_start`` (project, start_ns DESC, call_id), the cursor a range
  bound on it; each listed call's span count comes from ``spans_by_call`` alone
  (index-only) in the same statement, and its turn totals from the ``calls.summary``
  cache, recomputed when ``summary_spans`` differs from that count;
- trace search: ``traces_by_start``, each condition a semi-join over an index:
  ``trace_attrs`` (project, key, value) for ``attr.*``, ``spans_by_name_trace`` for
  names, ``span_names`` for name substrings;
- one call / one trace: ``spans_by_call`` / the spans primary key; resources by digest.
- span search: traces newest first from ``traces_by_start`` (narrowed like trace
  search), each one's spans by the spans primary key, a chunk of candidates at a time;
  attribute conditions are checked on each candidate's stored bytes;
- calls sorted or filtered by turn latency: the range sorted by a field of the summary
  cache (``summary::jsonb``), after one statement found the range's stale summaries
  and they were recomputed.

Attributes, events and links are decoded from each span's stored protobuf bytes, off the
event loop. A server that cannot be reached answers ``StorageUnavailableError`` (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

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
    resource_key,
    span_hit_json,
    span_json,
    summary_cache_text,
    trace_json,
)
from collector.session_facts import SESSION_BODIES_SQL, outcome_tag, session_facts
from collector.turn_histograms import TURN_HISTOGRAMS
from collector.turns import summarize_call

log = logging.getLogger(__name__)

__all__ = ["PostgresQueryStore", "calls_sql", "spans_sql", "traces_sql"]

_SPAN_COLUMNS = (
    "s.trace_id, s.span_id, s.parent_span_id, s.name, s.start_ns, s.end_ns, s.status_code,"
    " s.call_id, s.resource_digest, sc.name, sc.version, s.span"
)
_TRACE_COLUMNS = (
    "t.trace_id, t.call_id, t.service, t.start_ns, t.end_ns, t.duration_ns, t.root_name,"
    " t.root_span_id, t.has_error"
)
_CALL_COLUMNS = (
    "c.call_id, c.room_id, c.source, c.room_name, c.service, c.start_ns, c.end_ns,"
    " c.tags::text, c.summary, c.summary_spans"
)
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,  # the connection or the pool closed under a query
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # admin shutdown, cannot connect now, cancelled
    asyncpg.InsufficientResourcesError,  # too many connections, disk full
)
_SUMMARY_CHUNK = 16
"""Calls whose spans are read together when their cached summaries are stale."""


class PostgresQueryStore:
    """Queries over the schema the ``postgres`` exporter writes."""

    def __init__(self, dsn: str, schema: str, *, pool_size: int = 4, connect_timeout: float = 10.0):
        self.schema = schema
        self._dsn = dsn  # holds a password: never logged
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None
        self._pool_lock: asyncio.Lock | None = None
        self._closed = False
        self._parsed = ParsedSummaries()

    # -- plumbing -------------------------------------------------------------------

    async def _open_pool(self) -> asyncpg.Pool:
        if self._closed:
            raise StorageUnavailableError("PostgreSQL: the query store is closed")
        if self._pool_lock is None:
            self._pool_lock = asyncio.Lock()
        async with self._pool_lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=0,
                    max_size=self._pool_size,
                    timeout=self._connect_timeout,
                    max_inactive_connection_lifetime=60.0,
                )
            return self._pool

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; an unreachable server is ``StorageUnavailableError``."""
        try:
            pool = self._pool or await self._open_pool()
            async with pool.acquire(timeout=self._connect_timeout) as conn:
                yield conn
        except _UNAVAILABLE as exc:
            raise StorageUnavailableError(f"PostgreSQL: {type(exc).__name__}: {exc}") from exc

    async def shared_secret(self, name: str) -> bytes | None:
        """A random 32-byte secret named ``name``, kept in the schema (table
        ``query_secrets``, created on first use): the same for every instance sharing the
        database. None when the server refuses the write and none is stored yet."""
        s = self.schema
        async with self._connection() as conn:
            try:
                for _ in range(3):  # instances creating the table at once: one wins
                    try:
                        await conn.execute(
                            f"CREATE TABLE IF NOT EXISTS {s}.query_secrets"
                            " (name text PRIMARY KEY, secret bytea NOT NULL)"
                        )
                        break
                    except asyncpg.UniqueViolationError:
                        continue
                await conn.execute(
                    f"INSERT INTO {s}.query_secrets (name, secret) VALUES ($1, $2)"
                    " ON CONFLICT (name) DO NOTHING",
                    name,
                    os.urandom(32),
                )
            except (asyncpg.ReadOnlySQLTransactionError, asyncpg.InsufficientPrivilegeError):
                log.warning("PostgreSQL refused to store the query secret %r", name)
            try:
                secret = await conn.fetchval(
                    f"SELECT secret FROM {s}.query_secrets WHERE name = $1", name
                )
            except asyncpg.UndefinedTableError:
                secret = None
        return None if secret is None else bytes(secret)

    async def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def _store_summaries(
        self, conn: asyncpg.Connection, project: str, fresh: dict[str, tuple[dict[str, Any], int]]
    ) -> None:
        """Cache summaries. Best effort: a call row a writer holds is skipped (never waited
        on, so a writer is never blocked behind us for long) and recomputed next time; a
        refused write (a read-only server) only means recomputing every time."""
        if not fresh:
            return
        s = self.schema
        call_ids = sorted(fresh)
        try:
            await conn.execute(
                f"WITH free AS (SELECT call_id FROM {s}.calls WHERE project = $1"
                " AND call_id = ANY($2::text[]) ORDER BY call_id FOR UPDATE SKIP LOCKED)"
                f" UPDATE {s}.calls c SET summary = v.summary, summary_spans = v.spans"
                " FROM unnest($2::text[], $3::text[], $4::int[]) AS v(call_id, summary, spans)"
                " WHERE c.project = $1 AND c.call_id = v.call_id"
                " AND c.call_id IN (SELECT call_id FROM free)",
                project,
                call_ids,
                [summary_cache_text(fresh[c][0]) for c in call_ids],
                [fresh[c][1] for c in call_ids],
            )
        except asyncpg.PostgresError as exc:
            log.debug("summary cache not written: %s", exc)

    async def _spans(
        self, conn: asyncpg.Connection, where: str, *args: Any
    ) -> list[asyncpg.Record]:
        s = self.schema
        return list(
            await conn.fetch(
                f"SELECT {_SPAN_COLUMNS} FROM {s}.spans s"
                f" LEFT JOIN {s}.scopes sc ON sc.digest = s.scope_digest"
                f" WHERE {where} ORDER BY s.start_ns, s.span_id",
                *args,
            )
        )

    async def _resources(
        self, conn: asyncpg.Connection, rows: list[asyncpg.Record]
    ) -> dict[str, dict[str, Any]]:
        """The attributes of the resources of ``rows`` (span rows), by resource key."""
        digests = sorted({bytes(row[8]) for row in rows})
        found = await conn.fetch(
            f"SELECT digest, attributes::text FROM {self.schema}.resources"
            " WHERE digest = ANY($1::bytea[])",
            digests,
        )
        return {resource_key(digest): jsonable(json.loads(text)) for digest, text in found}

    # -- calls ----------------------------------------------------------------------

    async def calls(self, project: str, query: CallFilter) -> Page:
        sql, args = calls_sql(self.schema, project, query)
        pending = 0
        async with self._connection() as conn:
            if query.needs_summaries:
                _fresh, stale = await self._refresh_summaries(
                    conn, project, query.start_ns, query.end_ns
                )
                pending = len(stale)
            rows = await conn.fetch(sql, *args)
            more = len(rows) > query.limit
            rows = rows[: query.limit]
            known: dict[str, tuple[dict[str, Any], int]] = {}
            stale: list[str] = []
            for row in rows:
                call_id, span_count = row["call_id"], row["span_count"]
                summary = cached_summary(row["summary"], row["summary_spans"], span_count)
                if summary is None:
                    stale.append(call_id)
                else:
                    known[call_id] = (summary, span_count)
            for first in range(0, len(stale), _SUMMARY_CHUNK):
                chunk = stale[first : first + _SUMMARY_CHUNK]
                span_rows = await self._spans(
                    conn,
                    f"s.project = $1 AND {_in_calls(self.schema, '$1', '= ANY($2::text[])')}",
                    project,
                    chunk,
                )
                fresh = await asyncio.to_thread(_summaries, chunk, span_rows)
                await self._store_summaries(conn, project, fresh)
                known.update(fresh)
            facts = await self._session_facts(conn, project, [row["call_id"] for row in rows])
        items = [
            {**call_json(row, *known[row["call_id"]]), **facts[row["call_id"]]} for row in rows
        ]
        last = rows[-1] if more and rows else None
        cursor = None
        if last is not None and query.sort == "start":
            cursor = encode_cursor([last["start_ns"], last["call_id"]])
        elif last is not None:
            cursor = encode_cursor([float(last["sort_key"]), last["call_id"]])
        return Page(items, cursor, pending)

    async def summaries(
        self, project: str, start_ns: int | None, end_ns: int | None
    ) -> CallSummaries:
        async with self._connection() as conn:
            return await self._current_summaries(conn, project, start_ns, end_ns)

    async def _refresh_summaries(
        self, conn: asyncpg.Connection, project: str, start_ns: int | None, end_ns: int | None
    ) -> tuple[dict[str, dict[str, Any]], set[str]]:
        """Recompute (and write back) the cached summaries of the range's calls that are
        missing, of another version or made from another number of spans, found in one
        statement, newest first, up to ``MAX_SUMMARY_REFRESH``; returns them (as cached)
        by call id, and the ids of the stale calls left."""
        s, arg = self.schema, _Args()
        p = arg(project)
        sql = [
            f"SELECT c.call_id FROM {s}.calls c WHERE c.project = {p} AND c.start_ns IS NOT NULL",
            "AND (c.summary IS NULL OR c.summary_spans IS NULL",
            f" OR (c.summary::jsonb ->> 'version') IS DISTINCT FROM {arg(str(SUMMARY_VERSION))}",
            f" OR c.summary_spans <> (SELECT count(*) FROM {s}.spans s WHERE s.project = c.project"
            f" AND {_in_calls(s, 'c.project', '= c.call_id')}))",
        ]
        if start_ns is not None:
            sql.append(f"AND c.start_ns >= {arg(start_ns)}")
        if end_ns is not None:
            sql.append(f"AND c.start_ns < {arg(end_ns)}")
        sql.append("ORDER BY c.start_ns DESC, c.call_id")
        found = [row["call_id"] for row in await conn.fetch(" ".join(sql), *arg.values)]
        stale, left = found[:MAX_SUMMARY_REFRESH], set(found[MAX_SUMMARY_REFRESH:])
        current: dict[str, dict[str, Any]] = {}
        for first in range(0, len(stale), _SUMMARY_CHUNK):
            chunk = stale[first : first + _SUMMARY_CHUNK]
            span_rows = await self._spans(
                conn,
                f"s.project = $1 AND {_in_calls(s, '$1', '= ANY($2::text[])')}",
                project,
                chunk,
            )
            fresh = await asyncio.to_thread(_summaries, chunk, span_rows)
            await self._store_summaries(conn, project, fresh)
            for call_id, (summary, _count) in fresh.items():
                current[call_id] = json.loads(summary_cache_text(summary))
        return current, left

    async def _current_summaries(
        self, conn: asyncpg.Connection, project: str, start_ns: int | None, end_ns: int | None
    ) -> CallSummaries:
        """Every call starting in the range with its current summary."""
        fresh, left = await self._refresh_summaries(conn, project, start_ns, end_ns)
        s, arg = self.schema, _Args()
        p = arg(project)
        sql = [
            "SELECT c.call_id, c.start_ns, c.service, c.tags::text AS tags, c.summary"
            f" FROM {s}.calls c WHERE c.project = {p} AND c.start_ns IS NOT NULL"
        ]
        if start_ns is not None:
            sql.append(f"AND c.start_ns >= {arg(start_ns)}")
        if end_ns is not None:
            sql.append(f"AND c.start_ns < {arg(end_ns)}")
        rows = await conn.fetch(" ".join(sql), *arg.values)
        calls = [
            {
                "call_id": row["call_id"],
                "start_ns": row["start_ns"],
                "service": row["service"],
                "tags": jsonable(json.loads(row["tags"])) if row["tags"] else {},
                "summary": fresh.get(row["call_id"])
                or self._parsed.parse((project, row["call_id"]), row["summary"]),
            }
            for row in rows
            if row["call_id"] not in left
        ]
        return CallSummaries(calls, len(left))

    async def call(self, project: str, call_id: str) -> dict[str, Any] | None:
        s = self.schema
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_CALL_COLUMNS} FROM {s}.calls c WHERE c.project = $1 AND c.call_id = $2",
                project,
                call_id,
            )
            if row is None:
                return None
            span_rows = await self._spans(
                conn,
                f"s.project = $1 AND {_in_calls(s, '$1', '= $2')}",
                project,
                call_id,
            )
            resources = await self._resources(conn, span_rows)
            spans, summary = await asyncio.to_thread(_spans_and_summary, span_rows)
            if row["summary_spans"] != len(spans):
                await self._store_summaries(conn, project, {call_id: (summary, len(spans))})
            facts = await self._session_facts(conn, project, [call_id])
        return {
            "call": {**call_json(row, summary, len(spans)), **facts[call_id]},
            "summary": summary,
            "spans": spans,
            "resources": resources,
        }

    async def turn_histograms(self, project: str, start_ns: int) -> list[dict[str, Any]]:
        s = self.schema
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT m.name, m.unit, m.call_id, coalesce(c.start_ns, m.start_ns) AS at_ns,"
                " coalesce(c.service, m.resource::jsonb ->> 'service.name') AS service,"
                " c.tags::text AS tags, m.attributes::jsonb ->> 'model_name' AS model,"
                " m.count, m.min, m.max, m.bucket_counts,"
                f" m.explicit_bounds FROM {s}.metric_points m LEFT JOIN {s}.calls c"
                " ON c.project = m.project AND c.call_id = m.call_id"
                " WHERE m.project = $1 AND m.name = ANY($2::text[]) AND m.kind = 'histogram'"
                " AND m.time_ns >= $3",
                project,
                list(TURN_HISTOGRAMS),
                start_ns,
            )
        points = []
        for row in rows:
            point = dict(row)
            point["tags"] = jsonable(json.loads(point["tags"])) if point["tags"] else {}
            points.append(point)
        return points

    async def _session_facts(
        self, conn: asyncpg.Connection, project: str, call_ids: list[str]
    ) -> dict[str, dict[str, Any]]:
        """Each call's LiveKit session facts (``collector.session_facts``)."""
        s = self.schema
        records: dict[str, list[tuple[Any, Any]]] = {c: [] for c in call_ids}
        summaries: dict[str, list[Any]] = {c: [] for c in call_ids}
        with_logs: set[str] = set()
        if call_ids:
            for row in await conn.fetch(
                f"SELECT call_id, body, attributes FROM {s}.log_records WHERE project = $1"
                f" AND call_id = ANY($2::text[]) AND {SESSION_BODIES_SQL} ORDER BY time_ns",
                project,
                call_ids,
            ):
                records[row["call_id"]].append((row["body"], row["attributes"]))
            for row in await conn.fetch(
                f"SELECT DISTINCT call_id FROM {s}.log_records WHERE project = $1"
                " AND call_id = ANY($2::text[])",
                project,
                call_ids,
            ):
                with_logs.add(row["call_id"])
            for row in await conn.fetch(
                f"SELECT call_id, session_summary FROM {s}.recordings WHERE project = $1"
                " AND call_id = ANY($2::text[])",
                project,
                call_ids,
            ):
                summaries[row["call_id"]].append(row["session_summary"])
        return {c: session_facts(records[c], summaries[c], c in with_logs) for c in call_ids}

    # -- traces ---------------------------------------------------------------------

    async def traces(self, project: str, query: TraceFilter) -> Page:
        sql, args = traces_sql(self.schema, project, query)
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *args)
            more = len(rows) > query.limit
            rows = rows[: query.limit]
            items = [trace_json(tuple(row)[:9], row["span_count"]) for row in rows]
            for item, row in zip(items, rows, strict=True):
                item["matched_spans"] = await self._matched_spans(
                    conn, project, row["trace_id"], query
                )
        last = rows[-1] if more and rows else None
        cursor = encode_cursor([last["start_ns"], last["trace_id"].hex()]) if last else None
        return Page(items, cursor)

    async def _matched_spans(
        self, conn: asyncpg.Connection, project: str, trace_id: bytes, query: TraceFilter
    ) -> list[str]:
        """Ids of the trace's spans meeting one of the span conditions of ``query``."""
        if not query.span_conditions:
            return []
        where, args = "s.project = $1 AND s.trace_id = $2", [project, trace_id]
        if not query.attributes:  # else every span is a candidate
            names = []
            if query.name is not None:
                args.append(query.name)
                names.append(f"s.name = ${len(args)}")
            if query.name_contains is not None:
                args.append(query.name_contains)
                names.append(f"strpos(lower(s.name), lower(${len(args)})) > 0")
            where += f" AND ({' OR '.join(names)})"
        rows = await conn.fetch(
            f"SELECT s.span_id, s.name, s.span FROM {self.schema}.spans s WHERE {where}"
            " ORDER BY s.start_ns, s.span_id",
            *args,
        )
        return await asyncio.to_thread(matched_span_ids, [tuple(r) for r in rows], query)

    # -- span search ------------------------------------------------------------------

    async def spans(self, project: str, query: SpanFilter) -> Page:
        """Walks the candidate spans in result order a chunk at a time (each four times
        the last), keeping those whose attributes match (attributes live in the span's
        protobuf bytes)."""
        position = decode_span_cursor(query.cursor) if query.cursor else None
        chunk = max(query.limit + 1, 256)
        resources: dict[bytes, dict[str, Any]] = {}
        hits: list[tuple[dict[str, Any], tuple[int, bytes, int, bytes]]] = []
        async with self._connection() as conn:
            while len(hits) <= query.limit:
                sql, args = spans_sql(self.schema, project, query, position, chunk)
                rows = await conn.fetch(sql, *args)
                found, position = await asyncio.to_thread(
                    _span_hits, rows, query, resources, query.limit + 1 - len(hits)
                )
                hits += found
                if len(rows) < chunk:
                    break
                chunk *= 4  # few hits so far: read further ahead each round
        more = len(hits) > query.limit
        hits = hits[: query.limit]
        cursor = encode_span_cursor(*hits[-1][1]) if more and hits else None
        return Page([hit for hit, _ in hits], cursor)

    async def trace(self, project: str, trace_id: bytes) -> dict[str, Any] | None:
        s = self.schema
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_TRACE_COLUMNS} FROM {s}.traces t"
                " WHERE t.project = $1 AND t.trace_id = $2",
                project,
                trace_id,
            )
            if row is None:
                return None
            span_rows = await self._spans(
                conn, "s.project = $1 AND s.trace_id = $2", project, trace_id
            )
            resources = await self._resources(conn, span_rows)
        spans = await asyncio.to_thread(_decode, span_rows)
        return {"trace": trace_json(row, len(spans)), "spans": spans, "resources": resources}


# -- decoding (in a worker thread: big calls hold thousands of spans) -------------------


def _decode(rows: list[asyncpg.Record]) -> list[dict[str, Any]]:
    return [span_json(row) for row in rows]


def _spans_and_summary(
    rows: list[asyncpg.Record],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    spans = _decode(rows)
    return spans, summarize_call(spans)


def _summaries(
    call_ids: list[str], rows: list[asyncpg.Record]
) -> dict[str, tuple[dict[str, Any], int]]:
    """Each call's summary and span count, from the span rows of all of them: a call
    is every span of every trace holding one of its spans (as in the sqlite store)."""
    spans: dict[str, list[dict[str, Any]]] = {call_id: [] for call_id in call_ids}
    calls_of_trace: dict[bytes, set[str]] = {}
    for row in rows:
        if row["call_id"] in spans:
            calls_of_trace.setdefault(bytes(row["trace_id"]), set()).add(row["call_id"])
    for row in rows:
        span = span_json(row)
        for call_id in calls_of_trace.get(bytes(row["trace_id"]), ()):
            spans[call_id].append(span)
    return {call_id: (summarize_call(found), len(found)) for call_id, found in spans.items()}


def _span_hits(
    rows: list[asyncpg.Record],
    query: SpanFilter,
    resources: dict[bytes, dict[str, Any]],
    wanted: int,
) -> tuple[list[tuple[dict[str, Any], tuple[int, bytes, int, bytes]]], Any]:
    """The rows that match, up to ``wanted``, and the position after the last row read."""
    from collector.storage import attribute_text

    hits: list[tuple[dict[str, Any], tuple[int, bytes, int, bytes]]] = []
    position = None
    for row in rows:
        values = tuple(row)
        service, digest, attributes = values[4], values[5], values[6]
        span_row = values[7:]
        position = (values[1], bytes(values[0]), span_row[4], bytes(span_row[1]))
        key = bytes(digest)
        if key not in resources:
            resources[key] = json.loads(attributes) if attributes else {}
        resource = resources[key]
        if not all(attribute_text(resource.get(k)) == v for k, v in query.resource_conditions()):
            continue
        if not payload_matches(bytes(span_row[11]), resource, query.attributes):
            continue
        span = span_json(span_row)
        hits.append((span_hit_json(span, service, (bytes(values[0]), *values[1:4])), position))
        if len(hits) >= wanted:
            break
    return hits, position


# -- statements -----------------------------------------------------------------------


def _in_calls(schema: str, project: str, call: str) -> str:
    """The condition that span ``s`` belongs to a call: its trace holds a span of the
    call (``t.call_id {call}``) in ``project``. A call is every span of every trace that
    holds one of its spans, as in the sqlite store."""
    return (
        f"s.trace_id IN (SELECT t.trace_id FROM {schema}.spans t"
        f" WHERE t.project = {project} AND t.call_id {call})"
    )


class _Args:
    """Statement arguments, each added once and named by its ``$n`` placeholder."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _call_sort_key(sort: str) -> str:
    """The expression the calls list orders by for ``sort`` (never null: -1 for none)."""
    field = CALL_SORTS[sort]
    if field is not None:
        return f"coalesce((c.summary::jsonb #>> '{{totals,{field}}}')::float8, -1)"
    return "coalesce((c.end_ns - c.start_ns)::float8, -1)"


def calls_sql(schema: str, project: str, query: CallFilter) -> tuple[str, list[Any]]:
    """The calls list statement: a range scan of ``calls_by_start``, with span counts;
    sorted by a summary field or the duration, every call of the range is read and
    sorted."""
    s, arg = schema, _Args()
    p = arg(project)
    sort_key = None if query.sort == "start" else _call_sort_key(query.sort)
    sort_column = "" if sort_key is None else f", {sort_key} AS sort_key"
    sql = [
        f"SELECT {_CALL_COLUMNS}, (SELECT count(*) FROM {s}.spans s"
        f" WHERE s.project = c.project AND {_in_calls(s, 'c.project', '= c.call_id')})"
        f" AS span_count{sort_column}"
        f" FROM {s}.calls c WHERE c.project = {p} AND c.start_ns IS NOT NULL"
    ]
    for field, minimum in query.summary_minimums():
        sql.append(f"AND (c.summary::jsonb #>> '{{totals,{field}}}')::float8 >= {arg(minimum)}")
    if query.min_duration_ns is not None:
        sql.append(f"AND c.end_ns - c.start_ns >= {arg(query.min_duration_ns)}")
    if query.start_ns is not None:
        sql.append(f"AND c.start_ns >= {arg(query.start_ns)}")
    if query.end_ns is not None:
        sql.append(f"AND c.start_ns < {arg(query.end_ns)}")
    if query.cursor is not None and sort_key is None:
        start, call_id = decode_cursor(query.cursor, (int, str))
        at = arg(start)
        sql.append(f"AND c.start_ns <= {at} AND (c.start_ns < {at} OR c.call_id > {arg(call_id)})")
    elif query.cursor is not None:
        value, call_id = decode_cursor(query.cursor, (float, str))
        at = arg(value)
        sql.append(f"AND ({sort_key} < {at} OR ({sort_key} = {at} AND c.call_id > {arg(call_id)}))")
    conditions = [*query.attributes, *((TAG_PREFIX + k, v) for k, v in query.tags)]
    for key, value in conditions:
        sql.append(
            f"AND c.call_id IN (SELECT t.call_id FROM {s}.trace_attrs a JOIN {s}.traces t"
            " ON t.project = a.project AND t.trace_id = a.trace_id"
            f" WHERE a.project = {p} AND a.key = {arg(key)} AND a.value = {arg(value)})"
        )
    if query.session_tag is not None:
        tag = query.session_tag
        sql.append(f"AND c.call_id IN ({_session_tag_sql(s, p, arg(tag), arg(_needle(tag)))})")
    if query.outcome is not None:
        tag = outcome_tag(query.outcome)
        sql.append(
            f"AND c.call_id IN (SELECT call_id FROM {s}.log_records WHERE project = {p}"
            f" AND call_id IS NOT NULL AND {SESSION_BODIES_SQL} AND body = '\"outcome\"'"
            f" AND attributes::jsonb #>> '{{outcome,outcome}}' = {arg(query.outcome)}"
            f" UNION {_session_tag_sql(s, p, arg(tag), arg(_needle(tag)))})"
        )
    order = "c.start_ns DESC" if sort_key is None else "sort_key DESC"
    sql.append(f"ORDER BY {order}, c.call_id LIMIT {arg(query.limit + 1)}")
    return " ".join(sql), arg.values


def _needle(tag: str) -> str:
    """The tag as ``signals_storage._json`` writes it."""
    return json.dumps(tag, ensure_ascii=False)


def _session_tag_sql(s: str, p: str, tag: str, needle: str) -> str:
    """Calls carrying the session tag ``tag`` (a placeholder) in project ``p``; ``needle``
    (a placeholder) is the tag as the writer encodes it in JSON: a text search for it
    skips the JSON parse of the large session reports that cannot hold it."""
    return (
        f"SELECT call_id FROM {s}.log_records WHERE project = {p} AND call_id IS NOT NULL"
        f" AND {SESSION_BODIES_SQL} AND ((body = '\"tag\"'"
        f" AND attributes::jsonb #>> '{{tag,name}}' = {tag})"
        f" OR (body = '\"session report\"' AND strpos(attributes, {needle}) > 0"
        f" AND (attributes::jsonb -> 'session.tags') @> jsonb_build_array({tag}::text)))"
        f" UNION SELECT call_id FROM {s}.recordings WHERE project = {p}"
        f" AND (session_summary::jsonb -> 'tags') @> jsonb_build_array({tag}::text)"
    )


def traces_sql(schema: str, project: str, query: TraceFilter) -> tuple[str, list[Any]]:
    """The trace search statement: ``traces_by_start`` with one indexed semi-join per
    condition, and each listed trace's span count from the spans primary key."""
    s, arg = schema, _Args()
    p = arg(project)
    sql = [
        f"SELECT {_TRACE_COLUMNS}, (SELECT count(*) FROM {s}.spans s"
        " WHERE s.project = t.project AND s.trace_id = t.trace_id) AS span_count"
        f" FROM {s}.traces t WHERE t.project = {p}"
    ]
    if query.start_ns is not None:
        sql.append(f"AND t.start_ns >= {arg(query.start_ns)}")
    if query.end_ns is not None:
        sql.append(f"AND t.start_ns < {arg(query.end_ns)}")
    if query.cursor is not None:
        start, trace_id = decode_trace_cursor(query.cursor)
        at = arg(start)
        sql.append(
            f"AND t.start_ns <= {at} AND (t.start_ns < {at} OR t.trace_id > {arg(trace_id)})"
        )
    if query.service is not None:
        sql.append(f"AND strpos(lower(t.service), lower({arg(query.service)})) > 0")
    if query.min_duration_ns is not None:
        sql.append(f"AND t.duration_ns >= {arg(query.min_duration_ns)}")
    if query.status is not None:
        sql.append(f"AND t.has_error = {arg(query.status == 'error')}")
    if query.name is not None:
        sql.append(
            f"AND t.trace_id IN (SELECT n.trace_id FROM {s}.spans n"
            f" WHERE n.project = {p} AND n.name = {arg(query.name)})"
        )
    if query.name_contains is not None:
        sql.append(
            f"AND t.trace_id IN (SELECT n.trace_id FROM {s}.spans n WHERE n.project = {p}"
            f" AND n.name IN (SELECT sn.name FROM {s}.span_names sn WHERE sn.project = {p}"
            f" AND strpos(lower(sn.name), lower({arg(query.name_contains)})) > 0))"
        )
    for key, value in [*query.attributes, *((TAG_PREFIX + k, v) for k, v in query.tags)]:
        sql.append(
            f"AND t.trace_id IN (SELECT a.trace_id FROM {s}.trace_attrs a"
            f" WHERE a.project = {p} AND a.key = {arg(key)} AND a.value = {arg(value)})"
        )
    sql.append(f"ORDER BY t.start_ns DESC, t.trace_id LIMIT {arg(query.limit + 1)}")
    return " ".join(sql), arg.values


def spans_sql(
    schema: str,
    project: str,
    query: SpanFilter,
    after: tuple[int, bytes, int, bytes] | None,
    limit: int,
) -> tuple[str, list[Any]]:
    """Span search candidates in result order (trace start descending, trace id, span
    start, span id): ``traces_by_start``, each trace's spans by the spans primary key;
    the column conditions here, attribute conditions narrowed to traces holding the
    attribute (``trace_attrs``) and checked on each span by the caller."""
    s, arg = schema, _Args()
    p = arg(project)
    sql = [
        "SELECT t.trace_id, t.start_ns, t.root_name, t.duration_ns, r.service,"
        f" s.resource_digest, r.attributes::text, {_SPAN_COLUMNS}"
        f" FROM {s}.traces t JOIN {s}.spans s"
        " ON s.project = t.project AND s.trace_id = t.trace_id"
        f" LEFT JOIN {s}.scopes sc ON sc.digest = s.scope_digest"
        f" LEFT JOIN {s}.resources r ON r.digest = s.resource_digest"
        f" WHERE t.project = {p}"
    ]
    if query.start_ns is not None:
        at = arg(query.start_ns)
        sql.append(f"AND t.end_ns >= {at} AND s.start_ns >= {at}")
    if query.end_ns is not None:
        at = arg(query.end_ns)
        sql.append(f"AND t.start_ns < {at} AND s.start_ns < {at}")
    if after is not None:
        trace_start, trace_id, start, span_id = after
        ts, ti, ss, si = arg(trace_start), arg(trace_id), arg(start), arg(span_id)
        sql.append(
            f"AND (t.start_ns < {ts} OR (t.start_ns = {ts} AND (t.trace_id > {ti}"
            f" OR (t.trace_id = {ti} AND (s.start_ns > {ss}"
            f" OR (s.start_ns = {ss} AND s.span_id > {si}))))))"
        )
    if query.name is not None:
        name = arg(query.name)
        sql.append(
            f"AND t.trace_id IN (SELECT n.trace_id FROM {s}.spans n WHERE n.project = {p}"
            f" AND n.name IN (SELECT sn.name FROM {s}.span_names sn WHERE sn.project = {p}"
            f" AND strpos(lower(sn.name), lower({name})) > 0))"
            f" AND strpos(lower(s.name), lower({name})) > 0"
        )
    if query.service is not None:
        sql.append(f"AND strpos(lower(r.service), lower({arg(query.service)})) > 0")
    if query.min_duration_ns is not None:
        sql.append(f"AND s.duration_ns >= {arg(query.min_duration_ns)}")
    if query.status is not None:
        sql.append("AND s.status_code = 2" if query.status == "error" else "AND s.status_code <> 2")
    for key, value in [*query.attributes, *query.resource_conditions()]:
        sql.append(
            f"AND t.trace_id IN (SELECT a.trace_id FROM {s}.trace_attrs a"
            f" WHERE a.project = {p} AND a.key = {arg(key)} AND a.value = {arg(value)})"
        )
    sql.append(f"ORDER BY t.start_ns DESC, t.trace_id, s.start_ns, s.span_id LIMIT {arg(limit)}")
    return " ".join(sql), arg.values
