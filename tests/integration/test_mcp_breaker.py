"""Issue 15 (remote MCP servers), attacked as a platform engineer would use it: through the
real ``credproxy run`` sidecar, the stack's authorization server (devstack.authserver:
RFC 8414, RFC 7591, RFC 9207, RFC 8707), MCP servers built on the official MCP SDK with
their own RFC 9728 metadata and scope challenges (devstack.streamers.McpProgressServer),
real HTTP clients and a scripted TLS upstream for odd ``WWW-Authenticate`` challenges.

Tests whose docstring starts with ``FAULT`` failed on the product when they were written
(a fresh tester's attack): each says the expected behaviour and the issue item it was
violating; all are fixed. The others are variants where the product held."""

from __future__ import annotations

import json
import ssl
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest

from devstack.stack import Stack, build_stack
from devstack.streamers import McpProgressServer
from proxy import mcp as wire

from .test_mcp_connect import connect_in_browser

pytestmark = pytest.mark.integration

MCP = "remote"  # the MCP server by URL alone
OTHER = "remote2"  # another MCP server by URL alone, same authorization server
STEP = "stepper"  # a plain provider whose upstream answers scripted challenges
AGENT_SECRET = "agent-own-secret-never-forwarded"
ACCEPT = "application/json, text/event-stream"


class ScriptedUpstream:
    """An HTTPS server (the stack's server certificate) answering every request 403 with
    the ``WWW-Authenticate`` field(s) last set in :attr:`challenges`; records the
    ``Authorization`` of each request."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.challenges: list[str] = []
        self.seen: list[str | None] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                upstream.seen.append(self.headers.get("Authorization"))
                body = b'{"error":"insufficient_scope"}'
                self.send_response(403)
                for value in upstream.challenges:
                    self.send_header("WWW-Authenticate", value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Env:
    stack: Stack
    server: McpProgressServer  # MCP, admin_op needs documents.write (advertised)
    other: McpProgressServer  # OTHER, admin_op needs billing.admin (advertised nowhere)
    scripted: ScriptedUpstream


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    stack = build_stack(tmp_path_factory.mktemp("mcp-breaker"), start_proxy=False)
    made: list[Any] = []
    try:
        pki = stack.workdir / "pki"

        def scope_of(token: str) -> str:
            return str(stack.introspect(token).get("scope", ""))

        server = McpProgressServer(pki / "server.pem", pki / "server.key",
                                   scoped={"admin_op": "documents.write"},
                                   token_scope=scope_of, issuer=stack.auth.url,
                                   introspect=stack.introspect)
        made.append(server)
        other = McpProgressServer(pki / "server.pem", pki / "server.key",
                                  scoped={"admin_op": "billing.admin"},
                                  token_scope=scope_of, issuer=stack.auth.url,
                                  introspect=stack.introspect)
        made.append(other)
        scripted = ScriptedUpstream(pki / "server.pem", pki / "server.key")
        made.append(scripted)
        docs = stack.config["providers"][0]
        stack.config["providers"] += [
            {"id": MCP, "mcp": server.url},
            {"id": OTHER, "mcp": other.url},
            {**docs, "id": STEP, "hosts": [f"localhost:{scripted.port}"],
             "scopes": ["documents.read", "documents.write"]},
        ]
        stack.write_config()
        stack.start_proxy()
        yield Env(stack, server, other, scripted)
    finally:
        stack.close()
        for m in made:
            m.close()


def _user(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _post(stack: Stack, url: str, user: str, body: Any, *,
          headers: dict[str, str] | None = None,
          fields: list[tuple[str, str]] | None = None) -> httpx2.Response:
    """One Streamable HTTP POST as an MCP client sends it, through the sidecar, with the
    agent's own Authorization."""
    sent = [("X-User-Context", stack.context(user)), ("Accept", ACCEPT),
            ("Content-Type", "application/json"),
            ("Authorization", f"Bearer {AGENT_SECRET}"),
            *(headers or {}).items(), *(fields or [])]
    with httpx2.Client(proxy=stack.proxy_url, verify=stack.mitm_tls(), timeout=30,
                       trust_env=False) as c:
        return c.post(url, content=json.dumps(body).encode(), headers=sent)


