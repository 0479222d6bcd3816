"""Sealed page cursors: the query API accepts only cursors it issued.

A store's cursor (``collector.query.encode_cursor``: the sort position of a page's last
item) goes out sealed, ``<cursor>.<tag>``, the tag an HMAC-SHA256 (128 bits) over the
endpoint it was issued for and the cursor. A cursor that comes back is checked before
any of it is parsed: one the API did not issue, one changed by a character, or one of
another endpoint is a ``QueryError`` naming ``cursor`` (HTTP 400).

The key is a random secret kept in the storage database itself (``shared_secret`` of the
query store, created on first use), so every instance reading one store (workers, a
gateway's instances behind a load balancer) issues and accepts the same cursors, and
no configuration is needed. A store that cannot keep one (a read-only database, a plugin
store without ``shared_secret``) gets a key of this process: its cursors then page only
on the instance that issued them, and a warning says so.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
from typing import Any

from collector.query import QueryError

log = logging.getLogger(__name__)

__all__ = ["MAX_CURSOR_CHARS", "CursorSeal", "LazySeal", "cursor_seal_for"]

MAX_CURSOR_CHARS = 512
"""Longer cursors are refused unread (the API issues ~60-character ones)."""
SECRET_NAME = "query.cursor"
"""The name of the cursor key among a store's shared secrets."""
_TAG_CHARS = 22  # 16 bytes, base64url without padding
_NOT_ISSUED = "cursor: not a cursor this API returned (pass a page's next_cursor as it is)"


class CursorSeal:
    """Seals and opens cursors with one key."""

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("a cursor key needs at least 16 bytes")
        self._key = key

    def _tag(self, endpoint: str, cursor: str) -> str:
        message = f"{endpoint}\0{cursor}".encode("utf-8", "surrogatepass")
        digest = hmac.new(self._key, message, hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def seal(self, endpoint: str, cursor: str) -> str:
        """``cursor`` (a store's, no ``.`` in it) as handed to clients of ``endpoint``."""
        return f"{cursor}.{self._tag(endpoint, cursor)}"

    def open(self, endpoint: str, token: str) -> str:
        """The store's cursor inside ``token``; ``QueryError`` unless this key sealed it
        for ``endpoint``."""
        if len(token) > MAX_CURSOR_CHARS or not token.isascii():
            raise QueryError(_NOT_ISSUED)
        cursor, dot, tag = token.rpartition(".")
        if not dot or len(tag) != _TAG_CHARS or not cursor:
            raise QueryError(_NOT_ISSUED)
        if not hmac.compare_digest(tag, self._tag(endpoint, cursor)):
            raise QueryError(_NOT_ISSUED)
        return cursor


async def cursor_seal_for(store: Any) -> CursorSeal:
    """A seal keyed with ``store``'s shared cursor secret, or with a key of this process
    when the store cannot keep one. ``StorageUnavailableError`` passes through (503)."""
    shared_secret = getattr(store, "shared_secret", None)
    key: bytes | None = None
    if callable(shared_secret):
        key = await shared_secret(SECRET_NAME)
    if key is None:
        log.warning(
            "query API: the store cannot keep a shared cursor key; cursors page only on"
            " the instance that issued them"
        )
        key = os.urandom(32)
    return CursorSeal(key)


class LazySeal:
    """The seal of one store, made on first use (one database round trip, shared)."""

    def __init__(self, store: Any):
        self._store = store
        self._seal: CursorSeal | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> CursorSeal:
        if self._seal is None:
            async with self._lock:
                if self._seal is None:
                    self._seal = await cursor_seal_for(self._store)
        return self._seal
