"""Span search, trace search's matched spans and tags, and the calls list's sorts and
filters (issue 18), over the dataset of ``tests/query_dataset.py`` on SQLite.

``test_query_api_search_postgres.py`` collects these scenarios again over PostgreSQL,
with the same expectations. Every response is validated against the OpenAPI document.
Span counts are read off the fixtures' INSPECT.txt: each LiveKit copy has 4
``llm_request`` spans (301-306 ms), 3 ``agent_turn`` spans (2017, 4541, 1518 ms); each
Pipecat copy 4 ``llm`` spans and 3 ``stt``.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from collector.keys import KeyStore
from collector.query import SpanFilter, encode_cursor
from collector.spans import ExportTraceServiceRequest
from exporters.sqlite_query import spans_sql
from tests.integration.test_query_api import Api, by_room
from tests.integration.test_query_api import api as api
from tests.integration.test_query_api import dataset as dataset
from tests.query_dataset import XSS_NAME, Dataset
from tests.support import eventually, fixture_requests, free_port, query, running_service

pytestmark = pytest.mark.timeout(120)

LIVEKIT = {"RM_test123", "RM_tagged", "RM_errors", "RM_orphan"}
PIPECAT = {"RM_test789", "RM_pc1", "RM_pc2"}


async def _rooms_of_calls(api: Api) -> dict[str, str]:
    return {c["call_id"]: c["room_id"] for c in (await api.ok("/api/v1/calls"))["calls"]}


async def search_spans(api: Api, params: Any) -> list[dict[str, Any]]:
    return await api.all_pages("/api/v1/spans", "spans", [*params, ("limit", "1000")])


async def test_span_search_finds_spans_with_their_trace_and_call(api: Api) -> None:
    rooms = await _rooms_of_calls(api)
    # Every llm_request over 300 ms: each LiveKit copy's four (301-306 ms) ...
    slow = await search_spans(api, [("name", "llm_request"), ("min_duration_ms", "300")])
    assert {s["name"] for s in slow} == {"llm_request", "llm_request_run"}  # contains-match
    requests = [s for s in slow if s["name"] == "llm_request"]
    assert len(requests) == 4 * len(LIVEKIT)
    assert {rooms[s["call_id"]] for s in requests} == LIVEKIT
    assert all(s["duration_ms"] >= 300 for s in slow)
    hit = requests[0]
    assert hit["service"] == "livekit-voice-agent-fixture"
    assert hit["trace"]["root_name"] in ("agent_session", None)
    assert hit["trace"]["trace_id"] == hit["trace_id"]
    assert hit["attributes"]["gen_ai.request.model"] == "fake-llm"
    # ... and none over 2 s.
    assert await search_spans(api, [("name", "llm_request"), ("min_duration_ms", "2000")]) == []
    # Span-level: agent_turn spans of at least 2 s (turns 1 and 2 of each copy).
    long_turns = await search_spans(api, [("name", "AGENT_TURN"), ("min_duration_ms", "2000")])
    assert len(long_turns) == 2 * len(LIVEKIT)


async def test_span_search_conditions(api: Api) -> None:
    rooms = await _rooms_of_calls(api)
    # service contains, any case; attr on the span; attr on the resource.
    pipecat_llm = await search_spans(api, [("service", "PIPECAT"), ("name", "llm")])
    assert {s["name"] for s in pipecat_llm} == {"llm"} and len(pipecat_llm) == 4 * len(PIPECAT)
    model = await search_spans(api, [("attr.gen_ai.request.model", "gpt-transcribe")])
    assert {s["name"] for s in model} == {"stt"} and len(model) == 3 * len(PIPECAT)
    by_room_id = await search_spans(
        api, [("attr.livekit.room.id", "RM_pc1"), ("attr.gen_ai.request.model", "gpt-4.1")]
    )
    assert len(by_room_id) == 4 and {rooms[s["call_id"]] for s in by_room_id} == {"RM_pc1"}
    # Both conditions must hold on the same span (unlike trace search).
    assert (
        await search_spans(api, [("name", "tts"), ("attr.gen_ai.request.model", "gpt-transcribe")])
        == []
    )
    # Tags are resource attributes roark.project.tag.KEY.
    tagged = await search_spans(api, [("tag.customer", "initech"), ("name", "function_tool")])
    assert len(tagged) == 1 and rooms[tagged[0]["call_id"]] == "RM_tagged"
    assert await search_spans(api, [("tag.customer", "hooli")]) == []
    # Status.
    [failed] = await search_spans(api, [("status", "error")])
    assert failed["name"] == "tts_request" and failed["status_message"] == "tts provider timed out"
    ok = await search_spans(api, [("status", "ok"), ("attr.livekit.room.id", "RM_errors")])
    assert len(ok) == 53  # the 54 spans of RM_errors but the failed one
    # A span name that is HTML is data.
    [html] = await search_spans(api, [("name", "img src")])
    assert html["name"] == XSS_NAME


async def test_span_search_time_range_and_paging(api: Api, dataset: Dataset) -> None:
    # [09:00, 09:20) by span start: the spans of RM_tagged and RM_errors.
    ranged = await search_spans(
        api, [("start", "2026-11-24T09:00:00Z"), ("end", "2026-11-24T09:20:00Z")]
    )
    assert len(ranged) == 53 + 54
    whole = [(s["trace_id"], s["span_id"]) for s in await search_spans(api, [])]
    assert len(whole) == dataset.spans - 14  # all but the other project's Pipecat copy
    assert len(set(whole)) == len(whole)
    for limit in ("7", "50"):
        paged = await api.all_pages("/api/v1/spans", "spans", [("limit", limit)])
        assert [(s["trace_id"], s["span_id"]) for s in paged] == whole
    # Paging a filtered search keeps the filter (attribute conditions are checked
    # after the statement, a chunk at a time).
    paged = await api.all_pages(
        "/api/v1/spans", "spans", [("limit", "2"), ("attr.gen_ai.request.model", "gpt-4.1")]
    )
    assert len(paged) == 4 * len(PIPECAT)
    # Newest trace first; in start order within a trace.
    spans = await search_spans(api, [])
    keys = [(s["trace"]["start"], s["trace_id"], s["start_ns"]) for s in spans]
    for before, after in itertools.pairwise(keys):
        if before[1] == after[1]:
            assert before[2] <= after[2]
        else:
            assert before[0] >= after[0]


async def test_span_search_sees_only_the_keys_project(api: Api, dataset: Dataset) -> None:
    theirs = await api.all_pages("/api/v1/spans", "spans", [("limit", "1000")])
    assert all(
        s["attributes"].get("conversation.id") != f"conv-{dataset.other_room}" for s in theirs
    )
    other = (await api.ok("/api/v1/spans", {"limit": "1000"}, key=dataset.other_key))["spans"]
    assert len(other) == 14
    other_ids = {s["span_id"] for s in other}
    assert other_ids.isdisjoint({s["span_id"] for s in theirs})
    found = await api.ok("/api/v1/spans", {"attr.livekit.room.id": dataset.other_room})
    assert found["spans"] == []


async def test_trace_search_says_which_spans_matched(api: Api) -> None:
    traces = (await api.ok("/api/v1/traces", {"name": "function_tool"}))["traces"]
    assert len(traces) == len(LIVEKIT)
    for trace in traces:
        [span_id] = trace["matched_spans"]
        body = await api.ok(f"/api/v1/traces/{trace['trace_id']}")
        names = {}
        stack = list(body["tree"])
        while stack:
            node = stack.pop()
            names[node["span_id"]] = node["name"]
            stack += node["children"]
        assert names[span_id] == "function_tool"
    # name_contains and attr: each span meeting one of them.
    [pc1] = (
        await api.ok("/api/v1/traces", {"attr.livekit.room.id": "RM_pc1", "name_contains": "TT"})
    )["traces"]
    assert len(pc1["matched_spans"]) == 6  # 3 stt + 3 tts; room id is on the resource
    model = (await api.ok("/api/v1/traces", {"attr.gen_ai.request.model": "gpt-4.1"}))["traces"]
    assert all(len(t["matched_spans"]) == 4 for t in model)
    # Without span conditions, none.
    assert all(t["matched_spans"] == [] for t in (await api.ok("/api/v1/traces"))["traces"])


async def test_trace_search_tags_and_service_contains(api: Api) -> None:
    rooms = await _rooms_of_calls(api)
    tagged = (await api.ok("/api/v1/traces", {"tag.customer": "initech"}))["traces"]
    assert [rooms[t["call_id"]] for t in tagged] == ["RM_tagged"]
    assert (await api.ok("/api/v1/traces", {"tag.customer": "hooli"}))["traces"] == []
    pipecat = (await api.ok("/api/v1/traces", {"service": "Pipecat-Voice"}))["traces"]
    assert {rooms[t["call_id"]] for t in pipecat} == PIPECAT


async def test_calls_sort_by_turn_latency_errors_and_duration(api: Api) -> None:
    async def order(params: dict[str, str]) -> list[str]:
        return [c["room_id"] for c in (await api.ok("/api/v1/calls", params))["calls"]]

    worst = await order({"sort": "worst_turn"})
    # Pipecat's worst turns are 4077 ms, LiveKit's 710.5 ms (the orphan's too).
    assert set(worst[:3]) == PIPECAT and set(worst[3:]) == LIVEKIT
    calls = by_room((await api.ok("/api/v1/calls", {"sort": "e2e_p95"}))["calls"])
    assert calls["RM_test789"]["e2e_p95_ms"] == pytest.approx(4038.544, abs=1e-3)
    assert calls["RM_test123"]["e2e_p95_ms"] == pytest.approx(710.043, abs=1e-3)
    median = await order({"sort": "median_turn"})
    assert set(median[:3]) == PIPECAT
    assert (await order({"sort": "errors"}))[0] == "RM_errors"
    # The Pipecat conversations last 35.1 s, the LiveKit sessions 23.2 s (the orphan less).
    duration = await order({"sort": "duration"})
    assert set(duration[:3]) == PIPECAT and duration[-1] == "RM_orphan"
    # Filters.
    assert set(await order({"min_worst_turn_ms": "1000"})) == PIPECAT
    assert set(await order({"min_median_turn_ms": "3690.276"})) == PIPECAT
    assert set(await order({"min_e2e_p95_ms": "4038.6"})) == set()
    assert await order({"min_errors": "1"}) == ["RM_errors"]
    assert set(await order({"min_duration_ms": "30000"})) == PIPECAT
    assert set(await order({"min_worst_turn_ms": "700", "tag.customer": "initech"})) == {
        "RM_tagged"
    }
    # Paging a sorted list neither repeats nor skips (ties broken by call id).
    for sort in ("worst_turn", "errors", "duration"):
        whole = await order({"sort": sort, "limit": "1000"})
        for limit in ("1", "2"):
            paged = await api.all_pages(
                "/api/v1/calls", "calls", [("sort", sort), ("limit", limit)]
            )
            assert [c["room_id"] for c in paged] == whole


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        ("/api/v1/calls", {"sort": "loudest"}, "sort: expected one of start, worst_turn"),
        ("/api/v1/calls", {"min_errors": "1.5"}, "min_errors: expected a whole number"),
        ("/api/v1/calls", {"min_errors": "-1"}, "min_errors: expected a whole number"),
        ("/api/v1/calls", {"min_worst_turn_ms": "slow"}, "min_worst_turn_ms: expected millisec"),
        ("/api/v1/calls", {"min_duration_ms": "inf"}, "min_duration_ms: expected milliseconds"),
        (
            "/api/v1/calls",
            {"sort": "errors", "cursor": encode_cursor([1, "call"])},
            "cursor: not a cursor",
        ),
        ("/api/v1/spans", {"status": "failed"}, "status: expected error or ok"),
        ("/api/v1/spans", {"min_duration_ms": "-5"}, "min_duration_ms: expected milliseconds"),
        ("/api/v1/spans", {"name_contains": "x"}, "name_contains: unknown parameter"),
        ("/api/v1/spans", {"start": "today"}, "start: expected an RFC 3339 time"),
        ("/api/v1/spans", {"limit": "1001"}, "limit: expected a whole number from 1 to 1000"),
        ("/api/v1/spans", {"cursor": encode_cursor([1, "x"])}, "cursor: not a cursor"),
        ("/api/v1/spans", {"cursor": encode_cursor([1, "zz", 2, "zz"])}, "cursor: not a cursor"),
        ("/api/v1/spans", {"start": "200", "end": "100"}, "start: must be before end"),
    ],
)
async def test_bad_search_parameters_are_400_naming_them(
    api: Api, path: str, params: Any, message: str
) -> None:
    status, body = await api.get(path, params)
    assert status == 400
    assert body["error"].startswith(message), body


async def test_unknown_api_paths_answer_json(api: Api) -> None:
    for path in ("/api/v1/nothing", "/api/v2/calls", "/api/", "/api/v1/calls/x/y"):
        async with api.session.get(
            api.base + path, headers={"Authorization": f"Bearer {api.key}"}
        ) as response:
            assert response.status == 404
            assert response.content_type == "application/json"
            assert path in (await response.json())["error"]
    async with api.session.post(api.base + "/api/v1/spans") as response:
        assert response.status == 405 and "not allowed" in (await response.json())["error"]


@pytest.mark.parametrize(
    "span_query",
    [
        SpanFilter(),
        SpanFilter(name="llm", min_duration_ns=300_000_000, status="ok"),
        SpanFilter(attributes=[("gen_ai.request.model", "gpt-4.1")], start_ns=1, end_ns=2**62),
        SpanFilter(service="pipe", tags=[("customer", "initech")]),
    ],
)
def test_span_search_walks_indexes(dataset: Dataset, span_query: SpanFilter) -> None:
    """Traces newest first from ``traces_by_start``, each one's spans from
    ``spans_by_trace``; the only sort is of one trace's spans at a time."""
    sql, args = spans_sql("acme", span_query, (5, b"\x01", 3, b"\x02"), 257)
    plan = [row[3] for row in query(dataset.db, "EXPLAIN QUERY PLAN " + sql, *args)]
    indexed = re.compile(r"SEARCH |LIST SUBQUERY |SCAN \w+ VIRTUAL TABLE INDEX \d+:M")
    assert plan[0].startswith("SEARCH t USING INDEX traces_by_start"), plan
    assert all(
        indexed.match(step) or step == "USE TEMP B-TREE FOR RIGHT PART OF ORDER BY" for step in plan
    ), plan


