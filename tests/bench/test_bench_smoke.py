"""``make bench`` still works: a few hundred spans through the yardstick and the default
pipeline, every span answered 200 found in SQLite (no speed is asserted here)."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from bench import query, run


@pytest.mark.timeout(120)
def test_quick_bench_stores_every_span(tmp_path):
    output = tmp_path / "latest.md"
    assert run.main(["--quick", "--only-default", "--output", str(output)]) == 0
    table = output.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in rows[1:]]
    assert names == ["yardstick, protobuf", "calltrace default, protobuf"]
    assert "1.00×" in rows[1]  # the yardstick is its own reference


@pytest.mark.timeout(120)
def test_quick_redis_row_waits_for_the_stream(tmp_path):
    """The fan-out row runs on a throwaway redis-server and counts a span persisted once
    it is in SQLite and in the stream (``wait_streamed``)."""
    output = tmp_path / "latest.md"
    assert (
        run.main(["--quick", "--only", "redis-process", "--rounds", "1", "--output", str(output)])
        == 0
    )
    rows = [line for line in output.read_text().splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in rows[1:]]
    assert names == ["yardstick, protobuf", "calltrace + Redis Streams, sqlite `writer: process`"]


@pytest.mark.timeout(60)
def test_lost_spans_fail_the_bench(tmp_path):
    db = tmp_path / "empty.db"
    sqlite3.connect(db).execute("CREATE TABLE spans (x)").connection.close()
    with pytest.raises(run.LostSpans):
        asyncio.run(run.wait_stored(db, 5, timeout=0.2))


@pytest.mark.timeout(60)
def test_spans_missing_from_the_stream_fail_the_bench():
    with run.throwaway_redis() as url, pytest.raises(run.LostSpans, match="calltrace:spans:bench"):
        asyncio.run(run.wait_streamed(url, run.BENCH_STREAM, 1, timeout=0.2))


@pytest.mark.timeout(120)
def test_query_bench_on_a_small_database(tmp_path):
    path = tmp_path / "q.db"
    end_ns = 1_800_000_000 * 10**9
    spans = asyncio.run(query.build_database(path, 12, end_ns=end_ns, quiet=True))
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM spans").fetchone()[0] == spans
        assert db.execute("SELECT count(*) FROM calls").fetchone()[0] == 12
        end = db.execute("SELECT max(end_ns) FROM calls").fetchone()[0] + 1
    results = {label: rows for label, _m, _p, rows, _n, _plan in query.run_queries(path, 2, end)}
    assert len(results) == 11
    detail = next(rows for label, rows in results.items() if label.startswith("call detail"))
    assert detail > 0
    assert all(rows > 0 for label, rows in results.items() if "common" in label)


def test_disk_queue_bench_runs(capsys):
    from bench import disk_queue

    assert disk_queue.main(["--batches", "3", "--spans", "10", "--repeat", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["keeping up", "backlog"]
