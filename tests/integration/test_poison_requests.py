"""Issue 16 defect 7: valid OTLP requests that were answered 200 and then failed on every
export attempt, forever, also after a restart (they sat in the persistent queue).

Each is sent through a live collector (sqlite and redis_streams, both with a persistent
queue; PostgreSQL in its own test) followed by a normal request. Storage takes them all,
normalised as documented (README, Exporters): NaN and infinities in a call's tags as the
strings "nan", "inf", "-inf", bytes as hex, span times past 2**63 - 1 as 2**63 - 1 in the
time columns (the span's bytes keep them as sent), a protobuf group kept in the span's
bytes. Nothing is left in the queues after a stop, and a restart delivers nothing again.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import requests

from collector.keys import KeyStore
from collector.spans import ExportTraceServiceRequest, Span
from tests.collector_process import CollectorProcess
from tests.processors._util import resource_spans
from tests.support import POSTGRES_DSN, free_port, missing_service, pipeline_config, query

MAX_NS = 2**63 - 1
GROUP = b"\xa3\x06\x08\x01\xa4\x06"
"""Field 100 as a group (wire types 3 and 4) holding a varint: upb keeps it as unknown."""


def _request(room: str, resource: dict[str, Any], span_bytes_suffix: bytes = b"", **times: int):
    rs = resource_spans({"service.name": "agent", "livekit.room.id": room, **resource}, [{}])
    span = rs.scope_spans[0].spans[0]
    span.name = room
    if times:
        span.start_time_unix_nano = times["start"]
        span.end_time_unix_nano = times["end"]
    if span_bytes_suffix:
        data = span.SerializeToString() + span_bytes_suffix
        span.Clear()
        span.MergeFromString(data)
    return ExportTraceServiceRequest(resource_spans=[rs]).SerializeToString()


POISON: dict[str, tuple[bytes, Any]] = {
    # name: (request body, the call's stored tags or None)
    "tag_nan": (
        _request("RM_nan", {"roark.project.tag.score": math.nan}),
        {"score": "nan"},
    ),
    "tag_bytes": (
        _request("RM_bytes", {"roark.project.tag.blob": b"\x00\xff"}),
        {"blob": "00ff"},
    ),
    "tag_nested_infinities": (
        _request(
            "RM_inf",
            {"roark.project.tag.limits": {"hi": math.inf, "lo": -math.inf, "raw": b"\x01"}},
        ),
        {"limits": {"hi": "inf", "lo": "-inf", "raw": "01"}},
    ),
    "times_past_int64": (
        _request("RM_time", {}, start=2**63 + 5, end=2**64 - 1),
        None,
    ),
    "group_in_span": (_request("RM_group", {}, GROUP), None),
}


def _normal(index: int) -> bytes:
    return _request(f"RM_normal_{index}", {"roark.project.tag.plan": "pro"})


def _check_stored_rows(rows: dict[str, tuple[int, int, bytes]], tags: dict[str, Any]) -> None:
    """``rows``: span name -> (start_ns, end_ns, span bytes); ``tags``: room -> tags."""
    assert set(rows) == {*POISON_ROOMS, *(f"RM_normal_{i}" for i in range(len(POISON)))}
    assert rows["RM_time"][:2] == (MAX_NS, MAX_NS)
    span = Span.FromString(rows["RM_time"][2])
    assert (span.start_time_unix_nano, span.end_time_unix_nano) == (2**63 + 5, 2**64 - 1)
    assert rows["RM_group"][2].endswith(GROUP)
    for name, (_, expected) in POISON.items():
        room = ROOM_OF[name]
        assert tags.get(room) == expected, (name, tags.get(room))
    assert tags["RM_normal_0"] == {"plan": "pro"}


ROOM_OF = {
    "tag_nan": "RM_nan",
    "tag_bytes": "RM_bytes",
    "tag_nested_infinities": "RM_inf",
    "times_past_int64": "RM_time",
    "group_in_span": "RM_group",
}
POISON_ROOMS = set(ROOM_OF.values())


def _post_all(collector: CollectorProcess, key: str) -> None:
    headers = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {key}"}
    for index, (name, (body, _)) in enumerate(POISON.items()):
        for data in (body, _normal(index)):
            response = requests.post(
                f"{collector.base}/v1/traces", data=data, headers=headers, timeout=10
            )
            assert response.status_code == 200, (name, response.status_code, response.text)


def _wait(check, collector: CollectorProcess, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, collector.log()[-5000:]
        time.sleep(0.1)


def _queue_is_empty(directory: Path) -> bool:
    return all(path.stat().st_size == 0 for path in directory.rglob("*") if path.is_file())


def _sqlite_rows(db: Path) -> tuple[dict[str, tuple[int, int, bytes]], dict[str, Any]]:
    rows = {
        n: (s, e, b) for n, s, e, b in query(db, "SELECT name, start_ns, end_ns, span FROM spans")
    }
    tags = {
        room: json.loads(t) if t else None
        for room, t in query(db, "SELECT room_id, tags FROM calls WHERE room_id LIKE 'RM_%'")
    }
    return rows, tags


@pytest.mark.parametrize("native_sqlite", ["1", "0"], ids=["native-sqlite", "executemany"])
def test_poison_requests_are_stored_and_nothing_sticks_in_the_queues(
    tmp_path, redis_server, native_sqlite
):
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    queue_dir = tmp_path / "queue"
    stream = f"poison:{uuid.uuid4().hex[:8]}:{{project}}"
    config = pipeline_config(port, db)
    config["exporters"]["sqlite"]["sending_queue"] = {"storage": str(queue_dir)}
    config["exporters"]["redis_streams"] = {
        "url": redis_server.url,
        "stream": stream,
        "sending_queue": {"storage": str(queue_dir)},
    }
    config["service"]["pipelines"]["traces"]["exporters"] = ["sqlite", "redis_streams"]
    collector = CollectorProcess(
        config, tmp_path, port, env={"CALLTRACE_NATIVE_SQLITE": native_sqlite}
    )
    collector.start()
    try:
        _post_all(collector, key)
        total = 2 * len(POISON)
        _wait(lambda: len(query(db, "SELECT 1 FROM spans")) == total, collector)
        entries = _wait(
            lambda: (
                (e := redis_server.client().xrange(stream.format(project="acme")))
                and len(e) == total
                and e
            ),
            collector,
        )
    finally:
        assert collector.stop(timeout=20) == 0
    log = collector.log()
    assert "retrying" not in log and "dropping" not in log, log[-5000:]
    rows, tags = _sqlite_rows(db)
    _check_stored_rows(rows, tags)
    by_name = {Span.FromString(fields[b"span"]).name: fields for _, fields in entries}
    assert by_name["RM_time"][b"start_ns"] == b"%d" % (2**63 + 5)
    assert by_name["RM_group"][b"span"].endswith(GROUP)
    assert _queue_is_empty(queue_dir)

    # A restart finds nothing to deliver again.
    collector.start()
    try:
        time.sleep(1.0)
    finally:
        assert collector.stop(timeout=20) == 0
    assert "recovered" not in collector.log()
    assert len(query(db, "SELECT 1 FROM spans")) == 2 * len(POISON)
    assert len(redis_server.client().xrange(stream.format(project="acme"))) == 2 * len(POISON)


async def test_poison_requests_are_stored_in_postgresql(tmp_path):
    schema = f"ct_poison_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        missing_service(f"PostgreSQL at {POSTGRES_DSN} is unreachable: {exc}")
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    queue_dir = tmp_path / "queue"
    config = pipeline_config(port, db)
    config["exporters"] = {
        "postgres": {
            "dsn": POSTGRES_DSN,
            "schema": schema,
            "sending_queue": {"storage": str(queue_dir)},
        }
    }
    config["service"]["pipelines"]["traces"]["exporters"] = ["postgres"]
    collector = CollectorProcess(config, tmp_path, port)
    collector.start()
    try:
        _post_all(collector, key)
        count = f"SELECT count(*) FROM {schema}.spans"

        async def stored() -> int:
            return int(await admin.fetchval(count))

        deadline = time.monotonic() + 20
        while await stored() < 2 * len(POISON):
            assert time.monotonic() < deadline, collector.log()[-5000:]
            await asyncio.sleep(0.1)
        assert collector.stop(timeout=20) == 0
        assert "dropping" not in collector.log(), collector.log()[-5000:]
        rows = {
            r["name"]: (r["start_ns"], r["end_ns"], bytes(r["span"]))
            for r in await admin.fetch(f"SELECT name, start_ns, end_ns, span FROM {schema}.spans")
        }
        tags = {
            r["room_id"]: json.loads(r["tags"]) if r["tags"] else None
            for r in await admin.fetch(f"SELECT room_id, tags FROM {schema}.calls")
        }
        _check_stored_rows(rows, tags)
        assert _queue_is_empty(queue_dir)
    finally:
        if collector.process is not None:
            collector.stop(timeout=20)
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()
