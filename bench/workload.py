"""Requests shaped like real calls, built from the captured LiveKit and Pipecat fixtures.

Each call is the genuine capture re-keyed by the fixtures' own ``make_synthetic.py``
(fresh trace/span ids, a new room id, re-timed); span names, attributes and tree shapes
are exactly as captured. Several calls' ``ResourceSpans`` are packed into one export
request until it holds about ``spans_per_request`` spans, as a gateway sees when every
turn of many calls ends at once.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import time
from functools import cache
from pathlib import Path

from google.protobuf import json_format

from collector.spans import ExportTraceServiceRequest

FIXTURES = Path(
    os.environ.get("CALLTRACE_FIXTURES")
    or Path(__file__).resolve().parents[2] / "shared" / "fixtures"
)
"""The captured fixtures (``livekit/``, ``pipecat/``, ``make_synthetic.py``); next to the
repository as for the tests, or wherever ``CALLTRACE_FIXTURES`` points."""


@cache
def _make_synthetic():
    path = FIXTURES / "make_synthetic.py"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the bench builds its requests from the captured fixtures;"
            " set CALLTRACE_FIXTURES to their directory"
        )
    spec = importlib.util.spec_from_file_location("make_synthetic", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_call(
    framework: str, room_id: str, start: float | None = None
) -> list[ExportTraceServiceRequest]:
    """One call's export requests, in the captured arrival order."""
    requests = _make_synthetic().rekey(str(FIXTURES / framework), room_id, f"conv-{room_id}", start)
    return [request for _name, request in requests]


def build_requests(
    total_spans: int,
    spans_per_request: int,
    *,
    start: float | None = None,
    prefix: str = "RM_bench",
) -> list[ExportTraceServiceRequest]:
    """Requests holding about ``total_spans`` spans of LiveKit and Pipecat calls (4:1)."""
    start = time.time() - 3600 if start is None else start
    frameworks = itertools.cycle(["livekit", "livekit", "livekit", "livekit", "pipecat"])
    result: list[ExportTraceServiceRequest] = []
    current = ExportTraceServiceRequest()
    current_spans = 0
    produced = 0
    call = 0
    while produced < total_spans:
        call += 1
        for request in synthetic_call(next(frameworks), f"{prefix}{call:06d}", start + call):
            for rs in request.resource_spans:
                count = sum(len(ss.spans) for ss in rs.scope_spans)
                current.resource_spans.append(rs)
                current_spans += count
                produced += count
            if current_spans >= spans_per_request:
                result.append(current)
                current, current_spans = ExportTraceServiceRequest(), 0
    if current_spans:
        result.append(current)
    return result


def span_count(request: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


def to_otlp_json(request: ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON wire form: hex ids, integer enums."""
    from collector import otlp_json

    return otlp_json.encode_request(request)


def protobuf_json(request: ExportTraceServiceRequest) -> str:
    return json_format.MessageToJson(request)
