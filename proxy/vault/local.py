"""The local vault: one SQLite file, each token set sealed with AES-256-GCM.

Layout (format 1)::

    PRAGMA application_id = 0x43505654 ("CPVT"), user_version = 1 (the format)
    meta(name PRIMARY KEY, value)        "keycheck": a sealed constant; a wrong key fails here
    grants(user, provider, status, reason, updated_at, version, sealed)

``sealed`` is ``nonce (12 bytes) || AES-GCM(token set as JSON)``. The associated data
binds it to every other column of its row (user, provider, status, reason, updated_at,
version and the format), so editing a plaintext column or moving a ciphertext to another
row makes the record fail authentication. Token values are never written in plaintext.

Concurrency: every operation opens its own connection in a worker thread
(:func:`asyncio.to_thread`), so there is no shared connection state to guard and a failed
operation cannot leave a half-open transaction behind for the next one; opening a SQLite
connection costs microseconds next to the fsyncs of a write. Writes use ``BEGIN
IMMEDIATE`` with a 10 s busy timeout, so concurrent writers (threads or processes) queue
instead of losing updates. The journal mode is DELETE (never WAL) so the vault is a single
file at rest.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.errors import VaultCorruptError, VaultError, VaultKeyError, VaultUnavailable
from proxy.vault.base import (
    Grant,
    GrantChanged,
    GrantInfo,
    GrantStatus,
    corrupt_info,
    grant_from_record,
    grant_record,
    info,
    next_version,
)
from proxy.vault.keys import KEY_BYTES, derive_subkey

__all__ = ["FORMAT", "LocalVault"]

FORMAT: Final = 1
APPLICATION_ID: Final = 0x43505654  # "CPVT" in the SQLite header: `file` names it too
BUSY_TIMEOUT_S: Final = 10.0
_NONCE_BYTES: Final = 12  # 96-bit random nonces: safe far beyond any vault's write count
_SUBKEY_PURPOSE: Final = "vault/local/records"
_KEYCHECK_PLAINTEXT: Final = b"credproxy local vault key check"
_KEYCHECK_AAD: Final = json.dumps(["credproxy-vault-keycheck", FORMAT]).encode()
# Whole statements as literals: no SQL is ever assembled from strings.
_SELECT_ONE: Final = (
    "SELECT user, provider, status, reason, updated_at, version, sealed"
    " FROM grants WHERE user = ? AND provider = ?"
)
_SELECT_ALL: Final = (
    "SELECT user, provider, status, reason, updated_at, version, sealed"
    " FROM grants ORDER BY user, provider"
)
_SELECT_USER: Final = (
    "SELECT user, provider, status, reason, updated_at, version, sealed"
    " FROM grants WHERE user = ? ORDER BY provider"
)
_UPSERT: Final = (
    "INSERT OR REPLACE INTO grants"
    " (user, provider, status, reason, updated_at, version, sealed)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)

# STRICT tables: a tampered column of the wrong type is refused by SQLite itself.
_SCHEMA: Final = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL) STRICT",
    "CREATE TABLE grants ("
    " user TEXT NOT NULL, provider TEXT NOT NULL,"
    " status TEXT NOT NULL, reason TEXT, updated_at REAL NOT NULL, version INTEGER NOT NULL,"
    " sealed BLOB NOT NULL, PRIMARY KEY (user, provider)) STRICT",
)

_T = TypeVar("_T")
_Row = tuple[Any, ...]


class LocalVault:
    """A :class:`proxy.vault.base.Vault` in one encrypted SQLite file.

    Open with ``LocalVault.open(path, key)`` (or the constructor; they are the same). Opening
    is synchronous and blocking: with ``create`` (the default) it creates the file (0600,
    parent directory 0700) if absent and initialises an empty one; it checks the key,
    raising :class:`VaultKeyError` at once if the key does not open this file. Call it at
    start-up, or through :func:`asyncio.to_thread`. Existing files are used as they are;
    their permissions are the operator's business.

    ``create=False`` (how ``credproxy`` opens the configured vault): a missing file, or an
    empty one (0 bytes, or SQLite without a vault in it), raises :class:`VaultUnavailable`
    naming the file: a vault that was deleted or truncated must never come back as an empty
    vault, which would silently drop every user's connections. ``credproxy vault init``
    creates the first one (:func:`proxy.app.init_vault`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        key: bytes,
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = BUSY_TIMEOUT_S,
        create: bool = True,
    ) -> None:
        if len(key) != KEY_BYTES:
            raise VaultKeyError(f"vault key must be {KEY_BYTES} bytes")
        self._path = Path(path).expanduser().absolute()
        # mode=rw: SQLite must never create the file itself (it would use the umask).
        self._uri = self._path.as_uri() + "?mode=rw"
        self._aead = AESGCM(derive_subkey(key, _SUBKEY_PURPOSE))
        self._clock = clock
        # How long an operation may wait for another process's write lock (vault.timeout).
        self._timeout = timeout
        self._closed = False
        if create:
            _create_private_file(self._path)
        elif not self._path.exists():
            raise VaultUnavailable(
                f"vault file {self._path} does not exist. For a first run create it with "
                "`credproxy vault init --config FILE`; if it existed before, restore it from "
                "a backup (an empty vault would drop every user's connections)")
        self._run(partial(self._initialise, create=create))

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        key: bytes,
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = BUSY_TIMEOUT_S,
        create: bool = True,
    ) -> LocalVault:
        """Open the vault at ``path`` with the 32-byte ``key`` (``create``: creating it if
        absent or empty; else that is an error)."""
        return cls(path, key, clock=clock, timeout=timeout, create=create)

    @property
    def path(self) -> Path:
        return self._path

    def __repr__(self) -> str:
        return f"LocalVault({str(self._path)!r})"

    # -- the Vault protocol ------------------------------------------------------------

    async def get(self, user: str, provider: str) -> Grant | None:
        return await self._call(partial(self._get, user=user, provider=provider))

    async def put(self, grant: Grant, *, expected_version: int | None = None) -> Grant:
        """Store ``grant``; returns it with the new version and timestamp."""
        now = float(self._clock())  # read here, not in the thread: test clocks need not lock
        return await self._call(partial(self._put, grant=grant, now=now,
                                        expected_version=expected_version))

    async def mark_reauth(self, user: str, provider: str, reason: str) -> Grant | None:
        now = float(self._clock())
        fn = partial(self._mark_reauth, user=user, provider=provider, reason=reason, now=now)
        return await self._call(fn)

    async def delete(self, user: str, provider: str) -> bool:
        return await self._call(partial(self._delete, user=user, provider=provider))

    async def list(self, user: str | None = None) -> builtins.list[GrantInfo]:
        return await self._call(partial(self._list, user=user))

    async def check(self) -> None:
        """Raise unless the vault can be read (with this key) and written."""
        await self._call(self._check)

    async def ping(self) -> None:
        """A cheap read for readiness (the key check is done at open)."""
        await self.epoch()

    async def epoch(self) -> int:
        """Changes whenever a grant is marked for re-auth, deleted or replaced outside a
        refresh (a reconnect, an import), by any process: other processes sharing this file
        poll it to drop those grants from their caches."""
        return await self._call(self._epoch)

    async def close(self) -> None:
        # Nothing is held open between operations; later calls raise VaultUnavailable.
        # An operation already running in a thread completes (or rolls back) on its own.
        self._closed = True

    # -- blocking work, run in a thread ---------------------------------------------------

    async def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return await asyncio.to_thread(self._run, fn)

    def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise VaultUnavailable(f"vault {self._path} is closed")
        try:
            conn = sqlite3.connect(self._uri, uri=True, timeout=self._timeout,
                                   autocommit=True)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        try:
            # Overwritten and deleted ciphertexts are zeroed, not left in free pages.
            conn.execute("PRAGMA secure_delete = ON")
            return fn(conn)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        finally:
            conn.close()  # also rolls back a transaction an exception left open

    def _initialise(self, conn: sqlite3.Connection, create: bool = True) -> None:
        mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
        if str(mode).lower() != "delete":
            raise VaultUnavailable(f"vault {self._path}: cannot leave journal mode {mode}")
        if not self._is_vault(conn):
            conn.execute("BEGIN IMMEDIATE")
            # Re-check under the write lock: another process may have initialised it.
            if not self._is_vault(conn):
                tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
                app_id = conn.execute("PRAGMA application_id").fetchone()[0]
                if tables or app_id:
                    raise VaultCorruptError(
                        f"{self._path} is a SQLite database but not a credproxy vault"
                    )
                if not create:
                    raise VaultUnavailable(
                        f"vault file {self._path} is empty (truncated, or never "
                        "initialised). If it held grants, restore it from a backup; for a "
                        "first run delete it and run `credproxy vault init --config FILE`")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("INSERT INTO meta VALUES ('keycheck', ?)", (self._keycheck(),))
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {FORMAT}")
            conn.execute("COMMIT")
        self._verify_key(conn)

    def _is_vault(self, conn: sqlite3.Connection) -> bool:
        if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            return False
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != FORMAT:
            raise VaultCorruptError(
                f"{self._path} has vault format {version}; this credproxy reads format {FORMAT}"
            )
        return True

    def _keycheck(self) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, _KEYCHECK_PLAINTEXT, _KEYCHECK_AAD)

    def _verify_key(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM meta WHERE name = 'keycheck'").fetchone()
        if row is None:
            raise VaultCorruptError(f"{self._path} has no key-check record")
        sealed = row[0]
        try:
            nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
            plaintext = self._aead.decrypt(nonce, ciphertext, _KEYCHECK_AAD)
        except (InvalidTag, ValueError, TypeError):
            plaintext = None
        if plaintext != _KEYCHECK_PLAINTEXT:
            raise VaultKeyError(f"vault key does not open {self._path}")

    def _get(self, conn: sqlite3.Connection, *, user: str, provider: str) -> Grant | None:
        row = conn.execute(_SELECT_ONE, (user, provider)).fetchone()
        return None if row is None else self._unseal(row)

    def _put(self, conn: sqlite3.Connection, *, grant: Grant, now: float,
             expected_version: int | None) -> Grant:
        conn.execute("BEGIN IMMEDIATE")  # read-then-write under the lock: no lost versions
        row = conn.execute(
            "SELECT version, status FROM grants WHERE user = ? AND provider = ?",
            (grant.user, grant.provider),
        ).fetchone()
        if expected_version is not None and (
            row is None or row[0] != expected_version or row[1] != GrantStatus.ACTIVE.value
        ):
            conn.execute("ROLLBACK")
            raise GrantChanged(f"{grant.user}/{grant.provider} changed since version "
                               f"{expected_version}")
        stored = replace(
            grant,
            status=GrantStatus(grant.status),
            updated_at=now,
            version=next_version(None if row is None else row[0], now),
        )
        self._write(conn, stored)
        if expected_version is None and row is not None:
            # A grant replaced outside a refresh (a reconnect, perhaps to another tenant;
            # an import): processes sharing the file must drop their cached copy.
            _bump_epoch(conn)
        conn.execute("COMMIT")
        return stored

    def _mark_reauth(
        self, conn: sqlite3.Connection, *, user: str, provider: str, reason: str, now: float
    ) -> Grant | None:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(_SELECT_ONE, (user, provider)).fetchone()
        if row is None:
            return None
        # Re-sealing is required: status, reason and version are in the associated data.
        current = self._unseal(row)
        updated = replace(
            current,
            status=GrantStatus.REAUTH_REQUIRED,
            reason=reason,
            updated_at=now,
            version=current.version + 1,
        )
        self._write(conn, updated)
        _bump_epoch(conn)
        conn.execute("COMMIT")
        return updated

    def _delete(self, conn: sqlite3.Connection, *, user: str, provider: str) -> bool:
        conn.execute("BEGIN IMMEDIATE")
        cursor = conn.execute(
            "DELETE FROM grants WHERE user = ? AND provider = ?", (user, provider)
        )
        if cursor.rowcount > 0:
            _bump_epoch(conn)
        conn.execute("COMMIT")
        return cursor.rowcount > 0

    def _epoch(self, conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT value FROM meta WHERE name = 'epoch'").fetchone()
        return int.from_bytes(row[0], "big") if row else 0

    def _list(self, conn: sqlite3.Connection, *, user: str | None) -> builtins.list[GrantInfo]:
        if user is None:
            rows = conn.execute(_SELECT_ALL)
        else:
            rows = conn.execute(_SELECT_USER, (user,))
        # Decrypting gives scope and expiry, and authenticates every listed record; one
        # that fails is listed as corrupt, so the others stay visible.
        out = []
        for row in rows.fetchall():
            try:
                out.append(info(self._unseal(row)))
            except VaultCorruptError:
                out.append(corrupt_info(row[0], row[1], updated_at=row[4], version=row[5]))
        return out

    def _check(self, conn: sqlite3.Connection) -> None:
        self._verify_key(conn)
        # A real committed write (a fresh seal of the key check) proves locks, journal,
        # and the file itself are writable.
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE meta SET value = ? WHERE name = 'keycheck'", (self._keycheck(),))
        conn.execute("COMMIT")

    # -- sealing ------------------------------------------------------------------------

    def _write(self, conn: sqlite3.Connection, grant: Grant) -> None:
        aad = _record_aad(
            grant.user, grant.provider, grant.status, grant.reason, grant.updated_at, grant.version
        )
        plaintext = json.dumps(grant_record(grant), separators=(",", ":")).encode()
        nonce = os.urandom(_NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, plaintext, aad)
        conn.execute(
            _UPSERT,
            (
                grant.user,
                grant.provider,
                grant.status.value,
                grant.reason,
                grant.updated_at,
                grant.version,
                sealed,
            ),
        )

    def _unseal(self, row: _Row) -> Grant:
        user, provider, status, reason, updated_at, version, sealed = row
        aad = _record_aad(user, provider, status, reason, updated_at, version)
        try:
            plaintext = self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], aad)
        except (InvalidTag, ValueError, TypeError):
            plaintext = None
        grant = None if plaintext is None else _parse(plaintext, user, provider, status, reason)
        if grant is None:
            # Raised outside any `except`, so no decoder error (which could quote the
            # plaintext) is attached as __context__.
            raise VaultCorruptError(
                f"vault record for user {user!r} provider {provider!r} fails authentication "
                "(tampered or corrupted)"
            )
        return replace(grant, updated_at=updated_at, version=version)

    def _translate(self, exc: sqlite3.Error) -> VaultError:
        code = exc.sqlite_errorcode & 0xFF  # the primary code of an extended one
        name = exc.sqlite_errorname
        if code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
            return VaultCorruptError(
                f"{self._path} is not a readable SQLite database ({name}): "
                "not a credproxy vault, or damaged; restore it from a backup"
            )
        # SQLite messages carry codes and names of schema objects, never bound values.
        return VaultUnavailable(f"vault {self._path} unavailable: {exc} ({name})")


