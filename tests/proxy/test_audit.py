"""Tests for the hash-chained audit log (proxy.audit)."""

from __future__ import annotations

import io
import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.audit import (
    AuditLog,
    ContextInfo,
    FileSink,
    RequestInfo,
    StdoutSink,
    fingerprint,
    format_record,
    matches,
    open_sink,
    parse_lines,
    verify,
)
from proxy.errors import AuditUnavailable
from proxy.secret import Secret

TS = 1795426806.123456  # 2026-11-23T09:40:06.123456Z
KEY = b"k" * 32
TOKEN = "gho_SuperSecretAccessToken1234567890"

KEYS = [
    "ts",
    "event",
    "user",
    "provider",
    "context",
    "request",
    "outcome",
    "reason",
    "detail",
    "upstream_status",
    "token",
    "actor",
    "instance",
    "seq",
    "prev",
    "hash",
]


class FlakyStream(io.StringIO):
    """A stream whose writes raise while ``fail`` is set (like a full disk or broken pipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def write(self, s: str) -> int:
        if self.fail:
            raise OSError(28, "No space left on device")
        return super().write(s)


def make_log(
    stream: io.StringIO | None = None, instance: str = "host-a/0001"
) -> tuple[AuditLog, io.StringIO]:
    out = stream if stream is not None else io.StringIO()
    return AuditLog(StdoutSink(out), instance=instance, fingerprint_key=KEY, clock=lambda: TS), out


def write_n(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.record(
            "credential.injected",
            user=f"user{i}",
            provider="github",
            request=RequestInfo(f"r{i}", "GET", "api.github.com", f"/items/{i}"),
            outcome="allowed",
            token=Secret(TOKEN),
            token_source="cache",
        )


def chain_lines(n: int = 5, instance: str = "host-a/0001") -> list[str]:
    log, out = make_log(instance=instance)
    write_n(log, n)
    return out.getvalue().splitlines()


def rehash(rec: dict[str, Any]) -> str:
    from proxy.audit import chain_hash

    body = {k: v for k, v in rec.items() if k != "hash"}
    return chain_hash(rec["prev"], body)


# --- record shape --------------------------------------------------------------------------


def test_record_has_every_key_in_order_and_rfc3339_utc_ts() -> None:
    log, out = make_log()
    rec = log.record(
        "credential.injected",
        user="alice",
        provider="github",
        context=ContextInfo("session", "s-42"),
        request=RequestInfo("req-1", "GET", "api.github.com", "/user"),
        outcome="allowed",
        upstream_status=200,
        token=Secret(TOKEN),
        token_source="vault",
    )
    assert list(rec) == KEYS
    assert rec["ts"] == "2026-11-23T09:40:06.123456Z"
    assert rec["context"] == {"kind": "session", "id": "s-42"}
    assert rec["request"] == {
        "id": "req-1",
        "method": "GET",
        "host": "api.github.com",
        "path": "/user",
        "mcp": None,
    }
    assert rec["token"] == {"fingerprint": fingerprint(Secret(TOKEN), KEY), "source": "vault"}
    assert (rec["instance"], rec["seq"], rec["prev"]) == ("host-a/0001", 1, None)
    assert len(rec["hash"]) == 64
    # What was written is exactly what was returned.
    assert json.loads(out.getvalue()) == rec


def test_fields_that_do_not_apply_are_null_not_missing() -> None:
    log, out = make_log()
    log.record("user.offboarded", user="bob", outcome="ok")
    written = json.loads(out.getvalue())
    assert list(written) == KEYS
    for key in ("provider", "context", "request", "reason", "upstream_status", "token"):
        assert written[key] is None, key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"event": "", "outcome": "ok"}, "non-empty"),
        ({"event": "x.y", "outcome": ""}, "non-empty"),
        ({"event": "x.y", "outcome": "ok", "token_source": "disk"}, "unknown token source"),
    ],
)
def test_record_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    log, out = make_log()
    event = kwargs.pop("event")
    with pytest.raises(ValueError, match=match):
        log.record(event, **kwargs)
    assert out.getvalue() == ""


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"instance": "", "fingerprint_key": KEY}, "instance"),
        ({"instance": "a/1", "fingerprint_key": b""}, "fingerprint key"),
    ],
)
def test_auditlog_rejects_bad_config(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AuditLog(StdoutSink(io.StringIO()), **kwargs)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/user", "/user"),
        ("/search?q=secret&access_token=abc", "/search"),
        ("/a#frag", "/a"),
        ("/a?x=1#frag", "/a"),
        ("/a#frag?x=1", "/a"),
        ("/?", "/"),
    ],
)
def test_query_and_fragment_are_stripped(path: str, expected: str) -> None:
    log, out = make_log()
    rec = log.record(
        "credential.injected", request=RequestInfo(None, "GET", "h", path), outcome="x"
    )
    assert rec["request"]["path"] == expected
    assert "secret" not in out.getvalue() and "access_token" not in out.getvalue()


def test_secret_never_reaches_the_output() -> None:
    log, out = make_log()
    log.record("credential.refreshed", outcome="ok", token=Secret(TOKEN), token_source="refresh")
    text = out.getvalue()
    assert TOKEN not in text
    assert "redacted" not in text  # the fingerprint is written, not str(Secret)
    assert json.loads(text)["token"]["fingerprint"] == log.fingerprint(Secret(TOKEN))


def test_undecodable_path_does_not_break_the_record() -> None:
    # mitmproxy decodes odd bytes with surrogateescape; the audit must still write.
    log, out = make_log()
    log.record("credential.denied", request=RequestInfo(None, "GET", "h", "/\udcff"), outcome="x")
    assert verify(out.getvalue().splitlines()).ok


# --- fingerprint ---------------------------------------------------------------------------


def test_fingerprint_is_stable_keyed_and_not_the_token() -> None:
    fp = fingerprint(Secret(TOKEN), KEY)
    assert fp == fingerprint(Secret(TOKEN), KEY)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fp != fingerprint(Secret(TOKEN), b"another-key")
    assert fp != fingerprint(Secret(TOKEN + "x"), KEY)
    assert fp not in TOKEN and TOKEN not in fp


# --- chain verification --------------------------------------------------------------------


def test_chain_links_and_verifies() -> None:
    lines = chain_lines(5)
    recs = [json.loads(line) for line in lines]
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs[0]["prev"] is None
    assert all(b["prev"] == a["hash"] for a, b in zip(recs, recs[1:], strict=False))
    report = verify(lines)
    assert (report.ok, report.records, report.instances, report.first_error) == (
        True,
        5,
        1,
        None,
    )


def _edit_field(lines: list[str]) -> list[str]:
    rec = json.loads(lines[2])
    rec["user"] = "mallory"
    lines[2] = json.dumps(rec)
    return lines


def _change_prev(lines: list[str]) -> list[str]:
    rec = json.loads(lines[2])
    rec["prev"] = "0" * 64
    lines[2] = json.dumps(rec)
    return lines


def _change_prev_and_rehash(lines: list[str]) -> list[str]:
    rec = json.loads(lines[2])
    rec["prev"] = "0" * 64
    rec["hash"] = rehash(rec)
    lines[2] = json.dumps(rec)
    return lines


def _edit_and_rehash_only_that_record(lines: list[str]) -> list[str]:
    rec = json.loads(lines[1])
    rec["outcome"] = "denied"
    rec["hash"] = rehash(rec)
    lines[1] = json.dumps(rec)
    return lines


def _drop_hash(lines: list[str]) -> list[str]:
    rec = json.loads(lines[3])
    del rec["hash"]
    lines[3] = json.dumps(rec)
    return lines


# (name, mutate 5 good lines, first broken line number, its seq, reason fragment)
TAMPER_CASES: list[tuple[str, Callable[[list[str]], list[str]], int, int | None, str]] = [
    ("edit a field", _edit_field, 3, 3, "hash does not match"),
    ("delete a middle record", lambda ls: ls[:2] + ls[3:], 3, 4, "records missing"),
    ("swap two records", lambda ls: [ls[0], ls[2], ls[1], ls[3], ls[4]], 2, 3, "out of order"),
    ("duplicate a record", lambda ls: ls[:3] + [ls[2]] + ls[3:], 4, 3, "repeated"),
    ("truncate the first record", lambda ls: ls[1:], 1, 2, "chain starts at seq 2"),
    ("change prev", _change_prev, 3, 3, "hash does not match"),
    ("change prev and rehash", _change_prev_and_rehash, 3, 3, "'prev' does not match"),
    ("edit and rehash one record", _edit_and_rehash_only_that_record, 3, 3, "'prev' does not"),
    ("record without hash", _drop_hash, 4, 4, "missing or bad 'hash'"),
    ("garbage JSON object", lambda ls: ls[:1] + ['{"a": 1}'] + ls[1:], 2, None, "'instance'"),
]


@pytest.mark.parametrize(
    ("mutate", "line", "seq", "reason"),
    [case[1:] for case in TAMPER_CASES],
    ids=[case[0] for case in TAMPER_CASES],
)
def test_tampering_names_the_first_broken_record(
    mutate: Callable[[list[str]], list[str]], line: int, seq: int | None, reason: str
) -> None:
    report = verify(mutate(chain_lines(5)))
    assert not report.ok
    assert report.first_error is not None
    assert (report.first_error.line, report.first_error.seq) == (line, seq)
    assert reason in report.first_error.reason


def test_truncated_log_passes_with_allow_partial_but_edits_still_fail() -> None:
    lines = chain_lines(5)[2:]
    assert verify(lines, allow_partial=True).ok
    assert not verify(lines).ok
    edited = json.loads(lines[0])
    edited["outcome"] = "denied"
    report = verify([json.dumps(edited), *lines[1:]], allow_partial=True)
    assert report.first_error is not None
    assert (report.first_error.line, report.first_error.seq) == (1, 3)


def test_interleaved_instances_verify_and_breaks_are_attributed() -> None:
    a = chain_lines(4, instance="host-a/0001")
    b = chain_lines(4, instance="host-b/0002")
    mixed = [line for pair in zip(a, b, strict=True) for line in pair]
    report = verify(mixed)
    assert (report.ok, report.records, report.instances) == (True, 8, 2)

    del mixed[5]  # b's seq 3
    report = verify(mixed)
    assert report.first_error is not None
    assert report.first_error[:3] == (7, 4, "host-b/0002")


def test_verify_counts_and_skips_non_json_lines() -> None:
    lines = chain_lines(3)
    noisy = ["Defaulted container proxy", lines[0], "", lines[1], "[12:00] log line", lines[2]]
    report = verify(noisy)
    assert (report.ok, report.records, report.skipped_lines) == (True, 3, 2)


def test_verify_after_restart_with_new_instance() -> None:
    assert verify(chain_lines(3, "host-a/0001") + chain_lines(2, "host-a/0002")).ok


# --- sink failures -------------------------------------------------------------------------


def test_sink_failure_raises_and_chain_continues() -> None:
    stream = FlakyStream()
    log, _ = make_log(stream)
    write_n(log, 2)
    stream.fail = True
    with pytest.raises(AuditUnavailable, match="audit log write failed: OSError") as info:
        log.record("credential.injected", outcome="allowed")
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.slug == "audit-unavailable"
    stream.fail = False
    assert log.record("credential.injected", outcome="allowed")["seq"] == 3
    report = verify(stream.getvalue().splitlines())
    assert (report.ok, report.records) == (True, 3)


def test_closed_stream_raises_audit_unavailable() -> None:
    stream = io.StringIO()
    log, _ = make_log(stream)
    stream.close()
    with pytest.raises(AuditUnavailable, match="ValueError"):
        log.record("credential.injected", outcome="allowed")


def test_torn_write_is_isolated_on_its_own_line() -> None:
    class TornStream(io.StringIO):
        tear = False

        def write(self, s: str) -> int:
            if self.tear:
                super().write(s[:20])
                raise OSError(5, "I/O error")
            return super().write(s)

    stream = TornStream()
    log, _ = make_log(stream)
    write_n(log, 1)
    stream.tear = True
    with pytest.raises(AuditUnavailable):
        write_n(log, 1)
    stream.tear = False
    write_n(log, 1)
    report = verify(stream.getvalue().splitlines())
    assert (report.ok, report.records, report.skipped_lines) == (True, 2, 1)


def test_filesink_full_disk_raises_audit_unavailable() -> None:
    log = AuditLog(FileSink("/dev/full"), instance="a/1", fingerprint_key=KEY)
    with pytest.raises(AuditUnavailable, match="OSError") as info:
        log.record("credential.injected", outcome="allowed")
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize("kind", ["fifo", "symlink-to-dev-null", "dev-null"])
def test_filesink_refuses_what_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    """A FIFO put in the audit file's place once blocked the open, and with it the event
    loop, until a reader came; a symlink to /dev/null took every record silently. Only a
    regular file keeps the trail: the write fails closed at once, and recovers when the
    path is a file again."""
    path = tmp_path / "audit.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-to-dev-null":
        path.symlink_to("/dev/null")
    sink = FileSink(path if kind != "dev-null" else Path("/dev/null"))
    log = AuditLog(sink, instance="a/1", fingerprint_key=KEY, clock=lambda: TS)
    with pytest.raises(AuditUnavailable):
        log.record("credential.injected", outcome="allowed")
    assert not log.health().ok
    if kind != "dev-null":
        path.unlink()
        assert log.record("credential.injected", outcome="allowed")["seq"] == 1
        assert verify(path.read_text().splitlines()).ok


def test_filesink_unwritable_location_then_recovers(tmp_path: Path) -> None:
    # A regular file where the directory should be: fails even for root (unlike chmod).
    blocker = tmp_path / "logs"
    blocker.write_text("not a directory")
    path = blocker / "audit.jsonl"
    log = AuditLog(FileSink(path), instance="a/1", fingerprint_key=KEY, clock=lambda: TS)
    with pytest.raises(AuditUnavailable, match="NotADirectoryError"):
        log.record("credential.injected", outcome="allowed")
    blocker.unlink()
    blocker.mkdir()
    assert log.record("credential.injected", outcome="allowed")["seq"] == 1
    assert log.record("credential.injected", outcome="allowed")["seq"] == 2
    assert verify(path.read_text().splitlines()).ok


def test_filesink_descriptor_lost_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = FileSink(path)
    log = AuditLog(sink, instance="a/1", fingerprint_key=KEY)
    write_n(log, 2)
    # Yank the descriptor from under the sink: the next write gets EBADF.
    assert sink._fd is not None
    os.close(sink._fd)
    with pytest.raises(AuditUnavailable, match="OSError"):
        write_n(log, 1)
    write_n(log, 1)  # reopened
    report = verify(path.read_text().splitlines())
    assert (report.ok, report.records) == (True, 3)


def test_closed_filesink_raises_audit_unavailable(tmp_path: Path) -> None:
    log = AuditLog(FileSink(tmp_path / "a.jsonl"), instance="a/1", fingerprint_key=KEY)
    write_n(log, 1)
    log.close()
    with pytest.raises(AuditUnavailable, match="ValueError"):
        write_n(log, 1)


def test_filesink_creates_0600_regardless_of_umask(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    old = os.umask(0)
    try:
        log = AuditLog(FileSink(path), instance="a/1", fingerprint_key=KEY)
        write_n(log, 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    log.close()


def test_filesink_appends_and_starts_on_a_new_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    old = chain_lines(2, instance="old/1")
    # The previous process died mid-line.
    path.write_text("\n".join(old) + '\n{"ts": "2026-11-2')
    log = AuditLog(FileSink(path), instance="new/2", fingerprint_key=KEY)
    write_n(log, 2)
    log.close()
    lines = path.read_text().splitlines()
    assert lines[:2] == old
    report = verify(lines)
    assert (report.ok, report.records, report.instances, report.skipped_lines) == (True, 4, 2, 1)


def test_open_sink(tmp_path: Path) -> None:
    assert isinstance(open_sink("stdout"), StdoutSink)
    sink = open_sink(str(tmp_path / "a.jsonl"))
    assert isinstance(sink, FileSink) and sink.path == str(tmp_path / "a.jsonl")
    sink.close()


def test_stdout_sink_defaults_to_sys_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    log = AuditLog(StdoutSink(), instance="a/1", fingerprint_key=KEY)
    log.record("connection.created", user="alice", provider="github", outcome="ok")
    assert verify(capsys.readouterr().out.splitlines()).ok


def test_concurrent_records_form_one_chain() -> None:
    log, out = make_log()
    threads = [threading.Thread(target=write_n, args=(log, 50)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, 401))
    assert verify(lines).ok


# --- reading -------------------------------------------------------------------------------


def test_parse_lines_reports_junk_without_raising() -> None:
    good = chain_lines(1)[0]
    lines = ["starting proxy", good, "", "{broken", "[1, 2]", "  ", '{"a": 1}']
    got = [(n, rec is not None, err) for n, rec, err in parse_lines(lines)]
    assert [n for n, _, _ in got] == [1, 2, 4, 5, 7]
    assert [ok for _, ok, _ in got] == [False, True, False, False, True]
    assert got[0][2] == "not JSON"
    assert got[2][2] is not None and got[2][2].startswith("not JSON")
    assert got[3][2] == "not JSON"  # arrays and scalars are never records


RECORD = {"event": "credential.injected", "user": "alice", "provider": "github"}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, True),
        ({"user": "alice"}, True),
        ({"user": "bob"}, False),
        ({"provider": "github"}, True),
        ({"provider": "gitlab"}, False),
        ({"event": "credential.injected"}, True),
        ({"event": "credential."}, True),
        ({"event": "credential"}, True),
        ({"event": "cred"}, False),
        ({"event": "credential.denied"}, False),
        ({"event": "identity."}, False),
        ({"user": "alice", "provider": "github", "event": "credential."}, True),
        ({"user": "alice", "provider": "gitlab", "event": "credential."}, False),
    ],
)
def test_matches(filters: dict[str, str], expected: bool) -> None:
    assert matches(RECORD, **filters) is expected


def test_format_record() -> None:
    log, _ = make_log()
    rec = log.record(
        "credential.denied",
        user="alice",
        provider="github",
        request=RequestInfo("r1", "POST", "api.github.com", "/repos/x/issues"),
        outcome="denied",
        reason="provider-not-permitted",
    )
    assert format_record(rec) == (
        "2026-11-23T09:40:06.123456Z credential.denied user=alice provider=github "
        "POST api.github.com/repos/x/issues outcome=denied reason=provider-not-permitted"
    )


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({}, "- - user=- provider=- outcome=-"),
        (
            {"event": "x", "user": "e\x1b[31mvil", "outcome": "ok", "upstream_status": 502},
            "- x user=e\\x1b[31mvil provider=- outcome=ok upstream=502",
        ),
        ({"event": "x", "request": "not-a-dict"}, "- x user=- provider=- outcome=-"),
    ],
)
def test_format_record_is_defensive(record: dict[str, Any], expected: str) -> None:
    assert format_record(record) == expected


# --- rotation: the file sink follows its path -----------------------------------------------


class RecordingEvents:
    def __init__(self) -> None:
        self.reopens: list[str] = []
        self.failures: list[str] = []
        self.lost = 0

    def reopened(self, reason: str) -> None:
        self.reopens.append(reason)

    def failed(self, kind: str) -> None:
        self.failures.append(kind)

    def dropped(self, records: int) -> None:
        self.lost += records


def _rotate_rm(path: Path) -> list[Path]:
    path.unlink()
    return []


def _rotate_mv(path: Path) -> list[Path]:
    old = path.with_name(path.name + ".1")
    path.rename(old)
    return [old]


def _rotate_create(path: Path) -> list[Path]:
    """logrotate `create`: rename, then a new empty file in its place."""
    old = _rotate_mv(path)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    return old


def _rotate_gzip(path: Path) -> list[Path]:
    """logrotate `create` + `compress`: rename, new file, compress the old one."""
    import gzip

    [old] = _rotate_create(path)
    gz = old.with_name(old.name + ".gz")
    gz.write_bytes(gzip.compress(old.read_bytes()))
    old.unlink()
    return [gz]


@pytest.mark.parametrize("rotate", [_rotate_rm, _rotate_mv, _rotate_create, _rotate_gzip],
                         ids=["rm", "mv", "create", "create+compress"])
def test_filesink_follows_its_path_after_rotation(
        tmp_path: Path, rotate: Callable[[Path], list[Path]]) -> None:
    from proxy.audit import LogFiles

    path = tmp_path / "audit.jsonl"
    events = RecordingEvents()
    log = AuditLog(FileSink(path, events=events), instance="a/1", fingerprint_key=KEY)
    write_n(log, 3)
    rotated = rotate(path)
    write_n(log, 2)  # no signal: the identity check alone notices
    log.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().splitlines()) == 2
    assert events.reopens == ["rotated"]
    files = [str(p) for p in rotated] + [str(path)]
    report = verify(LogFiles(files))
    if rotated:
        assert (report.ok, report.records) == (True, 5)
    else:  # rm: the first three records are gone with the file; the rest still chains
        assert verify(LogFiles(files), allow_partial=True).ok
        assert report.first_error is not None and "earlier records missing" in \
            report.first_error.reason


@pytest.mark.parametrize("break_dir", ["replace_with_file", "move_away"])
def test_filesink_fails_closed_when_its_directory_goes_then_recovers(
        tmp_path: Path, break_dir: str) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "audit.jsonl"
    events = RecordingEvents()
    sink = FileSink(path, events=events)
    log = AuditLog(sink, instance="a/1", fingerprint_key=KEY)
    write_n(log, 2)
    if break_dir == "replace_with_file":
        # A file where the directory was: fails even for root (unlike chmod).
        logs.rename(tmp_path / "logs.old")
        logs.write_text("not a directory")
    else:
        logs.rename(tmp_path / "logs.old")
    with pytest.raises(AuditUnavailable, match="audit log write failed") as info:
        write_n(log, 1)
    assert info.value.slug == "audit-unavailable"
    health = log.health()
    assert not health.ok and "cannot open" in health.detail and not health.restart_helps
    assert events.failures == ["open"]
    if logs.is_file():
        logs.unlink()
    logs.mkdir()
    assert log.health().ok  # the readiness probe reopens (creates) the file
    write_n(log, 1)
    log.close()
    assert events.reopens == ["rotated"]
    old = (tmp_path / "logs.old" / "audit.jsonl").read_text().splitlines()
    report = verify(old + path.read_text().splitlines())
    assert (report.ok, report.records) == (True, 3)  # the refused record left no gap


def test_filesink_reopen_on_signal(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    events = RecordingEvents()
    log = AuditLog(FileSink(path, events=events), instance="a/1", fingerprint_key=KEY)
    write_n(log, 1)
    log.reopen()
    assert events.reopens == ["signal"]
    write_n(log, 1)
    assert verify(path.read_text().splitlines()).ok
    (tmp_path / "blocked").write_text("")
    sink = FileSink(tmp_path / "blocked" / "audit.jsonl")
    with pytest.raises(NotADirectoryError):
        sink.reopen()


def test_copytruncate_gap_is_reported(tmp_path: Path) -> None:
    """copytruncate is unsupported: a record written between the copy and the truncate
    is lost, and `audit verify` over the copy and the file names the gap."""
    import shutil

    from proxy.audit import LogFiles

    path = tmp_path / "audit.jsonl"
    log = AuditLog(FileSink(path), instance="a/1", fingerprint_key=KEY)
    write_n(log, 3)
    shutil.copyfile(path, tmp_path / "audit.jsonl.1")
    write_n(log, 1)  # lands in the file after the copy ...
    os.truncate(path, 0)  # ... and is cut away
    write_n(log, 2)
    report = verify(LogFiles([str(tmp_path / "audit.jsonl.1"), str(path)]))
    assert not report.ok and report.first_error is not None
    assert report.first_error.seq == 5
    assert "records missing" in report.first_error.reason


def test_logfiles_reads_gz_in_order_and_locates_lines(tmp_path: Path) -> None:
    import gzip

    from proxy.audit import LogFiles

    lines = chain_lines(5)
    (tmp_path / "a.1.gz").write_bytes(gzip.compress(("\n".join(lines[:2]) + "\n").encode()))
    (tmp_path / "a").write_text("\n".join(lines[2:]) + "\n")
    files = LogFiles([str(tmp_path / "a.1.gz"), str(tmp_path / "a")])
    assert verify(files).ok
    assert files.where(2) == (str(tmp_path / "a.1.gz"), 2)
    assert files.where(3) == (str(tmp_path / "a"), 1)
    # Wrong order: the second file's chain comes first.
    report = verify(LogFiles([str(tmp_path / "a"), str(tmp_path / "a.1.gz")]))
    assert not report.ok


# --- stdout: a real pipe whose reader stalls or dies ------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pipe(size: int = 4096) -> tuple[int, Any]:
    """A real pipe, shrunk to one page so a stalled reader shows after a few records."""
    import fcntl

    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
    return r, os.fdopen(w, "w")


def _record(log: AuditLog, i: int) -> None:
    log.record("credential.injected", user="u", provider="p", outcome="injected",
               request=RequestInfo(f"r{i}", "GET", "api.example", f"/{i}"))


def _in_thread(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Run ``fn``; fail (instead of hanging the suite) if it does not return."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(fn())
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller
            result.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the call blocked"
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


def _drain(r: int) -> bytes:
    os.set_blocking(r, False)
    out = b""
    while True:
        try:
            chunk = os.read(r, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


@pytest.mark.parametrize("bound", ["stall_timeout", "buffer_bytes"])
def test_stdout_stalled_reader_never_blocks_and_fails_closed(bound: str) -> None:
    r, w = _pipe()
    clock, events = FakeClock(), RecordingEvents()
    sink = StdoutSink(w, clock=clock, events=events, stall_timeout=2.0,
                      buffer_bytes=8192 if bound == "buffer_bytes" else 1 << 20)
    log = AuditLog(sink, instance="a/1", fingerprint_key=KEY)
    accepted = 0
    refused: AuditUnavailable | None = None
    # Nobody reads: the pipe fills, then the writer thread blocks in write().
    for i in range(2000):
        try:
            _in_thread(lambda i=i: _record(log, i))
            accepted += 1
        except AuditUnavailable as exc:
            refused = exc
            break
        if accepted > 20 and bound == "stall_timeout":
            clock.now += 3.0  # the blocked write is now older than the stall bound
    assert refused is not None, "a stalled reader never made the sink refuse"
    assert refused.reason == "audit_sink_stalled"
    assert events.failures == (["stalled"] if bound == "stall_timeout" else ["buffer_full"])
    health = sink.health()
    if bound == "stall_timeout":
        assert not health.ok and "stalled" in health.detail and health.restart_helps
    # The reader reads again: every accepted record comes out, in order, chained.
    out = b""
    deadline = threading.Event()
    for _ in range(200):
        out += _drain(r)
        if out.count(b"\n") >= accepted:
            break
        deadline.wait(0.05)
    lines = out.decode().splitlines()
    assert len(lines) == accepted
    assert verify(lines).ok
    assert sink.health().ok
    _in_thread(lambda: _record(log, 9999))  # and new records are accepted again
    sink.close()
    w.close()
    os.close(r)


def test_stdout_dead_reader_fails_closed_and_reports_it() -> None:
    r, w = _pipe()
    events = RecordingEvents()
    sink = StdoutSink(w, events=events)
    log = AuditLog(sink, instance="a/1", fingerprint_key=KEY)
    _record(log, 1)
    assert json.loads(os.read(r, 65536))["seq"] == 1
    os.close(r)  # the reader dies: EPIPE from now on
    for i in range(3):
        with pytest.raises(AuditUnavailable, match="BrokenPipeError") as info:
            _in_thread(lambda i=i: _record(log, i))
        assert info.value.reason == "audit_write_failed"
    health = sink.health()
    assert not health.ok and "EPIPE" in health.detail and health.restart_helps
    assert health.failing_since is not None
    assert events.failures == ["write"] * 3 and events.lost == 0
    sink.close()
    w.close()


def test_stdout_sink_without_a_descriptor_writes_inline() -> None:
    log, out = make_log()
    write_n(log, 2)
    assert len(out.getvalue().splitlines()) == 2  # at once, no writer thread


def test_stdout_records_queued_behind_a_reader_that_dies_are_counted_lost() -> None:
    r, w = _pipe()
    events = RecordingEvents()
    sink = StdoutSink(w, events=events)
    log = AuditLog(sink, instance="a/1", fingerprint_key=KEY)
    for i in range(100):  # ~35 kB: the one-page pipe holds a few; the rest wait in memory
        _in_thread(lambda i=i: _record(log, i))
    os.close(r)  # the reader dies with records still queued
    for _ in range(200):
        if not sink.health().ok:
            break
        threading.Event().wait(0.05)
    assert "EPIPE" in sink.health().detail
    # Those still in the pipe died in the kernel (not ours to count); the rest are counted.
    assert 50 < events.lost < 100
    sink.close()
    w.close()


@pytest.mark.parametrize("content", [None, b"\x1f\x8b\x08\x00truncated", b"not gzip at all"],
                         ids=["missing", "truncated gz", "not gzip"])
def test_audit_verify_names_an_unreadable_file(
        tmp_path: Path, content: bytes | None, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli import main

    good = tmp_path / "audit.jsonl"
    good.write_text("\n".join(chain_lines(2)) + "\n")
    bad = tmp_path / "audit.jsonl.1.gz"
    if content is not None:
        bad.write_bytes(content)
    assert main(["audit", "verify", str(bad), str(good)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"credproxy: audit verify: cannot read {bad}: ")
    assert "Traceback" not in err


def test_audit_verify_over_files_names_the_file_of_the_break(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import gzip

    from proxy.cli import main

    lines = chain_lines(4)
    old, new = tmp_path / "audit.jsonl.1.gz", tmp_path / "audit.jsonl"
    old.write_bytes(gzip.compress(("\n".join(lines[:2]) + "\n").encode()))
    new.write_text("\n".join(lines[2:]) + "\n")
    assert main(["audit", "verify", str(old), str(new)]) == 0
    assert capsys.readouterr().out == "ok: 4 records in 1 chains verified over 2 files\n"
    new.write_text(lines[3] + "\n")  # seq 3 lost
    assert main(["audit", "verify", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"BROKEN: {new} line 1 (instance host-a/0001, seq 4): ")


@pytest.mark.parametrize("keep", [2, 100])
def test_filesink_size_rotation_continues_the_chain_across_files(tmp_path: Path,
                                                                 keep: int) -> None:
    from proxy.audit import LogFiles

    path = tmp_path / "audit.jsonl"
    events = RecordingEvents()
    log = AuditLog(FileSink(path, max_bytes=4096, keep=keep, events=events),
                   instance="a/1", fingerprint_key=KEY)
    write_n(log, 60)
    log.close()
    rotated = sorted((p for p in tmp_path.iterdir() if p != path),
                     key=lambda p: -int(p.name.rsplit(".", 1)[1]))
    files = [str(p) for p in rotated] + [str(path)]
    sizes = [os.path.getsize(f) for f in files]
    assert all(0 < size <= 4096 for size in sizes)
    assert all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in files)
    assert set(events.reopens) == {"size"}
    if keep == 100:  # nothing deleted: one unbroken chain over every file
        assert len(rotated) == len(events.reopens)
        report = verify(LogFiles(files))
        assert (report.ok, report.records) == (True, 60)
    else:  # the oldest files are gone: the rest verifies as a chain cut at its start
        assert [p.name for p in rotated] == ["audit.jsonl.2", "audit.jsonl.1"]
        assert not verify(LogFiles(files)).ok
        assert verify(LogFiles(files), allow_partial=True).ok
