"""Lifecycle conformance, for free, for every registered processor and exporter:
the default config validates, start and shutdown work, shutdown twice is harmless."""

from __future__ import annotations

import pytest

from collector.registry import available, resolve
from tests.processors._util import FakeTelemetryHost, batch, resource_spans

PROCESSORS = sorted(available("processors"))
EXPORTERS = sorted(available("exporters"))
NEEDS_SETTINGS = {"file": {"path": "out.jsonl"}}
NEEDS_SERVER = {"redis_streams", "postgres", "otlphttp"}  # covered by tests against real servers


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # defaults such as ./data/calltrace.db land here


def test_builtins_are_registered():
    assert {"auth", "skip", "correlate", "batch"} <= set(PROCESSORS)
    assert {"sqlite", "file", "debug", "otlphttp"} <= set(EXPORTERS)


@pytest.mark.parametrize("type_name", PROCESSORS)
async def test_processor_lifecycle(type_name):
    cls = resolve("processors", type_name)
    processor = cls(type_name, cls.Config.model_validate({}))
    await processor.start(FakeTelemetryHost())
    if type_name != "auth":  # auth admits by key, not by batch
        result = await processor.process(batch(resource_spans({}, [{}])))
        assert result is None or result.span_count <= 1
    await processor.shutdown()
    await processor.shutdown()


@pytest.mark.parametrize("type_name", [e for e in EXPORTERS if e not in NEEDS_SERVER])
async def test_exporter_lifecycle(type_name):
    cls = resolve("exporters", type_name)
    exporter = cls(type_name, cls.Config.model_validate(NEEDS_SETTINGS.get(type_name, {})))
    await exporter.start(FakeTelemetryHost())
    await exporter.export(batch(resource_spans({"service.name": "x"}, [{}])))
    await exporter.shutdown()
    await exporter.shutdown()
