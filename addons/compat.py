"""Corrections to mitmproxy 12's HTTP layers that credproxy depends on for safety.

Applied once by :func:`install` when the addon module is imported (``credproxy run`` and
``mitmdump -s addons/credproxy.py`` alike). Each one replaces a mitmproxy behaviour that
would otherwise forward bytes no decision covered, hang an exchange, or answer the agent in
another format than every other refusal:

1. **Framing an HTTP/2 request body for an HTTP/1 server.** mitmproxy converts an HTTP/2
   request for an HTTP/1 upstream but sends a body of unknown length (no ``content-length``,
   legal in HTTP/2: RFC 9113 section 8.1.1) as raw bytes, with no framing. The HTTP/1 server
   then parses that body as further requests on the same connection: requests no decision
   saw (reproduced: ``POST /x ... Content-Length: 400`` inside the body was served). Such a
   body is now sent with ``Transfer-Encoding: chunked`` (RFC 9112 section 7.1).
2. **Trailer sections.** mitmproxy's HTTP/1 reader raises NotImplementedError on a chunked
   message with trailer fields (``0\\r\\nX-Checksum: abc\\r\\n\\r\\n``); the exchange
   then hangs until the client gives up and the flow never ends. A request with trailers is
   now answered at once with 400 ``malformed-request`` and the connection closed. An HTTP/1
   upstream's response trailers are dropped and the response ends normally (its head and
   body have streamed to the agent by then; RFC 9110 section 6.5.1 lets a recipient discard
   trailer fields). An HTTP/2 request whose body streams upstream (unknown length) and then
   ends in a trailer section is aborted towards the upstream (the upstream never gets a
   complete request) and answered 400 like the HTTP/1 one: no decision covered those
   fields. HTTP/2 response trailers (gRPC's ``grpc-status``) are forwarded by mitmproxy.
3. **Strict chunked framing** (:class:`_StrictChunkedReader`): h11's reader waits for ever
   on a chunk-size line ended by a bare LF, and accepts sizes a 64-bit next hop reads
   differently; both are refused, and a client whose body framing is refused gets a 400
   problem instead of a silent close.
4. **Error responses.** mitmproxy answers a failed upstream connection, an unparseable
   request and the cases above with an HTML page signed ``Server: mitmproxy``. Every such
   answer, HTTP/1 or HTTP/2, is now an RFC 9457 problem like every other refusal, with
   ``X-Credproxy-Error``; on HTTP/1 also with the request id, which the addon registers from
   its ``error`` hook (:func:`register_request`; HTTP/2 multiplexes, so there the id is in
   the log line only).
5. **Interim and switching responses** from an HTTP/1 upstream: mitmproxy takes a 1xx
   (``103 Early Hints``, ``102``, an unasked ``100``) for the final response, so the agent
   never gets the real one; they are dropped. (RFC 9110 section 15.2 has a proxy forward
   1xx responses; mitmproxy 12 cannot forward an interim response at all, and taking it for
   the final one is worse.) A ``101`` to anything but
   WebSocket would make mitmproxy relay raw bytes no decision covers; it ends the exchange
   with 502 ``upstream-unreachable`` and closes that upstream connection.
6. **Why a flow failed.** mitmproxy's own classification of a failure (``ErrorCode``) is kept
   for the addon's ``error`` hook (:func:`failure_reason`), so the audit record says what
   happened (``upstream_unreachable``, ``client_protocol_error``, ...).
7. **An answer set before the body goes out at once.** mitmproxy sends ``100 Continue``
   after ``requestheaders`` whatever the hook decided, then either reads a whole request body
   into memory before sending an answer the hook set, or (a body it streams) raises
   NotImplementedError. A response set in ``requestheaders`` (every credproxy refusal) is
   now sent at once, with no ``100 Continue``, no upstream connection, and the body never
   read into memory (:func:`_answer_at_once`). A body still to come is not waited for:
   over HTTP/1, when it is large (over 64 KiB), of unknown length (chunked) or held back by
   ``Expect: 100-continue``, the answer says ``Connection: close`` and the proxy discards
   what the client still sends for at most :data:`LINGER_SECONDS` before closing (so the
   answer is not lost to a TCP reset while the client is still writing: RFC 9112 section
   9.6); a small body is read and discarded and the connection kept. Over HTTP/2 the
   complete answer is followed by ``RST_STREAM(NO_ERROR)`` (RFC 9113 section 8.1).
8. **A response replaced at its head goes out at once.** mitmproxy reads the upstream's
   whole body into a response an addon put in place of the upstream's in
   ``responseheaders`` (overwriting its body), or streams into it until the upstream's body
   ends. The replacement is now sent complete at once (:func:`_send_replacement`), and the
   upstream's body is never read: its exchange is cancelled (HTTP/2 ``RST_STREAM``; HTTP/1
   closes that connection), so an endless or slow 401 body holds nothing open.
9. **HTTP/2 agents: backpressure and concurrency.** mitmproxy buffers what an HTTP/2 agent
   cannot take yet (its flow-control window is exhausted) without bound while it keeps
   reading the upstream: an agent that stops reading an endless stream grew the proxy by
   about 32 MiB/s. The proxy now stops reading an upstream connection while more than
   :data:`H2_STREAM_BACKLOG` waits for the agent on a stream that connection feeds (or
   :data:`H2_BACKLOG_LIMIT` on the agent's whole connection), as TCP does for HTTP/1; the
   agent's other streams go on. mitmproxy opens at most five connections to one upstream
   per agent connection, so an HTTP/2 agent's sixth stream to an HTTP/1 provider waited for
   one of five endless streams to end; the limit is now :data:`UPSTREAM_CONNECTIONS`, the
   number of streams an HTTP/2 agent may open at once. And an upstream connection whose
   read loop mitmproxy cancels twice (an HTTP/2 agent leaving with several streams open)
   was never closed; it is now (:func:`_close_transport`).
10. **Refusals in gRPC.** mitmproxy's own error answers (an upstream that cannot be reached)
   to a gRPC request are a gRPC status (:func:`proxy.problems.grpc_response`), like every
   other refusal.
11. **Killing an exchange in transit.** mitmproxy honours ``flow.kill()`` only at its hooks,
   never while a body streams (mitmproxy issue 4711): a killed stream went on to its end.
   A killed flow is now cut at the next piece of either body that arrives (the request's
   upload or the response's stream): the upstream's exchange is aborted (HTTP/2
   ``RST_STREAM``, HTTP/1 closes that connection) and the agent's stream is reset, with
   mitmproxy's error hook. The kill switch uses it (``credproxy suspend``): nothing of a
   suspended exchange passes after the suspension reached the proxy.

:func:`http_layer_for` and :func:`intercept_layer` build the layers the addon's
``next_layer`` hook substitutes for a raw TCP relay or a tunnel that would bypass a decision.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
import weakref
from collections.abc import Generator
from dataclasses import dataclass
from types import MethodType
from typing import Any

import h2.errors
import h11
from h11._events import Data, EndOfMessage
from h11._readers import ChunkedReader
from h11._receivebuffer import ReceiveBuffer
from mitmproxy import flow as flow_module
from mitmproxy import http
from mitmproxy.connection import Connection, ConnectionState
from mitmproxy.net.http import http1
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layers, server
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layer import Layer
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http import _http1, _http2
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import (
    ErrorCode,
    HttpEvent,
    RequestHeaders,
    RequestProtocolError,
    RequestTrailers,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._hooks import HttpResponseHeadersHook
from mitmproxy.proxy.layers.http._http_h2 import BufferedH2Connection

from proxy.errors import InternalError, MalformedRequest, ProxyRefusal, UpstreamUnreachable
from proxy.headers import is_websocket_upgrade
from proxy.problems import is_grpc, refusal_response

log = logging.getLogger("credproxy")

_installed = False
# Request ids the addon's error hook registered, by client connection id, for the next error
# response on that HTTP/1 connection (one exchange at a time on HTTP/1).
_pending: dict[str, str] = {}
# mitmproxy's ErrorCode for each flow it ends with an error, by flow id, until the addon's
# error hook reads it (failure_reason).
_codes: dict[str, ErrorCode] = {}
# A client connection this module refused (a trailer section): the cause of whatever error
# mitmproxy reports next for its flow (closing the client also aborts a server connection
# still being opened, which mitmproxy would report as a connect failure).
_client_faults: dict[str, ErrorCode] = {}

# gRPC requests in flight, (client connection id, stream id) -> their content type: a
# mitmproxy error answer on that stream is a gRPC status (item 10).
_grpc: dict[tuple[str, int], str] = {}

# Per HTTP stream, from its request head: (end_stream, Expect: 100-continue), for item 7.
_heads: weakref.WeakKeyDictionary[http_layer.HttpStream, tuple[bool, bool]] = \
    weakref.WeakKeyDictionary()

_CommandGenerator = Generator[Any, Any, None]

# Item 7: a refused HTTP/1 request body larger than this (or of unknown length, or behind
# Expect: 100-continue) is not read; the connection closes after the answer.
SMALL_BODY = 64 * 1024
# How long a closing HTTP/1 connection keeps discarding what the client still sends after
# the answer, before it closes (a client that writes its whole body before it reads the
# answer gets it meanwhile; one that reads early has closed already).
LINGER_SECONDS = 5.0


# Item 9: bytes waiting for an HTTP/2 agent on one stream, or on its whole connection,
# beyond which the upstream connections feeding it are not read; and connections to one
# upstream per agent connection (h2's default SETTINGS_MAX_CONCURRENT_STREAMS, which
# mitmproxy advertises).
H2_STREAM_BACKLOG = 1024 * 1024
H2_BACKLOG_LIMIT = 16 * 1024 * 1024
UPSTREAM_CONNECTIONS = 100
# Per agent connection id: its HTTP/2 connection state (send buffers), for item 9.
_h2_agents: dict[str, weakref.WeakSet[BufferedH2Connection]] = {}
# Per upstream connection id: the agent streams it feeds now, (agent connection id, stream).
_feeds: dict[str, set[tuple[str, int]]] = {}
# The connection whose bytes the current task reads (mitmproxy reads each in its own loop).
_reading: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
    "credproxy_reading", default=None)


def _congested(client_id: str, upstream_id: str) -> bool:
    """Whether the upstream connection ``upstream_id`` must wait for the agent (item 9):
    the bytes mitmproxy holds for the agent connection ``client_id`` until its HTTP/2
    flow-control window opens, on the streams that upstream feeds or on all of them, are
    over their bound. One pass over the send buffers."""
    if client_id not in _h2_agents:
        return False
    streams = _feeds.get(upstream_id, set())
    fed = total = 0
    for conn in list(_h2_agents[client_id]):
        for stream_id, buffer in list(conn.stream_buffers.items()):
            size = sum(len(chunk.data) for chunk in buffer)
            total += size
            if (client_id, stream_id) in streams:
                fed += size
    return fed > H2_STREAM_BACKLOG or total > H2_BACKLOG_LIMIT


def _close_transport(handler: server.ConnectionHandler, connection: Connection) -> None:
    """What mitmproxy's read loop does last, for one a second cancellation cut short
    (item 9): close the socket and forget it."""
    io = handler.transports.get(connection)
    if io is None:
        return
    connection.state = ConnectionState.CLOSED
    if io.writer is not None:
        try:
            io.writer.close()
        except OSError:
            pass
    handler.transports.pop(connection, None)


@dataclass
class StopReading(HttpEvent):
    """To a client connection layer: the answer on this stream is complete; stop the client
    sending the rest of its request (HTTP/2: RST_STREAM NO_ERROR; HTTP/1: linger, close)."""


def register_request(client_id: str, request_id: str) -> None:
    """Name ``request_id`` in the next mitmproxy error answer on client connection
    ``client_id`` (the addon calls this from its ``error`` hook, which runs first)."""
    _pending[client_id] = request_id


def forget(client_id: str) -> None:
    # (_client_faults is consumed by failure_reason: mitmproxy may report the client's
    # disconnect before the flow's error.)
    _pending.pop(client_id, None)
    _h2_agents.pop(client_id, None)


def failure_reason(flow_id: str, client_id: str, default: str = "exchange_failed") -> str:
    """Why mitmproxy ended flow ``flow_id`` (on client connection ``client_id``) with an
    error, as a reason slug: a client fault this module refused first, else mitmproxy's own
    classification (``ErrorCode``), mapped by :func:`refusal_for`, or
    ``client_disconnected``; ``default`` when nothing was recorded. Consumed: call it
    once, from the ``error`` hook (or ``client_disconnected``, which may come first: a
    client that closes once it has the refusal of a request with trailers)."""
    code = _client_faults.pop(client_id, None) or _codes.pop(flow_id, None)
    _codes.pop(flow_id, None)
    if code in (ErrorCode.CLIENT_DISCONNECTED, ErrorCode.CANCEL):
        return "client_disconnected"
    return refusal_for(code).reason if code is not None else default


def http_layer_for(context: Context) -> Layer:
    """The layer that reads a connection's bytes as HTTP (mitmproxy's transparent HTTP
    layer inside a tunnel): bytes that are not HTTP get a 400 problem, never a relay."""
    return layers.HttpLayer(context, http_layer.HTTPMode.transparent)


def intercept_layer(context: Context, data_client: bytes) -> Layer:
    """The layers mitmproxy's NextLayer builds for an intercepted tunnel (its steps 3a and
    5: TLS when the client starts TLS, else HTTP), for a connection it would have left
    alone."""
    if starts_like_tls_record(data_client):
        server_tls = layers.ServerTLSLayer(context)
        server_tls.child_layer = layers.ClientTLSLayer(context)
        return server_tls
    return http_layer_for(context)


def refusal_for(code: ErrorCode) -> ProxyRefusal:
    """The problem that stands for one of mitmproxy's protocol errors (its message, which
    may name hosts and addresses, goes to the log, not to the agent)."""
    if code is ErrorCode.CONNECT_FAILED:
        return UpstreamUnreachable("the destination could not be reached (DNS, connect or "
                                   "TLS failed); nothing was sent", reason="upstream_unreachable")
    if code in (ErrorCode.GENERIC_SERVER_ERROR, ErrorCode.RESPONSE_TOO_LARGE,
                ErrorCode.RESPONSE_VALIDATION_FAILED):
        return UpstreamUnreachable("the destination closed the connection or answered with "
                                   "HTTP credproxy cannot forward",
                                   reason="upstream_protocol_error")
    if code in (ErrorCode.GENERIC_CLIENT_ERROR, ErrorCode.REQUEST_VALIDATION_FAILED,
                ErrorCode.DESTINATION_UNKNOWN, ErrorCode.REQUEST_TOO_LARGE):
        return MalformedRequest("the request is not HTTP credproxy can forward; nothing was "
                                "forwarded", reason="client_protocol_error")
    return InternalError("the exchange failed inside the proxy", reason="internal_error")


def problem_bytes(refusal: ProxyRefusal, request_id: str | None = None,
                  content_type: str = "") -> bytes:
    p = refusal_response(refusal, request_id=request_id, content_type=content_type)
    response = http.Response.make(p.status, p.body, {**p.headers, "Connection": "close"})
    return bytes(http1.assemble_response(response))


def _error_response(status_code: int, message: str = "") -> bytes:
    # mitmproxy's own answer to a request it could not parse (read_headers): the message
    # names the parse error, never a header value.
    log.info("refused a request mitmproxy could not parse (%d): %s", status_code, message)
    return problem_bytes(MalformedRequest("the request is not well-formed HTTP/1.1; nothing "
                                          "was forwarded", reason="client_protocol_error"))


def _answer_client(self: _http1.Http1Server, refusal: MalformedRequest) -> _CommandGenerator:
    """Answer the client with ``refusal``, and make its fault the reason of the failure
    mitmproxy reports next for this connection (:func:`failure_reason`)."""
    _client_faults[self.conn.id] = ErrorCode.GENERIC_CLIENT_ERROR
    yield commands.SendData(self.conn, problem_bytes(refusal))


def _peek(buf: ReceiveBuffer, size: int) -> bytes:
    """The first ``size`` bytes waiting in an h11 buffer, left in place, without copying
    the rest (h11 has no public peek; it keeps the bytes in ``_data``)."""
    return bytes(buf._data[:size])


def _refuse_trailers(self: _http1.Http1Connection) -> _CommandGenerator:
    assert self.stream_id is not None
    if isinstance(self, _http1.Http1Server):
        yield from _answer_client(self, MalformedRequest(
            "the request carries a trailer section, which credproxy does not forward over "
            "HTTP/1; send the fields as headers", reason="trailers"))
        yield commands.CloseConnection(self.conn)
        yield ReceiveHttp(RequestProtocolError(self.stream_id, "request trailers refused",
                                               ErrorCode.GENERIC_CLIENT_ERROR))
    else:
        # The body has streamed to the agent already: end the response as the original
        # reader would have, without the trailer fields.
        log.info("dropped the trailer section of an HTTP/1 upstream response (stream %d)",
                 self.stream_id)
        yield ReceiveHttp(ResponseEndOfMessage(self.stream_id))
        yield from self.mark_done(response=True)


# A chunk-size line longer than this without CRLF is refused (h11 would wait for ever).
_MAX_CHUNK_LINE = 4096
# Chunk sizes at or above 2**63 overflow a signed 64-bit parser: a next hop would read
# another size than the proxy did (request smuggling).
_MAX_CHUNK_SIZE = 2**63


class _StrictChunkedReader(ChunkedReader):
    """h11's chunked reader, refusing what it would otherwise wait on for ever or read
    differently from a next hop: a chunk-size line ended by a bare LF (RFC 9112 section
    7.1 requires CRLF) or longer than 4 KiB, and a size that overflows 64-bit parsers."""

    def __call__(self, buf: ReceiveBuffer) -> Data | EndOfMessage | None:
        if (self._bytes_in_chunk == 0 and not self._bytes_to_discard
                and not self._reading_trailer and len(buf)):
            head = _peek(buf, _MAX_CHUNK_LINE)
            end = head.find(b"\r\n")
            line = head if end < 0 else head[:end]
            if b"\n" in line or b"\r" in line:
                raise h11.RemoteProtocolError("chunk-size line ended by a bare LF or CR")
            if end < 0 and len(head) >= _MAX_CHUNK_LINE:
                raise h11.RemoteProtocolError("chunk-size line too long")
            size = line.split(b";", 1)[0].strip()
            if end >= 0 and size and all(c in b"0123456789abcdefABCDEF" for c in size) \
                    and int(size, 16) >= _MAX_CHUNK_SIZE:
                raise h11.RemoteProtocolError("chunk size overflows 64 bits")
        return super().__call__(buf)


def _complete_head(data: bytes) -> tuple[int, list[tuple[bytes, bytes]]] | None:
    """(status, fields) of the complete response head at the start of ``data``, if any."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or not data.startswith(b"HTTP/1."):
        return None
    lines = data[:end].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    fields = [(n.strip(), v.strip()) for n, _, v in (ln.partition(b":") for ln in lines[1:])]
    return int(parts[1]), fields


