"""Stream peers: real servers that answer the way agents' upstreams do (issue 12), each with
a TLS listener on the stack's server certificate, recording what they received so a test can
assert what reached them (credential injected, user context stripped, nothing at all).

* :class:`EventServer`: timed events over HTTP/1.1 (``h11``) and HTTP/2 (``h2``, chosen by
  ALPN). ``GET /sse`` (or ``/sse/<marker>``: what follows the first segment only
  names the request) answers ``text/event-stream``, ``/ndjson`` ``application/x-ndjson``,
  ``/close`` a read-until-close body (HTTP/1.0 style: no length, no chunking; over HTTP/2
  plain DATA frames), ``POST /mcp-like`` an MCP-style JSON-RPC POST answered with
  ``text/event-stream``. Query: ``n`` events (``0``: endless, until the client goes),
  ``every`` seconds apart, ``size`` bytes of padding per event, ``status`` (a ``401``, or
  any status with ``challenge=1``, also carries ``WWW-Authenticate: Bearer
  error="invalid_token"``, and such a body is marked with :data:`UNAUTHORIZED_BODY_MARK`
  throughout), ``delay`` seconds before the first event (a large one: the head, then
  nothing), ``early=1`` to answer at the request head without waiting for its body.
  Every event is one line holding ``"seq": i`` (SSE: ``data: {...}``), so clients can
  time each one. ``/blob`` answers ``n`` chunks of ``size`` bytes (``content-length``
  declared when ``n`` is not 0). Any method but ``/mcp-like``'s (POST only); ``HEAD`` gets
  the head alone. Each request's :class:`Seen` records how its answer ended
  (``complete``; ``reset`` by an HTTP/2 ``RST_STREAM``; ``closed``: the client's
  connection went) and the bytes sent, so a test can tell the proxy let go of it.
* :class:`GrpcStreamServer`: grpcio over TLS with generic handlers on raw bytes (no protoc):
  server streaming ``Tick`` (one message every ``every`` s) and a bidi ``Echo``; records the
  metadata of every call.
* :class:`WebSocketEcho`: ``websockets`` over TLS, echoing every message; records the
  upgrade request's header fields.
* :class:`DeadEnd`: a TLS upstream that never answers (connections accepted and held
  silent) or that closes every connection at once.
* :class:`McpProgressServer`: the MCP SDK's server (``MCPServer``, formerly FastMCP) over
  Streamable HTTP under uvicorn with TLS; its ``countdown`` tool reports a progress
  notification every ``every`` s before its result; records request header fields.

Each runs in daemon threads of the calling process, starts listening in its constructor
(``port`` is then known) and stops with :meth:`close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc  # type: ignore[import-untyped]
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h11
from mcp.server.mcpserver import Context

# Marks a body the peers send with a 401 or an invalid_token challenge (every byte of its
# padding, and every event), so a test can tell that none of it reached the client.
UNAUTHORIZED_BODY_MARK = "UPSTREAM-401-BODY"


def server_tls(cert: Path, key: Path, alpn: Sequence[str]) -> ssl.SSLContext:
    """A server TLS context on ``cert``/``key`` offering ``alpn``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


class _LoopThread:
    """An asyncio event loop running in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run[T](self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_all(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


# --- timed events -----------------------------------------------------------------------------

@dataclass
class Seen:
    """One request as a peer received it (header names lower-cased)."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    http_version: str  # "1.1" or "2"
    body_bytes: int = 0
    sent_bytes: int = 0  # of the answer's body, as handed to the connection
    # How the answer ended: "" while it is being sent (or before), "complete", "reset" (an
    # HTTP/2 RST_STREAM from the client, reset_code), "closed" (the connection went).
    outcome: str = ""
    reset_code: int | None = None
    ended_at: float | None = None  # time.monotonic() when the answer ended

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]

    @property
    def let_go(self) -> bool:
        """The client (the proxy) stopped the answer before it was complete."""
        return self.outcome in ("reset", "closed")


