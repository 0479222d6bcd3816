"""The span search, trace search and calls list scenarios of
``test_query_api_search.py``, answered by PostgreSQL storage with the same expectations
(the dataset in a schema of its own, dropped afterwards)."""

from __future__ import annotations

import pytest

import tests.integration.test_query_api_search as sqlite_module
from tests.integration.test_query_api import api as api
from tests.integration.test_query_api_postgres import dataset as dataset
from tests.integration.test_query_api_search import (
    test_a_cold_range_fills_in_over_a_few_queries as test_a_cold_range_fills_in_over_a_few_queries,
)
from tests.integration.test_query_api_search import (
    test_bad_search_parameters_are_400_naming_them as test_bad_search_parameters_are_400_naming_them,
)
from tests.integration.test_query_api_search import (
    test_bad_stats_parameters_are_400_naming_them as test_bad_stats_parameters_are_400_naming_them,
)
from tests.integration.test_query_api_search import (
    test_calls_sort_by_turn_latency_errors_and_duration as test_calls_sort_by_turn_latency_errors_and_duration,
)
from tests.integration.test_query_api_search import (
    test_new_parameters_never_answer_5xx as test_new_parameters_never_answer_5xx,
)
from tests.integration.test_query_api_search import (
    test_span_search_conditions as test_span_search_conditions,
)
from tests.integration.test_query_api_search import (
    test_span_search_finds_spans_with_their_trace_and_call as test_span_search_finds_spans_with_their_trace_and_call,
)
from tests.integration.test_query_api_search import (
    test_span_search_sees_only_the_keys_project as test_span_search_sees_only_the_keys_project,
)
from tests.integration.test_query_api_search import (
    test_span_search_time_range_and_paging as test_span_search_time_range_and_paging,
)
from tests.integration.test_query_api_search import (
    test_trace_search_says_which_spans_matched as test_trace_search_says_which_spans_matched,
)
from tests.integration.test_query_api_search import (
    test_trace_search_tags_and_service_contains as test_trace_search_tags_and_service_contains,
)
from tests.integration.test_query_api_search import (
    test_turn_stats_groups_by_model_and_tag_and_filters_by_tag as test_turn_stats_groups_by_model_and_tag_and_filters_by_tag,
)
from tests.integration.test_query_api_search import (
    test_turn_stats_per_bucket_and_group as test_turn_stats_per_bucket_and_group,
)
from tests.integration.test_query_api_search import (
    test_turn_stats_see_only_the_keys_project as test_turn_stats_see_only_the_keys_project,
)
from tests.integration.test_query_api_search import (
    test_unknown_api_paths_answer_json as test_unknown_api_paths_answer_json,
)

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


def test_every_search_scenario_runs_here() -> None:
    scenarios = {name for name in vars(sqlite_module) if name.startswith("test_")}
    here = {name for name in globals() if name.startswith("test_")}
    sqlite_only = {  # these read the SQLite file: its plans, its summary cache
        "test_span_search_walks_indexes",
        "test_sorts_filters_and_stats_see_spans_that_arrived_since_the_cache",
    }
    assert scenarios - sqlite_only - here == set()
