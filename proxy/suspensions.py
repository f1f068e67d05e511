"""The kill switch: suspensions of a user, a user context (one chat or workflow run) or a
provider, set and lifted by ``credproxy suspend`` / ``credproxy resume``.

A suspension is not a revocation: the grant stays in the vault, unmarked, and ``resume``
restores access without a new consent. While one matches a request (its verified user, its
context id, its provider), the request is refused with 403 ``suspended``
(:class:`proxy.errors.Suspended`) before any token is loaded, refreshed or injected.

Where suspensions live (:class:`SuspensionStore`), decided by the configuration:

- ``coordination.backend: redis``: one Redis hash, ``<key_prefix>suspensions`` (a single
  key, so one slot in a Redis Cluster), field ``<kind>:<value>``, value the JSON of
  :meth:`Suspension.as_dict`. A change is announced on the coordination events channel;
  every replica also re-reads the hash every :data:`RESYNC_EVERY` seconds and whenever its
  subscription is (re)established, so one that missed the message honours it all the same.
  A command that cannot write the hash fails: nothing is ever reported suspended that is
  not stored.
- otherwise (one replica): a JSON file, :func:`file_path` (beside the local vault file,
  or in ``ca_dir`` for Key Vault), written atomically under an exclusive lock; the running
  proxy re-reads it when it changes (checked every :data:`FILE_POLL` seconds).

Every replica holds the active list in memory (:class:`Suspensions`). Until it has read the
store once, it does not know who is suspended, and refuses credentialed requests (503
``credential-store-unavailable``, reason ``suspensions_unknown``): a restart never lifts a
suspension. Once read, a store that becomes unreachable leaves the last list in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

from proxy.errors import CoordinationUnavailable, CredproxyError
from proxy.identity import valid_identifier

log = logging.getLogger("credproxy.suspensions")

Kind = Literal["user", "context", "provider"]
KINDS: tuple[Kind, ...] = get_args(Kind)

RESYNC_EVERY = 1.0  # seconds between two reads of the Redis hash by each replica
FILE_POLL = 0.25  # seconds between two looks at the local file's metadata
MAX_REASON = 300  # characters of the operator's reason (the audit detail's bound)


class SuspensionError(CredproxyError):
    """A suspension that cannot be set or lifted: a bad selector or reason (the message
    says which), or a store that is unreadable."""


@dataclass(frozen=True, slots=True)
class Suspension:
    """One suspension. ``kind``: what ``value`` names (a user id, a context id, a provider
    id); ``since``: unix seconds; ``by``: who set it (``<kind>:<id>`` of
    :class:`proxy.audit.Actor`); ``reason``: the operator's words (audited, never sent to
    the agent)."""

    kind: Kind
    value: str
    since: float
    by: str
    reason: str

    @property
    def key(self) -> str:
        return field_name(self.kind, self.value)

    def since_text(self) -> str:
        """``since`` as RFC 3339 UTC, second resolution."""
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))

    def matches(self, user: str, context_id: str | None, provider: str) -> bool:
        """Whether this suspension stops a request of ``user`` in the user context
        ``context_id`` to ``provider``."""
        if self.kind == "user":
            return self.value == user
        if self.kind == "context":
            return self.value == context_id
        return self.value == provider

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "value": self.value, "since": self.since, "by": self.by,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Suspension:
        """Raises :class:`ValueError` for anything but :meth:`as_dict`'s shape."""
        kind, value, since = data.get("kind"), data.get("value"), data.get("since")
        by, reason = data.get("by"), data.get("reason")
        if kind not in KINDS or not isinstance(value, str) or not isinstance(
                since, int | float) or not isinstance(by, str) or not isinstance(reason, str):
            raise ValueError("not a suspension record")
        return cls(kind, value, float(since), by, reason)


def field_name(kind: str, value: str) -> str:
    return f"{kind}:{value}"


