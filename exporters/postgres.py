"""``postgres``: spans, traces and calls in PostgreSQL, for many collectors sharing storage.

The tables mirror the ``sqlite`` exporter's (one row per span with the columns queries
filter on plus the span's protobuf bytes; traces; a (key, value) -> trace attribute
index; calls), in a schema of their own (``calltrace`` by default). Writes are idempotent
on (project, trace id, span id) and never need a parent to exist first. Each batch is
one transaction: span rows are streamed with ``COPY`` into a temporary table and moved
with ``INSERT ... ON CONFLICT DO NOTHING``, so a retried batch stores nothing twice.

Connection problems are retryable (the exporter helper retries with backoff and keeps
the data queued); a batch PostgreSQL refuses as invalid is a permanent error.
``query_store()`` is the read side the query API uses (``exporters/postgres_query.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from typing import Any

import asyncpg
from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from pydantic import Field, SecretStr, field_validator

from collector import (
    ALL_SIGNALS,
    Duration,
    Exporter,
    ExporterConfig,
    Host,
    LogBatch,
    MetricBatch,
    PermanentError,
    RetryableError,
    SpanBatch,
)
from collector.query import jsonable
from collector.signals_postgres import PostgresSignalStore
from collector.storage import (
    build_rows,
    expire_periodically,
    resource_attributes,
)
from exporters.postgres_query import PostgresQueryStore

log = logging.getLogger(__name__)

__all__ = ["PostgresConfig", "PostgresExporter", "schema_ddl"]

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def schema_ddl(schema: str) -> str:
    s = schema
    return f"""
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.spans (
  project TEXT NOT NULL, trace_id BYTEA NOT NULL, span_id BYTEA NOT NULL,
  parent_span_id BYTEA, name TEXT NOT NULL, kind SMALLINT NOT NULL,
  start_ns BIGINT NOT NULL, end_ns BIGINT NOT NULL, duration_ns BIGINT NOT NULL,
  status_code SMALLINT NOT NULL, call_id TEXT, resource_digest BYTEA NOT NULL,
  scope_digest BYTEA NOT NULL, span BYTEA NOT NULL,
  PRIMARY KEY (project, trace_id, span_id));
