"""The replica suite on the Redis that production runs (issue 18): a real Redis Cluster
(3 primaries + 3 replicas, ``redis-cli --cluster create``) and a real Sentinel set-up (1
primary, 2 replicas, 3 sentinels), each with an ACL user and three ``credproxy run``
sidecars; Entra ID authentication on a standalone server.

On each topology (:class:`_Suite`):

- a refresh storm across the three sidecars is one token-endpoint call (the authorization
  server rotates refresh tokens and kills the whole grant when an old one comes back, so a
  second redemption would show as a dead grant);
- ``credproxy revoke`` reaches every sidecar within a second. The vault is Key Vault: with
  Redis nothing is polled, so only the invalidation (sharded pub/sub in the cluster) can;
- the shared cache serves hits: sidecars that never read the grant serve it without a vault
  read;
- a one-time ``jti`` used on one sidecar is refused on another.

Faults, on the cluster (:class:`TestCluster`): the shard primary that owns a grant's bucket
killed while a refresh storm holds that grant's lock (its replica promoted); a primary
restarted empty before any failover (only its shard's grants are fenced); a whole-cluster
restart with data loss (fencing, then refreshes resume; a grant revoked just before it stays
revoked). On Sentinel: the primary killed during a storm. In every case: no rotating grant
is burned and every request is answered, 200 or a retryable 503 problem with Retry-After.

Entra ID (:func:`test_entra_id_token_rotation_reauthenticates_in_place`): the Redis ACL user
is the token's ``oid`` and its password the token; a rotation removes the old token from
Redis and the sidecar re-authenticates its open connections (``AUTH``) without opening new
ones.

Measured times (failover, recovery) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
import redis
from joserfc import jwt
from joserfc.jwk import OctKey

from devstack.procs import Running
from devstack.redisproc import RedisServer
from devstack.redistopo import Node, RedisCluster, RedisSentinel
from devstack.stack import Stack, build_stack
from tests.conftest import _need_redis

from .test_replicas import _auth, _burst

pytestmark = pytest.mark.integration

ACL = ("credproxy", "s3cret-topology")
PREFIX = "t:"
# Short bounds keep the fencing period short (proxy.app.fencing_period: the longest refresh,
# 1 x 2 s, plus three vault calls of 1 s, three Redis calls of 0.5 s, plus 1 s).
_REFRESH = {"attempts": 1, "timeout": 2.0, "backoff": 0.1}
_VAULT_TIMEOUT = 1.0
_OP_TIMEOUT = 0.5
_QUIET = 2.0 + 3 * _VAULT_TIMEOUT + 3 * _OP_TIMEOUT + 1.0
_RETRYABLE = {"coordination_unavailable", "fencing"}


@dataclass
class Fleet:
    """Three sidecars on one Redis topology, sharing the stack's vault and providers."""

    topology: str
    stack: Stack
    redis: RedisCluster | RedisSentinel
    sidecars: list[Running]
    keys: Callable[[str, str], str]

    @property
    def proxies(self) -> list[str]:
        return [str(r.info["proxy_url"]) for r in self.sidecars]

    @property
    def admins(self) -> list[str]:
        return [str(r.info["admin_url"]) for r in self.sidecars]

    def key(self, kind: str, user: str) -> str:
        """The Redis key of ``kind`` (lock, tok, gen) for the user's docs grant, named as
        the sidecars name it (RedisCoordinator._key)."""
        return self.keys(kind, user)

    def node_of(self, key: str) -> Node:
        """The primary that holds ``key`` now."""
        if isinstance(self.redis, RedisCluster):
            return self.redis.node_for_key(key)
        return self.redis.primary()

    def get(self, key: str, node: Node | None = None) -> bytes | None:
        """``key``'s value as stored, read on ``node`` (default: its primary; a replica is
        read with READONLY)."""
        node = node or self.node_of(key)
        with redis.Redis(host=node.host, port=node.port, socket_timeout=2,
                         **self.redis.client_kwargs()) as r:
            if isinstance(self.redis, RedisCluster) and node != self.node_of(key):
                r.execute_command("READONLY")
            value = r.get(key)
        assert value is None or isinstance(value, bytes)
        return value

    def close(self, procs: list[Running] | None = None) -> None:
        for r in procs if procs is not None else self.sidecars:
            r.close()
            if r in self.stack.extra:
                self.stack.extra.remove(r)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    _need_redis()
    s = build_stack(tmp_path_factory.mktemp("topo"), start_proxy=False, keyvault=True,
                    config={"refresh": _REFRESH})
    s.config["vault"]["timeout"] = _VAULT_TIMEOUT
    s.write_config()
    s.env["REDIS_PASSWORD"] = ACL[1]
    yield s
    s.close()


