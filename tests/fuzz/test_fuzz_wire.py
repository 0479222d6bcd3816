"""Fuzz target: the C readers of request bytes (``collector._wire``) against their Python
twins, on generated requests, on the same requests written otherwise on the wire (as
protobuf allows), on damaged bytes and on random bytes.

Where upb accepts the bytes, every C entry point must give what its Python twin gives
(``check_spans``, ``resource_spans_layout``, ``received``, ``serialize_resource_spans``,
``build_rows`` with ``resource_facts``, ``stream_commands``); where upb refuses them, the
C readers raise ValueError or give a result, and never crash. On the pure Python run
(``CALLTRACE_NATIVE=0``) the Python path's part still runs: it reads what upb accepts
and refuses the rest with DecodeError. ``make fuzz`` runs this longer, under
AddressSanitizer and UBSan."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import example, given
from hypothesis import strategies as st
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from collector import resource_facts, storage, wire
from collector.receivers.otlp import drop_invalid_spans
from collector.spans import (
    ExportTraceServiceRequest,
    SpanBatch,
    _serialize_in_python,
    received_bytes,
    received_resources,
    serialize_resource_spans,
    span_count,
)
from tests.fuzz.fuzz_budget import fuzz_settings
from tests.fuzz.otlp_inputs import damaged, encode, fields_at, requests, wire_variants
from tests.support import fixture_requests

_LEN = 2


def python_layout(body: bytes) -> list[Any]:
    """``resource_spans_layout`` in Python, its reference: for each ResourceSpans field
    (length-delimited field 1) of the request, (start, end, resource field start, end,
    spans) or None where the resource field (length-delimited field 1) is not there
    exactly once; spans are the length-delimited field 2 of its length-delimited field 2."""
    layout: list[Any] = []
    for number, wire_type, _, start, end in fields_at(body, 0, len(body)):
        if number != 1 or wire_type != _LEN:
            continue
        resources, spans = [], 0
        for n, t, field_start, value_start, value_end in fields_at(body, start, end):
            if t != _LEN:
                continue
            if n == 1:
                resources.append((field_start, value_end))
            elif n == 2:
                spans += sum(
                    1 for m, u, *_ in fields_at(body, value_start, value_end) if (m, u) == (2, 2)
                )
        layout.append((start, end, *resources[0], spans) if len(resources) == 1 else None)
    return layout


def _canonical(message_type: Any, payload: bytes) -> bytes:
    return message_type.FromString(payload).SerializeToString(deterministic=True)


def _rows(build: Any) -> dict[str, str]:
    """What ``build`` (a build_rows path) gives, written so that both paths compare:
    resources, scopes and spans by the messages their bytes hold, NaN by its repr."""

    def resource_ref(service: str | None, payload: bytes) -> tuple[Any, ...]:
        return ("resource", service, _canonical(Resource, payload))

    def scope_ref(payload: bytes) -> tuple[Any, ...]:
        return ("scope", _canonical(InstrumentationScope, payload))

    resource_facts._RESOURCE_FACTS.clear()  # a cache of either path's facts: not shared
    rows = build(resource_ref, scope_ref)
    spans = [(*row[:-1], _canonical(Span, row[-1])) for row in rows.spans]
    return {
        "spans": repr(spans),
        "traces": repr(rows.traces),
        "trace_attrs": repr({t: sorted(pairs) for t, pairs in rows.trace_attrs.items()}),
        "trace_names": repr(sorted(rows.trace_names)),
        "call_traces": repr(sorted(rows.call_traces)),
        "calls": repr(rows.calls),
    }


def _refused_cleanly(body: bytes) -> None:
    """Bytes upb refuses: the Python path says so (DecodeError); the C readers raise
    ValueError or answer (they read only the fields they need: a field they skip may be
    what upb refuses, such as a string that is not UTF-8), and never crash."""
    native = wire.native
    if native is None:
        with pytest.raises(DecodeError):
            storage.build_rows(SpanBatch.from_bytes(body, "p"), 0, lambda *a: 1, lambda p: 1)
        return
    calls = [
        lambda: native.build_rows(body, "p", lambda b: (1, None, None, ()), len),
        lambda: native.build_rows(body, "p", lambda b: (1, None, None, ()), len, False),
        lambda: native.check_spans(body),
        lambda: native.stream_commands(body, lambda b: (1, b"$1\r\n1\r\n"), 5, b""),
        lambda: native.resource_spans_layout(body),
        lambda: native.resource_facts(body),
        lambda: native.received([], body),
    ]
    for call in calls:
        with contextlib.suppress(ValueError):
            call()


def assert_readers_agree(body: bytes) -> None:
    """The oracle: see the module's docstring."""
    try:
        request = ExportTraceServiceRequest.FromString(body)
    except DecodeError:
        _refused_cleanly(body)
        return
    messages = list(request.resource_spans)
    python_rows = _rows(lambda r, s: storage.build_rows_python(SpanBatch(messages, "p1"), 7, r, s))
    native = wire.native
    if native is None:
        # The Python path reads the batch's bytes as the exporters get them.
        payload = serialize_resource_spans(messages)
        assert (
            _rows(lambda r, s: storage.build_rows(SpanBatch.from_bytes(payload, "p1"), 7, r, s))
            == python_rows
        )
        return

    # check_spans decides whether drop_invalid_spans walks the spans.
    with_c, in_python = (ExportTraceServiceRequest.FromString(body) for _ in range(2))
    assert drop_invalid_spans(with_c, body) == drop_invalid_spans(in_python)
    assert with_c == in_python
    assert native.check_spans(body)[0] == sum(map(span_count, messages))

    # Where each ResourceSpans is, and its resource's bytes (SpanBatch.from_received).
    layout = native.resource_spans_layout(body)
    assert layout == python_layout(body)
    sources = received_bytes(request, body, layout)
    payloads = received_resources(sources)
    assert native.received(messages, body) == (sources, payloads)
    for rs in messages:
        if id(rs) in sources:
            assert sources[id(rs)][6] == span_count(rs)
            assert Resource.FromString(payloads[id(rs)][1]) == rs.resource

    # Written out again from the received bytes: the messages.
    written = serialize_resource_spans(messages, sources, payloads)
    assert written == _serialize_in_python(messages, sources, payloads)
    assert ExportTraceServiceRequest.FromString(written) == ExportTraceServiceRequest(
        resource_spans=messages
    )

    # The storage rows, read off the bytes in C (resource_facts included).
    assert _rows(lambda r, s: storage.build_rows_native(body, "p1", 7, r, s)) == python_rows
    assert _rows(lambda r, s: storage.build_rows_native(written, "p1", 7, r, s)) == python_rows
    for rs in messages:
        if id(rs) in sources:
            resource_bytes = payloads[id(rs)][1]
            in_c = resource_facts._ResourceFacts(None, resource_bytes)
            reference = resource_facts._ResourceFacts(
                Resource.FromString(resource_bytes), resource_bytes
            )
            for name in resource_facts._ResourceFacts.__slots__:
                assert repr(getattr(in_c, name)) == repr(getattr(reference, name)), name

    # One Redis stream entry a span.
    _, entries = native.stream_commands(body, lambda b: (1, b"$1\r\n1\r\n"), 5, b"")
    assert entries == sum(map(span_count, messages))


