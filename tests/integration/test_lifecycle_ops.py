"""Operations on a running credproxy: config reload without restart (and a bad reload
refused), and a graceful SIGTERM that lets an in-flight request finish."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx2
import pytest
import yaml

from devstack.stack import build_stack

pytestmark = pytest.mark.integration


def _until(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_config_reload_takes_effect_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    s = build_stack(tmp_path)
    try:
        echo = s.echo_server(tls=True)
        port = echo.url.rsplit(":", 1)[1]
        user = "reloader"
        s.vault_put(user, s.grant(user), provider="echo")
        s.vault_put(user, s.grant(user))
        url = f"https://localhost:{port}/echo"

        def auth_header() -> str | None:
            with s.client(context=s.context(user)) as c:
                headers = {k.lower(): v for k, v in c.get(url).json()["headers"]}
            return headers.get("authorization")

        assert auth_header() is None  # not a provider yet: passed through untouched
        cfg = yaml.safe_load(s.config_path.read_text())
        docs = cfg["providers"][0]
        cfg["providers"].append({**docs, "id": "echo", "hosts": [f"localhost:{port}"]})
        s.config_path.write_text(yaml.safe_dump(cfg))
        assert _until(lambda: (auth_header() or "").startswith("Bearer at_"))
        # A bad config (unknown key) is refused; the last good one keeps serving.
        s.config_path.write_text(s.config_path.read_text().replace("unrouted:", "unrouted_x:"))
        assert s.proxy is not None
        assert _until(lambda: "config reload rejected" in s.proxy.stderr_text())  # type: ignore[union-attr]
        assert "unrouted_x: unknown key" in s.proxy.stderr_text()
        assert (auth_header() or "").startswith("Bearer at_")
        metrics = httpx2.get(f"http://{s.config['admin']}/metrics", trust_env=False).text
        assert 'credproxy_config_reloads_total{result="applied"} 1.0' in metrics
        assert 'credproxy_config_reloads_total{result="rejected"} 1.0' in metrics
    finally:
        s.close()


def test_sigterm_lets_an_in_flight_request_finish(tmp_path: Path) -> None:
    s = build_stack(tmp_path)
    try:
        s.vault_put("slowpoke", s.grant("slowpoke"))
        result: dict[str, object] = {}

        def slow_request() -> None:
            with s.client(context=s.context("slowpoke")) as c:
                r = c.get(f"{s.docs_url}/slow", params={"seconds": "2"})
                result["status"] = r.status_code
                result["body"] = r.json()

        t = threading.Thread(target=slow_request)
        t.start()
        time.sleep(0.7)  # the request is upstream now
        assert s.proxy is not None
        s.proxy.signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx2.get(f"http://{s.config['admin']}/readyz", trust_env=False)
        assert ready.status_code == 503 and ready.json()["checks"]["draining"] != "ok"
        t.join(10)
        assert result.get("status") == 200 and result["body"] == {"slept": 2.0}
        assert s.proxy.proc.wait(10) == 0
        # The audit trail is complete: the injected record for the slow request is there
        # and the chain verifies.
        lines = [x for x in s.proxy.stdout_text().splitlines() if x.startswith("{")]
        assert any(json.loads(x)["request"]["path"] == "/slow" for x in lines)
        from proxy.audit import verify

        assert verify(lines).ok
    finally:
        s.close()
