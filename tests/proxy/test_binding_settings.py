"""Provider entries that bind grants to their tenant (docs/tenants.md), validated by
parse_settings: where each kind of grant value may be used, what a value's entry may say,
and the catalog entries that bind (every misuse is a ConfigError naming the key)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from proxy import binding
from proxy.errors import ConfigError
from proxy.hosts import HostPattern
from proxy.settings import ProviderSettings, parse_settings

IDENTITY = {"issuer": "https://platform.example.com", "audience": "credproxy",
            "jwks_file": "/etc/credproxy/jwks.json"}
# One value of every source and shape, to be named by templates.
VALUES: dict[str, Any] = {
    "shop": {"from": "choice", "kind": "host"},
    "realm": {"from": "callback", "param": "realmId"},
    "instance": {"from": "token_response", "field": "instance_url", "kind": "host"},
    "site": {"from": "discovery", "url": "https://api.example.com/me", "field": "site",
             "kind": "host"},
    "sites": {"from": "token_response", "field": "sites.*.id"},
    "identity": {"from": "token_response", "field": "id", "kind": "url", "required": False},
}
BOUND: dict[str, Any] = {
    "id": "bound", "hosts": ["*.example.com"], "client_id": "c", "client_secret_env": "S",
    "authorize_url": "https://login.example.com/authorize",
    "token_url": "https://login.example.com/token",
    "grant_values": VALUES,
}


def parse(*providers: dict[str, Any]) -> list[ProviderSettings]:
    return parse_settings({"identity": IDENTITY,
                           "providers": [copy.deepcopy(p) for p in providers]}).providers


def bound(**overrides: Any) -> dict[str, Any]:
    p = copy.deepcopy(BOUND)
    for key, value in overrides.items():
        if value is None:
            p.pop(key, None)
        else:
            p[key] = value
    return p


def refused(*providers: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as exc:
        parse(*providers)
    return str(exc.value)


def test_the_base_entry_is_accepted() -> None:
    (p,) = parse(bound())
    assert p.bound and set(p.grant_values) == set(VALUES)
    assert p.grant_values["realm"].param == "realmId"
    assert p.grant_values["sites"].many and not p.grant_values["instance"].many
    assert p.grant_values["shop"].user_input and not p.grant_values["site"].user_input


def _place(p: dict[str, Any], key: str, template: str) -> None:
    if key in ("authorize_url", "token_url", "revocation_url", "connect_url"):
        p[key] = template
    elif key == "grant_hosts":
        p["grant_hosts"] = [template]
    elif key == "revocation.console_url":
        p["revocation"] = {"style": "none", "console_url": template}
    elif key.startswith("resources."):
        field = key.split(".")[2].split("[")[0]
        r: dict[str, Any] = {"hosts": ["*.res.example.net"], "scopes": ["s"]}
        r[field] = [template]
        p["resources"] = {"r": r}
    else:  # grant_values.<name>.url: a second discovery value
        p["grant_values"]["probe"] = {"from": "discovery", "url": template, "field": "x"}


# Where each source may be used (docs/tenants.md): (key, template, ok).
USES = [
    ("authorize_url", "https://{shop}/authorize", True),
    ("authorize_url", "https://login.example.com/{realm}/authorize", False),
    ("authorize_url", "https://{instance}/authorize", False),
    ("authorize_url", "https://{site}/authorize", False),
    ("token_url", "https://{shop}/token", True),
    ("token_url", "https://login.example.com/{realm}/token", True),
    ("token_url", "https://{instance}/token", False),
    ("token_url", "https://{site}/token", False),
    ("revocation_url", "https://{instance}/revoke", True),
    ("revocation_url", "https://{site}/revoke", True),
    ("revocation_url", "https://{shop}/revoke?realm={realm}", True),
    ("revocation.console_url", "https://{instance}/setup", True),
    ("connect_url", "https://portal.example.com/{shop}", False),
    ("grant_hosts", "{instance}", True),
    ("grant_hosts", "{site}", True),
    ("grant_hosts", "{shop}", True),
    ("grant_hosts", "api.{realm}.example.com", True),
    ("grant_hosts", "{instance}:8443", True),
    ("resources.r.grant_hosts[0]", "{site}", True),
    ("resources.r.scopes[0]", "https://{site}/.default", True),
    ("resources.r.scopes[0]", "{realm}.read", True),
    ("grant_values.probe.url", "https://{instance}/me", True),
    ("grant_values.probe.url", "https://{shop}/me?realm={realm}", True),
    ("grant_values.probe.url", "https://{site}/me", False),  # a discovery value: not yet
]


@pytest.mark.parametrize(("key", "template", "ok"), USES,
                         ids=[f"{k}-{t}" for k, t, _ in USES])
def test_where_each_source_may_be_used(key: str, template: str, ok: bool) -> None:
    p = bound()
    _place(p, key, template)
    if ok:
        parse(p)
        return
    message = refused(p)
    assert key.split("[")[0] in message
    assert "{" + binding.placeholders(template)[-1] + "}" in message


@pytest.mark.parametrize("key", [
    "authorize_url", "token_url", "revocation_url", "grant_hosts",
    "resources.r.grant_hosts[0]", "resources.r.scopes[0]", "grant_values.probe.url"])
@pytest.mark.parametrize(("name", "says"), [
    ("nope", "is not one of grant_values"),
    ("Shop", "is not one of grant_values"),  # names are case-sensitive
    ("sites", "is a list"),
    ("identity", "is a URL value"),
])
def test_placeholders_that_are_never_usable(key: str, name: str, says: str) -> None:
    p = bound()
    template = {"grant_hosts": "{%s}.example.com", "resources.r.grant_hosts[0]":
                "{%s}.res.example.net"}.get(key, "https://login.example.com/{%s}/x") % name
    _place(p, key, template)
    message = refused(p)
    assert key.split("[")[0] in message and f"{{{name}}}" in message and says in message


def test_a_grant_value_placeholder_in_the_ceiling_is_refused() -> None:
    assert "hosts[0]" in refused(bound(hosts=["{shop}"]))
    assert "hosts[0]" in refused(bound(hosts=["{shop}"], parameters={"unused": "x"},
                                       authorize_url="https://{unused}/a"))


# --- a grant value's own entry ------------------------------------------------------------


@pytest.mark.parametrize("field", [
    "access_token", "refresh_token", "id_token",
    "authed_user.access_token", "data.0.refresh_token", "*.id_token", "a.b.c.access_token",
    # the same member under the spellings providers use
    "accessToken", "AccessToken", "ACCESS_TOKEN", "refreshToken", "refresh-token",
    "idToken", "authed_user.accessToken",
])
def test_a_field_naming_a_token_is_refused(field: str) -> None:
    p = bound()
    p["grant_values"]["leak"] = {"from": "token_response", "field": field}
    message = refused(p)
    assert "grant_values.leak" in message and "names a token" in message


@pytest.mark.parametrize("field", [
    "token_type", "access_token_expires_at", "instance_url", "authed_user.id", "tokens.*.id",
])
def test_fields_near_token_names_are_fine(field: str) -> None:
    p = bound()
    p["grant_values"]["near"] = {"from": "token_response", "field": field}
    assert parse(p)[0].grant_values["near"].field == field


RESERVED = ["state", "code", "scope", "context", "return_to", "error", "error_description",
            "error_uri", "iss", "session_state"]


@pytest.mark.parametrize("source", ["choice", "callback"])
@pytest.mark.parametrize("param", RESERVED)
def test_a_user_input_parameter_the_flow_uses_itself_is_refused(source: str,
                                                                param: str) -> None:
    by_param = bound()
    by_param["grant_values"]["mine"] = {"from": source, "param": param}
    message = refused(by_param)
    assert "grant_values.mine" in message and repr(param) in message
    if param.isidentifier() and param.islower():  # the name is the default parameter
        by_name = bound()
        by_name["grant_values"][param] = {"from": source}
        message = refused(by_name)
        assert f"grant_values.{param}" in message


def test_a_reserved_name_is_fine_for_a_value_that_is_no_parameter() -> None:
    p = bound()
    p["grant_values"]["state"] = {"from": "token_response", "field": "state"}
    assert "state" in parse(p)[0].grant_values


@pytest.mark.parametrize("name", ["Shop", "1shop", "shop-id", "_shop", "shöp", "a" * 64])
def test_grant_value_names(name: str) -> None:
    p = bound()
    p["grant_values"][name] = {"from": "choice", "param": "x"}
    assert "grant_values" in refused(p)


@pytest.mark.parametrize(("entry", "says"), [
    pytest.param({"from": "discovery", "field": "x"}, "needs url", id="discovery-no-url"),
    pytest.param({"from": "discovery", "field": "x", "url": "http://api.example.com/me"},
                 "https", id="discovery-http"),
    pytest.param({"from": "discovery", "field": "x", "url": "ftp://api.example.com/me"},
                 "https", id="discovery-ftp"),
    pytest.param({"from": "discovery", "field": "x", "url": "api.example.com/me"},
                 "https", id="discovery-no-scheme"),
    pytest.param({"from": "discovery", "url": "https://api.example.com/me"}, "needs field",
                 id="discovery-no-field"),
    pytest.param({"from": "token_response"}, "needs field", id="token-response-no-field"),
    pytest.param({"from": "token_response", "field": "x", "param": "x"}, "not param",
                 id="token-response-param"),
    pytest.param({"from": "choice", "field": "x"}, "not field", id="choice-field"),
    pytest.param({"from": "callback", "url": "https://a.example.com/"}, "only for",
                 id="callback-url"),
    pytest.param({"from": "choice", "kind": "host", "pattern": "a+"}, "pattern",
                 id="pattern-on-host"),
    pytest.param({"from": "choice", "allowed": ["*.example.com"]}, "allowed",
                 id="allowed-on-id"),
    pytest.param({"from": "choice", "kind": "host", "allowed": []}, "at least one",
                 id="allowed-empty"),
    pytest.param({"from": "choice", "kind": "host", "allowed": ["*.com"]}, "wildcard",
                 id="allowed-too-wide"),
    pytest.param({"from": "choice", "kind": "host", "allowed": ["a.example.com/x"]},
                 "not a host", id="allowed-path"),
    pytest.param({"from": "choice", "pattern": "(unclosed"}, "regular expression",
                 id="pattern-bad-regex"),
    pytest.param({"from": "header"}, "from", id="unknown-source"),
    pytest.param({"from": "choice", "kind": "email"}, "kind", id="unknown-kind"),
    pytest.param({"from": "choice", "sticky": True}, "unknown key", id="unknown-key"),
    pytest.param({"from": "token_response", "field": "a..b"}, "field", id="field-empty-part"),
    pytest.param({"from": "token_response", "field": "a b"}, "field", id="field-space"),
    pytest.param({"from": "token_response", "field": ".".join("a" * 9)}, "field",
                 id="field-too-deep"),
    pytest.param({"from": "choice", "param": "a&b"}, "param", id="param-ampersand"),
    pytest.param({"from": "choice", "param": ""}, "param", id="param-empty"),
])
def test_bad_value_entries_name_the_value(entry: dict[str, Any], says: str) -> None:
    p = bound()
    p["grant_values"]["odd"] = entry
    message = refused(p)
    assert "grant_values" in message and "odd" in message and says in message


def test_an_http_discovery_url_is_refused_even_with_allow_http() -> None:
    """Discovery sends the new access token: the connect flow only ever sends it over
    https, so a plain-http URL would be a config that can never connect."""
    p = bound(allow_http=True)
    p["grant_values"]["odd"] = {"from": "discovery", "field": "x",
                                "url": "http://api.example.com/me"}
    message = refused(p)
    assert "grant_values.odd.url" in message and "https" in message


# --- grant_hosts, resources -------------------------------------------------------------


@pytest.mark.parametrize(("key", "template"), [
    ("grant_hosts", "*.{shop}"),
    ("grant_hosts", "*.x.{instance}"),
    ("grant_hosts", "{shop}/admin"),
    ("grant_hosts", "https://{shop}"),
    ("grant_hosts", "user@{shop}"),
    ("grant_hosts", "{shop}:99999"),
    ("grant_hosts", "{shop} {instance}"),
    ("grant_hosts", "{shop}?x"),
    ("resources.r.grant_hosts", "*.{site}"),
    ("resources.r.grant_hosts", "{site}/sites"),
])
def test_grant_hosts_must_be_one_exact_host(key: str, template: str) -> None:
    p = bound()
    _place(p, key, template)
    message = refused(p)
    assert f"{key}[0]" in message and repr(template) in message


@pytest.mark.parametrize(("provider_hosts", "resources", "others", "says"), [
    pytest.param(["*.example.com"], {"r": ["*.example.com"]}, [],
                 "resource 'r'", id="resource-repeats-provider"),
    pytest.param(["*.example.com"], {"r": ["*.example.com:443"]}, [],
                 "resource 'r'", id="resource-repeats-provider-port-443"),
    pytest.param(["api.example.com:443"], {"r": ["API.example.com."]}, [],
                 "resource 'r'", id="resource-repeats-provider-spelled-differently"),
    pytest.param(["*.example.com"], {"r": ["*.res.example.net"], "q": ["*.res.example.net"]},
                 [], "'q'", id="two-resources-share-a-host"),
    pytest.param(["*.example.com"], {"r": ["graph.example.org"]}, ["graph.example.org"],
                 "other", id="resource-repeats-another-provider"),
])
def test_a_host_belongs_to_one_unit(provider_hosts: list[str], resources: dict[str, list[str]],
                                    others: list[str], says: str) -> None:
    p = bound(hosts=provider_hosts,
              resources={rid: {"hosts": h, "scopes": ["s"]} for rid, h in resources.items()})
    entries = [p]
    if others:
        entries.append({"id": "other", "hosts": others, "client_id": "c",
                        "client_secret_env": "S", "token_url": "https://l.example.org/t"})
    message = refused(*entries)
    assert "providers[0]" in message or "'bound'" in message
    assert says in message
    assert "'bound' and 'bound'" not in message  # names the resource, not the provider twice


def test_resources_need_hosts_and_scopes() -> None:
    assert "resources.r.scopes" in refused(bound(resources={"r": {"hosts": ["*.r.example.net"],
                                                                  "scopes": []}}))
    assert "resources.r.hosts" in refused(bound(resources={"r": {"scopes": ["s"]}}))
    assert "resources.R" in refused(bound(resources={"R": {"hosts": ["*.r.example.net"],
                                                           "scopes": ["s"]}}))


def test_parameters_and_grant_values_never_share_a_name() -> None:
    message = refused(bound(parameters={"shop": "acme"},
                            authorize_url="https://{shop}/authorize"))
    assert "providers[0].parameters" in message and "'shop'" in message


# --- the catalog entries that bind -------------------------------------------------------


def _catalog(provider: str, **entry: Any) -> dict[str, Any]:
    return {"provider": provider, "client_id": "c", "client_secret_env": "S", **entry}


def test_salesforce_narrowed_to_one_org() -> None:
    (p,) = parse(_catalog("salesforce", hosts=["Acme.My.Salesforce.com"]))
    assert p.hosts == ["acme.my.salesforce.com"] and p.grant_hosts == ["{instance}"]
    assert p.ceiling() == ["acme.my.salesforce.com"]
    assert p.own_hosts(None, {"instance": "acme.my.salesforce.com"}) == \
        [HostPattern("acme.my.salesforce.com")]
    with pytest.raises(binding.BindingError) as exc:
        p.own_hosts(None, {"instance": "globex.my.salesforce.com"})
    assert exc.value.reason == "grant_host_not_allowed"
    spec = p.grant_values["instance"]
    with pytest.raises(binding.BindingError) as exc:
        binding.check_value("instance", spec, "https://globex.my.salesforce.com",
                            ceiling=p.ceiling())
    assert exc.value.reason == "grant_host_not_allowed"
    assert binding.check_value("instance", spec, "https://acme.my.salesforce.com/",
                               ceiling=p.ceiling()) == "acme.my.salesforce.com"
    done = p.for_grant({"instance": "acme.my.salesforce.com"})
    assert done.revocation_url == "https://acme.my.salesforce.com/services/oauth2/revoke"
    assert done.token_url == "https://login.salesforce.com/services/oauth2/token"


def test_salesforce_default_ceiling_and_a_sandbox_login() -> None:
    (p,) = parse(_catalog("salesforce", parameters={"login_host": "test.salesforce.com"}))
    assert p.hosts == ["*.my.salesforce.com"]
    assert p.token_url == "https://test.salesforce.com/services/oauth2/token"
    assert p.own_hosts(None, {"instance": "acme--dev.sandbox.my.salesforce.com"}) == \
        [HostPattern("acme--dev.sandbox.my.salesforce.com")]


def test_shopify_renders_its_endpoints_per_shop() -> None:
    (p,) = parse(_catalog("shopify"))
    assert p.hosts == ["*.myshopify.com"] and p.grant_values["shop"].source == "choice"
    done = p.for_grant({"shop": "acme.myshopify.com"})
    assert done.token_url == "https://acme.myshopify.com/admin/oauth/access_token"
    assert done.authorize_url == "https://acme.myshopify.com/admin/oauth/authorize"
    with pytest.raises(binding.BindingError) as exc:
        p.for_grant({})
    assert exc.value.reason == "grant_value_missing"


def test_microsoft_365_resource_scopes_render_per_grant() -> None:
    (p,) = parse(_catalog("microsoft-365", parameters={"tenant": "contoso.onmicrosoft.com"}))
    assert p.ceiling() == ["graph.microsoft.com", "*.sharepoint.com"]
    values = {"sharepoint": "contoso.sharepoint.com"}
    assert p.resource_scopes("sharepoint", values) == [
        "https://contoso.sharepoint.com/.default", "offline_access"]
    assert p.own_hosts(None, values) is None  # Graph: the provider's one host
    assert p.own_hosts("sharepoint", values) == [HostPattern("contoso.sharepoint.com")]


@pytest.mark.parametrize("entry", [
    pytest.param(_catalog("salesforce", grant_hosts=[]), id="salesforce-unbound"),
    pytest.param(_catalog("salesforce", grant_hosts=[], hosts=["*.my.salesforce.com"]),
                 id="salesforce-unbound-with-a-wildcard-of-ones-own"),
    pytest.param(_catalog("shopify", grant_hosts=[], hosts=["*.myshopify.com"]),
                 id="shopify-unbound-with-a-wildcard-of-ones-own"),
    pytest.param(_catalog("microsoft-365", resources={"sharepoint": {"grant_hosts": []}}),
                 id="sharepoint-resource-unbound"),
    pytest.param(_catalog("microsoft-365", resources={"sharepoint": {
        "grant_hosts": [], "hosts": ["*.sharepoint.com"]}}),
                 id="sharepoint-resource-unbound-with-a-wildcard-of-ones-own"),
])
def test_a_per_tenant_catalog_entry_unbound_never_gets_a_wildcard(entry: dict[str, Any]
                                                                  ) -> None:
    """Any tenant's host would get the user's token (docs/tenants.md: "a catalog entry
    that does not [bind its grants] is never given a wildcard")."""
    message = refused(entry)
    assert "hosts" in message and "wildcard" in message


def test_a_per_tenant_catalog_entry_unbound_to_one_named_host_is_fine() -> None:
    (p,) = parse(_catalog("salesforce", grant_hosts=[], hosts=["acme.my.salesforce.com"]))
    assert p.own_hosts(None, {"instance": "acme.my.salesforce.com"}) is None
    (m,) = parse(_catalog("microsoft-365", resources={"sharepoint": {
        "grant_hosts": [], "hosts": ["contoso.sharepoint.com"]}}))
    assert m.own_hosts("sharepoint", {}) is None
