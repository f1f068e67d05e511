"""The one provider client (proxy.provider_client) against a scripted OAuth endpoint on a
real socket: what each dialect puts on the wire (authorize URL, token requests,
revocation calls: issue 13 faults 6 and 7) and what the caller gets back for each
answer (fault 1: reauth, operator error, transient, failed; fault 5: a malformed expiry
keeps the rotated refresh token). Nothing is mocked: the client speaks HTTP, the fake
records what arrived."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from proxy.errors import ProviderMisconfigured, TokenRefreshFailed
from proxy.provider_client import InvalidGrant, ProviderClient, TokenRequestFailed
from proxy.secret import Secret
from proxy.settings import ProviderSettings, RefreshSettings
from proxy.tokenset import TokenSet
from tests.proxy.conftest import live_config
from tests.proxy.dialects import dialect
from tests.proxy.oauthfake import Answer, FakeOAuth, serve

NOW = 1_800_000_000.0
SECRET = Secret("s3cret")
BASIC = "Basic " + base64.b64encode(b"client-1:s3cret").decode()
GRANT = TokenSet(Secret("at-1"), Secret("rt-1"))


@pytest.fixture
async def fake() -> AsyncIterator[FakeOAuth]:
    async for f in serve():
        yield f


@pytest.fixture
async def client() -> AsyncIterator[ProviderClient]:
    c = ProviderClient(live_config(refresh=RefreshSettings(attempts=3, backoff=0, timeout=5)),
                       clock=lambda: NOW)
    yield c
    await c.aclose()


def at(fake: FakeOAuth, name: str, **extra: Any) -> ProviderSettings:
    return dialect(name, fake.base, **extra)


def tokens(**extra: Any) -> Answer:
    return Answer.json(access_token="at-2", token_type="Bearer", refresh_token="rt-2",
                       **extra)


# -- fault 7: request parameters ------------------------------------------------------------
@pytest.mark.parametrize(("name", "expected"), [
    pytest.param("textbook", {"scope": "read write"}, id="textbook"),
    pytest.param("google", {"scope": "read write", "access_type": "offline",
                            "prompt": "consent"}, id="google-offline"),
    pytest.param("dropbox", {"scope": "read write", "token_access_type": "offline"},
                 id="dropbox-offline"),
    pytest.param("atlassian", {"scope": "read write", "audience": "api.atlassian.com",
                               "prompt": "consent"}, id="atlassian-audience"),
    pytest.param("slack", {"user_scope": "read,write"}, id="slack-user-scope-commas"),
    pytest.param("zoom", {"scope": "read,write"}, id="zoom-commas"),
])
def test_authorize_url_carries_the_dialects_parameters(client: ProviderClient, name: str,
                                                       expected: dict[str, str]) -> None:
    url = client.authorization_url(dialect(name), redirect_uri="http://127.0.0.1:9/cb",
                                   scopes=["read", "write"], state="st", code_verifier="v" * 43)
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert url.startswith("https://login.example.com/authorize?")
    for key, value in expected.items():
        assert query[key] == value, key
    assert (query["response_type"], query["client_id"], query["state"]) == (
        "code", "client-1", "st")
    assert query["code_challenge_method"] == "S256" and query["code_challenge"]
    if "user_scope" in expected:
        assert "scope" not in query  # Slack: user scopes only, never bot scopes


async def test_refresh_sends_token_and_refresh_params(fake: FakeOAuth,
                                                      client: ProviderClient) -> None:
    """Shopify's expiring=1 goes on every token request; refresh_params on refreshes."""
    fake.script("/token", tokens(expires_in=3600))
    p = at(fake, "shopify", refresh_params={"resource": "https://api.example"})
    got = await client.refresh(p, SECRET, Secret("rt-1"))
    assert got.access_token == Secret("at-2") and got.refresh_token == Secret("rt-2")
    (seen,) = fake.requests("/token")
    assert seen.form == {"grant_type": "refresh_token", "refresh_token": "rt-1",
                         "expiring": "1", "resource": "https://api.example"}
    assert seen.headers["authorization"] == BASIC  # client_secret_basic (RFC 6749 2.3.1)


