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
    edits_spans = False  # drops whole resources
    edits_resources = False
    Config = SkipConfig
    config: SkipConfig

    def __init__(self, component_id: str, config: SkipConfig):
        super().__init__(component_id, config)
        self._keys = frozenset(config.attributes)
        self._telemetry = None
        # Whether a resource is skipped, by its bytes: a request repeats a few resources
        # many times (``SpanBatch.resource_payloads`` has their bytes at hand).
        self._outcomes: dict[bytes, bool] = {}

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
        outcomes = self._outcomes
        for rs in batch.resource_spans:
            payload = batch.known_resource_payload(rs)
            if payload is None:
                # No bytes at hand: serializing would cost more than looking.
                skipped = self._skipped(rs.resource.attributes)
            else:
                found = outcomes.get(payload)
                if found is None:
                    if len(outcomes) >= _OUTCOMES_LIMIT:
                        outcomes.clear()
                    found = outcomes[payload] = self._skipped(rs.resource.attributes)
                skipped = found
            if skipped:
                dropped += span_count(rs)
            else:
                kept.append(rs)
        if dropped:
            if self._telemetry is not None:
                self._telemetry.dropped(self.id, dropped)
            batch.resource_spans = kept
        return batch if kept else None
