"""``sqlite``: spans, traces and calls in an embedded SQLite file (the default storage).

Each span is one row: the columns queries filter on (ids, name, kind, times, status,
call, project) plus the span's own protobuf bytes, from which attributes, events and
links are read back. Rows are written with ``INSERT OR IGNORE`` on
(project, trace id, span id), so a retried request stores nothing twice, and no row
needs its parent to exist first (LiveKit exports children before their parents).

Beside the spans, one transaction per batch keeps:

- ``resources`` / ``scopes``: each distinct resource and instrumentation scope once;
- ``traces``: a trace's extent, root span, service, call and whether it has an error
  (min/max/or updates, so a retry changes nothing);
- ``trace_search``: a full-text (FTS5) index from short scalar span and resource
  attributes to traces, which ``attr.KEY=VALUE`` and ``tag.KEY=VALUE`` search: one
  document per trace and batch, one term per (project, key, value) (see
  ``sqlite_query.search_term``). FTS5 appends sorted segments and merges them later, so
  indexing an attribute costs a fraction of a B-tree row per (key, value, trace);
- ``trace_names`` / ``call_traces``: the traces holding a span of a name / of a call;
- ``calls``: the extent, service and custom tags (``roark.project.tag.KEY``) of a call.

WAL mode, one writer thread; ``retention`` deletes data older than it. ``query_store()``
is the read side the query API uses (``exporters/sqlite_query.py``).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import sqlite3
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from collector import (
    ALL_SIGNALS,
    Duration,
    Exporter,
    ExporterConfig,
    Host,
    LogBatch,
    MetricBatch,
    PermanentError,
    QueueSettings,
    RetryableError,
    SpanBatch,
)
from collector.signals_storage import SQLiteSignalStore
from collector.storage import (  # re-exported: the query side and plugins read them here
    MAX_INDEXED_VALUE,
    NATIVE_SQLITE,
    STATUS_ERROR,
    TAG_PREFIX,
    attribute_text,
    expire_periodically,
)
from exporters.sqlite_query import SQLiteQueryStore
from exporters.sqlite_schema import SCHEMA, connect
from exporters.sqlite_writer import (
    _close_process_writer,
    _create_file,
    _expire_in_process,
    _start_process_writer,
    _write_in_process,
    _Writer,
)

log = logging.getLogger(__name__)


__all__ = [
    "MAX_INDEXED_VALUE",
    "NATIVE_SQLITE",
    "SCHEMA",
    "STATUS_ERROR",
    "TAG_PREFIX",
    "SQLiteConfig",
    "SQLiteExporter",
    "attribute_text",
    "connect",
]


class SQLiteQueueSettings(QueueSettings):
    num_consumers: int = Field(default=2, ge=1, le=64)
    """Two: while one consumer's batch is written, the other's waits on the writer's
    thread, which starts it the moment the first commits. With one, each next batch
    came only once the event loop had seen the commit and read the batch back, the
    writer idle meanwhile. The writer still writes one batch at a time, in the order
    they were taken."""


class SQLiteConfig(ExporterConfig):
    sending_queue: SQLiteQueueSettings = Field(default_factory=SQLiteQueueSettings)
    writer: Literal["thread", "process"] = "thread"
    """Where spans are turned into rows and written: a thread of the collector's process
    (lean: one process), or a process of its own, on another core than the receiver (more
    spans/s on a multi-core host, for a second interpreter's memory)."""
    path: Path = Path("./data/calltrace.db")
    retention: Duration = 0.0
    """Delete spans, traces and calls older than this (e.g. "720h"); 0 keeps everything."""
    retention_check_interval: Duration = 300.0
    """How often old data is looked for."""
    cache_size_mib: int = Field(default=16, ge=1)
    """SQLite page cache of the writer connection. Writes touch the ends of the indexes
    (see ``SCHEMA``), so a small one does: a larger one costs memory and gains little."""


class SQLiteExporter(Exporter):
    """Writes batches to SQLite; the query API reads the same file.

    SQLite allows one writer at a time, so one worker owns the writer connection and the
    event loop never waits on disk: a thread of this process (``writer: thread``, the
    default), or a process of its own (``writer: process``), whose Python work of turning
    spans into rows then runs on another core than the receiver's.
    """

    type_name = "sqlite"
    Config = SQLiteConfig
    config: SQLiteConfig
    signals = ALL_SIGNALS

    def __init__(self, component_id: str, config: SQLiteConfig):
        super().__init__(component_id, config)
        self._writer: _Writer | None = None
        self._pool: Executor | None = None
        self._retention_task: asyncio.Task[None] | None = None
        self._query_store: SQLiteQueryStore | None = None
        self._signal_store: SQLiteSignalStore | None = None

    def signal_store(self) -> SQLiteSignalStore:
        """Logs, metric points and recordings in this exporter's file (their own tables
        and connection: ``collector.signals_storage``)."""
        if self._signal_store is None:
            self._signal_store = SQLiteSignalStore(self.config.path)
        return self._signal_store

    async def export_logs(self, batch: LogBatch) -> None:
        await self._signal_write(self.signal_store().write_logs, batch)

    async def export_metrics(self, batch: MetricBatch) -> None:
        await self._signal_write(self.signal_store().write_metrics, batch)

    async def _signal_write(self, write: Any, batch: Any) -> None:
        try:
            await write(batch)
        except sqlite3.OperationalError as exc:  # locked, disk full, I/O: may pass
            raise RetryableError(f"{self.config.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise PermanentError(f"{self.config.path}: {exc}") from exc

    @property
    def path(self) -> Path:
        return self.config.path

    def query_store(self) -> SQLiteQueryStore:
        """The read side of this exporter's file, for the query API (read-only connections)."""
        if self._query_store is None:
            self._query_store = SQLiteQueryStore(self.config.path)
        return self._query_store

    async def start(self, host: Host) -> None:
        if self._pool is not None:
            return
        path, cache = self.config.path, self.config.cache_size_mib
        if self.config.writer == "process":
            # Schema and pragmas are created here, so a bad path fails start-up; the
            # writer process (~0.7 s to start an interpreter and import) starts in the
            # background and the first batch waits for it, not readiness.
            await asyncio.to_thread(_create_file, path)
            self._pool = self._writer_process()
            self._pool.submit(_expire_in_process, 0).add_done_callback(self._writer_started)
        else:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"calltrace-{self.id}")
            self._writer = await self._run(_Writer, path, cache)
        await self.signal_store().open()  # logs, metrics, recordings tables
        if self.config.retention:
            self._retention_task = asyncio.create_task(
                expire_periodically(
                    self.id,
                    self.config.retention,
                    self.config.retention_check_interval,
                    self.expire,
                )
            )

    def _writer_started(self, started: Any) -> None:
        if not started.cancelled() and started.exception() is not None:
            # The next export meets the same failure and retries (a new process).
            log.warning("%s: the writer process failed to start: %s", self.id, started.exception())

    async def _run(self, fn: Any, *args: Any) -> Any:
        assert self._pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def export(self, batch: SpanBatch) -> None:
        pool = self._pool
        if pool is None:
            raise RetryableError(f"{self.id} is not started")
        try:
            if self._writer is not None:
                await self._run(self._writer.write, batch)
            else:
                await self._run(_write_in_process, batch.project, batch.serialize())
        except BrokenProcessPool as exc:
            if self._pool is pool:  # (the other consumer's export may have restarted it)
                self._restart_process()
            raise RetryableError(f"{self.id}: the writer process died: {exc}") from exc

    def _writer_process(self) -> ProcessPoolExecutor:
        """A pool of one process that owns the writer connection (spawned on first use)."""
        return ProcessPoolExecutor(
            1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_process_writer,
            initargs=(self.config.path, self.config.cache_size_mib),
        )

    def _restart_process(self) -> None:
        """A new writer process after one died (killed, out of memory): the batch is
        retried by the exporter helper; SQLite rolled back its half-written transaction."""
        old, self._pool = self._pool, self._writer_process()
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)

    async def expire(self, older_than_ns: int) -> int:
        """Delete traces that ended before ``older_than_ns`` with their spans, and old calls
        (and older log records, metric points and recordings); the spans deleted."""
        await self.signal_store().expire(older_than_ns)
        if self._writer is not None:
            return int(await self._run(self._writer.expire, older_than_ns))
        return int(await self._run(_expire_in_process, older_than_ns))

    async def shutdown(self) -> None:
        if self._signal_store is not None:
            await self._signal_store.close()
            self._signal_store = None
        if self._query_store is not None:
            await self._query_store.close()
            self._query_store = None
        if self._retention_task is not None:
            self._retention_task.cancel()
            await asyncio.gather(self._retention_task, return_exceptions=True)
            self._retention_task = None
        if self._pool is None:
            return
        try:
            if self._writer is not None:
                await self._run(self._writer.close)
            else:
                await self._run(_close_process_writer)
        except (BrokenProcessPool, sqlite3.Error) as exc:
            log.warning("%s: closing the writer: %s", self.id, exc)
        pool, self._pool, self._writer = self._pool, None, None
        pool.shutdown(wait=True)
