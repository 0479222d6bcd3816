"""OTLP/JSON: the JSON wire format of OTLP, to and from protobuf messages.

OTLP/JSON is proto3 JSON with a few rules of its own
(opentelemetry-proto ``docs/specification.md#json-protobuf-encoding``):

- ``traceId``, ``spanId`` and ``parentSpanId`` (on spans and links) are hex strings,
  not base64; other bytes fields (``bytesValue``) stay base64;
- enums are integers (names are accepted too);
- keys are lowerCamelCase (the original snake_case names are accepted too);
- 64-bit integers may be numbers or decimal strings;
- unknown fields are ignored, at any level, so newer senders work with older receivers.

Decoding parses the JSON with orjson and walks it once, writing the protobuf wire
format with an encoder built per message type from the protobuf descriptors; protobuf's
parser then reads those bytes into the message, which is faster than
``json_format.ParseDict`` on span-heavy requests and than building the message from
constructor arguments. An id that is not valid hex decodes to
``INVALID_HEX_ID``, a value of no valid id length, so the receiver rejects that span
alone (``partial_success``) rather than the whole request.
"""

from __future__ import annotations

import base64
import binascii
import gc
import json
import math
import struct
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from collector.wire import native as _wire

# Descriptors come from upb or from pure Python depending on the protobuf build, and
# their stubs disagree; the code only reads fields both have.
Descriptor = Any
EnumDescriptor = Any

__all__ = [
    "INVALID_HEX_ID",
    "OTLPJSONError",
    "decode",
    "decode_request",
    "decode_request_wire",
    "encode",
    "encode_request",
    "encode_response",
    "from_dict",
    "to_dict",
    "varint",
]

M = TypeVar("M", bound=Message)

# Bytes fields written as hex in OTLP/JSON, by message.
_HEX_ID_FIELDS = {
    "opentelemetry.proto.trace.v1.Span": ("trace_id", "span_id", "parent_span_id"),
    "opentelemetry.proto.trace.v1.Span.Link": ("trace_id", "span_id"),
    "opentelemetry.proto.logs.v1.LogRecord": ("trace_id", "span_id"),
    "opentelemetry.proto.metrics.v1.Exemplar": ("trace_id", "span_id"),
}
_HEX_ID_JSON_KEYS = {
    "opentelemetry.proto.trace.v1.Span": ("traceId", "spanId", "parentSpanId"),
    "opentelemetry.proto.trace.v1.Span.Link": ("traceId", "spanId"),
    "opentelemetry.proto.logs.v1.LogRecord": ("traceId", "spanId"),
    "opentelemetry.proto.metrics.v1.Exemplar": ("traceId", "spanId"),
}


INVALID_HEX_ID = b"<not hex>"
"""What a trace or span id that is not a hex string decodes to (9 bytes: never valid)."""


class OTLPJSONError(ValueError):
    """The body is not valid OTLP/JSON; the message says where and why."""


class _Bad(Exception):
    """A conversion error; the path is added while it propagates up."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.path: list[str] = []


# -- decoding -------------------------------------------------------------------------
#
# A JSON document is turned straight into the protobuf wire format, which protobuf's
# parser (C) then reads: no intermediate dicts of constructor arguments, no
# per-message constructor calls. An encoder per message type, built once from its
# descriptor, maps each JSON key to the field's tag and a function writing its value.

Encode = Callable[[Any], Any]
"""A JSON value -> the field's bytes after its tag (``_SKIP`` to leave it out)."""


def decode_request(body: bytes | str) -> ExportTraceServiceRequest:
    """An ``ExportTraceServiceRequest`` from an OTLP/JSON body; raises ``OTLPJSONError``."""
    return decode(body, ExportTraceServiceRequest)


def decode_request_wire(body: bytes | str) -> tuple[ExportTraceServiceRequest, bytes]:
    """``decode_request``, and the protobuf bytes the request was parsed from (what a
    protobuf client would have sent): the receiver checks ids and reuses spans' bytes
    from them as from a protobuf body."""
    return _decode(body, ExportTraceServiceRequest)


def decode(body: bytes | str, message_type: type[M]) -> M:
    """A message of ``message_type`` from an OTLP/JSON document."""
    return _decode(body, message_type)[0]


