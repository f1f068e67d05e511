"""The audit trail as an operator runs it, through a real `credproxy run` and real requests:
rotation (logrotate itself, rm, mv, a directory that goes away), copytruncate's gap, a
standard output whose reader stalls or dies, and SIGHUP/SIGUSR1.

The property every rotation row proves: each credentialed request that got through has its
record in some file, and `credproxy audit verify` over the files (rotated ones first, .gz
included) says ok. A request whose record cannot be written is refused (503
audit-unavailable) and never reaches the provider.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest

from devstack.procs import wait_for
from devstack.stack import Stack, build_stack

pytestmark = pytest.mark.integration

LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"


# --- helpers ---------------------------------------------------------------------------------


def _metric(stack: Stack, name: str, labels: str = "") -> float:
    text = httpx2.get(f"http://{stack.config['admin']}/metrics", trust_env=False).text
    want = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _probe(stack: Stack, path: str) -> httpx2.Response:
    return httpx2.get(f"http://{stack.config['admin']}{path}", trust_env=False, timeout=5)


def _records(path: Path) -> list[dict[str, Any]]:
    import gzip

    text = (gzip.decompress(path.read_bytes()).decode() if path.name.endswith(".gz")
            else path.read_text())
    return [json.loads(x) for x in text.splitlines() if x.startswith("{")]


def _in_order(files: list[Path]) -> list[Path]:
    """Oldest first, as an operator lists them (one chain: by the first record's seq)."""
    with_records = [f for f in files if _records(f)]
    return sorted(with_records, key=lambda f: _records(f)[0]["seq"])


def _verify(files: list[Path], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "verify", *extra,
                           *map(str, files)], capture_output=True, text=True, timeout=60)


