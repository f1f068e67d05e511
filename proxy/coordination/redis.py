"""Coordination across replicas through Redis.

- **Refresh lock** per grant: redis-py's ``Lock`` (``SET NX PX`` with a random owner value,
  Lua compare-and-delete release), renewed every third of the lease while held, so a slow
  token endpoint cannot let the lease lapse under a live refresh. Waiters are woken by a
  ``released`` message on the events channel instead of polling blindly (with a slow poll
  as the fallback for a missed message).
- **Shared cache** of grants: AES-GCM encrypted under a key derived from the vault key (the
  key never reaches Redis), bound by associated data to its Redis key, with a TTL ending at
  the access token's expiry. Key names carry a keyed hash, never a user id.
- **Revocation guard**: forgetting a grant records its version (``gen`` key) before deleting
  the entry, and puts go through a Lua script that refuses versions not newer than ``gen``:
  a replica that read the vault just before a revoke cannot put the grant back.
- **Invalidation** over pub/sub, which is at-most-once: whenever the subscription is
  (re)established every memory cache is dropped, since messages may have been missed.
- **One-time jti**: ``SET key 1 NX EXAT exp``.

Topologies (``coordination.mode``): one server (``standalone``, also a proxy such as Azure
Managed Redis with the Enterprise cluster policy), a Redis Cluster (``cluster``: redis-py's
cluster client; invalidations over sharded pub/sub, ``SPUBLISH``/``SSUBSCRIBE``, where the
server has it), or Sentinel-managed replication (``sentinel``: redis-py's Sentinel client
follows the primary). Authentication: an ACL user and password, or Microsoft Entra ID
(redis-entraid's credential provider: tokens renewed before expiry, connections
re-authenticated in place).

Key layout for hash slots (``slot_safe_keys``, on in cluster mode): every script touches
keys of one slot. A grant's keys (lock, cache entry, revocation guard) carry the hash tag
of one of :data:`BUCKETS` buckets, and each bucket has its own boot marker in that slot:
the fencing after a data loss is per bucket, so a shard that restarted empty fences only
its own grants. A single-use value's keys share its name as tag. Without it the key names
of earlier versions are kept (one boot marker).

A data loss the boot markers cannot see: a primary that dies before a lock reached its
replica, which is then promoted without it. With ``replica_acks`` (on for cluster and
sentinel), a lock counts as taken only once that many replicas confirmed it (``WAIT`` on
the connection that wrote it); otherwise it is released and the refresh refused
(retryable), so no second replica can redeem the same rotating refresh token.

Every Redis failure surfaces as :class:`CoordinationUnavailable`, except cache reads and
writes, which degrade to a miss: the vault stays the source of truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.lock import Lock
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.auth.token import TokenInterface
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.credentials import CredentialProvider, StreamingCredentialProvider
from redis.event import (
    AfterPooledConnectionsInstantiationEvent,
    ClientType,
    RegisterReAuthForPooledConnections,
)
from redis.exceptions import (
    ConnectionError,
    LockError,
    LockNotOwnedError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.coordination.base import (
    USE_TTL,
    USED,
    CoordinationUnavailable,
    Invalidation,
    Lease,
    Used,
)
from proxy.errors import CoordinationFencing
from proxy.settings import CoordinationSettings, EntraIdSettings, resolve_secret
from proxy.suspensions import RESYNC_EVERY, Changed, Kind, Suspension, field_name
from proxy.tokenset import TokenSetError
from proxy.vault.base import Grant, GrantStatus, grant_from_record, grant_record

log = logging.getLogger("credproxy.redis")

# Buckets of grants (and of jti values), each with its own hash tag and boot marker when
# keys are laid out for slots: spread over the cluster's shards, few enough to plant
# every marker at each (re)subscription.
BUCKETS = 256

# What a Redis call raises when Redis fails: redis-py's errors; its cluster client's own
# RedisClusterException (no node reachable, slots not covered, nodes disagreeing on the slot
# map: not a RedisError); and asyncio's TypeError from redis-py 8.1's async cluster client,
# when a re-initialisation after a node failure closes a connection another task is
# writing on (seen on every shard restart that broke the subscription).
_FAILED: tuple[type[Exception], ...] = (RedisError, RedisClusterException, TypeError)
_LEASE_FAILED: tuple[type[Exception], ...] = (LockError, *_FAILED)
_LISTEN_FAILED: tuple[type[Exception], ...] = (*_FAILED, OSError)

_GEN_TTL = 7 * 24 * 3600  # how long a revocation guard outlives the revoke
_PUT = """
local g = tonumber(redis.call('GET', KEYS[2]) or '-1')
if tonumber(ARGV[1]) <= g then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
_TAKE = """
local v = redis.call('GET', KEYS[1])
if v then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
  return v
end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'used'} end
return false
"""
# Every script below starts by reading the "boot" marker (KEYS[2]), planting it when absent.
# A restart (or a flush, or an eviction) forgets every key, including the lock a refresh
# still in flight relies on and the record of used jti values. The first replica to reach
# Redis after the loss plants the marker with kind "restart" (it had seen this Redis's data
# before); a brand-new Redis gets kind "fresh" from a replica that never saw one. ARGV[1]:
# the kind to plant. Defines now and planted (ms) and restarted.
_BOOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local marker = redis.call('GET', KEYS[2])
if not marker then
  marker = now .. ':' .. ARGV[1]
  redis.call('SET', KEYS[2], marker)
