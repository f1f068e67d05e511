"""RedisCoordinator against a real (private) redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from devstack.redisproc import RedisServer
from proxy.coordination.redis import RedisCoordinator
from proxy.errors import CoordinationFencing, CoordinationUnavailable
from proxy.secret import Secret
from proxy.settings import CoordinationSettings
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant

KEY = bytes(range(32))


def coordinator(server: RedisServer, **kw: object) -> RedisCoordinator:
    settings = CoordinationSettings(backend="redis", url=server.url, key_prefix="u:",
                                    **kw)  # type: ignore[arg-type]
    return RedisCoordinator(settings, cache_key=KEY)


def grant(access: str, version: int, ttl: float = 600) -> Grant:
    return Grant("alice", "docs", TokenSet(Secret(access), Secret("rt-" + access),
                                           expires_at=time.time() + ttl), version=version)


async def test_shared_cache_round_trip_is_encrypted(redis_server: RedisServer) -> None:
    c = coordinator(redis_server)
    try:
        await c.cache_put(grant("at-canary-1", 1))
        got = await c.cache_get("alice", "docs")
        assert got is not None and got.tokens.access_token == Secret("at-canary-1")
        assert await c.cache_get("bob", "docs") is None
        raw = aioredis.Redis.from_url(redis_server.url)
        keys = await raw.keys("u:*")
        values = b"".join([await raw.get(k) or b"" for k in keys])
        assert keys and b"at-canary-1" not in values and b"alice" not in b"".join(keys)
        ttl = await raw.pttl(keys[0])
        assert 590_000 < ttl <= 600_000  # bound to the token's expiry
        await raw.aclose()
    finally:
        await c.close()


async def test_forget_refuses_stale_puts_but_not_newer_ones(redis_server: RedisServer) -> None:
    c = coordinator(redis_server)
    try:
        await c.cache_put(grant("a1", 3))
        await c.cache_forget(("alice", "docs"), 4)  # revoked at version 4
        assert await c.cache_get("alice", "docs") is None
        await c.cache_put(grant("a1", 3))  # a replica that read the vault before the revoke
        assert await c.cache_get("alice", "docs") is None
        await c.cache_put(grant("a2", 5))  # the user reconnected
        got = await c.cache_get("alice", "docs")
        assert got is not None and got.tokens.access_token == Secret("a2")
    finally:
        await c.close()


async def test_entry_from_another_key_is_rejected(redis_server: RedisServer) -> None:
    a = coordinator(redis_server)
    b = RedisCoordinator(CoordinationSettings(backend="redis", url=redis_server.url,
                                              key_prefix="u:"), cache_key=bytes(32))
    try:
        await a.cache_put(grant("a1", 1))
        assert await b.cache_get("alice", "docs") is None
    finally:
        await a.close()
        await b.close()


async def test_lock_is_exclusive_and_waiters_wake_on_release(
        redis_server: RedisServer) -> None:
    a, b = coordinator(redis_server), coordinator(redis_server)
    await a.start()
    await b.start()
    await asyncio.wait_for(b.subscribed.wait(), 5)
    order: list[str] = []
    try:
        async def holder() -> None:
            async with a.lock("alice", "docs"):
                order.append("a-in")
                await asyncio.sleep(0.5)
                order.append("a-out")

        async def waiter() -> float:
            await asyncio.sleep(0.1)
            async with b.lock("alice", "docs"):
                order.append("b-in")
                return time.monotonic()

        t0 = time.monotonic()
        _, b_in = await asyncio.gather(holder(), waiter())
        assert order == ["a-in", "a-out", "b-in"]
        # Woken by the release message, not the one-second fallback poll.
        assert b_in - t0 < 0.9
    finally:
        await a.close()
        await b.close()


async def test_lease_is_renewed_while_held(redis_server: RedisServer) -> None:
    a, b = coordinator(redis_server, lock_lease=1), coordinator(redis_server, lock_lease=1,
                                                                lock_wait=1.5)
    try:
        async with a.lock("alice", "docs") as lease:
            with pytest.raises(CoordinationUnavailable, match="timed out"):
                async with b.lock("alice", "docs"):
                    pass
            assert lease.valid()
    finally:
        await a.close()
        await b.close()


async def test_one_time_jti(redis_server: RedisServer) -> None:
    a, b = coordinator(redis_server), coordinator(redis_server)
    try:
        exp = time.time() + 60
        assert await a.first_use("iss", "j1", exp)
        assert not await b.first_use("iss", "j1", exp)
        assert await b.first_use("iss", "j2", exp)
    finally:
        await a.close()
        await b.close()


async def test_unreachable_redis_is_coordination_unavailable(redis_server: RedisServer) -> None:
    c = coordinator(redis_server, op_timeout=0.3)
    redis_server.kill()
    try:
        with pytest.raises(CoordinationUnavailable):
            await c.check()
        with pytest.raises(CoordinationUnavailable):
            async with c.lock("alice", "docs"):
                pass
        with pytest.raises(CoordinationUnavailable):
            await c.first_use("iss", "j", time.time() + 60)
        assert await c.cache_get("alice", "docs") is None  # a miss, not an error
    finally:
        await c.close()


async def test_refresh_locks_are_held_back_after_redis_lost_its_data(
        redis_server: RedisServer) -> None:
    """A restart forgets every lock, including one a slow refresh still relies on: the
    first replica back plants a marker, and locks are refused until the longest possible
    refresh has ended. A refused lock says so at once, with the time left (no waiting out
    lock_wait)."""
    a = RedisCoordinator(CoordinationSettings(backend="redis", url=redis_server.url,
                                              key_prefix="u:", lock_wait=30),
                         cache_key=KEY, quiet_period=2.5)
    try:
        # A brand-new Redis: nobody can have been refreshing, no wait.
        async with a.lock("alice", "docs") as lease:
            assert lease.valid()
        assert a.fencing_remaining() == 0
        redis_server.restart()  # every key gone
        with pytest.raises(CoordinationFencing, match="lost its data recently") as first:
            async with a.lock("alice", "docs"):
                pass
        assert 0 < first.value.remaining <= 2.5
        assert 0 < a.fencing_remaining() <= 2.5
        # Another replica that never saw this Redis is held back too: the marker says so.
        b = RedisCoordinator(CoordinationSettings(backend="redis", url=redis_server.url,
                                                  key_prefix="u:", lock_wait=30),
                             cache_key=KEY, quiet_period=2.5)
        try:
            with pytest.raises(CoordinationFencing) as second:
                async with b.lock("alice", "docs"):
                    pass
            assert 0 < second.value.remaining <= first.value.remaining
            await asyncio.sleep(second.value.remaining + 0.1)
            async with b.lock("alice", "docs") as lease:
                assert lease.valid()
            assert b.fencing_remaining() == 0
        finally:
            await b.close()
    finally:
        await a.close()


async def test_lease_survives_a_stall_shorter_than_itself(redis_server: RedisServer) -> None:
    """One slow renewal must not give up the lease while it is still valid: a stall of the
    server longer than the command timeout but shorter than the lease keeps the lock."""
    a = coordinator(redis_server, lock_lease=1.5, op_timeout=0.2)
    b = coordinator(redis_server, lock_lease=1.5, lock_wait=0.5)
    try:
        async with a.lock("alice", "docs") as lease:
            await asyncio.sleep(0.45)  # just before the first renewal
            redis_server.pause()
            await asyncio.sleep(0.6)
            redis_server.resume()
            await asyncio.sleep(1.5)  # renewed after the stall, past the first lease's end
            assert lease.valid()
            with pytest.raises(CoordinationUnavailable, match="timed out"):
                async with b.lock("alice", "docs"):
                    pass
    finally:
        await a.close()
        await b.close()


async def test_lease_is_lost_when_redis_restarts_under_it(redis_server: RedisServer) -> None:
    a = coordinator(redis_server, lock_lease=1.5)
    try:
        async with a.lock("alice", "docs") as lease:
            redis_server.restart()
            await asyncio.sleep(1.0)  # the next renewal finds the lock gone
            assert not lease.valid()
    finally:
        await a.close()


async def test_one_time_jti_after_redis_lost_its_data(redis_server: RedisServer) -> None:
    """The records of used jti values are gone with a restart: a token issued before it
    cannot be proven unused, so it is refused; tokens issued afterwards are fine."""
    a = coordinator(redis_server)
    try:
        now = time.time()
        assert await a.first_use("iss", "j0", now + 60, issued_at=now - 30)  # a fresh Redis
        redis_server.restart()
        assert not await a.first_use("iss", "j1", now + 60, issued_at=now - 30)
        later = time.time() + 1
        assert await a.first_use("iss", "j2", later + 60, issued_at=later)
        assert not await a.first_use("iss", "j2", later + 60, issued_at=later)
    finally:
        await a.close()
