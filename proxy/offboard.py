"""Offboarding: revoke a user's grants upstream (RFC 7009), delete them, forget them
everywhere, and audit it.

Order per grant, chosen so nothing can be injected afterwards: mark the grant for re-auth
in the vault (every process stops serving it: the vault's epoch changes and, with Redis, an
invalidation is published), then revoke upstream (refresh token first: for most providers
that ends the whole grant, then the access token), then delete it. An upstream revocation
that still fails after retries leaves the local removal in place and is reported as
pending, with a non-zero exit status and an audit record.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import httpx2

from proxy import audit as auditlog
from proxy.audit import AuditLog
from proxy.coordination.base import Coordinator
from proxy.errors import CoordinationUnavailable, VaultError
from proxy.refresh import oauth_client
from proxy.secret import Secret
from proxy.settings import ProviderSettings, Settings
from proxy.vault.base import GrantInfo, Vault

_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Revocation:
    user: str
    provider: str
    upstream: str  # "revoked", "pending", "unsupported", "skipped (dry run)"
    detail: str
    removed: bool

    @property
    def ok(self) -> bool:
        return self.upstream in ("revoked", "unsupported", "skipped (dry run)")


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
            if dry_run:
                results.append(Revocation(user, info.provider, "skipped (dry run)",
                                          "would revoke", removed=False))
                continue
            results.append(await self._revoke_one(user, info.provider))
        if provider is None and not dry_run:
            pending = [r.provider for r in results if not r.ok]
            self._audit.record(auditlog.USER_OFFBOARDED, user=user,
                               outcome="pending" if pending else "offboarded",
                               reason=f"upstream revocation pending: {', '.join(pending)}"
                               if pending else None)
        return results

    async def _revoke_one(self, user: str, provider_id: str) -> Revocation:
        grant = await self._vault.get(user, provider_id)
        if grant is None:
            return Revocation(user, provider_id, "revoked", "already gone", removed=True)
        # 1. Stop every process from using it, before anything else.
        marked = await self._vault.mark_reauth(user, provider_id, "revoked")
        try:
            await self._coord.cache_forget((user, provider_id),
                                           marked.version if marked else grant.version)
            await self._coord.publish_invalidation(user, provider_id)
        except CoordinationUnavailable:
            pass  # the vault mark (and its epoch) still stops every replica
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
        try:
            removed = await self._vault.delete(user, provider_id)
        except VaultError:
            removed = False
        # Key Vault says whether the secret was purged or is retained (soft delete).
        disposal = getattr(self._vault, "disposal", {}).pop((user, provider_id), None)
        if disposal:
            detail = f"{detail}; stored secret {disposal}"
        result = Revocation(user, provider_id, upstream, detail, removed)
        self._audit.record(auditlog.CONNECTION_REVOKED, user=user, provider=provider_id,
                           outcome="revoked" if result.ok else "pending",
                           reason=f"upstream {upstream}: {detail}"[:300],
                           token=grant.tokens.access_token, token_source="vault")
        return result

    async def _revoke_upstream(self, provider: ProviderSettings, refresh: Secret | None,
                               access: Secret) -> tuple[str, str]:
        assert provider.revocation_url is not None
        client = oauth_client(provider, self._client_secret(provider), self._transport,
                              self.settings.refresh.timeout)
        tokens = [(t, hint) for t, hint in ((refresh, "refresh_token"), (access, "access_token"))
                  if t is not None]
        for token, hint in tokens:
            last = ""
            delay = self._backoff
            for attempt in range(1, _ATTEMPTS + 1):
                try:
                    resp = await client.revoke_token(provider.revocation_url,
                                                     token=token.reveal(),
                                                     token_type_hint=hint)
                    # RFC 7009 2.2: 200 for revoked and for unknown tokens alike.
                    if resp.status_code == 200:
                        break
                    last = f"HTTP {resp.status_code}"
                    if resp.status_code < 500 and resp.status_code != 429:
                        return "pending", f"{hint} revocation refused ({last})"
                except httpx2.HTTPError as exc:
                    last = type(exc).__name__
                if attempt < _ATTEMPTS:
                    await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311
                    delay *= 2
            else:
                return "pending", f"{hint} revocation failed after {_ATTEMPTS} attempts ({last})"
        return "revoked", "refresh and access tokens revoked (RFC 7009)"

    async def aclose(self) -> None:
        await self._transport.aclose()
