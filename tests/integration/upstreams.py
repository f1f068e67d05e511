"""Upstreams that show what a next hop reads, for the request-path tests.

* :class:`RawUpstream`: a strict HTTP/1.1 server (TLS) that parses each request off the
  connection the way RFC 9112 says (Content-Length, chunked with trailers) and records every
  request it parsed: request line, raw header fields, body. A body sent without framing shows
  up as extra requests, exactly as a real server would see it. Paths choose the answer:
  ``/trailers`` answers chunked with a trailer section, ``/early`` answers 103 and 102
  before its 200, ``/switch`` answers ``101`` to a protocol named ``foo`` whatever was
  asked, anything else ``200`` with the record as JSON.
* :class:`NginxUpstream`: nginx as a shared TLS front end with two virtual hosts (the
  provider's name and ``other-tenant.example``), routing by the request-target as RFC 9112
  section 3.2.2 says; each answers with the virtual host that served it and the credential
  headers it read (``$http_authorization``, ``$http_x_api_key``, underscores allowed).
* :class:`WsgiUpstream`: a real WSGI server (the standard library's wsgiref) that answers with
  the ``HTTP_*`` environ a WSGI application reads: ``X_Api_Key`` and ``X-Api-Key`` both land
  in ``HTTP_X_API_KEY``, joined with a comma.
"""

from __future__ import annotations

import json
import shutil
import socket
import socketserver
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from devstack.procs import Running, free_port, start_server, tcp_check


@dataclass
class Parsed:
    line: str
    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


def _fields(reader: _Reader) -> list[tuple[str, str]]:
    out = []
    while (line := reader.line()) != b"":
        name, _, value = line.decode("latin-1").partition(":")
        out.append((name, value.strip()))
    return out


class RawUpstream:
    def __init__(self, cert: Path, key: Path, host: str = "127.0.0.1") -> None:
        self.requests: list[Parsed] = []
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(["http/1.1"])
        upstream = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    sock = ctx.wrap_socket(self.request, server_side=True)
                except (ssl.SSLError, OSError):
                    return
                sock.settimeout(10)
                try:
                    upstream._serve(sock)
                except (EOFError, OSError, ValueError):
                    pass
                finally:
                    sock.close()

        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(socketserver.ThreadingTCPServer):
            address_family = family
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server((host, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _serve(self, sock: ssl.SSLSocket) -> None:
        reader = _Reader(sock)
        while True:
            line = reader.line().decode("latin-1")
            if not line:
                continue
            headers = _fields(reader)
            parsed = Parsed(line, headers, b"")
            te = ",".join(parsed.header("Transfer-Encoding")).lower()
            if "chunked" in te:
                body = b""
                while True:
                    size = int(reader.line().split(b";")[0], 16)
                    if size == 0:
                        parsed.trailers = _fields(reader)
                        break
                    body += reader.exactly(size)
                    reader.exactly(2)
                parsed.body = body
            elif parsed.header("Content-Length"):
                parsed.body = reader.exactly(int(parsed.header("Content-Length")[0]))
            self.requests.append(parsed)
            path = line.split(" ")[1] if " " in line else ""
            if path.endswith("/early"):
                sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
                             b"HTTP/1.1 102 Processing\r\n\r\n"
                             b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
                continue
            if path.endswith("/switch"):
                # Switches to "foo" whatever the request asked for (a lax or hostile server);
                # what follows on the connection is still recorded as requests.
                sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\n"
                             b"Connection: Upgrade\r\n\r\n")
                continue
            if path.endswith("/trailers"):
                sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                             b"Content-Type: text/plain\r\n\r\n5\r\nhello\r\n"
                             b"0\r\nX-Checksum: abc\r\n\r\n")
                continue
            body = json.dumps({"line": line, "headers": headers,
                               "body": parsed.body.decode("latin-1")}).encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def saw(self, marker: str) -> bool:
        return any(marker in r.line for r in self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class WsgiUpstream:
    def __init__(self, cert: Path, key: Path) -> None:
        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            seen = {k: v for k, v in environ.items() if k.startswith("HTTP_")}
            body = json.dumps(seen).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]

        self.server: WSGIServer = make_server("127.0.0.1", 0, app,
                                              handler_class=_QuietHandler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    underscores_in_headers on;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        location / {{
            return 200 "vhost=provider auth=$http_authorization key=$http_x_api_key\\n";
        }}
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name other-tenant.example;
        location / {{
            return 200 "vhost=other-tenant auth=$http_authorization key=$http_x_api_key\\n";
        }}
    }}
}}
"""


class NginxUpstream:
    def __init__(self, cert: Path, key: Path, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.workdir = workdir
        conf = workdir / "nginx.conf"
        conf.write_text(_NGINX_CONF.format(d=workdir, cert=cert, key=key, port=self.port))
        self.proc: Running = start_server(
            [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-p", str(workdir)],
            ready=tcp_check("127.0.0.1", self.port),
            python=False, name="nginx", log_dir=workdir / "logs")

    def access_log(self) -> str:
        path = self.workdir / "access.log"
        return path.read_text() if path.exists() else ""

    def close(self) -> None:
        self.proc.close()
