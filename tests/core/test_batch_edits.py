"""What a processor changes is exactly what every exporter receives.

A test processor makes random edits (set, delete and rename attributes of random spans
and resources, drop spans and whole resources), through ``batch.resource_spans`` or
through ``BatchEntry``, anywhere in the built-in pipeline; the batches arrive as the
OTLP receiver makes them (with the request's bytes, so the pipeline may reuse them).
Exporters that read messages and exporters that read bytes, with an idle or a backed-up
queue, must all get exactly what the processor left.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

from collector import Exporter, ExporterConfig, Processor, RequestInfo, SpanBatch
from collector.exporterhelper import ExporterQueue
from collector.pipeline import Pipeline
from collector.receivers.otlp import TraceIngest
from collector.spans import (
    CALL_ID_ATTRIBUTE,
    ExportTraceServiceRequest,
    remove_attribute,
    set_attribute,
)
from collector.telemetry import Telemetry
from processors.batch import BatchConfig, BatchProcessor
from processors.correlate import CorrelateConfig, CorrelateProcessor
from processors.skip import SkipConfig, SkipProcessor


class MessageReader(Exporter):
    """Reads the batch's messages."""

    def __init__(self, config: ExporterConfig):
        super().__init__("messages", config)
        self.requests: list[ExportTraceServiceRequest] = []
        self.gate: asyncio.Event | None = None

    async def export(self, batch: SpanBatch) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.requests.append(ExportTraceServiceRequest(resource_spans=batch.resource_spans))


class ByteReader(MessageReader):
    """Reads the batch's bytes."""

    async def export(self, batch: SpanBatch) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.requests.append(ExportTraceServiceRequest.FromString(batch.serialize()))


class RandomEdits(Processor):
    """Edits each batch at random (seeded) and remembers what it passed on."""

    def __init__(self, seed: int, through_entries: bool):
        super().__init__("edits", None)  # type: ignore[arg-type]
        self.random = random.Random(seed)
        self.through_entries = through_entries
        self.passed_on: list[ResourceSpans] = []

    def _edit_attributes(self, attributes) -> None:
        choice = self.random.randrange(4)
        keys = [kv.key for kv in attributes]
        if choice == 0:
            set_attribute(attributes, f"edit.{self.random.randrange(3)}", self.random.random())
        elif choice == 1 and keys:
            remove_attribute(attributes, self.random.choice(keys))
        elif choice == 2 and keys:
            old = self.random.choice(keys)
            for kv in attributes:
                if kv.key == old:
                    kv.key = f"renamed.{old}"
                    break

    def _edit_message(self, rs: ResourceSpans) -> None:
        if self.random.random() < 0.3:
            self._edit_attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for span in ss.spans:
                if self.random.random() < 0.3:
                    self._edit_attributes(span.attributes)
            if ss.spans and self.random.random() < 0.2:
                del ss.spans[self.random.randrange(len(ss.spans))]

    async def process(self, batch: SpanBatch) -> SpanBatch | None:
        if self.through_entries:
            kept = []
            for entry in batch.entries():
                roll = self.random.random()
                if roll < 0.1:
                    continue  # dropped
                if roll < 0.4:
                    self._edit_attributes(entry.resource.attributes)
                elif roll < 0.6:
                    self._edit_message(entry.message)
                kept.append(entry)
            batch.keep(kept)
        else:
            messages = batch.resource_spans
            for rs in messages:
                if self.random.random() < 0.5:
                    self._edit_message(rs)
            if messages and self.random.random() < 0.2:
                del messages[self.random.randrange(len(messages))]
        for rs in batch.to_request().resource_spans:
            copy = ResourceSpans()
            copy.CopyFrom(rs)
            self.passed_on.append(copy)
        return batch


attribute_values = st.one_of(st.text(max_size=5), st.integers(-5, 5), st.booleans())
span_shapes = st.lists(
    st.dictionaries(
        st.sampled_from(["conversation.id", "gen_ai.conversation.id", "a", "b"]),
        attribute_values,
        max_size=3,
    ),
    min_size=1,
    max_size=4,
)
resource_shapes = st.fixed_dictionaries(
    {
        "attributes": st.dictionaries(
            st.sampled_from(["service.name", "livekit.room.id", "roark.skip", "x"]),
            attribute_values,
            max_size=3,
        ),
        "scopes": st.lists(span_shapes, min_size=1, max_size=3),
        "copies": st.integers(1, 3),
    }
)


def _request(resources: list[dict]) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    for shape in resources:
        trace_id = os.urandom(16)
        for _ in range(shape["copies"]):  # a resource repeated, as SDKs do
            rs = request.resource_spans.add()
            for key, value in shape["attributes"].items():
                set_attribute(rs.resource.attributes, key, value)
            for spans in shape["scopes"]:
                ss = rs.scope_spans.add()
                ss.scope.name = "scope"
                for attributes in spans:
                    span = ss.spans.add(
                        trace_id=trace_id, span_id=os.urandom(8), name="span", end_time_unix_nano=5
                    )
                    for key, value in attributes.items():
                        set_attribute(span.attributes, key, value)
    return request


def _spans(requests: list[ExportTraceServiceRequest]) -> list[tuple[bytes, bytes]]:
    """Each span with its resource, in a comparable form, sorted."""
    return sorted(
        (
            rs.resource.SerializeToString(deterministic=True),
            span.SerializeToString(deterministic=True),
        )
        for request in requests
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    )


