"""Connecting a user to a provider: OAuth 2.0 authorization code with PKCE (RFC 6749 4.1,
RFC 7636 S256), via authlib.

The HTTP is :class:`proxy.provider_client.ProviderClient`'s (the provider's dialect:
``authorize_params``, ``scope_param`` / ``scope_separator``, ``token_params``, where the
user's token set is). A token response carrying only an app or bot token (Slack's
top-level ``access_token`` without ``authed_user``) is refused (``no_user_token``): a
token shared by every user is never stored as one user's credential.

The flow is framework-free: :meth:`Connector.begin` returns the authorize URL and keeps the
flow's state (user, provider, PKCE verifier, redirect URI, scopes, return URL) single-use
and short-lived in the coordinator, encrypted; :meth:`Connector.complete` takes the
callback's query, checks everything, exchanges the code and stores the grant. The CLI's
loopback listener and the admin server's web flow are thin callers of these two methods.

Browser binding: a ``state`` names a user, but whoever holds the authorize URL could finish
the flow, so a user could send their URL to someone else and collect that person's grant
(login CSRF). The web flow therefore binds each flow to the browser that started it:
``begin(..., browser=nonce)`` keeps a hash of a random nonce the admin server also sets as a
cookie, and ``complete(..., browser=cookie)`` refuses a callback whose cookie is missing or
different. The CLI's flow runs in one process and passes no nonce.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy import audit as auditlog
from proxy import binding
from proxy.audit import Actor, AuditLog
from proxy.binding import BindingError, GrantValue, GrantValueSettings, ValueSource
from proxy.coordination.base import Coordinator, Used
from proxy.errors import CredproxyError, VaultError
from proxy.live import LiveConfig
from proxy.mcpauth import (
    AuthServer,
    McpDiscoveryError,
    Registrar,
    Registration,
    concrete,
    narrowed,
    shared_discovery,
)
from proxy.provider_client import DiscoveryFailed, ProviderClient, TokenRequestFailed
from proxy.reasons import from_provider_code
from proxy.secret import Secret
from proxy.settings import ProviderSettings, Settings
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant, Vault


class ConnectRejected(CredproxyError):
    """A connect flow that cannot go on; ``reason`` is a short slug for pages and audit."""

    def __init__(self, reason: str, detail: str, *, user: str | None = None,
                 provider: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.user = user
        self.provider = provider


@dataclass(frozen=True, slots=True)
class Connected:
    user: str
    provider: str
    scope: str | None
    return_to: str | None
    # Required scopes (providers[].required_scopes) the provider did not grant: the grant
    # is stored (it serves what it covers) and this is reported to the user at once.
    missing_scopes: tuple[str, ...] = ()


class Connector:
    def __init__(self, live: LiveConfig, vault: Vault, coordinator: Coordinator,
                 audit: AuditLog, *, state_key: bytes, verify: ssl.SSLContext | bool = True,
                 clock: Callable[[], float] = time.time,
                 client: ProviderClient | None = None) -> None:
        """``live``: the running configuration; each :meth:`begin` and :meth:`complete`
        runs on one snapshot of it. ``client``: the process's provider client (shared with
        the broker and the offboarder); without one, the connector makes and closes its
        own."""
        self._live = live
        self._vault = vault
        self._coord = coordinator
        self._audit = audit
        self._aead = AESGCM(state_key)
        self._owns_client = client is None
        self._provider_client = client or ProviderClient(live, verify=verify, clock=clock)
        self._clock = clock
        self.discovery = shared_discovery(self._provider_client, clock=clock)
        self.registrar = Registrar(self._provider_client)

    @property
    def settings(self) -> Settings:
        """The settings of the flow step in progress (the snapshot :meth:`begin` or
        :meth:`complete` runs on); outside one, the running settings."""
        return self._live.current.settings

    def _client_secret(self, provider: ProviderSettings) -> Secret | None:
        return self._live.current.client_secret(provider)

    async def _mcp(self, provider: ProviderSettings, redirect_uri: str, user: str,
                   registered: Registration | None = None
                   ) -> tuple[ProviderSettings, AuthServer, Registration]:
        """An ``mcp`` provider made concrete (proxy.mcpauth): its authorization server's
        endpoints from discovery, the client from registration, the scopes, and the
        server's canonical URI as ``resource`` (RFC 8707 section 2) on the authorize
        request and on every token request (code and refresh: ``token_params``).
        ``registered``: the client the flow began with (the callback, which may reach
        another replica, uses it rather than registering again)."""
        assert provider.mcp is not None
        try:
            server = await self.discovery.discover(provider.mcp, allow_http=provider.allow_http,
                                                   issuer=provider.issuer)
            reg = registered or await self.registrar.client_for(
                issuer=server.issuer, pre_registered=provider.client_id or None,
                auth_method=provider.token_endpoint_auth_method, server=server,
                public_base=self.settings.connect_base, redirect_uri=redirect_uri,
                web_redirect_uri=self.settings.redirect_uri)
        except McpDiscoveryError as exc:
            raise ConnectRejected(exc.reason, exc.detail, user=user,
                                  provider=provider.id) from None
        provider = concrete(provider, server, client_id=reg.client_id,
                            auth_method=reg.token_endpoint_auth_method)
        return provider, server, reg

    def _mcp_secret(self, provider: ProviderSettings, reg: Registration) -> Secret | None:
        if reg.kind == "pre-registered":
            return self._client_secret(provider)
        return Secret(reg.client_secret) if reg.client_secret else None

    def scopes_for(self, provider: ProviderSettings, requested: list[str] | None) -> list[str]:
        """The scopes to ask for: the provider's default ``scopes``, or the user's choice
        within its ceiling (``scope_ceiling``; docs "Scopes: default, ceiling, required"),
        in the ceiling's order. A scope outside the ceiling raises
        :class:`ConnectRejected` (``scope_not_allowed``) before the provider is contacted."""
        if not requested:
            return list(provider.scopes)
        ceiling = provider.allowed_scopes
        extra = sorted(set(requested) - set(ceiling))
        if extra:
            raise ConnectRejected("scope_not_allowed",
                                  f"scopes {extra} are outside providers[{provider.id}]."
                                  f"scope_ceiling (a user may choose among {ceiling}); ask "
                                  "an operator to widen it, or choose within it",
                                  provider=provider.id)
        _check_required(provider, requested)
        return [s for s in ceiling if s in requested]

    async def begin(self, user: str, provider_id: str, *, redirect_uri: str,
                    scopes: list[str] | None = None, return_to: str | None = None,
                    browser: str | None = None,
                    choices: Mapping[str, str] | None = None,
                    actor: Actor | None = None) -> str:
        """Start a flow for ``user``; returns the provider's authorize URL. ``browser``: a
        nonce the caller also gave the browser (a cookie); the callback must present it.
        ``choices``: the connect link's query parameters, of which those naming a
        ``from: choice`` grant value are that value (checked here, before the authorize
        URL, which may use them, is built: docs/tenants.md). ``actor``: who started it
        (default: the user, who authenticated with a user context); kept with the flow, so
        its audit records carry it on whichever replica the callback lands."""
        try:
            with self._live.pinned():
                return await self._begin(user, provider_id, redirect_uri, scopes, return_to,
                                         browser, choices or {}, actor)
        except ConnectRejected as exc:
            self.rejected(exc, user=user, provider=exc.provider or provider_id, actor=actor)
            raise

    def rejected(self, exc: ConnectRejected, *, user: str, provider: str,
                 actor: Actor | None = None) -> None:
        """Audit a refused connect (``connection.created``, outcome ``rejected``, the
        rejection's reason); ``actor`` defaults to the user."""
        self._audit.record(auditlog.CONNECTION_CREATED, user=user, provider=provider,
                           outcome="rejected", reason=exc.reason,
                           actor=actor or Actor("user", user))

    async def _begin(self, user: str, provider_id: str, redirect_uri: str,
                     scopes: list[str] | None, return_to: str | None,
                     browser: str | None, choices: Mapping[str, str],
                     actor: Actor | None = None) -> str:
        provider = self._provider(provider_id)
        mcp: tuple[AuthServer, Registration] | None = None
        if provider.mcp is not None and provider.scope_ceiling is not None:
            # A configured ceiling refuses before discovery contacts the server (the
            # offline_access discovery may add is never outside it).
            self.scopes_for(provider.model_copy(update={
                "scopes": [*provider.scopes, "offline_access"]}), scopes)
        if provider.mcp is not None:
            provider, found, reg = await self._mcp(provider, redirect_uri, user)
            mcp = (found, reg)
        try:
            chosen = _read_values(provider, "choice", lambda spec, name:
                                  choices.get(spec.param or name))
            # Whenever it names a value: an optional one not given is missing here (never
            # an authorize URL with a literal "{name}" in it).
            if provider.authorize_url is not None and binding.placeholders(
                    provider.authorize_url):
                provider = provider.model_copy(update={
                    "authorize_url": binding.render(provider.authorize_url, chosen)})
        except BindingError as exc:
            raise ConnectRejected(exc.reason, exc.detail, user=user,
                                  provider=provider.id) from None
        if provider.authorize_url is None:
            raise ConnectRejected("no_authorize_url",
                                  f"{provider.id} has no authorize_url configured",
                                  user=user, provider=provider.id)
        if return_to is not None and not self.settings.connect.allows_return(return_to):
            raise ConnectRejected("return_url_not_allowed",
                                  "the return URL is not one of connect.return_urls",
                                  user=user, provider=provider.id)
        if mcp is not None and scopes:
            configured = self._provider(provider_id)
            try:
                # The configured ceiling, else what the server advertises.
                granted = narrowed(mcp[0], configured.scope_ceiling
                                   if configured.scope_ceiling is not None
                                   else configured.scopes, scopes)
            except McpDiscoveryError as exc:
                raise ConnectRejected(exc.reason, exc.detail, user=user,
                                      provider=provider.id) from None
            _check_required(provider, granted)
        else:
            granted = self.scopes_for(provider, scopes)
        state = secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(64)  # 86 chars: within RFC 7636's 43..128
        url = self._provider_client.authorization_url(
            provider, redirect_uri=redirect_uri, scopes=granted, state=state,
            code_verifier=verifier)
        record: dict[str, object] = {"u": user, "p": provider.id, "v": verifier,
                                     "r": redirect_uri, "s": granted, "t": return_to,
                                     "c": self._clock(), "g": chosen}
        if provider.issuer is not None:
            record["i"] = provider.issuer  # RFC 9207: the callback's iss must be this
        if mcp is not None:
            # The issuer and client this flow began with (sealed: a registered client's
            # secret too): the callback checks iss against it (RFC 9207) and exchanges the
            # code as that client, on whichever replica it lands.
            reg = mcp[1]
            record["i"] = mcp[0].issuer
            record["k"] = [reg.kind, reg.client_id, reg.token_endpoint_auth_method,
                           reg.client_secret]
        if browser is not None:
            record["b"] = _browser_hash(browser)
        if actor is not None:
            record["a"] = [actor.kind, actor.id]
        await self._coord.put_once(self._name(state), self._seal(state, record),
                                   self.settings.connect.state_ttl + 60)
        return str(url)

    async def complete(self, params: Mapping[str, str], *,
                       browser: str | None = None, actor: Actor | None = None) -> Connected:
        """Finish a flow from the callback's query parameters (``state``, ``code`` or
        ``error``); ``browser`` is the nonce the browser presented (its cookie), required
        when the flow was begun with one. Every rejection is audited and stores nothing.
        ``actor``: who asked, for the audit (default: the user the flow was begun for)."""
        try:
            with self._live.pinned():
                return await self._complete(params, browser, actor)
        except ConnectRejected as exc:
            self._audit.record(auditlog.CONNECTION_CREATED, user=exc.user,
                               provider=exc.provider, outcome="rejected", reason=exc.reason,
                               actor=actor or (Actor("user", exc.user) if exc.user else None))
            raise

    async def _complete(self, params: Mapping[str, str], browser: str | None,
                        actor: Actor | None) -> Connected:
        state = params.get("state")
        if not state:
            raise ConnectRejected("missing_state", "the callback carries no state")
        taken = await self._coord.take_once(self._name(state))
        if isinstance(taken, Used):
            raise ConnectRejected("replayed_state", "this sign-in was already completed")
        if taken is None:
            raise ConnectRejected("unknown_state",
                                  "the state does not belong to a sign-in started here")
        rec = self._unseal(state, taken)
        user, provider_id = str(rec["u"]), str(rec["p"])
        # A flow begun with a browser nonce needs it back; a caller that passes one (the
        # admin server) accepts only flows begun with one.
        bound = rec.get("b")
        if (bound is not None or browser is not None) and (
                bound is None or browser is None
                or not hmac.compare_digest(str(bound), _browser_hash(browser))):
            raise ConnectRejected("browser_mismatch",
                                  "this sign-in was started in another browser (or its cookie "
                                  "is gone); start again from the connect link",
                                  user=user, provider=provider_id)
        if self._clock() - float(rec["c"]) > self.settings.connect.state_ttl:
            raise ConnectRejected("expired_state", "the sign-in took too long; start again",
                                  user=user, provider=provider_id)
        issuer = rec.get("i")
        if isinstance(issuer, str):
            _check_iss(params, issuer, user, provider_id)
            configured = next((p for p in self.settings.providers if p.id == provider_id),
                              None)
            if configured is not None and configured.iss_required and "iss" not in params:
                raise ConnectRejected("iss_missing", "the authorization response carries no "
                                      "iss though providers[].iss_required says the "
                                      "server sends one (RFC 9207)",
                                      user=user, provider=provider_id)
        if "error" in params:
            raise ConnectRejected(f"provider_error:{params['error'][:64]}",
                                  f"the provider answered {params['error'][:64]}",
                                  user=user, provider=provider_id)
        code = params.get("code")
        if not code:
            raise ConnectRejected("missing_code", "the callback carries no code",
                                  user=user, provider=provider_id)
        verifier = rec.get("v")
        if not isinstance(verifier, str) or not verifier:
            raise ConnectRejected("missing_pkce_verifier", "the PKCE verifier is missing",
                                  user=user, provider=provider_id)
        provider = self._provider(provider_id)
        client_secret = self._client_secret(provider)
        mcp_values: dict[str, GrantValue] = {}
        minted_secret: Secret | None = None
        if provider.mcp is not None:
            began = rec.get("k")
            if not isinstance(began, list) or len(began) != 4 or not isinstance(issuer, str):
                raise ConnectRejected("mcp_issuer_changed", "the sign-in was begun before "
                                      f"{provider_id} was an MCP server; start again",
                                      user=user, provider=provider_id)
            kind, client_id, method, secret = began
            provider, server, reg = await self._mcp(
                provider, str(rec["r"]), user,
                Registration(issuer, str(kind), str(client_id), str(method),
                             secret if isinstance(secret, str) else None))
            if server.issuer != issuer:
                raise ConnectRejected("mcp_issuer_changed",
                                      "the MCP server's authorization server or client "
                                      "changed during the sign-in; start again",
                                      user=user, provider=provider_id)
            if server.iss_parameter_supported and "iss" not in params:
                # RFC 9207 section 2.4: required when the server says it sends one.
                raise ConnectRejected("iss_missing", "the authorization response carries no "
                                      "iss though the server advertises it (RFC 9207)",
                                      user=user, provider=provider_id)
            client_secret = self._mcp_secret(provider, reg)
            # The grant records what minted it: the resource its tokens are bound to, the
            # issuer, and the registration (grants keyed by user, resource, issuer).
            mcp_values = {"mcp_resource": server.resource, "mcp_issuer": server.issuer,
                          "mcp_client_id": reg.client_id, "mcp_registration": reg.kind}
            if reg.kind != "pre-registered" and reg.client_secret:
                # A confidential registered client: its secret is sealed in the grant.
                mcp_values["mcp_client_auth"] = reg.token_endpoint_auth_method
                minted_secret = Secret(reg.client_secret)
        chosen = rec.get("g")
        values: dict[str, GrantValue] = dict(chosen) if isinstance(chosen, dict) else {}
        try:
            values.update(_callback_values(provider, params, values))
            endpoint = provider.for_grant(values)
        except BindingError as exc:
            raise ConnectRejected(exc.reason, exc.detail, user=user,
                                  provider=provider_id) from None
        try:
            exchanged = await self._provider_client.exchange_code(
                endpoint, client_secret, code=code, code_verifier=verifier,
                redirect_uri=str(rec["r"]))
        except TokenRequestFailed as exc:
            if mcp_values.get("mcp_registration") == "dcr" and exc.answer is not None \
                    and exc.answer.outcome == "operator":
                # The server no longer knows the client it registered (expired, deleted):
                # the next connect registers anew (RFC 7591 section 3 gives no other way).
                self.registrar.forget(str(mcp_values["mcp_issuer"]))
            raise _exchange_rejected(exc, provider, user) from None
        tokens = exchanged.tokens
        if tokens.scope is None and rec.get("s"):
            # RFC 6749 5.1: an omitted scope means the requested one was granted.
            tokens = replace(tokens, scope=" ".join(rec["s"]))
        try:
            values.update(_read_values(provider, "token_response", lambda spec, name:
                                       binding.read_field(exchanged.response,
                                                          spec.field or "")))
            values.update(await self._discover(provider, values, tokens))
            for resource in (None, *provider.resources):
                provider.own_hosts(resource, values)
            values.update(mcp_values)
            account = reported_account(exchanged.response)
            if account is not None and ACCOUNT_VALUE not in provider.grant_values:
                values[ACCOUNT_VALUE] = account
        except BindingError as exc:
            raise ConnectRejected(exc.reason, exc.detail, user=user,
                                  provider=provider_id) from None
        missing = missing_required(provider, tokens.scope)
        try:
            stored = await self._vault.put(Grant(user=user, provider=provider_id,
                                                 tokens=tokens, values=values,
                                                 client_secret=minted_secret))
        except VaultError as exc:
            raise ConnectRejected("vault_unavailable", "the grant could not be stored",
                                  user=user, provider=provider_id) from exc
        # Replaces a shared-cache copy of an earlier grant (its version is newer), so no
        # replica keeps serving the old token (say, with the wider scope the user dropped).
        await self._coord.cache_put(stored)
        await self._coord.publish_invalidation(user, provider_id)
        shown = "".join(f"; {k}={','.join(v) if isinstance(v, tuple) else v}"
                        for k, v in sorted(values.items()))
        if missing:
            shown += f"; missing_required={','.join(missing)}"
        self._audit.record(auditlog.CONNECTION_CREATED, user=user, provider=provider_id,
                           outcome="connected", detail=f"scope={tokens.scope or ''}{shown}",
                           reason="required_scope_not_granted" if missing else None,
                           token=tokens.access_token, token_source="vault",
                           actor=actor or _actor(rec.get("a")) or Actor("user", user))
        return_to = rec.get("t")
        return Connected(user, provider_id, tokens.scope,
                         return_to if isinstance(return_to, str) else None, tuple(missing))

    async def _discover(self, provider: ProviderSettings, values: Mapping[str, GrantValue],
                        tokens: TokenSet) -> dict[str, GrantValue]:
        """The ``from: discovery`` values: a GET with the new access token to each value's
        URL, which must be one of the hosts this grant's token may go to (the grant's own
        hosts known so far, those whose values are read already; or the provider's hosts
        when it binds none). Raises :class:`BindingError`."""
        found: dict[str, GrantValue] = {}
        answers: dict[str, Any] = {}
        for name, spec in provider.grant_values.items():
            if spec.source != "discovery" or spec.url is None:
                continue
            url = binding.render(spec.url, values)
            host = binding.host_value(url)
            known = {**values, **found}
            own = None
            if provider.grant_hosts:
                # A grant host may name a value this discovery (or a later one) finds.
                ready = [t for t in provider.grant_hosts
                         if all(isinstance(known.get(n), str) for n in binding.placeholders(t))]
                own = binding.own_hosts(ready, known)
            allowed = host is not None and binding.within(host, provider.hosts) and (
                own is None or any(host == h for h in own))
            if not allowed or not url.startswith("https://"):
                raise BindingError("grant_host_not_allowed",
                                   f"grant value {name!r}: the discovery URL's host is not "
                                   "one this grant's token may go to; nothing was sent")
            if url not in answers:
                try:
                    answers[url] = await self._provider_client.discover(provider, url, tokens)
                except DiscoveryFailed as exc:
                    raise BindingError("discovery_failed",
                                       f"grant value {name!r}: {exc.detail}") from None
            value = binding.check_value(name, spec,
                                        binding.read_field(answers[url], spec.field or ""),
                                        ceiling=provider.ceiling())
            if value is not None:
                found[name] = value
        return found

    async def aclose(self) -> None:
        if self._owns_client:
            await self._provider_client.aclose()

    def _provider(self, provider_id: str) -> ProviderSettings:
        for p in self.settings.providers:
            if p.id == provider_id:
                return p
        raise ConnectRejected("unknown_provider", f"no provider {provider_id!r}")

    @staticmethod
    def _name(state: str) -> str:
        return "state:" + hashlib.sha256(state.encode()).hexdigest()[:40]

    def _seal(self, state: str, record: dict[str, object]) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, json.dumps(record).encode(), state.encode())

    def _unseal(self, state: str, blob: bytes) -> dict[str, Any]:
        try:
            rec = json.loads(self._aead.decrypt(blob[:12], blob[12:], state.encode()))
        except (InvalidTag, ValueError):
            raise ConnectRejected("unknown_state", "the state record is unreadable") from None
        if not isinstance(rec, dict):
            raise ConnectRejected("unknown_state", "the state record is unreadable")
        return rec


