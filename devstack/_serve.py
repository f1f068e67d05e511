"""Shared plumbing for the stack's servers: threaded TLS WSGI serving, ready files, logging.

Werkzeug's threaded server is good enough for hundreds of concurrent connections, with two
adjustments made here:

* TLS handshakes run in the per-connection worker thread. Werkzeug wraps the *listening*
  socket, so every handshake would happen inside ``accept()`` on the single serving thread:
  handshakes would be serialised, and one client that connects without speaking TLS (a port
  probe, a stalled proxy) would stop the whole server from accepting.
* Request logging never shows query strings (authorization codes, ``state``) and scrubs
  anything that looks like one of our tokens, because tests grep the logs for token canaries.

``--clock-offset SECONDS`` runs a server on a skewed clock (a provider whose clock is ahead
of the proxy's): :func:`clock` is what the servers use for token lifetimes, and the ``Date``
response header follows it.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import re
import resource
import socket
import ssl
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

log = logging.getLogger("devstack")

# How long a client may take to complete the TLS handshake before its worker gives up.
HANDSHAKE_TIMEOUT = 10.0
# Idle keep-alive connections are closed after this long so that abandoned clients do not pin
# a thread forever (long enough that no test ever notices).
IDLE_TIMEOUT = 300.0

# Seconds this server's clock runs ahead of the machine's (negative: behind).
CLOCK_OFFSET = 0.0


def clock() -> float:
    """This server's idea of the current unix time (the machine's plus ``--clock-offset``)."""
    return time.time() + CLOCK_OFFSET


_TOKEN_RE = re.compile(r"\b(at|rt)_[A-Za-z0-9_\-]{8,}")
_QUERY_RE = re.compile(r"\?[^\s\"']*")


def scrub(text: str) -> str:
    """Remove query strings and token-looking strings from a log line."""
    return _TOKEN_RE.sub(r"\1_<redacted>", _QUERY_RE.sub("?<redacted>", text))


class QuietRequestHandler(WSGIRequestHandler):
    """Keep-alive capable handler whose log lines never carry secrets.

    It also records the request headers exactly as they arrived (order, case and duplicates),
    which the WSGI environ cannot represent: werkzeug folds duplicates into one comma-joined
    value and silently drops header names that contain an underscore.
    """

    protocol_version = "HTTP/1.1"
    # StreamRequestHandler applies this as the socket timeout of the connection.
    timeout = IDLE_TIMEOUT
    log_requests = True

    def make_environ(self) -> dict[str, Any]:
        environ = super().make_environ()
        environ["devstack.raw_headers"] = [(k, v) for k, v in self.headers.items()]
        return environ

    def date_time_string(self, timestamp: float | None = None) -> str:
        # The Date header of every response: on the skewed clock.
        return super().date_time_string(clock() if timestamp is None else timestamp)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if not self.log_requests:
            return
        path = getattr(self, "path", "")
        path = path.split("?", 1)[0]
        self.log("info", "%s %s %s", getattr(self, "command", "-"), path, code)

    def log(self, type: str, message: str, *args: Any) -> None:
        try:
            text = message % args if args else message
        except (TypeError, ValueError):
            text = message
        getattr(log, type if type in ("info", "warning", "error") else "info")(
            "%s %s", self.client_address[0] if self.client_address else "-", scrub(text)
        )


class DevServer(ThreadedWSGIServer):
    """Threaded WSGI server that performs TLS handshakes in the worker threads."""

    # Werkzeug's default backlog (128) drops SYNs when ~1000 clients connect at once, which
    # shows up as one-second connect stalls; the kernel caps this at somaxconn anyway.
    request_queue_size = 4096
    # Do not join keep-alive worker threads on shutdown; they are daemons.
    block_on_close = False

    def __init__(
        self,
        host: str,
        port: int,
        app: Any,
        handler: type[WSGIRequestHandler],
        tls: ssl.SSLContext | None,
    ) -> None:
        super().__init__(host, port, app, handler)
        # Werkzeug reads ``ssl_context`` only to decide wsgi.url_scheme; the wrapping itself is
        # done per connection in finish_request below.
        self.ssl_context = tls
        self._tls = tls

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handler writes status line, headers and body in separate writes; with Nagle on,
        # each response then waits for the client's delayed ACK (~10-40 ms per request).
        with contextlib.suppress(OSError):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            conn = self._tls.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:
            # Port probes and clients that do not trust us end up here; not worth a traceback.
            log.debug("TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            self.RequestHandlerClass(conn, client_address, self)  # type: ignore[arg-type]
        finally:
            # socketserver would shut down the *raw* socket, which wrap_socket has detached.
            self.shutdown_request(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exception()
        if isinstance(exc, ConnectionError | TimeoutError | ssl.SSLError):
            return  # clients hanging up mid-request are normal under load tests
        super().handle_error(request, client_address)


def server_tls_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    # Offer HTTP/1.1 explicitly: clients that try h2 via ALPN must fall back cleanly.
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def client_tls_context(ca_file: str | os.PathLike[str] | None) -> ssl.SSLContext:
    """A default (strict, hostname-checking) client context that trusts ``ca_file`` only."""
    if ca_file is None:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=os.fspath(ca_file))


def write_ready_file(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Write JSON atomically (temp file + rename) so a poller never reads a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(dict(data)))
    os.replace(tmp, path)


def is_loopback(addr: str | None) -> bool:
    try:
        return addr is not None and ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--cert", help="PEM certificate (HTTPS when given with --key)")
    parser.add_argument("--key", help="PEM private key")
    parser.add_argument("--ready-file", help='write {"url": ...} here once listening')
    parser.add_argument(
        "--no-request-log", action="store_true", help="do not log one line per request"
    )
    parser.add_argument("--debug", action="store_true", help="debug logging")
    parser.add_argument("--clock-offset", type=float, default=0.0,
                        help="run this server's clock that many seconds ahead (negative: "
                             "behind): token lifetimes and the Date header follow it")


def configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # authlib logs whole token responses at DEBUG ("Issue token {...}"); never let them out.
    logging.getLogger("authlib").setLevel(logging.WARNING)
    # We log requests ourselves (sanitised); werkzeug's own logger would repeat them.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # One INFO line per outgoing introspection call is noise under load tests.
    for name in ("httpx2", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def raise_fd_limit(want: int = 65536) -> int:
    """Raise the soft open-files limit towards the hard one (a common default soft limit of
    1024 is less than a thousand keep-alive connections need). Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return int(soft)


def serve(app: Any, args: argparse.Namespace, name: str) -> None:
    """Bind, announce readiness (ready file + one stdout line), then serve until killed."""
    global CLOCK_OFFSET
    CLOCK_OFFSET = float(getattr(args, "clock_offset", 0.0))
    raise_fd_limit()
    if bool(args.cert) != bool(args.key):
        raise SystemExit("--cert and --key must be given together")
    tls = server_tls_context(args.cert, args.key) if args.cert else None

    handler = type("Handler", (QuietRequestHandler,), {"log_requests": not args.no_request_log})
    server = DevServer(args.host, args.port, app, handler, tls)
    port = server.socket.getsockname()[1]
    scheme = "https" if tls else "http"
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"{scheme}://{host}:{port}"
    info = {"url": url, "port": port, "pid": os.getpid(), "name": name}
    if args.ready_file:
        write_ready_file(args.ready_file, info)
    print(f"{name} listening on {url}", flush=True)
    log.info("%s listening on %s", name, url)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

