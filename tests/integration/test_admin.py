"""The admin server of a running proxy: health, readiness that follows the vault and Redis,
and Prometheus metrics that move with traffic and never carry user ids."""

from __future__ import annotations

import time
from pathlib import Path

import httpx2
import pytest

from devstack.redisproc import RedisServer
from devstack.stack import Stack, build_stack

pytestmark = pytest.mark.integration


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    if not labels:
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_ready(url: str, want: bool, timeout: float = 10) -> httpx2.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx2.get(f"{url}/readyz", trust_env=False)
        if (r.status_code == 200) == want or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def test_health_and_readiness(stack: Stack) -> None:
    admin = f"http://{stack.config['admin']}"
    assert httpx2.get(f"{admin}/healthz", trust_env=False).json() == {"status": "ok"}
    r = httpx2.get(f"{admin}/readyz", trust_env=False)
    assert r.status_code == 200
    assert r.json() == {"ready": True, "checks": {"ca": "ok", "proxy": "ok", "vault": "ok",
                                                  "coordination": "ok", "draining": "ok",
                                                  "audit": "ok"}}


def test_metrics_follow_traffic_without_user_ids(stack: Stack, user: str) -> None:
    admin = f"http://{stack.config['admin']}"
    before = httpx2.get(f"{admin}/metrics", trust_env=False).text
    with stack.client(context=stack.context(user)) as c:
        for _ in range(3):
            assert c.get(f"{stack.docs_url}/echo").status_code == 200
    with stack.client() as c:
        assert c.get(f"{stack.docs_url}/echo").status_code == 407
    r = httpx2.get(f"{admin}/metrics", trust_env=False)
    assert r.headers["content-type"].startswith("text/plain")
    after = r.text
    inj = ("credproxy_requests_total", {"provider": "docs", "outcome": "injected"})
    assert _metric(after, inj[0], **inj[1]) - _metric(before, inj[0], **inj[1]) == 3
    den = ("credproxy_denials_total", {"provider": "docs", "problem": "user-context-missing",
                                       "reason": "missing"})
    assert _metric(after, den[0], **den[1]) - _metric(before, den[0], **den[1]) == 1
    assert "# TYPE credproxy_refresh_seconds histogram" in after
    assert user not in after and "alice" not in after


def test_readiness_follows_the_vault(tmp_path: Path) -> None:
    s = build_stack(tmp_path)
    try:
        admin = f"http://{s.config['admin']}"
        assert _wait_ready(admin, True).status_code == 200
        vault = Path(s.config["vault"]["path"])
        moved = vault.with_suffix(".away")
        vault.rename(moved)
        r = _wait_ready(admin, False)
        assert r.status_code == 503 and r.json()["checks"]["vault"].startswith("unavailable")
        moved.rename(vault)
        assert _wait_ready(admin, True).status_code == 200
    finally:
        s.close()


def test_readiness_follows_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    s = build_stack(tmp_path, start_proxy=False, config={
        "coordination": {"backend": "redis", "url": redis_server.url, "op_timeout": 0.5}})
    try:
        (replica,) = s.start_replicas(1)
        admin = str(replica.info["admin_url"])
        assert _wait_ready(admin, True).status_code == 200
        redis_server.kill()
        r = _wait_ready(admin, False)
        assert r.status_code == 503
        assert r.json()["checks"]["coordination"].startswith("unavailable")
        redis_server.start()
        assert _wait_ready(admin, True).status_code == 200
    finally:
        s.close()


def _kv_gets(s: Stack) -> int:
    return int(s.kv_admin("GET", "/_admin/stats")["by_method"].get("GET", 0))


def test_readiness_reads_key_vault_sparingly_and_answers_within_the_probe_timeout(
        tmp_path: Path) -> None:
    s = build_stack(tmp_path, keyvault=True)
    try:
        admin = f"http://{s.config['admin']}"
        assert _wait_ready(admin, True, timeout=20).status_code == 200
        # A success is reused for 30 s: probes do not hammer Key Vault (one read per pod
        # per 30 s at most).
        before = _kv_gets(s)
        for _ in range(5):
            assert httpx2.get(f"{admin}/readyz", trust_env=False).status_code == 200
        assert _kv_gets(s) == before
        # A pod without a cached success, with Key Vault hanging: /readyz still answers
        # within the kubelet's 2 s probe timeout, and says the vault is unavailable.
        s.kv_admin("POST", "/_admin/faults", {"delay": 6, "count": -1, "methods": ["GET"]})
        (replica,) = s.start_replicas(1)
        replica_admin = str(replica.info["admin_url"])
        started = time.monotonic()
        r = httpx2.get(f"{replica_admin}/readyz", trust_env=False, timeout=10)
        assert time.monotonic() - started < 2.0
        assert r.status_code == 503
        assert r.json()["checks"]["vault"].startswith("unavailable")
        assert r.json()["checks"]["coordination"] == "ok"
        # After a failure every probe reads again, so recovery is seen at once.
        s.kv_admin("POST", "/_admin/reset")
        assert _wait_ready(replica_admin, True).status_code == 200
    finally:
        s.close()
