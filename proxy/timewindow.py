"""Time windows for reading the audit log: ``--since`` / ``--until`` on the command line.

A bound is either an RFC 3339 date-time with its UTC offset (RFC 3339 section 5.6:
``2026-11-24T09:00:00Z``, ``2026-11-24T10:00:00.5+01:00``; ``t``/``z`` and a space for
``T`` allowed; ``-00:00`` read as UTC) or a duration back from now: a whole number and a
unit, ``90s``, ``15m``, ``12h``, ``7d``, ``2w``; ``now`` is accepted too. Refused, with a
message saying what to write instead: a time without an offset (its zone would be a
guess), a date alone, combined durations (``1h30m``: write ``90m``), signs, fractions and
leap seconds.

A window is half-open, ``[since, until)``: a record stamped exactly ``until`` belongs to the
next window, so consecutive windows never count a record twice. A missing bound is open.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

__all__ = ["TimeWindow", "WindowError", "parse_time", "parse_window", "record_time"]

# The audit writer's own form (proxy.audit): fixed width, so such stamps order as strings.
_RECORD_FORMAT: Final = "%Y-%m-%dT%H:%M:%S.%fZ"
_RECORD_STAMP: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z", re.ASCII)

_RFC3339: Final = re.compile(
    r"(?P<date>\d{4}-\d\d-\d\d)[Tt ](?P<time>\d\d:\d\d:\d\d)(?:\.(?P<frac>\d+))?"
    r"(?P<offset>[Zz]|[+-]\d\d:\d\d)?\Z", re.ASCII)
_DATE_ONLY: Final = re.compile(r"\d{4}-\d\d-\d\d\Z", re.ASCII)
_BASIC_FORM: Final = re.compile(r"\d{8}[Tt ]\d{4}", re.ASCII)
_DURATION_LIKE: Final = re.compile(r"[+-]?\d+(\.\d+)?[a-zA-Z]+(\d+(\.\d+)?[a-zA-Z]+)*\Z",
                                   re.ASCII)
_DURATION: Final = re.compile(r"(?P<n>\d{1,9})(?P<unit>[smhdw])\Z", re.ASCII)
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

_FORMS: Final = ("an RFC 3339 time with its offset (2026-11-24T09:00:00Z, "
                 "2026-11-24T10:00:00+01:00) or a duration back from now (90s, 15m, 12h, "
                 "7d, 2w)")


class WindowError(ValueError):
    """A ``--since``/``--until`` value that is not a time; the message names the flag."""


def parse_time(text: str, *, now: datetime, flag: str = "time") -> datetime:
    """The instant ``text`` names, as an aware UTC datetime.

    ``now`` (aware) is what durations count back from. Raises :class:`WindowError` naming
    ``flag`` and the accepted forms.
    """
    value = text.strip()
    if not value:
        raise WindowError(f"{flag}: empty; give {_FORMS}")
    if value.lower() == "now":
        return now.astimezone(UTC)
    m = _DURATION.fullmatch(value)
    if m:
        try:
            return (now - timedelta(seconds=int(m["n"]) * _UNITS[m["unit"]])).astimezone(UTC)
        except OverflowError:
            raise WindowError(f"{flag} {text!r}: reaches before year 1") from None
    m = _RFC3339.fullmatch(value)
    if m is None:
        if _DATE_ONLY.fullmatch(value):
            raise WindowError(f"{flag} {text!r}: a date alone does not say in which zone the "
                              f"day starts; give {value}T00:00:00Z (or your offset)")
        if _BASIC_FORM.match(value):
            raise WindowError(f"{flag} {text!r}: not a time: RFC 3339 writes it with - and "
                              ":, e.g. 2026-11-24T09:00:00Z")
        if _DURATION_LIKE.fullmatch(value):
            raise WindowError(f"{flag} {text!r}: a duration is a whole number and one unit "
                              "of s, m, h, d or w (write 1h30m as 90m)")
        raise WindowError(f"{flag} {text!r}: not a time; give {_FORMS}")
    if m["offset"] is None:
        raise WindowError(f"{flag} {text!r}: no UTC offset, so the zone would be a guess; "
                          f"add Z for UTC or the offset, e.g. {value}Z or {value}+01:00")
    frac = (m["frac"] or "")[:6].ljust(6, "0")
    offset = "+00:00" if m["offset"] in ("Z", "z") else m["offset"]
    try:
        return datetime.fromisoformat(
            f"{m['date']}T{m['time']}.{frac}{offset}").astimezone(UTC)
    except (ValueError, OverflowError) as exc:  # month 13, second 60, offset 24:00...
        raise WindowError(f"{flag} {text!r}: not a valid time ({exc})") from None


def record_time(ts: object) -> datetime | None:
    """A record's ``ts`` as an aware UTC datetime; None if it is not an RFC 3339 time with
    an offset."""
    if not isinstance(ts, str):
        return None
    try:
        return parse_time(ts, now=datetime.now(UTC)) if _RFC3339.fullmatch(ts) else None
    except WindowError:
        return None


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """``[since, until)`` in UTC; ``None`` is an open end."""

    since: datetime | None = None
    until: datetime | None = None
    # The bounds in the writer's own stamp form: a record stamped that way is placed by
    # comparing strings, without parsing it (the reader's hot path).
    since_stamp: str | None = field(init=False, repr=False, compare=False)
    until_stamp: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "since_stamp", _stamp(self.since))
        object.__setattr__(self, "until_stamp", _stamp(self.until))

    @property
    def bounded(self) -> bool:
        return self.since is not None or self.until is not None

    def position(self, ts: object) -> int | None:
        """Where a record stamped ``ts`` lies: ``-1`` before ``since``, ``0`` inside, ``1``
        at or after ``until``; ``None`` when ``ts`` is not a time (see
        :func:`record_time`)."""
        if isinstance(ts, str) and len(ts) == 27 and _RECORD_STAMP.match(ts):
            key = ts
        else:
            when = record_time(ts)
            if when is None:
                return None
            key = when.strftime(_RECORD_FORMAT)
        return self.position_of_stamp(key)

    def position_of_stamp(self, stamp: str) -> int:
        """:meth:`position` for a stamp already known to be in the writer's form."""
        since, until = self.since_stamp, self.until_stamp
        if since is not None and stamp < since:
            return -1
        if until is not None and stamp >= until:
            return 1
        return 0

    def describe(self) -> str:
        """``[2026-11-24T09:00:00Z, 2026-11-25T09:00:00Z)``, ``-`` for an open end."""
        return f"[{_show(self.since)}, {_show(self.until)})"


def _stamp(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(UTC).strftime(_RECORD_FORMAT)


def _show(when: datetime | None) -> str:
    if when is None:
        return "-"
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_window(since: str | None, until: str | None, *,
                 now: datetime | None = None) -> TimeWindow:
    """The window ``--since since --until until`` names, both counted from one ``now``
    (default: the current time). Raises :class:`WindowError` for a bad value or an empty
    window (``since`` not before ``until``)."""
    at = now or datetime.now(UTC)
    start = parse_time(since, now=at, flag="--since") if since is not None else None
    end = parse_time(until, now=at, flag="--until") if until is not None else None
    if start is not None and end is not None and start >= end:
        raise WindowError(f"--since {since!r} is not before --until {until!r}: the window "
                          f"{_show(start)} to {_show(end)} is empty")
    return TimeWindow(start, end)