@dataclass
class Load:
    """An agent sending credentialed requests one after another until stopped; each path
    is unique, so its audit record can be found."""

    stack: Stack
    user: str
    marker: str
    results: list[tuple[str, int, str | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def finish(self) -> None:
        """Stop after the request in flight and wait for it."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(30)
            assert not self.thread.is_alive()

    def run(self) -> None:
        with self.stack.client(context=self.stack.context(self.user)) as c:
            i = 0
            while not self.stop.is_set():
                path = f"/echo/{self.marker}/{i}"
                r = c.get(f"{self.stack.docs_url}{path}")
                self.results.append((path, r.status_code, r.headers.get("X-Credproxy-Error")))
                i += 1

    def wait_for(self, more: int, timeout: float = 30.0) -> int:
        """Wait until ``more`` further requests are done; returns the count before."""
        start = len(self.results)
        wait_for(lambda: len(self.results) >= start + more, timeout)
        return start


@pytest.fixture
def load_in() -> Iterator[Callable[[Stack, str], Load]]:
    loads: list[Load] = []

    def start(stack: Stack, marker: str) -> Load:
        user = f"rot-{marker}"
        stack.vault_put(user, stack.grant(user))
        load = Load(stack, user, marker)
        load.thread = threading.Thread(target=load.run, daemon=True)
        load.thread.start()
        loads.append(load)
        return load

    yield start
    for load in loads:
        load.finish()


def _file_stack(tmp_path: Path) -> tuple[Stack, Path]:
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    path = audit_dir / "audit.jsonl"
    return build_stack(tmp_path / "stack", audit_sink=str(path)), path


# --- rotation ---------------------------------------------------------------------------------


def _logrotate(path: Path, pid: int, directives: str, times: int = 1) -> None:
    conf = path.parent.parent / "logrotate.conf"
    conf.write_text(f"{path} {{\n{directives}\n}}\n".replace("PID", str(pid)))
    for _ in range(times):
        subprocess.run([LOGROTATE, "-f", "-s", str(conf.with_suffix(".state")), str(conf)],
                       check=True, capture_output=True, timeout=60)
        time.sleep(0.3)  # some requests between two rotations


# docs/operations.md's recipe, signalling this process instead of a systemd unit.
RECIPE = """    create 0600
    compress
    delaycompress
    rotate 5
    missingok
    notifempty
    sharedscripts
    postrotate
        kill -USR1 PID
    endscript"""


def _rotate(how: str, path: Path, pid: int) -> None:
    if how == "logrotate recipe (create, compress, delaycompress, SIGUSR1), twice":
        _logrotate(path, pid, RECIPE, times=2)
    elif how == "logrotate create+compress, SIGHUP":
        _logrotate(path, pid, "    create 0600\n    compress\n    rotate 5\n"
                               "    postrotate\n        kill -HUP PID\n    endscript")
    elif how == "logrotate create+compress, no signal":
        _logrotate(path, pid, "    create 0600\n    compress\n    rotate 5")
    elif how == "mv":
        path.rename(path.with_name(path.name + ".1"))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", [
    "logrotate recipe (create, compress, delaycompress, SIGUSR1), twice",
    "logrotate create+compress, SIGHUP",
    "logrotate create+compress, no signal",
    "mv",
])
def test_rotation_under_load_loses_no_record(tmp_path: Path, how: str,
                                             load_in: Callable[[Stack, str], Load]) -> None:
    stack, path = _file_stack(tmp_path)
    try:
        assert stack.proxy is not None
        load = load_in(stack, "rot")
        load.wait_for(20)
        _rotate(how, path, stack.proxy.pid)
        load.wait_for(20)  # the identity check (or the signal) has moved to the new file
        load.finish()
        assert all(status == 200 for _, status, _ in load.results), load.results
        files = sorted(path.parent.iterdir())
        if how != "mv":
            assert any(f.name.endswith(".gz") for f in files), files
        assert stat_mode(path) == 0o600
        # Every credentialed request has its record in exactly one file.
        paths = [r["request"]["path"] for f in files for r in _records(f)
                 if r["event"] == "credential.injected"]
        assert sorted(paths) == sorted(p for p, _, _ in load.results)
        out = _verify(_in_order(files))
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.startswith("ok:") and f"over {len(_in_order(files))} files" in \
            out.stdout
        reopens = sum(_metric(stack, "credproxy_audit_reopens_total", f'reason="{r}"')
                      for r in ("rotated", "signal"))
        assert reopens >= 1
        assert stack.proxy.alive()
    finally:
        stack.close()


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_rm_of_the_audit_file_recreates_it(tmp_path: Path,
                                           load_in: Callable[[Stack, str], Load]) -> None:
    """`rm` throws away what the file held (ship it first); every request after the rm has
    its record in the recreated file, and that file verifies as a chain cut at its start."""
    stack, path = _file_stack(tmp_path)
    try:
        load = load_in(stack, "rm")
        load.wait_for(10)
        path.unlink()
        after = len(load.results) + 1  # the one in flight may have gone to the old file
        load.wait_for(20)
        load.finish()
        assert all(status == 200 for _, status, _ in load.results)
        assert stat_mode(path) == 0o600
        recorded = {r["request"]["path"] for r in _records(path)}
        assert {p for p, _, _ in load.results[after:]} <= recorded
        assert _verify([path]).returncode == 1  # starts mid-chain: earlier records gone
        out = _verify([path], "--allow-partial")
        assert out.returncode == 0, out.stdout
        assert _metric(stack, "credproxy_audit_reopens_total", 'reason="rotated"') >= 1
    finally:
        stack.close()


@pytest.mark.parametrize("fault", ["replaced by a file", "removed"])
def test_audit_directory_that_goes_away_fails_closed_then_recovers(
        tmp_path: Path, fault: str, marker: str) -> None:
    stack, path = _file_stack(tmp_path)
    try:
        user = "dirgone"
        stack.vault_put(user, stack.grant(user))
        good: list[str] = []
        with stack.client(context=stack.context(user)) as c:
            for i in range(3):
                assert c.get(f"{stack.docs_url}/echo/{marker}/before-{i}").status_code == 200
                good.append(f"/echo/{marker}/before-{i}")
            path.parent.rename(tmp_path / "audit.old")
            if fault == "replaced by a file":
                path.parent.write_text("not a directory")
            failures = _metric(stack, "credproxy_audit_write_failures_total")
            r = c.get(f"{stack.docs_url}/echo/{marker}/refused")
            assert r.status_code == 503
            assert r.headers["X-Credproxy-Error"] == "audit-unavailable"
            assert r.json()["reason"] == "audit_write_failed"
            assert not stack.docs_saw(f"{marker}/refused")
            assert _metric(stack, "credproxy_audit_write_failures_total") == failures + 1
            assert _metric(stack, "credproxy_audit_sink_failures_total", 'kind="open"') >= 1
            ready = _probe(stack, "/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["audit"] == "unavailable: AuditUnavailable"
            assert _probe(stack, "/healthz").status_code == 200  # a restart would not help
            # The operator restores the directory: the next write (or probe) reopens.
            if path.parent.is_file():
                path.parent.unlink()
            path.parent.mkdir()
            wait_for(lambda: _probe(stack, "/readyz").status_code == 200, 10)
            assert c.get(f"{stack.docs_url}/echo/{marker}/after").status_code == 200
            good.append(f"/echo/{marker}/after")
        files = [tmp_path / "audit.old" / "audit.jsonl", path]
        injected = [r["request"]["path"] for f in files for r in _records(f)
                    if r["event"] == "credential.injected"]
        assert injected == good
        out = _verify(files)
        assert out.returncode == 0, out.stdout + out.stderr
        assert stack.proxy is not None
        proxy_ = stack.proxy
        wait_for(lambda: "audit.jsonl" in proxy_.stderr_text(), 10)
    finally:
        stack.close()


def test_built_in_size_rotation_under_load_keeps_one_chain(
        tmp_path: Path, load_in: Callable[[Stack, str], Load]) -> None:
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    path = audit_dir / "audit.jsonl"
    stack = build_stack(tmp_path / "stack", config={"audit": {
        "sink": str(path), "rotate_bytes": 8192, "rotate_keep": 1000}})
    try:
        load = load_in(stack, "size")
        load.wait_for(60)
        load.finish()
        assert all(status == 200 for _, status, _ in load.results)
        files = sorted(audit_dir.iterdir(), key=lambda f: -int(f.name.rsplit(".", 1)[1])
                       if f != path else 0)
        assert len(files) >= 3 and files[-1] == path
        assert all(f.stat().st_size <= 8192 and stat_mode(f) == 0o600 for f in files)
        paths = [r["request"]["path"] for f in files for r in _records(f)
                 if r["event"] == "credential.injected"]
        assert paths == [p for p, _, _ in load.results]
        out = _verify(files)
        assert out.returncode == 0, out.stdout + out.stderr
        assert _metric(stack, "credproxy_audit_reopens_total", 'reason="size"') == \
            len(files) - 1
    finally:
        stack.close()


# --- copytruncate: unsupported, and its gap is detected ----------------------------------------


def test_copytruncate_gap_is_named_by_verify(tmp_path: Path, marker: str) -> None:
    """What logrotate's copytruncate does, one step at a time with a request in between:
    the record written after the copy and before the truncate is lost, and `audit verify`
    over the copy and the file names the gap."""
    stack, path = _file_stack(tmp_path)
    try:
        user = "copytrunc"
        stack.vault_put(user, stack.grant(user))
        with stack.client(context=stack.context(user)) as c:
            for i in range(3):
                c.get(f"{stack.docs_url}/echo/{marker}/{i}")
            shutil.copyfile(path, path.with_name("audit.jsonl.1"))
            c.get(f"{stack.docs_url}/echo/{marker}/lost")
            os.truncate(path, 0)
            c.get(f"{stack.docs_url}/echo/{marker}/next")
        out = _verify([path.with_name("audit.jsonl.1"), path])
        assert out.returncode == 1
        assert "audit.jsonl line 1" in out.stdout and "records missing" in out.stdout
    finally:
        stack.close()


def test_logrotate_copytruncate_under_load_verify_agrees_with_what_was_lost(
        tmp_path: Path, load_in: Callable[[Stack, str], Load]) -> None:
    """Real logrotate copytruncate during traffic: whether or not this run lost a record
    (the race is narrow), `audit verify` over the copy and the file says ok exactly when
    every request's record is there."""
    stack, path = _file_stack(tmp_path)
    try:
        assert stack.proxy is not None
        load = load_in(stack, "ct")
        load.wait_for(20)
        _logrotate(path, stack.proxy.pid, "    copytruncate\n    rotate 5", times=3)
        load.wait_for(10)
        load.finish()
        files = [path.with_name(f"audit.jsonl.{n}") for n in (3, 2, 1)] + [path]
        recorded = {r["request"]["path"] for f in files for r in _records(f)
                    if r["request"] is not None}  # config.loaded / reloaded have none
        lost = {p for p, status, _ in load.results if status == 200} - recorded
        out = _verify(files)
        assert (out.returncode == 0) == (not lost), (lost, out.stdout)
        if lost:
            assert "records missing" in out.stdout
    finally:
        stack.close()


# --- standard output: a reader that stalls or dies ----------------------------------------------


@dataclass
class PipedProxy:
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    out: bytes = b""

    def read_stdout(self) -> bytes:
        """Read what is in the pipe now (the reader catching up); returns all read so far."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        os.set_blocking(fd, False)
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return self.out
            if not chunk:
                return self.out
            self.out += chunk


@pytest.fixture
def piped(tmp_path: Path) -> Iterator[tuple[Stack, PipedProxy]]:
    """A stack whose `credproxy run` audits to stdout, a real pipe this test reads (or
    not); the pipe is shrunk to one page so a stalled reader shows after a few records."""
    stack = build_stack(tmp_path, start_proxy=False)
    stack.write_config(audit={"sink": "stdout", "stall_timeout": 1.0, "liveness_after": 3.0})
    env = {**os.environ, **stack.env,
           "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PYTHONUNBUFFERED": "1"}
    stderr_path = tmp_path / "credproxy.stderr"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "run", "--config",
                                 str(stack.config_path)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err, env=env)
    assert proc.stdout is not None
    fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    running = PipedProxy(proc, stderr_path)
    try:
        wait_for(lambda: _ready(stack), 30)
        yield stack, running
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        stack.close()


def _ready(stack: Stack) -> bool:
    try:
        return _probe(stack, "/readyz").status_code == 200
    except httpx2.HTTPError:
        return False


def test_stalled_stdout_reader_never_freezes_the_proxy(
        piped: tuple[Stack, PipedProxy], marker: str) -> None:
    stack, proxy = piped
    user = "stalled"
    stack.vault_put(user, stack.grant(user))
    echo = stack.echo_server(tls=False)
    served: list[str] = []
    refused = None
    # Nobody reads stdout: the pipe fills, the writer blocks, records queue, then the stall
    # bound refuses. No request hangs (each has a 15 s client timeout).
    with stack.client(context=stack.context(user), timeout=15) as c:
        for i in range(400):
            r = c.get(f"{stack.docs_url}/echo/{marker}/{i}")
            if r.status_code == 503:
                refused = r
                break
            assert r.status_code == 200
            served.append(f"/echo/{marker}/{i}")
            if i > 20:
                time.sleep(0.1)  # let the stall bound pass
        assert refused is not None, "a stalled reader never made the proxy refuse"
        assert refused.headers["X-Credproxy-Error"] == "audit-unavailable"
        assert refused.json()["reason"] == "audit_sink_stalled"
        assert not stack.docs_saw(f"{marker}/{len(served)}")
        # The event loop is free: unaudited traffic and both probes answer.
        assert c.get(f"{echo.url}/echo/unrouted").status_code == 200
    ready = _probe(stack, "/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["audit"] != "ok"
    # Liveness fails once the sink has been stuck longer than audit.liveness_after (3 s).
    wait_for(lambda: _probe(stack, "/healthz").status_code == 503, 15)
    assert "stalled" in _probe(stack, "/healthz").json()["checks"]["audit"]
    assert _metric(stack, "credproxy_audit_sink_failures_total", 'kind="stalled"') >= 1
    # The reader reads again: everything accepted comes out in order, and the proxy serves.
    wait_for(lambda: proxy.read_stdout() is not None and _ready(stack), 15)
    assert _probe(stack, "/healthz").status_code == 200
    with stack.client(context=stack.context(user), timeout=15) as c:
        assert c.get(f"{stack.docs_url}/echo/{marker}/again").status_code == 200
    served.append(f"/echo/{marker}/again")
    wait_for(lambda: f"{marker}/again".encode() in proxy.read_stdout(), 10)
    lines = proxy.out.decode().splitlines()
    paths = [json.loads(x)["request"]["path"] for x in lines
             if json.loads(x)["event"] == "credential.injected"]
    assert paths == served
    from proxy.audit import verify

    assert verify(lines).ok
    assert proxy.proc.poll() is None


def test_dead_stdout_reader_fails_readiness_then_liveness(
        piped: tuple[Stack, PipedProxy], marker: str) -> None:
    stack, proxy = piped
    user = "deadreader"
    stack.vault_put(user, stack.grant(user))
    with stack.client(context=stack.context(user), timeout=15) as c:
        assert c.get(f"{stack.docs_url}/echo/{marker}/ok").status_code == 200
        wait_for(lambda: f"{marker}/ok".encode() in proxy.read_stdout(), 10)
        assert proxy.proc.stdout is not None
        proxy.proc.stdout.close()  # the reader dies: EPIPE
        for i in range(3):
            r = c.get(f"{stack.docs_url}/echo/{marker}/dead-{i}")
            assert r.status_code == 503
            assert r.headers["X-Credproxy-Error"] == "audit-unavailable"
        assert not stack.docs_saw(f"{marker}/dead-")
    ready = _probe(stack, "/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["audit"] == "unavailable: AuditUnavailable"
    wait_for(lambda: _probe(stack, "/healthz").status_code == 503, 15)
    assert "EPIPE" in _probe(stack, "/healthz").json()["checks"]["audit"]
    assert _metric(stack, "credproxy_audit_sink_failures_total", 'kind="write"') >= 3
    assert "EPIPE" in proxy.stderr_path.read_text()


# --- signals -------------------------------------------------------------------------------


def test_sighup_reloads_the_config_reopens_the_audit_file_and_keeps_serving(
        tmp_path: Path, marker: str) -> None:
    stack, path = _file_stack(tmp_path)
    try:
        proxy = stack.proxy
        assert proxy is not None
        user = "hup"
        stack.vault_put(user, stack.grant(user))

        def get(name: str) -> int:
            with stack.client(context=stack.context(user)) as c:
                return c.get(f"{stack.docs_url}/echo/{marker}/{name}").status_code

        assert get("first") == 200
        # 1. An unchanged config: only the signal can make it reload.
        applied = _metric(stack, "credproxy_config_reloads_total", 'result="applied"')
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: _metric(stack, "credproxy_config_reloads_total",
                                 'result="applied"') == applied + 1, 10)
        wait_for(lambda: "SIGHUP: audit log reopened; reloading the configuration" in
                 proxy.stderr_text(), 10)
        assert get("after-hup") == 200
        # 2. A config change applied after SIGHUP (a new unrouted mode).
        stack.write_config(unrouted="deny")
        proxy.signal(signal.SIGHUP)
        echo = stack.echo_server(tls=False)
        with stack.client(context=stack.context(user)) as c:
            wait_for(lambda: c.get(f"{echo.url}/echo/x").status_code == 403, 10)
        # 3. Rotated by hand, then SIGHUP: the new file exists before any request.
        path.rename(path.with_name("audit.jsonl.1"))
        proxy.signal(signal.SIGHUP)
        wait_for(path.exists, 10)
        # Nothing but the reload's own audit record (config.reloaded) before any request.
        assert {r["event"] for r in _records(path)} <= {"config.reloaded"}
        # 4. SIGUSR1 reopens only.
        path.rename(path.with_name("audit.jsonl.2"))
        proxy.signal(signal.SIGUSR1)
        wait_for(path.exists, 10)
        wait_for(lambda: "SIGUSR1: audit log reopened" in proxy.stderr_text(), 10)
        assert get("last") == 200
        assert proxy.alive()
        assert _metric(stack, "credproxy_audit_reopens_total", 'reason="signal"') == 4
        files = [path.with_name("audit.jsonl.1"), path.with_name("audit.jsonl.2"), path]
        injected = [r["request"]["path"] for f in files for r in _records(f)
                    if r["event"] == "credential.injected"]
        assert injected == [f"/echo/{marker}/{n}" for n in ("first", "after-hup", "last")]
        out = _verify(files)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        stack.close()
