"""The settings every exporter's config carries: ``sending_queue``, ``retry_on_failure``
and ``timeout``, named as in the OpenTelemetry Collector's exporter helper."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from collector.components import ComponentConfig
from collector.units import Duration

__all__ = ["ExporterConfig", "QueueSettings", "RetrySettings"]


class QueueSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    num_consumers: int = Field(default=1, ge=1, le=64)
    queue_size: int = Field(default=100_000, ge=1)
    """Capacity in spans."""
    batch_max_spans: int = Field(default=4096, ge=1)
    """A consumer merges queued batches of one project up to this many spans per export
    (a persistent queue keeps twice as many in memory, the rest on disk). Larger merges
    cost peak memory under a flood and gain no throughput."""
    storage: Path | None = None
    """Directory for a persistent queue; None keeps the queue in memory."""


class RetrySettings(BaseModel):
    """Retry with exponential backoff and jitter, as the OpenTelemetry Collector's
    exporter helper names it; ``max_elapsed_time`` bounds an exporter's failure streak."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    initial_interval: Duration = 0.1
    max_interval: Duration = 5.0
    multiplier: float = Field(default=1.5, ge=1.0)
    randomization_factor: float = Field(default=0.5, ge=0.0, le=1.0)
    max_elapsed_time: Duration = 300.0
    """The Collector's default; 0: retry retryable errors until delivered."""


class ExporterConfig(ComponentConfig):
    """Base config for exporters: the helper's ``sending_queue`` and ``retry_on_failure``."""

    sending_queue: QueueSettings = Field(default_factory=QueueSettings)
    retry_on_failure: RetrySettings = Field(default_factory=RetrySettings)
    timeout: Duration = 30.0
