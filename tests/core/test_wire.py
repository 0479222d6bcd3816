"""collector._wire, the C readers of the OTLP wire format, against their Python twins."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector import resource_facts, sqlite_files, storage, wire
from collector.spans import (
    CALL_ID_ATTRIBUTE,
    CALL_KEY_ATTRIBUTE,
    ExportTraceServiceRequest,
    SpanBatch,
    _serialize_in_python,
    _set_any_value,
    serialize_resource_spans,
    set_attribute,
    span_count,
)
from collector.storage import BatchRows, build_rows, build_rows_native, build_rows_python
from tests.native_support import native_module, native_only
from tests.support import fixture_requests

# Most tests here hold the C path to its Python twin (native_only: skipped in the pure
# Python run, CALLTRACE_NATIVE=0, where there is no C path); the rest are behaviour that
# holds either way, and run in both.


def test_the_extension_is_built():
    """`make install` builds it; in CI its absence is a broken install, not a skip."""
    native_module()
    assert storage.NATIVE_WIRE, "collector._wire did not build: is a C compiler installed?"
    assert storage.NATIVE_SQLITE, "collector._wire found no SQLite functions in _sqlite3"


def test_calltrace_native_0_turns_the_c_path_off():
    """The switch the pure Python run uses: read once, at import, by collector.wire."""
    import subprocess
    import sys

    probe = (
        "from collector import wire, storage, spans, otlp_json;"
        "print(wire.BUILT, wire.native is None, storage._wire is None, spans._native is None,"
        " otlp_json._wire is None, storage.NATIVE_SQLITE)"
    )
    for value, off in (("0", True), ("1", False), ("", False)):
        env = {**os.environ, "CALLTRACE_NATIVE": value}
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        built = out[0] == "True"
        expected_off = off or not built
        assert out[1:5] == [str(expected_off)] * 4, (value, out)
        assert out[5] == str(not expected_off), (value, out)


def _refs():
    """Callbacks that record what they were given and return stable refs."""
    resources: list[bytes] = []
    scopes: list[bytes] = []

    def resource_ref(service, payload):
        resources.append(payload)
        return (service, len(payload))

    def scope_ref(payload):
        scopes.append(payload)
        return len(payload)

    return resource_ref, scope_ref, resources, scopes


def _both(request: ExportTraceServiceRequest, project: str = "p1") -> tuple[BatchRows, BatchRows]:
    payload = serialize_resource_spans(request.resource_spans)
    r_ref, s_ref, r_seen, s_seen = _refs()
    python = build_rows_python(SpanBatch(list(request.resource_spans), project), 7, r_ref, s_ref)
    r_ref2, s_ref2, r_seen2, s_seen2 = _refs()
    native = build_rows_native(payload, project, 7, r_ref2, s_ref2)
    assert r_seen == r_seen2 and s_seen == s_seen2  # the same callbacks, in the same order
    return python, native


def _assert_same(python: BatchRows, native: BatchRows) -> None:
    assert native.spans == python.spans
    assert native.traces == python.traces
    assert list(native.traces) == list(python.traces)
    assert native.trace_attrs == python.trace_attrs
    assert native.trace_names == python.trace_names
    assert native.call_traces == python.call_traces
    assert native.calls == python.calls


@pytest.mark.parametrize("framework", ["livekit", "pipecat"])
@native_only
def test_fixture_requests_give_the_same_rows(framework):
    for path in fixture_requests(framework):
        request = ExportTraceServiceRequest.FromString(path.read_bytes())
        for rs in request.resource_spans:  # as correlate leaves them: with a call
            set_attribute(rs.resource.attributes, CALL_ID_ATTRIBUTE, "call-1")
            set_attribute(rs.resource.attributes, CALL_KEY_ATTRIBUTE, "RM_1")
        python, native = _both(request)
        assert native.spans, path
        _assert_same(python, native)


@native_only
def test_span_bytes_are_the_spans_own():
    [path, *_] = fixture_requests("livekit")
    request = ExportTraceServiceRequest.FromString(path.read_bytes())
    _, native = _both(request)
    spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert [row[-1] for row in native.spans] == [s.SerializeToString() for s in spans]


@native_only
def test_each_distinct_resource_and_scope_is_asked_for_once():
    # A batch repeats a few resources many times (agents export a few spans at a time);
    # the callbacks run once for each distinct one, in the order they first appear.
    files = fixture_requests("livekit")
    requests = [ExportTraceServiceRequest.FromString(p.read_bytes()) for p in files[:4]]
    other = ExportTraceServiceRequest.FromString(fixture_requests("pipecat")[0].read_bytes())
    merged = ExportTraceServiceRequest()
    for request in (*requests, other, *requests):
        merged.resource_spans.extend(request.resource_spans)
    resources = [rs.resource.SerializeToString() for rs in merged.resource_spans]
    distinct = list(dict.fromkeys(resources))
    assert len(resources) > len(distinct) >= 2
    r_ref, s_ref, r_seen, s_seen = _refs()
    build_rows_native(serialize_resource_spans(merged.resource_spans), "p", 7, r_ref, s_ref)
    assert r_seen == distinct
    assert len(s_seen) == len(set(s_seen))
    python, native = _both(merged)  # the Python path asks alike (_both compares the calls)
    _assert_same(python, native)


attribute_values = st.one_of(
    st.text(max_size=8),
    st.text(min_size=250, max_size=262),  # around MAX_INDEXED_VALUE characters
    st.text(alphabet="é€😀a", min_size=60, max_size=300),  # more bytes than characters
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 2.0, 1e300, -1e22, 0.1, 5e-324]),
    st.binary(max_size=4),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from("ab"), st.booleans(), max_size=1),
)
span_shapes = st.fixed_dictionaries(
    {
        "trace": st.sampled_from([b"\x01" * 16, b"\x02" * 16, b"\x03" * 16]),
        "parent": st.sampled_from([b"", b"\x05" * 8]),
        "name": st.sampled_from(["llm_node", "tts", "stt", "é"]),
        "kind": st.integers(0, 5),
        "start": st.integers(0, 2**64 - 1),
        "end": st.integers(0, 2**64 - 1),
        "status": st.sampled_from([0, 1, 2]),
        "attributes": st.dictionaries(
            st.sampled_from(["k", "gen_ai.x", "", "ü"]), attribute_values, max_size=4
        ),
    }
)
resource_shapes = st.fixed_dictionaries(
    {
        "call": st.sampled_from([None, "call-a", "call-b"]),
        "service": st.sampled_from([None, "agent", ""]),
        "tag": st.one_of(st.none(), st.text(max_size=3), st.integers(0, 9)),
        "scopes": st.lists(
            st.tuples(st.sampled_from(["", "livekit-agents"]), st.lists(span_shapes, max_size=4)),
            max_size=2,
        ),
    }
)


def _request(resources: list[dict]) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    for index, shape in enumerate(resources):
        rs = request.resource_spans.add()
        attributes = rs.resource.attributes
        if shape["service"] is not None:
            set_attribute(attributes, "service.name", shape["service"])
        if shape["call"] is not None:
            set_attribute(attributes, CALL_ID_ATTRIBUTE, shape["call"])
        if shape["tag"] is not None:
            set_attribute(attributes, "roark.project.tag.customer", shape["tag"])
        set_attribute(attributes, "index", index)
        for scope_name, spans in shape["scopes"]:
            ss = rs.scope_spans.add()
            ss.scope.name = scope_name
            for n, s in enumerate(spans):
                span = ss.spans.add(
                    trace_id=s["trace"],
                    span_id=bytes([n + 1]) * 8,
                    parent_span_id=s["parent"],
                    name=s["name"],
                    kind=s["kind"],
                    start_time_unix_nano=s["start"],
                    end_time_unix_nano=s["end"],
                )
                span.status.code = s["status"]
                for key, value in s["attributes"].items():
                    set_attribute(span.attributes, key, value)
    return request


@native_only
def test_a_trace_gets_every_attribute_when_equal_pairs_repeat():
    """The C reader adds a trace's attribute pairs once each, remembering them by
    identity: a repeated long value (past its cache) makes an equal pair each time,
    which the set drops, and the next pair made can take its place in memory. Each must
    still be told apart (the bug: the trace lost the next attribute)."""
    long_value = "é" * 200  # indexed (<= 256 characters), and too long for the cache
    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add().spans
    for n, attributes in enumerate(
        [{"a": long_value}, {"a": long_value, "b": long_value + "b"}, {"c": "x" * 300}]
    ):
        span = spans.add(trace_id=b"\x01" * 16, span_id=bytes([n + 1]) * 8, name="s")
        for key, value in attributes.items():
            set_attribute(span.attributes, key, value)
    python, native = _both(request)
    _assert_same(python, native)
    assert {k for k, _ in native.trace_attrs[b"\x01" * 16]} >= {"a", "b"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(resource_shapes, max_size=4))
@native_only
def test_any_batch_gives_the_same_rows(resources):
    python, native = _both(_request(resources))
    _assert_same(python, native)


@native_only
def test_float_texts_match_attribute_text():
    values = [2.0, 0.25, -0.0, math.inf, -math.inf, math.nan, 1e300, 123456789.5]
    request = _request([{"call": None, "service": None, "tag": None, "scopes": [("", [])]}])
    span = (
        request.resource_spans[0]
        .scope_spans[0]
        .spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="x")
    )
    for index, value in enumerate(values):
        set_attribute(span.attributes, f"v{index}", value)
    _, native = _both(request)
    pairs = native.trace_attrs[b"\x01" * 16]
    for index, value in enumerate(values):
        assert (f"v{index}", storage.attribute_text(value)) in pairs


def test_malformed_bytes_are_reported_by_the_protobuf_parser():
    """A queue's bytes that are not protobuf fall back to the Python path, whose parser
    raises the error the exporter turns into a permanent failure."""
    if wire.native is not None:
        with pytest.raises(ValueError):
            build_rows_native(b"\x0a\xff", "p", 0, lambda *a: 1, lambda p: 1)
    batch = SpanBatch.from_bytes(b"\x0a\xff", "p")
    with pytest.raises(DecodeError):
        build_rows(batch, 0, lambda *a: 1, lambda p: 1)


def _ids_request(*spans: tuple[bytes, bytes, bytes]) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    ss = request.resource_spans.add().scope_spans.add()
    for trace_id, span_id, parent in spans:
        ss.spans.add(trace_id=trace_id, span_id=span_id, parent_span_id=parent, name="s")
    request.resource_spans.add()  # a resource without spans counts none
    return request


GOOD = (b"\x01" * 16, b"\x02" * 8, b"")


@pytest.mark.parametrize(
    "bad",
    [
        (b"\x01" * 15, b"\x02" * 8, b""),
        (bytes(16), b"\x02" * 8, b""),
        (b"\x01" * 16, b"\x02" * 7, b""),
        (b"\x01" * 16, bytes(8), b""),
        (b"\x01" * 16, b"\x02" * 8, b"\x03" * 9),
        (b"\x01" * 16, b"\x02" * 8, bytes(8)),  # valid, but drop_invalid_spans clears it
    ],
)
@native_only
def test_check_spans_finds_what_drop_invalid_spans_would_change(bad):
    from collector import _wire
    from collector.receivers.otlp import drop_invalid_spans

    good = _ids_request(GOOD, GOOD)
    assert _wire.check_spans(good.SerializeToString()) == (2, True)
    request = _ids_request(GOOD, bad)
    body = request.SerializeToString()
    assert _wire.check_spans(body) == (2, False)
    # With the body, the same outcome as the Python loop, edits included.
    reference = ExportTraceServiceRequest.FromString(body)
    assert drop_invalid_spans(request, body) == drop_invalid_spans(reference)
    assert request == reference


def _stream_commands(request: ExportTraceServiceRequest, **config) -> tuple[tuple, tuple]:
    """redis_streams' commands for ``request``: packed in C from its bytes, and in
    Python from its messages."""
    from exporters.redis_streams import RedisStreamsConfig, RedisStreamsExporter

    exporter = RedisStreamsExporter("redis_streams", RedisStreamsConfig(**config))
    assert exporter._native
    payload = serialize_resource_spans(request.resource_spans)
    native = exporter._commands(SpanBatch.from_bytes(payload, "acme"))
    exporter._native = False
    python = exporter._commands(SpanBatch(list(request.resource_spans), "acme"))
    return native, python


@pytest.mark.parametrize("framework", ["livekit", "pipecat"])
@pytest.mark.parametrize("include_resource", [True, False])
@native_only
def test_stream_entries_are_packed_as_in_python(framework, include_resource):
    for path in fixture_requests(framework):
        request = ExportTraceServiceRequest.FromString(path.read_bytes())
        for rs in request.resource_spans:
            set_attribute(rs.resource.attributes, CALL_ID_ATTRIBUTE, "call-1")
        native, python = _stream_commands(request, include_resource=include_resource)
        assert native[1] >= 1
        assert native == python


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(resource_shapes, max_size=3),
    st.integers(-(2**31), 2**31 - 1),
    st.sampled_from([0, 1000]),
)
@native_only
def test_any_batch_gives_the_same_stream_entries(resources, kind, maxlen):
    request = _request(resources)
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans[:1]:
                span.kind = kind  # open enums: any int32 is kept
    native, python = _stream_commands(request, maxlen=maxlen)
    assert native == python


# -- received bytes written out again (SpanBatch._received) -----------------------------


def _edited_as_a_pipeline_would(request: ExportTraceServiceRequest, drop: int | None):
    """The request's messages after resource edits, a dropped resource and a resource
    replaced by a new message, as auth, skip, correlate and batch may leave them."""
    kept = list(request.resource_spans)
    for index, rs in enumerate(kept):
        set_attribute(rs.resource.attributes, CALL_ID_ATTRIBUTE, f"call-{index}")
    if drop is not None and kept:
        del kept[drop % len(kept)]
    if kept:
        replacement = type(kept[0])()
        replacement.CopyFrom(kept[0])
        replacement.schema_url = "replaced"
        kept[0] = replacement
    return kept


def _with_sources(messages: list, sources: dict) -> SpanBatch:
    batch = SpanBatch(messages)
    batch._received = sources
    return batch


def _assert_written_out_alike(body: bytes, drop: int | None = None) -> None:
    from collector import _wire
    from collector.spans import received_bytes

    request = ExportTraceServiceRequest.FromString(body)
    sources = received_bytes(request, body, _wire.resource_spans_layout(body))
    for rs in request.resource_spans:  # the receiver's span counts
        assert _with_sources([], sources).count_of(rs) == span_count(rs)
    kept = _edited_as_a_pipeline_would(request, drop)
    written = serialize_resource_spans(kept, sources)
    assert written == _serialize_in_python(kept, sources, None)  # C and its reference
    spliced = ExportTraceServiceRequest.FromString(written)
    assert spliced == ExportTraceServiceRequest(resource_spans=kept)
    batch = _with_sources(kept, sources)
    assert batch.span_count == sum(map(span_count, kept))


@pytest.mark.parametrize("framework", ["livekit", "pipecat"])
@native_only
def test_received_bytes_give_the_messages_the_processors_left(framework):
    for path in fixture_requests(framework):
        _assert_written_out_alike(path.read_bytes(), drop=1)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(resource_shapes, max_size=4), st.one_of(st.none(), st.integers(0, 3)))
@native_only
def test_any_request_is_written_out_alike(resources, drop):
    _assert_written_out_alike(_request(resources).SerializeToString(), drop)


@native_only
def test_a_resource_given_twice_or_not_at_all_is_serialized():
    """Protobuf merges repeated message fields: such a resource is not cut from the bytes."""
    from collector import _wire

    request = _request([{"call": None, "service": "a", "tag": None, "scopes": [("", [])]}] * 2)
    body = request.SerializeToString()
    first = request.resource_spans[0].SerializeToString()
    twice = b"\n" + bytes([len(first) + 2 + 2]) + first + b"\n\x00" + b"\n\x00"  # two more
    no_resource = b"\n\x02\x1a\x00"  # a schema_url only
    layout = _wire.resource_spans_layout(body + twice + no_resource)
    assert layout[0] is not None and layout[1] is not None
    assert layout[2:] == [None, None]


async def test_spans_a_processor_drops_are_not_counted_from_the_received_bytes():
    """The receiver's span counts describe the messages until a processor that edits
    spans runs: the pipeline drops them before it."""
    from collector.components import Processor
    from collector.pipeline import Pipeline

    class DropFirstSpans(Processor):
        type_name = "drop_first_spans"

        async def process(self, batch):
            for rs in batch.resource_spans:
                for ss in rs.scope_spans:
                    del ss.spans[:1]
            return batch

    counted = []

    class Count(Processor):
        type_name = "count"

        async def process(self, batch):
            counted.append((batch.span_count, sum(map(span_count, batch.resource_spans))))
            return batch

    batch = _received(fixture_requests("livekit")[0].read_bytes())
    received = batch.span_count
    pipeline = Pipeline("p", [Count("c1", None), DropFirstSpans("d", None), Count("c2", None)], [])
    await pipeline.consume(batch)
    assert counted[0] == (received, received)
    assert counted[1][0] == counted[1][1] < received


def _received(body: bytes) -> SpanBatch:
    """A batch of ``body`` as the receiver makes it: with the received bytes where the C
    path runs (SpanBatch.from_received), without them on the pure Python path."""
    request = ExportTraceServiceRequest.FromString(body)
    return SpanBatch.from_received(list(request.resource_spans), body, "p1")


def _assert_resource_bytes_are_true(batch: SpanBatch) -> None:
    messages = batch._parsed()
    for entry, rs in zip(batch.entries(), messages, strict=True):
        assert type(rs.resource).FromString(entry.resource_bytes) == rs.resource
    written = serialize_resource_spans(messages, batch._received, batch._resource_bytes)
    assert written == _serialize_in_python(messages, batch._received, batch._resource_bytes)
    assert ExportTraceServiceRequest.FromString(written) == batch.to_request()


def _assert_received_alike(body: bytes) -> None:
    """``_wire.received`` gives what ``received_bytes`` and ``received_resources`` do."""
    from collector import _wire
    from collector.spans import received_bytes, received_resources

    request = ExportTraceServiceRequest.FromString(body)
    messages = list(request.resource_spans)
    sources = received_bytes(request, body, _wire.resource_spans_layout(body))
    assert _wire.received(messages, body) == (sources, received_resources(sources))


@pytest.mark.parametrize("framework", ["livekit", "pipecat"])
@native_only
def test_received_bytes_in_c_are_those_of_python(framework):
    for path in fixture_requests(framework):
        _assert_received_alike(path.read_bytes())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(resource_shapes, max_size=4))
@native_only
def test_any_requests_received_bytes_in_c_are_those_of_python(resources):
    _assert_received_alike(_request(resources).SerializeToString())


@native_only
def test_received_refuses_another_number_of_messages_and_malformed_bodies():
    from collector import _wire

    body = fixture_requests("livekit")[0].read_bytes()
    messages = list(ExportTraceServiceRequest.FromString(body).resource_spans)
    for wrong in (messages[:-1], [*messages, messages[0]]):
        with pytest.raises(ValueError, match="another number of ResourceSpans"):
            _wire.received(wrong, body)
    with pytest.raises(ValueError):
        _wire.received(messages, body[:-3])


async def test_a_plugin_receivers_body_of_another_buffer_type_is_taken_as_bytes():
    """``TraceIngest.export`` takes the body as bytes whatever buffer a receiver hands it
    (the C helpers keep bytes objects in the batch's sources)."""
    from collector.components import RequestInfo
    from collector.receivers.otlp import TraceIngest
    from collector.telemetry import Telemetry

    batches: list[SpanBatch] = []

    class Keep:
        async def consume(self, batch: SpanBatch) -> None:
            batches.append(batch)

    body = fixture_requests("livekit")[0].read_bytes()
    ingest = TraceIngest("otlp", "http", Keep(), Telemetry())
    for handed in (bytearray(body), memoryview(body)):
        batches.clear()
        request = ExportTraceServiceRequest.FromString(body)
        await ingest.export(request, RequestInfo({}), handed)  # type: ignore[arg-type]
        (batch,) = batches
        assert bool(batch._received) == (wire.native is not None)
        written = batch.serialize()
        assert ExportTraceServiceRequest.FromString(written) == request


@native_only
def test_bytes_are_taken_only_for_the_very_message_they_were_kept_for():
    """An entry of sources or resource_payloads under a message's id but for another
    message (a freed one's id, reused) is not used: that message is serialized."""
    body = fixture_requests("livekit")[0].read_bytes()
    batch = _received(body)
    first, other = batch._parsed()[0], type(batch._parsed()[0])()
    other.CopyFrom(first)
    other.resource.attributes.add(key="changed").value.string_value = "yes"
    stale_sources = {id(other): (first, *batch._received[id(first)][1:])}
    stale_payloads = {id(other): (first, batch._resource_bytes[id(first)][1])}
    for sources, payloads in ((stale_sources, None), (batch._received, stale_payloads)):
        written = serialize_resource_spans([other], sources, payloads)
        assert written == _serialize_in_python([other], sources, payloads)
        assert ExportTraceServiceRequest.FromString(written).resource_spans[0] == other


@native_only
def test_sources_in_another_buffer_type_are_written_out_whole():
    from collector import _wire
    from collector.spans import received_bytes

    body = fixture_requests("livekit")[0].read_bytes()
    request = ExportTraceServiceRequest.FromString(body)
    sources = received_bytes(request, bytearray(body), _wire.resource_spans_layout(body))
    written = serialize_resource_spans(list(request.resource_spans), sources)
    assert ExportTraceServiceRequest.FromString(written) == request


@native_only
def test_offsets_outside_the_body_are_refused():
    from collector import _wire

    batch = _received(fixture_requests("livekit")[0].read_bytes())
    rs = batch._parsed()[0]
    _, body, start, end, r_start, r_end, spans = batch._received[id(rs)]
    for offsets in ((start, len(body) + 1, r_start, r_end), (r_start + 1, end, r_start, r_end)):
        sources = {id(rs): (rs, body, *offsets, spans)}
        with pytest.raises(ValueError, match="outside its body"):
            _wire.serialize_resource_spans([rs], sources, None)


@pytest.mark.parametrize("framework", ["livekit", "pipecat"])
def test_received_resource_bytes_are_the_resources(framework):
    for path in fixture_requests(framework):
        batch = _received(path.read_bytes())
        if wire.native is not None:  # the received bytes are kept by the C path
            assert len(batch._resource_bytes) == batch.resource_count
        _assert_resource_bytes_are_true(batch)


@pytest.mark.parametrize(
    "tag", [b"\n", b"\x8a\x00", b"\x8a\x80\x00"], ids=["plain", "padded", "padded2"]
)
def test_a_resource_field_whose_tag_or_length_is_padded_is_cut_right(tag):
    """Varints may be written longer than they need (protobuf parsers accept them): the
    resource's bytes start after the tag and the length, however long each is."""
    from collector.spans import varint

    request = ExportTraceServiceRequest.FromString(fixture_requests("livekit")[0].read_bytes())
    rs = request.resource_spans[0]
    resource = rs.resource.SerializeToString()
    scopes = b"".join(
        b"\x12" + varint(len(ss.SerializeToString())) + ss.SerializeToString()
        for ss in rs.scope_spans
    )
    length = varint(len(resource))
    for padded_length in (length, length[:-1] + bytes([length[-1] | 0x80]) + b"\x00"):
        rs_bytes = tag + padded_length + resource + scopes
        body = b"\n" + varint(len(rs_bytes)) + rs_bytes
        assert ExportTraceServiceRequest.FromString(body).resource_spans[0] == rs
        batch = _received(body)
        if wire.native is not None:  # the received bytes are kept by the C path
            assert [payload for _, payload in batch._resource_bytes.values()] == [resource]
        _assert_resource_bytes_are_true(batch)


resource_keys = st.sampled_from(
    [
        "service.name",
        CALL_ID_ATTRIBUTE,
        CALL_KEY_ATTRIBUTE,
        "calltrace.call.source",
        "roark.project.tag.env",
        "roark.project.tag.",
        "livekit.room.id",
        "é",
        "",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(resource_keys, st.one_of(st.none(), attribute_values)), max_size=8))
@native_only
def test_resource_facts_are_read_off_the_bytes_as_off_the_message(attributes):
    """``_ResourceFacts`` from the bytes (C) and from the parsed message (Python) agree:
    duplicate keys (the last wins), stamps of any value type, values left unset."""
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

    resource = Resource()
    for key, value in attributes:
        kv = resource.attributes.add(key=key)
        if value is not None:
            _set_any_value(kv.value, value)
    payload = resource.SerializeToString()
    native = resource_facts._ResourceFacts(None, payload)
    python = resource_facts._ResourceFacts(Resource.FromString(payload), payload)
    for name in resource_facts._ResourceFacts.__slots__:
        got, expected = getattr(native, name), getattr(python, name)
        if name == "tags":  # NaN != NaN: compare their reprs
            got, expected = repr(got), repr(expected)
        assert got == expected, name


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(resource_shapes, max_size=4))
def test_any_requests_received_resource_bytes_are_its_resources(resources):
    _assert_resource_bytes_are_true(_received(_request(resources).SerializeToString()))


