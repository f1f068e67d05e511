"""The local encrypted vault (proxy/vault/local.py) and vault keys (proxy/vault/keys.py)."""

from __future__ import annotations

import asyncio
import base64
import multiprocessing
import re
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import VaultCorruptError, VaultKeyError, VaultUnavailable
from proxy.secret import Secret
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant, GrantChanged, GrantInfo, GrantStatus
from proxy.vault.keys import derive_subkey, generate_key, load_key
from proxy.vault.local import LocalVault

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
ACCESS = "ACCESS-TOKEN-5f1c2e9a7b"
REFRESH = "REFRESH-TOKEN-c0ffee1234"


def make_grant(
    user: str = "alice",
    provider: str = "docs",
    *,
    access: str = ACCESS,
    refresh: str | None = REFRESH,
    **kwargs: Any,
) -> Grant:
    tokens = TokenSet(
        access_token=Secret(access),
        refresh_token=Secret(refresh) if refresh else None,
        expires_at=2_000_000_000.0,
        scope="read write",
    )
    return Grant(user=user, provider=provider, tokens=tokens, **kwargs)


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def vault_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "vault.db"


@pytest.fixture
def vault(vault_path: Path) -> LocalVault:
    return LocalVault.open(vault_path, KEY, clock=Clock())


