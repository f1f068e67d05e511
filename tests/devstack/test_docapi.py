"""The document API, behind real TLS, validating tokens at the real authorization server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import httpx2
import pytest

from devstack._serve import raise_fd_limit
from devstack.docapi import large_body_sha256

from ._helpers import grant
from ._stack import DevStack

pytestmark = pytest.mark.integration


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_documents_per_user(stack: DevStack, http: httpx2.Client) -> None:
    url = f"{stack.docapi.url}/documents"
    a = http.get(url, headers=bearer(grant(stack, "alice")["access_token"]))
    b = http.get(url, headers=bearer(grant(stack, "bob")["access_token"]))
    assert a.status_code == b.status_code == 200
    assert a.json()["user"] == "alice" and b.json()["user"] == "bob"
    ids_a = {d["id"] for d in a.json()["documents"]}
    ids_b = {d["id"] for d in b.json()["documents"]}
    assert ids_a == {"doc-1", "doc-2"}
    assert ids_b == {"doc-3", "doc-4"}
    nobody = http.get(url, headers=bearer(grant(stack, "mallory")["access_token"]))
    assert nobody.json() == {"user": "mallory", "documents": []}


def test_documents_rejects_bad_tokens(stack: DevStack, http: httpx2.Client) -> None:
    url = f"{stack.docapi.url}/documents"
    r = http.get(url)
    assert r.status_code == 401
    assert "error=" not in r.headers["www-authenticate"]  # RFC 6750 3.1: no credentials
    for token in ("at_not-a-real-token", grant(stack, "alice")["refresh_token"],
                  grant(stack, "alice", access_expires_in=-10)["access_token"]):
        r = http.get(url, headers=bearer(token))
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert r.json()["error"] == "invalid_token"


def test_revocation_seen_within_cache_ttl(stack: DevStack, http: httpx2.Client) -> None:
    tok = grant(stack, "alice")["access_token"]
    url = f"{stack.docapi.url}/documents"
    assert http.get(url, headers=bearer(tok)).status_code == 200
    stack.admin("POST", "/_admin/revoke", {"access_token": tok})
    deadline = time.monotonic() + 3.0  # cache TTL is 1 s
    while (r := http.get(url, headers=bearer(tok))).status_code == 200:
        assert time.monotonic() < deadline, "revocation not seen"
        time.sleep(0.1)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_echo_reports_exactly_what_arrived(stack: DevStack, http: httpx2.Client) -> None:
    body = os.urandom(1000)
    headers = [
        ("X-Dup", "one"),
        ("x-other", "z"),
        ("X-Dup", "two"),
        ("X_Under", "kept"),  # WSGI would drop this one
        ("Authorization", "Bearer agent-supplied"),
    ]
    r = http.post(f"{stack.docapi.url}/echo/a/b%2Fc?x=1&x=2&y=%20", headers=headers,
                  content=body)
    e = r.json()
    assert e["method"] == "POST"
    assert e["path"] == "/echo/a/b%2Fc"
    assert e["query"] == "x=1&x=2&y=%20"
    assert e["body_length"] == 1000
    assert e["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert e["tls"] is True
    got = [tuple(h) for h in e["headers"]]
    custom = [h for h in got if h[0].lower() in {"x-dup", "x-other", "x_under", "authorization"}]
    assert custom == headers
    assert ("Content-Length", "1000") in got
    assert http.delete(f"{stack.docapi.url}/echo").json()["method"] == "DELETE"


def test_status(stack: DevStack, http: httpx2.Client) -> None:
    r = http.get(f"{stack.docapi.url}/status/401")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert http.get(f"{stack.docapi.url}/status/503").status_code == 503
    assert http.get(f"{stack.docapi.url}/status/204").status_code == 204


def test_large_download_streams(stack: DevStack, http: httpx2.Client) -> None:
    n = 32 * 1024 * 1024 + 7
    h = hashlib.sha256()
    got = 0
    with http.stream("GET", f"{stack.docapi.url}/large", params={"bytes": n}) as r:
        assert r.status_code == 200
        assert r.headers["content-length"] == str(n)
        for chunk in r.iter_bytes():
            h.update(chunk)
            got += len(chunk)
    assert got == n
    assert h.hexdigest() == large_body_sha256(n)


def test_upload_streams(stack: DevStack, http: httpx2.Client) -> None:
    block = os.urandom(1 << 20)
    expected = hashlib.sha256(block * 24).hexdigest()

    def gen():  # no Content-Length: sent chunked
        for _ in range(24):
            yield block

    r = http.post(f"{stack.docapi.url}/upload", content=gen())
    assert r.json() == {"bytes": 24 << 20, "sha256": expected}
    r = http.put(f"{stack.docapi.url}/upload", content=block)
    assert r.json() == {"bytes": 1 << 20, "sha256": hashlib.sha256(block).hexdigest()}


async def test_many_concurrent_keepalive_connections(stack: DevStack) -> None:
    """A thousand simultaneous TLS connections, each reused for a second request."""
    # Both ends hold one descriptor per connection; shrink the test where the limit is low.
    conns = min(1000, (raise_fd_limit() - 200) // 2 // 2 * 2)
    tokens = [grant(stack, u)["access_token"] for u in ("alice", "bob")]
    limits = httpx2.Limits(max_connections=conns, max_keepalive_connections=conns)
    async with httpx2.AsyncClient(verify=stack.ssl_context(), limits=limits,
                                  timeout=30.0) as c:

        async def one(i: int) -> str:
            r = await c.get(f"{stack.docapi.url}/documents", headers=bearer(tokens[i % 2]))
            assert r.status_code == 200, r.text
            return str(r.json()["user"])

        for _ in range(2):  # the second round reuses the pooled connections
            users = await asyncio.gather(*[one(i) for i in range(conns)])
            assert users.count("alice") == users.count("bob") == conns // 2
