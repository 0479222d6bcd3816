"""The retry sender: one export until delivered, refused for good or given up on, with
exponential backoff and jitter (``retry_on_failure``), and the exporter's failure streak,
which decides when its full queue sheds batches instead of refusing requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from collector.components import Exporter, PermanentError, RetryableError
from collector.exporterhelper.config import RetrySettings
from collector.spans import SpanBatch

if TYPE_CHECKING:
    from collector.telemetry import Telemetry

# The helper's one logger, whichever of its modules logs.
log = logging.getLogger("collector.exporterhelper")

UNEXPECTED_ERROR_MAX_ELAPSED = 300.0
"""How long an unexpected exception is retried when ``max_elapsed_time`` is 0."""


Outcome = Literal["sent", "permanent", "gave_up"]


class _KeptForNextStart(Exception):
    """A consumer stops: its batch failed while shutting down and stays on disk."""


def _failure_reason(exc: Exception) -> str:
    """The ``reason`` label of a failed export attempt that may be retried."""
    if isinstance(exc, RetryableError):
        return "retryable"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "unexpected"


class RetrySender:
    """Exports batches to one exporter with retries, for its ``ExporterQueue``, and keeps
    the exporter's failure streak (the failures since its last success).

    ``shutting_down`` is set once the queue starts to shut down: a wait before a retry
    ends then, and an unexpected exception is no longer retried. ``persistent`` says
    whether a batch that fails so stays in the queue's log for the next start."""

    def __init__(
        self,
        exporter: Exporter,
        export_method: str,
        queue_id: str,
        settings: RetrySettings,
        timeout: float,
        telemetry: Telemetry | None,
        shutting_down: asyncio.Event,
        persistent: Callable[[], bool],
    ):
        self.exporter = exporter
        # Looked up on each export, not bound here: a wrapper put on the exporter after
        # the service was built (collector.testing records exports so) is honoured.
        self._export_method = export_method
        self.id = queue_id
        self.retry = settings
        self.timeout = timeout
        self.telemetry = telemetry
        self._shutting_down = shutting_down
        self._persistent = persistent
        self.failing_since: float | None = None
        """When the exporter's current failure streak began (monotonic); None after a
        success."""
        self.unexpected_since: float | None = None
        """When its first unexpected exception since its last success happened."""

    def past_budget(self) -> bool:
        """Whether the exporter has failed for longer than ``retry_on_failure`` allows
        since its last success. Its full queue then sheds new batches (dropped for this
        exporter alone, counted) instead of refusing requests, so it stops the other
        exporters no longer than its retry policy; with ``max_elapsed_time: 0`` only
        after an unexpected exception's bound."""
        now = time.monotonic()
        limit = self.retry.max_elapsed_time
        if limit and self.failing_since is not None and now - self.failing_since > limit:
            return True
        since = self.unexpected_since
        return since is not None and now - since > (limit or UNEXPECTED_ERROR_MAX_ELAPSED)

    async def send(self, batch: SpanBatch, spans: int, count_failed: bool = True) -> Outcome:
        """Export until delivered, refused for good (a permanent error: logged, counted,
        dropped) or given up on (the retry budget spent). ``count_failed=False`` leaves
        logging and counting a permanent error to the caller, who then exports a merged
        batch's parts one by one.

        The budget: a failed attempt is retried after ``initial_interval``, each wait
        ``multiplier`` times the last (at most ``max_interval``) and jittered by
        ``randomization_factor``. The batch is given up on (dropped, counted in
        ``calltrace_exporter_send_failed_spans``) once its next wait would end more than
        ``max_elapsed_time`` after its own first attempt or after the first failure since
        the exporter's last success, whichever came first: an exporter that has failed
        that long gets one attempt per batch until one succeeds, so its queue drains
        instead of filling. ``max_elapsed_time: 0`` retries ``RetryableError`` and
        timeouts until delivered; an unexpected exception (neither of the exporter API's
        errors: a bug) is never retried without bound, only up to ``max_elapsed_time`` or,
        when that is 0, ``UNEXPECTED_ERROR_MAX_ELAPSED``.

        Every failed attempt is counted in ``calltrace_exporter_errors`` by reason. An
        unexpected exception is logged with its traceback once per failure streak (the
        failures since the exporter's last success), later ones in a line. While the
        queue shuts down an unexpected exception is not retried: a persistent queue
        keeps the batch for the next start (``_KeptForNextStart``), else it is dropped."""
        started = time.monotonic()
        first_unexpected: float | None = None
        interval = self.retry.initial_interval
        attempt = 0
        while True:
            attempt += 1
            t0 = time.perf_counter()
            try:
                export = getattr(self.exporter, self._export_method)
                await asyncio.wait_for(export(batch), self.timeout or None)
            except PermanentError as exc:
                self._count_error("permanent")
                if count_failed:
                    log.error("%s: dropping %d spans, permanent error: %s", self.id, spans, exc)
                    self.count_failed(spans)
                return "permanent"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # retryable, timeouts and unexpected errors
                reason = _failure_reason(exc)
                self._count_error(reason)
                now = time.monotonic()
                if self.failing_since is None:
                    self.failing_since = now
                unexpected = reason == "unexpected"
                if unexpected:
                    if first_unexpected is None:
                        first_unexpected = now
                    if self.unexpected_since is None:
                        self.unexpected_since = now
                        log.error(
                            "%s: export raised an unexpected %s (retried per"
                            " retry_on_failure; further ones are logged without traceback)",
                            self.id,
                            type(exc).__name__,
                            exc_info=exc,
                        )
                    if self._shutting_down.is_set():
                        if self._persistent():
                            log.warning(
                                "%s: export failed while shutting down: %r; %d spans stay"
                                " in the persistent queue",
                                self.id,
                                exc,
                                spans,
                            )
                            raise _KeptForNextStart from exc
                        log.error(
                            "%s: dropping %d spans, export failed while shutting down: %r",
                            self.id,
                            spans,
                            exc,
                        )
                        self.count_failed(spans)
                        return "gave_up"
                delay = interval * (1 + self.retry.randomization_factor * (2 * random.random() - 1))
                if isinstance(exc, RetryableError) and exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)  # throttled: no sooner than asked
                if unexpected:
                    assert first_unexpected is not None and self.unexpected_since is not None
                    since = min(first_unexpected, self.unexpected_since)
                    limit = self.retry.max_elapsed_time or UNEXPECTED_ERROR_MAX_ELAPSED
                else:
                    since = min(started, self.failing_since)
                    limit = self.retry.max_elapsed_time
                if not self.retry.enabled or (limit and now + delay - since > limit):
                    log.error(
                        "%s: dropping %d spans after %d attempts: %r", self.id, spans, attempt, exc
                    )
                    self.count_failed(spans)
                    return "gave_up"
                log.warning(
                    "%s: export failed (attempt %d), retrying in %.2fs: %r",
                    self.id,
                    attempt,
                    delay,
                    exc,
                )
                if self.telemetry is not None:
                    self.telemetry.exporter_retry(self.id)
                await self._pause(delay)
                interval = min(interval * self.retry.multiplier, self.retry.max_interval)
                continue
            self.failing_since = self.unexpected_since = None
            if self.telemetry is not None:
                self.telemetry.exporter_sent(self.id, spans, time.perf_counter() - t0)
            return "sent"

    async def _pause(self, delay: float) -> None:
        """Wait ``delay`` seconds before a retry, or until the queue starts to shut down
        (then an unexpected exception is given up on at once)."""
        if self._shutting_down.is_set():
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._shutting_down.wait(), delay)

    def count_failed(self, spans: int) -> None:
        if self.telemetry is not None:
            self.telemetry.exporter_failed(self.id, spans)

    def _count_error(self, reason: str) -> None:
        if self.telemetry is not None:
            self.telemetry.exporter_error(self.id, reason)
