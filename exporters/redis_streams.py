"""``redis_streams``: every span as one entry of a per-project Redis stream.

The stream of a project is ``calltrace:spans:{project}`` (the ``stream`` template),
trimmed with ``XADD ... MAXLEN ~ maxlen``. A batch is written in one pipelined round trip
(no MULTI: entries are independent). Delivery is at least once: a batch retried after a
connection dropped mid-write may add some entries twice, so consumers de-duplicate by
(``trace_id``, ``span_id``), as the README's consumer example does.

Entry fields (all strings, ids in lowercase hex, times in Unix nanoseconds):

==================  ==========================================================
``trace_id``        32 hex digits
``span_id``         16 hex digits
``parent_span_id``  16 hex digits, or empty for a root span
``name``            span name
``kind``            OTLP ``SpanKind`` number (1 internal ... 5 consumer)
``start_ns``        start time
``end_ns``          end time
``status_code``     0 unset, 1 ok, 2 error
``project``         the project of the API key
``service``         resource ``service.name``, or empty
``call_id``         the call (``correlate``), or empty
``encoding``        ``protobuf`` or ``json``: how ``span`` and ``resource`` are encoded
``span``            the OTLP ``Span`` message (protobuf bytes, or OTLP/JSON)
``resource``        the OTLP ``Resource`` message (same encoding); with ``include_resource``
==================  ==========================================================
"""

from __future__ import annotations

import logging
import string
from typing import Any, Literal

from pydantic import Field, field_validator
from redis.exceptions import RedisError, ResponseError

from collector import (
    CALL_ID_ATTRIBUTE,
    Exporter,
    ExporterConfig,
    Host,
    PermanentError,
    RetryableError,
    SpanBatch,
    get_attribute,
)
from collector.otlp_json import encode as otlp_json_encode
from collector.redisconn import RedisSettings, is_transient, redis_client

log = logging.getLogger(__name__)

__all__ = ["RedisStreamsConfig", "RedisStreamsExporter", "stream_name"]

DEFAULT_PROJECT = "default"
"""The ``{project}`` of spans that have none (a pipeline without ``auth``)."""


class RedisStreamsConfig(ExporterConfig, RedisSettings):
    stream: str = "calltrace:spans:{project}"
    """Stream key template; ``{project}`` is the span's project."""
    maxlen: int = Field(default=1_000_000, ge=0)
    """Approximate bound of each stream (``MAXLEN ~``); 0 keeps everything."""
    encoding: Literal["protobuf", "json"] = "protobuf"
    """How the ``span`` and ``resource`` fields are encoded."""
    include_resource: bool = True
    """Write the ``resource`` field (its attributes hold the agent's tags)."""

    @field_validator("stream")
    @classmethod
    def _template(cls, template: str) -> str:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
        except ValueError as exc:
            raise ValueError(
                f'expected a stream name like "calltrace:spans:{{project}}", got {template!r}: {exc}'
            ) from None
        unknown = fields - {"project"}
        if unknown:
            raise ValueError(
                f"expected only the {{project}} placeholder, got {', '.join(sorted(unknown))}"
            )
        return template


def stream_name(template: str, project: str | None) -> str:
    return template.format(project=project or DEFAULT_PROJECT)


class RedisStreamsExporter(Exporter):
    type_name = "redis_streams"
    Config = RedisStreamsConfig
    config: RedisStreamsConfig

    def __init__(self, component_id: str, config: RedisStreamsConfig):
        super().__init__(component_id, config)
        self._client: Any = None

    async def start(self, host: Host) -> None:
        self._client = redis_client(self.config)
        try:
            await self._client.ping()
        except RedisError as exc:
            # Not fatal: the sending queue holds the spans until Redis is reachable.
            log.warning(
                "%s: Redis at %s is not reachable yet (%s); spans wait in the sending queue",
                self.id,
                self.config.describe(),
                exc,
            )

    def _commands(self, batch: SpanBatch) -> tuple[bytes, int]:
        """The batch's ``XADD`` commands, one per span, packed in the Redis protocol."""
        config = self.config
        encode = otlp_json_encode if config.encoding == "json" else _serialize
        project = (batch.project or DEFAULT_PROJECT).encode()
        head = [b"XADD", stream_name(config.stream, batch.project).encode()]
        if config.maxlen:
            head += [b"MAXLEN", b"~", b"%d" % config.maxlen]
        head.append(b"*")
        encoding = config.encoding.encode()
        out: list[bytes] = []
        count = 0
        for rs in batch.resource_spans:
            attributes = rs.resource.attributes
            service = str(get_attribute(attributes, "service.name", "") or "").encode()
            call_id = str(get_attribute(attributes, CALL_ID_ATTRIBUTE, "") or "").encode()
            tail = [b"project", project, b"service", service, b"call_id", call_id]
            tail += [b"encoding", encoding]
            if config.include_resource:
                tail += [b"resource", encode(rs.resource)]
            for scope_spans in rs.scope_spans:
                for span in scope_spans.spans:
                    args = [
                        *head,
                        b"trace_id",
                        span.trace_id.hex().encode(),
                        b"span_id",
                        span.span_id.hex().encode(),
                        b"parent_span_id",
                        span.parent_span_id.hex().encode(),
                        b"name",
                        span.name.encode(),
                        b"kind",
                        b"%d" % span.kind,
                        b"start_ns",
                        b"%d" % span.start_time_unix_nano,
                        b"end_ns",
                        b"%d" % span.end_time_unix_nano,
                        b"status_code",
                        b"%d" % span.status.code,
                        *tail,
                        b"span",
                        encode(span),
                    ]
                    out.append(b"*%d\r\n" % len(args))
                    for arg in args:
                        out += (b"$%d\r\n" % len(arg), arg, b"\r\n")
                    count += 1
        return b"".join(out), count

    async def export(self, batch: SpanBatch) -> None:
        if self._client is None:
            raise RetryableError(f"{self.id} is not started")
        payload, count = self._commands(batch)
        if not count:
            return
        try:
            await self._send(payload, count)
        except RedisError as exc:
            if is_transient(exc):
                raise RetryableError(f"Redis at {self.config.describe()}: {exc}") from exc
            stream = stream_name(self.config.stream, batch.project)
            raise PermanentError(f"Redis refused the write to {stream}: {exc}") from exc
        except OSError as exc:
            raise RetryableError(f"Redis at {self.config.describe()}: {exc}") from exc

    async def _send(self, payload: bytes, replies: int) -> None:
        """Pipeline: send every command at once, then read every reply. Packing the
        commands here is several times cheaper than redis-py's per-argument encoder."""
        pool = self._client.connection_pool
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(payload)
            error: Exception | None = None
            for _ in range(replies):
                try:
                    await connection.read_response()
                except ResponseError as exc:  # the reply was read: go on with the others
                    error = error or exc
            if error is not None:
                raise error
        except BaseException:
            # Replies may be left unread (a timeout, a cancellation): never reuse it.
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)

    async def shutdown(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())
