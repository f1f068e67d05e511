"""The authorization server, driven over real HTTPS as a separate process."""

from __future__ import annotations

import asyncio
import time

import httpx2
import pytest

from ._helpers import (
    REDIRECT_URI,
    authorize,
    code_flow,
    grant,
    introspect,
    pkce_pair,
    redirect_params,
    refresh,
)
from ._stack import DevStack

pytestmark = pytest.mark.integration


def test_code_pkce_round_trip(stack: DevStack, http: httpx2.Client) -> None:
    tok = code_flow(http, stack, "alice")
    assert tok["access_token"].startswith("at_")
    assert tok["refresh_token"].startswith("rt_")
    assert tok["token_type"] == "Bearer"
    assert tok["expires_in"] == 3600
    assert tok["scope"] == stack.scope

    info = introspect(http, stack, tok["access_token"])
    assert info["active"] is True
    assert info["sub"] == "alice"
    assert info["client_id"] == stack.client_id
    assert info["scope"] == stack.scope
    assert info["token_type"] == "Bearer"
    assert info["exp"] > time.time() + 3000


def test_authorize_redirects_state_and_token_is_no_store(
    stack: DevStack, http: httpx2.Client
) -> None:
    verifier, challenge = pkce_pair()
    params = redirect_params(
        authorize(http, stack, login_hint="bob", code_challenge=challenge,
                  code_challenge_method="S256")
    )
    assert params["state"] == "st-123"
    r = http.post(
        f"{stack.auth.url}/token",
        data={"grant_type": "authorization_code", "code": params["code"],
              "redirect_uri": REDIRECT_URI, "code_verifier": verifier},
        auth=(stack.client_id, stack.client_secret),
    )
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ({}, "invalid_request"),  # no code_challenge: PKCE is mandatory
        ({"code_challenge": "x" * 43, "code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": "x" * 43}, "invalid_request"),  # method defaults to plain
        ({"code_challenge": "x" * 43, "code_challenge_method": "S256", "deny": "1"},
         "access_denied"),
        ({"code_challenge": "x" * 43, "code_challenge_method": "S256",
          "scope": "admin.everything"}, "invalid_scope"),
    ],
)
def test_authorize_errors_redirect(
    stack: DevStack, http: httpx2.Client, extra: dict[str, str], error: str
) -> None:
    params = redirect_params(authorize(http, stack, login_hint="alice", **extra))
    assert params["error"] == error
    assert params["state"] == "st-123"
    assert "code" not in params


def test_authorize_bad_redirect_uri_is_not_redirected(
    stack: DevStack, http: httpx2.Client
) -> None:
    _, challenge = pkce_pair()
    r = authorize(http, stack, login_hint="alice", code_challenge=challenge,
                  code_challenge_method="S256", redirect_uri="https://evil.example/cb")
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_request"
    r = authorize(http, stack, client_id="nope", code_challenge=challenge,
                  code_challenge_method="S256")
    assert r.status_code == 400


def test_token_errors(stack: DevStack, http: httpx2.Client) -> None:
    verifier, challenge = pkce_pair()
    params = redirect_params(
        authorize(http, stack, login_hint="alice", code_challenge=challenge,
                  code_challenge_method="S256")
    )
    url = f"{stack.auth.url}/token"
    form = {"grant_type": "authorization_code", "code": params["code"],
            "redirect_uri": REDIRECT_URI}
    creds = (stack.client_id, stack.client_secret)

    r = http.post(url, data={**form, "code_verifier": "w" * 43}, auth=creds)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
    r = http.post(url, data=form, auth=creds)  # verifier missing
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
    r = http.post(url, data={**form, "code_verifier": verifier}, auth=(stack.client_id, "bad"))
    assert (r.status_code, r.json()["error"]) == (401, "invalid_client")
    assert r.headers["cache-control"] == "no-store"

    # Redeemed once; the second redemption fails and revokes what the first one issued.
    r = http.post(url, data={**form, "code_verifier": verifier}, auth=creds)
    assert r.status_code == 200
    first = r.json()
    r = http.post(url, data={**form, "code_verifier": verifier}, auth=creds)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_grant")
    assert introspect(http, stack, first["access_token"])["active"] is False


def test_refresh_rotates(stack: DevStack, http: httpx2.Client) -> None:
    tok = code_flow(http, stack, "alice")
    r = refresh(http, stack, tok["refresh_token"])
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["refresh_token"].startswith("rt_")
    assert new["refresh_token"] != tok["refresh_token"]
    assert new["access_token"] != tok["access_token"]
    assert introspect(http, stack, new["access_token"])["sub"] == "alice"
    # The rotated-away refresh token is dead; the new one works.
    assert introspect(http, stack, tok["refresh_token"])["active"] is False
    assert refresh(http, stack, new["refresh_token"]).status_code == 200


def test_refresh_token_reuse_revokes_family(stack: DevStack, http: httpx2.Client) -> None:
    first = grant(stack, "alice")
    second = refresh(http, stack, first["refresh_token"]).json()
    third = refresh(http, stack, second["refresh_token"]).json()
    unrelated = grant(stack, "alice")

    r = refresh(http, stack, first["refresh_token"])  # replay of a rotated token
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"

    for t in (second["access_token"], third["access_token"], third["refresh_token"]):
        assert introspect(http, stack, t)["active"] is False
    assert refresh(http, stack, third["refresh_token"]).json()["error"] == "invalid_grant"
    # Only that authorization's family is gone.
    assert introspect(http, stack, unrelated["access_token"])["active"] is True


