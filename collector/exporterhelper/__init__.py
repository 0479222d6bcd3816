"""What every exporter gets for free: a bounded sending queue, consumers, retry with
exponential backoff and jitter, and an optional persistent queue on disk.

An exporter only turns a batch into a write. The helper in front of it accepts batches
without waiting for the destination, so a slow or dead exporter never blocks the
receiver or the other exporters. When a queue is full the pipeline refuses new data
(503 + Retry-After) instead of dropping accepted data or growing memory.

The helper is split as the OpenTelemetry Collector's exporterhelper is:

- ``config``: the settings every exporter's config carries (``ExporterConfig``,
  ``QueueSettings``, ``RetrySettings``);
- ``queue``: the sending queue in front of one exporter (``ExporterQueue``): room and
  accounting, consumers, merging queued batches;
- ``retry``: the retry sender, one export until delivered, refused for good or given up
  on, and the exporter's failure streak;
- ``disk_queue``: the persistent queue's append-only log on disk (``_DiskQueue``).
"""

from collector.exporterhelper.config import ExporterConfig, QueueSettings, RetrySettings
from collector.exporterhelper.disk_queue import _DiskQueue
from collector.exporterhelper.queue import ExporterQueue
from collector.exporterhelper.retry import UNEXPECTED_ERROR_MAX_ELAPSED

__all__ = [
    "UNEXPECTED_ERROR_MAX_ELAPSED",
    "ExporterConfig",
    "ExporterQueue",
    "QueueSettings",
    "RetrySettings",
    "_DiskQueue",
]
