"""Routing through a real mitmproxy: a credential goes only where the real destination
matches a provider over TLS and the Host header agrees."""

from __future__ import annotations

import json

import pytest

from devstack.stack import KEYED_PROVIDER, WILD_PROVIDER, Stack, wait_until
from tests.integration import rawhttp

pytestmark = pytest.mark.integration


def _port(stack: Stack) -> str:
    return stack.docs_url.rsplit(":", 1)[1]


def _headers(r: rawhttp.RawResponse) -> dict[str, str]:
    return {k.lower(): v for k, v in r.json()["headers"]}


def _audit_mentions(stack: Stack, marker: str) -> list[dict[str, object]]:
    assert stack.proxy is not None
    return [json.loads(line) for line in stack.proxy.stdout_text().splitlines()
            if line.startswith("{") and marker in line]


def test_routed_request_gets_the_users_token(stack: Stack, user: str, marker: str) -> None:
    p = _port(stack)
    r = rawhttp.request(stack.proxy_url, connect=f"localhost:{p}", host_header=f"localhost:{p}",
                        path=f"/echo/{marker}", headers={"X-User-Context": stack.context(user)},
                        ca_file=str(stack.mitm_ca))
    assert r.status == 200
    tokens = stack.vault_get(user).tokens
    assert _headers(r)["authorization"] == f"Bearer {tokens.access_token.reveal()}"


@pytest.mark.parametrize("connect,host_header,sni", [
    # Host names the provider, but the tunnel goes elsewhere.
    pytest.param("127.0.0.2:{p}", "localhost:{p}", None, id="host-says-provider-tunnel-elsewhere"),
    # The tunnel is the provider, but Host names another site.
    pytest.param("localhost:{p}", "evil.example:{p}", None, id="tunnel-provider-host-elsewhere"),
    pytest.param("localhost:{p}", "localhost:1{p}", None, id="host-other-port"),
    pytest.param("localhost:{p}", "localhost", None, id="host-default-port"),
    pytest.param("localhost:{p}", "user@localhost:{p}", None, id="host-userinfo"),
    pytest.param("localhost:{p}", "localhost.evil.com:{p}", None, id="provider-as-prefix"),
    pytest.param("localhost:{p}", "localhost:{p}", "evil.example", id="sni-elsewhere"),
])
def test_misdirected_requests_are_421_and_carry_no_token(
        stack: Stack, user: str, marker: str, connect: str, host_header: str,
        sni: str | None) -> None:
    p = _port(stack)
    r = rawhttp.request(stack.proxy_url, connect=connect.format(p=p),
                        host_header=host_header.format(p=p), path=f"/echo/{marker}",
                        headers={"X-User-Context": stack.context(user)}, sni=sni,
                        ca_file=str(stack.mitm_ca))
    assert r.status == 421, r.body
    assert r.problem == "misdirected-request"
    assert not stack.docs_saw(marker)


@pytest.mark.parametrize("authority", [
    pytest.param("LOCALHOST:{p}", id="uppercase"),
    pytest.param("localhost.:{p}", id="trailing-dot"),
])
def test_equivalent_spellings_route_to_the_provider(stack: Stack, user: str, marker: str,
                                                   authority: str) -> None:
    a = authority.format(p=_port(stack))
    r = rawhttp.request(stack.proxy_url, connect=a, host_header=a, path=f"/echo/{marker}",
                        headers={"X-User-Context": stack.context(user)}, sni="localhost",
                        ca_file=str(stack.mitm_ca))
    assert r.status == 200, r.body
    assert _headers(r)["authorization"].startswith("Bearer at_")


@pytest.mark.parametrize("authority", [
    pytest.param("localhost.evil.com:{p}", id="provider.com.evil.com"),
    pytest.param("evillocalhost:{p}", id="evilprovider"),
])
def test_lookalike_destinations_are_not_routed(stack: Stack, user: str, authority: str) -> None:
    """Unrouted: passed through without a credential (the connection fails here, since these
    hosts do not exist, but the point is the proxy never treats them as the provider)."""
    a = authority.format(p=_port(stack))
    r = rawhttp.request(stack.proxy_url, connect=a, host_header=a, path="/echo",
                        headers={"X-User-Context": stack.context(user)},
                        ca_file=str(stack.mitm_ca))
    # Could not connect: nothing was sent anywhere, and the agent is told so as a problem.
    assert r.status == 502 and r.problem == "upstream-unreachable"
    assert r.json()["reason"] == "upstream_unreachable"
    assert b"at_" not in r.body


