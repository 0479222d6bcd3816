"""Call records: which voice call a trace belongs to, shared by every collector instance.

A call id is derived from (project, correlation key value), so every instance computes
the same id for the same LiveKit room without coordination; the record (room id, source,
first and last seen, span count, skipped) lives in a call store: the embedded SQLite
file by default, or Redis when several instances share calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["CALLS_DDL", "CallActivity", "CallRecord", "CallStore", "SQLiteCallStore", "call_id_for"]

CALLS_DDL = """
CREATE TABLE IF NOT EXISTS calls (
  project TEXT NOT NULL, call_id TEXT NOT NULL, room_id TEXT NOT NULL, source TEXT NOT NULL,
  first_seen_ns INTEGER NOT NULL, last_seen_ns INTEGER NOT NULL,
  span_count INTEGER NOT NULL DEFAULT 0,
  skipped INTEGER NOT NULL DEFAULT 0, room_name TEXT, metadata TEXT,
  -- kept by the storage exporter: the extent of the call's spans, its service, tags
  -- (resource attributes roark.project.tag.KEY, as JSON) and a cached turn summary
  start_ns INTEGER, end_ns INTEGER, service TEXT, tags TEXT,
  summary TEXT, summary_spans INTEGER,
  PRIMARY KEY (project, call_id));
CREATE INDEX IF NOT EXISTS calls_by_start ON calls (project, start_ns DESC, call_id);
CREATE INDEX IF NOT EXISTS calls_by_room ON calls (project, room_id);
"""


def call_id_for(project: str | None, key_value: str) -> str:
    """The deterministic call id of a correlation key within a project."""
    digest = hashlib.sha256(f"{project or ''}\x00{key_value}".encode()).hexdigest()
    return f"call_{digest[:24]}"


@dataclass
class CallRecord:
    project: str
    call_id: str
    room_id: str
    source: str
    first_seen_ns: int
    last_seen_ns: int
    span_count: int = 0
    skipped: bool = False
    room_name: str | None = None
    metadata: str | None = None


@dataclass
class CallActivity:
    """Spans seen for a call since the last flush."""

    project: str
    call_id: str
    last_seen_ns: int
    spans: int


class CallStore(Protocol):
    async def start(self) -> None: ...

    async def create(self, record: CallRecord) -> CallRecord:
        """Create the record unless it exists (first writer wins); return the stored one."""
        ...

    async def record_activity(self, activity: list[CallActivity]) -> None: ...

    # Optional: ``async create_many(records: list[CallRecord]) -> None`` creates several
    # records at once (first writer wins for each); ``correlate`` uses it when present and
    # otherwise calls ``create`` for each record concurrently.

    async def get(self, project: str, call_id: str) -> CallRecord | None: ...

    async def close(self) -> None: ...


class SQLiteCallStore:
    """Call records in the ``calls`` table of an SQLite file (the embedded default)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        db.execute("PRAGMA busy_timeout=10000")
        db.executescript(CALLS_DDL)
        self._db = db

    def _insert(self, records: list[CallRecord]) -> None:
        assert self._db is not None
        rows = [
            (
                r.project,
                r.call_id,
                r.room_id,
                r.source,
                r.first_seen_ns,
                r.last_seen_ns,
                r.span_count,
                int(r.skipped),
                r.room_name,
                r.metadata,
            )
            for r in records
        ]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO calls (project, call_id, room_id, source, first_seen_ns,"
                    " last_seen_ns, span_count, skipped, room_name, metadata)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (project, call_id) DO NOTHING",
                    rows,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _create(self, r: CallRecord) -> CallRecord:
        self._insert([r])
        stored = self._get(r.project, r.call_id)
        assert stored is not None
        return stored

    async def create(self, record: CallRecord) -> CallRecord:
        return await asyncio.to_thread(self._create, record)

    async def create_many(self, records: list[CallRecord]) -> None:
        """Create every record that does not exist yet, in one transaction."""
        if records:
            await asyncio.to_thread(self._insert, records)

    def _record_activity(self, activity: list[CallActivity]) -> None:
        assert self._db is not None
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE calls SET last_seen_ns = max(last_seen_ns, ?),"
                " span_count = span_count + ? WHERE project = ? AND call_id = ?",
                [(a.last_seen_ns, a.spans, a.project, a.call_id) for a in activity],
            )
            self._db.execute("COMMIT")

    async def record_activity(self, activity: list[CallActivity]) -> None:
        if activity:
            await asyncio.to_thread(self._record_activity, activity)

    def _get(self, project: str, call_id: str) -> CallRecord | None:
        assert self._db is not None
        with self._lock:
            row = self._db.execute(
                "SELECT project, call_id, room_id, source, first_seen_ns, last_seen_ns,"
                " span_count, skipped, room_name, metadata FROM calls"
                " WHERE project = ? AND call_id = ?",
                (project, call_id),
            ).fetchone()
        if row is None:
            return None
        project_, call_id_, room_id, source, first_ns, last_ns, spans, skipped, name, meta = row
        return CallRecord(
            project_, call_id_, room_id, source, first_ns, last_ns, spans, bool(skipped), name, meta
        )

    async def get(self, project: str, call_id: str) -> CallRecord | None:
        return await asyncio.to_thread(self._get, project, call_id)

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
