"""Multi-tenant fakes of Salesforce, Shopify and Entra ID + Microsoft Graph + SharePoint,
for the tests of grants bound to their tenant (issue 14, docs/tenants.md).

Run as a separate process::

    python -m devstack.tenantfakes --cert C --key K --client-id ID \\
        --client-secret-env VAR --ready-file ready.json

One HTTPS server: one port, one certificate for every name in :data:`CERT_NAMES`
(wildcards included). It picks the provider and the tenant by the Host header, so a process
that resolves the real names to it (:mod:`devstack.fakedns`, :func:`fake_dns_spec`)
talks to ``https://login.salesforce.com``, ``https://acme.my.salesforce.com``, ... on port
443 with the real SNI. Who belongs where (by the user name the browser signs in with, the
authorize request's ``login_hint``):

==============  ======================================  ===================================
                alice*                                  bob*
==============  ======================================  ===================================
Salesforce      org ``acme.my.salesforce.com``          org ``globex.my.salesforce.com``
Shopify         staff of ``alice-shop.myshopify.com``   staff of ``bob-shop.myshopify.com``
Entra ID        tenant contoso (SharePoint              tenant fabrikam (SharePoint
                ``contoso.sharepoint.com``)             ``fabrikam.sharepoint.com``)
==============  ======================================  ===================================

``attacker-org.my.salesforce.com`` and ``attacker-shop.myshopify.com`` exist too (mallory*
belongs there; nobody the tests connect does); carol* is staff of both alice's and bob's
shops. ``evil.example.com`` and
``*.myshopify.com.evil.com`` are served as well (:data:`TRAP_HOSTS`): hosts no provider may
bind, every request there is recorded and answered 404, so a test can prove that no token
request (and no client secret) ever went there.

What each provider does, with the source beside each fact:

**Salesforce** (web server flow). ``GET /services/oauth2/authorize`` on
``login.salesforce.com`` (or on the user's own org host, My Domain login): consents at once
and redirects with ``code`` and ``state``; PKCE S256 when a challenge was sent.
``POST /services/oauth2/token`` (client_secret_post or basic): the answer has NO
``expires_in`` and carries ``instance_url`` (``https://<org host>``), ``id``
(``https://login.salesforce.com/id/<orgId>/<userId>``), ``issued_at`` (ms), ``signature``,
``scope``, ``token_type`` and, with the ``refresh_token`` scope, ``refresh_token`` (not
rotated: the refresh answer has none). ``/services/data/...`` on an org host: 200 JSON for
a live token of THAT org, 401 ``[{"message": "Session expired or invalid", "errorCode":
"INVALID_SESSION_ID"}]`` for any other. ``POST /services/oauth2/revoke`` (form ``token``)
on the org host (or the login host): 200; a token unknown there (dead, or another org's):
400 ``invalid_token``.

**Shopify** (authorization code grant, expiring offline tokens). ``GET
/admin/oauth/authorize`` on ``<shop>.myshopify.com`` (the signed-in user must be staff of
that shop): redirects with ``code``, ``hmac`` (HMAC-SHA256 of the other parameters, hex,
keyed with the client secret), ``host``, ``shop``, ``state``, ``timestamp``. ``POST
/admin/oauth/access_token`` on THE shop's host (``client_id``, ``client_secret``,
``code``; form or JSON): a code issued for another shop is 400 ``invalid_request`` "The
authorization code was not found or was already used"; ``expiring=1`` gives
``expires_in`` 3600 and a ``refresh_token`` (``refresh_token_expires_in``); a refresh
(``grant_type=refresh_token``) rotates the refresh token (the previous one keeps working
until the new one is used). ``/admin/api/<version>/...`` wants ``X-Shopify-Access-Token``
of THAT shop; anything else is 401 ``{"errors": "[API] Invalid API key or access token
(unrecognized login or wrong password)"}``. No revocation endpoint.

**Entra ID v2.0** at ``login.microsoftonline.com/<tenant>/oauth2/v2.0/{authorize,token}``
(``<tenant>``: ``organizations``, ``common``, or the user's own tenant by name, domain or
id). The code exchange answers a Graph token (audience ``https://graph.microsoft.com``)
and, with ``offline_access``, a refresh token. A refresh takes ``scope``; scopes of the
form ``https://<host>/...`` name that resource (``https://contoso.sharepoint.com/.default``
gives a token whose audience is that host), others are Graph's. A SharePoint host of
another tenant than the user's is 400 ``invalid_resource`` AADSTS500011. Every refresh
answers a NEW refresh token and the old one keeps working.

**Microsoft Graph** ``GET /v1.0/me`` and ``GET /v1.0/sites/root`` (``$select=webUrl``:
``{"webUrl": "https://contoso.sharepoint.com"}``, needs a ``Sites.*`` scope) want a live
token whose audience is Graph: else 401 ``InvalidAuthenticationToken``.

**SharePoint** ``GET /_api/...`` on ``<tenant>.sharepoint.com`` wants a live token whose
audience is exactly that host: else 401 with ``WWW-Authenticate: Bearer realm=...``
(``error="invalid_token"``), ``x-ms-diagnostics`` and ``{"error_description": "Invalid
issuer or signature."}``.

Every host also answers ``/_fake/...`` (loopback clients only): ``GET requests`` (every
request: host, SNI, method, path, query, form, headers, the credential it carried and whose
it was, the answer's status), ``GET tokens`` (every token issued, for leak searches), ``POST
expire`` ``{"user": U}`` (the user's access tokens expire: the APIs answer 401; with
``"grant": true`` the user's refresh tokens die too), ``POST knobs``: ``{"expires_in": N}``
for the tokens issued from now on (where the provider sends one); for the next answer only,
``{"salesforce_instance_url": URL}`` (the code exchange's ``instance_url``) and
``{"graph_web_url": URL}`` (sites/root's ``webUrl``): a provider answering a host it must
not.

Tokens are ``at_...`` / ``rt_...`` (scrubbed from the request log lines). All state is in
memory.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

import httpx2
from werkzeug.wrappers import Request, Response

from devstack._serve import (
    DevServer,
    QuietRequestHandler,
    configure_logging,
    is_loopback,
    write_ready_file,
)
from devstack.certs import CA, make_leaf
from devstack.procs import Running, start_server

# -- who is where ----------------------------------------------------------------------

SF_LOGIN = "login.salesforce.com"
# org host -> (org id, user-name prefix of its members)
SF_ORGS: dict[str, tuple[str, str]] = {
    "acme.my.salesforce.com": ("00D5e000000ACME", "alice"),
    "globex.my.salesforce.com": ("00D5e000000GLBX", "bob"),
    "attacker-org.my.salesforce.com": ("00D5e000000EVIL", "mallory"),
}
# shop host -> user-name prefixes of its staff (carol works for both alice's and bob's)
SHOPS: dict[str, tuple[str, ...]] = {
    "alice-shop.myshopify.com": ("alice", "carol"),
    "bob-shop.myshopify.com": ("bob", "carol"),
    "attacker-shop.myshopify.com": ("mallory",),
}
ENTRA_LOGIN = "login.microsoftonline.com"
GRAPH = "graph.microsoft.com"
GRAPH_AUDIENCE = "https://graph.microsoft.com"


@dataclass(frozen=True)
class EntraTenant:
    name: str
    id: str
    domain: str
    members: str  # user-name prefix
    sharepoint: str  # host


ENTRA_TENANTS: dict[str, EntraTenant] = {
    t.name: t for t in (
        EntraTenant("contoso", "aaaaaaaa-0000-4000-8000-c0c0c0c0c0c0",
                    "contoso.onmicrosoft.com", "alice", "contoso.sharepoint.com"),
        EntraTenant("fabrikam", "bbbbbbbb-0000-4000-8000-fabfabfabfab",
                    "fabrikam.onmicrosoft.com", "bob", "fabrikam.sharepoint.com"),
    )
}
SHAREPOINT_HOSTS = {t.sharepoint: t for t in ENTRA_TENANTS.values()}
# Hosts no provider may bind: served only to record what (wrongly) arrives there.
TRAP_HOSTS = ("evil.example.com", "*.myshopify.com.evil.com")

# The names a proxy resolves to this server (devstack.fakedns) ...
DNS_NAMES = (SF_LOGIN, "*.my.salesforce.com", "*.myshopify.com", ENTRA_LOGIN, GRAPH,
             "*.sharepoint.com", *TRAP_HOSTS)
# ... and the certificate's names (the test process reaches /_fake at localhost).
CERT_NAMES = (*DNS_NAMES, "localhost", "127.0.0.1")


def fake_dns_spec(port: int, host: str = "127.0.0.1") -> str:
    """The ``DEVSTACK_FAKE_DNS`` value that sends every name of :data:`DNS_NAMES` to this
    server listening on ``host:port``."""
    return f"{','.join(DNS_NAMES)}={host}:{port}"


class TenantFakes:
    """The running fake as a test sees it: its ``/_fake`` hooks, and a browser that reaches
    its hosts by their real names (:class:`devstack.fakedns.RoutingTransport`)."""

    def __init__(self, running: Running, ca_file: Path) -> None:
        self.running = running
        self.ca_file = ca_file

    @property
    def port(self) -> int:
        return int(self.running.info["port"])

    @property
    def dns(self) -> str:
        """The ``DEVSTACK_FAKE_DNS`` rules that send :data:`DNS_NAMES` here."""
        return fake_dns_spec(self.port)

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _admin(self, method: str, what: str, body: Any = None) -> Any:
        with httpx2.Client(verify=self.tls(), timeout=15, trust_env=False) as c:
            r = c.request(method, f"https://localhost:{self.port}/_fake/{what}", json=body)
            r.raise_for_status()
            return r.json()

    def requests(self, **match: Any) -> list[dict[str, Any]]:
        """The recorded requests whose fields equal ``match`` (all of them without)."""
        return [r for r in self._admin("GET", "requests")
                if all(r.get(k) == v for k, v in match.items())]

    def tokens(self) -> list[str]:
        """Every access and refresh token the fake ever issued."""
        data = self._admin("GET", "tokens")
        return [*data["access"], *data["refresh"]]

    def expire(self, user: str, *, grant: bool = False) -> None:
        """The user's access tokens expire (the APIs answer 401); with ``grant`` the
        user's refresh tokens die too."""
        self._admin("POST", "expire", {"user": user, "grant": grant})

    def knobs(self, **knobs: Any) -> None:
        self._admin("POST", "knobs", knobs)

    def browser(self) -> httpx2.Client:
        """A browser: trusts the test CA, keeps cookies, follows no redirects, reaches the
        faked names here and everything else directly."""
        from devstack.fakedns import RoutingTransport

        return httpx2.Client(transport=RoutingTransport(self.dns, verify=self.tls()),
                             follow_redirects=False, timeout=20, trust_env=False)

    def close(self) -> None:
        self.running.close()


