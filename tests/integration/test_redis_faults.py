"""Redis faults, each with its documented behaviour (README, Coordination):

- unreachable at start: the proxy starts; fresh tokens are served from the vault; a token
  that needs a refresh gets 503 credential-store-unavailable (coordination_unavailable),
  never a refresh without the lock; once Redis is back it recovers without a restart.
- lost and restarted mid-traffic (all keys gone): no request ever carries another user's
  token, no rotating refresh token is lost, and service recovers by itself. Refresh locks
  are held back after the restart until any refresh that was in flight has ended, so a
  second replica cannot redeem the same refresh token. A request that needs a refresh in
  that fencing period is answered at once (503 ``fencing``, Retry-After = the seconds left),
  not after ``lock_wait``; fresh tokens keep being served.
- slow (stalled): commands time out (op_timeout); cached tokens keep being served.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from pathlib import Path

import httpx2
import pytest

from devstack.procs import free_port
from devstack.redisproc import RedisServer
from devstack.stack import Stack, build_stack

pytestmark = pytest.mark.integration


# Short bounds keep the fencing period after a Redis restart (the longest a lock holder can
# still be at work: refresh 2 x 2 s + backoff, 3 vault calls x 1 s, 3 Redis calls x 0.5 s,
# plus 1 s; proxy.app.fencing_period) short enough for tests.
_REFRESH = {"attempts": 2, "timeout": 2.0, "backoff": 0.1}
_QUIET = 2 * 2.0 + 0.1 + 3 * 1.0 + 3 * 0.5 + 1.0


def _stack(tmp: Path, url: str, replicas: int = 2) -> tuple[Stack, list[str]]:
    s = build_stack(tmp, start_proxy=False,
                    config={"coordination": {"backend": "redis", "url": url,
                                             "op_timeout": 0.5, "lock_wait": 5},
                            "refresh": _REFRESH})
    s.config["vault"]["timeout"] = 1.0
    s.write_config()
    try:
        procs = s.start_replicas(replicas)
    except Exception:
        s.close()
        raise
    return s, [str(p.info["proxy_url"]) for p in procs]


def test_redis_unreachable_at_start_then_recovers(tmp_path: Path) -> None:
    port = free_port()
    redis = RedisServer(tmp_path / "redis", port=port)  # not started yet
    s, (proxy, _) = _stack(tmp_path / "stack", redis.url)
    try:
        s.vault_put("fresh", s.grant("fresh"))
        s.vault_put("stale", s.grant("stale", expires_in=0))
        # A replica that has never read the suspensions (the kill switch) cannot tell who
        # is suspended: even a fresh token is not sent until it can (fail closed).
        for user in ("fresh", "stale"):
            with s.client_via(proxy, context=s.context(user)) as c:
                r = c.get(f"{s.docs_url}/echo")
            assert r.status_code == 503
            assert r.json()["reason"] == "suspensions_unknown"
            assert "Retry-After" in r.headers
        assert s.stats()["refresh_by_user"].get("stale") is None  # no unlocked refresh
        redis.start()
        deadline = time.monotonic() + 10
        while True:
            with s.client_via(proxy, context=s.context("fresh")) as c:
                r = c.get(f"{s.docs_url}/echo")
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200
        deadline = time.monotonic() + 10
        while True:
            with s.client_via(proxy, context=s.context("stale")) as c:
                r = c.get(f"{s.docs_url}/echo")
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200
        assert s.stats()["refresh_by_user"]["stale"] == 1
    finally:
        s.close()
        redis.stop()


def test_redis_killed_and_restarted_under_load(redis_server: RedisServer,
                                                tmp_path: Path) -> None:
    s, proxies = _stack(tmp_path, redis_server.url, replicas=3)
    users = ["alice", "bob", "carol"] + [f"load-{i}" for i in range(7)]
    try:
        for u in users:
            # Short-lived access tokens force refreshes throughout the run.
            s.vault_put(u, s.grant(u, expires_in=61 + random.randint(0, 3)))
        contexts = {u: s.context(u) for u in users}
        outcomes: list[tuple[str, int, str | None]] = []
        stop = threading.Event()

        def chaos() -> None:
            time.sleep(1.0)
            redis_server.kill()
            time.sleep(1.5)
            redis_server.start()
            stop.set()

        async def load() -> None:
            clients = [httpx2.AsyncClient(proxy=p, verify=s.mitm_tls(), trust_env=False,
                                          timeout=30) for p in proxies]

            async def one(i: int) -> None:
                u = users[i % len(users)]
                r = await clients[i % len(clients)].get(
                    f"{s.docs_url}/documents", headers={"X-User-Context": contexts[u]})
                seen = r.json().get("user") if r.status_code == 200 else None
                outcomes.append((u, r.status_code, seen))

            i = 0
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline:
                await asyncio.gather(*[one(i + k) for k in range(20)])
                i += 20
            for c in clients:
                await c.aclose()

        t = threading.Thread(target=chaos)
        t.start()
        asyncio.run(load())
        t.join()
        from collections import Counter

        print("outcomes:", Counter(status for _, status, _ in outcomes),
              "refreshes:", s.stats()["refresh_by_user"])
        assert outcomes
        wrong = [(u, seen) for u, status, seen in outcomes if status == 200 and seen != u]
        assert wrong == []  # never another user's token
        assert {status for _, status, _ in outcomes} <= {200, 503}
        # Recovery without a restart, and every grant still alive: force a refresh of each.
        time.sleep(0.5)
        for u in users:
            grant = s.vault_get(u)
            assert grant.status == "active", u
            assert s.introspect(grant.tokens.refresh_token.reveal())["active"] is True, u
        for u in users:
            s.vault_put(u, {**_record(s, u), "expires_in": 0})
        for u in users:
            with s.client_via(proxies[0], context=contexts[u]) as c:
                # Right after the restart, refreshes wait out the quiet period (503).
                deadline = time.monotonic() + _QUIET + 10
                while True:
                    r = c.get(f"{s.docs_url}/documents")
                    if r.status_code != 503 or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
            assert r.status_code == 200 and r.json()["user"] == u
    finally:
        s.close()


def _fencing(admin: str) -> float:
    text = httpx2.get(f"{admin}/metrics", trust_env=False).text
    for line in text.splitlines():
        if line.startswith("credproxy_coordination_fencing "):
            return float(line.split()[1])
    raise AssertionError("no credproxy_coordination_fencing metric")


def test_a_refresh_in_the_fencing_period_is_answered_at_once(redis_server: RedisServer,
                                                             tmp_path: Path) -> None:
    lock_wait = 30
    s = build_stack(tmp_path, start_proxy=False,
                    config={"coordination": {"backend": "redis", "url": redis_server.url,
                                             "op_timeout": 0.5, "lock_wait": lock_wait},
                            "refresh": _REFRESH})
    s.config["vault"]["timeout"] = 1.0
    s.write_config()
    try:
        (replica,) = s.start_replicas(1)
        proxy, admin = str(replica.info["proxy_url"]), str(replica.info["admin_url"])
        s.vault_put("fresh", s.grant("fresh"))
        s.vault_put("stale", s.grant("stale", expires_in=0))
        with s.client_via(proxy, context=s.context("fresh")) as c:
            assert c.get(f"{s.docs_url}/echo").status_code == 200
        assert _fencing(admin) == 0
        redis_server.restart()  # every key gone, the refresh locks included
        deadline = time.monotonic() + 15
        while _fencing(admin) != 1 and time.monotonic() < deadline:
            time.sleep(0.1)  # the proxy resubscribes and sees the restart marker
        assert _fencing(admin) == 1
        started = time.monotonic()
        with s.client_via(proxy, context=s.context("stale")) as c:
            r = c.get(f"{s.docs_url}/echo")
        elapsed = time.monotonic() - started
        assert r.status_code == 503
        assert r.headers["X-Credproxy-Error"] == "credential-store-unavailable"
        assert r.json()["reason"] == "fencing"
        retry_after = int(r.headers["Retry-After"])
        print(f"fencing: answered in {elapsed:.3f} s, Retry-After {retry_after} "
              f"(fencing period {_QUIET} s, lock_wait {lock_wait} s)")
        assert 1 <= retry_after <= math.ceil(_QUIET)
        assert f"{retry_after}" in r.json()["detail"] or "retry" in r.json()["detail"]
        assert elapsed < lock_wait / 2  # answered, not held for lock_wait
        assert s.stats()["refresh_by_user"].get("stale") is None  # nothing redeemed
        with s.client_via(proxy, context=s.context("fresh")) as c:
            assert c.get(f"{s.docs_url}/echo").status_code == 200  # fresh: still served
        # Retrying after Retry-After gets the refresh.
        time.sleep(retry_after)
        deadline = time.monotonic() + 10
        with s.client_via(proxy, context=s.context("stale")) as c:
            while (r := c.get(f"{s.docs_url}/echo")).status_code == 503 \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
        assert r.status_code == 200
        assert s.stats()["refresh_by_user"]["stale"] == 1
        assert _fencing(admin) == 0
    finally:
        s.close()


def test_redis_restart_during_a_slow_refresh_does_not_redeem_twice(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """Replica A is redeeming the refresh token when Redis restarts (its lock is gone);
    replica B then needs the same grant. B must not redeem the refresh token A is using:
    with rotation and reuse detection that would revoke the whole grant."""
    s, (a, b) = _stack(tmp_path, redis_server.url)
    user = "restart-race"
    try:
        s.vault_put(user, s.grant(user, expires_in=0))
        ctx = s.context(user)
        with s.admin() as c:
            c.post("/_admin/faults", json={"token_delay": 1.5})
        results: dict[str, int] = {}

        def via(name: str, proxy: str) -> None:
            with s.client_via(proxy, context=ctx) as c:
                results[name] = c.get(f"{s.docs_url}/echo").status_code

        first = threading.Thread(target=via, args=("a", a))
        first.start()
        time.sleep(0.5)  # A holds the lock and waits on the token endpoint
        redis_server.restart()  # every lock gone
        time.sleep(0.3)
        via("b", b)  # B needs a refresh too: held back, never a second redemption
        first.join()
        with s.admin() as c:
            c.post("/_admin/faults", json={"token_delay": 0})
        assert results["a"] == 200
        assert results["b"] in (200, 503)  # 200 once A's refresh is in the vault
        assert s.stats()["refresh_by_user"][user] == 1
        stored = s.vault_get(user)
        assert stored.status == "active"
        assert s.introspect(stored.tokens.refresh_token.reveal())["active"] is True
        with s.client_via(b, context=ctx) as c:
            assert c.get(f"{s.docs_url}/echo").status_code == 200
    finally:
        s.close()


def _record(s: Stack, user: str) -> dict[str, object]:
    t = s.vault_get(user).tokens
    return {"access_token": t.access_token.reveal(), "refresh_token": t.refresh_token.reveal(),
            "token_type": "Bearer", "scope": t.scope}


def test_slow_redis_keeps_serving_cached_tokens(redis_server: RedisServer,
                                                tmp_path: Path) -> None:
    s, (proxy, _) = _stack(tmp_path, redis_server.url)
    try:
        s.vault_put("cached", s.grant("cached"))
        ctx = s.context("cached")
        with s.client_via(proxy, context=ctx) as c:
            assert c.get(f"{s.docs_url}/echo").status_code == 200
            redis_server.pause()  # stalled: connections stay open, nothing answers
            try:
                started = time.monotonic()
                r = c.get(f"{s.docs_url}/echo")
                elapsed = time.monotonic() - started
                # A token that needs a refresh: the lock cannot be had, a clear 503.
                s.vault_put("stale", s.grant("stale", expires_in=0))
                with s.client_via(proxy, context=s.context("stale")) as c2:
                    stale = c2.get(f"{s.docs_url}/echo")
            finally:
                redis_server.resume()
        assert r.status_code == 200
        assert elapsed < 1.0  # served from memory, not stuck behind the stalled Redis
        assert stale.status_code == 503
        assert stale.json()["reason"] == "coordination_unavailable"
        assert s.stats()["refresh_by_user"].get("stale") is None
    finally:
        s.close()


def test_redis_over_tls_with_an_acl_user(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from devstack.certs import make_ca, make_leaf

    ca = make_ca(tmp_path / "pki")
    cert, key = make_leaf(ca, ["127.0.0.1"], tmp_path / "pki", "redis")
    redis = RedisServer(tmp_path / "redis", tls=(cert, key, ca.cert_path),
                        acl=("credproxy", "s3cret-redis")).start()
    s = build_stack(tmp_path / "stack", start_proxy=False, config={"coordination": {
        "backend": "redis", "url": redis.url, "username": "credproxy",
        "password_env": "REDIS_PASSWORD", "ca_file": str(ca.cert_path)}})
    try:
        s.env["REDIS_PASSWORD"] = "s3cret-redis"
        check = subprocess.run([sys.executable, "-m", "proxy.cli", "check", "--config",
                                str(s.config_path)], capture_output=True, text=True,
                               env={**os.environ, **s.env})
        assert check.returncode == 0, check.stderr
        assert "coordination (redis standalone): ok" in check.stdout
        wrong = subprocess.run([sys.executable, "-m", "proxy.cli", "check", "--config",
                                str(s.config_path)], capture_output=True, text=True,
                               env={**os.environ, **s.env,
                                    "REDIS_PASSWORD": "pw-canary-123"})
        assert wrong.returncode == 1 and "coordination (redis standalone)" in wrong.stderr
        assert "pw-canary-123" not in wrong.stderr
        (proxy,) = [str(p.info["proxy_url"]) for p in s.start_replicas(1)]
        s.vault_put("tls-user", s.grant("tls-user", expires_in=0))
        with s.client_via(proxy, context=s.context("tls-user")) as c:
            assert c.get(f"{s.docs_url}/echo").status_code == 200  # refreshed under the lock
        assert s.stats()["refresh_by_user"]["tls-user"] == 1
    finally:
        s.close()
        redis.stop()
