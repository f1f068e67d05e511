"""The connect flow of providers that bind grants to their tenant (proxy.connect), on real
parts: a real Connector, local vault, memory coordination and audit log, and a scriptable
provider behind real TLS under any host name (tests/proxy/tlsfake.py). Each value is
checked before it is used (a bad one: nothing built, nothing sent, nothing stored, the
rejection audited), and the token goes only where the grant's values say."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from proxy.audit import AuditLog, StdoutSink
from proxy.connect import Connector, ConnectRejected
from proxy.coordination import MemoryCoordinator
from proxy.provider_client import ProviderClient
from proxy.secret import Secret
from proxy.settings import Settings, parse_settings
from proxy.vault.local import LocalVault
from tests.proxy.conftest import live_config
from tests.proxy.oauthfake import Answer, FakeOAuth, Seen
from tests.proxy.tlsfake import serve_tls

KEY = bytes(range(32))
NOW = 1_800_000_000.0
REDIRECT = "https://credproxy.example.com/oauth/callback"
NAMES = ["*.example.test", "*.myshopify.com", "*.my.salesforce.com",
         "*.sharepoint.example.test", "*.tenant.example.test", "*.inst.example.test"]
AT = "at-" + "Zq7" * 20  # the access token every exchange answers: never leaves for a stranger
RT = "rt-" + "Kp4" * 20


def _provider(pid: str, hosts: list[str], **entry: Any) -> dict[str, Any]:
    return {"id": pid, "hosts": hosts, "client_id": f"{pid}-client",
            "client_secret_env": "UNUSED", "token_endpoint_auth_method": "client_secret_post",
            "authorize_url": f"https://login.example.test/{pid}/authorize",
            "token_url": f"https://login.example.test/{pid}/token", "scopes": ["read"],
            **entry}


SETTINGS: Settings = parse_settings({
    "identity": {"issuer": "i", "audience": "a", "hs256_secret_env": "X",
                 "algorithms": ["HS256"]},
    "refresh": {"attempts": 2, "backoff": 0, "timeout": 5},
    "providers": [
        # Shopify: the shop is chosen, echoed on the callback, and names the endpoints.
        _provider("shop", ["*.myshopify.com"],
                  grant_values={"shop": {"from": "choice", "kind": "host"}},
                  grant_hosts=["{shop}"],
                  authorize_url="https://{shop}/admin/oauth/authorize",
                  token_url="https://{shop}/admin/oauth/access_token"),
        # Salesforce: the org's host comes with the token.
        _provider("sf", ["*.my.salesforce.com"],
                  grant_values={"instance": {"from": "token_response", "field": "instance_url",
                                             "kind": "host"},
                                "identity": {"from": "token_response", "field": "id",
                                             "kind": "url", "required": False}},
                  grant_hosts=["{instance}"]),
        # QuickBooks: the company id on the callback, and in the token URL.
        _provider("qb", ["api.example.test"],
                  grant_values={"realm": {"from": "callback", "param": "realmId",
                                          "pattern": "[0-9]{1,20}"}},
                  token_url="https://login.example.test/qb/{realm}/token"),
        # Microsoft 365: SharePoint's host found by a Graph call, bound to a resource.
        _provider("ms", ["graph.example.test"],
                  grant_values={"site": {"from": "discovery", "field": "webUrl", "kind": "host",
                                         "url": "https://graph.example.test/v1.0/sites/root"}},
                  resources={"sp": {"hosts": ["*.sharepoint.example.test"],
                                    "grant_hosts": ["{site}"],
                                    "scopes": ["https://{site}/.default"]}}),
        # A discovery URL whose host, known only per grant, is not the grant's own.
        _provider("leak", ["*.leak.example.test"],
                  grant_values={"instance": {"from": "callback", "param": "instance",
                                             "kind": "host"},
                                "other": {"from": "callback", "param": "other",
                                          "kind": "host"},
                                "me": {"from": "discovery", "field": "id",
                                       "url": "https://{other}/me"}},
                  grant_hosts=["{instance}"]),
        # A discovery URL on the org host the token response named.
        _provider("inst", ["*.inst.example.test"],
                  grant_values={"instance": {"from": "token_response",
                                             "field": "instance_url", "kind": "host"},
                                "user": {"from": "discovery", "field": "user_id",
                                         "url": "https://{instance}/me"}},
                  grant_hosts=["{instance}"]),
        # The grant's host is the discovered tenant; discovery asks a fixed own host.
        _provider("org", ["api2.example.test", "*.tenant.example.test"],
                  grant_values={"tenant": {"from": "discovery", "field": "tenant_host",
                                           "kind": "host",
                                           "url": "https://api2.example.test/me"}},
                  grant_hosts=["api2.example.test", "{tenant}"]),
        # An optional choice the endpoints name.
        _provider("region", ["api3.example.test"],
                  grant_values={"region": {"from": "choice", "pattern": "eu|us",
                                           "required": False}},
                  authorize_url="https://login.example.test/{region}/authorize",
                  token_url="https://login.example.test/{region}/token"),
    ],
})


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@dataclass
class Parts:
    connector: Connector
    vault: LocalVault
    coord: MemoryCoordinator
    fake: FakeOAuth
    audit: io.StringIO

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.getvalue().splitlines()]

    def rejected(self, reason: str) -> dict[str, Any]:
        """The last audit record: a rejection of alice's connection for ``reason``."""
        last = self.records()[-1]
        assert (last["event"], last["outcome"], last["reason"], last["user"]) == (
            "connection.created", "rejected", reason, "alice"), last
        return last

    def hosts(self) -> list[str]:
        return [s.headers.get("host", "") for s in self.fake.seen]

    def carrying_the_token(self) -> list[Seen]:
        return [s for s in self.fake.seen
                if any(AT in v for v in s.headers.values()) or AT.encode() in s.body]


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    clock = Clock()
    async for tls in serve_tls(tmp_path / "pki", NAMES):
        live = live_config(settings=SETTINGS, secrets={
            p.id: Secret(f"{p.id}-s3cret") for p in SETTINGS.providers})
        client = ProviderClient(live, clock=clock)
        await client._transport.aclose()
        client._transport = tls.transport()  # "DNS": every name is the fake
        vault = LocalVault.open(tmp_path / "v.db", KEY, clock=clock)
        coord = MemoryCoordinator(clock)
        out = io.StringIO()
        audit = AuditLog(StdoutSink(out), instance="t/1", fingerprint_key=KEY, clock=clock)
        connector = Connector(live, vault, coord, audit, state_key=KEY, clock=clock,
                              client=client)
        yield Parts(connector, vault, coord, tls.fake, out)
        await connector.aclose()
        await client.aclose()
        await vault.close()