def _exchange_rejected(exc: TokenRequestFailed, provider: ProviderSettings,
                       user: str) -> ConnectRejected:
    """The connect rejection for a code exchange that got no user token set."""
    answer = exc.answer
    if answer is None:
        return ConnectRejected("token_exchange_failed",
                               f"the token endpoint could not be used ({exc.detail})",
                               user=user, provider=provider.id)
    if answer.outcome == "operator":
        return ConnectRejected(answer.reason or "provider_misconfigured",
                               f"the token endpoint of {provider.id} refused credproxy's "
                               f"client ({answer.detail}): check providers[{provider.id}]"
                               ".client_id, its client secret and token_endpoint_auth_method",
                               user=user, provider=provider.id)
    if answer.reason == "no_user_token":
        return ConnectRejected("no_user_token", f"{provider.id}: {answer.detail}",
                               user=user, provider=provider.id)
    if answer.code is not None:
        code = from_provider_code(answer.code)
        return ConnectRejected(f"token_exchange_failed:{code}",
                               f"the provider refused the code ({answer.detail})",
                               user=user, provider=provider.id)
    return ConnectRejected("token_exchange_failed",
                           f"the token endpoint could not be used ({answer.detail})",
                           user=user, provider=provider.id)


def _read_values(provider: ProviderSettings, source: ValueSource,
                 read: Callable[[GrantValueSettings, str], str | list[str] | None]
                 ) -> dict[str, GrantValue]:
    """The provider's grant values from ``source``, each read by ``read(spec, name)`` and
    checked (:func:`proxy.binding.check_value`). Raises :class:`BindingError`."""
    out: dict[str, GrantValue] = {}
    for name, spec in provider.grant_values.items():
        if spec.source == source:
            value = binding.check_value(name, spec, read(spec, name),
                                        ceiling=provider.ceiling())
            if value is not None:
                out[name] = value
    return out


