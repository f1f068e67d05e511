"""In-process coordination: the embedded default, for a single proxy process."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from proxy.coordination.base import USED, Invalidation, Lease, Used
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
        self._clock = clock
        self._jti = ReplayGuard(clock)
        self._once: dict[str, tuple[bytes, float]] = {}
        self._used: dict[str, float] = {}
        self._uses: dict[tuple[str, str], float] = {}  # (user, provider) -> last injected

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
        """Tell this process's subscribers (the token broker): a grant changed outside
        the broker, e.g. a user connected again (another tenant, another scope)."""
        for callback in list(self._subscribers):
            await callback((user, provider))

    def on_invalidation(self, callback: Invalidation) -> None:
        self._subscribers.append(callback)

    async def put_once(self, name: str, value: bytes, ttl: float) -> None:
        now = self._clock()
        self._once = {k: v for k, v in self._once.items() if v[1] > now}
        self._used = {k: t for k, t in self._used.items() if t > now}
        self._once[name] = (value, now + ttl)

    async def take_once(self, name: str) -> bytes | None | Used:
        now = self._clock()
        entry = self._once.pop(name, None)
        if entry is not None and entry[1] > now:
            self._used[name] = entry[1]
            return entry[0]
        return USED if self._used.get(name, 0.0) > now else None

    async def first_use(self, issuer: str, jti: str, expires_at: float,
                        issued_at: float | None = None) -> bool:
        return await self._jti.first_use(issuer, jti, expires_at, issued_at)

    async def note_use(self, user: str, provider: str, at: float) -> None:
        self._uses[(user, provider)] = max(at, self._uses.get((user, provider), 0.0))

    async def last_uses(self, user: str, providers: list[str]) -> dict[str, float]:
        return {p: self._uses[(user, p)] for p in providers if (user, p) in self._uses}

    async def check(self) -> None:
        return None

    async def close(self) -> None:
        self._subscribers.clear()
