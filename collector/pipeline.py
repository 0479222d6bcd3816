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

from collector.components import Forward, Processor, RefusedError, RequestInfo
from collector.exporterhelper import ExporterQueue, serialize_resource_spans
from collector.spans import SpanBatch

__all__ = ["FanOut", "Pipeline"]


class FanOut:
    """Hands a batch to every exporter's queue, all or none.

    A batch is queued only if every queue has room, so a full queue refuses the request
    (the client retries later) instead of some exporters storing it and others losing
    it (the OpenTelemetry Collector's issue 6961).
    """

    def __init__(self, queues: list[ExporterQueue], spans_as_received: bool = False):
        self.queues = queues
        # No processor edits spans: what arrives as received is written out from its
        # bytes (SpanBatch.sources). And then every queue gets bytes made here.
        self.spans_as_received = spans_as_received
        # The batch's own messages go to one queue, the first whose exporter reads them.
        self._hand_over_to: ExporterQueue | None = None
        if all(queue.queue_settings.enabled for queue in queues):
            self._hand_over_to = next((q for q in queues if q.takes_messages), None)

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
        # lone queue serializes only if it needs the bytes (see ExporterQueue.enqueue),
        # unless the received bytes are at hand.
        payload = None
        if self.spans_as_received and batch.sources:
            payload = serialize_resource_spans(
                batch.resource_spans, batch.sources, batch.resource_payloads
            )
        elif len(self.queues) > 1:
            payload = serialize_resource_spans(batch.resource_spans)
        # Queued on every queue before the first await, so no queue can fill up (or
        # start shutting down) between the check above and its turn. One queue (the
        # first whose exporter reads messages) is handed the batch's messages to export
        # as they are; the others parse their own copy, so no two exporters share a
        # message (an exporter without a queue gets the batch itself, so then no queue
        # is handed it).
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
    def __init__(self, name: str, processors: list[Processor], exporters: list[ExporterQueue]):
        self.name = name
        self.processors = processors
        self.fan_out = FanOut(exporters, not any(p.edits_spans for p in processors))
        forward: Forward = self.fan_out
        for processor in reversed(processors):
            forward = functools.partial(processor.consume, forward=forward)
            if processor.edits_spans:
                forward = functools.partial(_without_sources, forward)
            elif processor.edits_resources:
                forward = functools.partial(_without_resource_payloads, forward)
        self._entry = forward

    async def admit(self, request: RequestInfo) -> None:
        """Run every processor's header check, then refuse early if an exporter's queue
        is full; raises to refuse the request."""
        for processor in self.processors:
            await processor.admit(request)
        self.fan_out.refuse_if_full()

    async def consume(self, batch: SpanBatch) -> None:
        """Push a batch through the processors to the exporters' queues."""
        await self._entry(batch)


async def _without_sources(consume: Forward, batch: SpanBatch) -> None:
    """Before a processor that may edit spans: the received bytes and span counts
    (``SpanBatch.sources``) will no longer describe the messages, nor the resources'
    bytes (``SpanBatch.resource_payloads``) their resources."""
    batch.sources = None
    batch.resource_payloads = None
    await consume(batch)


async def _without_resource_payloads(consume: Forward, batch: SpanBatch) -> None:
    """Before a processor that may edit resources: ``SpanBatch.resource_payloads`` may no
    longer be their bytes."""
    batch.resource_payloads = None
    await consume(batch)
