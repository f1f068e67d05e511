"""An MCP server as a provider (``providers[].mcp``): discovery of its authorization server
(MCP authorization specification, revision 2026-07-28, "Authorization Server Discovery").

1. **Protected resource metadata** (RFC 9728): the URL a 401's ``WWW-Authenticate: Bearer
   resource_metadata="..."`` names (RFC 9728 section 5.1), else the well-known URIs, first
   with the server's path inserted (``/.well-known/oauth-protected-resource/<path>``, RFC
   9728 section 3.1), then at the root. Its ``resource`` must be the server's (RFC 9728
   section 3.3); its ``authorization_servers`` name the issuer (the first is used).
2. **Authorization server metadata**: RFC 8414 (``/.well-known/oauth-authorization-server``
   with path insertion, section 3.1) and OpenID Connect Discovery 1.0
   (``/.well-known/openid-configuration``, inserted and appended), in the MCP
   specification's order. The ``issuer`` must be the one it was fetched for (RFC 8414
   section 3.3, OpenID Connect Discovery section 4.3: mix-up defence); PKCE S256 must be in
   ``code_challenge_methods_supported`` (MCP: refuse when absent).

What discovery found is kept in memory for a bounded time (:data:`METADATA_TTL`, less when
the answer's ``Cache-Control: max-age`` says so), per server URL.
"""

from __future__ import annotations

import json
import re
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

from proxy.errors import CredproxyError
from proxy.hosts import canonical_uri
from proxy.provider_client import DiscoveryFailed, Fetched, ProviderClient
from proxy.secret import Secret
from proxy.settings import ProviderSettings
from proxy.vault.base import Grant

METADATA_TTL = 600.0  # seconds what discovery found is used at most
MIN_TTL = 30.0  # a max-age below this is raised to it (no discovery per connect)
_NEGATIVE_STATUSES = (404, 405, 410)

_CHALLENGE_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


class McpDiscoveryError(CredproxyError):
    """Discovery failed; ``reason`` is a short slug (``mcp_*``), ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class AuthServer:
    """What an MCP server's discovery found: the resource (the server's canonical URI,
    RFC 8707 section 2) and its authorization server's endpoints and capabilities (RFC 8414
    section 2)."""

    resource: str
    resource_metadata_url: str
    resource_scopes: tuple[str, ...]  # RFC 9728 scopes_supported (may be empty)
    issuer: str
    metadata_url: str
    authorization_endpoint: str
    token_endpoint: str
    registration_endpoint: str | None
    revocation_endpoint: str | None
    scopes_supported: tuple[str, ...] | None
    token_endpoint_auth_methods: tuple[str, ...]
    client_id_metadata_document_supported: bool
    iss_parameter_supported: bool  # RFC 9207 section 3
    expires_at: float


def parse_challenge(header: str) -> dict[str, str]:
    """The auth-params of the ``Bearer`` challenge in a ``WWW-Authenticate`` value (RFC 6750
    section 3, RFC 9110 section 11.6.1), names lower-cased; empty when there is none."""
    at = re.search(r"(?:^|,|\s)Bearer(?:\s+|$)", header, re.IGNORECASE)
    if at is None:
        return {}
    found: dict[str, str] = {}
    for m in _CHALLENGE_PARAM.finditer(header[at.end():]):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        found.setdefault(m.group(1).lower(), re.sub(r"\\(.)", r"\1", value))
    return found


def protected_resource_urls(server: str) -> list[str]:
    """The RFC 9728 well-known URIs for ``server``, in the MCP order: path inserted (section
    3.1), then the root."""
    parts = urlsplit(server)
    root = urlunsplit((parts.scheme, parts.netloc, "/.well-known/oauth-protected-resource",
                       "", ""))
    path = parts.path.rstrip("/")
    return [root + path, root] if path else [root]


def authorization_server_urls(issuer: str) -> list[str]:
    """The metadata URLs for ``issuer`` in the MCP order: with a path, RFC 8414 inserted
    (section 3.1), OpenID Connect inserted, OpenID Connect appended (Discovery section 4);
    without one, RFC 8414 then OpenID Connect at the root."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")

    def at(p: str) -> str:
        return urlunsplit((parts.scheme, parts.netloc, p, "", ""))

    if path:
        return [at(f"/.well-known/oauth-authorization-server{path}"),
                at(f"/.well-known/openid-configuration{path}"),
                at(f"{path}/.well-known/openid-configuration")]
    return [at("/.well-known/oauth-authorization-server"),
            at("/.well-known/openid-configuration")]