def _call(name: str, rid: int | str | None = 1, **args: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": "tools/call",
                           "params": {"name": name, "arguments": args}}
    if rid is not None:
        msg["id"] = rid
    return msg


def _connect(env: Env, user: str, url: str) -> str:
    """Connect ``user`` to the MCP server at ``url`` the way a user does: the refusal's
    connect URL, then the browser. Returns the access token the grant holds."""
    r = _post(env.stack, url, user, _call("lookup", query="x"))
    assert r.status_code == 200, r.text
    connect_url = r.json()["error"]["data"]["connect_url"]
    connect_in_browser(env.stack, user, connect_url)
    provider = MCP if url == env.server.url else OTHER
    grant = env.stack.vault_get(user, provider)
    assert grant is not None
    return str(grant.tokens.access_token.reveal())


def _revoke(stack: Stack, user: str, provider: str) -> None:
    """``credproxy revoke`` as an operator runs it."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "proxy.cli", "revoke", "--config",
                          str(stack.config_path), "--user", user, "--provider", provider],
                         env={**os.environ, **stack.env}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _injected(stack: Stack, user: str) -> list[dict[str, Any]]:
    return [a for a in stack.audit_records() if a.get("user") == user
            and a["event"] == "credential.injected"]


# -- item 7: the audit names the tool really called -------------------------------------------

@pytest.mark.parametrize(("claimed", "header_name"), [
    pytest.param({"Mcp-Method": "tools/call", "Mcp-Name": "lookup"}, "lookup",
                 id="name-header-lies"),
    pytest.param({"Mcp-Method": "tools/list"}, None, id="method-header-lies"),
    pytest.param({"Mcp-Method": "ping", "Mcp-Name": ""}, "", id="empty-name-header"),
])
def test_the_audit_names_the_tool_the_body_calls_not_the_one_a_header_claims(
        env: Env, claimed: dict[str, str], header_name: str | None) -> None:
    """Was a FAULT (item 7, audit per tool): a small ``tools/call`` whose body calls ``admin_op``
    while its ``Mcp-Method`` / ``Mcp-Name`` headers claim something else is audited as what
    the headers claim. The issue says headers first *falling back* to the body; but when
    the body was read and says otherwise, the header is a lie (MCP 2026-07-28 has servers
    reject a header that does not match the body). Expected: the audit names the method
    and tool of the body (``tools/call``, ``admin_op``), or the request is refused; a
    (prompt-injected) agent must not be able to hide which tool it called."""
    user = _user("audit-lie")
    _connect(env, user, env.server.url)
    before = len(_injected(env.stack, user))
    _post(env.stack, env.server.url, user, _call("admin_op"),
          headers={"MCP-Protocol-Version": "2026-07-28", **claimed})
    records = _injected(env.stack, user)[before:]
    if not records:  # refused: then it must say so
        denied = [a for a in env.stack.audit_records() if a.get("user") == user
                  and a["event"] == "credential.denied"]
        assert denied, "neither injected nor denied"
        return
    assert [r["request"]["mcp"] for r in records] == [
        {"method": "tools/call", "name": "admin_op"}], (header_name, records)


def test_the_audit_names_each_tool_of_a_batch(env: Env) -> None:
    """Was a FAULT (item 7, audit per tool): a JSON-RPC batch (MCP 2025-03-26 Streamable HTTP)
    calling ``lookup`` and ``admin_op`` in one POST is audited as method ``batch`` with no
    name, so "which tools did alice's agent call" has no answer for it. Expected: the
    audit names every tool the batch calls (one record per call, or the names listed)."""
    user = _user("audit-batch")
    _connect(env, user, env.server.url)
    before = len(_injected(env.stack, user))
    _post(env.stack, env.server.url, user, [_call("lookup", 1, query="a"),
                                            _call("admin_op", 2)],
          headers={"MCP-Protocol-Version": "2025-03-26"})
    records = _injected(env.stack, user)[before:]
    assert records, "nothing injected"
    named = json.dumps([r["request"]["mcp"] for r in records])
    assert "lookup" in named and "admin_op" in named, named


def test_a_resource_name_in_the_audit_drops_its_query(env: Env) -> None:
    """Holds (item 7): ``resources/read`` is audited with the URI minus its query (which
    may carry personal data), never the argument values."""
    user = _user("audit-res")
    _connect(env, user, env.server.url)
    before = len(_injected(env.stack, user))
    body = {"jsonrpc": "2.0", "id": 3, "method": "resources/read",
            "params": {"uri": "file:///notes/alice.txt?secret=s3cr3t#frag"}}
    _post(env.stack, env.server.url, user, body,
          headers={"MCP-Protocol-Version": "2025-11-25"})
    records = _injected(env.stack, user)[before:]
    assert [r["request"]["mcp"] for r in records] == [
        {"method": "resources/read", "name": "file:///notes/alice.txt"}]
    assert env.stack.proxy is not None
    assert "s3cr3t" not in env.stack.proxy.stdout_text() + env.stack.proxy.stderr_text()


# -- item 6: refusals in the agent's protocol -------------------------------------------------

@pytest.mark.parametrize(("body", "status", "ids"), [
    pytest.param(_call("lookup", 7, query="q"), 200, [7], id="int-id"),
    pytest.param(_call("lookup", 0, query="q"), 200, [0], id="zero-id"),
    pytest.param(_call("lookup", "abc", query="q"), 200, ["abc"], id="string-id"),
    pytest.param({"jsonrpc": "2.0", "method": "notifications/initialized"}, 403, [None],
                 id="notification"),
    pytest.param([_call("lookup", 1, query="q"),
                  {"jsonrpc": "2.0", "method": "notifications/initialized"},
                  _call("lookup", "two", query="q")], 200, [1, "two"], id="batch-mixed"),
    pytest.param([{"jsonrpc": "2.0", "method": "notifications/initialized"}], 403, [None],
                 id="batch-of-notifications"),
    pytest.param({"jsonrpc": "2.0", "id": 5, "result": {}}, 403, [None],
                 id="client-response"),
    pytest.param({"jsonrpc": "2.0", "id": 6, "error": {"code": -1, "message": "no"}}, 403,
                 [None], id="client-error-response"),
])
def test_a_missing_connection_is_a_json_rpc_error_never_a_401(
        env: Env, body: Any, status: int, ids: list[Any]) -> None:
    """Item 6: every JSON-RPC shape without a connection gets a JSON-RPC error with the
    slug, reason and connect URL in ``data`` (one per request id; ``id: null`` with a 403
    for what has no id), never a 401 nor a ``WWW-Authenticate``; nothing is sent.

    FAULT for ``client-response`` / ``client-error-response``: a JSON-RPC *response* the
    client POSTs (its answer to a server's sampling or elicitation request; proxy/mcp.py
    says it is answered 403 with an ``id: null`` error) is not recognised as MCP (no
    ``method``) and gets the RFC 9457 401 ``reauth-required`` with ``WWW-Authenticate``:
    the bare 401 item 6 forbids, which starts the MCP client's own OAuth dance against the
    server's authorization server."""
    user = _user("shape")
    before = len(env.server.requests)
    r = _post(env.stack, env.server.url, user, body,
              headers={"MCP-Protocol-Version": "2026-07-28"})
    assert r.status_code == status, r.text
    assert "www-authenticate" not in r.headers
    got = r.json()
    answers = got if isinstance(got, list) else [got]
    assert [a["id"] for a in answers] == ids
    for a in answers:
        data = a["error"]["data"]
        assert (data["slug"], data["reason"]) == ("reauth-required", "no_connection")
        assert data["connect_url"].endswith(f"/connect/{MCP}")
        assert a["error"]["code"] == wire.CONSENT_REQUIRED
    assert env.server.requests[before:] == []


