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

from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from pydantic import Field

from collector import (
    CALL_ID_ATTRIBUTE,
    CALL_KEY_ATTRIBUTE,
    CALL_SOURCE_ATTRIBUTE,
    BatchEntry,
    ComponentConfig,
    Duration,
    Host,
    Processor,
    ResourceSpans,
    Span,
    SpanBatch,
    any_value_to_python,
    span_count,
)
from collector.calls import (
    CallActivity,
    CallRecord,
    CallStore,
    call_id_for,
    get_records,
    make_call_store,
)
from collector.redisconn import CorrelateRedisConfig

log = logging.getLogger(__name__)

_STAMP_SET = frozenset((CALL_ID_ATTRIBUTE, CALL_KEY_ATTRIBUTE, CALL_SOURCE_ATTRIBUTE))

_ResourceOutcome = tuple[tuple[str, str, str] | None, bytes | None]
"""The call a resource names (or None) and its bytes once edited (None: unchanged)."""


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

    WRITE_WAIT = 10.0
    """Seconds a flush waits for a previous flush's write to the store to finish."""

    def __init__(self, component_id: str, config: CorrelateConfig):
        super().__init__(component_id, config)
        ordered = [config.room_attribute, *[k for k in config.keys if k != config.room_attribute]]
        self._rank = {key: index for index, key in enumerate(ordered)}
        self._span_rank = {key: index for index, key in enumerate(config.keys)}
        self._known_calls: OrderedDict[tuple[str, str], CallRecord] = OrderedDict()
        """Calls whose record exists in the store, with the record first written."""
        self._traces = _LRU(config.cache_size)
        self._resources: dict[tuple[str, bytes], _ResourceOutcome] = {}
        """What correlating a resource gave, by project and the resource's serialized bytes
        (see ``_correlate_resource``)."""
        self._activity: dict[tuple[str, str], CallActivity] = {}
        self._creating: dict[tuple[str, str], asyncio.Future[None]] = {}
        """Records being created or waiting to be, each with a future done once it is."""
        self._creation: asyncio.Future[None] | None = None
        self._waiting_records: dict[tuple[str, str], CallRecord] = {}
        """New records waiting for the next creation (see ``_create``)."""
        self._waiting_created: asyncio.Future[None] | None = None
        self._creation_timer: asyncio.TimerHandle | None = None
        self._last_creation = float("-inf")
        self._hurry = 0
        """Flushes waiting for creations: while one waits, none waits for its interval."""
        self._writing: asyncio.Future[None] | None = None
        self._unsaved: dict[tuple[str, str], CallRecord] = {}
        """Records not yet created because the store was unreachable; retried by the flusher."""
        self._store_down_until = 0.0
        self._store_down = False
        self.store: CallStore | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._skipped_marks: OrderedDict[tuple[str, str], tuple[bool, float]] = OrderedDict()
        self._telemetry: Any = None
        self._drop_skipped: bool | None = None

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
        # Each piece: an entry of the batch (its call named by its resource), or a
        # message whose spans name its call (a resource's spans split by call).
        pieces: list[tuple[BatchEntry | ResourceSpans, tuple[str, str, str] | None]] = []
        for entry in batch.entries():
            call, edited = self._correlate_resource(project, entry.resource_bytes)
            if edited is not None:
                entry.set_resource(edited)
            if call is not None:
                pieces.append((entry, call))
            else:
                pieces += self._split_by_span_keys(project, entry.message)
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
                    _stamp(piece.resource.attributes, call_id, key_value, source)
                if call_id in skipped:
                    dropped += spans
                    continue
                self._seen(project, call_id, key_value, source, spans, now, new)
            result.append(piece)
        if new:
            self._create(new)
        if dropped and self._telemetry is not None:
            self._telemetry.dropped(self.id, dropped)
        batch.keep(result)
        return batch if result else None

    def _correlate_resource(
        self, project: str, raw: bytes
    ) -> tuple[tuple[str, str, str] | None, bytes | None]:
        """The call a resource serialized as ``raw`` names, if any (``(call_id,
        key_value, source)``; else None, and the call is looked for on each span), and
        its bytes once client-sent call attributes are removed and, with a call, the
        call's are stamped (None: unchanged).

        A request holds many resources with the same attributes (every batch of spans an
        agent exports repeats its resource), so the outcome is remembered by the
        resource's bytes.
        """
        outcome = self._resources.get((project, raw))
        if outcome is not None:
            return outcome
        resource = Resource.FromString(raw)
        attributes = resource.attributes
        removed = _remove_stamps(attributes)  # never trust ids a client sent
        found = self._best_key(attributes, self._rank)
        call = None
        if found is not None:
            call = (call_id_for(project, found[0]), *found)
            _stamp(attributes, *call)
        edited = resource.SerializeToString() if found is not None or removed else None
        if len(self._resources) >= self.config.cache_size:
            del self._resources[next(iter(self._resources))]  # the oldest
        self._resources[(project, raw)] = (call, edited)
        return call, edited

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
        """Count a call's spans; note a call to create in ``new`` unless it is known,
        being created or waiting for the store."""
        key = (project, call_id)
        activity = self._activity.get(key)
        if activity is None:
            self._activity[key] = CallActivity(project, call_id, now, spans)
        else:
            activity.spans += spans
            activity.last_seen_ns = now
        if (
            self.store is None
            or key in self._known_calls
            or key in self._unsaved
            or key in self._creating
            or key in new
        ):
            return
        record = CallRecord(project, call_id, key_value, source, now, now)
        if time.monotonic() < self._store_down_until:
            self._defer(key, record)
        else:
            new[key] = record

    def _create(self, records: dict[tuple[str, str], CallRecord]) -> None:
        """Create a request's new call records in the background (one transaction or
        round trip where the store supports it). Not awaited: the spans carry their call
        id whatever happens to the record, and waiting on the store (which shares
        SQLite's one write lock with the storage exporter) would hold requests up.
        Creations start at most every ``CREATE_INTERVAL``: the records of the requests
        meanwhile wait and go together, rather than one transaction a request, each
        waiting for the span writer's lock and holding it up in turn.
        ``flush`` and ``shutdown`` wait for creations (and start a waiting one at once);
        records a failed creation leaves wait in ``_unsaved`` for the flusher."""
        if self._waiting_created is None:
            self._waiting_created = asyncio.get_running_loop().create_future()
        self._waiting_records.update(records)
        for key in records:
            self._creating[key] = self._waiting_created
        self._schedule_creation()

    CREATE_INTERVAL = 0.25
    """Seconds from the start of one creation of call records to the next, at least."""

    def _schedule_creation(self) -> None:
        """Start creating the waiting records, now or once ``CREATE_INTERVAL`` since the
        last start has passed; nothing if one runs (its end schedules the next)."""
        if self._creation is not None or self._creation_timer is not None:
            return
        wait = self._last_creation + self.CREATE_INTERVAL - time.monotonic()
        if wait <= 0 or self._hurry:
            self._start_creation()
        else:
            loop = asyncio.get_running_loop()
            self._creation_timer = loop.call_later(wait, self._start_creation)

    def _start_creation(self) -> None:
        """Create the waiting records; when that is done, the ones that came meanwhile."""
        self._creation_timer = None
        self._last_creation = time.monotonic()
        records, self._waiting_records = self._waiting_records, {}
        created, self._waiting_created = self._waiting_created, None
        assert created is not None
        task = self._creation = asyncio.ensure_future(self._create_records(list(records.values())))

        def done(task: asyncio.Future[None]) -> None:
            self._creation = None
            for key in records:
                self._creating.pop(key, None)
            failure = None if task.cancelled() else task.exception()
            if task.cancelled() or failure is not None:
                if failure is not None:
                    self._store_failed(failure)  # type: ignore[arg-type]
                for key, record in records.items():
                    self._defer(key, record)
            else:
                for key, record in records.items():
                    self._remember(key, record)
                self._store_reachable()
            if not created.done():  # (a cancelled flush may have cancelled it)
                created.set_result(None)  # the outcome is handled here, never raised
            if self._waiting_records:
                self._schedule_creation()

        task.add_done_callback(done)

    def _hurry_creations(self) -> None:
        """Start the waiting creation now, not when its interval ends."""
        if self._creation_timer is not None:
            self._creation_timer.cancel()
            self._creation_timer = None
            self._start_creation()

    async def _create_records(self, records: list[CallRecord]) -> None:
        store = self.store
        assert store is not None
        create_many = getattr(store, "create_many", None)
        if create_many is not None:
            await create_many(records)
        else:
            await asyncio.gather(*(store.create(record) for record in records))

    def _defer(self, key: tuple[str, str], record: CallRecord) -> None:
        """Keep a record to create once the store is back, at most ``cache_size`` of them:
        past that the oldest is forgotten (the next span of its call brings it back)."""
        self._unsaved[key] = record
        if len(self._unsaved) > self.config.cache_size:
            forgotten = next(iter(self._unsaved))
            del self._unsaved[forgotten]
            log.warning("%s: too many unsaved call records; forgot %s/%s", self.id, *forgotten)

    def _remember(self, key: tuple[str, str], record: CallRecord) -> None:
        self._known_calls[key] = record
        if len(self._known_calls) > self.config.cache_size:
            self._known_calls.popitem(last=False)

    def _store_failed(self, exc: Exception) -> None:
        """Note an unreachable store: records wait locally and are retried later."""
        if not self._store_down:
            log.warning(
                "%s: call store unreachable, call records wait and are retried: %r", self.id, exc
            )
            self._store_down = True
        self._store_down_until = time.monotonic() + self.config.store_retry_interval

    def _store_reachable(self) -> None:
        self._store_down_until = 0.0
        if self._store_down:
            log.info("%s: call store reachable again", self.id)
            self._store_down = False

    async def flush(self) -> None:
        """Create records that are waiting, then write pending last-seen times and span
        counts to the call store. What cannot be written stays pending for the next try."""
        if self.store is None:
            return
        if self._writing is not None and not self._writing.done():
            # The previous write, left running by a cancelled flush: its outcome first.
            done, _ = await asyncio.wait({self._writing}, timeout=self.WRITE_WAIT)
            if not done:  # hung: cancelled, its counts go back to pending
                self._writing.cancel()
            await asyncio.gather(self._writing, return_exceptions=True)
        creating = set(self._creating.values())
        if creating:
            self._hurry += 1
            try:
                self._hurry_creations()
                await asyncio.gather(*creating, return_exceptions=True)
            finally:
                self._hurry -= 1
        while self._unsaved:
            key, record = next(iter(self._unsaved.items()))
            await self.store.create(record)
            del self._unsaved[key]
            self._remember(key, record)
            self._store_reachable()
        # Counts of a call whose record is still being created wait for the next flush.
        activity = {k: a for k, a in self._activity.items() if k in self._known_calls}
        if not activity:
            return
        self._activity = {k: a for k, a in self._activity.items() if k not in activity}
        # Shielded, and awaited by the next flush: cancelling the periodic flush (at
        # shutdown) must not put back counts the store may already have applied, or the
        # final flush would count those spans twice.
        self._writing = asyncio.ensure_future(self._write_activity(activity))
        await asyncio.shield(self._writing)

    async def _write_activity(self, activity: dict[tuple[str, str], CallActivity]) -> None:
        assert self.store is not None
        try:
            missing = await self.store.record_activity(list(activity.values()))
        except BaseException:
            for key, pending in activity.items():  # merge back what arrived meanwhile
                newer = self._activity.get(key)
                if newer is not None:
                    pending.spans += newer.spans
                    pending.last_seen_ns = max(pending.last_seen_ns, newer.last_seen_ns)
                self._activity[key] = pending
            raise
        self._store_reachable()
        now = time.time_ns()
        for key in missing or ():
            # The record expired or was lost with the store (a Redis restart without
            # persistence): create it again; its counts follow on the next flush.
            seed = self._known_calls.pop(key, None)
            if seed is None:
                continue
            log.info("%s: call record %s/%s was missing; creating it again", self.id, *key)
            self._unsaved[key] = CallRecord(
                seed.project, seed.call_id, seed.room_id, seed.source, now, now
            )
            pending = activity[key]
            newer = self._activity.get(key)
            if newer is not None:
                pending.spans += newer.spans
                pending.last_seen_ns = max(pending.last_seen_ns, newer.last_seen_ns)
            self._activity[key] = pending

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_interval)
            try:
                await self.flush()
            except Exception as exc:
                self._store_failed(exc)

    async def shutdown(self) -> None:
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            await _stop(flusher)
        if self.store is not None:
            try:
                await self.flush()
            except Exception as exc:
                log.error(
                    "%s: call records not saved at shutdown (%d calls): %s",
                    self.id,
                    len(self._unsaved) + len(self._activity),
                    exc,
                )
            if self._creation_timer is not None:  # records after the last flush: unsaved
                self._creation_timer.cancel()
            await self.store.close()
            self.store = None


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it. A client library that swallows the cancellation
    (redis-py may, mid-reconnect) gets cancelled again rather than hanging shutdown."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled():
        task.exception()


def _remove_stamps(attributes: Any) -> bool:
    """Drop every ``calltrace.call.*`` attribute, in one pass; whether there was one."""
    found = [index for index, kv in enumerate(attributes) if kv.key in _STAMP_SET]
    for index in reversed(found):
        del attributes[index]
    return bool(found)


def _stamp(attributes: Any, call_id: str, key_value: str, source: str) -> None:
    """Add the call attributes (``_remove_stamps`` ran first, so none is there yet)."""
    for key, value in (
        (CALL_ID_ATTRIBUTE, call_id),
        (CALL_KEY_ATTRIBUTE, key_value),
        (CALL_SOURCE_ATTRIBUTE, source),
    ):
        kv = attributes.add()
        kv.key = key
        kv.value.string_value = value
