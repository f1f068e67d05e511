"""The per-request decision for providers that bind grants to their tenant (the sidecar's
own-host check, proxy.sidecar), on a real local vault and verifier, without mitmproxy:
routing matches the ceiling, and the credential goes only to the grant's own hosts,
rendered from its stored values with the running config. Every other destination under
the ceiling is a 403 ``not_grant_host`` naming the grant's hosts, and nothing is injected.
(The same through a real ``credproxy run``: tests/integration/test_tenants.py.)"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.audit import AuditLog
from proxy.binding import BindingError
from proxy.connect import imported_values
from proxy.coordination import MemoryCoordinator
from proxy.errors import ProviderNotPermitted, ReauthRequired
from proxy.identity import IdentityVerifier, KeySource
from proxy.metrics import Metrics
from proxy.provider_client import ProviderClient
from proxy.routes import Destination
from proxy.secret import Secret
from proxy.settings import ProviderSettings, RefreshSettings, Settings
from proxy.sidecar import Injection, Outbound, Passthrough, Sidecar
from proxy.tokens import TokenBroker
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant
from proxy.vault.local import LocalVault
from tests.proxy.oauthfake import Answer, serve

from .conftest import NOW, Clock, Keys, MakeContext, RecordingSink, identity_settings, live_config

USER = "alice@example.com"
_COMMON: dict[str, Any] = {"client_id": "c", "token_endpoint_auth_method": "none",
                           "token_url": "https://login.example.com/token"}
SHOP = ProviderSettings.model_validate({
    "id": "shop", "hosts": ["*.myshopify.com"], **_COMMON,
    "grant_values": {"shop": {"from": "choice", "kind": "host"}},
    "grant_hosts": ["{shop}"],
    "inject": {"header": "X-Shopify-Access-Token", "format": "{access_token}"}})
MS = ProviderSettings.model_validate({
    "id": "ms", "hosts": ["graph.example.com"], **_COMMON,
    "grant_values": {"site": {"from": "discovery", "field": "webUrl", "kind": "host",
                              "url": "https://graph.example.com/sites/root"}},
    "resources": {"sp": {"hosts": ["*.sharepoint.com"], "grant_hosts": ["{site}"],
                         "scopes": ["https://{site}/.default"]}}})
ORG = ProviderSettings.model_validate({
    "id": "org", "hosts": ["*.my.salesforce.com", "*.my.salesforce.com:8443"], **_COMMON,
    "grant_values": {"instance": {"from": "token_response", "field": "instance_url",
                                  "kind": "host"},
                     "region": {"from": "choice", "pattern": "eu|us", "required": False}},
    "grant_hosts": ["{instance}", "{instance}:8443"]})




@pytest.fixture
async def vault(tmp_path: Path) -> AsyncIterator[LocalVault]:
    v = LocalVault.open(tmp_path / "vault.db", bytes(range(32)), clock=lambda: NOW)
    yield v
    await v.close()


def make_sidecar(vault: LocalVault, keys: Keys, sink: RecordingSink,
                 *providers: ProviderSettings) -> tuple[Sidecar, ProviderClient]:
    settings = Settings(identity=identity_settings(), providers=list(providers),
                        public_url="https://admin", refresh=RefreshSettings(attempts=1))
    verifier = IdentityVerifier(settings.identity, KeySource(keys.public_set()), clock=Clock())
    live = live_config(settings=settings, verifier=verifier)
    refresher = ProviderClient(live)
    broker = TokenBroker(vault, MemoryCoordinator(), refresher, live, metrics=Metrics(),
                         clock=lambda: NOW)
    audit = AuditLog(sink, instance="test/1", fingerprint_key=b"k" * 32, clock=lambda: NOW)
    return Sidecar(live, broker, audit), refresher


@pytest.fixture
async def sidecar(vault: LocalVault, keys: Keys) -> AsyncIterator[tuple[Sidecar, RecordingSink]]:
    sink = RecordingSink()
    side, refresher = make_sidecar(vault, keys, sink, SHOP, MS, ORG)
    yield side, sink
    await refresher.aclose()


def tokens(access: str) -> TokenSet:
    return TokenSet(Secret(access), None, expires_at=NOW + 3600)


async def connect_all(vault: LocalVault) -> None:
    await vault.put(Grant(USER, "shop", tokens("shop-at"),
                          values={"shop": "acme.myshopify.com"}))
    await vault.put(Grant(USER, "ms", tokens("graph-at"),
                          values={"site": "contoso.sharepoint.com"},
                          resources={"sp": tokens("sp-at")}))
    await vault.put(Grant(USER, "org", tokens("org-at"),
                          values={"instance": "acme.my.salesforce.com"}))


def out(host: str, token: str, port: int = 443) -> Outbound:
    authority = host if port == 443 else f"{host}:{port}"
    return Outbound(id="r1", method="GET", destination=Destination(host, port, tls=True),
                    host_header=authority, path="/", context_token=Secret(token))


@pytest.mark.parametrize(("host", "port", "header", "value"), [
    ("acme.myshopify.com", 443, "X-Shopify-Access-Token", "shop-at"),
    ("graph.example.com", 443, "Authorization", "Bearer graph-at"),
    ("contoso.sharepoint.com", 443, "Authorization", "Bearer sp-at"),
    ("acme.my.salesforce.com", 443, "Authorization", "Bearer org-at"),
])
async def test_the_grants_own_hosts_get_its_credential(
        sidecar: tuple[Sidecar, RecordingSink], vault: LocalVault, make_context: MakeContext,
        host: str, port: int, header: str, value: str) -> None:
    await connect_all(vault)
    decision = await sidecar[0].decide(out(host, make_context(), port))
    assert isinstance(decision, Injection)
    assert (decision.header, decision.value.reveal()) == (header, value)


@pytest.mark.parametrize(("host", "port", "names"), [
    ("globex.myshopify.com", 443, "acme.myshopify.com"),
    ("acme.myshopify.com.myshopify.com", 443, "acme.myshopify.com"),
    ("a.acme.myshopify.com", 443, "acme.myshopify.com"),
    ("fabrikam.sharepoint.com", 443, "contoso.sharepoint.com"),
    ("contoso-my.sharepoint.com", 443, "contoso.sharepoint.com"),
    ("globex.my.salesforce.com", 443, "acme.my.salesforce.com"),
])
async def test_another_tenants_host_under_the_ceiling_gets_nothing(
        sidecar: tuple[Sidecar, RecordingSink], vault: LocalVault, make_context: MakeContext,
        host: str, port: int, names: str) -> None:
    await connect_all(vault)
    side, sink = sidecar
    with pytest.raises(ProviderNotPermitted) as exc:
        await side.decide(out(host, make_context(), port))
    assert (exc.value.status, exc.value.reason) == (403, "not_grant_host")
    assert names in exc.value.detail and "no credential was sent" in exc.value.detail
    for secret in ("shop-at", "graph-at", "sp-at", "org-at"):
        assert secret not in exc.value.detail
    record = json.loads(sink.lines[-1])
    assert (record["event"], record["reason"], record["user"]) == (
        "credential.denied", "not_grant_host", USER)
    # Nothing happened to any grant.
    assert {g.provider: g.status.value for g in await vault.list(USER)} == {
        "shop": "active", "ms": "active", "org": "active"}


async def test_ports(sidecar: tuple[Sidecar, RecordingSink], vault: LocalVault,
                     make_context: MakeContext) -> None:
    """A grant host with a port (``{instance}:8443``) is its own host on that port only; a
    ceiling without a port does not route another port at all (unrouted: no credential)."""
    await connect_all(vault)
    side = sidecar[0]
    own = await side.decide(out("acme.my.salesforce.com", make_context(), 8443))
    assert isinstance(own, Injection) and own.value.reveal() == "Bearer org-at"
    with pytest.raises(ProviderNotPermitted) as exc:
        await side.decide(out("globex.my.salesforce.com", make_context(), 8443))
    assert exc.value.reason == "not_grant_host"
    assert "acme.my.salesforce.com:8443" in exc.value.detail
    assert isinstance(await side.decide(out("acme.myshopify.com", make_context(), 8443)),
                      Passthrough)


async def test_a_narrowed_ceiling_applies_to_stored_grants_at_once(
        vault: LocalVault, keys: Keys, make_context: MakeContext) -> None:
    """The values are stored, not the hosts: a config that narrows ``hosts`` refuses a
    grant whose host it no longer covers, on its next request."""
    await connect_all(vault)
    narrowed = SHOP.model_copy(update={"hosts": ["globex.myshopify.com"]})
    side, refresher = make_sidecar(vault, keys, RecordingSink(), narrowed)
    try:
        with pytest.raises(ReauthRequired) as exc:
            await side.decide(out("globex.myshopify.com", make_context()))
        assert exc.value.reason == "grant_host_not_allowed"
        assert "shop-at" not in exc.value.detail
    finally:
        await refresher.aclose()


async def test_a_grant_without_the_value_its_hosts_need_is_reauth(
        sidecar: tuple[Sidecar, RecordingSink], vault: LocalVault,
        make_context: MakeContext) -> None:
    await vault.put(Grant(USER, "shop", tokens("shop-at"), values={}))
    await vault.put(Grant(USER, "org", tokens("org-at"),
                          values={"instance": "*.my.salesforce.com"}))  # never valid
    with pytest.raises(ReauthRequired) as missing:
        await sidecar[0].decide(out("acme.myshopify.com", make_context()))
    assert (missing.value.reason, missing.value.status) == ("grant_value_missing", 401)
    # The link leads back to the shop the request was for (checked again when opened).
    assert missing.value.connect_url == "https://admin/connect/shop?shop=acme.myshopify.com"
    with pytest.raises(ReauthRequired) as invalid:
        await sidecar[0].decide(out("acme.my.salesforce.com", make_context()))
    assert invalid.value.reason == "grant_value_invalid"


# --- imported token sets (credproxy vault put --value) --------------------------------------


def test_imported_values_are_checked_like_connected_ones() -> None:
    assert imported_values(SHOP, {"shop": "ACME.myshopify.com"}, {}) == {
        "shop": "acme.myshopify.com"}
    # The values of the grant it replaces are kept: a new token set keeps its tenant...
    assert imported_values(SHOP, {}, {"shop": "acme.myshopify.com"}) == {
        "shop": "acme.myshopify.com"}
    # ...unless a value is given again.
    assert imported_values(SHOP, {"shop": "globex.myshopify.com"},
                           {"shop": "acme.myshopify.com"}) == {"shop": "globex.myshopify.com"}
    assert imported_values(ORG, {"instance": "https://acme.my.salesforce.com/",
                                 "region": "eu"}, {}) == {
        "instance": "acme.my.salesforce.com", "region": "eu"}


@pytest.mark.parametrize(("provider", "given", "kept", "reason"), [
    pytest.param(SHOP, {"shop": "evil.example.com"}, {}, "grant_host_not_allowed",
                 id="outside-the-ceiling"),
    pytest.param(SHOP, {"shop": "*.myshopify.com"}, {}, "grant_value_invalid",
                 id="wildcard"),
    pytest.param(SHOP, {"store": "acme.myshopify.com"}, {}, "grant_value_invalid",
                 id="a-name-the-provider-does-not-have"),
    pytest.param(SHOP, {}, {}, "grant_value_missing", id="nothing-to-bind-to"),
    pytest.param(SHOP, {"shop": ""}, {}, "grant_value_missing", id="empty"),
    pytest.param(ORG, {"instance": "acme.my.salesforce.com", "region": "mars"}, {},
                 "grant_value_invalid", id="pattern"),
    pytest.param(MS, {"site": "evil.example.com"}, {}, "grant_host_not_allowed",
                 id="resource-host-outside"),
    pytest.param(MS, {}, {}, "grant_value_missing", id="resource-needs-its-value"),
])
def test_imported_values_refused(provider: ProviderSettings, given: dict[str, str],
                                 kept: dict[str, str], reason: str) -> None:
    with pytest.raises(BindingError) as exc:
        imported_values(provider, given, kept)
    assert exc.value.reason == reason


@pytest.mark.parametrize(("provider", "host", "grant"), [
    pytest.param(MS, "fabrikam.sharepoint.com",
                 Grant(USER, "ms", TokenSet(Secret("graph-at"), Secret("rt-1"),
                                            expires_at=NOW + 3600),
                       values={"site": "contoso.sharepoint.com"}),
                 id="a-resource-token-not-obtained-yet"),
    pytest.param(SHOP, "globex.myshopify.com",
                 Grant(USER, "shop", TokenSet(Secret("shop-at"), Secret("rt-1"),
                                              expires_at=NOW - 1),
                       values={"shop": "acme.myshopify.com"}),
                 id="an-expired-token"),
])
async def test_another_tenants_host_never_makes_the_grant_refresh(
        vault: LocalVault, keys: Keys, make_context: MakeContext,
        provider: ProviderSettings, host: str, grant: Grant) -> None:
    """The refusal is the same whatever state the grant's tokens are in: no token request
    (no refresh token rotated, no error of the token endpoint's instead of the 403) for a
    destination the credential could never go to."""
    async for fake in serve():
        fake.script("/token", Answer.json(access_token="new-at", refresh_token="rt-2",
                                          expires_in=3600))
        local = provider.model_copy(update={"token_url": f"{fake.base}/token",
                                            "allow_http": True})
        side, refresher = make_sidecar(vault, keys, RecordingSink(), local)
        try:
            await vault.put(grant)
            with pytest.raises(ProviderNotPermitted) as exc:
                await side.decide(out(host, make_context()))
            assert exc.value.reason == "not_grant_host"
            assert fake.seen == []
            stored = await vault.get(USER, provider.id)
            assert stored is not None and stored.tokens.refresh_token == Secret("rt-1")
        finally:
            await refresher.aclose()
