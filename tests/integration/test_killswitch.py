"""The kill switch (issue 16 item 3): ``credproxy suspend`` / ``resume`` of a user, a user
context or a provider, through three real ``credproxy run`` sidecars on a real
redis-server, and on one sidecar without Redis (a file beside the local vault).

Each form stops every sidecar within a second of the command returning, with 403
``suspended`` naming the suspension (never the operator's reason), nothing forwarded, the
refusal audited; ``resume`` restores access without a new consent. Suspensions survive a
restart, reach a sidecar that missed the message, show in ``/metrics``,
``credproxy connections`` and ``credproxy suspensions``, and the command refuses bad input
and an unreachable Redis without changing anything. (The cluster and Sentinel topologies:
``test_topologies.py``, ``_Suite.test_suspend_reaches_every_sidecar_within_a_second``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import redis

from devstack.procs import Running, free_port
from devstack.redisproc import RedisServer
from devstack.stack import Stack, build_stack

pytestmark = pytest.mark.integration

PREFIX = "ks:"
_users = iter(range(1_000_000))


def cli(s: Stack, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``credproxy <args> --config`` as an operator would."""
    command, *rest = args
    return subprocess.run([sys.executable, "-m", "proxy.cli", command, "--config",
                           str(config or s.config_path), *rest], capture_output=True,
                          text=True, env={**os.environ, **s.env}, timeout=90)


def cli_records(r: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """The audit records a command wrote (the stack's audit sink is stdout)."""
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def records(proc: Running) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout_text().splitlines()
            if line.startswith("{")]


def get(s: Stack, proxy: str, ctx: str, path: str = "/echo") -> httpx2.Response:
    with s.client_via(proxy, context=ctx) as c:
        return c.get(f"{s.docs_url}{path}")