def selector(user: str | None, context_id: str | None, provider: str | None
             ) -> tuple[Kind, str]:
    """The one selector of a suspend/resume command. Raises :class:`SuspensionError`
    unless exactly one is given, non-empty, at most 256 characters, without control
    characters."""
    named: tuple[tuple[Kind, str | None], ...] = (
        ("user", user), ("context", context_id), ("provider", provider))
    given = [(k, v) for k, v in named if v is not None]
    if len(given) != 1:
        raise SuspensionError("give exactly one of --user, --context-id, --provider "
                              f"({'none' if not given else ', '.join(k for k, _ in given)} "
                              "given)")
    kind, value = given[0]
    flag = "--context-id" if kind == "context" else f"--{kind}"
    if not value.strip():
        raise SuspensionError(f"{flag}: empty; name the {kind} to suspend")
    if not valid_identifier(value):
        raise SuspensionError(f"{flag}: must be 1-256 characters without control "
                              "characters or surrounding spaces")
    return kind, value


def check_reason(reason: str | None) -> str:
    """The operator's reason, required: non-empty, at most :data:`MAX_REASON` characters,
    no control characters. Raises :class:`SuspensionError`."""
    if reason is None or not reason.strip():
        raise SuspensionError("--reason is required: say why (it is audited with who "
                              "did it)")
    if len(reason) > MAX_REASON or re.search(r"[\x00-\x1f\x7f]", reason):
        raise SuspensionError(f"--reason: at most {MAX_REASON} characters, no control "
                              "characters")
    return reason.strip()


class Suspensions:
    """The active suspensions this process knows, by kind; :meth:`match` is the
    request-path check (three dictionary lookups)."""

    def __init__(self) -> None:
        self._by: dict[str, Suspension] = {}
        self.loaded = False  # read from the store at least once
        self.synced_at = 0.0  # unix time of the last successful read
        self._listeners: list[Callable[[list[Suspension]], None]] = []

    def on_added(self, listener: Callable[[list[Suspension]], None]) -> None:
        """Call ``listener(added)`` whenever suspensions come into force (the mitmproxy
        addon cuts the exchanges they stop that are still under way)."""
        self._listeners.append(listener)

    def replace(self, items: Iterable[Suspension]) -> tuple[list[Suspension],
                                                              list[Suspension]]:
        """Install the store's list; returns (added, lifted) against the previous one."""
        new = {s.key: s for s in items}
        added = [s for k, s in new.items() if k not in self._by]
        lifted = [s for k, s in self._by.items() if k not in new]
        self._by = new
        self.loaded = True
        self.synced_at = time.time()
        if added:
            for listener in list(self._listeners):
                try:
                    listener(added)
                except Exception:  # a listener's bug must not stop the list's updates
                    log.exception("a suspension listener failed")
        return added, lifted

    def match(self, user: str, context_id: str | None, provider: str
              ) -> Suspension | None:
        """The suspension that stops this request: the user's, else the context's, else
        the provider's; None when none does."""
        by = self._by
        if not by:
            return None
        hit = by.get(field_name("user", user))
        if hit is None and context_id:
            hit = by.get(field_name("context", context_id))
        return hit if hit is not None else by.get(field_name("provider", provider))

    def all(self) -> list[Suspension]:
        return sorted(self._by.values(), key=lambda s: (s.kind, s.value))

    def count(self, kind: Kind) -> int:
        return sum(1 for s in self._by.values() if s.kind == kind)


Changed = Callable[[], Awaitable[None]]


class SuspensionStore(Protocol):
    """Where suspensions are kept (Redis, or a local file)."""

    name: str
    resync_every: float  # how often a replica re-reads it, whatever it was told

    async def load_suspensions(self) -> list[Suspension]:
        """Every active suspension. Raises :class:`CoordinationUnavailable` (Redis) or
        :class:`SuspensionError` (an unreadable file)."""
        ...

    async def add_suspension(self, suspension: Suspension) -> Suspension | None:
        """Store it (replacing one of the same kind and value, which is returned) and tell
        every replica. Raises when it was not stored."""
        ...

    async def lift_suspension(self, kind: Kind, value: str) -> Suspension | None:
        """Remove it and tell every replica; None when there was none."""
        ...

    def on_suspensions(self, callback: Changed) -> None:
        """Call ``callback`` whenever the list may have changed (a message, a
        resubscription)."""
        ...


READER_GRACE = 5.0  # seconds: a proxy that read the file this recently is running

def file_path(vault_backend: str, vault_path: str, ca_dir: str) -> Path:
    """The local store's file: ``<vault.path>.suspensions.json`` beside a local vault, or
    ``<ca_dir>/suspensions.json`` with Key Vault (no local vault file)."""
    if vault_backend == "local":
        return Path(os.path.expanduser(vault_path + ".suspensions.json"))
    return Path(os.path.expanduser(ca_dir)) / "suspensions.json"


