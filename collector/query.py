"""The read side of storage, independent of any one database.

A storage exporter that can answer queries offers ``query_store()`` returning a
``QueryStore``; ``collector.api`` turns HTTP parameters into the filters below and the
store's dicts into JSON. Every method takes the project the API key belongs to and
never returns another project's data.

Search semantics, shared by every store:

- Time ranges select by *start* time: ``start <= start_ns < end`` of a trace or call.
- Trace search is trace-level: a trace matches when each condition is met by some span
  (or the resource of some span) of that trace; different conditions may be met by
  different spans. ``attr.KEY=VALUE`` compares the attribute's text (strings as they
  are, ``true``/``false``, numbers in decimal) and sees only short scalar values, as
  indexed by the store. ``name_contains`` is a case-insensitive substring of a span
  name. ``min_duration_ms`` and ``status`` apply to the trace: its extent (first span
  start to last span end) and whether any span has status ERROR. ``service`` is a
  case-insensitive substring of the trace's service; ``tag.KEY=VALUE`` is the resource
  attribute ``roark.project.tag.KEY``. Each trace lists the spans meeting a name or
  attribute condition themselves (``matched_spans``).
- Span search is span-level: a span matches when it meets every condition itself
  (``attr.*`` and ``tag.*`` by its own attributes or its resource's); ``name`` and
  ``service`` are case-insensitive substrings. Results come newest trace first, then in
  start order within a trace.
- The calls list sorts by a field of the cached summary's totals or the duration
  (largest first, calls without the number last) and filters on minimums of them; the
  range's cached summaries are brought up to date first.
- Results are newest first unless sorted; a page's ``next_cursor`` (opaque) continues
  after its last item, so paging never repeats or skips an item that existed when
  paging began.

Every store answers the same JSON: ``span_json``, ``trace_json`` and ``call_json`` build
it from rows of the shape both storage exporters keep (the span's own protobuf bytes
beside the columns queries filter on), and ``summary_cache_text`` / ``cached_summary``
read and write the per-call turn summary cache (``calls.summary``, ``summary_spans``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from opentelemetry.proto.trace.v1.trace_pb2 import Span

from collector.spans import any_value_to_python

__all__ = [
    "CALL_SORTS",
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "MAX_SUMMARY_REFRESH",
    "SUMMARY_VERSION",
    "TAG_PREFIX",
    "TURN_COMPONENTS",
    "CallFilter",
    "CallSummaries",
    "Page",
    "ParsedSummaries",
    "QueryError",
    "QueryStore",
    "SpanFilter",
    "StorageUnavailableError",
    "TraceFilter",
    "build_tree",
    "cached_summary",
    "call_json",
    "decode_cursor",
    "decode_span_cursor",
    "decode_trace_cursor",
    "encode_cursor",
    "encode_span_cursor",
    "jsonable",
    "matched_span_ids",
    "parse_time",
    "payload_matches",
    "resource_key",
    "rfc3339",
    "span_hit_json",
    "span_json",
    "summary_cache_text",
    "trace_json",
]

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000


TAG_PREFIX = "roark.project.tag."
"""Resource attributes that are a call's custom tags (``roark.project.tag.KEY``)."""


class QueryError(ValueError):
    """A bad query parameter; the message says which and what was expected (HTTP 400)."""


class StorageUnavailableError(Exception):
    """The store cannot answer now (locked, unreachable, shutting down): HTTP 503, retry."""


@dataclass
class TraceFilter:
    start_ns: int | None = None
    end_ns: int | None = None
    service: str | None = None
    name: str | None = None
    name_contains: str | None = None
    attributes: list[tuple[str, str]] = field(default_factory=list)
    """``(key, value text)`` pairs, each met by some span or resource attribute."""
    min_duration_ns: int | None = None
    status: str | None = None
    """``"error"``: traces with an ERROR span; ``"ok"``: traces without one."""
    tags: list[tuple[str, str]] = field(default_factory=list)
    """``(tag, value text)``: a resource attribute ``roark.project.tag.TAG`` of the trace."""
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None

    @property
    def span_conditions(self) -> bool:
        """Whether some condition is met by particular spans (``matched_spans``)."""
        return bool(self.name or self.name_contains or self.attributes)


