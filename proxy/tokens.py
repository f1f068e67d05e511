"""The token broker: a usable access token for (user, provider), or a clear refusal.

Lookup order: this process's memory cache -> the coordinator's shared cache (Redis) ->
the vault -> a refresh at the provider. In one process, concurrent requests for a grant
wait on one asyncio lock, so they cause one vault read and at most one refresh. Across
processes, a refresh runs only under the coordinator's lock, and only after re-reading the
shared cache and the vault (another replica may have refreshed while this one waited). The
rotated refresh token is written to the vault *before* the new access token is used.

Without the coordinator (Redis down), tokens that are still fresh in memory or in the vault
keep being served, but nothing is refreshed: redeeming a rotating refresh token without the
lock could burn the grant. During the fencing period after Redis lost its data, a request
that needs a refresh is answered at once (503 ``fencing``, Retry-After = the seconds left).

An access token is refreshed when it expires within ``min(refresh_skew, lifetime / 2)``
(:meth:`proxy.tokenset.TokenSet.refresh_margin`): once per lifetime, however short.

Grants of unknown expiry (the provider sent no usable ``expires_in`` and the provider
entry has no ``default_expires_in``: Salesforce sends none) are never refreshed ahead of
time. An upstream 401 on a token the proxy believed valid (a clock skew, a token of unknown
expiry that ran out, or a dead grant) gets one forced refresh (:meth:`refresh_rejected`)
before the grant is declared dead: the agent gets a retryable 503 (``token_refreshed``)
and the request is never replayed by the proxy (it may not be idempotent).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal

from proxy.binding import BindingError
from proxy.coordination.base import Coordinator
from proxy.coordination.keyed import KeyedLocks
from proxy.errors import (
    CoordinationFencing,
    CoordinationUnavailable,
    CredentialStoreUnavailable,
    CredproxyError,
    ProviderMisconfigured,
    ReauthRequired,
    TokenRefreshFailed,
    VaultCorruptError,
    VaultError,
)
from proxy.live import LiveConfig
from proxy.mcpauth import McpDiscoveryError, grant_client, scope_ceiling, shared_discovery
from proxy.metrics import Metrics
from proxy.provider_client import InvalidGrant, ProviderClient
from proxy.secret import Secret
from proxy.settings import ProviderSettings
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant, GrantChanged, GrantStatus, Vault

log = logging.getLogger("credproxy.tokens")

Source = Literal["cache", "vault", "refresh"]
OnRefreshed = Callable[[TokenSet], Awaitable[None]]
Rejection = Literal["refreshed", "superseded"]
# Refuses a request for a grant (raises), or lets it have the grant's token.
Admit = Callable[[Grant], None]


def _admit_all(grant: Grant) -> None:
    return None
_CACHE_MAX = 100_000
# A provider that rejects every token would get a refresh per request: after a forced
# refresh of a grant, another rejection within this many seconds (per process) means the
# grant is dead. A skewed clock or an unannounced expiry needs one refresh per token
# lifetime, far longer than this.
FORCED_REFRESH_WINDOW = 300.0


@dataclass(frozen=True, slots=True)
class Issued:
    """A usable access token (``tokens``: the one for the resource asked for) and the grant
    it belongs to (its values bind where it may go)."""

    tokens: TokenSet
    source: Source
    grant: Grant


@dataclass
class BrokerStats:
    """Counters for operators and benchmarks (no user ids)."""

    vault_reads: int = 0
    shared_hits: int = 0
    refreshes: int = 0


class TokenBroker:
    def __init__(
        self,
        vault: Vault,
        coordinator: Coordinator,
        refresher: ProviderClient,
        live: LiveConfig,
        *,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        """``live``: the running configuration, for the providers' client secrets and
        connect URLs; read when needed, which is the snapshot of the request in progress
        (the sidecar pins it, :meth:`proxy.live.LiveConfig.pinned`)."""
        self.metrics = metrics or Metrics()
        self._vault = vault
        self._coord = coordinator
        self._refresher = refresher
        self._live = live
        self._clock = clock
        self._local = KeyedLocks()
        self._cache: OrderedDict[tuple[str, str], Grant] = OrderedDict()
        # Tokens obtained by a refresh whose vault write failed, with the version they were
        # based on: the old refresh token may already be spent, so these are kept until a
        # write succeeds (or the write finds the grant revoked or replaced meanwhile).
        self._unsaved: dict[tuple[str, str], tuple[Grant, int]] = {}
        # Bumped by every invalidation: a vault or shared-cache read that was in flight when
        # one arrived must not put what it read into the memory cache afterwards.
        self._generation = 0
        # Monotonic time of the last forced refresh per grant (see FORCED_REFRESH_WINDOW).
        self._forced: dict[tuple[str, str, str], float] = {}
        self.stats = BrokerStats()
        coordinator.on_invalidation(self._on_invalidation)

    # -- public ------------------------------------------------------------------------
    @property
    def coordinator(self) -> Coordinator:
        """The coordinator the broker shares grants through (the sidecar notes uses)."""
        return self._coord

    async def get(self, user: str, provider: ProviderSettings,
                  on_refreshed: OnRefreshed | None = None, *,
                  resource: str | None = None, admit: Admit | None = None) -> Issued:
        """A usable access token of ``user``'s grant for ``provider`` (``resource``: one of
        the provider's resources, which share the grant and its refresh token but each
        have their own access token, obtained by redeeming the refresh token with the
        resource's scopes). ``admit(grant)`` is called with the grant before its token is
        issued and before any refresh: it raises to refuse the request (the destination is
        not the grant's own host), so a refused request never costs a token-endpoint call.
        Raises :class:`ReauthRequired` or another :class:`ProxyRefusal`."""
        key = (user, provider.id)
        check = admit or _admit_all
        fresh = self._fresh(self._cache.get(key), provider, resource)
        if fresh is not None:
            check(fresh)
            self._cache.move_to_end(key)
            return self._issued(fresh, "cache", resource)
        async with self._local.hold(key):
            # Another request in this process may have done the work meanwhile.
            fresh = self._fresh(self._cache.get(key), provider, resource)
            if fresh is not None:
                check(fresh)
                return self._issued(fresh, "cache", resource)
            found = await self._lookup(user, provider, resource, check)
            if found is not None:
                return found
            return await self._refresh_locked(user, provider, on_refreshed, resource, check)

    @staticmethod
    def _issued(grant: Grant, source: Source, resource: str | None) -> Issued:
        tokens = grant.tokens_for(resource)
        assert tokens is not None  # _fresh and _refresh never return a grant without it
        return Issued(tokens, source, grant)

    async def refresh_rejected(self, user: str, provider: ProviderSettings, rejected: Secret,
                               on_refreshed: OnRefreshed | None = None, *,
                               resource: str | None = None) -> Rejection:
        """An upstream rejected ``rejected`` (HTTP 401 or ``error="invalid_token"``, RFC 6750
        section 3.1) although the proxy believed it valid: a clock skew between proxy and
        provider, a token of unknown expiry that ran out, or a dead grant. One forced
        refresh, under the same locks and conditional vault write as any refresh, tells
        them apart. The request itself is never replayed.

        Returns ``"superseded"`` when ``rejected`` is no longer the grant's current token (a
        concurrent refresh replaced it; nothing is done), ``"refreshed"`` when a new token
        was obtained and stored (the grant lives; the agent may retry).

        Raises :class:`ReauthRequired` (``revoked_upstream``, the grant is marked) when the
        grant has no refresh token, the provider refuses the refresh token
        (``invalid_grant`` or another code of the dialect's ``token_errors.reauth``), or
        this process already forced a refresh of the grant less
        than :data:`FORCED_REFRESH_WINDOW` seconds ago (a provider that rejects every
        token). Raises :class:`CredentialStoreUnavailable` (``fencing``,
        ``coordination_unavailable``, vault reasons) or :class:`TokenRefreshFailed` when the
        refresh cannot happen now; the grant is left as it is.
        """
        key = (user, provider.id)
        m = self.metrics.forced_refreshes

        def current(grant: Grant) -> Secret | None:
            tokens = grant.tokens_for(resource)
            return tokens.access_token if tokens is not None else None

        try:
            async with self._local.hold(key):
                try:
                    async with self._coord.lock(user, provider.id) as lease:
                        grant = await self._load(user, provider)
                        if current(grant) != rejected:
                            self._forget(key)  # memory may still hold the rejected one
                            m.labels(provider.id, "superseded").inc()
                            return "superseded"
                        if not lease.valid():
                            raise CoordinationUnavailable("refresh lock lease lost")
                        refreshed = await self._force_refresh(grant, provider, resource)
                except CoordinationUnavailable as exc:
                    # Without the lock a grant without a refresh token can still be marked
                    # (marking only takes a grant away); nothing may be redeemed.
                    grant = await self._load(user, provider)
                    if current(grant) != rejected:
                        m.labels(provider.id, "superseded").inc()
                        return "superseded"
                    if grant.tokens.refresh_token is None:
                        await self._force_refresh(grant, provider, resource)
                    raise self._uncoordinated(exc) from exc
        except ReauthRequired:
            m.labels(provider.id, "reauth").inc()
            raise
        except CredproxyError:
            m.labels(provider.id, "failed").inc()
            raise
        m.labels(provider.id, "refreshed").inc()
        if on_refreshed is not None:
            await on_refreshed(self._issued(refreshed, "refresh", resource).tokens)
        return "refreshed"

    async def _force_refresh(self, grant: Grant, provider: ProviderSettings,
                             resource: str | None) -> Grant:
        """Refresh ``grant`` whose current access token (for ``resource``) an upstream
        rejected, or mark it ``revoked_upstream`` and raise :class:`ReauthRequired`. Call
        under the locks."""
        key = (grant.user, provider.id, resource or "")
        now = time.monotonic()
        last = self._forced.get(key)
        if grant.tokens.refresh_token is None:
            why = "and the grant has no refresh token"
        elif last is not None and now - last < FORCED_REFRESH_WINDOW:
            why = (f"again {now - last:.0f} s after a forced refresh (it rejects new tokens "
                   "too)")
        else:
            refreshed = await self._refresh(grant, provider, resource, forced=True)
            if len(self._forced) > _CACHE_MAX:
                self._forced = {k: t for k, t in self._forced.items()
                                if now - t < FORCED_REFRESH_WINDOW}
            self._forced[key] = now
            return refreshed
        await self._mark(grant.user, provider, "revoked_upstream")
        raise self.reauth(provider, "revoked_upstream",
                          f"{provider.id} rejected the user's token {why}; the user must "
                          "re-authorize")

    async def watch_vault(self, interval: float = 0.25) -> None:
        """Drop the memory cache whenever the vault's epoch moves: another process (the
        `credproxy revoke` command, another replica on the same file) revoked something.
        Runs until cancelled; backends without an epoch make it a no-op."""
        import asyncio

        last: int | None = None
        while True:
            try:
                epoch: int | None = await self._vault.epoch()
            except VaultError:
                epoch = last
            if last is not None and epoch != last:
                self._forget(None)
            last = epoch
            await asyncio.sleep(interval)

    def invalidate(self, user: str, provider_id: str) -> None:
        self._forget((user, provider_id))

    def connect_url(self, provider: ProviderSettings) -> str:
        """Where the user re-authorizes ``provider``, per the running configuration."""
        return self._live.current.connect_url(provider)

    def reauth(self, provider: ProviderSettings, reason: str, detail: str) -> ReauthRequired:
        return ReauthRequired(detail, reason=reason, provider=provider.id,
                              connect_url=self.connect_url(provider))

    # -- internals ---------------------------------------------------------------------
    def _client_secret(self, provider: ProviderSettings) -> Secret | None:
        return self._live.current.client_secret(provider)

    async def _on_invalidation(self, key: tuple[str, str] | None) -> None:
        self._forget(key)

    def _forget(self, key: tuple[str, str] | None) -> None:
        """Drop one grant (None: all) from memory, and make reads in flight not cache what
        they return. Unsaved refreshed tokens stay: their write is conditional, so a revoked
        grant cannot come back through them, and dropping them would burn grants whose old
        refresh token is already spent."""
        self._generation += 1
        if key is None:
            self._cache.clear()
        else:
            self._cache.pop(key, None)

    def _fresh(self, grant: Grant | None, provider: ProviderSettings,
               resource: str | None) -> Grant | None:
        """``grant`` when its access token for ``resource`` is usable now, else None."""
        if grant is None or grant.status is not GrantStatus.ACTIVE:
            return None
        tokens = grant.tokens_for(resource)
        if tokens is None:
            return None
        # Margin min(refresh_skew, lifetime / 2): one refresh per lifetime even for tokens
        # shorter than the skew. Unknown expiry (and no default_expires_in): never due here;
        # an upstream 401 gets one forced refresh (refresh_rejected).
        if tokens.needs_refresh(provider.refresh_skew, now=self._clock()):
            return None
        return grant

    def _remember(self, grant: Grant, generation: int) -> None:
        if generation != self._generation:
            return  # an invalidation arrived while this grant was being read
        key = (grant.user, grant.provider)
        self._cache[key] = grant
        self._cache.move_to_end(key)
        if len(self._cache) > _CACHE_MAX:
            self._cache.popitem(last=False)

    async def _lookup(self, user: str, provider: ProviderSettings, resource: str | None,
                      admit: Admit = lambda grant: None) -> Issued | None:
        """A fresh token from the shared cache or the vault, or None when it needs a refresh.
        Raises re-auth when the vault says the grant is unusable; whatever ``admit``
        raises for the grant found."""
        generation = self._generation
        shared = self._fresh(await self._coord.cache_get(user, provider.id), provider,
                             resource)
        if shared is not None:
            self.stats.shared_hits += 1
            self._remember(shared, generation)
            admit(shared)
            return self._issued(shared, "cache", resource)
        generation = self._generation
        grant = await self._load(user, provider)
        admit(grant)
        if self._fresh(grant, provider, resource) is not None:
            self._remember(grant, generation)
            await self._coord.cache_put(grant)
            return self._issued(grant, "vault", resource)
        return None

    async def _refresh_locked(self, user: str, provider: ProviderSettings,
                              on_refreshed: OnRefreshed | None,
                              resource: str | None, admit: Admit) -> Issued:
        try:
            async with self._coord.lock(user, provider.id) as lease:
                # Re-read: another replica may have refreshed while this one waited.
                found = await self._lookup(user, provider, resource, admit)
                if found is not None:
                    return found
                if not lease.valid():
                    raise CoordinationUnavailable("refresh lock lease lost")
                grant = await self._load(user, provider)
                admit(grant)
                refreshed = await self._refresh(grant, provider, resource)
                # A reconnect while the refresh ran replaces the grant (another tenant):
                # the grant now issued must be admitted too.
                admit(refreshed)
        except CoordinationUnavailable as exc:
            raise self._uncoordinated(exc) from exc
        issued = self._issued(refreshed, "refresh", resource)
        if on_refreshed is not None:
            await on_refreshed(issued.tokens)
        return issued

    @staticmethod
    def _uncoordinated(exc: CoordinationUnavailable) -> CredentialStoreUnavailable:
        """The answer to a request whose token needs a refresh the coordinator cannot lock
        now. In the fencing period after a Redis data loss the wait is known: answer at once
        with it as Retry-After instead of waiting out ``lock_wait``."""
        if isinstance(exc, CoordinationFencing):
            return CredentialStoreUnavailable(
                "Redis lost its data moments ago; token refreshes resume in "
                f"{exc.remaining:.0f} s, when any refresh that was in flight has ended: "
                "retry then", reason="fencing", retry_after=max(1, math.ceil(exc.remaining)))
        return CredentialStoreUnavailable(
            "the token needs a refresh and replicas cannot coordinate it right now",
            reason="coordination_unavailable")

    async def _mark(self, user: str, provider: ProviderSettings, reason: str) -> None:
        """Mark the grant ``reauth_required`` in the vault and forget it everywhere. Safe
        without the coordination lock: it only ever takes a grant away."""
        key = (user, provider.id)
        self._forget(key)
        self._unsaved.pop(key, None)
        try:
            marked = await self._vault.mark_reauth(user, provider.id, reason)
        except VaultError as exc:
            raise CredentialStoreUnavailable("vault unavailable while marking re-auth",
                                             reason="vault_unavailable") from exc
        version = marked.version if marked is not None else 0
        try:
            await self._coord.cache_forget(key, version)
            await self._coord.publish_invalidation(user, provider.id)
        except CoordinationUnavailable:
            log.warning("re-auth of %s/%s not broadcast: coordination unavailable",
                        user, provider.id)

    async def _read_vault(self, user: str, provider: ProviderSettings) -> Grant | None:
        self.stats.vault_reads += 1
        try:
            return await self._vault.get(user, provider.id)
        except VaultCorruptError as exc:
            self.metrics.vault_errors.labels("corrupt").inc()
            # Fail closed and say so; operators see the user and provider in the proxy log.
            raise CredentialStoreUnavailable("the stored grant for this user cannot be "
                                             "decrypted (corrupted or tampered)",
                                             reason="vault_record_corrupt") from exc
        except VaultError as exc:
            self.metrics.vault_errors.labels("read").inc()
            raise CredentialStoreUnavailable("the credential store cannot be read",
                                             reason="vault_unavailable") from exc

    async def _load(self, user: str, provider: ProviderSettings) -> Grant:
        key = (user, provider.id)
        unsaved = self._unsaved.get(key)
        if unsaved is not None:
            return await self._save(*unsaved, provider)
        grant = await self._read_vault(user, provider)
        if grant is None:
            raise self.reauth(provider, "no_connection",
                              f"user has no connection to {provider.id}")
        if grant.status is GrantStatus.REAUTH_REQUIRED:
            raise self.reauth(provider, grant.reason or "reauth_required",
                              f"the connection to {provider.id} needs re-authorization")
        return grant

    async def _refresh(self, grant: Grant, provider: ProviderSettings,
                       resource: str | None = None, *, forced: bool = False) -> Grant:
        """Redeem the grant's refresh token and store the result.

        When the provider says the grant is dead (:class:`InvalidGrant`: ``invalid_grant``
        or another code of the dialect's ``token_errors.reauth``), the grant is marked at
        once, in the vault and every cache, with the provider's code as the reason
        (``revoked_upstream`` for a refresh ``forced`` by an upstream 401), and this
        request gets ``reauth-required``: the dead refresh token is never presented again.
        An operator error (:class:`ProviderMisconfigured`) or any other failure leaves the
        grant as it is.

        ``resource``: redeem for that resource's access token, with its ``scopes``
        (rendered with the grant's values); a rotated refresh token replaces the grant's
        one, and the other access tokens are kept. The token endpoint is the provider's,
        rendered with the grant's values (Shopify's is per shop)."""
        if grant.tokens.refresh_token is None:
            if resource is not None:
                # Says nothing about the main token, which may well be valid: no mark.
                raise self.reauth(provider, "expired",
                                  f"the token for {provider.id}'s resource {resource} can "
                                  "only be had with a refresh token, and the grant has none; "
                                  "the user must reconnect")
            await self._mark(grant.user, provider, "expired")
            raise self.reauth(provider, "expired",
                              f"the access token for {provider.id} expired and cannot be "
                              "refreshed")
        try:
            endpoint = provider.for_grant(grant.values)
            scopes = (provider.resource_scopes(resource, grant.values)
                      if resource is not None else None)
        except BindingError as exc:
            raise self.reauth(provider, exc.reason,
                              f"{exc.detail}; the user must reconnect {provider.id}") from None
        client_secret = self._client_secret(provider)
        if provider.mcp is not None:
            endpoint, client_secret = await self._mcp_endpoint(grant, provider, forced)
        self.stats.refreshes += 1
        started = time.monotonic()
        m = self.metrics
        try:
            tokens = await self._refresher.refresh(endpoint, client_secret,
                                                   grant.tokens.refresh_token, scopes=scopes)
        except InvalidGrant as exc:
            m.refreshes.labels(provider.id, "invalid_grant").inc()
            reason = "revoked_upstream" if forced else exc.reason
            await self._mark(grant.user, provider, reason)
            raise self.reauth(provider, reason, f"{exc.detail}; the user must re-authorize"
                              ) from None
        except ProviderMisconfigured:
            m.refreshes.labels(provider.id, "misconfigured").inc()
            raise
        except CredproxyError:
            m.refreshes.labels(provider.id, "failed").inc()
            raise
        finally:
            m.refresh_seconds.labels(provider.id).observe(time.monotonic() - started)
        m.refreshes.labels(provider.id, "ok").inc()
        if resource is None:
            new = replace(grant, tokens=tokens.merged_refresh(grant.tokens))
        else:
            shared = replace(grant.tokens, refresh_token=tokens.refresh_token
                             or grant.tokens.refresh_token)
            new = replace(grant, tokens=shared, resources={
                **grant.resources, resource: replace(tokens, refresh_token=None)})
        generation = self._generation
        self._unsaved[(grant.user, provider.id)] = (new, grant.version)
        stored = await self._save(new, grant.version, provider, resource)
        self._remember(stored, generation)
        await self._coord.cache_put(stored)
        return stored

    def mcp_ceiling(self, provider: ProviderSettings) -> list[str] | None:
        """The scopes a user may consent to at an ``mcp`` provider
        (:func:`proxy.mcpauth.scope_ceiling`), from what discovery still holds; None when
        nothing is cached (no fetch here: the caller is answering a request)."""
        if provider.mcp is None:
            return None
        found = shared_discovery(self._refresher).cached(provider.mcp)
        return None if found is None else scope_ceiling(found, provider.scopes)

    async def _mcp_endpoint(self, grant: Grant, provider: ProviderSettings, forced: bool
                            ) -> tuple[ProviderSettings, Secret | None]:
        """An ``mcp`` grant's token endpoint and client for a refresh: the authorization
        server discovery finds now (proxy.mcpauth, cached), which must still be the issuer
        that minted the grant (else the user reconnects, registering anew), with the
        client recorded in the grant and ``resource`` (RFC 8707) on the request
        (:func:`proxy.mcpauth.grant_client`). ``forced``: the server has just answered 401,
        whose cause may be a moved authorization server: discovery is redone rather than
        read from the cache (MCP authorization: the client re-reads the protected resource
        metadata on a 401)."""
        assert provider.mcp is not None
        issuer, client_id = grant.values.get("mcp_issuer"), grant.values.get("mcp_client_id")
        if not isinstance(issuer, str) or not isinstance(client_id, str):
            raise self.reauth(provider, "mcp_grant_incomplete",
                              f"the grant for {provider.id} does not say which authorization "
                              "server minted it; the user must reconnect")
        discovery = shared_discovery(self._refresher)
        if forced:
            discovery.forget(provider.mcp)
        try:
            server = await discovery.discover(provider.mcp, allow_http=provider.allow_http,
                                              issuer=provider.issuer)
        except McpDiscoveryError as exc:
            raise TokenRefreshFailed(f"discovery for {provider.id} failed: {exc.detail}",
                                     reason=exc.reason) from None
        if server.issuer != issuer:
            raise self.reauth(provider, "mcp_issuer_changed",
                              f"{provider.id}'s authorization server is now {server.issuer}, "
                              f"not {issuer} which minted the grant; the user must reconnect")
        return grant_client(provider, server, grant, self._client_secret(provider))

    async def _save(self, grant: Grant, based_on: int, provider: ProviderSettings,
                    resource: str | None = None) -> Grant:
        """Write refreshed tokens, only over the version they were refreshed from: a grant
        revoked, marked or reconnected meanwhile is never brought back."""
        key = (grant.user, grant.provider)
        try:
            stored = await self._vault.put(grant, expected_version=based_on)
        except GrantChanged:
            self._unsaved.pop(key, None)
            self._cache.pop(key, None)
            log.warning("refreshed tokens for %s/%s discarded: the grant was revoked or "
                        "replaced while the refresh ran", grant.user, grant.provider)
            # Reconnected meanwhile: the new grant is the one to use. Revoked or marked:
            # _load says so (no_connection, or the mark's reason).
            current = await self._load(grant.user, provider)
            if self._fresh(current, provider, None) is None:
                raise self.reauth(provider, "revoked",
                                  f"the connection to {provider.id} was revoked or replaced "
                                  "while its token was being refreshed") from None
            if current.tokens_for(resource) is None:
                raise CredentialStoreUnavailable(
                    f"the connection to {provider.id} was replaced while a token for its "
                    f"resource {resource} was obtained: retry the request",
                    reason="token_superseded", retry_after=1) from None
            return current
        except VaultError as exc:
            self.metrics.vault_errors.labels("write").inc()
            # Other replicas must not redeem the old (now spent) refresh token: give them
            # the new access token through the shared cache until the write succeeds.
            await self._coord.cache_put(replace(grant, version=based_on + 1))
            raise CredentialStoreUnavailable(
                "a refreshed token could not be written to the credential store; it is kept "
                "in memory and the write is retried on the next request",
                reason="vault_write_failed") from exc
        self._unsaved.pop(key, None)
        return stored
