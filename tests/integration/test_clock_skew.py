"""An upstream 401 on a token the proxy believed valid: one forced refresh before the grant
is declared dead (issue 19, item 6), through a real `credproxy run`, a real authorization
server and a real document API whose clock runs two minutes ahead of the proxy's.

The grant is imported with the provider's absolute expiry (``expires_at`` on the provider's
clock, as some providers send it, or as a record written by a host whose clock agrees with
the provider's): the provider has expired the access token while the proxy, two minutes
behind, believes it has two minutes left (beyond ``refresh_skew``, so it does not refresh).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any

import httpx2
import pytest

from devstack.stack import Stack, build_stack

pytestmark = pytest.mark.integration

SKEW = 120  # the provider's clock minus the proxy's, seconds


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = build_stack(tmp_path_factory.mktemp("skewed"), clock_offset=SKEW)
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _reset_faults(skewed: Stack) -> Iterator[None]:
    yield
    with skewed.admin() as c:
        c.post("/_admin/faults", json={"token_status": None, "token_delay": 0})


def _expired_at_the_provider(s: Stack, user: str, *, refresh_token: bool = True) -> str:
    """Import a grant whose access token the provider has just expired (by its clock) and
    the proxy believes valid for SKEW more seconds; returns the access token."""
    grant = s.grant(user, expires_in=0, absolute_expiry=True)
    if not refresh_token:
        grant.pop("refresh_token")
    s.vault_put(user, grant)
    return str(grant["access_token"])


def _metric(s: Stack, name: str, **labels: str) -> float | None:
    text = httpx2.get(f"http://{s.config['admin']}/metrics", trust_env=False).text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _audit_for(s: Stack, user: str) -> list[dict[str, Any]]:
    return [r for r in s.audit_records() if r.get("user") == user]


def _refreshes(s: Stack, user: str) -> int:
    return int(s.stats()["refresh_by_user"].get(user, 0))


def test_skewed_provider_expiry_refreshes_once_and_the_retry_succeeds(skewed: Stack) -> None:
    s = skewed
    user = "alice"
    rejected = _expired_at_the_provider(s, user)
    with s.client(context=s.context(user)) as c:
        r = c.get(f"{s.docs_url}/documents")
        # Retryable, not reauth: the grant lives and the proxy did not replay the request.
        assert r.status_code == 503
        assert r.headers["X-Credproxy-Error"] == "credential-store-unavailable"
        assert r.json()["reason"] == "token_refreshed"
        assert r.headers["Retry-After"] in ("0", "1")
        assert "retry" in r.json()["detail"]
        assert rejected not in r.text
        stored = s.vault_get(user)
        assert stored.status == "active"
        assert stored.tokens.access_token.reveal() != rejected
        assert _refreshes(s, user) == 1
        # The agent's retry carries the new token and succeeds.
        retry = c.get(f"{s.docs_url}/documents")
        assert retry.status_code == 200 and retry.json()["user"] == user
    assert _refreshes(s, user) == 1
    events = [(r["event"], r.get("reason")) for r in _audit_for(s, user)]
    assert events == [("credential.injected", None), ("credential.refreshed", None),
                      ("credential.denied", "token_refreshed"), ("credential.injected", None)]
    # The skew is visible to operators (the Date header has a 1 s resolution).
    skew = _metric(s, "credproxy_provider_clock_skew_seconds", provider="docs")
    assert skew is not None and SKEW - 5 < skew < SKEW + 5
    assert _metric(s, "credproxy_forced_refreshes_total", provider="docs",
                   result="refreshed") == 1
    assert (_metric(s, "credproxy_upstream_responses_total", provider="docs",
                    code_class="4xx") or 0) >= 1
    assert rejected not in s.proxy.logs()  # type: ignore[union-attr]


def test_a_token_of_unknown_expiry_that_ran_out_is_refreshed_once(skewed: Stack) -> None:
    """The same rule serves a token response without ``expires_in``: the proxy cannot know
    when it runs out, so the provider's 401 is the signal."""
    s = skewed
    user = "bob"
    grant = s.grant(user, expires_in=0)  # already expired at the provider
    del grant["expires_in"]
    s.vault_put(user, grant)
    assert s.vault_get(user).tokens.expires_at is None
    with s.client(context=s.context(user)) as c:
        r = c.get(f"{s.docs_url}/documents")
        assert r.status_code == 503 and r.json()["reason"] == "token_refreshed"
        retry = c.get(f"{s.docs_url}/documents")
        assert retry.status_code == 200 and retry.json()["user"] == user
    assert _refreshes(s, user) == 1
    assert s.vault_get(user).status == "active"


