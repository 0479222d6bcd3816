"""The ``livekit_observability`` receiver's answers: LiveKit tokens minted with
livekit-api's own ``AccessToken`` (real HS256 signing), bad bodies (4xx naming the
problem, nothing half-stored, the next request served), and back-pressure in the form
each livekit-agents client reads (``Retry-After`` for OTLP, ``RetryInfo`` for uploads)."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import random
import time

import aiohttp
import jwt
import pytest
from google.rpc import error_details_pb2, status_pb2
from livekit import api as livekit_api

from tests.integration.test_livekit_native_replay import (
    API_KEY,
    API_SECRET,
    NATIVE,
    captured,
    fixture_secret,  # noqa: F401  (autouse fixture: the secret's environment variable)
    fresh_token,
    native_config,
    replay,
)
from tests.support import free_port, query, running_service

LOGS = captured(NATIVE)[0]  # 001: logs
TRACES = captured(NATIVE)[1]  # 002: traces
UPLOAD = captured(NATIVE)[6]  # 007: the recording
assert LOGS[0]["kind"] == "logs" and TRACES[0]["kind"] == "traces"
assert UPLOAD[0]["kind"] == "recordings"


def token_with(**claims) -> str:
    """An ``AccessToken``'s claims with some changed, signed as livekit-api signs
    (PyJWT, HS256): for what ``AccessToken`` cannot mint (an ``nbf`` ahead)."""
    minted = fresh_token()
    payload = jwt.decode(minted, options={"verify_signature": False})
    payload.update(claims)
    return jwt.encode(payload, API_SECRET, algorithm="HS256")


def tokens() -> dict[str, tuple[str, str]]:
    """name -> (token, what the 401 says)."""
    now = int(time.time())
    expired = (
        livekit_api.AccessToken(API_KEY, API_SECRET)
        .with_observability_grants(livekit_api.ObservabilityGrants(write=True))
        .with_ttl(datetime.timedelta(hours=-1))
        .to_jwt()
    )
    no_grant = (
        livekit_api.AccessToken(API_KEY, API_SECRET)
        .with_identity("agent")
        .with_grants(livekit_api.VideoGrants(room_join=True, room="x"))
        .to_jwt()
    )
    write_false = token_with(observability={"write": False})
    return {
        "wrong secret": (
            fresh_token(secret="not-the-secret-0123456789abcdefghijklmno"),
            "signature invalid",
        ),
        "unknown key": (fresh_token(key="otherkey"), "unknown API key 'otherkey'"),
        "expired": (expired, "expired"),
        "not yet valid": (token_with(nbf=now + 3600, exp=now + 7200), "not yet valid"),
        "missing grant": (no_grant, "observability write grant"),
        "write false": (write_false, "observability write grant"),
        "garbage": ("not-a-jwt", "malformed access token"),
    }


@pytest.fixture
async def collector(tmp_path):
    port = free_port()
    config = native_config(port, tmp_path, recordings={"max_audio_size": "1MiB"})
    async with running_service(config), aiohttp.ClientSession() as http:
        yield f"http://127.0.0.1:{port}", http, tmp_path


async def test_tokens(collector):
    base, http, tmp_path = collector
    for name, (token, reason) in tokens().items():
        for meta, body in (LOGS, UPLOAD):
            status, answer = await replay(http, base, meta, body, token)
            assert status == 401, (name, meta["path"])
            message = status_pb2.Status.FromString(answer).message
            assert reason in message, (name, message)
            assert "disabled" not in message  # would switch the agent's uploads off
    async with http.post(base + LOGS[0]["path"], data=LOGS[1]) as response:
        assert response.status == 401  # no Authorization at all
        assert "missing bearer token" in status_pb2.Status.FromString(await response.read()).message
    db = tmp_path / "calltrace.db"
    assert query(db, "SELECT count(*) FROM log_records") == [(0,)]
    assert query(db, "SELECT count(*) FROM recordings") == [(0,)]
    # A valid token is taken, whatever came before.
    status, _ = await replay(http, base, *LOGS, fresh_token())
    assert status == 200


def multipart(
    parts: list[tuple[str, str, bytes]], boundary: str = "b0undary"
) -> tuple[dict, bytes]:
    body = b""
    for name, content_type, content in parts:
        body += (
            (
                f"--{boundary}\r\nContent-Type: {content_type}\r\n"
                f'Content-Disposition: form-data; name="{name}"; filename="{name}"\r\n\r\n'
            ).encode()
            + content
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body


async def post_upload(http, base, headers, body):
    headers = {**headers, "Authorization": f"Bearer {fresh_token()}"}
    async with http.post(base + UPLOAD[0]["path"], data=body, headers=headers) as response:
        answer = await response.read()
        message = status_pb2.Status.FromString(answer).message if answer else ""
        return response.status, message


async def test_bad_uploads_get_4xx_and_store_nothing(collector):
    base, http, tmp_path = collector
    header = (NATIVE / "007.part-header.binpb").read_bytes()
    audio = (NATIVE / "007.part-audio.ogg").read_bytes()
    chat = (NATIVE / "007.part-chat_history.json").read_bytes()
    cases = [
        (multipart([("chat_history", "application/json", chat)]), 400, "missing the 'header'"),
        (
            multipart([("header", "application/protobuf", b"\xff\xff\xff")]),
            400,
            "not a MetricsRecordingHeader",
        ),
        (
            multipart(
                [("header", "application/protobuf", header), ("audio", "audio/ogg", b"RIFF")]
            ),
            400,
            "not Ogg",
        ),
        (
            multipart([("header", "application/protobuf", header), ("chat_history", "x", b"{")]),
            400,
            "not JSON",
        ),
        (
            multipart(
                [("header", "application/protobuf", header), ("audio", "audio/ogg", audio * 100)]
            ),
            413,
            "audio part larger",
        ),
        (
            ({"Content-Type": "multipart/form-data; boundary=zzz"}, b"--nope\r\n\r\ngarbage"),
            400,
            "malformed multipart",
        ),
        (({"Content-Type": "application/json"}, b"{}"), 415, "expected multipart/form-data"),
    ]
    config_limit = 1024 * 1024  # the test sets max_audio_size below
    assert len(audio) * 100 > config_limit
    for (headers, body), status, reason in cases:
        got, message = await post_upload(http, base, headers, body)
        assert (got, reason in message) == (status, True), (reason, got, message)
    assert query(tmp_path / "calltrace.db", "SELECT count(*) FROM recordings") == [(0,)]
    recordings = tmp_path / "recordings"
    assert not recordings.exists() or not any(recordings.iterdir())
    # Mutated uploads and OTLP bodies: never a 5xx, and the real ones still go through.
    rng = random.Random(19)
    for meta, body in (UPLOAD, LOGS, TRACES, captured(NATIVE)[9]):
        for _ in range(25):
            mutated = bytearray(body)
            for _ in range(rng.randint(1, 8)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            if rng.random() < 0.3:
                mutated = mutated[: rng.randrange(len(mutated))]
            status, _ = await replay(http, base, meta, bytes(mutated), fresh_token())
            assert status < 500, (meta["path"], status)
        status, answer = await replay(http, base, meta, body, fresh_token())
        assert status == 200, (meta["path"], answer)


async def test_broken_otlp_bodies_name_the_problem(collector):
    base, http, _ = collector
    meta = LOGS[0]
    for body, reason in [
        (b"\x1f\x8b\x08\x00 not gzip", "invalid gzip body"),
        (gzip.compress(b"\xff\xff\xff\xff"), "malformed logs request"),
    ]:
        status, answer = await replay(http, base, meta, body, fresh_token())
        assert status == 400
        assert reason in status_pb2.Status.FromString(answer).message


async def test_back_pressure_in_the_form_each_client_reads(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    dead = free_port()  # nothing listens: the otlphttp queue stays occupied
    config = native_config(
        port,
        tmp_path,
        exporters={
            "sqlite": {"path": str(tmp_path / "calltrace.db")},
            "otlphttp": {
                "endpoint": f"http://127.0.0.1:{dead}",
                "sending_queue": {"queue_size": 1},
            },
        },
        traces_exporters=["otlphttp"],
        # A regular file where the directory should be: storing audio fails.
        recordings={"directory": str(tmp_path / "taken" / "recordings")},
    )
    (tmp_path / "taken").write_text("a file, not a directory")
    config["service"]["shutdown_timeout"] = 0.5  # the dead endpoint's batch is given up
    async with running_service(config), aiohttp.ClientSession() as http:
        statuses = []
        headers = {}
        for meta, body in captured(NATIVE):
            if meta["kind"] != "traces":
                continue
            status, _ = await replay_with_headers(http, base, meta, body, headers)
            statuses.append(status)
        assert statuses[0] == 200 and 503 in statuses[1:]
        assert headers["Retry-After"] == "1"

        status, answer = await replay(http, base, *UPLOAD, fresh_token())
        assert status == 503
        rpc_status = status_pb2.Status.FromString(answer)
        retry = error_details_pb2.RetryInfo()
        assert rpc_status.details[0].Unpack(retry)
        assert retry.retry_delay.seconds == 1


async def replay_with_headers(http, base, meta, body, seen_headers):
    headers = {
        name: value
        for name, value in meta["headers"]
        if name.lower() not in ("host", "content-length", "authorization")
    }
    headers["Authorization"] = f"Bearer {fresh_token()}"
    async with http.post(base + meta["path"], data=body, headers=headers) as response:
        if response.status == 503:
            seen_headers.update(response.headers)
        return response.status, await response.read()


async def test_a_slow_body_gets_408_and_the_next_request_is_served(tmp_path):
    port = free_port()
    config = native_config(port, tmp_path)
    config["receivers"]["livekit_observability"]["read_timeout"] = "300ms"
    async with running_service(config), aiohttp.ClientSession() as http:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            (
                f"POST {LOGS[0]['path']} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {fresh_token()}\r\n"
                "Content-Type: application/x-protobuf\r\nContent-Length: 1000\r\n\r\nabc"
            ).encode()
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        assert b" 408 " in status_line
        writer.close()
        status, _ = await replay(http, f"http://127.0.0.1:{port}", *LOGS, fresh_token())
        assert status == 200
