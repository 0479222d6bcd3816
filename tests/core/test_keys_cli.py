import asyncio
import subprocess
import sys
import uuid

import pytest

from collector import RequestInfo, UnauthenticatedError
from processors.auth import AuthConfig, AuthProcessor
from tests.processors._util import FakeTelemetryHost
from tests.support import POSTGRES_DSN, postgres_execute


def calltrace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args], capture_output=True, text=True, timeout=60
    )


def test_keys_create_list_revoke(tmp_path):
    db = str(tmp_path / "keys.db")
    created = calltrace("keys", "--db", db, "create", "--project", "acme")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("ct_") and len(key) > 30
    listing = calltrace("keys", "--db", db, "list")
    assert "acme" in listing.stdout and "active" in listing.stdout
    assert key not in listing.stdout
    key_id = listing.stdout.splitlines()[1].split()[0]
    revoked = calltrace("keys", "--db", db, "revoke", key_id)
    assert revoked.returncode == 0
    assert "revoked" in calltrace("keys", "--db", db, "list").stdout
    assert calltrace("keys", "--db", db, "revoke", key_id).returncode == 1


@pytest.mark.postgres
def test_keys_shared_in_postgres_serve_every_collector(tmp_path):
    """``key_store: postgresql://...``: a key created once with the CLI admits requests at
    every collector sharing the database; revoking it refuses them at once."""
    schema = f"ct_keys_{uuid.uuid4().hex[:10]}"
    postgres_execute("SELECT 1")  # skips, or fails in CI, when the server is unreachable
    try:
        created = calltrace(
            "keys", "--db", POSTGRES_DSN, "--schema", schema, "create", "--project", "acme"
        )
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()

        async def check(expect_project: str | None) -> None:
            for _ in range(2):  # two collectors, one database
                auth = AuthProcessor(
                    "auth", AuthConfig(key_store=POSTGRES_DSN, key_store_schema=schema)
                )
                await auth.start(FakeTelemetryHost())
                info = RequestInfo(headers={"authorization": f"Bearer {key}"})
                try:
                    if expect_project is None:
                        with pytest.raises(UnauthenticatedError):
                            await auth.admit(info)
                    else:
                        await auth.admit(info)
                        assert info.project == expect_project
                finally:
                    await auth.shutdown()

        asyncio.run(check("acme"))
        listing = calltrace("keys", "--db", POSTGRES_DSN, "--schema", schema, "list")
        assert "acme" in listing.stdout and key not in listing.stdout
        key_id = listing.stdout.splitlines()[1].split()[0]
        assert (
            calltrace("keys", "--db", POSTGRES_DSN, "--schema", schema, "revoke", key_id).returncode
            == 0
        )
        asyncio.run(check(None))
    finally:
        postgres_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
