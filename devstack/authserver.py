"""A real OAuth 2.0 authorization server for demos and integration tests.

Run as a separate process::

    python -m devstack.authserver --host 127.0.0.1 --port 0 --cert C --key K \\
        --clients clients.json --ready-file ready.json [--admin] [--access-ttl 3600]

Built from authlib's server classes: the authorization code grant with PKCE (S256 required),
the refresh token grant with rotation, RFC 7009 revocation and RFC 7662 introspection. What is
specific to this server:

* There is no login page. ``GET /authorize`` takes the user from ``login_hint`` and consents
  automatically, so a browser-less client can just follow the redirect. ``deny=1`` makes the
  "user" refuse (``error=access_denied``).
* Refresh tokens rotate on every use, and presenting an already-rotated refresh token is taken
  as evidence of theft: the whole grant family (every token descended from that authorization)
  is revoked and the request fails with ``invalid_grant`` (RFC 9700 section 4.14.2). Reusing
  an authorization code likewise revokes what was issued from it (RFC 6749 section 4.1.2).
* With ``--admin``, a test control API under ``/_admin/`` (loopback callers only) mints grants
  without the redirect dance, revokes tokens "at the provider", injects faults into ``/token``,
  makes the "user" untick scopes at consent (``/_admin/consent``: a grant narrower than
  asked) and reports counters. See the ``admin_*`` views below.

Access and refresh tokens are opaque random strings prefixed ``at_`` / ``rt_``. All state is in
memory. Token values are never logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx2
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import (
    AuthorizationCodeMixin,
    ClientMixin,
    TokenMixin,
    grants,
)
from authlib.oauth2.rfc6749.errors import InvalidRequestError, OAuth2Error
from authlib.oauth2.rfc6749.util import list_to_scope, scope_to_list
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from flask import Flask, Response, abort, request
from joserfc import jwt
from joserfc.jwk import OctKey

from devstack._serve import (
    add_server_args,
    client_tls_context,
    clock,
    configure_logging,
    is_loopback,
    serve,
)

log = logging.getLogger("devstack.authserver")

# RFC 6749 section 4.1.2 recommends at most ten minutes.
CODE_TTL = 600.0
DEFAULT_ACCESS_TTL = 3600
CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


# --------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class Client(ClientMixin):  # type: ignore[misc]
    """A registered client. ``kind`` is ``client`` (may run the code and refresh grants) or
    ``resource_server`` (may only introspect)."""

    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...] = ()
    scope: str = ""
    kind: str = "client"
    public: bool = False  # registered by RFC 7591 with token_endpoint_auth_method "none"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Client:
        kind = data.get("kind", "client")
        if kind not in ("client", "resource_server"):
            raise ValueError(f"client {data.get('client_id')!r}: unknown kind {kind!r}")
        scope = data.get("scope", "")
        if isinstance(scope, list):
            scope = list_to_scope(scope)
        return cls(
            client_id=data["client_id"],
            client_secret=data["client_secret"],
            redirect_uris=tuple(data.get("redirect_uris", ())),
            scope=scope or "",
            kind=kind,
        )

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        # RFC 6749 section 3.1.2.3: with several registered URIs the request must name one.
        return self.redirect_uris[0] if len(self.redirect_uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str | None:
        allowed = scope_to_list(self.scope) or []
        if not scope:
            return self.scope  # RFC 6749 section 3.3: omitted scope means the default
        requested = scope_to_list(scope)
        # Refuse rather than silently trim: a test asking for a scope it was not registered
        # for should see invalid_scope.
        if allowed and not set(requested) <= set(allowed):
            return None
        return str(list_to_scope(requested))

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        # Exact match (RFC 9700 section 4.1.3), except that a registered loopback IP
        # redirect matches any port (RFC 8252 section 7.3: native apps pick a free port).
        if redirect_uri in self.redirect_uris:
            return True
        parsed = urlsplit(redirect_uri)
        if parsed.scheme != "http" or parsed.hostname not in ("127.0.0.1", "::1"):
            return False
        portless = urlunsplit((parsed.scheme, parsed.hostname, parsed.path, parsed.query, ""))
        return portless in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return not self.public and secrets.compare_digest(self.client_secret.encode(),
                                                          client_secret.encode())

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.public:
            return method == "none"
        return method in CLIENT_AUTH_METHODS

    def check_response_type(self, response_type: str) -> bool:
        return self.kind == "client" and response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return self.kind == "client" and grant_type in ("authorization_code", "refresh_token")


@dataclass(eq=False)
class Family:
    """Everything issued from one user authorization: revoking it kills all its tokens."""

    id: str
    user: str
    client_id: str
    revoked: bool = False
    resource: str | None = None  # RFC 8707: the audience of every token of the family


@dataclass(eq=False)
class AuthCode(AuthorizationCodeMixin):  # type: ignore[misc]
    code: str
    client_id: str
    redirect_uri: str | None
    scope: str
    user: str
    code_challenge: str
    code_challenge_method: str
    family: Family
    expires_at: float
    used: bool = False

    def get_redirect_uri(self) -> str | None:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass(eq=False)
class IssuedToken(TokenMixin):  # type: ignore[misc]
    """One access token or one refresh token."""

    value: str
    kind: str  # "access_token" | "refresh_token"
    family: Family
    client_id: str
    scope: str
    issued_at: float
    expires_at: float | None  # refresh tokens do not expire
    revoked: bool = False
    rotated: bool = False  # refresh token already exchanged for a new one

    @property
    def user(self) -> str:
        return self.family.user

    def check_client(self, client: Client) -> bool:
        return self.client_id == client.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return 0 if self.expires_at is None else int(self.expires_at - self.issued_at)

    def is_expired(self) -> bool:
        return self.expires_at is not None and clock() >= self.expires_at

    def is_revoked(self) -> bool:
        return self.revoked or self.rotated or self.family.revoked

    def get_user(self) -> str:
        return self.family.user


@dataclass
class Faults:
    token_status: int | None = None
    token_count: int = 0  # < 0: every call until reset
    token_error: str = "temporarily_unavailable"
    token_delay: float = 0.0
    revoke_status: int | None = None  # /revoke answers this (e.g. 503) while revoke_count
    revoke_count: int = 0  # < 0: every call until reset

    def as_json(self) -> dict[str, Any]:
        return {
            "revoke_status": self.revoke_status,
            "revoke_count": self.revoke_count,
            "token_status": self.token_status,
            "token_count": self.token_count,
            "token_error": self.token_error,
            "token_delay": self.token_delay,
        }


@dataclass
class Stats:
    token_calls: int = 0
    refresh_calls: int = 0
    code_calls: int = 0
    authorize_calls: int = 0
    revocations: int = 0
    introspections: int = 0
    refresh_by_user: Counter[str] = field(default_factory=Counter)
    registrations: list[dict[str, Any]] = field(default_factory=list)  # RFC 7591 requests
    metadata_documents: list[str] = field(default_factory=list)  # client documents fetched

    def as_json(self) -> dict[str, Any]:
        return {
            "registrations": list(self.registrations),
            "metadata_documents": list(self.metadata_documents),
            "token_calls": self.token_calls,
            "refresh_calls": self.refresh_calls,
            "refresh_by_user": dict(self.refresh_by_user),
            "code_calls": self.code_calls,
            "authorize_calls": self.authorize_calls,
            "revocations": self.revocations,
            "introspections": self.introspections,
        }


class Store:
    """All server state. One re-entrant lock serialises every mutation: the work under it is
    a few dict operations, and serialising whole /token exchanges is what makes "the same
    refresh token presented twice at the same moment" deterministic (one wins, the other is a
    reuse)."""

    def __init__(self, clients: list[Client], access_ttl: int, *,
                 metadata_documents: bool = False, ca_file: str | None = None,
                 public_registration: bool = True) -> None:
        self.metadata_documents = metadata_documents  # accept https client_id documents
        # False: RFC 7591 registrations are confidential only ("none" not offered).
        self.public_registration = public_registration
        self.ca_file = ca_file  # to verify them
        self.lock = threading.RLock()
        self.clients = {c.client_id: c for c in clients}
        self.access_ttl = access_ttl
        self.codes: dict[str, AuthCode] = {}
        self.access: dict[str, IssuedToken] = {}
        self.refresh: dict[str, IssuedToken] = {}
        self.families: dict[str, Family] = {}
        self.issued_access: list[str] = []
        self.issued_refresh: list[str] = []
        self.stats = Stats()
        self.faults = Faults()
        # Scopes the "user" unticks at consent (/_admin/consent): the code, and the tokens
        # it is exchanged for, carry a narrower scope than the client asked for (RFC 6749
        # section 3.3 lets the server grant less; the token response says which).
        self.consent_drop: set[str] = set()
        # Claims of an ID token added to code exchanges (/_admin/consent "id_token"); None:
        # no ID token (the client asks for no openid scope here).
        self.id_token_claims: dict[str, Any] | None = None

    def query_client(self, client_id: str) -> Client | None:
        known = self.clients.get(client_id)
        if known is None and self.metadata_documents and client_id.startswith("https://"):
            known = self._client_from_document(client_id)
        return known

    def _client_from_document(self, url: str) -> Client | None:
        """A Client ID Metadata Document client (MCP authorization): the client_id is an
        https URL whose JSON names itself as ``client_id`` and lists its redirect URIs."""
        try:
            with httpx2.Client(verify=client_tls_context(self.ca_file), timeout=10,
                               trust_env=False) as http:
                resp = http.get(url, headers={"Accept": "application/json"})
            doc = resp.json() if resp.status_code == 200 else None
        except (httpx2.HTTPError, ValueError) as exc:
            log.warning("client metadata document %s unreadable: %s", url, type(exc).__name__)
            return None
        with self.lock:
            self.stats.metadata_documents.append(url)
        if not isinstance(doc, dict) or doc.get("client_id") != url:
            return None
        uris = doc.get("redirect_uris")
        if not isinstance(uris, list) or not all(isinstance(u, str) for u in uris):
            return None
        scope = " ".join(sorted({s for c in self.clients.values() for s in c.scope.split()}
                                | {"offline_access"}))
        client = Client(client_id=url, client_secret="", redirect_uris=tuple(uris),
                        scope=scope, public=True)
        with self.lock:
            self.clients[url] = client
        return client

    def new_family(self, user: str, client_id: str) -> Family:
        with self.lock:
            fam = Family(id=secrets.token_hex(8), user=user, client_id=client_id)
            self.families[fam.id] = fam
            return fam

    def record(self, token: dict[str, Any], family: Family, client_id: str) -> None:
        """Store the tokens of a token response that is about to be sent."""
        now = clock()
        scope = token.get("scope", "")
        with self.lock:
            at = token["access_token"]
            self.access[at] = IssuedToken(
                value=at,
                kind="access_token",
                family=family,
                client_id=client_id,
                scope=scope,
                issued_at=now,
                expires_at=now + token["expires_in"],
            )
            self.issued_access.append(at)
            rt = token.get("refresh_token")
            if rt:
                self.refresh[rt] = IssuedToken(
                    value=rt,
                    kind="refresh_token",
                    family=family,
                    client_id=client_id,
                    scope=scope,
                    issued_at=now,
                    expires_at=None,
                )
                self.issued_refresh.append(rt)

    def revoke_family(self, family: Family, why: str) -> None:
        with self.lock:
            if not family.revoked:
                family.revoked = True
                log.info(
                    "revoked grant family %s (user=%s client=%s): %s",
                    family.id,
                    family.user,
                    family.client_id,
                    why,
                )

    def find_token(self, value: str, hint: str | None) -> IssuedToken | None:
        # RFC 7009/7662: a wrong hint must not make the lookup fail, only order it.
        stores = [self.refresh, self.access] if hint == "refresh_token" else [
            self.access,
            self.refresh,
        ]
        with self.lock:
            for s in stores:
                if value in s:
                    return s[value]
        return None


def new_token_values(ttl: int, scope: str | None, include_refresh: bool) -> dict[str, Any]:
    token: dict[str, Any] = {
        "token_type": "Bearer",
        "access_token": "at_" + secrets.token_urlsafe(32),
        "expires_in": ttl,
    }
    if include_refresh:
        token["refresh_token"] = "rt_" + secrets.token_urlsafe(32)
    if scope:
        token["scope"] = scope
    return token


# --------------------------------------------------------------------------------------------
# Grants and endpoints (authlib subclasses; they reach the store through server.store)


class S256CodeChallenge(CodeChallenge):  # type: ignore[misc]
    """PKCE that is mandatory for every client and accepts only S256 (RFC 9700 section 2.1.1).

    authlib's CodeChallenge lets a request without ``code_challenge`` through (it only insists
    for public clients) and accepts ``plain``; both are refused here at the authorization
    endpoint, where the error can be redirected back to the client.
    """

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]
    DEFAULT_CODE_CHALLENGE_METHOD = "S256"

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: missing 'code_challenge'")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("'code_challenge_method' must be S256")
        super().validate_code_challenge(grant, redirect_uri)


class AuthorizationCodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = [*CLIENT_AUTH_METHODS, "none"]

    def save_authorization_code(self, code: str, req: Any) -> None:
        store: Store = self.server.store
        data = req.payload.data
        family = store.new_family(req.user, req.client.client_id)
        family.resource = request.args.get("resource") or None
        with store.lock:
            scope = " ".join(s for s in (req.scope or "").split()
                             if s not in store.consent_drop)
            store.codes[code] = AuthCode(
                code=code,
                client_id=req.client.client_id,
                redirect_uri=req.payload.redirect_uri,
                scope=scope,
                user=req.user,
                code_challenge=data["code_challenge"],
                code_challenge_method=data["code_challenge_method"],
                family=family,
                expires_at=clock() + CODE_TTL,
            )

    def query_authorization_code(self, code: str, client: Client) -> AuthCode | None:
        store: Store = self.server.store
        with store.lock:
            rec = store.codes.get(code)
            if rec is None or rec.client_id != client.client_id:
                return None
            if rec.used:
                store.revoke_family(rec.family, "authorization code reused")
                return None
            if clock() >= rec.expires_at or rec.family.revoked:
                return None
            return rec

    def delete_authorization_code(self, authorization_code: AuthCode) -> None:
        # Keep the record, marked used, so a second redemption is recognised as reuse.
        authorization_code.used = True

    def authenticate_user(self, authorization_code: AuthCode) -> str:
        return authorization_code.user


class RefreshTokenGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = [*CLIENT_AUTH_METHODS, "none"]
    INCLUDE_NEW_REFRESH_TOKEN = True  # rotate on every use

    def authenticate_refresh_token(self, refresh_token: str) -> IssuedToken | None:
        store: Store = self.server.store
        with store.lock:
            tok = store.refresh.get(refresh_token)
            if tok is None:
                return None
            if tok.rotated:
                # RFC 9700 section 4.14.2: a rotated refresh token coming back means two
                # parties hold it. Revoke everything descended from the authorization.
                store.revoke_family(tok.family, "rotated refresh token reused")
                return None
            if tok.is_revoked():
                return None
            return tok

    def authenticate_user(self, refresh_token: IssuedToken) -> str:
        return refresh_token.user

    def revoke_old_credential(self, refresh_token: IssuedToken) -> None:
        refresh_token.rotated = True


class Revocation(RevocationEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = [*CLIENT_AUTH_METHODS, "none"]

    def query_token(self, token_string: str, token_type_hint: str | None) -> IssuedToken | None:
        store: Store = self.server.store
        with store.lock:
            store.stats.revocations += 1
        return store.find_token(token_string, token_type_hint)

    def revoke_token(self, token: IssuedToken, request: Any) -> None:
        store: Store = self.server.store
        with store.lock:
            if token.kind == "refresh_token":
                # RFC 7009 section 2.1: revoking a refresh token SHOULD also invalidate the
                # access tokens of the same grant.
                store.revoke_family(token.family, "refresh token revoked by client")
            else:
                token.revoked = True


class Introspection(IntrospectionEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = CLIENT_AUTH_METHODS

    def query_token(self, token_string: str, token_type_hint: str | None) -> IssuedToken | None:
        store: Store = self.server.store
        with store.lock:
            store.stats.introspections += 1
        return store.find_token(token_string, token_type_hint)

    def check_permission(self, token: IssuedToken, client: Client, request: Any) -> bool:
        return client.kind == "resource_server"

    def introspect_token(self, token: IssuedToken) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "active": True,
            "sub": token.user,
            "username": token.user,
            "scope": token.scope,
            "client_id": token.client_id,
            "token_type": "Bearer" if token.kind == "access_token" else "refresh_token",
            "iat": int(token.issued_at),
        }
        if token.expires_at is not None:
            payload["exp"] = int(token.expires_at)
        if token.family.resource is not None:
            payload["aud"] = token.family.resource  # RFC 8707 section 2 / RFC 7662 aud
        return payload


class Server(AuthorizationServer):  # type: ignore[misc]
    """authlib's Flask authorization server, with our store and token format."""

    def __init__(self, app: Flask, store: Store) -> None:
        self.store = store
        super().__init__(app, query_client=store.query_client, save_token=self._save_token)
        # Replace the default generator: ours makes prefixed opaque tokens with our TTL.
        self.register_token_generator("default", self._generate)

    def _generate(
        self,
        grant_type: str,
        client: Client,
        user: Any = None,
        scope: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        ttl = self.store.access_ttl if expires_in is None else expires_in
        return new_token_values(ttl, scope, include_refresh_token)

    def _save_token(self, token: dict[str, Any], req: Any) -> None:
        if req.refresh_token is not None:
            family = req.refresh_token.family
        else:
            family = req.authorization_code.family
        self.store.record(token, family, req.client.client_id)
        if req.refresh_token is None and self.store.id_token_claims is not None:
            # An OpenID Connect ID token (Core section 3.1.3.3) naming the user, signed
            # with a key of this process (the relying party reads it from the TLS answer).
            claims = {"iss": "devstack", "aud": req.client.client_id, "sub": family.user,
                      "iat": int(clock()), "exp": int(clock()) + 300,
                      **self.store.id_token_claims}
            token["id_token"] = jwt.encode({"alg": "HS256"}, claims, _ID_TOKEN_KEY)
        log.info(
            "issued tokens user=%s client=%s grant=%s family=%s",
            family.user,
            req.client.client_id,
            req.payload.grant_type,
            family.id,
        )


_ID_TOKEN_KEY = OctKey.generate_key(256)

# --------------------------------------------------------------------------------------------
# The Flask application


def create_app(clients: list[Client], *, access_ttl: int = DEFAULT_ACCESS_TTL, admin: bool = False,
               metadata_documents: bool = False, ca_file: str | None = None,
               public_registration: bool = True) -> Flask:
    app = Flask("devstack.authserver")
    store = Store(clients, access_ttl, metadata_documents=metadata_documents, ca_file=ca_file,
                  public_registration=public_registration)
    server = Server(app, store)
    server.register_grant(AuthorizationCodeGrant, [S256CodeChallenge(required=True)])
    server.register_grant(RefreshTokenGrant)
    server.register_endpoint(Revocation)
    server.register_endpoint(Introspection)
    app.extensions["devstack.store"] = store

    @app.get("/healthz")
    def healthz() -> Any:
        return {"ok": True}

    @app.get("/.well-known/oauth-authorization-server")
    def metadata() -> Any:
        # RFC 8414 metadata, so clients can be configured from the issuer URL alone.
        base = request.host_url.rstrip("/")
        return {
            "issuer": base,
            "authorization_endpoint": f"{base}/authorize",
            "token_endpoint": f"{base}/token",
            "revocation_endpoint": f"{base}/revoke",
            "introspection_endpoint": f"{base}/introspect",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": [
                *CLIENT_AUTH_METHODS, *(["none"] if store.public_registration else [])],
            # RFC 7591 dynamic registration; RFC 9207 iss in every authorization response.
            "registration_endpoint": f"{base}/register",
            "authorization_response_iss_parameter_supported": True,
            "client_id_metadata_document_supported": store.metadata_documents,
            "scopes_supported": sorted({s for c in store.clients.values()
                                        for s in c.scope.split()} | {"offline_access"}),
        }

    @app.post("/register")
    def register() -> Any:
        # RFC 7591 section 3: client metadata in, a client_id (and for a confidential
        # client a secret) out; 400 invalid_client_metadata / invalid_redirect_uri.
        meta = request.get_json(silent=True)
        if not isinstance(meta, dict):
            return _registration_error("invalid_client_metadata", "not a JSON object")
        uris = meta.get("redirect_uris")
        if not isinstance(uris, list) or not uris or not all(
                isinstance(u, str) and u.startswith(("https://", "http://")) for u in uris):
            return _registration_error("invalid_redirect_uri", "redirect_uris required")
        method = meta.get("token_endpoint_auth_method", "client_secret_basic")
        if method not in [*CLIENT_AUTH_METHODS,
                          *(["none"] if store.public_registration else [])]:
            return _registration_error("invalid_client_metadata",
                                       f"unsupported token_endpoint_auth_method {method}")
        scope = " ".join(sorted({s for c in store.clients.values() for s in c.scope.split()}
                                | {"offline_access"}))
        client = Client(client_id=f"dcr_{secrets.token_hex(8)}",
                        client_secret="" if method == "none" else secrets.token_urlsafe(24),
                        redirect_uris=tuple(uris), scope=scope, public=method == "none")
        with store.lock:
            store.clients[client.client_id] = client
            store.stats.registrations.append(meta)
        answer: dict[str, Any] = {**meta, "client_id": client.client_id,
                                  "client_id_issued_at": int(clock()),
                                  "token_endpoint_auth_method": method}
        if not client.public:
            answer["client_secret"] = client.client_secret
            answer["client_secret_expires_at"] = 0
        return Response(json.dumps(answer), status=201, content_type="application/json",
                        headers=NO_STORE)

    @app.get("/authorize")
    def authorize() -> Any:
        with store.lock:
            store.stats.authorize_calls += 1
        user = request.args.get("login_hint") or None
        try:
            grant = server.get_consent_grant(end_user=user)
        except OAuth2Error as error:
            # Redirects when the client and redirect_uri check out, otherwise a 400 (4.1.2.1).
            return server.handle_error_response(request, error)
        if request.args.get("deny") == "1":
            return _with_iss(server.create_authorization_response(grant=grant,
                                                                  grant_user=None))
        if not user:
            missing = InvalidRequestError(
                "Missing 'login_hint' (this test server has no login page)",
                redirect_uri=grant.redirect_uri,
                state=request.args.get("state"),
            )
            return server.handle_error_response(request, missing)
        return _with_iss(server.create_authorization_response(grant=grant, grant_user=user))

    @app.post("/token")
    def token() -> Any:
        grant_type = request.form.get("grant_type")
        with store.lock:
            stats = store.stats
            stats.token_calls += 1
            if grant_type == "refresh_token":
                stats.refresh_calls += 1
                rec = store.refresh.get(request.form.get("refresh_token", ""))
                stats.refresh_by_user[rec.user if rec else "<unknown>"] += 1
            elif grant_type == "authorization_code":
                stats.code_calls += 1
            faults = store.faults
            delay = faults.token_delay
            status: int | None = None
            if faults.token_status is not None and faults.token_count != 0:
                status = faults.token_status
                if faults.token_count > 0:
                    faults.token_count -= 1
            error = faults.token_error
        if delay > 0:
            time.sleep(delay)  # outside the lock: delayed calls must overlap
        if status is not None:
            return Response(
                json.dumps({"error": error}),
                status=status,
                content_type="application/json",
                headers=NO_STORE,
            )
        # Validation and issuance under one lock: see Store.
        with store.lock:
            # RFC 8707 section 2.2: a token request naming another resource than the
            # authorization did is refused (invalid_target).
            form = request.form
            rec: Any = (store.codes.get(form.get("code", "")) if grant_type ==
                        "authorization_code" else store.refresh.get(
                            form.get("refresh_token", "")))
            bound = rec.family.resource if rec is not None else None
            if bound is not None and form.get("resource") != bound:
                return Response(json.dumps({"error": "invalid_target"}), status=400,
                                content_type="application/json", headers=NO_STORE)
            return server.create_token_response()

    @app.post("/revoke")
    def revoke() -> Any:
        with store.lock:
            f = store.faults
            status: int | None = None
            if f.revoke_status is not None and f.revoke_count != 0:
                status = f.revoke_status
                if f.revoke_count > 0:
                    f.revoke_count -= 1
        if status is not None:
            return Response(json.dumps({"error": "temporarily_unavailable"}), status=status,
                            content_type="application/json", headers={"Retry-After": "0"})
        return server.create_endpoint_response(Revocation.ENDPOINT_NAME)

    @app.post("/introspect")
    def introspect() -> Any:
        return server.create_endpoint_response(Introspection.ENDPOINT_NAME)

    if admin:
        _add_admin(app, store)
    return app


