"""The running collector: builds the pipeline graph from config, starts it exporters
first, and shuts it down receivers first so each stage drains into a live consumer."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from collector.components import Exporter, Processor, Receiver
from collector.config import ServiceConfig
from collector.exporterhelper import ExporterQueue
from collector.pipeline import Pipeline
from collector.telemetry import Telemetry

log = logging.getLogger(__name__)

__all__ = ["Service"]


class Service:
    def __init__(self, config: ServiceConfig):
        assert config.service is not None
        self.config = config
        self.telemetry = Telemetry()
        self.exporters: dict[str, Exporter] = {}
        self.queues: dict[str, ExporterQueue] = {}
        self.processors: dict[str, Processor] = {}
        self.receivers: dict[str, Receiver] = {}
        self.pipelines: dict[str, Pipeline] = {}
        self.ready = False
        self._started = False
        self._stopped = False
        self._routes: list[Any] = [
            web.get("/healthz", self._healthz),
            web.get("/readyz", self._readyz),
            web.get("/metrics", self._metrics),
        ]
        self._build()

    def _build(self) -> None:
        for spec in self.config.exporters.values():
            exporter = spec.cls(spec.id, spec.config)
            self.exporters[spec.id] = exporter
            self.queues[spec.id] = ExporterQueue(exporter, self.telemetry)
        for spec in self.config.processors.values():
            processor = self.processors[spec.id] = spec.cls(spec.id, spec.config)
            processor.on_error = spec.on_error
        for name, pipeline_config in self.config.pipelines.items():
            pipeline = Pipeline(
                name,
                [self.processors[p] for p in pipeline_config.processors],
                [self.queues[e] for e in pipeline_config.exporters],
                self.telemetry,
            )
            self.pipelines[name] = pipeline
            for receiver_id in pipeline_config.receivers:
                spec = self.config.receivers[receiver_id]
                self.receivers[receiver_id] = spec.cls(spec.id, spec.config, pipeline)

    # -- Host: what components may ask of the service -------------------------------

    def component(self, component_id: str) -> Any:
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

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            for exporter in self.exporters.values():
                await exporter.start(self)
            for queue in self.queues.values():
                await queue.start()
            for processor in self.processors.values():
                await processor.start(self)
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
            "calltrace started: %d receivers, %d processors, %d exporters",
            len(self.receivers),
            len(self.processors),
            len(self.exporters),
        )

    def _mount_query_api(self) -> None:
        assert self.config.service is not None
        query = self.config.service.query
        if not query.enabled:
            return
        try:
            from collector import api  # type: ignore[attr-defined]
        except ImportError:  # the query API is an optional part of the core
            return
        routes = api.routes_for(self, query.storage)
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
        for processor in self.processors.values():
            await _guard(processor.shutdown(), processor)
        for queue in self.queues.values():
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


async def _guard(step: Any, component: Any) -> None:
    try:
        await step
    except Exception:
        log.exception("%r failed to shut down cleanly", component)
    except asyncio.CancelledError:
        raise
