"""Finding a call's key on a resource or its spans, and stamping the call on the resource.

The key is the first of the ranked attributes with a non-empty value: the room attribute,
then ``keys`` in order on the resource; on a span, ``keys`` in order. The call id is
derived from (project, key value). Client-sent ``calltrace.call.*`` attributes are
always removed before the call's own are stamped.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from collector import (
    CALL_ID_ATTRIBUTE,
    CALL_KEY_ATTRIBUTE,
    CALL_SOURCE_ATTRIBUTE,
    ResourceSpans,
    Span,
    any_value_to_python,
)
from collector.calls import call_id_for

Call = tuple[str, str, str]
"""A call as a resource or span names it: (call id, the key's value, its attribute)."""

_STAMP_SET = frozenset((CALL_ID_ATTRIBUTE, CALL_KEY_ATTRIBUTE, CALL_SOURCE_ATTRIBUTE))

_ResourceOutcome = tuple[Call | None, bytes | None]
"""The call a resource names (or None) and its bytes once edited (None: unchanged)."""


class _LRU(OrderedDict[tuple[str, ...] | tuple[str, bytes], Call]):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key: tuple, value: Call) -> None:  # type: ignore[type-arg]
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)


class CallKeys:
    """The call each resource and span of a project names, with what it found cached: by
    the resource's serialized bytes (a request holds many resources with the same
    attributes), and by trace for spans that carry no key themselves (Pipecat's
    stt/llm/tts spans inherit the call of their trace)."""

    def __init__(self, room_attribute: str, keys: list[str], cache_size: int):
        ordered = [room_attribute, *[k for k in keys if k != room_attribute]]
        self._rank = {key: index for index, key in enumerate(ordered)}
        self._span_rank = {key: index for index, key in enumerate(keys)}
        self._cache_size = cache_size
        self._traces = _LRU(cache_size)
        self._resources: dict[tuple[str, bytes], _ResourceOutcome] = {}
        """What correlating a resource gave, by project and the resource's serialized bytes
        (see ``for_resource``)."""

    def _best_key(self, attributes: object, rank: dict[str, int]) -> tuple[str, str] | None:
        best: tuple[int, str, str] | None = None
        for kv in attributes:  # type: ignore[attr-defined]
            position = rank.get(kv.key)
            if position is None or (best is not None and position >= best[0]):
                continue
            value = any_value_to_python(kv.value)
            if value is None or value == "":
                continue
            best = (position, str(value), kv.key)
        return None if best is None else (best[1], best[2])

    def _call_for_span(self, project: str, span: Span) -> Call | None:
        found = self._best_key(span.attributes, self._span_rank) if self._span_rank else None
        trace_key = (project, span.trace_id)
        if found is not None:
            call = (call_id_for(project, found[0]), found[0], found[1])
            self._traces.put(trace_key, call)
            return call
        return self._traces.get(trace_key)

    def for_resource(self, project: str, raw: bytes) -> tuple[Call | None, bytes | None]:
        """The call a resource serialized as ``raw`` names, if any (``(call_id,
        key_value, source)``; else None, and the call is looked for on each span), and
        its bytes once client-sent call attributes are removed and, with a call, the
        call's are stamped (None: unchanged).

        A request holds many resources with the same attributes (every batch of spans an
        agent exports repeats its resource), so the outcome is remembered by the
        resource's bytes.
        """
        outcome = self._resources.get((project, raw))
        if outcome is not None:
            return outcome
        resource = Resource.FromString(raw)
        attributes = resource.attributes
        removed = _remove_stamps(attributes)  # never trust ids a client sent
        found = self._best_key(attributes, self._rank)
        call = None
        if found is not None:
            call = (call_id_for(project, found[0]), *found)
            stamp(attributes, *call)
        edited = resource.SerializeToString() if found is not None or removed else None
        if len(self._resources) >= self._cache_size:
            del self._resources[next(iter(self._resources))]  # the oldest
        self._resources[(project, raw)] = (call, edited)
        return call, edited

    def split_by_span_keys(
        self, project: str, rs: ResourceSpans
    ) -> list[tuple[ResourceSpans, Call | None]]:
        """Group a resource's spans by the call their own attributes (or trace) name."""
        calls: list[Call | None] = []
        for ss in rs.scope_spans:
            calls.extend(self._call_for_span(project, span) for span in ss.spans)
        distinct = set(calls)
        if len(distinct) <= 1:
            return [(rs, calls[0] if calls else None)]
        groups: dict[Call | None, ResourceSpans] = {}
        index = 0
        for ss in rs.scope_spans:
            scopes: dict[Call | None, object] = {}
            for span in ss.spans:
                call = calls[index]
                index += 1
                piece = groups.get(call)
                if piece is None:
                    piece = groups[call] = ResourceSpans(
                        resource=rs.resource, schema_url=rs.schema_url
                    )
                scope = scopes.get(call)
                if scope is None:
                    scope = scopes[call] = piece.scope_spans.add(
                        scope=ss.scope, schema_url=ss.schema_url
                    )
                scope.spans.add().CopyFrom(span)  # type: ignore[attr-defined]
        return list((piece, call) for call, piece in groups.items())


def _remove_stamps(attributes: Any) -> bool:
    """Drop every ``calltrace.call.*`` attribute, in one pass; whether there was one."""
    found = [index for index, kv in enumerate(attributes) if kv.key in _STAMP_SET]
    for index in reversed(found):
        del attributes[index]
    return bool(found)


def stamp(attributes: Any, call_id: str, key_value: str, source: str) -> None:
    """Add the call attributes (``_remove_stamps`` ran first, so none is there yet)."""
    for key, value in (
        (CALL_ID_ATTRIBUTE, call_id),
        (CALL_KEY_ATTRIBUTE, key_value),
        (CALL_SOURCE_ATTRIBUTE, source),
    ):
        kv = attributes.add()
        kv.key = key
        kv.value.string_value = value
