"""The per-request decision: verify the user, route, get the user's token, audit.

The mitmproxy addon turns a flow into an :class:`Outbound`, calls :meth:`Sidecar.decide`
and applies the result. Every refusal is a :class:`proxy.errors.ProxyRefusal`; nothing is
forwarded when one is raised.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

from proxy.audit import AuditLog, RequestInfo, TokenSource
from proxy.binding import BindingError
from proxy.errors import (
    AuditUnavailable,
    CredentialStoreUnavailable,
    CredproxyError,
    InsufficientScope,
    MalformedRequest,
    MisdirectedRequest,
    ProviderNotPermitted,
    ProxyRefusal,
    ReauthRequired,
    Suspended,
    UnroutedDenied,
    UserContextInvalid,
    UserContextMissing,
)
from proxy.headers import AUTHORIZATION, ReadHeaders, check_target, field_key
from proxy.hosts import normalize_host, parse_authority, path_within
from proxy.identity import UserContext
from proxy.live import LiveConfig, Snapshot
from proxy.mcp import McpCall
from proxy.mcpauth import parse_challenge
from proxy.metrics import code_class, reason_label
from proxy.routes import Destination, host_agrees, refuse_retired
from proxy.secret import Secret
from proxy.settings import ProviderSettings
from proxy.suspensions import Suspensions
from proxy.tokens import TokenBroker
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant

log = logging.getLogger("credproxy.sidecar")
# Seconds between two notes of one grant's use (per process; Redis keeps the latest).
USE_NOTE_INTERVAL = 60.0
_SKEW_EVERY = 1.0  # seconds between two readings of one provider's Date header
_INVALID_TOKEN = re.compile(r'error\s*=\s*"?invalid_token"?', re.IGNORECASE)
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,256}")


def _scope_tokens(text: str) -> list[str]:
    """The valid scope tokens of a space-delimited list, in order, without repeats (at
    most 64: a challenge cannot make the connect URL unbounded)."""
    out: list[str] = []
    for item in text.split(" "):
        if _SCOPE_TOKEN.fullmatch(item) and item not in out:
            out.append(item)
    return out[:64]


def challenged_scopes(challenge: str) -> list[str] | None:
    """The scopes a ``WWW-Authenticate`` value asks for when it is a step-up (its Bearer
    challenge's ``error`` is ``insufficient_scope``, RFC 6750 section 3.1; the MCP scope
    challenge), else None. Auth-params are parsed per RFC 9110 section 11.2 (names and the
    error code case-insensitive; never a ``scope=`` inside another parameter's quoted
    value); the scope tokens are filtered by :func:`_scope_tokens`."""
    params = parse_challenge(challenge)
    if params.get("error", "").lower() != "insufficient_scope":
        return None
    return _scope_tokens(params.get("scope", ""))


@dataclass(frozen=True, slots=True)
class Outbound:
    """What the proxy knows about one request, independent of mitmproxy."""

    id: str
    method: str
    destination: Destination
    host_header: str | None
    path: str  # the request-target as forwarded (path and query): checked, never logged
    sni: str | None = None
    context_token: Secret | None = None  # per-request header or per-connection credential
    context_error: UserContextInvalid | None = None  # e.g. a duplicated header
    # The authority of an absolute-form request-target sent inside a CONNECT tunnel
    # (RFC 9112 section 3.2.2): servers route by it, so it must name the tunnel's authority.
    target: str | None = None
    # An MCP request's call (:func:`proxy.mcp.read_call`): named in its audit records.
    mcp: McpCall | None = None

    def audit_request(self) -> RequestInfo:
        d = self.destination
        host = d.host if d.default_port else f"{d.host}:{d.port}"
        return RequestInfo(id=self.id, method=self.method, host=host,
                           path=self.path.split("?", 1)[0],
                           mcp_method=self.mcp.method if self.mcp else None,
                           mcp_name=self.mcp.name if self.mcp else None,
                           mcp_calls=self.mcp.calls if self.mcp else ())


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Unrouted: forward unchanged (the user-context token is already stripped)."""


