"""``config/gateway.yaml`` run as two instances against one PostgreSQL and one Redis
(issue 16, defect 5): a key created once works on both, and a call whose requests are
split between them is found whole, every span linked to one call id, through either
instance's query API.

Both instances are real ``calltrace run`` processes started from the shipped file, with
only the environment the file documents changed: ports, a PostgreSQL schema and a Redis
key prefix of this test's own (dropped and deleted afterwards), and a data directory
each. In CI (CI=true) an unreachable PostgreSQL or Redis fails the test.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from collector.calls import call_id_for
from collector.spans import ExportTraceServiceRequest, iter_spans
from tests.collector_process import CollectorProcess
from tests.support import (
    POSTGRES_DSN,
    ROOT,
    eventually,
    fixture_requests,
    free_port,
    missing_service,
    postgres_execute,
)

GATEWAY = ROOT / "config" / "gateway.yaml"
REDIS_URL = os.environ.get("CALLTRACE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ROOMS = {"livekit": "RM_test123", "pipecat": "RM_test789"}

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]


@pytest.fixture
def shared_stores() -> Iterator[dict[str, str]]:
    """The gateway's environment for a PostgreSQL schema and a Redis prefix of this
    test's own on the shared servers; both are removed afterwards."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        missing_service(f"Redis at {REDIS_URL} is unreachable: {exc}")
    postgres_execute("SELECT 1")
    token = uuid.uuid4().hex[:12]
    schema, prefix = f"ct_gateway_{token}", f"calltrace-test:{token}:"
    try:
        yield {
            "CALLTRACE_POSTGRES_DSN": POSTGRES_DSN,
            "CALLTRACE_POSTGRES_SCHEMA": schema,
            "CALLTRACE_REDIS_URL": REDIS_URL,
            "CALLTRACE_REDIS_PREFIX": prefix,
        }
    finally:
        postgres_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def gateway_env(tls_files: Any, stores: dict[str, str]) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CALLTRACE_")}
    return {
        **clean,
        **stores,
        "CALLTRACE_TLS_CERT": str(tls_files.cert_file),
        "CALLTRACE_TLS_KEY": str(tls_files.key_file),
    }


def create_key(env: dict[str, str], project: str, cwd: Path) -> str:
    """``calltrace keys --config gateway.yaml create``, as an operator would run it."""
    command = ["keys", "--config", str(GATEWAY), "create", "--project", project]
    result = subprocess.run(
        [sys.executable, "-m", "collector", *command],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def span_ids(body: bytes) -> set[str]:
    request = ExportTraceServiceRequest.FromString(body)
    return {span.span_id.hex() for rs in request.resource_spans for span in iter_spans(rs)}


def tree_span_ids(nodes: list[dict[str, Any]]) -> list[str]:
    found = []
    for node in nodes:
        if not node.get("placeholder"):
            found.append(node["span_id"])
        found += tree_span_ids(node.get("children", []))
    return found


def api(session: requests.Session, instance: CollectorProcess, path: str) -> Any:
    response = session.get(f"{instance.base}{path}", timeout=30)
    assert response.status_code == 200, (path, response.text)
    return response.json()


def whole_call(
    session: requests.Session, instance: CollectorProcess, call_id: str, span_ids: set[str]
) -> tuple[dict[str, Any], dict[str, Any], list[str]] | None:
    """The call as ``instance`` lists it, its ``/api/v1/calls/{id}`` body and the ids of
    the spans in its tree, once it lists the call with as many spans as ``span_ids``."""
    calls = {c["call_id"]: c for c in api(session, instance, "/api/v1/calls")["calls"]}
    if call_id not in calls:
        return None
    body = api(session, instance, f"/api/v1/calls/{call_id}")
    ids = tree_span_ids(body["tree"])
    return (calls[call_id], body, ids) if len(ids) >= len(span_ids) else None


@pytest.mark.timeout(180)
async def test_two_gateway_instances_share_keys_calls_and_spans(
    tmp_path: Path, tls_files: Any, shared_stores: dict[str, str], no_ca_bundle_override: None
) -> None:
    env = gateway_env(tls_files, shared_stores)
    key = await asyncio.to_thread(create_key, env, "acme", tmp_path)

    instances = []
    for name in ("a", "b"):
        directory = tmp_path / name
        directory.mkdir()
        port = free_port()
        own = {
            "CALLTRACE_HTTP_ENDPOINT": f"127.0.0.1:{port}",
            "CALLTRACE_GRPC_ENDPOINT": f"127.0.0.1:{free_port()}",
            "CALLTRACE_DATA_DIR": str(directory / "data"),
        }
        instances.append(
            CollectorProcess(
                GATEWAY, directory, port, env={**env, **own}, ca_file=tls_files.ca_file
            )
        )
    try:
        with ThreadPoolExecutor(2) as pool:
            await asyncio.to_thread(lambda: list(pool.map(lambda c: c.start(), instances)))
        session = requests.Session()
        session.verify = str(tls_files.ca_file)
        session.headers["Authorization"] = f"Bearer {key}"

        sent: dict[str, set[str]] = {}
        trace_ids: dict[str, set[str]] = {}
        for framework in ROOMS:
            sent[framework], trace_ids[framework] = set(), set()
            # One call's requests, alternating between the two instances.
            for index, path in enumerate(fixture_requests(framework)):
                body = path.read_bytes()
                sent[framework] |= span_ids(body)
                trace_ids[framework] |= {
                    span.trace_id.hex()
                    for rs in ExportTraceServiceRequest.FromString(body).resource_spans
                    for span in iter_spans(rs)
                }
                response = await asyncio.to_thread(
                    session.post,
                    f"{instances[index % 2].base}/v1/traces",
                    data=body,
                    headers={"Content-Type": "application/x-protobuf"},
                    timeout=30,
                )
                assert response.status_code == 200, response.text

        for framework, room in ROOMS.items():
            call_id = call_id_for("acme", room)
            for instance in instances:
                # (blocking requests in the check: the instances are other processes)
                listed, body, ids = await eventually(
                    functools.partial(whole_call, session, instance, call_id, sent[framework]),
                    timeout=60,
                    interval=0.2,
                )
                assert sorted(ids) == sorted(sent[framework]), instance.log()
                assert body["call"]["call_id"] == listed["call_id"] == call_id
                assert body["call"]["room_id"] == listed["room_id"] == room
                for trace_id in trace_ids[framework]:
                    trace = api(session, instance, f"/api/v1/traces/{trace_id}")["trace"]
                    assert trace["call_id"] == call_id

        for instance in instances:  # drains, and writes the call records it holds
            assert await asyncio.to_thread(instance.stop) == 0, instance.log()

        # One call record per call in Redis, shared by both instances; every span once
        # in the project's stream.
        prefix = shared_stores["CALLTRACE_REDIS_PREFIX"]
        client = redis.Redis.from_url(REDIS_URL)
        records = sorted(k.decode() for k in client.scan_iter(match=f"{prefix}call:*"))
        assert records == sorted(
            f"{prefix}call:acme:{call_id_for('acme', room)}" for room in ROOMS.values()
        )
        for framework, room in ROOMS.items():
            record = client.hgetall(f"{prefix}call:acme:{call_id_for('acme', room)}")
            assert record[b"room_id"] == room.encode()
            assert int(record[b"span_count"]) == len(sent[framework])
        assert client.xlen(f"{prefix}spans:acme") == sum(len(ids) for ids in sent.values())
        client.close()

    finally:
        for instance in instances:
            instance.kill()
