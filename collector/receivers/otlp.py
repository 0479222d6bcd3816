"""The ``otlp`` receiver: OTLP traces over HTTP (protobuf and JSON) and gRPC.

Config, in the OpenTelemetry Collector's shape::

    receivers:
      otlp:
        protocols:
          http:                      # present (even empty) => listen; default 127.0.0.1:4318
            endpoint: 127.0.0.1:4318
            traces_paths: [/v1/traces, /v1/otel/v1/traces]
            logs_paths: [/v1/logs]         # served when the receiver feeds a logs pipeline
            metrics_paths: [/v1/metrics]   # ... a metrics pipeline
            max_request_body_size: 4MiB
            tls: {cert_file: ..., key_file: ..., client_ca_file: ...}
            insecure: false
          grpc:                      # default 127.0.0.1:4317
            endpoint: 127.0.0.1:4317
            max_recv_msg_size: 4MiB

Without ``protocols`` only HTTP listens, with its defaults. Both transports share
``TraceIngest``: drop spans with invalid ids (counted in ``partial_success``), hand the
rest to the pipeline as one ``SpanBatch``, count the outcome. Logs and metrics go the
same way through a ``SignalIngest`` (a ``LogBatch`` / ``MetricBatch``), for each of those
signals the receiver feeds a pipeline of (``Receiver.consumers``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceResponse,
)
from pydantic import Field, ValidationInfo, field_validator, model_validator

from collector import otlp_json
from collector.components import ComponentConfig, Consumer, Host, Receiver, RequestInfo
from collector.otlp_json import INVALID_HEX_ID
from collector.signals import ALL_SIGNALS, batch_type
from collector.spans import (
    ExportTraceServiceRequest,
    SpanBatch,
)
from collector.tls import TLSSettings, check_listener
from collector.units import ByteSize, Duration
from collector.wire import NATIVE_WIRE
from collector.wire import native as _wire

if TYPE_CHECKING:
    from collector.receivers.otlp_grpc import GRPCListener
    from collector.receivers.otlp_http import HTTPListener
    from collector.telemetry import Telemetry

__all__ = [
    "GRPCSettings",
    "HTTPSettings",
    "OTLPConfig",
    "OTLPReceiver",
    "ProtocolsConfig",
    "SignalIngest",
    "TraceIngest",
    "drop_invalid_spans",
]

MiB = 1024 * 1024


class _ListenerSettings(ComponentConfig):
    # ``tls`` and ``insecure`` come before ``endpoint`` on purpose: pydantic validates
    # fields in order, so the endpoint's validator sees them and its error names the
    # endpoint's YAML path.
    tls: TLSSettings | None = None
    """HTTPS/TLS; with ``client_ca_file``, clients must present a certificate (mTLS)."""
    insecure: bool = False
    """Allow plain text on a non-loopback address."""
    endpoint: str

    @field_validator("endpoint")
    @classmethod
    def _loopback_or_tls(cls, endpoint: str, info: ValidationInfo) -> str:
        if "tls" not in info.data or "insecure" not in info.data:
            return endpoint  # the tls block is invalid and already reported
        return check_listener(endpoint, info.data["tls"], info.data["insecure"])


class HTTPSettings(_ListenerSettings):
    endpoint: str = "127.0.0.1:4318"
    traces_paths: list[str] = Field(
        default_factory=lambda: ["/v1/traces", "/v1/otel/v1/traces"], min_length=1
    )
    logs_paths: list[str] = Field(default_factory=lambda: ["/v1/logs"], min_length=1)
    metrics_paths: list[str] = Field(default_factory=lambda: ["/v1/metrics"], min_length=1)
    max_request_body_size: ByteSize = 4 * MiB
    """Largest body accepted, compressed and after decompression (413 above it)."""
    read_timeout: Duration = Field(default=30.0, gt=0)
    """The whole body must arrive within this time of the request's headers (the
    OpenTelemetry Collector's ``confighttp`` name); later, the request is answered 408
    and the connection closed. A body being read holds no turn, lock or budget share."""
    max_concurrent_requests: int = Field(default=16, ge=1)
    """Export requests decoded and handed on at once; more wait, their bodies read, for
    a turn. Bounds the memory of parsed requests under a flood."""
    max_concurrent_bytes: ByteSize = 3 * MiB // 2
    """The requests decoded and handed on at once, by size, at most: a request counts
    as its body's size until the body is decoded, then as its protobuf bytes. More wait for a turn, in arrival order, and a larger request goes alone.
    Many small requests still share the pipeline's batches, few large ones hold few
    parsed copies: the default keeps about four 500-span requests at a time."""

    @field_validator("traces_paths", "logs_paths", "metrics_paths")
    @classmethod
    def _absolute_paths(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not path.startswith("/"):
                raise ValueError(f'expected paths starting with "/", got {path!r}')
        return paths


class GRPCSettings(_ListenerSettings):
    endpoint: str = "127.0.0.1:4317"
    max_recv_msg_size: ByteSize = 4 * MiB
    """Largest request message (after decompression); RESOURCE_EXHAUSTED above it."""


class ProtocolsConfig(ComponentConfig):
    """A protocol listens when its key is present, even empty (``http:`` in YAML)."""

    http: HTTPSettings | None = None
    grpc: GRPCSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _empty_means_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: ({} if v is None and k in ("http", "grpc") else v) for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _at_least_one(self) -> ProtocolsConfig:
        if self.http is None and self.grpc is None:
            raise ValueError("expected at least one of http, grpc")
        return self


class OTLPConfig(ComponentConfig):
    protocols: ProtocolsConfig = Field(default_factory=lambda: ProtocolsConfig(http=HTTPSettings()))

    @model_validator(mode="before")
    @classmethod
    def _null_protocols(cls, data: Any) -> Any:
        if isinstance(data, dict) and "protocols" in data and data["protocols"] is None:
            data = {k: v for k, v in data.items() if k != "protocols"}  # "protocols:" alone
        return data


class OTLPReceiver(Receiver):
    """Listens for OTLP trace exports and feeds them to its pipeline."""

    type_name = "otlp"
    Config = OTLPConfig
    config: OTLPConfig
    signals = ALL_SIGNALS

    def __init__(self, component_id: str, config: OTLPConfig, consumer: Consumer):
        super().__init__(component_id, config, consumer)
        self.http: HTTPListener | None = None
        self.grpc: GRPCListener | None = None

    async def start(self, host: Host) -> None:
        protocols = self.config.protocols
        try:
            if protocols.http is not None:
                from collector.receivers.otlp_http import HTTPListener

                ingest = TraceIngest(self.id, "http", self.consumer, host.telemetry)
                self.http = HTTPListener(self.id, protocols.http, ingest)
                self.http.signal_paths = self._signal_paths(protocols.http, host)
                if "traces" not in self.consumers:
                    self.http.settings = protocols.http.model_copy(update={"traces_paths": []})
                await self.http.start(host.http_routes)
            if protocols.grpc is not None:
                # Imported here so a collector without gRPC never loads grpcio.
                from collector.receivers.otlp_grpc import GRPCListener

                ingest = TraceIngest(self.id, "grpc", self.consumer, host.telemetry)
                self.grpc = GRPCListener(self.id, protocols.grpc, ingest)
                self.grpc.serve_traces = "traces" in self.consumers
                self.grpc.signal_ingests = {
                    signal: SignalIngest(signal, self.id, "grpc", consumer, host.telemetry)
                    for signal, consumer in self.consumers.items()
                    if signal != "traces"
                }
                await self.grpc.start()
        except BaseException:
            await self.shutdown()  # close a listener that did start
            raise

    def _signal_paths(self, settings: HTTPSettings, host: Host) -> dict[str, SignalIngest]:
        """HTTP path -> ingest, for the logs and metrics pipelines this receiver feeds."""
        paths: dict[str, SignalIngest] = {}
        for signal, signal_paths in (
            ("logs", settings.logs_paths),
            ("metrics", settings.metrics_paths),
        ):
            consumer = self.consumers.get(signal)
            if consumer is not None:
                ingest = SignalIngest(signal, self.id, "http", consumer, host.telemetry)
                paths.update(dict.fromkeys(signal_paths, ingest))
        return paths

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish, close; safe to call twice."""
        http, grpc, self.http, self.grpc = self.http, self.grpc, None, None
        if grpc is not None:
            await grpc.shutdown()
        if http is not None:
            await http.shutdown()


