"""An MCP server as a provider by its URL alone (issue 15, items 1-4): through the real
``credproxy run`` process, the stack's authorization server (RFC 8414 metadata, RFC 7591
registration, RFC 9207 ``iss``, RFC 8707 ``resource`` as the tokens' audience) and a
protected resource publishing RFC 9728 metadata that accepts only tokens whose audience is
itself. Two users connect through the real web flow (discovery, then dynamic registration,
or credproxy's Client ID Metadata Document served under its https public_url); their
requests through the sidecar carry their own resource-bound tokens."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest

from devstack.procs import free_port
from devstack.stack import Stack, build_stack

pytestmark = pytest.mark.integration

MCP = "mcpdocs"


def _mcp_stack(tmp: Any, *, cimd: bool) -> Stack:
    s = build_stack(tmp, start_proxy=False, client_metadata_documents=cimd)
    try:
        port = free_port()
        server = f"https://localhost:{port}/documents"
        s.echo_server(tls=True, name="mcp-api", port=port, resource=server)
        # What a platform team writes: the server's URL, nothing else.
        s.config["providers"].append({"id": MCP, "mcp": server})
        if cimd:
            # credproxy's public_url is https (an ingress terminating TLS in front of the
            # admin server): it can serve its Client ID Metadata Document.
            s.config["public_url"] = s.ingress().url.replace("127.0.0.1", "localhost")
        s.write_config()
        s.start_proxy()
        s.mcp_server = server  # type: ignore[attr-defined]
        return s
    except BaseException:
        s.close()
        raise


@pytest.fixture(scope="module", params=["dcr", "cimd"])
def stack(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The same server and authorization server, registration by RFC 7591 (``dcr``) or by
    credproxy's Client ID Metadata Document (``cimd``: the server advertises support)."""
    s = _mcp_stack(tmp_path_factory.mktemp(f"mcp-{request.param}"),
                   cimd=request.param == "cimd")
    s.registration = request.param  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        s.close()


def _get(stack: Stack, user: str) -> httpx2.Response:
    with stack.client(context=stack.context(user)) as c:
        return c.get(stack.mcp_server)  # type: ignore[attr-defined]


def connect_in_browser(stack: Stack, user: str, connect_url: str) -> dict[str, list[str]]:
    """The user's browser follows the connect link: authorize (consent), callback."""
    sep = "&" if "?" in connect_url else "?"
    with httpx2.Client(verify=stack.admin_tls(), follow_redirects=False, timeout=30,
                       trust_env=False) as b:
        r = b.get(f"{connect_url}{sep}{httpx2.QueryParams({'context': stack.context(user)})}")
        assert r.status_code == 302, r.text
        authorize = r.headers["location"]
        asked = parse_qs(urlsplit(authorize).query)
        r = b.get(authorize + f"&login_hint={user}")
        assert r.status_code == 302, r.text
        callback = r.headers["location"]
        assert "iss=" in callback  # RFC 9207: the AS names itself
        r = b.get(callback)
        assert r.status_code == 200 and "now connected" in r.text, r.text
        return asked


def test_two_users_connect_by_discovery_and_registration(stack: Stack) -> None:
    server: str = stack.mcp_server  # type: ignore[attr-defined]
    seen = {}
    for user in ("mcp-alice", "mcp-bob"):
        first = _get(stack, user)
        assert first.status_code == 401, first.text
        body = first.json()
        assert body["reason"] == "no_connection", body
        asked = connect_in_browser(stack, user, body["connect_url"])
        # Discovery found the stack's authorization server from the server's URL alone.
        assert asked["resource"] == [server]  # RFC 8707 on the authorize request
        assert asked["code_challenge_method"] == ["S256"]
        assert asked["scope"][0].split() == ["documents.read", "offline_access"]
        if stack.registration == "dcr":  # type: ignore[attr-defined]
            assert asked["client_id"][0].startswith("dcr_")
        else:
            assert asked["client_id"] == [
                f"{stack.config['public_url']}/oauth/client-metadata.json"]
        r = _get(stack, user)
        assert r.status_code == 200, r.text
        seen[user] = r.json()
    # Each user sees their own data, with a token whose audience is the server.
    assert {u: d["user"] for u, d in seen.items()} == {"mcp-alice": "mcp-alice",
                                                        "mcp-bob": "mcp-bob"}
    assert all(d["aud"] == server for d in seen.values())
    stats = stack.stats()
    if stack.registration == "dcr":  # type: ignore[attr-defined]
        # One RFC 7591 registration (per issuer), with the MCP client metadata.
        regs = stats["registrations"]
        assert len(regs) == 1, regs
        # The admin server's callback is on loopback http here: a native client's
        # redirect (RFC 8252 section 7.3; OpenID Connect Registration application_type).
        assert regs[0]["application_type"] == "native"
        assert regs[0]["token_endpoint_auth_method"] == "none"
        assert regs[0]["grant_types"] == ["authorization_code", "refresh_token"]
        assert regs[0]["redirect_uris"][0].endswith("/oauth/callback")
    else:
        # No registration: the authorization server fetched credproxy's document, served
        # at its https public_url, whose client_id is its own URL.
        assert stats["registrations"] == []
        url = f"{stack.config['public_url']}/oauth/client-metadata.json"
        assert stats["metadata_documents"] == [url]
        with httpx2.Client(verify=stack.admin_tls(), trust_env=False) as b:
            doc = b.get(url).json()
        assert doc["client_id"] == url
        assert doc["redirect_uris"] == [f"{stack.config['public_url']}/oauth/callback"]
        assert doc["token_endpoint_auth_method"] == "none"
    # The grant records the resource, the issuer and the registration that minted it.
    grant = stack.vault_get("mcp-alice", MCP)
    assert grant is not None
    assert grant.values["mcp_resource"] == server
    assert grant.values["mcp_issuer"] == stack.auth.url
    assert grant.values["mcp_registration"] == stack.registration  # type: ignore[attr-defined]
    connected = [a for a in stack.audit_records() if a["event"] == "connection.created"
                 and a.get("provider") == MCP and a.get("outcome") == "connected"]
    assert {a["user"] for a in connected} == {"mcp-alice", "mcp-bob"}


