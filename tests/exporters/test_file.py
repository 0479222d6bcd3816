"""The file exporter writes OTLP/JSON lines that decode back to the same spans."""

from __future__ import annotations

from collector import SpanBatch
from collector.otlp_json import decode_request
from exporters.file import FileConfig, FileExporter
from tests.processors._util import FakeTelemetryHost, resource_spans


async def test_lines_round_trip(tmp_path):
    path = tmp_path / "out" / "spans.jsonl"
    exporter = FileExporter("file", FileConfig(path=path))
    await exporter.start(FakeTelemetryHost())
    first = SpanBatch([resource_spans({"service.name": "a"}, [{"name": "x"}, {"name": "y"}])], "p1")
    second = SpanBatch([resource_spans({"service.name": "b"}, [{"name": "z"}])], None)
    await exporter.export(first)
    await exporter.export(second)
    await exporter.shutdown()
    lines = path.read_bytes().splitlines()
    assert len(lines) == 2
    decoded = decode_request(lines[0])
    assert [s.name for s in decoded.resource_spans[0].scope_spans[0].spans] == ["x", "y"]
    assert decoded.resource_spans[0].scope_spans[0].spans[0].trace_id == (
        first.resource_spans[0].scope_spans[0].spans[0].trace_id
    )
    keys = {kv.key for kv in decoded.resource_spans[0].resource.attributes}
    assert "calltrace.project" in keys
    # The shared batch itself was not modified.
    assert "calltrace.project" not in {kv.key for kv in first.resource_spans[0].resource.attributes}