@pytest.mark.parametrize(("method", "headers"), [
    pytest.param("GET", {"Accept": "text/event-stream", "Mcp-Session-Id": "s-1",
                         "MCP-Protocol-Version": "2025-11-25"}, id="get-event-stream"),
    pytest.param("DELETE", {"Mcp-Session-Id": "s-1", "MCP-Protocol-Version": "2025-11-25"},
                 id="delete-session"),
    pytest.param("GET", {"Accept": "text/event-stream", "Mcp-Session-Id": "s-1",
                         "Last-Event-ID": "e-9"}, id="get-resume"),
])
def test_the_transports_get_and_delete_never_get_a_401(
        env: Env, method: str, headers: dict[str, str]) -> None:
    """Was a FAULT (item 6, never a bare 401): the Streamable HTTP transport's other requests,
    the GET that opens (or resumes) the server's event stream and the DELETE that ends a
    session, both marked MCP by ``Mcp-Session-Id``, get the RFC 9457 401 with
    ``WWW-Authenticate`` when the user has no connection (the real SDK client logs
    "Session termination failed: 401" after a revocation). An MCP client answers a 401
    with its own OAuth flow against the server's authorization server. Expected: no 401
    and no ``WWW-Authenticate`` (a 403 with the JSON-RPC error and ``id: null``, as for a
    notification), with the connect URL; nothing sent upstream."""
    user = _user("transport")
    before = len(env.server.requests)
    with httpx2.Client(proxy=env.stack.proxy_url, verify=env.stack.mitm_tls(), timeout=30,
                       trust_env=False) as c:
        r = c.request(method, env.server.url, headers={
            "X-User-Context": env.stack.context(user), **headers})
    assert env.server.requests[before:] == []
    assert r.status_code != 401 and "www-authenticate" not in r.headers, (
        r.status_code, dict(r.headers), r.text[:300])
    assert r.json()["error"]["data"]["connect_url"].endswith(f"/connect/{MCP}")


