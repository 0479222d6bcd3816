"""The C extension ``collector._wire`` (calltrace's hot loops over the OTLP wire format,
``collector/_wire.c``) where the install could build it: ``native`` is that module, or
None without a C compiler, and each caller then takes its Python path."""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["NATIVE_SQLITE", "NATIVE_WIRE", "native"]

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


def _load_sqlite() -> bool:
    """Whether ``native.execute_steps`` can write on Python's own sqlite3 connections: it
    needs SQLite's functions from the library ``_sqlite3`` is linked to, and CPython's
    connection object (whose first field is the SQLite handle). ``CALLTRACE_NATIVE_SQLITE=0``
    turns it off (the executemany path), for comparisons."""
    if native is None or os.environ.get("CALLTRACE_NATIVE_SQLITE", "1") == "0":
        return False
    if sys.implementation.name != "cpython" or not (3, 8) <= sys.version_info[:2] <= (3, 13):
        return False
    import _sqlite3

    module_file = getattr(_sqlite3, "__file__", None)  # None: built into the interpreter
    return bool(module_file) and bool(native.load_sqlite(module_file))


NATIVE_SQLITE = _load_sqlite()
"""Whether the sqlite exporter's span rows go from the batch's bytes into SQLite in C,
without the GIL (``native.execute_steps``), rather than through ``executemany``."""
