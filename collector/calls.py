"""Call records: which voice call a trace belongs to, shared by every collector instance.

A call id is derived from (project, correlation key value), so every instance computes
the same id for the same LiveKit room without coordination; the record (room id, source,
first and last seen, span count, skipped) lives in a call store: the embedded SQLite
file by default, or Redis when several instances share calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from collector.redisconn import RedisSettings, redis_client
from collector.storage import SQLiteWriter, open_sqlite, write_lock

__all__ = [
    "CALLS_DDL",
    "CallActivity",
    "CallRecord",
    "CallStore",
    "MirroredCallStore",
    "RedisCallStore",
    "RoomEvent",
    "SQLiteCallStore",
    "call_id_for",
    "ensure_calls_table",
    "get_records",
    "make_call_store",
]

log = logging.getLogger(__name__)

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
  -- from LiveKit webhooks (room_started / room_finished)
  room_started_ns INTEGER, room_finished_ns INTEGER,
  PRIMARY KEY (project, call_id));
CREATE INDEX IF NOT EXISTS calls_by_start ON calls (project, start_ns DESC, call_id);
CREATE INDEX IF NOT EXISTS calls_by_room ON calls (project, room_id);
"""

_LATER_COLUMNS = {
    "start_ns": "INTEGER",
    "end_ns": "INTEGER",
    "service": "TEXT",
    "tags": "TEXT",
    "summary": "TEXT",
    "summary_spans": "INTEGER",
    "room_started_ns": "INTEGER",
    "room_finished_ns": "INTEGER",
}
"""Columns added to ``calls`` after its first release, with their types."""


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


@dataclass
class RoomEvent:
    """What a LiveKit webhook says of a room (``room_started`` / ``room_finished``)."""

    project: str
    call_id: str
    room_id: str
    room_name: str | None
    metadata: str | None
    skipped: bool
    started_ns: int | None = None
    finished_ns: int | None = None


def ensure_calls_table(db: sqlite3.Connection) -> None:
    """Create the ``calls`` table, or add the columns a file made by an older version
    lacks (``CREATE TABLE IF NOT EXISTS`` leaves an existing table as it was)."""
    present = {row[1] for row in db.execute("PRAGMA table_info(calls)")}
    if present:  # columns first: the indexes below may name them
        for column, sql_type in _LATER_COLUMNS.items():
            if column not in present:
                db.execute(f"ALTER TABLE calls ADD COLUMN {column} {sql_type}")
    db.executescript(CALLS_DDL)


class CallStore(Protocol):
    async def start(self) -> None: ...

    async def create(self, record: CallRecord) -> CallRecord:
        """Create the record unless it exists (first writer wins); return the stored one."""
        ...

    async def record_activity(self, activity: list[CallActivity]) -> list[tuple[str, str]] | None:
        """Add span counts and move last-seen times; return the (project, call_id) of
        records that no longer exist (expired, or lost with a store), which the caller
        creates again, or None when the store cannot tell."""
        ...

    # Optional: ``async create_many(records: list[CallRecord]) -> None`` creates several
    # records at once (first writer wins for each); ``correlate`` uses it when present and
    # otherwise calls ``create`` for each record concurrently.

    async def get(self, project: str, call_id: str) -> CallRecord | None: ...

    # Optional: ``async get_many(project, call_ids) -> dict[str, CallRecord]`` reads several
    # records at once (those that exist, by call id); ``correlate`` uses it when present
    # and otherwise calls ``get`` for each call concurrently.

    async def record_room(self, event: RoomEvent) -> None:
        """Record a room event on its call (created if unseen); skipped only ever turns on."""
        ...

    async def close(self) -> None: ...


_T = TypeVar("_T")