@pytest.mark.parametrize(("framing", "headers"), [
    pytest.param("chunked", {"MCP-Protocol-Version": "2025-11-25"}, id="chunked"),
    pytest.param("gzip", {"Mcp-Session-Id": "s-1"}, id="gzip"),
    pytest.param("large", {"MCP-Protocol-Version": "2025-11-25"}, id="over-64k"),
    pytest.param("chunked", {"Mcp-Method": "tools/call", "Mcp-Name": "lookup"},
                 id="chunked-with-mcp-method"),
])
def test_an_mcp_post_read_only_by_its_headers_never_gets_a_401(
        env: Env, framing: str, headers: dict[str, str]) -> None:
    """Item 6 (never a bare 401 to an MCP client): a Streamable HTTP POST of a JSON-RPC
    request that the sidecar does not read before deciding (sent chunked, without
    ``Content-Length``; gzip-compressed; over 64 KiB) is recognisably MCP by its headers
    (``Accept: text/event-stream``, ``MCP-Protocol-Version``, ``Mcp-Session-Id``).
    Expected: no 401 and no ``WWW-Authenticate`` (the 403 JSON-RPC error with ``id: null``
    README promises for what it cannot read), the connect URL in ``data``; nothing sent.
    FAULT for ``chunked``, ``gzip``, ``over-64k``: without an ``Mcp-Method`` header these
    get the RFC 9457 401 with ``WWW-Authenticate`` (a chunked small body is not even in
    README's list of bodies not read)."""
    import gzip

    user = _user("framing")
    raw = json.dumps(_call("lookup", 4, query="q" * (70_000 if framing == "large" else 1)))
    sent = {"X-User-Context": env.stack.context(user), "Accept": ACCEPT,
            "Content-Type": "application/json", **headers}
    content: Any = raw.encode()
    if framing == "gzip":
        content = gzip.compress(content)
        sent["Content-Encoding"] = "gzip"
    elif framing == "chunked":
        body = content

        def chunks() -> Iterator[bytes]:
            yield body

        content = chunks()
    before = len(env.server.requests)
    with httpx2.Client(proxy=env.stack.proxy_url, verify=env.stack.mitm_tls(), timeout=30,
                       trust_env=False) as c:
        r = c.post(env.server.url, content=content, headers=sent)
    assert env.server.requests[before:] == []
    assert r.status_code != 401 and "www-authenticate" not in r.headers, (
        r.status_code, r.text[:200])
    assert r.json()["error"]["data"]["connect_url"].endswith(f"/connect/{MCP}")


