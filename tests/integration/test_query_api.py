"""Issue 5 acceptance: the query API over calls ingested through the real OTLP receiver.

Every response a test receives is validated against the served OpenAPI document.
Latency values were read off the fixtures by hand (see tests/core/test_turns.py and
the span attributes named in each comment).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from jsonschema import Draft202012Validator

from collector.openapi import OPENAPI
from collector.query import CallFilter, TraceFilter, encode_cursor
from exporters.sqlite_query import calls_sql, traces_sql
from tests.query_dataset import (
    BASE_S,
    XSS_NAME,
    Dataset,
    build_requests,
    make_dataset,
)
from tests.support import eventually, fixture_requests, free_port, query, running_service

pytestmark = pytest.mark.timeout(120)

_TEMPLATES = [
    (re.compile(r"^/api/v1/calls$"), "/api/v1/calls"),
    (re.compile(r"^/api/v1/calls/[^/]+$"), "/api/v1/calls/{call_id}"),
    (re.compile(r"^/api/v1/traces$"), "/api/v1/traces"),
    (re.compile(r"^/api/v1/traces/[^/]+$"), "/api/v1/traces/{trace_id}"),
    (re.compile(r"^/api/v1/spans$"), "/api/v1/spans"),
    (re.compile(r"^/api/v1/stats/turns$"), "/api/v1/stats/turns"),
]


def check_against_openapi(path: str, status: int, body: Any) -> None:
    """The response is one the OpenAPI document describes for this path and status."""
    template = next(t for pattern, t in _TEMPLATES if pattern.match(path))
    responses = OPENAPI["paths"][template]["get"]["responses"]
    assert str(status) in responses, f"{template} answered an undocumented {status}"
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    document = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": OPENAPI["components"],
        **schema,
    }
    Draft202012Validator(document).validate(body)


class Api:
    def __init__(self, base: str, session: aiohttp.ClientSession, key: str):
        self.base, self.session, self.key = base, session, key

    async def get(
        self, path: str, params: Any = None, key: str | None = None, auth: str | None = None
    ) -> tuple[int, Any]:
        headers = {"Authorization": auth if auth is not None else f"Bearer {key or self.key}"}
        async with self.session.get(self.base + path, params=params, headers=headers) as response:
            body = await response.json()
            check_against_openapi(path, response.status, body)
            if response.status == 401:
                assert response.headers["WWW-Authenticate"] == "Bearer"
            return response.status, body

    async def ok(self, path: str, params: Any = None, key: str | None = None) -> Any:
        status, body = await self.get(path, params, key)
        assert status == 200, body
        return body

    async def all_pages(self, path: str, field: str, params: list[tuple[str, str]]) -> list[Any]:
        items: list[Any] = []
        cursor = None
        while True:
            page = await self.ok(path, [*params, *([("cursor", cursor)] if cursor else [])])
            items += page[field]
            cursor = page["next_cursor"]
            if cursor is None:
                return items


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return make_dataset(tmp_path_factory.mktemp("query"))


@pytest.fixture
async def api(dataset: Dataset) -> AsyncIterator[Api]:
    port = free_port()
    async with running_service(dataset.config(port)), aiohttp.ClientSession() as session:
        yield Api(f"http://127.0.0.1:{port}", session, dataset.key)


def by_room(calls: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {call["room_id"]: call for call in calls}


def walk(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for node in nodes:
        out.append(node)
        out += walk(node["children"])
    return out


def child_names(node: dict[str, Any]) -> list[str]:
    return [child["name"] for child in node["children"]]


# -- calls ----------------------------------------------------------------------------


async def test_calls_newest_first_with_turn_totals(api: Api, dataset: Dataset) -> None:
    calls = (await api.ok("/api/v1/calls"))["calls"]
    rooms = [call["room_id"] for call in calls]
    assert sorted(rooms) == sorted(dataset.rooms)
    starts = [call["start_ns"] for call in calls]
    assert starts == sorted(starts, reverse=True)
    assert [dataset.rooms[r] // 10**9 for r in rooms] == sorted(
        (s // 10**9 for s in dataset.rooms.values()), reverse=True
    )
    livekit = by_room(calls)["RM_test123"]
    # agent_turn lk.e2e_latency: 0.705622673, 0.710510015, 0.705836058 s.
    assert livekit["turn_count"] == 3
    assert livekit["median_turn_ms"] == pytest.approx(705.836, abs=1e-3)
    assert livekit["worst_turn_ms"] == pytest.approx(710.510, abs=1e-3)
    assert (livekit["tool_calls"], livekit["error_count"], livekit["span_count"]) == (1, 0, 53)
    assert livekit["framework"] == "livekit" and livekit["source"] == "livekit.room.id"
    assert livekit["start"] == "2026-11-24T07:34:30.127006748Z"
    # agent_session runs 07:34:30.127006748 .. 07:34:53.340930949.
    assert livekit["duration_ms"] == pytest.approx(23213.924, abs=1e-3)
    pipecat = by_room(calls)["RM_test789"]
    # turn turn.user_bot_latency_seconds: 3.690275908, 4.077240944, 3.667662859 s.
    assert pipecat["median_turn_ms"] == pytest.approx(3690.276, abs=1e-3)
    assert pipecat["worst_turn_ms"] == pytest.approx(4077.241, abs=1e-3)
    assert (pipecat["turn_count"], pipecat["tool_calls"], pipecat["span_count"]) == (3, 1, 14)
    errors = by_room(calls)["RM_errors"]
    assert errors["error_count"] == 1 and errors["span_count"] == 54
    assert by_room(calls)["RM_tagged"]["tags"] == {"customer": "initech", "tier": "gold"}
    assert livekit["tags"] == {}


async def test_summary_cache_is_kept_and_used(api: Api, dataset: Dataset) -> None:
    await api.ok("/api/v1/calls")
    cached = query(
        dataset.db,
        "SELECT c.summary_spans, (SELECT count(*) FROM spans s WHERE s.project = c.project"
        " AND s.call_id = c.call_id) FROM calls c WHERE c.project = 'acme'",
    )
    assert len(cached) == len(dataset.rooms)
    assert all(summary_spans == count for summary_spans, count in cached)


async def test_call_filters(api: Api, dataset: Dataset) -> None:
    tagged = (await api.ok("/api/v1/calls", {"tag.customer": "initech"}))["calls"]
    assert [c["room_id"] for c in tagged] == ["RM_tagged"]
    assert (await api.ok("/api/v1/calls", {"tag.customer": "hooli"}))["calls"] == []
    # A resource attribute and a span attribute (pipecat's llm spans carry the model).
    pipecat = await api.ok("/api/v1/calls", {"attr.service.name": "pipecat-voice-agent-fixture"})
    assert {c["room_id"] for c in pipecat["calls"]} == {"RM_test789", "RM_pc1", "RM_pc2"}
    model = await api.ok("/api/v1/calls", [("attr.gen_ai.request.model", "gpt-4.1")])
    assert {c["room_id"] for c in model["calls"]} == {"RM_test789", "RM_pc1", "RM_pc2"}
    both = await api.ok(
        "/api/v1/calls", [("attr.gen_ai.request.model", "gpt-4.1"), ("attr.turn.number", "3")]
    )
    assert len(both["calls"]) == 3
    # Time range by start: [09:00, 09:20) holds RM_tagged (09:00) and RM_errors (09:10).
    start, end = BASE_S * 10**9, (BASE_S + 20 * 60) * 10**9
    ranged = await api.ok("/api/v1/calls", {"start": str(start), "end": str(end)})
    assert [c["room_id"] for c in ranged["calls"]] == ["RM_errors", "RM_tagged"]
    rfc = await api.ok(
        "/api/v1/calls", {"start": "2026-11-24T09:00:00Z", "end": "2026-11-24T10:20:00+01:00"}
    )
    assert rfc["calls"] == ranged["calls"]


async def test_call_tree_livekit(api: Api) -> None:
    calls = by_room((await api.ok("/api/v1/calls"))["calls"])
    body = await api.ok(f"/api/v1/calls/{calls['RM_test123']['call_id']}")
    assert body["call"]["call_id"] == calls["RM_test123"]["call_id"]
    assert body["framework"] == "livekit"
    [root] = body["tree"]
    assert root["name"] == "agent_session" and root["parent_span_id"] is None
    assert len(walk(body["tree"])) == 53
    top = child_names(root)
    assert top.count("user_turn") == 3 and top.count("agent_turn") == 3
    assert top[0] == "session_start" and "session_close" in top
    agent_turns = [c for c in root["children"] if c["name"] == "agent_turn"]
    tool_turn = agent_turns[1]
    assert child_names(tool_turn).count("llm_node") == 2
    assert "function_tool" in child_names(tool_turn)
    llm_node = next(c for c in tool_turn["children"] if c["name"] == "llm_node")
    assert child_names(llm_node) == ["llm_request"]
    assert child_names(llm_node["children"][0]) == ["llm_request_run"]
    assert llm_node["attributes"]["lk.response.ttft"] == pytest.approx(0.10160998500032292)
    # Children are in start order; resources and scopes are attached.
    starts = [c["start_ns"] for c in root["children"]]
    assert starts == sorted(starts)
    assert body["resources"][root["resource_id"]]["livekit.room.id"] == "RM_test123"
    assert root["scope"]["name"] == "livekit-agents"
    events = [e["name"] for e in root["events"]]
    assert "agent_state_changed" in events

    turns = body["turns"]
    assert [t["user_text"] for t in turns] == [
        "Hello, can you hear me?",
        "What's the weather in Tokyo?",
        "Great, thanks. Bye!",
    ]
    # user_turn lk.transcription_delay, llm_node lk.response.ttft, tts_node lk.response.ttfb,
    # agent_turn lk.e2e_latency, turn by turn (seconds in the spans, ms here).
    assert [t["stt_ms"] for t in turns] == pytest.approx([200.595, 200.221, 200.721], abs=1e-3)
    assert [t["llm_ttft_ms"] for t in turns] == pytest.approx([101.469, 101.610, 101.538], abs=1e-3)
    assert [t["tts_ttfb_ms"] for t in turns] == pytest.approx([201.575, 201.252, 201.078], abs=1e-3)
    assert [t["e2e_ms"] for t in turns] == pytest.approx([705.623, 710.510, 705.836], abs=1e-3)
    # agent_turn lk.end_of_turn_delay: about 500 of each turn's ~706 ms.
    assert [t["end_of_turn_ms"] for t in turns] == pytest.approx(
        [500.883, 501.320, 501.099], abs=1e-3
    )
    for turn in turns:
        assert sum(turn["breakdown"].values()) == pytest.approx(turn["e2e_ms"], abs=1e-3)
    assert turns[1]["answer_wait_ms"] == pytest.approx(2326.497, abs=1e-3)
    assert turns[0]["agent_text"] == "Hi! Yes, I can hear you. How can I help?"
    assert [tool["name"] for tool in turns[1]["tool_calls"]] == ["get_weather"]
    assert turns[1]["tool_calls"][0]["duration_ms"] == pytest.approx(3.263, abs=1e-3)
    assert body["totals"]["turn_count"] == 3 and body["totals"]["llm_calls"] == 4


async def test_call_tree_pipecat(api: Api) -> None:
    calls = by_room((await api.ok("/api/v1/calls"))["calls"])
    body = await api.ok(f"/api/v1/calls/{calls['RM_test789']['call_id']}")
    [root] = body["tree"]
    assert root["name"] == "conversation" and child_names(root) == ["turn", "turn", "turn"]
    assert [child_names(t) for t in root["children"]] == [
        ["stt", "llm", "tts"],
        ["stt", "llm", "llm", "tts"],
        ["stt", "llm", "tts"],
    ]
    turns = body["turns"]
    # stt metrics.ttfb (not the stt span's 1326 / 1887 / 1429 ms), first llm metrics.ttfb,
    # tts metrics.ttfb, turn.user_bot_latency_seconds.
    assert [t["stt_ms"] for t in turns] == pytest.approx([424.221, 368.442, 367.126], abs=1e-3)
    assert [t["end_of_turn_ms"] for t in turns] == pytest.approx(
        [3203.041, 3202.957, 3200.178], abs=1e-3
    )
    assert [t["llm_ttft_ms"] for t in turns] == pytest.approx([287.938, 259.193, 256.207], abs=1e-3)
    assert [t["tts_ttfb_ms"] for t in turns] == pytest.approx([147.188, 144.373, 143.401], abs=1e-3)
    assert [t["e2e_ms"] for t in turns] == pytest.approx([3690.276, 4077.241, 3667.663], abs=1e-3)
    assert body["totals"]["median_e2e_ms"] == pytest.approx(3690.276, abs=1e-3)


async def test_call_without_its_root_shows_orphans_under_placeholders(
    api: Api, dataset: Dataset
) -> None:
    calls = by_room((await api.ok("/api/v1/calls"))["calls"])
    orphan = calls["RM_orphan"]
    assert orphan["span_count"] == 51 and orphan["turn_count"] == 3
    body = await api.ok(f"/api/v1/calls/{orphan['call_id']}")
    roots = body["tree"]
    assert all(r["placeholder"] for r in roots)
    assert sorted(r["span_id"] for r in roots) == sorted(dataset.orphan_parent_ids)
    assert len(walk(roots)) == 51 + 2
    session = next(r for r in roots if r["name"] == "(missing span)" and len(r["children"]) > 1)
    assert child_names(session).count("agent_turn") == 3
    # The placeholder spans its children.
    assert session["start_ns"] == min(c["start_ns"] for c in session["children"])
    assert session["end_ns"] == max(c["end_ns"] for c in session["children"])
    [trace] = (await api.ok("/api/v1/traces", {"attr.livekit.room.id": "RM_orphan"}))["traces"]
    assert trace["root_name"] is None
    tree = (await api.ok(f"/api/v1/traces/{trace['trace_id']}"))["tree"]
    assert sorted(r["span_id"] for r in tree) == sorted(dataset.orphan_parent_ids)


async def test_span_names_are_returned_as_data(api: Api) -> None:
    calls = by_room((await api.ok("/api/v1/calls"))["calls"])
    body = await api.ok(f"/api/v1/calls/{calls['RM_errors']['call_id']}")
    spans = walk(body["tree"])
    html = next(s for s in spans if s["name"] == XSS_NAME)
    assert html["attributes"]["note"] == "<script>alert(2)</script>"
    failed = next(s for s in spans if s["status_code"] == 2)
    assert failed["name"] == "tts_request"
    assert failed["status_message"] == "tts provider timed out"


# -- traces ---------------------------------------------------------------------------


async def test_trace_search_filters(api: Api, dataset: Dataset) -> None:
    everything = (await api.ok("/api/v1/traces"))["traces"]
    assert len(everything) == len(dataset.rooms)  # one trace per call in these captures
    starts = [t["start_ns"] for t in everything]
    assert starts == sorted(starts, reverse=True)

    async def rooms(params: Any) -> set[str]:
        traces = (await api.ok("/api/v1/traces", params))["traces"]
        call_rooms = {c["call_id"]: c["room_id"] for c in (await api.ok("/api/v1/calls"))["calls"]}
        return {call_rooms[t["call_id"]] for t in traces}

    livekit = {"RM_test123", "RM_tagged", "RM_errors", "RM_orphan"}
    pipecat = {"RM_test789", "RM_pc1", "RM_pc2"}
    assert await rooms({"name": "function_tool"}) == livekit
    assert await rooms({"name": "function"}) == set()  # exact
    assert await rooms({"name_contains": "TTS_req"}) == livekit  # substring, any case
    assert await rooms({"name_contains": "img src"}) == {"RM_errors"}
    assert await rooms({"service": "pipecat-voice-agent-fixture"}) == pipecat
    assert await rooms({"attr.gen_ai.request.model": "gpt-4.1"}) == pipecat
    assert await rooms({"attr.livekit.room.id": "RM_pc1"}) == {"RM_pc1"}  # resource attribute
    assert await rooms({"attr.turn.number": "2"}) == pipecat  # an int attribute, as text
    assert await rooms({"attr.lk.interrupted": "false"}) == livekit  # a bool, as text
    assert await rooms({"status": "error"}) == {"RM_errors"}
    assert await rooms({"status": "ok"}) == (livekit | pipecat) - {"RM_errors"}
    # Trace-level: the name and the attribute are met by different spans of one trace.
    assert await rooms({"name": "tts", "attr.gen_ai.request.model": "gpt-transcribe"}) == pipecat
    assert await rooms({"name": "tts", "attr.gen_ai.request.model": "fake-llm"}) == set()
    # The LiveKit sessions last 23.2 s (the orphan's root is missing: less), Pipecat's 35.1 s.
    assert await rooms({"min_duration_ms": "30000"}) == pipecat
    assert await rooms({"min_duration_ms": "23213.924"}) == pipecat | livekit - {"RM_orphan"}
    assert await rooms({"start": "2026-11-24T09:00:00Z", "end": "2026-11-24T09:35:00Z"}) == {
        "RM_tagged",
        "RM_errors",
        "RM_orphan",
        "RM_pc1",
        "RM_pc2",
    }
    assert await rooms({"end": str(BASE_S * 10**9)}) == {"RM_test123", "RM_test789"}


async def test_trace_tree(api: Api) -> None:
    [trace] = (await api.ok("/api/v1/traces", {"attr.livekit.room.id": "RM_test789"}))["traces"]
    assert trace["root_name"] == "conversation" and trace["span_count"] == 14
    assert trace["service"] == "pipecat-voice-agent-fixture" and trace["has_error"] is False
    [failed] = (await api.ok("/api/v1/traces", {"status": "error"}))["traces"]
    assert failed["has_error"] is True and failed["span_count"] == 54
    body = await api.ok(f"/api/v1/traces/{trace['trace_id']}")
    assert body["trace_id"] == trace["trace_id"] and body["trace"] == trace
    [root] = body["tree"]
    assert root["name"] == "conversation" and len(walk(body["tree"])) == 14
    upper = await api.ok(f"/api/v1/traces/{trace['trace_id'].upper()}")
    assert upper["trace_id"] == trace["trace_id"]


async def test_paging_has_no_gaps_or_repeats(api: Api, dataset: Dataset) -> None:
    for path, field, key in (
        ("/api/v1/calls", "calls", "call_id"),
        ("/api/v1/traces", "traces", "trace_id"),
    ):
        whole = [item[key] for item in (await api.ok(path, {"limit": "1000"}))[field]]
        for limit in ("1", "2", "3"):
            paged = [item[key] for item in await api.all_pages(path, field, [("limit", limit)])]
            assert paged == whole
        assert len(whole) == len(dataset.rooms)
    # Paging a filtered search keeps the filter.
    filtered = await api.all_pages(
        "/api/v1/traces", "traces", [("limit", "1"), ("name", "function_tool")]
    )
    assert len(filtered) == 4
    # RM_pc1 and RM_pc2 start at the same nanosecond: a page boundary between them
    # neither repeats nor skips one (ties are ordered by id).
    tied = [r for r in dataset.rooms if dataset.rooms[r] == dataset.rooms["RM_pc1"]]
    assert sorted(tied) == ["RM_pc1", "RM_pc2"]


async def test_a_key_sees_only_its_project(api: Api, dataset: Dataset) -> None:
    mine = (await api.ok("/api/v1/calls"))["calls"]
    theirs = (await api.ok("/api/v1/calls", key=dataset.other_key))["calls"]
    assert [c["room_id"] for c in theirs] == [dataset.other_room]
    assert dataset.other_room not in {c["room_id"] for c in mine}
    their_traces = (await api.ok("/api/v1/traces", key=dataset.other_key))["traces"]
    assert len(their_traces) == 1
    assert (await api.get(f"/api/v1/calls/{theirs[0]['call_id']}"))[0] == 404
    assert (await api.get(f"/api/v1/traces/{their_traces[0]['trace_id']}"))[0] == 404
    status, _ = await api.get(f"/api/v1/calls/{mine[0]['call_id']}", key=dataset.other_key)
    assert status == 404
    # Attribute search does not reach across projects either.
    found = await api.ok("/api/v1/traces", {"attr.livekit.room.id": "RM_other"})
    assert found["traces"] == []


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        ("/api/v1/calls", {"start": "yesterday"}, "start: expected an RFC 3339 time"),
        ("/api/v1/calls", {"start": "2026-11-24T09:00:00"}, "start: expected an RFC 3339"),
        ("/api/v1/calls", {"end": "2026-11-24"}, "end: expected an RFC 3339"),
        ("/api/v1/calls", {"limit": "0"}, "limit: expected a whole number from 1 to 1000"),
        ("/api/v1/calls", {"limit": "lots"}, "limit: expected a whole number"),
        ("/api/v1/calls", {"limit": "²"}, "limit: expected a whole number"),
        ("/api/v1/calls", {"start": "99999999999999999999"}, "start: expected an RFC 3339"),
        ("/api/v1/calls", {"start": "²"}, "start: expected an RFC 3339"),
        ("/api/v1/calls", {"cursor": encode_cursor([2**70, "c"])}, "cursor: not a cursor"),
        ("/api/v1/calls", {"cursor": "bm90IGEgY3Vyc29y"}, "cursor: not a cursor"),
        ("/api/v1/calls", {"cursor": "%%%"}, "cursor: not a cursor"),
        ("/api/v1/calls", {"name": "x"}, "name: unknown parameter"),
        ("/api/v1/calls", {"attr.": "x"}, "attr.: unknown parameter"),
        ("/api/v1/calls", [("limit", "1"), ("limit", "2")], "limit: given more than once"),
        ("/api/v1/calls", {"start": "200", "end": "100"}, "start: must be before end"),
        ("/api/v1/traces", {"status": "failed"}, "status: expected error or ok"),
        ("/api/v1/traces", {"min_duration_ms": "-1"}, "min_duration_ms: expected milliseconds"),
        ("/api/v1/traces", {"min_duration_ms": "slow"}, "min_duration_ms: expected milliseconds"),
        ("/api/v1/traces", {"tag.": "x"}, "tag.: unknown parameter"),
        ("/api/v1/traces/not-hex", None, "trace_id: expected 32 hex digits"),
        ("/api/v1/traces/abcd", None, "trace_id: expected 32 hex digits"),
        ("/api/v1/calls/call_x", {"limit": "1"}, "limit: unknown parameter"),
    ],
)
async def test_bad_parameters_are_400_with_a_message(
    api: Api, path: str, params: Any, message: str
) -> None:
    status, body = await api.get(path, params)
    assert status == 400
    assert body["error"].startswith(message), body


async def test_a_cursor_of_another_shape_is_400(api: Api) -> None:
    status, body = await api.get("/api/v1/calls", {"cursor": encode_cursor(["x", 1])})
    assert status == 400 and body["error"].startswith("cursor:")


@pytest.mark.parametrize(
    "auth", ["", "Bearer", "Bearer ct_not_a_key_at_all", "Basic dXNlcjpwYXNz", "ct_missing_scheme"]
)
async def test_without_a_valid_key_is_401(api: Api, auth: str) -> None:
    for path in ("/api/v1/calls", "/api/v1/traces", "/api/v1/calls/x", "/api/v1/traces/00"):
        status, body = await api.get(path, auth=auth)
        assert status == 401 and body["error"]


async def test_unknown_ids_are_404(api: Api) -> None:
    status, body = await api.get("/api/v1/calls/call_000000000000000000000000")
    assert status == 404 and "call_000000000000000000000000" in body["error"]
    status, body = await api.get("/api/v1/traces/" + "0" * 32)
    assert status == 404 and body["error"] == "no trace " + "0" * 32


async def test_openapi_document_is_served_and_valid(api: Api) -> None:
    async with api.session.get(api.base + "/api/v1/openapi.json") as response:
        assert response.status == 200
        assert await response.json() == OPENAPI
    assert OPENAPI["openapi"].startswith("3.1")
    for schema in OPENAPI["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    for path, item in OPENAPI["paths"].items():
        for status in ("200", "400", "401"):
            assert status in item["get"]["responses"], (path, status)


async def test_explorer_files_are_served_with_a_strict_policy(api: Api) -> None:
    for path, kind in (
        ("/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ):
        async with api.session.get(api.base + path) as response:
            assert response.status == 200 and response.content_type == kind
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
            assert len(await response.read()) > 100
    async with api.session.get(api.base + "/ui/../api.py") as response:
        assert response.status == 404
    async with api.session.get(api.base + "/ui/secret.txt") as response:
        assert response.status == 404


# -- the summary cache follows new spans ---------------------------------------------


async def test_summary_is_recomputed_when_spans_arrive(tmp_path: Path) -> None:
    from collector.keys import KeyStore
    from collector.spans import ExportTraceServiceRequest

    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    requests = [
        ExportTraceServiceRequest.FromString(p.read_bytes()) for p in fixture_requests("pipecat")
    ]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-protobuf"}
    dataset = Dataset(db, key, key)
    async with running_service(dataset.config(port)), aiohttp.ClientSession() as session:
        api = Api(f"http://127.0.0.1:{port}", session, key)

        async def post(request: ExportTraceServiceRequest) -> None:
            url = f"http://127.0.0.1:{port}/v1/traces"
            async with session.post(url, data=request.SerializeToString(), headers=headers) as r:
                assert r.status == 200

        for request in requests[:-1]:  # all but the root
            await post(request)
        await eventually(lambda: query(db, "SELECT count(*) FROM spans")[0][0] == 13)
        [call] = (await api.ok("/api/v1/calls"))["calls"]
        assert (call["span_count"], call["turn_count"], call["error_count"]) == (13, 3, 0)
        assert query(db, "SELECT summary_spans FROM calls") == [(13,)]

        last = requests[-1]
        last.resource_spans[0].scope_spans[0].spans[0].status.code = 2
        await post(last)
        await eventually(lambda: query(db, "SELECT count(*) FROM spans")[0][0] == 14)
        [call] = (await api.ok("/api/v1/calls"))["calls"]
        assert (call["span_count"], call["error_count"]) == (14, 1)
        assert query(db, "SELECT summary_spans FROM calls") == [(14,)]


def test_dataset_posts_each_framework_capture() -> None:
    # The dataset is built from every captured request (guards the helpers above).
    dataset = Dataset(Path("unused.db"), "k1", "k2")
    posts = build_requests(dataset)
    assert len(posts) == 10 * 4 - 1 + 8 * 4
    assert dataset.spans == 53 * 4 - 2 + 1 + 14 * 4


@pytest.mark.parametrize(
    "statement",
    [
        calls_sql("acme", CallFilter()),
        calls_sql("acme", CallFilter(start_ns=1, end_ns=2, cursor=encode_cursor([5, "c"]))),
        calls_sql("acme", CallFilter(attributes=[("k", "v")], tags=[("customer", "x")])),
        traces_sql("acme", TraceFilter(cursor=encode_cursor([5, "ab"]))),
        traces_sql("acme", TraceFilter(name="llm", name_contains="ll", attributes=[("k", "v")])),
        traces_sql("acme", TraceFilter(service="s", min_duration_ns=5, status="error")),
    ],
)
def test_queries_walk_indexes(dataset: Dataset, statement: tuple[str, list[Any]]) -> None:
    """Every list and search statement is an index range scan: no full scan, no sort.
    Attribute conditions are full-text lookups (``INDEX 0:M``: FTS5 answering MATCH
    from its index)."""
    sql, args = statement
    plan = [row[3] for row in query(dataset.db, "EXPLAIN QUERY PLAN " + sql, *args)]
    indexed = re.compile(r"SEARCH |LIST SUBQUERY |SCAN \w+ VIRTUAL TABLE INDEX \d+:M")
    assert plan and all(indexed.match(step) for step in plan), plan
    assert not any("TEMP B-TREE" in step for step in plan), plan
    assert "USING INDEX" in plan[0] and "_by_start" in plan[0]


# -- how the service mounts the API ----------------------------------------------------


async def test_storage_must_offer_queries(tmp_path: Path) -> None:
    config = Dataset(tmp_path / "calltrace.db", "k", "k").config(free_port())
    config["exporters"]["debug"] = {}
    config["service"]["pipelines"]["traces"]["exporters"].append("debug")
    config["service"]["query"] = {"storage": "debug"}
    from collector.config import ConfigError, parse_config
    from collector.service import Service

    # Refused when the graph is built, before anything starts (so validate refuses it too).
    with pytest.raises(ConfigError, match=r"service\.query\.storage: 'debug' is not an"):
        Service(parse_config(config, environ={}))


async def test_query_api_can_be_turned_off(tmp_path: Path) -> None:
    port = free_port()
    config = Dataset(tmp_path / "calltrace.db", "k", "k").config(port)
    config["service"]["query"] = {"enabled": False}
    async with running_service(config), aiohttp.ClientSession() as session:
        for path in ("/", "/api/v1/calls", "/api/v1/openapi.json"):
            async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                assert response.status == 404


async def test_without_auth_the_api_shows_data_stored_without_a_project(tmp_path: Path) -> None:
    port = free_port()
    config = Dataset(tmp_path / "calltrace.db", "k", "k").config(port)
    del config["processors"]["auth"]
    config["service"]["pipelines"]["traces"]["processors"].remove("auth")
    request = fixture_requests("pipecat")[0].read_bytes()
    async with running_service(config), aiohttp.ClientSession() as session:
        api = Api(f"http://127.0.0.1:{port}", session, "ignored")
        url = f"http://127.0.0.1:{port}/v1/traces"
        headers = {"Content-Type": "application/x-protobuf"}
        async with session.post(url, data=request, headers=headers) as response:
            assert response.status == 200
        db = tmp_path / "calltrace.db"
        await eventually(lambda: query(db, "SELECT count(*) FROM spans")[0][0] > 0)
        status, body = await api.get("/api/v1/traces", auth="")
        assert status == 200 and len(body["traces"]) == 1
