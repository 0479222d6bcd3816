"""The rows a storage exporter writes for a batch, built once from its protobuf messages.

Every storage exporter (``sqlite``, ``postgres``, a plugin's) stores the same things:
one row per span (the columns queries filter on plus the span's protobuf bytes), a
trace's extent and root, a (key, value) -> trace index of short scalar attributes for
search, the span names, and each call's extent, service and custom tags. ``build_rows``
walks a batch once and produces them; the exporter only turns them into writes. How a
resource and a scope are referred to (an integer id, a digest) is the exporter's choice,
through two callbacks.

This is the hottest loop of ingest. ``collector._wire`` (C) runs it off the batch's
serialized bytes; the Python loop here, which reads each field once through upb, is the
reference it is tested against and the fallback where the extension is not built.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from sys import intern
from typing import Any

from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from collector.query import jsonable
from collector.spans import (
    CALL_ID_ATTRIBUTE,
    CALL_KEY_ATTRIBUTE,
    CALL_SOURCE_ATTRIBUTE,
    SpanBatch,
    any_value_to_python,
)
from collector.wire import NATIVE_SQLITE, NATIVE_WIRE  # re-exported for the exporters
from collector.wire import native as _wire

__all__ = [
    "MAX_INDEXED_VALUE",
    "MAX_STORED_NS",
    "NATIVE_SQLITE",
    "NATIVE_WIRE",
    "STATUS_ERROR",
    "TAG_PREFIX",
    "BackgroundCheckpointer",
    "BatchRows",
    "SQLiteWriter",
    "attribute_text",
    "build_rows",
    "build_rows_native",
    "build_rows_python",
    "expire_periodically",
    "file_of",
    "json_document",
    "open_sqlite",
    "write_lock",
]

log = logging.getLogger(__name__)

TAG_PREFIX = "roark.project.tag."
"""Resource attributes that are a call's custom tags (``roark.project.tag.KEY``)."""
MAX_INDEXED_VALUE = 256
"""Attribute values longer than this (prompts, JSON payloads) are not indexed for search."""
STATUS_ERROR = 2
MAX_STORED_NS = 2**63 - 1
"""The latest span time the rows hold (in 2262): SQLite's and PostgreSQL's integers are
signed 64-bit, OTLP's times unsigned. A later time (a client's bug, but valid OTLP) is
stored as this in the time columns; the span's own bytes keep it as sent."""
_NOT_INDEXED = frozenset(("array_value", "kvlist_value", "bytes_value"))


