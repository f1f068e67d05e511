"""One configurable fake of the real OAuth providers in credproxy's catalog, for the
catalog's end-to-end tests (issue 13).

Run as a separate process::

    python -m devstack.fakeprovider --cert C --key K --providers slack,github,... \\
        --client-id ID --client-secret-env VAR --ready-file ready.json

Every provider gets its own TLS port (so each has its own host, ``localhost:<port>``, as
the real ones do); the ready file maps catalog ids to ports. On each port:

* ``GET /authorize``: consents at once (``login_hint`` names the user) and redirects to
  ``redirect_uri`` with a code; PKCE S256 is required.
* ``POST /token``: the code exchange and the refresh, in the provider's dialect: its token
  response shape (Slack's ``authed_user``, Salesforce without ``expires_in``, GitHub),
  whether a refresh token is issued at all (Google only with ``access_type=offline``, ...),
  refresh-token rotation (a rotated-out refresh token presented again kills the grant
  where the provider says so), and its exact answer for a dead refresh token.
* the revocation endpoint in the provider's style (RFC 7009 form, JSON, bearer, GitHub's
  ``DELETE /applications/{client_id}/grant``, Slack's ``auth.revoke``), answering a live
  and an already-dead token as the provider does; none for providers without one.
* ``/api/...``: the provider's API: the credential is read from the provider's header
  (``Authorization: Bearer``, ``X-Auth-Token``, ``X-Shopify-Access-Token``); a revoked or
  unknown token gets the provider's signal (401, or Slack's HTTP 200 ``ok: false``).
* ``/_fake/...`` (loopback only): ``GET requests`` (every request recorded: query, form,
  JSON body, headers, the client authentication used), ``POST kill`` ``{"user": U}`` (the
  provider ends the user's grant: every token dead, as when the user removes the app),
  ``POST end_sessions`` ``{"user": U}`` (the user's access tokens time out, the refresh
  token lives: Salesforce's session timeout), ``POST knobs`` ``{"revoke_answer": [status,
  body]}`` (the next revocation's answer), ``{"expires_in": N}`` (the lifetime of the
  tokens issued from now on, for providers that send one).

The behaviour per provider is the table :data:`QUIRKS`, each row with the source it
reproduces (the URLs of the catalog entries' comments). It is deliberately written apart
from the catalog entries: the tests check that the catalog's dialect meets the provider's
documented behaviour, not that the catalog agrees with itself.

Tokens are ``at_...`` / ``rt_...`` (scrubbed from the request log). All state is in memory.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlencode

from werkzeug.wrappers import Request, Response

from devstack._serve import (
    DevServer,
    QuietRequestHandler,
    configure_logging,
    is_loopback,
    server_tls_context,
    write_ready_file,
)

Shape = Literal["textbook", "slack", "salesforce", "github"]
Rotation = Literal["none", "strict", "lenient"]
Style = Literal["rfc7009", "json", "bearer", "github-grant", "slack", "none"]
Answer = tuple[int, Any]

_TEXTBOOK_DEAD: Answer = (400, {"error": "invalid_grant",
                                "error_description": "refresh token is invalid"})
_BEARER_401: Answer = (401, {"error": "invalid_token"})


@dataclass(frozen=True)
class Quirks:
    """A provider's documented behaviour (see the source beside each row of QUIRKS)."""

    source: str
    expires_in: int | None = 3600  # None: the token response has no expires_in
    refresh: bool = True  # refresh tokens are issued at all
    rotation: Rotation = "none"  # strict: a rotated-out refresh token kills the grant
    # What the code exchange must have carried for a refresh token to be issued:
    # ("authorize" | "scope" | "token", name, value).
    needs: tuple[tuple[str, str, str], ...] = ()
    scope_param: str = "scope"
    scope_separator: str = " "
    shape: Shape = "textbook"
    dead_refresh: Answer = _TEXTBOOK_DEAD
    api_header: tuple[str, str] = ("Authorization", "Bearer ")
    api_revoked: Answer = _BEARER_401
    revocation: Style = "rfc7009"
    revoke_ok: Answer = (200, {})
    revoke_dead: Answer | None = None  # a token already dead (None: like revoke_ok)
    # Extra parameters of the authorization callback (Intuit's realmId).
    callback: tuple[tuple[str, str], ...] = ()
    # Discovery endpoints (path -> JSON answer) a live access token may GET; "{host}" in a
    # string is the request's host[:port], "{ip}" the same port on 127.0.0.1.
    discovery: tuple[tuple[str, Any], ...] = ()


