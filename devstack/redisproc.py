"""A private redis-server for tests and benchmarks: its own port, no persistence, and
stoppable without touching any shared Redis on the machine."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from devstack.procs import free_port


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None, *,
                 tls: tuple[Path, Path, Path] | None = None,
                 acl: tuple[str, str] | None = None, extra: Sequence[str] = (),
                 sentinel: bool = False) -> None:
        """``tls`` = (cert, key, ca): serve TLS only. ``acl`` = (user, password): that user
        only, the default user disabled. ``extra``: further config lines (cluster or
        replication settings, see devstack.redistopo), written after the ones above.
        ``sentinel``: run as a Redis Sentinel (``--sentinel``), which rewrites its config file
        (each server has its own: ``<workdir>/redis-<port>.conf``)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed")
        self.binary = binary
        self.port = port or free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls = tls
        self.acl = acl
        self.extra = list(extra)
        self.sentinel = sentinel

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def _config(self) -> Path:
        lines = ["bind 127.0.0.1", 'save ""', "appendonly no", f"dir {self.workdir}"]
        if self.tls:
            cert, key, ca = self.tls
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {cert}",
                      f"tls-key-file {key}", f"tls-ca-cert-file {ca}", "tls-auth-clients no"]
        else:
            lines.append(f"port {self.port}")
        if self.acl:
            user, password = self.acl
            lines += [f"user {user} on >{password} ~* &* +@all", "user default off"]
        lines += self.extra
        path = self.workdir / f"redis-{self.port}.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (again) with no keys: a ``dump.rdb`` in the workdir is removed first (a
        replica that did a disk-based full sync leaves one, and Redis would load it)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "dump.rdb").unlink(missing_ok=True)
        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115
        argv = [self.binary, str(self._config())] + (["--sentinel"] if self.sentinel else [])
        self.proc = subprocess.Popen(argv,
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    if self.tls:
                        return self  # listening; TLS clients do their own handshake
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: an abrupt loss, with every key gone (no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the server stops answering but keeps its connections and data (a slow
        or stalled Redis; redis 7 refuses DEBUG SLEEP by default)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def command(self, *args: str) -> bytes:
        """Send one inline command (e.g. DEBUG SLEEP) without a client library."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall((" ".join(args) + "\r\n").encode())
            return s.recv(4096)
