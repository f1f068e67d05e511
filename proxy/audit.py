"""The audit log: one JSON line per credential decision, hash-chained.

Every record has the same keys; a key that does not apply is ``null``, so consumers see
a fixed shape::

    {"ts": "2026-11-23T09:40:06.123456Z", "event": "credential.injected",
     "user": "alice", "provider": "github", "context": {"kind": ..., "id": ...},
     "request": {"id": ..., "method": "GET", "host": "api.github.com", "path": "/user",
                 "mcp": null},
     "outcome": "injected", "reason": null, "detail": null, "upstream_status": null,
     "token": {"fingerprint": "3f9c0a1b2c3d4e5f", "source": "cache"}, "actor": null,
     "instance": "host-1/9f2c4a1e", "seq": 7, "prev": "<hex>", "hash": "<hex>"}

Never logged: access or refresh tokens (only a keyed fingerprint), client secrets, the
user-context JWS, query strings, fragments and bodies.

Chains. Each process start is a new chain with its own ``instance`` (callers pass e.g.
``"<hostname>/<random>"``, see :func:`new_instance_id`), so several replicas can write
interleaved into one stream and a restart never has to read back the old log. Within a
chain ``seq`` counts from 1 and::

    prev = hash of the previous record of this instance (null for seq 1)
    hash = sha256((prev or "").encode("ascii")
                  + canonical_json(record without "hash").encode("utf-8")).hexdigest()
    canonical_json = json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)

The chain detects edited, deleted, reordered and duplicated records. It is not keyed: a
writer who rewrites a record *and every later one* produces a valid chain, and dropping the
newest records is invisible. Signed checkpoints catch those (:class:`CheckpointPolicy`,
:mod:`proxy.checkpoint`: a record ``audit.checkpoint`` every N records or T seconds and at
:meth:`AuditLog.close`, copied to a second sink); ``on_record`` exports each record
(:mod:`proxy.auditexport`: OTLP, OCSF).

Administrative actions are records of the same chain with an ``actor``
(:func:`cli_actor` for a ``credproxy`` command, :data:`SYSTEM_ACTOR` for credproxy itself):
``config.loaded``, ``config.reloaded``, connects, revokes, offboarding, suspensions.

Lines are written as compact, ASCII-only JSON (``ensure_ascii=True``): verification
re-derives the canonical form from the parsed values, and an ASCII line cannot fail on a
stdout whose encoding is not UTF-8.

Sinks never lose the trail silently: :class:`FileSink` follows its path across rotation
(logrotate ``create``, ``mv``, ``rm``) and fails closed while it cannot write;
:class:`StdoutSink` never blocks the caller for long (a stalled reader fails closed after a
bound). Both report :class:`SinkHealth` for the probes. A rotated log is verified as one
stream over its files, oldest first (:class:`LogFiles`, ``.gz`` included); the chain does
not care where the files were cut. See docs/operations.md, "Audit sinks, rotation and
signals".
"""

from __future__ import annotations

import errno
import getpass
import gzip
import hashlib
import hmac
import json
import logging
import os
import secrets
import select
import socket
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import (
    IO,
    Any,
    Final,
    Literal,
    NamedTuple,
    Protocol,
    TextIO,
    get_args,
    runtime_checkable,
)

from proxy.errors import AuditUnavailable
from proxy.secret import Secret
from proxy.timewindow import TimeWindow

Record = dict[str, Any]
TokenSource = Literal["cache", "vault", "refresh"]

CREDENTIAL_INJECTED: Final = "credential.injected"
CREDENTIAL_DENIED: Final = "credential.denied"
CREDENTIAL_REFRESHED: Final = "credential.refreshed"
IDENTITY_REJECTED: Final = "identity.rejected"
REAUTH_REQUIRED: Final = "reauth.required"
CONNECTION_CREATED: Final = "connection.created"
CONNECTION_REVOKED: Final = "connection.revoked"
USER_OFFBOARDED: Final = "user.offboarded"
# Administrative events (issue 17): a config reload (detail: digests) and a start (the
# keys in use, by id); a signed checkpoint of the chain (proxy.checkpoint).
CONFIG_LOADED: Final = "config.loaded"
CONFIG_RELOADED: Final = "config.reloaded"
AUDIT_CHECKPOINT: Final = "audit.checkpoint"
SUSPENSION_ADDED: Final = "suspension.added"
SUSPENSION_LIFTED: Final = "suspension.lifted"
EVENTS: Final = frozenset(
    {
        CREDENTIAL_INJECTED,
        CREDENTIAL_DENIED,
        CREDENTIAL_REFRESHED,
        IDENTITY_REJECTED,
        REAUTH_REQUIRED,
        CONNECTION_CREATED,
        CONNECTION_REVOKED,
        USER_OFFBOARDED,
        CONFIG_LOADED,
        CONFIG_RELOADED,
        AUDIT_CHECKPOINT,
        SUSPENSION_ADDED,
        SUSPENSION_LIFTED,
    }
)

_TOKEN_SOURCES: Final = frozenset(get_args(TokenSource))
_SINK_BACKLOG: Final = 1000  # checkpoint copies kept for a failing second sink
_FINGERPRINT_HEX: Final = 16


def _strip_query(path: str) -> str:
    """Drop ``?query`` and ``#fragment``: query strings often carry tokens or PII."""
    return path.split("#", 1)[0].split("?", 1)[0]


