"""LiveKit webhooks: tokens minted by LiveKit's own SDK, room events recorded on the call,
and every way a signed or unsigned request can go wrong, sent over real sockets."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import json
import socket
import time
from urllib.parse import urlsplit

import aiohttp
import jwt
import pytest
from google.protobuf.json_format import MessageToJson
from livekit import api
from livekit.protocol import models, webhook

from collector.calls import call_id_for
from collector.keys import KeyStore
from collector.receivers.livekit_webhook import room_metadata_skips
from collector.receivers.webhook_replay import MemoryReplayGuard, ReplayGuardFull
from tests.support import fixture_requests, pipeline_config, query

API_KEY = "APIfixturekey"
API_SECRET = "fixture-secret-that-is-long-enough-for-hs256"


def event_body(kind: str, sid: str, metadata: dict | None = None, name: str = "demo-room") -> bytes:
    event = webhook.WebhookEvent(
        event=kind,
        id="EV_fixture",
        created_at=1_764_000_000,
        room=models.Room(sid=sid, name=name, metadata=json.dumps(metadata or {})),
    )
    return MessageToJson(event).encode()


def livekit_token(
    body: bytes,
    key: str = API_KEY,
    secret: str = API_SECRET,
    ttl: datetime.timedelta = datetime.timedelta(minutes=5),  # as LiveKit's server signs
) -> str:
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
    return api.AccessToken(key, secret).with_sha256(digest).with_ttl(ttl).to_jwt()


def token_without_exp(body: bytes) -> str:
    """LiveKit's token for ``body`` with its ``exp`` taken out, signed again (HS256)."""
    claims = jwt.decode(livekit_token(body), options={"verify_signature": False})
    del claims["exp"]
    return jwt.encode(claims, API_SECRET, algorithm="HS256")


def livekit_accepts(body: bytes, token: str) -> bool:
    """Whether LiveKit's own ``WebhookReceiver`` takes this request as signed."""
    receiver = api.WebhookReceiver(api.TokenVerifier(API_KEY, API_SECRET))
    return bool(receiver.receive(body.decode(), token).event)


def webhook_config(db, **overrides) -> dict:
    return {
        "api_key": API_KEY,
        "api_secret": API_SECRET,
        "project": "acme",
        "store": str(db),
        **overrides,
    }


@pytest.fixture
def start_collector(make_service, free_port, tmp_path):
    """Starts a collector with a ``livekit_webhook`` receiver (config overrides as
    keywords); returns its webhook URL and its SQLite file."""

    async def start(**overrides):
        port = free_port()
        db = tmp_path / f"calltrace-{port}.db"
        config = pipeline_config(port, db)
        config["receivers"]["livekit_webhook"] = webhook_config(db, **overrides)
        config["service"]["pipelines"]["traces"]["receivers"].append("livekit_webhook")
        await make_service(config)
        return f"http://127.0.0.1:{port}/webhooks/livekit", db

    return start


@pytest.fixture
async def collector(start_collector):
    return await start_collector()


async def post(url: str, body: bytes, token: str | None):
    headers = {"Content-Type": "application/webhook+json"}
    if token is not None:
        headers["Authorization"] = token
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        return response.status, await response.json()


async def test_room_events_are_recorded_on_the_call(collector):
    url, db = collector
    started = event_body("room_started", "RM_hook1", {"customer": "acme"})
    assert (await post(url, started, livekit_token(started)))[0] == 200
    finished = event_body("room_finished", "RM_hook1", {"customer": "acme"})
    assert (await post(url, finished, livekit_token(finished)))[0] == 200
    rows = query(
        db,
        "SELECT call_id, room_id, room_name, metadata, skipped, room_started_ns,"
        " room_finished_ns FROM calls",
    )
    assert rows == [
        (
            call_id_for("acme", "RM_hook1"),
            "RM_hook1",
            "demo-room",
            '{"customer": "acme"}',
            0,
            1_764_000_000 * 10**9,
            1_764_000_000 * 10**9,
        )
    ]


@pytest.mark.parametrize(
    "token_for",
    [
        lambda body: None,
        lambda body: "not-a-jwt",
        lambda body: livekit_token(body, secret="another-secret-of-sufficient-length-xx"),
        lambda body: livekit_token(body, key="APIsomeoneelse"),
        lambda body: livekit_token(body + b" "),  # signed for another body
    ],
    ids=["missing", "garbage", "wrong-secret", "wrong-issuer", "body-mismatch"],
)
async def test_unsigned_or_mismatched_events_are_refused(collector, token_for):
    url, db = collector
    body = event_body("room_started", "RM_forged", {"roark.skip": True})
    status, answer = await post(url, body, token_for(body))
    assert status == 401 and answer["error"]
    assert query(db, "SELECT count(*) FROM calls")[0][0] == 0