def _max_age(headers: Mapping[str, str]) -> float | None:
    m = re.search(r"max-age\s*=\s*(\d+)", headers.get("cache-control", ""), re.IGNORECASE)
    return float(m.group(1)) if m else None


def _json(answer: Fetched, url: str) -> dict[str, Any]:
    try:
        doc = json.loads(answer.body)
    except ValueError:
        raise McpDiscoveryError("mcp_metadata_invalid", f"{url} did not answer JSON") from None
    if not isinstance(doc, dict):
        raise McpDiscoveryError("mcp_metadata_invalid", f"{url} did not answer a JSON object")
    return doc


def _strings(doc: Mapping[str, Any], name: str) -> tuple[str, ...] | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise McpDiscoveryError("mcp_metadata_invalid", f"{name} is not a list of strings")
    return tuple(value)


class Discovery:
    """Finds and caches the authorization server of MCP servers, through the process's
    :class:`ProviderClient` (its transport, TLS trust and retries)."""

    def __init__(self, client: ProviderClient, *, clock: Callable[[], float] = time.time,
                 ttl: float = METADATA_TTL) -> None:
        self._client = client
        self._clock = clock
        self._ttl = ttl
        self._cache: dict[str, AuthServer] = {}
        self.fetches = 0  # metadata documents fetched, for tests

    def cached(self, server: str) -> AuthServer | None:
        """What discovery found for ``server`` and still holds (never fetches)."""
        found = self._cache.get(canonical_uri(server))
        return found if found is not None and found.expires_at > self._clock() else None

    def forget(self, server: str) -> None:
        """Drop what is cached for ``server`` (say, after its issuer changed)."""
        self._cache.pop(canonical_uri(server), None)

    async def discover(self, server: str, *, allow_http: bool = False,
                       challenge: str | None = None, issuer: str | None = None
                       ) -> AuthServer:
        """The authorization server of the MCP server at ``server`` (cached until its
        ``expires_at``). ``challenge``: a ``WWW-Authenticate`` value the server answered,
        whose ``resource_metadata`` is tried first; without one, the server is asked once
        without credentials for its 401 (MCP: clients MUST use the header when present).
        ``issuer``: the one the operator pinned (``providers[].issuer``): it is chosen among
        the resource's ``authorization_servers``, and a resource naming none of them is
        refused (``mcp_issuer_mismatch``). Without one, the first is used.
        Raises :class:`McpDiscoveryError`."""
        found = None if challenge is not None else self.cached(server)
        if found is None or (issuer is not None and found.issuer != issuer):
            resource = canonical_uri(server)
            found = await self._discover(resource, allow_http, challenge, issuer)
            self._cache[resource] = found
        return found

    def _check_url(self, url: str, what: str, allow_http: bool) -> str:
        parts = urlsplit(url)
        if not parts.hostname or parts.fragment or not (
                parts.scheme == "https" or (allow_http and parts.scheme == "http")):
            raise McpDiscoveryError("mcp_metadata_invalid",
                                    f"{what} {url!r} is not an absolute https URL")
        return url

    async def _get(self, url: str) -> Fetched:
        self.fetches += 1
        try:
            return await self._client.fetch("GET", url, headers={"Accept": "application/json"})
        except DiscoveryFailed as exc:
            raise McpDiscoveryError("mcp_discovery_unavailable", exc.detail) from None

    async def _probe(self, resource: str) -> str | None:
        """The ``resource_metadata`` of the 401 the server answers an unauthenticated MCP
        request with (RFC 9728 section 5.1), or None."""
        body = {"jsonrpc": "2.0", "id": 0, "method": "ping"}
        try:
            answer = await self._client.fetch(
                "POST", resource, json_body=body, max_bytes=4096,
                headers={"Accept": "application/json, text/event-stream"})
        except DiscoveryFailed:
            return None
        if answer.status != 401:
            return None
        return parse_challenge(answer.headers.get("www-authenticate", "")).get(
            "resource_metadata")

    async def _discover(self, resource: str, allow_http: bool,
                        challenge: str | None, pinned: str | None) -> AuthServer:
        hinted = parse_challenge(challenge).get("resource_metadata") if challenge else None
        if hinted is None:
            hinted = await self._probe(resource)
        candidates = protected_resource_urls(resource)
        if hinted is not None:
            candidates = [urljoin(resource, hinted), *candidates]
        prm: dict[str, Any] | None = None
        prm_url = ""
        expires = self._clock() + self._ttl
        for url in candidates:
            self._check_url(url, "resource metadata URL", allow_http)
            answer = await self._get(url)
            if answer.status in _NEGATIVE_STATUSES or answer.status in (401, 403):
                continue
            if answer.status != 200:
                raise McpDiscoveryError("mcp_discovery_unavailable",
                                        f"{url} answered HTTP {answer.status}")
            prm, prm_url = _json(answer, url), url
            expires = self._expiry(answer, expires)
            break
        if prm is None:
            raise McpDiscoveryError(
                "mcp_no_resource_metadata",
                f"{resource} publishes no protected resource metadata (RFC 9728): tried "
                f"{', '.join(candidates)}")
        # RFC 9728 section 3.3: the resource identifier must be the server's own.
        said = prm.get("resource")
        if not isinstance(said, str) or canonical_uri(said) != resource:
            raise McpDiscoveryError(
                "mcp_resource_mismatch",
                f"{prm_url} describes resource {said!r}, not {resource} (RFC 9728 section 3.3)")
        issuers = _strings(prm, "authorization_servers") or ()
        if not issuers:
            raise McpDiscoveryError("mcp_no_authorization_server",
                                    f"{prm_url} names no authorization_servers")
        if pinned is not None and pinned not in issuers:
            raise McpDiscoveryError(
                "mcp_issuer_mismatch",
                f"{prm_url} names the authorization servers {', '.join(issuers)[:300]}, not "
                f"{pinned} (providers[].issuer): its client is never used with another")
        issuer = self._check_url(pinned or issuers[0], "authorization server", allow_http)
        meta, meta_url, expires = await self._authorization_server(issuer, expires)
        return self._read(resource, prm, prm_url, issuer, meta, meta_url, expires,
                          allow_http)

    def _expiry(self, answer: Fetched, current: float) -> float:
        age = _max_age(answer.headers)
        if age is None:
            return current
        return min(current, self._clock() + max(MIN_TTL, min(age, self._ttl)))

    async def _authorization_server(self, issuer: str, expires: float
                                    ) -> tuple[dict[str, Any], str, float]:
        tried = authorization_server_urls(issuer)
        for url in tried:
            answer = await self._get(url)
            if answer.status in _NEGATIVE_STATUSES:
                continue
            if answer.status != 200:
                raise McpDiscoveryError("mcp_discovery_unavailable",
                                        f"{url} answered HTTP {answer.status}")
            meta = _json(answer, url)
            # RFC 8414 section 3.3 / OpenID Connect Discovery section 4.3: the issuer in
            # the metadata must be identical to the one it was fetched for.
            if meta.get("issuer") != issuer:
                raise McpDiscoveryError(
                    "mcp_issuer_mismatch",
                    f"{url} gives issuer {meta.get('issuer')!r}, not {issuer} "
                    "(RFC 8414 section 3.3)")
            return meta, url, self._expiry(answer, expires)
        raise McpDiscoveryError(
            "mcp_no_authorization_server_metadata",
            f"{issuer} publishes no authorization server metadata (RFC 8414, OpenID "
            f"Connect Discovery): tried {', '.join(tried)}")

    def _read(self, resource: str, prm: Mapping[str, Any], prm_url: str, issuer: str,
              meta: Mapping[str, Any], meta_url: str, expires: float,
              allow_http: bool) -> AuthServer:
        methods = _strings(meta, "code_challenge_methods_supported") or ()
        if "S256" not in methods:
            # MCP authorization, "Authorization Code Protection": no S256, no connect.
            raise McpDiscoveryError(
                "mcp_pkce_unsupported",
                f"the authorization server {issuer} does not list S256 in "
                "code_challenge_methods_supported (RFC 8414 section 2, RFC 7636): credproxy "
                "connects only with PKCE S256")
        endpoints: dict[str, str | None] = {}
        for name in ("authorization_endpoint", "token_endpoint", "registration_endpoint",
                     "revocation_endpoint"):
            value = meta.get(name)
            if value is None and name in ("authorization_endpoint", "token_endpoint"):
                raise McpDiscoveryError("mcp_metadata_invalid", f"{meta_url} has no {name}")
            if value is not None and not isinstance(value, str):
                raise McpDiscoveryError("mcp_metadata_invalid",
                                        f"{meta_url}: {name} is not a string")
            endpoints[name] = (None if value is None
                               else self._check_url(value, name, allow_http))
        authorize, token = endpoints["authorization_endpoint"], endpoints["token_endpoint"]
        assert authorize is not None and token is not None
        return AuthServer(
            resource=resource, resource_metadata_url=prm_url,
            resource_scopes=_strings(prm, "scopes_supported") or (), issuer=issuer,
            metadata_url=meta_url, authorization_endpoint=authorize, token_endpoint=token,
            registration_endpoint=endpoints["registration_endpoint"],
            revocation_endpoint=endpoints["revocation_endpoint"],
            scopes_supported=_strings(meta, "scopes_supported"),
            token_endpoint_auth_methods=(_strings(meta, "token_endpoint_auth_methods_supported")
                                         or ("client_secret_basic",)),
            client_id_metadata_document_supported=(
                meta.get("client_id_metadata_document_supported") is True),
            iss_parameter_supported=(
                meta.get("authorization_response_iss_parameter_supported") is True),
            expires_at=expires)


