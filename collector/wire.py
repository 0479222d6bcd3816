"""The C extension ``collector._wire`` (calltrace's hot loops over the OTLP wire format,
``collector/_wire.c``) where the install could build it: ``native`` is that module, or
None without a C compiler, and each caller then takes its Python path."""

from __future__ import annotations

from typing import Any

__all__ = ["NATIVE_WIRE", "native"]

native: Any = None
try:
    from collector import _wire  # type: ignore[attr-defined]
except ImportError:
    pass
else:
    native = _wire

NATIVE_WIRE = native is not None
"""Whether ``collector._wire`` is built: the storage and Redis exporters then take
serialized batches (``Exporter.serialized_batches``), which they read without parsing."""
