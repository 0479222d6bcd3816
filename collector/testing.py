"""Test kit for plugin authors: build batches, run components, collect what exporters got.

What ``InMemorySpanExporter`` is to OpenTelemetry instrumentation tests, this module is to
calltrace plugins::

    from collector.testing import assert_attribute, make_batch, run_processor

    def test_tags_the_region():
        batch = make_batch([{"resource": {"service.name": "agent"}, "spans": [{"name": "llm"}]}])
        out = run_processor(TagRegionProcessor, {"region": "eu-west-1"}, batch)
        assert_attribute(out.resource_spans[0].resource, "deployment.region", "eu-west-1")

- Batches: ``make_batch`` (from dicts), ``load_batch`` (a ``.pb`` or OTLP/JSON fixture
  file), ``batch_from_sdk`` (spans an OpenTelemetry SDK ``InMemorySpanExporter`` kept).
- Components: ``run_processor`` and ``run_exporter`` run one component through
  ``start`` / its data method / ``shutdown`` with a ``FakeHost`` (real telemetry, no
  network); ``run_pipeline`` runs a whole config, given as YAML, through the real config
  loader and service, feeding batches straight into its pipelines (no receiver listens)
  and returning what each exporter was given. ``InMemoryExporter`` keeps what it is given.
- Assertions: ``attributes_of`` (a dict of any attribute holder), ``assert_attribute``,
  ``span_named``.

Each runner has an ``a``-prefixed coroutine twin (``arun_processor``...) for async tests;
the plain ones run their own event loop and must not be called from a running one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span, Status

from collector.components import ComponentConfig, Exporter, Processor
from collector.config import parse_config
from collector.exporterhelper import ExporterConfig
from collector.otlp_json import INVALID_HEX_ID, OTLPJSONError, decode_request
from collector.spans import SpanBatch, any_value_to_python, set_attribute
from collector.telemetry import Telemetry

__all__ = [
    "ExportedSpan",
    "FakeHost",
    "InMemoryExporter",
    "arun_exporter",
    "arun_pipeline",
    "arun_processor",
    "assert_attribute",
    "attributes_of",
    "batch_from_sdk",
    "copy_batch",
    "exported_spans",
    "load_batch",
    "make_batch",
    "run_exporter",
    "run_pipeline",
    "run_processor",
    "span_named",
]

T = TypeVar("T")

BASE_TIME_NS = 1_800_000_000_000_000_000
"""Where ``make_batch`` starts spans that give no start time (2027-01-15)."""

_TESTING_RECEIVER = "otlp/calltrace_testing"
"""The receiver ``run_pipeline`` gives pipelines that name none (never started)."""

_KINDS = {
    "unspecified": Span.SPAN_KIND_UNSPECIFIED,
    "internal": Span.SPAN_KIND_INTERNAL,
    "server": Span.SPAN_KIND_SERVER,
    "client": Span.SPAN_KIND_CLIENT,
    "producer": Span.SPAN_KIND_PRODUCER,
    "consumer": Span.SPAN_KIND_CONSUMER,
}
_STATUS = {
    "unset": Status.STATUS_CODE_UNSET,
    "ok": Status.STATUS_CODE_OK,
    "error": Status.STATUS_CODE_ERROR,
}
_RESOURCE_KEYS = {"resource", "scope", "spans"}
_SPAN_KEYS = {
    "name",
    "attributes",
    "trace_id",
    "span_id",
    "parent_span_id",
    "kind",
    "start_time_unix_nano",
    "end_time_unix_nano",
    "duration_ms",
    "status",
    "events",
}
_EVENT_KEYS = {"name", "attributes", "time_unix_nano"}


# -- building batches -------------------------------------------------------------------


def make_batch(
    resources: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    project: str | None = None,
    **metadata: str,
) -> SpanBatch:
    """A batch from plain dicts, one per ``ResourceSpans``::

        make_batch([{
            "resource": {"service.name": "agent", "livekit.room.id": "RM_1"},
            "scope": "livekit-agents",                      # or {"name": ..., "version": ...}
            "spans": [{
                "name": "llm_request",
                "attributes": {"gen_ai.request.model": "gpt-4.1"},
                "duration_ms": 250, "status": "error",      # or {"code": "error", "message": ...}
                "kind": "client",
                "events": [{"name": "exception", "attributes": {"exception.message": "..."}}],
            }],
        }], project="p1")

    Attribute values are Python values (str, bool, int, float, bytes, list, dict). Ids
    are hex strings or bytes; missing ids are random, and a resource's spans share one
    trace id unless given. Times are Unix nanoseconds (``start_time_unix_nano``,
    ``end_time_unix_nano``); without them a span starts at ``BASE_TIME_NS`` plus 1 ms per
    span and lasts ``duration_ms`` (1 ms). An unknown key raises ``ValueError``."""
    items = [resources] if isinstance(resources, Mapping) else list(resources)
    built = []
    counter = 0
    for index, spec in enumerate(items):
        _check_keys(spec, _RESOURCE_KEYS, f"resources[{index}]")
        rs = ResourceSpans()
        for key, value in dict(spec.get("resource") or {}).items():
            set_attribute(rs.resource.attributes, key, value)
        scope_spec = spec.get("scope", "calltrace.testing")
        scope = rs.scope_spans.add()
        if isinstance(scope_spec, Mapping):
            scope.scope.name = scope_spec.get("name", "")
            scope.scope.version = scope_spec.get("version", "")
        else:
            scope.scope.name = str(scope_spec)
        trace_id = os.urandom(16)
        for span_index, span_spec in enumerate(spec.get("spans") or []):
            where = f"resources[{index}].spans[{span_index}]"
            _check_keys(span_spec, _SPAN_KEYS, where)
            _build_span(scope.spans.add(), span_spec, trace_id, counter, where)
            counter += 1
        built.append(rs)
    return SpanBatch(built, project, dict(metadata))


def _check_keys(spec: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(
            f"{where}: unknown keys {sorted(unknown)} (expected some of {sorted(allowed)})"
        )


def _id(value: Any, size: int) -> bytes:
    if isinstance(value, bytes):
        return value
    return bytes.fromhex(str(value).rjust(size * 2, "0"))


def _build_span(span: Span, spec: Mapping[str, Any], trace_id: bytes, n: int, where: str) -> None:
    span.name = spec.get("name", "span")
    span.trace_id = _id(spec["trace_id"], 16) if "trace_id" in spec else trace_id
    span.span_id = _id(spec["span_id"], 8) if "span_id" in spec else os.urandom(8)
    if spec.get("parent_span_id"):
        span.parent_span_id = _id(spec["parent_span_id"], 8)
    kind = spec.get("kind", "internal")
    span.kind = _KINDS[kind] if isinstance(kind, str) else int(kind)  # type: ignore[assignment]
    start = int(spec.get("start_time_unix_nano", BASE_TIME_NS + n * 1_000_000))
    span.start_time_unix_nano = start
    span.end_time_unix_nano = int(
        spec.get("end_time_unix_nano", start + round(float(spec.get("duration_ms", 1)) * 1e6))
    )
    for key, value in dict(spec.get("attributes") or {}).items():
        set_attribute(span.attributes, key, value)
    status = spec.get("status")
    if isinstance(status, str):
        span.status.code = _STATUS[status]  # type: ignore[assignment]
    elif isinstance(status, Mapping):
        span.status.code = _STATUS[status.get("code", "unset")]  # type: ignore[assignment]
        span.status.message = status.get("message", "")
    for event_index, event_spec in enumerate(spec.get("events") or []):
        _check_keys(event_spec, _EVENT_KEYS, f"{where}.events[{event_index}]")
        event = span.events.add(
            name=event_spec.get("name", "event"),
            time_unix_nano=int(event_spec.get("time_unix_nano", start)),
        )
        for key, value in dict(event_spec.get("attributes") or {}).items():
            set_attribute(event.attributes, key, value)


def load_batch(path: str | Path, project: str | None = None) -> SpanBatch:
    """A batch from a captured request: a protobuf ``ExportTraceServiceRequest`` body
    (``.pb``), or JSON: the OTLP/JSON wire format (hex ids) or protobuf's own JSON
    mapping (``MessageToJson``, base64 ids)."""
    path = Path(path)
    body = path.read_bytes()
    if path.suffix == ".json":
        # OTLP/JSON first; its ids are hex, so base64 ids (protobuf's JSON) are not read
        # as ids there, and the file is then read as protobuf's JSON.
        try:
            request = decode_request(body)
        except OTLPJSONError:
            request = None
        if request is None or _has_unreadable_ids(request):
            request = json_format.Parse(body, ExportTraceServiceRequest())
    else:
        request = ExportTraceServiceRequest.FromString(body)
        return SpanBatch.from_received(list(request.resource_spans), body, project)
    return SpanBatch(list(request.resource_spans), project)


def _has_unreadable_ids(request: ExportTraceServiceRequest) -> bool:
    return any(
        INVALID_HEX_ID in (span.trace_id, span.span_id, span.parent_span_id)
        for rs in request.resource_spans
        for scope_spans in rs.scope_spans
        for span in scope_spans.spans
    )


def batch_from_sdk(spans: Sequence[Any], project: str | None = None) -> SpanBatch:
    """A batch from OpenTelemetry SDK spans (``ReadableSpan``, as an SDK
    ``InMemorySpanExporter.get_finished_spans()`` returns them), encoded the way the
    SDK's OTLP exporters encode them. Needs ``opentelemetry-exporter-otlp-proto-common``
    (installed with any OTLP exporter)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    request = encode_spans(spans)
    # The SDK's exporter package may bring its own copy of the proto classes: go by bytes.
    parsed = ExportTraceServiceRequest.FromString(request.SerializeToString())
    return SpanBatch(list(parsed.resource_spans), project)