def test_a_large_tool_call_on_a_revoked_grant_reaches_the_sdk_client_as_json_rpc(
        env: Env) -> None:
    """Was a FAULT (item 6, re-auth in the agent's protocol): a ``tools/call`` whose body is over
    64 KiB (a tool argument carrying a document) on a grant the user no longer has is not
    read before the decision; the real SDK client (2025-11-25: no ``Mcp-Method`` header)
    gets the RFC 9457 401 and raises ``-32603 Server returned an error response`` with no
    data: no slug, no connect URL (README documents the 64 KiB limit, but the issue says an
    MCP client must get an answer it understands, never a bare 401). Expected: the client
    gets an MCPError whose data carries the slug and the ``connect_url`` (the proxy may
    read a larger body, or answer the JSON-RPC error without the id it could not read)."""
    import asyncio

    from mcp import Client, MCPError
    from mcp.client.streamable_http import streamable_http_client

    user = _user("large")
    _connect(env, user, env.server.url)

    async def run() -> Any:
        tls = ssl.create_default_context(cafile=str(env.stack.mitm_ca))
        headers = {"X-User-Context": env.stack.context(user)}
        async with httpx2.AsyncClient(proxy=env.stack.proxy_url, verify=tls, headers=headers,
                                      trust_env=False, timeout=httpx2.Timeout(30)) as http, \
                Client(streamable_http_client(env.server.url, http_client=http),
                       mode="legacy") as client:
            await client.call_tool("lookup", {"query": "small"})
            # An operator offboards the user (credproxy revoke) mid-session.
            await asyncio.to_thread(_revoke, env.stack, user, MCP)
            try:
                await asyncio.wait_for(client.call_tool("lookup", {"query": "y" * 70_000}),
                                       20)
            except MCPError as exc:
                return exc.error
            except Exception as exc:  # noqa: BLE001 - what the client raised instead
                return exc
            return "the call worked"

    try:
        got = asyncio.run(run())
    except BaseExceptionGroup as group:
        got = group
    assert not isinstance(got, BaseException) and not isinstance(got, str), repr(got)
    assert isinstance(got.data, dict), (got.code, got.message, got.data)
    assert got.data["slug"] == "reauth-required"
    assert got.data["connect_url"].endswith(f"/connect/{MCP}")


# -- item 5: step-up ----------------------------------------------------------------------------

@pytest.mark.parametrize("challenges", [
    pytest.param(['Bearer error="insufficient_scope", scope="documents.write"'], id="plain"),
    pytest.param(['Bearer error="insufficient_scope",scope=documents.write'],
                 id="token-form-no-space"),
    pytest.param(['Bearer realm="api", Error = "insufficient_scope", SCOPE = '
                  '"documents.write"'], id="case-and-bws"),
    pytest.param(['Basic realm="x"', 'Bearer error="insufficient_scope", '
                  'scope="documents.write"'], id="two-fields"),
    pytest.param(['Bearer error="insufficient_scope", scope="documents.write", '
                  'error_description="scope=other"'], id="description-after"),
    pytest.param(['Bearer error_description="this call needs scope=admin.everything", '
                  'error="insufficient_scope", scope="documents.write"'],
                 id="description-before"),
    pytest.param(['Bearer realm="tenant scope=admin.everything", '
                  'error="insufficient_scope", scope="documents.write"'],
                 id="realm-before"),
    pytest.param(['Bearer error="insufficient_scope", scope="documents.write \\"x\\""'],
                 id="escaped-quotes"),
])
def test_a_scope_challenge_asks_for_exactly_the_challenged_scope(
        env: Env, challenges: list[str]) -> None:
    """Item 5 (step-up, any provider): the refusal names the union of the grant's scopes
    and the challenged ones (RFC 6750 section 3: ``scope`` is the auth-param of the
    Bearer challenge; RFC 9110 section 11.2: auth-param names are case-insensitive, BWS
    around ``=``, a quoted-string's content is opaque), and its connect URL asks for
    exactly that. FAULT for ``description-before`` / ``realm-before``: ``scope=`` inside
    another parameter's quoted string is read as the challenge's scope, so the user is
    sent to consent to the wrong scope (``admin.everything``) and never gets
    ``documents.write``."""
    user = _user("challenge")
    env.scripted.challenges = challenges
    env.stack.vault_put(user, env.stack.grant(user), provider=STEP)
    with env.stack.client(context=env.stack.context(user)) as c:
        r = c.get(f"https://localhost:{env.scripted.port}/documents")
    assert r.status_code == 403, r.text
    body = r.json()
    assert body["type"] == "urn:credproxy:problem:insufficient-scope", body
    assert body["scope"].split() == ["documents.read", "documents.write"], body
    assert parse_qs(urlsplit(body["connect_url"]).query)["scope"] == [
        "documents.read documents.write"]
    assert env.stack.vault_get(user, STEP).status.value == "active"


