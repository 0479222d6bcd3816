"""Loading ``collector.yaml``: environment expansion, typed validation, readable errors.

The file has the OpenTelemetry Collector's shape::

    receivers:  {otlp: {...}}
    processors: {auth: {...}, batch/fast: {...}}
    exporters:  {sqlite: {...}}
    service:
      pipelines:
        traces: {receivers: [otlp], processors: [auth, batch/fast], exporters: [sqlite]}

Every error names its YAML path and what was expected, and all errors are reported at
once, e.g. ``processors.batch.timeout: expected a duration like "200ms", got "fast"``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from collector.components import ComponentConfig
from collector.registry import KINDS, ComponentNotFound, available, resolve
from collector.signals import SIGNALS

__all__ = [
    "ComponentSpec",
    "ConfigError",
    "ServiceConfig",
    "json_schema",
    "load_config",
    "parse_config",
]

_ENV_REF = re.compile(r"\$\$|\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_COMPONENT_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*(/[A-Za-z0-9_.\-]+)?$")
ON_ERROR_POLICIES = ("drop", "pass", "refuse")
"""What a processor's ``on_error`` may say (``collector.components.Processor.on_error``)."""


class ConfigError(Exception):
    """One or more config mistakes, each ``path: what was expected``."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    receivers: list[str] = Field(min_length=1)
    processors: list[str] = Field(default_factory=list)
    exporters: list[str] = Field(min_length=1)


class TelemetryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    log_level: str = Field(default="info", pattern="^(?i:debug|info|warning|error)$")


class QueryConfig(BaseModel):
    """The query API and explorer, served on every HTTP listener."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    storage: str | None = None
    """Exporter id whose store the API reads; default: the first storage exporter."""


class ServiceSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pipelines: dict[str, PipelineConfig] = Field(min_length=1)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    query: QueryConfig = Field(default_factory=QueryConfig)
    workers: int = Field(default=1, ge=1, le=64)
    shutdown_timeout: float = Field(default=30.0, gt=0)


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid")
    receivers: dict[str, dict[str, Any] | None] = Field(min_length=1)
    processors: dict[str, dict[str, Any] | None] = Field(default_factory=dict)
    exporters: dict[str, dict[str, Any] | None] = Field(min_length=1)
    service: ServiceSection


@dataclass
class ComponentSpec:
    kind: str  # "receivers" | "processors" | "exporters"
    id: str  # "batch/fast"
    cls: type
    config: ComponentConfig
    on_error: str = "drop"
    """Processors: ``Processor.on_error``, from the component's ``on_error`` key."""


@dataclass
class ServiceConfig:
    receivers: dict[str, ComponentSpec] = field(default_factory=dict)
    processors: dict[str, ComponentSpec] = field(default_factory=dict)
    exporters: dict[str, ComponentSpec] = field(default_factory=dict)
    service: ServiceSection | None = None
    path: Path | None = None

    @property
    def pipelines(self) -> dict[str, PipelineConfig]:
        assert self.service is not None
        return self.service.pipelines

    def components(self, kind: str) -> dict[str, ComponentSpec]:
        return getattr(self, kind)


def expand_env(node: Any, path: str, errors: list[str], environ: Mapping[str, str]) -> Any:
    """Expand ``${env:NAME}`` / ``${env:NAME:-default}`` in string scalars.

    The result of an expansion is always a string: it is never re-read as YAML, so an
    environment value "0123" stays "0123" (validation then converts it where a field's
    type asks for a number, see the Collector's issue 10937).
    """
    if isinstance(node, dict):
        return {k: expand_env(v, _join(path, str(k)), errors, environ) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, f"{path}[{i}]", errors, environ) for i, v in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        errors.append(f"{path or '<root>'}: environment variable {name} is not set")
        return ""

    return _ENV_REF.sub(substitute, node)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _format_validation_error(prefix: str, exc: ValidationError) -> list[str]:
    messages = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
        path = _join(prefix, loc) if loc else prefix
        kind = err["type"]
        msg = err["msg"]
        if kind == "extra_forbidden":
            messages.append(f"{path}: unknown key")
            continue
        if kind == "missing":
            messages.append(f"{path}: required")
            continue
        for noise in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(noise)
        if " got " not in msg and "input" in err:
            msg = f"{msg[0].lower()}{msg[1:]}, got {err['input']!r}"
        messages.append(f"{path}: {msg}")
    return messages


