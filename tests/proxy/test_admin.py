"""The admin server's /readyz on a real aiohttp server: checks run at once, each bounded."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx2
import pytest

from proxy.admin import READY_CHECK_TIMEOUT, AdminServer
from proxy.errors import CredproxyError
from proxy.metrics import Metrics
from proxy.settings import parse_settings
from tests.proxy.conftest import live_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_readiness_checks_run_concurrently_and_a_hanging_one_times_out(
        tmp_path: Path) -> None:
    assert READY_CHECK_TIMEOUT < 2.0  # below the kubelet's probe timeout
    settings = parse_settings({
        "admin": f"127.0.0.1:{_free_port()}", "ca_dir": str(tmp_path),
        "identity": {"issuer": "i", "audience": "a", "hs256_secret_env": "X",
                     "algorithms": ["HS256"]}})
    (tmp_path / "mitmproxy-ca.pem").write_text("-")
    started: list[float] = []
    release = asyncio.Event()

    async def hangs() -> None:
        started.append(time.monotonic())
        await release.wait()  # never set: a vault that does not answer

    async def slow_ok() -> None:
        started.append(time.monotonic())
        await asyncio.sleep(0.8)

    async def fails() -> None:
        started.append(time.monotonic())
        raise CredproxyError("redis down")

    checks: list[tuple[str, object]] = [("proxy", slow_ok), ("audit", fails)]
    dependencies: list[tuple[str, object]] = [("vault", hangs), ("coordination", slow_ok)]
    # Only /readyz is exercised: the connect parts are not used by it.
    admin = AdminServer(live_config(settings=settings), None, None, checks,  # type: ignore[arg-type]
                        Metrics(), dependencies=dependencies)  # type: ignore[arg-type]
    await admin.start()
    try:
        async with httpx2.AsyncClient(trust_env=False, timeout=10) as c:
            t0 = time.monotonic()
            r = await c.get(f"http://{settings.admin}/readyz")
            took = time.monotonic() - t0
    finally:
        await admin.stop()
    assert r.status_code == 503
    assert r.json() == {"ready": False, "status": "unready", "degraded": ["vault"], "checks": {
        "ca": "ok", "proxy": "ok", "audit": "unavailable: CredproxyError", "draining": "ok",
        "vault": "unavailable: timeout", "coordination": "ok"}}
    # At once: two 0.8 s checks and a hanging one answer within the bound, not in turn.
    assert READY_CHECK_TIMEOUT - 0.1 <= took < READY_CHECK_TIMEOUT + 0.4, took
    assert max(started) - min(started) < 0.2


async def test_all_ok_is_ready_quickly(tmp_path: Path) -> None:
    settings = parse_settings({
        "admin": f"127.0.0.1:{_free_port()}", "ca_dir": str(tmp_path),
        "identity": {"issuer": "i", "audience": "a", "hs256_secret_env": "X",
                     "algorithms": ["HS256"]}})
    (tmp_path / "mitmproxy-ca.pem").write_text("-")

    async def ok() -> None:
        await asyncio.sleep(0.3)

    admin = AdminServer(live_config(settings=settings), None, None,  # type: ignore[arg-type]
                        [("a", ok), ("b", ok), ("c", ok)], Metrics())
    await admin.start()
    try:
        async with httpx2.AsyncClient(trust_env=False, timeout=10) as c:
            t0 = time.monotonic()
            r = await c.get(f"http://{settings.admin}/readyz")
            took = time.monotonic() - t0
    finally:
        await admin.stop()
    assert r.status_code == 200 and r.json()["ready"] is True
    assert took < 0.8, took  # 3 x 0.3 s in turn would be 0.9 s


async def _ok() -> None:
    return None


async def _down() -> None:
    raise CredproxyError("down")


@pytest.mark.parametrize(
    ("ca", "proxy", "draining", "redis", "startup", "ready", "status"), [
        pytest.param(True, _ok, False, _ok, 200, 200, "ok", id="all-ok"),
        pytest.param(True, _ok, False, _down, 200, 200, "degraded", id="redis-down-degrades"),
        pytest.param(True, _ok, True, _ok, 200, 503, "unready", id="draining"),
        pytest.param(True, _down, False, _ok, 503, 503, "unready", id="listener-down"),
        pytest.param(False, _ok, False, _ok, 503, 503, "unready", id="ca-missing"),
        pytest.param(False, _ok, False, _down, 503, 503, "unready",
                     id="ca-missing-and-redis-down"),
    ])
async def test_probe_semantics(tmp_path: Path, ca: bool, proxy: object, draining: bool,
                               redis: object, startup: int, ready: int, status: str) -> None:
    settings = parse_settings({
        "admin": f"127.0.0.1:{_free_port()}", "ca_dir": str(tmp_path),
        "identity": {"issuer": "i", "audience": "a", "hs256_secret_env": "X",
                     "algorithms": ["HS256"]}})
    if ca:
        (tmp_path / "mitmproxy-ca.pem").write_text("-")
    metrics = Metrics()
    admin = AdminServer(live_config(settings=settings), None, None,  # type: ignore[arg-type]
                        [("proxy", proxy)], metrics,  # type: ignore[list-item]
                        dependencies=[("coordination", redis)],  # type: ignore[list-item]
                        draining=lambda: draining)
    await admin.start()
    try:
        async with httpx2.AsyncClient(trust_env=False, timeout=10) as c:
            s = await c.get(f"http://{settings.admin}/startupz")
            r = await c.get(f"http://{settings.admin}/readyz")
    finally:
        await admin.stop()
    assert s.status_code == startup
    assert "coordination" not in s.json()["checks"]  # startup never waits on Redis
    assert (r.status_code, r.json()["status"]) == (ready, status)
    assert r.json()["degraded"] == ([] if redis is _ok else ["coordination"])
    up = metrics.registry.get_sample_value("credproxy_dependency_up",
                                           {"dependency": "coordination"})
    assert up == (1.0 if redis is _ok else 0.0)
