"""A grant's values and resource tokens at rest (proxy.vault.base.grant_record): through the
local vault and the Redis shared cache they come back as they went in; records written
before they existed read as a grant without any; a record that names them wrongly is
refused, never half read."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from devstack.redisproc import RedisServer
from proxy.coordination.redis import RedisCoordinator
from proxy.secret import Secret
from proxy.settings import CoordinationSettings
from proxy.tokenset import TokenSet, TokenSetError
from proxy.vault.base import Grant, GrantStatus, grant_record, read_grant_record
from proxy.vault.local import LocalVault

KEY = bytes(range(32))
NOW = 1_800_000_000.0
VALUES: dict[str, Any] = {
    "instance": "acme.my.salesforce.com",
    "realm": "9130357988888888",
    "sites": ("a1", "b2"),  # a list value ("*" in its field): metadata
    "identity": "https://login.salesforce.com/id/00D/005",
    "label": "Zürich ✓",
}


def main(expires_at: float = NOW + 3600) -> TokenSet:
    return TokenSet(Secret("main-at-canary"), Secret("rt-canary"), expires_at=expires_at,
                    scope="offline_access User.Read", issued_at=expires_at - 3600)


RESOURCES = {
    "sp": TokenSet(Secret("sp-at-canary"), None, expires_at=NOW + 600,
                   scope="https://contoso.sharepoint.com/.default", issued_at=NOW),
    "dyn": TokenSet(Secret("dyn-at-canary"), None, token_type="bearer"),
}
CANARIES = ("main-at-canary", "rt-canary", "sp-at-canary", "dyn-at-canary")


def bound_grant(**over: Any) -> Grant:
    fields: dict[str, Any] = {"user": "alice", "provider": "ms", "tokens": main(),
                              "values": VALUES, "resources": RESOURCES}
    fields.update(over)
    return Grant(**fields)


def same_content(got: Grant | None, want: Grant) -> None:
    assert got is not None
    assert dict(got.values) == dict(want.values)
    assert got.tokens == want.tokens
    assert dict(got.resources) == dict(want.resources)
    for value in got.values.values():
        assert isinstance(value, str | tuple)  # a list value comes back a tuple


# --- the record ------------------------------------------------------------------------


def test_a_grant_without_values_has_the_record_of_before() -> None:
    plain = Grant("alice", "docs", main())
    assert grant_record(plain) == main().to_record()
    assert read_grant_record(main().to_record()) == (main(), {}, {})


def test_the_record_round_trip() -> None:
    record = json.loads(json.dumps(grant_record(bound_grant())))
    assert record["grant_values"]["sites"] == ["a1", "b2"]
    tokens, values, resources = read_grant_record(record)
    assert (tokens, values, resources) == (main(), VALUES, RESOURCES)


@pytest.mark.parametrize(("extra", "says"), [
    pytest.param({"grant_values": ["instance"]}, "grant_values", id="values-a-list"),
    pytest.param({"grant_values": "acme"}, "grant_values", id="values-a-string"),
    pytest.param({"grant_values": {"realm": 9130357988888888}}, "string", id="a-number"),
    pytest.param({"grant_values": {"instance": None}}, "string", id="null"),
    pytest.param({"grant_values": {"instance": {"host": "x"}}}, "string", id="an-object"),
    pytest.param({"grant_values": {"sites": ["a1", 2]}}, "string", id="a-list-with-a-number"),
    pytest.param({"resource_tokens": ["sp"]}, "resource_tokens", id="resources-a-list"),
    pytest.param({"resource_tokens": {"sp": "sp-at"}}, "JSON object", id="resource-a-string"),
    pytest.param({"resource_tokens": {"sp": {"refresh_token": "x"}}}, "access_token",
                 id="resource-without-access-token"),
    pytest.param({"resource_tokens": {"sp": {"access_token": "a", "expires_at": "soon"}}},
                 "expires_at", id="resource-bad-expiry"),
])
def test_a_record_naming_values_or_resources_wrongly_is_refused(extra: dict[str, Any],
                                                                says: str) -> None:
    with pytest.raises(TokenSetError, match=says):
        read_grant_record({**main().to_record(), **extra})


@pytest.mark.parametrize("empty", [None, {}])
def test_empty_or_null_members_read_as_none(empty: Any) -> None:
    record = {**main().to_record(), "grant_values": empty, "resource_tokens": empty}
    assert read_grant_record(record) == (main(), {}, {})


# --- the local vault ---------------------------------------------------------------------


@pytest.fixture
async def vault(tmp_path: Path) -> AsyncIterator[LocalVault]:
    v = LocalVault.open(tmp_path / "v.db", KEY, clock=lambda: NOW)
    yield v
    await v.close()


async def test_the_local_vault_keeps_values_and_resource_tokens(vault: LocalVault,
                                                                tmp_path: Path) -> None:
    stored = await vault.put(bound_grant())
    same_content(await vault.get("alice", "ms"), stored)
    # Sealed: no value or token in the file, in any form.
    raw = (tmp_path / "v.db").read_bytes()
    for secret in (*CANARIES, "acme.my.salesforce.com", "9130357988888888"):
        assert secret.encode() not in raw
    # Another process (a new handle on the file) reads the same.
    other = LocalVault.open(tmp_path / "v.db", KEY, create=False)
    try:
        same_content(await other.get("alice", "ms"), stored)
    finally:
        await other.close()


async def test_marking_keeps_values_and_listing_shows_no_token(vault: LocalVault) -> None:
    await vault.put(bound_grant())
    await vault.put(Grant("alice", "docs", main()))  # a grant from before: no values
    marked = await vault.mark_reauth("alice", "ms", "invalid_grant")
    assert marked is not None and marked.status is GrantStatus.REAUTH_REQUIRED
    same_content(await vault.get("alice", "ms"), bound_grant())
    infos = {i.provider: i for i in await vault.list("alice")}
    ms, docs = infos["ms"], infos["docs"]
    assert dict(ms.values) == VALUES and ms.status is GrantStatus.REAUTH_REQUIRED
    assert ms.resources["sp"].scope == "https://contoso.sharepoint.com/.default"
    assert ms.resources["sp"].expires_at == NOW + 600
    assert ms.resources["dyn"].expires_at is None
    assert (dict(docs.values), dict(docs.resources)) == ({}, {})
    shown = repr(infos) + str(infos)
    for secret in CANARIES:
        assert secret not in shown


async def test_a_refresh_write_adds_resource_tokens_to_the_same_record(
        vault: LocalVault) -> None:
    first = await vault.put(bound_grant(resources={}))
    second = await vault.put(bound_grant(), expected_version=first.version)
    got = await vault.get("alice", "ms")
    same_content(got, second)
    assert got is not None and got.version == first.version + 1


async def test_deleting_the_grant_deletes_its_resource_tokens(vault: LocalVault) -> None:
    await vault.put(bound_grant())
    assert await vault.delete("alice", "ms")
    assert await vault.get("alice", "ms") is None
    assert await vault.list() == []


# --- the Redis shared cache --------------------------------------------------------------


def _coordinator(server: RedisServer) -> RedisCoordinator:
    return RedisCoordinator(CoordinationSettings(backend="redis", url=server.url,
                                                 key_prefix="b:"), cache_key=KEY)


async def test_the_shared_cache_keeps_values_and_resource_tokens(
        redis_server: RedisServer) -> None:
    import redis.asyncio as aioredis

    now = time.time()
    resources = {"sp": TokenSet(Secret("sp-at-canary"), None, expires_at=now + 600)}
    grant = bound_grant(tokens=main(expires_at=now + 3600), resources=resources, version=7)
    plain = Grant("bob", "docs", main(expires_at=now + 3600), version=3)
    a, b = _coordinator(redis_server), _coordinator(redis_server)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await a.cache_put(grant)
        await a.cache_put(plain)
        got = await b.cache_get("alice", "ms")  # another replica
        same_content(got, grant)
        assert got is not None and got.version == 7
        old = await b.cache_get("bob", "docs")  # the record of before: nothing extra
        assert old is not None and (dict(old.values), dict(old.resources)) == ({}, {})
        stored = b"".join([await raw.get(k) or b"" for k in await raw.keys("b:*")])
        for secret in (*CANARIES, "acme.my.salesforce.com", "sites"):
            assert secret.encode() not in stored
    finally:
        await raw.aclose()
        await a.close()
        await b.close()
