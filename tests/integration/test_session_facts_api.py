"""Issue 19: the calls list shows each call's LiveKit outcome and session tags (from the
session report, tag and outcome log records and the recording's session summary) and
filters by them (``outcome=``, ``session_tag=``), on SQLite and PostgreSQL, within the
key's project; bad values answer 400 naming the parameter."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import quote

import aiohttp
import asyncpg
import pytest

from collector.calls import call_id_for
from tests.integration.test_livekit_native_replay import (
    NATIVE,
    PROJECT,
    QUERY_KEY,
    ROOM,
    captured,
    documented,
    fixture_secret,  # noqa: F401  (autouse: the secret's environment variable)
    fresh_token,
    native_config,
    replay,
)
from tests.support import (
    POSTGRES_DSN,
    fixture_requests,
    free_port,
    missing_service,
    running_service,
)

OTHER_KEY = "other-project-query-key-01"
SESSION_TAGS = [
    "fixture:weather",
    "language:en",
    "lk.judge.brevity:fail",
    "lk.judge.tool_used:pass",
]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def storage(request):
    """``(storage name, exporters config)``; PostgreSQL in a schema of its own."""
    if request.param == "sqlite":
        yield "sqlite", None
        return
    try:
        conn = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        missing_service(f"PostgreSQL at {POSTGRES_DSN} is unreachable: {exc}")
    schema = f"ct_facts_{uuid.uuid4().hex[:12]}"
    try:
        yield "postgres", {"postgres": {"dsn": POSTGRES_DSN, "schema": schema}}
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


async def _get(http, url: str, key: str = QUERY_KEY) -> tuple[int, dict]:
    async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as response:
        return response.status, await response.json()


async def test_calls_show_and_filter_by_outcome_and_session_tags(tmp_path, storage):
    name, exporters = storage
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    extra = {} if exporters is None else {"storage": name, "exporters": exporters}
    config = native_config(port, tmp_path, **extra)
    config["processors"]["auth"]["keys"].append({"key": OTHER_KEY, "project": "other"})
    native_call = call_id_for(PROJECT, ROOM)
    async with running_service(config), aiohttp.ClientSession() as http:
        token = fresh_token()
        for meta, body in captured(NATIVE):
            status, _ = await replay(http, base, meta, body, token)
            assert status == 200
        # A second call of the project, without a LiveKit session (Pipecat's spans),
        # and the same Pipecat call in another project.
        for key in (QUERY_KEY, OTHER_KEY):
            for path in fixture_requests("pipecat"):
                async with http.post(
                    f"{base}/v1/traces",
                    data=path.read_bytes(),
                    headers={
                        "Content-Type": "application/x-protobuf",
                        "Authorization": f"Bearer {key}",
                    },
                ) as response:
                    assert response.status == 200

        async def both_calls():
            status, body = await _get(http, f"{base}/api/v1/calls")
            _, logs = await _get(http, f"{base}/api/v1/calls/{native_call}/logs")
            return status == 200 and len(body["calls"]) == 2 and len(logs["logs"]) == 21

        for _ in range(600):
            if await both_calls():
                break
            await asyncio.sleep(0.05)
        assert await both_calls()

        status, body = await _get(http, f"{base}/api/v1/calls")
        documented("/api/v1/calls", status, body)
        by_id = {call["call_id"]: call for call in body["calls"]}
        native = by_id.pop(native_call)
        (pipecat,) = by_id.values()
        assert native["outcome"] == "success"
        assert native["outcome_reason"] == "user got the weather"
        assert native["session_tags"] == sorted([*SESSION_TAGS, "lk.success"])
        assert native["session"] is True
        assert (pipecat["outcome"], pipecat["session_tags"], pipecat["session"]) == (
            None,
            [],
            False,
        )

        async def listed(params: str, key: str = QUERY_KEY) -> list[str]:
            status, body = await _get(http, f"{base}/api/v1/calls?{params}", key)
            assert status == 200, body
            documented("/api/v1/calls", status, body)
            return [call["call_id"] for call in body["calls"]]

        assert await listed("outcome=success") == [native_call]
        assert await listed("outcome=fail") == []
        for tag in [*SESSION_TAGS, "lk.success"]:
            assert await listed("session_tag=" + quote(tag)) == [native_call], tag
        assert await listed("session_tag=language") == []  # exact, not a substring
        assert await listed("outcome=success&session_tag=fixture%3Aweather&sort=worst_turn") == [
            native_call
        ]
        # Another project sees its own Pipecat call, never this project's session.
        assert await listed("", OTHER_KEY) != []
        assert await listed("outcome=success", OTHER_KEY) == []
        assert await listed("session_tag=language%3Aen", OTHER_KEY) == []

        status, detail = await _get(http, f"{base}/api/v1/calls/{native_call}")
        documented("/api/v1/calls/{call_id}", status, detail)
        assert detail["call"]["outcome"] == "success" and detail["call"]["session"] is True

        for params, name in [
            ("outcome=maybe", "outcome"),
            ("outcome=SUCCESS", "outcome"),
            ("session_tag=a%00b", "session_tag"),
            ("session_tag=a&session_tag=b", "session_tag"),
            ("session_tag=" + "x" * 5000, "session_tag"),
        ]:
            status, body = await _get(http, f"{base}/api/v1/calls?{params}")
            assert status == 400, (params, body)
            assert body["error"].startswith(name + ":"), body


async def test_turn_stats_from_livekit_turn_histograms(tmp_path, storage):
    """``stats/turns?source=metrics`` reads livekit-agents' ``lk.agents.turn.*``
    histograms: the fixture session's 3 turns (e2e 707-727 ms), by LLM model, in the
    key's project only."""
    name, exporters = storage
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    extra = {} if exporters is None else {"storage": name, "exporters": exporters}
    config = native_config(port, tmp_path, **extra)
    config["processors"]["auth"]["keys"].append({"key": OTHER_KEY, "project": "other"})
    window = "start=2026-12-08T00:00:00Z&end=2026-12-08T01:00:00Z&step=1h"
    async with running_service(config), aiohttp.ClientSession() as http:
        token = fresh_token()
        for meta, body in captured(NATIVE):
            status, _ = await replay(http, base, meta, body, token)
            assert status == 200

        async def stats(params: str, key: str = QUERY_KEY) -> dict:
            status, body = await _get(http, f"{base}/api/v1/stats/turns?{window}&{params}", key)
            assert status == 200, body
            documented("/api/v1/stats/turns", status, body)
            return body

        for _ in range(600):
            body = await stats("source=metrics")
            if body["buckets"][0]["groups"] and body["buckets"][0]["groups"][0]["turns"] == 3:
                break
            await asyncio.sleep(0.05)
        assert body["source"] == "metrics"
        (bucket,) = body["buckets"]
        (group,) = bucket["groups"]
        assert (group["group"], group["calls"], group["turns"]) == (None, 1, 3)
        assert group["errors"] is None and group["tool_failures"] is None
        e2e = group["latency"]["e2e_ms"]
        assert e2e["count"] == 3
        assert 707.0 <= e2e["p50"] <= e2e["p95"] <= e2e["p99"] <= 727.5
        assert group["latency"]["llm_ttft_ms"]["count"] == 4
        assert 101.5 <= group["latency"]["llm_ttft_ms"]["p50"] <= 104.4
        assert 500.0 <= group["latency"]["end_of_turn_ms"]["p50"] <= 503.2
        assert group["latency"]["answer_wait_ms"] == {
            "count": 0,
            "p50": None,
            "p95": None,
            "p99": None,
        }
        # The spans say the same turns took the same time.
        spans_body = await stats("")
        assert spans_body["source"] == "spans"
        spans_e2e = spans_body["buckets"][0]["groups"][0]["latency"]["e2e_ms"]
        assert spans_e2e["count"] == 3 and abs(spans_e2e["p50"] - e2e["p50"]) < 15
        (by_model,) = (await stats("source=metrics&group_by=model"))["buckets"][0]["groups"]
        assert by_model["group"] == "fake-llm"
        (by_service,) = (await stats("source=metrics&group_by=service"))["buckets"][0]["groups"]
        assert by_service["group"] == "livekit-agents"
        assert (await stats("source=metrics&tag.env=prod"))["buckets"][0]["groups"] == []
        assert (await stats("source=metrics", OTHER_KEY))["buckets"][0]["groups"] == []

        status, body = await _get(http, f"{base}/api/v1/stats/turns?{window}&source=histograms")
        assert status == 400 and body["error"].startswith("source:"), body


