"""MCP requests through the sidecar (issue 15, items 6, 7, 8), with the real MCP SDK on both
sides: an ``MCPServer`` on Streamable HTTP (devstack.streamers.McpProgressServer) as the
upstream, the SDK's ``Client`` over ``streamable_http_client`` as the unchanged agent, in
both of its ways of starting: ``legacy`` (the initialize handshake, protocol 2025-11-25:
no ``Mcp-Method`` headers, so the proxy reads the JSON-RPC body) and ``auto`` (2026-07-28,
``Mcp-Method`` / ``Mcp-Name`` headers).

* a tool call works; the audit names the method and tool (never an argument value); the
  agent's own ``Authorization`` never reaches the server; progress notifications on the
  ``text/event-stream`` answer arrive live;
* a revoked grant reaches the client as a JSON-RPC error carrying the connect URL (a URL
  elicitation, -32042, at 2025-11-25), never a 401;
* the server's scope challenge (403 ``insufficient_scope``) reaches the client as a
  JSON-RPC error with the scope and the connect URL, the session keeps working, and after
  the user consents at that URL the tool call works."""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from devstack.stack import Stack, build_stack
from devstack.streamers import McpProgressServer
from proxy import mcp as wire

from .test_step_up import consent_at

pytestmark = pytest.mark.integration

MCP = "mcp"
AGENT_SECRET = "agent-own-token-must-not-leak"
MODES = ("legacy", "auto")


@dataclass
class Env:
    stack: Stack
    server: McpProgressServer

    @property
    def url(self) -> str:
        return f"https://localhost:{self.server.port}/mcp"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    stack = build_stack(tmp_path_factory.mktemp("mcp-wire"), start_proxy=False)
    pki = stack.workdir / "pki"
    server = None
    try:
        server = McpProgressServer(
            pki / "server.pem", pki / "server.key", scoped={"admin_op": "documents.write"},
            token_scope=lambda token: str(stack.introspect(token).get("scope", "")))
        docs = stack.config["providers"][0]
        stack.config["providers"].append({
            **docs, "id": MCP, "hosts": [f"localhost:{server.port}"],
            "scopes": ["documents.read", "documents.write"]})
        stack.write_config()
        stack.start_proxy()
        yield Env(stack, server)
    finally:
        stack.close()
        if server is not None:
            server.close()


