"""Logs, metric points and recordings in PostgreSQL, next to the ``postgres`` exporter's
spans (its schema, tables of their own created on start).

The rows and the answers are ``collector.signals_storage``'s, so both databases store
and return the same; writes are idempotent the same way (``ON CONFLICT DO NOTHING`` on
a record's key, a recording replaced by its (project, room, job)). JSON columns are
text: ``jsonb`` refuses ``\\u0000`` escapes that OTLP strings may carry.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg

from collector.session_facts import SESSION_BODIES_SQL
from collector.signals import LogBatch, MetricBatch
from collector.signals_storage import (
    LOG_COLUMNS,
    LOG_SELECT,
    METRIC_COLUMNS,
    METRIC_SELECT,
    RECORDING_COLUMNS,
    RECORDING_SELECT,
    Recording,
    log_dict,
    log_rows,
    metric_dict,
    metric_rows,
    recording_dict,
    recording_row,
    remove_files,
)

__all__ = ["PostgresSignalStore", "signals_ddl"]


def signals_ddl(schema: str) -> str:
    s = schema
    return f"""
CREATE TABLE IF NOT EXISTS {s}.log_records (
    id BIGSERIAL PRIMARY KEY,
    record_key BYTEA NOT NULL UNIQUE,
    project TEXT NOT NULL,
    call_id TEXT,
    room_id TEXT,
    job_id TEXT,
    time_ns BIGINT NOT NULL,
    observed_ns BIGINT NOT NULL,
    severity_number INTEGER NOT NULL,
    severity_text TEXT NOT NULL,
    body TEXT,
    attributes TEXT NOT NULL,
    trace_id TEXT,
    span_id TEXT,
    scope TEXT NOT NULL,
    scope_attributes TEXT NOT NULL,
    resource TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS log_records_by_call ON {s}.log_records (project, call_id, time_ns);
CREATE INDEX IF NOT EXISTS log_records_session ON {s}.log_records (project, call_id)
    WHERE {SESSION_BODIES_SQL};
CREATE TABLE IF NOT EXISTS {s}.metric_points (
    id BIGSERIAL PRIMARY KEY,
    point_key BYTEA NOT NULL UNIQUE,
    project TEXT NOT NULL,
    call_id TEXT,
    room_id TEXT,
    job_id TEXT,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    unit TEXT NOT NULL,
    description TEXT NOT NULL,
    temporality INTEGER,
    monotonic INTEGER,
    attributes TEXT NOT NULL,
    start_ns BIGINT NOT NULL,
    time_ns BIGINT NOT NULL,
    value DOUBLE PRECISION,
    count BIGINT,
    sum DOUBLE PRECISION,
    min DOUBLE PRECISION,
    max DOUBLE PRECISION,
    bucket_counts TEXT,
    explicit_bounds TEXT,
    scope TEXT NOT NULL,
    resource TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS metric_points_by_call ON {s}.metric_points (project, call_id, name);
CREATE INDEX IF NOT EXISTS metric_points_by_name ON {s}.metric_points (project, name, time_ns);
CREATE TABLE IF NOT EXISTS {s}.recordings (
    project TEXT NOT NULL,
    room_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    call_id TEXT NOT NULL,
    received_ns BIGINT NOT NULL,
    start_ns BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    header TEXT NOT NULL,
    session_summary TEXT,
    chat_history TEXT,
    audio_path TEXT,
    audio_size BIGINT,
    audio_sha256 TEXT,
    PRIMARY KEY (project, room_id, job_id)
);
CREATE INDEX IF NOT EXISTS recordings_by_call ON {s}.recordings (project, call_id);
"""


def _placeholders(columns: str) -> str:
    return ", ".join(f"${i + 1}" for i in range(len(columns.split(","))))


def _pg_text(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``row`` with NUL characters in its strings replaced (PostgreSQL text refuses them)."""
    return tuple(
        value.replace("\x00", "\ufffd") if isinstance(value, str) and "\x00" in value else value
        for value in row
    )


class PostgresSignalStore:
    """The ``SQLiteSignalStore`` interface on an asyncpg pool (the exporter's)."""

    def __init__(self, pool_of: Any, schema: str):
        self._pool_of = pool_of
        """A callable answering the exporter's pool (None until it started)."""
        self.schema = schema

    def _pool(self) -> asyncpg.Pool:
        pool = self._pool_of()
        if pool is None:
            raise asyncpg.InterfaceError("the postgres exporter is not started")
        return pool

    async def open(self) -> None:
        async with self._pool().acquire() as conn:
            # The postgres exporter's lock: DDL on one schema by two instances, or by the
            # span tables' and these tables' creators, runs one at a time (two locks let
            # two instances' DDL deadlock on the catalog).
            await conn.execute("SELECT pg_advisory_lock(hashtext('calltrace-schema'))")
            try:
                await conn.execute(signals_ddl(self.schema))
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtext('calltrace-schema'))")

    async def write_logs(self, batch: LogBatch) -> int:
        rows = log_rows(batch.project, batch.resource_logs)
        return await self._insert("log_records", LOG_COLUMNS, "record_key", rows)

    async def write_metrics(self, batch: MetricBatch) -> int:
        rows = metric_rows(batch.project, batch.resource_metrics)
        return await self._insert("metric_points", METRIC_COLUMNS, "point_key", rows)

    async def _insert(self, table: str, columns: str, key: str, rows: list[tuple[Any, ...]]) -> int:
        if not rows:
            return 0
        async with self._pool().acquire() as conn, conn.transaction():
            await conn.executemany(
                f"INSERT INTO {self.schema}.{table} ({columns}) VALUES ({_placeholders(columns)})"
                f" ON CONFLICT ({key}) DO NOTHING",
                [_pg_text(row) for row in rows],
            )
        return len(rows)

    async def store_recording(self, recording: Recording, audio_path: Path | None) -> None:
        columns = RECORDING_COLUMNS
        updates = ", ".join(
            f"{c.strip()} = excluded.{c.strip()}"
            for c in columns.split(",")
            if c.strip() not in ("project", "room_id", "job_id")
        )
        async with self._pool().acquire() as conn:
            await conn.execute(
                f"INSERT INTO {self.schema}.recordings ({columns})"
                f" VALUES ({_placeholders(columns)})"
                f" ON CONFLICT (project, room_id, job_id) DO UPDATE SET {updates}",
                *_pg_text(recording_row(recording, audio_path)),
            )

    async def call_logs(self, project: str, call_id: str, limit: int = 1000) -> list[dict]:
        async with self._pool().acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {LOG_SELECT} FROM {self.schema}.log_records"
                " WHERE project = $1 AND call_id = $2 ORDER BY time_ns, id LIMIT $3",
                project,
                call_id,
                limit,
            )
        return [log_dict(row) for row in rows]

    async def call_metrics(self, project: str, call_id: str, limit: int = 10000) -> list[dict]:
        async with self._pool().acquire() as conn:
            rows = await conn.fetch(
                f"SELECT {METRIC_SELECT} FROM {self.schema}.metric_points"
                " WHERE project = $1 AND call_id = $2 ORDER BY name, time_ns, id LIMIT $3",
                project,
                call_id,
                limit,
            )
        return [metric_dict(row) for row in rows]

    async def call_recording(self, project: str, call_id: str) -> dict[str, Any] | None:
        async with self._pool().acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {RECORDING_SELECT} FROM {self.schema}.recordings"
                " WHERE project = $1 AND call_id = $2 ORDER BY received_ns DESC LIMIT 1",
                project,
                call_id,
            )
        return None if row is None else recording_dict(row)

    async def expire(self, older_than_ns: int) -> int:
        """As ``SQLiteSignalStore.expire``."""
        s = self.schema
        async with self._pool().acquire() as conn, conn.transaction():
            audio = [
                row[0]
                for row in await conn.fetch(
                    f"DELETE FROM {s}.recordings WHERE received_ns < $1 RETURNING audio_path",
                    older_than_ns,
                )
                if row[0] is not None
            ]
            deleted = len(audio)
            for table in ("log_records", "metric_points"):
                status = await conn.execute(
                    f"DELETE FROM {s}.{table} WHERE time_ns < $1", older_than_ns
                )
                deleted += int(status.rsplit(" ", 1)[-1])
        await asyncio.to_thread(remove_files, audio)
        return deleted

    async def close(self) -> None:
        """Nothing of its own to close: the pool is the exporter's."""