class SQLiteCallStore:
    """Call records in the ``calls`` table of an SQLite file (the embedded default)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._write_lock = write_lock(self.path)  # shared with the sqlite exporter's writer
        # Reads on a connection of their own: in WAL mode a read never waits for a write,
        # and correlate reads a new call's record (is it skipped?) before answering.
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        # Writes on a thread of their own, in order, the only one that uses ``_db``:
        # waiting for the span writer's transaction, they would otherwise hold the
        # loop's default threads (and the reads queued behind them).
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="calltrace-calls")

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = open_sqlite(self.path)
        ensure_calls_table(db)
        self._db = db
        self._writes = SQLiteWriter(db)  # the call records' transactions, in C if built
        self._reader = open_sqlite(self.path)

    def _write(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        return asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

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
        self._transaction([(_INSERT_CALLS, rows)])

    def _transaction(self, steps: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
        """``steps`` in one transaction, holding the file's write lock. Their rows run in
        C with the GIL let go of once (``SQLiteWriter``): executemany let go of it and
        waited for it back around every row, holding the lock the span writer waits on
        meanwhile."""
        assert self._db is not None
        with self._write_lock:
            self._writes.transaction(steps)

    def _create(self, r: CallRecord) -> CallRecord:
        self._insert([r])
        stored = self._get(r.project, r.call_id)
        assert stored is not None
        return stored

    async def create(self, record: CallRecord) -> CallRecord:
        return await self._write(self._create, record)

    async def create_many(self, records: list[CallRecord]) -> None:
        """Create every record that does not exist yet, in one transaction."""
        if records:
            await self._write(self._insert, records)

    def _record_activity(self, activity: list[CallActivity]) -> None:
        assert self._db is not None
        rows = [(a.last_seen_ns, a.spans, a.project, a.call_id) for a in activity]
        self._transaction([(_RECORD_ACTIVITY, rows)])

    async def record_activity(self, activity: list[CallActivity]) -> list[tuple[str, str]] | None:
        if activity:
            await self._write(self._record_activity, activity)
        return None

    def _get(self, project: str, call_id: str) -> CallRecord | None:
        return self._get_many(project, [call_id]).get(call_id)

    def _get_many(self, project: str, call_ids: list[str]) -> dict[str, CallRecord]:
        assert self._reader is not None
        found: dict[str, CallRecord] = {}
        with self._read_lock:
            for start in range(0, len(call_ids), _GET_CHUNK):
                chunk = call_ids[start : start + _GET_CHUNK]
                rows = self._reader.execute(
                    "SELECT project, call_id, room_id, source, first_seen_ns, last_seen_ns,"
                    " span_count, skipped, room_name, metadata FROM calls"
                    f" WHERE project = ? AND call_id IN ({','.join('?' * len(chunk))})",
                    (project, *chunk),
                ).fetchall()
                for p, c, room_id, source, first_ns, last_ns, spans, skipped, name, meta in rows:
                    found[c] = CallRecord(
                        p, c, room_id, source, first_ns, last_ns, spans, bool(skipped), name, meta
                    )
        return found

    async def get(self, project: str, call_id: str) -> CallRecord | None:
        return await asyncio.to_thread(self._get, project, call_id)

    async def get_many(self, project: str, call_ids: list[str]) -> dict[str, CallRecord]:
        """The records of ``call_ids`` that exist, by call id: one query."""
        if not call_ids:
            return {}
        return await asyncio.to_thread(self._get_many, project, call_ids)

    def _record_room(self, e: RoomEvent) -> None:
        assert self._db is not None
        now = time.time_ns()
        with self._write_lock:
            self._db.execute(
                "INSERT INTO calls (project, call_id, room_id, source, first_seen_ns,"
                " last_seen_ns, skipped, room_name, metadata, room_started_ns, room_finished_ns)"
                " VALUES (?,?,?,'livekit.room.id',?,?,?,?,?,?,?)"
                " ON CONFLICT (project, call_id) DO UPDATE SET"
                " skipped = max(calls.skipped, excluded.skipped),"
                " room_name = coalesce(excluded.room_name, calls.room_name),"
                " metadata = coalesce(excluded.metadata, calls.metadata),"
                " room_started_ns = coalesce(excluded.room_started_ns, calls.room_started_ns),"
                " room_finished_ns = coalesce(excluded.room_finished_ns, calls.room_finished_ns)",
                (
                    e.project,
                    e.call_id,
                    e.room_id,
                    now,
                    now,
                    int(e.skipped),
                    e.room_name,
                    e.metadata,
                    e.started_ns,
                    e.finished_ns,
                ),
            )

    async def record_room(self, event: RoomEvent) -> None:
        await self._write(self._record_room, event)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._writer.shutdown)
        if self._db is not None:
            self._writes.close()
        for db in (self._db, self._reader):
            if db is not None:
                db.close()
        self._db = self._reader = None


_INSERT_CALLS = (
    "INSERT INTO calls (project, call_id, room_id, source, first_seen_ns,"
    " last_seen_ns, span_count, skipped, room_name, metadata)"
    " VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (project, call_id) DO UPDATE SET"
    # The storage exporter may have written the row first, from a batch with its own
    # clock: the record (shared through Redis) says when the call was first seen, and
    # what a webhook learnt about it.
    " first_seen_ns = min(calls.first_seen_ns, excluded.first_seen_ns),"
    " span_count = max(calls.span_count, excluded.span_count),"
    " skipped = max(calls.skipped, excluded.skipped),"
    " room_name = coalesce(calls.room_name, excluded.room_name),"
    " metadata = coalesce(calls.metadata, excluded.metadata)"
)
_RECORD_ACTIVITY = (
    "UPDATE calls SET last_seen_ns = max(last_seen_ns, ?), span_count = span_count + ?"
    " WHERE project = ? AND call_id = ?"
)

_GET_CHUNK = 500
"""Call ids a query asks for at most (SQLite caps a statement's parameters)."""


# -- Redis: call records shared by every collector instance --------------------------

# KEYS[1] the record; ARGV[1] TTL in ms (0: none); ARGV[2..] field, value pairs.
# The first writer's record wins; a later writer can only make first_seen_ns earlier
# (instances may see a call's first spans in a different order than they arrive).
_CREATE_SCRIPT = """
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then
  redis.call('HSET', key, unpack(ARGV, 2))
else
  for i = 2, #ARGV, 2 do
    if ARGV[i] == 'first_seen_ns' then
      local seen = redis.call('HGET', key, 'first_seen_ns') or ''
      local mine = ARGV[i + 1]
      if #mine < #seen or (#mine == #seen and mine < seen) then
        redis.call('HSET', key, 'first_seen_ns', mine)
      end
    end
  end
end
if tonumber(ARGV[1]) > 0 then redis.call('PEXPIRE', key, ARGV[1]) end
return redis.call('HGETALL', key)
"""

# KEYS[1] the record; ARGV[1] TTL in ms (0: none), ARGV[2] spans, ARGV[3] last seen (ns).
# Nanosecond times exceed a Lua number's precision, so they are compared as strings.
_ACTIVITY_SCRIPT = """
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return 0 end
redis.call('HINCRBY', key, 'span_count', ARGV[2])
local seen = redis.call('HGET', key, 'last_seen_ns') or ''
local mine = ARGV[3]
if #mine > #seen or (#mine == #seen and mine > seen) then
  redis.call('HSET', key, 'last_seen_ns', mine)
end
if tonumber(ARGV[1]) > 0 then redis.call('PEXPIRE', key, ARGV[1]) end
return 1
"""


# KEYS[1] the record; ARGV[1] TTL in ms, ARGV[2] now (ns), ARGV[3] room id, ARGV[4]
# skipped (1/0), ARGV[5..] field, value pairs to set. Creates the record if unseen;
# skipped only ever turns on.
_ROOM_SCRIPT = """
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then
  redis.call('HSET', key, 'room_id', ARGV[3], 'source', 'livekit.room.id',
             'first_seen_ns', ARGV[2], 'last_seen_ns', ARGV[2], 'span_count', 0, 'skipped', 0)
end
if ARGV[4] == '1' then redis.call('HSET', key, 'skipped', 1) end
for i = 5, #ARGV, 2 do redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
if tonumber(ARGV[1]) > 0 then redis.call('PEXPIRE', key, ARGV[1]) end
return 1
"""


class RedisCallStore:
    """Call records as Redis hashes ``{prefix}{project}:{call_id}``, shared by instances.

    ``create`` is atomic and first-writer-wins (a Lua script), ``record_activity`` adds
    span counts and moves ``last_seen_ns`` forward in one pipelined round trip. Every
    write refreshes the record's ``ttl`` (seconds; 0 keeps records forever), so a call
    expires ``ttl`` after its last span.
    """

    def __init__(
        self,
        settings: RedisSettings,
        ttl: float = 86400.0,
        prefix: str = "calltrace:call:",
    ):
        self.settings = settings
        self.ttl_ms = int(ttl * 1000)
        self.prefix = prefix
        self._client: Any = None
        self._create: Any = None
        self._activity: Any = None
        self._room: Any = None

    def key(self, project: str, call_id: str) -> str:
        return f"{self.prefix}{project}:{call_id}"

    async def start(self) -> None:
        self._client = redis_client(self.settings)
        self._create = self._client.register_script(_CREATE_SCRIPT)
        self._activity = self._client.register_script(_ACTIVITY_SCRIPT)
        self._room = self._client.register_script(_ROOM_SCRIPT)

    async def create(self, record: CallRecord) -> CallRecord:
        fields: list[str | int] = [
            "room_id",
            record.room_id,
            "source",
            record.source,
            "first_seen_ns",
            record.first_seen_ns,
            "last_seen_ns",
            record.last_seen_ns,
            "span_count",
            record.span_count,
            "skipped",
            int(record.skipped),
        ]
        if record.room_name is not None:
            fields += ["room_name", record.room_name]
        if record.metadata is not None:
            fields += ["metadata", record.metadata]
        reply = await self._create(
            keys=[self.key(record.project, record.call_id)], args=[self.ttl_ms, *fields]
        )
        return _record_from_hash(record.project, record.call_id, _pairs(reply))

    async def record_activity(self, activity: list[CallActivity]) -> list[tuple[str, str]] | None:
        if not activity:
            return []
        pipe = self._client.pipeline(transaction=False)
        for item in activity:
            await self._activity(
                keys=[self.key(item.project, item.call_id)],
                args=[self.ttl_ms, item.spans, item.last_seen_ns],
                client=pipe,
            )
        found = await pipe.execute()
        return [(a.project, a.call_id) for a, ok in zip(activity, found, strict=True) if not ok]

    async def get(self, project: str, call_id: str) -> CallRecord | None:
        return (await self.get_many(project, [call_id])).get(call_id)

    async def get_many(self, project: str, call_ids: list[str]) -> dict[str, CallRecord]:
        """The records of ``call_ids`` that exist, by call id: one pipelined round trip."""
        if not call_ids:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for call_id in call_ids:
            pipe.hgetall(self.key(project, call_id))
        replies = await pipe.execute()
        return {
            call_id: _record_from_hash(
                project, call_id, {_text(k): _text(v) for k, v in reply.items()}
            )
            for call_id, reply in zip(call_ids, replies, strict=True)
            if reply
        }

    async def record_room(self, event: RoomEvent) -> None:
        fields: list[str | int] = []
        for name, value in (
            ("room_name", event.room_name),
            ("metadata", event.metadata),
            ("room_started_ns", event.started_ns),
            ("room_finished_ns", event.finished_ns),
        ):
            if value is not None:
                fields += [name, value]
        await self._room(
            keys=[self.key(event.project, event.call_id)],
            args=[self.ttl_ms, time.time_ns(), event.room_id, int(event.skipped), *fields],
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


class MirroredCallStore:
    """Records kept in a shared ``primary`` (Redis) and copied into a local ``mirror``
    (the SQLite file the query API reads): the mirror stores the shared record as the
    primary returned it, so every instance's copy agrees on first seen and source."""

    def __init__(self, primary: CallStore, mirror: CallStore):
        self.primary = primary
        self.mirror = mirror

    async def start(self) -> None:
        await self.primary.start()
        await self.mirror.start()

    async def create(self, record: CallRecord) -> CallRecord:
        shared = await self.primary.create(record)
        await self.mirror.create(shared)
        return shared

    async def record_activity(self, activity: list[CallActivity]) -> list[tuple[str, str]] | None:
        missing = await self.primary.record_activity(activity)
        gone = set(missing or ())  # counted once the primary has the record again
        try:
            await self.mirror.record_activity(
                [a for a in activity if (a.project, a.call_id) not in gone]
            )
        except Exception:  # a retry would count the shared record twice
            log.exception("could not copy call activity to the local call store")
        return missing

    async def get(self, project: str, call_id: str) -> CallRecord | None:
        return await self.primary.get(project, call_id)

    async def get_many(self, project: str, call_ids: list[str]) -> dict[str, CallRecord]:
        return await get_records(self.primary, project, call_ids)

    async def record_room(self, event: RoomEvent) -> None:
        await self.primary.record_room(event)
        await self.mirror.record_room(event)

    async def close(self) -> None:
        try:
            await self.primary.close()
        finally:
            await self.mirror.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pairs(reply: list[bytes | str]) -> dict[str, str]:
    return {_text(reply[i]): _text(reply[i + 1]) for i in range(0, len(reply), 2)}


def _record_from_hash(project: str, call_id: str, fields: dict[str, str]) -> CallRecord:
    return CallRecord(
        project=project,
        call_id=call_id,
        room_id=fields.get("room_id", ""),
        source=fields.get("source", ""),
        first_seen_ns=int(fields.get("first_seen_ns", 0)),
        last_seen_ns=int(fields.get("last_seen_ns", 0)),
        span_count=int(fields.get("span_count", 0)),
        skipped=fields.get("skipped", "0") not in ("0", ""),
        room_name=fields.get("room_name"),
        metadata=fields.get("metadata"),
    )


async def get_records(store: CallStore, project: str, call_ids: list[str]) -> dict[str, CallRecord]:
    """The records of ``call_ids`` that exist in ``store``, by call id: with its
    ``get_many`` where it has one, else a ``get`` for each, concurrently."""
    get_many = getattr(store, "get_many", None)
    if get_many is not None:
        found: dict[str, CallRecord] = await get_many(project, call_ids)
        return found
    records = await asyncio.gather(*(store.get(project, call_id) for call_id in call_ids))
    return {call_id: r for call_id, r in zip(call_ids, records, strict=True) if r is not None}


def make_call_store(
    path: str | Path | None,
    redis: RedisSettings | None = None,
    ttl: float = 86400.0,
    key_prefix: str = "calltrace:call:",
) -> CallStore | None:
    """The call store a component's config asks for: Redis (shared by every instance)
    with a local SQLite copy, Redis alone, the SQLite file alone, or none."""
    local = SQLiteCallStore(path) if path is not None else None
    if redis is None:
        return local
    shared = RedisCallStore(redis, ttl, key_prefix)
    return shared if local is None else MirroredCallStore(shared, local)