def _decode(body: bytes | str, message_type: type[M]) -> tuple[M, bytes]:
    # A request's document is tens of thousands of dicts and lists, which would set off
    # the cyclic garbage collector several times, each a walk over every object the
    # process holds. They form no cycles (refcounting frees them), so it is paused.
    collecting = gc.isenabled()
    gc.disable()
    try:
        try:
            document = orjson.loads(body)
        except (ValueError, RecursionError) as exc:  # orjson.JSONDecodeError: a ValueError
            raise OTLPJSONError(f"invalid JSON: {exc}") from None
        return _from_dict(document, message_type)
    finally:
        if collecting:
            gc.enable()


def from_dict(document: Any, message_type: type[M]) -> M:
    """A message of ``message_type`` from parsed OTLP/JSON (dicts, lists, scalars)."""
    return _from_dict(document, message_type)[0]


def _from_dict(document: Any, message_type: type[M]) -> tuple[M, bytes]:
    if not isinstance(document, dict):
        raise OTLPJSONError(f"expected a JSON object, got {_json_type(document)}")
    wire = None
    if _wire is not None:  # C, for the common cases; None leaves the rest to Python
        wire = _wire.json_to_wire(document, _native_table(message_type.DESCRIPTOR))
    if wire is None:
        wire = _python_wire(document, message_type)
    message = message_type()
    try:
        message.ParseFromString(wire)
    except DecodeError as exc:  # protobuf's own nesting limit (100 levels)
        raise OTLPJSONError(f"invalid value: {exc}") from None
    return message, wire


def _python_wire(document: dict[str, Any], message_type: type[Message]) -> bytes:
    encode_message = _message_encoder(message_type.DESCRIPTOR)
    try:
        wire: bytes = encode_message(document)
    except _Bad as exc:
        where = "".join(reversed(exc.path)).lstrip(".")
        raise OTLPJSONError(f"{where}: {exc.message}" if where else exc.message) from None
    except RecursionError:
        raise OTLPJSONError("nested too deeply") from None
    return wire


# The field kinds collector._wire.json_to_wire knows (its K_* constants).
_NATIVE_KINDS = {
    FieldDescriptor.TYPE_MESSAGE: 1,
    FieldDescriptor.TYPE_STRING: 2,
    FieldDescriptor.TYPE_BOOL: 3,
    FieldDescriptor.TYPE_ENUM: 4,
    FieldDescriptor.TYPE_DOUBLE: 5,
    FieldDescriptor.TYPE_FLOAT: 6,
    FieldDescriptor.TYPE_INT32: 7,
    FieldDescriptor.TYPE_INT64: 8,
    FieldDescriptor.TYPE_UINT32: 9,
    FieldDescriptor.TYPE_UINT64: 10,
    FieldDescriptor.TYPE_SINT32: 11,
    FieldDescriptor.TYPE_SINT64: 12,
    FieldDescriptor.TYPE_FIXED32: 13,
    FieldDescriptor.TYPE_SFIXED32: 14,
    FieldDescriptor.TYPE_FIXED64: 15,
    FieldDescriptor.TYPE_SFIXED64: 16,
}
_NATIVE_HEX_ID = 17
_NATIVE_OTHER = 0  # bytes: base64, left to the Python encoder
_native_tables: dict[str, dict[str, tuple[bytes, int, bool, Any]]] = {}


def _native_table(descriptor: Descriptor) -> dict[str, tuple[bytes, int, bool, Any]]:
    """What ``_message_encoder`` knows of a message type, as data for the C encoder:
    JSON key (camelCase and snake_case) -> (tag bytes, kind, repeated, the field's
    message table or None)."""
    table = _native_tables.get(descriptor.full_name)
    if table is not None:
        return table
    table = _native_tables[descriptor.full_name] = {}  # first: AnyValue contains itself
    hex_ids = _HEX_ID_FIELDS.get(descriptor.full_name, ())
    for field in descriptor.fields:
        sub = None
        if field.name in hex_ids:
            wire_type, kind = _LEN, _NATIVE_HEX_ID
        else:
            wire_type, _ = _field_value_encoder(field)
            kind = _NATIVE_KINDS.get(field.type, _NATIVE_OTHER)
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                sub = _native_table(field.message_type)
        entry = (varint(field.number << 3 | wire_type), kind, _is_repeated(field), sub)
        table[field.json_name] = entry
        table[field.name] = entry
    return table


_encoders: dict[str, Encode] = {}
_field_encoders: dict[str, Encode] = {}


