"""The admin server (a separate port from the proxy): probes, metrics, and the web
connect flow (`/connect/{provider}` -> provider -> `/oauth/callback`).

Probes (Kubernetes semantics; docs/operations.md "Probes"):

- ``/healthz`` liveness: the process serves HTTP.
- ``/startupz`` startup: what this sidecar needs to serve, nothing external: the CA in
  ``ca_dir`` and the ``ready_checks`` (the proxy port accepts, ...). Config and keys are
  loaded before the admin port opens (a bad one exits the process).
- ``/readyz`` readiness: the startup checks, and not draining; 503 when one fails. Shared
  dependencies (vault, Redis) only *degrade* it: 200 with ``"status": "degraded"`` naming
  them, since an outage of a store every pod shares would otherwise take every agent pod
  out of its Service at once, cached tokens and unrouted traffic included.

The web flow is bound to the browser that started it: `/connect` sets a random nonce in a
cookie scoped to `/oauth/callback` (HttpOnly, SameSite=Lax, Secure behind an https
`public_url`, living as long as the flow's state), named after the flow's state so that
flows in several tabs do not clash; the callback refuses a flow whose cookie is missing or
different (an authorize URL sent to someone else), and clears the cookie.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from proxy.audit import Actor
from proxy.binding import BindingError
from proxy.connect import (
    ACCOUNT_VALUE,
    Connector,
    ConnectRejected,
    granted_scopes,
    missing_required,
)
from proxy.errors import (
    CredentialStoreUnavailable,
    CredproxyError,
    ProxyRefusal,
    UserContextInvalid,
    VaultError,
)
from proxy.live import LiveConfig, Snapshot
from proxy.mcpauth import CLIENT_METADATA_PATH, client_metadata
from proxy.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from proxy.metrics import Metrics
from proxy.offboard import Offboarder
from proxy.problems import problem_response
from proxy.secret import Secret
from proxy.selfservice import (
    SESSION_COOKIE,
    Row,
    Session,
    Sessions,
    choices_of,
    message_page,
    render,
)
from proxy.settings import ProviderSettings, Settings
from proxy.suspensions import Suspensions
from proxy.vault.base import GrantInfo, Vault

log = logging.getLogger("credproxy.admin")

# Below the kubelet's readiness probe timeout (2 s by default and in deploy/k8s).
READY_CHECK_TIMEOUT = 1.5
_COOKIE = "credproxy_connect_"


def _cookie_name(state: str) -> str:
    return _COOKIE + hashlib.sha256(state.encode()).hexdigest()[:16]


def _to_provider(url: str, nonce: str, settings: Settings, *, status: int) -> web.Response:
    """The redirect to a provider's authorize ``url`` that starts a connect flow, with the
    browser-binding cookie the callback must present (``nonce``, for this flow's state
    only, under ``/oauth/callback``)."""
    state = parse_qs(urlsplit(url).query).get("state", [""])[0]
    response = web.Response(status=status, headers={"Location": url,
                                                    "Cache-Control": "no-store"})
    response.set_cookie(_cookie_name(state), nonce, max_age=settings.connect.state_ttl,
                        path="/oauth/callback", httponly=True, samesite="Lax",
                        secure=settings.connect_base.startswith("https://"))
    return response


def _page(title: str, body: str, status: int) -> web.Response:
    text = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title></head><body><h1>{html.escape(title)}</h1><p>{html.escape(body)}</p>"
            "</body></html>")
    return web.Response(text=text, status=status, content_type="text/html",
                        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
                                 "X-Frame-Options": "DENY",
                                 "Content-Security-Policy": "default-src 'none'; "
                                 "frame-ancestors 'none'"})


Checks = Sequence[tuple[str, Callable[[], Awaitable[object]]]]
# When each of a user's grants was last injected: (user, providers) -> {provider: unix s}.
LastUsed = Callable[[str, list[str]], Awaitable[Mapping[str, float]]]
PAGE = "/connections"


def _html(text: str, status: int, *, referrer: str = "same-origin") -> web.Response:
    """A page of the self-service flow. ``referrer``: its Referrer-Policy; the page's own
    forms need ``same-origin`` (under ``no-referrer`` a browser posts ``Origin: null``),
    the hand-over answer, whose URL holds the user context, ``no-referrer``."""
    return web.Response(text=text, status=status, content_type="text/html",
                        headers={"Cache-Control": "no-store", "Referrer-Policy": referrer,
                                 "X-Frame-Options": "DENY",
                                 "Content-Security-Policy": "default-src 'none'; "
                                 "style-src 'unsafe-inline'; form-action 'self' https: http:; "
                                 "frame-ancestors 'none'"})


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _problem(error: ProxyRefusal, *, status: int | None = None,
             headers: Mapping[str, str] | None = None) -> web.Response:
    """An RFC 9457 problem answer of the admin API (``status``: instead of the refusal's
    own, e.g. 401 rather than the proxy's 407 for a user context)."""
    problem = problem_response(error)
    body = json.loads(problem.body)
    if status is not None:
        body["status"] = status
    return web.Response(body=json.dumps(body).encode(), status=status or problem.status,
                        headers={**problem.headers, **(headers or {})})


def _connection(provider: ProviderSettings, grant: GrantInfo | None,
                connect_url: str) -> dict[str, object]:
    """One provider's entry in ``/v1/connections`` (never a token value)."""
    # "choices": what the connect link needs (?shop=...) for a provider bound by a choice.
    choices = sorted(spec.param or name for name, spec in provider.grant_values.items()
                     if spec.source == "choice")
    entry: dict[str, object] = {"provider": provider.id, "connect_url": connect_url,
                                "choices": choices}
    if grant is None:
        # A provider that binds its grants: no host gets a credential until the user
        # connects (its hosts are only the ceiling).
        entry.update(status="not_connected", reason=None, scope=None, expires_at=None,
                     has_refresh_token=False, values={},
                     hosts=[] if provider.grant_hosts else list(provider.hosts),
                     resources={rid: {"hosts": [] if r.grant_hosts else list(r.hosts),
                                      "scope": None,
                                      "expires_at": None}
                                for rid, r in provider.resources.items()})
        return entry
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in grant.values.items()}

    def hosts(resource: str | None) -> list[str]:
        try:
            own = provider.own_hosts(resource, grant.values)
        except BindingError:
            return []
        if own is not None:
            return [str(h) for h in own]
        return list(provider.hosts if resource is None else provider.resources[resource].hosts)

    resources: dict[str, object] = {}
    for rid in provider.resources:
        got = grant.resources.get(rid)
        resources[rid] = {"hosts": hosts(rid), "scope": got.scope if got else None,
                          "expires_at": got.expires_at if got else None}
    status, reason = grant.status.value, grant.reason
    problem = provider.binding_problem(grant.values) if status == "active" else None
    if problem is not None:
        # Requests get reauth-required for it: say so here too (a grant made before the
        # provider bound its grants, or bound outside a narrowed ceiling).
        status, reason = "reauth_required", problem.reason
    entry.update(status=status, reason=reason, scope=grant.scope,
                 expires_at=grant.expires_at, has_refresh_token=grant.has_refresh_token,
                 values=values, hosts=hosts(None), resources=resources)
    return entry


