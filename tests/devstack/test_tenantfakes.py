"""The tenant tests' harness (issue 14): fake DNS (:mod:`devstack.fakedns`) and the
multi-tenant provider fake (:mod:`devstack.tenantfakes`), each proven on its own.

- fake DNS: in a child process the real provider names resolve to the fake, port 443
  included, for every client library credproxy's parts use (httpx2 sync and async/anyio,
  asyncio streams, blocking sockets), with SNI and Host the real names; other names and
  other ports are untouched; without the variable nothing is patched;
- a real ``credproxy run`` with ``unrouted: passthrough`` relays curl's request for
  ``https://acme.my.salesforce.com/`` to the fake (curl trusts the mitm CA);
- the fake reproduces each provider's documented behaviour per tenant (the sources are
  beside each fact in devstack/tenantfakes.py), called directly by a browser that reaches
  the real names (:class:`devstack.fakedns.RoutingTransport`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx2
import pytest

from devstack import fakedns, tenantfakes
from devstack.certs import make_ca
from devstack.fakedns.sitecustomize import parse_rules
from devstack.stack import Stack, build_stack
from devstack.tenantfakes import TenantFakes

CLIENT_ID = "tenant-fakes-client"
SECRET = secrets.token_urlsafe(16)
REDIRECT = "http://127.0.0.1:9/oauth/callback"  # read from Location, never followed


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenantFakes]:
    workdir = tmp_path_factory.mktemp("tenantfakes")
    ca = make_ca(workdir / "ca")
    f = tenantfakes.start(ca, workdir, client_id=CLIENT_ID, client_secret=SECRET)
    yield f
    f.close()


@pytest.fixture
def browser(fake: TenantFakes) -> Iterator[httpx2.Client]:
    with fake.browser() as b:
        yield b


def _child(fake: TenantFakes, code: str, *, dns: str | None = None) -> str:
    """Run ``code`` in a fresh Python with fake DNS on (``dns``: the rules, default the
    fake's) and the test CA as the default trust store; returns its stdout."""
    env = {**os.environ, **fakedns.environ(fake.dns if dns is None else dns),
           "SSL_CERT_FILE": str(fake.ca_file)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


# ---------------------------------------------------------------------------------------
# Fake DNS
# ---------------------------------------------------------------------------------------

def test_fake_dns_resolves_the_rules_names_and_nothing_else(fake: TenantFakes) -> None:
    """A faked name (exact, wildcard, any case, trailing dot) resolves to its rule's marker
    address with the port asked for; the suffix of a wildcard itself, an IPv6-only lookup
    and every other name behave as before."""
    out = _child(fake, """
import json, socket
def ask(host, port=443, family=0):
    try:
        return [[a[4][0], a[4][1], a[1]] for a in socket.getaddrinfo(host, port, family,
                                                                      socket.SOCK_STREAM)]
    except socket.gaierror as e:
        return "error"
print(json.dumps({
    "exact": ask("login.salesforce.com"), "wild": ask("acme.my.salesforce.com"),
    "deep": ask("a.b.sharepoint.com"), "odd": ask("ACME.My.Salesforce.COM."),
    "port": ask("graph.microsoft.com", 8443), "suffix": ask("my.salesforce.com"),
    "v6": ask("graph.microsoft.com", 443, socket.AF_INET6), "local": ask("localhost", 80),
    "other": ask("no-such-host.invalid"),
    "patched": hasattr(socket, "_devstack_fake_dns")}))
""")
    got = json.loads(out)
    stream = int(socket.SOCK_STREAM)
    for key in ("exact", "wild", "deep", "odd"):
        assert got[key] == [["127.0.53.1", 443, stream]], key
    assert got["port"] == [["127.0.53.1", 8443, stream]]
    assert got["suffix"] == got["v6"] == got["other"] == "error"
    assert ["127.0.0.1", 80, stream] in got["local"]
    assert got["patched"] is True


def test_without_the_variable_nothing_is_patched(fake: TenantFakes) -> None:
    """The directory on PYTHONPATH alone changes nothing: getaddrinfo and connect are the
    real ones."""
    out = _child(fake, """
import socket
print(socket.getaddrinfo.__module__ == "socket", "connect" in vars(socket.socket),
      hasattr(socket, "_devstack_fake_dns"))
""", dns="")
    assert out.split() == ["True", "False", "False"]


@pytest.mark.parametrize("bad", ["login.salesforce.com", "a.b=localhost:1", "a.b=1.2.3.4",
                                 "*.com=127.0.0.1:1", "a.b=127.0.0.1:99999"])
def test_malformed_rules_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="DEVSTACK_FAKE_DNS"):
        parse_rules(bad)


def test_every_client_library_reaches_the_fake_by_the_real_name(fake: TenantFakes) -> None:
    """httpx2 (blocking, and async on anyio, which keeps only the address from getaddrinfo),
    asyncio streams (mitmproxy's upstream connections) and http.client all reach the fake
    on port 443 of the real name, sending that name as SNI and Host; another port of a
    faked name is refused without reaching anything."""
    marker = secrets.token_hex(4)
    out = _child(fake, f"""
import asyncio, http.client, ssl, httpx2
ctx = ssl.create_default_context()
print(httpx2.get("https://acme.my.salesforce.com/services/data/v60.0/sync-{marker}",
                 verify=ctx).status_code)
async def main():
    async with httpx2.AsyncClient(verify=ctx) as c:
        print((await c.get("https://graph.microsoft.com/v1.0/me?m={marker}")).status_code)
    r, w = await asyncio.open_connection("alice-shop.myshopify.com", 443, ssl=ctx)
    w.write(b"GET /admin/api/2025-01/shop.json?m={marker} HTTP/1.1\\r\\n"
            b"Host: alice-shop.myshopify.com\\r\\nConnection: close\\r\\n\\r\\n")
    print((await r.read()).split()[1].decode())
    try:
        await asyncio.open_connection("alice-shop.myshopify.com", 8443)
    except ConnectionRefusedError:
        print("refused")
asyncio.run(main())
c = http.client.HTTPSConnection("contoso.sharepoint.com", context=ctx)
c.request("GET", "/_api/web?m={marker}")
print(c.getresponse().status)
""")
    assert out.split() == ["401", "401", "401", "refused", "401"]
    seen = {(r["host"], r["sni"], r["path"]) for r in fake.requests()
            if marker in r["path"] or r["query"].get("m") == marker}
    assert seen == {
        ("acme.my.salesforce.com", "acme.my.salesforce.com",
         f"/services/data/v60.0/sync-{marker}"),
        ("graph.microsoft.com", "graph.microsoft.com", "/v1.0/me"),
        ("alice-shop.myshopify.com", "alice-shop.myshopify.com",
         "/admin/api/2025-01/shop.json"),
        ("contoso.sharepoint.com", "contoso.sharepoint.com", "/_api/web"),
    }


@pytest.fixture(scope="module")
def passthrough(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack,
                                                                             TenantFakes]]:
    """A real ``credproxy run`` (the stack's default config: ``unrouted: passthrough``, no
    provider for these names) whose process resolves the fake's names."""
    workdir = tmp_path_factory.mktemp("passthrough")
    stack = build_stack(workdir, start_proxy=False)
    f = tenantfakes.start(stack.ca, workdir, client_id=CLIENT_ID, client_secret=SECRET)
    try:
        stack.fake_dns(f.dns)
        stack.start_proxy()
        yield stack, f
    finally:
        f.close()
        stack.close()


