"""Per-user isolation: each request's upstream sees exactly its own user's token."""

from __future__ import annotations

import asyncio
import time

import httpx2
import pytest

from devstack.stack import Stack
from tests.integration import rawhttp

pytestmark = pytest.mark.integration

USERS = 50
CONCURRENT_PER_USER = 20


def _auth(headers: list[list[str]]) -> list[str]:
    return [v for k, v in headers if k.lower() == "authorization"]


def test_two_users_interleaved_on_one_keepalive_connection(stack: Stack) -> None:
    a, b = "interleave-a", "interleave-b"
    ga, gb = stack.grant(a), stack.grant(b)
    stack.vault_put(a, ga)
    stack.vault_put(b, gb)
    ca, cb = stack.context(a), stack.context(b)
    with httpx2.Client(proxy=stack.proxy_url, verify=stack.mitm_tls(), trust_env=False,
                       limits=httpx2.Limits(max_connections=1)) as c:
        seen = []
        for ctx in [ca, cb, ca, cb, cb, ca]:
            r = c.get(f"{stack.docs_url}/echo", headers={"X-User-Context": ctx})
            seen.append(_auth(r.json()["headers"]))
    ta, tb = [f"Bearer {ga['access_token']}"], [f"Bearer {gb['access_token']}"]
    assert seen == [ta, tb, ta, tb, tb, ta]


def test_connection_context_does_not_leak_to_another_connection(stack: Stack) -> None:
    """A Proxy-Authorization on one CONNECT does not identify a later, different tunnel."""
    a = "conn-a"
    stack.vault_put(a, stack.grant(a))
    port = stack.docs_url.rsplit(":", 1)[1]
    first = rawhttp.request(stack.proxy_url, connect=f"localhost:{port}",
                            host_header=f"localhost:{port}", path="/echo",
                            proxy_authorization=f"Bearer {stack.context(a)}",
                            ca_file=str(stack.mitm_ca))
    assert first.status == 200
    second = rawhttp.request(stack.proxy_url, connect=f"localhost:{port}",
                             host_header=f"localhost:{port}", path="/echo",
                             ca_file=str(stack.mitm_ca))
    assert second.status == 407


def test_isolation_under_load(stack: Stack) -> None:
    users = [f"load-{i:02d}" for i in range(USERS)]
    expected = {}
    for u in users:
        g = stack.grant(u)
        stack.vault_put(u, g)
        expected[u] = f"Bearer {g['access_token']}"
    contexts = {u: stack.context(u) for u in users}

    async def run() -> list[tuple[str, int, list[str]]]:
        limits = httpx2.Limits(max_connections=USERS * CONCURRENT_PER_USER,
                               max_keepalive_connections=USERS * CONCURRENT_PER_USER)
        async with httpx2.AsyncClient(proxy=stack.proxy_url, verify=stack.mitm_tls(),
                                      trust_env=False, timeout=120, limits=limits) as c:
            async def one(u: str, i: int) -> tuple[str, int, list[str]]:
                r = await c.get(f"{stack.docs_url}/echo/{u}/{i}",
                                headers={"X-User-Context": contexts[u]})
                return u, r.status_code, _auth(r.json()["headers"])

            # Interleave users so concurrent requests on the proxy belong to different users.
            return await asyncio.gather(*[one(u, i) for i in range(CONCURRENT_PER_USER)
                                          for u in users])

    start = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - start
    assert len(results) == USERS * CONCURRENT_PER_USER
    wrong = [(u, s, a) for u, s, a in results if s != 200 or a != [expected[u]]]
    assert wrong == [], f"{len(wrong)} requests saw a wrong or missing token"
    print(f"{len(results)} requests, {USERS} users, {elapsed:.1f}s")
