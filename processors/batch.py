"""``batch``: merge small requests into larger batches before the exporters.

A batch is sent when it reaches ``send_batch_size`` spans or ``timeout`` after its first
request arrived, and on shutdown. Batches larger than ``send_batch_max_size`` are split.

Unlike a fire-and-forget batcher, each caller waits until the batch holding its spans
has been handed to the exporters' queues and gets that outcome, error included. So a
request is answered only once its data is as safe as the config makes it (in the queue,
or on disk with a persistent queue), and a refusal downstream reaches the client, which
retries, instead of being swallowed (the Collector's issues 13582 and 12711).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pydantic import Field, model_validator

from collector import (
    ComponentConfig,
    Duration,
    Forward,
    Processor,
    SpanBatch,
    split_resource_spans,
)

__all__ = ["BatchConfig", "BatchProcessor", "split_resource_spans"]


class BatchConfig(ComponentConfig):
    send_batch_size: int = Field(default=8192, ge=1)
    """Spans that trigger sending a batch."""
    send_batch_max_size: int = Field(default=0, ge=0)
    """Upper bound of a sent batch in spans; 0 means no bound."""
    timeout: Duration = 0.001
    """How long a batch may wait for more spans after its first request: every caller
    waits for its batch, so this is added to a lone request's latency (the sending queue
    merges queued batches for the exporter anyway)."""

    @model_validator(mode="after")
    def _max_not_below_size(self) -> BatchConfig:
        if self.send_batch_max_size and self.send_batch_max_size < self.send_batch_size:
            raise ValueError(
                f"send_batch_max_size ({self.send_batch_max_size}) must be 0 or at least "
                f"send_batch_size ({self.send_batch_size})"
            )
        return self


@dataclass
class _Pending:
    batches: list[SpanBatch] = field(default_factory=list)
    spans: int = 0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class BatchProcessor(Processor):
    type_name = "batch"
    Config = BatchConfig
    config: BatchConfig

    def __init__(self, component_id: str, config: BatchConfig):
        super().__init__(component_id, config)
        self._pending: dict[str | None, _Pending] = {}
        self._forward: Forward | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    async def consume(self, batch: SpanBatch, forward: Forward) -> None:
        self._forward = forward
        project = batch.project
        pending = self._pending.get(project)
        if pending is None:
            pending = self._pending[project] = _Pending()
        pending.batches.append(batch)
        pending.spans += batch.span_count
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending.waiters.append(done)
        if pending.spans >= self.config.send_batch_size:
            self._start_flush(project)
        elif pending.timer is None:
            pending.timer = asyncio.get_running_loop().call_later(
                self.config.timeout, self._start_flush, project
            )
        # The flush runs in its own task: a client that disconnects cancels only its wait.
        await asyncio.shield(done)

    def _start_flush(self, project: str | None) -> None:
        pending = self._pending.pop(project, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._flush(project, pending))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, project: str | None, pending: _Pending) -> None:
        assert self._forward is not None
        limit = self.config.send_batch_max_size
        merged = SpanBatch.merge(pending.batches, project)
        chunks = merged.split(limit) if limit and pending.spans > limit else [merged]
        error: BaseException | None = None
        for chunk in chunks:
            try:
                await self._forward(chunk)
            except Exception as exc:  # every waiter learns it; the clients retry
                error = exc
        for waiter in pending.waiters:
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    async def shutdown(self) -> None:
        """Send everything still pending and wait for the sends to finish."""
        for project in list(self._pending):
            self._start_flush(project)
        while self._flushes:
            await asyncio.gather(*list(self._flushes), return_exceptions=True)