def _curl(stack: Stack, url: str, *headers: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("curl"), "curl is needed"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    args = ["curl", "-sS", "-i", "--max-time", "20", "--proxy", stack.proxy_url,
            "--cacert", str(stack.mitm_ca)]
    for h in headers:
        args += ["-H", h]
    return subprocess.run([*args, url], capture_output=True, text=True, env=env, timeout=30)


def test_credproxy_passthrough_reaches_the_fake_by_the_real_name(
        passthrough: tuple[Stack, TenantFakes]) -> None:
    """curl, trusting only the mitm CA, asks the proxy for
    https://acme.my.salesforce.com/...: the proxy (unrouted: passthrough) connects to the
    fake on port 443 of that name, verifying the fake's certificate against the stack CA
    (upstream_ca_file), and relays the fake's answer; the fake saw the real name as SNI and
    Host, and no user context (stripped)."""
    stack, f = passthrough
    marker = secrets.token_hex(4)
    done = _curl(stack, f"https://acme.my.salesforce.com/services/data/v60.0/{marker}",
                 f"X-User-Context: {stack.context('alice')}")
    assert done.returncode == 0, done.stderr
    assert "HTTP/1.1 401" in done.stdout and "INVALID_SESSION_ID" in done.stdout
    [seen] = f.requests(path=f"/services/data/v60.0/{marker}")
    assert (seen["host"], seen["sni"], seen["kind"]) == ("acme.my.salesforce.com",
                                                         "acme.my.salesforce.com", "api")
    assert seen["credential"] is None


def test_credproxy_passthrough_keeps_ports_exact(passthrough: tuple[Stack,
                                                                    TenantFakes]) -> None:
    """Port 8443 of a faked name is not the fake: the proxy answers 502 and nothing
    arrives."""
    stack, f = passthrough
    marker = secrets.token_hex(4)
    done = _curl(stack, f"https://acme.my.salesforce.com:8443/{marker}")
    assert "HTTP/1.1 502" in done.stdout, done.stdout
    assert "upstream-unreachable" in done.stdout
    assert not [r for r in f.requests() if marker in r["path"]]


# ---------------------------------------------------------------------------------------
# The fake, provider by provider
# ---------------------------------------------------------------------------------------

def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _authorize(b: httpx2.Client, url: str, **params: str) -> dict[str, str]:
    """The authorize request; returns the redirect's query."""
    query = {"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": REDIRECT,
             "state": "st", **params}
    r = b.get(f"{url}?{urlencode(query)}")
    assert r.status_code == 302, r.text
    location = r.headers["location"]
    assert location.startswith(REDIRECT + "?")
    return dict(parse_qsl(urlsplit(location).query))


def _sf_connect(b: httpx2.Client, user: str, scope: str = "api refresh_token",
                login: str = "login.salesforce.com") -> dict[str, Any]:
    verifier, challenge = _pkce()
    q = _authorize(b, f"https://{login}/services/oauth2/authorize", scope=scope,
                   login_hint=user, code_challenge=challenge, code_challenge_method="S256")
    r = b.post(f"https://{login}/services/oauth2/token", data={
        "grant_type": "authorization_code", "code": q["code"], "redirect_uri": REDIRECT,
        "code_verifier": verifier, "client_id": CLIENT_ID, "client_secret": SECRET})
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def test_salesforce_orgs(fake: TenantFakes, browser: httpx2.Client) -> None:
    """The code exchange at login.salesforce.com: no expires_in; instance_url is the user's
    org (alice: acme, bob: globex), id names the org, issued_at and signature are there;
    the org API takes only its own org's tokens (INVALID_SESSION_ID otherwise); a refresh
    keeps the refresh token (none in the answer); revocation works only at the token's org
    (or the login host) and kills the refresh token."""
    alice = _sf_connect(browser, "alice-sf1")
    bob = _sf_connect(browser, "bob-sf1")
    assert "expires_in" not in alice
    assert alice["instance_url"] == "https://acme.my.salesforce.com"
    assert bob["instance_url"] == "https://globex.my.salesforce.com"
    assert alice["id"].startswith("https://login.salesforce.com/id/00D5e000000ACME/005")
    assert alice["issued_at"].isdigit() and alice["signature"] and alice["refresh_token"]
    api = "/services/data/v60.0/sobjects"
    at = {"Authorization": f"Bearer {alice['access_token']}"}
    r = browser.get(f"https://acme.my.salesforce.com{api}", headers=at)
    assert r.status_code == 200 and r.json()["user"] == "alice-sf1"
    for other in ("globex", "attacker-org"):
        r = browser.get(f"https://{other}.my.salesforce.com{api}", headers=at)
        assert r.status_code == 401
        assert r.json() == [{"message": "Session expired or invalid",
                             "errorCode": "INVALID_SESSION_ID"}]
    [seen] = fake.requests(host="globex.my.salesforce.com", credential=alice["access_token"])
    assert seen["credential_user"] == "alice-sf1" and seen["status"] == 401

    r = browser.post("https://login.salesforce.com/services/oauth2/token", data={
        "grant_type": "refresh_token", "refresh_token": alice["refresh_token"],
        "client_id": CLIENT_ID, "client_secret": SECRET})
    assert r.status_code == 200 and "refresh_token" not in r.json()
    assert r.json()["instance_url"] == "https://acme.my.salesforce.com"

    revoke = {"token": alice["refresh_token"]}
    r = browser.post("https://globex.my.salesforce.com/services/oauth2/revoke", data=revoke)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_token")
    r = browser.post("https://acme.my.salesforce.com/services/oauth2/revoke", data=revoke)
    assert r.status_code == 200
    r = browser.post("https://login.salesforce.com/services/oauth2/token", data={
        "grant_type": "refresh_token", "refresh_token": alice["refresh_token"],
        "client_id": CLIENT_ID, "client_secret": SECRET})
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")


def test_salesforce_details(fake: TenantFakes, browser: httpx2.Client) -> None:
    """No refresh token without the refresh_token scope; a wrong PKCE verifier is
    invalid_grant; My Domain login only for the org's users; an expired session is 401."""
    assert "refresh_token" not in _sf_connect(browser, "alice-sf2", scope="api")
    _, challenge = _pkce()
    q = _authorize(browser, "https://login.salesforce.com/services/oauth2/authorize",
                   login_hint="alice-sf2", code_challenge=challenge,
                   code_challenge_method="S256")
    r = browser.post("https://login.salesforce.com/services/oauth2/token", data={
        "grant_type": "authorization_code", "code": q["code"], "redirect_uri": REDIRECT,
        "code_verifier": "wrong", "client_id": CLIENT_ID, "client_secret": SECRET})
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
    assert _sf_connect(browser, "alice-sf2", login="acme.my.salesforce.com")["instance_url"] \
        == "https://acme.my.salesforce.com"
    r = browser.get("https://globex.my.salesforce.com/services/oauth2/authorize?" + urlencode(
        {"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": REDIRECT,
         "login_hint": "alice-sf2"}))
    assert r.status_code == 400
    tokens = _sf_connect(browser, "alice-sf3")
    fake.expire("alice-sf3")
    r = browser.get("https://acme.my.salesforce.com/services/data/v60.0/limits",
                    headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert r.status_code == 401
    assert tokens["access_token"] in fake.tokens()


def _shop_connect(b: httpx2.Client, shop: str, user: str, *,
                  expiring: bool = True) -> tuple[dict[str, str], dict[str, Any]]:
    q = _authorize(b, f"https://{shop}/admin/oauth/authorize", scope="read_products",
                   login_hint=user)
    body = {"client_id": CLIENT_ID, "client_secret": SECRET, "code": q["code"]}
    if expiring:
        body["expiring"] = "1"
    r = b.post(f"https://{shop}/admin/oauth/access_token", data=body)
    assert r.status_code == 200, r.text
    return q, r.json()


def test_shopify_shops(fake: TenantFakes, browser: httpx2.Client) -> None:
    """The callback names the shop (and hmac, host, timestamp; the hmac is the client
    secret's over the other parameters); the token endpoint is the shop's own: a code of
    alice-shop is refused at bob-shop's; expiring=1 gives expires_in 3600 and a refresh
    token; the Admin API takes only X-Shopify-Access-Token of its own shop."""
    q = _authorize(browser, "https://alice-shop.myshopify.com/admin/oauth/authorize",
                   scope="read_products", login_hint="alice-shop1")
    assert set(q) == {"code", "hmac", "host", "shop", "state", "timestamp"}
    assert q["shop"] == "alice-shop.myshopify.com"
    message = "&".join(f"{k}={v}" for k, v in sorted(q.items()) if k != "hmac")
    assert q["hmac"] == hmac.new(SECRET.encode(), message.encode(), hashlib.sha256).hexdigest()
    body = {"client_id": CLIENT_ID, "client_secret": SECRET, "code": q["code"], "expiring": "1"}
    r = browser.post("https://bob-shop.myshopify.com/admin/oauth/access_token", data=body)
    assert r.status_code == 400
    assert r.json()["error_description"] == ("The authorization code was not found or was "
                                             "already used")
    r = browser.post("https://alice-shop.myshopify.com/admin/oauth/access_token", data=body)
    tokens = r.json()
    assert r.status_code == 200 and tokens["expires_in"] == 3600 and tokens["refresh_token"]

    api = "/admin/api/2025-01/shop.json"
    header = {"X-Shopify-Access-Token": tokens["access_token"]}
    r = browser.get(f"https://alice-shop.myshopify.com{api}", headers=header)
    assert r.status_code == 200
    assert r.json()["shop"]["myshopify_domain"] == "alice-shop.myshopify.com"
    for other in ("bob-shop", "attacker-shop"):
        r = browser.get(f"https://{other}.myshopify.com{api}", headers=header)
        assert r.status_code == 401 and "Invalid API key or access token" in r.json()["errors"]
    r = browser.get(f"https://alice-shop.myshopify.com{api}",
                    headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert r.status_code == 401
    r = browser.get("https://bob-shop.myshopify.com/admin/oauth/authorize?" + urlencode(
        {"client_id": CLIENT_ID, "redirect_uri": REDIRECT, "login_hint": "alice-shop1"}))
    assert r.status_code == 400, "alice is not staff of bob-shop"


def test_shopify_refresh_rotates(browser: httpx2.Client) -> None:
    """A refresh answers a new refresh token; the previous one works until the new one is
    used, then never again; a refresh token of alice-shop is refused at bob-shop; no
    expiring=1: no expiry, no refresh token."""
    _, first = _shop_connect(browser, "alice-shop.myshopify.com", "alice-shop2")
    url = "https://alice-shop.myshopify.com/admin/oauth/access_token"

    def refresh(rt: str, where: str = url) -> httpx2.Response:
        return browser.post(where, data={"grant_type": "refresh_token", "refresh_token": rt,
                                         "client_id": CLIENT_ID, "client_secret": SECRET})

    r = refresh(first["refresh_token"], "https://bob-shop.myshopify.com/admin/oauth/"
                                        "access_token")
    assert r.status_code == 400
    second = refresh(first["refresh_token"]).json()
    assert second["refresh_token"] != first["refresh_token"]
    assert refresh(first["refresh_token"]).status_code == 200, "not used yet: still good"
    assert refresh(second["refresh_token"]).status_code == 200
    assert refresh(first["refresh_token"]).status_code == 400
    _, plain = _shop_connect(browser, "alice-shop.myshopify.com", "alice-shop2",
                             expiring=False)
    assert "refresh_token" not in plain and "expires_in" not in plain


ENTRA = "https://login.microsoftonline.com"
GRAPH_SCOPE = "offline_access User.Read Sites.Read.All"


def _entra_connect(b: httpx2.Client, user: str, tenant: str = "organizations",
                   scope: str = GRAPH_SCOPE) -> dict[str, Any]:
    verifier, challenge = _pkce()
    q = _authorize(b, f"{ENTRA}/{tenant}/oauth2/v2.0/authorize", scope=scope,
                   login_hint=user, code_challenge=challenge, code_challenge_method="S256")
    r = b.post(f"{ENTRA}/{tenant}/oauth2/v2.0/token", data={
        "grant_type": "authorization_code", "code": q["code"], "redirect_uri": REDIRECT,
        "code_verifier": verifier, "scope": scope, "client_id": CLIENT_ID,
        "client_secret": SECRET})
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def _entra_refresh(b: httpx2.Client, rt: str, scope: str) -> httpx2.Response:
    return b.post(f"{ENTRA}/organizations/oauth2/v2.0/token", data={
        "grant_type": "refresh_token", "refresh_token": rt, "scope": scope,
        "client_id": CLIENT_ID, "client_secret": SECRET})


def test_entra_graph_and_sharepoint(fake: TenantFakes, browser: httpx2.Client) -> None:
    """One consent: the code exchange gives a Graph token (/me, sites/root's webUrl is the
    user's SharePoint host) and a refresh token; a Graph token at SharePoint is 401 with a
    Bearer challenge (error="invalid_token") and x-ms-diagnostics; the refresh token redeemed
    with the SharePoint scope gives a token for exactly that host and a NEW refresh token
    (the old one still works); the user's tenant's SharePoint only (AADSTS500011)."""
    alice = _entra_connect(browser, "alice-ms1")
    assert alice["expires_in"] > 0 and alice["refresh_token"]
    graph = {"Authorization": f"Bearer {alice['access_token']}"}
    r = browser.get("https://graph.microsoft.com/v1.0/me", headers=graph)
    assert r.json()["userPrincipalName"] == "alice-ms1@contoso.onmicrosoft.com"
    r = browser.get("https://graph.microsoft.com/v1.0/sites/root?$select=webUrl", headers=graph)
    assert r.json() == {"webUrl": "https://contoso.sharepoint.com"}
    r = browser.get("https://contoso.sharepoint.com/_api/web", headers=graph)
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert "Invalid audience Uri 'https://graph.microsoft.com'" in r.headers["x-ms-diagnostics"]

    r = _entra_refresh(browser, alice["refresh_token"],
                       "https://contoso.sharepoint.com/.default offline_access")
    assert r.status_code == 200, r.text
    sp = r.json()
    assert sp["refresh_token"] != alice["refresh_token"]
    spo = {"Authorization": f"Bearer {sp['access_token']}"}
    r = browser.get("https://contoso.sharepoint.com/_api/web", headers=spo)
    assert r.status_code == 200 and r.json()["user"] == "alice-ms1"
    for url in ("https://fabrikam.sharepoint.com/_api/web", "https://graph.microsoft.com/v1.0/me"):
        assert browser.get(url, headers=spo).status_code == 401
    r = browser.get("https://graph.microsoft.com/v1.0/me", headers=spo)
    assert r.json()["error"]["message"].endswith("Invalid audience.")
    # The old refresh token keeps working (Entra does not revoke it).
    assert _entra_refresh(browser, alice["refresh_token"], GRAPH_SCOPE).status_code == 200
    r = _entra_refresh(browser, sp["refresh_token"],
                       "https://fabrikam.sharepoint.com/.default offline_access")
    assert r.status_code == 400
    assert (r.json()["error"], r.json()["error_codes"]) == ("invalid_resource", [500011])
    r = _entra_refresh(browser, sp["refresh_token"],
                       "https://contoso.sharepoint.com/.default User.Read")
    assert r.status_code == 400 and "AADSTS28000" in r.json()["error_description"]
    [token_call] = fake.requests(kind="token", user="alice-ms1",
                                 scope="https://contoso.sharepoint.com/.default offline_access")
    assert token_call["host"] == "login.microsoftonline.com"
    assert token_call["client_auth"] == "client_secret_post"


def test_entra_tenants(fake: TenantFakes, browser: httpx2.Client) -> None:
    """bob is fabrikam's: his sites/root is fabrikam.sharepoint.com, whose token he gets;
    alice cannot sign in at fabrikam's own endpoint (AADSTS50020); without a Sites scope
    sites/root is 403; an expired token is 401 at Graph."""
    bob = _entra_connect(browser, "bob-ms1", tenant="fabrikam.onmicrosoft.com")
    graph = {"Authorization": f"Bearer {bob['access_token']}"}
    r = browser.get("https://graph.microsoft.com/v1.0/sites/root?$select=webUrl", headers=graph)
    assert r.json() == {"webUrl": "https://fabrikam.sharepoint.com"}
    r = _entra_refresh(browser, bob["refresh_token"],
                       "https://fabrikam.sharepoint.com/.default offline_access")
    spo = {"Authorization": f"Bearer {r.json()['access_token']}"}
    assert browser.get("https://fabrikam.sharepoint.com/_api/web", headers=spo).status_code \
        == 200
    r = browser.get(f"{ENTRA}/fabrikam.onmicrosoft.com/oauth2/v2.0/authorize?" + urlencode(
        {"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": REDIRECT,
         "scope": GRAPH_SCOPE, "login_hint": "alice-ms2"}))
    assert r.status_code == 400 and "AADSTS50020" in r.text
    narrow = _entra_connect(browser, "alice-ms2", scope="offline_access User.Read")
    r = browser.get("https://graph.microsoft.com/v1.0/sites/root",
                    headers={"Authorization": f"Bearer {narrow['access_token']}"})
    assert r.status_code == 403
    fake.expire("alice-ms2")
    r = browser.get("https://graph.microsoft.com/v1.0/me",
                    headers={"Authorization": f"Bearer {narrow['access_token']}"})
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


def test_trap_hosts_record_everything(fake: TenantFakes, browser: httpx2.Client) -> None:
    """Hosts no provider may bind are served (the certificate names them) so that whatever
    reaches them is recorded, client secret included."""
    for host in ("evil.example.com", "alice-shop.myshopify.com.evil.com"):
        r = browser.post(f"https://{host}/admin/oauth/access_token",
                         data={"client_id": CLIENT_ID, "client_secret": SECRET, "code": "x"})
        assert r.status_code == 404
        [seen] = fake.requests(host=host)
        assert seen["kind"] == "unknown_host" and seen["client_secret_sent"] is True
        assert seen["form"]["client_secret"] != SECRET  # never kept in the log


def test_lying_answers_come_once(fake: TenantFakes, browser: httpx2.Client) -> None:
    """The knobs make the next code exchange's instance_url, or the next sites/root webUrl,
    a host the provider must not name; the answer after is the truth again."""
    fake.knobs(salesforce_instance_url="https://evil.example.com")
    assert _sf_connect(browser, "alice-sf4")["instance_url"] == "https://evil.example.com"
    assert _sf_connect(browser, "alice-sf4")["instance_url"] == "https://acme.my.salesforce.com"
    graph = {"Authorization": f"Bearer {_entra_connect(browser, 'alice-ms3')['access_token']}"}
    url = "https://graph.microsoft.com/v1.0/sites/root?$select=webUrl"
    fake.knobs(graph_web_url="https://evil.example.com")
    assert browser.get(url, headers=graph).json() == {"webUrl": "https://evil.example.com"}
    assert browser.get(url, headers=graph).json() == {"webUrl": "https://contoso.sharepoint.com"}
