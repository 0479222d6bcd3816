"""Fuzzing the LiveKit webhook receiver through a running collector.

Hypothesis sends bodies (arbitrary bytes, arbitrary JSON, event-shaped JSON with odd
values, deep nesting) with headers that mostly carry a valid signature for exactly that
body (minted by livekit-api's ``AccessToken``, or HS256 over claims with odd values),
over real sockets. The invariant: every answer is 200 or 4xx, never 5xx, and the next
valid event is recorded. ``CALLTRACE_FUZZ_EXAMPLES`` sets the number of examples
(default 120, a few seconds).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import http.client
import itertools
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from livekit import api

from tests.support import free_port, pipeline_config, running_service

API_KEY = "APIfuzzkey"
API_SECRET = "fuzz-secret-that-is-long-enough-for-hs256-signing"
EXAMPLES = int(os.environ.get("CALLTRACE_FUZZ_EXAMPLES", "120"))
_sids = itertools.count()


class BackgroundCollector:
    """A collector with a ``livekit_webhook`` receiver, served by an event loop on a
    thread of its own, so that hypothesis (synchronous) can drive it."""

    def __init__(self, directory: Path):
        self.port = free_port()
        self.db = directory / "calltrace.db"
        config = pipeline_config(self.port, self.db)
        config["receivers"]["livekit_webhook"] = {
            "api_key": API_KEY,
            "api_secret": API_SECRET,
            "project": "fuzz",
            "store": str(self.db),
        }
        config["service"]["pipelines"]["traces"]["receivers"].append("livekit_webhook")
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._stop: asyncio.Event | None = None
        self._done: Any = None

    def __enter__(self) -> BackgroundCollector:
        self.thread.start()
        started: Any = asyncio.run_coroutine_threadsafe(self._ready(), self.loop)
        started.result(timeout=30)
        return self

    async def _ready(self) -> None:
        ready = asyncio.Event()
        self._stop = asyncio.Event()

        async def serve() -> None:
            assert self._stop is not None
            async with running_service(self.config):
                ready.set()
                await self._stop.wait()

        self._done = asyncio.ensure_future(serve())
        await ready.wait()

    def __exit__(self, *exc_info: object) -> None:
        async def stop() -> None:
            assert self._stop is not None
            self._stop.set()
            await self._done

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def post(self, body: bytes, headers: dict[str, str]) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request("POST", "/webhooks/livekit", body=body, headers=headers)
            return connection.getresponse().status
        finally:
            connection.close()

    def recorded(self, room_id: str) -> bool:
        with sqlite3.connect(self.db) as db:
            return bool(db.execute("SELECT 1 FROM calls WHERE room_id = ?", (room_id,)).fetchone())


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundCollector]:
    with BackgroundCollector(tmp_path_factory.mktemp("fuzz_webhook")) as running:
        yield running


def body_sha256(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(body).digest()).decode()


def livekit_token(body: bytes) -> str:
    return (
        api.AccessToken(API_KEY, API_SECRET)
        .with_sha256(body_sha256(body))
        .with_ttl(datetime.timedelta(minutes=5))
        .to_jwt()
    )


# -- strategies ---------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
event_names = st.sampled_from(["room_started", "room_finished", "participant_joined"]) | st.text(
    max_size=12
)
rooms = st.fixed_dictionaries(
    {},
    optional={
        "sid": st.text(max_size=30) | json_values,
        "name": st.text(max_size=30) | json_values,
        "metadata": st.text(max_size=60)
        | st.builds(json.dumps, json_values)
        | st.just('{"roark.skip": true}')
        | st.integers(0, 20_000).map(lambda n: "[" * n + "]" * n),
    },
)
events = st.fixed_dictionaries(
    {"event": event_names},
    optional={
        "room": rooms | json_values,
        "createdAt": json_values
        | st.integers(min_value=-(10**30), max_value=10**30)
        | st.integers(0, 10**25).map(str),
        "id": st.text(max_size=10),
    },
)
bodies = st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.builds(lambda e: json.dumps(e).encode(), events),
    st.builds(lambda e: json.dumps(e, ensure_ascii=False).encode("utf-8", "surrogatepass"), events),
    st.integers(0, 200_000).map(lambda n: b"[" * n + b"]" * n),
)
claim_overrides = st.dictionaries(
    st.sampled_from(["exp", "nbf", "iat", "iss", "sha256", "sub", "video"]),
    json_values | st.integers(min_value=-(2**70), max_value=2**70),
    max_size=3,
)


@st.composite
def signed_headers(draw: st.DrawFn, body: bytes) -> dict[str, str]:
    """Headers whose Authorization is mostly a valid LiveKit token for ``body``."""
    kind = draw(st.sampled_from(["livekit", "bearer", "odd-claims", "other-body", "text", "none"]))
    headers = {
        "Content-Type": draw(
            st.sampled_from(["application/webhook+json", "application/json", "text/plain"])
        )
    }
    # Header values as http.client sends them: Latin-1, no control characters.
    printable = st.text(
        st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"), max_size=80
    )
    if kind == "livekit":
        headers["Authorization"] = livekit_token(body)
    elif kind == "bearer":
        headers["Authorization"] = "Bearer  " + livekit_token(body) + " "
    elif kind == "odd-claims":
        claims = jwt.decode(livekit_token(body), options={"verify_signature": False})
        claims.update(draw(claim_overrides))
        # Signed as JWS over the JSON text: PyJWT's encode would refuse odd claim types.
        payload = json.dumps(claims).encode()
        headers["Authorization"] = jwt.PyJWS().encode(payload, API_SECRET, algorithm="HS256")
    elif kind == "other-body":
        headers["Authorization"] = livekit_token(draw(st.binary(max_size=50)))
    elif kind == "text":
        headers["Authorization"] = draw(printable)
    return headers


requests = bodies.flatmap(lambda body: st.tuples(st.just(body), signed_headers(body)))


def found(body: bytes) -> tuple[bytes, dict[str, str]]:
    """An input fuzzing found (answered 5xx before), kept as a regression case."""
    return body, {"Authorization": livekit_token(body)}


@example(request=found(b"[" * 2046 + b"]" * 2046))  # RecursionError: 500
@example(request=found(b'{"event": "room_started", "room": {"sid": "RM_x"}, "createdAt": 1e30}'))
@example(request=found(b'{"event": "room_finished", "room": {"sid": "RM_\\udc80"}}'))
@example(
    request=found(
        b'{"event": "room_started", "room": {"sid": "RM_y", "metadata": "'
        + b"[" * 5000
        + b"]" * 5000
        + b'"}}'
    )
)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(request=requests)
def test_webhook_answers_200_or_4xx_and_keeps_recording(
    collector: BackgroundCollector, request: tuple[bytes, dict[str, str]]
) -> None:
    body, headers = request
    status = collector.post(body, headers)
    assert status == 200 or 400 <= status < 500, (status, body[:200], headers)

    room_id = f"RM_fuzz_{next(_sids)}"
    valid = json.dumps(
        {
            "event": "room_started",
            "room": {"sid": room_id, "name": "next"},
            "createdAt": "1764000000",
        }
    ).encode()
    assert collector.post(valid, {"Authorization": livekit_token(valid)}) == 200
    assert collector.recorded(room_id)
