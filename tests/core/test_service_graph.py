"""The pipeline graph ``Service`` builds: processors per pipeline, shared receivers and
exporters, a receiver feeding several pipelines (issue 16, defect 2)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.components import ComponentConfig, Processor
from collector.config import parse_config
from collector.otlp_json import decode_request
from collector.service import PipelineHost, Service
from collector.spans import (
    ExportTraceServiceRequest,
    SpanBatch,
    get_attribute,
    iter_spans,
    set_attribute,
)
from tests.support import eventually, free_port

PROTOBUF = {"Content-Type": "application/x-protobuf"}


def request(label: str, index: int, *, skip: bool = False) -> bytes:
    """One resource of two spans named ``{label}-{index}-{n}``, with a room per label."""
    message = ExportTraceServiceRequest()
    rs = message.resource_spans.add()
    for key, value in (("service.name", f"agent-{label}"), ("livekit.room.id", f"RM_{label}")):
        attribute = rs.resource.attributes.add()
        attribute.key, attribute.value.string_value = key, value
    if skip:
        attribute = rs.resource.attributes.add()
        attribute.key, attribute.value.bool_value = "roark.skip", True
    scope = rs.scope_spans.add()
    for n in range(2):
        span = scope.spans.add()
        span.trace_id = bytes([1 + ord(label[0]) % 200, index % 250 + 1]) + bytes(14)
        span.span_id = bytes([n + 1, index % 250 + 1]) + bytes(6)
        span.name = f"{label}-{index}-{n}"
        span.start_time_unix_nano = 1_700_000_000_000_000_000 + index
        span.end_time_unix_nano = span.start_time_unix_nano + 1_000
    return message.SerializeToString()


def stored(path: Path) -> list[tuple[str, Any]]:
    """``(span name, the resource's call id)`` of every span in a ``file`` exporter's output."""
    if not path.exists():
        return []
    found = []
    for line in path.read_bytes().splitlines():
        for rs in decode_request(line).resource_spans:
            call_id = get_attribute(rs.resource.attributes, "calltrace.call.id")
            found += [(span.name, call_id) for span in iter_spans(rs)]
    return found


def two_pipelines(tmp_path: Path, ports: dict[str, int], *, shared: bool) -> dict[str, Any]:
    """Pipelines a and b, each with its own receiver and ``file`` exporter, both naming
    ``skip``, ``correlate`` and ``batch``; with ``shared``, a third receiver feeds both,
    and a span-renaming plugin runs in pipeline a only."""
    receivers = {
        f"otlp/{name}": {"protocols": {"http": {"endpoint": f"127.0.0.1:{port}"}}}
        for name, port in ports.items()
    }
    pipelines = {
        f"traces/{name}": {
            "receivers": [f"otlp/{name}"],
            "processors": ["skip", "correlate", "batch"],
            "exporters": [f"file/{name}"],
        }
        for name in ("a", "b")
    }
    if shared:
        for name in ("a", "b"):
            pipelines[f"traces/{name}"]["receivers"].append("otlp/shared")
        pipelines["traces/a"]["processors"].insert(0, "rename")
    return {
        "receivers": receivers,
        "processors": {
            "skip": {},
            "correlate": {"store": None},
            # Long enough for requests to both pipelines to wait in it together.
            "batch": {"timeout": "50ms"},
            "rename": {"type": "tests.conftest:SpanRenamingProcessor"},
        },
        "exporters": {
            f"file/{name}": {"path": str(tmp_path / f"{name}.jsonl")} for name in ("a", "b")
        },
        "service": {"pipelines": pipelines, "query": {"enabled": False}},
    }


async def post(session: aiohttp.ClientSession, port: int, body: bytes) -> None:
    async with session.post(
        f"http://127.0.0.1:{port}/v1/traces", data=body, headers=PROTOBUF
    ) as response:
        assert response.status == 200, await response.text()


async def test_each_pipeline_has_its_own_processors_and_exporters(tmp_path, make_service):
    ports = {"a": free_port(), "b": free_port()}
    service = await make_service(two_pipelines(tmp_path, ports, shared=False))
    a, b = service.pipeline_processors["traces/a"], service.pipeline_processors["traces/b"]
    assert a.keys() == b.keys() == {"skip", "correlate", "batch"}
    assert all(a[p] is not b[p] for p in a)
    async with aiohttp.ClientSession() as session:
        # Interleaved and concurrent, so both pipelines' requests wait in "batch" at once.
        await asyncio.gather(
            *(
                post(session, ports[label], request(label, index, skip=index % 5 == 0))
                for index in range(20)
                for label in ("a", "b")
            )
        )
    expected = {
        label: {f"{label}-{i}-{n}" for i in range(20) if i % 5 for n in range(2)}
        for label in ("a", "b")
    }
    for label in ("a", "b"):
        path = tmp_path / f"{label}.jsonl"
        await eventually(lambda path=path, label=label: len(stored(path)) >= len(expected[label]))
    await asyncio.sleep(0.1)  # nothing more arrives late
    for label in ("a", "b"):
        spans = stored(tmp_path / f"{label}.jsonl")
        names = [name for name, _ in spans]
        assert sorted(names) == sorted(expected[label]), f"pipeline {label} got another's spans"
        assert {call_id for _, call_id in spans} != {None}  # its correlate stamped them
    # Processor metrics: per component id, and per pipeline.
    value = service.telemetry.value
    metric = "calltrace_processor_dropped_spans_total"
    assert value(metric, processor="skip") == 16
    assert value(metric, processor="skip", pipeline="traces/a") == 8
    assert value(metric, processor="skip", pipeline="traces/b") == 8


async def test_a_receiver_feeds_every_pipeline_that_names_it(tmp_path, make_service):
    ports = {"a": free_port(), "b": free_port(), "shared": free_port()}
    await make_service(two_pipelines(tmp_path, ports, shared=True))
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(
            post(session, ports["shared"], request("shared", 1)),
            post(session, ports["a"], request("a", 1)),
            post(session, ports["b"], request("b", 1)),
        )
    await eventually(lambda: len(stored(tmp_path / "a.jsonl")) == 4)
    await eventually(lambda: len(stored(tmp_path / "b.jsonl")) == 4)
    await asyncio.sleep(0.1)
    a = sorted(name for name, _ in stored(tmp_path / "a.jsonl"))
    b = sorted(name for name, _ in stored(tmp_path / "b.jsonl"))
    # Pipeline a renames what it gets; its edits never reach pipeline b's copy.
    assert a == ["renamed a-1-0", "renamed a-1-1", "renamed shared-1-0", "renamed shared-1-1"]
    assert b == ["b-1-0", "b-1-1", "shared-1-0", "shared-1-1"]


def test_host_component_names_the_first_pipelines_processor(tmp_path):
    config = two_pipelines(tmp_path, {"a": free_port(), "b": free_port()}, shared=False)
    config["processors"]["skip/unused"] = {}
    service = Service(parse_config(config, environ=dict(os.environ)))
    # A processor in no pipeline is still one instance (the query API may use an auth
    # defined for it alone).
    unused = service.component("skip/unused")
    assert all(unused not in p.values() for p in service.pipeline_processors.values())
    first = service.pipeline_processors["traces/a"]["batch"]
    second = service.pipeline_processors["traces/b"]["batch"]
    assert service.component("batch") is first
    assert PipelineHost(service, "traces/b").component("batch") is second
    assert PipelineHost(service, "traces/b").component("file/a") is service.exporters["file/a"]


@pytest.mark.parametrize("failing", ["traces/a", "traces/b"])
async def test_a_failing_pipeline_fails_the_request_after_the_others_took_it(
    tmp_path, make_service, failing
):
    ports = {"a": free_port(), "b": free_port(), "shared": free_port()}
    config = two_pipelines(tmp_path, ports, shared=True)
    config["processors"]["refuse"] = {"type": "tests.conftest:RefusingProcessor"}
    config["service"]["pipelines"][failing]["processors"].insert(0, "refuse")
    service = await make_service(config)
    other = "b" if failing == "traces/a" else "a"
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{ports['shared']}/v1/traces",
            data=request("shared", 1),
            headers=PROTOBUF,
        ) as response,
    ):
        assert response.status == 503
    await eventually(lambda: len(stored(tmp_path / f"{other}.jsonl")) == 2)
    assert service.ready


# -- the invariant: every span reaches exactly its pipelines' exporters, edited ----------


class StampConfig(ComponentConfig):
    stamp: str


class StampProcessor(Processor):
    """Appends its ``stamp`` to each span's ``stamps`` attribute: the attribute then
    lists the stamps of the pipeline a span went through, in order."""

    Config = StampConfig
    config: StampConfig

    async def process(self, batch: SpanBatch) -> SpanBatch | None:
        for rs in batch.resource_spans:
            for span in iter_spans(rs):
                stamps = get_attribute(span.attributes, "stamps") or ""
                set_attribute(span.attributes, "stamps", f"{stamps}{self.config.stamp};")
        return batch


COMPONENTS = 3
PROCESSORS = [f"stamp/{i}" for i in range(COMPONENTS)] + ["batch"]


@st.composite
def graphs(draw: st.DrawFn) -> list[dict[str, list[str]]]:
    """One to three pipelines, each naming some of three receivers, some of the
    processors (in a drawn order) and some of three exporters; shared ones allowed."""
    ids = st.integers(0, COMPONENTS - 1)
    pipelines = []
    for _ in range(draw(st.integers(1, 3))):
        receivers = draw(st.lists(ids, min_size=1, max_size=COMPONENTS, unique=True))
        processors = draw(st.permutations(PROCESSORS))[: draw(st.integers(0, len(PROCESSORS)))]
        exporters = draw(st.lists(ids, min_size=1, max_size=COMPONENTS, unique=True))
        pipelines.append(
            {
                "receivers": [f"otlp/{i}" for i in receivers],
                "processors": processors,
                "exporters": [f"file/{i}" for i in exporters],
            }
        )
    return pipelines


async def run_graph(directory: Path, pipelines: list[dict[str, list[str]]]) -> None:
    ports = [free_port() for _ in range(COMPONENTS)]
    config = {
        "receivers": {
            f"otlp/{i}": {"protocols": {"http": {"endpoint": f"127.0.0.1:{port}"}}}
            for i, port in enumerate(ports)
        },
        "processors": {
            **{
                f"stamp/{i}": {"type": f"{__name__}:StampProcessor", "stamp": str(i)}
                for i in range(COMPONENTS)
            },
            "batch": {"timeout": "20ms"},
        },
        "exporters": {
            f"file/{i}": {"path": str(directory / f"{i}.jsonl")} for i in range(COMPONENTS)
        },
        "service": {
            "pipelines": {f"traces/{n}": p for n, p in enumerate(pipelines)},
            "query": {"enabled": False},
        },
    }
    service = Service(parse_config(config, environ=dict(os.environ)))
    await service.start()
    try:
        fed = {r for p in pipelines for r in p["receivers"]}
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(
                *(
                    post(session, ports[i], request(f"r{i}x{k}", k))
                    for i in range(COMPONENTS)
                    if f"otlp/{i}" in fed
                    for k in range(3)
                )
            )
    finally:
        await service.shutdown()  # drains batches and queues: all is written now


def file_spans(path: Path) -> Counter[tuple[str, str]]:
    found: Counter[tuple[str, str]] = Counter()
    if path.exists():
        for line in path.read_bytes().splitlines():
            for rs in decode_request(line).resource_spans:
                for span in iter_spans(rs):
                    found[span.name, get_attribute(span.attributes, "stamps") or ""] += 1
    return found


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(pipelines=graphs())
def test_every_span_reaches_exactly_its_pipelines_exporters_with_their_edits(pipelines):
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        asyncio.run(run_graph(directory, pipelines))
        for e in range(COMPONENTS):
            expected: Counter[tuple[str, str]] = Counter()
            for pipeline in pipelines:
                if f"file/{e}" not in pipeline["exporters"]:
                    continue
                stamps = "".join(
                    f"{p.split('/')[1]};" for p in pipeline["processors"] if p != "batch"
                )
                for receiver in pipeline["receivers"]:
                    i = int(receiver.split("/")[1])
                    for k in range(3):
                        for n in range(2):
                            expected[f"r{i}x{k}-{k}-{n}", stamps] += 1
            assert file_spans(directory / f"{e}.jsonl") == expected, (e, pipelines)


class LifecycleProcessor(Processor):
    """Records, in ``events``, each instance's start (with its pipeline) and shutdown."""

    events: ClassVar[list[tuple[str, int, str | None]]] = []

    async def start(self, host: Any) -> None:
        self.events.append(("start", id(self), getattr(host, "pipeline", None)))

    async def shutdown(self) -> None:
        self.events.append(("shutdown", id(self), None))


async def test_every_processor_instance_is_started_and_shut_down(tmp_path):
    config = two_pipelines(tmp_path, {"a": free_port(), "b": free_port()}, shared=False)
    config["processors"]["lifecycle"] = {"type": f"{__name__}:LifecycleProcessor"}
    for pipeline in config["service"]["pipelines"].values():
        pipeline["processors"].append("lifecycle")
    LifecycleProcessor.events.clear()
    service = Service(parse_config(config, environ=dict(os.environ)))
    instances = {
        name: id(processors["lifecycle"])
        for name, processors in service.pipeline_processors.items()
    }
    await service.start()
    await service.shutdown()
    assert LifecycleProcessor.events == [
        ("start", instances["traces/a"], "traces/a"),
        ("start", instances["traces/b"], "traces/b"),
        ("shutdown", instances["traces/a"], None),
        ("shutdown", instances["traces/b"], None),
    ]