def _make_body_reader(expected_size: int | None) -> Any:
    return _StrictChunkedReader() if expected_size is None else \
        _original_make_body_reader(expected_size)


_original_make_body_reader = _http1.make_body_reader


def _answer_at_once(self: http_layer.HttpStream, end_stream: bool,
                    expect_continue: bool) -> _CommandGenerator:
    """Send the response an addon set in ``requestheaders`` now (item 7): the
    ``responseheaders`` and ``response`` hooks run as for any answer, nothing is sent
    upstream, and the request body is never read into the flow."""
    flow = self.flow
    assert flow.response is not None
    request = flow.request
    h1 = not (request.is_http2 or request.is_http3)
    try:
        declared = http1.expected_http_body_size(request) if h1 else None
    except ValueError:
        declared = None
    stop = not end_stream and (not h1 or expect_continue or declared is None
                               or declared < 0 or declared > SMALL_BODY)
    flow.response.timestamp_start = time.time()
    yield HttpResponseHeadersHook(flow)
    if (yield from self.check_killed(True)):
        return
    yield from _send_now(self, stop_request=stop)


def _send_now(self: http_layer.HttpStream, stop_request: bool) -> _CommandGenerator:
    """Send ``flow.response`` complete and end the stream (items 7 and 8), whatever the
    request and the upstream still send. With ``stop_request`` the rest of the request body
    is not read: an HTTP/1 answer says ``Connection: close`` and the connection lingers
    (:func:`_linger`); HTTP/2 gets ``RST_STREAM(NO_ERROR)``. Without it, what the client
    still sends is dropped by the HTTP layer (no stream takes it)."""
    assert self.flow.response is not None
    request = self.flow.request
    if stop_request and not (request.is_http2 or request.is_http3):
        self.flow.response.headers["connection"] = "close"
    self.client_state = self.state_done  # so that the answer ends the stream
    yield from self.send_response()  # the response hook, the answer, end of stream
    # Events still queued for this stream (the rest of either body; HTTP/2 delivers the
    # request's end with its head) are consumed silently, never parsed or logged.
    self.client_state = self.server_state = self.state_errored
    if stop_request and not request.is_http3:
        yield http_layer.SendHttp(StopReading(self.stream_id), self.context.client)


