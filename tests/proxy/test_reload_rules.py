"""Reload rules in the core: which reloads remove providers (proxy.app), and the hosts of
removed providers staying refused (proxy.routes). Through real Settings and Routers; the
end-to-end behaviour is tests/integration/test_reload_safety.py."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.app import refuse_provider_removal
from proxy.errors import ConfigError, UnroutedDenied
from proxy.routes import Destination, Router, refuse_retired
from proxy.settings import Settings, parse_settings


def _settings(*hosts: tuple[str, list[str]], **top: Any) -> Settings:
    return parse_settings({
        "identity": {"issuer": "i", "audience": "a", "jwks_file": "j.json"},
        "providers": [{"id": pid, "hosts": h, "token_url": "https://t.example.com/token",
                       "client_id": "c", "token_endpoint_auth_method": "none"}
                      for pid, h in hosts],
        **top,
    })


OLD = _settings(("docs", ["docs.example.com", "*.docs.example.com"]),
                ("graph", ["graph.example.com"]))


@pytest.mark.parametrize("new,message", [
    pytest.param(_settings(), "removes provider 'docs'; provider 'graph' (0 providers left)",
                 id="none-left"),
    pytest.param(_settings(("graph", ["graph.example.com"])), "removes provider 'docs' ",
                 id="one-removed"),
    pytest.param(_settings(("docs", ["docs.example.com"]), ("graph", ["graph.example.com"])),
                 "removes host *.docs.example.com of provider 'docs'", id="host-removed"),
    pytest.param(_settings(("documents", ["docs.example.com", "*.docs.example.com"]),
                           ("graph", ["graph.example.com"])),
                 "removes provider 'docs'", id="renamed"),
    pytest.param(_settings(("graph", ["graph.example.com"]),
                           reload={"allow_provider_removal": ["graph"]}),
                 "removes provider 'docs' ", id="allowed-the-wrong-one"),
])
def test_a_removal_is_refused_naming_it_and_the_key_to_allow_it(new: Settings,
                                                                message: str) -> None:
    with pytest.raises(ConfigError, match="allow_provider_removal: \\[") as e:
        refuse_provider_removal(OLD, new)
    assert message in str(e.value)


@pytest.mark.parametrize("new", [
    pytest.param(OLD, id="unchanged"),
    pytest.param(_settings(("docs", ["docs.example.com", "*.docs.example.com", "d.example.org"]),
                           ("graph", ["graph.example.com"]), ("new", ["new.example.com"])),
                 id="added"),
    pytest.param(_settings(("docs", ["docs.example.com"]),
                           ("graph", ["graph.example.com", "*.docs.example.com"])),
                 id="host-moved-to-another-provider"),
    pytest.param(_settings(reload={"allow_provider_removal": ["docs", "graph"]}),
                 id="all-removed-on-purpose"),
])
def test_reloads_that_remove_nothing_or_say_so_pass(new: Settings) -> None:
    refuse_provider_removal(OLD, new)


def _dest(host: str, port: int = 443) -> Destination:
    return Destination(host, port, tls=True)


def test_removed_hosts_are_refused_until_listed_again() -> None:
    router = Router(OLD.providers)
    removed = _settings(("graph", ["graph.example.com"]))
    after = router.after_reload(OLD.providers, removed.providers)
    assert after.match(_dest("docs.example.com")) is None
    for host in ("docs.example.com", "a.b.docs.example.com"):
        with pytest.raises(UnroutedDenied, match="provider 'docs', which a config reload "
                                                 "removed") as e:
            refuse_retired(after, _dest(host))
        assert e.value.reason == "provider_removed"
    refuse_retired(after, _dest("docs.example.com", 8443))  # another port: never a provider
    refuse_retired(after, _dest("graph.example.com"))  # routed: not the unrouted rule's case
    refuse_retired(after, _dest("elsewhere.example.com"))
    # A second reload keeps what earlier ones retired.
    added = _settings(("graph", ["graph.example.com"]), ("x", ["x.example.com"]))
    later = after.after_reload(removed.providers, added.providers)
    with pytest.raises(UnroutedDenied):
        refuse_retired(later, _dest("docs.example.com"))
    # Listing a host again routes it, and it is no longer retired; the rest stays retired.
    back = later.after_reload(added.providers, _settings(("docs", ["docs.example.com"]),
                                                         ("graph", ["graph.example.com"])
                                                         ).providers)
    assert back.match(_dest("docs.example.com")) is not None
    refuse_retired(back, _dest("docs.example.com"))
    with pytest.raises(UnroutedDenied):
        refuse_retired(back, _dest("a.docs.example.com"))
    assert [(p.id, p.hosts) for p in back.retired] == [("docs", ["*.docs.example.com"]),
                                                        ("x", ["x.example.com"])]


# --- guards a file cut short would relax (its trailing keys gone, their defaults looser) ---

def _guarded(methods: list[str] | None = None, **top: Any) -> Settings:
    provider: dict[str, Any] = {"id": "raw", "hosts": ["raw.example.com"],
                                "token_url": "https://t.example.com/token", "client_id": "c",
                                "token_endpoint_auth_method": "none"}
    if methods is not None:
        provider["methods"] = methods
    return parse_settings({"identity": {"issuer": "i", "audience": "a", "jwks_file": "j.json",
                                        **top.pop("identity", {})},
                           "providers": [provider], **top})


GUARDED = _guarded(["GET"], unrouted="deny", identity={"one_time_jti": True})


@pytest.mark.parametrize(("new", "relaxed"), [
    pytest.param(_guarded(["GET"], identity={"one_time_jti": True}), "unrouted",
                 id="unrouted-deny-dropped"),
    pytest.param(_guarded(["GET"], unrouted="deny"), "identity.one_time_jti",
                 id="one-time-jti-dropped"),
    pytest.param(_guarded(None, unrouted="deny", identity={"one_time_jti": True}),
                 "providers.raw.methods", id="methods-dropped"),
    pytest.param(_guarded(["GET", "DELETE"], unrouted="deny", identity={"one_time_jti": True}),
                 "providers.raw.methods", id="methods-widened"),
    pytest.param(_guarded(None, unrouted="deny", identity={"one_time_jti": True},
                          reload={"allow_loosening": ["unrouted"]}),
                 "providers.raw.methods", id="allowed-the-wrong-one"),
])
def test_a_reload_that_relaxes_a_guard_is_refused(new: Settings, relaxed: str) -> None:
    from proxy.app import refuse_loosening

    with pytest.raises(ConfigError, match="allow_loosening") as e:
        refuse_loosening(GUARDED, new)
    assert relaxed in str(e.value)


@pytest.mark.parametrize("new", [
    pytest.param(GUARDED, id="unchanged"),
    pytest.param(_guarded([], unrouted="deny", identity={"one_time_jti": True}),
                 id="methods-narrowed"),
    pytest.param(_guarded(None, identity={"one_time_jti": False},
                          reload={"allow_loosening": ["unrouted", "identity.one_time_jti",
                                                      "providers.raw.methods"]}),
                 id="all-relaxed-on-purpose"),
])
def test_reloads_that_keep_or_tighten_guards_pass(new: Settings) -> None:
    from proxy.app import refuse_loosening

    refuse_loosening(GUARDED, new)


# --- a provider that binds its grants to their tenant (docs/tenants.md) ---------------------

def _bound(grant_hosts: bool = True, resource_bound: bool = True, **top: Any) -> Settings:
    """A Salesforce-like provider bound by its grant's instance, with a bound resource."""
    provider: dict[str, Any] = {
        "id": "crm", "hosts": ["*.crm.example.com"], "client_id": "c",
        "token_url": "https://login.crm.example.com/token",
        "token_endpoint_auth_method": "none",
        "grant_values": {"instance": {"from": "token_response", "field": "instance_url",
                                      "kind": "host"}},
        "resources": {"files": {"hosts": ["*.files.example.com"], "scopes": ["files"]}}}
    if grant_hosts:
        provider["grant_hosts"] = ["{instance}"]
    if resource_bound:
        provider["resources"]["files"]["grant_hosts"] = ["files-{instance}"]
    return parse_settings({"identity": {"issuer": "i", "audience": "a", "jwks_file": "j.json"},
                           "providers": [provider], **top})


