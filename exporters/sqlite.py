"""``sqlite``: spans, traces and calls in an embedded SQLite file (the default storage).

Each span is one row: the columns queries filter on (ids, name, kind, times, status,
call, project) plus the span's own protobuf bytes, from which attributes, events and
links are read back. Rows are written with ``INSERT OR IGNORE`` on
(project, trace id, span id), so a retried request stores nothing twice, and no row
needs its parent to exist first (LiveKit exports children before their parents).

Beside the spans, one transaction per batch keeps:

- ``resources`` / ``scopes``: each distinct resource and instrumentation scope once;
- ``traces``: a trace's extent, root span, service, call and whether it has an error
  (min/max/or updates, so a retry changes nothing);
- ``trace_search``: a full-text (FTS5) index from short scalar span and resource
  attributes to traces, which ``attr.KEY=VALUE`` and ``tag.KEY=VALUE`` search: one
  document per trace and batch, one term per (project, key, value) (see
  ``sqlite_query.search_term``). FTS5 appends sorted segments and merges them later, so
  indexing costs ~2 us an attribute where a B-tree row per (key, value, trace) cost ~11;
- ``trace_names`` / ``call_traces``: the traces holding a span of a name / of a call;
- ``calls``: the extent, service and custom tags (``roark.project.tag.KEY``) of a call.

WAL mode, one writer thread; ``retention`` deletes data older than it. ``query_store()``
is the read side the query API uses (``exporters/sqlite_query.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import multiprocessing
import sqlite3
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Literal

from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from pydantic import Field

from collector import (
    ALL_SIGNALS,
    Duration,
    Exporter,
    ExporterConfig,
    Host,
    LogBatch,
    MetricBatch,
    PermanentError,
    QueueSettings,
    RetryableError,
    SpanBatch,
)
from collector.calls import ensure_calls_table
from collector.signals_storage import SQLiteSignalStore
from collector.storage import (  # re-exported: the query side and plugins read them here
    MAX_INDEXED_VALUE,
    NATIVE_SQLITE,
    STATUS_ERROR,
    TAG_PREFIX,
    BackgroundCheckpointer,
    BatchRows,
    SQLiteWriter,
    attribute_text,
    build_rows,
    expire_periodically,
    file_of,
    json_document,
    open_sqlite,
    resource_attributes,
    write_lock,
)
from exporters.sqlite_query import SQLiteQueryStore, search_term

log = logging.getLogger(__name__)

__all__ = [
    "MAX_INDEXED_VALUE",
    "NATIVE_SQLITE",
    "SCHEMA",
    "STATUS_ERROR",
    "TAG_PREFIX",
    "SQLiteConfig",
    "SQLiteExporter",
    "attribute_text",
    "connect",
]

SCHEMA_VERSION = 2
"""``PRAGMA user_version`` of a file in the layout below. 0: spans and trace names keyed
by the random trace id (migrated on open: ``_upgrade``, ``_MIGRATE_TO_TRACE_SEQ``)."""

# The tables ``_MIGRATE_TO_TRACE_SEQ`` makes anew, as ``SCHEMA`` makes them for a new file.
_TRACES = """
CREATE TABLE IF NOT EXISTS traces (
  seq INTEGER PRIMARY KEY,
  project TEXT NOT NULL, trace_id BLOB NOT NULL, call_id TEXT, service TEXT,
  start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL, duration_ns INTEGER NOT NULL,
  root_name TEXT, root_span_id BLOB, has_error INTEGER NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX IF NOT EXISTS traces_identity ON traces (project, trace_id);
"""
_TRACE_NAMES = """
CREATE TABLE IF NOT EXISTS trace_names (
  project TEXT NOT NULL, name TEXT NOT NULL, trace_seq INTEGER NOT NULL,
  PRIMARY KEY (project, name, trace_seq)) WITHOUT ROWID;
"""
_CALL_TRACES = """
CREATE TABLE IF NOT EXISTS call_traces (
  project TEXT NOT NULL, call_id TEXT NOT NULL, trace_id BLOB NOT NULL,
  PRIMARY KEY (project, call_id, trace_id)) WITHOUT ROWID;
"""

# The calls table comes from ``ensure_calls_table``, which also upgrades older files.
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS spans (
  project TEXT NOT NULL, trace_id BLOB NOT NULL, span_id BLOB NOT NULL,
  parent_span_id BLOB, name TEXT NOT NULL, kind INTEGER NOT NULL,
  start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL, duration_ns INTEGER NOT NULL,
  status_code INTEGER NOT NULL, call_id TEXT, resource_id INTEGER NOT NULL,
  scope_id INTEGER NOT NULL, span BLOB NOT NULL, trace_seq INTEGER NOT NULL);
-- The one index on spans: a trace's spans, and no span stored twice. It is keyed by the
-- trace's seq (traces.seq, given out in the order traces are first seen), not by the
-- random trace id, so new spans land at its end, in the pages the last batches touched:
-- keyed by trace id, every batch dirtied pages all over it, and writing slowed as the
-- file grew (measured: 13 -> 29 us a span from 0 to 400k spans; 12 -> 15 keyed by seq).
-- Calls and names find spans through their traces, in the per-trace tables below.
CREATE UNIQUE INDEX IF NOT EXISTS spans_by_trace ON spans (trace_seq, span_id);
CREATE TABLE IF NOT EXISTS resources (
  resource_id INTEGER PRIMARY KEY, digest BLOB NOT NULL UNIQUE, service TEXT,
  attributes TEXT NOT NULL, resource BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS scopes (
  scope_id INTEGER PRIMARY KEY, digest BLOB NOT NULL UNIQUE, name TEXT, version TEXT,
  scope BLOB NOT NULL);
{_TRACES}CREATE INDEX IF NOT EXISTS traces_by_start ON traces (project, start_ns DESC, trace_id);
CREATE INDEX IF NOT EXISTS traces_by_duration ON traces (project, duration_ns DESC);
CREATE INDEX IF NOT EXISTS traces_by_call ON traces (project, call_id);
CREATE VIRTUAL TABLE IF NOT EXISTS trace_search USING fts5(
  project UNINDEXED, trace_id UNINDEXED, terms, detail=none, columnsize=0);
CREATE TABLE IF NOT EXISTS span_names (
  project TEXT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (project, name)) WITHOUT ROWID;
-- the traces holding a span of that name (trace search by name), by seq as spans are
{_TRACE_NAMES}-- the traces holding a span of that call (a call's spans)
{_CALL_TRACES}"""

# Files of layout 0 (no trace seq; before that, per-span call and name indexes and a
# trace_attrs table): traces get a seq in start order, spans and trace names are keyed
# by it, and the per-trace tables are filled from the spans, once.
_MIGRATE_TO_TRACE_SEQ = f"""
ALTER TABLE traces RENAME TO traces_by_trace_id;
DROP INDEX IF EXISTS traces_by_start;
DROP INDEX IF EXISTS traces_by_duration;
DROP INDEX IF EXISTS traces_by_call;
{_TRACES}INSERT INTO traces (project, trace_id, call_id, service, start_ns, end_ns, duration_ns,
    root_name, root_span_id, has_error)
  SELECT project, trace_id, call_id, service, start_ns, end_ns, duration_ns, root_name,
    root_span_id, has_error FROM traces_by_trace_id ORDER BY start_ns;
DROP TABLE traces_by_trace_id;
-- spans whose trace has no row (none should): one made from the spans
INSERT INTO traces (project, trace_id, call_id, start_ns, end_ns, duration_ns)
  SELECT project, trace_id, max(call_id), min(start_ns), max(end_ns),
    max(end_ns) - min(start_ns) FROM spans s WHERE NOT EXISTS (SELECT 1 FROM traces t
    WHERE t.project = s.project AND t.trace_id = s.trace_id) GROUP BY project, trace_id;
ALTER TABLE spans ADD COLUMN trace_seq INTEGER NOT NULL DEFAULT 0;
UPDATE spans SET trace_seq = (SELECT seq FROM traces t
  WHERE t.project = spans.project AND t.trace_id = spans.trace_id);
DROP INDEX IF EXISTS spans_identity;
DROP INDEX IF EXISTS spans_by_call;
DROP INDEX IF EXISTS spans_by_name_trace;
DROP INDEX IF EXISTS spans_by_name;
DROP INDEX IF EXISTS spans_by_start;
DROP TABLE IF EXISTS trace_names;
{_TRACE_NAMES}INSERT OR IGNORE INTO trace_names (project, name, trace_seq)
  SELECT DISTINCT project, name, trace_seq FROM spans;
{_CALL_TRACES}INSERT OR IGNORE INTO call_traces (project, call_id, trace_id)
  SELECT DISTINCT project, call_id, trace_id FROM spans WHERE call_id IS NOT NULL;
"""

_INSERT_SPAN = (
    "INSERT OR IGNORE INTO spans (project, trace_id, span_id, parent_span_id, name, kind,"
    " start_ns, end_ns, duration_ns, status_code, call_id, resource_id, scope_id, span,"
    " trace_seq) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15)"
)
"""A span row (``BatchRows.spans``) and, as ?15, its trace's seq (from ``_UPSERT_TRACE``)."""
_INSERT_SEARCH = "INSERT INTO trace_search (project, trace_id, terms) VALUES (?,?,?)"
_INSERT_SPAN_NAME = "INSERT OR IGNORE INTO span_names (project, name) VALUES (?,?)"
_INSERT_CALL_TRACE = "INSERT OR IGNORE INTO call_traces (project, call_id, trace_id) VALUES (?,?,?)"
_INSERT_TRACE_NAME = "INSERT OR IGNORE INTO trace_names (project, name, trace_seq) VALUES (?,?,?)"
# A resource's id, whether this inserts it or it was there (the no-op update makes the
# existing row return its id too).
_UPSERT_RESOURCE = (
    "INSERT INTO resources (digest, service, attributes, resource) VALUES (?,?,?,?)"
    " ON CONFLICT (digest) DO UPDATE SET digest = excluded.digest RETURNING resource_id"
)
_UPSERT_TRACE = (
    "INSERT INTO traces (project, trace_id, call_id, service, start_ns, end_ns, duration_ns,"
    " root_name, root_span_id, has_error) VALUES (?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (project, trace_id) DO UPDATE SET"
    " call_id = coalesce(traces.call_id, excluded.call_id),"
    " service = coalesce(traces.service, excluded.service),"
    " start_ns = min(traces.start_ns, excluded.start_ns),"
    " end_ns = max(traces.end_ns, excluded.end_ns),"
    " duration_ns = max(traces.end_ns, excluded.end_ns) - min(traces.start_ns, excluded.start_ns),"
    " root_name = coalesce(excluded.root_name, traces.root_name),"
    " root_span_id = coalesce(excluded.root_span_id, traces.root_span_id),"
    " has_error = max(traces.has_error, excluded.has_error)"
    " RETURNING seq"
)
_UPSERT_CALL = (
    "INSERT INTO calls (project, call_id, room_id, source, first_seen_ns, last_seen_ns,"
    " start_ns, end_ns, service, tags) VALUES (?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (project, call_id) DO UPDATE SET"
    " last_seen_ns = max(calls.last_seen_ns, excluded.last_seen_ns),"
    " start_ns = min(coalesce(calls.start_ns, excluded.start_ns), excluded.start_ns),"
    " end_ns = max(coalesce(calls.end_ns, excluded.end_ns), excluded.end_ns),"
    " service = coalesce(calls.service, excluded.service),"
    " tags = CASE WHEN excluded.tags IS NULL THEN calls.tags"
    " ELSE json_patch(coalesce(calls.tags, '{}'), excluded.tags) END"
)


class SQLiteQueueSettings(QueueSettings):
    num_consumers: int = Field(default=2, ge=1, le=64)
    """Two: while one consumer's batch is written, the other's waits on the writer's
    thread, which starts it the moment the first commits. With one, each next batch
    came only once the event loop had seen the commit and read the batch back: under
    the bench's load the writer sat idle ~150 of ~800 ms (~80 with two), and persisted
    130-133k spans/s against 131-145k (3 runs each). The writer still writes one batch
    at a time, in the order they were taken."""


class SQLiteConfig(ExporterConfig):
    sending_queue: SQLiteQueueSettings = Field(default_factory=SQLiteQueueSettings)
    writer: Literal["thread", "process"] = "thread"
    """Where spans are turned into rows and written: a thread of the collector's process
    (lean: one process), or a process of its own, on another core than the receiver (more
    spans/s on a multi-core host, for ~100 MiB more memory; see the README)."""
    path: Path = Path("./data/calltrace.db")
    retention: Duration = 0.0
    """Delete spans, traces and calls older than this (e.g. "720h"); 0 keeps everything."""
    retention_check_interval: Duration = 300.0
    """How often old data is looked for."""
    cache_size_mib: int = Field(default=16, ge=1)
    """SQLite page cache of the writer connection. Writes touch the ends of the indexes
    (see ``SCHEMA``), so a small one does: writing 957k spans, 16 MiB ran within 3% of
    64 MiB (34.1k against 35.0k spans/s), and the bench's peak RSS fell 191 -> 143 MiB."""


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with calltrace's settings (WAL, busy timeout); creates the schema,
    or brings an older file's up to date."""
    path = Path(path)
    if readonly:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        db = open_sqlite(path)
    db.execute("PRAGMA busy_timeout=10000")
    if not readonly:
        _upgrade(db)
        db.executescript(SCHEMA)
        ensure_calls_table(db)
        if db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'trace_attrs'"
        ).fetchone():
            _migrate_trace_attrs(db)
    return db


