"""Generated OTLP trace requests for the differential and fuzz tests: protobuf messages
(every AnyValue kind, NaN and infinite doubles, bytes, nested arrays and kvlists, empty
messages, span- and resource-level call keys, invalid ids, several resources and
projects' tags) and the same requests written otherwise on the wire, as protobuf
allows: unknown fields and groups anywhere, a known field number with another wire type
(an unknown field to upb), one message written in two parts (merged), fields in another
order, and lengths as padded varints. ``wire_variants`` draws those; ``damaged`` also
breaks bytes, which upb may or may not accept."""

from __future__ import annotations

import math
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import strategies as st

from collector.spans import CALL_ID_ATTRIBUTE, CALL_KEY_ATTRIBUTE, ExportTraceServiceRequest

__all__ = [
    "ATTRIBUTE_KEYS",
    "Fields",
    "damaged",
    "decode",
    "encode",
    "fields_at",
    "requests",
    "wire_variants",
]

ATTRIBUTE_KEYS = (
    "service.name",
    CALL_ID_ATTRIBUTE,
    CALL_KEY_ATTRIBUTE,
    "calltrace.call.source",
    "roark.project.tag.env",
    "roark.project.tag.",
    "roark.skip",
    "livekit.room.id",
    "conversation.id",
    "gen_ai.conversation.id",
    "gen_ai.request.model",
    "é",
    "",
)

_doubles = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 2.0, 1e300, 5e-324, 0.1]),
)
_texts = st.one_of(
    st.text(max_size=6),
    st.sampled_from(["call-a", "call-b", "RM_1", "agent", "é€😀"]),
    st.text(min_size=250, max_size=262),  # around MAX_INDEXED_VALUE characters
)


def _any_value(leaf_only: bool = False) -> st.SearchStrategy[dict[str, Any] | None]:
    """An AnyValue as the keyword of its oneof member (None: unset)."""
    leaves = st.one_of(
        st.none(),
        st.builds(lambda v: {"string_value": v}, _texts),
        st.builds(lambda v: {"bool_value": v}, st.booleans()),
        st.builds(lambda v: {"int_value": v}, st.integers(-(2**63), 2**63 - 1)),
        st.builds(lambda v: {"double_value": v}, _doubles),
        st.builds(lambda v: {"bytes_value": v}, st.binary(max_size=6)),
    )
    if leaf_only:
        return leaves
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.builds(lambda vs: {"array_value": vs}, st.lists(inner, max_size=3)),
            st.builds(
                lambda kvs: {"kvlist_value": kvs},
                st.lists(st.tuples(st.sampled_from(ATTRIBUTE_KEYS), inner), max_size=3),
            ),
        ),
        max_leaves=4,
    )


def _fill_any_value(target: Any, value: dict[str, Any] | None) -> None:
    if value is None:
        return
    ((kind, v),) = value.items()
    if kind == "array_value":
        target.array_value.SetInParent()
        for item in v:
            _fill_any_value(target.array_value.values.add(), item)
    elif kind == "kvlist_value":
        target.kvlist_value.SetInParent()
        for key, item in v:
            _fill_any_value(target.kvlist_value.values.add(key=key).value, item)
    else:
        setattr(target, kind, v)


_attributes = st.lists(
    st.tuples(st.sampled_from(ATTRIBUTE_KEYS), st.one_of(st.just("absent"), _any_value())),
    max_size=3,
)


def _fill_attributes(attributes: Any, pairs: list[tuple[str, Any]]) -> None:
    for key, value in pairs:
        kv = attributes.add(key=key)
        if value != "absent":
            kv.value.SetInParent()
            _fill_any_value(kv.value, value)


_trace_ids = st.sampled_from(
    [b"\x01" * 16, b"\x02" * 16, b"\x03" * 16, bytes(16), b"\x01" * 15, b""]
)
_span_ids = st.one_of(
    st.binary(min_size=8, max_size=8), st.sampled_from([bytes(8), b"\x05" * 7, b""])
)
_parents = st.sampled_from([b"", b"\x05" * 8, bytes(8), b"\x05" * 9])
_times = st.one_of(st.integers(0, 2**64 - 1), st.integers(10**18, 10**18 + 10**9))

_spans = st.fixed_dictionaries(
    {
        "trace_id": _trace_ids,
        "span_id": _span_ids,
        "parent_span_id": _parents,
        "name": st.sampled_from(["llm_node", "tts", "stt", "é", ""]),
        "kind": st.one_of(st.integers(0, 5), st.integers(-(2**31), 2**31 - 1)),
        "start": _times,
        "end": _times,
        "status": st.one_of(st.none(), st.integers(0, 2), st.integers(-(2**31), 2**31 - 1)),
        "attributes": _attributes,
        "events": st.lists(_attributes, max_size=1),
    }
)
_scopes = st.fixed_dictionaries(
    {
        "scope": st.one_of(
            st.none(),
            st.tuples(st.sampled_from(["", "livekit-agents", "pipecat"]), _attributes),
        ),
        "spans": st.lists(_spans, max_size=3),
    }
)
_resources = st.fixed_dictionaries(
    {
        "resource": st.one_of(st.none(), _attributes),
        "scopes": st.lists(_scopes, max_size=2),
        "schema_url": st.sampled_from(["", "https://opentelemetry.io/schemas/1.21.0"]),
    }
)


