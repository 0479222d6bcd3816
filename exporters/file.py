"""``file``: OTLP/JSON lines, one export request per line (what the Collector's file
exporter writes), for debugging, archiving or replaying with ``curl``.

Each line is a complete ``ExportTraceServiceRequest`` in OTLP/JSON (hex ids, integer
enums), so it can be POSTed back to any OTLP/HTTP endpoint as ``application/json``. The
batch's project is kept as the resource attribute ``calltrace.project``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import IO

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from collector import Exporter, ExporterConfig, Host, SpanBatch, encode_otlp_json, set_attribute

__all__ = ["FileConfig", "FileExporter"]

PROJECT_ATTRIBUTE = "calltrace.project"


class FileConfig(ExporterConfig):
    path: Path
    """File appended to (created with its directory when missing)."""
    flush_every_batch: bool = True
    """Flush after each batch, so a crash loses nothing the exporter wrote."""


class FileExporter(Exporter):
    type_name = "file"
    Config = FileConfig
    config: FileConfig

    def __init__(self, component_id: str, config: FileConfig):
        super().__init__(component_id, config)
        self._file: IO[bytes] | None = None
        self._lock = asyncio.Lock()

    async def start(self, host: Host) -> None:
        if self._file is None:
            self.config.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.config.path, "ab")  # noqa: SIM115 - lives until shutdown

    def _line(self, batch: SpanBatch) -> bytes:
        # A copy: the batch is shared with the other exporters and must not change.
        request = ExportTraceServiceRequest(resource_spans=batch.resource_spans)
        if batch.project is not None:
            for rs in request.resource_spans:
                set_attribute(rs.resource.attributes, PROJECT_ATTRIBUTE, batch.project)
        return encode_otlp_json(request) + b"\n"

    def _write(self, line: bytes) -> None:
        assert self._file is not None
        self._file.write(line)
        if self.config.flush_every_batch:
            self._file.flush()

    async def export(self, batch: SpanBatch) -> None:
        line = self._line(batch)
        async with self._lock:  # one line at a time, whole
            await asyncio.to_thread(self._write, line)

    async def shutdown(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()
