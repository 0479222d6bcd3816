import json

import pytest
from collector.testing import make_batch, run_exporter, run_pipeline
from pydantic import ValidationError

from calltrace_plugin_example.jsonl import JSONLinesExporter


def test_writes_one_line_per_span(tmp_path):
    batch = make_batch({"resource": {"r": 1}, "spans": [{"name": "a"}, {"name": "b"}]}, project="p")
    run_exporter(JSONLinesExporter, {"path": str(tmp_path / "out" / "spans.jsonl")}, [batch])
    lines = [
        json.loads(line) for line in (tmp_path / "out" / "spans.jsonl").read_text().splitlines()
    ]
    assert [(line["name"], line["resource"], line["project"]) for line in lines] == [
        ("a", {"r": 1}, "p"),
        ("b", {"r": 1}, "p"),
    ]


def test_in_a_pipeline_with_tag_region(tmp_path):
    config = f"""
processors:
  tag_region: {{region: eu-west-1}}
exporters:
  jsonl: {{path: "{tmp_path / "spans.jsonl"}"}}
service:
  pipelines:
    traces: {{processors: [tag_region], exporters: [jsonl]}}
"""
    result = run_pipeline(config, [make_batch({"spans": [{"name": "llm"}]})])
    assert result["jsonl"][0].resource_attributes == {"cloud.region": "eu-west-1"}
    (line,) = (tmp_path / "spans.jsonl").read_text().splitlines()
    assert json.loads(line)["resource"] == {"cloud.region": "eu-west-1"}


def test_bad_config_is_refused():
    with pytest.raises(ValidationError, match="path"):
        run_exporter(JSONLinesExporter, {}, [])