async def test_a_file_from_before_the_facts_table_gains_it_on_open(tmp_path):
    """A store written before ``session_facts`` existed is filled in when the exporter
    opens it, so its calls filter by outcome and session tag."""
    import sqlite3

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = native_config(port, tmp_path)
    call_id = call_id_for(PROJECT, ROOM)
    async with running_service(config), aiohttp.ClientSession() as http:
        token = fresh_token()
        for meta, body in captured(NATIVE):
            status, _ = await replay(http, base, meta, body, token)
            assert status == 200
        for _ in range(600):
            _, listed = await _get(http, f"{base}/api/v1/calls?outcome=success")
            if listed["calls"]:
                break
            await asyncio.sleep(0.05)
        assert [c["call_id"] for c in listed["calls"]] == [call_id]
    with sqlite3.connect(tmp_path / "calltrace.db") as db:
        db.execute("DROP TABLE session_facts")
    async with running_service(config), aiohttp.ClientSession() as http:
        _, listed = await _get(http, f"{base}/api/v1/calls?session_tag=fixture%3Aweather")
        assert [c["call_id"] for c in listed["calls"]] == [call_id]
        _, listed = await _get(http, f"{base}/api/v1/calls?outcome=success")
        assert [c["call_id"] for c in listed["calls"]] == [call_id]
