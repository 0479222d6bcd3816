"""OTLP/JSON: the JSON wire format of OTLP, to and from protobuf messages.

OTLP/JSON is proto3 JSON with a few rules of its own
(opentelemetry-proto ``docs/specification.md#json-protobuf-encoding``):

- ``traceId``, ``spanId`` and ``parentSpanId`` (on spans and links) are hex strings,
  not base64; other bytes fields (``bytesValue``) stay base64;
- enums are integers (names are accepted too);
- keys are lowerCamelCase (the original snake_case names are accepted too);
- 64-bit integers may be numbers or decimal strings;
- unknown fields are ignored, at any level, so newer senders work with older receivers.

Decoding walks the parsed JSON once, renaming keys and converting values with a table
built per message type from the protobuf descriptors, then builds the whole request in
one constructor call. This is several times faster than ``json_format.ParseDict`` on
span-heavy requests. An id that is not valid hex decodes to ``INVALID_HEX_ID``, a value
of no valid id length, so the receiver rejects that span alone (``partial_success``)
rather than the whole request.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

# Descriptors come from upb or from pure Python depending on the protobuf build, and
# their stubs disagree; the code only reads fields both have.
Descriptor = Any
EnumDescriptor = Any

__all__ = [
    "INVALID_HEX_ID",
    "OTLPJSONError",
    "decode",
    "decode_request",
    "encode",
    "encode_request",
    "encode_response",
    "from_dict",
    "to_dict",
]

M = TypeVar("M", bound=Message)

# Bytes fields written as hex in OTLP/JSON, by message.
_HEX_ID_FIELDS = {
    "opentelemetry.proto.trace.v1.Span": ("trace_id", "span_id", "parent_span_id"),
    "opentelemetry.proto.trace.v1.Span.Link": ("trace_id", "span_id"),
}
_HEX_ID_JSON_KEYS = {
    "opentelemetry.proto.trace.v1.Span": ("traceId", "spanId", "parentSpanId"),
    "opentelemetry.proto.trace.v1.Span.Link": ("traceId", "spanId"),
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

Convert = Callable[[Any], Any]


def decode_request(body: bytes | str) -> ExportTraceServiceRequest:
    """An ``ExportTraceServiceRequest`` from an OTLP/JSON body; raises ``OTLPJSONError``."""
    return decode(body, ExportTraceServiceRequest)


def decode(body: bytes | str, message_type: type[M]) -> M:
    """A message of ``message_type`` from an OTLP/JSON document."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise OTLPJSONError(f"invalid JSON: {exc}") from None
    return from_dict(document, message_type)


def from_dict(document: Any, message_type: type[M]) -> M:
    """A message of ``message_type`` from parsed OTLP/JSON (dicts, lists, scalars)."""
    if not isinstance(document, dict):
        raise OTLPJSONError(f"expected a JSON object, got {_json_type(document)}")
    convert = _message_converter(message_type.DESCRIPTOR)
    try:
        fields = convert(document)
    except _Bad as exc:
        where = "".join(reversed(exc.path)).lstrip(".")
        raise OTLPJSONError(f"{where}: {exc.message}" if where else exc.message) from None
    except RecursionError:
        raise OTLPJSONError("nested too deeply") from None
    try:
        return message_type(**fields)
    except (ValueError, TypeError) as exc:  # e.g. an integer out of its field's range
        raise OTLPJSONError(f"invalid value: {exc}") from None


_converters: dict[str, Convert] = {}


def _message_converter(descriptor: Descriptor) -> Convert:
    """A function turning a JSON object into constructor keyword arguments."""
    cached = _converters.get(descriptor.full_name)
    if cached is not None:
        return cached

    table: dict[str, tuple[str, Convert]] = {}

    def convert(obj: Any) -> dict[str, Any]:
        if not isinstance(obj, dict):
            raise _Bad(f"expected an object, got {_json_type(obj)}")
        fields = {}
        for key, value in obj.items():
            entry = table.get(key)
            if entry is None or value is None:
                continue  # unknown fields are ignored; null means the default
            name, convert_value = entry
            try:
                converted = convert_value(value)
            except _Bad as exc:
                exc.path.append(f".{key}")
                raise
            if converted is not _SKIP:
                fields[name] = converted
        return fields

    registered: Convert = convert
    if descriptor.full_name == "opentelemetry.proto.common.v1.KeyValue":
        generic = convert

        def string_attribute(obj: Any) -> dict[str, Any]:
            """Most attributes are ``{"key": k, "value": {"stringValue": s}}``: converted
            here in one step, everything else (and every error) by the generic path."""
            if type(obj) is dict and len(obj) == 2:
                value = obj.get("value")
                if type(value) is dict and len(value) == 1:
                    text = value.get("stringValue")
                    key = obj.get("key")
                    if type(text) is str and type(key) is str:
                        return {"key": key, "value": {"string_value": text}}
            return generic(obj)

        registered = string_attribute
    # Registered before the table is filled: message types may be recursive (AnyValue).
    _converters[descriptor.full_name] = registered
    hex_ids = _HEX_ID_FIELDS.get(descriptor.full_name, ())
    for field in descriptor.fields:
        value_converter = _hex_id if field.name in hex_ids else _field_value_converter(field)
        if _is_repeated(field):
            value_converter = _repeated(value_converter)
        table[field.json_name] = (field.name, value_converter)
        table[field.name] = (field.name, value_converter)
    return registered


_SKIP = object()  # an unknown enum name: leave the field unset, as for unknown fields


def _is_repeated(field: Any) -> bool:
    # ``label`` is deprecated in newer protobuf releases in favour of ``is_repeated``.
    is_repeated = getattr(field, "is_repeated", None)
    if is_repeated is not None:
        return bool(is_repeated)
    return field.label == FieldDescriptor.LABEL_REPEATED


def _repeated(convert_item: Convert) -> Convert:
    def convert(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise _Bad(f"expected an array, got {_json_type(value)}")
        items = []
        for index, item in enumerate(value):
            try:
                converted = convert_item(item)
            except _Bad as exc:
                exc.path.append(f"[{index}]")
                raise
            if converted is not _SKIP:
                items.append(converted)
        return items

    return convert


def _field_value_converter(field: Any) -> Convert:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return _message_converter(field.message_type)
    if kind == FieldDescriptor.TYPE_ENUM:
        return _enum_converter(field.enum_type)
    if kind == FieldDescriptor.TYPE_STRING:
        return _string
    if kind == FieldDescriptor.TYPE_BYTES:
        return _base64
    if kind == FieldDescriptor.TYPE_BOOL:
        return _bool
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return _float
    return _integer  # every integer type; the constructor checks the range


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected a string, got {_json_type(value)}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {_json_type(value)}")
    return value


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
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded)
    except (binascii.Error, ValueError):
        raise _Bad(f"expected a base64 string, got {value!r}") from None


def _hex_id(value: Any) -> bytes:
    """A trace or span id from hex; anything else gives ``INVALID_HEX_ID``."""
    if not isinstance(value, str):
        return INVALID_HEX_ID
    try:
        return bytes.fromhex(value)
    except ValueError:
        return INVALID_HEX_ID


def _enum_converter(enum: EnumDescriptor) -> Convert:
    by_name = {value.name: value.number for value in enum.values}

    def convert(value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return value  # proto3 enums are open: unknown numbers are kept
        if isinstance(value, str):
            return by_name.get(value, _SKIP)
        raise _Bad(f"expected an enum number or name, got {_json_type(value)}")

    return convert


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
