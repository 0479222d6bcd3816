"""Per-turn latency of a voice call, from the spans LiveKit Agents and Pipecat emit.

Input is a call's spans as dicts (``span_id``, ``parent_span_id``, ``name``,
``start_ns``, ``end_ns``, ``status_code``, ``attributes``); output is one row per turn
plus the call's totals. All latencies are milliseconds. Where each number comes from:

LiveKit Agents (1.x; ``user_turn`` and ``agent_turn`` are siblings under
``agent_session``, paired by ``lk.pii.user_input`` == ``lk.pii.user_transcript`` when
present, else an agent turn answers the last user turn that began before it):

| number | source |
|---|---|
| ``stt_ms`` | ``user_turn`` attribute ``lk.transcription_delay`` (s): end of speech to final transcript (the agent turn's copy if the user turn is missing) |
| ``llm_ttft_ms`` | first ``llm_node`` under the ``agent_turn``: ``lk.response.ttft`` (s); else ``llm_request`` ``gen_ai.response.time_to_first_chunk`` |
| ``tts_ttfb_ms`` | first ``tts_node`` under the ``agent_turn``: ``lk.response.ttfb`` (s) |
| ``tool_calls`` | ``function_tool`` spans under the ``agent_turn`` (``gen_ai.tool.name``, duration, ``lk.function_tool.is_error``) |
| ``e2e_ms`` | ``agent_turn`` ``lk.e2e_latency`` (s): end of user speech to agent speech |

Pipecat (1.x; ``conversation`` > ``turn`` > ``stt`` / ``llm`` / ``tts``):

| number | source |
|---|---|
| ``stt_ms`` | duration of the turn's first ``stt`` span |
| ``llm_ttft_ms`` | first ``llm`` span of the turn: ``metrics.ttfb`` (s) |
| ``tts_ttfb_ms`` | first ``tts`` span of the turn: ``metrics.ttfb`` (s) |
| ``tool_calls`` | Pipecat has no tool span: tool calls are the assistant ``tool_calls`` in the last ``llm`` span's ``input`` that the turn's first ``llm`` input did not hold |
| ``e2e_ms`` | ``turn`` ``turn.user_bot_latency_seconds`` (s) |

Call totals: turn count, median and worst ``e2e_ms``, tool calls, error count (spans
with status ERROR plus failed tool calls).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from typing import Any

__all__ = ["summarize_call"]

STATUS_ERROR = 2


def _ms(seconds: Any) -> float | None:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return None
    return round(float(seconds) * 1000.0, 3)


def _duration_ms(span: dict[str, Any]) -> float:
    return round((span["end_ns"] - span["start_ns"]) / 1e6, 3)


class _Tree:
    def __init__(self, spans: list[dict[str, Any]]):
        self.spans = sorted(spans, key=lambda s: (s["start_ns"], s["end_ns"]))
        self.children: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for span in self.spans:
            if span.get("parent_span_id"):
                self.children[span["parent_span_id"]].append(span)

    def descendants(self, span: dict[str, Any], name: str) -> list[dict[str, Any]]:
        """Descendants named ``name``, in start order."""
        found, stack = [], list(self.children.get(span["span_id"], ()))
        while stack:
            node = stack.pop()
            if node["name"] == name:
                found.append(node)
            stack.extend(self.children.get(node["span_id"], ()))
        return sorted(found, key=lambda s: s["start_ns"])

    def named(self, name: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["name"] == name]


def _tool(name: Any, duration_ms: float | None, error: bool, span_id: str | None) -> dict[str, Any]:
    return {"name": name, "duration_ms": duration_ms, "error": error, "span_id": span_id}


def _livekit_turns(tree: _Tree) -> list[dict[str, Any]]:
    user_turns = tree.named("user_turn")
    turns = []
    for number, agent in enumerate(tree.named("agent_turn"), start=1):
        attrs = agent.get("attributes", {})
        # Prefer the transcript match; else the last user turn that began before it.
        said = attrs.get("lk.pii.user_input")
        matching = [
            u for u in user_turns if said and u["attributes"].get("lk.pii.user_transcript") == said
        ]
        before = matching or [u for u in user_turns if u["start_ns"] <= agent["start_ns"]]
        user = before[-1] if before else None
        if user is not None:
            user_turns = [u for u in user_turns if u is not user]
        user_attrs = user.get("attributes", {}) if user else {}
        llm_nodes = tree.descendants(agent, "llm_node")
        ttft = _ms(llm_nodes[0]["attributes"].get("lk.response.ttft")) if llm_nodes else None
        if ttft is None:
            requests = tree.descendants(agent, "llm_request")
            if requests:
                ttft = _ms(requests[0]["attributes"].get("gen_ai.response.time_to_first_chunk"))
        tts_nodes = tree.descendants(agent, "tts_node")
        tools = [
            _tool(
                t["attributes"].get("gen_ai.tool.name")
                or t["attributes"].get("lk.function_tool.name"),
                _duration_ms(t),
                bool(t["attributes"].get("lk.function_tool.is_error"))
                or t.get("status_code") == STATUS_ERROR,
                t["span_id"],
            )
            for t in tree.descendants(agent, "function_tool")
        ]
        stt = _ms(user_attrs.get("lk.transcription_delay"))
        if stt is None:
            stt = _ms(attrs.get("lk.transcription_delay"))
        turns.append(
            {
                "number": number,
                "span_id": agent["span_id"],
                "user_span_id": user["span_id"] if user else None,
                "start_ns": user["start_ns"] if user else agent["start_ns"],
                "end_ns": agent["end_ns"],
                "user_text": user_attrs.get("lk.pii.user_transcript")
                or attrs.get("lk.pii.user_input"),
                "stt_ms": stt,
                "llm_ttft_ms": ttft,
                "tts_ttfb_ms": _ms(tts_nodes[0]["attributes"].get("lk.response.ttfb"))
                if tts_nodes
                else None,
                "llm_calls": len(llm_nodes),
                "tool_calls": tools,
                "e2e_ms": _ms(attrs.get("lk.e2e_latency")),
                "interrupted": bool(attrs.get("lk.interrupted", False)),
            }
        )
    return turns


def _tool_call_names(llm_span: dict[str, Any]) -> dict[Any, Any]:
    """Tool call id -> function name from an ``llm`` span's ``input`` messages."""
    try:
        messages = json.loads(llm_span["attributes"].get("input") or "[]")
    except (TypeError, ValueError):
        return {}
    calls = {}
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and isinstance(message.get("tool_calls"), list):
                for call in message["tool_calls"]:
                    if isinstance(call, dict):
                        function = call.get("function") or {}
                        calls[call.get("id")] = (
                            function.get("name") if isinstance(function, dict) else None
                        )
    return calls