# -- trends ---------------------------------------------------------------------------

_STATS_RANGE = {"start": "2026-11-24T07:00:00Z", "end": "2026-11-24T10:00:00Z", "step": "1h"}


async def test_turn_stats_per_bucket_and_group(api: Api) -> None:
    body = await api.ok("/api/v1/stats/turns", {**_STATS_RANGE, "group_by": "service"})
    assert body["step_ms"] == 3_600_000 and body["group_by"] == "service"
    # 07:00 holds the two captures (07:34, 07:36), 08:00 nothing, 09:00 the five copies.
    assert [b["start"] for b in body["buckets"]] == [
        "2026-11-24T07:00:00.000000000Z",
        "2026-11-24T08:00:00.000000000Z",
        "2026-11-24T09:00:00.000000000Z",
    ]
    first, empty, last = body["buckets"]
    assert empty["groups"] == []
    livekit, pipecat = first["groups"]
    assert livekit["group"] == "livekit-voice-agent-fixture"
    assert (livekit["calls"], livekit["turns"], livekit["errors"]) == (1, 3, 0)
    # lk.e2e_latency 705.623, 710.510, 705.836 ms; lk.end_of_turn_delay ~501 ms.
    e2e = livekit["latency"]["e2e_ms"]
    assert e2e["count"] == 3 and e2e["p50"] == pytest.approx(705.836, abs=1e-3)
    # p99: 705.836 + (710.510 - 705.836) * 0.98, linear between closest ranks.
    assert e2e["p99"] == pytest.approx(710.417, abs=1e-3)
    assert livekit["latency"]["end_of_turn_ms"]["p50"] == pytest.approx(501.099, abs=1e-3)
    assert pipecat["latency"]["stt_ms"]["p50"] == pytest.approx(368.442, abs=1e-3)
    assert pipecat["latency"]["tool_ms"]["count"] == 1
    lk_last, pc_last = last["groups"]
    assert (lk_last["calls"], lk_last["turns"], lk_last["errors"]) == (3, 9, 1)
    assert (pc_last["calls"], pc_last["turns"]) == (2, 6)