def open_sqlite(path: str | Path, busy_timeout_ms: int = 10_000) -> sqlite3.Connection:
    """A writable connection with calltrace's SQLite settings, shared by every file it
    keeps (spans, keys, call records, persistent queues): autocommit (transactions are
    explicit), usable from a worker thread, WAL with ``synchronous=NORMAL`` (durable
    across a crash of the process), and 16 KiB pages for a new file (span rows carry
    ~600 bytes of protobuf: inserts measured ~15% cheaper than with 4 KiB pages)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in _connection_pragmas(busy_timeout_ms):
        db.execute(pragma)
    return db


def _connection_pragmas(busy_timeout_ms: int) -> tuple[str, ...]:
    """What ``open_sqlite`` sets on a connection (``SQLiteWriter``'s handle too)."""
    return (
        "PRAGMA page_size=16384",  # only takes effect while the file is empty
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=NORMAL",
        f"PRAGMA busy_timeout={int(busy_timeout_ms)}",
    )


def file_of(db: sqlite3.Connection) -> str:
    """The path of the file ``db`` has open as ``main``."""
    return str(db.execute("PRAGMA database_list").fetchone()[2])


_WRITE_LOCKS: dict[str, threading.Lock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def write_lock(path: str | Path) -> threading.Lock:
    """The lock this process's connections to the file at ``path`` hold around their
    write transactions (the sqlite exporter's writer, ``correlate``'s call records).

    SQLite lets one writer in at a time and makes the others poll, sleeping 1, 2, 5, 10,
    ... up to 100 ms between tries: in the default config, where the call records and
    the spans share a file, the span writer slept up to ~25 ms after each call-record
    insert had long finished, and a writer whose read began before the other's commit
    failed at once (``SQLITE_BUSY_SNAPSHOT``) and retried its batch. Waiting on this
    lock, the next writer starts the moment the other commits. Other processes still
    meet SQLite's own locking (``busy_timeout``)."""
    key = os.path.realpath(path)
    with _WRITE_LOCKS_GUARD:
        lock = _WRITE_LOCKS.get(key)
        if lock is None:
            lock = _WRITE_LOCKS[key] = threading.Lock()
        return lock


class BackgroundCheckpointer:
    """Copies a WAL file back into its database on a thread and connection of its own.

    SQLite's automatic checkpoint runs inside a writer's COMMIT, every ~1,000 pages, and
    ends with an fsync: measured, it was most of the sqlite exporter's commit cost
    (10-18 of 12-23 us a span) and the persistent queue's latency spikes (a 50-span
    request's p99 ~56-61 ms with the queue on disk, 13 ms with it in memory). Here the
    writer's automatic checkpoint is off and ``PASSIVE`` checkpoints, which never block
    a writer and run in C without the GIL, follow its commits on another thread, at most
    one every ``interval`` seconds: with small commits (a 50-span request at a time) a
    checkpoint after each cost ~11 us a span, as much as a quarter of the writer's own
    work. The WAL file is cut back to ``wal_limit`` bytes once a checkpoint caught up.
    """

    def __init__(
        self,
        writer: SQLiteWriter,
        path: str | Path,
        wal_limit: int = 64 << 20,
        interval: float = 0.05,
    ):
        writer.pragma("PRAGMA wal_autocheckpoint=0")
        writer.pragma(f"PRAGMA journal_size_limit={int(wal_limit)}")
        self._db = open_sqlite(path)
        self._due = threading.Event()
        self._closed = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="calltrace-checkpoint", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """A transaction was committed: checkpoint what it added, soon."""
        self._due.set()

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            if self._closed.is_set():
                return
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:  # busy or I/O: the next commit pokes again
                log.debug("checkpoint: %s", exc)
            self._closed.wait(self._interval)  # commits meanwhile wait for the next one

    def close(self) -> None:
        """Stop the thread (the writer's own close checkpoints what is left)."""
        self._closed.set()
        self._due.set()
        self._thread.join()
        self._db.close()


def json_document(value: Any, **options: Any) -> str:
    """``value`` (attribute values as ``any_value_to_python`` reads them: custom tags, a
    resource's attributes) as strict JSON, which SQLite's and PostgreSQL's JSON functions
    accept: bytes as hex, NaN and infinities as the strings ``"nan"``, ``"inf"``,
    ``"-inf"`` (as the query API shows them). ``options`` go to ``json.dumps``."""
    return json.dumps(jsonable(value), allow_nan=False, **options)


def attribute_text(value: Any) -> str | None:
    """The text an attribute value is indexed and searched as; None if not indexed.

    Strings as they are, booleans ``true``/``false``, numbers in decimal. Arrays, maps,
    bytes and long strings are not indexed.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if len(value) <= MAX_INDEXED_VALUE else None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if not value.is_integer() else str(int(value))
    return None


def _indexable(kv: Any) -> tuple[str, str] | None:
    value = kv.value
    kind = value.WhichOneof("value")
    if kind is None or kind in _NOT_INDEXED:
        return None
    text = attribute_text(getattr(value, kind))
    return None if text is None else (kv.key, text)


class BatchRows:
    """What one batch writes. Rows carry no project except ``spans`` (its first column)."""

    __slots__ = (
        "call_traces",
        "calls",
        "span_plan",
        "spans",
        "trace_attrs",
        "trace_names",
        "traces",
    )

    def __init__(self) -> None:
        self.spans: list[tuple[Any, ...]] = []
        """(project, trace_id, span_id, parent_span_id, name, kind, start_ns, end_ns,
        duration_ns, status_code, call_id, resource ref, scope ref, span bytes); empty
        when ``span_plan`` stands for them."""
        self.span_plan: tuple[bytes, list[tuple[Any, ...]]] | None = None
        """(payload, plan) where ``build_rows(span_plan=True)`` left the span rows in the
        payload for ``SQLiteWriter.execute_steps`` to write: for each ScopeSpans, (offset, length,
        call_id, resource ref, scope ref)."""
        self.traces: dict[bytes, list[Any]] = {}
        """trace id -> [trace_id, call_id, service, start_ns, end_ns, duration_ns,
        root_name, root_span_id, has_error]"""
        self.trace_attrs: dict[bytes, set[tuple[str, str]]] = {}
        """trace_id -> (key, value text) of its spans' and resources' attributes."""
        self.calls: dict[str, list[Any]] = {}
        """call id -> [call_id, room_id, source, first_seen_ns, last_seen_ns, start_ns,
        end_ns, service, tags (a dict)]"""
        self.trace_names: set[tuple[str, bytes]] = set()
        """(span name, trace_id) of every span."""
        self.call_traces: set[tuple[str, bytes]] = set()
        """(call_id, trace_id) of every span that belongs to a call."""

    def attribute_rows(self) -> list[tuple[str, str, bytes]]:
        """``trace_attrs`` as (key, value text, trace_id) rows."""
        return [(k, v, t) for t, pairs in self.trace_attrs.items() for k, v in pairs]

    @property
    def names(self) -> set[str]:
        """The span names."""
        return {name for name, _ in self.trace_names}


class _ResourceFacts:
    """What ``build_rows`` reads from a resource, kept by its serialized bytes: one
    agent process exports a few spans at a time under the same resource, so most
    batches repeat resources seen before (measured ~5 spans per ``ResourceSpans``)."""

    __slots__ = (
        "attrs",
        "call_id",
        "call_key",
        "call_source",
        "payload",
        "service",
        "tags",
    )

    def __init__(self, resource: Resource | None, payload: bytes):
        """The facts of ``resource``, serialized as ``payload``; with ``resource`` None,
        read off ``payload`` by ``collector._wire.resource_facts``: 14.3 -> 3.1 us for a
        bench resource, the writer holding the GIL that long for every new call's one."""
        # The message itself is not kept: it took ~40% of an entry's memory (the cache
        # held ~11 MiB of them under the bench's flood), and an exporter needs it only
        # for a resource it has not stored yet (``resource_attributes``).
        self.payload = payload
        """The resource serialized (no map fields, so the same bytes however written)."""
        self.tags: dict[str, Any] = {}
        self.call_id: str | None = None
        self.call_key: str | None = None
        self.call_source: str | None = None
        self.service: str | None = None
        self.attrs: tuple[tuple[str, str], ...]
        """(key, value text) of the resource's indexed attributes."""
        if resource is None:
            assert _wire is not None
            has_tags: bool
            (
                self.attrs,
                self.service,
                self.call_id,
                self.call_key,
                self.call_source,
                has_tags,
            ) = _wire.resource_facts(payload)
            if has_tags:  # their values may be any AnyValue: read in Python
                for kv in Resource.FromString(payload).attributes:
                    if kv.key.startswith(TAG_PREFIX):
                        self.tags[kv.key[len(TAG_PREFIX) :]] = any_value_to_python(kv.value)
            return
        attrs: list[tuple[str, str]] = []
        for kv in resource.attributes:
            key = kv.key
            if key == CALL_ID_ATTRIBUTE:
                self.call_id = kv.value.string_value or None
            elif key == CALL_KEY_ATTRIBUTE:
                self.call_key = kv.value.string_value
            elif key == CALL_SOURCE_ATTRIBUTE:
                self.call_source = kv.value.string_value
            else:
                if key == "service.name":
                    self.service = kv.value.string_value or None
                elif key.startswith(TAG_PREFIX):
                    self.tags[key[len(TAG_PREFIX) :]] = any_value_to_python(kv.value)
                pair = _indexable(kv)
                if pair is not None:
                    # Interned: the same keys and most values repeat in every resource.
                    attrs.append((intern(pair[0]), intern(pair[1])))
        self.attrs = tuple(attrs)


_RESOURCE_FACTS: dict[bytes, _ResourceFacts] = {}
_RESOURCE_FACTS_LIMIT = 4096


def _facts_of(payload: bytes, resource: Resource | None = None) -> _ResourceFacts:
    """The facts of the resource serialized as ``payload`` (parsed from it unless given)."""
    facts = _RESOURCE_FACTS.get(payload)
    if facts is None:
        if len(_RESOURCE_FACTS) >= _RESOURCE_FACTS_LIMIT:
            _RESOURCE_FACTS.clear()
        if resource is None and _wire is None:
            resource = Resource.FromString(payload)
        facts = _RESOURCE_FACTS[payload] = _ResourceFacts(resource, payload)
    return facts


def resource_attributes(payload: bytes) -> dict[str, Any]:
    """The attributes of the resource serialized as ``payload``, as Python values: what
    an exporter stores of a resource the first time it sees it."""
    return {kv.key: any_value_to_python(kv.value) for kv in Resource.FromString(payload).attributes}


ResourceRef = Callable[["str | None", bytes], Any]
"""``resource_ref(service, payload)``: what a span row stores to point at its resource,
given its ``service.name`` and the resource serialized (``resource_attributes`` reads
its attributes back). ``build_rows`` asks once per distinct resource of a batch."""
ScopeRef = Callable[[bytes], Any]
"""``scope_ref(payload)``: what a span row stores to point at its instrumentation scope,
given the scope serialized (``InstrumentationScope.FromString`` reads it back)."""


def build_rows(
    batch: SpanBatch,
    now: int,
    resource_ref: ResourceRef,
    scope_ref: ScopeRef,
    *,
    span_plan: bool = False,
) -> BatchRows:
    """The rows of ``batch``: read off its serialized form by ``collector._wire`` (C)
    where that module is built, else by the Python loop below; both give the same rows
    (tests/core/test_wire.py holds them to it). A span row's bytes are the span's own
    bytes in the batch's serialized form.

    ``span_plan``: where the C path runs, leave the span rows in the payload and set
    ``rows.span_plan`` for ``SQLiteWriter.execute_steps`` (with its own handle only); otherwise
    ``rows.spans`` holds them."""
    if _wire is not None:
        try:
            return build_rows_native(
                batch.serialize(), batch.project, now, resource_ref, scope_ref, span_plan=span_plan
            )
        except ValueError:
            pass  # not well-formed protobuf: the Python path parses it and says what is wrong
    return build_rows_python(batch, now, resource_ref, scope_ref)


def build_rows_native(
    payload: bytes,
    project: str | None,
    now: int,
    resource_ref: ResourceRef,
    scope_ref: ScopeRef,
    *,
    span_plan: bool = False,
) -> BatchRows:
    """``build_rows`` of a serialized ``ExportTraceServiceRequest`` by ``collector._wire``
    (ValueError if it is not well-formed protobuf)."""
    assert _wire is not None

    def resource_cb(resource_payload: bytes) -> tuple[Any, ...]:
        facts = _facts_of(resource_payload)
        ref = resource_ref(facts.service, resource_payload)
        return (ref, facts.call_id, facts.service, facts.attrs, facts)

    rows = BatchRows()
    (
        rows.spans,
        rows.traces,
        rows.trace_attrs,
        rows.trace_names,
        rows.call_traces,
        extents,
    ) = _wire.build_rows(payload, project or "", resource_cb, scope_ref, not span_plan)
    if span_plan:
        rows.span_plan, rows.spans = (payload, rows.spans), []
    for (_, call_id, _, _, facts), start_min, end_max in extents:
        if call_id is not None:
            _add_call(rows.calls, facts, now, start_min, end_max)
    return rows


def _add_call(
    calls: dict[str, list[Any]], facts: _ResourceFacts, now: int, start_min: int, end_max: int
) -> None:
    """One resource's spans (from ``start_min`` to ``end_max``) in its call's row."""
    assert facts.call_id is not None
    call = calls.get(facts.call_id)
    if call is None:
        calls[facts.call_id] = [
            facts.call_id,
            facts.call_key or facts.call_id,
            facts.call_source or "",
            now,
            now,
            start_min,
            end_max,
            facts.service,
            dict(facts.tags),  # updated by later resources: not the cached facts
        ]
    else:
        call[5] = min(call[5], start_min)
        call[6] = max(call[6], end_max)
        call[8].update(facts.tags)


class SQLiteWriter:
    """The connection a writer's transactions run on, for one SQLite file.

    With the C extension (``NATIVE_SQLITE``): a SQLite handle of the writer's own
    (``collector._wire.SQLiteHandle``, ``sqlite3_open_v2`` on the file ``db`` has open,
    which WAL allows beside it), with ``db``'s settings (``open_sqlite``'s and those given
    to ``pragma``). A whole transaction runs on it, from ``begin`` to the ``COMMIT`` step,
    its rows bound in C with the GIL let go of once per call: executemany lets go of it
    around every row's step and takes it back after, and while the event loop holds it
    each row then waits up to the switch interval (measured, a writer beside a thread
    running Python: 1.6 batches/s, against 51 in C). Nothing of ``db`` itself is read
    in C. If the handle cannot be opened, or without the extension, the transactions run
    on ``db`` itself through sqlite3 (the same statements, the same results).

    Used by one thread at a time, as ``db`` is."""

    def __init__(self, db: sqlite3.Connection, busy_timeout_ms: int = 10_000):
        self.db = db
        self.filename = file_of(db)
        self._handle: Any = None
        if NATIVE_SQLITE:
            assert _wire is not None
            try:
                handle = _wire.SQLiteHandle(self.filename)
            except (OSError, RuntimeError, ValueError) as exc:
                log.warning("writing %s through sqlite3: %s", self.filename, exc)
            else:
                self._handle = handle
                for pragma in _connection_pragmas(busy_timeout_ms):
                    self._run(handle, [(pragma, None)])

    @property
    def native(self) -> bool:
        """Whether the transactions run on a handle of the writer's own, in C."""
        return self._handle is not None

    @property
    def in_transaction(self) -> bool:
        if self._handle is not None:
            return bool(self._handle.in_transaction)
        return self.db.in_transaction

    def pragma(self, sql: str) -> None:
        """Run a ``PRAGMA`` that sets something on both connections (``cache_size``)."""
        self.db.execute(sql).fetchall()
        if self._handle is not None:
            self._run(self._handle, [(sql, None)])

    def begin(self) -> None:
        self.execute_steps([("BEGIN", None)])

    def rollback(self) -> None:
        """Roll back the open transaction, if there is one (after an error)."""
        if self._handle is not None:
            if self._handle.in_transaction:
                self._run(self._handle, [("ROLLBACK", None)])
        elif self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def transaction(self, steps: list[Any]) -> None:
        """``steps`` (as ``execute_steps`` takes them) and a ``COMMIT``, in one
        transaction: rolled back if one fails."""
        self.begin()
        try:
            self.execute_steps([*steps, ("COMMIT", None)])
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.rollback()
            raise

    def execute_steps(self, steps: list[Any]) -> None:
        """Run ``steps`` in order: a ``(sql, None)`` step executes ``sql`` once
        (``BEGIN``, ``COMMIT``), ``(sql, rows)`` executes it for each row, and ``(sql,
        payload, project, plan)`` inserts the span rows that ``rows.span_plan``
        (``(payload, plan)``) leaves in the payload, ``sql`` taking a row of
        ``BatchRows.spans`` as parameters ?1-?14; ``(sql, payload, project, plan,
        seqs)`` also binds ?15 to the span's trace's value in ``seqs`` (trace id ->
        int). Raises what sqlite3 would. Without the handle, span steps cannot be given
        (``build_rows`` makes no plan) and the others go through executemany."""
        if self._handle is None:
            for sql, rows in steps:
                if rows is None:
                    self.db.execute(sql)
                else:
                    self.db.executemany(sql, rows)
            return
        self._run(self._handle, steps)

    def returned_ids(self, sql: str, rows: list[tuple[Any, ...]]) -> list[int]:
        """The integers ``sql`` returns (``RETURNING id``, or a ``SELECT``'s first
        column) for ``rows``, in order, with the GIL let go of once, not for every row."""
        if self._handle is None:
            return [int(r[0]) for row in rows for r in self.db.execute(sql, row).fetchall()]
        if not rows:
            return []
        assert _wire is not None
        outcome = _wire.execute_rows(self._handle, sql, rows, True)
        if isinstance(outcome, tuple):
            raise sqlite_error(*outcome)
        return list(outcome)

    @staticmethod
    def _run(handle: Any, steps: list[Any]) -> None:
        assert _wire is not None
        outcome = _wire.execute_steps(handle, steps)
        if outcome is not None:
            _step, code, message = outcome
            raise sqlite_error(code, message)

    def close(self) -> None:
        """Close the writer's own handle (``db`` is the caller's to close)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


# SQLite's primary result codes -> the exception Python's sqlite3 raises for them
# (Modules/_sqlite/util.c); the rest are OperationalError or, unknown, DatabaseError.
_SQLITE_ERRORS: dict[int, type[Exception]] = {
    2: sqlite3.InternalError,  # INTERNAL
    12: sqlite3.InternalError,  # NOTFOUND
    7: MemoryError,  # NOMEM
    11: sqlite3.DatabaseError,  # CORRUPT
    26: sqlite3.DatabaseError,  # NOTADB
    18: sqlite3.DataError,  # TOOBIG
    19: sqlite3.IntegrityError,  # CONSTRAINT
    20: sqlite3.IntegrityError,  # MISMATCH
    21: sqlite3.InterfaceError,  # MISUSE
    25: sqlite3.InterfaceError,  # RANGE
}
_SQLITE_OPERATIONAL = frozenset((1, 3, 4, 5, 6, 8, 9, 10, 13, 14, 15, 16, 17))


def sqlite_error(code: int, message: str) -> Exception:
    """The exception Python's sqlite3 module raises for SQLite's (extended) ``code``."""
    primary = code & 0xFF
    cls = _SQLITE_ERRORS.get(primary)
    if cls is None:
        cls = sqlite3.OperationalError if primary in _SQLITE_OPERATIONAL else sqlite3.DatabaseError
    error = cls(message)
    if isinstance(error, sqlite3.Error):
        error.sqlite_errorcode = code
    return error


_UNASKED = object()


def build_rows_python(
    batch: SpanBatch, now: int, resource_ref: ResourceRef, scope_ref: ScopeRef
) -> BatchRows:
    """``build_rows`` over the batch's protobuf messages, in Python (the reference)."""
    project = batch.project or ""
    rows = BatchRows()
    span_rows = rows.spans
    traces = rows.traces
    trace_attrs = rows.trace_attrs
    add_name = rows.trace_names.add
    add_call_trace = rows.call_traces.add
    # Each callback is asked once per distinct resource or scope, as the C path does.
    resource_ids: dict[bytes, Any] = {}
    scope_ids: dict[bytes, Any] = {}
    for rs in batch.resource_spans:
        resource = rs.resource
        facts = _facts_of(resource.SerializeToString(), resource)
        call_id = facts.call_id
        service, resource_attrs = facts.service, facts.attrs
        resource_id = resource_ids.get(facts.payload, _UNASKED)
        if resource_id is _UNASKED:
            resource_id = resource_ids[facts.payload] = resource_ref(service, facts.payload)
        start_min = end_max = None
        traces_of_resource: set[bytes] = set()  # each gets the resource's attributes
        for ss in rs.scope_spans:
            scope = ss.scope.SerializeToString()
            scope_id = scope_ids.get(scope, _UNASKED)
            if scope_id is _UNASKED:
                scope_id = scope_ids[scope] = scope_ref(scope)
            for span in ss.spans:
                trace_id = span.trace_id
                span_id = span.span_id
                parent = span.parent_span_id or None
                name = span.name
                start = span.start_time_unix_nano
                end = span.end_time_unix_nano
                if start > MAX_STORED_NS:
                    start = MAX_STORED_NS
                if end > MAX_STORED_NS:
                    end = MAX_STORED_NS
                if end < start:
                    end = start  # a clock glitch must not produce negative durations
                status = span.status.code
                span_rows.append(
                    (
                        project,
                        trace_id,
                        span_id,
                        parent,
                        name,
                        span.kind,
                        start,
                        end,
                        end - start,
                        status,
                        call_id,
                        resource_id,
                        scope_id,
                        span.SerializeToString(),
                    )
                )
                add_name((name, trace_id))
                if call_id is not None:
                    add_call_trace((call_id, trace_id))
                trace = traces.get(trace_id)
                if trace is None:
                    trace = traces[trace_id] = [
                        trace_id,
                        call_id,
                        service,
                        start,
                        end,
                        end - start,
                        None,
                        None,
                        False,
                    ]
                else:
                    if trace[1] is None:
                        trace[1] = call_id
                    if start < trace[3]:
                        trace[3] = start
                    if end > trace[4]:
                        trace[4] = end
                    trace[5] = trace[4] - trace[3]
                if parent is None:
                    trace[6] = name
                    trace[7] = span_id
                if status == STATUS_ERROR:
                    trace[8] = True
                attrs = trace_attrs.get(trace_id)
                if attrs is None:
                    attrs = trace_attrs[trace_id] = set()
                if trace_id not in traces_of_resource:
                    traces_of_resource.add(trace_id)
                    attrs.update(resource_attrs)
                add_attr = attrs.add
                # attribute_text, inlined: this loop runs for every attribute.
                for kv in span.attributes:
                    value = kv.value
                    text = value.string_value  # most values are strings: one read decides
                    if text:
                        if len(text) <= MAX_INDEXED_VALUE:
                            add_attr((kv.key, text))
                        continue
                    kind = value.WhichOneof("value")
                    if kind == "double_value":
                        number = value.double_value
                        text = str(int(number)) if number.is_integer() else repr(number)
                    elif kind == "int_value":
                        text = str(value.int_value)
                    elif kind == "bool_value":
                        text = "true" if value.bool_value else "false"
                    elif kind != "string_value":  # unset, bytes, arrays, maps
                        continue
                    add_attr((kv.key, text))
                if start_min is None or start < start_min:
                    start_min = start
                if end_max is None or end > end_max:
                    end_max = end
        if call_id is not None and start_min is not None and end_max is not None:
            _add_call(rows.calls, facts, now, start_min, end_max)
    return rows


async def expire_periodically(
    component_id: str,
    retention: float,
    check_interval: float,
    expire: Callable[[int], Awaitable[int]],
) -> None:
    """Call ``expire(cutoff_ns)`` every ``check_interval`` seconds with the time before
    which data is older than ``retention`` seconds; failures are logged, never fatal."""
    while True:
        try:
            deleted = await expire(time.time_ns() - int(retention * 1e9))
            if deleted:
                log.info("%s: retention deleted %d spans", component_id, deleted)
        except Exception:
            log.exception("%s: retention failed", component_id)
        await asyncio.sleep(check_interval)
