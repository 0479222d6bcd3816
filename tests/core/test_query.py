"""collector/query.py: times, cursors and trees, independent of any store."""

import pytest

from collector.query import (
    QueryError,
    build_tree,
    decode_cursor,
    encode_cursor,
    parse_time,
    rfc3339,
)


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1795510800123456789", 1_795_510_800_123_456_789),
        ("2026-11-24T09:00:00Z", 1_795_510_800_000_000_000),
        ("2026-11-24T09:00:00.123456789Z", 1_795_510_800_123_456_789),
        ("2026-11-24T09:00:00.5z", 1_795_510_800_500_000_000),
        ("2026-11-24T10:30:00+01:30", 1_795_510_800_000_000_000),
        ("2026-11-24 09:00:00-00:00", 1_795_510_800_000_000_000),
        ("1970-01-01T00:00:00Z", 0),
    ],
)
def test_times_parse_to_nanoseconds(text, ns):
    assert parse_time("start", text) == ns


@pytest.mark.parametrize(
    "text",
    [
        "",
        "now",
        "2026-11-24",
        "2026-11-24T09:00:00",
        "2026-02-30T09:00:00Z",
        "-5",
        "1e18",
        "2026-11-24T09:00:00.1234567890Z",
        str(2**63),
        "١٢٣",
    ],
)
def test_bad_times_name_the_parameter(text):
    with pytest.raises(QueryError, match=r"^end: expected an RFC 3339 time"):
        parse_time("end", text)


def test_rfc3339_keeps_nanoseconds():
    assert rfc3339(1_795_510_800_123_456_789) == "2026-11-24T09:00:00.123456789Z"
    assert parse_time("start", rfc3339(1_795_510_800_000_000_007)) == 1_795_510_800_000_000_007
    assert rfc3339(None) is None


def test_cursors_round_trip_and_refuse_other_shapes():
    token = encode_cursor([1_795_510_800_000_000_000, "call_1"])
    assert decode_cursor(token, (int, str)) == [1_795_510_800_000_000_000, "call_1"]
    for bad in ("", "!!", encode_cursor(["a", "b"]), encode_cursor([1]), encode_cursor({"a": 1})):
        with pytest.raises(QueryError, match=r"^cursor:"):
            decode_cursor(bad, (int, str))
    with pytest.raises(QueryError):
        decode_cursor(encode_cursor([True, "x"]), (int, str))  # a bool is not a time


def _span(span_id, parent, start, end, trace="t1"):
    return {
        "trace_id": trace,
        "span_id": span_id,
        "parent_span_id": parent,
        "name": span_id,
        "start_ns": start,
        "end_ns": end,
    }


def test_tree_nests_by_parent_in_start_order():
    spans = [
        _span("c2", "root", 30, 40),
        _span("root", None, 0, 100),
        _span("c1", "root", 10, 20),
        _span("g", "c1", 12, 13),
    ]
    [root] = build_tree(spans)
    assert root["span_id"] == "root"
    assert [c["span_id"] for c in root["children"]] == ["c1", "c2"]
    assert [g["span_id"] for g in root["children"][0]["children"]] == ["g"]


def test_orphans_hang_under_a_placeholder_spanning_them():
    spans = [
        _span("a", "missing", 50, 70),
        _span("b", "missing", 20, 60),
        _span("x", "a", 55, 56),
        _span("other", "gone", 5, 6, trace="t2"),
        _span("root2", None, 1, 2, trace="t3"),
    ]
    roots = build_tree(spans)
    assert [r["span_id"] for r in roots] == ["root2", "gone", "missing"]
    missing = roots[2]
    assert missing["placeholder"] is True and missing["name"] == "(missing span)"
    assert (missing["start_ns"], missing["end_ns"], missing["duration_ms"]) == (20, 70, 0.0)
    assert [c["span_id"] for c in missing["children"]] == ["b", "a"]
    assert missing["children"][1]["children"][0]["span_id"] == "x"
    # The same span id in another trace is another span.
    assert roots[1]["trace_id"] == "t2" and roots[1]["placeholder"] is True