async def test_other_events_are_acknowledged_and_ignored(collector):
    url, db = collector
    body = event_body("participant_joined", "RM_p")
    assert (await post(url, body, livekit_token(body)))[0] == 200
    assert query(db, "SELECT count(*) FROM calls")[0][0] == 0
    bad = b'{"no": "event"}'
    assert (await post(url, bad, livekit_token(bad)))[0] == 400


def test_metadata_skip_flag():
    assert room_metadata_skips('{"roark.skip": true}', ["roark.skip"])
    assert room_metadata_skips('{"roark.skip": "TRUE"}', ["roark.skip"])
    assert not room_metadata_skips('{"roark.skip": false}', ["roark.skip"])
    assert not room_metadata_skips("plain text", ["roark.skip"])
    assert not room_metadata_skips("", ["roark.skip"])


@pytest.mark.parametrize("shared", [False, True], ids=["sqlite", "redis"])
async def test_room_marked_skipped_drops_its_spans(
    make_service, free_port, tmp_path, request, shared
):
    """room_started with roark.skip in the room metadata: correlate drops the call's spans
    (also when the mark lives in Redis, shared by every instance)."""
    port = free_port()
    db = tmp_path / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    config = pipeline_config(port, db)
    webhook_config = {
        "api_key": API_KEY,
        "api_secret": API_SECRET,
        "project": "acme",
        "store": str(db),
    }
    if shared:
        redis_url = request.getfixturevalue("redis_server").url
        config["processors"]["correlate"]["redis"] = {"url": redis_url}
        webhook_config["redis"] = {"url": redis_url}
    config["receivers"]["livekit_webhook"] = webhook_config
    config["service"]["pipelines"]["traces"]["receivers"].append("livekit_webhook")
    service = await make_service(config)
    base = f"http://127.0.0.1:{port}"

    body = event_body("room_started", "RM_test123", {"roark.skip": True})
    assert (await post(f"{base}/webhooks/livekit", body, livekit_token(body)))[0] == 200
    headers = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as session:
        for path in fixture_requests("livekit") + fixture_requests("pipecat"):
            async with session.post(
                f"{base}/v1/traces", data=path.read_bytes(), headers=headers
            ) as response:
                assert response.status == 200
    await service.shutdown()
    # The skipped LiveKit room stored nothing; the Pipecat call (another room) is kept.
    assert (
        query(
            db, "SELECT count(*) FROM spans WHERE call_id = ?", call_id_for("acme", "RM_test123")
        )[0][0]
        == 0
    )
    assert query(db, "SELECT count(*) FROM spans")[0][0] == 14
    assert (
        service.telemetry.value("calltrace_processor_dropped_spans_total", processor="correlate")
        == 53
    )
    assert query(db, "SELECT skipped FROM calls WHERE room_id = 'RM_test123'") == [(1,)]


# -- requests over a raw socket: split, slow, chunked, oversized bodies --------------