def imported_values(provider: ProviderSettings, given: Mapping[str, str],
                    kept: Mapping[str, GrantValue]) -> dict[str, GrantValue]:
    """The grant values of an imported token set (``credproxy vault put --value``):
    ``kept`` (the values of the grant it replaces: a new token set does not move the
    grant to another tenant) with ``given`` over them, each checked as at connect time,
    and the result binding hosts inside the provider's ceiling. Raises
    :class:`BindingError` (``grant_value_invalid`` also for a name the provider does
    not have)."""
    values: dict[str, GrantValue] = dict(kept)
    for name, raw in given.items():
        spec = provider.grant_values.get(name)
        if spec is None:
            raise BindingError("grant_value_invalid",
                               f"{provider.id} has no grant value {name!r} (it has "
                               f"{sorted(provider.grant_values) or 'none'})")
        value = binding.check_value(name, spec, raw, ceiling=provider.ceiling())
        if value is not None:
            values[name] = value
    for resource in (None, *provider.resources):
        provider.own_hosts(resource, values)
    return values


def _callback_values(provider: ProviderSettings, params: Mapping[str, str],
                     chosen: Mapping[str, GrantValue]) -> dict[str, GrantValue]:
    """The ``from: callback`` values, checked; and a chosen value whose parameter comes
    back on the callback (Shopify's ``shop``) must come back equal
    (``grant_value_mismatch``). Raises :class:`BindingError`."""
    values = _read_values(provider, "callback",
                          lambda spec, name: params.get(spec.param or name))
    for name, spec in provider.grant_values.items():
        param = spec.param or name
        if spec.source != "choice" or param not in params:
            continue
        echoed = binding.check_value(name, spec, params[param], ceiling=provider.ceiling())
        if echoed != chosen.get(name):
            raise BindingError("grant_value_mismatch",
                               f"the callback's {param!r} is not the {name!r} chosen when "
                               "the sign-in began; start again")
    return values