ENTRA = ("https://learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow "
         "(offline_access brings a refresh token; each refresh answers a new one); "
         "https://learn.microsoft.com/entra/identity-platform/reference-error-codes "
         "(interaction_required, invalid_grant AADSTS700082)")

QUIRKS: dict[str, Quirks] = {
    # https://developer.atlassian.com/cloud/oauth/getting-started/refresh-tokens (rotating
    # refresh tokens, offline_access); a dead one: 403 unauthorized_client "refresh_token is
    # invalid" (https://github.com/raycast/extensions/issues/11836)
    # https://developer.atlassian.com/cloud/oauth/getting-started/making-calls-to-api
    # (accessible-resources: the sites the token works for, their cloud id as "id")
    "atlassian": Quirks(
        source="https://developer.atlassian.com/cloud/oauth/getting-started/refresh-tokens",
        rotation="strict", needs=(("scope", "offline_access", ""),
                                  ("authorize", "audience", "api.atlassian.com")),
        dead_refresh=(403, {"error": "unauthorized_client",
                            "error_description": "refresh_token is invalid"}),
        revocation="none",
        discovery=(("/oauth/token/accessible-resources", [
            {"id": "1324a887-45db-1bf4-1e99-ef0ff456d421", "name": "Site name",
             "url": "https://your-domain.atlassian.net",
             "scopes": ["read:jira-work", "read:jira-user"]}]),)),
    # https://developer.box.com/guides/authentication/tokens/refresh/ (single use: a refresh
    # answers a new refresh token); https://developer.box.com/guides/authentication/tokens/revoke/
    "box": Quirks(source="https://developer.box.com/guides/authentication/tokens/refresh/",
                  rotation="strict"),
    # https://dropbox.tech/developers/using-oauth-2-0-with-offline-access (a refresh token
    # only with token_access_type=offline; not rotated); auth.stone token/revoke (bearer,
    # no body, answers null); AuthError invalid_access_token
    "dropbox": Quirks(
        source="https://dropbox.tech/developers/using-oauth-2-0-with-offline-access",
        expires_in=14400, needs=(("authorize", "token_access_type", "offline"),),
        api_revoked=(401, {"error_summary": "invalid_access_token/",
                           "error": {".tag": "invalid_access_token"}}),
        revocation="bearer", revoke_ok=(200, None),
        revoke_dead=(401, {"error_summary": "invalid_access_token/",
                           "error": {".tag": "invalid_access_token"}})),
    # https://docs.github.com/apps/creating-github-apps/authenticating-with-a-github-app/refreshing-user-access-tokens
    # (expires_in 28800, rotating refresh tokens, HTTP 200 {"error":"bad_refresh_token"});
    # https://docs.github.com/rest/apps/oauth-applications#delete-an-app-authorization (204)
    "github-app": Quirks(
        source="https://docs.github.com/apps/creating-github-apps/authenticating-with-a-github-app/refreshing-user-access-tokens",
        expires_in=28800, rotation="strict", shape="github",
        dead_refresh=(200, {"error": "bad_refresh_token",
                            "error_description": "The refresh token passed is incorrect or "
                                                 "expired."}),
        api_revoked=(401, {"message": "Bad credentials"}),
        revocation="github-grant", revoke_ok=(204, None),
        revoke_dead=(404, {"message": "Not Found"})),
    # https://docs.github.com/apps/oauth-apps/building-oauth-apps/authorizing-oauth-apps
    # (OAuth App tokens: no expires_in, no refresh token; scope comma-separated in answers)
    "github": Quirks(
        source="https://docs.github.com/apps/oauth-apps/building-oauth-apps/authorizing-oauth-apps",
        expires_in=None, refresh=False, shape="github",
        api_revoked=(401, {"message": "Bad credentials"}),
        revocation="github-grant", revoke_ok=(204, None),
        revoke_dead=(404, {"message": "Not Found"})),
    # https://developers.google.com/identity/protocols/oauth2/web-server (a refresh token
    # only with access_type=offline; not rotated; invalid_grant); revoke answers 400
    # invalid_token for a token already dead
    "google": Quirks(
        source="https://developers.google.com/identity/protocols/oauth2/web-server",
        expires_in=3599, needs=(("authorize", "access_type", "offline"),),
        dead_refresh=(400, {"error": "invalid_grant",
                            "error_description": "Token has been expired or revoked."}),
        revoke_dead=(400, {"error": "invalid_token",
                           "error_description": "Token expired or revoked"})),
    # https://developers.hubspot.com/docs/api/oauth/tokens (30 minutes); the v1 endpoint's
    # 400 {"status": "BAD_REFRESH_TOKEN"} without "error" (issue 13)
    "hubspot": Quirks(
        source="https://developers.hubspot.com/docs/api/oauth/tokens",
        expires_in=1800,
        dead_refresh=(400, {"status": "BAD_REFRESH_TOKEN",
                            "message": "missing or unknown refresh token",
                            "correlationId": "0d3f1e2a"})),
    # https://docs.imanage.com/ (catalog: refresh tokens when "Allow Refresh Token" is on;
    # no revocation endpoint)
    "imanage": Quirks(source="https://docs.imanage.com/", expires_in=1800,
                      api_header=("X-Auth-Token", ""), revocation="none"),
    # https://learn.microsoft.com/entra/identity-platform/refresh-tokens (one refresh
    # token for every resource); https://learn.microsoft.com/graph/api/site-get (the
    # tenant's root site, webUrl)
    "microsoft-365": Quirks(
        source=ENTRA, expires_in=4567, rotation="lenient",
        needs=(("scope", "offline_access", ""),),
        revocation="none",
        discovery=(("/v1.0/sites/root", {"webUrl": "https://{ip}"}),)),
    "microsoft-graph": Quirks(
        source=ENTRA, expires_in=4567, rotation="lenient",
        needs=(("scope", "offline_access", ""),),
        dead_refresh=(400, {"error": "interaction_required",
                            "error_description": "AADSTS50076: you must use multi-factor "
                                                 "authentication",
                            "error_codes": [50076], "suberror": "basic_action"}),
        revocation="none"),
    "sharepoint": Quirks(
        source=ENTRA, expires_in=4567, rotation="lenient",
        needs=(("scope", "offline_access", ""),),
        dead_refresh=(400, {"error": "invalid_grant",
                            "error_description": "AADSTS700082: The refresh token has "
                                                 "expired due to inactivity.",
                            "error_codes": [700082]}),
        revocation="none"),
    # https://github.com/netdocuments (catalog: refresh token renewed with every use; no
    # revocation endpoint)
    "netdocuments": Quirks(source="https://api.vault.netvoyage.com/v1/OAuth",
                           rotation="lenient", revocation="none"),
    # https://developer.intuit.com/app/developer/qbo/docs/develop/authentication-and-authorization/faq
    # (the refresh token changes periodically: keep the latest); revocation: JSON body
    # {"token": ...} with Basic client auth
    "quickbooks": Quirks(
        source="https://developer.intuit.com/app/developer/qbo/docs/develop/authentication-and-authorization/oauth-2.0",
        rotation="lenient", revocation="json", callback=(("realmId", "123146096291789"),)),
    # https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_web_server_flow.htm
    # (no expires_in: instance_url, issued_at, signature; refresh token only with the
    # refresh_token scope; not rotated; 400 invalid_grant "expired access/refresh token");
    # revoke: 400 invalid_token for a token already dead
    "salesforce": Quirks(
        source="https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_web_server_flow.htm",
        expires_in=None, shape="salesforce", needs=(("scope", "refresh_token", ""),),
        dead_refresh=(400, {"error": "invalid_grant",
                            "error_description": "expired access/refresh token"}),
        api_revoked=(401, [{"message": "Session expired or invalid",
                            "errorCode": "INVALID_SESSION_ID"}]),
        revoke_dead=(400, {"error": "invalid_token",
                           "error_description": "invalid token"})),
    # https://shopify.dev/changelog/offline-access-tokens-now-support-expiry-and-refresh
    # (expiring=1 on the token request; expires_in 3600; the refresh token replaced at every
    # use); X-Shopify-Access-Token; no revocation endpoint
    "shopify": Quirks(
        source="https://shopify.dev/changelog/offline-access-tokens-now-support-expiry-and-refresh",
        rotation="strict", needs=(("token", "expiring", "1"),), scope_separator=",",
        api_header=("X-Shopify-Access-Token", ""),
        api_revoked=(401, {"errors": "[API] Invalid API key or access token (unrecognized "
                                     "login or wrong password)"}),
        revocation="none"),
    # https://api.slack.com/methods/oauth.v2.access (user token under authed_user, the
    # top level a bot token; errors with HTTP 200 ok:false); token rotation:
    # https://docs.slack.dev/authentication/using-token-rotation (43200 s, rotating);
    # https://api.slack.com/web#slack-web-api__evaluating-responses (200 ok:false
    # token_revoked); https://api.slack.com/methods/auth.revoke (ok, revoked)
    "slack": Quirks(
        source="https://api.slack.com/methods/oauth.v2.access",
        expires_in=43200, rotation="strict", scope_param="user_scope",
        scope_separator=",", shape="slack",
        dead_refresh=(200, {"ok": False, "error": "invalid_refresh_token"}),
        api_revoked=(200, {"ok": False, "error": "token_revoked"}),
        revocation="slack", revoke_ok=(200, {"ok": True, "revoked": True}),
        revoke_dead=(200, {"ok": False, "error": "invalid_auth"})),
    # https://developer.xero.com/faq/oauth2 (30 minutes; rotating refresh tokens; 400
    # invalid_grant); revocation: token=<refresh token> with Basic auth
    # https://developer.xero.com/documentation/guides/oauth2/auth-flow (GET /connections:
    # the organisations the user connected, each with its tenantId)
    "xero": Quirks(source="https://developer.xero.com/faq/oauth2", expires_in=1800,
                   rotation="strict", needs=(("scope", "offline_access", ""),),
                   discovery=(("/connections", [
                       {"id": "e1eede29-f875-4a5d-8470-17f6a29a88b1",
                        "tenantId": "70784a63-d24b-46a9-a4db-0e70a274b056",
                        "tenantType": "ORGANISATION", "tenantName": "Demo Company"}]),)),
    # https://developers.zoom.us/docs/integrations/oauth/ (one hour; each refresh a new
    # refresh token, the old one invalid; revoke with Basic auth and token=<access token>)
    "zoom": Quirks(source="https://developers.zoom.us/docs/integrations/oauth/",
                   rotation="strict"),
}


