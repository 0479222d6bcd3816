"""collector/turn_histograms.py: percentiles estimated from histogram buckets narrowed
to each point's min and max."""

from __future__ import annotations

import json

import pytest

from collector.query import QueryError
from collector.turn_histograms import histogram_percentile, histogram_stats

BOUNDS = [0.0, 5.0, 10.0]  # livekit-agents' first bounds (seconds)


def point(name: str, at_ns: int, counts: list[int], low: float, high: float, **extra):
    return {
        "name": name,
        "unit": "s",
        "call_id": extra.get("call_id", "c1"),
        "at_ns": at_ns,
        "service": "agent",
        "tags": extra.get("tags", {}),
        "model": extra.get("model", "gpt"),
        "count": sum(counts),
        "min": low,
        "max": high,
        "bucket_counts": json.dumps(counts),
        "explicit_bounds": json.dumps(BOUNDS),
    }


def test_percentile_spreads_a_bucket_between_min_and_max():
    assert histogram_percentile([(700.0, 800.0, 4)], 0.5) == 750.0
    assert histogram_percentile([(700.0, 800.0, 4)], 0.99) == pytest.approx(799.0)
    assert histogram_percentile([], 0.5) is None
    # Two buckets: the median falls in the first, p95 in the second.
    assert histogram_percentile([(0.0, 10.0, 5), (10.0, 20.0, 5)], 0.5) == 10.0
    assert 19.0 <= histogram_percentile([(0.0, 10.0, 5), (10.0, 20.0, 5)], 0.95) <= 20.0


def test_stats_bucket_group_and_narrow_to_min_max():
    points = [
        point("lk.agents.turn.e2e_latency", 10, [0, 3, 0, 0], 0.7, 0.8, model="a"),
        point("lk.agents.turn.llm_ttft", 10, [0, 3, 0, 0], 0.1, 0.2, model="a"),
        point("lk.agents.turn.e2e_latency", 70, [0, 0, 2, 0], 6.0, 6.0, call_id="c2", model="b"),
        point("lk.agents.usage.tts_characters", 10, [1], 1, 1),  # not a turn histogram
    ]
    body = histogram_stats(points, start_ns=0, end_ns=120, step_ns=60, group_by="model", tags=[])
    first, second = body["buckets"]
    (a,) = first["groups"]
    assert a["group"] == "a" and a["turns"] == 3 and a["calls"] == 1
    assert 700 <= a["latency"]["e2e_ms"]["p50"] <= 800
    assert 100 <= a["latency"]["llm_ttft_ms"]["p50"] <= 200
    (b,) = second["groups"]
    assert b["group"] == "b" and b["latency"]["e2e_ms"]["p99"] == 6000.0
    with pytest.raises(QueryError, match=r"^step:"):
        histogram_stats(points, start_ns=0, end_ns=10**6, step_ns=1, group_by=None, tags=[])