def start(ca: CA, workdir: Path, *, client_id: str, client_secret: str,
          secret_env: str = "TENANT_FAKES_SECRET") -> TenantFakes:
    """Issue the fake's certificate from ``ca`` (names :data:`CERT_NAMES`) and start the
    fake as a process in ``workdir``."""
    pki = workdir / "pki"
    cert, key = make_leaf(ca, list(CERT_NAMES), pki, "tenantfakes")
    ready = workdir / "tenantfakes.ready"
    running = start_server(
        ["-m", "devstack.tenantfakes", "--cert", str(cert), "--key", str(key),
         "--client-id", client_id, "--client-secret-env", secret_env,
         "--ready-file", str(ready)],
        ready, env={secret_env: client_secret}, log_dir=workdir / "logs", name="tenantfakes")
    return TenantFakes(running, ca.cert_path)


def member(prefix: str, user: str) -> bool:
    return user == prefix or user.startswith(prefix + "-") or user.startswith(prefix + "_") \
        or (user.startswith(prefix) and user[len(prefix):].isdigit())


def _sf_org_of(user: str) -> str | None:
    return next((h for h, (_, p) in SF_ORGS.items() if member(p, user)), None)


def _entra_tenant_of(user: str) -> EntraTenant | None:
    return next((t for t in ENTRA_TENANTS.values() if member(t.members, user)), None)


