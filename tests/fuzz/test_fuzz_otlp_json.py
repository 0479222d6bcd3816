"""Fuzz target: OTLP/JSON request bodies (``collector.otlp_json``), as the OTLP/HTTP
receiver decodes them.

Any body is decoded to a request and the protobuf bytes it was parsed from, or refused
with ``OTLPJSONError`` (a 400), never another exception; where the C encoder
(``collector._wire.json_to_wire``) writes a document, the Python encoder writes the same
message, and what C leaves to Python (errors included) Python decides; a request written
as OTLP/JSON reads back as itself. ``make fuzz`` runs this longer, under AddressSanitizer
and UBSan."""

from __future__ import annotations

import struct
from typing import Any

import orjson
from hypothesis import example, given
from hypothesis import strategies as st

from collector import otlp_json, wire
from collector.otlp_json import OTLPJSONError, decode_request_wire
from collector.spans import ExportTraceServiceRequest
from tests.core.test_otlp_json import json_documents
from tests.fuzz.fuzz_budget import fuzz_settings
from tests.fuzz.otlp_inputs import requests


def assert_body_decoded_or_refused(body: bytes) -> None:
    try:
        request, wire_bytes = decode_request_wire(body)
    except OTLPJSONError:
        return
    assert ExportTraceServiceRequest.FromString(wire_bytes) == request


def assert_encoders_agree(document: Any) -> None:
    """The C encoder's bytes parse to the Python encoder's message; where C declines
    (None), Python's answer stands, whatever it is."""
    try:
        python: Any = otlp_json._python_wire(document, ExportTraceServiceRequest)
    except OTLPJSONError as exc:
        python = exc
    if wire.native is not None:
        table = otlp_json._native_table(ExportTraceServiceRequest.DESCRIPTOR)
        written = wire.native.json_to_wire(document, table)
        if written is not None:
            assert not isinstance(python, Exception), python
            assert ExportTraceServiceRequest.FromString(
                written
            ) == ExportTraceServiceRequest.FromString(python)
    if not isinstance(python, Exception):
        ExportTraceServiceRequest.FromString(python)  # well-formed protobuf


def _json_bytes(document: Any) -> bytes | None:
    """``document`` as a body; None for one no JSON text holds (a lone surrogate)."""
    try:
        return orjson.dumps(document, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return None


def _nan_with_payload_bits() -> ExportTraceServiceRequest:
    """A double attribute holding a NaN with payload bits, which JSON's "NaN" drops."""
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add(name="s")
    nan = struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0]
    span.attributes.add(key="x").value.double_value = nan
    return request


@fuzz_settings(200)
@given(requests)
@example(_nan_with_payload_bits())
def test_requests_read_back_as_themselves(request):
    document = otlp_json.to_dict(request)
    assert_encoders_agree(document)
    body = _json_bytes(document)
    assert body is not None
    decoded, _ = decode_request_wire(body)
    # NaN != NaN, and JSON's "NaN" has no payload bits: compared as OTLP/JSON again
    assert _json_bytes(otlp_json.to_dict(decoded)) == body


@fuzz_settings(300)
@given(json_documents)
def test_documents(document):
    assert_encoders_agree(document)
    body = _json_bytes(document)
    if body is not None:
        assert_body_decoded_or_refused(body)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3)


_nested = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    _containers,
    max_leaves=10,
)


@fuzz_settings(300)
@given(st.one_of(st.binary(max_size=200), _nested.map(_json_bytes).filter(bool)))
@example(b"[" * 5000)  # deeper than any parser's limit
@example(b'{"resourceSpans":' + b"[" * 200 + b"]" * 200 + b"}")
@example(b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz"}]}]}]}')
@example(
    b'{"resourceSpans":[{"resource":{"attributes":[{"key":"k","value":{"intValue":"1e400"}}]}}]}'
)
@example(b"\xff\xfe{}")
def test_any_body(body):
    assert_body_decoded_or_refused(body)
