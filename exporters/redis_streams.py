"""``redis_streams``: every span as one entry of a per-project Redis stream.

The stream of a project is ``calltrace:spans:{project}`` (the ``stream`` template),
trimmed with ``XTRIM ... MAXLEN ~ maxlen`` after each batch. A batch is written in one
pipelined round trip (no MULTI: entries are independent), one ``XADD`` an entry and the
``XTRIM``, whose replies are counted in the bytes as they arrive.
With the protobuf encoding the entries are packed in C (``collector._wire``) straight
from the sending queue's bytes, each span's own bytes copied as they are.
Delivery is at least once: a batch retried after a connection dropped mid-write may add
some entries twice, so consumers de-duplicate by (``trace_id``, ``span_id``), as the
README's consumer example does.

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

import asyncio
import logging
import string
from binascii import hexlify
from typing import Any, Literal

from google.protobuf.message import DecodeError, EncodeError
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from pydantic import Field, field_validator
from redis.exceptions import ConnectionError, InvalidResponse, RedisError, ResponseError

from collector import (
    CALL_ID_ATTRIBUTE,
    Exporter,
    ExporterConfig,
    Host,
    PermanentError,
    RetryableError,
    SpanBatch,
    encode_otlp_json,
    get_attribute,
)
from collector.redisconn import RedisSettings, is_transient, redis_client
from collector.wire import NATIVE_WIRE
from collector.wire import native as _wire

log = logging.getLogger(__name__)

__all__ = ["RedisStreamsConfig", "RedisStreamsExporter", "stream_name"]

DEFAULT_PROJECT = "default"
"""The ``{project}`` of spans that have none (a pipeline without ``auth``)."""


class RedisStreamsConfig(ExporterConfig, RedisSettings):
    stream: str = "calltrace:spans:{project}"
    """Stream key template; ``{project}`` is the span's project."""
    maxlen: int = Field(default=1_000_000, ge=0)
    """Approximate bound of each stream (``XTRIM MAXLEN ~`` after each batch); 0 keeps
    everything."""
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

    REPLY_READ_SIZE = 1 << 16
    """Bytes read from the connection at a time while counting replies."""

    def __init__(self, component_id: str, config: RedisStreamsConfig):
        super().__init__(component_id, config)
        # Protobuf entries are packed in C from the batch's bytes: nothing to parse.
        self._native = NATIVE_WIRE and config.encoding == "protobuf"
        self._client: Any = None
        # _resource_fields by (project, resource bytes), across batches: every batch
        # repeats the resources of the calls in progress, and packing their fields is a
        # large share of packing a batch, holding the GIL.
        self._packed_resources: dict[tuple[bytes, bytes], tuple[int, bytes]] = {}

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

    def _resource_fields(self, project: bytes, resource: Any) -> tuple[int, bytes]:
        """What every entry of a resource repeats, packed once: the number of ``XADD``
        arguments an entry's fields take and the resource's fields."""
        config = self.config
        encode = encode_otlp_json if config.encoding == "json" else _serialize
        attributes = resource.attributes
        service = str(get_attribute(attributes, "service.name", "") or "").encode()
        call_id = str(get_attribute(attributes, CALL_ID_ATTRIBUTE, "") or "").encode()
        tail = [b"project", project, b"service", service, b"call_id", call_id]
        tail += [b"encoding", config.encoding.encode()]
        if config.include_resource:
            tail += [b"resource", encode(resource)]
        fields = _SPAN_FIELD_ARGUMENTS + len(tail) + 2
        return fields, b"".join(_resp_bulk(arg) for arg in tail)

    def _commands(self, batch: SpanBatch) -> tuple[list[bytes], int]:
        """The batch's entries as ``XADD`` commands, one an entry, and the stream's
        ``XTRIM``, packed in the Redis protocol (in parts, sent as they are); also how many
        replies they get."""
        config = self.config
        project = (batch.project or DEFAULT_PROJECT).encode()
        stream = stream_name(config.stream, batch.project).encode()
        head = [b"XADD", stream, b"*"]
        packed_head = b"".join(_resp_bulk(arg) for arg in head)
        native = None
        if self._native:
            try:
                native = self._native_commands(batch.serialize(), project, len(head), packed_head)
            except ValueError:
                # Bytes the C reader does not take (a protobuf group, which upb keeps as an
                # unknown field): the Python path reads the parsed spans.
                native = None
        if native is not None:
            packed, count = native
        else:
            # Each entry is (the number of XADD arguments of its fields, those packed).
            entries = self._python_entries(batch, project)
            out: list[bytes] = []
            for arguments, fields in entries:
                out += (b"*%d\r\n" % (len(head) + arguments), packed_head, fields)
            packed, count = b"".join(out), len(entries)
        if not count or not config.maxlen:
            return [packed], count
        # One XTRIM a batch, not MAXLEN ~ on every XADD: redis-server's work grows with an
        # XADD's arguments (each is parsed into an object), so three more on every entry
        # cost it more than one command a batch. The stream may hold
        # one batch more than maxlen until the XTRIM right after it.
        trim = [b"XTRIM", stream, b"MAXLEN", b"~", b"%d" % config.maxlen]
        packed_trim = b"*%d\r\n" % len(trim) + b"".join(_resp_bulk(arg) for arg in trim)
        return [packed, packed_trim], count + 1

    def _native_commands(
        self, payload: bytes, project: bytes, head_arguments: int, packed_head: bytes
    ) -> tuple[bytes, int]:
        """``_commands`` of a serialized batch, packed by ``collector._wire`` in C without
        the GIL (the span's bytes are its own in the payload: no parse, no serialize)."""

        packed = self._packed_resources

        def resource_fields(resource_payload: bytes) -> tuple[int, bytes]:
            # Asked once per distinct resource of a batch (it repeats a few many times).
            key = (project, resource_payload)
            fields = packed.get(key)
            if fields is None:
                if len(packed) >= _PACKED_RESOURCES_LIMIT:
                    packed.clear()
                resource = Resource.FromString(resource_payload)
                fields = packed[key] = self._resource_fields(project, resource)
            return fields

        commands: tuple[bytes, int] = _wire.stream_commands(
            payload, resource_fields, head_arguments, packed_head
        )
        return commands

    def _python_entries(self, batch: SpanBatch, project: bytes) -> list[tuple[int, bytes]]:
        """The entries of a batch's messages, packed in Python (JSON encoding, or where
        ``collector._wire`` is not built)."""
        encode = encode_otlp_json if self.config.encoding == "json" else _serialize
        entries: list[tuple[int, bytes]] = []
        for rs in batch.resource_spans:
            arguments, packed_tail = self._resource_fields(project, rs.resource)
            for scope_spans in rs.scope_spans:
                for span in scope_spans.spans:
                    trace_id = hexlify(span.trace_id)
                    span_id = hexlify(span.span_id)
                    parent = hexlify(span.parent_span_id)
                    name = span.name.encode()
                    kind = b"%d" % span.kind
                    start = b"%d" % span.start_time_unix_nano
                    end = b"%d" % span.end_time_unix_nano
                    status = b"%d" % span.status.code
                    body = encode(span)
                    packed = _SPAN_RESP % (
                        len(trace_id), trace_id, len(span_id), span_id, len(parent), parent,
                        len(name), name, len(kind), kind, len(start), start, len(end), end,
                        len(status), status, packed_tail, len(body), body,
                    )  # fmt: skip
                    entries.append((arguments, packed))
        return entries

    async def export(self, batch: SpanBatch) -> None:
        if self._client is None:
            raise RetryableError(f"{self.id} is not started")
        # Packing a batch takes milliseconds: on a thread, the event loop keeps answering
        # requests meanwhile.
        try:
            commands, count = await asyncio.to_thread(self._commands, batch)
        except (ValueError, DecodeError, EncodeError) as exc:  # would repeat: the batch's data
            raise PermanentError(f"{self.id}: cannot encode the batch: {exc!r}") from exc
        if not count:
            return
        try:
            await self._send(commands, count)
        except RedisError as exc:
            if is_transient(exc):
                raise RetryableError(f"Redis at {self.config.describe()}: {exc}") from exc
            stream = stream_name(self.config.stream, batch.project)
            raise PermanentError(f"Redis refused the write to {stream}: {exc}") from exc
        except OSError as exc:
            raise RetryableError(f"Redis at {self.config.describe()}: {exc}") from exc

    async def _send(self, commands: list[bytes], replies: int) -> None:
        """Pipeline: send every command at once, then read every reply. Packing the
        commands here is several times cheaper than redis-py's per-argument encoder."""
        pool = self._client.connection_pool
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(commands)
            error = await self._read_replies(connection, replies)
            if error is not None:
                raise error
        except BaseException:
            # Replies may be left unread (a timeout, a cancellation): never reuse it.
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)

    async def _read_replies(self, connection: Any, replies: int) -> Exception | None:
        """Read ``replies`` replies (entry ids, or errors) off ``connection``; the first
        error, if any. redis-py parses a reply at a time, costing more than packing the
        span did. Here they are counted in the bytes as they come, read from the
        connection's stream (its parser holds nothing between commands: a pooled
        connection has no reply pending). Where that stream is not there (another
        redis-py), redis-py reads them."""
        reader = getattr(connection, "_reader", None)
        if not isinstance(reader, asyncio.StreamReader):
            error: Exception | None = None
            for _ in range(replies):
                try:
                    await connection.read_response()
                except ResponseError as exc:  # the reply was read: go on with the others
                    error = error or exc
            return error
        counter = _ReplyCounter(replies)
        async with asyncio.timeout(self.config.timeout or None):
            while counter.missing:
                data = await reader.read(self.REPLY_READ_SIZE)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                counter.feed(data)
        return counter.error

    async def shutdown(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


_PACKED_RESOURCES_LIMIT = 4096
"""Resources whose packed fields an exporter keeps before it starts over."""


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())


