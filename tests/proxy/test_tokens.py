"""TokenBroker on a real local vault: cache, re-auth marking, kept-on-failure writes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.coordination import MemoryCoordinator
from proxy.errors import CredentialStoreUnavailable, ReauthRequired, VaultUnavailable
from proxy.provider_client import ProviderClient
from proxy.secret import Secret
from proxy.settings import ProviderSettings
from proxy.tokens import TokenBroker
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant, GrantStatus
from proxy.vault.local import LocalVault

from .conftest import live_config

KEY = bytes(range(32))
NOW = 1_800_000_000.0
PROVIDER = ProviderSettings(id="docs", hosts=["docs.example.com"],
                            token_url="https://login.example.com/token", client_id="c",
                            token_endpoint_auth_method="none")
LIVE = live_config(PROVIDER, public_url="https://admin")


def tokens(access: str, expires_in: float = 3600) -> TokenSet:
    return TokenSet(access_token=Secret(access), refresh_token=Secret("rt-" + access),
                    expires_at=NOW + expires_in)


@pytest.fixture
async def vault(tmp_path: Path) -> LocalVault:
    v = LocalVault.open(tmp_path / "vault.db", KEY, clock=lambda: NOW)
    yield v  # type: ignore[misc]
    await v.close()


@pytest.fixture
async def broker(vault: LocalVault) -> TokenBroker:
    refresher = ProviderClient(LIVE)
    b = TokenBroker(vault, MemoryCoordinator(), refresher, LIVE, clock=lambda: NOW)
    yield b  # type: ignore[misc]
    await refresher.aclose()


async def test_vault_then_cache(broker: TokenBroker, vault: LocalVault) -> None:
    await vault.put(Grant("u", "docs", tokens("a1")))
    first = await broker.get("u", PROVIDER)
    second = await broker.get("u", PROVIDER)
    assert (first.source, second.source) == ("vault", "cache")
    assert second.tokens.access_token == Secret("a1")


async def test_no_grant_is_reauth_no_connection(broker: TokenBroker) -> None:
    with pytest.raises(ReauthRequired) as exc:
        await broker.get("nobody", PROVIDER)
    assert exc.value.reason == "no_connection"
    assert exc.value.connect_url == "https://admin/connect/docs"


async def test_expired_without_refresh_token_marks_expired(broker: TokenBroker,
                                                           vault: LocalVault) -> None:
    await vault.put(Grant("u", "docs", TokenSet(Secret("a"), None, expires_at=NOW - 1)))
    with pytest.raises(ReauthRequired, match="cannot be refreshed"):
        await broker.get("u", PROVIDER)
    stored = await vault.get("u", "docs")
    assert stored is not None and stored.status is GrantStatus.REAUTH_REQUIRED
    assert stored.reason == "expired"


async def test_forced_refresh_of_a_superseded_token_does_nothing(broker: TokenBroker,
                                                                  vault: LocalVault) -> None:
    await vault.put(Grant("u", "docs", tokens("a2")))
    assert await broker.refresh_rejected("u", PROVIDER, Secret("a1")) == "superseded"
    stored = await vault.get("u", "docs")
    assert stored is not None and stored.status is GrantStatus.ACTIVE
    assert broker._refresher.calls == 0


async def test_forced_refresh_without_a_refresh_token_marks_revoked_upstream(
        broker: TokenBroker, vault: LocalVault) -> None:
    await vault.put(Grant("u", "docs", TokenSet(Secret("a1"), None, expires_at=None)))
    with pytest.raises(ReauthRequired) as exc:
        await broker.refresh_rejected("u", PROVIDER, Secret("a1"))
    assert exc.value.reason == "revoked_upstream"
    assert "no refresh token" in exc.value.detail
    stored = await vault.get("u", "docs")
    assert stored is not None and stored.reason == "revoked_upstream"
    assert broker._refresher.calls == 0
    with pytest.raises(ReauthRequired) as again:
        await broker.get("u", PROVIDER)  # dropped from the cache too
    assert again.value.reason == "revoked_upstream"


async def test_invalidation_drops_the_cache(broker: TokenBroker, vault: LocalVault) -> None:
    await vault.put(Grant("u", "docs", tokens("a1")))
    await broker.get("u", PROVIDER)
    await vault.put(Grant("u", "docs", tokens("a2")))
    broker.invalidate("u", "docs")
    assert (await broker.get("u", PROVIDER)).tokens.access_token == Secret("a2")


class _Unreachable(LocalVault):
    """A local vault whose backing store has gone away."""

    async def get(self, user: str, provider: str) -> Grant | None:
        raise VaultUnavailable("store unreachable")


async def test_vault_outage_is_credential_store_unavailable(tmp_path: Path) -> None:
    v = _Unreachable.open(tmp_path / "v.db", KEY)
    refresher = ProviderClient(LIVE)
    b = TokenBroker(v, MemoryCoordinator(), refresher, LIVE)
    with pytest.raises(CredentialStoreUnavailable) as exc:
        await b.get("u", PROVIDER)
    assert exc.value.status == 503 and "Retry-After" in exc.value.headers()
    await refresher.aclose()
    await v.close()


def _broker(vault: LocalVault, refresher: ProviderClient) -> TokenBroker:
    return TokenBroker(vault, MemoryCoordinator(), refresher, LIVE, clock=lambda: NOW)


class _SlowReads(LocalVault):
    """Reads wait for a signal: lets a test land an invalidation during a read."""

    gate: asyncio.Event
    reading: asyncio.Event

    async def get(self, user: str, provider: str) -> Grant | None:
        self.reading.set()
        await self.gate.wait()
        return await super().get(user, provider)


async def test_a_read_in_flight_during_an_invalidation_is_not_cached(tmp_path: Path) -> None:
    v = _SlowReads.open(tmp_path / "v.db", KEY, clock=lambda: NOW)
    v.gate, v.reading = asyncio.Event(), asyncio.Event()
    refresher = ProviderClient(LIVE)
    b = _broker(v, refresher)
    try:
        await LocalVault.put(v, Grant("u", "docs", tokens("a1")))
        pending = asyncio.create_task(b.get("u", PROVIDER))
        await v.reading.wait()
        b.invalidate("u", "docs")  # a revoke elsewhere, heard while the read was under way
        v.gate.set()
        await pending
        # What that read returned must not be served from memory afterwards.
        assert (await b.get("u", PROVIDER)).source == "vault"
    finally:
        await refresher.aclose()
        await v.close()


class _FixedRefresher(ProviderClient):
    """The token endpoint's answer, without a network: the broker is what is under test."""

    async def refresh(self, provider: ProviderSettings, client_secret: Secret | None,
                      refresh_token: Secret, *, scopes: list[str] | None = None) -> TokenSet:
        self.calls += 1
        return tokens("rotated")


