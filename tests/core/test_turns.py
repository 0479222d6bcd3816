"""Turn latency from the captured LiveKit and Pipecat calls, against values read off
the fixtures' INSPECT.txt by hand."""

import pytest

from collector.turns import summarize_call
from tests.fixture_spans import fixture_span_dicts


def test_livekit_turns():
    summary = summarize_call(fixture_span_dicts("livekit"))
    assert summary["framework"] == "livekit"
    turns = summary["turns"]
    assert [t["user_text"] for t in turns] == [
        "Hello, can you hear me?",
        "What's the weather in Tokyo?",
        "Great, thanks. Bye!",
    ]
    first = turns[0]
    # agent_turn lk.e2e_latency = 0.705622673034668 s, user_turn lk.transcription_delay =
    # 0.20059537887573242 s, llm_node lk.response.ttft = 0.10146902799897362 s,
    # tts_node lk.response.ttfb = 0.20157511300021724 s.
    assert first["e2e_ms"] == pytest.approx(705.623, abs=1e-3)
    assert first["stt_ms"] == pytest.approx(200.595, abs=1e-3)
    assert first["llm_ttft_ms"] == pytest.approx(101.469, abs=1e-3)
    assert first["tts_ttfb_ms"] == pytest.approx(201.575, abs=1e-3)
    # Turn 2 calls get_weather once and runs the LLM twice.
    assert [t["name"] for t in turns[1]["tool_calls"]] == ["get_weather"]
    assert turns[1]["llm_calls"] == 2
    totals = summary["totals"]
    assert totals["turn_count"] == 3 and totals["tool_calls"] == 1 and totals["errors"] == 0
    e2e = sorted(t["e2e_ms"] for t in turns)
    assert totals["median_e2e_ms"] == e2e[1] and totals["worst_e2e_ms"] == e2e[2]


def test_pipecat_turns():
    summary = summarize_call(fixture_span_dicts("pipecat"))
    assert summary["framework"] == "pipecat"
    turns = summary["turns"]
    assert [t["number"] for t in turns] == [1, 2, 3]
    first = turns[0]
    # stt span 1326.131246 ms; llm metrics.ttfb 0.28793764114379883 s; tts metrics.ttfb
    # 0.1471879482269287 s; turn.user_bot_latency_seconds 3.6902759075164795 s.
    assert first["stt_ms"] == pytest.approx(1326.131, abs=1e-3)
    assert first["llm_ttft_ms"] == pytest.approx(287.938, abs=1e-3)
    assert first["tts_ttfb_ms"] == pytest.approx(147.188, abs=1e-3)
    assert first["e2e_ms"] == pytest.approx(3690.276, abs=1e-3)
    assert [t["name"] for t in turns[1]["tool_calls"]] == ["get_weather"]
    assert summary["totals"]["worst_e2e_ms"] == pytest.approx(4077.241, abs=1e-3)


def test_arrival_order_and_missing_root_do_not_matter():
    spans = fixture_span_dicts("livekit")
    without_root = [s for s in spans if s["name"] != "agent_session"]
    assert summarize_call(list(reversed(without_root)))["totals"]["turn_count"] == 3


def test_error_spans_and_failed_tools_are_counted():
    spans = fixture_span_dicts("livekit")
    next(s for s in spans if s["name"] == "function_tool")["attributes"][
        "lk.function_tool.is_error"
    ] = True
    next(s for s in spans if s["name"] == "tts_request")["status_code"] = 2
    totals = summarize_call(spans)["totals"]
    assert totals["errors"] == 2


def test_spans_of_no_known_framework():
    spans = [{"span_id": "01", "parent_span_id": None, "name": "x", "start_ns": 1, "end_ns": 2}]
    assert summarize_call(spans)["totals"]["turn_count"] == 0
