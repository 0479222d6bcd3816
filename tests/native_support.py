"""Tests about the C extension itself (``collector._wire`` against its Python twins).

The suite runs twice (``make test``): as installed, and with ``CALLTRACE_NATIVE=0``, on
the pure Python path. A test whose subject is the C code compares C with Python, which
means nothing in the pure Python run: it skips there, with that reason, and nowhere else
(in CI an extension that should be there and is not fails ``test_the_extension_is_built``).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from collector import wire

C_PATH_OFF = "CALLTRACE_NATIVE=0: the pure Python run has no C path to compare"

native_only = pytest.mark.skipif(
    not wire.ENABLED or (not wire.BUILT and os.environ.get("CI") != "true"),
    reason=C_PATH_OFF if not wire.ENABLED else "collector._wire is not built (no C compiler)",
)
"""For tests of the C path: skipped in the pure Python run (and, outside CI, without a
built extension)."""


def native_module() -> Any:
    """``collector._wire``, for a test of the C path (skips as ``native_only`` does)."""
    if not wire.ENABLED:
        pytest.skip(C_PATH_OFF)
    if not wire.BUILT:
        assert os.environ.get("CI") != "true", "collector._wire did not build"
        pytest.skip("collector._wire is not built (no C compiler)")
    return wire.native
