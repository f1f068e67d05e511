"""Small pieces the stream tests share: a CONNECT tunnel with TLS to the proxy, and a
process's resident memory sampled while a test runs."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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


def rss(pid: int) -> int:
    """The resident set size of process ``pid``, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


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