# -- client registration (MCP authorization, "Client Registration Approaches") -----------------

CLIENT_METADATA_PATH = "/oauth/client-metadata.json"  # under public_url: credproxy's CIMD
CLIENT_NAME = "credproxy"


def client_metadata_url(public_base: str) -> str | None:
    """The ``client_id`` of credproxy's Client ID Metadata Document: an https URL with a
    path under ``public_url`` (MCP: the document's URL is the client id); None when the
    public base is not https (the document cannot be used then)."""
    if not public_base.startswith("https://"):
        return None
    return public_base.rstrip("/") + CLIENT_METADATA_PATH


def client_metadata(public_base: str, redirect_uri: str) -> dict[str, Any] | None:
    """The Client ID Metadata Document credproxy serves (RFC 7591 section 2 members; its
    ``client_id`` is its own URL): a public client (PKCE, no secret) with the web connect
    flow's redirect URI. None when ``public_url`` is not https."""
    url = client_metadata_url(public_base)
    if url is None:
        return None
    return {"client_id": url, "client_name": CLIENT_NAME, "client_uri": public_base,
            "redirect_uris": [redirect_uri], "grant_types": ["authorization_code",
                                                             "refresh_token"],
            "response_types": ["code"], "token_endpoint_auth_method": "none",
            "application_type": "web"}