@dataclass(frozen=True, slots=True)
class Injection:
    """Remove every client-sent header named in ``remove``, set ``header`` to ``value``,
    and forward."""

    header: str
    value: Secret
    provider: ProviderSettings
    user: UserContext
    tokens: TokenSet
    resource: str | None = None  # one of the provider's resources (docs/tenants.md)
    # The snapshot the decision was made on: the upstream's answer is judged on it too.
    config: Snapshot | None = None

    @property
    def remove(self) -> tuple[str, ...]:
        """The client's own credentials for the upstream: Authorization (whatever header the
        provider injects) and the inject header itself, in every spelling
        (:meth:`proxy.headers.HeaderPolicy.without`). Replaced, never merged."""
        if field_key(self.header) == field_key(AUTHORIZATION):
            return (AUTHORIZATION,)
        return (AUTHORIZATION, self.header)


class Sidecar:
    """Decides on requests. The configuration (settings, router, verifier, header policy)
    is ``live``'s: each request runs on the one snapshot current when it started."""

    def __init__(self, live: LiveConfig, broker: TokenBroker, audit: AuditLog,
                 suspensions: Suspensions | None = None) -> None:
        """``suspensions``: the kill switch's active list (kept current by
        :class:`proxy.suspensions.SuspensionSync`); None: no kill switch (tests)."""
        self.metrics = broker.metrics
        self.live = live
        self.broker = broker
        self.audit = audit
        self.suspensions = suspensions
        self._skew_seen: dict[str, float] = {}  # provider id -> when its Date was last read
        # (user, provider) -> when this process last noted an injection (throttle).
        self._noted: dict[tuple[str, str], float] = {}
        self._noting: set[asyncio.Task[None]] = set()

    async def decide(self, req: Outbound, config: Snapshot | None = None
                     ) -> Passthrough | Injection:
        """Decide on one request: a :class:`Passthrough` for an unrouted destination, an
        :class:`Injection` for a provider's. Raises :class:`ProxyRefusal` (audited and
        counted) for everything else; nothing is forwarded then. ``config``: the snapshot
        the caller already read the request with (:meth:`read_headers`); default: the
        current one. The whole decision, token refresh included, runs on it."""
        with self.live.pinned(config) as snap:
            return await self._decide(req, snap)

    async def _decide(self, req: Outbound, snap: Snapshot) -> Passthrough | Injection:
        dest = req.destination
        route = snap.router.match(dest, req.path)
        provider = route.provider if route is not None else None
        try:
            self._check_target(req, credentialed=provider is not None)
        except ProxyRefusal as refusal:
            self._refused(req, provider, None, refusal)
            raise
        misdirected = not host_agrees(dest, req.host_header) or not _sni_agrees(dest, req.sni)
        if route is None or provider is None:
            try:
                decision = self._unrouted(req, misdirected, snap)
            except ProxyRefusal as refusal:
                self._refused(req, None, None, refusal)
                raise
            self.metrics.requests.labels("-", "passthrough").inc()
            return decision
        user: UserContext | None = None
        try:
            if misdirected:
                raise MisdirectedRequest("the Host header (or SNI) does not match the "
                                         f"destination {dest}; no credential was sent",
                                         reason="host_mismatch")
            if not dest.tls and not provider.allow_http:
                raise ProviderNotPermitted(f"{provider.id} is only reachable over TLS",
                                           reason="insecure_transport")
            if req.context_error is not None:
                raise req.context_error
            user = await snap.verifier.verify(req.context_token)
            self._check_mcp(req, provider)
            self._check_suspended(user, provider)
            injection = replace(await self._inject(req, provider, user, route.resource),
                                config=snap)
        except ProxyRefusal as refusal:
            self._refused(req, provider, user, refusal)
            raise
        self.metrics.requests.labels(provider.id, "injected").inc()
        self._note_use(user.user, provider.id)
        return injection

    def _note_use(self, user: str, provider: str) -> None:
        """Note the injection for the self-service page's "last used": at most once per
        :data:`USE_NOTE_INTERVAL` per grant and process, in the background (never awaited
        on the request path; a failure is only logged: the shown time is then older)."""
        now = time.time()
        key = (user, provider)
        if now - self._noted.get(key, 0.0) < USE_NOTE_INTERVAL:
            return
        if len(self._noted) > 100_000:  # bounded: forget the lot rather than grow
            self._noted.clear()
        self._noted[key] = now

        async def note() -> None:
            try:
                await self.broker.coordinator.note_use(user, provider, now)
            except CredproxyError as exc:
                log.info("last use of a grant not noted (%s)", type(exc).__name__)

        task = asyncio.get_running_loop().create_task(note())
        self._noting.add(task)
        task.add_done_callback(self._noting.discard)

    def _check_suspended(self, user: UserContext, provider: ProviderSettings) -> None:
        """The kill switch, before any token is loaded, refreshed or injected: raises
        :class:`Suspended` when a suspension names the user, the user context's id or the
        provider, and :class:`CredentialStoreUnavailable` (``suspensions_unknown``) while
        this process has never read the suspensions (it cannot know who is suspended)."""
        active = self.suspensions
        if active is None:
            return
        if not active.loaded:
            raise CredentialStoreUnavailable(
                "this proxy has not been able to read the list of suspended users yet "
                "(Redis unreachable since it started, or an unreadable suspensions file); "
                "no credential is sent until it can: retry shortly",
                reason="suspensions_unknown", retry_after=2)
        hit = active.match(user.user, user.context_id, provider.id)
        if hit is None:
            return
        named = {"user": f"user {user.user}",
                 "context": f"user context {user.context_id} (this chat or workflow run)",
                 "provider": f"provider {provider.id} for every user"}[hit.kind]
        raise Suspended(f"access is suspended for {named} since {hit.since_text()}; "
                        f"nothing was sent to {provider.id}. Ask your administrator to "
                        "resume it (credproxy resume)", provider=provider.id, kind=hit.kind,
                        since=hit.since_text())

    def _check_target(self, req: Outbound, *, credentialed: bool) -> None:
        """The request-target every later hop reads the same way (:func:`check_target`);
        inside a tunnel an absolute-form target must name the tunnel's authority, checked
        before routing: a server that routes by the request-target would take the request
        to another virtual host than the one the proxy decided for."""
        check_target(req.path, req.method, credentialed=credentialed)
        if req.target is not None and not host_agrees(req.destination, req.target):
            raise MisdirectedRequest("the request-target names another authority than the "
                                     f"tunnel to {req.destination}; send origin-form "
                                     "requests inside a tunnel", reason="target_mismatch")

    def _refused(self, req: Outbound, provider: ProviderSettings | None,
                 user: UserContext | None, refusal: ProxyRefusal) -> None:
        """Count a refusal; audit it too when it concerns a provider (a failed audit write
        is counted where it failed, not audited again)."""
        self._count_refusal(provider.id if provider else "-", refusal)
        if provider is not None and not isinstance(refusal, AuditUnavailable):
            self._audit_refusal(req, provider, user, refusal)

    def read_headers(self, fields: Sequence[tuple[bytes, bytes]],
                     config: Snapshot | None = None) -> ReadHeaders:
        """:meth:`HeaderPolicy.read` with the header policy of ``config`` (default: the
        current snapshot), with a refusal counted. Raises :class:`MalformedRequest`."""
        policy = (config or self.live.current).headers
        try:
            return policy.read(fields)
        except MalformedRequest as refusal:
            self._count_refusal("-", refusal)
            raise

    def exchange_failed(self, req: Outbound | None, injection: Injection | None, *,
                        reason: str) -> None:
        """The exchange broke after the decision (mitmproxy's ``error``). ``reason``:
        ``upstream_unreachable`` (DNS, connect or TLS failed: nothing was sent),
        ``upstream_protocol_error`` (the destination broke off or answered what cannot be
        forwarded), ``client_protocol_error`` (e.g. a refused trailer section),
        ``client_disconnected``, or ``exchange_failed``. Counted by reason; for a
        credentialed request also audited as ``request.failed``, so the trail does not end
        at ``credential.injected``. Raises
        :class:`AuditUnavailable` when that record cannot be written (counted)."""
        provider = injection.provider if injection is not None else None
        self.metrics.upstream_errors.labels(provider.id if provider else "-",
                                            reason_label(reason)).inc()
        if req is None or injection is None or provider is None:
            return
        self._record("request.failed", req, provider, injection.user, outcome="failed",
                     reason=reason, token=injection.tokens.access_token, token_source=None)

    def _unrouted(self, req: Outbound, misdirected: bool, snap: Snapshot) -> Passthrough:
        # mitmproxy connects to the real destination (the CONNECT authority, the
        # absolute-form authority), never to the Host header's host, so a mismatch alone
        # cannot misroute an unrouted request (clients CONNECT to IP addresses and name the
        # site in Host). It matters when the client names a provider: it believes it talks
        # to the provider while the tunnel goes elsewhere; answer 421 rather than pass the
        # request on without a credential.
        refuse_retired(snap.router, req.destination)  # once a provider: never pass through
        if misdirected and self._claims_provider(req, snap):
            raise MisdirectedRequest("the Host header (or SNI) names a provider host but the "
                                     f"request goes to {req.destination}",
                                     reason="host_mismatch")
        if snap.settings.unrouted == "deny":
            raise UnroutedDenied(f"{req.destination} is not a configured provider",
                                 reason="unrouted")
        return Passthrough()

    def _claims_provider(self, req: Outbound, snap: Snapshot) -> bool:
        """Whether the Host header or the SNI names a provider's host (on any port). A name
        that cannot be parsed counts: it might."""
        dest = req.destination
        try:
            names = [parse_authority(req.host_header, tls=dest.tls)[0]] if req.host_header else []
            if dest.tls and req.sni:
                names.append(normalize_host(req.sni))
        except ValueError:
            return True
        return any(snap.router.claims_host(name) for name in names)

    def _count_refusal(self, provider: str, refusal: ProxyRefusal) -> None:
        m = self.metrics
        m.requests.labels(provider, "denied").inc()
        m.denials.labels(provider, refusal.slug, reason_label(refusal.reason)).inc()
        if isinstance(refusal, ReauthRequired):
            m.reauth.labels(provider, reason_label(refusal.reason)).inc()

    async def _inject(self, req: Outbound, provider: ProviderSettings,
                      user: UserContext, resource: str | None) -> Injection:
        if not user.permits(provider.id):
            raise ProviderNotPermitted(f"this user context may not use {provider.id}",
                                       reason="context_excludes_provider")
        if provider.methods is not None and req.method.upper() not in provider.methods:
            raise ProviderNotPermitted(f"method {req.method} is not allowed for {provider.id}",
                                       reason="method_not_allowed")

        async def refreshed(tokens: TokenSet) -> None:
            self._record("credential.refreshed", req, provider, user, outcome="refreshed",
                         token=tokens.access_token, token_source="refresh")

        def own_host(grant: Grant) -> None:
            self._check_own_host(req.destination, provider, resource, grant)

        try:
            issued = await self.broker.get(user.user, provider, on_refreshed=refreshed,
                                           resource=resource, admit=own_host)
        except ReauthRequired as exc:
            _lead_back(exc, provider, resource, req.destination)
            raise
        tokens = issued.tokens
        inject = provider.inject_for(resource)
        value = inject.format.format(access_token=tokens.access_token.reveal(),
                                     token_type=tokens.token_type)
        # Audit before the credential is used: if the record cannot be written, nothing is
        # injected (AuditUnavailable propagates to the agent).
        self._record("credential.injected", req, provider, user, outcome="injected",
                     token=tokens.access_token, token_source=issued.source)
        self.metrics.injections.labels(provider.id, issued.source).inc()
        return Injection(inject.header, Secret(value), provider, user, tokens, resource)

    @staticmethod
    def _check_mcp(req: Outbound, provider: ProviderSettings) -> None:
        """An MCP request whose ``Mcp-Method`` / ``Mcp-Name`` disagree with its body is
        refused (a server routing by the fields would run another tool than the audit
        names); an ``mcp`` provider's credential goes only to the server's endpoint, the
        token's audience (RFC 8707 section 2), never to another path on its host."""
        if req.mcp is not None and req.mcp.conflict is not None:
            raise MalformedRequest(
                f"the MCP request's header fields disagree with its body ({req.mcp.conflict});"
                " send Mcp-Method / Mcp-Name that match the JSON-RPC message, or none",
                reason="mcp_header_mismatch")
        resource = provider.mcp_resource
        if resource is not None and not path_within(resource, req.path):
            raise ProviderNotPermitted(
                f"{req.path.split('?', 1)[0][:200]} is not the MCP server {resource}: "
                f"{provider.id}'s credential goes only to the server's endpoint; nothing was "
                "sent", reason="outside_mcp_resource")

    def _check_own_host(self, dest: Destination, provider: ProviderSettings,
                        resource: str | None, grant: Grant) -> None:
        """A provider that binds its grants to their tenant (``grant_hosts``) routed
        ``dest`` by its ceiling; the credential goes there only when ``dest`` is one of
        this grant's own hosts, rendered from the grant's values with the running config
        (docs/tenants.md). Raises :class:`ProviderNotPermitted` (``not_grant_host``: nothing
        is sent, so that host's 401 can never touch the grant) or :class:`ReauthRequired`
        (the grant lacks a value the running config needs: it must be reconnected)."""
        minted_for = grant.values.get("mcp_resource")
        if provider.mcp is not None and minted_for != provider.mcp_resource:
            # Grants are keyed by (user, resource, issuer): one minted for the server the
            # provider named before is never sent to the one it names now.
            raise self.broker.reauth(
                provider, "mcp_resource_changed",
                f"the connection to {provider.id} was made for {minted_for}, not "
                f"{provider.mcp_resource}; the user must reconnect")
        try:
            own = provider.own_hosts(resource, grant.values)
        except BindingError as exc:
            raise self.broker.reauth(provider, exc.reason,
                                     f"{exc.detail}; the user must reconnect {provider.id}"
                                     ) from None
        if own is None:
            return
        for host in own:
            if host.matches(dest.host, dest.port, tls=dest.tls):
                return
        names = ", ".join(str(h) for h in own)
        raise ProviderNotPermitted(
            f"{dest} is not this user's {provider.id} tenant: their grant is bound to "
            f"{names}; no credential was sent", reason="not_grant_host")

    async def upstream_response(self, req: Outbound, injection: Injection, status: int,
                                headers: Mapping[str, str]) -> ProxyRefusal | None:
        """Decide on the upstream's answer to a credentialed request; None lets it through.

        Every answer is counted by status class, and its ``Date`` header (RFC 9110 section
        6.6.1) sets the provider's clock skew gauge. An upstream 401 (or
        ``error="invalid_token"``, RFC 6750 section 3.1) on a token the proxy believed
        valid gets one forced refresh (:meth:`TokenBroker.refresh_rejected`) before the
        grant is declared dead:

        - refreshed: the grant lives; 503 ``credential-store-unavailable``
          (``token_refreshed``, Retry-After 1): the agent retries with the new token;
        - the token was already replaced by a concurrent refresh: the same answer with
          ``token_superseded``;
        - no refresh token, invalid_grant, or a rejection again right after a forced
          refresh: ``reauth-required`` (``revoked_upstream``), the grant is marked;
        - the refresh cannot run now: that refusal (``fencing``, ``coordination_unavailable``,
          ``token-refresh-failed``, ...), the grant untouched.

        The proxy never replays the request itself (its body may not be repeatable, and a
        non-idempotent call must not run twice)."""
        provider = injection.provider
        self.metrics.upstream_responses.labels(provider.id, code_class(status)).inc()
        self._observe_skew(provider, headers)
        challenge = headers.get("WWW-Authenticate", "")
        if status in (401, 403) and challenged_scopes(challenge) is not None:
            return self.scope_challenged(req, injection, status, challenge)
        if status != 401 and not _INVALID_TOKEN.search(challenge):
            return None
        return await self.token_rejected(req, injection, status)

    def scope_challenged(self, req: Outbound, injection: Injection, status: int,
                         challenge: str) -> InsufficientScope:
        """The upstream answered ``error="insufficient_scope"`` (RFC 6750 section 3.1;
        the MCP authorization spec's step-up): the token is valid but too narrow. No
        refresh (a refresh keeps the scope; asking again would loop): the agent gets 403
        ``insufficient-scope`` naming the union of the grant's scopes and the challenged
        ones (RFC 6750's ``scope`` attribute), with a connect URL that requests exactly
        that. The grant stays active for what it covers. Audited ``credential.denied``."""
        provider, user = injection.provider, injection.user
        held = _scope_tokens((injection.tokens.scope or "").replace(
            provider.scope_separator, " ") if injection.tokens.scope else "")
        asked = challenged_scopes(challenge) or []
        # Required scopes too: a connect that leaves one out is refused.
        union = list(dict.fromkeys([*held, *asked, *provider.required_scopes]))
        # An MCP server by URL alone has no configured scopes: what it and its
        # authorization server advertise is its ceiling (proxy.mcpauth.scope_ceiling).
        ceiling = (self.broker.mcp_ceiling(provider)
                   if provider.mcp is not None and not provider.allowed_scopes
                   else provider.allowed_scopes)
        beyond = [s for s in union if ceiling is not None and s not in ceiling
                  and not (provider.mcp is not None and s == "offline_access")]
        base = self.live.current.connect_url(provider)
        url = f"{base}{'&' if '?' in base else '?'}{urlencode({'scope': ' '.join(union)})}"
        detail = (f"{provider.id} needs more scope than the user's grant holds "
                  f"(it asked for {' '.join(asked) or 'an unnamed scope'}): the user must "
                  f"consent to {' '.join(union)} at connect_url; the grant keeps serving "
                  "what it already covers")
        if beyond and provider.allowed_scopes:
            detail += (f". {', '.join(beyond)} {'is' if len(beyond) == 1 else 'are'} not in "
                       f"providers[{provider.id}].scope_ceiling: an operator must add "
                       f"{'it' if len(beyond) == 1 else 'them'} before the user can consent")
        elif beyond:
            detail += (f". {', '.join(beyond)} {'is' if len(beyond) == 1 else 'are'} not "
                       f"advertised by {provider.id} or its authorization server, so the "
                       "consent cannot include it: the server's operator must add it to "
                       "its metadata (or an operator configures providers"
                       f"[{provider.id}].scopes)")
        refusal = InsufficientScope(detail, provider=provider.id, scope=" ".join(union),
                                    connect_url=url)
        self.metrics.denials.labels(provider.id, refusal.slug,
                                    reason_label(refusal.reason)).inc()
        self._record("credential.denied", req, provider, user, outcome="denied",
                     reason=refusal.reason, upstream_status=status,
                     token=injection.tokens.access_token, token_source=None)
        return refusal

    async def token_rejected(self, req: Outbound, injection: Injection, status: int, *,
                             signal: str | None = None) -> ProxyRefusal:
        """The upstream rejected the injected token: by its status (401,
        ``error="invalid_token"``) or, with ``signal`` (a reason code from
        :func:`proxy.dialect.api_signal`), by a revoked-token signal in a small JSON body
        (Slack's HTTP 200 ``{"ok": false, "error": "token_revoked"}``). Either is answered
        the same way (:meth:`upstream_response`): one forced refresh, then
        ``reauth-required``. Returns the refusal for the agent; it is audited."""
        provider, user = injection.provider, injection.user
        said = f"HTTP {status}" if signal is None else f"HTTP {status} saying {signal}"

        async def refreshed(tokens: TokenSet) -> None:
            self._record("credential.refreshed", req, provider, user, outcome="refreshed",
                         token=tokens.access_token, token_source="refresh")

        refusal: ProxyRefusal
        try:
            # On the configuration the token was injected with (its client secret).
            with self.live.pinned(injection.config):
                outcome = await self.broker.refresh_rejected(
                    user.user, provider, injection.tokens.access_token,
                    on_refreshed=refreshed, resource=injection.resource)
        except ProxyRefusal as exc:
            refusal = exc
        else:
            if outcome == "refreshed":
                refusal = CredentialStoreUnavailable(
                    f"{provider.id} rejected the user's token ({said}) although it "
                    "had not expired by this proxy's clock; a new token was obtained and the "
                    "grant is valid: retry the request (the proxy does not replay it)",
                    reason="token_refreshed", retry_after=1)
            else:
                refusal = CredentialStoreUnavailable(
                    f"{provider.id} rejected a token that a concurrent refresh has since "
                    "replaced; the grant is valid: retry the request",
                    reason="token_superseded", retry_after=1)
        if isinstance(refusal, ReauthRequired):
            event = "reauth.required"
            self.metrics.reauth.labels(provider.id, reason_label(refusal.reason)).inc()
        else:
            event = "credential.denied"
        # The request was counted as injected; the agent still gets a problem.
        self.metrics.denials.labels(provider.id, refusal.slug, reason_label(refusal.reason)).inc()
        self._record(event, req, provider, user, outcome="denied", reason=refusal.reason,
                     upstream_status=status, token=injection.tokens.access_token,
                     token_source=None)
        return refusal

    def _observe_skew(self, provider: ProviderSettings, headers: Mapping[str, str]) -> None:
        """Set the provider's clock skew gauge (provider minus local, seconds) from a valid
        ``Date`` header; a missing or malformed one changes nothing. At most once a second
        per provider: ``Date`` has a resolution of one second, and parsing it on every
        response would only cost time on the request path."""
        now = time.monotonic()
        if now - self._skew_seen.get(provider.id, -_SKEW_EVERY) < _SKEW_EVERY:
            return
        value = headers.get("Date")
        if not value:
            return
        self._skew_seen[provider.id] = now
        try:
            date = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return
        if date.tzinfo is None:  # RFC 9110 dates are GMT; "-0000" parses as naive
            date = date.replace(tzinfo=UTC)
        self.metrics.clock_skew.labels(provider.id).set(date.timestamp() - time.time())

    def _audit_refusal(self, req: Outbound, provider: ProviderSettings,
                       user: UserContext | None, refusal: ProxyRefusal) -> None:
        if isinstance(refusal, UserContextMissing):
            event = "identity.rejected"
        elif isinstance(refusal, ReauthRequired):
            event = "reauth.required"
        else:
            event = "credential.denied"
        self._record(event, req, provider, user, outcome="denied", reason=refusal.reason)

    def _record(self, event: str, req: Outbound, provider: ProviderSettings,
                user: UserContext | None, *, outcome: str, reason: str | None = None,
                upstream_status: int | None = None, token: Secret | None = None,
                token_source: TokenSource | None = None) -> dict[str, Any]:
        try:
            return self.audit.record(
                event,
                user=user.user if user else None,
                provider=provider.id,
                context=user.context() if user else None,
                request=req.audit_request(),
                outcome=outcome,
                reason=reason,
                upstream_status=upstream_status,
                token=token,
                token_source=token_source,
            )
        except AuditUnavailable:
            # Every failed write, whatever the event (injection, denial, re-auth).
            self.metrics.audit_failures.inc()
            raise


def _lead_back(refusal: ReauthRequired, provider: ProviderSettings, resource: str | None,
               dest: Destination) -> None:
    """Give ``refusal``'s connect URL the choice that leads back to the tenant the request
    was for (``?shop=<the destination>`` for a provider bound by a chosen host): without
    it the link would ask for a value the agent cannot supply from the refusal alone."""
    host = dest.host if dest.default_port else f"{dest.host}:{dest.port}"
    choices = provider.connect_choices(resource, host)
    if choices and "?" not in refusal.connect_url:
        refusal.connect_url = f"{refusal.connect_url}?{urlencode(choices)}"


def _sni_agrees(dest: Destination, sni: str | None) -> bool:
    if not dest.tls or sni is None:
        return True
    try:
        return normalize_host(sni) == dest.host
    except ValueError:
        return False
