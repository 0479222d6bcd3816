import logging

import aiohttp
import pytest

from collector import RequestInfo, UnauthenticatedError
from collector.keys import KeyStore
from processors.auth import AuthConfig, AuthProcessor, bearer_token
from tests.processors._util import FakeTelemetryHost
from tests.support import fixture_requests, pipeline_config


@pytest.fixture
async def store_path(tmp_path):
    return tmp_path / "keys.db"


async def started(config: AuthConfig) -> AuthProcessor:
    processor = AuthProcessor("auth", config)
    await processor.start(FakeTelemetryHost())
    return processor


def request(header: str | None) -> RequestInfo:
    return RequestInfo(headers={} if header is None else {"authorization": header})


async def test_key_from_store_sets_project(store_path):
    key, _ = KeyStore(store_path).create("acme")
    auth = await started(AuthConfig(key_store=store_path))
    info = request(f"Bearer {key}")
    await auth.admit(info)
    assert info.project == "acme"
    await auth.shutdown()


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic abc", "Bearer wrong-key-123"])
async def test_missing_or_wrong_key_refused(store_path, header):
    KeyStore(store_path).create("acme")
    auth = await started(AuthConfig(key_store=store_path))
    with pytest.raises(UnauthenticatedError):
        await auth.admit(request(header))
    await auth.shutdown()


async def test_revoked_key_refused_at_once(store_path):
    store = KeyStore(store_path)
    key, record = store.create("acme")
    auth = await started(AuthConfig(key_store=store_path))
    await auth.admit(request(f"Bearer {key}"))
    assert store.revoke(record.key_id)
    with pytest.raises(UnauthenticatedError):
        await auth.admit(request(f"Bearer {key}"))
    await auth.shutdown()


async def test_configured_keys_without_database():
    auth = await started(
        AuthConfig(key_store=None, keys=[{"key": "sidecar-secret-1", "project": "side"}])
    )
    info = request("bearer sidecar-secret-1")
    await auth.admit(info)
    assert info.project == "side"
    with pytest.raises(UnauthenticatedError):
        await auth.admit(request("Bearer sidecar-secret-2"))


def test_keys_are_stored_hashed(store_path):
    key, _ = KeyStore(store_path).create("acme")
    assert key.encode() not in store_path.read_bytes()


def test_bearer_token_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Token abc") is None


async def test_no_log_line_or_metric_carries_key_material(
    make_service, free_port, tmp_path, caplog
):
    """Requests with a valid, a revoked and an unknown key, ingest and query API, logged
    with every log record captured: no piece of any key's secret appears in the logs,
    /metrics, the answers or the key ids."""
    caplog.set_level(logging.DEBUG)
    port = free_port()
    db = tmp_path / "calltrace.db"
    store = KeyStore(db)
    valid, _ = store.create("acme")
    revoked, record = store.create("acme")
    store.revoke(record.key_id)
    unknown = "ct_" + "u" * 43
    await make_service(pipeline_config(port, db))
    base = f"http://127.0.0.1:{port}"
    body = fixture_requests("livekit")[0].read_bytes()
    seen: list[str] = []
    async with aiohttp.ClientSession() as session:
        for key, expected in ((valid, 200), (revoked, 401), (unknown, 401)):
            headers = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {key}"}
            async with session.post(f"{base}/v1/traces", data=body, headers=headers) as response:
                assert response.status == expected
                seen.append(repr(await response.read()))
            async with session.get(
                f"{base}/api/v1/calls", headers={"Authorization": f"Bearer {key}"}
            ) as response:
                assert response.status == expected
                seen.append(await response.text())
        async with session.get(f"{base}/metrics") as response:
            seen.append(await response.text())
    seen.append(caplog.text)
    seen += [r.key_id for r in store.list()]
    shown = "\n".join(seen)
    assert "calltrace_receiver_accepted_spans" in shown  # the capture did capture
    assert "calltrace started" in caplog.text
    for key in (valid, revoked, unknown):
        secret = key.removeprefix("ct_")
        assert not [secret[i : i + 6] for i in range(len(secret) - 5) if secret[i : i + 6] in shown]
