"""The token broker: a usable access token for (user, provider), or a clear refusal.

Order of lookup: memory cache -> vault -> refresh at the provider. Refresh runs under the
coordinator's per-grant lock, re-reads the vault first (another worker may have refreshed),
and writes a rotated refresh token to the vault *before* the new access token is used.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal

from proxy.coordination.base import Coordinator
from proxy.errors import (
    CredentialStoreUnavailable,
    ReauthRequired,
    VaultCorruptError,
    VaultError,
)
from proxy.refresh import InvalidGrant, Refresher
from proxy.secret import Secret
from proxy.settings import ProviderSettings
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant, GrantStatus, Vault

Source = Literal["cache", "vault", "refresh"]
OnRefreshed = Callable[[TokenSet], Awaitable[None]]
_CACHE_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Issued:
    tokens: TokenSet
    source: Source


class TokenBroker:
    def __init__(
        self,
        vault: Vault,
        coordinator: Coordinator,
        refresher: Refresher,
        *,
        client_secret: Callable[[ProviderSettings], Secret | None],
        connect_url: Callable[[ProviderSettings], str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._vault = vault
        self._coord = coordinator
        self._refresher = refresher
        self._client_secret = client_secret
        self._connect_url = connect_url
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], Grant] = OrderedDict()
        # Tokens obtained by a refresh whose vault write failed: the old refresh token may
        # already be burned, so these are kept until a write succeeds.
        self._unsaved: dict[tuple[str, str], Grant] = {}
        coordinator.on_invalidation(self._on_invalidation)

    async def get(self, user: str, provider: ProviderSettings,
                  on_refreshed: OnRefreshed | None = None) -> Issued:
        key = (user, provider.id)
        fresh = self._fresh(self._cache.get(key), provider)
        if fresh is not None:
            self._cache.move_to_end(key)
            return Issued(fresh.tokens, "cache")
        async with self._coord.lock(user, provider.id):
            # Another request may have done the work while this one waited for the lock.
            fresh = self._fresh(self._cache.get(key), provider)
            if fresh is not None:
                return Issued(fresh.tokens, "cache")
            grant = await self._load(user, provider)
            if self._fresh(grant, provider) is not None:
                self._remember(grant)
                return Issued(grant.tokens, "vault")
            refreshed = await self._refresh(grant, provider)
            if on_refreshed is not None:
                await on_refreshed(refreshed.tokens)
            return Issued(refreshed.tokens, "refresh")

    async def mark_reauth(self, user: str, provider: ProviderSettings, reason: str,
                          *, rejected: Secret | None = None) -> bool:
        """The grant is no longer usable (upstream 401, invalid_grant): forget it everywhere.

        With ``rejected`` (the access token an upstream refused), the grant is marked only if
        that token is still its current one: a provider may reject an access token it
        superseded during a concurrent refresh, which says nothing about the new one.
        Returns whether the grant was marked.
        """
        key = (user, provider.id)
        if rejected is not None:
            async with self._coord.lock(user, provider.id):
                current = self._cache.get(key) or self._unsaved.get(key)
                if current is None:
                    try:
                        current = await self._vault.get(user, provider.id)
                    except VaultError as exc:
                        raise CredentialStoreUnavailable(
                            "vault unavailable while marking re-auth",
                            reason="vault_unavailable") from exc
                if current is not None and current.tokens.access_token != rejected:
                    return False
        self._cache.pop(key, None)
        self._unsaved.pop(key, None)
        try:
            await self._vault.mark_reauth(user, provider.id, reason)
        except VaultError as exc:
            raise CredentialStoreUnavailable("vault unavailable while marking re-auth",
                                             reason="vault_unavailable") from exc
        finally:
            await self._coord.publish_invalidation(user, provider.id)
        return True

    def invalidate(self, user: str, provider_id: str) -> None:
        self._cache.pop((user, provider_id), None)

    def reauth(self, provider: ProviderSettings, reason: str, detail: str) -> ReauthRequired:
        return ReauthRequired(detail, reason=reason, provider=provider.id,
                              connect_url=self._connect_url(provider))

    async def _on_invalidation(self, user: str, provider_id: str) -> None:
        self.invalidate(user, provider_id)

    def _fresh(self, grant: Grant | None, provider: ProviderSettings) -> Grant | None:
        if grant is None or grant.status is not GrantStatus.ACTIVE:
            return None
        if grant.tokens.expires_within(provider.refresh_skew, now=self._clock()):
            return None
        return grant

    def _remember(self, grant: Grant) -> None:
        key = (grant.user, grant.provider)
        self._cache[key] = grant
        self._cache.move_to_end(key)
        if len(self._cache) > _CACHE_MAX:
            self._cache.popitem(last=False)

    async def _load(self, user: str, provider: ProviderSettings) -> Grant:
        key = (user, provider.id)
        unsaved = self._unsaved.get(key)
        if unsaved is not None:
            await self._save(unsaved)
            return unsaved
        try:
            grant = await self._vault.get(user, provider.id)
        except VaultCorruptError as exc:
            # Fail closed and say so; operators see the user and provider in the proxy log.
            raise CredentialStoreUnavailable("the stored grant for this user cannot be "
                                             "decrypted (corrupted or tampered)",
                                             reason="vault_record_corrupt") from exc
        except VaultError as exc:
            raise CredentialStoreUnavailable("the credential store cannot be read",
                                             reason="vault_unavailable") from exc
        if grant is None:
            raise self.reauth(provider, "no_connection",
                              f"user has no connection to {provider.id}")
        if grant.status is GrantStatus.REAUTH_REQUIRED:
            raise self.reauth(provider, grant.reason or "reauth_required",
                              f"the connection to {provider.id} needs re-authorization")
        return grant

    async def _refresh(self, grant: Grant, provider: ProviderSettings) -> Grant:
        if grant.tokens.refresh_token is None:
            await self.mark_reauth(grant.user, provider, "expired")
            raise self.reauth(provider, "expired",
                              f"the access token for {provider.id} expired and cannot be "
                              "refreshed")
        try:
            tokens = await self._refresher.refresh(provider, self._client_secret(provider),
                                                   grant.tokens.refresh_token)
        except InvalidGrant:
            await self.mark_reauth(grant.user, provider, "invalid_grant")
            raise self.reauth(provider, "invalid_grant",
                              f"{provider.id} rejected the refresh token (invalid_grant)"
                              ) from None
        new = replace(grant, tokens=tokens.merged_refresh(grant.tokens))
        self._unsaved[(grant.user, provider.id)] = new
        stored = await self._save(new)
        self._remember(stored)
        return stored

    async def _save(self, grant: Grant) -> Grant:
        key = (grant.user, grant.provider)
        try:
            stored = await self._vault.put(grant)
        except VaultError as exc:
            raise CredentialStoreUnavailable(
                "a refreshed token could not be written to the credential store; it is kept "
                "in memory and the write is retried on the next request",
                reason="vault_write_failed") from exc
        self._unsaved.pop(key, None)
        return stored