# -- state -----------------------------------------------------------------------------

@dataclass(eq=False)
class Grant:
    """One consent: everything issued from it dies with it."""

    provider: str  # salesforce | shopify | entra
    user: str
    tenant: str  # the org host, the shop host, the Entra tenant name
    scope: str
    dead: bool = False


@dataclass(eq=False)
class Access:
    grant: Grant
    audience: str  # the host the token is good for
    scope: str
    expires_at: float | None
    expired: bool = False

    def live(self, now: float) -> bool:
        return (not self.grant.dead and not self.expired
                and (self.expires_at is None or now < self.expires_at))


@dataclass(eq=False)
class Code:
    provider: str
    user: str
    tenant: str
    issuer: str  # the host that issued it
    redirect_uri: str
    challenge: str | None
    scope: str
    used: bool = False


@dataclass
class State:
    client_id: str
    client_secret: str
    codes: dict[str, Code] = field(default_factory=dict)
    access: dict[str, Access] = field(default_factory=dict)
    refresh: dict[str, Grant] = field(default_factory=dict)
    # Shopify: a rotated-out refresh token keeps working until a successor is used.
    predecessor: dict[str, str] = field(default_factory=dict)
    retired: set[str] = field(default_factory=set)
    requests: list[dict[str, Any]] = field(default_factory=list)
    knobs: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def issue_access(self, grant: Grant, audience: str, scope: str,
                     lifetime: int | None) -> str:
        tag = {"salesforce": "sf", "shopify": "shop", "entra": "ms"}[grant.provider]
        token = f"at_{tag}_{secrets.token_urlsafe(18)}"
        expires = time.time() + lifetime if lifetime is not None else None
        self.access[token] = Access(grant, audience, scope, expires)
        return token

    def issue_refresh(self, grant: Grant) -> str:
        tag = {"salesforce": "sf", "shopify": "shop", "entra": "ms"}[grant.provider]
        token = f"rt_{tag}_{secrets.token_urlsafe(18)}"
        self.refresh[token] = grant
        return token


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json",
                    headers={"Cache-Control": "no-store", **(headers or {})})


def _body(req: Request) -> dict[str, str]:
    if req.mimetype == "application/json":
        data = req.get_json(silent=True)
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    return dict(req.form.items())


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _redirect(uri: str, params: dict[str, str]) -> Response:
    sep = "&" if "?" in uri else "?"
    return Response(status=302, headers={"Location": f"{uri}{sep}{urlencode(params)}"})


def _bearer(req: Request) -> str:
    value = req.headers.get("Authorization", "")
    return value[7:].strip() if value[:7].lower() == "bearer " else ""


def _host(req: Request) -> str:
    """The Host header's name (lower case, no port, no trailing dot)."""
    raw = (req.headers.get("Host") or "").strip().lower()
    if raw.startswith("["):
        return raw.split("]", 1)[0] + "]"
    name = raw.rsplit(":", 1)[0] if raw.count(":") == 1 else raw
    return name.removesuffix(".")


