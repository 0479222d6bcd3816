"""Finding component classes by type name.

Built-ins are registered exactly like plugins, through entry points of the calltrace
distribution (groups ``calltrace.receivers``, ``calltrace.processors``,
``calltrace.exporters``); installed plugins come after them. A config may also name a
class directly: ``type: some.module:ClassName``.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import EntryPoint, entry_points

KINDS = ("receivers", "processors", "exporters")
_BASES = {
    "receivers": "Receiver",
    "processors": "Processor",
    "exporters": "Exporter",
}


class ComponentNotFound(LookupError):
    pass


@cache
def available(kind: str) -> dict[str, EntryPoint]:
    """Entry points for ``kind``, the calltrace distribution's own first."""
    found = list(entry_points(group=f"calltrace.{kind}"))
    found.sort(key=lambda ep: 0 if ep.dist is not None and ep.dist.name == "calltrace" else 1)
    result: dict[str, EntryPoint] = {}
    for ep in found:
        result.setdefault(ep.name, ep)
    return result


def resolve(kind: str, type_name: str) -> type:
    """The class for a component type: a registered name, or ``module:ClassName``."""
    from collector import components

    base = getattr(components, _BASES[kind])
    if ":" in type_name:
        module_name, _, attr = type_name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ComponentNotFound(f"cannot import {type_name!r}: {exc}") from None
    else:
        entry = available(kind).get(type_name)
        if entry is None:
            known = ", ".join(sorted(available(kind))) or "none"
            raise ComponentNotFound(f"unknown {kind[:-1]} type {type_name!r} (known: {known})")
        try:
            cls = entry.load()
        except Exception as exc:
            raise ComponentNotFound(
                f"plugin {type_name!r} ({entry.value}) failed to load: {exc}"
            ) from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ComponentNotFound(f"{type_name!r} is not a calltrace {_BASES[kind]} class")
    return cls
