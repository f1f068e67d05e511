"""Offboarding: revoke a user's grants upstream (RFC 7009, or the provider's own style:
:class:`proxy.dialect.Revocation`), delete them, forget them everywhere, and audit it.

Order per grant, chosen so nothing can be injected afterwards (with Redis, or processes on
one local vault file; Key Vault without Redis learns of it within 5 s): under the grant's
refresh lock, mark it for re-auth in the vault (every process stops serving it: the vault's epoch
changes and, with Redis, the shared cache entry is dropped and an invalidation published),
then revoke upstream (refresh token first: for most providers that ends the whole grant;
then the access token, whatever happened to the first), then delete it. Anything that still
fails after retries (upstream revocation, local delete, the Redis broadcast) leaves the
rest done and is reported as pending, with a non-zero exit status and an audit record.

A provider without per-grant revocation (``revocation.style: none``: Entra ID, Atlassian)
is reported as exactly that, and counts as done: "no upstream revocation exists for this
provider; local removal done; revoke the app's access at <console_url>" (CLI and audit).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from contextvars import ContextVar
from dataclasses import dataclass

from proxy import audit as auditlog
from proxy.audit import Actor, AuditLog
from proxy.binding import BindingError
from proxy.coordination.base import Coordinator
from proxy.errors import CoordinationUnavailable, VaultCorruptError, VaultError
from proxy.live import LiveConfig, Snapshot
from proxy.mcpauth import McpDiscoveryError, grant_client, shared_discovery
from proxy.provider_client import ProviderClient, revokes_with_access_token
from proxy.secret import Secret
from proxy.settings import ProviderSettings
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant, GrantInfo, GrantStatus, Vault

# Revocation.upstream -> the audit record's reason (proxy/reasons.py).
log = logging.getLogger("credproxy.offboard")

# Who asked for the revocation in progress (this task's; Offboarder.revoke sets it).
_ACTOR: ContextVar[Actor | None] = ContextVar("credproxy_offboard_actor", default=None)

_UPSTREAM_REASONS = {"revoked": "upstream_revoked", "pending": "upstream_pending",
                     "unsupported": "upstream_unsupported", "none": "upstream_none",
                     "not attempted": "upstream_not_attempted"}


@dataclass(frozen=True, slots=True)
class Revocation:
    user: str
    provider: str
    # "revoked", "pending", "unsupported" (no endpoint configured), "none" (the provider
    # has no per-grant revocation), "not attempted", "skipped (dry run)"
    upstream: str
    detail: str
    removed: bool  # deleted from the vault (or already gone)
    invalidated: bool = True  # every replica was told to forget it (Redis reachable)
    marked: bool = True  # marked revoked in the vault (False: the vault was unreachable)
    corrupt: bool = False  # the record failed authentication: its tokens were unreadable

    @property
    def ok(self) -> bool:
        if self.upstream == "skipped (dry run)":
            return True
        return (self.upstream in ("revoked", "unsupported", "none") and self.removed
                and self.invalidated)

    @property
    def problems(self) -> list[str]:
        """What is still to do, in words, for the CLI and the audit record."""
        out = []
        if not self.marked:
            return ["nothing changed (vault unreachable); run it again"]
        if self.corrupt:
            out.append("corrupt record: its tokens could not be read, revoke them at the "
                       "provider")
        if self.upstream == "pending":
            out.append("upstream revocation pending")
        if not self.removed:
            out.append("local removal failed")
        if not self.invalidated:
            out.append("replica cache invalidation pending")
        return out


class Offboarder:
    async def _mcp_bound(self, provider: ProviderSettings, grant: Grant,
                         configured_secret: Secret | None
                         ) -> tuple[ProviderSettings | None, Secret | None, str, str]:
        """An mcp grant's revocation endpoint (RFC 7009, from the authorization server's
        metadata, proxy.mcpauth) with the client that minted it and that client's secret;
        None and why when discovery fails or the server's issuer is no longer the
        grant's."""
        assert provider.mcp is not None
        client_id = grant.values.get("mcp_client_id")
        try:
            server = await shared_discovery(self._provider_client).discover(
                provider.mcp, allow_http=provider.allow_http, issuer=provider.issuer)
        except McpDiscoveryError as exc:
            return None, None, "pending", (f"discovery for {provider.id} failed "
                                           f"({exc.detail}); revoke at the provider by its "
                                           "own means")
        if server.issuer != grant.values.get("mcp_issuer") or not isinstance(client_id, str):
            return None, None, "pending", (f"{provider.id}'s authorization server is no "
                                           "longer the one that minted the grant; revoke "
                                           "there by its own means")
        bound, secret = grant_client(provider, server, grant, configured_secret)
        return bound, secret, "", ""

    def __init__(self, live: LiveConfig, vault: Vault, coordinator: Coordinator,
                 audit: AuditLog, *, verify: ssl.SSLContext | bool = True, settle: float = 0.6,
                 client: ProviderClient | None = None) -> None:
        """``live``: the running configuration; each :meth:`revoke` runs on one snapshot
        of it (providers, client secrets, retries: ``refresh``). ``client``: the process's
        provider client; without one, the offboarder makes and closes its own."""
        self._settle = settle
        self._live = live
        self._vault = vault
        self._coord = coordinator
        self._audit = audit
        self._owns_client = client is None
        self._provider_client = client or ProviderClient(live, verify=verify)

    async def plan(self, user: str, provider: str | None = None) -> list[GrantInfo]:
        grants = await self._vault.list(user)
        return [g for g in grants if provider is None or g.provider == provider]

    async def revoke(self, user: str, provider: str | None = None, *,
                     dry_run: bool = False, actor: Actor | None = None) -> list[Revocation]:
        """Revoke ``user``'s grants (of ``provider`` only, when given); ``actor``: who
        asked (:func:`proxy.audit.cli_actor` for ``credproxy revoke``, ``Actor("user",
        user)`` for a disconnect from the self-service page), written in every audit record
        of this revocation."""
        token = _ACTOR.set(actor)
        try:
            with self._live.pinned() as config:
                return await self._revoke(config, user, provider, dry_run)
        finally:
            _ACTOR.reset(token)

    async def _revoke(self, config: Snapshot, user: str, provider: str | None,
                      dry_run: bool) -> list[Revocation]:
        results = []
        for info in await self.plan(user, provider):
            corrupt = info.status is GrantStatus.CORRUPT
            if dry_run:
                results.append(Revocation(user, info.provider, "skipped (dry run)",
                                          "would delete the corrupt record" if corrupt
                                          else "would revoke", removed=False, corrupt=corrupt))
                continue
            results.append(await (self._remove_corrupt(user, info.provider, info.version)
                                  if corrupt else
                                  self._revoke_one(config, user, info.provider, info.version)))
        if provider is None and not dry_run:
            pending = [f"{r.provider} ({', '.join(r.problems)})" for r in results if not r.ok]
            self._audit.record(auditlog.USER_OFFBOARDED, user=user,
                               outcome="pending" if pending else "offboarded",
                               reason="pending" if pending else None,
                               detail="; ".join(pending) if pending else None,
                               actor=_ACTOR.get())
        return results

    async def _revoke_one(self, config: Snapshot, user: str, provider_id: str,
                          version: int = 0) -> Revocation:
        # 1. Stop every process from using it, before anything else. Under the grant's
        # refresh lock: a refresh in flight on any replica finishes (and stores its rotated
        # tokens) first, so the tokens revoked below are the newest ones, and no refresh can
        # start afterwards (it re-reads the vault under the lock and finds the mark).
        try:
            try:
                async with self._coord.lock(user, provider_id):
                    grant, invalidated = await self._mark(user, provider_id)
            except CoordinationUnavailable:
                # Without the lock a refresh may still be running: the vault's conditional
                # write refuses to store its tokens over the mark, so it cannot come back.
                grant, _ = await self._mark(user, provider_id)
                invalidated = False
        except VaultCorruptError:  # it failed authentication after it was listed
            return await self._remove_corrupt(user, provider_id, version)
        except VaultError as exc:
            return self._finish(Revocation(user, provider_id, "not attempted",
                                           f"vault unavailable: {exc}", removed=False,
                                           marked=False), None)
        if grant is None:
            return Revocation(user, provider_id, "revoked", "already gone", removed=True,
                              invalidated=invalidated)
        # Proxies sharing a local vault notice the mark by polling its epoch (every 0.25 s):
        # give them that long before the tokens are revoked, so none is injected after.
        await asyncio.sleep(self._settle)
        provider = next((p for p in config.settings.providers if p.id == provider_id), None)
        # 2. Revoke upstream.
        console: str | None = None
        if provider is None:
            upstream, detail = "unsupported", (
                "the provider is no longer configured; revoke at the provider by its own "
                "means")
        else:
            try:
                # The endpoints of this grant's tenant (a revocation URL per org or shop).
                bound = provider.for_grant(grant.values)
                if bound.revocation_url is not None and "revocation_url" in bound.unrendered():
                    raise BindingError("grant_value_missing",
                                       "the revocation URL needs a value the grant lacks")
            except BindingError as exc:
                bound = None
                upstream, detail = "pending", (
                    f"the grant lacks a value its revocation URL needs ({exc.detail}); "
                    "revoke at the provider by its own means")
            secret = None if bound is None else config.client_secret(bound)
            if bound is not None and provider.mcp is not None:
                bound, secret, upstream, detail = await self._mcp_bound(provider, grant,
                                                                        secret)
            if bound is not None:
                tokens = await self._live_tokens(bound, secret, grant)
                revoked = await self._provider_client.revoke(bound, secret, tokens)
                upstream, detail, console = (revoked.upstream, revoked.detail,
                                             revoked.console_url)
        # 3. Remove it locally, whatever the provider said.
        removed = True  # deleted now, or already gone
        try:
            await self._vault.delete(user, provider_id)
        except VaultError as exc:
            removed = False
            detail = f"{detail}; local delete failed ({exc}): the grant stays marked " \
                     "for re-authorization and is never injected"
        else:
            if upstream == "none":
                detail = (f"{detail}; local removal done; revoke the app's access at "
                          f"{console or 'the provider admin console'}")
        # Key Vault says whether the secret was purged or is retained (soft delete).
        disposal = getattr(self._vault, "disposal", {}).pop((user, provider_id), None)
        if disposal:
            detail = f"{detail}; stored secret {disposal}"
        if not invalidated:
            detail = f"{detail}; Redis unreachable: other replicas were not told, their " \
                     "shared-cache copy lapses at the access token's expiry"
        return self._finish(Revocation(user, provider_id, upstream, detail, removed,
                                       invalidated), grant.tokens.access_token)

    async def _live_tokens(self, provider: ProviderSettings, client_secret: Secret | None,
                           grant: Grant) -> TokenSet:
        """The tokens to revoke. A provider that revokes with the access token only
        (:func:`proxy.provider_client.revokes_with_access_token`) would refuse an expired
        one and leave the refresh token alive: refresh it first (the grant is already
        marked, so nothing injects the new token), and revoke the new access token. A
        refresh that fails (the grant is dead already) leaves the old tokens to revoke."""
        tokens = grant.tokens
        if not (revokes_with_access_token(provider, tokens)
                and tokens.expires_within(0, now=time.time())):
            return tokens
        assert tokens.refresh_token is not None
        try:
            fresh = await self._provider_client.refresh(provider, client_secret,
                                                        tokens.refresh_token)
        except Exception as exc:  # noqa: BLE001 - any failure: revoke what there is
            log.info("offboarding %s/%s: refreshing the expired access token before "
                     "revocation failed (%s); revoking the stored one", grant.user,
                     provider.id, type(exc).__name__)
            return tokens
        return fresh.merged_refresh(tokens)

    async def _mark(self, user: str, provider_id: str) -> tuple[Grant | None, bool]:
        grant = await self._vault.get(user, provider_id)
        if grant is None:
            return None, True
        marked = await self._vault.mark_reauth(user, provider_id, "revoked")
        return grant, await self._forget(user, provider_id,
                                         marked.version if marked else grant.version)

    async def _forget(self, user: str, provider_id: str, version: int) -> bool:
        """Drop the grant from the shared cache and tell every replica; False when Redis
        could not be reached."""
        try:
            await self._coord.cache_forget((user, provider_id), version)
            await self._coord.publish_invalidation(user, provider_id)
        except CoordinationUnavailable:
            return False
        return True

    async def _remove_corrupt(self, user: str, provider_id: str, version: int) -> Revocation:
        """A record that fails authentication cannot be marked (that re-seals it) and its
        tokens cannot be revoked upstream (they are unreadable): delete it, make every
        replica forget any copy it still holds, and report the tokens as the operator's to
        revoke at the provider. Exits non-zero (``ok`` is False). ``version``: the record's
        (unauthenticated) version, for the shared cache to refuse anything not newer."""

        async def remove() -> bool:
            await self._vault.delete(user, provider_id)
            return await self._forget(user, provider_id, version)

        try:
            try:
                async with self._coord.lock(user, provider_id):
                    invalidated = await remove()
            except CoordinationUnavailable:  # no lock, and no replica can be told
                await remove()
                invalidated = False
        except VaultError as exc:
            return self._finish(Revocation(user, provider_id, "not attempted",
                                           f"corrupt record; vault unavailable: {exc}",
                                           removed=False, marked=False, corrupt=True), None)
        detail = ("the vault record failed authentication (tampered or damaged), so its "
                  "tokens could not be read or revoked at the provider: revoke them there "
                  "by its own means; the record was deleted")
        return self._finish(Revocation(user, provider_id, "not attempted", detail,
                                       removed=True, invalidated=invalidated, corrupt=True),
                            None)

    def _finish(self, result: Revocation, token: Secret | None) -> Revocation:
        self._audit.record(auditlog.CONNECTION_REVOKED, user=result.user,
                           provider=result.provider,
                           outcome="revoked" if result.ok else "pending",
                           reason=_UPSTREAM_REASONS.get(result.upstream, "upstream_pending"),
                           detail=result.detail,
                           token=token, token_source="vault" if token else None,
                           actor=_ACTOR.get())
        return result

    async def aclose(self) -> None:
        if self._owns_client:
            await self._provider_client.aclose()
