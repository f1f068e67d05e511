"""Issue 14 (grants bound to their tenant), attacked from the outside: faults found by
driving a real ``credproxy run`` (and the real ``credproxy`` commands) against the
multi-tenant fakes (:mod:`devstack.tenantfakes`, reached by their real host names through
:mod:`devstack.fakedns`), set up as ``tests/integration/test_tenants.py`` does.

Each test states what docs/tenants.md, the README or the issue promise, and fails while
credproxy breaks that promise:

- a per-tenant catalog entry can be unbound (``grant_hosts: []``) with its wildcard left
  in place: ``credproxy check`` says ok, and alice's Salesforce token then reaches
  another org, whose 401 triggers a forced refresh of her grant;
- a reload that adds another org's host to ``grant_hosts`` is taken silently (dropping the
  binding is refused as a loosening): every grant's token goes there, and that org's 401
  burns the grant;
- a grant value whose ``allowed`` is wider than the provider's ceiling sends the browser
  to an authorize URL outside the ceiling and POSTs the client secret to a token endpoint
  outside it;
- a grant that predates binding (it has no values) is shown ``active`` to the agent and the
  operator while every request gets ``reauth-required`` (``grant_value_missing``);
- re-binding a grant at a terminal (``credproxy connect --value shop=...``) or with
  ``credproxy vault put --value`` is not seen by the running proxy: it keeps sending the
  user's old credential to the old tenant and refuses the new one, against what the vault
  and ``credproxy connections`` say;
- ``credproxy check`` accepts static bindings that can never work (a static grant host or
  a discovery URL outside the ceiling): every user's connect then fails;
- the ``connect_url`` of a Shopify refusal carries no ``shop``: the user who opens it gets
  "Sign-in not possible".
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx2
import pytest
import yaml

from devstack.procs import Running, ServerStartError, free_port, start_server, tcp_check

from .test_tenants import CLIENT_ID, PROVIDERS, SECRET_ENV, SF_API, SHOP_API, Env, tenant_env

pytestmark = pytest.mark.integration

PROBLEM = "urn:credproxy:problem:"
ALICE_SHOP = "alice-shop.myshopify.com"
BOB_SHOP = "bob-shop.myshopify.com"
# A host the fake serves only to record what (wrongly) arrives there: no provider may bind it.
TRAP_SHOP = "alice-shop.myshopify.com.evil.com"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from tenant_env(tmp_path_factory.mktemp("tenants-breaker"))


def _marker() -> str:
    return secrets.token_hex(6)


def _marked(env: Env, marker: str) -> list[dict[str, Any]]:
    return [r for r in env.fake.requests() if r["query"].get("m") == marker]


def _write_config(env: Env, name: str, providers: list[dict[str, Any]],
                  **overrides: Any) -> Path:
    """The stack's config with other providers (and top-level ``overrides``), as a file."""
    cfg = {**copy.deepcopy(env.stack.config), "providers": providers, **overrides}
    path = env.stack.workdir / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _check(env: Env, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "check", "--config", str(path)],
                          env={**os.environ, **env.stack.env}, capture_output=True,
                          text=True, timeout=60)


@dataclass
class Second:
    proxy_url: str
    admin_url: str
    running: Running
    config_path: Path

    def rewrite(self, env: Env, providers: list[dict[str, Any]], **overrides: Any) -> str:
        """Rewrite its config file and wait (at most 10 s) for the proxy's verdict: the
        log line of the reload ("config reloaded" or "config reload rejected")."""
        seen = self.running.stderr_text().count("config reload")
        cfg = yaml.safe_load(self.config_path.read_text())
        cfg.update(providers=providers, **overrides)
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lines = [line for line in self.running.stderr_text().splitlines()
                     if "config reload" in line]
            if len(lines) > seen:
                return lines[-1]
            time.sleep(0.1)
        raise AssertionError("the proxy said nothing about the changed config in 10 s")


