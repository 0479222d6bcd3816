"""Calls for the query API and explorer tests, ingested through the real OTLP receiver.

The captured LiveKit and Pipecat requests are posted as they are, plus copies re-keyed
by the fixtures' own ``make_synthetic.rekey`` (fresh trace and span ids, another room,
another start time) to make more calls: one with custom tags, one with an ERROR span
and a span whose name is HTML, one whose root span never arrived, and one in a second
project.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from collector.keys import KeyStore
from collector.spans import ExportTraceServiceRequest
from tests.support import (
    FIXTURES,
    POSTGRES_DSN,
    fixture_requests,
    free_port,
    pipeline_config,
    query,
)

PROJECT, OTHER_PROJECT = "acme", "globex"
BASE_S = 1_795_510_800
"""2026-11-24T09:00:00Z: the re-keyed copies start here, about 10 minutes apart."""
LIVEKIT_ORIGINAL_START_NS = 1_795_505_670_127_006_748  # 07:34:30.127Z, from the capture
PIPECAT_ORIGINAL_START_NS = 1_795_505_794_575_461_017  # 07:36:34.575Z, from the capture
XSS_NAME = "<img src=x onerror=alert(1)>"
XSS_ATTRIBUTE = "<script>alert(2)</script>"
PROTOBUF = "application/x-protobuf"


def _rekey_module() -> Any:
    spec = importlib.util.spec_from_file_location("make_synthetic", FIXTURES / "make_synthetic.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Dataset:
    db: Path
    """The SQLite file: keys, call correlation, and the spans unless ``postgres_schema``."""
    key: str
    other_key: str
    postgres_schema: str | None = None
    """Store the spans in this schema of the test PostgreSQL server instead."""
    spans: int = 0
    rooms: dict[str, int] = field(default_factory=dict)
    """Room id -> start time (ns) of each call of ``PROJECT``."""
    orphan_parent_ids: list[str] = field(default_factory=list)
    """Span ids (hex) of the spans left out of the orphan call: agent_session, session_close."""
    other_room: str = "RM_other"

    def config(self, port: int) -> dict[str, Any]:
        config = pipeline_config(port, self.db)
        if self.postgres_schema is not None:
            config["exporters"] = {
                "postgres": {"dsn": POSTGRES_DSN, "schema": self.postgres_schema}
            }
            service = config["service"]
            service["pipelines"]["traces"]["exporters"] = ["postgres"]
            service["query"] = {"storage": "postgres"}
        return config

    async def stored_spans(self) -> int:
        """How many spans the storage holds (every project)."""
        if self.postgres_schema is None:
            return int(query(self.db, "SELECT count(*) FROM spans")[0][0])
        conn = await asyncpg.connect(POSTGRES_DSN, timeout=5)
        try:
            return int(await conn.fetchval(f"SELECT count(*) FROM {self.postgres_schema}.spans"))
        finally:
            await conn.close()


def _requests(framework: str) -> list[ExportTraceServiceRequest]:
    return [
        ExportTraceServiceRequest.FromString(p.read_bytes()) for p in fixture_requests(framework)
    ]


def _resource_attribute(request: ExportTraceServiceRequest, key: str, value: str) -> None:
    for rs in request.resource_spans:
        kv = rs.resource.attributes.add()
        kv.key = key
        kv.value.string_value = value


def _spans(requests: list[ExportTraceServiceRequest]) -> list[Any]:
    return [
        s for r in requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans
    ]


def build_requests(dataset: Dataset) -> list[tuple[str, ExportTraceServiceRequest]]:
    """(key, request) pairs to post, in order."""
    rekey = _rekey_module().rekey
    posts: list[tuple[str, ExportTraceServiceRequest]] = []

    def add(key: str, requests: list[ExportTraceServiceRequest], room: str, start_ns: int) -> None:
        posts.extend((key, r) for r in requests)
        dataset.spans += len(_spans(requests))
        if key == dataset.key:
            dataset.rooms[room] = start_ns

    def copy(framework: str, room: str, offset_min: int) -> tuple[list[Any], int]:
        start_s = BASE_S + offset_min * 60
        pairs = rekey(str(FIXTURES / framework), room, f"conv-{room}", start=start_s)
        return [r for _, r in pairs], start_s * 1_000_000_000

    add(dataset.key, _requests("livekit"), "RM_test123", LIVEKIT_ORIGINAL_START_NS)
    add(dataset.key, _requests("pipecat"), "RM_test789", PIPECAT_ORIGINAL_START_NS)

    tagged, start = copy("livekit", "RM_tagged", 0)
    for request in tagged:
        _resource_attribute(request, "roark.project.tag.customer", "initech")
        _resource_attribute(request, "roark.project.tag.tier", "gold")
    add(dataset.key, tagged, "RM_tagged", start)

    errors, start = copy("livekit", "RM_errors", 10)
    spans = _spans(errors)
    tts = next(s for s in spans if s.name == "tts_request")
    tts.status.code = 2
    tts.status.message = "tts provider timed out"
    turn = next(s for s in spans if s.name == "agent_turn")
    scope_spans = next(ss for r in errors for rs in r.resource_spans for ss in rs.scope_spans)
    html = scope_spans.spans.add()
    html.trace_id, html.parent_span_id, html.span_id = turn.trace_id, turn.span_id, os.urandom(8)
    html.name = XSS_NAME
    html.start_time_unix_nano = turn.start_time_unix_nano + 1_000_000
    html.end_time_unix_nano = turn.start_time_unix_nano + 51_000_000
    note = html.attributes.add()
    note.key, note.value.string_value = "note", XSS_ATTRIBUTE
    add(dataset.key, errors, "RM_errors", start)

    orphan, start = copy("livekit", "RM_orphan", 20)
    left_out = orphan.pop()  # 010: session_close and the root agent_session, exported last
    dataset.orphan_parent_ids = [
        s.span_id.hex() for s in _spans([left_out]) if s.name in ("agent_session", "session_close")
    ]
    add(dataset.key, orphan, "RM_orphan", start)

    # Two calls starting at the same nanosecond, so paging meets a tie.
    for offset, room in ((30, "RM_pc1"), (30, "RM_pc2")):
        requests, start = copy("pipecat", room, offset)
        add(dataset.key, requests, room, start)

    other, start = copy("pipecat", dataset.other_room, 50)
    add(dataset.other_key, other, dataset.other_room, start)
    return posts


async def ingest(dataset: Dataset) -> None:
    """Post every request through the OTLP/HTTP receiver and wait until all is stored."""
    from tests.support import running_service

    posts = build_requests(dataset)
    port = free_port()
    async with running_service(dataset.config(port)) as _, aiohttp.ClientSession() as session:
        for key, request in posts:
            async with session.post(
                f"http://127.0.0.1:{port}/v1/traces",
                data=request.SerializeToString(),
                headers={"Authorization": f"Bearer {key}", "Content-Type": PROTOBUF},
            ) as response:
                assert response.status == 200, await response.text()

        deadline = time.monotonic() + 30
        while (count := await dataset.stored_spans()) != dataset.spans:
            assert time.monotonic() < deadline, f"{count} of {dataset.spans} spans stored"
            await asyncio.sleep(0.05)


def make_dataset(directory: Path, postgres_schema: str | None = None) -> Dataset:
    """Keys for two projects and every call above, stored in ``directory/calltrace.db``
    (or the spans in ``postgres_schema`` of the test PostgreSQL server)."""
    db = directory / "calltrace.db"
    keys = KeyStore(db)
    key, _ = keys.create(PROJECT)
    other_key, _ = keys.create(OTHER_PROJECT)
    keys.close()
    dataset = Dataset(db, key, other_key, postgres_schema)
    # Its own thread and loop: a module-scoped fixture runs outside the tests' loops.
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(ingest(dataset))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return dataset