async def test_resource_bytes_stay_true_through_processors_that_edit_resources():
    """skip and correlate read resources' bytes from the batch, correlate puts them back
    after its stamps, and before a processor that does not say it keeps them (a plugin
    that edits resources) the pipeline drops them: what is written out is always the
    resources as the messages have them."""
    from collector.components import Processor
    from collector.pipeline import Pipeline
    from processors.correlate import CorrelateConfig, CorrelateProcessor
    from processors.skip import SkipConfig, SkipProcessor

    class Tagger(Processor):  # a plugin's: edits resources through the messages
        type_name = "tagger"

        async def process(self, batch):
            for rs in batch.resource_spans:
                set_attribute(rs.resource.attributes, "deployment.environment", "test")
            return batch

    seen: list[tuple[bool, ExportTraceServiceRequest, ExportTraceServiceRequest]] = []

    class Capture(Processor):
        type_name = "capture"

        async def process(self, batch):
            parsed = ExportTraceServiceRequest.FromString(batch.serialize())
            seen.append((batch._resource_bytes is not None, parsed, batch.to_request()))
            return batch

    correlate = CorrelateProcessor("correlate", CorrelateConfig(store=None))
    plain = [SkipProcessor("skip", SkipConfig()), correlate, Capture("c1", None)]
    tagged = [*plain, Tagger("tagger", None), Capture("c2", None)]
    for path in fixture_requests("livekit") + fixture_requests("pipecat"):
        seen.clear()
        await Pipeline("p", plain, []).consume(_received(path.read_bytes()))
        await Pipeline("p", tagged, []).consume(_received(path.read_bytes()))
        if wire.native is not None:  # the received bytes are kept by the C path
            assert [kept for kept, _, _ in seen] == [True, True, False]
        for _, written, messages in seen:
            assert written == messages
        assert any(
            kv.key == CALL_ID_ATTRIBUTE
            for rs in seen[0][1].resource_spans
            for kv in rs.resource.attributes
        )


