"""OTLP/HTTP: ``POST /v1/traces`` with protobuf or JSON bodies, on an aiohttp server.

The listener also serves every route the service offers (``/healthz``, ``/metrics``,
the query API), so one port answers both. A request is handled in the order the OTLP
specification and our design ask for, cheapest refusal first:

1. ``admit`` on the headers alone (auth): 401, or 503/429 with ``Retry-After``;
2. ``Content-Type``: ``application/x-protobuf`` or ``application/json``, else 415;
3. size: ``Content-Length`` above the limit is refused unread (413);
4. the body is read as it arrives, with the size cap and within ``read_timeout`` (408
   after it), holding nothing other requests wait for: no turn, no budget share;
5. a turn (``max_concurrent_requests``) and a budget share (``max_concurrent_bytes``):
   gzip/deflate is inflated in a worker thread with the size cap (a gzip bomb gets 413,
   more than ``MAX_GZIP_MEMBERS`` members 400), the body is decoded (400 when
   malformed), spans with invalid ids are dropped (``partial_success``), the rest is
   handed to the pipeline;
6. 200 with an ``ExportTraceServiceResponse`` in the request's encoding.

Error bodies are ``google.rpc.Status`` messages in the request's encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import math
import os
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2

from collector import otlp_json
from collector.api import json_api_errors
from collector.components import RefusedError, RequestInfo, UnauthenticatedError
from collector.otlp_json import OTLPJSONError, decode_request_wire
from collector.receivers.otlp import HTTPSettings, SignalIngest, TraceIngest
from collector.spans import ExportTraceServiceRequest
from collector.tls import parse_endpoint, server_ssl_context

log = logging.getLogger(__name__)

__all__ = ["MAX_GZIP_MEMBERS", "HTTPListener"]

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_CONTENT_TYPES = {PROTOBUF: PROTOBUF, JSON: JSON}
_DRAIN_TIMEOUT = 30.0
"""Seconds ``shutdown`` waits for in-flight requests (they are waiting on the pipeline)."""
MAX_GZIP_MEMBERS = 64
"""Most gzip members one body may hold (clients send one; each costs a fresh inflater)."""
_INLINE_INFLATE_BYTES = 16 * 1024
"""Compressed bodies up to this size inflate on the event loop (a few milliseconds at
most: inflating stops at ``max_request_body_size``); larger ones in a worker thread, so
the loop keeps answering."""


class BodyBudget:
    """At most ``limit`` bytes of requests in hand at once: ``hold(size)`` waits its turn,
    first come first served, and a size above the whole budget is held alone. A waiter
    that gives up (its client went away) takes no share. The share held can be resized
    (``Share.resize``) once the request's real size is known."""

    class Share:
        __slots__ = ("_budget", "size")

        def __init__(self, budget: BodyBudget, size: int):
            self._budget = budget
            self.size = size

        def resize(self, size: int) -> None:
            """Hold ``size`` bytes from now on (a decoded body's own size); a share that
            shrinks lets the next waiters in, one that grows may exceed the budget (the
            request is decoded already)."""
            budget = self._budget
            size = min(max(size, 0), budget.limit)
            budget.used += size - self.size
            shrunk, self.size = size < self.size, size
            if shrunk:
                budget._grant()

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[BodyBudget.Share]:
        size = min(max(size, 0), self.limit)
        if self._waiting or self.used + size > self.limit:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append((size, turn))
            try:
                await turn
            except asyncio.CancelledError:
                if turn.done() and not turn.cancelled():  # granted, then cancelled
                    self._release(size)
                else:
                    self._grant()  # it may have been first in line
                raise
        else:
            self.used += size
        share = BodyBudget.Share(self, size)
        try:
            yield share
        finally:
            self._release(share.size)

    def _release(self, size: int) -> None:
        self.used -= size
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            size, turn = self._waiting[0]
            if turn.done():  # cancelled while waiting
                self._waiting.popleft()
                continue
            if self.used and self.used + size > self.limit:
                return
            self._waiting.popleft()
            self.used += size
            turn.set_result(None)