def test_a_challenge_for_a_scope_nobody_advertises_does_not_send_the_user_to_a_dead_link(
        env: Env) -> None:
    """Was a FAULT (item 5, step-up): an MCP server (by URL alone) challenges a tool call for
    ``billing.admin``, a scope neither its resource metadata nor its authorization server
    advertise. The refusal hands the user a ``connect_url`` asking for it and says only
    "the user must consent ... at connect_url"; following it fails (``scope_not_allowed``).
    Expected: either the link works, or the refusal says up front that the scope is beyond
    what the server advertises (as it says "an operator must add" for configured
    providers), so the user is not sent to a dead link."""
    user = _user("unadvertised")
    _connect(env, user, env.other.url)
    r = _post(env.stack, env.other.url, user, _call("admin_op", 9),
              headers={"MCP-Protocol-Version": "2026-07-28"})
    assert r.status_code == 200, r.text
    error = r.json()["error"]
    assert error["data"]["slug"] == "insufficient-scope", error
    assert "billing.admin" in error["data"]["scope"].split()
    sep = "&" if "?" in error["data"]["connect_url"] else "?"
    with httpx2.Client(verify=env.stack.admin_tls(), follow_redirects=False, timeout=30,
                       trust_env=False) as b:
        followed = b.get(f"{error['data']['connect_url']}{sep}"
                         f"{httpx2.QueryParams({'context': env.stack.context(user)})}")
    if followed.status_code == 302:
        return  # the link works
    assert "advertise" in error["message"] or "operator" in error["message"], (
        error["message"], followed.status_code, followed.text[:300])


# -- items 3 and 8: resource-bound tokens, two servers, the agent's Authorization ----------

def test_two_mcp_servers_sharing_an_authorization_server_never_share_a_token(
        env: Env) -> None:
    """Holds (item 3): a user connected to one MCP server only gets a JSON-RPC error with
    the other server's connect URL there, and nothing is sent to it; once connected to
    both, each server gets its own token, bound to it (audience)."""
    user = _user("two")
    token = _connect(env, user, env.server.url)
    before = len(env.other.requests)
    r = _post(env.stack, env.other.url, user, _call("lookup", 1, query="q"))
    assert r.json()["error"]["data"]["connect_url"].endswith(f"/connect/{OTHER}")
    assert env.other.requests[before:] == []
    other_token = _connect(env, user, env.other.url)
    assert other_token != token
    assert env.stack.introspect(token)["aud"] == env.server.url
    assert env.stack.introspect(other_token)["aud"] == env.other.url
    seen = [h for s in env.other.requests for h in s.header("authorization")]
    assert f"Bearer {token}" not in seen


@pytest.mark.parametrize("fields", [
    pytest.param([("Authorization", f"Bearer {AGENT_SECRET}")], id="one"),
    pytest.param([("authorization", f"Bearer {AGENT_SECRET}-2"),
                  ("AUTHORIZATION", f"Basic {AGENT_SECRET}-3")], id="repeated-cases"),
    pytest.param([("Authorization", "")], id="empty"),
])
def test_the_agents_own_authorization_never_reaches_the_mcp_server(
        env: Env, fields: list[tuple[str, str]]) -> None:
    """Holds (item 8): whatever ``Authorization`` fields the agent sends, the MCP server
    sees exactly one, the user's token."""
    user = _user("agentauth")
    token = _connect(env, user, env.server.url)
    before = len(env.server.requests)
    _post(env.stack, env.server.url, user, _call("lookup", 1, query="q"), fields=fields)
    seen = env.server.requests[before:]
    assert seen and all(s.header("authorization") == [f"Bearer {token}"] for s in seen)