@dataclass(frozen=True, slots=True)
class Registration:
    """The client credproxy is at one authorization server (its ``issuer``): ``kind`` is
    ``pre-registered`` (the provider's ``client_id``), ``cimd`` (the metadata document's
    URL) or ``dcr`` (RFC 7591). Registered clients are public (``none``: PKCE, no secret)
    unless the server insisted on a secret (``client_secret``, kept in memory only)."""

    issuer: str
    kind: str
    client_id: str
    token_endpoint_auth_method: str
    client_secret: str | None = None


class Registrar:
    """Picks the client for an authorization server in the MCP order: pre-registered, else
    the Client ID Metadata Document when the server says
    ``client_id_metadata_document_supported``, else RFC 7591 dynamic registration at its
    ``registration_endpoint``. Dynamic registrations are kept per (issuer, redirect URI):
    a changed issuer gets a new one."""

    def __init__(self, client: ProviderClient) -> None:
        self._client = client
        self._registered: dict[tuple[str, str], Registration] = {}
        self.registrations = 0  # RFC 7591 requests made, for tests

    def forget(self, issuer: str) -> None:
        """Drop the dynamic registrations made at ``issuer`` (its server refused the
        client): the next :meth:`client_for` registers anew."""
        for key in [k for k in self._registered if k[0] == issuer]:
            del self._registered[key]

    async def client_for(self, *, issuer: str, pre_registered: str | None,
                         auth_method: str, server: AuthServer, public_base: str,
                         redirect_uri: str, web_redirect_uri: str) -> Registration:
        """The registration to use for a sign-in returning to ``redirect_uri``
        (``web_redirect_uri``: the web connect flow's, which the metadata document lists).
        Raises :class:`McpDiscoveryError` (``mcp_no_registration``,
        ``mcp_registration_failed``)."""
        if pre_registered:
            return Registration(issuer, "pre-registered", pre_registered, auth_method)
        cimd = client_metadata_url(public_base)
        # The document lists the web flow's redirect URI only: a terminal's loopback
        # redirect (credproxy connect) is registered dynamically instead.
        if server.client_id_metadata_document_supported and cimd is not None and \
                redirect_uri == web_redirect_uri:
            return Registration(issuer, "cimd", cimd, "none")
        known = self._registered.get((issuer, _registration_key(redirect_uri)))
        if known is not None:
            return known
        if server.registration_endpoint is None:
            raise McpDiscoveryError(
                "mcp_no_registration",
                f"{issuer} offers no way to register credproxy: no pre-registered client_id "
                "is configured, it does not accept client metadata documents (or public_url "
                "is not https, or the sign-in does not return to public_url: a terminal's "
                "`credproxy connect` cannot use the document; use the web connect link) and "
                "it has no registration_endpoint (RFC 7591)")
        made = await self._register(issuer, server, redirect_uri)
        self._registered[(issuer, _registration_key(redirect_uri))] = made
        return made

    async def _register(self, issuer: str, server: AuthServer,
                        redirect_uri: str) -> Registration:
        """RFC 7591 section 3.1: client metadata as JSON (``application_type`` ``native``
        for a loopback redirect, RFC 8252 section 7.3, else ``web``); section 3.2.1: the
        answer's ``client_id``, and the ``client_secret`` a confidential client must have;
        section 3.2.2: an error answer's ``error`` and ``error_description`` are named."""
        assert server.registration_endpoint is not None
        endpoint = server.registration_endpoint
        method = "none" if "none" in server.token_endpoint_auth_methods else (
            server.token_endpoint_auth_methods[0])
        body = {"client_name": CLIENT_NAME, "redirect_uris": [redirect_uri],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"], "token_endpoint_auth_method": method,
                "application_type": "native" if _loopback(redirect_uri) else "web"}
        self.registrations += 1
        try:
            answer = await self._client.fetch("POST", endpoint, json_body=body,
                                              headers={"Accept": "application/json"})
        except DiscoveryFailed as exc:
            raise McpDiscoveryError("mcp_registration_failed", exc.detail) from None
        try:
            doc = _json(answer, endpoint)
        except McpDiscoveryError as exc:
            doc = None
            why = exc.detail
        if answer.status not in (200, 201):
            said = ""
            if doc is not None and isinstance(doc.get("error"), str):
                described = doc.get("error_description")
                said = f": {doc['error'][:64]}" + (
                    f" ({described[:200]})" if isinstance(described, str) else "")
            raise McpDiscoveryError("mcp_registration_failed",
                                    f"{endpoint} answered HTTP {answer.status}{said}")
        if doc is None:
            raise McpDiscoveryError("mcp_registration_failed", why)
        client_id, secret = doc.get("client_id"), doc.get("client_secret")
        if not isinstance(client_id, str) or not client_id:
            raise McpDiscoveryError("mcp_registration_failed",
                                    "the registration answer has no client_id")
        got = doc.get("token_endpoint_auth_method", method)
        got_method = got if isinstance(got, str) else method
        if got_method not in ("none", "client_secret_basic", "client_secret_post"):
            raise McpDiscoveryError(
                "mcp_registration_failed",
                f"the registration answer asks for token_endpoint_auth_method {got[:64]!r}, "
                "which credproxy cannot use")
        if got_method != "none" and not (isinstance(secret, str) and secret):
            raise McpDiscoveryError(
                "mcp_registration_failed",
                f"the registration answer makes a confidential client ({got_method}) but "
                "gives no client_secret (RFC 7591 section 3.2.1)")
        return Registration(issuer, "dcr", client_id, got_method,
                            secret if got_method != "none" and isinstance(secret, str)
                            else None)


