"""Spans in flight: a batch of OTLP ``ResourceSpans`` messages plus a small context.

Data stays in protobuf form from the receiver to the exporters; there is no per-span
Python object. The helpers below read and set attributes on the protobuf
``KeyValue`` lists so plugin authors need not know ``AnyValue``'s oneof.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterable, Iterator, MutableSequence
from dataclasses import dataclass, field
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
]

CALL_ID_ATTRIBUTE = "calltrace.call.id"
"""Resource attribute the ``correlate`` processor sets to the call a resource's spans belong to."""
CALL_KEY_ATTRIBUTE = "calltrace.call.key"
"""Resource attribute with the correlation key's value (the LiveKit room SID, a VAPI call id)."""
CALL_SOURCE_ATTRIBUTE = "calltrace.call.source"
"""Resource attribute naming the attribute the call key came from (``livekit.room.id``)."""


@dataclass(slots=True)
class SpanBatch:
    """Spans of one project on their way through a pipeline.

    ``resource_spans`` holds protobuf ``ResourceSpans`` messages, edited in place by
    processors. ``project`` is set by the ``auth`` processor (None without auth).
    ``metadata`` carries request facts (transport, peer, selected headers).
    """

    resource_spans: list[ResourceSpans]
    project: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    received_ns: int = field(default_factory=time.time_ns)
    payload: bytes | None = None
    """The spans serialized as an ``ExportTraceServiceRequest``, for an exporter with
    ``serialized_batches`` (its sending queue sets it and leaves ``resource_spans``
    empty); None elsewhere."""
    sources: dict[int, ReceivedBytes] | None = None
    """Where the receiver found each ``ResourceSpans`` in the request body, by ``id``:
    ``serialize_resource_spans`` writes its scopes and spans out again from those bytes
    when no processor of the pipeline edits spans (``Processor.edits_spans``), and only
    its resource, which processors do edit, from the message; ``count_of`` takes its span
    count from there. None: none known. The pipeline drops them before a processor that
    edits spans."""
    resource_payloads: dict[int, tuple[ResourceSpans, bytes]] | None = None
    """Each ``ResourceSpans``'s resource serialized, by ``id`` (with the message, so no
    other object takes its ``id``), while they are known to be its resource's bytes: the
    receiver's from the body, kept true by the processors that edit resources and say so
    (``Processor.edits_resources``); ``resource_payload`` reads them. The pipeline drops
    them before any other processor. A request repeats a few resources many times (106
    resources, 12 distinct, in a 500-span request of the bench), and ``skip``,
    ``correlate`` and the fan-out each serialized every one of them again."""

    @classmethod
    def from_request(
        cls, request: ExportTraceServiceRequest, project: str | None = None, **metadata: str
    ) -> SpanBatch:
        return cls(list(request.resource_spans), project, dict(metadata))

    @property
    def span_count(self) -> int:
        if not self.sources:
            return sum(map(span_count, self.resource_spans))
        return sum(map(self.count_of, self.resource_spans))

    def known_resource_payload(self, resource_spans: ResourceSpans) -> bytes | None:
        """The serialized resource of one of the batch's ``ResourceSpans`` where
        ``resource_payloads`` holds it, else None."""
        return _known_payload(self.resource_payloads, resource_spans)

    def resource_payload(self, resource_spans: ResourceSpans) -> bytes:
        """The serialized resource of one of the batch's ``ResourceSpans``: from
        ``resource_payloads`` where they hold it, else serialized now."""
        known = _known_payload(self.resource_payloads, resource_spans)
        if known is not None:
            return known
        return bytes(resource_spans.resource.SerializeToString())

    def count_of(self, resource_spans: ResourceSpans) -> int:
        """The spans of one of the batch's ``ResourceSpans``: as the receiver counted them
        in the body where it has them (``sources``), else counted in the message. Counting
        in the message costs ~1 us a resource, and every resource is counted several times
        on its way (measured: 12% of the event loop's time)."""
        source = self.sources.get(id(resource_spans)) if self.sources else None
        if source is not None and source[0] is resource_spans:
            return source[6]
        return span_count(resource_spans)

    def messages(self) -> list[ResourceSpans]:
        """``resource_spans``, parsed from ``payload`` when the batch holds only bytes (an
        exporter with ``serialized_batches`` that takes a Python path after all)."""
        if not self.resource_spans and self.payload is not None:
            return list(ExportTraceServiceRequest.FromString(self.payload).resource_spans)
        return self.resource_spans

    def to_request(self) -> ExportTraceServiceRequest:
        """A standalone ``ExportTraceServiceRequest`` (copies the messages)."""
        return ExportTraceServiceRequest(resource_spans=self.resource_spans)

    def serialize(self) -> bytes:
        return self.to_request().SerializeToString()

    @classmethod
    def parse(cls, payload: bytes, project: str | None = None) -> SpanBatch:
        request = ExportTraceServiceRequest()
        request.ParseFromString(payload)
        return cls.from_request(request, project)


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
    In C where ``collector._wire`` is built (the Python below is its reference): 0.67 ->
    0.43 us a span on the bench's requests, the bytes copied without the GIL.

    With ``sources`` (``SpanBatch.sources``: for callers whose processors left spans as
    received), a resource's scopes and spans are copied from the received bytes and only
    its resource is serialized: on the bench's requests 1.50 -> 0.79 us a span (0.10 more
    to find the offsets), for the same message (its resource field moved first, which
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
