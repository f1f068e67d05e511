"""Benchmark: time to enforcement of ``credproxy revoke`` and ``credproxy suspend`` (each
form) across three replicas under load.

    .venv/bin/python bench/enforcement.py [--trials 10] [--clients 4] [--replicas 3]

Starts a private redis-server, the authorization server, the document API and N
``credproxy run`` replicas coordinated through Redis. Each trial uses a fresh user (and a
fresh user context id), whose token every replica has in memory; ``--clients`` loops per
replica send credentialed requests back to back (``GET /echo/<trial>/<n>``) while the
command runs. The figure per trial is

    (when the document API received the trial's last credentialed request)
    - (when the command returned)

from the document API's own request log (millisecond timestamps, the same host clock): a
request the proxy refuses never reaches it, so its last line for the trial is the last
credential that went out. A negative figure means enforcement was complete before the
command returned (``revoke`` marks the grant, then revokes upstream and deletes before it
returns). Each trial keeps the load running for 2 s after the command returned; a
suspension is lifted (``credproxy resume``) after its trial.

Prints p50 and max per form and writes docs/bench-enforcement.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack.procs import Running  # noqa: E402
from devstack.redisproc import RedisServer  # noqa: E402
from devstack.stack import Stack, build_stack  # noqa: E402

FORMS = {
    "revoke": "credproxy revoke --user U",
    "suspend-user": "credproxy suspend --user U --reason R",
    "suspend-context": "credproxy suspend --context-id ID --reason R",
    "suspend-provider": "credproxy suspend --provider docs --reason R",
}
AFTER = 2.0  # seconds of load after the command returned
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .* GET /echo/([^/\s]+)/\d+ ")


def _cli(s: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    command, *rest = args
    return subprocess.run([sys.executable, "-m", "proxy.cli", command, "--config",
                           str(s.config_path), *rest], capture_output=True, text=True,
                          env={**os.environ, **s.env}, timeout=120)


class Load:
    """``clients`` request loops per proxy in a thread of their own, until stopped."""

    def __init__(self, s: Stack, proxies: list[str], ctx: str, trial: str,
                 clients: int) -> None:
        self.ok = 0
        self.refused = 0
        self.last_ok = 0.0  # wall clock of the last 200 a client received
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(
            self._run(s, proxies, ctx, trial, clients)), daemon=True)
        self._thread.start()

    async def _run(self, s: Stack, proxies: list[str], ctx: str, trial: str,
                   clients: int) -> None:
        pool = [httpx2.AsyncClient(proxy=p, verify=s.mitm_tls(), trust_env=False, timeout=30,
                                   headers={"X-User-Context": ctx}) for p in proxies]
        counter = iter(range(10**9))

        async def loop(client: httpx2.AsyncClient) -> None:
            while not self._stop.is_set():
                try:
                    r = await client.get(f"{s.docs_url}/echo/{trial}/{next(counter)}")
                except httpx2.HTTPError:
                    continue
                if r.status_code == 200:
                    self.ok += 1
                    self.last_ok = time.time()
                else:
                    self.refused += 1
                    await asyncio.sleep(0.005)  # a refused loop does not spin the CPU

        try:
            await asyncio.gather(*[loop(c) for c in pool for _ in range(clients)])
        finally:
            for c in pool:
                await c.aclose()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def _upstream_times(docs: Running, trial: str) -> list[float]:
    """Wall-clock times at which the document API logged a request of ``trial``."""
    out = []
    for line in docs.stderr_text().splitlines():
        m = _LINE.match(line)
        if m and m.group(3) == trial:
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
            out.append(at + int(m.group(2)) / 1000)
    return out


@dataclass(frozen=True)
class Trial:
    """One trial's figures, seconds."""

    returned: float  # last credentialed request upstream, after the command returned
    client: float  # the client's last 200, after the command returned
    stored: float | None  # last credentialed request upstream, after the store (suspend)
    ran: float  # the command's run time
    served: int
    refused: int


def _stored_at(r: subprocess.CompletedProcess[str]) -> float | None:
    """When a suspend command stored its suspension: its ``suspension.added`` audit record,
    written right after the store answered (the audit sink is the command's stdout)."""
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("event") == "suspension.added":
                return datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
    return None


def _trial(s: Stack, proxies: list[str], form: str, n: int, clients: int) -> Trial:
    """One trial of ``form``."""
    user = f"{form}-{n}-{uuid.uuid4().hex[:6]}"
    run = f"run-{uuid.uuid4().hex[:10]}"
    trial = uuid.uuid4().hex[:12]
    s.vault_put(user, s.grant(user))
    ctx = s.context(user, ctx_kind="workflow", ctx_id=run)
    args = {"revoke": ["revoke", "--user", user],
            "suspend-user": ["suspend", "--user", user, "--reason", "bench"],
            "suspend-context": ["suspend", "--context-id", run, "--reason", "bench"],
            "suspend-provider": ["suspend", "--provider", "docs", "--reason", "bench"]}[form]
    load = Load(s, proxies, ctx, trial, clients)
    try:
        deadline = time.monotonic() + 20
        while load.ok < 5 * len(proxies) * clients:  # every replica serves it warm
            if time.monotonic() > deadline:
                raise RuntimeError(f"{form}: the load never got going ({load.refused} "
                                   "refused)")
            time.sleep(0.05)
        started = time.time()
        r = _cli(s, *args)
        returned = time.time()
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {r.stderr[-400:]}")
        time.sleep(AFTER)
    finally:
        load.stop()
        if form.startswith("suspend"):
            lift = _cli(s, "resume", *args[1:3], "--reason", "bench over")
            if lift.returncode != 0:
                raise RuntimeError(f"resume failed: {lift.stderr[-400:]}")
    time.sleep(0.2)  # the document API's last log lines
    seen = _upstream_times(s.docs, trial)
    if not seen:
        raise RuntimeError(f"{form}: the document API logged no request of the trial")
    stored = _stored_at(r)
    return Trial(max(seen) - returned, load.last_ok - returned,
                 None if stored is None else max(seen) - stored, returned - started,
                 load.ok, load.refused)


