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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from devstack.stack import Stack, build_stack
from proxy.errors import VaultUnavailable
from proxy.secret import Secret
from proxy.tokenset import TokenSet
from proxy.vault.azure import BACKOFF_BASE, TAG_PROVIDER, TAG_USER, TRIES, user_tag
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
    kvstack.kv_admin("POST", "/_admin/config", {"purge_protection": False, "purge_polls": 0})
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
    # Key Vault's 429 comes with or without Retry-After; both are retried with backoff
    # (within one call's 3 tries: a third 429 in a row fails that read closed, with 503).
    # Aimed at grant secrets: the proxy's poll of its revocation marker must not take them.
    grants = "/secrets/cp-"
    s.kv_admin("POST", "/_admin/faults",
               {"status": 429, "count": 1, "retry_after": None, "path": grants})
    s.kv_admin("POST", "/_admin/faults",
               {"status": 429, "count": 1, "retry_after": 1, "path": grants})
    import time

    started = time.monotonic()
    for u in users:
        with s.client(context=s.context(u)) as c:
            for _ in range(10):
                assert c.get(f"{s.docs_url}/echo").status_code == 200
    assert time.monotonic() - started >= 1.0  # Retry-After: 1 was honoured
    stats = s.kv_admin("GET", "/_admin/stats")
    assert stats["by_status"].get("429") == 2
    # 50 requests, one Key Vault read per user (plus retries): the memory cache holds. One
    # more per user at most: a revoke by an earlier test changes the revocation marker, and
    # the proxy's next poll of it (every 5 s) drops its memory cache once.
    reads = [r for r in s.kv_admin("GET", "/_admin/requests")["requests"]
             if r["method"] == "GET" and r["path"].startswith(grants)]
    assert len(reads) <= 2 * len(users) + 2


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


def test_failed_write_after_rotation_keeps_the_grant(kvstack: Stack, marker: str) -> None:
    s = kvstack
    user = "kv-write-fails"
    s.vault_put(user, s.grant(user, expires_in=0))
    s.kv_admin("POST", "/_admin/faults", {"status": 500, "count": -1, "methods": ["PUT"]})
    with s.client(context=s.context(user)) as c:
        r = c.get(f"{s.docs_url}/echo/{marker}")
        assert r.status_code == 503 and r.json()["reason"] == "vault_write_failed"
        assert s.stats()["refresh_by_user"][user] == 1
        # The new access token is used only once its refresh token is in the vault.
        assert not s.docs_saw(marker)
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

    def ready() -> str:
        return str(httpx2.get(admin, trust_env=False, timeout=30).json()["status"])

    assert ready() == "ok"
    kvstack.kv_admin("POST", "/_admin/faults", {"status": 403, "count": -1})
    from proxy.app import VAULT_OK_TTL  # a success is reused this long (billed reads)

    deadline = time.monotonic() + VAULT_OK_TTL + 10
    while ready() != "degraded" and time.monotonic() < deadline:
        time.sleep(0.2)
    # Key Vault is shared by every pod: its outage degrades readiness, never fails it.
    r = httpx2.get(admin, trust_env=False, timeout=30)
    assert r.status_code == 200 and r.json()["degraded"] == ["vault"]
    assert r.json()["checks"]["vault"].startswith("unavailable")
    kvstack.kv_admin("POST", "/_admin/reset")
    assert ready() == "ok"


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
        assert "purge refused (purge protection); soft-deleted, retained until" in rec["detail"]
    else:
        assert rec["detail"].endswith("stored secret purged")
    assert kvstack.vault_get(user) is None


# -- retries: VaultRetryPolicy against the server's fault injection -----------------------


def _vault_with(kvstack: Stack, **vault: Any) -> Any:
    """The stack's Key Vault opened as the proxy opens it, with other vault settings."""
    from proxy.app import open_vault
    from proxy.settings import load_settings

    base = load_settings(kvstack.config_path)
    settings = base.model_copy(update={"vault": base.vault.model_copy(update=vault)})
    return open_vault(settings, environ=kvstack.env)[0]


def _path(kvstack: Stack, user: str) -> str:
    """The path of ``user``'s docs grant (faults aimed at it spare the proxy's own polls)."""
    async def name() -> str:
        vault = kvstack._open_vault()
        try:
            return f"/secrets/{vault.name(user, 'docs')}"
        finally:
            await vault.close()

    return _run(name())


def _gets(kvstack: Stack, path: str) -> list[dict[str, Any]]:
    return [r for r in kvstack.kv_admin("GET", "/_admin/requests")["requests"]
            if r["method"] == "GET" and r["path"].rstrip("/") == path]