async def test_turn_stats_groups_by_model_and_tag_and_filters_by_tag(api: Api) -> None:
    by_model = await api.ok("/api/v1/stats/turns", {**_STATS_RANGE, "group_by": "model"})
    assert [g["group"] for g in by_model["buckets"][0]["groups"]] == ["fake-llm", "gpt-4.1"]
    by_tag = await api.ok("/api/v1/stats/turns", {**_STATS_RANGE, "group_by": "tag.customer"})
    groups = {g["group"]: g["calls"] for g in by_tag["buckets"][2]["groups"]}
    assert groups == {"initech": 1, None: 4}
    only = await api.ok("/api/v1/stats/turns", {**_STATS_RANGE, "tag.tier": "gold"})
    assert [sum(g["calls"] for g in b["groups"]) for b in only["buckets"]] == [0, 0, 1]
    # Default step: a 24th of the range.
    default = await api.ok(
        "/api/v1/stats/turns", {"start": _STATS_RANGE["start"], "end": _STATS_RANGE["end"]}
    )
    assert len(default["buckets"]) == 24


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"step": "fast"}, "step: expected a duration"),
        ({"step": "0s"}, "step: expected a duration"),
        ({"step": "9" * 400 + "h"}, "step: expected a duration"),
        ({"step": "400000d"}, "step: expected a duration"),
        ({**_STATS_RANGE, "step": "1s"}, "step: 10800 buckets from start to end, at most 1000"),
        ({"group_by": "room"}, "group_by: expected service, model or tag.KEY"),
        ({"group_by": "tag."}, "group_by: expected service, model or tag.KEY"),
        (
            {"start": "2026-11-24T10:00:00Z", "end": "2026-11-24T09:00:00Z"},
            "start: must be before end",
        ),
        ({"bucket": "1h"}, "bucket: unknown parameter"),
    ],
)
async def test_bad_stats_parameters_are_400_naming_them(
    api: Api, params: dict[str, str], message: str
) -> None:
    status, body = await api.get("/api/v1/stats/turns", params)
    assert status == 400 and body["error"].startswith(message), body