def tokens(**extra: Any) -> Answer:
    return Answer.json(access_token=AT, refresh_token=RT, token_type="Bearer",
                       expires_in=3600, **extra)


async def begin(parts: Parts, provider: str, **choices: str) -> tuple[str, str]:
    """(authorize URL, state) of alice's flow."""
    url = await parts.connector.begin("alice", provider, redirect_uri=REDIRECT,
                                      choices=choices)
    return url, parse_qs(urlsplit(url).query)["state"][0]


async def nothing_stored(parts: Parts) -> None:
    assert await parts.vault.list() == []


def no_token_in_audit(parts: Parts) -> None:
    assert AT not in parts.audit.getvalue() and RT not in parts.audit.getvalue()


# --- choice: checked before anything is built ----------------------------------------------


async def test_a_chosen_shop_names_the_authorize_and_token_urls(parts: Parts) -> None:
    parts.fake.script("/admin/oauth/access_token", tokens(scope="read"))
    url, state = await begin(parts, "shop", shop="Acme.MyShopify.com.")
    assert url.startswith("https://acme.myshopify.com/admin/oauth/authorize?")
    done = await parts.connector.complete({"state": state, "code": "c1",
                                           "shop": "acme.myshopify.com"})
    assert (done.user, done.provider) == ("alice", "shop")
    # The code went to the chosen shop's token endpoint, and nowhere else.
    assert parts.hosts() == ["acme.myshopify.com"]
    (exchange,) = parts.fake.requests("/admin/oauth/access_token")
    assert exchange.form["code"] == "c1" and exchange.form["client_secret"] == "shop-s3cret"
    grant = await parts.vault.get("alice", "shop")
    assert grant is not None and dict(grant.values) == {"shop": "acme.myshopify.com"}
    assert grant.tokens.access_token == Secret(AT)
    last = parts.records()[-1]
    assert last["outcome"] == "connected" and "shop=acme.myshopify.com" in last["detail"]
    no_token_in_audit(parts)


