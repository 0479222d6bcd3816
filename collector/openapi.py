"""The OpenAPI 3.1 document of the query API, served at ``/api/v1/openapi.json``.

Schemas are JSON Schema 2020-12 and closed (``additionalProperties: false``): the API
tests validate every response they receive against this document, so a field added to
a response without being documented here fails them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OPENAPI"]


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Any], description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": sorted(properties),
        "additionalProperties": False,
    }
    if description:
        schema["description"] = description
    return schema


def _nullable(kind: str, description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": [kind, "null"]}
    if description:
        schema["description"] = description
    return schema


def _t(kind: str, description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": kind}
    if description:
        schema["description"] = description
    return schema


_ATTRIBUTES = {
    "type": "object",
    "description": "Attribute values as JSON: strings, booleans, numbers, arrays, objects;"
    " bytes as hex.",
}

_SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _t("string", "What was wrong, naming the parameter.")}),
    "Call": _obj(
        {
            "call_id": _t("string"),
            "room_id": _t("string", "The correlation key's value: the LiveKit room SID."),
            "source": _t("string", "The attribute the call key came from."),
            "room_name": _nullable("string", "From a LiveKit webhook, when one arrived."),
            "service": _nullable("string", "service.name of the call's first resource."),
            "framework": {"enum": ["livekit", "pipecat", "unknown"]},
            "start": _nullable("string", "RFC 3339 start of the call's first span."),
            "start_ns": _nullable("integer"),
            "end_ns": _nullable("integer"),
            "duration_ms": _nullable("number"),
            "turn_count": _t("integer"),
            "median_turn_ms": _nullable("number", "Median end-to-end turn latency."),
            "worst_turn_ms": _nullable("number", "Worst end-to-end turn latency."),
            "e2e_p95_ms": _nullable("number", "95th percentile end-to-end turn latency."),
            "tool_calls": _t("integer"),
            "tool_failures": _t("integer"),
            "error_count": _t(
                "integer", "Spans with status ERROR plus failed tool calls whose span is not one."
            ),
            "span_count": _t("integer"),
            "tags": {
                "type": "object",
                "description": "Custom tags: resource attributes roark.project.tag.KEY.",
            },
            "outcome": {
                "enum": ["success", "fail", None],
                "description": "The LiveKit session's outcome: its outcome log record, else"
                " the session tag lk.success or lk.fail.",
            },
            "outcome_reason": _nullable("string", "The outcome record's reason."),
            "session_tags": {
                "type": "array",
                "items": _t("string"),
                "description": "LiveKit session tags: the session report's session.tags, the"
                " tag log records' names and the recording's session summary tags.",
            },
            "session": _t("boolean", "The call has a LiveKit session: log records or a recording."),
        }
    ),
    "Trace": _obj(
        {
            "trace_id": _t("string"),
            "call_id": _nullable("string"),
            "service": _nullable("string"),
            "start": _t("string"),
            "start_ns": _t("integer"),
            "end_ns": _t("integer"),
            "duration_ms": _t("number"),
            "root_name": _nullable("string", "Null while the root span has not arrived."),
            "root_span_id": _nullable("string"),
            "has_error": _t("boolean", "Some span of the trace has status ERROR."),
            "span_count": _t("integer"),
            "matched_spans": {
                "type": "array",
                "items": _t("string"),
                "description": "Ids of the spans meeting a span condition of the search"
                " (name, name_contains, attr.*; an attribute of the span itself); empty"
                " when the search has none.",
            },
        }
    ),
    "Event": _obj({"name": _t("string"), "time_ns": _t("integer"), "attributes": _ATTRIBUTES}),
    "Link": _obj({"trace_id": _t("string"), "span_id": _t("string"), "attributes": _ATTRIBUTES}),
    "Span": _obj(
        {
            "trace_id": _t("string"),
            "span_id": _t("string"),
            "parent_span_id": _nullable("string"),
            "name": _t("string"),
            "kind": _t("integer"),
            "start_ns": _nullable("integer"),
            "end_ns": _nullable("integer"),
            "duration_ms": _t("number"),
            "status_code": _t("integer", "0 unset, 1 ok, 2 error."),
            "status_message": _t("string"),
            "attributes": _ATTRIBUTES,
            "events": {"type": "array", "items": _ref("Event")},
            "links": {"type": "array", "items": _ref("Link")},
            "resource_id": _nullable("string", "Key into the response's resources."),
            "scope": {
                "oneOf": [
                    {"type": "null"},
                    _obj({"name": _t("string"), "version": _t("string")}),
                ]
            },
            "call_id": _nullable("string"),
            "placeholder": _t(
                "boolean",
                "True for a parent that never arrived: it holds its orphaned children.",
            ),
            "children": {"type": "array", "items": _ref("Span")},
        },
        "A span with its children, nested by parent.",
    ),
    "SpanHit": _obj(
        {
            "trace_id": _t("string"),
            "span_id": _t("string"),
            "parent_span_id": _nullable("string"),
            "name": _t("string"),
            "kind": _t("integer"),
            "start_ns": _t("integer"),
            "end_ns": _t("integer"),
            "duration_ms": _t("number"),
            "status_code": _t("integer", "0 unset, 1 ok, 2 error."),
            "status_message": _t("string"),
            "attributes": _ATTRIBUTES,
            "events": {"type": "array", "items": _ref("Event")},
            "links": {"type": "array", "items": _ref("Link")},
            "resource_id": _nullable("string"),
            "scope": {
                "oneOf": [
                    {"type": "null"},
                    _obj({"name": _t("string"), "version": _t("string")}),
                ]
            },
            "call_id": _nullable("string", "The call the span belongs to."),
            "placeholder": _t("boolean", "Always false here."),
            "service": _nullable("string", "service.name of the span's resource."),
            "trace": _obj(
                {
                    "trace_id": _t("string"),
                    "start": _t("string"),
                    "root_name": _nullable("string"),
                    "duration_ms": _t("number"),
                }
            ),
        },
        "A span found by span search, with its service, trace and call.",
    ),
    "SpanList": _obj(
        {
            "spans": {"type": "array", "items": _ref("SpanHit")},
            "next_cursor": _nullable("string", "Pass as cursor for the next page."),
        }
    ),
    "Percentiles": _obj(
        {
            "count": _t("integer", "Turns with this number."),
            "p50": _nullable("number"),
            "p95": _nullable("number"),
            "p99": _nullable("number"),
        }
    ),
    "StatsGroup": _obj(
        {
            "group": _nullable("string", "The group_by value; null without group_by or value."),
            "calls": _t("integer"),
            "turns": _t("integer"),
            "errors": _nullable("integer", "Null from source=metrics (not counted there)."),
            "tool_failures": _nullable("integer", "Null from source=metrics."),
            "latency": {
                "type": "object",
                "description": "Percentiles of each turn latency component (ms): e2e_ms,"
                " end_of_turn_ms, stt_ms, llm_ttft_ms, answer_wait_ms, tts_ttfb_ms, tool_ms.",
                "additionalProperties": _ref("Percentiles"),
            },
        }
    ),
    "TurnStats": _obj(
        {
            "start": _t("string"),
            "end": _t("string"),
            "step_ms": _t("number"),
            "group_by": _nullable("string"),
            "source": {
                "enum": ["spans", "metrics"],
                "description": "spans: the turn summaries computed from the calls' spans;"
                " metrics: livekit-agents' lk.agents.turn.* histograms (percentiles"
                " estimated from their buckets, narrowed to each point's min and max).",
            },
            "components": {"type": "array", "items": _t("string")},
            "pending_summaries": _t(
                "integer",
                "Calls of the range left out: their turn numbers were stale or missing"
                " and are not recomputed yet (at most 1000 are, per request).",
            ),
            "buckets": {
                "type": "array",
                "items": _obj(
                    {
                        "start": _t("string"),
                        "start_ns": _t("integer"),
                        "groups": {"type": "array", "items": _ref("StatsGroup")},
                    }
                ),
                "description": "Every bucket of the range, in time order; one with no"
                " calls has no groups.",
            },
        }
    ),
    "ToolCall": _obj(
        {
            "name": _nullable("string"),
            "duration_ms": _nullable("number"),
            "error": _t("boolean", "lk.function_tool.is_error or status ERROR."),
            "span_id": _nullable("string", "Null for Pipecat, which has no tool span."),
            "start_ns": _nullable("integer"),
            "end_ns": _nullable("integer"),
            "error_span": _t("boolean", "The tool's span itself has status ERROR."),
        }
    ),
    "Breakdown": _obj(
        {
            "end_of_turn_ms": _t("number", "End of speech until the turn was committed."),
            "llm_ms": _t("number", "Waiting for the first spoken LLM token after that."),
            "tool_ms": _t("number", "Tool calls run before that token."),
            "tts_ms": _t("number", "TTS time to first byte on the path."),
            "other_ms": _t(
                "number",
                "The gap: e2e_ms minus the parts above (queueing, text aggregation,"
                " playout start; negative when stages overlapped).",
            ),
        },
        "The critical path of e2e_ms: the parts add up to it exactly.",
    ),
    "Turn": _obj(
        {
            "number": _t("integer"),
            "span_id": _t("string"),
            "user_span_id": _nullable("string"),
            "start_ns": _t("integer"),
            "end_ns": _t("integer"),
            "span_ids": {
                "type": "array",
                "items": _t("string"),
                "description": "The turn's spans (its turn spans and their descendants).",
            },
            "user_text": _nullable("string", "What the user said (final transcript)."),
            "agent_text": _nullable("string", "What the agent answered."),
            "end_of_turn_ms": _nullable("number", "End of speech to the turn committed."),
            "stt_ms": _nullable("number", "End of speech to final transcript."),
            "llm_ttft_ms": _nullable("number", "The first LLM request's time to first token."),
            "answer_ttft_ms": _nullable(
                "number", "The last LLM request's (the answer after tools) time to first token."
            ),
            "answer_wait_ms": _nullable(
                "number", "End of speech to the first token of the answer's LLM request."
            ),
            "tts_ttfb_ms": _nullable("number", "The first TTS request's time to first byte."),
            "tool_ms": _nullable("number", "The tool calls' total duration."),
            "llm_calls": _t("integer"),
            "tool_calls": {"type": "array", "items": _ref("ToolCall")},
            "e2e_ms": _nullable("number", "End of speech to the agent's first audio."),
            "breakdown": {"oneOf": [{"type": "null"}, _ref("Breakdown")]},
            "interrupted": _t("boolean"),
        },
        "One turn; the README's Query API section says which span each number comes from.",
    ),
    "Totals": _obj(
        {
            "turn_count": _t("integer"),
            "median_e2e_ms": _nullable("number"),
            "worst_e2e_ms": _nullable("number"),
            "p95_e2e_ms": _nullable("number"),
            "tool_calls": _t("integer"),
            "tool_failures": _t("integer"),
            "errors": _t("integer", "Spans with status ERROR plus failed tools without one."),
            "stt_ms_total": _nullable("number"),
            "llm_calls": _t("integer"),
            "llm_model": _nullable("string", "gen_ai.request.model of the first LLM span."),
        }
    ),
    "Resources": {
        "type": "object",
        "description": "Resource attributes by resource_id.",
        "additionalProperties": _ATTRIBUTES,
    },
    "CallList": _obj(
        {
            "calls": {"type": "array", "items": _ref("Call")},
            "next_cursor": _nullable("string", "Pass as cursor for the next page."),
            "pending_summaries": _t(
                "integer",
                "Sorted or filtered by turn latency: calls of the range whose turn numbers"
                " were stale or missing and are not recomputed yet (at most 1000 are, per"
                " request); they sort and filter by older numbers, or last. 0 otherwise.",
            ),
        }
    ),
    "CallDetail": _obj(
        {
            "call": _ref("Call"),
            "framework": {"enum": ["livekit", "pipecat", "unknown"]},
            "turns": {"type": "array", "items": _ref("Turn")},
            "totals": _ref("Totals"),
            "tree": {"type": "array", "items": _ref("Span")},
            "resources": _ref("Resources"),
        }
    ),
    "TraceList": _obj(
        {
            "traces": {"type": "array", "items": _ref("Trace")},
            "next_cursor": _nullable("string", "Pass as cursor for the next page."),
        }
    ),
    "TraceDetail": _obj(
        {
            "trace_id": _t("string"),
            "trace": _ref("Trace"),
            "tree": {"type": "array", "items": _ref("Span")},
            "resources": _ref("Resources"),
        }
    ),
}


def _param(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


_TIME = "RFC 3339 (2026-11-24T10:00:00Z) or Unix nanoseconds; selects by start time."
_COMMON_PARAMS = [
    _param("start", "Inclusive lower bound of the start time. " + _TIME),
    _param("end", "Exclusive upper bound of the start time. " + _TIME),
    _param(
        "limit",
        "Page size, 1 to 1000 (default 50).",
        {"type": "integer", "minimum": 1, "maximum": 1000},
    ),
    _param(
        "cursor",
        "next_cursor of the previous page, as it is (sealed: any other value is 400).",
    ),
]
_ATTR_PARAM = {
    "name": "attr",
    "in": "query",
    "style": "form",
    "explode": True,
    "description": "attr.KEY=VALUE, repeatable: some span or resource attribute KEY has the"
    " text VALUE (strings as they are, true/false, decimal numbers; short scalar values only).",
    "schema": {"type": "object", "additionalProperties": {"type": "string"}},
}


_TAG_PARAM = {
    **_ATTR_PARAM,
    "name": "tag",
    "description": "tag.KEY=VALUE, repeatable: the custom tag (resource attribute"
    " roark.project.tag.KEY) has the text VALUE.",
}


def _json_response(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


_ERRORS = {
    "400": _json_response("A bad parameter.", "Error"),
    "401": _json_response("No, an unknown or a revoked API key.", "Error"),
    "503": _json_response("Storage unavailable; retry.", "Error"),
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "calltrace query API",
        "version": "1",
        "description": "Calls, their trace trees and per-turn latency, and trace search. "
        "Authenticate with the ingest key: Authorization: Bearer <key>; a key sees only "
        "its project. Results are newest first; follow next_cursor to page.",
    },
    "servers": [{"url": "/"}],
    "security": [{"bearer": []}],
    "paths": {
        "/api/v1/calls": {
            "get": {
                "summary": "Calls, newest first, with turn latency totals.",
                "parameters": [
                    *_COMMON_PARAMS,
                    _ATTR_PARAM,
                    _TAG_PARAM,
                    _param(
                        "sort",
                        "start (newest first, the default), or the largest first (calls"
                        " without the number last): worst_turn, median_turn, e2e_p95,"
                        " errors, duration.",
                        {
                            "enum": [
                                "start",
                                "worst_turn",
                                "median_turn",
                                "e2e_p95",
                                "errors",
                                "duration",
                            ]
                        },
                    ),
                    _param(
                        "min_worst_turn_ms",
                        "The worst turn's e2e_ms is at least this.",
                        {"type": "number", "minimum": 0},
                    ),
                    _param(
                        "min_median_turn_ms",
                        "The median turn's e2e_ms is at least this.",
                        {"type": "number", "minimum": 0},
                    ),
                    _param(
                        "min_e2e_p95_ms",
                        "The 95th percentile of e2e_ms is at least this.",
                        {"type": "number", "minimum": 0},
                    ),
                    _param(
                        "min_errors",
                        "error_count is at least this.",
                        {"type": "integer", "minimum": 0},
                    ),
                    _param(
                        "min_duration_ms",
                        "The call lasts at least this long.",
                        {"type": "number", "minimum": 0},
                    ),
                    _param(
                        "outcome",
                        "The LiveKit session's outcome (outcome log record, or the session"
                        " tag lk.success / lk.fail).",
                        {"enum": ["success", "fail"]},
                    ),
                    _param(
                        "session_tag",
                        "A LiveKit session tag the call carries, exact (language:en).",
                        {"type": "string"},
                    ),
                ],
                "responses": {"200": _json_response("A page of calls.", "CallList"), **_ERRORS},
            }
        },
        "/api/v1/calls/{call_id}": {
            "get": {
                "summary": "A call's spans as a tree, with per-turn latency.",
                "parameters": [
                    {
                        "name": "call_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": _json_response("The call.", "CallDetail"),
                    "404": _json_response("No such call in this project.", "Error"),
                    **_ERRORS,
                },
            }
        },
        "/api/v1/traces": {
            "get": {
                "summary": "Trace search. Each condition must be met by some span of the trace.",
                "parameters": [
                    *_COMMON_PARAMS,
                    _param(
                        "service", "service.name of the trace's resource contains this (any case)."
                    ),
                    _param("name", "Some span has exactly this name."),
                    _param("name_contains", "Some span's name contains this (any case)."),
                    _ATTR_PARAM,
                    _TAG_PARAM,
                    _param(
                        "min_duration_ms",
                        "The trace lasts at least this long (first start to last end).",
                        {"type": "number", "minimum": 0},
                    ),
                    _param(
                        "status",
                        "error: some span has status ERROR; ok: none has.",
                        {"enum": ["error", "ok"]},
                    ),
                ],
                "responses": {"200": _json_response("A page of traces.", "TraceList"), **_ERRORS},
            }
        },
        "/api/v1/spans": {
            "get": {
                "summary": "Span search: each condition must be met by the span itself"
                " (attr.* and tag.* by it or its resource). Newest trace first, then in"
                " start order within a trace.",
                "parameters": [
                    *_COMMON_PARAMS,
                    _param("name", "The span's name contains this (any case)."),
                    _param("service", "service.name of the span's resource contains this."),
                    {
                        **_ATTR_PARAM,
                        "description": "attr.KEY=VALUE, repeatable: the span or its resource"
                        " has attribute KEY with the text VALUE.",
                    },
                    _TAG_PARAM,
                    _param(
                        "min_duration_ms",
                        "The span lasts at least this long.",
                        {"type": "number", "minimum": 0},
                    ),
                    _param(
                        "status",
                        "error: the span has status ERROR; ok: it has not.",
                        {"enum": ["error", "ok"]},
                    ),
                ],
                "responses": {"200": _json_response("A page of spans.", "SpanList"), **_ERRORS},
            }
        },
        "/api/v1/stats/turns": {
            "get": {
                "summary": "Turn latency percentiles and counts of calls, turns, errors and"
                " tool failures per time bucket (by call start) and group.",
                "parameters": [
                    _param("start", "Inclusive start; default end minus 24 hours. " + _TIME),
                    _param("end", "Exclusive end; default now. " + _TIME),
                    _param(
                        "step",
                        'Bucket width, a duration like "5m" or "1h"; default a 24th of the'
                        " range. At most 1000 buckets.",
                    ),
                    _param("group_by", "service, model (the LLM model) or tag.KEY."),
                    _TAG_PARAM,
                    _param(
                        "source",
                        "spans (the default): turn numbers computed from the calls' spans;"
                        " metrics: livekit-agents' lk.agents.turn.* histograms.",
                        {"enum": ["spans", "metrics"]},
                    ),
                ],
                "responses": {
                    "200": _json_response("Buckets of groups.", "TurnStats"),
                    **_ERRORS,
                },
            }
        },
        "/api/v1/traces/{trace_id}": {
            "get": {
                "summary": "One trace as a tree.",
                "parameters": [
                    {
                        "name": "trace_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{32}$"},
                    }
                ],
                "responses": {
                    "200": _json_response("The trace.", "TraceDetail"),
                    "404": _json_response("No such trace in this project.", "Error"),
                    **_ERRORS,
                },
            }
        },
    },
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
}

# A call's logs, metrics and recording (collector.signals_api).
from collector.signals_openapi import PATHS as _SIGNAL_PATHS  # noqa: E402
from collector.signals_openapi import SCHEMAS as _SIGNAL_SCHEMAS  # noqa: E402

OPENAPI["paths"].update(_SIGNAL_PATHS)
OPENAPI["components"]["schemas"].update(_SIGNAL_SCHEMAS)
