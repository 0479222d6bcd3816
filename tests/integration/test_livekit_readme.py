"""The README's "Self-hosted LiveKit Agent Insights" config is one calltrace takes."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from collector.config import parse_config

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_livekit_insights_config_is_valid(tmp_path):
    text = README.read_text()
    section = text.split("## Self-hosted LiveKit Agent Insights in one variable", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    document = yaml.safe_load(block.group(1))
    http = document["receivers"]["otlp"]["protocols"]["http"]
    http["tls"] = None  # the certificate files are the reader's
    http["insecure"] = True
    environ = {"LIVEKIT_API_KEY": "APIkey", "LIVEKIT_API_SECRET": "secret-value"}
    config = parse_config(document, environ=environ)
    assert {"traces/livekit", "logs/livekit", "metrics/livekit"} <= set(config.pipelines)
    assert "LIVEKIT_OBSERVABILITY_URL=" in section and "record=True" in section