def test_the_mcp_token_goes_only_to_the_mcp_resource(env: Env) -> None:
    """Was a FAULT (item 3, resource-bound tokens): the provider is the MCP server *by its URL*
    (the resource, RFC 8707 section 2: path included), but its ``hosts`` default to the
    URL's host and the user's token is injected into a request for any path on it, here
    ``/admin/export``, another application on the same host that is not the resource.
    Expected: the token goes only to the resource (the MCP URL and what is under it; its
    RFC 9728 metadata), other paths get no credential (or a refusal)."""
    user = _user("path")
    token = _connect(env, user, env.server.url)
    base = env.server.url.rsplit("/mcp", 1)[0]
    before = len(env.server.requests)
    with env.stack.client(context=env.stack.context(user)) as c:
        c.get(f"{base}/admin/export")
    seen = [h for s in env.server.requests[before:] if s.path == "/admin/export"
            for h in s.header("authorization")]
    assert f"Bearer {token}" not in seen, "the MCP grant's token went to /admin/export"


def test_each_url_elicitation_has_its_own_id(env: Env) -> None:
    """Was a FAULT (item 6, URL-mode elicitation; MCP 2025-11-25 "Elicitation": ``elicitationId``
    identifies one elicitation, the server's ``notifications/elicitation/complete`` names
    it): every refusal carries the same ``elicitationId`` (``credproxy-reauth-required``),
    for every user, server and request, so a client tracking elicitations cannot tell two
    apart. Expected: a distinct id per elicitation."""
    ids = []
    for _ in range(2):
        r = _post(env.stack, env.server.url, _user("elicit"), _call("lookup", 1, query="q"),
                  headers={"MCP-Protocol-Version": "2025-11-25"})
        error = r.json()["error"]
        assert error["code"] == wire.URL_ELICITATION_REQUIRED, error
        ids.append(error["data"]["elicitations"][0]["elicitationId"])
    assert ids[0] != ids[1], ids


def test_no_token_nor_agent_secret_in_the_sidecars_output(env: Env) -> None:
    """Holds ("secrets in logs"): after everything above (connects, tool calls, refusals,
    challenges), no access or refresh token the authorization server issued, no tool
    argument and none of the agent's own credentials appear in the sidecar's audit or log
    output."""
    assert env.stack.proxy is not None
    out = env.stack.proxy.stdout_text() + env.stack.proxy.stderr_text()
    issued = env.stack.issued_tokens()
    assert issued
    assert [t for t in issued if t in out] == []
    assert AGENT_SECRET not in out and "y" * 1000 not in out


# -- item 3: a grant is bound to its resource ---------------------------------------------------

def test_a_grant_for_one_mcp_url_is_not_sent_to_the_next_one(env: Env) -> None:
    """Was a FAULT (item 3, grants keyed by (user, resource, issuer)): the operator points the
    provider at another MCP server (``mcp:`` edited, sidecar restarted); the user's grant
    minted for the old server (``mcp_resource``) is injected into requests to the new one,
    which receives a token bound to another resource. Expected: the grant's resource is
    not the provider's now, so the user gets a JSON-RPC ``reauth-required`` with the
    connect URL and the new server receives no token of the old grant. (Runs last: it
    rewrites the module's configuration.)"""
    user = _user("moved")
    token = _connect(env, user, env.server.url)
    stack = env.stack
    for p in stack.config["providers"]:
        if p["id"] == MCP:
            p["mcp"] = env.other.url
        if p["id"] == OTHER:
            p["mcp"] = env.server.url
    stack.write_config()
    assert stack.proxy is not None
    stack.proxy.close()
    stack.start_proxy()
    before = len(env.other.requests)
    r = _post(stack, env.other.url, user, _call("lookup", 1, query="q"))
    seen = [h for s in env.other.requests[before:] for h in s.header("authorization")]
    assert f"Bearer {token}" not in seen, "the old server's token reached the new server"
    assert r.status_code == 200, r.text
    assert r.json()["error"]["data"]["slug"] == "reauth-required"
