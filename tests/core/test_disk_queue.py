"""The persistent sending queue's log (``_DiskQueue``) on real files: what one run
leaves, the next one finds, whatever order batches were deleted in, across segments,
after a crash mid-write, and after an upgrade from the SQLite queue file."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from collector.exporterhelper import _DiskQueue


@pytest.fixture(autouse=True)
def _one_worker(monkeypatch):
    monkeypatch.delenv("CALLTRACE_WORKER", raising=False)  # the log is named "q.queue"


def segments(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "q.queue").iterdir())


def left_of(queue: _DiskQueue, items) -> list[tuple[str | None, int, bytes]]:
    """Loaded items as (project, spans, payload read back)."""
    return [(item.project, item.spans, queue.payload(item.key)) for item in items]


def left(queue: _DiskQueue) -> list[tuple[str | None, int, bytes]]:
    """What ``load`` finds, with each batch's payload read back."""
    return left_of(queue, queue.load())


def payload(index: int, size: int = 600) -> bytes:
    return bytes([index % 256]) * size


async def test_round_trip_across_a_restart(tmp_path):
    queue = _DiskQueue(tmp_path, "q")
    assert queue.load() == []
    keys = [
        queue.append("acme", 3, b"first"),
        queue.append(None, 1, b"no project"),
        queue.append("", 2, b"empty project"),
        queue.append("ünïcode", 4, b"x" * 100_000),
    ]
    assert keys == sorted(keys) and len(set(keys)) == 4
    assert queue.payload(keys[1]) == b"no project"
    queue.delete([keys[0]])
    await queue.close()

    queue = _DiskQueue(tmp_path, "q")
    items = queue.load()
    assert [item.key for item in items] == keys[1:]
    assert left_of(queue, items) == [
        (None, 1, b"no project"),
        ("", 2, b"empty project"),
        ("ünïcode", 4, b"x" * 100_000),
    ]
    new = queue.append("acme", 5, b"after the restart")
    assert new > max(keys)  # numbering goes on after what is on disk
    queue.delete(keys[1:])
    await queue.close()

    queue = _DiskQueue(tmp_path, "q")
    assert left(queue) == [("acme", 5, b"after the restart")]
    await queue.close()


async def test_deletes_in_any_order_several_at_once(tmp_path):
    queue = _DiskQueue(tmp_path, "q")
    keys = [queue.append("acme", index, payload(index)) for index in range(10)]
    queue.delete([keys[7], keys[2]])
    queue.delete([keys[9]])
    queue.delete([keys[5], keys[0], keys[3]])
    queue.delete([keys[0]])  # deleted twice: nothing happens
    assert queue.payload(keys[8]) == payload(8)
    with pytest.raises(KeyError):
        queue.payload(keys[7])
    await queue.close()

    queue = _DiskQueue(tmp_path, "q")
    assert left(queue) == [("acme", i, payload(i)) for i in (1, 4, 6, 8)]
    await queue.close()


async def test_segments_roll_over_and_are_unlinked_once_fully_deleted(tmp_path):
    # A 600-byte batch is a ~630-byte record: two batches a segment of 1,000 bytes.
    queue = _DiskQueue(tmp_path, "q", segment_bytes=1_000)
    keys = [queue.append("acme", 1, payload(index)) for index in range(6)]
    assert segments(tmp_path) == [f"{n:010d}.log" for n in (1, 2, 3)]
    queue.delete([keys[3]])  # half of segment 2
    queue.delete([keys[1], keys[0]])  # all of segment 1, out of order
    assert segments(tmp_path) == [f"{n:010d}.log" for n in (2, 3)]
    queue.delete([keys[5], keys[4]])  # all of segment 3: the current one, kept
    assert segments(tmp_path) == [f"{n:010d}.log" for n in (2, 3)]
    key = queue.append("acme", 1, payload(6))  # segment 3 is full: 4 starts, 3 goes
    assert segments(tmp_path) == [f"{n:010d}.log" for n in (2, 4)]
    assert queue.payload(keys[2]) == payload(2)
    await queue.close()

    queue = _DiskQueue(tmp_path, "q", segment_bytes=1_000)
    assert [item.key for item in queue.load()] == [keys[2], key]
    queue.delete([key, keys[2]])
    await queue.close()
    assert segments(tmp_path) == []  # a drained queue leaves no file