def _message_encoder(descriptor: Descriptor) -> Encode:
    """A function turning a JSON object into the message's serialized fields."""
    cached = _encoders.get(descriptor.full_name)
    if cached is not None:
        return cached

    table: dict[str, tuple[bytes, Encode, bool]] = {}

    def encode(obj: Any) -> bytes:
        if type(obj) is not dict:
            raise _Bad(f"expected an object, got {_json_type(obj)}")
        parts: list[bytes] = []
        append = parts.append
        for key, value in obj.items():
            entry = table.get(key)
            if entry is None or value is None:
                continue  # unknown fields are ignored; null means the default
            tag, encode_value, repeated = entry
            try:
                if not repeated:
                    data = encode_value(value)
                    if data is not _SKIP:
                        append(tag)
                        append(data)
                    continue
                if type(value) is not list:
                    raise _Bad(f"expected an array, got {_json_type(value)}")
                for index, item in enumerate(value):
                    try:
                        data = encode_value(item)
                    except _Bad as exc:
                        exc.path.append(f"[{index}]")
                        raise
                    if data is not _SKIP:
                        append(tag)
                        append(data)
            except _Bad as exc:
                exc.path.append(f".{key}")
                raise
        return b"".join(parts)

    # Registered before the table is filled: message types may be recursive (AnyValue).
    _encoders[descriptor.full_name] = encode
    hex_ids = _HEX_ID_FIELDS.get(descriptor.full_name, ())
    for field in descriptor.fields:
        wire_type: int
        value_encoder: Encode
        if field.name in hex_ids:
            wire_type, value_encoder = _LEN, _hex_id
        else:
            wire_type, value_encoder = _field_value_encoder(field)
        entry = (varint(field.number << 3 | wire_type), value_encoder, _is_repeated(field))
        table[field.json_name] = entry
        table[field.name] = entry
    return encode


def _message_field_encoder(descriptor: Descriptor) -> Encode:
    """A function writing a JSON object as a message field's value: length, then fields."""
    name = descriptor.full_name
    cached = _field_encoders.get(name)
    if cached is not None:
        return cached

    def message(value: Any) -> bytes:
        body = encode_body(value)
        return varint(len(body)) + body

    registered: Encode = message
    if name == "opentelemetry.proto.common.v1.KeyValue":
        registered = _string_attribute_encoder(message)
    _field_encoders[name] = registered  # before the body encoder: AnyValue contains itself
    encode_body = _message_encoder(descriptor)
    return registered


_CACHE_SIZE = 4096
_CACHED_TEXT = 64


def _string_attribute_encoder(generic: Encode) -> Encode:
    """Most attributes are ``{"key": k, "value": {"stringValue": s}}`` or another single
    scalar, and many repeat (every resource of an agent's requests carries the same
    ones): such an attribute is written here, from a cache of recent ones when it can;
    everything else (and every error) goes the ``generic`` way."""
    written: dict[tuple[str, str, type, Any], bytes] = {}
    key_prefixes: dict[str, bytes] = {}  # key's tag, length, UTF-8; the value's tag

    def remember(cache_key: tuple[str, str, type, Any], field: bytes) -> None:
        if len(written) >= _CACHE_SIZE:
            written.clear()
        written[cache_key] = field

    def attribute(obj: Any) -> bytes:
        if type(obj) is not dict or len(obj) != 2:
            return generic(obj)
        key = obj.get("key")
        value = obj.get("value")
        if type(key) is not str or type(value) is not dict or len(value) != 1:
            return generic(obj)
        ((kind, scalar),) = value.items()
        scalar_type = type(scalar)
        if scalar_type not in _SCALAR_TYPES:
            return generic(obj)
        if scalar_type is float:  # 0.0 == -0.0: a cache by value would mix them up
            return generic(obj)
        # The type is part of the key: True == 1, but true is no valid intValue.
        cache_key = (key, kind, scalar_type, scalar)
        cached = written.get(cache_key)
        if cached is not None:
            return cached
        if kind != "stringValue" or scalar_type is not str:
            field = generic(obj)  # raises on a bad value: nothing is cached then
            remember(cache_key, field)
            return field
        prefix = key_prefixes.get(key)
        try:
            if prefix is None:
                key_bytes = key.encode()
                prefix = b"\n" + varint(len(key_bytes)) + key_bytes + b"\x12"
                if len(key_prefixes) >= _CACHE_SIZE:
                    key_prefixes.clear()
                key_prefixes[key] = prefix
            text_bytes = scalar.encode()
        except UnicodeEncodeError:
            return generic(obj)  # reports which string
        text_length = varint(len(text_bytes))
        any_value_length = varint(1 + len(text_length) + len(text_bytes))
        key_value = b"".join((prefix, any_value_length, b"\n", text_length, text_bytes))
        field = varint(len(key_value)) + key_value
        if len(scalar) <= _CACHED_TEXT:
            remember(cache_key, field)
        return field

    return attribute


