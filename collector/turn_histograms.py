"""Turn latency trends from livekit-agents' own turn histograms (``lk.agents.turn.*``
metric points, stored by the metrics signal): ``GET /api/v1/stats/turns?source=metrics``.

livekit-agents records each turn's latencies in histograms at the end of a session, one
data point per session and metric (``e2e_latency``, ``llm_ttft``, ``tts_ttfb``,
``transcription_delay``, ``end_of_turn_delay``; seconds). They are there even when the
session's traces are not (``record={"traces": False}``). The answer has the shape of
``collector.turn_stats``: a session falls in the bucket of its call's start (of its
point's start when no span of the call is stored), groups by the call's service, the
LLM model (``model_name`` of its ``e2e_latency`` / ``llm_ttft`` points) or a tag, and
``errors`` / ``tool_failures`` are null (histograms do not count them).

Percentiles are estimated from the merged buckets: counts are spread evenly over each
bucket, whose ends are narrowed to the point's ``min`` and ``max`` (livekit-agents'
buckets are 0-5 s wide, so without them a median would be a guess).
"""

from __future__ import annotations

import functools
import json
import operator
from typing import Any

from collector.query import TURN_COMPONENTS
from collector.storage import attribute_text
from collector.turn_stats import bucket_count, bucketed

__all__ = ["TURN_HISTOGRAMS", "histogram_percentile", "histogram_stats"]

TURN_HISTOGRAMS = {
    "lk.agents.turn.e2e_latency": "e2e_ms",
    "lk.agents.turn.end_of_turn_delay": "end_of_turn_ms",
    "lk.agents.turn.transcription_delay": "stt_ms",
    "lk.agents.turn.llm_ttft": "llm_ttft_ms",
    "lk.agents.turn.tts_ttfb": "tts_ttfb_ms",
}
"""The livekit-agents histograms and the turn latency component each one measures."""

_LLM_METRICS = ("lk.agents.turn.e2e_latency", "lk.agents.turn.llm_ttft")
_UNIT_MS = {"s": 1000.0, "ms": 1.0, "us": 0.001, "ns": 1e-6}


@functools.lru_cache(maxsize=4096)
def _parsed_list(text: str) -> tuple[Any, ...]:
    """A JSON list, parsed once: bucket counts and bounds repeat across sessions."""
    value = json.loads(text)
    return tuple(value) if isinstance(value, list) else ()


def _list(value: Any) -> tuple[Any, ...]:
    if isinstance(value, str):
        return _parsed_list(value)
    return tuple(value or ())


def _intervals(point: dict[str, Any]) -> list[tuple[float, float, int]]:
    """``(low, high, count)`` of each non-empty bucket, in milliseconds."""
    scale = _UNIT_MS.get(point.get("unit") or "s", 1000.0)
    counts = _list(point.get("bucket_counts"))
    bounds = _list(point.get("explicit_bounds"))
    low_all, high_all = point.get("min"), point.get("max")
    intervals = []
    for index, count in enumerate(counts):
        if not count:
            continue
        low = bounds[index - 1] if 0 < index <= len(bounds) else low_all
        high = bounds[index] if index < len(bounds) else high_all
        if low_all is not None:
            low = low_all if low is None else max(low, low_all)
        if high_all is not None:
            high = high_all if high is None else min(high, high_all)
        if low is None or high is None:
            continue
        intervals.append((low * scale, max(high, low) * scale, int(count)))
    if not intervals and point.get("count") and low_all is not None and high_all is not None:
        intervals.append((low_all * scale, high_all * scale, int(point["count"])))
    return intervals


def histogram_percentile(intervals: list[tuple[float, float, int]], q: float) -> float | None:
    """The ``q`` quantile of bucketed values, each bucket's count spread evenly over it."""
    total = sum(count for _, _, count in intervals)
    if not total:
        return None
    rank = q * total
    seen = 0
    for low, high, count in sorted(intervals):
        if seen + count >= rank:
            return round(low + (high - low) * max(rank - seen, 0) / count, 3)
        seen += count
    return round(max(high for _, high, _ in intervals), 3)


def histogram_stats(
    points: list[dict[str, Any]],
    *,
    start_ns: int,
    end_ns: int,
    step_ns: int,
    group_by: str | None,
    tags: list[tuple[str, str]],
) -> dict[str, Any]:
    """The ``stats/turns`` answer from turn histogram points (``QueryStore.turn_histograms``
    items: ``name``, ``unit``, ``call_id``, ``at_ns`` (the call's start, else the
    point's), ``service``, ``tags``, ``model`` (its ``model_name`` attribute), ``count``,
    ``min``, ``max``,
    ``bucket_counts``, ``explicit_bounds``)."""
    bucket_count(start_ns, end_ns, step_ns)  # refused before the points are read
    calls: dict[Any, dict[str, Any]] = {}
    for point in points:
        if point["name"] not in TURN_HISTOGRAMS or not start_ns <= point["at_ns"] < end_ns:
            continue
        key = point["call_id"] or ("point", point["at_ns"], point["service"])
        call = calls.setdefault(
            key,
            {
                "at_ns": point["at_ns"],
                "service": point["service"],
                "tags": point["tags"] or {},
                "model": None,
                "points": [],
            },
        )
        if point["name"] in _LLM_METRICS and call["model"] is None:
            model = point["model"]
            call["model"] = None if model is None else attribute_text(model)
        call["points"].append(point)
    return bucketed(
        calls.values(),
        at="at_ns",
        start_ns=start_ns,
        end_ns=end_ns,
        step_ns=step_ns,
        group_by=group_by,
        tags=tags,
        model_of=operator.itemgetter("model"),
        group_stats=_group_stats,
    )


def _group_stats(group: str | None, calls: list[dict[str, Any]]) -> dict[str, Any]:
    intervals: dict[str, list[tuple[float, float, int]]] = {c: [] for c in TURN_COMPONENTS}
    counts = dict.fromkeys(TURN_COMPONENTS, 0)
    for call in calls:
        for point in call["points"]:
            component = TURN_HISTOGRAMS[point["name"]]
            intervals[component] += _intervals(point)
            counts[component] += int(point["count"] or 0)
    latency = {
        component: {
            "count": counts[component],
            "p50": histogram_percentile(intervals[component], 0.50),
            "p95": histogram_percentile(intervals[component], 0.95),
            "p99": histogram_percentile(intervals[component], 0.99),
        }
        for component in TURN_COMPONENTS
    }
    return {
        "group": group,
        "calls": len(calls),
        "turns": counts["e2e_ms"],
        "errors": None,
        "tool_failures": None,
        "latency": latency,
    }
