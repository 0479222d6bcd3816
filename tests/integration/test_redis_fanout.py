"""Issue 4 acceptance: fan-out to SQLite and Redis Streams that never loses a span.

Every test runs its own throwaway redis-server on a free port; the fault tests kill it
(and the collector) with SIGKILL and check that every span answered with 200 arrives.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from collector.calls import call_id_for
from collector.keys import KeyStore
from collector.spans import ExportTraceServiceRequest, set_attribute
from tests.collector_process import CollectorProcess
from tests.redis_support import RedisServer
from tests.support import (
    eventually,
    fixture_requests,
    free_port,
    query,
    running_service,
    sdk_provider,
)

pytestmark = pytest.mark.redis

PROTOBUF = "application/x-protobuf"
STREAM = "calltrace:spans:acme"

SpanId = tuple[bytes, bytes]


def gateway_config(
    port: int, db: Path, redis_url: str, queue_dir: Path | None = None, **redis_exporter: Any
) -> dict[str, Any]:
    """auth, skip, correlate (records in Redis), batch -> sqlite + redis_streams."""
    fast_retry = {"initial_interval": "20ms", "max_interval": "200ms"}
    streams: dict[str, Any] = {
        "url": redis_url,
        "connect_timeout": "500ms",
        "timeout": "2s",
        "retry_on_failure": fast_retry,
    }
    sqlite: dict[str, Any] = {"path": str(db), "retry_on_failure": fast_retry}
    if queue_dir is not None:
        streams["sending_queue"] = {"storage": str(queue_dir)}
        sqlite["sending_queue"] = {"storage": str(queue_dir)}
    streams.update(redis_exporter)
    return {
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{port}"}}}},
        "processors": {
            "auth": {"key_store": str(db)},
            "skip": {},
            "correlate": {
                "store": str(db),
                "flush_interval": "100ms",
                "store_retry_interval": "100ms",
                "redis": {"url": redis_url, "ttl": "24h", "connect_timeout": "500ms"},
            },
            "batch": {"timeout": "5ms"},
        },
        "exporters": {
            "sqlite": sqlite,
            "redis_streams": streams,
        },
        "service": {
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["auth", "skip", "correlate", "batch"],
                    "exporters": ["sqlite", "redis_streams"],
                }
            },
            "shutdown_timeout": 5,
        },
    }


def stream_ids(server: RedisServer, stream: str = STREAM) -> list[SpanId]:
    return [
        (bytes.fromhex(fields[b"trace_id"].decode()), bytes.fromhex(fields[b"span_id"].decode()))
        for _id, fields in server.client().xrange(stream)
    ]


def stream_call_ids(server: RedisServer, stream: str = STREAM) -> set[str]:
    return {fields[b"call_id"].decode() for _id, fields in server.client().xrange(stream)}


def sqlite_ids(db: Path) -> list[SpanId]:
    return [(bytes(t), bytes(s)) for t, s in query(db, "SELECT trace_id, span_id FROM spans")]


class Requests:
    """Fixture-shaped requests with fresh trace and span ids, one room per few requests."""

    def __init__(self, requests_per_call: int = 5):
        self.templates = [
            ExportTraceServiceRequest.FromString(p.read_bytes())
            for p in fixture_requests("livekit")
        ]
        self.requests_per_call = requests_per_call
        self.count = 0

    def next(self) -> tuple[bytes, list[SpanId], str]:
        template = self.templates[self.count % len(self.templates)]
        room = f"RM_{self.count // self.requests_per_call:05d}"
        self.count += 1
        request = ExportTraceServiceRequest()
        request.CopyFrom(template)
        new_ids: dict[bytes, bytes] = {}

        def fresh(old: bytes, size: int) -> bytes:
            if not old:
                return old
            if old not in new_ids:
                new_ids[old] = os.urandom(size)
            return new_ids[old]

        ids: list[SpanId] = []
        for rs in request.resource_spans:
            set_attribute(rs.resource.attributes, "livekit.room.id", room)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    span.trace_id = fresh(span.trace_id, 16)
                    span.span_id = fresh(span.span_id, 8)
                    span.parent_span_id = fresh(span.parent_span_id, 8)
                    ids.append((span.trace_id, span.span_id))
        return request.SerializeToString(), ids, room


def post(url: str, key: str, body: bytes, timeout: float = 10) -> requests.Response:
    return requests.post(
        url,
        data=body,
        headers={"Content-Type": PROTOBUF, "Authorization": f"Bearer {key}"},
        timeout=timeout,
    )


# -- spans from the OpenTelemetry SDK reach SQLite and the stream, once each ----------


async def test_sdk_spans_reach_sqlite_and_the_stream_exactly_once(tmp_path, redis_server):
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    async with running_service(gateway_config(port, db, redis_server.url)):
        provider = sdk_provider(
            f"http://127.0.0.1:{port}/v1/traces",
            key,
            {"service.name": "voice-agent", "livekit.room.id": "RM_sdk"},
        )

        def emit() -> None:
            tracer = provider.get_tracer("livekit-agents")
            with tracer.start_as_current_span("agent_session"):
                for turn in range(3):
                    with (
                        tracer.start_as_current_span(f"agent_turn_{turn}"),
                        tracer.start_as_current_span("llm_node"),
                    ):
                        pass
            assert provider.force_flush(10_000)
            provider.shutdown()

        await asyncio.to_thread(emit)
        await eventually(lambda: len(sqlite_ids(db)) == 7 and len(stream_ids(redis_server)) == 7)
    # after a drained shutdown: still exactly once in both
    in_sqlite, in_stream = sqlite_ids(db), stream_ids(redis_server)
    assert len(in_sqlite) == len(set(in_sqlite)) == 7
    assert sorted(in_stream) == sorted(in_sqlite)
    call_id = call_id_for("acme", "RM_sdk")
    assert query(db, "SELECT DISTINCT call_id, project FROM spans") == [(call_id, "acme")]
    assert stream_call_ids(redis_server) == {call_id}
    record = redis_server.client().hgetall(f"calltrace:call:acme:{call_id}")
    assert record[b"room_id"] == b"RM_sdk"
    assert record[b"span_count"] == b"7"


# -- Redis killed while traffic flows ----------------------------------------------


class Sender(threading.Thread):
    """Posts requests one after another until stopped; records every outcome."""

    def __init__(self, url: str, key: str):
        super().__init__(daemon=True)
        self.url, self.key = url, key
        self.requests = Requests()
        self.accepted: list[SpanId] = []
        self.answers: list[tuple[float, int]] = []  # (when, status)
        self.first_sent: dict[str, float] = {}  # room -> when its first request went out
        self.last_sent: dict[str, float] = {}
        self.failures: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        session = requests.Session()
        while not self.stopping.is_set():
            body, ids, room = self.requests.next()
            self.first_sent.setdefault(room, time.monotonic())
            self.last_sent[room] = time.monotonic()
            try:
                response = session.post(
                    self.url,
                    data=body,
                    headers={"Content-Type": PROTOBUF, "Authorization": f"Bearer {self.key}"},
                    timeout=10,
                )
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
                continue
            self.answers.append((time.monotonic(), response.status_code))
            if response.status_code == 200:
                self.accepted.extend(ids)
            time.sleep(0.005)

    def answered(self, since: float) -> int:
        return sum(1 for when, status in self.answers if when >= since and status == 200)


@pytest.mark.timeout(60)
async def test_redis_killed_while_traffic_flows_loses_nothing(tmp_path, redis_server):
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    async with running_service(gateway_config(port, db, redis_server.url)) as service:
        sender = Sender(f"http://127.0.0.1:{port}/v1/traces", key)
        sender.start()
        try:
            await eventually(lambda: len(sender.answers) >= 20)
            # Stop writes for a moment and read what the stream holds, so the kill below
            # cannot take away entries that were delivered but not yet read by us.
            client = redis_server.client()
            client.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
            before = set(stream_ids(redis_server))
            redis_server.kill()
            down_at = time.monotonic()
            stored_at_kill = len(sqlite_ids(db))
            await asyncio.sleep(3)  # traffic goes on while Redis is away
            answered_while_down = sender.answered(down_at)
            stored_while_down = len(sqlite_ids(db)) - stored_at_kill
            redis_server.start()
            await asyncio.sleep(1)
        finally:
            sender.stopping.set()
            await asyncio.to_thread(sender.join, 15)
        accepted = set(sender.accepted)
        await eventually(lambda: accepted <= before | set(stream_ids(redis_server)), timeout=20)
        retries = service.telemetry.value(
            "calltrace_exporter_retries_total", exporter="redis_streams"
        )
    assert sender.failures == []  # every request was answered
    assert answered_while_down > 10, "the receiver stopped answering while Redis was down"
    assert stored_while_down > 0, "SQLite stopped receiving while Redis was down"
    assert retries > 0
    assert {status for _, status in sender.answers} == {200}
    assert set(sqlite_ids(db)) >= accepted
    # Every call active after the outage has its shared record: those first seen while
    # Redis was down, and those whose record the restart (no persistence) took away.
    assert {row[0] for row in query(db, "SELECT room_id FROM calls")} == set(sender.first_sent)
    assert any(when > down_at for when in sender.first_sent.values())
    rooms = [room for room, when in sender.last_sent.items() if when > down_at]
    client = redis_server.client()
    missing = [
        room
        for room in rooms
        if not client.exists(f"calltrace:call:acme:{call_id_for('acme', room)}")
    ]
    assert missing == []


# -- the collector killed with a persistent queue full of undelivered batches ---------


@pytest.mark.timeout(90)
def test_persistent_queue_survives_sigkill(tmp_path):
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    redis_directory = tmp_path / "redis"
    redis_directory.mkdir()
    redis_server = RedisServer(redis_directory)  # not started: Redis is down
    config = gateway_config(port, db, redis_server.url, queue_dir=tmp_path / "queue")
    collector = CollectorProcess(config, tmp_path, port)
    collector.start()
    accepted: list[SpanId] = []
    try:
        generator = Requests()
        for _ in range(30):
            body, ids, _room = generator.next()
            response = post(f"{collector.base}/v1/traces", key, body)
            assert response.status_code == 200, response.text
            accepted.extend(ids)
        # accepted, in SQLite, but not deliverable to the stream
        assert list((tmp_path / "queue" / "redis_streams.queue").glob("*.log")) != []
        collector.kill()

        redis_server.start()
        collector.start()
        deadline = time.monotonic() + 30
        while set(stream_ids(redis_server)) != set(accepted):
            assert time.monotonic() < deadline, collector.log()[-3000:]
            time.sleep(0.1)
        assert collector.stop() == 0
        assert set(sqlite_ids(db)) == set(accepted)
    finally:
        collector.kill()
        redis_server.kill()
    assert "batches recovered" in collector.log()


# -- two collectors, one Redis: one call ----------------------------------------------


@pytest.mark.timeout(90)
def test_two_collectors_share_calls(tmp_path, redis_server):
    collectors, keys, dbs = [], [], []
    for name in ("a", "b"):
        directory = tmp_path / name
        directory.mkdir()
        db = directory / "calltrace.db"
        key, _ = KeyStore(db).create("acme")
        port = free_port()
        collectors.append(
            CollectorProcess(gateway_config(port, db, redis_server.url), directory, port)
        )
        keys.append(key)
        dbs.append(db)
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda c: c.start(), collectors))
        generator = Requests(requests_per_call=1000)  # every request: room RM_00000
        sent: list[list[SpanId]] = [[], []]
        for index in range(10):
            body, ids, room = generator.next()
            target = index % 2
            response = post(f"{collectors[target].base}/v1/traces", keys[target], body)
            assert response.status_code == 200, response.text
            sent[target].extend(ids)
        for collector in collectors:
            assert collector.stop() == 0  # drains and flushes the call records
    finally:
        for collector in collectors:
            collector.kill()
    call_id = call_id_for("acme", room)
    for db, ids in zip(dbs, sent, strict=True):
        assert set(sqlite_ids(db)) == set(ids)
        assert query(db, "SELECT DISTINCT call_id FROM spans") == [(call_id,)]
    assert stream_call_ids(redis_server) == {call_id}
    assert len(stream_ids(redis_server)) == len(sent[0]) + len(sent[1])
    client = redis_server.client()
    assert client.keys("calltrace:call:*") == [f"calltrace:call:acme:{call_id}".encode()]
    record = client.hgetall(f"calltrace:call:acme:{call_id}")
    assert record[b"room_id"] == room.encode()
    assert int(record[b"span_count"]) == len(sent[0]) + len(sent[1])
    copies = [query(db, "SELECT call_id, source, first_seen_ns FROM calls") for db in dbs]
    assert copies[0] == copies[1] == [(call_id, "livekit.room.id", int(record[b"first_seen_ns"]))]


# -- backpressure: full queues refuse with Retry-After, memory stays bounded ----------

MEMORY_BOUND = 300 * 1024 * 1024


@pytest.mark.timeout(120)
def test_full_queue_refuses_with_retry_after_and_memory_stays_bounded(tmp_path):
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    redis_directory = tmp_path / "redis"
    redis_directory.mkdir()
    redis_server = RedisServer(redis_directory)  # down: the stream's queue can only fill
    config = gateway_config(
        port, db, redis_server.url, sending_queue={"queue_size": 5000, "num_consumers": 2}
    )
    collector = CollectorProcess(config, tmp_path, port)
    collector.start()
    generator = Requests()
    bodies = [generator.next() for _ in range(400)]
    lock = threading.Lock()
    outcomes: list[tuple[int, str | None, list[SpanId]]] = []

    def flood(worker: int) -> None:
        session = requests.Session()
        headers = {"Content-Type": PROTOBUF, "Authorization": f"Bearer {key}"}
        for _round in range(6):  # each body several times: a big, repeated flood
            for body, ids, _room in bodies[worker::8]:
                response = session.post(
                    f"{collector.base}/v1/traces", data=body, headers=headers, timeout=30
                )
                with lock:
                    outcomes.append(
                        (response.status_code, response.headers.get("Retry-After"), ids)
                    )

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(flood, range(8)))
        peak = collector.peak_rss()
        refused = [o for o in outcomes if o[0] in (429, 503)]
        assert refused, "a full queue never refused"
        assert all(retry_after and int(retry_after) >= 1 for _, retry_after, _ in refused)
        assert {status for status, _, _ in outcomes} <= {200, 429, 503}
        print(
            f"flood: {len(outcomes)} requests, {len(refused)} refused, "
            f"collector peak RSS {peak / 2**20:.0f} MiB"
        )
        assert peak < MEMORY_BOUND, f"peak RSS {peak / 2**20:.0f} MiB"
        readyz = requests.get(f"{collector.base}/readyz", timeout=5).json()
        queue = readyz["queues"]["redis_streams"]
        assert queue["size"] <= queue["capacity"] + max(
            len(ids) for _, ids, _ in bodies
        )  # one oversized batch may go into an empty queue

        # Redis comes up: everything that was accepted reaches the stream.
        accepted = {span for status, _, ids in outcomes if status == 200 for span in ids}
        redis_server.start()
        deadline = time.monotonic() + 30
        while not accepted <= set(stream_ids(redis_server)):
            assert time.monotonic() < deadline, collector.log()[-3000:]
            time.sleep(0.1)
        assert collector.stop() == 0
    finally:
        collector.kill()
        redis_server.kill()
