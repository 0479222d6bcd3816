"""``filter``: drop spans by name, attributes, duration or status.

``include`` keeps only the spans that match it; ``exclude`` drops the spans that match
it; with both, a span is kept when it matches ``include`` and not ``exclude``. Each is a
``collector.SpanMatch``::

    processors:
      filter:
        exclude:
          match_type: regexp
          span_names: ["^(user_speaking|eou_wait)$"]
      filter/slow_or_failed:
        include: {min_duration: 2s}
        exclude: {status: [ok]}

A span matches a block when every condition it gives holds: its name is one of
``span_names``, each of ``attributes`` (and ``resource_attributes``) matches, it lasted
between ``min_duration`` and ``max_duration``, its status is one of ``status``
(``unset``, ``ok``, ``error``). Dropped spans are counted in
``calltrace_processor_dropped_spans``; scopes and resources left without spans go too,
and a batch left empty is not passed on. Without ``include`` and ``exclude`` every
span is kept. Children of a dropped span keep their
``parent_span_id`` (the explorer shows them under a missing parent).
"""

from __future__ import annotations

from typing import Any

from collector import ComponentConfig, Host, Processor, SpanBatch, SpanMatch, select

__all__ = ["FilterConfig", "FilterProcessor"]


class FilterConfig(ComponentConfig):
    include: SpanMatch | None = None
    """Keep only spans that match."""
    exclude: SpanMatch | None = None
    """Drop spans that match."""


class FilterProcessor(Processor):
    type_name = "filter"
    Config = FilterConfig
    config: FilterConfig

    def __init__(self, component_id: str, config: FilterConfig):
        super().__init__(component_id, config)
        self._kept = select(config.include, config.exclude)
        self._telemetry: Any = None

    async def start(self, host: Host) -> None:
        self._telemetry = host.telemetry

    async def process(self, batch: SpanBatch) -> SpanBatch | None:
        kept_test = self._kept
        if kept_test is None:  # neither include nor exclude: every span is kept
            return batch
        dropped = 0
        kept_resources = []
        for rs in batch.resource_spans:
            resource = rs.resource
            emptied_scopes = []
            for scope_index, scope_spans in enumerate(rs.scope_spans):
                spans = scope_spans.spans
                drop = [i for i, span in enumerate(spans) if not kept_test(span, resource)]
                for index in reversed(drop):
                    del spans[index]
                dropped += len(drop)
                if drop and not spans:
                    emptied_scopes.append(scope_index)
            for scope_index in reversed(emptied_scopes):
                del rs.scope_spans[scope_index]
            if any(scope_spans.spans for scope_spans in rs.scope_spans):
                kept_resources.append(rs)
            elif not emptied_scopes:
                kept_resources.append(rs)  # held no spans before: not this filter's to drop
        if dropped:
            if self._telemetry is not None:
                self._telemetry.dropped(self.id, dropped)
            batch.resource_spans = kept_resources
        return batch if any(_has_spans(rs) for rs in batch.resource_spans) else None


def _has_spans(rs: Any) -> bool:
    return any(scope_spans.spans for scope_spans in rs.scope_spans)