def _pipecat_turns(tree: _Tree) -> list[dict[str, Any]]:
    turns = []
    for index, turn in enumerate(tree.named("turn"), start=1):
        attrs = turn.get("attributes", {})
        stts = tree.descendants(turn, "stt")
        llms = tree.descendants(turn, "llm")
        ttss = tree.descendants(turn, "tts")
        tools = []
        if len(llms) > 1:
            before = _tool_call_names(llms[0])
            for call_id, name in _tool_call_names(llms[-1]).items():
                if call_id not in before:
                    tools.append(_tool(name, None, False, None))
        number = attrs.get("turn.number")
        turns.append(
            {
                "number": number if isinstance(number, int) else index,
                "span_id": turn["span_id"],
                "user_span_id": None,
                "start_ns": turn["start_ns"],
                "end_ns": turn["end_ns"],
                "user_text": stts[0]["attributes"].get("transcript") if stts else None,
                "stt_ms": _duration_ms(stts[0]) if stts else None,
                "llm_ttft_ms": _ms(llms[0]["attributes"].get("metrics.ttfb")) if llms else None,
                "tts_ttfb_ms": _ms(ttss[0]["attributes"].get("metrics.ttfb")) if ttss else None,
                "llm_calls": len(llms),
                "tool_calls": tools,
                "e2e_ms": _ms(attrs.get("turn.user_bot_latency_seconds")),
                "interrupted": bool(attrs.get("turn.was_interrupted", False)),
            }
        )
    return turns


def summarize_call(spans: list[dict[str, Any]]) -> dict[str, Any]:
    """Turns and totals for one call's spans (any order; missing parents are fine)."""
    tree = _Tree(spans)
    if tree.named("agent_turn"):
        source, turns = "livekit", _livekit_turns(tree)
    elif tree.named("turn"):
        source, turns = "pipecat", _pipecat_turns(tree)
    else:
        source, turns = "unknown", []
    latencies = [t["e2e_ms"] for t in turns if t["e2e_ms"] is not None]
    tool_calls = sum(len(t["tool_calls"]) for t in turns)
    failed_tools = sum(1 for t in turns for tool in t["tool_calls"] if tool["error"])
    errors = sum(1 for s in tree.spans if s.get("status_code") == STATUS_ERROR)
    return {
        "framework": source,
        "turns": turns,
        "totals": {
            "turn_count": len(turns),
            "median_e2e_ms": round(statistics.median(latencies), 3) if latencies else None,
            "worst_e2e_ms": max(latencies) if latencies else None,
            "tool_calls": tool_calls,
            "errors": errors + failed_tools,
            "stt_ms_total": _sum(t["stt_ms"] for t in turns),
            "llm_calls": sum(t["llm_calls"] for t in turns),
        },
    }


def _sum(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present), 3) if present else None
