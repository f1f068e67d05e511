"""The key layout for hash slots (issue 18), against a real redis-server that enforces the
cluster's rule: a one-node Redis Cluster holding every slot, reached with a plain client
(``mode: standalone``), as a proxy in front of a cluster is (Azure Managed Redis with the
Enterprise cluster policy refuses a multi-key command or script across slots).

- Without ``slot_safe_keys`` the refresh lock's script (the grant's lock and a global boot
  marker) is refused with CROSSSLOT: the fault the issue found;
- with it, every operation works: locks, the shared cache and its revocation guard,
  single-use values, one-time jti values, invalidations;
- each bucket's boot marker is planted, and a bucket whose marker is gone later (its
  shard lost its data) is fenced while the others are not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from devstack.procs import free_port
from devstack.redisproc import RedisServer
from proxy.coordination.redis import BUCKETS, RedisCoordinator
from proxy.errors import CoordinationFencing, CoordinationUnavailable
from proxy.secret import Secret
from proxy.settings import CoordinationSettings
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant

KEY = bytes(range(32))


@pytest.fixture(scope="module")
def one_node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("slots"),
                         extra=["cluster-enabled yes", "cluster-config-file nodes.conf",
                                f"cluster-port {free_port()}"])
    server.start()
    try:
        assert server.command("CLUSTER", "ADDSLOTSRANGE", "0", "16383").startswith(b"+OK")
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in server.command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the one-node cluster never became ok"
            time.sleep(0.05)
        yield server
    finally:
        server.stop()


@pytest.fixture
async def raw(one_node_cluster: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(one_node_cluster.url.removesuffix("/0"))
    try:
        yield client
    finally:
        await client.aclose()


def coordinator(server: RedisServer, prefix: str, *, slotted: bool,
                quiet: float = 0.0) -> RedisCoordinator:
    settings = CoordinationSettings(backend="redis", url=server.url.removesuffix("/0"),
                                    key_prefix=prefix, slot_safe_keys=slotted, lock_wait=1)
    return RedisCoordinator(settings, cache_key=KEY, quiet_period=quiet)


def grant(user: str, access: str, version: int) -> Grant:
    return Grant(user, "docs", TokenSet(Secret(access), Secret("rt-" + access),
                                        expires_at=time.time() + 600), version=version)


async def test_the_legacy_layout_is_refused_across_slots(one_node_cluster: RedisServer) -> None:
    """The issue's fault: the lock script spans the grant's slot and the boot marker's."""
    c = coordinator(one_node_cluster, "legacy:", slotted=False)
    try:
        with pytest.raises(CoordinationUnavailable, match="refresh lock"):
            async with c.lock("alice", "docs"):
                pass
    finally:
        await c.close()


async def test_every_operation_works_with_slot_safe_keys(one_node_cluster: RedisServer,
                                                         raw: aioredis.Redis) -> None:
    a = coordinator(one_node_cluster, "slots:", slotted=True)
    b = coordinator(one_node_cluster, "slots:", slotted=True)
    heard: list[tuple[str, str] | None] = []

    async def on_invalidation(key: tuple[str, str] | None) -> None:
        heard.append(key)

    b.on_invalidation(on_invalidation)
    try:
        await a.start()
        await b.start()
        await asyncio.wait_for(b.subscribed.wait(), 10)
        # Every bucket's marker is planted, each in its bucket's slot.
        markers = await raw.keys("slots:boot:*")
        assert len(markers) == BUCKETS
        for user in ("alice", "bob", "carol", "dave"):
            async with a.lock(user, "docs") as lease:
                assert lease.valid()
            await a.cache_put(grant(user, f"at-{user}", 3))
            got = await b.cache_get(user, "docs")
            assert got is not None and got.tokens.access_token == Secret(f"at-{user}")
            await a.cache_forget((user, "docs"), 4)
            await a.cache_put(grant(user, f"at-{user}", 3))  # stale: refused
            assert await b.cache_get(user, "docs") is None
        # Every key of a grant shares its slot: one hash tag per key.
        for k in await raw.keys("slots:*"):
            name = k.decode()
            assert name.count("{") == 1 and name.count("}") == 1, name
        await a.put_once("state:abc", b"value", 60)
        assert await b.take_once("state:abc") == b"value"
        assert repr(await b.take_once("state:abc")) == "USED"
        assert await a.first_use("iss", "jti-1", time.time() + 60)
        assert not await b.first_use("iss", "jti-1", time.time() + 60)
        heard.clear()
        await a.publish_invalidation("alice", "docs")
        for _ in range(50):
            if ("alice", "docs") in heard:
                break
            await asyncio.sleep(0.02)
        assert ("alice", "docs") in heard
    finally:
        await a.close()
        await b.close()