def _fmt(values: list[float]) -> str:
    return (f"p50 {statistics.median(values) * 1000:+.0f} ms, "
            f"max {max(values) * 1000:+.0f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4, help="request loops per replica")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench-enforcement.md"))
    args = ap.parse_args()
    forms = [f for f in args.forms.split(",") if f]
    with tempfile.TemporaryDirectory(prefix="credproxy-enforcement-") as tmp:
        redis = RedisServer(Path(tmp) / "redis").start()
        s = build_stack(Path(tmp) / "stack", start_proxy=False,
                        config={"coordination": {"backend": "redis", "url": redis.url,
                                                 "key_prefix": "bench:"}})
        try:
            replicas = s.start_replicas(args.replicas)
            proxies = [str(r.info["proxy_url"]) for r in replicas]
            results: dict[str, list[Trial]] = {}
            for form in forms:
                results[form] = []
                for n in range(args.trials):
                    one = _trial(s, proxies, form, n, args.clients)
                    results[form].append(one)
                    after_store = ("" if one.stored is None else
                                   f", {one.stored * 1000:+.0f} ms after it was stored")
                    print(f"{form} trial {n + 1}: last credentialed request upstream "
                          f"{one.returned * 1000:+.0f} ms after the command returned"
                          f"{after_store} (client's last 200: {one.client * 1000:+.0f} ms; "
                          f"the command ran {one.ran:.2f} s); {one.served} served, "
                          f"{one.refused} refused", flush=True)
        finally:
            s.close()
            redis.stop()
    for form, got in results.items():
        stored = [g.stored for g in got if g.stored is not None]
        print(f"{form}: after the command returned {_fmt([g.returned for g in got])}"
              + (f"; after the suspension was stored {_fmt(stored)}" if stored else ""))
    _write(Path(args.out), results, args)
    return 0 if all(max(g.returned for g in got) < 1.0 for got in results.values()) else 1


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    return (f"{statistics.median(values) * 1000:+.0f} / {max(values) * 1000:+.0f} ms")


def _write(path: Path, results: dict[str, list[Trial]], args: argparse.Namespace) -> None:
    lines = [
        "# Time to enforcement: revoke and suspend across replicas",
        "",
        f"`bench/enforcement.py --trials {args.trials} --clients {args.clients} "
        f"--replicas {args.replicas}`, {time.strftime('%Y-%m-%d', time.gmtime())}: "
        f"{args.replicas} `credproxy run` replicas on one redis-server, {args.clients} "
        "request loops per replica sending credentialed requests back to back while the "
        "command runs (2 CPU cores shared by everything, including the load).",
        "",
        "Figure per trial: when the document API received the trial's last credentialed "
        "request, minus when the command returned (the API's own request log, same host "
        "clock). Negative: every replica had stopped before the command returned. Target: "
        "under 1 s.",
        "",
        "| command | trials | after the command returned, p50 / max | after the suspension "
        "was stored, p50 / max | client's last 200, p50 / max | command run time, p50 | "
        "requests served / refused |",
        "|---|---|---|---|---|---|---|",
    ]
    for form, got in results.items():
        lines.append(
            f"| `{FORMS[form]}` | {len(got)} | {_ms([g.returned for g in got])} | "
            f"{_ms([g.stored for g in got if g.stored is not None])} | "
            f"{_ms([g.client for g in got])} | "
            f"{statistics.median(g.ran for g in got):.2f} s | "
            f"{sum(g.served for g in got)} / {sum(g.refused for g in got)} |")
    lines += [
        "",
        "How each reaches the replicas: `revoke` marks the grant in the vault under its "
        "refresh lock and publishes an invalidation before it revokes upstream and deletes "
        "(so it returns after enforcement); `suspend` stores the suspension in the Redis "
        "hash and publishes a message, then writes its audit record and returns; a replica "
        "that missed the message reads the hash within 1 s anyway. \"After the suspension "
        "was stored\" is measured from the command's `suspension.added` audit record, "
        "written as soon as Redis answered: the propagation to the replicas itself, plus "
        "requests a replica had already decided and was still sending upstream. The "
        "command's run time, and the time from its audit record to its exit, are Python "
        "start-up, imports and interpreter shutdown on a host whose CPU the load (and the "
        "other processes on it) keeps busy.",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