def _clean(value: str) -> str:
    """Make ``value`` encodable as UTF-8.

    Paths decoded with ``surrogateescape`` (or a JWS claim with an escaped lone surrogate)
    would otherwise make the hash or the write fail, turning odd input into a 503.
    """
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _opt(value: str | None) -> str | None:
    return None if value is None else _clean(value)


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The request a decision was about. ``path`` never keeps a query or fragment."""

    id: str | None
    method: str
    host: str
    path: str
    # An MCP request (:mod:`proxy.mcp`): its JSON-RPC method and tool/resource/prompt name
    # (never argument values); None for any other request.
    mcp_method: str | None = None
    mcp_name: str | None = None
    # A batch's messages, each (method, name).
    mcp_calls: tuple[tuple[str, str | None], ...] = ()

    def __post_init__(self) -> None:
        # Callers should pass a bare path; strip anyway so a slip cannot leak a query.
        object.__setattr__(self, "path", _strip_query(self.path))

    def as_dict(self) -> dict[str, object]:
        """``{"id", "method", "host", "path", "mcp"}``; ``mcp`` is ``{"method": str,
        "name": str | None}`` for an MCP request (a batch adds ``"calls": [{"method",
        "name"}, ...]``, one per message), else null."""
        mcp: dict[str, object] | None = None
        if self.mcp_method is not None:
            mcp = {"method": _clean(self.mcp_method), "name": _opt(self.mcp_name)}
            if self.mcp_calls:
                mcp["calls"] = [{"method": _clean(m), "name": _opt(n)}
                                for m, n in self.mcp_calls]
        return {
            "id": _opt(self.id),
            "method": _clean(self.method),
            "host": _clean(self.host),
            "path": _clean(self.path),
            "mcp": mcp,
        }


@dataclass(frozen=True, slots=True)
class ContextInfo:
    """The user context a request ran under (its kind and id, never the JWS itself)."""

    kind: str
    id: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": _clean(self.kind), "id": _clean(self.id)}


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asked for an administrative action (a connect, revoke, suspension, reload...).

    ``kind``: ``"cli"`` (``id`` = the operating-system user running ``credproxy``),
    ``"admin"`` (a caller of the admin port, ``id`` = what authenticated it, e.g. the
    user of a verified user context), ``"user"`` (the end user acting on their own
    connection) or ``"system"`` (credproxy itself, e.g. a reload on a file change).
    Request-path records have no actor (``null``): the human is ``user``.
    """

    kind: Literal["cli", "admin", "user", "system"]
    id: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": _clean(self.kind), "id": _clean(self.id)}