@pytest.mark.parametrize(("choices", "reason"), [
    pytest.param({}, "grant_value_missing", id="no-shop"),
    pytest.param({"shop": ""}, "grant_value_missing", id="empty-shop"),
    pytest.param({"shop": "evil.example.com"}, "grant_host_not_allowed", id="another-site"),
    pytest.param({"shop": "myshopify.com"}, "grant_host_not_allowed", id="bare-suffix"),
    pytest.param({"shop": "acme.myshopify.com.evil.example.com"}, "grant_host_not_allowed",
                 id="suffix-then-more"),
    pytest.param({"shop": "evilmyshopify.com"}, "grant_host_not_allowed",
                 id="suffix-without-dot"),
    pytest.param({"shop": "acme.myshopify.com:8443"}, "grant_host_not_allowed",
                 id="another-port"),
    pytest.param({"shop": "127.0.0.1"}, "grant_host_not_allowed", id="ip"),
    pytest.param({"shop": "*.myshopify.com"}, "grant_value_invalid", id="wildcard"),
    pytest.param({"shop": "evil.example.com/x.myshopify.com"}, "grant_value_invalid",
                 id="path"),
    pytest.param({"shop": "evil.example.com@acme.myshopify.com"}, "grant_value_invalid",
                 id="userinfo"),
    pytest.param({"shop": "evil.example.com#.myshopify.com"}, "grant_value_invalid",
                 id="fragment"),
    pytest.param({"shop": "acme.myshopify.com\r\nX: y"}, "grant_value_invalid", id="crlf"),
    pytest.param({"shop": "javascript:alert(1)"}, "grant_value_invalid", id="javascript"),
    pytest.param({"shop": "http://acme.myshopify.com"}, "grant_value_invalid", id="http"),
])
async def test_a_bad_choice_builds_no_url_and_stores_nothing(parts: Parts,
                                                             choices: dict[str, str],
                                                             reason: str) -> None:
    with pytest.raises(ConnectRejected) as exc:
        await parts.connector.begin("alice", "shop", redirect_uri=REDIRECT, choices=choices)
    assert (exc.value.reason, exc.value.provider, exc.value.user) == (reason, "shop", "alice")
    assert parts.fake.seen == []
    await nothing_stored(parts)
    assert parts.coord._once == {}  # no flow began: no state to finish
    parts.rejected(reason)


async def test_other_query_parameters_are_not_choices(parts: Parts) -> None:
    """The connect link's other parameters (scope, return_to, context) never fill a value."""
    with pytest.raises(ConnectRejected) as exc:
        await parts.connector.begin("alice", "shop", redirect_uri=REDIRECT,
                                    choices={"scope": "acme.myshopify.com",
                                             "context": "acme.myshopify.com"})
    assert exc.value.reason == "grant_value_missing"


async def test_an_optional_choice_the_authorize_url_names_must_be_given(
        parts: Parts) -> None:
    url, _ = await begin(parts, "region", region="eu")
    assert url.startswith("https://login.example.test/eu/authorize?")
    with pytest.raises(ConnectRejected) as exc:  # never a URL with "{region}" in it
        await parts.connector.begin("alice", "region", redirect_uri=REDIRECT, choices={})
    assert exc.value.reason == "grant_value_missing"
    parts.rejected("grant_value_missing")


# --- the callback ----------------------------------------------------------------------


@pytest.mark.parametrize(("echo", "reason"), [
    pytest.param("globex.myshopify.com", "grant_value_mismatch", id="another-shop"),
    pytest.param("https://globex.myshopify.com/", "grant_value_mismatch",
                 id="another-shop-as-url"),
    pytest.param("evil.example.com", "grant_host_not_allowed", id="outside-the-ceiling"),
    pytest.param("", "grant_value_missing", id="empty"),
    pytest.param("acme.myshopify.com/x", "grant_value_invalid", id="not-a-host"),
])
async def test_a_callback_echo_that_differs_is_refused_before_the_exchange(
        parts: Parts, echo: str, reason: str) -> None:
    parts.fake.script("/admin/oauth/access_token", tokens())
    _, state = await begin(parts, "shop", shop="acme.myshopify.com")
    with pytest.raises(ConnectRejected) as exc:
        await parts.connector.complete({"state": state, "code": "c1", "shop": echo})
    assert exc.value.reason == reason
    assert parts.fake.seen == []  # the code was never redeemed
    await nothing_stored(parts)
    parts.rejected(reason)


@pytest.mark.parametrize("echo", ["ACME.myshopify.com", "acme.myshopify.com.",
                                  "https://acme.myshopify.com/admin", None])
