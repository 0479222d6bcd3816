"""examples/plugin-example, installed as a user installs a plugin (pip, entry points), in
a live collector that names its components in YAML: real OTLP from the SDK's exporter in,
the plugin exporter's file out with the plugin processor's edit in it.

The package is built with pip from a copy of its directory (no build files left in the
repository), without network (``--no-build-isolation``: the test extra's setuptools),
into a directory of its own that the collector and the example's tests get on
``PYTHONPATH``: the test virtualenv stays as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collector.keys import KeyStore
from collector.spans import Span
from collector.testing import assert_attribute
from tests.collector_process import CollectorProcess
from tests.support import ROOT, free_port, query, sdk_provider

EXAMPLE = ROOT / "examples" / "plugin-example"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the installed example package (code and dist-info)."""
    work = tmp_path_factory.mktemp("plugin")
    source = work / "source"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = work / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    return site


def _env(site: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def test_the_examples_own_tests_pass_against_the_installed_package(plugin_site, tmp_path):
    shutil.copytree(EXAMPLE / "tests", tmp_path / "tests")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=tmp_path,
        env=_env(plugin_site),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 passed" in result.stdout, result.stdout


def test_a_live_collector_runs_the_plugins_named_by_entry_point(plugin_site, tmp_path):
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    out = tmp_path / "out" / "spans.jsonl"
    port = free_port()
    config = {
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{port}"}}}},
        "processors": {
            "auth": {"key_store": str(db)},
            "tag_region": {"region": "eu-west-1"},
            "redact": {"patterns": ["email", "phone"]},
            "batch": {"timeout": "5ms"},
        },
        "exporters": {"jsonl": {"path": str(out)}, "sqlite": {"path": str(db)}},
        "service": {
            "pipelines": {
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["auth", "tag_region", "redact", "batch"],
                    "exporters": ["jsonl", "sqlite"],
                }
            }
        },
    }
    collector = CollectorProcess(config, tmp_path, port, env=_env(plugin_site))
    validate = subprocess.run(
        [sys.executable, "-m", "collector", "validate", "--config", str(collector.config_path)],
        env=_env(plugin_site),
        capture_output=True,
        text=True,
    )
    assert validate.returncode == 0, validate.stdout + validate.stderr
    collector.start()
    try:
        provider = sdk_provider(
            f"{collector.base}/v1/traces",
            key,
            {"service.name": "voice-agent", "livekit.room.id": "RM_plugin1"},
        )
        tracer = provider.get_tracer("livekit-agents")
        with tracer.start_as_current_span("agent_turn") as turn:
            turn.set_attribute("lk.pii.user_input", "I'm jane@example.com, call +1 415 555 0132")
            with tracer.start_as_current_span("llm_node"):
                pass
        assert provider.force_flush(10_000)
        provider.shutdown()
        deadline = time.monotonic() + 30
        while not out.exists() or len(out.read_text().splitlines()) < 2:
            assert time.monotonic() < deadline, collector.log()
            time.sleep(0.05)
    finally:
        assert collector.stop() == 0, collector.log()

    lines = {line["name"]: line for line in map(json.loads, out.read_text().splitlines())}
    assert set(lines) == {"agent_turn", "llm_node"}
    for line in lines.values():
        assert line["resource"]["cloud.region"] == "eu-west-1"
        assert line["resource"]["service.name"] == "voice-agent"
        assert line["project"] == "acme"
    masked = "I'm [REDACTED:email], call [REDACTED:phone]"
    assert lines["agent_turn"]["attributes"]["lk.pii.user_input"] == masked
    # the built-in storage got the same edits as the plugin's exporter
    (row,) = query(
        db,
        "SELECT s.span, r.attributes FROM spans s JOIN resources r USING (resource_id)"
        " WHERE s.name = 'agent_turn'",
    )
    assert_attribute(Span.FromString(row[0]), "lk.pii.user_input", masked)
    assert json.loads(row[1])["cloud.region"] == "eu-west-1"


def test_the_schema_lists_installed_plugins(plugin_site):
    result = subprocess.run(
        [sys.executable, "-m", "collector", "schema"],
        env=_env(plugin_site),
        capture_output=True,
        text=True,
        check=True,
    )
    schema = json.loads(result.stdout)
    assert any(
        "tag_region" in key for key in schema["properties"]["processors"]["patternProperties"]
    )
    assert any("jsonl" in key for key in schema["properties"]["exporters"]["patternProperties"])
