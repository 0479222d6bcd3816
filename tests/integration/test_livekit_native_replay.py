"""Issue 19: every request livekit-agents 1.8.9 sent to ``LIVEKIT_OBSERVABILITY_URL``
(``fixtures/livekit_native``: a normal run, a run whose requests got 503s and re-sent,
a run told recording is disabled) replayed byte for byte against a live collector:
everything is stored once and linked to the room's call."""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import time
from pathlib import Path

import aiohttp
import pytest
from livekit import api as livekit_api
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from collector.calls import call_id_for
from collector.spans import ExportTraceServiceRequest
from tests.support import FIXTURES, eventually, free_port, query, running_service

NATIVE = FIXTURES / "livekit_native"
API_KEY = "devkey"
API_SECRET = "fixture-secret-0123456789abcdefghijklmnop"  # fixtures/README.md
ROOM = "RM_nativeRoom01"
PROJECT = "insights"
QUERY_KEY = "insights-query-key-0001"


def documented(template: str, status: int, body: object) -> None:
    """The answer is one the OpenAPI document describes for that route and status."""
    from jsonschema import Draft202012Validator

    from collector.openapi import OPENAPI

    response = OPENAPI["paths"][template]["get"]["responses"][str(status)]
    schema = response["content"]["application/json"]["schema"]
    Draft202012Validator(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": OPENAPI["components"],
            **schema,
        }
    ).validate(body)


def native_config(port: int, tmp_path: Path, recording: bool = True, **extra) -> dict:
    db = tmp_path / "calltrace.db"
    storage = extra.pop("storage", "sqlite")
    receiver = {
        "keys": [
            {
                "api_key": API_KEY,
                "api_secret": "${env:LK_FIXTURE_SECRET}",
                "project": PROJECT,
                "recording": recording,
            }
        ],
        "recordings": {"directory": str(tmp_path / "recordings"), **extra.pop("recordings", {})},
    }
    return {
        "receivers": {
            "otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{port}"}}},
            "livekit_observability": receiver,
        },
        "processors": {
            "correlate": {"store": str(db)},
            "batch": {"timeout": "5ms"},
            "auth": {"key_store": None, "keys": [{"key": QUERY_KEY, "project": PROJECT}]},
        },
        "exporters": extra.pop("exporters", {"sqlite": {"path": str(db)}}),
        "service": {
            "pipelines": {
                "traces/livekit": {
                    "receivers": ["livekit_observability"],
                    "processors": ["correlate", "batch"],
                    "exporters": extra.pop("traces_exporters", [storage]),
                },
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["auth", "correlate"],
                    "exporters": [storage],
                },
                "logs/livekit": {"receivers": ["livekit_observability"], "exporters": [storage]},
                "metrics/livekit": {
                    "receivers": ["livekit_observability"],
                    "exporters": [storage],
                },
            },
            "query": {"storage": storage},
        },
    }


@pytest.fixture(autouse=True)
def fixture_secret(monkeypatch):
    monkeypatch.setenv("LK_FIXTURE_SECRET", API_SECRET)


def fresh_token(secret: str = API_SECRET, key: str = API_KEY) -> str:
    """What livekit-agents mints (the captured ones expired 6 h after the capture)."""
    return (
        livekit_api.AccessToken(key, secret)
        .with_observability_grants(livekit_api.ObservabilityGrants(write=True))
        .with_ttl(datetime.timedelta(hours=6))
        .to_jwt()
    )


def captured(run: Path) -> list[tuple[dict, bytes]]:
    """``(headers.json, body)`` of every request of a run, in arrival order."""
    requests = []
    for meta_path in sorted(run.glob("*.headers.json")):
        meta = json.loads(meta_path.read_text())
        body = (run / meta_path.name.replace(".headers.json", ".body")).read_bytes()
        assert hashlib.sha256(body).hexdigest() == meta["body_sha256"]
        requests.append((meta, body))
    assert requests, run
    return requests


async def replay(http: aiohttp.ClientSession, base: str, meta: dict, body: bytes, token: str):
    """POST one captured request as it was sent: its path, its headers in order (the
    bearer token re-minted), its body byte for byte."""
    headers = {}
    for name, value in meta["headers"]:
        if name.lower() in ("host", "content-length"):
            continue
        headers[name] = f"Bearer {token}" if name.lower() == "authorization" else value
    async with http.post(
        base + meta["path"], data=body, headers=headers, skip_auto_headers=["Content-Type"]
    ) as response:
        return response.status, await response.read()