class AdminServer:
    def __init__(self, live: LiveConfig, connector: Connector, vault: Vault,
                 ready_checks: Checks, metrics: Metrics, *,
                 dependencies: Checks = (), draining: Callable[[], bool] = lambda: False,
                 ready_timeout: float = READY_CHECK_TIMEOUT,
                 liveness: Sequence[tuple[str, Callable[[], str | None]]] = (),
                 sessions: Sessions | None = None, offboarder: Offboarder | None = None,
                 last_used: LastUsed | None = None,
                 suspensions: Suspensions | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``live``: the running configuration (each connect request runs on one snapshot
        of it; the listening address and ``ca_dir`` are restart-only). ``ready_checks``:
        what the sidecar needs to serve (startup and readiness; a failure is 503).
        ``dependencies``: shared stores whose outage degrades readiness (200 ``degraded``)
        and sets ``credproxy_dependency_up``. ``draining``: True once shutdown began
        (readiness 503). Each check raises CredproxyError or OSError to fail
        and is bounded by ``ready_timeout`` seconds. ``liveness``: named functions that
        return what is wrong (``/healthz`` 503) or None. ``sessions``: the self-service
        page's sessions (without them the page answers 404); ``offboarder``: what its
        disconnect revokes with; ``last_used(user, providers)``: when each grant was last
        injected (unix seconds). ``suspensions``: the kill switch's list this process
        enforces (proxy.suspensions): a suspended connection shows as such."""
        self._suspensions = suspensions
        self._metrics = metrics
        self._live = live
        self._connector = connector
        self._vault = vault
        self._checks = ready_checks
        self._dependencies = dependencies
        self._draining = draining
        self._ready_timeout = ready_timeout
        self._liveness = liveness
        self._runner: web.AppRunner | None = None
        self._sessions = sessions
        self._offboarder = offboarder
        self._last_used = last_used
        self._clock = clock
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/startupz", self.startupz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/connect/{provider}", self.connect)
        app.router.add_get("/oauth/callback", self.callback)
        app.router.add_get(CLIENT_METADATA_PATH, self.client_metadata)
        app.router.add_get("/v1/connections", self.connections)
        app.router.add_get("/connections", self.page)
        app.router.add_post("/connections/connect", self.page_connect)
        app.router.add_post("/connections/disconnect", self.page_disconnect)
        self.app = app

    async def start(self) -> None:
        address = self._live.current.settings.admin
        assert address is not None
        host, _, port = address.rpartition(":")
        # access_log=None: /connect may carry a user context in its query string.
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host.strip("[]"), int(port)).start()
        log.info("admin server on %s", address)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def client_metadata(self, request: web.Request) -> web.Response:
        """credproxy's Client ID Metadata Document (MCP authorization, "Client ID Metadata
        Documents"; RFC 7591 section 2 members): 200 JSON whose ``client_id`` is its own
        URL under ``public_url``; 404 when ``public_url`` is not https."""
        settings = self._live.current.settings
        doc = client_metadata(settings.connect_base, settings.redirect_uri)
        if doc is None:
            return web.json_response({"error": "public_url is not https"}, status=404)
        return web.json_response(doc, headers={"Cache-Control": "max-age=3600"})

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: 200 ``{"status": "ok"}``, or 503 ``{"status": "failing", "checks":
        {name: what}}`` when a fault only a restart cures has lasted too long (each
        liveness check is synchronous and cheap)."""
        failing = {name: problem for name, check in self._liveness
                   if (problem := check()) is not None}
        if failing:
            return web.json_response({"status": "failing", "checks": failing}, status=503)
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(),
                            headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def startupz(self, request: web.Request) -> web.Response:
        """200 ``{"started": true, "checks": {...}}`` once the sidecar can serve, else 503
        naming the failing check. Never waits on Redis or the vault."""
        checks = await self._run([("ca", self._ca_present), *self._checks])
        started = all(v == "ok" for v in checks.values())
        return web.json_response({"started": started, "checks": checks},
                                 status=200 if started else 503)

    async def readyz(self, request: web.Request) -> web.Response:
        """Every check at once, each bounded by ``ready_timeout``: the answer comes within
        that time however many checks hang. 200 ``{"ready": true, "status": "ok" |
        "degraded", "checks": {...}, "degraded": [dependency, ...]}``; 503 with
        ``"status": "unready"`` when a startup check fails or the proxy is draining."""
        hard = [("ca", self._ca_present), *self._checks, ("draining", self._not_draining)]
        checks = await self._run([*hard, *self._dependencies])
        ready = all(checks[name] == "ok" for name, _ in hard)
        degraded = [name for name, _ in self._dependencies if checks[name] != "ok"]
        for name, _ in self._dependencies:
            self._metrics.dependency_up.labels(name).set(0 if name in degraded else 1)
        status = "unready" if not ready else "degraded" if degraded else "ok"
        return web.json_response({"ready": ready, "status": status, "checks": checks,
                                  "degraded": degraded}, status=200 if ready else 503)

    async def _run(self, checks: Checks) -> dict[str, str]:
        results = await asyncio.gather(*(self._check(check) for _, check in checks))
        return dict(zip([name for name, _ in checks], results, strict=True))

    async def _ca_present(self) -> None:
        ca = Path(os.path.expanduser(self._live.current.settings.ca_dir)) / "mitmproxy-ca.pem"
        if not ca.is_file():
            raise CredproxyError(f"the CA file {ca} is missing")

    async def _not_draining(self) -> None:
        if self._draining():
            raise CredproxyError("shutting down")

    async def _check(self, check: Callable[[], Awaitable[object]]) -> str:
        try:
            await asyncio.wait_for(check(), self._ready_timeout)
        except TimeoutError:
            return "unavailable: timeout"
        except (CredproxyError, OSError) as exc:
            return f"unavailable: {type(exc).__name__}"
        return "ok"

    @staticmethod
    def _context_header(request: web.Request, header: str) -> str | None:
        """The user-context ``header``'s value. Raises :class:`UserContextInvalid`
        (``duplicate_header``) when it is sent more than once, as the proxy does: which
        copy is the user would depend on who reads the request."""
        values = request.headers.getall(header, [])
        if len(values) > 1:
            raise UserContextInvalid(f"{header} was sent more than once",
                                     reason="duplicate_header")
        return values[0] if values else None

    async def connect(self, request: web.Request) -> web.StreamResponse:
        with self._live.pinned() as config:
            return await self._connect(request, config)

    async def _connect(self, request: web.Request, config: Snapshot) -> web.StreamResponse:
        provider = request.match_info["provider"]
        settings, verifier = config.settings, config.verifier
        repeated = sorted({k for k in request.query if len(request.query.getall(k)) > 1})
        if repeated:
            # Two values for one parameter (two scope lists, two contexts): no reading of
            # them is safe to pick, so none is.
            return _page("Sign-in not possible",
                         f"the link gives {', '.join(repeated)[:100]} more than once "
                         "(duplicate_parameter)", 400)
        try:
            raw = self._context_header(request, verifier.header)
            if raw is None and settings.connect.context_query:
                raw = request.query.get("context")
            user = await verifier.verify(Secret(raw) if raw else None)
            if not user.permits(provider):
                raise ConnectRejected("provider_not_permitted",
                                      "this user context may not use that provider",
                                      user=user.user, provider=provider)
            self._refuse_suspended(user.user, user.context_id, provider)
            scopes = request.query.get("scope")
            nonce = secrets.token_urlsafe(32)
            url = await self._connector.begin(
                user.user, provider, redirect_uri=settings.redirect_uri,
                scopes=scopes.replace(",", " ").split() if scopes else None,
                return_to=request.query.get("return_to"), browser=nonce,
                choices=dict(request.query), actor=Actor("user", user.user))
        except ProxyRefusal as exc:
            return _page("Sign-in not possible", f"user context rejected ({exc.reason})", 401)
        except ConnectRejected as exc:
            return _page("Sign-in not possible", f"{exc.detail} ({exc.reason})", 400)
        response = _to_provider(url, nonce, settings, status=302)
        # The hand-over also opens the self-service page (linked from the callback's page).
        self._open_session(response, settings, user.user, user.providers)
        return response

    async def connections(self, request: web.Request) -> web.Response:
        """The agent's own view (docs/tenants.md): ``GET /v1/connections`` with the user
        context in its header (the same JWS the agent sends through the proxy; never in
        the query). 200 ``{"user": ..., "connections": [...]}``: every provider the context
        permits, one entry each, with ``status`` (``active``, ``reauth_required``,
        ``corrupt`` or ``not_connected``), ``reason``, ``scope``, ``expires_at`` (unix
        seconds or null), ``has_refresh_token``, ``values`` (the grant's non-secret
        values), ``hosts`` (the grant's own hosts, or the provider's), ``resources``
        (per resource: hosts, scope, expires_at) and ``connect_url``. Never a token,
        never another user's grant. A context that fails verification: 401
        ``application/problem+json`` naming the reason; the vault unreadable: 503."""
        with self._live.pinned() as config:
            return await self._connections(request, config)

    async def _connections(self, request: web.Request, config: Snapshot) -> web.Response:
        verifier = config.verifier
        try:
            raw = self._context_header(request, verifier.header)
            user = await verifier.verify(Secret(raw) if raw else None)
        except ProxyRefusal as exc:
            return _problem(exc, status=401,
                            headers={"WWW-Authenticate":
                                     f'UserContext header="{verifier.header}"'})
        settings = config.settings
        try:
            grants = {g.provider: g for g in await self._vault.list(user.user)}
        except VaultError:
            return _problem(CredentialStoreUnavailable(
                "the credential store cannot be read right now; retry",
                reason="vault_unavailable", retry_after=5))
        out: list[dict[str, object]] = []
        for provider in settings.providers:
            if not user.permits(provider.id):
                continue
            entry = _connection(provider, grants.get(provider.id),
                                settings.connect_url(provider))
            entry["suspended"] = self._suspended(user.user, user.context_id, provider.id)
            out.append(entry)
        return web.json_response({"user": user.user, "connections": out},
                                 headers={"Cache-Control": "no-store"})

    # -- the self-service page (README "The self-service page") -------------------------

    def _open_session(self, response: web.StreamResponse, settings: Settings, user: str,
                      providers: frozenset[str] | None) -> Session | None:
        """Set a fresh page session for ``user`` on ``response``: ``HttpOnly``,
        ``SameSite=Strict``, ``Secure`` behind an https ``public_url``, ``Path=/``,
        living ``connect.session_ttl`` seconds."""
        if self._sessions is None:
            return None
        ttl = settings.connect.session_ttl
        session, cookie = self._sessions.new(user, providers, ttl=ttl, now=self._clock())
        response.set_cookie(SESSION_COOKIE, cookie, max_age=ttl, path="/", httponly=True,
                            samesite="Strict",
                            secure=settings.connect_base.startswith("https://"))
        return session

    def _session(self, request: web.Request) -> Session | None:
        if self._sessions is None:
            return None
        return self._sessions.read(request.cookies.get(SESSION_COOKIE), now=self._clock())

    async def page(self, request: web.Request) -> web.StreamResponse:
        """``GET /connections``: the signed-in user's connections. A user context (the
        ``identity.header``, or ``?context=`` with ``connect.context_query``) is handed
        over once: it opens a session (cookie) and, from the query, reloads the page
        without it. Without a session or context: 401. 404 when the page is off."""
        if self._sessions is None:
            raise web.HTTPNotFound()
        with self._live.pinned() as config:
            settings, verifier = config.settings, config.verifier
            try:
                raw = self._context_header(request, verifier.header)
                query = raw is None and settings.connect.context_query and \
                    "context" in request.query
                if query:
                    raw = request.query["context"]
                user = await verifier.verify(Secret(raw)) if raw else None
            except ProxyRefusal as exc:
                return _html(message_page("Sign-in not possible", "The user context was "
                                          f"rejected ({exc.reason}). Open the link from "
                                          "your agent again."), 401)
            if user is not None:
                # From the query: reload without it (off the address bar and history); the
                # reload is same-site, so the SameSite=Strict cookie goes with it.
                response = _html(message_page("Signing you in", "Loading your connections.",
                                              link=(PAGE, "Continue"), refresh=PAGE), 200,
                                 referrer="no-referrer")
                session = self._open_session(response, settings, user.user, user.providers)
                if query or session is None:
                    return response
                page = await self._render(config, session)
                page.cookies.update(response.cookies)
                return page
            session = self._session(request)
            if session is None:
                return _html(message_page("Sign-in needed", "Your session is missing or "
                                          "has expired. Open the connections link from "
                                          "your agent again."), 401)
            return await self._render(config, session)

    async def _render(self, config: Snapshot, session: Session, *, status: int = 200,
                      notice: str | None = None, alert: str | None = None) -> web.Response:
        """The page for ``session``'s user (``notice``: what was done; ``alert``: what
        was refused)."""
        assert self._sessions is not None
        settings = config.settings
        try:
            grants = {g.provider: g for g in await self._vault.list(session.user)}
        except VaultError:
            return _html(message_page("Try again", "The credential store cannot be read "
                                      "right now; reload in a few seconds."), 503)
        permitted = [p for p in settings.providers if session.permits(p.id)]
        used: Mapping[str, float] = {}
        if self._last_used is not None:
            try:
                used = await self._last_used(session.user, [p.id for p in permitted])
            except CredproxyError:
                used = {}
        rows = [self._row(p, grants.get(p.id), session.user, used.get(p.id))
                for p in permitted]
        return _html(render(session.user, rows, session.csrf, notice=notice, alert=alert),
                     status)

    def _suspended(self, user: str, context_id: str | None, provider: str
                   ) -> dict[str, str] | None:
        """The suspension (kind, since) that stops ``user``'s requests to ``provider``;
        None when none does (or this process has none to enforce)."""
        hit = (self._suspensions.match(user, context_id, provider)
               if self._suspensions is not None else None)
        return None if hit is None else {"kind": hit.kind, "since": hit.since_text()}

    def _refuse_suspended(self, user: str, context_id: str | None, provider: str) -> None:
        """A suspended user (or provider, or run) connects nothing new until an
        administrator resumes it (a disconnect stays possible). Raises
        :class:`ConnectRejected` (``suspended``)."""
        stopped = self._suspended(user, context_id, provider)
        if stopped is not None:
            exc = ConnectRejected("suspended",
                                  f"access to {provider} is suspended ({stopped['kind']}, "
                                  f"since {stopped['since']}): no new connection until an "
                                  "administrator resumes it", user=user, provider=provider)
            self._connector.rejected(exc, user=user, provider=provider)
            raise exc

    def _row(self, provider: ProviderSettings, grant: GrantInfo | None, user: str,
             last_used: float | None) -> Row:
        assert self._sessions is not None
        status, reason = ("not_connected", None) if grant is None else (
            grant.status.value, grant.reason)
        if grant is not None and status == "active":
            problem = provider.binding_problem(grant.values)
            if problem is not None:
                status, reason = "reauth_required", problem.reason
        stopped = self._suspended(user, None, provider.id)
        if stopped is not None and grant is not None:
            # The user's own or the provider's suspension (a chat's is per run, not shown).
            status, reason = "suspended", (f"{stopped['kind']} suspended since "
                                           f"{stopped['since']}: ask your administrator")
        granted = granted_scopes(provider, grant.scope) if grant is not None else None
        ceiling = provider.allowed_scopes
        checked = [s for s in ceiling if s in granted] if granted else list(provider.scopes)
        choices = []
        for name, spec in provider.grant_values.items():
            if spec.source == "choice":
                value = grant.values.get(name) if grant is not None else None
                choices.append((spec.param or name, value if isinstance(value, str) else ""))
        account = grant.values.get(ACCOUNT_VALUE) if grant is not None else None
        return Row(provider=provider.id,
                   connection_id=self._sessions.connection_id(user, provider.id),
                   account=account if isinstance(account, str) else None,
                   status=status, reason=reason,
                   scope=grant.scope if grant is not None else None,
                   expires_at=grant.expires_at if grant is not None else None,
                   last_used=last_used, ceiling=ceiling, required=provider.required_scopes,
                   checked=checked,
                   missing=missing_required(provider, grant.scope) if grant is not None
                   else [], choices=choices)

    async def _posted(self, request: web.Request, config: Snapshot
                      ) -> tuple[Session, ProviderSettings, Mapping[str, str],
                                 list[str]] | web.Response:
        """A page POST's session, the connection's provider, the form and its scopes; or
        the refusal: a cross-site request (``Sec-Fetch-Site`` other than
        ``same-origin``, or an ``Origin`` other than this server's; neither header: no
        browser form of this page), no session (401), a wrong CSRF token (403), a
        connection id that is not one of the user's (404). Nothing is changed then."""
        settings = config.settings
        site = request.headers.get("Sec-Fetch-Site")
        origin = request.headers.get("Origin")
        mine = {_origin(settings.connect_base), f"{request.scheme}://{request.host}"}
        why = None
        if site is not None and site != "same-origin":
            why = f"a cross-site request (Sec-Fetch-Site: {site[:20]}) was refused"
        elif origin is not None and origin not in mine:
            why = "a request from another origin was refused"
        elif site is None and origin is None:
            why = "a request without Origin or Sec-Fetch-Site was refused (use the page)"
        if why is not None:
            log.warning("self-service POST refused: %s", why.split(" (")[0])
            return _html(message_page("Request refused", f"{why}; nothing was changed. "
                                      "Use the buttons on your connections page.",
                                      link=(PAGE, "Your connections")), 403)
        session = self._session(request)
        if session is None:
            return _html(message_page("Sign-in needed", "Your session is missing or has "
                                      "expired; nothing was changed. Open the connections "
                                      "link from your agent again."), 401)
        form = await request.post()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if not self._sessions or not Sessions.csrf_ok(session, fields.get("csrf")):
            log.warning("self-service POST refused: CSRF token missing or wrong")
            return await self._render(config, session, status=403, alert=(
                "The form's security token is missing or out of date; nothing was "
                "changed. Try again from this page."))
        wanted = fields.get("connection", "")
        for provider in settings.providers:
            if session.permits(provider.id) and hmac.compare_digest(
                    self._sessions.connection_id(session.user, provider.id), wanted):
                scopes = [v for v in form.getall("scope", []) if isinstance(v, str)]
                return session, provider, fields, scopes
        log.warning("self-service POST refused: not one of the user's connections")
        return await self._render(config, session, status=404, alert=(
            "No connection of yours has that id; nothing was changed."))

    async def page_connect(self, request: web.Request) -> web.StreamResponse:
        """``POST /connections/connect`` (``csrf``, ``connection``, ``scope`` repeated,
        ``value:<param>`` for a chosen grant value): begins the connect flow with the
        scopes ticked (within ``scope_ceiling``; refused before the provider is
        contacted otherwise) and redirects (303) to the provider."""
        if self._sessions is None:
            raise web.HTTPNotFound()
        with self._live.pinned() as config:
            got = await self._posted(request, config)
            if isinstance(got, web.Response):
                return got
            session, provider, fields, scopes = got
            try:
                self._refuse_suspended(session.user, None, provider.id)
            except ConnectRejected as exc:
                return await self._render(config, session, status=403,
                                          alert=f"{exc.detail} ({exc.reason})")
            if not scopes and provider.allowed_scopes:
                return await self._render(config, session, status=400, alert=(
                    f"Choose at least one scope for {provider.id}; nothing was changed."))
            nonce = secrets.token_urlsafe(32)
            try:
                url = await self._connector.begin(
                    session.user, provider.id, redirect_uri=config.settings.redirect_uri,
                    scopes=scopes or None, browser=nonce, choices=choices_of(fields),
                    actor=Actor("user", session.user))
            except ConnectRejected as exc:
                return await self._render(config, session, status=400,
                                          alert=f"{exc.detail} ({exc.reason})")
            return _to_provider(url, nonce, config.settings, status=303)

    async def page_disconnect(self, request: web.Request) -> web.StreamResponse:
        """``POST /connections/disconnect`` (``csrf``, ``connection``): revokes the grant
        upstream and removes it everywhere, as offboarding does (proxy.offboard), audited
        ``connection.revoked`` with actor ``user``; the page says what is still pending."""
        if self._sessions is None or self._offboarder is None:
            raise web.HTTPNotFound()
        with self._live.pinned() as config:
            got = await self._posted(request, config)
            if isinstance(got, web.Response):
                return got
            session, provider, _, _ = got
            results = await self._offboarder.revoke(session.user, provider.id,
                                                    actor=Actor("user", session.user))
            if not results:
                return await self._render(config, session, notice=(
                    f"{provider.id} was not connected; nothing to disconnect."))
            problems = [p for r in results for p in r.problems]
            if problems:
                return await self._render(config, session, status=502, alert=(
                    f"{provider.id} was disconnected here, but: {'; '.join(problems)}."))
            return await self._render(config, session, notice=(
                f"Disconnected {provider.id}: {results[0].detail}."))

    async def callback(self, request: web.Request) -> web.StreamResponse:
        cookie = _cookie_name(request.query.get("state", ""))
        response: web.Response
        try:
            # "": this server's flows are always browser-bound, so no cookie never matches.
            done = await self._connector.complete(dict(request.query),
                                                  browser=request.cookies.get(cookie, ""))
        except ConnectRejected as exc:
            response = _page("Connection failed", f"{exc.detail} ({exc.reason})", 400)
        else:
            if done.return_to:
                response = web.Response(status=303, headers={"Location": done.return_to,
                                                             "Cache-Control": "no-store"})
            else:
                text = (f"{done.user} is now connected to {done.provider} (granted scopes: "
                        f"{done.scope or 'as asked'}). You can close this window.")
                if done.missing_scopes:
                    text = (f"{done.user} is connected to {done.provider}, but it did not "
                            f"grant the required scopes {' '.join(done.missing_scopes)}: "
                            "calls that need them will fail. Reconnect and approve them.")
                response = _html(message_page("Connected", text,
                                              link=(PAGE, "Your connections")), 200)
        if cookie in request.cookies:
            response.del_cookie(cookie, path="/oauth/callback")
        return response