class FileSuspensionStore:
    """Suspensions in a JSON file (``{"suspensions": [...]}``, mode 0600), replaced
    atomically (write a temporary file, fsync, rename) under an exclusive ``flock`` on a
    lock file beside it, so two commands at once cannot lose one another's change. A
    missing file is an empty list; an unreadable one raises :class:`SuspensionError`."""

    name = "file"
    resync_every = FILE_POLL

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._cached: list[Suspension] = []
        self._marked = 0.0
        self._callbacks: list[Changed] = []

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _read(self) -> list[Suspension]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise SuspensionError(f"suspensions file {self.path}: {exc.strerror}") from exc
        try:
            data = json.loads(raw)
            return [Suspension.from_dict(d) for d in data["suspensions"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise SuspensionError(f"suspensions file {self.path} is not a suspension list; "
                                  "restore it from a backup or remove it (which lifts every "
                                  "suspension)") from exc

    @property
    def reader_mark(self) -> Path:
        """The file a running proxy touches each time it reads the list (:meth:`mark_read`):
        a command can tell whether any proxy on this host reads this file."""
        return self.path.with_name(self.path.name + ".reader")

    def mark_read(self) -> None:
        """Say a proxy read the list now (at most once a second; a failure is ignored:
        the mark is advice for the command line, never a condition for serving)."""
        now = time.time()
        if now - self._marked < 1.0:
            return
        self._marked = now
        with contextlib.suppress(OSError):
            self.reader_mark.touch(mode=0o600)

    def read_recently(self, within: float) -> bool:
        """Whether a proxy read this file in the last ``within`` seconds."""
        try:
            return time.time() - self.reader_mark.stat().st_mtime <= within
        except OSError:
            return False

    async def load_suspensions(self) -> list[Suspension]:
        stat = self._stat()
        if stat is not None and stat == self._seen:
            return list(self._cached)
        items = self._read()
        self._seen, self._cached = stat, items
        return list(items)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, items: list[Suspension]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = json.dumps({"suspensions": [s.as_dict() for s in items]}, indent=1)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    async def add_suspension(self, suspension: Suspension) -> Suspension | None:
        with self._locked():
            items = self._read()
            old = next((s for s in items if s.key == suspension.key), None)
            self._write([*(s for s in items if s.key != suspension.key), suspension])
        return old

    async def lift_suspension(self, kind: Kind, value: str) -> Suspension | None:
        key = field_name(kind, value)
        with self._locked():
            items = self._read()
            old = next((s for s in items if s.key == key), None)
            if old is not None:
                self._write([s for s in items if s.key != key])
        return old

    def on_suspensions(self, callback: Changed) -> None:
        self._callbacks.append(callback)


class SuspensionSync:
    """Keeps a :class:`Suspensions` equal to its store: a read at start, on every change
    the store announces, and every ``store.resync_every`` seconds whatever it announced.
    ``on_error`` is called for each failed read (the last list stays in force)."""

    def __init__(self, store: SuspensionStore, active: Suspensions,
                 on_error: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.active = active
        self.on_error = on_error
        self._changed = asyncio.Event()
        self._failing = False  # logged once per outage, not at every read
        store.on_suspensions(self._announce)

    async def _announce(self) -> None:
        self._changed.set()

    async def sync(self) -> bool:
        """Read the store once; False (and the last list kept) when it failed."""
        try:
            items = await self.store.load_suspensions()
            if isinstance(self.store, FileSuspensionStore):
                self.store.mark_read()
        except (CoordinationUnavailable, SuspensionError) as exc:
            self.on_error()
            if not self._failing:
                level = logging.WARNING if self.active.loaded else logging.ERROR
                log.log(level, "suspensions could not be read (%s)%s", exc,
                        "; the last list read stays in force" if self.active.loaded else
                        "; credentialed requests are refused until they can be")
            self._failing = True
            return False
        if self._failing:
            log.info("suspensions read again")
        self._failing = False
        added, lifted = self.active.replace(items)
        for s in added:
            log.info("suspension in force: %s %s (since %s, by %s)", s.kind, s.value,
                     s.since_text(), s.by)
        for s in lifted:
            log.info("suspension lifted: %s %s", s.kind, s.value)
        return True

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            self._changed.clear()
            await self.sync()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.store.resync_every)