def _key_namer(s: Stack) -> Callable[[str, str], str]:
    """Names keys as the sidecars on the stack's current config do."""
    from proxy.app import make_coordinator
    from proxy.coordination.redis import RedisCoordinator
    from proxy.settings import load_settings
    from proxy.vault.keys import load_key

    settings = load_settings(s.config_path)
    key = load_key(key_env=settings.vault.key_env, key_file=None, environ=s.env)
    coordinator = make_coordinator(settings, key, environ=s.env)
    assert isinstance(coordinator, RedisCoordinator)
    asyncio.run(coordinator.close())  # never connected: only its names are used
    return lambda kind, user: coordinator._key(kind, user, "docs")


def _start_fleet(s: Stack, topology: str, topo: RedisCluster | RedisSentinel,
                 coordination: dict[str, Any]) -> Fleet:
    s.config["coordination"] = {
        "backend": "redis", "key_prefix": PREFIX, "username": ACL[0],
        "password_env": "REDIS_PASSWORD", "op_timeout": _OP_TIMEOUT, "lock_wait": 5,
        **coordination}
    s.write_config()  # `credproxy revoke` runs on it
    started = time.monotonic()
    sidecars = s.start_replicas(3, name=topology)
    print(f"{topology}: three sidecars up in {time.monotonic() - started:.2f} s")
    return Fleet(topology, s, topo, sidecars, _key_namer(s))


# -- helpers ---------------------------------------------------------------------------------


def _get(s: Stack, proxy: str, user: str, path: str = "/echo") -> httpx2.Response:
    with s.client_via(proxy, context=s.context(user)) as c:
        return c.get(f"{s.docs_url}{path}")


def _revoke(s: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return _cli(s, "revoke", *args)


def _cli(s: Stack, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", command, "--config",
                           str(s.config_path), *args], capture_output=True, text=True,
                          env={**os.environ, **s.env}, timeout=90)


def _refused(s: Stack, proxy: str, user: str) -> httpx2.Response | None:
    """The answer to a GET as ``user`` when it is a 403; None otherwise, or when the
    exchange was reset."""
    try:
        r = _get(s, proxy, user)
    except httpx2.TransportError:
        return None
    return r if r.status_code == 403 else None


def _faults(s: Stack, **faults: Any) -> None:
    with s.admin() as c:
        c.post("/_admin/faults", json=faults).raise_for_status()


def _alive(s: Stack, user: str) -> bool:
    """The user's grant is in the vault and its refresh token alive at the provider (a
    second redemption of a rotated token would have killed the whole grant)."""
    stored = s.vault_get(user)
    return bool(stored is not None and stored.status == "active"
                and s.introspect(stored.tokens.refresh_token.reveal())["active"])


def _retryable(r: httpx2.Response) -> bool:
    """A 503 problem the agent can retry: credential-store-unavailable, a reason saying
    why, and Retry-After."""
    return (r.status_code == 503
            and r.headers.get("X-Credproxy-Error") == "credential-store-unavailable"
            and r.json().get("reason") in _RETRYABLE
            and int(r.headers.get("Retry-After", "0")) >= 1)


def _outcomes(responses: list[httpx2.Response]) -> Counter[str]:
    return Counter(str(r.status_code) if r.status_code != 503
                   else f"503 {r.json().get('reason')}" for r in responses)


def _metric(admin: str, name: str) -> float:
    text = httpx2.get(f"{admin}/metrics", trust_env=False).text
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} metric")


def _until[T](what: str, check: Callable[[], T | None], timeout: float,
              interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def _get_until(s: Stack, proxy: str, user: str, done: Callable[[httpx2.Response], bool],
               timeout: float) -> httpx2.Response:
    """GET through ``proxy`` as ``user`` every 0.2 s until ``done`` holds of the answer."""
    deadline = time.monotonic() + timeout
    while True:
        r = _get(s, proxy, user)
        if done(r):
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"{user} via {proxy}: still {r.status_code} {r.text[:300]}")
        time.sleep(0.2)