end
local sep = string.find(marker, ':', 1, true)
local planted = tonumber(string.sub(marker, 1, sep - 1))
local restarted = string.sub(marker, sep + 1) == 'restart'
"""
# The refresh lock, refused for a quiet period after a restart: until every refresh that
# could have been in flight has ended, so no second replica redeems the same rotating
# refresh token. ARGV: kind, token ('' = only plant the marker), lease ms, quiet ms.
# Returns 1 acquired (or, without a token, not fencing), 0 held by another, and in the
# quiet period minus the milliseconds left of it.
_ACQUIRE = _BOOT + """
local quiet = tonumber(ARGV[4]) - (now - planted)
if restarted and quiet > 0 then return -quiet end
if ARGV[2] == '' then return 1 end
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
return 0
"""
# A one-time jti: SET NX until the token's expiry. A token issued before a restart may have
# been used already: refused, not trusted. ARGV: kind, expiry (unix s), issued at (unix s,
# -1 unknown).
_JTI = _BOOT + """
local iat = tonumber(ARGV[3])
if restarted and iat >= 0 and iat < math.floor(planted / 1000) then return 0 end
if redis.call('SET', KEYS[1], '1', 'NX', 'EXAT', ARGV[2]) then return 1 end
return 0
"""
# redis-py Lock's compare-and-delete, for a lock released before anyone could use it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Lift a suspension: its record, removed, or false (one key: one slot in a cluster).
_LIFT = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v then redis.call('HDEL', KEYS[1], ARGV[1]) end
return v
"""
# Set a suspension, returning the record it replaces (or false).
_SUSPEND = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return v
"""
_FORGET = """
local g = tonumber(redis.call('GET', KEYS[2]) or '-1')
if tonumber(ARGV[1]) > g then redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2]) end
redis.call('DEL', KEYS[1])
return 1
"""


@dataclass
class _Lease:
    lost: bool = False

    def valid(self) -> bool:
        return not self.lost


class _FencedLock(Lock):
    """redis-py's lock (random owner, compare-and-delete release, compare-and-extend
    renewal) whose acquisition also honours the quiet period after Redis lost its data."""

    coordinator: RedisCoordinator
    quiet: bool = False  # the last attempt was refused because Redis restarted recently

    async def do_acquire(self, token: str | bytes) -> bool:
        assert self.timeout is not None
        name = self.name if isinstance(self.name, str) else bytes(self.name).decode()
        got = await self.coordinator.fenced_acquire(name, token, int(self.timeout * 1000))
        self.quiet = got < 0
        return got == 1


class RedisCoordinator:
    name = "redis"
    resync_every = RESYNC_EVERY  # suspensions (proxy.suspensions.SuspensionStore)

    def __init__(self, settings: CoordinationSettings, *, cache_key: bytes,
                 environ: Mapping[str, str] = os.environ,
                 clock: Callable[[], float] = time.time,
                 quiet_period: float = 0.0) -> None:
        """``quiet_period``: how long refresh locks are refused after Redis lost its data;
        at least the longest a refresh can take (see RefreshSettings.max_duration)."""
        self._s = settings
        self._quiet_ms = int(quiet_period * 1000)
        url = settings.url or environ.get(settings.url_env or "", "")
        if settings.mode == "sentinel":
            url = ("rediss" if settings.tls else "redis") + "://"  # servers from sentinels
        elif not url:
            from proxy.errors import ConfigError

            raise ConfigError(f"coordination.url_env: {settings.url_env} is not set")
        password = None
        if settings.password_env or settings.password_file:
            password = resolve_secret(env=settings.password_env, file=settings.password_file,
                                      what="coordination.password", environ=environ).reveal()
        self._auth = _credentials(settings, password)
        sub_auth = self._auth()
        if isinstance(sub_auth.get("credential_provider"), StreamingCredentialProvider):
            sub_auth["credential_provider"] = _SubscriptionToken(
                sub_auth["credential_provider"])
        self._sub_token: _SubscriptionToken | None = sub_auth.get("credential_provider")
        self._r, self._sub = _clients(settings, url, self._auth, sub_auth, environ)
        self._nodes: dict[str, Redis] = {}  # cluster: one plain client per node (WAIT)
        self._aead = AESGCM(cache_key)
        self._name_key = hashlib.sha256(b"credproxy redis names" + cache_key).digest()
        self._clock = clock
        self._channel = settings.key_prefix + "events"
        # A cluster carries invalidations over sharded pub/sub (Redis 7+); an older
        # cluster over classic pub/sub, which every node relays.
        self._sharded = settings.mode == "cluster"
        self._callbacks: list[Invalidation] = []
        self._suspension_callbacks: list[Changed] = []
        self._suspensions_key = settings.key_prefix + "suspensions"
        self._waiters: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()
        self._put = self._r.register_script(_PUT)
        self._forget = self._r.register_script(_FORGET)
        self._take = self._r.register_script(_TAKE)
        self._acquire = self._r.register_script(_ACQUIRE)
        self._once = self._r.register_script(_JTI)
        self._release = self._r.register_script(_RELEASE)
        self._lift = self._r.register_script(_LIFT)
        self._suspend = self._r.register_script(_SUSPEND)
        self._slotted = settings.slotted
        self._acks = settings.acks
        self._seen_redis = False  # this process has talked to this Redis's data before
        # Monotonic end of the fencing period per bucket (0: one marker), as last seen.
        self._fenced_until: dict[int, float] = {}
        self._origin = secrets.token_hex(6)
        # Called on every failed Redis operation (the app counts them in a metric).
        self.on_error: Callable[[], None] = lambda: None

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="credproxy-redis-events")

    async def check(self) -> None:
        """Raise :class:`CoordinationUnavailable` unless Redis answers, is the topology
        ``coordination.mode`` says (a cluster node or a sentinel given as a standalone
        server would answer PING and then fail every refresh), and accepts the Entra ID
        token. The message names the key to fix (``credproxy check``, readiness)."""
        problem = _entra_problem(self._s)
        if problem is not None:
            raise CoordinationUnavailable(problem)
        try:
            await self._ready()
            await self._r.ping()
            mode = await self._server_mode()
        except Exception as exc:  # redis-py, the cluster client and redis-entraid alike
            raise CoordinationUnavailable(_explain(self._s, exc)) from exc
        if mode == "cluster" and self._s.mode != "cluster":
            raise CoordinationUnavailable(
                "the server at coordination.url is a Redis Cluster node (redis_mode: "
                "cluster): set coordination.mode: cluster (every refresh would fail "
                "across slots otherwise)")
        if mode == "sentinel":
            raise CoordinationUnavailable(
                "the server at coordination.url is a Redis Sentinel, not a data server: "
                "set coordination.mode: sentinel with sentinels and service_name")

    async def _server_mode(self) -> str | None:
        """``redis_mode`` of INFO server (standalone, cluster, sentinel); None when the
        server (a proxy) does not say or refuses INFO."""
        if isinstance(self._r, RedisCluster):
            return "cluster"
        try:
            info = await self._r.info("server")
        except ResponseError:
            return None
        mode = info.get("redis_mode") if isinstance(info, dict) else None
        return mode if isinstance(mode, str) else None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for node in self._nodes.values():
            await node.aclose()
        await self._r.aclose()
        await self._sub.aclose()

    def on_invalidation(self, callback: Invalidation) -> None:
        self._callbacks.append(callback)

    # -- names -------------------------------------------------------------------------
    def _key(self, kind: str, user: str, provider: str) -> str:
        digest = hmac.new(self._name_key, f"{user}\x00{provider}".encode(),
                          hashlib.sha256).hexdigest()[:32]
        return self._named(kind, digest)

    def _named(self, kind: str, digest: str) -> str:
        """The key of ``kind`` for a grant (or jti) ``digest``: in its bucket's slot when
        keys are laid out for slots."""
        if not self._slotted:
            return f"{self._s.key_prefix}{kind}:{digest}"
        return f"{self._s.key_prefix}{kind}:{{b{_bucket(digest)}}}:{digest}"

    def _marker(self, key: str) -> str:
        """The boot marker that fences ``key``: its bucket's (in its slot), or the one."""
        if not self._slotted:
            return f"{self._s.key_prefix}boot"
        return f"{self._s.key_prefix}boot:{key[key.index('{'):key.index('}') + 1]}"

    def _markers(self) -> list[str]:
        if not self._slotted:
            return [f"{self._s.key_prefix}boot"]
        return [f"{self._s.key_prefix}boot:{{b{b}}}" for b in range(BUCKETS)]

    def _single(self, kind: str, name: str) -> str:
        """A single-use value's key (state, its used marker): both in the slot of
        ``name`` when keys are laid out for slots."""
        return f"{self._s.key_prefix}{kind}:{{{name}}}" if self._slotted else \
            f"{self._s.key_prefix}{kind}:{name}"

    # -- the refresh lock --------------------------------------------------------------
    @asynccontextmanager
    async def lock(self, user: str, provider: str) -> AsyncIterator[Lease]:
        name = self._key("lock", user, provider)
        lock = _FencedLock(self._r, name, timeout=self._s.lock_lease, thread_local=False,
                           raise_on_release_error=False)
        lock.coordinator = self
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._s.lock_wait
        while True:
            # Register for the wake-up before trying, so a release in between is not lost.
            event = self._waiters.setdefault(name, asyncio.Event())
            try:
                if await lock.acquire(blocking=False):
                    break
            except _FAILED as exc:
                self.on_error()
                raise CoordinationUnavailable(
                    f"redis unreachable for the refresh lock: {type(exc).__name__}") from exc
            fencing = self.fencing_remaining()
            if lock.quiet and fencing > 0:
                # Waiting would only hold the agent's request for lock_wait and end in a
                # 503 anyway: say at once how long the fencing period still runs.
                raise CoordinationFencing(
                    "redis lost its data recently: refreshes wait until any refresh that was "
                    "in flight has ended", remaining=fencing)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise CoordinationUnavailable("timed out waiting for another replica's refresh")
            # Woken by the holder's "released" message; the timeout covers a missed one.
            poll = 1.0 if self.subscribed.is_set() else 0.25
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=min(remaining, poll))
        lease = _Lease()
        renew = asyncio.create_task(self._renew(lock, lease))
        try:
            yield lease
        finally:
            renew.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renew
            with contextlib.suppress(*_LEASE_FAILED):
                await lock.release()
            with contextlib.suppress(*_FAILED):
                await self._publish({"t": "released", "k": name})

    async def fenced_acquire(self, name: str, token: str | bytes, lease_ms: int) -> int:
        """Run the acquire script: 1 acquired, 0 held by another, negative in the quiet
        period after a restart (minus the milliseconds left of it, which
        :meth:`fencing_remaining` then reports). With an empty token it only plants the boot
        marker (and learns whether the quiet period runs). A lock taken is confirmed by
        ``replica_acks`` replicas (``WAIT`` on the connection that wrote it), or released
        again: raises :class:`CoordinationUnavailable` then."""
        marker = self._marker(name)
        await self._ready()
        if token and self._acks:
            got = await self._acquire_replicated(name, marker, token, lease_ms)
        else:
            got = await self._with_marker(self._acquire, name, marker, token, lease_ms,
                                          self._quiet_ms)
        self._fenced_until[_bucket_of(marker)] = time.monotonic() + (
            -got / 1000 if got < 0 else 0.0)
        return got

    async def _acquire_replicated(self, name: str, marker: str, token: str | bytes,
                                  lease_ms: int) -> int:
        """The acquire script and ``WAIT`` in one pipeline: one connection, so ``WAIT``
        counts the replicas that have this lock (Redis counts per connection). In a
        cluster, on the node that owns the key (its topology refreshed once on MOVED).

        ``WAIT`` waits at most half of ``op_timeout``, so the command's own timeout
        outlasts it and an unconfirmed lock is told from a stalled Redis. A lock that was
        not confirmed, or whose confirmation was lost to a timeout or an error reply, is
        released again on that node (compare-and-delete: only ours), so it does not hold
        the grant's refreshes back for its whole lease."""
        kind = "restart" if self._seen_redis else "fresh"
        wait_ms = max(1, int(self._s.op_timeout * 500))
        for attempt in (1, 2):
            client = await self._node_for(name)
            try:
                async with client.pipeline(transaction=False) as pipe:
                    await self._acquire(keys=[name, marker],  # queued, not yet sent
                                        args=[kind, token, lease_ms, self._quiet_ms],
                                        client=pipe)
                    pipe.execute_command("WAIT", self._acks, wait_ms)
                    got, acked = await pipe.execute()
            except ResponseError as exc:
                moved = str(exc).startswith(("MOVED", "ASK"))
                if moved and attempt == 1 and isinstance(self._r, RedisCluster):
                    await self._r.nodes_manager.initialize()
                    continue
                if not moved:
                    await self._release_on(client, name, token)
                if "WAIT" in str(exc).upper() and not moved:
                    # A proxy (or a renamed command) refuses WAIT: say which setting.
                    raise CoordinationUnavailable(
                        f"Redis refused WAIT ({str(exc)[:120]}), so no replica can confirm "
                        "the refresh lock: set coordination.replica_acks: 0 if this Redis "
                        "cannot confirm writes (accepting the failover risk)") from exc
                raise
            except RedisTimeoutError:
                await self._release_on(client, name, token)
                raise
            self._seen_redis = True
            if int(got) == 1 and int(acked) < self._acks:
                await self._release_on(client, name, token)
                raise CoordinationUnavailable(
                    f"the refresh lock was confirmed by {acked} of {self._acks} replica(s) "
                    f"within {wait_ms / 1000:g} s: a failover could lose it, so the refresh "
                    "does not run now (coordination.replica_acks)")
            return int(got)
        raise CoordinationUnavailable("the cluster moved the refresh lock's slot twice")

    async def _release_on(self, client: Redis, name: str, token: str | bytes) -> None:
        """Release our lock ``name`` on ``client``'s node, if we hold it (best effort)."""
        with contextlib.suppress(*_FAILED):
            await self._release(keys=[name], args=[token], client=client)

    async def _node_for(self, key: str) -> Redis:
        """The client whose pipeline reaches the node that owns ``key``."""
        if not isinstance(self._r, RedisCluster):
            plain: Redis = self._r
            return plain
        await self._r.initialize()  # learns the slot map once (a no-op after)
        node = self._r.get_node_from_key(key)
        if node is None:
            raise CoordinationUnavailable("the cluster has no node for the refresh lock's "
                                          "slot right now")
        client = self._nodes.get(node.name)
        if client is None:
            # The node's own connection settings (TLS, timeouts), one small pool, and
            # credentials of its own (an Entra ID provider renews for one client only).
            pool = ConnectionPool(connection_class=node.connection_class, max_connections=8,
                                  **{**node.connection_kwargs, **self._auth()})
            client = self._nodes[node.name] = _renewed(Redis(connection_pool=pool))
        return client

    async def _ready(self) -> None:
        """A cluster client learns the slot map before its first command (a no-op after).
        redis-py's cluster client, used by many tasks at once before it knows the map,
        sends scripts to the wrong nodes; the re-initialisations the MOVED answers cause
        close connections other tasks are writing on (asyncio raises TypeError there, not a
        RedisError): the first planting of the boot markers failed that way and killed the
        subscription, and every refresh of a fresh cluster was refused as fencing."""
        if isinstance(self._r, RedisCluster):
            await self._r.initialize()

    def fencing_remaining(self) -> float:
        """Seconds left of the fencing period as last seen in Redis (0: not fencing), the
        longest of any bucket's: the quiet period after Redis lost its data, during which
        no refresh lock is granted."""
        now = time.monotonic()
        return max([0.0, *(until - now for until in self._fenced_until.values())])

    async def plant_markers(self) -> None:
        """Plant every boot marker that is missing (as ``fresh`` for a Redis this process
        never saw, else ``restart``): after a (re)subscription, so a bucket whose marker is
        gone later is known to have lost its data."""
        async def plant(marker: str) -> None:
            got = await self._with_marker(self._acquire, marker, marker, "", 0,
                                          self._quiet_ms)
            self._fenced_until[_bucket_of(marker)] = time.monotonic() + (
                -got / 1000 if got < 0 else 0.0)

        kind_seen = self._seen_redis
        markers = self._markers()
        for start in range(0, len(markers), 32):
            await asyncio.gather(*(plant(m) for m in markers[start:start + 32]))
            self._seen_redis = kind_seen  # one kind for the whole planting
        self._seen_redis = True

    async def _with_marker(self, script: Any, key: str, marker: str, *args: object) -> int:
        """Run a script that starts with _BOOT, telling it which kind of marker to plant."""
        await self._ready()
        kind = "restart" if self._seen_redis else "fresh"
        got = await script(keys=[key, marker], args=[kind, *args])
        self._seen_redis = True
        return int(got)

    async def _renew(self, lock: Lock, lease: _Lease) -> None:
        """Extend the lease every third of it. A failed extension is retried until the
        lease would really have lapsed; only then (or when another owner holds the lock,
        e.g. after a Redis restart) is it lost."""
        loop = asyncio.get_running_loop()
        period = self._s.lock_lease / 3
        expires = loop.time() + self._s.lock_lease
        while True:
            await asyncio.sleep(period)
            while True:
                try:
                    await lock.reacquire()
                    expires = loop.time() + self._s.lock_lease
                    break
                except LockNotOwnedError:
                    lease.lost = True
                    log.warning("refresh lock lost: no longer owned (Redis restarted?)")
                    return
                except _LEASE_FAILED as exc:
                    self.on_error()
                    if loop.time() + min(period, 0.25) >= expires:
                        lease.lost = True
                        log.warning("refresh lock lease lapsed (%s)", type(exc).__name__)
                        return
                    await asyncio.sleep(min(period, 0.25))

    # -- the shared cache --------------------------------------------------------------
    async def cache_get(self, user: str, provider: str) -> Grant | None:
        if not self._s.shared_cache:
            return None
        key = self._key("tok", user, provider)
        try:
            await self._ready()
            raw = await self._r.get(key)
        except _FAILED:
            self.on_error()
            return None
        if not isinstance(raw, bytes) or len(raw) < 13:
            return None
        try:
            plain = self._aead.decrypt(raw[:12], raw[12:], key.encode())
            data = json.loads(plain)
            if data["u"] != user or data["p"] != provider:
                return None
            return grant_from_record(data["t"], user=user, provider=provider,
                                     version=int(data["v"]),
                                     updated_at=float(data["at"]))
        except (InvalidTag, ValueError, KeyError, TypeError, TokenSetError):
            log.warning("discarding an unreadable shared cache entry")
            return None

    async def cache_put(self, grant: Grant) -> None:
        t = grant.tokens
        if not self._s.shared_cache or grant.status is not GrantStatus.ACTIVE:
            return
        if t.expires_at is None:
            return  # no expiry to bound the TTL by: keep it out of the shared cache
        ttl_ms = int((t.expires_at - self._clock()) * 1000)
        if ttl_ms <= 0:
            return
        key = self._key("tok", grant.user, grant.provider)
        plain = json.dumps({"u": grant.user, "p": grant.provider, "v": grant.version,
                            "at": grant.updated_at, "t": grant_record(grant)}).encode()
        nonce = secrets.token_bytes(12)
        sealed = nonce + self._aead.encrypt(nonce, plain, key.encode())
        try:
            await self._ready()
            await self._put(keys=[key, self._key("gen", grant.user, grant.provider)],
                            args=[grant.version, sealed, ttl_ms])
        except _FAILED:
            self.on_error()

    async def cache_forget(self, grant_key: tuple[str, str], version: int) -> None:
        user, provider = grant_key
        try:
            await self._ready()
            await self._forget(keys=[self._key("tok", user, provider),
                                     self._key("gen", user, provider)],
                               args=[version, _GEN_TTL])
        except _FAILED as exc:
            self.on_error()
            raise CoordinationUnavailable("redis unreachable while forgetting a grant") from exc

    # -- last use (the self-service page) ------------------------------------------------
    async def note_use(self, user: str, provider: str, at: float) -> None:
        try:
            await self._ready()
            await self._r.set(self._key("use", user, provider), f"{at:.0f}", ex=USE_TTL)
        except _FAILED as exc:
            self.on_error()
            raise CoordinationUnavailable("redis unreachable: last use not noted") from exc

    async def last_uses(self, user: str, providers: list[str]) -> dict[str, float]:
        try:
            await self._ready()
            # One GET per grant: keys of one user may sit in different cluster slots.
            got = await asyncio.gather(*(self._r.get(self._key("use", user, p))
                                         for p in providers))
        except _FAILED as exc:
            self.on_error()
            raise CoordinationUnavailable("redis unreachable: last uses unknown") from exc
        out: dict[str, float] = {}
        for provider, raw in zip(providers, got, strict=True):
            try:
                out[provider] = float(raw)
            except (TypeError, ValueError):
                continue
        return out

    # -- invalidation ------------------------------------------------------------------
    async def publish_invalidation(self, user: str, provider: str) -> None:
        msg = {"t": "inv", "u": user, "p": provider, "o": self._origin}
        try:
            await self._publish(msg)
        except _FAILED as exc:
            self.on_error()
            raise CoordinationUnavailable("redis unreachable: invalidation not sent") from exc

    async def _publish(self, msg: Mapping[str, object]) -> None:
        data = json.dumps(msg)
        await self._ready()
        if self._sharded:
            try:
                await self._r.spublish(self._channel, data)
                return
            except ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                self._sharded = False  # Redis 6: every node relays classic messages
        await self._r.publish(self._channel, data)

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            # Subscription messages are read too (filtered below): a server-sent
            # "sunsubscribe" says the channel's slot moved.
            pubsub = self._sub.pubsub()
            try:
                if isinstance(self._sub, RedisCluster):
                    # The current slot map, to find the channel's shard (it may have moved
                    # since the last subscription: a reshard, a failover).
                    await self._sub.initialize()
                    await self._sub.nodes_manager.initialize()
                await self._ready()  # before planting 32 markers at once
                if self._sharded:
                    try:
                        await pubsub.ssubscribe(self._channel)
                    except ResponseError as exc:
                        if "unknown command" not in str(exc).lower():
                            raise
                        self._sharded = False
                if not self._sharded:
                    await pubsub.subscribe(self._channel)
                # After a restart, the first replica back plants the markers that hold
                # refresh locks back while an interrupted refresh may still be running.
                await self.plant_markers()
                # Anything published while we were not subscribed is lost: start clean.
                await self._fire(None)
                await self._suspensions_changed()
                self.subscribed.set()
                backoff = 0.1
                while True:
                    if self._sharded:
                        msg = await pubsub.get_sharded_message(
                            ignore_subscribe_messages=False, timeout=1.0)
                        if msg is not None and msg.get("type") == "sunsubscribe":
                            # The server ended the subscription: the channel's slot moved
                            # to another shard (a reshard). Subscribe again where it is.
                            raise ConnectionError("the events channel's slot moved")
                        if msg is not None and msg.get("type") != "smessage":
                            msg = None
                    else:
                        msg = await pubsub.get_message(ignore_subscribe_messages=False,
                                                       timeout=1.0)
                        if msg is not None and msg.get("type") != "message":
                            msg = None
                    if msg is not None:
                        await self._handle(msg.get("data"))
                    await self._reauthenticate(pubsub)
            except _LISTEN_FAILED as exc:
                self.on_error()
                if self.subscribed.is_set():
                    log.warning("redis subscription lost (%s); retrying", type(exc).__name__)
                else:
                    log.info("redis subscription not established (%s: %s); retrying",
                             type(exc).__name__, exc)
            except Exception:
                # Never end: without this task no invalidation, no release wake-up and no
                # re-planting of the boot markers would ever arrive again.
                self.on_error()
                log.exception("redis subscription failed unexpectedly; retrying")
            finally:
                self.subscribed.clear()
                with contextlib.suppress(*_LISTEN_FAILED):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _reauthenticate(self, pubsub: Any) -> None:
        """Send a renewed Entra ID token on the subscription's connections (``AUTH``,
        RESP3 allows it while subscribed), between two reads of this loop; a message that
        arrives before AUTH's reply is handled as any other. An error ends the
        subscription (the listener subscribes again, with the newest token)."""
        credentials = self._sub_token
        token = credentials.pending() if credentials is not None else None
        if credentials is None or token is None:
            return
        nodes = getattr(pubsub, "node_pubsub_mapping", {}).values()  # a cluster's shards
        connections = [c for c in (pubsub.connection, *(n.connection for n in nodes))
                       if c is not None]
        for conn in connections:
            await conn.send_command("AUTH", token.try_get("oid"), token.get_value())
            while True:
                reply = await conn.read_response(timeout=self._s.op_timeout,
                                                 push_request=True)
                if not isinstance(reply, list):
                    break  # AUTH's OK (an error reply raised ResponseError)
                if reply and reply[0] in (b"message", b"smessage") and len(reply) == 3:
                    await self._handle(reply[2])
        credentials.sent(token)

    async def _handle(self, data: object) -> None:
        try:
            msg = json.loads(data if isinstance(data, str | bytes) else "")
        except ValueError:
            return
        if not isinstance(msg, dict):
            return
        if msg.get("t") == "released":
            event = self._waiters.pop(str(msg.get("k")), None)
            if event is not None:
                event.set()
        elif msg.get("t") == "inv" and isinstance(msg.get("u"), str) and isinstance(
                msg.get("p"), str):
            await self._fire((msg["u"], msg["p"]))
        elif msg.get("t") == "susp":
            await self._suspensions_changed()

    async def _fire(self, key: tuple[str, str] | None) -> None:
        for callback in list(self._callbacks):
            await callback(key)

    # -- suspensions (proxy.suspensions: the kill switch) ---------------------------------
    def on_suspensions(self, callback: Changed) -> None:
        self._suspension_callbacks.append(callback)

    async def _suspensions_changed(self) -> None:
        for callback in list(self._suspension_callbacks):
            await callback()

    async def load_suspensions(self) -> list[Suspension]:
        """Every suspension in the hash (``HGETALL``); a field that does not parse is
        skipped with a warning. Raises :class:`CoordinationUnavailable`."""
        try:
            await self._ready()
            raw = await self._r.hgetall(self._suspensions_key)
        except _FAILED as exc:
            self.on_error()
            raise CoordinationUnavailable(_explain(self._s, exc)) from exc
        out = []
        for name, value in raw.items():
            try:
                s = Suspension.from_dict(json.loads(value))
            except (ValueError, TypeError):
                log.warning("skipping an unreadable suspension record in Redis")
                continue
            if field_name(s.kind, s.value).encode() == name:
                out.append(s)
        return out

    async def add_suspension(self, suspension: Suspension) -> Suspension | None:
        """``HSET`` in a script that returns the record it replaces, then a
        ``susp`` message on the events channel. Raises :class:`CoordinationUnavailable`
        when it was not stored; a lost message is only logged: every replica re-reads the
        hash within :data:`RESYNC_EVERY` seconds."""
        data = json.dumps(suspension.as_dict())
        try:
            await self._ready()
            old = await self._suspend(keys=[self._suspensions_key],
                                      args=[suspension.key, data])
        except _FAILED as exc:
            self.on_error()
            raise CoordinationUnavailable(_explain(self._s, exc)) from exc
        await self._announce_suspensions()
        return _suspension(old)

    async def lift_suspension(self, kind: Kind, value: str) -> Suspension | None:
        try:
            await self._ready()
            old = await self._lift(keys=[self._suspensions_key],
                                   args=[field_name(kind, value)])
        except _FAILED as exc:
            self.on_error()
            raise CoordinationUnavailable(_explain(self._s, exc)) from exc
        if old is not None:
            await self._announce_suspensions()
        return _suspension(old)

    async def _announce_suspensions(self) -> None:
        try:
            await self._publish({"t": "susp", "o": self._origin})
        except _FAILED as exc:
            self.on_error()
            log.warning("suspension stored, but the message to replicas failed (%s): they "
                        "read it within %.0f s", type(exc).__name__, RESYNC_EVERY)

    # -- single-use values (OAuth state) -------------------------------------------------
    async def put_once(self, name: str, value: bytes, ttl: float) -> None:
        try:
            await self._ready()
            await self._r.set(self._single("once", name), value, px=int(ttl * 1000))
        except _FAILED as exc:
            self.on_error()
            raise CoordinationUnavailable("redis unreachable: cannot store state") from exc

    async def take_once(self, name: str) -> bytes | None | Used:
        try:
            await self._ready()
            # The "used" marker outlives the value by far, so a replay is named as such.
            got = await self._take(keys=[self._single("once", name),
                                         self._single("used", name)],
                                   args=[24 * 3600 * 1000])
        except _FAILED as exc:
            self.on_error()
            raise CoordinationUnavailable("redis unreachable: cannot read state") from exc
        if isinstance(got, list):
            return USED
        return got if isinstance(got, bytes) else None

    # -- one-time jti ------------------------------------------------------------------
    async def first_use(self, issuer: str, jti: str, expires_at: float,
                        issued_at: float | None = None) -> bool:
        digest = hashlib.sha256(f"{issuer}\x00{jti}".encode()).hexdigest()[:40]
        key = self._named("jti", digest)
        try:
            return await self._with_marker(
                self._once, key, self._marker(key), int(expires_at) + 1,
                -1 if issued_at is None else int(issued_at)) == 1
        except _FAILED as exc:
            self.on_error()
            raise CoordinationUnavailable("redis unreachable: cannot record jti") from exc


