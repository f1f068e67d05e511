"""The coordination interface. The memory backend serves one process; Redis many replicas.

Contract every backend keeps:

- ``lock`` is exclusive across every process sharing the backend; the yielded
  :class:`Lease` says whether it is still held (a refresh must not start on a lost lease).
- ``cache_*`` is a cache shared by replicas. It may lose entries at any time; ``cache_put``
  refuses a grant older than the latest ``cache_forget`` of that grant, so a revoked grant
  cannot come back from the cache.
- Invalidation callbacks run for every grant another worker forgot, and with ``None`` when
  messages may have been missed (drop everything).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from proxy.errors import CoordinationUnavailable
from proxy.vault.base import Grant

# (user, provider), or None for "drop every cached grant".
__all__ = ["USED", "USE_TTL", "CoordinationUnavailable", "Coordinator", "Invalidation", "Lease",
           "Used"]

# How long a last-use record is kept (seconds): a grant unused this long shows "never".
USE_TTL = 90 * 24 * 3600

Invalidation = Callable[[tuple[str, str] | None], Awaitable[None]]


class Used:
    """Marker: a single-use value was already taken."""

    def __repr__(self) -> str:
        return "USED"


USED = Used()


class Lease(Protocol):
    def valid(self) -> bool: ...


class Coordinator(Protocol):
    name: str

    async def start(self) -> None:
        """Begin background work (subscriptions); called once inside the event loop."""
        ...

    def lock(self, user: str, provider: str) -> AbstractAsyncContextManager[Lease]:
        """Exclusive section for one grant: a refresh runs only inside it."""
        ...

    async def cache_get(self, user: str, provider: str) -> Grant | None: ...

    async def cache_put(self, grant: Grant) -> None: ...

    async def cache_forget(self, grant_key: tuple[str, str], version: int) -> None:
        """Drop the shared entry and refuse later puts of versions <= ``version``."""
        ...

    async def publish_invalidation(self, user: str, provider: str) -> None:
        """Tell every other worker to drop (user, provider) from its memory cache."""
        ...

    def on_invalidation(self, callback: Invalidation) -> None: ...

    async def put_once(self, name: str, value: bytes, ttl: float) -> None:
        """Store a single-use value (e.g. OAuth state) for ``ttl`` seconds."""
        ...

    async def take_once(self, name: str) -> bytes | None | Used:
        """Take a single-use value: the value once, then :data:`USED`; None if unknown or
        expired."""
        ...

    async def first_use(self, issuer: str, jti: str, expires_at: float,
                        issued_at: float | None = None) -> bool:
        """Record a one-time ``jti``; False when it was seen before, or when the store
        lost its records after ``issued_at`` (a restart) and so cannot tell."""
        ...

    async def note_use(self, user: str, provider: str, at: float) -> None:
        """Record that ``user``'s grant of ``provider`` was injected at ``at`` (unix
        seconds; callers throttle: :data:`proxy.sidecar.USE_NOTE_INTERVAL`)."""
        ...

    async def last_uses(self, user: str, providers: list[str]) -> dict[str, float]:
        """When each of ``user``'s grants was last noted used (unix seconds); a provider
        never noted (or forgotten: entries lapse after :data:`USE_TTL`) is absent."""
        ...

    async def check(self) -> None: ...

    async def close(self) -> None: ...
