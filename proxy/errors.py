"""Every failure a user of credproxy can see, one class each.

Each class carries its RFC 9457 problem slug and HTTP status, so the addon maps any
failure to a problem response in one place (:func:`proxy.problems.problem_response`)::

    CredproxyError
    ├── ProxyRefusal                      answered to the agent as a problem
    │   ├── MalformedRequest              400 malformed-request
    │   │   └── ExpectationFailed         417 expectation-failed
    │   ├── UserContextMissing            407 user-context-missing
    │   ├── UserContextInvalid            407 user-context-invalid
    │   ├── MisdirectedRequest            421 misdirected-request
    │   ├── ProviderNotPermitted          403 provider-not-permitted
    │   ├── UnroutedDenied                403 unrouted-denied
    │   ├── Suspended                     403 suspended (the kill switch)
    │   ├── ReauthRequired                401 reauth-required
    │   ├── TokenRefreshFailed            502 token-refresh-failed
    │   │   └── ProviderMisconfigured     502 provider-misconfigured (the operator's to fix)
    │   ├── UpstreamUnreachable           502 upstream-unreachable
    │   ├── CredentialStoreUnavailable    503 credential-store-unavailable
    │   ├── AuditUnavailable              503 audit-unavailable
    │   └── InternalError                 500 internal-error (a bug: fail closed)
    ├── ConfigError                       bad configuration (names the key)
    ├── CoordinationUnavailable           Redis unreachable or too slow (-> 503)
    │   └── CoordinationFencing           refresh locks held back after a Redis data loss
    └── VaultError                        local vault problems seen by operators
        ├── VaultKeyError                 wrong or missing vault key
        ├── VaultCorruptError             a record fails authentication
        └── VaultUnavailable              the store cannot be reached (-> 503)
"""

from __future__ import annotations

from typing import ClassVar


class CredproxyError(Exception):
    """Base of every credproxy error."""


class ProxyRefusal(CredproxyError):
    """A request the proxy answers itself; nothing is forwarded upstream."""

    slug: ClassVar[str] = "internal"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        # A short machine-readable cause, used in the audit record and problem body.
        self.reason = reason or self.slug.replace("-", "_")

    def extra(self) -> dict[str, object]:
        """Extension members for the problem body."""
        return {"reason": self.reason}

    def headers(self) -> dict[str, str]:
        return {}


class MalformedRequest(ProxyRefusal):
    """The request is not well-formed HTTP the way every later hop would read it (a folded
    header line, a control byte, a field name that is not a token, a request-target the proxy
    cannot vouch for): refused before any decision (RFC 9112 section 5.2, RFC 9110 section
    5.5)."""

    slug = "malformed-request"
    status = 400
    title = "Malformed request"


class ExpectationFailed(MalformedRequest):
    """An ``Expect`` other than ``100-continue`` (RFC 9110 section 10.1.1: the only
    expectation defined; mitmproxy answers that one itself and would pass any other on)."""

    slug = "expectation-failed"
    status = 417
    title = "Expectation not supported"


class UserContextMissing(ProxyRefusal):
    slug = "user-context-missing"
    status = 407
    title = "User context required"

    def headers(self) -> dict[str, str]:
        # RFC 9110 section 15.5.8: a 407 must say how to authenticate to the proxy.
        return {"Proxy-Authenticate": 'Bearer realm="credproxy"'}


class UserContextInvalid(UserContextMissing):
    slug = "user-context-invalid"
    title = "User context rejected"


class MisdirectedRequest(ProxyRefusal):
    slug = "misdirected-request"
    status = 421
    title = "Host header does not match the destination"


class ProviderNotPermitted(ProxyRefusal):
    slug = "provider-not-permitted"
    status = 403
    title = "Provider not permitted for this user context"


class UnroutedDenied(ProxyRefusal):
    slug = "unrouted-denied"
    status = 403
    title = "Destination is not a configured provider"


class Suspended(ProxyRefusal):
    """An operator suspended access (``credproxy suspend``, :mod:`proxy.suspensions`) for
    the request's user, its user context (``context_id``), or its provider. The problem
    names the kind of suspension, what it names and since when (``since``: RFC 3339 UTC),
    and says to ask an administrator; the operator's reason is audited, never sent to the
    agent. The grant is untouched: ``credproxy resume`` restores access."""

    slug = "suspended"
    status = 403
    title = "Access suspended by an administrator"

    def __init__(self, detail: str, *, provider: str, kind: str, since: str) -> None:
        super().__init__(detail, reason="suspended")
        self.provider = provider
        self.kind = kind
        self.since = since

    def extra(self) -> dict[str, object]:
        return {"reason": self.reason, "provider": self.provider,
                "suspension": {"kind": self.kind, "since": self.since}}