def _build(resources: list[dict[str, Any]]) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    for shape in resources:
        rs = request.resource_spans.add(schema_url=shape["schema_url"])
        if shape["resource"] is not None:
            rs.resource.SetInParent()
            _fill_attributes(rs.resource.attributes, shape["resource"])
        for scope_shape in shape["scopes"]:
            ss = rs.scope_spans.add()
            if scope_shape["scope"] is not None:
                name, attributes = scope_shape["scope"]
                ss.scope.name = name
                _fill_attributes(ss.scope.attributes, attributes)
            for s in scope_shape["spans"]:
                span = ss.spans.add(
                    trace_id=s["trace_id"],
                    span_id=s["span_id"],
                    parent_span_id=s["parent_span_id"],
                    name=s["name"],
                    kind=s["kind"],
                    start_time_unix_nano=s["start"],
                    end_time_unix_nano=s["end"],
                )
                if s["status"] is not None:
                    span.status.code = s["status"]
                _fill_attributes(span.attributes, s["attributes"])
                for event in s["events"]:
                    _fill_attributes(span.events.add(name="e").attributes, event)
    return request


requests = st.lists(_resources, max_size=3).map(_build)
"""ExportTraceServiceRequests as an SDK could write them."""


# -- the wire format as a tree ----------------------------------------------------------

Fields = list[list[Any]]
"""A message on the wire: [number, wire type, value, padding] for each field, in order.
value: an int (varint, fixed), bytes (length-delimited), a ``Fields`` for a field the
schema says is a message, or, for a group, the raw bytes of its fields. padding: extra
bytes the length varint is written with."""

_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5


def _varint(value: int, padding: int = 0) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value or padding:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
        if not value:
            for _ in range(padding - 1):
                out.append(0x80)
            out.append(0)
            return bytes(out)


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def _skip_group(data: bytes, position: int, number: int) -> tuple[int, int]:
    """(end of the group's fields, position past its end tag)."""
    while True:
        start = position
        tag, position = _read_varint(data, position)
        wire_type = tag & 7
        if wire_type == _EGROUP:
            assert tag >> 3 == number
            return start, position
        if wire_type == _VARINT:
            _, position = _read_varint(data, position)
        elif wire_type == _I64:
            position += 8
        elif wire_type == _I32:
            position += 4
        elif wire_type == _LEN:
            length, position = _read_varint(data, position)
            position += length
        elif wire_type == _SGROUP:
            _, position = _skip_group(data, position, tag >> 3)


def decode(data: bytes, descriptor: Descriptor = ExportTraceServiceRequest.DESCRIPTOR) -> Fields:
    """``data`` (well-formed, as upb writes it) as a tree, message fields decoded."""
    fields: Fields = []
    position = 0
    while position < len(data):
        tag, position = _read_varint(data, position)
        number, wire_type = tag >> 3, tag & 7
        value: Any
        if wire_type == _VARINT:
            value, position = _read_varint(data, position)
        elif wire_type == _I64:
            value, position = int.from_bytes(data[position : position + 8], "little"), position + 8
        elif wire_type == _I32:
            value, position = int.from_bytes(data[position : position + 4], "little"), position + 4
        elif wire_type == _LEN:
            length, position = _read_varint(data, position)
            value, position = data[position : position + length], position + length
            field = descriptor.fields_by_number.get(number)
            if field is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
                value = decode(value, field.message_type)
        else:
            assert wire_type == _SGROUP
            start = position
            end, position = _skip_group(data, position, number)
            value = data[start:end]
        fields.append([number, wire_type, value, 0])
    return fields


def encode(fields: Fields) -> bytes:
    out = bytearray()
    for number, wire_type, value, padding in fields:
        out += _varint(number << 3 | wire_type)
        if wire_type == _VARINT:
            out += _varint(value)
        elif wire_type == _I64:
            out += value.to_bytes(8, "little")
        elif wire_type == _I32:
            out += value.to_bytes(4, "little")
        elif wire_type == _LEN:
            body = encode(value) if isinstance(value, list) else value
            out += _varint(len(body), padding) + body
        else:
            out += value + _varint(number << 3 | _EGROUP)
    return bytes(out)


_unknown_numbers = st.sampled_from([3, 9, 50, 99, 1000, 2**29 - 1])
_groups = st.recursive(
    st.just(b""),
    lambda inner: st.builds(
        lambda number, body, value: (
            _varint(number << 3 | _VARINT)
            + _varint(value)
            + _varint(number << 3 | _SGROUP)
            + body
            + _varint(number << 3 | _EGROUP)
        ),
        st.integers(1, 20),
        inner,
        st.integers(0, 2**64 - 1),
    ),
    max_leaves=3,
)


