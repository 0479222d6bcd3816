"""collector.testing: the kit plugin authors test with must itself be right."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from collector import Processor, SpanBatch, iter_spans, set_attribute
from collector.config import ConfigError
from collector.spans import ExportTraceServiceRequest
from collector.testing import (
    FakeHost,
    InMemoryExporter,
    arun_pipeline,
    arun_processor,
    assert_attribute,
    attributes_of,
    batch_from_sdk,
    exported_spans,
    load_batch,
    make_batch,
    run_exporter,
    run_pipeline,
    run_processor,
    span_named,
)
from tests.support import FIXTURES


def test_make_batch_from_dicts():
    batch = make_batch(
        [
            {
                "resource": {"service.name": "agent", "n": 1},
                "scope": {"name": "livekit-agents", "version": "1.8"},
                "spans": [
                    {
                        "name": "llm",
                        "attributes": {"model": "gpt", "ok": True, "tags": ["a"], "m": {"k": 1.5}},
                        "trace_id": "ab" * 16,
                        "span_id": "01" * 8,
                        "parent_span_id": "02" * 8,
                        "kind": "client",
                        "duration_ms": 250,
                        "status": {"code": "error", "message": "boom"},
                        "events": [{"name": "exception", "attributes": {"exception.type": "E"}}],
                    },
                    {"name": "tts", "start_time_unix_nano": 10, "end_time_unix_nano": 30},
                ],
            }
        ],
        project="p1",
        transport="http",
    )
    assert (batch.project, batch.metadata, batch.span_count) == ("p1", {"transport": "http"}, 2)
    llm, tts = exported_spans(batch.resource_spans)
    assert llm.resource_attributes == {"service.name": "agent", "n": 1}
    assert (llm.scope.name, llm.scope.version) == ("livekit-agents", "1.8")
    assert llm.attributes == {"model": "gpt", "ok": True, "tags": ["a"], "m": {"k": 1.5}}
    assert (llm.trace_id, llm.span_id, llm.span.parent_span_id.hex()) == (
        "ab" * 16,
        "01" * 8,
        "02" * 8,
    )
    assert llm.span.end_time_unix_nano - llm.span.start_time_unix_nano == 250_000_000
    assert (llm.span.status.code, llm.span.status.message, llm.span.kind) == (2, "boom", 3)
    assert_attribute(llm.span.events[0], "exception.type", "E")
    assert (tts.span.start_time_unix_nano, tts.span.end_time_unix_nano) == (10, 30)
    assert tts.span.trace_id != llm.span.trace_id or tts.trace_id == "ab" * 16


def test_make_batch_shares_a_trace_per_resource_and_refuses_typos():
    batch = make_batch({"spans": [{"name": "a"}, {"name": "b"}]})
    a, b = exported_spans(batch.resource_spans)
    assert a.trace_id == b.trace_id and a.span_id != b.span_id
    with pytest.raises(ValueError, match=r"resources\[0\].spans\[0\]: unknown keys \['attrs'\]"):
        make_batch([{"spans": [{"name": "a", "attrs": {}}]}])


@pytest.mark.parametrize("name", ["001.pb", "001.otlp.json", "001.json"])
def test_load_batch_reads_each_fixture_format(name):
    expected = ExportTraceServiceRequest.FromString((FIXTURES / "livekit" / "001.pb").read_bytes())
    batch = load_batch(FIXTURES / "livekit" / name, project="p1")
    assert batch.project == "p1"
    assert batch.to_request() == expected


def test_batch_from_sdk_spans():
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "sdk-agent"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test-scope")
    with tracer.start_as_current_span("agent_turn") as turn:
        turn.set_attribute("lk.pii.user_input", "hello")
        with tracer.start_as_current_span("llm") as llm:
            llm.set_status(Status(StatusCode.ERROR, "timeout"))
    provider.shutdown()
    batch = batch_from_sdk(memory.get_finished_spans(), project="p1")
    spans = exported_spans(batch.resource_spans)
    turn_span, llm_span = span_named(spans, "agent_turn"), span_named(spans, "llm")
    assert_attribute(turn_span, "lk.pii.user_input", "hello")
    assert_attribute(turn_span.resource, "service.name", "sdk-agent")
    assert llm_span.span.parent_span_id == turn_span.span.span_id
    assert llm_span.span.status.code == 2
    assert turn_span.scope.name == "test-scope"


class _Upper(Processor):
    type_name = "upper"

    def __init__(self, component_id, config):
        super().__init__(component_id, config)
        self.events: list[str] = []

    async def start(self, host):
        self.events.append("start")
        host.telemetry.dropped(self.id, 0)

    async def process(self, batch: SpanBatch) -> SpanBatch | None:
        self.events.append("process")
        for rs in batch.resource_spans:
            for span in iter_spans(rs):
                span.name = span.name.upper()
                set_attribute(span.attributes, "seen", True)
        return batch

    async def shutdown(self):
        self.events.append("shutdown")


def test_run_processor_runs_the_lifecycle_on_a_copy():
    processor = _Upper("upper", _Upper.Config())
    batch = make_batch({"spans": [{"name": "llm"}]})
    out = run_processor(processor, None, batch, host=FakeHost())
    assert processor.events == ["start", "process", "shutdown"]
    assert out is not None
    assert [s.name for s in exported_spans(out.resource_spans)] == ["LLM"]
    assert [s.name for s in exported_spans(batch.resource_spans)] == ["llm"]  # untouched
    with pytest.raises(TypeError, match="config with a component class"):
        run_processor(processor, {"x": 1}, batch)


def test_run_processor_validates_dict_configs():
    from pydantic import ValidationError

    from processors.redact import RedactProcessor

    with pytest.raises(ValidationError):
        run_processor(RedactProcessor, {"patterns": ["nope"]}, make_batch({"spans": []}))


def test_run_processor_merges_regrouped_batches():
    from processors.batch import BatchProcessor

    batches = make_batch([{"spans": [{"name": "a"}]}, {"spans": [{"name": "b"}]}])
    out = run_processor(BatchProcessor, {"send_batch_size": 1}, batches)
    assert out is not None
    assert sorted(s.name for s in exported_spans(out.resource_spans)) == ["a", "b"]


async def test_async_twins_and_no_nested_loops():
    out = await arun_processor(_Upper, None, make_batch({"spans": [{"name": "x"}]}))
    assert out is not None and exported_spans(out.resource_spans)[0].name == "X"
    with pytest.raises(RuntimeError, match="arun_"):
        run_processor(_Upper, None, make_batch({"spans": [{"name": "x"}]}))
    result = await arun_pipeline(_MEMORY_ONLY, [make_batch({"spans": [{"name": "y"}]})])
    assert [s.name for s in result["memory"]] == ["y"]


def test_in_memory_exporter_keeps_copies():
    batch = make_batch({"resource": {"r": 1}, "spans": [{"name": "a"}, {"name": "b"}]}, project="p")
    exporter = run_exporter(InMemoryExporter, None, [batch, batch])
    assert isinstance(exporter, InMemoryExporter)
    assert [s.name for s in exporter.get_finished_spans()] == ["a", "b", "a", "b"]
    assert exporter.batches[0].project == "p"
    batch.resource_spans[0].scope_spans[0].spans[0].name = "changed"
    assert exporter.spans[0].name == "a"
    assert attributes_of(exporter.resource_spans[0]) == {"r": 1}
    exporter.clear()
    assert exporter.spans == []


_MEMORY_ONLY = """
exporters:
  memory: {type: "collector.testing:InMemoryExporter"}