class ReauthRequired(ProxyRefusal):
    slug = "reauth-required"
    status = 401
    title = "The user must re-authorize this provider"

    def __init__(self, detail: str, *, reason: str, provider: str, connect_url: str) -> None:
        super().__init__(detail, reason=reason)
        self.provider = provider
        self.connect_url = connect_url

    def extra(self) -> dict[str, object]:
        return {"reason": self.reason, "provider": self.provider, "connect_url": self.connect_url}

    def headers(self) -> dict[str, str]:
        # RFC 9110 section 15.5.2: a 401 must carry a challenge. RFC 6750 section 3: the
        # credential the proxy holds for this user is unusable. The description is built
        # from the provider id and reason slug only, reduced to the characters RFC 6750
        # allows inside the quotes (no '"' or '\\').
        description = _quotable(f"the user must re-authorize {self.provider} "
                                f"({self.reason}); see connect_url")
        return {"WWW-Authenticate": f'Bearer realm="credproxy", error="invalid_token", '
                                    f'error_description="{description}"'}


class InsufficientScope(ProxyRefusal):
    """The upstream asked for more scope than the user's grant holds (RFC 6750 section
    3.1 ``insufficient_scope``; the MCP authorization spec's scope challenge). ``scope``:
    what to consent to (the grant's scopes and the challenged ones); ``connect_url``
    requests exactly that. The grant is untouched: it still serves what it covers."""

    slug = "insufficient-scope"
    status = 403
    title = "The user must consent to more scope for this provider"

    def __init__(self, detail: str, *, provider: str, scope: str, connect_url: str) -> None:
        super().__init__(detail, reason="insufficient_scope")
        self.provider = provider
        self.scope = scope
        self.connect_url = connect_url

    def extra(self) -> dict[str, object]:
        return {"reason": self.reason, "provider": self.provider, "scope": self.scope,
                "connect_url": self.connect_url}


class TokenRefreshFailed(ProxyRefusal):
    """The token endpoint could not refresh the token now; the grant is untouched.
    ``retry_after``: set when the proxy will not ask the provider again for that long
    (an answer retrying cannot fix soon), sent as ``Retry-After``."""

    slug = "token-refresh-failed"
    status = 502
    title = "Token refresh failed (transient)"

    def __init__(self, detail: str, *, reason: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(detail, reason=reason)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class ProviderMisconfigured(TokenRefreshFailed):
    """The provider refused credproxy's own client (``invalid_client``,
    ``unauthorized_client``, ``unsupported_grant_type``: RFC 6749 section 5.2): a problem
    of the configuration, which the detail names, not of the user's grant, which stays
    valid and unmarked. The operator fixes it (client id, secret, auth method)."""

    slug = "provider-misconfigured"
    status = 502
    title = "The provider refused credproxy's client configuration"


class UpstreamUnreachable(ProxyRefusal):
    """The destination could not be reached (DNS, connect, TLS) or broke off the exchange;
    the detail says which."""

    slug = "upstream-unreachable"
    status = 502
    title = "The destination could not be reached"


class CredentialStoreUnavailable(ProxyRefusal):
    slug = "credential-store-unavailable"
    status = 503
    title = "Credential store unavailable"

    def __init__(self, detail: str, *, reason: str | None = None, retry_after: int = 5) -> None:
        super().__init__(detail, reason=reason)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class AuditUnavailable(ProxyRefusal):
    slug = "audit-unavailable"
    status = 503
    title = "Audit log unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class InternalError(ProxyRefusal):
    slug = "internal-error"
    status = 500
    title = "credproxy failed to process the request"


def _quotable(text: str) -> str:
    """``text`` with every character outside RFC 6750's error_description set (%x20-21 /
    %x23-5B / %x5D-7E) replaced by '?'."""
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)


class ConfigError(CredproxyError):
    """Configuration is invalid; the message names the offending key."""


class CoordinationUnavailable(CredproxyError):
    """The coordination backend (Redis) cannot be reached or answered too slowly."""


class CoordinationFencing(CoordinationUnavailable):
    """Redis lost its data recently: refresh locks are refused for ``remaining`` more
    seconds, until any refresh that was in flight has ended (-> 503 ``fencing``)."""

    def __init__(self, detail: str, *, remaining: float) -> None:
        super().__init__(detail)
        self.remaining = remaining


class VaultError(CredproxyError):
    """The vault cannot be used."""


class VaultKeyError(VaultError):
    """The vault key is missing, malformed or does not open this vault."""


class VaultCorruptError(VaultError):
    """A stored record fails authentication (tampered or corrupted)."""


class VaultUnavailable(VaultError):
    """The backing store could not be reached; requests fail closed with a 503."""
