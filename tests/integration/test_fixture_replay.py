"""Every captured fixture, replayed over OTLP/HTTP with its call key on the resource or
only on the spans, is stored once, linked to its call, in every exporter of the
pipeline: SQLite, PostgreSQL, a Redis stream and the file exporter.

The expected call of each span is worked out here from the requests alone, the way the
design states it: the resource's key first, else the span's own key, else the call its
trace already has from a span seen before it.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from collector.calls import call_id_for
from collector.spans import ExportTraceServiceRequest, get_attribute
from tests.support import (
    POSTGRES_DSN,
    fixture_requests,
    free_port,
    missing_service,
    query,
    running_service,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

PROJECT = "replay"
KEY = "replay-key"
ROOM = "livekit.room.id"
SPAN_KEYS = ["roark.external_id", "vapi.call.id", "conversation.id", "gen_ai.conversation.id"]


def _requests(framework: str, form: str) -> list[bytes]:
    """The fixture's request bodies; ``span-keyed``: the room id taken off every resource."""
    bodies = []
    for path in fixture_requests(framework):
        request = ExportTraceServiceRequest.FromString(path.read_bytes())
        if form == "span-keyed":
            for rs in request.resource_spans:
                kept = [kv for kv in rs.resource.attributes if kv.key != ROOM]
                del rs.resource.attributes[:]
                rs.resource.attributes.extend(kept)
        bodies.append(request.SerializeToString())
    return bodies


def _expected_calls(bodies: list[bytes]) -> dict[tuple[bytes, bytes], str | None]:
    """(trace id, span id) -> the call id each span must be stored with."""
    expected: dict[tuple[bytes, bytes], str | None] = {}
    trace_calls: dict[bytes, str] = {}
    for body in bodies:
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
            resource_key = next(
                (
                    get_attribute(rs.resource.attributes, k)
                    for k in [ROOM, *SPAN_KEYS]
                    if get_attribute(rs.resource.attributes, k)
                ),
                None,
            )
            for ss in rs.scope_spans:
                for span in ss.spans:
                    if resource_key is not None:
                        call: str | None = call_id_for(PROJECT, str(resource_key))
                    else:
                        span_key = next(
                            (
                                get_attribute(span.attributes, k)
                                for k in SPAN_KEYS
                                if get_attribute(span.attributes, k)
                            ),
                            None,
                        )
                        if span_key is not None:
                            call = trace_calls[span.trace_id] = call_id_for(PROJECT, str(span_key))
                        else:
                            call = trace_calls.get(span.trace_id)
                    expected[(span.trace_id, span.span_id)] = call
    return expected


@pytest.fixture
def redis_client():
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        client.ping()
    except redis.RedisError as exc:
        missing_service(f"Redis at 127.0.0.1:6379 is unreachable: {exc}")
    streams: list[str] = []
    yield client, streams
    for stream in streams:
        client.delete(stream)
    client.close()


def _config(port: int, tmp_path: Path, schema: str, stream: str) -> dict[str, Any]:
    db = tmp_path / "calltrace.db"
    return {
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{port}"}}}},
        "processors": {
            "auth": {"key_store": None, "keys": [{"key": KEY, "project": PROJECT}]},
            "skip": {},
            "correlate": {"store": str(db)},
            "batch": {"timeout": "5ms"},
        },
        "exporters": {
            "sqlite": {"path": str(db), "sending_queue": {"storage": str(tmp_path / "queue")}},
            "postgres": {"dsn": POSTGRES_DSN, "schema": schema},
            "redis_streams": {"url": "redis://127.0.0.1:6379/0", "stream": stream},
            "file": {"path": str(tmp_path / "spans.jsonl")},
        },
        "service": {
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["auth", "skip", "correlate", "batch"],
                    "exporters": ["sqlite", "postgres", "redis_streams", "file"],
                }
            }
        },
    }


def _file_spans(path: Path) -> dict[tuple[bytes, bytes], str | None]:
    stored: dict[tuple[bytes, bytes], str | None] = {}
    for line in path.read_text().splitlines():
        for rs in json.loads(line)["resourceSpans"]:
            attributes = {a["key"]: a["value"] for a in rs["resource"].get("attributes", [])}
            call = attributes.get("calltrace.call.id", {}).get("stringValue")
            for ss in rs["scopeSpans"]:
                for span in ss["spans"]:
                    key = (bytes.fromhex(span["traceId"]), bytes.fromhex(span["spanId"]))
                    assert key not in stored, "a span written twice"
                    stored[key] = call
    return stored


@pytest.mark.parametrize("form", ["resource-keyed", "span-keyed"])
@pytest.mark.parametrize("framework", ["livekit", "pipecat"])
async def test_every_span_is_stored_once_with_its_call_in_every_exporter(
    framework, form, tmp_path, pg_schema, redis_client
):
    schema, conn = pg_schema
    client, streams = redis_client
    stream = f"calltrace:replay:{uuid.uuid4().hex[:8]}:{{project}}"
    streams.append(stream.format(project=PROJECT))
    bodies = _requests(framework, form)
    expected = _expected_calls(bodies)
    assert any(expected.values())  # the fixture names a call either way
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/traces"
    headers = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {KEY}"}
    config = _config(port, tmp_path, schema, stream)
    async with running_service(config), aiohttp.ClientSession() as session:
        for body in bodies:
            async with session.post(url, data=body, headers=headers) as response:
                assert response.status == 200, await response.text()
    # Shut down: every queue is delivered.

    in_sqlite = query(tmp_path / "calltrace.db", "SELECT trace_id, span_id, call_id FROM spans")
    rows = await conn.fetch(f"SELECT trace_id, span_id, call_id FROM {schema}.spans")
    in_postgres = [(bytes(r[0]), bytes(r[1]), r[2]) for r in rows]
    entries = client.xrange(stream.format(project=PROJECT))
    in_stream = [
        (
            bytes.fromhex(fields[b"trace_id"].decode()),
            bytes.fromhex(fields[b"span_id"].decode()),
            fields[b"call_id"].decode() or None,
        )
        for _, fields in entries
    ]
    for name, stored in (("sqlite", in_sqlite), ("postgres", in_postgres), ("stream", in_stream)):
        as_dict = {(bytes(t), bytes(s)): c for t, s, c in stored}
        assert len(as_dict) == len(stored), f"{name}: a span stored twice"
        assert as_dict == expected, name
    assert _file_spans(tmp_path / "spans.jsonl") == expected

    # Every span is in its call through the query side too: the calls table lists it.
    calls = {c for c in expected.values() if c}
    listed = {r[0] for r in query(tmp_path / "calltrace.db", "SELECT call_id FROM calls")}
    assert calls <= listed