async def test_skip_drops_a_marked_resource_whether_its_bytes_are_known_or_not():
    from processors.skip import SkipConfig, SkipProcessor

    skip = SkipProcessor("skip", SkipConfig())
    received = ExportTraceServiceRequest.FromString(fixture_requests("livekit")[0].read_bytes())
    request = ExportTraceServiceRequest()
    for _ in range(3):  # the same resource three times, the middle one marked
        request.resource_spans.add().CopyFrom(received.resource_spans[0])
    marked = request.resource_spans[1]
    set_attribute(marked.resource.attributes, "roark.skip", True)
    expected = [rs for rs in request.resource_spans if rs.resource != marked.resource]
    assert expected and span_count(marked)
    body = request.SerializeToString()
    for _ in range(2):  # the second time, the outcomes come from the bytes they are kept by
        kept = await skip.process(_received(body))
        assert [rs.resource for rs in kept.resource_spans] == [rs.resource for rs in expected]
    without_bytes = await skip.process(SpanBatch(list(request.resource_spans), "p1"))
    assert list(without_bytes.resource_spans) == expected


# -- execute_steps / execute_rows: a batch's rows into SQLite without the GIL ----------

_PLAIN_SPANS = (
    "CREATE TABLE spans (project, trace_id, span_id, parent_span_id, name, kind, start_ns,"
    " end_ns, duration_ns, status_code, call_id, resource_id, scope_id, span)"
)
_PLAIN_INSERT = "INSERT INTO spans VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14)"


