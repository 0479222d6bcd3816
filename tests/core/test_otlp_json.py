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


# -- the C encoder (collector._wire.json_to_wire) against the Python one ---------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from collector import otlp_json  # noqa: E402
from tests.core.test_wire import _request, resource_shapes  # noqa: E402
from tests.native_support import native_only as native  # noqa: E402
from tests.support import FIXTURES  # noqa: E402


def _both_ways(document):
    """(C's message or None when it leaves the document to Python, Python's message or
    the OTLPJSONError it raises)."""
    table = otlp_json._native_table(ExportTraceServiceRequest.DESCRIPTOR)
    wire = otlp_json._wire.json_to_wire(document, table)
    c = None if wire is None else ExportTraceServiceRequest.FromString(wire)
    try:
        python = ExportTraceServiceRequest.FromString(
            otlp_json._python_wire(document, ExportTraceServiceRequest)
        )
    except OTLPJSONError as exc:
        python = exc
    return c, python


@native
@pytest.mark.parametrize("framework", ["livekit", "pipecat"])
def test_fixture_documents_are_written_in_c_as_in_python(framework):
    import orjson

    paths = sorted((FIXTURES / framework).glob("*.otlp.json"))
    assert paths
    for path in paths:
        c, python = _both_ways(orjson.loads(path.read_bytes()))
        assert c is not None, path  # the common case never falls back
        assert c == python


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(allow_nan=False),
    st.text(max_size=6),
    st.sampled_from(["12", "-3", " 7 ", "1e3", "1_000", "NaN", "0a0b", "0A0B", "0a 0b", "zz"]),
    st.sampled_from(["SPAN_KIND_SERVER", "STATUS_CODE_ERROR", "AQID", "\ud800"]),
)
any_values = st.recursive(
    st.fixed_dictionaries(
        {},
        optional={
            "stringValue": json_scalars,
            "boolValue": json_scalars,
            "intValue": json_scalars,
            "doubleValue": json_scalars,
            "bytesValue": json_scalars,
        },
    ),
    lambda inner: st.one_of(
        st.fixed_dictionaries(
            {"arrayValue": st.fixed_dictionaries({"values": st.lists(inner, max_size=2)})}
        ),
        st.fixed_dictionaries(
            {
                "kvlistValue": st.fixed_dictionaries(
                    {
                        "values": st.lists(
                            st.fixed_dictionaries({"key": json_scalars, "value": inner}), max_size=2
                        )
                    }
                )
            }
        ),
    ),
    max_leaves=4,
)
attributes = st.lists(
    st.fixed_dictionaries(
        {"key": json_scalars}, optional={"value": st.one_of(any_values, json_scalars)}
    ),
    max_size=3,
)
json_spans = st.fixed_dictionaries(
    {},
    optional={
        "traceId": json_scalars,
        "span_id": json_scalars,
        "parentSpanId": json_scalars,
        "name": json_scalars,
        "kind": json_scalars,
        "startTimeUnixNano": json_scalars,
        "end_time_unix_nano": json_scalars,
        "attributes": st.one_of(attributes, json_scalars),
        "droppedAttributesCount": json_scalars,
        "flags": json_scalars,
        "status": st.one_of(
            st.fixed_dictionaries({}, optional={"code": json_scalars, "message": json_scalars}),
            json_scalars,
        ),
        "events": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "timeUnixNano": json_scalars,
                    "name": json_scalars,
                    "attributes": attributes,
                },
            ),
            max_size=2,
        ),
        "links": st.lists(
            st.fixed_dictionaries({}, optional={"traceId": json_scalars, "spanId": json_scalars}),
            max_size=1,
        ),
        "unknownField": json_scalars,
    },
)
json_documents = st.fixed_dictionaries(
    {
        "resourceSpans": st.lists(
            st.fixed_dictionaries(
                {
                    "resource": st.fixed_dictionaries({}, optional={"attributes": attributes}),
                    "scopeSpans": st.lists(
                        st.fixed_dictionaries(
                            {"spans": st.lists(json_spans, max_size=3)},
                            optional={
                                "scope": st.fixed_dictionaries(
                                    {}, optional={"name": json_scalars, "version": json_scalars}
                                )
                            },
                        ),
                        max_size=2,
                    ),
                },
                optional={"schemaUrl": json_scalars},
            ),
            max_size=2,
        )
    }
)


@native
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_documents)
def test_c_writes_what_python_writes_or_leaves_it_to_python(document):
    """Where the C encoder writes a document, the Python one takes it and the message is
    the same; anything else (errors included) it leaves to Python."""
    c, python = _both_ways(document)
    if c is not None:
        assert not isinstance(python, Exception), python
        assert c == python


_INT64_KEYS = {"intValue", "startTimeUnixNano", "endTimeUnixNano", "timeUnixNano"}


def _numbers_as_json_numbers(value, flip):
    """The same document with some 64-bit integers (decimal strings in OTLP/JSON) written
    as JSON numbers, which receivers must take too."""
    if isinstance(value, list):
        return [_numbers_as_json_numbers(v, flip) for v in value]
    if not isinstance(value, dict):
        return value
    return {
        k: int(v)
        if k in _INT64_KEYS and isinstance(v, str) and flip.draw(st.booleans())
        else _numbers_as_json_numbers(v, flip)
        for k, v in value.items()
    }


@native
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(resource_shapes, max_size=3),
    st.data(),
)
def test_valid_documents_are_written_in_c(resources, flip):
    request = _request(resources)
    document = _numbers_as_json_numbers(otlp_json.to_dict(request), flip)
    c, python = _both_ways(document)
    text = str(document)
    if not any(word in text for word in ("bytesValue", "Infinity", "NaN")):
        assert c is not None  # no base64, no number as a word: nothing left to Python
    if c is not None:
        assert c == python


def test_zero_and_negative_zero_attributes_stay_apart():
    """(The Python encoder's cache of recent attributes once wrote 0.0 for -0.0.)"""
    for first, second in ((-0.0, 0.0), (0.0, -0.0)):
        signs = []
        for x in (first, second):
            document = one_span({"attributes": [{"key": "z", "value": {"doubleValue": x}}]})
            wire = otlp_json._python_wire(document, ExportTraceServiceRequest)
            request = ExportTraceServiceRequest.FromString(wire)
            value = request.resource_spans[0].scope_spans[0].spans[0].attributes[0].value
            signs.append(math.copysign(1, value.double_value))
        assert signs == [math.copysign(1, first), math.copysign(1, second)]
