"""Stream faults a tester found (issue 12), each proved against a real ``credproxy run``
(``http2: true``) with real peers (devstack/streamers.py) and clients that watch the wire:
a raw HTTP/1.1 client over CONNECT that parses every response itself (so a body where
none belongs, or a connection that stops serving, shows), a raw HTTP/2 client (the ``h2``
library: HEADERS, DATA, END_STREAM, RST_STREAM and flow control as sent), ``http.client``
and grpcio.

1. A credentialed request whose upstream answers 401 (or 200/403 with ``WWW-Authenticate:
   Bearer error="invalid_token"``) with a slow, endless, delayed or absent body: the agent
   gets the complete problem at once, its stream ends (HTTP/2 END_STREAM; HTTP/1 keep-alive
   serves the next request on the same connection), and the peer sees its stream reset or
   its connection closed.
2. gRPC: such a replaced answer reaches grpcio as a status with the slug, on the wire one
   HEADERS frame with END_STREAM (Trailers-Only); an upstream that cannot be reached too.
3. An HTTP/2 agent that stops reading an endless fast stream: the proxy stops reading the
   upstream (bounded RSS, the peer held back), and the stream resumes intact when the agent
   reads again; another stream of the same connection is not held up meanwhile.
4. An HTTP/2 agent with more than five concurrent endless streams to one HTTP/1 upstream;
   when it leaves, every one of those upstream connections is closed.
5. Agents that leave with streams open (or still waiting for an upstream connection) leave
   nothing in flight: SIGTERM exits at once.
6. HEAD: refused, or answered 401 upstream: no body, and the connection goes on.
7. A replaced answer while the agent is still sending its body; pipelined requests after a
   refusal; an agent cancelling one HTTP/2 stream of several.

Timing margins separate "at once" (tens of ms) from "held" (the upstream's body takes
seconds, or never ends) on a loaded 2-core machine.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import socket
import ssl
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest

from devstack.procs import free_port
from devstack.stack import build_stack, wait_until
from devstack.streamers import UNAUTHORIZED_BODY_MARK, DeadEnd, EventServer, Seen
from tests.integration.streamkit import (
    RssPeak,
    StreamEnv,
    address,
    grant,
    route_peers,
    tunnel,
)

pytestmark = pytest.mark.integration

STREAMS, STREAMS_H1, SILENT, CLOSING, UNANSWERED = (
    "streams", "streams-h1", "silent", "closing", "unanswered")
QUICK = 1.0  # an answer "at once": well under the upstream body's seconds
REPLACED = {(401, "reauth-required"), (503, "credential-store-unavailable")}
GRPC_REPLACED = {(grpc.StatusCode.UNAUTHENTICATED, "reauth-required"),
                 (grpc.StatusCode.UNAVAILABLE, "credential-store-unavailable")}
SEQ_ID = re.compile(rb"(?:^|\n)id: (\d+)\n")


# --- the stack and its peers ----------------------------------------------------------------

@dataclass
class Env(StreamEnv):
    events: EventServer  # h2 and http/1.1
    events_h1: EventServer  # http/1.1 only
    silent: DeadEnd  # accepts, never answers (the proxy's TLS handshake waits)
    closing: DeadEnd  # closes every connection at once
    unanswered: DeadEnd  # TCP connects to it never complete
    user: str = "faults"
    _users: Iterator[int] = field(default_factory=lambda: iter(range(1_000_000)))

    def peer(self, upstream: str) -> EventServer:
        return self.events_h1 if upstream == "h1" else self.events

    def new_user(self, providers: Sequence[str] = (STREAMS, STREAMS_H1)) -> str:
        """A user of their own: an upstream 401 marks the grant (refreshed, then reauth)."""
        name = f"f{next(self._users)}-{uuid.uuid4().hex[:6]}"
        if providers:
            grant(self.stack, name, providers)
        return name

    def context(self, user: str | None = None) -> str:
        return self.stack.context(user or self.user)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    stack = build_stack(tmp_path_factory.mktemp("stream-faults"), start_proxy=False)
    pki = stack.workdir / "pki"
    cert, key = pki / "server.pem", pki / "server.key"
    peers: list[Any] = []
    try:
        events = EventServer(cert, key)
        peers.append(events)
        events_h1 = EventServer(cert, key, alpn=("http/1.1",))
        peers.append(events_h1)
        silent = DeadEnd(mode="silent")
        peers.append(silent)
        closing = DeadEnd(mode="close")
        peers.append(closing)
        unanswered = DeadEnd(mode="unanswered")
        peers.append(unanswered)
        ports = {STREAMS: events.port, STREAMS_H1: events_h1.port, SILENT: silent.port,
                 CLOSING: closing.port, UNANSWERED: unanswered.port}
        route_peers(stack, ports)
        env = Env(stack, events, events_h1, silent, closing, unanswered)
        grant(stack, env.user, ports)
        yield env
    finally:
        stack.close()
        for peer in peers:
            peer.close()


def _reset_close(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): an agent that vanishes."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --- a raw HTTP/1.1 agent -------------------------------------------------------------------

@dataclass
class H1Response:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float  # seconds from the start of the read to the complete response

    @property
    def seqs(self) -> list[int]:
        return [int(m) for m in SEQ_ID.findall(self.body)]


class H1Agent:
    """An HTTP/1.1 client on a raw TLS connection through the proxy: requests as bytes
    (pipelining included), responses parsed from the bytes as they come (Content-Length,
    chunked, none for HEAD), any leftover kept for the next response."""

    def __init__(self, env: Env, authority: str, proxy: tuple[str, int] | None = None) -> None:
        self.authority = authority
        # Offering h2 too: mitmproxy then offers both upstream (it mirrors the agent's
        # ALPN), so an HTTP/2 upstream is spoken to in HTTP/2 behind this HTTP/1.1 agent.
        self.tls = tunnel(proxy or env.proxy_addr, authority, env.mitm_ca,
                           ["http/1.1", "h2"])
        assert self.tls.selected_alpn_protocol() == "http/1.1"
        self.buf = b""
        self.closed = False

    @staticmethod
    def head(method: str, path: str, authority: str, headers: dict[str, str]) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {authority}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def send(self, method: str, path: str, headers: dict[str, str] | None = None) -> None:
        self.tls.sendall(self.head(method, path, self.authority, headers or {}))

    def _more(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete response; got {self.buf[:300]!r}")
        self.tls.settimeout(left)
        try:
            chunk = self.tls.recv(65536)
        except TimeoutError:
            raise TimeoutError(f"no complete response; got {self.buf[:300]!r}") from None
        except OSError:
            chunk = b""
        if not chunk:
            self.closed = True
        self.buf += chunk

    def response(self, *, head: bool = False, timeout: float = 5.0) -> H1Response:
        """The next response (``head``: to a HEAD request, so no body whatever it says);
        TimeoutError (the buffer kept as it was) if it is not complete in time."""
        start = time.monotonic()
        deadline = start + timeout
        while (parsed := self._parse(head)) is None:
            if self.closed:
                raise ConnectionError(f"closed; got {self.buf[:300]!r}")
            self._more(deadline)
        status, headers, body, self.buf = parsed
        return H1Response(status, headers, body, time.monotonic() - start)

    def _parse(self, head: bool) -> tuple[int, dict[str, str], bytes, bytes] | None:
        """The first complete response in the buffer and what follows it, else None."""
        raw, sep, rest = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return None
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers = {k.strip().lower(): v.strip()
                   for k, _, v in (line.partition(":") for line in lines)}
        if head or status in (204, 304) or status < 200:
            return status, headers, b"", rest
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size_line, sep, after = rest.partition(b"\r\n")
                if not sep:
                    return None
                size = int(size_line.split(b";")[0], 16)
                if len(after) < size + 2:
                    return None
                rest = after[size + 2:]
                if size == 0:  # (no trailers from these peers)
                    return status, headers, body, rest
                body += after[:size]
        if "content-length" in headers:
            length = int(headers["content-length"])
            if len(rest) < length:
                return None
            return status, headers, rest[:length], rest[length:]
        # Until the connection closes.
        return (status, headers, rest, b"") if self.closed else None

    def close(self) -> None:
        self.tls.close()


# --- a raw HTTP/2 agent ---------------------------------------------------------------------

@dataclass
class H2Stream:
    """What one stream got, each with its time (s) from the stream's request."""

    start: float
    headers: dict[str, str] | None = None
    headers_at: float | None = None
    ended_on_headers: bool = False  # END_STREAM on the HEADERS frame itself
    data: bytearray = field(default_factory=bytearray)
    data_frames: int = 0  # DATA frames with a payload
    first_data_at: float | None = None
    trailers: dict[str, str] | None = None
    ended_at: float | None = None  # END_STREAM
    reset: int | None = None  # RST_STREAM's error code
    reset_at: float | None = None

    @property
    def done(self) -> bool:
        return self.ended_at is not None or self.reset is not None

    @property
    def seqs(self) -> list[int]:
        return [int(m) for m in SEQ_ID.findall(bytes(self.data))]