def copy_batch(batch: SpanBatch) -> SpanBatch:
    """A deep copy of a batch (messages, project, metadata), made as a receiver makes a
    batch of a request: parsed from the batch's bytes, which the copy keeps as its
    received bytes, so processors and exporters under test take the same paths as in a
    running collector. Reading ``batch`` through ``serialize`` leaves it as it was."""
    body = batch.serialize()
    messages = list(ExportTraceServiceRequest.FromString(body).resource_spans)
    return SpanBatch.from_received(messages, body, batch.project, dict(batch.metadata))


def _as_batch(item: SpanBatch | ExportTraceServiceRequest | bytes) -> SpanBatch:
    if isinstance(item, SpanBatch):
        return item
    if isinstance(item, ExportTraceServiceRequest):
        item = item.SerializeToString()
    if isinstance(item, bytes | bytearray | memoryview):
        body = bytes(item)
        messages = list(ExportTraceServiceRequest.FromString(body).resource_spans)
        return SpanBatch.from_received(messages, body)
    raise TypeError(
        f"expected a SpanBatch, an ExportTraceServiceRequest or its bytes, got {type(item).__name__}"
    )


# -- reading what was exported ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportedSpan:
    """One span as an exporter got it, with its resource and scope."""

    span: Span
    resource: Resource
    scope: InstrumentationScope

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def attributes(self) -> dict[str, Any]:
        """The span's attributes as Python values."""
        return attributes_of(self.span)

    @property
    def resource_attributes(self) -> dict[str, Any]:
        return attributes_of(self.resource)

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    def __repr__(self) -> str:
        return f"<ExportedSpan {self.name!r} {self.attributes!r}>"


