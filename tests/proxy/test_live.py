"""One live configuration snapshot (proxy.live): a reload builds the whole snapshot first and
swaps it with one assignment, or changes nothing; every component reads it; an operation
under way keeps the snapshot it started on. On a real App (local vault, real verifier,
audit file) and real parts; the real-process version is
tests/integration/test_reload_atomicity.py."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.app import App, build, settings_digest
from proxy.audit import AuditLog
from proxy.coordination import MemoryCoordinator
from proxy.errors import ConfigError, TokenRefreshFailed, UnroutedDenied
from proxy.identity import IdentityVerifier, KeySource
from proxy.live import LiveConfig, Snapshot
from proxy.metrics import Metrics
from proxy.provider_client import ProviderClient
from proxy.routes import Destination, refuse_retired
from proxy.secret import Secret
from proxy.settings import ProviderSettings, RefreshSettings, Settings, parse_settings
from proxy.sidecar import Injection, Outbound, Passthrough, Sidecar
from proxy.tokens import TokenBroker
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant
from proxy.vault.keys import generate_key
from proxy.vault.local import LocalVault
from tests.proxy.oauthfake import Answer, FakeOAuth, serve

from .conftest import AUDIENCE, ISSUER, NOW, Clock, Keys, MakeContext, RecordingSink, live_config

USER = "alice@example.com"
ENV = {"VAULT_KEY": generate_key(), "DOCS_SECRET": "docs-secret-1"}


def _provider(pid: str, *hosts: str, **extra: Any) -> dict[str, Any]:
    return {"id": pid, "hosts": list(hosts), "client_id": f"{pid}-client",
            "token_url": "https://login.example.com/token", **extra}


def _config(tmp: Path, jwks: Path, *providers: dict[str, Any], **top: Any) -> Settings:
    data: dict[str, Any] = {
        "admin": None, "ca_dir": str(tmp / "ca"), "unrouted": "deny",
        "identity": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks)},
        "vault": {"backend": "local", "path": str(tmp / "vault.db"), "key_env": "VAULT_KEY",
                  "create": True},
        "audit": {"sink": str(tmp / "audit.jsonl")},
        "providers": list(providers) or [
            _provider("docs", "docs.example.com", client_secret_env="DOCS_SECRET")],
    }
    data.update(top)
    return parse_settings(data)


@pytest.fixture
async def app(tmp_path: Path, jwks_file: Path) -> AsyncIterator[App]:
    a = build(_config(tmp_path, jwks_file), environ=ENV)
    yield a
    await a.aclose()


def _digest(app: App) -> str | None:
    """The digest ``credproxy_config_info`` reports (None before the first)."""
    for metric in app.sidecar.metrics.config_info.collect():
        for sample in metric.samples:
            return sample.labels.get("digest")
    return None


# Each row: a reload that fails at one step of building the new snapshot.
HALF_WAY: list[Any] = [
    pytest.param(lambda tmp, jwks: _config(tmp, jwks, _provider("graph", "graph.example.com",
                                                                token_endpoint_auth_method="none")),
                 "removes provider 'docs'", id="refused-removal"),
    pytest.param(lambda tmp, jwks: _config(tmp, jwks, unrouted="passthrough"),
                 "relaxes unrouted", id="refused-loosening"),
    # The client secrets: a new provider whose secret is missing.
    pytest.param(lambda tmp, jwks: _config(
        tmp, jwks, _provider("docs", "docs.example.com", client_secret_env="DOCS_SECRET"),
        _provider("graph", "graph.example.com", client_secret_env="GRAPH_SECRET")),
                 "providers\\[graph\\].client_secret", id="missing-client-secret"),
    # The verifier, built last: routes and secrets of the new config were built already.
    pytest.param(lambda tmp, jwks: _config(
        tmp, tmp / "rotated-away.json",
        _provider("docs", "docs.example.com", client_secret_env="DOCS_SECRET"),
        _provider("graph", "graph.example.com", token_endpoint_auth_method="none")),
                 "cannot load verification keys", id="unreadable-key-file"),
]


@pytest.mark.parametrize(("make", "why"), HALF_WAY)
async def test_a_reload_failing_half_way_leaves_the_snapshot_the_same_object(
        app: App, tmp_path: Path, jwks_file: Path,
        make: Callable[[Path, Path], Settings], why: str) -> None:
    before = app.live.current
    digest = _digest(app)
    swapped: list[Snapshot] = []
    app.on_reload(swapped.append)
    with pytest.raises(ConfigError, match=why):
        app.reload(make(tmp_path, jwks_file))
    assert app.live.current is before
    assert app.settings is before.settings and swapped == [] and _digest(app) == digest
    # Nothing of the new config leaked into a component: graph is not routed, docs'
    # secret is the one it had.
    assert before.router.match(Destination("graph.example.com", 443, tls=True)) is None
    assert app.connector.settings is before.settings
    assert before.client_secret(before.provider("docs")) == Secret("docs-secret-1")


async def test_a_reload_swaps_in_one_new_snapshot_that_every_component_reads(
        app: App, tmp_path: Path, jwks_file: Path) -> None:
    before = app.live.current
    swapped: list[Snapshot] = []
    app.on_reload(swapped.append)
    new = _config(tmp_path, jwks_file,
                  _provider("docs", "docs.example.com", client_secret_env="DOCS_SECRET",
                            connect_url="https://portal.example.com/docs"),
                  _provider("graph", "graph.example.com", token_endpoint_auth_method="none"),
                  refresh={"attempts": 1},
                  identity={"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks_file),
                            "header": "X-Agent-Context"})
    assert app.reload(new) == []
    now = app.live.current
    assert now is not before and swapped == [now]
    assert now.settings == new and app.settings is now.settings
    assert app.connector.settings is now.settings
    # Everything that belongs together changed together.
    route = now.router.match(Destination("graph.example.com", 443, tls=True))
    assert route is not None and route.provider is now.provider("graph")
    graph = route.provider
    assert now.client_secret(graph) is None
    assert now.connect_url(now.provider("docs")) == "https://portal.example.com/docs"
    assert now.verifier is not before.verifier  # identity changed: rebuilt
    assert now.verifier.header == now.headers.context_header == "X-Agent-Context"
    assert _digest(app) == settings_digest(new)
    # The old snapshot is untouched (an operation still running on it sees all of it).
    assert before.settings.refresh.attempts == 3 and before.headers.context_header == (
        "X-User-Context")
    assert before.router.match(Destination("graph.example.com", 443, tls=True)) is None


async def test_a_reload_builds_on_the_latest_snapshot_even_from_inside_an_operation(
        app: App, tmp_path: Path, jwks_file: Path) -> None:
    """An operation's pinned snapshot is its own: a reload (the watcher is a task like
    any other) compares with and builds on what is running, so the hosts of a provider
    added by one reload and removed by the next are retired, not forgotten."""
    docs = _provider("docs", "docs.example.com", client_secret_env="DOCS_SECRET")
    graph = _provider("graph", "graph.example.com", token_endpoint_auth_method="none")
    first = app.live.current
    with app.live.pinned():
        app.reload(_config(tmp_path, jwks_file, docs, graph))
        app.reload(_config(tmp_path, jwks_file, docs,
                           reload={"allow_provider_removal": ["graph"]}))
        assert app.live.current is first
    with pytest.raises(UnroutedDenied, match="provider 'graph', which a config reload"):
        refuse_retired(app.live.current.router, Destination("graph.example.com", 443,
                                                            tls=True))


async def test_an_unchanged_identity_keeps_the_verifier_of_a_jwks_url(
        tmp_path: Path) -> None:
    """A JWKS URL refetches by itself: a reload that leaves identity alone keeps the
    verifier (and its fetched keys); a key file is re-read on every reload."""
    identity = {"issuer": ISSUER, "audience": AUDIENCE,
                "jwks_url": "https://keys.example.com/jwks.json"}
    a = build(_config(tmp_path, tmp_path, identity=identity), environ=ENV)
    try:
        before = a.live.current
        a.reload(_config(tmp_path, tmp_path, identity=identity, refresh={"attempts": 2}))
        assert a.live.current is not before
        assert a.live.current.verifier is before.verifier
    finally:
        await a.aclose()


def test_a_snapshot_is_immutable_and_its_header_policy_follows_its_verifier(
        make_verifier: Callable[..., IdentityVerifier]) -> None:
    docs = ProviderSettings.model_validate(_provider("docs", "docs.example.com",
                                                     client_secret_env="DOCS_SECRET"))
    secrets: dict[str, Secret | None] = {"docs": Secret("s1")}
    live = live_config(docs, verifier=make_verifier(header="X-Agent-Context"),
                       secrets=secrets)
    snap = live.current
    secrets["docs"] = Secret("changed")  # the caller's dict: not the snapshot's
    assert snap.client_secret(docs) == Secret("s1")
    with pytest.raises(TypeError):
        snap.secrets["docs"] = None  # type: ignore[index]
    with pytest.raises(AttributeError):
        snap.settings = snap.settings  # type: ignore[misc]
    assert snap.headers.context_header == "X-Agent-Context"
    with pytest.raises(ConfigError, match="no provider with id 'graph'"):
        snap.provider("graph")


# --- an operation keeps its snapshot -----------------------------------------------------


class _HeldReads(LocalVault):
    """Vault reads wait until released: a reload lands while a request is under way."""

    reading: asyncio.Event
    release: asyncio.Event

    async def get(self, user: str, provider: str) -> Grant | None:
        self.reading.set()
        await self.release.wait()
        return await super().get(user, provider)


def _swap_client(live: LiveConfig, client_id: str, secret: str) -> None:
    """A reload that moves every provider to another OAuth client (id and secret)."""
    snap = live.current
    providers = [p.model_copy(update={"client_id": client_id})
                 for p in snap.settings.providers]
    live.swap(Snapshot.build(snap.settings.model_copy(update={"providers": providers}),
                             snap.verifier, secrets={p.id: Secret(secret) for p in providers}))


def _basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


async def _sidecar(tmp_path: Path, keys: Keys, fake: FakeOAuth, vault_type: type[LocalVault],
                   lines: RecordingSink) -> tuple[Sidecar, LiveConfig, LocalVault, ProviderClient]:
    """A sidecar whose one provider, docs, refreshes at ``fake`` as OAuth client
    client-1 with secret-1."""
    docs = ProviderSettings.model_validate(_provider(
        "docs", "docs.example.com", client_id="client-1", client_secret_env="UNUSED",
        token_url=f"{fake.base}/token", allow_http=True))
    settings = Settings(identity={"issuer": ISSUER, "audience": AUDIENCE,
                                  "jwks_file": "/nonexistent"}, providers=[docs],
                        refresh=RefreshSettings(attempts=1, backoff=0, timeout=5))
    live = live_config(settings=settings, secrets={"docs": Secret("secret-1")},
                       verifier=IdentityVerifier(settings.identity,
                                                 KeySource(keys.public_set()), clock=Clock()))
    vault = vault_type.open(tmp_path / "v.db", bytes(range(32)), clock=lambda: NOW)
    client = ProviderClient(live)
    sidecar = Sidecar(live, TokenBroker(vault, MemoryCoordinator(), client, live,
                                        metrics=Metrics(), clock=lambda: NOW),
                      AuditLog(lines, instance="t/1", fingerprint_key=b"k" * 32,
                               clock=lambda: NOW))
    return sidecar, live, vault, client


def _request(make_context: MakeContext) -> Outbound:
    return Outbound(id="r", method="GET",
                    destination=Destination("docs.example.com", 443, tls=True),
                    host_header="docs.example.com", path="/",
                    context_token=Secret(make_context()))


async def test_a_request_under_way_during_a_reload_refreshes_as_the_client_it_started_with(
        tmp_path: Path, keys: Keys, fake: FakeOAuth, make_context: MakeContext) -> None:
    """A reload moves the provider to another OAuth client while a request waits on the
    vault; its refresh presents the old client id with the old secret, never the old id
    with the new secret. The next request runs on the new configuration."""
    fake.script("/token", Answer.json(access_token="at-2", token_type="Bearer",
                                      expires_in=3600))
    sidecar, live, vault, client = await _sidecar(tmp_path, keys, fake, _HeldReads, RecordingSink())
    assert isinstance(vault, _HeldReads)
    vault.reading, vault.release = asyncio.Event(), asyncio.Event()
    await LocalVault.put(vault, Grant(USER, "docs", TokenSet(Secret("at-1"), Secret("rt-1"),
                                                             expires_at=NOW - 1)))
    try:
        under_way = asyncio.create_task(sidecar.decide(_request(make_context)))
        await vault.reading.wait()
        _swap_client(live, "client-2", "secret-2")
        vault.release.set()
        decided = await under_way
        assert isinstance(decided, Injection) and decided.value == Secret("Bearer at-2")
        (refresh,) = fake.requests("/token")
        assert refresh.headers["authorization"] == _basic("client-1", "secret-1")
        assert decided.config is not live.current
        assert decided.config is not None and decided.config.secrets["docs"] == Secret(
            "secret-1")
        again = await sidecar.decide(_request(make_context))
        assert isinstance(again, Injection) and again.config is live.current
    finally:
        await client.aclose()
        await vault.close()


async def test_the_answer_to_a_decision_is_judged_on_the_decisions_snapshot(
        tmp_path: Path, keys: Keys, fake: FakeOAuth, make_context: MakeContext) -> None:
    """An injection carries the snapshot it was decided on: the forced refresh after an
    upstream 401 that arrives after a reload is made as the client the token was injected
    for."""
    fake.script("/token", Answer.json(access_token="at-2", token_type="Bearer",
                                      expires_in=3600))
    lines = RecordingSink()
    sidecar, live, vault, client = await _sidecar(tmp_path, keys, fake, LocalVault, lines)
    await vault.put(Grant(USER, "docs", TokenSet(Secret("at-1"), Secret("rt-1"),
                                                 expires_at=NOW + 3600)))
    out = _request(make_context)
    try:
        injection = await sidecar.decide(out)
        assert isinstance(injection, Injection) and injection.config is live.current
        _swap_client(live, "client-2", "secret-2")
        refusal = await sidecar.upstream_response(out, injection, 401, {})
    finally:
        await client.aclose()
        await vault.close()
    assert refusal is not None and refusal.reason == "token_refreshed"
    (refresh,) = fake.requests("/token")
    assert refresh.headers["authorization"] == _basic("client-1", "secret-1")
    assert json.loads(lines.lines[-1])["reason"] == "token_refreshed"




@pytest.fixture
async def fake() -> AsyncIterator[FakeOAuth]:
    async for f in serve():
        yield f


async def test_a_provider_call_keeps_the_retry_settings_it_started_with(
        fake: FakeOAuth) -> None:
    """A refresh that started with 3 attempts makes 3, whatever a reload meanwhile says;
    the next call uses the new setting."""
    docs = ProviderSettings.model_validate(_provider(
        "docs", "docs.example.com", token_endpoint_auth_method="none",
        token_url=f"{fake.base}/token", allow_http=True))
    live = live_config(docs, refresh=RefreshSettings(attempts=3, backoff=0, timeout=5))

    async def reload_between_attempts(_: float) -> None:
        snap = live.current  # not pinned here: the latest snapshot
        live.swap(Snapshot.build(snap.settings.model_copy(update={
            "refresh": RefreshSettings(attempts=1, backoff=0, timeout=5)}),
            snap.verifier, secrets=snap.secrets))

    fake.script("/token", *[Answer.json(503, error="temporarily_unavailable")] * 4)
    client = ProviderClient(live, sleep=reload_between_attempts)
    try:
        with pytest.raises(TokenRefreshFailed, match="after 3 attempts"):
            await client.refresh(docs, None, Secret("rt-1"))
        assert len(fake.requests("/token")) == 3
        with pytest.raises(TokenRefreshFailed, match="after 1 attempts"):
            await client.refresh(docs, None, Secret("rt-2"))
        assert len(fake.requests("/token")) == 4
    finally:
        await client.aclose()


async def test_pinned_snapshots_are_per_task(make_verifier: Callable[..., IdentityVerifier]
                                             ) -> None:
    """Two operations under way at once each keep their own snapshot; outside them,
    ``current`` is the latest."""
    live = live_config(verifier=make_verifier())
    first = live.current
    second = Snapshot.build(first.settings, make_verifier(header="X-Agent-Context"),
                            secrets={})
    entered, swapped = asyncio.Event(), asyncio.Event()

    async def operation() -> list[Snapshot]:
        with live.pinned() as snap:
            entered.set()
            await swapped.wait()
            return [snap, live.current, live.latest]

    task = asyncio.create_task(operation())
    await entered.wait()
    live.swap(second)
    swapped.set()
    assert await task == [first, first, second]
    assert live.current is second
    with live.pinned(first):
        assert live.current is first and live.latest is second
    assert live.current is second


async def test_an_unrouted_decision_reads_router_and_mode_from_one_snapshot(
        make_verifier: Callable[..., IdentityVerifier]) -> None:
    """``unrouted`` and the router come from the snapshot the decision was given, not
    from whatever is current."""
    docs = ProviderSettings.model_validate(_provider("docs", "docs.example.com",
                                                     token_endpoint_auth_method="none"))
    live = live_config(docs, verifier=make_verifier(), unrouted="passthrough")
    passthrough = live.current
    denying = Snapshot.build(passthrough.settings.model_copy(update={"unrouted": "deny"}),
                             passthrough.verifier, secrets=passthrough.secrets)
    live.swap(denying)
    client = ProviderClient(live)
    sidecar = Sidecar(live, TokenBroker(None, MemoryCoordinator(), client, live),  # type: ignore[arg-type]
                      AuditLog(RecordingSink(), instance="t/1", fingerprint_key=b"k" * 32))
    out = Outbound(id="r", method="GET",
                   destination=Destination("elsewhere.example", 443, tls=True),
                   host_header="elsewhere.example", path="/")
    try:
        assert isinstance(await sidecar.decide(out, passthrough), Passthrough)
        with pytest.raises(UnroutedDenied, match="not a configured provider"):
            await sidecar.decide(out)
    finally:
        await client.aclose()
