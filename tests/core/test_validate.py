"""``calltrace validate`` refuses every config that ``calltrace run`` refuses before it
listens (issue 16, defect 4), naming the YAML path, with exit status 1.

Each case below is one distinct way start-up fails on a config mistake. What only the
outside world decides (a server that does not answer, a port another process holds, a
directory that is not writable) is ``run``'s alone to find: validate opens nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT, free_port

Config = dict[str, Any]

PLUGIN = """
from collector import Processor


class NeedsALicence(Processor):
    def __init__(self, component_id, config):
        raise ValueError("no licence key in CALLTRACE_LICENCE")
"""


def base_config(tmp_path: Path) -> Config:
    data = tmp_path / "data"
    return {
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{free_port()}"}}}},
        "processors": {"batch": {}},
        "exporters": {
            "sqlite": {"path": str(data / "calltrace.db")},
            "file": {"path": str(data / "spans.jsonl")},
        },
        "service": {
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["batch"],
                    "exporters": ["sqlite", "file"],
                }
            }
        },
    }


def garbage(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    return str(path)


def query_storage_undefined(config: Config, tmp_path: Path, tls: Any) -> None:
    config["service"]["query"] = {"storage": "postgres"}


def query_storage_without_queries(config: Config, tmp_path: Path, tls: Any) -> None:
    config["service"]["query"] = {"storage": "file"}


def http_certificate_unloadable(config: Config, tmp_path: Path, tls: Any) -> None:
    config["receivers"]["otlp"]["protocols"]["http"]["tls"] = {
        "cert_file": garbage(tmp_path, "cert.pem"),
        "key_file": str(tls.key_file),
    }


def grpc_key_of_another_certificate(config: Config, tmp_path: Path, tls: Any) -> None:
    config["receivers"]["otlp"]["protocols"]["grpc"] = {
        "endpoint": f"127.0.0.1:{free_port()}",
        "tls": {"cert_file": str(tls.cert_file), "key_file": str(tls.client_key_file)},
    }


def client_ca_unloadable(config: Config, tmp_path: Path, tls: Any) -> None:
    config["receivers"]["otlp"]["protocols"]["http"]["tls"] = {
        **tls.server_tls(),
        "client_ca_file": garbage(tmp_path, "clients-ca.pem"),
    }


def exporter_ca_unloadable(config: Config, tmp_path: Path, tls: Any) -> None:
    config["exporters"]["otlphttp"] = {
        "endpoint": "https://127.0.0.1:4318",
        "tls": {"ca_file": garbage(tmp_path, "upstream-ca.pem")},
    }
    config["service"]["pipelines"]["traces"]["exporters"].append("otlphttp")


def two_listeners_on_one_port(config: Config, tmp_path: Path, tls: Any) -> None:
    http = config["receivers"]["otlp"]["protocols"]["http"]
    config["receivers"]["otlp/second"] = {"protocols": {"grpc": {"endpoint": http["endpoint"]}}}
    config["service"]["pipelines"]["traces"]["receivers"].append("otlp/second")


def component_refuses_its_config(config: Config, tmp_path: Path, tls: Any) -> None:
    config["processors"]["licensed"] = {"type": "validate_plugin:NeedsALicence"}
    config["service"]["pipelines"]["traces"]["processors"].append("licensed")


def plugin_not_importable(config: Config, tmp_path: Path, tls: Any) -> None:
    config["processors"]["missing"] = {"type": "no_such_plugin_module:Processor"}
    config["service"]["pipelines"]["traces"]["processors"].append("missing")


CASES: dict[str, tuple[Callable[[Config, Path, Any], None], str, str]] = {
    # case: (mistake, the path validate names, what it says)
    "query storage undefined": (
        query_storage_undefined,
        "service.query.storage",
        "'postgres' is not defined under exporters",
    ),
    "query storage offers no queries": (
        query_storage_without_queries,
        "service.query.storage",
        "not an exporter that offers queries",
    ),
    "http certificate unloadable": (
        http_certificate_unloadable,
        "receivers.otlp.protocols.http.tls",
        "cannot load TLS certificate",
    ),
    "grpc key of another certificate": (
        grpc_key_of_another_certificate,
        "receivers.otlp.protocols.grpc.tls",
        "cannot load TLS certificate",
    ),
    "client CA unloadable": (
        client_ca_unloadable,
        "receivers.otlp.protocols.http.tls",
        "cannot load client CA file",
    ),
    "exporter CA unloadable": (
        exporter_ca_unloadable,
        "exporters.otlphttp.tls",
        "",
    ),
    "two listeners on one port": (
        two_listeners_on_one_port,
        "receivers.otlp/second.protocols.grpc.endpoint",
        "is also where receivers.otlp.protocols.http.endpoint listens",
    ),
    "component refuses its config": (
        component_refuses_its_config,
        "processors.licensed",
        "no licence key in CALLTRACE_LICENCE",
    ),
    "plugin not importable": (
        plugin_not_importable,
        "processors.missing",
        "cannot import",
    ),
}


def calltrace(command: str, config: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(config.parent), str(ROOT)])}
    return subprocess.run(
        [sys.executable, "-m", "collector", command, "--config", str(config)],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_config(tmp_path: Path, config: Config) -> Path:
    (tmp_path / "validate_plugin.py").write_text(PLUGIN)
    path = tmp_path / "collector.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_base_config_is_valid(tmp_path):
    result = calltrace("validate", write_config(tmp_path, base_config(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "data").exists()  # validate opens nothing, creates nothing


@pytest.mark.parametrize("case", list(CASES))
def test_validate_refuses_what_run_refuses(tmp_path, tls_files, case):
    mistake, path, message = CASES[case]
    config = base_config(tmp_path)
    mistake(config, tmp_path, tls_files)
    config_path = write_config(tmp_path, config)

    validated = calltrace("validate", config_path)
    assert validated.returncode == 1, validated.stdout
    named = [line for line in validated.stderr.splitlines() if line.strip().startswith(path)]
    assert named, validated.stderr
    assert message in named[0]

    try:
        ran = calltrace("run", config_path, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("calltrace run started with a config validate refuses")
    assert ran.returncode == 1, ran.stderr
    # run stops on the same check, with the same words.
    assert named[0].strip() in ran.stderr