def _resp_bulk(argument: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(argument), argument)


_SPAN_FIELD_ARGUMENTS = 16
"""trace_id, span_id, parent_span_id, name, kind, start_ns, end_ns, status_code: names
and values."""

_SPAN_RESP = (
    b"$8\r\ntrace_id\r\n$%d\r\n%b\r\n"
    b"$7\r\nspan_id\r\n$%d\r\n%b\r\n"
    b"$14\r\nparent_span_id\r\n$%d\r\n%b\r\n"
    b"$4\r\nname\r\n$%d\r\n%b\r\n"
    b"$4\r\nkind\r\n$%d\r\n%b\r\n"
    b"$8\r\nstart_ns\r\n$%d\r\n%b\r\n"
    b"$6\r\nend_ns\r\n$%d\r\n%b\r\n"
    b"$11\r\nstatus_code\r\n$%d\r\n%b\r\n"
    b"%b"
    b"$4\r\nspan\r\n$%d\r\n%b\r\n"
)
"""One entry's fields as ``XADD`` arguments in the Redis protocol: the span's fields, the
resource's (packed once per resource), and the span."""


def _redis_error(message: str) -> Exception:
    """The exception redis-py raises for an error reply (``ResponseError`` or one of its
    kinds, by the message's first word)."""
    try:  # redis-py's own mapping; a private module, so not counted on
        from redis._parsers.base import BaseParser
    except ImportError:
        return ResponseError(message)
    return BaseParser.parse_error(message)


