"""How stored attribute values are written as text: JSON documents (custom tags, a
resource's attributes) and the text an attribute is indexed and searched as."""

from __future__ import annotations

import json
from typing import Any

from collector.query import jsonable

__all__ = ["MAX_INDEXED_VALUE", "attribute_text", "indexable", "json_document"]

MAX_INDEXED_VALUE = 256
"""Attribute values longer than this (prompts, JSON payloads) are not indexed for search."""


_NOT_INDEXED = frozenset(("array_value", "kvlist_value", "bytes_value"))


def json_document(value: Any, **options: Any) -> str:
    """``value`` (attribute values as ``any_value_to_python`` reads them: custom tags, a
    resource's attributes) as strict JSON, which SQLite's and PostgreSQL's JSON functions
    accept: bytes as hex, NaN and infinities as the strings ``"nan"``, ``"inf"``,
    ``"-inf"`` (as the query API shows them). ``options`` go to ``json.dumps``."""
    return json.dumps(jsonable(value), allow_nan=False, **options)


def attribute_text(value: Any) -> str | None:
    """The text an attribute value is indexed and searched as; None if not indexed.

    Strings as they are, booleans ``true``/``false``, numbers in decimal. Arrays, maps,
    bytes and long strings are not indexed.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if len(value) <= MAX_INDEXED_VALUE else None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if not value.is_integer() else str(int(value))
    return None


def indexable(kv: Any) -> tuple[str, str] | None:
    value = kv.value
    kind = value.WhichOneof("value")
    if kind is None or kind in _NOT_INDEXED:
        return None
    text = attribute_text(getattr(value, kind))
    return None if text is None else (kv.key, text)