def exported_spans(resource_spans: Iterable[ResourceSpans]) -> list[ExportedSpan]:
    """Every span of ``resource_spans`` with its resource and scope, in order."""
    return [
        ExportedSpan(span, rs.resource, scope_spans.scope)
        for rs in resource_spans
        for scope_spans in rs.scope_spans
        for span in scope_spans.spans
    ]


def attributes_of(holder: Any) -> dict[str, Any]:
    """The attributes of a span, resource, event, link, scope, ``ResourceSpans`` (its
    resource's), ``ExportedSpan`` (its span's) or ``KeyValue`` list, as a dict of
    Python values."""
    if isinstance(holder, ExportedSpan):
        holder = holder.span
    elif isinstance(holder, ResourceSpans):
        holder = holder.resource
    attributes = getattr(holder, "attributes", holder)
    return {kv.key: any_value_to_python(kv.value) for kv in attributes}


_PRESENT = object()


def assert_attribute(holder: Any, key: str, value: Any = _PRESENT) -> None:
    """Assert that ``holder`` (anything ``attributes_of`` takes) has attribute ``key``,
    equal to ``value`` when given (a bool is not equal to 1)."""
    attributes = attributes_of(holder)
    if key not in attributes:
        raise AssertionError(f"no attribute {key!r} in {attributes!r}")
    if value is _PRESENT:
        return
    found = attributes[key]
    if found != value or isinstance(found, bool) != isinstance(value, bool):
        raise AssertionError(f"attribute {key!r} is {found!r}, expected {value!r}")


def span_named(spans: Iterable[ExportedSpan], name: str) -> ExportedSpan:
    """The one span called ``name``; AssertionError if there is none or several."""
    found = [span for span in spans if span.name == name]
    if len(found) != 1:
        raise AssertionError(f"{len(found)} spans named {name!r}, expected one")
    return found[0]


# -- running components -----------------------------------------------------------------