async def test_code_exchange_sends_token_params_but_not_refresh_params(
        fake: FakeOAuth, client: ProviderClient) -> None:
    fake.script("/token", tokens(expires_in=60))
    p = at(fake, "shopify", refresh_params={"resource": "x"})
    got = (await client.exchange_code(p, SECRET, code="c-1", code_verifier="v" * 43,
                                      redirect_uri="http://127.0.0.1:9/cb")).tokens
    assert got.expires_at == NOW + 60 and got.issued_at == NOW
    (seen,) = fake.requests("/token")
    assert seen.form == {"grant_type": "authorization_code", "code": "c-1",
                         "code_verifier": "v" * 43, "redirect_uri": "http://127.0.0.1:9/cb",
                         "expiring": "1"}


async def test_code_exchange_with_only_a_bot_token_is_refused(fake: FakeOAuth,
                                                             client: ProviderClient) -> None:
    """Fault 8: never store the app's shared bot token as a user's credential."""
    fake.script("/token", Answer.json(ok=True, access_token="xoxb-bot", token_type="bot",
                                      authed_user={"id": "U1"}))
    with pytest.raises(TokenRequestFailed) as exc:
        await client.exchange_code(at(fake, "slack"), SECRET, code="c", code_verifier="v" * 43,
                                   redirect_uri="http://127.0.0.1:9/cb")
    assert exc.value.answer is not None and exc.value.answer.reason == "no_user_token"
    assert "xoxb-bot" not in exc.value.detail


# -- fault 1: what a refresh answer becomes ---------------------------------------------------
@pytest.mark.parametrize(("name", "answers", "raised", "reason", "calls"), [
    pytest.param("github", [Answer.json(200, error="bad_refresh_token")], InvalidGrant,
                 "bad_refresh_token", 1, id="github-200-dead-token"),
    pytest.param("slack", [Answer.json(200, ok=False, error="invalid_refresh_token")],
                 InvalidGrant, "invalid_refresh_token", 1, id="slack-ok-false"),
    pytest.param("hubspot", [Answer.json(400, status="BAD_REFRESH_TOKEN")], InvalidGrant,
                 "bad_refresh_token", 1, id="hubspot-status-field"),
    pytest.param("entra", [Answer.json(400, error="interaction_required")], InvalidGrant,
                 "interaction_required", 1, id="entra-mfa"),
    pytest.param("textbook", [Answer.json(401, error="invalid_client")],
                 ProviderMisconfigured, "invalid_client", 1, id="operator-invalid-client"),
    pytest.param("textbook", [Answer.json(400, error="invalid_request")], TokenRefreshFailed,
                 "token_endpoint_error", 1, id="unclassified-no-retry"),
    pytest.param("textbook", [Answer(503, b"down", "text/plain")], TokenRefreshFailed,
                 "token_endpoint_unavailable", 3, id="503-retried-then-502"),
    pytest.param("textbook", [Answer.json(400, error="slow_down")], TokenRefreshFailed,
                 "token_endpoint_unavailable", 3, id="transient-code-retried"),
    pytest.param("textbook", [Answer(503, b""), tokens(expires_in=60)], None, None, 2,
                 id="503-then-success"),
])
async def test_refresh_outcomes(fake: FakeOAuth, client: ProviderClient, name: str,
                                answers: list[Answer], raised: type[Exception] | None,
                                reason: str | None, calls: int) -> None:
    fake.script("/token", *answers)
    if raised is None:
        got = await client.refresh(at(fake, name), SECRET, Secret("rt-1"))
        assert got.access_token == Secret("at-2")
    else:
        with pytest.raises(raised) as exc:
            await client.refresh(at(fake, name), SECRET, Secret("rt-1"))
        assert exc.value.reason == reason  # type: ignore[attr-defined]
    assert len(fake.requests("/token")) == calls == client.calls


async def test_an_operator_error_names_the_configuration(fake: FakeOAuth,
                                                        client: ProviderClient) -> None:
    fake.script("/token", Answer.json(401, error="invalid_client"))
    with pytest.raises(ProviderMisconfigured) as exc:
        await client.refresh(at(fake, "textbook"), SECRET, Secret("rt-1"))
    assert (exc.value.status, exc.value.slug) == (502, "provider-misconfigured")
    assert "providers[textbook].client_id" in exc.value.detail
    assert "grant is unaffected" in exc.value.detail and "s3cret" not in exc.value.detail


