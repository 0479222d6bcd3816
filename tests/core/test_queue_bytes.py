"""Sending queues hold serialized batches and refuse early when nearly full."""

import asyncio

import pytest

from collector import RefusedError, RequestInfo
from collector.exporterhelper import ExporterQueue
from collector.pipeline import Pipeline
from collector.spans import ExportTraceServiceRequest, serialize_resource_spans
from tests.core.test_exporterhelper import Recorder, fast_retry
from tests.processors._util import batch, resource_spans


def test_serialized_resource_spans_parse_back_and_concatenate():
    first = resource_spans({"service.name": "a"}, [{"name": "x"}, {"name": "y"}])
    second = resource_spans({"service.name": "b"}, [{"name": "z"}])
    merged = ExportTraceServiceRequest()
    merged.ParseFromString(serialize_resource_spans([first]) + serialize_resource_spans([second]))
    assert list(merged.resource_spans) == [first, second]


async def test_queued_batches_are_merged_and_keep_their_project_and_metadata():
    exporter = Recorder(fast_retry())
    exporter.gate = asyncio.Event()
    queue = ExporterQueue(exporter)
    await queue.start()
    first = batch(resource_spans({"k": "1"}, [{"name": "a"}]))
    first.metadata["transport"] = "http"
    await queue.put(first)
    await asyncio.sleep(0)  # the consumer takes the first batch and waits at the gate
    for index in range(3):
        await queue.put(batch(resource_spans({"k": str(index)}, [{"name": "b"}, {"name": "c"}])))
    exporter.gate.set()
    await queue.shutdown(5)
    assert sum(b.span_count for b in exporter.batches) == 7
    assert {b.project for b in exporter.batches} == {first.project}
    assert exporter.batches[0].metadata == {"transport": "http"}
    assert len(exporter.batches) == 2  # the three queued behind the gate went out as one
    assert exporter.batches[1].metadata == {}  # a merge of several requests carries none


async def test_nearly_full_queue_refuses_at_admission():
    exporter = Recorder(fast_retry(queue_size=20))
    exporter.gate = asyncio.Event()
    queue = ExporterQueue(exporter)
    await queue.start()
    pipeline = Pipeline("traces", [], [queue])
    await pipeline.admit(RequestInfo(headers={}, transport="http"))
    await queue.put(batch(resource_spans({}, [{}] * 19)))
    assert queue.nearly_full()
    with pytest.raises(RefusedError) as refused:
        await pipeline.admit(RequestInfo(headers={}, transport="http"))
    assert refused.value.retry_after > 0
    exporter.gate.set()
    await queue.shutdown(5)
    assert not queue.nearly_full()
    await pipeline.admit(RequestInfo(headers={}, transport="http"))


async def test_fan_out_hands_the_messages_to_one_queue_and_copies_to_the_others(tmp_path):
    first, second = Recorder(fast_retry(storage=str(tmp_path))), Recorder(fast_retry())
    first.gate, second.gate = asyncio.Event(), asyncio.Event()
    queues = [ExporterQueue(first), ExporterQueue(second)]
    for queue in queues:
        await queue.start()
    pipeline = Pipeline("traces", [], queues)
    sent = batch(resource_spans({"k": "v"}, [{"name": "a"}, {"name": "b"}]))
    await pipeline.consume(sent)
    first.gate.set()
    second.gate.set()
    for queue in queues:
        await queue.shutdown(5)
    [exported], [copied] = first.batches, second.batches
    assert exported.resource_spans[0] is sent.resource_spans[0]  # exported without a parse
    assert copied.resource_spans[0] is not sent.resource_spans[0]
    assert copied.resource_spans == exported.resource_spans


class BytesRecorder(Recorder):
    """An exporter that ships bytes on (like the sqlite exporter's writer process)."""

    async def export(self, batch):
        self.payloads.append(batch.serialize())
        await super().export(batch)


async def test_an_exporter_of_bytes_gets_the_queued_bytes(tmp_path):
    """A queue hands over the bytes it holds (from memory or disk, merged by joining
    them) as a batch that parses them only if asked; the batch itself goes to the first
    queue."""
    reader = Recorder(fast_retry())
    shipper = BytesRecorder(fast_retry(storage=str(tmp_path), batch_max_spans=2))
    shipper.payloads = []
    reader.gate, shipper.gate = asyncio.Event(), asyncio.Event()
    queues = [ExporterQueue(reader), ExporterQueue(shipper)]
    for queue in queues:
        await queue.start()
    pipeline = Pipeline("traces", [], queues)
    sent = [batch(resource_spans({"k": "v"}, [{"name": f"s{i}"}])) for i in range(5)]
    first_messages = [one.resource_spans[0] for one in sent]
    for one in sent:
        await pipeline.consume(one)
    shipper.gate.set()
    reader.gate.set()
    for queue in queues:
        await queue.shutdown(5)
    names = []
    for payload in shipper.payloads:
        request = ExportTraceServiceRequest()
        request.ParseFromString(payload)
        names += [
            s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans
        ]
    assert names == [f"s{i}" for i in range(5)]
    assert len(shipper.payloads) < 5  # merged: the joined bytes of several requests
    # The first queue was handed the batch itself, exported without a parse.
    assert reader.batches[0].resource_spans[0] is first_messages[0]
