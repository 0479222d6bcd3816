"""Building OTLP messages for processor tests."""

from __future__ import annotations

import os

from collector.spans import ResourceSpans, SpanBatch, set_attribute


def resource_spans(
    resource: dict, spans: list[dict], trace_id: bytes | None = None
) -> ResourceSpans:
    rs = ResourceSpans()
    for key, value in resource.items():
        set_attribute(rs.resource.attributes, key, value)
    scope = rs.scope_spans.add()
    scope.scope.name = "test"
    trace_id = trace_id or os.urandom(16)
    for spec in spans:
        span = scope.spans.add(
            trace_id=spec.get("trace_id", trace_id),
            span_id=os.urandom(8),
            name=spec.get("name", "span"),
            start_time_unix_nano=1,
            end_time_unix_nano=2,
        )
        for key, value in spec.get("attributes", {}).items():
            set_attribute(span.attributes, key, value)
    return rs


def batch(*items: ResourceSpans, project: str | None = "p1") -> SpanBatch:
    return SpanBatch(list(items), project)


class FakeTelemetryHost:
    """A Host with real telemetry and no routes, for starting one component."""

    def __init__(self) -> None:
        from collector.telemetry import Telemetry

        self.telemetry = Telemetry()
        self.http_routes: list = []

    def component(self, component_id: str):
        raise KeyError(component_id)
