"""The layout of the sqlite exporter's file: ``SCHEMA`` for a new file, and the
migrations that bring a file of an older layout (``PRAGMA user_version``) up to date
when it is opened (``connect``)."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path

from collector.calls import ensure_calls_table
from collector.storage import file_of, open_sqlite
from exporters.sqlite_query import search_term

# The sqlite exporter's logger, whichever of its modules logs.
log = logging.getLogger("exporters.sqlite")

__all__ = ["SCHEMA", "SCHEMA_VERSION", "connect"]


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
-- file grew.
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
