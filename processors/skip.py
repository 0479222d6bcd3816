"""``skip``: drop the spans of resources marked to be skipped (``roark.skip: true``).

The attribute may be a bool or the string "true" (any case), as agents set it either
way. Dropped spans are counted in ``calltrace_processor_dropped_spans``.
"""

from __future__ import annotations

import operator

from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from pydantic import Field

from collector import ComponentConfig, Host, Processor, SpanBatch


class SkipConfig(ComponentConfig):
    attributes: list[str] = Field(default_factory=lambda: ["roark.skip"], min_length=1)
    """Resource attributes that mark a resource's spans to be dropped."""


_KEY = operator.attrgetter("key")
_OUTCOMES_LIMIT = 4096
"""Resources whose outcome ``skip`` remembers before it starts over."""


def _is_true(value: object) -> bool:
    kind = value.WhichOneof("value")  # type: ignore[attr-defined]
    if kind == "bool_value":
        return bool(value.bool_value)  # type: ignore[attr-defined]
    if kind == "string_value":
        return value.string_value.strip().lower() == "true"  # type: ignore[attr-defined]
    return False


class SkipProcessor(Processor):
    type_name = "skip"
    Config = SkipConfig
    config: SkipConfig

    def __init__(self, component_id: str, config: SkipConfig):
        super().__init__(component_id, config)
        self._keys = frozenset(config.attributes)
        self._telemetry = None
        # Whether a resource is skipped, by its bytes: a request repeats a few resources
        # many times (the batch has their received bytes at hand).
        self._outcomes: dict[bytes, bool] = {}

    async def start(self, host: Host) -> None:
        self._telemetry = host.telemetry

    def _skipped_bytes(self, resource_payload: bytes) -> bool:
        return self._skipped(Resource.FromString(resource_payload).attributes)

    def _skipped(self, resource_attributes: object) -> bool:
        # Runs for every resource (a few spans each): the keys are compared in C, and
        # only a resource that has a skip attribute is looked at further.
        keys = self._keys
        if keys.isdisjoint(map(_KEY, resource_attributes)):  # type: ignore[call-overload]
            return False
        return any(
            kv.key in keys and _is_true(kv.value)
            for kv in resource_attributes  # type: ignore[attr-defined]
        )

    async def process(self, batch: SpanBatch) -> SpanBatch | None:
        kept = []
        dropped = 0
        outcomes = self._outcomes
        for entry in batch.entries():
            payload = entry.resource_bytes
            skipped = outcomes.get(payload)
            if skipped is None:
                if len(outcomes) >= _OUTCOMES_LIMIT:
                    outcomes.clear()
                skipped = outcomes[payload] = self._skipped_bytes(payload)
            if skipped:
                dropped += entry.span_count
            else:
                kept.append(entry)
        if dropped:
            if self._telemetry is not None:
                self._telemetry.dropped(self.id, dropped)
            batch.keep(kept)
        return batch if kept else None
