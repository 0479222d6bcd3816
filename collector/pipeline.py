"""The shape of calltrace: receivers -> processors (in order) -> fan-out to exporters.

Read this module first. A receiver calls ``Pipeline.admit(request)`` with the request's
headers before decoding its body (so ``auth`` refuses early), then
``Pipeline.consume(batch)``. Each processor edits the batch in place and passes it on;
the last stage puts the batch on every exporter's own sending queue
(``collector.exporterhelper``). ``consume`` returns once the data is queued for every
exporter (in memory, or on disk with a persistent queue), which is when a receiver
answers success.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING

from collector.components import (
    Forward,
    Processor,
    RefusedError,
    RequestInfo,
    UnauthenticatedError,
)
from collector.exporterhelper import ExporterQueue
from collector.spans import SpanBatch

if TYPE_CHECKING:
    from collector.telemetry import Telemetry

log = logging.getLogger(__name__)

__all__ = ["FanOut", "Pipeline"]


class FanOut:
    """Hands a batch to every exporter's queue, all or none.

    A batch is queued only if every queue has room, so a full queue refuses the request
    (the client retries later) instead of some exporters storing it and others losing
    it (the OpenTelemetry Collector's issue 6961).
    """

    def __init__(self, queues: list[ExporterQueue]):
        self.queues = queues
        # The batch itself goes to one queue (the first), the others get its bytes, so
        # no two exporters share a message (an exporter without a queue gets the batch
        # itself, so then no queue is handed it).
        self._hand_over_to: ExporterQueue | None = None
        if queues and all(queue.queue_settings.enabled for queue in queues):
            self._hand_over_to = queues[0]

    def refuse_if_full(self) -> None:
        """Refuse before a request's body is read when a queue is nearly full: under a
        flood, parsing bodies only to refuse them would cost CPU and memory."""
        full = [q.id for q in self.queues if q.nearly_full()]
        if full:
            raise RefusedError(f"sending queue full: {', '.join(full)}", retry_after=1.0)

    async def __call__(self, batch: SpanBatch) -> None:
        spans = batch.span_count
        if spans == 0:
            return
        full = [q.id for q in self.queues if not q.has_room(spans)]
        if full:
            raise RefusedError(f"sending queue full: {', '.join(full)}", retry_after=1.0)
        # Serialized once for every queue: queues hold bytes, not parsed messages. A
        # lone queue serializes only if it needs the bytes (see ExporterQueue.enqueue).
        payload = batch.serialize() if len(self.queues) > 1 else None
        # Queued on every queue before the first await, so no queue can fill up (or
        # start shutting down) between the check above and its turn.
        writes = [
            queue.enqueue(batch, spans, payload, hand_over=queue is self._hand_over_to)
            for queue in self.queues
            if queue.queue_settings.enabled
        ]
        for queue in self.queues:
            if not queue.queue_settings.enabled:  # no queue: exported here and now
                await queue.put(batch, spans, payload)
        # Persistent queues: answer once the batch is on disk in each of them. Shielded:
        # a client that hangs up must not cancel the writes (they finish regardless).
        on_disk = [write for write in writes if write is not None]
        if on_disk:
            await asyncio.shield(asyncio.gather(*on_disk))


class Pipeline:
    def __init__(
        self,
        name: str,
        processors: list[Processor],
        exporters: list[ExporterQueue],
        telemetry: Telemetry | None = None,
    ):
        self.name = name
        self.signal = name.split("/", 1)[0]
        """``traces``, ``logs`` or ``metrics``: the batch type this pipeline carries."""
        self.processors = processors
        self.telemetry = telemetry
        self.fan_out = FanOut(exporters)
        self._failed: set[str] = set()
        """Processors whose first unexpected error was logged with its traceback."""
        forward: Forward = self.fan_out
        for processor in reversed(processors):
            if type(processor).consume is Processor.consume:
                forward = functools.partial(self._consume, processor, forward)
            else:  # it regroups batches (``batch``): its ``consume`` runs the show
                forward = functools.partial(processor.consume, forward=forward)
        self._entry = forward

    async def admit(self, request: RequestInfo) -> None:
        """Run every processor's header check, then refuse early if an exporter's queue
        is full; raises to refuse the request."""
        for processor in self.processors:
            await processor.admit(request)
        self.fan_out.refuse_if_full()

    async def consume(self, batch: SpanBatch) -> None:
        """Push a batch through the processors to the exporters' queues (a ``LogBatch``
        or ``MetricBatch`` in a logs or metrics pipeline: they read the same)."""
        await self._entry(batch)

    async def _consume(self, processor: Processor, forward: Forward, batch: SpanBatch) -> None:
        """``Processor.consume``, with the processor's ``on_error`` policy applied to an
        unexpected exception of its ``process`` (errors of the stages after it pass)."""
        policy = processor.on_error
        as_received = batch.serialize() if policy == "pass" else None
        try:
            result = await processor.process(batch)
        except (RefusedError, UnauthenticatedError, asyncio.CancelledError):
            raise
        except Exception as exc:
            self._report(processor, policy, exc)
            if policy == "refuse":
                raise
            if as_received is None:  # drop
                if self.telemetry is not None:
                    self.telemetry.dropped(processor.id, batch.span_count)
                return
            result = type(batch).from_bytes(
                as_received, batch.project, batch.metadata, batch.received_ns
            )
        if result is not None and result.resource_count:
            await forward(result)

    def _report(self, processor: Processor, policy: str, exc: Exception) -> None:
        if self.telemetry is not None:
            self.telemetry.processor_error(processor.id, policy)
        if processor.id in self._failed:
            log.debug("%s failed again (on_error: %s): %r", processor.id, policy, exc)
            return
        self._failed.add(processor.id)
        log.error(
            "%s failed on a batch (on_error: %s); pipeline %s goes on",
            processor.id,
            policy,
            self.name,
            exc_info=exc,
        )