@dataclass(eq=False)
class Family:
    """Everything issued from one consent: ending it kills all its tokens."""

    user: str
    scope: str
    dead: bool = False


@dataclass(eq=False)
class Code:
    user: str
    client_id: str
    redirect_uri: str
    challenge: str
    scope: str
    authorize: dict[str, str]
    used: bool = False


@dataclass
class Provider:
    """One fake provider's state."""

    id: str
    quirks: Quirks
    client_id: str
    client_secret: str
    codes: dict[str, Code] = field(default_factory=dict)
    access: dict[str, Family] = field(default_factory=dict)
    refresh: dict[str, Family] = field(default_factory=dict)
    rotated: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)  # access tokens whose session ended
    requests: list[dict[str, Any]] = field(default_factory=list)
    knobs: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # -- helpers -----------------------------------------------------------------------
    def json(self, answer: Answer, headers: dict[str, str] | None = None) -> Response:
        status, body = answer
        return Response("" if status == 204 else json.dumps(body), status=status,
                        content_type="application/json",
                        headers={"Cache-Control": "no-store", **(headers or {})})

    def client_auth(self, req: Request) -> tuple[str, bool]:
        """(method used, credentials right)."""
        header = req.headers.get("Authorization", "")
        if header.startswith("Basic "):
            raw = base64.b64decode(header[6:]).decode()
            cid, _, secret = raw.partition(":")
            return "client_secret_basic", (unquote(cid) == self.client_id
                                           and unquote(secret) == self.client_secret)
        body = _body(req)
        if "client_secret" in body:
            return "client_secret_post", (body.get("client_id") == self.client_id
                                          and body["client_secret"] == self.client_secret)
        return "none", False

    def issue(self, family: Family, *, with_refresh: bool) -> tuple[str, str | None]:
        at = f"at_{self.id.replace('-', '')}_{secrets.token_urlsafe(12)}"
        self.access[at] = family
        rt = None
        if with_refresh:
            rt = f"rt_{self.id.replace('-', '')}_{secrets.token_urlsafe(12)}"
            self.refresh[rt] = family
        return at, rt

    def token_answer(self, family: Family, at: str, rt: str | None, *,
                     grant: str) -> Answer:
        q = self.quirks
        tokens: dict[str, Any] = {"access_token": at, "token_type": "Bearer",
                                  "scope": family.scope}
        if q.expires_in is not None:
            tokens["expires_in"] = int(self.knobs.get("expires_in", q.expires_in))
        if rt is not None:
            tokens["refresh_token"] = rt
        if q.shape == "github":
            tokens["token_type"] = "bearer"
            tokens["scope"] = family.scope.replace(" ", ",")
            if rt is not None:
                tokens["refresh_token_expires_in"] = 15811200
        elif q.shape == "salesforce":
            tokens.update(signature="c2lnbmF0dXJl", instance_url="https://org.example",
                          id="https://login.example/id/00D/005", issued_at=str(
                              int(time.time() * 1000)))
        elif q.shape == "slack":
            tokens["token_type"] = "user"
            if grant == "refresh_token":
                return 200, {"ok": True, **tokens}
            # The top level is the app's bot token, the same for every user.
            return 200, {"ok": True, "app_id": "A0FAKE", "access_token": "xoxb-shared-bot",
                         "token_type": "bot", "scope": "chat:write", "bot_user_id": "B0FAKE",
                         "team": {"id": "T0FAKE", "name": "Fake"},
                         "authed_user": {"id": f"U-{family.user}", **tokens}}
        return 200, tokens


