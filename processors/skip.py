"""``skip``: drop the spans of resources marked to be skipped (``roark.skip: true``).

The attribute may be a bool or the string "true" (any case), as agents set it either
way. Dropped spans are counted in ``calltrace_processor_dropped_spans``.
"""

from __future__ import annotations

import operator

from pydantic import Field

from collector import ComponentConfig, Host, Processor, SpanBatch
from collector.spans import span_count


class SkipConfig(ComponentConfig):
    attributes: list[str] = Field(default_factory=lambda: ["roark.skip"], min_length=1)
    """Resource attributes that mark a resource's spans to be dropped."""


_KEY = operator.attrgetter("key")


def _is_true(value: object) -> bool:
    kind = value.WhichOneof("value")  # type: ignore[attr-defined]
    if kind == "bool_value":
        return bool(value.bool_value)  # type: ignore[attr-defined]
    if kind == "string_value":
        return value.string_value.strip().lower() == "true"  # type: ignore[attr-defined]
    return False


class SkipProcessor(Processor):
    type_name = "skip"
    edits_spans = False  # drops whole resources
    Config = SkipConfig
    config: SkipConfig

    def __init__(self, component_id: str, config: SkipConfig):
        super().__init__(component_id, config)
        self._keys = frozenset(config.attributes)
        self._telemetry = None

    async def start(self, host: Host) -> None:
        self._telemetry = host.telemetry

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
        for rs in batch.resource_spans:
            if self._skipped(rs.resource.attributes):
                dropped += span_count(rs)
            else:
                kept.append(rs)
        if dropped:
            if self._telemetry is not None:
                self._telemetry.dropped(self.id, dropped)
            batch.resource_spans = kept
        return batch if kept else None
