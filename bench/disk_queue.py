"""The persistent sending queue's own cost, without a pipeline around it.

Appends and deletes ``--batches`` batches of ``--spans`` spans (``--span-bytes`` each;
the ingest bench's requests are ~500 spans of ~650 bytes) through ``_DiskQueue`` on a
fresh directory, in two patterns:

- ``keeping up``: the exporter keeps up, so each batch is deleted right after the next
  one is appended, and its payload is never read back (the head of a queue is held in
  memory);
- ``backlog``: the destination was down, so every batch is appended, then each is read
  back and deleted, oldest first.

CPU seconds are the process's (every thread: SQLite's checkpointer thread counts),
including ``close``; "written" is what the process handed to ``write`` and friends
(``wchar`` in ``/proc/self/io``). Times are the best of ``--repeat`` runs, as the
machine is shared; bytes written the median (SQLite's checkpoints vary run to run).

    python -m bench.disk_queue [--module collector.exporterhelper]

``--module`` names another module with a ``_DiskQueue`` (a copy of an older
``exporterhelper`` on ``PYTHONPATH``) to compare implementations in one session.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _written() -> int:
    """Bytes this process passed to write(2) and friends so far (0 where unknown)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "wchar":
                return int(value)
    except OSError:
        pass
    return 0


def keeping_up(queue: Any, payloads: list[bytes], spans: int) -> None:
    previous: int | None = None
    for payload in payloads:
        key = queue.append("acme", spans, payload)
        if previous is not None:
            queue.delete([previous])
        previous = key
    if previous is not None:
        queue.delete([previous])


def backlog(queue: Any, payloads: list[bytes], spans: int) -> None:
    keys = [queue.append("acme", spans, payload) for payload in payloads]
    for key in keys:
        assert len(queue.payload(key)) > 0
        queue.delete([key])


def measure(
    cls: Any, pattern: Callable[[Any, list[bytes], int], None], payloads: list[bytes], spans: int
) -> tuple[float, float, int]:
    """(CPU s, wall s, bytes written) of one run on a fresh directory."""
    directory = Path(tempfile.mkdtemp(prefix="calltrace-queue-bench-"))
    try:
        cpu, wall, written = time.process_time(), time.perf_counter(), _written()
        queue = cls(directory, "bench")
        queue.load()
        pattern(queue, payloads, spans)
        asyncio.run(queue.close())
        return (
            time.process_time() - cpu,
            time.perf_counter() - wall,
            _written() - written,
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", default="collector.exporterhelper")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--spans", type=int, default=500)
    parser.add_argument("--span-bytes", type=int, default=650)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    cls = importlib.import_module(args.module)._DiskQueue
    rng = random.Random(1)
    size = args.spans * args.span_bytes
    # Distinct, incompressible payloads of slightly varying size, like real requests.
    payloads = [
        rng.randbytes(size + rng.randrange(-size // 10, size // 10)) for _ in range(args.batches)
    ]
    total_spans = args.batches * args.spans
    print(
        f"{args.module}._DiskQueue: {args.batches} batches x {args.spans} spans,"
        f" {sum(map(len, payloads)) / args.batches / 1e3:.0f} kB a batch,"
        f" best of {args.repeat}"
    )
    print("| pattern | CPU s /100k spans | wall s /100k spans | MB written /100k spans |")
    print("|---|---:|---:|---:|")
    for name, pattern in (("keeping up", keeping_up), ("backlog", backlog)):
        runs = [measure(cls, pattern, payloads, args.spans) for _ in range(args.repeat)]
        scale = 100_000 / total_spans
        cpu = min(r[0] for r in runs) * scale
        wall = min(r[1] for r in runs) * scale
        written = sorted(r[2] for r in runs)[len(runs) // 2] * scale / 1e6
        print(f"| {name} | {cpu:.3f} | {wall:.3f} | {written:.0f} |")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    os.environ.pop("CALLTRACE_WORKER", None)  # one queue, named after "bench"
    raise SystemExit(main())
