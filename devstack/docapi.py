"""A TLS "document API": the resource server behind the proxy in demos and tests.

Run as a separate process::

    python -m devstack.docapi --host 127.0.0.1 --port 0 --cert C --key K \\
        --introspect-url https://127.0.0.1:PORT/introspect --client-id docapi \\
        --client-secret-env DOCAPI_SECRET --ca-file ca.pem --permissions perms.json \\
        --ready-file ready.json

Endpoints:

* ``GET /documents``: bearer-protected. The token is checked by RFC 7662 introspection at the
  authorization server; the answer lists the documents the permissions file grants to the
  token's ``sub``. Problems answer 401 with an RFC 6750 ``WWW-Authenticate`` header.
* ``ANY /echo`` and ``/echo/<path>``: unauthenticated mirror of the request exactly as it
  arrived (headers in order, duplicates kept, body length and SHA-256), so tests can assert
  precisely what left the proxy.
* ``GET /large?bytes=N``: N bytes streamed in chunks, with Content-Length (content: the byte
  sequence 0,1,...,255 repeated; see :func:`large_body_sha256`).
* ``POST|PUT /upload``: consumes the body in chunks, answers ``{"bytes", "sha256"}``.
* ``GET /status/<code>``: answers with that status (401 carries ``WWW-Authenticate``).

Token values are never logged; the introspection cache is keyed by the token's SHA-256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx2
from flask import Flask, Response, request

from devstack._serve import add_server_args, client_tls_context, clock, configure_logging, serve

log = logging.getLogger("devstack.docapi")

CHUNK = 64 * 1024
_PATTERN = bytes(range(256)) * (CHUNK // 256)
MAX_LARGE = 1 << 40
INVALID_TOKEN = 'Bearer error="invalid_token"'
# RFC 6750 section 3.1: a request without credentials gets a challenge but no error code.
NO_TOKEN = 'Bearer realm="docapi"'


def large_body(n: int) -> Iterator[bytes]:
    """The body of ``GET /large?bytes=n``: bytes 0..255 repeated, in 64 KiB chunks."""
    remaining = n
    while remaining > 0:
        chunk = _PATTERN[: min(CHUNK, remaining)]
        remaining -= len(chunk)
        yield chunk


def large_body_sha256(n: int) -> str:
    """SHA-256 of ``GET /large?bytes=n`` for tests that check integrity end to end."""
    h = hashlib.sha256()
    for chunk in large_body(n):
        h.update(chunk)
    return h.hexdigest()


class IntrospectionError(Exception):
    """The authorization server could not be asked (down, TLS failure, non-200)."""


class Introspector:
    """RFC 7662 client with a short cache.

    The cache (``ttl`` seconds, 0 disables it) keeps a thousand concurrent requests with the
    same token from becoming a thousand introspection calls; it is short so that revocation at
    the authorization server is seen within ``ttl``. Concurrent misses for the same token wait
    for one call instead of all calling (striped locks keyed by the token hash).
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        client_secret: str,
        ca_file: str | None,
        ttl: float,
    ) -> None:
        self.url = url
        self.ttl = ttl
        self._http = httpx2.Client(
            verify=client_tls_context(ca_file),
            auth=httpx2.BasicAuth(client_id, client_secret),
            timeout=httpx2.Timeout(10.0, pool=60.0),
            limits=httpx2.Limits(max_connections=64, max_keepalive_connections=64),
        )
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._cache_lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(64)]

    def _cached(self, key: str) -> dict[str, Any] | None:
        with self._cache_lock:
            hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        return None

    def introspect(self, token: str) -> dict[str, Any]:
        key = hashlib.sha256(token.encode()).hexdigest()
        if self.ttl > 0 and (hit := self._cached(key)) is not None:
            return hit
        with self._stripes[int(key[:8], 16) % len(self._stripes)]:
            if self.ttl > 0 and (hit := self._cached(key)) is not None:
                return hit
            try:
                resp = self._http.post(
                    self.url, data={"token": token, "token_type_hint": "access_token"}
                )
            except httpx2.HTTPError as exc:
                raise IntrospectionError(f"{type(exc).__name__}: {exc}") from None
            if resp.status_code != 200:
                raise IntrospectionError(f"introspection answered {resp.status_code}")
            result = resp.json()
            if not isinstance(result, dict):
                raise IntrospectionError("introspection answer is not an object")
            if self.ttl > 0:
                now = time.monotonic()
                with self._cache_lock:
                    if len(self._cache) > 10_000:  # drop stale entries now and then
                        self._cache = {
                            k: v for k, v in self._cache.items() if now - v[0] < self.ttl
                        }
                    self._cache[key] = (now, result)
            return result


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data), status, headers=headers, content_type="application/json")