class FakeHost:
    """A ``Host`` for one component under test: real telemetry (a Prometheus registry of
    its own, read with ``telemetry.value(name, **labels)``), no HTTP routes, and the
    components given to it by id."""

    def __init__(self, components: Mapping[str, Any] | None = None) -> None:
        self.telemetry = Telemetry()
        self.http_routes: list[Any] = []
        self._components = dict(components or {})

    def component(self, component_id: str) -> Any:
        return self._components[component_id]

    def add_http_routes(self, routes: list[Any]) -> None:
        self.http_routes.extend(routes)


C = TypeVar("C", Processor, Exporter)


def _instance(component: type[C] | C, config: Any, component_id: str | None) -> C:
    if not isinstance(component, type):
        if config is not None:
            raise TypeError("give a config with a component class, not with an instance")
        return component
    config_class: type[ComponentConfig] = component.Config
    if config is None:
        model = config_class()
    elif isinstance(config, ComponentConfig):
        model = config
    else:
        model = config_class.model_validate(config)
    return component(component_id or component.type_name or component.__name__.lower(), model)


async def arun_processor(
    processor: type[Processor] | Processor,
    config: Mapping[str, Any] | ComponentConfig | None,
    batch: SpanBatch,
    *,
    host: FakeHost | None = None,
    component_id: str | None = None,
) -> SpanBatch | None:
    """Run a processor through ``start``, ``consume`` (which calls ``process``) and
    ``shutdown`` on a copy of ``batch`` (so the original stays to compare with); what it
    passed on, or None if it dropped everything.

    ``config`` is a dict as in YAML (validated by the processor's ``Config``), a config
    model, or None for the defaults. Several batches passed on (a processor that
    regroups) come back merged into one. Pass a ``FakeHost`` to read its telemetry after."""
    instance = _instance(processor, config, component_id)
    forwarded: list[SpanBatch] = []

    async def forward(out: SpanBatch) -> None:
        forwarded.append(out)

    await instance.start(host or FakeHost())
    try:
        await instance.consume(copy_batch(batch), forward)
    finally:
        await instance.shutdown()
    if not forwarded:
        return None
    if len(forwarded) == 1:
        return forwarded[0]
    merged = SpanBatch.merge(forwarded, forwarded[0].project)
    merged.metadata = dict(forwarded[0].metadata)
    return merged


def run_processor(
    processor: type[Processor] | Processor,
    config: Mapping[str, Any] | ComponentConfig | None,
    batch: SpanBatch,
    *,
    host: FakeHost | None = None,
    component_id: str | None = None,
) -> SpanBatch | None:
    """``arun_processor`` in an event loop of its own."""
    return _run(arun_processor(processor, config, batch, host=host, component_id=component_id))


async def arun_exporter(
    exporter: type[Exporter] | Exporter,
    config: Mapping[str, Any] | ComponentConfig | None,
    batches: SpanBatch | Sequence[SpanBatch],
    *,
    host: FakeHost | None = None,
    component_id: str | None = None,
) -> Exporter:
    """Run an exporter through ``start``, ``export`` of each batch (in order, no queue,
    no retry: an export error propagates) and ``shutdown``; returns the exporter."""
    instance = _instance(exporter, config, component_id)
    items = [batches] if isinstance(batches, SpanBatch) else list(batches)
    await instance.start(host or FakeHost())
    try:
        for batch in items:
            await instance.export(copy_batch(batch))
    finally:
        await instance.shutdown()
    return instance


def run_exporter(
    exporter: type[Exporter] | Exporter,
    config: Mapping[str, Any] | ComponentConfig | None,
    batches: SpanBatch | Sequence[SpanBatch],
    *,
    host: FakeHost | None = None,
    component_id: str | None = None,
) -> Exporter:
    """``arun_exporter`` in an event loop of its own."""
    return _run(arun_exporter(exporter, config, batches, host=host, component_id=component_id))


