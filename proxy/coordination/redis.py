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
from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError, LockError, LockNotOwnedError, RedisError

from proxy.coordination.base import USED, CoordinationUnavailable, Invalidation, Lease, Used
from proxy.errors import CoordinationFencing
from proxy.settings import CoordinationSettings, resolve_secret
from proxy.tokenset import TokenSetError
from proxy.vault.base import Grant, GrantStatus, grant_record, read_grant_record

log = logging.getLogger("credproxy.redis")

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

    def __init__(self, settings: CoordinationSettings, *, cache_key: bytes,
                 environ: Mapping[str, str] = os.environ,
                 clock: Callable[[], float] = time.time,
                 quiet_period: float = 0.0) -> None:
        """``quiet_period``: how long refresh locks are refused after Redis lost its data;
        at least the longest a refresh can take (see RefreshSettings.max_duration)."""
        self._s = settings
        self._quiet_ms = int(quiet_period * 1000)
        url = settings.url or environ.get(settings.url_env or "", "")
        if not url:
            from proxy.errors import ConfigError

            raise ConfigError(f"coordination.url_env: {settings.url_env} is not set")
        password = None
        if settings.password_env or settings.password_file:
            password = resolve_secret(env=settings.password_env, file=settings.password_file,
                                      what="coordination.password", environ=environ).reveal()
        # One quick retry on a broken connection: after a Redis restart every pooled
        # connection is dead, and without it the first command on each fails a request.
        common: dict[str, Any] = {"username": settings.username, "password": password,
                                  "socket_connect_timeout": settings.op_timeout,
                                  "retry": Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
                                  "retry_on_error": [ConnectionError]}
        if url.startswith("rediss://") and settings.ca_file:
            common["ssl_ca_certs"] = str(Path(settings.ca_file).expanduser())
        self._r = Redis.from_url(url, socket_timeout=settings.op_timeout, **common)
        # Pub/sub reads block until a message comes: no socket timeout there; health
        # checks (PING) notice a dead connection instead. No transparent retry: redis-py
        # would reconnect and resubscribe silently, and _listen must see every loss (to
        # drop caches that may have missed invalidations, and to learn of the fencing
        # period after a restart).
        self._sub = Redis.from_url(url, socket_timeout=None, health_check_interval=5,
                                   **{**common, "retry": Retry(NoBackoff(), 0)})
        self._aead = AESGCM(cache_key)
        self._name_key = hashlib.sha256(b"credproxy redis names" + cache_key).digest()
        self._clock = clock
        self._channel = settings.key_prefix + "events"
        self._callbacks: list[Invalidation] = []
        self._waiters: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()
        self._put = self._r.register_script(_PUT)
        self._forget = self._r.register_script(_FORGET)
        self._take = self._r.register_script(_TAKE)
        self._acquire = self._r.register_script(_ACQUIRE)
        self._once = self._r.register_script(_JTI)
        self._boot_key = settings.key_prefix + "boot"
        self._seen_redis = False  # this process has talked to this Redis's data before
        self._fenced_until = 0.0  # monotonic end of the fencing period, as last seen
        self._origin = secrets.token_hex(6)
        # Called on every failed Redis operation (the app counts them in a metric).
        self.on_error: Callable[[], None] = lambda: None

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="credproxy-redis-events")

    async def check(self) -> None:
        try:
            await self._r.ping()
        except RedisError as exc:
            raise CoordinationUnavailable(f"redis unreachable: {type(exc).__name__}") from exc

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._r.aclose()
        await self._sub.aclose()

    def on_invalidation(self, callback: Invalidation) -> None:
        self._callbacks.append(callback)

    # -- names -------------------------------------------------------------------------
    def _key(self, kind: str, user: str, provider: str) -> str:
        digest = hmac.new(self._name_key, f"{user}\x00{provider}".encode(),
                          hashlib.sha256).hexdigest()[:32]
        return f"{self._s.key_prefix}{kind}:{digest}"

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
            except RedisError as exc:
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
            with contextlib.suppress(LockError, RedisError):
                await lock.release()
            with contextlib.suppress(RedisError):
                await self._r.publish(self._channel, json.dumps({"t": "released", "k": name}))

    async def fenced_acquire(self, name: str, token: str | bytes, lease_ms: int) -> int:
        """Run the acquire script: 1 acquired, 0 held by another, negative in the quiet
        period after a restart (minus the milliseconds left of it, which
        :meth:`fencing_remaining` then reports). With an empty token it only plants the boot
        marker (and learns whether the quiet period runs)."""
        got = await self._with_marker(self._acquire, name, token, lease_ms, self._quiet_ms)
        self._fenced_until = time.monotonic() + (-got / 1000 if got < 0 else 0.0)
        return got

    def fencing_remaining(self) -> float:
        """Seconds left of the fencing period as last seen in Redis (0: not fencing): the
        quiet period after Redis lost its data, during which no refresh lock is granted."""
        return max(0.0, self._fenced_until - time.monotonic())

    async def _with_marker(self, script: Any, key: str, *args: object) -> int:
        """Run a script that starts with _BOOT, telling it which kind of marker to plant."""
        kind = "restart" if self._seen_redis else "fresh"
        got = await script(keys=[key, self._boot_key], args=[kind, *args])
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
                except (LockError, RedisError) as exc:
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
            raw = await self._r.get(key)
        except RedisError:
            self.on_error()
            return None
        if not isinstance(raw, bytes) or len(raw) < 13:
            return None
        try:
            plain = self._aead.decrypt(raw[:12], raw[12:], key.encode())
            data = json.loads(plain)
            if data["u"] != user or data["p"] != provider:
                return None
            tokens, values, resources = read_grant_record(data["t"])
            return Grant(user=user, provider=provider, tokens=tokens, values=values,
                         resources=resources, version=int(data["v"]),
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
            await self._put(keys=[key, self._key("gen", grant.user, grant.provider)],
                            args=[grant.version, sealed, ttl_ms])
        except RedisError:
            self.on_error()

    async def cache_forget(self, grant_key: tuple[str, str], version: int) -> None:
        user, provider = grant_key
        try:
            await self._forget(keys=[self._key("tok", user, provider),
                                     self._key("gen", user, provider)],
                               args=[version, _GEN_TTL])
        except RedisError as exc:
            self.on_error()
            raise CoordinationUnavailable("redis unreachable while forgetting a grant") from exc

    # -- invalidation ------------------------------------------------------------------
    async def publish_invalidation(self, user: str, provider: str) -> None:
        msg = {"t": "inv", "u": user, "p": provider, "o": self._origin}
        try:
            await self._r.publish(self._channel, json.dumps(msg))
        except RedisError as exc:
            self.on_error()
            raise CoordinationUnavailable("redis unreachable: invalidation not sent") from exc

    async def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self._sub.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                # After a restart, the first replica back plants the marker that holds
                # refresh locks back while an interrupted refresh may still be running.
                await self.fenced_acquire(self._boot_key, "", 0)
                # Anything published while we were not subscribed is lost: start clean.
                await self._fire(None)
                self.subscribed.set()
                backoff = 0.1
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=1.0)
                    if msg is not None:
                        await self._handle(msg.get("data"))
            except (RedisError, OSError) as exc:
                self.on_error()
                if self.subscribed.is_set():
                    log.warning("redis subscription lost (%s); retrying", type(exc).__name__)
            finally:
                self.subscribed.clear()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

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

    async def _fire(self, key: tuple[str, str] | None) -> None:
        for callback in list(self._callbacks):
            await callback(key)

    # -- single-use values (OAuth state) -------------------------------------------------
    async def put_once(self, name: str, value: bytes, ttl: float) -> None:
        try:
            await self._r.set(f"{self._s.key_prefix}once:{name}", value, px=int(ttl * 1000))
        except RedisError as exc:
            self.on_error()
            raise CoordinationUnavailable("redis unreachable: cannot store state") from exc

    async def take_once(self, name: str) -> bytes | None | Used:
        p = self._s.key_prefix
        try:
            # The "used" marker outlives the value by far, so a replay is named as such.
            got = await self._take(keys=[f"{p}once:{name}", f"{p}used:{name}"],
                                   args=[24 * 3600 * 1000])
        except RedisError as exc:
            self.on_error()
            raise CoordinationUnavailable("redis unreachable: cannot read state") from exc
        if isinstance(got, list):
            return USED
        return got if isinstance(got, bytes) else None

    # -- one-time jti ------------------------------------------------------------------
    async def first_use(self, issuer: str, jti: str, expires_at: float,
                        issued_at: float | None = None) -> bool:
        digest = hashlib.sha256(f"{issuer}\x00{jti}".encode()).hexdigest()[:40]
        try:
            return await self._with_marker(
                self._once, f"{self._s.key_prefix}jti:{digest}", int(expires_at) + 1,
                -1 if issued_at is None else int(issued_at)) == 1
        except RedisError as exc:
            self.on_error()
            raise CoordinationUnavailable("redis unreachable: cannot record jti") from exc
