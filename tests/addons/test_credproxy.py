"""The addon in-process, the way mitmproxy tests its own addons (``mitmproxy.test.taddons``
and ``tflow``): each variant of a request-path fault is a row, driven through the real hooks
with a real core (local vault, verifier, audit) behind them. The real-process versions of
these rows are in tests/integration/test_request_path.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from addons.credproxy import CredentialInjector
from proxy.audit import AuditLog
from proxy.coordination import MemoryCoordinator
from proxy.identity import IdentityVerifier, KeySource
from proxy.live import Snapshot
from proxy.metrics import Metrics
from proxy.provider_client import ProviderClient
from proxy.secret import Secret
from proxy.settings import ProviderSettings, Settings
from proxy.sidecar import Sidecar
from proxy.tokens import TokenBroker
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant
from proxy.vault.local import LocalVault
from tests.proxy.conftest import (
    NOW,
    Clock,
    Keys,
    MakeContext,
    RecordingSink,
    identity_settings,
    live_config,
)

_COMMON: dict[str, Any] = {"token_url": "https://login.example.com/token", "client_id": "c",
                           "token_endpoint_auth_method": "none"}
DOCS = ProviderSettings(id="docs", hosts=["docs.example.com"], **_COMMON)
KEYED = ProviderSettings(id="keyed", hosts=["api.keyed.example"],
                         inject={"header": "X-Api-Key", "format": "{access_token}"}, **_COMMON)
V6 = ProviderSettings(id="v6", hosts=["[::1]:8443"], **_COMMON)
USER = "alice@example.com"




@pytest.fixture
def audit_lines() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
async def injector(tmp_path: Path, keys: Keys, audit_lines: RecordingSink
                   ) -> AsyncIterator[CredentialInjector]:
    vault = LocalVault.open(tmp_path / "vault.db", bytes(range(32)), clock=lambda: NOW)
    for provider, token in (("docs", "at-docs"), ("keyed", "key-1"), ("v6", "at-v6")):
        await vault.put(Grant(USER, provider, TokenSet(access_token=Secret(token),
                                                       refresh_token=None,
                                                       expires_at=NOW + 3600)))
    settings = Settings(identity=identity_settings(), providers=[DOCS, KEYED, V6],
                        public_url="https://admin")
    verifier = IdentityVerifier(settings.identity, KeySource(keys.public_set()), clock=Clock())
    live = live_config(settings=settings, verifier=verifier)
    refresher = ProviderClient(live)
    broker = TokenBroker(vault, MemoryCoordinator(), refresher, live, metrics=Metrics(),
                         clock=lambda: NOW)
    audit = AuditLog(audit_lines, instance="test/1", fingerprint_key=b"k" * 32,
                     clock=lambda: NOW)
    sidecar = Sidecar(live, broker, audit)
    addon = CredentialInjector(SimpleNamespace(sidecar=sidecar, live=live))  # type: ignore[arg-type]
    yield addon
    await addon.done()
    await refresher.aclose()
    await vault.close()


@pytest.fixture
def tctx(injector: CredentialInjector) -> Iterator[taddons.context]:
    with taddons.context(injector) as ctx:
        yield ctx


def _tunnel(injector: CredentialInjector, authority: str = "docs.example.com:443",
            *, proxy_authorization: str | None = None) -> http.HTTPFlow:
    """A CONNECT through the addon; returns the CONNECT flow (its client_conn is the tunnel)."""
    host, _, port = authority.rpartition(":")
    headers = [(b"Host", authority.encode())]
    if proxy_authorization:
        headers.append((b"Proxy-Authorization", proxy_authorization.encode()))
    connect = tflow.tflow(req=tflow.treq(method=b"CONNECT", host=host.strip("[]"),
                                         port=int(port), scheme=b"", authority=authority.encode(),
                                         path=b"", headers=http.Headers(headers), content=b""))
    connect.client_conn.sni = host.strip("[]")
    injector.http_connect(connect)
    return connect


def _in_tunnel(connect: http.HTTPFlow, headers: list[tuple[str, str]] | list[tuple[bytes, bytes]],
               *, authority: str = "", path: str = "/x",
               method: str = "GET") -> http.HTTPFlow:
    fields = [(k if isinstance(k, bytes) else k.encode("latin-1"),
               v if isinstance(v, bytes) else v.encode("latin-1")) for k, v in headers]
    host, port = connect.request.host, connect.request.port
    f = tflow.tflow(client_conn=connect.client_conn,
                    req=tflow.treq(method=method.encode(), host=host, port=port,
                                   scheme=b"https", authority=authority.encode(),
                                   path=path.encode(), headers=http.Headers(fields),
                                   content=b""))
    return f


def _sent(f: http.HTTPFlow) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in f.request.headers.fields]


def _refused(injector: CredentialInjector, f: http.HTTPFlow) -> http.Response | None:
    # A refusal is the flow's response, set in requestheaders: mitmproxy then sends it at
    # once and never connects upstream (addons/compat.py, item 7).
    return f.response


def _problem(injector: CredentialInjector, f: http.HTTPFlow) -> tuple[int, str, str]:
    answer = _refused(injector, f)
    assert answer is not None, "expected a refusal"
    body = json.loads(answer.content or b"{}")
    return answer.status_code, answer.headers["X-Credproxy-Error"], body["reason"]


# --- 1. header-name spellings of protected headers ------------------------------------------

@pytest.mark.parametrize("lookalike", ["X_User_Context", "x_user_context", "X_USER_CONTEXT",
                                       "X-User_Context", "Proxy_Authorization",
                                       "proxy_authorization"])
async def test_a_lookalike_identity_header_on_a_routed_request_is_refused(
        injector: CredentialInjector, tctx: taddons.context, make_context: MakeContext,
        lookalike: str) -> None:
    f = _in_tunnel(_tunnel(injector), [("Host", "docs.example.com"),
                                       ("X-User-Context", make_context()),
                                       (lookalike, make_context(claims={"sub": "mallory"}))])
    await injector.requestheaders(f)
    assert _problem(injector, f) == (407, "user-context-invalid", "lookalike_header")
    assert not any(k.lower().replace("_", "-") in ("x-user-context", "proxy-authorization")
                   for k, _ in _sent(f))


@pytest.mark.parametrize("lookalike", ["X_User_Context", "x_user_context", "Proxy_Authorization",
                                       "X-User-Context", "x-user-context"])
async def test_identity_headers_never_reach_an_unrouted_upstream(
        injector: CredentialInjector, tctx: taddons.context, lookalike: str) -> None:
    f = _in_tunnel(_tunnel(injector, "elsewhere.example:443"),
                   [("Host", "elsewhere.example"), (lookalike, "someone's-jws"),
                    ("Authorization", "Bearer agent-own")])
    await injector.requestheaders(f)
    assert _refused(injector, f) is None
    assert _sent(f) == [("Host", "elsewhere.example"), ("Authorization", "Bearer agent-own")]


@pytest.mark.parametrize("spoof", ["X_Api_Key", "x_api_key", "X-API-KEY", "x-api_key",
                                   "X-Api-Key", "Authorization", "authorization"])
async def test_inject_header_spellings_never_ride_beside_the_credential(
        injector: CredentialInjector, tctx: taddons.context, make_context: MakeContext,
        spoof: str) -> None:
    f = _in_tunnel(_tunnel(injector, "api.keyed.example:443"),
                   [("Host", "api.keyed.example"), ("X-User-Context", make_context()),
                    (spoof, "attacker-key")])
    await injector.requestheaders(f)
    assert _refused(injector, f) is None
    assert _sent(f) == [("Host", "api.keyed.example"), ("X-Api-Key", "key-1")]


# --- 2. absolute-form request-target inside a tunnel ---------------------------------------

@pytest.mark.parametrize("target", [
    "other-tenant.example", "other-tenant.example:443", "docs.example.com:8443",
    "docs.example.com.evil.net", "evil.net",
])
async def test_an_absolute_form_target_naming_another_authority_is_421(
        injector: CredentialInjector, tctx: taddons.context, make_context: MakeContext,
        target: str) -> None:
    f = _in_tunnel(_tunnel(injector), [("Host", "docs.example.com"),
                                       ("X-User-Context", make_context())], authority=target)
    await injector.requestheaders(f)
    assert _problem(injector, f) == (421, "misdirected-request", "target_mismatch")
    assert ("Authorization", "Bearer at-docs") not in _sent(f)


@pytest.mark.parametrize("target", ["docs.example.com", "DOCS.example.com.",
                                    "docs.example.com:443"])
async def test_an_agreeing_absolute_form_target_is_sent_in_origin_form(
        injector: CredentialInjector, tctx: taddons.context, make_context: MakeContext,
        target: str) -> None:
    f = _in_tunnel(_tunnel(injector), [("Host", "docs.example.com"),
                                       ("X-User-Context", make_context())], authority=target)
    await injector.requestheaders(f)
    assert _refused(injector, f) is None
    assert f.request.authority == ""  # origin-form on the wire
    assert ("Authorization", "Bearer at-docs") in _sent(f)


async def test_an_absolute_form_target_elsewhere_is_refused_on_unrouted_tunnels_too(
        injector: CredentialInjector, tctx: taddons.context) -> None:
    f = _in_tunnel(_tunnel(injector, "elsewhere.example:443"),
                   [("Host", "elsewhere.example")], authority="docs.example.com")
    await injector.requestheaders(f)
    assert _problem(injector, f) == (421, "misdirected-request", "target_mismatch")


# --- 3. Connection nominating protected headers --------------------------------------------

@pytest.mark.parametrize("connection", [
    "keep-alive, Authorization", "Authorization", "authorization, close", "X-Api-Key",
    "Authorization, X-Api-Key, X-User-Context",
])
async def test_connection_can_never_nominate_the_credential(
        injector: CredentialInjector, tctx: taddons.context, make_context: MakeContext,
        connection: str) -> None:
    for authority, header, value in (("docs.example.com:443", "Authorization", "Bearer at-docs"),
                                     ("api.keyed.example:443", "X-Api-Key", "key-1")):
        host = authority.rsplit(":", 1)[0]
        f = _in_tunnel(_tunnel(injector, authority),
                       [("Host", host), ("Connection", connection),
                        ("X-User-Context", make_context()), ("Authorization", "Bearer client")])
        await injector.requestheaders(f)
        sent = _sent(f)
        assert (header, value) in sent
        assert ("Authorization", "Bearer client") not in sent
        nominated = [v for k, v in sent if k.lower() == "connection"]
        assert all(o.strip() in ("keep-alive", "close") for v in nominated
                   for o in v.split(","))


# --- 4. obsolete line folding and control bytes --------------------------------------------

@pytest.mark.parametrize(("name", "value", "reason"), [
    (b"X-Foo", b"a\r\n Authorization: Bearer client-value", "obs_fold"),
    (b"X-Foo", b"a\x00b", "control_character"),
    (b"X-User-Context", b"jws\r\n X-Api-Key: attacker", "obs_fold"),
    (b"Authorization", b"Bearer a\x00b", "control_character"),
    (b"X-Foo ", b"v", "bad_field_name"),
])
@pytest.mark.parametrize("authority", ["docs.example.com:443", "elsewhere.example:443"])
async def test_malformed_fields_are_refused_before_any_decision(
        injector: CredentialInjector, tctx: taddons.context, make_context: MakeContext,
        name: bytes, value: bytes, reason: str, authority: str) -> None:
    f = _in_tunnel(_tunnel(injector, authority),
                   [(b"Host", authority.rsplit(":", 1)[0].encode()),
                    (b"X-User-Context", make_context().encode()), (name, value)])
    await injector.requestheaders(f)
    assert _problem(injector, f) == (400, "malformed-request", reason)


async def test_a_malformed_connect_is_answered_not_tunnelled(
        injector: CredentialInjector, tctx: taddons.context) -> None:
    connect = tflow.tflow(req=tflow.treq(method=b"CONNECT", host="docs.example.com", port=443,
                                         scheme=b"", authority=b"docs.example.com:443", path=b"",
                                         headers=http.Headers([(b"X-Foo", b"a\r\n b")]),
                                         content=b""))
    injector.http_connect(connect)
    assert connect.response is not None and connect.response.status_code == 400


# --- 7. per-flow state never in flow.metadata ------------------------------------------------

async def test_flows_stay_serialisable_for_other_addons(
        injector: CredentialInjector, tctx: taddons.context, make_context: MakeContext) -> None:
    f = _in_tunnel(_tunnel(injector), [("Host", "docs.example.com"),
                                       ("X-User-Context", make_context())])
    await injector.requestheaders(f)
    assert ("Authorization", "Bearer at-docs") in _sent(f)
    state = f.get_state()  # what flow saving and replay do
    assert "at-docs" not in json.dumps(state["metadata"], default=str)
    f.copy()
    refused = _in_tunnel(_tunnel(injector), [("Host", "docs.example.com")])
    await injector.requestheaders(refused)
    refused.get_state()
    refused.copy()
    f.response = tflow.tresp()
    await injector.response(f)
    assert f.id not in injector.in_flight and f.id not in injector._injected


async def test_an_error_ends_the_flow_and_is_audited(
        injector: CredentialInjector, tctx: taddons.context, make_context: MakeContext,
        audit_lines: RecordingSink) -> None:
    f = _in_tunnel(_tunnel(injector), [("Host", "docs.example.com"),
                                       ("X-User-Context", make_context())])
    await injector.requestheaders(f)
    f.error = tflow.terr()
    injector.error(f)
    assert f.id not in injector.in_flight and f.id not in injector._injected
    assert audit_lines.events() == ["credential.injected", "request.failed"]
    # Without mitmproxy's classification (no protocol error recorded) the reason is generic.
    assert json.loads(audit_lines.lines[-1])["reason"] == "exchange_failed"


# --- 8. IPv6 provider hosts -------------------------------------------------------------------

@pytest.mark.parametrize("connect", ["[::1]:8443", "[0:0::1]:8443"])
async def test_an_ipv6_provider_is_routed_in_any_spelling(
        injector: CredentialInjector, tctx: taddons.context, make_context: MakeContext,
        connect: str) -> None:
    f = _in_tunnel(_tunnel(injector, connect), [("Host", connect),
                                                ("X-User-Context", make_context())])
    await injector.requestheaders(f)
    assert ("Authorization", "Bearer at-v6") in _sent(f)
    assert f.request.host == "::1"


# --- 9. a reload reaches the header section's reading too ------------------------------------

async def test_a_reloaded_identity_header_is_the_one_read_and_stripped(
        injector: CredentialInjector, tctx: taddons.context, keys: Keys,
        make_context: MakeContext) -> None:
    """The header policy belongs to the snapshot (it was built once, at start): after a
    reload renames identity.header, the new header carries the context and is never
    forwarded; the old name is an ordinary field."""
    assert injector.app is not None
    live = injector.app.live
    running = live.current
    identity = running.settings.identity.model_copy(update={"header": "X-Agent-Context"})
    live.swap(Snapshot.build(running.settings.model_copy(update={"identity": identity}),
                             IdentityVerifier(identity, KeySource(keys.public_set()),
                                              clock=Clock()),
                             secrets=running.secrets))
    f = _in_tunnel(_tunnel(injector), [("Host", "docs.example.com"),
                                       ("X-Agent-Context", make_context()),
                                       ("X-User-Context", "an ordinary field now")])
    await injector.requestheaders(f)
    assert _refused(injector, f) is None
    assert _sent(f) == [("Host", "docs.example.com"),
                        ("X-User-Context", "an ordinary field now"),
                        ("Authorization", "Bearer at-docs")]
