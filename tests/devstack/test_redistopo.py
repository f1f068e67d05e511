"""The local Redis Cluster and Sentinel harness (devstack.redistopo), proven with redis-py's
own clients (redis.asyncio.cluster.RedisCluster, redis.asyncio.sentinel.Sentinel): slots
spread over three primaries, hash-tagged scripts and the CROSSSLOT refusal, sharded and
classic pub/sub, a shard failover the client rides out, WAIT against the replica, a
whole-cluster restart that loses every key, a Sentinel failover the client follows, and the
same over TLS. Everything runs on free ports; every process is stopped by the fixtures.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ClusterCrossSlotError, ClusterDownError, RedisClusterException

from devstack.certs import make_ca, make_leaf
from devstack.redistopo import HASH_SLOTS, Node, RedisCluster, RedisSentinel
from tests.conftest import _need_redis

pytestmark = pytest.mark.integration

ACL = ("credproxy", "s3cret-topology")

# What redis-py raises while a primary is down (a refused connect, a reset connection, the
# cluster saying CLUSTERDOWN once its retries are spent, Sentinel's MasterNotFoundError).
_OUTAGE = (redis.ConnectionError, redis.TimeoutError, ClusterDownError)


async def _until_ok[T](op: Callable[[], Awaitable[T]], errors: list[Exception],
                       timeout: float = 20.0) -> T:
    """Await ``op`` until it succeeds, collecting the redis errors on the way."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await op()
        except redis.RedisError as e:
            errors.append(e)
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


def _kinds(errors: list[Exception]) -> dict[str, int]:
    return dict(Counter(type(e).__name__ for e in errors))


def _gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


async def _next_message(get: Callable[..., Awaitable[Any]]) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        msg = await get(ignore_subscribe_messages=True, timeout=0.5)
        if msg is not None:
            return dict(msg)
    raise AssertionError("no message within 5 s")


# -- Redis Cluster ---------------------------------------------------------------------------


@pytest.fixture(scope="class")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    _need_redis()
    topo = RedisCluster(tmp_path_factory.mktemp("cluster"), acl=ACL).start()
    try:
        yield topo
    finally:
        topo.stop()


@pytest.fixture
async def client(cluster: RedisCluster) -> AsyncIterator[ClusterClient]:
    c = ClusterClient.from_url(cluster.url, **cluster.client_kwargs())
    await c.initialize()
    try:
        yield c
    finally:
        await c.aclose()


def _port_of(client: ClusterClient, key: str) -> int:
    """The port of the primary redis-py's slot map names for ``key``."""
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


def _keys_on(client: ClusterClient, node: Node, prefix: str, n: int) -> list[str]:
    """``n`` keys that the client's slot map puts on ``node``."""
    keys = (f"{prefix}:{i}" for i in range(100_000))
    return list(itertools.islice((k for k in keys if _port_of(client, k) == node.port), n))


