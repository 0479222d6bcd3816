"""``config/gateway.yaml``: validates with certificates from the environment, and runs:
HTTPS in, SQLite and a Redis stream out, call records in Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from collector.calls import call_id_for
from collector.config import load_config
from collector.keys import KeyStore
from tests.collector_process import CollectorProcess
from tests.support import ROOT, emit_session, free_port, query, sdk_provider

GATEWAY = ROOT / "config" / "gateway.yaml"


def gateway_env(tls_files, **extra: str) -> dict[str, str]:
    return {
        "CALLTRACE_TLS_CERT": str(tls_files.cert_file),
        "CALLTRACE_TLS_KEY": str(tls_files.key_file),
        **extra,
    }


def validate(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CALLTRACE_")}
    return subprocess.run(
        [sys.executable, "-m", "collector", "validate", "--config", str(GATEWAY)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_gateway_config_validates_with_certificates_from_env(tls_files):
    result = validate(gateway_env(tls_files))
    assert result.returncode == 0, result.stderr
    assert "valid (pipelines: traces)" in result.stdout

    config = load_config(GATEWAY, environ=gateway_env(tls_files))
    http = config.receivers["otlp"].config.protocols.http
    assert http.endpoint == "0.0.0.0:4318" and http.tls.cert_file == tls_files.cert_file
    assert config.receivers["otlp"].config.protocols.grpc.tls is not None
    assert list(config.exporters) == ["sqlite", "redis_streams"]
    assert config.processors["correlate"].config.redis.ttl == 86400
    assert config.exporters["redis_streams"].config.sending_queue.storage is not None
    assert config.pipelines["traces"].processors[0] == "memory_limiter"


def test_gateway_config_without_certificates_names_the_variables(tls_files):
    result = validate({})
    assert result.returncode == 1
    assert "environment variable CALLTRACE_TLS_CERT is not set" in result.stderr
    assert "environment variable CALLTRACE_TLS_KEY is not set" in result.stderr


@pytest.mark.timeout(90)
async def test_gateway_runs_https_to_sqlite_and_redis(
    tmp_path, tls_files, redis_server, no_ca_bundle_override
):
    (tmp_path / "data").mkdir()
    key, _ = KeyStore(tmp_path / "data" / "calltrace.db").create("acme")
    port = free_port()
    env = gateway_env(
        tls_files,
        CALLTRACE_HTTP_ENDPOINT=f"127.0.0.1:{port}",
        CALLTRACE_GRPC_ENDPOINT=f"127.0.0.1:{free_port()}",
        CALLTRACE_REDIS_URL=redis_server.url,
    )
    collector = CollectorProcess(GATEWAY, tmp_path, port, env=env, ca_file=tls_files.ca_file)
    await asyncio.to_thread(collector.start)
    try:
        provider = sdk_provider(
            f"{collector.base}/v1/traces",
            key,
            {"service.name": "agent", "livekit.room.id": "RM_gw"},
            ca_file=tls_files.ca_file,
        )
        await asyncio.to_thread(emit_session, provider)
        client = redis_server.client()
        deadline = time.monotonic() + 20
        while client.xlen("calltrace:spans:acme") < 2:
            assert time.monotonic() < deadline, collector.log()
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(collector.stop) == 0
    finally:
        collector.kill()
    call_id = call_id_for("acme", "RM_gw")
    db = tmp_path / "data" / "calltrace.db"
    assert query(db, "SELECT count(*), min(call_id), max(call_id) FROM spans") == [
        (2, call_id, call_id)
    ]
    assert client.xlen("calltrace:spans:acme") == 2
    assert client.hget(f"calltrace:call:acme:{call_id}", "span_count") == b"2"
