"""Benchmark: credproxy against plain mitmproxy, in one run on one machine.

    .venv/bin/python bench/perf.py [--seconds 5] [--quick]

Measures, printing a table and writing docs/bench-perf.md:

1. HTTPS throughput and p50/p99 latency through credproxy (cache hit, valid user context),
   through plain `mitmdump` with no addon, and direct (no proxy), at 1 and 16 keep-alive
   connections. The load generator is a minimal asyncio HTTP/1.1 client (CONNECT, TLS,
   keep-alive), the same for all three, so ratios compare the proxies rather than clients.
2. User-context verification cost per request (EdDSA, ES256, RS256, HS256), with a fresh
   token each time and with the same token reused (the verification cache).
3. Streaming: the proxy's peak RSS growth while 1 GiB downloads and 1 GiB uploads pass.
4. Memory: RSS idle and with 10,000 distinct users' tokens cached.
5. Startup time to ready (the proxy port accepts, /readyz answers 200).
6. Refresh storm with Redis (when redis-server is installed): token-endpoint calls per
   storm and the waiting requests' latency (bench/coordination.py, which also measures
   vault reads with the shared cache on and off).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from devstack.procs import free_port, start_server, tcp_check  # noqa: E402
from devstack.stack import Stack, build_stack  # noqa: E402


# -- a small HTTP/1.1 client ----------------------------------------------------------------
async def _connection(proxy: tuple[str, int] | None, target: tuple[str, int],
                      tls: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = target
    if proxy is None:
        return await asyncio.open_connection(host, port, ssl=tls, server_hostname=host)
    reader, writer = await asyncio.open_connection(*proxy)
    writer.write(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"CONNECT failed: {head[:60]!r}")
    await writer.start_tls(tls, server_hostname=host)
    return reader, writer


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   raw: bytes) -> int:
    writer.write(raw)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    if length:
        await reader.readexactly(length)
    return status


async def _load(proxy: tuple[str, int] | None, target: tuple[str, int], tls: ssl.SSLContext,
                headers: dict[str, str], connections: int,
                seconds: float) -> tuple[int, list[float]]:
    host, port = target
    lines = ["GET /echo HTTP/1.1", f"Host: {host}:{port}", "Content-Length: 0"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        reader, writer = await _connection(proxy, target, tls)
        try:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                if await _request(reader, writer, raw) != 200:
                    errors += 1
                latencies.append(time.perf_counter() - t)
        finally:
            writer.close()

    await asyncio.gather(*[worker() for _ in range(connections)])
    return errors, latencies


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def _rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


# -- the measurements -----------------------------------------------------------------------
def throughput(s: Stack, seconds: float, rows: list[tuple[str, str]],
               upstream_port: int) -> None:
    mitm_port = free_port()
    plain = start_server(
        [str(Path(sys.executable).parent / "mitmdump"), "-q", "--listen-host", "127.0.0.1",
         "--listen-port", str(mitm_port), "--set", f"confdir={s.config['ca_dir']}",
         "--set", f"ssl_verify_upstream_trusted_ca={s.ca.cert_path}"],
        ready=tcp_check("127.0.0.1", mitm_port), python=False, name="plain-mitmdump",
        log_dir=s.workdir / "logs")
    try:
        user = "bench-user"
        s.vault_put(user, s.grant(user))
        ctx = {"X-User-Context": s.context(user, ttl=900)}
        target = ("localhost", upstream_port)
        mitm_tls = ssl.create_default_context(cafile=str(s.mitm_ca))
        direct_tls = ssl.create_default_context(cafile=str(s.ca.cert_path))
        cred = ("127.0.0.1", int(s.config["listen"].rsplit(":", 1)[1]))
        # Warm up (TLS sessions, the token cache, the verification cache).
        asyncio.run(_load(cred, target, mitm_tls, ctx, 2, 1.0))
        asyncio.run(_load(("127.0.0.1", mitm_port), target, mitm_tls, {}, 2, 1.0))
        for conns in (1, 16):
            results = {}
            for name, proxy, tls, hdrs in (
                ("direct", None, direct_tls, {}),
                ("mitmdump", ("127.0.0.1", mitm_port), mitm_tls, {}),
                ("credproxy", cred, mitm_tls, ctx),
            ):
                errors, lat = asyncio.run(_load(proxy, target, tls, hdrs, conns, seconds))
                if errors:
                    raise RuntimeError(f"{name}: {errors} failed requests")
                results[name] = (len(lat) / seconds, statistics.median(lat), _pct(lat, 99))
            for name, (rps, p50, p99) in results.items():
                rows.append((f"{conns} conn: {name} req/s, p50 / p99 ms",
                             f"{rps:.0f}, {p50 * 1000:.2f} / {p99 * 1000:.2f}"))
            c, m = results["credproxy"], results["mitmdump"]
            rows.append((f"{conns} conn: credproxy / mitmdump throughput",
                         f"{c[0] / m[0]:.2f}x"))
            rows.append((f"{conns} conn: credproxy - mitmdump added p50",
                         f"{(c[1] - m[1]) * 1000:+.2f} ms"))
    finally:
        plain.close()


def verification(rows: list[tuple[str, str]], n: int) -> None:
    from joserfc import jwt
    from joserfc.jwk import ECKey, KeySet, OctKey, OKPKey, RSAKey

    from proxy.identity import IdentityVerifier, KeySource
    from proxy.secret import Secret
    from proxy.settings import IdentitySettings

    now = int(time.time())
    keys = {"EdDSA": OKPKey.generate_key("Ed25519", parameters={"kid": "k"}),
            "ES256": ECKey.generate_key("P-256", parameters={"kid": "k"}),
            "RS256": RSAKey.generate_key(2048, parameters={"kid": "k"}),
            "HS256": OctKey.import_key(b"x" * 32)}
    for alg, key in keys.items():
        if alg == "HS256":
            os.environ["BENCH_HS"] = "x" * 32
            ident = IdentitySettings(issuer="i", audience="a", hs256_secret_env="BENCH_HS",
                                     algorithms=["HS256"])
        else:
            ident = IdentitySettings(issuer="i", audience="a", jwks_file="unused",
                                     algorithms=[alg])
        source = (KeySource.from_settings(ident) if alg == "HS256"
                  else KeySource(KeySet([key])))
        tokens = [jwt.encode({"alg": alg, "typ": "user-context+jwt", "kid": "k"},
                             {"iss": "i", "aud": "a", "sub": f"u{i}", "iat": now,
                              "exp": now + 600, "jti": str(i)}, key, algorithms=[alg])
                  for i in range(n)]

        async def run(fresh: bool, tokens: list[str] = tokens,
                      source: KeySource = source, ident: IdentitySettings = ident) -> float:
            v = IdentityVerifier(ident, source)
            await v.verify(Secret(tokens[0]))
            t = time.perf_counter()
            for i in range(n):
                await v.verify(Secret(tokens[i] if fresh else tokens[0]))
            return (time.perf_counter() - t) / n

        fresh = asyncio.run(run(True))
        reused = asyncio.run(run(False))
        rows.append((f"verify {alg}: fresh token / reused token (µs)",
                     f"{fresh * 1e6:.0f} / {reused * 1e6:.1f}"))


def streaming(s: Stack, rows: list[tuple[str, str]], size: int) -> None:
    import hashlib

    import httpx2

    assert s.proxy is not None
    user = "bench-stream"
    s.vault_put(user, s.grant(user))
    with s.client(context=s.context(user), timeout=600) as c:
        c.get(f"{s.docs_url}/large", params={"bytes": 1 << 20})
        base = _rss(s.proxy.pid, "VmHWM")
        t = time.perf_counter()
        h = hashlib.sha256()
        with c.stream("GET", f"{s.docs_url}/large", params={"bytes": size}) as r:
            for chunk in r.iter_bytes(1 << 20):
                h.update(chunk)
        down = time.perf_counter() - t

        def body():  # type: ignore[no-untyped-def]
            block = b"u" * (1 << 20)
            for _ in range(size >> 20):
                yield block

        t = time.perf_counter()
        up = c.post(f"{s.docs_url}/upload", content=body(),
                    headers={"Content-Length": str(size)})
        assert up.status_code == 200 and up.json()["bytes"] == size
        upload = time.perf_counter() - t
    growth = _rss(s.proxy.pid, "VmHWM") - base
    mib = size >> 20
    rows.append((f"stream {mib} MiB down + {mib} MiB up: proxy peak RSS growth",
                 f"{growth / 2**20:.1f} MiB"))
    rows.append((f"stream {mib} MiB: download / upload MiB/s",
                 f"{mib / down:.0f} / {mib / upload:.0f}"))
    del httpx2


def memory(s: Stack, rows: list[tuple[str, str]], users: int) -> None:
    from proxy.secret import Secret
    from proxy.tokenset import TokenSet
    from proxy.vault.base import Grant
    from proxy.vault.keys import load_key
    from proxy.vault.local import LocalVault

    assert s.proxy is not None
    rows.append(("RSS idle (after warm-up)", f"{_rss(s.proxy.pid) / 2**20:.1f} MiB"))

    async def seed() -> None:
        vault = LocalVault.open(s.config["vault"]["path"],
                                load_key(key_env="CREDPROXY_VAULT_KEY", key_file=None,
                                         environ=s.env))
        exp = time.time() + 3600
        for i in range(users):
            await vault.put(Grant(f"mem-{i}", "docs",
                                  TokenSet(Secret(f"at_mem_{i}_" + "x" * 40),
                                           Secret(f"rt_mem_{i}_" + "y" * 40),
                                           expires_at=exp, scope="documents.read")))
        await vault.close()

    asyncio.run(seed())
    contexts = [s.context(f"mem-{i}", ttl=900) for i in range(users)]
    docs_port = int(next(h for h in s.config["providers"][0]["hosts"]
                         if h.startswith("localhost:") and h != s.docs_url[8:]
                         ).rsplit(":", 1)[1])
    target = ("localhost", docs_port)
    tls = ssl.create_default_context(cafile=str(s.mitm_ca))
    cred = ("127.0.0.1", int(s.config["listen"].rsplit(":", 1)[1]))

    async def touch_all() -> None:
        reader, writer = await _connection(cred, target, tls)
        try:
            for ctx in contexts:
                raw = (f"GET /x HTTP/1.1\r\nHost: localhost:{docs_port}\r\n"
                       f"Content-Length: 0\r\nX-User-Context: {ctx}\r\n\r\n").encode()
                assert await _request(reader, writer, raw) == 200
        finally:
            writer.close()

    before = _rss(s.proxy.pid)
    asyncio.run(touch_all())
    after = _rss(s.proxy.pid)
    rows.append((f"RSS with {users} users' tokens cached (growth)",
                 f"{after / 2**20:.1f} MiB ({(after - before) / 2**20:+.1f} MiB)"))


def startup(s: Stack, rows: list[tuple[str, str]]) -> None:
    import httpx2

    port, admin = free_port(), free_port()
    cfg = json.loads(json.dumps(s.config))
    cfg.update(listen=f"127.0.0.1:{port}", admin=f"127.0.0.1:{admin}")
    import yaml

    path = s.workdir / "startup.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t = time.perf_counter()
    proc = start_server(["-m", "proxy.cli", "run", "--config", str(path)],
                        ready=tcp_check("127.0.0.1", port), env=s.env, name="startup",
                        log_dir=s.workdir / "logs")
    accepting = time.perf_counter() - t
    while httpx2.get(f"http://127.0.0.1:{admin}/readyz", trust_env=False).status_code != 200:
        time.sleep(0.01)
    ready = time.perf_counter() - t
    proc.close()
    rows.append(("startup: proxy port accepting / /readyz 200",
                 f"{accepting:.2f} s / {ready:.2f} s"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench-perf.md"))
    args = ap.parse_args()
    rows: list[tuple[str, str]] = []
    work = Path(tempfile.mkdtemp(prefix="credproxy-perf-"))
    s = build_stack(work, start_proxy=False,
                    config={"audit": {"sink": str(work / "audit.jsonl")}})
    up_port = free_port()
    upstream = start_server(
        [str(ROOT / "bench" / "upstream.py"), "--port", str(up_port),
         "--cert", str(work / "pki" / "server.pem"), "--key", str(work / "pki" / "server.key")],
        ready=tcp_check("127.0.0.1", up_port), name="bench-upstream", log_dir=work / "logs")
    s.extra.append(upstream)
    s.config["providers"][0]["hosts"].append(f"localhost:{up_port}")
    s.write_config()
    s.start_proxy()
    try:
        throughput(s, 1.0 if args.quick else args.seconds, rows, up_port)
        verification(rows, 200 if args.quick else 2000)
        streaming(s, rows, (64 if args.quick else 1024) << 20)
        memory(s, rows, 1000 if args.quick else 10_000)
        startup(s, rows)
    finally:
        s.close()
    import shutil

    if shutil.which("redis-server"):
        from coordination import measure

        ns = argparse.Namespace(replicas=3, storms=2 if args.quick else 5, waiters=200,
                                requests=200 if args.quick else 1000)
        rows += measure(ns)
    else:
        rows.append(("refresh storm", "skipped: redis-server not installed"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    if not args.quick:
        md = ["# Performance benchmark", "",
              f"`bench/perf.py`, run {time.strftime('%Y-%m-%d')} on this project's 2-core "
              "machine; every figure comes from the same run. Ratios compare credproxy with "
              "plain `mitmdump` (no addon) under the same load against the same upstream.",
              "", "| measure | result |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows],
              ""]
        Path(args.out).write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