def _user(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def sdk_session(stack: Stack, url: str, user: str, mode: str,
                body: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``body(client)`` with the SDK client as the agent of the MCP server at ``url``:
    through the proxy, with the user's context and the agent's own Authorization header."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async def run() -> Any:
        tls = ssl.create_default_context(cafile=str(stack.mitm_ca))
        headers = {"X-User-Context": stack.context(user),
                   "Authorization": f"Bearer {AGENT_SECRET}"}
        async with httpx2.AsyncClient(proxy=stack.proxy_url, verify=tls, headers=headers,
                                      trust_env=False,
                                      timeout=httpx2.Timeout(30, read=60)) as http, \
                Client(streamable_http_client(url, http_client=http), mode=mode) as client:
            return await body(client)

    return asyncio.run(run())


def sdk_refusal(stack: Stack, url: str, user: str, mode: str) -> Any:
    """The MCPError the SDK client raises when it starts a session for ``user`` (the
    client's task group may wrap it in an exception group)."""
    from mcp import MCPError

    async def nothing(client: Any) -> None:
        raise AssertionError("the session started")

    try:
        sdk_session(stack, url, user, mode, nothing)
    except MCPError as exc:
        return exc
    except BaseExceptionGroup as group:
        matched, _rest = group.split(MCPError)
        assert matched is not None, group
        found: BaseException = matched
        while isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
        return found
    raise AssertionError("no MCPError")


def _session(env: Env, user: str, mode: str,
             body: Callable[[Any], Awaitable[Any]]) -> Any:
    return sdk_session(env.stack, env.url, user, mode, body)


def _connect_error(env: Env, user: str, mode: str) -> Any:
    return sdk_refusal(env.stack, env.url, user, mode)


@pytest.mark.parametrize("mode", MODES)
def test_a_tool_call_works_is_audited_by_tool_and_streams_live(env: Env, mode: str) -> None:
    user = _user(f"tool-{mode}")
    env.stack.vault_put(user, env.stack.grant(user), provider=MCP)
    argument = f"private-argument-{uuid.uuid4().hex}"
    before = len(env.server.requests)

    async def calls(client: Any) -> tuple[str, str, list[float], float]:
        found = await client.call_tool("lookup", {"query": argument})
        progress: list[float] = []
        start = time.monotonic()

        async def on_progress(p: float, total: float | None, message: str | None) -> None:
            progress.append(time.monotonic() - start)

        counted = await client.call_tool("countdown", {"steps": 4, "every": 0.2},
                                         progress_callback=on_progress)
        return (found.content[0].text, counted.content[0].text, progress,
                time.monotonic() - start)

    found, counted, progress, done_at = _session(env, user, mode, calls)
    assert found == f"found {argument}" and counted == "done"
    # Live: four notifications spread over the 0.8 s the tool takes, the first well
    # before the result (a buffered answer would deliver them all at the end).
    assert len(progress) == 4
    assert progress[-1] - progress[0] >= 0.4, progress
    assert done_at - progress[0] >= 0.6, (progress, done_at)
    # The server saw the user's token and never the agent's own credential or context.
    seen = env.server.requests[before:]
    token = env.stack.vault_get(user, MCP).tokens.access_token.reveal()
    assert seen and all(r.header("authorization") == [f"Bearer {token}"] for r in seen)
    assert all(not r.header("x-user-context") for r in seen)
    # The audit names each MCP method and the tool; never the argument.
    assert env.stack.proxy is not None
    assert argument not in env.stack.proxy.stdout_text()
    mine = [a for a in env.stack.audit_records() if a.get("user") == user
            and a["event"] == "credential.injected"]
    called = [a["request"]["mcp"] for a in mine if a["request"]["method"] == "POST"]
    assert {"method": "tools/call", "name": "lookup"} in called
    assert {"method": "tools/call", "name": "countdown"} in called
    assert all(m is not None and isinstance(m["method"], str) for m in called), called
    # The GET that opens the server's own event stream and the DELETE that ends the
    # session carry no JSON-RPC message: no MCP call to name.
    assert all(a["request"]["mcp"] is None for a in mine if a["request"]["method"] != "POST")
    first = "initialize" if mode == "legacy" else "server/discover"
    assert called[0] == {"method": first, "name": None}


@pytest.mark.parametrize("mode", MODES)
def test_a_revoked_grant_is_a_json_rpc_error_with_the_connect_url(env: Env, mode: str
                                                                 ) -> None:
    from mcp import UrlElicitationRequiredError

    user = _user(f"revoked-{mode}")
    grant = env.stack.grant(user, expires_in=0)
    env.stack.vault_put(user, grant, provider=MCP)
    with env.stack.admin() as c:  # the provider revokes the grant
        c.post("/_admin/revoke", json={"refresh_token": grant["refresh_token"]})
    before = len(env.server.requests)
    err = _connect_error(env, user, mode)
    data = err.error.data
    assert data["slug"] == "reauth-required" and data["provider"] == MCP
    assert data["type"] == "urn:credproxy:problem:reauth-required"
    assert data["reason"] == "invalid_grant" and data["status"] == 401
    assert data["connect_url"].endswith(f"/connect/{MCP}")
    assert "connect" in err.error.message.lower() or err.error.message
    # The initialize handshake (2025-11-25) gets the URL elicitation the SDK reads back. In
    # ``auto`` mode the client's server/discover probe (2026-07-28) got -32010 first; the
    # client then falls back to initialize, and gets the same.
    assert err.error.code == wire.URL_ELICITATION_REQUIRED
    elicitations = UrlElicitationRequiredError.from_error(err.error).elicitations
    assert [e.url for e in elicitations] == [data["connect_url"]]
    assert env.server.requests[before:] == []  # nothing reached the server
    denied = [a["request"]["mcp"]["method"] for a in env.stack.audit_records()
              if a.get("user") == user
              and a["event"] in ("reauth.required", "credential.denied")]
    assert denied == (["initialize"] if mode == "legacy" else
                      ["server/discover", "initialize"]), denied


@pytest.mark.parametrize("mode", MODES)
def test_a_scope_challenge_is_a_json_rpc_error_and_the_session_goes_on(env: Env, mode: str
                                                                       ) -> None:
    from mcp import MCPError

    user = _user(f"stepup-{mode}")
    env.stack.vault_put(user, env.stack.grant(user), provider=MCP)  # documents.read

    async def calls(client: Any) -> tuple[Any, str]:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("admin_op", {})
        after = await client.call_tool("lookup", {"query": "still"})
        return caught.value, after.content[0].text

    err, after = _session(env, user, mode, calls)
    data = err.error.data
    assert data["slug"] == "insufficient-scope" and data["provider"] == MCP
    assert data["reason"] == "insufficient_scope" and data["status"] == 403
    assert data["scope"] == "documents.read documents.write"
    assert parse_qs(urlsplit(data["connect_url"]).query) == {
        "scope": ["documents.read documents.write"]}
    assert "documents.write" in err.error.message
    if mode == "legacy":  # 2025-11-25: a URL elicitation
        assert err.error.code == wire.URL_ELICITATION_REQUIRED
        assert data["elicitations"][0]["url"] == data["connect_url"]
    else:  # 2026-07-28 retired -32042: credproxy's own code
        assert err.error.code == wire.CONSENT_REQUIRED and "elicitations" not in data
    assert after == "found still"
    denied = [a for a in env.stack.audit_records() if a.get("user") == user
              and a["event"] == "credential.denied"]
    assert denied and denied[-1]["request"]["mcp"] == {"method": "tools/call",
                                                       "name": "admin_op"}
    assert denied[-1]["upstream_status"] == 403
    # The user consents at the connect URL; the same tool call then works.
    consent_at(env.stack, user, data["connect_url"])

    async def again(client: Any) -> str:
        return str((await client.call_tool("admin_op", {})).content[0].text)

    assert _session(env, user, mode, again) == "admin done"
