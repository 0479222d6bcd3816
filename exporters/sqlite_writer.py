"""The sqlite exporter's writer: one connection that turns each batch into rows and
writes them in one transaction, with what it caches (resource and scope ids, search
terms), on a thread of the collector's process or in a process of its own
(``writer: process``)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

from collector import PermanentError, RetryableError, SpanBatch
from collector.storage import (
    BackgroundCheckpointer,
    BatchRows,
    SQLiteWriter,
    build_rows,
    json_document,
    resource_attributes,
    write_lock,
)
from exporters.sqlite_query import search_term
from exporters.sqlite_schema import connect

# The sqlite exporter's logger, whichever of its modules logs.
log = logging.getLogger("exporters.sqlite")


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
            # traces index for every row by a subquery.
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
        # repeated ones it is for, which come back soon after it is emptied.
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


def _resource_row(service: str | None, payload: bytes) -> tuple[Any, ...]:
    """A ``resources`` row (for ``_UPSERT_RESOURCE``) of a resource serialized as ``payload``."""
    attributes = json_document(resource_attributes(payload))
    return (hashlib.blake2b(payload, digest_size=16).digest(), service, attributes, payload)


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
