"""What every exporter gets for free: a bounded sending queue, consumers, retry with
exponential backoff and jitter, and an optional persistent queue on disk.

An exporter only turns a batch into a write. The helper in front of it accepts batches
without waiting for the destination, so a slow or dead exporter never blocks the
receiver or the other exporters. When a queue is full the pipeline refuses new data
(503 + Retry-After) instead of dropping accepted data or growing memory.

With ``sending_queue.storage: DIR`` queued batches are appended to a log in
``DIR/{exporter}.queue/`` (segment files, each unlinked once its batches are delivered)
before the request is answered, so a crash or restart delivers them later. Every read
and write of the log runs on a thread of its own: a write may wait on the disk (the
kernel throttles writers when dirty pages pile up), and the event loop goes on
receiving in the meantime. An SQLite queue file (``{exporter}.queue.db``) an older
calltrace left is moved into the log at start.

Queued batches are held serialized (an ``ExportTraceServiceRequest`` body), not as
parsed messages: about a fifth of the memory, and no objects for the cyclic garbage
collector to scan. Serialized requests concatenate into one valid request, so merging
queued batches is a ``join``; the exporter gets them as a ``SpanBatch`` that is parsed
only if it asks for messages. The one exception is a batch put on a queue where nothing
waits (the first queue of a pipeline): it is exported next, so the batch itself is
handed over, without a parse.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import random
import re
import sqlite3
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from collector.components import (
    ComponentConfig,
    Exporter,
    PermanentError,
    RefusedError,
    RetryableError,
)
from collector.spans import SpanBatch
from collector.units import Duration

if TYPE_CHECKING:
    from collector.telemetry import Telemetry

log = logging.getLogger(__name__)

__all__ = [
    "ExporterConfig",
    "ExporterQueue",
    "QueueSettings",
    "RetrySettings",
]


class QueueSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    num_consumers: int = Field(default=1, ge=1, le=64)
    queue_size: int = Field(default=100_000, ge=1)
    """Capacity in spans."""
    batch_max_spans: int = Field(default=4096, ge=1)
    """A consumer merges queued batches of one project up to this many spans per export
    (a persistent queue keeps twice as many in memory, the rest on disk). 8192 made the
    bench's flood peak ~20 MiB higher for no more spans/s."""
    storage: Path | None = None
    """Directory for a persistent queue; None keeps the queue in memory."""


class RetrySettings(BaseModel):
    """Retry with exponential backoff and jitter, as the OpenTelemetry Collector's
    exporter helper names it; ``max_elapsed_time`` bounds an exporter's failure streak."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    initial_interval: Duration = 0.1
    max_interval: Duration = 5.0
    multiplier: float = Field(default=1.5, ge=1.0)
    randomization_factor: float = Field(default=0.5, ge=0.0, le=1.0)
    max_elapsed_time: Duration = 300.0
    """The Collector's default; 0: retry retryable errors until delivered."""


UNEXPECTED_ERROR_MAX_ELAPSED = 300.0
"""How long an unexpected exception is retried when ``max_elapsed_time`` is 0."""


class ExporterConfig(ComponentConfig):
    """Base config for exporters: the helper's ``sending_queue`` and ``retry_on_failure``."""

    sending_queue: QueueSettings = Field(default_factory=QueueSettings)
    retry_on_failure: RetrySettings = Field(default_factory=RetrySettings)
    timeout: Duration = 30.0


_Outcome = Literal["sent", "permanent", "gave_up"]
_T = TypeVar("_T")


class _KeptForNextStart(Exception):
    """A consumer stops: its batch failed while shutting down and stays on disk."""


def _failure_reason(exc: Exception) -> str:
    """The ``reason`` label of a failed export attempt that may be retried."""
    if isinstance(exc, RetryableError):
        return "retryable"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "unexpected"


class _QueueItem:
    __slots__ = ("batch", "key", "metadata", "payload", "project", "received_ns", "spans")

    def __init__(
        self,
        payload: bytes | None,
        spans: int,
        project: str | None,
        metadata: dict[str, str] | None = None,
        received_ns: int = 0,
        key: int | None = None,
    ):
        self.payload = payload  # a serialized ExportTraceServiceRequest; None: on disk only
        self.spans = spans
        self.project = project
        self.metadata = metadata or {}
        self.received_ns = received_ns
        self.key = key  # its key in the persistent queue
        self.batch: SpanBatch | None = None  # the pipeline's batch itself, handed over


