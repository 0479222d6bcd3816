"""``debug``: logs a summary of each batch (the Collector's ``debug`` exporter).

``verbosity: basic`` logs one line per batch (project, resources, spans, calls);
``normal`` adds one line per span (trace id, span id, name, duration); ``detailed``
adds each span's attributes.
"""

from __future__ import annotations

import logging
from typing import Literal

from collector import (
    CALL_ID_ATTRIBUTE,
    Exporter,
    ExporterConfig,
    SpanBatch,
    get_attribute,
    iter_spans,
)

__all__ = ["DebugConfig", "DebugExporter"]

log = logging.getLogger("calltrace.debug")


class DebugConfig(ExporterConfig):
    verbosity: Literal["basic", "normal", "detailed"] = "basic"


class DebugExporter(Exporter):
    type_name = "debug"
    Config = DebugConfig
    config: DebugConfig

    async def export(self, batch: SpanBatch) -> None:
        calls = {
            get_attribute(rs.resource.attributes, CALL_ID_ATTRIBUTE) for rs in batch.resource_spans
        }
        calls.discard(None)
        log.info(
            "%s: project=%s resources=%d spans=%d calls=%s",
            self.id,
            batch.project,
            len(batch.resource_spans),
            batch.span_count,
            sorted(calls) or "-",
        )
        if self.config.verbosity == "basic":
            return
        for rs in batch.resource_spans:
            call_id = get_attribute(rs.resource.attributes, CALL_ID_ATTRIBUTE)
            for span in iter_spans(rs):
                log.info(
                    "  trace=%s span=%s parent=%s name=%r %.3fms call=%s",
                    span.trace_id.hex(),
                    span.span_id.hex(),
                    span.parent_span_id.hex() or "-",
                    span.name,
                    (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6,
                    call_id or "-",
                )
                if self.config.verbosity == "detailed":
                    for kv in span.attributes:
                        log.info("      %s=%r", kv.key, get_attribute([kv], kv.key))