def test_refresh_keeps_the_resource_and_the_minting_client(stack: Stack) -> None:
    """An expired access token of an mcp grant is refreshed at the discovered token
    endpoint with the registered client and ``resource`` (the authorization server refuses
    another with invalid_target); the refreshed token still has the server as audience."""
    import time

    user = "mcp-carol"
    first = _get(stack, user)
    assert first.status_code == 401
    connect_in_browser(stack, user, first.json()["connect_url"])
    grant = stack.vault_get(user, MCP)
    assert grant is not None and grant.tokens.refresh_token is not None
    before = stack.stats()["refresh_by_user"].get(user, 0)
    # Within refresh_skew of its expiry: the next request refreshes first.
    stack.vault_put(user, {"access_token": grant.tokens.access_token.reveal(),
                           "refresh_token": grant.tokens.refresh_token.reveal(),
                           "token_type": "Bearer", "expires_in": 5,
                           "scope": grant.tokens.scope}, provider=MCP)
    deadline = time.monotonic() + 10
    while True:
        r = _get(stack, user)
        assert r.status_code == 200, r.text
        if stack.stats()["refresh_by_user"].get(user, 0) > before or \
                time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert stack.stats()["refresh_by_user"].get(user, 0) == before + 1
    assert r.json()["user"] == user
    assert r.json()["aud"] == stack.mcp_server  # type: ignore[attr-defined]
    refreshed = stack.vault_get(user, MCP)
    assert refreshed.tokens.refresh_token.reveal() != grant.tokens.refresh_token.reveal()
    assert dict(refreshed.values) == dict(grant.values)  # still the same minting client


def test_a_confidential_registered_client_refreshes_and_revokes_after_a_restart(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """An authorization server that registers only confidential clients (RFC 7591 section
    3.2.1: a ``client_secret`` in the answer): the secret is sealed in the grant, so after
    the sidecar restarts (its registrations in memory gone) the grant still refreshes as
    that client, and ``credproxy revoke`` revokes as that client (RFC 7009 section 2.1).
    The secret never shows in ``credproxy connections`` or the audit."""
    import os
    import subprocess
    import sys
    import time

    s = build_stack(tmp_path_factory.mktemp("mcp-confidential"), start_proxy=False,
                    confidential_registration=True)
    try:
        port = free_port()
        server = f"https://localhost:{port}/documents"
        s.echo_server(tls=True, name="mcp-api", port=port, resource=server)
        s.config["providers"].append({"id": MCP, "mcp": server})
        s.write_config()
        s.start_proxy()
        user = "mcp-dora"
        first = _get_at(s, server, user)
        assert first.status_code == 401
        connect_in_browser(s, user, first.json()["connect_url"])
        regs = s.stats()["registrations"]
        assert [r["token_endpoint_auth_method"] for r in regs] == ["client_secret_basic"]
        grant = s.vault_get(user, MCP)
        assert grant.client_secret is not None
        assert grant.values["mcp_client_auth"] == "client_secret_basic"
        assert _get_at(s, server, user).status_code == 200
        # Restart: no registration in memory; the grant alone says how to refresh.
        assert s.proxy is not None
        s.proxy.close()
        s.start_proxy()
        s.vault_put(user, {"access_token": grant.tokens.access_token.reveal(),
                           "refresh_token": grant.tokens.refresh_token.reveal(),
                           "token_type": "Bearer", "expires_in": 5,
                           "scope": grant.tokens.scope}, provider=MCP)
        before = s.stats()["refresh_by_user"].get(user, 0)
        deadline = time.monotonic() + 10
        while s.stats()["refresh_by_user"].get(user, 0) == before:
            r = _get_at(s, server, user)
            assert r.status_code == 200, r.text
            assert time.monotonic() < deadline, "no refresh happened"
            time.sleep(0.3)
        assert len(s.stats()["registrations"]) == 1  # refreshed without registering again
        refreshed = s.vault_get(user, MCP)
        assert refreshed.client_secret == grant.client_secret
        secret = grant.client_secret.reveal()
        env = {**os.environ, **s.env}
        shown = subprocess.run([sys.executable, "-m", "proxy.cli", "connections", "--config",
                                str(s.config_path), "--user", user, "--json"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and MCP in shown.stdout, shown.stderr
        assert secret not in shown.stdout + shown.stderr
        out = subprocess.run([sys.executable, "-m", "proxy.cli", "revoke", "--config",
                              str(s.config_path), "--user", user, "--provider", MCP],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "revoked" in out.stdout and "pending" not in out.stdout, out.stdout
        assert s.introspect(refreshed.tokens.refresh_token.reveal())["active"] is False
        assert s.proxy is not None
        assert secret not in s.proxy.stdout_text() + s.proxy.stderr_text()
    finally:
        s.close()


def _get_at(stack: Stack, server: str, user: str) -> httpx2.Response:
    with stack.client(context=stack.context(user)) as c:
        return c.get(server)
