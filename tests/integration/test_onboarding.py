"""Connect (authorization code + PKCE) and offboarding (RFC 7009) end to end: a real
authorization server, the real proxy and admin server, a browser-less client following the
redirects, and the real `credproxy connect` / `credproxy revoke` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest

from devstack.stack import Stack

pytestmark = pytest.mark.integration


def _admin(stack: Stack) -> str:
    return f"http://{stack.config['admin']}"


def _browser(stack: Stack) -> httpx2.Client:
    """A browser without a UI: trusts the test CA, follows nothing by itself."""
    return httpx2.Client(verify=stack.admin_tls(), follow_redirects=False, timeout=20,
                         trust_env=False)


def _audit(stack: Stack) -> list[dict[str, object]]:
    assert stack.proxy is not None
    return [json.loads(x) for x in stack.proxy.stdout_text().splitlines() if x.startswith("{")]


def _documents(stack: Stack, user: str) -> httpx2.Response:
    with stack.client(context=stack.context(user)) as c:
        return c.get(f"{stack.docs_url}/documents")


@pytest.fixture(autouse=True)
def _reset(stack: Stack) -> Iterator[None]:
    yield
    with stack.admin() as c:
        c.post("/_admin/faults", json={"revoke_status": None, "token_status": None})


def test_web_connect_flow_stores_a_grant_the_proxy_injects(stack: Stack) -> None:
    user = "web-alice"
    with _browser(stack) as b:
        r = b.get(f"{_admin(stack)}/connect/docs",
                  params={"context": stack.context(user)})
        assert r.status_code == 302
        authorize = r.headers["location"]
        q = parse_qs(urlsplit(authorize).query)
        assert q["code_challenge_method"] == ["S256"] and q["state"][0]
        assert q["redirect_uri"] == [f"{_admin(stack)}/oauth/callback"]
        # The authorization server authenticates the person; here login_hint stands in.
        r = b.get(authorize + f"&login_hint={user}")
        assert r.status_code == 302
        callback = r.headers["location"]
        assert callback.startswith(f"{_admin(stack)}/oauth/callback?")
        r = b.get(callback)
        assert r.status_code == 200 and "now connected" in r.text
        assert "code=" not in r.text
        # Replaying the callback is refused and stores nothing new.
        again = b.get(callback)
        assert again.status_code == 400 and "replayed_state" in again.text
    r = _documents(stack, user)
    assert r.status_code == 200 and r.json()["user"] == user
    created = [x for x in _audit(stack) if x["event"] == "connection.created"
               and x["user"] == user]
    assert [(x["outcome"], x["reason"]) for x in created] == [
        ("connected", "scope=documents.read")]
    assert any(x["event"] == "connection.created" and x["reason"] == "replayed_state"
               for x in _audit(stack))


@pytest.mark.parametrize("query,reason", [
    pytest.param({}, "missing_state", id="missing-state"),
    pytest.param({"state": "forged", "code": "x"}, "unknown_state", id="mismatched-state"),
])
def test_callback_rejections(stack: Stack, query: dict[str, str], reason: str) -> None:
    with _browser(stack) as b:
        r = b.get(f"{_admin(stack)}/oauth/callback", params=query)
    assert r.status_code == 400 and reason in r.text
    assert any(x["event"] == "connection.created" and x["reason"] == reason
               for x in _audit(stack))


def test_provider_error_is_a_clear_page_and_nothing_is_stored(stack: Stack) -> None:
    user = "denier"
    with _browser(stack) as b:
        authorize = b.get(f"{_admin(stack)}/connect/docs",
                          params={"context": stack.context(user)}).headers["location"]
        callback = b.get(authorize + f"&login_hint={user}&deny=1").headers["location"]
        assert "error=access_denied" in callback
        r = b.get(callback)
    assert r.status_code == 400 and "provider_error:access_denied" in r.text
    assert stack.vault_get(user) is None


@pytest.mark.parametrize("params,status,reason", [
    pytest.param({"return_to": "https://evil.example/"}, 400, "return_url_not_allowed",
                 id="open-redirect"),
    pytest.param({"scope": "documents.admin"}, 400, "scope_not_allowed", id="wider-scope"),
    pytest.param({"context": "not-a-jwt"}, 401, "malformed", id="bad-context"),
])
def test_connect_start_rejections(stack: Stack, params: dict[str, str], status: int,
                                  reason: str) -> None:
    query = {"context": stack.context("starter"), **params}
    with _browser(stack) as b:
        r = b.get(f"{_admin(stack)}/connect/docs", params=query)
    assert r.status_code == status and reason in r.text
    assert "location" not in r.headers


def test_cli_connect_over_a_loopback_redirect(stack: Stack) -> None:
    user = "cli-dave"
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "connect", "--config", str(stack.config_path),
         "--user", user, "--provider", "docs", "--timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **stack.env})
    assert proc.stderr is not None
    url = ""
    for line in proc.stderr:
        if line.strip().startswith("https://"):
            url = line.strip()
            break
    assert url, "no authorize URL printed"
    with _browser(stack) as b:
        callback = b.get(url + f"&login_hint={user}").headers["location"]
        assert callback.startswith("http://127.0.0.1:")
        page = httpx2.get(callback, trust_env=False)
    assert page.status_code == 200
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"connected {user} to docs" in err
    r = _documents(stack, user)
    assert r.status_code == 200 and r.json()["user"] == user
    listing = subprocess.run([sys.executable, "-m", "proxy.cli", "connections", "--config",
                              str(stack.config_path), "--user", user, "--json"],
                             capture_output=True, text=True, env={**os.environ, **stack.env})
    assert json.loads(listing.stdout)["scope"] == "documents.read"


def _revoke(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "revoke", "--config",
                           str(stack.config_path), *args], capture_output=True, text=True,
                          env={**os.environ, **stack.env}, timeout=60)


def test_revoke_offboards_a_user_everywhere(stack: Stack, marker: str) -> None:
    user = "leaver"
    grant = stack.grant(user)
    stack.vault_put(user, grant)
    assert _documents(stack, user).status_code == 200  # cached in the proxy now
    dry = _revoke(stack, "--user", user, "--dry-run")
    assert dry.returncode == 0 and "would revoke: leaver / docs" in dry.stdout
    assert stack.vault_get(user) is not None
    r = _revoke(stack, "--user", user)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "docs: removed; upstream revoked" in r.stdout
    assert stack.vault_get(user) is None
    # The provider no longer honours either token.
    assert stack.introspect(grant["refresh_token"])["active"] is False
    assert stack.introspect(grant["access_token"])["active"] is False
    with stack.client(context=stack.context(user)) as c:
        after = c.get(f"{stack.docs_url}/echo/{marker}")
    assert after.status_code == 401 and after.json()["reason"] == "no_connection"
    assert not stack.docs_saw(marker)
    events = [(x["event"], x["outcome"]) for x in _audit_cli(r) if x["user"] == user]
    assert events == [("connection.revoked", "revoked"), ("user.offboarded", "offboarded")]


def _audit_cli(r: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]


def test_failing_revocation_endpoint_is_pending_but_removed_locally(stack: Stack) -> None:
    user = "pending-leaver"
    stack.vault_put(user, stack.grant(user))
    with stack.admin() as c:
        c.post("/_admin/faults", json={"revoke_status": 503, "revoke_count": -1})
    r = _revoke(stack, "--user", user, "--provider", "docs")
    assert r.returncode == 1
    assert "removed locally; upstream revocation pending" in r.stdout
    assert "HTTP 503" in r.stdout
    assert stack.vault_get(user) is None
    rec = [x for x in _audit_cli(r) if x["event"] == "connection.revoked"]
    assert rec[0]["outcome"] == "pending" and "503" in str(rec[0]["reason"])


def test_requests_in_flight_never_get_the_revoked_grant_afterwards(stack: Stack) -> None:
    user = "inflight"
    stack.vault_put(user, stack.grant(user))
    ctx = stack.context(user)
    results: list[tuple[float, int]] = []
    stop = threading.Event()

    def traffic() -> None:
        with stack.client(context=ctx) as c:
            while not stop.is_set():
                started = time.monotonic()
                results.append((started, c.get(f"{stack.docs_url}/documents").status_code))

    t = threading.Thread(target=traffic)
    t.start()
    time.sleep(0.5)
    r = _revoke(stack, "--user", user)
    revoked_at = time.monotonic()
    time.sleep(0.5)
    stop.set()
    t.join()
    assert r.returncode == 0
    after = [s for ts, s in results if ts > revoked_at]
    assert 200 in [s for _, s in results]  # traffic was flowing
    assert after and set(after) == {401}, after