def parse_config(
    document: Any, *, environ: Mapping[str, str] | None = None, path: Path | None = None
) -> ServiceConfig:
    """Validate a parsed YAML document; raises ``ConfigError`` listing every mistake."""
    errors: list[str] = []
    if not isinstance(document, dict):
        raise ConfigError(["<root>: expected a mapping with receivers, exporters and service"])
    document = expand_env(document, "", errors, os.environ if environ is None else environ)
    try:
        top = _Document.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(errors + _format_validation_error("", exc)) from None

    result = ServiceConfig(service=top.service, path=path)
    for kind in KINDS:
        for component_id, raw in getattr(top, kind).items():
            where = f"{kind}.{component_id}"
            if not _COMPONENT_ID.match(component_id):
                errors.append(f'{where}: expected a component id like "batch" or "batch/fast"')
                continue
            settings = dict(raw or {})
            type_name = settings.pop("type", component_id.split("/", 1)[0])
            on_error = settings.pop("on_error", "drop") if kind == "processors" else "drop"
            if on_error not in ON_ERROR_POLICIES:
                errors.append(
                    f"{where}.on_error: expected one of {', '.join(ON_ERROR_POLICIES)},"
                    f" got {on_error!r}"
                )
                continue
            try:
                cls = resolve(kind, str(type_name))
            except ComponentNotFound as exc:
                errors.append(f"{where}: {exc}")
                continue
            try:
                model = cls.Config.model_validate(settings)  # type: ignore[attr-defined]
            except ValidationError as exc:
                errors.extend(_format_validation_error(where, exc))
                continue
            result.components(kind)[component_id] = ComponentSpec(
                kind, component_id, cls, model, str(on_error)
            )

    for name, pipeline in top.service.pipelines.items():
        where = f"service.pipelines.{name}"
        signal = name.split("/", 1)[0]
        if signal not in SIGNALS:
            errors.append(
                f'{where}: expected a pipeline named "traces", "logs" or "metrics"'
                ' (or "traces/NAME", ...)'
            )
        else:
            errors += _signal_mismatches(where, signal, pipeline, result)
        for kind in KINDS:
            ids = getattr(pipeline, kind)
            for index, component_id in enumerate(ids):
                if component_id not in getattr(top, kind):
                    errors.append(
                        f"{where}.{kind}[{index}]: {component_id!r} is not defined under {kind}"
                    )
            if len(set(ids)) != len(ids):
                errors.append(f"{where}.{kind}: lists a component twice")
    if errors:
        raise ConfigError(errors)
    return result


def _signal_mismatches(
    where: str, signal: str, pipeline: PipelineConfig, config: ServiceConfig
) -> list[str]:
    """A pipeline's components that do not handle its signal (their ``signals``)."""
    errors = []
    for kind in KINDS:
        for index, component_id in enumerate(getattr(pipeline, kind)):
            spec = config.components(kind).get(component_id)
            if spec is None:
                continue  # undefined, or its own config is wrong: reported already
            handled = getattr(spec.cls, "signals", frozenset({"traces"}))
            if signal not in handled:
                errors.append(
                    f"{where}.{kind}[{index}]: {component_id!r} does not handle {signal}"
                    f" (it handles {', '.join(s for s in SIGNALS if s in handled)})"
                )
    return errors


def load_config(path: str | Path, *, environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """Read, expand and validate a config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    return parse_config(document, environ=environ, path=path)


_ENV_VALUE = {"type": "string", "pattern": r"\$\{env:[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}"}
"""A value given as an environment reference, wherever the file holds a scalar."""


def json_schema(builtin_only: bool = False) -> dict[str, Any]:
    """The JSON Schema of a config file, for editors (completion, checks as you type)
    and CI: ``calltrace schema`` prints it with the installed plugins' components;
    ``config/collector.schema.json`` is it for the built-in ones (``builtin_only``).
    Each registered component type's settings are its ``Config`` model's schema; a
    component with an explicit ``type:`` (a plugin given as ``module:Class``) is let
    through unchecked, as are ``${env:NAME}`` references where a number, boolean, enum
    or constrained string is expected (the loader checks both). ``calltrace validate``
    remains the full check: ids, pipelines, files that must exist."""
    from pydantic.json_schema import models_json_schema

    types = {
        kind: sorted(
            name
            for name, entry in available(kind).items()
            if not builtin_only or (entry.dist is not None and entry.dist.name == "calltrace")
        )
        for kind in KINDS
    }
    configs: dict[tuple[str, str], type[BaseModel]] = {
        (kind, name): resolve(kind, name).Config  # type: ignore[attr-defined]
        for kind, names in types.items()
        for name in names
    }
    models: list[tuple[type[BaseModel], Any]] = [(ServiceSection, "validation")]
    models += [(config, "validation") for config in configs.values()]
    refs, schema = models_json_schema(models, ref_template="#/$defs/{model}")
    for name in types["processors"]:  # every processor takes ``on_error``
        ref = refs[(configs["processors", name], "validation")]["$ref"]
        properties = schema["$defs"][ref.rsplit("/", 1)[1]].setdefault("properties", {})
        properties["on_error"] = {"enum": list(ON_ERROR_POLICIES), "default": "drop"}
    defs = _env_values(schema["$defs"])

    def components(kind: str) -> dict[str, Any]:
        explicit = {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"type": "string"}},
        }
        return {
            "type": "object",
            "patternProperties": {
                f"^{re.escape(name)}(/[A-Za-z0-9_.\\-]+)?$": {
                    "anyOf": [
                        {"type": "null"},
                        refs[(configs[kind, name], "validation")],
                        explicit,
                    ]
                }
                for name in types[kind]
            },
            "additionalProperties": explicit,
        }

    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "calltrace collector.yaml",
        "type": "object",
        "properties": {
            "receivers": {**components("receivers"), "minProperties": 1},
            "processors": components("processors"),
            "exporters": {**components("exporters"), "minProperties": 1},
            "service": refs[(ServiceSection, "validation")],
        },
        "required": ["receivers", "exporters", "service"],
        "additionalProperties": False,
        "$defs": defs,
    }


def _env_values(node: Any) -> Any:
    """``node`` with every scalar schema that a string reference would fail (numbers,
    booleans, enums, constrained strings) also taking ``${env:...}``."""
    if isinstance(node, list):
        return [_env_values(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _env_values(value) for key, value in node.items()}
    scalar = out.get("type") in ("integer", "number", "boolean")
    constrained = (
        "enum" in out
        or "const" in out
        or (
            out.get("type") == "string"
            and ({"pattern", "format", "minLength", "maxLength"} & set(out))
        )
    )
    if scalar or constrained:
        return {"anyOf": [out, _ENV_VALUE]}
    return out
