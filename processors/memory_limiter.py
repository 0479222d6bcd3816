"""``memory_limiter``: refuse data while the process uses too much memory.

Every ``check_interval`` the processor reads the process's resident set size (RSS, from
``/proc/self/statm``, or the peak RSS from ``resource`` where there is no ``/proc``).
Above the soft limit (``limit_mib - spike_limit_mib``) it refuses new requests from their
headers alone, before their bodies are read: HTTP 503 / gRPC UNAVAILABLE with
``Retry-After``, which OTLP clients retry, and never a 500 that they would drop (the
OpenTelemetry Collector's issue 9337). At or above the hard limit (``limit_mib``) it
also refuses batches already decoded. Once usage falls below the soft limit, data is
admitted again. Put it first in the pipeline (before ``auth``) so refusal is cheapest.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import sys

from pydantic import Field, model_validator

from collector import (
    ComponentConfig,
    Duration,
    Host,
    Processor,
    RefusedError,
    RequestInfo,
    SpanBatch,
)

log = logging.getLogger(__name__)

__all__ = ["MemoryLimiterConfig", "MemoryLimiterProcessor", "rss_bytes"]

MiB = 1024 * 1024
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class MemoryLimiterConfig(ComponentConfig):
    limit_mib: int = Field(default=1024, ge=1)
    """Hard limit of the process's resident memory: above it even decoded batches are refused."""
    spike_limit_mib: int = Field(default=0, ge=0)
    """Headroom for a burst: new requests are refused above ``limit_mib - spike_limit_mib``.
    0 means 20% of ``limit_mib``."""
    check_interval: Duration = 0.1
    """How often memory use is measured."""
    retry_after: Duration = 1.0
    """The ``Retry-After`` clients are given while data is refused."""

    @model_validator(mode="after")
    def _spike_below_limit(self) -> MemoryLimiterConfig:
        if self.spike_limit_mib >= self.limit_mib:
            raise ValueError(
                f"spike_limit_mib ({self.spike_limit_mib}) must be below "
                f"limit_mib ({self.limit_mib})"
            )
        if self.check_interval <= 0:
            raise ValueError(
                f'expected check_interval above 0 like "100ms", got {self.check_interval}'
            )
        return self

    @property
    def soft_limit_bytes(self) -> int:
        spike = self.spike_limit_mib or self.limit_mib // 5
        return (self.limit_mib - spike) * MiB

    @property
    def hard_limit_bytes(self) -> int:
        return self.limit_mib * MiB


def rss_bytes() -> int:
    """The current resident set size of this process, in bytes."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB else


class MemoryLimiterProcessor(Processor):
    type_name = "memory_limiter"
    Config = MemoryLimiterConfig
    config: MemoryLimiterConfig

    def __init__(self, component_id: str, config: MemoryLimiterConfig):
        super().__init__(component_id, config)
        self.rss = 0
        """The last measured resident set size, in bytes."""
        self.refusing = False
        """Above the soft limit: new requests are refused."""
        self.over_hard_limit = False
        self._host: Host | None = None
        self._checker: asyncio.Task[None] | None = None

    async def start(self, host: Host) -> None:
        self._host = host
        self.check()
        self._checker = asyncio.create_task(self._check_periodically())

    def check(self) -> None:
        """Measure memory use and update the refusal state."""
        rss = rss_bytes()
        if rss >= self.config.soft_limit_bytes and not self.refusing:
            gc.collect()  # garbage may be all that is over the limit
            rss = rss_bytes()
        self.rss = rss
        refusing = rss >= self.config.soft_limit_bytes
        if refusing != self.refusing:
            log.warning(
                "%s: memory use %.0f MiB, %s data (soft limit %d MiB, hard limit %d MiB)",
                self.id,
                rss / MiB,
                "refusing" if refusing else "accepting",
                self.config.soft_limit_bytes // MiB,
                self.config.limit_mib,
            )
        self.refusing = refusing
        self.over_hard_limit = rss >= self.config.hard_limit_bytes
        if self._host is not None:
            self._host.telemetry.memory_usage(self.id, rss, refusing)

    async def _check_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.check_interval)
            try:
                self.check()
            except Exception:
                log.exception("%s: could not measure memory use", self.id)

    def _refuse(self, what: str) -> RefusedError:
        return RefusedError(
            f"{what}: memory use {self.rss / MiB:.0f} MiB is over the limit "
            f"of {self.id} ({self.config.soft_limit_bytes // MiB} MiB)",
            retry_after=self.config.retry_after,
        )

    async def admit(self, request: RequestInfo) -> None:
        if self.refusing:
            raise self._refuse("request refused")

    async def process(self, batch: SpanBatch) -> SpanBatch | None:
        if self.over_hard_limit:
            raise self._refuse(f"batch of {batch.span_count} spans refused")
        return batch

    async def shutdown(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            await asyncio.gather(self._checker, return_exceptions=True)
            self._checker = None
