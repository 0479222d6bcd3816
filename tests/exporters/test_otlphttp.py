"""``otlphttp`` against a real aiohttp server, and a sidecar forwarding to a gateway."""

from __future__ import annotations

import asyncio
import gzip
import logging
import time
from typing import Any

import pytest
from aiohttp import web
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from collector import PermanentError, RetryableError
from collector.calls import call_id_for
from collector.config import ConfigError, parse_config
from collector.exporterhelper import ExporterQueue
from collector.keys import KeyStore
from collector.otlp_json import decode_request
from collector.spans import ExportTraceServiceRequest, SpanBatch, serialize_resource_spans
from exporters.otlphttp import OTLPHTTPConfig, OTLPHTTPExporter
from tests.processors._util import FakeTelemetryHost, batch, resource_spans
from tests.support import (
    emit_session,
    eventually,
    free_port,
    once_stored,
    pipeline_config,
    running_service,
    sdk_provider,
)


class Sink:
    """An OTLP/HTTP server that records what it is sent and answers as told."""

    def __init__(self) -> None:
        self.requests: list[tuple[Any, bytes]] = []  # (case-insensitive headers, body)
        self.arrived: list[float] = []
        self.answers: list[web.Response] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.headers.copy(), await request.read()))
        self.arrived.append(time.monotonic())
        if self.answers:
            return self.answers.pop(0)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def spans(self, index: int = -1) -> ExportTraceServiceRequest:
        headers, body = self.requests[index]
        if body[:2] == b"\x1f\x8b":  # (aiohttp's server inflates gzip bodies itself)
            body = gzip.decompress(body)
        if headers["Content-Type"] == "application/json":
            return decode_request(body)
        return ExportTraceServiceRequest.FromString(body)


