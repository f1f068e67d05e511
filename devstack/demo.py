"""`credproxy demo`: the whole request path on the embedded default, with real processes.

An authorization server, a TLS document API and the credproxy sidecar run as separate
processes; this process plays the AI agent, sending the *same* request for different users.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2

from devstack.stack import PROVIDER, Stack, build_stack
from proxy import audit as auditlog

_TTY = sys.stdout.isatty()
_OK = "\033[32mok\033[0m" if _TTY else "ok"
_FAIL = "\033[31mFAILED\033[0m" if _TTY else "FAILED"


class _Demo:
    def __init__(self, stack: Stack) -> None:
        self.s = stack
        self.failures: list[str] = []
        self.contexts: list[str] = []

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def step(self, title: str) -> None:
        self.say(f"\n\033[1m== {title}\033[0m" if _TTY else f"\n== {title}")

    def expect(self, what: str, cond: bool) -> None:
        self.say(f"   [{_OK if cond else _FAIL}] {what}")
        if not cond:
            self.failures.append(what)

    def agent_get(self, user: str, path: str, **headers: str) -> httpx2.Response:
        ctx = self.s.context(user)
        self.contexts.append(ctx)
        with self.s.client(context=ctx) as c:
            r = c.get(f"{self.s.docs_url}{path}", headers=headers)
        self.say(f"   agent as {user!r}: GET {path} -> HTTP {r.status_code}")
        return r

    def cli(self, *args: str, stdin: str | None = None) -> str:
        out = subprocess.run([sys.executable, "-m", "proxy.cli", *args, "--config",
                              str(self.s.config_path)], input=stdin, text=True,
                             capture_output=True, env={**_env(), **self.s.env}, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"credproxy {' '.join(args)} failed: {out.stderr}")
        return out.stdout


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def _titles(r: httpx2.Response) -> list[str]:
    return [d["title"] for d in r.json().get("documents", [])]


def run_demo(workdir: Path, keep: bool = False) -> int:
    if workdir.exists():
        shutil.rmtree(workdir)
    print("Starting an OAuth authorization server, a TLS document API and the credproxy "
          "sidecar (embedded default: local encrypted vault, audit to stdout)...", flush=True)
    s = build_stack(workdir)
    d = _Demo(s)
    try:
        _story(d)
        _finish(d)
    finally:
        if keep:
            _kept(s)
        else:
            s.close()
    if d.failures:
        print(f"\n{len(d.failures)} expectation(s) failed: {d.failures}", flush=True)
        return 1
    print("\nDemo complete: every expectation held.", flush=True)
    return 0


def _kept(s: Stack) -> None:
    """--keep: say what is left running and how to stop it (the process ids are also in
    ``<workdir>/pids``)."""
    procs = [r for r in (s.proxy, s.auth, s.docs, *s.extra) if r is not None and r.alive()]
    pids = s.workdir.resolve() / "pids"
    pids.write_text("".join(f"{r.pid}\n" for r in procs))
    print("\nServers left running (--keep): "
          + ", ".join(f"{r.name} (pid {r.pid})" for r in procs)
          + f".\nProxy: {s.proxy_url}; admin: http://{s.config['admin']}; config: "
          f"{s.config_path}\nThe environment they use (vault key, client secrets) is not "
          "saved; the proxy's audit log is in "
          f"{s.workdir / 'logs' / 'credproxy.stdout'}.\n"
          f"Stop them with:  kill $(cat {pids})", flush=True)


def _story(d: _Demo) -> None:
    s = d.s
    d.say(f"   proxy {s.proxy_url}   document API {s.docs_url}   authorization server "
          f"{s.auth.url}")
    d.step("1. Users connect the document system (operator imports their grants)")
    alice = s.grant("alice")
    bob = s.grant("bob", expires_in=0)  # bob's access token has already expired
    for user, grant in (("alice", alice), ("bob", bob)):
        d.cli("vault", "put", "--user", user, "--provider", PROVIDER, stdin=json.dumps(grant))
    d.say("   credproxy vault put --user alice / --user bob  (bob's access token is expired)")
    d.say("   carol never connected.")

    d.step("2. The ethical wall: the same request, two users, two answers")
    ra = d.agent_get("alice", "/documents")
    d.say(f"      alice sees: {_titles(ra)}")
    rb = d.agent_get("bob", "/documents")
    d.say(f"      bob sees:   {_titles(rb)}")
    d.expect("alice sees Acme documents and no Globex ones",
             ra.status_code == 200 and any("Acme" in t for t in _titles(ra))
             and not any("Globex merger" in t for t in _titles(ra)))
    d.expect("bob sees the Globex merger and no Acme documents",
             rb.status_code == 200 and any("Globex merger" in t for t in _titles(rb))
             and not any("Acme" in t for t in _titles(rb)))
    stats = s.stats()
    d.expect("bob's expired token was refreshed transparently (1 call to the token endpoint)",
             stats["refresh_by_user"].get("bob") == 1)

    d.step("3. What the document API actually received")
    echo = d.agent_get("bob", "/echo", Authorization="Bearer shared-service-account")
    got = {k.lower(): v for k, v in echo.json()["headers"]}
    d.say("      Authorization: Bearer <bob's own token>   (the agent's shared-account "
          "header was replaced)")
    d.say(f"      X-User-Context present upstream: {'x-user-context' in got}")
    d.expect("the upstream got bob's own token, not the agent's header, and no user context",
             got.get("authorization", "").startswith("Bearer at_")
             and "shared-service-account" not in got.get("authorization", "")
             and "x-user-context" not in got)

    d.step("4. A user with no connection gets an explicit re-authorization error")
    rc = d.agent_get("carol", "/documents")
    d.say("      " + json.dumps(rc.json()))
    d.expect("carol gets 401 reauth-required (no_connection), never a shared fallback",
             rc.status_code == 401 and rc.json().get("reason") == "no_connection")

    d.step("5. The provider revokes alice's grant")
    with s.admin() as c:
        c.post("/_admin/revoke", json={"refresh_token": alice["refresh_token"]})
    d.say("   (revoked at the authorization server, access and refresh token; the proxy still\n"
          "    has the access token cached: the upstream's 401 gets one forced refresh, which\n"
          "    the provider refuses with invalid_grant)")
    ra2 = d.agent_get("alice", "/documents")
    d.say("      " + json.dumps(ra2.json()))
    d.expect("the upstream 401 became reauth-required (revoked_upstream)",
             ra2.status_code == 401 and ra2.json().get("reason") == "revoked_upstream")

    d.step("6. credproxy connections  (never shows token values)")
    for line in d.cli("connections").splitlines():
        d.say("      " + line)


def _finish(d: _Demo) -> None:
    s = d.s
    assert s.proxy is not None
    d.step("7. The audit trail (credproxy's stdout, one JSON line per decision)")
    lines = [x for x in s.proxy.stdout_text().splitlines() if x.startswith("{")]
    for line in lines:
        d.say("   " + auditlog.format_record(json.loads(line)))
    report = auditlog.verify(lines)
    d.say(f"   credproxy audit verify: {'ok' if report.ok else 'BROKEN'} "
          f"({report.records} records, hash chain intact)")
    d.expect("the audit hash chain verifies", report.ok)
    # Every secret this run produced, for the canary test that greps all output for them.
    canaries: dict[str, Any] = {
        "tokens": s.issued_tokens(),
        "contexts": d.contexts,
        "env": list(s.env.values()),
    }
    (s.workdir / "canaries.json").write_text(json.dumps(canaries))
