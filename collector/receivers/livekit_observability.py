"""The ``livekit_observability`` receiver: what livekit-agents sends to
``LIVEKIT_OBSERVABILITY_URL`` (LiveKit Cloud's "Agent insights" upload), self-hosted.

Four endpoints, served on the OTLP/HTTP listener's port under ``base_path`` (a doubled
slash, as a base URL with a trailing slash makes it, is accepted too):

- ``POST /observability/traces/otlp/v0``, ``/logs/otlp/v0``, ``/metrics/otlp/v0``:
  OTLP/HTTP protobuf (gzip), handed to the traces, logs and metrics pipelines this
  receiver is listed in;
- ``POST /observability/recordings/v0``: the session's multipart upload (header, chat
  history, Ogg/Opus audio), stored by ``collector.recordings``.

Config::

    receivers:
      livekit_observability:
        base_path: ""                 # "/lk" serves /lk/observability/...
        keys:                         # LiveKit API keys, each to a calltrace project
          - api_key: ${env:LIVEKIT_API_KEY}
            api_secret: ${env:LIVEKIT_API_SECRET}
            project: acme
            recording: true           # false: agents are told to stop uploading
        leeway: 30s                   # clock skew allowed on nbf/exp
        recordings:
          directory: ./data/recordings
          max_audio_size: 64MiB
          storage: sqlite             # the exporter keeping recordings (default: the first)

Authentication is LiveKit's: ``Authorization: Bearer <JWT>``, HS256-signed with the
secret of the API key in ``iss``, ``nbf``/``exp`` checked (with ``leeway``), the grant
``observability.write`` required (``livekit.api.TokenVerifier`` checks the signature
and times). Answers are what livekit-agents reads (PROTOCOL.md §7): 200 on success; 401
with the reason, or "data recording is disabled by owner" for a project configured with
``recording: false`` (the agent then stops uploading until its next job); 503 with
``Retry-After`` on the OTLP endpoints and a ``google.rpc.Status`` carrying ``RetryInfo``
on the recordings endpoint when the pipeline or the store cannot take data now; 4xx,
naming the problem, for a body that is not what the endpoint takes.

Spans are regrouped by their own ``room_id`` attribute before they go on, and each
group's resource gets ``livekit.room.id`` (the ``correlate`` processor's call key): the
trace resource carries the room of the first job its process ran, not necessarily
theirs. Log records and metric points keep ``room_id`` on each record, which the
storage keys on. Do not list ``auth`` in the pipelines this receiver feeds: it checks
calltrace API keys, and this receiver's requests carry LiveKit tokens.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import zlib
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans
from pydantic import Field, SecretStr, field_validator

from collector.components import (
    ComponentConfig,
    Consumer,
    Host,
    Receiver,
    RefusedError,
    RequestInfo,
    UnauthenticatedError,
)
from collector.receivers.otlp import SignalIngest, TraceIngest
from collector.recordings import RecordingWriter, UploadError, read_upload
from collector.signals import ALL_SIGNALS
from collector.spans import ExportTraceServiceRequest, get_attribute, set_attribute
from collector.units import ByteSize
from collector.units import Duration as DurationSeconds

log = logging.getLogger(__name__)

__all__ = ["LiveKitObservabilityConfig", "LiveKitObservabilityReceiver", "TokenCheck"]

MiB = 1024 * 1024
DISABLED_MESSAGE = "data recording is disabled by owner"
"""What livekit-agents matches (lower-cased) to stop uploading (``_UploadGate``)."""
_OTLP_PATHS = {
    "traces": "/observability/traces/otlp/v0",
    "logs": "/observability/logs/otlp/v0",
    "metrics": "/observability/metrics/otlp/v0",
}
_RECORDINGS_PATH = "/observability/recordings/v0"
_MAX_GZIP_MEMBERS = 16
_INLINE_GUNZIP_BYTES = 64 * 1024
"""Larger gzip bodies inflate in a worker thread."""


class LiveKitKey(ComponentConfig):
    api_key: str = Field(min_length=1)
    api_secret: SecretStr
    project: str = Field(min_length=1, max_length=200)
    recording: bool = True
    """False: every upload of this key gets 401 "data recording is disabled by owner"."""

    @field_validator("api_secret")
    @classmethod
    def _not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("expected the API secret, got an empty string")
        return value


class RecordingsSettings(ComponentConfig):
    directory: Path = Path("./data/recordings")
    """Where audio files are kept (one per project, room and job)."""
    max_audio_size: ByteSize = 64 * MiB
    max_recording_size: ByteSize = 80 * MiB
    """The whole multipart upload (header, chat history, audio)."""
    storage: str | None = None
    """The exporter keeping recordings' rows; default: the first one that can."""
    max_concurrent_uploads: int = Field(default=4, ge=1)
    """Uploads read at once; more are answered 503 with a RetryInfo (the agent retries)."""


