"""The plugin API: base classes for receivers, processors and exporters.

A component is three small things, as in the OpenTelemetry Collector: a type name, a
typed config model with defaults (a pydantic model, validated at load time), and an
object with ``start``/``shutdown`` plus its one data method.

- ``Processor.process(batch) -> batch | None`` edits spans in place; None drops the batch.
  ``Processor.admit(request)`` runs on the request's headers *before* the body is decoded
  (``auth`` uses it; so can rate or memory limiters).
- ``Exporter.export(batch)`` writes a batch, raising ``RetryableError`` or
  ``PermanentError``. Queueing, retry and persistence are the exporter helper's job, so an
  exporter is only "turn a batch into a write".
- ``Receiver`` accepts data from the outside and hands it to a ``Consumer``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from collector.spans import SpanBatch

if TYPE_CHECKING:
    from collector.signals import LogBatch, MetricBatch

__all__ = [
    "ComponentConfig",
    "Consumer",
    "Exporter",
    "Forward",
    "Host",
    "PermanentError",
    "Processor",
    "Receiver",
    "RefusedError",
    "RequestInfo",
    "RetryableError",
    "UnauthenticatedError",
]


class ComponentConfig(BaseModel):
    """Base for component config models: unknown keys are errors, defaults are explicit."""

    model_config = ConfigDict(extra="forbid", frozen=False, validate_default=True)


class RetryableError(Exception):
    """A transient failure: the exporter helper retries the batch with backoff, waiting
    at least ``retry_after`` seconds when the destination said how long (an HTTP
    ``Retry-After``)."""

    def __init__(self, message: str = "", retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(Exception):
    """The batch can never be written (e.g. rejected as invalid): logged, counted, dropped."""


class RefusedError(Exception):
    """The pipeline cannot take data now (queues full, memory limit).

    Receivers answer 503 (HTTP) / UNAVAILABLE (gRPC) with ``Retry-After``, or 429 /
    RESOURCE_EXHAUSTED when ``throttled`` is set, so clients retry later.
    """

    def __init__(self, message: str, retry_after: float = 1.0, throttled: bool = False):
        super().__init__(message)
        self.retry_after = retry_after
        self.throttled = throttled


class UnauthenticatedError(Exception):
    """No, an unknown or a revoked credential: HTTP 401, gRPC UNAUTHENTICATED."""


@dataclass(slots=True)
class RequestInfo:
    """What is known of a request before its body is decoded.

    ``headers`` are lower-cased names. ``admit`` hooks may set ``project``.
    """

    headers: dict[str, str]
    transport: str = "http"
    peer: str | None = None
    body_size: int = 0
    project: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


class Host(Protocol):
    """What a running component may ask of the service around it."""

    def component(self, component_id: str) -> Any: ...

    @property
    def telemetry(self) -> Any: ...

    @property
    def http_routes(self) -> list[Any]:
        """aiohttp routes the service serves on every HTTP listener (healthz, metrics, API)."""
        ...


class _Component:
    """Shared lifecycle: ``start`` then ``shutdown``; both idempotent in subclasses' hands."""

    type_name: ClassVar[str] = ""
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    signals: ClassVar[frozenset[str]] = frozenset({"traces"})
    """The signals (``traces``, ``logs``, ``metrics``) this component handles: config
    refuses it in a pipeline of another. A processor's ``process`` then gets that
    signal's batch (``SpanBatch``, ``LogBatch``, ``MetricBatch``); an exporter's
    ``export``, ``export_logs`` or ``export_metrics`` is called."""

    def __init__(self, component_id: str, config: ComponentConfig):
        self.id = component_id
        self.config = config

    async def start(self, host: Host) -> None:
        """Open connections, start timers. Called before any data arrives."""

    async def shutdown(self) -> None:
        """Finish in-flight work and release resources. May be called twice."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}>"


Forward = Callable[[SpanBatch], Awaitable[None]]


class Processor(_Component):
    on_error: str = "drop"
    """What becomes of a batch when ``process`` raises an unexpected exception (a bug,
    not a ``RefusedError``): ``drop`` it (its spans counted as dropped), ``pass`` it on as
    it came in, or ``refuse`` the request (503, so the client retries). The pipeline
    logs the first such error of a processor with its traceback and counts each one in
    ``calltrace_processor_errors``. Set per processor in config (``on_error: pass``)."""

    async def admit(self, request: RequestInfo) -> None:
        """Check a request from its headers alone; raise to refuse it. Default: admit."""

    async def process(self, batch: SpanBatch) -> SpanBatch | None:
        """Edit ``batch`` in place and return it, or return None to drop it."""
        return batch

    async def consume(self, batch: SpanBatch, forward: Forward) -> None:
        """Pass the processed batch on. Override only to regroup batches (see ``batch``)."""
        result = await self.process(batch)
        if result is not None and result.resource_count:
            await forward(result)


class Exporter(_Component, ABC):
    @abstractmethod
    async def export(self, batch: SpanBatch) -> None:
        """Write one batch. Raise ``RetryableError`` or ``PermanentError`` on failure.

        Read the spans as messages (``batch.resource_spans``) or as the bytes of an
        ``ExportTraceServiceRequest`` (``batch.serialize()``), whichever the write needs:
        the batch is parsed or serialized only if asked, and the two always agree."""

    async def export_logs(self, batch: LogBatch) -> None:
        """Write one batch of log records (``batch.resource_logs`` or
        ``batch.serialize()``); for exporters whose ``signals`` include ``logs``."""
        raise PermanentError(f"{self.id} does not export logs")

    async def export_metrics(self, batch: MetricBatch) -> None:
        """Write one batch of metric points (``batch.resource_metrics`` or
        ``batch.serialize()``); for exporters whose ``signals`` include ``metrics``."""
        raise PermanentError(f"{self.id} does not export metrics")


class Consumer(Protocol):
    """What a receiver hands data to: the pipeline."""

    async def admit(self, request: RequestInfo) -> None: ...

    async def consume(self, batch: SpanBatch) -> None: ...


class Receiver(_Component):
    def __init__(self, component_id: str, config: ComponentConfig, consumer: Consumer):
        super().__init__(component_id, config)
        self.consumer = consumer
        self.consumers: dict[str, Consumer] = {"traces": consumer}
        """The pipelines fed, by signal (``traces``, ``logs``, ``metrics``); the service
        sets it before ``start``. ``consumer`` is the traces one (or, for a receiver in
        no traces pipeline, the first signal's)."""

    def routes(self) -> list[Any]:
        """aiohttp routes to serve on every HTTP listener (a webhook, say). Default none."""
        return []
