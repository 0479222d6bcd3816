"""Spans in flight: a batch of OTLP ``ResourceSpans`` messages plus a small context.

Data stays in protobuf form from the receiver to the exporters; there is no per-span
Python object. The helpers below read and set attributes on the protobuf
``KeyValue`` lists so plugin authors need not know ``AnyValue``'s oneof.
"""

from __future__ import annotations

import operator
import os
import time
from collections.abc import Callable, Iterable, Iterator, MutableSequence
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span

from collector.otlp_json import varint
from collector.wire import native as _native

__all__ = [
    "CALL_ID_ATTRIBUTE",
    "CALL_KEY_ATTRIBUTE",
    "CALL_SOURCE_ATTRIBUTE",
    "BatchEntry",
    "ExportTraceServiceRequest",
    "ReceivedBytes",
    "ResourceSpans",
    "Span",
    "SpanBatch",
    "any_value_to_python",
    "get_attribute",
    "iter_spans",
    "received_bytes",
    "received_resources",
    "remove_attribute",
    "serialize_resource_spans",
    "set_attribute",
    "span_count",
    "split_resource_spans",
]

CALL_ID_ATTRIBUTE = "calltrace.call.id"
"""Resource attribute the ``correlate`` processor sets to the call a resource's spans belong to."""
CALL_KEY_ATTRIBUTE = "calltrace.call.key"
"""Resource attribute with the correlation key's value (the LiveKit room SID, a VAPI call id)."""
CALL_SOURCE_ATTRIBUTE = "calltrace.call.source"
"""Resource attribute naming the attribute the call key came from (``livekit.room.id``)."""


