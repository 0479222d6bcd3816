"""The ``livekit_webhook`` receiver: LiveKit's room events recorded on the call.

LiveKit (server or Cloud) POSTs webhook events to ``/webhooks/livekit`` with a signed
token in the ``Authorization`` header: an HS256 JWT made with the API secret, whose
issuer is the API key, valid for five minutes (``nbf`` to ``exp``), and whose
``sha256`` claim is the base64 SHA-256 of the body. The receiver records
``room_started`` and ``room_finished`` (room SID, name, metadata, times) on the call the
room SID names, the same call the ``correlate`` processor links the room's spans to. A
room whose metadata (a JSON object) carries ``roark.skip`` true marks the call skipped,
and ``correlate`` then drops the call's spans.

Config::

    receivers:
      livekit_webhook:
        api_key: ${env:LIVEKIT_API_KEY}
        api_secret: ${env:LIVEKIT_API_SECRET}
        project: my-agents          # the project the rooms' calls belong to
        store: ./data/calltrace.db  # or redis: {url: ...}, as for correlate

It is served on the OTLP/HTTP listener's port (list it in a pipeline's receivers). A
request is handled cheapest refusal first, and its body is read only once its token
is known to be LiveKit's:

1. ``Content-Length`` above ``max_request_body_size``: 413, unread;
2. the token: signed with the secret, issued by the API key, carrying ``exp`` (checked
   with ``leeway``, as LiveKit's own ``TokenVerifier`` does) and issued (``iat``, else
   ``nbf``) at most ``max_token_age`` ago: else 401;
3. the body, read whole within ``read_timeout`` (408 past it; 413 once it grows past
   the limit, for a body without ``Content-Length``), must hash to the token's
   ``sha256``: else 401;
4. a token and body already admitted while the token is valid is a replay: 409 (the
   digests are held in this process's memory, ``replay_cache_size`` at most, 429 with
   ``Retry-After`` when all are still valid; or with ``redis:`` in Redis, shared by
   every instance and every worker);
5. an event that is not a JSON object with an ``event`` name, a room event without
   ``room.sid``, text that is not Unicode, or a ``createdAt`` that is not a time in
   Unix seconds: 400;
6. 200 ``{}`` once recorded; 503 with ``Retry-After`` when the call store is
   unavailable (the token is then released, so LiveKit's retry of it is admitted).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import StreamReader, web
from pydantic import Field, SecretStr

from collector.calls import CallStore, RoomEvent, call_id_for, make_call_store
from collector.components import ComponentConfig, Consumer, Host, Receiver
from collector.receivers.webhook_replay import (
    MemoryReplayGuard,
    RedisReplayGuard,
    ReplayGuard,
    ReplayGuardFull,
)
from collector.redisconn import CorrelateRedisConfig
from collector.units import ByteSize, Duration

log = logging.getLogger(__name__)

__all__ = ["LiveKitWebhookConfig", "LiveKitWebhookReceiver", "room_metadata_skips"]

_ROOM_EVENTS = {"room_started", "room_finished"}
_MAX_CREATED_AT = (2**63 - 1) // 1_000_000_000
"""The last second whose nanoseconds fit a signed 64-bit integer (year 2262)."""
_READ_CHUNK = 64 * 1024


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
    redis: CorrelateRedisConfig | None = None
    """Call records in Redis, as ``correlate``'s ``redis`` (use the same settings); the
    tokens already admitted are then kept there too, shared by every instance."""
    skip_attributes: list[str] = Field(default_factory=lambda: ["roark.skip"])
    """Keys in the room metadata (a JSON object) that mark the call skipped."""
    leeway: Duration = Field(default=60.0, ge=0)
    """Clock skew allowed when checking the token's times (LiveKit's verifier: 1 min)."""
    max_token_age: Duration = Field(default=300.0, gt=0)
    """A token issued (``iat``, else ``nbf``) longer ago than this (plus ``leeway``) is
    refused, whatever its ``exp``; LiveKit signs each webhook for five minutes."""
    max_request_body_size: ByteSize = Field(default=1024 * 1024, gt=0)
    read_timeout: Duration = Field(default=10.0, gt=0)
    """The whole body must arrive within this time of the request's headers (else 408)."""
    replay_cache_size: int = Field(default=100_000, gt=0)
    """Admitted tokens remembered in memory (without ``redis``) until they expire."""
    replay_key_prefix: str = "calltrace:webhook:seen:"
    """With ``redis``: admitted tokens are keys ``{replay_key_prefix}{digest}``."""


def room_metadata_skips(metadata: str, keys: list[str]) -> bool:
    """Whether room metadata (JSON text) sets one of ``keys`` to true or "true"."""
    try:
        document = json.loads(metadata) if metadata else None
    except (ValueError, RecursionError):
        return False
    if not isinstance(document, dict):
        return False
    for key in keys:
        value = document.get(key)
        if value is True or (isinstance(value, str) and value.strip().lower() == "true"):
            return True
    return False