CREATE INDEX IF NOT EXISTS spans_by_call ON {s}.spans (project, call_id, start_ns);
-- trace search by span name reads trace ids from this index alone (index-only scan)
DROP INDEX IF EXISTS {s}.spans_by_name;
CREATE INDEX IF NOT EXISTS spans_by_name_trace ON {s}.spans (project, name, trace_id);
DROP INDEX IF EXISTS {s}.spans_by_start;
CREATE TABLE IF NOT EXISTS {s}.resources (
  digest BYTEA PRIMARY KEY, service TEXT, attributes JSONB NOT NULL, resource BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.scopes (
  digest BYTEA PRIMARY KEY, name TEXT, version TEXT, scope BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.traces (
  project TEXT NOT NULL, trace_id BYTEA NOT NULL, call_id TEXT, service TEXT,
  start_ns BIGINT NOT NULL, end_ns BIGINT NOT NULL, duration_ns BIGINT NOT NULL,
  root_name TEXT, root_span_id BYTEA, has_error BOOLEAN NOT NULL DEFAULT false,
  PRIMARY KEY (project, trace_id));
CREATE INDEX IF NOT EXISTS traces_by_start ON {s}.traces (project, start_ns DESC, trace_id);
CREATE INDEX IF NOT EXISTS traces_by_duration ON {s}.traces (project, duration_ns DESC);
CREATE INDEX IF NOT EXISTS traces_by_call ON {s}.traces (project, call_id);
CREATE TABLE IF NOT EXISTS {s}.trace_attrs (
  project TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, trace_id BYTEA NOT NULL,
  PRIMARY KEY (project, key, value, trace_id));
CREATE TABLE IF NOT EXISTS {s}.span_names (
  project TEXT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (project, name));
CREATE TABLE IF NOT EXISTS {s}.calls (
  project TEXT NOT NULL, call_id TEXT NOT NULL, room_id TEXT NOT NULL, source TEXT NOT NULL,
  first_seen_ns BIGINT NOT NULL, last_seen_ns BIGINT NOT NULL,
  start_ns BIGINT, end_ns BIGINT, service TEXT, tags JSONB,
  skipped BOOLEAN NOT NULL DEFAULT false, room_name TEXT, metadata TEXT,
  summary TEXT, summary_spans INTEGER,
  PRIMARY KEY (project, call_id));
-- the query API's per-call turn summary cache: a schema made before it lacks these
-- (checked first: ALTER TABLE would lock out every collector's writes even as a no-op)
DO $$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = '{s}'
                 AND table_name = 'calls' AND column_name = 'summary_spans') THEN
    ALTER TABLE {s}.calls ADD COLUMN IF NOT EXISTS summary TEXT,
      ADD COLUMN IF NOT EXISTS summary_spans INTEGER;
  END IF;
END $$;
CREATE INDEX IF NOT EXISTS calls_by_start ON {s}.calls (project, start_ns DESC, call_id);
"""


_SPAN_COLUMNS = (
    "project",
    "trace_id",
    "span_id",
    "parent_span_id",
    "name",
    "kind",
    "start_ns",
    "end_ns",
    "duration_ns",
    "status_code",
    "call_id",
    "resource_digest",
    "scope_digest",
    "span",
)


class PostgresConfig(ExporterConfig):
    dsn: SecretStr
    """``postgresql://user:password@host:5432/db?sslmode=require`` (a secret: never logged)."""
    db_schema: str = Field(default="calltrace", alias="schema")
    """Schema holding calltrace's tables; created when missing."""
    pool_size: int = Field(default=4, ge=1, le=64)
    retention: Duration = 0.0
    """Delete spans, traces and calls older than this (e.g. "720h"); 0 keeps everything."""
    retention_check_interval: Duration = 300.0
    connect_timeout: Duration = 10.0

    model_config = {"populate_by_name": True}

    @field_validator("db_schema")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError(
                f"expected a lower-case SQL identifier like 'calltrace', got {value!r}"
            )
        return value


class PostgresExporter(Exporter):
    type_name = "postgres"
    Config = PostgresConfig
    config: PostgresConfig
    signals = ALL_SIGNALS

    def __init__(self, component_id: str, config: PostgresConfig):
        super().__init__(component_id, config)
        self._pool: asyncpg.Pool | None = None
        self._retention_task: asyncio.Task[None] | None = None
        self._known_resources: set[bytes] = set()
        self._known_scopes: set[bytes] = set()
        self._query_store: PostgresQueryStore | None = None
        self._signal_store = PostgresSignalStore(lambda: self._pool, config.db_schema)

    def signal_store(self) -> PostgresSignalStore:
        """Logs, metric points and recordings in this exporter's schema
        (``collector.signals_postgres``)."""
        return self._signal_store

    async def export_logs(self, batch: LogBatch) -> None:
        await self._signal_write(self._signal_store.write_logs, batch)

    async def export_metrics(self, batch: MetricBatch) -> None:
        await self._signal_write(self._signal_store.write_metrics, batch)

    async def _signal_write(self, write: Any, batch: Any) -> None:
        if self._pool is None:
            raise RetryableError(f"{self.id} is not started")
        try:
            await write(batch)
        except (asyncpg.DataError, asyncpg.ProgramLimitExceededError) as exc:
            raise PermanentError(f"{self.id}: PostgreSQL refused the batch: {exc}") from exc
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise RetryableError(f"{self.id}: {type(exc).__name__}: {exc}") from exc

    @property
    def schema(self) -> str:
        return self.config.db_schema

    def query_store(self) -> PostgresQueryStore:
        """The read side of this exporter's schema, for the query API (its own pool)."""
        if self._query_store is None:
            self._query_store = PostgresQueryStore(
                self.config.dsn.get_secret_value(),
                self.schema,
                pool_size=self.config.pool_size,
                connect_timeout=self.config.connect_timeout,
            )
        return self._query_store

    async def start(self, host: Host) -> None:
        if self._pool is not None:
            return
        schema = self.schema

        async def init(conn: asyncpg.Connection) -> None:
            await conn.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS spans_in (LIKE {schema}.spans)"
                " ON COMMIT DELETE ROWS;"
                f" CREATE TEMP TABLE IF NOT EXISTS trace_attrs_in (LIKE {schema}.trace_attrs)"
                " ON COMMIT DELETE ROWS"
            )

        # The schema first, on a plain connection, so the pool's init finds the tables.
        # Start-up waits for the server (a gateway may start before its database).
        deadline = time.monotonic() + max(self.config.connect_timeout, 1.0)
        while True:
            try:
                conn = await asyncpg.connect(
                    self.config.dsn.get_secret_value(), timeout=self.config.connect_timeout
                )
                break
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.id}: cannot connect to PostgreSQL: {exc}") from None
                await asyncio.sleep(0.5)
        try:
            # Two collectors creating the schema at once would race; a lock serialises it.
            await conn.execute("SELECT pg_advisory_lock(hashtext('calltrace-schema'))")
            await conn.execute(schema_ddl(schema))
            await conn.execute("SELECT pg_advisory_unlock(hashtext('calltrace-schema'))")
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self.config.dsn.get_secret_value(),
            min_size=1,
            max_size=self.config.pool_size,
            init=init,
            timeout=self.config.connect_timeout,
        )
        await self._signal_store.open()  # logs, metrics, recordings tables
        if self.config.retention:
            self._retention_task = asyncio.create_task(
                expire_periodically(
                    self.id,
                    self.config.retention,
                    self.config.retention_check_interval,
                    self.expire,
                )
            )

    async def export(self, batch: SpanBatch) -> None:
        if self._pool is None:
            raise RetryableError(f"{self.id} is not started")
        try:
            prepared = _Prepared(batch, time.time_ns())
        except (OverflowError, ValueError, DecodeError) as exc:  # would repeat: the data
            raise PermanentError(f"{self.id}: cannot store the batch: {exc!r}") from exc
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await self._write(conn, batch.project or "", prepared)
        except (
            OverflowError,
            asyncpg.DataError,
            asyncpg.IntegrityConstraintViolationError,
            asyncpg.ProgramLimitExceededError,
        ) as exc:
            raise PermanentError(f"{self.id}: PostgreSQL refused the batch: {exc}") from exc
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._known_resources.clear()  # the transaction may have rolled them back
            self._known_scopes.clear()
            raise RetryableError(f"{self.id}: {type(exc).__name__}: {exc}") from exc

    async def _write(self, conn: asyncpg.Connection, project: str, prepared: _Prepared) -> None:
        # PostgreSQL text refuses NUL characters, which SQLite and protobuf allow: every
        # string from the batch goes through _text (a no-op without NUL).
        s = self.schema
        rows = prepared.rows
        new_resources = [r for d, r in prepared.resources.items() if d not in self._known_resources]
        if new_resources:
            await conn.executemany(
                f"INSERT INTO {s}.resources (digest, service, attributes, resource)"
                " VALUES ($1, $2, $3::jsonb, $4) ON CONFLICT (digest) DO NOTHING",
                new_resources,
            )
        new_scopes = [r for d, r in prepared.scopes.items() if d not in self._known_scopes]
        if new_scopes:
            await conn.executemany(
                f"INSERT INTO {s}.scopes (digest, name, version, scope)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (digest) DO NOTHING",
                new_scopes,
            )
        spans = [
            row if "\x00" not in row[4] else (*row[:4], _text(row[4]), *row[5:])
            for row in rows.spans
        ]
        await conn.copy_records_to_table("spans_in", records=spans, columns=_SPAN_COLUMNS)
        await conn.execute(
            f"INSERT INTO {s}.spans SELECT * FROM spans_in"
            " ON CONFLICT (project, trace_id, span_id) DO NOTHING"
        )
        await conn.executemany(
            f"INSERT INTO {s}.traces (project, trace_id, call_id, service, start_ns, end_ns,"
            " duration_ns, root_name, root_span_id, has_error)"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)"
            " ON CONFLICT (project, trace_id) DO UPDATE SET"
            " call_id = coalesce(traces.call_id, excluded.call_id),"
            " service = coalesce(traces.service, excluded.service),"
            " start_ns = least(traces.start_ns, excluded.start_ns),"
            " end_ns = greatest(traces.end_ns, excluded.end_ns),"
            " duration_ns = greatest(traces.end_ns, excluded.end_ns)"
            " - least(traces.start_ns, excluded.start_ns),"
            " root_name = coalesce(excluded.root_name, traces.root_name),"
            " root_span_id = coalesce(excluded.root_span_id, traces.root_span_id),"
            " has_error = traces.has_error OR excluded.has_error",
            [
                (project, t[0], t[1], _maybe_text(t[2]), *t[3:6], _maybe_text(t[6]), t[7], t[8])
                for t in rows.traces.values()
            ],
        )
        if rows.trace_attrs:
            await conn.copy_records_to_table(
                "trace_attrs_in",
                records=[(project, _text(k), _text(v), t) for k, v, t in rows.attribute_rows()],
                columns=("project", "key", "value", "trace_id"),
            )
            await conn.execute(
                f"INSERT INTO {s}.trace_attrs SELECT * FROM trace_attrs_in ON CONFLICT DO NOTHING"
            )
        await conn.executemany(
            f"INSERT INTO {s}.span_names (project, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [(project, _text(name)) for name in sorted(rows.names)],
        )
        if rows.calls:
            await conn.executemany(
                f"INSERT INTO {s}.calls (project, call_id, room_id, source, first_seen_ns,"
                " last_seen_ns, start_ns, end_ns, service, tags)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10::jsonb)"
                " ON CONFLICT (project, call_id) DO UPDATE SET"
                " last_seen_ns = greatest(calls.last_seen_ns, excluded.last_seen_ns),"
                " start_ns = least(coalesce(calls.start_ns, excluded.start_ns), excluded.start_ns),"
                " end_ns = greatest(coalesce(calls.end_ns, excluded.end_ns), excluded.end_ns),"
                " service = coalesce(calls.service, excluded.service),"
                " tags = CASE WHEN excluded.tags IS NULL THEN calls.tags"
                " ELSE coalesce(calls.tags, '{}'::jsonb) || excluded.tags END",
                [
                    (
                        project,
                        c[0],
                        _text(c[1]),
                        _text(c[2]),
                        *c[3:7],
                        _maybe_text(c[7]),
                        _json(c[8], sort_keys=True) if c[8] else None,
                    )
                    for c in rows.calls.values()
                ],
            )
        self._known_resources.update(r[0] for r in new_resources)
        self._known_scopes.update(r[0] for r in new_scopes)
        if len(self._known_resources) > 100_000:
            self._known_resources.clear()

    async def expire(self, older_than_ns: int) -> int:
        """Delete spans older than ``older_than_ns`` and the traces and calls they leave
        (and older log records, metric points and recordings); the spans deleted."""
        assert self._pool is not None
        await self._signal_store.expire(older_than_ns)
        s = self.schema
        async with self._pool.acquire() as conn, conn.transaction():
            # Whole traces go, spans first (found by the primary key's prefix).
            status = await conn.execute(
                f"DELETE FROM {s}.spans sp USING {s}.traces t WHERE t.project = sp.project"
                " AND t.trace_id = sp.trace_id AND t.end_ns < $1",
                older_than_ns,
            )
            await conn.execute(
                f"DELETE FROM {s}.trace_attrs a USING {s}.traces t WHERE t.project = a.project"
                " AND t.trace_id = a.trace_id AND t.end_ns < $1",
                older_than_ns,
            )
            await conn.execute(f"DELETE FROM {s}.traces WHERE end_ns < $1", older_than_ns)
            await conn.execute(
                f"DELETE FROM {s}.calls WHERE coalesce(end_ns, last_seen_ns) < $1", older_than_ns
            )
        return int(status.rsplit(" ", 1)[-1])

    async def shutdown(self) -> None:
        if self._query_store is not None:
            await self._query_store.close()
            self._query_store = None
        if self._retention_task is not None:
            self._retention_task.cancel()
            await asyncio.gather(self._retention_task, return_exceptions=True)
            self._retention_task = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