async def raw_post(
    url: str,
    pieces: list[bytes],
    token: str | None,
    *,
    pause: float = 0.0,
    chunked: bool = False,
    content_length: int | None = None,
    finish: bool = True,
) -> tuple[int, dict]:
    """POST ``pieces`` as separate socket writes (``pause`` seconds apart, Nagle off so
    each is its own TCP segment), with ``Content-Length`` (the pieces' total unless
    given) or chunked; ``finish=False`` leaves a chunked body unterminated. Returns the
    status and JSON answer."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = [
        f"POST {parts.path} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/webhook+json",
        "Connection: close",
    ]
    if token is not None:
        head.append(f"Authorization: {token}")
    if chunked:
        head.append("Transfer-Encoding: chunked")
    else:
        length = sum(map(len, pieces)) if content_length is None else content_length
        head.append(f"Content-Length: {length}")
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        await writer.drain()
        for piece in pieces:
            await asyncio.sleep(pause)
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await writer.drain()
        if chunked and finish:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        # The answer, read by its Content-Length: a server may linger on the connection
        # after answering a body it did not read.
        head_bytes = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=15)
        status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in header_lines if line)
        payload = await reader.readexactly(int(headers.get("Content-Length", "0")))
    finally:
        writer.close()
    return int(status_line.split()[1]), json.loads(payload or b"{}")


def room_started(sid: str = "RM_edge", **fields) -> bytes:
    return json.dumps(
        {"event": "room_started", "id": "EV_edge", "room": {"sid": sid, "name": "r"}, **fields}
    ).encode()


def call_rows(db) -> list:
    return query(db, "SELECT room_id, room_started_ns FROM calls ORDER BY room_id")


async def test_token_without_exp_is_refused(collector):
    url, db = collector
    body = event_body("room_started", "RM_noexp")
    token = token_without_exp(body)
    with pytest.raises(jwt.MissingRequiredClaimError):  # LiveKit's own verifier agrees
        livekit_accepts(body, token)
    status, answer = await post(url, body, token)
    assert (status, "exp" in answer["error"]) == (401, True)
    assert call_rows(db) == []


async def test_expired_token_is_refused_within_leeway_accepted(collector):
    url, db = collector
    body = event_body("room_started", "RM_expired")
    expired = livekit_token(body, ttl=datetime.timedelta(seconds=-120))  # leeway: 60 s
    status, answer = await post(url, body, expired)
    assert status == 401 and "expired" in answer["error"]
    late = livekit_token(body, ttl=datetime.timedelta(seconds=-30))
    assert livekit_accepts(body, late)
    assert (await post(url, body, late))[0] == 200
    assert call_rows(db) == [("RM_expired", 1_764_000_000 * 10**9)]


async def test_token_older_than_max_token_age_is_refused(start_collector):
    url, db = await start_collector(max_token_age="2s", leeway="0s")
    body = event_body("room_started", "RM_old")
    old = livekit_token(body, ttl=datetime.timedelta(hours=1))  # exp alone would allow it
    await asyncio.sleep(3.2)
    status, answer = await post(url, body, old)
    assert status == 401 and "max_token_age" in answer["error"]
    assert call_rows(db) == []
    assert (await post(url, body, livekit_token(body)))[0] == 200


async def test_replayed_token_is_refused(collector):
    url, db = collector
    body = event_body("room_started", "RM_replay", {"customer": "acme"})
    token = livekit_token(body)
    assert (await post(url, body, token))[0] == 200
    status, answer = await post(url, body, token)
    assert status == 409 and "already used" in answer["error"]
    # LiveKit signing the same event again (a new token) is a new request.
    again = livekit_token(body, ttl=datetime.timedelta(minutes=4))
    assert again != token
    assert (await post(url, body, again))[0] == 200
    assert call_rows(db) == [("RM_replay", 1_764_000_000 * 10**9)]


async def test_replay_is_refused_by_every_instance_sharing_redis(start_collector, redis_server):
    shared = {"redis": {"url": redis_server.url}}
    first, _ = await start_collector(**shared)
    second, _ = await start_collector(**shared)
    body = event_body("room_started", "RM_replay_shared")
    token = livekit_token(body)
    assert (await post(first, body, token))[0] == 200
    assert (await post(second, body, token))[0] == 409
    assert (await post(first, body, token))[0] == 409
    held = redis_server.client().keys("calltrace:webhook:seen:*")
    assert len(held) == 1
    assert 0 < redis_server.client().pttl(held[0]) <= (300 + 60) * 1000


async def test_a_request_refused_while_redis_is_down_is_admitted_on_retry(
    start_collector, redis_server
):
    """503 while Redis is unreachable; LiveKit's retry (the same token) is then admitted."""
    url, db = await start_collector(redis={"url": redis_server.url, "timeout": "1s"})
    body = event_body("room_started", "RM_retry")
    token = livekit_token(body)
    redis_server.kill()
    assert (await post(url, body, token))[0] == 503
    redis_server.start()
    assert (await post(url, body, token))[0] == 200
    assert call_rows(db) == [("RM_retry", 1_764_000_000 * 10**9)]


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 200_000 + b"]" * 200_000,
        b'{"event": "room_started", "room": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["nested-array", "nested-room"],
)
async def test_deeply_nested_json_is_400(collector, body):
    url, db = collector
    status, answer = await post(url, body, livekit_token(body))
    assert status == 400 and answer["error"]
    assert call_rows(db) == []


async def test_deeply_nested_room_metadata_is_recorded_as_text(collector):
    url, db = collector
    metadata = "[" * 100_000 + "]" * 100_000
    body = room_started("RM_meta", createdAt="1764000000")
    body = body.replace(b'"name": "r"', b'"name": "r", "metadata": "' + metadata.encode() + b'"')
    assert (await post(url, body, livekit_token(body)))[0] == 200
    assert query(db, "SELECT length(metadata), skipped FROM calls") == [(200_000, 0)]


