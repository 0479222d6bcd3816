"""Config value types with units: durations ("200ms", "5s", "168h") and sizes ("4MiB").

They are pydantic annotated types, so a bad value fails validation with the YAML path and
an example of the expected form, e.g. ``expected a duration like "200ms", got "fast"``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_DURATION_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?", re.IGNORECASE)
_SIZE_BYTES = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_duration(value: Any) -> float:
    """Seconds from a Go-style duration string such as "1h30m" or "200ms", or a number of
    seconds."""
    if isinstance(value, bool):
        raise ValueError(f'expected a duration like "200ms", got {value!r}')
    if isinstance(value, int | float) and value >= 0:
        return float(value)  # a bare number is seconds
    if isinstance(value, str):
        text = value.strip()
        if text == "0":
            return 0.0
        pos, total = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _DURATION_SECONDS[match.group(2)]
            pos = match.end()
        if pos == len(text) and pos > 0:
            return total
    raise ValueError(f'expected a duration like "200ms", got {value!r}')


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as "4MiB", "512KB", "100"."""
    if isinstance(value, bool):
        raise ValueError(f'expected a size like "4MiB", got {value!r}')
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            unit = (match.group(2) or "b").lower()
            return int(float(match.group(1)) * _SIZE_BYTES[unit])
    raise ValueError(f'expected a size like "4MiB", got {value!r}')


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\s*(0|(\d+(\.\d+)?(ns|us|µs|ms|s|m|h|d))+)\s*$"},
    ],
    "description": 'a duration like "200ms", "5s", "1h30m", or seconds',
}
_SIZE_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"(?i)^\s*\d+(\.\d+)?\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$"},
    ],
    "description": 'a size like "4MiB", "512KB", or bytes',
}

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration),
    WithJsonSchema(_DURATION_SCHEMA, mode="validation"),
]
"""Seconds, written in YAML as "200ms", "5s", "1h"."""

ByteSize = Annotated[
    int, BeforeValidator(parse_size), WithJsonSchema(_SIZE_SCHEMA, mode="validation")
]
"""Bytes, written in YAML as an integer or "4MiB", "512KB"."""
