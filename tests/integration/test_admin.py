"""The admin server of a running proxy: liveness, startup that needs nothing external,
readiness that a shared outage (vault, Redis) degrades but never fails, and Prometheus
metrics that move with traffic and never carry user ids."""

from __future__ import annotations

import time
from pathlib import Path

import httpx2
import pytest

from devstack.redisproc import RedisServer
from devstack.stack import Stack, build_stack, wait_until

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


def _wait_ready(url: str, status: str, timeout: float = 10) -> httpx2.Response:
    """Poll /readyz until its body's status is ``status`` ("ok", "degraded", "unready")."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx2.get(f"{url}/readyz", trust_env=False)
        if r.json().get("status") == status or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def test_probes_of_a_healthy_proxy(stack: Stack) -> None:
    admin = f"http://{stack.config['admin']}"
    assert httpx2.get(f"{admin}/healthz", trust_env=False).json() == {"status": "ok"}
    started = httpx2.get(f"{admin}/startupz", trust_env=False)
    assert started.status_code == 200
    assert started.json()["started"] is True
    assert set(started.json()["checks"]) >= {"ca", "proxy"}
    assert not set(started.json()["checks"]) & {"vault", "coordination"}  # nothing external
    r = httpx2.get(f"{admin}/readyz", trust_env=False)
    assert r.status_code == 200
    body = r.json()
    assert (body["ready"], body["status"], body["degraded"]) == (True, "ok", [])
    names = ("ca", "proxy", "vault", "coordination", "draining", "audit")
    assert {k: body["checks"][k] for k in names} == dict.fromkeys(names, "ok")


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
    ok = ("credproxy_upstream_responses_total", {"provider": "docs", "code_class": "2xx"})
    assert _metric(after, ok[0], **ok[1]) - _metric(before, ok[0], **ok[1]) == 3
    assert "# TYPE credproxy_refresh_seconds histogram" in after
    assert user not in after and "alice" not in after


@pytest.mark.parametrize("name", [
    "process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
    "python_info", "python_gc_collections_total",
])
def test_process_metrics_are_exposed(stack: Stack, name: str) -> None:
    text = httpx2.get(f"http://{stack.config['admin']}/metrics", trust_env=False).text
    assert any(line.startswith(name) for line in text.splitlines()), name


def test_build_and_config_info(stack: Stack) -> None:
    import platform
    from importlib import metadata

    from proxy.app import settings_digest
    from proxy.settings import load_settings

    text = httpx2.get(f"http://{stack.config['admin']}/metrics", trust_env=False).text
    assert _metric(text, "credproxy_build_info", version=metadata.version("credproxy"),
                   mitmproxy=metadata.version("mitmproxy"),
                   python=platform.python_version()) == 1
    digest = settings_digest(load_settings(stack.config_path))
    assert _metric(text, "credproxy_config_info", digest=digest) == 1
    loaded = _metric(text, "credproxy_config_last_reload_timestamp_seconds")
    assert 0 < loaded <= time.time()
    for declared in ("credproxy_request_duration_seconds histogram",
                     "credproxy_upstream_duration_seconds histogram",
                     "credproxy_upstream_errors_total counter",
                     "credproxy_coordination_fencing gauge"):
        assert f"# TYPE {declared}" in text


def test_config_info_follows_a_reload(tmp_path: Path) -> None:
    s = build_stack(tmp_path)
    try:
        admin = f"http://{s.config['admin']}"

        def info() -> tuple[str, float]:
            text = httpx2.get(f"{admin}/metrics", trust_env=False).text
            digest = next(line.split('digest="')[1].split('"')[0] for line in text.splitlines()
                          if line.startswith("credproxy_config_info{"))
            return digest, _metric(text, "credproxy_config_last_reload_timestamp_seconds")

        digest, loaded = info()
        s.config["refresh"]["attempts"] = 2  # a live key
        s.write_config()
        deadline = time.monotonic() + 15
        while info()[0] == digest and time.monotonic() < deadline:
            time.sleep(0.2)
        new_digest, reloaded = info()
        assert new_digest != digest and reloaded > loaded
    finally:
        s.close()


def test_a_vault_outage_degrades_readiness(tmp_path: Path) -> None:
    """The vault is shared by every pod: its outage must not take them all out of their
    Services. /readyz stays 200, names it, and the metric says so; fresh cached tokens and
    unrouted traffic keep flowing."""
    s = build_stack(tmp_path)
    try:
        admin = f"http://{s.config['admin']}"
        s.vault_put("cached", s.grant("cached"))
        with s.client(context=s.context("cached")) as c:
            assert c.get(f"{s.docs_url}/echo").status_code == 200
        assert _wait_ready(admin, "ok").status_code == 200
        vault = Path(s.config["vault"]["path"])
        moved = vault.with_suffix(".away")
        vault.rename(moved)
        r = _wait_ready(admin, "degraded")
        assert r.status_code == 200
        assert r.json()["degraded"] == ["vault"]
        assert r.json()["checks"]["vault"].startswith("unavailable")
        metrics = httpx2.get(f"{admin}/metrics", trust_env=False).text
        assert _metric(metrics, "credproxy_dependency_up", dependency="vault") == 0
        assert httpx2.get(f"{admin}/startupz", trust_env=False).status_code == 200
        with s.client(context=s.context("cached")) as c:
            assert c.get(f"{s.docs_url}/echo").status_code == 200  # from memory
        moved.rename(vault)
        assert _wait_ready(admin, "ok").status_code == 200
        metrics = httpx2.get(f"{admin}/metrics", trust_env=False).text
        assert _metric(metrics, "credproxy_dependency_up", dependency="vault") == 1
    finally:
        s.close()


def test_a_redis_outage_degrades_readiness(redis_server: RedisServer, tmp_path: Path) -> None:
    s = build_stack(tmp_path, start_proxy=False, config={
        "coordination": {"backend": "redis", "url": redis_server.url, "op_timeout": 0.5}})
    try:
        (replica,) = s.start_replicas(1)
        admin = str(replica.info["admin_url"])
        assert _wait_ready(admin, "ok").status_code == 200
        redis_server.kill()
        r = _wait_ready(admin, "degraded")
        assert r.status_code == 200 and r.json()["degraded"] == ["coordination"]
        assert r.json()["checks"]["coordination"].startswith("unavailable")
        redis_server.start()
        assert _wait_ready(admin, "ok").status_code == 200
    finally:
        s.close()


def test_a_pod_starting_during_a_redis_outage_starts_and_serves_degraded(
        tmp_path: Path) -> None:
    """Startup needs nothing external: a pod created while Redis is down starts (its agent
    container may start), is ready but degraded, and recovers by itself when Redis comes
    back. Until it has read the suspensions (the kill switch) it sends no credential: it
    cannot know who is suspended (503 ``suspensions_unknown``); then it serves fresh tokens
    from the vault."""
    from devstack.procs import free_port

    redis = RedisServer(tmp_path / "redis", port=free_port())  # not started: the outage
    s = build_stack(tmp_path / "stack", start_proxy=False, config={
        "coordination": {"backend": "redis", "url": redis.url, "op_timeout": 0.5}})
    try:
        (replica,) = s.start_replicas(1)
        admin = str(replica.info["admin_url"])
        started = httpx2.get(f"{admin}/startupz", trust_env=False)
        assert started.status_code == 200 and started.json()["started"] is True
        r = _wait_ready(admin, "degraded")
        assert r.status_code == 200
        assert r.json()["ready"] is True and r.json()["degraded"] == ["coordination"]
        metrics = httpx2.get(f"{admin}/metrics", trust_env=False).text
        assert _metric(metrics, "credproxy_dependency_up", dependency="coordination") == 0
        s.vault_put("fresh", s.grant("fresh"))
        with s.client_via(str(replica.info["proxy_url"]), context=s.context("fresh")) as c:
            refused = c.get(f"{s.docs_url}/echo")
        assert refused.status_code == 503
        assert refused.json()["reason"] == "suspensions_unknown"
        redis.start()
        r = _wait_ready(admin, "ok", timeout=20)
        assert r.status_code == 200 and r.json()["degraded"] == []
        with s.client_via(str(replica.info["proxy_url"]), context=s.context("fresh")) as c:
            wait_until(lambda: c.get(f"{s.docs_url}/echo").status_code == 200, 5)
        metrics = httpx2.get(f"{admin}/metrics", trust_env=False).text
        assert _metric(metrics, "credproxy_dependency_up", dependency="coordination") == 1
    finally:
        s.close()
        redis.stop()


def _kv_gets(s: Stack) -> int:
    return int(s.kv_admin("GET", "/_admin/stats")["by_method"].get("GET", 0))


def test_readiness_reads_key_vault_sparingly_and_answers_within_the_probe_timeout(
        tmp_path: Path) -> None:
    s = build_stack(tmp_path, keyvault=True)
    try:
        admin = f"http://{s.config['admin']}"
        assert _wait_ready(admin, "ok", timeout=20).status_code == 200
        # A success is reused for 30 s: probes do not hammer Key Vault (one read per pod
        # per 30 s at most).
        before = _kv_gets(s)
        for _ in range(5):
            assert httpx2.get(f"{admin}/readyz", trust_env=False).status_code == 200
        assert _kv_gets(s) == before
        # A pod without a cached success, with Key Vault hanging: /readyz still answers
        # within the kubelet's 2 s probe timeout, ready but degraded (the vault named).
        s.kv_admin("POST", "/_admin/faults", {"delay": 6, "count": -1, "methods": ["GET"]})
        (replica,) = s.start_replicas(1)
        replica_admin = str(replica.info["admin_url"])
        started = time.monotonic()
        r = httpx2.get(f"{replica_admin}/readyz", trust_env=False, timeout=10)
        assert time.monotonic() - started < 2.0
        assert r.status_code == 200 and r.json()["degraded"] == ["vault"]
        assert r.json()["checks"]["vault"].startswith("unavailable")
        assert r.json()["checks"]["coordination"] == "ok"
        # After a failure every probe reads again, so recovery is seen at once.
        s.kv_admin("POST", "/_admin/reset")
        assert _wait_ready(replica_admin, "ok").status_code == 200
    finally:
        s.close()
