"""The ``livekit_webhook`` receiver: LiveKit's room events recorded on the call.

LiveKit (server or Cloud) POSTs webhook events to ``/webhooks/livekit`` with a signed
token in the ``Authorization`` header: an HS256 JWT made with the API secret, whose
issuer is the API key and whose ``sha256`` claim is the base64 SHA-256 of the body.
The receiver checks both before reading the event, then records ``room_started`` and
``room_finished`` (room SID, name, metadata, times) on the call the room SID names,
the same call the ``correlate`` processor links the room's spans to. A room whose
metadata (a JSON object) carries ``roark.skip`` true marks the call skipped, and
``correlate`` then drops the call's spans.

Config::

    receivers:
      livekit_webhook:
        api_key: ${env:LIVEKIT_API_KEY}
        api_secret: ${env:LIVEKIT_API_SECRET}
        project: my-agents          # the project the rooms' calls belong to
        store: ./data/calltrace.db  # or redis: {url: ...}, as for correlate

It is served on the OTLP/HTTP listener's port (list it in a pipeline's receivers).
Answers: 200 ``{}``, 401 for a missing, invalid, expired or mismatched token, 400 for
a body that is not a webhook event, 503 when the call store is unavailable.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from pydantic import Field, SecretStr

from collector.calls import CallStore, RoomEvent, SQLiteCallStore, call_id_for
from collector.components import ComponentConfig, Consumer, Host, Receiver
from collector.units import Duration

log = logging.getLogger(__name__)

__all__ = ["LiveKitWebhookConfig", "LiveKitWebhookReceiver", "room_metadata_skips"]

_MAX_BODY = 1024 * 1024
_ROOM_EVENTS = {"room_started", "room_finished"}


class LiveKitWebhookConfig(ComponentConfig):
    api_key: str = Field(min_length=1)
    """The LiveKit API key the webhook tokens are issued by."""
    api_secret: SecretStr
    """The API secret that signs them."""
    project: str = Field(default="", max_length=200)
    """Project of the calls (as the ``auth`` key's project); empty without auth."""
    path: str = Field(default="/webhooks/livekit", pattern=r"^/")
    store: Path | None = Path("./data/calltrace.db")
    """The call store (SQLite file) shared with ``correlate``."""
    skip_attributes: list[str] = Field(default_factory=lambda: ["roark.skip"])
    """Keys in the room metadata (a JSON object) that mark the call skipped."""
    leeway: Duration = 60.0
    """Clock skew allowed when checking the token's expiry."""


def room_metadata_skips(metadata: str, keys: list[str]) -> bool:
    """Whether room metadata (JSON text) sets one of ``keys`` to true or "true"."""
    try:
        document = json.loads(metadata) if metadata else None
    except ValueError:
        return False
    if not isinstance(document, dict):
        return False
    for key in keys:
        value = document.get(key)
        if value is True or (isinstance(value, str) and value.strip().lower() == "true"):
            return True
    return False


class LiveKitWebhookReceiver(Receiver):
    type_name = "livekit_webhook"
    Config = LiveKitWebhookConfig
    config: LiveKitWebhookConfig

    def __init__(self, component_id: str, config: LiveKitWebhookConfig, consumer: Consumer):
        super().__init__(component_id, config, consumer)
        self.store: CallStore | None = None

    def make_store(self) -> CallStore | None:
        return SQLiteCallStore(self.config.store) if self.config.store is not None else None

    def routes(self) -> list[Any]:
        return [web.post(self.config.path, self._receive)]

    async def start(self, host: Host) -> None:
        if self.store is None:
            self.store = self.make_store()
            if self.store is not None:
                await self.store.start()

    async def shutdown(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            await store.close()

    def verify(self, token: str, body: bytes) -> dict[str, Any]:
        """The token's claims; raises ``jwt.InvalidTokenError`` unless LiveKit signed it
        for this very body."""
        claims: dict[str, Any] = jwt.decode(
            token,
            self.config.api_secret.get_secret_value(),
            algorithms=["HS256"],
            leeway=self.config.leeway,
            options={"verify_aud": False},
        )
        if not hmac.compare_digest(str(claims.get("iss", "")), self.config.api_key):
            raise jwt.InvalidIssuerError("token not issued by the configured API key")
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        claimed = claims.get("sha256")
        if not isinstance(claimed, str) or not hmac.compare_digest(claimed, digest):
            raise jwt.InvalidTokenError("the body does not match the token's sha256")
        return claims

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.content.read(_MAX_BODY + 1)
        if len(body) > _MAX_BODY:
            return _answer(413, "webhook body too large")
        token = request.headers.get("Authorization", "").strip()
        if token.lower().startswith("bearer "):
            token = token[7:].strip()
        if not token:
            return _answer(401, "missing webhook token")
        try:
            self.verify(token, body)
        except jwt.InvalidTokenError as exc:
            log.warning("%s: refused a webhook: %s", self.id, exc)
            return _answer(401, f"invalid webhook token: {exc}")
        try:
            event = json.loads(body)
        except ValueError:
            return _answer(400, "the body is not JSON")
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            return _answer(400, 'expected a webhook event object with an "event" name')
        if event["event"] not in _ROOM_EVENTS:
            return _answer(200)  # participant and track events carry nothing for calls
        room = event.get("room")
        if not isinstance(room, dict) or not isinstance(room.get("sid"), str) or not room["sid"]:
            return _answer(400, f"{event['event']} without room.sid")
        if self.store is None:
            return _answer(200)
        metadata = room.get("metadata")
        if not isinstance(metadata, str):
            metadata = ""
        at_ns = _event_time_ns(event)
        started = event["event"] == "room_started"
        record = RoomEvent(
            project=self.config.project,
            call_id=call_id_for(self.config.project, room["sid"]),
            room_id=room["sid"],
            room_name=room.get("name") if isinstance(room.get("name"), str) else None,
            metadata=metadata or None,
            skipped=room_metadata_skips(metadata, self.config.skip_attributes),
            started_ns=at_ns if started else None,
            finished_ns=None if started else at_ns,
        )
        try:
            await self.store.record_room(record)
        except Exception:
            log.exception("%s: could not record %s", self.id, event["event"])
            return web.json_response(
                {"error": "call store unavailable"}, status=503, headers={"Retry-After": "5"}
            )
        return _answer(200)


def _event_time_ns(event: dict[str, Any]) -> int:
    """``createdAt`` (Unix seconds, a number or a string) in ns; else now."""
    created = event.get("createdAt")
    try:
        seconds = int(created) if created is not None else 0
    except (TypeError, ValueError):
        seconds = 0
    return seconds * 1_000_000_000 if seconds > 0 else time.time_ns()


def _answer(status: int, error: str | None = None) -> web.Response:
    return web.json_response({} if error is None else {"error": error}, status=status)