async def test_an_unclassified_error_is_not_asked_again_at_once(fake: FakeOAuth,
                                                               client: ProviderClient) -> None:
    """Never a loop: the same dead-looking refresh token gets the remembered answer (with
    Retry-After) instead of one token-endpoint call per agent request; another refresh
    token is still asked."""
    fake.script("/token", Answer.json(400, error="invalid_request"))
    p = at(fake, "textbook")
    with pytest.raises(TokenRefreshFailed):
        await client.refresh(p, SECRET, Secret("rt-1"))
    with pytest.raises(TokenRefreshFailed) as again:
        await client.refresh(p, SECRET, Secret("rt-1"))
    assert len(fake.requests("/token")) == 1
    assert again.value.reason == "token_endpoint_error"
    assert 1 <= int(again.value.headers()["Retry-After"]) <= 30
    with pytest.raises(TokenRefreshFailed):
        await client.refresh(p, SECRET, Secret("rt-other"))
    assert len(fake.requests("/token")) == 2


async def test_an_operator_error_holds_the_client_until_its_secret_changes(
        fake: FakeOAuth, client: ProviderClient) -> None:
    fake.script("/token", Answer.json(401, error="invalid_client"), tokens(expires_in=60))
    p = at(fake, "textbook")
    with pytest.raises(ProviderMisconfigured):
        await client.refresh(p, SECRET, Secret("rt-1"))
    with pytest.raises(ProviderMisconfigured):  # any user's refresh: the client is wrong
        await client.refresh(p, SECRET, Secret("rt-2"))
    assert len(fake.requests("/token")) == 1
    fixed = await client.refresh(p, Secret("the-right-secret"), Secret("rt-2"))
    assert fixed.access_token == Secret("at-2") and len(fake.requests("/token")) == 2


async def test_a_malformed_expiry_keeps_the_rotated_refresh_token(
        fake: FakeOAuth, client: ProviderClient, caplog: pytest.LogCaptureFixture) -> None:
    """Fault 5: expires_in "3600abc" in a 200 with a rotated refresh token."""
    fake.script("/token", tokens(expires_in="3600abc"))
    with caplog.at_level(logging.WARNING, "credproxy.provider"):
        got = await client.refresh(at(fake, "textbook"), SECRET, Secret("rt-1"))
    assert got.refresh_token == Secret("rt-2") and got.expires_at is None
    assert "expires_in '3600abc' is not a usable expiry: unknown" in caplog.text
    assert "rt-2" not in caplog.text


# -- fault 6: revocation styles ----------------------------------------------------------------
async def test_rfc7009_revokes_refresh_then_access_token(fake: FakeOAuth,
                                                         client: ProviderClient) -> None:
    fake.script("/revoke", Answer(200, b""))
    got = await client.revoke(at(fake, "textbook"), SECRET, GRANT)
    assert (got.upstream, got.detail) == ("revoked",
                                          "refresh and access tokens revoked (RFC 7009)")
    first, second = fake.requests("/revoke")
    assert first.form == {"token": "rt-1", "token_type_hint": "refresh_token"}
    assert second.form == {"token": "at-1", "token_type_hint": "access_token"}
    assert first.headers["authorization"] == BASIC


async def test_google_already_dead_access_token_counts_as_revoked(
        fake: FakeOAuth, client: ProviderClient) -> None:
    """Revoking the refresh token killed the access token: its 400 invalid_token is the
    success it looks like, not "pending" (exit 1)."""
    fake.script("/revoke", Answer(200, b""), Answer.json(400, error="invalid_token"))
    got = await client.revoke(at(fake, "google"), SECRET, GRANT)
    assert got.upstream == "revoked"


@pytest.mark.parametrize(("name", "sent"), [
    pytest.param("xero", [("rt-1", "refresh_token")], id="refresh-token-only"),
    pytest.param("zoom", [("at-1", "access_token")], id="access-token-only"),
    pytest.param("textbook", [("rt-1", "refresh_token"), ("at-1", "access_token")],
                 id="both-by-default"),
])
async def test_which_tokens_are_revoked(fake: FakeOAuth, client: ProviderClient, name: str,
                                        sent: list[tuple[str, str]]) -> None:
    fake.script("/revoke", Answer(200, b""))
    assert (await client.revoke(at(fake, name), SECRET, GRANT)).upstream == "revoked"
    assert [(s.form["token"], s.form["token_type_hint"])
            for s in fake.requests("/revoke")] == sent
    fake.seen.clear()
    no_refresh = TokenSet(Secret("at-1"))  # a grant without a refresh token
    assert (await client.revoke(at(fake, name), SECRET, no_refresh)).upstream == "revoked"
    assert [s.form["token"] for s in fake.requests("/revoke")] == ["at-1"]


