"""Turn py-spy's collapsed stacks (``--format raw``) into a table of the hottest code.

``python -m bench.run --profile`` records the default pipeline under load and writes
``bench/results/profile-ingest.txt`` (this table) and ``profile-ingest.svg`` (a flame
graph), so the next optimisation starts from data.

    python -m bench.profile profile.txt > profile-ingest.txt
"""

from __future__ import annotations

import sys
from collections import Counter


def _frames(stack: str) -> list[str]:
    frames = stack.split(";")
    # With --threads the first frame names the thread; keep it for the thread table only.
    return frames[1:] if frames and frames[0].startswith(("thread ", "process ")) else frames


def _short(frame: str) -> str:
    """``_write (exporters/sqlite.py:240)`` without the virtualenv's long prefixes."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
    for marker in ("/collector/", "/exporters/", "/processors/", "/bench/"):
        if marker in where:
            where = marker.strip("/") + "/" + where.split(marker, 1)[1]
    file, _, _line = where.rpartition(":")
    return f"{name} ({file or where})"


def summarize_collapsed(text: str, title: str = "", top: int = 35) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        head = stack.split(";", 1)[0]
        threads[head if head.startswith("thread ") else "?"] += count
        frames = [_short(f) for f in _frames(stack)]
        if frames:
            self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples\n"

    def table(counter: Counter[str], heading: str) -> list[str]:
        lines = [heading, "", "| % of samples | function (file) |", "|---:|---|"]
        for frame, count in counter.most_common(top):
            lines.append(f"| {100 * count / total:5.1f} | `{frame}` |")
        return [*lines, ""]

    out = [
        f"# Ingest profile{': ' + title if title else ''}",
        "",
        f"py-spy samples of all threads while busy ({total} samples; idle waits not sampled). Self = the function itself was"
        " on top of the stack; inclusive = anywhere on the stack.",
        "",
        *table(threads, "## Samples per thread"),
        *table(self_time, "## Self time"),
        *table(inclusive, "## Inclusive time"),
    ]
    return "\n".join(out)


def main() -> None:
    with open(sys.argv[1]) as handle:
        sys.stdout.write(summarize_collapsed(handle.read()))


if __name__ == "__main__":
    main()
