"""``jsonl``: append each span to a file as one JSON object per line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from collector import (
    Exporter,
    ExporterConfig,
    Host,
    RetryableError,
    SpanBatch,
    any_value_to_python,
    iter_spans,
)


class JSONLinesConfig(ExporterConfig):  # brings sending_queue, retry_on_failure, timeout
    path: Path
    """The file to append to; created with its directory."""


def _attributes(attributes: object) -> dict[str, object]:
    return {kv.key: any_value_to_python(kv.value) for kv in attributes}  # type: ignore[attr-defined]


def span_lines(batch: SpanBatch) -> str:
    """The batch's spans as JSON lines: ids in hex, attributes as JSON values."""
    lines = []
    for rs in batch.resource_spans:
        resource = _attributes(rs.resource.attributes)
        for span in iter_spans(rs):
            record = {
                "trace_id": span.trace_id.hex(),
                "span_id": span.span_id.hex(),
                "parent_span_id": span.parent_span_id.hex(),
                "name": span.name,
                "start_time_unix_nano": span.start_time_unix_nano,
                "end_time_unix_nano": span.end_time_unix_nano,
                "attributes": _attributes(span.attributes),
                "resource": resource,
                "project": batch.project,
            }
            lines.append(json.dumps(record, default=lambda b: b.hex()) + "\n")
    return "".join(lines)


class JSONLinesExporter(Exporter):
    type_name = "jsonl"
    Config = JSONLinesConfig
    config: JSONLinesConfig

    async def start(self, host: Host) -> None:
        self.config.path.parent.mkdir(parents=True, exist_ok=True)  # an error stops start-up

    async def export(self, batch: SpanBatch) -> None:
        text = span_lines(batch)
        try:
            await asyncio.to_thread(self._append, text)
        except OSError as exc:  # a full disk may free up: the queue retries
            raise RetryableError(f"{self.id}: cannot write {self.config.path}: {exc}") from exc

    def _append(self, text: str) -> None:
        with self.config.path.open("a", encoding="utf-8") as out:
            out.write(text)
