import asyncio
import sqlite3

import pytest

from collector import Exporter, ExporterConfig, PermanentError, RefusedError, RetryableError
from collector.exporterhelper import ExporterQueue, _DiskQueue
from collector.spans import serialize_resource_spans
from collector.telemetry import Telemetry
from tests.processors._util import batch, resource_spans


class Recorder(Exporter):
    Config = ExporterConfig

    def __init__(self, config=None, failures=None):
        super().__init__("recorder", config or ExporterConfig())
        self.batches = []
        self.failures = list(failures or [])
        self.gate: asyncio.Event | None = None

    async def export(self, b):
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        self.batches.append(b)

    def span_names(self) -> list[str]:
        """The names of every span exported, in order."""
        return [
            s.name for b in self.batches for rs in b.resource_spans for ss in rs.scope_spans for s in ss.spans
        ]  # fmt: skip


def fast_retry(**queue):
    return ExporterConfig(
        retry_on_failure={"initial_interval": "1ms", "max_interval": "5ms"},
        sending_queue=queue,
    )


async def test_retries_retryable_errors_until_delivered():
    exporter = Recorder(fast_retry(), failures=[RetryableError("down")] * 3)
    telemetry = Telemetry()
    queue = ExporterQueue(exporter, telemetry)
    await queue.start()
    await queue.put(batch(resource_spans({}, [{}, {}])))
    await queue.shutdown(5)
    assert len(exporter.batches) == 1
    assert telemetry.value("calltrace_exporter_retries_total", exporter="recorder") == 3
    assert telemetry.value("calltrace_exporter_sent_spans_total", exporter="recorder") == 2


async def test_a_retry_waits_at_least_as_long_as_the_destination_asked():
    """A RetryableError's retry_after (a server's Retry-After) outlasts the backoff."""
    exporter = Recorder(fast_retry(), failures=[RetryableError("throttled", retry_after=0.5)])
    queue = ExporterQueue(exporter)
    await queue.start()
    started = asyncio.get_running_loop().time()
    await queue.put(batch(resource_spans({}, [{}])))
    while not exporter.batches:
        await asyncio.sleep(0.01)
    waited = asyncio.get_running_loop().time() - started
    await queue.shutdown(5)
    assert waited >= 0.45  # the backoff alone: 1 ms


async def test_permanent_error_is_logged_counted_not_retried(caplog):
    exporter = Recorder(fast_retry(), failures=[PermanentError("schema mismatch")])
    exporter.attempts = 0
    original = exporter.export

    async def counting_export(b):
        exporter.attempts += 1
        await original(b)

    exporter.export = counting_export
    telemetry = Telemetry()
    queue = ExporterQueue(exporter, telemetry)
    await queue.start()
    with caplog.at_level("ERROR", logger="collector.exporterhelper"):
        await queue.put(batch(resource_spans({}, [{}])))
        await queue.shutdown(5)
    assert exporter.attempts == 1
    assert exporter.batches == []
    assert telemetry.value("calltrace_exporter_send_failed_spans_total", exporter="recorder") == 1
    assert telemetry.value("calltrace_exporter_retries_total", exporter="recorder") == 0
    assert any(
        "permanent error" in r.getMessage() and "schema mismatch" in r.getMessage()
        for r in caplog.records
    )


async def test_permanent_error_in_a_merged_batch_drops_only_the_bad_request(tmp_path):
    class RejectsPoison(Recorder):
        async def export(self, b):
            await self.gate.wait()
            names = {s.name for rs in b.resource_spans for ss in rs.scope_spans for s in ss.spans}
            if "poison" in names:
                raise PermanentError("poison span")
            self.batches.append(b)

    exporter = RejectsPoison(fast_retry(storage=str(tmp_path)))
    exporter.gate = asyncio.Event()
    telemetry = Telemetry()
    queue = ExporterQueue(exporter, telemetry)
    await queue.start()
    for name in ("a", "poison", "b"):
        await queue.put(batch(resource_spans({}, [{"name": name}])))
    exporter.gate.set()
    await queue.shutdown(5)
    delivered = sorted(exporter.span_names())
    assert delivered == ["a", "b"]
    assert telemetry.value("calltrace_exporter_send_failed_spans_total", exporter="recorder") == 1
    # nothing is left on disk for the next start
    again = Recorder(fast_retry(storage=str(tmp_path)))
    queue2 = ExporterQueue(again)
    await queue2.start()
    await queue2.shutdown(5)
    assert again.batches == []


