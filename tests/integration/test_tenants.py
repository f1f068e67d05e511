"""Grants bound to their tenant (issue 14, docs/tenants.md), through the real sidecar.

Two tenants of each kind behind one fake (:mod:`devstack.tenantfakes`), which the proxy
process reaches by the providers' real host names on port 443 (:mod:`devstack.fakedns`):

=============  ==================================  ===================================
               alice                               bob
=============  ==================================  ===================================
salesforce     org acme.my.salesforce.com          org globex.my.salesforce.com
shopify        alice-shop.myshopify.com            bob-shop.myshopify.com
microsoft      tenant contoso (Graph, and          tenant fabrikam (Graph, and
               contoso.sharepoint.com)             fabrikam.sharepoint.com)
=============  ==================================  ===================================

plus an attacker's org and shop that nobody connected. The config entries are what a user
writes (docs/tenants.md), explicit about every key the binding needs so they do not depend
on the catalog's details.

Done when (issue 14): each user's token reaches only their own tenant; the other tenant's
host gets no credential and a clear refusal (403 ``provider-not-permitted``, reason
``not_grant_host``, naming the user's own host), however the agent tries to get there;
the other tenant's 401 can never touch the grant (nothing is ever sent there); a connect
with a value outside the ceiling, or a callback naming another shop, stores nothing and
sends no client secret anywhere; Graph and SharePoint work from one consent (one vault
record per user, removed whole on offboarding); the metadata is visible to the owning
agent only (``GET /v1/connections``, ``credproxy connections``), never a token.

One stack and one fake for the module; the last test sweeps everything the fake recorded:
no token ever reached a host it was not issued for.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx2
import pytest

from devstack import tenantfakes
from devstack.stack import Stack, build_stack
from devstack.tenantfakes import TenantFakes
from proxy.devkeys import mint, write_dev_keys

from . import rawhttp

pytestmark = pytest.mark.integration

CLIENT_ID = "credproxy-tenants"
SECRET_ENV = "TENANT_CLIENT_SECRET"
PROBLEM = "urn:credproxy:problem:"
SETTLE = 0.6  # the proxy notices another process's vault writes within 0.25 s

SF_API = "/services/data/v60.0/sobjects"
SHOP_API = "/admin/api/2025-01/shop.json"
SPO_API = "/_api/web"
GRAPH_ME = "https://graph.microsoft.com/v1.0/me"
SITES_ROOT = "https://graph.microsoft.com/v1.0/sites/root?$select=webUrl"

# What a user writes (docs/tenants.md): the catalog entry, the client, and the binding.
PROVIDERS: list[dict[str, Any]] = [
    {
        "id": "salesforce", "provider": "salesforce",
        "client_id": CLIENT_ID, "client_secret_env": SECRET_ENV,
        "authorize_url": "https://login.salesforce.com/services/oauth2/authorize",
        "token_url": "https://login.salesforce.com/services/oauth2/token",
        "token_endpoint_auth_method": "client_secret_post",
        "scopes": ["api", "refresh_token"],
        "default_expires_in": 7200,
        "hosts": ["*.my.salesforce.com"],
        "grant_values": {"instance": {"from": "token_response", "field": "instance_url",
                                      "kind": "host"}},
        "grant_hosts": ["{instance}"],
        "revocation_url": "https://{instance}/services/oauth2/revoke",
        "revocation": {"style": "rfc7009", "token": "refresh_token",
                       "already_revoked": ["invalid_token"]},
    },
    {
        "id": "shopify", "provider": "shopify",
        "client_id": CLIENT_ID, "client_secret_env": SECRET_ENV,
        "hosts": ["*.myshopify.com"],
        "grant_values": {"shop": {"from": "choice", "kind": "host",
                                  "allowed": ["*.myshopify.com"]}},
        "grant_hosts": ["{shop}"],
        "authorize_url": "https://{shop}/admin/oauth/authorize",
        "token_url": "https://{shop}/admin/oauth/access_token",
        "token_endpoint_auth_method": "client_secret_post",
        "token_params": {"expiring": "1"},
        "inject": {"header": "X-Shopify-Access-Token", "format": "{access_token}"},
        "scopes": ["read_products"], "scope_separator": ",",
        "revocation": {"style": "none", "console_url": "https://admin.shopify.com/"},
    },
    {
        "id": "microsoft", "provider": "microsoft-graph",
        "client_id": CLIENT_ID, "client_secret_env": SECRET_ENV,
        "parameters": {"tenant": "organizations"},
        "scopes": ["offline_access", "User.Read", "Sites.Read.All"],
        "grant_values": {"sharepoint": {"from": "discovery", "url": SITES_ROOT,
                                        "field": "webUrl", "kind": "host"}},
        "resources": {"sharepoint": {
            "hosts": ["*.sharepoint.com"],
            "grant_hosts": ["{sharepoint}"],
            "scopes": ["https://{sharepoint}/.default", "offline_access"],
        }},
    },
]
PROVIDER_IDS = [p["id"] for p in PROVIDERS]


@dataclass(frozen=True)
class Tenancy:
    """A family of tenants under one ceiling: each user's own host, a host nobody
    connected, and the API path the agent calls."""

    provider: str
    path: str
    own: Mapping[str, str]
    stranger: str
    credential_header: str  # where the agent would put a credential of its own


TENANCIES = {
    "salesforce": Tenancy("salesforce", SF_API,
                          {"alice": "acme.my.salesforce.com", "bob": "globex.my.salesforce.com"},
                          "attacker-org.my.salesforce.com", "Authorization"),
    "shopify": Tenancy("shopify", SHOP_API,
                       {"alice": "alice-shop.myshopify.com", "bob": "bob-shop.myshopify.com"},
                       "attacker-shop.myshopify.com", "X-Shopify-Access-Token"),
    "sharepoint": Tenancy("microsoft", SPO_API,
                          {"alice": "contoso.sharepoint.com", "bob": "fabrikam.sharepoint.com"},
                          "evil-tenant.sharepoint.com", "Authorization"),
}
SHOP_OF = {"alice": "alice-shop.myshopify.com", "bob": "bob-shop.myshopify.com"}


# ---------------------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------------------

class Env:
    """The module's stack and fake, with the agent's, the browser's and the operator's
    means."""

    def __init__(self, stack: Stack, fake: TenantFakes, secret: str) -> None:
        self.stack = stack
        self.fake = fake
        self.secret = secret
        self._connected: dict[str, bool] = {}

    def ensure(self, *providers: str) -> Env:
        """alice and bob connected to each of ``providers`` (once for the module; each to
        their own shop), so that a provider whose connect fails fails only its tests."""
        for provider in providers:
            if provider not in self._connected:
                self._connected[provider] = False
                for user in ("alice", "bob"):
                    self.connect(user, provider,
                                 **({"shop": SHOP_OF[user]} if provider == "shopify" else {}))
                self._connected[provider] = True
            assert self._connected[provider], f"connecting to {provider} failed earlier"
        return self

    @property
    def admin(self) -> str:
        return f"http://{self.stack.config['admin']}"

    def context(self, user: str, **kw: Any) -> str:
        return self.stack.context(user, **kw)

    # -- the agent ---------------------------------------------------------------------
    def get(self, user: str, url: str, **headers: str) -> httpx2.Response:
        with self.stack.client(context=self.context(user)) as c:
            return c.get(url, headers=headers)

    def raw(self, user: str, *, connect: str | None, host: str, target: str,
            sni: str | None = None, absolute: str | None = None,
            headers: Mapping[str, str] | None = None) -> rawhttp.RawResponse:
        return rawhttp.request(
            self.stack.proxy_url, connect=connect, host_header=host, path=target, sni=sni,
            absolute=absolute, ca_file=str(self.stack.mitm_ca),
            headers={"X-User-Context": self.context(user), **(headers or {})})

    # -- the browser -------------------------------------------------------------------
    def begin(self, browser: httpx2.Client, user: str, provider: str,
              **params: str) -> httpx2.Response:
        """``/connect/<provider>?context=...&<params>`` on the admin server."""
        return browser.get(f"{self.admin}/connect/{provider}",
                           params={"context": self.context(user), **params})

    def consent(self, browser: httpx2.Client, authorize: str, user: str) -> str:
        """The provider's sign-in and consent (the fake consents at once for
        ``login_hint``); returns the callback URL it redirects to."""
        r = browser.get(authorize + "&" + urlencode({"login_hint": user}))
        assert r.status_code == 302, r.text
        callback = r.headers["location"]
        assert callback.startswith(f"{self.admin}/oauth/callback?"), callback
        return str(callback)

    def connect(self, user: str, provider: str, **params: str) -> None:
        """The whole web flow; the callback page says connected."""
        with self.fake.browser() as b:
            r = self.begin(b, user, provider, **params)
            assert r.status_code == 302, r.text
            r = b.get(self.consent(b, r.headers["location"], user))
            assert r.status_code == 200 and "now connected" in r.text, r.text

    # -- the operator ------------------------------------------------------------------
    def stored(self, user: str, provider: str) -> Any:
        async def get() -> Any:
            vault = self.stack._open_vault()
            try:
                return await vault.get(user, provider)
            finally:
                await vault.close()
        return asyncio.run(get())

    def listed(self, user: str) -> list[Any]:
        async def get() -> list[Any]:
            vault = self.stack._open_vault()
            try:
                return list(await vault.list(user))
            finally:
                await vault.close()
        return asyncio.run(get())

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A real ``credproxy`` command on the stack's config, resolving the fake's names
        as the proxy does (the revocation goes to the grant's org)."""
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", args[0], "--config",
             str(self.stack.config_path), *args[1:]],
            env={**os.environ, **self.stack.env}, capture_output=True, text=True, timeout=60)

    def audit(self, **match: Any) -> list[dict[str, Any]]:
        """The proxy's audit records (stdout) whose fields equal ``match`` (``host``: the
        request's host)."""
        out = []
        for rec in self.stack.audit_records():
            if "event" not in rec:
                continue
            host = (rec.get("request") or {}).get("host")
            if all((host if k == "host" else rec.get(k)) == v for k, v in match.items()):
                out.append(rec)
        return out

    def connections(self, context: str | None = None,
                    headers: Mapping[str, str] | None = None,
                    query: str | None = None) -> httpx2.Response:
        """``GET /v1/connections`` on the admin port with ``context`` in the user-context
        header (``query``: a context in the query string instead, which is refused)."""
        h = dict(headers or {})
        if context is not None:
            h["X-User-Context"] = context
        params = {"context": query} if query is not None else None
        return httpx2.get(f"{self.admin}/v1/connections", headers=h, params=params,
                          timeout=15, trust_env=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from tenant_env(tmp_path_factory.mktemp("tenants"))


def tenant_env(workdir: Path) -> Iterator[Env]:
    """A stack whose proxy runs PROVIDERS against the tenant fakes at their real host
    names (fake DNS); stopped when the generator is closed."""
    stack = build_stack(workdir, start_proxy=False)
    secret = secrets.token_urlsafe(24)
    fake = tenantfakes.start(stack.ca, workdir, client_id=CLIENT_ID, client_secret=secret)
    try:
        stack.env[SECRET_ENV] = secret
        stack.fake_dns(fake.dns)
        stack.write_config(providers=PROVIDERS)
        stack.start_proxy()
        yield Env(stack, fake, secret)
    finally:
        fake.close()
        stack.close()


def _marker() -> str:
    return secrets.token_hex(6)


def _problem(status: int, content_type: str | None, body: bytes, *, expect: int,
             slug: str, reason: str) -> dict[str, Any]:
    assert status == expect, body[:500]
    assert (content_type or "").startswith("application/problem+json"), content_type
    data: dict[str, Any] = json.loads(body)
    assert (data["type"], data["reason"]) == (PROBLEM + slug, reason), data
    return data


def _marked(fake: TenantFakes, marker: str) -> list[dict[str, Any]]:
    """Whatever reached the fake carrying ``marker`` (in the query), on any host."""
    return [r for r in fake.requests() if r["query"].get("m") == marker]


def _active(env: Env, user: str, provider: str) -> None:
    grant = env.stored(user, provider)
    assert grant is not None and grant.status == "active", grant


# ---------------------------------------------------------------------------------------
# Each user's token reaches their own tenant
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("user", ["alice", "bob"])
@pytest.mark.parametrize("family", list(TENANCIES))
def test_own_tenant_gets_the_users_own_token(env: Env, family: str, user: str) -> None:
    """alice -> acme / alice-shop / contoso.sharepoint.com, bob -> globex / bob-shop /
    fabrikam.sharepoint.com: 200, and what arrived carried the user's own token, issued
    for exactly that host."""
    t = TENANCIES[family]
    env.ensure(t.provider)
    marker = _marker()
    host = t.own[user]
    r = env.get(user, f"https://{host}{t.path}?m={marker}")
    assert r.status_code == 200, r.text
    [seen] = _marked(env.fake, marker)
    assert (seen["host"], seen["sni"]) == (host, host)
    assert seen["credential_user"] == user and seen["credential_audience"] == host
    if family == "shopify":
        assert seen["authorization"] is None and seen["shopify_token"] == seen["credential"]
    else:
        assert seen["authorization"] == f"Bearer {seen['credential']}"


# ---------------------------------------------------------------------------------------
# The other tenant's host: however the agent tries, no credential and a clear refusal
# ---------------------------------------------------------------------------------------

NOT_GRANT_HOST = (403, "provider-not-permitted", "not_grant_host")
TARGET_MISMATCH = (421, "misdirected-request", "target_mismatch")
HOST_MISMATCH = (421, "misdirected-request", "host_mismatch")

# (name, acting user, request: rawhttp arguments with {own} {other} {stranger} {OTHER}
# {target} placeholders, expected (status, slug, reason))
VARIANTS: list[tuple[str, str, dict[str, Any], tuple[int, str, str]]] = [
    ("other tenant", "alice", {"connect": "{other}:443", "host": "{other}"}, NOT_GRANT_HOST),
    ("other tenant, as bob", "bob", {"connect": "{other}:443", "host": "{other}"},
     NOT_GRANT_HOST),
    ("tenant nobody connected", "alice", {"connect": "{stranger}:443", "host": "{stranger}"},
     NOT_GRANT_HOST),
    ("upper case", "alice", {"connect": "{OTHER}:443", "host": "{OTHER}"}, NOT_GRANT_HOST),
    ("trailing dot", "alice", {"connect": "{other}.:443", "host": "{other}.",
                               "sni": "{other}"}, NOT_GRANT_HOST),
    ("explicit :443", "alice", {"connect": "{other}:443", "host": "{other}:443"},
     NOT_GRANT_HOST),
    ("the agent's own credential", "alice",
     {"connect": "{other}:443", "host": "{other}", "own_credential": True}, NOT_GRANT_HOST),
    ("absolute-form to the proxy", "alice",
     {"connect": None, "host": "{other}", "absolute": "https://{other}{target}"},
     NOT_GRANT_HOST),
    ("absolute-form inside the own tunnel", "alice",
     {"connect": "{own}:443", "host": "{own}", "absolute": "https://{other}{target}"},
     TARGET_MISMATCH),
    ("tunnel to the other, Host own", "alice", {"connect": "{other}:443", "host": "{own}"},
     HOST_MISMATCH),
    ("tunnel to the own, SNI other", "alice",
     {"connect": "{own}:443", "host": "{own}", "sni": "{other}"}, HOST_MISMATCH),
    ("tunnel to the other, SNI and Host own", "alice",
     {"connect": "{other}:443", "host": "{own}", "sni": "{own}"}, HOST_MISMATCH),
    ("IP literal, Host other", "alice", {"connect": "127.0.0.1:443", "host": "{other}"},
     HOST_MISMATCH),
    ("IP literal, Host own", "alice", {"connect": "127.0.0.1:443", "host": "{own}"},
     HOST_MISMATCH),
]


@pytest.mark.parametrize(("name", "user", "how", "expected"), VARIANTS,
                         ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("family", list(TENANCIES))
def test_other_tenant_gets_no_credential(env: Env, family: str, name: str, user: str,
                                         how: dict[str, Any],
                                         expected: tuple[int, str, str]) -> None:
    """The request is refused before anything is sent: the expected problem (a
    not_grant_host refusal names the user's own host and is audited as credential.denied
    for the user and the real destination), nothing with this request's marker reached any
    host (the agent's own credential neither), and the user's grant is untouched (active;
    their own host still works, without a refresh)."""
    t = TENANCIES[family]
    env.ensure(t.provider)
    own, other = t.own[user], t.own["bob" if user == "alice" else "alice"]
    marker = _marker()
    target = f"{t.path}?m={marker}"
    fill = {"own": own, "other": other, "stranger": t.stranger, "OTHER": other.upper(),
            "target": target}
    args = {k: v.format(**fill) if isinstance(v, str) else v for k, v in how.items()
            if k != "own_credential"}
    headers = {}
    if how.get("own_credential"):
        headers[t.credential_header] = f"agent-own-credential-{marker}"
    # The user's own token is warm (a first SharePoint use redeems one), so any token
    # request from here on would be the refusal's doing.
    assert env.get(user, f"https://{own}{t.path}?m={marker}-before").status_code == 200
    refreshes = len(env.fake.requests(kind="token", grant_type="refresh_token", user=user))
    dest = urlsplit(args["absolute"]).hostname if args.get("absolute") else \
        args["connect"].rsplit(":", 1)[0]
    dest = dest.lower().removesuffix(".")
    denials = len(env.audit(event="credential.denied", reason="not_grant_host", user=user,
                            provider=t.provider, host=dest))

    r = env.raw(user, connect=args["connect"], host=args["host"], target=target,
                sni=args.get("sni"), absolute=args.get("absolute"), headers=headers)

    status, slug, reason = expected
    problem = _problem(r.status, r.headers.get("Content-Type"), r.body, expect=status,
                       slug=slug, reason=reason)
    assert _marked(env.fake, marker) == [], "nothing may reach any host"
    if reason == "not_grant_host":  # audited, naming the user and the real destination
        assert own in problem["detail"], problem
        after = env.audit(event="credential.denied", reason="not_grant_host", user=user,
                          provider=t.provider, host=dest)
        assert len(after) == denials + 1, after
    _active(env, user, t.provider)
    r2 = env.get(user, f"https://{own}{t.path}?m={marker}-after")
    assert r2.status_code == 200, r2.text
    assert len(env.fake.requests(kind="token", grant_type="refresh_token", user=user)) \
        == refreshes, "the user's own host works on the same token"


# ---------------------------------------------------------------------------------------
# Shops: the value the user chooses is checked before it is used anywhere
# ---------------------------------------------------------------------------------------

REFUSED_SHOPS = [
    ("another domain", "evil.example.com"),
    ("the ceiling as a prefix", "alice-shop.myshopify.com.evil.com"),
    ("missing", None),
    ("empty", ""),
    ("the wildcard's suffix itself", "myshopify.com"),
    ("a wildcard", "*.myshopify.com"),
    ("another port", "alice-shop.myshopify.com:8443"),
    ("userinfo", "alice-shop.myshopify.com@evil.example.com"),
    ("a URL on another host", "https://evil.example.com/alice-shop.myshopify.com"),
]


@pytest.mark.parametrize(("name", "shop"), REFUSED_SHOPS, ids=[s[0] for s in REFUSED_SHOPS])
def test_connect_refuses_a_shop_outside_the_ceiling(env: Env, name: str,
                                                    shop: str | None) -> None:
    """``/connect/shopify?shop=...`` with a value outside ``*.myshopify.com`` (or none):
    refused at once (no redirect to any authorize URL), nothing reached any host (so no
    client secret left), nothing stored, and the rejection audited."""
    user = f"alice-shopref-{secrets.token_hex(3)}"
    before = len(env.fake.requests())
    with env.fake.browser() as b:
        r = env.begin(b, user, "shopify", **({} if shop is None else {"shop": shop}))
    assert r.status_code == 400, r.text
    assert "location" not in r.headers and "Sign-in not possible" in r.text
    assert len(env.fake.requests()) == before
    assert env.stored(user, "shopify") is None
    assert env.audit(event="connection.created", user=user, outcome="rejected")


@pytest.mark.parametrize("spelling", ["ALICE-SHOP.MYSHOPIFY.COM",
                                      "https://alice-shop.myshopify.com",
                                      "alice-shop.myshopify.com."])
def test_connect_normalises_the_chosen_shop(env: Env, spelling: str) -> None:
    """A host value is normalised with the one host grammar (an absolute URL's host is
    taken): the flow goes to alice-shop.myshopify.com and the grant is bound there."""
    user = f"alice-norm-{secrets.token_hex(3)}"
    env.connect(user, "shopify", shop=spelling)
    [authorize] = [r for r in env.fake.requests(kind="authorize")
                   if r["query"].get("login_hint") == user]
    assert authorize["host"] == "alice-shop.myshopify.com"
    [token] = env.fake.requests(kind="token", user=user)
    assert token["host"] == "alice-shop.myshopify.com" and token["status"] == 200
    marker = _marker()
    assert env.get(user, f"https://alice-shop.myshopify.com{SHOP_API}?m={marker}"
                   ).status_code == 200


@pytest.mark.parametrize(("returned", "reasons"), [
    ("bob-shop.myshopify.com", {"grant_value_mismatch"}),
    # Outside the ceiling: the returned value fails its own check first, or the comparison
    # (docs/tenants.md says both: "checked the same way" and "must come back equal").
    ("evil.example.com", {"grant_value_mismatch", "grant_host_not_allowed"}),
])
def test_callback_naming_another_shop_is_refused(env: Env, returned: str,
                                                 reasons: set[str]) -> None:
    """The browser comes back from alice-shop's consent with ``shop`` changed: the value
    chosen must come back equal (grant_value_mismatch). No token request goes anywhere
    (the code is never presented, the client secret never leaves), nothing is stored."""
    user = f"alice-mismatch-{secrets.token_hex(3)}"
    with env.fake.browser() as b:
        r = env.begin(b, user, "shopify", shop="alice-shop.myshopify.com")
        assert r.status_code == 302
        assert urlsplit(r.headers["location"]).netloc == "alice-shop.myshopify.com"
        callback = urlsplit(env.consent(b, r.headers["location"], user))
        query = dict(parse_qsl(callback.query))
        assert query["shop"] == "alice-shop.myshopify.com"
        query["shop"] = returned
        tokens_before = len(env.fake.requests(kind="token"))
        others_before = len(env.fake.requests(kind="unknown_host"))
        r = b.get(urlunsplit(callback._replace(query=urlencode(query))))
    assert r.status_code == 400 and "Connection failed" in r.text, r.text
    assert any(f"({reason})" in r.text for reason in reasons), r.text
    assert len(env.fake.requests(kind="token")) == tokens_before
    assert len(env.fake.requests(kind="unknown_host")) == others_before
    assert env.stored(user, "shopify") is None
    [audited] = env.audit(event="connection.created", user=user, outcome="rejected")
    assert audited["reason"] in reasons


def test_connecting_again_to_another_shop_replaces_the_grant(env: Env) -> None:
    """One grant per provider entry (docs/tenants.md): carol, staff of both shops, connects
    alice-shop, then bob-shop. The second grant replaces the first at once: bob-shop gets
    her new token, alice-shop now gets none (403 not_grant_host naming bob-shop), one
    vault record bound to bob-shop."""
    user = f"carol-{secrets.token_hex(3)}"
    env.connect(user, "shopify", shop="alice-shop.myshopify.com")
    first = _marker()
    assert env.get(user, f"https://alice-shop.myshopify.com{SHOP_API}?m={first}"
                   ).status_code == 200
    env.connect(user, "shopify", shop="bob-shop.myshopify.com")
    marker = _marker()
    r = env.get(user, f"https://bob-shop.myshopify.com{SHOP_API}?m={marker}")
    assert r.status_code == 200, r.text
    [seen] = _marked(env.fake, marker)
    assert (seen["credential_user"], seen["credential_audience"]) == (
        user, "bob-shop.myshopify.com")
    assert seen["credential"] != _marked(env.fake, first)[0]["credential"]
    marker = _marker()
    r = env.get(user, f"https://alice-shop.myshopify.com{SHOP_API}?m={marker}")
    problem = _problem(r.status_code, r.headers.get("content-type"), r.content,
                       expect=403, slug="provider-not-permitted", reason="not_grant_host")
    assert "bob-shop.myshopify.com" in problem["detail"]
    assert _marked(env.fake, marker) == []
    [row] = [x for x in env.listed(user) if x.provider == "shopify"]
    assert row.status == "active" and row.values["shop"] == "bob-shop.myshopify.com"


def test_token_endpoint_naming_a_host_outside_the_ceiling_is_refused(env: Env) -> None:
    """The code exchange answers an instance_url outside ``*.my.salesforce.com``: its value
    is checked all the same, the connection is refused and nothing is stored; nothing
    was sent to that host."""
    user = f"alice-lying-{secrets.token_hex(3)}"
    env.fake.knobs(salesforce_instance_url="https://evil.example.com")
    with env.fake.browser() as b:
        r = env.begin(b, user, "salesforce")
        assert r.status_code == 302
        r = b.get(env.consent(b, r.headers["location"], user))
    assert r.status_code == 400 and "Connection failed" in r.text, r.text
    assert env.fake.requests(kind="token", user=user)[0]["status"] == 200
    assert not env.fake.requests(host="evil.example.com")
    assert env.stored(user, "salesforce") is None
    assert env.audit(event="connection.created", user=user, outcome="rejected")


def test_discovery_naming_a_host_outside_the_ceiling_is_refused(env: Env) -> None:
    """Graph's sites/root answers a webUrl outside ``*.sharepoint.com``: the discovered
    value is checked, the connection refused, nothing stored, nothing sent there."""
    user = f"alice-lying-{secrets.token_hex(3)}"
    env.fake.knobs(graph_web_url="https://evil.example.com")
    with env.fake.browser() as b:
        r = env.begin(b, user, "microsoft")
        assert r.status_code == 302
        r = b.get(env.consent(b, r.headers["location"], user))
    assert r.status_code == 400 and "Connection failed" in r.text, r.text
    [discovery] = [x for x in env.fake.requests(host="graph.microsoft.com",
                                                path="/v1.0/sites/root")
                   if x["credential_user"] == user]
    assert discovery["query"] == {"$select": "webUrl"}
    assert not env.fake.requests(host="evil.example.com")
    assert env.stored(user, "microsoft") is None
    assert env.audit(event="connection.created", user=user, outcome="rejected")


# ---------------------------------------------------------------------------------------
# Refreshes go where the grant says
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("provider", "host", "token_host"), [
    ("salesforce", "acme.my.salesforce.com", "login.salesforce.com"),
    ("shopify", "alice-shop.myshopify.com", "alice-shop.myshopify.com"),
])
def test_refresh_goes_to_the_grants_token_endpoint(env: Env, provider: str, host: str,
                                                   token_host: str) -> None:
    """The session ends at the provider (the API answers 401): one forced refresh, at
    Salesforce's login host, at the user's OWN shop for Shopify (its token_url renders the
    chosen value, refreshes reuse it); 503 token_refreshed, then the retry works on the new
    token; the grant stays active and bound to the same host."""
    user = f"alice-refresh-{secrets.token_hex(3)}"
    params = {"shop": host} if provider == "shopify" else {}
    env.connect(user, provider, **params)
    path = SF_API if provider == "salesforce" else SHOP_API
    assert env.get(user, f"https://{host}{path}?m={_marker()}").status_code == 200
    env.fake.expire(user)
    r = env.get(user, f"https://{host}{path}?m={_marker()}")
    problem = _problem(r.status_code, r.headers.get("content-type"), r.content, expect=503,
                       slug="credential-store-unavailable", reason="token_refreshed")
    assert problem["status"] == 503
    [refresh] = env.fake.requests(kind="token", grant_type="refresh_token", user=user)
    assert (refresh["host"], refresh["status"]) == (token_host, 200)
    assert refresh["client_secret_sent"] is True
    marker = _marker()
    assert env.get(user, f"https://{host}{path}?m={marker}").status_code == 200
    [seen] = _marked(env.fake, marker)
    assert seen["credential_user"] == user and seen["credential_audience"] == host
    _active(env, user, provider)


# ---------------------------------------------------------------------------------------
# Graph and SharePoint from one consent
# ---------------------------------------------------------------------------------------

def _scopes(value: str | None) -> set[str]:
    return set((value or "").split())


def test_graph_and_sharepoint_from_one_consent(env: Env) -> None:
    """One /connect per user: one code exchange (Graph token), the discovery GET with that
    token names the SharePoint host; Graph works; the first SharePoint request redeems the
    grant's refresh token with the SharePoint scope and injects a token for exactly that
    host; the next reuses it; Graph keeps its own token; bob gets fabrikam's the same way;
    one vault record per user."""
    env.ensure("microsoft")
    for user, tenant, sharepoint in (("alice", "contoso", "contoso.sharepoint.com"),
                                     ("bob", "fabrikam", "fabrikam.sharepoint.com")):
        [exchange] = env.fake.requests(kind="token", grant_type="authorization_code",
                                       user=user, host="login.microsoftonline.com")
        assert exchange["path"] == "/organizations/oauth2/v2.0/token"
        assert [d for d in env.fake.requests(host="graph.microsoft.com",
                                             path="/v1.0/sites/root")
                if d["credential_user"] == user]

        marker = _marker()
        r = env.get(user, f"{GRAPH_ME}?m={marker}")
        assert r.status_code == 200
        assert r.json()["userPrincipalName"] == f"{user}@{tenant}.onmicrosoft.com"
        [seen] = _marked(env.fake, marker)
        assert seen["credential_audience"] == "graph.microsoft.com"

        for _ in range(2):
            marker = _marker()
            r = env.get(user, f"https://{sharepoint}{SPO_API}?m={marker}")
            assert r.status_code == 200, r.text
            [seen] = _marked(env.fake, marker)
            assert (seen["credential_user"], seen["credential_audience"]) == (user, sharepoint)
        redeems = [x for x in env.fake.requests(kind="token", grant_type="refresh_token",
                                                user=user)
                   if _scopes(x["scope"]) == {f"https://{sharepoint}/.default",
                                              "offline_access"}]
        assert len(redeems) == 1, "one SharePoint token, then reused"
        assert redeems[0]["host"] == "login.microsoftonline.com"

        marker = _marker()
        assert env.get(user, f"{GRAPH_ME}?m={marker}").status_code == 200
        [seen] = _marked(env.fake, marker)
        assert seen["credential_audience"] == "graph.microsoft.com"

        rows = [x for x in env.listed(user) if x.provider == "microsoft"]
        assert len(rows) == 1 and rows[0].status == "active"
        out = env.cli("connections", "--user", user, "--json")
        assert out.returncode == 0, out.stderr
        lines = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        assert [x["provider"] for x in lines].count("microsoft") == 1


def test_every_redeem_rotates_the_one_refresh_token(env: Env) -> None:
    """Entra answers a new refresh token on every redeem (and keeps the old ones working,
    so only the proxy can tell): the grant keeps the newest whichever resource redeemed it.
    After the tokens expire at the provider, Graph and SharePoint each refresh once, each
    presenting the refresh token the previous redeem returned (never an older one), with
    their own scopes."""
    user = f"alice-rotate-{secrets.token_hex(3)}"
    env.connect(user, "microsoft")
    sp = "contoso.sharepoint.com"
    assert env.get(user, f"https://{sp}{SPO_API}?m={_marker()}").status_code == 200
    env.fake.expire(user)
    for url in (f"{GRAPH_ME}?m={_marker()}", f"https://{sp}{SPO_API}?m={_marker()}"):
        r = env.get(user, url)
        assert r.status_code == 503, r.text
        assert r.json()["reason"] == "token_refreshed"
        assert env.get(user, url.replace("?m=", "?m=retry-")).status_code == 200
    redeems = env.fake.requests(kind="token", grant_type="refresh_token", user=user)
    assert len(redeems) == 3, redeems
    presented = [x["form"]["refresh_token"] for x in redeems]
    assert len(set(presented)) == 3, "each redeem presents the newest refresh token"
    sharepoint = {f"https://{sp}/.default", "offline_access"}
    assert [_scopes(x["scope"]) == sharepoint for x in redeems] == [True, False, True]
    assert not any(sp in (x["scope"] or "") for x in redeems[1:2])
    _active(env, user, "microsoft")


def test_offboarding_removes_the_grant_with_every_resource_token(env: Env) -> None:
    """``credproxy revoke --user`` (offboarding): Salesforce's refresh token is revoked at
    the grant's OWN org (revocation_url renders the stored instance), Shopify and Microsoft
    have no per-grant revocation (said so, counts as done); nothing is left in the vault,
    and the proxy no longer injects anything: not Graph's token, not the SharePoint token
    it held in memory, not Salesforce's."""
    user = f"alice-offboard-{secrets.token_hex(3)}"
    env.connect(user, "salesforce")
    env.connect(user, "shopify", shop="alice-shop.myshopify.com")
    env.connect(user, "microsoft")
    urls = [f"https://acme.my.salesforce.com{SF_API}",
            f"https://alice-shop.myshopify.com{SHOP_API}", GRAPH_ME,
            f"https://contoso.sharepoint.com{SPO_API}"]
    for url in urls:
        assert env.get(user, f"{url}?m={_marker()}").status_code == 200
    refresh = env.stored(user, "salesforce").tokens.refresh_token.reveal()

    done = env.cli("revoke", "--user", user)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no upstream revocation exists for this provider" in done.stdout + done.stderr
    [revoke] = env.fake.requests(kind="revoke")[-1:]
    assert revoke["host"] == "acme.my.salesforce.com"
    assert revoke["form"]["token"] == refresh and revoke["status"] == 200
    assert env.listed(user) == []
    time.sleep(SETTLE)
    for url in urls:
        marker = _marker()
        r = env.get(user, f"{url}?m={marker}")
        _problem(r.status_code, r.headers.get("content-type"), r.content, expect=401,
                 slug="reauth-required", reason="no_connection")
        assert _marked(env.fake, marker) == []


# ---------------------------------------------------------------------------------------
# Metadata: the owning agent's own view, and the operator's
# ---------------------------------------------------------------------------------------

def _listing(r: httpx2.Response) -> dict[str, dict[str, Any]]:
    """``GET /v1/connections``'s entries by provider id (a list, or under
    ``connections``)."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    items = body["connections"] if isinstance(body, dict) else body
    return {item.get("provider", item.get("id")): item for item in items}


MINE = {
    "alice": {"salesforce": "acme.my.salesforce.com", "shopify": "alice-shop.myshopify.com",
              "sharepoint": "contoso.sharepoint.com"},
    "bob": {"salesforce": "globex.my.salesforce.com", "shopify": "bob-shop.myshopify.com",
            "sharepoint": "fabrikam.sharepoint.com"},
}
# What names a user or their tenants: never in another user's view.
WORDS = {"alice": ("alice", "acme", "contoso"), "bob": ("bob", "globex", "fabrikam")}


@pytest.mark.parametrize("user", ["alice", "bob"])
def test_metadata_is_the_owners_and_never_a_token(env: Env, user: str) -> None:
    """The user's context sees their own connections: status, values, the grant's own
    hosts (the SharePoint resource's too), scope, expiry, connect_url; nothing of the
    other user; no token the fake ever issued, no client secret."""
    env.ensure(*PROVIDER_IDS)
    r = env.connections(env.context(user))
    listing = _listing(r)
    assert set(listing) == set(PROVIDER_IDS)
    mine = MINE[user]
    sf, shop, ms = listing["salesforce"], listing["shopify"], listing["microsoft"]
    for pid, entry in listing.items():
        assert entry["status"] == "active", pid
        assert isinstance(entry["expires_at"], int | float) and entry["expires_at"] > time.time()
        assert entry["connect_url"].endswith(f"/connect/{pid}")
    # (the catalog entry adds a value of its own, ``identity``: only ours is pinned here)
    assert sf["values"]["instance"] == mine["salesforce"]
    assert sf["hosts"] == [mine["salesforce"]]
    assert _scopes(sf["scope"]) == {"api", "refresh_token"}
    assert shop["values"] == {"shop": mine["shopify"]}
    assert shop["hosts"] == [mine["shopify"]]
    assert ms["values"] == {"sharepoint": mine["sharepoint"]}
    assert ms["hosts"] == ["graph.microsoft.com"]
    assert mine["sharepoint"] in json.dumps(ms["resources"])
    assert {"User.Read", "Sites.Read.All"} <= _scopes(ms["scope"])

    raw = r.text
    for token in env.fake.tokens():
        assert token not in raw
    assert env.secret not in raw
    for word in WORDS["bob" if user == "alice" else "alice"]:
        assert word not in raw


def test_metadata_lists_only_what_the_context_permits(env: Env) -> None:
    """A context whose ``providers`` claim names only salesforce sees only salesforce."""
    env.ensure("salesforce")
    listing = _listing(env.connections(env.context("alice", providers=["salesforce"])))
    assert set(listing) == {"salesforce"}
    assert listing["salesforce"]["values"]["instance"] == "acme.my.salesforce.com"


def test_metadata_of_a_user_without_connections(env: Env) -> None:
    """Every permitted provider is listed, connected or not: not active, no values, with
    the connect_url that connects it."""
    listing = _listing(env.connections(env.context(f"carol-{secrets.token_hex(3)}")))
    assert set(listing) == set(PROVIDER_IDS)
    for pid, entry in listing.items():
        assert entry["status"] != "active"
        assert not entry.get("values")
        assert entry["connect_url"].endswith(f"/connect/{pid}")


def _context_cases(env: Env, tmp: Path) -> dict[str, tuple[dict[str, str], str]]:
    other_key, _ = write_dev_keys(tmp / "other-keys")  # the same kid, another key
    identity = env.stack.config["identity"]
    forged = mint(sub="alice", issuer=identity["issuer"], audience=identity["audience"],
                  key_file=str(other_key)).reveal()
    assert forged.split(".")[0] == env.context("alice").split(".")[0]
    expired = env.context("alice", now=time.time() - 3600, ttl=300)
    return {
        "missing": ({}, "missing"),
        # Only the header: a context in the query string is not accepted here (it would
        # end up in logs); the request has no context then.
        "in the query": ({"query": env.context("alice")}, "missing"),
        "malformed": ({"X-User-Context": "not-a-jws"}, "malformed"),
        "bad_signature": ({"X-User-Context": forged}, "bad_signature"),
        "expired": ({"X-User-Context": expired}, "expired"),
        "wrong_audience": ({"X-User-Context": mint(
            sub="alice", issuer=identity["issuer"], audience="someone-else",
            key_file=str(env.stack.context_key)).reveal()}, "wrong_audience"),
    }


@pytest.mark.parametrize("case", ["missing", "in the query", "malformed", "bad_signature",
                                  "expired", "wrong_audience"])
def test_metadata_refuses_a_context_that_fails_verification(env: Env, tmp_path: Path,
                                                            case: str) -> None:
    """No context (or one in the query string only), a malformed, a forged, an expired or
    a misaddressed one: 401
    application/problem+json naming the reason; nobody's connections."""
    headers, reason = _context_cases(env, tmp_path)[case]
    query = headers.pop("query", None)
    r = env.connections(headers=headers, query=query)
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    data = r.json()
    assert (data["status"], data["reason"]) == (401, reason), data
    # The spec names no slug; the proxy's own for a missing / rejected user context:
    assert data["type"] in (PROBLEM + "user-context-missing", PROBLEM + "user-context-invalid")
    for word in ("acme", "globex", "alice-shop", "contoso"):
        assert word not in r.text


def test_cli_connections_shows_the_values(env: Env) -> None:
    """``credproxy connections`` (the operator's view) shows each grant's values too,
    never a token."""
    env.ensure(*PROVIDER_IDS)
    out = env.cli("connections", "--user", "alice", "--json")
    assert out.returncode == 0, out.stderr
    rows = {x["provider"]: x for x in map(json.loads, out.stdout.splitlines())}
    assert rows["salesforce"]["values"]["instance"] == "acme.my.salesforce.com"
    assert rows["shopify"]["values"] == {"shop": "alice-shop.myshopify.com"}
    assert rows["microsoft"]["values"] == {"sharepoint": "contoso.sharepoint.com"}
    text = env.cli("connections", "--user", "alice")
    assert text.returncode == 0, text.stderr
    for host in ("acme.my.salesforce.com", "alice-shop.myshopify.com",
                 "contoso.sharepoint.com"):
        assert host in text.stdout
    for token in env.fake.tokens():
        assert token not in out.stdout + text.stdout


# ---------------------------------------------------------------------------------------
# The sweep: everything the fake saw during this module
# ---------------------------------------------------------------------------------------

TOKEN_HOSTS = {"login.salesforce.com", "login.microsoftonline.com",
               "alice-shop.myshopify.com", "bob-shop.myshopify.com"}


def test_no_token_ever_reached_a_host_it_was_not_issued_for(env: Env) -> None:
    """Across every request of this module: each credential the fake recognised arrived at
    the very host it was issued for (never another org, shop or tenant); the client secret
    went to token endpoints only, never to a host outside the ceilings; nothing at all
    reached a trap host."""
    env.ensure(*PROVIDER_IDS)
    seen = env.fake.requests()
    assert [r for r in seen if r["credential_user"] is not None]
    for r in seen:
        if r["credential_user"] is not None:
            assert r["credential_audience"] == r["host"], r
        if r["client_secret_sent"]:  # token endpoints, and the grant's own org's revoke
            assert (r["kind"] == "token" and r["host"] in TOKEN_HOSTS) or (
                r["kind"] == "revoke" and r["host"] == "acme.my.salesforce.com"), r
        assert r["kind"] != "unknown_host", r
    assert not [r for r in seen if r["host"] == "attacker-org.my.salesforce.com"
                or r["host"] == "attacker-shop.myshopify.com"]