def test_provider_host_on_another_port_is_not_routed(stack: Stack, user: str) -> None:
    """localhost:<docs port> is a provider; localhost:<auth port> is not (ports are exact)."""
    a = f"localhost:{stack.auth.url.rsplit(':', 1)[1]}"
    r = rawhttp.request(stack.proxy_url, connect=a, host_header=a, path="/_admin/stats",
                        headers={"X-User-Context": stack.context(user)},
                        ca_file=str(stack.mitm_ca))
    assert r.status == 200 and r.problem is None
    audit = stack.proxy.stdout_text() if stack.proxy else ""
    assert f'"host":"{a}"' not in audit


def test_plain_http_to_a_tls_provider_is_refused(stack: Stack, user: str, marker: str) -> None:
    p = _port(stack)
    r = rawhttp.request(stack.proxy_url, connect=None, host_header=f"localhost:{p}",
                        absolute=f"http://localhost:{p}/echo/{marker}",
                        headers={"X-User-Context": stack.context(user)})
    assert r.status == 403
    assert r.problem == "provider-not-permitted"
    assert r.json()["reason"] == "insecure_transport"
    assert not stack.docs_saw(marker)


def test_plain_http_proxy_authorization_is_consumed(stack: Stack, user: str) -> None:
    """Absolute-form plain HTTP to an unrouted host: forwarded, minus every context carrier."""
    echo = stack.echo_server(tls=False)
    a = echo.url.removeprefix("http://")
    token = stack.context(user)
    r = rawhttp.request(stack.proxy_url, connect=None, host_header=a,
                        absolute=f"{echo.url}/echo", proxy_authorization=f"Bearer {token}",
                        headers={"X-User-Context": token})
    assert r.status == 200
    names = [k.lower() for k, _ in r.json()["headers"]]
    assert "proxy-authorization" not in names and "x-user-context" not in names
    assert "authorization" not in names
    assert token not in r.body.decode()


def test_client_authorization_is_replaced_never_merged(stack: Stack, user: str,
                                                       marker: str) -> None:
    p = _port(stack)
    r = rawhttp.request(stack.proxy_url, connect=f"localhost:{p}", host_header=f"localhost:{p}",
                        path=f"/echo/{marker}",
                        headers={"X-User-Context": stack.context(user),
                                 "Authorization": "Bearer client-supplied",
                                 "authorization": "Basic c2hhcmVkOmFjY291bnQ="},
                        ca_file=str(stack.mitm_ca))
    auth = [v for k, v in r.json()["headers"] if k.lower() == "authorization"]
    assert auth == [f"Bearer {stack.vault_get(user).tokens.access_token.reveal()}"]
    assert "client-supplied" not in r.body.decode()


def test_custom_inject_header_replaces_every_client_credential(stack: Stack,
                                                              marker: str) -> None:
    """A provider that injects X-Api-Key: the client's own Authorization (any spelling, any
    count) and its own X-Api-Key values never reach the upstream; the user's key does."""
    upstream = stack.keyed_upstream()
    a = f"localhost:{upstream.url.rsplit(':', 1)[1]}"
    user = f"keyed-{marker}"
    grant = stack.grant(user)
    stack.vault_put(user, grant, provider=KEYED_PROVIDER)
    r = rawhttp.request(stack.proxy_url, connect=a, host_header=a, path=f"/echo/{marker}",
                        headers={"X-User-Context": stack.context(user),
                                 "Authorization": "Bearer client-supplied",
                                 "authorization": "Basic c2hhcmVkOmFjY291bnQ=",
                                 "X-Api-Key": "client-key-1", "x-api-key": "client-key-2"},
                        ca_file=str(stack.mitm_ca))
    assert r.status == 200, r.body
    headers = [(k.lower(), v) for k, v in r.json()["headers"]]
    assert [v for k, v in headers if k == "x-api-key"] == [grant["access_token"]]
    assert "authorization" not in dict(headers)
    for leaked in ("client-supplied", "c2hhcmVkOmFjY291bnQ=", "client-key-1", "client-key-2"):
        assert leaked not in r.body.decode()