def _upgrade(db: sqlite3.Connection) -> None:
    """Migrate a file of an older layout (``PRAGMA user_version`` below
    ``SCHEMA_VERSION``) in one transaction, which also sets the version: a crash leaves
    the old layout whole, and two processes opening the file at once migrate it once."""
    if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        old = db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION and (
            db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'spans'"
            ).fetchone()
        )
        if old:
            log.info("migrating %s to layout %d (trace seq)", file_of(db), SCHEMA_VERSION)
            for statement in _MIGRATE_TO_TRACE_SEQ.split(";\n"):
                if statement.strip():
                    db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


def _migrate_trace_attrs(db: sqlite3.Connection) -> None:
    """Files written before ``trace_search`` kept one ``trace_attrs`` row per (key,
    value, trace): their rows become search documents, one per trace, once."""
    db.execute("BEGIN")
    try:
        documents: list[tuple[str, bytes, str]] = []
        current: tuple[str, bytes] | None = None
        terms: list[str] = []
        for project, key, value, trace_id in db.execute(
            "SELECT project, key, value, trace_id FROM trace_attrs ORDER BY project, trace_id"
        ):
            if (project, trace_id) != current:
                if current is not None:
                    documents.append((*current, " ".join(terms)))
                current, terms = (project, trace_id), []
            terms.append(search_term(project, key, value))
            if len(documents) >= 10_000:
                db.executemany("INSERT INTO trace_search VALUES (?,?,?)", documents)
                documents.clear()
        if current is not None:
            documents.append((*current, " ".join(terms)))
        db.executemany("INSERT INTO trace_search VALUES (?,?,?)", documents)
        db.execute("DROP TABLE trace_attrs")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