async def test_an_unlinked_segment_takes_no_deletes_of_other_segments_with_it(tmp_path):
    """A batch deleted while a later segment was being appended to stays deleted when
    that later segment is unlinked."""
    queue = _DiskQueue(tmp_path, "q", segment_bytes=1_000)
    first = [queue.append("acme", 1, payload(index)) for index in range(2)]  # segment 1
    second = [queue.append("acme", 1, payload(2))]  # segment 2, the current one
    queue.delete([first[0]])  # while segment 2 is current
    second.append(queue.append("acme", 1, payload(3)))
    last = queue.append("acme", 1, payload(4))  # segment 3
    queue.delete(second)  # segment 2 is gone
    assert segments(tmp_path) == [f"{n:010d}.log" for n in (1, 3)]
    await queue.close()

    queue = _DiskQueue(tmp_path, "q", segment_bytes=1_000)
    assert [item.key for item in queue.load()] == [first[1], last]
    await queue.close()


def _cut(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 100)  # the last record, cut short


def _garbage(path: Path) -> None:
    with path.open("ab") as file:
        file.write(b"\x01" + os.urandom(200))  # a batch record's type, then noise


def _flipped(path: Path) -> None:
    with path.open("r+b") as file:  # a byte of the last payload: its CRC fails
        file.seek(-10, os.SEEK_END)
        byte = file.read(1)
        file.seek(-10, os.SEEK_END)
        file.write(bytes([byte[0] ^ 0xFF]))


def _cut_header(path: Path) -> None:
    with path.open("ab") as file:
        file.write(b"\x01\x02\x03")  # less than a header


@pytest.mark.parametrize("damage", [_cut, _garbage, _flipped, _cut_header])
async def test_a_torn_tail_is_dropped_and_the_log_goes_on_after_it(tmp_path, caplog, damage):
    queue = _DiskQueue(tmp_path, "q")
    keys = [queue.append("acme", index, payload(index)) for index in range(3)]
    await queue.close()
    [segment] = (tmp_path / "q.queue").glob("*.log")
    whole = segment.stat().st_size
    damage(segment)
    # Noise after the last whole record goes, or else the damaged last record.
    kept = keys if damage in (_garbage, _cut_header) else keys[:2]

    with caplog.at_level(logging.WARNING, logger="collector.exporterhelper"):
        queue = _DiskQueue(tmp_path, "q")
    assert "cut short" in caplog.text
    assert [item.key for item in queue.load()] == kept
    assert queue.payload(kept[-1]) == payload(len(kept) - 1)
    if kept == keys:
        assert segment.stat().st_size == whole  # truncated where the noise began
    key = queue.append("acme", 9, payload(9))
    assert key > kept[-1]  # (a dropped record's key is free again: it is on disk no more)
    queue.delete([kept[0]])
    await queue.close()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="collector.exporterhelper"):
        queue = _DiskQueue(tmp_path, "q")
    assert caplog.text == ""  # the file is whole again
    assert left(queue) == [("acme", i, payload(i)) for i in range(1, len(kept))] + [
        ("acme", 9, payload(9))
    ]
    await queue.close()


async def test_a_torn_delete_record_brings_its_batches_back(tmp_path):
    """A delete cut short by a crash is lost: its batches are delivered again (at least
    once), and the rest of the log is read."""
    queue = _DiskQueue(tmp_path, "q")
    keys = [queue.append("acme", index, payload(index)) for index in range(3)]
    queue.delete([keys[0], keys[1]])
    await queue.close()
    [segment] = (tmp_path / "q.queue").glob("*.log")
    os.truncate(segment, segment.stat().st_size - 4)
    queue = _DiskQueue(tmp_path, "q")
    assert [item.key for item in queue.load()] == keys
    await queue.close()