@dataclass
class SpanFilter:
    """Span search: a span matches when it meets *every* condition itself."""

    start_ns: int | None = None
    end_ns: int | None = None
    name: str | None = None
    """Case-insensitive substring of the span's name."""
    service: str | None = None
    """Case-insensitive substring of the ``service.name`` of the span's resource."""
    attributes: list[tuple[str, str]] = field(default_factory=list)
    """``(key, value text)``: an attribute of the span or of its resource."""
    tags: list[tuple[str, str]] = field(default_factory=list)
    """``(tag, value text)``: resource attribute ``roark.project.tag.TAG`` of the span."""
    min_duration_ns: int | None = None
    status: str | None = None
    """``"error"``: status ERROR; ``"ok"``: any other status."""
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None

    def resource_conditions(self) -> list[tuple[str, str]]:
        return [(TAG_PREFIX + k, v) for k, v in self.tags]


CALL_SORTS = {
    "start": None,
    "worst_turn": "worst_e2e_ms",
    "median_turn": "median_e2e_ms",
    "e2e_p95": "p95_e2e_ms",
    "errors": "errors",
    "duration": None,
}
"""``sort`` values of the calls list: the start (newest first, the default), the
duration, or a field of the cached summary's ``totals`` (largest first)."""


@dataclass
class CallFilter:
    start_ns: int | None = None
    end_ns: int | None = None
    attributes: list[tuple[str, str]] = field(default_factory=list)
    """``(key, value text)`` pairs, each met by a span or resource attribute of the call."""
    tags: list[tuple[str, str]] = field(default_factory=list)
    """``(tag, value text)``: resource attribute ``roark.project.tag.TAG`` equals value."""
    outcome: str | None = None
    """The LiveKit session's outcome (``collector.session_facts``): an ``outcome`` log
    record of that value, or the session tag ``lk.OUTCOME``."""
    session_tag: str | None = None
    """A LiveKit session tag the call carries (``collector.session_facts``)."""
    sort: str = "start"
    """One of ``CALL_SORTS``: newest first, or the largest value first (nulls last)."""
    min_worst_turn_ms: float | None = None
    min_median_turn_ms: float | None = None
    min_e2e_p95_ms: float | None = None
    min_errors: int | None = None
    min_duration_ns: int | None = None
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None

    @property
    def needs_summaries(self) -> bool:
        """Whether the statement reads the summary cache (it must be current first)."""
        return CALL_SORTS.get(self.sort) is not None or any(
            v is not None
            for v in (
                self.min_worst_turn_ms,
                self.min_median_turn_ms,
                self.min_e2e_p95_ms,
                self.min_errors,
            )
        )

    def summary_minimums(self) -> list[tuple[str, float]]:
        """``(totals field, minimum)`` of each summary filter given."""
        pairs = [
            ("worst_e2e_ms", self.min_worst_turn_ms),
            ("median_e2e_ms", self.min_median_turn_ms),
            ("p95_e2e_ms", self.min_e2e_p95_ms),
            ("errors", self.min_errors),
        ]
        return [(name, float(value)) for name, value in pairs if value is not None]


MAX_SUMMARY_REFRESH = 1000
"""Stale or missing turn summaries one sorted, filtered or stats query recomputes at
most (a few seconds of work); the rest are counted as ``pending_summaries``, and each
such query recomputes the next ones, so a cold range of many calls fills in over a few
queries instead of holding one for minutes."""


@dataclass
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None
    pending_summaries: int = 0
    """Calls of the range whose turn summary was stale or missing and not recomputed
    by this query (``MAX_SUMMARY_REFRESH``): they are left out or show older numbers."""


