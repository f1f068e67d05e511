"""Run servers as real subprocesses and wait until they are ready.

Generic on purpose: the stack's own servers announce themselves through a ready file
(``--ready-file``), while other programs (mitmdump, credproxy) can be awaited with
:func:`tcp_check` or any callable that returns a dict once the process is usable::

    with start_server(["-m", "devstack.authserver", ..., "--ready-file", str(rf)], rf) as auth:
        print(auth.url)

    with start_server(["mitmdump", "-p", str(port)], ready=tcp_check("127.0.0.1", port),
                      python=False) as proxy:
        ...

stdout and stderr go to files (never pipes, which deadlock a chatty child once the buffer
fills) that stay readable after the process ended, so tests can grep them for leaked secrets.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

# A readiness check returns None while the process is not ready yet, and a dict of whatever it
# learned (at least "url" for ready files) once it is.
ReadyCheck = Callable[[], dict[str, Any] | None]

# The directory that contains the ``devstack`` package, put on the child's PYTHONPATH so that
# ``-m devstack.x`` works whatever the working directory is.
_SOURCE_ROOT = str(Path(__file__).resolve().parent.parent)


class ServerStartError(RuntimeError):
    """The process exited or did not become ready in time; the message carries its stderr."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago. Prefer ``--port 0`` plus a ready file where the
    program supports it: another process can take the port between this call and the bind."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ready_file_check(path: str | os.PathLike[str]) -> ReadyCheck:
    """Ready once ``path`` holds a JSON object (written atomically by the server)."""
    p = Path(path)

    def check() -> dict[str, Any] | None:
        try:
            data = json.loads(p.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    return check


def tcp_check(host: str, port: int, scheme: str = "http") -> ReadyCheck:
    """Ready once ``host:port`` accepts a TCP connection."""

    def check() -> dict[str, Any] | None:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                pass
        except OSError:
            return None
        h = f"[{host}]" if ":" in host else host
        return {"host": host, "port": port, "url": f"{scheme}://{h}:{port}"}

    return check


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout:.1f}s")
        time.sleep(interval)


class Running:
    """A started process. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        proc: subprocess.Popen[bytes],
        log_dir: Path,
    ) -> None:
        self.name = name
        self.argv = argv
        self.proc = proc
        self.log_dir = log_dir
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        self.info: dict[str, Any] = {}

    @property
    def url(self) -> str:
        """The base URL the process announced (ready file) or the probe derived."""
        return str(self.info["url"])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def logs(self) -> str:
        """stdout and stderr together, for canary greps."""
        return self.stdout_text() + self.stderr_text()

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def close(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL at once (simulate a crash)."""
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> Running:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Running {self.name} pid={self.proc.pid} url={self.info.get('url')}>"


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text[-limit:]


def start_server(
    argv: Sequence[str],
    ready_file: str | os.PathLike[str] | None = None,
    *,
    ready: ReadyCheck | None = None,
    timeout: float = 20.0,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    name: str | None = None,
    python: bool = True,
    log_dir: str | os.PathLike[str] | None = None,
) -> Running:
    """Start a process and wait until it is ready.

    ``argv`` follows the current interpreter (``sys.executable``) when ``python`` is true,
    e.g. ``["-m", "devstack.authserver", ...]``; with ``python=False`` it is the whole command.
    Readiness is ``ready_file`` (a JSON object appears there; a stale file is removed first)
    and/or ``ready`` (any :data:`ReadyCheck`); with both, both must pass and their dicts are
    merged into :attr:`Running.info`. ``env`` entries are added to the current environment.

    Raises :class:`ServerStartError` with the process's stderr when it exits early or is not
    ready within ``timeout`` (the process is killed in that case).
    """
    checks: list[ReadyCheck] = []
    if ready_file is not None:
        Path(ready_file).unlink(missing_ok=True)
        checks.append(ready_file_check(ready_file))
    if ready is not None:
        checks.append(ready)
    if not checks:
        raise ValueError("give ready_file and/or ready")

    full = [sys.executable, *argv] if python else list(argv)
    if name is None:
        name = _guess_name(full)
    logs = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="devstack-"))
    logs.mkdir(parents=True, exist_ok=True, mode=0o700)

    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_SOURCE_ROOT, child_env.get("PYTHONPATH", "")) if p
    )
    child_env.setdefault("PYTHONUNBUFFERED", "1")

    out_path, err_path = logs / f"{name}.stdout", logs / f"{name}.stderr"
    # Append: a restarted server (same name and log_dir) keeps the earlier run's logs.
    with open(out_path, "ab") as out, open(err_path, "ab") as err:
        proc = subprocess.Popen(
            full, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=child_env, cwd=cwd
        )
    running = Running(name, full, proc, logs)

    deadline = time.monotonic() + timeout
    while True:
        results = [c() for c in checks]
        if all(r is not None for r in results):
            for r in results:
                running.info.update(r or {})
            return running
        if proc.poll() is not None:
            raise ServerStartError(
                f"{name} exited with {proc.returncode} before it was ready; stderr:\n"
                f"{_tail(err_path)}"
            )
        if time.monotonic() >= deadline:
            running.kill()
            raise ServerStartError(
                f"{name} was not ready within {timeout:.1f}s; stderr:\n{_tail(err_path)}"
            )
        time.sleep(0.05)


def _guess_name(full: list[str]) -> str:
    if "-m" in full[:-1]:
        return full[full.index("-m") + 1].rsplit(".", 1)[-1]
    return Path(full[0]).name
