"""OTLP/gRPC: ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` on grpc.aio.

The method is registered with a generic handler that receives the raw request bytes
instead of the generated ``add_TraceServiceServicer_to_server``, whose deserializer
would decode the body before the handler runs: here the ``authorization`` metadata is
checked first, as on HTTP, so an unauthenticated request costs no parsing.

Status codes follow the OTLP specification: UNAUTHENTICATED, INVALID_ARGUMENT for a
malformed message, UNAVAILABLE (retryable) or RESOURCE_EXHAUSTED (throttled) with a
``google.rpc.RetryInfo`` when the pipeline refuses, ``partial_success`` in the response
for spans with invalid ids. Oversized messages are refused by gRPC itself
(RESOURCE_EXHAUSTED) according to ``max_recv_msg_size``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any, NoReturn

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from collector.components import RefusedError, RequestInfo, UnauthenticatedError
from collector.receivers.otlp import GRPCSettings, SignalIngest, TraceIngest
from collector.spans import ExportTraceServiceRequest
from collector.tls import TLSSettings, parse_endpoint, server_ssl_context

log = logging.getLogger(__name__)

__all__ = ["TRACE_SERVICE", "GRPCListener"]

TRACE_SERVICE = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name
SIGNAL_SERVICES = {
    "logs": logs_service_pb2.DESCRIPTOR.services_by_name["LogsService"].full_name,
    "metrics": metrics_service_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name,
}
_DRAIN_TIMEOUT = 30.0
"""Seconds ``shutdown`` lets in-flight calls finish before cancelling them."""


class _Failure(Exception):
    """Ends a call with a non-OK status."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        if self.retry_after is None:
            return ()
        retry_info = error_details_pb2.RetryInfo(retry_delay=Duration(seconds=self.retry_after))
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        status.details.add().Pack(retry_info)
        return (
            # Read by the OpenTelemetry SDK exporters to time their retry.
            ("google.rpc.retryinfo-bin", retry_info.SerializeToString()),
            # The standard rich error status (grpcio-status reads it).
            ("grpc-status-details-bin", status.SerializeToString()),
        )