def test_429_without_retry_after_backs_off_with_jitter(kvstack: Stack) -> None:
    kvstack.vault_put("throttled", kvstack.grant("throttled"))
    path = _path(kvstack, "throttled")
    first_gaps: list[float] = []
    for _ in range(4):
        kvstack.kv_admin("POST", "/_admin/reset")
        kvstack.kv_admin("POST", "/_admin/faults",
                         {"status": 429, "count": -1, "methods": ["GET"], "path": path})

        async def go() -> str:
            vault = _vault_with(kvstack)
            try:
                with pytest.raises(VaultUnavailable) as exc:
                    await vault.get("throttled", "docs")
                return str(exc.value)
            finally:
                await vault.close()

        message = _run(go())
        assert "429" in message
        times = [r["time"] for r in _gets(kvstack, path)]
        assert len(times) == TRIES  # 3 tries, no more
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        # Never at once (azure-core's default retries the first 429 immediately): the
        # first wait is 0.25 s scaled by [0.1, 1], the next twice that.
        assert 0.02 <= gaps[0] <= BACKOFF_BASE + 0.15, gaps
        assert 0.04 <= gaps[1] <= 2 * BACKOFF_BASE + 0.15, gaps
        first_gaps.append(gaps[0])
    assert max(first_gaps) - min(first_gaps) > 0.01, first_gaps  # jittered, not in step


def test_429_retry_after_is_honoured(kvstack: Stack) -> None:
    kvstack.vault_put("patient", kvstack.grant("patient"))
    path = _path(kvstack, "patient")
    kvstack.kv_admin("POST", "/_admin/reset")
    kvstack.kv_admin("POST", "/_admin/faults", {"status": 429, "count": 1, "retry_after": 1,
                                                "methods": ["GET"], "path": path})

    async def go() -> Grant | None:
        vault = _vault_with(kvstack)
        try:
            return await vault.get("patient", "docs")
        finally:
            await vault.close()

    assert _run(go()) is not None
    log = _gets(kvstack, path)
    assert log[0]["status"] == 429 and log[-1]["status"] == 200, log
    assert log[1]["time"] - log[0]["time"] >= 1.0, log


def test_a_retry_after_beyond_the_cap_fails_fast_and_clearly(kvstack: Stack) -> None:
    s = kvstack
    s.vault_put("kv-throttled-long", s.grant("kv-throttled-long"))
    path = _path(s, "kv-throttled-long")
    s.kv_admin("POST", "/_admin/reset")
    s.kv_admin("POST", "/_admin/faults", {"status": 429, "count": -1, "retry_after": 3600,
                                          "methods": ["GET"], "path": path})

    async def go() -> str:
        vault = _vault_with(kvstack)
        try:
            with pytest.raises(VaultUnavailable) as exc:
                await vault.get("kv-throttled-long", "docs")
            return str(exc.value)
        finally:
            await vault.close()

    started = time.monotonic()
    message = _run(go())
    assert time.monotonic() - started < 2.0
    assert "429" in message and "Retry-After 3600 s" in message
    assert len(_gets(s, path)) == 1  # not retried: an hour is beyond any call's budget
    with s.client(context=s.context("kv-throttled-long")) as c:
        r = c.get(f"{s.docs_url}/echo")
    assert r.status_code == 503
    assert r.headers["X-Credproxy-Error"] == "credential-store-unavailable"


def test_a_slow_vault_call_is_bounded_in_total(kvstack: Stack) -> None:
    kvstack.vault_put("kv-slow-total", kvstack.grant("kv-slow-total"))
    kvstack.kv_admin("POST", "/_admin/faults", {"status": None, "delay": 2.5, "count": -1,
                                                "methods": ["GET"],
                                                "path": _path(kvstack, "kv-slow-total")})

    async def go() -> float:
        vault = _vault_with(kvstack, timeout=2.0)
        started = time.monotonic()
        try:
            with pytest.raises(VaultUnavailable):
                await vault.get("kv-slow-total", "docs")
            took = time.monotonic() - started
            # The abandoned tries' TLS connections close once the server answers them (a
            # long-running proxy's loop sees that through); this short-lived loop waits
            # for it rather than ending with their sockets half-closed.
            await asyncio.sleep(max(0.0, 4.5 - (time.monotonic() - started)))
            return took
        finally:
            await vault.close()

    took = _run(go())
    assert 1.0 <= took < 3.0, took  # vault.timeout bounds every try and wait together


# -- reconnecting through the web connect flow after a revoke -------------------------------


def _web_connect(s: Stack, user: str) -> httpx2.Response:
    admin = f"http://{s.config['admin']}"
    with httpx2.Client(verify=s.admin_tls(), follow_redirects=False, timeout=30,
                       trust_env=False) as b:
        authorize = b.get(f"{admin}/connect/docs",
                          params={"context": s.context(user)}).headers["location"]
        callback = b.get(authorize + f"&login_hint={user}").headers["location"]
        return b.get(callback)


