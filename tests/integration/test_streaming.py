"""Large bodies stream through the proxy (stream_large_bodies): a big download or upload
does not sit in the proxy's memory, and a refused upload gets its problem answer without
crashing mitmproxy, reaching the upstream, or leaving its bytes in any log."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.docapi import large_body_sha256
from devstack.stack import Stack, build_stack
from tests.integration.streamkit import rss

pytestmark = pytest.mark.integration

SIZE = 256 * 1024 * 1024
# Far below SIZE: a buffered body would push the proxy's peak RSS up by at least SIZE.
MAX_GROWTH = 96 * 1024 * 1024


class _Listener:
    """A TCP port that only counts the connections it is offered."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


@pytest.fixture(scope="module")
def canary() -> Iterator[_Listener]:
    listener = _Listener()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory, canary: _Listener) -> Iterator[Stack]:
    s = build_stack(Path(tmp_path_factory.mktemp("stream")), start_proxy=False)
    # A provider whose only host is the canary: a request to it that the proxy refuses must
    # not even open a connection there.
    docs = s.config["providers"][0]
    s.write_config(providers=[*s.config["providers"],
                              {**docs, "id": "canary", "hosts": [f"localhost:{canary.port}"]}])
    try:
        s.start_proxy()
    except Exception:
        s.close()
        raise
    s.vault_put("streamer", s.grant("streamer"))
    yield s
    s.close()


PATTERN = b"REFUSED-UPLOAD-BODY|"
UPLOAD = 4 * 1024 * 1024  # well above stream_large_bodies (1m): mitmproxy streams it