async def test_the_same_shop_in_another_spelling_or_no_echo_is_fine(parts: Parts,
                                                                     echo: str | None) -> None:
    parts.fake.script("/admin/oauth/access_token", tokens())
    _, state = await begin(parts, "shop", shop="acme.myshopify.com")
    params = {"state": state, "code": "c1"} | ({"shop": echo} if echo is not None else {})
    await parts.connector.complete(params)
    grant = await parts.vault.get("alice", "shop")
    assert grant is not None and grant.values["shop"] == "acme.myshopify.com"


async def test_a_callback_value_is_checked_and_names_the_token_url(parts: Parts) -> None:
    parts.fake.script("/qb/9130357988888888/token", tokens())
    _, state = await begin(parts, "qb")
    await parts.connector.complete({"state": state, "code": "c1",
                                    "realmId": "9130357988888888"})
    assert [s.path for s in parts.fake.seen] == ["/qb/9130357988888888/token"]
    assert parts.hosts() == ["login.example.test"]
    grant = await parts.vault.get("alice", "qb")
    assert grant is not None and dict(grant.values) == {"realm": "9130357988888888"}


@pytest.mark.parametrize(("realm", "reason"), [
    pytest.param(None, "grant_value_missing", id="absent"),
    pytest.param("", "grant_value_missing", id="empty"),
    pytest.param("12a", "grant_value_invalid", id="not-the-pattern"),
    pytest.param("1" * 21, "grant_value_invalid", id="too-long-for-the-pattern"),
    pytest.param("../../admin", "grant_value_invalid", id="path-traversal"),
    pytest.param("1/../../x", "grant_value_invalid", id="path"),
    pytest.param("1%2f..", "grant_value_invalid", id="percent-encoded"),
    pytest.param("1?x=", "grant_value_invalid", id="query"),
    pytest.param("1 2", "grant_value_invalid", id="space"),
])
async def test_a_bad_callback_value_redeems_nothing(parts: Parts, realm: str | None,
                                                    reason: str) -> None:
    parts.fake.script("/qb/1/token", tokens())
    _, state = await begin(parts, "qb")
    params = {"state": state, "code": "c1"} | ({"realmId": realm} if realm is not None else {})
    with pytest.raises(ConnectRejected) as exc:
        await parts.connector.complete(params)
    assert exc.value.reason == reason
    assert parts.fake.seen == []
    await nothing_stored(parts)
    parts.rejected(reason)


# --- the token response ----------------------------------------------------------------


async def test_a_token_response_value_binds_the_grant(parts: Parts) -> None:
    parts.fake.script("/sf/token", tokens(
        instance_url="https://Acme.my.salesforce.com",
        id="https://login.example.test/id/00D/005"))
    _, state = await begin(parts, "sf")
    await parts.connector.complete({"state": state, "code": "c1"})
    grant = await parts.vault.get("alice", "sf")
    assert grant is not None
    assert dict(grant.values) == {"instance": "acme.my.salesforce.com",
                                  "identity": "https://login.example.test/id/00D/005"}


@pytest.mark.parametrize(("response", "reason"), [
    pytest.param({"instance_url": "https://evil.example.test"}, "grant_host_not_allowed",
                 id="another-site"),
    pytest.param({"instance_url": "https://acme.my.salesforce.com.evil.example.test"},
                 "grant_host_not_allowed", id="suffix-then-more"),
    pytest.param({"instance_url": "https://my.salesforce.com"}, "grant_host_not_allowed",
                 id="bare-suffix"),
    pytest.param({"instance_url": "https://acme.my.salesforce.com:8443"},
                 "grant_host_not_allowed", id="another-port"),
    pytest.param({"instance_url": "https://" + "a" * 60 + "." + "b" * 60 + ".evil.test"},
                 "grant_host_not_allowed", id="long-host-outside"),
    pytest.param({"instance_url": "http://acme.my.salesforce.com"}, "grant_value_invalid",
                 id="plain-http"),
    pytest.param({"instance_url": "https://x@acme.my.salesforce.com"}, "grant_value_invalid",
                 id="userinfo"),
    # a number is read as its decimal text, which the resolver reads as 0.0.0.42
    pytest.param({"instance_url": 42}, "grant_host_not_allowed", id="a-number"),
    pytest.param({"instance_url": True}, "grant_value_missing", id="a-bool"),
    pytest.param({"instance_url": {"host": "acme.my.salesforce.com"}}, "grant_value_missing",
                 id="an-object"),
    pytest.param({"instance_url": ["https://acme.my.salesforce.com"]},
                 "grant_value_missing", id="a-list"),
    pytest.param({}, "grant_value_missing", id="absent"),
    pytest.param({"instance_url": "https://acme.my.salesforce.com", "id": "http://x/"},
                 "grant_value_invalid", id="optional-value-invalid"),
])
async def test_a_token_response_value_outside_the_ceiling_stores_nothing(
        parts: Parts, response: dict[str, Any], reason: str) -> None:
    parts.fake.script("/sf/token", tokens(**response))
    _, state = await begin(parts, "sf")
    with pytest.raises(ConnectRejected) as exc:
        await parts.connector.complete({"state": state, "code": "c1"})
    assert exc.value.reason == reason
    assert AT not in exc.value.detail and len(exc.value.detail) < 400
    assert len(parts.fake.requests("/sf/token")) == 1
    await nothing_stored(parts)
    parts.rejected(reason)
    no_token_in_audit(parts)


