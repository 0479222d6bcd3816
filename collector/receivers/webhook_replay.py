"""Refusing a replayed webhook: each signed request is accepted once while it is valid.

A guard remembers the requests it has admitted (by a digest of token and body) until
their token expires. ``claim(digest, ttl)`` answers whether the digest is new and, if
so, holds it for ``ttl`` seconds; ``release(digest)`` forgets it again, so a sender
may retry a request that failed on our side (the sender re-sends the very same token).

- ``MemoryReplayGuard``: one process; at most ``capacity`` digests held at once.
- ``RedisReplayGuard``: shared by every instance, ``SET key NX PX ttl`` per digest.
"""

from __future__ import annotations

import heapq
import time
from typing import Any, Protocol

from collector.redisconn import RedisSettings, redis_client

__all__ = ["MemoryReplayGuard", "RedisReplayGuard", "ReplayGuard", "ReplayGuardFull"]


class ReplayGuardFull(Exception):
    """Every slot holds a digest that is still valid: the request cannot be admitted
    now without forgetting one (which would let its replay through)."""


class ReplayGuard(Protocol):
    async def start(self) -> None: ...

    async def claim(self, digest: str, ttl: float) -> bool:
        """True when ``digest`` was not held: it is now, for ``ttl`` seconds. False for a
        replay. Raises ``ReplayGuardFull`` (memory) or the store's error (Redis)."""
        ...

    async def release(self, digest: str) -> None:
        """Forget ``digest`` (its request failed and may be sent again)."""
        ...

    async def close(self) -> None: ...


class MemoryReplayGuard:
    """Digests held in this process, at most ``capacity`` at once; expired ones are
    dropped as new ones arrive (a heap ordered by expiry)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._expiry: dict[str, float] = {}
        self._by_expiry: list[tuple[float, str]] = []

    async def start(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._expiry)

    def _drop_expired(self, now: float) -> None:
        heap = self._by_expiry
        while heap and heap[0][0] <= now:
            expiry, digest = heapq.heappop(heap)
            if self._expiry.get(digest) == expiry:
                del self._expiry[digest]

    async def claim(self, digest: str, ttl: float) -> bool:
        now = time.monotonic()
        self._drop_expired(now)
        if digest in self._expiry:
            return False
        if len(self._expiry) >= self.capacity:
            raise ReplayGuardFull(f"{self.capacity} webhook tokens are still valid")
        expiry = now + max(ttl, 0.0)
        self._expiry[digest] = expiry
        heapq.heappush(self._by_expiry, (expiry, digest))
        return True

    async def release(self, digest: str) -> None:
        # The heap entry stays until it expires; its expiry no longer matches.
        self._expiry.pop(digest, None)

    async def close(self) -> None:
        self._expiry.clear()
        self._by_expiry.clear()


class RedisReplayGuard:
    """Digests held in Redis as keys ``{prefix}{digest}`` that expire with the token, so
    a request admitted by one instance is a replay at every other."""

    def __init__(self, settings: RedisSettings, prefix: str):
        self.settings = settings
        self.prefix = prefix
        self._client: Any = None

    async def start(self) -> None:
        self._client = redis_client(self.settings)

    async def claim(self, digest: str, ttl: float) -> bool:
        ttl_ms = max(int(ttl * 1000), 1)
        return bool(await self._client.set(self.prefix + digest, b"1", nx=True, px=ttl_ms))

    async def release(self, digest: str) -> None:
        await self._client.delete(self.prefix + digest)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
