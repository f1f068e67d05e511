"""The admin server's /readyz on a real aiohttp server: checks run at once, each bounded."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx2

from proxy.admin import READY_CHECK_TIMEOUT, AdminServer
from proxy.errors import CredproxyError
from proxy.metrics import Metrics
from proxy.settings import parse_settings


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
    admin = AdminServer(settings, None, None, None, checks, Metrics(),  # type: ignore[arg-type]
                        dependencies=dependencies)  # type: ignore[arg-type]
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

    admin = AdminServer(settings, None, None, None, [("a", ok), ("b", ok), ("c", ok)],  # type: ignore[arg-type]
                        Metrics())
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