async def test_a_token_response_value_never_steers_discovery_outside(parts: Parts) -> None:
    """The discovery URL is rendered from the org host the token response named; an org
    host outside the ceiling is refused before anything is sent there."""
    parts.fake.script("/inst/token", tokens(instance_url="https://evil.example.test"))
    parts.fake.script("/me", Answer.json(user_id="u1"))
    _, state = await begin(parts, "inst")
    with pytest.raises(ConnectRejected) as exc:
        await parts.connector.complete({"state": state, "code": "c1"})
    assert exc.value.reason == "grant_host_not_allowed"
    assert parts.hosts() == ["login.example.test"]
    assert parts.carrying_the_token() == []
    await nothing_stored(parts)


async def test_discovery_on_the_grants_own_host(parts: Parts) -> None:
    parts.fake.script("/inst/token", tokens(instance_url="https://acme.inst.example.test"))
    parts.fake.script("/me", Answer.json(user_id="u1"))
    _, state = await begin(parts, "inst")
    await parts.connector.complete({"state": state, "code": "c1"})
    (call,) = parts.fake.requests("/me")
    assert call.method == "GET" and call.headers["host"] == "acme.inst.example.test"
    assert call.headers["authorization"] == f"Bearer {AT}"
    grant = await parts.vault.get("alice", "inst")
    assert grant is not None
    assert dict(grant.values) == {"instance": "acme.inst.example.test", "user": "u1"}


# --- discovery ---------------------------------------------------------------------------


async def test_discovery_binds_a_resource(parts: Parts) -> None:
    parts.fake.script("/ms/token", tokens())
    parts.fake.script("/v1.0/sites/root",
                      Answer.json(webUrl="https://contoso.sharepoint.example.test"))
    _, state = await begin(parts, "ms")
    await parts.connector.complete({"state": state, "code": "c1"})
    (call,) = parts.fake.requests("/v1.0/sites/root")
    assert call.headers["host"] == "graph.example.test"
    assert call.headers["authorization"] == f"Bearer {AT}"
    grant = await parts.vault.get("alice", "ms")
    assert grant is not None
    assert dict(grant.values) == {"site": "contoso.sharepoint.example.test"}
    assert grant.resources == {}  # the resource's token comes on its first request


async def test_a_discovery_url_outside_the_providers_hosts_is_never_called(
        parts: Parts) -> None:
    """The grant is bound to acme; the discovery URL names another host under the
    ceiling (a value of the callback): the token never goes there. (A static discovery
    URL outside the provider's hosts is a config error: test_binding_settings.)"""
    parts.fake.script("/leak/token", tokens())
    parts.fake.script("/me", Answer.json(id="u1"))
    _, state = await begin(parts, "leak")
    with pytest.raises(ConnectRejected) as exc:
        await parts.connector.complete({"state": state, "code": "c1",
                                        "instance": "acme.leak.example.test",
                                        "other": "evil.leak.example.test"})
    assert exc.value.reason == "grant_host_not_allowed"
    assert "nothing was sent" in exc.value.detail
    assert parts.hosts() == ["login.example.test"]  # only the code exchange
    assert parts.fake.requests("/me") == []
    assert parts.carrying_the_token() == []
    assert await parts.vault.list() == []
    parts.rejected("grant_host_not_allowed")