def _users_on(fleet: Fleet, prefix: str, want: Callable[[str], bool], n: int = 1) -> list[str]:
    """``n`` user names whose grant's lock key satisfies ``want``."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        user = f"{prefix}-{i}"
        if want(fleet.key("lock", user)):
            out.append(user)
        i += 1
    return out


def _assert_revoke_reaches_all(fleet: Fleet, user: str) -> None:
    """``credproxy revoke`` of ``user`` (cached on every sidecar) is refused by all three
    sidecars within a second. The provider's revocation fails, so it would still accept
    the token, and nothing polls Key Vault: only the invalidation through Redis can stop
    the sidecars."""
    s = fleet.stack
    marker = f"m-{uuid.uuid4().hex[:12]}"
    # Every sidecar is subscribed again (after a failover it resubscribes by itself; an
    # operator watches this gauge): from then on the invalidation reaches it.
    _until("every sidecar subscribed", lambda: True if all(
        _metric(a, "credproxy_coordination_subscribed") == 1.0 for a in fleet.admins)
        else None, 20)
    _faults(s, revoke_status=503, revoke_count=-1)
    try:
        r = _revoke(s, "--user", user)
        done = time.monotonic()
    finally:
        _faults(s, revoke_status=None)
    assert r.returncode == 1 and "upstream revocation pending" in r.stdout, r.stdout
    for proxy in fleet.proxies:
        after = _get(s, proxy, user, f"/echo/{marker}")
        # (On failure, what the revoke said, e.g. whether its invalidation went out.)
        assert after.status_code == 401, (proxy, r.stdout, r.stderr[-600:])
    elapsed = time.monotonic() - done
    print(f"{fleet.topology}: revoke refused on all three sidecars {elapsed:.3f} s later")
    assert elapsed <= 1.0
    assert not s.docs_saw(marker)


def _survived(fleet: Fleet, user: str, responses: list[httpx2.Response], killed: float,
              what: str) -> None:
    """A storm across a failover: every request answered 200 or a retryable 503, one
    redemption, the grant alive; then every sidecar serves it again by itself (the
    recovery time printed)."""
    s = fleet.stack
    outcomes = _outcomes(responses)
    print(f"{fleet.topology}: {what}; storm outcomes {dict(outcomes)}")
    assert all(r.status_code == 200 or _retryable(r) for r in responses), outcomes
    assert outcomes["200"] > 0
    assert s.stats()["refresh_by_user"].get(user) == 1
    assert _alive(s, user)

    def all_served() -> float | None:
        rs = [_get(s, p, user) for p in fleet.proxies]
        return time.monotonic() - killed if all(r.status_code == 200 for r in rs) else None

    print(f"{fleet.topology}: the grant served by every sidecar "
          f"{_until('recovery', all_served, 20):.2f} s after the kill")


class _Storm:
    """A refresh storm of ``n`` requests over the fleet's sidecars, in a thread."""

    def __init__(self, fleet: Fleet, user: str, n: int) -> None:
        self.responses: list[httpx2.Response] = []
        s = fleet.stack
        self._thread = threading.Thread(target=lambda: self.responses.extend(
            asyncio.run(_burst(s, fleet.proxies, s.context(user), n))))
        self._thread.start()

    def join(self) -> list[httpx2.Response]:
        self._thread.join(90)
        assert not self._thread.is_alive(), "the storm's requests were not all answered"
        return self.responses


# -- the suite, on each topology --------------------------------------------------------------