def _int_refs():
    """Integer refs, as the sqlite exporter's resource and scope ids are."""
    ids: dict[bytes, int] = {}
    return (
        lambda service, payload: ids.setdefault(payload, len(ids) + 1),
        lambda payload: ids.setdefault(payload, len(ids) + 1),
    )


def _stored(db) -> list[tuple]:
    return db.execute("SELECT * FROM spans ORDER BY rowid").fetchall()


def _insert_both_ways(
    tmp_path, request: ExportTraceServiceRequest, sql: str = _PLAIN_INSERT, setup: str = ""
):
    """The rows of ``request`` stored by executemany and by execute_steps, each in a file of
    its own: (rows or the exception raised) of each."""
    import sqlite3

    payload = serialize_resource_spans(request.resource_spans)
    outcomes = []
    for way in ("executemany", "execute_steps"):
        path = tmp_path / f"{way}.db"
        path.unlink(missing_ok=True)
        db = sqlite3.connect(path, isolation_level=None)
        db.execute(_PLAIN_SPANS)
        if setup:
            db.execute(setup)
        rows = build_rows_native(payload, "p1", 7, *_int_refs(), span_plan=way == "execute_steps")
        writes = storage.SQLiteWriter(db)
        assert writes.native
        try:
            if way == "executemany":
                db.execute("BEGIN")
                db.executemany(sql, rows.spans)
                db.execute("COMMIT")
            else:
                assert not rows.spans and rows.span_plan is not None
                writes.transaction([(sql, payload, "p1", rows.span_plan[1])])
            outcomes.append(_stored(db))
        except Exception as exc:  # both ways must raise the same
            if db.in_transaction:
                db.execute("ROLLBACK")
            assert not writes.in_transaction
            outcomes.append((type(exc), str(exc)))
        writes.close()
        db.close()
    return outcomes


