"""The request header policy (proxy.headers) and the choice of the user context
(proxy.identity.choose_context): every spelling a next hop may read as a protected name,
Connection nominations, and field syntax, one row per variant."""

from __future__ import annotations

import base64

import pytest

from proxy.errors import MalformedRequest, UserContextInvalid
from proxy.headers import HeaderPolicy, ReadHeaders, check_target, field_key
from proxy.hosts import HostPattern
from proxy.identity import choose_context, connection_context
from proxy.secret import Secret

POLICY = HeaderPolicy("X-User-Context")


def _f(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs]


def _names(read: ReadHeaders) -> list[str]:
    return [k.decode("latin-1") for k, _ in read.fields]


@pytest.mark.parametrize(("name", "key"), [
    ("X-User-Context", "x-user-context"),
    ("X_User_Context", "x-user-context"),
    ("x_user_context", "x-user-context"),
    ("X_USER-CONTEXT", "x-user-context"),
    ("Proxy_Authorization", "proxy-authorization"),
    ("AUTHORIZATION", "authorization"),
    (b"X_Api_Key", "x-api-key"),
    ("X.User.Context", "x-user-context"),
    ("X--User-Context", "x-user-context"),
    ("x_.user-_context", "x-user-context"),
    ("X-Forwarded-For", "x-forwarded-for"),
])
def test_field_key_folds_case_and_underscore(name: str | bytes, key: str) -> None:
    assert field_key(name) == key


# --- identity headers: every spelling is removed from every request -------------------------

@pytest.mark.parametrize(("sent", "context", "lookalikes"), [
    pytest.param([("X-User-Context", "jws")], ("jws",), (), id="exact"),
    pytest.param([("x-user-context", "jws")], ("jws",), (), id="lower-case"),
    pytest.param([("X-USER-CONTEXT", "jws")], ("jws",), (), id="upper-case"),
    pytest.param([("X-User-Context", "a"), ("X_User_Context", "b")], ("a",),
                 ("X_User_Context",), id="underscore-beside-exact"),
    pytest.param([("x_user_context", "b")], (), ("x_user_context",), id="underscore-alone"),
    pytest.param([("X_User-Context", "b")], (), ("X_User-Context",), id="mixed-separators"),
    pytest.param([("X.User.Context", "b")], (), ("X.User.Context",), id="dots"),
    pytest.param([("X--User-Context", "b")], (), ("X--User-Context",), id="double-dash"),
    pytest.param([("Proxy_Authorization", "Bearer b")], (), ("Proxy_Authorization",),
                 id="proxy-authorization-underscore"),
    pytest.param([("proxy_authorization", "Bearer b")], (), ("proxy_authorization",),
                 id="proxy-authorization-lower-underscore"),
])
def test_identity_headers_never_remain(sent: list[tuple[str, str]], context: tuple[str, ...],
                                       lookalikes: tuple[str, ...]) -> None:
    read = POLICY.read(_f(("Accept", "*/*"), *sent))
    assert read.context == context
    assert read.lookalikes == lookalikes
    assert _names(read) == ["Accept"]


def test_proxy_authorization_is_read_and_removed() -> None:
    read = POLICY.read(_f(("Proxy-Authorization", "Bearer x"), ("Accept", "*/*")))
    assert read.proxy_authorization == ("Bearer x",)
    assert _names(read) == ["Accept"]


def test_a_custom_context_header_is_protected_under_every_spelling() -> None:
    policy = HeaderPolicy("X-Agent-User")
    read = policy.read(_f(("x_agent_user", "b"), ("X-Agent-User", "a"),
                          ("X-User-Context", "kept: not this deployment's header")))
    assert read.context == ("a",) and read.lookalikes == ("x_agent_user",)
    assert _names(read) == ["X-User-Context"]


# --- credentials: every spelling of Authorization and the inject header goes ----------------