def _record_aad(
    user: object,
    provider: object,
    status: object,
    reason: object,
    updated_at: object,
    version: object,
) -> bytes:
    # JSON gives an unambiguous encoding (no field can run into the next); floats use
    # repr, which round-trips exactly through SQLite's REAL.
    fields = ["credproxy-vault-record", FORMAT, user, provider, status, reason, updated_at, version]
    return json.dumps(fields, separators=(",", ":")).encode()


def _parse(
    plaintext: bytes, user: str, provider: str, status: str, reason: str | None
) -> Grant | None:
    try:
        record = json.loads(plaintext)
        if not isinstance(record, dict):
            return None
        return grant_from_record(record, user=user, provider=provider,
                                 status=GrantStatus(status), reason=reason)
    except (ValueError, TypeError):  # includes JSONDecodeError and TokenSetError
        return None


def _create_private_file(path: Path) -> None:
    """Create ``path`` owner-only before SQLite touches it; leave an existing file alone."""
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        try:
            os.fchmod(fd, 0o600)  # exact, whatever the umask
        finally:
            os.close(fd)
    except OSError as exc:
        raise VaultUnavailable(f"cannot create vault file {path}: {exc.strerror}") from exc


def _bump_epoch(conn: sqlite3.Connection) -> None:
    row = conn.execute("SELECT value FROM meta WHERE name = 'epoch'").fetchone()
    value = (int.from_bytes(row[0], "big") if row else 0) + 1
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('epoch', ?)", (value.to_bytes(8, "big"),))
