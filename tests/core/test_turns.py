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
    # stt metrics.ttfb 0.4242212772369385 s (the span lasts 1326 ms); llm metrics.ttfb 0.28793764114379883 s; tts metrics.ttfb
    # 0.1471879482269287 s; turn.user_bot_latency_seconds 3.6902759075164795 s.
    assert first["stt_ms"] == pytest.approx(424.221, abs=1e-3)
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
    assert totals["errors"] == 2 and totals["tool_failures"] == 1


def test_a_failed_tool_with_an_error_span_counts_once():
    # LiveKit marks a raising tool both ways: lk.function_tool.is_error and status ERROR.
    spans = fixture_span_dicts("livekit")
    tool = next(s for s in spans if s["name"] == "function_tool")
    tool["attributes"]["lk.function_tool.is_error"] = True
    tool["status_code"] = 2
    totals = summarize_call(spans)["totals"]
    assert (totals["errors"], totals["tool_failures"]) == (1, 1)


def test_spans_of_no_known_framework():
    spans = [{"span_id": "01", "parent_span_id": None, "name": "x", "start_ns": 1, "end_ns": 2}]
    assert summarize_call(spans)["totals"]["turn_count"] == 0


def test_livekit_end_of_turn_wait_and_breakdown():
    turns = summarize_call(fixture_span_dicts("livekit"))["turns"]
    first = turns[0]
    # agent_turn lk.end_of_turn_delay = 0.5008828639984131 s: ~500 of the 706 ms.
    assert first["end_of_turn_ms"] == pytest.approx(500.883, abs=1e-3)
    parts = first["breakdown"]
    assert sum(parts.values()) == pytest.approx(first["e2e_ms"], abs=1e-3)
    # The LLM ran during the end-of-turn wait (its first token 101 ms after the final
    # transcript, at 303.9 ms, before the turn was committed at 500.9 ms), so the path
    # is end of turn, then the TTS's first byte (tts_node lk.response.ttfb 201.575 ms).
    assert parts["end_of_turn_ms"] == pytest.approx(500.883, abs=1e-3)
    assert parts["llm_ms"] == 0.0 and parts["tool_ms"] == 0.0
    assert parts["tts_ms"] == pytest.approx(201.575, abs=1e-3)
    assert parts["other_ms"] == pytest.approx(3.165, abs=1e-3)
    assert first["agent_text"] == "Hi! Yes, I can hear you. How can I help?"


def test_livekit_tool_turn_shows_first_and_answer_ttft():
    second = summarize_call(fixture_span_dicts("livekit"))["turns"][1]
    # First llm_node lk.response.ttft 0.1016 s; the answer's (after get_weather) 0.1015 s.
    assert second["llm_ttft_ms"] == pytest.approx(101.61, abs=1e-2)
    assert second["answer_ttft_ms"] == pytest.approx(101.534, abs=1e-3)
    # End of speech (user_speaking end) to the answer's first token: 2.3 s, while e2e
    # (first audio: "Let me check the weather for you.") is 710 ms.
    assert second["answer_wait_ms"] == pytest.approx(2326.497, abs=1e-3)
    assert second["tool_ms"] == pytest.approx(3.263, abs=1e-3)
    assert second["agent_text"] == "Let me check the weather for you. It is sunny in Tokyo today."
    assert len(second["span_ids"]) == 20


def test_pipecat_stt_is_metrics_ttfb_not_the_span():
    turns = summarize_call(fixture_span_dicts("pipecat"))["turns"]
    # stt spans last 1326 / 1887 / 1429 ms (the user talking); metrics.ttfb is the
    # end of speech to the transcript.
    assert [t["stt_ms"] for t in turns] == pytest.approx([424.221, 368.442, 367.126], abs=1e-3)


def test_pipecat_turn_detection_wait_and_breakdown():
    turns = summarize_call(fixture_span_dicts("pipecat"))["turns"]
    # End of speech (stt end minus its metrics.ttfb) to the first llm span: smart-turn's
    # 3 s fallback in every turn of this capture.
    assert [t["end_of_turn_ms"] for t in turns] == pytest.approx(
        [3203.041, 3202.957, 3200.178], abs=1e-3
    )
    for turn in turns:
        assert sum(turn["breakdown"].values()) == pytest.approx(turn["e2e_ms"], abs=1e-3)
    second = turns[1]
    # The first llm span asks for get_weather (empty output); the second speaks.
    assert second["llm_ttft_ms"] == pytest.approx(259.193, abs=1e-3)
    assert second["answer_ttft_ms"] == pytest.approx(256.747, abs=1e-3)
    assert second["answer_wait_ms"] == pytest.approx(3759.618, abs=1e-3)
    assert second["tool_ms"] == pytest.approx(6.789, abs=1e-3)
    assert second["breakdown"]["tool_ms"] == pytest.approx(6.789, abs=1e-3)
    assert second["breakdown"]["other_ms"] == pytest.approx(173.25, abs=1e-2)
    assert second["user_text"] == "What's the weather in Tokyo?"
    assert second["agent_text"] == "It's sunny in Tokyo today, around 22 degrees."