def _forget_stream(stream: http_layer.HttpStream) -> None:
    """The stream ended (answered, or failed): drop its gRPC marker and its place among
    the streams its upstream connection feeds."""
    _grpc.pop((stream.context.client.id, stream.stream_id), None)
    streams = _feeds.get(stream.context.server.id)
    if streams is not None:
        streams.discard((stream.context.client.id, stream.stream_id))


def _send_replacement(self: http_layer.HttpStream, upstream_done: bool) -> _CommandGenerator:
    """Send the response an addon put in place of the upstream's in ``responseheaders``
    now (item 8), and stop the upstream's (and, if still coming, the client's) body."""
    if not upstream_done:
        yield http_layer.SendHttp(RequestProtocolError(
            self.stream_id, "the upstream's answer was replaced", ErrorCode.CANCEL),
            self.context.server)
    yield from _send_now(self, stop_request=self.client_state != self.state_done)


def _linger(self: _http1.Http1Server, event: events.Event) -> _CommandGenerator:
    """Connection state after an answer that said ``Connection: close`` while the request
    body was still coming: discard what arrives, close when the client does or after
    :data:`LINGER_SECONDS`."""
    if isinstance(event, events.DataReceived):
        self.buf = ReceiveBuffer()  # discarded: memory stays flat
        return
    if self.conn.state is not ConnectionState.CLOSED:
        yield commands.CloseConnection(self.conn)
    self.state = self.done