@pytest.mark.parametrize("framework", ["livekit", "pipecat"])
@native_only
def test_span_rows_from_the_bytes_are_the_rows_executemany_stores(tmp_path, framework):
    for path in fixture_requests(framework):
        request = ExportTraceServiceRequest.FromString(path.read_bytes())
        for rs in request.resource_spans:
            set_attribute(rs.resource.attributes, CALL_ID_ATTRIBUTE, "call-é")
        by_executemany, by_execute_steps = _insert_both_ways(tmp_path, request)
        assert by_executemany and isinstance(by_executemany, list), path
        assert by_execute_steps == by_executemany


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(resource_shapes, max_size=3))
@native_only
def test_any_batch_is_inserted_as_executemany_inserts_it(tmp_path_factory, resources):
    """Generated spans, times up to 2**64 - 1 among them: what SQLite cannot hold is the
    same OverflowError both ways."""
    by_executemany, by_execute_steps = _insert_both_ways(
        tmp_path_factory.mktemp("insert"), _request(resources)
    )
    assert by_execute_steps == by_executemany


@native_only
def test_an_error_sqlite_reports_is_raised_as_executemany_raises_it(tmp_path):
    import sqlite3

    request = ExportTraceServiceRequest.FromString(fixture_requests("livekit")[0].read_bytes())
    trigger = (
        "CREATE TRIGGER full BEFORE INSERT ON spans WHEN NEW.kind = 1"
        " BEGIN SELECT raise(ABORT, 'no room for a server span'); END"
    )
    by_executemany, by_execute_steps = _insert_both_ways(tmp_path, request, setup=trigger)
    assert by_executemany[0].__name__ == "IntegrityError", by_executemany
    assert by_execute_steps == by_executemany
    bad_sql = _insert_both_ways(tmp_path, request, "INSERT INTO nowhere VALUES (?1)")
    assert bad_sql[1] == bad_sql[0] == (sqlite3.OperationalError, "no such table: nowhere")


