"""MCP server discovery (proxy.mcpauth) against a real loopback HTTP server: RFC 9728
protected resource metadata, RFC 8414 / OpenID Connect authorization server metadata."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.mcpauth import (
    Discovery,
    McpDiscoveryError,
    authorization_server_urls,
    canonical_uri,
    parse_challenge,
    protected_resource_urls,
    shared_discovery,
)
from proxy.provider_client import ProviderClient
from proxy.settings import RefreshSettings
from tests.proxy.conftest import live_config
from tests.proxy.oauthfake import Answer, FakeOAuth, serve


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def fake() -> AsyncIterator[FakeOAuth]:
    async for f in serve():
        yield f


@pytest.fixture
async def client() -> AsyncIterator[ProviderClient]:
    c = ProviderClient(live_config(refresh=RefreshSettings(attempts=2, backoff=0, timeout=5)))
    yield c
    await c.aclose()


def as_metadata(issuer: str, **over: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "issuer": issuer, "authorization_endpoint": f"{issuer}/authorize",
        "token_endpoint": f"{issuer}/token", "registration_endpoint": f"{issuer}/register",
        "revocation_endpoint": f"{issuer}/revoke",
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": ["read", "write", "offline_access"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
        "client_id_metadata_document_supported": True,
        "authorization_response_iss_parameter_supported": True,
    }
    meta.update(over)
    return {k: v for k, v in meta.items() if v is not None}


def script_server(fake: FakeOAuth, *, issuer: str | None = None, challenge: bool = True,
                  prm_path: str = "/.well-known/oauth-protected-resource/mcp",
                  **meta: Any) -> str:
    """An MCP server at <base>/mcp whose AS is ``issuer`` (default <base>/as)."""
    server = f"{fake.base}/mcp"
    issuer = issuer or f"{fake.base}/as"
    if challenge:
        fake.script("/mcp", Answer(401, b"", headers=(
            ("WWW-Authenticate",
             f'Bearer resource_metadata="{fake.base}{prm_path}", scope="read"'),)))
    fake.script(prm_path, Answer.json(resource=server, authorization_servers=[issuer],
                                      scopes_supported=["read"]))
    fake.script("/.well-known/oauth-authorization-server/as",
                Answer.json(**as_metadata(issuer, **meta)))
    return server


def test_well_known_urls_follow_rfc9728_and_rfc8414_path_insertion() -> None:
    assert protected_resource_urls("https://h.example/a/mcp") == [
        "https://h.example/.well-known/oauth-protected-resource/a/mcp",
        "https://h.example/.well-known/oauth-protected-resource"]
    assert protected_resource_urls("https://h.example") == [
        "https://h.example/.well-known/oauth-protected-resource"]
    assert authorization_server_urls("https://as.example/tenant1") == [
        "https://as.example/.well-known/oauth-authorization-server/tenant1",
        "https://as.example/.well-known/openid-configuration/tenant1",
        "https://as.example/tenant1/.well-known/openid-configuration"]
    assert authorization_server_urls("https://as.example") == [
        "https://as.example/.well-known/oauth-authorization-server",
        "https://as.example/.well-known/openid-configuration"]
    assert canonical_uri("HTTPS://MCP.Example.com/MCP#x") == "https://mcp.example.com/MCP"


def test_parse_challenge_reads_quoted_and_token_params() -> None:
    header = ('Basic realm="x", Bearer error="insufficient_scope", scope="a b", '
              'resource_metadata="https://h.example/.well-known/oauth-protected-resource"')
    got = parse_challenge(header)
    assert got["resource_metadata"] == "https://h.example/.well-known/oauth-protected-resource"
    assert got["scope"] == "a b"
    assert parse_challenge('Basic realm="x"') == {}


async def test_discovery_follows_the_401_challenge_then_rfc8414(
        fake: FakeOAuth, client: ProviderClient) -> None:
    server = script_server(fake, prm_path="/meta/prm")
    found = await Discovery(client).discover(server, allow_http=True)
    assert found.resource == server
    assert found.resource_metadata_url == f"{fake.base}/meta/prm"
    assert found.issuer == f"{fake.base}/as"
    assert found.token_endpoint == f"{fake.base}/as/token"
    assert found.registration_endpoint == f"{fake.base}/as/register"
    assert found.client_id_metadata_document_supported is True
    assert found.iss_parameter_supported is True
    assert found.resource_scopes == ("read",)
    assert [s.method for s in fake.requests("/mcp")] == ["POST"]
    assert fake.requests("/mcp")[0].headers.get("authorization") is None


async def test_discovery_without_a_challenge_uses_the_well_known_uris(
        fake: FakeOAuth, client: ProviderClient) -> None:
    server = script_server(fake, challenge=False,
                           prm_path="/.well-known/oauth-protected-resource")
    found = await Discovery(client).discover(server, allow_http=True)
    assert found.resource_metadata_url == f"{fake.base}/.well-known/oauth-protected-resource"
    # Path-inserted first (RFC 9728 section 3.1), then the root.
    paths = [s.path for s in fake.seen if s.path.startswith("/.well-known/oauth-protected")]
    assert paths == ["/.well-known/oauth-protected-resource/mcp",
                     "/.well-known/oauth-protected-resource"]


async def test_discovery_falls_back_to_openid_configuration(
        fake: FakeOAuth, client: ProviderClient) -> None:
    server = script_server(fake)
    issuer = f"{fake.base}/as"
    fake.script("/.well-known/oauth-authorization-server/as", Answer(404, b""))
    fake.script("/as/.well-known/openid-configuration",
                Answer.json(**as_metadata(issuer, client_id_metadata_document_supported=None)))
    found = await Discovery(client).discover(server, allow_http=True)
    assert found.metadata_url == f"{fake.base}/as/.well-known/openid-configuration"
    assert found.client_id_metadata_document_supported is False
    tried = [s.path for s in fake.seen if "oauth-authorization-server" in s.path
             or "openid-configuration" in s.path]
    assert tried == ["/.well-known/oauth-authorization-server/as",
                     "/.well-known/openid-configuration/as",
                     "/as/.well-known/openid-configuration"]


@pytest.mark.parametrize(("meta", "reason"), [
    pytest.param({"code_challenge_methods_supported": None}, "mcp_pkce_unsupported",
                 id="no-pkce-listed"),
    pytest.param({"code_challenge_methods_supported": ["plain"]}, "mcp_pkce_unsupported",
                 id="plain-only"),
    pytest.param({"issuer": "http://evil.example/as"}, "mcp_issuer_mismatch",
                 id="issuer-mismatch"),
    pytest.param({"token_endpoint": None}, "mcp_metadata_invalid", id="no-token-endpoint"),
])
async def test_discovery_refuses_unsafe_metadata(fake: FakeOAuth, client: ProviderClient,
                                                 meta: dict[str, Any], reason: str) -> None:
    server = script_server(fake)
    issuer = f"{fake.base}/as"
    fake.script("/.well-known/oauth-authorization-server/as",
                Answer.json(**{k: v for k, v in {**as_metadata(issuer), **meta}.items()
                               if v is not None}))
    with pytest.raises(McpDiscoveryError) as caught:
        await Discovery(client).discover(server, allow_http=True)
    assert caught.value.reason == reason


async def test_discovery_refuses_metadata_of_another_resource(
        fake: FakeOAuth, client: ProviderClient) -> None:
    server = script_server(fake)
    fake.script("/.well-known/oauth-protected-resource/mcp",
                Answer.json(resource=f"{fake.base}/other",
                            authorization_servers=[f"{fake.base}/as"]))
    with pytest.raises(McpDiscoveryError) as caught:
        await Discovery(client).discover(server, allow_http=True)
    assert caught.value.reason == "mcp_resource_mismatch"


async def test_discovery_without_metadata_names_what_it_tried(
        fake: FakeOAuth, client: ProviderClient) -> None:
    with pytest.raises(McpDiscoveryError) as caught:
        await Discovery(client).discover(f"{fake.base}/mcp", allow_http=True)
    assert caught.value.reason == "mcp_no_resource_metadata"
    assert "/.well-known/oauth-protected-resource/mcp" in caught.value.detail


async def test_discovery_is_cached_for_a_bounded_time(fake: FakeOAuth,
                                                      client: ProviderClient) -> None:
    server = script_server(fake)
    clock = Clock()
    discovery = Discovery(client, clock=clock, ttl=300)
    first = await discovery.discover(server, allow_http=True)
    fetched = len(fake.seen)
    clock.now += 299
    assert await discovery.discover(server, allow_http=True) is first
    assert len(fake.seen) == fetched
    clock.now += 2
    again = await discovery.discover(server, allow_http=True)
    assert again is not first and len(fake.seen) > fetched
    assert again.expires_at == clock.now + 300


# -- the connect flow of an mcp provider (Connector, real vault and coordination) -------------

def mcp_settings(server: str, **top: Any) -> Any:
    from proxy.settings import parse_settings
    return parse_settings({
        "identity": {"issuer": "i", "audience": "a", "hs256_secret_env": "X",
                     "algorithms": ["HS256"]},
        "providers": [{"id": "linear", "mcp": server, "allow_http": True}],
        **top,
    })


@pytest.fixture
async def flow(fake: FakeOAuth, tmp_path: Any) -> AsyncIterator[Any]:
    """A factory: ``await flow(public_url=..., **as_metadata overrides)`` -> (connector,
    vault, audit output); the AS at <fake>/as answers tokens."""
    import io

    from proxy.audit import AuditLog, StdoutSink
    from proxy.connect import Connector
    from proxy.coordination import MemoryCoordinator
    from proxy.vault.local import LocalVault

    key = bytes(range(32))
    made: list[Any] = []

    async def make(public_url: str | None = None, **meta: Any) -> Any:
        server = script_server(fake, **meta)
        fake.script("/as/token", Answer.json(access_token="at-1", token_type="Bearer",
                                             refresh_token="rt-1", expires_in=3600))
        fake.script("/as/register", Answer.json(201, client_id="dcr-client-1",
                                                token_endpoint_auth_method="none"))
        top = {"public_url": public_url} if public_url else {}
        vault = LocalVault.open(tmp_path / f"v{len(made)}.db", key)
        out = io.StringIO()
        audit = AuditLog(StdoutSink(out), instance="t/1", fingerprint_key=key)
        connector = Connector(live_config(settings=mcp_settings(server, **top)), vault,
                              MemoryCoordinator(), audit, state_key=key)
        made.append((connector, vault))
        return connector, vault, out, server

    yield make
    for connector, vault in made:
        await connector.aclose()
        await vault.close()


def query(url: str) -> dict[str, str]:
    from urllib.parse import parse_qsl, urlsplit
    return dict(parse_qsl(urlsplit(url).query))


async def test_dcr_path_binds_tokens_to_the_resource_and_records_the_registration(
        flow: Any, fake: FakeOAuth) -> None:
    connector, vault, _, server = await flow(client_id_metadata_document_supported=False)
    issuer = f"{fake.base}/as"
    grants = {}
    for user in ("alice", "bob"):
        url = await connector.begin(user, "linear", redirect_uri="http://127.0.0.1/cb")
        q = query(url)
        assert url.startswith(f"{issuer}/authorize?")
        assert q["resource"] == server  # RFC 8707 on the authorize request
        assert q["client_id"] == "dcr-client-1"
        assert q["code_challenge_method"] == "S256"
        assert q["scope"].split() == ["read", "offline_access"]
        done = await connector.complete({"state": q["state"], "code": f"code-{user}",
                                         "iss": issuer})
        assert done.user == user
        grants[user] = await vault.get(user, "linear")
    # One RFC 7591 registration for both users, with the MCP client metadata.
    registered = fake.requests("/as/register")
    assert len(registered) == 1 and connector.registrar.registrations == 1
    assert registered[0].json == {
        "client_name": "credproxy", "redirect_uris": ["http://127.0.0.1/cb"],
        "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
        "token_endpoint_auth_method": "none", "application_type": "native"}
    token_requests = fake.requests("/as/token")
    assert [r.form["resource"] for r in token_requests] == [server, server]
    assert [r.form["client_id"] for r in token_requests] == ["dcr-client-1"] * 2
    for grant in grants.values():
        assert grant is not None
        assert dict(grant.values) == {"mcp_resource": server, "mcp_issuer": issuer,
                                      "mcp_client_id": "dcr-client-1",
                                      "mcp_registration": "dcr"}


async def test_cimd_path_uses_the_metadata_document_url_as_client_id(
        flow: Any, fake: FakeOAuth) -> None:
    connector, vault, _, server = await flow(public_url="https://credproxy.example.com")
    url = await connector.begin("alice", "linear",
                                redirect_uri="https://credproxy.example.com/oauth/callback")
    q = query(url)
    assert q["client_id"] == "https://credproxy.example.com/oauth/client-metadata.json"
    await connector.complete({"state": q["state"], "code": "c", "iss": f"{fake.base}/as"})
    grant = await vault.get("alice", "linear")
    assert grant is not None and grant.values["mcp_registration"] == "cimd"
    assert fake.requests("/as/register") == []
    assert fake.requests("/as/token")[0].form["resource"] == server


@pytest.mark.parametrize(("iss", "reason"), [
    pytest.param("http://evil.example/as", "iss_mismatch", id="other-issuer"),
    pytest.param(None, "iss_missing", id="missing-though-advertised"),
])
async def test_authorization_response_iss_is_checked(flow: Any, fake: FakeOAuth,
                                                     iss: str | None, reason: str) -> None:
    from proxy.connect import ConnectRejected
    connector, vault, out, _ = await flow()
    q = query(await connector.begin("alice", "linear", redirect_uri="http://127.0.0.1/cb"))
    params = {"state": q["state"], "code": "c", **({"iss": iss} if iss else {})}
    with pytest.raises(ConnectRejected) as caught:
        await connector.complete(params)
    assert caught.value.reason == reason
    assert fake.requests("/as/token") == []  # the code never went anywhere
    assert await vault.get("alice", "linear") is None
    assert reason in out.getvalue().splitlines()[-1]


async def test_connect_is_refused_without_pkce_s256(flow: Any, fake: FakeOAuth) -> None:
    from proxy.connect import ConnectRejected
    connector, _, out, _ = await flow(code_challenge_methods_supported=None)
    with pytest.raises(ConnectRejected) as caught:
        await connector.begin("alice", "linear", redirect_uri="http://127.0.0.1/cb")
    assert caught.value.reason == "mcp_pkce_unsupported"
    assert "mcp_pkce_unsupported" in out.getvalue()


async def test_refresh_of_an_mcp_grant_carries_resource_and_the_minting_client(
        flow: Any, fake: FakeOAuth, client: ProviderClient) -> None:
    import time

    from proxy.coordination import MemoryCoordinator
    from proxy.errors import ReauthRequired
    from proxy.tokens import TokenBroker

    connector, vault, _, server = await flow(client_id_metadata_document_supported=False)
    issuer = f"{fake.base}/as"
    q = query(await connector.begin("alice", "linear", redirect_uri="http://127.0.0.1/cb"))
    await connector.complete({"state": q["state"], "code": "c", "iss": issuer})
    fake.script("/as/token", Answer.json(access_token="at-2", token_type="Bearer",
                                         refresh_token="rt-2", expires_in=3600))
    live = live_config(settings=mcp_settings(server))
    provider = live.current.settings.providers[0]
    later = time.time() + 7200  # the access token has expired
    broker = TokenBroker(vault, MemoryCoordinator(), client, live, clock=lambda: later)
    issued = await broker.get("alice", provider)
    assert issued.tokens.access_token.reveal() == "at-2"
    refresh = fake.requests("/as/token")[-1].form
    assert refresh["grant_type"] == "refresh_token" and refresh["refresh_token"] == "rt-1"
    assert refresh["resource"] == server  # RFC 8707 on the refresh too
    assert refresh["client_id"] == "dcr-client-1"
    stored = await vault.get("alice", "linear")
    assert stored is not None and stored.tokens.refresh_token is not None
    assert stored.tokens.refresh_token.reveal() == "rt-2"  # rotation kept

    # The MCP server moves to another authorization server: the grant minted by the old
    # one is not refreshed there; the user reconnects (and registers anew).
    fake.script("/.well-known/oauth-protected-resource/mcp",
                Answer.json(resource=server, authorization_servers=[f"{fake.base}/as2"]))
    fake.script("/.well-known/oauth-authorization-server/as2",
                Answer.json(**as_metadata(f"{fake.base}/as2")))
    shared_discovery(client).forget(server)
    evenlater = later + 7200
    broker2 = TokenBroker(vault, MemoryCoordinator(), client, live, clock=lambda: evenlater)
    with pytest.raises(ReauthRequired) as caught:
        await broker2.get("alice", provider)
    assert caught.value.reason == "mcp_issuer_changed"
    assert fake.requests("/as2/token") == []


async def test_cache_control_max_age_shortens_the_cached_lifetime(
        fake: FakeOAuth, client: ProviderClient) -> None:
    server = script_server(fake)
    fake.script("/.well-known/oauth-authorization-server/as",
                Answer(200, json.dumps(as_metadata(f"{fake.base}/as")).encode(),
                       headers=(("Cache-Control", "max-age=60"),)))
    clock = Clock()
    found = await Discovery(client, clock=clock, ttl=600).discover(server, allow_http=True)
    assert found.expires_at == clock.now + 60


async def test_offboarding_an_mcp_grant_revokes_at_the_discovered_endpoint(
        flow: Any, fake: FakeOAuth, client: ProviderClient) -> None:
    import io

    from proxy.audit import AuditLog, StdoutSink
    from proxy.coordination import MemoryCoordinator
    from proxy.offboard import Offboarder

    connector, vault, _, server = await flow(client_id_metadata_document_supported=False)
    q = query(await connector.begin("alice", "linear", redirect_uri="http://127.0.0.1/cb"))
    await connector.complete({"state": q["state"], "code": "c", "iss": f"{fake.base}/as"})
    fake.script("/as/revoke", Answer(200, b""))
    key = bytes(range(32))
    audit = AuditLog(StdoutSink(io.StringIO()), instance="t/1", fingerprint_key=key)
    off = Offboarder(live_config(settings=mcp_settings(server)), vault, MemoryCoordinator(),
                     audit, settle=0, client=client)
    [done] = await off.revoke("alice", "linear")
    assert done.upstream == "revoked", done.detail
    assert done.removed and await vault.get("alice", "linear") is None
    revoked = fake.requests("/as/revoke")
    assert [r.form["token"] for r in revoked] == ["rt-1", "at-1"]  # RFC 7009, both tokens
    assert all(r.form["client_id"] == "dcr-client-1" for r in revoked)  # the minting client


async def test_the_callback_on_another_replica_uses_the_client_the_flow_began_with(
        fake: FakeOAuth, client: ProviderClient, tmp_path: Any) -> None:
    import io

    from proxy.audit import AuditLog, StdoutSink
    from proxy.connect import Connector
    from proxy.coordination import MemoryCoordinator
    from proxy.vault.local import LocalVault

    server = script_server(fake, client_id_metadata_document_supported=False)
    fake.script("/as/token", Answer.json(access_token="at-1", token_type="Bearer",
                                         refresh_token="rt-1", expires_in=3600))
    fake.script("/as/register", Answer.json(201, client_id="dcr-a", client_secret="sec-a",
                                            token_endpoint_auth_method="client_secret_post"))
    key = bytes(range(32))
    vault = LocalVault.open(tmp_path / "v.db", key)
    coord = MemoryCoordinator()  # shared, as Redis is between replicas
    live = live_config(settings=mcp_settings(server))

    clients: list[ProviderClient] = []

    def replica() -> Connector:
        audit = AuditLog(StdoutSink(io.StringIO()), instance="t/1", fingerprint_key=key)
        clients.append(ProviderClient(live))
        return Connector(live, vault, coord, audit, state_key=key, client=clients[-1])

    a, b = replica(), replica()
    try:
        q = query(await a.begin("alice", "linear", redirect_uri="http://127.0.0.1/cb"))
        await b.complete({"state": q["state"], "code": "c", "iss": f"{fake.base}/as"})
    finally:
        await vault.close()
        for c in clients:
            await c.aclose()
    assert len(fake.requests("/as/register")) == 1  # b did not register again
    form = fake.requests("/as/token")[0].form
    # The registered confidential client, its secret carried sealed in the flow's state.
    assert (form["client_id"], form["client_secret"]) == ("dcr-a", "sec-a")


async def test_a_terminal_sign_in_registers_dynamically_even_where_the_document_works(
        flow: Any, fake: FakeOAuth) -> None:
    """The metadata document lists only the web flow's redirect URI: ``credproxy connect``
    (a loopback redirect, RFC 8252) registers by RFC 7591 instead; the web flow still uses
    the document."""
    connector, _, _, _ = await flow(public_url="https://credproxy.example.com")
    web = query(await connector.begin(
        "alice", "linear", redirect_uri="https://credproxy.example.com/oauth/callback"))
    terminal = query(await connector.begin("alice", "linear",
                                           redirect_uri="http://127.0.0.1:5555/oauth/callback"))
    assert web["client_id"] == "https://credproxy.example.com/oauth/client-metadata.json"
    assert terminal["client_id"] == "dcr-client-1"
    assert [r.json["redirect_uris"] for r in fake.requests("/as/register")] == [
        ["http://127.0.0.1:5555/oauth/callback"]]


async def test_a_terminal_sign_in_without_registration_endpoint_says_to_use_the_web_link(
        flow: Any, fake: FakeOAuth) -> None:
    from proxy.connect import ConnectRejected

    connector, _, _, _ = await flow(public_url="https://credproxy.example.com",
                                    registration_endpoint=None)
    with pytest.raises(ConnectRejected) as caught:
        await connector.begin("alice", "linear", redirect_uri="http://127.0.0.1:5555/cb")
    assert caught.value.reason == "mcp_no_registration"
    assert "web connect link" in caught.value.detail


async def test_a_registered_client_the_server_refuses_is_registered_anew(
        flow: Any, fake: FakeOAuth) -> None:
    """The server forgot the client it registered (RFC 7591 gives no other signal than
    ``invalid_client``): that sign-in fails naming it, and the next one registers again."""
    from proxy.connect import ConnectRejected

    connector, vault, _, _ = await flow(client_id_metadata_document_supported=False)
    issuer = f"{fake.base}/as"
    q = query(await connector.begin("alice", "linear", redirect_uri="http://127.0.0.1/cb"))
    fake.script("/as/token", Answer.json(401, error="invalid_client"))
    with pytest.raises(ConnectRejected):
        await connector.complete({"state": q["state"], "code": "c", "iss": issuer})
    assert await vault.get("alice", "linear") is None
    fake.script("/as/register", Answer.json(201, client_id="dcr-client-2",
                                            token_endpoint_auth_method="none"))
    again = query(await connector.begin("alice", "linear", redirect_uri="http://127.0.0.1/cb"))
    assert again["client_id"] == "dcr-client-2"
    assert len(fake.requests("/as/register")) == 2


def _server(resource_scopes: tuple[str, ...], as_scopes: tuple[str, ...] | None) -> Any:
    from proxy.mcpauth import AuthServer

    return AuthServer(resource="https://mcp.example.com/mcp", resource_metadata_url="",
                      resource_scopes=resource_scopes, issuer="https://as.example.com",
                      metadata_url="", authorization_endpoint="https://as.example.com/a",
                      token_endpoint="https://as.example.com/t", registration_endpoint=None,
                      revocation_endpoint=None, scopes_supported=as_scopes,
                      token_endpoint_auth_methods=("none",),
                      client_id_metadata_document_supported=False,
                      iss_parameter_supported=True, expires_at=0.0)


@pytest.mark.parametrize(("prm", "meta", "configured", "requested", "expected"), [
    pytest.param(("read",), ("read", "write", "offline_access"), [], ["read", "write"],
                 ["read", "write", "offline_access"], id="as-advertised-step-up"),
    pytest.param(("read", "write"), None, [], ["write"], ["write"], id="prm-only"),
    pytest.param(("read",), ("read", "write", "offline_access"), [],
                 ["write", "read", "offline_access"], ["read", "write", "offline_access"],
                 id="ceiling-order"),
    pytest.param(("read",), ("read", "write"), ["read"], ["read"], ["read"],
                 id="configured-is-the-ceiling"),
    pytest.param(("read",), ("read", "write"), ["read"], ["write"], None,
                 id="configured-refuses-advertised"),
    pytest.param(("read",), ("read",), [], ["admin"], None, id="not-advertised"),
    pytest.param((), None, [], ["read"], None, id="nothing-advertised"),
])
def test_a_chosen_scope_stays_within_the_configured_or_advertised_ceiling(
        prm: tuple[str, ...], meta: tuple[str, ...] | None, configured: list[str],
        requested: list[str], expected: list[str] | None) -> None:
    from proxy.mcpauth import McpDiscoveryError, narrowed

    server = _server(prm, meta)
    if expected is None:
        with pytest.raises(McpDiscoveryError) as caught:
            narrowed(server, configured, requested)
        assert caught.value.reason == "scope_not_allowed"
    else:
        assert narrowed(server, configured, requested) == expected
