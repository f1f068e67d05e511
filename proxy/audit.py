"""The audit log: one JSON line per credential decision, hash-chained.

Every record has the same keys; a key that does not apply is ``null``, so consumers see
a fixed shape::

    {"ts": "2026-11-23T09:40:06.123456Z", "event": "credential.injected",
     "user": "alice", "provider": "github", "context": {"kind": ..., "id": ...},
     "request": {"id": ..., "method": "GET", "host": "api.github.com", "path": "/user"},
     "outcome": "injected", "reason": null, "upstream_status": null,
     "token": {"fingerprint": "3f9c0a1b2c3d4e5f", "source": "cache"},
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
newest records is invisible. Ship the log off the host to catch those.

Lines are written as compact, ASCII-only JSON (``ensure_ascii=True``): verification
re-derives the canonical form from the parsed values, and an ASCII line cannot fail on a
stdout whose encoding is not UTF-8.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal, NamedTuple, Protocol, TextIO, get_args

from proxy.errors import AuditUnavailable
from proxy.secret import Secret

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
    }
)

_TOKEN_SOURCES: Final = frozenset(get_args(TokenSource))
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

    def __post_init__(self) -> None:
        # Callers should pass a bare path; strip anyway so a slip cannot leak a query.
        object.__setattr__(self, "path", _strip_query(self.path))

    def as_dict(self) -> dict[str, str | None]:
        return {
            "id": _opt(self.id),
            "method": _clean(self.method),
            "host": _clean(self.host),
            "path": _clean(self.path),
        }


@dataclass(frozen=True, slots=True)
class ContextInfo:
    """The user context a request ran under (its kind and id, never the JWS itself)."""

    kind: str
    id: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": _clean(self.kind), "id": _clean(self.id)}


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


class Sink(Protocol):
    """Where records go. ``write`` gets one line without its newline and raises on failure."""

    def write(self, line: str) -> None: ...

    def close(self) -> None: ...


class StdoutSink:
    """Writes each record to a text stream (standard output by default) and flushes it."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._closed = False
        # After a failed write part of a line may already be out; start the next record on
        # a fresh line so it still parses (an empty line is skipped by readers).
        self._needs_newline = False

    def write(self, line: str) -> None:
        if self._closed:
            raise ValueError("audit sink is closed")
        prefix = "\n" if self._needs_newline else ""
        self._needs_newline = True
        self._stream.write(f"{prefix}{line}\n")
        self._stream.flush()
        self._needs_newline = False

    def close(self) -> None:
        """Flush and stop writing; the stream itself is not ours to close."""
        if not self._closed:
            self._closed = True
            self._stream.flush()


