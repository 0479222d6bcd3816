import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from collector.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]

BASE = {
    "receivers": {"otlp": {"protocols": {"http": {"endpoint": "127.0.0.1:4318"}}}},
    "processors": {"batch": {}, "batch/slow": {"timeout": "1s"}},
    "exporters": {"debug": {}},
    "service": {
        "pipelines": {
            "traces": {"receivers": ["otlp"], "processors": ["batch"], "exporters": ["debug"]}
        }
    },
}


def errors_of(document, **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(document, **kw)
    return info.value.errors


def test_named_components_of_one_type():
    config = parse_config(BASE)
    assert config.processors["batch/slow"].config.timeout == 1.0
    assert config.processors["batch"].cls is config.processors["batch/slow"].cls


def test_every_mistake_is_reported_with_its_path():
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    doc["processors"]["batch"] = {"timeout": "fast", "send_batch_size": "many", "colour": 1}
    doc["exporters"]["nosuch"] = {}
    doc["service"]["pipelines"]["traces"]["exporters"] = ["debug", "missing"]
    errors = errors_of(doc)
    assert "processors.batch.timeout: expected a duration like \"200ms\", got 'fast'" in errors
    assert any(e.startswith("processors.batch.send_batch_size: ") for e in errors)
    assert "processors.batch.colour: unknown key" in errors
    assert any(e.startswith("exporters.nosuch: unknown exporter type 'nosuch'") for e in errors)
    assert any(
        e.startswith("service.pipelines.traces.exporters[1]: 'missing' is not defined")
        for e in errors
    )


def test_env_expansion_keeps_strings_and_applies_defaults():
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    doc["processors"]["batch"] = {
        "timeout": "${env:BATCH_TIMEOUT:-250ms}",
        "send_batch_size": "${env:BATCH_SIZE}",
    }
    config = parse_config(doc, environ={"BATCH_SIZE": "0128"})
    batch = config.processors["batch"].config
    assert batch.timeout == 0.25 and batch.send_batch_size == 128


def test_env_expansion_does_not_reparse_yaml():
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    doc["processors"]["auth"] = {"keys": [{"key": "${env:KEY}", "project": "${env:PROJECT}"}]}
    config = parse_config(doc, environ={"KEY": "0123456789", "PROJECT": "007"})
    auth = config.processors["auth"].config
    assert auth.keys[0].key.get_secret_value() == "0123456789"
    assert auth.keys[0].project == "007"


def test_missing_env_var_is_an_error_naming_the_path():
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    doc["processors"]["batch"] = {"timeout": "${env:NOPE_NOT_SET}"}
    errors = errors_of(doc, environ={})
    assert "processors.batch.timeout: environment variable NOPE_NOT_SET is not set" in errors


def test_module_class_type():
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    doc["processors"]["mine"] = {"type": "processors.skip:SkipProcessor", "attributes": ["x"]}
    config = parse_config(doc)
    assert config.processors["mine"].config.attributes == ["x"]


def test_module_class_must_be_a_component():
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    doc["processors"]["mine"] = {"type": "collections:OrderedDict"}
    assert any("is not a calltrace Processor" in e for e in errors_of(doc))


def test_default_config_validates_and_is_the_embedded_one():
    assert (ROOT / "collector.yaml").read_text() == (
        ROOT / "collector" / "default.yaml"
    ).read_text()
    config = load_config(ROOT / "collector.yaml", environ={})
    assert list(config.pipelines) == ["traces"]


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path, tls_files):
    from collector.service import Service

    env = {"CALLTRACE_TLS_CERT": str(tls_files.cert_file)}
    env["CALLTRACE_TLS_KEY"] = str(tls_files.key_file)
    # sidecar.yaml: its key and the gateway it forwards to
    env |= {"CALLTRACE_KEY": "ct_local", "CALLTRACE_GATEWAY_KEY": "ct_gateway"}
    env["CALLTRACE_GATEWAY"] = "https://gateway.example:4318"
    # What validate checks: the whole graph builds (components, query storage, TLS).
    Service(load_config(path, environ=env))


def test_a_receiver_may_feed_several_pipelines():
    document = yaml.safe_load(yaml.safe_dump(BASE))
    document["service"]["pipelines"]["traces/slow"] = {
        "receivers": ["otlp"],
        "processors": ["batch/slow"],
        "exporters": ["debug"],
    }
    config = parse_config(document)
    assert [p.receivers for p in config.pipelines.values()] == [["otlp"], ["otlp"]]


