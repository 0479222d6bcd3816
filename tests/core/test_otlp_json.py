"""OTLP/JSON decoding: the wire format written from JSON must parse to what the JSON says."""

import math

import pytest

from collector.otlp_json import (
    INVALID_HEX_ID,
    OTLPJSONError,
    decode_request,
    encode_request,
    from_dict,
)
from collector.spans import ExportTraceServiceRequest
from tests.processors._util import resource_spans


def spans_of(document):
    request = from_dict(document, ExportTraceServiceRequest)
    return [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]


def one_span(span):
    return {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}


def test_round_trip_of_every_attribute_kind():
    rs = resource_spans(
        {"service.name": "agent", "n": 3, "ratio": 0.5, "on": True, "raw": b"\x00\xff"},
        [
            {"name": "turn", "attributes": {"text": "héllo", "list": [1, "a", [True]]}},
            {"name": "llm", "attributes": {"map": {"k": {"nested": -7}}, "empty": ""}},
        ],
    )
    rs.scope_spans[0].spans[0].kind = 2
    rs.scope_spans[0].spans[0].flags = 0xFFFFFFFF
    rs.scope_spans[0].spans[0].status.code = 2
    rs.scope_spans[0].spans[1].events.add(name="e", time_unix_nano=5).attributes.add(key="x")
    request = ExportTraceServiceRequest(resource_spans=[rs, rs])
    body = encode_request(request)
    assert decode_request(body) == request
    assert decode_request(body.decode()) == request


def test_proto3_json_forms():
    span = {
        "traceId": "0102030405060708090a0b0c0d0e0f10",
        "span_id": "0102030405060708",  # snake_case is accepted too
        "kind": "SPAN_KIND_SERVER",
        "startTimeUnixNano": "1e3",
        "endTimeUnixNano": 12,
        "droppedAttributesCount": "7",
        "attributes": [
            {"key": "i", "value": {"intValue": "-5"}},
            {"key": "d", "value": {"doubleValue": "Infinity"}},
            {"key": "b", "value": {"bytesValue": "AQI"}},  # unpadded base64
            {"key": "s", "value": {"stringValue": "x"}, "unknown": 1},
            {"key": "none", "value": {}},
        ],
        "status": {},
        "unknownField": {"ignored": [1, 2]},
        "name": None,  # null is the default
    }
    [decoded] = spans_of(one_span(span))
    assert decoded.span_id == bytes(range(1, 9))
    assert decoded.kind == 2
    assert (decoded.start_time_unix_nano, decoded.end_time_unix_nano) == (1000, 12)
    assert decoded.dropped_attributes_count == 7
    values = {kv.key: kv.value for kv in decoded.attributes}
    assert values["i"].int_value == -5
    assert math.isinf(values["d"].double_value)
    assert values["b"].bytes_value == b"\x01\x02"
    assert values["s"].string_value == "x"
    assert values["none"].WhichOneof("value") is None
    assert decoded.HasField("status")


def test_unknown_enum_name_leaves_the_field_unset_and_bad_hex_is_marked():
    [decoded] = spans_of(one_span({"kind": "SPAN_KIND_NEW", "traceId": "zz", "spanId": 5}))
    assert decoded.kind == 0
    assert decoded.trace_id == decoded.span_id == INVALID_HEX_ID


def test_repeated_attributes_are_written_alike():
    attribute = {"key": "service.name", "value": {"stringValue": "agent"}}
    number = {"key": "n", "value": {"intValue": "1"}}
    spans = spans_of(one_span({"attributes": [attribute, number, attribute, number]}))
    assert [(kv.key, kv.value.WhichOneof("value")) for kv in spans[0].attributes] == [
        ("service.name", "string_value"),
        ("n", "int_value"),
    ] * 2


@pytest.mark.parametrize(
    ("span", "where", "what"),
    [
        ({"startTimeUnixNano": "soon"}, "startTimeUnixNano", "expected an integer"),
        ({"droppedAttributesCount": -1}, "droppedAttributesCount", "out of range"),
        ({"flags": 1 << 32}, "flags", "out of range"),
        ({"kind": 1 << 40}, "kind", "out of range"),
        ({"name": 5}, "name", "expected a string"),
        ({"name": "\ud800"}, "name", "Unicode"),
        ({"attributes": {}}, "attributes", "expected an array"),
        ({"attributes": [{"key": "k", "value": {"stringValue": "\ud800"}}]}, "attributes[0]", ""),
        ({"attributes": [{"key": "k", "value": {"intValue": True}}]}, "intValue", "integer"),
        ({"attributes": [{"key": "k", "value": {"boolValue": "true"}}]}, "boolValue", "true or"),
        ({"status": []}, "status", "expected an object"),
    ],
)
def test_invalid_values_name_their_path(span, where, what):
    with pytest.raises(OTLPJSONError) as error:
        spans_of(one_span(span))
    message = str(error.value)
    assert message.startswith("resourceSpans[0].scopeSpans[0].spans[0].")
    assert where in message and what in message


def test_a_valid_int_attribute_is_cached_but_not_a_bool_of_the_same_value():
    valid = {"key": "k", "value": {"intValue": 1}}
    spans_of(one_span({"attributes": [valid]}))
    with pytest.raises(OTLPJSONError):
        spans_of(one_span({"attributes": [{"key": "k", "value": {"intValue": True}}]}))


@pytest.mark.parametrize("body", [b'{"resourceSpans": [', b"[1]", b"\xff", b'{"a": NaN}'])
def test_malformed_documents(body):
    with pytest.raises(OTLPJSONError):
        decode_request(body)