def _run(coroutine: Awaitable[T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)  # type: ignore[arg-type]
    close = getattr(coroutine, "close", None)
    if close is not None:
        close()
    raise RuntimeError("called from a running event loop: await the arun_... twin instead")


class InMemoryExporter(Exporter):
    """Keeps a copy of every batch it is given, like the OpenTelemetry SDK's
    ``InMemorySpanExporter``. Name it in a config as ``type:
    collector.testing:InMemoryExporter``; it takes the usual exporter settings
    (``sending_queue``, ``retry_on_failure``, ``timeout``)."""

    type_name = "memory"
    Config = ExporterConfig

    def __init__(self, component_id: str = "memory", config: ComponentConfig | None = None):
        super().__init__(component_id, config if config is not None else ExporterConfig())
        self.batches: list[SpanBatch] = []

    async def export(self, batch: SpanBatch) -> None:
        self.batches.append(copy_batch(batch))

    @property
    def resource_spans(self) -> list[ResourceSpans]:
        return [rs for batch in self.batches for rs in batch.resource_spans]

    @property
    def spans(self) -> list[ExportedSpan]:
        """Every span exported so far, in order, with its resource and scope."""
        return exported_spans(self.resource_spans)

    def get_finished_spans(self) -> tuple[ExportedSpan, ...]:
        """``spans`` as a tuple, named as in the OpenTelemetry SDK."""
        return tuple(self.spans)

    def clear(self) -> None:
        self.batches.clear()


async def arun_pipeline(
    config_yaml: str,
    batches: SpanBatch | Sequence[SpanBatch | ExportTraceServiceRequest | bytes],
    *,
    pipeline: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, list[ExportedSpan]]:
    """Run a config's pipelines in-process and return what each exporter was given, by
    exporter id.

    The YAML goes through the real loader (``${env:...}``, validation: a mistake raises
    ``ConfigError`` naming its path) and the real service: exporters, their queues and
    processors start as in ``calltrace run``, each batch (or OTLP request, or its
    protobuf bytes) is fed to ``pipeline`` (default: every pipeline, each its own copy),
    and the service shuts down (draining queues) before this returns. Receivers are not
    started (no socket is opened); ``receivers`` and pipelines' ``receivers`` may be left
    out of the YAML. The query API is off unless the YAML turns it on. Processors' and
    exporters' errors propagate as in a receiver (``RefusedError``...)."""
    from collector.service import Service

    document = yaml.safe_load(config_yaml)
    if not isinstance(document, dict):
        raise ValueError("config_yaml: expected a YAML mapping")
    if document.get("receivers") is None:
        document["receivers"] = {}
    service_section = document.get("service")
    if isinstance(service_section, dict):
        service_section.setdefault("query", {"enabled": False})
        pipelines = service_section.get("pipelines") or {}
        for pipeline_config in pipelines.values():
            # Pipelines that name no receiver get one that is never started (its port 0
            # clashes with no listener of the YAML's own receivers).
            if isinstance(pipeline_config, dict) and "receivers" not in pipeline_config:
                document["receivers"][_TESTING_RECEIVER] = {
                    "type": "otlp",
                    "protocols": {"http": {"endpoint": "127.0.0.1:0"}},
                }
                pipeline_config["receivers"] = [_TESTING_RECEIVER]
    config = parse_config(document, environ=environ)
    service = Service(config)
    service.receivers.clear()  # batches go straight into the pipelines
    names = list(service.pipelines) if pipeline is None else [pipeline]
    for name in names:
        if name not in service.pipelines:
            raise KeyError(f"no pipeline {name!r} (pipelines: {', '.join(service.pipelines)})")

    exported: dict[str, list[ExportedSpan]] = {exporter_id: [] for exporter_id in service.exporters}
    for exporter_id, exporter in service.exporters.items():
        exporter.export = _recording(exporter, exported[exporter_id])  # type: ignore[method-assign,assignment]

    items = [batches] if isinstance(batches, SpanBatch) else list(batches)
    await service.start()
    try:
        for item in items:
            batch = _as_batch(item)
            for name in names:
                await service.pipelines[name].consume(copy_batch(batch))
    finally:
        await service.shutdown()
    return exported


def run_pipeline(
    config_yaml: str,
    batches: SpanBatch | Sequence[SpanBatch | ExportTraceServiceRequest | bytes],
    *,
    pipeline: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, list[ExportedSpan]]:
    """``arun_pipeline`` in an event loop of its own."""
    return _run(arun_pipeline(config_yaml, batches, pipeline=pipeline, environ=environ))


def _recording(
    exporter: Exporter, into: list[ExportedSpan]
) -> Callable[[SpanBatch], Awaitable[None]]:
    export = exporter.export

    async def recording_export(batch: SpanBatch) -> None:
        # Copied from the batch's bytes before the exporter runs (``serialize`` marks
        # nothing as edited, so the exporter's path is unchanged); kept once the export
        # succeeded, so a retried batch is recorded once.
        copied = copy_batch(batch)
        await export(batch)
        into.extend(exported_spans(copied.resource_spans))

    return recording_export