def _suspension(raw: object) -> Suspension | None:
    """A suspension record read back from the hash (None: none, or unreadable)."""
    if not isinstance(raw, bytes | str):
        return None
    try:
        return Suspension.from_dict(json.loads(raw))
    except (ValueError, TypeError):
        return None


def _bucket(digest: str) -> int:
    """The bucket of a hex digest (a grant's or a jti's)."""
    return int(digest[:8], 16) % BUCKETS


def _bucket_of(marker: str) -> int:
    """The bucket a boot marker stands for (0 for the one marker of the legacy layout)."""
    start = marker.find("{b")
    return int(marker[start + 2:marker.index("}", start)]) if start >= 0 else 0


def _credentials(settings: CoordinationSettings,
                 password: str | None) -> Callable[[], dict[str, Any]]:
    """Keyword arguments with the credentials of one more redis-py client: the ACL user and
    password, or a new Entra ID credential provider over one identity provider. redis-py
    gives a provider one renewal callback (the last client registered), so every client
    gets its own, each renewing its own connections."""
    entra = settings.entra_id
    if entra is None:
        return lambda: {"username": settings.username, "password": password}
    idp = entra_identity(entra)
    return lambda: {"credential_provider": entra_credentials(entra, idp)}


def _renewed(client: Redis) -> Redis:
    """``client``, its pooled connections re-authenticated in place (``AUTH``) whenever its
    Entra ID credential provider renews the token. redis-py registers that only for a
    client that builds its own pool, not for ``Redis.from_url``, ``Sentinel.master_for``
    or a pool passed in (there the provider's token was never renewed: "No registered
    callback for token renewal task")."""
    pool = client.connection_pool
    provider = pool.connection_kwargs.get("credential_provider")
    if isinstance(provider, StreamingCredentialProvider):
        listener = RegisterReAuthForPooledConnections()  # type: ignore[no-untyped-call]
        listener.listen(AfterPooledConnectionsInstantiationEvent([pool], ClientType.ASYNC,
                                                                 provider))
    return client