def cli_actor() -> Actor:
    """The actor for a ``credproxy`` command run at a terminal: ``Actor("cli",
    "<os user>@<hostname>")``. The operating-system user is the login name
    (:func:`getpass.getuser`: ``LOGNAME``/``USER``/the password database), ``"uid<N>"`` when
    none resolves (a container running as an arbitrary uid)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = f"uid{os.getuid()}"
    return Actor("cli", f"{user}@{socket.gethostname()}")


SYSTEM_ACTOR: Final = Actor("system", "credproxy")


def fingerprint(token: Secret, key: bytes) -> str:
    """A short keyed hash of ``token``: HMAC-SHA256 under ``key``, first 16 hex chars.

    Keyed so that a leaked log cannot be used to confirm a guessed or stolen token offline;
    the same key across restarts keeps fingerprints comparable between log lines.
    """
    mac = hmac.new(key, token.reveal().encode("utf-8", "surrogatepass"), hashlib.sha256)
    return mac.hexdigest()[:_FINGERPRINT_HEX]


def canonical_json(record: Record) -> str:
    """The exact text the chain hash covers."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_hash(prev: str | None, record_without_hash: Record) -> str:
    """``sha256(prev + canonical_json(record))`` as hex; ``prev`` is empty for seq 1."""
    digest = hashlib.sha256()
    if prev:
        # surrogatepass: a tampered record must fail verification, not crash it.
        digest.update(prev.encode("utf-8", "surrogatepass"))
    digest.update(canonical_json(record_without_hash).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def new_instance_id() -> str:
    """``"<hostname>/<8 random hex>"``: unique per process start, readable in logs."""
    return f"{socket.gethostname()}/{secrets.token_hex(4)}"


# --- sinks -------------------------------------------------------------------------------

log = logging.getLogger("credproxy.audit")

# Defaults for the stdout sink (config: audit.stall_timeout, audit.buffer_bytes).
STALL_TIMEOUT = 2.0
BUFFER_BYTES = 1 << 20
# How long a record waits for the stdout writer when it was idle: long enough for a healthy
# pipe (microseconds), short enough that a reader that just stalled costs the event loop
# one such wait, not one per request.
SYNC_WAIT = 0.05


class Sink(Protocol):
    """Where records go. ``write`` gets one line without its newline and raises on failure."""

    def write(self, line: str) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SinkHealth:
    """Whether a sink can write now, for the probes.

    ``detail``: ``"ok"`` or what is wrong (no secrets; a file path at most).
    ``failing_since``: ``time.monotonic()`` seconds when the current failure began.
    ``restart_helps``: only a new process can fix it (a dead or stuck standard output); a
    file sink reopens its path by itself, so restarting would not help.
    """

    ok: bool
    detail: str = "ok"
    failing_since: float | None = None
    restart_helps: bool = False


HEALTHY: Final = SinkHealth(ok=True)


@runtime_checkable
class MonitoredSink(Sink, Protocol):
    """A sink that reports its health and can be told to reopen its file."""

    def health(self) -> SinkHealth: ...

    def reopen(self) -> bool: ...


class SinkEvents(Protocol):
    """What a sink reports for metrics (called from any thread).

    ``reopened(reason)``: ``"rotated"`` (the path names another file or none), ``"size"``
    (built-in rotation), ``"signal"`` (SIGHUP/SIGUSR1) or ``"error"`` (after a failed
    write). ``failed(kind)``: ``"open"``, ``"write"``, ``"stalled"``, ``"buffer_full"``
    (once per refused record or failed write) or ``"rotate"`` (a size rotation whose rename
    failed; nothing refused). ``dropped(records)``: records accepted into the stdout buffer
    and then lost to a write error (the chain shows the gap).
    """

    def reopened(self, reason: str) -> None: ...

    def failed(self, kind: str) -> None: ...

    def dropped(self, records: int) -> None: ...


class _NoEvents:
    def reopened(self, reason: str) -> None:
        pass

    def failed(self, kind: str) -> None:
        pass

    def dropped(self, records: int) -> None:
        pass


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: in memory
        return None


def _write_some(fd: int, view: memoryview) -> int:
    """One blocking ``os.write``; waits for writability if someone made ``fd``
    non-blocking (the flag belongs to the open file, which other processes share)."""
    while True:
        try:
            return os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte, blocking."""
    view = memoryview(data)
    while view:
        view = view[_write_some(fd, view):]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)} ({exc.strerror})"
    return type(exc).__name__


# A write of fewer bytes to a pipe is atomic (POSIX): it never blocks once the pipe polls
# writable, and never interleaves with another writer's.
PIPE_BUF = getattr(select, "PIPE_BUF", 4096)


class StdoutSink:
    """Writes records to standard output (or ``stream``); never blocks its caller for long.

    A stream with a file descriptor (a pipe to the container runtime or a log shipper, a
    terminal, a file) is written by a background thread, so a reader that stops reading
    cannot freeze the event loop:

    * When nothing is queued and the descriptor polls writable, ``write`` writes the line
      itself (under PIPE_BUF bytes: it cannot block); a write error is raised for that
      record.
    * Otherwise ``write`` queues the line. When the writer was idle it waits up to ``sync_wait``
      seconds for the line to reach the kernel, so normally a record is out when ``write``
      returns and a write error (EPIPE: the reader is gone) is raised for that record.
    * While a write is blocked, lines are queued without waiting, up to ``buffer_bytes``
      (in flight included); they go out in order once the reader reads again.
    * Once a write has been blocked for ``stall_timeout`` seconds, or the buffer is full,
      ``write`` raises :class:`TimeoutError` or :class:`BufferError` at once (fail closed).
    * Records queued behind a write that then fails are lost: logged, reported through
      ``events.dropped`` and visible to ``audit verify`` as a gap in the chain.

    :meth:`health` is not ok while the last write failed or a write is stalled;
    ``restart_helps`` is set, because a closed standard output never comes back.

    A stream without a descriptor (``io.StringIO``, pytest's capture) lives in memory and
    cannot block: it is written in the caller.
    """

    def __init__(self, stream: TextIO | None = None, *, buffer_bytes: int = BUFFER_BYTES,
                 stall_timeout: float = STALL_TIMEOUT, sync_wait: float = SYNC_WAIT,
                 events: SinkEvents | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._fd = _fileno(self._stream)
        if self._fd is not None:
            try:
                self._stream.flush()  # whatever print() left buffered goes first
            except (OSError, ValueError):
                pass
        self._buffer_bytes = buffer_bytes
        self._stall_timeout = stall_timeout
        self._sync_wait = sync_wait
        self.events: SinkEvents = events or _NoEvents()
        self._clock = clock
        self._cond = threading.Condition()
        self._closed = False
        # After a failed write part of a line may already be out; start the next record on
        # a fresh line so it still parses (an empty line is skipped by readers).
        self._needs_newline = False
        self._queue: deque[bytes] = deque()
        self._held = 0  # bytes queued or in flight
        self._tickets = 0  # records accepted
        self._settled = 0  # records written or failed, in order
        self._busy_since: float | None = None  # a write in flight since
        self._waiter: int | None = None  # the ticket whose caller waits for its result
        self._waiter_error: BaseException | None = None
        self._error: str | None = None
        self._failing_since: float | None = None
        self._thread: threading.Thread | None = None
        self._poll: select.poll | None = None

    # -- writing ---------------------------------------------------------------------------

    def write(self, line: str) -> None:
        if self._fd is None:
            self._write_inline(line)
            return
        data = (line + "\n").encode("utf-8")
        with self._cond:
            if self._closed:
                raise ValueError("audit sink is closed")
            self._refuse_if_stuck(len(data))
            idle = not self._queue and self._busy_since is None
            if idle and len(data) < PIPE_BUF and self._writable_now():
                rest = self._write_now(data)
                if not rest:
                    return
                data = rest  # a partial write (a full disk): the thread writes the rest
            self._queue.append(data)
            self._held += len(data)
            self._tickets += 1
            ticket = self._tickets
            self._start_writer()
            self._cond.notify_all()
            if not idle:
                return  # behind a write in flight: accepted, goes out in order
            self._waiter, self._waiter_error = ticket, None
            try:
                self._cond.wait_for(lambda: self._settled >= ticket, timeout=self._sync_wait)
                error = self._waiter_error
            finally:
                self._waiter, self._waiter_error = None, None
        if error is not None:
            raise error

    def _writable_now(self) -> bool:
        """Whether a write of under PIPE_BUF bytes cannot block now: the descriptor polls
        writable (a pipe then has a free page; a file always does)."""
        assert self._fd is not None
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self._fd, select.POLLOUT)
        return any(ev & select.POLLOUT for _, ev in self._poll.poll(0))

    def _write_now(self, data: bytes) -> bytes:
        """Write one record in the caller (the common case: no thread hand-off, whose cost
        was most of a record's). Returns what is left to write (a partial write), raises
        the write's OSError after recording the failure. Called with the lock held."""
        assert self._fd is not None
        prefix = b"\n" if self._needs_newline else b""
        self._needs_newline = True
        self._tickets += 1
        try:
            sent = os.write(self._fd, prefix + data)
        except OSError as exc:
            self._settled += 1
            self._failed(exc)
            raise
        if sent >= len(prefix) + len(data):
            self._settled += 1
            self._needs_newline = False
            self._healthy()
            return b""
        # The line is partly out: the rest continues it, with no newline before it.
        self._tickets -= 1
        self._needs_newline = False
        return data[max(0, sent - len(prefix)):]

    def _refuse_if_stuck(self, size: int) -> None:
        since = self._busy_since
        if since is not None and self._clock() - since > self._stall_timeout:
            self.events.failed("stalled")
            raise TimeoutError(f"audit stdout: a write has been blocked for "
                               f"{self._clock() - since:.1f} s (the reader is not reading)")
        if self._held + size > self._buffer_bytes:
            self.events.failed("buffer_full")
            raise BufferError(f"audit stdout: {self._held} bytes waiting for the reader "
                              f"(buffer {self._buffer_bytes})")

    def _start_writer(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="credproxy-audit-stdout",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._fd is not None
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                records = len(self._queue)
                batch = b"".join(self._queue)
                self._queue.clear()
                first, last = self._settled + 1, self._tickets
                prefix = b"\n" if self._needs_newline else b""
                self._needs_newline = True
                self._busy_since = self._clock()
            error: OSError | None = None
            view, sent = memoryview(prefix + batch), 0
            try:
                while sent < len(view):
                    sent += _write_some(self._fd, view[sent:])
            except OSError as exc:
                error = exc
            with self._cond:
                self._held -= len(batch)
                self._busy_since = None
                self._settled = last
                if error is None:
                    self._needs_newline = False
                    self._healthy()
                else:
                    self._failed(error)
                    # Records wholly written before the error are out (in the pipe).
                    out = batch[:max(0, sent - len(prefix))].count(b"\n")
                    lost = records - out
                    waiter = self._waiter
                    if waiter is not None and first + out <= waiter <= last:
                        self._waiter_error = error
                        lost -= 1  # its caller is told and refuses the request
                    if lost:
                        self.events.dropped(lost)
                        log.error("audit stdout: %d accepted records were lost to a failed "
                                  "write (%s); `audit verify` shows the gap", lost,
                                  _describe(error))
                self._cond.notify_all()

    def _write_inline(self, line: str) -> None:
        if self._closed:
            raise ValueError("audit sink is closed")
        prefix = "\n" if self._needs_newline else ""
        self._needs_newline = True
        try:
            self._stream.write(f"{prefix}{line}\n")
            self._stream.flush()
        except Exception as exc:
            with self._cond:
                self._failed(exc)
            raise
        self._needs_newline = False
        with self._cond:
            self._healthy()

    def _failed(self, exc: BaseException) -> None:
        self.events.failed("write")
        detail = f"write failed: {_describe(exc)}"
        if self._error is None:
            self._failing_since = self._clock()
            log.error("audit stdout: %s; requests are refused (503 audit-unavailable) until "
                      "it can be written again", detail)
        self._error = detail

    def _healthy(self) -> None:
        if self._error is not None:
            log.warning("audit stdout: writing again")
        self._error, self._failing_since = None, None

    # -- state -----------------------------------------------------------------------------

    def health(self) -> SinkHealth:
        with self._cond:
            now = self._clock()
            if self._closed:
                return SinkHealth(False, "closed")
            since = self._busy_since
            if since is not None and now - since > self._stall_timeout:
                return SinkHealth(False, f"stalled: a write has been blocked for "
                                  f"{now - since:.0f} s", since, restart_helps=True)
            if self._error is not None:
                return SinkHealth(False, self._error, self._failing_since, restart_helps=True)
            return HEALTHY

    def reopen(self) -> bool:
        """Nothing to reopen: standard output is inherited (False)."""
        return False

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting records and wait up to ``timeout`` seconds (default: the stall
        timeout) for the queued ones; the stream itself is not ours to close."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._queue and self._busy_since is None,
                                timeout=self._stall_timeout if timeout is None else timeout)
            left = len(self._queue) + (self._busy_since is not None)
        if left:
            log.error("audit stdout: exiting with records still unwritten (the reader is "
                      "not reading)")
        if self._fd is None:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                pass


class FileSink:
    """Appends records to a file created with mode 0600, following rotation.

    Writes go straight to the descriptor (``os.write``, no userspace buffer), so a record
    that failed is never flushed later behind the next one, and ``O_APPEND`` keeps
    concurrent writers from overwriting each other.

    Before each write the path is compared with the open file (``st_dev``/``st_ino``): when
    it names another file or none (logrotate ``create``, ``mv``, ``rm``) the path is
    reopened, created 0600 if missing. The file is also reopened on :meth:`reopen` (SIGHUP,
    SIGUSR1) and after a failed write. If it cannot be opened the write raises (fail
    closed); the next write tries again, so the log recovers once the disk or mount is back.
    ``copytruncate`` is not supported: records written between its copy and its truncate are
    lost (``audit verify`` over the copy and the file reports the gap).

    Built-in rotation (``max_bytes``): before a record would take the file past
    ``max_bytes``, ``PATH.N`` becomes ``PATH.N+1`` (the one beyond ``keep`` is deleted),
    ``PATH`` becomes ``PATH.1`` and a new ``PATH`` is created; the chain simply continues in
    the new file. A rename that fails is logged and counted, and records keep going to the
    current file. Meant for one writing process per file.

    ``fsync`` is off by default: a record is in the kernel once ``write`` returns, which
    survives a proxy crash; only a host crash can lose it, and an fsync per proxied request
    would put disk latency on every call. Pass ``fsync=True`` to pay that for durability.
    An existing file keeps its mode.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False,
                 max_bytes: int | None = None, keep: int = 5,
                 events: SinkEvents | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.path = os.fspath(path)
        self._fsync = fsync
        self._max_bytes = max_bytes
        self._keep = keep
        self.events: SinkEvents = events or _NoEvents()
        self._clock = clock
        self._lock = threading.RLock()
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._opened_once = False
        self._reopen_reason = "error"
        self._closed = False
        self._needs_newline = False
        self._error: str | None = None
        self._failing_since: float | None = None

    def _open(self) -> int:
        # O_NONBLOCK: a FIFO put in the file's place would block the open (and the event
        # loop) until a reader came; it fails at once instead, and is refused below.
        flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
                 | getattr(os, "O_CLOEXEC", 0))
        fd = os.open(self.path, flags, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                # /dev/null (a symlink to it), a FIFO, a socket: records would vanish or
                # block. Only a regular file keeps the trail.
                raise OSError(errno.EINVAL, f"{self.path} is not a regular file")
            os.set_blocking(fd, True)
            if st.st_size > 0 and not self._ends_with_newline(st.st_size):
                # A previous writer died mid-line; do not glue our first record onto it.
                self._needs_newline = True
        except OSError:
            os.close(fd)
            raise
        self._ident = (st.st_dev, st.st_ino)
        return fd

    def _ends_with_newline(self, size: int) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                return f.read(1) in (b"\n", b"")
        except OSError:
            return True  # cannot tell (write-only file); an extra junk line is harmless

    def _current_fd(self, *, probe: bool = False) -> int:
        """The descriptor of the file the path names now, reopened if it changed. A failed
        open is counted unless ``probe`` (readiness asks every few seconds)."""
        if self._fd is not None and not self._still_named():
            self._drop_fd()
            self._reopen_reason = "rotated"
            log.info("audit file %s was rotated, moved or removed: reopening it", self.path)
        if self._fd is None:
            try:
                self._fd = self._open()
            except OSError as exc:
                if not probe:
                    self.events.failed("open")
                self._failing(f"cannot open {self.path}: {_describe(exc)}")
                raise
            if self._opened_once:
                self.events.reopened(self._reopen_reason)
            self._opened_once = True
            self._reopen_reason = "error"
        return self._fd

    def _still_named(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False  # gone, or its directory is: reopen decides
        return (st.st_dev, st.st_ino) == self._ident

    def write(self, line: str) -> None:
        with self._lock:
            if self._closed:
                raise ValueError("audit sink is closed")
            fd = self._current_fd()
            data = (("\n" if self._needs_newline else "") + line + "\n").encode("utf-8")
            if self._max_bytes is not None and self._rotate_by_size(fd, len(data)):
                fd = self._current_fd()
                data = (("\n" if self._needs_newline else "") + line + "\n").encode("utf-8")
            self._needs_newline = True
            try:
                _write_all(fd, data)
                if self._fsync:
                    os.fsync(fd)
            except OSError as exc:
                self._drop_fd()
                self.events.failed("write")
                self._failing(f"write to {self.path} failed: {_describe(exc)}")
                raise
            self._needs_newline = False
            self._recovered()

    def _rotate_by_size(self, fd: int, size: int) -> bool:
        """Rotate if ``size`` more bytes would take the file past ``max_bytes``; True if
        it did (the descriptor is then closed)."""
        assert self._max_bytes is not None
        current = os.fstat(fd).st_size
        if current == 0 or current + size <= self._max_bytes:
            return False
        try:
            for n in range(self._keep - 1, 0, -1):
                if os.path.lexists(f"{self.path}.{n}"):
                    os.replace(f"{self.path}.{n}", f"{self.path}.{n + 1}")
            os.replace(self.path, f"{self.path}.1")
        except OSError as exc:
            self.events.failed("rotate")
            log.error("audit file %s: size rotation failed (%s); records keep going to the "
                      "current file", self.path, _describe(exc))
            return False
        self._drop_fd()
        self._reopen_reason = "size"
        self._needs_newline = False
        return True

    def _failing(self, detail: str) -> None:
        if self._error is None:
            self._failing_since = self._clock()
            log.error("audit file: %s; requests are refused (503 audit-unavailable) until it "
                      "can be written", detail)
        self._error = detail

    def _recovered(self) -> None:
        if self._error is not None:
            log.warning("audit file %s: writing again", self.path)
        self._error, self._failing_since = None, None

    def reopen(self) -> bool:
        """Close the file and open the path again now (a rotation signal); True. Raises
        :class:`OSError` if it cannot be opened; writes keep failing closed until it can."""
        with self._lock:
            if self._closed:
                return False
            self._drop_fd()
            self._reopen_reason = "signal"
            self._current_fd()
            return True

    def health(self) -> SinkHealth:
        """Ok when the path can be opened (reopening it if it was rotated or a write
        failed). A disk that accepts the open but not the write (full) shows up with the
        next record."""
        with self._lock:
            if self._closed:
                return SinkHealth(False, "closed")
            try:
                self._current_fd(probe=True)
            except OSError:
                return SinkHealth(False, self._error or "cannot open", self._failing_since)
            self._recovered()
            return HEALTHY

    def _drop_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass  # already broken; the write error is what the caller needs to see

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_fd()


def open_sink(spec: str, *, events: SinkEvents | None = None,
              stall_timeout: float = STALL_TIMEOUT, buffer_bytes: int = BUFFER_BYTES,
              rotate_bytes: int | None = None, rotate_keep: int = 5) -> StdoutSink | FileSink:
    """``"stdout"`` writes to standard output (``stall_timeout``, ``buffer_bytes``);
    anything else is a file path (``rotate_bytes``, ``rotate_keep``: built-in rotation)."""
    if spec == "stdout":
        return StdoutSink(events=events, stall_timeout=stall_timeout,
                          buffer_bytes=buffer_bytes)
    return FileSink(spec, events=events, max_bytes=rotate_bytes, keep=rotate_keep)


# --- writing -----------------------------------------------------------------------------


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class CheckpointPolicy:
    """When and how :class:`AuditLog` writes signed checkpoints (:mod:`proxy.checkpoint`).

    ``sign(instance, seq, head) -> detail``: the checkpoint record's ``detail``
    (:meth:`proxy.checkpoint.Signer.detail`). A checkpoint follows every ``every_records``
    records, after ``every_seconds`` seconds with records not yet checkpointed (a timer
    thread), and at :meth:`AuditLog.close`. ``sink``: a second sink that gets a copy of
    each checkpoint record (its failures are logged, never fail a request).
    """

    sign: Callable[[str, int, str], str]
    every_records: int | None = 1000
    every_seconds: float | None = 60.0
    sink: Sink | None = None
    # "written" / "failed" / "sink_failed" (a copy the second sink missed), for metrics
    counted: Callable[[str], None] | None = None


class AuditLog:
    """Builds, chains and writes audit records. Safe to share between threads."""

    def __init__(
        self,
        sink: Sink,
        *,
        instance: str,
        fingerprint_key: bytes,
        clock: Callable[[], float] = time.time,
        checkpoint: CheckpointPolicy | None = None,
        on_record: Callable[[Record], None] | None = None,
    ) -> None:
        """``on_record(record)``: called with each record written (under the record lock,
        in chain order), e.g. to export it (:mod:`proxy.auditexport`); it must not block
        and must not raise (an exception is logged)."""
        if not instance:
            raise ValueError("audit instance id must be non-empty")
        if not fingerprint_key:
            raise ValueError("audit fingerprint key must be non-empty")
        self._sink = sink
        self.instance = _clean(instance)
        self._key = fingerprint_key
        self._clock = clock
        self._lock = threading.Lock()
        self._seq = 0
        self._prev: str | None = None
        self._checkpoint = checkpoint
        self._on_record = on_record
        self._checkpointed = 0  # seq covered by the last checkpoint written
        self._closed = threading.Event()
        self._closed_sinks = False
        self._sink_backlog: deque[str] = deque(maxlen=_SINK_BACKLOG)
        self._timer: threading.Thread | None = None
        if checkpoint is not None and checkpoint.every_seconds:
            self._timer = threading.Thread(target=self._tick, args=(checkpoint.every_seconds,),
                                           name="credproxy-audit-checkpoint", daemon=True)
            self._timer.start()

    def fingerprint(self, token: Secret) -> str:
        """This log's fingerprint of ``token`` (see :func:`fingerprint`)."""
        return fingerprint(token, self._key)

    def record(
        self,
        event: str,
        *,
        user: str | None = None,
        provider: str | None = None,
        context: ContextInfo | None = None,
        request: RequestInfo | None = None,
        outcome: str,
        reason: str | None = None,
        detail: str | None = None,
        upstream_status: int | None = None,
        token: Secret | None = None,
        token_source: TokenSource | None = None,
        actor: Actor | None = None,
    ) -> Record:
        """Write one record and return it. ``reason`` is a registered code
        (:mod:`proxy.reasons`); free text (what a provider said, what is still to do) goes in
        ``detail`` (at most 300 characters).

        Raises :class:`AuditUnavailable` if the sink fails; the chain is then left where it
        was, so the next successful record follows the last one actually written.
        """
        if not event or not outcome:
            raise ValueError("audit event and outcome must be non-empty")
        if token_source is not None and token_source not in _TOKEN_SOURCES:
            raise ValueError(f"unknown token source {token_source!r}")
        token_info = None
        if token is not None or token_source is not None:
            token_info = {
                "fingerprint": self.fingerprint(token) if token is not None else None,
                "source": token_source,
            }
        fields: Record = {
            "event": _clean(event),
            "user": _opt(user),
            "provider": _opt(provider),
            "context": context.as_dict() if context is not None else None,
            "request": request.as_dict() if request is not None else None,
            "outcome": _clean(outcome),
            "reason": _opt(reason),
            "detail": _opt(detail[:300]) if detail is not None else None,
            "upstream_status": upstream_status,
            "token": token_info,
            "actor": actor.as_dict() if actor is not None else None,
        }
        with self._lock:
            rec = self._append(fields)
            cp = self._checkpoint
            if (cp is not None and cp.every_records
                    and self._seq - self._checkpointed >= cp.every_records):
                self._write_checkpoint()
        return rec

    def _append(self, fields: Record) -> Record:
        """Chain and write one record; the caller holds the lock."""
        # Clock read under the lock so ts never goes backwards against seq.
        rec: Record = {"ts": _rfc3339(self._clock()), **fields,
                       "instance": self.instance, "seq": self._seq + 1, "prev": self._prev}
        rec["hash"] = chain_hash(self._prev, rec)
        line = json.dumps(rec, separators=(",", ":"), ensure_ascii=True)
        try:
            self._sink.write(line)
        except (TimeoutError, BufferError) as exc:
            raise AuditUnavailable(
                "audit log stalled: its reader is not keeping up",
                reason="audit_sink_stalled") from exc
        except Exception as exc:
            # Fail closed on anything (OSError, closed stream, ...): the caller must
            # not inject a credential it could not account for.
            raise AuditUnavailable(
                f"audit log write failed: {type(exc).__name__}", reason="audit_write_failed"
            ) from exc
        self._seq = rec["seq"]
        self._prev = rec["hash"]
        if self._on_record is not None:
            try:
                self._on_record(rec)
            except Exception:
                log.exception("audit record hook failed (the record is written)")
        return rec

    def _write_checkpoint(self) -> Record | None:
        """Append a signed checkpoint of the chain head; the caller holds the lock. A
        failure is logged and retried at the next chance: the records it would cover are
        written, only not yet proven."""
        cp = self._checkpoint
        if cp is None or self._prev is None or self._seq <= self._checkpointed:
            return None
        try:
            rec = self._append({
                "event": AUDIT_CHECKPOINT, "user": None, "provider": None, "context": None,
                "request": None, "outcome": "signed", "reason": None,
                "detail": cp.sign(self.instance, self._seq, self._prev),
                "upstream_status": None, "token": None, "actor": SYSTEM_ACTOR.as_dict()})
        except Exception as exc:  # noqa: BLE001 - AuditUnavailable, a signing error: logged
            log.error("audit checkpoint not written (%s); retried with the next record",
                      exc)
            if cp.counted is not None:
                cp.counted("failed")
            return None
        self._checkpointed = rec["seq"]
        if cp.counted is not None:
            cp.counted("written")
        if cp.sink is not None:
            # Copies the second sink missed are retried with the next checkpoint, oldest
            # first (at most _SINK_BACKLOG kept); each miss is counted ("sink_failed").
            self._sink_backlog.append(json.dumps(rec, separators=(",", ":"),
                                                 ensure_ascii=True))
            while self._sink_backlog:
                try:
                    cp.sink.write(self._sink_backlog[0])
                except Exception as exc:  # noqa: BLE001 - the second sink never fails a request
                    log.error("audit checkpoint seq %d not written to the checkpoint sink "
                              "(%d copies waiting): %s", rec["seq"], len(self._sink_backlog),
                              _describe(exc))
                    if cp.counted is not None:
                        cp.counted("sink_failed")
                    break
                self._sink_backlog.popleft()
        return rec

    def checkpoint(self) -> Record | None:
        """Write a checkpoint now if records were written since the last one (and
        checkpoints are configured); returns it, or None."""
        with self._lock:
            return self._write_checkpoint()

    def _tick(self, every: float) -> None:
        while not self._closed.wait(every):
            self.checkpoint()

    def health(self) -> SinkHealth:
        """The sink's health (a sink that cannot tell is taken as healthy). Does not take
        the record lock: a probe never waits behind a write."""
        return self._sink.health() if isinstance(self._sink, MonitoredSink) else HEALTHY

    def reopen(self) -> bool:
        """Reopen the sink's file (SIGHUP/SIGUSR1 after a rotation); False when the sink
        has no file (stdout). Raises :class:`OSError` if it cannot be opened: records then
        fail closed until it can."""
        if not isinstance(self._sink, MonitoredSink):
            return False
        with self._lock:
            return self._sink.reopen()

    def close(self) -> None:
        """Write a final checkpoint (when configured), then close the sinks."""
        self._closed.set()
        with self._lock:
            if self._closed_sinks:
                return
            self._write_checkpoint()
            self._closed_sinks = True
            self._sink.close()
            if self._checkpoint is not None and self._checkpoint.sink is not None:
                self._checkpoint.sink.close()


# --- reading -----------------------------------------------------------------------------


class LogFiles:
    """The lines of several audit files, one after the other in the order given (oldest
    first: ``audit.jsonl.2.gz audit.jsonl.1 audit.jsonl``); names ending in ``.gz`` are
    decompressed. Iterate once; :meth:`where` then maps a line number counted over all
    files (as :func:`verify` reports it) to ``(file, line in that file)``.

    Raises :class:`OSError` (``gzip.BadGzipFile`` included) or :class:`EOFError` (a
    truncated ``.gz``) while iterating over a file that cannot be read.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self._starts: list[tuple[int, str]] = []

    @property
    def reading(self) -> str:
        """The file being read (the one that failed, after an error)."""
        return self._starts[-1][1] if self._starts else self.paths[0]

    def __iter__(self) -> Iterator[str]:
        count = 0
        for path in self.paths:
            self._starts.append((count, path))
            f: IO[str]
            if path.endswith(".gz"):
                f = gzip.open(path, "rt", encoding="utf-8", errors="replace")
            else:
                f = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
            with f:
                for line in f:
                    count += 1
                    yield line

    def where(self, line: int) -> tuple[str, int]:
        for start, path in reversed(self._starts):
            if line > start:
                return path, line - start
        raise ValueError(f"line {line} is in none of the files read")



def parse_lines(lines: Iterable[str]) -> Iterator[tuple[int, Record | None, str | None]]:
    """Yield ``(line_number, record, None)`` or ``(line_number, None, error)`` per line.

    Line numbers start at 1. Blank lines are skipped. Lines that are not a JSON object
    (other output interleaved by ``kubectl logs``, a torn write) are reported, not raised.
    A JSON object is returned as is; :func:`verify` decides whether it is a valid record.
    """
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        if not text.startswith("{"):
            yield number, None, "not JSON"
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            yield number, None, f"not JSON: {exc}"
            continue
        if not isinstance(value, dict):
            yield number, None, "not a JSON object"
            continue
        yield number, value, None


def _event_matches(actual: object, wanted: str) -> bool:
    if not isinstance(actual, str):
        return False
    family = wanted.rstrip(".")
    return actual == wanted or actual.startswith(family + ".")


def matches(
    record: Record,
    *,
    user: str | None = None,
    provider: str | None = None,
    event: str | None = None,
) -> bool:
    """Whether ``record`` passes every filter given (``None`` means no filter).

    ``user`` and ``provider`` match exactly. ``event`` matches exactly or as a dotted
    prefix: ``"credential."`` and ``"credential"`` both match ``"credential.injected"``,
    ``"cred"`` does not.
    """
    if user is not None and record.get("user") != user:
        return False
    if provider is not None and record.get("provider") != provider:
        return False
    return event is None or _event_matches(record.get("event"), event)


class VerifyError(NamedTuple):
    """The first broken record: where it is and what is wrong with it."""

    line: int
    seq: int | None
    instance: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    ok: bool
    records: int  # valid-looking records seen (all of them, also after an error)
    instances: int
    first_error: VerifyError | None
    skipped_lines: int = 0  # non-JSON lines, ignored
    # With a window: records in it, and breaks found outside it (not in first_error).
    in_window: int | None = None
    outside_breaks: int = 0


@dataclass(slots=True)
class _Chain:
    seq: int
    hash: str


def _check_shape(rec: Record) -> str | None:
    instance, seq, prev, digest = (rec.get(k) for k in ("instance", "seq", "prev", "hash"))
    if not isinstance(instance, str) or not instance:
        return "not an audit record: missing or bad 'instance'"
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return "not an audit record: missing or bad 'seq'"
    if not isinstance(digest, str) or not digest:
        return "not an audit record: missing or bad 'hash'"
    if "prev" not in rec or not (prev is None or isinstance(prev, str)):
        return "not an audit record: missing or bad 'prev'"
    if (seq == 1) != (prev is None):
        return "'prev' must be null exactly for seq 1"
    return None


def _check_link(rec: Record, chain: _Chain | None, allow_partial: bool) -> str | None:
    seq: int = rec["seq"]
    if chain is None:
        if seq != 1 and not allow_partial:
            return f"chain starts at seq {seq}, not 1 (earlier records missing?)"
        return None
    if seq != chain.seq + 1:
        if seq <= chain.seq:
            return f"seq {seq} after seq {chain.seq} (record repeated or out of order)"
        return f"seq {seq} after seq {chain.seq} (records missing or out of order)"
    if rec["prev"] != chain.hash:
        return "'prev' does not match the previous record's hash"
    return None


def _in_chain_order(entries: Iterable[tuple[int, Record | None, str | None]],
                    unwrap: Callable[[Record], Record | str] | None
                    ) -> list[tuple[int, Record | None, str | None]]:
    """``entries`` with the records sorted by (instance, seq), each keeping its line
    number; anything else (not records, unparseable) first, as read."""
    others: list[tuple[int, Record | None, str | None]] = []
    keyed: list[tuple[str, int, int, Record]] = []
    for number, rec, err in entries:
        carried = unwrap(rec) if rec is not None and unwrap is not None else rec
        if isinstance(carried, dict) and isinstance(carried.get("instance"), str) \
                and isinstance(carried.get("seq"), int):
            keyed.append((carried["instance"], carried["seq"], number, rec))  # type: ignore[arg-type]
        else:
            others.append((number, rec, err))
    keyed.sort(key=lambda k: (k[0], k[1], k[2]))
    return others + [(number, rec, None) for _, _, number, rec in keyed]


def verify(lines: Iterable[str], *, allow_partial: bool = False,
           window: TimeWindow | None = None,
           check: Callable[[Record], str | None] | None = None,
           unwrap: Callable[[Record], Record | str] | None = None,
           any_order: bool = False) -> VerifyReport:
    """Check the hash chains in ``lines`` and name the first broken record.

    Records are grouped by ``instance``, so interleaved replicas verify together. Per
    instance: each record's ``hash`` must match its content, ``seq`` must go up by one and
    ``prev`` must be the previous hash. A chain must start at seq 1 unless ``allow_partial``
    (the log was cut, e.g. ``kubectl logs --since``): then each instance's first record
    seen is the anchor. Lines that are not JSON are counted and skipped (other output
    interleaved by ``kubectl logs``, a torn write the chain continues over), except a
    record cut short on the *last* line: the log was truncated in its newest record (or its
    writer died writing it), which is an error. A JSON object that is not a record is an
    error.

    ``any_order`` (``audit verify --any-order``, for what a SIEM gives back: newest first,
    or in ingestion order): the records are put in chain order (by ``instance`` and
    ``seq``) before they are checked, so only a missing, edited or repeated record breaks
    the chain, not the order it came in. This holds every record in memory.

    ``window`` (``audit verify --since/--until``): every record is still hashed and linked
    (the chain runs across the window's edges), but only breaks that concern the window
    are errors: in a record inside it; in a record whose ``ts`` cannot be trusted to place
    it (an edited record, or one that is not a valid record, wherever its ``ts`` says it
    lies: an edit could have moved it out); and in the first record of each instance after
    the window (records missing there may have been inside it). Other breaks (records
    missing before the window or after its edge) are counted in ``outside_breaks``. A
    chain whose first record seen lies before the window may start mid-way; one that
    starts inside it must start at seq 1 unless ``allow_partial``.
    ``check(record)``: a further check of each record whose hash and link verified (e.g.
    :class:`proxy.checkpoint.CheckpointCheck`), returning a problem or None.
    ``unwrap(object)``: the record a parsed object carries, or a problem (an OCSF event,
    :func:`proxy.auditexport.unwrap`).
    """
    chains: dict[str, _Chain] = {}
    past: set[str] = set()  # instances with a record after the window
    first_error: VerifyError | None = None
    records = skipped = in_window = outside = 0
    entries: Iterable[tuple[int, Record | None, str | None]] = parse_lines(lines)
    if any_order:
        entries = _in_chain_order(entries, unwrap)
    cut_at: int | None = None  # the last line that began as a record and does not parse
    for number, rec, err in entries:
        if rec is None:
            skipped += 1
            if err is not None and err.startswith("not JSON:"):
                cut_at = number
            continue
        # A damaged line with records after it is a torn write (the writer refused that
        # record and went on from the last one written: the chain shows nothing lost).
        cut_at = None
        if unwrap is not None:
            carried = unwrap(rec)
            if isinstance(carried, str):
                if first_error is None:
                    first_error = VerifyError(number, None, None, carried)
                continue
            rec = carried
        instance = rec.get("instance") if isinstance(rec.get("instance"), str) else None
        seq = rec.get("seq") if isinstance(rec.get("seq"), int) else None
        place = 0 if window is None else window.position(rec.get("ts"))
        problem = _check_shape(rec)
        trusted = False  # whether the record's own ts can place it
        if problem is None:
            records += 1
            in_window += place == 0
            body = {k: v for k, v in rec.items() if k != "hash"}
            if chain_hash(rec["prev"], body) != rec["hash"]:
                problem = "hash does not match the record (edited)"
            elif place is None:
                problem = "no valid 'ts': cannot tell whether it lies in the window"
            else:
                trusted = True
                problem = _check_link(rec, chains.get(rec["instance"]),
                                      allow_partial or place == -1)
                if problem is None and check is not None:
                    problem = check(rec)
            # Continue from this record either way, so one break is reported once.
            chains[rec["instance"]] = _Chain(seq=rec["seq"], hash=rec["hash"])
        concerns = (not trusted or place == 0
                    or (place == 1 and instance not in past))
        if place == 1 and instance is not None:
            past.add(instance)
        if problem is not None:
            if not concerns:
                outside += 1
            elif first_error is None:
                first_error = VerifyError(number, seq, instance, problem)
    if cut_at is not None and first_error is None:
        first_error = VerifyError(cut_at, None, None,
                                  "the last line is a record cut short: the log was "
                                  "truncated (its newest records lost), or its writer died "
                                  "while writing it")
    return VerifyReport(
        ok=first_error is None,
        records=records,
        instances=len(chains),
        first_error=first_error,
        skipped_lines=skipped,
        in_window=None if window is None else in_window,
        outside_breaks=outside,
    )


def _printable(value: object) -> str:
    """Render for a terminal: ``-`` for null, control characters escaped.

    Fields come from requests; an ESC sequence in a path must not drive the operator's
    terminal.
    """
    if value is None or value == "":
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_record(record: Record) -> str:
    """One line for ``audit tail``: ts event user provider method host+path outcome reason."""
    req = record.get("request")
    req = req if isinstance(req, dict) else {}
    target = f"{req.get('host') or ''}{req.get('path') or ''}"
    parts = [
        _printable(record.get("ts")),
        _printable(record.get("event")),
        f"user={_printable(record.get('user'))}",
        f"provider={_printable(record.get('provider'))}",
    ]
    if req:
        parts.append(f"{_printable(req.get('method'))} {_printable(target)}")
    parts.append(f"outcome={_printable(record.get('outcome'))}")
    if record.get("reason") is not None:
        parts.append(f"reason={_printable(record.get('reason'))}")
    if record.get("upstream_status") is not None:
        parts.append(f"upstream={_printable(record.get('upstream_status'))}")
    return " ".join(parts)