class TraceIngest:
    """What both transports do with a decoded request: check ids, consume, count."""

    def __init__(self, receiver_id: str, transport: str, consumer: Consumer, telemetry: Telemetry):
        self.receiver_id = receiver_id
        self.transport = transport
        self.consumer = consumer
        self.telemetry = telemetry

    async def admit(self, request: RequestInfo) -> None:
        await self.consumer.admit(request)

    async def export(
        self, request: ExportTraceServiceRequest, info: RequestInfo, body: bytes | None = None
    ) -> ExportTraceServiceResponse:
        """Hand the valid spans of ``request`` to the pipeline; raises what ``consume``
        raises (``RefusedError`` ...), after counting the spans as refused. ``body``: the
        protobuf bytes ``request`` was parsed from, if the transport has them."""
        kept, rejected, reason, as_received = _drop_invalid_spans(request, body)
        response = ExportTraceServiceResponse()
        if rejected:
            self.refused(rejected)
            response.partial_success.rejected_spans = rejected
            response.partial_success.error_message = reason
        if kept:
            messages = list(request.resource_spans)
            if as_received:  # the spans are the body's: the pipeline may reuse its bytes
                assert body is not None
                if not isinstance(body, bytes):  # a plugin receiver's bytearray, memoryview
                    body = bytes(body)
                batch = SpanBatch.from_received(messages, body, info.project, info.metadata)
            else:
                batch = SpanBatch(messages, project=info.project, metadata=info.metadata)
            try:
                await self.consumer.consume(batch)
            except BaseException:
                self.refused(kept)
                raise
            self.telemetry.accepted(self.receiver_id, self.transport, kept)
        return response

    def refused(self, spans: int) -> None:
        self.telemetry.refused(self.receiver_id, self.transport, spans)

    def answered(self, status: int | str) -> None:
        self.telemetry.request(self.receiver_id, self.transport, status)