class FileSink:
    """Appends records to a file created with mode 0600.

    Writes go straight to the descriptor (``os.write``, no userspace buffer), so a record
    that failed is never flushed later behind the next one, and ``O_APPEND`` keeps
    concurrent writers from overwriting each other. The file is opened on first write and
    reopened after a failed write, so the log recovers once the disk or mount is back.

    ``fsync`` is off by default: a record is in the kernel once ``write`` returns, which
    survives a proxy crash; only a host crash can lose it, and an fsync per proxied request
    would put disk latency on every call. Pass ``fsync=True`` to pay that for durability.
    An existing file keeps its mode.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = os.fspath(path)
        self._fsync = fsync
        self._fd: int | None = None
        self._closed = False
        self._needs_newline = False

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size > 0 and not self._ends_with_newline(size):
                # A previous writer died mid-line; do not glue our first record onto it.
                self._needs_newline = True
        except OSError:
            os.close(fd)
            raise
        return fd

    def _ends_with_newline(self, size: int) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                return f.read(1) in (b"\n", b"")
        except OSError:
            return True  # cannot tell (write-only file); an extra junk line is harmless

    def write(self, line: str) -> None:
        if self._closed:
            raise ValueError("audit sink is closed")
        if self._fd is None:
            self._fd = self._open()
        data = (("\n" if self._needs_newline else "") + line + "\n").encode("utf-8")
        self._needs_newline = True
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self._fsync:
                os.fsync(self._fd)
        except OSError:
            self._drop_fd()
            raise
        self._needs_newline = False

    def _drop_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass  # already broken; the write error is what the caller needs to see

    def close(self) -> None:
        self._closed = True
        self._drop_fd()


def open_sink(spec: str) -> StdoutSink | FileSink:
    """``"stdout"`` writes to standard output; anything else is a file path."""
    if spec == "stdout":
        return StdoutSink()
    return FileSink(spec)


# --- writing -----------------------------------------------------------------------------


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AuditLog:
    """Builds, chains and writes audit records. Safe to share between threads."""

    def __init__(
        self,
        sink: Sink,
        *,
        instance: str,
        fingerprint_key: bytes,
        clock: Callable[[], float] = time.time,
    ) -> None:
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
        upstream_status: int | None = None,
        token: Secret | None = None,
        token_source: TokenSource | None = None,
    ) -> Record:
        """Write one record and return it.

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
        with self._lock:
            # Clock read under the lock so ts never goes backwards against seq.
            rec: Record = {
                "ts": _rfc3339(self._clock()),
                "event": _clean(event),
                "user": _opt(user),
                "provider": _opt(provider),
                "context": context.as_dict() if context is not None else None,
                "request": request.as_dict() if request is not None else None,
                "outcome": _clean(outcome),
                "reason": _opt(reason),
                "upstream_status": upstream_status,
                "token": token_info,
                "instance": self.instance,
                "seq": self._seq + 1,
                "prev": self._prev,
            }
            rec["hash"] = chain_hash(self._prev, rec)
            line = json.dumps(rec, separators=(",", ":"), ensure_ascii=True)
            try:
                self._sink.write(line)
            except Exception as exc:
                # Fail closed on anything (OSError, closed stream, ...): the caller must
                # not inject a credential it could not account for.
                raise AuditUnavailable(
                    f"audit log write failed: {type(exc).__name__}", reason="audit-write-failed"
                ) from exc
            self._seq = rec["seq"]
            self._prev = rec["hash"]
        return rec

    def close(self) -> None:
        with self._lock:
            self._sink.close()


# --- reading -----------------------------------------------------------------------------


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


def verify(lines: Iterable[str], *, allow_partial: bool = False) -> VerifyReport:
    """Check the hash chains in ``lines`` and name the first broken record.

    Records are grouped by ``instance``, so interleaved replicas verify together. Per
    instance: each record's ``hash`` must match its content, ``seq`` must go up by one and
    ``prev`` must be the previous hash. A chain must start at seq 1 unless ``allow_partial``
    (the log was cut, e.g. ``kubectl logs --since``): then each instance's first record
    seen is the anchor. Non-JSON lines are counted and skipped; a JSON object that is not a
    record is an error.
    """
    chains: dict[str, _Chain] = {}
    first_error: VerifyError | None = None
    records = skipped = 0
    for number, rec, _err in parse_lines(lines):
        if rec is None:
            skipped += 1
            continue
        instance = rec.get("instance") if isinstance(rec.get("instance"), str) else None
        seq = rec.get("seq") if isinstance(rec.get("seq"), int) else None
        problem = _check_shape(rec)
        if problem is None:
            records += 1
            body = {k: v for k, v in rec.items() if k != "hash"}
            if chain_hash(rec["prev"], body) != rec["hash"]:
                problem = "hash does not match the record (edited)"
            else:
                problem = _check_link(rec, chains.get(rec["instance"]), allow_partial)
            # Continue from this record either way, so one break is reported once.
            chains[rec["instance"]] = _Chain(seq=rec["seq"], hash=rec["hash"])
        if problem is not None and first_error is None:
            first_error = VerifyError(number, seq, instance, problem)
    return VerifyReport(
        ok=first_error is None,
        records=records,
        instances=len(chains),
        first_error=first_error,
        skipped_lines=skipped,
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
