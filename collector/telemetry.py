"""Self-telemetry: Prometheus metrics named like the OpenTelemetry Collector's own.

Each service has its own registry so several services (tests, workers) never collide.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["PipelineTelemetry", "Telemetry"]


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._counters: dict[str, Counter] = {}
        r = self.registry
        self.receiver_accepted = Counter(
            "calltrace_receiver_accepted_spans",
            "Spans accepted by a receiver and handed to the pipeline.",
            ["receiver", "transport"],
            registry=r,
        )
        self.receiver_refused = Counter(
            "calltrace_receiver_refused_spans",
            "Spans a receiver refused (malformed, rejected ids, pipeline refused).",
            ["receiver", "transport"],
            registry=r,
        )
        self.receiver_requests = Counter(
            "calltrace_receiver_requests",
            "Requests answered by a receiver, by status.",
            ["receiver", "transport", "status"],
            registry=r,
        )
        self.processor_dropped = Counter(
            "calltrace_processor_dropped_spans",
            "Spans a processor dropped on purpose (e.g. skip).",
            ["processor", "pipeline"],
            registry=r,
        )
        self.processor_errors = Counter(
            "calltrace_processor_errors",
            "Batches a processor failed on with an unexpected exception, by what became of"
            " them (on_error: drop, pass or refuse).",
            ["processor", "outcome", "pipeline"],
            registry=r,
        )
        self.exporter_sent_spans = Counter(
            "calltrace_exporter_sent_spans",
            "Spans an exporter delivered.",
            ["exporter"],
            registry=r,
        )
        self.exporter_send_failed = Counter(
            "calltrace_exporter_send_failed_spans",
            "Spans an exporter gave up on (permanent error or retries exhausted).",
            ["exporter"],
            registry=r,
        )
        self.exporter_errors = Counter(
            "calltrace_exporter_errors",
            "Failed export attempts, by reason: retryable (RetryableError), timeout,"
            " permanent (PermanentError: the batch is dropped) or unexpected (any other"
            " exception: retried within retry_on_failure's bound, then dropped).",
            ["exporter", "reason"],
            registry=r,
        )
        self.exporter_retries = Counter(
            "calltrace_exporter_retries",
            "Failed export attempts that were retried.",
            ["exporter"],
            registry=r,
        )
        self.exporter_queue_size = Gauge(
            "calltrace_exporter_queue_size",
            "Spans waiting in an exporter's sending queue.",
            ["exporter"],
            registry=r,
        )
        self.exporter_queue_capacity = Gauge(
            "calltrace_exporter_queue_capacity",
            "Capacity of an exporter's sending queue, in spans.",
            ["exporter"],
            registry=r,
        )
        self.exporter_latency = Histogram(
            "calltrace_exporter_send_latency_seconds",
            "Time one export call took.",
            ["exporter"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.memory_rss = Gauge(
            "calltrace_memory_limiter_rss_bytes",
            "Resident memory of the process as last measured by a memory_limiter.",
            ["processor", "pipeline"],
            registry=r,
        )
        self.memory_refusing = Gauge(
            "calltrace_memory_limiter_refusing",
            "1 while a memory_limiter refuses data, else 0.",
            ["processor", "pipeline"],
            registry=r,
        )

    def accepted(self, receiver: str, transport: str, spans: int) -> None:
        self.receiver_accepted.labels(receiver, transport).inc(spans)

    def refused(self, receiver: str, transport: str, spans: int) -> None:
        if spans:
            self.receiver_refused.labels(receiver, transport).inc(spans)

    def request(self, receiver: str, transport: str, status: int | str) -> None:
        self.receiver_requests.labels(receiver, transport, str(status)).inc()

    def dropped(self, processor: str, spans: int, pipeline: str = "") -> None:
        self.processor_dropped.labels(processor, pipeline).inc(spans)

    def processor_error(self, processor: str, outcome: str, pipeline: str = "") -> None:
        self.processor_errors.labels(processor, outcome, pipeline).inc()

    def exporter_sent(self, exporter: str, spans: int, seconds: float) -> None:
        self.exporter_sent_spans.labels(exporter).inc(spans)
        self.exporter_latency.labels(exporter).observe(seconds)

    def exporter_failed(self, exporter: str, spans: int) -> None:
        self.exporter_send_failed.labels(exporter).inc(spans)

    def exporter_error(self, exporter: str, reason: str) -> None:
        self.exporter_errors.labels(exporter, reason).inc()

    def exporter_retry(self, exporter: str) -> None:
        self.exporter_retries.labels(exporter).inc()

    def exporter_queue(self, exporter: str, size: int, capacity: int) -> None:
        self.exporter_queue_size.labels(exporter).set(size)
        self.exporter_queue_capacity.labels(exporter).set(capacity)

    def memory_usage(self, processor: str, rss: int, refusing: bool, pipeline: str = "") -> None:
        self.memory_rss.labels(processor, pipeline).set(rss)
        self.memory_refusing.labels(processor, pipeline).set(int(refusing))

    def for_pipeline(self, pipeline: str) -> PipelineTelemetry:
        """This telemetry as a pipeline's processors report to it: their metrics carry
        the ``pipeline`` label (a processor is one instance per pipeline)."""
        return PipelineTelemetry(self, pipeline)

    def counter(self, name: str, documentation: str, labels: list[str]) -> Counter:
        """A counter of this service's registry, made on first use: components that
        count something of their own (``redact``: values masked, by pattern) ask for it
        in ``start``; two instances asking for one name share it. ``name`` should start
        with ``calltrace_`` and name the thing counted."""
        existing = self._counters.get(name)
        if existing is not None:
            return existing
        made = self._counters[name] = Counter(name, documentation, labels, registry=self.registry)
        return made

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels`` (0 if
        none was set), for tests and the CLI: ``processor="skip"`` adds up every
        pipeline's ``skip``."""
        total = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == name and all(
                    sample.labels.get(key) == value for key, value in labels.items()
                ):
                    total += sample.value
        return total

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class PipelineTelemetry:
    """A ``Telemetry`` whose processor metrics are labelled with one pipeline's name;
    everything else is the service's ``Telemetry`` itself."""

    def __init__(self, telemetry: Telemetry, pipeline: str):
        self.telemetry = telemetry
        self.pipeline = pipeline

    def dropped(self, processor: str, spans: int) -> None:
        self.telemetry.dropped(processor, spans, self.pipeline)

    def memory_usage(self, processor: str, rss: int, refusing: bool) -> None:
        self.telemetry.memory_usage(processor, rss, refusing, self.pipeline)

    def processor_error(self, processor: str, outcome: str) -> None:
        self.telemetry.processor_error(processor, outcome, self.pipeline)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.telemetry, name)
