"""Logs and metrics as signals: ``/v1/logs`` and ``/v1/metrics`` through logs and
metrics pipelines into SQLite, from the real OpenTelemetry SDK exporters, queryable per
call; config refuses a component in a pipeline of a signal it does not handle."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging

import aiohttp
import pytest

from collector.calls import call_id_for
from collector.config import ConfigError, parse_config
from tests.support import eventually, free_port, query, running_service

KEY = "logs-metrics-test-key-0001"
OTHER_KEY = "logs-metrics-other-key-002"
ROOM = "RM_signalsRoom1"


def signals_config(port: int, db) -> dict:
    return {
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{port}"}}}},
        "processors": {
            "auth": {
                "key_store": None,
                "keys": [{"key": KEY, "project": "acme"}, {"key": OTHER_KEY, "project": "other"}],
            },
            "batch": {"timeout": "5ms"},
        },
        "exporters": {"sqlite": {"path": str(db)}},
        "service": {
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["auth", "batch"],
                    "exporters": ["sqlite"],
                },
                "logs": {"receivers": ["otlp"], "processors": ["auth"], "exporters": ["sqlite"]},
                "metrics/agents": {
                    "receivers": ["otlp"],
                    "processors": ["auth"],
                    "exporters": ["sqlite"],
                },
            }
        },
    }


def emit_logs_and_metrics(base: str, key: str) -> None:
    """Through the SDK's OTLP/HTTP log and metric exporters, as an agent would."""
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    headers = {"Authorization": f"Bearer {key}"}
    resource = Resource.create({"service.name": "voice-agent"})
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(
        BatchLogRecordProcessor(OTLPLogExporter(endpoint=f"{base}/v1/logs", headers=headers))
    )
    handler = LoggingHandler(logger_provider=logger_provider)
    logger = logging.getLogger("voice-agent.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.warning("tts slow", extra={"room_id": ROOM, "job_id": "AJ_1", "latency": 1.5})
        logger.info("turn done", extra={"room_id": ROOM, "job_id": "AJ_1"})
    finally:
        logger.removeHandler(handler)
    assert logger_provider.force_flush(10_000)
    logger_provider.shutdown()

    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{base}/v1/metrics", headers=headers),
        export_interval_millis=60_000,
    )
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    meter = meter_provider.get_meter("voice-agent")
    attributes = {"room_id": ROOM, "job_id": "AJ_1"}
    meter.create_histogram("turn.latency", unit="s").record(0.8, attributes)
    meter.create_histogram("turn.latency", unit="s").record(1.2, attributes)
    meter.create_counter("tokens").add(42, attributes)
    meter_provider.shutdown()  # exports once (a force_flush first would export twice)


async def test_sdk_logs_and_metrics_are_stored_and_queryable(tmp_path):
    db = tmp_path / "calltrace.db"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async with running_service(signals_config(port, db)):
        await asyncio.to_thread(emit_logs_and_metrics, base, KEY)
        rows = await eventually(
            lambda: (
                query(
                    db,
                    "SELECT body, severity_text, call_id, project FROM log_records ORDER BY time_ns",
                )
                if len(query(db, "SELECT 1 FROM log_records")) == 2
                and len(query(db, "SELECT 1 FROM metric_points")) == 2
                else None
            )
        )
        call_id = call_id_for("acme", ROOM)
        assert rows == [
            ('"tts slow"', "WARN", call_id, "acme"),
            ('"turn done"', "INFO", call_id, "acme"),
        ]
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
            async with http.get(f"{base}/api/v1/calls/{call_id}/logs") as response:
                assert response.status == 200
                logs = (await response.json())["logs"]
            async with http.get(f"{base}/api/v1/calls/{call_id}/metrics") as response:
                assert response.status == 200
                metrics = (await response.json())["metrics"]
        assert [r["body"] for r in logs] == ["tts slow", "turn done"]
        assert logs[0]["attributes"]["latency"] == 1.5
        assert logs[0]["severity_number"] == 13
        by_name = {m["name"]: m for m in metrics}
        histogram = by_name["turn.latency"]
        assert histogram["kind"] == "histogram" and histogram["unit"] == "s"
        assert (histogram["count"], histogram["sum"]) == (2, pytest.approx(2.0))
        assert (histogram["min"], histogram["max"]) == (0.8, 1.2)
        assert sum(histogram["bucket_counts"]) == 2 and histogram["explicit_bounds"]
        assert by_name["tokens"]["kind"] == "sum" and by_name["tokens"]["value"] == 42
        # Another project's key sees none of it.
        other = {"Authorization": f"Bearer {OTHER_KEY}"}
        async with (
            aiohttp.ClientSession(headers=other) as http,
            http.get(f"{base}/api/v1/calls/{call_id}/logs") as response,
        ):
            assert (await response.json())["logs"] == []


