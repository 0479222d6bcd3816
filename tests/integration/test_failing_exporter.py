"""Issue 16 defect 3: a plugin exporter that raises an unexpected exception on every
batch, next to the real sqlite exporter. It must stop the others for no longer than its
``retry_on_failure`` budget: afterwards every request is answered 200 and stored by
sqlite, the failure is counted in ``/metrics``, its traceback is logged once, and
shutdown does not wait out its timeout."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest

from collector import Exporter, ExporterConfig, RetryableError, SpanBatch
from collector.keys import KeyStore
from collector.spans import ExportTraceServiceRequest
from tests.processors._util import resource_spans
from tests.support import eventually, free_port, pipeline_config, query, running_service


class TypeErrorExporter(Exporter):
    """A plugin with a bug: every export raises ``TypeError``."""

    Config = ExporterConfig

    async def export(self, batch: SpanBatch) -> None:
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")


class DeadDestinationExporter(Exporter):
    """A destination that does not answer: every export fails after a wait."""

    Config = ExporterConfig

    async def export(self, batch: SpanBatch) -> None:
        await asyncio.sleep(0.3)
        raise RetryableError("connection timed out")


PLUGIN = f"{__name__}:TypeErrorExporter"


def _config(port: int, db, plugin: str = PLUGIN, **plugin_settings):
    config = pipeline_config(port, db)
    config["exporters"]["buggy"] = {"type": plugin, **plugin_settings}
    config["service"]["pipelines"]["traces"]["exporters"] = ["sqlite", "buggy"]
    config["service"]["shutdown_timeout"] = 30
    return config


def _request(index: int) -> bytes:
    rs = resource_spans({"service.name": "agent"}, [{"name": f"span-{index}"}] * 5)
    return ExportTraceServiceRequest(resource_spans=[rs]).SerializeToString()


@pytest.mark.parametrize("plugin", ["TypeErrorExporter", "DeadDestinationExporter"])
async def test_a_failing_plugin_exporter_stops_the_others_only_within_its_budget(
    tmp_path, caplog, plugin
):
    """``TypeErrorExporter`` fails at once, every time; ``DeadDestinationExporter`` takes
    0.3 s to fail, so past its budget (one attempt a batch) its queue still fills: it
    then sheds new batches for itself alone."""
    caplog.set_level(logging.WARNING)
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    config = _config(
        port,
        db,
        f"{__name__}:{plugin}",
        sending_queue={"queue_size": 40},
        retry_on_failure={
            "initial_interval": "50ms",
            "max_interval": "200ms",
            "max_elapsed_time": "1s",
        },
    )
    headers = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {key}"}
    url = f"http://127.0.0.1:{port}/v1/traces"
    answered: list[tuple[int, int]] = []  # (request index, status)
    async with running_service(config) as service, aiohttp.ClientSession() as session:

        async def send(index: int) -> int:
            async with session.post(url, data=_request(index), headers=headers) as response:
                await response.read()
                answered.append((index, response.status))
                return response.status

        # While the budget runs the plugin's queue fills (a 503 is allowed then)...
        index = 0
        started = time.monotonic()
        while time.monotonic() - started < 1.5 or not service.telemetry.value(
            "calltrace_exporter_send_failed_spans_total", exporter="buggy"
        ):
            assert time.monotonic() - started < 20, "the budget was never spent"
            await send(index)
            index += 1
            await asyncio.sleep(0.02)
        # ...once spent, each of its batches gets one attempt: nothing is refused.
        later = [await send(i) for i in range(index, index + 40)]
        assert later == [200] * 40, later

        accepted = {i for i, status in answered if status == 200}
        expected = sorted(f"span-{i}" for i in accepted for _ in range(5))

        def stored():
            names = [n for (n,) in query(db, "SELECT name FROM spans ORDER BY name")]
            return names if names == expected else None

        await eventually(stored, timeout=15)
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            metrics = await response.text()
        shutdown_started = time.monotonic()
    shutdown_took = time.monotonic() - shutdown_started

    reason = "unexpected" if plugin == "TypeErrorExporter" else "retryable"
    errors = [
        line
        for line in metrics.splitlines()
        if line.startswith("calltrace_exporter_errors_total{")
        and 'exporter="buggy"' in line
        and f'reason="{reason}"' in line
    ]
    assert errors and float(errors[0].split()[-1]) > 1, metrics
    failed = service.telemetry.value("calltrace_exporter_send_failed_spans_total", exporter="buggy")
    assert failed >= 5 * 40
    sqlite_failed = "calltrace_exporter_send_failed_spans_total"
    assert service.telemetry.value(sqlite_failed, exporter="sqlite") == 0
    assert shutdown_took < 5, shutdown_took
    if plugin != "TypeErrorExporter":
        return
    tracebacks = [
        r
        for r in caplog.records
        if r.exc_info and r.exc_info[0] is TypeError and "buggy" in r.getMessage()
    ]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    assert "unsupported operand" in caplog.text


async def test_shutdown_keeps_a_failing_exporters_batches_on_disk_without_waiting(tmp_path):
    """With a persistent queue, shutdown stops retrying the unexpected exception at once
    and keeps the batch for the next start (where it gets a new budget)."""
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    config = _config(
        port,
        db,
        sending_queue={"storage": str(tmp_path / "queue")},
        retry_on_failure={"initial_interval": "5s", "max_interval": "5s"},
    )
    headers = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {key}"}
    async with running_service(config), aiohttp.ClientSession() as session:
        async with session.post(
            f"http://127.0.0.1:{port}/v1/traces", data=_request(0), headers=headers
        ) as response:
            assert response.status == 200
        await eventually(lambda: query(db, "SELECT count(*) FROM spans")[0][0] == 5)
        shutdown_started = time.monotonic()
    assert time.monotonic() - shutdown_started < 5
    segments = list((tmp_path / "queue" / "buggy.queue").iterdir())
    assert segments and any(path.stat().st_size for path in segments)