class SignalIngest:
    """``TraceIngest`` for logs and metrics: decode a request, hand its resources to
    the signal's pipeline as one ``LogBatch`` / ``MetricBatch``, count the outcome
    (log records or data points, in the receiver's accepted/refused counters)."""

    def __init__(
        self,
        signal: str,
        receiver_id: str,
        transport: str,
        consumer: Consumer,
        telemetry: Telemetry,
    ):
        self.signal = signal
        self.batch_type = batch_type(signal)
        self.request_type = self.batch_type.request_type
        self.receiver_id = receiver_id
        self.transport = transport
        self.consumer = consumer
        self.telemetry = telemetry

    async def admit(self, request: RequestInfo) -> None:
        await self.consumer.admit(request)

    def decode(self, body: bytes, json: bool) -> tuple[Message, bytes]:
        """The export request in ``body`` (protobuf, or OTLP/JSON when ``json``) and its
        protobuf bytes; raises ``DecodeError`` / ``OTLPJSONError`` when malformed."""
        if json:
            message = otlp_json.decode(body, self.request_type)
            return message, message.SerializeToString()
        return self.request_type.FromString(body), body

    async def export(self, request: Message, info: RequestInfo, body: bytes | None = None) -> Any:
        """Hand the request's resources to the pipeline; the signal's response."""
        batch = self.batch_type(
            getattr(request, self.batch_type.field), project=info.project, metadata=info.metadata
        )
        count = batch.span_count
        if count:
            try:
                await self.consumer.consume(batch)
            except BaseException:
                self.refused(count)
                raise
            self.telemetry.accepted(self.receiver_id, self.transport, count)
        return self.batch_type.response_type()

    def refused(self, count: int) -> None:
        self.telemetry.refused(self.receiver_id, self.transport, count)

    def answered(self, status: int | str) -> None:
        self.telemetry.request(self.receiver_id, self.transport, status)


