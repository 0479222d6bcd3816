"""API keys: random bearer tokens, stored only as SHA-256 hashes, each owned by a project.

``calltrace keys create --project P`` prints a new key once; the database keeps its hash
and a key id (``key_`` and 16 hex digits) to tell keys apart in ``keys list``, in logs
and for ``keys revoke``. The id is derived one way from the key's hash
(``key_id_for``), so it carries no key material, and the same key has the same id in
every store.

Stores written by an older calltrace kept the first eight characters of the secret as
the id (``ct_`` and those 8 characters); opening such a store replaces those ids with
derived ones (the keys themselves keep working).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collector.storage import open_sqlite

__all__ = [
    "KeyRecord",
    "KeyStore",
    "PostgresKeyStore",
    "hash_key",
    "is_postgres_location",
    "key_id_for",
]

KEY_PREFIX = "ct_"
"""Every key starts with it; so did the ids of older stores (``ct_`` + 8 secret chars)."""
KEY_ID_PREFIX = "key_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id     TEXT PRIMARY KEY,
    project    TEXT NOT NULL,
    key_hash   TEXT NOT NULL UNIQUE,
    created_ns INTEGER NOT NULL,
    revoked_ns INTEGER
);
"""


def hash_key(key: str) -> str:
    """The SHA-256 (hex) of a key: all a store keeps of it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_for(key_hash: str) -> str:
    """The public id of the key whose ``hash_key`` is ``key_hash``: a second, domain-
    separated SHA-256, so it reveals nothing of the key (nor is it a piece of the
    stored hash); 64 bits, unique among any realistic number of keys."""
    digest = hashlib.sha256(b"calltrace key id\x00" + key_hash.encode("ascii")).hexdigest()
    return KEY_ID_PREFIX + digest[:16]


def _new_key() -> tuple[str, str]:
    """A new key and its hash."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key)


_OLD_IDS = (
    f"SELECT key_id, key_hash FROM {{table}} WHERE substr(key_id, 1, {len(KEY_ID_PREFIX)})"
    f" <> '{KEY_ID_PREFIX}'"
)
"""Rows whose id is not a derived one (an older calltrace's ``ct_`` + secret prefix)."""


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    project: str
    created_ns: int
    revoked_ns: int | None

    @property
    def revoked(self) -> bool:
        return self.revoked_ns is not None


class KeyStore:
    """Keys in an SQLite file (the same file the ``sqlite`` exporter uses by default)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = open_sqlite(self.path, busy_timeout_ms=5000)
        self._db.executescript(_SCHEMA)
        self._migrate_ids()

    def _migrate_ids(self) -> None:
        """Give keys of an older store their derived ids, in one transaction, with the
        old ids' bytes overwritten in the file (``secure_delete``, then a checkpoint that
        empties the write-ahead log, which held them as written)."""
        with self._lock:
            old = self._db.execute(_OLD_IDS.format(table="api_keys")).fetchall()
            if not old:
                return
            self._db.execute("PRAGMA secure_delete=ON")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(
                        "UPDATE api_keys SET key_id = ? WHERE key_hash = ?",
                        [(key_id_for(key_hash), key_hash) for _old_id, key_hash in old],
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            finally:
                self._db.execute("PRAGMA secure_delete=OFF")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def create(self, project: str) -> tuple[str, KeyRecord]:
        """A new key for ``project``: returns the plaintext (shown once) and its record."""
        if not project or not project.strip():
            raise ValueError("project must not be empty")
        key, key_hash = _new_key()
        record = KeyRecord(key_id_for(key_hash), project, time.time_ns(), None)
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys (key_id, project, key_hash, created_ns) VALUES (?,?,?,?)",
                (record.key_id, project, key_hash, record.created_ns),
            )
        return key, record

    def verify(self, key: str) -> str | None:
        """The project of a valid, unrevoked key, else None."""
        digest = hash_key(key)
        with self._lock:
            row = self._db.execute(
                "SELECT key_hash, project, revoked_ns FROM api_keys WHERE key_hash = ?",
                (digest,),
            ).fetchone()
        if row is None or row[2] is not None:
            return None
        return row[1] if hmac.compare_digest(row[0], digest) else None

    def list(self, project: str | None = None) -> list[KeyRecord]:
        query = "SELECT key_id, project, created_ns, revoked_ns FROM api_keys"
        args: tuple[str, ...] = ()
        if project is not None:
            query += " WHERE project = ?"
            args = (project,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_ns", args).fetchall()
        return [KeyRecord(*row) for row in rows]

    def revoke(self, key_or_id: str) -> str | None:
        """Revoke by key id (as ``keys list`` shows it) or by the key itself; returns
        the id of the key revoked, None when no active key matched."""
        with self._lock:
            rows = self._db.execute(
                "UPDATE api_keys SET revoked_ns = ? WHERE (key_id = ? OR key_hash = ?)"
                " AND revoked_ns IS NULL RETURNING key_id",
                (time.time_ns(), key_or_id, hash_key(key_or_id)),
            ).fetchall()
        return str(rows[0][0]) if rows else None

    def close(self) -> None:
        self._db.close()


_PG_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.api_keys (
    key_id     TEXT PRIMARY KEY,
    project    TEXT NOT NULL,
    key_hash   TEXT NOT NULL UNIQUE,
    created_ns BIGINT NOT NULL,
    revoked_ns BIGINT
);
"""