class Handler(QuietRequestHandler):
    """Also passes on the SNI the client sent (``devstack.sni``), which the server's TLS
    context stores on the connection."""

    def make_environ(self) -> dict[str, Any]:
        environ = super().make_environ()
        environ["devstack.sni"] = getattr(self.connection, "devstack_sni", None)
        return environ


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])

    def remember(sock: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        sock.devstack_sni = name

    ctx.sni_callback = remember
    return ctx


# -- the app ---------------------------------------------------------------------------

class App:
    def __init__(self, state: State) -> None:
        self.s = state

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        req = Request(environ)
        host = _host(req)
        if req.path.startswith("/_fake/"):
            if not is_loopback(req.remote_addr):
                return Response("forbidden", status=403)(environ, start_response)
            return self.admin(req, req.path.removeprefix("/_fake/"))(environ, start_response)
        rec: dict[str, Any] = {}
        try:
            resp = self.route(req, host, rec)
        except Exception as exc:  # noqa: BLE001 - a fake: show the bug to the test
            resp = _json(500, {"error": "fake_bug", "detail": repr(exc)})
        self.record(req, host, resp.status_code, rec)
        return resp(environ, start_response)

    # -- recording -----------------------------------------------------------------------
    def record(self, req: Request, host: str, status: int, extra: dict[str, Any]) -> None:
        body = _body(req)
        secret_sent = "client_secret" in body
        if secret_sent:
            body["client_secret"] = "<client secret>"
        auth = req.headers.get("Authorization")
        basic = auth is not None and auth[:6].lower() == "basic "
        credential = (_bearer(req) or req.headers.get("X-Shopify-Access-Token", "")
                      or None)
        with self.s.lock:
            owner = self.s.access.get(credential or "")
            rec = {
                "host": host, "sni": req.environ.get("devstack.sni"), "method": req.method,
                "path": req.path, "query": dict(req.args.items()), "form": body,
                "authorization": None if basic else auth,
                "shopify_token": req.headers.get("X-Shopify-Access-Token"),
                "credential": credential,
                "credential_user": owner.grant.user if owner else None,
                "credential_audience": owner.audience if owner else None,
                "client_secret_sent": secret_sent or basic,
                "status": status, "kind": "other", **extra,
            }
            self.s.requests.append(rec)

    # -- /_fake --------------------------------------------------------------------------
    def admin(self, req: Request, what: str) -> Response:
        s = self.s
        with s.lock:
            if what == "requests" and req.method == "GET":
                return _json(200, s.requests)
            if what == "tokens" and req.method == "GET":
                return _json(200, {"access": list(s.access), "refresh": list(s.refresh)})
            data = req.get_json(silent=True) or {}
            if what == "expire" and req.method == "POST":
                user = data.get("user")
                for access in s.access.values():
                    if access.grant.user == user:
                        access.expired = True
                if data.get("grant"):
                    for grant in s.refresh.values():
                        if grant.user == user:
                            grant.dead = True
                return _json(200, {})
            if what == "knobs" and req.method == "POST":
                s.knobs.update(data)
                return _json(200, s.knobs)
        return Response("not found", status=404)

    # -- routing -------------------------------------------------------------------------
    def route(self, req: Request, host: str, rec: dict[str, Any]) -> Response:
        path = req.path
        if host == SF_LOGIN or host in SF_ORGS:
            return self.salesforce(req, host, path, rec)
        if host in SHOPS:
            return self.shopify(req, host, path, rec)
        if host == ENTRA_LOGIN:
            return self.entra(req, path, rec)
        if host == GRAPH:
            return self.graph(req, path, rec)
        if host in SHAREPOINT_HOSTS:
            return self.sharepoint(req, host, path, rec)
        rec["kind"] = "unknown_host"
        return _json(404, {"error": "no_such_host", "host": host})

    def _client(self, req: Request, body: dict[str, str]) -> tuple[str, bool]:
        """(client authentication method, credentials right)."""
        header = req.headers.get("Authorization", "")
        if header[:6].lower() == "basic ":
            raw = base64.b64decode(header[6:]).decode()
            cid, _, secret = raw.partition(":")
            return "client_secret_basic", (unquote(cid) == self.s.client_id
                                           and unquote(secret) == self.s.client_secret)
        if "client_secret" in body:
            return "client_secret_post", (body.get("client_id") == self.s.client_id
                                          and body["client_secret"] == self.s.client_secret)
        return "none", False

    def _take_code(self, body: dict[str, str], *, provider: str, issuer: str | None,
                   pkce: bool = True) -> Code | None:
        """The unused code of ``provider`` named in ``body``, issued by ``issuer`` (None:
        any host of the provider), with a matching redirect URI and PKCE verifier."""
        code = self.s.codes.get(body.get("code", ""))
        if (code is None or code.used or code.provider != provider
                or (issuer is not None and code.issuer != issuer)):
            return None
        if "redirect_uri" in body and body["redirect_uri"] != code.redirect_uri:
            return None
        if pkce and code.challenge is not None and \
                _challenge(body.get("code_verifier", "")) != code.challenge:
            return None
        code.used = True
        return code

    def _authorize_common(self, req: Request) -> str | None:
        """What is wrong with an authorize request (None: nothing)."""
        a = req.args
        if a.get("client_id") != self.s.client_id:
            return "unknown client_id"
        if not a.get("redirect_uri"):
            return "redirect_uri missing"
        if a.get("code_challenge") and a.get("code_challenge_method") != "S256":
            return "only PKCE S256"
        return None

    # -- Salesforce ------------------------------------------------------------------------
    # https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_web_server_flow.htm
    # (authorize, token; PKCE: "If the code_challenge value is provided in the
    # authorization request and a code_verifier value is provided in the token request,
    # Salesforce compares..."): copy read at
    # https://developer.salesforce.com/docs/atlas.ja-jp.224.0.api_rest.meta/api_rest/intro_understanding_web_server_oauth_flow.htm
    def salesforce(self, req: Request, host: str, path: str,
                   rec: dict[str, Any]) -> Response:
        if path == "/services/oauth2/authorize" and req.method == "GET":
            rec["kind"] = "authorize"
            return self._sf_authorize(req, host)
        if path == "/services/oauth2/token" and req.method == "POST":
            rec["kind"] = "token"
            return self._sf_token(req, host, rec)
        if path == "/services/oauth2/revoke" and req.method == "POST":
            rec["kind"] = "revoke"
            return self._sf_revoke(req, host)
        if host in SF_ORGS and path.startswith("/services/data/"):
            rec["kind"] = "api"
            return self._sf_api(req, host, path)
        return _json(404, [{"errorCode": "NOT_FOUND",
                            "message": "The requested resource does not exist"}])

    def _sf_authorize(self, req: Request, host: str) -> Response:
        wrong = self._authorize_common(req)
        a = req.args
        if wrong is None and a.get("response_type") != "code":
            wrong = "response_type must be code"
        user = a.get("login_hint", "")
        org = _sf_org_of(user)
        if wrong is None and org is None:
            wrong = f"no Salesforce user {user!r}"
        if wrong is None and host != SF_LOGIN and host != org:
            # My Domain login: only the org's own users sign in there.
            wrong = f"{user!r} is not a user of {host}"
        if wrong is not None:
            return Response(f"Salesforce login refused: {wrong}", status=400)
        assert org is not None
        code = secrets.token_urlsafe(24)
        with self.s.lock:
            self.s.codes[code] = Code("salesforce", user, org, host, a["redirect_uri"],
                                      a.get("code_challenge"), a.get("scope", ""))
        return _redirect(a["redirect_uri"], {"code": code, "state": a.get("state", "")})

    def _sf_answer(self, grant: Grant, access: str, refresh: str | None) -> dict[str, Any]:
        # The token response: no expires_in; instance_url, id, issued_at, signature
        # (https://jsforce.github.io/jsforce/types/oauth2.TokenResponse.html: "id ... The
        # format of the URL is https://login.salesforce.com/id/orgID/userID"; sample:
        # https://gist.github.com/dieffrei/8d95709f6d9f8dc93a7d19faaa5cd2ec)
        org_id = SF_ORGS[grant.tenant][0]
        user_id = "005" + hashlib.sha256(grant.user.encode()).hexdigest()[:12].upper()
        issued = str(int(time.time() * 1000))
        signature = base64.b64encode(hmac.new(
            self.s.client_secret.encode(), f"{org_id}{user_id}{issued}".encode(),
            hashlib.sha256).digest()).decode()
        answer: dict[str, Any] = {
            "access_token": access, "signature": signature, "scope": grant.scope,
            "instance_url": f"https://{grant.tenant}",
            "id": f"https://{SF_LOGIN}/id/{org_id}/{user_id}",
            "token_type": "Bearer", "issued_at": issued,
        }
        if refresh is not None:
            answer["refresh_token"] = refresh
        return answer

    def _sf_token(self, req: Request, host: str, rec: dict[str, Any]) -> Response:
        body = _body(req)
        method, good = self._client(req, body)
        grant_type = body.get("grant_type")
        rec.update(grant_type=grant_type, client_auth=method)
        s = self.s
        with s.lock:
            if not good:
                return _json(400, {"error": "invalid_client",
                                   "error_description": "invalid client credentials"})
            if grant_type == "authorization_code":
                code = self._take_code(body, provider="salesforce",
                                       issuer=None if host == SF_LOGIN else host)
                if code is None:
                    return _json(400, {"error": "invalid_grant",
                                       "error_description": "invalid authorization code"})
                grant = Grant("salesforce", code.user, code.tenant, code.scope)
                rec["user"] = grant.user
                access = s.issue_access(grant, grant.tenant, grant.scope, None)
                refresh = (s.issue_refresh(grant) if "refresh_token" in code.scope.split()
                           else None)
                answer = self._sf_answer(grant, access, refresh)
                if "salesforce_instance_url" in s.knobs:  # a lying token endpoint, once
                    answer["instance_url"] = s.knobs.pop("salesforce_instance_url")
                return _json(200, answer)
            if grant_type == "refresh_token":
                grant_or_none = s.refresh.get(body.get("refresh_token", ""))
                rec["user"] = grant_or_none.user if grant_or_none else None
                if (grant_or_none is None or grant_or_none.dead
                        or grant_or_none.provider != "salesforce"
                        or (host != SF_LOGIN and host != grant_or_none.tenant)):
                    # https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_flow_errors.htm
                    return _json(400, {"error": "invalid_grant",
                                       "error_description": "expired access/refresh token"})
                access = s.issue_access(grant_or_none, grant_or_none.tenant,
                                        grant_or_none.scope, None)
                return _json(200, self._sf_answer(grant_or_none, access, None))
        return _json(400, {"error": "unsupported_grant_type",
                           "error_description": "grant type not supported"})

    def _sf_revoke(self, req: Request, host: str) -> Response:
        # https://developer.salesforce.com/docs/platform/mobile-sdk/guide/oauth-revoking-tokens.html
        # (POST token=... to https://<MyDomain>.my.salesforce.com/services/oauth2/revoke;
        # a refresh token revokes its access tokens too; 400 invalid_token otherwise)
        token = _body(req).get("token", "")
        s = self.s
        with s.lock:
            access = s.access.get(token)
            grant = access.grant if access is not None else s.refresh.get(token)
            if (grant is None or grant.provider != "salesforce" or grant.dead
                    or (access is not None and access.expired)
                    or (host != SF_LOGIN and host != grant.tenant)):
                return _json(400, {"error": "invalid_token",
                                   "error_description": "invalid token"})
            if access is not None:
                access.expired = True
            else:
                grant.dead = True
        return Response("", status=200)

    def _sf_api(self, req: Request, host: str, path: str) -> Response:
        token = _bearer(req)
        with self.s.lock:
            access = self.s.access.get(token)
            ok = (access is not None and access.grant.provider == "salesforce"
                  and access.audience == host and access.live(time.time()))
        if not ok:
            # https://pastebin.com/fMiNJbC2 and https://nango.dev/blog/fix-salesforce-invalid-session-id-error
            # (401, a JSON array of {message, errorCode}); a token of another org is the
            # same INVALID_SESSION_ID ("a token used against the wrong instance ... all
            # look identical", same post)
            return _json(401, [{"message": "Session expired or invalid",
                                "errorCode": "INVALID_SESSION_ID"}])
        assert access is not None
        return _json(200, {"org": host, "orgId": SF_ORGS[host][0], "user": access.grant.user,
                           "path": path})

    # -- Shopify -------------------------------------------------------------------------
    # https://shopify.dev/docs/apps/build/authentication-authorization/access-tokens/authorization-code-grant
    # (read via https://shopify.dev/tutorials/authenticate-with-oauth: the redirect carries
    # code, hmac, host, shop, state, timestamp; POST
    # https://{shop}.myshopify.com/admin/oauth/access_token with client_id, client_secret,
    # code); HMAC over the other parameters: https://hexdocs.pm/shopify_oauth/Shopify.OAuth.html
    def shopify(self, req: Request, shop: str, path: str, rec: dict[str, Any]) -> Response:
        if path == "/admin/oauth/authorize" and req.method == "GET":
            rec["kind"] = "authorize"
            return self._shop_authorize(req, shop)
        if path == "/admin/oauth/access_token" and req.method == "POST":
            rec["kind"] = "token"
            return self._shop_token(req, shop, rec)
        if path.startswith("/admin/api/"):
            rec["kind"] = "api"
            return self._shop_api(req, shop, path)
        return _json(404, {"errors": "Not Found"})

    def _shop_authorize(self, req: Request, shop: str) -> Response:
        wrong = self._authorize_common(req)
        a = req.args
        user = a.get("login_hint", "")
        if wrong is None and not any(member(p, user) for p in SHOPS[shop]):
            wrong = f"{user!r} is not staff of {shop}"
        if wrong is not None:
            return Response(f"Shopify install refused: {wrong}", status=400)
        code = secrets.token_hex(16)
        with self.s.lock:
            self.s.codes[code] = Code("shopify", user, shop, shop, a["redirect_uri"],
                                      a.get("code_challenge"), a.get("scope", ""))
        name = shop.removesuffix(".myshopify.com")
        params = {"code": code,
                  "host": base64.b64encode(f"admin.shopify.com/store/{name}".encode())
                  .decode().rstrip("="),
                  "shop": shop, "state": a.get("state", ""),
                  "timestamp": str(int(time.time()))}
        message = "&".join(f"{k}={v}" for k, v in sorted(params.items()))
        params["hmac"] = hmac.new(self.s.client_secret.encode(), message.encode(),
                                  hashlib.sha256).hexdigest()
        return _redirect(a["redirect_uri"], params)

    def _shop_answer(self, grant: Grant, expiring: bool) -> dict[str, Any]:
        # https://shopify.dev/changelog/offline-access-tokens-now-support-expiry-and-refresh
        # ("expire after 60 minutes and come with a refresh token")
        s = self.s
        lifetime = int(s.knobs.get("expires_in", 3600)) if expiring else None
        answer: dict[str, Any] = {
            "access_token": s.issue_access(grant, grant.tenant, grant.scope, lifetime),
            "scope": grant.scope}
        if expiring:
            answer.update(expires_in=lifetime, refresh_token=s.issue_refresh(grant),
                          refresh_token_expires_in=7776000)
        return answer

    def _shop_token(self, req: Request, shop: str, rec: dict[str, Any]) -> Response:
        body = _body(req)
        method, good = self._client(req, body)
        grant_type = body.get("grant_type", "authorization_code")
        rec.update(grant_type=grant_type, client_auth=method)
        s = self.s
        with s.lock:
            if not good:
                return _json(400, {"error": "invalid_client",
                                   "error_description": "Client credentials are invalid"})
            if grant_type == "authorization_code":
                # Shopify does not implement PKCE: a code_verifier is ignored.
                code = self._take_code(body, provider="shopify", issuer=shop, pkce=False)
                if code is None:
                    # https://github.com/nozzlegear/ShopifySharp/issues/70 (400, this body)
                    return _json(400, {"error": "invalid_request",
                                       "error_description": "The authorization code was "
                                                            "not found or was already used"})
                grant = Grant("shopify", code.user, shop, code.scope)
                rec["user"] = grant.user
                return _json(200, self._shop_answer(grant, body.get("expiring") == "1"))
            if grant_type == "refresh_token":
                rt = body.get("refresh_token", "")
                grant_or_none = s.refresh.get(rt)
                rec["user"] = grant_or_none.user if grant_or_none else None
                if (grant_or_none is None or grant_or_none.dead
                        or grant_or_none.provider != "shopify"
                        or grant_or_none.tenant != shop or rt in s.retired):
                    return _json(400, {"error": "invalid_grant",
                                       "error_description": "refresh token is invalid"})
                # https://shopify.dev/docs/apps/build/security/credentials-and-data/use-expiring-offline-access-tokens
                # ("Shopify replaces its refresh token every time your app uses it"); the
                # previous one works until its replacement is used
                # (https://shopify.dev/changelog/more-resilient-refreshes-for-expiring-offline-access-tokens).
                if rt in s.predecessor:
                    s.retired.add(s.predecessor[rt])
                answer = self._shop_answer(grant_or_none, True)
                s.predecessor[answer["refresh_token"]] = rt
                return _json(200, answer)
        return _json(400, {"error": "unsupported_grant_type"})

    def _shop_api(self, req: Request, shop: str, path: str) -> Response:
        # https://shopify.dev/docs/apps/build/authentication-authorization/access-tokens
        # ("authenticates requests with a token sent in the X-Shopify-Access-Token header")
        token = req.headers.get("X-Shopify-Access-Token", "")
        with self.s.lock:
            access = self.s.access.get(token)
            ok = (access is not None and access.grant.provider == "shopify"
                  and access.audience == shop and access.live(time.time()))
        if not ok:
            return _json(401, {"errors": "[API] Invalid API key or access token "
                                         "(unrecognized login or wrong password)"})
        assert access is not None
        name = shop.removesuffix(".myshopify.com")
        return _json(200, {"shop": {"name": name, "myshopify_domain": shop,
                                    "user": access.grant.user, "path": path}})

    # -- Entra ID ----------------------------------------------------------------------------
    # https://learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow
    # (/{tenant}/oauth2/v2.0/authorize and /token; tenant "common, organizations, consumers,
    # and tenant identifiers"; refresh_token only with offline_access)
    _ENTRA_PATH = re.compile(r"^/([^/]+)/oauth2/v2\.0/(authorize|token)$")
    _OIDC = frozenset({"openid", "profile", "email", "offline_access"})

    def _path_tenant(self, segment: str) -> EntraTenant | str | None:
        """The tenant a path segment names: an EntraTenant, "any" for organizations /
        common, None for none of ours."""
        if segment in ("organizations", "common"):
            return "any"
        for t in ENTRA_TENANTS.values():
            if segment in (t.name, t.id, t.domain):
                return t
        return None

    def entra(self, req: Request, path: str, rec: dict[str, Any]) -> Response:
        m = self._ENTRA_PATH.match(path)
        if m is None:
            return _json(404, {"error": "not_found"})
        where = self._path_tenant(m.group(1))
        if m.group(2) == "authorize" and req.method == "GET":
            rec["kind"] = "authorize"
            return self._entra_authorize(req, where)
        if m.group(2) == "token" and req.method == "POST":
            rec["kind"] = "token"
            return self._entra_token(req, where, rec)
        return _json(405, {"error": "invalid_request"})

    @classmethod
    def _resource(cls, scope: str) -> tuple[str | None, str | None]:
        """(the audience host the scopes name, what is wrong). Scopes ``https://host/x``
        name that host; the others (User.Read, ...) are Graph's; OIDC scopes name none.
        https://learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow
        ("The scopes must all be from a single resource")."""
        hosts = set()
        for s in scope.split():
            if s in cls._OIDC:
                continue
            if s.startswith("https://"):
                hosts.add(urlsplit(s).netloc.lower())
            else:
                hosts.add(GRAPH)
        if len(hosts) > 1:
            return None, ("AADSTS28000: Provided value for the input parameter scope is not "
                          "valid because it contains more than one resource.")
        return (hosts.pop() if hosts else GRAPH), None

    def _entra_authorize(self, req: Request, where: EntraTenant | str | None) -> Response:
        wrong = self._authorize_common(req)
        a = req.args
        if wrong is None and a.get("response_type") != "code":
            wrong = "response_type must be code"
        user = a.get("login_hint", "")
        home = _entra_tenant_of(user)
        if wrong is None and home is None:
            wrong = f"AADSTS50034: The user account {user!r} does not exist"
        if wrong is None and where is None:
            wrong = "AADSTS90002: Tenant not found"
        if wrong is None and isinstance(where, EntraTenant) and where is not home:
            wrong = (f"AADSTS50020: User account {user!r} from identity provider does not "
                     f"exist in tenant {where.name}")
        if wrong is None and self._resource(a.get("scope", ""))[1] is not None:
            wrong = self._resource(a.get("scope", ""))[1]
        if wrong is not None:
            return Response(f"Sign-in refused: {wrong}", status=400)
        assert home is not None
        code = secrets.token_urlsafe(32)
        with self.s.lock:
            self.s.codes[code] = Code("entra", user, home.name, ENTRA_LOGIN,
                                      a["redirect_uri"], a.get("code_challenge"),
                                      a.get("scope", ""))
        return _redirect(a["redirect_uri"], {"code": code, "state": a.get("state", ""),
                                             "session_state": secrets.token_hex(8)})

    @staticmethod
    def _entra_error(error: str, code: int, text: str) -> Response:
        # https://learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow
        # ("Error response example": error, error_description, error_codes, timestamp,
        # trace_id, correlation_id)
        return _json(400, {"error": error, "error_description": text,
                           "error_codes": [code],
                           "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
                           "trace_id": secrets.token_hex(8),
                           "correlation_id": secrets.token_hex(8)})

    def _entra_answer(self, grant: Grant, audience: str, scope: str) -> dict[str, Any]:
        s = self.s
        lifetime = int(s.knobs.get("expires_in", 3599))
        granted = " ".join(x for x in scope.split() if x not in self._OIDC)
        answer: dict[str, Any] = {
            "token_type": "Bearer", "scope": granted, "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": s.issue_access(grant, audience, granted, lifetime)}
        if "offline_access" in grant.scope.split():
            answer["refresh_token"] = s.issue_refresh(grant)
        return answer

    def _entra_token(self, req: Request, where: EntraTenant | str | None,
                     rec: dict[str, Any]) -> Response:
        body = _body(req)
        method, good = self._client(req, body)
        grant_type = body.get("grant_type")
        rec.update(grant_type=grant_type, client_auth=method, scope=body.get("scope"))
        s = self.s
        with s.lock:
            if where is None:
                return self._entra_error("invalid_request", 90002,
                                         "AADSTS90002: Tenant not found.")
            if not good:
                return self._entra_error("invalid_client", 7000215,
                                         "AADSTS7000215: Invalid client secret provided.")
            if grant_type == "authorization_code":
                code = self._take_code(body, provider="entra", issuer=ENTRA_LOGIN)
                if code is None or (isinstance(where, EntraTenant)
                                    and where.name != code.tenant):
                    return self._entra_error("invalid_grant", 70008,
                                             "AADSTS70008: The provided authorization code "
                                             "or refresh token has expired due to inactivity.")
                grant = Grant("entra", code.user, code.tenant, code.scope)
                rec["user"] = grant.user
                scope = body.get("scope") or code.scope
                audience, wrong = self._resource(scope)
                if wrong is not None or audience is None:
                    return self._entra_error("invalid_scope", 28000, str(wrong))
                return self._entra_refused(grant, audience) or _json(
                    200, self._entra_answer(grant, audience, scope))
            if grant_type == "refresh_token":
                grant_or_none = s.refresh.get(body.get("refresh_token", ""))
                rec["user"] = grant_or_none.user if grant_or_none else None
                if grant_or_none is None or grant_or_none.dead or grant_or_none.provider \
                        != "entra" or (isinstance(where, EntraTenant)
                                       and where.name != grant_or_none.tenant):
                    # https://learn.microsoft.com/entra/identity-platform/reference-error-codes
                    # (AADSTS50173: the grant was revoked; invalid_grant)
                    return self._entra_error(
                        "invalid_grant", 50173,
                        "AADSTS50173: The provided grant has expired due to it being "
                        "revoked, a fresh auth token is needed.")
                # https://learn.microsoft.com/entra/identity-platform/refresh-tokens
                # ("Refresh tokens are bound to a combination of user and client, but
                # aren't tied to a resource or tenant"; "Refresh tokens replace themselves
                # with a fresh token upon every use. The Microsoft identity platform
                # doesn't revoke old refresh tokens")
                scope = body.get("scope") or grant_or_none.scope
                audience, wrong = self._resource(scope)
                if wrong is not None or audience is None:
                    return self._entra_error("invalid_scope", 28000, str(wrong))
                return self._entra_refused(grant_or_none, audience) or _json(
                    200, self._entra_answer(grant_or_none, audience, scope))
        return self._entra_error("unsupported_grant_type", 70003,
                                 "AADSTS70003: The app requested an unsupported grant type.")

    def _entra_refused(self, grant: Grant, audience: str) -> Response | None:
        """A resource the user's tenant does not have: AADSTS500011 invalid_resource
        (https://github.com/SharePoint/sp-dev-provisioning-templates/issues/72: "error
        invalid_resource ... AADSTS500011: The resource principal named https://... was not
        found in the tenant named ...", for a SharePoint host;
        https://learn.microsoft.com/entra/identity-platform/reference-error-codes)."""
        if audience == GRAPH:
            return None
        tenant = SHAREPOINT_HOSTS.get(audience)
        if tenant is not None and tenant.name == grant.tenant:
            return None
        return self._entra_error(
            "invalid_resource", 500011,
            f"AADSTS500011: The resource principal named https://{audience} was not found "
            f"in the tenant named {grant.tenant}. This can happen if the application has "
            "not been installed by the administrator of the tenant or consented to by any "
            "user in the tenant. You might have sent your authentication request to the "
            "wrong tenant.")

    # -- Microsoft Graph -------------------------------------------------------------------
    def _live(self, token: str, audience: str) -> tuple[Access | None, str]:
        """The live token for ``audience``, or (None, why not)."""
        access = self.s.access.get(token)
        if not token:
            return None, "Access token is empty."
        if access is None or access.grant.provider != "entra" or access.grant.dead:
            return None, "Access token validation failure."
        if access.audience != audience:
            return None, "Access token validation failure. Invalid audience."
        if not access.live(time.time()):
            return None, "Lifetime validation failed, the token is expired."
        return access, ""

    def graph(self, req: Request, path: str, rec: dict[str, Any]) -> Response:
        rec["kind"] = "api"
        with self.s.lock:
            access, why = self._live(_bearer(req), GRAPH)
        if access is None:
            # 401 InvalidAuthenticationToken (https://stackoverflow.com/questions/46101980:
            # {"error": {"code": "InvalidAuthenticationToken", "message": "Access token
            # validation failure."}}; "Invalid audience" for another resource's token)
            return _json(401, {"error": {"code": "InvalidAuthenticationToken",
                                         "message": why}},
                         {"WWW-Authenticate": 'Bearer realm="", authorization_uri='
                          '"https://login.microsoftonline.com/common/oauth2/authorize", '
                          'client_id="00000003-0000-0000-c000-000000000000"'})
        tenant = ENTRA_TENANTS[access.grant.tenant]
        if path == "/v1.0/me" and req.method == "GET":
            user = access.grant.user
            return _json(200, {"id": hashlib.sha256(user.encode()).hexdigest()[:32],
                               "displayName": user,
                               "userPrincipalName": f"{user}@{tenant.domain}"})
        if path == "/v1.0/sites/root" and req.method == "GET":
            # https://learn.microsoft.com/graph/api/site-get (Sites.Read.All or wider)
            if not any(s.startswith("Sites.") for s in access.scope.split()):
                return _json(403, {"error": {"code": "accessDenied",
                                             "message": "Access denied"}})
            with self.s.lock:  # a lying Graph, once
                web_url = self.s.knobs.pop("graph_web_url", f"https://{tenant.sharepoint}")
            site = {"id": f"{tenant.sharepoint},{tenant.id}", "displayName": "Communication site",
                    "webUrl": web_url, "siteCollection": {"hostname": tenant.sharepoint}}
            select = req.args.get("$select")
            if select:
                site = {k: v for k, v in site.items() if k in select.split(",")}
            return _json(200, site)
        return _json(404, {"error": {"code": "Request_ResourceNotFound",
                                     "message": f"Resource '{path}' does not exist"}})

    # -- SharePoint --------------------------------------------------------------------------
    def sharepoint(self, req: Request, host: str, path: str,
                   rec: dict[str, Any]) -> Response:
        rec["kind"] = "api"
        tenant = SHAREPOINT_HOSTS[host]
        with self.s.lock:
            access, why = self._live(_bearer(req), host)
            presented = self.s.access.get(_bearer(req))
        if access is None:
            # A token of another audience (a Graph token): 401, the details in
            # x-ms-diagnostics ("3000003;reason=\"Invalid audience Uri '...'\";category=
            # \"invalid_client\"": https://sharepoint.stackexchange.com/questions/284568)
            # and WWW-Authenticate (https://learn.microsoft.com/en-us/answers/questions/5786195:
            # "error details appear only in headers"), body {"error_description": "Invalid
            # issuer or signature."} (https://github.com/SharePoint/sp-dev-docs/issues/5889).
            # error="invalid_token" follows RFC 6750 section 3.1 (the exact header wording
            # is not documented).
            audience = presented.audience if presented is not None else ""
            diagnostics = (f"3000003;reason=\"Invalid audience Uri 'https://{audience}'.\";"
                           'category="invalid_client"' if audience and audience != host
                           else f'3000006;reason="{why}";category="invalid_client"')
            challenge = (f'Bearer realm="{tenant.id}",client_id="00000003-0000-0ff1-ce00-'
                         '000000000000",trusted_issuers="00000001-0000-0000-c000-'
                         '000000000000@*,https://sts.windows.net/*/",authorization_uri='
                         '"https://login.microsoftonline.com/common/oauth2/authorize",'
                         'error="invalid_token"')
            return _json(401, {"error_description": "Invalid issuer or signature."},
                         {"WWW-Authenticate": challenge, "x-ms-diagnostics": diagnostics})
        if path.startswith("/_api/"):
            return _json(200, {"Title": tenant.name.capitalize(), "Url": f"https://{host}",
                               "user": access.grant.user, "path": path})
        return _json(404, {"error": {"code": "-2147024894, System.IO.FileNotFoundException",
                                     "message": "File Not Found."}})


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret-env", required=True)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(list(argv) if argv is not None else None)
    configure_logging(args.debug)
    state = State(args.client_id, os.environ[args.client_secret_env])
    server = DevServer(args.host, args.port, App(state), Handler,
                       tls_context(args.cert, args.key))
    port = server.socket.getsockname()[1]
    write_ready_file(args.ready_file, {"port": port, "pid": os.getpid(),
                                       "url": f"https://localhost:{port}"})
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