_BATCH = 1
_DELETED = 2
_HEAD = struct.Struct("<BQIII")
"""A record's header but its CRC: type, key, spans, project length, body length."""
_CRC = struct.Struct("<I")
_HEADER = struct.Struct(_HEAD.format + _CRC.format[1:])
_NO_PROJECT = 0xFFFFFFFF
"""The project length of a batch without a project (``None``, not ``""``)."""
_SEGMENT = re.compile(r"[0-9]{10}\.log")
_SEGMENT_BYTES = 64 << 20


def _open_segment(path: Path, create: bool = False) -> int:
    """A descriptor to append to (every segment may take "deleted" records) and pread."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
    return os.open(path, flags, 0o666)


class _Segment:
    """One file of the log, open for appending (and ``pread``) while it is kept."""

    __slots__ = ("fd", "live", "number", "path", "size")

    def __init__(self, number: int, path: Path, fd: int, size: int = 0):
        self.number = number
        self.path = path
        self.fd = fd
        self.size = size  # the end of its last whole record: where the next one goes
        self.live = 0  # batches in it not deleted


class _DiskQueue:
    """An append-only log of serialized batches, in segment files of ~64 MiB in
    ``DIR/{exporter}.queue/``; a segment is unlinked once every batch in it is deleted.

    A record is a header (type, key, spans, project length, body length, CRC32 of the
    rest of the header and the body), then the project (UTF-8) and the body: a batch's
    serialized request, or for a "deleted" record the keys it deletes (written to the
    segment holding those batches: see ``delete``). Each record is
    one ``writev`` on an ``O_APPEND`` descriptor, and nothing is fsynced: an appended
    batch survives a crash of the process, not necessarily one of the machine, the
    guarantee the SQLite queue file had (WAL with ``synchronous=NORMAL``). A record cut
    short by a crash fails its length or CRC check and is cut off at the next start.
    Each batch's bytes are written once, where the SQLite file wrote them to its WAL,
    copied them into the database and wrote pages again to delete them.

    Only keys and file offsets are kept in memory. A start reads and checks every
    record (a backlog of a few GiB takes seconds); a ``.queue.db`` file an older
    calltrace left is moved into the log then.

    The methods block; ``ExporterQueue`` calls them through ``run`` (all but ``load`` at
    start-up), so they run one at a time, in order, on the queue's own thread.
    """

    def __init__(self, directory: Path, name: str, segment_bytes: int = _SEGMENT_BYTES):
        directory.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        # ``workers: N`` runs N processes with one config: each keeps its own log, or
        # two workers would deliver (and delete) the same batches.
        worker = os.environ.get("CALLTRACE_WORKER")
        suffix = f".worker{worker}" if worker else ""
        self.path = directory / f"{safe}{suffix}.queue"
        self.path.mkdir(exist_ok=True)
        # Offsets are known only to the one process appending: a second process on the
        # same log (two instances sharing a config's directory) would read wrong bytes.
        # The lock goes with the process, so a killed one holds it no more.
        self._lock = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise RuntimeError(
                f"{self.path} is in use by another process: give each calltrace instance"
                " a sending_queue.storage of its own"
            ) from None
        self.segment_bytes = segment_bytes
        self._segments: dict[int, _Segment] = {}  # by number, oldest first
        self._index: dict[int, tuple[_Segment, int, int]] = {}
        """Live batches: key -> (segment, offset of the payload, its length)."""
        self._current: _Segment | None = None  # where batches are appended
        self._next_key = 1
        self._next_segment = 1
        self._left: list[tuple[int, str | None, int]] = []  # (key, project, spans) for load
        try:
            self._recover()
            legacy = directory / f"{safe}{suffix}.queue.db"
            if legacy.exists():
                self._migrate(legacy)
        except BaseException:
            self._close_files()
            raise
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"calltrace-queue-{safe}")

    def run(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """``fn(*args)`` on the queue's thread, after every call submitted before it."""
        return asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def append(self, project: str | None, spans: int, payload: bytes) -> int:
        segment = self._current
        if segment is None or segment.size >= self.segment_bytes:
            if segment is not None and segment.live == 0:
                self._unlink(segment)
            segment = self._current = self._start_segment()
        return self._append(segment, project, spans, payload)

    def load(self) -> list[_QueueItem]:
        """What a previous run left, without the payloads (read when exported)."""
        now = time.time_ns()
        left, self._left = self._left, []
        return [
            _QueueItem(None, spans, project, received_ns=now, key=key)
            for key, project, spans in left
            if key in self._index
        ]

    def payload(self, key: int) -> bytes:
        segment, offset, length = self._index[key]
        data = os.pread(segment.fd, length, offset)
        if len(data) != length:
            raise OSError(f"{segment.path}: batch {key} cut short ({len(data)} of {length} bytes)")
        return data

    def payloads(self, keys: list[int]) -> list[bytes]:
        """``payload`` of each key, in one call: one trip to the queue's thread for a
        whole merge, not one per batch behind the appends queued there."""
        return [self.payload(key) for key in keys]

    def delete(self, keys: list[int]) -> None:
        by_segment: dict[_Segment, list[int]] = {}
        for key in keys:
            entry = self._index.pop(key, None)
            if entry is not None:
                by_segment.setdefault(entry[0], []).append(key)
        failure: OSError | None = None
        for segment, deleted in by_segment.items():
            segment.live -= len(deleted)
            if segment.live == 0 and segment is not self._current:
                self._unlink(segment)  # no record needed: the batches go with the file
                continue
            # The record goes into the segment that holds the batches, not the current
            # one: a segment then answers for its batches alone, and unlinking one can
            # never bring back batches that records kept in it had deleted.
            body = struct.pack(f"<{len(deleted)}Q", *deleted)
            head = _HEAD.pack(_DELETED, 0, 0, 0, len(body))
            try:
                self._write(segment, [head, _CRC.pack(zlib.crc32(body, zlib.crc32(head))), body])
            except OSError as exc:  # the other segments' records are still written
                failure = failure or exc
        if failure is not None:
            raise failure

    async def close(self) -> None:
        """Close the files once the calls already submitted are done, then the thread."""
        await self.run(self._close)
        self._thread.shutdown()

    def _close(self) -> None:
        current = self._current
        if current is not None and current.live == 0:
            self._unlink(current)  # a drained queue leaves no file behind
        self._close_files()

    def _close_files(self) -> None:
        for segment in self._segments.values():
            os.close(segment.fd)
        self._segments.clear()
        self._current = None
        os.close(self._lock)

    def _append(self, segment: _Segment, project: str | None, spans: int, payload: bytes) -> int:
        key = self._next_key
        text = b"" if project is None else project.encode()
        length = _NO_PROJECT if project is None else len(text)
        head = _HEAD.pack(_BATCH, key, spans, length, len(payload))
        crc = _CRC.pack(zlib.crc32(payload, zlib.crc32(text, zlib.crc32(head))))
        offset = self._write(segment, [head, crc, text, payload])
        self._next_key = key + 1
        self._index[key] = (segment, offset + _HEADER.size + len(text), len(payload))
        segment.live += 1
        return key

    def _write(self, segment: _Segment, parts: list[bytes]) -> int:
        """Append one record to ``segment``; returns its offset."""
        offset, size = segment.size, sum(map(len, parts))
        try:
            written = os.writev(segment.fd, parts)
            if written < size:  # a regular file writes short only when the disk fills
                rest = memoryview(b"".join(parts))[written:]
                while rest:
                    count = os.write(segment.fd, rest)
                    if count == 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(segment.path))
                    rest = rest[count:]
        except OSError:
            os.ftruncate(segment.fd, offset)  # no half record for the next one to follow
            raise
        segment.size = offset + size
        return offset

    def _start_segment(self, temporary: bool = False) -> _Segment:
        number = self._next_segment
        self._next_segment += 1
        path = self.path / f"{number:010d}.log{'.tmp' if temporary else ''}"
        segment = _Segment(number, path, _open_segment(path, create=True))
        if not temporary:  # (a migration's segments join once renamed)
            self._segments[number] = segment
        return segment

    def _unlink(self, segment: _Segment) -> None:
        os.close(segment.fd)
        segment.path.unlink()
        self._segments.pop(segment.number, None)
        if segment is self._current:
            self._current = None

    def _recover(self) -> None:
        """Read the segments a previous run left: rebuild the live batches, cut off a
        record a crash cut short, unlink segments with no batch left."""
        for leftover in self.path.glob("*.log.tmp"):  # a migration cut short: it runs again
            leftover.unlink()
        numbers = sorted(
            int(p.name[:10]) for p in self.path.iterdir() if _SEGMENT.fullmatch(p.name)
        )
        left: dict[int, tuple[str | None, int]] = {}
        for number in numbers:
            path = self.path / f"{number:010d}.log"
            segment = _Segment(number, path, _open_segment(path))
            self._segments[number] = segment
            self._next_segment = number + 1
            for kind, key, spans, project, offset, length, keys in self._scan(segment):
                self._next_key = max(self._next_key, key + 1)
                if kind == _BATCH:
                    self._index[key] = (segment, offset, length)
                    left[key] = (project, spans)
                    segment.live += 1
                    continue
                for deleted in keys:
                    entry = self._index.get(deleted)
                    if entry is not None and entry[0] is segment:  # (see ``delete``)
                        del self._index[deleted]
                        del left[deleted]
                        segment.live -= 1
            if segment.live == 0:
                self._unlink(segment)
        self._left = [(key, project, spans) for key, (project, spans) in left.items()]
        if self._segments:
            last = self._segments[max(self._segments)]
            if last.size < self.segment_bytes:
                self._current = last

    def _scan(
        self, segment: _Segment
    ) -> Iterator[tuple[int, int, int, str | None, int, int, tuple[int, ...]]]:
        """The records of a segment: (type, key, spans, project, payload offset, payload
        length, deleted keys). Stops at the first record that is not whole and valid,
        and truncates the file there: only a crash mid-write leaves one."""
        fd, end = segment.fd, os.fstat(segment.fd).st_size
        offset = 0
        while offset < end:
            head = os.pread(fd, _HEADER.size, offset)
            if len(head) < _HEADER.size:
                break
            kind, key, spans, length, size, crc = _HEADER.unpack(head)
            text = 0 if length == _NO_PROJECT else length
            start = offset + _HEADER.size
            # A "deleted" record has no project and a body of whole u64 keys.
            valid = kind == _BATCH or (kind == _DELETED and length == 0 and size % 8 == 0)
            if not valid or start + text + size > end:
                break
            body = os.pread(fd, text + size, start)
            if zlib.crc32(body, zlib.crc32(head[: _HEAD.size])) != crc:
                break
            if kind == _BATCH:
                project = None if length == _NO_PROJECT else body[:text].decode()
                yield kind, key, spans, project, start + text, size, ()
            else:
                yield kind, key, 0, None, 0, 0, struct.unpack(f"<{size // 8}Q", body)
            offset = start + text + size
        if offset < end:
            log.warning(
                "%s: dropping %d bytes from offset %d: a record cut short or damaged (as a"
                " crash while it was being written leaves one)",
                segment.path,
                end - offset,
                offset,
            )
            os.ftruncate(fd, offset)
        segment.size = offset

    def _migrate(self, legacy: Path) -> None:
        """Move the batches of an older calltrace's SQLite queue file into the log, in
        order, after what the log holds, then remove the file.

        They are written to ``.tmp`` segments, fsynced (a one-off, so that the machine
        crashing cannot lose the whole backlog once the old file is gone), renamed, and
        only then is the old file removed: a crash before the renames leaves the old
        file to move again at the next start; one between the renames and the removal
        delivers those batches twice, as a crash between an export and its delete does.
        """
        db = sqlite3.connect(legacy)  # reads a -wal file a crash left, too
        written: list[_Segment] = []
        moved: list[tuple[int, str | None, int]] = []
        try:
            segment: _Segment | None = None
            # A crash right after the old queue created its file left it without the table.
            exists = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'queue'").fetchone()
            query = "SELECT project, spans, payload FROM queue ORDER BY id"
            rows = db.execute(query) if exists else []
            for project, spans, payload in rows:
                if segment is None or segment.size >= self.segment_bytes:
                    segment = self._start_segment(temporary=True)
                    written.append(segment)
                moved.append(
                    (self._append(segment, project, spans, bytes(payload)), project, spans)
                )
            for segment in written:
                os.fsync(segment.fd)
        except BaseException:
            for segment in written:
                os.close(segment.fd)
                segment.path.unlink()
            for key, _, _ in moved:
                del self._index[key]
            raise
        finally:
            db.close()
        for segment in written:
            final = segment.path.with_suffix("")
            segment.path.rename(final)
            segment.path = final
            self._segments[segment.number] = segment
        if written:
            directory = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            self._current = written[-1]
        self._left.extend(moved)
        for path in (
            legacy,
            legacy.with_name(legacy.name + "-wal"),
            legacy.with_name(legacy.name + "-shm"),
        ):
            path.unlink(missing_ok=True)
        log.info("%d batches moved from %s to %s", len(moved), legacy, self.path)