@dataclass(frozen=True)
class VerifiedToken:
    """A webhook token LiveKit signed: its claims and the times that bound its use."""

    claims: dict[str, Any]
    issued_at: int
    """Unix seconds: ``iat``, else ``nbf``."""
    usable_until: float
    """Unix seconds (``leeway`` included) after which the token is refused anyway: its
    ``exp`` or its age bound, whichever comes first."""


class InvalidEventError(ValueError):
    """A signed body that is not a webhook event calltrace can record (answered 400)."""


class LiveKitWebhookReceiver(Receiver):
    type_name = "livekit_webhook"
    Config = LiveKitWebhookConfig
    config: LiveKitWebhookConfig

    def __init__(self, component_id: str, config: LiveKitWebhookConfig, consumer: Consumer):
        super().__init__(component_id, config, consumer)
        self.store: CallStore | None = None
        self.replays: ReplayGuard | None = None

    def make_store(self) -> CallStore | None:
        redis = self.config.redis
        if redis is None:
            return make_call_store(self.config.store)
        return make_call_store(self.config.store, redis, redis.ttl, redis.key_prefix)

    def make_replay_guard(self) -> ReplayGuard:
        if self.config.redis is not None:
            return RedisReplayGuard(self.config.redis, self.config.replay_key_prefix)
        return MemoryReplayGuard(self.config.replay_cache_size)

    def routes(self) -> list[Any]:
        return [web.post(self.config.path, self._receive)]

    async def start(self, host: Host) -> None:
        if self.store is None:
            self.store = self.make_store()
            if self.store is not None:
                await self.store.start()
        if self.replays is None:
            self.replays = self.make_replay_guard()
            await self.replays.start()

    async def shutdown(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            await store.close()
        replays, self.replays = self.replays, None
        if replays is not None:
            await replays.close()

    def verify_token(self, token: str, now: float | None = None) -> VerifiedToken:
        """The claims of a token LiveKit signed with the API secret, issued by the API
        key, with an ``exp`` that has not passed and issued at most ``max_token_age``
        ago (times checked with ``leeway``). Raises ``jwt.InvalidTokenError``."""
        leeway = self.config.leeway
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.config.api_secret.get_secret_value(),
                algorithms=["HS256"],
                leeway=leeway,
                options={"require": ["exp"], "verify_aud": False},
            )
            issuer = str(claims.get("iss", "")).encode("utf-8", "replace")
            issued = claims.get("iat", claims.get("nbf"))
            issued_at = None if issued is None or isinstance(issued, bool) else int(issued)
            expires_at = float(claims["exp"])
        except jwt.InvalidTokenError:
            raise
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # PyJWT lets a few odd claim values through as these (exp: Infinity).
            raise jwt.DecodeError(f"unreadable token: {exc}") from None
        if not hmac.compare_digest(issuer, self.config.api_key.encode()):
            raise jwt.InvalidIssuerError("token not issued by the configured API key")
        if issued_at is None:
            raise jwt.MissingRequiredClaimError("nbf")  # LiveKit's tokens carry nbf
        now = time.time() if now is None else now
        age_limit = self.config.max_token_age
        if now - issued_at > age_limit + leeway:
            raise jwt.InvalidTokenError(
                f"token issued {now - issued_at:.0f}s ago, more than max_token_age ({age_limit:g}s)"
            )
        usable_until = min(expires_at, issued_at + age_limit) + leeway
        return VerifiedToken(claims, issued_at, usable_until)

    async def _receive(self, request: web.Request) -> web.Response:
        limit = self.config.max_request_body_size
        if request.content_length is not None and request.content_length > limit:
            return _unread(413, f"webhook body larger than {limit} bytes")
        token = _bearer(request.headers.get("Authorization", ""))
        if not token:
            return _unread(401, "missing webhook token")
        try:
            verified = self.verify_token(token)
        except jwt.InvalidTokenError as exc:
            log.warning("%s: refused a webhook: %s", self.id, exc)
            return _unread(401, f"invalid webhook token: {exc}")
        try:
            async with asyncio.timeout(self.config.read_timeout):
                body = await _read_capped(request.content, limit)
        except TimeoutError:
            return _unread(
                408,
                f"webhook body not received within read_timeout ({self.config.read_timeout:g}s)",
            )
        if body is None:
            return _unread(413, f"webhook body larger than {limit} bytes")
        try:
            _check_body_hash(verified.claims, body)
        except jwt.InvalidTokenError as exc:
            log.warning("%s: refused a webhook: %s", self.id, exc)
            return _answer(401, f"invalid webhook token: {exc}")
        return await self._admit_once(token, verified, body)

    async def _admit_once(self, token: str, verified: VerifiedToken, body: bytes) -> web.Response:
        """Record the event unless this token and body were admitted before."""
        assert self.replays is not None
        digest = hashlib.sha256(token.encode() + b"\n" + hashlib.sha256(body).digest()).hexdigest()
        ttl = verified.usable_until - time.time()  # after that the token is refused anyway
        try:
            if not await self.replays.claim(digest, ttl):
                log.warning("%s: refused a replayed webhook", self.id)
                return _answer(409, "webhook token already used")
        except ReplayGuardFull as exc:
            log.warning("%s: cannot admit a webhook: %s", self.id, exc)
            return _answer(429, "too many webhooks in flight", retry_after=5)
        except Exception:
            log.exception("%s: replay check failed", self.id)
            return _answer(503, "replay check unavailable", retry_after=5)
        response = await self._record(body)
        if response.status >= 500:
            try:  # LiveKit retries with the same token: admit it then
                await self.replays.release(digest)
            except Exception:
                log.exception("%s: could not release a webhook token", self.id)
        return response

    async def _record(self, body: bytes) -> web.Response:
        try:
            record = self.room_event(body)
        except InvalidEventError as exc:
            return _answer(400, str(exc))
        if record is None or self.store is None:
            return _answer(200)  # participant and track events carry nothing for calls
        try:
            await self.store.record_room(record)
        except Exception:
            log.exception("%s: could not record a room event", self.id)
            return _answer(503, "call store unavailable", retry_after=5)
        return _answer(200)

    def room_event(self, body: bytes) -> RoomEvent | None:
        """The room event a signed body records, None for events of no interest to
        calls; raises ``InvalidEventError`` for a body that is not a webhook event."""
        try:
            event = json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidEventError("the body is not JSON (or is nested too deeply)") from None
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            raise InvalidEventError('expected a webhook event object with an "event" name')
        kind = event["event"]
        if kind not in _ROOM_EVENTS:
            return None
        room = event.get("room")
        if not isinstance(room, dict) or not isinstance(room.get("sid"), str) or not room["sid"]:
            raise InvalidEventError(f"{kind} without room.sid")
        sid = _text(room["sid"], "room.sid")
        name = room.get("name")
        name = _text(name, "room.name") if isinstance(name, str) else None
        metadata = room.get("metadata")
        metadata = _text(metadata, "room.metadata") if isinstance(metadata, str) else ""
        at_ns = _event_time_ns(event)
        started = kind == "room_started"
        return RoomEvent(
            project=self.config.project,
            call_id=call_id_for(self.config.project, sid),
            room_id=sid,
            room_name=name,
            metadata=metadata or None,
            skipped=room_metadata_skips(metadata, self.config.skip_attributes),
            started_ns=at_ns if started else None,
            finished_ns=None if started else at_ns,
        )