def _text(value: str) -> str:
    """``value`` as PostgreSQL text can hold it: NUL (which it refuses) as U+FFFD."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _json(value: Any, **options: Any) -> str:
    """JSON that PostgreSQL's ``jsonb`` accepts: no NaN or Infinity tokens (they become
    strings, as the query API shows them anyway), bytes as hex, no NUL characters."""
    return json.dumps(_storable(jsonable(value)), default=str, **options)


def _storable(value: Any) -> Any:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, list):
        return [_storable(v) for v in value]
    if isinstance(value, dict):
        return {_text(k): _storable(v) for k, v in value.items()}
    return value


class _Prepared:
    """A batch's rows, plus the resources and scopes they point at (by digest)."""

    def __init__(self, batch: SpanBatch, now: int):
        self.resources: dict[bytes, tuple[bytes, str | None, str, bytes]] = {}
        self.scopes: dict[bytes, tuple[bytes, str, str, bytes]] = {}
        self.rows = build_rows(batch, now, self._resource, self._scope)

    def _resource(self, service: str | None, payload: bytes) -> bytes:
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        if digest not in self.resources:
            self.resources[digest] = (
                digest,
                _text(service) if service else None,
                _json(resource_attributes(payload)),
                payload,
            )
        return digest

    def _scope(self, payload: bytes) -> bytes:
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        if digest not in self.scopes:
            scope = InstrumentationScope.FromString(payload)
            self.scopes[digest] = (digest, _text(scope.name), _text(scope.version), payload)
        return digest


def _maybe_text(value: str | None) -> str | None:
    return None if value is None else _text(value)
