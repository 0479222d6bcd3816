import asyncio

import pytest

from collector import RefusedError
from processors.batch import BatchConfig, BatchProcessor, split_resource_spans
from tests.processors._util import batch, resource_spans


class Sink:
    def __init__(self, fail: Exception | None = None):
        self.batches = []
        self.fail = fail

    async def __call__(self, b):
        if self.fail:
            raise self.fail
        self.batches.append(b)


async def test_flushes_on_size_and_merges_requests():
    proc = BatchProcessor("batch", BatchConfig(send_batch_size=4, timeout="10s"))
    sink = Sink()
    calls = [proc.consume(batch(resource_spans({}, [{}, {}])), sink) for _ in range(2)]
    await asyncio.wait_for(asyncio.gather(*calls), 2)
    assert len(sink.batches) == 1 and sink.batches[0].span_count == 4


async def test_flushes_on_timeout():
    proc = BatchProcessor("batch", BatchConfig(send_batch_size=1000, timeout="20ms"))
    sink = Sink()
    await asyncio.wait_for(proc.consume(batch(resource_spans({}, [{}])), sink), 2)
    assert sink.batches[0].span_count == 1


async def test_projects_never_share_a_batch():
    proc = BatchProcessor("batch", BatchConfig(send_batch_size=1000, timeout="20ms"))
    sink = Sink()
    await asyncio.gather(
        proc.consume(batch(resource_spans({}, [{}]), project="a"), sink),
        proc.consume(batch(resource_spans({}, [{}]), project="b"), sink),
    )
    assert sorted(b.project for b in sink.batches) == ["a", "b"]


async def test_downstream_refusal_reaches_every_caller():
    proc = BatchProcessor("batch", BatchConfig(send_batch_size=1000, timeout="10ms"))
    sink = Sink(fail=RefusedError("full"))
    results = await asyncio.gather(
        proc.consume(batch(resource_spans({}, [{}])), sink),
        proc.consume(batch(resource_spans({}, [{}])), sink),
        return_exceptions=True,
    )
    assert all(isinstance(r, RefusedError) for r in results)


async def test_shutdown_flushes_pending():
    proc = BatchProcessor("batch", BatchConfig(send_batch_size=1000, timeout="1h"))
    sink = Sink()
    waiting = asyncio.create_task(proc.consume(batch(resource_spans({}, [{}, {}])), sink))
    await asyncio.sleep(0.01)
    assert not sink.batches
    await proc.shutdown()
    await asyncio.wait_for(waiting, 1)
    assert sink.batches[0].span_count == 2


async def test_max_size_splits_batches():
    proc = BatchProcessor(
        "batch", BatchConfig(send_batch_size=3, send_batch_max_size=3, timeout="1h")
    )
    sink = Sink()
    await proc.consume(batch(resource_spans({"a": 1}, [{}] * 7)), sink)
    assert [b.span_count for b in sink.batches] == [3, 3, 1]
    for b in sink.batches:
        assert b.resource_spans[0].resource.attributes[0].key == "a"


def test_split_keeps_every_span_once():
    items = [
        resource_spans({}, [{"name": f"{r}-{i}"} for i in range(n)])
        for r, n in enumerate([2, 5, 1, 4])
    ]
    chunks = split_resource_spans(items, 3)
    names = [s.name for chunk in chunks for rs in chunk for ss in rs.scope_spans for s in ss.spans]
    assert sorted(names) == sorted(
        s.name for rs in items for ss in rs.scope_spans for s in ss.spans
    )
    assert all(sum(len(ss.spans) for rs in c for ss in rs.scope_spans) <= 3 for c in chunks)


def test_max_below_size_is_a_config_error():
    with pytest.raises(ValueError, match="send_batch_max_size"):
        BatchConfig(send_batch_size=10, send_batch_max_size=5)


def test_timeout_must_be_a_duration():
    with pytest.raises(ValueError, match="expected a duration like \"200ms\", got 'fast'"):
        BatchConfig(timeout="fast")
