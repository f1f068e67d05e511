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
from pathlib import Path
from typing import Any
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
    created = [x for x in stack.audit_records() if x["event"] == "connection.created"
               and x["user"] == user]
    assert [(x["outcome"], x["reason"], x["detail"]) for x in created] == [
        ("connected", None, "scope=documents.read")]
    assert any(x["event"] == "connection.created" and x["reason"] == "replayed_state"
               for x in stack.audit_records())


@pytest.mark.parametrize("query,reason", [
    pytest.param({}, "missing_state", id="missing-state"),
    pytest.param({"state": "forged", "code": "x"}, "unknown_state", id="mismatched-state"),
])
def test_callback_rejections(stack: Stack, query: dict[str, str], reason: str) -> None:
    with _browser(stack) as b:
        r = b.get(f"{_admin(stack)}/oauth/callback", params=query)
    assert r.status_code == 400 and reason in r.text
    assert any(x["event"] == "connection.created" and x["reason"] == reason
               for x in stack.audit_records())


def test_provider_error_is_a_clear_page_and_nothing_is_stored(stack: Stack) -> None:
    user = "denier"
    with _browser(stack) as b:
        authorize = b.get(f"{_admin(stack)}/connect/docs",
                          params={"context": stack.context(user)}).headers["location"]
        callback = b.get(authorize + f"&login_hint={user}&deny=1").headers["location"]
        assert "error=access_denied" in callback
        r = b.get(callback)
    assert r.status_code == 400 and "provider_error:access_denied" in r.text
    assert "Connection failed" in r.text
    assert stack.vault_get(user) is None
    assert _rejections(stack, user) == ["provider_error:access_denied"]


def _rejections(stack: Stack, user: str) -> list[object]:
    return [x["reason"] for x in stack.audit_records() if x["event"] == "connection.created"
            and x["user"] == user and x["outcome"] == "rejected"]


def _set_cookie(r: httpx2.Response) -> str:
    return "; ".join(r.headers.get_list("set-cookie"))


@pytest.mark.parametrize("victim_cookie", ["none", "own-flow", "forged-same-name"])
def test_an_authorize_url_sent_to_another_browser_is_refused(stack: Stack,
                                                             victim_cookie: str) -> None:
    """Login CSRF / grant injection: A starts a flow and sends B the authorize URL; B
    consents; B's grant must not end up under A."""
    from proxy.admin import _cookie_name

    attacker, victim = f"csrf-a-{victim_cookie}", f"csrf-b-{victim_cookie}"
    with _browser(stack) as a:
        r = a.get(f"{_admin(stack)}/connect/docs", params={"context": stack.context(attacker)})
        authorize = r.headers["location"]
        state = parse_qs(urlsplit(authorize).query)["state"][0]
        cookie = _set_cookie(r)
        assert cookie.startswith(f"{_cookie_name(state)}=")
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
        assert "Path=/oauth/callback" in cookie and "Max-Age=600" in cookie
        assert "Secure" not in cookie  # public_url is http here; https adds Secure
    with _browser(stack) as b:
        if victim_cookie == "own-flow":
            b.get(f"{_admin(stack)}/connect/docs", params={"context": stack.context(victim)})
        elif victim_cookie == "forged-same-name":
            b.cookies.set(_cookie_name(state), "guessed", domain="127.0.0.1",
                          path="/oauth/callback")
        callback = b.get(authorize + f"&login_hint={victim}").headers["location"]
        r = b.get(callback)
    assert r.status_code == 400 and "browser_mismatch" in r.text
    assert "started in another browser" in r.text
    assert stack.vault_get(attacker) is None and stack.vault_get(victim) is None
    assert _rejections(stack, attacker) == ["browser_mismatch"]


def test_the_browser_that_started_the_flow_completes_it_and_the_cookie_is_cleared(
        stack: Stack) -> None:
    from proxy.admin import _cookie_name

    user = "same-browser"
    with _browser(stack) as b:
        authorize = b.get(f"{_admin(stack)}/connect/docs",
                          params={"context": stack.context(user)}).headers["location"]
        name = _cookie_name(parse_qs(urlsplit(authorize).query)["state"][0])
        assert b.cookies.get(name, path="/oauth/callback")
        r = b.get(b.get(authorize + f"&login_hint={user}").headers["location"])
        assert r.status_code == 200 and "now connected" in r.text
        assert f"{name}=" in _set_cookie(r) and "Max-Age=0" in _set_cookie(r)
        assert name not in b.cookies
    assert stack.vault_get(user) is not None


@pytest.mark.parametrize("tamper,reason", [
    pytest.param("replace", "token_exchange_failed:invalid_grant", id="challenge-replaced"),
    pytest.param("drop", "provider_error:invalid_request", id="challenge-dropped"),
])
def test_tampered_pkce_is_refused_and_nothing_stored(stack: Stack, tamper: str,
                                                     reason: str) -> None:
    """Someone rewrites the authorize URL's PKCE challenge: the code is then not
    redeemable with the verifier this flow holds (or is never issued)."""
    from urllib.parse import urlencode

    user = f"pkce-{tamper}"
    with _browser(stack) as b:
        authorize = b.get(f"{_admin(stack)}/connect/docs",
                          params={"context": stack.context(user)}).headers["location"]
        base, query = authorize.split("?", 1)
        q = {k: v[0] for k, v in parse_qs(query).items()}
        if tamper == "replace":
            q["code_challenge"] = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        else:
            del q["code_challenge"], q["code_challenge_method"]
        q["login_hint"] = user
        callback = b.get(f"{base}?{urlencode(q)}").headers["location"]
        r = b.get(callback)
    assert r.status_code == 400 and reason in r.text
    assert stack.vault_get(user) is None
    assert _rejections(stack, user) == [reason]


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
    assert rec[0]["outcome"] == "pending" and rec[0]["reason"] == "upstream_pending"
    assert "503" in str(rec[0]["detail"])


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


