"""Turn latency trends: percentiles and counts per time bucket and group.

``turn_stats`` reads the calls' cached summaries (``collector/query.py``
``summary_cache_text``: each call's totals and its turns' latency components) and
answers ``GET /api/v1/stats/turns``. A call falls in the bucket of its start time and
brings all its turns with it; every bucket of the range is listed, an empty one with no
groups, so a chart draws one point per bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from collector.query import TURN_COMPONENTS, QueryError, rfc3339
from collector.storage import attribute_text
from collector.turns import percentile

__all__ = ["GROUPINGS", "MAX_BUCKETS", "parse_group_by", "turn_stats"]

MAX_BUCKETS = 1000
GROUPINGS = ("service", "model", "tag.KEY")


def parse_group_by(text: str | None) -> str | None:
    """``service``, ``model`` or ``tag.KEY``; QueryError for anything else."""
    if text is None or text in ("service", "model"):
        return text
    if text.startswith("tag.") and len(text) > len("tag."):
        return text
    raise QueryError(f"group_by: expected service, model or tag.KEY, got {text!r}")


def _group_of(
    call: dict[str, Any], group_by: str | None, model_of: Callable[[dict[str, Any]], str | None]
) -> str | None:
    if group_by is None:
        return None
    if group_by == "service":
        return call["service"]
    if group_by == "model":
        return model_of(call)
    value = call["tags"].get(group_by[len("tag.") :])
    return None if value is None else attribute_text(value)


def _summary_model(call: dict[str, Any]) -> str | None:
    model: str | None = call["summary"]["totals"].get("llm_model")
    return model


def turn_stats(
    calls: list[dict[str, Any]],
    *,
    start_ns: int,
    end_ns: int,
    step_ns: int,
    group_by: str | None,
    tags: list[tuple[str, str]],
) -> dict[str, Any]:
    """The ``stats/turns`` answer for ``calls`` (``QueryStore.summaries`` items) in
    ``[start_ns, end_ns)``, bucketed by ``step_ns``, keeping calls with every tag."""
    return bucketed(
        calls,
        at="start_ns",
        start_ns=start_ns,
        end_ns=end_ns,
        step_ns=step_ns,
        group_by=group_by,
        tags=tags,
        model_of=_summary_model,
        group_stats=_group_stats,
    )


def bucket_count(start_ns: int, end_ns: int, step_ns: int) -> int:
    """How many ``step_ns`` buckets ``[start_ns, end_ns)`` takes; a ``QueryError`` past
    ``MAX_BUCKETS``."""
    count = -(-(end_ns - start_ns) // step_ns)
    if count > MAX_BUCKETS:
        raise QueryError(
            f"step: {count} buckets from start to end, at most {MAX_BUCKETS}: take a longer step"
        )
    return count


def bucketed(
    calls: Iterable[dict[str, Any]],
    *,
    at: str,
    start_ns: int,
    end_ns: int,
    step_ns: int,
    group_by: str | None,
    tags: list[tuple[str, str]],
    model_of: Callable[[dict[str, Any]], str | None],
    group_stats: Callable[[str | None, list[dict[str, Any]]], dict[str, Any]],
) -> dict[str, Any]:
    """The ``stats/turns`` answer: ``calls`` whose ``at`` time is in ``[start_ns,
    end_ns)`` and that have every tag, put in ``step_ns`` buckets and in groups (by
    ``service``, ``model`` (read by ``model_of``) or ``tag.KEY``), each group summed up
    by ``group_stats``."""
    grouped: list[dict[str | None, list[dict[str, Any]]]] = [
        {} for _ in range(bucket_count(start_ns, end_ns, step_ns))
    ]
    for call in calls:
        at_ns = call[at]
        if not start_ns <= at_ns < end_ns:
            continue
        if any(attribute_text(call["tags"].get(k)) != v for k, v in tags):
            continue
        index = (at_ns - start_ns) // step_ns
        grouped[index].setdefault(_group_of(call, group_by, model_of), []).append(call)
    buckets = []
    for index, groups in enumerate(grouped):
        bucket_start = start_ns + index * step_ns
        buckets.append(
            {
                "start": rfc3339(bucket_start),
                "start_ns": bucket_start,
                "groups": [
                    group_stats(group, members)
                    for group, members in sorted(groups.items(), key=lambda g: str(g[0]))
                ],
            }
        )
    return {
        "start": rfc3339(start_ns),
        "end": rfc3339(end_ns),
        "step_ms": step_ns / 1e6,
        "group_by": group_by,
        "components": list(TURN_COMPONENTS),
        "buckets": buckets,
    }


def _group_stats(group: str | None, calls: list[dict[str, Any]]) -> dict[str, Any]:
    turns = [turn for call in calls for turn in call["summary"].get("turns", [])]
    latency = {}
    for position, component in enumerate(TURN_COMPONENTS):
        values = [
            float(turn[position])
            for turn in turns
            if len(turn) > position and isinstance(turn[position], int | float)
        ]
        latency[component] = {
            "count": len(values),
            "p50": percentile(values, 0.50),
            "p95": percentile(values, 0.95),
            "p99": percentile(values, 0.99),
        }
    totals = [call["summary"]["totals"] for call in calls]
    return {
        "group": group,
        "calls": len(calls),
        "turns": len(turns),
        "errors": sum(int(t.get("errors") or 0) for t in totals),
        "tool_failures": sum(int(t.get("tool_failures") or 0) for t in totals),
        "latency": latency,
    }
