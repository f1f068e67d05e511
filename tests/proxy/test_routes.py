"""Routing destinations to providers, and Host-header agreement (proxy.routes)."""

from __future__ import annotations

import pytest

from proxy.hosts import normalize_host, parse_authority
from proxy.routes import Destination, Router, host_agrees
from proxy.settings import ProviderSettings


def _provider(pid: str, *hosts: str) -> ProviderSettings:
    return ProviderSettings(id=pid, hosts=list(hosts), token_url="https://login.example.com/t",
                            client_id="c", token_endpoint_auth_method="none")


PROVIDERS = [
    _provider("exact", "API.Example.COM."),  # normalised by the settings
    _provider("ported", "api.example.com:8443"),
    _provider("wild", "*.provider.com"),
    _provider("deeper", "*.eu.provider.com"),
    _provider("wildport", "*.ported.com:8443"),
    _provider("ip4", "10.0.0.1"),
    _provider("ip6", "[0:0::1]:8443"),
    _provider("plain", "plain.example.com:8080", "bare.example.com"),
]
ROUTER = Router(PROVIDERS)


def dest(host: str, port: int = 443, tls: bool = True) -> Destination:
    return Destination(normalize_host(host), port, tls)


@pytest.mark.parametrize(("destination", "expected"), [
    # exact, default ports
    pytest.param(dest("api.example.com"), "exact", id="exact-443-tls"),
    pytest.param(dest("api.example.com", 80, tls=False), "exact", id="exact-80-plain"),
    pytest.param(dest("api.example.com", 443, tls=False), None, id="exact-443-plain"),
    pytest.param(dest("api.example.com", 80, tls=True), None, id="exact-80-tls"),
    pytest.param(dest("api.example.com", 8080), None, id="exact-other-port"),
    pytest.param(dest("other.example.com"), None, id="other-host"),
    pytest.param(dest("example.com"), None, id="parent-domain"),
    pytest.param(dest("x.api.example.com"), None, id="subdomain-of-exact"),
    # explicit port patterns
    pytest.param(dest("api.example.com", 8443), "ported", id="explicit-port-tls"),
    pytest.param(dest("api.example.com", 8443, tls=False), "ported", id="explicit-port-plain"),
    pytest.param(dest("plain.example.com", 8080, tls=False), "plain", id="explicit-port-8080"),
    pytest.param(dest("plain.example.com", 80, tls=False), None, id="explicit-port-only"),
    pytest.param(dest("plain.example.com"), None, id="explicit-port-not-443"),
    pytest.param(dest("bare.example.com", 80, tls=False), "plain", id="second-host-of-provider"),
    # wildcards
    pytest.param(dest("a.provider.com"), "wild", id="wildcard-one-label"),
    pytest.param(dest("a.b.provider.com"), "wild", id="wildcard-two-labels"),
    pytest.param(dest("provider.com"), None, id="wildcard-not-apex"),
    pytest.param(dest("evilprovider.com"), None, id="wildcard-not-suffix-string"),
    pytest.param(dest("provider.com.evil.com"), None, id="wildcard-not-prefix"),
    pytest.param(dest("a.provider.com.evil.com"), None, id="wildcard-not-infix"),
    pytest.param(dest("a.provider.co"), None, id="wildcard-other-tld"),
    pytest.param(dest("a.provider.com", 8443), None, id="wildcard-non-default-port"),
    pytest.param(dest("a.provider.com", 80, tls=False), "wild", id="wildcard-plain-80"),
    pytest.param(dest("a.provider.com", 443, tls=False), None, id="wildcard-plain-443"),
    pytest.param(dest("x.eu.provider.com"), "deeper", id="most-specific-wildcard"),
    pytest.param(dest("eu.provider.com"), "wild", id="deeper-wildcard-not-apex"),
    pytest.param(dest("a.ported.com", 8443), "wildport", id="wildcard-explicit-port"),
    pytest.param(dest("a.ported.com"), None, id="wildcard-explicit-port-only"),
    # normalisation
    pytest.param(dest("API.EXAMPLE.COM"), "exact", id="uppercase"),
    pytest.param(dest("api.example.com."), "exact", id="trailing-dot"),
    pytest.param(dest("A.Provider.COM."), "wild", id="wildcard-uppercase-trailing-dot"),
    # IP literals
    pytest.param(dest("10.0.0.1"), "ip4", id="ipv4"),
    pytest.param(dest("10.0.0.2"), None, id="ipv4-other"),
    pytest.param(dest("[::1]", 8443), "ip6", id="ipv6"),
    pytest.param(dest("[0000::0001]", 8443), "ip6", id="ipv6-non-canonical"),
    pytest.param(dest("::1", 8443), "ip6", id="ipv6-unbracketed"),
    pytest.param(dest("[::1]", 443), None, id="ipv6-other-port"),
    pytest.param(dest("[::2]", 8443), None, id="ipv6-other-address"),
])
def test_router_match(destination: Destination, expected: str | None) -> None:
    route = ROUTER.match(destination)
    assert (route.provider.id if route else None) == expected


