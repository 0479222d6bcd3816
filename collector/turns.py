"""Per-turn latency of a voice call, from the spans LiveKit Agents and Pipecat emit.

Input is a call's spans as dicts (``span_id``, ``parent_span_id``, ``name``,
``start_ns``, ``end_ns``, ``status_code``, ``attributes``); output is one row per turn
plus the call's totals. All latencies are milliseconds, ``None`` when the span or
attribute they come from is missing. README "Where each latency number comes from" is
the reference for every number; in short, per turn:

- ``e2e_ms``: end of the user's speech to the agent's first audio (the framework's
  own number: LiveKit ``lk.e2e_latency``, Pipecat ``turn.user_bot_latency_seconds``).
- ``end_of_turn_ms``: end of speech until the turn is committed (endpointing / turn
  detection; LiveKit ``lk.end_of_turn_delay``; Pipecat: first ``llm`` span start minus
  the end of speech, as ``stt`` end minus its ``metrics.ttfb``).
- ``stt_ms``: end of speech to the final transcript (LiveKit
  ``lk.transcription_delay``, Pipecat ``stt`` ``metrics.ttfb``); it runs *inside* the
  end-of-turn wait, so it is not one of the parts below.
- ``llm_ttft_ms``: the turn's first LLM request's time to first token;
  ``answer_ttft_ms``: the last LLM request's (the spoken answer after any tool calls);
  ``answer_wait_ms``: end of speech to that answer's first token (what the user waits
  for in a tool turn).
- ``tts_ttfb_ms``: the first TTS request's time to first audio byte.
- ``tool_ms``: the turn's tool calls' total duration.
- ``breakdown``: the critical path of ``e2e_ms``, parts that add up to it exactly:
  ``end_of_turn_ms`` + ``llm_ms`` (waiting for the first spoken LLM token after the
  turn was committed; 0 when it arrived during the end-of-turn wait) + ``tool_ms``
  (tools run before that token) + ``tts_ms`` (TTS time to first byte on the path) +
  ``other_ms`` (the named gap: queueing, text aggregation and playout start between
  stages; negative when stages overlapped).

Call totals: turn count, median / worst / p95 of ``e2e_ms``, tool calls, failed tools,
the LLM model (``gen_ai.request.model`` of the first LLM span) and errors (spans with status ERROR plus failed tool calls whose span is not itself an
ERROR span, so one failed tool counts once).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from typing import Any

__all__ = ["percentile", "summarize_call"]

STATUS_ERROR = 2


def _ms(seconds: Any) -> float | None:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return None
    if not math.isfinite(seconds):
        return None
    return round(float(seconds) * 1000.0, 3)


def _ns(seconds: Any) -> int | None:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return None
    if not math.isfinite(seconds):
        return None
    return round(float(seconds) * 1e9)


def _duration_ms(span: dict[str, Any]) -> float:
    return round((span["end_ns"] - span["start_ns"]) / 1e6, 3)


def percentile(values: list[float], fraction: float) -> float | None:
    """The ``fraction`` (0..1) percentile of ``values``, linear between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * fraction
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (rank - low), 3)


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

    def all_descendants(self, span: dict[str, Any]) -> list[str]:
        """Span ids of every descendant."""
        found, stack = [], list(self.children.get(span["span_id"], ()))
        while stack:
            node = stack.pop()
            found.append(node["span_id"])
            stack.extend(self.children.get(node["span_id"], ()))
        return found

    def named(self, name: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s["name"] == name]


def _tool(
    name: Any, duration_ms: float | None, error: bool, span: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "name": name,
        "duration_ms": duration_ms,
        "error": error,
        "span_id": span["span_id"] if span else None,
        "start_ns": span["start_ns"] if span else None,
        "end_ns": span["end_ns"] if span else None,
        "error_span": bool(span and span.get("status_code") == STATUS_ERROR),
    }


def _first_token_ns(llm: dict[str, Any] | None, ttft_key: str) -> int | None:
    if llm is None:
        return None
    ttft = _ns(llm["attributes"].get(ttft_key))
    return None if ttft is None else llm["start_ns"] + ttft


