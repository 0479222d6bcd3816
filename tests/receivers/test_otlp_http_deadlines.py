"""OTLP/HTTP under slow, stalled and expensive bodies, over raw sockets.

A body that does not arrive within ``read_timeout`` is answered 408 and, while it is
awaited, holds nothing that other requests wait for: more stalled bodies than
``max_concurrent_requests`` leave the receiver answering everyone else at once. A gzip
body of many members is refused (400) without keeping the event loop busy.
"""

from __future__ import annotations

import asyncio
import gzip
import time

import aiohttp
import pytest
from google.rpc import status_pb2

from collector.receivers.otlp_http import MAX_GZIP_MEMBERS
from tests.conftest import memory_pipeline
from tests.receivers.test_otlp_http import KEY, PROTOBUF, http_receiver, post, request_with

READ_TIMEOUT = 1.5


@pytest.fixture
async def collector(make_service, free_port):
    """(port, exporter) of a collector with a short ``read_timeout`` and 16 turns."""
    port = free_port()
    config = memory_pipeline(
        http_receiver(
            port,
            read_timeout=f"{READ_TIMEOUT}s",
            max_concurrent_requests=16,
            max_request_body_size="4MiB",
        ),
        {"auth": {"type": "tests.conftest:HeaderAuthProcessor"}},
    )
    service = await make_service(config)
    yield port, service.exporters["memory"]