async def test_concurrent_refresh_one_winner(stack: DevStack) -> None:
    """Two parties presenting one refresh token at once: one wins, then the loser's replay
    revokes the family. This is the behaviour a proxy must avoid with single-flight."""
    tok = grant(stack, "carol")
    async with httpx2.AsyncClient(verify=stack.ssl_context(), timeout=15.0) as c:
        rs = await asyncio.gather(*[
            c.post(f"{stack.auth.url}/token",
                   data={"grant_type": "refresh_token", "refresh_token": tok["refresh_token"]},
                   auth=(stack.client_id, stack.client_secret))
            for _ in range(8)
        ])
    assert sorted(r.status_code for r in rs) == [200] + [400] * 7
    winner = next(r.json() for r in rs if r.status_code == 200)
    with httpx2.Client(verify=stack.ssl_context()) as http:
        assert introspect(http, stack, winner["access_token"])["active"] is False


def test_revoke_endpoint(stack: DevStack, http: httpx2.Client) -> None:
    url = f"{stack.auth.url}/revoke"
    creds = (stack.client_id, stack.client_secret)
    a = grant(stack, "alice")
    # Access token only: the refresh token survives.
    assert http.post(url, data={"token": a["access_token"], "token_type_hint": "access_token"},
                     auth=creds).status_code == 200
    assert introspect(http, stack, a["access_token"])["active"] is False
    b = refresh(http, stack, a["refresh_token"]).json()
    # Refresh token (with a wrong hint): takes its access tokens with it.
    assert http.post(url, data={"token": b["refresh_token"], "token_type_hint": "access_token"},
                     auth=creds).status_code == 200
    assert introspect(http, stack, b["access_token"])["active"] is False
    assert refresh(http, stack, b["refresh_token"]).json()["error"] == "invalid_grant"
    # Unknown tokens answer 200 (RFC 7009 section 2.2); a bad client does not.
    assert http.post(url, data={"token": "nope"}, auth=creds).status_code == 200
    assert http.post(url, data={"token": "nope"}, auth=(stack.client_id, "x")).status_code == 401


def test_introspection_requires_resource_server(stack: DevStack, http: httpx2.Client) -> None:
    tok = grant(stack, "alice")
    r = http.post(f"{stack.auth.url}/introspect", data={"token": tok["access_token"]},
                  auth=(stack.client_id, stack.client_secret))
    assert r.json() == {"active": False}
    r = http.post(f"{stack.auth.url}/introspect", data={"token": tok["access_token"]})
    assert r.status_code == 401


def test_admin_grant_expired_and_revoke(stack: DevStack, http: httpx2.Client) -> None:
    expired = grant(stack, "bob", access_expires_in=0)
    assert expired["expires_in"] == 0
    assert introspect(http, stack, expired["access_token"])["active"] is False
    # ...but it can still be refreshed, to a default-lifetime token.
    fresh = refresh(http, stack, expired["refresh_token"]).json()
    assert fresh["expires_in"] == 3600

    t1, t2 = grant(stack, "dave"), grant(stack, "dave")
    assert stack.admin("POST", "/_admin/revoke", {"user": "dave"}) == {"revoked": 2}
    for t in (t1, t2):
        assert introspect(http, stack, t["access_token"])["active"] is False
        assert refresh(http, stack, t["refresh_token"]).json()["error"] == "invalid_grant"

    t3 = grant(stack, "erin")
    assert stack.admin("POST", "/_admin/revoke", {"access_token": t3["access_token"]}) == {
        "revoked": 1
    }
    assert introspect(http, stack, t3["access_token"])["active"] is False
    assert refresh(http, stack, t3["refresh_token"]).status_code == 200

    issued = stack.admin("GET", "/_admin/issued")
    assert t3["access_token"] in issued["access_tokens"]
    assert t3["refresh_token"] in issued["refresh_tokens"]


def test_faults_and_stats(clean: DevStack, http: httpx2.Client) -> None:
    stack = clean
    tok = grant(stack, "frank")
    state = stack.admin("POST", "/_admin/faults", {"token_status": 503, "token_count": 2})
    assert state["token_status"] == 503 and state["token_count"] == 2
    for _ in range(2):
        r = refresh(http, stack, tok["refresh_token"])
        assert r.status_code == 503
        assert r.json() == {"error": "temporarily_unavailable"}
    r = refresh(http, stack, tok["refresh_token"])
    assert r.status_code == 200  # the faulted calls did not consume the refresh token
    code_flow(http, stack, "frank")

    stats = stack.admin("GET", "/_admin/stats")
    assert stats["token_calls"] == 4
    assert stats["refresh_calls"] == 3
    assert stats["refresh_by_user"] == {"frank": 3}
    assert stats["code_calls"] == 1

    stack.admin("POST", "/_admin/faults", {"token_delay": 0.3})
    t0 = time.monotonic()
    assert refresh(http, stack, r.json()["refresh_token"]).status_code == 200
    assert time.monotonic() - t0 >= 0.3

    stack.admin("POST", "/_admin/reset")
    assert stack.admin("GET", "/_admin/stats")["token_calls"] == 0
    t0 = time.monotonic()
    code_flow(http, stack, "frank")
    assert time.monotonic() - t0 < 0.3


def test_logs_carry_no_tokens(stack: DevStack, http: httpx2.Client) -> None:
    code_flow(http, stack, "alice")  # make sure codes and tokens passed through both servers
    issued = stack.admin("GET", "/_admin/issued")
    logs = stack.auth.logs() + stack.docapi.logs()
    assert issued["access_tokens"] and "listening on" in logs
    for t in issued["access_tokens"] + issued["refresh_tokens"]:
        assert t not in logs
    assert stack.client_secret not in logs
    assert stack.resource_client_secret not in logs