class _FlakyWrites(LocalVault):
    failing = True

    async def put(self, grant: Grant, *, expected_version: int | None = None) -> Grant:
        if self.failing:
            raise VaultUnavailable("write failed")
        return await super().put(grant, expected_version=expected_version)


async def _refresh_whose_write_fails(v: _FlakyWrites, b: TokenBroker
                                     ) -> CredentialStoreUnavailable:
    """An expired grant is refreshed, and storing the rotated tokens fails."""
    v.failing = False
    await v.put(Grant("u", "docs", tokens("old", expires_in=-1)))
    v.failing = True
    with pytest.raises(CredentialStoreUnavailable) as exc:
        await b.get("u", PROVIDER)
    return exc.value


@pytest.mark.parametrize("told", [True, False], ids=["invalidation-heard", "not-heard"])
async def test_unsaved_tokens_never_bring_back_a_revoked_grant(tmp_path: Path,
                                                               told: bool) -> None:
    """A refresh whose vault write failed keeps its tokens in memory; if the grant is then
    revoked, they must not be written back (whether or not this process heard of it)."""
    v = _FlakyWrites.open(tmp_path / "v.db", KEY, clock=lambda: NOW)
    refresher = _FixedRefresher(LIVE)
    b = _broker(v, refresher)
    try:
        failed = await _refresh_whose_write_fails(v, b)
        assert failed.reason == "vault_write_failed" and refresher.calls == 1
        assert await v.delete("u", "docs")  # `credproxy revoke` in another process
        if told:
            b.invalidate("u", "docs")
        v.failing = False
        with pytest.raises(ReauthRequired):
            await b.get("u", PROVIDER)
        assert await v.get("u", "docs") is None
    finally:
        await refresher.aclose()
        await v.close()


async def test_unsaved_tokens_are_written_once_the_vault_is_back(tmp_path: Path) -> None:
    v = _FlakyWrites.open(tmp_path / "v.db", KEY, clock=lambda: NOW)
    refresher = _FixedRefresher(LIVE)
    b = _broker(v, refresher)
    try:
        await _refresh_whose_write_fails(v, b)
        v.failing = False
        got = await b.get("u", PROVIDER)
        assert got.tokens.access_token == Secret("rotated") and refresher.calls == 1
        stored = await v.get("u", "docs")
        assert stored is not None and stored.tokens.refresh_token == Secret("rt-rotated")
    finally:
        await refresher.aclose()
        await v.close()


async def test_a_reconnect_during_a_refresh_wins(tmp_path: Path) -> None:
    """The user reconnects while a refresh of the old grant is in flight: the refresh's
    tokens are discarded (the write is conditional) and the new grant is used."""
    v = LocalVault.open(tmp_path / "v.db", KEY, clock=lambda: NOW)

    class ReconnectMeanwhile(_FixedRefresher):
        async def refresh(self, provider: ProviderSettings, client_secret: Secret | None,
                          refresh_token: Secret, *, scopes: list[str] | None = None
                          ) -> TokenSet:
            await v.put(Grant("u", "docs", tokens("reconnected")))
            return await super().refresh(provider, client_secret, refresh_token)

    refresher = ReconnectMeanwhile(LIVE)
    b = _broker(v, refresher)
    try:
        await v.put(Grant("u", "docs", tokens("old", expires_in=-1)))
        got = await b.get("u", PROVIDER)
        assert got.tokens.access_token == Secret("reconnected")
        stored = await v.get("u", "docs")
        assert stored is not None and stored.tokens.access_token == Secret("reconnected")
    finally:
        await refresher.aclose()
        await v.close()


async def test_a_full_invalidation_keeps_unsaved_tokens(tmp_path: Path) -> None:
    """A Redis resubscribe drops every memory cache; tokens whose write failed must survive
    it (the old refresh token is spent: losing them would burn the grant)."""
    v = _FlakyWrites.open(tmp_path / "v.db", KEY, clock=lambda: NOW)
    refresher = _FixedRefresher(LIVE)
    b = _broker(v, refresher)
    try:
        await _refresh_whose_write_fails(v, b)
        await b._on_invalidation(None)
        v.failing = False
        got = await b.get("u", PROVIDER)
        assert got.tokens.access_token == Secret("rotated") and refresher.calls == 1
    finally:
        await refresher.aclose()
        await v.close()
