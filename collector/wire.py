"""The C extension ``collector._wire`` (calltrace's hot loops over the OTLP wire format,
``collector/_wire.c``) where the install could build it: ``native`` is that module, or
None, and each caller then takes its Python path, which gives the same results.

``native`` is None when the extension is not built (no C compiler at install) and when
the environment sets ``CALLTRACE_NATIVE=0``: calltrace then runs entirely on the pure
Python path, built or not (``make test`` runs the suite both ways)."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

__all__ = ["BUILT", "ENABLED", "NATIVE_SQLITE", "NATIVE_WIRE", "native"]

ENABLED = os.environ.get("CALLTRACE_NATIVE", "1").strip() != "0"
"""False when ``CALLTRACE_NATIVE=0`` turns the C path off."""


def _load_module() -> Any:
    """``collector._wire``: the build next to this file, or the one at the path
    ``CALLTRACE_NATIVE_MODULE`` names (``make fuzz``'s, built with sanitizers into a
    directory of its own); None if there is none."""
    path = os.environ.get("CALLTRACE_NATIVE_MODULE")
    if path:
        spec = importlib.util.spec_from_file_location("collector._wire", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"CALLTRACE_NATIVE_MODULE={path} is not an extension module")
        module = importlib.util.module_from_spec(spec)
        sys.modules["collector._wire"] = module  # `from collector import _wire` finds it
        spec.loader.exec_module(module)
        return module
    try:
        from collector import _wire  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _wire


_module: Any = _load_module()

BUILT = _module is not None
"""Whether ``collector._wire`` is built and importable (used or not)."""

native: Any = _module if ENABLED else None

NATIVE_WIRE = native is not None
"""Whether the C path runs: the storage and Redis exporters then take serialized
batches (``Exporter.serialized_batches``), which they read without parsing."""


def _load_sqlite() -> bool:
    """Whether ``native.SQLiteHandle`` can open SQLite files: it calls SQLite through the
    library Python's own ``_sqlite3`` module is linked to (one copy of SQLite in the
    process, so its file locks see the Python connections'), found with ``dlopen``
    ``RTLD_NOLOAD`` on that module's file. ``CALLTRACE_NATIVE_SQLITE=0`` turns it off
    (the executemany path), for comparisons."""
    if native is None or os.environ.get("CALLTRACE_NATIVE_SQLITE", "1").strip() == "0":
        return False
    if sys.implementation.name != "cpython":
        return False
    import _sqlite3

    module_file = getattr(_sqlite3, "__file__", None)  # None: built into the interpreter
    return bool(module_file) and bool(native.load_sqlite(module_file))


NATIVE_SQLITE = _load_sqlite()
"""Whether the sqlite exporter's and the call store's write transactions run in C on a
SQLite handle of their own (``native.SQLiteHandle``), the GIL let go of once for a
batch's rows, rather than through ``executemany``."""