@native_only
def test_a_spans_step_binds_each_spans_trace_seq_from_the_table_it_is_given(tmp_path):
    """(sql, payload, project, plan, seqs): ?15 is the span's trace's value in seqs, as
    executemany binds it from the rows; a trace id missing from seqs binds NULL."""
    import sqlite3

    request = ExportTraceServiceRequest()
    for path in fixture_requests("pipecat") + fixture_requests("livekit"):
        request.resource_spans.extend(
            ExportTraceServiceRequest.FromString(path.read_bytes()).resource_spans
        )
    payload = serialize_resource_spans(request.resource_spans)
    rows = build_rows_native(payload, "p1", 7, *_int_refs(), span_plan=True)
    traces = sorted({span.trace_id for rs in request.resource_spans for ss in rs.scope_spans
                     for span in ss.spans})  # fmt: skip
    assert len(traces) > 1
    seqs = {trace_id: 1000 + index for index, trace_id in enumerate(traces)}
    expected = sorted(
        (span.span_id, seqs[span.trace_id])
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    )
    db = sqlite3.connect(tmp_path / "seq.db", isolation_level=None)
    db.execute(_PLAIN_SPANS.replace(", span)", ", span, trace_seq NOT NULL)"))
    sql = _PLAIN_INSERT.replace("?14)", "?14,?15)")
    writes = storage.SQLiteWriter(db)
    writes.transaction([(sql, payload, "p1", rows.span_plan[1], seqs)])
    assert sorted(db.execute("SELECT span_id, trace_seq FROM spans")) == expected
    del seqs[traces[0]]
    writes.begin()
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        writes.execute_steps([(sql, payload, "p2", rows.span_plan[1], seqs)])
    with pytest.raises(TypeError, match="seqs"):
        writes.execute_steps([(sql, payload, "p2", rows.span_plan[1], [])])
    writes.rollback()
    writes.close()


@native_only
def test_execute_steps_refuses_a_connection_it_cannot_vouch_for(tmp_path):
    import sqlite3

    from collector import _wire

    request = ExportTraceServiceRequest.FromString(fixture_requests("livekit")[0].read_bytes())
    payload = request.SerializeToString()
    rows = build_rows_native(payload, "p1", 7, *_int_refs(), span_plan=True)
    assert rows.span_plan is not None
    plan = rows.span_plan[1]
    db = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    db.execute(_PLAIN_SPANS)
    handle = _wire.SQLiteHandle(str(tmp_path / "a.db"))
    step = [(_PLAIN_INSERT, payload, "p", plan)]
    for not_a_handle in (db, object(), None, handle.filename):  # never dereferenced
        with pytest.raises(TypeError, match="SQLiteHandle"):
            _wire.execute_steps(not_a_handle, step)
        with pytest.raises(TypeError, match="SQLiteHandle"):
            _wire.execute_rows(not_a_handle, "SELECT 1", [()])
    assert _wire.execute_steps(handle, [("BEGIN", None)]) is None
    assert handle.in_transaction
    with pytest.raises(TypeError, match="a step is"):
        _wire.execute_steps(handle, [(_PLAIN_INSERT,)])
    with pytest.raises(OverflowError):  # read before any step runs: none ran
        _wire.execute_steps(handle, [*step, ("SELECT ?", [(2**63,)])])
    with pytest.raises(ValueError, match="outside the payload"):
        _wire.execute_steps(handle, [(_PLAIN_INSERT, payload[:10], "p", plan)])
    assert _wire.execute_steps(handle, [("ROLLBACK", None)]) is None
    assert _stored(db) == []
    handle.close()
    handle.close()  # again: nothing
    with pytest.raises(ValueError, match="closed"):
        _wire.execute_steps(handle, step)
    with pytest.raises(OSError, match="unable to open"):
        _wire.SQLiteHandle(str(tmp_path / "missing" / "b.db"))  # never creates a file
    db.close()


# -- the sqlite exporter's writer: a SQLite handle of its own (SQLiteWriter) ----------


def test_the_writer_runs_its_transactions_on_a_handle_of_its_own(tmp_path):
    """On this Python the writer opens the file again in C (no object of Python's
    sqlite3 is read there); its transaction is not the Python connection's, and the
    settings open_sqlite gives a connection are the handle's too."""
    import sqlite3

    native_module()
    db = storage.open_sqlite(tmp_path / "w.db", busy_timeout_ms=1234)
    db.execute("CREATE TABLE t (a)")
    writes = storage.SQLiteWriter(db, busy_timeout_ms=1234)
    assert writes.native
    writes.pragma("PRAGMA cache_size=-2048")
    writes.begin()
    assert writes.in_transaction and not db.in_transaction
    settings = [
        "PRAGMA busy_timeout",
        "PRAGMA synchronous",
        "PRAGMA journal_mode",
        "PRAGMA cache_size",
    ]
    read = [writes.returned_ids(f"SELECT * FROM pragma_{p.split()[1]}", [()]) for p in settings]
    assert read[:2] + read[3:] == [[1234], [1], [-2048]]  # NORMAL is 1
    assert writes.returned_ids("INSERT INTO t VALUES (?) RETURNING a", [(5,), (6,)]) == [5, 6]
    assert db.execute("SELECT count(*) FROM t").fetchone() == (0,)  # not committed yet
    writes.execute_steps([("COMMIT", None)])
    assert db.execute("SELECT a FROM t").fetchall() == [(5,), (6,)]
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        db.execute("CREATE UNIQUE INDEX t_a ON t (a)")
        writes.transaction([("INSERT INTO t VALUES (?)", [(7,), (5,)])])
    assert not writes.in_transaction  # rolled back: 7 is not there
    assert db.execute("SELECT a FROM t").fetchall() == [(5,), (6,)]
    writes.close()
    db.close()


