"""In-process coordination: the embedded default, for a single proxy process."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from proxy.coordination.base import Invalidation, Lease
from proxy.coordination.keyed import KeyedLocks
from proxy.identity import ReplayGuard
from proxy.vault.base import Grant


class _Held:
    def valid(self) -> bool:
        return True


class MemoryCoordinator:
    """Locks are asyncio locks; there is no shared cache (the broker's memory cache is the
    only one); one-time ``jti`` values are remembered in this process."""

    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._locks = KeyedLocks()
        self._subscribers: list[Invalidation] = []
        self._jti = ReplayGuard(clock)

    async def start(self) -> None:
        return None

    @asynccontextmanager
    async def lock(self, user: str, provider: str) -> AsyncIterator[Lease]:
        async with self._locks.hold((user, provider)):
            yield _Held()

    async def cache_get(self, user: str, provider: str) -> Grant | None:
        return None

    async def cache_put(self, grant: Grant) -> None:
        return None

    async def cache_forget(self, grant_key: tuple[str, str], version: int) -> None:
        return None

    async def publish_invalidation(self, user: str, provider: str) -> None:
        return None  # one process: the broker already dropped its own entry

    def on_invalidation(self, callback: Invalidation) -> None:
        self._subscribers.append(callback)

    async def first_use(self, issuer: str, jti: str, expires_at: float) -> bool:
        return await self._jti.first_use(issuer, jti, expires_at)

    async def check(self) -> None:
        return None

    async def close(self) -> None:
        self._subscribers.clear()
