"""The compliance question answered from the command line (issue 17, item 1): "what did
user U's agent access between T1 and T2", with `credproxy audit verify --since --until`
then `credproxy audit report --user U --since --until`, run as real processes.

A "day" of mixed traffic goes through a real `credproxy run` writing its audit log to a
file with built-in size rotation: several users, the document API (GET/POST, two user
contexts), a refresh, refusals (a context that excludes the provider, no user context, a
user without a grant), and an MCP server driven by the real MCP SDK client. The day has
three parts whose boundaries are taken between them; the report for each user and part
must match, count for count, what the test sent and what the upstreams saw. The rotated
set (the oldest file gzipped), stdin and bad command lines are checked too.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import ssl
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from devstack.stack import Stack, build_stack
from devstack.streamers import McpProgressServer

pytestmark = pytest.mark.integration

MCP = "mcp"


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


def stamp() -> str:
    """Now as RFC 3339 UTC with microseconds (the records' own precision)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Expected:
    """What one user's agent did in one part of the day, per (provider, context id)."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    methods: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    paths: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    tools: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    refusals: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    reauths: dict[tuple[str, str], Counter[str]] = field(default_factory=dict)
    refreshes: Counter[tuple[str, str]] = field(default_factory=Counter)


@dataclass
class Day:
    stack: Stack
    server: McpProgressServer
    audit_dir: Path
    users: dict[str, str]  # role -> user name
    bounds: list[str] = field(default_factory=list)  # part boundaries, RFC 3339
    expected: dict[tuple[str, int], Expected] = field(default_factory=dict)  # (user, part)

    def exp(self, user: str, part: int) -> Expected:
        return self.expected.setdefault((user, part), Expected())

    def files(self) -> list[Path]:
        """The rotated set, oldest first."""
        rotated = sorted(self.audit_dir.glob("audit.jsonl.*"),
                         key=lambda p: -int(p.name.split(".")[2]))
        return [*rotated, self.audit_dir / "audit.jsonl"]

    def text(self) -> str:
        return "".join(gzip.decompress(p.read_bytes()).decode() if p.name.endswith(".gz")
                       else p.read_text() for p in self.files())


def _send(day: Day, user: str, ctx: tuple[str, str], method: str, path: str,
          **context: Any) -> Any:
    s = day.stack
    token = s.context(user, ctx_kind=ctx[0], ctx_id=ctx[1], **context)
    with s.client(context=token) as c:
        return c.request(method, f"{s.docs_url}{path}")


def _docs(day: Day, part: int, user: str, ctx: tuple[str, str], method: str,
          path: str) -> None:
    """One request to the document API as ``user``'s agent, which must get through; counts
    what the report must show."""
    r = _send(day, user, ctx, method, path)
    assert r.status_code < 400, r.text
    key = ("docs", ctx[1])
    e = day.exp(user, part)
    e.requests[key] += 1
    e.methods.setdefault(key, Counter())[method] += 1
    segs = path.lstrip("/").split("/")
    prefix = "/".join(segs[:2]) + ("/*" if len(segs) > 2 else "")
    host = day.stack.docs_url.removeprefix("https://")
    e.paths.setdefault(key, Counter())[f"{host}/{prefix}"] += 1


def _refused(day: Day, part: int, user: str, ctx: tuple[str, str], method: str, path: str,
             kind: str, **context: Any) -> None:
    """A request the proxy must refuse; its problem's reason is what the report counts."""
    r = _send(day, user, ctx, method, path, **context)
    assert r.status_code >= 400
    assert r.headers["content-type"].startswith("application/problem+json"), r.text
    table = day.exp(user, part).refusals if kind == "refusal" else day.exp(user, part).reauths
    table.setdefault(("docs", ctx[1]), Counter())[r.json()["reason"]] += 1


def _mcp_calls(day: Day, part: int, user: str, tools: list[str]) -> None:
    """A session of the real MCP SDK client calling ``tools``; the request count expected is
    what the MCP server saw (initialize, notifications, the GET stream, the DELETE...)."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    before = len(day.server.requests)
    url = f"https://localhost:{day.server.port}/mcp"

    async def run() -> None:
        tls = ssl.create_default_context(cafile=str(day.stack.mitm_ca))
        headers = {"X-User-Context": day.stack.context(user, ctx_kind="workflow",
                                                       ctx_id="triage")}
        async with httpx2.AsyncClient(proxy=day.stack.proxy_url, verify=tls, headers=headers,
                                      trust_env=False, timeout=30) as http, \
                Client(streamable_http_client(url, http_client=http), mode="auto") as client:
            for name in tools:
                args = ({"steps": 1, "every": 0.01} if name == "countdown"
                        else {"query": "q-" + uuid.uuid4().hex})
                await client.call_tool(name, args)

    asyncio.run(run())
    seen = day.server.requests[before:]
    key = (MCP, "triage")
    e = day.exp(user, part)
    e.requests[key] += len(seen)
    e.methods.setdefault(key, Counter()).update(r.method for r in seen)
    e.tools.setdefault(key, Counter()).update(tools)


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Day]:
    work = tmp_path_factory.mktemp("audit-report")
    audit_dir = work / "audit"
    audit_dir.mkdir()
    stack = build_stack(work, start_proxy=False, config={"audit": {
        "sink": str(audit_dir / "audit.jsonl"), "rotate_bytes": 4096, "rotate_keep": 100}})
    server = None
    try:
        pki = stack.workdir / "pki"
        server = McpProgressServer(pki / "server.pem", pki / "server.key")
        docs = stack.config["providers"][0]
        stack.config["providers"].append({**docs, "id": MCP,
                                          "hosts": [f"localhost:{server.port}"]})
        stack.write_config()
        stack.start_proxy()
        tag = uuid.uuid4().hex[:6]
        users = {r: f"{r}-{tag}" for r in ("alice", "bob", "carol", "dave")}
        for role in ("alice", "bob"):
            stack.vault_put(users[role], stack.grant(users[role]))
        stack.vault_put(users["bob"], stack.grant(users["bob"]), provider=MCP)
        # dave's token expires within refresh_skew: his first request refreshes it.
        stack.vault_put(users["dave"], stack.grant(users["dave"], expires_in=30))
        d = Day(stack, server, audit_dir, users)
        _send_the_day(d)
        yield d
    finally:
        stack.close()
        if server is not None:
            server.close()


def _send_the_day(d: Day) -> None:
    a, b, c, dv = (d.users[r] for r in ("alice", "bob", "carol", "dave"))
    chat, nightly = ("chat", "conv-1"), ("workflow", "nightly")
    d.bounds.append(stamp())
    # Part 0, the morning: alice reads and writes in a chat, bob reads.
    for i in range(3):
        _docs(d, 0, a, chat, "GET", f"/echo/documents/doc-{i}")
    _docs(d, 0, a, chat, "POST", "/echo/notes/draft/1")
    _docs(d, 0, a, chat, "GET", "/documents")
    _docs(d, 0, b, chat, "GET", "/documents")
    # alice's context excludes the docs provider: refused, never forwarded.
    _refused(d, 0, a, chat, "GET", "/documents", "refusal", providers=["keyed"])
    d.bounds.append(stamp())
    # Part 1, the afternoon: alice's nightly workflow, bob's MCP tools, carol (no grant).
    for _ in range(2):
        _docs(d, 1, a, nightly, "GET", "/echo/export/batch")
    _mcp_calls(d, 1, b, ["lookup", "lookup", "countdown"])
    _refused(d, 1, c, chat, "GET", "/documents", "reauth")
    _docs(d, 1, dv, chat, "GET", "/documents")
    d.exp(dv, 1).refreshes["docs", "conv-1"] += 1
    # A request without a user context: identity.rejected, no user.
    with d.stack.client() as client:
        r = client.get(f"{d.stack.docs_url}/documents")
    assert r.status_code >= 400
    d.bounds.append(stamp())
    # Part 2, the evening: a little more of everyone.
    _docs(d, 2, a, chat, "DELETE", "/echo/notes/draft/1")
    _docs(d, 2, b, chat, "GET", "/echo/documents/doc-3")
    _mcp_calls(d, 2, b, ["lookup"])
    _docs(d, 2, dv, chat, "GET", "/documents")
    d.bounds.append(stamp())


def _report(d: Day, *args: str, files: list[Path] | None = None,
            stdin: str | None = None) -> dict[str, Any]:
    r = cli("audit", "report", *map(str, files if files is not None else d.files()), *args,
            "--format", "json", stdin=stdin)
    assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def _compare(doc: dict[str, Any], e: Expected) -> None:
    """The report's groups equal what was sent, count for count."""
    got = {(g["provider"], g["context"]["id"]): g for g in doc["groups"]}
    keys = (set(e.requests) | set(e.refusals) | set(e.reauths) | set(e.refreshes))
    assert set(got) == keys, (set(got), keys)
    for key, g in got.items():
        assert g["requests"] == e.requests[key], key
        assert g["methods"] == dict(e.methods.get(key, {})), key
        if key[0] != MCP:
            assert g["paths"] == dict(e.paths.get(key, {})), key
        assert g["mcp_tools"] == dict(e.tools.get(key, {})), key
        assert g["refusals"] == dict(e.refusals.get(key, {})), key
        assert g["reauths"] == dict(e.reauths.get(key, {})), key
        assert g["refreshes"] == e.refreshes[key], key
        assert g["first"] <= g["last"]


def test_the_log_rotated_and_the_oldest_file_is_gzipped(day: Day) -> None:
    files = day.files()
    assert len(files) >= 3, files  # the day crossed rotations
    oldest = files[0]
    with oldest.open("rb") as src, gzip.open(f"{oldest}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    oldest.unlink()
    assert day.files()[0].name.endswith(".gz")
    r = cli("audit", "verify", *map(str, day.files()))
    assert r.returncode == 0 and r.stdout.startswith("ok:"), r.stdout + r.stderr


@pytest.mark.parametrize("part", [0, 1, 2])
@pytest.mark.parametrize("role", ["alice", "bob", "carol", "dave"])
def test_report_per_user_and_part_of_the_day_matches_what_was_sent(day: Day, role: str,
                                                                    part: int) -> None:
    user = day.users[role]
    since, until = day.bounds[part], day.bounds[part + 1]
    files = day.files()
    # The two commands of the compliance question.
    v = cli("audit", "verify", *map(str, files), "--since", since, "--until", until)
    assert v.returncode == 0 and v.stdout.startswith("ok: "), v.stdout + v.stderr
    assert "in the window" in v.stdout
    doc = _report(day, "--user", user, "--since", since, "--until", until, files=files)
    assert doc["input"]["unreadable"] == 0
    _compare(doc, day.expected.get((user, part), Expected()))
    for g in doc["groups"]:
        assert since <= g["first"] <= g["last"] < until


def test_report_of_the_whole_day_for_every_user_adds_up(day: Day) -> None:
    files = day.files()
    doc = _report(day, "--since", day.bounds[0], "--until", day.bounds[-1], files=files)
    mine = set(day.users.values())
    groups = [g for g in doc["groups"] if g["user"] in mine]
    sent = sum(sum(e.requests.values()) for (u, _), e in day.expected.items())
    assert sum(g["requests"] for g in groups) == sent
    # The request without a user context is a group without a user.
    anonymous = [g for g in doc["groups"] if g["user"] is None]
    assert anonymous and sum(g["events"].get("identity.rejected", 0) for g in anonymous) >= 1
    # Nothing secret in any output.
    table = cli("audit", "report", *map(str, files)).stdout
    csvout = cli("audit", "report", *map(str, files), "--format", "csv").stdout
    for token in day.stack.issued_tokens():
        assert token not in table + csvout + json.dumps(doc)


def test_report_reads_stdin_and_relative_windows(day: Day) -> None:
    user = day.users["alice"]
    text = day.text()
    by_files = _report(day, "--user", user, files=day.files())
    by_stdin = _report(day, "--user", user, "-", files=[], stdin=text)
    relative = _report(day, "--user", user, "--since", "1d", "--until", "now", files=[],
                       stdin=text)
    assert by_files["groups"] == by_stdin["groups"] == relative["groups"]
    assert sum(g["requests"] for g in by_files["groups"]) == sum(
        sum(day.exp(user, p).requests.values()) for p in range(3))
    later = _report(day, "--user", user, "--since", "now", files=[], stdin=text)
    assert later["groups"] == [] and later["input"]["outside_window"] > 0


def test_report_and_tail_agree_on_the_window(day: Day) -> None:
    files, text = day.files(), day.text()
    user, since, until = day.users["alice"], day.bounds[1], day.bounds[2]
    r = cli("audit", "tail", "--user", user, "--since", since, "--until", until, "--json",
            stdin=text)
    tailed = [json.loads(x) for x in r.stdout.splitlines()]
    doc = _report(day, "--user", user, "--since", since, "--until", until, files=files)
    assert len(tailed) == doc["input"]["records"] == sum(
        sum(g["events"].values()) for g in doc["groups"]) > 0


def test_an_unreadable_record_is_named_and_fails_the_report(day: Day, tmp_path: Path) -> None:
    current = day.files()[-1]
    copy = tmp_path / "audit.jsonl"
    lines = current.read_text().splitlines(keepends=True)
    lines.insert(1, lines[0][: len(lines[0]) // 2] + "\n")  # a torn record
    copy.write_text("".join(lines))
    r = cli("audit", "report", str(copy))
    assert r.returncode == 1
    assert "1 unreadable (line 2)" in r.stdout
    assert "line 2" in r.stderr and "may be incomplete" in r.stderr


def test_report_verify_checks_the_chain_in_the_same_read(day: Day) -> None:
    text, user = day.text(), day.users["bob"]
    since, until = day.bounds[1], day.bounds[2]
    plain = cli("audit", "report", "--user", user, "--since", since, "--until", until,
                stdin=text)
    checked = cli("audit", "report", "--user", user, "--since", since, "--until", until,
                  "--verify", stdin=text)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == plain.stdout
    assert "verify: ok: " in checked.stderr and "in the window" in checked.stderr
    # One of bob's records in the window deleted: the report still prints, verify fails.
    lines = text.splitlines(keepends=True)
    victim = next(i for i, x in enumerate(lines) if f'"user":"{user}"' in x
                  and since <= json.loads(x)["ts"] < until)
    broken = cli("audit", "report", "--user", user, "--since", since, "--until", until,
                 "--verify", "-", stdin="".join(lines[:victim] + lines[victim + 1:]))
    assert broken.returncode == 1
    assert "verify: BROKEN: line" in broken.stderr and "records missing" in broken.stderr
    assert json.loads(cli("audit", "report", "--user", user, "--since", since, "--until",
                          until, "--format", "json", stdin=text).stdout)["input"]["records"] \
        == json.loads(cli("audit", "report", "--user", user, "--since", since, "--until",
                          until, "--format", "json", "--verify", stdin="".join(
                              lines[:victim] + lines[victim + 1:])).stdout
                      )["input"]["records"] + 1


# --- bad command lines: exit 2, the flag named, nothing on stdout ----------------------------

BAD_TIMES = ["yesterday", "2026-11-24", "2026-11-24T09:00:00", "1h30m", "-1d", "7x", "",
             "2026-13-01T00:00:00Z", "2026-11-24T09:00:00+0100", "١d"]


# Every bad value on one command and flag; each command and flag once more (the same parser).
BAD_WINDOWS = [("report", "--since", v) for v in BAD_TIMES] + [
    ("report", "--until", "2026-11-24T09:00:00"), ("verify", "--since", "yesterday"),
    ("verify", "--until", "1h30m"), ("tail", "--since", "2026-11-24"),
    ("tail", "--until", "-1d")]


@pytest.mark.parametrize(("command", "flag", "value"), BAD_WINDOWS)
def test_bad_window_values_are_usage_errors_naming_the_flag(command: str, flag: str,
                                                            value: str) -> None:
    r = cli("audit", command, f"{flag}={value}", stdin="")  # "=": -1d is not an option
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert f"credproxy: {flag}" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [
    ["--since", "1d", "--until", "2d"],
    ["--since", "2026-11-24T10:00:00Z", "--until", "2026-11-24T10:00:00Z"],
    ["--depth", "0"],
    ["--format", "xml"],
    ["a.jsonl", "-"],
])
def test_bad_report_arguments_are_usage_errors(args: list[str]) -> None:
    r = cli("audit", "report", *args, stdin="")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == "" and "Traceback" not in r.stderr


def test_report_on_a_missing_file_names_it() -> None:
    r = cli("audit", "report", "/nonexistent/audit.jsonl")
    assert r.returncode == 1 and "/nonexistent/audit.jsonl" in r.stderr
    assert "Traceback" not in r.stderr


def test_report_on_empty_input_says_so() -> None:
    r = cli("audit", "report", stdin="")
    assert r.returncode == 0 and "no records in the window" in r.stdout
    assert "read 0 lines" in r.stdout
