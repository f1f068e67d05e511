"""Issue 17 as a new user would attack it: a real sidecar (``credproxy run`` under the
devstack) writing a file audit trail with signed checkpoints, a second checkpoint sink and
an OTLP/HTTP export to a real receiver, then the real CLI (``python -m proxy.cli audit
...``) on what it wrote, on what the receiver got and on damaged copies.

Tests whose docstring starts with ``Was a FAULT (item N):`` failed on the product when a
fresh tester wrote them (all are fixed); each
says what the issue expects instead. The others are variants the product holds.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from devstack.otlpreceiver import OtlpReceiver
from devstack.stack import Stack, build_stack, wait_until
from proxy import checkpoint

from .test_audit_proof import proof_stack, signing_key

pytestmark = pytest.mark.integration

USERS = ("alice17", "bob17")
PER_USER = 4


class Trail:
    def __init__(self, stack: Stack, receiver: OtlpReceiver, tmp: Path) -> None:
        self.stack, self.receiver, self.tmp = stack, receiver, tmp
        self.audit = tmp / "audit.jsonl"
        self.second = tmp / "checkpoints.jsonl"
        self.key = tmp / "cp.pem"
        self.pub = tmp / "cp.pub.pem"
        self.tokens: list[str] = []

    def lines(self) -> list[str]:
        return [x for x in self.audit.read_text().splitlines() if x]

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.lines()]

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy.cli", *args], input=stdin,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, **self.stack.env})

    def write(self, name: str, lines: list[str]) -> Path:
        path = self.tmp / name
        path.write_text("".join(x + "\n" for x in lines))
        return path

    def otlp_bodies(self) -> list[str]:
        return list(self.receiver.bodies())


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trail]:
    tmp = Path(tmp_path_factory.mktemp("b17"))
    stack, receiver = proof_stack(tmp, every_seconds=1)
    t = Trail(stack, receiver, tmp)
    try:
        for user in USERS:
            grant = stack.grant(user)
            t.tokens += [grant["access_token"], grant.get("refresh_token") or ""]
            stack.vault_put(user, grant)
            with stack.client(context=stack.context(user)) as c:
                for i in range(PER_USER):
                    assert c.get(f"{stack.docs_url}/echo/b17/{i}").status_code == 200
        # The every_seconds timer closes the burst with a checkpoint.
        wait_until(lambda: t.records()[-1]["event"] == "audit.checkpoint", timeout=10)
        n = len(t.lines())
        wait_until(lambda: len(receiver.received) >= n, timeout=15)
        yield t
    finally:
        stack.close()
        receiver.close()


def _ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


# --- what the product holds ------------------------------------------------------------


def test_the_trail_verifies_with_its_checkpoints_and_second_sink(trail: Trail) -> None:
    out = _ok(trail.cli("audit", "verify", str(trail.audit), "--key", str(trail.pub),
                        "--checkpoints", str(trail.second), "--require-proof"))
    assert "signed checkpoints" in out


def test_what_the_receiver_got_verifies_in_the_order_it_came(trail: Trail) -> None:
    got = trail.write("otlp.jsonl", trail.otlp_bodies()[:len(trail.lines())])
    _ok(trail.cli("audit", "verify", str(got), "--key", str(trail.pub), "--checkpoints",
                  str(trail.second)))


def test_an_idle_sidecar_checkpoints_within_every_seconds(trail: Trail) -> None:
    """Item 3: 'every N records or T seconds': after a single request and no more traffic,
    a checkpoint covering it follows within about T (1 s here)."""
    s = trail.stack
    with s.client(context=s.context(USERS[0])) as c:
        assert c.get(f"{s.docs_url}/echo/b17/idle").status_code == 200
    wait_until(lambda: trail.records()[-1]["event"] == "audit.checkpoint", timeout=5)
    last = trail.records()[-1]
    assert last["actor"] == {"kind": "system", "id": "credproxy"}


def test_nothing_secret_in_the_trail_the_second_sink_or_the_export(trail: Trail) -> None:
    """Item 4/2: no token (access or refresh) in any record, checkpoint copy or OTLP log
    record (body or attribute)."""
    exported = json.dumps([(r.body, r.attributes, r.resource)
                           for r in trail.receiver.received])
    everything = trail.audit.read_text() + trail.second.read_text() + exported
    for token in filter(None, trail.tokens):
        assert token not in everything


@pytest.mark.parametrize("value", [
    "2026-11-30T16:09:60Z",            # a leap second
    "2026-11-30T16:09:00+24:00",       # an offset out of range
    "2026-11-30T16:09:00+0100",        # basic-format offset
    "2026-11-30T16:09Z",               # no seconds
    "0001-01-01T00:00:00+01:00",       # before year 1 in UTC
    "\uff12\uff10\uff12\uff16-11-30T16:09:00Z",  # full-width digits
    "1700000000",                      # epoch seconds
    "7 d", "7D", "1y", "1mo", "+7d", "1.5h", "today", "",
])
@pytest.mark.parametrize("command", ["tail", "verify", "report"])
def test_odd_window_spellings_are_refused_naming_the_flag(trail: Trail, command: str,
                                                          value: str) -> None:
    out = trail.cli("audit", command, str(trail.audit), f"--since={value}")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--since" in out.stderr and out.stdout == ""


def test_a_future_window_and_an_offset_window_agree(trail: Trail) -> None:
    """The same instant in two zones gives the same records; a window wholly in the future
    gives none (exit 0)."""
    first = trail.records()[0]["ts"]
    z = trail.cli("audit", "tail", str(trail.audit), "--json", "--since", first)
    hour = first[11:13]
    shifted = first[:11] + f"{(int(hour) + 1) % 24:02d}" + first[13:-1] + "+01:00"
    if hour != "23":
        o = trail.cli("audit", "tail", str(trail.audit), "--json", "--since", shifted)
        assert _ok(z) == _ok(o)
    future = trail.cli("audit", "tail", str(trail.audit), "--since", "2999-01-01T00:00:00Z")
    assert _ok(future) == ""


def test_a_forged_second_sink_checkpoint_is_broken(trail: Trail) -> None:
    """A second-sink copy whose detail was edited (a higher seq) fails the signature."""
    [*_, cp] = [json.loads(x) for x in trail.second.read_text().splitlines()]
    forged = dict(cp, detail=cp["detail"].replace(f"seq={cp['seq'] - 1}",
                                                  f"seq={cp['seq'] + 50}"))
    path = trail.write("forged-sink.jsonl", [json.dumps(forged)])
    out = trail.cli("audit", "verify", str(trail.audit), "--key", str(trail.pub),
                    "--checkpoints", str(path))
    assert out.returncode == 1 and "BROKEN" in out.stdout


# --- faults -------------------------------------------------------------------------------


def test_a_half_cut_last_record_is_reported(trail: Trail) -> None:
    """Was a FAULT (item 3): the log cut in the middle of its newest record (a truncation, the
    last line now ``{"ts":...`` without its end) must not verify: the damaged record is
    named and verify exits 1. Today plain ``audit verify`` says ``ok: ... (1 non-record
    lines ignored)`` and exits 0: the loss of the newest record passes as a stray line."""
    lines = trail.lines()
    cut = trail.write("halfcut.jsonl", [*lines[:-1], lines[-1][: len(lines[-1]) // 2]])
    out = trail.cli("audit", "verify", str(cut))
    assert out.returncode == 1, out.stdout
    assert "BROKEN" in out.stdout


@pytest.mark.parametrize("sink", [
    "",                                          # the sink file emptied
    "not json\n",                                # garbage
    '{"ts":"2026-11-30T00:00:00.000000Z","event":"audit.che\n',  # a cut record
])
def test_a_second_sink_that_proves_nothing_fails_verify(trail: Trail, sink: str) -> None:
    """Was a FAULT (item 3): ``--checkpoints FILE`` is the proof against deleting the newest
    records. When FILE holds no checkpoint at all (emptied, garbage, a cut line) and the
    log has lost its newest records, verify must fail (or at least say the second sink
    proved nothing). Today it prints ``ok`` and exits 0: the non-JSON lines are skipped
    silently and an empty sink checks nothing."""
    lines = trail.lines()
    last_cp = max(i for i, x in enumerate(lines) if '"audit.checkpoint"' in x)
    cut = trail.write("cut-before-last-cp.jsonl", lines[:last_cp - 1])
    path = trail.tmp / "bad-sink.jsonl"
    path.write_text(sink)
    out = trail.cli("audit", "verify", str(cut), "--key", str(trail.pub),
                    "--checkpoints", str(path))
    assert out.returncode == 1, out.stdout + out.stderr


@pytest.mark.parametrize("order", ["newest-first", "shuffled"])
def test_verify_works_on_what_a_siem_gives_back_in_its_order(trail: Trail,
                                                             order: str) -> None:
    """Was a FAULT (item 2): 'each exported record carrying instance, seq, prev and hash, so that
    audit verify works on what a SIEM gives back'. A SIEM search returns events newest
    first (Splunk, Sentinel) or in ingestion order across batches, not in chain order;
    every record carries its place (instance, seq), so verify should check the set.
    Was: ``chain starts at seq N, not 1``. Now ``--any-order`` puts the records in chain
    order first (a reordered *file* stays a break without it)."""
    bodies = trail.otlp_bodies()[:len(trail.lines())]
    if order == "newest-first":
        bodies.reverse()
    else:
        random.Random(17).shuffle(bodies)
    got = trail.write(f"siem-{order}.jsonl", bodies)
    # In a file, reordering is tampering: a break, with a hint at --any-order.
    plain = trail.cli("audit", "verify", str(got))
    assert plain.returncode == 1 and "BROKEN" in plain.stdout, plain.stdout
    _ok(trail.cli("audit", "verify", str(got), "--any-order", "--key", str(trail.pub),
                  "--checkpoints", str(trail.second)))
    # Any order, but still every record: one dropped is a break.
    dropped = trail.write(f"siem-{order}-dropped.jsonl", bodies[:3] + bodies[4:])
    out = trail.cli("audit", "verify", str(dropped), "--any-order")
    assert out.returncode == 1 and "BROKEN" in out.stdout, out.stdout


def test_tail_answers_on_ocsf_events_as_the_docs_say(trail: Trail) -> None:
    """Was a FAULT (item 2, docs/operations.md "Proving the trail"): "The same two commands work
    on what a SIEM gives back (the OTLP bodies or the OCSF events ...)": command 2 is
    ``audit tail --user alice --event credential.``. On OCSF events it prints nothing and
    exits 0 (it does not take the carried record out), so the compliance answer is
    silently empty. Expected: alice's records, as on the raw log."""
    ocsf = _ok(trail.cli("audit", "export", str(trail.audit), "--format", "ocsf"))
    path = trail.write("ocsf.jsonl", ocsf.splitlines())
    raw = _ok(trail.cli("audit", "tail", str(trail.audit), "--user", USERS[0],
                        "--event", "credential.", "--json"))
    assert raw.count("\n") >= PER_USER
    got = trail.cli("audit", "tail", str(path), "--user", USERS[0], "--event",
                    "credential.", "--json")
    assert got.returncode == 0 and got.stdout == raw, got.stdout + got.stderr


def test_report_does_not_count_a_record_twice(trail: Trail) -> None:
    """Was a FAULT (item 1): 'report counts per user/window match what was sent'. A rotated set
    given with a file twice (a glob matching ``audit.jsonl.1`` and a copy of it, or the same
    path listed twice) doubles every count and exits 0. Every record carries instance and
    seq; a repeated record must be counted once or the report must fail naming it
    (``report --verify`` is optional; the plain report is what answers the question)."""
    once = json.loads(_ok(trail.cli("audit", "report", str(trail.audit), "--user", USERS[1],
                                    "--format", "json")))
    out = trail.cli("audit", "report", str(trail.audit), str(trail.audit), "--user",
                    USERS[1], "--format", "json")
    twice = json.loads(out.stdout)
    same = [g["requests"] for g in once["groups"]] == [g["requests"] for g in twice["groups"]]
    assert same or out.returncode == 1, (once["groups"], twice["groups"])


def test_a_signing_key_change_is_audited(trail: Trail) -> None:
    """Was a FAULT (item 4): 'vault key or signing key changes ... audited'. The operator
    replaces the checkpoint signing key file (a rotated Key Vault secret, remounted) and
    sends SIGHUP: the ``config.reloaded`` record must say so (the key file among
    ``changed=``, or restart_required naming it). Today it records ``changed=-`` and
    outcome ``applied``, while the process keeps signing with the old key: the change is
    in no record until some later restart."""
    s = trail.stack
    assert s.proxy is not None
    before = len(trail.lines())
    new = checkpoint.generate_pem()
    tmpkey = trail.tmp / "cp.pem.new"
    tmpkey.write_bytes(new)
    tmpkey.chmod(0o600)
    os.replace(tmpkey, trail.key)
    s.proxy.signal(signal.SIGHUP)
    wait_until(lambda: any(json.loads(x)["event"] == "config.reloaded"
                           for x in trail.lines()[before:]), timeout=10)
    [reloaded, *_] = [r for r in (json.loads(x) for x in trail.lines()[before:])
                      if r["event"] == "config.reloaded"]
    assert "checkpoint" in reloaded["detail"], reloaded["detail"]


def test_a_failing_checkpoint_sink_shows_in_the_metrics(tmp_path: Path) -> None:
    """Was a FAULT (item 3): the second sink is what proves the newest records were not
    deleted. When writing to it fails (here its directory is removed while the sidecar
    runs; a full disk or a lost volume would do the same) the miss must show in /metrics
    (``credproxy_audit_checkpoints_total{outcome="sink_failed"}``), and the copies it
    missed are written once it can be written again (oldest first), so the second sink
    still proves every checkpoint."""
    import shutil

    key = signing_key(tmp_path)
    cpdir = tmp_path / "cpdir"
    cpdir.mkdir()
    stack = build_stack(tmp_path / "stack", config={"audit": {
        "sink": str(tmp_path / "audit.jsonl"),
        "checkpoint": {"key_file": str(key), "every_records": 1, "every_seconds": None,
                       "sink": str(cpdir / "cp.jsonl")}}})
    try:
        user = "carol17"
        stack.vault_put(user, stack.grant(user))
        shutil.rmtree(cpdir)
        with stack.client(context=stack.context(user)) as c:
            assert c.get(f"{stack.docs_url}/echo/b17/full").status_code == 200
        audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
        assert any(r["event"] == "audit.checkpoint" for r in audit)
        text = httpx2.get(f"http://{stack.config['admin']}/metrics").text
        failed = [x for x in text.splitlines()
                  if x.startswith('credproxy_audit_checkpoints_total{outcome="sink_failed"}')]
        assert failed and float(failed[0].split()[1]) >= 1, text
        # The sink's directory is back: the missed copies are written with the next one.
        cpdir.mkdir()
        with stack.client(context=stack.context(user)) as c:
            assert c.get(f"{stack.docs_url}/echo/b17/again").status_code == 200
        audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
        copies = [json.loads(x) for x in (cpdir / "cp.jsonl").read_text().splitlines()]
        cps = [r["seq"] for r in audit if r["event"] == "audit.checkpoint"]
        assert [r["seq"] for r in copies] == [s for s in cps if s > cps[0] - 1][-len(copies):]
        assert len(copies) >= 2, copies
    finally:
        stack.close()


@pytest.mark.parametrize("where", ["missing-dir", "not-a-regular-file"])
def test_check_refuses_a_checkpoint_sink_that_can_never_be_written(tmp_path: Path,
                                                                   where: str) -> None:
    """Was a FAULT (item 3), for ``not-a-regular-file``: ``credproxy check`` (and start) refuse a
    checkpoint sink whose directory is missing (holds), but accept ``/dev/full`` (a device,
    not a regular file): the sidecar then starts and every copy fails with ``EINVAL (not a
    regular file)``, logged only. Expected: refused at check/start naming
    ``audit.checkpoint.sink``, like the missing directory."""
    key = signing_key(tmp_path)
    sink = str(tmp_path / "nodir" / "cp.jsonl") if where == "missing-dir" else "/dev/full"
    stack = build_stack(tmp_path / "stack", start_proxy=False, config={"audit": {
        "sink": str(tmp_path / "audit.jsonl"),
        "checkpoint": {"key_file": str(key), "sink": sink}}})
    try:
        out = subprocess.run([sys.executable, "-m", "proxy.cli", "check", "--config",
                              str(stack.config_path)], capture_output=True, text=True,
                             timeout=60, env={**os.environ, **stack.env})
        assert out.returncode == 1, out.stdout + out.stderr
        assert "audit.checkpoint.sink" in out.stderr
    finally:
        stack.close()