async def test_workers_keep_separate_persistent_queues(tmp_path, monkeypatch):
    names = []
    for worker in ("0", "1"):
        monkeypatch.setenv("CALLTRACE_WORKER", worker)
        exporter = Recorder(fast_retry(storage=str(tmp_path)))
        exporter.gate = asyncio.Event()
        queue = ExporterQueue(exporter)
        await queue.start()
        await queue.put(batch(resource_spans({}, [{"name": f"w{worker}"}])))
        await queue.shutdown(0.05)
    monkeypatch.setenv("CALLTRACE_WORKER", "1")
    exporter = Recorder(fast_retry(storage=str(tmp_path)))
    queue = ExporterQueue(exporter)
    await queue.start()
    await queue.shutdown(5)
    names = exporter.span_names()
    assert names == ["w1"]
    assert sorted(p.name for p in tmp_path.glob("*.queue")) == [
        "recorder.worker0.queue",
        "recorder.worker1.queue",
    ]
    # worker 0's batch waits in its own log; worker 1's was delivered from its own
    assert list((tmp_path / "recorder.worker0.queue").glob("*.log")) != []
    assert list((tmp_path / "recorder.worker1.queue").glob("*.log")) == []


async def test_full_queue_refuses_without_blocking():
    exporter = Recorder(fast_retry(queue_size=3))
    exporter.gate = asyncio.Event()
    queue = ExporterQueue(exporter)
    await queue.start()
    await queue.put(batch(resource_spans({}, [{}, {}])))
    with pytest.raises(RefusedError):
        await queue.put(batch(resource_spans({}, [{}, {}])))
    exporter.gate.set()
    await queue.shutdown(5)
    assert sum(b.span_count for b in exporter.batches) == 2


async def test_queued_batches_of_one_project_are_merged():
    exporter = Recorder(fast_retry())
    exporter.gate = asyncio.Event()
    queue = ExporterQueue(exporter)
    await queue.start()
    for _ in range(5):
        await queue.put(batch(resource_spans({}, [{}])))
    await queue.put(batch(resource_spans({}, [{}]), project="other"))
    exporter.gate.set()
    await queue.shutdown(5)
    assert [(b.project, b.span_count) for b in exporter.batches] in (
        [("p1", 1), ("p1", 4), ("other", 1)],
        [("p1", 5), ("other", 1)],
    )


async def test_persistent_queue_survives_restart(tmp_path):
    exporter = Recorder(fast_retry(storage=str(tmp_path)))
    exporter.gate = asyncio.Event()  # never opened: the destination is down
    queue = ExporterQueue(exporter)
    await queue.start()
    for name in ("a", "b"):
        await queue.put(batch(resource_spans({}, [{"name": name}])))
    await queue.shutdown(0.05)
    assert exporter.batches == []

    exporter2 = Recorder(fast_retry(storage=str(tmp_path)))
    queue2 = ExporterQueue(exporter2)
    await queue2.start()
    await queue2.shutdown(5)
    names = exporter2.span_names()
    assert names == ["a", "b"]
    exporter3 = Recorder(fast_retry(storage=str(tmp_path)))
    queue3 = ExporterQueue(exporter3)
    await queue3.start()
    await queue3.shutdown(5)
    assert exporter3.batches == []  # delivered items were removed from disk


async def test_persistent_queue_keeps_the_backlog_on_disk_not_in_memory(tmp_path):
    exporter = Recorder(fast_retry(storage=str(tmp_path), batch_max_spans=2, queue_size=1000))
    exporter.gate = asyncio.Event()  # the destination is down while a backlog builds
    queue = ExporterQueue(exporter)
    await queue.start()
    for index in range(20):
        await queue.put(batch(resource_spans({}, [{"name": f"s{index}"}])))
    in_memory = [item for item in queue._items if item.payload is not None]
    assert len(in_memory) <= 5  # only the head of the queue holds its bytes
    exporter.gate.set()
    await queue.shutdown(5)
    names = exporter.span_names()
    assert names == [f"s{index}" for index in range(20)]  # every span, in order


