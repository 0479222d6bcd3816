"""The SQLite files calltrace writes: connections with its settings, the write lock a
process's connections to one file share, the writer's own handle that runs a whole
transaction in C, WAL checkpoints on a thread of their own, and the exceptions Python's
``sqlite3`` raises for SQLite's result codes."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from collector.wire import NATIVE_SQLITE
from collector.wire import native as _wire

__all__ = [
    "BackgroundCheckpointer",
    "SQLiteWriter",
    "file_of",
    "open_sqlite",
    "sqlite_error",
    "write_lock",
]

# The storage modules' one logger, whichever of them logs.
log = logging.getLogger("collector.storage")


def open_sqlite(path: str | Path, busy_timeout_ms: int = 10_000) -> sqlite3.Connection:
    """A writable connection with calltrace's SQLite settings, shared by every file it
    keeps (spans, keys, call records, persistent queues): autocommit (transactions are
    explicit), usable from a worker thread, WAL with ``synchronous=NORMAL`` (durable
    across a crash of the process), and 16 KiB pages for a new file (span rows carry
    hundreds of bytes of protobuf, and larger pages make their inserts cheaper)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in _connection_pragmas(busy_timeout_ms):
        db.execute(pragma)
    return db


def _connection_pragmas(busy_timeout_ms: int) -> tuple[str, ...]:
    """What ``open_sqlite`` sets on a connection (``SQLiteWriter``'s handle too)."""
    return (
        "PRAGMA page_size=16384",  # only takes effect while the file is empty
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=NORMAL",
        f"PRAGMA busy_timeout={int(busy_timeout_ms)}",
    )


def file_of(db: sqlite3.Connection) -> str:
    """The path of the file ``db`` has open as ``main``."""
    return str(db.execute("PRAGMA database_list").fetchone()[2])


_WRITE_LOCKS: dict[str, threading.Lock] = {}


_WRITE_LOCKS_GUARD = threading.Lock()


def write_lock(path: str | Path) -> threading.Lock:
    """The lock this process's connections to the file at ``path`` hold around their
    write transactions (the sqlite exporter's writer, ``correlate``'s call records).

    SQLite lets one writer in at a time and makes the others poll, sleeping 1, 2, 5, 10,
    ... up to 100 ms between tries: in the default config, where the call records and
    the spans share a file, the span writer would sleep long after each call-record
    insert had finished, and a writer whose read began before the other's commit
    failed at once (``SQLITE_BUSY_SNAPSHOT``) and retried its batch. Waiting on this
    lock, the next writer starts the moment the other commits. Other processes still
    meet SQLite's own locking (``busy_timeout``)."""
    key = os.path.realpath(path)
    with _WRITE_LOCKS_GUARD:
        lock = _WRITE_LOCKS.get(key)
        if lock is None:
            lock = _WRITE_LOCKS[key] = threading.Lock()
        return lock


class BackgroundCheckpointer:
    """Copies a WAL file back into its database on a thread and connection of its own.

    SQLite's automatic checkpoint runs inside a writer's COMMIT, every ~1,000 pages, and
    ends with an fsync: most of a commit's cost, and latency spikes for every request
    whose batch waits behind it (a persistent queue's too). Here the
    writer's automatic checkpoint is off and ``PASSIVE`` checkpoints, which never block
    a writer and run in C without the GIL, follow its commits on another thread, at most
    one every ``interval`` seconds, so small commits (a 50-span request at a time) do not
    each pay for a checkpoint of their own. The WAL file is cut back to ``wal_limit`` bytes once a checkpoint caught up.
    """

    def __init__(
        self,
        writer: SQLiteWriter,
        path: str | Path,
        wal_limit: int = 64 << 20,
        interval: float = 0.05,
    ):
        writer.pragma("PRAGMA wal_autocheckpoint=0")
        writer.pragma(f"PRAGMA journal_size_limit={int(wal_limit)}")
        self._db = open_sqlite(path)
        self._due = threading.Event()
        self._closed = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="calltrace-checkpoint", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """A transaction was committed: checkpoint what it added, soon."""
        self._due.set()

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            if self._closed.is_set():
                return
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:  # busy or I/O: the next commit pokes again
                log.debug("checkpoint: %s", exc)
            self._closed.wait(self._interval)  # commits meanwhile wait for the next one

    def close(self) -> None:
        """Stop the thread (the writer's own close checkpoints what is left)."""
        self._closed.set()
        self._due.set()
        self._thread.join()
        self._db.close()


