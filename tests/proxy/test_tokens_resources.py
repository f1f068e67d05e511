"""The token broker for a grant with resources (docs/tenants.md "One consent, several
resources"), on a real local vault, the real provider client and a scripted token endpoint
on a real socket: one refresh token serves the provider's own hosts and each resource;
each resource has its own access token, obtained and refreshed by redeeming the grant's
refresh token with the resource's scopes; what happens to one never touches the others,
except a dead refresh token, which is the whole grant's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.coordination import MemoryCoordinator
from proxy.errors import ReauthRequired
from proxy.live import LiveConfig
from proxy.provider_client import ProviderClient
from proxy.secret import Secret
from proxy.settings import ProviderSettings, RefreshSettings
from proxy.tokens import TokenBroker
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant, GrantStatus
from proxy.vault.local import LocalVault
from tests.proxy.conftest import live_config
from tests.proxy.oauthfake import Answer, FakeOAuth, serve

KEY = bytes(range(32))
NOW = 1_800_000_000.0
SITE = "contoso.sharepoint.com"
SP_SCOPE = f"https://{SITE}/.default offline_access"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def microsoft(base: str, **over: Any) -> ProviderSettings:
    entry: dict[str, Any] = {
        "id": "ms", "hosts": ["graph.example.com"], "client_id": "c",
        "client_secret_env": "S", "token_endpoint_auth_method": "client_secret_post",
        "allow_http": True, "token_url": f"{base}/token",
        "scopes": ["offline_access", "User.Read"],
        "grant_values": {"site": {"from": "discovery", "field": "webUrl", "kind": "host",
                                  "url": "https://graph.example.com/v1.0/sites/root"}},
        "resources": {
            "sp": {"hosts": ["*.sharepoint.com"], "grant_hosts": ["{site}"],
                   "scopes": ["https://{site}/.default", "offline_access"]},
            "dyn": {"hosts": ["*.crm.dynamics.com"], "scopes": ["https://{site}/dyn"]}}}
    entry.update(over)
    return ProviderSettings.model_validate(entry)


@dataclass
class Parts:
    broker: TokenBroker
    vault: LocalVault
    client: ProviderClient
    fake: FakeOAuth
    clock: Clock
    provider: ProviderSettings
    live: LiveConfig

    def forms(self, path: str = "/token") -> list[dict[str, str]]:
        return [s.form for s in self.fake.requests(path)]

    async def stored(self) -> Grant:
        grant = await self.vault.get("u", "ms")
        assert grant is not None
        return grant


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    clock = Clock()
    async for fake in serve():
        vault = LocalVault.open(tmp_path / "v.db", KEY, clock=clock)
        live = live_config(refresh=RefreshSettings(attempts=2, backoff=0, timeout=5),
                           public_url="https://admin", secrets={"ms": Secret("s3cret")})
        client = ProviderClient(live, clock=clock)
        broker = TokenBroker(vault, MemoryCoordinator(clock), client, live, clock=clock)
        yield Parts(broker, vault, client, fake, clock, microsoft(fake.base), live)
        await client.aclose()
        await vault.close()


def main_tokens(expires_in: float = 3600) -> TokenSet:
    return TokenSet(Secret("main-1"), Secret("rt-1"), expires_at=NOW + expires_in,
                    scope="offline_access User.Read")


async def connected(parts: Parts, **values: str) -> None:
    await parts.vault.put(Grant("u", "ms", main_tokens(),
                                values=values if values else {"site": SITE}))


def answer(access: str, refresh: str | None = None, expires_in: int = 600,
           **extra: Any) -> Answer:
    members: dict[str, Any] = {"access_token": access, "token_type": "Bearer",
                               "expires_in": expires_in, **extra}
    if refresh is not None:
        members["refresh_token"] = refresh
    return Answer.json(**members)


async def test_a_resource_token_is_redeemed_with_its_scopes_and_kept_beside_the_main_one(
        parts: Parts) -> None:
    parts.fake.script("/token", answer("sp-1", "rt-2", scope=SP_SCOPE))
    await connected(parts)
    issued = await parts.broker.get("u", parts.provider, resource="sp")
    assert (issued.tokens.access_token, issued.source) == (Secret("sp-1"), "refresh")
    assert issued.grant.values == {"site": SITE}
    (form,) = parts.forms()
    assert form == {"grant_type": "refresh_token", "refresh_token": "rt-1",
                    "scope": SP_SCOPE, "client_id": "c", "client_secret": "s3cret"}
    grant = await parts.stored()
    # One record: the main token kept, the rotated refresh token taken, the resource's
    # access token beside it (never a refresh token of its own).
    assert grant.tokens.access_token == Secret("main-1")
    assert grant.tokens.refresh_token == Secret("rt-2")
    assert set(grant.resources) == {"sp"}
    sp = grant.resources["sp"]
    assert (sp.access_token, sp.refresh_token, sp.expires_at) == (Secret("sp-1"), None,
                                                                   NOW + 600)
    assert grant.values == {"site": SITE}


async def test_the_next_requests_are_served_from_cache(parts: Parts) -> None:
    parts.fake.script("/token", answer("sp-1", "rt-2"))
    await connected(parts)
    await parts.broker.get("u", parts.provider, resource="sp")
    again = await parts.broker.get("u", parts.provider, resource="sp")
    main = await parts.broker.get("u", parts.provider)
    assert (again.source, again.tokens.access_token) == ("cache", Secret("sp-1"))
    assert (main.source, main.tokens.access_token) == ("cache", Secret("main-1"))
    assert parts.client.calls == 1
    # Another process (a fresh broker on the same vault) reads both from the vault.
    other = TokenBroker(parts.vault, MemoryCoordinator(parts.clock), parts.client,
                        parts.live, clock=parts.clock)
    got = await other.get("u", parts.provider, resource="sp")
    assert (got.source, got.tokens.access_token) == ("vault", Secret("sp-1"))
    assert parts.client.calls == 1


async def test_concurrent_first_requests_redeem_once(parts: Parts) -> None:
    parts.fake.script("/token", answer("sp-1", "rt-2"))
    await connected(parts)
    got = await asyncio.gather(*(parts.broker.get("u", parts.provider, resource="sp")
                                 for _ in range(5)))
    assert {g.tokens.access_token.reveal() for g in got} == {"sp-1"}
    assert parts.client.calls == 1


async def test_an_expired_resource_token_refreshes_only_that_resource(parts: Parts) -> None:
    parts.fake.script("/token", answer("sp-1", "rt-2"), answer("sp-2", "rt-3"))
    await connected(parts)
    await parts.broker.get("u", parts.provider, resource="sp")
    parts.clock.now += 600  # the resource's token is due, the main one is not
    assert (await parts.broker.get("u", parts.provider)).tokens.access_token == \
        Secret("main-1")
    assert parts.client.calls == 1
    fresh = await parts.broker.get("u", parts.provider, resource="sp")
    assert fresh.tokens.access_token == Secret("sp-2")
    forms = parts.forms()
    assert [f["refresh_token"] for f in forms] == ["rt-1", "rt-2"]  # the rotated one
    assert forms[1]["scope"] == SP_SCOPE
    grant = await parts.stored()
    assert grant.tokens.access_token == Secret("main-1")
    assert grant.tokens.refresh_token == Secret("rt-3")
    assert grant.resources["sp"].access_token == Secret("sp-2")


async def test_an_expired_main_token_refreshes_without_resource_scopes_and_keeps_resources(
        parts: Parts) -> None:
    parts.fake.script("/token", answer("sp-1", "rt-2", expires_in=7200),
                      answer("main-2", "rt-3", expires_in=3600))
    await connected(parts)
    await parts.broker.get("u", parts.provider, resource="sp")
    parts.clock.now += 3600
    main = await parts.broker.get("u", parts.provider)
    assert main.tokens.access_token == Secret("main-2")
    assert "scope" not in parts.forms()[1]
    assert parts.forms()[1]["refresh_token"] == "rt-2"
    grant = await parts.stored()
    assert grant.resources["sp"].access_token == Secret("sp-1")
    assert grant.tokens.refresh_token == Secret("rt-3")
    sp = await parts.broker.get("u", parts.provider, resource="sp")
    assert (sp.source, sp.tokens.access_token) == ("cache", Secret("sp-1"))
    assert parts.client.calls == 2


async def test_two_resources_each_get_their_own_token(parts: Parts) -> None:
    parts.fake.script("/token", answer("sp-1", "rt-2"), answer("dyn-1"))
    await connected(parts)
    await parts.broker.get("u", parts.provider, resource="sp")
    dyn = await parts.broker.get("u", parts.provider, resource="dyn")
    assert dyn.tokens.access_token == Secret("dyn-1")
    forms = parts.forms()
    assert forms[1]["scope"] == f"https://{SITE}/dyn"
    assert forms[1]["refresh_token"] == "rt-2"
    grant = await parts.stored()
    assert {r: t.access_token.reveal() for r, t in grant.resources.items()} == {
        "sp": "sp-1", "dyn": "dyn-1"}
    assert grant.tokens.refresh_token == Secret("rt-2")  # none came back: the last kept


async def test_a_401_on_a_resource_token_refreshes_that_resource_only(parts: Parts) -> None:
    parts.fake.script("/token", answer("sp-1", "rt-2"), answer("sp-2", "rt-3"))
    await connected(parts)
    await parts.broker.get("u", parts.provider, resource="sp")
    assert await parts.broker.refresh_rejected("u", parts.provider, Secret("sp-1"),
                                               resource="sp") == "refreshed"
    assert parts.forms()[1]["scope"] == SP_SCOPE
    grant = await parts.stored()
    assert grant.status is GrantStatus.ACTIVE
    assert grant.tokens.access_token == Secret("main-1")
    assert grant.resources["sp"].access_token == Secret("sp-2")
    sp = await parts.broker.get("u", parts.provider, resource="sp")
    assert (sp.source, sp.tokens.access_token) == ("cache", Secret("sp-2"))
    # The main token, not the resource's, rejected on a resource host: not the resource's
    # current token, nothing is done.
    assert await parts.broker.refresh_rejected("u", parts.provider, Secret("main-1"),
                                               resource="sp") == "superseded"
    assert parts.client.calls == 2


async def test_a_401_on_the_main_token_leaves_resource_tokens(parts: Parts) -> None:
    parts.fake.script("/token", answer("sp-1", "rt-2"), answer("main-2", "rt-3"))
    await connected(parts)
    await parts.broker.get("u", parts.provider, resource="sp")
    assert await parts.broker.refresh_rejected("u", parts.provider,
                                               Secret("main-1")) == "refreshed"
    assert "scope" not in parts.forms()[1]
    grant = await parts.stored()
    assert grant.tokens.access_token == Secret("main-2")
    assert grant.resources["sp"].access_token == Secret("sp-1")


async def test_a_rejected_resource_token_from_before_a_refresh_is_superseded(
        parts: Parts) -> None:
    parts.fake.script("/token", answer("sp-1", "rt-2"), answer("sp-2", "rt-3"))
    await connected(parts)
    await parts.broker.get("u", parts.provider, resource="sp")
    parts.clock.now += 600
    await parts.broker.get("u", parts.provider, resource="sp")
    assert await parts.broker.refresh_rejected("u", parts.provider, Secret("sp-1"),
                                               resource="sp") == "superseded"
    assert parts.client.calls == 2


@pytest.mark.parametrize("later", [False, True], ids=["first-redeem", "later-refresh"])
async def test_a_dead_refresh_token_on_a_resource_redeem_marks_the_whole_grant(
        parts: Parts, later: bool) -> None:
    if later:  # the resource's token exists; its refresh meets the dead refresh token
        parts.fake.script("/token", answer("sp-1", "rt-2"),
                          Answer.json(400, error="invalid_grant"))
    else:
        parts.fake.script("/token", Answer.json(400, error="invalid_grant"))
    await connected(parts)
    if later:
        await parts.broker.get("u", parts.provider, resource="sp")
        parts.clock.now += 600
    with pytest.raises(ReauthRequired) as exc:
        await parts.broker.get("u", parts.provider, resource="sp")
    assert exc.value.reason == "invalid_grant"
    grant = await parts.stored()
    assert (grant.status, grant.reason) == (GrantStatus.REAUTH_REQUIRED, "invalid_grant")
    calls = parts.client.calls
    for resource in (None, "sp", "dyn"):  # the main token was fresh: still gone
        with pytest.raises(ReauthRequired) as again:
            await parts.broker.get("u", parts.provider, resource=resource)
        assert again.value.reason == "invalid_grant"
    assert parts.client.calls == calls


async def test_a_grant_without_the_value_a_resource_needs_is_reauth(parts: Parts) -> None:
    await parts.vault.put(Grant("u", "ms", main_tokens(), values={}))
    with pytest.raises(ReauthRequired) as exc:
        await parts.broker.get("u", parts.provider, resource="sp")
    assert exc.value.reason == "grant_value_missing"
    assert "'site'" in exc.value.detail and "reconnect" in exc.value.detail
    assert exc.value.connect_url == "https://admin/connect/ms"
    assert parts.client.calls == 0  # nothing redeemed with an unrendered scope
    main = await parts.broker.get("u", parts.provider)  # the main token needs no value
    assert main.tokens.access_token == Secret("main-1")


async def test_a_grant_without_the_value_its_token_url_needs_is_reauth(parts: Parts) -> None:
    provider = ProviderSettings.model_validate({
        "id": "ms", "hosts": ["api.example.com"], "client_id": "c", "allow_http": True,
        "token_endpoint_auth_method": "none",
        "token_url": f"{parts.fake.base}/qb/{{realm}}/token",
        "grant_values": {"realm": {"from": "callback", "param": "realmId"}}})
    parts.fake.script("/qb/123/token", answer("at-2", "rt-2"))
    await parts.vault.put(Grant("u", "ms", main_tokens(expires_in=-1), values={}))
    with pytest.raises(ReauthRequired) as exc:
        await parts.broker.get("u", provider)
    assert exc.value.reason == "grant_value_missing"
    assert parts.fake.seen == []
    # With the value, the refresh goes to the grant's own token URL.
    await parts.vault.put(Grant("u", "ms", main_tokens(expires_in=-1),
                                values={"realm": "123"}))
    parts.broker.invalidate("u", "ms")
    assert (await parts.broker.get("u", provider)).tokens.access_token == Secret("at-2")
    assert [s.path for s in parts.fake.seen] == ["/qb/123/token"]


async def test_a_resource_answer_without_an_expiry_uses_the_default(parts: Parts) -> None:
    provider = microsoft(parts.fake.base, default_expires_in=900)
    parts.fake.script("/token", Answer.json(access_token="sp-1", token_type="Bearer"))
    await connected(parts)
    await parts.broker.get("u", provider, resource="sp")
    grant = await parts.stored()
    assert grant.resources["sp"].expires_at == NOW + 900
    assert grant.tokens.refresh_token == Secret("rt-1")


async def test_a_grant_without_a_refresh_token_keeps_its_main_token_when_a_resource_is_asked(
        parts: Parts) -> None:
    """A resource's token can only come from the refresh token; its absence says nothing
    about the main token, which stays usable (the grant is not marked)."""
    await parts.vault.put(Grant("u", "ms", TokenSet(Secret("main-1"), None,
                                                    expires_at=NOW + 3600),
                                values={"site": SITE}))
    with pytest.raises(ReauthRequired) as exc:
        await parts.broker.get("u", parts.provider, resource="sp")
    assert exc.value.reason == "expired" and "sp" in exc.value.detail
    assert parts.client.calls == 0
    grant = await parts.stored()
    assert grant.status is GrantStatus.ACTIVE
    assert (await parts.broker.get("u", parts.provider)).tokens.access_token == \
        Secret("main-1")
