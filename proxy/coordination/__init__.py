"""Coordination between the proxy's workers: per-grant locks and cache invalidation."""

from proxy.coordination.base import Coordinator
from proxy.coordination.memory import MemoryCoordinator

__all__ = ["Coordinator", "MemoryCoordinator"]
