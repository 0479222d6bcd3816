import asyncio
import hashlib
import secrets
import sqlite3
import subprocess
import sys
import time
import uuid

import pytest

from collector import RequestInfo, UnauthenticatedError
from collector.keys import KeyStore, hash_key, key_id_for
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


def listed_ids(listing: str) -> list[str]:
    return [line.split()[0] for line in listing.splitlines()[1:]]


def key_material(key: str) -> list[str]:
    """Every 6-character piece of a key's secret (what must never be shown)."""
    secret = key.removeprefix("ct_")
    return [secret[i : i + 6] for i in range(len(secret) - 5)]


def test_key_ids_carry_no_key_material(tmp_path):
    db = str(tmp_path / "keys.db")
    created = calltrace("keys", "--db", db, "create", "--project", "acme")
    key = created.stdout.strip()
    listing = calltrace("keys", "--db", db, "list").stdout
    (key_id,) = listed_ids(listing)
    assert key_id == key_id_for(hash_key(key)) and key_id.startswith("key_")
    for shown in (listing, created.stderr, key_id):
        assert not [piece for piece in key_material(key) if piece in shown], shown
    # Revoking by the key itself names the key by its id, never echoes the key.
    revoked = calltrace("keys", "--db", db, "revoke", key)
    assert revoked.returncode == 0 and revoked.stdout.strip() == f"revoked {key_id}"
    again = calltrace("keys", "--db", db, "revoke", key)
    assert again.returncode == 1 and key not in again.stderr + again.stdout


def old_key(project: str) -> tuple[str, tuple[str, str, str, int, None]]:
    """A key as an older calltrace made it, and its api_keys row (id: ``ct_`` + the
    first 8 characters of the secret)."""
    secret = secrets.token_urlsafe(32)
    key = "ct_" + secret
    digest = hashlib.sha256(key.encode()).hexdigest()
    return key, ("ct_" + secret[:8], project, digest, time.time_ns(), None)


OLD_SCHEMA = """CREATE TABLE api_keys (
    key_id     TEXT PRIMARY KEY,
    project    TEXT NOT NULL,
    key_hash   TEXT NOT NULL UNIQUE,
    created_ns INTEGER NOT NULL,
    revoked_ns INTEGER
)"""


def test_a_store_written_the_old_way_gets_new_ids_and_its_keys_keep_working(tmp_path):
    db = tmp_path / "old.db"
    keys = [old_key("acme"), old_key("acme"), old_key("other")]
    with sqlite3.connect(db) as old:  # the old code's table and rows, in WAL mode as it was
        old.execute("PRAGMA journal_mode=WAL")
        old.execute(OLD_SCHEMA)
        old.executemany("INSERT INTO api_keys VALUES (?,?,?,?,?)", [row for _, row in keys])
    old.close()
    assert keys[0][1][0].encode() in db.read_bytes()

    listing = calltrace("keys", "--db", str(db), "list")
    assert listing.returncode == 0, listing.stderr
    assert listed_ids(listing.stdout) == [key_id_for(hash_key(key)) for key, _ in keys]
    stored = b"".join(path.read_bytes() for path in tmp_path.iterdir())
    for key, (old_id, *_rest) in keys:
        assert old_id not in listing.stdout
        assert old_id.encode() not in stored  # overwritten in the file, not only unlinked
        assert not [piece for piece in key_material(key) if piece.encode() in stored]

    # The keys still authenticate; revoking by the new id works; the old id gets a hint.
    async def project_of(key: str) -> str | None:
        auth = AuthProcessor("auth", AuthConfig(key_store=str(db)))
        await auth.start(FakeTelemetryHost())
        try:
            return auth.authenticate(key)
        finally:
            await auth.shutdown()

    assert [asyncio.run(project_of(key)) for key, _ in keys] == ["acme", "acme", "other"]
    hint = calltrace("keys", "--db", str(db), "revoke", keys[0][1][0])
    assert hint.returncode == 1 and "key ids have changed" in hint.stderr
    new_id = key_id_for(hash_key(keys[0][0]))
    assert calltrace("keys", "--db", str(db), "revoke", new_id).returncode == 0
    assert asyncio.run(project_of(keys[0][0])) is None
    assert asyncio.run(project_of(keys[1][0])) == "acme"
    assert [r.key_id for r in KeyStore(db).list() if r.revoked] == [new_id]


@pytest.mark.postgres
def test_a_postgres_store_written_the_old_way_gets_new_ids(tmp_path):
    schema = f"ct_keys_{uuid.uuid4().hex[:10]}"
    keys = [old_key("acme"), old_key("other")]
    rows = ", ".join(f"('{i}', '{p}', '{h}', {c}, NULL)" for _, (i, p, h, c, _r) in keys)
    postgres_execute(
        f"CREATE SCHEMA {schema};"
        + OLD_SCHEMA.replace("api_keys", f"{schema}.api_keys").replace("INTEGER", "BIGINT")
        + ";"
        f" INSERT INTO {schema}.api_keys VALUES {rows}"
    )
    store = ["--db", POSTGRES_DSN, "--schema", schema]
    try:
        listing = calltrace("keys", *store, "list")
        assert listing.returncode == 0, listing.stderr
        assert listed_ids(listing.stdout) == [key_id_for(hash_key(key)) for key, _ in keys]
        assert not [old_id for _, (old_id, *_r) in keys if old_id in listing.stdout]

        async def project_of(key: str) -> str | None:
            auth = AuthProcessor(
                "auth", AuthConfig(key_store=POSTGRES_DSN, key_store_schema=schema)
            )
            await auth.start(FakeTelemetryHost())
            try:
                info = RequestInfo(headers={"authorization": f"Bearer {key}"})
                await auth.admit(info)
                return info.project
            except UnauthenticatedError:
                return None
            finally:
                await auth.shutdown()

        assert asyncio.run(project_of(keys[1][0])) == "other"
        new_id = key_id_for(hash_key(keys[1][0]))
        assert calltrace("keys", *store, "revoke", new_id).stdout.strip() == f"revoked {new_id}"
        assert asyncio.run(project_of(keys[1][0])) is None
        assert asyncio.run(project_of(keys[0][0])) == "acme"
    finally:
        postgres_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


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
