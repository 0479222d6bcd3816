"""Selecting spans by name, attributes, duration and status: the ``include`` /
``exclude`` blocks of the ``attributes`` and ``filter`` processors, for plugins too.

A ``SpanMatch`` is a config model (put it in a component's config); ``compile()`` turns
it into a ``SpanMatcher`` whose ``matches(span, resource)`` answers for one span. Every
condition given must hold (a span name matches if it matches any of ``span_names``; each
listed attribute must match). An empty ``SpanMatch`` matches every span.

``select(include, exclude)`` combines the two blocks the way the OpenTelemetry
Collector's processors do: a span is selected when it matches ``include`` (or there is
none) and does not match ``exclude``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from pydantic import Field, model_validator

from collector.components import ComponentConfig
from collector.spans import any_value_to_python
from collector.units import Duration

__all__ = ["AttributeMatch", "SpanMatch", "SpanMatcher", "SpanPredicate", "select"]

SpanPredicate = Callable[[Span, Resource], bool]
"""Answers whether one span (with its resource) is selected."""

_STATUS_CODES = {
    "unset": Status.STATUS_CODE_UNSET,
    "ok": Status.STATUS_CODE_OK,
    "error": Status.STATUS_CODE_ERROR,
}


class AttributeMatch(ComponentConfig):
    """One attribute condition: ``key`` is present, and when ``value`` is given, equal to
    it (strict) or, for a string attribute, matched by it as a regular expression
    (``match_type: regexp``, searched anywhere in the value)."""

    key: str = Field(min_length=1)
    value: str | bool | int | float | None = None


class SpanMatch(ComponentConfig):
    """Which spans a rule applies to; every condition given must hold."""

    match_type: Literal["strict", "regexp"] = "strict"
    """How ``span_names`` and string attribute values compare: equal, or a regular
    expression searched in the text (anchor it with ``^...$`` for a full match)."""
    span_names: list[str] = Field(default_factory=list)
    """The span's name is one of these (any of them)."""
    attributes: list[AttributeMatch] = Field(default_factory=list)
    """Span attributes that must all match."""
    resource_attributes: list[AttributeMatch] = Field(default_factory=list)
    """Resource attributes that must all match."""
    min_duration: Duration | None = None
    """The span lasted at least this long (``"500ms"``)."""
    max_duration: Duration | None = None
    """The span lasted at most this long."""
    status: list[Literal["unset", "ok", "error"]] = Field(default_factory=list)
    """The span's status code is one of these."""

    @model_validator(mode="after")
    def _check(self) -> SpanMatch:
        if self.match_type == "regexp":
            for index, pattern in enumerate(self.span_names):
                _compile(pattern, f"span_names[{index}]")
            for field_name in ("attributes", "resource_attributes"):
                for index, condition in enumerate(getattr(self, field_name)):
                    if isinstance(condition.value, str):
                        _compile(condition.value, f"{field_name}[{index}].value")
        if (
            self.min_duration is not None
            and self.max_duration is not None
            and self.min_duration > self.max_duration
        ):
            raise ValueError(
                f"min_duration ({self.min_duration}s) is above max_duration ({self.max_duration}s)"
            )
        return self

    def compile(self) -> SpanMatcher:
        return SpanMatcher(self)


def _compile(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where}: not a valid regular expression {pattern!r}: {exc}") from None


def _value_test(value: Any, regexp: bool) -> Callable[[Any], bool]:
    if value is None:
        return lambda found: True
    if regexp and isinstance(value, str):
        search = re.compile(value).search
        return lambda found: isinstance(found, str) and search(found) is not None
    if isinstance(value, bool):
        return lambda found: isinstance(found, bool) and found is value
    return lambda found: not isinstance(found, bool) and found == value


class SpanMatcher:
    """A compiled ``SpanMatch``: ``matches(span, resource)``."""

    def __init__(self, match: SpanMatch):
        regexp = match.match_type == "regexp"
        self._names: Callable[[str], bool] | None = None
        if match.span_names:
            if regexp:
                searches = [re.compile(p).search for p in match.span_names]
                self._names = lambda name: any(search(name) for search in searches)
            else:
                names = frozenset(match.span_names)
                self._names = names.__contains__
        self._attributes = [(c.key, _value_test(c.value, regexp)) for c in match.attributes]
        self._resource_attributes = [
            (c.key, _value_test(c.value, regexp)) for c in match.resource_attributes
        ]
        self._min_ns = None if match.min_duration is None else round(match.min_duration * 1e9)
        self._max_ns = None if match.max_duration is None else round(match.max_duration * 1e9)
        self._status = frozenset(_STATUS_CODES[s] for s in match.status)
        self.matches_everything = not (
            self._names
            or self._attributes
            or self._resource_attributes
            or self._min_ns is not None
            or self._max_ns is not None
            or self._status
        )

    def matches(self, span: Span, resource: Resource) -> bool:
        if self._names is not None and not self._names(span.name):
            return False
        if self._status and span.status.code not in self._status:
            return False
        if self._min_ns is not None or self._max_ns is not None:
            duration = span.end_time_unix_nano - span.start_time_unix_nano
            if self._min_ns is not None and duration < self._min_ns:
                return False
            if self._max_ns is not None and duration > self._max_ns:
                return False
        return _all_match(self._attributes, span.attributes) and _all_match(
            self._resource_attributes, resource.attributes
        )


_MISSING = object()


def _all_match(conditions: list[tuple[str, Callable[[Any], bool]]], attributes: Any) -> bool:
    if not conditions:
        return True
    values = {kv.key: kv.value for kv in attributes}
    for key, test in conditions:
        found = values.get(key, _MISSING)
        if found is _MISSING or not test(any_value_to_python(found)):
            return False
    return True


def select(include: SpanMatch | None, exclude: SpanMatch | None) -> SpanPredicate | None:
    """One predicate for an ``include`` and an ``exclude`` block; None when both are
    absent (every span is selected)."""
    included = include.compile() if include is not None else None
    excluded = exclude.compile() if exclude is not None else None
    if included is None and excluded is None:
        return None

    def selected(span: Span, resource: Resource) -> bool:
        if included is not None and not included.matches(span, resource):
            return False
        return excluded is None or not excluded.matches(span, resource)

    return selected