class _SubscriptionToken(CredentialProvider):
    """The subscription's Entra ID credentials, renewed by the listener itself.

    redis-py re-authenticates a RESP3 subscription from the token manager's task and reads
    AUTH's reply there while the listener reads messages from the same connection: a
    RuntimeError, the subscription lost (and every memory cache dropped) at each renewal.
    This provider is no StreamingCredentialProvider, so redis-py registers nothing for
    it: it hands out the newest token of ``source`` (which renews on its own schedule) and
    :meth:`RedisCoordinator._reauthenticate` sends a renewed one between two reads."""

    def __init__(self, source: StreamingCredentialProvider) -> None:
        self._source = source
        self._latest: TokenInterface | None = None
        self._sent: str | None = None  # the token the subscription authenticated with
        # redis-py's token manager awaits these callbacks (its annotation says sync).
        source.on_next(self._next)  # type: ignore[arg-type]
        source.on_error(self._failed)  # type: ignore[arg-type]

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        credentials: tuple[str] | tuple[str, str] = self._source.get_credentials()
        self._sent = credentials[-1]
        return credentials

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        credentials: tuple[str] | tuple[str, str] = (
            await self._source.get_credentials_async())
        self._sent = credentials[-1]
        # A connection just authenticated with the newest token there is: an earlier
        # renewal is older, never to be sent after it (it may have expired meanwhile).
        self._latest = None
        return credentials

    def pending(self) -> TokenInterface | None:
        """A renewed token the subscription has not been sent yet (never an expired one:
        sending it would only fail AUTH and drop the subscription)."""
        latest = self._latest
        if latest is None or latest.get_value() == self._sent or latest.is_expired():
            return None
        return latest

    def sent(self, token: TokenInterface) -> None:
        self._sent = token.get_value()

    async def _next(self, token: TokenInterface) -> None:
        self._latest = token

    async def _failed(self, exc: Exception) -> None:
        log.warning("Entra ID token renewal failed (%s): the subscription keeps its token "
                    "and gets a new one when it reconnects", type(exc).__name__)


