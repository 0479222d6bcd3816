"""LiveKit webhooks: tokens minted by LiveKit's own SDK, room events recorded on the call."""

from __future__ import annotations

import base64
import hashlib
import json

import aiohttp
import pytest
from google.protobuf.json_format import MessageToJson
from livekit import api
from livekit.protocol import models, webhook

from collector.calls import call_id_for
from collector.receivers.livekit_webhook import room_metadata_skips
from tests.support import pipeline_config, query

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


def livekit_token(body: bytes, key: str = API_KEY, secret: str = API_SECRET) -> str:
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
    return api.AccessToken(key, secret).with_sha256(digest).to_jwt()


@pytest.fixture
async def collector(make_service, free_port, tmp_path):
    port = free_port()
    db = tmp_path / "calltrace.db"
    config = pipeline_config(port, db)
    config["receivers"]["livekit_webhook"] = {
        "api_key": API_KEY,
        "api_secret": API_SECRET,
        "project": "acme",
        "store": str(db),
    }
    config["service"]["pipelines"]["traces"]["receivers"].append("livekit_webhook")
    await make_service(config)
    return f"http://127.0.0.1:{port}/webhooks/livekit", db


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
