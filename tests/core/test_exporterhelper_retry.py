"""The exporter helper's retry policy (``retry_on_failure``): which failures are retried,
for how long, and what shutdown does with a batch whose exporter keeps failing."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from collector import ExporterConfig, PermanentError, RefusedError, RetryableError
from collector.exporterhelper import ExporterQueue, RetrySettings, retry
from collector.telemetry import Telemetry
from tests.core.test_exporterhelper import Recorder
from tests.processors._util import batch, resource_spans


def policy(max_elapsed_time: str, **queue) -> ExporterConfig:
    return ExporterConfig(
        retry_on_failure={
            "initial_interval": "5ms",
            "max_interval": "10ms",
            "max_elapsed_time": max_elapsed_time,
        },
        sending_queue=queue,
    )


class Counting(Recorder):
    """Records how many times export was called."""

    def __init__(self, config, failures=None):
        super().__init__(config, failures)
        self.attempts = 0

    async def export(self, b):
        self.attempts += 1
        await super().export(b)


def failed_spans(telemetry: Telemetry) -> float:
    return telemetry.value("calltrace_exporter_send_failed_spans_total", exporter="recorder")


def errors(telemetry: Telemetry, reason: str) -> float:
    return telemetry.value("calltrace_exporter_errors_total", exporter="recorder", reason=reason)


def test_the_default_budget_is_the_collectors_five_minutes():
    assert RetrySettings().max_elapsed_time == 300.0
    assert retry.UNEXPECTED_ERROR_MAX_ELAPSED == 300.0


async def test_an_unexpected_exception_is_bounded_even_when_max_elapsed_time_is_zero(
    monkeypatch, caplog
):
    monkeypatch.setattr(retry, "UNEXPECTED_ERROR_MAX_ELAPSED", 0.2)
    exporter = Counting(policy("0"), failures=[TypeError("a bug")] * 10_000)
    telemetry = Telemetry()
    queue = ExporterQueue(exporter, telemetry)
    await queue.start()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="collector.exporterhelper"):
        await queue.put(batch(resource_spans({}, [{}, {}])))
        while not failed_spans(telemetry):
            assert time.monotonic() - started < 5, "retried without bound"
            await asyncio.sleep(0.01)
    await queue.shutdown(5)
    assert failed_spans(telemetry) == 2
    assert errors(telemetry, "unexpected") == exporter.attempts > 3
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1 and "recorder" in tracebacks[0].getMessage()
    assert tracebacks[0].exc_info[0] is TypeError


async def test_retryable_errors_are_retried_past_that_bound_when_max_elapsed_time_is_zero(
    monkeypatch,
):
    """``max_elapsed_time: 0`` keeps its meaning for errors the exporter says will pass
    (a persistent queue waiting out a Redis outage)."""
    monkeypatch.setattr(retry, "UNEXPECTED_ERROR_MAX_ELAPSED", 0.05)
    exporter = Counting(policy("0"), failures=[RetryableError("down")] * 40)
    telemetry = Telemetry()
    queue = ExporterQueue(exporter, telemetry)
    await queue.start()
    started = time.monotonic()
    await queue.put(batch(resource_spans({}, [{}])))
    await queue.shutdown(10)
    assert time.monotonic() - started > 0.1
    assert len(exporter.batches) == 1 and failed_spans(telemetry) == 0
    assert errors(telemetry, "retryable") == 40


async def test_once_the_budget_is_spent_each_batch_gets_one_attempt_until_one_succeeds():
    exporter = Counting(policy("100ms"), failures=[TypeError("a bug")] * 10_000)
    telemetry = Telemetry()
    queue = ExporterQueue(exporter, telemetry)
    await queue.start()
    await queue.put(batch(resource_spans({}, [{}])))
    while not failed_spans(telemetry):
        await asyncio.sleep(0.01)
    # The first batch is given up on once its next wait would end past the budget, which
    # may be a little before the budget is spent: wait until it surely is.
    await asyncio.sleep(0.12)
    attempts = exporter.attempts
    for _ in range(5):  # the exporter has failed for longer than its budget
        await queue.put(batch(resource_spans({}, [{}])))
        await asyncio.sleep(0.02)
    while failed_spans(telemetry) < 6:
        await asyncio.sleep(0.01)
    assert exporter.attempts - attempts <= 5  # one each (merged batches: fewer)
    # A success ends the streak: the next failing batch gets the whole budget again.
    exporter.failures = []
    await queue.put(batch(resource_spans({}, [{"name": "ok"}])))
    while not exporter.batches:
        await asyncio.sleep(0.01)
    exporter.failures = [TypeError("again")] * 3
    await queue.put(batch(resource_spans({}, [{"name": "retried"}])))
    while len(exporter.batches) < 2:
        await asyncio.sleep(0.01)
    await queue.shutdown(5)
    assert exporter.span_names() == ["ok", "retried"]
    assert failed_spans(telemetry) == 6


async def test_a_permanent_error_is_counted_as_such_and_does_not_start_a_streak():
    exporter = Counting(policy("1s"), failures=[PermanentError("bad data")])
    telemetry = Telemetry()
    queue = ExporterQueue(exporter, telemetry)
    await queue.start()
    await queue.put(batch(resource_spans({}, [{"name": "bad"}])))
    while exporter.attempts < 1:
        await asyncio.sleep(0.01)
    assert queue._retry.failing_since is None
    await queue.put(batch(resource_spans({}, [{"name": "good"}])))
    await queue.shutdown(5)
    assert errors(telemetry, "permanent") == 1
    assert exporter.span_names() == ["good"]
    assert queue._retry.failing_since is None


async def test_shutdown_drops_an_in_memory_batch_whose_exporter_raises_at_once():
    exporter = Counting(policy("5m"), failures=[TypeError("a bug")] * 10_000)
    telemetry = Telemetry()
    queue = ExporterQueue(exporter, telemetry)
    await queue.start()
    for _ in range(3):
        await queue.put(batch(resource_spans({}, [{}])))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await queue.shutdown(30)
    assert time.monotonic() - started < 2
    assert failed_spans(telemetry) == 3
    assert queue.size == 0


async def test_shutdown_keeps_retrying_a_retryable_error_within_its_timeout():
    exporter = Counting(policy("5m"), failures=[RetryableError("blip")] * 5)
    queue = ExporterQueue(exporter)
    await queue.start()
    await queue.put(batch(resource_spans({}, [{"name": "late"}])))
    await queue.shutdown(5)
    assert exporter.span_names() == ["late"]


async def test_shutdown_leaves_a_persistent_queues_failing_batch_for_the_next_start(tmp_path):
    exporter = Counting(policy("5m", storage=str(tmp_path)), failures=[ValueError("a bug")] * 99)
    queue = ExporterQueue(exporter)
    await queue.start()
    await queue.put(batch(resource_spans({}, [{"name": "kept"}])))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await queue.shutdown(30)
    assert time.monotonic() - started < 2
    fixed = Recorder(policy("5m", storage=str(tmp_path)))
    queue = ExporterQueue(fixed)
    await queue.start()
    await queue.shutdown(5)
    assert fixed.span_names() == ["kept"]


class SlowlyFailing(Recorder):
    """A destination that times out: each attempt fails after 50 ms."""

    async def export(self, b):
        await asyncio.sleep(0.05)
        raise RetryableError("timed out")


async def test_past_its_budget_a_full_queue_sheds_instead_of_refusing(caplog):
    exporter = SlowlyFailing(policy("100ms", queue_size=2))
    telemetry = Telemetry()
    queue = ExporterQueue(exporter, telemetry)
    await queue.start()
    await queue.put(batch(resource_spans({}, [{}, {}])))
    assert not queue.has_room(1) and queue.nearly_full()  # within its budget: refused
    with pytest.raises(RefusedError):
        await queue.put(batch(resource_spans({}, [{}])))
    while not queue.past_budget():
        await asyncio.sleep(0.01)
    with caplog.at_level(logging.ERROR, logger="collector.exporterhelper"):
        for _ in range(10):  # taken, each one shed for this exporter alone
            assert queue.has_room(1) and not queue.nearly_full()
            await queue.put(batch(resource_spans({}, [{}])))
    assert len([r for r in caplog.records if "dropped for it" in r.getMessage()]) == 1
    await queue.shutdown(5)
    assert failed_spans(telemetry) >= 10


async def test_with_max_elapsed_time_zero_a_full_queue_keeps_refusing():
    """Explicitly told to wait out an outage, the queue pushes back (503) rather than
    drop anything."""
    exporter = SlowlyFailing(policy("0", queue_size=2))
    queue = ExporterQueue(exporter)
    await queue.start()
    await queue.put(batch(resource_spans({}, [{}, {}])))
    await asyncio.sleep(0.3)
    assert not queue.past_budget() and not queue.has_room(1)
    with pytest.raises(RefusedError):
        await queue.put(batch(resource_spans({}, [{}])))
    await queue.shutdown(0.05)
