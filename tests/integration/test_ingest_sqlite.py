"""Issue 3 acceptance: real SDK exporters over HTTPS -> auth, skip, correlate, batch -> SQLite."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest
import requests
import trustme
import yaml
from opentelemetry.sdk.trace import TracerProvider

from collector.calls import call_id_for
from collector.keys import KeyStore
from collector.spans import ExportTraceServiceRequest
from tests.support import (
    eventually,
    fixture_requests,
    free_port,
    once_stored,
    pipeline_config,
    query,
    running_service,
    sdk_provider,
)

PROTOBUF = {"Content-Type": "application/x-protobuf"}


@pytest.fixture
def tls_files(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = (tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return ca_file, cert_file, key_file


@pytest.fixture
def no_ca_bundle_override(monkeypatch):
    # REQUESTS_CA_BUNDLE would replace the exporter's certificate_file (requests' rule).
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


def livekit_style_provider(
    endpoint: str, key: str, room: str, skip: bool, ca_file
) -> TracerProvider:
    """Tracing set up as LiveKit Agents users are told to."""
    resource = {"service.name": "voice-agent", "livekit.room.id": room, "roark.skip": skip}
    return sdk_provider(endpoint, key, resource, ca_file=ca_file)


def emit_call(provider: TracerProvider) -> None:
    tracer = provider.get_tracer("livekit-agents")
    with tracer.start_as_current_span("agent_session"):
        with tracer.start_as_current_span("user_turn"):
            pass
        with tracer.start_as_current_span("agent_turn"):
            with tracer.start_as_current_span("llm_node"):
                pass
            with tracer.start_as_current_span("tts_node"):
                pass
    assert provider.force_flush(10_000)
    provider.shutdown()


async def test_sdk_over_https_stores_spans_with_call_id(tmp_path, tls_files, no_ca_bundle_override):
    ca_file, cert_file, key_file = tls_files
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    config = pipeline_config(port, db)
    config["receivers"]["otlp"]["protocols"]["http"]["tls"] = {
        "cert_file": str(cert_file),
        "key_file": str(key_file),
    }
    async with running_service(config) as service:
        endpoint = f"https://127.0.0.1:{port}/v1/traces"
        provider = livekit_style_provider(endpoint, key, "RM_live1", False, ca_file)
        await asyncio.to_thread(emit_call, provider)
        rows = await once_stored(db, 5, "SELECT name, call_id, project FROM spans ORDER BY name")
        expected_call = call_id_for("acme", "RM_live1")
        assert [r[0] for r in rows] == sorted(
            ["agent_session", "user_turn", "agent_turn", "llm_node", "tts_node"]
        )
        assert {(r[1], r[2]) for r in rows} == {(expected_call, "acme")}
        assert (
            service.telemetry.value(
                "calltrace_receiver_accepted_spans_total", receiver="otlp", transport="http"
            )
            == 5
        )

        # The same agent with roark.skip True: nothing stored, the drop counted.
        skipped = livekit_style_provider(endpoint, key, "RM_skip1", True, ca_file)
        await asyncio.to_thread(emit_call, skipped)
        assert (
            service.telemetry.value("calltrace_processor_dropped_spans_total", processor="skip")
            == 5
        )
    assert query(db, "SELECT count(*) FROM spans")[0][0] == 5
    assert query(db, "SELECT room_id, source FROM calls") == [("RM_live1", "livekit.room.id")]


async def test_unauthenticated_requests_store_nothing(tmp_path):
    db = tmp_path / "calltrace.db"
    store = KeyStore(db)
    _, revoked = store.create("acme")
    revoked_key = _
    store.revoke(revoked.key_id)
    port = free_port()
    body = fixture_requests("livekit")[0].read_bytes()
    url = f"http://127.0.0.1:{port}/v1/traces"
    async with running_service(pipeline_config(port, db)):
        for headers in (
            {},
            {"Authorization": "Bearer ct_not-a-key"},
            {"Authorization": f"Bearer {revoked_key}"},
            {"Authorization": "Basic dXNlcjpwYXNz"},
        ):
            response = await asyncio.to_thread(
                requests.post, url, data=body, headers={**PROTOBUF, **headers}, timeout=10
            )
            assert response.status_code == 401, headers
    assert query(db, "SELECT count(*) FROM spans")[0][0] == 0


async def test_same_request_twice_is_stored_once(tmp_path):
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    body = fixture_requests("livekit")[0].read_bytes()
    expected = sum(
        len(ss.spans)
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans
        for ss in rs.scope_spans
    )
    headers = {**PROTOBUF, "Authorization": f"Bearer {key}"}
    url = f"http://127.0.0.1:{port}/v1/traces"
    async with running_service(pipeline_config(port, db)):
        for _ in range(2):
            response = await asyncio.to_thread(requests.post, url, data=body, headers=headers)
            assert response.status_code == 200
        await eventually(lambda: query(db, "SELECT count(*) FROM spans")[0][0] >= expected)
        await asyncio.sleep(0.2)
    assert query(db, "SELECT count(*) FROM spans")[0][0] == expected


@pytest.mark.parametrize(
    "framework,room,spans", [("livekit", "RM_test123", 53), ("pipecat", "RM_test789", 14)]
)
@pytest.mark.parametrize("encoding", ["protobuf", "json"])
async def test_every_fixture_request_is_stored_with_its_call(
    tmp_path, framework, room, spans, encoding
):
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/traces"
    async with running_service(pipeline_config(port, db)):
        for path in fixture_requests(framework):
            if encoding == "protobuf":
                body, ctype = path.read_bytes(), "application/x-protobuf"
            else:
                body = path.with_suffix(".otlp.json").read_bytes()
                ctype = "application/json"
            headers = {"Content-Type": ctype, "Authorization": f"Bearer {key}"}
            response = await asyncio.to_thread(requests.post, url, data=body, headers=headers)
            assert response.status_code == 200, (path.name, response.text)
            if encoding == "json":
                assert response.headers["Content-Type"].startswith("application/json")
                assert "rejectedSpans" not in response.text
        await eventually(lambda: query(db, "SELECT count(*) FROM spans")[0][0] == spans)
    call = call_id_for("acme", room)
    assert query(db, "SELECT count(*) FROM spans WHERE call_id = ?", call)[0][0] == spans
    assert query(db, "SELECT room_id FROM calls WHERE call_id = ?", call) == [(room,)]


def test_sigterm_drains_every_acknowledged_span(tmp_path):
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    config = pipeline_config(port, db)
    # A slow batch: SIGTERM arrives while accepted spans are still in flight.
    config["processors"]["batch"] = {"timeout": "300ms", "send_batch_size": 100000}
    config_path = tmp_path / "collector.yaml"
    config_path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "collector", "run", "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{base}/healthz", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "collector did not start"
            time.sleep(0.05)

        bodies = [p.read_bytes() for p in fixture_requests("livekit")]
        headers = {**PROTOBUF, "Authorization": f"Bearer {key}"}
        from concurrent.futures import ThreadPoolExecutor

        def send(body: bytes) -> int:
            try:
                return requests.post(
                    f"{base}/v1/traces", data=body, headers=headers, timeout=30
                ).status_code
            except requests.ConnectionError:
                return 0

        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(send, b) for b in bodies]
            time.sleep(0.1)  # requests are in the batch processor, not yet answered
            process.send_signal(signal.SIGTERM)
            statuses = [f.result() for f in futures]
        assert process.wait(30) == 0, process.stdout.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
    acknowledged = sum(
        len(ss.spans)
        for body, status in zip(bodies, statuses, strict=True)
        if status == 200
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans
        for ss in rs.scope_spans
    )
    assert acknowledged > 0, statuses
    stored = query(db, "SELECT count(*) FROM spans")[0][0]
    assert stored >= acknowledged


async def test_spans_are_stored_as_received_or_as_a_plugin_edited_them(tmp_path):
    """The default pipeline writes received spans out from their bytes; a processor that
    edits spans turns that off, and its edits are what is stored."""
    body = fixture_requests("livekit")[0].read_bytes()
    sent = [
        s
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    ]
    for plugin in (False, True):
        db = tmp_path / f"calltrace-{plugin}.db"
        key, _ = KeyStore(db).create("acme")
        port = free_port()
        config = pipeline_config(port, db)
        processors = config["service"]["pipelines"]["traces"]["processors"]
        if plugin:
            config["processors"]["rename"] = {"type": "tests.conftest:SpanRenamingProcessor"}
            processors.insert(1, "rename")
        async with running_service(config):
            response = await asyncio.to_thread(
                requests.post,
                f"http://127.0.0.1:{port}/v1/traces",
                data=body,
                headers={**PROTOBUF, "Authorization": f"Bearer {key}"},
                timeout=10,
            )
            assert response.status_code == 200
            stored = dict(await once_stored(db, len(sent), "SELECT span_id, span FROM spans"))
        for span in sent:
            if plugin:
                span.name = f"renamed {span.name}"
            assert stored[span.span_id] == span.SerializeToString()


async def test_otlp_json_spans_are_stored_as_their_protobuf_twins(tmp_path):
    """OTLP/JSON goes the protobuf body's way once decoded (ids checked in C, spans
    written out from the decoded bytes): what is stored is what the .pb says."""
    pb = fixture_requests("livekit")[0]
    body = pb.with_name(pb.name.replace(".pb", ".otlp.json")).read_bytes()
    sent = [
        s
        for rs in ExportTraceServiceRequest.FromString(pb.read_bytes()).resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    ]
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    async with running_service(pipeline_config(port, db)):
        response = await asyncio.to_thread(
            requests.post,
            f"http://127.0.0.1:{port}/v1/traces",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        stored = dict(await once_stored(db, len(sent), "SELECT span_id, span FROM spans"))
    assert {span.span_id: span.SerializeToString() for span in sent} == stored
