import asyncio

import pytest
import requests

from collector import RefusedError, RequestInfo
from collector.config import ConfigError, parse_config
from processors.memory_limiter import (
    MemoryLimiterConfig,
    MemoryLimiterProcessor,
    MiB,
    rss_bytes,
)
from tests.conftest import memory_pipeline
from tests.processors._util import FakeTelemetryHost, batch, resource_spans
from tests.support import fixture_requests


def vm_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_rss_is_the_resident_set_size():
    measured, reference = rss_bytes(), vm_rss()
    assert measured > 0
    assert abs(measured - reference) < 16 * MiB


async def limiter(**config) -> MemoryLimiterProcessor:
    processor = MemoryLimiterProcessor("memory_limiter", MemoryLimiterConfig(**config))
    host = FakeTelemetryHost()
    await processor.start(host)
    processor.host_for_test = host
    return processor


async def test_refuses_above_the_limit_with_retry_after():
    processor = await limiter(limit_mib=2, spike_limit_mib=1, retry_after="3s")
    try:
        assert processor.refusing and processor.over_hard_limit
        with pytest.raises(RefusedError) as refused:
            await processor.admit(RequestInfo(headers={}))
        assert refused.value.retry_after == 3.0
        assert not refused.value.throttled  # 503, which OTLP clients retry
        with pytest.raises(RefusedError):
            await processor.process(batch(resource_spans({}, [{}])))
        telemetry = processor.host_for_test.telemetry
        labels = {"processor": "memory_limiter"}
        assert telemetry.value("calltrace_memory_limiter_refusing", **labels) == 1
        assert telemetry.value("calltrace_memory_limiter_rss_bytes", **labels) > 2 * MiB
    finally:
        await processor.shutdown()


async def test_admits_below_the_limit():
    processor = await limiter(limit_mib=64 * 1024)
    try:
        await processor.admit(RequestInfo(headers={}))
        data = batch(resource_spans({}, [{}]))
        assert await processor.process(data) is data
        assert not processor.refusing
    finally:
        await processor.shutdown()


async def test_starts_accepting_again_when_usage_falls():
    processor = await limiter(limit_mib=2, spike_limit_mib=1, check_interval="10ms")
    try:
        assert processor.refusing
        # Raising the limit stands in for memory being freed: the next check admits again.
        processor.config.limit_mib = 64 * 1024
        processor.config.spike_limit_mib = 0
        for _ in range(100):
            if not processor.refusing:
                break
            await asyncio.sleep(0.01)
        await processor.admit(RequestInfo(headers={}))
    finally:
        await processor.shutdown()


def test_config_is_checked():
    document = memory_pipeline(
        {"otlp": {}}, {"memory_limiter": {"limit_mib": 100, "spike_limit_mib": 100}}
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(document, environ={})
    assert len(caught.value.errors) == 1
    assert caught.value.errors[0].startswith(
        "processors.memory_limiter: spike_limit_mib (100) must be below limit_mib (100)"
    )
    document["processors"]["memory_limiter"] = {"check_interval": "often"}
    with pytest.raises(ConfigError) as caught:
        parse_config(document, environ={})
    assert caught.value.errors[0].startswith(
        'processors.memory_limiter.check_interval: expected a duration like "200ms"'
    )


async def test_over_the_limit_the_receiver_answers_503_with_retry_after(make_service, free_port):
    port = free_port()
    service = await make_service(
        memory_pipeline(
            {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{port}"}}}},
            {"memory_limiter": {"limit_mib": 2, "spike_limit_mib": 1, "retry_after": "2s"}},
        )
    )
    body = fixture_requests("livekit")[0].read_bytes()
    response = await asyncio.to_thread(
        requests.post,
        f"http://127.0.0.1:{port}/v1/traces",
        data=body,
        headers={"Content-Type": "application/x-protobuf"},
        timeout=10,
    )
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "2"
    assert service.component("memory").span_count == 0
