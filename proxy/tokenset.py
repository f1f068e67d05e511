"""An OAuth token set (RFC 6749 section 5.1) as credproxy stores it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from proxy.secret import Secret


class TokenSetError(ValueError):
    """A token response or stored record does not have the required shape."""


@dataclass(frozen=True, slots=True)
class TokenSet:
    """One user's tokens for one provider. Tokens are :class:`Secret`; they never print."""

    access_token: Secret
    refresh_token: Secret | None = None
    token_type: str = "Bearer"
    expires_at: float | None = None  # unix seconds; None = the provider did not say
    scope: str | None = None
    # When the token set was received from the token endpoint (unix seconds); with
    # expires_at it gives the access token's lifetime, which caps the refresh margin
    # (:meth:`refresh_margin`). None when unknown: imported token sets, and records stored
    # before it was kept.
    issued_at: float | None = None

    @classmethod
    def from_response(cls, data: Mapping[str, Any], *, now: float) -> TokenSet:
        """Build from a token endpoint response (or `vault put` input).

        ``expires_in`` is relative to ``now``; ``expires_at`` is absolute. ``issued_at``
        stays unknown: an imported token set (``vault put``) may have been issued long
        before (its remaining lifetime is not its lifetime). Strict: a malformed field is
        an error (operator input); provider answers are read leniently, with ``issued_at``
        set, by :func:`proxy.dialect.read_token_response`.
        """
        if not isinstance(data, Mapping):
            raise TokenSetError("token set must be a JSON object")
        access = data.get("access_token")
        if not isinstance(access, str) or not access:
            raise TokenSetError("token set has no access_token")
        refresh = data.get("refresh_token")
        if refresh is not None and (not isinstance(refresh, str) or not refresh):
            raise TokenSetError("refresh_token must be a non-empty string")
        token_type = data.get("token_type", "Bearer")
        if not isinstance(token_type, str) or not token_type:
            raise TokenSetError("token_type must be a string")
        expires_at: float | None = None
        if data.get("expires_at") is not None:
            expires_at = _number(data["expires_at"], "expires_at")
        elif data.get("expires_in") is not None:
            expires_at = now + _number(data["expires_in"], "expires_in")
        scope = data.get("scope")
        if scope is not None and not isinstance(scope, str):
            if isinstance(scope, list) and all(isinstance(s, str) for s in scope):
                scope = " ".join(scope)
            else:
                raise TokenSetError("scope must be a string")
        return cls(
            access_token=Secret(access),
            refresh_token=Secret(refresh) if refresh else None,
            token_type=token_type,
            expires_at=expires_at,
            scope=scope,
        )

    def merged_refresh(self, previous: TokenSet) -> TokenSet:
        """RFC 6749 section 6: a refresh response may omit the refresh token; keep the old one."""
        if self.refresh_token is None and previous.refresh_token is not None:
            return replace(self, refresh_token=previous.refresh_token)
        return self

    def expires_within(self, seconds: float, *, now: float) -> bool:
        return self.expires_at is not None and self.expires_at - now <= seconds

    @property
    def lifetime(self) -> float | None:
        """The access token's lifetime as issued (seconds), when both ends are known."""
        if self.expires_at is None or self.issued_at is None:
            return None
        return max(0.0, self.expires_at - self.issued_at)

    def refresh_margin(self, skew: float) -> float:
        """How long before expiry to refresh: ``min(skew, lifetime / 2)``. With 30 s tokens
        and a skew of 60 s a margin of ``skew`` would refresh on every request (each new
        token is already "within 60 s of expiry"); half the lifetime refreshes once per
        lifetime. Unknown lifetime (records stored before ``issued_at`` was kept): ``skew``.
        """
        lifetime = self.lifetime
        return skew if lifetime is None else min(skew, lifetime / 2)

    def needs_refresh(self, skew: float, *, now: float) -> bool:
        """Whether the access token expires within :meth:`refresh_margin`. A token of
        unknown expiry never does: an upstream 401 gets one forced refresh instead
        (:meth:`proxy.tokens.TokenBroker.refresh_rejected`)."""
        return self.expires_within(self.refresh_margin(skew), now=now)

    def to_record(self) -> dict[str, Any]:
        """The plaintext record for encryption at rest. Reveals secrets: vault use only."""
        return {
            "access_token": self.access_token.reveal(),
            "refresh_token": self.refresh_token.reveal() if self.refresh_token else None,
            "token_type": self.token_type,
            "expires_at": self.expires_at,
            "scope": self.scope,
            "issued_at": self.issued_at,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TokenSet:
        tokens = cls.from_response(record, now=0.0)
        issued = record.get("issued_at")
        return replace(tokens, issued_at=None if issued is None else
                       _number(issued, "issued_at"))


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TokenSetError(f"{name} must be a number")
    try:
        number = float(value)
    except (ValueError, OverflowError) as exc:
        raise TokenSetError(f"{name} must be a number") from exc
    if not math.isfinite(number) or number < 0:
        raise TokenSetError(f"{name} must be a non-negative number")
    return number
