"""Issue 15, "Done when", as one scenario through the real sidecar: a remote MCP server built
on the official MCP SDK (``MCPServer`` with the SDK's own auth: RFC 9728 protected resource
metadata, 401 with ``resource_metadata``, tokens accepted only with its own URL as
audience, a per-tool scope challenge) whose authorization server is the stack's (RFC 8414
metadata, RFC 7591 registration or Client ID Metadata Documents, RFC 9207 ``iss``, RFC 8707
audiences), and the SDK's ``Client`` as the unchanged agent. The platform team writes the
server's URL and nothing else.

1. Two users start a session: each gets a JSON-RPC error with the connect URL (never a 401),
   connects in the browser through discovery and registration (both the metadata-document
   and the dynamic-registration path), then calls tools and sees their own data.
2. A tool needing a wider scope gets the step-up answer (the union of the scopes, a connect
   URL requesting exactly that); after re-consent it works, and the grant kept its
   refresh token.
3. A grant revoked at the authorization server: the server's 401 makes the sidecar re-run
   discovery and try one refresh, which is refused: the client gets a JSON-RPC error with
   the connect URL. ``credproxy revoke`` gives the same.
4. The audit names every tool call per user; the agent's own ``Authorization`` and its user
   context never reach the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from devstack.stack import Stack, build_stack
from devstack.streamers import McpProgressServer
from proxy import mcp as wire

from .test_mcp_connect import connect_in_browser
from .test_mcp_wire import AGENT_SECRET, sdk_refusal, sdk_session

pytestmark = pytest.mark.integration

MCP = "remote"


@pytest.fixture(scope="module", params=["dcr", "cimd"])
def env(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, McpProgressServer]]:
    cimd = request.param == "cimd"
    stack = build_stack(tmp_path_factory.mktemp(f"mcp-remote-{request.param}"),
                        start_proxy=False, client_metadata_documents=cimd)
    server = None
    try:
        pki = stack.workdir / "pki"
        server = McpProgressServer(
            pki / "server.pem", pki / "server.key", scoped={"admin_op": "documents.write"},
            token_scope=lambda token: str(stack.introspect(token).get("scope", "")),
            issuer=stack.auth.url, introspect=stack.introspect)
        # What a platform team writes: the server's URL.
        stack.config["providers"].append({"id": MCP, "mcp": server.url})
        if cimd:  # an https public_url: credproxy serves its Client ID Metadata Document
            stack.config["public_url"] = stack.ingress().url.replace("127.0.0.1", "localhost")
        stack.write_config()
        stack.start_proxy()
        stack.registration = request.param  # type: ignore[attr-defined]
        yield stack, server
    finally:
        stack.close()
        if server is not None:
            server.close()


def _session(stack: Stack, server: McpProgressServer, user: str,
             body: Callable[[Any], Awaitable[Any]], mode: str = "legacy") -> Any:
    return sdk_session(stack, server.url, user, mode, body)


def _refused(stack: Stack, server: McpProgressServer, user: str, mode: str = "legacy") -> Any:
    """The JSON-RPC error the SDK client gets when it starts a session for ``user``."""
    return sdk_refusal(stack, server.url, user, mode).error


def _lookup(stack: Stack, server: McpProgressServer, user: str, query: str) -> str:
    async def call(client: Any) -> str:
        return str((await client.call_tool("lookup", {"query": query})).content[0].text)

    return str(_session(stack, server, user, call))


def test_discovery_registration_step_up_revocation_and_audit(
        env: tuple[Stack, McpProgressServer]) -> None:
    from mcp import MCPError, UrlElicitationRequiredError

    stack, server = env
    kind = stack.registration  # type: ignore[attr-defined]
    users = [f"alice-{kind}", f"bob-{kind}"]
    # 1. No connection yet: the client gets a URL elicitation (2025-11-25) naming the
    # connect URL, and nothing reaches the server with a credential.
    for user in users:
        error = _refused(stack, server, user)
        assert error.code == wire.URL_ELICITATION_REQUIRED, error
        data = error.data
        assert (data["slug"], data["reason"]) == ("reauth-required", "no_connection")
        url = data["connect_url"]
        assert [e.url for e in UrlElicitationRequiredError.from_error(error).elicitations] \
            == [url]
        asked = connect_in_browser(stack, user, url)
        # Discovery from the URL alone: the server's resource metadata named the
        # authorization server; RFC 8707 resource and PKCE S256 on the authorize request.
        assert asked["resource"] == [server.url]
        assert asked["code_challenge_method"] == ["S256"]
        assert asked["scope"][0].split() == ["documents.read", "offline_access"]
        if kind == "cimd":
            assert asked["client_id"] == [
                f"{stack.config['public_url']}/oauth/client-metadata.json"]
        else:
            assert asked["client_id"][0].startswith("dcr_")
    stats = stack.stats()
    assert len(stats["registrations"]) == (1 if kind == "dcr" else 0), stats["registrations"]
    # Each user sees their own data.
    assert _lookup(stack, server, users[0], "q1") == f"found q1 for {users[0]}"
    assert _lookup(stack, server, users[1], "q1") == f"found q1 for {users[1]}"

    # 2. Step-up: admin_op needs documents.write, which the grant does not hold.
    alice = users[0]

    async def admin_then_lookup(client: Any) -> tuple[Any, str]:
        try:
            await client.call_tool("admin_op", {})
        except MCPError as exc:
            caught = exc.error
        else:
            raise AssertionError("admin_op worked without documents.write")
        after = await client.call_tool("lookup", {"query": "still"})
        return caught, after.content[0].text

    error, after = _session(stack, server, alice, admin_then_lookup)
    assert after == f"found still for {alice}"  # the grant keeps serving what it covers
    assert error.code == wire.URL_ELICITATION_REQUIRED
    assert error.data["slug"] == "insufficient-scope"
    union = error.data["scope"].split()
    assert set(union) == {"documents.read", "offline_access", "documents.write"}, union
    step_up = error.data["connect_url"]
    assert parse_qs(urlsplit(step_up).query)["scope"][0].split() == union
    assert "operator must add" not in error.message  # the server advertises the scope
    refreshes = stack.stats()["refresh_by_user"].get(alice, 0)
    asked = connect_in_browser(stack, alice, step_up)
    assert set(asked["scope"][0].split()) == set(union)
    assert asked["resource"] == [server.url]

    async def admin(client: Any) -> str:
        return str((await client.call_tool("admin_op", {})).content[0].text)

    assert _session(stack, server, alice, admin) == "admin done"
    # No refresh loop: the challenge was answered without a refresh.
    assert stack.stats()["refresh_by_user"].get(alice, 0) == refreshes
    grant = stack.vault_get(alice, MCP)
    assert grant is not None and grant.tokens.refresh_token is not None
    assert "documents.write" in (grant.tokens.scope or "").split()

    # 3a. Revoked at the authorization server: the server answers 401; the sidecar re-runs
    # discovery, its one refresh is refused; the client gets the connect URL.
    with stack.admin() as c:
        r = c.post("/_admin/revoke",
                   json={"refresh_token": grant.tokens.refresh_token.reveal()})
        assert r.status_code == 200, r.text
    for mode in ("legacy", "auto"):
        error = _refused(stack, server, alice, mode)
        assert error.data["slug"] == "reauth-required", error
        assert error.data["reason"] in ("revoked_upstream", "invalid_grant"), error.data
        assert error.data["connect_url"].endswith(f"/connect/{MCP}")
        # ``auto`` (2026-07-28) first probes server/discover, gets -32010, then falls back
        # to initialize (2025-11-25) and gets the URL elicitation it raises.
        assert error.code == wire.URL_ELICITATION_REQUIRED
    # 3b. Offboarded by an operator: the same answer, and the server is told (RFC 7009).
    bob = users[1]
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "revoke", "--config",
                          str(stack.config_path), "--user", bob, "--provider", MCP],
                         env={**os.environ, **stack.env}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "revoked" in out.stdout
    error = _refused(stack, server, bob)
    assert error.data["slug"] == "reauth-required" and error.data["reason"] in (
        "revoked", "no_connection"), error.data

    # 4. The audit names every tool call, per user; nothing of the agent's own reached
    # the server.
    records = stack.audit_records()
    for user, tools in ((alice, {"lookup", "admin_op"}), (bob, {"lookup"})):
        called = {r["request"]["mcp"]["name"] for r in records
                  if r.get("user") == user and r["event"] == "credential.injected"
                  and (r["request"]["mcp"] or {}).get("method") == "tools/call"}
        assert called == tools, (user, called)
        assert all(r["provider"] == MCP for r in records if r.get("user") == user
                   and r["event"].startswith("credential."))
    denied = [r for r in records if r.get("user") == alice
              and r["event"] == "credential.denied" and r["reason"] == "insufficient_scope"]
    assert [d["request"]["mcp"] for d in denied] == [{"method": "tools/call",
                                                      "name": "admin_op"}]
    assert server.requests
    assert all(AGENT_SECRET not in " ".join(r.header("authorization"))
               and not r.header("x-user-context") for r in server.requests)
