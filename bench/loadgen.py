"""A fixed-concurrency OTLP/HTTP load generator over keep-alive connections.

It sends pre-serialized bodies (built before the clock starts), records each request's
latency and status, and honours ``Retry-After`` by re-sending a refused body later, so
every span is eventually accepted and the bench can check none was lost.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Body:
    payload: bytes
    spans: int
    content_type: str = "application/x-protobuf"
    encoding: str | None = None


@dataclass
class LoadResult:
    sent_spans: int = 0
    accepted_spans: int = 0
    requests: int = 0
    refused: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def gzip_bodies(bodies: list[Body]) -> list[Body]:
    return [Body(gzip.compress(b.payload, 5), b.spans, b.content_type, "gzip") for b in bodies]


async def drive(
    url: str,
    bodies: list[Body],
    *,
    concurrency: int,
    headers: dict[str, str] | None = None,
    max_attempts: int = 50,
) -> LoadResult:
    result = LoadResult()
    queue: asyncio.Queue[Body] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    result.sent_spans = sum(b.spans for b in bodies)
    attempts: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)

    async def worker(session: aiohttp.ClientSession) -> None:
        while True:
            try:
                body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            request_headers = {"Content-Type": body.content_type, **(headers or {})}
            if body.encoding:
                request_headers["Content-Encoding"] = body.encoding
            started = time.perf_counter()
            try:
                async with session.post(url, data=body.payload, headers=request_headers) as resp:
                    await resp.read()
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
            except aiohttp.ClientError:
                status, retry_after = 0, "0.2"
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
            result.requests += 1
            if status == 200:
                result.accepted_spans += body.spans
                continue
            if status in (429, 503) or status == 0:
                result.refused += 1
                key = id(body)
                attempts[key] = attempts.get(key, 0) + 1
                if attempts[key] < max_attempts:
                    await asyncio.sleep(min(float(retry_after or 1), 1.0))
                    queue.put_nowait(body)
                    continue
            result.errors += 1

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - started
    return result