def _breakdown(
    *,
    e2e_ms: float | None,
    speech_end_ns: int | None,
    end_of_turn_ms: float | None,
    first_token_ns: int | None,
    tools: list[dict[str, Any]],
    tts_ttfb_ms: float | None,
) -> dict[str, float] | None:
    """The parts of ``e2e_ms`` on its critical path (module docstring); None unless
    the end of speech, the end-of-turn wait and the first spoken token are known."""
    if e2e_ms is None or speech_end_ns is None or end_of_turn_ms is None:
        return None
    if first_token_ns is None:
        return None
    committed_ns = speech_end_ns + round(end_of_turn_ms * 1e6)
    first_audio_ns = speech_end_ns + round(e2e_ms * 1e6)
    waited_ms = max(0.0, (first_token_ns - committed_ns) / 1e6)
    tool_ms = sum(
        t["duration_ms"] or 0.0
        for t in tools
        if t["end_ns"] is not None and t["end_ns"] <= first_token_ns
    )
    tool_ms = float(min(tool_ms, waited_ms))
    after_token_ms = max(0.0, (first_audio_ns - max(first_token_ns, committed_ns)) / 1e6)
    tts_ms = min(tts_ttfb_ms, after_token_ms) if tts_ttfb_ms is not None else 0.0
    parts = {
        "end_of_turn_ms": round(end_of_turn_ms, 3),
        "llm_ms": round(waited_ms - tool_ms, 3),
        "tool_ms": round(tool_ms, 3),
        "tts_ms": round(tts_ms, 3),
    }
    parts["other_ms"] = round(e2e_ms - sum(parts.values()), 3)
    return parts


def _text(values: list[Any]) -> str | None:
    texts = [v.strip() for v in values if isinstance(v, str) and v.strip()]
    return " ".join(texts) if texts else None


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
        ttft_key = "lk.response.ttft"
        if ttft is None:
            requests = tree.descendants(agent, "llm_request")
            if requests:
                ttft = _ms(requests[0]["attributes"].get("gen_ai.response.time_to_first_chunk"))
        answer = llm_nodes[-1] if llm_nodes else None
        spoken = next(
            (n for n in llm_nodes if n["attributes"].get("lk.pii.response.text")),
            llm_nodes[0] if llm_nodes else None,
        )
        tts_nodes = tree.descendants(agent, "tts_node")
        tools = [
            _tool(
                t["attributes"].get("gen_ai.tool.name")
                or t["attributes"].get("lk.function_tool.name"),
                _duration_ms(t),
                bool(t["attributes"].get("lk.function_tool.is_error"))
                or t.get("status_code") == STATUS_ERROR,
                t,
            )
            for t in tree.descendants(agent, "function_tool")
        ]
        stt = _ms(user_attrs.get("lk.transcription_delay"))
        if stt is None:
            stt = _ms(attrs.get("lk.transcription_delay"))
        end_of_turn = _ms(attrs.get("lk.end_of_turn_delay"))
        if end_of_turn is None:
            end_of_turn = _ms(user_attrs.get("lk.end_of_turn_delay"))
        speaking = tree.descendants(user, "user_speaking") if user else []
        speech_end = speaking[-1]["end_ns"] if speaking else None
        e2e = _ms(attrs.get("lk.e2e_latency"))
        tts_ttfb = _ms(tts_nodes[0]["attributes"].get("lk.response.ttfb")) if tts_nodes else None
        answer_token = _first_token_ns(answer, ttft_key)
        turns.append(
            {
                "number": number,
                "span_id": agent["span_id"],
                "user_span_id": user["span_id"] if user else None,
                "span_ids": _turn_span_ids(tree, agent, user),
                "start_ns": user["start_ns"] if user else agent["start_ns"],
                "end_ns": agent["end_ns"],
                "user_text": user_attrs.get("lk.pii.user_transcript")
                or attrs.get("lk.pii.user_input"),
                "agent_text": _text(
                    [n["attributes"].get("lk.pii.response.text") for n in llm_nodes]
                )
                or attrs.get("lk.pii.response.text"),
                "end_of_turn_ms": end_of_turn,
                "stt_ms": stt,
                "llm_ttft_ms": ttft,
                "answer_ttft_ms": _ms(answer["attributes"].get(ttft_key)) if answer else None,
                "answer_wait_ms": _wait_ms(speech_end, answer_token),
                "tts_ttfb_ms": tts_ttfb,
                "tool_ms": _tool_ms(tools),
                "llm_calls": len(llm_nodes),
                "tool_calls": tools,
                "e2e_ms": e2e,
                "breakdown": _breakdown(
                    e2e_ms=e2e,
                    speech_end_ns=speech_end,
                    end_of_turn_ms=end_of_turn,
                    first_token_ns=_first_token_ns(spoken, ttft_key),
                    tools=tools,
                    tts_ttfb_ms=tts_ttfb,
                ),
                "interrupted": bool(attrs.get("lk.interrupted", False)),
            }
        )
    return turns


def _turn_span_ids(tree: _Tree, agent: dict[str, Any], user: dict[str, Any] | None) -> list[str]:
    ids = [agent["span_id"], *tree.all_descendants(agent)]
    if user is not None:
        ids += [user["span_id"], *tree.all_descendants(user)]
    return ids


def _wait_ms(start_ns: int | None, end_ns: int | None) -> float | None:
    if start_ns is None or end_ns is None:
        return None
    return round((end_ns - start_ns) / 1e6, 3)