def _registration_error(code: str, why: str) -> Response:
    return Response(json.dumps({"error": code, "error_description": why}), status=400,
                    content_type="application/json", headers=NO_STORE)


def _with_iss(response: Any) -> Any:
    """RFC 9207 section 2: the authorization response (success or error) names the issuer
    in ``iss``, so a client can tell which server answered (mix-up defence)."""
    location = getattr(response, "headers", {}).get("Location")
    if location and response.status_code in (302, 303):
        sep = "&" if "?" in location else "?"
        iss = request.host_url.rstrip("/")
        response.headers["Location"] = f"{location}{sep}{urlencode({'iss': iss})}"
    return response


def _add_admin(app: Flask, store: Store) -> None:
    """The test control API. Loopback only, no authentication: never enable it elsewhere."""

    @app.before_request
    def _loopback_only() -> None:
        if request.path.startswith("/_admin/") and not is_loopback(request.remote_addr):
            abort(403)

    def body() -> dict[str, Any]:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            abort(Response('{"error": "expected a JSON object"}', 400,
                           content_type="application/json"))
        return data

    def bad(message: str, status: int = 400) -> Response:
        return Response(json.dumps({"error": message}), status, content_type="application/json")

    @app.post("/_admin/grants")
    def admin_grants() -> Any:
        """Mint a grant as if ``user`` had consented; returns a token response."""
        data = body()
        user, client_id = data.get("user"), data.get("client_id")
        client = store.query_client(client_id) if isinstance(client_id, str) else None
        if not isinstance(user, str) or not user:
            return bad("'user' is required")
        if client is None or client.kind != "client":
            return bad("unknown 'client_id'")
        scope = client.get_allowed_scope(data.get("scope"))
        if scope is None:
            return bad("invalid_scope")
        expires_in = data.get("access_expires_in")
        if expires_in is None:
            expires_in = store.access_ttl
        if not isinstance(expires_in, int | float):
            return bad("'access_expires_in' must be a number")
        family = store.new_family(user, client.client_id)
        token = new_token_values(int(expires_in), scope, include_refresh=True)
        store.record(token, family, client.client_id)
        if data.get("absolute_expiry"):
            # Also the expiry as a time on this server's clock, as some providers send it
            # (and as a record imported by a host whose clock agrees with the provider's
            # carries it): a proxy whose clock is behind then believes the token lives
            # longer than the provider does.
            token["expires_at"] = int(store.access[token["access_token"]].expires_at or 0)
        log.info("admin: minted grant user=%s client=%s family=%s", user, client_id, family.id)
        return Response(json.dumps(token), 200, content_type="application/json", headers=NO_STORE)

    @app.post("/_admin/revoke")
    def admin_revoke() -> Any:
        """Revoke at the provider: all grants of ``user``, or one ``access_token`` /
        ``refresh_token`` (a refresh token takes its whole grant family with it)."""
        data = body()
        n = 0
        with store.lock:
            if isinstance(data.get("user"), str):
                for fam in store.families.values():
                    if fam.user == data["user"] and not fam.revoked:
                        store.revoke_family(fam, "admin revoke of user")
                        n += 1
            elif isinstance(data.get("access_token"), str):
                tok = store.access.get(data["access_token"])
                if tok is not None and not tok.revoked:
                    tok.revoked = True
                    n = 1
            elif isinstance(data.get("refresh_token"), str):
                tok = store.refresh.get(data["refresh_token"])
                if tok is not None and not tok.family.revoked:
                    store.revoke_family(tok.family, "admin revoke of refresh token")
                    n = 1
            else:
                return bad("give 'user', 'access_token' or 'refresh_token'")
        return {"revoked": n}

    @app.post("/_admin/faults")
    def admin_faults() -> Any:
        """Set /token faults. Only the keys present change; see Faults."""
        data = body()
        with store.lock:
            f = store.faults
            if "token_status" in data:
                f.token_status = None if data["token_status"] is None else int(
                    data["token_status"]
                )
                # A status without a count means "the next call".
                f.token_count = int(data.get("token_count", 1))
            elif "token_count" in data:
                f.token_count = int(data["token_count"])
            if "token_error" in data:
                f.token_error = str(data["token_error"])
            if "token_delay" in data:
                f.token_delay = float(data["token_delay"] or 0.0)
            if "revoke_status" in data:
                f.revoke_status = (None if data["revoke_status"] is None
                                   else int(data["revoke_status"]))
                f.revoke_count = int(data.get("revoke_count", 1))
            return f.as_json()

    @app.post("/_admin/consent")
    def admin_consent() -> Any:
        """``{"drop": [scope, ...], "id_token": {claims} | null}``: the scopes the user
        unticks at consent from now on (until ``/_admin/reset``): the grant is narrower
        than asked; and the claims of an ID token the code exchange then returns."""
        data = body()
        drop = data.get("drop", [])
        if not isinstance(drop, list) or not all(isinstance(x, str) for x in drop):
            return bad("'drop' must be a list of scopes")
        claims = data.get("id_token")
        if claims is not None and not isinstance(claims, dict):
            return bad("'id_token' must be an object of claims")
        with store.lock:
            store.consent_drop = set(drop)
            store.id_token_claims = claims
        return {"drop": sorted(drop), "id_token": claims}

    @app.get("/_admin/stats")
    def admin_stats() -> Any:
        with store.lock:
            return store.stats.as_json()

    @app.post("/_admin/reset")
    def admin_reset() -> Any:
        """Reset counters and faults; grants and tokens stay."""
        with store.lock:
            store.stats = Stats()
            store.faults = Faults()
            store.consent_drop = set()
            store.id_token_claims = None
        return {"ok": True}

    @app.get("/_admin/issued")
    def admin_issued() -> Any:
        with store.lock:
            return {
                "access_tokens": list(store.issued_access),
                "refresh_tokens": list(store.issued_refresh),
            }


