"""The ``attributes`` processor: each action, its context, include/exclude, config errors."""

from __future__ import annotations

import hashlib

import pytest

from collector.config import ConfigError, parse_config
from collector.testing import (
    assert_attribute,
    attributes_of,
    exported_spans,
    make_batch,
    run_pipeline,
    run_processor,
)
from processors.attributes import AttributesProcessor, hash_value


def _batch():
    return make_batch(
        [
            {
                "resource": {"service.name": "agent", "livekit.room.id": "RM_1"},
                "spans": [
                    {"name": "llm_request", "attributes": {"gen_ai.request.model": "gpt-4.1"}},
                    {"name": "tts_request", "attributes": {"lk.pii.input_text": "Hi there"}},
                ],
            },
            {"resource": {"service.name": "other"}, "spans": [{"name": "stt"}]},
        ],
        project="p1",
    )


def _spans(batch):
    return {span.name: span for span in exported_spans(batch.resource_spans)}


def _run(actions, **match):
    out = run_processor(AttributesProcessor, {"actions": actions, **match}, _batch())
    assert out is not None
    return out


def test_insert_sets_only_where_absent():
    out = _spans(
        _run(
            [
                {"key": "env", "action": "insert", "value": "prod"},
                {"key": "gen_ai.request.model", "action": "insert", "value": "other"},
            ]
        )
    )
    assert out["llm_request"].attributes == {"gen_ai.request.model": "gpt-4.1", "env": "prod"}
    assert_attribute(out["stt"], "env", "prod")


def test_update_sets_only_where_present():
    out = _spans(_run([{"key": "gen_ai.request.model", "action": "update", "value": "redacted"}]))
    assert_attribute(out["llm_request"], "gen_ai.request.model", "redacted")
    assert "gen_ai.request.model" not in out["tts_request"].attributes


def test_upsert_sets_either_way_with_typed_values():
    out = _spans(
        _run(
            [
                {"key": "gen_ai.request.model", "action": "upsert", "value": 7},
                {"key": "tags", "action": "upsert", "value": ["a", "b"]},
                {"key": "flag", "action": "upsert", "value": True},
            ]
        )
    )
    assert out["llm_request"].attributes == {
        "gen_ai.request.model": 7,
        "tags": ["a", "b"],
        "flag": True,
    }
    assert_attribute(out["stt"], "flag", True)


def test_from_attribute_copies_within_the_same_span():
    out = _spans(
        _run([{"key": "model", "action": "insert", "from_attribute": "gen_ai.request.model"}])
    )
    assert_attribute(out["llm_request"], "model", "gpt-4.1")
    assert "model" not in out["tts_request"].attributes  # no source: nothing set


def test_delete_and_hash():
    out = _spans(
        _run(
            [
                {"key": "lk.pii.input_text", "action": "hash"},
                {"key": "gen_ai.request.model", "action": "delete"},
            ]
        )
    )
    digest = hashlib.sha256(b"Hi there").hexdigest()
    assert out["tts_request"].attributes == {"lk.pii.input_text": digest}
    assert out["llm_request"].attributes == {}
    assert hash_value(b"\x00") == hashlib.sha256(b"\x00").hexdigest()
    assert hash_value(12) == hashlib.sha256(b"12").hexdigest()


def test_resource_context_edits_resources_of_chosen_spans_only():
    out = _run(
        [{"key": "region", "action": "upsert", "value": "eu", "context": "resource"}],
        include={"span_names": ["llm_request"]},
    )
    first, second = out.resource_spans
    assert_attribute(first.resource, "region", "eu")
    assert "region" not in attributes_of(second)
    # the spans themselves are untouched
    assert "region" not in _spans(out)["llm_request"].attributes


def test_include_regexp_and_exclude_by_attribute():
    out = _spans(
        _run(
            [{"key": "seen", "action": "insert", "value": True}],
            include={"match_type": "regexp", "span_names": ["_request$"]},
            exclude={"attributes": [{"key": "lk.pii.input_text"}]},
        )
    )
    assert_attribute(out["llm_request"], "seen", True)
    assert "seen" not in out["tts_request"].attributes
    assert "seen" not in out["stt"].attributes