def _clients(settings: CoordinationSettings, url: str, auth: Callable[[], dict[str, Any]],
             sub_auth: dict[str, Any], environ: Mapping[str, str]) -> tuple[Any, Any]:
    """(commands client, subscription client) for ``settings.mode``: redis-py's own
    Redis, RedisCluster or Sentinel-managed clients.

    Commands time out after ``op_timeout`` with one quick retry on a broken connection
    (after a restart every pooled connection is dead; without it the first command on each
    would fail a request). Subscriptions block until a message comes: no socket timeout
    there (health checks notice a dead connection) and no transparent retry: redis-py
    would reconnect and resubscribe silently, and the listener must see every loss (to drop
    caches that may have missed invalidations, and to plant the boot markers again)."""
    tls: dict[str, Any] = {}
    if settings.ca_file and (url.startswith("rediss://") or settings.tls):
        tls["ssl_ca_certs"] = str(Path(settings.ca_file).expanduser())
    common: dict[str, Any] = {**tls, "socket_connect_timeout": settings.op_timeout}
    quick = Retry(ExponentialBackoff(cap=0.1, base=0.01), 1)
    if settings.mode == "cluster":
        nodes = [ClusterNode(*_host_port(n)) for n in settings.nodes]
        # The cluster client's retry (redis-py 6+ ignores, and warns about,
        # cluster_error_retry_attempts when a retry is given).
        kwargs: dict[str, Any] = {**common, "retry": Retry(
            ExponentialBackoff(cap=0.5, base=0.05), 3)}
        if nodes:
            kwargs["startup_nodes"] = nodes
        # (The cluster client registers its own renewal, for every node it reaches.)
        cluster = RedisCluster.from_url(url, socket_timeout=settings.op_timeout, **kwargs,
                                        **auth())
        cluster_sub = RedisCluster.from_url(url, socket_timeout=None, health_check_interval=5,
                                            **{**kwargs, "retry": Retry(NoBackoff(), 0)},
                                            **sub_auth)
        return cluster, cluster_sub
    if settings.mode == "sentinel":
        sentinel_auth: dict[str, Any] = {"socket_timeout": settings.op_timeout,
                                         "socket_connect_timeout": settings.op_timeout}
        if settings.sentinel_username:
            sentinel_auth["username"] = settings.sentinel_username
        if settings.sentinel_password_env:
            sentinel_auth["password"] = resolve_secret(
                env=settings.sentinel_password_env, file=None,
                what="coordination.sentinel_password", environ=environ).reveal()
        if settings.tls:
            sentinel_auth.update(ssl=True, **tls)
            common["ssl"] = True
        sentinel = Sentinel([_host_port(n) for n in settings.sentinels],  # type: ignore[no-untyped-call]
                            sentinel_kwargs=sentinel_auth, **common)
        assert settings.service_name is not None
        commands = sentinel.master_for(settings.service_name, socket_timeout=settings.op_timeout,
                                       retry=quick, retry_on_error=[ConnectionError], **auth())
        sub = sentinel.master_for(settings.service_name, socket_timeout=None,
                                  health_check_interval=5, retry=Retry(NoBackoff(), 0),
                                  **sub_auth)
        return _renewed(commands), sub
    commands = Redis.from_url(url, socket_timeout=settings.op_timeout, retry=quick,
                              retry_on_error=[ConnectionError], **common, **auth())
    sub = Redis.from_url(url, socket_timeout=None, health_check_interval=5,
                         retry=Retry(NoBackoff(), 0), **common, **sub_auth)
    return _renewed(commands), sub


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _explain(settings: CoordinationSettings, exc: BaseException) -> str:
    """One line for an operator: what failed, and the key to look at."""
    from redis.exceptions import AuthenticationError, DataError

    text = f"{type(exc).__name__}: {str(exc)[:160]}" if str(exc) else type(exc).__name__
    name = type(exc).__name__
    if name == "MasterNotFoundError":
        return (f"no sentinel in coordination.sentinels knows a primary named "
                f"{settings.service_name!r} ({text}): check coordination.service_name, "
                "coordination.sentinels and the sentinels' ACL user "
                "(sentinel_username, sentinel_password_env)")
    if isinstance(exc, RedisClusterException) and settings.mode == "cluster":
        return (f"coordination.mode is cluster, but the server at coordination.url is not "
                f"a Redis Cluster node ({text}): set coordination.mode: standalone, or "
                "name a cluster node")
    if isinstance(exc, ResponseError) and settings.mode == "sentinel":
        return (f"coordination.sentinels names a server that is not a Redis Sentinel "
                f"({text}): list the sentinels' addresses (port 26379 by default)")
    if settings.entra_id is not None and isinstance(exc, AuthenticationError | DataError):
        return (f"Redis refused the Entra ID credentials ({text}): the token may have "
                "expired or lack the oid claim (the Redis user), or this identity has no "
                "access policy on the cache (coordination.entra_id)")
    if isinstance(exc, AuthenticationError):
        return (f"Redis refused the credentials ({text}): check coordination.username and "
                "password_env / password_file")
    return f"redis unreachable: {text}"