@pytest.mark.parametrize(("answers", "calls", "reason", "says"), [
    pytest.param([Answer(500, b"")], 2, "discovery_failed", "failed after 2 attempts",
                 id="500-after-retries"),
    pytest.param([Answer(503, b""), Answer(503, b"")], 2, "discovery_failed", "HTTP 503",
                 id="503-twice"),
    pytest.param([Answer(429, b"")], 2, "discovery_failed", "HTTP 429", id="429"),
    pytest.param([Answer(404, b"")], 1, "discovery_failed", "HTTP 404", id="404"),
    pytest.param([Answer(401, b"")], 1, "discovery_failed", "HTTP 401", id="401"),
    pytest.param([Answer(200, b"<html>hi</html>", "text/html")], 1, "discovery_failed",
                 "did not answer JSON", id="not-json"),
    pytest.param([Answer(200, b"")], 1, "discovery_failed", "did not answer JSON",
                 id="empty-body"),
    pytest.param([Answer.json(value=[])], 1, "grant_value_missing", "webUrl",
                 id="json-without-the-field"),
    pytest.param([Answer(200, b"[]")], 1, "grant_value_missing", "webUrl", id="json-list"),
    pytest.param([Answer.json(webUrl="https://evil.example.test")], 1,
                 "grant_host_not_allowed", "evil.example.test", id="host-outside"),
    pytest.param([Answer.json(webUrl="https://sharepoint.example.test")], 1,
                 "grant_host_not_allowed", "sharepoint", id="bare-suffix"),
    # Inside the provider's whole ceiling, but not the resource's: never its grant host.
    pytest.param([Answer.json(webUrl="https://graph.example.test")], 1,
                 "grant_host_not_allowed", "graph.example.test", id="the-providers-host"),
    pytest.param([Answer.json(webUrl="https://contoso.sharepoint.example.test:8443/")], 1,
                 "grant_host_not_allowed", ":8443", id="another-port"),
    pytest.param([Answer.json(webUrl="https://*.sharepoint.example.test")], 1,
                 "grant_value_invalid", "'site'", id="wildcard"),
])
async def test_discovery_failures_store_nothing(parts: Parts, answers: list[Answer],
                                                calls: int, reason: str, says: str) -> None:
    parts.fake.script("/ms/token", tokens())
    parts.fake.script("/v1.0/sites/root", *answers)
    _, state = await begin(parts, "ms")
    with pytest.raises(ConnectRejected) as exc:
        await parts.connector.complete({"state": state, "code": "c1"})
    assert exc.value.reason == reason
    assert says in exc.value.detail and AT not in exc.value.detail
    assert len(parts.fake.requests("/v1.0/sites/root")) == calls
    assert await parts.vault.list() == []
    parts.rejected(reason)
    no_token_in_audit(parts)


async def test_a_discovery_redirect_is_not_followed(parts: Parts) -> None:
    """A 3xx elsewhere would carry the token there: the answer is a failure instead."""
    parts.fake.script("/ms/token", tokens())
    parts.fake.script("/v1.0/sites/root", Answer(302, b"", None))
    parts.fake.answers["/v1.0/sites/root"] = [Answer(302, b"", None)]
    _, state = await begin(parts, "ms")
    with pytest.raises(ConnectRejected) as exc:
        await parts.connector.complete({"state": state, "code": "c1"})
    assert exc.value.reason == "discovery_failed"
    assert [s.path for s in parts.fake.seen] == ["/ms/token", "/v1.0/sites/root"]


async def test_a_grant_host_found_by_discovery(parts: Parts) -> None:
    """grant_hosts may name a discovered value (docs/tenants.md: any value read before
    them); discovery itself asks one of the grant's hosts known already."""
    parts.fake.script("/org/token", tokens())
    parts.fake.script("/me", Answer.json(tenant_host="acme.tenant.example.test"))
    _, state = await begin(parts, "org")
    await parts.connector.complete({"state": state, "code": "c1"})
    (call,) = parts.fake.requests("/me")
    assert call.headers["host"] == "api2.example.test"
    grant = await parts.vault.get("alice", "org")
    assert grant is not None and dict(grant.values) == {"tenant": "acme.tenant.example.test"}
    provider = SETTINGS.provider("org")
    assert [str(h) for h in provider.own_hosts(None, grant.values) or []] == [
        "api2.example.test", "acme.tenant.example.test"]


async def test_a_discovered_grant_host_outside_the_ceiling_stores_nothing(
        parts: Parts) -> None:
    parts.fake.script("/org/token", tokens())
    parts.fake.script("/me", Answer.json(tenant_host="evil.example.test"))
    _, state = await begin(parts, "org")
    with pytest.raises(ConnectRejected) as exc:
        await parts.connector.complete({"state": state, "code": "c1"})
    assert exc.value.reason == "grant_host_not_allowed"
    assert await parts.vault.list() == []