def _loopback(uri: str) -> bool:
    host = urlsplit(uri).hostname or ""
    return urlsplit(uri).scheme == "http" and host in ("127.0.0.1", "::1", "localhost")


def _registration_key(redirect_uri: str) -> str:
    """A registration serves every loopback port (RFC 8252 section 7.3: the authorization
    server allows any port for a loopback redirect URI), so the port is not part of its
    key; any other redirect URI is."""
    if not _loopback(redirect_uri):
        return redirect_uri
    parts = urlsplit(redirect_uri)
    return urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))


def scopes_for(server: AuthServer, configured: list[str]) -> list[str]:
    """The scopes to ask for: the provider's configured ones, else the resource's
    ``scopes_supported`` (RFC 9728; MCP "Scope Selection Strategy"); plus
    ``offline_access`` only when the authorization server advertises it in its
    ``scopes_supported`` (so a refresh token is issued)."""
    scopes = list(configured or server.resource_scopes)
    if "offline_access" in (server.scopes_supported or ()) and "offline_access" not in scopes:
        scopes.append("offline_access")
    return scopes


def scope_ceiling(server: AuthServer, configured: list[str]) -> list[str]:
    """The scopes a user may consent to (a step-up's ``?scope=``, or a narrower choice):
    the provider's configured ones, else whatever the resource (RFC 9728
    ``scopes_supported``) and its authorization server (RFC 8414 ``scopes_supported``)
    advertise, so a server's scope challenge (MCP authorization, "Scope Challenge
    Handling") can be met with no operator change. ``offline_access`` is kept on a narrowed
    request when advertised (:func:`narrowed`)."""
    if configured:
        return list(configured)
    ceiling = list(server.resource_scopes)
    ceiling += [s for s in (server.scopes_supported or ()) if s not in ceiling]
    return ceiling


