"""Issue 15 (remote MCP servers), attacked at the unit level: discovery (proxy.mcpauth) and
the connect flow (proxy.connect.Connector, real vault and coordination) against real
loopback HTTP servers that lie, stall or answer malformed registrations.

Tests whose docstring starts with ``FAULT`` failed on the product when they were written
(a fresh tester's attack): each says the expected behaviour and the issue item it was
violating; all are fixed. The others are variants where the product held."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from proxy.mcpauth import MIN_TTL, Discovery, McpDiscoveryError
from proxy.provider_client import ProviderClient
from proxy.secret import Secret
from proxy.settings import RefreshSettings
from tests.proxy import test_mcpauth as base
from tests.proxy.conftest import live_config
from tests.proxy.oauthfake import Answer, FakeOAuth
from tests.proxy.test_mcpauth import Clock, as_metadata, query, script_server

# The discovery suite's fixtures: a scriptable OAuth server, a provider client, and the
# connect flow of an mcp provider over them.
fake = base.fake
client = base.client
flow = base.flow

# -- a server that stalls: answers 200 and drips its body a byte at a time -------------------


@pytest.fixture
async def dripping() -> AsyncIterator[str]:
    """An HTTP server whose every answer is a 200 JSON body sent one space every 0.2 s,
    forever (each read is quick: no read timeout ever fires)."""

    async def drip(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            while True:
                await resp.write(b" ")
                await asyncio.sleep(0.2)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", drip)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.mark.parametrize("stalls", ["resource-metadata", "authorization-server-metadata"])
async def test_discovery_from_a_stalling_server_gives_up_in_bounded_time(
        fake: FakeOAuth, dripping: str, stalls: str) -> None:
    """Holds (item 1, discovery; "slow metadata"): a metadata URL that answers 200 and
    then sends its body a byte every 0.2 s (no single read ever times out) does not keep
    discovery (the user's connect, or an agent's request whose 401 re-runs discovery)
    waiting: it fails within a bound of the configured timeout (1 s per attempt, 2
    attempts: well under 10 s)."""
    c = ProviderClient(live_config(refresh=RefreshSettings(attempts=2, backoff=0,
                                                           timeout=1)))
    try:
        server = f"{fake.base}/mcp"
        if stalls == "resource-metadata":
            fake.script("/mcp", Answer(401, b"", headers=(
                ("WWW-Authenticate", f'Bearer resource_metadata="{dripping}/prm"'),)))
        else:
            fake.script("/mcp", Answer(401, b""))
            fake.script("/.well-known/oauth-protected-resource/mcp", Answer.json(
                resource=server, authorization_servers=[f"{dripping}/as"]))
        started = time.monotonic()
        try:
            await asyncio.wait_for(Discovery(c).discover(server, allow_http=True), 10)
        except McpDiscoveryError as exc:
            assert exc.reason in ("mcp_discovery_unavailable", "mcp_metadata_invalid")
        except TimeoutError:
            pytest.fail(f"discovery still waiting after {time.monotonic() - started:.0f} s "
                        "on a server that drips its metadata")
        else:
            pytest.fail("discovery succeeded on a body of spaces")
    finally:
        await c.aclose()


# -- metadata that lies: every variant is refused with a clear reason -------------------------

@pytest.mark.parametrize(("prm", "meta", "reason"), [
    pytest.param(Answer(302, b"", headers=(("Location", "https://evil.example/prm"),)),
                 None, "mcp_discovery_unavailable", id="prm-redirects-away"),
    pytest.param(None, Answer(307, b"", headers=(("Location", "https://evil.example/m"),)),
                 "mcp_discovery_unavailable", id="as-metadata-redirects-away"),
    pytest.param(None, Answer(200, b'{"issuer": "' + b"x" * 300_000 + b'"}'),
                 "mcp_metadata_invalid", id="as-metadata-huge"),
    pytest.param(None, Answer(200, b"<html>hello</html>", content_type="text/html"),
                 "mcp_metadata_invalid", id="as-metadata-html"),
    pytest.param(None, "S256-as-string", "mcp_metadata_invalid", id="pkce-not-a-list"),
    pytest.param(None, {"code_challenge_methods_supported": ["plain"]},
                 "mcp_pkce_unsupported", id="pkce-plain-only"),
    pytest.param(None, {"code_challenge_methods_supported": ["s256"]},
                 "mcp_pkce_unsupported", id="pkce-lowercase"),
    pytest.param(None, {"code_challenge_methods_supported": []}, "mcp_pkce_unsupported",
                 id="pkce-empty"),
    pytest.param(None, {"authorization_endpoint": "javascript:alert(1)"},
                 "mcp_metadata_invalid", id="authorize-javascript"),
    pytest.param(None, {"token_endpoint": "//evil.example/token"}, "mcp_metadata_invalid",
                 id="token-relative"),
    pytest.param(None, {"token_endpoint": ["https://a/token"]}, "mcp_metadata_invalid",
                 id="token-not-a-string"),
    pytest.param(None, {"authorization_endpoint": "https://as.example/authorize#frag"},
                 "mcp_metadata_invalid", id="authorize-fragment"),
    pytest.param(None, "issuer-trailing-slash", "mcp_issuer_mismatch",
                 id="issuer-trailing-slash"),
    pytest.param(None, "issuer-missing", "mcp_issuer_mismatch", id="issuer-missing"),
    pytest.param("resource-missing", None, "mcp_resource_mismatch", id="prm-no-resource"),
    pytest.param("resource-slash", None, "mcp_resource_mismatch", id="prm-resource-slash"),
    pytest.param("resource-other-host", None, "mcp_resource_mismatch",
                 id="prm-resource-other-host"),
    pytest.param("no-servers", None, "mcp_no_authorization_server", id="prm-no-servers"),
    pytest.param("servers-string", None, "mcp_metadata_invalid", id="prm-servers-string"),
    pytest.param("prm-array", None, "mcp_metadata_invalid", id="prm-array"),
])
async def test_lying_metadata_is_refused_with_a_clear_reason(
        fake: FakeOAuth, client: ProviderClient, prm: Any, meta: Any, reason: str) -> None:
    """Holds (item 1): redirects are not followed, a huge or non-JSON document, PKCE
    without S256, endpoints that are not absolute https/http URLs, an issuer or resource
    that is not the one asked for: each is refused naming why; nothing is cached."""
    server = script_server(fake, prm_path="/prm")
    issuer = f"{fake.base}/as"
    prm_answers: dict[str, Answer] = {
        "resource-missing": Answer.json(authorization_servers=[issuer]),
        "resource-slash": Answer.json(resource=server + "/", authorization_servers=[issuer]),
        "resource-other-host": Answer.json(resource="https://mcp.evil.example/mcp",
                                           authorization_servers=[issuer]),
        "no-servers": Answer.json(resource=server, authorization_servers=[]),
        "servers-string": Answer.json(resource=server, authorization_servers=issuer),
        "prm-array": Answer(200, b"[]"),
    }
    if isinstance(prm, Answer):
        fake.script("/prm", prm)
    elif isinstance(prm, str):
        fake.script("/prm", prm_answers[prm])
    path = "/.well-known/oauth-authorization-server/as"
    if isinstance(meta, Answer):
        fake.script(path, meta)
    elif meta == "S256-as-string":
        fake.script(path, Answer.json(**as_metadata(issuer,
                                                    code_challenge_methods_supported="S256")))
    elif meta == "issuer-trailing-slash":
        fake.script(path, Answer.json(**{**as_metadata(issuer), "issuer": issuer + "/"}))
    elif meta == "issuer-missing":
        doc = as_metadata(issuer)
        del doc["issuer"]
        fake.script(path, Answer.json(**doc))
    elif isinstance(meta, dict):
        fake.script(path, Answer.json(**as_metadata(issuer, **meta)))
    discovery = Discovery(client)
    with pytest.raises(McpDiscoveryError) as caught:
        await discovery.discover(server, allow_http=True)
    assert caught.value.reason == reason, caught.value.detail
    assert caught.value.detail
    assert "evil.example/m" not in [s.path for s in fake.seen]


@pytest.mark.parametrize(("cache_control", "lifetime"), [
    pytest.param("max-age=0", MIN_TTL, id="zero-raised-to-minimum"),
    pytest.param("max-age=99999999999999999999", 600.0, id="huge-capped"),
    pytest.param("public, max-age=120", 120.0, id="shortened"),
    pytest.param("max-age=-5", 600.0, id="negative-ignored"),
    pytest.param("no-store", 600.0, id="no-store-bounded"),
])
async def test_max_age_cannot_stretch_or_thrash_the_metadata_cache(
        fake: FakeOAuth, client: ProviderClient, cache_control: str, lifetime: float) -> None:
    """Holds (item 1, "metadata cached with a bound lifetime"): whatever ``Cache-Control``
    says, what discovery found lives between 30 s and 10 min."""
    server = script_server(fake)
    issuer = f"{fake.base}/as"
    fake.script("/.well-known/oauth-authorization-server/as",
                Answer(200, Answer.json(**as_metadata(issuer)).body,
                       headers=(("Cache-Control", cache_control),)))
    clock = Clock()
    found = await Discovery(client, clock=clock).discover(server, allow_http=True)
    assert found.expires_at - clock.now == pytest.approx(lifetime)


# -- item 2: registration answers that are malformed ------------------------------------------

@pytest.mark.parametrize(("answer", "reason", "named"), [
    pytest.param(Answer.json(201, client_id=5), "mcp_registration_failed", None,
                 id="client-id-number"),
    pytest.param(Answer.json(201, client_id=""), "mcp_registration_failed", None,
                 id="client-id-empty"),
    pytest.param(Answer.json(201, client_secret="s"), "mcp_registration_failed", None,
                 id="client-id-missing"),
    pytest.param(Answer(500, b"oops"), "mcp_registration_failed", None, id="server-error"),
    pytest.param(Answer(200, b"<html>registered!</html>", content_type="text/html"),
                 "mcp_registration_failed", None, id="html"),
    pytest.param(Answer(201, b"[]"), "mcp_registration_failed", None, id="json-array"),
    pytest.param(Answer.json(400, error="invalid_redirect_uri",
                             error_description="loopback redirect URIs are not allowed"),
                 "mcp_registration_failed", "invalid_redirect_uri", id="rfc7591-error"),
    pytest.param(Answer.json(201, client_id="c-1",
                             token_endpoint_auth_method="client_secret_basic"),
                 "mcp_registration_failed", None, id="confidential-without-secret"),
])
async def test_a_malformed_registration_answer_is_refused_naming_registration(
        flow: Any, fake: FakeOAuth, answer: Answer, reason: str, named: str | None) -> None:
    """Item 2 (dynamic client registration, RFC 7591 section 3.2): an answer without a
    usable ``client_id`` is refused before any authorize URL is built, with reason
    ``mcp_registration_failed`` and a detail naming what the server said.

    FAULT for ``html`` / ``json-array``: the reason is ``mcp_metadata_invalid`` (as if the
    authorization server's *metadata* were wrong). FAULT for ``rfc7591-error``: the detail
    says only "answered HTTP 400", not the RFC 7591 section 3.2.2 ``error``
    (``invalid_redirect_uri``) the operator must act on. FAULT for
    ``confidential-without-secret``: the server registered a confidential client
    (``client_secret_basic``) but gave no secret; the sign-in goes on and the code is
    exchanged with HTTP Basic ``c-1:None`` (authlib formats the missing secret as the
    string ``None``) instead of being refused at registration."""
    from proxy.connect import ConnectRejected

    connector, vault, out, _ = await flow(client_id_metadata_document_supported=False)
    fake.script("/as/register", answer)
    try:
        url = await connector.begin("alice", "linear", redirect_uri="http://127.0.0.1/cb")
    except ConnectRejected as exc:
        assert exc.reason == reason, (exc.reason, exc.detail)
        if named is not None:
            assert named in exc.detail, exc.detail
        assert await vault.get("alice", "linear") is None
        assert reason in out.getvalue()
        return
    # Not refused at registration: the flow goes on; say what the token endpoint got.
    q = query(url)
    try:
        await connector.complete({"state": q["state"], "code": "c", "iss": f"{fake.base}/as"})
    except ConnectRejected as exc:
        pytest.fail(f"registration accepted; the sign-in failed later: {exc.reason}")
    sent = fake.requests("/as/token")
    pytest.fail(f"registration accepted and the code exchanged with "
                f"{sent[-1].headers.get('authorization')!r} {sent[-1].form}")


# -- item 2: a pre-registered client's secret stays with its authorization server -------------

def _pre_registered(server: str, issuer: str) -> Any:
    from proxy.settings import parse_settings
    return parse_settings({
        "identity": {"issuer": "i", "audience": "a", "hs256_secret_env": "X",
                     "algorithms": ["HS256"]},
        "providers": [{"id": "corp", "mcp": server, "allow_http": True,
                       "client_id": "corp-client", "client_secret_env": "CORP_SECRET",
                       "issuer": issuer}],
    })


async def test_a_pre_registered_clients_secret_never_goes_to_another_authorization_server(
        fake: FakeOAuth, tmp_path: Any) -> None:
    """Was a FAULT (item 2, "registrations keyed by the authorization server's issuer"; item 3):
    a platform team configures an MCP server with a pre-registered client and its secret
    (issued by the authorization server the server uses today). The server's protected
    resource metadata later names another authorization server (the server moved, or its
    metadata was tampered with). On the next sign-in credproxy presents the pre-registered
    client's id *and secret* to the new authorization server's token endpoint: a client
    secret issued by one authorization server is sent to another. (The grant minted
    before is refused at refresh with ``mcp_issuer_changed``; a new sign-in is not.)
    Expected: the secret of a pre-registered client is only ever sent to the issuer it
    belongs to: the operator can pin it (``issuer:``, refused today with ``mcp``), or a
    sign-in whose discovered issuer is not the one the client was used with is refused
    (``mcp_issuer_changed``), naming what changed."""
    import io

    from proxy.audit import AuditLog, StdoutSink
    from proxy.connect import Connector, ConnectRejected
    from proxy.coordination import MemoryCoordinator
    from proxy.vault.local import LocalVault

    server = script_server(fake, prm_path="/prm")
    honest, moved = f"{fake.base}/as", f"{fake.base}/other"
    fake.script("/.well-known/oauth-authorization-server/other",
                Answer.json(**as_metadata(moved)))
    for path in ("/as/token", "/other/token"):
        fake.script(path, Answer.json(access_token="at", token_type="Bearer",
                                      refresh_token="rt", expires_in=3600))
    key = bytes(range(32))
    settings = _pre_registered(server, honest)
    vault = LocalVault.open(tmp_path / "v.db", key)
    connector = Connector(live_config(settings=settings,
                                      secrets={"corp": Secret("corp-secret-value")}),
                          vault, MemoryCoordinator(),
                          AuditLog(StdoutSink(io.StringIO()), instance="t/1",
                                   fingerprint_key=key), state_key=key)
    try:
        q = query(await connector.begin("alice", "corp", redirect_uri="http://127.0.0.1/cb"))
        await connector.complete({"state": q["state"], "code": "c1", "iss": honest})
        assert fake.requests("/as/token"), "the first sign-in did not reach its server"
        # The resource metadata now names another authorization server.
        fake.script("/prm", Answer.json(resource=server, authorization_servers=[moved],
                                        scopes_supported=["read"]))
        connector.discovery.forget(server)  # the cached metadata expired
        try:
            q = query(await connector.begin("bob", "corp",
                                            redirect_uri="http://127.0.0.1/cb"))
            await connector.complete({"state": q["state"], "code": "c2", "iss": moved})
        except ConnectRejected as exc:
            assert exc.reason.startswith("mcp_"), exc.reason
        leaked = [r for r in fake.requests("/other/token")
                  if "corp-secret-value" in r.form.get("client_secret", "")
                  or "corp-secret-value" in base64.b64decode(
                      (r.headers.get("authorization") or "Basic ").split(" ", 1)[1]
                      or b"").decode("latin-1")]
        assert leaked == [], "the pre-registered client's secret went to " + moved
    finally:
        await connector.aclose()
        await vault.close()


def test_a_pre_registered_mcp_client_secret_needs_its_issuer() -> None:
    """A pre-registered client's secret belongs to one authorization server: without
    ``issuer`` naming it the configuration is refused, naming the key (so fault 2 above
    cannot be configured)."""
    from proxy.settings import parse_settings
    with pytest.raises(Exception, match="issuer is required with mcp and a pre-registered"):
        parse_settings({
            "identity": {"issuer": "i", "audience": "a", "hs256_secret_env": "X",
                         "algorithms": ["HS256"]},
            "providers": [{"id": "corp", "mcp": "https://mcp.corp.example/mcp",
                           "client_id": "corp-client", "client_secret_env": "CORP_SECRET"}],
        })


def test_a_pre_registered_mcp_client_cannot_be_pinned_to_its_issuer() -> None:
    """Was a FAULT (item 2): a pre-registered client belongs to one authorization server, but an
    ``mcp`` provider cannot say which: ``issuer:`` is refused ("discovery finds the
    issuer"). Expected: with a pre-registered ``client_id``, ``issuer`` is accepted and
    discovery must find that issuer (else ``mcp_issuer_mismatch``)."""
    from proxy.settings import parse_settings
    parse_settings({
        "identity": {"issuer": "i", "audience": "a", "hs256_secret_env": "X",
                     "algorithms": ["HS256"]},
        "providers": [{"id": "corp", "mcp": "https://mcp.corp.example/mcp",
                       "client_id": "corp-client", "client_secret_env": "CORP_SECRET",
                       "issuer": "https://login.corp.example"}],
    })


@pytest.mark.parametrize(("iss", "reason"), [
    pytest.param("{issuer}/", "iss_mismatch", id="trailing-slash"),
    pytest.param("{upper}", "iss_mismatch", id="scheme-and-host-case"),
    pytest.param("", "iss_mismatch", id="empty"),
    pytest.param("{issuer}%00", "iss_mismatch", id="nul-suffix"),
])
async def test_mix_up_variants_of_iss_are_refused_before_the_code_is_used(
        flow: Any, fake: FakeOAuth, iss: str, reason: str) -> None:
    """Holds (item 3, RFC 9207 section 2.4): an authorization response whose ``iss`` is not
    exactly the issuer the sign-in began with (simple string comparison) is refused; the
    code never reaches a token endpoint and nothing is stored. Also on an error
    response."""
    from proxy.connect import ConnectRejected

    connector, vault, _, _ = await flow()
    issuer = f"{fake.base}/as"
    given = iss.format(issuer=issuer, upper=issuer.upper())
    for extra in ({"code": "c"}, {"error": "access_denied"}):
        q = query(await connector.begin("alice", "linear",
                                        redirect_uri="http://127.0.0.1/cb"))
        with pytest.raises(ConnectRejected) as caught:
            await connector.complete({"state": q["state"], "iss": given, **extra})
        assert caught.value.reason == reason
    assert fake.requests("/as/token") == []
    assert await vault.get("alice", "linear") is None


def test_two_mcp_servers_behind_one_host_can_be_configured() -> None:
    """Was a FAULT (item 3, "grants keyed by (user, resource, issuer)"; "a provider that is an MCP
    server by its URL alone"): two MCP servers behind one gateway host, told apart by
    path (``https://mcp.corp.example/jira/mcp``, ``.../github/mcp``; hosted MCP
    registries serve many servers from one host), each written by its URL alone, are
    refused ("host 'mcp.corp.example' is listed by providers 'jira' and 'gh'"): the
    resource is the URL, but credproxy keys providers by host. Expected: both are
    accepted, each request getting the grant of the server whose URL it is under."""
    from proxy.settings import parse_settings
    s = parse_settings({
        "identity": {"issuer": "i", "audience": "a", "hs256_secret_env": "X",
                     "algorithms": ["HS256"]},
        "providers": [{"id": "jira", "mcp": "https://mcp.corp.example/jira/mcp"},
                      {"id": "gh", "mcp": "https://mcp.corp.example/github/mcp"}],
    })
    assert [p.mcp_resource for p in s.providers] == ["https://mcp.corp.example/jira/mcp",
                                                     "https://mcp.corp.example/github/mcp"]


@pytest.mark.parametrize(("redirect_uri", "application_type"), [
    pytest.param("https://credproxy.example.com/oauth/callback", "web", id="web-flow"),
    pytest.param("http://127.0.0.1:5555/oauth/callback", "native", id="terminal-loopback"),
])
async def test_dynamic_registration_says_the_application_type_of_its_redirect(
        flow: Any, fake: FakeOAuth, redirect_uri: str, application_type: str) -> None:
    """Item 2 (RFC 7591 "with ``application_type``"; OpenID Connect Dynamic Client
    Registration 1.0 section 2, MCP authorization "Dynamic Client Registration"): the web
    flow's client is a ``web`` application; ``credproxy connect``'s client, whose redirect
    URI is a loopback one (RFC 8252 section 7.3), is a ``native`` application. FAULT for
    ``terminal-loopback``: it is registered as ``web`` with an ``http://127.0.0.1``
    redirect URI, which an OpenID provider enforcing the registration rules refuses (web
    clients use https redirect URIs on a real host)."""
    connector, _, _, _ = await flow(client_id_metadata_document_supported=False,
                                    public_url="https://credproxy.example.com")
    await connector.begin("alice", "linear", redirect_uri=redirect_uri)
    sent = fake.requests("/as/register")
    assert len(sent) == 1
    assert sent[0].json["redirect_uris"] == [redirect_uri]
    assert sent[0].json["application_type"] == application_type


async def test_terminal_sign_ins_on_other_loopback_ports_reuse_one_registration(
        flow: Any, fake: FakeOAuth) -> None:
    """Was a FAULT (item 2, "registrations are keyed by the authorization server's ``issuer``"):
    ``credproxy connect`` listens on any free loopback port, and registrations are kept
    per (issuer, redirect URI): every terminal sign-in registers one more client at the
    authorization server. RFC 8252 section 7.3: the server must accept any port on a
    loopback redirect URI at request time. Expected: one registration per issuer for
    the loopback redirect, whatever the port."""
    connector, _, _, _ = await flow(client_id_metadata_document_supported=False)
    for port in (5555, 5556, 5557):
        await connector.begin("alice", "linear",
                              redirect_uri=f"http://127.0.0.1:{port}/oauth/callback")
    assert len(fake.requests("/as/register")) == 1, [
        r.json["redirect_uris"] for r in fake.requests("/as/register")]