def load_clients(path: str | os.PathLike[str]) -> list[Client]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise SystemExit(f"{path}: expected a JSON list of clients")
    return [Client.from_json(c) for c in data]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devstack.authserver", description=__doc__
                                     .split("\n")[0])
    add_server_args(parser)
    parser.add_argument("--clients", required=True, help="JSON list of registered clients")
    parser.add_argument("--access-ttl", type=int, default=DEFAULT_ACCESS_TTL,
                        help="access token lifetime in seconds (default 3600)")
    parser.add_argument("--admin", action="store_true", help="enable the /_admin/ test API")
    parser.add_argument("--client-metadata-documents", action="store_true",
                        help="accept https client_ids (Client ID Metadata Documents)")
    parser.add_argument("--ca-file", help="CA bundle to verify client metadata documents")
    parser.add_argument("--confidential-registration", action="store_true",
                        help="RFC 7591 registrations get a client secret (no public clients)")
    args = parser.parse_args(argv)
    configure_logging(args.debug)
    if not args.cert:
        # authlib refuses non-https request URIs except on loopback; a plain-HTTP dev server
        # on another interface is still a dev server.
        os.environ.setdefault("AUTHLIB_INSECURE_TRANSPORT", "1")
    app = create_app(load_clients(args.clients), access_ttl=args.access_ttl, admin=args.admin,
                     metadata_documents=args.client_metadata_documents, ca_file=args.ca_file,
                     public_registration=not args.confidential_registration)
    serve(app, args, "authserver")


if __name__ == "__main__":
    main()
