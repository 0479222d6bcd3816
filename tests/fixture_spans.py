"""Fixture requests decoded into the span dicts the storage and query layers use."""

from __future__ import annotations

from typing import Any

from collector.spans import ExportTraceServiceRequest, any_value_to_python
from tests.support import fixture_requests


def fixture_span_dicts(framework: str) -> list[dict[str, Any]]:
    spans = []
    for path in fixture_requests(framework):
        request = ExportTraceServiceRequest.FromString(path.read_bytes())
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    spans.append(
                        {
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex() or None,
                            "name": span.name,
                            "start_ns": span.start_time_unix_nano,
                            "end_ns": span.end_time_unix_nano,
                            "status_code": span.status.code,
                            "attributes": {
                                kv.key: any_value_to_python(kv.value) for kv in span.attributes
                            },
                        }
                    )
    return spans
