"""The call records ``correlate`` keeps in its call store: each new call's record
created in the background, and each call's last-seen time and span count written by a
periodic flush. The call id never depends on the store: while it is unreachable, records
wait locally (at most ``cache_size``) and are retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from collector.calls import CallActivity, CallRecord, CallStore

# The processor's logger, whichever of its modules logs.
log = logging.getLogger("processors.correlate")


class CallRecords:
    """The records and activity of the calls one ``correlate`` processor sees, for its
    call store ``store`` (None until started, and after ``close``; with None, nothing
    is written)."""

    WRITE_WAIT = 10.0
    """Seconds a flush waits for a previous flush's write to the store to finish."""

    CREATE_INTERVAL = 0.25
    """Seconds from the start of one creation of call records to the next, at least."""

    def __init__(
        self,
        owner_id: str,
        cache_size: int,
        flush_interval: float,
        store_retry_interval: float,
    ):
        self.id = owner_id
        self.store: CallStore | None = None
        self._cache_size = cache_size
        self._flush_interval = flush_interval
        self._store_retry_interval = store_retry_interval
        self._known_calls: OrderedDict[tuple[str, str], CallRecord] = OrderedDict()
        """Calls whose record exists in the store, with the record first written."""
        self._activity: dict[tuple[str, str], CallActivity] = {}
        self._creating: dict[tuple[str, str], asyncio.Future[None]] = {}
        """Records being created or waiting to be, each with a future done once it is."""
        self._creation: asyncio.Future[None] | None = None
        self._waiting_records: dict[tuple[str, str], CallRecord] = {}
        """New records waiting for the next creation (see ``create``)."""
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
        self._flusher: asyncio.Task[None] | None = None

    async def start(self, store: CallStore | None) -> None:
        """Start ``store`` and the periodic flush; None keeps no records."""
        self.store = store
        if store is not None:
            await store.start()
            self._flusher = asyncio.create_task(self._flush_periodically())

    def seen(
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

    def create(self, records: dict[tuple[str, str], CallRecord]) -> None:
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
        if len(self._unsaved) > self._cache_size:
            forgotten = next(iter(self._unsaved))
            del self._unsaved[forgotten]
            log.warning("%s: too many unsaved call records; forgot %s/%s", self.id, *forgotten)

    def _remember(self, key: tuple[str, str], record: CallRecord) -> None:
        self._known_calls[key] = record
        if len(self._known_calls) > self._cache_size:
            self._known_calls.popitem(last=False)

    def _store_failed(self, exc: Exception) -> None:
        """Note an unreachable store: records wait locally and are retried later."""
        if not self._store_down:
            log.warning(
                "%s: call store unreachable, call records wait and are retried: %r", self.id, exc
            )
            self._store_down = True
        self._store_down_until = time.monotonic() + self._store_retry_interval

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
            await asyncio.sleep(self._flush_interval)
            try:
                await self.flush()
            except Exception as exc:
                self._store_failed(exc)

    async def close(self) -> None:
        """Stop the periodic flush, flush what is pending, and close the store."""
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