async def test_gives_up_after_max_elapsed_time():
    config = ExporterConfig(
        retry_on_failure={
            "initial_interval": "5ms",
            "max_interval": "5ms",
            "max_elapsed_time": "30ms",
        }
    )
    exporter = Recorder(config, failures=[RetryableError("down")] * 1000)
    telemetry = Telemetry()
    queue = ExporterQueue(exporter, telemetry)
    await queue.start()
    await queue.put(batch(resource_spans({}, [{}])))
    await queue.shutdown(5)
    assert telemetry.value("calltrace_exporter_send_failed_spans_total", exporter="recorder") == 1


async def test_persistent_queue_writes_off_the_loop_in_order_and_counts_room_at_once(tmp_path):
    exporter = Recorder(fast_retry(storage=str(tmp_path), queue_size=10))
    exporter.gate = asyncio.Event()  # the destination is down: everything stays queued
    queue = ExporterQueue(exporter)
    await queue.start()
    puts = [
        asyncio.ensure_future(queue.put(batch(resource_spans({}, [{"name": f"s{index}"}] * 3))))
        for index in range(3)
    ]
    await asyncio.sleep(0)  # the puts are writing to disk
    assert queue.size == 9  # their room is taken before they are on disk
    with pytest.raises(RefusedError):
        await queue.put(batch(resource_spans({}, [{}, {}])))
    puts[1].cancel()  # a client hangs up: its batch is queued all the same
    await asyncio.gather(*puts, return_exceptions=True)
    await queue.shutdown(0.05)  # all three stay on disk
    disk = _DiskQueue(tmp_path, "recorder")
    assert [item.spans for item in disk.load()] == [3, 3, 3]
    await disk.close()
    exporter = Recorder(fast_retry(storage=str(tmp_path)))
    queue = ExporterQueue(exporter)
    await queue.start()
    await queue.shutdown(5)
    assert exporter.span_names() == [f"s{index}" for index in range(3) for _ in range(3)]


async def test_persistent_queue_writes_each_batch_once_and_removes_it_once_delivered(tmp_path):
    """The queue's log holds each queued batch's bytes once (plus a small header), and
    nothing is left of it on disk once everything was delivered."""
    exporter = Recorder(fast_retry(storage=str(tmp_path)))
    exporter.gate = asyncio.Event()  # nothing is delivered (or deleted) meanwhile
    queue = ExporterQueue(exporter)
    await queue.start()
    spans = [{"name": "x" * 2_000}] * 50
    batches = [batch(resource_spans({}, spans)) for _ in range(10)]
    payload = sum(len(serialize_resource_spans(b.resource_spans)) for b in batches)
    for b in batches:
        await queue.put(b)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "recorder.queue").iterdir())
    assert payload <= on_disk <= payload + 10 * 100
    exporter.gate.set()
    await queue.shutdown(5)
    assert len(exporter.batches) >= 1
    assert list((tmp_path / "recorder.queue").iterdir()) == []


async def test_persistent_queue_delivers_what_an_older_sqlite_queue_file_held(tmp_path):
    """An upgrade from the SQLite queue file loses nothing it held."""
    old = sqlite3.connect(tmp_path / "recorder.queue.db")
    old.execute(
        "CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " project TEXT, spans INTEGER NOT NULL, payload BLOB NOT NULL)"
    )
    for name in ("a", "b", "c"):
        payload = serialize_resource_spans([resource_spans({}, [{"name": name}])])
        old.execute("INSERT INTO queue (project, spans, payload) VALUES ('p1', 1, ?)", (payload,))
    old.commit()
    old.close()
    exporter = Recorder(fast_retry(storage=str(tmp_path)))
    queue = ExporterQueue(exporter)
    await queue.start()
    assert not (tmp_path / "recorder.queue.db").exists()
    await queue.shutdown(5)
    assert exporter.span_names() == ["a", "b", "c"]
    assert {b.project for b in exporter.batches} == {"p1"}