async def test_otlp_json_logs_and_bad_bodies(tmp_path):
    db = tmp_path / "calltrace.db"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    document = {
        "resourceLogs": [
            {
                "resource": {"attributes": []},
                "scopeLogs": [
                    {
                        "scope": {"name": "json-client"},
                        "logRecords": [
                            {
                                "timeUnixNano": "1700000000000000000",
                                "severityNumber": 17,
                                "severityText": "ERROR",
                                "body": {"stringValue": "boom"},
                                "traceId": "5b8efff798038103d269b633813fc60c",
                                "spanId": "eee19b7ec3c1b174",
                                "attributes": [{"key": "room_id", "value": {"stringValue": ROOM}}],
                            }
                        ],
                    }
                ],
            }
        ]
    }
    auth = {"Authorization": f"Bearer {KEY}"}
    async with running_service(signals_config(port, db)), aiohttp.ClientSession() as http:
        bad = [
            ("/v1/logs", "application/x-protobuf", b"\xff\xff\xff garbage", {}),
            ("/v1/metrics", "application/x-protobuf", b"\x0a\x05\x0a", {}),
            ("/v1/logs", "application/json", b'{"resourceLogs": [{"scopeLogs": 5}]}', {}),
            ("/v1/metrics", "application/json", b"{not json", {}),
            ("/v1/logs", "application/x-protobuf", b"\x1f\x8b broken gzip", {"gzip": 1}),
        ]
        for path, content_type, body, flags in bad:
            headers = {**auth, "Content-Type": content_type}
            if flags:
                headers["Content-Encoding"] = "gzip"
            async with http.post(f"{base}{path}", data=body, headers=headers) as response:
                assert 400 <= response.status < 500, (path, body, response.status)
        async with http.post(f"{base}/v1/logs", data=b"", headers={"Content-Type": "x"}) as r:
            assert r.status == 401  # no key: refused before anything else
        headers = {**auth, "Content-Type": "application/json", "Content-Encoding": "gzip"}
        payload = gzip.compress(json.dumps(document).encode())
        async with http.post(f"{base}/v1/logs", data=payload, headers=headers) as response:
            assert response.status == 200
            assert await response.json() == {}
        rows = await eventually(
            lambda: query(db, "SELECT body, trace_id, span_id, call_id FROM log_records")
        )
        assert rows == [
            (
                '"boom"',
                "5b8efff798038103d269b633813fc60c",
                "eee19b7ec3c1b174",
                call_id_for("acme", ROOM),
            )
        ]


def test_config_refuses_a_component_in_a_pipeline_of_another_signal(tmp_path):
    config = signals_config(free_port(), tmp_path / "c.db")
    config["service"]["pipelines"]["logs"]["processors"] = ["auth", "batch"]
    config["service"]["pipelines"]["bogus"] = config["service"]["pipelines"]["traces"]
    with pytest.raises(ConfigError) as caught:
        parse_config(config)
    assert "service.pipelines.logs.processors[1]: 'batch' does not handle logs" in str(caught.value)
    assert "service.pipelines.bogus: expected a pipeline named" in str(caught.value)


def emit_over_grpc(endpoint: str, key: str) -> None:
    """The SDK's OTLP/gRPC log and metric exporters."""
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    headers = (("authorization", f"Bearer {key}"),)
    logger_provider = LoggerProvider()
    logger_provider.add_log_record_processor(
        SimpleLogRecordProcessor(OTLPLogExporter(endpoint=endpoint, insecure=True, headers=headers))
    )
    logger_provider.get_logger("grpc-client").emit(
        body="over grpc", attributes={"room_id": ROOM}, severity_text="INFO"
    )
    logger_provider.shutdown()
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=endpoint, insecure=True, headers=headers),
        export_interval_millis=60_000,
    )
    meter_provider = MeterProvider(metric_readers=[reader])
    meter_provider.get_meter("grpc-client").create_counter("calls").add(3, {"room_id": ROOM})
    meter_provider.shutdown()


async def test_grpc_logs_and_metrics_services(tmp_path):
    db = tmp_path / "calltrace.db"
    config = signals_config(free_port(), db)
    grpc_port = free_port()
    config["receivers"]["otlp"]["protocols"]["grpc"] = {"endpoint": f"127.0.0.1:{grpc_port}"}
    async with running_service(config):
        await asyncio.to_thread(emit_over_grpc, f"127.0.0.1:{grpc_port}", KEY)
        call_id = call_id_for("acme", ROOM)
        assert await eventually(lambda: query(db, "SELECT body, call_id FROM log_records")) == [
            ('"over grpc"', call_id)
        ]
        assert await eventually(
            lambda: query(db, "SELECT name, value, call_id FROM metric_points")
        ) == [("calls", 3.0, call_id)]


async def test_a_receiver_in_a_logs_pipeline_only_takes_no_traces(tmp_path):
    db = tmp_path / "calltrace.db"
    port = free_port()
    config = signals_config(port, db)
    del config["service"]["pipelines"]["traces"]
    async with running_service(config), aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/x-protobuf"}
        async with http.post(f"http://127.0.0.1:{port}/v1/traces", headers=headers) as response:
            assert response.status in (404, 405)
        async with http.post(f"http://127.0.0.1:{port}/v1/logs", headers=headers) as response:
            assert response.status == 200


async def test_one_receiver_feeds_two_logs_pipelines(tmp_path):
    """Each logs pipeline gets its own copy of the records (as traces do)."""
    db, other_db = tmp_path / "a.db", tmp_path / "b.db"
    port = free_port()
    config = signals_config(port, db)
    config["exporters"]["sqlite/other"] = {"path": str(other_db)}
    config["service"]["pipelines"]["logs/other"] = {
        "receivers": ["otlp"],
        "processors": ["auth"],
        "exporters": ["sqlite/other"],
    }
    async with running_service(config):
        await asyncio.to_thread(emit_logs_and_metrics, f"http://127.0.0.1:{port}", KEY)
        for path in (db, other_db):
            await eventually(lambda path=path: len(query(path, "SELECT 1 FROM log_records")) == 2)
    assert query(other_db, "SELECT count(*) FROM metric_points") == [(0,)]