def _browser_hash(nonce: str) -> str:
    return hashlib.sha256(b"credproxy connect browser\x00" + nonce.encode()).hexdigest()


def _check_iss(params: Mapping[str, str], issuer: str, user: str, provider: str) -> None:
    """RFC 9207 section 2.4: an authorization response's ``iss`` (success or error) must be
    the issuer the flow was begun with (mix-up defence)."""
    iss = params.get("iss")
    if iss is not None and iss != issuer:
        raise ConnectRejected("iss_mismatch",
                              f"the authorization response came from issuer {iss[:120]!r}, "
                              f"not {issuer} (RFC 9207)", user=user, provider=provider)


def granted_scopes(provider: ProviderSettings, scope: str | None) -> list[str] | None:
    """A grant's scope string as a list (split on the provider's ``scope_separator`` and
    on spaces); None when the provider did not say."""
    if scope is None:
        return None
    return [s for s in scope.replace(provider.scope_separator, " ").split() if s]


def missing_required(provider: ProviderSettings, scope: str | None) -> list[str]:
    """The provider's ``required_scopes`` a grant of ``scope`` lacks (none when the scope
    is unknown: RFC 6749 section 5.1 says an omitted scope is the one requested)."""
    granted = granted_scopes(provider, scope)
    if granted is None:
        return []
    return [s for s in provider.required_scopes if s not in granted]