def _entra_problem(settings: CoordinationSettings) -> str | None:
    """What is wrong with the token ``coordination.entra_id`` would send now, for a token
    file (read here; DefaultAzureCredential is asked by redis-entraid itself); None when
    it looks usable."""
    entra = settings.entra_id
    if entra is None or entra.token_file is None:
        return None
    from proxy.coordination.entra import TokenFileIdentityProvider

    try:
        token = TokenFileIdentityProvider(Path(entra.token_file).expanduser()).request_token()
        oid = token.try_get("oid")
    except (OSError, ValueError) as exc:
        return f"coordination.entra_id.token_file: {exc}"
    except Exception:  # noqa: BLE001 - a JWT that does not decode
        return f"coordination.entra_id.token_file: {entra.token_file} does not hold a JWT"
    if not oid:
        return ("coordination.entra_id.token_file: the token has no oid claim (the Redis "
                "user is the identity's object id)")
    if token.is_expired():
        return (f"coordination.entra_id.token_file: the token in {entra.token_file} has "
                "expired; whatever provisions it must renew it")
    return None


def entra_identity(settings: EntraIdSettings) -> Any:
    """Where Entra ID tokens come from: azure-identity's DefaultAzureCredential (workload
    identity on Kubernetes), or ``token_file`` (re-read at each renewal)."""
    from proxy.coordination.entra import TokenFileIdentityProvider, default_identity_provider

    return (TokenFileIdentityProvider(Path(settings.token_file).expanduser())
            if settings.token_file else default_identity_provider(settings.scope))


def entra_credentials(settings: EntraIdSettings, idp: Any) -> Any:
    """redis-entraid's credential provider (https://github.com/redis/redis-py-entraid) over
    ``idp`` (:func:`entra_identity`): an Entra ID access token for ``scope`` as the
    password and its ``oid`` claim as the user, renewed when ``refresh_ratio`` of its
    lifetime has passed; the client's pooled connections are then re-authenticated in
    place (``AUTH``), no reconnect (see :func:`_renewed`). One per client."""
    from redis.auth.token_manager import RetryPolicy, TokenManagerConfig
    from redis_entraid.cred_provider import EntraIdCredentialsProvider

    config = TokenManagerConfig(expiration_refresh_ratio=settings.refresh_ratio,
                                lower_refresh_bound_millis=0,
                                token_request_execution_timeout_in_ms=5000,
                                retry_policy=RetryPolicy(max_attempts=3, delay_in_ms=100))
    return EntraIdCredentialsProvider(idp, config, block_for_initial=True)
