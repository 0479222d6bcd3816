"""OTLP/gRPC with gzip-compressed messages: gRPC inflates them (in its core, off the
event loop) and ``max_recv_msg_size`` bounds the inflated size, so a compression bomb is
RESOURCE_EXHAUSTED while the HTTP port's /healthz stays prompt, and the next request is
served."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from tests.conftest import memory_pipeline
from tests.receivers.test_otlp_grpc import METHOD, auth, good_body

METADATA = (("authorization", "Bearer test-key"),)


async def export_gzip(port: int, body: bytes):
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", compression=grpc.Compression.Gzip
    ) as channel:
        call = channel.unary_unary(
            METHOD,
            request_serializer=None,
            response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString,
        )
        return await call(body, metadata=METADATA, timeout=20)


@pytest.fixture
async def collector(make_service, free_port):
    grpc_port, http_port = free_port(), free_port()
    receivers = {
        "otlp": {
            "protocols": {
                "grpc": {"endpoint": f"127.0.0.1:{grpc_port}", "max_recv_msg_size": "1MiB"},
                "http": {"endpoint": f"127.0.0.1:{http_port}"},
            }
        }
    }
    service = await make_service(memory_pipeline(receivers, auth()))
    return grpc_port, http_port, service.exporters["memory"]


async def test_a_gzip_message_inflating_past_the_limit_is_resource_exhausted(collector):
    grpc_port, http_port, exporter = collector
    bomb = good_body(1, name="x" * (64 * 1024 * 1024))  # 64 MiB of one letter: ~64 KiB gzip
    latencies: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                began = time.monotonic()
                async with session.get(f"http://127.0.0.1:{http_port}/healthz") as response:
                    assert response.status == 200
                latencies.append(time.monotonic() - began)
                await asyncio.sleep(0.01)

    prober = asyncio.create_task(probe())
    while len(latencies) < 3:  # connected and answering
        await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await export_gzip(grpc_port, bomb)
    stop.set()
    await prober
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exporter.span_count == 0
    assert max(latencies) < 0.5, max(latencies)  # a shared 2-core machine: margin

    response = await export_gzip(grpc_port, good_body(3))
    assert not response.HasField("partial_success")
    assert exporter.span_count == 3