OLD_SCHEMA = (
    "CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " project TEXT, spans INTEGER NOT NULL, payload BLOB NOT NULL)"
)


def old_queue_file(path: Path, rows: list[tuple[str | None, int, bytes]], delete: int) -> None:
    """A queue file as the SQLite queue left it when killed: WAL mode, no automatic
    checkpoint, so the rows are in the -wal file; row ``delete`` was delivered."""
    script = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA wal_autocheckpoint=0")
db.execute(sys.argv[2])
rows = eval(sys.stdin.read())
for row in rows:
    db.execute("INSERT INTO queue (project, spans, payload) VALUES (?, ?, ?)", row)
db.execute("DELETE FROM queue WHERE id = ?", (int(sys.argv[3]),))
os._exit(0)  # killed: no close, no checkpoint
"""
    subprocess.run(
        [sys.executable, "-c", script, str(path), OLD_SCHEMA, str(delete)],
        input=repr(rows).encode(),
        check=True,
    )


async def test_an_old_sqlite_queue_file_is_moved_into_the_log(tmp_path):
    rows = [("acme", 1, payload(1)), (None, 2, payload(2)), ("b", 3, payload(3, 300_000))]
    rows.append(("acme", 4, payload(4)))
    old_queue_file(tmp_path / "q.queue.db", rows, delete=2)
    assert (tmp_path / "q.queue.db-wal").stat().st_size > 300_000  # the rows are there

    queue = _DiskQueue(tmp_path, "q")
    assert not any(tmp_path.glob("q.queue.db*"))  # the old file, its -wal and -shm
    expected = [rows[0], rows[2], rows[3]]  # in id order, less the delivered one
    items = queue.load()
    assert left_of(queue, items) == expected
    key = queue.append("new", 5, b"after the upgrade")
    assert key > max(item.key for item in items)
    queue.delete([items[1].key])
    await queue.close()

    queue = _DiskQueue(tmp_path, "q")  # moved once, not again
    assert left(queue) == [rows[0], rows[3], ("new", 5, b"after the upgrade")]
    await queue.close()


async def test_an_old_queue_file_joins_what_the_log_holds_after_it(tmp_path):
    """A log already there (a downgrade, then an upgrade again) keeps its batches first;
    a migration cut short by a crash left a .tmp segment, which is dropped and done again."""
    queue = _DiskQueue(tmp_path, "q")
    queue.append("acme", 1, payload(1))
    await queue.close()
    (tmp_path / "q.queue" / "0000000007.log.tmp").write_bytes(b"half a migration")
    old = sqlite3.connect(tmp_path / "q.queue.db")
    old.execute(OLD_SCHEMA)
    old.execute("INSERT INTO queue (project, spans, payload) VALUES ('old', 2, ?)", (payload(2),))
    old.commit()
    old.close()

    queue = _DiskQueue(tmp_path, "q")
    assert left(queue) == [("acme", 1, payload(1)), ("old", 2, payload(2))]
    assert [name for name in segments(tmp_path) if name.endswith(".tmp")] == []
    await queue.close()


async def test_an_old_queue_file_without_its_table_is_removed(tmp_path):
    """The old queue killed between creating its file and its table."""
    (tmp_path / "q.queue.db").write_bytes(b"")
    queue = _DiskQueue(tmp_path, "q")
    assert queue.load() == []
    assert not (tmp_path / "q.queue.db").exists()
    await queue.close()


async def test_a_log_in_use_is_refused_until_it_is_closed(tmp_path):
    queue = _DiskQueue(tmp_path, "q")
    key = queue.append("acme", 1, payload(1))
    with pytest.raises(RuntimeError, match="in use by another process"):
        _DiskQueue(tmp_path, "q")
    assert queue.payload(key) == payload(1)  # the refused one touched nothing
    await queue.close()
    queue = _DiskQueue(tmp_path, "q")
    assert left(queue) == [("acme", 1, payload(1))]
    await queue.close()