@pytest.mark.parametrize("purge", [False, True], ids=["soft-deleted", "purged"])
def test_reconnect_through_the_connect_flow_after_revoke(kvstack: Stack, tmp_path: Path,
                                                         purge: bool) -> None:
    import yaml

    s = kvstack
    user = f"kv-reconnect-{purge}"
    # Key Vault frees a purged name only after a while: the next writes meet 409
    # ObjectIsBeingDeleted, and the write waits (bounded) instead of failing.
    s.kv_admin("POST", "/_admin/config", {"purge_polls": 3})
    first = _web_connect(s, user)
    assert first.status_code == 200 and "now connected" in first.text
    old = s.vault_get(user)
    cfg = yaml.safe_load(s.config_path.read_text())
    cfg["vault"]["purge_on_delete"] = purge
    path = tmp_path / "revoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "revoke", "--config", str(path),
                        "--user", user], capture_output=True, text=True,
                       env={**os.environ, **s.env}, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert s.vault_get(user) is None
    s.kv_admin("POST", "/_admin/reset")
    again = _web_connect(s, user)
    assert again.status_code == 200 and "now connected" in again.text, again.text
    new = s.vault_get(user)
    assert new is not None and new.tokens.access_token != old.tokens.access_token
    with s.client(context=s.context(user)) as c:
        assert c.get(f"{s.docs_url}/documents").status_code == 200
    assert s.kv_admin("GET", "/_admin/stats")["by_status"].get("409", 0) >= (3 if purge else 1)


# -- credproxy check -------------------------------------------------------------------------


def _check(s: Stack, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "check", "--config",
                           str(config)], capture_output=True, text=True,
                          env={**os.environ, **s.env}, timeout=60)


def _probe_versions(s: Stack) -> list[str]:
    return next((x["versions"] for x in s.kv_admin("GET", "/_admin/secrets")["secrets"]
                 if x["name"] == "cp-probe"), [])


def test_check_writes_the_probe_secret(kvstack: Stack) -> None:
    before = _probe_versions(kvstack)
    r = _check(kvstack, kvstack.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "vault (azure): ok" in r.stdout
    after = _probe_versions(kvstack)
    assert len(after) == len(before) + 1  # a new version: the write really happened
    puts = [x for x in kvstack.kv_admin("GET", "/_admin/requests")["requests"]
            if x["method"] == "PUT" and x["path"] == "/secrets/cp-probe"]
    assert puts and puts[-1]["status"] == 200


def test_check_fails_clearly_for_an_identity_that_may_not_write(kvstack: Stack,
                                                                tmp_path: Path) -> None:
    import yaml

    token = tmp_path / "reader-token"
    token.write_text("token-of-a-read-only-identity")
    cfg = yaml.safe_load(kvstack.config_path.read_text())
    cfg["vault"]["token_file"] = str(token)
    path = tmp_path / "reader.yaml"
    path.write_text(yaml.safe_dump(cfg))
    kvstack.kv_admin("POST", "/_admin/permissions",
                     {"token": "token-of-a-read-only-identity", "deny": ["set"]})
    before = _probe_versions(kvstack)
    r = _check(kvstack, path)
    assert r.returncode == 1
    assert "vault (azure): ok" not in r.stdout
    assert "lacks the secrets set permission" in r.stderr, r.stderr
    assert _probe_versions(kvstack) == before
    assert _check(kvstack, kvstack.config_path).returncode == 0  # the proxy's identity may


@pytest.mark.parametrize("damage", ["not-json", "another-users-record"])
def test_a_corrupt_secret_is_listed_as_corrupt_not_a_failed_listing(kvstack: Stack,
                                                                     damage: str) -> None:
    """One damaged secret made the whole listing fail (`credproxy connections`, offboarding
    by listing): it is listed as corrupt, with its provider and the keyed user tag, and the
    other grants are listed as usual."""
    good, bad = f"kv-good-{damage}", f"kv-bad-{damage}"

    async def go() -> list[Any]:
        vault = kvstack._open_vault()
        try:
            await vault.put(Grant(good, "docs", TokenSet(Secret("at-good"), expires_at=2e9)))
            await vault.put(Grant(bad, "docs", TokenSet(Secret("at-bad"), expires_at=2e9)))
            name, tags = vault.name(bad, "docs"), {TAG_PROVIDER: "docs",
                                                  TAG_USER: user_tag(vault._naming, bad)}
            if damage == "not-json":
                value = "garbage{"
            else:  # a valid record of another grant copied under this name
                value = (await vault._client.get_secret(vault.name(good, "docs"))).value
            await vault._client.set_secret(name, value, tags=tags,
                                           content_type="application/json")
            return await vault.list()
        finally:
            await vault.close()

    listed = {(i.user, i.provider): i for i in _run(go())}
    assert listed[(good, "docs")].status is GrantStatus.ACTIVE
    corrupt = [i for i in listed.values() if i.status is GrantStatus.CORRUPT]
    assert [(i.provider, i.user.startswith("#")) for i in corrupt] == [("docs", True)]
    assert bad not in {i.user for i in corrupt}  # the name is a keyed hash, never the id
