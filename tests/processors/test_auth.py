import pytest

from collector import RequestInfo, UnauthenticatedError
from collector.keys import KeyStore
from processors.auth import AuthConfig, AuthProcessor, bearer_token
from tests.processors._util import FakeTelemetryHost


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
