"""The one client credproxy talks to providers' OAuth endpoints with: the authorize URL,
the code exchange (RFC 6749 section 4.1, PKCE RFC 7636), the refresh (RFC 6749 section 6)
and revocation (RFC 7009 and the styles of :class:`proxy.dialect.Revocation`).

One connection pool, one retry loop (bounded attempts, full-jitter exponential backoff, a
hard deadline per attempt: :class:`proxy.settings.RefreshSettings`), and the provider's
dialect applied as data (:mod:`proxy.dialect`), never by its name. authlib builds and
authenticates the token requests (client auth per ``token_endpoint_auth_method``, PKCE,
the form body); its ``access_token_response`` / ``refresh_token_response`` compliance
hooks hand the raw answer to :func:`proxy.dialect.read_token_response` before authlib's
own parser, which knows only RFC 6749's shape (an error at HTTP 200, Slack's ``ok: false``
or a token set under ``authed_user`` would pass it or fail it wrongly).

What the caller gets from a refresh:

- a :class:`TokenSet` (an expiry that could not be read is unknown or
  ``default_expires_in``, logged; the answer, with its rotated refresh token, is kept);
- :class:`InvalidGrant`: the grant is dead (``token_errors.reauth``); the caller marks it
  so the dead refresh token is never presented again, and answers ``reauth-required``;
- :class:`ProviderMisconfigured` (502): the provider refused credproxy's client;
- :class:`TokenRefreshFailed` (502): transient after the retries
  (``token_endpoint_unavailable``), or an answer the dialect does not classify
  (``token_endpoint_error``).

An answer retrying cannot fix soon (an operator error, an unclassified error) is
remembered for :data:`REFUSAL_HOLD` seconds: the same refresh token (or, for an operator
error, the same client) gets the same answer from memory, with ``Retry-After``, instead of
one token-endpoint call per agent request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx2
from authlib.integrations.httpx_client import AsyncOAuth2Client

from proxy.dialect import (
    Grant,
    RevocationOutcome,
    TokenAnswer,
    read_revocation_response,
    read_token_response,
)
from proxy.errors import ProviderMisconfigured, TokenRefreshFailed
from proxy.live import LiveConfig
from proxy.secret import Secret
from proxy.settings import ProviderSettings, RefreshSettings
from proxy.tokenset import TokenSet

log = logging.getLogger("credproxy.provider")

# Seconds an operator error or an unclassified token-endpoint error is answered from memory.
REFUSAL_HOLD = 30.0
_HOLD_MAX = 10_000


class InvalidGrant(Exception):
    """The provider no longer honours the grant (its answer's code is in the dialect's
    ``token_errors.reauth``): the user must re-authorize. ``reason`` is the code as a
    reason (``invalid_grant``, ``bad_refresh_token``, ...), ``detail`` what it said."""

    def __init__(self, detail: str, *, reason: str = "invalid_grant",
                 code: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.code = code


class TokenRequestFailed(Exception):
    """A code exchange the provider did not answer with a user token set; ``answer`` is
    the classified answer (None: no answer, after the retries)."""

    def __init__(self, detail: str, answer: TokenAnswer | None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.answer = answer


@dataclass(frozen=True, slots=True)
class UpstreamRevocation:
    """What revoking a grant upstream achieved: ``upstream`` is ``revoked``, ``pending``
    (something failed: ``detail`` says what), ``unsupported`` (no revocation endpoint
    configured) or ``none`` (the provider has no per-grant revocation; ``console_url``
    is where an admin revokes the app's access)."""

    upstream: Literal["revoked", "pending", "unsupported", "none"]
    detail: str
    console_url: str | None = None


@dataclass(frozen=True, slots=True)
class Exchanged:
    """A code exchange's result: the user's token set, and the whole JSON answer (for the
    grant values read from it: Salesforce's ``instance_url``). ``response`` holds the
    tokens too: never logged, never stored as such."""

    tokens: TokenSet
    response: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class Fetched:
    """An answer of :meth:`ProviderClient.fetch`: status, headers, body (possibly cut)."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class DiscoveryFailed(Exception):
    """A discovery call after a code exchange (:meth:`ProviderClient.discover`) got no
    JSON answer; ``detail`` says why (never the token)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class _Answered(Exception):  # noqa: N818 - control flow out of authlib's hook
    """Raised by the compliance hook: the raw answer, read, before authlib parses it."""

    def __init__(self, answer: TokenAnswer) -> None:
        super().__init__(answer.outcome)
        self.answer = answer


class _Transient(Exception):  # noqa: N818
    pass


class ProviderClient:
    """Talks to providers' authorize, token and revocation endpoints. One per process.
    Each call reads ``refresh`` (attempts, backoff, per-attempt timeout) once from the
    running configuration, ``live`` (the snapshot of the operation in progress), and
    keeps it for all of its attempts."""

    def __init__(self, live: LiveConfig, *, verify: ssl.SSLContext | bool = True,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._live = live
        self._transport = httpx2.AsyncHTTPTransport(verify=verify, retries=0)
        self._clock = clock
        self._sleep = sleep
        self.calls = 0  # token-endpoint requests made, for tests and metrics
        self._held: dict[tuple[str, str], tuple[float, TokenRefreshFailed]] = {}

    # -- authorize ---------------------------------------------------------------------
    def authorization_url(self, provider: ProviderSettings, *, redirect_uri: str,
                          scopes: list[str], state: str, code_verifier: str) -> str:
        """The provider's authorize URL (RFC 6749 section 4.1.1) with PKCE S256 (RFC 7636
        section 4.3), the scopes joined by ``scope_separator`` under ``scope_param``, and
        the dialect's ``authorize_params`` (Google: ``access_type=offline``, Dropbox:
        ``token_access_type=offline``, Atlassian: ``audience``, ...)."""
        assert provider.authorize_url is not None
        client = self._oauth(provider, None, self._refresh_settings(),
                             redirect_uri=redirect_uri)
        extra: dict[str, str] = dict(provider.authorize_params)
        if scopes:
            extra[provider.scope_param] = provider.scope_separator.join(scopes)
        url, _ = client.create_authorization_url(provider.authorize_url, state=state,
                                                 code_verifier=code_verifier, **extra)
        return str(url)

    # -- the token endpoint ------------------------------------------------------------
    async def exchange_code(self, provider: ProviderSettings, client_secret: Secret | None,
                            *, code: str, code_verifier: str, redirect_uri: str) -> Exchanged:
        """Redeem an authorization code (RFC 6749 section 4.1.3) for the user's token set
        (at ``token_response.user_token_path``), with the whole answer. Raises
        :class:`TokenRequestFailed`."""
        params = {**provider.token_params, "code": code, "code_verifier": code_verifier}
        try:
            answer = await self._token_request(provider, client_secret, "authorization_code",
                                               params, self._refresh_settings(),
                                               redirect_uri=redirect_uri)
        except _Transient as exc:
            raise TokenRequestFailed(str(exc), None) from None
        if answer.outcome != "success" or answer.tokens is None:
            raise TokenRequestFailed(_scrub(answer.detail, client_secret), answer)
        return Exchanged(answer.tokens, answer.response or {})

    async def discover(self, provider: ProviderSettings, url: str, tokens: TokenSet) -> Any:
        """GET ``url`` with the user's new access token, injected the way the provider's
        own hosts take it (``inject``), and return the JSON answer: a discovery call after
        a code exchange (Atlassian's ``accessible-resources``, Graph's ``sites/root``).
        Retried like a token request. Raises :class:`DiscoveryFailed`."""
        inject = provider.inject
        value = inject.format.format(access_token=tokens.access_token.reveal(),
                                     token_type=tokens.token_type)
        retry = self._refresh_settings()

        async def once() -> httpx2.Response:
            async with httpx2.AsyncClient(transport=self._transport, trust_env=False,
                                          timeout=retry.timeout) as http:
                resp = await http.get(url, headers={inject.header: value,
                                                    "Accept": "application/json"})
            if resp.status_code >= 500 or resp.status_code == 429:
                raise _Transient(f"HTTP {resp.status_code}")
            return resp

        try:
            resp = await self._retrying(once, retry)
        except _Transient as exc:
            raise DiscoveryFailed(f"{url} failed after {retry.attempts} attempts "
                                  f"({exc})") from None
        if resp.status_code != 200:
            raise DiscoveryFailed(f"{url} answered HTTP {resp.status_code}")
        try:
            return resp.json()
        except ValueError:
            raise DiscoveryFailed(f"{url} did not answer JSON") from None

    async def fetch(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                    json_body: Any = None, max_bytes: int = 256 * 1024) -> Fetched:
        """One unauthenticated call for metadata (RFC 9728, RFC 8414, OpenID Connect
        discovery, RFC 7591 registration, a 401 probe): retried on network errors,
        timeouts and 5xx; any other status is the answer. The body is read up to
        ``max_bytes`` (a response streaming forever, say an SSE stream, is cut). Raises
        :class:`DiscoveryFailed` after the last attempt."""
        retry = self._refresh_settings()

        async def once() -> Fetched:
            async with httpx2.AsyncClient(transport=self._transport, trust_env=False,
                                          timeout=retry.timeout) as http:
                request = http.build_request(method, url, headers=dict(headers or {}),
                                             json=json_body)
                resp = await http.send(request, stream=True)
                try:
                    body = bytearray()
                    if resp.status_code < 300 or "json" in resp.headers.get(
                            "content-type", ""):
                        async for chunk in resp.aiter_bytes():
                            body += chunk
                            if len(body) >= max_bytes:
                                break
                finally:
                    await resp.aclose()
            if resp.status_code >= 500:
                raise _Transient(f"HTTP {resp.status_code}")
            return Fetched(resp.status_code, resp.headers, bytes(body[:max_bytes]))

        try:
            return await self._retrying(once, retry)
        except _Transient as exc:
            raise DiscoveryFailed(f"{url} failed after {retry.attempts} attempts "
                                  f"({exc})") from None

    async def refresh(self, provider: ProviderSettings, client_secret: Secret | None,
                      refresh_token: Secret, *, scopes: list[str] | None = None) -> TokenSet:
        """Redeem ``refresh_token`` (RFC 6749 section 6) with the dialect's
        ``token_params`` and ``refresh_params``; ``scopes`` (a resource's, joined by the
        dialect's ``scope_separator`` under its ``scope_param``) asks for an access token
        for another resource of the same grant (RFC 6749 section 6 ``scope``; Entra ID's
        multi-resource refresh tokens). See the module docstring for what it raises."""
        keys = (_token_key(provider, refresh_token), _client_key(provider, client_secret))
        self._raise_held(keys)
        params = {**provider.token_params, **provider.refresh_params,
                  "refresh_token": refresh_token.reveal()}
        retry = self._refresh_settings()
        if scopes:
            params[provider.scope_param] = provider.scope_separator.join(scopes)
        try:
            answer = await self._token_request(provider, client_secret, "refresh_token",
                                               params, retry)
        except _Transient as exc:
            raise TokenRefreshFailed(
                f"token endpoint of {provider.id} failed after {retry.attempts} "
                f"attempts: {exc}", reason="token_endpoint_unavailable") from None
        if answer.outcome == "success" and answer.tokens is not None:
            return answer.tokens
        if answer.outcome == "reauth":
            said = _scrub(answer.detail, refresh_token, client_secret)
            raise InvalidGrant(f"{provider.id} refused the refresh token ({said})",
                               reason=answer.reason or "invalid_grant", code=answer.code)
        refusal = _refusal(provider, answer, refresh_token, client_secret)
        self._hold(keys[1] if isinstance(refusal, ProviderMisconfigured) else keys[0], refusal)
        raise refusal

    async def _token_request(self, provider: ProviderSettings, client_secret: Secret | None,
                             grant: Grant, params: Mapping[str, str], retry: RefreshSettings,
                             *, redirect_uri: str | None = None) -> TokenAnswer:
        """One token request, retried while the answer is transient; returns the last
        non-transient answer. Raises :class:`_Transient` after the last attempt."""

        async def once() -> TokenAnswer:
            client = self._oauth(provider, client_secret, retry, redirect_uri=redirect_uri)
            now = self._clock()

            def read(resp: httpx2.Response) -> httpx2.Response:
                raise _Answered(read_token_response(
                    provider, resp.status_code, resp.headers.get("content-type"),
                    resp.content, grant=grant, now=now))

            hook = ("access_token_response" if grant == "authorization_code"
                    else "refresh_token_response")
            client.register_compliance_hook(hook, read)
            self.calls += 1
            try:
                if grant == "authorization_code":
                    await client.fetch_token(provider.token_url, **params)
                else:
                    await client.refresh_token(provider.token_url, **params)
            except _Answered as got:
                answer = got.answer
            else:  # pragma: no cover - the hook always raises
                raise _Transient("the token endpoint's answer was not read")
            for note in answer.notes:
                log.warning("token endpoint of %s: %s", provider.id, note)
            if answer.outcome == "transient":
                raise _Transient(f"provider answered {answer.detail}")
            return answer

        return await self._retrying(once, retry)

    # -- revocation --------------------------------------------------------------------
    async def revoke(self, provider: ProviderSettings, client_secret: Secret | None,
                     tokens: TokenSet) -> UpstreamRevocation:
        """Revoke a grant's tokens upstream the provider's way (``revocation.style``);
        every token is tried on its own, whatever happened to the one before."""
        rev = provider.revocation
        if rev.style == "none":
            return UpstreamRevocation("none", "no upstream revocation exists for this "
                                      "provider", rev.console_url)
        if provider.revocation_url is None:
            return UpstreamRevocation("unsupported", (
                "no RFC 7009 revocation endpoint configured; revoke at the provider by its "
                "own means (e.g. Microsoft Entra: revokeSignInSessions)"))
        failures = []
        done = []
        retry = self._refresh_settings()
        for token, hint in _tokens_to_revoke(provider, tokens):
            failure = await self._revoke_token(provider, client_secret, token, hint, retry)
            if failure:
                failures.append(failure)
            else:
                done.append(hint.removesuffix("_token"))
        if failures:
            return UpstreamRevocation("pending", "; ".join(failures))
        what = " and ".join(done)
        style = "RFC 7009" if rev.style == "rfc7009" else f"{rev.style} revocation"
        return UpstreamRevocation("revoked", f"{what} token{'s' if len(done) > 1 else ''} "
                                             f"revoked ({style})")

    async def _revoke_token(self, provider: ProviderSettings, client_secret: Secret | None,
                            token: Secret, hint: str, retry: RefreshSettings) -> str | None:
        """None when revoked, else why not (after retries for 5xx, 429, network errors)."""
        last: list[str] = []

        async def once() -> RevocationOutcome:
            resp = await self._revocation_call(provider, client_secret, token, hint, retry)
            outcome, detail = read_revocation_response(
                provider.revocation, resp.status_code, resp.headers.get("content-type"),
                resp.content)
            last[:] = [detail]
            if outcome == "transient":
                raise _Transient(detail)
            return outcome

        try:
            outcome = await self._retrying(once, retry)
        except _Transient as exc:
            return f"{hint} revocation failed after {retry.attempts} attempts ({exc})"
        return None if outcome == "revoked" else f"{hint} revocation refused ({last[0]})"

    async def _revocation_call(self, provider: ProviderSettings, client_secret: Secret | None,
                               token: Secret, hint: str,
                               retry: RefreshSettings) -> httpx2.Response:
        url = provider.revocation_url
        assert url is not None
        client = self._oauth(provider, client_secret, retry)
        style = provider.revocation.style
        if style == "rfc7009":  # RFC 7009 section 2.1, via authlib
            resp: httpx2.Response = await client.revoke_token(url, token=token.reveal(),
                                                              token_type_hint=hint)
            return resp
        kwargs: dict[str, Any] = {"withhold_token": True, "auth": None,
                                  "headers": {"Accept": "application/json"}}
        method = "POST"
        if style == "json":  # Intuit: {"token": ...} with client auth
            kwargs["auth"], extra = _client_auth(provider, client_secret)
            kwargs["json"] = {"token": token.reveal(), **extra}
        elif style == "bearer":  # Dropbox: the token revokes itself, no body
            kwargs["headers"]["Authorization"] = f"Bearer {token.reveal()}"
        elif style == "github-grant":  # GitHub: DELETE /applications/{client_id}/grant
            method = "DELETE"
            kwargs["auth"] = httpx2.BasicAuth(provider.client_id,
                                              client_secret.reveal() if client_secret else "")
            kwargs["json"] = {"access_token": token.reveal()}
        else:  # slack: auth.revoke takes the token as a form field
            kwargs["data"] = {"token": token.reveal()}
        answer: httpx2.Response = await client.request(method, url, **kwargs)
        return answer

    # -- shared ------------------------------------------------------------------------
    def _refresh_settings(self) -> RefreshSettings:
        """The retry settings for one call, read once from the running configuration."""
        return self._live.current.settings.refresh

    async def _retrying[T](self, once: Callable[[], Awaitable[T]],
                           retry: RefreshSettings) -> T:
        """``once()`` until it returns, at most ``attempts`` times: timeouts, network errors
        and :class:`_Transient` are retried after a full-jitter exponential backoff (many
        sidecars must not retry in lockstep). Each attempt has a hard deadline of
        ``timeout`` (httpx's timeout is per read; a server trickling bytes could outlast
        it, and the refresh lock's quiet period after a Redis restart relies on
        :meth:`RefreshSettings.max_duration` being a real bound)."""
        delay = retry.backoff
        last = "no attempt made"
        for attempt in range(1, retry.attempts + 1):
            try:
                async with asyncio.timeout(retry.timeout):
                    return await once()
            except TimeoutError:
                last = "timed out"
            except httpx2.HTTPError as exc:  # network, protocol, decoding
                last = type(exc).__name__
            except _Transient as exc:
                last = str(exc)
            if attempt < retry.attempts:
                await self._sleep(delay * (0.5 + random.random() / 2))  # noqa: S311
                delay *= 2
        raise _Transient(last)

    def _oauth(self, provider: ProviderSettings, client_secret: Secret | None,
               retry: RefreshSettings, *, redirect_uri: str | None = None
               ) -> AsyncOAuth2Client:
        """An authlib client for one call (it holds one token and mutates it); connections
        are pooled in the shared transport. Never through an ambient HTTPS_PROXY."""
        method = provider.token_endpoint_auth_method
        return AsyncOAuth2Client(
            client_id=provider.client_id,
            client_secret=client_secret.reveal() if client_secret else None,
            token_endpoint_auth_method=method, revocation_endpoint_auth_method=method,
            redirect_uri=redirect_uri, code_challenge_method="S256",
            transport=self._transport, timeout=retry.timeout, trust_env=False,
        )

    def _raise_held(self, keys: tuple[tuple[str, str], ...]) -> None:
        now = time.monotonic()
        for key in keys:
            held = self._held.get(key)
            if held is None:
                continue
            until, refusal = held
            if now >= until:
                del self._held[key]
                continue
            left = max(1, int(until - now + 0.999))
            raise type(refusal)(f"{refusal.detail}; not asked again for {left} s",
                                reason=refusal.reason, retry_after=left)

    def _hold(self, key: tuple[str, str], refusal: TokenRefreshFailed) -> None:
        now = time.monotonic()
        if len(self._held) >= _HOLD_MAX:
            self._held = {k: v for k, v in self._held.items() if v[0] > now}
        self._held[key] = (now + REFUSAL_HOLD, refusal)

    async def aclose(self) -> None:
        await self._transport.aclose()


def _refusal(provider: ProviderSettings, answer: TokenAnswer, refresh_token: Secret,
             client_secret: Secret | None) -> TokenRefreshFailed:
    """The 502 for a refresh answered with an operator error or an unclassified one. The
    provider's own words go in the detail, without anything secret it may have echoed."""
    said = _scrub(answer.detail, refresh_token, client_secret)
    if answer.outcome == "operator":
        return ProviderMisconfigured(
            f"the token endpoint of {provider.id} refused credproxy's client ({said}): "
            f"check providers[{provider.id}].client_id, its client secret "
            "(client_secret_env / client_secret_file) and token_endpoint_auth_method; the "
            "user's grant is unaffected", reason=answer.reason)
    return TokenRefreshFailed(f"token endpoint of {provider.id} answered {said}",
                              reason=answer.reason)


def revokes_with_access_token(provider: ProviderSettings, tokens: TokenSet) -> bool:
    """Whether revoking ``tokens`` presents the access token only (Dropbox's bearer call,
    GitHub's grant DELETE, Slack's auth.revoke, ``revocation.token: access_token``), so
    that an expired one must be refreshed first or the refresh token stays alive."""
    return _tokens_to_revoke(provider, tokens) == [(tokens.access_token, "access_token")] \
        and tokens.refresh_token is not None


def _tokens_to_revoke(provider: ProviderSettings,
                      tokens: TokenSet) -> list[tuple[Secret, str]]:
    """Which tokens, in which order (see :class:`proxy.dialect.Revocation`)."""
    rev = provider.revocation
    access = (tokens.access_token, "access_token")
    if (rev.style in ("bearer", "github-grant", "slack") or rev.token == "access_token"
            or tokens.refresh_token is None):
        return [access]
    refresh = (tokens.refresh_token, "refresh_token")
    return [refresh] if rev.token == "refresh_token" else [refresh, access]


def _client_auth(provider: ProviderSettings, client_secret: Secret | None
                 ) -> tuple[httpx2.Auth | None, dict[str, str]]:
    """Client authentication for a JSON call (RFC 6749 section 2.3.1): HTTP Basic, or the
    credentials as body members for ``client_secret_post``."""
    secret = client_secret.reveal() if client_secret else ""
    method = provider.token_endpoint_auth_method
    if method == "client_secret_basic":
        return httpx2.BasicAuth(provider.client_id, secret), {}
    if method == "client_secret_post":
        return None, {"client_id": provider.client_id, "client_secret": secret}
    return None, {"client_id": provider.client_id}


def _scrub(text: str, *secrets: Secret | None) -> str:
    """``text`` (a provider's error description) with any of ``secrets`` it echoes
    replaced: problem details and logs never carry a token or a client secret."""
    for secret in secrets:
        if secret is not None and len(secret.reveal()) >= 4:
            text = text.replace(secret.reveal(), "<redacted>")
    return text


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def _token_key(provider: ProviderSettings, refresh_token: Secret) -> tuple[str, str]:
    return provider.id, "token:" + _digest(refresh_token.reveal())


def _client_key(provider: ProviderSettings, client_secret: Secret | None) -> tuple[str, str]:
    secret = client_secret.reveal() if client_secret else ""
    return provider.id, "client:" + _digest(provider.token_url, provider.client_id, secret)
