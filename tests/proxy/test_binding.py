"""Grant values (proxy.binding): what a value may be, where it is read from, what it
renders to. Every refusal names its reason code and never repeats more than 80 characters
of what it refused (a value read from a token response or a browser may be a token)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.binding import (
    BindingError,
    GrantValueSettings,
    check_value,
    host_value,
    own_hosts,
    read_field,
    render,
    within,
)
from proxy.hosts import HostPattern

SHOPIFY = ["*.myshopify.com"]
# A run of characters a token could be made of, long enough to matter.
TOKENISH = "eyJ" + "x9Q2" * 40


def spec(**fields: Any) -> GrantValueSettings:
    return GrantValueSettings.model_validate(fields)


HOST = spec(**{"from": "choice", "kind": "host"})
ID = spec(**{"from": "callback", "param": "realmId"})
URL = spec(**{"from": "token_response", "field": "id", "kind": "url"})


def assert_no_long_echo(message: str, raw: str) -> None:
    """``message`` holds no run of more than 80 characters of ``raw``."""
    for i in range(max(0, len(raw) - 80)):
        assert raw[i:i + 81] not in message, f"echoes {raw[i:i + 81]!r}"


def refused(value_spec: GrantValueSettings, raw: Any, ceiling: list[str]) -> BindingError:
    with pytest.raises(BindingError) as exc:
        check_value("v", value_spec, raw, ceiling=ceiling)
    err = exc.value
    assert err.detail == str(err)
    assert "'v'" in err.detail  # names the value
    if isinstance(raw, str):
        assert_no_long_echo(err.detail, raw)
    return err


# --- kind: host -------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "stored"), [
    pytest.param("acme.myshopify.com", "acme.myshopify.com", id="plain"),
    pytest.param("ACME.MyShopify.COM", "acme.myshopify.com", id="upper-case"),
    pytest.param("acme.myshopify.com.", "acme.myshopify.com", id="trailing-dot"),
    pytest.param("  acme.myshopify.com ", "acme.myshopify.com", id="surrounding-spaces"),
    pytest.param("acme.myshopify.com:443", "acme.myshopify.com", id="default-port-dropped"),
    pytest.param("acme.myshopify.com:0443", "acme.myshopify.com", id="port-leading-zero"),
    pytest.param("https://acme.myshopify.com", "acme.myshopify.com", id="url"),
    pytest.param("HTTPS://acme.myshopify.com:443/admin?x=1#y", "acme.myshopify.com",
                 id="url-path-query-fragment"),
    pytest.param("xn--bcher-kva.myshopify.com", "xn--bcher-kva.myshopify.com",
                 id="punycode"),
    pytest.param("a.b.c.myshopify.com", "a.b.c.myshopify.com", id="deeper-below-suffix"),
    pytest.param("a" * 63 + ".myshopify.com", "a" * 63 + ".myshopify.com",
                 id="longest-label"),
])
def test_host_values_accepted_and_normalised(raw: str, stored: str) -> None:
    assert check_value("shop", HOST, raw, ceiling=SHOPIFY) == stored


@pytest.mark.parametrize("raw", [
    pytest.param("myshopify.com", id="bare-suffix"),
    pytest.param("evilmyshopify.com", id="suffix-without-dot"),
    pytest.param("myshopify.com.evil.com", id="suffix-then-more"),
    pytest.param("acme.myshopify.com.evil.com", id="shop-then-more"),
    pytest.param("acme.myshopify.co", id="near-miss"),
    pytest.param("acme.myshopify.com:8443", id="other-port"),
    pytest.param("https://acme.myshopify.com:8443/", id="url-other-port"),
    pytest.param("https://evil.com?.myshopify.com", id="suffix-in-query"),
    pytest.param("https://evil.com#.myshopify.com", id="suffix-in-fragment"),
    pytest.param("127.0.0.1", id="ipv4"),
    pytest.param("127.1", id="ipv4-short-form"),
    pytest.param("2130706433", id="ipv4-as-number"),
    pytest.param("[::1]", id="ipv6"),
    pytest.param("localhost", id="localhost"),
    pytest.param("a" * 60 + "." + "b" * 60 + ".c" + TOKENISH[:50].lower() + ".evil.com",
                 id="long-host-outside"),
])
def test_host_values_outside_the_ceiling(raw: str) -> None:
    err = refused(HOST, raw, SHOPIFY)
    assert err.reason == "grant_host_not_allowed"
    assert "*.myshopify.com" in err.detail  # says what it may be


@pytest.mark.parametrize("raw", [
    pytest.param("*.myshopify.com", id="wildcard"),
    pytest.param("*.acme.myshopify.com", id="deeper-wildcard"),
    pytest.param("user@acme.myshopify.com", id="userinfo"),
    pytest.param("https://user@acme.myshopify.com/", id="url-userinfo"),
    pytest.param("https://evil.com\\@acme.myshopify.com/", id="url-backslash-userinfo"),
    pytest.param("acme.myshopify.com/admin", id="path"),
    pytest.param("acme.myshopify.com?x=1", id="query"),
    pytest.param("acme.myshopify.com#x", id="fragment"),
    pytest.param("evil.com/.myshopify.com", id="path-spoof"),
    pytest.param("evil.com\\.myshopify.com", id="backslash"),
    pytest.param("//acme.myshopify.com", id="scheme-relative"),
    pytest.param("acme%2emyshopify.com", id="percent-encoded-dot"),
    pytest.param("https://acme%2Emyshopify.com/", id="url-percent-encoded"),
    pytest.param("acme .myshopify.com", id="inner-space"),
    pytest.param("acme.myshopify.com\r\nX-Injected: 1", id="crlf"),
    pytest.param("\tacme.myshopify.com", id="tab"),
    pytest.param("acme.myshopify.com\x00", id="nul"),
    pytest.param("bücher.myshopify.com", id="idn-u-label"),
    pytest.param("acme..myshopify.com", id="empty-label"),
    pytest.param(".acme.myshopify.com", id="leading-dot"),
    pytest.param("acme.myshopify.com..", id="two-trailing-dots"),
    pytest.param("-acme.myshopify.com", id="leading-hyphen"),
    pytest.param("a" * 64 + ".myshopify.com", id="label-too-long"),
    pytest.param(("a" * 60 + ".") * 5 + "myshopify.com", id="name-over-253"),
    pytest.param(("x9q2" * 15 + ".") * 6 + "myshopify.com", id="token-like-name-over-253"),
    pytest.param("http://acme.myshopify.com", id="http-url"),
    pytest.param("javascript:alert(1)", id="javascript"),
    pytest.param("acme.myshopify.com:", id="empty-port"),
    pytest.param("acme.myshopify.com:+443", id="signed-port"),
    pytest.param("acme.myshopify.com:\u0664\u0664\u0663", id="non-ascii-digits-port"),
    pytest.param("acme.myshopify.com:65536", id="port-out-of-range"),
    pytest.param("https://acme.myshopify.com:99999/", id="url-port-out-of-range"),
    pytest.param("https:acme.myshopify.com", id="url-without-slashes"),
    pytest.param("https:///acme.myshopify.com", id="url-empty-host"),
    pytest.param("https://acme.myshopify.com/" + "a" * 2100, id="url-overlong"),
    pytest.param("0.0.0.0", id="unspecified-address"),
    pytest.param(TOKENISH, id="token-like"),
])
def test_host_values_that_are_not_one_host(raw: str) -> None:
    err = refused(HOST, raw, SHOPIFY)
    assert err.reason == "grant_value_invalid"


def test_host_allowed_narrows_the_ceiling_and_never_widens_it() -> None:
    """``allowed`` narrows what a value may be; a value is always within the ceiling too
    (it may end up in a token or authorize URL): an ``allowed`` pattern outside the
    ceiling admits nothing (and settings refuse it)."""
    narrowed = spec(**{"from": "choice", "kind": "host",
                       "allowed": ["ACME.myshopify.com", "*.eu.example.com:8443"]})
    assert check_value("shop", narrowed, "acme.myshopify.com", ceiling=SHOPIFY) == \
        "acme.myshopify.com"
    for raw in ("other.myshopify.com", "x.eu.example.com", "eu.example.com:8443",
                "x.eu.example.com:8443"):
        assert refused(narrowed, raw, SHOPIFY).reason == "grant_host_not_allowed"


def test_host_value_parses_only_exact_hosts() -> None:
    assert host_value("https://a.example.com:8443/x") == HostPattern("a.example.com", 8443)
    assert host_value("a.example.com:443") == HostPattern("a.example.com", None)
    assert host_value("[::1]:8443") == HostPattern("[::1]", 8443)
    for raw in ("", "*.example.com", "a.example.com/x", "a@b.example.com", "http://a.b"):
        assert host_value(raw) is None, raw


def test_within_matches_the_ceiling_by_host_and_port() -> None:
    assert within(HostPattern("acme.myshopify.com"), SHOPIFY)
    assert within(HostPattern("acme.myshopify.com", 443), SHOPIFY)
    assert not within(HostPattern("myshopify.com"), SHOPIFY)
    assert not within(HostPattern("acme.myshopify.com", 8443), SHOPIFY)
    assert within(HostPattern("acme.myshopify.com", 8443), ["acme.myshopify.com:8443"])
    assert not within(HostPattern("acme.myshopify.com"), ["acme.myshopify.com:8443"])
    assert not within(HostPattern("acme.myshopify.com"), [])


# --- kind: id ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    "1234", "x", "A1", "a.b-c_d", "9130357988888888", "a" * 128,
    "0fd5a8b6-3c1e-4a9e-bb4e-1f6f0b5c7a2d",
])
def test_ids_accepted_verbatim(raw: str) -> None:
    assert check_value("realm", ID, raw, ceiling=[]) == raw


@pytest.mark.parametrize("raw", [
    pytest.param("a:b", id="colon"),
    pytest.param("a/b", id="slash"),
    pytest.param("../etc", id="dot-dot-slash"),
    pytest.param("a@b", id="at"),
    pytest.param("a%2fb", id="percent"),
    pytest.param("a b", id="inner-space"),
    pytest.param(" ab", id="leading-space"),
    pytest.param("ab\n", id="newline"),
    pytest.param("ab\x00", id="nul"),
    pytest.param("-ab", id="leading-hyphen"),
    pytest.param("ab-", id="trailing-hyphen"),
    pytest.param("ab.", id="trailing-dot"),
    pytest.param(".ab", id="leading-dot"),
    pytest.param("Äb", id="non-ascii"),
    pytest.param("*.x", id="wildcard"),
    pytest.param("a?b", id="query"),
    pytest.param("a#b", id="fragment"),
    pytest.param("{shop}", id="placeholder"),
    pytest.param("javascript:alert(1)", id="javascript"),
    pytest.param("http://x", id="url"),
    pytest.param("a" * 129, id="overlong"),
    pytest.param(TOKENISH + "-" + TOKENISH, id="token-like-overlong"),
])
def test_ids_refused(raw: str) -> None:
    assert refused(ID, raw, []).reason == "grant_value_invalid"


@pytest.mark.parametrize(("pattern", "raw", "ok"), [
    ("us|eu|au", "us", True),
    ("us|eu|au", "au", True),
    ("us|eu|au", "usa", False),  # the whole value must match, not a prefix
    ("us|eu|au", "xus", False),
    ("us|eu|au", "US", False),
    ("us|eu|au", "us.evil", False),
    ("[0-9]{1,20}", "9130357988888888", True),
    ("[0-9]{1,20}", "123abc", False),
    ("[0-9]{1,20}", "abc123", False),
    ("[0-9]{1,20}", "1" * 21, False),
    ("[a-z]+", "a-b", False),
    (".*", "a/b", False),  # the id grammar first: a pattern cannot widen it
    (".*", "anything.goes-here", True),
])
def test_id_pattern_must_match_the_whole_value(pattern: str, raw: str, ok: bool) -> None:
    region = spec(**{"from": "choice", "pattern": pattern})
    if ok:
        assert check_value("region", region, raw, ceiling=[]) == raw
    else:
        err = refused(region, raw, [])
        assert err.reason == "grant_value_invalid"
        if "/" not in raw:
            assert repr(pattern) in err.detail


# --- kind: url (metadata only: never part of a template) --------------------------------


@pytest.mark.parametrize("raw", [
    "https://login.salesforce.com/id/00Dxx0000001gPL/005xx000001Sv6A",
    "HTTPS://login.example.com/",
    "https://login.example.com:8443/x?y=1",
])
def test_urls_accepted_verbatim(raw: str) -> None:
    assert check_value("identity", URL, raw, ceiling=[]) == raw


@pytest.mark.parametrize("raw", [
    pytest.param("http://login.example.com/", id="http"),
    pytest.param("ftp://login.example.com/", id="ftp"),
    pytest.param("javascript:alert(1)", id="javascript"),
    pytest.param("data:text/html,x", id="data"),
    pytest.param("https://user@login.example.com/", id="userinfo"),
    pytest.param("https://u:p@login.example.com/", id="userinfo-password"),
    pytest.param("https://login.example.com:x/", id="bad-port"),
    pytest.param("https://", id="no-host"),
    pytest.param("//login.example.com/", id="scheme-relative"),
    pytest.param("https://login.example.com/a b", id="space"),
    pytest.param("https://login.example.com/\r\n", id="crlf"),
    pytest.param("https://login.example.com/" + "a" * 2048, id="overlong"),
    pytest.param("https://login.example.com/?t=" + TOKENISH * 20, id="token-like-overlong"),
])
def test_urls_refused(raw: str) -> None:
    assert refused(URL, raw, []).reason == "grant_value_invalid"


# --- missing values, list values --------------------------------------------------------


@pytest.mark.parametrize(("fields", "where"), [
    pytest.param({"from": "choice"}, "connect link's 'v'", id="choice"),
    pytest.param({"from": "choice", "param": "store"}, "connect link's 'store'",
                 id="choice-param"),
    pytest.param({"from": "callback", "param": "realmId"}, "callback's 'realmId'",
                 id="callback"),
    pytest.param({"from": "token_response", "field": "instance_url"},
                 "token response's 'instance_url'", id="token-response"),
    pytest.param({"from": "discovery", "field": "webUrl", "url": "https://g.example.com/x"},
                 "discovery answer's 'webUrl'", id="discovery"),
])
@pytest.mark.parametrize("raw", [None, "", []], ids=["none", "empty", "empty-list"])
def test_missing_values(fields: dict[str, Any], where: str, raw: Any) -> None:
    err = refused(spec(**fields), raw, [])
    assert err.reason == "grant_value_missing"
    assert where in err.detail
    optional = spec(**fields, required=False)
    assert check_value("v", optional, raw, ceiling=[]) is None


def test_list_values_check_every_item() -> None:
    many = spec(**{"from": "discovery", "url": "https://api.example.com/r", "field": "*.id"})
    assert many.many
    assert check_value("sites", many, ["a1", "b2"], ceiling=[]) == ("a1", "b2")
    assert refused(many, ["a1", "b/2"], []).reason == "grant_value_invalid"
    hosts = spec(**{"from": "discovery", "url": "https://api.example.com/r",
                    "field": "*.url", "kind": "host"})
    assert check_value("sites", hosts, ["https://a.myshopify.com/"], ceiling=SHOPIFY) == \
        ("a.myshopify.com",)
    assert refused(hosts, ["a.myshopify.com", "evil.com"], SHOPIFY).reason == \
        "grant_host_not_allowed"


def test_a_refusal_of_an_unprintable_token_stays_short_and_printable() -> None:
    raw = "\u202e" + "\U0001f600" * 300
    err = refused(ID, raw, [])
    assert err.detail.isprintable() and len(err.detail) < 1200


# --- read_field -------------------------------------------------------------------------

DOC: dict[str, Any] = {
    "instance_url": "https://acme.my.salesforce.com",
    "org": {"site": {"url": "https://x.example.com"}},
    "items": [{"id": "a"}, {"id": 42}, {"name": "no id"}, {"id": True}, {"id": None},
              {"id": 1.5}, {"id": {"nested": "x"}}],
    "tags": ["t1", "t2", 3, False],
    "realm": 9130357988888888,
    "zero": 0,
    "negative": -3,
    "flag": True,
    "ratio": 0.5,
    "nothing": None,
    "obj": {"0": "zero-key"},
    "$select": "dollar",
    "empty": [],
}


@pytest.mark.parametrize(("path", "found"), [
    ("instance_url", "https://acme.my.salesforce.com"),
    ("org.site.url", "https://x.example.com"),
    ("org.site", None),  # an object is no value
    ("org.site.url.more", None),  # below a string
    ("org.missing", None),
    ("missing", None),
    ("items.0.id", "a"),
    ("items.1.id", "42"),  # numbers read as their decimal text
    ("items.2.id", None),
    ("items.3.id", None),  # a bool is no value
    ("items.4.id", None),
    ("items.5.id", None),  # nor a float
    ("items.99.id", None),
    ("items.99999999999999999999999.id", None),
    ("items.-1.id", None),
    ("items.x", None),
    ("items.*.id", ["a", "42"]),  # every item's, skipping what is no value
    ("tags.*", ["t1", "t2", "3"]),
    ("empty.*", []),
    ("org.*", []),  # '*' over an object collects nothing
    ("*", []),
    ("realm", "9130357988888888"),
    ("zero", "0"),
    ("negative", "-3"),
    ("flag", None),
    ("ratio", None),
    ("nothing", None),
    ("obj.0", "zero-key"),  # digits name a member of an object
    ("$select", "dollar"),
    ("tags", None),  # a list without '*' is no value
])
def test_read_field(path: str, found: Any) -> None:
    assert read_field(DOC, path) == found


@pytest.mark.parametrize("doc", [None, "text", 3, [], [1, 2], True])
def test_read_field_of_documents_that_are_no_object(doc: Any) -> None:
    assert read_field(doc, "instance_url") is None


def test_read_field_from_a_top_level_list() -> None:
    assert read_field([{"id": "a"}, {"id": "b"}], "0.id") == "a"
    assert read_field([{"id": "a"}, {"id": "b"}], "*.id") == ["a", "b"]


# --- render, own_hosts ------------------------------------------------------------------


def test_render_fills_every_placeholder() -> None:
    values = {"shop": "acme.myshopify.com", "region": "eu"}
    assert render("https://{shop}/admin/{region}/{shop}", values) == \
        "https://acme.myshopify.com/admin/eu/acme.myshopify.com"
    assert render("https://static.example.com/{", values) == "https://static.example.com/{"
    assert render("no placeholders", {}) == "no placeholders"


@pytest.mark.parametrize("values", [
    pytest.param({}, id="absent"),
    pytest.param({"other": "x"}, id="another-value"),
    pytest.param({"shop": ("a.myshopify.com", "b.myshopify.com")}, id="a-list-value"),
])
def test_render_without_the_value_is_grant_value_missing(values: dict[str, Any]) -> None:
    with pytest.raises(BindingError) as exc:
        render("https://{shop}/x", values)
    assert exc.value.reason == "grant_value_missing"
    assert "'shop'" in exc.value.detail


def test_own_hosts_are_exact_hosts() -> None:
    values = {"shop": "acme.myshopify.com", "region": "eu", "port": "8443"}
    hosts = own_hosts(["{shop}", "api.{region}.example.com", "{shop}:8443"], values)
    assert hosts == [HostPattern("acme.myshopify.com"), HostPattern("api.eu.example.com"),
                     HostPattern("acme.myshopify.com", 8443)]
    assert own_hosts([], values) == []


@pytest.mark.parametrize(("template", "values"), [
    pytest.param("{shop}", {"shop": "*.myshopify.com"}, id="wildcard"),
    pytest.param("*.{region}.example.com", {"region": "eu"}, id="template-wildcard"),
    pytest.param("{shop}", {"shop": "a.example.com/x"}, id="path"),
    pytest.param("{shop}", {"shop": "u@a.example.com"}, id="userinfo"),
    pytest.param("api.{region}.example.com", {"region": "a..b"}, id="empty-label"),
    pytest.param("api.{region}.example.com", {"region": "a b"}, id="space"),
    pytest.param("{shop}", {"shop": ""}, id="empty"),
    pytest.param("{shop}", {"shop": "https://a.example.com"}, id="url"),
])
def test_own_hosts_refuse_what_is_not_one_host(template: str, values: dict[str, str]) -> None:
    with pytest.raises(BindingError) as exc:
        own_hosts([template], values)
    assert exc.value.reason == "grant_value_invalid"


def test_own_hosts_without_the_value_is_grant_value_missing() -> None:
    with pytest.raises(BindingError) as exc:
        own_hosts(["{shop}"], {})
    assert exc.value.reason == "grant_value_missing"