_ZERO_TRACE_ID = bytes(16)
_ZERO_SPAN_ID = bytes(8)


def drop_invalid_spans(
    request: ExportTraceServiceRequest, body: bytes | None = None
) -> tuple[int, int, str]:
    """Remove spans whose ids are malformed, in place.

    A trace id must be 16 bytes and not all zero, a span id 8 bytes and not all zero, a
    parent span id empty or 8 bytes (an all-zero parent, which some SDKs send for a
    root, is cleared). Returns ``(kept, rejected, reason)``. This runs on every span, so
    it only compares lengths and bytes; given the ``body`` the request was parsed from,
    ``collector._wire`` checks its bytes in C first, and the spans are
    walked here only if one needs a change.
    """
    kept, rejected, reason, _ = _drop_invalid_spans(request, body)
    return kept, rejected, reason


def _drop_invalid_spans(
    request: ExportTraceServiceRequest, body: bytes | None
) -> tuple[int, int, str, bool]:
    """``drop_invalid_spans``, and whether the spans are still as in ``body`` (it was
    checked and found clean: nothing changed)."""
    if body is not None and NATIVE_WIRE:
        try:
            spans, clean = _wire.check_spans(body)
        except ValueError:  # upb parsed it, so this does not happen; the loop decides
            clean = False
        if clean:
            return spans, 0, "", True
    kept = rejected = 0
    reason = ""
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            spans = scope_spans.spans
            invalid: list[int] | None = None
            for index, span in enumerate(spans):
                trace_id = span.trace_id
                span_id = span.span_id
                parent = span.parent_span_id
                if (
                    len(trace_id) == 16
                    and len(span_id) == 8
                    and trace_id != _ZERO_TRACE_ID
                    and span_id != _ZERO_SPAN_ID
                    and (not parent or len(parent) == 8)
                ):
                    if parent == _ZERO_SPAN_ID:
                        span.ClearField("parent_span_id")
                    continue
                if invalid is None:
                    invalid = []
                invalid.append(index)
                if not reason:
                    reason = _why_invalid(span.name, trace_id, span_id, parent)
            count = len(spans)
            if invalid is not None:
                for index in reversed(invalid):
                    del spans[index]
                rejected += len(invalid)
                count -= len(invalid)
            kept += count
    if rejected:
        reason = f"{rejected} span(s) rejected for invalid ids; first: {reason}"
    return kept, rejected, reason, False


def _why_invalid(name: str, trace_id: bytes, span_id: bytes, parent: bytes) -> str:
    for field, value in (("trace_id", trace_id), ("span_id", span_id), ("parent_span_id", parent)):
        if value == INVALID_HEX_ID:
            return f"span {name!r}: {field} is not a hex string"
    if len(trace_id) != 16:
        return f"span {name!r}: trace_id must be 16 bytes, got {len(trace_id)}"
    if trace_id == _ZERO_TRACE_ID:
        return f"span {name!r}: trace_id must not be all zeros"
    if len(span_id) != 8:
        return f"span {name!r}: span_id must be 8 bytes, got {len(span_id)}"
    if span_id == _ZERO_SPAN_ID:
        return f"span {name!r}: span_id must not be all zeros"
    return f"span {name!r}: parent_span_id must be empty or 8 bytes, got {len(parent)}"
