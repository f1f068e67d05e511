"""Azure Key Vault as the vault: the real azure-keyvault-secrets SDK against the local Key
Vault-compatible server (devstack/keyvault.py, held to recorded Key Vault traffic in
tests/devstack/test_keyvault_server.py), through the vault interface and through the whole
proxy, with its faults."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import Stack, build_stack
from proxy.secret import Secret
from proxy.tokenset import TokenSet
from proxy.vault.azure import TAG_PROVIDER, TAG_USER
from proxy.vault.base import Grant, GrantChanged, GrantStatus

pytestmark = pytest.mark.integration

NAME = re.compile(r"^[0-9a-zA-Z-]{1,127}$")


@pytest.fixture(scope="module")
def kvstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = build_stack(Path(tmp_path_factory.mktemp("kv")), keyvault=True)
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _no_faults(kvstack: Stack) -> Iterator[None]:
    yield
    kvstack.kv_admin("POST", "/_admin/reset")
    kvstack.kv_admin("POST", "/_admin/config", {"purge_protection": False})
    with kvstack.admin() as c:
        c.post("/_admin/faults", json={"token_status": None})


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_vault_interface_round_trip_and_naming(kvstack: Stack) -> None:
    user = "Émile O'Brien <emile@example.com>"  # any user id at all

    async def go() -> None:
        vault = kvstack._open_vault()
        try:
            g = await vault.put(Grant(user, "docs", TokenSet(Secret("at-kv-canary"),
                                                             Secret("rt-kv-canary"),
                                                             expires_at=2e9, scope="s")))
            assert g.version > 1_700_000_000_000  # a new grant: the clock in milliseconds
            got = await vault.get(user, "docs")
            assert got is not None and got.tokens.access_token == Secret("at-kv-canary")
            assert (await vault.put(got)).version == g.version + 1
            with pytest.raises(GrantChanged):  # a write based on a superseded version
                await vault.put(got, expected_version=g.version)
            marked = await vault.mark_reauth(user, "docs", "revoked_upstream")
            assert marked is not None and marked.status is GrantStatus.REAUTH_REQUIRED
            listed = await vault.list(user)
            assert [(i.user, i.provider, i.scope) for i in listed] == [(user, "docs", "s")]
            props = [p async for p in vault._client.list_properties_of_secrets()]
            mine = [p for p in props if p.tags and p.tags.get(TAG_PROVIDER) == "docs"
                    and p.name == vault.name(user, "docs")]
            assert mine and mine[0].content_type == "application/json"
            assert set(mine[0].tags) == {TAG_PROVIDER, TAG_USER}
            assert "emile" not in mine[0].tags[TAG_USER].lower()
            assert await vault.delete(user, "docs") is True
            assert await vault.get(user, "docs") is None
            assert await vault.delete(user, "docs") is False
        finally:
            await vault.close()

    _run(go())
    names = [x["name"] for x in kvstack.kv_admin("GET", "/_admin/secrets")["secrets"]]
    names += [x["name"] for x in kvstack.kv_admin("GET", "/_admin/secrets")["deleted"]]
    assert names and all(NAME.match(n) for n in names)
    assert not any("emile" in n.lower() or "brien" in n.lower() for n in names)


@pytest.mark.parametrize("purge", [False, True], ids=["recover", "purge"])
def test_reconnect_after_revoke_meets_the_soft_deleted_name(kvstack: Stack,
                                                            purge: bool) -> None:
    user = f"reconnect-{purge}"

    async def go() -> Grant | None:
        vault = kvstack._open_vault()
        vault._purge = purge
        try:
            await vault.put(Grant(user, "docs", TokenSet(Secret("old"), expires_at=2e9)))
            await vault.delete(user, "docs")  # soft-deleted (and purged when configured)
            await vault.put(Grant(user, "docs", TokenSet(Secret("new"), expires_at=2e9)))
            return await vault.get(user, "docs")
        finally:
            await vault.close()

    got = _run(go())
    assert got is not None and got.tokens.access_token == Secret("new")
    stats = kvstack.kv_admin("GET", "/_admin/stats")
    assert stats["by_status"].get("409", 0) >= (0 if purge else 1)


def test_purge_protection_keeps_the_deleted_secret(kvstack: Stack) -> None:
    kvstack.kv_admin("POST", "/_admin/config", {"purge_protection": True})
    user = "protected"

    async def go() -> bool:
        vault = kvstack._open_vault()
        vault._purge = True
        try:
            await vault.put(Grant(user, "docs", TokenSet(Secret("t"), expires_at=2e9)))
            return bool(await vault.delete(user, "docs"))
        finally:
            await vault.close()

    assert _run(go()) is True
    deleted = kvstack.kv_admin("GET", "/_admin/secrets")["deleted"]
    assert any(d["scheduledPurgeDate"] for d in deleted)  # retained until then


def test_the_proxy_injects_and_refreshes_through_key_vault(kvstack: Stack) -> None:
    s = kvstack
    user = "kv-refresh"
    grant = s.grant(user, expires_in=0)
    s.vault_put(user, grant)
    with s.client(context=s.context(user)) as c:
        r = c.get(f"{s.docs_url}/documents")
    assert r.status_code == 200 and r.json()["user"] == user
    stored = s.vault_get(user)
    # The rotated refresh token landed in Key Vault.
    assert stored.tokens.refresh_token.reveal() != grant["refresh_token"]
    assert s.introspect(stored.tokens.refresh_token.reveal())["active"] is True
    check = subprocess.run([sys.executable, "-m", "proxy.cli", "check", "--config",
                            str(s.config_path)], capture_output=True, text=True,
                           env={**os.environ, **s.env})
    assert check.returncode == 0, check.stderr
    assert "vault (azure): ok" in check.stdout


def test_throttling_storm_is_absorbed(kvstack: Stack) -> None:
    s = kvstack
    users = [f"throttle-{i}" for i in range(5)]
    for u in users:
        s.vault_put(u, s.grant(u))
    s.kv_admin("POST", "/_admin/reset")
    # Key Vault's 429 comes with or without Retry-After; both are retried with backoff.
    s.kv_admin("POST", "/_admin/faults", {"status": 429, "count": 2, "retry_after": None})
    s.kv_admin("POST", "/_admin/faults", {"status": 429, "count": 1, "retry_after": 1})
    import time

    started = time.monotonic()
    for u in users:
        with s.client(context=s.context(u)) as c:
            for _ in range(10):
                assert c.get(f"{s.docs_url}/echo").status_code == 200
    assert time.monotonic() - started >= 1.0  # Retry-After: 1 was honoured
    stats = s.kv_admin("GET", "/_admin/stats")
    assert stats["by_status"].get("429") == 3
    # 50 requests, one Key Vault read per user (plus retries): the memory cache holds.
    assert stats["by_method"].get("GET", 0) <= len(users) + 3


def test_vault_outage_without_and_with_cached_tokens(kvstack: Stack) -> None:
    s = kvstack
    cached, cold = "kv-cached", "kv-cold"
    s.vault_put(cached, s.grant(cached))
    s.vault_put(cold, s.grant(cold))
    with s.client(context=s.context(cached)) as c:
        assert c.get(f"{s.docs_url}/echo").status_code == 200
    s.kv_admin("POST", "/_admin/faults", {"status": 503, "count": -1})
    with s.client(context=s.context(cached)) as c:
        assert c.get(f"{s.docs_url}/echo").status_code == 200  # served from memory
    with s.client(context=s.context(cold)) as c:
        r = c.get(f"{s.docs_url}/echo")
    assert r.status_code == 503
    assert r.headers["X-Credproxy-Error"] == "credential-store-unavailable"
    assert "Retry-After" in r.headers


def test_slow_vault_times_out_into_a_503(tmp_path: Path) -> None:
    s = build_stack(tmp_path, start_proxy=False, keyvault=True)
    try:
        s.config["vault"]["timeout"] = 0.5
        s.write_config()
        s.start_proxy()
        s.vault_put("slow-kv", s.grant("slow-kv"))
        s.kv_admin("POST", "/_admin/faults", {"status": None, "delay": 3, "count": -1})
        with s.client(context=s.context("slow-kv"), timeout=60) as c:
            r = c.get(f"{s.docs_url}/echo")
        assert r.status_code == 503
        assert r.json()["reason"] == "vault_unavailable"
    finally:
        s.close()


def test_failed_write_after_rotation_keeps_the_grant(kvstack: Stack) -> None:
    s = kvstack
    user = "kv-write-fails"
    s.vault_put(user, s.grant(user, expires_in=0))
    s.kv_admin("POST", "/_admin/faults", {"status": 500, "count": -1, "methods": ["PUT"]})
    with s.client(context=s.context(user)) as c:
        r = c.get(f"{s.docs_url}/echo")
        assert r.status_code == 503 and r.json()["reason"] == "vault_write_failed"
        assert s.stats()["refresh_by_user"][user] == 1
        s.kv_admin("POST", "/_admin/reset")
        r = c.get(f"{s.docs_url}/echo")
    assert r.status_code == 200
    # Still one redemption: the rotated token was kept in memory and written on retry.
    assert s.stats()["refresh_by_user"][user] == 1
    stored = s.vault_get(user)
    assert s.introspect(stored.tokens.refresh_token.reveal())["active"] is True
    assert s.proxy is not None
    audit = s.proxy.stdout_text()
    assert '"reason":"vault_write_failed"' in audit


def test_readiness_follows_key_vault(kvstack: Stack) -> None:
    import time

    import httpx2

    admin = f"http://{kvstack.config['admin']}/readyz"

    def ready() -> int:
        return httpx2.get(admin, trust_env=False, timeout=30).status_code

    assert ready() == 200
    kvstack.kv_admin("POST", "/_admin/faults", {"status": 403, "count": -1})
    deadline = time.monotonic() + 20
    while ready() != 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    r = httpx2.get(admin, trust_env=False, timeout=30)
    assert r.status_code == 503 and r.json()["checks"]["vault"].startswith("unavailable")
    kvstack.kv_admin("POST", "/_admin/reset")
    assert ready() == 200


@pytest.mark.parametrize("protected", [False, True], ids=["purge", "purge-protection"])
def test_offboarding_audits_what_happened_to_the_secret(kvstack: Stack, tmp_path: Path,
                                                        protected: bool) -> None:
    import json

    import yaml

    kvstack.kv_admin("POST", "/_admin/config", {"purge_protection": protected})
    cfg = yaml.safe_load(kvstack.config_path.read_text())
    cfg["vault"]["purge_on_delete"] = True
    path = tmp_path / "purging.yaml"
    path.write_text(yaml.safe_dump(cfg))
    user = f"erase-me-{protected}"
    kvstack.vault_put(user, kvstack.grant(user))
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "revoke", "--config", str(path),
                        "--user", user], capture_output=True, text=True,
                       env={**os.environ, **kvstack.env}, timeout=120)
    assert r.returncode == 0, r.stderr
    rec = next(json.loads(x) for x in r.stdout.splitlines()
               if x.startswith("{") and json.loads(x)["event"] == "connection.revoked")
    if protected:
        assert "purge refused (purge protection); soft-deleted, retained until" in rec["reason"]
    else:
        assert rec["reason"].endswith("stored secret purged")
    assert kvstack.vault_get(user) is None
