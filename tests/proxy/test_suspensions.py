"""The kill switch's core (proxy.suspensions): selectors and reasons as the command takes
them, the active list's matching, and the file store used without Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from proxy.suspensions import (
    FileSuspensionStore,
    Suspension,
    SuspensionError,
    Suspensions,
    check_reason,
    file_path,
    selector,
)


def _s(kind: str, value: str, since: float = 1.0) -> Suspension:
    return Suspension.from_dict({"kind": kind, "value": value, "since": since,
                                 "by": "cli:op@host", "reason": "r"})


@pytest.mark.parametrize(("user", "context", "provider", "want"), [
    ("alice", None, None, ("user", "alice")),
    (None, "run-1", None, ("context", "run-1")),
    (None, None, "docs", ("provider", "docs")),
    ("ü-ser@example.com", None, None, ("user", "ü-ser@example.com")),
])
def test_one_selector_is_taken(user: str | None, context: str | None, provider: str | None,
                               want: tuple[str, str]) -> None:
    assert selector(user, context, provider) == want


@pytest.mark.parametrize(("user", "context", "provider", "message"), [
    (None, None, None, "exactly one of"),
    ("a", "b", None, "exactly one of"),
    ("a", None, "c", "exactly one of"),
    ("a", "b", "c", "exactly one of"),
    ("", None, None, "--user: empty"),
    (" ", None, None, "--user: empty"),
    (None, "", None, "--context-id: empty"),
    (None, None, "", "--provider: empty"),
    ("a\x00b", None, None, "control characters"),
    ("a\nb", None, None, "control characters"),
    ("a\x7fb", None, None, "control characters"),
    (" a", None, None, "surrounding spaces"),
    ("a ", None, None, "surrounding spaces"),
    ("x" * 257, None, None, "1-256"),
])
def test_bad_selectors_are_refused_naming_the_flag(user: str | None, context: str | None,
                                                   provider: str | None, message: str) -> None:
    with pytest.raises(SuspensionError, match=message.replace("(", r"\(")):
        selector(user, context, provider)


@pytest.mark.parametrize(("reason", "message"), [
    (None, "--reason is required"), ("", "--reason is required"),
    ("   ", "--reason is required"), ("x" * 301, "at most 300"),
    ("two\nlines", "control characters"), ("tab\there", "control characters"),
])
def test_bad_reasons_are_refused(reason: str | None, message: str) -> None:
    with pytest.raises(SuspensionError, match=message):
        check_reason(reason)


def test_a_reason_is_kept_trimmed() -> None:
    assert check_reason("  incident 42 ") == "incident 42"


@pytest.mark.parametrize("data", [
    {}, {"kind": "team", "value": "a", "since": 1, "by": "x", "reason": "r"},
    {"kind": "user", "value": 3, "since": 1, "by": "x", "reason": "r"},
    {"kind": "user", "value": "a", "since": "yesterday", "by": "x", "reason": "r"},
    {"kind": "user", "value": "a", "since": 1, "by": None, "reason": "r"},
    {"kind": "user", "value": "a", "since": 1, "by": "x"},
])
def test_a_record_of_another_shape_is_not_a_suspension(data: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Suspension.from_dict(data)


def test_match_names_the_user_then_the_context_then_the_provider() -> None:
    active = Suspensions()
    assert not active.loaded
    added, lifted = active.replace([_s("provider", "docs"), _s("context", "run-1"),
                                    _s("user", "alice")])
    assert active.loaded and len(added) == 3 and lifted == []
    hit = active.match("alice", "run-1", "docs")
    assert hit is not None and hit.kind == "user"
    hit = active.match("bob", "run-1", "docs")
    assert hit is not None and hit.kind == "context"
    hit = active.match("bob", "run-2", "docs")
    assert hit is not None and hit.kind == "provider"
    assert active.match("bob", None, "graph") is None
    # A context id is matched as a context id only: a user named "run-1" is not stopped.
    assert active.match("run-1", None, "graph") is None
    assert [active.count(k) for k in ("user", "context", "provider")] == [1, 1, 1]


def test_replace_reports_changes_and_tells_listeners_of_new_ones() -> None:
    active = Suspensions()
    heard: list[list[str]] = []
    active.on_added(lambda added: heard.append([s.key for s in added]))
    active.on_added(lambda added: 1 / 0)  # a failing listener does not stop the update
    active.replace([_s("user", "a")])
    added, lifted = active.replace([_s("user", "b")])
    assert [s.key for s in added] == ["user:b"] and [s.key for s in lifted] == ["user:a"]
    active.replace([_s("user", "b")])  # nothing new: nobody is told
    assert heard == [["user:a"], ["user:b"]]
    assert active.match("a", None, "p") is None


def test_matches_is_the_same_rule_for_exchanges_under_way() -> None:
    assert _s("user", "a").matches("a", None, "p")
    assert not _s("user", "a").matches("b", "a", "a")
    assert _s("context", "c").matches("x", "c", "p")
    assert not _s("context", "c").matches("c", None, "c")
    assert _s("provider", "p").matches("x", None, "p")


def test_the_file_store_adds_replaces_lifts_and_keeps_its_file_private(
        tmp_path: Path) -> None:
    path = file_path("local", str(tmp_path / "vault.db"), str(tmp_path / "ca"))
    assert path == tmp_path / "vault.db.suspensions.json"
    assert file_path("azure", "-", str(tmp_path / "ca")) == tmp_path / "ca" / "suspensions.json"
    store = FileSuspensionStore(path)

    async def run() -> None:
        assert await store.load_suspensions() == []  # no file: nothing suspended
        assert await store.add_suspension(_s("user", "a", 1.0)) is None
        old = await store.add_suspension(_s("user", "a", 2.0))
        assert old is not None and old.since == 1.0
        await store.add_suspension(_s("provider", "docs"))
        got = await store.load_suspensions()
        assert sorted((s.key, s.since) for s in got) == [("provider:docs", 1.0),
                                                         ("user:a", 2.0)]
        lifted = await store.lift_suspension("user", "a")
        assert lifted is not None and lifted.key == "user:a"
        assert await store.lift_suspension("user", "a") is None
        # Another process (the command) changed the file: the next load sees it.
        other = FileSuspensionStore(path)
        await other.add_suspension(_s("context", "run-9"))
        assert {s.key for s in await store.load_suspensions()} == {"provider:docs",
                                                                    "context:run-9"}

    asyncio.run(run())
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert json.loads(path.read_text())["suspensions"]
    assert not path.with_name(path.name + ".tmp").exists()


@pytest.mark.parametrize("content", ["{not json", "[]", '{"suspensions": [{"kind": "x"}]}',
                                     '{"other": []}'])
def test_an_unreadable_file_is_an_error_never_an_empty_list(tmp_path: Path,
                                                            content: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(content)
    store = FileSuspensionStore(path)
    with pytest.raises(SuspensionError, match="not a suspension list"):
        asyncio.run(store.load_suspensions())
    with pytest.raises(SuspensionError):
        asyncio.run(store.add_suspension(_s("user", "a")))
    assert path.read_text() == content  # nothing written over it