class _Suite:
    """The replica suite; a subclass provides the ``fleet`` fixture (class scope)."""

    def test_refresh_storms_redeem_once_each(self, fleet: Fleet) -> None:
        s = fleet.stack
        users = self._storm_users(fleet)
        for user in users:
            s.vault_put(user, s.grant(user, expires_in=0))
            started = time.monotonic()
            responses = asyncio.run(_burst(s, fleet.proxies, s.context(user), 150))
            print(f"{fleet.topology} storm {user}: {_outcomes(responses)} in "
                  f"{time.monotonic() - started:.2f} s")
            assert [r.status_code for r in responses] == [200] * 150
            assert s.stats()["refresh_by_user"].get(user) == 1
            stored = s.vault_get(user)
            assert {_auth(r) for r in responses} == {
                f"Bearer {stored.tokens.access_token.reveal()}"}
            assert _alive(s, user)

    def _storm_users(self, fleet: Fleet) -> list[str]:
        return [f"{fleet.topology}-storm-{i}" for i in range(3)]

    def test_revoke_reaches_every_sidecar_within_a_second(self, fleet: Fleet) -> None:
        s = fleet.stack
        user = f"{fleet.topology}-leaver"
        s.vault_put(user, s.grant(user))
        for proxy in fleet.proxies:
            assert _get(s, proxy, user).status_code == 200  # cached on every sidecar
        _assert_revoke_reaches_all(fleet, user)

    def test_suspend_reaches_every_sidecar_within_a_second(self, fleet: Fleet) -> None:
        """The kill switch on this topology: the suspensions hash is one key (one slot),
        announced on the events channel (sharded pub/sub in a cluster)."""
        s = fleet.stack
        user = f"{fleet.topology}-paused"
        s.vault_put(user, s.grant(user))
        for proxy in fleet.proxies:
            assert _get(s, proxy, user).status_code == 200  # cached on every sidecar
        r = _cli(s, "suspend", "--user", user, "--reason", "topology check")
        done = time.monotonic()
        assert r.returncode == 0, r.stderr
        try:
            for proxy in fleet.proxies:
                # (A request under way when the suspension arrives is cut: a reset.)
                refused = _until(f"suspended on {proxy}", functools.partial(
                    _refused, s, proxy, user), max(0.05, 1.0 - (time.monotonic() - done)),
                    interval=0.05)
                assert refused.json()["reason"] == "suspended"
            elapsed = time.monotonic() - done
            print(f"{fleet.topology}: suspension refused on all three sidecars "
                  f"{elapsed:.3f} s later")
            assert elapsed <= 1.0
        finally:
            assert _cli(s, "resume", "--user", user, "--reason", "done").returncode == 0
        for proxy in fleet.proxies:
            _get_until(s, proxy, user, lambda x: x.status_code == 200, 1.0)

    def test_shared_cache_serves_hits(self, fleet: Fleet) -> None:
        s = fleet.stack
        user = f"{fleet.topology}-cached"
        s.vault_put(user, s.grant(user))
        s.kv_admin("POST", "/_admin/reset")
        a, *others = fleet.proxies
        assert _get(s, a, user).status_code == 200  # a vault read, put in Redis
        reads = s.kv_admin("GET", "/_admin/stats")["by_method"].get("GET", 0)
        assert reads >= 1
        cached = fleet.get(fleet.key("tok", user))
        assert cached is not None and len(cached) > 12  # sealed, never the token itself
        responses = [_get(s, proxy, user) for proxy in others]
        assert [r.status_code for r in responses] == [200] * len(others)
        assert len({_auth(r) for r in responses}) == 1
        # The other sidecars never saw this grant: they served it from the shared cache.
        assert s.kv_admin("GET", "/_admin/stats")["by_method"].get("GET", 0) == reads

    def test_one_time_jti_is_shared_across_sidecars(self, fleet: Fleet) -> None:
        s = fleet.stack
        identity = {**s.config["identity"], "one_time_jti": True}
        pair = s.start_replicas(2, name=f"{fleet.topology}-jti",
                                overrides={"identity": identity})
        try:
            a, b = (str(r.info["proxy_url"]) for r in pair)
            user = f"{fleet.topology}-once"
            s.vault_put(user, s.grant(user))
            ctx = s.context(user, jti=True)
            with s.client_via(a, context=ctx) as c:
                assert c.get(f"{s.docs_url}/echo").status_code == 200
            with s.client_via(b, context=ctx) as c:
                r = c.get(f"{s.docs_url}/echo")
            assert r.status_code == 407 and r.json()["reason"] == "replayed"
            with s.client_via(a, context=s.context(user, jti=True)) as c:
                assert c.get(f"{s.docs_url}/echo").status_code == 200  # a new jti: fine
        finally:
            fleet.close(pair)


# -- Redis Cluster -----------------------------------------------------------------------------


