"""``GET /v1/connections`` on a real admin server (aiohttp on a free port), a real identity
verifier and a real local vault: the agent's own view of its user's connections, never a
token, never another user's, never without a verified user context in its header."""

from __future__ import annotations

import io
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from proxy.admin import AdminServer
from proxy.audit import AuditLog, StdoutSink
from proxy.connect import Connector
from proxy.coordination import MemoryCoordinator
from proxy.identity import IdentityVerifier, KeySource
from proxy.metrics import Metrics
from proxy.secret import Secret
from proxy.settings import Settings, parse_settings
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant
from proxy.vault.local import LocalVault

from .conftest import AUDIENCE, ISSUER, NOW, Clock, Keys, MakeContext, live_config

KEY = bytes(range(32))
HEADER = "X-User-Context"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _provider(pid: str, hosts: list[str], **entry: Any) -> dict[str, Any]:
    return {"id": pid, "hosts": hosts, "client_id": "c", "token_endpoint_auth_method": "none",
            "authorize_url": f"https://login.example.com/{pid}/authorize",
            "token_url": f"https://login.example.com/{pid}/token", **entry}


def settings(tmp_path: Path) -> Settings:
    return parse_settings({
        "admin": f"127.0.0.1:{_free_port()}", "ca_dir": str(tmp_path),
        "public_url": "https://credproxy.example.com",
        "identity": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "/unused"},
        "providers": [
            _provider("shop", ["*.myshopify.com"],
                      grant_values={"shop": {"from": "choice", "kind": "host"}},
                      grant_hosts=["{shop}"], authorize_url="https://{shop}/a",
                      token_url="https://{shop}/t"),
            _provider("ms", ["graph.example.com"],
                      grant_values={"site": {"from": "discovery", "field": "webUrl",
                                             "kind": "host",
                                             "url": "https://graph.example.com/sites/root"},
                                    "sites": {"from": "discovery", "field": "value.*.id",
                                              "url": "https://graph.example.com/sites",
                                              "required": False}},
                      resources={"sp": {"hosts": ["*.sharepoint.com"],
                                        "grant_hosts": ["{site}"],
                                        "scopes": ["https://{site}/.default"]}}),
            _provider("docs", ["docs.example.com"]),
            # Narrowed to one org since alice connected to another: her grant binds nothing.
            _provider("sf", ["acme.my.salesforce.com"],
                      grant_values={"instance": {"from": "token_response",
                                                 "field": "instance_url", "kind": "host"}},
                      grant_hosts=["{instance}"]),
            _provider("secret", ["secret.example.com"]),
        ],
    })


# Every token in the vault: none may ever appear in an answer.
TOKENS = {
    ("alice", "shop"): ("a-shop-at", "a-shop-rt"),
    ("alice", "ms"): ("a-graph-at", "a-ms-rt"),
    ("alice", "sf"): ("a-sf-at", "a-sf-rt"),
    ("alice", "secret"): ("a-secret-at", "a-secret-rt"),
    ("bob", "shop"): ("b-shop-at", "b-shop-rt"),
    ("bob", "docs"): ("b-docs-at", "b-docs-rt"),
}
SP_TOKEN = "a-sharepoint-at"


@dataclass
class Admin:
    base: str
    settings: Settings

    async def get(self, path: str = "/v1/connections", *,
                  headers: list[tuple[str, str]] | None = None) -> httpx2.Response:
        async with httpx2.AsyncClient(trust_env=False, timeout=10) as c:
            return await c.get(self.base + path, headers=headers or [])