def expected_counts(run: Path) -> tuple[int, int, set[str]]:
    """Spans, log records and metric names of a run's distinct bodies (a re-sent body
    counts once)."""
    spans = records = 0
    names: set[str] = set()
    seen = set()
    for meta, _ in captured(run):
        if meta["kind"] == "recordings" or meta["body_sha256"] in seen:
            continue
        seen.add(meta["body_sha256"])
        pb = (run / f"{meta['seq']:03d}.pb").read_bytes()
        if meta["kind"] == "traces":
            request = ExportTraceServiceRequest.FromString(pb)
            spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        elif meta["kind"] == "logs":
            logs = ExportLogsServiceRequest.FromString(pb)
            records += sum(len(s.log_records) for r in logs.resource_logs for s in r.scope_logs)
        else:
            metrics = ExportMetricsServiceRequest.FromString(pb)
            names |= {
                m.name for r in metrics.resource_metrics for s in r.scope_metrics for m in s.metrics
            }
    return spans, records, names


@pytest.mark.parametrize("run", ["", "retry_run"])
async def test_replayed_session_is_stored_once_on_the_rooms_call(tmp_path, run):
    run_dir = NATIVE / run if run else NATIVE
    spans, records, metric_names = expected_counts(run_dir)
    if not run:  # PROTOCOL.md: the 13 metrics; 2 + 1 + 18 log records
        assert len(metric_names) == 13 and records == 21
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db = tmp_path / "calltrace.db"
    call_id = call_id_for(PROJECT, ROOM)
    async with (
        running_service(native_config(port, tmp_path)) as service,
        aiohttp.ClientSession() as http,
    ):
        token = fresh_token()
        for meta, body in captured(run_dir):
            status, answer = await replay(http, base, meta, body, token)
            assert status == 200, (meta["seq"], meta["path"], answer)

        def stored():
            counts = (
                query(db, "SELECT count(*) FROM spans")[0][0],
                query(db, "SELECT count(*) FROM log_records")[0][0],
                query(db, "SELECT count(DISTINCT name) FROM metric_points")[0][0],
            )
            return counts if counts == (spans, records, len(metric_names)) else None

        await eventually(stored)
        # Every span, record and point is on the room's call.
        assert query(db, "SELECT DISTINCT call_id FROM traces") == [(call_id,)]
        assert query(db, "SELECT DISTINCT call_id FROM log_records") == [(call_id,)]
        assert query(db, "SELECT DISTINCT call_id FROM metric_points") == [(call_id,)]

        auth = {"Authorization": f"Bearer {QUERY_KEY}"}
        async with http.get(f"{base}/api/v1/calls/{call_id}/logs", headers=auth) as response:
            assert response.status == 200
            answer = await response.json()
            documented("/api/v1/calls/{call_id}/logs", 200, answer)
            logs = answer["logs"]
        bodies = [log["body"] for log in logs]
        for kind, count in [
            ("session report", 1),
            ("chat item", 11),
            ("evaluation", 2),
            ("tag", 1),
            ("outcome", 1),
        ]:
            assert bodies.count(kind) == count, kind
        verdicts = sorted(
            log["attributes"]["evaluation"]["verdict"]
            for log in logs
            if log["body"] == "evaluation"
        )
        assert verdicts == ["fail", "pass"]

        async with http.get(f"{base}/api/v1/calls/{call_id}/metrics", headers=auth) as response:
            answer = await response.json()
            documented("/api/v1/calls/{call_id}/metrics", 200, answer)
            names = {point["name"] for point in answer["metrics"]}
        assert names == metric_names

        recording_seq = [m["seq"] for m, _ in captured(run_dir) if m["kind"] == "recordings"][-1]
        audio = (run_dir / f"{recording_seq:03d}.part-audio.ogg").read_bytes()
        chat = json.loads((run_dir / f"{recording_seq:03d}.part-chat_history.json").read_bytes())
        async with http.get(f"{base}/api/v1/calls/{call_id}/recording", headers=auth) as response:
            assert response.status == 200
            recording = await response.json()
            documented("/api/v1/calls/{call_id}/recording", 200, recording)
        async with http.get(f"{base}/api/v1/calls/call_none/recording", headers=auth) as response:
            assert response.status == 404
            documented("/api/v1/calls/{call_id}/recording", 404, await response.json())
        assert recording["room_id"] == ROOM and recording["job_id"] == "AJ_nativeJob0001"
        assert recording["chat_history"] == chat
        assert recording["session_summary"]["room"] == "fixture-native-room"
        assert recording["audio_size"] == len(audio)
        assert query(db, "SELECT count(*) FROM recordings") == [(1,)]
        async with http.get(base + recording["audio_url"], headers=auth) as response:
            assert response.status == 200
            assert response.content_type == "audio/ogg"
            assert await response.read() == audio
        ranged = {**auth, "Range": "bytes=100-199"}
        async with http.get(base + recording["audio_url"], headers=ranged) as response:
            assert response.status == 206
            assert response.headers["Content-Range"] == f"bytes 100-199/{len(audio)}"
            assert await response.read() == audio[100:200]
        # Another project sees nothing of it.
        async with http.get(f"{base}/api/v1/calls/{call_id}/recording") as response:
            assert response.status == 401

        # Retention takes logs, metrics and recordings with the spans, audio files too.
        await service.exporters["sqlite"].expire(time.time_ns())
        for table in ("spans", "log_records", "metric_points", "recordings"):
            assert query(db, f"SELECT count(*) FROM {table}") == [(0,)], table
        assert not any((tmp_path / "recordings").iterdir())