class TestCluster(_Suite):
    """One cluster and three sidecars for the class; the fault tests run last, in order:
    each leaves the cluster with three primaries and three replicas."""

    @pytest.fixture(scope="class")
    @classmethod
    def fleet(cls, stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
        started = time.monotonic()
        cluster = RedisCluster(tmp_path_factory.mktemp("cluster"), acl=ACL).start()
        print(f"cluster: 3 + 3 nodes up in {time.monotonic() - started:.2f} s")
        fleet: Fleet | None = None
        try:
            fleet = _start_fleet(stack, "cluster", cluster, {
                "mode": "cluster", "url": cluster.url,
                "nodes": [str(n) for n in cluster.nodes]})
            yield fleet
        finally:
            if fleet is not None:
                fleet.close()
            cluster.stop()

    def _storm_users(self, fleet: Fleet) -> list[str]:
        # One storm on each shard.
        assert isinstance(fleet.redis, RedisCluster)
        cluster = fleet.redis
        return [_users_on(fleet, f"cluster-storm-{p.port}",
                          lambda k, p=p: cluster.node_for_key(k) == p)[0]  # type: ignore[misc]
                for p in cluster.primaries()]

    # -- faults (in this order) ------------------------------------------------------------

    def test_shard_primary_killed_during_a_refresh_storm(self, fleet: Fleet) -> None:
        """The primary of the shard that holds a grant's lock is killed while a refresh
        of that grant is in flight and 150 requests wait for it; its replica is promoted.
        The lock was confirmed by the replica (WAIT) before the refresh began, so no other
        sidecar can take it after the promotion: one redemption, the grant alive."""
        assert isinstance(fleet.redis, RedisCluster)
        s, cluster = fleet.stack, fleet.redis
        victim = cluster.primaries()[0]
        (user,) = _users_on(fleet, "cl-failover", lambda k: cluster.node_for_key(k) == victim)
        (elsewhere,) = _users_on(fleet, "cl-elsewhere",
                                 lambda k: cluster.node_for_key(k) != victim)
        (same_shard,) = _users_on(fleet, "cl-same-shard",
                                  lambda k: cluster.node_for_key(k) == victim)
        lock = fleet.key("lock", user)
        (replica,) = cluster.replicas_of(victim)
        for u in (user, elsewhere, same_shard):
            s.vault_put(u, s.grant(u, expires_in=0))
        _faults(s, token_delay=1.0)  # the refresh is in flight for a second
        try:
            storm = _Storm(fleet, user, 150)
            _until("the refresh lock on the victim",
                   lambda: True if fleet.get(lock, victim) is not None else None, 10, 0.02)
            # The replica holds the lock too: WAIT confirmed it before the refresh began.
            assert fleet.get(lock, replica) == fleet.get(lock, victim)
            cluster.kill_primary(victim)
            killed = time.monotonic()
            failover = cluster.wait_failover(victim)
            responses = storm.join()
        finally:
            _faults(s, token_delay=0)
        _survived(fleet, user, responses, killed, f"primary {victim} killed during a storm; "
                  f"failover {failover:.2f} s")
        # A grant in another shard refreshes at once.
        r = _get(s, fleet.proxies[1], elsewhere)
        assert r.status_code == 200, r.text
        # The promoted primary has no replica yet: a refresh lock there cannot be confirmed
        # (replica_acks 1), so the refresh is refused, retryable, until one is back...
        r = _get(s, fleet.proxies[2], same_shard)
        assert _retryable(r) and r.json()["reason"] == "coordination_unavailable", r.text
        rejoined = cluster.restart_node(victim)
        back = time.monotonic()
        # ...and then it runs: the refused lock was not left behind for its lease.
        _until("a refresh in the failed-over shard", lambda: True if _get(
            s, fleet.proxies[2], same_shard).status_code == 200 else None, 6, 0.2)
        print(f"cluster: the old primary rejoined as a replica in {rejoined:.2f} s; refreshes "
              f"in that shard resumed {time.monotonic() - back:.2f} s later")
        for u in (user, elsewhere, same_shard):
            assert s.stats()["refresh_by_user"].get(u) == 1, u
            assert _alive(s, u), u

    def test_a_primary_restarted_empty_fences_only_its_shard(self, fleet: Fleet) -> None:
        """A primary restarted before any failover comes back EMPTY (its replica resyncs to
        nothing): the boot markers of its buckets are gone, so its grants are fenced for
        the quiet period; grants in the other shards refresh as usual."""
        assert isinstance(fleet.redis, RedisCluster)
        s, cluster = fleet.stack, fleet.redis
        # The shard that carries the invalidations (sharded pub/sub): the sidecars lose
        # their subscription too, and must plant the markers again when they resubscribe.
        victim = cluster.node_for_key(f"{PREFIX}events")
        (fenced,) = _users_on(fleet, "cl-fenced", lambda k: cluster.node_for_key(k) == victim)
        (free,) = _users_on(fleet, "cl-free", lambda k: cluster.node_for_key(k) != victim)
        (fresh,) = _users_on(fleet, "cl-fresh", lambda k: cluster.node_for_key(k) == victim)
        marker = f"{PREFIX}boot:{fleet.key('lock', fenced).split(':')[2]}"
        assert fleet.get(marker) is not None  # planted when the sidecars subscribed
        s.vault_put(fresh, s.grant(fresh))
        for proxy in fleet.proxies:
            assert _get(s, proxy, fresh).status_code == 200  # cached everywhere
        for u in (fenced, free):
            s.vault_put(u, s.grant(u, expires_in=0))
        killed = time.monotonic()  # no marker of that shard can be older
        elapsed = cluster.restart_node(victim)
        print(f"cluster: primary {victim} restarted empty, ready again in {elapsed:.2f} s")
        with cluster.admin(victim) as r:
            assert r.info("replication")["role"] == "master"
        proxy = fleet.proxies[0]
        # Until the sidecar hears of the loss, the shard's errors are a plain 503.
        r = _get_until(s, proxy, fenced, lambda r: r.status_code != 503
                       or r.json()["reason"] == "fencing", 10)
        assert _retryable(r) and r.json()["reason"] == "fencing", r.text
        retry_after = int(r.headers["Retry-After"])
        assert 1 <= retry_after <= math.ceil(_QUIET)
        assert (fleet.get(marker) or b"").endswith(b":restart")
        other = _get(s, fleet.proxies[1], free)
        assert other.status_code == 200, other.text  # another shard: not fenced
        assert _get(s, fleet.proxies[2], fresh).status_code == 200  # fresh: still served
        assert s.stats()["refresh_by_user"].get(fenced) is None  # nothing redeemed
        time.sleep(retry_after)
        _get_until(s, proxy, fenced, lambda r: r.status_code == 200, 10)
        resumed = time.monotonic() - killed
        print(f"cluster: the fenced shard refreshed again {resumed:.2f} s after the restart "
              f"(quiet period {_QUIET:g} s, Retry-After {retry_after})")
        assert resumed >= _QUIET  # not one refresh in the quiet period
        for u in (fenced, free):
            assert s.stats()["refresh_by_user"].get(u) == 1, u
            assert _alive(s, u), u
        # The sidecars subscribed again: a revocation still reaches all three at once.
        _assert_revoke_reaches_all(fleet, fresh)

    def test_whole_cluster_restart_fences_then_resumes(self, fleet: Fleet) -> None:
        """Every node killed and started empty, the cluster created anew: no refresh runs
        until the quiet period has passed (503 fencing with Retry-After meanwhile), then
        refreshes resume; a grant revoked just before the restart never comes back; fresh
        tokens are served throughout."""
        assert isinstance(fleet.redis, RedisCluster)
        s, cluster = fleet.stack, fleet.redis
        stale, fresh, revoked = "cl-stale", "cl-fresh-all", "cl-revoked"
        for u in (fresh, revoked):
            s.vault_put(u, s.grant(u))
            for proxy in fleet.proxies:
                assert _get(s, proxy, u).status_code == 200  # cached on every sidecar
        s.vault_put(stale, s.grant(stale, expires_in=0))
        r = _revoke(s, "--user", revoked)
        assert r.returncode == 0, r.stdout + r.stderr
        back = time.monotonic()  # no marker can be older
        elapsed = cluster.restart_all()
        print(f"cluster: whole-cluster restart (new cluster, every key lost) in {elapsed:.2f} s")
        # Every sidecar sees the loss (it resubscribes and plants the markers as "restart").
        for admin in fleet.admins:
            _until(f"fencing on {admin}", lambda admin=admin: True if _metric(  # type: ignore[misc]
                admin, "credproxy_coordination_fencing") == 1 else None, 15, 0.1)
        seen = time.monotonic() - back
        statuses: list[str] = []
        first_refresh: float | None = None
        retry_after = 0
        while time.monotonic() - back < _QUIET + 10:
            for proxy in fleet.proxies:
                rs = _get(s, proxy, stale)
                if rs.status_code == 200:
                    first_refresh = first_refresh or time.monotonic() - back
                else:
                    assert _retryable(rs), rs.text
                    if rs.json()["reason"] == "fencing":
                        retry_after = max(retry_after, int(rs.headers["Retry-After"]))
                statuses.append(_outcomes([rs]).most_common(1)[0][0])
                for u in (fresh, revoked):
                    got = _get(s, proxy, u)
                    assert got.status_code == (200 if u == fresh else 401), (u, got.text)
            if first_refresh is not None:
                break
            time.sleep(0.25)
        print(f"cluster: all sidecars fencing {seen:.2f} s after the restart; stale grant "
              f"{dict(Counter(statuses))}, first refreshed {first_refresh or 0:.2f} s after (quiet "
              f"period {_QUIET:g} s, largest Retry-After {retry_after})")
        assert "503 fencing" in statuses and 1 <= retry_after <= math.ceil(_QUIET)
        assert first_refresh is not None and first_refresh >= _QUIET
        assert s.stats()["refresh_by_user"].get(stale) == 1
        assert _alive(s, stale)
        assert s.vault_get(revoked) is None
        for proxy in fleet.proxies:
            assert _get(s, proxy, revoked).status_code == 401
        # Every grant this class refreshed is still alive: nothing was redeemed twice.
        refreshed = [u for u in s.stats()["refresh_by_user"] if u.startswith("cl")]
        assert refreshed and all(_alive(s, u) for u in refreshed)


# -- Sentinel ------------------------------------------------------------------------------------


class TestSentinel(_Suite):
    """One primary, two replicas, three sentinels and three sidecars for the class."""

    @pytest.fixture(scope="class")
    @classmethod
    def fleet(cls, stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
        started = time.monotonic()
        sentinel = RedisSentinel(tmp_path_factory.mktemp("sentinel"), acl=ACL).start()
        print(f"sentinel: 1 + 2 servers and 3 sentinels up in "
              f"{time.monotonic() - started:.2f} s")
        fleet: Fleet | None = None
        try:
            fleet = _start_fleet(stack, "sentinel", sentinel, {
                "mode": "sentinel", "service_name": sentinel.service_name,
                "sentinels": [f"{h}:{p}" for h, p in sentinel.sentinels],
                "sentinel_username": ACL[0], "sentinel_password_env": "REDIS_PASSWORD"})
            yield fleet
        finally:
            if fleet is not None:
                fleet.close()
            sentinel.stop()

    def test_primary_killed_during_a_refresh_storm(self, fleet: Fleet) -> None:
        """The primary is killed while a refresh is in flight and 150 requests wait for it;
        the sentinels promote a replica. The lock was confirmed by a replica before the
        refresh began: one redemption, the grant alive, every request answered, and the
        sidecars follow the new primary by themselves."""
        assert isinstance(fleet.redis, RedisSentinel)
        s, sentinel = fleet.stack, fleet.redis
        user, after = "sn-failover", "sn-after"
        lock = fleet.key("lock", user)
        first = sentinel.primary()
        for u in (user, after):
            s.vault_put(u, s.grant(u, expires_in=0))
        _faults(s, token_delay=1.0)  # the refresh is in flight for a second
        try:
            storm = _Storm(fleet, user, 150)
            _until("the refresh lock on the primary",
                   lambda: True if fleet.get(lock, first) is not None else None, 10, 0.02)
            assert all(fleet.get(lock, r) is not None for r in sentinel.replicas())
            sentinel.kill_primary()
            killed = time.monotonic()
            failover = sentinel.wait_failover()
            responses = storm.join()
        finally:
            _faults(s, token_delay=0)
        _survived(fleet, user, responses, killed, f"primary {first} killed during a storm; "
                  f"failover {failover:.2f} s")
        # The new primary keeps one replica: refresh locks are confirmed again at once.
        _get_until(s, fleet.proxies[1], after, lambda r: r.status_code == 200, 20)
        print(f"sentinel: a new refresh ran {time.monotonic() - killed:.2f} s after the kill")
        assert s.stats()["refresh_by_user"].get(after) == 1
        assert _alive(s, after)
        # The sidecars resubscribed to the new primary: a revocation reaches all three.
        s.vault_put("sn-leaver", s.grant("sn-leaver"))
        for proxy in fleet.proxies:
            assert _get(s, proxy, "sn-leaver").status_code == 200
        _assert_revoke_reaches_all(fleet, "sn-leaver")


# -- Entra ID ------------------------------------------------------------------------------------


def _entra_token(oid: str, lifetime: int) -> str:
    """A JWT shaped like an Entra ID access token for Redis: ``oid`` names the Redis user.
    Redis never verifies it (Azure does); redis-entraid reads ``oid`` and ``exp``."""
    now = int(time.time())
    claims = {"aud": "https://redis.azure.com", "iss": "https://sts.windows.net/t/",
              "oid": oid, "iat": now, "nbf": now, "exp": now + lifetime,
              "jti": uuid.uuid4().hex}
    return jwt.encode({"alg": "HS256", "typ": "JWT"}, claims, OctKey.generate_key(256))


def test_entra_id_token_rotation_reauthenticates_in_place(stack: Stack,
                                                         tmp_path: Path) -> None:
    """The sidecar authenticates to Redis as the token's ``oid`` with the token as the
    password. A rotation (a new token in the file, the old one removed from the ACL user)
    is picked up before the old token expires and sent on the open connections (AUTH):
    no new connection, no failed authentication, and Redis keeps working."""
    s = stack
    oid = str(uuid.uuid4())
    first = _entra_token(oid, lifetime=10)
    token_file = tmp_path / "redis-token"
    token_file.write_text(first)
    server = RedisServer(tmp_path / "redis", acl=(oid, first)).start()
    sidecars: list[Running] = []
    try:
        coordination = {"backend": "redis", "url": server.url, "key_prefix": "e:",
                        "op_timeout": _OP_TIMEOUT,
                        "entra_id": {"credential": "file", "token_file": str(token_file),
                                     "refresh_ratio": 0.5}}
        sidecars = s.start_replicas(1, name="entra", overrides={"coordination": coordination})
        proxy = str(sidecars[0].info["proxy_url"])
        started = time.monotonic()
        # One connection of our own, opened now and kept (it would be counted otherwise).
        admin = redis.Redis(port=server.port, username=oid, password=first,
                            single_connection_client=True, decode_responses=True)
        try:
            def stats() -> tuple[int, int, int, int]:
                info = admin.info("stats")
                auth = admin.info("commandstats").get("cmdstat_auth", {})
                wrongpass = admin.info("errorstats").get("errorstat_WRONGPASS", {})
                return (int(info["total_connections_received"]), int(auth.get("calls", 0)),
                        int(auth.get("failed_calls", 0)), int(wrongpass.get("count", 0)))

            for user in ("entra-a", "entra-b"):  # refreshes under the Redis lock: it works
                s.vault_put(user, s.grant(user, expires_in=0))
                assert _get(s, proxy, user).status_code == 200
                assert s.stats()["refresh_by_user"].get(user) == 1
            connections, auths, _, _ = stats()
            # The sidecar's open connections (commands and the subscription), all idle now.
            open_ = int(admin.info("clients")["connected_clients"]) - 1
            assert open_ >= 2
            second = _entra_token(oid, lifetime=30)
            token_file.write_text(second)
            admin.execute_command("ACL", "SETUSER", oid, f"<{first}", f">{second}")
            rotated = time.monotonic()
            assert admin.execute_command("ACL", "GETUSER", oid)  # the user, one password
            # Every open connection re-authenticated (AUTH) with the new token.
            got = _until("re-authentication with the new token",
                         lambda: st if (st := stats())[1] >= auths + open_ else None, 10, 0.1)
            print(f"entra: token rotated {rotated - started:.2f} s after the start; all "
                  f"{open_} open connections re-authenticated {time.monotonic() - rotated:.2f}"
                  f" s later (AUTH calls {got[1] - auths}); connections received "
                  f"{connections} -> {got[0]}")
            user = "entra-after"
            s.vault_put(user, s.grant(user, expires_in=0))
            assert _get(s, proxy, user).status_code == 200  # Redis still works for it
            assert s.stats()["refresh_by_user"].get(user) == 1
            final = stats()
            assert final[0] == connections  # no new connection: AUTH on the open ones
            assert final[2] == 0 and final[3] == 0  # no failed authentication
            assert admin.execute_command("ACL", "LOG") == []
            assert "subscription lost" not in sidecars[0].stderr_text()
        finally:
            admin.close()
    finally:
        for r in sidecars:
            r.close()
            s.extra.remove(r)
        server.stop()