@dataclass
class CallSummaries:
    """``QueryStore.summaries``: the calls of a range with their current summaries."""

    calls: list[dict[str, Any]]
    pending: int
    """Calls left out: their summary was stale or missing and not recomputed now."""


class QueryStore(Protocol):
    """What the query API reads. Every call is scoped to one project; a store that
    cannot answer now (locked, unreachable) raises ``StorageUnavailableError``."""

    async def calls(self, project: str, query: CallFilter) -> Page:
        """Calls, newest first, each with its summary totals."""
        ...

    async def call(self, project: str, call_id: str) -> dict[str, Any] | None:
        """``{"call", "spans", "resources"}``: a call and every span of it, or None."""
        ...

    async def traces(self, project: str, query: TraceFilter) -> Page:
        """Trace summaries matching ``query``, newest first."""
        ...

    async def trace(self, project: str, trace_id: bytes) -> dict[str, Any] | None:
        """``{"trace", "spans", "resources"}`` of one trace, or None."""
        ...

    async def spans(self, project: str, query: SpanFilter) -> Page:
        """Spans matching ``query`` (``span_hit_json``), newest trace first, then in start
        order within a trace."""
        ...

    async def summaries(
        self, project: str, start_ns: int | None, end_ns: int | None
    ) -> CallSummaries:
        """The current cached summary (``summary_cache_text``) of every call starting in
        ``[start_ns, end_ns)``, with ``call_id``, ``start_ns``, ``service`` and ``tags``
        (up to ``MAX_SUMMARY_REFRESH`` stale ones recomputed, the rest left out)."""
        ...

    async def turn_histograms(self, project: str, start_ns: int) -> list[dict[str, Any]]:
        """The project's ``lk.agents.turn.*`` histogram points recorded at or after
        ``start_ns``, each with its call's start (``at_ns``; the point's start when the
        call has no spans), service and tags (``collector.turn_histograms``)."""
        ...


# -- parameters ---------------------------------------------------------------------


_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})$"
)
_MAX_NS = 2**63 - 1


def parse_time(name: str, text: str) -> int:
    """Unix nanoseconds from RFC 3339 (``2026-11-24T10:00:00.5Z``) or Unix nanoseconds."""
    text = text.strip()
    ns: int | None = None
    if len(text) > 40:  # longer than any RFC 3339 time or int64; never parsed
        pass
    elif text.isascii() and text.isdigit():
        ns = int(text)
    elif match := _RFC3339.match(text):
        day, clock, fraction, offset = match.groups()
        offset = "+00:00" if offset in ("Z", "z") else offset
        try:
            moment = datetime.fromisoformat(f"{day}T{clock}{offset}")
        except ValueError:
            moment = None
        if moment is not None:
            delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
            ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000
            ns += int((fraction or "").ljust(9, "0"))
    if ns is None or not 0 <= ns <= _MAX_NS:
        raise QueryError(
            f"{name}: expected an RFC 3339 time like 2026-11-24T10:00:00Z or Unix"
            f" nanoseconds from 0 to {_MAX_NS}, got {text[:64]!r}"
        )
    return ns