@pytest.mark.parametrize(("new", "refused"), [
    pytest.param(_bound(), None, id="unchanged"),
    pytest.param(_bound(grant_hosts=False), "providers.crm.grant_hosts", id="unbound"),
    pytest.param(_bound(resource_bound=False), "providers.crm.grant_hosts",
                 id="resource-unbound"),
    pytest.param(_bound(grant_hosts=False, reload={
        "allow_loosening": ["providers.crm.grant_hosts"]}), None, id="unbound-on-purpose"),
])
def test_a_reload_that_stops_binding_grants_is_refused(new: Settings,
                                                       refused: str | None) -> None:
    """A file cut short before ``grant_hosts`` would send every user's token to every host
    under the ceiling: refused unless the file says so."""
    from proxy.app import refuse_loosening

    if refused is None:
        refuse_loosening(_bound(), new)
        return
    with pytest.raises(ConfigError, match="allow_loosening") as e:
        refuse_loosening(_bound(), new)
    assert refused in str(e.value)


def test_resource_hosts_removed_by_a_reload_stay_refused() -> None:
    """A resource's hosts count as the provider's: removing them is a removal."""
    old = _bound()
    new = parse_settings({"identity": {"issuer": "i", "audience": "a", "jwks_file": "j.json"},
                          "providers": [{**{k: v for k, v in old.providers[0].model_dump(
                              by_alias=True).items() if k not in ("resources",)}}]})
    with pytest.raises(ConfigError, match=r"\*\.files\.example\.com of provider 'crm'"):
        refuse_provider_removal(old, new)
    router = Router(old.providers).after_reload(old.providers, new.providers)
    with pytest.raises(UnroutedDenied):
        refuse_retired(router, Destination("x.files.example.com", 443, True))