def within(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``check`` holds; AssertionError after ``timeout``. A request that the
    suspension cut while it was under way (the proxy resets it) counts as not yet."""
    start = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - start
        except httpx2.TransportError:
            pass
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def metric(admin: str, line_start: str) -> float:
    text = httpx2.get(f"{admin}/metrics", trust_env=False).text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def suspended(r: httpx2.Response) -> bool:
    return r.status_code == 403 and r.headers.get("X-Credproxy-Error") == "suspended"


@pytest.fixture(scope="module")
def fleet(module_redis: RedisServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, list[Running]]]:
    s = build_stack(Path(tmp_path_factory.mktemp("killswitch")), start_proxy=False,
                    config={"coordination": {"backend": "redis", "url": module_redis.url,
                                             "key_prefix": PREFIX}})
    replicas = s.start_replicas(3)
    yield s, replicas
    s.close()


def proxies(replicas: list[Running]) -> list[str]:
    return [str(r.info["proxy_url"]) for r in replicas]


def hash_of(server: RedisServer) -> redis.Redis:
    """A plain client on the fleet's Redis, to look at (or write) the suspensions hash."""
    return redis.Redis.from_url(server.url, socket_timeout=5)


def new_user(s: Stack) -> str:
    user = f"ks-{next(_users)}"
    s.vault_put(user, s.grant(user))
    return user


# -- each form, on every replica -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["user", "context", "provider"])
def test_each_form_stops_every_replica_within_a_second_and_resume_restores_it(
        fleet: tuple[Stack, list[Running]], kind: str) -> None:
    s, replicas = fleet
    user, bystander = new_user(s), new_user(s)
    run = f"run-{uuid.uuid4().hex[:8]}"
    ctx = s.context(user, ctx_kind="workflow", ctx_id=run)
    # The same user in another run: stopped by a user suspension, not by a context one.
    other_run = s.context(user, ctx_id=f"other-{run}")
    for p in proxies(replicas):  # every replica has the token in memory
        assert get(s, p, ctx).status_code == 200
    version = s.vault_get(user).version
    selector = {"user": ["--user", user], "context": ["--context-id", run],
                "provider": ["--provider", "docs"]}[kind]
    r = cli(s, "suspend", *selector, "--reason", "incident 4711: agent loop")
    returned = time.monotonic()
    assert r.returncode == 0, r.stderr
    assert "suspended" in r.stderr and "within 1 s" in r.stderr
    try:
        for p in proxies(replicas):
            within(f"{kind} suspension on {p}", lambda p=p: suspended(get(s, p, ctx)),
                   max(0.05, 1.0 - (time.monotonic() - returned)))
        elapsed = time.monotonic() - returned
        assert elapsed <= 1.0, elapsed
        marker = f"m-{uuid.uuid4().hex[:12]}"
        for p in proxies(replicas):
            refused = get(s, p, ctx, f"/echo/{marker}")
            body = refused.json()
            assert refused.status_code == 403 and body["type"] == "urn:credproxy:problem:suspended"
            assert body["reason"] == "suspended" and body["provider"] == "docs"
            assert body["suspension"]["kind"] == kind
            assert body["suspension"]["since"].endswith("Z")
            assert "administrator" in body["detail"]
            assert "4711" not in refused.text  # the operator's reason stays in the audit
        assert not s.docs_saw(marker)  # nothing forwarded
        # Who else is stopped: the provider form stops everyone, the user form the user's
        # other runs, the context form only that run.
        assert suspended(get(s, proxies(replicas)[0], s.context(bystander))) is (
            kind == "provider")
        assert suspended(get(s, proxies(replicas)[0], other_run)) is (kind != "context")
    finally:
        lift = cli(s, "resume", *selector, "--reason", "fixed")
    assert lift.returncode == 0, lift.stderr
    lifted = time.monotonic()
    for p in proxies(replicas):
        within(f"resume on {p}", lambda p=p: get(s, p, ctx).status_code == 200,
               max(0.05, 1.0 - (time.monotonic() - lifted)))
    # Not a revocation: the same grant, never marked, no new consent.
    stored = s.vault_get(user)
    assert stored.version == version and stored.status == "active"
    # Audited: who and why by the command; the refusals by the replicas.
    added = [x for x in cli_records(r) if x["event"] == "suspension.added"]
    assert len(added) == 1 and added[0]["detail"] == "incident 4711: agent loop"
    assert added[0]["actor"]["kind"] == "cli" and "@" in added[0]["actor"]["id"]
    assert added[0]["outcome"] == "suspended"
    subject = {"user": (user, None, None), "context": (None, None, run),
               "provider": (None, "docs", None)}[kind]
    assert (added[0]["user"], added[0]["provider"],
            (added[0]["context"] or {}).get("id")) == subject
    gone = [x for x in cli_records(lift) if x["event"] == "suspension.lifted"]
    assert len(gone) == 1 and gone[0]["detail"] == "fixed" and gone[0]["actor"]["kind"] == "cli"
    denied = [x for rep in replicas for x in records(rep)
              if x["event"] == "credential.denied" and x["reason"] == "suspended"
              and x["user"] == user and (x["context"] or {}).get("id") == run]
    assert len(denied) >= len(replicas)
    assert all(x["request"]["path"].startswith("/echo") for x in denied)


def test_a_replica_that_missed_the_message_still_honours_it_within_the_bound(
        fleet: tuple[Stack, list[Running]], module_redis: RedisServer) -> None:
    """The record written straight into the hash, no message published (as if every
    replica had missed it): each re-reads the hash every second."""
    s, replicas = fleet
    user = new_user(s)
    ctx = s.context(user)
    for p in proxies(replicas):
        assert get(s, p, ctx).status_code == 200
    record = {"kind": "user", "value": user, "since": time.time(), "by": "cli:test@host",
              "reason": "written without a message"}
    with hash_of(module_redis) as r:
        r.hset(f"{PREFIX}suspensions", f"user:{user}", json.dumps(record))
        written = time.monotonic()
        try:
            for p in proxies(replicas):
                within(f"missed message on {p}", lambda p=p: suspended(get(s, p, ctx)),
                       max(0.05, 1.6 - (time.monotonic() - written)))
        finally:
            r.hdel(f"{PREFIX}suspensions", f"user:{user}")
    assert time.monotonic() - written <= 1.6  # RESYNC_EVERY (1 s) + a request's time


def test_a_restarted_replica_honours_a_suspension_from_its_first_request(
        fleet: tuple[Stack, list[Running]]) -> None:
    s, _ = fleet
    user = new_user(s)
    assert cli(s, "suspend", "--user", user, "--reason", "left the firm").returncode == 0
    try:
        (fresh,) = s.start_replicas(1, name="restarted")
        try:
            r = get(s, str(fresh.info["proxy_url"]), s.context(user))
            assert suspended(r), r.text
            assert metric(str(fresh.info["admin_url"]),
                          'credproxy_suspensions{kind="user"}') >= 1
        finally:
            fresh.close()
            s.extra.remove(fresh)
    finally:
        cli(s, "resume", "--user", user, "--reason", "test over")


def test_metrics_connections_and_the_list_show_suspensions(
        fleet: tuple[Stack, list[Running]]) -> None:
    s, replicas = fleet
    user = new_user(s)
    run = f"run-{uuid.uuid4().hex[:8]}"
    admin = str(replicas[0].info["admin_url"])
    before = metric(admin, 'credproxy_denials_total{problem="suspended",provider="docs",'
                           'reason="suspended"}')
    assert cli(s, "suspend", "--user", user, "--reason", "audit hold").returncode == 0
    assert cli(s, "suspend", "--context-id", run, "--reason", "runaway run").returncode == 0
    try:
        within("gauges", lambda: all(
            metric(str(rep.info["admin_url"]), 'credproxy_suspensions{kind="user"}') >= 1
            and metric(str(rep.info["admin_url"]), 'credproxy_suspensions{kind="context"}') >= 1
            for rep in replicas), 1.0)
        assert metric(admin, "credproxy_suspensions_synced_timestamp_seconds") > time.time() - 5
        assert suspended(get(s, proxies(replicas)[0], s.context(user)))
        assert metric(admin, 'credproxy_denials_total{problem="suspended",provider="docs",'
                             'reason="suspended"}') == before + 1
        table = cli(s, "connections", "--user", user)
        assert table.returncode == 0, table.stderr
        head, row = table.stdout.splitlines()[:2]
        assert "SUSPENDED" in head and "user since" in row
        assert "user context(s) suspended" in table.stderr
        rows = [json.loads(x) for x in cli(s, "connections", "--user", user,
                                           "--json").stdout.splitlines()]
        assert rows[0]["suspended"]["kind"] == "user"
        assert rows[0]["suspended"]["reason"] == "audit hold"
        assert rows[0]["status"] == "active"  # not revoked
        listed = [json.loads(x) for x in cli(s, "suspensions", "--json").stdout.splitlines()]
        assert {("user", user), ("context", run)} <= {(x["kind"], x["value"]) for x in listed}
        # The user sees it too: GET /v1/connections and the self-service page, never the
        # operator's reason.
        with httpx2.Client(trust_env=False, timeout=10) as c:
            mine = c.get(f"{admin}/v1/connections",
                         headers={"X-User-Context": s.context(user)}).json()
            [docs] = [x for x in mine["connections"] if x["provider"] == "docs"]
            assert docs["suspended"]["kind"] == "user" and docs["status"] == "active"
            in_run = c.get(f"{admin}/v1/connections",
                           headers={"X-User-Context": s.context(user, ctx_id=run)}).json()
            assert all(x["suspended"] is not None for x in in_run["connections"])
            c.get(f"{admin}/connections", params={"context": s.context(user)})
            page = c.get(f"{admin}/connections").text
            assert "Suspended" in page and "user suspended since" in page
            assert "audit hold" not in page and "audit hold" not in json.dumps(mine)
            # A suspended user connects nothing new (the agent's link, the page's form);
            # the refusal is audited. Disconnecting stays possible.
            link = c.get(f"{admin}/connect/docs", params={"context": s.context(user)})
            assert link.status_code == 400 and "suspended" in link.text, link.text
            assert link.headers["x-frame-options"] == "DENY"
            refused = [r for r in records(replicas[0]) if r["event"] == "connection.created"
                       and r["user"] == user and r["reason"] == "suspended"]
            assert refused and refused[-1]["outcome"] == "rejected"
            assert refused[-1]["actor"] == {"kind": "user", "id": user}
    finally:
        cli(s, "resume", "--user", user, "--reason", "done")
        cli(s, "resume", "--context-id", run, "--reason", "done")


def test_an_mcp_request_gets_the_suspension_as_a_json_rpc_error(
        fleet: tuple[Stack, list[Running]]) -> None:
    s, replicas = fleet
    user = new_user(s)
    assert cli(s, "suspend", "--user", user, "--reason", "mcp check").returncode == 0
    try:
        within("suspension", lambda: suspended(get(s, proxies(replicas)[0], s.context(user))),
               1.0)
        with s.client_via(proxies(replicas)[0], context=s.context(user)) as c:
            r = c.post(f"{s.docs_url}/mcp", json={"jsonrpc": "2.0", "id": 7,
                                                  "method": "tools/call",
                                                  "params": {"name": "lookup"}},
                       headers={"Accept": "application/json, text/event-stream",
                                "MCP-Protocol-Version": "2025-06-18"})
        body = r.json()
        assert r.status_code == 200 and body["id"] == 7
        assert body["error"]["code"] == -32011
        assert body["error"]["data"]["slug"] == "suspended"
        assert body["error"]["data"]["suspension"]["kind"] == "user"
    finally:
        cli(s, "resume", "--user", user, "--reason", "done")


# -- bad input: a clear error, nothing stored, nothing audited --------------------------------


@pytest.mark.parametrize(("args", "message"), [
    pytest.param(["--reason", "x"], "exactly one of", id="no-selector"),
    pytest.param(["--user", "a", "--provider", "docs", "--reason", "x"], "exactly one of",
                 id="two-selectors"),
    pytest.param(["--user", "a", "--context-id", "c", "--reason", "x"], "exactly one of",
                 id="user-and-context"),
    pytest.param(["--user", "", "--reason", "x"], "--user: empty", id="empty-user"),
    pytest.param(["--user", "   ", "--reason", "x"], "--user: empty", id="blank-user"),
    pytest.param(["--context-id", "", "--reason", "x"], "--context-id: empty",
                 id="empty-context"),
    pytest.param(["--user", "bad\u0007user", "--reason", "x"], "control characters",
                 id="control-in-user"),
    pytest.param(["--user", " alice", "--reason", "x"], "surrounding spaces",
                 id="padded-user"),
    pytest.param(["--user", "u" * 257, "--reason", "x"], "1-256", id="long-user"),
    pytest.param(["--provider", "nope", "--reason", "x"], "no provider with id 'nope'",
                 id="unknown-provider"),
    pytest.param(["--user", "alice"], "--reason is required", id="missing-reason"),
    pytest.param(["--user", "alice", "--reason", "  "], "--reason is required",
                 id="blank-reason"),
    pytest.param(["--user", "alice", "--reason", "r" * 301], "at most 300", id="long-reason"),
    pytest.param(["--user", "alice", "--reason", "line\nbreak"], "control characters",
                 id="control-in-reason"),
])
def test_bad_suspend_input_is_refused_and_changes_nothing(
        fleet: tuple[Stack, list[Running]], module_redis: RedisServer, args: list[str],
        message: str) -> None:
    s, _ = fleet
    with hash_of(module_redis) as client:
        before = client.hgetall(f"{PREFIX}suspensions")
        r = cli(s, "suspend", *args)
        assert r.returncode == 1 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert cli_records(r) == []
        assert client.hgetall(f"{PREFIX}suspensions") == before


def test_resume_of_what_is_not_suspended_says_so(fleet: tuple[Stack, list[Running]]) -> None:
    s, _ = fleet
    r = cli(s, "resume", "--user", "nobody-suspended", "--reason", "x")
    assert r.returncode == 1 and "is not suspended; nothing changed" in r.stderr
    assert cli_records(r) == []
    assert cli(s, "resume", "--user", "x").returncode == 1  # a reason is required too


@pytest.mark.parametrize("command", ["suspend", "resume", "suspensions", "connections"])
def test_redis_down_fails_loudly(fleet: tuple[Stack, list[Running]], command: str) -> None:
    """Never "suspended" when it is not: the command exits 1 saying nothing changed."""
    s, _ = fleet
    dead = {**s.config, "coordination": {"backend": "redis", "op_timeout": 0.5,
                                         "url": f"redis://127.0.0.1:{free_port()}/0"}}
    path = s.workdir / "dead-redis.yaml"
    import yaml

    path.write_text(yaml.safe_dump(dead, sort_keys=False))
    args = [command]
    if command in ("suspend", "resume"):
        args += ["--user", "alice", "--reason", "redis is down"]
    r = cli(s, *args, config=path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "redis unreachable" in r.stderr and "Traceback" not in r.stderr
    if command in ("suspend", "resume"):
        assert "nothing changed" in r.stderr
    assert cli_records(r) == []


# -- one replica, no Redis: a file beside the local vault -------------------------------------


def test_without_redis_the_file_store_works_and_survives_a_restart(tmp_path: Path) -> None:
    s = build_stack(tmp_path / "single")
    try:
        assert s.proxy is not None
        user = "solo"
        s.vault_put(user, s.grant(user))
        ctx = s.context(user)
        assert get(s, s.proxy_url, ctx).status_code == 200
        r = cli(s, "suspend", "--user", user, "--reason", "laptop stolen")
        returned = time.monotonic()
        assert r.returncode == 0, r.stderr
        within("file suspension", lambda: suspended(get(s, s.proxy_url, ctx)), 1.0)
        assert time.monotonic() - returned <= 1.0
        stored = Path(s.config["vault"]["path"] + ".suspensions.json")
        assert oct(stored.stat().st_mode & 0o777) == "0o600"
        s.proxy.close()
        s.start_proxy()
        assert suspended(get(s, s.proxy_url, ctx))  # the first request after the restart
        assert cli(s, "resume", "--user", user, "--reason", "found it").returncode == 0
        within("file resume", lambda: get(s, s.proxy_url, ctx).status_code == 200, 1.0)
        denied = [x for x in s.audit_records() if x["reason"] == "suspended"]
        # Refused ones; an exchange already under way when the file was read is cut
        # (request.failed, reason suspended: a busy host may be mid-request then).
        assert any(x["event"] == "credential.denied" for x in denied), denied
        assert {x["event"] for x in denied} <= {"credential.denied", "request.failed"}
    finally:
        s.close()


def test_an_unreadable_suspensions_file_refuses_credentialed_requests(tmp_path: Path) -> None:
    """Fail closed: a proxy that cannot tell who is suspended sends no credential."""
    s = build_stack(tmp_path / "corrupt", start_proxy=False)
    try:
        Path(s.config["vault"]["path"] + ".suspensions.json").write_text("{not json")
        s.start_proxy()
        s.vault_put("anyone", s.grant("anyone"))
        r = get(s, s.proxy_url, s.context("anyone"))
        assert r.status_code == 503 and r.json()["reason"] == "suspensions_unknown"
        assert "Retry-After" in r.headers
        bad = cli(s, "suspend", "--user", "x", "--reason", "y")
        assert bad.returncode == 1 and "not a suspension list" in bad.stderr
    finally:
        s.close()


# -- exchanges under way ----------------------------------------------------------------------


def test_a_live_stream_is_cut_when_its_user_is_suspended(tmp_path: Path) -> None:
    """An endless SSE stream started before the suspension: nothing of it reaches the
    agent once the suspension is in force (the next event cuts it), the upstream's
    exchange is aborted, the cut is audited; another user's stream goes on."""
    from devstack.streamers import EventServer
    from tests.integration.streamkit import grant, route_peers

    s = build_stack(tmp_path / "streams", start_proxy=False)
    peer = EventServer(s.workdir / "pki" / "server.pem", s.workdir / "pki" / "server.key")
    try:
        route_peers(s, {"streams": peer.port})
        grant(s, "streamer", ["streams"])
        grant(s, "other", ["streams"])
        got: dict[str, list[float]] = {"streamer": [], "other": []}
        ended: dict[str, str] = {}

        def read(user: str, marker: str) -> None:
            url = f"https://localhost:{peer.port}/sse/{marker}?n=0&every=0.05"
            try:
                with s.client(context=s.context(user)) as c, c.stream("GET", url) as r:
                    assert r.status_code == 200
                    for line in r.iter_lines():
                        if line.startswith("data:"):
                            got[user].append(time.monotonic())
                        if user == "other" and len(got[user]) > 200:
                            break
                ended[user] = "ended"
            except httpx2.HTTPError as exc:
                ended[user] = type(exc).__name__

        import threading

        markers = {u: f"m-{uuid.uuid4().hex[:10]}" for u in got}
        threads = [threading.Thread(target=read, args=(u, markers[u]), daemon=True)
                   for u in got]
        for t in threads:
            t.start()
        within("both streams flowing", lambda: all(len(v) >= 5 for v in got.values()), 10)
        r = cli(s, "suspend", "--user", "streamer", "--reason", "cut the stream")
        returned = time.monotonic()
        assert r.returncode == 0, r.stderr
        threads[0].join(5)
        assert "streamer" in ended, "the suspended user's stream was not cut"
        # In force within 1 s (file store: 0.25 s polls); the next event cuts the stream.
        assert got["streamer"][-1] <= returned + 1.0
        within("the upstream let go", lambda: any(
            x.let_go for x in peer.matching(markers["streamer"])), 5)
        threads[1].join(30)
        assert ended.get("other") == "ended" and len(got["other"]) > 200  # not cut
        cut = [x for x in s.audit_records() if x["event"] == "request.failed"
               and x["user"] == "streamer"]
        assert [x["reason"] for x in cut] == ["suspended"]
    finally:
        cli(s, "resume", "--user", "streamer", "--reason", "done")
        s.close()
        peer.close()