# Inputs that once made the readers disagree (issue 16), or are worth keeping: each an
# explicit case, written field by field ([number, wire type, value, length padding]).
def _len(number: int, value: Any) -> list[Any]:
    return [number, 2, value, 0]


def _varint(number: int, value: int) -> list[Any]:
    return [number, 0, value, 0]


def _group(number: int, contents: bytes) -> list[Any]:
    return [number, 3, contents, 0]


def _kv(key: bytes, *value: list[Any]) -> list[Any]:
    return [_len(1, key), *value]


def _span(*extra: list[Any]) -> list[Any]:
    times = [[7, 1, 5, 0], [8, 1, 9, 0]]
    return [_len(1, b"\x01" * 16), _len(2, b"\x02" * 8), _len(5, b"s"), *times, *extra]


def _request(*resource_spans: list[Any]) -> bytes:
    return encode([_len(1, rs) for rs in resource_spans])


_CALL = _len(1, _kv(b"calltrace.call.id", _len(2, [_len(1, b"call-a")])))
_SERVICE = _len(1, _kv(b"service.name", _len(2, [_len(1, b"agent")])))
_SPANS = _len(2, [_len(2, _span())])

REGRESSIONS = {
    # A oneof member with another wire type is an unknown field to upb: the string
    # before it stays the AnyValue's (the C reader took the last member, of any type).
    "oneof-member-with-another-wire-type": _request(
        [
            _len(
                1,
                [_len(1, _kv(b"calltrace.call.id", _len(2, [_len(1, b"call-a"), _varint(1, 7)])))],
            ),
            _SPANS,
        ]
    ),
    "oneof-member-with-another-wire-type-in-a-span": _request(
        [_len(2, [_len(2, _span(_len(9, _kv(b"k", _len(2, [_varint(3, 7), [3, 2, b"", 0]])))))])]
    ),
    # A group (deprecated; upb keeps one as an unknown field) inside a KeyValue, a span,
    # a resource: the C reader refused the whole request as malformed.
    "group-in-a-keyvalue": _request(
        [
            _len(
                1,
                [
                    _len(
                        1,
                        _kv(
                            b"calltrace.call.id",
                            _len(2, [_len(1, b"call-a")]),
                            _group(3, b"\x08\x01"),
                        ),
                    )
                ],
            ),
            _SPANS,
        ]
    ),
    "group-in-a-span": _request(
        [_len(2, [_len(2, _span(_group(100, b"\x0b\x0c")))])]  # a group within a group
    ),
    "group-in-a-resource": _request([_len(1, [_CALL, _group(9, b"")]), _SPANS]),
    # A resource written in two parts, which protobuf merges: the C reader took the
    # last part only (no call id).
    "resource-in-two-parts": _request([_len(1, [_CALL]), _SPANS, _len(1, [_SERVICE])]),
    # The same for a scope, and for a KeyValue's value (the later member wins).
    "scope-in-two-parts": _request(
        [_len(2, [_len(1, [_len(1, b"a")]), _len(2, _span()), _len(1, [_len(2, b"v")])])]
    ),
    "value-in-two-parts": _request(
        [
            _len(
                1,
                [
                    _len(
                        1,
                        _kv(
                            b"calltrace.call.id", _len(2, [_varint(2, 1)]), _len(2, [_len(1, b"c")])
                        ),
                    )
                ],
            ),
            _SPANS,
        ]
    ),
    "string-value-then-an-empty-part": _request(
        [
            _len(1, [_len(1, _kv(b"service.name", _len(2, [_len(1, b"agent")]), _len(2, [])))]),
            _SPANS,
        ]
    ),
    # A resource field with another wire type: an unknown field of the ResourceSpans,
    # which must be written out again as it came.
    "resource-field-with-another-wire-type": _request([_varint(1, 5), _SPANS]),
    "resource-field-with-another-wire-type-and-a-resource": _request(
        [_varint(1, 5), _len(1, [_CALL]), _SPANS]
    ),
    # Lengths written as padded varints.
    "padded-lengths": _request([[1, 2, [_CALL], 3], [2, 2, [[2, 2, _span(), 2]], 1]]),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_inputs_that_once_made_the_readers_disagree(name):
    body = REGRESSIONS[name]
    ExportTraceServiceRequest.FromString(body)  # upb accepts each of them
    assert_readers_agree(body)


def test_fixture_requests():
    for path in fixture_requests("livekit") + fixture_requests("pipecat"):
        assert_readers_agree(path.read_bytes())


@fuzz_settings(100)
@given(requests)
def test_generated_requests(request):
    assert_readers_agree(request.SerializeToString())


@fuzz_settings(150)
@given(wire_variants())
def test_requests_written_otherwise_on_the_wire(body):
    assert_readers_agree(body)


@fuzz_settings(150)
@given(damaged())
@example(b"\x0a\x02\x0b\x0c")  # an end tag closing a group inside a ResourceSpans
@example(b"\x0a\x01\x0c")  # an end tag without its group
@example(b"\x0a\x02\x0b\x14")  # a group closed by another group's end tag
@example(b"\x1b\x00\x00\x0b\x0c\x1c")  # field number 0 inside a group: upb skips it (make fuzz)
@example(b"\x1b\x03\x04\x1c")  # a group of number 0 inside a group
@example(b"\x1b\x04\x1c")  # an end tag of number 0 closing group 3: refused
def test_damaged_requests(body):
    assert_readers_agree(body)


@fuzz_settings(300)
@given(st.binary(max_size=200))
def test_random_bytes(body):
    assert_readers_agree(body)


# -- Redis replies (exporters/redis_streams.py): counted in C as in Python ---------------

_replies = st.lists(
    st.one_of(
        st.binary(min_size=0, max_size=20).map(lambda b: b"$%d\r\n%s\r\n" % (len(b), b)),
        st.just(b"$-1\r\n"),
        st.sampled_from([b"+OK\r\n", b":12\r\n", b"-ERR no\r\n", b"-OOM used memory\r\n"]),
    ),
    max_size=6,
)


def _count_replies(native: bool, expected: int, chunks: list[bytes]) -> tuple[Any, ...]:
    from exporters.redis_streams import _ReplyCounter

    counter = _ReplyCounter(expected, native=native)
    try:
        for chunk in chunks:
            counter.feed(chunk)
    except Exception as exc:  # both ways must raise the same
        return (type(exc).__name__,)
    return counter.missing, repr(counter.error), counter._buffer


@fuzz_settings(300)
@given(_replies, st.data())
def test_redis_replies_are_counted_as_in_python(replies, data):
    stream = bytearray(b"".join(replies))
    if data.draw(st.booleans()) and stream:  # damaged: a byte changed, or cut
        position = data.draw(st.integers(0, len(stream) - 1))
        stream[position] = data.draw(st.integers(0, 255))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    chunks = [bytes(stream[a:b]) for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    expected = data.draw(st.integers(len(replies), len(replies) + 1))
    in_python = _count_replies(False, expected, chunks)
    if wire.native is not None:
        assert _count_replies(True, expected, chunks) == in_python
