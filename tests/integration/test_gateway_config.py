"""``config/gateway.yaml``: validates with certificates from the environment, and names
what is missing without them. Running it, two instances at once, is
``test_gateway_multi_instance.py``."""

from __future__ import annotations

import os
import subprocess
import sys

from collector.config import load_config
from tests.support import ROOT

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
    assert list(config.exporters) == ["postgres", "redis_streams"]
    assert config.service.query.storage == "postgres"
    # Nothing of an instance's own but its exporters' queues: keys, spans and call
    # records are in the shared PostgreSQL and Redis.
    assert config.processors["auth"].config.key_store.startswith("postgresql://")
    assert config.processors["correlate"].config.store is None
    assert config.processors["correlate"].config.redis.ttl == 86400
    assert config.processors["correlate"].config.redis.key_prefix == "calltrace:call:"
    assert config.exporters["redis_streams"].config.stream == "calltrace:spans:{project}"
    for exporter in config.exporters.values():
        assert str(exporter.config.sending_queue.storage) == "data/queue"
    assert config.pipelines["traces"].processors[0] == "memory_limiter"


def test_gateway_config_without_certificates_names_the_variables(tls_files):
    result = validate({})
    assert result.returncode == 1
    assert "environment variable CALLTRACE_TLS_CERT is not set" in result.stderr
    assert "environment variable CALLTRACE_TLS_KEY is not set" in result.stderr
