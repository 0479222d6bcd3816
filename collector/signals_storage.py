"""Storing logs, metric points and session recordings, and reading them back by call.

Rows are built here from the signals' protobuf messages, the same for every database;
``SQLiteSignalStore`` writes them into a storage exporter's SQLite file (its own tables,
created on open next to the spans': an older file gains them, nothing else changes).

Correlation keys on each record's own attributes, not on its resource: livekit-agents
stamps ``room_id`` (the LiveKit room SID) and ``job_id`` on every log record and metric
point, while its resources carry none (logs, metrics) or an earlier job's (one process
runs many jobs). A record with a ``room_id`` belongs to the call
``collector.calls.call_id_for(project, room_id)``, the id the ``correlate`` processor
gives the spans of that room, so a room's traces, logs, metrics and recording share a
call. A record without one is stored with no call (still queryable by trace).

Writes are idempotent: a record's row is keyed by a digest of what it is (project,
resource, scope, record), so a request delivered twice (a client retry, a fan-out
re-delivery) is stored once; a recording is keyed by (project, room, job), so a re-posted
upload replaces the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import ResourceLogs
from opentelemetry.proto.metrics.v1.metrics_pb2 import ResourceMetrics

from collector.calls import call_id_for
from collector.session_facts import (
    SESSION_BODIES,
    SESSION_BODIES_SQL,
    facts_of_record,
    facts_of_summary,
)
from collector.signals import LogBatch, MetricBatch, metric_points
from collector.spans import any_value_to_python
from collector.storage import open_sqlite

__all__ = [
    "SQLITE_SCHEMA",
    "Recording",
    "SQLiteSignalStore",
    "log_rows",
    "metric_rows",
]

ROOM_ATTRIBUTE = "room_id"
"""The record attribute naming the LiveKit room SID (livekit-agents stamps it)."""
JOB_ATTRIBUTE = "job_id"

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS log_records (
    id INTEGER PRIMARY KEY,
    record_key BLOB NOT NULL UNIQUE,
    project TEXT NOT NULL,
    call_id TEXT,
    room_id TEXT,
    job_id TEXT,
    time_ns INTEGER NOT NULL,
    observed_ns INTEGER NOT NULL,
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
CREATE INDEX IF NOT EXISTS log_records_by_call ON log_records (project, call_id, time_ns);
CREATE INDEX IF NOT EXISTS log_records_by_trace ON log_records (project, trace_id);
CREATE INDEX IF NOT EXISTS log_records_session ON log_records (project, call_id)
    WHERE SESSION_BODIES;
CREATE TABLE IF NOT EXISTS metric_points (
    id INTEGER PRIMARY KEY,
    point_key BLOB NOT NULL UNIQUE,
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
    start_ns INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    value REAL,
    count INTEGER,
    sum REAL,
    min REAL,
    max REAL,
    bucket_counts TEXT,
    explicit_bounds TEXT,
    scope TEXT NOT NULL,
    resource TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS metric_points_by_call ON metric_points (project, call_id, name);
CREATE INDEX IF NOT EXISTS metric_points_by_name ON metric_points (project, name, time_ns);
CREATE TABLE IF NOT EXISTS recordings (
    project TEXT NOT NULL,
    room_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    call_id TEXT NOT NULL,
    received_ns INTEGER NOT NULL,
    start_ns INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    header TEXT NOT NULL,
    session_summary TEXT,
    chat_history TEXT,
    audio_path TEXT,
    audio_size INTEGER,
    audio_sha256 TEXT,
    PRIMARY KEY (project, room_id, job_id)
);
CREATE INDEX IF NOT EXISTS recordings_by_call ON recordings (project, call_id);
CREATE TABLE IF NOT EXISTS session_facts (
    project TEXT NOT NULL,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    call_id TEXT NOT NULL,
    PRIMARY KEY (project, kind, value, call_id)
) WITHOUT ROWID;
""".replace("SESSION_BODIES", SESSION_BODIES_SQL)
"""The signal tables, created (and new indexes added) when a store opens."""


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=_bytes_hex)