class LiveKitObservabilityConfig(ComponentConfig):
    base_path: str = ""
    keys: list[LiveKitKey] = Field(min_length=1)
    leeway: DurationSeconds = 30.0
    max_request_body_size: ByteSize = 16 * MiB
    """Largest OTLP body, compressed and after decompression (413 above it)."""
    read_timeout: DurationSeconds = 30.0
    """A request's body must arrive within this long (408 after it): a client sending a
    byte a minute holds no memory or turn for long. An upload gets ten times as long."""
    recordings: RecordingsSettings = Field(default_factory=RecordingsSettings)

    @field_validator("base_path")
    @classmethod
    def _path(cls, value: str) -> str:
        value = value.rstrip("/")
        if value and not value.startswith("/"):
            raise ValueError(f'expected a path starting with "/", got {value!r}')
        return value

    @field_validator("keys")
    @classmethod
    def _distinct(cls, keys: list[LiveKitKey]) -> list[LiveKitKey]:
        names = [key.api_key for key in keys]
        if len(set(names)) != len(names):
            raise ValueError("an API key is listed twice")
        return keys


class TokenCheck:
    """LiveKit access tokens: which configured key signed one, checked in full."""

    def __init__(self, keys: list[LiveKitKey], leeway: float):
        self.keys = {key.api_key: key for key in keys}
        self.leeway = datetime.timedelta(seconds=leeway)

    def verify(self, authorization: str | None) -> LiveKitKey:
        """The key whose secret signed the bearer token; ``UnauthenticatedError`` saying
        why not (missing, malformed, unknown key, bad signature, expired, not yet valid,
        no ``observability.write`` grant)."""
        from livekit.api import TokenVerifier

        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise UnauthenticatedError("missing bearer token (a LiveKit access token)")
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError as exc:
            raise UnauthenticatedError(f"malformed access token: {exc}") from None
        issuer = unverified.get("iss")
        key = self.keys.get(issuer) if isinstance(issuer, str) else None
        if key is None:
            raise UnauthenticatedError(f"unknown API key {issuer!r} (the token's iss)")
        verifier = TokenVerifier(key.api_key, key.api_secret.get_secret_value(), leeway=self.leeway)
        try:
            claims = verifier.verify(token)
        except jwt.ExpiredSignatureError:
            raise UnauthenticatedError("access token expired (exp is past)") from None
        except jwt.ImmatureSignatureError:
            raise UnauthenticatedError("access token not yet valid (nbf is ahead)") from None
        except jwt.InvalidSignatureError:
            raise UnauthenticatedError(
                f"access token signature invalid for API key {key.api_key!r}"
            ) from None
        except jwt.InvalidTokenError as exc:
            raise UnauthenticatedError(f"invalid access token: {exc}") from None
        if claims.observability is None or not claims.observability.write:
            raise UnauthenticatedError("operation requires the observability write grant")
        return key


