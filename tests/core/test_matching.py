"""collector.matching: SpanMatch conditions and include/exclude combination."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from collector import SpanMatch, select
from collector.testing import make_batch


def _span_and_resource(**spec):
    resource = spec.pop("resource", {})
    (rs,) = make_batch({"resource": resource, "spans": [spec]}).resource_spans
    return rs.scope_spans[0].spans[0], rs.resource


def _matches(match: dict, **span) -> bool:
    return SpanMatch.model_validate(match).compile().matches(*_span_and_resource(**span))


def test_an_empty_match_matches_everything():
    matcher = SpanMatch().compile()
    assert matcher.matches_everything
    assert matcher.matches(*_span_and_resource(name="x"))
    assert select(None, None) is None


def test_names_strict_and_regexp():
    assert _matches({"span_names": ["llm", "tts"]}, name="tts")
    assert not _matches({"span_names": ["llm"]}, name="llm_node")
    assert _matches({"match_type": "regexp", "span_names": ["^llm"]}, name="llm_node")
    assert not _matches({"match_type": "regexp", "span_names": ["^tts"]}, name="llm_node")


def test_attribute_values_keep_their_types():
    attributes = {"n": 1, "flag": True, "model": "gpt-4.1", "ratio": 0.5}
    assert _matches({"attributes": [{"key": "n", "value": 1}]}, attributes=attributes)
    assert not _matches({"attributes": [{"key": "n", "value": True}]}, attributes=attributes)
    assert not _matches({"attributes": [{"key": "flag", "value": 1}]}, attributes=attributes)
    assert _matches({"attributes": [{"key": "flag", "value": True}]}, attributes=attributes)
    assert _matches({"attributes": [{"key": "ratio", "value": 0.5}]}, attributes=attributes)
    assert not _matches({"attributes": [{"key": "model", "value": "gpt"}]}, attributes=attributes)
    assert _matches(
        {"match_type": "regexp", "attributes": [{"key": "model", "value": "^gpt-4"}]},
        attributes=attributes,
    )
    assert _matches({"attributes": [{"key": "model"}, {"key": "n"}]}, attributes=attributes)
    assert not _matches(
        {"attributes": [{"key": "model"}, {"key": "absent"}]}, attributes=attributes
    )


def test_resource_attributes_duration_and_status():
    span = {"resource": {"service.name": "agent"}, "duration_ms": 500, "status": "error"}
    assert _matches({"resource_attributes": [{"key": "service.name", "value": "agent"}]}, **span)
    assert _matches({"min_duration": "500ms", "max_duration": "500ms"}, **span)
    assert not _matches({"min_duration": "501ms"}, **span)
    assert _matches({"status": ["error", "ok"]}, **span)
    assert not _matches({"status": ["unset"]}, **span)
    # every condition given must hold
    assert not _matches({"status": ["error"], "span_names": ["other"]}, name="x", **span)


def test_include_and_exclude():
    selected = select(SpanMatch(span_names=["a", "b"]), SpanMatch(attributes=[{"key": "internal"}]))
    assert selected is not None
    assert selected(*_span_and_resource(name="a"))
    assert not selected(*_span_and_resource(name="c"))
    assert not selected(*_span_and_resource(name="b", attributes={"internal": True}))


@pytest.mark.parametrize(
    "settings",
    [
        {"match_type": "regexp", "span_names": ["("]},
        {"match_type": "regexp", "attributes": [{"key": "k", "value": "["}]},
        {"min_duration": "2s", "max_duration": "1s"},
        {"status": ["failed"]},
        {"names": ["x"]},
    ],
)
def test_bad_matches_are_config_errors(settings):
    with pytest.raises(ValidationError):
        SpanMatch.model_validate(settings)