async def test_turn_stats_see_only_the_keys_project(api: Api, dataset: Dataset) -> None:
    params = {**_STATS_RANGE, "end": "2026-11-24T11:00:00Z"}
    theirs = await api.ok("/api/v1/stats/turns", params, key=dataset.other_key)
    assert [sum(g["calls"] for g in b["groups"]) for b in theirs["buckets"]] == [0, 0, 1, 0]
    mine = await api.ok("/api/v1/stats/turns", params)
    assert [sum(g["calls"] for g in b["groups"]) for b in mine["buckets"]] == [2, 0, 5, 0]


async def test_sorts_filters_and_stats_see_spans_that_arrived_since_the_cache(
    tmp_path: Path,
) -> None:
    """The summary cache a sort, filter or stats query reads is brought up to date for
    the range first: a call cached with no error is found by min_errors=1 once its
    failed root span arrives."""
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    requests = [
        ExportTraceServiceRequest.FromString(p.read_bytes()) for p in fixture_requests("pipecat")
    ]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-protobuf"}
    async with (
        running_service(Dataset(db, key, key).config(port)),
        aiohttp.ClientSession() as session,
    ):
        api = Api(f"http://127.0.0.1:{port}", session, key)

        async def post(request: ExportTraceServiceRequest) -> None:
            url = f"http://127.0.0.1:{port}/v1/traces"
            async with session.post(url, data=request.SerializeToString(), headers=headers) as r:
                assert r.status == 200

        for request in requests[:-1]:  # all but the root
            await post(request)
        await eventually(lambda: query(db, "SELECT count(*) FROM spans")[0][0] == 13)
        assert (await api.ok("/api/v1/calls", {"min_errors": "1"}))["calls"] == []
        stats = {"start": "2026-11-24T07:00:00Z", "end": "2026-11-24T08:00:00Z", "step": "1h"}
        [bucket] = (await api.ok("/api/v1/stats/turns", stats))["buckets"]
        assert bucket["groups"][0]["errors"] == 0
        assert query(db, "SELECT summary_spans FROM calls") == [(13,)]

        last = requests[-1]
        last.resource_spans[0].scope_spans[0].spans[0].status.code = 2
        await post(last)
        await eventually(lambda: query(db, "SELECT count(*) FROM spans")[0][0] == 14)
        [call] = (await api.ok("/api/v1/calls", {"min_errors": "1", "sort": "errors"}))["calls"]
        assert (call["span_count"], call["error_count"]) == (14, 1)
        [bucket] = (await api.ok("/api/v1/stats/turns", stats))["buckets"]
        assert bucket["groups"][0]["errors"] == 1


