"""A wrapper that keeps secret strings out of reprs, logs and tracebacks."""

from __future__ import annotations

import hmac
from typing import Final

_REDACTED: Final = "<redacted>"


class Secret:
    """An opaque secret value.

    `str()`, `repr()` and f-strings print ``<redacted>``. The raw value comes out only
    through :meth:`reveal`, which callers use at the single place a header or a request
    body is written.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({_REDACTED})"

    def __str__(self) -> str:
        return _REDACTED

    def __format__(self, spec: str) -> str:
        return _REDACTED

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("Secret values cannot be pickled")