def head(port: int, chunked: bool = False, length: int = 0, encoding: str = "") -> bytes:
    lines = [
        "POST /v1/traces HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Content-Type: {PROTOBUF}",
        f"Authorization: {KEY['Authorization']}",
        "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}",
    ]
    if encoding:
        lines.append(f"Content-Encoding: {encoding}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response with a Content-Length."""
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def stalled_request(port: int, chunked: bool) -> asyncio.StreamReader:
    """A request whose body starts and then never finishes; its reader."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = request_with(3).SerializeToString()
    if chunked:
        writer.write(head(port, chunked=True) + chunk(body[:10]))
    else:
        writer.write(head(port, length=len(body)) + body[:10])
    await writer.drain()
    reader._stalled_writer = writer  # type: ignore[attr-defined]  # kept open
    return reader


async def test_stalled_bodies_hold_up_no_one_and_get_408(collector):
    port, exporter = collector
    url = f"http://127.0.0.1:{port}/v1/traces"
    # More stalled bodies than turns (16), chunked and with a Content-Length.
    stalled = [await stalled_request(port, chunked=n % 2 == 0) for n in range(20)]
    await asyncio.sleep(0.2)  # all of them are in the handler, waiting for bytes

    began = time.monotonic()
    for _ in range(5):
        status, _, _ = await post(url, request_with(2).SerializeToString())
        assert status == 200
    assert time.monotonic() - began < READ_TIMEOUT / 2, "exports waited for stalled bodies"
    assert exporter.span_count == 10

    answers = await asyncio.wait_for(
        asyncio.gather(*(read_response(reader) for reader in stalled)), READ_TIMEOUT + 5
    )
    for status, body in answers:
        assert status == 408
        assert "read_timeout" in status_pb2.Status.FromString(body).message
    assert exporter.span_count == 10  # no stalled body was stored
    for reader in stalled:
        reader._stalled_writer.close()  # type: ignore[attr-defined]

    status, _, _ = await post(url, request_with(1).SerializeToString())
    assert status == 200
    assert exporter.span_count == 11


async def test_a_slow_chunked_body_that_arrives_in_time_is_stored(collector):
    port, exporter = collector
    body = request_with(4).SerializeToString()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(port, chunked=True))
    pieces = [body[i : i + len(body) // 5 + 1] for i in range(0, len(body), len(body) // 5 + 1)]
    for piece in pieces:  # ~1 s in all, under the 1.5 s deadline
        writer.write(chunk(piece))
        await writer.drain()
        await asyncio.sleep(READ_TIMEOUT / (len(pieces) + 2))
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    status, _ = await asyncio.wait_for(read_response(reader), 5)
    writer.close()
    assert status == 200
    assert exporter.span_count == 4


async def test_a_body_sent_a_byte_at_a_time_past_the_deadline_gets_408(collector):
    """The deadline is for the whole body, not between reads."""
    port, exporter = collector
    body = request_with(2).SerializeToString()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(port, length=len(body)))
    began = time.monotonic()

    async def trickle() -> None:
        for byte in body:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    status, _ = await asyncio.wait_for(read_response(reader), READ_TIMEOUT + 5)
    sender.cancel()
    writer.close()
    assert status == 408
    assert READ_TIMEOUT - 0.1 < time.monotonic() - began < READ_TIMEOUT + 1
    assert exporter.span_count == 0


async def healthz_latencies(port: int, stop: asyncio.Event) -> list[float]:
    latencies = []
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            began = time.monotonic()
            async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
            latencies.append(time.monotonic() - began)
            await asyncio.sleep(0.01)
    return latencies


async def test_a_gzip_body_of_many_empty_members_is_400_and_healthz_stays_prompt(collector):
    port, exporter = collector
    url = f"http://127.0.0.1:{port}/v1/traces"
    bomb = gzip.compress(b"") * 150_000  # ~3 MB, inflates to nothing, member by member
    stop = asyncio.Event()
    probe = asyncio.create_task(healthz_latencies(port, stop))
    await asyncio.sleep(0.05)
    answers = await asyncio.gather(
        *(post(url, bomb, **{"Content-Encoding": "gzip"}) for _ in range(4))
    )
    stop.set()
    latencies = await probe
    for status, _, body in answers:
        assert status == 400
        assert "members" in status_pb2.Status.FromString(body).message
    assert max(latencies) < 0.5, f"/healthz waited {max(latencies):.3f}s"

    allowed = gzip.compress(b"") * (MAX_GZIP_MEMBERS - 1) + gzip.compress(
        request_with(2).SerializeToString()
    )
    status, _, _ = await post(url, allowed, **{"Content-Encoding": "gzip"})
    assert status == 200
    assert exporter.span_count == 2


async def test_large_gzip_bodies_are_inflated_in_a_worker_thread_and_stored(collector):
    port, exporter = collector
    url = f"http://127.0.0.1:{port}/v1/traces"
    raw = request_with(6000).SerializeToString()
    assert len(raw) < 4 * 1024 * 1024
    body = gzip.compress(raw, 1)
    assert len(body) > 16 * 1024  # above what inflates inline
    answers = await asyncio.gather(
        *(post(url, body, **{"Content-Encoding": "gzip"}) for _ in range(3))
    )
    assert [status for status, _, _ in answers] == [200] * 3
    assert exporter.span_count == 18000


async def test_bodies_in_hand_are_bounded_and_small_requests_still_pass(make_service, free_port):
    """Bodies being read hold at most max_concurrent_requests x max_request_body_size
    bytes in all; past that a body is refused (503, Retry-After), not waited for."""
    port = free_port()
    config = memory_pipeline(
        http_receiver(
            port, max_concurrent_requests=1, max_request_body_size="64KiB", read_timeout="5s"
        ),
        {"auth": {"type": "tests.conftest:HeaderAuthProcessor"}},
    )
    exporter = (await make_service(config)).exporters["memory"]
    held = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head(port, length=60_000) + b"\x00" * 40_000)  # and then nothing
        await writer.drain()
        held.append((reader, writer))
        await asyncio.sleep(0.2)
    status, body = await asyncio.wait_for(read_response(held[1][0]), 2)
    assert status == 503
    assert "request bodies" in status_pb2.Status.FromString(body).message

    status, _, _ = await post(
        f"http://127.0.0.1:{port}/v1/traces", request_with(2).SerializeToString()
    )
    assert status == 200
    assert exporter.span_count == 2
    for _, writer in held:
        writer.close()
