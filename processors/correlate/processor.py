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

The call record (first seen, source, span count, skipped) lives in the embedded SQLite
file (``store``), or, with ``redis:``, in Redis, shared by every collector instance
(first writer wins; ``ttl`` after the last span it expires), copied into ``store``
when that is set too. A local cache remembers which calls exist, so Redis is asked
once per call and instance. The call id never depends on the store: while the store is
unreachable, spans keep flowing with their call id, and the record writes are retried
in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pydantic import Field

from collector import (
    BatchEntry,
    ComponentConfig,
    Duration,
    Host,
    Processor,
    ResourceSpans,
    SpanBatch,
    span_count,
)
from collector.calls import CallRecord, CallStore, get_records, make_call_store
from collector.redisconn import CorrelateRedisConfig
from processors.correlate.call_keys import Call, CallKeys, stamp
from processors.correlate.call_records import CallRecords

# The processor's logger, whichever of its modules logs.
log = logging.getLogger("processors.correlate")


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
    redis: CorrelateRedisConfig | None = None
    """Keep call records in Redis, shared by every instance (``store`` then holds a copy)."""
    store_timeout: Duration = 0.5
    """How long a request waits for its call's record to be created; past it the record
    is created in the background and the request goes on."""
    store_retry_interval: Duration = 1.0
    """While the call store is unreachable, how long before it is tried again."""
    drop_skipped_calls: bool | None = None
    """Drop the spans of calls marked skipped in the call store (by a LiveKit webhook whose
    room metadata carries ``roark.skip``); counted in ``calltrace_processor_dropped_spans``.
    Unset: on when the service has a ``livekit_webhook`` receiver, which is what marks
    calls (the check reads the store for a batch's calls not checked in the last
    ``skipped_check_interval``, all in one query or round trip)."""
    skipped_check_interval: Duration = 5.0
    """How long a call's skipped mark is cached before the store is asked again."""


class CorrelateProcessor(Processor):
    type_name = "correlate"
    Config = CorrelateConfig
    config: CorrelateConfig

    def __init__(self, component_id: str, config: CorrelateConfig):
        super().__init__(component_id, config)
        self.keys = CallKeys(config.room_attribute, config.keys, config.cache_size)
        self.records = CallRecords(
            component_id, config.cache_size, config.flush_interval, config.store_retry_interval
        )
        self._skipped_marks: OrderedDict[tuple[str, str], tuple[bool, float]] = OrderedDict()
        self._telemetry: Any = None
        self._drop_skipped: bool | None = None

    @property
    def store(self) -> CallStore | None:
        """The call store, once started (None: no records kept, or shut down)."""
        return self.records.store

    def make_store(self) -> CallStore | None:
        """The call store this config asks for (subclasses and plugins may override)."""
        config = self.config
        if config.redis is None:
            return make_call_store(config.store)
        return make_call_store(
            config.store, config.redis, config.redis.ttl, config.redis.key_prefix
        )

    async def start(self, host: Host) -> None:
        self._telemetry = host.telemetry
        self._drop_skipped = self.config.drop_skipped_calls
        if self._drop_skipped is None:
            receivers = getattr(host, "receivers", {}).values()
            self._drop_skipped = any(r.type_name == "livekit_webhook" for r in receivers)
        await self.records.start(self.make_store())

    # -- processing ---------------------------------------------------------------------

    async def process(self, batch: SpanBatch) -> SpanBatch | None:
        project = batch.project or ""
        now = time.time_ns()
        # Each piece: an entry of the batch (its call named by its resource), or a
        # message whose spans name its call (a resource's spans split by call).
        pieces: list[tuple[BatchEntry | ResourceSpans, Call | None]] = []
        for entry in batch.entries():
            call, edited = self.keys.for_resource(project, entry.resource_bytes)
            if edited is not None:
                entry.set_resource(edited)
            if call is not None:
                pieces.append((entry, call))
            else:
                pieces += self.keys.split_by_span_keys(project, entry.message)
        skipped = await self._skipped_calls(project, {c[0] for _, c in pieces if c})
        result: list[BatchEntry | ResourceSpans] = []
        dropped = 0
        new: dict[tuple[str, str], CallRecord] = {}
        for piece, call in pieces:
            if call is not None:
                call_id, key_value, source = call
                if isinstance(piece, BatchEntry):
                    spans = piece.span_count
                else:  # the call came from the spans
                    spans = span_count(piece)
                    stamp(piece.resource.attributes, call_id, key_value, source)
                if call_id in skipped:
                    dropped += spans
                    continue
                self.records.seen(project, call_id, key_value, source, spans, now, new)
            result.append(piece)
        if new:
            self.records.create(new)
        if dropped and self._telemetry is not None:
            self._telemetry.dropped(self.id, dropped)
        batch.keep(result)
        return batch if result else None

    async def _skipped_calls(self, project: str, call_ids: set[str]) -> set[str]:
        """Which of ``call_ids`` the call store marks skipped (each cached for
        ``skipped_check_interval``). The calls not in the cache are read at once: one
        query or round trip a batch, not one per call (a request of new calls waited
        for each read in turn)."""
        skipped: set[str] = set()
        if self.store is None or not self._drop_skipped or not call_ids:
            return skipped
        marks = self._skipped_marks
        now = time.monotonic()
        unknown: list[str] = []
        for call_id in call_ids:
            cached = marks.get((project, call_id))
            if cached is not None and cached[1] > now:
                if cached[0]:
                    skipped.add(call_id)
            else:
                unknown.append(call_id)
        if not unknown:
            return skipped
        try:
            records = await asyncio.wait_for(
                get_records(self.store, project, unknown), self.config.store_timeout
            )
        except Exception as exc:  # an unreachable store never stops spans
            log.debug("%s: could not read %d calls: %r", self.id, len(unknown), exc)
            for call_id in unknown:
                cached = marks.get((project, call_id))
                if cached is not None and cached[0]:
                    skipped.add(call_id)
            return skipped
        until = now + self.config.skipped_check_interval
        for call_id in unknown:
            record = records.get(call_id)
            mark = record is not None and record.skipped
            key = (project, call_id)
            marks[key] = (mark, until)
            marks.move_to_end(key)
            if mark:
                skipped.add(call_id)
        while len(marks) > self.config.cache_size:
            marks.popitem(last=False)
        return skipped

    async def flush(self) -> None:
        """Create records that are waiting, then write pending last-seen times and span
        counts to the call store. What cannot be written stays pending for the next try."""
        await self.records.flush()

    async def shutdown(self) -> None:
        await self.records.close()
