"""``credproxy audit report``: what each user's agent accessed in a time window, from the
audit log (proxy.audit; README "Audit log"), in one streaming pass.

Records are grouped by user, provider and user context (kind and id: the chat or workflow
the request ran under); administrative records without a context form their own group.
Per group (:class:`Usage`):

* ``requests``: ``credential.injected`` records, the requests that went upstream with the
  user's credential; by ``methods`` and by ``paths``: host plus the first ``depth`` (2)
  path segments, ``/*`` marking a longer path (``api.github.com/repos/acme/*``);
* ``mcp_tools``: of those, MCP ``tools/call`` requests by tool name (each ``tools/call``
  of a batch counted: ``request.mcp.calls``);
* ``first`` / ``last``: the ``ts`` of the group's first and last record, any event;
* ``refusals``: ``credential.denied`` and ``identity.rejected`` by reason;
  ``reauths``: ``reauth.required`` by reason; ``refreshes``: ``credential.refreshed``;
  ``failures``: ``request.failed`` by reason (a request that broke after its injection);
* ``events``: every record by event, administrative ones included (``connection.*``,
  ``user.offboarded``, ``suspension.*``...), so no record goes uncounted.

A request refused by the upstream after its injection (a 401, a scope challenge) is one
request and one refusal or re-auth: both records exist.

Memory is bounded by the number of groups, not the input: each per-group table keeps at
most :data:`DISTINCT_CAP` keys, the rest counted under ``"(other)"``.

Reading: every line is accounted for (:class:`InputCounts`). Lines that are not JSON (log
output interleaved by ``kubectl logs``) are ``not_records``; a line that looks like a
record (starts with ``{``) but cannot be read, or a record without a valid ``ts``, is
``unreadable``, with its line numbers, and makes the report incomplete. Fast path: a line
in the writer's own form (``{"ts":"<27 chars>","event":...``) that lies outside the window,
or that names another user or provider than asked for and ends in ``}``, is counted
without being parsed. The report reads; it does not prove: ``credproxy audit verify``
(same window) checks that the records are complete and unedited.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from proxy.audit import (
    CREDENTIAL_DENIED,
    CREDENTIAL_INJECTED,
    CREDENTIAL_REFRESHED,
    IDENTITY_REJECTED,
    REAUTH_REQUIRED,
    _printable,
)
from proxy.timewindow import TimeWindow

REQUEST_FAILED: Final = "request.failed"
DEFAULT_DEPTH: Final = 2
DISTINCT_CAP: Final = 100
OTHER: Final = "(other)"
NONE: Final = "(none)"
KEEP_LINE_NUMBERS: Final = 20

GroupKey = tuple[str | None, str | None, str | None, str | None]


def _bump(table: dict[str, int], key: str, cap: int = DISTINCT_CAP) -> None:
    if key in table:
        table[key] += 1
    elif len(table) < cap:
        table[key] = 1
    else:
        table[OTHER] = table.get(OTHER, 0) + 1


def path_prefix(host: object, path: object, depth: int = DEFAULT_DEPTH) -> str:
    """``host`` plus the first ``depth`` segments of ``path``; ``/*`` marks that more
    followed. ``("api.github.com", "/repos/acme/x/issues")`` -> ``api.github.com/repos/acme/*``."""
    h = host if isinstance(host, str) else ""
    p = path if isinstance(path, str) else ""
    parts = (p[1:] if p.startswith("/") else p).split("/")
    if not parts[-1] and len(parts) == 1:
        return f"{h}/"
    head = "/".join(parts[:depth])
    return f"{h}/{head}/*" if len(parts) > depth else f"{h}/{head}"


@dataclass(slots=True)
class Usage:
    """One user × provider × context (see the module docstring for each count)."""

    user: str | None
    provider: str | None
    context_kind: str | None
    context_id: str | None
    first: str | None = None
    last: str | None = None
    requests: int = 0
    methods: dict[str, int] = field(default_factory=dict)
    paths: dict[str, int] = field(default_factory=dict)
    mcp_tools: dict[str, int] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)
    reauths: dict[str, int] = field(default_factory=dict)
    refreshes: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        context = (None if self.context_kind is None and self.context_id is None
                   else {"kind": self.context_kind, "id": self.context_id})
        return {"user": self.user, "provider": self.provider, "context": context,
                "first": self.first, "last": self.last, "requests": self.requests,
                "methods": self.methods, "paths": self.paths, "mcp_tools": self.mcp_tools,
                "refusals": self.refusals, "reauths": self.reauths,
                "refreshes": self.refreshes, "failures": self.failures,
                "events": self.events}


@dataclass(slots=True)
class InputCounts:
    """What happened to each line read: ``records`` counted into the report, the others
    ``outside_window``, ``filtered_out`` (another user or provider), ``not_records``
    (blank lines included) or ``unreadable`` (with the first :data:`KEEP_LINE_NUMBERS`
    line numbers)."""

    lines: int = 0
    records: int = 0
    outside_window: int = 0
    filtered_out: int = 0
    not_records: int = 0
    unreadable: int = 0
    unreadable_lines: list[int] = field(default_factory=list)
    duplicates: int = 0  # a record (instance, seq) already counted: an overlapping input

    def as_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "records": self.records,
                "outside_window": self.outside_window, "filtered_out": self.filtered_out,
                "not_records": self.not_records, "unreadable": self.unreadable,
                "unreadable_lines": self.unreadable_lines, "duplicates": self.duplicates}


class _SeqSet:
    """The seqs seen of one chain, as sorted disjoint ``[first, last]`` runs: for records
    read in order (a log, a rotated set) one run, so memory stays flat in the input."""

    __slots__ = ("_starts", "_ends")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, seq: int) -> bool:
        """Add ``seq``; False when it was already there."""
        starts, ends = self._starts, self._ends
        if ends and seq == ends[-1] + 1:  # the common case: the next record
            ends[-1] = seq
            return True
        i = bisect.bisect_right(starts, seq) - 1
        if i >= 0 and seq <= ends[i]:
            return False
        if i >= 0 and seq == ends[i] + 1:
            ends[i] = seq
            if i + 1 < len(starts) and starts[i + 1] == seq + 1:
                ends[i] = ends.pop(i + 1)
                starts.pop(i + 1)
            return True
        if i + 1 < len(starts) and starts[i + 1] == seq + 1:
            starts[i + 1] = seq
            return True
        starts.insert(i + 1, seq)
        ends.insert(i + 1, seq)
        return True


@dataclass(slots=True)
class Report:
    window: TimeWindow
    user: str | None
    provider: str | None
    depth: int
    input: InputCounts
    groups: dict[GroupKey, Usage]

    def sorted_groups(self) -> list[Usage]:
        return [self.groups[k] for k in sorted(self.groups, key=_sort_key)]

    def as_dict(self) -> dict[str, Any]:
        w = self.window
        return {
            "window": {"since": w.since_stamp, "until": w.until_stamp},
            "filters": {"user": self.user, "provider": self.provider},
            "limits": {"path_depth": self.depth, "distinct_per_group": DISTINCT_CAP},
            "input": self.input.as_dict(),
            "groups": [g.as_dict() for g in self.sorted_groups()],
        }


def _sort_key(key: GroupKey) -> tuple[tuple[bool, str], ...]:
    return tuple((v is not None, v or "") for v in key)


def _needle(name: str, value: str | None) -> str | None:
    """The text a compact ASCII line holds when its top-level ``name`` is ``value``."""
    if value is None or not value.isascii():
        return None
    return f'"{name}":{json.dumps(value)}'


def _add(groups: dict[GroupKey, Usage], rec: dict[str, Any], ts: str, depth: int) -> None:
    ctx = rec.get("context")
    kind = ident = None
    if isinstance(ctx, dict):
        k, i = ctx.get("kind"), ctx.get("id")
        kind = k if isinstance(k, str) else None
        ident = i if isinstance(i, str) else None
    user, provider = rec.get("user"), rec.get("provider")
    key: GroupKey = (user if isinstance(user, str) else None,
                     provider if isinstance(provider, str) else None, kind, ident)
    g = groups.get(key)
    if g is None:
        g = groups[key] = Usage(*key)
    if g.first is None or ts < g.first:
        g.first = ts
    if g.last is None or ts > g.last:
        g.last = ts
    event = rec.get("event")
    event = event if isinstance(event, str) else NONE
    _bump(g.events, event)
    reason = rec.get("reason")
    reason = reason if isinstance(reason, str) else NONE
    if event == CREDENTIAL_INJECTED:
        g.requests += 1
        req = rec.get("request")
        if isinstance(req, dict):
            method = req.get("method")
            _bump(g.methods, method if isinstance(method, str) else NONE)
            _bump(g.paths, path_prefix(req.get("host"), req.get("path"), depth))
            mcp = req.get("mcp")
            if isinstance(mcp, dict):
                calls = mcp.get("calls") if mcp.get("method") == "batch" else [mcp]
                for call in calls if isinstance(calls, list) else ():
                    if isinstance(call, dict) and call.get("method") == "tools/call":
                        name = call.get("name")
                        _bump(g.mcp_tools, name if isinstance(name, str) else NONE)
        else:
            _bump(g.methods, NONE)
    elif event in (CREDENTIAL_DENIED, IDENTITY_REJECTED):
        _bump(g.refusals, reason)
    elif event == REAUTH_REQUIRED:
        _bump(g.reauths, reason)
    elif event == CREDENTIAL_REFRESHED:
        g.refreshes += 1
    elif event == REQUEST_FAILED:
        _bump(g.failures, reason)


class ReportBuilder:
    """:func:`build_report` one line at a time (:meth:`feed`), for a reader that also hands
    each line to something else (``audit report --verify``)."""

    def __init__(self, *, window: TimeWindow | None = None, user: str | None = None,
                 provider: str | None = None, depth: int = DEFAULT_DEPTH) -> None:
        if depth < 1:
            raise ValueError("path depth must be at least 1")
        self.window = window or TimeWindow()
        self.user, self.provider, self.depth = user, provider, depth
        self._bounded = self.window.bounded
        self._user_needle = _needle("user", user)
        self._provider_needle = _needle("provider", provider)
        self.counts = InputCounts()
        self.groups: dict[GroupKey, Usage] = {}
        self._seen: dict[str, _SeqSet] = {}

    def feed(self, raw: str) -> None:
        """Account for the next line (as read, newline included or not)."""
        counts = self.counts
        counts.lines += 1
        # The writer's own form: placed and filtered without parsing.
        if raw.startswith('{"ts":"') and raw[34:45] == '","event":"':
            if self._bounded and self.window.position_of_stamp(raw[7:34]):
                counts.outside_window += 1
                return
            user_needle, provider_needle = self._user_needle, self._provider_needle
            if (((user_needle is not None and user_needle not in raw)
                    or (provider_needle is not None and provider_needle not in raw))
                    and raw.rstrip().endswith("}")):
                counts.filtered_out += 1
                return
        text = raw.strip()
        if not text.startswith("{"):  # blank lines too
            counts.not_records += 1
            return
        try:
            rec = json.loads(text)
        except ValueError:
            rec = None
        ts = rec.get("ts") if isinstance(rec, dict) else None
        where = self.window.position(ts) if isinstance(rec, dict) else None
        if not isinstance(rec, dict) or where is None:
            counts.unreadable += 1
            if len(counts.unreadable_lines) < KEEP_LINE_NUMBERS:
                counts.unreadable_lines.append(counts.lines)
            return
        if where:
            counts.outside_window += 1
            return
        if ((self.user is not None and rec.get("user") != self.user)
                or (self.provider is not None and rec.get("provider") != self.provider)):
            counts.filtered_out += 1
            return
        instance, seq = rec.get("instance"), rec.get("seq")
        if isinstance(instance, str) and isinstance(seq, int) and not isinstance(seq, bool):
            # A record given twice (a file listed twice, overlapping rotated sets, a SIEM
            # export beside the log) is counted once.
            if not self._seen.setdefault(instance, _SeqSet()).add(seq):
                counts.duplicates += 1
                return
        counts.records += 1
        _add(self.groups, rec, ts if isinstance(ts, str) else "", self.depth)

    def report(self) -> Report:
        return Report(self.window, self.user, self.provider, self.depth, self.counts,
                      self.groups)


def build_report(lines: Iterable[str], *, window: TimeWindow | None = None,
                 user: str | None = None, provider: str | None = None,
                 depth: int = DEFAULT_DEPTH) -> Report:
    """Aggregate the audit records in ``lines`` (one per line, as written; any order) that
    lie in ``window`` and match ``user`` / ``provider`` (exactly; None: all). One pass;
    memory bounded by the number of groups. Never raises for bad content (it is counted);
    an ``OSError`` reading ``lines`` propagates. Raises ``ValueError`` for ``depth`` < 1."""
    builder = ReportBuilder(window=window, user=user, provider=provider, depth=depth)
    feed = builder.feed
    for raw in lines:
        feed(raw)
    return builder.report()


# --- output ------------------------------------------------------------------------------


def to_json(report: Report) -> str:
    """The whole report as one JSON document (shape: README "Audit log")."""
    return json.dumps(report.as_dict(), indent=2, ensure_ascii=False)


_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> str:
    """A CSV cell a spreadsheet will not run: text starting like a formula gets a leading
    ``'`` (OWASP CSV injection); null is empty."""
    if value is None:
        return ""
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


CSV_COLUMNS: Final = ("user", "provider", "context_kind", "context_id", "first", "last",
                      "measure", "key", "count")


def _rows(g: Usage) -> Iterator[tuple[str, str, int]]:
    yield "requests", "", g.requests
    yield "refreshes", "", g.refreshes
    for measure, table in (("method", g.methods), ("path", g.paths),
                           ("mcp_tool", g.mcp_tools), ("refusal", g.refusals),
                           ("reauth", g.reauths), ("failure", g.failures),
                           ("event", g.events)):
        for key, count in sorted(table.items()):
            yield measure, key, count


def to_csv(report: Report) -> str:
    """One row per group and count (:data:`CSV_COLUMNS`); ``measure`` is ``requests``,
    ``refreshes``, ``method``, ``path``, ``mcp_tool``, ``refusal``, ``reauth``,
    ``failure`` or ``event``. Reading accounting is not in the CSV: see stderr."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for g in report.sorted_groups():
        head = [_cell(g.user), _cell(g.provider), _cell(g.context_kind),
                _cell(g.context_id), g.first or "", g.last or ""]
        for measure, key, count in _rows(g):
            w.writerow([*head, measure, _cell(key), count])
    return out.getvalue()


def _counts(table: dict[str, int]) -> str:
    items = sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{_printable(k)} {n}" for k, n in items) or "-"


def to_table(report: Report) -> str:
    """For a terminal: a block per group, then what was read."""
    lines = [f"window {report.window.describe()}"
             + (f" user={_printable(report.user)}" if report.user is not None else "")
             + (f" provider={_printable(report.provider)}"
                if report.provider is not None else "")]
    for g in report.sorted_groups():
        ctx = ("-" if g.context_kind is None and g.context_id is None
               else f"{_printable(g.context_kind)}:{_printable(g.context_id)}")
        lines.append("")
        lines.append(f"{_printable(g.user)}  {_printable(g.provider)}  context {ctx}  "
                     f"{g.first} .. {g.last}")
        lines.append(f"  requests {g.requests}: {_counts(g.methods)}")
        if g.paths:
            lines.append(f"  paths: {_counts(g.paths)}")
        if g.mcp_tools:
            lines.append(f"  mcp tools: {_counts(g.mcp_tools)}")
        lines.append(f"  refusals: {_counts(g.refusals)}; re-auths: {_counts(g.reauths)}; "
                     f"refreshes {g.refreshes}; failures: {_counts(g.failures)}")
        lines.append(f"  events: {_counts(g.events)}")
    if not report.groups:
        lines += ["", "no records in the window"]
    lines += ["", describe_input(report)]
    return "\n".join(lines) + "\n"


def describe_input(report: Report) -> str:
    """One line: what was read and what happened to it."""
    c = report.input
    text = (f"read {c.lines} lines: {c.records} records reported, {c.outside_window} "
            f"outside the window, {c.filtered_out} other users/providers, "
            f"{c.not_records} non-record lines, {c.unreadable} unreadable")
    if c.unreadable_lines:
        more = "..." if c.unreadable > len(c.unreadable_lines) else ""
        word = "line" if len(c.unreadable_lines) == 1 else "lines"
        text += f" ({word} {', '.join(map(str, c.unreadable_lines))}{more})"
    if c.duplicates:
        text += (f", {c.duplicates} duplicates counted once (a record, by instance and "
                 "seq, read twice: overlapping inputs)")
    return text