class SpanBatch:
    """Spans of one project on their way through a pipeline: OTLP ``ResourceSpans``
    messages plus a small context.

    ``project`` is set by the ``auth`` processor (None without auth); ``metadata``
    carries request facts (transport, peer, selected headers).

    Reading and editing, for processors and exporters:

    - ``batch.resource_spans`` is the list of protobuf ``ResourceSpans`` messages. Read
      them, edit them in place, add or remove messages, or assign a new list: whatever
      the messages hold when the pipeline hands the batch on is exactly what every
      exporter receives.
    - ``batch.entries()`` gives each ``ResourceSpans`` as a ``BatchEntry``, for code that
      reads or replaces resources without touching spans (``skip``, ``correlate``): the
      spans' received bytes then stay valid and are written out again without being
      serialized. ``batch.keep(...)`` sets which entries (and new messages) the batch
      holds.
    - ``batch.serialize()`` gives the batch as an ``ExportTraceServiceRequest`` body,
      for exporters that want bytes.

    The batch knows by itself which of its byte forms are still true: handing out
    ``resource_spans`` (or an entry's ``message``) marks those messages as possibly
    edited, so they are serialized again, and nothing a processor does can make an
    exporter store bytes that disagree with the messages. With the environment variable
    ``CALLTRACE_CHECK_BATCHES=1`` (the test suite sets it) every ``serialize`` that
    reuses received bytes is compared with the messages serialized afresh.
    """

    __slots__ = (
        "_messages",
        "_payload",
        "_received",
        "_resource_bytes",
        "_span_count",
        "metadata",
        "project",
        "received_ns",
    )

    def __init__(
        self,
        resource_spans: Iterable[ResourceSpans] | None = None,
        project: str | None = None,
        metadata: dict[str, str] | None = None,
        received_ns: int | None = None,
    ):
        self._messages: list[ResourceSpans] | None = (
            [] if resource_spans is None else _as_list(resource_spans)
        )
        self.project = project
        self.metadata: dict[str, str] = {} if metadata is None else metadata
        self.received_ns = time.time_ns() if received_ns is None else received_ns
        self._payload: bytes | None = None
        """The batch serialized (an ``ExportTraceServiceRequest`` body) while it is
        true to the messages; the only form of a batch made ``from_bytes`` until its
        messages are asked for."""
        self._span_count: int | None = None
        """Spans of ``_payload`` while the messages are not parsed."""
        self._received: dict[int, ReceivedBytes] | None = None
        """Where each unedited ``ResourceSpans`` lies in the request body, by ``id``
        (see ``ReceivedBytes``): its scopes and spans are copied from there."""
        self._resource_bytes: dict[int, tuple[ResourceSpans, bytes]] | None = None
        """Each unedited resource's bytes, by its ``ResourceSpans``'s ``id``."""

    # -- making batches -------------------------------------------------------------

    @classmethod
    def from_request(
        cls, request: ExportTraceServiceRequest, project: str | None = None, **metadata: str
    ) -> SpanBatch:
        return cls(list(request.resource_spans), project, dict(metadata))

    @classmethod
    def from_bytes(
        cls,
        payload: bytes,
        project: str | None = None,
        metadata: dict[str, str] | None = None,
        received_ns: int | None = None,
        span_count: int | None = None,
    ) -> SpanBatch:
        """A batch of a serialized ``ExportTraceServiceRequest``; parsed only when its
        messages are asked for. ``span_count``: its spans, if the caller knows them."""
        batch = cls(None, project, metadata, received_ns)
        batch._messages = None
        batch._payload = bytes(payload)
        batch._span_count = span_count
        return batch

    @classmethod
    def from_received(
        cls,
        messages: list[ResourceSpans],
        body: bytes,
        project: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> SpanBatch:
        """A batch of the messages just parsed from a request ``body`` (and not edited
        since): their bytes are written out again from ``body`` while they stay unedited.
        """
        batch = cls(messages, project, metadata)
        if _native is not None:
            batch._received, batch._resource_bytes = _native.received(messages, body)
        return batch

    @classmethod
    def parse(cls, payload: bytes, project: str | None = None) -> SpanBatch:
        request = ExportTraceServiceRequest()
        request.ParseFromString(payload)
        return cls.from_request(request, project)

    @classmethod
    def merge(cls, batches: Iterable[SpanBatch], project: str | None = None) -> SpanBatch:
        """One batch holding every message of ``batches`` in order, keeping what each
        knows of its bytes. ``metadata`` (which describes one request) is not kept."""
        merged = cls(None, project)
        messages = merged._messages
        assert messages is not None
        for batch in batches:
            messages.extend(batch._parsed())
            if batch._received:
                if merged._received is None:
                    merged._received = {}
                merged._received.update(batch._received)
            if batch._resource_bytes:
                if merged._resource_bytes is None:
                    merged._resource_bytes = {}
                merged._resource_bytes.update(batch._resource_bytes)
        return merged

    def split(self, limit: int) -> list[SpanBatch]:
        """This batch cut into batches of at most ``limit`` spans each (a resource with
        more spans than fit is copied into several messages), keeping what is known of
        the bytes of the messages kept whole."""
        chunks = split_resource_spans(self._parsed(), limit, self.count_of)
        if len(chunks) == 1:
            return [self]
        batches = []
        for chunk in chunks:
            batch = SpanBatch(chunk, self.project, dict(self.metadata), self.received_ns)
            batch._received = self._received
            batch._resource_bytes = self._resource_bytes
            batches.append(batch)
        return batches

    # -- reading and editing --------------------------------------------------------

    @property
    def resource_spans(self) -> list[ResourceSpans]:
        """The batch's ``ResourceSpans`` messages, to read and edit in place (see the
        class docstring). Every byte form the batch kept is dropped: it may no longer
        be true once the caller has the messages."""
        messages = self._parsed()
        self._payload = None
        self._received = None
        self._resource_bytes = None
        return messages

    @resource_spans.setter
    def resource_spans(self, messages: Iterable[ResourceSpans]) -> None:
        self._parsed()
        self._messages = _as_list(messages)
        self._payload = None

    def messages(self) -> list[ResourceSpans]:
        """The same as ``resource_spans`` (an older name)."""
        return self.resource_spans

    def entries(self) -> list[BatchEntry]:
        """Each ``ResourceSpans`` of the batch, in order, as a ``BatchEntry``."""
        return [BatchEntry(self, rs) for rs in self._parsed()]

    def keep(self, items: Iterable[BatchEntry | ResourceSpans]) -> None:
        """Make the batch hold exactly ``items``, in order: entries of this batch (what
        is known of their bytes stays) and new ``ResourceSpans`` messages (serialized
        when written out). Entries left out are dropped."""
        messages: list[ResourceSpans] = []
        for item in items:
            if isinstance(item, BatchEntry):
                if item._batch is not self:
                    raise ValueError("an entry of another batch")
                messages.append(item._rs)
            else:
                messages.append(item)
        self._parsed()
        self._messages = messages
        self._payload = None

    @property
    def resource_count(self) -> int:
        """How many ``ResourceSpans`` the batch holds (0: the batch is empty)."""
        if self._messages is None and not self._payload:
            return 0
        return len(self._parsed())

    @property
    def span_count(self) -> int:
        if self._messages is None:
            if self._span_count is None:
                self._span_count = sum(map(span_count, self._parsed()))
            return self._span_count
        if not self._received:
            return sum(map(span_count, self._messages))
        return sum(map(self.count_of, self._messages))

    def count_of(self, resource_spans: ResourceSpans) -> int:
        """The spans of one of the batch's ``ResourceSpans``: as the receiver counted them
        in the body while its bytes are known, else counted in the message."""
        received = self._received.get(id(resource_spans)) if self._received else None
        if received is not None and received[0] is resource_spans:
            return received[6]
        return span_count(resource_spans)

    # -- bytes ----------------------------------------------------------------------

    def serialize(self) -> bytes:
        """The batch as an ``ExportTraceServiceRequest`` body: the received bytes of
        whatever no one edited, the rest serialized from the messages."""
        if self._payload is not None:
            return self._payload
        messages = self._parsed()
        if self._received or self._resource_bytes:
            payload = serialize_resource_spans(messages, self._received, self._resource_bytes)
            if CHECK_BATCHES:
                _check_bytes(payload, messages)
        else:
            payload = serialize_resource_spans(messages)
        self._payload = payload
        return payload

    def to_request(self) -> ExportTraceServiceRequest:
        """A standalone ``ExportTraceServiceRequest`` (copies the messages)."""
        return ExportTraceServiceRequest(resource_spans=self._parsed())

    def _parsed(self) -> list[ResourceSpans]:
        messages = self._messages
        if messages is None:
            request = ExportTraceServiceRequest.FromString(self._payload or b"")
            messages = self._messages = list(request.resource_spans)
            self._span_count = None
        return messages

    def _forget(self, resource_spans: ResourceSpans, resource_only: bool = False) -> None:
        key = id(resource_spans)
        self._payload = None
        if self._resource_bytes:
            self._resource_bytes.pop(key, None)
        if not resource_only and self._received:
            self._received.pop(key, None)

    def _set_resource_bytes(self, resource_spans: ResourceSpans, payload: bytes) -> None:
        self._payload = None
        if self._resource_bytes is None:
            self._resource_bytes = {}
        self._resource_bytes[id(resource_spans)] = (resource_spans, payload)

    def __repr__(self) -> str:
        return (
            f"<SpanBatch project={self.project!r} resources={self.resource_count}"
            f" spans={self.span_count}>"
        )


class BatchEntry:
    """One ``ResourceSpans`` of a ``SpanBatch``, read and edited through the batch so that
    it knows what changed: reading ``resource_bytes`` or ``span_count`` changes nothing;
    ``resource`` hands out the resource to edit, ``message`` the whole ``ResourceSpans``."""

    __slots__ = ("_batch", "_rs")

    def __init__(self, batch: SpanBatch, resource_spans: ResourceSpans):
        self._batch = batch
        self._rs = resource_spans

    @property
    def resource_bytes(self) -> bytes:
        """The resource serialized (its received bytes while no one edited it)."""
        known = _known_payload(self._batch._resource_bytes, self._rs)
        if known is not None:
            return known
        return bytes(self._rs.resource.SerializeToString())

    @property
    def resource(self) -> Any:
        """The ``Resource`` message, to read or edit in place; serialized again when the
        batch is written out."""
        self._batch._forget(self._rs, resource_only=True)
        return self._rs.resource

    def set_resource(self, payload: bytes) -> None:
        """Replace the resource by the serialized ``Resource`` ``payload`` (kept as its
        bytes, so it is not serialized again)."""
        self._rs.resource.ParseFromString(payload)
        self._batch._set_resource_bytes(self._rs, bytes(payload))

    @property
    def message(self) -> ResourceSpans:
        """The whole ``ResourceSpans``, to read or edit in place: its spans are then
        serialized again when the batch is written out."""
        self._batch._forget(self._rs)
        return self._rs

    @property
    def span_count(self) -> int:
        return self._batch.count_of(self._rs)

    def __repr__(self) -> str:
        return f"<BatchEntry spans={self.span_count}>"


CHECK_BATCHES = os.environ.get("CALLTRACE_CHECK_BATCHES", "") not in ("", "0")
"""Compare every serialization that reuses received bytes with the messages serialized
afresh (``CALLTRACE_CHECK_BATCHES=1``; the test suite sets it)."""


class BatchBytesMismatch(AssertionError):
    """A batch's bytes disagree with its messages (only raised with ``CHECK_BATCHES``)."""


def _check_bytes(payload: bytes, messages: list[ResourceSpans]) -> None:
    written = ExportTraceServiceRequest.FromString(payload)
    if written != ExportTraceServiceRequest(resource_spans=messages):
        raise BatchBytesMismatch("a batch's reused bytes disagree with its messages")


def _as_list(messages: Iterable[ResourceSpans]) -> list[ResourceSpans]:
    return messages if isinstance(messages, list) else list(messages)


def split_resource_spans(
    resource_spans: list[ResourceSpans],
    limit: int,
    count: Callable[[ResourceSpans], int] | None = None,
) -> list[list[ResourceSpans]]:
    """Cut a list of ``ResourceSpans`` into chunks of at most ``limit`` spans each.

    A resource with more spans than fit is copied into several ``ResourceSpans`` with
    the same resource and scopes, each holding a slice of the spans.
    """
    count = count or span_count
    chunks: list[list[ResourceSpans]] = []
    current: list[ResourceSpans] = []
    room = limit
    for rs in resource_spans:
        spans = count(rs)
        if spans <= room:
            current.append(rs)
            room -= spans
            continue
        for ss in rs.scope_spans:
            start = 0
            while start < len(ss.spans):
                if room == 0:
                    chunks.append(current)
                    current, room = [], limit
                take = min(room, len(ss.spans) - start)
                piece = ResourceSpans(resource=rs.resource, schema_url=rs.schema_url)
                scope = piece.scope_spans.add(scope=ss.scope, schema_url=ss.schema_url)
                scope.spans.extend(ss.spans[start : start + take])
                current.append(piece)
                start += take
                room -= take
    if current:
        chunks.append(current)
    return chunks


_SPANS = operator.attrgetter("spans")


def span_count(resource_spans: ResourceSpans) -> int:
    """The spans of one ``ResourceSpans``, counted in C (this runs for every resource
    several times on the way in)."""
    return sum(map(len, map(_SPANS, resource_spans.scope_spans)))


ReceivedBytes = tuple[ResourceSpans, bytes, int, int, int, int, int]
"""A ``ResourceSpans`` as received: (the message, the request body, the offsets of its
fields in the body, those of its resource field, tag included, and its span count)."""


def received_bytes(
    request: ExportTraceServiceRequest, body: bytes, layout: list[Any]
) -> dict[int, ReceivedBytes]:
    """``SpanBatch.sources`` of the messages of ``request``, parsed from ``body`` whose
    ``collector._wire.resource_spans_layout`` is ``layout``. The dict holds the messages
    too, so no other object can take one's ``id`` while it is in use."""
    sources: dict[int, ReceivedBytes] = {}
    for rs, where in zip(request.resource_spans, layout, strict=True):
        if where is not None:
            sources[id(rs)] = (rs, body, *where)
    return sources


def _known_payload(
    resource_payloads: dict[int, tuple[ResourceSpans, bytes]] | None, rs: ResourceSpans
) -> bytes | None:
    """``rs``'s resource bytes in ``resource_payloads`` (``SpanBatch.resource_payloads``),
    or None: the entry must be for this very message, not one that had its ``id``."""
    known = resource_payloads.get(id(rs)) if resource_payloads else None
    return known[1] if known is not None and known[0] is rs else None


def received_resources(sources: dict[int, ReceivedBytes]) -> dict[int, tuple[ResourceSpans, bytes]]:
    """``SpanBatch.resource_payloads`` of messages as received: each resource's bytes, cut
    from the body at the offsets ``sources`` holds (past the field's tag and length)."""
    payloads = {}
    for key, (rs, body, _, _, start, end, _) in sources.items():
        for _varint in range(2):  # the tag (field 1, length-delimited), then the length
            while body[start] & 0x80:  # (a varint: writers may pad one with zeros)
                start += 1
            start += 1
        payloads[key] = (rs, body[start:end])
    return payloads


def serialize_resource_spans(
    resource_spans: Iterable[ResourceSpans],
    sources: dict[int, ReceivedBytes] | None = None,
    resource_payloads: dict[int, tuple[ResourceSpans, bytes]] | None = None,
) -> bytes:
    """The ``ExportTraceServiceRequest`` body holding ``resource_spans``, without copying
    the messages into a request first (field 1, length-delimited, once per resource).
    In C where ``collector._wire`` is built (the Python below is its reference), the bytes
    copied without the GIL.

    With ``sources`` (``SpanBatch.sources``: for callers whose processors left spans as
    received), a resource's scopes and spans are copied from the received bytes and only
    its resource is serialized, for the same message (its resource field moved first, which
    protobuf allows). With ``resource_payloads`` (``SpanBatch.resource_payloads``) too,
    the resources they hold are not serialized either."""
    if _native is not None:
        body: bytes = _native.serialize_resource_spans(resource_spans, sources, resource_payloads)
        return body
    return _serialize_in_python(resource_spans, sources, resource_payloads)


def _serialize_in_python(
    resource_spans: Iterable[ResourceSpans],
    sources: dict[int, ReceivedBytes] | None,
    resource_payloads: dict[int, tuple[ResourceSpans, bytes]] | None,
) -> bytes:
    parts: list[bytes] = []
    for rs in resource_spans:
        source = sources.get(id(rs)) if sources else None
        if source is None or source[0] is not rs:
            body = rs.SerializeToString()
            parts += (b"\n", varint(len(body)), body)
            continue
        _, received, start, end, resource_start, resource_end, _ = source
        resource = _known_payload(resource_payloads, rs)
        if resource is None:
            resource = rs.resource.SerializeToString()
        resource_length = varint(len(resource))
        size = (
            1 + len(resource_length) + len(resource) + end - start - (resource_end - resource_start)
        )
        parts += (b"\n", varint(size), b"\n", resource_length, resource)
        parts += (received[start:resource_start], received[resource_end:end])
    return b"".join(parts)


def iter_spans(resource_spans: ResourceSpans) -> Iterator[Span]:
    for scope_spans in resource_spans.scope_spans:
        yield from scope_spans.spans


def any_value_to_python(value: AnyValue) -> Any:
    """The Python value of an ``AnyValue``: str, bool, int, float, bytes, list, dict or None."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value_to_python(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value_to_python(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def _set_any_value(target: AnyValue, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, bytes):
        target.bytes_value = value
    elif isinstance(value, list | tuple):
        target.array_value.SetInParent()
        for item in value:
            _set_any_value(target.array_value.values.add(), item)
    elif isinstance(value, dict):
        target.kvlist_value.SetInParent()
        for key, item in value.items():
            kv = target.kvlist_value.values.add(key=key)
            _set_any_value(kv.value, item)
    else:
        raise TypeError(f"unsupported attribute value type {type(value).__name__}")


def get_attribute(attributes: Iterable[KeyValue], key: str, default: Any = None) -> Any:
    """The Python value of attribute ``key`` in a ``KeyValue`` list (resource or span)."""
    for kv in attributes:
        if kv.key == key:
            return any_value_to_python(kv.value)
    return default


def set_attribute(attributes: MutableSequence[KeyValue], key: str, value: Any) -> None:
    """Set attribute ``key`` in place, replacing an existing value."""
    for kv in attributes:
        if kv.key == key:
            kv.value.Clear()
            _set_any_value(kv.value, value)
            return
    kv = attributes.add(key=key)  # type: ignore[attr-defined]
    _set_any_value(kv.value, value)


def remove_attribute(attributes: MutableSequence[KeyValue], key: str) -> bool:
    for index, kv in enumerate(attributes):
        if kv.key == key:
            del attributes[index]
            return True
    return False
