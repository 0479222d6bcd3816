"""Every query API parameter, probed with malformed values, on SQLite and PostgreSQL.

Whatever a client sends, the API answers 4xx with a JSON ``{"error": ...}`` that names
the parameter, never 5xx; the next good request is still answered. Cursors are sealed
(``collector/cursors.py``): one the API did not issue, or issued for another endpoint,
is refused, and one issued by one instance is accepted by another sharing the store.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from collector.query import encode_cursor
from tests.query_dataset import Dataset, make_dataset
from tests.support import free_port, postgres_execute, running_service

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def dataset(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Dataset]:
    if request.param == "sqlite":
        yield make_dataset(tmp_path_factory.mktemp("probe"))
        return
    schema = f"ct_probe_{uuid.uuid4().hex[:12]}"
    postgres_execute("SELECT 1")  # skip (or fail in CI) before ingesting anything
    try:
        yield make_dataset(tmp_path_factory.mktemp("probe_pg"), postgres_schema=schema)
    finally:
        postgres_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


class Client:
    def __init__(self, base: str, session: aiohttp.ClientSession, key: str):
        self.base, self.session, self.key = base, session, key

    async def get_raw(self, path_and_query: str) -> tuple[int, str, Any]:
        """GET a path and query string sent exactly as given (already percent-encoded)."""
        url = aiohttp.client.URL(self.base + path_and_query, encoded=True)
        headers = {"Authorization": f"Bearer {self.key}"}
        async with self.session.get(url, headers=headers) as response:
            content_type = response.headers.get("Content-Type", "")
            body = await response.json() if content_type.startswith("application/json") else None
            return response.status, content_type, body

    async def get(self, path: str, params: dict[str, str]) -> tuple[int, str, Any]:
        query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items())
        return await self.get_raw(path + ("?" + query if query else ""))


@pytest.fixture
async def client(dataset: Dataset) -> AsyncIterator[Client]:
    port = free_port()
    async with running_service(dataset.config(port)), aiohttp.ClientSession() as session:
        yield Client(f"http://127.0.0.1:{port}", session, dataset.key)


def _nested(depth: int) -> str:
    return base64.urlsafe_b64encode(b"[" * depth + b"]" * depth).decode().rstrip("=")


TEXT_VALUES = [
    "a\x00b",
    "\x00",
    "\ud800",  # a lone surrogate, sent as its UTF-8-ish bytes below
    "x" * 7000,
    "\u202e\u0000",
    "' OR 1=1 --",
    "%",
    "\\",
    "\U0001f600" * 100,
]
"""Values every text parameter is probed with (most may be answered 200: empty pages)."""

NUMBER_VALUES = [
    " ",
    "0" * 5000,
    "9" * 5000,
    "1" * 4301,
    "99999999999999999999",
    "9223372036854775808",
    "-9223372036854775809",
    "-1",
    "-0",
    "1e400",
    "1e18",
    "9.3e15",
    "nan",
    "inf",
    "-inf",
    "0x10",
    "1_000",
    "²",
    "١٢٣",
    "1.5",
    "true",
    "[]",
    "{}",
]
TIME_VALUES = [
    *NUMBER_VALUES,
    "2026-13-45T99:99:99Z",
    "2026-02-30T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "0001-01-01T00:00:00Z",
    "1969-12-31T23:59:59Z",
    "2262-04-11T23:47:16.854775808Z",
    "2026-11-24T10:00:00.1234567891Z",
    "2026-11-24T10:00:00+99:99",
    "2026-11-24T10:00:00",
    "2026-11-24",
]
CURSOR_VALUES = [
    " ",
    "%%%",
    ".",
    "..",
    "a.b",
    "a.b.c",
    "x" * 7000,
    _nested(3000),
    _nested(100),
    encode_cursor([2**70, "c"]),
    encode_cursor([1, "c"]),  # the right shape, but not sealed by the API
    encode_cursor([1, "0" * 32]),
    encode_cursor(["x", 1]),
    encode_cursor([]),
    base64.urlsafe_b64encode(b"1" * 5000).decode(),
    "\x00",
    "\ud800",
]

PARAMETERS: dict[str, dict[str, list[str]]] = {
    "/api/v1/calls": {
        "start": TIME_VALUES,
        "end": TIME_VALUES,
        "limit": [*NUMBER_VALUES, "0", "1001", "5000"],
        "cursor": CURSOR_VALUES,
        "attr.service.name": TEXT_VALUES,
        "tag.customer": TEXT_VALUES,
    },
    "/api/v1/traces": {
        "start": TIME_VALUES,
        "end": TIME_VALUES,
        "limit": [*NUMBER_VALUES, "0", "1001"],
        "cursor": CURSOR_VALUES,
        "service": TEXT_VALUES,
        "name": TEXT_VALUES,
        "name_contains": TEXT_VALUES,
        "attr.gen_ai.request.model": TEXT_VALUES,
        "min_duration_ms": [v for v in NUMBER_VALUES if v != "1.5"] + ["9223372036854.775808"],
        "status": TEXT_VALUES + NUMBER_VALUES,
    },
}
MUST_REFUSE = {"start", "end", "limit", "cursor", "min_duration_ms", "status"}
"""Parameters for which every probe value above is wrong (400); text filters may match
nothing instead (200, an empty page) unless the value cannot be a stored text. An empty
value is no value (the explorer sends blank filters so)."""


def _encode(value: str) -> str:
    """Percent-encode ``value``; a lone surrogate becomes the bytes CESU would send."""
    return quote(value.encode("utf-8", "surrogatepass"), safe="")


async def probe(client: Client, path: str, name: str, value: str) -> str | None:
    """What is wrong with the answer to ``path?name=value``, or None."""
    status, content_type, body = await client.get_raw(f"{path}?{_encode(name)}={_encode(value)}")
    shown = f"{path}?{name}={value[:40]!r}"
    if status >= 500 or not content_type.startswith("application/json"):
        return f"{shown} answered {status} {content_type}"
    if status == 200:
        return f"{shown} answered 200" if name in MUST_REFUSE else None
    if not 400 <= status < 500 or not body["error"].startswith(f"{name}:"):
        return f"{shown} answered {status} {body}"
    return None


@pytest.mark.parametrize("path", sorted(PARAMETERS))
async def test_every_malformed_parameter_is_4xx_json_naming_it(client: Client, path: str) -> None:
    wrong = [
        problem
        for name, values in PARAMETERS[path].items()
        for value in values
        if (problem := await probe(client, path, name, value))
    ]
    assert not wrong, "\n".join(wrong)
    status, _, body = await client.get(path, {"limit": "1"})
    assert status == 200, body


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/calls/" + "x" * 7000,
        "/api/v1/calls/%00",
        "/api/v1/calls/a%00b",
        "/api/v1/calls/%ED%A0%80",
        "/api/v1/calls/%FF",
        "/api/v1/calls/%F0%9F%98%80",
        "/api/v1/traces/" + "0" * 5000,
        "/api/v1/traces/%00" * 16,
        "/api/v1/traces/%ED%A0%80",
        "/api/v1/traces/" + "g" * 32,
        "/api/v1/traces/" + quote("\u0661" * 32),
    ],
)
async def test_malformed_ids_are_4xx_json(client: Client, path: str) -> None:
    status, content_type, body = await client.get_raw(path)
    assert 400 <= status < 500 and content_type.startswith("application/json"), (status, body)
    assert body["error"]


@pytest.mark.parametrize(
    "path,status",
    [
        ("/api/", 404),
        ("/api/v1", 404),
        ("/api/v1/", 404),
        ("/api/v2/calls", 404),
        ("/api/v1/nothing", 404),
        ("/api/v1/calls/x/spans/y", 404),
    ],
)
async def test_unknown_api_paths_answer_json_404(client: Client, path: str, status: int) -> None:
    got, content_type, body = await client.get_raw(path)
    assert got == status and content_type.startswith("application/json")
    assert path.rstrip("/") in body["error"] or "no API endpoint" in body["error"]


async def test_a_method_other_than_get_is_json_405(client: Client) -> None:
    async with client.session.post(client.base + "/api/v1/calls", data=b"{}") as response:
        assert response.status == 405
        assert "GET" in response.headers["Allow"]
        assert "error" in await response.json()


async def test_cursors_are_sealed_per_endpoint_and_shared_by_instances(dataset: Dataset) -> None:
    """A cursor from one instance pages on at another sharing the store; a calls cursor
    is refused by traces; a cursor with one character changed is refused."""
    ports = free_port(), free_port()
    async with (
        running_service(dataset.config(ports[0])),
        running_service(dataset.config(ports[1])),
        aiohttp.ClientSession() as session,
    ):
        first, second = (Client(f"http://127.0.0.1:{port}", session, dataset.key) for port in ports)
        for path, field in (("/api/v1/calls", "calls"), ("/api/v1/traces", "traces")):
            status, _, page = await first.get(path, {"limit": "2"})
            assert status == 200 and page["next_cursor"], page
            cursor = page["next_cursor"]
            status, _, following = await second.get(path, {"limit": "2", "cursor": cursor})
            assert status == 200, following
            status, _, again = await first.get(path, {"limit": "2", "cursor": cursor})
            assert again[field] == following[field]
            assert not {str(i) for i in page[field]} & {str(i) for i in following[field]}

            changed = cursor[:-1] + ("A" if cursor[-1] != "A" else "B")
            status, _, body = await second.get(path, {"limit": "2", "cursor": changed})
            assert status == 400 and body["error"].startswith("cursor:"), body
            other = "/api/v1/traces" if path == "/api/v1/calls" else "/api/v1/calls"
            status, _, body = await second.get(other, {"limit": "2", "cursor": cursor})
            assert status == 400 and body["error"].startswith("cursor:"), body
