"""The scriptable OAuth fake (:mod:`tests.proxy.oauthfake`) behind real TLS, reachable under
any host name: a test CA (:mod:`devstack.certs`) signs one certificate for the names a test
uses, and :class:`ResolveAll` is the client's "DNS": every name connects to the fake's
loopback port, while the TLS handshake (SNI, certificate check) and the Host header keep
the name the client asked for. What the fake records (``Seen.headers["host"]``) is where a
real client would have gone."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx2
from aiohttp import web

from devstack.certs import make_ca, make_leaf
from tests.proxy.oauthfake import FakeOAuth


class ResolveAll(httpx2.AsyncBaseTransport):
    """A transport that sends every request to ``127.0.0.1:port`` as if DNS had answered
    that for its host: TLS is verified against the requested name (``sni_hostname``) and the
    Host header is the requested authority. One pool per requested authority, so no TLS
    connection made for one name is reused for another."""

    def __init__(self, port: int, verify: ssl.SSLContext) -> None:
        self._port = port
        self._verify = verify
        self._pools: dict[str, httpx2.AsyncHTTPTransport] = {}

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        authority = url.netloc.decode("ascii")
        pool = self._pools.get(authority)
        if pool is None:
            pool = self._pools[authority] = httpx2.AsyncHTTPTransport(verify=self._verify,
                                                                      retries=0)
        request.headers["Host"] = authority
        request.url = url.copy_with(host="127.0.0.1", port=self._port)
        request.extensions = {**request.extensions, "sni_hostname": url.host}
        return await pool.handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()


@dataclass
class TlsFake:
    fake: FakeOAuth
    port: int
    client_tls: ssl.SSLContext  # trusts the test CA only

    def transport(self) -> ResolveAll:
        return ResolveAll(self.port, self.client_tls)


async def serve_tls(directory: Path, names: Sequence[str]) -> AsyncIterator[TlsFake]:
    """Run a :class:`FakeOAuth` over TLS on 127.0.0.1 with a certificate for ``names``
    (wildcards allowed) until the generator ends."""
    ca = make_ca(directory)
    cert, key = make_leaf(ca, list(names), directory)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(ca.cert_path))
    fake = FakeOAuth()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
    await site.start()
    server = site._server
    assert server is not None
    port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
    fake.base = f"https://127.0.0.1:{port}"
    try:
        yield TlsFake(fake, port, client_tls)
    finally:
        await runner.cleanup()
