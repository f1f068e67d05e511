"""The coordination interface. The memory backend serves one process; Redis many replicas."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

Invalidation = Callable[[str, str], Awaitable[None]]


class Coordinator(Protocol):
    def lock(self, user: str, provider: str) -> AbstractAsyncContextManager[None]:
        """Exclusive section for one (user, provider) grant: refresh runs only inside it."""
        ...

    async def publish_invalidation(self, user: str, provider: str) -> None:
        """Tell every worker to drop (user, provider) from its caches."""
        ...

    def on_invalidation(self, callback: Invalidation) -> None: ...

    async def check(self) -> None: ...

    async def close(self) -> None: ...