class HTTPListener:
    """One aiohttp server for the traces paths plus the service's routes."""

    def __init__(self, receiver_id: str, settings: HTTPSettings, ingest: TraceIngest):
        self.receiver_id = receiver_id
        self.settings = settings
        self.ingest = ingest
        self.port: int | None = None
        """The port listened on (useful with port 0), once started."""
        self._runner: web.AppRunner | None = None
        self._in_flight = asyncio.Semaphore(settings.max_concurrent_requests)
        self._bodies = BodyBudget(settings.max_concurrent_bytes)
        self._bytes_read = 0
        """Bytes of bodies being read or read and waiting for a turn (not yet budgeted)."""
        self._max_bytes_read = settings.max_concurrent_requests * settings.max_request_body_size
        """Above this, more body bytes are refused with 503 rather than held in memory."""
        self._inflaters: ThreadPoolExecutor | None = None
        self.signal_paths: dict[str, SignalIngest] = {}
        """Logs and metrics paths (``/v1/logs``) and their ingest, set before ``start``."""

    async def start(self, routes: list[Any]) -> None:
        settings = self.settings
        host, port = parse_endpoint(settings.endpoint)
        where = f"{self.receiver_id}: OTLP/HTTP on {settings.endpoint}"
        try:
            ssl_context = server_ssl_context(settings.tls) if settings.tls else None
        except ValueError as exc:
            raise RuntimeError(f"{where}: {exc}") from None

        # Other routes read bodies with aiohttp's own limit; keep it above ours.
        app = web.Application(
            client_max_size=max(settings.max_request_body_size + 1, 1024 * 1024),
            middlewares=[json_api_errors],
        )
        for path in settings.traces_paths:
            app.router.add_post(path, self._export)
        for path, signal_ingest in self.signal_paths.items():
            app.router.add_post(path, functools.partial(self._export_signal, signal_ingest))
        app.add_routes(routes)
        runner = web.AppRunner(
            app,
            access_log=None,  # one log line per export request would cost more than parsing it
            auto_decompress=False,  # we inflate with a size cap; aiohttp's is unbounded per chunk
            shutdown_timeout=_DRAIN_TIMEOUT,
        )
        await runner.setup()
        site = web.TCPSite(
            runner,
            host or None,  # ":4318" listens on every interface
            port,
            ssl_context=ssl_context,
            backlog=1024,
            reuse_port=bool(os.environ.get("CALLTRACE_WORKER")),  # workers share the port
        )
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc
            raise RuntimeError(f"{where}: cannot listen: {reason}") from None
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info(
            "%s: OTLP/HTTP%s listening on %s:%d %s",
            self.receiver_id,
            "S" if ssl_context else "",
            host or "*",
            self.port,
            settings.traces_paths,
        )

    async def shutdown(self) -> None:
        """Close the listening socket, wait for in-flight requests, close connections."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        inflaters, self._inflaters = self._inflaters, None
        if inflaters is not None:
            inflaters.shutdown(wait=False)

    # -- the export handler ---------------------------------------------------------

    async def _export(self, request: web.Request) -> web.Response:
        response = await self._handle(request)
        self.ingest.answered(response.status)
        return response

    async def _export_signal(self, ingest: SignalIngest, request: web.Request) -> web.Response:
        response = await self._handle(request, ingest)
        ingest.answered(response.status)
        return response

    async def _handle(
        self, request: web.Request, ingest: TraceIngest | SignalIngest | None = None
    ) -> web.Response:
        ingest = ingest or self.ingest
        content_type = _CONTENT_TYPES.get(request.content_type)  # parameters are ignored
        reply_as = content_type or PROTOBUF
        length = request.content_length
        info = RequestInfo(
            headers={name.lower(): value for name, value in request.headers.items()},
            transport="http",
            peer=request.remote,
            body_size=length or 0,
        )
        try:
            await ingest.admit(info)
        except UnauthenticatedError as exc:
            return _error(
                reply_as, 401, str(exc) or "unauthenticated", {"WWW-Authenticate": "Bearer"}
            )
        except RefusedError as exc:
            return _refused(reply_as, exc)
        except Exception:
            log.exception("%s: admitting a request failed", self.receiver_id)
            return _unavailable(reply_as)

        if content_type is None:
            return _error(
                reply_as,
                415,
                f"unsupported content type {request.content_type!r}; expected {PROTOBUF} or {JSON}",
            )
        limit = self.settings.max_request_body_size
        if length is not None and length > limit:
            return _too_large(reply_as, limit)
        coding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if coding not in _DECODERS:
            return _error(reply_as, 415, f"unsupported content encoding {coding!r}; expected gzip")
        try:
            async with asyncio.timeout(self.settings.read_timeout):
                body = await self._read_body(request, limit)
        except TimeoutError:
            return _timed_out(reply_as, self.settings.read_timeout)
        except _Crowded:
            return _refused(reply_as, RefusedError("too many request bodies in hand"))
        if body is None:
            return _too_large(reply_as, limit)
        # The body counts in ``_bytes_read`` until its turn, then in the budget: as its
        # own size until decoded, then as its protobuf bytes.
        counted = len(body)
        try:
            async with self._in_flight, self._bodies.hold(counted) as share:
                self._bytes_read -= counted
                counted = 0
                return await self._decode_and_export(
                    body, info, content_type, reply_as, coding, share, ingest
                )
        finally:
            self._bytes_read -= counted

    async def _decode_and_export(
        self,
        body: bytes,
        info: RequestInfo,
        content_type: str,
        reply_as: str,
        coding: str,
        share: BodyBudget.Share,
        ingest: TraceIngest | SignalIngest | None = None,
    ) -> web.Response:
        ingest = ingest or self.ingest
        limit = self.settings.max_request_body_size
        inflate = _DECODERS[coding]
        if inflate is not None:
            try:
                body = await self._inflate(inflate, body, limit)
            except _TooLarge:
                return _too_large(reply_as, limit, decompressed=True)
            except _TooManyMembers:
                return _error(
                    reply_as,
                    400,
                    f"{coding} body has more than {MAX_GZIP_MEMBERS} members; send one",
                )
            except zlib.error as exc:
                return _error(reply_as, 400, f"invalid {coding} body: {exc}")

        try:
            if isinstance(ingest, SignalIngest):  # logs, metrics
                export_request, body = ingest.decode(body, content_type == JSON)
            elif content_type == PROTOBUF:
                export_request = ExportTraceServiceRequest()
                export_request.ParseFromString(body)
            else:  # from here on, the protobuf bytes it was parsed from stand for it
                export_request, body = decode_request_wire(body)
        except (DecodeError, OTLPJSONError) as exc:
            log.debug("%s: malformed request from %s: %s", self.receiver_id, info.peer, exc)
            return _error(reply_as, 400, f"malformed {content_type} request: {exc}")
        share.resize(len(body))

        try:
            result = await ingest.export(export_request, info, body)  # type: ignore[arg-type]
        except RefusedError as exc:
            return _refused(reply_as, exc)
        except Exception:
            # The data was not stored; 503 (not 500) so that clients retry it.
            log.exception("%s: the pipeline failed on a request", self.receiver_id)
            return _unavailable(reply_as)
        if reply_as == PROTOBUF:
            return web.Response(body=result.SerializeToString(), content_type=PROTOBUF)
        return web.Response(body=otlp_json.encode(result), content_type=JSON)

    async def _read_body(self, request: web.Request, limit: int) -> bytes | None:
        """The body as it arrives, or None once it grows past ``limit`` (the rest is
        left unread). Its bytes count in ``_bytes_read`` (the caller's to release once
        it returns a body); ``_Crowded`` when they would pass ``_max_bytes_read``."""
        chunks: list[bytes] = []
        size = 0
        stream = request.content
        try:
            while True:
                chunk = await stream.readany()
                if not chunk:
                    body = b"".join(chunks)
                    size = 0  # the caller's now
                    return body
                if size + len(chunk) > limit:
                    return None
                if self._bytes_read + len(chunk) > self._max_bytes_read:
                    raise _Crowded
                size += len(chunk)
                self._bytes_read += len(chunk)
                chunks.append(chunk)
        finally:
            self._bytes_read -= size

    async def _inflate(
        self, inflate: Callable[[bytes, int], bytes], body: bytes, limit: int
    ) -> bytes:
        """``inflate(body, limit)``; in a worker thread unless the body is small."""
        if len(body) <= _INLINE_INFLATE_BYTES:
            return inflate(body, limit)
        if self._inflaters is None:
            self._inflaters = ThreadPoolExecutor(
                max_workers=2, thread_name_prefix=f"{self.receiver_id}-inflate"
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._inflaters, functools.partial(inflate, body, limit))


class _Crowded(Exception):
    """Bodies being read already hold as many bytes as the listener allows."""


class _TooManyMembers(Exception):
    pass


class _TooLarge(Exception):
    pass


def _inflate(body: bytes, limit: int, wbits: int = zlib.MAX_WBITS | 32) -> bytes:
    """Decompress gzip (up to ``MAX_GZIP_MEMBERS`` members) or zlib data, never past
    ``limit`` bytes: ``_TooLarge`` above it, ``_TooManyMembers``, ``zlib.error``."""
    parts = []
    total = 0
    data = body
    for _ in range(MAX_GZIP_MEMBERS):
        inflater = zlib.decompressobj(wbits)
        part = inflater.decompress(data, limit - total + 1)
        total += len(part)
        if total > limit:
            raise _TooLarge
        if not inflater.eof:
            raise zlib.error("truncated data")
        parts.append(part)
        data = inflater.unused_data
        if not data:
            return b"".join(parts)
    raise _TooManyMembers


def _inflate_deflate(body: bytes, limit: int) -> bytes:
    """HTTP ``deflate`` is zlib-wrapped, but some clients send raw deflate."""
    try:
        return _inflate(body, limit)
    except zlib.error:
        return _inflate(body, limit, -zlib.MAX_WBITS)


_DECODERS = {
    "identity": None,
    "": None,
    "gzip": _inflate,
    "x-gzip": _inflate,
    "deflate": _inflate_deflate,
}

# -- error answers: google.rpc.Status in the request's encoding ---------------------

_RPC_CODES = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    408: code_pb2.DEADLINE_EXCEEDED,
    413: code_pb2.INVALID_ARGUMENT,
    415: code_pb2.INVALID_ARGUMENT,
    429: code_pb2.RESOURCE_EXHAUSTED,
    503: code_pb2.UNAVAILABLE,
}


def _error(
    encoding: str,
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    retry_after: int | None = None,
) -> web.Response:
    rpc_status = status_pb2.Status(code=_RPC_CODES.get(status, code_pb2.UNKNOWN), message=message)
    if retry_after is not None:
        rpc_status.details.add().Pack(
            error_details_pb2.RetryInfo(retry_delay=Duration(seconds=retry_after))
        )
    if encoding == JSON:
        body = json_format.MessageToJson(rpc_status, indent=None).encode()
    else:
        body = rpc_status.SerializeToString()
    return web.Response(status=status, body=body, content_type=encoding, headers=headers)


def _refused(encoding: str, exc: RefusedError) -> web.Response:
    retry_after = max(0, math.ceil(exc.retry_after))
    return _error(
        encoding,
        429 if exc.throttled else 503,
        str(exc) or "refused, retry later",
        {"Retry-After": str(retry_after)},
        retry_after,
    )


def _unavailable(encoding: str) -> web.Response:
    return _refused(encoding, RefusedError("internal error; the data was not stored"))


def _timed_out(encoding: str, read_timeout: float) -> web.Response:
    response = _error(
        encoding, 408, f"the body did not arrive within read_timeout ({read_timeout:g}s)"
    )
    response.force_close()  # the rest of the body is not read: no keep-alive
    return response


def _too_large(encoding: str, limit: int, decompressed: bool = False) -> web.Response:
    what = "decompressed body" if decompressed else "body"
    return _error(encoding, 413, f"{what} larger than max_request_body_size ({limit} bytes)")