class _ReplyCounter:
    """Counts RESP2 replies of ``XADD`` (bulk strings, or errors) in the bytes they come
    in, keeping the first error; in C (``collector._wire.count_replies``) where it is
    built, else in Python (the reference). Counting the replies is what lets the exporter
    send plain ``XADD`` commands rather than one ``EVAL`` of a script a batch (one reply a
    call), which costs Redis about twice the CPU an entry: on a machine whose cores
    Redis shares, that is the difference."""

    __slots__ = ("_buffer", "_native", "error", "missing")

    def __init__(self, replies: int, native: bool = True):
        self.missing = replies
        self.error: Exception | None = None
        self._buffer = b""
        self._native = native and _wire is not None

    def feed(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        if self._native:
            try:
                position, counted, error = _wire.count_replies(buffer, self.missing)
            except ValueError as exc:
                raise InvalidResponse(str(exc)) from None
            self.missing -= counted
            if error is not None and self.error is None:
                self.error = _redis_error(error.decode(errors="replace"))
        else:
            position = self._count(buffer)
        if not self.missing and position != len(buffer):
            raise InvalidResponse("Redis sent more replies than commands")
        self._buffer = buffer[position:]

    def _count(self, buffer: bytes) -> int:
        """The replies at the start of ``buffer``, counted in Python: where they end."""
        position, size = 0, len(buffer)
        while self.missing:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                break
            kind = buffer[position]
            after = line_end + 2
            if kind == 36:  # $: a bulk string (an entry id), or $-1
                digits = buffer[position + 1 : line_end]
                if not (digits.isdigit() or (digits[:1] == b"-" and digits[1:].isdigit())):
                    raise InvalidResponse(
                        f"unexpected reply from Redis: {buffer[position : position + 64]!r}"
                    )
                length = int(digits)
                if length >= 0:
                    after += length + 2
                    if after > size:
                        break
            elif kind == 45:  # -: an error
                if self.error is None:
                    message = buffer[position + 1 : line_end].decode(errors="replace")
                    self.error = _redis_error(message)
            elif kind not in (43, 58):  # +: a status, :: an integer
                raise InvalidResponse(
                    f"unexpected reply from Redis: {buffer[position : position + 64]!r}"
                )
            position = after
            self.missing -= 1
        return position