@pytest.fixture
async def sink():
    server = Sink()
    app = web.Application()
    app.router.add_post("/v1/traces", server.handle)
    app.router.add_post("/custom/path", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", server.port).start()
    yield server
    await runner.cleanup()


async def started(**config) -> OTLPHTTPExporter:
    exporter = OTLPHTTPExporter("otlphttp", OTLPHTTPConfig(**config))
    await exporter.start(FakeTelemetryHost())
    return exporter


def names(request: ExportTraceServiceRequest) -> list[str]:
    return [s.name for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]


async def test_queued_bytes_are_sent_as_protobuf_gzip_with_the_headers(sink):
    exporter = await started(endpoint=sink.url, headers={"authorization": "Bearer gw-key"})
    rs = resource_spans({"service.name": "agent"}, [{"name": "stt"}, {"name": "llm"}])
    try:
        await exporter.export(SpanBatch.from_bytes(serialize_resource_spans([rs]), "p1"))
        await exporter.export(batch(resource_spans({}, [{"name": "tts"}])))  # messages too
    finally:
        await exporter.shutdown()
    headers, _ = sink.requests[0]
    assert headers["authorization"] == "Bearer gw-key"
    assert headers["Content-Type"] == "application/x-protobuf"
    assert headers["Content-Encoding"] == "gzip"
    assert names(sink.spans(0)) == ["stt", "llm"]
    assert sink.spans(0).resource_spans[0].resource == rs.resource
    assert names(sink.spans(1)) == ["tts"]


async def test_json_without_compression_to_a_traces_endpoint(sink):
    exporter = await started(
        endpoint="http://unused:1",
        traces_endpoint=f"{sink.url}/custom/path",
        encoding="json",
        compression="none",
    )
    try:
        await exporter.export(batch(resource_spans({}, [{"name": "turn"}])))
    finally:
        await exporter.shutdown()
    headers, body = sink.requests[0]
    assert headers["Content-Type"] == "application/json" and "Content-Encoding" not in headers
    assert body.startswith(b"{")
    assert names(sink.spans(0)) == ["turn"]


async def test_answers_decide_retry_or_drop(sink):
    """429/502/503/504 are retried (Retry-After kept), other statuses are final, with the
    server's own message."""
    exporter = await started(endpoint=sink.url)
    failed = Status(code=3, message="span 7 has no name").SerializeToString()
    sink.answers += [
        web.Response(status=503, headers={"Retry-After": "2"}, text="busy"),
        web.Response(status=429),
        web.Response(status=400, body=failed, content_type="application/x-protobuf"),
        web.Response(status=404, text="no such path"),
    ]
    try:
        with pytest.raises(RetryableError) as busy:
            await exporter.export(batch(resource_spans({}, [{}])))
        assert busy.value.retry_after == 2.0
        with pytest.raises(RetryableError) as throttled:
            await exporter.export(batch(resource_spans({}, [{}])))
        assert throttled.value.retry_after is None
        with pytest.raises(PermanentError, match="400: span 7 has no name"):
            await exporter.export(batch(resource_spans({}, [{}])))
        with pytest.raises(PermanentError, match="404: no such path"):
            await exporter.export(batch(resource_spans({}, [{}])))
        await exporter.export(batch(resource_spans({}, [{}])))  # and then it is up again
    finally:
        await exporter.shutdown()
    assert len(sink.requests) == 5


async def test_an_unreachable_endpoint_is_retryable():
    exporter = await started(endpoint=f"http://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(RetryableError):
            await exporter.export(batch(resource_spans({}, [{}])))
    finally:
        await exporter.shutdown()


async def test_a_partial_success_is_logged_and_not_sent_again(sink, caplog):
    response = ExportTraceServiceResponse()
    response.partial_success.rejected_spans = 1
    response.partial_success.error_message = "span too old"
    sink.answers.append(
        web.Response(body=response.SerializeToString(), content_type="application/x-protobuf")
    )
    exporter = await started(endpoint=sink.url)
    try:
        with caplog.at_level(logging.WARNING, logger="exporters.otlphttp"):
            await exporter.export(batch(resource_spans({}, [{}, {}])))
    finally:
        await exporter.shutdown()
    assert "rejected 1 spans: span too old" in caplog.text
    assert len(sink.requests) == 1


async def test_the_queue_waits_as_long_as_retry_after_asks(sink):
    """The exporter helper retries a throttled batch no sooner than the server asked."""
    sink.answers.append(web.Response(status=503, headers={"Retry-After": "1"}))
    exporter = await started(endpoint=sink.url, retry_on_failure={"initial_interval": "10ms"})
    queue = ExporterQueue(exporter)
    await queue.start()
    try:
        await queue.put(batch(resource_spans({}, [{"name": "late"}])))
        await eventually(lambda: len(sink.requests) == 2, timeout=10)
    finally:
        await queue.shutdown()
        await exporter.shutdown()
    assert names(sink.spans(1)) == ["late"]
    # Backoff alone would have retried after ~10 ms.
    assert sink.arrived[1] - sink.arrived[0] >= 0.95


def test_config_errors_name_the_path():
    with pytest.raises(ConfigError) as error:
        parse_config(
            {
                "receivers": {"otlp": {"protocols": {"http": {}}}},
                "exporters": {"otlphttp": {"endpoint": "gateway:4318", "compression": "zstd"}},
                "service": {
                    "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["otlphttp"]}}
                },
            }
        )
    text = str(error.value)
    assert "exporters.otlphttp.endpoint:" in text and "https://gateway:4318" in text
    assert "exporters.otlphttp.compression:" in text


async def test_a_sidecar_forwards_an_sdks_spans_to_a_gateway_over_https(
    tmp_path, tls_files, no_ca_bundle_override
):
    """An agent's SDK -> a sidecar calltrace (its own key, the default pipeline, then
    otlphttp) -> a gateway calltrace over HTTPS with the gateway's key: the spans are
    stored once at the gateway, in the project of the gateway's key, linked to the call."""
    gateway_db, sidecar_db = tmp_path / "gateway.db", tmp_path / "sidecar.db"
    gateway_key, _ = KeyStore(gateway_db).create("fleet")
    sidecar_key, _ = KeyStore(sidecar_db).create("agent-host")
    gateway_port, sidecar_port = free_port(), free_port()
    gateway = pipeline_config(gateway_port, gateway_db)
    gateway["receivers"]["otlp"]["protocols"]["http"]["tls"] = tls_files.server_tls()
    sidecar = pipeline_config(sidecar_port, sidecar_db)
    sidecar["exporters"] = {
        "otlphttp": {
            "endpoint": f"https://127.0.0.1:{gateway_port}",
            "headers": {"Authorization": f"Bearer {gateway_key}"},
            "tls": {"ca_file": str(tls_files.ca_file)},
        }
    }
    sidecar["service"]["pipelines"]["traces"]["exporters"] = ["otlphttp"]

    provider = sdk_provider(
        f"http://127.0.0.1:{sidecar_port}/v1/traces",
        sidecar_key,
        {"service.name": "voice-agent", "livekit.room.id": "RM_1"},
    )
    async with running_service(gateway), running_service(sidecar):
        await asyncio.to_thread(emit_session, provider)
        rows = await once_stored(
            gateway_db, 2, "SELECT name, project, call_id FROM spans ORDER BY name"
        )
    call = call_id_for("fleet", "RM_1")
    assert rows == [("agent_session", "fleet", call), ("llm_node", "fleet", call)]


def test_the_sidecar_example_config_validates_with_its_variables(tmp_path):
    from collector.config import load_config
    from tests.support import ROOT

    env = {
        "CALLTRACE_KEY": "ct_local",
        "CALLTRACE_GATEWAY": "https://gateway.internal:4318",
        "CALLTRACE_GATEWAY_KEY": "ct_gateway",
    }
    config = load_config(ROOT / "config" / "sidecar.yaml", environ=env)
    exporter = config.exporters["otlphttp"].config
    assert exporter.url == "https://gateway.internal:4318/v1/traces"
    assert exporter.headers == {"authorization": "Bearer ct_gateway"}
    assert exporter.sending_queue.storage is not None
    with pytest.raises(ConfigError, match="CALLTRACE_GATEWAY"):
        load_config(ROOT / "config" / "sidecar.yaml", environ={"CALLTRACE_KEY": "k"})