def test_exact_pattern_wins_over_wildcard() -> None:
    router = Router([_provider("wild", "*.example.com"), _provider("exact", "api.example.com")])
    assert router.match(dest("api.example.com")).provider.id == "exact"  # type: ignore[union-attr]
    assert router.match(dest("www.example.com")).provider.id == "wild"  # type: ignore[union-attr]


def test_empty_router_matches_nothing() -> None:
    assert Router([]).match(dest("api.example.com")) is None


@pytest.mark.parametrize(("host", "expected"), [
    pytest.param("api.example.com", True, id="exact"),
    pytest.param("plain.example.com", True, id="explicit-port-only-pattern"),
    pytest.param("a.provider.com", True, id="wildcard"),
    pytest.param("provider.com", False, id="wildcard-apex"),
    pytest.param("elsewhere.example.com", False, id="unlisted"),
])
def test_claims_host(host: str, expected: bool) -> None:
    assert ROUTER.claims_host(host) is expected


def test_destination() -> None:
    assert str(Destination("api.example.com", 443, True)) == "api.example.com:443"
    assert Destination("h", 443, True).default_port
    assert Destination("h", 80, False).default_port
    assert not Destination("h", 80, True).default_port
    assert not Destination("h", 443, False).default_port


# --- host_agrees ----------------------------------------------------------------------------

TLS = Destination("api.example.com", 443, True)
PLAIN = Destination("api.example.com", 80, False)
ALT = Destination("api.example.com", 8443, True)
V6 = Destination("[::1]", 8443, True)


