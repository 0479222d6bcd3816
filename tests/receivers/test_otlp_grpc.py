"""OTLP/gRPC: the SDK's gRPC exporter, status codes, auth before decoding, TLS."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from collector.receivers.otlp_grpc import TRACE_SERVICE
from tests.conftest import memory_pipeline
from tests.processors._util import resource_spans

METHOD = f"/{TRACE_SERVICE}/Export"


def grpc_receiver(port: int, **settings) -> dict:
    return {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{port}", **settings}}}}


def auth() -> dict:
    return {"auth": {"type": "tests.conftest:HeaderAuthProcessor"}}


async def export_raw(port: int, body: bytes, metadata=(), credentials=None):
    target = f"127.0.0.1:{port}"
    channel = (
        grpc.aio.secure_channel(target, credentials)
        if credentials
        else grpc.aio.insecure_channel(target)
    )
    async with channel:
        call = channel.unary_unary(
            METHOD,
            request_serializer=None,
            response_deserializer=trace_service_pb2.ExportTraceServiceResponse.FromString,
        )
        return await call(body, metadata=metadata, timeout=10)


def good_body(spans: int = 2, **span_fields) -> bytes:
    rs = resource_spans({"livekit.room.id": "RM_g"}, [{}] * spans)
    for field, value in span_fields.items():
        setattr(rs.scope_spans[0].spans[0], field, value)
    return trace_service_pb2.ExportTraceServiceRequest(resource_spans=[rs]).SerializeToString()


async def test_sdk_grpc_exporter_delivers(make_service, free_port):
    import asyncio

    port = free_port()
    service = await make_service(memory_pipeline(grpc_receiver(port), auth()))

    def emit() -> None:
        provider = TracerProvider(resource=Resource.create({"livekit.room.id": "RM_grpc"}))
        provider.add_span_processor(
            SimpleSpanProcessor(
                OTLPSpanExporter(
                    endpoint=f"127.0.0.1:{port}",
                    insecure=True,
                    headers={"authorization": "Bearer test-key"},
                )
            )
        )
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("agent_turn"), tracer.start_as_current_span("llm_node"):
            pass
        provider.shutdown()

    await asyncio.to_thread(emit)
    exporter = service.exporters["memory"]
    assert exporter.span_count == 2
    names = sorted(
        span.name
        for rs in exporter.request().resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    )
    assert names == ["agent_turn", "llm_node"]


async def test_unauthenticated_before_decoding(make_service, free_port):
    port = free_port()
    await make_service(memory_pipeline(grpc_receiver(port), auth()))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await export_raw(port, b"not a protobuf at all")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_malformed_message_is_invalid_argument(make_service, free_port):
    port = free_port()
    service = await make_service(memory_pipeline(grpc_receiver(port), auth()))
    metadata = (("authorization", "Bearer test-key"),)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await export_raw(port, b"\xff\xff\xff\xff", metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    response = await export_raw(port, good_body(3), metadata)
    assert not response.HasField("partial_success")
    assert service.exporters["memory"].span_count == 3


async def test_partial_success_for_invalid_span_id(make_service, free_port):
    port = free_port()
    service = await make_service(memory_pipeline(grpc_receiver(port), auth()))
    response = await export_raw(
        port, good_body(2, span_id=b"\x00" * 8), (("authorization", "Bearer test-key"),)
    )
    assert response.partial_success.rejected_spans == 1
    assert service.exporters["memory"].span_count == 1


@pytest.mark.parametrize(
    "throttled,code",
    [(False, grpc.StatusCode.UNAVAILABLE), (True, grpc.StatusCode.RESOURCE_EXHAUSTED)],
)
async def test_refusal_codes_carry_retry_info(make_service, free_port, throttled, code):
    from google.rpc import error_details_pb2

    port = free_port()
    refuse = {"refuse": {"type": "tests.conftest:RefusingProcessor", "throttled": throttled}}
    await make_service(memory_pipeline(grpc_receiver(port), refuse))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await export_raw(port, good_body(1))
    assert info.value.code() == code
    trailers = dict(info.value.trailing_metadata() or ())
    retry = error_details_pb2.RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
    assert retry.retry_delay.seconds == 1


async def test_grpc_over_tls(make_service, free_port, tls_files):
    port = free_port()
    service = await make_service(
        memory_pipeline(grpc_receiver(port, tls=tls_files.server_tls()), auth())
    )
    credentials = grpc.ssl_channel_credentials(tls_files.ca_file.read_bytes())
    await export_raw(port, good_body(2), (("authorization", "Bearer test-key"),), credentials)
    assert service.exporters["memory"].span_count == 2