@pytest.fixture
async def admin(tmp_path: Path, keys: Keys) -> AsyncIterator[Admin]:
    s = settings(tmp_path)
    vault = LocalVault.open(tmp_path / "v.db", KEY, clock=lambda: NOW)
    values = {("alice", "shop"): {"shop": "acme.myshopify.com"},
              ("alice", "ms"): {"site": "contoso.sharepoint.com", "sites": ("s1", "s2")},
              ("alice", "sf"): {"instance": "globex.my.salesforce.com"},
              ("bob", "shop"): {"shop": "globex.myshopify.com"}}
    for (user, pid), (at, rt) in TOKENS.items():
        resources = ({"sp": TokenSet(Secret(SP_TOKEN), None, expires_at=NOW + 600,
                                     scope="https://contoso.sharepoint.com/.default")}
                     if (user, pid) == ("alice", "ms") else {})
        await vault.put(Grant(user, pid, TokenSet(Secret(at), Secret(rt),
                                                  expires_at=NOW + 3600, scope="read"),
                              values=values.get((user, pid), {}), resources=resources))
    await vault.mark_reauth("alice", "sf", "invalid_grant")
    audit = AuditLog(StdoutSink(io.StringIO()), instance="t/1", fingerprint_key=KEY,
                     clock=lambda: NOW)
    verifier = IdentityVerifier(s.identity, KeySource(keys.public_set()), clock=Clock())
    live = live_config(settings=s, verifier=verifier)
    connector = Connector(live, vault, MemoryCoordinator(), audit, state_key=KEY)
    server = AdminServer(live, connector, vault, [], Metrics())
    await server.start()
    try:
        yield Admin(f"http://{s.admin}", s)
    finally:
        await server.stop()
        await connector.aclose()
        await vault.close()


def alice(make_context: MakeContext, **claims: Any) -> list[tuple[str, str]]:
    ctx = make_context(claims={"sub": "alice", "providers": ["shop", "ms", "docs", "sf"],
                               **claims})
    return [(HEADER, ctx)]


def no_secrets(text: str) -> None:
    for at, rt in TOKENS.values():
        assert at not in text and rt not in text
    assert SP_TOKEN not in text


async def test_the_users_own_connections(admin: Admin, make_context: MakeContext) -> None:
    r = await admin.get(headers=alice(make_context))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["cache-control"] == "no-store"
    no_secrets(r.text)
    assert "globex.myshopify.com" not in r.text  # bob's shop
    body = r.json()
    assert body["user"] == "alice"
    by_id = {c["provider"]: c for c in body["connections"]}
    assert [c["provider"] for c in body["connections"]] == ["shop", "ms", "docs", "sf"]
    assert by_id["shop"] == {
        "provider": "shop", "connect_url": "https://credproxy.example.com/connect/shop",
        "status": "active", "reason": None, "scope": "read", "expires_at": NOW + 3600,
        "has_refresh_token": True, "values": {"shop": "acme.myshopify.com"},
        "hosts": ["acme.myshopify.com"], "resources": {}, "choices": ["shop"],
        "suspended": None}
    ms = by_id["ms"]
    assert ms["values"] == {"site": "contoso.sharepoint.com", "sites": ["s1", "s2"]}
    assert ms["hosts"] == ["graph.example.com"]  # no grant_hosts: the provider's
    assert ms["resources"] == {"sp": {"hosts": ["contoso.sharepoint.com"],
                                      "scope": "https://contoso.sharepoint.com/.default",
                                      "expires_at": NOW + 600}}
    assert by_id["docs"] == {
        "provider": "docs", "connect_url": "https://credproxy.example.com/connect/docs",
        "status": "not_connected", "reason": None, "scope": None, "expires_at": None,
        "has_refresh_token": False, "values": {}, "hosts": ["docs.example.com"],
        "resources": {}, "choices": [], "suspended": None}
    sf = by_id["sf"]
    assert (sf["status"], sf["reason"]) == ("reauth_required", "invalid_grant")
    # Its value binds a host the running config no longer allows: it binds none.
    assert sf["values"] == {"instance": "globex.my.salesforce.com"} and sf["hosts"] == []


async def test_a_provider_the_context_excludes_is_absent(admin: Admin,
                                                         make_context: MakeContext) -> None:
    r = await admin.get(headers=alice(make_context, providers=["docs"]))
    assert [c["provider"] for c in r.json()["connections"]] == ["docs"]
    assert r.json()["connections"][0]["status"] == "not_connected"
    none = await admin.get(headers=alice(make_context, providers=[]))
    assert none.json() == {"user": "alice", "connections": []}
    every = await admin.get(headers=[(HEADER, make_context(claims={"sub": "alice"}))])
    assert [c["provider"] for c in every.json()["connections"]] == [
        "shop", "ms", "docs", "sf", "secret"]  # no providers claim: no restriction
    no_secrets(r.text + none.text + every.text)


