"""A call's LiveKit session facts: its outcome and its session tags, read from what
livekit-agents sends to ``LIVEKIT_OBSERVABILITY_URL`` and calltrace stores with the call
(``collector.signals_storage``):

- the ``outcome`` log record (``outcome: {outcome: "success" | "fail", reason}``);
- the session tags: ``session.tags`` of the ``session report`` log record, ``tag.name``
  of each ``tag`` log record (tags added with metadata) and ``tags`` of the recording's
  session summary. They include ``lk.success`` / ``lk.fail`` and
  ``lk.judge.NAME:VERDICT``; without an ``outcome`` record, ``lk.success`` or ``lk.fail``
  gives the outcome.

The query stores read these rows for the calls they list (``session_facts``) and filter
calls on them (``outcome=``, ``session_tag=``) with the statements their modules build
from the constants here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

__all__ = [
    "OUTCOMES",
    "SESSION_BODIES_SQL",
    "facts_of_record",
    "facts_of_summary",
    "outcome_tag",
    "session_facts",
]

SESSION_BODIES = ("session report", "tag", "outcome")
"""Bodies of the log records that carry session facts (stored as JSON text)."""

SESSION_BODIES_SQL = "body IN (" + ", ".join(f"'{json.dumps(b)}'" for b in SESSION_BODIES) + ")"
"""The SQL condition selecting those records; the partial index ``log_records_session``
(SQLite and PostgreSQL) is defined with this very text, so a statement repeating it
walks that index."""

OUTCOMES = ("success", "fail")
"""The outcomes livekit-agents reports (``AgentSession`` ``outcome``)."""


def outcome_tag(outcome: str) -> str:
    """The session tag livekit-agents adds with an outcome (``lk.success``)."""
    return "lk." + outcome


def _loads(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return None


def facts_of_record(body_text: Any, attributes_text: Any) -> list[tuple[str, str]]:
    """``(kind, value)`` facts of one log record (``session_facts`` rules): ``("tag",
    TAG)`` for each session tag it lists, ``("outcome", OUTCOME)`` for an outcome."""
    facts = session_facts([(body_text, attributes_text)], [], False)
    found = [("tag", tag) for tag in facts["session_tags"]]
    if _loads(body_text) == "outcome" and facts["outcome"] is not None:
        found.append(("outcome", facts["outcome"]))
    return found


def facts_of_summary(summary_text: Any) -> list[tuple[str, str]]:
    """``("tag", TAG)`` of each tag a recording's session summary lists."""
    return [("tag", tag) for tag in session_facts([], [summary_text], False)["session_tags"]]


def session_facts(
    records: Iterable[tuple[Any, Any]], summaries: Iterable[Any], has_logs: bool
) -> dict[str, Any]:
    """``{outcome, outcome_reason, session_tags, session}`` of a call from its session
    log records (``(body JSON text, attributes JSON text)``, time order) and its
    recordings' session summaries (JSON text or None). ``session`` says whether the
    call has a session to show (log records or a recording)."""
    tags: set[str] = set()
    outcome = reason = None
    summaries = list(summaries)
    for body_text, attributes_text in records:
        body, attributes = _loads(body_text), _loads(attributes_text)
        if not isinstance(attributes, dict):
            continue
        if body == "session report":
            listed = attributes.get("session.tags")
            if isinstance(listed, list):
                tags.update(t for t in listed if isinstance(t, str))
        elif body == "tag":
            tag = attributes.get("tag")
            if isinstance(tag, dict) and isinstance(tag.get("name"), str):
                tags.add(tag["name"])
        elif body == "outcome":
            found = attributes.get("outcome")
            if isinstance(found, dict) and isinstance(found.get("outcome"), str):
                outcome = found["outcome"]
                reason = found.get("reason") if isinstance(found.get("reason"), str) else None
    for summary_text in summaries:
        summary = _loads(summary_text)
        listed = summary.get("tags") if isinstance(summary, dict) else None
        if isinstance(listed, list):
            tags.update(t for t in listed if isinstance(t, str))
    if outcome is None:
        outcome = next((o for o in OUTCOMES if outcome_tag(o) in tags), None)
    return {
        "outcome": outcome,
        "outcome_reason": reason,
        "session_tags": sorted(tags),
        "session": has_logs or bool(summaries),
    }