@pytest.mark.parametrize("names", [
    pytest.param(["Authorization"], id="authorization"),
    pytest.param(["X-Api-Key"], id="inject-header"),
    pytest.param(["Authorization", "X-Api-Key"], id="both"),
])
@pytest.mark.parametrize("sent", [
    "Authorization", "authorization", "AUTHORIZATION", "Authorization_", "X-Api-Key",
    "X_Api_Key", "x_api_key", "X-API-KEY", "x-api_key",
])
def test_without_removes_every_spelling(names: list[str], sent: str) -> None:
    fields = _f((sent, "client-value"), ("Accept", "*/*"))
    kept = HeaderPolicy.without(fields, names)
    removed = field_key(sent) in {field_key(n) for n in names}
    assert [k.decode() for k, _ in kept] == (["Accept"] if removed else [sent, "Accept"])


# --- Connection: nominated fields are hop-by-hop ------------------------------------------

@pytest.mark.parametrize(("connection", "others", "kept", "connection_after"), [
    pytest.param("keep-alive, Authorization", [("Authorization", "Bearer c")], [],
                 "keep-alive", id="nominates-authorization"),
    pytest.param("X-Api-Key", [("X-Api-Key", "k")], [], None, id="nominates-inject-header"),
    pytest.param("x_api_key", [("X-Api-Key", "k")], [], None, id="nominates-underscore"),
    pytest.param("close, X-Foo", [("X-Foo", "1"), ("X-Bar", "2")], ["X-Bar"], "close",
                 id="nominates-other"),
    pytest.param("Upgrade", [("Upgrade", "websocket")], ["Upgrade"], "upgrade",
                 id="upgrade-kept-for-websocket"),
    pytest.param("keep-alive", [("Keep-Alive", "timeout=5")], [], "keep-alive",
                 id="keep-alive-header-dropped"),
    pytest.param("TE", [("TE", "trailers")], [], None, id="nominates-te"),
    pytest.param("KEEP-ALIVE, keep-alive", [], [], "keep-alive", id="repeated-option"),
    pytest.param(" , ", [("X-Foo", "1")], ["X-Foo"], None, id="empty-list"),
])
def test_connection_nominations_are_removed(connection: str, others: list[tuple[str, str]],
                                            kept: list[str], connection_after: str | None
                                            ) -> None:
    read = POLICY.read(_f(("Connection", connection), *others))
    names = _names(read)
    assert [n for n in names if n != "Connection"] == kept
    value = dict((k.decode(), v.decode()) for k, v in read.fields).get("Connection")
    assert value == connection_after


def test_connection_nominating_the_context_header_does_not_hide_it() -> None:
    """The proxy is the hop a nominated field is addressed to: it still reads the context,
    and the nomination itself is never forwarded."""
    read = POLICY.read(_f(("Connection", "X-User-Context"), ("X-User-Context", "jws")))
    assert read.context == ("jws",)
    assert read.fields == ()


def test_two_connection_headers_are_both_honoured() -> None:
    read = POLICY.read(_f(("Connection", "X-A"), ("Connection", "X-B"), ("X-A", "1"),
                          ("X-B", "2"), ("X-C", "3")))
    assert _names(read) == ["X-C"]


@pytest.mark.parametrize("nominated", ["Content-Length", "content_length", "Transfer-Encoding",
                                       "keep-alive, TRANSFER-ENCODING", "Host", "host"])
def test_connection_can_never_nominate_framing_or_routing(nominated: str) -> None:
    """Removing Content-Length or Transfer-Encoding after mitmproxy read the body's framing
    would forward the body unframed: the next hop parses it as further requests."""
    with pytest.raises(MalformedRequest, match="frames or routes") as err:
        POLICY.read(_f(("Connection", nominated), ("Content-Length", "5")))
    assert err.value.reason == "bad_connection"


def test_connection_naming_a_non_token_is_refused() -> None:
    with pytest.raises(MalformedRequest, match="Connection") as err:
        POLICY.read(_f(("Connection", "keep-alive, X Foo")))
    assert err.value.reason == "bad_connection"