async def test_another_user_sees_only_their_own(admin: Admin,
                                                make_context: MakeContext) -> None:
    r = await admin.get(headers=[(HEADER, make_context(claims={"sub": "bob"}))])
    by_id = {c["provider"]: c for c in r.json()["connections"]}
    assert r.json()["user"] == "bob"
    assert by_id["shop"]["values"] == {"shop": "globex.myshopify.com"}
    assert by_id["docs"]["status"] == "active"
    assert by_id["ms"]["status"] == "not_connected" and by_id["ms"]["values"] == {}
    assert "acme.myshopify.com" not in r.text and "contoso" not in r.text.replace(
        "*.sharepoint.com", "")
    no_secrets(r.text)


async def test_a_user_without_grants_sees_every_permitted_provider_unconnected(
        admin: Admin, make_context: MakeContext) -> None:
    r = await admin.get(headers=[(HEADER, make_context(claims={"sub": "carol"}))])
    statuses = {c["provider"]: c["status"] for c in r.json()["connections"]}
    assert set(statuses.values()) == {"not_connected"} and len(statuses) == 5
    shop = r.json()["connections"][0]
    # No grant binds a host yet: none gets a credential (the ceiling is not a grant's);
    # the connect link needs the shop.
    assert shop["hosts"] == [] and shop["choices"] == ["shop"]


@pytest.mark.parametrize(("how", "reason"), [
    pytest.param("none", "missing", id="no-context"),
    pytest.param("query", "missing", id="context-in-the-query-string"),
    pytest.param("expired", "expired", id="expired"),
    pytest.param("forged", "bad_signature", id="another-key"),
    pytest.param("garbage", "malformed", id="not-a-jws"),
    pytest.param("wrong-audience", "wrong_audience", id="wrong-audience"),
    pytest.param("alg-none", "alg_not_allowed", id="alg-none"),
    pytest.param("duplicate", "duplicate_header", id="the-header-twice"),
    pytest.param("empty", "missing", id="empty-header"),
])
async def test_a_context_that_fails_verification_is_a_401_problem(
        admin: Admin, make_context: MakeContext, keys: Keys, how: str, reason: str) -> None:
    good = make_context(claims={"sub": "alice"})
    path, headers = "/v1/connections", []
    if how == "query":
        path += f"?context={good}"
    elif how == "expired":
        headers = [(HEADER, make_context(claims={"sub": "alice", "iat": int(NOW) - 900,
                                                 "exp": int(NOW) - 60}))]
    elif how == "forged":
        headers = [(HEADER, make_context(claims={"sub": "alice"}, key=keys.ed_impostor))]
    elif how == "garbage":
        headers = [(HEADER, "not.a.jws")]
    elif how == "wrong-audience":
        headers = [(HEADER, make_context(claims={"sub": "alice", "aud": "other"}))]
    elif how == "alg-none":
        headers = [(HEADER, make_context(alg="none", key=None, claims={"sub": "alice"}))]
    elif how == "duplicate":
        headers = [(HEADER, good), (HEADER, make_context(claims={"sub": "bob"}))]
    elif how == "empty":
        headers = [(HEADER, "")]
    r = await admin.get(path, headers=headers)
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["cache-control"] == "no-store"
    assert HEADER in r.headers["www-authenticate"]
    body = r.json()
    assert (body["status"], body["reason"]) == (401, reason)
    assert body["type"].startswith("urn:credproxy:problem:user-context")
    assert "connections" not in body
    assert good not in r.text and good.split(".")[2] not in r.text
    no_secrets(r.text)


async def test_the_connect_link_takes_the_choice_and_one_context(
        admin: Admin, make_context: MakeContext) -> None:
    ctx = alice(make_context)
    async with httpx2.AsyncClient(trust_env=False, timeout=10) as c:
        ok = await c.get(f"{admin.base}/connect/shop?shop=acme.myshopify.com", headers=ctx)
        bad = await c.get(f"{admin.base}/connect/shop?shop=evil.example.com", headers=ctx)
        twice = await c.get(f"{admin.base}/connect/shop?shop=acme.myshopify.com",
                            headers=[*ctx, (HEADER, make_context(claims={"sub": "bob"}))])
    assert ok.status_code == 302
    assert ok.headers["location"].startswith("https://acme.myshopify.com/a?")
    assert bad.status_code == 400 and "grant_host_not_allowed" in bad.text
    assert "location" not in bad.headers
    assert twice.status_code == 401 and "duplicate_header" in twice.text