def test_the_writer_falls_back_to_sqlite3_on_what_it_cannot_vouch_for(tmp_path):
    """Where the handle cannot be had, the same transactions run through sqlite3: a
    database that is no file (another handle would open a database of its own), a
    library without SQLite's functions (load_sqlite says so and keeps what it found)."""
    _wire = native_module()
    db = storage.open_sqlite(":memory:")
    db.execute("CREATE TABLE t (a)")
    writes = storage.SQLiteWriter(db)
    assert not writes.native
    writes.transaction([("INSERT INTO t VALUES (?)", [(1,), (2,)])])
    assert writes.returned_ids("SELECT a FROM t ORDER BY a", [()]) == [1, 2]
    with pytest.raises(ValueError, match="on a file"):
        _wire.SQLiteHandle(":memory:")
    assert _wire.load_sqlite(_wire.__file__) is False  # loaded, but no SQLite in it
    assert _wire.load_sqlite(str(tmp_path / "nowhere.so")) is False  # not loaded
    db = storage.open_sqlite(tmp_path / "still.db")
    writes = storage.SQLiteWriter(db)
    assert writes.native  # what load_sqlite found first is kept
    writes.transaction([("CREATE TABLE t (a)", None)])
    writes.close()
    db.close()


def _stored_tables(path) -> dict[str, list[tuple]]:
    import sqlite3

    db = sqlite3.connect(path)
    names = [n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    tables = {
        name: sorted(db.execute(f"SELECT * FROM {name}").fetchall(), key=repr)
        for name in names
        if not name.startswith(("sqlite_", "trace_search_"))
    }
    db.close()
    return tables


async def _stored_by_exporter(path, batches: list[SpanBatch], native: bool, monkeypatch):
    import exporters.sqlite_writer as sqlite_writer
    from exporters.sqlite import SQLiteConfig, SQLiteExporter
    from tests.processors._util import FakeTelemetryHost

    class FixedClock:  # the write time is stored (calls' last_seen_ns): the same both ways
        @staticmethod
        def time_ns() -> int:
            return 1_700_000_000_000_000_000

    with monkeypatch.context() as patch:
        patch.setattr(sqlite_files, "NATIVE_SQLITE", native)
        patch.setattr(sqlite_writer, "time", FixedClock)
        exporter = SQLiteExporter("sqlite", SQLiteConfig(path=path))
        await exporter.start(FakeTelemetryHost())
        try:
            assert exporter._writer is not None and exporter._writer.writes.native == native
            for batch in batches:
                await exporter.export(batch)
        finally:
            await exporter.shutdown()
    return _stored_tables(path)


async def test_rows_written_in_c_are_the_rows_sqlite3_writes(tmp_path, monkeypatch):
    """Every table of the file, written by the writer's handle in C and through
    executemany, from the fixtures' requests (with and without calls)."""
    native_module()
    batches = []
    for index, path in enumerate(fixture_requests("livekit") + fixture_requests("pipecat")):
        request = ExportTraceServiceRequest.FromString(path.read_bytes())
        if index % 2:
            for rs in request.resource_spans:
                set_attribute(rs.resource.attributes, CALL_ID_ATTRIBUTE, f"call-{index % 3}")
        batches.append(SpanBatch(list(request.resource_spans), f"p{index % 2}"))
    in_c = await _stored_by_exporter(tmp_path / "c.db", batches, True, monkeypatch)
    in_python = await _stored_by_exporter(tmp_path / "py.db", batches, False, monkeypatch)
    assert in_c["spans"] and in_c["calls"]
    assert in_c == in_python


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(st.lists(st.lists(resource_shapes, max_size=3), min_size=1, max_size=3))
async def test_any_batches_are_written_in_c_as_sqlite3_writes_them(
    tmp_path_factory, monkeypatch, batches
):
    native_module()
    tmp = tmp_path_factory.mktemp("writer")
    made = [SpanBatch(list(_request(resources).resource_spans), "p") for resources in batches]
    outcomes = []
    for native in (True, False):
        try:
            outcomes.append(
                await _stored_by_exporter(tmp / f"{native}.db", made, native, monkeypatch)
            )
        except Exception as exc:  # both ways must raise the same
            outcomes.append((type(exc), str(exc)))
    assert outcomes[0] == outcomes[1]


def _execute_both_ways(tmp_path, sql: str, rows: list, setup: str = "") -> list:
    """``rows`` through executemany and through execute_rows, each on a fresh file:
    what each stored, or the exception each raised."""
    import sqlite3

    from collector import _wire

    outcomes = []
    for way in ("executemany", "execute_rows"):
        path = tmp_path / f"{way}.db"
        path.unlink(missing_ok=True)
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("CREATE TABLE t (a, b, c UNIQUE)")
        if setup:
            db.execute(setup)
        handle = _wire.SQLiteHandle(str(path))
        if way == "executemany":
            db.execute("BEGIN")
        else:
            _wire.execute_steps(handle, [("BEGIN", None)])
        try:
            if way == "executemany":
                db.executemany(sql, rows)
                db.execute("COMMIT")
            else:
                outcome = _wire.execute_rows(handle, sql, rows)
                if isinstance(outcome, tuple):  # what SQLite reported: raised as sqlite3 does
                    raise storage.sqlite_error(*outcome)
                assert _wire.execute_steps(handle, [("COMMIT", None)]) is None
            outcomes.append(
                db.execute("SELECT a, typeof(a), b, c FROM t ORDER BY rowid").fetchall()
            )
        except Exception as exc:  # both ways must raise the same
            if way == "executemany":
                db.execute("ROLLBACK")
            else:
                _wire.execute_steps(handle, [("ROLLBACK", None)])
            outcomes.append((type(exc), str(exc)))
        handle.close()
        db.close()
    return outcomes


sqlite_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),  # past int64 both ways: OverflowError
    st.floats(allow_nan=False),
    st.text(max_size=6),
    st.binary(max_size=6),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(sqlite_values, sqlite_values, sqlite_values), max_size=6))
@native_only
def test_execute_rows_binds_values_as_executemany_does(tmp_path_factory, rows):
    tmp = tmp_path_factory.mktemp("rows")
    plain, upsert = _execute_both_ways(tmp, "INSERT INTO t VALUES (?,?,?)", rows), None
    assert plain[1] == plain[0]
    upsert = _execute_both_ways(
        tmp,
        "INSERT INTO t VALUES (?1,?2,?3) ON CONFLICT (c) DO UPDATE SET a = excluded.a RETURNING a",
        rows,
    )
    assert upsert[1] == upsert[0]


@native_only
def test_execute_rows_raises_what_executemany_raises(tmp_path):
    import sqlite3

    duplicate = _execute_both_ways(tmp_path, "INSERT INTO t VALUES (?,?,?)", [(1, 2, 3), (4, 5, 3)])
    assert duplicate[0][0] is sqlite3.IntegrityError
    assert duplicate[1] == duplicate[0]
    missing = _execute_both_ways(tmp_path, "INSERT INTO nowhere VALUES (?)", [(1,)])
    assert missing[1] == missing[0] == (sqlite3.OperationalError, "no such table: nowhere")
    full = _execute_both_ways(
        tmp_path,
        "INSERT INTO t VALUES (?,?,?)",
        [(1, 2, 3)],
        setup="CREATE TRIGGER full BEFORE INSERT ON t BEGIN SELECT raise(FAIL, 'disk full'); END",
    )
    assert full[1] == full[0] == (sqlite3.IntegrityError, "disk full")


