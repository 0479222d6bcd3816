"""docs/plugins.md: its code compiles, its YAML loads, and its configs validate."""

from __future__ import annotations

import re
import textwrap

import pytest
import yaml

from collector.config import parse_config
from collector.testing import assert_attribute, make_batch, run_pipeline, run_processor
from tests.support import ROOT

GUIDE = (ROOT / "docs" / "plugins.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", GUIDE, re.S)


@pytest.mark.parametrize(
    "code", [code for kind, code in BLOCKS if kind == "python"], ids=lambda c: c.split("\n")[0]
)
def test_python_blocks_compile(code):
    compile(code, "docs/plugins.md", "exec")


@pytest.mark.parametrize(
    "text", [text for kind, text in BLOCKS if kind == "yaml"], ids=lambda t: t.split("\n")[0]
)
def test_yaml_blocks_load(text):
    assert isinstance(yaml.safe_load(text), dict)


def test_the_five_minute_processor_works_as_shown():
    namespace: dict = {}
    exec(next(code for kind, code in BLOCKS if kind == "python"), namespace)
    processor = namespace["TagRegionProcessor"]
    batch = make_batch({"resource": {"service.name": "agent"}, "spans": [{"name": "llm"}]})
    out = run_processor(processor, {"region": "eu-west-1"}, batch)
    assert out is not None
    assert_attribute(out.resource_spans[0], "cloud.region", "eu-west-1")


def test_the_redact_config_of_the_guide_validates_and_masks():
    block = next(text for kind, text in BLOCKS if kind == "yaml" and "custom_patterns" in text)
    document = yaml.safe_load(block)
    document["receivers"] = {"otlp": None}
    document["exporters"] = {"sqlite": None}
    for name in ("auth", "skip", "correlate", "batch"):
        document["processors"][name] = None
    parse_config(document)
    processors = yaml.safe_dump({"processors": {"redact": document["processors"]["redact"]}})
    got = run_pipeline(
        processors
        + textwrap.dedent(
            """
            exporters:
              memory: {type: "collector.testing:InMemoryExporter"}
            service:
              pipelines:
                traces: {processors: [redact], exporters: [memory]}
            """
        ),
        [
            make_batch(
                {
                    "spans": [
                        {
                            "attributes": {
                                "lk.pii.user_input": "I'm MBR-12345678, mail a@b.io",
                                "lk.pii.chat_ctx": "{}",
                            }
                        }
                    ]
                }
            )
        ],
    )
    (span,) = got["memory"]
    assert span.attributes == {
        "lk.pii.user_input": "I'm [REDACTED:member_id], mail [REDACTED:email]",
        "lk.pii.chat_ctx": "[REDACTED:denied]",
    }


def test_the_span_match_block_validates():
    from collector import SpanMatch

    block = next(text for kind, text in BLOCKS if kind == "yaml" and "match_type" in text)
    SpanMatch.model_validate(yaml.safe_load(block)["include"])


def test_the_entries_example_drops_and_edits_resources():
    namespace: dict = {}
    exec(
        next(code for kind, code in BLOCKS if kind == "python" and "DropTestTraffic" in code),
        namespace,
    )
    batch = make_batch(
        [
            {"resource": {"deployment.environment": "test"}, "spans": [{"name": "a"}]},
            {"resource": {"deployment.environment": "prod"}, "spans": [{"name": "b"}]},
        ]
    )
    out = run_processor(namespace["DropTestTraffic"], None, batch)
    assert out is not None
    (kept,) = out.resource_spans
    assert_attribute(kept, "calltrace.checked", True)
    assert kept.scope_spans[0].spans[0].name == "b"


def test_the_readme_processor_example_validates():
    readme = (ROOT / "README.md").read_text()
    block = next(
        text
        for kind, text in re.findall(r"```(\w+)\n(.*?)```", readme, re.S)
        if kind == "yaml" and "redact:" in text and "filter:" in text
    )
    document = yaml.safe_load(block)
    document["receivers"] = {"otlp": None}
    document["exporters"] = {"sqlite": None}
    for name in ("auth", "skip", "correlate", "batch"):
        document["processors"][name] = None
    config = parse_config(document)
    assert {"redact", "filter", "attributes"} <= set(config.processors)