# A wildcard provider owns *.wild.test (see devstack.stack). Those names resolve nowhere, so
# mitmproxy cannot connect (502 upstream-unreachable) whatever is decided; what the proxy
# decided shows in its answer without a user context (407 = routed) and in the audit log
# (an injection, then request.failed: nothing was sent).
@pytest.mark.parametrize("host", ["api.wild.test", "a.b.wild.test"])
def test_wildcard_provider_owns_its_subdomains(stack: Stack, marker: str, host: str) -> None:
    r = rawhttp.request(stack.proxy_url, connect=f"{host}:443", host_header=host,
                        path=f"/{marker}/none", ca_file=str(stack.mitm_ca))
    assert r.status == 407 and r.problem == "user-context-missing"
    user = f"wild-{marker}"
    stack.vault_put(user, stack.grant(user), provider=WILD_PROVIDER)
    r = rawhttp.request(stack.proxy_url, connect=f"{host}:443", host_header=host,
                        path=f"/{marker}/ctx", headers={"X-User-Context": stack.context(user)},
                        ca_file=str(stack.mitm_ca))
    # Injected, then the name did not resolve.
    assert r.status == 502 and r.problem == "upstream-unreachable"
    wait_until(lambda: len(_audit_mentions(stack, f"{marker}/ctx")) == 2)
    record, failed = _audit_mentions(stack, f"{marker}/ctx")
    assert (record["event"], record["provider"], record["request"]["host"]) == (  # type: ignore[index]
        "credential.injected", WILD_PROVIDER, host)
    assert (failed["event"], failed["reason"]) == ("request.failed", "upstream_unreachable")


@pytest.mark.parametrize("host", [
    pytest.param("evilwild.test", id="evilprovider"),
    pytest.param("wild.test", id="the-suffix-itself"),
    pytest.param("api.wild.test.evil.example", id="provider-as-prefix"),
    pytest.param("api.wild.testevil", id="suffix-run-on"),
    pytest.param("api-wild.test", id="dash-not-dot"),
])
def test_wildcard_lookalikes_get_no_token(stack: Stack, marker: str, host: str) -> None:
    user = f"wild-{marker}"
    stack.vault_put(user, stack.grant(user), provider=WILD_PROVIDER)
    for context in ({}, {"X-User-Context": stack.context(user)}):
        r = rawhttp.request(stack.proxy_url, connect=f"{host}:443", host_header=host,
                            path=f"/{marker}", headers=context, ca_file=str(stack.mitm_ca))
        # Unrouted: neither refused nor credentialed; the name resolves nowhere.
        assert r.status == 502 and r.problem == "upstream-unreachable"
        assert b"at_" not in r.body
    assert _audit_mentions(stack, marker) == []  # no injection, no decision at all


def test_unrelated_unrouted_traffic_may_name_another_host(stack: Stack, user: str,
                                                          marker: str) -> None:
    """mitmproxy connects to the CONNECT target, never to the Host header's host, so an
    unrouted tunnel to an IP address whose Host names the site is passed through."""
    echo = stack.echo_server(tls=True)
    p = echo.url.rsplit(":", 1)[1]
    token = stack.context(user)
    r = rawhttp.request(stack.proxy_url, connect=f"127.0.0.1:{p}",
                        host_header=f"site.example.org:{p}", path=f"/echo/{marker}",
                        headers={"X-User-Context": token}, ca_file=str(stack.mitm_ca))
    assert r.status == 200 and r.problem is None, r.body
    assert _headers(r)["host"] == f"site.example.org:{p}"
    assert "x-user-context" not in _headers(r) and "authorization" not in _headers(r)
    assert token not in r.body.decode()


@pytest.mark.parametrize("connect,host_header,sni", [
    pytest.param("127.0.0.1:{e}", "localhost:{p}", None, id="host-names-provider"),
    pytest.param("127.0.0.1:{e}", "api.wild.test", None, id="host-names-wildcard-provider"),
    pytest.param("127.0.0.1:{e}", "127.0.0.1:{e}", "localhost", id="sni-names-provider-host"),
])
def test_unrouted_mismatch_naming_a_provider_is_still_421(
        stack: Stack, user: str, marker: str, connect: str, host_header: str,
        sni: str | None) -> None:
    echo = stack.echo_server(tls=True)
    fill = {"e": echo.url.rsplit(":", 1)[1], "p": _port(stack)}
    r = rawhttp.request(stack.proxy_url, connect=connect.format(**fill),
                        host_header=host_header.format(**fill), path=f"/echo/{marker}",
                        headers={"X-User-Context": stack.context(user)}, sni=sni,
                        ca_file=str(stack.mitm_ca))
    assert r.status == 421, r.body
    assert r.problem == "misdirected-request"
    assert marker not in echo.stderr_text()


def test_unrouted_https_passes_through_with_context_stripped(stack: Stack, user: str) -> None:
    echo = stack.echo_server(tls=True)
    url = echo.url.replace("127.0.0.1", "localhost")
    token = stack.context(user)
    with stack.client(context=token) as c:
        r = c.get(f"{url}/echo", headers={"Authorization": "Bearer agent-own"})
    assert r.status_code == 200
    headers = [(k.lower(), v) for k, v in r.json()["headers"]]
    assert ("authorization", "Bearer agent-own") in headers  # unrouted: left alone
    assert "x-user-context" not in dict(headers)
    assert token not in r.text