async def test_disabled_project_is_told_recording_is_disabled(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db = tmp_path / "calltrace.db"
    config = native_config(port, tmp_path, recording=False)
    async with running_service(config), aiohttp.ClientSession() as http:
        token = fresh_token()
        ((meta, body),) = captured(NATIVE / "disabled_run")
        status, answer = await replay(http, base, meta, body, token)
        assert status == 401
        assert b"data recording is disabled by owner" in answer
        # Every endpoint says so (the agent's gate matches any of them).
        for meta, body in captured(NATIVE):
            status, answer = await replay(http, base, meta, body, token)
            assert status == 401 and b"disabled by owner" in answer, meta["path"]
    assert query(db, "SELECT count(*) FROM log_records") == [(0,)]
    assert query(db, "SELECT count(*) FROM spans") == [(0,)]
    assert query(db, "SELECT count(*) FROM recordings") == [(0,)]
    assert not (tmp_path / "recordings").exists() or not any((tmp_path / "recordings").iterdir())


async def test_doubled_slash_and_base_path(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = native_config(port, tmp_path)
    config["receivers"]["livekit_observability"]["base_path"] = "/lk/"
    meta, body = captured(NATIVE)[0]
    async with running_service(config), aiohttp.ClientSession() as http:
        for prefix in ("/lk", "/lk/"):
            status, _ = await replay(
                http, base, {**meta, "path": prefix + meta["path"]}, body, fresh_token()
            )
            assert status == 200, prefix
        status, _ = await replay(http, base, meta, body, fresh_token())
        assert status == 404  # not under the base path


async def test_spans_key_on_their_own_room_not_the_resources(tmp_path):
    """One process runs many jobs: its trace resource keeps the first job's room. Spans
    go to the call of their own ``room_id``, in one request split by room."""
    request = ExportTraceServiceRequest.FromString((NATIVE / "002.pb").read_bytes())
    (resource_spans,) = request.resource_spans
    for attribute in resource_spans.resource.attributes:
        if attribute.key == "room_id":
            attribute.value.string_value = "RM_earlierJob"
    spans = [span for scope in resource_spans.scope_spans for span in scope.spans]
    moved = spans[: len(spans) // 2]
    for span in moved:
        for attribute in span.attributes:
            if attribute.key == "room_id":
                attribute.value.string_value = "RM_secondRoom"
    body = gzip.compress(request.SerializeToString())
    meta = {
        "path": "/observability/traces/otlp/v0",
        "headers": [
            ["Authorization", "x"],
            ["content-type", "application/x-protobuf"],
            ["Content-Encoding", "gzip"],
        ],
    }
    port = free_port()
    db = tmp_path / "calltrace.db"
    async with (
        running_service(native_config(port, tmp_path)),
        aiohttp.ClientSession() as http,
    ):
        status, _ = await replay(http, f"http://127.0.0.1:{port}", meta, body, fresh_token())
        assert status == 200
        await eventually(lambda: len(query(db, "SELECT 1 FROM spans")) == len(spans))
    assert query(db, "SELECT DISTINCT call_id FROM call_traces ORDER BY 1") == sorted(
        [(call_id_for(PROJECT, ROOM),), (call_id_for(PROJECT, "RM_secondRoom"),)]
    )