@contextmanager
def raw_db(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain SQLite connection, to tamper with the file as an attacker would."""
    with closing(sqlite3.connect(path)) as conn:
        with conn:
            yield conn


# -- keys --------------------------------------------------------------------------------

_B64 = base64.b64encode(bytes([0xFB, 0xFF] * 16)).decode()  # has '+' and '/'
_B64URL = base64.urlsafe_b64encode(bytes([0xFB, 0xFF] * 16)).decode()  # has '-' and '_'


@pytest.mark.parametrize(
    ("env_value", "expected"),
    [
        pytest.param(_B64, bytes([0xFB, 0xFF] * 16), id="base64"),
        pytest.param(_B64.rstrip("="), bytes([0xFB, 0xFF] * 16), id="base64-unpadded"),
        pytest.param(_B64URL, bytes([0xFB, 0xFF] * 16), id="base64url"),
        pytest.param(_B64URL.rstrip("="), bytes([0xFB, 0xFF] * 16), id="base64url-unpadded"),
        pytest.param(KEY.hex(), KEY, id="hex"),
        pytest.param(KEY.hex().upper(), KEY, id="hex-upper"),
        pytest.param(f"  {KEY.hex()}\n", KEY, id="surrounding-space"),
    ],
)
def test_load_key_from_env(env_value: str, expected: bytes) -> None:
    assert load_key(key_env="VK", key_file=None, environ={"VK": env_value}) == expected


@pytest.mark.parametrize("content", [_B64URL + "\n", KEY.hex() + "\r\n", _B64])
def test_load_key_from_file(tmp_path: Path, content: str) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(content)
    assert len(load_key(key_env=None, key_file=str(key_file), environ={})) == 32


def test_load_key_env_wins_over_file_and_file_is_the_fallback(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(OTHER_KEY.hex())
    assert load_key(key_env="VK", key_file=key_file, environ={"VK": KEY.hex()}) == KEY
    assert load_key(key_env="VK", key_file=key_file, environ={}) == OTHER_KEY


_SHORT = base64.b64encode(bytes(16)).decode()
_LONG = base64.b64encode(bytes(range(48))).decode()


@pytest.mark.parametrize(
    ("environ", "file_content", "match"),
    [
        pytest.param({}, None, "env var VK is not set", id="missing-env"),
        pytest.param({"VK": ""}, None, "env var VK is not set or is empty", id="empty-env"),
        pytest.param({"VK": "  \n"}, None, "env var VK is not set", id="blank-env"),
        pytest.param({"VK": _SHORT}, None, "from env var VK is not 32 bytes", id="16-bytes"),
        pytest.param({"VK": _LONG}, None, "from env var VK is not 32 bytes", id="48-bytes"),
        pytest.param({"VK": KEY.hex()[:-1]}, None, "env var VK is not 32 bytes", id="63-hex"),
        pytest.param({"VK": "not a key!" * 4}, None, "env var VK is not 32", id="garbage"),
        pytest.param({"VK": _B64[:-2] + "é"}, None, "env var VK is not 32", id="non-ascii"),
        pytest.param({}, "", r"from file .*key is empty", id="empty-file"),
        pytest.param({}, _SHORT + "\n", r"from file .*key is not 32 bytes", id="short-file"),
    ],
)
def test_load_key_errors(
    tmp_path: Path, environ: dict[str, str], file_content: str | None, match: str
) -> None:
    key_file = None
    if file_content is not None:
        key_file = tmp_path / "key"
        key_file.write_text(file_content)
    key_env = None if file_content is not None else "VK"
    with pytest.raises(VaultKeyError, match=match) as caught:
        load_key(key_env=key_env, key_file=key_file, environ=environ)
    for value in environ.values():
        if value.strip():
            assert value.strip() not in str(caught.value)
    assert caught.value.__cause__ is None


@pytest.mark.parametrize(
    ("key_env", "key_file", "match"),
    [
        (None, None, "no vault key configured"),
        (None, "/nonexistent/credproxy.key", "cannot read vault key file /nonexistent"),
    ],
)
def test_load_key_nothing_usable(key_env: str | None, key_file: str | None, match: str) -> None:
    with pytest.raises(VaultKeyError, match=match):
        load_key(key_env=key_env, key_file=key_file, environ={})


def test_generate_key_round_trips_and_is_random() -> None:
    first, second = generate_key(), generate_key()
    assert first != second
    assert len(load_key(key_env="VK", key_file=None, environ={"VK": first})) == 32


def test_derive_subkey_is_deterministic_and_separates_purposes() -> None:
    audit = derive_subkey(KEY, "audit/fingerprint")
    assert len(audit) == 32
    assert audit == derive_subkey(KEY, "audit/fingerprint")
    assert audit != derive_subkey(KEY, "vault/local/records")
    assert audit != derive_subkey(OTHER_KEY, "audit/fingerprint")
    assert audit != KEY
    with pytest.raises(VaultKeyError, match="32 bytes"):
        derive_subkey(b"short", "audit")


# -- round trip ----------------------------------------------------------------------------


async def test_round_trip(vault: LocalVault) -> None:
    assert await vault.get("alice", "docs") is None
    stored = await vault.put(make_grant())
    assert stored.version == 1_000_000  # a new grant's version is the clock in milliseconds
    assert stored.updated_at == 1_000.0
    assert await vault.get("alice", "docs") == stored

    await vault.put(make_grant("alice", "mail", refresh=None))
    await vault.put(make_grant("bob", "docs"))
    listed = await vault.list()
    assert [(i.user, i.provider) for i in listed] == [
        ("alice", "docs"),
        ("alice", "mail"),
        ("bob", "docs"),
    ]
    assert listed[0] == GrantInfo(
        user="alice",
        provider="docs",
        status=GrantStatus.ACTIVE,
        reason=None,
        scope="read write",
        expires_at=2_000_000_000.0,
        has_refresh_token=True,
        updated_at=1_000.0,
        version=1_000_000,
    )
    assert listed[1].has_refresh_token is False
    assert [i.provider for i in await vault.list("alice")] == ["docs", "mail"]
    assert await vault.list("nobody") == []

    marked = await vault.mark_reauth("alice", "docs", "revoked_upstream")
    assert marked is not None
    assert (marked.status, marked.reason, marked.version) == (
        GrantStatus.REAUTH_REQUIRED,
        "revoked_upstream",
        1_000_001,
    )
    assert marked.tokens == stored.tokens
    assert await vault.get("alice", "docs") == marked
    assert await vault.mark_reauth("alice", "nothing", "x") is None

    assert await vault.delete("alice", "docs") is True
    assert await vault.delete("alice", "docs") is False
    assert await vault.get("alice", "docs") is None
    await vault.check()
    await vault.close()


async def test_put_bumps_version_and_stamps_time_from_the_clock(vault_path: Path) -> None:
    clock = Clock(1_000)
    vault = LocalVault.open(vault_path, KEY, clock=clock)
    first = 1_001_500  # a new grant starts at the clock in milliseconds, then counts up
    for expected in range(first, first + 3):
        clock.now += 1.5
        stored = await vault.put(make_grant(version=99, updated_at=5.0))  # both ignored
        assert (stored.version, stored.updated_at) == (expected, clock.now)
    clock.now = 2_000  # an int from the clock is stored as a float and still authenticates
    marked = await vault.mark_reauth("alice", "docs", "invalid_grant")
    assert marked is not None and (marked.version, marked.updated_at) == (first + 3, 2000.0)
    again = await vault.put(make_grant())
    assert (again.version, again.status, again.reason) == (first + 4, GrantStatus.ACTIVE, None)
    assert await vault.get("alice", "docs") == again
    # Deleted and reconnected: the version does not start again below the revoked one.
    assert await vault.delete("alice", "docs")
    clock.now = 2_001
    reconnected = await vault.put(make_grant())
    assert reconnected.version == 2_001_000 > again.version


async def test_conditional_put_refuses_a_grant_that_changed(vault: LocalVault) -> None:
    base = await vault.put(make_grant())
    # The refresh based on `base` lands: the version matches and the grant is active.
    refreshed = await vault.put(make_grant(access="new"), expected_version=base.version)
    assert refreshed.version == base.version + 1
    # A second write based on the old version (a stale refresh) is refused.
    with pytest.raises(GrantChanged):
        await vault.put(make_grant(access="stale"), expected_version=base.version)
    # Marked for re-auth, or revoked (deleted) meanwhile: refused, nothing written back.
    await vault.mark_reauth("alice", "docs", "invalid_grant")
    marked = await vault.get("alice", "docs")
    assert marked is not None
    with pytest.raises(GrantChanged):
        await vault.put(make_grant(access="late"), expected_version=marked.version)
    assert await vault.delete("alice", "docs")
    with pytest.raises(GrantChanged):
        await vault.put(make_grant(access="late"), expected_version=marked.version)
    assert await vault.get("alice", "docs") is None


async def test_concurrent_puts_in_one_process_lose_nothing(vault: LocalVault) -> None:
    results = await asyncio.gather(*(vault.put(make_grant(access=f"t{i}")) for i in range(30)))
    first = min(g.version for g in results)
    assert sorted(g.version for g in results) == list(range(first, first + 30))
    stored = await vault.get("alice", "docs")
    assert stored is not None and stored.version == first + 29


async def test_reopen_with_the_same_key_reads_everything(vault_path: Path) -> None:
    first = LocalVault.open(vault_path, KEY)
    stored = await first.put(make_grant())
    await first.close()
    assert await LocalVault(vault_path, KEY).get("alice", "docs") == stored


# -- keys and files ------------------------------------------------------------------------


async def test_wrong_key_is_refused_at_open(vault: LocalVault, vault_path: Path) -> None:
    await vault.put(make_grant())
    with pytest.raises(VaultKeyError, match=f"vault key does not open {vault_path}$"):
        LocalVault.open(vault_path, OTHER_KEY)


def test_key_of_wrong_length_is_refused(vault_path: Path) -> None:
    with pytest.raises(VaultKeyError, match="must be 32 bytes"):
        LocalVault.open(vault_path, b"x" * 16)


def test_new_file_is_owner_only_in_an_owner_only_directory(vault: LocalVault) -> None:
    assert stat.S_IMODE(vault.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(vault.path.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize("damage", ["missing", "zero-bytes", "empty-sqlite"])
def test_without_create_a_missing_or_empty_vault_is_an_error(tmp_path: Path,
                                                              damage: str) -> None:
    path = tmp_path / "vault.db"
    if damage == "zero-bytes":
        path.touch()
    elif damage == "empty-sqlite":
        sqlite3.connect(path).execute("PRAGMA user_version = 0").connection.close()
    what = "does not exist" if damage == "missing" else "is empty"
    with pytest.raises(VaultUnavailable, match=f"vault file {re.escape(str(path))} {what}"):
        LocalVault.open(path, KEY, create=False)
    assert path.exists() == (damage != "missing")  # nothing created
    if path.exists():
        assert path.stat().st_size == 0 or damage == "empty-sqlite"


def test_without_create_an_existing_vault_opens(vault_path: Path) -> None:
    LocalVault.open(vault_path, KEY)
    LocalVault.open(vault_path, KEY, create=False)


def test_existing_file_permissions_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "vault.db"
    path.touch(mode=0o640)
    path.chmod(0o640)
    LocalVault.open(path, KEY)  # an empty existing file is initialised
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


async def test_file_is_one_rollback_journal_database(vault: LocalVault) -> None:
    await vault.put(make_grant())
    header = vault.path.read_bytes()[:100]
    assert header[18:20] == b"\x01\x01"  # format versions 1 = rollback journal, 2 = WAL
    assert sorted(p.name for p in vault.path.parent.iterdir()) == ["vault.db"]


async def test_token_values_never_reach_the_disk(vault: LocalVault) -> None:
    await vault.put(make_grant())
    await vault.put(make_grant("bob", "mail", access=ACCESS + "-bob", refresh=REFRESH + "-bob"))
    await vault.mark_reauth("alice", "docs", "invalid_grant")
    await vault.delete("bob", "mail")
    await vault.check()
    raw = b"".join(p.read_bytes() for p in vault.path.parent.iterdir())
    assert b"alice" in raw  # the scan does see plaintext columns
    for secret in (ACCESS, REFRESH, "TOKEN"):
        assert secret.encode() not in raw
        assert secret.encode("utf-16-le") not in raw


def test_repr_shows_the_path_and_nothing_else(vault: LocalVault) -> None:
    assert repr(vault) == f"LocalVault({str(vault.path)!r})"


# -- tampering ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offset", [0, 11, 12, 30, -1], ids=["nonce", "nonce-end", "ct", "ct2", "tag"]
)
async def test_corrupted_ciphertext_byte(vault: LocalVault, offset: int) -> None:
    await vault.put(make_grant())
    await vault.put(make_grant("bob"))
    with raw_db(vault.path) as db:
        sealed = bytearray(db.execute("SELECT sealed FROM grants WHERE user='alice'").fetchone()[0])
        sealed[offset] ^= 0x01
        db.execute("UPDATE grants SET sealed = ? WHERE user = 'alice'", (bytes(sealed),))
    assert await vault.get("bob", "docs") is not None  # only the damaged record fails
    with pytest.raises(VaultCorruptError, match="user 'alice' provider 'docs' fails auth") as e:
        await vault.get("alice", "docs")
    assert ACCESS not in str(e.value) and e.value.__context__ is None
    # Listings show the damaged record as corrupt instead of failing as a whole.
    listed = {g.user: g for g in await vault.list()}
    assert listed["alice"].status is GrantStatus.CORRUPT
    assert listed["alice"].reason == "vault_record_corrupt" and listed["alice"].version > 0
    assert listed["bob"].status is GrantStatus.ACTIVE
    assert [g.status for g in await vault.list("alice")] == [GrantStatus.CORRUPT]
    with pytest.raises(VaultCorruptError, match="'alice'"):
        await vault.mark_reauth("alice", "docs", "x")
    assert await vault.delete("alice", "docs")  # a corrupt record can still be deleted
    assert [g.user for g in await vault.list()] == ["bob"]


async def test_truncated_ciphertext(vault: LocalVault) -> None:
    await vault.put(make_grant())
    with raw_db(vault.path) as db:
        db.execute("UPDATE grants SET sealed = x'0102'")
    with pytest.raises(VaultCorruptError, match="fails authentication"):
        await vault.get("alice", "docs")


@pytest.mark.parametrize("target", [("bob", "docs"), ("alice", "mail")], ids=["user", "provider"])
async def test_ciphertext_moved_to_another_row(vault: LocalVault, target: tuple[str, str]) -> None:
    await vault.put(make_grant("alice", "docs", access="alice-docs-token"))
    await vault.put(make_grant(*target, access="other-token"))
    with raw_db(vault.path) as db:
        db.execute(
            "UPDATE grants SET sealed = (SELECT sealed FROM grants"
            " WHERE user = 'alice' AND provider = 'docs') WHERE user = ? AND provider = ?",
            target,
        )
    with pytest.raises(VaultCorruptError, match=f"user '{target[0]}' provider '{target[1]}'"):
        await vault.get(*target)


async def test_whole_row_renamed_to_another_user(vault: LocalVault) -> None:
    await vault.put(make_grant("alice"))
    with raw_db(vault.path) as db:
        db.execute("UPDATE grants SET user = 'mallory'")
    with pytest.raises(VaultCorruptError, match="'mallory'"):
        await vault.get("mallory", "docs")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("status", "active"),
        ("reason", None),
        ("reason", "something else"),
        ("updated_at", 999.0),
        ("version", 1),
    ],
)
async def test_tampered_plaintext_column(vault: LocalVault, column: str, value: object) -> None:
    await vault.put(make_grant())
    await vault.mark_reauth("alice", "docs", "invalid_grant")  # status, reason set; version 2
    with raw_db(vault.path) as db:
        db.execute(f"UPDATE grants SET {column} = ?", (value,))
    with pytest.raises(VaultCorruptError, match="user 'alice' provider 'docs'"):
        await vault.get("alice", "docs")


async def test_tampered_key_check_reads_as_a_wrong_key(vault: LocalVault) -> None:
    with raw_db(vault.path) as db:
        db.execute("UPDATE meta SET value = zeroblob(40) WHERE name = 'keycheck'")
    with pytest.raises(VaultKeyError, match="does not open"):
        LocalVault.open(vault.path, KEY)
    with pytest.raises(VaultKeyError, match="does not open"):
        await vault.check()


@pytest.mark.parametrize(
    "content",
    [b"this is not a database\n" * 200, b"SQLite format 3\x00" + b"\xff" * 4000],
    ids=["text", "bad-header"],
)
def test_file_that_is_not_a_database(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "vault.db"
    path.write_bytes(content)
    with pytest.raises(VaultCorruptError, match="is not a readable SQLite database"):
        LocalVault.open(path, KEY)
    assert path.read_bytes() == content  # not "repaired" or overwritten


def test_sqlite_database_that_is_not_a_vault(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with raw_db(path) as db:
        db.execute("CREATE TABLE notes (body TEXT)")
    with pytest.raises(VaultCorruptError, match="a SQLite database but not a credproxy vault"):
        LocalVault.open(path, KEY)


def test_newer_format_is_refused(vault: LocalVault) -> None:
    with raw_db(vault.path) as db:
        db.execute("PRAGMA user_version = 2")
    with pytest.raises(
        VaultCorruptError, match="has vault format 2; this credproxy reads format 1"
    ):
        LocalVault.open(vault.path, KEY)


async def test_garbage_written_over_an_open_vault(vault: LocalVault) -> None:
    vault.path.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(VaultCorruptError, match="not a readable SQLite database"):
        await vault.check()


# -- unavailable -------------------------------------------------------------------------


def test_path_under_a_regular_file_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(VaultUnavailable, match="cannot create vault file .*blocker/sub/vault.db"):
        LocalVault.open(blocker / "sub" / "vault.db", KEY)


def test_path_that_is_a_directory_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(VaultUnavailable, match="unavailable"):
        LocalVault.open(tmp_path, KEY)


async def test_removed_file_is_unavailable_and_not_recreated(vault: LocalVault) -> None:
    vault.path.unlink()
    with pytest.raises(VaultUnavailable, match="unable to open"):
        await vault.check()
    with pytest.raises(VaultUnavailable):
        await vault.get("alice", "docs")
    assert not vault.path.exists()


async def test_closed_vault_is_unavailable(vault: LocalVault) -> None:
    await vault.close()
    with pytest.raises(VaultUnavailable, match="is closed"):
        await vault.get("alice", "docs")


# -- two processes -------------------------------------------------------------------------

PER_PROCESS = 200


def _writer(path: str, name: str, barrier: Any, results: Any) -> None:
    """Runs in a spawned process: 200 distinct grants, and 200 updates of a shared one."""

    async def main() -> list[int]:
        vault = LocalVault.open(path, KEY)
        barrier.wait(timeout=60)
        versions = []
        for i in range(PER_PROCESS):
            await vault.put(make_grant(f"{name}-{i}", "docs", access=f"{name}-{i}"))
            shared = await vault.put(make_grant("shared", "docs", access=f"{name}-{i}"))
            versions.append(shared.version)
        return versions

    results.put((name, asyncio.run(main())))


def test_two_processes_writing_concurrently_lose_nothing(vault_path: Path) -> None:
    LocalVault.open(vault_path, KEY)  # created once, so both workers race only on writes
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [
        ctx.Process(target=_writer, args=(str(vault_path), name, barrier, results))
        for name in ("p", "q")
    ]
    for worker in workers:
        worker.start()
    versions = dict(results.get(timeout=100) for _ in workers)
    for worker in workers:
        worker.join(timeout=10)
    assert [w.exitcode for w in workers] == [0, 0]
    # Every put of the shared grant got its own version: no two read the same old one.
    first = min(versions["p"] + versions["q"])
    assert sorted(versions["p"] + versions["q"]) == list(range(first, first + 2 * PER_PROCESS))

    listed = asyncio.run(LocalVault.open(vault_path, KEY).list())
    users = {i.user for i in listed}
    assert len(listed) == 2 * PER_PROCESS + 1
    assert users == {f"{n}-{i}" for n in "pq" for i in range(PER_PROCESS)} | {"shared"}
    assert all(i.version > 1_700_000_000_000 for i in listed)  # new grants: the clock in ms
    shared = next(i for i in listed if i.user == "shared")
    assert shared.version == first + 2 * PER_PROCESS - 1
