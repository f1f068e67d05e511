"""Large bodies stream through the proxy (stream_large_bodies): a big download or upload
does not sit in the proxy's memory."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.docapi import large_body_sha256
from devstack.stack import Stack, build_stack

pytestmark = pytest.mark.integration

SIZE = 256 * 1024 * 1024
# Far below SIZE: a buffered body would push the proxy's peak RSS up by at least SIZE.
MAX_GROWTH = 96 * 1024 * 1024


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = build_stack(Path(tmp_path_factory.mktemp("stream")))
    s.vault_put("streamer", s.grant("streamer"))
    yield s
    s.close()


def test_large_download_and_upload_stream_with_bounded_memory(fresh: Stack) -> None:
    assert fresh.proxy is not None
    with fresh.client(context=fresh.context("streamer"), timeout=120) as c:
        c.get(f"{fresh.docs_url}/large", params={"bytes": 1024 * 1024})  # warm-up
        before = _peak_rss(fresh.proxy.pid)
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
    growth = _peak_rss(fresh.proxy.pid) - before
    print(f"proxy peak RSS growth: {growth >> 20} MiB for 2 x {SIZE >> 20} MiB")
    assert growth < MAX_GROWTH, f"proxy peak RSS grew by {growth >> 20} MiB"