async def test_a_cold_range_fills_in_over_a_few_queries(
    api: Api, monkeypatch: pytest.MonkeyPatch, dataset: Dataset
) -> None:
    """At most MAX_SUMMARY_REFRESH stale summaries are recomputed per query; the
    rest are counted as pending, then recomputed by the next queries."""
    import exporters.postgres_query
    import exporters.sqlite_query

    for module in (exporters.sqlite_query, exporters.postgres_query):
        monkeypatch.setattr(module, "MAX_SUMMARY_REFRESH", 2)
    await _forget_summaries(dataset)
    rounds = []
    while True:
        # limit 1: the calls a page lists are brought up to date as they are shown.
        body = await api.ok("/api/v1/calls", {"sort": "worst_turn", "limit": "1"})
        rounds.append(body["pending_summaries"])
        if not body["pending_summaries"]:
            break
    assert rounds == [5, 3, 1, 0]  # 7 calls, two more each query
    await _forget_summaries(dataset)
    stats = await api.ok("/api/v1/stats/turns", {**_STATS_RANGE, "end": "2026-11-24T11:00:00Z"})
    assert stats["pending_summaries"] == 5
    assert sum(g["calls"] for b in stats["buckets"] for g in b["groups"]) == 2


async def _forget_summaries(dataset: Dataset) -> None:
    if dataset.postgres_schema is None:
        import sqlite3

        with sqlite3.connect(dataset.db) as db:
            db.execute("UPDATE calls SET summary = NULL, summary_spans = NULL")
        return
    import asyncpg

    from tests.support import POSTGRES_DSN

    conn = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    try:
        await conn.execute(
            f"UPDATE {dataset.postgres_schema}.calls SET summary = NULL, summary_spans = NULL"
        )
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("path", "names"),
    [
        ("/api/v1/spans", ["name", "service", "attr.k", "tag.k", "min_duration_ms", "status"]),
        (
            "/api/v1/calls",
            ["sort", "min_worst_turn_ms", "min_median_turn_ms", "min_e2e_p95_ms", "min_errors"],
        ),
        ("/api/v1/stats/turns", ["step", "group_by", "tag.k", "start", "end"]),
    ],
)
async def test_new_parameters_never_answer_5xx(api: Api, path: str, names: list[str]) -> None:
    nasty = ["", "\0", "é", "x" * 5000, "-1", "1e309", "NaN", "0", "99999999999999999999999"]
    for name in names:
        for value in nasty:
            status, body = await api.get(path, {name: value})
            assert status in (200, 400), (name, value, status, body)
            if status == 400:
                assert body["error"].startswith(name.split(".")[0]), body
    assert (await api.get(path, {}))[0] == 200