def _body(req: Request) -> dict[str, Any]:
    if req.mimetype == "application/json":
        data = req.get_json(silent=True)
        return data if isinstance(data, dict) else {}
    return dict(req.form.items())


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class App:
    """The WSGI app of one provider's port."""

    def __init__(self, provider: Provider) -> None:
        self.p = provider

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        req = Request(environ)
        resp = self.route(req)
        return resp(environ, start_response)

    def record(self, req: Request, kind: str, **extra: Any) -> dict[str, Any]:
        rec = {"kind": kind, "method": req.method, "path": req.path,
               "query": dict(req.args.items()), "body": _body(req),
               "headers": {k.lower(): v for k, v in req.headers.items()}, **extra}
        with self.p.lock:
            self.p.requests.append(rec)
        return rec

    def route(self, req: Request) -> Response:
        path = req.path
        if path.startswith("/_fake/"):
            if not is_loopback(req.remote_addr):
                return Response("forbidden", status=403)
            return self.admin(req, path.removeprefix("/_fake/"))
        if path == "/authorize" and req.method == "GET":
            return self.authorize(req)
        if path == "/token" and req.method == "POST":
            return self.token(req)
        if path == "/revoke" or path.startswith("/applications/"):
            return self.revoke(req)
        if path.startswith("/api/"):
            return self.api(req)
        for where, answer in self.p.quirks.discovery:
            if path == where and req.method == "GET":
                return self.discover(req, answer)
        return Response("not found", status=404)

    def discover(self, req: Request, answer: Any) -> Response:
        """A discovery endpoint: its JSON for a live access token, else the API's 401."""
        p = self.p
        if self.presented(req, "discovery") is None:
            return p.json(p.quirks.api_revoked)
        port = req.host.rpartition(":")[2]
        text = json.dumps(answer).replace("{host}", req.host).replace("{ip}",
                                                                      f"127.0.0.1:{port}")
        return p.json((200, json.loads(text)))

    # -- /_fake --------------------------------------------------------------------------
    def admin(self, req: Request, what: str) -> Response:
        p = self.p
        if what == "requests":
            with p.lock:
                return Response(json.dumps(p.requests), content_type="application/json")
        data = req.get_json(silent=True) or {}
        with p.lock:
            if what == "kill":
                for family in {*p.access.values(), *p.refresh.values()}:
                    if family.user == data["user"]:
                        family.dead = True
            elif what == "end_sessions":  # access tokens time out, refresh tokens live
                p.ended |= {t for t, f in p.access.items() if f.user == data["user"]}
            elif what == "knobs":
                p.knobs.update(data)
            else:
                return Response("not found", status=404)
        return Response("{}", content_type="application/json")

    # -- authorize -----------------------------------------------------------------------
    def authorize(self, req: Request) -> Response:
        self.record(req, "authorize")
        a = req.args
        p = self.p
        if (a.get("response_type") != "code" or a.get("client_id") != p.client_id
                or a.get("code_challenge_method") != "S256" or not a.get("code_challenge")
                or not a.get("redirect_uri")):
            return Response("bad authorize request", status=400)
        scopes = [s for s in a.get(p.quirks.scope_param, "").split(p.quirks.scope_separator)
                  if s]
        code = secrets.token_urlsafe(16)
        with p.lock:
            p.codes[code] = Code(a.get("login_hint", "user"), p.client_id, a["redirect_uri"],
                                 a["code_challenge"], " ".join(scopes), dict(a.items()))
        query = urlencode({"code": code, "state": a.get("state", ""),
                           **dict(p.quirks.callback)})
        sep = "&" if "?" in a["redirect_uri"] else "?"
        return Response(status=302, headers={"Location": f"{a['redirect_uri']}{sep}{query}"})

    # -- token ---------------------------------------------------------------------------
    def token(self, req: Request) -> Response:
        p = self.p
        body = _body(req)
        method, good = p.client_auth(req)
        grant = body.get("grant_type")
        with p.lock:
            if grant == "authorization_code":
                user, answer = self._exchange(body, good)
            elif grant == "refresh_token":
                user, answer = self._refresh(body.get("refresh_token", ""), good)
            else:
                user, answer = None, (400, {"error": "unsupported_grant_type"})
        if p.quirks.shape == "salesforce" and answer[0] == 200:
            # The org's own host: this fake serves the org's API too.
            answer = (200, {**answer[1], "instance_url": f"https://{req.host}"})
        self.record(req, "token", grant_type=grant, client_auth=method, user=user,
                    status=answer[0])
        return p.json(answer)

    def _exchange(self, body: dict[str, Any], client_ok: bool) -> tuple[str | None, Answer]:
        p = self.p
        code = p.codes.get(body.get("code", ""))
        if not client_ok:
            return None, (401, {"error": "invalid_client"})
        if (code is None or code.used or code.redirect_uri != body.get("redirect_uri")
                or _challenge(body.get("code_verifier", "")) != code.challenge):
            return None, (400, {"error": "invalid_grant"})
        code.used = True
        family = Family(code.user, code.scope)
        at, rt = p.issue(family, with_refresh=p.quirks.refresh and self._offline(code, body))
        return code.user, p.token_answer(family, at, rt, grant="authorization_code")

    def _offline(self, code: Code, body: dict[str, Any]) -> bool:
        """Whether the provider issues a refresh token for this consent (QUIRKS.needs)."""
        for where, name, value in self.p.quirks.needs:
            if where == "scope" and name not in code.scope.split():
                return False
            if where == "authorize" and code.authorize.get(name) != value:
                return False
            if where == "token" and body.get(name) != value:
                return False
        return True

    def _refresh(self, rt: str, client_ok: bool) -> tuple[str | None, Answer]:
        p = self.p
        q = p.quirks
        family = p.refresh.get(rt)
        user = family.user if family else None
        if not client_ok:
            return user, (401, {"error": "invalid_client"})
        if family is None or family.dead:
            return user, q.dead_refresh
        if rt in p.rotated:
            if q.rotation == "strict":
                family.dead = True  # reuse of a rotated-out refresh token: theft
                return user, q.dead_refresh
        rotate = q.rotation != "none"
        at, new_rt = p.issue(family, with_refresh=rotate)
        if rotate:
            p.rotated.add(rt)
        return user, p.token_answer(family, at, new_rt if rotate else None,
                                    grant="refresh_token")

    # -- revocation ----------------------------------------------------------------------
    def revoke(self, req: Request) -> Response:
        p = self.p
        style = p.quirks.revocation
        body = _body(req)
        method, good = p.client_auth(req)
        self.record(req, "revoke", client_auth=method)
        with p.lock:
            forced = p.knobs.pop("revoke_answer", None)
            if forced is not None:
                return p.json((int(forced[0]), forced[1]))
            if style == "bearer":
                header = req.headers.get("Authorization", "")
                token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else ""
            elif style == "github-grant":
                if req.method != "DELETE" or req.path != f"/applications/{p.client_id}/grant":
                    return p.json((404, {"message": "Not Found"}))
                token = body.get("access_token", "")
            else:
                token = body.get("token", "")
            if style in ("rfc7009", "json", "github-grant") and not good:
                return p.json((401, {"error": "invalid_client"}))
            if style == "none" or req.method not in ("POST", "DELETE"):
                return p.json((404, {"error": "not_found"}))
            family = p.access.get(token) or p.refresh.get(token)
            if family is None or family.dead:
                return p.json(p.quirks.revoke_dead or p.quirks.revoke_ok)
            family.dead = True
            return p.json(p.quirks.revoke_ok)

    # -- the API -------------------------------------------------------------------------
    def presented(self, req: Request, kind: str) -> Family | None:
        """The family of the live access token ``req`` carries in the provider's API
        header (None: none, or dead), the request recorded as ``kind``."""
        p = self.p
        name, prefix = p.quirks.api_header
        value = req.headers.get(name, "")
        token = value.removeprefix(prefix) if value.startswith(prefix) else ""
        with p.lock:
            family = p.access.get(token)
            live = family is not None and not family.dead and token not in p.ended
        self.record(req, kind, live=live)
        return family if live else None

    def api(self, req: Request) -> Response:
        p = self.p
        name, _ = p.quirks.api_header
        family = self.presented(req, "api")
        if family is None:
            return p.json(p.quirks.api_revoked)
        body: dict[str, Any] = {"user": family.user, "path": req.path, "header": name}
        if p.quirks.shape == "slack":
            body["ok"] = True
        return p.json((200, body))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--providers", default=",".join(QUIRKS),
                        help="comma-separated catalog ids (default: all)")
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client-secret-env", required=True)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(args.debug)
    tls = server_tls_context(args.cert, args.key)
    secret = os.environ[args.client_secret_env]
    ports: dict[str, int] = {}
    servers = []
    for pid in args.providers.split(","):
        provider = Provider(pid, QUIRKS[pid], args.client_id, secret)
        server = DevServer(args.host, 0, App(provider), QuietRequestHandler, tls)
        ports[pid] = server.socket.getsockname()[1]
        servers.append(server)
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                         daemon=True).start()
    write_ready_file(args.ready_file, {"ports": ports, "pid": os.getpid(),
                                       "url": f"https://{args.host}"})
    try:
        servers[0].serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