class TestCluster:
    """One cluster for these tests, in this order (the failover and restart tests change
    its layout and keys; each leaves it with 3 primaries and 3 replicas)."""

    async def test_keys_land_on_all_three_primaries(self, cluster: RedisCluster,
                                                    client: ClusterClient) -> None:
        primaries, replicas = cluster.primaries(), cluster.replicas()
        assert len(primaries) == 3 and len(replicas) == 3
        assert sorted(primaries + replicas) == sorted(cluster.nodes)
        assert all(len(cluster.replicas_of(p)) == 1 for p in primaries)
        assert {n.port for n in client.get_primaries()} == {p.port for p in primaries}

        keys = [f"user:{i}" for i in range(300)]
        for k in keys:
            assert await client.set(k, k)
        per_primary = {}
        for p in primaries:
            with cluster.admin(p) as r:
                per_primary[p] = r.dbsize()
        print("keys per primary:", {str(p): n for p, n in per_primary.items()})
        assert all(n > 0 for n in per_primary.values())
        assert sum(per_primary.values()) == len(keys)
        for k in keys[:10]:
            node = cluster.node_for_key(k)
            assert cluster.keyslot(k) == client.keyslot(k)
            assert _port_of(client, k) == node.port
            with cluster.admin(node) as r:
                assert r.get(k) == k
        # The ACL user is the only way in: the default user is off on every node.
        with redis.Redis(port=cluster.nodes[0].port) as anonymous:
            with pytest.raises(redis.AuthenticationError):
                anonymous.ping()

    async def test_hash_tagged_script_runs_and_a_cross_slot_one_is_refused(
            self, cluster: RedisCluster, client: ClusterClient) -> None:
        script = ("redis.call('set', KEYS[1], ARGV[1]); redis.call('set', KEYS[2], ARGV[1]);"
                  " return redis.call('mget', KEYS[1], KEYS[2])")
        tagged = ["{grant-1}:lock", "{grant-1}:epoch"]
        assert cluster.keyslot(tagged[0]) == cluster.keyslot(tagged[1])
        assert await client.eval(script, 2, *tagged, "v1") == [b"v1", b"v1"]
        registered = client.register_script(script)  # EVALSHA, loaded on demand
        assert await registered(keys=tagged, args=["v2"]) == [b"v2", b"v2"]

        cross = ["grant-1:lock", "boot-marker"]
        assert cluster.keyslot(cross[0]) != cluster.keyslot(cross[1])
        # redis-py's cluster client refuses it itself, before any server sees it...
        with pytest.raises(RedisClusterException, match="all keys must map to the same key slot"):
            await client.eval(script, 2, *cross, "x")
        # ...and the server, given it anyway, answers CROSSSLOT (what a standalone client of a
        # cluster node sees: issue 18's ClusterCrossSlotError).
        with pytest.raises(ClusterCrossSlotError):
            await client.execute_command("EVAL", script, 2, *cross, "x",
                                         target_nodes=client.get_node_from_key(cross[0]))
        with cluster.admin(cluster.node_for_key(cross[0])) as r:
            with pytest.raises(ClusterCrossSlotError):
                r.eval(script, 2, *cross, "x")
        assert await client.exists(*cross) == 0  # nothing was written

    async def test_sharded_and_classic_pubsub_through_the_cluster_client(
            self, cluster: RedisCluster, client: ClusterClient) -> None:
        channel = "revoked:{grant-7}"
        pubsub = client.pubsub()
        try:
            await pubsub.ssubscribe(channel)
            await pubsub.subscribe("broadcast")
            shard = cluster.node_for_key(channel)
            with cluster.admin(shard) as r:  # SSUBSCRIBE went to the shard's own primary
                assert r.execute_command("PUBSUB SHARDNUMSUB", channel) == [(channel, 1)]
            assert await client.spublish(channel, "revoked") == 1
            msg = await _next_message(pubsub.get_sharded_message)
            assert (msg["type"], msg["channel"], msg["data"]) == ("smessage", channel.encode(),
                                                                  b"revoked")
            await client.publish("broadcast", "hello")
            msg = await _next_message(pubsub.get_message)
            assert (msg["type"], msg["channel"], msg["data"]) == ("message", b"broadcast",
                                                                  b"hello")
            # Classic PUBLISH reaches subscribers of every node (over the cluster bus): publish
            # on another primary than the one the subscription is on.
            sub_node = pubsub.get_pubsub_node()
            assert sub_node is not None
            other = next(p for p in cluster.primaries() if p.port != sub_node.port)
            with cluster.admin(other) as r:
                assert r.publish("broadcast", "via-bus") == 0  # counts local subscribers only
            msg = await _next_message(pubsub.get_message)
            assert msg["data"] == b"via-bus"
        finally:
            await pubsub.aclose()

    async def test_wait_goes_where_it_is_sent(self, cluster: RedisCluster,
                                              client: ClusterClient) -> None:
        # redis-py routes the keyless WAIT to its default node, whatever the last write's
        # key: it counts another shard's replicas on another connection. Sent in a pipeline
        # with target_nodes, it reaches the key's primary on the write's connection.
        default = client.get_default_node()
        assert default is not None
        elsewhere = next(p for p in cluster.primaries() if p.port != default.port)
        (key,) = _keys_on(client, elsewhere, "wait", 1)

        def calls() -> dict[int, int]:
            out = {}
            for p in cluster.primaries():
                with cluster.admin(p) as r:
                    out[p.port] = int(r.info("commandstats").get("cmdstat_wait", {})
                                      .get("calls", 0))
            return out

        before = calls()
        await client.set(key, "1")
        assert await client.wait(1, 1000) == 1
        after = calls()
        assert after[default.port] == before[default.port] + 1
        assert after[elsewhere.port] == before[elsewhere.port]

        pipe = client.pipeline(transaction=False)
        pipe.set(key, "2")
        pipe.execute_command("WAIT", 1, 1000, target_nodes=client.get_node_from_key(key))
        assert await pipe.execute() == [True, 1]
        final = calls()
        assert final[elsewhere.port] == after[elsewhere.port] + 1
        assert final[default.port] == after[default.port]

    async def test_shard_failover_the_client_rides_out_and_wait_sees_the_replica(
            self, cluster: RedisCluster, client: ClusterClient) -> None:
        victim = cluster.node_for_slot(0)
        key = _keys_on(client, victim, "grant", 1)[0]
        (other,) = _keys_on(client, next(p for p in cluster.primaries() if p != victim), "grant", 1)

        async def acked_write(value: str, replicas: int = 1, ms: int = 1000) -> list[Any]:
            # WAIT counts replicas that acknowledged this connection's writes: it must go to the
            # key's primary on the write's connection. A pipeline sends one node's commands on
            # one connection; a plain client.wait() goes to the client's default node instead.
            pipe = client.pipeline(transaction=False)
            pipe.set(key, value)
            pipe.execute_command("WAIT", replicas, ms, target_nodes=client.get_node_from_key(key))
            return list(await pipe.execute())

        assert await acked_write("before") == [True, 1]
        await client.set(other, "untouched")

        cluster.kill_primary(victim)
        failover = asyncio.ensure_future(asyncio.to_thread(cluster.wait_failover, victim))
        victim_errors: list[Exception] = []
        other_errors: list[Exception] = []
        other_slowest = 0.0

        async def other_shard() -> None:
            nonlocal other_slowest
            while not failover.done():
                started = time.monotonic()
                try:
                    assert await client.get(other) == b"untouched"
                except _OUTAGE as e:
                    other_errors.append(e)
                other_slowest = max(other_slowest, time.monotonic() - started)
                await asyncio.sleep(0.1)

        watcher = asyncio.ensure_future(other_shard())
        value = await _until_ok(lambda: client.get(key), victim_errors)
        elapsed = await failover
        await watcher
        print(f"failover: {elapsed:.2f} s; errors on the dead shard {_kinds(victim_errors)}; "
              f"other shard errors {_kinds(other_errors)}, slowest answer {other_slowest:.2f} s")
        assert elapsed < 15
        assert victim_errors, "the dead primary's slots failed for a while"
        assert all(isinstance(e, _OUTAGE) for e in victim_errors), _kinds(victim_errors)
        assert value == b"before"  # acknowledged by the replica before the kill: kept

        new_primary = cluster.node_for_key(key)
        assert new_primary != victim and new_primary in cluster.primaries()
        assert _port_of(client, key) == new_primary.port  # slot map refreshed
        assert await client.get(other) == b"untouched"
        assert await acked_write("alone", ms=200) == [True, 0]  # no replica left in that shard

        rejoin = await asyncio.to_thread(cluster.restart_node, victim)
        print(f"restart_node: the old primary rejoined as a replica in {rejoin:.2f} s")
        assert victim in cluster.replicas_of(new_primary)
        assert len(cluster.primaries()) == 3 and len(cluster.replicas()) == 3
        assert await acked_write("again") == [True, 1]
        with cluster.admin(victim) as r:
            assert r.info("replication")["role"] == "slave"
            r.execute_command("READONLY")
            assert r.get(key) == "again"

    async def test_a_primary_restarted_before_any_failover_empties_its_shard(
            self, cluster: RedisCluster, client: ClusterClient) -> None:
        primary = cluster.node_for_slot(HASH_SLOTS - 1)
        (replica,) = cluster.replicas_of(primary)
        mine = _keys_on(client, primary, "shard", 5)
        other_primary = next(p for p in cluster.primaries() if p != primary)
        theirs = _keys_on(client, other_primary, "shard", 5)
        for k in mine + theirs:
            await client.set(k, "1")
        with cluster.admin(replica) as r:
            assert r.dbsize() > 0

        elapsed = await asyncio.to_thread(cluster.restart_node, primary)
        print(f"restart_node of a live primary: back in {elapsed:.2f} s, empty")
        assert primary in cluster.primaries() and cluster.replicas_of(primary) == [replica]
        errors: list[Exception] = []
        assert await _until_ok(lambda: client.mget_nonatomic(mine), errors) == [None] * len(mine)
        assert await client.mget_nonatomic(theirs) == [b"1"] * len(theirs)
        with cluster.admin(replica) as r:
            assert r.dbsize() == 0  # the replica resynced to the empty primary

    async def test_whole_cluster_restart_loses_every_key(self, cluster: RedisCluster,
                                                         client: ClusterClient) -> None:
        keys = [f"fence:{i}" for i in range(60)]
        for k in keys:
            await client.set(k, "1")
        ids = {n: cluster.node_id(n) for n in cluster.nodes}

        elapsed = await asyncio.to_thread(cluster.restart_all)
        errors: list[Exception] = []
        assert await _until_ok(lambda: client.mget_nonatomic(keys), errors) == [None] * len(keys)
        print(f"restart_all (re-created): {elapsed:.2f} s, client errors {_kinds(errors)}")
        assert all(isinstance(e, _OUTAGE) for e in errors), _kinds(errors)
        new_ids = {n: cluster.node_id(n) for n in cluster.nodes}
        assert not set(ids.values()) & set(new_ids.values())  # a new cluster
        for node in cluster.nodes:
            with cluster.admin(node) as r:
                assert r.dbsize() == 0

        await client.set(keys[0], "2")
        elapsed = await asyncio.to_thread(cluster.restart_all, keep_config=True)
        errors.clear()
        assert await _until_ok(lambda: client.get(keys[0]), errors) is None
        print(f"restart_all (keep_config): {elapsed:.2f} s, client errors {_kinds(errors)}")
        assert {n: cluster.node_id(n) for n in cluster.nodes} == new_ids  # same nodes, empty
        assert len(cluster.primaries()) == 3 and len(cluster.replicas()) == 3
        primaries = cluster.primaries()
        assert {cluster.node_for_slot(slot) for slot in (0, HASH_SLOTS // 2, HASH_SLOTS - 1)} \
            == set(primaries)


# -- Redis Sentinel --------------------------------------------------------------------------


@pytest.fixture
def sentinel_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinel]:
    _need_redis()
    topo = RedisSentinel(tmp_path_factory.mktemp("sentinel"), acl=ACL).start()
    try:
        yield topo
    finally:
        topo.stop()


async def test_sentinel_client_writes_then_follows_a_failover(
        sentinel_setup: RedisSentinel) -> None:
    s = sentinel_setup
    sentinel = Sentinel(s.sentinels, sentinel_kwargs=s.sentinel_kwargs(), **s.client_kwargs())
    primary = sentinel.master_for(s.service_name)
    replica = sentinel.slave_for(s.service_name)
    try:
        first = s.primary()
        assert await sentinel.discover_master(s.service_name) == first.address
        assert len(s.replicas()) == 2
        assert await primary.set("grant:1", "before")
        assert await primary.wait(2, 1000) == 2  # both replicas acknowledged
        assert await replica.get("grant:1") == b"before"

        killed = s.kill_primary()
        assert killed == first
        failover = asyncio.ensure_future(asyncio.to_thread(s.wait_failover))
        errors: list[Exception] = []
        await _until_ok(lambda: primary.set("grant:2", "during"), errors)
        elapsed = await failover
        print(f"sentinel failover: {elapsed:.2f} s; client errors {_kinds(errors)}")
        assert elapsed < 15
        assert errors and all(isinstance(e, _OUTAGE) for e in errors), _kinds(errors)

        new = s.primary()
        assert new != first
        assert await sentinel.discover_master(s.service_name) == new.address
        assert await primary.get("grant:1") == b"before"  # acknowledged before: kept
        assert await primary.set("grant:3", "after")
        with s.admin(new) as r:  # the client's writes land on the new primary
            assert r.get("grant:3") == "after" and r.get("grant:2") == "during"
        assert await primary.wait(1, 1000) == 1  # the other replica follows the new primary

        rejoin = await asyncio.to_thread(s.restart_node, killed)
        print(f"sentinel restart_node: the old primary rejoined in {rejoin:.2f} s")
        assert sorted(s.replicas()) == sorted(n for n in s.data_nodes if n != new)
        assert await primary.wait(2, 2000) == 2
    finally:
        await primary.aclose()
        await replica.aclose()
        await sentinel.aclose()


# -- TLS --------------------------------------------------------------------------------------


async def test_cluster_and_sentinel_over_tls_with_an_acl_user(tmp_path: Path) -> None:
    _need_redis()
    ca = make_ca(tmp_path / "pki")
    server_only = make_leaf(ca, ["127.0.0.1"], tmp_path / "pki", "server-only")
    with pytest.raises(ValueError, match="clientAuth"):
        RedisCluster(tmp_path / "bad", tls=(*server_only, ca.cert_path))
    cert, key = make_leaf(ca, ["127.0.0.1"], tmp_path / "pki", "redis", client_auth=True)
    tls = (cert, key, ca.cert_path)

    with RedisCluster(tmp_path / "cluster", tls=tls, acl=ACL).start() as cluster:
        assert cluster.url.startswith("rediss://")
        pids = cluster.pids()
        assert len(pids) == 6
        client = ClusterClient.from_url(cluster.url, **cluster.client_kwargs())
        try:
            for i in range(60):
                await client.set(f"tls:{i}", i)
            sizes = [await client.execute_command("DBSIZE", target_nodes=n)
                     for n in client.get_primaries()]
            assert len(sizes) == 3 and all(n > 0 for n in sizes) and sum(sizes) == 60
            victim = cluster.kill_primary()
            elapsed = await asyncio.to_thread(cluster.wait_failover, victim)
            print(f"TLS cluster failover: {elapsed:.2f} s")
            errors: list[Exception] = []
            values = await _until_ok(
                lambda: client.mget_nonatomic([f"tls:{i}" for i in range(60)]), errors)
            assert all(v is not None for v in values)
        finally:
            await client.aclose()
    assert _gone(pids)

    with RedisSentinel(tmp_path / "sentinel", tls=tls, acl=ACL).start() as s:
        pids = s.pids()
        assert len(pids) == 6
        sentinel = Sentinel(s.sentinels, sentinel_kwargs=s.sentinel_kwargs(),
                            **s.client_kwargs())
        primary = sentinel.master_for(s.service_name)
        try:
            assert await primary.set("tls", "1")
            assert await primary.wait(2, 1000) == 2
        finally:
            await primary.aclose()
            await sentinel.aclose()
    assert _gone(pids)