class H2Agent:
    """An HTTP/2 client on a raw TLS connection through the proxy (``h2``'s state machine).
    Every DATA frame is acknowledged (WINDOW_UPDATE) unless its stream is held
    (:meth:`hold`): then nothing of it is, or, with ``connection=True``, only the
    connection's window (the stream's stays shut, as a client that stops reading one stream
    of several does)."""

    def __init__(self, env: Env, authority: str, proxy: tuple[str, int] | None = None) -> None:
        self.authority = authority
        self.tls = tunnel(proxy or env.proxy_addr, authority, env.mitm_ca, ["h2"])
        assert self.tls.selected_alpn_protocol() == "h2"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.streams: dict[int, H2Stream] = {}
        self.held: dict[int, int] = {}  # stream -> bytes not acknowledged on it
        self.held_connection: dict[int, bool] = {}  # stream -> connection window opened
        self.closed = False
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.tls.sendall(data)

    def request(self, method: str, path: str, headers: Sequence[tuple[str, str]] = (),
                body: bytes | None = None, end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", method), (":scheme", "https"),
                                     (":authority", self.authority), (":path", path),
                                     *headers], end_stream=end and body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        self.streams[sid] = H2Stream(time.monotonic())
        self.flush()
        return sid

    def get(self, path: str, context: str | None = None) -> int:
        return self.request("GET", path, [("x-user-context", context)] if context else [])

    def hold(self, sid: int, *, connection: bool = False) -> None:
        self.held[sid] = 0
        self.held_connection[sid] = connection

    def release(self, sid: int, extra: int = 0) -> None:
        """Acknowledge what the held stream got (and ``extra`` more on it and the
        connection), and acknowledge from now on."""
        unacked = self.held.pop(sid)
        if self.held_connection.pop(sid):
            self.conn.increment_flow_control_window(unacked + extra, stream_id=sid)
            if extra:
                self.conn.increment_flow_control_window(extra)
        elif unacked:
            self.conn.acknowledge_received_data(unacked, sid)
            if extra:
                self.conn.increment_flow_control_window(extra, stream_id=sid)
                self.conn.increment_flow_control_window(extra)
        self.flush()

    def reset(self, sid: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        self.conn.reset_stream(sid, code)
        self.flush()

    def pump(self, until: Callable[[], bool], timeout: float) -> bool:
        """Read and handle frames until ``until()`` or ``timeout`` s; whether it held."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                return until()
            self.tls.settimeout(min(left, 0.05))
            try:
                data = self.tls.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                self.closed = True
                continue
            for ev in self.conn.receive_data(data):
                self._on(ev)
            self.flush()
        return True

    def run_for(self, seconds: float) -> None:
        self.pump(lambda: False, seconds)

    def wait_done(self, sid: int, timeout: float = 5.0) -> H2Stream:
        self.pump(lambda: self.streams[sid].done, timeout)
        return self.streams[sid]

    def _on(self, ev: h2.events.Event) -> None:
        sid = getattr(ev, "stream_id", None)
        st = self.streams.get(sid) if sid else None
        now = time.monotonic()
        if st is None:
            return
        if isinstance(ev, h2.events.ResponseReceived):
            st.headers = {str(k): str(v) for k, v in ev.headers or []}
            st.headers_at = now - st.start
            st.ended_on_headers = ev.stream_ended is not None
        elif isinstance(ev, h2.events.DataReceived):
            assert sid is not None
            payload = ev.data or b""
            if payload:
                st.data += payload
                st.data_frames += 1
                if st.first_data_at is None:
                    st.first_data_at = now - st.start
            size = ev.flow_controlled_length or 0
            if sid not in self.held:
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.conn.acknowledge_received_data(size, sid)
            else:
                self.held[sid] += size
                if self.held_connection[sid] and size:
                    self.conn.increment_flow_control_window(size)
        elif isinstance(ev, h2.events.TrailersReceived):
            st.trailers = {str(k): str(v) for k, v in ev.headers or []}
        elif isinstance(ev, h2.events.StreamEnded):
            st.ended_at = now - st.start
        elif isinstance(ev, h2.events.StreamReset):
            st.reset, st.reset_at = int(ev.error_code or 0), now - st.start

    def close(self, *, rst: bool = False) -> None:
        if rst:
            _reset_close(self.tls)
        else:
            self.tls.close()


def _wait_let_go(seen: Seen, timeout: float = 3.0) -> float:
    """Wait until the peer saw the proxy stop ``seen``'s answer; seconds it took."""
    start = time.monotonic()
    try:
        wait_until(lambda: seen.let_go, timeout=timeout)
    except TimeoutError:
        raise AssertionError(f"the upstream still answers {seen.path} after {timeout} s "
                             f"(outcome {seen.outcome!r}, {seen.sent_bytes} bytes sent)")
    return time.monotonic() - start


# --- 1. a replaced upstream answer ends at once ----------------------------------------------

SHAPES = {
    "slow": "/sse/{m}?n=0&every=0.2&status=401",  # endless, an event every 0.2 s
    "silent": "/sse/{m}?n=0&delay=3600&status=401",  # the head, then nothing at all
    "delayed": "/sse/{m}?n=3&every=0.1&delay=2&status=401",  # the body 2 s after the head
    "sized-slow": "/blob/{m}?n=20&size=100&every=0.2&status=401",  # Content-Length, 4 s
    "200-challenge": "/sse/{m}?n=0&every=0.2&status=200&challenge=1",
    "403-challenge": "/ndjson/{m}?n=0&every=0.2&status=403&challenge=1",
}


@pytest.mark.parametrize(("shape", "agent", "upstream"), [
    ("slow", "h1", "h1"), ("slow", "h1", "h2"), ("slow", "h2", "h1"), ("slow", "h2", "h2"),
    ("silent", "h1", "h1"), ("silent", "h1", "h2"), ("silent", "h2", "h1"),
    ("silent", "h2", "h2"),
    ("delayed", "h1", "h2"), ("delayed", "h2", "h1"),
    ("sized-slow", "h1", "h1"), ("sized-slow", "h2", "h2"),
    ("200-challenge", "h2", "h1"), ("200-challenge", "h1", "h2"),
    ("403-challenge", "h2", "h2"),
])
def test_a_replaced_upstream_answer_ends_at_once_and_the_upstream_is_let_go(
        env: Env, shape: str, agent: str, upstream: str) -> None:
    """A credentialed request answered 401 (or 200/403 with ``error="invalid_token"``)
    whose body is endless, slow, late or never comes: the agent gets the complete retry or
    reauth problem within QUICK, and none of the upstream's body; its stream ends (HTTP/2:
    END_STREAM, no reset; HTTP/1.1: the next request on the same keep-alive connection is
    answered at once); the peer sees its stream reset or its connection closed."""
    user = env.new_user()
    peer = env.peer(upstream)
    m, m2 = (f"m-{uuid.uuid4().hex[:10]}" for _ in range(2))
    authority = f"localhost:{peer.port}"
    path = SHAPES[shape].format(m=m)
    nxt = f"/sse/{m2}?n=2&every=0.05"
    if agent == "h1":
        a1 = H1Agent(env, authority)
        try:
            a1.send("GET", path, {"Accept": "text/event-stream",
                                  "X-User-Context": env.context(user)})
            r = a1.response(timeout=5)
            a1.send("GET", nxt, {"X-User-Context": env.context()})
            r2 = a1.response(timeout=5)
        finally:
            a1.close()
        got, body, at = (r.status, r.headers.get("x-credproxy-error", "")), r.body, r.at
        ctype = r.headers.get("content-type")
        print(f"\n{shape} h1 agent, upstream {upstream}: {got} in {at * 1000:.0f} ms, "
              f"connection {r.headers.get('connection')!r}; next {r2.status} "
              f"{r2.seqs} in {r2.at * 1000:.0f} ms")
        assert r.headers.get("connection", "").lower() != "close"
        assert (r2.status, r2.seqs) == (200, [0, 1])
        assert r2.at < QUICK
    else:
        a2 = H2Agent(env, authority)
        try:
            sid = a2.request("GET", path, [("accept", "text/event-stream"),
                                           ("x-user-context", env.context(user))])
            st = a2.wait_done(sid, timeout=5)
            sid2 = a2.get(nxt, env.context())
            st2 = a2.wait_done(sid2, timeout=5)
        finally:
            a2.close()
        assert st.headers is not None, st
        got, body = (int(st.headers[":status"]), st.headers.get("x-credproxy-error", "")), \
            bytes(st.data)
        at = st.ended_at if st.ended_at is not None else 99.0
        ctype = st.headers.get("content-type")
        print(f"\n{shape} h2 agent, upstream {upstream}: {got} headers at "
              f"{(st.headers_at or 0) * 1000:.0f} ms, END_STREAM at "
              f"{at * 1000:.0f} ms, reset {st.reset}; next {st2.headers and st2.headers[':status']}"
              f" {st2.seqs} ended at {(st2.ended_at or 99) * 1000:.0f} ms")
        assert st.ended_at is not None, f"no END_STREAM (reset {st.reset})"
        assert st.reset is None
        assert st2.headers is not None and st2.headers[":status"] == "200"
        assert st2.seqs == [0, 1] and st2.ended_at is not None and st2.ended_at < QUICK
    assert got in REPLACED
    assert ctype == "application/problem+json"
    assert json.loads(body)["type"] == f"urn:credproxy:problem:{got[1]}"
    assert UNAUTHORIZED_BODY_MARK.encode() not in body
    assert at < QUICK, f"the complete answer took {at:.3f} s"
    (seen,) = peer.matching(m)
    assert seen.http_version == ("2" if upstream == "h2" else "1.1")
    gone = _wait_let_go(seen)
    print(f"  upstream: {seen.outcome} (code {seen.reset_code}) {gone * 1000:.0f} ms after the "
          f"answer, {seen.sent_bytes} body bytes sent")


# --- 2. gRPC ----------------------------------------------------------------------------------

def _grpc_channel(env: Env, target: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(Path(env.mitm_ca).read_bytes())
    return grpc.secure_channel(target, creds,
                               options=[("grpc.http_proxy", env.stack.proxy_url),
                                        ("grpc.enable_retries", 0)])


GRPC_SHAPES = {"slow": "n=0&every=0.2", "silent": "n=0&delay=3600", "small": "n=1&every=0"}


@pytest.mark.parametrize(("shape", "upstream"), [
    ("slow", "h2"), ("silent", "h2"), ("small", "h2"), ("slow", "h1"), ("silent", "h1"),
])
def test_a_grpc_call_answered_401_upstream_gets_a_grpc_status(env: Env, shape: str,
                                                              upstream: str) -> None:
    """grpcio calls a method the upstream answers with HTTP 401 and an endless, absent or
    small body: the call fails at once with UNAVAILABLE (the token was refreshed: retry) or
    UNAUTHENTICATED (reauth), the slug first in the details, and the upstream is let go."""
    user = env.new_user()
    peer = env.peer(upstream)
    m = f"m-{uuid.uuid4().hex[:10]}"
    method = f"/sse/{m}?status=401&{GRPC_SHAPES[shape]}"
    start = time.monotonic()
    with _grpc_channel(env, f"localhost:{peer.port}") as channel, \
            pytest.raises(grpc.RpcError) as caught:
        list(channel.unary_stream(method)(b"\x01", timeout=5,
                                          metadata=[("x-user-context", env.context(user))]))
    elapsed = time.monotonic() - start
    err: Any = caught.value
    print(f"\ngrpc 401 {shape} upstream {upstream}: {err.code()} {err.details()!r} in "
          f"{elapsed * 1000:.0f} ms")
    slug = err.details().split(":", 1)[0]
    assert (err.code(), slug) in GRPC_REPLACED, (err.code(), err.details())
    meta = dict(err.trailing_metadata() or ()) | dict(err.initial_metadata() or ())
    assert meta.get("x-credproxy-error") == slug
    assert elapsed < QUICK + 1.0  # (grpcio's own connection setup through the proxy)
    (seen,) = peer.matching(m)
    assert seen.method == "POST" and seen.header("content-type") == ["application/grpc"]
    if shape == "small":  # (its body may well be complete before the proxy reads the head)
        wait_until(lambda: not peer.streaming(m), timeout=3)
    else:
        _wait_let_go(seen)


@pytest.mark.parametrize("case", ["unrouted-down", "routed-closes"])
def test_a_grpc_call_to_an_unreachable_upstream_gets_unavailable(env: Env, case: str) -> None:
    """grpcio through the proxy to an upstream that cannot be reached (unrouted: nothing
    listens; routed: every connection closed at once, so TLS fails): UNAVAILABLE with
    ``upstream-unreachable`` first in the details, at once."""
    if case == "unrouted-down":
        target, metadata = f"127.0.0.1:{free_port()}", []
    else:
        target, metadata = f"localhost:{env.closing.port}", [("x-user-context", env.context())]
    start = time.monotonic()
    with _grpc_channel(env, target) as channel, pytest.raises(grpc.RpcError) as caught:
        list(channel.unary_stream("/credproxy.test.Streams/Tick")(b"{}", timeout=5,
                                                                  metadata=metadata))
    elapsed = time.monotonic() - start
    err: Any = caught.value
    print(f"\ngrpc {case}: {err.code()} {err.details()!r} in {elapsed * 1000:.0f} ms")
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    assert err.details().startswith("upstream-unreachable: ")
    assert elapsed < QUICK + 1.0


def _grpc_frames(env: Env, authority: str, path: str, context: str | None) -> tuple[
        H2Agent, int, H2Stream]:
    agent = H2Agent(env, authority)
    headers = [("content-type", "application/grpc"), ("te", "trailers")]
    if context:
        headers.append(("x-user-context", context))
    sid = agent.request("POST", path, headers, body=b"\x00\x00\x00\x00\x01\x01")
    return agent, sid, agent.wait_done(sid, timeout=5)


@pytest.mark.parametrize("case", ["401-slow-h2", "401-silent-h1", "unrouted-down",
                                  "routed-closes"])
def test_a_replaced_grpc_answer_is_one_headers_frame(env: Env, case: str) -> None:
    """On the wire (raw HTTP/2): a gRPC request answered 401 upstream (endless body, or
    none at all), or to an upstream that cannot be reached (unrouted, nothing listening;
    routed, closing every connection), gets ONE HEADERS frame with END_STREAM (gRPC's
    Trailers-Only: ``:status`` 200, ``grpc-status``, ``grpc-message`` "<slug>: ..."), no
    DATA frame and no trailers, at once; the connection then serves another request."""
    m = f"m-{uuid.uuid4().hex[:10]}"
    context: str | None = env.context()
    peer: EventServer | None = None
    if case.startswith("401"):
        context = env.context(env.new_user())
        upstream = case.rsplit("-", 1)[1]
        peer = env.peer(upstream)
        shape = GRPC_SHAPES[case.split("-")[1]]
        authority, path = f"localhost:{peer.port}", f"/sse/{m}?status=401&{shape}"
    elif case == "unrouted-down":
        authority, path, context = f"127.0.0.1:{free_port()}", "/t.S/Unary", None
    else:
        authority, path = f"localhost:{env.closing.port}", "/t.S/Unary"
    agent, sid, st = _grpc_frames(env, authority, path, context)
    try:
        nxt = agent.get(f"/sse/{m}-next?n=1&every=0", env.context()) if peer else None
        after = agent.wait_done(nxt, timeout=5) if nxt is not None else None
    finally:
        agent.close()
    print(f"\ngrpc frames {case}: headers {st.headers}, END_STREAM on HEADERS "
          f"{st.ended_on_headers} at {(st.headers_at or 0) * 1000:.0f} ms, DATA frames "
          f"{st.data_frames}, trailers {st.trailers}, reset {st.reset}")
    assert st.headers is not None, st
    slug = st.headers.get("x-credproxy-error", "")
    code = int(st.headers.get("grpc-status", "-1"))
    if case.startswith("401"):
        assert (grpc.StatusCode.UNAUTHENTICATED if code == 16 else
                grpc.StatusCode.UNAVAILABLE if code == 14 else None, slug) in GRPC_REPLACED
    else:
        assert (code, slug) == (14, "upstream-unreachable")
    assert st.headers[":status"] == "200"
    assert st.headers["content-type"] == "application/grpc"
    assert st.headers["grpc-message"].startswith((f"{slug}%3A ", f"{slug}: "))
    assert st.ended_on_headers, "END_STREAM not on the HEADERS frame"
    assert st.data_frames == 0 and st.trailers is None and st.reset is None
    assert (st.headers_at or 99) < QUICK
    if peer is not None:
        assert after is not None and after.headers is not None
        assert after.headers[":status"] == "200" and after.seqs == [0]
        (seen,) = [s for s in peer.matching(m) if "-next" not in s.path]
        _wait_let_go(seen)


# --- 3. an HTTP/2 agent that stops reading ---------------------------------------------------

STALL = 2.5  # seconds the agent reads nothing of the fast stream
RESUME = 1.0  # seconds it reads again


@pytest.mark.parametrize("upstream", ["h1", "h2"])
def test_an_h2_agent_that_stops_reading_holds_the_upstream_back(env: Env,
                                                                upstream: str) -> None:
    """An HTTP/2 agent asks for an endless stream of 64 KiB events, as fast as the peer
    writes, and sends no WINDOW_UPDATE for STALL s: the proxy stops reading the upstream
    (its RSS grows by a few MiB, the peer gets to send some 10 MiB: 4 MiB the proxy holds
    plus socket buffers, where a proxy that kept reading took 30 MiB/s or more, all held
    in memory); when the agent reads again the stream resumes
    at speed with every event in order; after the agent cancels it, a second stream on the
    same connection is answered."""
    peer = env.peer(upstream)
    m, m2 = (f"m-{uuid.uuid4().hex[:10]}" for _ in range(2))
    agent = H2Agent(env, f"localhost:{peer.port}")
    try:
        with RssPeak(env.proxy_pid()) as rss:
            sid = agent.get(f"/sse/{m}?n=0&every=0&size=65536", env.context())
            agent.hold(sid)
            agent.run_for(STALL)
        st = agent.streams[sid]
        (seen,) = peer.matching(m)
        held_back = seen.sent_bytes
        got_stalled = len(st.data)
        print(f"\nstalled h2 agent, upstream {upstream}: "
              f"{st.headers and st.headers[':status']}, {got_stalled >> 10} KiB reached the "
              f"agent, the peer sent {held_back >> 20} MiB in {STALL} s, proxy RSS "
              f"+{rss.growth >> 20} MiB")
        assert st.headers is not None and st.headers[":status"] == "200"
        assert got_stalled <= 65535  # the agent's initial window, no more
        # Held back: 4 MiB in the proxy plus socket buffers; unread, some 30 MiB/s or more.
        assert rss.growth < 32 << 20, f"proxy RSS grew by {rss.growth >> 20} MiB"
        assert held_back < 32 << 20, f"the peer sent {held_back >> 20} MiB to a stalled agent"
        agent.release(sid, extra=16 << 20)
        t0 = time.monotonic()
        agent.run_for(RESUME)
        resumed = len(st.data) - got_stalled
        rate = resumed / (time.monotonic() - t0)
        seqs = st.seqs
        agent.reset(sid)
        gone = _wait_let_go(seen)
        sid2 = agent.get(f"/sse/{m2}?n=3&every=0.05", env.context())
        st2 = agent.wait_done(sid2, timeout=5)
    finally:
        agent.close()
    print(f"  resumed {resumed >> 20} MiB in {RESUME} s ({rate / 2**20:.0f} MiB/s), events "
          f"{seqs[:1]}..{seqs[-1:]} ({len(seqs)}); upstream {seen.outcome} "
          f"{gone * 1000:.0f} ms after the reset; second stream "
          f"{st2.headers and st2.headers[':status']} {st2.seqs}")
    assert resumed >= 8 << 20, f"only {resumed >> 20} MiB after the agent read again"
    assert seqs == list(range(len(seqs))), "events lost or out of order"
    assert st2.headers is not None and st2.headers[":status"] == "200"
    assert st2.seqs == [0, 1, 2] and st2.ended_at is not None


def test_a_stalled_h2_stream_does_not_hold_up_another_on_its_connection(env: Env) -> None:
    """HTTP/2 flow control is per stream: an agent that stops reading one stream (its
    window shut; the connection's window kept open, as a client that reads its other
    streams does) still gets the others. Stream 1: endless 64 KiB events, unread; after
    1.5 s (the proxy holds 1 MiB of it and stops reading that stream's upstream
    connection), stream 3 asks for three events 50 ms apart: they must come, and the
    stream end, within a second or so. The provider speaks HTTP/1, so each stream has its
    own upstream connection; streams that share one HTTP/2 upstream connection wait
    together (README, "Streams")."""
    peer = env.events_h1
    m, m2 = (f"m-{uuid.uuid4().hex[:10]}" for _ in range(2))
    agent = H2Agent(env, f"localhost:{peer.port}")
    try:
        sid = agent.get(f"/sse/{m}?n=0&every=0&size=65536", env.context())
        agent.hold(sid, connection=True)
        agent.run_for(1.5)
        sid2 = agent.get(f"/sse/{m2}?n=3&every=0.05", env.context())
        st2 = agent.wait_done(sid2, timeout=2.5)
        agent.reset(sid)
    finally:
        agent.close()
    (seen,) = peer.matching(m)
    print(f"\nsecond stream beside a stalled one: {st2.headers and st2.headers[':status']} "
          f"headers at {(st2.headers_at or 0) * 1000:.0f} ms, events {st2.seqs}, ended at "
          f"{st2.ended_at}; the stalled stream's peer sent {seen.sent_bytes >> 20} MiB")
    assert st2.headers is not None and st2.headers[":status"] == "200"
    assert st2.seqs == [0, 1, 2]
    assert st2.ended_at is not None and st2.ended_at < 1.5


# --- 4. more than five concurrent streams to one HTTP/1 upstream -----------------------------

@pytest.mark.parametrize("routed", [True, False], ids=["routed", "unrouted"])
def test_an_h2_agent_gets_many_concurrent_streams_to_an_http1_upstream(env: Env,
                                                                       routed: bool) -> None:
    """Ten endless SSE streams and one short request on one HTTP/2 agent connection to an
    HTTP/1-only provider (one upstream connection each): every endless stream gets its first
    event promptly and the short one is answered (mitmproxy opened at most five upstream
    connections; the sixth stream waited for one of five endless ones to end)."""
    peer = env.events_h1
    m, m2 = (f"m-{uuid.uuid4().hex[:10]}" for _ in range(2))
    host = "localhost" if routed else "127.0.0.1"
    context = env.context() if routed else None
    agent = H2Agent(env, f"{host}:{peer.port}")
    try:
        endless = [agent.get(f"/sse/{m}-{i}?n=0&every=0.2", context) for i in range(10)]
        short = agent.get(f"/sse/{m2}?n=1&every=0", context)
        agent.pump(lambda: all(agent.streams[s].seqs for s in endless)
                   and agent.streams[short].done, timeout=5)
    finally:
        agent.close(rst=True)
    firsts = sorted(agent.streams[s].first_data_at or 99.0 for s in endless)
    sh = agent.streams[short]
    print(f"\n10 endless + 1 short, h2 agent -> h1 upstream ({'routed' if routed else 'unrouted'}"
          f"): first events at {[round(f * 1000) for f in firsts]} ms; short "
          f"{sh.headers and sh.headers[':status']} {sh.seqs} ended at {sh.ended_at}")
    assert firsts[-1] < 2.0, "some streams got no event"
    assert sh.headers is not None and sh.headers[":status"] == "200"
    assert sh.seqs == [0] and sh.ended_at is not None
    assert len(peer.matching(m)) == 10


@pytest.mark.parametrize("streams", [1, 3])
@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
def test_an_h2_agent_leaving_lets_every_http1_upstream_connection_go(env: Env, streams: int,
                                                                     rst: bool) -> None:
    """An HTTP/2 agent with endless streams to an HTTP/1-only provider (one upstream
    connection each) goes away (TCP FIN, or RST): the proxy closes every one of those
    upstream connections (an endless upstream left connected holds a socket and the
    upstream's work for ever)."""
    peer = env.events_h1
    m = f"m-{uuid.uuid4().hex[:10]}"
    agent = H2Agent(env, f"localhost:{peer.port}")
    sids = [agent.get(f"/sse/{m}-{i}?n=0&every=0.05", env.context()) for i in range(streams)]
    try:
        assert agent.pump(lambda: all(agent.streams[s].seqs for s in sids), 5)
    finally:
        agent.close(rst=rst)
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not peer.streaming(m), timeout=2)
    seen = peer.matching(m)
    outcomes = [s.outcome or "still sent" for s in seen]
    print(f"\nh2 agent with {streams} streams to an HTTP/1 upstream left "
          f"({'rst' if rst else 'fin'}): upstream answers {outcomes}, "
          f"{[s.sent_bytes for s in seen]} bytes sent")
    assert len(seen) == streams
    assert all(s.let_go for s in seen), "upstream connections kept after the agent left"


# --- 5. nothing left in flight ---------------------------------------------------------------

def test_sigterm_after_agents_left_exits_at_once_with_nothing_in_flight(env: Env) -> None:
    """On a proxy of its own (a second process on the same config): HTTP/1 and HTTP/2 agents
    with endless streams open (one of them unread, its backlog held), and requests still
    waiting for an upstream connection (a peer whose TCP handshake never completes, and
    one that never answers the TLS handshake; routed and unrouted), all leave (some
    closing, some resetting the TCP connection). mitmproxy runs no error hook for a flow
    still waiting for its connection: without the proxy's own accounting such flows stayed
    "in flight" and a SIGTERM waited out its grace (25 s). Here it exits at once, logging
    nothing still in flight, and the upstream connects were abandoned."""
    (proxy,) = env.stack.start_replicas(1)
    addr = address(proxy.info["proxy_url"])
    m = f"m-{uuid.uuid4().hex[:10]}"
    ctx = env.context()
    silent_before = env.silent.connections
    agents: list[H1Agent | H2Agent] = []
    try:
        h1_stream = H1Agent(env, f"localhost:{env.events_h1.port}", addr)
        agents.append(h1_stream)
        h1_stream.send("GET", f"/sse/{m}-h1?n=0&every=0.1", {"X-User-Context": ctx})
        for authority, headers in [
                (f"localhost:{env.unanswered.port}", {"X-User-Context": ctx}),
                (f"127.0.0.1:{env.unanswered.port}", {}),
                (f"localhost:{env.silent.port}", {"X-User-Context": ctx}),
                (f"127.0.0.1:{env.silent.port}", {})]:
            waiting = H1Agent(env, authority, addr)
            agents.append(waiting)
            waiting.send("GET", f"/{m}-waiting", headers)
        h2_streams = H2Agent(env, f"localhost:{env.events.port}", addr)
        agents.append(h2_streams)
        sids = [h2_streams.get(f"/sse/{m}-h2-{i}?n=0&every=0.1", ctx) for i in range(3)]
        fast = h2_streams.get(f"/sse/{m}-fast?n=0&every=0&size=65536", ctx)
        h2_streams.hold(fast)
        h2_to_h1 = H2Agent(env, f"localhost:{env.events_h1.port}", addr)
        agents.append(h2_to_h1)
        # Seven streams to an HTTP/1 provider: beyond mitmproxy's five upstream connections
        # (the proxy now allows 100), where the sixth and seventh waited for a connection.
        sids_h1 = [h2_to_h1.get(f"/sse/{m}-h2h1-{i}?n=0&every=0.1", ctx) for i in range(7)]
        for port in (env.unanswered.port, env.silent.port):
            h2_waiting = H2Agent(env, f"localhost:{port}", addr)
            agents.append(h2_waiting)
            for i in range(2):
                h2_waiting.get(f"/{m}-h2-waiting-{i}", ctx)
        assert h2_streams.pump(lambda: all(h2_streams.streams[s].seqs for s in sids), 5)
        h2_to_h1.pump(lambda: all(h2_to_h1.streams[s].seqs for s in sids_h1), 3)
        print(f"\n{sum(bool(h2_to_h1.streams[s].seqs) for s in sids_h1)} of 7 streams to "
              f"the HTTP/1 provider got events")
        h2_streams.run_for(0.5)  # the fast stream's backlog builds
        # (an HTTP/2 agent's two streams to one peer wait for one connection)
        wait_until(lambda: env.unanswered.connecting >= 3, timeout=5)
        wait_until(lambda: env.silent.connections - silent_before >= 3, timeout=5)
        got = b""
        while b"data:" not in got:
            chunk = h1_stream.tls.recv(65536)
            assert chunk, got
            got += chunk
    finally:
        for i, agent in enumerate(agents):
            if i % 2:
                _reset_close(agent.tls)
            else:
                agent.tls.close()
    try:
        # The agents' leaving has been handled: their HTTP/2 upstream streams are reset, the
        # upstream connects and TLS handshakes abandoned. (HTTP/1 upstreams of an HTTP/2
        # agent are not let go: see the test before this one.)
        wait_until(lambda: not env.events.streaming(m), timeout=5)
        wait_until(lambda: env.silent.open == 0, timeout=5)
        wait_until(lambda: env.unanswered.connecting == 0, timeout=5)
        time.sleep(0.3)
        print(f"at SIGTERM: {sum(s.outcome == '' for s in env.events_h1.matching(m))} "
              f"HTTP/1 upstream answers still being sent")
        start = time.monotonic()
        proxy.signal(signal.SIGTERM)
        code = proxy.proc.wait(30)
        elapsed = time.monotonic() - start
    finally:
        proxy.close()
    logs = proxy.logs()
    shutdown = [line for line in logs.splitlines() if "in flight" in line]
    print(f"SIGTERM after the agents left: exit {code} after {elapsed * 1000:.0f} ms; "
          f"{shutdown}")
    assert code == 0
    assert elapsed < 5.0, f"exit took {elapsed:.1f} s: the grace was waited out"
    assert "still in flight" not in logs
    assert any("shutting down: 0 requests in flight" in line for line in shutdown), shutdown


# --- 6. HEAD ----------------------------------------------------------------------------------

HEAD_CASES = ["no-context", "no-grant", "upstream-401", "upstream-401-length", "ok"]


def _head_case(env: Env, case: str, m: str) -> tuple[str, dict[str, str],
                                                      set[tuple[int, str]]]:
    """The HEAD request's path, header fields and the (status, slug) pairs it may get."""
    if case == "no-context":
        return f"/sse/{m}", {}, {(407, "user-context-missing")}
    if case == "no-grant":
        return f"/sse/{m}", {"X-User-Context": env.context(env.new_user(()))}, {
            (401, "reauth-required")}
    ctx = {"X-User-Context": env.context(env.new_user() if case != "ok" else None)}
    if case == "upstream-401":
        return f"/sse/{m}?status=401", ctx, REPLACED
    if case == "upstream-401-length":
        return f"/blob/{m}?status=401&n=4&size=1000", ctx, REPLACED
    return f"/blob/{m}?n=2&size=100", ctx, {(200, "")}


@pytest.mark.parametrize("case", HEAD_CASES)
def test_a_head_answer_over_http1_has_no_body_and_the_connection_goes_on(env: Env,
                                                                         case: str) -> None:
    """``http.client`` through the proxy (``set_tunnel``): a HEAD refused (no user context;
    no grant), or answered 401 upstream (without and with a Content-Length), or passed on:
    the answer comes at once and without a body, the connection stays open (no ``Connection:
    close``, the same socket), and the next request on it gets its own answer (a stray body
    would be read as its status line)."""
    peer = env.events_h1
    m, m2 = (f"m-{uuid.uuid4().hex[:10]}" for _ in range(2))
    path, headers, allowed = _head_case(env, case, m)
    host, port = env.proxy_addr
    conn = http.client.HTTPSConnection(host, port, timeout=5,
                                       context=ssl.create_default_context(cafile=env.mitm_ca))
    conn.set_tunnel("localhost", peer.port)
    try:
        start = time.monotonic()
        conn.request("HEAD", path, headers=headers)
        r = conn.getresponse()
        body = r.read()
        at = time.monotonic() - start
        sock = conn.sock
        will_close = r.will_close
        conn.request("GET", f"/sse/{m2}?n=2&every=0.05",
                     headers={"X-User-Context": env.context()})
        r2 = conn.getresponse()
        body2 = r2.read()
        same = conn.sock is sock
    finally:
        conn.close()
    print(f"\nHEAD {case} over HTTP/1.1: {r.status} {r.getheader('x-credproxy-error')} in "
          f"{at * 1000:.0f} ms, {len(body)} body bytes, will_close {will_close}, headers "
          f"{dict(r.getheaders())}; next: {r2.status} on the same socket: {same}")
    assert (r.status, r.getheader("x-credproxy-error") or "") in allowed
    assert body == b""
    assert at < QUICK
    assert not will_close and same
    assert r2.status == 200 and SEQ_ID.findall(body2) == [b"0", b"1"]


@pytest.mark.parametrize("case", HEAD_CASES)
def test_a_head_answer_over_http2_has_no_body_and_the_connection_goes_on(env: Env,
                                                                         case: str) -> None:
    """The same over HTTP/2 (raw frames): the HEAD's answer has no DATA payload and ends its
    stream at once; a GET on the same connection is then answered."""
    peer = env.events
    m, m2 = (f"m-{uuid.uuid4().hex[:10]}" for _ in range(2))
    path, headers, allowed = _head_case(env, case, m)
    agent = H2Agent(env, f"localhost:{peer.port}")
    try:
        sid = agent.request("HEAD", path, [(k.lower(), v) for k, v in headers.items()])
        st = agent.wait_done(sid, timeout=5)
        sid2 = agent.get(f"/sse/{m2}?n=2&every=0.05", env.context())
        st2 = agent.wait_done(sid2, timeout=5)
    finally:
        agent.close()
    print(f"\nHEAD {case} over HTTP/2: {st.headers}, DATA frames {st.data_frames}, END_STREAM "
          f"at {(st.ended_at or 99) * 1000:.0f} ms, reset {st.reset}; next "
          f"{st2.headers and st2.headers[':status']} {st2.seqs}")
    assert st.headers is not None
    assert (int(st.headers[":status"]), st.headers.get("x-credproxy-error", "")) in allowed
    assert st.data == b"" and st.reset is None
    assert st.ended_at is not None and st.ended_at < QUICK
    assert st2.headers is not None and st2.headers[":status"] == "200"
    assert st2.seqs == [0, 1]


# --- 7. more of the same spirit --------------------------------------------------------------

@pytest.mark.parametrize("agent_kind", ["h1", "h2"])
def test_a_replaced_answer_while_the_agent_still_sends_its_body(env: Env,
                                                                agent_kind: str) -> None:
    """A credentialed upload (16 KiB every 20 ms of a 4 MiB body) that the upstream answers
    401 at its head (endless body), before reading it: the agent gets the complete problem
    at once while still sending, the upstream is let go, and only a small share of the body
    ever reached it. HTTP/2: the problem ends the stream (END_STREAM; a RST_STREAM
    NO_ERROR may follow to stop the body), and the connection serves the next stream.
    HTTP/1.1: either the answer says ``Connection: close``, or the connection is kept: the
    agent then sends the rest of its body and its next request, which must be answered
    (not dropped when the proxy closes the connection without a word)."""
    user = env.new_user()
    peer = env.events
    m, m2 = (f"m-{uuid.uuid4().hex[:10]}" for _ in range(2))
    path = f"/sse/{m}?status=401&n=0&every=0.2&early=1"
    block = b"u" * 16384
    total = 4 << 20
    sent = 0
    if agent_kind == "h1":
        a1 = H1Agent(env, f"localhost:{peer.port}")
        try:
            start = time.monotonic()
            a1.tls.sendall(H1Agent.head("POST", path, a1.authority, {
                "X-User-Context": env.context(user), "Content-Length": str(total)}))
            r: H1Response | None = None
            while r is None and time.monotonic() - start < 5:
                with contextlib.suppress(TimeoutError):
                    r = a1.response(timeout=0.02)
                if r is None:
                    a1.tls.sendall(block)
                    sent += len(block)
            elapsed = time.monotonic() - start
            assert r is not None, "no answer while the body was being sent"
            closes = r.headers.get("connection", "").lower() == "close"
            outcome = "Connection: close"
            if not closes:  # kept alive: the rest of the body, then the next request
                a1.tls.sendall(b"u" * (total - sent))
                a1.send("GET", f"/sse/{m2}?n=1&every=0", {"X-User-Context": env.context()})
                t0 = time.monotonic()
                try:
                    r2 = a1.response(timeout=3)
                    outcome = f"next request {r2.status} {r2.seqs}"
                except (TimeoutError, ConnectionError) as exc:
                    outcome = (f"next request: {type(exc).__name__} after "
                               f"{time.monotonic() - t0:.1f} s")
        finally:
            a1.close()
        got = (r.status, r.headers.get("x-credproxy-error", ""))
        body, ctype = r.body, r.headers.get("content-type")
        print(f"\nreplaced while uploading, h1: {got} after {elapsed * 1000:.0f} ms and "
              f"{sent >> 10} KiB sent; connection {r.headers.get('connection')!r}; {outcome}")
        assert closes or outcome == "next request 200 [0]", outcome
    else:
        a2 = H2Agent(env, f"localhost:{peer.port}")
        try:
            start = time.monotonic()
            sid = a2.request("POST", path, [("x-user-context", env.context(user))], end=False)
            st = a2.streams[sid]
            while st.headers is None and not st.done and time.monotonic() - start < 5:
                if a2.conn.local_flow_control_window(sid) >= len(block):
                    a2.conn.send_data(sid, block)
                    sent += len(block)
                    a2.flush()
                a2.pump(lambda: False, 0.02)
            elapsed = time.monotonic() - start
            a2.wait_done(sid, timeout=2)
            a2.pump(lambda: st.reset is not None, 0.3)  # a RST_STREAM(NO_ERROR) may follow
            sid2 = a2.get(f"/sse/{m2}?n=1&every=0", env.context())
            st2 = a2.wait_done(sid2, timeout=5)
        finally:
            a2.close()
        assert st.headers is not None, st
        got = (int(st.headers[":status"]), st.headers.get("x-credproxy-error", ""))
        body, ctype = bytes(st.data), st.headers.get("content-type")
        print(f"\nreplaced while uploading, h2: {got} after {elapsed * 1000:.0f} ms and "
              f"{sent >> 10} KiB sent; END_STREAM {st.ended_at}, reset {st.reset}; next "
              f"{st2.headers and st2.headers[':status']}")
        assert st.ended_at is not None, f"no END_STREAM (reset {st.reset})"
        assert st.reset in (None, h2.errors.ErrorCodes.NO_ERROR)
        assert st2.headers is not None and st2.headers[":status"] == "200"
        assert st2.seqs == [0]
    assert got in REPLACED
    assert ctype == "application/problem+json"
    assert UNAUTHORIZED_BODY_MARK.encode() not in body
    assert elapsed < QUICK
    (seen,) = peer.matching(m)
    _wait_let_go(seen)
    print(f"  the upstream got {seen.body_bytes >> 10} KiB of the body; {seen.outcome}")
    assert seen.body_bytes < 16 << 20


def test_pipelined_requests_after_a_refusal_and_a_replaced_answer(env: Env) -> None:
    """One write, four requests on an HTTP/1.1 keep-alive connection: a HEAD refused (no
    user context), a GET refused (no user context), a GET answered 401 upstream with an
    endless body, then a GET with a short stream: four answers, in order, at once, the last
    with its events; nothing of the refused ones reached the peer."""
    user = env.new_user()
    peer = env.events_h1
    m = f"m-{uuid.uuid4().hex[:10]}"
    authority = f"localhost:{peer.port}"
    agent = H1Agent(env, authority)
    try:
        raw = (H1Agent.head("HEAD", f"/sse/{m}-a", authority, {})
               + H1Agent.head("GET", f"/sse/{m}-b?n=0", authority, {})
               + H1Agent.head("GET", f"/sse/{m}-c?status=401&n=0&every=0.2", authority,
                              {"X-User-Context": env.context(user)})
               + H1Agent.head("GET", f"/sse/{m}-d?n=2&every=0.05", authority,
                              {"X-User-Context": env.context()}))
        start = time.monotonic()
        agent.tls.sendall(raw)
        answers = [agent.response(head=True, timeout=5)]
        answers += [agent.response(timeout=5) for _ in range(3)]
        elapsed = time.monotonic() - start
    finally:
        agent.close()
    got = [(r.status, r.headers.get("x-credproxy-error", "")) for r in answers]
    print(f"\npipelined: {got} in {elapsed * 1000:.0f} ms; last events {answers[3].seqs}")
    assert got[:2] == [(407, "user-context-missing")] * 2
    assert got[2] in REPLACED
    assert got[3] == (200, "") and answers[3].seqs == [0, 1]
    assert elapsed < 2 * QUICK
    assert not peer.saw(f"{m}-a") and not peer.saw(f"{m}-b")
    (seen,) = peer.matching(f"{m}-c")
    _wait_let_go(seen)


@pytest.mark.parametrize("upstream", ["h1", "h2"])
def test_an_agent_cancelling_one_h2_stream_lets_its_upstream_go(env: Env,
                                                                upstream: str) -> None:
    """An HTTP/2 agent with two endless streams resets one (RST_STREAM CANCEL): the peer
    sees that one go at once, the other keeps streaming to the agent."""
    peer = env.peer(upstream)
    m1, m2 = (f"m-{uuid.uuid4().hex[:10]}" for _ in range(2))
    agent = H2Agent(env, f"localhost:{peer.port}")
    try:
        s1 = agent.get(f"/sse/{m1}?n=0&every=0.1", env.context())
        s2 = agent.get(f"/sse/{m2}?n=0&every=0.1", env.context())
        assert agent.pump(lambda: bool(agent.streams[s1].seqs and agent.streams[s2].seqs), 5)
        agent.reset(s1)
        (seen1,) = peer.matching(m1)
        gone = _wait_let_go(seen1)
        before = len(agent.streams[s2].seqs)
        agent.run_for(0.5)
        after = len(agent.streams[s2].seqs)
        (seen2,) = peer.matching(m2)
        still = peer.streaming(m2) and not seen2.let_go
    finally:
        agent.close(rst=True)
    print(f"\ncancel one of two, upstream {upstream}: the peer saw it {seen1.outcome} "
          f"(code {seen1.reset_code}) after {gone * 1000:.0f} ms; the other went on "
          f"{before} -> {after} events")
    assert gone < QUICK
    assert still and after >= before + 3
