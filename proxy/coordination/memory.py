"""In-process coordination: asyncio locks, invalidation delivered to local subscribers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from proxy.coordination.base import Invalidation


class MemoryCoordinator:
    """The embedded default. Locks are per (user, provider) and freed when nobody holds or
    waits for them, so memory does not grow with the number of users seen."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}
        self._subscribers: list[Invalidation] = []

    @asynccontextmanager
    async def lock(self, user: str, provider: str) -> AsyncIterator[None]:
        key = (user, provider)
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def publish_invalidation(self, user: str, provider: str) -> None:
        for callback in list(self._subscribers):
            await callback(user, provider)

    def on_invalidation(self, callback: Invalidation) -> None:
        self._subscribers.append(callback)

    async def check(self) -> None:
        return None

    async def close(self) -> None:
        self._subscribers.clear()
