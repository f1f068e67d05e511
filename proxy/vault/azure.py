"""Azure Key Vault as the vault, through azure-keyvault-secrets' async ``SecretClient``.

Naming: one secret per grant, ``cp-<40 hex>``, the hex an HMAC-SHA256 of (user, provider)
under a key derived from the vault key. That fits Key Vault's rules (1-127 chars of
``0-9a-zA-Z-``) for any user id and provider id, is collision-free in practice, and puts no
user id in a name (names may be replicated and logged by Azure). Tags: ``credproxy-provider``
(the provider id) and ``credproxy-user`` (a keyed hash of the user id: ``credproxy
connections --user`` and ``credproxy revoke --user`` find a user's secrets by it). The value
is JSON (content type ``application/json``): the token set plus user, provider, status,
reason, update time and version.

Deletion: Key Vault soft-deletes. A revoked grant's name stays reserved until it is purged
or its retention ends; connecting the same user again then meets 409
``ObjectIsDeletedButRecoverable``, which :meth:`put` resolves by purging (when allowed) or
recovering the deleted secret and overwriting it. With ``purge_on_delete`` the secret is
purged right after deletion; with purge protection on, Key Vault refuses the purge and the
deleted secret (still encrypted, unusable by credproxy) stays until its scheduled purge date.

Reliability (:class:`VaultRetryPolicy`): one vault call makes at most 3 tries and ends
within ``vault.timeout`` (default 10 s), waits included, since a refresh may be holding the
user's lock meanwhile. 429, 5xx and network errors are retried after an exponential backoff
with jitter (0.25 s, then 0.5 s, ... scaled by a random factor in [0.1, 1]: never at once,
never in step with other replicas); a ``Retry-After`` (seconds or an HTTP date, or
``x-ms-retry-after-ms``) is honoured when it fits the call's remaining time and 30 s, and
otherwise fails the call at once. Every failure that remains is :class:`VaultUnavailable`, so
a request fails closed (503 credential-store-unavailable) rather than going out without
credentials. A write that meets a name still being deleted (409 ``ObjectIsBeingDeleted``,
right after a purge) waits with backoff until the name is free, for at most
``RECLAIM_DEADLINE`` seconds.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import hmac
import json
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceResponseTimeoutError,
)
from azure.core.pipeline.policies import AsyncRetryPolicy

from proxy.errors import VaultCorruptError, VaultUnavailable
from proxy.tokenset import TokenSetError
from proxy.vault.base import (
    Grant,
    GrantChanged,
    GrantInfo,
    GrantStatus,
    corrupt_info,
    grant_from_record,
    grant_record,
    info,
    next_version,
)
from proxy.vault.keys import derive_subkey

log = logging.getLogger("credproxy.vault.azure")

TAG_PROVIDER = "credproxy-provider"
TAG_USER = "credproxy-user"
_PREFIX = "cp-"
_EPOCH = "credproxy-epoch"  # outside the cp- names of grants (and of the probe secret)
TRIES = 3  # per vault call, the first included
BACKOFF_BASE = 0.25  # seconds before the first retry (at most; jittered)
BACKOFF_MAX = 4.0
RETRY_AFTER_MAX = 30.0  # a longer Retry-After fails the call at once
RECLAIM_DEADLINE = 30.0  # seconds a write waits for a name being deleted (after a purge)


class VaultRetryPolicy(AsyncRetryPolicy[Any, Any]):
    """azure-core's async retry policy, bounded: at most ``tries`` tries within ``deadline``
    seconds in all; backoff with jitter and a non-zero first delay (azure-core's retries
    the first failure at once); ``Retry-After`` honoured only up to ``retry_after_max`` and
    the time left (otherwise the error is returned at once, for the caller to fail fast)."""

    def __init__(self, *, deadline: float, tries: int = TRIES, base: float = BACKOFF_BASE,
                 backoff_max: float = BACKOFF_MAX,
                 retry_after_max: float = RETRY_AFTER_MAX) -> None:
        n = tries - 1
        super().__init__(retry_total=n, retry_connect=n, retry_read=n, retry_status=n,
                         retry_backoff_factor=base, retry_backoff_max=backoff_max,
                         timeout=deadline)
        self.deadline = deadline
        self.retry_after_max = retry_after_max

    def configure_retries(self, options: dict[str, Any]) -> dict[str, Any]:
        settings: dict[str, Any] = super().configure_retries(options)
        settings["deadline"] = time.monotonic() + float(settings["timeout"])
        return settings

    @staticmethod
    def _left(settings: dict[str, Any]) -> float:
        return max(0.0, float(settings["deadline"]) - time.monotonic())

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        failures = max(1, len(settings["history"]))
        ceiling = min(float(settings["max_backoff"]),
                      float(settings["backoff"]) * 2.0 ** (failures - 1))
        delay = ceiling * random.uniform(0.1, 1.0)  # noqa: S311 - jitter, not a secret
        return min(delay, self._left(settings))

    def is_retry(self, settings: dict[str, Any], response: Any) -> bool:
        if response.http_response.status_code >= 400:
            wait = self.get_retry_after(response)
            if wait is not None and wait > min(self.retry_after_max, self._left(settings)):
                return False  # the error goes back to the caller now, not in an hour
        return bool(super().is_retry(settings, response))

    async def send(self, request: Any) -> Any:
        try:
            return await asyncio.wait_for(super().send(request), self.deadline)
        except TimeoutError:
            raise ServiceResponseTimeoutError(
                f"no answer within {self.deadline:g} s ({TRIES} tries at most)") from None


class FileTokenCredential:
    """An async azure-core token credential that reads a bearer token from a file on each
    use (see ``vault.token_file``)."""

    def __init__(self, path: str) -> None:
        self._path = path

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.credentials import AccessToken

        try:
            with open(self._path, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise VaultUnavailable(f"vault.token_file unreadable: {exc.strerror}") from exc
        return AccessToken(token, int(time.time()) + 300)

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> FileTokenCredential:
        return self

    async def __aexit__(self, *args: object) -> None:
        return None


def secret_name(naming_key: bytes, user: str, provider: str) -> str:
    digest = hmac.new(naming_key, f"{user}\x00{provider}".encode(), hashlib.sha256)
    return _PREFIX + digest.hexdigest()[:40]


def user_tag(naming_key: bytes, user: str) -> str:
    return hmac.new(naming_key, f"user\x00{user}".encode(), hashlib.sha256).hexdigest()[:32]


class AzureKeyVault:
    """A :class:`proxy.vault.base.Vault` on Azure Key Vault."""

    def __init__(self, client: Any, *, vault_key: bytes, purge_on_delete: bool = False,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Any] = asyncio.sleep,
                 polling_interval: float = 2.0, credential: Any = None) -> None:
        self._client = client
        self._credential = credential
        self._naming = derive_subkey(vault_key, "azure key vault names")
        self._purge = purge_on_delete
        self._clock = clock
        self._sleep = sleep
        self._poll = polling_interval
        self.writes_failed = 0  # for metrics/tests
        # What happened to each deleted grant's secret (purged, or retained until when),
        # for the offboarding audit record.
        self.disposal: dict[tuple[str, str], str] = {}

    @classmethod
    def from_url(cls, url: str, *, vault_key: bytes, credential: Any = None,
                 purge_on_delete: bool = False, timeout: float = 10.0,
                 connection_verify: str | bool = True,
                 clock: Callable[[], float] = time.time, polling_interval: float = 2.0,
                 **kw: Any) -> AzureKeyVault:
        from azure.keyvault.secrets.aio import SecretClient

        if credential is None:
            # Workload identity (AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE),
            # managed identity and developer logins, with no code change.
            from azure.identity.aio import DefaultAzureCredential

            credential = DefaultAzureCredential()
        # ``timeout`` bounds a whole call (every try and wait); one try gets half of it.
        client = SecretClient(
            vault_url=url, credential=credential,
            retry_policy=VaultRetryPolicy(deadline=timeout),
            connection_timeout=timeout / 2, read_timeout=timeout / 2,
            connection_verify=connection_verify,
            **kw)
        return cls(client, vault_key=vault_key, purge_on_delete=purge_on_delete,
                   credential=credential, clock=clock, polling_interval=polling_interval)

    def name(self, user: str, provider: str) -> str:
        return secret_name(self._naming, user, provider)

    # -- Vault protocol ------------------------------------------------------------------
    async def get(self, user: str, provider: str) -> Grant | None:
        name = self.name(user, provider)
        try:
            secret = await self._client.get_secret(name)
        except ResourceNotFoundError:
            return None
        except (AzureError, OSError) as exc:
            raise VaultUnavailable(f"key vault read failed: {_why(exc)}") from exc
        return self._decode(secret.value, user, provider)

    async def put(self, grant: Grant, *, expected_version: int | None = None) -> Grant:
        # Key Vault has no conditional write: this check-then-set is exact only under the
        # coordinator's per-grant lock, which refreshes and revocations both hold.
        current = await self.get(grant.user, grant.provider)
        if expected_version is not None and (
            current is None or current.version != expected_version
            or current.status is not GrantStatus.ACTIVE
        ):
            raise GrantChanged(f"{grant.user}/{grant.provider} changed since version "
                               f"{expected_version}")
        now = self._clock()
        stored = replace(grant, updated_at=now,
                         version=next_version(current.version if current else None, now))
        await self._write(stored)
        if expected_version is None and current is not None:
            # Replaced outside a refresh (a reconnect, an import): tell other processes.
            await self._bump_epoch()
        return stored

    async def mark_reauth(self, user: str, provider: str, reason: str) -> Grant | None:
        current = await self.get(user, provider)
        if current is None:
            return None
        marked = replace(current, status=GrantStatus.REAUTH_REQUIRED, reason=reason,
                         updated_at=self._clock(), version=current.version + 1)
        await self._write(marked)
        await self._bump_epoch()
        return marked

    async def delete(self, user: str, provider: str) -> bool:
        name = self.name(user, provider)
        try:
            deleted = await self._client.delete_secret(name, _polling_interval=self._poll)
        except ResourceNotFoundError:
            return False
        except (AzureError, OSError) as exc:
            raise VaultUnavailable(f"key vault delete failed: {_why(exc)}") from exc
        until = getattr(deleted, "scheduled_purge_date", None)
        retained = f"soft-deleted, retained until {until:%Y-%m-%d}" if until else "soft-deleted"
        if self._purge:
            purged = await self._purge_deleted(name)
            retained = "purged" if purged else f"purge refused (purge protection); {retained}"
        self.disposal[(user, provider)] = retained
        await self._bump_epoch()
        return True

    async def list(self, user: str | None = None) -> builtins.list[GrantInfo]:
        want = user_tag(self._naming, user) if user is not None else None
        out: builtins.list[GrantInfo] = []
        try:
            async for props in self._client.list_properties_of_secrets():
                tags = props.tags or {}
                if not props.name.startswith(_PREFIX) or TAG_USER not in tags:
                    continue
                if want is not None and tags.get(TAG_USER) != want:
                    continue
                secret = await self._client.get_secret(props.name)
                try:
                    data = self._json(secret.value)
                    grant = self._decode(secret.value, str(data.get("user")),
                                         str(data.get("provider")))
                except VaultCorruptError:
                    # One damaged secret must not hide the others, nor block the fix
                    # (revoke deletes it): listed as corrupt, nothing read from inside it.
                    # Its tags still say whose (a keyed hash) and which provider.
                    log.error("key vault secret %s is corrupt; listed as such", props.name)
                    updated = props.updated_on.timestamp() if props.updated_on else 0.0
                    out.append(corrupt_info(f"#{tags.get(TAG_USER, '?')}",
                                            tags.get(TAG_PROVIDER, "?"),
                                            updated_at=updated, version=0))
                    continue
                out.append(info(grant))
        except (AzureError, OSError) as exc:
            raise VaultUnavailable(f"key vault list failed: {_why(exc)}") from exc
        return sorted(out, key=lambda g: (g.user, g.provider))

    async def check(self) -> None:
        """Write and read back a probe secret: proves the identity's set and get
        permissions (what a connect and a refresh need)."""
        name = _PREFIX + "probe"
        marker = secrets.token_hex(8)
        for op in ("set", "get"):
            try:
                if op == "set":
                    await self._client.set_secret(
                        name, json.dumps({"probe": self._clock(), "marker": marker}),
                        content_type="application/json")
                else:
                    got = await self._client.get_secret(name)
            except HttpResponseError as exc:
                if exc.status_code == 403:
                    raise VaultUnavailable(
                        f"key vault refused to {op} the probe secret {name}: this identity "
                        f"lacks the secrets {op} permission (grant the 'Key Vault Secrets "
                        f"Officer' role or get/set/list/delete access): {_why(exc)}") from exc
                raise VaultUnavailable(f"key vault probe failed: {_why(exc)}") from exc
            except (AzureError, OSError) as exc:
                raise VaultUnavailable(f"key vault probe failed: {_why(exc)}") from exc
        if marker not in (got.value or ""):
            raise VaultUnavailable("key vault probe: the secret read back is not the one "
                                   "just written")

    # Without Redis, processes learn of revocations by polling this one small secret (its
    # version changes on every mark and delete); with Redis they are told, and don't poll.
    epoch_interval = 5.0

    async def epoch(self) -> int:
        try:
            secret = await self._client.get_secret(_EPOCH)
        except ResourceNotFoundError:
            return 0
        except (AzureError, OSError) as exc:
            raise VaultUnavailable(f"key vault read failed: {_why(exc)}") from exc
        marker = (secret.properties.version or "") + (secret.value or "")
        return int.from_bytes(hashlib.sha256(marker.encode()).digest()[:8], "big")

    async def _bump_epoch(self) -> None:
        try:
            await self._client.set_secret(_EPOCH, secrets.token_hex(8),
                                          content_type="text/plain")
        except (AzureError, OSError) as exc:
            log.warning("revocation marker not updated (%s): processes without Redis notice "
                        "the revocation when their cached token expires", _why(exc))

    async def ping(self) -> None:
        """A cheap authorized read for readiness: the probe secret (absent is fine)."""
        try:
            await self._client.get_secret(_PREFIX + "probe")
        except ResourceNotFoundError:
            return
        except (AzureError, OSError) as exc:
            raise VaultUnavailable(f"key vault unreachable: {_why(exc)}") from exc

    async def close(self) -> None:
        await self._client.close()
        if self._credential is not None and hasattr(self._credential, "close"):
            await self._credential.close()
        # aiohttp closes TLS connections without waiting for their shutdown to finish; an
        # event loop that ends right after (a CLI command) would leak the sockets. A short
        # pause lets the close_notify round trip complete (aiohttp's own advice).
        await asyncio.sleep(0.25)

    # -- internals -----------------------------------------------------------------------
    async def _write(self, grant: Grant) -> None:
        name = self.name(grant.user, grant.provider)
        value = json.dumps({
            "user": grant.user, "provider": grant.provider, "status": grant.status.value,
            "reason": grant.reason, "updated_at": grant.updated_at, "version": grant.version,
            "tokens": grant_record(grant),
        })
        tags = {TAG_PROVIDER: grant.provider, TAG_USER: user_tag(self._naming, grant.user)}
        # Transient errors were already retried by VaultRetryPolicy (bounded); this loop
        # only gets a soft-deleted name back (a revoked grant being reconnected).
        deadline = time.monotonic() + RECLAIM_DEADLINE
        delay, reclaims = BACKOFF_BASE, 0
        while True:
            try:
                await self._client.set_secret(name, value, content_type="application/json",
                                              tags=tags)
                return
            except ResourceExistsError as exc:
                if _inner_code(exc) != "ObjectIsBeingDeleted" and reclaims < TRIES:
                    # Deleted but recoverable: purge (when configured) or recover it, then
                    # overwrite; a purged name is "being deleted" for a while.
                    reclaims += 1
                    await self._reclaim(name)
                    continue
                wait = delay * random.uniform(0.5, 1.0)  # noqa: S311 - jitter
                if time.monotonic() + wait > deadline:
                    self.writes_failed += 1
                    raise VaultUnavailable(
                        f"key vault write failed: the name was still being deleted after "
                        f"{RECLAIM_DEADLINE:g} s ({_why(exc)})") from exc
                await self._sleep(wait)
                delay = min(delay * 2, BACKOFF_MAX)
            except (AzureError, OSError) as exc:
                self.writes_failed += 1
                raise VaultUnavailable(f"key vault write failed: {_why(exc)}") from exc

    async def _reclaim(self, name: str) -> None:
        if self._purge and await self._purge_deleted(name):
            return
        try:
            await self._client.recover_deleted_secret(name, _polling_interval=self._poll)
        except ResourceNotFoundError:
            return  # purged meanwhile, or not yet listed as deleted: the next set tells
        except (AzureError, OSError) as err:
            raise VaultUnavailable(f"key vault recover failed: {_why(err)}") from err

    async def _purge_deleted(self, name: str) -> bool:
        try:
            await self._client.purge_deleted_secret(name)
            return True
        except HttpResponseError as exc:
            if exc.status_code == 403:
                # Purge protection: the deleted secret is kept until its scheduled purge
                # date; it is encrypted and never read by credproxy again.
                log.warning("purge of %s refused (purge protection?): %s", name, _why(exc))
                return False
            if exc.status_code == 404:
                return False
            raise VaultUnavailable(f"key vault purge failed: {_why(exc)}") from exc

    def _decode(self, value: str | None, user: str, provider: str) -> Grant:
        data = self._json(value)
        try:
            if data.get("user") != user or data.get("provider") != provider:
                raise VaultCorruptError(f"key vault secret for {user!r}/{provider!r} belongs "
                                        "to another grant")
            return grant_from_record(data["tokens"], user=user, provider=provider,
                         status=GrantStatus(data.get("status", "active")),
                         reason=data.get("reason"), updated_at=float(data["updated_at"]),
                         version=int(data["version"]))
        except (KeyError, TypeError, ValueError, TokenSetError):
            raise VaultCorruptError(f"key vault secret for {user!r}/{provider!r} is not a "
                                    "credproxy grant") from None

    @staticmethod
    def _json(value: str | None) -> dict[str, Any]:
        try:
            data = json.loads(value or "")
        except ValueError:
            raise VaultCorruptError("key vault secret is not JSON") from None
        if not isinstance(data, dict):
            raise VaultCorruptError("key vault secret is not a JSON object")
        return data


def _inner_code(exc: HttpResponseError) -> str | None:
    error = getattr(exc, "error", None)
    inner = getattr(error, "innererror", None) or {}
    if isinstance(inner, dict):
        code = inner.get("code")
        return str(code) if code else None
    return None


def _why(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    code = getattr(getattr(exc, "error", None), "code", None)
    why = f"{type(exc).__name__}" + (f" {status}" if status else "") + (
        f" {code}" if code else "")
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    after = headers.get("Retry-After") or headers.get("x-ms-retry-after-ms")
    if status in (429, 503) and after:
        unit = " s" if "Retry-After" in headers else " ms"
        why += (f" (Retry-After {after[:40]}{unit}; a vault call waits at most "
                f"{RETRY_AFTER_MAX:g} s, within vault.timeout)")
    return why
