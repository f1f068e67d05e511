"""The loopback server that answers the requests credproxy refuses before their body.

mitmproxy cannot answer a request from ``requestheaders`` once the request body streams
(``stream_large_bodies``): the HTTP layer marks the body for streaming before the hook runs,
and a ``flow.response`` set there makes ``start_request_stream`` raise NotImplementedError
("Can't set a response and enable streaming at the same time"), after which every body
chunk crashes the connection again (mitmproxy/proxy/layers/http/__init__.py). A streamed
request always goes to a server, so a refused request is rerouted here instead:

* its headers are replaced by a bare chunked request for a one-time random path on this
  server (127.0.0.1, an ephemeral port, plain HTTP), and its host, port and scheme point
  here. mitmproxy opens the upstream connection only now (``connection_strategy: lazy``),
  so the original destination is never contacted;
* its body is dropped inside mitmproxy chunk by chunk (``flow.request.stream`` is a
  function that returns nothing), so memory stays flat whatever the upload's size and
  nothing of it is written anywhere;
* once the client has sent its last byte, this server answers with the registered problem
  response, byte for byte what mitmproxy would have sent for a small refused request.

Every refusal takes this path, small or large, so there is one way a refusal leaves the
proxy. The server keeps connections alive (mitmproxy reuses its upstream connections) and
answers nothing but registered paths.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets

from mitmproxy import http
from mitmproxy.net.http.http1 import assemble_response, assemble_response_head

log = logging.getLogger("credproxy.sink")

_HEAD_LIMIT = 64 * 1024
_CHUNK = 64 * 1024
_NOT_FOUND = (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n"
              b"connection: close\r\n\r\n")
# Request headers mitmproxy itself still reads from the client's request after the hook:
# Connection (keep-alive towards the client) and Expect (it answers 100-continue).
_KEEP = frozenset({"connection", "expect"})
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _drop(_chunk: bytes) -> list[bytes]:
    return []


class RefusalSink:
    """Answers rerouted refusals; one per addon, started on first use."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._start = asyncio.Lock()
        self._pending: dict[str, http.Response] = {}
        # flow id -> its one-time path (in the sink's own map: flow.metadata is snapshotted
        # by other addons).
        self._keys: dict[str, str] = {}
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def reroute(self, flow: http.HTTPFlow, response: http.Response) -> None:
        """Send ``flow`` to this server, which answers it with ``response``."""
        async with self._start:
            if self._server is None:
                self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0,
                                                          limit=_HEAD_LIMIT)
        key = secrets.token_urlsafe(24)
        self._pending[key] = response
        self._keys[flow.id] = key
        req = flow.request
        kept = [(k, v) for k, v in req.headers.fields
                if k.decode("latin-1").lower() in _KEEP and not _CONTROL.search(v)]
        req.headers = http.Headers(kept)
        # Origin-form towards the sink, whatever form the client used (an absolute-form
        # target inside a tunnel keeps its authority in mitmproxy).
        req.authority = ""
        req.scheme, req.host, req.port = "http", "127.0.0.1", self.port
        if not _METHOD.fullmatch(req.method):
            req.method = "POST"  # a refused request's method may be anything (HTTP/2)
        req.headers["Host"] = f"127.0.0.1:{self.port}"
        req.headers["Transfer-Encoding"] = "chunked"
        req.path = f"/{key}"
        req.stream = _drop

    def answer_for(self, flow: http.HTTPFlow) -> http.Response | None:
        """The problem response registered for ``flow``, if it was rerouted here."""
        key = self._keys.get(flow.id)
        return self._pending.get(key) if key is not None else None

    def forget(self, flow: http.HTTPFlow) -> bool:
        """The flow ended (answered, or the client went away): drop its registration.
        Returns whether the flow was one of the sink's."""
        key = self._keys.pop(flow.id, None)
        if key is not None:
            self._pending.pop(key, None)
        return key is not None

    async def aclose(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, *_ = head.split(b"\r\n", 1)[0].split(b" ")
                response = self._pending.pop(target.decode("ascii", "replace")[1:], None)
                if response is None or b"transfer-encoding: chunked" not in head.lower():
                    writer.write(_NOT_FOUND)
                    await writer.drain()
                    return
                await _discard_chunked(reader)
                writer.write(assemble_response_head(response) if method == b"HEAD"
                             else assemble_response(response))
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError) as exc:
            # mitmproxy closed the connection (its client went away, or it is done with
            # it): nothing to answer. The exception names no request data.
            log.debug("refusal sink connection ended: %s", type(exc).__name__)
        finally:
            self._writers.discard(writer)
            writer.close()


async def _discard_chunked(reader: asyncio.StreamReader) -> None:
    """Read a chunked body to its end without keeping any of it."""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return
        while size:
            data = await reader.read(min(size, _CHUNK))
            if not data:
                raise asyncio.IncompleteReadError(b"", size)
            size -= len(data)
        await reader.readexactly(2)