# --- field syntax ------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "value", "reason"), [
    pytest.param(b"X-Foo", b"a\r\n Authorization: Bearer client", "obs_fold", id="obs_fold"),
    pytest.param(b"X-Foo", b"a\r\n\tmore", "obs_fold", id="obs_fold-tab"),
    pytest.param(b"X-Foo", b"a\rb", "obs_fold", id="bare-cr"),
    pytest.param(b"X-Foo", b"a\nb", "obs_fold", id="bare-lf"),
    pytest.param(b"X-Foo", b"a\x00b", "control_character", id="nul"),
    pytest.param(b"X-Foo", b"a\x7fb", "control_character", id="del"),
    pytest.param(b"X-Foo", b"a\x1bb", "control_character", id="escape"),
    pytest.param(b"X-Foo", b"\x01", "control_character", id="soh"),
    pytest.param(b"X Foo", b"v", "bad_field_name", id="space-in-name"),
    pytest.param(b"X-Foo ", b"v", "bad_field_name", id="space-before-colon"),
    pytest.param(b"X:Foo", b"v", "bad_field_name", id="colon-in-name"),
    pytest.param(b"X-F\x00oo", b"v", "bad_field_name", id="nul-in-name"),
    pytest.param(b"X-F\xc3\xa9", b"v", "bad_field_name", id="non-ascii-name"),
    pytest.param(b"X(Foo)", b"v", "bad_field_name", id="separator-in-name"),
    pytest.param(b"", b"v", "bad_field_name", id="empty-name"),
])
def test_malformed_fields_are_refused(name: bytes, value: bytes, reason: str) -> None:
    with pytest.raises(MalformedRequest) as err:
        POLICY.read([(b"Accept", b"*/*"), (name, value)])
    assert err.value.reason == reason
    assert err.value.status == 400
    assert b"client" not in str(err.value).encode()  # the detail never echoes a value


@pytest.mark.parametrize("value", [
    pytest.param(b"tab\tinside", id="htab"),
    pytest.param(b"caf\xe9", id="obs-text"),
    pytest.param(b"", id="empty"),
    pytest.param(b"a, b; q=0.5", id="list"),
])
def test_well_formed_values_pass(value: bytes) -> None:
    assert POLICY.read([(b"X-Foo", value)]).fields == ((b"X-Foo", value),)


# --- request-targets: origin-form only ---------------------------------------------------------

@pytest.mark.parametrize(("path", "method", "credentialed", "reason"), [
    pytest.param("/x?a=1", "GET", True, None, id="origin-form"),
    pytest.param("/", "GET", True, None, id="root"),
    pytest.param("*", "OPTIONS", True, None, id="asterisk-options"),
    pytest.param("/a//b", "GET", True, None, id="inner-double-slash"),
    pytest.param("//other.example/x", "GET", False, None, id="double-slash-unrouted"),
    pytest.param("//other.example/x", "GET", True, "ambiguous_target", id="double-slash"),
    pytest.param("https://other.example/x", "GET", True, "bad_target", id="absolute-url"),
    pytest.param("https://other.example/x", "GET", False, "bad_target", id="url-unrouted"),
    pytest.param("other.example/x", "GET", True, "bad_target", id="no-leading-slash"),
    pytest.param("*", "GET", True, "bad_target", id="asterisk-not-options"),
    pytest.param("", "GET", True, "bad_target", id="empty"),
])
def test_check_target(path: str, method: str, credentialed: bool, reason: str | None) -> None:
    if reason is None:
        check_target(path, method, credentialed=credentialed)
        return
    with pytest.raises(MalformedRequest) as err:
        check_target(path, method, credentialed=credentialed)
    assert err.value.reason == reason


# --- choose_context: the identity rules in one place ----------------------------------------

def _read(*pairs: tuple[str, str]) -> ReadHeaders:
    return POLICY.read(_f(*pairs))


_BASIC = "Basic " + base64.b64encode(b"ctx:conn-jws").decode()
_TUNNEL = Secret("tunnel-jws")


