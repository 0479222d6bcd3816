"""calltrace: an OpenTelemetry trace collector for voice-AI agents.

The public plugin API is re-exported here (``docs/plugins.md`` is its guide; see
``collector.pipeline`` for the shape); ``collector.testing`` is the plugin test kit.
"""

from collector.components import (
    ComponentConfig,
    Consumer,
    Exporter,
    Forward,
    Host,
    PermanentError,
    Processor,
    Receiver,
    RefusedError,
    RequestInfo,
    RetryableError,
    UnauthenticatedError,
)
from collector.exporterhelper import ExporterConfig, QueueSettings
from collector.matching import AttributeMatch, SpanMatch, SpanMatcher, SpanPredicate, select
from collector.otlp_json import encode as encode_otlp_json
from collector.signals import ALL_SIGNALS, LogBatch, MetricBatch
from collector.spans import (
    CALL_ID_ATTRIBUTE,
    CALL_KEY_ATTRIBUTE,
    CALL_SOURCE_ATTRIBUTE,
    BatchEntry,
    ResourceSpans,
    Span,
    SpanBatch,
    any_value_to_python,
    get_attribute,
    iter_spans,
    remove_attribute,
    set_attribute,
    span_count,
    split_resource_spans,
)
from collector.tls import ClientTLSSettings, client_ssl_context
from collector.units import ByteSize, Duration

__all__ = [
    "ALL_SIGNALS",
    "CALL_ID_ATTRIBUTE",
    "CALL_KEY_ATTRIBUTE",
    "CALL_SOURCE_ATTRIBUTE",
    "AttributeMatch",
    "BatchEntry",
    "ByteSize",
    "ClientTLSSettings",
    "ComponentConfig",
    "Consumer",
    "Duration",
    "Exporter",
    "ExporterConfig",
    "Forward",
    "Host",
    "LogBatch",
    "MetricBatch",
    "PermanentError",
    "Processor",
    "QueueSettings",
    "Receiver",
    "RefusedError",
    "RequestInfo",
    "ResourceSpans",
    "RetryableError",
    "Span",
    "SpanBatch",
    "SpanMatch",
    "SpanMatcher",
    "SpanPredicate",
    "UnauthenticatedError",
    "any_value_to_python",
    "client_ssl_context",
    "encode_otlp_json",
    "get_attribute",
    "iter_spans",
    "remove_attribute",
    "select",
    "set_attribute",
    "span_count",
    "split_resource_spans",
]