@contextmanager
def _second_proxy(env: Env, name: str, providers: list[dict[str, Any]],
                  refusal_names: str, **overrides: Any) -> Iterator[Second | None]:
    """Another ``credproxy run`` on the stack's vault and CA with ``providers`` (and
    top-level ``overrides``), on its own ports; None when it refuses to start with an error
    naming ``refusal_names`` (refusing the configuration is a right answer too)."""
    port, admin = free_port(), free_port()
    path = _write_config(env, f"{name}.yaml", providers, listen=f"127.0.0.1:{port}",
                         admin=f"127.0.0.1:{admin}", **overrides)
    try:
        proxy = start_server(["-m", "proxy.cli", "run", "--config", str(path)],
                             ready=tcp_check("127.0.0.1", port), env=env.stack.env,
                             name=name, log_dir=env.stack.workdir / "logs", timeout=30)
    except ServerStartError as exc:
        assert refusal_names in str(exc), exc
        yield None
        return
    try:
        yield Second(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", proxy, path)
    finally:
        proxy.close()


def _entry(provider_id: str) -> dict[str, Any]:
    return copy.deepcopy(next(p for p in PROVIDERS if p["id"] == provider_id))


# ---------------------------------------------------------------------------------------
# Unbinding a per-tenant entry leaves its wildcard receiving every grant
# ---------------------------------------------------------------------------------------

def _unbound_salesforce() -> dict[str, Any]:
    """The README's Salesforce entry with ``hosts`` spelt out (as the README's comment
    invites) and ``grant_hosts: []``: the catalog's binding switched off, the wildcard
    kept."""
    entry = _entry("salesforce")
    entry["grant_hosts"] = []
    return entry


def _unbound_shopify() -> dict[str, Any]:
    entry = _entry("shopify")
    entry["grant_hosts"] = []
    return entry


def _unbound_sharepoint() -> dict[str, Any]:
    entry = {"id": "microsoft", "provider": "microsoft-365", "client_id": CLIENT_ID,
             "client_secret_env": SECRET_ENV,
             "resources": {"sharepoint": {"grant_hosts": []}}}
    return entry


UNBOUND = [("salesforce", _unbound_salesforce), ("shopify", _unbound_shopify),
           ("microsoft-365 sharepoint", _unbound_sharepoint)]


@pytest.mark.parametrize(("name", "make"), UNBOUND, ids=[u[0] for u in UNBOUND])
def test_check_refuses_a_per_tenant_wildcard_without_binding(env: Env, name: str,
                                                             make: Any) -> None:
    """README: "a catalog host never ends up a wildcard, and a ``hosts`` override of a
    per-tenant entry (Salesforce, Shopify, SharePoint, ...) may not hold one"; docs/
    providers.md: Salesforce, Shopify, SharePoint are "never ``*.my.salesforce.com``
    (that would hand the user's token to any org's host)". ``grant_hosts: []`` on the
    catalog's Salesforce / Shopify entry (hosts spelt out) or on microsoft-365's SharePoint
    resource leaves ``*.my.salesforce.com`` / ``*.myshopify.com`` / ``*.sharepoint.com``
    receiving every grant: ``credproxy check`` must refuse it, naming the key (a reload to
    it is refused as a loosening; a fresh start is not)."""
    path = _write_config(env, f"unbound-{name.split()[0]}.yaml", [make()])
    result = _check(env, path)
    assert result.returncode == 1, (
        f"credproxy check accepted an unbound per-tenant wildcard ({name}): "
        f"{result.stdout.strip()}")
    assert "grant_hosts" in result.stderr or "hosts" in result.stderr, result.stderr


def test_an_unbound_salesforce_never_sends_alices_token_to_another_org(env: Env) -> None:
    """The runtime consequence of the case above. A second ``credproxy run`` on the same
    vault with the unbound Salesforce entry (``credproxy check`` said ok) must either
    refuse to start, naming the key, or still refuse another org: alice (bound to
    acme.my.salesforce.com) asks for attacker-org.my.salesforce.com. Today her token is
    sent there, and attacker-org's 401 makes credproxy force a refresh of her grant (the
    issue's first fault, back with one key)."""
    env.ensure("salesforce")
    assert env.get("alice", f"https://acme.my.salesforce.com{SF_API}").status_code == 200
    with _second_proxy(env, "unbound", [_unbound_salesforce()], "grant_hosts") as second:
        if second is None:
            return
        proxy_url = second.proxy_url
        refreshes = len(env.fake.requests(kind="token", grant_type="refresh_token",
                                          user="alice"))
        marker = _marker()
        with env.stack.client_via(proxy_url, context=env.context("alice")) as c:
            r = c.get(f"https://attacker-org.my.salesforce.com{SF_API}?m={marker}")
        reached = [(x["host"], x.get("credential_user")) for x in _marked(env, marker)]
        assert reached == [], f"alice's request reached another org: {reached}"
        assert r.status_code == 403, r.text
        assert r.json()["reason"] == "not_grant_host", r.text
        assert len(env.fake.requests(kind="token", grant_type="refresh_token",
                                     user="alice")) == refreshes, \
            "another org's answer made credproxy refresh alice's grant"


def test_a_reload_adding_a_static_grant_host_is_refused_as_a_loosening(env: Env) -> None:
    """Issue 14: "a wildcard in config is only the set of hosts a grant may be bound to,
    never a set that receives every grant"; a reload that drops the binding
    (``grant_hosts: []``) is refused ("relaxes providers.salesforce.grant_hosts"). A reload
    that *adds* another org's host to ``grant_hosts`` (``["{instance}",
    "globex.my.salesforce.com"]``) hands every grant's token to that org just the same,
    yet it is taken silently: alice's token goes to globex, and globex's 401 first forces a
    refresh of her grant, then (the next request) marks it ``revoked_upstream``: another
    tenant burns her grant. It must be refused like the other loosening (or kept from
    sending her token there)."""
    user = f"alice-widen-{secrets.token_hex(3)}"
    env.connect(user, "salesforce")
    bound = [_entry("salesforce")]
    with _second_proxy(env, "widen", bound, "never", reload={"settle": 0.2}) as second:
        assert second is not None
        with env.stack.client_via(second.proxy_url, context=env.context(user)) as c:
            assert c.get(f"https://acme.my.salesforce.com{SF_API}").status_code == 200
        widened = _entry("salesforce")
        widened["grant_hosts"] = ["{instance}", "globex.my.salesforce.com"]
        verdict = second.rewrite(env, [widened])
        marker = _marker()
        statuses = []
        with env.stack.client_via(second.proxy_url, context=env.context(user)) as c:
            for i in range(2):
                r = c.get(f"https://globex.my.salesforce.com{SF_API}?m={marker}-{i}")
                statuses.append((r.status_code, r.json().get("reason")))
        reached = [(x["host"], x.get("credential_user")) for x in env.fake.requests()
                   if str(x["query"].get("m", "")).startswith(marker)]
        grant = env.stored(user, "salesforce")
        assert grant is not None
        assert reached == [], (
            f"after the reload ({verdict.split(': ', 1)[-1][:80]}) {user}'s token reached "
            f"another org: {reached}; answers {statuses}; grant now {grant.status}")
        assert "rejected" in verdict and "grant_hosts" in verdict, verdict
        assert grant.status == "active", grant


# ---------------------------------------------------------------------------------------
# A chosen value outside the ceiling: `allowed` wider than `hosts`
# ---------------------------------------------------------------------------------------

def test_a_choice_outside_the_ceiling_reaches_no_url_when_allowed_is_wider(env: Env) -> None:
    """docs/tenants.md: "A choice is checked (kind, pattern or allowed, the ceiling) before
    the authorize URL is built, so a chosen value never reaches a URL unchecked, and the
    client secret never goes to a token endpoint outside the ceiling"; and the refusal of
    such a value is ``grant_host_not_allowed`` with nothing stored.

    With ``allowed: ["*.myshopify.com", "*.myshopify.com.evil.com"]`` (``hosts`` stays
    ``*.myshopify.com``), ``/connect/shopify?shop=alice-shop.myshopify.com.evil.com`` is
    checked against ``allowed`` only: the browser is redirected to
    ``https://alice-shop.myshopify.com.evil.com/admin/oauth/authorize``, and when that host
    sends the browser back with a code, credproxy POSTs the code, the PKCE verifier and the
    client secret to ``https://alice-shop.myshopify.com.evil.com/admin/oauth/access_token``.
    Either the config is refused (allowed outside the ceiling) or the connect link is."""
    shop = _entry("shopify")
    shop["grant_values"]["shop"]["allowed"] = ["*.myshopify.com", "*.myshopify.com.evil.com"]
    with _second_proxy(env, "wide", [shop], "allowed") as second:
        if second is None:
            return
        admin = second.admin_url
        user = f"alice-wide-{secrets.token_hex(3)}"
        before = len(env.fake.requests())
        with env.fake.browser() as b:
            r = b.get(f"{admin}/connect/shopify",
                      params={"context": env.context(user), "shop": TRAP_SHOP})
            redirected = r.headers.get("location", "")
            if r.status_code == 302:
                # The trap host plays the provider: it sends the browser back with a code.
                state = dict(parse_qsl(urlsplit(redirected).query))["state"]
                b.get(f"{admin}/oauth/callback?" + urlencode(
                    {"code": "from-the-trap", "state": state, "shop": TRAP_SHOP}))
        at_trap = [x for x in env.fake.requests()[before:] if x["host"] == TRAP_SHOP]
        secret_sent = [x["path"] for x in at_trap if x.get("client_secret_sent")]
        assert secret_sent == [], \
            f"the client secret was sent outside the ceiling: {secret_sent}"
        assert urlsplit(redirected).hostname != TRAP_SHOP, \
            f"the browser was sent to an authorize URL outside the ceiling: {redirected[:90]}"
        assert r.status_code == 400 and "grant_host_not_allowed" in r.text, r.text
        assert at_trap == []
        assert env.stored(user, "shopify") is None


# ---------------------------------------------------------------------------------------
# A grant that predates binding
# ---------------------------------------------------------------------------------------

def test_a_grant_predating_binding_is_not_shown_active(env: Env) -> None:
    """docs/tenants.md: a grant made before its provider started binding "has no values;
    their next request gets reauth-required (grant_value_missing)". What the agent
    (``GET /v1/connections``) and the operator (``credproxy connections``) see must say the
    same: today both say ``active`` (with no hosts), so nobody learns that the user must
    reconnect until a request fails."""
    user = f"alice-pre-{secrets.token_hex(3)}"
    env.stack.vault_put(user, {"access_token": f"at_pre_{secrets.token_hex(4)}",
                               "refresh_token": f"rt_pre_{secrets.token_hex(4)}",
                               "expires_in": 3600, "token_type": "bearer",
                               "scope": "read_products"},
                        provider="shopify", keep_values=False)
    time.sleep(0.6)
    r = env.get(user, f"https://{ALICE_SHOP}{SHOP_API}")
    assert r.status_code == 401 and r.json()["reason"] == "grant_value_missing", r.text

    listed = env.connections(env.context(user))
    assert listed.status_code == 200, listed.text
    [entry] = [c for c in listed.json()["connections"] if c["provider"] == "shopify"]
    cli = env.cli("connections", "--user", user, "--json")
    assert cli.returncode == 0, cli.stderr
    [row] = [json.loads(line) for line in cli.stdout.splitlines()
             if line.strip() and json.loads(line)["provider"] == "shopify"]
    assert (entry["status"], entry["reason"]) != ("active", None), \
        f"/v1/connections shows a grant every request refuses as active: {entry}"
    assert (row["status"], row["reason"]) != ("active", None), \
        f"credproxy connections shows a grant every request refuses as active: {row}"


# ---------------------------------------------------------------------------------------
# Re-binding a grant outside the proxy process
# ---------------------------------------------------------------------------------------

def _cli_connect(env: Env, user: str, *values: str, provider: str = "shopify") -> None:
    """``credproxy connect --value ...`` at a terminal: the authorize URL it prints is
    opened in a browser that signs in as ``user``; the loopback callback completes it."""
    argv = [sys.executable, "-m", "proxy.cli", "connect", "--config",
            str(env.stack.config_path), "--user", user, "--provider", provider,
            "--timeout", "30"]
    for v in values:
        argv += ["--value", v]
    proc = subprocess.Popen(argv, env={**os.environ, **env.stack.env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.monotonic() + 20
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            found = re.search(r"https://\S+/authorize\?\S+", line)
            url = found.group(0) if found else None
        assert url is not None, "credproxy connect printed no authorize URL"
        with env.fake.browser() as b:
            r = b.get(url + "&" + urlencode({"login_hint": user}))
            assert r.status_code == 302, r.text
            done = httpx2.get(r.headers["location"], timeout=20, trust_env=False)
            assert done.status_code == 200, done.text
        assert proc.wait(30) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _assert_rebound(env: Env, user: str) -> None:
    """Within 2 s of the re-binding, the running proxy follows the vault: bob-shop gets the
    user's (new) credential, alice-shop none (403 not_grant_host)."""
    grant = env.stored(user, "shopify")
    assert grant is not None and grant.values == {"shop": BOB_SHOP}, grant
    deadline = time.monotonic() + 2.0
    while True:
        marker = _marker()
        old = env.get(user, f"https://{ALICE_SHOP}{SHOP_API}?m={marker}-old")
        new = env.get(user, f"https://{BOB_SHOP}{SHOP_API}?m={marker}-new")
        if (old.status_code, new.status_code) == (403, 200) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    sent_old = [(x["host"], x.get("credential_user"))
                for x in env.fake.requests() if x["query"].get("m") == f"{marker}-old"]
    assert sent_old == [], (
        f"2 s after the grant was re-bound to {BOB_SHOP}, the proxy still sent the user's "
        f"credential to {ALICE_SHOP}: {sent_old}")
    assert old.status_code == 403 and old.json()["reason"] == "not_grant_host", old.text
    assert new.status_code == 200, (
        f"the proxy refuses the grant's own (new) shop: {new.status_code} {new.text[:200]}")


def test_a_terminal_reconnect_to_another_shop_applies_at_once(env: Env) -> None:
    """docs/tenants.md: "the second connect to the same entry replaces the first grant";
    test_tenants proves it for the web flow, which runs inside the proxy process. carol
    (staff of both shops) connects alice-shop on the web and uses it; then she connects
    bob-shop at a terminal, as the README documents (``credproxy connect --provider shopify
    --value shop=bob-shop.myshopify.com``). The vault and ``credproxy connections`` now say
    bob-shop, but the running proxy (memory coordination, the default) keeps its cached
    grant: it sends carol's alice-shop credential to alice-shop and refuses bob-shop as
    "not this user's tenant: bound to alice-shop", until the cached token expires (an
    hour for Shopify)."""
    user = f"carol-cli-{secrets.token_hex(3)}"
    env.connect(user, "shopify", shop=ALICE_SHOP)
    assert env.get(user, f"https://{ALICE_SHOP}{SHOP_API}").status_code == 200
    _cli_connect(env, user, f"shop={BOB_SHOP}")
    _assert_rebound(env, user)


def test_vault_put_rebinding_a_grant_applies_at_once(env: Env) -> None:
    """README: ``credproxy vault put`` imports a token set; docs/tenants.md: ``--value
    name=value`` sets the grant's values, "checked as at connect time". carol's grant (in
    use at alice-shop) is re-bound by the operator to bob-shop with a bob-shop token set.
    The running proxy never learns it (vault put neither moves the vault's epoch nor
    publishes an invalidation; the same with Redis coordination, for every replica): it
    keeps serving alice-shop with the old token and refuses bob-shop."""
    user = f"carol-put-{secrets.token_hex(3)}"
    env.connect(user, "shopify", shop=BOB_SHOP)
    bob_grant = env.stored(user, "shopify")
    assert bob_grant is not None
    access = bob_grant.tokens.access_token
    bob_token = access.reveal() if hasattr(access, "reveal") else str(access)
    env.connect(user, "shopify", shop=ALICE_SHOP)
    assert env.get(user, f"https://{ALICE_SHOP}{SHOP_API}").status_code == 200
    put = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "vault", "put", "--config",
         str(env.stack.config_path), "--user", user, "--provider", "shopify",
         "--value", f"shop={BOB_SHOP}"],
        input=json.dumps({"access_token": bob_token, "token_type": "bearer",
                          "expires_in": 3000}),
        env={**os.environ, **env.stack.env}, capture_output=True, text=True, timeout=60)
    assert put.returncode == 0, put.stderr
    _assert_rebound(env, user)


# ---------------------------------------------------------------------------------------
# Static bindings that can never work pass `credproxy check`
# ---------------------------------------------------------------------------------------

def _static_grant_host_outside() -> dict[str, Any]:
    entry = _entry("salesforce")
    entry["grant_hosts"] = ["{instance}", "evil.example.com"]
    return entry


def _static_resource_host_outside() -> dict[str, Any]:
    entry = _entry("microsoft")
    entry["resources"]["sharepoint"]["grant_hosts"] = ["graph.microsoft.com"]
    entry["resources"]["sharepoint"]["scopes"] = ["https://graph.microsoft.com/.default"]
    return entry


def _discovery_outside() -> dict[str, Any]:
    entry = _entry("microsoft")
    entry["grant_values"]["sharepoint"]["url"] = "https://evil.example.com/v1.0/sites/root"
    return entry


STATIC = [("grant_hosts", _static_grant_host_outside),
          ("resources.sharepoint.grant_hosts", _static_resource_host_outside),
          ("grant_values.sharepoint.url", _discovery_outside)]


@pytest.mark.parametrize(("key", "make"), STATIC, ids=[s[0] for s in STATIC])
def test_check_names_a_static_binding_outside_the_ceiling(env: Env, key: str,
                                                          make: Any) -> None:
    """docs/tenants.md: "Every rendered grant_hosts entry must be a host (no wildcard) that
    matches one of the provider's hosts patterns (a resource's, for a resource's)"; a
    discovery URL must be on "one of this provider's own hosts". A static entry (no
    placeholder) outside the ceiling is known to be wrong when the file is read, yet
    ``credproxy check`` says ok, and every user's connect then fails
    (``grant_host_not_allowed``). README: "a config error names the key"."""
    path = _write_config(env, f"static-{key.replace('.', '-')}.yaml", [make()])
    result = _check(env, path)
    assert result.returncode == 1, f"credproxy check accepted it: {result.stdout.strip()}"
    assert key.split(".")[-1] in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------
# The connect_url of a refusal for a provider whose grants are bound by a choice
# ---------------------------------------------------------------------------------------

def test_the_connect_url_of_a_shop_refusal_is_not_a_dead_end(env: Env) -> None:
    """README: "the agent gets an explicit re-authorization error" whose ``connect_url``
    is where the user re-authorizes ("The `connect_url` in every `reauth-required` error
    points here"). A user with no Shopify grant asks for alice-shop: the 401 carries
    ``connect_url: <public_url>/connect/shopify``, with no ``shop``; the user who opens it
    (with her context, as the docs say) gets "Sign-in not possible ... the connect link's
    'shop' parameter is absent" (400). The proxy knows the shop the request was for (it
    is under the ceiling): the link should carry it, or lead to a page that asks."""
    user = f"alice-nc-{secrets.token_hex(3)}"
    r = env.get(user, f"https://{ALICE_SHOP}{SHOP_API}")
    assert r.status_code == 401 and r.json()["reason"] == "no_connection", r.text
    connect_url = r.json()["connect_url"]
    assert urlsplit(connect_url).query == f"shop={ALICE_SHOP}", connect_url
    # The user's browser adds their context to the link (httpx would replace the link's
    # own query with params=, so the parameter is appended to the URL as text).
    with env.fake.browser() as b:
        opened = b.get(f"{connect_url}&{urlencode({'context': env.context(user)})}")
    assert opened.status_code in (200, 302), (
        f"{connect_url} answers {opened.status_code}: "
        f"{opened.text[opened.text.find('<p>'):][:160]}")
    if opened.status_code == 302:
        assert urlsplit(opened.headers["location"]).hostname == ALICE_SHOP