_TERMS_LIMIT = 8192
"""Search terms a writer keeps per project before it starts over."""


class _Writer:
    """The writer connection and what it caches; used from one thread (or, with
    ``writer: process``, inside the writer process)."""

    def __init__(self, path: Path, cache_size_mib: int):
        self._path = path
        self.db = connect(path)
        # The batches' transactions: on a SQLite handle of the writer's own, in C.
        self.writes = SQLiteWriter(self.db)
        self.writes.pragma(f"PRAGMA cache_size=-{cache_size_mib * 1024}")
        self._checkpointer = BackgroundCheckpointer(self.writes, path)
        self._write_lock = write_lock(path)  # shared with correlate's call records
        # Ids of resources and scopes already written, by their serialized bytes.
        self._resource_ids: dict[bytes, int] = {}
        self._scope_ids: dict[bytes, int] = {}
        self._terms: dict[str, dict[tuple[str, str], str]] = {}
        """Search terms already computed, by project and (key, value)."""

    def write(self, batch: SpanBatch) -> None:
        """Write ``batch`` in one transaction; raises ``RetryableError`` for a failure that
        may pass, ``PermanentError`` for one that would repeat for this batch."""
        try:
            with self._write_lock:
                self._write(batch)
        except Exception as exc:
            error = _export_error(exc, self._path)
            if error is exc:
                raise
            raise error from exc
        self._checkpointer.poke()

    def _write(self, batch: SpanBatch) -> None:
        writes = self.writes
        project = batch.project or ""
        now = time.time_ns()
        # Resources not seen before, by their bytes: (a stand-in id, service).
        new_resources: dict[bytes, tuple[int, str | None]] = {}

        def resource_ref(service: str | None, payload: bytes) -> int:
            cached = self._resource_ids.get(payload)  # keyed by the bytes: no digest
            if cached is not None:
                return cached
            # Written after build_rows, all at once: a statement of its own for each
            # (~40 a batch) let go of the GIL that many times, each a wait for it back.
            known = new_resources.get(payload)
            if known is None:
                known = new_resources[payload] = (-1 - len(new_resources), service)
            return known[0]

        writes.begin()
        try:
            rows = build_rows(
                batch,
                now,
                resource_ref,
                self._scope_id,
                span_plan=writes.native,
            )
            if new_resources:
                self._add_resources(new_resources, rows)
            # Each trace's seq, for its span and name rows: bound, not looked up in the
            # traces index for every row by a subquery (measured ~0.9 us a span).
            traces = [(project, *t) for t in rows.traces.values()]
            returned = writes.returned_ids(_UPSERT_TRACE, traces)
            seqs = dict(zip(rows.traces, returned, strict=True))
            spans: tuple[Any, ...]
            if rows.span_plan is not None:  # straight from the bytes, in C
                spans = (_INSERT_SPAN, rows.span_plan[0], project, rows.span_plan[1], seqs)
            else:
                spans = (_INSERT_SPAN, [(*row, seqs[row[1]]) for row in rows.spans])
            calls = [
                (project, *c[:8], json_document(c[8], sort_keys=True) if c[8] else None)
                for c in rows.calls.values()
            ]
            # One call, the GIL let go of once (see SQLiteWriter).
            steps = [
                spans,
                (_INSERT_SEARCH, self._search_documents(project, rows.trace_attrs)),
                (_INSERT_SPAN_NAME, [(project, name) for name in rows.names]),
                (_INSERT_TRACE_NAME, [(project, name, seqs[t]) for name, t in rows.trace_names]),
                (_INSERT_CALL_TRACE, [(project, *pair) for pair in rows.call_traces]),
                (_UPSERT_CALL, calls),
                ("COMMIT", None),
            ]
            writes.execute_steps(steps)
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                writes.rollback()
            # Ids cached during a rolled-back transaction may not exist.
            self._resource_ids.clear()
            self._scope_ids.clear()
            raise

    def _search_documents(
        self, project: str, attributes: dict[bytes, set[tuple[str, str]]]
    ) -> list[tuple[str, bytes, str]]:
        """One ``trace_search`` row per trace: its attributes' terms, space-separated."""
        known = self._terms.get(project)
        # Bounded by memory: unique values (ids, transcripts) fill it as fast as the
        # repeated ones it is for, which come back soon after it is emptied. At 50,000
        # entries it held ~15 MiB under the bench's flood.
        if known is None or len(known) > _TERMS_LIMIT:
            known = self._terms[project] = {}
        documents = []
        for trace_id, pairs in attributes.items():
            if not pairs:  # nothing indexable: no document
                continue
            terms = []
            for pair in pairs:
                term = known.get(pair)
                if term is None:  # repeated values (models, providers, services) hash once
                    term = known[pair] = search_term(project, *pair)
                terms.append(term)
            documents.append((project, trace_id, " ".join(terms)))
        return documents

    def _add_resources(
        self,
        new_resources: dict[bytes, tuple[int, str | None]],
        rows: BatchRows,
    ) -> None:
        """Write the batch's new resources and put their ids where ``rows`` holds their
        stand-ins."""
        ids = self.writes.returned_ids(
            _UPSERT_RESOURCE,
            [_resource_row(service, payload) for payload, (_, service) in new_resources.items()],
        )
        real: dict[int, int] = {}
        for (payload, (stand_in, _)), resource_id in zip(new_resources.items(), ids, strict=True):
            real[stand_in] = resource_id
            self._cache_resource(payload, resource_id)
        if rows.span_plan is not None:
            payload, plan = rows.span_plan
            rows.span_plan = (payload, [(o, n, c, real.get(r, r), s) for o, n, c, r, s in plan])
        else:  # the Python rows (no collector._wire, or a payload its reader refused)
            rows.spans = [(*row[:11], real.get(row[11], row[11]), *row[12:]) for row in rows.spans]

    def _cache_resource(self, payload: bytes, resource_id: int) -> None:
        if len(self._resource_ids) > 10_000:
            self._resource_ids.clear()
        self._resource_ids[payload] = resource_id

    def _scope_id(self, payload: bytes) -> int:
        cached = self._scope_ids.get(payload)
        if cached is not None:
            return cached
        scope = InstrumentationScope.FromString(payload)
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        self.writes.execute_steps(
            [
                (
                    "INSERT OR IGNORE INTO scopes (digest, name, version, scope) VALUES (?,?,?,?)",
                    [(digest, scope.name, scope.version, payload)],
                )
            ]
        )
        (scope_id,) = self.writes.returned_ids(
            "SELECT scope_id FROM scopes WHERE digest = ?", [(digest,)]
        )
        if len(self._scope_ids) > 10_000:
            self._scope_ids.clear()
        self._scope_ids[payload] = scope_id
        return int(scope_id)

    def expire(self, older_than_ns: int) -> int:
        """Delete traces that ended before ``older_than_ns`` with their spans, and old calls."""
        with self._write_lock:
            deleted = self._expire(older_than_ns)
        self._checkpointer.poke()
        return deleted

    def _expire(self, older_than_ns: int) -> int:
        db = self.db
        db.execute("BEGIN")
        try:
            # Whole traces go, spans first (found by their index's prefix, the seq).
            deleted = db.execute(
                "DELETE FROM spans WHERE rowid IN (SELECT s.rowid FROM traces t JOIN spans s"
                " ON s.trace_seq = t.seq WHERE t.end_ns < ?)",
                (older_than_ns,),
            ).rowcount
            db.execute("DELETE FROM traces WHERE end_ns < ?", (older_than_ns,))
            # The per-trace indexes are keyed for search; one pass each drops the rows of
            # gone traces.
            db.execute(
                "DELETE FROM trace_names WHERE NOT EXISTS"
                " (SELECT 1 FROM traces t WHERE t.seq = trace_names.trace_seq)"
            )
            for table in ("trace_search", "call_traces"):
                db.execute(
                    f"DELETE FROM {table} WHERE NOT EXISTS (SELECT 1 FROM traces t"
                    f" WHERE t.project = {table}.project AND t.trace_id = {table}.trace_id)"
                )
            db.execute(
                "DELETE FROM calls WHERE coalesce(end_ns, last_seen_ns) < ?", (older_than_ns,)
            )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return int(deleted)

    def close(self) -> None:
        self._checkpointer.close()
        self.writes.close()
        self.db.close()


