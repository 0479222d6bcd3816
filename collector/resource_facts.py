"""What a storage exporter reads from a resource (its call, service, custom tags and
indexed attributes), cached by the resource's serialized bytes."""

from __future__ import annotations

from sys import intern
from typing import Any

from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from collector.documents import indexable
from collector.query import TAG_PREFIX
from collector.spans import (
    CALL_ID_ATTRIBUTE,
    CALL_KEY_ATTRIBUTE,
    CALL_SOURCE_ATTRIBUTE,
    any_value_to_python,
)
from collector.wire import native as _wire

__all__ = ["resource_attributes"]


class _ResourceFacts:
    """What ``build_rows`` reads from a resource, kept by its serialized bytes: one
    agent process exports a few spans at a time under the same resource, so most
    batches repeat resources seen before."""

    __slots__ = (
        "attrs",
        "call_id",
        "call_key",
        "call_source",
        "payload",
        "service",
        "tags",
    )

    def __init__(self, resource: Resource | None, payload: bytes):
        """The facts of ``resource``, serialized as ``payload``; with ``resource`` None,
        read off ``payload`` by ``collector._wire.resource_facts`` (the writer holds the
        GIL meanwhile, for every new call's resource)."""
        # The message itself is not kept: it is a large share of an entry's memory, and
        # an exporter needs it only
        # for a resource it has not stored yet (``resource_attributes``).
        self.payload = payload
        """The resource serialized (no map fields, so the same bytes however written)."""
        self.tags: dict[str, Any] = {}
        self.call_id: str | None = None
        self.call_key: str | None = None
        self.call_source: str | None = None
        self.service: str | None = None
        self.attrs: tuple[tuple[str, str], ...]
        """(key, value text) of the resource's indexed attributes."""
        if resource is None:
            assert _wire is not None
            has_tags: bool
            (
                self.attrs,
                self.service,
                self.call_id,
                self.call_key,
                self.call_source,
                has_tags,
            ) = _wire.resource_facts(payload)
            if has_tags:  # their values may be any AnyValue: read in Python
                for kv in Resource.FromString(payload).attributes:
                    if kv.key.startswith(TAG_PREFIX):
                        self.tags[kv.key[len(TAG_PREFIX) :]] = any_value_to_python(kv.value)
            return
        attrs: list[tuple[str, str]] = []
        for kv in resource.attributes:
            key = kv.key
            if key == CALL_ID_ATTRIBUTE:
                self.call_id = kv.value.string_value or None
            elif key == CALL_KEY_ATTRIBUTE:
                self.call_key = kv.value.string_value
            elif key == CALL_SOURCE_ATTRIBUTE:
                self.call_source = kv.value.string_value
            else:
                if key == "service.name":
                    self.service = kv.value.string_value or None
                elif key.startswith(TAG_PREFIX):
                    self.tags[key[len(TAG_PREFIX) :]] = any_value_to_python(kv.value)
                pair = indexable(kv)
                if pair is not None:
                    # Interned: the same keys and most values repeat in every resource.
                    attrs.append((intern(pair[0]), intern(pair[1])))
        self.attrs = tuple(attrs)


_RESOURCE_FACTS: dict[bytes, _ResourceFacts] = {}


_RESOURCE_FACTS_LIMIT = 4096


def _facts_of(payload: bytes, resource: Resource | None = None) -> _ResourceFacts:
    """The facts of the resource serialized as ``payload`` (parsed from it unless given)."""
    facts = _RESOURCE_FACTS.get(payload)
    if facts is None:
        if len(_RESOURCE_FACTS) >= _RESOURCE_FACTS_LIMIT:
            _RESOURCE_FACTS.clear()
        if resource is None and _wire is None:
            resource = Resource.FromString(payload)
        facts = _RESOURCE_FACTS[payload] = _ResourceFacts(resource, payload)
    return facts


def resource_attributes(payload: bytes) -> dict[str, Any]:
    """The attributes of the resource serialized as ``payload``, as Python values: what
    an exporter stores of a resource the first time it sees it."""
    return {kv.key: any_value_to_python(kv.value) for kv in Resource.FromString(payload).attributes}