service:
  pipelines:
    traces: {exporters: [memory]}
"""


def test_run_pipeline_feeds_every_pipeline_and_accepts_requests_and_bytes():
    config = """
processors:
  attributes/a: {actions: [{key: pipeline, action: insert, value: a}]}
  attributes/b: {actions: [{key: pipeline, action: insert, value: "${env:B_VALUE}"}]}
exporters:
  memory/a: {type: "collector.testing:InMemoryExporter"}
  memory/b: {type: "collector.testing:InMemoryExporter"}
  memory/shared: {type: "collector.testing:InMemoryExporter"}
service:
  pipelines:
    traces/a: {processors: [attributes/a], exporters: [memory/a, memory/shared]}
    traces/b: {processors: [attributes/b], exporters: [memory/b, memory/shared]}
"""
    batch = make_batch({"spans": [{"name": "s"}]})
    inputs = [batch, batch.to_request(), batch.serialize()]
    result = run_pipeline(config, inputs, environ={"B_VALUE": "b"})
    assert [s.attributes for s in result["memory/a"]] == [{"pipeline": "a"}] * 3
    assert [s.attributes for s in result["memory/b"]] == [{"pipeline": "b"}] * 3
    assert (
        sorted(s.attributes["pipeline"] for s in result["memory/shared"]) == ["a"] * 3 + ["b"] * 3
    )
    only_b = run_pipeline(config, [batch], pipeline="traces/b", environ={"B_VALUE": "b"})
    assert (len(only_b["memory/a"]), len(only_b["memory/b"])) == (0, 1)
    with pytest.raises(KeyError, match="no pipeline 'traces/c'"):
        run_pipeline(config, [batch], pipeline="traces/c", environ={"B_VALUE": "b"})


def test_run_pipeline_config_errors_name_the_path():
    with pytest.raises(ConfigError) as caught:
        run_pipeline(
            _MEMORY_ONLY.replace("exporters: [memory]", "processors: [filter], exporters: [memory]")
            + "processors:\n  filter: {include: {status: [broken]}}\n",
            [],
        )
    assert any(e.startswith("processors.filter.include.status.0") for e in caught.value.errors)


def test_assertion_helpers_fail_with_what_they_found():
    span = exported_spans(
        make_batch({"spans": [{"attributes": {"n": 1, "b": True}}]}).resource_spans
    )[0]
    assert_attribute(span, "n", 1)
    assert_attribute(span, "b")
    with pytest.raises(AssertionError, match="attribute 'n' is 1, expected 2"):
        assert_attribute(span, "n", 2)
    with pytest.raises(AssertionError, match="attribute 'b' is True, expected 1"):
        assert_attribute(span, "b", 1)
    with pytest.raises(AssertionError, match="no attribute 'x'"):
        assert_attribute(span.span, "x")
    with pytest.raises(AssertionError, match="0 spans named 'x'"):
        span_named([span], "x")
