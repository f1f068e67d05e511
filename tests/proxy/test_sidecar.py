"""The per-request decision (proxy.sidecar) on a real local vault, without mitmproxy: the
header rules of an injection, the 421 rule for unrouted traffic, upstream 401s, and the
count of failed audit writes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.audit import AuditLog
from proxy.coordination import MemoryCoordinator
from proxy.errors import (
    AuditUnavailable,
    CredentialStoreUnavailable,
    MisdirectedRequest,
    ReauthRequired,
)
from proxy.identity import IdentityVerifier, KeySource
from proxy.metrics import Metrics
from proxy.provider_client import ProviderClient
from proxy.routes import Destination
from proxy.secret import Secret
from proxy.settings import ProviderSettings, Settings
from proxy.sidecar import Injection, Outbound, Passthrough, Sidecar
from proxy.tokens import TokenBroker
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant
from proxy.vault.local import LocalVault

from .conftest import NOW, Clock, Keys, MakeContext, RecordingSink, identity_settings, live_config

_COMMON: dict[str, Any] = {"token_url": "https://login.example.com/token", "client_id": "c",
                           "token_endpoint_auth_method": "none"}
DOCS = ProviderSettings(id="docs", hosts=["docs.example.com", "*.docs.example.com"],
                        **_COMMON)
KEYED = ProviderSettings(id="keyed", hosts=["api.keyed.example"],
                         inject={"header": "X-Api-Key", "format": "{access_token}"}, **_COMMON)




@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
async def vault(tmp_path: Path) -> AsyncIterator[LocalVault]:
    v = LocalVault.open(tmp_path / "vault.db", bytes(range(32)), clock=lambda: NOW)
    yield v
    await v.close()


@pytest.fixture
async def sidecar(vault: LocalVault, keys: Keys, sink: RecordingSink) -> AsyncIterator[Sidecar]:
    settings = Settings(identity=identity_settings(), providers=[DOCS, KEYED],
                        public_url="https://admin")
    verifier = IdentityVerifier(settings.identity, KeySource(keys.public_set()), clock=Clock())
    live = live_config(settings=settings, verifier=verifier)
    refresher = ProviderClient(live)
    broker = TokenBroker(vault, MemoryCoordinator(), refresher, live, metrics=Metrics(),
                         clock=lambda: NOW)
    audit = AuditLog(sink, instance="test/1", fingerprint_key=b"k" * 32, clock=lambda: NOW)
    yield Sidecar(live, broker, audit)
    await refresher.aclose()


async def _grant(vault: LocalVault, provider: str, access: str) -> None:
    tokens = TokenSet(access_token=Secret(access), refresh_token=None, expires_at=NOW + 3600)
    await vault.put(Grant("alice@example.com", provider, tokens))


def _out(host: str, *, port: int = 443, host_header: str | None = None, sni: str | None = None,
         token: str | None = None) -> Outbound:
    return Outbound(id="r1", method="GET", destination=Destination(host, port, tls=True),
                    host_header=host_header if host_header is not None else host,
                    path="/", sni=sni, context_token=Secret(token) if token else None)


def _failures(sidecar: Sidecar) -> float:
    value = sidecar.metrics.registry.get_sample_value("credproxy_audit_write_failures_total")
    return value or 0.0


def _denials(sidecar: Sidecar, problem: str, reason: str) -> float:
    value = sidecar.metrics.registry.get_sample_value(
        "credproxy_denials_total", {"provider": "docs", "problem": problem, "reason": reason})
    return value or 0.0


# --- which client headers an injection replaces ----------------------------------------------


async def test_custom_inject_header_also_removes_the_clients_authorization(
        sidecar: Sidecar, vault: LocalVault, make_context: MakeContext) -> None:
    await _grant(vault, "keyed", "key-1")
    decision = await sidecar.decide(_out("api.keyed.example", token=make_context()))
    assert isinstance(decision, Injection)
    assert (decision.header, decision.value.reveal()) == ("X-Api-Key", "key-1")
    assert decision.remove == ("Authorization", "X-Api-Key")


async def test_authorization_injection_removes_authorization_once(
        sidecar: Sidecar, vault: LocalVault, make_context: MakeContext) -> None:
    await _grant(vault, "docs", "at-1")
    decision = await sidecar.decide(_out("docs.example.com", token=make_context()))
    assert isinstance(decision, Injection)
    assert decision.remove == ("Authorization",)


# --- 421 for unrouted destinations ---------------------------------------------------------


@pytest.mark.parametrize(("dest", "host_header", "sni"), [
    pytest.param("203.0.113.7", "www.example.org", None, id="connect-to-ip-host-names-site"),
    pytest.param("203.0.113.7", "www.example.org", "www.example.org", id="ip-with-sni"),
    pytest.param("cdn.example.net", "www.example.org", None, id="other-name"),
    pytest.param("203.0.113.7", "", None, id="no-host-header"),
    pytest.param("docs.example.com:8443", "www.example.org:8443", None,
                 id="provider-host-on-another-port"),
])
async def test_unrelated_unrouted_mismatch_passes_through(sidecar: Sidecar, dest: str,
                                                          host_header: str,
                                                          sni: str | None) -> None:
    host, _, port = dest.partition(":")
    out = _out(host, port=int(port or 443), host_header=host_header, sni=sni)
    assert isinstance(await sidecar.decide(out), Passthrough)


@pytest.mark.parametrize(("dest", "port", "host_header", "sni"), [
    pytest.param("203.0.113.7", 443, "docs.example.com", None, id="host-names-provider"),
    pytest.param("203.0.113.7", 443, "api.docs.example.com:8443", None,
                 id="host-names-wildcard-provider-other-port"),
    pytest.param("203.0.113.7", 443, "www.example.org", "docs.example.com",
                 id="sni-names-provider"),
    pytest.param("203.0.113.7", 443, "user@docs.example.com", None, id="unparseable-host"),
])
async def test_unrouted_mismatch_naming_a_provider_is_421(sidecar: Sidecar, dest: str,
                                                          port: int, host_header: str,
                                                          sni: str | None) -> None:
    with pytest.raises(MisdirectedRequest):
        await sidecar.decide(_out(dest, port=port, host_header=host_header, sni=sni))


# --- upstream 401 ----------------------------------------------------------------------------


async def _injected(sidecar: Sidecar, vault: LocalVault,
                    make_context: MakeContext) -> tuple[Outbound, Injection]:
    await _grant(vault, "docs", "at-1")
    out = _out("docs.example.com", token=make_context())
    decision = await sidecar.decide(out)
    assert isinstance(decision, Injection)
    return out, decision


async def test_upstream_401_on_the_current_token_is_reauth(sidecar: Sidecar, vault: LocalVault,
                                                           sink: RecordingSink,
                                                           make_context: MakeContext) -> None:
    out, injection = await _injected(sidecar, vault, make_context)
    refusal = await sidecar.upstream_response(out, injection, 401, {})
    assert isinstance(refusal, ReauthRequired)
    assert refusal.reason == "revoked_upstream"
    assert '"event":"reauth.required"' in sink.lines[-1]


async def test_upstream_401_on_a_superseded_token_is_retryable(
        sidecar: Sidecar, vault: LocalVault, sink: RecordingSink,
        make_context: MakeContext) -> None:
    out, injection = await _injected(sidecar, vault, make_context)
    await _grant(vault, "docs", "at-2")  # a concurrent refresh
    sidecar.broker.invalidate("alice@example.com", "docs")
    refusal = await sidecar.upstream_response(out, injection, 401, {})
    assert isinstance(refusal, CredentialStoreUnavailable)
    assert (refusal.status, refusal.slug, refusal.reason) == (
        503, "credential-store-unavailable", "token_superseded")
    assert refusal.headers() == {"Retry-After": "1"}
    assert "retry" in refusal.detail
    assert '"event":"credential.denied"' in sink.lines[-1]
    assert '"reason":"token_superseded"' in sink.lines[-1]
    # The grant was left alone: the next request gets the new token.
    again = await sidecar.decide(_out("docs.example.com", token=make_context()))
    assert isinstance(again, Injection) and again.value.reveal() == "Bearer at-2"


# --- every failed audit write is counted --------------------------------------------------------


async def test_failed_denial_audit_is_counted(sidecar: Sidecar, sink: RecordingSink) -> None:
    sink.broken = True
    with pytest.raises(AuditUnavailable):
        await sidecar.decide(_out("docs.example.com"))
    assert _denials(sidecar, "user-context-missing", "missing") == 1  # the record that failed
    assert _failures(sidecar) == 1


async def test_failed_reauth_audit_is_counted(sidecar: Sidecar, sink: RecordingSink,
                                              make_context: MakeContext) -> None:
    sink.broken = True
    with pytest.raises(AuditUnavailable):
        await sidecar.decide(_out("docs.example.com", token=make_context()))  # no connection
    assert _denials(sidecar, "reauth-required", "no_connection") == 1  # the record that failed
    assert _failures(sidecar) == 1


async def test_failed_injection_audit_is_counted_once(sidecar: Sidecar, vault: LocalVault,
                                                      sink: RecordingSink,
                                                      make_context: MakeContext) -> None:
    await _grant(vault, "docs", "at-1")
    sink.broken = True
    with pytest.raises(AuditUnavailable):
        await sidecar.decide(_out("docs.example.com", token=make_context()))
    assert _failures(sidecar) == 1


async def test_failed_upstream_reauth_audit_is_counted(sidecar: Sidecar, vault: LocalVault,
                                                       sink: RecordingSink,
                                                       make_context: MakeContext) -> None:
    out, injection = await _injected(sidecar, vault, make_context)
    sink.broken = True
    with pytest.raises(AuditUnavailable):
        await sidecar.upstream_response(out, injection, 401, {})
    assert _failures(sidecar) == 1
