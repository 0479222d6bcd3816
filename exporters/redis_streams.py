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
from redis.exceptions import RedisError

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

    def _entries(self, batch: SpanBatch) -> list[dict[str, bytes | str | int]]:
        config = self.config
        as_json = config.encoding == "json"
        encode = otlp_json_encode if as_json else _serialize
        project = batch.project or DEFAULT_PROJECT
        entries: list[dict[str, bytes | str | int]] = []
        for rs in batch.resource_spans:
            attributes = rs.resource.attributes
            service = str(get_attribute(attributes, "service.name", "") or "")
            call_id = str(get_attribute(attributes, CALL_ID_ATTRIBUTE, "") or "")
            resource = encode(rs.resource) if config.include_resource else None
            for scope_spans in rs.scope_spans:
                for span in scope_spans.spans:
                    entry: dict[str, bytes | str | int] = {
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": span.kind,
                        "start_ns": span.start_time_unix_nano,
                        "end_ns": span.end_time_unix_nano,
                        "status_code": span.status.code,
                        "project": project,
                        "service": service,
                        "call_id": call_id,
                        "encoding": config.encoding,
                        "span": encode(span),
                    }
                    if resource is not None:
                        entry["resource"] = resource
                    entries.append(entry)
        return entries

    async def export(self, batch: SpanBatch) -> None:
        if self._client is None:
            raise RetryableError(f"{self.id} is not started")
        entries = self._entries(batch)
        if not entries:
            return
        stream = stream_name(self.config.stream, batch.project)
        maxlen = self.config.maxlen or None
        pipe = self._client.pipeline(transaction=False)
        for entry in entries:
            pipe.xadd(stream, entry, maxlen=maxlen, approximate=True)
        try:
            await pipe.execute()
        except RedisError as exc:
            if is_transient(exc):
                raise RetryableError(f"Redis at {self.config.describe()}: {exc}") from exc
            raise PermanentError(f"Redis refused the write to {stream}: {exc}") from exc
        except OSError as exc:
            raise RetryableError(f"Redis at {self.config.describe()}: {exc}") from exc

    async def shutdown(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())
