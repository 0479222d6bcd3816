"""Query API routes for a call's logs, metric points and session recording, and the
session page that shows them (``/session/{call_id}``: transcript, audio, evaluations and
logs on one timeline; ``collector/session_ui/``).

``GET /api/v1/calls/{call_id}/logs``, ``/metrics`` and ``/recording`` (the recording's
details as JSON; its audio, ``audio/ogg``, at ``/recording/audio``, served with HTTP
range requests). Each is guarded like the rest of the query API: a project sees only
its own calls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from collector.signals_storage import SQLiteSignalStore

__all__ = ["signal_routes"]

Guard = Callable[[Callable[[web.Request, str], Awaitable[Any]]], Any]


def signal_routes(store: SQLiteSignalStore, guard: Guard) -> list[web.RouteDef]:
    """The routes, each wrapped in the query API's ``guard`` (auth, errors, JSON)."""

    async def logs(request: web.Request, project: str) -> Any:
        call_id = request.match_info["call_id"]
        return {"call_id": call_id, "logs": await store.call_logs(project, call_id)}

    async def metrics(request: web.Request, project: str) -> Any:
        call_id = request.match_info["call_id"]
        return {"call_id": call_id, "metrics": await store.call_metrics(project, call_id)}

    async def recording(request: web.Request, project: str) -> Any:
        call_id = request.match_info["call_id"]
        found = await store.call_recording(project, call_id)
        if found is None:
            return _not_found(f"no recording of call {call_id!r}")
        found.pop("audio_path")
        found["call_id"] = call_id
        found["audio_url"] = (
            f"/api/v1/calls/{call_id}/recording/audio" if found["audio_size"] else None
        )
        return found

    async def audio(request: web.Request, project: str) -> Any:
        call_id = request.match_info["call_id"]
        found = await store.call_recording(project, call_id)
        path = None if found is None or not found["audio_path"] else Path(found["audio_path"])
        if path is None or not path.is_file():
            return _not_found(f"no recorded audio of call {call_id!r}")
        # FileResponse answers Range requests (206, Content-Range) and If-Range itself.
        return web.FileResponse(path, headers={"Content-Type": "audio/ogg"})

    return [
        web.get("/session/{call_id}", session_page),
        web.get("/session-ui/{file}", session_file),
        web.get("/api/v1/calls/{call_id}/logs", guard(logs)),
        web.get("/api/v1/calls/{call_id}/metrics", guard(metrics)),
        web.get("/api/v1/calls/{call_id}/recording", guard(recording)),
        web.get("/api/v1/calls/{call_id}/recording/audio", guard(audio)),
    ]


SESSION_UI = Path(__file__).parent / "session_ui"
_SESSION_FILES = {
    "session.html": "text/html",
    "session.js": "text/javascript",
    "session.css": "text/css",
}
# As the explorer's policy (collector/api.py), plus audio played from a Blob URL: the
# audio is fetched with the API key, which an <audio src> could not send.
_SESSION_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
    " media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'self';"
    " frame-ancestors 'none'"
)


def _session_response(name: str) -> web.Response:
    return web.Response(
        body=(SESSION_UI / name).read_bytes(),
        content_type=_SESSION_FILES[name],
        charset="utf-8",
        headers={
            "Content-Security-Policy": _SESSION_CSP,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )


async def session_page(request: web.Request) -> web.Response:
    """The session page of a call (its data comes from the API, with the explorer's key)."""
    return _session_response("session.html")


async def session_file(request: web.Request) -> web.Response:
    name = request.match_info["file"]
    if name not in _SESSION_FILES or name == "session.html":
        raise web.HTTPNotFound()
    return _session_response(name)


def _not_found(message: str) -> web.Response:
    return web.json_response({"error": message}, status=404)