def is_postgres_location(location: str | Path) -> bool:
    """Whether a ``key_store`` names a PostgreSQL database rather than an SQLite file."""
    return str(location).startswith(("postgresql://", "postgres://"))


class PostgresKeyStore:
    """Keys in PostgreSQL, shared by every collector of a gateway (``key_store:
    postgresql://...``). The same hashes and ids as ``KeyStore``; async methods."""

    def __init__(self, dsn: str, schema: str = "calltrace"):
        if not schema.isidentifier() or schema.lower() != schema:
            raise ValueError(f"expected a lower-case SQL identifier, got {schema!r}")
        self.dsn = dsn
        self.schema = schema
        self._pool: Any = None

    async def open(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            await conn.execute("SELECT pg_advisory_lock(hashtext('calltrace-keys-schema'))")
            await conn.execute(_PG_SCHEMA.format(schema=self.schema))
            await self._migrate_ids(conn)
            await conn.execute("SELECT pg_advisory_unlock(hashtext('calltrace-keys-schema'))")
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2, timeout=10)

    async def _migrate_ids(self, conn: Any) -> None:
        """Give keys of an older store their derived ids (under the schema lock)."""
        table = f"{self.schema}.api_keys"
        old = await conn.fetch(_OLD_IDS.format(table=table))
        if old:
            async with conn.transaction():
                await conn.executemany(
                    f"UPDATE {table} SET key_id = $1 WHERE key_hash = $2",
                    [(key_id_for(row["key_hash"]), row["key_hash"]) for row in old],
                )

    async def create(self, project: str) -> tuple[str, KeyRecord]:
        if not project or not project.strip():
            raise ValueError("project must not be empty")
        key, key_hash = _new_key()
        record = KeyRecord(key_id_for(key_hash), project, time.time_ns(), None)
        await self._pool.execute(
            f"INSERT INTO {self.schema}.api_keys (key_id, project, key_hash, created_ns)"
            " VALUES ($1, $2, $3, $4)",
            record.key_id,
            project,
            key_hash,
            record.created_ns,
        )
        return key, record

    async def verify(self, key: str) -> str | None:
        digest = hash_key(key)
        row = await self._pool.fetchrow(
            f"SELECT key_hash, project, revoked_ns FROM {self.schema}.api_keys WHERE key_hash = $1",
            digest,
        )
        if row is None or row["revoked_ns"] is not None:
            return None
        return row["project"] if hmac.compare_digest(row["key_hash"], digest) else None

    async def list(self, project: str | None = None) -> list[KeyRecord]:
        rows = await self._pool.fetch(
            f"SELECT key_id, project, created_ns, revoked_ns FROM {self.schema}.api_keys"
            " WHERE $1::text IS NULL OR project = $1 ORDER BY created_ns",
            project,
        )
        return [KeyRecord(*row) for row in rows]

    async def revoke(self, key_or_id: str) -> str | None:
        """As ``KeyStore.revoke``."""
        key_id = await self._pool.fetchval(
            f"UPDATE {self.schema}.api_keys SET revoked_ns = $1"
            " WHERE (key_id = $2 OR key_hash = $3) AND revoked_ns IS NULL RETURNING key_id",
            time.time_ns(),
            key_or_id,
            hash_key(key_or_id),
        )
        return None if key_id is None else str(key_id)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
