"""Small pieces the stream tests share: their peers routed as providers, a user's grants,
the environment's proxy, a CONNECT tunnel with TLS to the proxy, and a process's resident
memory sampled while a test runs."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devstack.stack import Stack


def tunnel(proxy: tuple[str, int], authority: str, ca: str,
           alpn: Sequence[str] | None = None) -> ssl.SSLSocket:
    """CONNECT ``authority`` through the proxy at ``proxy``, then TLS trusting the proxy's
    CA ``ca``, offering ``alpn`` (none when None)."""
    sock = socket.create_connection(proxy, timeout=10)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        assert chunk, buf
        buf += chunk
    assert buf.startswith(b"HTTP/1.1 200"), buf
    ctx = ssl.create_default_context(cafile=ca)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx.wrap_socket(sock, server_hostname=authority.rsplit(":", 1)[0])


def rss(pid: int, field: str = "VmRSS") -> int:
    """The resident set size of process ``pid`` (``field``: ``VmRSS`` now, ``VmHWM`` its
    peak so far), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


class RssPeak:
    """Samples process ``pid``'s RSS every 20 ms while in use; :attr:`growth` is the peak
    over the value at the start, bytes."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = self.peak = rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


def address(proxy_url: str) -> tuple[str, int]:
    """(host, port) of an ``http://host:port`` proxy URL."""
    host, _, port = proxy_url.removeprefix("http://").rpartition(":")
    return host, int(port)


def route_peers(stack: Stack, ports: Mapping[str, int]) -> None:
    """Make each peer a provider (id -> its port) at ``localhost:<port>``, a copy of the
    stack's document provider; the same peers reached as ``127.0.0.1:<port>`` are unrouted
    (passthrough). Then HTTP/2 towards agents, and start the proxy."""
    docs = stack.config["providers"][0]
    stack.config["providers"] += [{**docs, "id": pid, "hosts": [f"localhost:{port}"]}
                                  for pid, port in ports.items()]
    stack.write_config(http2=True)
    stack.start_proxy()


def grant(stack: Stack, user: str, providers: Iterable[str]) -> None:
    """Give ``user`` one grant, stored for each of ``providers``."""
    token_response = stack.grant(user)
    for provider in providers:
        stack.vault_put(user, token_response, provider=provider)


@dataclass
class StreamEnv:
    """What the stream test modules' environments share: the stack and its proxy."""

    stack: Stack

    @property
    def proxy_addr(self) -> tuple[str, int]:
        return address(self.stack.proxy_url)

    @property
    def mitm_ca(self) -> str:
        return str(self.stack.mitm_ca)

    def proxy_pid(self) -> int:
        assert self.stack.proxy is not None
        return self.stack.proxy.pid