class _Web:
    """A second admin server in this process, on the stack's real authorization server and
    vault, with its own clock (to let a started flow expire), audit file, return URL and
    (optionally) other provider scopes."""

    def __init__(self, stack: Stack, tmp: Path, scopes: list[str] | None = None) -> None:
        from proxy.settings import load_settings

        self.offset = 0.0
        self.audit_path = tmp / "audit.jsonl"
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.return_url = f"http://127.0.0.1:{_free_port()}/done"
        base = load_settings(stack.config_path)
        self.settings = base.model_copy(update={
            "admin": f"127.0.0.1:{port}",
            "audit": base.audit.model_copy(update={"sink": str(self.audit_path)}),
            "connect": base.connect.model_copy(update={"return_urls": [self.return_url]}),
            "providers": [p.model_copy(update={"scopes": scopes or p.scopes})
                          for p in base.providers],
        })
        self.stack = stack

    def clock(self) -> float:
        return time.time() + self.offset

    def audit(self, user: str) -> list[dict[str, Any]]:
        lines = self.audit_path.read_text().splitlines() if self.audit_path.exists() else []
        return [r for r in map(json.loads, lines)
                if r["event"] == "connection.created" and r["user"] == user]

    async def __aenter__(self) -> _Web:
        from proxy.admin import AdminServer
        from proxy.app import build

        self.app = build(self.settings, environ={**os.environ, **self.stack.env},
                         clock=self.clock)
        a = self.app
        self.admin = AdminServer(a.live, a.connector, a.vault, [], a.sidecar.metrics)
        await self.admin.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.admin.stop()
        await self.app.aclose()

    def browser(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(verify=self.stack.admin_tls(), follow_redirects=False,
                                  timeout=20, trust_env=False)

    async def consent(self, b: httpx2.AsyncClient, user: str,
                      **params: str) -> str:
        """/connect, then the provider's consent: the callback URL the browser is sent to."""
        r = await b.get(f"{self.url}/connect/docs",
                        params={"context": self.stack.context(user), **params})
        assert r.status_code == 302, r.text
        authorize = r.headers["location"]
        r = await b.get(authorize + f"&login_hint={user}")
        assert r.status_code == 302
        return str(r.headers["location"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_expired_flow_is_refused_audited_and_stores_nothing(stack: Stack,
                                                                     tmp_path: Path) -> None:
    user = "slow-consenter"
    async with _Web(stack, tmp_path) as web, web.browser() as b:
        callback = await web.consent(b, user)
        web.offset = web.settings.connect.state_ttl + 1.0  # the person took too long
        r = await b.get(callback)
        assert r.status_code == 400 and "expired_state" in r.text
        assert "took too long" in r.text
        assert [x["reason"] for x in web.audit(user)] == ["expired_state"]
        assert await web.app.vault.get(user, "docs") is None


async def test_return_to_redirects_to_the_configured_url(stack: Stack,
                                                         tmp_path: Path) -> None:
    user = "returner"
    async with _Web(stack, tmp_path) as web, web.browser() as b:
        target = web.return_url + "?tab=connections"
        r = await b.get(await web.consent(b, user, return_to=target))
        assert r.status_code == 303 and r.headers["location"] == target
        assert [x["outcome"] for x in web.audit(user)] == ["connected"]
        # A lookalike of the configured URL is refused before the provider is involved.
        r = await b.get(f"{web.url}/connect/docs", params={
            "context": stack.context(user),
            "return_to": web.return_url.replace("127.0.0.1", "127.0.0.1.evil.example")})
        assert r.status_code == 400 and "return_url_not_allowed" in r.text
        assert await web.app.vault.get(user, "docs") is not None


async def test_a_narrower_scope_is_stored_and_listed(stack: Stack, tmp_path: Path) -> None:
    user = "narrow-scope"
    # The provider is configured with two scopes; the user asks for one of them.
    async with _Web(stack, tmp_path, ["documents.read", "profile"]) as web, \
            web.browser() as b:
        r = await b.get(f"{web.url}/connect/docs",
                        params={"context": stack.context(user), "scope": "documents.read"})
        assert parse_qs(urlsplit(r.headers["location"]).query)["scope"] == ["documents.read"]
        r = await b.get(await web.consent(b, user, scope="documents.read"))
        assert r.status_code == 200 and "now connected" in r.text
        assert [(x["reason"], x["detail"]) for x in web.audit(user)] == [
            (None, "scope=documents.read")]
    listing = subprocess.run([sys.executable, "-m", "proxy.cli", "connections", "--config",
                              str(stack.config_path), "--user", user, "--json"],
                             capture_output=True, text=True, env={**os.environ, **stack.env})
    row = json.loads(listing.stdout)
    assert (row["user"], row["provider"], row["scope"]) == (user, "docs", "documents.read")