def rfc3339(ns: int | None) -> str | None:
    """An RFC 3339 UTC time with nanoseconds, e.g. ``2026-11-24T10:00:00.123456789Z``."""
    if ns is None:
        return None
    seconds, nanos = divmod(int(ns), 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{nanos:09d}Z"


def encode_cursor(position: list[Any]) -> str:
    """An opaque page token for the sort position of a page's last item."""
    raw = json.dumps(position, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str, shape: tuple[type, ...]) -> list[Any]:
    """The sort position in ``token``; QueryError unless it has ``shape``. (The API
    checks a cursor's seal before this, ``collector/cursors.py``; this still holds for
    any text.)"""
    position = None
    if len(token) <= 512:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            position = json.loads(raw)
        except (ValueError, binascii.Error, RecursionError):
            position = None
    if (
        not isinstance(position, list)
        or len(position) != len(shape)
        or not all(type(v) is t for v, t in zip(position, shape, strict=True))
        or not all(abs(v) <= _MAX_NS for v in position if isinstance(v, int))
    ):
        raise QueryError("cursor: not a cursor this API returned")
    return position


def decode_trace_cursor(token: str) -> tuple[int, bytes]:
    """``(start_ns, trace_id)`` of a trace search cursor; QueryError unless it is one."""
    start, trace_hex = decode_cursor(token, (int, str))
    try:
        trace_id = bytes.fromhex(trace_hex)
    except ValueError:
        trace_id = b""
    return start, trace_id


def encode_span_cursor(trace_start: int, trace_id: bytes, start: int, span_id: bytes) -> str:
    """The page token after a span, in span search order."""
    return encode_cursor([trace_start, trace_id.hex(), start, span_id.hex()])


def decode_span_cursor(token: str) -> tuple[int, bytes, int, bytes]:
    """``(trace start, trace id, span start, span id)`` of a span search cursor."""
    trace_start, trace_hex, start, span_hex = decode_cursor(token, (int, str, int, str))
    try:
        return trace_start, bytes.fromhex(trace_hex), start, bytes.fromhex(span_hex)
    except ValueError:
        raise QueryError("cursor: not a cursor this API returned") from None


def payload_matches(
    payload: bytes, resource: dict[str, Any], attributes: list[tuple[str, str]]
) -> bool:
    """Whether each ``(key, text)`` is an attribute of the span (its stored protobuf
    bytes) or of its ``resource``, compared as the search index keeps values
    (``attribute_text``); only the attributes the conditions name are converted."""
    if not attributes:
        return True
    from collector.storage import attribute_text

    for key, text in attributes:
        # A key absent from the bytes is no attribute of the span: skip the parse.
        if key.encode() not in payload and not (
            key in resource and attribute_text(resource[key]) == text
        ):
            return False
    wanted = {key for key, _ in attributes}
    found = {
        kv.key: any_value_to_python(kv.value)
        for kv in Span.FromString(payload).attributes
        if kv.key in wanted
    }
    return all(
        (key in found and attribute_text(found[key]) == text)
        or (key in resource and attribute_text(resource[key]) == text)
        for key, text in attributes
    )


def matched_span_ids(rows: list[Any], query: TraceFilter) -> list[str]:
    """Ids (hex) of the spans among ``rows`` (``span_id, name, span bytes``) meeting one
    of the span conditions of ``query``: its name, or one attribute of its own."""
    matched = []
    for span_id, name, payload in rows:
        by_name = (query.name is not None and name == query.name) or (
            query.name_contains is not None and query.name_contains.lower() in name.lower()
        )
        if by_name or any(payload_matches(payload, {}, [pair]) for pair in query.attributes):
            matched.append(bytes(span_id).hex())
    return matched


def span_hit_json(
    span: dict[str, Any], service: str | None, trace_row: tuple[Any, ...]
) -> dict[str, Any]:
    """A span search result: the span (without children), its service and its trace
    (``trace_id, start_ns, root_name, duration_ns``)."""
    trace_id, trace_start, root_name, duration = trace_row
    hit = dict(span)
    hit.pop("children", None)
    hit["service"] = service
    hit["trace"] = {
        "trace_id": trace_id.hex(),
        "start": rfc3339(trace_start),
        "root_name": root_name,
        "duration_ms": round(duration / 1e6, 3),
    }
    return hit


# -- trees --------------------------------------------------------------------------


def build_tree(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spans nested by parent (``children``, in start order); roots in start order.

    A span whose parent is not among ``spans`` (it never arrived, or not yet) hangs
    under a placeholder node for that parent (``placeholder: true``), spanning its
    children, so a call whose root is missing still shows one tree.
    """
    by_id = {(s["trace_id"], s["span_id"]): s for s in spans}
    for span in spans:
        span["children"] = []
    placeholders: dict[tuple[str, str], dict[str, Any]] = {}
    roots: list[dict[str, Any]] = []
    for span in spans:
        parent_id = span.get("parent_span_id")
        if not parent_id:
            roots.append(span)
            continue
        key = (span["trace_id"], parent_id)
        parent = by_id.get(key)
        if parent is None:
            parent = placeholders.get(key)
            if parent is None:
                parent = placeholders[key] = _placeholder(span["trace_id"], parent_id)
                roots.append(parent)
            parent["start_ns"] = min(parent["start_ns"] or span["start_ns"], span["start_ns"])
            parent["end_ns"] = max(parent["end_ns"] or 0, span["end_ns"])
            parent["duration_ms"] = round((parent["end_ns"] - parent["start_ns"]) / 1e6, 3)
        parent["children"].append(span)
    for node in [*spans, *placeholders.values()]:
        node["children"].sort(key=_start_order)
    roots.sort(key=_start_order)
    return roots


def _start_order(span: dict[str, Any]) -> tuple[int, int, str]:
    return (span["start_ns"] or 0, -(span["end_ns"] or 0), span["span_id"])


def _placeholder(trace_id: str, span_id: str) -> dict[str, Any]:
    return {
        "trace_id": trace_id,
        "span_id": span_id,
        "parent_span_id": None,
        "name": "(missing span)",
        "placeholder": True,
        "kind": 0,
        "start_ns": None,
        "end_ns": None,
        "duration_ms": 0.0,
        "status_code": 0,
        "status_message": "",
        "attributes": {},
        "events": [],
        "links": [],
        "resource_id": None,
        "scope": None,
        "call_id": None,
        "children": [],
    }


# -- rows to JSON ---------------------------------------------------------------------
#
# Rows are positional, in the column order each store selects:
#   span:  trace_id, span_id, parent_span_id, name, start_ns, end_ns, status_code,
#          call_id, resource key, scope name, scope version, span protobuf bytes
#   trace: trace_id, call_id, service, start_ns, end_ns, duration_ns, root_name,
#          root_span_id, has_error
#   call:  call_id, room_id, source, room_name, service, start_ns, end_ns, tags (JSON
#          text), ... (the summary cache columns follow; call_json ignores them)

SUMMARY_VERSION = 2
"""Bumped when the cached summary's shape changes, so old caches are recomputed."""


def resource_key(value: Any) -> str:
    """A resource's key in a response: a digest as hex, an integer id in decimal."""
    return bytes(value).hex() if isinstance(value, bytes | memoryview) else str(value)


def span_json(row: Any) -> dict[str, Any]:
    """A span row as the API's span (attributes, events, links from its protobuf bytes)."""
    trace_id, span_id, parent, name, start, end, status, call_id, resource, *rest = row
    scope_name, scope_version, payload = rest
    span = Span.FromString(payload)
    return {
        "trace_id": trace_id.hex(),
        "span_id": span_id.hex(),
        "parent_span_id": parent.hex() if parent else None,
        "name": name,
        "kind": span.kind,
        "start_ns": start,
        "end_ns": end,
        "duration_ms": round((end - start) / 1e6, 3),
        "status_code": status,
        "status_message": span.status.message,
        "attributes": _attributes(span.attributes),
        "events": [
            {
                "name": event.name,
                "time_ns": event.time_unix_nano,
                "attributes": _attributes(event.attributes),
            }
            for event in span.events
        ],
        "links": [
            {
                "trace_id": link.trace_id.hex(),
                "span_id": link.span_id.hex(),
                "attributes": _attributes(link.attributes),
            }
            for link in span.links
        ],
        "resource_id": resource_key(resource),
        "scope": {"name": scope_name or "", "version": scope_version or ""},
        "call_id": call_id,
        "placeholder": False,
    }


def _attributes(key_values: Any) -> dict[str, Any]:
    return {kv.key: jsonable(any_value_to_python(kv.value)) for kv in key_values}


def jsonable(value: Any) -> Any:
    """Bytes as hex, non-finite floats as strings: what JSON can carry."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def trace_json(row: Any, span_count: int) -> dict[str, Any]:
    """A trace row as the API's trace summary."""
    trace_id, call_id, service, start, end, duration, root_name, root_span_id, has_error = row
    return {
        "trace_id": trace_id.hex(),
        "call_id": call_id,
        "service": service,
        "start": rfc3339(start),
        "start_ns": start,
        "end_ns": end,
        "duration_ms": round(duration / 1e6, 3),
        "root_name": root_name,
        "root_span_id": root_span_id.hex() if root_span_id else None,
        "has_error": bool(has_error),
        "span_count": span_count,
        "matched_spans": [],
    }


def call_json(row: Any, summary: dict[str, Any], span_count: int) -> dict[str, Any]:
    """A call row and its summary (``framework``, ``totals``) as the API's call."""
    call_id, room_id, source, room_name, service, start, end, tags = tuple(row)[:8]
    totals = summary["totals"]
    return {
        "call_id": call_id,
        "room_id": room_id,
        "source": source,
        "room_name": room_name,
        "service": service,
        "framework": summary["framework"],
        "start": rfc3339(start),
        "start_ns": start,
        "end_ns": end,
        "duration_ms": round((end - start) / 1e6, 3) if start is not None and end else None,
        "turn_count": totals["turn_count"],
        "median_turn_ms": totals["median_e2e_ms"],
        "worst_turn_ms": totals["worst_e2e_ms"],
        "e2e_p95_ms": totals["p95_e2e_ms"],
        "tool_calls": totals["tool_calls"],
        "tool_failures": totals["tool_failures"],
        "error_count": totals["errors"],
        "span_count": span_count,
        "tags": jsonable(json.loads(tags)) if tags else {},
    }


TURN_COMPONENTS = (
    "e2e_ms",
    "end_of_turn_ms",
    "stt_ms",
    "llm_ttft_ms",
    "answer_wait_ms",
    "tts_ttfb_ms",
    "tool_ms",
)
"""The turn latencies the summary cache keeps per turn (and ``stats/turns`` reports)."""


def summary_cache_text(summary: dict[str, Any]) -> str:
    """What ``calls.summary`` keeps of a summary: what the calls list shows and the
    turns' latency components (``turns``: one list in ``TURN_COMPONENTS`` order each)."""
    cached: dict[str, Any] = {"version": SUMMARY_VERSION, "framework": summary["framework"]}
    cached["totals"] = summary["totals"]
    cached["turns"] = [[t.get(c) for c in TURN_COMPONENTS] for t in summary["turns"]]
    return json.dumps(cached, separators=(",", ":"))


class ParsedSummaries:
    """Cached summaries already parsed, by key, reused while their text is unchanged
    (a trends query reads every call of its range; most have not changed since the
    last one). Holds at most ``size`` entries, dropping the oldest."""

    def __init__(self, size: int = 50_000):
        self.size = size
        self._parsed: dict[Any, tuple[str, dict[str, Any]]] = {}

    def parse(self, key: Any, text: str) -> dict[str, Any]:
        found = self._parsed.get(key)
        if found is not None and found[0] == text:
            return found[1]
        parsed: dict[str, Any] = json.loads(text)
        self._parsed[key] = (text, parsed)
        if len(self._parsed) > self.size:
            self._parsed.pop(next(iter(self._parsed)), None)
        return parsed


def cached_summary(
    text: str | None, summary_spans: int | None, span_count: int
) -> dict[str, Any] | None:
    """The cached summary if it is current (made from ``span_count`` spans), else None."""
    if not text or summary_spans != span_count:
        return None
    try:
        cached = json.loads(text)
    except ValueError:
        return None
    if not isinstance(cached, dict) or cached.get("version") != SUMMARY_VERSION:
        return None
    return cached
