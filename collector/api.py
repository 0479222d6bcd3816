"""The query API (JSON over HTTP) and the explorer page, on every HTTP listener.

``routes_for(service, storage_id)`` is called by the service during start. It reads the
store of the exporter named ``service.query.storage`` (default: the first exporter
offering ``query_store()``) and authenticates with the ``auth`` processor of the
pipeline feeding that exporter, so the API takes the same Bearer keys as ingest and a
key sees only its project. Without an ``auth`` processor the API needs no key and shows
the data stored without a project, as ingest does.

Routes (``collector/openapi.py`` documents every field):

- ``GET /api/v1/calls``: calls, newest first, with their turn totals;
- ``GET /api/v1/calls/{call_id}``: a call's spans as a tree and its per-turn latency;
- ``GET /api/v1/traces``: trace search (semantics in ``collector/query.py``);
- ``GET /api/v1/traces/{trace_id}``: one trace as a tree;
- ``GET /api/v1/spans``: span search, each result with its trace and call;
- ``GET /api/v1/stats/turns``: turn latency percentiles and counts per time bucket;
- ``GET /api/v1/openapi.json``; ``GET /``: the explorer (``collector/ui/``).

Bad parameters answer 400 ``{"error": "NAME: ..."}`` (every parameter's type and range is
checked here, before a store sees it), no or an unknown key 401, unknown ids and unknown
paths under ``/api/`` 404 (``json_api_errors``), a store that cannot answer now
(``StorageUnavailableError``) 503 with Retry-After. Page cursors go out sealed and come
back checked (``collector/cursors.py``).
"""

from __future__ import annotations

import asyncio
import decimal
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from multidict import MultiMapping

from collector.components import RequestInfo, UnauthenticatedError
from collector.cursors import LazySeal
from collector.openapi import OPENAPI
from collector.query import (
    CALL_SORTS,
    DEFAULT_LIMIT,
    MAX_LIMIT,
    CallFilter,
    QueryError,
    QueryStore,
    SpanFilter,
    StorageUnavailableError,
    TraceFilter,
    build_tree,
    parse_time,
)
from collector.session_facts import OUTCOMES
from collector.turn_histograms import histogram_stats
from collector.turn_stats import parse_group_by, turn_stats
from collector.units import parse_duration

log = logging.getLogger(__name__)

__all__ = ["MAX_TEXT_CHARS", "QueryAPI", "json_api_errors", "routes_for"]

MAX_TEXT_CHARS = 4096
"""Longest text a filter or id may have (names, services, attribute keys and values)."""
_MAX_NS = 2**63 - 1

UI_DIR = Path(__file__).resolve().parent / "ui"
_UI_FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
# The page loads only its own files and talks only to this server.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
    " connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_CALL_PARAMS = {
    "start",
    "end",
    "limit",
    "cursor",
    "sort",
    "min_worst_turn_ms",
    "min_median_turn_ms",
    "min_e2e_p95_ms",
    "min_errors",
    "min_duration_ms",
    "outcome",
    "session_tag",
}
_STATS_PARAMS = {"start", "end", "step", "group_by", "source"}
_STATS_SOURCES = ("spans", "metrics")
_DAY_NS = 86_400 * 10**9
_SPAN_PARAMS = {"start", "end", "limit", "cursor", "service", "name", "min_duration_ms", "status"}
_TRACE_PARAMS = {
    "start",
    "end",
    "limit",
    "cursor",
    "service",
    "name",
    "name_contains",
    "min_duration_ms",
    "status",
}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def routes_for(service: Any, storage_id: str | None) -> list[web.RouteDef]:
    """The API and explorer routes reading ``storage_id``'s store (None: the first)."""
    exporter = _storage(service, storage_id)
    if exporter is None:
        log.info("query API off: no exporter offers queries")
        return []
    auth = _auth_processor(service, exporter.id)
    if auth is None:
        log.warning("query API: no auth processor feeds %s; the API needs no key", exporter.id)
    api = QueryAPI(exporter.query_store(), auth)
    routes = api.routes()
    if callable(getattr(exporter, "signal_store", None)):  # logs, metrics, recordings
        from collector.signals_api import signal_routes

        routes += signal_routes(exporter.signal_store(), api._guard)
    return routes