@pytest.mark.parametrize(("destination", "header", "expected"), [
    pytest.param(TLS, "api.example.com", True, id="same"),
    pytest.param(TLS, "API.Example.Com", True, id="uppercase"),
    pytest.param(TLS, "api.example.com.", True, id="trailing-dot"),
    pytest.param(TLS, " api.example.com ", True, id="surrounding-space"),
    pytest.param(TLS, "api.example.com:443", True, id="explicit-default-port"),
    pytest.param(PLAIN, "api.example.com", True, id="plain-implicit-80"),
    pytest.param(PLAIN, "api.example.com:80", True, id="plain-explicit-80"),
    pytest.param(PLAIN, "api.example.com:443", False, id="plain-with-443"),
    pytest.param(TLS, "api.example.com:80", False, id="tls-with-80"),
    pytest.param(ALT, "api.example.com:8443", True, id="non-default-port"),
    pytest.param(ALT, "api.example.com", False, id="non-default-port-implicit"),
    pytest.param(TLS, "api.example.com:8443", False, id="different-port"),
    pytest.param(TLS, "evil.example.com", False, id="different-host"),
    pytest.param(TLS, "api.example.com.evil.com", False, id="suffix-attack"),
    pytest.param(TLS, None, False, id="missing"),
    pytest.param(TLS, "", False, id="empty"),
    pytest.param(TLS, "user@api.example.com", False, id="userinfo"),
    pytest.param(TLS, "api.example.com@evil.com", False, id="userinfo-other-host"),
    pytest.param(TLS, "api.example.com:", False, id="empty-port"),
    pytest.param(TLS, "api.example.com:0", False, id="port-zero"),
    pytest.param(TLS, "api.example.com:65536", False, id="port-too-big"),
    pytest.param(TLS, "api.example.com:+443", False, id="port-signed"),
    pytest.param(TLS, "api.example.com:443:443", False, id="two-ports"),
    pytest.param(TLS, "api.example.com/path", False, id="path"),
    pytest.param(TLS, "api example.com", False, id="space"),
    pytest.param(TLS, "api..example.com", False, id="empty-label"),
    pytest.param(TLS, ":443", False, id="port-only"),
    pytest.param(TLS, "%%%", False, id="garbage"),
    pytest.param(V6, "[::1]:8443", True, id="ipv6"),
    pytest.param(V6, "[0::1]:8443", True, id="ipv6-non-canonical"),
    pytest.param(V6, "[::1]", False, id="ipv6-default-port"),
    pytest.param(V6, "[::1", False, id="ipv6-unterminated"),
    pytest.param(V6, "[::1]8443", False, id="ipv6-port-without-colon"),
    pytest.param(V6, "[zz]:8443", False, id="ipv6-garbage"),
    pytest.param(
        TLS, "api.example.com:٤٤٣", False, id="port-non-ascii-digits"),
])
def test_host_agrees(destination: Destination, header: str | None, expected: bool) -> None:
    assert host_agrees(destination, header) is expected


# --- parse_authority / normalize_host -------------------------------------------------------


@pytest.mark.parametrize(("value", "tls", "expected"), [
    pytest.param("Api.Example.com", True, ("api.example.com", 443), id="default-tls"),
    pytest.param("api.example.com", False, ("api.example.com", 80), id="default-plain"),
    pytest.param("api.example.com:8080", True, ("api.example.com", 8080), id="port"),
    pytest.param("[::1]", True, ("[::1]", 443), id="ipv6"),
    pytest.param("[0::1]:80", True, ("[::1]", 80), id="ipv6-port"),
    pytest.param("10.0.0.1:65535", True, ("10.0.0.1", 65535), id="ipv4-max-port"),
])
def test_parse_authority(value: str, tls: bool, expected: tuple[str, int]) -> None:
    assert parse_authority(value, tls=tls) == expected


