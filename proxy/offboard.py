"""Offboarding: revoke a user's grants upstream (RFC 7009), delete them, forget them
everywhere, and audit it.

Order per grant, chosen so nothing can be injected afterwards (with Redis, or processes on
one local vault file; Key Vault without Redis learns of it within 5 s): under the grant's
refresh lock, mark it for re-auth in the vault (every process stops serving it: the vault's epoch
changes and, with Redis, the shared cache entry is dropped and an invalidation published),
then revoke upstream (refresh token first: for most providers that ends the whole grant;
then the access token, whatever happened to the first), then delete it. Anything that still
fails after retries (upstream revocation, local delete, the Redis broadcast) leaves the
rest done and is reported as pending, with a non-zero exit status and an audit record.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx2

from proxy import audit as auditlog
from proxy.audit import AuditLog
from proxy.coordination.base import Coordinator
from proxy.errors import CoordinationUnavailable, VaultCorruptError, VaultError
from proxy.refresh import oauth_client
from proxy.secret import Secret
from proxy.settings import ProviderSettings, Settings
from proxy.vault.base import Grant, GrantInfo, GrantStatus, Vault

_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Revocation:
    user: str
    provider: str
    upstream: str  # "revoked", "pending", "unsupported", "not attempted", "skipped (dry run)"
    detail: str
    removed: bool  # deleted from the vault (or already gone)
    invalidated: bool = True  # every replica was told to forget it (Redis reachable)
    marked: bool = True  # marked revoked in the vault (False: the vault was unreachable)
    corrupt: bool = False  # the record failed authentication: its tokens were unreadable

    @property
    def ok(self) -> bool:
        if self.upstream == "skipped (dry run)":
            return True
        return self.upstream in ("revoked", "unsupported") and self.removed and self.invalidated

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
    def __init__(self, settings: Settings, vault: Vault, coordinator: Coordinator,
                 audit: AuditLog, *, client_secret: Callable[[ProviderSettings], Secret | None],
                 verify: ssl.SSLContext | bool = True, backoff: float = 0.5,
                 settle: float = 0.6) -> None:
        self._settle = settle
        self.settings = settings
        self._vault = vault
        self._coord = coordinator
        self._audit = audit
        self._client_secret = client_secret
        self._transport = httpx2.AsyncHTTPTransport(verify=verify, retries=0)
        self._backoff = backoff

    async def plan(self, user: str, provider: str | None = None) -> list[GrantInfo]:
        grants = await self._vault.list(user)
        return [g for g in grants if provider is None or g.provider == provider]

    async def revoke(self, user: str, provider: str | None = None, *,
                     dry_run: bool = False) -> list[Revocation]:
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
                                  self._revoke_one(user, info.provider, info.version)))
        if provider is None and not dry_run:
            pending = [f"{r.provider} ({', '.join(r.problems)})" for r in results if not r.ok]
            self._audit.record(auditlog.USER_OFFBOARDED, user=user,
                               outcome="pending" if pending else "offboarded",
                               reason=f"pending: {'; '.join(pending)}"[:300]
                               if pending else None)
        return results

    async def _revoke_one(self, user: str, provider_id: str, version: int = 0) -> Revocation:
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
        provider = next((p for p in self.settings.providers if p.id == provider_id), None)
        # 2. Revoke upstream.
        if provider is None or provider.revocation_url is None:
            upstream, detail = "unsupported", (
                "no RFC 7009 revocation endpoint configured; revoke at the provider by its "
                "own means (e.g. Microsoft Entra: revokeSignInSessions)")
        else:
            upstream, detail = await self._revoke_upstream(provider, grant.tokens.refresh_token,
                                                           grant.tokens.access_token)
        # 3. Remove it locally, whatever the provider said.
        removed = True  # deleted now, or already gone
        try:
            await self._vault.delete(user, provider_id)
        except VaultError as exc:
            removed = False
            detail = f"{detail}; local delete failed ({exc}): the grant stays marked " \
                     "for re-authorization and is never injected"
        # Key Vault says whether the secret was purged or is retained (soft delete).
        disposal = getattr(self._vault, "disposal", {}).pop((user, provider_id), None)
        if disposal:
            detail = f"{detail}; stored secret {disposal}"
        if not invalidated:
            detail = f"{detail}; Redis unreachable: other replicas were not told, their " \
                     "shared-cache copy lapses at the access token's expiry"
        return self._finish(Revocation(user, provider_id, upstream, detail, removed,
                                       invalidated), grant.tokens.access_token)

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
                           reason=f"upstream {result.upstream}: {result.detail}"[:300],
                           token=token, token_source="vault" if token else None)
        return result

    async def _revoke_upstream(self, provider: ProviderSettings, refresh: Secret | None,
                               access: Secret) -> tuple[str, str]:
        assert provider.revocation_url is not None
        client = oauth_client(provider, self._client_secret(provider), self._transport,
                              self.settings.refresh.timeout)
        tokens = [(t, hint) for t, hint in ((refresh, "refresh_token"), (access, "access_token"))
                  if t is not None]
        failures = []
        # Each token on its own: a failed refresh-token revocation must not leave the
        # access token unrevoked (the local copies are deleted next, so there is no later).
        for token, hint in tokens:
            failure = await self._revoke_token(client, provider.revocation_url, token, hint)
            if failure:
                failures.append(failure)
        if failures:
            return "pending", "; ".join(failures)
        return "revoked", "refresh and access tokens revoked (RFC 7009)"

    async def _revoke_token(self, client: Any, url: str, token: Secret, hint: str) -> str | None:
        """None when revoked, else why not (after retries for 5xx, 429 and network errors)."""
        last = ""
        delay = self._backoff
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                resp = await client.revoke_token(url, token=token.reveal(), token_type_hint=hint)
                # RFC 7009 2.2: 200 for revoked and for unknown tokens alike.
                if resp.status_code == 200:
                    return None
                last = f"HTTP {resp.status_code}"
                if resp.status_code < 500 and resp.status_code != 429:
                    return f"{hint} revocation refused ({last})"
            except httpx2.HTTPError as exc:
                last = type(exc).__name__
            if attempt < _ATTEMPTS:
                await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311
                delay *= 2
        return f"{hint} revocation failed after {_ATTEMPTS} attempts ({last})"

    async def aclose(self) -> None:
        await self._transport.aclose()