_TRANSIENT_SQLITE_ERRORS = frozenset((3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15, 17, 22, 23))
"""SQLite's primary result codes of failures that may pass: PERM, ABORT, BUSY, LOCKED,
NOMEM, READONLY, INTERRUPT, IOERR, FULL, CANTOPEN, PROTOCOL, SCHEMA, NOLFS, AUTH. The
others (ERROR, as for ``malformed JSON``; TOOBIG, CONSTRAINT, MISMATCH, RANGE; CORRUPT,
NOTADB) would repeat for the batch or the file."""


def _export_error(exc: Exception, path: Path) -> Exception:
    """What a failed write raises to the exporter helper: ``RetryableError`` for a
    failure that may pass (the file locked, the disk full), ``PermanentError`` for one
    that would repeat for this batch (SQLite refusing its data, a number out of range,
    bytes that are not protobuf); any other exception as it is (a bug)."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None:
            transient = isinstance(exc, sqlite3.OperationalError)
        else:
            transient = code & 0xFF in _TRANSIENT_SQLITE_ERRORS
        return (RetryableError if transient else PermanentError)(f"{path}: {exc}")
    if isinstance(exc, OverflowError | ValueError | DecodeError):
        return PermanentError(f"{path}: cannot store the batch: {exc!r}")
    return exc


# -- the writer process (``writer: process``) -----------------------------------------


def _create_file(path: Path) -> None:
    connect(path).close()


_process_writer: _Writer | None = None


def _start_process_writer(path: Path, cache_size_mib: int) -> None:
    global _process_writer
    _process_writer = _Writer(path, cache_size_mib)


def _write_in_process(project: str | None, payload: bytes) -> None:
    assert _process_writer is not None
    # build_rows reads the bytes themselves (or parses them, without collector._wire).
    _process_writer.write(SpanBatch.from_bytes(payload, project))


def _close_process_writer() -> None:
    global _process_writer
    if _process_writer is not None:
        _process_writer.close()
        _process_writer = None


def _expire_in_process(older_than_ns: int) -> int:
    assert _process_writer is not None
    return _process_writer.expire(older_than_ns)


class SQLiteExporter(Exporter):
    """Writes batches to SQLite; the query API reads the same file.

    SQLite allows one writer at a time, so one worker owns the writer connection and the
    event loop never waits on disk: a thread of this process (``writer: thread``, the
    default), or a process of its own (``writer: process``), whose Python work of turning
    spans into rows then runs on another core than the receiver's.
    """

    type_name = "sqlite"
    Config = SQLiteConfig
    config: SQLiteConfig
    signals = ALL_SIGNALS

    def __init__(self, component_id: str, config: SQLiteConfig):
        super().__init__(component_id, config)
        self._writer: _Writer | None = None
        self._pool: Executor | None = None
        self._retention_task: asyncio.Task[None] | None = None
        self._query_store: SQLiteQueryStore | None = None
        self._signal_store: SQLiteSignalStore | None = None

    def signal_store(self) -> SQLiteSignalStore:
        """Logs, metric points and recordings in this exporter's file (their own tables
        and connection: ``collector.signals_storage``)."""
        if self._signal_store is None:
            self._signal_store = SQLiteSignalStore(self.config.path)
        return self._signal_store

    async def export_logs(self, batch: LogBatch) -> None:
        await self._signal_write(self.signal_store().write_logs, batch)

    async def export_metrics(self, batch: MetricBatch) -> None:
        await self._signal_write(self.signal_store().write_metrics, batch)

    async def _signal_write(self, write: Any, batch: Any) -> None:
        try:
            await write(batch)
        except sqlite3.OperationalError as exc:  # locked, disk full, I/O: may pass
            raise RetryableError(f"{self.config.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise PermanentError(f"{self.config.path}: {exc}") from exc

    @property
    def path(self) -> Path:
        return self.config.path

    def query_store(self) -> SQLiteQueryStore:
        """The read side of this exporter's file, for the query API (read-only connections)."""
        if self._query_store is None:
            self._query_store = SQLiteQueryStore(self.config.path)
        return self._query_store

    async def start(self, host: Host) -> None:
        if self._pool is not None:
            return
        path, cache = self.config.path, self.config.cache_size_mib
        if self.config.writer == "process":
            # Schema and pragmas are created here, so a bad path fails start-up; the
            # writer process (~0.7 s to start an interpreter and import) starts in the
            # background and the first batch waits for it, not readiness.
            await asyncio.to_thread(_create_file, path)
            self._pool = self._writer_process()
            self._pool.submit(_expire_in_process, 0).add_done_callback(self._writer_started)
        else:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"calltrace-{self.id}")
            self._writer = await self._run(_Writer, path, cache)
        await self.signal_store().open()  # logs, metrics, recordings tables
        if self.config.retention:
            self._retention_task = asyncio.create_task(
                expire_periodically(
                    self.id,
                    self.config.retention,
                    self.config.retention_check_interval,
                    self.expire,
                )
            )

    def _writer_started(self, started: Any) -> None:
        if not started.cancelled() and started.exception() is not None:
            # The next export meets the same failure and retries (a new process).
            log.warning("%s: the writer process failed to start: %s", self.id, started.exception())

    async def _run(self, fn: Any, *args: Any) -> Any:
        assert self._pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def export(self, batch: SpanBatch) -> None:
        pool = self._pool
        if pool is None:
            raise RetryableError(f"{self.id} is not started")
        try:
            if self._writer is not None:
                await self._run(self._writer.write, batch)
            else:
                await self._run(_write_in_process, batch.project, batch.serialize())
        except BrokenProcessPool as exc:
            if self._pool is pool:  # (the other consumer's export may have restarted it)
                self._restart_process()
            raise RetryableError(f"{self.id}: the writer process died: {exc}") from exc

    def _writer_process(self) -> ProcessPoolExecutor:
        """A pool of one process that owns the writer connection (spawned on first use)."""
        return ProcessPoolExecutor(
            1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_process_writer,
            initargs=(self.config.path, self.config.cache_size_mib),
        )

    def _restart_process(self) -> None:
        """A new writer process after one died (killed, out of memory): the batch is
        retried by the exporter helper; SQLite rolled back its half-written transaction."""
        old, self._pool = self._pool, self._writer_process()
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)

    async def expire(self, older_than_ns: int) -> int:
        """Delete traces that ended before ``older_than_ns`` with their spans, and old calls
        (and older log records, metric points and recordings); the spans deleted."""
        await self.signal_store().expire(older_than_ns)
        if self._writer is not None:
            return int(await self._run(self._writer.expire, older_than_ns))
        return int(await self._run(_expire_in_process, older_than_ns))

    async def shutdown(self) -> None:
        if self._signal_store is not None:
            await self._signal_store.close()
            self._signal_store = None
        if self._query_store is not None:
            await self._query_store.close()
            self._query_store = None
        if self._retention_task is not None:
            self._retention_task.cancel()
            await asyncio.gather(self._retention_task, return_exceptions=True)
            self._retention_task = None
        if self._pool is None:
            return
        try:
            if self._writer is not None:
                await self._run(self._writer.close)
            else:
                await self._run(_close_process_writer)
        except (BrokenProcessPool, sqlite3.Error) as exc:
            log.warning("%s: closing the writer: %s", self.id, exc)
        pool, self._pool, self._writer = self._pool, None, None
        pool.shutdown(wait=True)


def _resource_row(service: str | None, payload: bytes) -> tuple[Any, ...]:
    """A ``resources`` row (for ``_UPSERT_RESOURCE``) of a resource serialized as ``payload``."""
    attributes = json_document(resource_attributes(payload))
    return (hashlib.blake2b(payload, digest_size=16).digest(), service, attributes, payload)
