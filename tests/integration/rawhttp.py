"""A deliberately low-level HTTP client for sending what well-behaved clients will not:
a CONNECT to one host with a Host header naming another, odd SNI, absolute-form requests."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from dataclasses import dataclass
from typing import Any


@dataclass
class RawResponse:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def problem(self) -> str | None:
        return self.headers.get("X-Credproxy-Error")


def _read(sock: socket.socket) -> RawResponse:
    resp = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
    resp.begin()
    body = resp.read()
    return RawResponse(resp.status, resp.headers, body)


def request(proxy: str, *, connect: str | None, host_header: str | None, path: str = "/",
            method: str = "GET", headers: dict[str, str] | None = None,
            proxy_authorization: str | None = None, sni: str | None = None,
            ca_file: str | None = None, tls: bool = True, absolute: str | None = None,
            timeout: float = 15.0) -> RawResponse:
    """CONNECT to ``connect`` (if given), TLS with ``sni``, then one request."""
    host, _, port = proxy.removeprefix("http://").rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        if connect is not None:
            lines = [f"CONNECT {connect} HTTP/1.1", f"Host: {connect}"]
            if proxy_authorization:
                lines.append(f"Proxy-Authorization: {proxy_authorization}")
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("proxy closed during CONNECT")
                buf += chunk
            status = int(buf.split(b" ", 2)[1])
            if status != 200:
                return RawResponse(status, http.client.HTTPMessage(), buf)
            if tls:
                ctx = ssl.create_default_context(cafile=ca_file)
                ctx.check_hostname = False  # we pick odd SNIs on purpose
                sock = ctx.wrap_socket(sock, server_hostname=sni or connect.rsplit(":", 1)[0])
        target = absolute or path
        lines = [f"{method} {target} HTTP/1.1"]
        if host_header is not None:
            lines.append(f"Host: {host_header}")
        if connect is None and proxy_authorization:
            lines.append(f"Proxy-Authorization: {proxy_authorization}")
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        lines += ["Connection: close", "Content-Length: 0"]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return _read(sock)
    finally:
        sock.close()