@pytest.mark.parametrize(("case", "status", "problem", "reason", "grant_status", "refreshes"), [
    pytest.param("invalid_grant", 401, "reauth-required", "revoked_upstream",
                 "reauth_required", 1, id="refresh-refused-invalid_grant"),
    pytest.param("no_refresh_token", 401, "reauth-required", "revoked_upstream",
                 "reauth_required", 0, id="no-refresh-token"),
    pytest.param("token_endpoint_down", 502, "token-refresh-failed",
                 "token_endpoint_unavailable", "active", 3, id="token-endpoint-down"),
])
def test_when_the_forced_refresh_cannot_save_the_grant(
        skewed: Stack, case: str, status: int, problem: str, reason: str,
        grant_status: str, refreshes: int) -> None:
    s = skewed
    user = f"skew-{case}"
    rejected = _expired_at_the_provider(s, user, refresh_token=case != "no_refresh_token")
    with s.admin() as a:
        if case == "invalid_grant":
            a.post("/_admin/faults", json={"token_status": 400, "token_error": "invalid_grant",
                                           "token_count": 1})
        elif case == "token_endpoint_down":
            a.post("/_admin/faults", json={"token_status": 503, "token_count": -1})
    with s.client(context=s.context(user)) as c:
        r = c.get(f"{s.docs_url}/documents")
    assert r.status_code == status
    assert r.headers["X-Credproxy-Error"] == problem
    assert r.json()["reason"] == reason
    assert rejected not in r.text
    stored = s.vault_get(user)
    assert stored.status == grant_status
    if grant_status == "reauth_required":
        assert stored.reason == "revoked_upstream"
        assert r.json()["connect_url"].endswith("/connect/docs")
    assert _refreshes(s, user) == refreshes  # token-endpoint calls (3 = refresh.attempts)
    denied = [r for r in _audit_for(s, user) if r["outcome"] == "denied"]
    assert [(d["reason"], d["upstream_status"]) for d in denied] == [(reason, 401)]


def test_a_provider_that_rejects_every_token_gets_one_forced_refresh(skewed: Stack,
                                                                      marker: str) -> None:
    """``/status/401`` rejects whatever token it gets, fresh ones included: the first 401
    forces a refresh (retryable answer), the retry's 401 is final (re-auth), and later
    requests are refused without reaching the provider: no refresh loop."""
    s = skewed
    user = f"always-401-{marker}"
    s.vault_put(user, s.grant(user))  # fresh by both clocks
    with s.client(context=s.context(user)) as c:
        first = c.get(f"{s.docs_url}/status/401")
        assert first.status_code == 503 and first.json()["reason"] == "token_refreshed"
        second = c.get(f"{s.docs_url}/status/401")
        assert second.status_code == 401
        assert second.json()["reason"] == "revoked_upstream"
        third = c.get(f"{s.docs_url}/echo/{marker}")
        assert third.status_code == 401 and third.json()["reason"] == "revoked_upstream"
    assert _refreshes(s, user) == 1
    assert s.vault_get(user).status == "reauth_required"
    assert not s.docs_saw(marker)


def test_the_providers_date_header_runs_ahead(skewed: Stack) -> None:
    """The premise of this module: the provider's clock (its Date header) is SKEW ahead."""
    with httpx2.Client(verify=skewed.admin_tls(), trust_env=False) as c:
        r = c.get(f"{skewed.docs_url}/healthz")
    ahead = parsedate_to_datetime(r.headers["Date"]).timestamp() - time.time()
    assert SKEW - 5 < ahead < SKEW + 5
