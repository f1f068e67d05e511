"""Operations on a running credproxy: config reload without restart (and a bad reload
refused), reloads triggered by rotated key and secret files, restart-only keys kept at their
running values, `unrouted: tunnel` following reloaded providers, and a graceful SIGTERM
that lets an in-flight request finish."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx2
import pytest
import yaml

from devstack.procs import free_port
from devstack.stack import Stack, build_stack
from proxy.devkeys import mint, write_dev_keys

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
        assert any((json.loads(x)["request"] or {}).get("path") == "/slow" for x in lines)
        from proxy.audit import verify

        assert verify(lines).ok
    finally:
        s.close()


def _reloads(s: Stack, result: str) -> float:
    text = httpx2.get(f"http://{s.config['admin']}/metrics", trust_env=False).text
    for line in text.splitlines():
        if line.startswith("credproxy_config_reloads_total{") and f'result="{result}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _status(s: Stack, context: str) -> int:
    with s.client(context=context) as c:
        return c.get(f"{s.docs_url}/echo").status_code


def test_a_rotated_signing_key_file_is_reloaded_and_a_corrupt_one_refused(
        tmp_path: Path) -> None:
    s = build_stack(tmp_path)
    try:
        user = "rotator"
        s.vault_put(user, s.grant(user))
        ident = s.config["identity"]
        jwks = Path(ident["jwks_file"])

        def ctx(key: Path) -> str:
            return mint(sub=user, issuer=ident["issuer"], audience=ident["audience"],
                        key_file=str(key)).reveal()

        old_key = s.context_key
        new_key, new_jwks = write_dev_keys(tmp_path / "rotated", kid="dev-2")
        assert _status(s, ctx(old_key)) == 200
        assert _status(s, ctx(new_key)) == 407
        # The platform rotates its key: the file (a ConfigMap key) is swapped atomically;
        # credproxy.yaml itself does not change.
        staged = jwks.with_suffix(".new")
        staged.write_text(new_jwks.read_text())
        os.replace(staged, jwks)
        assert _until(lambda: _status(s, ctx(new_key)) == 200)
        assert _status(s, ctx(old_key)) == 407
        assert _reloads(s, "applied") == 1
        # A corrupt key file is rejected; the keys loaded last keep serving.
        jwks.write_text('{"keys": [{"kty": "OKP"')
        assert s.proxy is not None
        assert _until(lambda: "config reload rejected" in s.proxy.stderr_text())  # type: ignore[union-attr]
        assert "cannot load verification keys" in s.proxy.stderr_text()
        assert _status(s, ctx(new_key)) == 200 and _status(s, ctx(old_key)) == 407
        assert _reloads(s, "rejected") == 1
        # A client_secret_file is watched too: moving the provider onto one, then
        # rotating that file, each reload.
        secret = tmp_path / "docs-client-secret"
        secret.write_text(s.env["DOCS_CLIENT_SECRET"])
        jwks.write_text(new_jwks.read_text())
        cfg = yaml.safe_load(s.config_path.read_text())
        del cfg["providers"][0]["client_secret_env"]
        cfg["providers"][0]["client_secret_file"] = str(secret)
        s.config_path.write_text(yaml.safe_dump(cfg))
        assert _until(lambda: _reloads(s, "applied") == 2)
        secret.write_text("rotated-" + s.env["DOCS_CLIENT_SECRET"])
        assert _until(lambda: _reloads(s, "applied") == 3)
        assert _status(s, ctx(new_key)) == 200
        # A provider whose secret file is not there yet (the ConfigMap synced before the
        # Secret) is rejected; the file arriving retries the reload.
        late = tmp_path / "late-secret"
        cfg["providers"].append({**cfg["providers"][0], "id": "late",
                                 "hosts": ["late.example.com"],
                                 "client_secret_file": str(late)})
        s.config_path.write_text(yaml.safe_dump(cfg))
        assert _until(lambda: _reloads(s, "rejected") == 2)
        late.write_text("late-secret")
        assert _until(lambda: _reloads(s, "applied") == 4)
    finally:
        s.close()


def test_restart_only_keys_keep_their_running_values(tmp_path: Path) -> None:
    s = build_stack(tmp_path, config={"public_url": "https://old.example.com"})
    try:
        assert s.proxy is not None
        admin = f"http://{s.config['admin']}"
        cfg = yaml.safe_load(s.config_path.read_text())
        cfg["public_url"] = "https://new.example.com"
        cfg["listen"] = f"127.0.0.1:{free_port()}"
        cfg["ca_dir"] = str(tmp_path / "elsewhere")
        cfg["refresh"]["attempts"] = 2  # live
        s.config_path.write_text(yaml.safe_dump(cfg))
        assert _until(lambda: _reloads(s, "applied_restart_required") == 1)
        # Log lines are written by a thread: the metric may be ahead of the log.
        assert _until(lambda: "NOT applied until a restart" in s.proxy.stderr_text())  # type: ignore[union-attr]
        log = s.proxy.stderr_text()
        assert "NOT applied until a restart: listen, public_url, ca_dir" in log
        assert _reloads(s, "applied") == 0
        # Readiness still checks the running socket and CA, not the configured ones.
        r = httpx2.get(f"{admin}/readyz", trust_env=False)
        assert r.status_code == 200, r.text
        # Connect links still point at the running public URL.
        with s.client(context=s.context("never-connected")) as c:
            r = c.get(f"{s.docs_url}/echo")
        assert r.status_code == 401
        assert "https://old.example.com/connect/docs" in r.text
        assert "new.example.com" not in r.text
    finally:
        s.close()


def test_tunnel_mode_intercepts_a_provider_added_by_reload(tmp_path: Path) -> None:
    s = build_stack(tmp_path, config={"unrouted": "tunnel"})
    try:
        echo = s.echo_server(tls=True)
        port = echo.url.rsplit(":", 1)[1]
        user = "tunneller"
        s.vault_put(user, s.grant(user), provider="echo")
        url = f"https://localhost:{port}/echo"
        # Not a provider yet: tunnelled, so a client trusting only the proxy CA fails.
        with pytest.raises(httpx2.ConnectError):
            with s.client(context=s.context(user)) as c:
                c.get(url)
        cfg = yaml.safe_load(s.config_path.read_text())
        cfg["providers"].append({**cfg["providers"][0], "id": "echo",
                                 "hosts": [f"localhost:{port}"]})
        s.config_path.write_text(yaml.safe_dump(cfg))
        assert _until(lambda: _reloads(s, "applied") == 1)

        def injected() -> bool:
            try:
                with s.client(context=s.context(user)) as c:
                    headers = dict(c.get(url).json()["headers"])
            except httpx2.ConnectError:
                return False
            return headers.get("Authorization", "").startswith("Bearer at_")

        assert _until(injected)
    finally:
        s.close()


def test_a_stalled_stderr_reader_never_freezes_the_proxy(tmp_path: Path) -> None:
    """Every refusal writes a log line. With stderr a pipe nobody reads, the pipe fills
    (64 KiB) after a few hundred lines; a blocking log write would then freeze the event
    loop, and every request and probe with it. Lines beyond the bounded queue are dropped
    and counted instead; requests and probes keep being answered."""
    import subprocess
    import sys

    stack = build_stack(tmp_path, start_proxy=False)
    try:
        env = {**os.environ, **stack.env}
        proc = subprocess.Popen(  # stderr is a pipe this test never reads
            [sys.executable, "-m", "proxy.cli", "run", "--config", str(stack.config_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        try:
            admin = f"http://{stack.config['admin']}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx2.get(f"{admin}/healthz", timeout=1).status_code == 200:
                        break
                except httpx2.HTTPError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
            with stack.client_via(stack.proxy_url) as c:
                for i in range(1500):  # ~300 KB of refusal lines, far past the pipe buffer
                    r = c.get(f"{stack.docs_url}/documents?n={i}", timeout=10)
                    assert r.status_code == 407
            assert httpx2.get(f"{admin}/healthz", timeout=5).status_code == 200
            assert httpx2.get(f"{admin}/readyz", timeout=5).status_code == 200
        finally:
            proc.terminate()
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    finally:
        stack.close()
