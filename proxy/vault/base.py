"""The vault interface every backend implements."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from proxy.binding import GrantValue
from proxy.secret import Secret
from proxy.tokenset import TokenSet, TokenSetError


class GrantChanged(Exception):  # noqa: N818 - a condition, not a failure of the vault
    """The stored grant is no longer the one a write was based on."""


def next_version(previous: int | None, now: float) -> int:
    """The next version of a grant. A new grant starts at the current time in milliseconds,
    so versions keep growing across a revoke and a reconnect: the shared cache remembers
    the version a grant was revoked at and refuses anything not newer."""
    return int(now * 1000) if previous is None else previous + 1


class GrantStatus(StrEnum):
    ACTIVE = "active"
    REAUTH_REQUIRED = "reauth_required"
    # Only in listings (:meth:`Vault.list`), never stored: a record that fails
    # authentication (tampered or damaged), whose tokens cannot be read. Listing it
    # instead of failing lets operators see it and `credproxy revoke` delete it.
    CORRUPT = "corrupt"


@dataclass(frozen=True, slots=True)
class Grant:
    """A user's connection to one provider."""

    user: str
    provider: str
    tokens: TokenSet
    status: GrantStatus = GrantStatus.ACTIVE
    reason: str | None = None  # why re-authorization is needed
    updated_at: float = 0.0
    version: int = 0  # bumped on every write; lets caches discard stale entries
    # Non-secret values bound into the grant (proxy.binding): instance URL, shop, realm...
    values: Mapping[str, GrantValue] = field(default_factory=dict)
    # Access tokens for the provider's other resources (one consent, one refresh token:
    # ``tokens.refresh_token`` serves them all); never holding a refresh token themselves.
    resources: Mapping[str, TokenSet] = field(default_factory=dict)
    # The secret of the client that minted the grant when it is not the configured one: an
    # MCP server's dynamically registered confidential client (RFC 7591 section 3.2.1),
    # sealed with the tokens so any replica, after any restart, refreshes as that client.
    client_secret: Secret | None = None

    def tokens_for(self, resource: str | None) -> TokenSet | None:
        """The access token set for ``resource`` (None: the provider's own hosts)."""
        return self.tokens if resource is None else self.resources.get(resource)


@dataclass(frozen=True, slots=True)
class ResourceInfo:
    """What may be shown about a resource's access token: never its value."""

    expires_at: float | None
    scope: str | None


@dataclass(frozen=True, slots=True)
class GrantInfo:
    """What may be shown about a grant: never token values."""

    user: str
    provider: str
    status: GrantStatus
    reason: str | None
    scope: str | None
    expires_at: float | None
    has_refresh_token: bool
    updated_at: float
    version: int
    values: Mapping[str, GrantValue] = field(default_factory=dict)
    resources: Mapping[str, ResourceInfo] = field(default_factory=dict)


def grant_record(grant: Grant) -> dict[str, Any]:
    """What a backend seals for ``grant``: its token set's record, plus its grant values
    and resource access tokens when it has any (records written before these existed
    read as having none). Reveals secrets: for sealing only."""
    record = grant.tokens.to_record()
    if grant.values:
        record["grant_values"] = {k: list(v) if isinstance(v, tuple) else v
                                  for k, v in grant.values.items()}
    if grant.resources:
        record["resource_tokens"] = {rid: t.to_record() for rid, t in grant.resources.items()}
    if grant.client_secret is not None:
        record["client_secret"] = grant.client_secret.reveal()
    return record


def grant_from_record(record: Mapping[str, Any], **fields: Any) -> Grant:
    """The :class:`Grant` a sealed record (:func:`grant_record`) holds, with ``fields``
    (``user``, ``provider``, ``status``, ``version``...) from the backend's own columns.
    Raises :class:`proxy.tokenset.TokenSetError`."""
    tokens, values, resources = read_grant_record(record)
    secret = record.get("client_secret")
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise TokenSetError("client_secret must be a non-empty string")
    return Grant(tokens=tokens, values=values, resources=resources,
                 client_secret=Secret(secret) if secret else None, **fields)


def read_grant_record(record: Mapping[str, Any]
                      ) -> tuple[TokenSet, dict[str, GrantValue], dict[str, TokenSet]]:
    """The token set, grant values and resource tokens of a sealed record
    (:func:`grant_record`). Raises :class:`proxy.tokenset.TokenSetError`."""
    tokens = TokenSet.from_record(record)
    values: dict[str, GrantValue] = {}
    raw = record.get("grant_values") or {}
    if not isinstance(raw, Mapping):
        raise TokenSetError("grant_values must be an object")
    for name, value in raw.items():
        if isinstance(value, str):
            values[str(name)] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            values[str(name)] = tuple(value)
        else:
            raise TokenSetError("a grant value must be a string or a list of strings")
    rtokens = record.get("resource_tokens") or {}
    if not isinstance(rtokens, Mapping):
        raise TokenSetError("resource_tokens must be an object")
    resources = {str(rid): TokenSet.from_record(rec) for rid, rec in rtokens.items()}
    return tokens, values, resources


class Vault(Protocol):
    """Storage of grants. Implementations raise :class:`proxy.errors.VaultKeyError`,
    :class:`proxy.errors.VaultCorruptError` or :class:`proxy.errors.VaultUnavailable`."""

    async def get(self, user: str, provider: str) -> Grant | None: ...

    async def put(self, grant: Grant, *, expected_version: int | None = None) -> Grant:
        """Store ``grant``; returns it with the new version and timestamp.

        With ``expected_version`` the write happens only if the stored grant still has that
        version and is active, else :class:`GrantChanged` is raised: a refresh must not bring
        back a grant that was revoked, marked or reconnected while it ran."""
        ...

    async def mark_reauth(self, user: str, provider: str, reason: str) -> Grant | None: ...

    async def delete(self, user: str, provider: str) -> bool: ...

    async def list(self, user: str | None = None) -> list[GrantInfo]:
        """The grants (of ``user``, or everyone's), sorted by user and provider. A record
        that fails authentication is listed with status ``corrupt`` (see
        :func:`corrupt_info`) rather than failing the whole listing."""
        ...

    async def ping(self) -> None:
        """Raise if the vault cannot be read right now (readiness; no writes)."""
        ...

    async def epoch(self) -> int:
        """A counter that changes whenever any grant is marked or deleted (0 if the backend
        has none): lets processes sharing a vault notice revocations without Redis."""
        ...

    async def check(self) -> None:
        """Raise if the vault cannot be read and written."""
        ...

    async def close(self) -> None: ...


def info(grant: Grant) -> GrantInfo:
    t = grant.tokens
    return GrantInfo(
        user=grant.user,
        provider=grant.provider,
        status=grant.status,
        reason=grant.reason,
        scope=t.scope,
        expires_at=t.expires_at,
        has_refresh_token=t.refresh_token is not None,
        updated_at=grant.updated_at,
        version=grant.version,
        values=dict(grant.values),
        resources={rid: ResourceInfo(expires_at=r.expires_at, scope=r.scope)
                   for rid, r in grant.resources.items()},
    )


def corrupt_info(user: str, provider: str, *, updated_at: float, version: int) -> GrantInfo:
    """The listing of a record that fails authentication: who and what it is for (from its
    unauthenticated columns, for display and for deleting it), nothing from inside it."""
    return GrantInfo(user=user, provider=provider, status=GrantStatus.CORRUPT,
                     reason="vault_record_corrupt", scope=None, expires_at=None,
                     has_refresh_token=False, updated_at=updated_at, version=version)