@native_only
def test_execute_rows_refuses_what_it_cannot_bind(tmp_path):
    import sqlite3

    from collector import _wire

    db = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    db.execute("CREATE TABLE t (a, b)")
    handle = _wire.SQLiteHandle(str(tmp_path / "t.db"))
    sql = "INSERT INTO t VALUES (?, ?)"
    _wire.execute_steps(handle, [("BEGIN", None)])
    with pytest.raises(TypeError, match="not supported"):
        _wire.execute_rows(handle, sql, [(1, object())])
    with pytest.raises(ValueError, match="as many values"):  # after the rows before it
        _wire.execute_rows(handle, sql, [(1, 2), (3,)])
    assert _wire.execute_rows(handle, sql, [(5, 6), [7, 8]]) == 2
    _wire.execute_steps(handle, [("COMMIT", None)])
    assert db.execute("SELECT * FROM t").fetchall() == [(1, 2), (5, 6), (7, 8)]
    handle.close()
    db.close()


# -- malformed input: an error or a result, never a crash -----------------------------


def _all_wire_functions(data: bytes) -> None:
    """Every function of collector._wire on ``data``: each may raise ValueError (not
    protobuf) and must not crash, whatever the bytes."""
    from collector import _wire

    calls = [
        lambda: _wire.build_rows(data, "p", lambda b: (1, None, None, ()), len),
        lambda: _wire.check_spans(data),
        lambda: _wire.stream_commands(data, lambda b: (1, b"$1\r\n1\r\n"), 5, b""),
        lambda: _wire.resource_spans_layout(data),
    ]
    for call in calls:
        with contextlib.suppress(ValueError):
            call()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
@native_only
def test_random_bytes_never_crash_the_c_readers(data):
    _all_wire_functions(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(resource_shapes, min_size=1, max_size=2), st.data())
@native_only
def test_damaged_requests_never_crash_the_c_readers(resources, data):
    """Valid requests cut short or with bytes changed: lengths and tags then lie."""
    body = bytearray(_request(resources).SerializeToString())
    if not body:
        return
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(body) - 1))
        body[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(body)))
    _all_wire_functions(bytes(body[:cut]))
    _all_wire_functions(bytes(body))
    _insert_spans_of_damaged(_request(resources).SerializeToString(), bytes(body))


def _insert_spans_of_damaged(good: bytes, damaged: bytes) -> None:
    """A span step on damaged bytes with the plan of the good ones: it reads the spans
    there as build_rows would have; an error or rows, never a crash."""
    import sqlite3

    from collector import _wire

    plan = build_rows_native(good, "p", 0, *_int_refs(), span_plan=True).span_plan
    assert plan is not None
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "spans.db")
        db = sqlite3.connect(path, isolation_level=None)
        db.execute(_PLAIN_SPANS)
        handle = _wire.SQLiteHandle(path)
        _wire.execute_steps(handle, [("BEGIN", None)])
        with contextlib.suppress(ValueError, OverflowError):
            _wire.execute_steps(handle, [(_PLAIN_INSERT, damaged, "p", plan[1])])
        handle.close()
        db.close()


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(
                [
                    "resourceSpans",
                    "scopeSpans",
                    "spans",
                    "attributes",
                    "key",
                    "value",
                    "arrayValue",
                    "values",
                    "kvlistValue",
                    "traceId",
                    "name",
                    "kind",
                    "startTimeUnixNano",
                    "status",
                    "code",
                    "events",
                    "links",
                    "x",
                ]
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["resourceSpans", "resource_spans", "x"]), json_values, max_size=2
    )
)
@native_only
def test_any_json_document_is_written_or_left_to_python(document):
    from collector import _wire, otlp_json

    table = otlp_json._native_table(ExportTraceServiceRequest.DESCRIPTOR)
    wire = _wire.json_to_wire(document, table)
    if wire is not None:  # then it is protobuf, and the Python writer agrees
        assert ExportTraceServiceRequest.FromString(wire) == ExportTraceServiceRequest.FromString(
            otlp_json._python_wire(document, ExportTraceServiceRequest)
        )


@native_only
def test_the_c_functions_keep_no_memory_once_their_results_are_gone():
    """A reference the C code forgets to drop keeps its objects forever: the server's
    memory would grow with every batch (build_rows once kept ~200 bytes a span)."""
    import gc
    import tracemalloc

    from collector import _wire, otlp_json

    bodies = [path.read_bytes() for path in fixture_requests("livekit")]
    table = otlp_json._native_table(ExportTraceServiceRequest.DESCRIPTOR)
    documents = [otlp_json.to_dict(ExportTraceServiceRequest.FromString(b)) for b in bodies]

    import sqlite3

    directory = tempfile.TemporaryDirectory()
    path = os.path.join(directory.name, "spans.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(_PLAIN_SPANS)
    writes = storage.SQLiteWriter(db)

    def every_function():
        for body in bodies:
            plain = build_rows_native(body, "p", 0, lambda *a: (1, 2), lambda p: 3).spans
            rows = build_rows_native(body, "p", 0, lambda *a: 1, lambda p: 3, span_plan=True)
            writes.begin()
            writes.execute_steps(
                [(_PLAIN_INSERT, body, "p", rows.span_plan[1]), ("SELECT 1", None)]
            )
            writes.execute_steps([(_PLAIN_INSERT, [(*r[:11], 1, 3, r[13]) for r in plain])])
            with contextlib.suppress(OverflowError):
                writes.returned_ids("SELECT ?", [(1,), (2**64,)])
            writes.rollback()
            _wire.SQLiteHandle(path).close()
            _wire.check_spans(body)
            _wire.stream_commands(body, lambda b: (1, b"$1\r\n1\r\n"), 5, b"h")
            _wire.resource_spans_layout(body)
        for document in documents:
            _wire.json_to_wire(document, table)

    every_function()  # caches filled
    gc.collect()
    tracemalloc.start()
    try:
        every_function()
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20):
            every_function()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        writes.close()
        db.close()
        directory.cleanup()
    assert grown < 64 * 1024, f"{grown} bytes kept after 20 rounds"
