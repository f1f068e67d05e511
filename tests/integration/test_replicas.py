"""Many replicas coordinated through a real redis-server, against an authorization server
that rotates refresh tokens and revokes the whole grant when an old one is reused."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from devstack.procs import Running
from devstack.redisproc import RedisServer
from devstack.stack import Stack, build_stack

pytestmark = pytest.mark.integration

REPLICAS = 3


def _redis_config(url: str, **extra: Any) -> dict[str, Any]:
    return {"coordination": {"backend": "redis", "url": url, "key_prefix": "t:", **extra}}


@pytest.fixture(scope="module")
def fleet(module_redis: RedisServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, list[Running]]]:
    s = build_stack(Path(tmp_path_factory.mktemp("fleet")), start_proxy=False,
                    config=_redis_config(module_redis.url, lock_lease=1.5))
    replicas = s.start_replicas(REPLICAS)
    yield s, replicas
    s.close()


def _proxies(replicas: list[Running]) -> list[str]:
    return [str(r.info["proxy_url"]) for r in replicas]


async def _burst(s: Stack, proxies: list[str], ctx: str, n: int,
                 path: str = "/echo") -> list[httpx2.Response]:
    clients = [httpx2.AsyncClient(proxy=p, verify=s.mitm_tls(), trust_env=False, timeout=60,
                                  limits=httpx2.Limits(max_connections=n))
               for p in proxies]
    try:
        return await asyncio.gather(*[
            clients[i % len(clients)].get(f"{s.docs_url}{path}",
                                          headers={"X-User-Context": ctx})
            for i in range(n)])
    finally:
        for c in clients:
            await c.aclose()


def _auth(r: httpx2.Response) -> str:
    return {k.lower(): v for k, v in r.json()["headers"]}["authorization"]


@pytest.mark.parametrize("round_", range(5))
def test_refresh_storm_across_replicas_redeems_once(fleet: tuple[Stack, list[Running]],
                                                    round_: int) -> None:
    s, replicas = fleet
    user = f"storm-{round_}"
    s.vault_put(user, s.grant(user, expires_in=0))
    responses = asyncio.run(_burst(s, _proxies(replicas), s.context(user), 200))
    assert [r.status_code for r in responses] == [200] * 200
    assert s.stats()["refresh_by_user"].get(user) == 1
    stored = s.vault_get(user)
    assert {_auth(r) for r in responses} == {f"Bearer {stored.tokens.access_token.reveal()}"}
    # The vault holds the newest refresh token, and the grant is alive at the provider.
    assert s.introspect(stored.tokens.refresh_token.reveal())["active"] is True


def test_slow_token_endpoint_beyond_the_lease_still_redeems_once(
        fleet: tuple[Stack, list[Running]]) -> None:
    s, replicas = fleet
    user = "slow-endpoint"
    s.vault_put(user, s.grant(user, expires_in=0))
    with s.admin() as c:
        c.post("/_admin/faults", json={"token_delay": 4})  # lease is 1.5 s, renewed
    try:
        responses = asyncio.run(_burst(s, _proxies(replicas), s.context(user), 30))
    finally:
        with s.admin() as c:
            c.post("/_admin/faults", json={"token_delay": 0})
    assert [r.status_code for r in responses] == [200] * 30
    assert s.stats()["refresh_by_user"].get(user) == 1
    stored = s.vault_get(user)
    assert s.introspect(stored.tokens.refresh_token.reveal())["active"] is True


def test_upstream_401_on_one_replica_stops_the_others_within_a_second(
        fleet: tuple[Stack, list[Running]], marker: str) -> None:
    s, replicas = fleet
    a, b = _proxies(replicas)[:2]
    user = "alice"
    grant = s.grant(user)
    s.vault_put(user, grant)
    ctx = s.context(user)
    with s.client_via(b, context=ctx) as cb:
        assert cb.get(f"{s.docs_url}/documents").status_code == 200  # cached on B
    with s.admin() as c:  # the whole grant: the forced refresh gets invalid_grant
        c.post("/_admin/revoke", json={"refresh_token": grant["refresh_token"]})
    with s.client_via(a, context=ctx) as ca:
        r = ca.get(f"{s.docs_url}/documents")
    assert r.json()["reason"] == "revoked_upstream"
    start = time.monotonic()
    with s.client_via(b, context=ctx) as cb:
        while True:
            rb = cb.get(f"{s.docs_url}/echo/{marker}")
            if rb.status_code == 401 or time.monotonic() - start > 1.0:
                break
            time.sleep(0.05)
    assert rb.status_code == 401 and rb.json()["reason"] == "revoked_upstream"
    assert time.monotonic() - start <= 1.0


def test_one_time_jti_is_shared_across_replicas(module_redis: RedisServer,
                                                tmp_path: Path) -> None:
    cfg = _redis_config(module_redis.url)
    s = build_stack(tmp_path / "jti", start_proxy=False, config=cfg)
    try:
        s.config["identity"]["one_time_jti"] = True
        s.write_config()
        a, b = _proxies(s.start_replicas(2))
        s.vault_put("once", s.grant("once"))
        ctx = s.context("once", jti=True)
        with s.client_via(a, context=ctx) as c:
            assert c.get(f"{s.docs_url}/echo").status_code == 200
        with s.client_via(b, context=ctx) as c:
            r = c.get(f"{s.docs_url}/echo")
        assert r.status_code == 407 and r.json()["reason"] == "replayed"
    finally:
        s.close()


def _revoke(s: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "revoke", "--config",
                           str(s.config_path), *args], capture_output=True, text=True,
                          env={**os.environ, **s.env}, timeout=90)


def test_revoke_during_a_refresh_in_flight_is_final(
        fleet: tuple[Stack, list[Running]], marker: str) -> None:
    """A replica is redeeming the refresh token when an administrator revokes the grant:
    the revoke waits for that refresh and revokes the *new* tokens; the refresh's result is
    never written back; no replica injects the grant afterwards."""
    s, replicas = fleet
    a, b = _proxies(replicas)[:2]
    user = "revoked-mid-refresh"
    s.vault_put(user, s.grant(user, expires_in=0))
    ctx = s.context(user)
    with s.admin() as c:
        before = c.get("/_admin/issued").json()
        c.post("/_admin/faults", json={"token_delay": 2})
    status: list[int] = []

    def request() -> None:
        with s.client_via(a, context=ctx) as c:
            status.append(c.get(f"{s.docs_url}/echo").status_code)

    t = threading.Thread(target=request)
    try:
        t.start()
        time.sleep(0.5)  # A holds the lock and waits on the token endpoint
        r = _revoke(s, "--user", user)
        t.join()
    finally:
        with s.admin() as c:
            c.post("/_admin/faults", json={"token_delay": 0})
    assert r.returncode == 0, r.stdout + r.stderr
    assert s.stats()["refresh_by_user"][user] == 1
    assert s.vault_get(user) is None
    # The tokens the refresh obtained (the revoke waited for them) are dead at the provider.
    with s.admin() as c:
        after_issue = c.get("/_admin/issued").json()
    rotated = [t for kind in ("access_tokens", "refresh_tokens")
               for t in after_issue[kind] if t not in before[kind]]
    assert len(rotated) == 2
    for tok in rotated:
        assert s.introspect(tok)["active"] is False
    for proxy in (a, b):
        with s.client_via(proxy, context=ctx) as c:
            after = c.get(f"{s.docs_url}/echo/{marker}")
        assert after.status_code == 401, after.text
    assert not s.docs_saw(marker)


def test_key_vault_fleet_learns_a_revoke_through_redis_within_a_second(
        module_redis: RedisServer, tmp_path: Path, marker: str) -> None:
    """On Key Vault nothing is polled: replicas hear of a revoke only through Redis. The
    upstream revocation is made to fail, so the provider would still accept the token:
    only the invalidation can stop replica B."""
    s = build_stack(tmp_path / "kvfleet", start_proxy=False, keyvault=True,
                    config=_redis_config(module_redis.url, key_prefix="kvf:"))
    try:
        a, b = _proxies(s.start_replicas(2))
        user = "kv-leaver"
        s.vault_put(user, s.grant(user))
        ctx = s.context(user)
        for proxy in (a, b):
            with s.client_via(proxy, context=ctx) as c:
                assert c.get(f"{s.docs_url}/echo").status_code == 200  # cached on both
        with s.admin() as c:
            c.post("/_admin/faults", json={"revoke_status": 503, "revoke_count": -1})
        r = _revoke(s, "--user", user)
        done = time.monotonic()
        assert r.returncode == 1 and "upstream revocation pending" in r.stdout
        with s.client_via(b, context=ctx) as c:
            rb = c.get(f"{s.docs_url}/echo/{marker}")
        assert rb.status_code == 401, rb.text
        assert time.monotonic() - done <= 1.0
        assert not s.docs_saw(marker)
    finally:
        s.close()


def test_key_vault_without_redis_learns_a_revoke_from_the_marker_secret(
        tmp_path: Path, marker: str) -> None:
    """Key Vault and no Redis: a running proxy polls one marker secret (every 5 s) and drops
    its cache when a revoke changes it."""
    s = build_stack(tmp_path / "kvsolo", keyvault=True)
    try:
        user = "kv-solo-leaver"
        s.vault_put(user, s.grant(user))
        ctx = s.context(user)
        with s.client(context=ctx) as c:
            assert c.get(f"{s.docs_url}/echo").status_code == 200  # cached in the proxy
        with s.admin() as c:
            c.post("/_admin/faults", json={"revoke_status": 503, "revoke_count": -1})
        r = _revoke(s, "--user", user)
        assert r.returncode == 1 and "upstream revocation pending" in r.stdout
        start = time.monotonic()
        with s.client(context=ctx) as c:
            while True:
                after = c.get(f"{s.docs_url}/echo")
                if after.status_code == 401 or time.monotonic() - start > 8:
                    break
                time.sleep(0.25)
            assert after.status_code == 401, after.text
            assert time.monotonic() - start < 6.5  # one 5 s poll, and some slack
            assert c.get(f"{s.docs_url}/echo/{marker}").status_code == 401
        assert not s.docs_saw(marker)
    finally:
        s.close()
