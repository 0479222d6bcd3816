"""The sending queue in front of one exporter: room and accounting in spans, consumers
that merge queued batches and hand them to the retry sender, and, with
``sending_queue.storage: DIR``, the persistent queue.

A persistent queue appends each batch to its log (``disk_queue``) before the request is
answered, so a crash or restart delivers it later. Every read and write of the log runs
on a thread of its own: a write may wait on the disk (the kernel throttles writers when
dirty pages pile up), and the event loop goes on receiving in the meantime.

Queued batches are held serialized (an ``ExportTraceServiceRequest`` body), not as
parsed messages: about a fifth of the memory, and no objects for the cyclic garbage
collector to scan. Serialized requests concatenate into one valid request, so merging
queued batches is a ``join``; the exporter gets them as a ``SpanBatch`` that is parsed
only if it asks for messages. The one exception is a batch put on a queue where nothing
waits (the first queue of a pipeline): it is exported next, so the batch itself is
handed over, without a parse.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collector.components import Exporter, RefusedError
from collector.exporterhelper.config import QueueSettings, RetrySettings
from collector.exporterhelper.disk_queue import _DiskQueue
from collector.exporterhelper.retry import Outcome, RetrySender, _KeptForNextStart
from collector.spans import SpanBatch

if TYPE_CHECKING:
    from collector.telemetry import Telemetry

# The helper's one logger, whichever of its modules logs.
log = logging.getLogger("collector.exporterhelper")

__all__ = ["ExporterQueue"]


class _QueueItem:
    __slots__ = ("batch", "key", "metadata", "payload", "project", "received_ns", "spans")

    def __init__(
        self,
        payload: bytes | None,
        spans: int,
        project: str | None,
        metadata: dict[str, str] | None = None,
        received_ns: int = 0,
        key: int | None = None,
    ):
        self.payload = payload  # a serialized ExportTraceServiceRequest; None: on disk only
        self.spans = spans
        self.project = project
        self.metadata = metadata or {}
        self.received_ns = received_ns
        self.key = key  # its key in the persistent queue
        self.batch: SpanBatch | None = None  # the pipeline's batch itself, handed over


class ExporterQueue:
    """The sending queue in front of one exporter, for one signal, and its retry sender.

    ``signal`` (``traces``, ``logs``, ``metrics``) picks the batch type the queued bytes
    are parsed into and the exporter's method (``export``, ``export_logs``,
    ``export_metrics``); an exporter in pipelines of several signals has a queue for
    each, with the same settings (a persistent one in ``DIR/{exporter}.{signal}.queue``
    for logs and metrics)."""

    def __init__(
        self, exporter: Exporter, telemetry: Telemetry | None = None, signal: str = "traces"
    ):
        from collector.signals import batch_type

        config: Any = exporter.config
        self.exporter = exporter
        self.signal = signal
        self._batch_type = batch_type(signal)
        self.queue_settings: QueueSettings = getattr(config, "sending_queue", QueueSettings())
        self.telemetry = telemetry
        self._items: deque[_QueueItem] = deque()
        self._queued_spans = 0
        self._in_flight = 0
        self._storing = 0
        """Items being written to the persistent queue (counted in ``_queued_spans``)."""
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._consumers: list[asyncio.Task[None]] = []
        self._closing = False
        self._shutting_down = asyncio.Event()
        self._disk: _DiskQueue | None = None
        self._retry = RetrySender(
            exporter,
            "export" if signal == "traces" else f"export_{signal}",
            self.id,
            getattr(config, "retry_on_failure", RetrySettings()),
            getattr(config, "timeout", 30.0),
            telemetry,
            self._shutting_down,
            persistent=lambda: self._disk is not None and self.queue_settings.enabled,
        )
        self._shedding = False
        """Whether its full queue drops new batches (``past_budget``), logged once."""

    @property
    def id(self) -> str:
        if self.signal == "traces":
            return self.exporter.id
        return f"{self.exporter.id}.{self.signal}"

    @property
    def size(self) -> int:
        """Spans waiting or being exported."""
        return self._queued_spans

    @property
    def capacity(self) -> int:
        return self.queue_settings.queue_size

    HIGH_WATER = 0.95
    """Above this share of its capacity a queue refuses requests before they are read."""

    def nearly_full(self) -> bool:
        return (
            self.queue_settings.enabled
            and self._queued_spans >= self.HIGH_WATER * self.capacity
            and not self.past_budget()
        )

    def has_room(self, spans: int) -> bool:
        """Whether ``enqueue`` takes ``spans`` more: queued, or shed (see ``past_budget``)."""
        if not self.queue_settings.enabled:
            return True
        # A batch larger than the whole queue is admitted when the queue is empty, so an
        # oversized request cannot be refused forever.
        return self._fits(spans) or self.past_budget()

    def past_budget(self) -> bool:
        """Whether the exporter has failed for longer than ``retry_on_failure`` allows
        (see ``RetrySender.past_budget``): its full queue then sheds new batches."""
        return self._retry.past_budget()

    def _fits(self, spans: int) -> bool:
        return self._queued_spans == 0 or self._queued_spans + spans <= self.capacity

    def _shed(self, spans: int) -> None:
        if not self._shedding:
            self._shedding = True
            log.error(
                "%s: has failed for longer than its retry_on_failure budget and its queue is"
                " full: new batches are dropped for it until an export succeeds",
                self.id,
            )
        self._retry.count_failed(spans)

    async def start(self) -> None:
        storage = self.queue_settings.storage
        if storage is not None:
            self._disk = _DiskQueue(Path(storage), self.id)
            now = time.time_ns()
            recovered = [
                _QueueItem(None, left.spans, left.project, received_ns=now, key=left.key)
                for left in self._disk.load()
            ]
            for item in recovered:
                self._push(item)
            if recovered:
                log.info("%s: %d batches recovered from %s", self.id, len(recovered), storage)
        for _ in range(self.queue_settings.num_consumers):
            self._consumers.append(asyncio.create_task(self._consume()))

    async def put(
        self,
        batch: SpanBatch,
        spans: int | None = None,
        payload: bytes | None = None,
        hand_over: bool = False,
    ) -> None:
        """Queue ``batch`` (persisted first when a storage dir is set), or export it now
        when the queue is disabled. ``payload`` is the batch already serialized (by
        ``SpanBatch.serialize``), when the caller fans one batch out to several
        queues. ``hand_over``: the caller gives up ``batch``'s messages (edits them no
        more, gives them to no other queue), so the queue may export them as they are."""
        spans = batch.span_count if spans is None else spans
        if not self.queue_settings.enabled:
            await self._export(batch, spans)
            return
        stored = self.enqueue(batch, spans, payload, hand_over)
        if stored is not None:
            await asyncio.shield(stored)

    def enqueue(
        self,
        batch: SpanBatch,
        spans: int,
        payload: bytes | None = None,
        hand_over: bool = False,
    ) -> asyncio.Future[None] | None:
        """Queue ``batch`` on an enabled queue, checking for room and counting its spans
        at once; with a persistent queue, returns a future done once the batch is on
        disk (the item joins the queue then, whoever waits for it or not), else None.
        ``hand_over`` as for ``put``.

        Refuses (``RefusedError``) before any await, so ``FanOut`` can queue a batch on
        every exporter's queue or on none."""
        if self._closing:
            raise RefusedError(f"exporter {self.id} is shutting down", retry_after=5.0)
        if not self.has_room(spans):
            raise RefusedError(f"sending queue of exporter {self.id} is full")
        if not self._fits(spans):  # past its budget: shed, do not refuse
            self._shed(spans)
            return None
        item = _QueueItem(payload, spans, batch.project, batch.metadata, batch.received_ns)
        near_head = self._queued_spans < 2 * self.queue_settings.batch_max_spans
        if hand_over and not self._items and not self._storing:
            # Nothing waits: the consumer exports this batch next, so keep it rather than
            # parse its bytes back. Only then: parsed messages take about three times the
            # memory of their bytes, too much for a backlog.
            item.batch = batch
            if self._disk is None:
                item.payload = None  # in memory only: the batch has its bytes if asked
                self._push(item)
                return None
        if payload is None:
            payload = item.payload = batch.serialize()
        if self._disk is None:
            self._push(item)
            return None
        # Far from the head the bytes wait on disk only, so a persistent queue can hold
        # a long outage's worth of spans in bounded memory; near it, they are in memory
        # (as bytes or as messages) for the consumer.
        keep_payload = near_head and item.batch is None
        self._queued_spans += spans  # room is taken now; the item joins once on disk
        self._storing += 1
        self._idle.clear()
        written = self._disk.run(self._disk.append, item.project, spans, payload)
        stored: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_disk(written: asyncio.Future[int]) -> None:
            self._storing -= 1
            failure = None if written.cancelled() else written.exception()
            if written.cancelled() or failure is not None:
                self._queued_spans -= spans
                self._report_size()
                self._set_idle_if_idle()
                if stored.done():  # cancelled by its waiter
                    pass
                elif failure is not None:
                    stored.set_exception(failure)
                else:
                    stored.cancel()
                return
            item.key = written.result()
            if not keep_payload:
                item.payload = None
            self._push(item, counted=True)
            if not stored.done():
                stored.set_result(None)

        # Callbacks of one thread's futures run in the order the writes finished, which
        # is the order they were submitted: items join the queue in order.
        written.add_done_callback(on_disk)
        return stored

    def _push(self, item: _QueueItem, counted: bool = False) -> None:
        self._items.append(item)
        if not counted:
            self._queued_spans += item.spans
        self._idle.clear()
        self._wakeup.set()
        self._report_size()

    def _set_idle_if_idle(self) -> None:
        if not self._items and self._in_flight == 0 and self._storing == 0:
            self._idle.set()

    def _report_size(self) -> None:
        if self.telemetry is not None:
            self.telemetry.exporter_queue(self.id, self._queued_spans, self.capacity)

    def _take(self) -> list[_QueueItem]:
        """The oldest item, plus following items of the same project up to the span limit."""
        first = self._items.popleft()
        taken, spans = [first], first.spans
        limit = self.queue_settings.batch_max_spans
        while self._items:
            nxt = self._items[0]
            if nxt.project != first.project or spans + nxt.spans > limit:
                break
            taken.append(self._items.popleft())
            spans += nxt.spans
        return taken

    async def _consume(self) -> None:
        while True:
            while not self._items:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            items = self._take()
            self._in_flight += 1
            spans = sum(item.spans for item in items)
            try:
                batch = await self._parse(items)
                outcome = await self._export(batch, spans, count_failed=len(items) == 1)
                if outcome == "permanent" and len(items) > 1:
                    # One request's bad data must not drop the others merged with it.
                    for item in items:
                        await self._export(await self._parse([item]), item.spans)
                disk = self._disk
                if disk is not None:
                    # Not awaited: on the queue's thread the record waits behind the
                    # appends of new requests, and the next export need not wait for
                    # it (the writer sat idle meanwhile). The thread runs the deletes
                    # in order, and the queue's close after them.
                    deleted = disk.run(disk.delete, [i.key for i in items if i.key is not None])
                    deleted.add_done_callback(self._deleted)
            except asyncio.CancelledError:
                # Shut down while retrying: put the items back (they stay on disk too).
                for item in reversed(items):
                    self._items.appendleft(item)
                raise
            except _KeptForNextStart:
                for item in reversed(items):
                    self._items.appendleft(item)
                return
            finally:
                self._in_flight -= 1
            self._queued_spans -= spans
            self._report_size()
            self._set_idle_if_idle()

    def _deleted(self, deleted: asyncio.Future[None]) -> None:
        failure = None if deleted.cancelled() else deleted.exception()
        if failure is not None:  # they will be delivered again after a restart
            log.error(
                "%s: could not remove delivered batches from disk",
                self.id,
                exc_info=(type(failure), failure, failure.__traceback__),
            )

    async def _parse(self, items: list[_QueueItem]) -> SpanBatch:
        """The queued items as one batch: a handed-over batch as it is, else their bytes
        joined (serialized requests concatenate into one), parsed only if the exporter
        asks for messages."""
        first = items[0]
        # Request metadata describes one request: a merge of several carries none.
        metadata = dict(first.metadata) if len(items) == 1 else {}
        if len(items) == 1 and first.batch is not None:
            return first.batch
        joined = b"".join(await self._payloads(items))
        spans = sum(item.spans for item in items)
        batch: SpanBatch = self._batch_type.from_bytes(
            joined, first.project, metadata, first.received_ns, spans
        )
        return batch

    async def _payloads(self, items: list[_QueueItem]) -> list[bytes]:
        """The items' serialized batches: kept in memory, made from a handed-over batch,
        or read back from the queue's log, all in one trip to its thread (the thread
        answers after the appends queued before it, and the event loop after the requests
        it is handling, so a trip for each batch would keep the exporter waiting)."""
        on_disk = [item.key for item in items if item.payload is None and item.batch is None]
        read: Iterator[bytes] = iter(())
        if on_disk:
            assert self._disk is not None and None not in on_disk
            read = iter(await self._disk.run(self._disk.payloads, on_disk))  # type: ignore[arg-type]
        payloads = []
        for item in items:
            if item.payload is not None:
                payloads.append(item.payload)
            elif item.batch is not None:
                payloads.append(item.batch.serialize())
            else:
                payloads.append(next(read))
        return payloads

    async def _export(self, batch: SpanBatch, spans: int, count_failed: bool = True) -> Outcome:
        """``RetrySender.send``; a success ends the shedding of a full queue."""
        outcome = await self._retry.send(batch, spans, count_failed)
        if outcome == "sent":
            self._shedding = False
        return outcome

    async def _drained(self, timeout: float) -> bool:
        """Wait until the queue is empty or every consumer has stopped (a persistent
        queue's consumers stop on an unexpected exception while shutting down); False
        if ``timeout`` passed first."""
        idle = asyncio.ensure_future(self._idle.wait())
        waiters: set[asyncio.Future[Any]] = {idle}
        if self._consumers:
            waiters.add(asyncio.ensure_future(asyncio.wait(self._consumers)))
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        return bool(done)

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Deliver what is queued (up to ``timeout``), then stop the consumers.

        A persistent queue keeps whatever is left for the next start.
        """
        self._closing = True
        self._shutting_down.set()
        self._wakeup.set()
        drained = await self._drained(timeout)
        if self._queued_spans:
            log.log(
                logging.WARNING if drained else logging.ERROR,
                "%s: %s with %d spans undelivered%s",
                self.id,
                "stopped" if drained else "shutdown timed out",
                self._queued_spans,
                " (kept in the persistent queue for the next start)" if self._disk else "",
            )
        # Cancel until done: a client library that swallows a cancellation (redis-py
        # may, mid-reconnect) must not hang shutdown.
        pending = {task for task in self._consumers if not task.done()}
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        await asyncio.gather(*self._consumers, return_exceptions=True)
        self._consumers.clear()
        disk, self._disk = self._disk, None
        if disk is not None:
            await disk.close()