@dataclass(frozen=True)
class StreamSpec:
    """What a request asked for (see the module docstring)."""

    kind: str  # "sse", "ndjson", "close", "mcp-like", "blob"
    n: int
    every: float
    size: int
    status: int
    challenge: bool = False
    delay: float = 0.0  # before the first event
    early: bool = False  # answer at the request head, not after its body
    head_only: bool = False  # a HEAD request: the head, no body

    @classmethod
    def parse(cls, method: str, target: str) -> StreamSpec | None:
        url = urlsplit(target)
        kind = url.path.lstrip("/").split("/", 1)[0]  # /sse/<anything>: a marker
        if kind not in ("sse", "ndjson", "close", "mcp-like", "blob"):
            return None
        if kind == "mcp-like" and method != "POST":
            return None
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        status = int(q.get("status", "200"))
        return cls(kind, int(q.get("n", "5")), float(q.get("every", "0.2")),
                   int(q.get("size", "0")), status, status == 401 or q.get("challenge") == "1",
                   float(q.get("delay", "0")), q.get("early") == "1", method == "HEAD")

    @property
    def content_type(self) -> str:
        return {"ndjson": "application/x-ndjson",
                "blob": "application/octet-stream"}.get(self.kind, "text/event-stream")

    @property
    def blob_size(self) -> int:
        return self.size or 1024

    @property
    def length(self) -> int | None:
        """The declared ``content-length`` (a ``/blob`` of ``n`` chunks), else None."""
        return self.n * self.blob_size if self.kind == "blob" and self.n else None

    def headers(self) -> list[tuple[str, str]]:
        out = [("content-type", self.content_type), ("cache-control", "no-cache")]
        if self.challenge:
            out.append(("www-authenticate", 'Bearer error="invalid_token"'))
        if self.length is not None:
            out.append(("content-length", str(self.length)))
        return out

    def event(self, seq: int) -> bytes:
        unit = UNAUTHORIZED_BODY_MARK if self.challenge else "p"
        if self.kind == "blob":
            return (unit * (self.blob_size // len(unit) + 1))[:self.blob_size].encode()
        record: dict[str, Any] = {"seq": seq, "t": time.time(),
                                  "pad": (unit * (self.size // len(unit) + 1))[:self.size]}
        if self.challenge:
            record["mark"] = UNAUTHORIZED_BODY_MARK
        line = json.dumps(record)
        if self.kind == "ndjson":
            return line.encode() + b"\n"
        if self.kind == "mcp-like":
            msg = {"jsonrpc": "2.0", "method": "notifications/progress",
                   "params": {"progressToken": 1, "progress": seq, "seq": seq}}
            return f"event: message\ndata: {json.dumps(msg)}\n\n".encode()
        return f"id: {seq}\ndata: {line}\n\n".encode()

    async def events(self) -> AsyncIterator[bytes]:
        """Event ``i`` at ``start + delay + i * every`` (no drift); endless when ``n`` is
        0; nothing for a HEAD request."""
        if self.head_only:
            return
        start = time.monotonic() + self.delay
        seq = 0
        while self.n == 0 or seq < self.n:
            # Always through the loop, even when late (every=0): a writer whose client left
            # learns it from a callback, and a loop that never yields never runs it.
            await asyncio.sleep(max(0.0, start + seq * self.every - time.monotonic()))
            yield self.event(seq)
            seq += 1
        if self.kind == "mcp-like":
            result = {"jsonrpc": "2.0", "id": 1, "result": {"done": True}}
            yield f"event: message\ndata: {json.dumps(result)}\n\n".encode()


class EventServer:
    """Timed events over TLS, HTTP/1.1 and HTTP/2 (see the module docstring).

    ``alpn``: the protocols offered, in order of preference (``("http/1.1",)`` makes an
    HTTP/1-only upstream). :attr:`connections` counts accepted TCP connections (a refused
    request must not open one), :attr:`requests` every request head, as received."""

    def __init__(self, cert: Path, key: Path, *, alpn: Sequence[str] = ("h2", "http/1.1"),
                 host: str = "127.0.0.1") -> None:
        self.connections = 0
        self.requests: list[Seen] = []
        self._active: list[Seen] = []  # requests whose answer is being sent
        self._tls = server_tls(cert, key, alpn)
        self._loop = _LoopThread("event-server")
        self._server = self._loop.run(asyncio.start_server(
            self._accept, host, 0, ssl=self._tls, ssl_handshake_timeout=10))
        self.port: int = self._server.sockets[0].getsockname()[1]

    def saw(self, marker: str) -> bool:
        return any(marker in r.path for r in self.requests)

    def matching(self, marker: str) -> list[Seen]:
        return [r for r in self.requests if marker in r.path]

    def streaming(self, marker: str) -> bool:
        """Whether an answer to a path containing ``marker`` is still being sent (an endless
        stream stops once its client, or the proxy, let go of it)."""
        return any(marker in seen.path for seen in list(self._active))

    @contextlib.asynccontextmanager
    async def _sending(self, seen: Seen) -> AsyncIterator[None]:
        """While ``seen``'s answer is being sent; records how it ended."""
        self._active.append(seen)
        try:
            yield
        except h2.exceptions.StreamClosedError:
            seen.outcome = seen.outcome or "reset"
            raise
        except BaseException:  # the connection went (or a reset cancelled the task)
            seen.outcome = seen.outcome or "closed"
            raise
        else:
            seen.outcome = seen.outcome or "complete"
        finally:
            seen.ended_at = time.monotonic()
            self._active.remove(seen)

    def close(self) -> None:
        self._server.close()
        self._loop.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        try:
            if alpn == "h2":
                await _H2Session(self, reader, writer).serve()
            else:
                await self._serve_h1(reader, writer)
        except (OSError, EOFError, h11.ProtocolError, h2.exceptions.ProtocolError,
                asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # HTTP/1.1 -----------------------------------------------------------------------------
    async def _serve_h1(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            request = await self._h1_next(conn, reader)
            if request is None:
                return
            seen = Seen(request.method.decode(), request.target.decode("latin-1"),
                        [(k.decode().lower(), v.decode("latin-1")) for k, v in request.headers],
                        request.http_version.decode())
            self.requests.append(seen)
            spec = StreamSpec.parse(seen.method, seen.path)
            if (spec is None or not spec.early) and not await self._h1_body(conn, reader,
                                                                               seen):
                return
            if spec is None:
                writer.write(conn.send(h11.Response(status_code=404, headers=[
                    ("content-length", "0")])) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
            elif spec.kind == "close":
                async with self._sending(seen):
                    await self._h1_until_close(spec, seen, writer)
                return
            elif not await self._h1_answer(spec, seen, conn, reader, writer):
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return  # (an early answer leaves the rest of the request body unread)
            conn.start_next_cycle()

    async def _h1_body(self, conn: h11.Connection, reader: asyncio.StreamReader,
                       seen: Seen) -> bool:
        """Read the request body, counted (a refused upload must not arrive here); False
        if the connection ended first."""
        while True:
            ev = await self._h1_next(conn, reader)
            if ev is None:
                return False
            if isinstance(ev, h11.Data):
                seen.body_bytes += len(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                return True

    async def _h1_answer(self, spec: StreamSpec, seen: Seen, conn: h11.Connection,
                         reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Send the answer while watching the connection: if the client closes it (a proxy
        letting go of an answer it will not forward), the answer stops there. False if the
        connection is gone."""
        async with self._sending(seen):
            sender = asyncio.create_task(self._h1_send(spec, seen, conn, writer))
            watcher = asyncio.create_task(self._h1_watch(conn, reader, seen))
            await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not sender.done():
                seen.outcome = "closed"
                sender.cancel()
            watcher.cancel()
            await asyncio.gather(sender, watcher, return_exceptions=True)
            if seen.outcome == "closed":
                return False
            sender.result()  # a failed write raises here
        return True

    @staticmethod
    async def _h1_send(spec: StreamSpec, seen: Seen, conn: h11.Connection,
                       writer: asyncio.StreamWriter) -> None:
        framing = [] if spec.length is not None else [("transfer-encoding", "chunked")]
        writer.write(conn.send(h11.Response(status_code=spec.status,
                                            headers=[*spec.headers(), *framing])) or b"")
        await writer.drain()
        async for chunk in spec.events():
            writer.write(conn.send(h11.Data(data=chunk)) or b"")
            seen.sent_bytes += len(chunk)
            await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()

    @staticmethod
    async def _h1_watch(conn: h11.Connection, reader: asyncio.StreamReader,
                        seen: Seen) -> None:
        """Returns when the client closes the connection; the rest of the request body is
        counted, a pipelined next request kept for the next cycle."""
        while data := await reader.read(65536):
            conn.receive_data(data)
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA or ev is h11.PAUSED:
                    break
                if isinstance(ev, h11.Data):
                    seen.body_bytes += len(ev.data)
                elif isinstance(ev, h11.ConnectionClosed):
                    return

    @staticmethod
    async def _h1_next(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            if isinstance(ev, h11.ConnectionClosed):
                return None
            return ev

    @staticmethod
    async def _h1_until_close(spec: StreamSpec, seen: Seen,
                              writer: asyncio.StreamWriter) -> None:
        """No Content-Length, no chunking: the body ends when the connection does (RFC 9112
        section 6.3, item 8), which h11 only does for HTTP/1.0 peers; written by hand."""
        head = [f"HTTP/1.1 {spec.status} X"] + [f"{k}: {v}" for k, v in spec.headers()]
        writer.write(("\r\n".join([*head, "Connection: close"]) + "\r\n\r\n").encode())
        async for chunk in spec.events():
            writer.write(chunk)
            seen.sent_bytes += len(chunk)
            await writer.drain()


class _H2Session:
    """One HTTP/2 connection of an :class:`EventServer` (the ``h2`` library's state machine;
    every stream is answered by its own task, with flow control)."""

    def __init__(self, owner: EventServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.owner, self.reader, self.writer = owner, reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8"))
        self.seen: dict[int, Seen] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.window = asyncio.Event()

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def serve(self) -> None:
        self.conn.initiate_connection()
        await self.flush()
        try:
            while data := await self.reader.read(65536):
                for ev in self.conn.receive_data(data):
                    self._on(ev)
                await self.flush()
        finally:
            for task in self.tasks.values():
                task.cancel()

    def _on(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            assert ev.headers is not None and ev.stream_id is not None
            fields = [(str(k).lower(), str(v)) for k, v in ev.headers]
            pseudo = dict(f for f in fields if f[0].startswith(":"))
            seen = Seen(pseudo.get(":method", ""), pseudo.get(":path", ""),
                        [f for f in fields if not f[0].startswith(":")], "2")
            self.seen[ev.stream_id] = seen
            self.owner.requests.append(seen)
            spec = StreamSpec.parse(seen.method, seen.path)
            if ev.stream_ended is not None or (spec is not None and spec.early):
                self._respond(ev.stream_id)
        elif isinstance(ev, h2.events.DataReceived):
            assert ev.stream_id is not None and ev.data is not None
            self.seen[ev.stream_id].body_bytes += len(ev.data)
            self.conn.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
            if ev.stream_ended is not None:
                self._respond(ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            assert ev.stream_id is not None
            if ev.stream_id not in self.tasks:
                self._respond(ev.stream_id)
        elif isinstance(ev, h2.events.StreamReset):
            stream_seen = self.seen.get(ev.stream_id or 0)
            task = self.tasks.get(ev.stream_id or 0)
            if stream_seen is not None and task is not None and not task.done():
                stream_seen.outcome = stream_seen.outcome or "reset"
                stream_seen.reset_code = int(ev.error_code or 0)
                task.cancel()
        elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.window.set()

    def _respond(self, stream_id: int) -> None:
        if stream_id not in self.tasks:
            self.tasks[stream_id] = asyncio.create_task(self._answer(stream_id))

    async def _answer(self, stream_id: int) -> None:
        seen = self.seen[stream_id]
        spec = StreamSpec.parse(seen.method, seen.path)
        try:
            if spec is None:
                self.conn.send_headers(stream_id, [(":status", "404"),
                                                   ("content-length", "0")], end_stream=True)
                await self.flush()
                return
            async with self.owner._sending(seen):
                self.conn.send_headers(stream_id, [(":status", str(spec.status)),
                                                   *spec.headers()],
                                       end_stream=spec.head_only)
                await self.flush()
                if spec.head_only:
                    return
                async for chunk in spec.events():
                    await self._send(stream_id, chunk)
                    seen.sent_bytes += len(chunk)
                self.conn.end_stream(stream_id)
                await self.flush()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, OSError):
            pass

    async def _send(self, stream_id: int, data: bytes) -> None:
        while data:
            room = min(self.conn.local_flow_control_window(stream_id),
                       self.conn.max_outbound_frame_size, len(data))
            if room <= 0:
                self.window.clear()
                await self.window.wait()
                continue
            self.conn.send_data(stream_id, data[:room])
            data = data[room:]
            await self.flush()


# --- upstreams that go nowhere ----------------------------------------------------------------

class DeadEnd:
    """An upstream that never gets anywhere. ``silent``: connections are accepted and held
    without a byte read or written, so a client's TLS handshake waits (for ever); ``close``:
    each is closed at once; ``unanswered``: the TCP handshake itself never completes (the
    listening socket's accept queue is kept full, so the kernel drops new SYNs: a client's
    connect waits). :attr:`connections` counts accepted connections, :attr:`open` those
    still held, :attr:`connecting` the connects waiting on an ``unanswered`` one."""

    def __init__(self, *, mode: str = "silent", host: str = "127.0.0.1") -> None:
        assert mode in ("silent", "close", "unanswered")
        self.mode = mode
        self.connections = 0
        self._held: list[socket.socket] = []
        self._sock = socket.create_server((host, 0), backlog=0 if mode == "unanswered" else 128)
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._fillers: list[socket.socket] = []
        if mode == "unanswered":
            for _ in range(2):  # one fills the queue (backlog 0 holds one), one is dropped
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex((host, self.port))
                self._fillers.append(filler)
        self._thread = threading.Thread(target=self._run, name=f"dead-end-{mode}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.mode == "unanswered":
                self._stop.wait(0.1)
                continue
            with contextlib.suppress(TimeoutError):
                conn, _ = self._sock.accept()
                self.connections += 1
                if self.mode == "close":
                    conn.close()
                else:
                    self._held.append(conn)

    @property
    def open(self) -> int:
        """Held connections whose client has not closed its end (what it sent, a TLS
        ClientHello, is read and dropped on the way to its end)."""
        alive = 0
        for conn in list(self._held):
            conn.setblocking(False)
            try:
                while conn.recv(65536):
                    pass
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        return alive

    @property
    def connecting(self) -> int:
        """Connects to an ``unanswered`` peer still waiting (SYN-SENT), but its own."""
        own = {f.getsockname()[1] for f in self._fillers}
        out = subprocess.run(["ss", "-tnH", "state", "syn-sent", f"( dport = :{self.port} )"],
                             capture_output=True, text=True, check=True).stdout
        return sum(1 for line in out.splitlines()
                   if int(line.split()[-2].rsplit(":", 1)[1]) not in own)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        for conn in [*self._held, *self._fillers]:
            conn.close()


# --- gRPC -------------------------------------------------------------------------------------

GRPC_SERVICE = "credproxy.test.Streams"
GRPC_TICK = f"/{GRPC_SERVICE}/Tick"
GRPC_ECHO = f"/{GRPC_SERVICE}/Echo"


@dataclass
class GrpcCall:
    method: str
    metadata: dict[str, str]
    messages_in: list[bytes] = field(default_factory=list)


def tick_request(n: int, every: float) -> bytes:
    """The request message of ``Tick`` (raw bytes: JSON)."""
    return json.dumps({"n": n, "every": every}).encode()


class GrpcStreamServer:
    """gRPC over TLS (ALPN h2), raw-bytes messages. ``Tick``: server streaming, message ``i``
    (``b"tick <i>"``) at ``i * every`` s; ``Echo``: bidi, each request message answered with
    ``b"echo " + message`` at once. :attr:`calls` records each call's metadata."""

    def __init__(self, cert: Path, key: Path, *, host: str = "127.0.0.1") -> None:
        self.calls: list[GrpcCall] = []
        self._server = grpc.server(ThreadPoolExecutor(max_workers=8, thread_name_prefix="grpc"))
        handler = grpc.method_handlers_generic_handler(GRPC_SERVICE, {
            "Tick": grpc.unary_stream_rpc_method_handler(self._tick),
            "Echo": grpc.stream_stream_rpc_method_handler(self._echo),
        })
        self._server.add_generic_rpc_handlers((handler,))
        creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        self.port: int = self._server.add_secure_port(f"{host}:0", creds)
        self._server.start()

    def _record(self, method: str, context: grpc.ServicerContext) -> GrpcCall:
        call = GrpcCall(method, {k: str(v) for k, v in context.invocation_metadata()})
        self.calls.append(call)
        return call

    def _tick(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._record(GRPC_TICK, context).messages_in.append(request)
        spec = json.loads(request)
        start = time.monotonic()
        for i in range(int(spec["n"])):
            delay = start + i * float(spec["every"]) - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if not context.is_active():
                return
            yield b"tick %d" % i

    def _echo(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        call = self._record(GRPC_ECHO, context)
        for message in requests:
            call.messages_in.append(message)
            yield b"echo " + message

    def close(self) -> None:
        self._server.stop(grace=None).wait(5)


# --- WebSocket --------------------------------------------------------------------------------

class WebSocketEcho:
    """A WebSocket echo server over TLS (``websockets``); :attr:`upgrades` holds every
    upgrade request's header fields (names lower-cased)."""

    def __init__(self, cert: Path, key: Path, *, host: str = "127.0.0.1") -> None:
        from websockets.asyncio.server import serve

        self.upgrades: list[list[tuple[str, str]]] = []
        self._loop = _LoopThread("ws-echo")
        tls = server_tls(cert, key, ("http/1.1",))

        async def start() -> Any:
            return await serve(self._echo, host, 0, ssl=tls, process_request=self._record)

        self._server = self._loop.run(start())
        self.port: int = next(iter(self._server.sockets)).getsockname()[1]

    def _record(self, connection: Any, request: Any) -> None:
        self.upgrades.append([(k.lower(), v) for k, v in request.headers.raw_items()])

    @staticmethod
    async def _echo(ws: Any) -> None:
        with contextlib.suppress(Exception):
            async for message in ws:
                await ws.send(message)

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()

        with contextlib.suppress(Exception):
            self._loop.run(stop())
        self._loop.stop()


# --- MCP Streamable HTTP ----------------------------------------------------------------------

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]],
                    Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


class McpProgressServer:
    """An MCP server (the SDK's ``MCPServer``) on Streamable HTTP at ``/mcp``, under uvicorn
    with TLS. Tool ``countdown(steps, every)`` sends ``steps`` progress notifications
    ``every`` s apart (on the POST's ``text/event-stream`` answer), then returns ``"done"``;
    ``lookup(query)`` returns ``"found <query>"``; ``admin_op()`` returns ``"admin done"``,
    but a ``tools/call`` of a tool named in ``scoped`` (name -> scope) is answered 403
    ``WWW-Authenticate: Bearer error="insufficient_scope", scope="<scope>"`` (the MCP
    authorization spec's scope challenge; RFC 6750 section 3.1) before it reaches the SDK,
    unless ``token_scope`` (bearer token -> its space-separated scopes, e.g. by RFC 7662
    introspection; called in a worker thread) says the request's token holds that scope.
    :attr:`requests` records each HTTP request's method and header fields.

    With ``issuer`` and ``introspect`` (token -> its RFC 7662 introspection answer), the
    server is an OAuth resource server through the SDK's own auth (``AuthSettings`` and a
    ``TokenVerifier``): it publishes RFC 9728 protected resource metadata naming
    ``issuer``, answers a request without a valid token 401 with ``WWW-Authenticate:
    Bearer ... resource_metadata="..."``, accepts only tokens whose audience (RFC 8707
    ``resource``) is its own URL :attr:`url`, and ``lookup`` answers ``"found <query>
    for <the token's subject>"``: each user sees their own data."""

    def __init__(self, cert: Path, key: Path, *, host: str = "127.0.0.1",
                 scoped: dict[str, str] | None = None,
                 token_scope: Callable[[str], str] | None = None,
                 issuer: str | None = None,
                 introspect: Callable[[str], dict[str, Any]] | None = None) -> None:
        import uvicorn
        from mcp.server.auth.middleware.auth_context import get_access_token
        from mcp.server.mcpserver import MCPServer
        from mcp.server.transport_security import TransportSecuritySettings

        self.requests: list[Seen] = []
        self._sock = socket.create_server((host, 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"https://localhost:{self.port}/mcp"
        mcp = (MCPServer("credproxy-streams", log_level="WARNING")
               if issuer is None or introspect is None
               else self._resource_server(issuer, introspect))

        @mcp.tool()
        async def countdown(steps: int, every: float, ctx: Context) -> str:
            """Report progress ``steps`` times, ``every`` seconds apart."""
            for i in range(steps):
                await ctx.report_progress(i + 1, steps, f"step {i + 1}")
                await asyncio.sleep(every)
            return "done"

        @mcp.tool()
        async def lookup(query: str) -> str:
            """Look ``query`` up."""
            token = get_access_token()
            return f"found {query}" if token is None else f"found {query} for {token.subject}"

        @mcp.tool()
        async def admin_op() -> str:
            """An operation that needs a wider scope (see ``scoped``)."""
            return "admin done"

        self.scoped = dict(scoped or {})
        self.token_scope = token_scope
        # Reached as localhost:<port> or through a proxy: the Host check is not under test.
        app = mcp.streamable_http_app(transport_security=TransportSecuritySettings(
            enable_dns_rebinding_protection=False))
        config = uvicorn.Config(self._recording(app), log_level="warning",
                                ssl_certfile=str(cert), ssl_keyfile=str(key),
                                lifespan="on", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="mcp-server")
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the MCP server did not start")
            time.sleep(0.02)

    def _resource_server(self, issuer: str, introspect: Callable[[str], dict[str, Any]]
                         ) -> Any:
        from mcp.server.auth.provider import AccessToken
        from mcp.server.auth.settings import AuthSettings
        from mcp.server.mcpserver import MCPServer

        class Introspection:
            """RFC 7662: the authorization server says whether a token is active, whose it
            is, its scopes and audience."""

            async def verify_token(self, token: str) -> AccessToken | None:
                said = await asyncio.to_thread(introspect, token)
                if not said.get("active"):
                    return None
                aud = said.get("aud")
                return AccessToken(token=token, client_id=str(said.get("client_id", "")),
                                   scopes=str(said.get("scope", "")).split(),
                                   expires_at=said.get("exp"), subject=said.get("sub"),
                                   resource=aud[0] if isinstance(aud, list) else aud)

        return MCPServer("credproxy-streams", log_level="WARNING",
                         token_verifier=Introspection(),
                         auth=AuthSettings(issuer_url=issuer, resource_server_url=self.url,
                                           required_scopes=["documents.read"],
                                           validate_token_resource=True))

    def _recording(self, app: Any) -> ASGIApp:
        async def wrapped(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                          send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
            if scope["type"] == "http":
                self.requests.append(Seen(
                    scope["method"], scope["path"],
                    [(k.decode().lower(), v.decode("latin-1")) for k, v in scope["headers"]],
                    scope.get("http_version", "1.1")))
                if scope["method"] == "POST" and self.scoped:
                    replay = await self._challenge(scope, receive, send)
                    if replay is None:
                        return
                    receive = replay
            await app(scope, receive, send)

        return wrapped

    async def _challenge(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                         send: Callable[[dict[str, Any]], Awaitable[None]]
                         ) -> Callable[[], Awaitable[Any]] | None:
        """Read the POST body whole; answer a ``tools/call`` of a scoped tool 403 (None), else
        hand back a ``receive`` that replays the body."""
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if (isinstance(parsed, dict) and parsed.get("method") == "tools/call"
                and isinstance(parsed.get("params"), dict)
                and parsed["params"].get("name") in self.scoped):
            needed = self.scoped[parsed["params"]["name"]]
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            bearer = auth[7:] if auth.lower().startswith("bearer ") else ""
            held = (await asyncio.to_thread(self.token_scope, bearer)
                    if self.token_scope is not None and bearer else "")
            if needed in held.split():
                return self._replay(body, receive)
            await send({"type": "http.response.start", "status": 403, "headers": [
                (b"www-authenticate",
                 f'Bearer error="insufficient_scope", scope="{needed}"'.encode()),
                (b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"error":"insufficient_scope"}'})
            return None
        return self._replay(body, receive)

    @staticmethod
    def _replay(body: bytes, receive: Callable[[], Awaitable[Any]]
                ) -> Callable[[], Awaitable[Any]]:
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)
        self._sock.close()


__all__ = ["GRPC_ECHO", "GRPC_TICK", "UNAUTHORIZED_BODY_MARK", "DeadEnd", "EventServer", "GrpcCall",
           "GrpcStreamServer", "McpProgressServer", "Seen", "StreamSpec", "WebSocketEcho",
           "server_tls", "tick_request"]
