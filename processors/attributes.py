"""``attributes``: insert, update, upsert, delete or hash span and resource attributes.

The actions are named as in the OpenTelemetry Collector's ``attributes`` and
``resource`` processors, and run in the order given::

    processors:
      attributes:
        actions:
          - {key: deployment.environment, action: upsert, value: production, context: resource}
          - {key: enduser.id, action: hash}                  # SHA-256, hex
          - {key: lk.pii.user_input, action: delete}
          - {key: call.model, action: insert, from_attribute: gen_ai.request.model}
        include: {match_type: regexp, span_names: ["^llm"]}  # optional
        exclude: {attributes: [{key: internal, value: true}]}  # optional

- ``insert``: set the attribute where it is absent; ``update``: where it is present;
  ``upsert``: either way. The value is ``value``, or the value of ``from_attribute`` in
  the same context (nothing happens where that attribute is absent).
- ``delete``: remove it. ``hash``: replace it with the SHA-256 hex digest of its value
  (a string's UTF-8 bytes, bytes as they are, anything else as JSON).
- ``context``: ``span`` (default) or ``resource``.
- ``include`` / ``exclude`` (``collector.SpanMatch``) choose the spans acted on; a
  resource action applies to resources holding at least one chosen span (to every
  resource without ``include``/``exclude``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, MutableSequence
from typing import Any, Literal

from pydantic import Field, JsonValue, model_validator

from collector import (
    ComponentConfig,
    Processor,
    SpanBatch,
    SpanMatch,
    any_value_to_python,
    iter_spans,
    remove_attribute,
    select,
    set_attribute,
)

__all__ = ["AttributeAction", "AttributesConfig", "AttributesProcessor", "hash_value"]


class AttributeAction(ComponentConfig):
    key: str = Field(min_length=1)
    action: Literal["insert", "update", "upsert", "delete", "hash"]
    value: JsonValue = None
    """The value to set (insert, update, upsert): a string, number, bool, list or map."""
    from_attribute: str | None = Field(default=None, min_length=1)
    """Take the value from this attribute of the same span or resource instead."""
    context: Literal["span", "resource"] = "span"
    """Whose attributes the action edits."""

    @model_validator(mode="after")
    def _value_source(self) -> AttributeAction:
        sets = self.action in ("insert", "update", "upsert")
        if sets and (self.value is None) == (self.from_attribute is None):
            raise ValueError(f"{self.action} of {self.key!r} needs one of value, from_attribute")
        if not sets and (self.value is not None or self.from_attribute is not None):
            raise ValueError(f"{self.action} of {self.key!r} takes no value or from_attribute")
        return self


class AttributesConfig(ComponentConfig):
    actions: list[AttributeAction] = Field(default_factory=list)
    """Applied in order to each chosen span (or resource). None by default."""
    include: SpanMatch | None = None
    """Act only on spans that match."""
    exclude: SpanMatch | None = None
    """Do not act on spans that match."""


def hash_value(value: Any) -> str:
    """The SHA-256 hex digest the ``hash`` action writes in place of ``value``."""
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str):
        data = value.encode()
    else:
        data = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()


_MISSING = object()
Edit = Callable[[MutableSequence[Any]], None]


def _lookup(attributes: MutableSequence[Any], key: str) -> Any:
    for kv in attributes:
        if kv.key == key:
            return any_value_to_python(kv.value)
    return _MISSING


def _edit(action: AttributeAction) -> Edit:
    key, kind, source = action.key, action.action, action.from_attribute
    constant = action.value

    def apply(attributes: MutableSequence[Any]) -> None:
        if kind == "delete":
            while remove_attribute(attributes, key):
                pass
            return
        current = _lookup(attributes, key)
        if kind == "hash":
            if current is not _MISSING:
                set_attribute(attributes, key, hash_value(current))
            return
        if (kind == "insert" and current is not _MISSING) or (
            kind == "update" and current is _MISSING
        ):
            return
        value = constant if source is None else _lookup(attributes, source)
        if value is not _MISSING and value is not None:
            set_attribute(attributes, key, value)

    return apply


class AttributesProcessor(Processor):
    type_name = "attributes"
    Config = AttributesConfig
    config: AttributesConfig

    def __init__(self, component_id: str, config: AttributesConfig):
        super().__init__(component_id, config)
        self._span_edits = [_edit(a) for a in config.actions if a.context == "span"]
        self._resource_edits = [_edit(a) for a in config.actions if a.context == "resource"]
        self._selected = select(config.include, config.exclude)

    async def process(self, batch: SpanBatch) -> SpanBatch | None:
        selected = self._selected
        if not self._span_edits and selected is None:
            # Resources only: the spans are not handed out, so their received bytes stay.
            for entry in batch.entries():
                attributes = entry.resource.attributes
                for edit in self._resource_edits:
                    edit(attributes)
            return batch
        for rs in batch.resource_spans:
            resource = rs.resource
            chosen = selected is None
            for span in iter_spans(rs):
                if selected is not None and not selected(span, resource):
                    continue
                chosen = True
                for edit in self._span_edits:
                    edit(span.attributes)
            if chosen:
                for edit in self._resource_edits:
                    edit(resource.attributes)
        return batch
