"""``correlate``: link every span to the voice call it belongs to.

The call key is the resource attribute ``livekit.room.id`` (the LiveKit room SID) first,
then, in order, the attributes listed in ``keys`` (``roark.external_id``,
``vapi.call.id``, Pipecat's ``conversation.id``, LiveKit's ``gen_ai.conversation.id``),
looked up on the resource and then on each span. The call id is derived from
(project, key value), so every collector instance computes the same id for the same
room. It is written on the resource as ``calltrace.call.id`` (with the key's value and
attribute name as ``calltrace.call.key`` / ``calltrace.call.source``), where exporters
find it. Spans without a key pass through without a call and are never dropped; spans
of a trace whose call is already known (Pipecat's stt/llm/tts spans, which carry no
``conversation.id``) inherit the call of their trace.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pydantic import Field

from collector import ComponentConfig, Duration, Host, Processor, SpanBatch
from collector.calls import CallActivity, CallRecord, CallStore, SQLiteCallStore, call_id_for
from collector.spans import (
    CALL_ID_ATTRIBUTE,
    CALL_KEY_ATTRIBUTE,
    CALL_SOURCE_ATTRIBUTE,
    ResourceSpans,
    Span,
    any_value_to_python,
)

log = logging.getLogger(__name__)

_STAMP_SET = frozenset((CALL_ID_ATTRIBUTE, CALL_KEY_ATTRIBUTE, CALL_SOURCE_ATTRIBUTE))


class CorrelateConfig(ComponentConfig):
    room_attribute: str = "livekit.room.id"
    """Resource attribute tried first: the LiveKit room SID."""
    keys: list[str] = Field(
        default_factory=lambda: [
            "roark.external_id",
            "vapi.call.id",
            "conversation.id",
            "gen_ai.conversation.id",
        ]
    )
    """Further attributes tried in order, on the resource and then on each span."""
    store: Path | None = Path("./data/calltrace.db")
    """SQLite file holding call records; null keeps no records (ids are still assigned)."""
    cache_size: int = Field(default=10_000, ge=1)
    """Calls and traces remembered locally."""
    flush_interval: Duration = 1.0
    """How often last-seen times and span counts are written to the call store."""


class _LRU(OrderedDict[tuple[str, ...] | tuple[str, bytes], tuple[str, str, str]]):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key: tuple, value: tuple[str, str, str]) -> None:  # type: ignore[type-arg]
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)


class CorrelateProcessor(Processor):
    type_name = "correlate"
    Config = CorrelateConfig
    config: CorrelateConfig

    def __init__(self, component_id: str, config: CorrelateConfig):
        super().__init__(component_id, config)
        ordered = [config.room_attribute, *[k for k in config.keys if k != config.room_attribute]]
        self._rank = {key: index for index, key in enumerate(ordered)}
        self._span_rank = {key: index for index, key in enumerate(config.keys)}
        self._known_calls: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._traces = _LRU(config.cache_size)
        self._activity: dict[tuple[str, str], CallActivity] = {}
        self._creating: dict[tuple[str, str], asyncio.Future[None]] = {}
        self.store: CallStore | None = None
        self._flusher: asyncio.Task[None] | None = None

    def make_store(self) -> CallStore | None:
        """The call store this config asks for (subclasses and plugins may override)."""
        return SQLiteCallStore(self.config.store) if self.config.store is not None else None

    async def start(self, host: Host) -> None:
        self.store = self.make_store()
        if self.store is not None:
            await self.store.start()
            self._flusher = asyncio.create_task(self._flush_periodically())

    # -- finding the key ----------------------------------------------------------------

    def _best_key(self, attributes: object, rank: dict[str, int]) -> tuple[str, str] | None:
        best: tuple[int, str, str] | None = None
        for kv in attributes:  # type: ignore[attr-defined]
            position = rank.get(kv.key)
            if position is None or (best is not None and position >= best[0]):
                continue
            value = any_value_to_python(kv.value)
            if value is None or value == "":
                continue
            best = (position, str(value), kv.key)
        return None if best is None else (best[1], best[2])

    def _call_for_span(self, project: str, span: Span) -> tuple[str, str, str] | None:
        found = self._best_key(span.attributes, self._span_rank) if self._span_rank else None
        trace_key = (project, span.trace_id)
        if found is not None:
            call = (call_id_for(project, found[0]), found[0], found[1])
            self._traces.put(trace_key, call)
            return call
        return self._traces.get(trace_key)

    # -- processing ---------------------------------------------------------------------

    async def process(self, batch: SpanBatch) -> SpanBatch | None:
        project = batch.project or ""
        now = time.time_ns()
        result: list[ResourceSpans] = []
        new: dict[tuple[str, str], CallRecord] = {}
        for rs in batch.resource_spans:
            attributes = rs.resource.attributes
            _remove_stamps(attributes)  # never trust ids a client sent
            found = self._best_key(attributes, self._rank)
            if found is not None:
                key_value, source = found
                call_id = call_id_for(project, key_value)
                _stamp(rs, call_id, key_value, source)
                spans = sum(len(ss.spans) for ss in rs.scope_spans)
                self._seen(project, call_id, key_value, source, spans, now, new)
                result.append(rs)
                continue
            for piece, call in self._split_by_span_keys(project, rs):
                if call is not None:
                    call_id, key_value, source = call
                    _stamp(piece, call_id, key_value, source)
                    spans = sum(len(ss.spans) for ss in piece.scope_spans)
                    self._seen(project, call_id, key_value, source, spans, now, new)
                result.append(piece)
        batch.resource_spans = result
        if new:
            # Not awaited: the spans carry their call id whatever happens to the record, and
            # waiting on the store (which shares SQLite's one write lock with the storage
            # exporter) cost requests hundreds of milliseconds. ``flush`` and ``shutdown``
            # wait for creations; a failed one is tried again when the call is next seen.
            self._create(new)
        return batch

    def _split_by_span_keys(
        self, project: str, rs: ResourceSpans
    ) -> list[tuple[ResourceSpans, tuple[str, str, str] | None]]:
        """Group a resource's spans by the call their own attributes (or trace) name."""
        calls: list[tuple[str, str, str] | None] = []
        for ss in rs.scope_spans:
            calls.extend(self._call_for_span(project, span) for span in ss.spans)
        distinct = set(calls)
        if len(distinct) <= 1:
            return [(rs, calls[0] if calls else None)]
        groups: dict[tuple[str, str, str] | None, ResourceSpans] = {}
        index = 0
        for ss in rs.scope_spans:
            scopes: dict[tuple[str, str, str] | None, object] = {}
            for span in ss.spans:
                call = calls[index]
                index += 1
                piece = groups.get(call)
                if piece is None:
                    piece = groups[call] = ResourceSpans(
                        resource=rs.resource, schema_url=rs.schema_url
                    )
                scope = scopes.get(call)
                if scope is None:
                    scope = scopes[call] = piece.scope_spans.add(
                        scope=ss.scope, schema_url=ss.schema_url
                    )
                scope.spans.add().CopyFrom(span)  # type: ignore[attr-defined]
        return list((piece, call) for call, piece in groups.items())

    def _seen(
        self,
        project: str,
        call_id: str,
        key_value: str,
        source: str,
        spans: int,
        now: int,
        new: dict[tuple[str, str], CallRecord],
    ) -> None:
        """Count a call's spans; note a call to create in ``new`` unless it is known or
        being created."""
        key = (project, call_id)
        activity = self._activity.get(key)
        if activity is None:
            self._activity[key] = CallActivity(project, call_id, now, spans)
        else:
            activity.spans += spans
            activity.last_seen_ns = now
        if self.store is None or key in self._known_calls or key in new or key in self._creating:
            return
        new[key] = CallRecord(project, call_id, key_value, source, now, now)

    def _create(self, records: dict[tuple[str, str], CallRecord]) -> asyncio.Future[None]:
        """Create the records in the store, all at once (one transaction or round trip
        where the store supports it); the calls are known once it succeeds."""
        task = asyncio.ensure_future(self._create_records(list(records.values())))
        for key in records:
            self._creating[key] = task

        def done(task: asyncio.Future[None]) -> None:
            for key in records:
                self._creating.pop(key, None)
            if task.cancelled():
                return
            if task.exception() is not None:
                # Not known: the next request of these calls tries again.
                log.warning("%s: could not create call records: %r", self.id, task.exception())
                return
            for key in records:
                self._known_calls[key] = None
            while len(self._known_calls) > self.config.cache_size:
                self._known_calls.popitem(last=False)

        task.add_done_callback(done)
        return task

    async def _create_records(self, records: list[CallRecord]) -> None:
        store = self.store
        assert store is not None
        create_many = getattr(store, "create_many", None)
        if create_many is not None:
            await create_many(records)
        else:
            await asyncio.gather(*(store.create(record) for record in records))

    async def flush(self) -> None:
        """Write pending last-seen times and span counts to the call store (after the
        records being created exist)."""
        if self.store is None:
            return
        creating = set(self._creating.values())
        if creating:
            await asyncio.gather(*creating, return_exceptions=True)
        if not self._activity:
            return
        activity, self._activity = list(self._activity.values()), {}
        await self.store.record_activity(activity)

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_interval)
            try:
                await self.flush()
            except Exception:
                log.exception("%s: could not update call records", self.id)

    async def shutdown(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        if self.store is not None:
            await self.flush()
            await self.store.close()
            self.store = None


def _remove_stamps(attributes: Any) -> None:
    """Drop every ``calltrace.call.*`` attribute, in one pass (fixture-shaped traffic has
    a resource for every few spans, so this runs often)."""
    found = [index for index, kv in enumerate(attributes) if kv.key in _STAMP_SET]
    for index in reversed(found):
        del attributes[index]


def _stamp(rs: ResourceSpans, call_id: str, key_value: str, source: str) -> None:
    """Add the call attributes (``_remove_stamps`` ran first, so none is there yet)."""
    attributes = rs.resource.attributes
    for key, value in (
        (CALL_ID_ATTRIBUTE, call_id),
        (CALL_KEY_ATTRIBUTE, key_value),
        (CALL_SOURCE_ATTRIBUTE, source),
    ):
        kv = attributes.add()
        kv.key = key
        kv.value.string_value = value
