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
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from collector.documents import MAX_INDEXED_VALUE, attribute_text, json_document
from collector.query import TAG_PREFIX
from collector.resource_facts import _facts_of, _ResourceFacts, resource_attributes
from collector.spans import SpanBatch
from collector.sqlite_files import (
    BackgroundCheckpointer,
    SQLiteWriter,
    file_of,
    open_sqlite,
    sqlite_error,
    write_lock,
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
    "resource_attributes",
    "sqlite_error",
    "write_lock",
]


log = logging.getLogger(__name__)


STATUS_ERROR = 2


MAX_STORED_NS = 2**63 - 1
"""The latest span time the rows hold (in 2262): SQLite's and PostgreSQL's integers are
signed 64-bit, OTLP's times unsigned. A later time (a client's bug, but valid OTLP) is
stored as this in the time columns; the span's own bytes keep it as sent."""


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
