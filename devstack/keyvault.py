"""An in-memory Azure Key Vault *secrets* endpoint, for CI and the demo (no Azure account).

Run as a separate process (HTTPS only: the SDK refuses to send a bearer token over HTTP)::

    python -m devstack.keyvault --host 127.0.0.1 --port 0 --cert C --key K \\
        --ready-file ready.json [--admin] [--purge-protection] [--recoverable-days 90] \\
        [--delete-polls 1] [--recover-polls 1] [--purge-polls 0] \\
        [--accept-api-version 2026-04-01]

and point the real ``azure-keyvault-secrets`` client at the announced URL::

    SecretClient(vault_url=url, credential=<any TokenCredential>, api_version="2025-07-01",
                 verify_challenge_resource=False, connection_verify="<test CA path>")

The behaviour is held to recorded Key Vault traffic (tests/fixtures/keyvault/):

* **Challenge.** A request without ``Authorization: Bearer <token>`` gets 401, the recorded
  ``Unauthorized`` body (the 2025-07-01 wording for 2025+ api-versions) and
  ``WWW-Authenticate: Bearer authorization="<authority>/<tenant>", resource="<resource>"``.
  Any bearer token is then accepted (this is not an Entra test); the Authorization values that
  arrived are counted in ``/_admin/stats``.
* **api-version** is required on every request; 7.3 up to 2025-07-01 are accepted (more with
  ``--accept-api-version``; azure-keyvault-secrets 4.12 defaults to 2026-04-01). Anything else
  is 400 ``BadParameter``.
* **Secrets**: ``PUT /secrets/N`` (new 32-hex version), ``GET /secrets/N[/]`` (latest),
  ``GET /secrets/N/V``, ``PATCH /secrets/N[/][V]`` (contentType, tags, attributes; no
  ``value`` in the answer), ``GET /secrets`` and ``GET /secrets/N/versions`` (no values;
  ``maxresults`` 1-25 and ``nextLink`` paging), ``DELETE /secrets/N`` (soft delete),
  ``GET /deletedsecrets[/N]``, ``POST /deletedsecrets/N/recover``, ``DELETE
  /deletedsecrets/N`` (purge: 204, no body, no Content-Type/Length). Names are 1-127 of
  ``0-9a-zA-Z-`` and case-insensitive (the spelling of the first creation is kept); values up
  to 25 KiB; at most 15 tags of at most 512 characters. A disabled version answers GET with
  403 ``Forbidden``/``SecretDisabled``. Backup/restore are not implemented (501).
* **Eventual consistency**, counted in polls rather than seconds so tests are fast and exact:
  after a DELETE, ``GET /deletedsecrets/N`` answers 404 ``SecretNotFound`` "Deleted Secret not
  found: N" ``--delete-polls`` times before 200; until then the deletion is "in progress":
  re-creating the name is 409 ``Conflict``/``ObjectIsBeingDeleted`` and the deleted secret is
  not listed, recoverable or purgeable (404). Afterwards a PUT is 409
  ``Conflict``/``ObjectIsDeletedButRecoverable``. After a purge, the next ``--purge-polls``
  (default 0) PUTs of the name are 409 ``Conflict``/``ObjectIsBeingDeleted`` (Key Vault takes
  a while to free a purged name); the name is neither live nor deleted meanwhile. After a
  recover, ``GET /secrets/N[/V]``
  answers 404 ``--recover-polls`` times before 200 (and the secret is not listed meanwhile);
  any write to it ends the wait.
* **Retention**: ``--recoverable-days`` (7-90, default 90) gives recoveryLevel
  ``Recoverable+Purgeable`` (90) or ``CustomizedRecoverable+Purgeable``; with
  ``--purge-protection`` the "+Purgeable" is dropped and a purge answers 403 ``Forbidden``
  with the service's message and ``innererror.code`` ``ForbiddenByPurgeProtection`` (the
  inner code is this server's choice: no recording of that refusal exists).
  ``scheduledPurgeDate`` = ``deletedDate`` + recoverableDays * 86400. Nothing is ever purged
  automatically.

With ``--admin``, a test control API under ``/_admin/`` (loopback callers only):

* ``POST /_admin/faults`` ``{"status": 429|500|503|..., "count": N (-1 = until reset),
  "retry_after": seconds|null, "delay": seconds, "methods": ["GET", ...], "path": "/secrets/N"}``
  (``path``: a prefix; optional) queues a fault
  for the vault API (before the challenge, like a gateway throttle). 429 sends the recorded
  ``Throttled`` body, ``Retry-After`` only when ``retry_after`` is set. ``status`` null with a
  ``delay`` only slows requests down. Several faults queue; the first matching one applies;
  ``GET /_admin/faults`` lists them with their hit counts.
* ``GET /_admin/stats`` ``{"requests", "by_method", "by_status", "authorized",
  "challenged", "authorization_values"}``; ``GET /_admin/requests`` (the last requests:
  method, path, api-version, status, authorized, time; never bodies).
* ``POST /_admin/reset`` clears faults, counters and the request log; ``{"secrets": true}``
  also empties the vault.
* ``GET|POST /_admin/config`` reads/changes ``delete_polls``, ``recover_polls``,
  ``purge_polls``, ``recoverable_days`` and ``purge_protection`` at run time.
* ``POST /_admin/permissions`` ``{"token": "<bearer token>", "deny": ["set", ...]}`` takes
  secret permissions (``get``, ``list``, ``set``, ``delete``, ``recover``, ``purge``) away
  from the identity presenting that bearer token: such a request answers 403 ``Forbidden``
  with innererror ``AccessDenied`` in Key Vault's access-policy wording. ``"deny": []``
  restores them; ``GET`` lists the denials (token fingerprints only); a reset clears them.
* ``GET /_admin/secrets`` names and versions (live and deleted), never values.

Secret values are never logged: request logging shows method, path and status only.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import logging
import re
import secrets
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, request

from devstack._serve import add_server_args, configure_logging, is_loopback, serve

log = logging.getLogger("devstack.keyvault")

API_VERSIONS = ("7.3", "7.4", "7.5", "7.6-preview.1", "7.6-preview.2", "7.6", "2025-07-01")
DEFAULT_TENANT = "00000000-0000-0000-0000-000000000000"
DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
DEFAULT_RESOURCE = "https://vault.azure.net"

NAME_RE = re.compile(r"[0-9a-zA-Z-]{1,127}")
VERSION_RE = re.compile(r"[0-9a-fA-F]{32}")
MAX_VALUE_BYTES = 25 * 1024
MAX_TAGS = 15
MAX_TAG_CHARS = 512
MAX_PAGE = 25
MAX_BODY = 1024 * 1024
DAY = 86400

JSON_TYPE = "application/json; charset=utf-8"
_COMMON_HEADERS = {
    "Cache-Control": "no-cache",
    "Pragma": "no-cache",
    "Expires": "-1",
    "Strict-Transport-Security": "max-age=31536000;includeSubDomains",
    "X-Content-Type-Options": "nosniff",
    "x-ms-keyvault-region": "devstack",
    "x-ms-keyvault-service-version": "devstack",
}
_NOT_FOUND_HINT = (
    " was not found in this key vault. If you recently deleted this secret you may be able to "
    "recover it using the correct recovery command. For help resolving this issue, please see "
    "https://go.microsoft.com/fwlink/?linkid=2125182"
)
_FAULT_BODIES = {
    429: ("Throttled", "Request was not processed because too many requests were received. "
          "Reason: VaultRequestTypeLimitReached"),
    500: ("InternalServerError", "An internal server error occurred (devstack fault)."),
    502: ("BadGateway", "Bad gateway (devstack fault)."),
    503: ("ServiceUnavailable", "The service is temporarily unavailable (devstack fault)."),
    504: ("GatewayTimeout", "Gateway timeout (devstack fault)."),
}


# --------------------------------------------------------------------------------------------
# Model


@dataclass
class Version:
    version: str
    value: str
    content_type: str | None
    tags: dict[str, str] | None
    enabled: bool
    nbf: int | None
    exp: int | None
    created: int
    updated: int
    seq: int


@dataclass
class Secret:
    name: str  # spelling of the first creation; the store is keyed by name.lower()
    versions: dict[str, Version] = field(default_factory=dict)  # in creation order
    latest: str = ""
    hidden_polls: int = 0  # recover in progress: GETs answer 404 this many more times

    def current(self) -> Version:
        return self.versions[self.latest]


@dataclass
class Deleted:
    secret: Secret
    deleted_date: int
    scheduled_purge: int
    hidden_polls: int  # delete in progress: GET deletedsecrets/N answers 404 this many times


@dataclass
class Config:
    delete_polls: int = 1
    recover_polls: int = 1
    purge_polls: int = 0
    recoverable_days: int = 90
    purge_protection: bool = False

    def recovery_level(self) -> str:
        level = "Recoverable" if self.recoverable_days >= 90 else "CustomizedRecoverable"
        return level if self.purge_protection else level + "+Purgeable"

    def as_json(self) -> dict[str, Any]:
        return {
            "delete_polls": self.delete_polls,
            "recover_polls": self.recover_polls,
            "purge_polls": self.purge_polls,
            "recoverable_days": self.recoverable_days,
            "purge_protection": self.purge_protection,
            "recovery_level": self.recovery_level(),
        }


@dataclass
class Fault:
    status: int | None
    count: int  # < 0: until reset
    retry_after: float | None
    delay: float
    methods: frozenset[str] | None
    hits: int = 0
    path: str | None = None  # only requests whose path starts with this

    def matches(self, method: str, path: str = "/") -> bool:
        return self.count != 0 and (self.methods is None or method in self.methods) and (
            self.path is None or path.startswith(self.path))

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "count": self.count,
            "retry_after": self.retry_after,
            "delay": self.delay,
            "methods": sorted(self.methods) if self.methods is not None else None,
            "path": self.path,
            "hits": self.hits,
        }


@dataclass
class Stats:
    requests: int = 0
    authorized: int = 0
    challenged: int = 0
    by_method: Counter[str] = field(default_factory=Counter)
    by_status: Counter[str] = field(default_factory=Counter)
    authorization_values: Counter[str] = field(default_factory=Counter)
    log: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=2000))

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_method": dict(self.by_method),
            "by_status": dict(self.by_status),
            "authorized": self.authorized,
            "challenged": self.challenged,
            "authorization_values": dict(self.authorization_values),
        }


class AdminError(Exception):
    """A bad /_admin/ request (answered 400 with ``{"error": message}``)."""


class ApiError(Exception):
    """An error answer in Key Vault's shape: ``{"error": {"code", "message", "innererror"}}``."""

    def __init__(
        self, status: int, code: str, message: str, inner: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.inner = inner
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.inner:
            err["innererror"] = {"code": self.inner}
        return {"error": err}


def bad(message: str) -> ApiError:
    return ApiError(400, "BadParameter", message)


def secret_not_found(name: str) -> ApiError:
    return ApiError(404, "SecretNotFound", f"A secret with (name/id) {name}{_NOT_FOUND_HINT}")


def deleted_not_found(name: str) -> ApiError:
    return ApiError(404, "SecretNotFound", f"Deleted Secret not found: {name}")


# --------------------------------------------------------------------------------------------
# The vault


class Vault:
    """All state. One lock serialises every operation (each is a few dict operations)."""

    def __init__(self, config: Config) -> None:
        self.lock = threading.RLock()
        self.config = config
        self.live: dict[str, Secret] = {}
        self.deleted: dict[str, Deleted] = {}
        self.purging: dict[str, int] = {}  # purged names: PUTs still refused as being deleted
        self.seq = 0

    # -- rendering -------------------------------------------------------------------------
    def _attributes(self, v: Version) -> dict[str, Any]:
        attrs: dict[str, Any] = {"enabled": v.enabled}
        if v.nbf is not None:
            attrs["nbf"] = v.nbf
        if v.exp is not None:
            attrs["exp"] = v.exp
        attrs.update(
            created=v.created,
            updated=v.updated,
            recoveryLevel=self.config.recovery_level(),
            recoverableDays=self.config.recoverable_days,
        )
        return attrs

    def bundle(self, base: str, s: Secret, v: Version, *, value: bool,
               versioned: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if value:
            out["value"] = v.value
        if v.content_type is not None:
            out["contentType"] = v.content_type
        out["id"] = f"{base}/secrets/{s.name}" + (f"/{v.version}" if versioned else "")
        out["attributes"] = self._attributes(v)
        if v.tags is not None:
            out["tags"] = dict(v.tags)
        return out

    def deleted_bundle(self, base: str, d: Deleted, *, versioned: bool = True) -> dict[str, Any]:
        s = d.secret
        return {
            "recoveryId": f"{base}/deletedsecrets/{s.name}",
            "deletedDate": d.deleted_date,
            "scheduledPurgeDate": d.scheduled_purge,
            **self.bundle(base, s, s.current(), value=False, versioned=versioned),
        }

    # -- operations ------------------------------------------------------------------------
    def set(self, name: str, body: dict[str, Any]) -> tuple[Secret, Version]:
        value = body.get("value")
        if not isinstance(value, str):
            raise bad("The parameter 'value' is required and must be a string.")
        if len(value.encode("utf-8")) > MAX_VALUE_BYTES:
            raise bad(f"The secret value exceeds the maximum size of {MAX_VALUE_BYTES} bytes.")
        content_type = _content_type(body)
        tags = _tags(body)
        enabled, nbf, exp = _attrs(body)
        key = name.lower()
        with self.lock:
            if self.purging.get(key, 0) > 0:
                self.purging[key] -= 1
                if not self.purging[key]:
                    del self.purging[key]
                raise ApiError(
                    409, "Conflict",
                    f"Secret {name} is currently being deleted and cannot be re-created; "
                    "retry later.",
                    "ObjectIsBeingDeleted",
                )
            d = self.deleted.get(key)
            if d is not None:
                shown = d.secret.name
                if d.hidden_polls > 0:
                    raise ApiError(
                        409, "Conflict",
                        f"Secret {shown} is currently being deleted and cannot be re-created; "
                        "retry later.",
                        "ObjectIsBeingDeleted",
                    )
                raise ApiError(
                    409, "Conflict",
                    f"Secret {shown} is currently in a deleted but recoverable state, and its "
                    "name cannot be reused; in this state, the secret can only be recovered or "
                    "purged.",
                    "ObjectIsDeletedButRecoverable",
                )
            s = self.live.get(key)
            if s is None:
                s = self.live[key] = Secret(name=name)
            now = int(time.time())
            self.seq += 1
            v = Version(
                version=secrets.token_hex(16),
                value=value,
                content_type=content_type,
                tags=tags,
                enabled=True if enabled is None else enabled,
                nbf=nbf,
                exp=exp,
                created=now,
                updated=now,
                seq=self.seq,
            )
            s.versions[v.version] = v
            s.latest = v.version
            s.hidden_polls = 0
            log.info("set secret %s version %s", s.name, v.version)
            return s, v

    def _visible(self, name: str) -> Secret:
        """The live secret, counting one poll of a recover in progress."""
        s = self.live.get(name.lower())
        if s is None:
            raise secret_not_found(name)
        if s.hidden_polls > 0:
            s.hidden_polls -= 1
            raise secret_not_found(name)
        return s

    def get(self, name: str, version: str) -> tuple[Secret, Version]:
        with self.lock:
            s = self._visible(name)
            v = _version(s, name, version)
            if not v.enabled:
                raise ApiError(403, "Forbidden", "Operation get is not allowed on a disabled "
                               "secret.", "SecretDisabled")
            return s, v

    def update(self, name: str, version: str, body: dict[str, Any]) -> tuple[Secret, Version]:
        content_type = _content_type(body)
        tags = _tags(body)
        enabled, nbf, exp = _attrs(body)
        with self.lock:
            s = self.live.get(name.lower())
            if s is None:
                raise secret_not_found(name)
            v = _version(s, name, version)
            if "contentType" in body:
                v.content_type = content_type
            if "tags" in body:
                v.tags = tags
            attrs = body.get("attributes") or {}
            if enabled is not None:
                v.enabled = enabled
            if "nbf" in attrs:
                v.nbf = nbf
            if "exp" in attrs:
                v.exp = exp
            v.updated = int(time.time())
            s.hidden_polls = 0
            return s, v

    def delete(self, name: str) -> Deleted:
        with self.lock:
            s = self.live.pop(name.lower(), None)
            if s is None:
                raise secret_not_found(name)
            now = int(time.time())
            d = Deleted(
                secret=s,
                deleted_date=now,
                scheduled_purge=now + self.config.recoverable_days * DAY,
                hidden_polls=self.config.delete_polls,
            )
            s.hidden_polls = 0
            self.deleted[name.lower()] = d
            log.info("deleted secret %s", s.name)
            return d

    def _deleted(self, name: str, *, poll: bool) -> Deleted:
        d = self.deleted.get(name.lower())
        if d is None:
            raise deleted_not_found(name)
        if d.hidden_polls > 0:
            if poll:
                d.hidden_polls -= 1
            raise deleted_not_found(name)
        return d

    def get_deleted(self, name: str) -> Deleted:
        with self.lock:
            return self._deleted(name, poll=True)

    def recover(self, name: str) -> Secret:
        with self.lock:
            d = self._deleted(name, poll=False)
            s = d.secret
            del self.deleted[name.lower()]
            s.hidden_polls = self.config.recover_polls
            self.live[name.lower()] = s
            log.info("recovered secret %s", s.name)
            return s

    def purge(self, name: str) -> None:
        with self.lock:
            d = self._deleted(name, poll=False)
            if self.config.purge_protection:
                raise ApiError(
                    403, "Forbidden",
                    'Operation "purge" is not allowed because purge protection is enabled for '
                    "this vault. Key Vault service will automatically purge it after the "
                    "retention period has passed.\r\nVault: devstack;location=devstack",
                    "ForbiddenByPurgeProtection",
                )
            del self.deleted[name.lower()]
            if self.config.purge_polls:
                self.purging[name.lower()] = self.config.purge_polls
            log.info("purged secret %s", d.secret.name)

    def list_live(self) -> list[Secret]:
        with self.lock:
            return [s for _, s in sorted(self.live.items()) if s.hidden_polls == 0]

    def list_deleted(self) -> list[Deleted]:
        with self.lock:
            return [d for _, d in sorted(self.deleted.items()) if d.hidden_polls == 0]

    def clear(self) -> None:
        with self.lock:
            self.live.clear()
            self.deleted.clear()
            self.purging.clear()

    def summary(self) -> dict[str, Any]:
        with self.lock:
            return {
                "secrets": [
                    {"name": s.name, "versions": list(s.versions), "latest": s.latest,
                     "enabled": s.current().enabled, "pending_polls": s.hidden_polls}
                    for _, s in sorted(self.live.items())
                ],
                "deleted": [
                    {"name": d.secret.name, "versions": list(d.secret.versions),
                     "visible": d.hidden_polls == 0, "pending_polls": d.hidden_polls,
                     "deletedDate": d.deleted_date, "scheduledPurgeDate": d.scheduled_purge}
                    for _, d in sorted(self.deleted.items())
                ],
                "purging": [{"name": n, "pending_polls": p}
                            for n, p in sorted(self.purging.items())],
            }


def _version(s: Secret, name: str, version: str) -> Version:
    if not version:
        return s.current()
    v = s.versions.get(version.lower())
    if v is None:
        raise secret_not_found(f"{name}/{version}")
    return v


def _content_type(body: dict[str, Any]) -> str | None:
    ct = body.get("contentType")
    if ct is not None and not isinstance(ct, str):
        raise bad("The parameter 'contentType' must be a string.")
    return ct


def _tags(body: dict[str, Any]) -> dict[str, str] | None:
    tags = body.get("tags")
    if tags is None:
        return None
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise bad("The parameter 'tags' must map strings to strings.")
    if len(tags) > MAX_TAGS:
        raise bad(f"The number of tags ({len(tags)}) exceeds the maximum of {MAX_TAGS}.")
    for k, v in tags.items():
        if not k or len(k) > MAX_TAG_CHARS or len(v) > MAX_TAG_CHARS:
            raise bad(f"Tag names and values are limited to {MAX_TAG_CHARS} characters "
                      "(and names must not be empty).")
    return dict(tags)


def _attrs(body: dict[str, Any]) -> tuple[bool | None, int | None, int | None]:
    attrs = body.get("attributes")
    if attrs is None:
        return None, None, None
    if not isinstance(attrs, dict):
        raise bad("The parameter 'attributes' must be an object.")
    enabled = attrs.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise bad("The attribute 'enabled' must be a boolean.")
    times: list[int | None] = []
    for key in ("nbf", "exp"):
        t = attrs.get(key)
        if t is not None and (isinstance(t, bool) or not isinstance(t, int)):
            raise bad(f"The attribute '{key}' must be an integer (Unix time in seconds).")
        times.append(t)
    return enabled, times[0], times[1]


# --------------------------------------------------------------------------------------------
# HTTP


def _json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    resp = Response(json.dumps(body, separators=(",", ":")), status, content_type=JSON_TYPE)
    resp.headers.update(_COMMON_HEADERS)
    resp.headers["x-ms-request-id"] = str(uuid.uuid4())
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _empty_response(status: int) -> Response:
    """204 as Key Vault sends it: no body, no Content-Type, no Content-Length."""
    resp = Response(status=status)
    resp.headers.remove("Content-Type")
    resp.headers.update(_COMMON_HEADERS)
    resp.headers["x-ms-request-id"] = str(uuid.uuid4())
    return resp


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


def _encode_marker(marker: str) -> str:
    raw = json.dumps({"NextMarker": marker}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_marker(token: str) -> str:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        marker = data["NextMarker"]
    except (binascii.Error, ValueError, TypeError, KeyError):
        raise bad("The $skiptoken is not valid.") from None
    if not isinstance(marker, str):
        raise bad("The $skiptoken is not valid.")
    return marker


class KeyVaultApp:
    """The Flask app around a :class:`Vault`, with challenge, faults and counters."""

    def __init__(
        self,
        vault: Vault,
        *,
        tenant: str = DEFAULT_TENANT,
        authority_host: str = DEFAULT_AUTHORITY_HOST,
        resource: str = DEFAULT_RESOURCE,
        api_versions: tuple[str, ...] = API_VERSIONS,
        admin: bool = False,
    ) -> None:
        self.vault = vault
        self.challenge = (
            f'Bearer authorization="{authority_host.rstrip("/")}/{tenant}", '
            f'resource="{resource}"'
        )
        self.api_versions = api_versions
        self.stats = Stats()
        self.faults: list[Fault] = []
        self.denied: dict[str, frozenset[str]] = {}  # bearer token -> permissions taken away
        self.lock = threading.Lock()
        self.app = Flask("devstack.keyvault")
        self.app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
        if admin:
            self._add_admin()
        else:
            self.app.add_url_rule(
                "/_admin/<path:rest>", "no_admin",
                lambda rest: Response('{"error": "the admin API is off (start with --admin)"}',
                                      404, content_type="application/json"),
                methods=["GET", "POST"],
            )
        self.app.add_url_rule("/", "vault_root", self.handle,
                              methods=["GET", "PUT", "PATCH", "POST", "DELETE"])
        self.app.add_url_rule("/<path:path>", "vault", self.handle,
                              methods=["GET", "PUT", "PATCH", "POST", "DELETE"])

    # -- the vault API ---------------------------------------------------------------------
    def handle(self, path: str = "") -> Response:
        method = request.method
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        authorized = scheme.lower() == "bearer" and bool(token.strip())
        try:
            # Always read the body (bounded by MAX_CONTENT_LENGTH) so that an early answer
            # never leaves unread bytes on a keep-alive connection.
            raw = request.get_data(cache=True)
            fault = self._take_fault(method, "/" + path)
            if fault is not None:
                if fault.delay > 0:
                    time.sleep(fault.delay)
                if fault.status is not None:
                    raise self._fault_error(fault)
            api_version = request.args.get("api-version")
            if not api_version:
                raise bad("The 'api-version' query parameter is missing.")
            if api_version not in self.api_versions:
                raise bad(
                    f"The specified version ({api_version}) is not recognized. Consider using "
                    f"the latest supported version ({self.api_versions[-1]})."
                )
            if not authorized:
                token_kinds = (
                    "Bearer, PoP, or MTLS_POP" if api_version.startswith("20") else "Bearer or PoP"
                )
                raise ApiError(
                    401, "Unauthorized", f"AKV10000: Request is missing a {token_kinds} token.",
                    headers={"WWW-Authenticate": self.challenge},
                )
            self._permit(token.strip(), method, path)
            resp = self._route(method, path, raw)
        except ApiError as err:
            resp = _json_response(err.status, err.body(), err.headers)
        self._count(method, path, resp.status_code, authorized, auth)
        return resp

    def _count(self, method: str, path: str, status: int, authorized: bool, auth: str) -> None:
        with self.lock:
            st = self.stats
            st.requests += 1
            st.by_method[method] += 1
            st.by_status[str(status)] += 1
            if authorized:
                st.authorized += 1
            if auth:
                st.authorization_values[auth] += 1
            if status == 401:
                st.challenged += 1
            st.log.append({
                "method": method,
                "path": "/" + path,
                "api_version": request.args.get("api-version"),
                "status": status,
                "authorized": authorized,
                "time": time.time(),
            })

    def _permit(self, token: str, method: str, path: str) -> None:
        """403 for an operation the caller's identity was denied (``/_admin/permissions``)."""
        with self.lock:
            denied = self.denied.get(token)
        if not denied:
            return
        op = _permission(method, path)
        if op in denied:
            raise ApiError(
                403, "Forbidden",
                f"The user, group or application 'appid=devstack;oid={_fingerprint(token)}' "
                f"does not have secrets {op} permission on key vault "
                "'devstack;location=devstack'. For help resolving this issue, please see "
                "https://go.microsoft.com/fwlink/?linkid=2125287",
                "AccessDenied",
            )

    def _take_fault(self, method: str, path: str = "/") -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.matches(method, path):
                    if f.count > 0:
                        f.count -= 1
                    f.hits += 1
                    return f
        return None

    @staticmethod
    def _fault_error(f: Fault) -> ApiError:
        assert f.status is not None
        code, message = _FAULT_BODIES.get(f.status, ("DevstackFault", "Injected fault."))
        headers = {}
        if f.retry_after is not None:
            headers["Retry-After"] = _format_seconds(f.retry_after)
        return ApiError(f.status, code, message, headers=headers)

    def _route(self, method: str, path: str, raw: bytes) -> Response:
        base = request.host_url.rstrip("/")
        parts = path.split("/")
        collection, rest = parts[0], parts[1:]
        if collection == "secrets":
            if not rest or rest == [""]:
                self._allow(method, "GET")
                return self._list_live(base)
            name = self._name(rest[0])
            if len(rest) == 1 or (len(rest) == 2 and rest[1] == ""):
                if method == "PUT" and len(rest) == 1:
                    s, v = self.vault.set(name, _body(raw))
                    return _json_response(200, self.vault.bundle(base, s, v, value=True))
                if method == "DELETE" and len(rest) == 1:
                    d = self.vault.delete(name)
                    return _json_response(200, self.vault.deleted_bundle(base, d))
                return self._get_or_update(method, base, name, "", raw)
            if len(rest) == 2 and rest[1] == "versions":
                self._allow(method, "GET")
                return self._list_versions(base, name)
            if len(rest) == 2 and rest[1] == "backup":
                raise ApiError(501, "NotImplemented", "Backup is not supported by devstack.")
            if len(rest) == 2:
                return self._get_or_update(method, base, name, rest[1], raw)
        elif collection == "deletedsecrets":
            if not rest or rest == [""]:
                self._allow(method, "GET")
                return self._list_deleted(base)
            name = self._name(rest[0])
            if len(rest) == 1:
                if method == "GET":
                    d = self.vault.get_deleted(name)
                    return _json_response(200, self.vault.deleted_bundle(base, d))
                self._allow(method, "DELETE")
                self.vault.purge(name)
                return _empty_response(204)
            if len(rest) == 2 and rest[1] == "recover":
                self._allow(method, "POST")
                s = self.vault.recover(name)
                return _json_response(200, self.vault.bundle(base, s, s.current(), value=False))
        raise ApiError(404, "NotFound", f"The requested resource was not found: /{path}")

    def _get_or_update(self, method: str, base: str, name: str, version: str,
                       raw: bytes) -> Response:
        if version and not VERSION_RE.fullmatch(version):
            raise secret_not_found(f"{name}/{version}")
        if method == "GET":
            s, v = self.vault.get(name, version)
            return _json_response(200, self.vault.bundle(base, s, v, value=True))
        self._allow(method, "PATCH")
        s, v = self.vault.update(name, version, _body(raw))
        return _json_response(200, self.vault.bundle(base, s, v, value=False))

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise ApiError(405, "MethodNotAllowed",
                           f"The method {method} is not allowed on this resource.")

    @staticmethod
    def _name(name: str) -> str:
        if not NAME_RE.fullmatch(name):
            raise bad(f"The request URI contains an invalid name: {name}")
        return name

    def _page(self, base: str, path: str, items: list[tuple[str, dict[str, Any]]]) -> Response:
        """One page of ``items`` (sort key, JSON item) after the request's $skiptoken."""
        size = MAX_PAGE
        if "maxresults" in request.args:
            try:
                size = int(request.args["maxresults"])
            except ValueError:
                size = 0
            if not 1 <= size <= MAX_PAGE:
                raise bad(f"The value of 'maxresults' must be between 1 and {MAX_PAGE}.")
        token = request.args.get("$skiptoken")
        if token:
            marker = _decode_marker(token)
            items = [it for it in items if it[0] > marker]
        page, more = items[:size], len(items) > size
        next_link = None
        if more:
            next_link = (
                f"{base}{path}?api-version={request.args['api-version']}"
                f"&$skiptoken={_encode_marker(page[-1][0])}"
                + (f"&maxresults={request.args['maxresults']}"
                   if "maxresults" in request.args else "")
            )
        return _json_response(200, {"value": [it[1] for it in page], "nextLink": next_link})

    def _list_live(self, base: str) -> Response:
        with self.vault.lock:
            items = [
                (s.name.lower(), self.vault.bundle(base, s, s.current(), value=False,
                                                   versioned=False))
                for s in self.vault.list_live()
            ]
        return self._page(base, "/secrets", items)

    def _list_versions(self, base: str, name: str) -> Response:
        with self.vault.lock:
            s = self.vault.live.get(name.lower())
            items = []
            if s is not None and s.hidden_polls == 0:
                items = [
                    (f"{v.seq:016d}", self.vault.bundle(base, s, v, value=False))
                    for v in s.versions.values()
                ]
        return self._page(base, f"/secrets/{name}/versions", items)

    def _list_deleted(self, base: str) -> Response:
        with self.vault.lock:
            items = [
                (d.secret.name.lower(), self.vault.deleted_bundle(base, d, versioned=False))
                for d in self.vault.list_deleted()
            ]
        return self._page(base, "/deletedsecrets", items)

    # -- the admin API ---------------------------------------------------------------------
    def _add_admin(self) -> None:
        """The test control API. Loopback only, no authentication: never enable it elsewhere."""
        app = self.app

        def admin_error(message: str, status: int = 400) -> Response:
            return Response(json.dumps({"error": message}), status,
                            content_type="application/json")

        def body() -> dict[str, Any]:
            data = request.get_json(silent=True) if request.get_data() else {}
            if not isinstance(data, dict):
                raise AdminError("expected a JSON object")
            return data

        @app.before_request
        def _loopback_only() -> Response | None:
            if request.path.startswith("/_admin/") and not is_loopback(request.remote_addr):
                return admin_error("the admin API answers loopback callers only", 403)
            return None

        @app.errorhandler(AdminError)
        def _bad_admin(exc: AdminError) -> Response:
            return admin_error(str(exc))

        @app.post("/_admin/faults")
        def admin_faults() -> Any:
            data = body()
            status = data.get("status")
            if status is not None and (not isinstance(status, int) or not 400 <= status <= 599):
                raise AdminError("'status' must be an HTTP error status (400-599) or null")
            count = data.get("count", 1)
            if not isinstance(count, int) or count == 0 or count < -1:
                raise AdminError("'count' must be a positive integer or -1 (until reset)")
            retry_after = data.get("retry_after")
            if retry_after is not None and (
                not isinstance(retry_after, int | float) or retry_after < 0
            ):
                raise AdminError("'retry_after' must be a number of seconds or null")
            delay = data.get("delay", 0) or 0
            if not isinstance(delay, int | float) or delay < 0:
                raise AdminError("'delay' must be a number of seconds")
            if status is None and not delay:
                raise AdminError("a fault needs a 'status' and/or a 'delay'")
            methods = data.get("methods")
            if methods is not None and (
                not isinstance(methods, list) or not all(isinstance(m, str) for m in methods)
            ):
                raise AdminError("'methods' must be a list of HTTP methods")
            path = data.get("path")
            if path is not None and (not isinstance(path, str) or not path.startswith("/")):
                raise AdminError("'path' must be a path prefix starting with /")
            fault = Fault(
                status=status,
                count=count,
                retry_after=retry_after,
                delay=float(delay),
                methods=frozenset(m.upper() for m in methods) if methods is not None else None,
                path=path,
            )
            with self.lock:
                self.faults.append(fault)
                return {"faults": [f.as_json() for f in self.faults]}

        @app.get("/_admin/faults")
        def admin_faults_get() -> Any:
            with self.lock:
                return {"faults": [f.as_json() for f in self.faults]}

        @app.get("/_admin/stats")
        def admin_stats() -> Any:
            with self.lock:
                return self.stats.as_json()

        @app.get("/_admin/requests")
        def admin_requests() -> Any:
            with self.lock:
                return {"requests": list(self.stats.log)}

        @app.post("/_admin/reset")
        def admin_reset() -> Any:
            """Reset faults, counters and the request log; ``{"secrets": true}`` also empties
            the vault."""
            data = body()
            with self.lock:
                self.stats = Stats()
                self.faults = []
                self.denied = {}
            if data.get("secrets"):
                self.vault.clear()
            return {"ok": True}

        @app.route("/_admin/config", methods=["GET", "POST"])
        def admin_config() -> Any:
            cfg = self.vault.config
            if request.method == "POST":
                data = body()
                with self.vault.lock:
                    for key in ("delete_polls", "recover_polls", "purge_polls"):
                        if key in data:
                            n = data[key]
                            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                                raise AdminError(f"'{key}' must be an integer >= 0")
                            setattr(cfg, key, n)
                    if "recoverable_days" in data:
                        try:
                            cfg.recoverable_days = _recoverable_days(data["recoverable_days"])
                        except ValueError as exc:
                            raise AdminError(str(exc)) from None
                    if "purge_protection" in data:
                        cfg.purge_protection = bool(data["purge_protection"])
            return cfg.as_json()

        @app.get("/_admin/secrets")
        def admin_secrets() -> Any:
            return self.vault.summary()

        @app.route("/_admin/permissions", methods=["GET", "POST"])
        def admin_permissions() -> Any:
            if request.method == "POST":
                data = body()
                token, deny = data.get("token"), data.get("deny")
                if not isinstance(token, str) or not token.strip():
                    raise AdminError("'token' must be the bearer token of an identity")
                if not isinstance(deny, list) or not set(deny) <= PERMISSIONS:
                    raise AdminError(f"'deny' must be a list of {sorted(PERMISSIONS)}")
                with self.lock:
                    if deny:
                        self.denied[token.strip()] = frozenset(deny)
                    else:
                        self.denied.pop(token.strip(), None)
            with self.lock:
                return {"denied": {_fingerprint(t): sorted(d) for t, d in self.denied.items()}}


PERMISSIONS = frozenset({"get", "list", "set", "delete", "recover", "purge"})


def _permission(method: str, path: str) -> str:
    """The access-policy secret permission an operation needs."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["deletedsecrets"]:
        if method == "DELETE":
            return "purge"
        return "recover" if method == "POST" else "list"
    if method in ("PUT", "PATCH"):
        return "set"
    if method == "DELETE":
        return "delete"
    return "list" if len(parts) <= 1 or parts[-1] == "versions" else "get"


def _fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def _body(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        raise bad("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise bad("The request body must be a JSON object.")
    return data


def _recoverable_days(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 7 <= value <= 90:
        raise ValueError("recoverable days must be an integer from 7 to 90")
    return value


def create_app(
    *,
    admin: bool = False,
    tenant: str = DEFAULT_TENANT,
    authority_host: str = DEFAULT_AUTHORITY_HOST,
    resource: str = DEFAULT_RESOURCE,
    extra_api_versions: tuple[str, ...] = (),
    config: Config | None = None,
) -> Flask:
    vault = Vault(config or Config())
    versions = API_VERSIONS + tuple(v for v in extra_api_versions if v not in API_VERSIONS)
    return KeyVaultApp(
        vault, tenant=tenant, authority_host=authority_host, resource=resource,
        api_versions=versions, admin=admin,
    ).app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.keyvault", description=__doc__.split("\n")[0]
    )
    add_server_args(parser)
    parser.add_argument("--admin", action="store_true", help="enable the /_admin/ test API")
    parser.add_argument("--tenant", default=DEFAULT_TENANT, help="tenant named in the challenge")
    parser.add_argument("--authority-host", default=DEFAULT_AUTHORITY_HOST,
                        help="authority host named in the challenge")
    parser.add_argument("--resource", default=DEFAULT_RESOURCE,
                        help="resource named in the challenge (default https://vault.azure.net)")
    parser.add_argument("--delete-polls", type=int, default=1,
                        help="GET deletedsecrets/N answers 404 this many times after a delete")
    parser.add_argument("--recover-polls", type=int, default=1,
                        help="GET secrets/N answers 404 this many times after a recover")
    parser.add_argument("--purge-polls", type=int, default=0,
                        help="PUTs of a purged name answer 409 ObjectIsBeingDeleted this many "
                        "times")
    parser.add_argument("--recoverable-days", type=int, default=90,
                        help="soft-delete retention, 7-90 days (default 90)")
    parser.add_argument("--purge-protection", action="store_true",
                        help="refuse purges (403) and report a non-purgeable recovery level")
    parser.add_argument("--accept-api-version", action="append", default=[], metavar="VERSION",
                        help="also accept this api-version (repeatable), e.g. 2026-04-01")
    args = parser.parse_args(argv)
    configure_logging(args.debug)
    if not (args.cert and args.key):
        raise SystemExit("--cert and --key are required: Key Vault clients only speak HTTPS")
    if args.delete_polls < 0 or args.recover_polls < 0 or args.purge_polls < 0:
        raise SystemExit("--delete-polls, --recover-polls and --purge-polls must be >= 0")
    try:
        days = _recoverable_days(args.recoverable_days)
    except ValueError as exc:
        raise SystemExit(f"--recoverable-days: {exc}") from None
    config = Config(
        delete_polls=args.delete_polls,
        recover_polls=args.recover_polls,
        purge_polls=args.purge_polls,
        recoverable_days=days,
        purge_protection=args.purge_protection,
    )
    app = create_app(
        admin=args.admin, tenant=args.tenant, authority_host=args.authority_host,
        resource=args.resource, extra_api_versions=tuple(args.accept_api_version),
        config=config,
    )
    serve(app, args, "keyvault")


if __name__ == "__main__":
    main()