class GRPCListener:
    def __init__(self, receiver_id: str, settings: GRPCSettings, ingest: TraceIngest):
        self.receiver_id = receiver_id
        self.settings = settings
        self.ingest = ingest
        self.port: int | None = None
        """The port listened on (useful with port 0), once started."""
        self._server: grpc.aio.Server | None = None
        self.serve_traces = True
        """False when the receiver feeds no traces pipeline (TraceService UNIMPLEMENTED)."""
        self.signal_ingests: dict[str, SignalIngest] = {}
        """``logs`` / ``metrics`` -> ingest, for the LogsService and MetricsService
        (registered only for the signals the receiver feeds); set before ``start``."""

    async def start(self) -> None:
        settings = self.settings
        where = f"{self.receiver_id}: OTLP/gRPC on {settings.endpoint}"
        host, port = parse_endpoint(settings.endpoint)
        if not host:
            address = f"[::]:{port}"
        elif ":" in host:
            address = f"[{host}]:{port}"
        else:
            address = f"{host}:{port}"
        try:
            credentials = _server_credentials(settings.tls) if settings.tls else None
        except ValueError as exc:
            raise RuntimeError(f"{where}: {exc}") from None

        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_recv_msg_size),
                # gRPC shares ports by default, which would hide "address in use";
                # only workers of one collector share their port.
                ("grpc.so_reuseport", 1 if os.environ.get("CALLTRACE_WORKER") else 0),
            ]
        )
        export = grpc.unary_unary_rpc_method_handler(
            self._export,
            request_deserializer=None,  # raw bytes: decoded after admit
            response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString,
        )
        if self.serve_traces:
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(TRACE_SERVICE, {"Export": export}),)
            )
        for signal, signal_ingest in self.signal_ingests.items():
            method = grpc.unary_unary_rpc_method_handler(
                functools.partial(self._export_signal, signal_ingest),
                request_deserializer=None,
                response_serializer=lambda response: response.SerializeToString(),
            )
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(SIGNAL_SERVICES[signal], {"Export": method}),)
            )
        try:
            if credentials is None:
                bound = server.add_insecure_port(address)
            else:
                bound = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            bound, reason = 0, str(exc)
        else:
            reason = "address in use or not available"
        if not bound:
            await server.stop(None)
            raise RuntimeError(f"{where}: cannot listen: {reason}")
        await server.start()
        self._server = server
        self.port = bound
        log.info(
            "%s: OTLP/gRPC%s listening on %s",
            self.receiver_id,
            " (TLS)" if credentials else "",
            address.rsplit(":", 1)[0] + f":{bound}",
        )

    async def shutdown(self) -> None:
        """Refuse new calls, let in-flight ones finish (up to a grace period), stop."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(_DRAIN_TIMEOUT)

    async def _export(
        self, body: bytes, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        try:
            response = await self._handle(body, context)
        except _Failure as failure:
            self.ingest.answered(failure.code.name)
            await _abort(context, failure)
        self.ingest.answered("OK")
        return response

    async def _export_signal(
        self, ingest: SignalIngest, body: bytes, context: grpc.aio.ServicerContext
    ) -> Any:
        try:
            response = await self._handle(body, context, ingest)
        except _Failure as failure:
            ingest.answered(failure.code.name)
            await _abort(context, failure)
        ingest.answered("OK")
        return response

    async def _handle(
        self,
        body: bytes,
        context: grpc.aio.ServicerContext,
        ingest: TraceIngest | SignalIngest | None = None,
    ) -> Any:
        ingest = ingest or self.ingest
        info = RequestInfo(
            headers={
                key.lower(): value
                for key, value in context.invocation_metadata() or ()
                if isinstance(value, str)
            },
            transport="grpc",
            peer=context.peer(),
            body_size=len(body),
        )
        try:
            await ingest.admit(info)
        except UnauthenticatedError as exc:
            raise _Failure(grpc.StatusCode.UNAUTHENTICATED, str(exc) or "unauthenticated") from None
        except RefusedError as exc:
            raise _refused(exc) from None
        except Exception:
            log.exception("%s: admitting a call failed", self.receiver_id)
            raise _unavailable() from None

        try:
            if isinstance(ingest, SignalIngest):  # logs, metrics
                request, _ = ingest.decode(body, json=False)
            else:
                request = ExportTraceServiceRequest.FromString(body)
        except DecodeError as exc:
            log.debug("%s: malformed request from %s: %s", self.receiver_id, info.peer, exc)
            what = (
                ingest.request_type.__name__
                if isinstance(ingest, SignalIngest)
                else "ExportTraceServiceRequest"
            )
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {what}: {exc}") from None

        try:
            return await ingest.export(request, info, body)  # type: ignore[arg-type]
        except RefusedError as exc:
            raise _refused(exc) from None
        except Exception:
            log.exception("%s: the pipeline failed on a call", self.receiver_id)
            raise _unavailable() from None


async def _abort(context: grpc.aio.ServicerContext, failure: _Failure) -> NoReturn:
    await context.abort(failure.code, failure.message, failure.trailing_metadata())
    raise AssertionError("unreachable: abort raises")


def _refused(exc: RefusedError) -> _Failure:
    code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.throttled else grpc.StatusCode.UNAVAILABLE
    return _Failure(code, str(exc) or "refused, retry later", max(0, math.ceil(exc.retry_after)))


def _unavailable() -> _Failure:
    # The data was not stored: a retryable status, so clients send it again.
    return _refused(RefusedError("internal error; the data was not stored"))


def _server_credentials(tls: TLSSettings) -> grpc.ServerCredentials:
    server_ssl_context(tls)  # fails early, naming the file, when a PEM does not load
    client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