@pytest.mark.parametrize(
    "created_at",
    [1e30, 10**20, -5, "99999999999999999999", "1e30", "soon", 1.5, True],
)
async def test_created_at_that_is_not_a_time_is_400(collector, created_at):
    url, db = collector
    body = room_started(createdAt=created_at)
    status, answer = await post(url, body, livekit_token(body))
    assert status == 400 and "createdAt" in answer["error"]
    assert call_rows(db) == []


@pytest.mark.parametrize("created_at", [1764000000, "1764000000", 1764000000.0])
async def test_created_at_as_protojson_writes_it(collector, created_at):
    url, db = collector
    body = room_started(createdAt=created_at)
    assert (await post(url, body, livekit_token(body)))[0] == 200
    assert call_rows(db) == [("RM_edge", 1_764_000_000 * 10**9)]


async def test_text_that_is_not_unicode_is_400(collector):
    url, db = collector
    body = b'{"event": "room_started", "room": {"sid": "RM_\\ud800"}}'
    status, answer = await post(url, body, livekit_token(body))
    assert status == 400 and "room.sid" in answer["error"]
    assert call_rows(db) == []


async def test_body_split_across_segments_verifies(collector):
    """A signed body arriving in several TCP segments, with pauses, is read whole."""
    url, db = collector
    body = event_body("room_started", "RM_split")
    token = livekit_token(body)
    assert livekit_accepts(body, token)
    pieces = [body[:20], body[20:60], body[60:]]
    assert await raw_post(url, pieces, token, pause=0.2) == (200, {})
    chunked_body = event_body("room_finished", "RM_split")
    chunked = [chunked_body[:30], chunked_body[30:]]
    status, _ = await raw_post(url, chunked, livekit_token(chunked_body), pause=0.2, chunked=True)
    assert status == 200
    assert query(db, "SELECT room_id, room_finished_ns FROM calls") == [
        ("RM_split", 1_764_000_000 * 10**9)
    ]


async def test_body_slower_than_read_timeout_is_408(start_collector):
    url, db = await start_collector(read_timeout="500ms")
    body = event_body("room_started", "RM_slow")
    token = livekit_token(body)
    started = time.monotonic()
    status, answer = await raw_post(url, [body[:40]], token, content_length=len(body))
    assert status == 408 and "read_timeout" in answer["error"]
    assert 0.4 < time.monotonic() - started < 5
    status, _ = await raw_post(url, [body[:40]], token, chunked=True, finish=False)
    assert status == 408
    assert (await raw_post(url, [body], token)) == (200, {})  # the deadline used no token
    assert call_rows(db) == [("RM_slow", 1_764_000_000 * 10**9)]


LIMIT = 1024 * 1024


async def test_body_over_the_limit_is_413(collector):
    url, db = collector
    big = room_started() + b" " * LIMIT  # valid JSON, signed, one byte per space too many
    token = livekit_token(big)
    # Content-Length over the limit: refused unread, token or not.
    assert (await raw_post(url, [], token, content_length=len(big)))[0] == 413
    assert (await raw_post(url, [], None, content_length=len(big)))[0] == 413
    # Chunked: refused once the limit is crossed.
    sent = big[: LIMIT + 1]
    pieces = [sent[i : i + 65536] for i in range(0, len(sent), 65536)]
    assert sum(map(len, pieces)) == LIMIT + 1
    assert (await raw_post(url, pieces, token, chunked=True, finish=False))[0] == 413
    assert call_rows(db) == []


async def test_replay_memory_is_bounded(start_collector):
    """With every slot held by a token still valid, a new event is refused with 429 and
    Retry-After (which LiveKit retries), never admitted by forgetting a held token."""
    url, db = await start_collector(replay_cache_size=1)
    first = event_body("room_started", "RM_first")
    assert (await post(url, first, livekit_token(first)))[0] == 200
    second = event_body("room_started", "RM_second")
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url, data=second, headers={"Authorization": livekit_token(second)}
        ) as response,
    ):
        assert response.status == 429 and response.headers["Retry-After"]
    assert [room for room, _ in call_rows(db)] == ["RM_first"]


async def test_memory_replay_guard_forgets_expired_and_released_digests():
    guard = MemoryReplayGuard(capacity=2)
    assert await guard.claim("a", ttl=0.05) and await guard.claim("b", ttl=60)
    assert not await guard.claim("b", ttl=60)
    with pytest.raises(ReplayGuardFull):
        await guard.claim("c", ttl=60)
    await asyncio.sleep(0.1)  # "a" expired: its slot is free again
    assert await guard.claim("c", ttl=60)
    await guard.release("b")
    assert await guard.claim("b", ttl=60) and len(guard) == 2
