"""Values a valid OTLP request can hold that storage once could not take (issue 16
defect 7), and how the storage exporters classify a failed write: an error that would
repeat for the batch is permanent, one that may pass is retryable."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector import (
    PermanentError,
    RetryableError,
    SpanBatch,
    set_attribute,
    sqlite_files,
    storage,
)
from collector.spans import ResourceSpans
from collector.storage import (
    MAX_STORED_NS,
    NATIVE_WIRE,
    build_rows_native,
    build_rows_python,
    json_document,
)
from exporters import sqlite as sqlite_exporter
from exporters.redis_streams import RedisStreamsConfig, RedisStreamsExporter
from exporters.sqlite import SQLiteConfig, SQLiteExporter, _Writer
from tests.exporters.test_sqlite import add_span, call_resource
from tests.processors._util import FakeTelemetryHost
from tests.support import query


def test_json_document_is_strict_json_for_every_attribute_value():
    tags = {
        "nan": math.nan,
        "inf": [math.inf, -math.inf],
        "blob": b"\x00\xff",
        "nested": {"x": {"y": [math.nan, b"\x01", None, True, 3, "\x00"]}},
    }
    text = json_document(tags, sort_keys=True)
    assert json.loads(text, parse_constant=pytest.fail) == {
        "blob": "00ff",
        "inf": ["inf", "-inf"],
        "nan": "nan",
        "nested": {"x": {"y": ["nan", "01", None, True, 3, "\x00"]}},
    }
    db = sqlite3.connect(":memory:")  # SQLite's JSON functions take it too
    assert db.execute("SELECT json_valid(?), json_patch('{}', ?)", (text, text)).fetchone()[0]


def _huge_times_batch(*more: ResourceSpans) -> SpanBatch:
    rs = call_resource("call_t", **{"roark.project.tag.score": math.nan})
    trace = os.urandom(16)
    add_span(rs, trace, "late", 2**63 + 5, 2**64 - 1)
    add_span(rs, trace, "ordinary", 1_000, 2_000)
    return SpanBatch([rs, *more], "p")


def _rows_summary(rows):
    spans = sorted((r[4], r[6], r[7], r[8]) for r in rows.spans)
    traces = sorted(tuple(t[3:6]) for t in rows.traces.values())
    calls = sorted((c[0], c[5], c[6]) for c in rows.calls.values())
    return spans, traces, calls


def test_span_times_past_int64_are_stored_as_the_largest_one_by_both_readers():
    batch = _huge_times_batch()
    python = _rows_summary(build_rows_python(batch, 0, lambda s, p: 1, lambda p: 1))
    assert python == (
        [("late", MAX_STORED_NS, MAX_STORED_NS, 0), ("ordinary", 1_000, 2_000, 1_000)],
        [(1_000, MAX_STORED_NS, MAX_STORED_NS - 1_000)],
        [("call_t", 1_000, MAX_STORED_NS)],
    )
    if not NATIVE_WIRE:
        pytest.skip("collector._wire is not built: the Python reader is the only one")
    native = build_rows_native(batch.serialize(), "p", 0, lambda s, p: 1, lambda p: 1)
    assert _rows_summary(native) == python


@pytest.fixture(params=["process", "thread"])
async def exporter(tmp_path, request):
    exporter = SQLiteExporter(
        "sqlite", SQLiteConfig(path=tmp_path / "db.sqlite", writer=request.param)
    )
    await exporter.start(FakeTelemetryHost())
    yield exporter
    await exporter.shutdown()


async def test_sqlite_stores_nan_bytes_and_huge_times(exporter):
    set_bytes = call_resource("call_b", **{"roark.project.tag.blob": b"\x00\xff"})
    add_span(set_bytes, os.urandom(16), "bytes", 1, 2)
    batch = _huge_times_batch(set_bytes)
    await exporter.export(batch)
    path = exporter.config.path
    assert dict(query(path, "SELECT call_id, tags FROM calls")) == {
        "call_t": '{"score": "nan"}',
        "call_b": '{"blob": "00ff"}',
    }
    assert query(path, "SELECT max(end_ns) FROM spans") == [(MAX_STORED_NS,)]
    for (attributes,) in query(path, "SELECT attributes FROM resources"):
        json.loads(attributes, parse_constant=pytest.fail)


async def test_sqlite_refusing_the_data_is_permanent_and_a_locked_file_retryable(exporter):
    path = exporter.config.path
    db = sqlite3.connect(path, isolation_level=None)
    # SQLite's own "malformed JSON" for this batch's data, whatever the data is now.
    db.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON calls BEGIN SELECT json_patch('{', '{}'); END"
    )
    batch = _huge_times_batch()
    with pytest.raises(PermanentError, match="malformed JSON"):
        await exporter.export(batch)
    db.execute("DROP TRIGGER refuse")
    if exporter.config.writer == "thread":  # (the process writer's errors cross as these)
        assert exporter._writer is not None
        exporter._writer.db.execute("PRAGMA busy_timeout=100")
        db.execute("BEGIN EXCLUSIVE")  # another writer holds the file: it may pass
        try:
            with pytest.raises(RetryableError, match="locked"):
                await exporter.export(batch)
        finally:
            db.execute("ROLLBACK")
    db.close()
    await exporter.export(batch)
    assert len(query(path, "SELECT 1 FROM spans")) == 2


# -- any request: what every storage exporter must take ---------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),  # NaN and infinities among them
    _text,
    st.binary(max_size=8),
)
_any_values = st.none() | st.recursive(  # None: an empty AnyValue
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(_text, children, max_size=3)
    ),
    max_leaves=8,
)
_attributes = st.dictionaries(
    st.one_of(_text, st.sampled_from(["roark.project.tag.a", "roark.project.tag.b"])),
    _any_values,
    max_size=4,
)
_times = st.integers(min_value=0, max_value=2**64 - 1)
_spans = st.fixed_dictionaries(
    {
        "start": _times,
        "end": _times,
        "name": _text,
        "kind": st.integers(min_value=-(2**31), max_value=2**31 - 1),
        "status": st.integers(min_value=-(2**31), max_value=2**31 - 1),
        "attributes": _attributes,
        "group": st.booleans(),
    }
)
_resources = st.tuples(_attributes, st.booleans(), st.lists(_spans, min_size=1, max_size=3))


def _set_attributes(target: Any, attributes: dict[str, Any]) -> None:
    for key, value in attributes.items():
        if value is None:
            target.add(key=key)  # an empty AnyValue
        else:
            set_attribute(target, key, value)


def _any_request(resources: list[tuple[dict[str, Any], bool, list[dict[str, Any]]]]) -> SpanBatch:
    messages = []
    for attributes, in_a_call, spans in resources:
        rs = call_resource("call_any" if in_a_call else None)
        _set_attributes(rs.resource.attributes, attributes)
        trace = os.urandom(16)
        for spec in spans:
            span = add_span(rs, trace, spec["name"], spec["start"], spec["end"])
            span.kind = spec["kind"]  # type: ignore[assignment]
            span.status.code = spec["status"]  # type: ignore[assignment]
            _set_attributes(span.attributes, spec["attributes"])
            if spec["group"]:
                data = span.SerializeToString() + GROUP
                span.Clear()
                span.MergeFromString(data)
        messages.append(rs)
    return SpanBatch(messages, "p")


GROUP = b"\xa3\x06\x08\x01\xa4\x06"
"""Field 100 as a protobuf group holding a varint: upb keeps it as an unknown field."""


_WRITER_MODES = ("native", "executemany", "python") if NATIVE_WIRE else ("python",)
"""How the sqlite writer turns a batch into rows: C build_rows and C inserts, C build_rows
and executemany (``CALLTRACE_NATIVE_SQLITE=0``), or Python throughout (no extension)."""


@contextlib.contextmanager
def _writer_mode(mode: str) -> Iterator[None]:
    native_sqlite = sqlite_files.NATIVE_SQLITE and mode == "native"
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(sqlite_files, "NATIVE_SQLITE", native_sqlite))
        stack.enter_context(mock.patch.object(sqlite_exporter, "NATIVE_SQLITE", native_sqlite))
        if mode == "python":
            stack.enter_context(mock.patch.object(storage, "_wire", None))
        yield


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(resources=st.lists(_resources, min_size=1, max_size=3))
def test_any_request_is_written_by_sqlite_and_packed_for_redis(tmp_path_factory, resources):
    """No value a valid request holds makes a write fail: otherwise the request, answered
    200, would be dropped (or, before, retried forever)."""
    batch = _any_request(resources)
    spans = sum(len(spec) for _, _, spec in resources)
    directory = tmp_path_factory.mktemp("any")
    for mode in _WRITER_MODES:
        path = directory / f"{mode}.sqlite"
        with _writer_mode(mode):
            writer = _Writer(path, 4)
            try:  # as the receiver hands it over
                writer.write(SpanBatch.parse(batch.serialize(), "p"))
            finally:
                writer.close()
        assert query(path, "SELECT count(*) FROM spans") == [(spans,)], mode
        for (tags,) in query(path, "SELECT tags FROM calls WHERE tags IS NOT NULL"):
            json.loads(tags, parse_constant=pytest.fail)
    for protobuf_entries in (True, False):
        exporter = RedisStreamsExporter(
            "redis_streams",
            RedisStreamsConfig(encoding="protobuf" if protobuf_entries else "json"),
        )
        _, count = exporter._commands(SpanBatch.parse(batch.serialize(), "p"))
        assert count == spans + 1  # an XADD each, one XTRIM
