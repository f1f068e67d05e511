"""Benchmark: coordination across replicas through Redis, standalone and Redis Cluster.

    .venv/bin/python bench/coordination.py [--topology both|standalone|cluster]
                                           [--replicas 4] [--storms 5] [--waiters 200]

For each topology, starts a private Redis (one redis-server; or a Redis Cluster of 3
primaries and 3 replicas, created with redis-cli --cluster create, where every refresh lock
is confirmed by a replica: replica_acks 1), the authorization server, the document API and
N credproxy replicas, then measures:

1. Refresh storms: W concurrent requests, spread over the replicas, for one user whose
   access token has just expired. Reports token-endpoint calls per storm (target: exactly
   1) and the latency of the waiting requests (p50/p99/max).
2. Vault reads per 1,000 requests across the replicas, for 50 users with valid tokens,
   with the shared (Redis) cache on and off.

Prints the figures side by side and writes them to docs/bench-coordination.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack.redisproc import RedisServer  # noqa: E402
from devstack.redistopo import RedisCluster  # noqa: E402
from devstack.stack import Stack, build_stack  # noqa: E402

TOPOLOGIES = {"standalone": "one redis-server",
              "cluster": "Redis Cluster, 3 primaries + 3 replicas, replica_acks 1"}


async def _storm(s: Stack, proxies: list[str], user: str, waiters: int) -> list[float]:
    ctx = s.context(user)
    clients = [httpx2.AsyncClient(proxy=p, verify=s.mitm_tls(), trust_env=False, timeout=60,
                                  limits=httpx2.Limits(max_connections=waiters))
               for p in proxies]

    async def one(i: int) -> float:
        t = time.perf_counter()
        r = await clients[i % len(clients)].get(f"{s.docs_url}/echo",
                                                headers={"X-User-Context": ctx})
        if r.status_code != 200:
            raise RuntimeError(f"storm request failed: {r.status_code} {r.text[:200]}")
        return time.perf_counter() - t

    try:
        return await asyncio.gather(*[one(i) for i in range(waiters)])
    finally:
        for c in clients:
            await c.aclose()


async def _spread(s: Stack, proxies: list[str], users: list[str], n: int) -> None:
    contexts = {u: s.context(u) for u in users}
    clients = [httpx2.AsyncClient(proxy=p, verify=s.mitm_tls(), trust_env=False, timeout=60)
               for p in proxies]
    rnd = random.Random(7)  # noqa: S311 (a repeatable load pattern, not a secret)
    try:
        for start in range(0, n, 50):
            batch = [(rnd.choice(users), rnd.choice(clients)) for _ in range(min(50, n - start))]
            rs = await asyncio.gather(*[c.get(f"{s.docs_url}/echo",
                                              headers={"X-User-Context": contexts[u]})
                                        for u, c in batch])
            assert all(r.status_code == 200 for r in rs)
    finally:
        for c in clients:
            await c.aclose()


def _vault_reads(s: Stack) -> int:
    total = 0
    for r in s.extra:
        if r.name.startswith("replica-"):
            r.close()
            m = re.findall(r"broker stats: vault_reads=(\d+)", r.stderr_text())
            total += int(m[-1]) if m else 0
    s.extra = [r for r in s.extra if not r.name.startswith("replica-")]
    return total


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topology", choices=["both", *TOPOLOGIES], default="both")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--storms", type=int, default=5)
    ap.add_argument("--waiters", type=int, default=200)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench-coordination.md"))
    args = ap.parse_args()
    topologies = list(TOPOLOGIES) if args.topology == "both" else [args.topology]
    columns = {t: dict(measure(args, t)) for t in topologies}
    names = list(columns[topologies[0]])
    header = ["measure", *topologies]
    table = [header, *([name, *(columns[t][name] for t in topologies)] for name in names)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print("\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                    for row in table))
    md = ["# Coordination benchmark", "",
          f"`bench/coordination.py --topology {args.topology}`, run "
          f"{time.strftime('%Y-%m-%d')} on a 2-core machine shared with other work (Redis, "
          "the servers and every credproxy replica on the same two cores).", "",
          *(f"- {t}: {TOPOLOGIES[t]}" for t in topologies), "",
          "| " + " | ".join(header) + " |", "|---" * len(header) + "|",
          *("| " + " | ".join(row) + " |" for row in table[1:]), ""]
    Path(args.out).write_text("\n".join(md))
    return 0


def measure(args: argparse.Namespace, topology: str = "standalone") -> list[tuple[str, str]]:
    """Refresh storms and vault reads on ``topology`` (standalone: one redis-server;
    cluster: 3 primaries + 3 replicas); also called by bench/perf.py."""
    work = Path(tempfile.mkdtemp(prefix="credproxy-bench-"))
    redis: RedisServer | RedisCluster
    if topology == "cluster":
        redis = RedisCluster(work / "cluster").start()
        coordination = {"backend": "redis", "mode": "cluster", "url": redis.url,
                        "nodes": [str(n) for n in redis.nodes]}
    else:
        redis = RedisServer(work / "redis").start()
        coordination = {"backend": "redis", "url": redis.url}
    rows: list[tuple[str, str]] = []
    try:
        s = build_stack(work / "stack", start_proxy=False,
                        config={"coordination": coordination})
        try:
            proxies = [str(r.info["proxy_url"]) for r in s.start_replicas(args.replicas)]
            calls, latencies = [], []
            for i in range(args.storms):
                user = f"storm-{i}"
                s.vault_put(user, s.grant(user, expires_in=0))
                before = s.stats()["refresh_calls"]
                latencies += asyncio.run(_storm(s, proxies, user, args.waiters))
                calls.append(s.stats()["refresh_calls"] - before)
            rows.append((f"refresh storm: token-endpoint calls per storm ({args.storms} storms "
                         f"x {args.waiters} requests, {args.replicas} replicas)",
                         ", ".join(map(str, calls))))
            rows.append(("refresh storm: waiting request latency p50 / p99 / max (ms)",
                         f"{statistics.median(latencies) * 1000:.0f} / "
                         f"{_pct(latencies, 99) * 1000:.0f} / {max(latencies) * 1000:.0f}"))
            users = [f"reader-{i}" for i in range(50)]
            for u in users:
                s.vault_put(u, s.grant(u))
            _vault_reads(s)  # reset: restart replicas so counters start at zero
            for shared in (True, False):
                s.config["coordination"] = {**s.config["coordination"], "shared_cache": shared}
                s.write_config()
                proxies = [str(r.info["proxy_url"]) for r in s.start_replicas(args.replicas)]
                asyncio.run(_spread(s, proxies, users, args.requests))
                reads = _vault_reads(s)
                rows.append((f"vault reads per {args.requests} requests, 50 users, "
                             f"{args.replicas} replicas, shared cache "
                             f"{'on' if shared else 'off'}", str(reads)))
        finally:
            s.close()
    finally:
        redis.stop()
    return rows


if __name__ == "__main__":
    sys.exit(main())