def _actor(sealed: object) -> Actor | None:
    """The actor a flow was begun for (kept in its sealed state record), else None."""
    if isinstance(sealed, list) and len(sealed) == 2 and sealed[0] in (
            "cli", "admin", "user", "system") and isinstance(sealed[1], str):
        return Actor(sealed[0], sealed[1])
    return None


# The grant value holding the account the provider reports (shown, never authorizing).
ACCOUNT_VALUE = "account"
_ACCOUNT_CLAIMS = ("email", "preferred_username", "upn", "sub")


def reported_account(response: Mapping[str, Any]) -> str | None:
    """The account a token response names, for people to recognise their connection: the
    ``id_token``'s ``email``, ``preferred_username``, ``upn`` or ``sub`` claim (OpenID
    Connect Core section 2), the first present; None without one. The ID token comes
    straight from the token endpoint over TLS, which OpenID Connect Core section 3.1.3.7
    accepts instead of checking its signature; the value is only shown, never used to
    decide anything. At most 200 printable characters."""
    token = response.get("id_token")
    if not isinstance(token, str) or token.count(".") != 2 or len(token) > 16384:
        return None
    body = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(claims, dict):
        return None
    for name in _ACCOUNT_CLAIMS:
        value = claims.get(name)
        if isinstance(value, str) and value.strip() and value.isprintable():
            return value.strip()[:200]
    return None


def _check_required(provider: ProviderSettings, requested: list[str]) -> None:
    """Raise :class:`ConnectRejected` (``required_scope_not_requested``) when a choice of
    scopes leaves out one of the provider's ``required_scopes``."""
    left_out = [s for s in provider.required_scopes if s not in requested]
    if left_out:
        raise ConnectRejected("required_scope_not_requested",
                              f"scopes {left_out} are required for {provider.id} "
                              f"(providers[{provider.id}].required_scopes): the agent's "
                              "calls need them; choose them too", provider=provider.id)
