"""``otlphttp``: spans sent on to another OTLP/HTTP endpoint (a calltrace gateway, an
OpenTelemetry Collector, any OTLP backend), as the Collector's exporter of that name.

A sidecar runs it to forward what its agents send to a gateway::

    exporters:
      otlphttp:
        endpoint: https://gateway.internal:4318     # spans go to {endpoint}/v1/traces
        headers:
          authorization: Bearer ${env:GATEWAY_KEY}  # the gateway's key names the project
        tls: {ca_file: /etc/calltrace/gateway-ca.pem}

Requests are protobuf (``encoding: json`` for OTLP/JSON), gzip-compressed unless
``compression: none``. With protobuf the sending queue's bytes are sent as they are
(queued batches concatenate into one request), never parsed. The receiving end's
answer decides what happens to a batch, as the OTLP specification says: 2xx delivered
(spans it reports rejected in a partial success are logged, not sent again); 429, 502,
503 and 504 retried with backoff, no sooner than a ``Retry-After`` asks (up to a
minute); any other status dropped as a permanent error (logged and counted);
connection errors and timeouts retried.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import logging
import ssl
import time
from typing import Any, Literal
from urllib.parse import urlsplit

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from pydantic import field_validator

from collector import (
    ClientTLSSettings,
    Exporter,
    ExporterConfig,
    Host,
    PermanentError,
    RetryableError,
    SpanBatch,
    client_ssl_context,
    encode_otlp_json,
)

log = logging.getLogger(__name__)

__all__ = ["OTLPHTTPConfig", "OTLPHTTPExporter"]

TRACES_PATH = "/v1/traces"
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
"""What the OTLP/HTTP specification lets a client retry; every other failure is final."""
MAX_RETRY_AFTER = 60.0
"""Seconds a ``Retry-After`` may hold a batch back at most (the queue waits behind it)."""


class OTLPHTTPConfig(ExporterConfig):
    endpoint: str
    """Base URL (``http://`` or ``https://``); spans are POSTed to ``{endpoint}/v1/traces``."""
    traces_endpoint: str | None = None
    """The full URL to POST spans to, instead of ``{endpoint}/v1/traces``."""
    headers: dict[str, str] = {}
    """Sent with every request (``authorization: Bearer ...``)."""
    compression: Literal["gzip", "none"] = "gzip"
    encoding: Literal["proto", "json"] = "proto"
    tls: ClientTLSSettings | None = None
    """Client TLS for an ``https://`` endpoint (the system's CAs when absent)."""

    @field_validator("endpoint", "traces_endpoint")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f'expected a URL like "https://gateway:4318", got {url!r}')
        return url

    @property
    def url(self) -> str:
        return self.traces_endpoint or self.endpoint.rstrip("/") + TRACES_PATH


class OTLPHTTPExporter(Exporter):
    type_name = "otlphttp"
    Config = OTLPHTTPConfig
    config: OTLPHTTPConfig

    def __init__(self, component_id: str, config: OTLPHTTPConfig):
        super().__init__(component_id, config)
        self._session: Any = None
        content_type = (
            "application/x-protobuf" if config.encoding == "proto" else "application/json"
        )
        self._headers = {**config.headers, "Content-Type": content_type}
        if config.compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"

    async def start(self, host: Host) -> None:
        if self._session is not None:
            return
        import aiohttp

        connector = aiohttp.TCPConnector(ssl=self._ssl_context())
        # The exporter helper bounds each attempt (``timeout``); no other deadline here.
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None)
        )

    def _ssl_context(self) -> ssl.SSLContext | bool:
        tls = self.config.tls
        if tls is None:
            return True  # aiohttp's default verification, with the system's CAs
        return client_ssl_context(tls)

    def _body(self, batch: SpanBatch) -> bytes:
        if self.config.encoding == "proto":  # as the sending queue keeps it: no parse
            body = batch.serialize()
        else:
            body = encode_otlp_json(ExportTraceServiceRequest(resource_spans=batch.resource_spans))
        if self.config.compression == "gzip":
            body = gzip.compress(body, compresslevel=5)
        return bytes(body)

    async def export(self, batch: SpanBatch) -> None:
        session = self._session
        if session is None:
            raise RetryableError(f"{self.id} is not started")
        import aiohttp

        # Encoding and compressing a 4,096-span batch takes milliseconds: on a thread, the
        # event loop keeps answering requests meanwhile (zlib lets go of the GIL).
        body = await asyncio.to_thread(self._body, batch)
        url = self.config.url
        try:
            async with session.post(url, data=body, headers=self._headers) as response:
                status, content_type = response.status, response.content_type
                reply = await response.read()
                retry_after = response.headers.get("Retry-After")
        except (aiohttp.ClientError, OSError) as exc:
            raise RetryableError(f"{url}: {exc!r}") from exc
        if 200 <= status < 300:
            self._partial_success(reply, content_type)
            return
        message = f"{url} answered {status}: {_error_message(reply, content_type)}"
        if status in RETRYABLE_STATUSES:
            raise RetryableError(message, retry_after=_seconds(retry_after))
        raise PermanentError(message)

    def _partial_success(self, reply: bytes, content_type: str) -> None:
        """Log the spans a 2xx answer says were rejected (the specification: not retried)."""
        response = ExportTraceServiceResponse()
        if not reply or not _parse_reply(reply, content_type, response):
            return
        partial = response.partial_success
        if partial.rejected_spans or partial.error_message:
            log.warning(
                "%s: %s rejected %d spans: %s",
                self.id,
                self.config.url,
                partial.rejected_spans,
                partial.error_message or "(no message)",
            )

    async def shutdown(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _error_message(reply: bytes, content_type: str) -> str:
    """The message of an error answer: a ``google.rpc.Status`` (protobuf or JSON, as
    OTLP/HTTP servers send), else the start of the body as text."""
    from google.rpc.status_pb2 import Status

    status = Status()
    parsed = content_type in _MESSAGE_TYPES and _parse_reply(reply, content_type, status)
    if parsed and status.message:
        return str(status.message)
    return reply[:200].decode(errors="replace").strip() or "(no body)"


_MESSAGE_TYPES = ("application/json", "application/x-protobuf")


def _parse_reply(reply: bytes, content_type: str, message: Any) -> bool:
    """Parse ``reply`` into ``message``, as JSON or else protobuf by its content type;
    whether it could be."""
    try:
        if content_type == "application/json":
            json_format.Parse(reply, message, ignore_unknown_fields=True)
        else:
            message.ParseFromString(reply)
    except (json_format.ParseError, DecodeError, ValueError) as exc:
        log.debug("unreadable %s answer: %s", content_type, exc)
        return False
    return True


def _seconds(retry_after: str | None) -> float | None:
    """Seconds a ``Retry-After`` value asks to wait (delay-seconds or an HTTP date)."""
    if not retry_after:
        return None
    text = retry_after.strip()
    if text.isdigit():
        return min(float(text), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - time.time()), MAX_RETRY_AFTER)