class ExporterQueue:
    """The sending queue and retry loop in front of one exporter, for one signal.

    ``signal`` (``traces``, ``logs``, ``metrics``) picks the batch type the queued bytes
    are parsed into and the exporter's method (``export``, ``export_logs``,
    ``export_metrics``); an exporter in pipelines of several signals has a queue for
    each, with the same settings (a persistent one in ``DIR/{exporter}.{signal}.queue``
    for logs and metrics)."""

    def __init__(
        self, exporter: Exporter, telemetry: Telemetry | None = None, signal: str = "traces"
    ):
        from collector.signals import batch_type

        config: Any = exporter.config
        self.exporter = exporter
        self.signal = signal
        self._batch_type = batch_type(signal)
        # Looked up on each export, not bound here: a wrapper put on the exporter after
        # the service was built (collector.testing records exports so) is honoured.
        self._export_method = "export" if signal == "traces" else f"export_{signal}"
        self.queue_settings: QueueSettings = getattr(config, "sending_queue", QueueSettings())
        self.retry: RetrySettings = getattr(config, "retry_on_failure", RetrySettings())
        self.timeout: float = getattr(config, "timeout", 30.0)
        self.telemetry = telemetry
        self._items: deque[_QueueItem] = deque()
        self._queued_spans = 0
        self._in_flight = 0
        self._storing = 0
        """Items being written to the persistent queue (counted in ``_queued_spans``)."""
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._consumers: list[asyncio.Task[None]] = []
        self._closing = False
        self._shutting_down = asyncio.Event()
        self._disk: _DiskQueue | None = None
        self._failing_since: float | None = None
        """When the exporter's current failure streak began (monotonic); None after a
        success."""
        self._unexpected_since: float | None = None
        """When its first unexpected exception since its last success happened."""
        self._shedding = False
        """Whether its full queue drops new batches (``past_budget``), logged once."""

    @property
    def id(self) -> str:
        if self.signal == "traces":
            return self.exporter.id
        return f"{self.exporter.id}.{self.signal}"

    @property
    def size(self) -> int:
        """Spans waiting or being exported."""
        return self._queued_spans

    @property
    def capacity(self) -> int:
        return self.queue_settings.queue_size

    HIGH_WATER = 0.95
    """Above this share of its capacity a queue refuses requests before they are read."""

    def nearly_full(self) -> bool:
        return (
            self.queue_settings.enabled
            and self._queued_spans >= self.HIGH_WATER * self.capacity
            and not self.past_budget()
        )

    def has_room(self, spans: int) -> bool:
        """Whether ``enqueue`` takes ``spans`` more: queued, or shed (see ``past_budget``)."""
        if not self.queue_settings.enabled:
            return True
        # A batch larger than the whole queue is admitted when the queue is empty, so an
        # oversized request cannot be refused forever.
        return self._fits(spans) or self.past_budget()

    def _fits(self, spans: int) -> bool:
        return self._queued_spans == 0 or self._queued_spans + spans <= self.capacity

    def past_budget(self) -> bool:
        """Whether the exporter has failed for longer than ``retry_on_failure`` allows
        since its last success. Its full queue then sheds new batches (dropped for this
        exporter alone, counted) instead of refusing requests, so it stops the other
        exporters no longer than its retry policy; with ``max_elapsed_time: 0`` only
        after an unexpected exception's bound."""
        now = time.monotonic()
        limit = self.retry.max_elapsed_time
        if limit and self._failing_since is not None and now - self._failing_since > limit:
            return True
        since = self._unexpected_since
        return since is not None and now - since > (limit or UNEXPECTED_ERROR_MAX_ELAPSED)

    def _shed(self, spans: int) -> None:
        if not self._shedding:
            self._shedding = True
            log.error(
                "%s: has failed for longer than its retry_on_failure budget and its queue is"
                " full: new batches are dropped for it until an export succeeds",
                self.id,
            )
        self._count_failed(spans)

    async def start(self) -> None:
        storage = self.queue_settings.storage
        if storage is not None:
            self._disk = _DiskQueue(Path(storage), self.id)
            recovered = self._disk.load()
            for item in recovered:
                self._push(item)
            if recovered:
                log.info("%s: %d batches recovered from %s", self.id, len(recovered), storage)
        for _ in range(self.queue_settings.num_consumers):
            self._consumers.append(asyncio.create_task(self._consume()))

    async def put(
        self,
        batch: SpanBatch,
        spans: int | None = None,
        payload: bytes | None = None,
        hand_over: bool = False,
    ) -> None:
        """Queue ``batch`` (persisted first when a storage dir is set), or export it now
        when the queue is disabled. ``payload`` is the batch already serialized (by
        ``SpanBatch.serialize``), when the caller fans one batch out to several
        queues. ``hand_over``: the caller gives up ``batch``'s messages (edits them no
        more, gives them to no other queue), so the queue may export them as they are."""
        spans = batch.span_count if spans is None else spans
        if not self.queue_settings.enabled:
            await self._export_with_retry(batch, spans)
            return
        stored = self.enqueue(batch, spans, payload, hand_over)
        if stored is not None:
            await asyncio.shield(stored)

    def enqueue(
        self,
        batch: SpanBatch,
        spans: int,
        payload: bytes | None = None,
        hand_over: bool = False,
    ) -> asyncio.Future[None] | None:
        """Queue ``batch`` on an enabled queue, checking for room and counting its spans
        at once; with a persistent queue, returns a future done once the batch is on
        disk (the item joins the queue then, whoever waits for it or not), else None.
        ``hand_over`` as for ``put``.

        Refuses (``RefusedError``) before any await, so ``FanOut`` can queue a batch on
        every exporter's queue or on none."""
        if self._closing:
            raise RefusedError(f"exporter {self.id} is shutting down", retry_after=5.0)
        if not self.has_room(spans):
            raise RefusedError(f"sending queue of exporter {self.id} is full")
        if not self._fits(spans):  # past its budget: shed, do not refuse
            self._shed(spans)
            return None
        item = _QueueItem(payload, spans, batch.project, batch.metadata, batch.received_ns)
        near_head = self._queued_spans < 2 * self.queue_settings.batch_max_spans
        if hand_over and not self._items and not self._storing:
            # Nothing waits: the consumer exports this batch next, so keep it rather than
            # parse its bytes back. Only then: parsed messages take about three times the
            # memory of their bytes, too much for a backlog.
            item.batch = batch
            if self._disk is None:
                item.payload = None  # in memory only: the batch has its bytes if asked
                self._push(item)
                return None
        if payload is None:
            payload = item.payload = batch.serialize()
        if self._disk is None:
            self._push(item)
            return None
        # Far from the head the bytes wait on disk only, so a persistent queue can hold
        # a long outage's worth of spans in bounded memory; near it, they are in memory
        # (as bytes or as messages) for the consumer.
        keep_payload = near_head and item.batch is None
        self._queued_spans += spans  # room is taken now; the item joins once on disk
        self._storing += 1
        self._idle.clear()
        written = self._disk.run(self._disk.append, item.project, spans, payload)
        stored: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_disk(written: asyncio.Future[int]) -> None:
            self._storing -= 1
            failure = None if written.cancelled() else written.exception()
            if written.cancelled() or failure is not None:
                self._queued_spans -= spans
                self._report_size()
                self._set_idle_if_idle()
                if stored.done():  # cancelled by its waiter
                    pass
                elif failure is not None:
                    stored.set_exception(failure)
                else:
                    stored.cancel()
                return
            item.key = written.result()
            if not keep_payload:
                item.payload = None
            self._push(item, counted=True)
            if not stored.done():
                stored.set_result(None)

        # Callbacks of one thread's futures run in the order the writes finished, which
        # is the order they were submitted: items join the queue in order.
        written.add_done_callback(on_disk)
        return stored

    def _push(self, item: _QueueItem, counted: bool = False) -> None:
        self._items.append(item)
        if not counted:
            self._queued_spans += item.spans
        self._idle.clear()
        self._wakeup.set()
        self._report_size()

    def _set_idle_if_idle(self) -> None:
        if not self._items and self._in_flight == 0 and self._storing == 0:
            self._idle.set()

    def _report_size(self) -> None:
        if self.telemetry is not None:
            self.telemetry.exporter_queue(self.id, self._queued_spans, self.capacity)

    def _take(self) -> list[_QueueItem]:
        """The oldest item, plus following items of the same project up to the span limit."""
        first = self._items.popleft()
        taken, spans = [first], first.spans
        limit = self.queue_settings.batch_max_spans
        while self._items:
            nxt = self._items[0]
            if nxt.project != first.project or spans + nxt.spans > limit:
                break
            taken.append(self._items.popleft())
            spans += nxt.spans
        return taken

    async def _consume(self) -> None:
        while True:
            while not self._items:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            items = self._take()
            self._in_flight += 1
            spans = sum(item.spans for item in items)
            try:
                batch = await self._parse(items)
                outcome = await self._export_with_retry(batch, spans, count_failed=len(items) == 1)
                if outcome == "permanent" and len(items) > 1:
                    # One request's bad data must not drop the others merged with it.
                    for item in items:
                        await self._export_with_retry(await self._parse([item]), item.spans)
                disk = self._disk
                if disk is not None:
                    # Not awaited: on the queue's thread the record waits behind the
                    # appends of new requests, and the next export need not wait for
                    # it (the writer sat idle meanwhile). The thread runs the deletes
                    # in order, and the queue's close after them.
                    deleted = disk.run(disk.delete, [i.key for i in items if i.key is not None])
                    deleted.add_done_callback(self._deleted)
            except asyncio.CancelledError:
                # Shut down while retrying: put the items back (they stay on disk too).
                for item in reversed(items):
                    self._items.appendleft(item)
                raise
            except _KeptForNextStart:
                for item in reversed(items):
                    self._items.appendleft(item)
                return
            finally:
                self._in_flight -= 1
            self._queued_spans -= spans
            self._report_size()
            self._set_idle_if_idle()

    def _deleted(self, deleted: asyncio.Future[None]) -> None:
        failure = None if deleted.cancelled() else deleted.exception()
        if failure is not None:  # they will be delivered again after a restart
            log.error(
                "%s: could not remove delivered batches from disk",
                self.id,
                exc_info=(type(failure), failure, failure.__traceback__),
            )

    async def _parse(self, items: list[_QueueItem]) -> SpanBatch:
        """The queued items as one batch: a handed-over batch as it is, else their bytes
        joined (serialized requests concatenate into one), parsed only if the exporter
        asks for messages."""
        first = items[0]
        # Request metadata describes one request: a merge of several carries none.
        metadata = dict(first.metadata) if len(items) == 1 else {}
        if len(items) == 1 and first.batch is not None:
            return first.batch
        joined = b"".join(await self._payloads(items))
        spans = sum(item.spans for item in items)
        batch: SpanBatch = self._batch_type.from_bytes(
            joined, first.project, metadata, first.received_ns, spans
        )
        return batch

    async def _payloads(self, items: list[_QueueItem]) -> list[bytes]:
        """The items' serialized batches: kept in memory, made from a handed-over batch,
        or read back from the queue's log, all in one trip to its thread (one a batch,
        the writer waited ~3 ms for each under load: the thread answers after the appends
        queued before, and the event loop after the requests it is handling)."""
        on_disk = [item.key for item in items if item.payload is None and item.batch is None]
        read: Iterator[bytes] = iter(())
        if on_disk:
            assert self._disk is not None and None not in on_disk
            read = iter(await self._disk.run(self._disk.payloads, on_disk))  # type: ignore[arg-type]
        payloads = []
        for item in items:
            if item.payload is not None:
                payloads.append(item.payload)
            elif item.batch is not None:
                payloads.append(item.batch.serialize())
            else:
                payloads.append(next(read))
        return payloads

    async def _export_with_retry(
        self, batch: SpanBatch, spans: int, count_failed: bool = True
    ) -> _Outcome:
        """Export until delivered, refused for good (a permanent error: logged, counted,
        dropped) or given up on (the retry budget spent). ``count_failed=False`` leaves
        logging and counting a permanent error to the caller, who then exports a merged
        batch's parts one by one.

        The budget: a failed attempt is retried after ``initial_interval``, each wait
        ``multiplier`` times the last (at most ``max_interval``) and jittered by
        ``randomization_factor``. The batch is given up on (dropped, counted in
        ``calltrace_exporter_send_failed_spans``) once its next wait would end more than
        ``max_elapsed_time`` after its own first attempt or after the first failure since
        the exporter's last success, whichever came first: an exporter that has failed
        that long gets one attempt per batch until one succeeds, so its queue drains
        instead of filling. ``max_elapsed_time: 0`` retries ``RetryableError`` and
        timeouts until delivered; an unexpected exception (neither of the exporter API's
        errors: a bug) is never retried without bound, only up to ``max_elapsed_time`` or,
        when that is 0, ``UNEXPECTED_ERROR_MAX_ELAPSED``.

        Every failed attempt is counted in ``calltrace_exporter_errors`` by reason. An
        unexpected exception is logged with its traceback once per failure streak (the
        failures since the exporter's last success), later ones in a line. While the
        queue shuts down an unexpected exception is not retried: a persistent queue
        keeps the batch for the next start (``_KeptForNextStart``), else it is dropped."""
        started = time.monotonic()
        first_unexpected: float | None = None
        interval = self.retry.initial_interval
        attempt = 0
        while True:
            attempt += 1
            t0 = time.perf_counter()
            try:
                export = getattr(self.exporter, self._export_method)
                await asyncio.wait_for(export(batch), self.timeout or None)
            except PermanentError as exc:
                self._count_error("permanent")
                if count_failed:
                    log.error("%s: dropping %d spans, permanent error: %s", self.id, spans, exc)
                    self._count_failed(spans)
                return "permanent"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # retryable, timeouts and unexpected errors
                reason = _failure_reason(exc)
                self._count_error(reason)
                now = time.monotonic()
                if self._failing_since is None:
                    self._failing_since = now
                unexpected = reason == "unexpected"
                if unexpected:
                    if first_unexpected is None:
                        first_unexpected = now
                    if self._unexpected_since is None:
                        self._unexpected_since = now
                        log.error(
                            "%s: export raised an unexpected %s (retried per"
                            " retry_on_failure; further ones are logged without traceback)",
                            self.id,
                            type(exc).__name__,
                            exc_info=exc,
                        )
                    if self._closing:
                        if self._disk is not None and self.queue_settings.enabled:
                            log.warning(
                                "%s: export failed while shutting down: %r; %d spans stay"
                                " in the persistent queue",
                                self.id,
                                exc,
                                spans,
                            )
                            raise _KeptForNextStart from exc
                        log.error(
                            "%s: dropping %d spans, export failed while shutting down: %r",
                            self.id,
                            spans,
                            exc,
                        )
                        self._count_failed(spans)
                        return "gave_up"
                delay = interval * (1 + self.retry.randomization_factor * (2 * random.random() - 1))
                if isinstance(exc, RetryableError) and exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)  # throttled: no sooner than asked
                if unexpected:
                    assert first_unexpected is not None and self._unexpected_since is not None
                    since = min(first_unexpected, self._unexpected_since)
                    limit = self.retry.max_elapsed_time or UNEXPECTED_ERROR_MAX_ELAPSED
                else:
                    since = min(started, self._failing_since)
                    limit = self.retry.max_elapsed_time
                if not self.retry.enabled or (limit and now + delay - since > limit):
                    log.error(
                        "%s: dropping %d spans after %d attempts: %r", self.id, spans, attempt, exc
                    )
                    self._count_failed(spans)
                    return "gave_up"
                log.warning(
                    "%s: export failed (attempt %d), retrying in %.2fs: %r",
                    self.id,
                    attempt,
                    delay,
                    exc,
                )
                if self.telemetry is not None:
                    self.telemetry.exporter_retry(self.id)
                await self._pause(delay)
                interval = min(interval * self.retry.multiplier, self.retry.max_interval)
                continue
            self._failing_since = self._unexpected_since = None
            self._shedding = False
            if self.telemetry is not None:
                self.telemetry.exporter_sent(self.id, spans, time.perf_counter() - t0)
            return "sent"

    async def _pause(self, delay: float) -> None:
        """Wait ``delay`` seconds before a retry, or until the queue starts to shut down
        (then an unexpected exception is given up on at once)."""
        if self._closing:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._shutting_down.wait(), delay)

    def _count_failed(self, spans: int) -> None:
        if self.telemetry is not None:
            self.telemetry.exporter_failed(self.id, spans)

    def _count_error(self, reason: str) -> None:
        if self.telemetry is not None:
            self.telemetry.exporter_error(self.id, reason)

    async def _drained(self, timeout: float) -> bool:
        """Wait until the queue is empty or every consumer has stopped (a persistent
        queue's consumers stop on an unexpected exception while shutting down); False
        if ``timeout`` passed first."""
        idle = asyncio.ensure_future(self._idle.wait())
        waiters: set[asyncio.Future[Any]] = {idle}
        if self._consumers:
            waiters.add(asyncio.ensure_future(asyncio.wait(self._consumers)))
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
        return bool(done)

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Deliver what is queued (up to ``timeout``), then stop the consumers.

        A persistent queue keeps whatever is left for the next start.
        """
        self._closing = True
        self._shutting_down.set()
        self._wakeup.set()
        drained = await self._drained(timeout)
        if self._queued_spans:
            log.log(
                logging.WARNING if drained else logging.ERROR,
                "%s: %s with %d spans undelivered%s",
                self.id,
                "stopped" if drained else "shutdown timed out",
                self._queued_spans,
                " (kept in the persistent queue for the next start)" if self._disk else "",
            )
        # Cancel until done: a client library that swallows a cancellation (redis-py
        # may, mid-reconnect) must not hang shutdown.
        pending = {task for task in self._consumers if not task.done()}
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        await asyncio.gather(*self._consumers, return_exceptions=True)
        self._consumers.clear()
        disk, self._disk = self._disk, None
        if disk is not None:
            await disk.close()