def _storage(service: Any, storage_id: str | None) -> Any:
    if storage_id is not None:
        exporter = service.exporters.get(storage_id)
        if exporter is None or not callable(getattr(exporter, "query_store", None)):
            raise RuntimeError(
                f"service.query.storage: {storage_id!r} is not an exporter that offers queries"
            )
        return exporter
    for exporter in service.exporters.values():
        if callable(getattr(exporter, "query_store", None)):
            return exporter
    return None


def _auth_processor(service: Any, exporter_id: str) -> Any:
    """The ``auth`` processor of a pipeline exporting to ``exporter_id`` (else any)."""
    from processors.auth import AuthProcessor

    candidates = [
        service.processors[processor_id]
        for pipeline in service.config.pipelines.values()
        if exporter_id in pipeline.exporters
        for processor_id in pipeline.processors
    ]
    candidates += list(service.processors.values())
    return next((p for p in candidates if isinstance(p, AuthProcessor)), None)


class QueryAPI:
    def __init__(self, store: QueryStore, auth: Any | None):
        self.store = store
        self.auth = auth
        self._cursors = LazySeal(store)
        self._ui = {name: (UI_DIR / name).read_bytes() for name in _UI_FILES}
        self._openapi = json.dumps(OPENAPI, indent=1).encode()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v1/calls", self._guard(self.list_calls)),
            web.get("/api/v1/calls/{call_id}", self._guard(self.get_call)),
            web.get("/api/v1/traces", self._guard(self.search_traces)),
            web.get("/api/v1/traces/{trace_id}", self._guard(self.get_trace)),
            web.get("/api/v1/spans", self._guard(self.search_spans)),
            web.get("/api/v1/stats/turns", self._guard(self.turn_stats)),
            web.get("/api/v1/openapi.json", self.openapi),
            web.get("/", self.page),
            web.get("/ui/{file}", self.ui_file),
        ]

    # -- authentication and errors ----------------------------------------------------

    async def _project(self, request: web.Request) -> str:
        if self.auth is None:
            return ""
        info = RequestInfo(
            headers={name.lower(): value for name, value in request.headers.items()},
            transport="http",
            peer=request.remote,
        )
        await self.auth.admit(info)
        return info.project or ""

    def _guard(self, handler: Callable[[web.Request, str], Awaitable[Any]]) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                project = await self._project(request)
            except UnauthenticatedError as exc:
                return _error(401, str(exc) or "unauthenticated", {"WWW-Authenticate": "Bearer"})
            try:
                request, endpoint = await self._open_cursor(request)
                body = await handler(request, project)
                if isinstance(body, dict) and isinstance(body.get("next_cursor"), str):
                    seal = await self._cursors.get()
                    body["next_cursor"] = seal.seal(endpoint, body["next_cursor"])
            except QueryError as exc:
                return _error(400, str(exc))
            except StorageUnavailableError as exc:
                log.warning("query failed: %s", exc)
                return _error(503, f"storage unavailable: {exc}", {"Retry-After": "1"})
            if isinstance(body, web.StreamResponse):
                return body
            return _json(200, body)

        return guarded

    async def _open_cursor(self, request: web.Request) -> tuple[web.Request, str]:
        """The request with its sealed ``cursor`` replaced by the store's cursor inside
        (``QueryError`` unless this API issued it for this endpoint), and the endpoint."""
        endpoint = request.match_info.route.resource.canonical  # type: ignore[union-attr]
        tokens = request.query.getall("cursor", [])
        if len(tokens) > 1:
            raise QueryError("cursor: given more than once")
        if not tokens or not tokens[0]:
            return request, endpoint
        seal = await self._cursors.get()
        cursor = seal.open(endpoint, tokens[0])
        return request.clone(rel_url=request.rel_url.update_query(cursor=cursor)), endpoint

    # -- endpoints --------------------------------------------------------------------

    async def list_calls(self, request: web.Request, project: str) -> Any:
        params = _Params(request.query, _CALL_PARAMS, ("attr.", "tag."))
        sort = params.text("sort") or "start"
        if sort not in CALL_SORTS:
            raise QueryError(f"sort: expected one of {', '.join(CALL_SORTS)}, got {sort!r}")
        outcome = params.text("outcome")
        if outcome is not None and outcome not in OUTCOMES:
            raise QueryError(
                f"outcome: expected one of {', '.join(OUTCOMES)}, got {outcome[:64]!r}"
            )
        query = CallFilter(
            start_ns=params.time("start"),
            end_ns=params.time("end"),
            attributes=params.prefixed("attr."),
            tags=params.prefixed("tag."),
            outcome=outcome,
            session_tag=params.text("session_tag"),
            sort=sort,
            min_worst_turn_ms=params.milliseconds("min_worst_turn_ms"),
            min_median_turn_ms=params.milliseconds("min_median_turn_ms"),
            min_e2e_p95_ms=params.milliseconds("min_e2e_p95_ms"),
            min_errors=params.whole_number("min_errors"),
            min_duration_ns=params.milliseconds_as_ns("min_duration_ms"),
            limit=params.limit(),
            cursor=params.text("cursor"),
        )
        _check_range(query.start_ns, query.end_ns)
        page = await self.store.calls(project, query)
        return {
            "calls": page.items,
            "next_cursor": page.next_cursor,
            "pending_summaries": page.pending_summaries,
        }

    async def get_call(self, request: web.Request, project: str) -> Any:
        _Params(request.query, set(), ())
        call_id = _checked_text("call_id", request.match_info["call_id"])
        found = await self.store.call(project, call_id)
        if found is None:
            return _error(404, f"no call {call_id!r}")
        return await asyncio.to_thread(_call_body, found)

    async def search_traces(self, request: web.Request, project: str) -> Any:
        params = _Params(request.query, _TRACE_PARAMS, ("attr.", "tag."))
        status = params.text("status")
        if status is not None and status not in ("error", "ok"):
            raise QueryError(f"status: expected error or ok, got {status!r}")
        query = TraceFilter(
            start_ns=params.time("start"),
            end_ns=params.time("end"),
            service=params.text("service"),
            name=params.text("name"),
            name_contains=params.text("name_contains"),
            attributes=params.prefixed("attr."),
            tags=params.prefixed("tag."),
            min_duration_ns=params.milliseconds_as_ns("min_duration_ms"),
            status=status,
            limit=params.limit(),
            cursor=params.text("cursor"),
        )
        _check_range(query.start_ns, query.end_ns)
        page = await self.store.traces(project, query)
        return {"traces": page.items, "next_cursor": page.next_cursor}

    async def search_spans(self, request: web.Request, project: str) -> Any:
        params = _Params(request.query, _SPAN_PARAMS, ("attr.", "tag."))
        status = params.text("status")
        if status is not None and status not in ("error", "ok"):
            raise QueryError(f"status: expected error or ok, got {status!r}")
        query = SpanFilter(
            start_ns=params.time("start"),
            end_ns=params.time("end"),
            name=params.text("name"),
            service=params.text("service"),
            attributes=params.prefixed("attr."),
            tags=params.prefixed("tag."),
            min_duration_ns=params.milliseconds_as_ns("min_duration_ms"),
            status=status,
            limit=params.limit(),
            cursor=params.text("cursor"),
        )
        _check_range(query.start_ns, query.end_ns)
        page = await self.store.spans(project, query)
        return {"spans": page.items, "next_cursor": page.next_cursor}

    async def turn_stats(self, request: web.Request, project: str) -> Any:
        params = _Params(request.query, _STATS_PARAMS, ("tag.",))
        end = params.time("end")
        if end is None:
            end = time.time_ns()
        start = params.time("start")
        if start is None:
            if end <= 0:
                raise QueryError("end: must be after 1970-01-01T00:00:00Z")
            start = max(0, end - _DAY_NS)
        _check_range(start, end)
        step_text = params.text("step")
        if step_text is None:
            step = max(1, -(-(end - start) // 24))
        else:
            try:
                step = round(parse_duration(step_text) * 1e9)
            except (ValueError, OverflowError):
                step = 0
            if not 0 < step <= _MAX_NS:
                raise QueryError(
                    f'step: expected a duration like "5m" or "1h", got {step_text[:64]!r}'
                )
        group_by = parse_group_by(params.text("group_by"))
        source = params.text("source") or "spans"
        if source not in _STATS_SOURCES:
            raise QueryError(
                f"source: expected one of {', '.join(_STATS_SOURCES)}, got {source[:64]!r}"
            )
        tags = params.prefixed("tag.")
        if source == "metrics":
            points = await self.store.turn_histograms(project, start)
            body = await asyncio.to_thread(
                histogram_stats,
                points,
                start_ns=start,
                end_ns=end,
                step_ns=step,
                group_by=group_by,
                tags=tags,
            )
            body["pending_summaries"] = 0
        else:
            found = await self.store.summaries(project, start, end)
            body = await asyncio.to_thread(
                turn_stats,
                found.calls,
                start_ns=start,
                end_ns=end,
                step_ns=step,
                group_by=group_by,
                tags=tags,
            )
            body["pending_summaries"] = found.pending
        body["source"] = source
        return body

    async def get_trace(self, request: web.Request, project: str) -> Any:
        _Params(request.query, set(), ())
        text = request.match_info["trace_id"]
        if not _HEX_ID.fullmatch(text):
            raise QueryError(f"trace_id: expected 32 hex digits, got {text!r}")
        found = await self.store.trace(project, bytes.fromhex(text))
        if found is None:
            return _error(404, f"no trace {text}")
        return await asyncio.to_thread(_trace_body, found)

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")

    async def page(self, request: web.Request) -> web.Response:
        return self._file("index.html")

    async def ui_file(self, request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name not in _UI_FILES:
            raise web.HTTPNotFound()
        return self._file(name)

    def _file(self, name: str) -> web.Response:
        return web.Response(
            body=self._ui[name],
            content_type=_UI_FILES[name],
            charset="utf-8",
            headers={
                "Content-Security-Policy": _CSP,
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )


# -- bodies (built off the event loop: trees of big calls take a while) -------------


def _call_body(found: dict[str, Any]) -> web.Response:
    summary = found["summary"]
    body = {
        "call": found["call"],
        "framework": summary["framework"],
        "turns": summary["turns"],
        "totals": summary["totals"],
        "tree": build_tree(found["spans"]),
        "resources": found["resources"],
    }
    return _json(200, body)


def _trace_body(found: dict[str, Any]) -> web.Response:
    body = {
        "trace_id": found["trace"]["trace_id"],
        "trace": found["trace"],
        "tree": build_tree(found["spans"]),
        "resources": found["resources"],
    }
    return _json(200, body)


@web.middleware
async def json_api_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Under ``/api/``, aiohttp's plain-text 404 and 405 become JSON errors like every
    other API answer; elsewhere they pass unchanged."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        if not request.path.startswith("/api/"):
            raise
        return _error(404, f"no API endpoint {request.path} (see /api/v1/openapi.json)")
    except web.HTTPMethodNotAllowed as exc:
        if not request.path.startswith("/api/"):
            raise
        allowed = ", ".join(sorted(exc.allowed_methods))
        return _error(
            405,
            f"{request.method} is not allowed on {request.path}; use {allowed}",
            {"Allow": allowed},
        )


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type="application/json",
        headers=headers,
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json(status, {"error": message}, headers)


def _check_range(start: int | None, end: int | None) -> None:
    if start is not None and end is not None and start >= end:
        raise QueryError("start: must be before end")


class _Params:
    """Query string parameters, checked: unknown or repeated names are errors."""

    def __init__(self, query: MultiMapping[str], names: set[str], prefixes: tuple[str, ...]):
        self.query = query
        for name in set(query.keys()):
            if name.startswith(prefixes) and name not in prefixes:
                continue
            if name not in names:
                known = sorted(names) + [f"{p}KEY" for p in prefixes]
                raise QueryError(
                    f"{name}: unknown parameter (expected one of {', '.join(known) or 'none'})"
                )
            if len(query.getall(name)) > 1:
                raise QueryError(f"{name}: given more than once")

    def text(self, name: str) -> str | None:
        """The value, None when absent or empty; ``QueryError`` unless it is text a
        store can hold (no NUL, at most ``MAX_TEXT_CHARS``)."""
        value = self.query.get(name)
        return _checked_text(name, value) if value else None

    def time(self, name: str) -> int | None:
        value = self.text(name)
        return None if value is None else parse_time(name, value)

    def milliseconds_as_ns(self, name: str) -> int | None:
        """A duration in milliseconds (a plain decimal, ``12.5``) as nanoseconds, within
        what a signed 64-bit column holds."""
        value = self.text(name)
        if value is None:
            return None
        ns = None
        if len(value) <= 32 and _DECIMAL.fullmatch(value):
            ns = math.ceil(decimal.Decimal(value) * 1_000_000)
        if ns is None or ns > _MAX_NS:
            raise QueryError(
                f"{name}: expected milliseconds from 0 to {_MAX_NS / 1e6:.0f}, like 250 or"
                f" 12.5, got {value[:64]!r}"
            )
        return ns

    def milliseconds(self, name: str) -> float | None:
        """A duration in milliseconds (``milliseconds_as_ns``), as milliseconds."""
        ns = self.milliseconds_as_ns(name)
        return None if ns is None else ns / 1e6

    def whole_number(self, name: str) -> int | None:
        """A count: a whole number from 0 to 2**31 - 1."""
        value = self.text(name)
        if value is None:
            return None
        if not (len(value) <= 10 and _DIGITS.fullmatch(value) and int(value) < 2**31):
            raise QueryError(f"{name}: expected a whole number from 0, got {value[:64]!r}")
        return int(value)

    def limit(self) -> int:
        value = self.text("limit")
        if value is None:
            return DEFAULT_LIMIT
        if not (len(value) <= 8 and _DIGITS.fullmatch(value) and 1 <= int(value) <= MAX_LIMIT):
            raise QueryError(
                f"limit: expected a whole number from 1 to {MAX_LIMIT}, got {value[:64]!r}"
            )
        return int(value)

    def prefixed(self, prefix: str) -> list[tuple[str, str]]:
        """``(KEY, VALUE)`` of each ``PREFIXKEY=VALUE``, repeats kept (all must hold)."""
        return [
            (_checked_text(name, name[len(prefix) :]), _checked_text(name, value))
            for name, value in self.query.items()
            if name.startswith(prefix) and len(name) > len(prefix)
        ]


_DIGITS = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")
_HEX_ID = re.compile(r"[0-9a-fA-F]{32}")


def _checked_text(name: str, value: str) -> str:
    """``value`` unless a store could not hold it: ``QueryError`` naming ``name``."""
    if len(value) > MAX_TEXT_CHARS:
        raise QueryError(f"{name}: longer than {MAX_TEXT_CHARS} characters")
    if "\0" in value:
        raise QueryError(f"{name}: must not contain a NUL character")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise QueryError(f"{name}: not valid Unicode text") from None
    return value