def _killed(stream: http_layer.HttpStream) -> bool:
    error = stream.flow.error
    return error is not None and error.msg == flow_module.Error.KILLED_MESSAGE


def _cut(stream: http_layer.HttpStream) -> _CommandGenerator:
    """Abort both sides of a killed exchange (item 11): the upstream's copy, then the
    agent's stream (mitmproxy's own kill handling: the error hook, a reset)."""
    if stream.server_state not in (stream.state_done, stream.state_errored):
        yield http_layer.SendHttp(RequestProtocolError(
            stream.stream_id, flow_module.Error.KILLED_MESSAGE, ErrorCode.KILL),
            stream.context.server)
    yield from stream.check_killed(True)


def install() -> None:
    """Apply the corrections (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True

    client_send = _http1.Http1Client.send

    def frame_unknown_length(self: _http1.Http1Client, event: Any) -> _CommandGenerator:
        if isinstance(event, RequestHeaders) and not event.end_stream:
            request = event.request
            if ((request.is_http2 or request.is_http3) and "content-length" not in request.headers
                    and "transfer-encoding" not in request.headers):
                # Http1Client chunk-encodes the body when the request says chunked.
                request.headers["transfer-encoding"] = "chunked"
        yield from client_send(self, event)

    _http1.Http1Client.send = frame_unknown_length  # type: ignore[method-assign]

    read_body = _http1.Http1Connection.read_body

    def read_body_strictly(self: _http1.Http1Connection, event: Any) -> _CommandGenerator:
        inner = read_body(self, event)
        answered = False
        value: Any = None
        while True:
            try:
                command = inner.send(value)
            except StopIteration:
                return
            except NotImplementedError:  # "HTTP trailers are not implemented yet."
                yield from _refuse_trailers(self)
                return
            if (isinstance(self, _http1.Http1Server) and not answered
                    and isinstance(command, commands.CloseConnection)
                    and command.connection is self.conn and self.response is None):
                # mitmproxy closes a client whose body framing h11 refused (a bare LF, a
                # bad chunk size, more data than the chunk said) without a word: answer first.
                answered = True
                yield from _answer_client(self, MalformedRequest(
                    "the request body's framing is malformed (chunked encoding, RFC 9112 "
                    "section 7.1); nothing more was forwarded", reason="bad_framing"))
            value = yield command

    _http1.Http1Connection.read_body = read_body_strictly  # type: ignore[method-assign]
    _http1.make_body_reader = _make_body_reader

    client_read_headers = _http1.Http1Client.read_headers

    def read_response_head(self: _http1.Http1Client, event: Any) -> _CommandGenerator:
        # Looked at before mitmproxy parses the head: interim (1xx) answers, which it would
        # take for the final response (the real one then never reaches the agent), are
        # dropped (mitmproxy cannot forward them); a 101 to anything but WebSocket, after
        # which mitmproxy would relay raw bytes no decision covers, ends the exchange.
        while _peek(self.buf, 10)[:7] == b"HTTP/1." and _peek(self.buf, 10)[9:10] == b"1":
            head = _complete_head(bytes(self.buf))  # a 1xx head: rare, read it whole
            if head is None:
                break
            status, fields = head
            if 100 <= status < 200 and status != 101:
                self.buf.maybe_extract_lines()
                continue
            if status == 101 and not is_websocket_upgrade(status, fields):
                assert self.stream_id is not None
                yield commands.CloseConnection(self.conn)
                yield ReceiveHttp(ResponseProtocolError(
                    self.stream_id, "the upstream switched to a protocol credproxy does not "
                    "read (only WebSocket)", ErrorCode.GENERIC_SERVER_ERROR))
                return
            break
        yield from client_read_headers(self, event)

    _http1.Http1Client.read_headers = read_response_head  # type: ignore[method-assign]

    server_read_headers = _http1.Http1Server.read_headers

    def skip_leading_empty_lines(self: _http1.Http1Server, event: Any) -> _CommandGenerator:
        # RFC 9112 section 2.2: a server SHOULD ignore at least one empty line (CRLF)
        # received before the request-line. h11's buffer returns such a line as an empty
        # head, which mitmproxy then waits on for ever.
        while _peek(self.buf, 2) == b"\r\n":
            self.buf.maybe_extract_next_line()
        yield from server_read_headers(self, event)

    _http1.Http1Server.read_headers = skip_leading_empty_lines  # type: ignore[method-assign]

    server_send = _http1.Http1Server.send

    def problem_errors(self: _http1.Http1Server, event: Any) -> _CommandGenerator:
        if isinstance(event, StopReading):
            if not self.request_done and self.conn.state is not ConnectionState.CLOSED:
                self.state = MethodType(_linger, self)
                self.buf = ReceiveBuffer()
                yield commands.RequestWakeup(LINGER_SECONDS)
            return
        if isinstance(event, ResponseProtocolError):
            request_id = _pending.pop(self.conn.id, None)
            content_type = _grpc.pop((self.conn.id, event.stream_id), "")
            if not self.conn.state & ConnectionState.CAN_WRITE:
                return
            if not self.response and event.code.http_status_code() is not None:
                log.info("request %s failed: %s", request_id or "-", event.message)
                yield commands.SendData(
                    self.conn, problem_bytes(refusal_for(event.code), request_id,
                                             content_type))
            yield commands.CloseConnection(self.conn)
            return
        yield from server_send(self, event)

    _http1.Http1Server.send = problem_errors  # type: ignore[method-assign]
    _http1.make_error_response = _error_response

    handle_protocol_error = http_layer.HttpStream.handle_protocol_error

    def remember_code(self: http_layer.HttpStream, event: Any) -> _CommandGenerator:
        if getattr(self, "flow", None) is not None:
            _codes[self.flow.id] = event.code
        yield from handle_protocol_error(self, event)
        _codes.pop(self.flow.id, None)  # the error hook has run (or was not needed)
        _forget_stream(self)  # answered (or no answer needed)

    http_layer.HttpStream.handle_protocol_error = remember_code  # type: ignore[method-assign]

    check_killed = http_layer.HttpStream.check_killed

    def remember_queued_code(self: http_layer.HttpStream,
                             emit_error_hook: bool) -> Generator[Any, Any, bool]:
        # A client error that arrived while a hook ran is found here, in the paused queue,
        # and ends the flow without handle_protocol_error.
        queued = next((e for e in self._paused_event_queue
                       if isinstance(e, RequestProtocolError)), None)
        if queued is not None and getattr(self, "flow", None) is not None:
            _codes.setdefault(self.flow.id, queued.code)
        killed = yield from check_killed(self, emit_error_hook)
        if queued is not None:
            _codes.pop(self.flow.id, None)
        return killed

    http_layer.HttpStream.check_killed = remember_queued_code  # type: ignore[method-assign]

    h2_handle = _http2.Http2Server._handle_event

    def h2_problem_errors(self: _http2.Http2Server, event: Any) -> _CommandGenerator:
        if isinstance(event, StopReading):
            if not self.is_closed(event.stream_id):
                # RFC 9113 section 8.1: after a complete response, "a server MAY request
                # that the client abort transmission of a request without error by sending
                # a RST_STREAM with an error code of NO_ERROR".
                self.h2_conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.NO_ERROR)
                yield commands.SendData(self.conn, self.h2_conn.data_to_send())
            return
        if isinstance(event, ResponseProtocolError) and not self.is_closed(event.stream_id):
            stream = self.h2_conn.streams[event.stream_id]
            content_type = _grpc.pop((self.conn.id, event.stream_id), "")
            if (self.is_open_for_us(event.stream_id) and not stream.state_machine.headers_sent
                    and event.code.http_status_code() is not None):
                log.info("request on h2 stream %d failed: %s", event.stream_id, event.message)
                p = refusal_response(refusal_for(event.code), content_type=content_type)
                self.h2_conn.send_headers(
                    event.stream_id,
                    [(b":status", b"%d" % p.status),
                     *((k.lower().encode(), v.encode()) for k, v in p.headers.items())],
                    end_stream=not p.body)  # gRPC's Trailers-Only: one HEADERS frame
                if p.body:
                    self.h2_conn.send_data(event.stream_id, p.body, end_stream=True)
                yield commands.SendData(self.conn, self.h2_conn.data_to_send())
                return
        yield from h2_handle(self, event)

    _http2.Http2Server._handle_event = h2_problem_errors  # type: ignore[method-assign]

    wait_for_request_headers = http_layer.HttpStream.state_wait_for_request_headers

    def answer_before_body(self: http_layer.HttpStream, event: Any) -> _CommandGenerator:
        expect_continue = "100-continue" in event.request.headers.get("expect", "").lower()
        _heads[self] = (event.end_stream, expect_continue)
        content_type = event.request.headers.get("content-type", "")
        if is_grpc(content_type):
            _grpc[(self.context.client.id, self.stream_id)] = content_type
        inner = wait_for_request_headers(self, event)
        value: Any = None
        while True:
            try:
                command = inner.send(value)
            except StopIteration:
                break
            if (isinstance(command, http_layer.SendHttp)
                    and isinstance(command.event, ResponseHeaders)
                    and command.event.response.status_code == 100
                    and self.flow.response is not None):
                # Answered already: no "100 Continue" invites a body nobody reads.
                value = None
                continue
            value = yield command
        if (self.flow.response is not None and self.flow.request.method != "CONNECT"
                and self.client_state == self.state_consume_request_body):
            yield from _answer_at_once(self, end_stream=event.end_stream,
                                       expect_continue=expect_continue)

    http_layer.HttpStream.state_wait_for_request_headers = (  # type: ignore[method-assign]
        answer_before_body)

    start_request_stream = http_layer.HttpStream.start_request_stream

    def answer_instead_of_stream(self: http_layer.HttpStream) -> _CommandGenerator:
        if self.flow.response is not None:
            # mitmproxy raises NotImplementedError here; answer instead.
            end_stream, expect_continue = _heads.get(self, (False, False))
            yield from _answer_at_once(self, end_stream, expect_continue)
            return
        yield from start_request_stream(self)

    http_layer.HttpStream.start_request_stream = (  # type: ignore[method-assign]
        answer_instead_of_stream)

    flow_done = http_layer.HttpStream.flow_done

    def forget_stream(self: http_layer.HttpStream) -> _CommandGenerator:
        _forget_stream(self)
        yield from flow_done(self)

    http_layer.HttpStream.flow_done = forget_stream  # type: ignore[method-assign]

    make_server_connection = http_layer.HttpStream.make_server_connection

    def feed(self: http_layer.HttpStream) -> Generator[Any, Any, bool]:
        ok = yield from make_server_connection(self)
        if ok and self.context.client.id in _h2_agents:  # only HTTP/2 agents wait (item 9)
            _feeds.setdefault(self.context.server.id, set()).add(
                (self.context.client.id, self.stream_id))
        return ok

    http_layer.HttpStream.make_server_connection = feed  # type: ignore[method-assign]

    wait_for_response_headers = http_layer.HttpStream.state_wait_for_response_headers

    def replace_at_once(self: http_layer.HttpStream, event: Any) -> _CommandGenerator:
        upstream = event.response
        yield from wait_for_response_headers(self, event)
        if (self.flow.response is not upstream and self.flow.response is not None
                and self.server_state == self.state_consume_response_body):
            yield from _send_replacement(self, upstream_done=event.end_stream)

    http_layer.HttpStream.state_wait_for_response_headers = (  # type: ignore[method-assign]
        replace_at_once)

    stream_request_body = http_layer.HttpStream.state_stream_request_body

    def refuse_streamed_trailers(self: http_layer.HttpStream, event: Any) -> _CommandGenerator:
        if isinstance(event, RequestTrailers):
            # Item 2: abort the upstream's copy of the request and answer 400.
            message = ("the request carries a trailer section, which credproxy does not "
                       "forward; send the fields as headers")
            yield from self.handle_protocol_error(RequestProtocolError(
                self.stream_id, message, ErrorCode.GENERIC_CLIENT_ERROR))
            yield http_layer.SendHttp(ResponseProtocolError(
                self.stream_id, message, ErrorCode.GENERIC_CLIENT_ERROR), self.context.client)
            return
        yield from stream_request_body(self, event)

    http_layer.HttpStream.state_stream_request_body = (  # type: ignore[method-assign]
        refuse_streamed_trailers)

    # Item 11: a flow killed while a body streams is cut at its next piece.
    stream_request = http_layer.HttpStream.state_stream_request_body
    stream_response = http_layer.HttpStream.state_stream_response_body

    def cut_request(self: http_layer.HttpStream, event: Any) -> _CommandGenerator:
        if _killed(self):
            yield from _cut(self)
            return
        yield from stream_request(self, event)

    def cut_response(self: http_layer.HttpStream, event: Any) -> _CommandGenerator:
        if _killed(self):
            yield from _cut(self)
            return
        yield from stream_response(self, event)

    http_layer.HttpStream.state_stream_request_body = cut_request  # type: ignore[method-assign]
    http_layer.HttpStream.state_stream_response_body = (  # type: ignore[method-assign]
        cut_response)

    handler_init = server.ConnectionHandler.__init__

    def more_upstream_connections(self: server.ConnectionHandler, context: Context) -> None:
        handler_init(self, context)
        self.max_conns = collections.defaultdict(
            lambda: asyncio.Semaphore(UPSTREAM_CONNECTIONS))

    server.ConnectionHandler.__init__ = more_upstream_connections  # type: ignore[method-assign]

    handle_connection = server.ConnectionHandler.handle_connection

    async def reading(self: server.ConnectionHandler, connection: Connection) -> None:
        _reading.set(connection)
        try:
            await handle_connection(self, connection)
        finally:
            _feeds.pop(connection.id, None)
            if connection is not self.client:
                _close_transport(self, connection)

    server.ConnectionHandler.handle_connection = reading  # type: ignore[method-assign]

    drain_writers = server.ConnectionHandler.drain_writers

    async def drain_h2_backlog(self: server.ConnectionHandler) -> None:
        await drain_writers(self)
        connection = _reading.get()
        if connection is None or connection is self.client:
            return  # the agent's own loop must go on reading its WINDOW_UPDATEs
        while _congested(self.client.id, connection.id):
            await asyncio.sleep(0.005)

    server.ConnectionHandler.drain_writers = drain_h2_backlog  # type: ignore[method-assign]

    h2_server_init = _http2.Http2Server.__init__

    def track_h2_agent(self: _http2.Http2Server, context: Context) -> None:
        h2_server_init(self, context)
        _h2_agents.setdefault(context.client.id, weakref.WeakSet()).add(self.h2_conn)

    _http2.Http2Server.__init__ = track_h2_agent  # type: ignore[method-assign]