def _bytes_hex(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _attributes(attributes: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value_to_python(kv.value) for kv in attributes}


def _call(project: str | None, attributes: dict[str, Any]) -> tuple[str | None, Any, Any]:
    room = attributes.get(ROOM_ATTRIBUTE)
    job = attributes.get(JOB_ATTRIBUTE)
    room = room if isinstance(room, str) and room else None
    return (call_id_for(project, room) if room else None), room, job


def _key(*parts: bytes) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.digest()


def log_rows(project: str | None, resource_logs: Iterable[ResourceLogs]) -> list[tuple[Any, ...]]:
    """``log_records`` rows (in column order, without ``id``) of every log record."""
    rows = []
    owner = (project or "").encode()
    for resource_logs_message in resource_logs:
        resource = resource_logs_message.resource
        resource_bytes = resource.SerializeToString()
        resource_json = _json(_attributes(resource.attributes))
        for scope_logs in resource_logs_message.scope_logs:
            scope = scope_logs.scope
            scope_bytes = scope.SerializeToString()
            scope_attributes = _attributes(scope.attributes)
            for record in scope_logs.log_records:
                attributes = _attributes(record.attributes)
                call_id, room, job = _call(project, {**scope_attributes, **attributes})
                body = _json(any_value_to_python(record.body)) if record.HasField("body") else None
                rows.append(
                    (
                        _key(owner, resource_bytes, scope_bytes, record.SerializeToString()),
                        project or "",
                        call_id,
                        room,
                        job,
                        record.time_unix_nano or record.observed_time_unix_nano,
                        record.observed_time_unix_nano,
                        record.severity_number,
                        record.severity_text,
                        body,
                        _json(attributes),
                        record.trace_id.hex() or None,
                        record.span_id.hex() or None,
                        scope.name,
                        _json(scope_attributes),
                        resource_json,
                    )
                )
    return rows


def metric_rows(
    project: str | None, resource_metrics: Iterable[ResourceMetrics]
) -> list[tuple[Any, ...]]:
    """``metric_points`` rows (in column order, without ``id``) of every data point:
    a number for gauges and sums, count/sum/min/max/buckets for histograms (an
    exponential histogram's buckets are not kept; a summary keeps count and sum)."""
    rows = []
    owner = (project or "").encode()
    for resource_metrics_message in resource_metrics:
        resource = resource_metrics_message.resource
        resource_bytes = resource.SerializeToString()
        resource_json = _json(_attributes(resource.attributes))
        for scope_metrics in resource_metrics_message.scope_metrics:
            scope_bytes = scope_metrics.scope.SerializeToString()
            for metric in scope_metrics.metrics:
                kind, points = metric_points(metric)
                data = getattr(metric, kind) if kind else None
                temporality = getattr(data, "aggregation_temporality", None)
                monotonic = getattr(data, "is_monotonic", None) if kind == "sum" else None
                identity = metric.name.encode()
                for point in points:
                    attributes = _attributes(point.attributes)
                    call_id, room, job = _call(project, attributes)
                    value = count = total = low = high = counts = bounds = None
                    if kind in ("gauge", "sum"):
                        which = point.WhichOneof("value")
                        value = float(getattr(point, which)) if which else None
                    else:
                        count, total = point.count, point.sum
                        if kind != "summary":
                            low = point.min if point.HasField("min") else None
                            high = point.max if point.HasField("max") else None
                        if kind == "histogram":
                            counts = _json(list(point.bucket_counts))
                            bounds = _json(list(point.explicit_bounds))
                    rows.append(
                        (
                            _key(
                                owner,
                                resource_bytes,
                                scope_bytes,
                                identity,
                                point.SerializeToString(),
                            ),
                            project or "",
                            call_id,
                            room,
                            job,
                            metric.name,
                            kind,
                            metric.unit,
                            metric.description,
                            temporality,
                            None if monotonic is None else int(monotonic),
                            _json(attributes),
                            point.start_time_unix_nano,
                            point.time_unix_nano,
                            value,
                            count,
                            total,
                            low,
                            high,
                            counts,
                            bounds,
                            scope_metrics.scope.name,
                            resource_json,
                        )
                    )
    return rows


LOG_SELECT = (
    "time_ns, observed_ns, severity_number, severity_text, body, attributes, trace_id,"
    " span_id, scope, scope_attributes, resource, room_id, job_id"
)
METRIC_SELECT = (
    "name, kind, unit, description, temporality, monotonic, attributes, start_ns, time_ns,"
    " value, count, sum, min, max, bucket_counts, explicit_bounds, scope, room_id, job_id"
)
RECORDING_SELECT = (
    "room_id, job_id, received_ns, start_ns, duration_ms, header, session_summary,"
    " chat_history, audio_path, audio_size, audio_sha256"
)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def log_dict(row: Any) -> dict[str, Any]:
    """A log record as the query API answers it, from a ``LOG_SELECT`` row."""
    return {
        "time_unix_nano": row[0],
        "observed_time_unix_nano": row[1],
        "severity_number": row[2],
        "severity_text": row[3],
        "body": _loads(row[4]),
        "attributes": json.loads(row[5]),
        "trace_id": row[6],
        "span_id": row[7],
        "scope": row[8],
        "scope_attributes": json.loads(row[9]),
        "resource": json.loads(row[10]),
        "room_id": row[11],
        "job_id": row[12],
    }


def metric_dict(row: Any) -> dict[str, Any]:
    """A metric point as the query API answers it, from a ``METRIC_SELECT`` row."""
    point: dict[str, Any] = {
        "name": row[0],
        "kind": row[1],
        "unit": row[2],
        "description": row[3],
        "aggregation_temporality": row[4],
        "is_monotonic": None if row[5] is None else bool(row[5]),
        "attributes": json.loads(row[6]),
        "start_time_unix_nano": row[7],
        "time_unix_nano": row[8],
        "scope": row[16],
        "room_id": row[17],
        "job_id": row[18],
    }
    if row[1] in ("gauge", "sum"):
        point["value"] = row[9]
    else:
        point.update(count=row[10], sum=row[11], min=row[12], max=row[13])
        if row[14] is not None:
            point["bucket_counts"] = json.loads(row[14])
            point["explicit_bounds"] = json.loads(row[15])
    return point


def recording_dict(row: Any) -> dict[str, Any]:
    """A recording's details, from a ``RECORDING_SELECT`` row."""
    return {
        "room_id": row[0],
        "job_id": row[1],
        "received_ns": row[2],
        "start_time_unix_nano": row[3],
        "duration_ms": row[4],
        "header": json.loads(row[5]),
        "session_summary": _loads(row[6]),
        "chat_history": _loads(row[7]),
        "audio_path": row[8],
        "audio_size": row[9],
        "audio_sha256": row[10],
    }


def recording_row(recording: Recording, audio_path: Path | None) -> tuple[Any, ...]:
    """A ``recordings`` row, in ``RECORDING_COLUMNS`` order."""
    audio = recording.audio
    return (
        recording.project,
        recording.room_id,
        recording.job_id,
        recording.call_id,
        recording.received_ns,
        recording.start_ns,
        recording.duration_ms,
        _json(recording.header),
        None if recording.session_summary is None else _json(recording.session_summary),
        None if recording.chat_history is None else _json(recording.chat_history),
        None if audio_path is None else str(audio_path),
        None if audio is None else len(audio),
        None if audio is None else hashlib.sha256(audio).hexdigest(),
    )


RECORDING_COLUMNS = (
    "project, room_id, job_id, call_id, received_ns, start_ns, duration_ms, header,"
    " session_summary, chat_history, audio_path, audio_size, audio_sha256"
)


@dataclass
class Recording:
    """One session upload (livekit-agents' ``/observability/recordings/v0``), checked
    and ready to store: the header's fields, the chat history and the audio bytes."""

    project: str
    room_id: str
    job_id: str
    start_ns: int
    duration_ms: int
    header: dict[str, Any]
    session_summary: Any
    chat_history: Any
    audio: bytes | None
    received_ns: int

    @property
    def call_id(self) -> str:
        return call_id_for(self.project, self.room_id)


LOG_COLUMNS = (
    "record_key, project, call_id, room_id, job_id, time_ns, observed_ns, severity_number,"
    " severity_text, body, attributes, trace_id, span_id, scope, scope_attributes, resource"
)
METRIC_COLUMNS = (
    "point_key, project, call_id, room_id, job_id, name, kind, unit, description,"
    " temporality, monotonic, attributes, start_ns, time_ns, value, count, sum, min, max,"
    " bucket_counts, explicit_bounds, scope, resource"
)


_EXPIRES = (
    ("log_records", "time_ns"),
    ("metric_points", "time_ns"),
    ("recordings", "received_ns"),
)
"""Each table and the time its retention counts from."""


_SESSION_BODY_TEXTS = {_json(body) for body in SESSION_BODIES}


def _log_facts(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """``session_facts`` rows of ``log_records`` rows (project 1, call 2, body 9,
    attributes 10)."""
    return [
        (row[1], kind, value, row[2])
        for row in rows
        if row[2] is not None and row[9] in _SESSION_BODY_TEXTS
        for kind, value in facts_of_record(row[9], row[10])
    ]


def _insert_facts(db: sqlite3.Connection, facts: list[tuple[Any, ...]]) -> None:
    if facts:
        db.executemany(
            "INSERT OR IGNORE INTO session_facts (project, kind, value, call_id)"
            " VALUES (?, ?, ?, ?)",
            facts,
        )


def _fill_session_facts(db: sqlite3.Connection) -> None:
    """The session facts of a file written before the table existed."""
    with _transaction(db):
        for project, call_id, body, attributes in db.execute(
            "SELECT project, call_id, body, attributes FROM log_records"
            f" WHERE call_id IS NOT NULL AND {SESSION_BODIES_SQL}"
        ).fetchall():
            _insert_facts(
                db, [(project, k, v, call_id) for k, v in facts_of_record(body, attributes)]
            )
        for project, call_id, summary in db.execute(
            "SELECT project, call_id, session_summary FROM recordings"
        ).fetchall():
            _insert_facts(db, [(project, k, v, call_id) for k, v in facts_of_summary(summary)])


def remove_files(paths: Iterable[str]) -> None:
    """Unlink each path; one already gone is no error."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction on an autocommit connection (``open_sqlite``'s)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _placeholders(columns: str) -> str:
    return ", ".join("?" for _ in columns.split(","))


class SQLiteSignalStore:
    """Logs, metric points and recordings in an SQLite file, written and read on a
    thread of its own (the file's span writer is left alone; SQLite's busy timeout
    orders the two writers)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="calltrace-signals")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            db = open_sqlite(self.path)
            had_facts = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'session_facts'"
            ).fetchone()
            db.executescript(SQLITE_SCHEMA)
            if not had_facts:
                _fill_session_facts(db)
            self._db = db
        return self._db

    async def open(self) -> None:
        """Create the tables (an older file gains them)."""
        await self._run(self._connection)

    async def write_logs(self, batch: LogBatch) -> int:
        rows = log_rows(batch.project, batch.resource_logs)
        return int(await self._run(self._insert, "log_records", LOG_COLUMNS, rows))

    async def write_metrics(self, batch: MetricBatch) -> int:
        rows = metric_rows(batch.project, batch.resource_metrics)
        return int(await self._run(self._insert, "metric_points", METRIC_COLUMNS, rows))

    def _insert(self, table: str, columns: str, rows: list[tuple[Any, ...]]) -> int:
        db = self._connection()
        with _transaction(db):
            cursor = db.executemany(
                f"INSERT OR IGNORE INTO {table} ({columns}) VALUES ({_placeholders(columns)})",
                rows,
            )
            count = cursor.rowcount
            if table == "log_records":
                _insert_facts(db, _log_facts(rows))
        return count

    async def store_recording(self, recording: Recording, audio_path: Path | None) -> None:
        """Insert or replace a recording's row; ``audio_path`` is where its audio is."""
        await self._run(self._store_recording, recording, audio_path)

    def _store_recording(self, recording: Recording, audio_path: Path | None) -> None:
        db = self._connection()
        with _transaction(db):
            db.execute(
                f"INSERT OR REPLACE INTO recordings ({RECORDING_COLUMNS})"
                f" VALUES ({_placeholders(RECORDING_COLUMNS)})",
                recording_row(recording, audio_path),
            )
            _insert_facts(
                db,
                [
                    (recording.project, kind, value, recording.call_id)
                    for kind, value in facts_of_summary(recording.session_summary)
                ],
            )

    # -- reading ------------------------------------------------------------------

    async def call_logs(self, project: str, call_id: str, limit: int = 1000) -> list[dict]:
        return list(await self._run(self._call_logs, project, call_id, limit))

    def _call_logs(self, project: str, call_id: str, limit: int) -> list[dict]:
        cursor = self._connection().execute(
            f"SELECT {LOG_SELECT} FROM log_records WHERE project = ? AND call_id = ?"
            " ORDER BY time_ns, id LIMIT ?",
            (project, call_id, limit),
        )
        return [log_dict(row) for row in cursor]

    async def call_metrics(self, project: str, call_id: str, limit: int = 10000) -> list[dict]:
        return list(await self._run(self._call_metrics, project, call_id, limit))

    def _call_metrics(self, project: str, call_id: str, limit: int) -> list[dict]:
        cursor = self._connection().execute(
            f"SELECT {METRIC_SELECT} FROM metric_points WHERE project = ? AND call_id = ?"
            " ORDER BY name, time_ns, id LIMIT ?",
            (project, call_id, limit),
        )
        return [metric_dict(row) for row in cursor]

    async def call_recording(self, project: str, call_id: str) -> dict[str, Any] | None:
        """The call's latest recording (header, summary, chat history, audio file)."""
        result = await self._run(self._call_recording, project, call_id)
        return None if result is None else dict(result)

    def _call_recording(self, project: str, call_id: str) -> dict[str, Any] | None:
        row = (
            self._connection()
            .execute(
                f"SELECT {RECORDING_SELECT} FROM recordings WHERE project = ? AND call_id = ?"
                " ORDER BY received_ns DESC LIMIT 1",
                (project, call_id),
            )
            .fetchone()
        )
        return None if row is None else recording_dict(row)

    async def expire(self, older_than_ns: int) -> int:
        """Delete log records, metric points and recordings (their audio files too)
        older than ``older_than_ns``; the number of rows deleted."""
        deleted, audio = await self._run(self._expire, older_than_ns)
        await asyncio.to_thread(remove_files, audio)
        return int(deleted)

    def _expire(self, older_than_ns: int) -> tuple[int, list[str]]:
        db = self._connection()
        with _transaction(db):
            audio = [
                row[0]
                for row in db.execute(
                    "SELECT audio_path FROM recordings WHERE received_ns < ?"
                    " AND audio_path IS NOT NULL",
                    (older_than_ns,),
                )
            ]
            deleted = 0
            for table, column in _EXPIRES:
                deleted += db.execute(
                    f"DELETE FROM {table} WHERE {column} < ?", (older_than_ns,)
                ).rowcount
        return deleted, audio

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(close)
        self._pool.shutdown(wait=True)