def _upload(size: int, chunked: bool) -> bytes | Iterator[bytes]:
    block = PATTERN * (65536 // len(PATTERN))
    if not chunked:
        return (block * (size // len(block) + 1))[:size]

    def gen() -> Iterator[bytes]:  # no length known up front: Transfer-Encoding: chunked
        left = size
        while left > 0:
            yield block[:left]
            left -= len(block)

    return gen()


def _refused(fresh: Stack, canary: _Listener, case: str, body: bytes | Iterator[bytes]
             ) -> Any:
    headers: dict[str, str] = {}
    if case != "missing-context":
        headers["X-User-Context"] = fresh.context("streamer")  # no grant for "canary"
    if case == "host-mismatch":
        headers["Host"] = f"elsewhere.example:{canary.port}"
    with fresh.client(timeout=60) as c:
        return c.post(f"https://localhost:{canary.port}/upload", content=body, headers=headers)


def _assert_clean_logs(fresh: Stack) -> None:
    assert fresh.proxy is not None and fresh.proxy.alive()
    logs = fresh.proxy.logs()
    assert PATTERN not in logs.encode()
    for bad in ("Traceback", "crashed", "AssertionError", "NotImplementedError"):
        assert bad not in logs, bad


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(("case", "status", "slug"), [
    ("missing-context", 407, "user-context-missing"),
    ("no-connection", 401, "reauth-required"),
    ("host-mismatch", 421, "misdirected-request"),
])
def test_refused_large_upload_gets_the_same_problem_as_a_small_one(
        fresh: Stack, canary: _Listener, case: str, status: int, slug: str,
        chunked: bool) -> None:
    small = _refused(fresh, canary, case, b"tiny")
    large = _refused(fresh, canary, case, _upload(UPLOAD, chunked))
    for r in (small, large):
        assert r.status_code == status, r.text
        assert r.headers["X-Credproxy-Error"] == slug
    # The large body is not read: the answer closes the connection (addons/compat.py,
    # item 7); the small one keeps it. Otherwise the two answers are the same.
    assert large.headers.get("connection") == "close" and "connection" not in small.headers
    assert {k: v for k, v in large.headers.items() if k != "connection"} == dict(small.headers)
    bodies = [json.loads(r.content) for r in (small, large)]
    assert bodies[0].pop("instance") != bodies[1].pop("instance")
    assert bodies[0] == bodies[1]
    if status == 401:
        assert large.headers["WWW-Authenticate"].startswith('Bearer realm="credproxy"')
    assert canary.accepted == 0  # not even a connection to the refused destination
    _assert_clean_logs(fresh)


def test_refused_large_upload_never_reaches_a_live_upstream(fresh: Stack) -> None:
    marker = "refused-large-upload"
    with fresh.client(timeout=60) as c:
        r = c.post(f"{fresh.docs_url}/echo/{marker}", content=_upload(UPLOAD, False))
        ok = c.post(f"{fresh.docs_url}/upload", content=_upload(UPLOAD, True),
                    headers={"X-User-Context": fresh.context("streamer")})
    assert r.status_code == 407 and r.headers["X-Credproxy-Error"] == "user-context-missing"
    assert not fresh.docs_saw(marker)
    # With a user context the same upload streams through to the upstream, intact.
    assert ok.status_code == 200
    assert ok.json() == {"bytes": UPLOAD, "sha256": hashlib.sha256(
        b"".join(_upload(UPLOAD, True))).hexdigest()}
    _assert_clean_logs(fresh)


def test_refused_huge_upload_is_discarded_with_bounded_memory(fresh: Stack,
                                                              canary: _Listener) -> None:
    assert fresh.proxy is not None
    before = rss(fresh.proxy.pid, "VmHWM")
    r = _refused(fresh, canary, "missing-context", _upload(SIZE, True))
    assert r.status_code == 407
    growth = rss(fresh.proxy.pid, "VmHWM") - before
    print(f"proxy peak RSS growth: {growth >> 20} MiB for a refused {SIZE >> 20} MiB upload")
    assert growth < MAX_GROWTH, f"proxy peak RSS grew by {growth >> 20} MiB"
    assert canary.accepted == 0
    _assert_clean_logs(fresh)


def test_large_download_and_upload_stream_with_bounded_memory(fresh: Stack) -> None:
    assert fresh.proxy is not None
    with fresh.client(context=fresh.context("streamer"), timeout=120) as c:
        c.get(f"{fresh.docs_url}/large", params={"bytes": 1024 * 1024})  # warm-up
        before = rss(fresh.proxy.pid, "VmHWM")
        digest = hashlib.sha256()
        with c.stream("GET", f"{fresh.docs_url}/large", params={"bytes": SIZE}) as r:
            assert r.status_code == 200
            for chunk in r.iter_bytes(1 << 20):
                digest.update(chunk)
        assert digest.hexdigest() == large_body_sha256(SIZE)

        def body() -> Iterator[bytes]:
            block = b"u" * (1 << 20)
            for _ in range(SIZE >> 20):
                yield block

        up = c.post(f"{fresh.docs_url}/upload", content=body(),
                    headers={"Content-Length": str(SIZE)})
        assert up.status_code == 200
        assert up.json()["bytes"] == SIZE
    growth = rss(fresh.proxy.pid, "VmHWM") - before
    print(f"proxy peak RSS growth: {growth >> 20} MiB for 2 x {SIZE >> 20} MiB")
    assert growth < MAX_GROWTH, f"proxy peak RSS grew by {growth >> 20} MiB"


def test_http2_agent_upload_without_length_arrives_whole(fresh: Stack,
                                                         tmp_path: Path) -> None:
    """An HTTP/2-capable agent (curl --http2, as Go clients do by default) streams an upload
    of unknown length. mitmproxy would forward it to this HTTP/1 provider with no framing
    (an empty body upstream), so credproxy offers agents HTTP/1.1 only (`http2: false`)."""
    import shutil
    import subprocess

    curl = shutil.which("curl")
    assert curl is not None, "curl is needed for this test"
    user = "h2-uploader"
    fresh.vault_put(user, fresh.grant(user))
    body = hashlib.sha256(b"seed").digest() * (3_000_000 // 32)
    payload = tmp_path / "upload.bin"
    payload.write_bytes(body)
    assert fresh.proxy is not None
    out = subprocess.run(
        [curl, "-sS", "--http2", "-x", fresh.proxy_url, "--cacert", str(fresh.mitm_ca),
         "-H", f"X-User-Context: {fresh.context(user)}", "-H", "Transfer-Encoding: chunked",
         "--data-binary", f"@{payload}", "-w", "\n%{http_version}",
         f"{fresh.docs_url}/upload"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    answer, version = out.stdout.rsplit("\n", 1)
    assert version == "1.1"  # the proxy did not offer HTTP/2
    got = json.loads(answer)
    assert got == {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
