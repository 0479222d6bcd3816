"""The ``filter`` processor: by name, attribute, duration, status; include and exclude."""

from __future__ import annotations

import pytest

from collector.config import ConfigError, parse_config
from collector.testing import FakeHost, exported_spans, make_batch, run_pipeline, run_processor
from processors.filter import FilterProcessor

DROPPED = "calltrace_processor_dropped_spans_total"


def _batch():
    return make_batch(
        [
            {
                "resource": {"service.name": "agent"},
                "spans": [
                    {"name": "agent_turn", "duration_ms": 2500, "status": "ok"},
                    {"name": "user_speaking", "duration_ms": 900},
                    {"name": "eou_wait", "duration_ms": 500},
                    {
                        "name": "llm_request",
                        "duration_ms": 300,
                        "status": "error",
                        "attributes": {"gen_ai.request.model": "gpt-4.1", "retry": 2},
                    },
                ],
            },
            {"resource": {"service.name": "noise"}, "spans": [{"name": "user_speaking"}]},
        ],
        project="p1",
    )


def _kept(settings, host=None):
    out = run_processor(FilterProcessor, settings, _batch(), host=host)
    if out is None:
        return None
    return [span.name for span in exported_spans(out.resource_spans)]


def test_exclude_by_name_regexp_drops_and_counts():
    host = FakeHost()
    kept = _kept(
        {"exclude": {"match_type": "regexp", "span_names": ["^(user_speaking|eou_wait)$"]}},
        host,
    )
    assert kept == ["agent_turn", "llm_request"]
    assert host.telemetry.value(DROPPED, processor="filter") == 3


def test_resource_left_without_spans_is_removed():
    out = run_processor(FilterProcessor, {"exclude": {"span_names": ["user_speaking"]}}, _batch())
    assert out is not None
    assert len(out.resource_spans) == 1


def test_include_strict_names():
    assert _kept({"include": {"span_names": ["llm_request", "agent_turn"]}}) == [
        "agent_turn",
        "llm_request",
    ]


def test_duration_bounds():
    assert _kept({"include": {"min_duration": "500ms", "max_duration": "1s"}}) == [
        "user_speaking",
        "eou_wait",
    ]
    assert _kept({"exclude": {"max_duration": "499ms"}}) == [
        "agent_turn",
        "user_speaking",
        "eou_wait",
    ]


def test_status():
    assert _kept({"include": {"status": ["error"]}}) == ["llm_request"]
    assert _kept({"exclude": {"status": ["unset"]}}) == ["agent_turn", "llm_request"]


def test_attributes_strict_and_regexp():
    assert _kept({"include": {"attributes": [{"key": "retry", "value": 2}]}}) == ["llm_request"]
    assert _kept({"include": {"attributes": [{"key": "retry", "value": 3}]}}) is None
    assert _kept(
        {
            "include": {
                "match_type": "regexp",
                "attributes": [{"key": "gen_ai.request.model", "value": "^gpt-4"}],
            }
        }
    ) == ["llm_request"]
    # a bool condition is not met by an int, nor the reverse
    assert _kept({"include": {"attributes": [{"key": "retry", "value": True}]}}) is None


def test_include_and_exclude_together():
    assert _kept({"include": {"min_duration": "400ms"}, "exclude": {"status": ["ok"]}}) == [
        "user_speaking",
        "eou_wait",
    ]


def test_everything_dropped_passes_nothing_on():
    host = FakeHost()
    assert _kept({"include": {"span_names": ["nothing"]}}, host) is None
    assert host.telemetry.value(DROPPED, processor="filter") == 5


def test_the_default_config_keeps_everything():
    before = _batch()
    out = run_processor(FilterProcessor, None, before)
    assert out is not None
    assert [rs.SerializeToString() for rs in out.resource_spans] == [
        rs.SerializeToString() for rs in before.resource_spans
    ]


def test_nothing_dropped_changes_nothing():
    before = _batch()
    out = run_processor(FilterProcessor, {"exclude": {"span_names": ["absent"]}}, before)
    assert out is not None
    assert [rs.SerializeToString() for rs in out.resource_spans] == [
        rs.SerializeToString() for rs in before.resource_spans
    ]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"include": {"status": ["failed"]}},
            "processors.filter.include.status.0: input should be",
        ),
        (
            {"exclude": {"min_duration": "slow"}},
            'processors.filter.exclude.min_duration: expected a duration like "200ms"',
        ),
        (
            {"exclude": {"min_duration": "2s", "max_duration": "1s"}},
            "processors.filter.exclude: min_duration (2.0s) is above max_duration (1.0s)",
        ),
        ({"exclude": {"spans": ["x"]}}, "processors.filter.exclude.spans: unknown key"),
    ],
)
def test_config_errors_name_the_yaml_path(settings, message):
    document = {
        "receivers": {"otlp": None},
        "processors": {"filter": settings},
        "exporters": {"debug": None},
        "service": {
            "pipelines": {
                "traces": {"receivers": ["otlp"], "processors": ["filter"], "exporters": ["debug"]}
            }
        },
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    assert any(error.startswith(message) for error in caught.value.errors), caught.value.errors


def test_dropped_spans_reach_no_exporter():
    result = run_pipeline(
        """
processors:
  filter: {exclude: {span_names: [user_speaking, eou_wait]}}
exporters:
  memory: {type: "collector.testing:InMemoryExporter"}
  debug: {verbosity: basic}
service:
  pipelines:
    traces: {processors: [filter], exporters: [memory, debug]}
""",
        [_batch()],
    )
    for exporter_id in ("memory", "debug"):
        assert [span.name for span in result[exporter_id]] == ["agent_turn", "llm_request"]
