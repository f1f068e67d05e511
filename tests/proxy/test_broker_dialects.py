"""The token broker with the real provider client, a real local vault and a scripted
token endpoint on a real socket: what issue 13's faults look like to an agent.

- fault 1: a dead refresh token (in any dialect) is reauth-required in ONE call, the
  grant is marked, and the dead token is never presented again; an operator error is a
  502 that leaves the grant alone;
- fault 3: a grant of unknown expiry is not refreshed ahead of time; an upstream 401 gets
  one forced refresh; default_expires_in makes it refresh ahead like any other;
- fault 4: 30 s tokens with refresh_skew 60 are refreshed once per lifetime, not per
  request;
- fault 6: offboarding a provider without per-grant revocation says so exactly.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.audit import AuditLog, StdoutSink
from proxy.coordination import MemoryCoordinator
from proxy.errors import ProviderMisconfigured, ReauthRequired
from proxy.offboard import Offboarder
from proxy.provider_client import ProviderClient
from proxy.secret import Secret
from proxy.settings import RefreshSettings, parse_settings
from proxy.tokens import TokenBroker
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant, GrantStatus
from proxy.vault.local import LocalVault
from tests.proxy.conftest import live_config
from tests.proxy.dialects import DIALECTS, dialect
from tests.proxy.oauthfake import Answer, FakeOAuth, serve

KEY = bytes(range(32))
NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def fake() -> AsyncIterator[FakeOAuth]:
    async for f in serve():
        yield f


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def parts(tmp_path: Path, clock: Clock) -> AsyncIterator[tuple[TokenBroker, LocalVault,
                                                                      ProviderClient]]:
    vault = LocalVault.open(tmp_path / "v.db", KEY, clock=clock)
    # Every dialect's provider is a confidential client with the same secret.
    live = live_config(refresh=RefreshSettings(attempts=2, backoff=0, timeout=5),
                       secrets=dict.fromkeys(DIALECTS, Secret("s3cret")))
    client = ProviderClient(live, clock=clock)
    broker = TokenBroker(vault, MemoryCoordinator(clock), client, live, clock=clock)
    yield broker, vault, client
    await client.aclose()
    await vault.close()


def expired(access: str = "at-1") -> TokenSet:
    return TokenSet(Secret(access), Secret("rt-1"), expires_at=NOW - 1)


@pytest.mark.parametrize(("name", "answer", "reason"), [
    pytest.param("textbook", Answer.json(400, error="invalid_grant"), "invalid_grant",
                 id="textbook"),
    pytest.param("github", Answer.json(200, error="bad_refresh_token"), "bad_refresh_token",
                 id="github-http-200"),
    pytest.param("slack", Answer.json(200, ok=False, error="invalid_refresh_token"),
                 "invalid_refresh_token", id="slack-ok-false"),
    pytest.param("entra", Answer.json(400, error="interaction_required"),
                 "interaction_required", id="entra-mfa"),
    pytest.param("hubspot", Answer.json(400, status="BAD_REFRESH_TOKEN"), "bad_refresh_token",
                 id="hubspot-v1"),
])
async def test_a_dead_refresh_token_is_reauth_in_one_call_and_never_presented_again(
        fake: FakeOAuth, parts: Any, name: str, answer: Answer, reason: str) -> None:
    broker, vault, _ = parts
    fake.script("/token", answer)
    p = dialect(name, fake.base)
    await vault.put(Grant("u", p.id, expired()))
    with pytest.raises(ReauthRequired) as first:
        await broker.get("u", p)
    assert first.value.reason == reason and first.value.status == 401
    stored = await vault.get("u", p.id)
    assert stored is not None and stored.status is GrantStatus.REAUTH_REQUIRED
    assert stored.reason == reason
    for _ in range(3):  # the agent retries: no further call to the token endpoint
        with pytest.raises(ReauthRequired) as again:
            await broker.get("u", p)
        assert again.value.reason == reason
    assert len(fake.requests("/token")) == 1


async def test_an_operator_error_leaves_the_grant_alone(fake: FakeOAuth, parts: Any) -> None:
    broker, vault, _ = parts
    fake.script("/token", Answer.json(401, error="invalid_client"))
    p = dialect("textbook", fake.base)
    await vault.put(Grant("u", p.id, expired()))
    with pytest.raises(ProviderMisconfigured) as exc:
        await broker.get("u", p)
    assert exc.value.reason == "invalid_client"
    stored = await vault.get("u", p.id)
    assert stored is not None and stored.status is GrantStatus.ACTIVE
    assert broker.metrics.refreshes.labels(p.id, "misconfigured")._value.get() == 1


async def test_unknown_expiry_is_not_refreshed_until_an_upstream_401(
        fake: FakeOAuth, parts: Any, clock: Clock) -> None:
    """Salesforce sends no expires_in: the token is used until the API says 401; then one
    forced refresh gets a new token (the agent retries), and the grant is not thrown away
    although its refresh token works."""
    broker, vault, client = parts
    fake.script("/token", Answer.json(access_token="at-2", token_type="Bearer"))
    p = dialect("textbook", fake.base)  # no default_expires_in
    await vault.put(Grant("u", p.id, TokenSet(Secret("at-1"), Secret("rt-1"))))
    clock.now += 86_400
    assert (await broker.get("u", p)).tokens.access_token == Secret("at-1")
    assert client.calls == 0
    assert await broker.refresh_rejected("u", p, Secret("at-1")) == "refreshed"
    got = await broker.get("u", p)
    assert got.tokens.access_token == Secret("at-2")
    assert got.tokens.refresh_token == Secret("rt-1")  # none sent back: the old one kept
    assert client.calls == 1


async def test_default_expires_in_refreshes_ahead(fake: FakeOAuth, parts: Any,
                                                  clock: Clock) -> None:
    broker, vault, client = parts
    fake.script("/token", Answer.json(access_token="at-2", token_type="Bearer"),
                Answer.json(access_token="at-3", token_type="Bearer"))
    p = dialect("salesforce", fake.base)  # default_expires_in: 3600
    await vault.put(Grant("u", p.id, expired()))
    assert (await broker.get("u", p)).tokens.access_token == Secret("at-2")
    stored = await vault.get("u", p.id)
    assert stored is not None and stored.tokens.expires_at == NOW + 3600
    clock.now += 3600 - 30  # within refresh_skew (60) of the default lifetime
    assert (await broker.get("u", p)).tokens.access_token == Secret("at-3")
    assert client.calls == 2


async def test_thirty_second_tokens_refresh_once_per_lifetime(fake: FakeOAuth, parts: Any,
                                                              clock: Clock) -> None:
    """Fault 4: with refresh_skew 60 every 30 s token was "about to expire" when it
    arrived: five requests, five refreshes, five rotations. The margin is now
    min(skew, lifetime / 2)."""
    broker, vault, client = parts
    fake.script("/token", *[Answer.json(access_token=f"at-{i}", refresh_token=f"rt-{i}",
                                        expires_in=30) for i in range(2, 9)])
    p = dialect("textbook", fake.base)
    await vault.put(Grant("u", p.id, expired()))
    seen = []
    for offset in (0, 4, 8, 12, 14):  # five requests in the first half of the lifetime
        clock.now = NOW + offset
        seen.append((await broker.get("u", p)).tokens.access_token.reveal())
    assert seen == ["at-2"] * 5 and client.calls == 1
    clock.now = NOW + 16  # past half the lifetime: one more refresh
    assert (await broker.get("u", p)).tokens.access_token == Secret("at-3")
    assert client.calls == 2


async def test_offboarding_without_upstream_revocation_says_so(tmp_path: Path,
                                                               clock: Clock) -> None:
    """Fault 6: Entra ID and Atlassian have no per-grant revocation: the CLI line and the
    audit record say exactly that, with the console URL, and it counts as done."""
    settings = parse_settings({
        "identity": {"issuer": "i", "audience": "a", "hs256_secret_env": "X",
                     "algorithms": ["HS256"]},
        "providers": [{"id": "graph", "hosts": ["graph.example.com"], "client_id": "c",
                       "token_endpoint_auth_method": "none",
                       "token_url": "https://login.example.com/token",
                       **{k: v for k, v in DIALECTS["entra"].items()}}]})
    vault = LocalVault.open(tmp_path / "v.db", KEY, clock=clock)
    out = io.StringIO()
    audit = AuditLog(StdoutSink(out), instance="t/1", fingerprint_key=KEY, clock=clock)
    off = Offboarder(live_config(settings=settings), vault, MemoryCoordinator(clock), audit,
                     settle=0)
    try:
        await vault.put(Grant("bob", "graph", TokenSet(Secret("at"), Secret("rt"))))
        (result,) = await off.revoke("bob", "graph")
    finally:
        await off.aclose()
        await vault.close()
    expected = ("no upstream revocation exists for this provider; local removal done; "
                "revoke the app's access at https://entra.microsoft.com/#view/enterprise-apps")
    assert (result.upstream, result.detail, result.ok) == ("none", expected, True)
    record = json.loads(out.getvalue().splitlines()[-1])
    assert record["event"] == "connection.revoked" and record["outcome"] == "revoked"
    assert record["reason"] == "upstream_none" and expected in record["detail"]


@pytest.mark.parametrize("expired", [True, False], ids=["expired", "live"])
async def test_offboarding_refreshes_an_expired_access_token_a_provider_revokes_with(
        fake: FakeOAuth, tmp_path: Path, clock: Clock, expired: bool) -> None:
    """Dropbox revokes a grant with its access token (a bearer call, no body): an expired
    one is refused and the refresh token would stay alive. Offboarding refreshes it first
    and revokes the new one; a live one is revoked as it is, with no refresh."""
    import time

    p = dialect("dropbox", fake.base)
    settings = parse_settings({
        "identity": {"issuer": "i", "audience": "a", "hs256_secret_env": "X",
                     "algorithms": ["HS256"]},
        "providers": [p.model_dump(exclude_none=True)]})
    fake.script("/token", Answer.json(access_token="at-new", expires_in=14400))
    fake.script("/revoke", Answer(200, b"null"))
    vault = LocalVault.open(tmp_path / "v.db", KEY, clock=clock)
    out = io.StringIO()
    audit = AuditLog(StdoutSink(out), instance="t/1", fingerprint_key=KEY, clock=clock)
    off = Offboarder(live_config(settings=settings, secrets={p.id: Secret("s")}), vault,
                     MemoryCoordinator(clock), audit, settle=0)
    expires_at = time.time() + (-60 if expired else 3600)
    try:
        await vault.put(Grant("bob", p.id, TokenSet(Secret("at-old"), Secret("rt-1"),
                                                    expires_at=expires_at)))
        (result,) = await off.revoke("bob", p.id)
    finally:
        await off.aclose()
        await vault.close()
    assert result.ok and result.upstream == "revoked", result
    assert len(fake.requests("/token")) == (1 if expired else 0)
    if expired:
        assert fake.requests("/token")[0].form["refresh_token"] == "rt-1"
    (revoke,) = fake.requests("/revoke")
    want = "at-new" if expired else "at-old"
    assert revoke.headers["authorization"] == f"Bearer {want}" and revoke.body == b""



@pytest.mark.parametrize(("authed_user", "stored"), [
    pytest.param({"id": "U1", "access_token": "xoxp-user", "token_type": "user",
                  "refresh_token": "xoxe-1-user", "expires_in": 43200}, "xoxp-user",
                 id="user-token-stored"),
    pytest.param({"id": "U1"}, None, id="bot-token-only-refused"),
])
async def test_connecting_stores_the_users_token_never_the_bot_token(
        fake: FakeOAuth, tmp_path: Path, clock: Clock, authed_user: dict[str, Any],
        stored: str | None) -> None:
    """Fault 8 through the connect flow: Slack's top-level token is the app's bot token,
    shared by every user. With the user's own token under authed_user, that one is
    stored; without it the connect is refused (no_user_token) and nothing is stored."""
    from urllib.parse import parse_qs, urlsplit

    from proxy.connect import Connector, ConnectRejected

    settings = parse_settings({
        "identity": {"issuer": "i", "audience": "a", "hs256_secret_env": "X",
                     "algorithms": ["HS256"]},
        "providers": [dialect("slack", fake.base).model_dump(exclude_none=True)]})
    fake.script("/token", Answer.json(ok=True, access_token="xoxb-bot", token_type="bot",
                                      authed_user=authed_user))
    vault = LocalVault.open(tmp_path / "v.db", KEY, clock=clock)
    out = io.StringIO()
    audit = AuditLog(StdoutSink(out), instance="t/1", fingerprint_key=KEY, clock=clock)
    connector = Connector(live_config(settings=settings, secrets={"slack": Secret("s3cret")}),
                          vault, MemoryCoordinator(clock), audit, state_key=KEY, clock=clock)
    try:
        url = await connector.begin("alice", "slack", redirect_uri="http://127.0.0.1:9/cb")
        query = parse_qs(urlsplit(url).query)
        assert query["user_scope"] == ["read,write"] and "scope" not in query
        state = query["state"][0]
        if stored is None:
            with pytest.raises(ConnectRejected) as exc:
                await connector.complete({"state": state, "code": "c-1"})
            assert exc.value.reason == "no_user_token"
            assert await vault.list() == []
        else:
            await connector.complete({"state": state, "code": "c-1"})
            grant = await vault.get("alice", "slack")
            assert grant is not None and grant.tokens.access_token == Secret(stored)
            assert grant.tokens.refresh_token == Secret("xoxe-1-user")
    finally:
        await connector.aclose()
        await vault.close()
    record = json.loads(out.getvalue().splitlines()[-1])
    assert record["outcome"] == ("rejected" if stored is None else "connected")
    assert "xoxb-bot" not in out.getvalue()
