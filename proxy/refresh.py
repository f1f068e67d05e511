"""Refreshing access tokens at a provider's token endpoint (RFC 6749 section 6), via authlib."""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Awaitable, Callable

import httpx2
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError

from proxy.errors import TokenRefreshFailed
from proxy.secret import Secret
from proxy.settings import ProviderSettings, RefreshSettings
from proxy.tokenset import TokenSet, TokenSetError

# Errors that may clear up on their own (RFC 6749 5.2 has temporarily_unavailable only for
# the authorization endpoint, but servers send it here too).
_TRANSIENT_OAUTH = {"temporarily_unavailable", "server_error", "slow_down"}


def oauth_client(provider: ProviderSettings, client_secret: Secret | None,
                 transport: httpx2.AsyncHTTPTransport, timeout: float,
                 **kwargs: object) -> AsyncOAuth2Client:
    """An authlib client for one call to one provider. authlib's client holds one token and
    mutates it, so each call gets its own; connections are pooled in ``transport``."""
    method = provider.token_endpoint_auth_method
    return AsyncOAuth2Client(
        client_id=provider.client_id,
        client_secret=client_secret.reveal() if client_secret else None,
        token_endpoint_auth_method=method, revocation_endpoint_auth_method=method,
        transport=transport, timeout=timeout,
        trust_env=False,  # never send tokens through an ambient HTTPS_PROXY
        **kwargs,
    )


class InvalidGrant(Exception):
    """The provider no longer honours the refresh token: the user must re-authorize."""


class Refresher:
    """Redeems refresh tokens with bounded retries and backoff."""

    def __init__(self, settings: RefreshSettings, *, verify: ssl.SSLContext | bool = True,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.settings = settings
        self._transport = httpx2.AsyncHTTPTransport(verify=verify, retries=0)
        self._clock = clock
        self._sleep = sleep
        self.calls = 0  # token-endpoint requests made, for tests and metrics

    async def refresh(self, provider: ProviderSettings, client_secret: Secret | None,
                      refresh_token: Secret) -> TokenSet:
        delay = self.settings.backoff
        last = "no attempt made"
        for attempt in range(1, self.settings.attempts + 1):
            try:
                return await self._once(provider, client_secret, refresh_token)
            except _Transient as exc:
                last = str(exc)
                if attempt < self.settings.attempts:
                    # Full jitter keeps many sidecars from retrying in lockstep.
                    await self._sleep(delay * (0.5 + random.random() / 2))  # noqa: S311
                    delay *= 2
        raise TokenRefreshFailed(
            f"token endpoint of {provider.id} failed after {self.settings.attempts} attempts: "
            f"{last}",
            reason="token_endpoint_unavailable",
        )

    async def _once(self, provider: ProviderSettings, client_secret: Secret | None,
                    refresh_token: Secret) -> TokenSet:
        client = oauth_client(provider, client_secret, self._transport, self.settings.timeout)
        self.calls += 1
        try:
            # A hard deadline per attempt (httpx's timeout is per read, and a server that
            # trickles bytes could outlast it): the refresh lock's quiet period after a
            # Redis restart relies on RefreshSettings.max_duration being a real bound.
            async with asyncio.timeout(self.settings.timeout):
                data = await client.refresh_token(provider.token_url,
                                                  refresh_token=refresh_token.reveal())
        except TimeoutError:
            raise _Transient("timed out") from None
        except OAuthError as exc:
            if exc.error == "invalid_grant":
                raise InvalidGrant(exc.description or "invalid_grant") from None
            if exc.error in _TRANSIENT_OAUTH:
                raise _Transient(f"provider answered {exc.error}") from None
            raise TokenRefreshFailed(f"token endpoint of {provider.id} answered {exc.error}",
                                     reason=exc.error) from None
        except httpx2.HTTPStatusError as exc:
            status = exc.response.status_code
            if status >= 500 or status == 429:
                raise _Transient(f"HTTP {status}") from None
            raise TokenRefreshFailed(f"token endpoint of {provider.id} answered HTTP {status}",
                                     reason="token_endpoint_error") from None
        except httpx2.TransportError as exc:
            raise _Transient(type(exc).__name__) from None
        except ValueError:
            raise TokenRefreshFailed(f"token endpoint of {provider.id} sent a malformed "
                                     "response", reason="token_endpoint_error") from None
        response = dict(data)
        if "expires_in" in response:
            response.pop("expires_at", None)  # authlib's own clock; ours is injectable
        try:
            return TokenSet.from_response(response, now=self._clock())
        except TokenSetError as exc:
            raise TokenRefreshFailed(f"token endpoint of {provider.id}: {exc}",
                                     reason="token_endpoint_error") from None

    async def aclose(self) -> None:
        await self._transport.aclose()


class _Transient(Exception):
    pass
