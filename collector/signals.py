"""Logs and metrics in flight: the batch types of the ``logs`` and ``metrics`` signals.

A pipeline carries one signal, named by its first word as in the OpenTelemetry
Collector's config (``traces``, ``logs/livekit``, ``metrics``). Traces travel as a
``SpanBatch`` (``collector.spans``); logs as a ``LogBatch`` of OTLP ``ResourceLogs``
messages and metrics as a ``MetricBatch`` of ``ResourceMetrics``, each with the same
small context (``project``, ``metadata``, ``received_ns``) and the same two forms:

- ``batch.resource_logs`` / ``batch.resource_metrics``: the protobuf messages, to read
  and edit in place; handing them out drops the batch's bytes (they may be edited);
- ``batch.serialize()``: the batch as an ``ExportLogsServiceRequest`` /
  ``ExportMetricsServiceRequest`` body. Serialized requests concatenate into one valid
  request, so the exporter helper's queue holds bytes for every signal alike.

``span_count`` is what pipelines and queues count a batch as (their capacities are in
items): log records for a ``LogBatch``, data points for a ``MetricBatch``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, ClassVar, Generic, TypeVar

from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.logs.v1.logs_pb2 import ResourceLogs
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric, ResourceMetrics

__all__ = [
    "SIGNALS",
    "ExportLogsServiceRequest",
    "ExportMetricsServiceRequest",
    "LogBatch",
    "MetricBatch",
    "SignalBatch",
    "batch_type",
    "metric_points",
    "signal_of",
]

SIGNALS = ("traces", "logs", "metrics")
"""The signals a pipeline may carry, in the order the service builds them."""

TRACES_ONLY: frozenset[str] = frozenset({"traces"})
ALL_SIGNALS: frozenset[str] = frozenset(SIGNALS)

M = TypeVar("M", ResourceLogs, ResourceMetrics)


def signal_of(pipeline_name: str) -> str:
    """The signal of a pipeline named ``logs`` or ``logs/NAME``: its first word."""
    return pipeline_name.split("/", 1)[0]


class SignalBatch(Generic[M]):
    """The common part of ``LogBatch`` and ``MetricBatch`` (see the module docstring)."""

    signal: ClassVar[str]
    request_type: ClassVar[type[Message]]
    response_type: ClassVar[type[Message]]
    field: ClassVar[str]
    """The request's repeated field: ``resource_logs`` or ``resource_metrics``."""

    __slots__ = ("_count", "_messages", "_payload", "metadata", "project", "received_ns")

    def __init__(
        self,
        messages: Iterable[M] | None = None,
        project: str | None = None,
        metadata: dict[str, str] | None = None,
        received_ns: int | None = None,
    ):
        self._messages: list[M] | None = [] if messages is None else list(messages)
        self._payload: bytes | None = None
        self._count: int | None = None
        self.project = project
        self.metadata: dict[str, str] = {} if metadata is None else metadata
        self.received_ns = time.time_ns() if received_ns is None else received_ns

    @classmethod
    def from_bytes(
        cls,
        payload: bytes,
        project: str | None = None,
        metadata: dict[str, str] | None = None,
        received_ns: int | None = None,
        span_count: int | None = None,
    ) -> Any:
        """A batch of a serialized export request, parsed only when its messages are
        asked for. ``span_count``: its items, if the caller knows them."""
        batch = cls(None, project, metadata, received_ns)
        batch._messages = None
        batch._payload = bytes(payload)
        batch._count = span_count
        return batch

    def _parsed(self) -> list[M]:
        if self._messages is None:
            request = self.request_type.FromString(self._payload or b"")
            self._messages = list(getattr(request, self.field))
        return self._messages

    def _hand_out(self) -> list[M]:
        messages = self._parsed()
        self._payload = None
        self._count = None
        return messages

    @property
    def resource_count(self) -> int:
        if self._messages is None and not self._payload:
            return 0
        return len(self._parsed())

    @property
    def span_count(self) -> int:
        """Items of the batch (log records, metric data points): what queues count."""
        if self._count is None:
            self._count = sum(self._count_in(m) for m in self._parsed())
        return self._count

    @staticmethod
    def _count_in(message: Any) -> int:
        """How many items (log records, data points) one message holds: each subclass
        (``LogBatch``, ``MetricBatch``) says; the base class has no signal of its own."""
        raise NotImplementedError

    def serialize(self) -> bytes:
        if self._payload is None:
            request = self.request_type()
            getattr(request, self.field).extend(self._parsed())
            self._payload = request.SerializeToString()
        return self._payload

    def copy(self) -> Any:
        """An independent batch with the same messages (for a second pipeline)."""
        return type(self).from_bytes(
            self.serialize(), self.project, dict(self.metadata), self.received_ns
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} project={self.project!r} items={self.span_count}>"


class LogBatch(SignalBatch[ResourceLogs]):
    """Log records of one project on their way through a ``logs`` pipeline."""

    signal = "logs"
    request_type = ExportLogsServiceRequest
    response_type = ExportLogsServiceResponse
    field = "resource_logs"
    __slots__ = ()

    @property
    def resource_logs(self) -> list[ResourceLogs]:
        """The ``ResourceLogs`` messages, to read and edit in place."""
        return self._hand_out()

    @resource_logs.setter
    def resource_logs(self, messages: Iterable[ResourceLogs]) -> None:
        self._messages = list(messages)
        self._payload = None
        self._count = None

    @staticmethod
    def _count_in(message: Any) -> int:
        return sum(len(scope.log_records) for scope in message.scope_logs)


class MetricBatch(SignalBatch[ResourceMetrics]):
    """Metric data points of one project on their way through a ``metrics`` pipeline."""

    signal = "metrics"
    request_type = ExportMetricsServiceRequest
    response_type = ExportMetricsServiceResponse
    field = "resource_metrics"
    __slots__ = ()

    @property
    def resource_metrics(self) -> list[ResourceMetrics]:
        """The ``ResourceMetrics`` messages, to read and edit in place."""
        return self._hand_out()

    @resource_metrics.setter
    def resource_metrics(self, messages: Iterable[ResourceMetrics]) -> None:
        self._messages = list(messages)
        self._payload = None
        self._count = None

    @staticmethod
    def _count_in(message: Any) -> int:
        return sum(
            len(metric_points(metric)[1])
            for scope in message.scope_metrics
            for metric in scope.metrics
        )


_POINT_KINDS = ("gauge", "sum", "histogram", "exponential_histogram", "summary")


def metric_points(metric: Metric) -> tuple[str, Any]:
    """``(kind, data points)`` of a metric: kind is ``gauge``, ``sum``, ``histogram``,
    ``exponential_histogram`` or ``summary`` (``""`` and no points when unset)."""
    kind = metric.WhichOneof("data")
    if kind not in _POINT_KINDS:
        return "", ()
    return kind, getattr(metric, kind).data_points


def batch_type(signal: str) -> Any:
    """The batch class of a signal: ``SpanBatch``, ``LogBatch`` or ``MetricBatch``."""
    if signal == "traces":
        from collector.spans import SpanBatch

        return SpanBatch
    return {"logs": LogBatch, "metrics": MetricBatch}[signal]