class LiveKitObservabilityReceiver(Receiver):
    """Serves livekit-agents' four observability endpoints (see the module docstring)."""

    type_name = "livekit_observability"
    Config = LiveKitObservabilityConfig
    config: LiveKitObservabilityConfig
    signals = ALL_SIGNALS

    def __init__(self, component_id: str, config: LiveKitObservabilityConfig, consumer: Consumer):
        super().__init__(component_id, config, consumer)
        self.tokens = TokenCheck(config.keys, config.leeway)
        self._ingests: dict[str, TraceIngest | SignalIngest] = {}
        self._writer: RecordingWriter | None = None
        self._uploads = 0

    def routes(self) -> list[Any]:
        routes = []
        base = self.config.base_path
        for prefix in (base, f"{base}/"):  # ".../" + "/observability": a doubled slash
            for signal, path in _OTLP_PATHS.items():
                routes.append(web.post(prefix + path, self._otlp_handler(signal)))
            routes.append(web.post(prefix + _RECORDINGS_PATH, self._recording))
        return routes

    async def start(self, host: Host) -> None:
        telemetry = host.telemetry
        for signal, consumer in self.consumers.items():
            if signal == "traces":
                self._ingests[signal] = TraceIngest(self.id, "http", consumer, telemetry)
            else:
                self._ingests[signal] = SignalIngest(signal, self.id, "http", consumer, telemetry)
        store = self._recording_store(host)
        if store is not None:
            await store.open()
            self._writer = RecordingWriter(self.config.recordings.directory, store)

    def _recording_store(self, host: Host) -> Any:
        wanted = self.config.recordings.storage
        if wanted is not None:
            exporter = host.component(wanted)
            if not callable(getattr(exporter, "signal_store", None)):
                raise RuntimeError(
                    f"receivers.{self.id}.recordings.storage: {wanted!r} cannot store recordings"
                )
            return exporter.signal_store()
        for exporter in getattr(host, "exporters", {}).values():
            if callable(getattr(exporter, "signal_store", None)):
                return exporter.signal_store()
        log.warning("%s: no exporter stores recordings; uploads are refused", self.id)
        return None

    # -- authentication -------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> LiveKitKey:
        """The request's key; raises ``UnauthenticatedError`` (a 401's message)."""
        key = self.tokens.verify(request.headers.get("Authorization"))
        if not key.recording:
            raise UnauthenticatedError(DISABLED_MESSAGE)
        return key

    # -- OTLP -----------------------------------------------------------------------

    def _otlp_handler(self, signal: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            response = await self._otlp(signal, request)
            ingest = self._ingests.get(signal)
            if ingest is not None:
                ingest.answered(response.status)
            return response

        return handle

    async def _otlp(self, signal: str, request: web.Request) -> web.Response:
        try:
            key = self._authenticate(request)
        except UnauthenticatedError as exc:
            return _status(401, code_pb2.UNAUTHENTICATED, str(exc))
        ingest = self._ingests.get(signal)
        if ingest is None:
            return _status(
                404, code_pb2.NOT_FOUND, f"{self.id} feeds no {signal} pipeline; nothing to take"
            )
        if request.content_type != "application/x-protobuf":
            return _status(
                415,
                code_pb2.INVALID_ARGUMENT,
                f"expected application/x-protobuf, got {request.content_type!r}",
            )
        limit = self.config.max_request_body_size
        info = RequestInfo(
            headers={
                name.lower(): value
                for name, value in request.headers.items()
                if name.lower() != "authorization"
            },
            transport="http",
            peer=request.remote,
            body_size=request.content_length or 0,
            project=key.project,
            metadata={"livekit.api_key": key.api_key},
        )
        try:
            await ingest.admit(info)
            info.project = key.project  # whatever a processor's admit did
        except UnauthenticatedError as exc:
            return _status(401, code_pb2.UNAUTHENTICATED, str(exc))
        except RefusedError as exc:
            return _otlp_refused(exc)
        if request.content_length is not None and request.content_length > limit:
            return _status(413, code_pb2.INVALID_ARGUMENT, f"body larger than {limit} bytes")
        try:
            async with asyncio.timeout(self.config.read_timeout):
                body = await _read_capped(request, limit)
        except TimeoutError:
            return _status(
                408,
                code_pb2.DEADLINE_EXCEEDED,
                f"body not received within {self.config.read_timeout}s",
            )
        if body is None:
            return _status(413, code_pb2.INVALID_ARGUMENT, f"body larger than {limit} bytes")
        coding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if coding in ("gzip", "x-gzip"):
            try:
                if len(body) > _INLINE_GUNZIP_BYTES:  # keep the event loop answering
                    body = await asyncio.to_thread(_gunzip, body, limit)
                else:
                    body = _gunzip(body, limit)
            except _TooLarge:
                return _status(
                    413, code_pb2.INVALID_ARGUMENT, f"decompressed body larger than {limit} bytes"
                )
            except zlib.error as exc:
                return _status(400, code_pb2.INVALID_ARGUMENT, f"invalid gzip body: {exc}")
        elif coding not in ("identity", ""):
            return _status(
                415, code_pb2.INVALID_ARGUMENT, f"unsupported content encoding {coding!r}"
            )
        try:
            if isinstance(ingest, TraceIngest):
                traces = ExportTraceServiceRequest.FromString(body)
                _key_spans_by_room(traces)
                result = await ingest.export(traces, info)
            else:
                message, _ = ingest.decode(body, json=False)
                result = await ingest.export(message, info)
        except DecodeError as exc:
            return _status(400, code_pb2.INVALID_ARGUMENT, f"malformed {signal} request: {exc}")
        except RefusedError as exc:
            return _otlp_refused(exc)
        except Exception:
            log.exception("%s: the pipeline failed on a %s request", self.id, signal)
            return _otlp_refused(RefusedError("internal error; the data was not stored"))
        return web.Response(body=result.SerializeToString(), content_type="application/x-protobuf")

    # -- recordings -----------------------------------------------------------------

    async def _recording(self, request: web.Request) -> web.Response:
        try:
            key = self._authenticate(request)
        except UnauthenticatedError as exc:
            return _status(401, code_pb2.UNAUTHENTICATED, str(exc))
        writer = self._writer
        if writer is None:
            return _status(501, code_pb2.UNIMPLEMENTED, f"{self.id}: no exporter stores recordings")
        settings = self.config.recordings
        if self._uploads >= settings.max_concurrent_uploads:
            return _recording_retry(f"{self._uploads} uploads in progress; retry later")
        self._uploads += 1
        try:
            try:
                async with asyncio.timeout(10 * self.config.read_timeout):
                    recording = await read_upload(
                        request, key.project, settings.max_recording_size, settings.max_audio_size
                    )
            except TimeoutError:
                return _status(408, code_pb2.DEADLINE_EXCEEDED, "upload not received in time")
            except UploadError as exc:
                return _status(exc.status, code_pb2.INVALID_ARGUMENT, str(exc))
            try:
                await writer.save(recording)
            except Exception as exc:
                log.warning("%s: storing a recording failed: %r", self.id, exc)
                return _recording_retry(f"the recording could not be stored now: {exc}")
        finally:
            self._uploads -= 1
        log.info(
            "%s: recording of room %s job %s stored (%d bytes of audio)",
            self.id,
            recording.room_id,
            recording.job_id,
            len(recording.audio or b""),
        )
        return web.Response(status=200)


def _key_spans_by_room(request: ExportTraceServiceRequest) -> None:
    """Regroup each ``ResourceSpans`` by its spans' own ``room_id`` attribute and set
    ``livekit.room.id`` on each group's resource (a span without one keeps the
    resource's), in place."""
    regrouped: list[ResourceSpans] = []
    for resource_spans in request.resource_spans:
        default_room = get_attribute(resource_spans.resource.attributes, "room_id")
        groups: dict[Any, ResourceSpans] = {}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                room = get_attribute(span.attributes, "room_id", default_room)
                group = groups.get(room)
                if group is None:
                    group = groups[room] = ResourceSpans(schema_url=resource_spans.schema_url)
                    group.resource.CopyFrom(resource_spans.resource)
                    if isinstance(room, str) and room:
                        set_attribute(group.resource.attributes, "livekit.room.id", room)
                if not group.scope_spans or group.scope_spans[-1].scope != scope_spans.scope:
                    target = group.scope_spans.add(schema_url=scope_spans.schema_url)
                    target.scope.CopyFrom(scope_spans.scope)
                group.scope_spans[-1].spans.append(span)
        regrouped.extend(groups.values())
    del request.resource_spans[:]
    request.resource_spans.extend(regrouped)


async def _read_capped(request: web.Request, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class _TooLarge(Exception):
    pass


def _gunzip(body: bytes, limit: int) -> bytes:
    """Inflate gzip members (at most ``_MAX_GZIP_MEMBERS``), never past ``limit`` bytes."""
    parts: list[bytes] = []
    total = 0
    data = body
    for _ in range(_MAX_GZIP_MEMBERS):
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        part = inflater.decompress(data, limit - total + 1)
        total += len(part)
        if total > limit:
            raise _TooLarge
        if not inflater.eof:
            raise zlib.error("truncated data")
        parts.append(part)
        data = inflater.unused_data
        if not data:
            return b"".join(parts)
    raise zlib.error(f"more than {_MAX_GZIP_MEMBERS} gzip members")


def _status(
    http_status: int, code: int, message: str, retry_after: float | None = None
) -> web.Response:
    """A ``google.rpc.Status`` protobuf answer (with ``RetryInfo`` when ``retry_after``)."""
    status = status_pb2.Status(code=code, message=message)
    headers = {}
    if retry_after is not None:
        seconds = max(1, math.ceil(retry_after))
        status.details.add().Pack(
            error_details_pb2.RetryInfo(retry_delay=Duration(seconds=seconds))
        )
        headers["Retry-After"] = str(seconds)
    return web.Response(
        status=http_status,
        body=status.SerializeToString(),
        content_type="application/x-protobuf",
        headers=headers,
    )


def _otlp_refused(exc: RefusedError) -> web.Response:
    """503 (429 when throttled) with ``Retry-After``: the OTLP exporter waits that long."""
    status = 429 if exc.throttled else 503
    return _status(status, code_pb2.UNAVAILABLE, str(exc) or "retry later", exc.retry_after)


def _recording_retry(message: str, retry_after: float = 1.0) -> web.Response:
    """503 with a ``google.rpc.Status`` carrying ``RetryInfo``: the upload client reads
    the delay from there (not from ``Retry-After``) and re-posts."""
    return _status(503, code_pb2.UNAVAILABLE, message, retry_after)