@pytest.mark.parametrize(("value", "match"), [
    pytest.param("", "must not be empty", id="empty"),
    pytest.param("u@h", "userinfo", id="userinfo"),
    pytest.param("[::1", "unterminated", id="unterminated-ipv6"),
    pytest.param("h:0", "bad port", id="port-zero"),
    pytest.param("h:x", "bad port", id="port-name"),
    pytest.param("h:", "bad port", id="port-empty"),
    pytest.param(":443", "not a host", id="no-host"),
])
def test_parse_authority_rejects(value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_authority(value, tls=True)


@pytest.mark.parametrize(("host", "expected"), [
    pytest.param("Example.COM", "example.com", id="lowercase"),
    pytest.param("example.com.", "example.com", id="one-trailing-dot"),
    pytest.param(" example.com ", "example.com", id="spaces-stripped"),
    pytest.param("[0:0::1]", "[::1]", id="ipv6-bracketed"),
    pytest.param("::FFFF:1.2.3.4", "1.2.3.4", id="ipv4-mapped-unbracketed"),
    pytest.param("[::ffff:127.0.0.1]", "127.0.0.1", id="ipv4-mapped"),
    pytest.param("::1", "[::1]", id="ipv6-unbracketed"),
    pytest.param("127.1", "127.0.0.1", id="ipv4-short"),
    pytest.param("2130706433", "127.0.0.1", id="ipv4-one-number"),
    pytest.param("0x7f000001", "127.0.0.1", id="ipv4-hex"),
    pytest.param("0177.0.0.1", "127.0.0.1", id="ipv4-octal"),
    pytest.param("127.000.000.001", "127.0.0.1", id="ipv4-zero-padded"),
    pytest.param("cafe.be", "cafe.be", id="hex-letters-name"),
    pytest.param("08.1", "08.1", id="not-octal-stays-a-name"),
    pytest.param("10.0.0.1", "10.0.0.1", id="ipv4"),
    pytest.param("bücher.de", "xn--bcher-kva.de", id="idna"),
])
def test_normalize_host(host: str, expected: str) -> None:
    assert normalize_host(host) == expected


@pytest.mark.parametrize("host", [
    pytest.param("", id="empty"),
    pytest.param("   ", id="blank"),
    pytest.param(".", id="only-dot"),
    pytest.param("user@example.com", id="userinfo"),
    pytest.param("exa mple.com", id="space"),
    pytest.param("exa\tmple.com", id="tab"),
    pytest.param("example.com/x", id="slash"),
    pytest.param("example.com\\x", id="backslash"),
    pytest.param("example.com?x", id="query"),
    pytest.param("example.com#x", id="fragment"),
    pytest.param("ex%41mple.com", id="percent"),
    pytest.param("a..b", id="empty-label"),
    pytest.param(".example.com", id="leading-dot"),
    pytest.param("[zz]", id="bad-ipv6"),
    pytest.param("[::1]x", id="bracket-junk"),
    pytest.param("0.0.0.0", id="unspecified-ipv4"),
    pytest.param("0", id="unspecified-one-number"),
    pytest.param("[::]", id="unspecified-ipv6"),
    pytest.param("[::ffff:0.0.0.0]", id="unspecified-mapped"),
    pytest.param(
        "example.com..", id="two-trailing-dots"),
])
def test_normalize_host_rejects(host: str) -> None:
    with pytest.raises(ValueError):
        normalize_host(host)


def _mcp(pid: str, url: str) -> ProviderSettings:
    return ProviderSettings(id=pid, mcp=url, hosts=[url.split("/")[2]])


@pytest.mark.parametrize(("path", "expected"), [
    pytest.param("/jira/mcp", "jira", id="jira"),
    pytest.param("/jira/mcp?session=1", "jira", id="jira-query"),
    pytest.param("/gh/mcp", "gh", id="gh"),
    pytest.param("/gh/mcp/sub", "gh", id="gh-below"),
    # Neither endpoint: the first server (by id order of the config) takes it and refuses
    # it (outside_mcp_resource), never an unrouted pass-through with the agent's headers.
    pytest.param("/admin", "jira", id="neither"),
    pytest.param("/gh/../jira/mcp", "jira", id="dot-segments"),
    pytest.param(None, "jira", id="no-path"),
])
def test_mcp_servers_sharing_a_host_are_told_apart_by_path(path: str | None,
                                                           expected: str) -> None:
    router = Router([_mcp("jira", "https://mcp.corp.example/jira/mcp"),
                     _mcp("gh", "https://mcp.corp.example/gh/mcp"),
                     _provider("wild", "*.corp.example")])
    route = router.match(dest("mcp.corp.example"), path)
    assert route is not None and route.provider.id == expected


def test_a_wildcard_never_takes_a_path_an_mcp_server_on_the_exact_host_refuses() -> None:
    router = Router([_mcp("jira", "https://mcp.corp.example/jira/mcp"),
                     _provider("wild", "*.corp.example")])
    route = router.match(dest("mcp.corp.example"), "/other")
    assert route is not None and route.provider.id == "jira"
