"""``make bench``: calltrace against the bare-parser yardstick, side by side, one run.

For each scenario the server under test is started as its own process on this machine,
driven with the same pre-serialized requests at a fixed concurrency over HTTP/1.1
keep-alive, and measured until every accepted span is stored: persisted spans/s,
p50/p99 request latency, peak RSS, CPU seconds per 100k spans, each also as a ratio
to the yardstick measured in the same run. A span answered 200 and not stored fails
the bench. The table is printed and written to ``bench/results/latest.md``.

The load generator runs on the same machine as the server (and, on a shared box, beside
whatever else runs there): absolute figures move with the machine's load, the ratios to
the yardstick measured minutes apart in the same run much less.

    python -m bench.run [--spans 100000] [--rounds 5] [--quick] [--profile]
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
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from bench.loadgen import Body, LoadResult, drive, gzip_bodies
from bench.workload import build_requests, span_count, to_otlp_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
API_KEY = "ct_bench_key_0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")
REDIS_EXPORTER = "redis_streams"
BENCH_STREAM = "calltrace:spans:bench"
"""The stream of the bench key's project (the exporter's default template)."""


class LostSpans(AssertionError):
    """A span answered 200 was not stored: the bench's one hard failure."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (the sqlite exporter's writer process, say)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system time of the server and its live descendants."""
    total = 0.0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def rss_mib(pid: int, field: str = "VmHWM") -> float:
    """``VmHWM`` is the peak resident set since a process started; ``VmRSS`` now. Summed
    over the server and its live descendants (peaks of different moments: an upper bound
    of the joint peak)."""
    total = 0.0
    for member in process_tree(pid):
        try:
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith(field + ":"):
                total += int(line.split()[1]) / 1024
    return total


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
    refused: int
    yardstick: str


def calltrace_config(
    port: int, workdir: Path, *, redis_url: str | None = None, writer: str | None = None
) -> dict:
    """The default pipeline as ``collector.yaml`` has it (auth, skip, correlate, batch ->
    SQLite, with its sending queue), on a bench port and in a scratch directory, with the
    key in the config instead of the key store and a larger body limit."""
    config = yaml.safe_load((ROOT / "collector.yaml").read_text())
    data = str(workdir / "data")
    http = config["receivers"]["otlp"]["protocols"]["http"]
    http["endpoint"] = f"127.0.0.1:{port}"
    http["max_request_body_size"] = "64MiB"
    processors = config["processors"]
    processors["auth"] = {"key_store": None, "keys": [{"key": API_KEY, "project": "bench"}]}
    exporters = config["exporters"]
    for component in (*processors.values(), *exporters.values()):
        # Every ./data/... path of the default config lands in the scratch directory.
        for key, value in list(component.items()):
            if isinstance(value, str) and value.startswith("./data/"):
                component[key] = value.replace("./data", data, 1)
        queue = component.get("sending_queue", {})
        if isinstance(queue.get("storage"), str):
            queue["storage"] = queue["storage"].replace("./data", data, 1)
    if writer is not None:
        exporters["sqlite"]["writer"] = writer
    if redis_url:
        exporters[REDIS_EXPORTER] = {"url": redis_url}
        config["service"]["pipelines"]["traces"]["exporters"] = list(exporters)
    config["service"]["telemetry"] = {"log_level": "warning"}
    return config


def _ready(port: int, path: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            return b" 200 " in sock.recv(100)
    except OSError:
        return False


@contextlib.contextmanager
def server(argv: list[str], port: int, cwd: Path, ready_path: str) -> Iterator[subprocess.Popen]:
    """Start ``argv``, wait until ``ready_path`` answers 200, stop it with SIGTERM after."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not _ready(port, ready_path):
            if process.poll() is not None:
                assert process.stderr is not None
                raise RuntimeError(f"{argv} exited: {process.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv} did not become ready")
            time.sleep(0.005)
        process.startup_s = time.perf_counter() - started  # type: ignore[attr-defined]
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stored_spans(db: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
            return int(conn.execute("SELECT count(*) FROM spans").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


async def wait_stored(db: Path, expected: int, timeout: float = 120) -> float:
    """When ``expected`` spans are in ``db``; LostSpans if they never all arrive."""
    deadline = time.monotonic() + timeout
    while True:
        count = stored_spans(db)
        if count >= expected:
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise LostSpans(f"{expected} spans answered 200, only {count} stored after {timeout}s")
        await asyncio.sleep(0.02)


def stream_length(redis_url: str, stream: str) -> int:
    reply = redis_command(redis_url, b"XLEN " + stream.encode())
    if not reply.startswith(b":"):
        raise RuntimeError(f"XLEN {stream}: {reply!r}")
    return int(reply[1:].split(b"\r\n", 1)[0])


async def wait_streamed(redis_url: str, stream: str, expected: int, timeout: float = 120) -> float:
    """When ``expected`` entries are in the Redis ``stream``; LostSpans if they never all
    arrive (the fan-out rows count a span persisted once it is in SQLite and in Redis)."""
    deadline = time.monotonic() + timeout
    while True:
        count = stream_length(redis_url, stream)
        if count >= expected:
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise LostSpans(
                f"{expected} spans answered 200, only {count} in {stream} after {timeout}s"
            )
        await asyncio.sleep(0.02)


def run_load(url: str, bodies: list[Body], concurrency: int, headers: dict[str, str]) -> LoadResult:
    """Drive ``url`` on uvloop, so the client spends as little of the shared CPU as it can."""
    coro = drive(url, bodies, concurrency=concurrency, headers=headers)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def measure(
    name: str,
    argv: list[str],
    port: int,
    bodies: list[Body],
    warmup: list[Body],
    concurrency: int,
    workdir: Path,
    db: Path | None,
    yardstick: str,
    headers: dict[str, str],
    ready_path: str = "/healthz",
    redis_url: str | None = None,
) -> Row:
    """One row: ``argv`` driven with ``bodies``, timed until every span answered 200 is in
    ``db`` (and, with ``redis_url``, in the bench project's stream there)."""
    url = f"http://127.0.0.1:{port}/v1/traces"
    with server(argv, port, workdir, ready_path) as process:
        warm = run_load(url, warmup, 1, headers)
        if warm.accepted_spans != warm.sent_spans:
            raise RuntimeError(f"{name}: warm-up refused: {warm}")
        if db is not None:
            asyncio.run(wait_stored(db, warm.accepted_spans))
        if redis_url is not None:
            asyncio.run(wait_streamed(redis_url, BENCH_STREAM, warm.accepted_spans))
        cpu_before = cpu_seconds(process.pid)
        t0 = time.perf_counter()
        result = run_load(url, bodies, concurrency, headers)
        if result.accepted_spans != result.sent_spans:
            raise AssertionError(
                f"{name}: {result.sent_spans - result.accepted_spans} spans never accepted"
                f" ({result.errors} requests failed)"
            )
        expected = warm.accepted_spans + result.accepted_spans
        done = asyncio.run(wait_stored(db, expected)) if db else time.perf_counter()
        if redis_url is not None:
            done = max(done, asyncio.run(wait_streamed(redis_url, BENCH_STREAM, expected)))
        cpu = cpu_seconds(process.pid) - cpu_before
        rss = rss_mib(process.pid)
        startup = process.startup_s  # type: ignore[attr-defined]
    if db is not None:
        final = stored_spans(db)
        if final != expected:
            raise LostSpans(f"{name}: {expected} spans answered 200, {final} stored after shutdown")
    spans = result.accepted_spans
    return Row(
        name,
        spans / (done - t0),
        result.percentile(0.5),
        result.percentile(0.99),
        rss,
        cpu / spans * 100_000,
        startup,
        spans,
        result.refused,
        yardstick,
    )


@contextlib.contextmanager
def throwaway_redis() -> Iterator[str]:
    """A private redis-server on a free port, never the shared one."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis_command(url, b"PING", timeout=0.2).startswith(b"+PONG"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def redis_command(url: str, command: bytes, timeout: float = 10) -> bytes:
    """The start of the reply of the Redis at ``url`` to an inline ``command`` (``PING``,
    ``FLUSHALL``, ``XLEN``)."""
    address = urlsplit(url)
    with socket.create_connection(
        (address.hostname or "127.0.0.1", address.port or 6379), timeout=timeout
    ) as sock:
        sock.sendall(command + b"\r\n")
        return sock.recv(64)


def flush_redis(url: str) -> None:
    """Empty the throwaway Redis at ``url`` (``FLUSHALL``)."""
    reply = redis_command(url, b"FLUSHALL")
    if not reply.startswith(b"+OK"):
        raise RuntimeError(f"FLUSHALL on {url} answered {reply!r}")


def redis_exporter_missing() -> str | None:
    """Why the Redis Streams row cannot run, or None when it can."""
    from collector import registry

    known = registry.available("exporters")
    if REDIS_EXPORTER not in known:
        return (
            f"exporter type {REDIS_EXPORTER!r} is not registered in this install"
            f" (known: {', '.join(sorted(known))}); the Redis Streams row was skipped"
        )
    if shutil.which("redis-server") is None:
        return "redis-server is not installed; the Redis Streams row was skipped"
    return None


def mean_row(first: Row, second: Row) -> Row:
    """The figures of two runs of one row, averaged (named as the first)."""
    return Row(
        first.name,
        *((a + b) / 2 for a, b in zip(astuple(first)[1:7], astuple(second)[1:7], strict=True)),
        (first.spans + second.spans) // 2,
        (first.refused + second.refused) // 2,
        first.yardstick,
    )


def fmt_ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}×" if base else "–"


def profile_ingest(
    bodies: list[Body], concurrency: int, headers: dict[str, str], workdir: Path, out_dir: Path
) -> list[str]:
    """Drive the default pipeline with py-spy attached; write an SVG flame graph and a text
    table of the hottest functions to ``out_dir``."""
    from bench.profile import summarize_collapsed

    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        return ["py-spy not installed (pip install -e '.[test]'); no profile taken"]
    port = free_port()
    workdir.mkdir()
    config = workdir / "collector.yaml"
    config.write_text(yaml.safe_dump(calltrace_config(port, workdir)))
    raw = workdir / "profile.txt"
    out_dir.mkdir(parents=True, exist_ok=True)
    svg = out_dir / "profile-ingest.svg"
    app = [sys.executable, "-m", "collector", "run", "--config", str(config)]
    with server(app, port, workdir, "/readyz") as process:
        # Two recorders attached to the same process: collapsed stacks and a flame graph.
        spies = [
            subprocess.Popen(
                [
                    *(py_spy, "record", "--pid", str(process.pid), "--rate", "200"),
                    *("--threads", "--nonblocking", "--format", fmt, "-o", str(target)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for fmt, target in (("raw", raw), ("flamegraph", svg))
        ]
        time.sleep(1.0)  # let them attach
        try:
            result = run_load(f"http://127.0.0.1:{port}/v1/traces", bodies, concurrency, headers)
            asyncio.run(wait_stored(workdir / "data" / "calltrace.db", result.accepted_spans))
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)
            errors = [spy.communicate(timeout=60)[1].decode() for spy in spies]
    if not raw.exists():
        return [f"py-spy failed: {' '.join(errors)[-500:]}"]
    text = summarize_collapsed(raw.read_text(), title="calltrace default pipeline, protobuf")
    (out_dir / "profile-ingest.txt").write_text(text)
    return [
        f"profile of the default pipeline under this load: {out_dir.name}/profile-ingest.txt,"
        f" {out_dir.name}/profile-ingest.svg"
    ]


ROW_KEYS = ["default", "process", "redis", "redis-process", "json", "gzip", "small", "flood"]
"""The rows of the table, in order (``--only`` picks some)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=int, default=100_000, help="spans per scenario")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--flood-concurrency", type=int, default=48)
    parser.add_argument(
        "--rounds", type=int, default=5, help="times each row runs beside its yardstick"
    )
    parser.add_argument("--quick", action="store_true", help="a few hundred spans: a smoke run")
    parser.add_argument(
        "--only-default", action="store_true", help="only the protobuf yardstick and default rows"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=ROW_KEYS,
        help="run only this row (repeatable), beside its yardstick: for measuring one change",
    )
    parser.add_argument("--profile", action="store_true", help="also write a py-spy profile")
    parser.add_argument("--output", default=str(RESULTS / "latest.md"))
    args = parser.parse_args(argv)
    selected = set(args.only or (["default"] if args.only_default else ROW_KEYS))
    total = 600 if args.quick else args.spans
    small_total = 300 if args.quick else max(total // 2, 1000)
    flood_total = total * 3 if args.quick else max(total * 5 // 2, 250_000)
    began = time.perf_counter()
    print(f"building ~{total} spans of LiveKit/Pipecat calls...", flush=True)
    big = build_requests(total, 500)
    small = build_requests(small_total, 50, prefix="RM_small")
    warm = build_requests(100 if args.quick else 1000, 500, prefix="RM_warm")
    proto = [Body(r.SerializeToString(), span_count(r)) for r in big]
    small_proto = [Body(r.SerializeToString(), span_count(r)) for r in small]
    warm_proto = [Body(r.SerializeToString(), span_count(r)) for r in warm]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    python = sys.executable
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="calltrace-bench-") as tmp:
        tmpdir = Path(tmp)

        def baseline(
            name: str, bodies: list[Body], warmup: list[Body], c: int, compare_to: str = ""
        ) -> Row:
            print(f"  {name} ...", flush=True)
            port = free_port()
            return measure(
                name,
                [python, "-m", "bench.baseline", "--port", str(port)],
                port,
                bodies,
                warmup,
                c,
                ROOT,
                None,
                compare_to or name,
                {},
            )

        def calltrace(
            name: str,
            bodies: list[Body],
            warmup: list[Body],
            yardstick: str,
            c: int,
            redis_url: str | None = None,
            writer: str | None = None,
        ) -> Row:
            print(f"  {name} ...", flush=True)
            port = free_port()
            # A directory of its own each round: every round starts from an empty database.
            label = "".join(ch if ch.isalnum() else "_" for ch in name)
            workdir = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=tmpdir))
            config = workdir / "collector.yaml"
            settings = calltrace_config(port, workdir, redis_url=redis_url, writer=writer)
            if redis_url:  # and an empty Redis, as every round has an empty database
                flush_redis(redis_url)
            config.write_text(yaml.safe_dump(settings))
            return measure(
                name,
                [python, "-m", "collector", "run", "--config", str(config)],
                port,
                bodies,
                warmup,
                c,
                workdir,
                workdir / "data" / "calltrace.db",
                yardstick,
                headers,
                "/readyz",
                redis_url,
            )

        c = args.concurrency
        yard = "yardstick, protobuf"
        yardsticks: list[Row] = []  # every protobuf yardstick run, for the drift note
        rounds = 1 if args.quick else max(1, args.rounds)
        spreads: list[str] = []

        def side_by_side(
            yard_label: str,
            run_yardstick: Callable[[str], Row],
            run_row: Callable[[str], Row],
        ) -> None:
            """The row ``rounds`` times, each between two yardstick runs: the machine's
            speed drifts (shared cores), so each round is compared with the mean of the
            yardstick runs just before and just after it (one before only, it moved by
            1.2-2x within a run on this machine), and the round whose ratio is the
            median goes in the table with that mean (all its figures from that one
            round); the others' range goes in a note."""
            results = []
            before = run_yardstick(yard_label)
            for _ in range(rounds):
                row = run_row(yard_label)
                after = run_yardstick(yard_label)
                around = mean_row(before, after)
                results.append((row.persisted_per_s / around.persisted_per_s, around, row))
                before = after
            results.sort(key=lambda result: result[0])
            _, yardstick, row = results[len(results) // 2]
            rows.extend((yardstick, row))
            if len(results) > 1:
                spreads.append(
                    f"{row.name}: {results[0][0]:.2f}-{results[-1][0]:.2f}x the yardstick,"
                    f" peak RSS {min(r.peak_rss_mib for _, _, r in results):.0f}"
                    f"-{max(r.peak_rss_mib for _, _, r in results):.0f} MiB,"
                    f" p99 {min(r.p99_ms for _, _, r in results):.1f}"
                    f"-{max(r.p99_ms for _, _, r in results):.1f} ms"
                )

        protobuf_pairs = 0

        def protobuf_label() -> str:
            nonlocal protobuf_pairs
            protobuf_pairs += 1
            return yard if protobuf_pairs == 1 else f"{yard} ({protobuf_pairs})"

        def protobuf_yardstick(label: str) -> Row:
            yardsticks.append(baseline(label, proto, warm_proto, c))
            return yardsticks[-1]

        if "default" in selected:
            side_by_side(
                protobuf_label(),
                protobuf_yardstick,
                lambda y: calltrace("calltrace default, protobuf", proto, warm_proto, y, c),
            )
        if "process" in selected:
            side_by_side(
                protobuf_label(),
                protobuf_yardstick,
                lambda y: calltrace(
                    "calltrace, sqlite `writer: process`", proto, warm_proto, y, c, writer="process"
                ),
            )
        if selected & {"redis", "redis-process"}:
            why = redis_exporter_missing()
            if why is None:
                with throwaway_redis() as redis_url:
                    if "redis" in selected:
                        side_by_side(
                            protobuf_label(),
                            protobuf_yardstick,
                            lambda y: calltrace(
                                "calltrace + Redis Streams", proto, warm_proto, y, c, redis_url
                            ),
                        )
                    # As config/gateway.yaml runs the fan-out: the SQLite writer in a
                    # process of its own, so it does not share the GIL with the receiver
                    # and the Redis exporter.
                    if "redis-process" in selected:
                        side_by_side(
                            protobuf_label(),
                            protobuf_yardstick,
                            lambda y: calltrace(
                                "calltrace + Redis Streams, sqlite `writer: process`",
                                proto,
                                warm_proto,
                                y,
                                c,
                                redis_url,
                                writer="process",
                            ),
                        )
            else:
                print(f"  skipped: {why}", flush=True)
                notes.append(why)
        if "json" in selected:
            as_json = [Body(to_otlp_json(r), span_count(r), "application/json") for r in big]
            warm_json = [Body(to_otlp_json(r), span_count(r), "application/json") for r in warm]
            side_by_side(
                "yardstick, OTLP/JSON",
                lambda label: baseline(label, as_json, warm_json, c),
                lambda y: calltrace("calltrace default, OTLP/JSON", as_json, warm_json, y, c),
            )
            del as_json
        if "gzip" in selected:
            gz, warm_gz = gzip_bodies(proto), gzip_bodies(warm_proto)
            side_by_side(
                "yardstick, protobuf+gzip",
                lambda label: baseline(label, gz, warm_gz, c),
                lambda y: calltrace("calltrace default, gzip", gz, warm_gz, y, c),
            )
            del gz
        if "small" in selected:
            # Latency of small requests is measured one request at a time (issue 6's
            # "50-span requests one at a time: p99 <= 15 ms"): no queueing behind others.
            side_by_side(
                "yardstick, 50-span requests",
                lambda label: baseline(label, small_proto, warm_proto, 1),
                lambda y: calltrace(
                    "calltrace default, 50-span requests", small_proto, warm_proto, y, 1
                ),
            )
        if "flood" in selected:
            # More spans than the sending queue holds (100k), from many connections at once:
            # calltrace must answer 503 + Retry-After and keep its memory flat.
            flood = args.flood_concurrency
            flood_proto = [
                Body(r.SerializeToString(), span_count(r))
                for r in build_requests(flood_total, 500, prefix="RM_flood")
            ]
            flood_spans = sum(b.spans for b in flood_proto)
            side_by_side(
                protobuf_label(),
                protobuf_yardstick,
                lambda y: calltrace(
                    f"calltrace default, flood ({flood} conns, {flood_spans:,} spans)",
                    flood_proto,
                    warm_proto,
                    y,
                    flood,
                ),
            )
            del flood_proto
        if spreads:
            notes.append(
                f"each row ran {rounds} times, each time between two runs of its yardstick;"
                " the table shows the round whose ratio is the median, beside the mean of"
                " the yardstick runs around it. Over all rounds: " + "; ".join(spreads) + "."
            )
        if len(yardsticks) > 1:
            speeds = [y.persisted_per_s for y in yardsticks]
            notes.append(
                f"the protobuf yardstick ran {len(speeds)} times in this run, between"
                f" {min(speeds):,.0f} and {max(speeds):,.0f} spans/s"
                f" ({max(speeds) / min(speeds):.2f}x): the machine's speed moved by that much"
                " while the rows were measured, so each row is compared with the yardstick"
                " runs just before and after it."
            )
        if args.profile:
            notes += profile_ingest(proto, c, headers, tmpdir / "profile", RESULTS)

    elapsed = time.perf_counter() - began
    by_name = by_name_of(rows)
    lines = [
        "# calltrace ingest benchmark",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} cores"
        f" ({_cpu_model()}), Python {platform.python_version()}, {platform.platform()}."
        f" Load generator on the same machine, {c} concurrent keep-alive HTTP/1.1"
        f" connections (50-span rows: one request at a time; flood row:"
        f" {args.flood_concurrency}); {sum(b.spans for b in proto)} spans"
        f" a scenario in ~500-span requests ({_bytes_per_span(proto):.0f} bytes/span protobuf),"
        f" {sum(b.spans for b in small_proto)} spans in ~50-span requests; bench took"
        f" {elapsed:.0f} s. The machine is shared (other work runs on the same cores), so"
        " absolute figures vary between runs; each calltrace row's ratios are to the yardstick"
        " measured just before and just after it (their mean), in this one run"
        + (f" (the median of {rounds} rounds, see the notes)." if rounds > 1 else "."),
        "",
        "| scenario | spans/s persisted | vs yardstick | p50 ms | p99 ms | vs yardstick p99"
        " | peak RSS MiB | CPU s /100k spans | vs yardstick | 429/503 | startup s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = by_name[r.yardstick]
        lines.append(
            f"| {r.name} | {r.persisted_per_s:,.0f} |"
            f" {fmt_ratio(r.persisted_per_s, base.persisted_per_s)} |"
            f" {r.p50_ms:.1f} | {r.p99_ms:.1f} | {fmt_ratio(r.p99_ms, base.p99_ms)} |"
            f" {r.peak_rss_mib:.0f} | {r.cpu_per_100k:.2f} |"
            f" {fmt_ratio(r.cpu_per_100k, base.cpu_per_100k)} | {r.refused} | {r.startup_s:.2f} |"
        )
    lines += [
        "",
        "Yardstick: `bench/baseline.py`, a bare aiohttp server on uvloop (as calltrace runs)"
        " that parses each request (`ExportTraceServiceRequest.ParseFromString`, or `json.loads`"
        " for OTLP/JSON), reads every span's ids, name, times and attributes once and answers an"
        " empty response; it stores nothing. calltrace rows run the default pipeline (auth, skip,"
        " correlate, batch, SQLite with the query indexes); *persisted* counts spans stored in"
        " SQLite (in the Redis Streams rows: in SQLite and in the project's stream), timed until"
        " every span answered 200 is there (a span answered 200 and not stored fails the"
        " bench); `redis-server`'s own CPU is not in the CPU column. Latency is per request as the load generator sees it; peak"
        " RSS is the VmHWM of the server and its child processes, summed; CPU is their"
        " user+system time. The flood"
        " row drives many more connections than the others to show memory under backpressure.",
        *[f"\nNote: {n}" for n in notes],
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(table)
    return 0


def by_name_of(rows: list[Row]) -> dict[str, Row]:
    return {r.name: r for r in rows}


def _bytes_per_span(bodies: list[Body]) -> float:
    return sum(len(b.payload) for b in bodies) / max(1, sum(b.spans for b in bodies))


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