_SCALAR_TYPES = frozenset((str, int, float, bool))


_SKIP: Any = object()  # an unknown enum name: leave the field unset, as for unknown fields

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _is_repeated(field: Any) -> bool:
    # ``label`` is deprecated in newer protobuf releases in favour of ``is_repeated``.
    is_repeated = getattr(field, "is_repeated", None)
    if is_repeated is not None:
        return bool(is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


_SMALL_VARINTS = [
    bytes((n,)) if n < 0x80 else bytes((n & 0x7F | 0x80, n >> 7)) for n in range(1 << 14)
]
"""The varints of 0 .. 16383 (lengths of almost every string and message)."""


def varint(value: int) -> bytes:
    """The protobuf varint of ``value`` (0 <= value < 2**64)."""
    if value < 16384:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_value_encoder(field: Any) -> tuple[int, Encode]:
    """The wire type of ``field`` and the function writing one of its values."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return _LEN, _message_field_encoder(field.message_type)
    if kind == FieldDescriptor.TYPE_STRING:
        return _LEN, _string
    if kind == FieldDescriptor.TYPE_BYTES:
        return _LEN, _base64
    if kind == FieldDescriptor.TYPE_BOOL:
        return _VARINT, _bool
    if kind == FieldDescriptor.TYPE_ENUM:
        return _VARINT, _enum_encoder(field.enum_type)
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return _FIXED64, _packer("<d", _float)
    if kind == FieldDescriptor.TYPE_FLOAT:
        return _FIXED32, _packer("<f", _float)
    wire_type, low, high, write = _INTEGER_TYPES[kind]

    def integer(value: Any) -> bytes:
        number = _integer(value)
        if not low <= number <= high:
            raise _Bad(f"integer {number} out of range [{low}, {high}]")
        return write(number)

    return wire_type, integer


def _signed_varint(number: int) -> bytes:
    return varint(number & 0xFFFFFFFFFFFFFFFF)  # negatives: ten bytes, two's complement


def _zigzag(number: int) -> bytes:
    return varint((number << 1) ^ (number >> 63))


def _packer(layout: str, convert: Callable[[Any], Any]) -> Encode:
    pack = struct.Struct(layout).pack

    def write(value: Any) -> bytes:
        try:
            return pack(convert(value))
        except OverflowError:  # a double too large for a float field
            raise _Bad(f"number out of range: {value!r}") from None

    return write


_I32 = (-(1 << 31), (1 << 31) - 1)
_I64 = (-(1 << 63), (1 << 63) - 1)
_INTEGER_TYPES: dict[int, tuple[int, int, int, Callable[[int], bytes]]] = {
    FieldDescriptor.TYPE_INT32: (_VARINT, *_I32, _signed_varint),
    FieldDescriptor.TYPE_INT64: (_VARINT, *_I64, _signed_varint),
    FieldDescriptor.TYPE_UINT32: (_VARINT, 0, (1 << 32) - 1, varint),
    FieldDescriptor.TYPE_UINT64: (_VARINT, 0, (1 << 64) - 1, varint),
    FieldDescriptor.TYPE_SINT32: (_VARINT, *_I32, _zigzag),
    FieldDescriptor.TYPE_SINT64: (_VARINT, *_I64, _zigzag),
    FieldDescriptor.TYPE_FIXED32: (_FIXED32, 0, (1 << 32) - 1, struct.Struct("<I").pack),
    FieldDescriptor.TYPE_SFIXED32: (_FIXED32, *_I32, struct.Struct("<i").pack),
    FieldDescriptor.TYPE_FIXED64: (_FIXED64, 0, (1 << 64) - 1, struct.Struct("<Q").pack),
    FieldDescriptor.TYPE_SFIXED64: (_FIXED64, *_I64, struct.Struct("<q").pack),
}


def _string(value: Any) -> bytes:
    if type(value) is not str:
        raise _Bad(f"expected a string, got {_json_type(value)}")
    try:
        data = value.encode()
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") is no Unicode text
        raise _Bad(f"expected a string of Unicode text, got {value!r}") from None
    return varint(len(data)) + data


def _bool(value: Any) -> bytes:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {_json_type(value)}")
    return b"\x01" if value else b"\x00"


def _integer(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            number = float(value)  # proto3 JSON allows "1e3" for integers
        except ValueError:
            raise _Bad(f"expected an integer, got {value!r}") from None
        value = number
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _Bad(f"expected an integer, got {value!r}")


_FLOAT_WORDS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _float(value: Any) -> float:
    if isinstance(value, float | int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        word = _FLOAT_WORDS.get(value)
        if word is not None:
            return word
        try:
            return float(value)
        except ValueError:
            pass
    raise _Bad(f"expected a number, got {value!r}")


def _base64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise _Bad(f"expected a base64 string, got {_json_type(value)}")
    padded = value + "=" * (-len(value) % 4)
    try:
        if "-" in value or "_" in value:
            data = base64.urlsafe_b64decode(padded)
        else:
            data = base64.b64decode(padded)
    except (binascii.Error, ValueError):
        raise _Bad(f"expected a base64 string, got {value!r}") from None
    return varint(len(data)) + data


_INVALID_HEX_ID_FIELD = varint(len(INVALID_HEX_ID)) + INVALID_HEX_ID


def _hex_id(value: Any) -> bytes:
    """A trace or span id from hex; anything else gives ``INVALID_HEX_ID``."""
    if type(value) is not str:
        return _INVALID_HEX_ID_FIELD
    try:
        data = bytes.fromhex(value)
    except ValueError:
        return _INVALID_HEX_ID_FIELD
    return varint(len(data)) + data


def _enum_encoder(enum: EnumDescriptor) -> Encode:
    by_name = {value.name: _signed_varint(value.number) for value in enum.values}
    low, high = _I32

    def encode(value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if not low <= value <= high:
                raise _Bad(f"enum number {value} out of range")
            return _signed_varint(value)  # proto3 enums are open: unknown numbers are kept
        if isinstance(value, str):
            return by_name.get(value, _SKIP)
        raise _Bad(f"expected an enum number or name, got {_json_type(value)}")

    return encode


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# -- encoding -------------------------------------------------------------------------


def encode_request(request: ExportTraceServiceRequest) -> bytes:
    return encode(request)


def encode_response(response: ExportTraceServiceResponse) -> bytes:
    """``{}`` for full success, or ``{"partialSuccess": {...}}``."""
    return encode(response)


def encode(message: Message) -> bytes:
    """OTLP/JSON bytes of ``message`` (compact, UTF-8)."""
    return json.dumps(to_dict(message), separators=(",", ":"), ensure_ascii=False).encode()


def to_dict(message: Message) -> dict[str, Any]:
    """The OTLP/JSON document of ``message`` as dicts and lists: hex ids, integer enums,
    lowerCamelCase keys, 64-bit integers as strings, default values left out."""
    document = json_format.MessageToDict(message, use_integers_for_enums=True)
    _ids_to_hex(document, message.DESCRIPTOR)
    return document


def _ids_to_hex(obj: dict[str, Any], descriptor: Descriptor) -> None:
    """Rewrite base64 ids (as ``MessageToDict`` writes bytes) to hex, in place."""
    for key in _HEX_ID_JSON_KEYS.get(descriptor.full_name, ()):
        value = obj.get(key)
        if value:
            obj[key] = base64.b64decode(value).hex()
    for field in descriptor.fields:
        if field.type != FieldDescriptor.TYPE_MESSAGE or not _may_hold_ids(field.message_type):
            continue
        child = obj.get(field.json_name)
        if child is None:
            continue
        for item in child if isinstance(child, list) else (child,):
            _ids_to_hex(item, field.message_type)


_holds_ids: dict[str, bool] = {}


def _may_hold_ids(descriptor: Descriptor) -> bool:
    """Whether ``descriptor`` or a message inside it has hex id fields."""
    name = descriptor.full_name
    if name not in _holds_ids:
        _holds_ids[name] = False  # recursion guard (AnyValue contains itself)
        _holds_ids[name] = name in _HEX_ID_FIELDS or any(
            _may_hold_ids(field.message_type)
            for field in descriptor.fields
            if field.type == FieldDescriptor.TYPE_MESSAGE
        )
    return _holds_ids[name]