@pytest.mark.parametrize(("name", "answer", "method", "check"), [
    pytest.param("quickbooks", Answer(200, b""), "POST",
                 lambda s: s.json == {"token": "rt-1"} and s.headers["authorization"] == BASIC
                 and s.headers["content-type"].startswith("application/json"),
                 id="json-intuit"),
    pytest.param("dropbox", Answer(200, b"null"), "POST",
                 lambda s: s.headers["authorization"] == "Bearer at-1" and s.body == b"",
                 id="bearer-dropbox"),
    pytest.param("slack", Answer.json(ok=True, revoked=True), "POST",
                 lambda s: s.form == {"token": "at-1"}, id="slack-auth-revoke"),
])
async def test_revocation_styles_on_the_wire(fake: FakeOAuth, client: ProviderClient,
                                            name: str, answer: Answer, method: str,
                                            check: Any) -> None:
    fake.script("/revoke", answer)
    got = await client.revoke(at(fake, name), SECRET, GRANT)
    assert got.upstream == "revoked", got.detail
    seen = fake.requests("/revoke")
    assert seen and all(s.method == method for s in seen)
    assert check(seen[0])
    if name in ("dropbox", "slack"):
        assert len(seen) == 1  # one call with the access token ends the grant


async def test_github_grant_is_a_delete_naming_the_client(fake: FakeOAuth,
                                                          client: ProviderClient) -> None:
    fake.script("/applications/client-1/grant", Answer(204, b"", None))
    p = at(fake, "github", revocation_url=f"{fake.base}/applications/client-1/grant")
    got = await client.revoke(p, SECRET, GRANT)
    assert got.upstream == "revoked"
    (seen,) = fake.requests("/applications/client-1/grant")
    assert (seen.method, seen.json) == ("DELETE", {"access_token": "at-1"})
    assert seen.headers["authorization"] == BASIC


async def test_slack_ok_false_is_not_revoked(fake: FakeOAuth, client: ProviderClient) -> None:
    """auth.revoke answered 200 {"ok": false} was counted as revoked (exit 0 while the
    token still worked)."""
    fake.script("/revoke", Answer.json(ok=False, error="invalid_arg_name"))
    got = await client.revoke(at(fake, "slack"), SECRET, GRANT)
    assert got.upstream == "pending" and "ok: false" in got.detail


async def test_no_revocation_makes_no_call_and_says_where_to_revoke(
        fake: FakeOAuth, client: ProviderClient) -> None:
    got = await client.revoke(at(fake, "entra"), SECRET, GRANT)
    assert (got.upstream, got.detail) == ("none",
                                          "no upstream revocation exists for this provider")
    assert got.console_url == "https://entra.microsoft.com/#view/enterprise-apps"
    assert fake.seen == []


async def test_a_failing_revocation_endpoint_is_pending_after_the_retries(
        fake: FakeOAuth, client: ProviderClient) -> None:
    fake.script("/revoke", Answer(503, b""))
    got = await client.revoke(at(fake, "textbook"), SECRET, GRANT)
    assert got.upstream == "pending"
    assert "refresh_token revocation failed after 3 attempts (HTTP 503)" in got.detail
    assert "access_token revocation failed" in got.detail  # each token on its own
    assert len(fake.requests("/revoke")) == 6


async def test_a_provider_echoing_a_secret_never_gets_it_into_the_problem(
        fake: FakeOAuth, client: ProviderClient) -> None:
    """Details reach the agent and the log: whatever the provider's error description
    echoes of the refresh token or the client secret is redacted."""
    fake.script("/token", Answer.json(400, error="invalid_grant",
                                      error_description="rt-1 is unknown (client s3cret)"))
    with pytest.raises(InvalidGrant) as exc:
        await client.refresh(at(fake, "textbook"), SECRET, Secret("rt-1"))
    assert "rt-1" not in exc.value.detail and "s3cret" not in exc.value.detail
    assert "<redacted> is unknown" in exc.value.detail