def _bearer(header: str) -> str:
    """LiveKit sends the bare token; ``Bearer <token>`` is accepted too."""
    token = header.strip()
    if token[:7].lower() == "bearer ":
        token = token[7:].strip()
    return token


def _check_body_hash(claims: dict[str, Any], body: bytes) -> None:
    digest = base64.b64encode(hashlib.sha256(body).digest())
    claimed = claims.get("sha256")
    if not isinstance(claimed, str) or not hmac.compare_digest(
        claimed.encode("utf-8", "replace"), digest
    ):
        raise jwt.InvalidTokenError("the body does not match the token's sha256")


async def _read_capped(content: StreamReader, limit: int) -> bytes | None:
    """The whole body however many reads it takes, or None once it exceeds ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.read(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _text(value: str, where: str) -> str:
    """``value`` if it is Unicode text (JSON allows lone surrogates; storage does not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidEventError(f"{where} is not valid Unicode text") from None
    return value


def _event_time_ns(event: dict[str, Any]) -> int:
    """``createdAt`` (Unix seconds: an integer, or its decimal text as protojson writes
    int64) in ns; now when it is missing or 0. Raises ``InvalidEventError`` for anything
    else, or a time that does not fit 64-bit nanoseconds."""
    created = event.get("createdAt")
    if created is None:
        return time.time_ns()
    seconds: int | None = None
    if isinstance(created, int) and not isinstance(created, bool):
        seconds = created
    elif isinstance(created, float) and created.is_integer():
        seconds = int(created)
    elif isinstance(created, str) and created.isascii() and created.strip().isdigit():
        seconds = int(created.strip()) if len(created.strip()) <= 20 else None
    if seconds is None or not 0 <= seconds <= _MAX_CREATED_AT:
        raise InvalidEventError(
            f"createdAt: expected Unix seconds up to {_MAX_CREATED_AT}, got {str(created)[:40]!r}"
        )
    return seconds * 1_000_000_000 if seconds > 0 else time.time_ns()


def _answer(status: int, error: str | None = None, retry_after: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.json_response(
        {} if error is None else {"error": error}, status=status, headers=headers
    )


def _unread(status: int, error: str) -> web.Response:
    """An answer sent before (all of) the body was read: the connection is closed after
    it rather than drained."""
    response = _answer(status, error)
    response.force_close()
    return response