def _unknown_field(number: int) -> st.SearchStrategy[list[Any]]:
    """A field upb keeps as unknown: any wire type, groups included."""
    return st.one_of(
        st.builds(lambda v: [number, _VARINT, v, 0], st.integers(0, 2**64 - 1)),
        st.builds(lambda v: [number, _I64, v, 0], st.integers(0, 2**64 - 1)),
        st.builds(lambda v: [number, _I32, v, 0], st.integers(0, 2**32 - 1)),
        st.builds(lambda v: [number, _LEN, v, 0], st.binary(max_size=4)),
        st.builds(lambda v: [number, _SGROUP, v, 0], _groups),
    )


_WIRE_TYPE_OF = {
    FieldDescriptor.TYPE_MESSAGE: _LEN,
    FieldDescriptor.TYPE_STRING: _LEN,
    FieldDescriptor.TYPE_BYTES: _LEN,
    FieldDescriptor.TYPE_DOUBLE: _I64,
    FieldDescriptor.TYPE_FIXED64: _I64,
    FieldDescriptor.TYPE_SFIXED64: _I64,
    FieldDescriptor.TYPE_FIXED32: _I32,
    FieldDescriptor.TYPE_SFIXED32: _I32,
    FieldDescriptor.TYPE_FLOAT: _I32,
}


def _wrong_wire_type(field: FieldDescriptor) -> st.SearchStrategy[list[Any]]:
    """A known field number with a wire type upb does not read it as: kept unknown (a
    repeated scalar's packed form is not one: upb reads both)."""
    right = _WIRE_TYPE_OF.get(field.type, _VARINT)
    return _unknown_field(field.number).filter(
        lambda f: f[1] != right and not (f[1] == _LEN and field.type not in _WIRE_TYPE_OF)
    )


def _rewrite(fields: Fields, descriptor: Descriptor, draw: Any, budget: list[int]) -> Fields:
    """``fields`` written otherwise, in ways that leave the message upb parses the same,
    or change it only as the input says (a later scalar wins, an unknown field is kept)."""
    out: Fields = []
    for field in fields:
        number, wire_type, value, _ = field
        known = descriptor.fields_by_number.get(number)
        if isinstance(value, list) and known is not None:
            value = _rewrite(value, known.message_type, draw, budget)
            field = [number, wire_type, value, 0]
            # One message written in two parts: protobuf merges them (not for a
            # repeated field, whose parts would be two elements).
            if budget[0] > 0 and not known.is_repeated and draw(st.integers(0, 5)) == 0:
                budget[0] -= 1
                cut = draw(st.integers(0, len(value)))
                out.append([number, wire_type, value[:cut], 0])
                field = [number, wire_type, value[cut:], 0]
        if wire_type == _LEN and budget[0] > 0 and draw(st.integers(0, 9)) == 0:
            budget[0] -= 1
            field = [*field[:3], draw(st.integers(1, 4))]  # a padded length varint
        out.append(field)
        if budget[0] > 0 and draw(st.integers(0, 7)) == 0:
            budget[0] -= 1
            if known is not None and draw(st.booleans()):
                out.append(draw(_wrong_wire_type(known)))
            else:
                out.append(draw(_unknown_field(draw(_unknown_numbers))))
    if budget[0] > 0 and not out and draw(st.integers(0, 3)) == 0:
        budget[0] -= 1
        out.append(draw(_unknown_field(draw(_unknown_numbers))))
    if budget[0] > 0 and len(out) > 1 and draw(st.integers(0, 5)) == 0:
        budget[0] -= 1
        out = draw(st.permutations(out))  # any order: a later scalar or oneof member wins
    return out


@st.composite
def wire_variants(draw: Any, max_changes: int = 6) -> bytes:
    """A generated request written on the wire in one of the ways protobuf allows."""
    request = draw(requests)
    tree = decode(request.SerializeToString())
    return encode(_rewrite(tree, ExportTraceServiceRequest.DESCRIPTOR, draw, [max_changes]))


@st.composite
def damaged(draw: Any) -> bytes:
    """A wire variant with bytes changed, inserted, dropped or cut: upb may refuse it."""
    body = bytearray(draw(wire_variants()))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.integers(0, 3))
        position = draw(st.integers(0, len(body)))
        if action == 0 and position < len(body):
            body[position] = draw(st.integers(0, 255))
        elif action == 1:
            body[position:position] = draw(st.binary(min_size=1, max_size=3))
        elif action == 2:
            del body[position : position + draw(st.integers(1, 3))]
        else:
            del body[position:]
    return bytes(body)


def fields_at(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int, int]]:
    """The fields of the (well-formed) message in ``data[start:end]``: (number, wire
    type, where the field starts, where its value starts, where it ends); a
    length-delimited value starts past its length, a group's past its start tag."""
    out = []
    position = start
    while position < end:
        field_start = position
        tag, position = _read_varint(data, position)
        number, wire_type = tag >> 3, tag & 7
        value_start = position
        if wire_type == _VARINT:
            _, position = _read_varint(data, position)
        elif wire_type == _I64:
            position += 8
        elif wire_type == _I32:
            position += 4
        elif wire_type == _LEN:
            length, value_start = _read_varint(data, position)
            position = value_start + length
        else:
            _, position = _skip_group(data, position, number)
        out.append((number, wire_type, field_start, value_start, position))
    return out