class SQLiteWriter:
    """The connection a writer's transactions run on, for one SQLite file.

    With the C extension (``NATIVE_SQLITE``): a SQLite handle of the writer's own
    (``collector._wire.SQLiteHandle``, ``sqlite3_open_v2`` on the file ``db`` has open,
    which WAL allows beside it), with ``db``'s settings (``open_sqlite``'s and those given
    to ``pragma``). A whole transaction runs on it, from ``begin`` to the ``COMMIT`` step,
    its rows bound in C with the GIL let go of once per call: executemany lets go of it
    around every row's step and takes it back after, and while the event loop holds it
    each row then waits up to the switch interval. Nothing of ``db`` itself is read
    in C. If the handle cannot be opened, or without the extension, the transactions run
    on ``db`` itself through sqlite3 (the same statements, the same results).

    Used by one thread at a time, as ``db`` is."""

    def __init__(self, db: sqlite3.Connection, busy_timeout_ms: int = 10_000):
        self.db = db
        self.filename = file_of(db)
        self._handle: Any = None
        if NATIVE_SQLITE:
            assert _wire is not None
            try:
                handle = _wire.SQLiteHandle(self.filename)
            except (OSError, RuntimeError, ValueError) as exc:
                log.warning("writing %s through sqlite3: %s", self.filename, exc)
            else:
                self._handle = handle
                for pragma in _connection_pragmas(busy_timeout_ms):
                    self._run(handle, [(pragma, None)])

    @property
    def native(self) -> bool:
        """Whether the transactions run on a handle of the writer's own, in C."""
        return self._handle is not None

    @property
    def in_transaction(self) -> bool:
        if self._handle is not None:
            return bool(self._handle.in_transaction)
        return self.db.in_transaction

    def pragma(self, sql: str) -> None:
        """Run a ``PRAGMA`` that sets something on both connections (``cache_size``)."""
        self.db.execute(sql).fetchall()
        if self._handle is not None:
            self._run(self._handle, [(sql, None)])

    def begin(self) -> None:
        self.execute_steps([("BEGIN", None)])

    def rollback(self) -> None:
        """Roll back the open transaction, if there is one (after an error)."""
        if self._handle is not None:
            if self._handle.in_transaction:
                self._run(self._handle, [("ROLLBACK", None)])
        elif self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def transaction(self, steps: list[Any]) -> None:
        """``steps`` (as ``execute_steps`` takes them) and a ``COMMIT``, in one
        transaction: rolled back if one fails."""
        self.begin()
        try:
            self.execute_steps([*steps, ("COMMIT", None)])
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.rollback()
            raise

    def execute_steps(self, steps: list[Any]) -> None:
        """Run ``steps`` in order: a ``(sql, None)`` step executes ``sql`` once
        (``BEGIN``, ``COMMIT``), ``(sql, rows)`` executes it for each row, and ``(sql,
        payload, project, plan)`` inserts the span rows that ``rows.span_plan``
        (``(payload, plan)``) leaves in the payload, ``sql`` taking a row of
        ``BatchRows.spans`` as parameters ?1-?14; ``(sql, payload, project, plan,
        seqs)`` also binds ?15 to the span's trace's value in ``seqs`` (trace id ->
        int). Raises what sqlite3 would. Without the handle, span steps cannot be given
        (``build_rows`` makes no plan) and the others go through executemany."""
        if self._handle is None:
            for sql, rows in steps:
                if rows is None:
                    self.db.execute(sql)
                else:
                    self.db.executemany(sql, rows)
            return
        self._run(self._handle, steps)

    def returned_ids(self, sql: str, rows: list[tuple[Any, ...]]) -> list[int]:
        """The integers ``sql`` returns (``RETURNING id``, or a ``SELECT``'s first
        column) for ``rows``, in order, with the GIL let go of once, not for every row."""
        if self._handle is None:
            return [int(r[0]) for row in rows for r in self.db.execute(sql, row).fetchall()]
        if not rows:
            return []
        assert _wire is not None
        outcome = _wire.execute_rows(self._handle, sql, rows, True)
        if isinstance(outcome, tuple):
            raise sqlite_error(*outcome)
        return list(outcome)

    @staticmethod
    def _run(handle: Any, steps: list[Any]) -> None:
        assert _wire is not None
        outcome = _wire.execute_steps(handle, steps)
        if outcome is not None:
            _step, code, message = outcome
            raise sqlite_error(code, message)

    def close(self) -> None:
        """Close the writer's own handle (``db`` is the caller's to close)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


# SQLite's primary result codes -> the exception Python's sqlite3 raises for them
# (Modules/_sqlite/util.c); the rest are OperationalError or, unknown, DatabaseError.
_SQLITE_ERRORS: dict[int, type[Exception]] = {
    2: sqlite3.InternalError,  # INTERNAL
    12: sqlite3.InternalError,  # NOTFOUND
    7: MemoryError,  # NOMEM
    11: sqlite3.DatabaseError,  # CORRUPT
    26: sqlite3.DatabaseError,  # NOTADB
    18: sqlite3.DataError,  # TOOBIG
    19: sqlite3.IntegrityError,  # CONSTRAINT
    20: sqlite3.IntegrityError,  # MISMATCH
    21: sqlite3.InterfaceError,  # MISUSE
    25: sqlite3.InterfaceError,  # RANGE
}


_SQLITE_OPERATIONAL = frozenset((1, 3, 4, 5, 6, 8, 9, 10, 13, 14, 15, 16, 17))


def sqlite_error(code: int, message: str) -> Exception:
    """The exception Python's sqlite3 module raises for SQLite's (extended) ``code``."""
    primary = code & 0xFF
    cls = _SQLITE_ERRORS.get(primary)
    if cls is None:
        cls = sqlite3.OperationalError if primary in _SQLITE_OPERATIONAL else sqlite3.DatabaseError
    error = cls(message)
    if isinstance(error, sqlite3.Error):
        error.sqlite_errorcode = code
    return error