@pytest.mark.parametrize(("sent", "tunnel", "expected"), [
    pytest.param([("X-User-Context", "hdr")], None, "hdr", id="header"),
    pytest.param([("X-User-Context", "hdr")], _TUNNEL, "hdr", id="header-beats-tunnel"),
    pytest.param([("X-User-Context", "hdr"), ("Proxy-Authorization", "Bearer pa")], None, "hdr",
                 id="header-beats-request-proxy-authorization"),
    pytest.param([("Proxy-Authorization", "Bearer pa")], _TUNNEL, "pa",
                 id="request-proxy-authorization-beats-tunnel"),
    pytest.param([("Proxy-Authorization", _BASIC)], None, "conn-jws", id="basic-password"),
    pytest.param([], _TUNNEL, "tunnel-jws", id="tunnel-only"),
    pytest.param([], None, None, id="none"),
    pytest.param([("X-User-Context", "a"), ("X-User-Context", "b")], None, "duplicate_header",
                 id="header-twice"),
    pytest.param([("X-User-Context", "a"), ("x-user-context", "b")], None, "duplicate_header",
                 id="header-twice-other-case"),
    pytest.param([("X-User-Context", "a"), ("X_User_Context", "b")], None, "lookalike_header",
                 id="underscore-lookalike-beside-header"),
    pytest.param([("X_User_Context", "b")], _TUNNEL, "lookalike_header",
                 id="underscore-lookalike-with-tunnel"),
    pytest.param([("X-User-Context", "a"), ("Proxy_Authorization", "Bearer b")], None,
                 "lookalike_header", id="proxy-authorization-lookalike"),
    pytest.param([("Proxy-Authorization", "Bearer a"), ("Proxy-Authorization", "Bearer b")],
                 None, "duplicate_header", id="proxy-authorization-twice"),
    pytest.param([("Proxy-Authorization", "Digest x")], _TUNNEL, "malformed",
                 id="proxy-authorization-other-scheme"),
    pytest.param([], UserContextInvalid("bad tunnel", reason="malformed"), "malformed",
                 id="tunnel-invalid"),
])
def test_choose_context(sent: list[tuple[str, str]], tunnel: Secret | UserContextInvalid | None,
                        expected: str | None) -> None:
    chosen = choose_context(_read(*sent), "X-User-Context", tunnel)
    if expected is None:
        assert chosen is None
    elif isinstance(chosen, UserContextInvalid):
        assert chosen.reason == expected
    else:
        assert isinstance(chosen, Secret) and chosen.reveal() == expected


@pytest.mark.parametrize(("sent", "expected"), [
    pytest.param([("Proxy-Authorization", "Bearer t")], "t", id="bearer"),
    pytest.param([], None, id="none"),
    pytest.param([("Proxy_Authorization", "Bearer t")], "lookalike_header", id="lookalike"),
    pytest.param([("Proxy-Authorization", "Bearer t")] * 2, "duplicate_header", id="twice"),
    pytest.param([("Proxy-Authorization", "Basic !!")], "malformed", id="bad-basic"),
])
def test_connection_context(sent: list[tuple[str, str]], expected: str | None) -> None:
    got = connection_context(_read(*sent))
    if expected is None:
        assert got is None
    elif isinstance(got, UserContextInvalid):
        assert got.reason == expected
    else:
        assert isinstance(got, Secret) and got.reveal() == expected


# --- the intercept list speaks mitmproxy's host:port strings --------------------------------

@pytest.mark.parametrize(("pattern", "hostport", "intercepted"), [
    ("api.example.com", "api.example.com:443", True),
    ("api.example.com", "API.EXAMPLE.COM:443", True),
    ("api.example.com", "api.example.com.:443", True),
    ("api.example.com", "api.example.com:8443", False),
    ("api.example.com", "xapi.example.com:443", False),
    ("api.example.com", "api.example.com.evil:443", False),
    ("api.example.com:8443", "api.example.com:8443", True),
    ("*.example.com", "a.b.example.com:443", True),
    ("*.example.com", "example.com:443", False),
    ("*.example.com", "a.example.com.evil.net:443", False),
    ("[::1]:8443", "::1:8443", True),
    ("[::1]:8443", "[::1]:8443", True),
    ("[::1]:8443", "::1:443", False),
    ("[::1]:8443", "::2:8443", False),
    ("::1", "::1:443", True),
    ("[2001:db8::1]", "2001:db8::1:443", True),
    ("[2001:db8::1]", "2001:db8::10:443", False),
    ("10.0.0.1", "10.0.0.1:443", True),
    ("10.0.0.1", "10.0.0.10:443", False),
])
def test_intercept_regex(pattern: str, hostport: str, intercepted: bool) -> None:
    import re

    rx = HostPattern.parse(pattern).intercept_regex()
    assert bool(re.search(rx, hostport, re.IGNORECASE)) is intercepted