async def _run(requests, seed: int, through_entries: bool, position: int, backed_up: bool):
    config = ExporterConfig(retry_on_failure={"initial_interval": "1ms"})
    readers = [MessageReader(config), ByteReader(config), ByteReader(config)]
    queues = [ExporterQueue(reader) for reader in readers]
    if backed_up:
        for reader in readers:
            reader.gate = asyncio.Event()
    edits = RandomEdits(seed, through_entries)
    processors: list[Processor] = [
        SkipProcessor("skip", SkipConfig()),
        CorrelateProcessor("correlate", CorrelateConfig(store=None)),
        BatchProcessor("batch", BatchConfig(timeout=0.002)),
    ]
    processors.insert(position, edits)
    for queue in queues:
        await queue.start()
    pipeline = Pipeline("traces", processors, queues)
    ingest = TraceIngest("otlp", "http", pipeline, Telemetry())
    await asyncio.gather(
        *(
            ingest.export(
                ExportTraceServiceRequest.FromString(body),
                RequestInfo({}, project="p1"),
                body,
            )
            for body in requests
        )
    )
    for reader in readers:
        if reader.gate is not None:
            reader.gate.set()
    for queue in queues:
        await queue.shutdown(5)
    expected = _spans([ExportTraceServiceRequest(resource_spans=edits.passed_on)])
    if position < 2:  # correlate stamps after the edits: compare without its stamps
        expected = None
    for reader in readers:
        got = _spans(reader.requests)
        if expected is not None:
            assert got == expected, type(reader).__name__
    first = _spans(readers[0].requests)
    for reader in readers[1:]:
        assert _spans(reader.requests) == first
    return readers


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.lists(resource_shapes, min_size=1, max_size=3), min_size=1, max_size=3),
    st.integers(0, 2**32),
    st.booleans(),
    st.sampled_from([0, 2, 3]),
    st.booleans(),
)
def test_every_exporter_stores_exactly_what_the_processors_left(
    requests, seed, through_entries, position, backed_up
):
    bodies = [_request(resources).SerializeToString() for resources in requests]
    asyncio.run(_run(bodies, seed, through_entries, position, backed_up))


async def test_a_resource_edit_through_the_messages_reaches_the_bytes_readers():
    """The README's ``TagRegion``: a plugin that edits resources only, through
    ``batch.resource_spans``, after ``correlate`` (which keeps resources' bytes)."""

    class TagRegion(Processor):
        async def process(self, batch):
            for rs in batch.resource_spans:
                set_attribute(rs.resource.attributes, "cloud.region", "eu-west-1")
            return batch

    from tests.support import fixture_requests

    config = ExporterConfig()
    readers = [MessageReader(config), ByteReader(config)]
    queues = [ExporterQueue(reader) for reader in readers]
    for queue in queues:
        await queue.start()
    processors = [
        SkipProcessor("skip", SkipConfig()),
        CorrelateProcessor("correlate", CorrelateConfig(store=None)),
        TagRegion("tag_region", None),  # type: ignore[arg-type]
        BatchProcessor("batch", BatchConfig()),
    ]
    ingest = TraceIngest("otlp", "http", Pipeline("t", processors, queues), Telemetry())
    for path in fixture_requests("livekit"):
        body = path.read_bytes()
        await ingest.export(ExportTraceServiceRequest.FromString(body), RequestInfo({}), body)
    for queue in queues:
        await queue.shutdown(5)
    for reader in readers:
        resources = [rs.resource for r in reader.requests for rs in r.resource_spans]
        assert resources
        for resource in resources:
            attributes = {kv.key: kv.value for kv in resource.attributes}
            assert attributes["cloud.region"].string_value == "eu-west-1"
            assert CALL_ID_ATTRIBUTE in attributes


def test_a_batch_knows_its_bytes_are_stale_once_its_messages_are_handed_out():
    from tests.support import fixture_requests

    body = fixture_requests("livekit")[0].read_bytes()
    request = ExportTraceServiceRequest.FromString(body)
    batch = SpanBatch.from_received(list(request.resource_spans), body, "p1")
    assert ExportTraceServiceRequest.FromString(batch.serialize()) == request
    batch.resource_spans[0].scope_spans[0].spans[0].name = "edited"
    assert ExportTraceServiceRequest.FromString(batch.serialize()) == batch.to_request()
    assert batch.to_request() != ExportTraceServiceRequest.FromString(body)


@pytest.mark.parametrize("via", ["entry.message", "entry.resource"])
def test_edits_through_an_entry_reach_the_bytes(via):
    from tests.support import fixture_requests

    body = fixture_requests("pipecat")[0].read_bytes()
    request = ExportTraceServiceRequest.FromString(body)
    batch = SpanBatch.from_received(list(request.resource_spans), body, "p1")
    assert ExportTraceServiceRequest.FromString(batch.serialize()) == request
    entry = batch.entries()[0]
    before = entry.resource_bytes
    if via == "entry.message":
        entry.message.scope_spans[0].spans[0].name = "edited"
    else:
        set_attribute(entry.resource.attributes, "x", 1)
        assert entry.resource_bytes != before
    written = ExportTraceServiceRequest.FromString(batch.serialize())
    assert written == batch.to_request() != ExportTraceServiceRequest.FromString(body)
