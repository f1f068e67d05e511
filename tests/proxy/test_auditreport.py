"""Reading the audit log by time window and user: proxy.timewindow (``--since``/``--until``),
``verify(window=...)`` and proxy.auditreport (``credproxy audit report``)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from proxy.audit import AuditLog, ContextInfo, RequestInfo, StdoutSink, chain_hash, verify
from proxy.auditreport import (
    DISTINCT_CAP,
    OTHER,
    build_report,
    path_prefix,
    to_csv,
    to_json,
    to_table,
)
from proxy.secret import Secret
from proxy.timewindow import TimeWindow, WindowError, parse_time, parse_window

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
T0 = datetime(2026, 11, 24, 0, 0, tzinfo=UTC).timestamp()  # "last Tuesday", midnight UTC


def at(hours: float) -> datetime:
    return datetime.fromtimestamp(T0 + hours * 3600, UTC)


# --- the time parser -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-24T09:00:00Z", datetime(2026, 11, 24, 9, tzinfo=UTC)),
    ("2026-11-24t09:00:00z", datetime(2026, 11, 24, 9, tzinfo=UTC)),
    ("2026-11-24 09:00:00Z", datetime(2026, 11, 24, 9, tzinfo=UTC)),
    ("2026-11-24T10:00:00+01:00", datetime(2026, 11, 24, 9, tzinfo=UTC)),
    ("2026-11-24T04:30:00-04:30", datetime(2026, 11, 24, 9, tzinfo=UTC)),
    ("2026-11-24T09:00:00-00:00", datetime(2026, 11, 24, 9, tzinfo=UTC)),
    ("2026-11-24T09:00:00.5Z", datetime(2026, 11, 24, 9, 0, 0, 500000, tzinfo=UTC)),
    ("2026-11-24T09:00:00.123456789Z", datetime(2026, 11, 24, 9, 0, 0, 123456, tzinfo=UTC)),
    ("  2026-11-24T09:00:00Z ", datetime(2026, 11, 24, 9, tzinfo=UTC)),
    ("90s", NOW - timedelta(seconds=90)),
    ("15m", NOW - timedelta(minutes=15)),
    ("12h", NOW - timedelta(hours=12)),
    ("7d", NOW - timedelta(days=7)),
    ("2w", NOW - timedelta(weeks=2)),
    ("0s", NOW),
    ("now", NOW),
    ("NOW", NOW),
])
def test_parse_time_accepts(text: str, expected: datetime) -> None:
    got = parse_time(text, now=NOW, flag="--since")
    assert got == expected
    assert got.utcoffset() == timedelta(0)


@pytest.mark.parametrize(("text", "says"), [
    ("2026-11-24T09:00:00", "no UTC offset"),          # naive: the zone would be a guess
    ("2026-11-24T09:00", "not a time"),                # seconds are required by RFC 3339
    ("2026-11-24", "a date alone"),
    ("2026-11-24T09:00:00+0100", "not a time"),        # ISO 8601 basic offset, not RFC 3339
    ("2026-11-24T09:00:00+01", "not a time"),
    ("2026-11-24T09:00:00 UTC", "not a time"),
    ("2026-11-24T09:00:00ZZ", "not a time"),
    ("20261124T090000Z", "RFC 3339 writes it with - and :"),
    ("2026-13-01T00:00:00Z", "not a valid time"),
    ("2026-02-30T00:00:00Z", "not a valid time"),
    ("2026-11-24T24:00:00Z", "not a valid time"),
    ("2026-11-24T23:59:60Z", "not a valid time"),      # a leap second
    ("2026-11-24T09:00:00+24:00", "not a valid time"),
    ("0001-01-01T00:00:00+01:00", "not a valid time"),  # before year 1 in UTC
    ("1h30m", "whole number and one unit"),
    ("1.5h", "whole number and one unit"),
    ("-5m", "whole number and one unit"),
    ("+5m", "whole number and one unit"),
    ("5 m", "not a time"),
    ("5y", "whole number and one unit"),
    ("5M", "whole number and one unit"),
    ("1000000000d", "whole number and one unit"),       # more than 9 digits
    ("999999999w", "before year 1"),
    ("yesterday", "not a time"),
    ("m", "not a time"),
    ("", "empty"),
    ("   ", "empty"),
    ("١٢h", "not a time"),                             # non-ASCII digits
])
def test_parse_time_refuses_with_a_message_naming_the_flag(text: str, says: str) -> None:
    with pytest.raises(WindowError) as err:
        parse_time(text, now=NOW, flag="--until")
    assert str(err.value).startswith("--until")
    assert says in str(err.value)


def test_parse_window_counts_both_bounds_from_one_now_and_refuses_an_empty_window() -> None:
    w = parse_window("2d", "1d", now=NOW)
    assert (w.since, w.until) == (NOW - timedelta(days=2), NOW - timedelta(days=1))
    assert parse_window(None, None, now=NOW) == TimeWindow()
    for since, until in [("1d", "2d"), ("1h", "1h"),
                         ("2026-11-24T10:00:00Z", "2026-11-24T11:00:00+02:00")]:
        with pytest.raises(WindowError, match="is not before --until"):
            parse_window(since, until, now=NOW)
    with pytest.raises(WindowError, match="^--since"):
        parse_window("soon", "1d", now=NOW)


@pytest.mark.parametrize(("ts", "place"), [
    ("2026-11-24T08:59:59.999999Z", -1),
    ("2026-11-24T09:00:00.000000Z", 0),   # since is in the window
    ("2026-11-24T16:59:59.999999Z", 0),
    ("2026-11-24T17:00:00.000000Z", 1),   # until is not: [since, until)
    ("2026-11-24T18:00:00.000000Z", 1),
    ("2026-11-24T10:00:00+01:00", 0),     # another writer's form: parsed
    ("2026-11-24T09:59:59+01:00", -1),
    ("2026-11-24T09:00:00", None),        # no offset: cannot be placed
    ("2026-11-24T09:00:00.000000ZX", None),
    ("", None),
    (None, None),
    (1795426806, None),
    ("7d", None),                          # a duration is not a record's time
])
def test_window_places_a_record_half_open(ts: object, place: int | None) -> None:
    w = TimeWindow(datetime(2026, 11, 24, 9, tzinfo=UTC), datetime(2026, 11, 24, 17, tzinfo=UTC))
    assert w.position(ts) == place
    if place is not None:
        assert TimeWindow().position(ts) == 0


# --- records with a controlled clock -------------------------------------------------------


@dataclass
class Log:
    """An audit log writing to memory at times the test sets (hours after T0)."""

    out: io.StringIO
    log: AuditLog
    now: list[float]

    @classmethod
    def new(cls, instance: str = "host-a/0001") -> Log:
        out, now = io.StringIO(), [T0]
        return cls(out, AuditLog(StdoutSink(out), instance=instance, fingerprint_key=b"k" * 32,
                                 clock=lambda: now[0]), now)

    def at(self, hours: float) -> Log:
        self.now[0] = T0 + hours * 3600
        return self

    def request(self, event: str, user: str | None = "alice", provider: str = "github",
                method: str = "GET", host: str = "api.github.com", path: str = "/user",
                ctx: tuple[str, str] | None = ("chat", "c1"), reason: str | None = None,
                mcp: tuple[str, str | None] | None = None) -> None:
        self.log.record(
            event, user=user, provider=provider,
            context=ContextInfo(*ctx) if ctx else None,
            request=RequestInfo("r", method, host, path, mcp_method=mcp[0] if mcp else None,
                                mcp_name=mcp[1] if mcp else None),
            outcome="injected" if event == "credential.injected" else "denied",
            reason=reason, token=Secret("tok-never-logged"), token_source="cache")

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines(keepends=True)


def _rewrite(lines: list[str], index: int, edit: Any, *, rehash: bool = False) -> list[str]:
    rec = json.loads(lines[index])
    edit(rec)
    if rehash:
        rec["hash"] = chain_hash(rec["prev"], {k: v for k, v in rec.items() if k != "hash"})
    return [*lines[:index], json.dumps(rec, separators=(",", ":")) + "\n", *lines[index + 1:]]


def hourly(n: int = 10, instance: str = "host-a/0001") -> list[str]:
    """One injected request per hour, at T0+0h ... T0+(n-1)h."""
    log = Log.new(instance)
    for h in range(n):
        log.at(h).request("credential.injected", path=f"/items/{h}")
    return log.lines()


WINDOW = TimeWindow(at(3), at(7))  # records 3, 4, 5, 6 (indexes)


# --- verify with a window ------------------------------------------------------------------


def test_verify_window_counts_the_records_in_it() -> None:
    r = verify(hourly(), window=WINDOW)
    assert (r.ok, r.records, r.in_window, r.outside_breaks) == (True, 10, 4, 0)
    assert verify(hourly()).in_window is None


def _edit(i: int) -> Any:
    return lambda lines: _rewrite(lines, i, lambda r: r["request"].update(path="/x"))


def _drop(*indexes: int) -> Any:
    return lambda lines: [x for i, x in enumerate(lines) if i not in indexes]


def _bad_ts(i: int) -> Any:
    return lambda lines: _rewrite(lines, i, lambda r: r.update(ts="sometime"), rehash=True)


@pytest.mark.parametrize(("damage", "line", "says"), [
    pytest.param(_edit(3), 4, "edited", id="edit-first-in-window"),
    pytest.param(_edit(6), 7, "edited", id="edit-last-in-window"),
    pytest.param(_drop(4), 5, "records missing", id="delete-inside"),
    pytest.param(_drop(3), 4, "records missing", id="delete-first-in-window"),
    # The records after the window show that its last records went missing.
    pytest.param(_drop(5, 6), 6, "records missing", id="delete-end-of-window"),
    pytest.param(_drop(6, 7, 8), 7, "records missing", id="delete-across-until"),
    pytest.param(_drop(1, 2, 3), 2, "records missing", id="delete-across-since"),
    # An in-window record moved out of it by editing its time still fails its hash.
    pytest.param(lambda ls: _rewrite(ls, 4, lambda r: r.update(ts=r["ts"][:3] + "0" + r["ts"][4:])),
                 5, "edited", id="move-out-by-ts"),
    pytest.param(_bad_ts(4), 5, "cannot tell whether it lies in the window", id="ts-unplaceable"),
    # An edited record's ts cannot be trusted: reported wherever it says it lies.
    pytest.param(_edit(1), 2, "edited", id="edit-before"),
    pytest.param(_edit(8), 9, "edited", id="edit-after"),
    pytest.param(lambda ls: _rewrite(ls, 1, lambda r: r.pop("hash")), 2, "not an audit record",
                 id="not-a-record-before"),
    pytest.param(lambda ls: [*ls[:5], ls[4], *ls[5:]], 6, "repeated", id="duplicate-inside"),
])
def test_verify_window_reports_every_break_that_concerns_it(damage: Any, line: int,
                                                            says: str) -> None:
    r = verify(damage(hourly()), window=WINDOW)
    assert not r.ok
    assert r.first_error is not None
    assert r.first_error.line == line
    assert says in r.first_error.reason


@pytest.mark.parametrize("damage", [
    pytest.param(_drop(1), id="delete-before"),
    pytest.param(_drop(8), id="delete-after-the-first-after"),
    pytest.param(_drop(0, 1), id="chain-starts-mid-way-before-the-window"),
])
def test_verify_window_notes_breaks_outside_it_without_failing(damage: Any) -> None:
    lines = damage(hourly())
    assert not verify(lines).ok
    r = verify(lines, window=WINDOW)
    assert r.ok, r.first_error
    assert r.outside_breaks >= 1 or r.records < 10


def test_verify_window_chain_starting_inside_it_needs_allow_partial() -> None:
    lines = hourly()[4:]  # e.g. kubectl logs --since, cut inside the window
    r = verify(lines, window=WINDOW)
    assert not r.ok and r.first_error is not None
    assert "chain starts at seq 5" in r.first_error.reason
    assert verify(lines, window=WINDOW, allow_partial=True).ok
    assert verify(hourly()[2:], window=WINDOW).ok  # cut before the window: anchored there


def test_verify_window_with_interleaved_instances() -> None:
    a, b = hourly(instance="a/1"), hourly(instance="b/2")
    mixed = [x for pair in zip(a, b, strict=True) for x in pair]
    assert verify(mixed, window=WINDOW).in_window == 8
    broken = [x for x in mixed if x is not b[6]]  # b's last record in the window
    r = verify(broken, window=WINDOW)
    assert not r.ok and r.first_error is not None and r.first_error.instance == "b/2"


# --- the report ----------------------------------------------------------------------------


def day() -> Log:
    """A day of mixed traffic, hour by hour."""
    log = Log.new()
    log.at(1).request("credential.injected", path="/repos/acme/web/issues")
    log.at(2).request("credential.refreshed")
    log.at(2).request("credential.injected", method="POST", path="/repos/acme/web/pulls")
    log.at(3).request("credential.injected", path="/user")
    log.at(3).request("credential.denied", reason="method_not_allowed", method="DELETE",
                      path="/repos/acme/web")
    log.at(4).request("credential.injected", ctx=("workflow", "nightly"), path="/")
    log.at(5).request("reauth.required", reason="grant_revoked")
    log.at(5).request("credential.injected", provider="mcp-docs", host="mcp.example.com",
                      method="POST", path="/mcp", mcp=("tools/call", "search"))
    log.at(6).request("credential.injected", provider="mcp-docs", host="mcp.example.com",
                      method="POST", path="/mcp", mcp=("tools/call", "search"))
    log.at(6).request("credential.injected", provider="mcp-docs", host="mcp.example.com",
                      method="POST", path="/mcp", mcp=("tools/list", None))
    log.at(7).request("request.failed", reason="upstream_unreachable")
    log.at(7).request("identity.rejected", user=None, ctx=None, reason="context_expired")
    log.at(8).request("credential.injected", user="bob", path="/user")
    log.at(9).log.record("connection.revoked", user="alice", provider="github",
                         outcome="revoked", reason="revoked")
    log.at(30).request("credential.injected", path="/late")  # the next day
    return log


def test_report_answers_per_user_provider_and_context() -> None:
    rep = build_report(day().lines(), window=TimeWindow(at(0), at(24)), user="alice")
    doc = json.loads(to_json(rep))
    assert doc["input"] == {"lines": 15, "records": 12, "outside_window": 1,
                            "filtered_out": 2, "not_records": 0, "unreadable": 0,
                            "unreadable_lines": [], "duplicates": 0}
    groups = {(g["provider"], g["context"]["kind"] if g["context"] else None): g
              for g in doc["groups"]}
    assert set(groups) == {("github", "chat"), ("github", "workflow"), ("github", None),
                           ("mcp-docs", "chat")}
    chat = groups["github", "chat"]
    assert chat["user"] == "alice" and chat["context"] == {"kind": "chat", "id": "c1"}
    assert chat["requests"] == 3
    assert chat["methods"] == {"GET": 2, "POST": 1}
    assert chat["paths"] == {"api.github.com/repos/acme/*": 2, "api.github.com/user": 1}
    assert chat["refusals"] == {"method_not_allowed": 1}
    assert chat["reauths"] == {"grant_revoked": 1}
    assert chat["refreshes"] == 1
    assert chat["failures"] == {"upstream_unreachable": 1}
    assert chat["mcp_tools"] == {}
    assert chat["first"] == "2026-11-24T01:00:00.000000Z"
    assert chat["last"] == "2026-11-24T07:00:00.000000Z"
    assert groups["github", "workflow"]["paths"] == {"api.github.com/": 1}
    mcp = groups["mcp-docs", "chat"]
    assert (mcp["requests"], mcp["mcp_tools"]) == (3, {"search": 2})
    assert groups["github", None]["events"] == {"connection.revoked": 1}
    assert groups["github", None]["requests"] == 0


def test_report_without_user_groups_every_user_and_the_unidentified() -> None:
    rep = build_report(day().lines(), window=TimeWindow(at(0), at(24)))
    users = sorted({(g.user or "-") for g in rep.groups.values()})
    assert users == ["-", "alice", "bob"]
    rejected = next(g for g in rep.groups.values() if g.user is None)
    assert rejected.refusals == {"context_expired": 1}
    assert rep.input.records == 14
    assert sum(g.events.get("credential.injected", 0) for g in rep.groups.values()) == 8


def test_report_windows_partition_the_records() -> None:
    lines = day().lines()
    whole = build_report(lines).input.records
    parts = [build_report(lines, window=TimeWindow(at(h), at(h + 6))).input.records
             for h in range(0, 36, 6)]
    assert sum(parts) == whole == 15


@pytest.mark.parametrize("form", ["compact", "spaced", "reordered"])
def test_report_gives_the_same_answer_whatever_the_line_form(form: str) -> None:
    """The fast path (the writer's own form) and the parser agree."""
    lines = day().lines()

    def reform(line: str) -> str:
        rec = json.loads(line)
        if form == "spaced":
            return json.dumps(rec) + "\n"
        if form == "reordered":
            return json.dumps(dict(reversed(rec.items())), separators=(",", ":")) + "\n"
        return line

    window = TimeWindow(at(2), at(8))
    base = to_json(build_report(lines, window=window, user="alice", provider="github"))
    got = to_json(build_report([reform(x) for x in lines], window=window, user="alice",
                               provider="github"))
    assert got == base
    assert json.loads(got)["input"]["records"] == 7


@pytest.mark.parametrize(("junk", "unreadable", "not_records"), [
    ('{"ts":"2026-11-24T05:00:00.000000Z","event":"credential.injected","user":"bob"', 1, 0),
    ('{"ts":"2026-11-24T05:00:00.000000Z","event":"credential.inj', 1, 0),  # torn
    ('{"ts": "2026-11-24T05:00:00Z", "user": "alice"', 1, 0),
    ('{"event":"credential.injected","user":"alice"}', 1, 0),  # no ts
    ('{"ts":"Tuesday","event":"credential.injected","user":"alice"}', 1, 0),
    ('{"ts":"2026-11-24T05:00:00","user":"alice"}', 1, 0),  # naive ts
    ('[1, 2]', 0, 1),
    ('{}', 1, 0),
    ('{"ts":', 1, 0),
    ("2026-11-24 05:00:00 INFO credproxy: listening", 0, 1),
    ("\x1b[31mred", 0, 1),
    ("", 0, 1),      # blank lines are counted too: every line is accounted for
    ("   \t", 0, 1),
])
def test_report_counts_every_line_it_cannot_read(junk: str, unreadable: int,
                                                 not_records: int) -> None:
    lines = day().lines()
    lines.insert(3, junk + "\n")
    rep = build_report(lines, window=TimeWindow(at(0), at(24)), user="alice")
    assert rep.input.unreadable == unreadable
    assert rep.input.not_records == not_records
    assert rep.input.unreadable_lines == ([4] if unreadable else [])
    assert rep.input.records == 12  # the rest is read as before
    c = rep.input
    assert c.lines == c.records + c.outside_window + c.filtered_out + c.not_records + c.unreadable


def test_report_counts_each_tool_call_of_an_mcp_batch() -> None:
    log = Log.new()
    log.at(1).log.record(
        "credential.injected", user="alice", provider="mcp-docs",
        context=ContextInfo("chat", "c1"),
        request=RequestInfo("r", "POST", "mcp.example.com", "/mcp", mcp_method="batch",
                            mcp_calls=(("tools/call", "search"), ("tools/list", None),
                                       ("tools/call", "search"), ("tools/call", "lookup"))),
        outcome="injected")
    (g,) = build_report(log.lines()).groups.values()
    assert g.requests == 1
    assert g.mcp_tools == {"search": 2, "lookup": 1}


def test_report_cannot_be_fooled_by_a_user_name_in_another_field() -> None:
    log = Log.new()
    log.at(1).request("credential.injected", user="mallory", path='/"user":"alice"')
    log.at(1).request("credential.injected", user="mallory", ctx=("chat", '"user":"alice"'))
    log.at(1).request("credential.injected", user="zoë")
    rep = build_report(log.lines(), user="alice")
    assert rep.input.records == 0 and rep.input.filtered_out == 3
    assert build_report(log.lines(), user="zoë").input.records == 1  # non-ASCII: parsed


def test_report_tables_are_capped_with_an_other_bucket() -> None:
    log = Log.new()
    for i in range(DISTINCT_CAP + 50):
        log.at(1).request("credential.injected", path=f"/u{i}/x/y",
                          mcp=("tools/call", f"tool-{i}"))
    (g,) = build_report(log.lines()).groups.values()
    assert len(g.paths) == DISTINCT_CAP + 1 and g.paths[OTHER] == 50
    assert len(g.mcp_tools) == DISTINCT_CAP + 1 and g.mcp_tools[OTHER] == 50
    assert sum(g.paths.values()) == g.requests == DISTINCT_CAP + 50


@pytest.mark.parametrize(("host", "path", "depth", "expected"), [
    ("api.github.com", "/repos/acme/web/issues", 2, "api.github.com/repos/acme/*"),
    ("api.github.com", "/repos/acme", 2, "api.github.com/repos/acme"),
    ("api.github.com", "/repos/acme/", 2, "api.github.com/repos/acme/*"),
    ("api.github.com", "/user", 2, "api.github.com/user"),
    ("api.github.com", "/", 2, "api.github.com/"),
    ("api.github.com", "", 2, "api.github.com/"),
    ("api.github.com", "/repos/acme/web", 1, "api.github.com/repos/*"),
    ("api.github.com", "/repos/acme/web", 3, "api.github.com/repos/acme/web"),
    ("h:8443", "//a//b", 2, "h:8443//a/*"),
    (None, None, 2, "/"),
])
def test_path_prefix(host: object, path: object, depth: int, expected: str) -> None:
    assert path_prefix(host, path, depth) == expected


def test_report_outputs_escape_what_requests_control() -> None:
    log = Log.new()
    log.at(1).request("credential.injected", user="=cmd|' /C calc'!A0",
                      ctx=("chat", "\x1b[2Jwiped"), mcp=("tools/call", "@SUM(1)"))
    rep = build_report(log.lines())
    table = to_table(rep)
    assert "\x1b" not in table and "\\x1b[2Jwiped" in table
    rows = list(csv.reader(io.StringIO(to_csv(rep))))
    assert rows[0] == ["user", "provider", "context_kind", "context_id", "first", "last",
                       "measure", "key", "count"]
    assert {r[0] for r in rows[1:]} == {"'=cmd|' /C calc'!A0"}
    assert {r[8] for r in rows[1:] if r[6] == "mcp_tool"} == {"1"}
    assert {r[7] for r in rows[1:] if r[6] == "mcp_tool"} == {"'@SUM(1)"}
    assert {r[3] for r in rows[1:]} == {"\x1b[2Jwiped"}  # data as is: CSV is for programs
    assert "tok-never-logged" not in table + to_csv(rep) + to_json(rep)


def test_report_csv_has_a_row_per_count() -> None:
    rep = build_report(day().lines(), window=TimeWindow(at(0), at(24)), user="bob")
    rows = list(csv.DictReader(io.StringIO(to_csv(rep))))
    assert {(r["measure"], r["key"], r["count"]) for r in rows} == {
        ("requests", "", "1"), ("refreshes", "", "0"), ("method", "GET", "1"),
        ("path", "api.github.com/user", "1"), ("event", "credential.injected", "1")}
    assert {r["first"] for r in rows} == {"2026-11-24T08:00:00.000000Z"}


def test_report_empty_and_bad_depth() -> None:
    rep = build_report([], window=TimeWindow(at(0), at(1)))
    assert "no records in the window" in to_table(rep)
    assert json.loads(to_json(rep))["groups"] == []
    with pytest.raises(ValueError, match="depth"):
        build_report([], depth=0)


@pytest.mark.parametrize("seqs", [
    pytest.param([1, 2, 3, 4], id="in-order"),
    pytest.param([4, 3, 2, 1], id="newest-first"),
    pytest.param([5, 1, 3, 2, 4, 9, 7, 8, 6], id="shuffled"),
    pytest.param([1, 3, 5, 2, 4], id="gaps-filled"),
])
def test_each_seq_is_new_once_in_any_order(seqs: list[int]) -> None:
    from proxy.auditreport import _SeqSet

    seen = _SeqSet()
    assert [seen.add(s) for s in seqs] == [True] * len(seqs)
    assert [seen.add(s) for s in seqs] == [False] * len(seqs)
    assert seen._starts == [min(seqs)] and seen._ends == [max(seqs)]
