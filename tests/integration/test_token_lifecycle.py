"""Token lifecycle through the real proxy and a real authorization server: refresh near
expiry (once, however many wait), rotation persisted first, invalid_grant and upstream 401 as
re-authorization, transient token-endpoint failures as 502 with the grant intact."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from devstack.stack import Stack, build_stack, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _reset_faults(stack: Stack) -> Iterator[None]:
    yield
    with stack.admin() as c:
        c.post("/_admin/faults", json={"token_status": None, "token_delay": 0})


def _auth(r: httpx2.Response) -> str:
    return {k.lower(): v for k, v in r.json()["headers"]}["authorization"]


def _records_for(stack: Stack, marker: str) -> list[dict[str, object]]:
    return [r for r in stack.audit_records()
            if isinstance(r.get("request"), dict) and marker in str(r["request"]["path"])]  # type: ignore[index]


def _refreshes(stack: Stack, user: str) -> int:
    return int(stack.stats()["refresh_by_user"].get(user, 0))


@pytest.mark.parametrize("expires_in", [0, 30], ids=["expired", "within-skew"])
def test_stale_token_is_refreshed_transparently(stack: Stack, marker: str,
                                                expires_in: int) -> None:
    user = f"refresh-{expires_in}-{marker}"
    original = stack.grant(user, expires_in=expires_in)
    stack.vault_put(user, original)
    with stack.client(context=stack.context(user)) as c:
        r = c.get(f"{stack.docs_url}/echo/{marker}")
    assert r.status_code == 200
    stored = stack.vault_get(user)
    assert _auth(r) == f"Bearer {stored.tokens.access_token.reveal()}"
    assert stored.tokens.access_token.reveal() != original["access_token"]
    # The authorization server rotates refresh tokens: the vault holds the new one.
    assert stored.tokens.refresh_token.reveal() != original["refresh_token"]
    assert _refreshes(stack, user) == 1
    events = [(r["event"], r["token"]["source"] if r["token"] else None)  # type: ignore[index]
              for r in _records_for(stack, marker)]
    assert events == [("credential.refreshed", "refresh"), ("credential.injected", "refresh")]


def test_many_waiters_cause_exactly_one_refresh(stack: Stack, marker: str) -> None:
    user = f"storm-{marker}"
    stack.vault_put(user, stack.grant(user, expires_in=0))
    ctx = stack.context(user)

    async def burst() -> list[httpx2.Response]:
        async with httpx2.AsyncClient(proxy=stack.proxy_url, verify=stack.mitm_tls(),
                                      trust_env=False, timeout=30,
                                      limits=httpx2.Limits(max_connections=100)) as c:
            return await asyncio.gather(*[
                c.get(f"{stack.docs_url}/echo/{marker}-{i}", headers={"X-User-Context": ctx})
                for i in range(60)])

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 60
    assert _refreshes(stack, user) == 1
    new = stack.vault_get(user).tokens.access_token.reveal()
    assert {_auth(r) for r in responses} == {f"Bearer {new}"}


def test_invalid_grant_means_reauth_and_marks_the_connection(stack: Stack, marker: str) -> None:
    user = f"invalid-grant-{marker}"
    grant = stack.grant(user, expires_in=0)
    stack.vault_put(user, grant)
    with stack.admin() as c:  # the provider revokes the grant (e.g. password change)
        c.post("/_admin/revoke", json={"refresh_token": grant["refresh_token"]})
    with stack.client(context=stack.context(user)) as c:
        r = c.get(f"{stack.docs_url}/echo/{marker}")
        assert r.status_code == 401
        body = r.json()
        assert r.headers["X-Credproxy-Error"] == "reauth-required"
        assert body["reason"] == "invalid_grant" and body["provider"] == "docs"
        assert body["connect_url"].endswith("/connect/docs")
        stored = stack.vault_get(user)
        assert stored.status == "reauth_required" and stored.reason == "invalid_grant"
        calls = stack.stats()["token_calls"]
        r2 = c.get(f"{stack.docs_url}/echo/{marker}-again")
        assert r2.status_code == 401 and r2.json()["reason"] == "invalid_grant"
        assert stack.stats()["token_calls"] == calls  # no second attempt at the provider
    assert not stack.docs_saw(marker)
    events = [r["event"] for r in _records_for(stack, marker)]
    assert events == ["reauth.required", "reauth.required"]


def test_token_endpoint_5xx_is_retried_then_502_and_grant_stays(stack: Stack,
                                                                 marker: str) -> None:
    user = f"t5xx-{marker}"
    stack.vault_put(user, stack.grant(user, expires_in=0))
    with stack.admin() as c:
        c.post("/_admin/faults", json={"token_status": 503, "token_count": 100})
    calls = stack.stats()["token_calls"]
    with stack.client(context=stack.context(user)) as c:
        r = c.get(f"{stack.docs_url}/echo/{marker}")
        assert r.status_code == 502
        assert r.headers["X-Credproxy-Error"] == "token-refresh-failed"
        assert stack.stats()["token_calls"] - calls == 3  # refresh.attempts
        assert stack.vault_get(user).status == "active"
        with stack.admin() as a:
            a.post("/_admin/faults", json={"token_status": None})
        r = c.get(f"{stack.docs_url}/echo/{marker}-after")
        assert r.status_code == 200
    assert not stack.docs_saw(f"/echo/{marker} ")


def test_upstream_401_becomes_reauth_revoked_upstream(stack: Stack, marker: str) -> None:
    user = "alice"
    grant = stack.grant(user)
    stack.vault_put(user, grant)
    with stack.client(context=stack.context(user)) as c:
        assert c.get(f"{stack.docs_url}/documents").status_code == 200
        # Revoked at the provider (the whole grant: access and refresh token); the proxy's
        # cache still has it. The 401 forces one refresh, which invalid_grant refuses.
        with stack.admin() as a:
            a.post("/_admin/revoke", json={"refresh_token": grant["refresh_token"]})
        r = c.get(f"{stack.docs_url}/documents")
        assert r.status_code == 401
        assert r.headers["X-Credproxy-Error"] == "reauth-required"
        assert r.json()["reason"] == "revoked_upstream"
        assert grant["access_token"] not in r.text
        stored = stack.vault_get(user)
        assert stored.status == "reauth_required" and stored.reason == "revoked_upstream"
        # Dropped from the cache: the next request is refused without reaching upstream.
        r = c.get(f"{stack.docs_url}/echo/{marker}")
        assert r.status_code == 401 and r.json()["reason"] == "revoked_upstream"
    assert not stack.docs_saw(marker)
    rec = [r for r in stack.audit_records() if r["event"] == "reauth.required"
           and r["upstream_status"] == 401 and r["user"] == user]
    assert rec and rec[-1]["reason"] == "revoked_upstream"


def test_user_without_connection_gets_reauth_no_connection(stack: Stack, marker: str) -> None:
    with stack.client(context=stack.context(f"nobody-{marker}")) as c:
        r = c.get(f"{stack.docs_url}/echo/{marker}")
    assert r.status_code == 401
    assert r.json()["reason"] == "no_connection"
    assert not stack.docs_saw(marker)


def test_context_providers_claim_limits_providers(stack: Stack, user: str, marker: str) -> None:
    with stack.client(context=stack.context(user, providers=["crm"])) as c:
        r = c.get(f"{stack.docs_url}/echo/{marker}")
    assert r.status_code == 403
    assert r.headers["X-Credproxy-Error"] == "provider-not-permitted"
    assert not stack.docs_saw(marker)


@pytest.fixture(scope="module")
def slow_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = build_stack(Path(tmp_path_factory.mktemp("slow")),
                    config={"refresh": {"attempts": 2, "backoff": 0.05, "timeout": 0.5}})
    yield s
    s.close()


def test_token_endpoint_timeout_is_502_and_grant_stays(slow_stack: Stack, marker: str) -> None:
    s = slow_stack
    user = f"timeout-{marker}"
    s.vault_put(user, s.grant(user, expires_in=0))
    with s.admin() as c:
        c.post("/_admin/faults", json={"token_delay": 2})
    try:
        with s.client(context=s.context(user)) as c:
            r = c.get(f"{s.docs_url}/echo/{marker}")
        assert r.status_code == 502
        assert r.json()["reason"] == "token_endpoint_unavailable"
        assert s.vault_get(user).status == "active"
    finally:
        with s.admin() as c:
            c.post("/_admin/faults", json={"token_delay": 0})


def test_corrupted_vault_record_fails_closed_with_a_clear_error(stack: Stack,
                                                               marker: str) -> None:
    import sqlite3
    from contextlib import closing

    user = f"corrupt-{marker}"
    stack.vault_put(user, stack.grant(user))
    with closing(sqlite3.connect(stack.config["vault"]["path"])) as db, db:
        (sealed,) = db.execute("SELECT sealed FROM grants WHERE user = ?", (user,)).fetchone()
        flipped = bytes([sealed[20] ^ 1])
        db.execute("UPDATE grants SET sealed = ? WHERE user = ?",
                   (sealed[:20] + flipped + sealed[21:], user))
    with stack.client(context=stack.context(user)) as c:
        r = c.get(f"{stack.docs_url}/echo/{marker}")
    assert r.status_code == 503
    assert r.headers["X-Credproxy-Error"] == "credential-store-unavailable"
    assert r.json()["reason"] == "vault_record_corrupt"
    assert "Retry-After" in r.headers
    assert not stack.docs_saw(marker)
    assert stack.proxy is not None
    proxy = stack.proxy  # the operator learns which record (log lines are written by a thread)
    wait_until(lambda: user in proxy.stderr_text())
