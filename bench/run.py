"""``make bench``: calltrace against the bare-parser yardstick, side by side, one run.

For each scenario the server under test is started as its own process on this machine,
driven with the same pre-serialized requests at a fixed concurrency over HTTP/1.1
keep-alive, and measured until every accepted span is stored: persisted spans/s,
p50/p99 request latency, peak RSS, CPU seconds per 100k spans, each also as a ratio
to the yardstick measured in the same run. A span answered 200 and not stored fails
the bench. The table is printed and written to ``bench/results/latest.md``.

    python -m bench.run [--spans 200000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.loadgen import Body, LoadResult, drive, gzip_bodies
from bench.workload import build_requests, span_count, to_otlp_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
API_KEY = "ct_bench_key_0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Row:
    name: str
    persisted_per_s: float
    p50_ms: float
    p99_ms: float
    peak_rss_mib: float
    cpu_per_100k: float
    startup_s: float
    spans: int
    yardstick: str


def calltrace_config(port: int, workdir: Path, *, redis_url: str | None = None) -> dict:
    db = str(workdir / "calltrace.db")
    exporters: dict = {"sqlite": {"path": db}}
    if redis_url:
        exporters["redis_streams"] = {"url": redis_url}
    return {
        "receivers": {
            "otlp": {
                "protocols": {
                    "http": {"endpoint": f"127.0.0.1:{port}", "max_request_body_size": "64MiB"}
                }
            }
        },
        "processors": {
            "auth": {"key_store": None, "keys": [{"key": API_KEY, "project": "bench"}]},
            "skip": {},
            "correlate": {"store": db},
            "batch": {"timeout": "5ms"},
        },
        "exporters": exporters,
        "service": {
            "telemetry": {"log_level": "warning"},
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["auth", "skip", "correlate", "batch"],
                    "exporters": list(exporters),
                }
            },
        },
    }


@contextlib.contextmanager
def server(argv: list[str], port: int, cwd: Path):
    started = time.perf_counter()
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{argv} exited: {process.stderr.read().decode()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if b" 200 " in sock.recv(100):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv} did not become ready")
            time.sleep(0.01)
        process.startup_s = time.perf_counter() - started  # type: ignore[attr-defined]
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def stored_spans(db: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
            return conn.execute("SELECT count(*) FROM spans").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


async def wait_stored(db: Path, expected: int, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while True:
        count = stored_spans(db)
        if count >= expected:
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise AssertionError(f"LOST SPANS: {expected} accepted with 200, {count} stored")
        await asyncio.sleep(0.02)


def measure(
    name: str,
    argv: list[str],
    port: int,
    bodies: list[Body],
    concurrency: int,
    workdir: Path,
    db: Path | None,
    yardstick: str,
    headers: dict[str, str],
) -> Row:
    with server(argv, port, workdir) as process:
        cpu_before = cpu_seconds(process.pid)
        url = f"http://127.0.0.1:{port}/v1/traces"
        t0 = time.perf_counter()
        result: LoadResult = asyncio.run(
            drive(url, bodies, concurrency=concurrency, headers=headers)
        )
        if result.accepted_spans != result.sent_spans:
            raise AssertionError(
                f"{name}: {result.sent_spans - result.accepted_spans} spans never accepted"
            )
        done = asyncio.run(wait_stored(db, result.accepted_spans)) if db else time.perf_counter()
        cpu = cpu_seconds(process.pid) - cpu_before
        rss = peak_rss_mib(process.pid)
        startup = process.startup_s  # type: ignore[attr-defined]
    spans = result.accepted_spans
    if db is not None and stored_spans(db) < spans:
        raise AssertionError(f"{name}: LOST SPANS after shutdown")
    return Row(
        name,
        spans / (done - t0),
        result.percentile(0.5),
        result.percentile(0.99),
        rss,
        cpu / spans * 100_000,
        startup,
        spans,
        yardstick,
    )


def sequential_latency(
    argv: list[str], port: int, bodies: list[Body], workdir: Path, headers: dict[str, str]
) -> LoadResult:
    with server(argv, port, workdir):
        return asyncio.run(
            drive(f"http://127.0.0.1:{port}/v1/traces", bodies, concurrency=1, headers=headers)
        )


def fmt_ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}×" if base else "–"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=int, default=200_000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a few hundred spans: a smoke run")
    parser.add_argument(
        "--redis-url", default=os.environ.get("CALLTRACE_BENCH_REDIS", "redis://127.0.0.1:6379/15")
    )
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--output", default=str(RESULTS / "latest.md"))
    args = parser.parse_args(argv)
    total = 600 if args.quick else args.spans
    print(f"building ~{total} spans of LiveKit/Pipecat calls...", flush=True)
    big = build_requests(total, 500)
    small = build_requests(min(total, 10_000) if not args.quick else 200, 50, prefix="RM_small")
    proto = [Body(r.SerializeToString(), span_count(r)) for r in big]
    as_json = [Body(to_otlp_json(r), span_count(r), "application/json") for r in big]
    gz = gzip_bodies(proto)
    small_proto = [Body(r.SerializeToString(), span_count(r)) for r in small]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    python = sys.executable
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="calltrace-bench-") as tmp:
        tmpdir = Path(tmp)

        def baseline(name: str, bodies: list[Body]) -> Row:
            port = free_port()
            return measure(
                name,
                [python, "-m", "bench.baseline", "--port", str(port)],
                port,
                bodies,
                args.concurrency,
                ROOT,
                None,
                name,
                {},
            )

        def calltrace(
            name: str, bodies: list[Body], yardstick: str, redis_url: str | None = None
        ) -> Row:
            port = free_port()
            workdir = tmpdir / name.replace(" ", "_").replace("/", "_")
            workdir.mkdir()
            config = workdir / "collector.yaml"
            config.write_text(yaml.safe_dump(calltrace_config(port, workdir, redis_url=redis_url)))
            return measure(
                name,
                [python, "-m", "collector", "run", "--config", str(config)],
                port,
                bodies,
                args.concurrency,
                workdir,
                workdir / "calltrace.db",
                yardstick,
                headers,
            )

        rows.append(baseline("yardstick (protobuf)", proto))
        rows.append(calltrace("calltrace default, protobuf", proto, "yardstick (protobuf)"))
        if not args.no_redis and shutil.which("redis-server"):
            try:
                import redis

                redis.Redis.from_url(args.redis_url).flushdb()
                rows.append(
                    calltrace(
                        "calltrace + Redis Streams", proto, "yardstick (protobuf)", args.redis_url
                    )
                )
            except Exception as exc:  # the fan-out row is skipped, and the table says why
                notes.append(f"Redis fan-out not measured: {exc!r}")
        rows.append(baseline("yardstick (OTLP/JSON)", as_json))
        rows.append(calltrace("calltrace default, OTLP/JSON", as_json, "yardstick (OTLP/JSON)"))
        rows.append(baseline("yardstick (protobuf+gzip)", gz))
        rows.append(calltrace("calltrace default, gzip", gz, "yardstick (protobuf+gzip)"))

        port = free_port()
        workdir = tmpdir / "sequential"
        workdir.mkdir()
        config = workdir / "collector.yaml"
        config.write_text(yaml.safe_dump(calltrace_config(port, workdir)))
        seq = sequential_latency(
            [python, "-m", "collector", "run", "--config", str(config)],
            port,
            small_proto,
            workdir,
            headers,
        )

    by_name = {r.name: r for r in rows}
    lines = [
        "# calltrace ingest benchmark",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()},"
        f" {platform.platform()}; load generator on the same machine;"
        f" {args.concurrency} concurrent keep-alive connections; ~500-span requests"
        f" ({sum(b.spans for b in proto)} spans, {sum(len(b.payload) for b in proto) / sum(b.spans for b in proto):.0f} bytes/span protobuf).",
        "",
        "| scenario | spans/s persisted | vs yardstick | p50 ms | p99 ms | peak RSS MiB | CPU s /100k spans | vs yardstick | startup s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = by_name[r.yardstick]
        lines.append(
            f"| {r.name} | {r.persisted_per_s:,.0f} | {fmt_ratio(r.persisted_per_s, base.persisted_per_s)} |"
            f" {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.peak_rss_mib:.0f} | {r.cpu_per_100k:.2f} |"
            f" {fmt_ratio(r.cpu_per_100k, base.cpu_per_100k)} | {r.startup_s:.2f} |"
        )
    lines += [
        "",
        f"50-span requests one at a time ({len(small_proto)} requests, answered once queued for"
        f" SQLite): p50 {seq.percentile(0.5):.2f} ms, p99 {seq.percentile(0.99):.2f} ms.",
        "",
        "Yardstick: `bench/baseline.py`, aiohttp parsing each request and reading every span's ids,"
        " name, times and attributes once. calltrace rows run the default pipeline (auth, skip,"
        " correlate, batch, SQLite with the query indexes); persisted = stored in SQLite, counted"
        " until every span answered 200 is there.",
        *[f"\nNote: {n}" for n in notes],
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