def create_app(
    introspector: Introspector,
    permissions: dict[str, Any],
    *,
    required_scope: str | None = None,
    resource: str | None = None,
    authorization_server: str | None = None,
) -> Flask:
    """``resource``: this API as an OAuth protected resource (an MCP server's canonical URI):
    it publishes RFC 9728 metadata naming ``authorization_server``, names it in its 401
    challenges, and accepts only tokens whose introspected ``aud`` is ``resource`` (RFC 8707
    section 2)."""
    app = Flask("devstack.docapi")
    meta_url = None
    if resource is not None:
        path = urlsplit(resource).path.rstrip("/")
        meta_path = "/.well-known/oauth-protected-resource" + path
        meta_url = urljoin(resource, meta_path)

        @app.get(meta_path)
        def resource_metadata() -> Any:
            return {"resource": resource, "authorization_servers": [authorization_server],
                    "scopes_supported": [required_scope or "documents.read"],
                    "bearer_methods_supported": ["header"]}

    def challenge(base: str) -> str:
        return f'{base}, resource_metadata="{meta_url}"' if meta_url else base
    documents: list[dict[str, Any]] = list(permissions.get("documents", []))
    users: dict[str, list[str]] = dict(permissions.get("users", {}))

    @app.get("/healthz")
    def healthz() -> Any:
        return {"ok": True}

    @app.get("/documents")
    def list_documents() -> Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _json(
                {"error": "unauthorized", "error_description": "no bearer token"},
                401,
                {"WWW-Authenticate": challenge(NO_TOKEN)},
            )
        try:
            info = introspector.introspect(token)
        except IntrospectionError as exc:
            log.warning("introspection failed: %s", exc)
            return _json({"error": "introspection_unavailable"}, 503, {"Retry-After": "1"})
        exp = info.get("exp")
        if (
            not info.get("active")
            # A refresh token is "active" too, but it is not a bearer credential.
            or str(info.get("token_type", "Bearer")).lower() != "bearer"
            or (isinstance(exp, int | float) and exp <= clock())
        ):
            return _json(
                {"error": "invalid_token", "error_description": "token is not active"},
                401,
                {"WWW-Authenticate": challenge(INVALID_TOKEN)},
            )
        if resource is not None and info.get("aud") != resource:
            return _json(
                {"error": "invalid_token", "error_description": "token is for another "
                 f"audience ({info.get('aud')!r})"}, 401,
                {"WWW-Authenticate": challenge(INVALID_TOKEN)},
            )
        if required_scope and required_scope not in str(info.get("scope", "")).split():
            return _json(
                {"error": "insufficient_scope", "scope": required_scope},
                403,
                {"WWW-Authenticate": f'Bearer error="insufficient_scope", '
                                     f'scope="{required_scope}"'},
            )
        user = str(info.get("sub", ""))
        matters = set(users.get(user, []))
        answer: dict[str, Any] = {
            "user": user, "documents": [d for d in documents if d.get("matter") in matters]}
        if resource is not None:
            answer["aud"] = info.get("aud")
        return _json(answer)

    echo_methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

    @app.route("/echo", methods=echo_methods, provide_automatic_options=False)
    @app.route("/echo/<path:rest>", methods=echo_methods, provide_automatic_options=False)
    def echo(rest: str = "") -> Response:
        env = request.environ
        raw_uri = env.get("REQUEST_URI") or env.get("RAW_URI") or request.full_path
        path, _, query = raw_uri.partition("?")
        h = hashlib.sha256()
        n = 0
        while chunk := request.stream.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
        return _json(
            {
                "method": request.method,
                "path": path,
                "query": query,
                "headers": [list(p) for p in env.get("devstack.raw_headers", [])],
                "body_length": n,
                "body_sha256": h.hexdigest(),
                "http_version": env.get("SERVER_PROTOCOL"),
                "tls": request.scheme == "https",
            }
        )

    @app.get("/large")
    def large() -> Response:
        try:
            n = int(request.args.get("bytes", "0"))
        except ValueError:
            return _json({"error": "bytes must be an integer"}, 400)
        if not 0 <= n <= MAX_LARGE:
            return _json({"error": "bytes out of range"}, 400)
        return Response(
            large_body(n),
            200,
            headers={"Content-Length": str(n)},
            content_type="application/octet-stream",
            direct_passthrough=True,
        )

    @app.route("/upload", methods=["POST", "PUT"])
    def upload() -> Response:
        h = hashlib.sha256()
        n = 0
        while chunk := request.stream.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
        return _json({"bytes": n, "sha256": h.hexdigest()})

    @app.get("/slow")
    def slow() -> Response:
        """Answers after ``?seconds=`` (at most 30): an in-flight request for shutdown tests."""
        seconds = min(float(request.args.get("seconds", "1")), 30.0)
        time.sleep(seconds)
        return _json({"slept": seconds})

    @app.route("/status/<int:code>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def status(code: int) -> Response:
        if not 200 <= code <= 599:
            return _json({"error": "status must be 200-599"}, 400)
        headers: dict[str, str] = {}
        if code == 401:
            headers["WWW-Authenticate"] = INVALID_TOKEN
        if code in (204, 304):
            return Response(status=code, headers=headers)
        return _json({"status": code}, code, headers)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devstack.docapi",
                                     description=__doc__.split("\n")[0])
    add_server_args(parser)
    parser.add_argument("--introspect-url", required=True)
    parser.add_argument("--client-id", required=True, help="resource_server client id")
    parser.add_argument("--client-secret-env", required=True,
                        help="name of the environment variable holding the client secret")
    parser.add_argument("--ca-file", help="CA bundle to verify the authorization server")
    parser.add_argument("--permissions", required=True, help="JSON documents/users file")
    parser.add_argument("--introspect-cache-ttl", type=float, default=1.0,
                        help="seconds to cache introspection answers (0 disables; default 1)")
    parser.add_argument("--required-scope", help="scope /documents insists on (default none)")
    parser.add_argument("--resource", help="this API's resource URI (RFC 9728 metadata, aud)")
    parser.add_argument("--authorization-server", help="issuer named in its RFC 9728 metadata")
    args = parser.parse_args(argv)
    configure_logging(args.debug)
    secret = os.environ.get(args.client_secret_env)
    if not secret:
        raise SystemExit(f"environment variable {args.client_secret_env} is not set")
    permissions = json.loads(Path(args.permissions).read_text())
    introspector = Introspector(
        args.introspect_url, args.client_id, secret, args.ca_file, args.introspect_cache_ttl
    )
    app = create_app(introspector, permissions, required_scope=args.required_scope,
                     resource=args.resource, authorization_server=args.authorization_server)
    serve(app, args, "docapi")


if __name__ == "__main__":
    main()