def test_resource_attribute_match():
    out = _spans(
        _run(
            [{"key": "room", "action": "insert", "value": "yes"}],
            include={"resource_attributes": [{"key": "livekit.room.id", "value": "RM_1"}]},
        )
    )
    assert "room" in out["llm_request"].attributes
    assert "room" not in out["stt"].attributes


def test_nothing_else_changes():
    before = _batch()
    out = run_processor(
        AttributesProcessor,
        {"actions": [{"key": "absent", "action": "update", "value": 1}]},
        before,
    )
    assert out is not None
    assert [rs.SerializeToString() for rs in out.resource_spans] == [
        rs.SerializeToString() for rs in before.resource_spans
    ]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"actions": [{"key": "a", "action": "insert"}]},
            "processors.attributes.actions.0: insert of 'a' needs one of value, from_attribute",
        ),
        (
            {"actions": [{"key": "a", "action": "delete", "value": 1}]},
            "processors.attributes.actions.0: delete of 'a' takes no value or from_attribute",
        ),
        (
            {"actions": [{"key": "a", "action": "rename"}]},
            "processors.attributes.actions.0.action: input should be",
        ),
        (
            {
                "actions": [{"key": "a", "action": "hash"}],
                "include": {"match_type": "regexp", "span_names": ["("]},
            },
            "processors.attributes.include: span_names[0]: not a valid regular expression",
        ),
        (
            {"actions": [{"key": "", "action": "delete"}]},
            "processors.attributes.actions.0.key: string should have at least 1 character",
        ),
    ],
)
def test_config_errors_name_the_yaml_path(settings, message):
    document = {
        "receivers": {"otlp": None},
        "processors": {"attributes": settings},
        "exporters": {"debug": None},
        "service": {
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["attributes"],
                    "exporters": ["debug"],
                }
            }
        },
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    assert any(error.startswith(message) for error in caught.value.errors), caught.value.errors


def test_edit_reaches_every_exporter():
    result = run_pipeline(
        """
processors:
  attributes:
    actions: [{key: lk.pii.input_text, action: hash}]
exporters:
  memory/a: {type: "collector.testing:InMemoryExporter"}
  memory/b: {type: "collector.testing:InMemoryExporter"}
service:
  pipelines:
    traces: {processors: [attributes], exporters: [memory/a, memory/b]}
""",
        [_batch()],
    )
    digest = hashlib.sha256(b"Hi there").hexdigest()
    for exporter_id in ("memory/a", "memory/b"):
        spans = {span.name: span for span in result[exporter_id]}
        assert_attribute(spans["tts_request"], "lk.pii.input_text", digest)


def test_resource_only_actions_on_received_requests(tmp_path):
    """Resource actions without a match leave the spans as received (their bytes are
    written out again); every exporter stores the edited resources and the same spans."""
    from collector.testing import load_batch
    from tests.support import fixture_requests

    batches = [load_batch(path, project="p1") for path in fixture_requests("livekit")]
    expected = [span for batch in batches for span in exported_spans(batch.resource_spans)]
    result = run_pipeline(
        f"""
processors:
  attributes:
    actions:
      - {{key: deployment.region, action: upsert, value: eu, context: resource}}
      - {{key: service.name, action: hash, context: resource}}
exporters:
  memory: {{type: "collector.testing:InMemoryExporter"}}
  file: {{path: "{tmp_path / "out.jsonl"}"}}
service:
  pipelines:
    traces: {{processors: [attributes], exporters: [memory, file]}}
""",
        batches,
    )
    for exporter_id in ("memory", "file"):
        got = result[exporter_id]
        assert [s.span for s in got] == [s.span for s in expected], exporter_id
        for span in got:
            assert_attribute(span.resource, "deployment.region", "eu")
            assert_attribute(
                span.resource, "service.name", hash_value("livekit-voice-agent-fixture")
            )
