"""The livekit_native replay into PostgreSQL storage (a schema of its own on the test
server, dropped afterwards): the same requests stored once, on the room's call, and
answered the same by the query API. In CI (CI=true) an unreachable server fails."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from collector.calls import call_id_for
from tests.integration.test_livekit_native_replay import (
    NATIVE,
    PROJECT,
    QUERY_KEY,
    ROOM,
    captured,
    expected_counts,
    fixture_secret,  # noqa: F401  (autouse: the secret's environment variable)
    fresh_token,
    native_config,
    replay,
)
from tests.support import POSTGRES_DSN, free_port, running_service

pytestmark = pytest.mark.postgres


async def test_replay_into_postgres(tmp_path, pg_schema):
    schema, conn = pg_schema
    spans, records, metric_names = expected_counts(NATIVE / "retry_run")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = native_config(
        port,
        tmp_path,
        storage="postgres",
        exporters={"postgres": {"dsn": POSTGRES_DSN, "schema": schema}},
    )
    call_id = call_id_for(PROJECT, ROOM)
    async with running_service(config), aiohttp.ClientSession() as http:
        token = fresh_token()
        for meta, body in captured(NATIVE / "retry_run"):
            status, answer = await replay(http, base, meta, body, token)
            assert status == 200, (meta["seq"], answer)

        async def counts():
            return (
                await conn.fetchval(f"SELECT count(*) FROM {schema}.spans"),
                await conn.fetchval(f"SELECT count(*) FROM {schema}.log_records"),
                await conn.fetchval(f"SELECT count(DISTINCT name) FROM {schema}.metric_points"),
            )

        for _ in range(200):
            if await counts() == (spans, records, len(metric_names)):
                break
            await asyncio.sleep(0.05)
        assert await counts() == (spans, records, len(metric_names))
        assert await conn.fetch(f"SELECT DISTINCT call_id FROM {schema}.log_records") == [
            (call_id,)
        ]
        auth = {"Authorization": f"Bearer {QUERY_KEY}"}
        async with http.get(f"{base}/api/v1/calls/{call_id}/logs", headers=auth) as response:
            assert len((await response.json())["logs"]) == records
        async with http.get(f"{base}/api/v1/calls/{call_id}/recording", headers=auth) as response:
            recording = await response.json()
        audio = (NATIVE / "retry_run" / "011.part-audio.ogg").read_bytes()
        async with http.get(base + recording["audio_url"], headers=auth) as response:
            assert await response.read() == audio