def narrowed(server: AuthServer, configured: list[str], requested: list[str]) -> list[str]:
    """``requested`` within :func:`scope_ceiling` (in the ceiling's order), plus
    ``offline_access`` when the authorization server advertises it (a re-consent must not
    lose the refresh token). Raises :class:`McpDiscoveryError` (``scope_not_allowed``)
    naming the scopes outside the ceiling."""
    ceiling = scope_ceiling(server, configured)
    extra = sorted(set(requested) - set(ceiling) - {"offline_access"})
    if extra:
        raise McpDiscoveryError("scope_not_allowed",
                                f"scopes {extra} are neither configured nor advertised by "
                                f"{server.resource} or {server.issuer}")
    chosen = [s for s in ceiling if s in requested]
    if "offline_access" in (server.scopes_supported or ()) and "offline_access" not in chosen:
        chosen.append("offline_access")
    return chosen


_SHARED: weakref.WeakKeyDictionary[ProviderClient, Discovery] = weakref.WeakKeyDictionary()


def shared_discovery(client: ProviderClient, *,
                     clock: Callable[[], float] = time.time) -> Discovery:
    """The process's :class:`Discovery` over ``client`` (one cache for the connect flow and
    the broker's refreshes)."""
    found = _SHARED.get(client)
    if found is None:
        found = _SHARED[client] = Discovery(client, clock=clock)
    return found


def concrete(provider: ProviderSettings, server: AuthServer, *, client_id: str,
             auth_method: str) -> ProviderSettings:
    """An ``mcp`` provider with what discovery and registration found: the authorization
    server's endpoints, the client, the scopes (:func:`scopes_for`), and the server's
    canonical URI as ``resource`` (RFC 8707 section 2) on the authorize request and on every
    token request, code and refresh alike (``token_params``)."""
    return provider.model_copy(update={
        "authorize_url": server.authorization_endpoint,
        "token_url": server.token_endpoint,
        "revocation_url": server.revocation_endpoint,
        "client_id": client_id,
        "token_endpoint_auth_method": auth_method,
        "scopes": scopes_for(server, provider.scopes),
        "authorize_params": {**provider.authorize_params, "resource": server.resource},
        "token_params": {**provider.token_params, "resource": server.resource},
    })


def grant_client(provider: ProviderSettings, server: AuthServer, grant: Grant,
                 configured_secret: Secret | None) -> tuple[ProviderSettings, Secret | None]:
    """The ``mcp`` provider made concrete as the client that minted ``grant`` (its values
    ``mcp_client_id``, ``mcp_registration``, ``mcp_client_auth``), with that client's
    secret: the configured one for a pre-registered client, the one sealed in the grant
    for a confidential registered client (RFC 7591 section 3.2.1), None for a public one.
    Used for every later token request of the grant: refresh (RFC 6749 section 6) and
    revocation (RFC 7009 section 2.1) must be made as the client the grant was issued to.
    Raises :class:`KeyError` when the grant does not name its client."""
    values = grant.values
    client_id = values["mcp_client_id"]
    if not isinstance(client_id, str):
        raise KeyError("mcp_client_id")
    if values.get("mcp_registration") == "pre-registered":
        return (concrete(provider, server, client_id=client_id,
                         auth_method=provider.token_endpoint_auth_method), configured_secret)
    said = values.get("mcp_client_auth")
    if grant.client_secret is None or said not in ("client_secret_basic",
                                                   "client_secret_post"):
        return concrete(provider, server, client_id=client_id, auth_method="none"), None
    return (concrete(provider, server, client_id=client_id, auth_method=str(said)),
            grant.client_secret)
