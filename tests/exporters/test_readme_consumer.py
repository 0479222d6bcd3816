"""The README's consumer-group example, run as written against spans the exporter wrote
(twice, as an at-least-once retry may)."""

from __future__ import annotations

import re

import pytest

from exporters.redis_streams import RedisStreamsConfig, RedisStreamsExporter
from tests.processors._util import FakeTelemetryHost, batch, resource_spans
from tests.support import ROOT

pytestmark = pytest.mark.redis


def readme_consumer() -> dict:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- consumer-example -->\n```python\n(.*?)```", text, re.DOTALL)
    assert match, "README has no consumer example"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md#consumer-example", "exec"), namespace)
    return namespace


async def test_readme_consumer_group_example_handles_each_span_once(redis_server):
    exporter = RedisStreamsExporter("redis_streams", RedisStreamsConfig(url=redis_server.url))
    await exporter.start(FakeTelemetryHost())
    data = batch(resource_spans({"service.name": "agent"}, [{"name": f"s{i}"} for i in range(5)]))
    data.project = "acme"
    try:
        await exporter.export(data)
        await exporter.export(data)  # a retried batch: every entry twice
    finally:
        await exporter.shutdown()

    example = readme_consumer()
    r = redis_server.client()
    example["ensure_group"](r)
    example["ensure_group"](r)  # idempotent
    # worker-1 reads three entries and dies before acknowledging them
    r.xreadgroup(example["GROUP"], "worker-1", {example["STREAM"]: ">"}, count=3)

    handled = []

    def handle(fields, span):
        handled.append((fields[b"trace_id"], fields[b"span_id"], span.name))

    assert example["consume_once"](r, "worker-1", handle, pending=True) == 3
    assert example["consume_once"](r, "worker-1", handle) == 2  # the rest are duplicates
    assert sorted(name for _, _, name in handled) == [f"s{i}" for i in range(5)]
    assert r.xpending(example["STREAM"], example["GROUP"])["pending"] == 0
    assert r.xlen(example["STREAM"]) == 10
