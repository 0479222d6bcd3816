"""The running collector: builds the pipeline graph from config, starts it exporters
first, and shuts it down receivers first so each stage drains into a live consumer.

The graph is the OpenTelemetry Collector's: receivers and exporters are shared by every
pipeline that names them, processors are instantiated once per pipeline (``batch`` in
two pipelines is two instances, each with its own buffer and its own exporters), and a
receiver that several pipelines name hands each of them its own copy of every batch.

Building the graph (``Service(config)``) runs every start-up check that needs neither
the network nor the data files: each component is constructed, the query API's storage
is resolved, TLS certificates and keys are loaded, listeners are checked for clashing
endpoints. ``calltrace validate`` builds the same graph and stops there, so it refuses
what ``calltrace run`` would refuse before it connects to a server or opens a port; what
only the outside world decides (a server unreachable, a port taken by another process,
a directory not writable) ``run`` alone finds.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from collector.components import Exporter, Processor, Receiver, RequestInfo
from collector.config import ComponentSpec, ConfigError, ServiceConfig
from collector.exporterhelper import ExporterQueue
from collector.pipeline import Pipeline
from collector.signals import signal_of
from collector.spans import SpanBatch
from collector.telemetry import Telemetry
from collector.tls import (
    ClientTLSSettings,
    TLSSettings,
    client_ssl_context,
    parse_endpoint,
    server_ssl_context,
)

log = logging.getLogger(__name__)

__all__ = ["PipelinesFanOut", "Service"]

_EVERY_INTERFACE = frozenset(("", "0.0.0.0", "::"))


class Service:
    """The pipeline graph of one config, and its lifecycle.

    Raises ``ConfigError`` (each error ``yaml.path: what is wrong``) when the graph
    cannot be built; nothing is opened until ``start``.
    """

    def __init__(self, config: ServiceConfig):
        assert config.service is not None
        self.config = config
        self.telemetry = Telemetry()
        self.exporters: dict[str, Exporter] = {}
        self.queues: dict[str, ExporterQueue] = {}
        self.signal_queues: dict[tuple[str, str], ExporterQueue] = {}
        """Exporters' queues for logs and metrics, by exporter id and signal."""
        self.pipeline_processors: dict[str, dict[str, Processor]] = {}
        """Each pipeline's own processor instances, by pipeline name and component id."""
        self.processors: dict[str, Processor] = {}
        """Per component id, the instance of the first pipeline (in config order) that
        lists it, or the one instance of a processor in no pipeline;
        ``pipeline_processors`` has every pipeline's."""
        self._outside_pipelines: dict[str, Processor] = {}
        self.receivers: dict[str, Receiver] = {}
        self.pipelines: dict[str, Pipeline] = {}
        self.query_storage: str | None = None
        """The exporter whose store the query API reads (None: no query API)."""
        self.ready = False
        self._started = False
        self._stopped = False
        self._routes: list[Any] = [
            web.get("/healthz", self._healthz),
            web.get("/readyz", self._readyz),
            web.get("/metrics", self._metrics),
        ]
        errors: list[str] = []
        self._build(errors)
        if not errors:
            self.query_storage = self._resolve_query_storage(errors)
            errors += _tls_problems(config)
            errors += _endpoint_clashes(config)
        if errors:
            raise ConfigError(errors)

    def _build(self, errors: list[str]) -> None:
        for spec in self.config.exporters.values():
            exporter = _construct(errors, f"exporters.{spec.id}", spec.cls, spec.id, spec.config)
            if exporter is not None:
                self.exporters[spec.id] = exporter
                self.queues[spec.id] = ExporterQueue(exporter, self.telemetry)
        for name, pipeline_config in self.config.pipelines.items():
            instances: dict[str, Processor] = {}
            for processor_id in pipeline_config.processors:
                processor = _processor(errors, self.config.processors[processor_id])
                if processor is not None:
                    instances[processor_id] = processor
                    self.processors.setdefault(processor_id, processor)
            self.pipeline_processors[name] = instances
            if errors:
                continue
            self.pipelines[name] = Pipeline(
                name,
                list(instances.values()),
                [self._queue(e, signal_of(name)) for e in pipeline_config.exporters],
                self.telemetry.for_pipeline(name),  # type: ignore[arg-type]
            )
        piped = {p for pipeline in self.config.pipelines.values() for p in pipeline.processors}
        for spec in self.config.processors.values():
            if spec.id not in piped:
                # In no pipeline: one instance all the same, started with the service,
                # as before processors were per pipeline (the query API may check keys
                # with an ``auth`` defined for it alone).
                processor = _processor(errors, spec)
                if processor is not None:
                    self.processors[spec.id] = self._outside_pipelines[spec.id] = processor
        if errors:
            return
        for receiver_id, spec in self.config.receivers.items():
            fed: dict[str, list[Pipeline]] = {}  # by signal: a receiver may feed each
            for name, pipeline_config in self.config.pipelines.items():
                if receiver_id in pipeline_config.receivers:
                    fed.setdefault(signal_of(name), []).append(self.pipelines[name])
            if not fed:
                continue  # defined but in no pipeline: not run, as in the Collector
            consumers: dict[str, Any] = {
                signal: pipelines[0] if len(pipelines) == 1 else PipelinesFanOut(pipelines)
                for signal, pipelines in fed.items()
            }
            consumer = consumers.get("traces") or next(iter(consumers.values()))
            receiver = _construct(
                errors, f"receivers.{receiver_id}", spec.cls, spec.id, spec.config, consumer
            )
            if receiver is not None:
                receiver.consumers = consumers
                self.receivers[receiver_id] = receiver

    def _queue(self, exporter_id: str, signal: str) -> ExporterQueue:
        """The exporter's sending queue for a signal (traces: ``queues[id]``; logs and
        metrics: ``signal_queues[id, signal]``, made when a pipeline first needs it)."""
        if signal == "traces":
            return self.queues[exporter_id]
        key = (exporter_id, signal)
        if key not in self.signal_queues:
            exporter = self.exporters[exporter_id]
            self.signal_queues[key] = ExporterQueue(exporter, self.telemetry, signal)
        return self.signal_queues[key]

    def _resolve_query_storage(self, errors: list[str]) -> str | None:
        assert self.config.service is not None
        query = self.config.service.query
        if not query.enabled:
            return None
        offering = [e.id for e in self.exporters.values() if callable(_query_store(e))]
        if query.storage is None:
            return offering[0] if offering else None
        if query.storage not in self.exporters:
            errors.append(
                f"service.query.storage: {query.storage!r} is not defined under exporters"
            )
        elif query.storage not in offering:
            errors.append(
                f"service.query.storage: {query.storage!r} is not an exporter that offers "
                f"queries (those defined that do: {', '.join(offering) or 'none'})"
            )
        return query.storage

    # -- Host: what components may ask of the service -------------------------------

    def component(self, component_id: str) -> Any:
        """The exporter, receiver or processor of that id. A processor listed in several
        pipelines is one instance per pipeline: this is the first pipeline's (in config
        order); a processor's own host answers with its pipeline's instance, and
        ``pipeline_processors`` holds every one."""
        for table in (self.exporters, self.processors, self.receivers):
            if component_id in table:
                return table[component_id]
        raise KeyError(component_id)

    @property
    def http_routes(self) -> list[Any]:
        return list(self._routes)

    def add_http_routes(self, routes: list[Any]) -> None:
        """Called by components (query API) during ``start``, before receivers listen."""
        self._routes.extend(routes)

    def _processor_instances(self) -> Iterator[tuple[str | None, Processor]]:
        """Every processor instance with its pipeline, pipelines in config order and each
        pipeline's processors upstream first, then those in no pipeline (None)."""
        for name, instances in self.pipeline_processors.items():
            for processor in instances.values():
                yield name, processor
        for processor in self._outside_pipelines.values():
            yield None, processor

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            for exporter in self.exporters.values():
                await exporter.start(self)
            for queue in [*self.queues.values(), *self.signal_queues.values()]:
                await queue.start()
            for name, processor in self._processor_instances():
                await processor.start(self if name is None else PipelineHost(self, name))
            self._mount_query_api()
            for receiver in self.receivers.values():
                self.add_http_routes(receiver.routes())
            for receiver in self.receivers.values():
                await receiver.start(self)
        except BaseException:
            # Release what did start (files, connections, a bound port) before failing;
            # components' shutdown is safe on a component that never started.
            await self.shutdown()
            raise
        self.ready = True
        log.info(
            "calltrace started: %d receivers, %d pipelines, %d processors, %d exporters",
            len(self.receivers),
            len(self.pipelines),
            sum(1 for _ in self._processor_instances()),
            len(self.exporters),
        )

    def _mount_query_api(self) -> None:
        if self.query_storage is None:
            return
        try:
            from collector import api  # type: ignore[attr-defined]
        except ImportError:  # the query API is an optional part of the core
            return
        routes = api.routes_for(self, self.query_storage)
        if routes:
            self.add_http_routes(routes)

    async def shutdown(self) -> None:
        """Stop accepting, drain processors (batch flushes), deliver queued data, close."""
        if self._stopped:
            return
        self._stopped = True
        self.ready = False
        assert self.config.service is not None
        timeout = self.config.service.shutdown_timeout
        for receiver in self.receivers.values():
            await _guard(receiver.shutdown(), receiver)
        for _, processor in self._processor_instances():
            await _guard(processor.shutdown(), processor)
        for queue in [*self.queues.values(), *self.signal_queues.values()]:
            await _guard(queue.shutdown(timeout), queue.exporter)
        for exporter in self.exporters.values():
            await _guard(exporter.shutdown(), exporter)
        log.info("calltrace stopped")

    # -- built-in routes ------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"status": "starting"}, status=503)
        queues = {q.id: {"size": q.size, "capacity": q.capacity} for q in self.queues.values()}
        return web.json_response({"status": "ready", "queues": queues})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.telemetry.exposition(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )


