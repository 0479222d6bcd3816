"""A processor that raises is isolated: logged once with its traceback, counted, and
its batch dropped, passed on as it came in, or refused, as its ``on_error`` says; the
collector goes on serving, and other pipelines never notice."""

from __future__ import annotations

import logging

import aiohttp
import pytest

from collector.config import ConfigError, parse_config
from tests.conftest import memory_pipeline
from tests.receivers.test_otlp_http import http_receiver, post, request_with


def _two_pipelines(port_a: int, port_b: int, on_error: str) -> dict:
    """Pipeline a: a crashing processor then a renaming one, into memory_a; pipeline b:
    only the renaming one, into memory_b."""
    return {
        "receivers": {
            "otlp/a": http_receiver(port_a)["otlp"],
            "otlp/b": http_receiver(port_b)["otlp"],
        },
        "processors": {
            "crash": {
                "type": "tests.conftest:RefusingProcessor",
                "error": "crash",
                "on_error": on_error,
            },
            "rename": {"type": "tests.conftest:SpanRenamingProcessor"},
        },
        "exporters": {
            "memory_a": {"type": "tests.conftest:MemoryExporter"},
            "memory_b": {"type": "tests.conftest:MemoryExporter"},
        },
        "service": {
            "pipelines": {
                "traces/a": {
                    "receivers": ["otlp/a"],
                    "processors": ["crash", "rename"],
                    "exporters": ["memory_a"],
                },
                "traces/b": {
                    "receivers": ["otlp/b"],
                    "processors": ["rename"],
                    "exporters": ["memory_b"],
                },
            }
        },
    }


def _names(exporter) -> list[str]:
    request = exporter.request()
    return [s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]


@pytest.mark.parametrize("on_error", ["drop", "pass"])
async def test_a_failing_processor_is_isolated(make_service, free_port, caplog, on_error):
    port_a, port_b = free_port(), free_port()
    service = await make_service(_two_pipelines(port_a, port_b, on_error))
    caplog.set_level(logging.DEBUG, logger="collector.pipeline")
    for _ in range(3):
        status, _, _ = await post(
            f"http://127.0.0.1:{port_a}/v1/traces", request_with(2).SerializeToString()
        )
        assert status == 200
        status, _, _ = await post(
            f"http://127.0.0.1:{port_b}/v1/traces", request_with(1).SerializeToString()
        )
        assert status == 200
    memory_a = service.exporters["memory_a"]
    memory_b = service.exporters["memory_b"]
    assert _names(memory_b) == ["renamed span"] * 3  # the other pipeline, untouched
    if on_error == "drop":
        assert memory_a.span_count == 0
        assert (
            service.telemetry.value("calltrace_processor_dropped_spans_total", processor="crash")
            == 6
        )
    else:  # passed on as it came in, through the processors after it
        assert _names(memory_a) == ["renamed span"] * 6
    assert (
        service.telemetry.value(
            "calltrace_processor_errors_total", processor="crash", outcome=on_error
        )
        == 3
    )
    tracebacks = [r for r in caplog.records if r.exc_info and "crash" in r.getMessage()]
    assert len(tracebacks) == 1  # logged once with its traceback, then counted
    url = f"http://127.0.0.1:{port_a}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert 'calltrace_processor_errors_total{outcome="' + on_error in await response.text()


def test_on_error_is_checked_with_its_yaml_path():
    config = memory_pipeline(
        {"otlp": {}}, {"crash": {"type": "tests.conftest:RefusingProcessor", "on_error": "ignore"}}
    )
    with pytest.raises(ConfigError) as error:
        parse_config(config)
    assert "processors.crash.on_error: expected one of drop, pass, refuse, got 'ignore'" in str(
        error.value
    )