def _tool_ms(tools: list[dict[str, Any]]) -> float | None:
    durations = [t["duration_ms"] for t in tools if t["duration_ms"] is not None]
    return round(sum(durations), 3) if durations else None


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
            # No tool span: the tool ran between the LLM request that asked for it and
            # the next one, which holds its result.
            before = _tool_call_names(llms[0])
            asked = llms[-2]
            gap = {
                "span_id": None,
                "start_ns": asked["end_ns"],
                "end_ns": llms[-1]["start_ns"],
            }
            for call_id, name in _tool_call_names(llms[-1]).items():
                if call_id not in before:
                    tools.append(_tool(name, None, False, None))
            if tools:
                tools[0]["start_ns"], tools[0]["end_ns"] = gap["start_ns"], gap["end_ns"]
                tools[0]["duration_ms"] = round((gap["end_ns"] - gap["start_ns"]) / 1e6, 3)
        stt = stts[-1] if stts else None
        stt_ttfb = _ms(stt["attributes"].get("metrics.ttfb")) if stt else None
        stt_ttfb_ns = _ns(stt["attributes"].get("metrics.ttfb")) if stt else None
        speech_end = (
            stt["end_ns"] - stt_ttfb_ns if stt is not None and stt_ttfb_ns is not None else None
        )
        end_of_turn = _wait_ms(speech_end, llms[0]["start_ns"]) if llms else None
        answer = llms[-1] if llms else None
        spoken = next((s for s in llms if s["attributes"].get("output")), answer)
        e2e = _ms(attrs.get("turn.user_bot_latency_seconds"))
        tts_ttfb = _ms(ttss[0]["attributes"].get("metrics.ttfb")) if ttss else None
        number = attrs.get("turn.number")
        turns.append(
            {
                "number": number if isinstance(number, int) else index,
                "span_id": turn["span_id"],
                "user_span_id": None,
                "span_ids": [turn["span_id"], *tree.all_descendants(turn)],
                "start_ns": turn["start_ns"],
                "end_ns": turn["end_ns"],
                "user_text": _text([s["attributes"].get("transcript") for s in stts]),
                "agent_text": _text([s["attributes"].get("text") for s in ttss])
                or _text([s["attributes"].get("output") for s in llms]),
                "end_of_turn_ms": end_of_turn,
                "stt_ms": stt_ttfb,
                "llm_ttft_ms": _ms(llms[0]["attributes"].get("metrics.ttfb")) if llms else None,
                "answer_ttft_ms": _ms(answer["attributes"].get("metrics.ttfb")) if answer else None,
                "answer_wait_ms": _wait_ms(speech_end, _first_token_ns(answer, "metrics.ttfb")),
                "tts_ttfb_ms": tts_ttfb,
                "tool_ms": _tool_ms(tools),
                "llm_calls": len(llms),
                "tool_calls": tools,
                "e2e_ms": e2e,
                "breakdown": _breakdown(
                    e2e_ms=e2e,
                    speech_end_ns=speech_end,
                    end_of_turn_ms=end_of_turn,
                    first_token_ns=_first_token_ns(spoken, "metrics.ttfb"),
                    tools=tools,
                    tts_ttfb_ms=tts_ttfb,
                ),
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
    failed = [tool for t in turns for tool in t["tool_calls"] if tool["error"]]
    error_spans = sum(1 for s in tree.spans if s.get("status_code") == STATUS_ERROR)
    # A failed tool whose span has status ERROR is already one of the error spans.
    errors = error_spans + sum(1 for tool in failed if not tool["error_span"])
    return {
        "framework": source,
        "turns": turns,
        "totals": {
            "turn_count": len(turns),
            "median_e2e_ms": round(statistics.median(latencies), 3) if latencies else None,
            "worst_e2e_ms": max(latencies) if latencies else None,
            "p95_e2e_ms": percentile(latencies, 0.95),
            "tool_calls": tool_calls,
            "tool_failures": len(failed),
            "errors": errors,
            "stt_ms_total": _sum(t["stt_ms"] for t in turns),
            "llm_calls": sum(t["llm_calls"] for t in turns),
            "llm_model": _llm_model(tree),
        },
    }


_LLM_SPANS = ("llm_request", "llm_node", "llm")


def _llm_model(tree: _Tree) -> str | None:
    """``gen_ai.request.model`` of the call's first LLM span (LiveKit ``llm_request`` /
    ``llm_node``, Pipecat ``llm``)."""
    for span in tree.spans:
        if span["name"] in _LLM_SPANS:
            model = span.get("attributes", {}).get("gen_ai.request.model")
            if isinstance(model, str) and model:
                return model
    return None


def _sum(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present), 3) if present else None