class PipelineHost:
    """The host a pipeline's processors are started with: the service, except that
    ``component(id)`` answers with this pipeline's own instance of a processor, and
    ``telemetry`` labels processor metrics with the pipeline's name."""

    def __init__(self, service: Service, pipeline: str):
        self.service = service
        self.pipeline = pipeline
        self.telemetry = service.telemetry.for_pipeline(pipeline)

    def component(self, component_id: str) -> Any:
        own = self.service.pipeline_processors.get(self.pipeline, {})
        if component_id in own:
            return own[component_id]
        return self.service.component(component_id)

    @property
    def http_routes(self) -> list[Any]:
        return self.service.http_routes

    def __getattr__(self, name: str) -> Any:
        return getattr(self.service, name)


class PipelinesFanOut:
    """The consumer of a receiver that feeds several pipelines: each pipeline gets its
    own copy of every batch (processors edit batches in place), all at once.

    ``admit`` runs every pipeline's header checks. ``consume`` returns once every
    pipeline took its copy; if one refused or failed, that error is raised after the
    others finished, so the client retries and the pipelines that took the batch see it
    again (as the Collector's fan-out consumer does; storage writes are idempotent).
    """

    def __init__(self, pipelines: list[Pipeline]):
        self.pipelines = pipelines

    async def admit(self, request: RequestInfo) -> None:
        for pipeline in self.pipelines:
            await pipeline.admit(request)

    async def consume(self, batch: SpanBatch) -> None:
        # Copied before the first pipeline runs: its processors may edit ``batch``.
        copies = [batch] + [_copy(batch) for _ in self.pipelines[1:]]
        outcomes = await asyncio.gather(
            *(
                pipeline.consume(copy)
                for pipeline, copy in zip(self.pipelines, copies, strict=False)
            ),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome


def _copy(batch: SpanBatch) -> SpanBatch:
    """A batch of ``batch``'s spans and context that shares no message with it (the
    copy's processors edit it apart from the original); parsed only if they read it.
    A ``LogBatch`` / ``MetricBatch`` the same way, as its own type."""
    return type(batch).from_bytes(
        batch.serialize(), batch.project, dict(batch.metadata), batch.received_ns
    )


def _construct(errors: list[str], where: str, cls: type, *args: Any) -> Any:
    """``cls(*args)``, or None after adding why it failed to ``errors``."""
    try:
        return cls(*args)
    except Exception as exc:
        errors.append(f"{where}: {type(exc).__name__}: {exc}")
        return None


def _processor(errors: list[str], spec: ComponentSpec) -> Processor | None:
    """A new instance of the processor ``spec`` describes (one per pipeline)."""
    processor: Processor | None = _construct(
        errors, f"processors.{spec.id}", spec.cls, spec.id, spec.config
    )
    if processor is not None:
        processor.on_error = spec.on_error
    return processor


def _query_store(exporter: Exporter) -> Any:
    return getattr(exporter, "query_store", None)


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(yaml path, value)`` of ``node`` and of every model, list item and mapping
    value inside it, a field under the name it has in YAML (its alias)."""
    yield path, node
    if isinstance(node, BaseModel):
        for name, field in type(node).model_fields.items():
            yield from _walk(getattr(node, name), f"{path}.{field.alias or name}")
    elif isinstance(node, (list, tuple)):
        for index, item in enumerate(node):
            yield from _walk(item, f"{path}[{index}]")
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")


def _tls_problems(config: ServiceConfig) -> list[str]:
    """Every ``tls`` block, of any component, whose files do not load."""
    errors = []
    for kind in ("receivers", "processors", "exporters"):
        for spec in config.components(kind).values():
            for path, node in _walk(spec.config, f"{kind}.{spec.id}"):
                try:
                    if isinstance(node, TLSSettings):
                        server_ssl_context(node)
                    elif isinstance(node, ClientTLSSettings):
                        client_ssl_context(node)
                except (ValueError, OSError, ssl.SSLError) as exc:
                    errors.append(f"{path}: {exc}")
    return errors


def _endpoint_clashes(config: ServiceConfig) -> list[str]:
    """Receivers' listeners that would bind the same port (``endpoint`` fields)."""
    bound: list[tuple[str, str, int]] = []
    errors = []
    for spec in config.receivers.values():
        for path, node in _walk(spec.config, f"receivers.{spec.id}"):
            if not (path.endswith(".endpoint") and isinstance(node, str)):
                continue
            try:
                host, port = parse_endpoint(node)
            except ValueError:
                continue  # not a listener's "host:port"; its model checks its own form
            for other_path, other_host, other_port in bound:
                same_host = host == other_host or {host, other_host} & _EVERY_INTERFACE
                if port and port == other_port and same_host:
                    errors.append(f"{path}: {node} is also where {other_path} listens")
            bound.append((path, host, port))
    return errors


async def _guard(step: Any, component: Any) -> None:
    try:
        await step
    except Exception:
        log.exception("%r failed to shut down cleanly", component)
    except asyncio.CancelledError:
        raise
