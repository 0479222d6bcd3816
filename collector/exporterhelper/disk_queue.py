"""The persistent queue's log: serialized batches appended to segment files in
``DIR/{exporter}.queue/`` (each unlinked once its batches are delivered), read back when
exported and after a restart. An SQLite queue file (``{exporter}.queue.db``) an older
calltrace left is moved into the log at start."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import re
import sqlite3
import struct
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

# The helper's one logger, whichever of its modules logs.
log = logging.getLogger("collector.exporterhelper")

_T = TypeVar("_T")


class _StoredBatch(NamedTuple):
    """A batch a previous run left in the log; its payload is read with ``payload(key)``."""

    key: int
    project: str | None
    spans: int


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

    def load(self) -> list[_StoredBatch]:
        """What a previous run left, without the payloads (read when exported)."""
        left, self._left = self._left, []
        return [
            _StoredBatch(key, project, spans) for key, project, spans in left if key in self._index
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
