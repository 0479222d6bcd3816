"""The OpenAPI description of a call's logs, metrics and recording routes
(``collector.signals_api``), merged into ``collector.openapi.OPENAPI``."""

from __future__ import annotations

from typing import Any

__all__ = ["PATHS", "SCHEMAS"]

_JSON_VALUE: dict[str, Any] = {"description": "Any JSON value."}
_OBJECT = {"type": "object"}


def _nullable(kind: str) -> dict[str, Any]:
    return {"type": [kind, "null"]}


def _obj(properties: dict[str, Any], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": sorted(set(properties) - set(optional)),
        "additionalProperties": False,
    }


SCHEMAS: dict[str, Any] = {
    "LogRecord": _obj(
        {
            "time_unix_nano": {"type": "integer"},
            "observed_time_unix_nano": {"type": "integer"},
            "severity_number": {"type": "integer", "description": "OTLP SeverityNumber, 0-24."},
            "severity_text": {"type": "string"},
            "body": _JSON_VALUE,
            "attributes": _OBJECT,
            "trace_id": _nullable("string"),
            "span_id": _nullable("string"),
            "scope": {"type": "string", "description": "Instrumentation scope name."},
            "scope_attributes": _OBJECT,
            "resource": _OBJECT,
            "room_id": _nullable("string"),
            "job_id": _JSON_VALUE,
        }
    ),
    "CallLogs": _obj(
        {
            "call_id": {"type": "string"},
            "logs": {"type": "array", "items": {"$ref": "#/components/schemas/LogRecord"}},
        }
    ),
    "MetricPoint": _obj(
        {
            "name": {"type": "string"},
            "kind": {"enum": ["gauge", "sum", "histogram", "exponential_histogram", "summary"]},
            "unit": {"type": "string"},
            "description": {"type": "string"},
            "aggregation_temporality": _nullable("integer"),
            "is_monotonic": _nullable("boolean"),
            "attributes": _OBJECT,
            "start_time_unix_nano": {"type": "integer"},
            "time_unix_nano": {"type": "integer"},
            "scope": {"type": "string"},
            "room_id": _nullable("string"),
            "job_id": _JSON_VALUE,
            "value": _nullable("number"),
            "count": {"type": "integer"},
            "sum": _nullable("number"),
            "min": _nullable("number"),
            "max": _nullable("number"),
            "bucket_counts": {"type": "array", "items": {"type": "integer"}},
            "explicit_bounds": {"type": "array", "items": {"type": "number"}},
        },
        optional=("value", "count", "sum", "min", "max", "bucket_counts", "explicit_bounds"),
    ),
    "CallMetrics": _obj(
        {
            "call_id": {"type": "string"},
            "metrics": {"type": "array", "items": {"$ref": "#/components/schemas/MetricPoint"}},
        }
    ),
    "Recording": _obj(
        {
            "call_id": {"type": "string"},
            "room_id": {"type": "string"},
            "job_id": {"type": "string"},
            "received_ns": {"type": "integer"},
            "start_time_unix_nano": {
                "type": "integer",
                "description": "Start of the audio recording (0 without audio).",
            },
            "duration_ms": {"type": "integer"},
            "header": {
                "type": "object",
                "description": "livekit.MetricsRecordingHeader as JSON, but session_summary.",
            },
            "session_summary": _JSON_VALUE,
            "chat_history": _JSON_VALUE,
            "audio_size": _nullable("integer"),
            "audio_sha256": _nullable("string"),
            "audio_url": _nullable("string"),
        }
    ),
}


_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_ERRORS = {
    "400": {"description": "A bad parameter.", **_ERROR},
    "401": {"description": "No, an unknown or a revoked API key.", **_ERROR},
    "503": {"description": "Storage unavailable; retry.", **_ERROR},
}


def _get(summary: str, schema: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {
            "description": summary,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        },
        **_ERRORS,
        **(extra or {}),
    }
    return {
        "get": {
            "summary": summary,
            "parameters": [
                {"name": "call_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": responses,
        }
    }


_NOT_FOUND = {"404": {"description": "No recording of this call in this project.", **_ERROR}}

PATHS: dict[str, Any] = {
    "/api/v1/calls/{call_id}/logs": _get(
        "The call's log records (by their own room_id), oldest first.", "CallLogs"
    ),
    "/api/v1/calls/{call_id}/metrics": _get(
        "The call's metric points (by their own room_id), by name and time.", "CallMetrics"
    ),
    "/api/v1/calls/{call_id}/recording": _get(
        "The call's session recording: header, summary, chat history, audio.",
        "Recording",
        _NOT_FOUND,
    ),
    "/api/v1/calls/{call_id}/recording/audio": {
        "get": {
            "summary": "The recording's Ogg/Opus audio; HTTP range requests answer 206.",
            "parameters": [
                {"name": "call_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": {"description": "The audio.", "content": {"audio/ogg": {}}},
                "206": {"description": "The range asked for.", "content": {"audio/ogg": {}}},
                **_ERRORS,
                **_NOT_FOUND,
            },
        }
    },
}