async def test_a_bucket_that_lost_its_marker_is_fenced_alone(one_node_cluster: RedisServer,
                                                            raw: aioredis.Redis) -> None:
    """A shard that comes back empty loses the markers of its buckets: the grants in those
    buckets wait out the quiet period; grants in other buckets refresh at once."""
    c = coordinator(one_node_cluster, "fence:", slotted=True, quiet=30)
    try:
        await c.start()
        await asyncio.wait_for(c.subscribed.wait(), 10)
        async with c.lock("alice", "docs"):
            pass
        lost = c._marker(c._key("lock", "alice", "docs"))
        users = [f"user{i}" for i in range(40)]
        other = next(u for u in users if c._marker(c._key("lock", u, "docs")) != lost)
        await raw.delete(lost)  # that bucket's data is gone
        with pytest.raises(CoordinationFencing) as fenced:
            async with c.lock("alice", "docs"):
                pass
        assert 25 < fenced.value.remaining <= 30
        async with c.lock(other, "docs") as lease:  # another bucket: not fenced
            assert lease.valid()
    finally:
        await c.close()


def test_keys_of_a_grant_land_in_one_slot(one_node_cluster: RedisServer, tmp_path: Path) -> None:
    """CLUSTER KEYSLOT of a grant's lock, cache entry, guard and its bucket's marker agree;
    and the 256 buckets spread over many slots (so over every shard of a real cluster)."""
    c = coordinator(one_node_cluster, "slot:", slotted=True)

    def slot(key: str) -> int:
        answer = one_node_cluster.command("CLUSTER", "KEYSLOT", key)
        return int(answer.strip().lstrip(b":"))

    try:
        names = [c._key(kind, "alice", "docs") for kind in ("lock", "tok", "gen")]
        names.append(c._marker(names[0]))
        assert len({slot(n) for n in names}) == 1, names
        once = [c._single("once", "state:x"), c._single("used", "state:x")]
        assert slot(once[0]) == slot(once[1])
        spread = {slot(m) for m in c._markers()}
        assert len(spread) == BUCKETS
        assert min(spread) < 5461 and max(spread) > 10923  # all three ranges of 3 shards
    finally:
        asyncio.run(c.close())


def test_a_redis_that_refuses_wait_names_replica_acks(tmp_path: Path) -> None:
    """A server (or proxy) without WAIT: the refresh is refused naming the setting, and
    the lock the script had taken is released at once (another replica can take it)."""
    server = RedisServer(tmp_path, extra=['rename-command WAIT ""'])
    server.start()

    async def run() -> None:
        strict = RedisCoordinator(CoordinationSettings(
            backend="redis", url=server.url, key_prefix="w:", replica_acks=1, lock_wait=1),
            cache_key=KEY)
        loose = RedisCoordinator(CoordinationSettings(
            backend="redis", url=server.url, key_prefix="w:", replica_acks=0, lock_wait=1),
            cache_key=KEY)
        try:
            with pytest.raises(CoordinationUnavailable, match="coordination.replica_acks"):
                async with strict.lock("alice", "docs"):
                    pass
            async with loose.lock("alice", "docs") as lease:  # released, not left behind
                assert lease.valid()
        finally:
            await strict.close()
            await loose.close()

    try:
        asyncio.run(run())
    finally:
        server.stop()
