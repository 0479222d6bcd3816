"""The explorer page in headless Chromium over PostgreSQL storage: the same walk-through
as ``test_explorer_browser.py``, with the dataset's spans in a schema of the test
PostgreSQL server (dropped afterwards) and ``service.query.storage: postgres``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.integration.test_explorer_browser import _need_chromium
from tests.integration.test_explorer_browser import page as page
from tests.integration.test_explorer_browser import (
    test_explorer_calls_filters_waterfall_turns_and_span_attributes as test_explorer_calls_filters_waterfall_turns_and_span_attributes,
)
from tests.integration.test_explorer_browser import (
    test_explorer_shows_a_call_without_its_root as test_explorer_shows_a_call_without_its_root,
)
from tests.query_dataset import Dataset, make_dataset
from tests.support import postgres_execute

pytestmark = [pytest.mark.browser, pytest.mark.postgres, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataset]:
    _need_chromium()
    postgres_execute("SELECT 1")  # skip (or fail in CI) before ingesting anything
    schema = f"ct_ui_{uuid.uuid4().hex[:12]}"
    try:
        yield make_dataset(tmp_path_factory.mktemp("explorer_pg"), postgres_schema=schema)
    finally:
        postgres_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