def test_validate_command_exit_codes(tmp_path):
    good = subprocess.run(
        [sys.executable, "-m", "collector", "validate", "--config", str(ROOT / "collector.yaml")],
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr
    bad_doc = yaml.safe_load(yaml.safe_dump(BASE))
    bad_doc["processors"]["batch"] = {"timeout": "fast"}
    bad_doc["exporters"]["debug"] = {"verbosity": 7, "nope": True}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(bad_doc))
    result = subprocess.run(
        [sys.executable, "-m", "collector", "validate", "--config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "processors.batch.timeout" in result.stderr
    assert "exporters.debug.nope: unknown key" in result.stderr
    assert "exporters.debug.verbosity" in result.stderr


def test_installed_plugin_is_found_by_entry_point(tmp_path, monkeypatch):
    """A distribution declaring ``calltrace.processors`` is usable by its type name."""
    from collector import registry

    (tmp_path / "regionplugin.py").write_text(
        "from collector import ComponentConfig, Processor, set_attribute\n"
        "class RegionConfig(ComponentConfig):\n"
        "    region: str = 'eu'\n"
        "class TagRegion(Processor):\n"
        "    Config = RegionConfig\n"
        "    async def process(self, batch):\n"
        "        for rs in batch.resource_spans:\n"
        "            set_attribute(rs.resource.attributes, 'region', self.config.region)\n"
        "        return batch\n"
    )
    dist = tmp_path / "regionplugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: regionplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[calltrace.processors]\ntag_region = regionplugin:TagRegion\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.available.cache_clear()
    try:
        doc = yaml.safe_load(yaml.safe_dump(BASE))
        doc["processors"]["tag_region/us"] = {"region": "us"}
        config = parse_config(doc)
        spec = config.processors["tag_region/us"]
        assert spec.cls.__name__ == "TagRegion" and spec.config.region == "us"
        doc["processors"]["tag_region/us"] = {"colour": "red"}
        assert "processors.tag_region/us.colour: unknown key" in errors_of(doc)
    finally:
        registry.available.cache_clear()


SCHEMA = ROOT / "config" / "collector.schema.json"


def _schema_errors(document) -> list[str]:
    import json

    import jsonschema

    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    return [".".join(map(str, e.absolute_path)) for e in validator.iter_errors(document)]


def test_the_checked_in_json_schema_is_the_generated_one():
    """`calltrace schema --builtin > config/collector.schema.json` after changing a
    component's config keeps it true."""
    import json

    from collector.config import json_schema

    assert json.loads(SCHEMA.read_text()) == json_schema(builtin_only=True)
    printed = subprocess.run(
        [sys.executable, "-m", "collector", "schema", "--builtin"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(printed.stdout) == json_schema(builtin_only=True)


@pytest.mark.parametrize(
    "path",
    [ROOT / "collector.yaml", *sorted((ROOT / "config").glob("*.yaml"))],
    ids=lambda p: p.name,
)
def test_the_shipped_configs_follow_the_json_schema(path):
    # As written, with their ${env:...} references (a schema-aware editor sees these).
    assert _schema_errors(yaml.safe_load(path.read_text())) == []


def test_the_json_schema_catches_what_the_loader_would_refuse():
    good = yaml.safe_load((ROOT / "collector.yaml").read_text())
    assert _schema_errors(good) == []
    for mistake, where in [
        ({"exporters": {"sqlite": {"retention": "a month"}}}, "exporters.sqlite"),
        ({"exporters": {"sqlite": {"pth": "x.db"}}}, "exporters.sqlite"),
        ({"processors": {"batch": {"send_batch_size": "many"}}}, "processors.batch"),
        ({"receivers": {"otlp": {"protocols": {"http": {"endpoint": 4318}}}}}, "receivers.otlp"),
        ({"service": {"pipelines": {"traces": {"receivers": []}}}}, "service"),
        ({"extensions": {}}, ""),
    ]:
        document = {**good, **{k: {**good.get(k, {}), **v} for k, v in mistake.items()}}
        if "service" in mistake:
            document["service"] = mistake["service"]
        errors = _schema_errors(document)
        assert any(e.startswith(where) for e in errors) if where else "" in errors, mistake
    plugin = {**good, "exporters": {"mine": {"type": "my_plugins.exporters:Mine", "x": 1}}}
    assert _schema_errors(plugin) == []  # a plugin given by module:Class is not checked
