"""The SQLite query store's own behaviour (its answers are tested through the API in
tests/integration/test_query_api.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.query import CallFilter, StorageUnavailableError, TraceFilter
from exporters.sqlite_query import SQLiteQueryStore


async def test_a_file_that_cannot_be_read_is_storage_unavailable(tmp_path: Path) -> None:
    """The API answers this with 503 and Retry-After (collector/api.py)."""
    store = SQLiteQueryStore(tmp_path / "missing" / "calltrace.db")
    try:
        with pytest.raises(StorageUnavailableError, match="unable to open database file"):
            await store.calls("acme", CallFilter())
        with pytest.raises(StorageUnavailableError):
            await store.traces("acme", TraceFilter())
    finally:
        await store.close()
