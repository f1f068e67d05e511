"""Provider dialects: how a real OAuth provider departs from the textbook, as data.

RFC 6749 describes one authorization server; the providers people connect agents to each
speak a dialect of it: errors with HTTP 200 (GitHub, Slack), the user's token set under
another key (Slack's ``authed_user``), no ``expires_in`` (Salesforce), revocation as JSON,
as a bearer call, as a ``DELETE``, or not at all. A provider entry says which, with the keys
modelled here (``docs``: the schema, /work issue 13); every key has the textbook default,
so an entry that sets none behaves as RFC 6749 / RFC 7009 say.

This module holds:

- the models of those keys (wired into :class:`proxy.settings.ProviderSettings`);
- the built-in catalog (``proxy/catalog/<id>.yaml``) and :func:`expand_provider`, which
  starts a user's ``provider: <id>`` entry from the catalog entry;
- the pure readers of providers' answers: :func:`read_token_response` (the one
  classification of a token endpoint's answer), :func:`api_signal` (revoked-token signals
  in API responses) and :func:`read_revocation_response`. They take bytes and return
  values; the HTTP is in :mod:`proxy.provider_client`.

Nothing here branches on a provider's name: a provider is the data in its entry.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Protocol, Self
from urllib.parse import parse_qsl

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy import reasons
from proxy.errors import ConfigError
from proxy.secret import Secret
from proxy.tokenset import TokenSet


class _Model(BaseModel):
    # The same as proxy.settings._Model (which imports this module).
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


_Code = Annotated[str, Field(min_length=1, max_length=128)]
_FieldName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.$-]{1,64}$")]


class TokenResponse(_Model):
    """Where a token endpoint's answer keeps the user's token set (RFC 6749 section 5.1)."""

    # Keys leading to the USER's token set. Slack (oauth.v2.access,
    # https://api.slack.com/methods/oauth.v2.access): [authed_user]; the top level then
    # holds the app's bot token, shared by every user, which must never be stored as one
    # user's credential.
    user_token_path: list[_FieldName] = Field(default_factory=list)
    # A code exchange whose answer has no token set at user_token_path is refused
    # (``no_user_token``), even when the top level carries one (a bot token).
    require_user_token: bool = True
    # When the user's token set is read from the top level of a refresh answer (no
    # user_token_path there), its token_type must be this (Slack: "user"; a "bot" answer
    # is the app's shared token and is refused with no_user_token).
    user_token_type: _FieldName | None = None
    # The refresh token's member name inside the token set.
    refresh_token_field: _FieldName = "refresh_token"


class TokenErrors(_Model):
    """How to read a token endpoint's answer, whatever its HTTP status (RFC 6749 section
    5.2 says 400 with ``error``; GitHub answers 200 with ``error``, Slack 200 with
    ``ok: false``, HubSpot v1 400 with ``status``). Codes are compared case-insensitively.
    """

    error_fields: Annotated[list[_FieldName], Field(min_length=1)] = Field(
        default_factory=lambda: ["error"])
    success_field: _FieldName | None = None  # Slack: ok (false is an error, even with 200)
    # The grant is dead: reauth-required, the grant is marked with the code as its reason.
    reauth: list[_Code] = Field(default_factory=lambda: ["invalid_grant"])
    # credproxy's client is misconfigured: 502 provider-misconfigured naming the
    # configuration; the grant is NOT marked (it is not the user's fault).
    operator: list[_Code] = Field(default_factory=lambda: [
        "invalid_client", "unauthorized_client", "unsupported_grant_type"])
    # May clear up by itself: retried with backoff (RFC 6749 section 4.1.2.1 defines
    # temporarily_unavailable for the authorize endpoint; servers send it here too).
    transient: list[_Code] = Field(default_factory=lambda: [
        "temporarily_unavailable", "server_error", "slow_down"])

    @model_validator(mode="after")
    def _disjoint(self) -> Self:
        seen: dict[str, str] = {}
        for kind in ("reauth", "operator", "transient"):
            for code in getattr(self, kind):
                key = code.lower()
                if key in seen and seen[key] != kind:
                    raise ValueError(f"code {code!r} is listed in both {seen[key]} and {kind}")
                seen[key] = kind
        return self

    def kind_of(self, code: str) -> Literal["reauth", "operator", "transient"] | None:
        key = code.lower()
        if any(c.lower() == key for c in self.reauth):
            return "reauth"
        if any(c.lower() == key for c in self.operator):
            return "operator"
        if any(c.lower() == key for c in self.transient):
            return "transient"
        return None


class ApiSignals(_Model):
    """Revoked-token signals inside small JSON API responses. Slack's Web API answers a
    revoked token with HTTP 200 ``{"ok": false, "error": "token_revoked"}``
    (https://api.slack.com/web#slack-web-api__evaluating-responses): read like a 401."""

    success_field: _FieldName | None = None  # Slack: ok (only ok: false is examined)
    error_field: _FieldName = "error"
    reauth: list[_Code] = Field(default_factory=list)
    # Only bodies up to this size are examined (held, not streamed).
    max_bytes: Annotated[int, Field(ge=64, le=1 << 20)] = 65536


RevocationStyle = Literal["rfc7009", "json", "bearer", "github-grant", "slack", "none"]


class Revocation(_Model):
    """How a grant is revoked upstream when a user is offboarded.

    Styles: ``rfc7009`` (form ``token`` + ``token_type_hint`` with client auth, RFC 7009
    section 2.1), ``json`` (``{"token": ...}`` with client auth: Intuit), ``bearer``
    (``Authorization: Bearer <access token>``, no body: Dropbox ``/2/auth/token/revoke``),
    ``github-grant`` (``DELETE`` with Basic client auth and ``{"access_token": ...}``:
    GitHub ``/applications/{client_id}/grant``), ``slack`` (form ``token``; revoked only
    when the JSON says ``ok: true``), ``none`` (no upstream revocation exists).

    ``token``: ``both`` (the default, RFC 7009's textbook and credproxy's behaviour
    before dialects): the refresh token first, then the access token, each on its own
    (RFC 7009 section 2.1: revoking a refresh token should end its access tokens, so the
    second is often answered as already dead); ``refresh_token``: the refresh token only
    (endpoints that take nothing else: Xero, HubSpot; the access token when the grant has
    no refresh token); ``access_token``: the access token only (Zoom). ``bearer``,
    ``github-grant`` and ``slack`` always revoke with the access token (their one call
    ends the grant).

    ``already_revoked``: error codes (or an HTTP status, as digits) meaning the token is
    already dead, counted as revoked (Google and Salesforce answer 400 ``invalid_token``
    for an access token that died with its refresh token).
    """

    style: RevocationStyle = "rfc7009"
    token: Literal["refresh_token", "access_token", "both"] = "both"
    already_revoked: list[_Code] = Field(default_factory=lambda: ["invalid_token"])
    console_url: str | None = None  # style none: where an admin revokes the app's access

    @field_validator("console_url")
    @classmethod
    def _console(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("https://"):
            raise ValueError("must be an https URL")
        return v


# Parameters credproxy sets itself: a dialect may not override them.
RESERVED_AUTHORIZE_PARAMS: Final = frozenset({
    "response_type", "client_id", "redirect_uri", "state", "code_challenge",
    "code_challenge_method", "scope"})
RESERVED_TOKEN_PARAMS: Final = frozenset({
    "grant_type", "code", "code_verifier", "redirect_uri", "refresh_token", "client_id",
    "client_secret", "client_assertion", "client_assertion_type"})


class TokenDialect(Protocol):
    """What :func:`read_token_response` needs of a provider (a ProviderSettings)."""

    @property
    def token_errors(self) -> TokenErrors: ...

    @property
    def token_response(self) -> TokenResponse: ...

    @property
    def default_expires_in(self) -> int | None: ...


# ---------------------------------------------------------------------------------------
# Reading a token endpoint's answer
# ---------------------------------------------------------------------------------------

Outcome = Literal["success", "reauth", "operator", "transient", "failed"]
Grant = Literal["authorization_code", "refresh_token"]


@dataclass(frozen=True, slots=True)
class TokenAnswer:
    """A token endpoint's answer, classified.

    - ``success``: ``tokens`` is the user's token set;
    - ``reauth``: the grant is dead; ``reason`` is the provider's code as a reason;
    - ``operator``: credproxy's client configuration is wrong (not the user's grant);
    - ``transient``: may succeed when retried (5xx, 429, a transient code);
    - ``failed``: anything else; 502, the grant untouched.

    ``detail`` is free text for the problem body and the log (never a token);
    ``code`` the provider's error code verbatim; ``notes`` what was read leniently (a
    malformed expiry), for the log.
    """

    outcome: Outcome
    reason: str | None  # None for success
    detail: str
    code: str | None = None
    tokens: TokenSet | None = None
    notes: tuple[str, ...] = field(default=())
    # success: the whole JSON answer, for grant values read from it (proxy.binding); it
    # holds the tokens too: never logged, never stored as such.
    response: Mapping[str, Any] | None = field(default=None, repr=False)


def read_token_response(dialect: TokenDialect, status: int, content_type: str | None,
                        body: bytes, *, grant: Grant, now: float) -> TokenAnswer:
    """Classify a token endpoint's answer (RFC 6749 sections 5.1, 5.2) by the dialect.

    Pure: the same answer always reads the same. The order:

    1. 5xx and 429 are ``transient``, whatever the body says (an outage never marks a
       grant dead);
    2. an error code (the first of ``token_errors.error_fields`` present, or a false
       ``success_field``), at any other HTTP status (GitHub and Slack answer errors with
       200), is looked up in ``reauth``, ``operator``, ``transient``; a code in none of
       them is ``failed``; another non-2xx without a code is ``failed``;
    3. a 2xx needs the user's token set at ``token_response.user_token_path`` (a refresh
       answer may carry it at the top level: the refresh token redeemed was the user's);
       a code exchange whose answer has only a top-level (app or bot) token is ``failed``
       with ``no_user_token``;
    4. a malformed expiry never discards the answer (it may carry a rotated refresh token):
       the expiry is unknown, then ``default_expires_in``, and a note says so.
    """
    errors = dialect.token_errors
    data = _parse_body(content_type, body)
    code = _error_code(data, errors.error_fields) if data is not None else None
    unsuccessful = (data is not None and errors.success_field is not None
                    and data.get(errors.success_field) is False)
    if status >= 500 or status == 429:
        # Whatever the body says: an outage must never mark grants dead (a failing
        # backend may well answer "invalid_grant" for a token it could not look up).
        said = f"HTTP {status}" + (f", {_printable(code)}" if code else "")
        return TokenAnswer("transient", "token_endpoint_unavailable", said, code)
    if code is not None or unsuccessful:
        return _classify_code(errors, code, status, data or {})
    if not 200 <= status < 300:
        return TokenAnswer("failed", "token_endpoint_error",
                           f"HTTP {status} without an error code")
    if data is None:
        return TokenAnswer("failed", "token_endpoint_error",
                           f"HTTP {status} with a body that is not a JSON object")
    answer = _token_set(dialect, data, grant=grant, now=now)
    return replace(answer, response=data) if answer.outcome == "success" else answer


def _classify_code(errors: TokenErrors, code: str | None, status: int,
                   data: Mapping[str, Any]) -> TokenAnswer:
    shown = _printable(code) if code is not None else f"{errors.success_field}: false"
    description = data.get("error_description") or data.get("message")
    said = f"HTTP {status}, {shown}"
    if isinstance(description, str) and description.strip():
        said += f": {_printable(description)[:200]}"
    kind = errors.kind_of(code) if code is not None else None
    if kind == "reauth":
        assert code is not None
        return TokenAnswer("reauth", reasons.from_provider_code(code), said, code)
    if kind == "operator":
        assert code is not None
        reason = reasons.from_provider_code(code)
        if reason not in reasons.REGISTRY:
            reason = "provider_misconfigured"
        return TokenAnswer("operator", reason, said, code)
    if kind == "transient":
        return TokenAnswer("transient", "token_endpoint_unavailable", said, code)
    return TokenAnswer("failed", "token_endpoint_error", said, code)


def _token_set(dialect: TokenDialect, data: Mapping[str, Any], *, grant: Grant,
               now: float) -> TokenAnswer:
    shape = dialect.token_response
    found: Any = _at_path(data, shape.user_token_path)
    if found is None and grant == "refresh_token":
        found = data  # a refresh answers for the token redeemed: the user's
        kind = data.get("token_type")
        if (shape.user_token_type is not None and shape.user_token_path
                and not (isinstance(kind, str) and kind.lower() == shape.user_token_type.lower())):
            return TokenAnswer("failed", "no_user_token",
                               f"the refresh answer's token is not a user token (token_type "
                               f"{_printable(str(kind))}, expected "
                               f"{shape.user_token_type}): never stored as a user's "
                               "credential")
    if not isinstance(found, Mapping) or not _nonempty_str(found.get("access_token")):
        if (shape.user_token_path and shape.require_user_token
                and _nonempty_str(data.get("access_token"))):
            where = ".".join(shape.user_token_path)
            return TokenAnswer("failed", "no_user_token",
                               f"the answer has no user token set at {where} (only an app or "
                               "bot token, which is never stored as a user's credential)")
        return TokenAnswer("failed", "token_endpoint_error",
                           "a 2xx answer without an access_token")
    notes: list[str] = []
    refresh = found.get(shape.refresh_token_field)
    if refresh is not None and not _nonempty_str(refresh):
        notes.append(f"{shape.refresh_token_field} is not a non-empty string: ignored")
        refresh = None
    token_type = found.get("token_type")
    if not isinstance(token_type, str) or not token_type:
        token_type = "Bearer"
    scope = found.get("scope")
    if isinstance(scope, list) and all(isinstance(s, str) for s in scope):
        scope = " ".join(scope)
    elif not isinstance(scope, str):
        if scope is not None:
            notes.append("scope is neither a string nor a list of strings: ignored")
        scope = None
    expires_at, note = read_expiry(found, now=now, default=dialect.default_expires_in)
    if note:
        notes.append(note)
    tokens = TokenSet(access_token=Secret(found["access_token"]),
                      refresh_token=Secret(refresh) if refresh else None,
                      token_type=token_type, expires_at=expires_at, scope=scope,
                      issued_at=now)
    return TokenAnswer("success", None, "token set received", tokens=tokens,
                       notes=tuple(notes))


_SECONDS = re.compile(r"[0-9]{1,10}(?:\.[0-9]{1,6})?")


def read_expiry(data: Mapping[str, Any], *, now: float,
                default: int | None) -> tuple[float | None, str | None]:
    """``(expires_at, note)`` from a token set: ``expires_in`` seconds (a JSON number, or a
    string of digits as some servers send), else a numeric ``expires_at`` (unix seconds).
    Missing: ``default`` seconds from now, else unknown. Malformed (``"3600abc"``, ``-5``,
    an ISO date in ``expires_at``): the same, plus a note naming what was wrong; the token
    set itself is kept (issue 13 fault 5)."""
    fallback = now + default if default is not None else None
    then = "default_expires_in" if default is not None else "unknown"
    value = data.get("expires_in")
    name = "expires_in"
    if value is None:
        value, name = data.get("expires_at"), "expires_at"
        if value is None:
            return fallback, None
    seconds = _seconds(value)
    if seconds is not None:
        return (now + seconds if name == "expires_in" else seconds), None
    return fallback, f"{name} {_printable(repr(value))[:40]} is not a usable expiry: {then}"


def _seconds(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value) if not isinstance(value, int) or abs(value) < 10**12 else math.inf
    elif isinstance(value, str) and _SECONDS.fullmatch(value.strip()):
        number = float(value)
    else:
        return None
    return number if math.isfinite(number) and number >= 0 else None


# ---------------------------------------------------------------------------------------
# Revoked-token signals in API responses
# ---------------------------------------------------------------------------------------

def api_signal(signals: ApiSignals, status: int, content_type: str | None,
               body: bytes) -> str | None:
    """The reason an API response says the user's token is dead, or None.

    Only small JSON bodies are examined (at most ``max_bytes``), at any status: Slack's
    Web API answers a revoked token with HTTP 200 ``{"ok": false, "error":
    "token_revoked"}``. With ``success_field`` set, only a body where it is ``false``
    counts. A match is to be answered like an upstream 401 (``reauth-required``)."""
    if not signals.reauth or len(body) > signals.max_bytes:
        return None
    if not is_json(content_type):
        return None
    data = _json_object(body)
    if data is None:
        return None
    if signals.success_field is not None and data.get(signals.success_field) is not False:
        return None
    code = _error_code(data, [signals.error_field])
    if code is None or not any(code.lower() == c.lower() for c in signals.reauth):
        return None
    return reasons.from_provider_code(code)


# ---------------------------------------------------------------------------------------
# Reading a revocation endpoint's answer
# ---------------------------------------------------------------------------------------

RevocationOutcome = Literal["revoked", "transient", "refused"]


def read_revocation_response(revocation: Revocation, status: int, content_type: str | None,
                             body: bytes) -> tuple[RevocationOutcome, str]:
    """``(outcome, detail)`` for one revocation call's answer.

    ``revoked``: a 2xx without an error code in its body (RFC 7009 section 2.2: 200 for
    revoked and unknown tokens alike; GitHub 204), except style ``slack``, revoked only
    when the JSON has ``ok: true`` and ``revoked: true``; or an error code (or status, as
    digits) in ``already_revoked``. ``transient``: 5xx, 429. ``refused``: anything else."""
    data = _parse_body(content_type, body)
    code = _error_code(data, ["error"]) if data is not None else None
    dead = {c.lower() for c in revocation.already_revoked}
    if (code is not None and code.lower() in dead) or str(status) in dead:
        return "revoked", f"already revoked (HTTP {status}{', ' + code if code else ''})"
    if 200 <= status < 300:
        if revocation.style != "slack":
            if code is not None:  # an error answered with a 2xx proves nothing was revoked
                return "refused", f"HTTP {status} with error {_printable(code)}"
            return "revoked", f"HTTP {status}"
        # Slack's auth.revoke says whether it revoked: {"ok": true, "revoked": true}
        # (https://api.slack.com/methods/auth.revoke); anything else is not proof.
        if data is not None and data.get("ok") is True and data.get("revoked") is True:
            return "revoked", f"HTTP {status}, ok: true, revoked: true"
        if data is not None and data.get("ok") is True:
            said = ("Slack answered revoked: false" if data.get("revoked") is False
                    else "Slack answered ok: true without revoked: true")
            return "refused", f"HTTP {status}, {said}"
        said = f"HTTP {status}, ok: {json.dumps(data.get('ok')) if data else 'missing'}"
        return "refused", said + (f", {_printable(code)}" if code else "")
    if status >= 500 or status == 429:
        return "transient", f"HTTP {status}"
    return "refused", f"HTTP {status}" + (f" {_printable(code)}" if code else "")


# ---------------------------------------------------------------------------------------
# Shared readers
# ---------------------------------------------------------------------------------------

def is_json(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` is JSON (``application/json`` or ``*+json``, any
    parameters)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _parse_body(content_type: str | None, body: bytes) -> dict[str, Any] | None:
    """The answer as a JSON object; a form-encoded answer (GitHub without ``Accept``) as a
    dict of strings; anything else None."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/x-www-form-urlencoded":
        try:
            return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except (UnicodeDecodeError, ValueError):
            return None
    return _json_object(body)


def _error_code(data: Mapping[str, Any], fields: Sequence[str]) -> str | None:
    """The first of ``fields`` holding a non-empty string, or an object with a ``.tag``
    (Dropbox's error unions: ``{"error": {".tag": "invalid_access_token"}}``)."""
    for name in fields:
        value = data.get(name)
        if isinstance(value, Mapping):
            value = value.get(".tag")
        if isinstance(value, str) and value.strip():
            return value.strip()[:128]
    return None


def _at_path(data: Mapping[str, Any], path: Sequence[str]) -> Any:
    node: Any = data
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _nonempty_str(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


# ---------------------------------------------------------------------------------------
# The built-in catalog
# ---------------------------------------------------------------------------------------

# Keys a catalog file may have besides a provider entry's: for listings only.
CATALOG_ONLY_KEYS: Final = frozenset({"title"})
# Keys whose text may use {parameter} placeholders.
_TEMPLATED = ("authorize_url", "token_url", "revocation_url", "connect_url")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A parameter value ends up inside a host name or a URL: a DNS-ish token only (no
# wildcard, no path, no user info, no port).
_PARAMETER_VALUE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")
_CATALOG_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

Catalog = Traversable | Path


def builtin_catalog() -> Traversable:
    """The catalog shipped in the package: ``proxy/catalog/*.yaml``."""
    return resources.files("proxy").joinpath("catalog")


def catalog_ids(catalog: Catalog | None = None) -> list[str]:
    """The ids of the catalog's entries, sorted (empty when it has none)."""
    root = catalog if catalog is not None else builtin_catalog()
    if not root.is_dir():
        return []
    return sorted(entry.name.removesuffix(".yaml") for entry in _yaml_files(root))


def _yaml_files(root: Catalog) -> Iterator[Traversable]:
    for entry in root.iterdir():
        stem = entry.name.removesuffix(".yaml")
        if entry.name.endswith(".yaml") and entry.is_file() and _CATALOG_ID.fullmatch(stem):
            yield entry


def load_catalog_entry(catalog_id: str, catalog: Catalog | None = None) -> dict[str, Any]:
    """The catalog entry ``catalog_id`` as a plain mapping (its ``title`` included).
    Raises :class:`ConfigError` listing the known ids when there is no such entry."""
    root = catalog if catalog is not None else builtin_catalog()
    known = catalog_ids(root)
    if catalog_id not in known:
        listed = ", ".join(known) if known else "none (the catalog is empty)"
        raise ConfigError(f"unknown catalog provider {catalog_id!r}; known: {listed}")
    source = root.joinpath(f"{catalog_id}.yaml")
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"catalog entry {catalog_id!r} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"catalog entry {catalog_id!r} is not a mapping")
    return data


def expand_provider(entry: Mapping[str, Any], *, where: str,
                    catalog: Catalog | None = None) -> dict[str, Any]:
    """A provider entry as written by a user, completed from the catalog.

    With ``provider: <id>``: the catalog entry, with the user's entry merged over it (the
    user wins; nested mappings are merged key by key, lists replaced whole), ``id``
    defaulting to the catalog id. Then ``{name}`` placeholders in the URLs and hosts are
    filled from ``parameters`` (the catalog's defaults, then the user's) and
    ``{client_id}``. A host supplied by the catalog may never end up a wildcard: per-tenant
    hosts are a ``{parameter}`` the user sets, never ``*.my.salesforce.com`` (any tenant's
    host would get the user's token). An entry without ``provider`` is returned as given,
    filled in only when it has ``parameters``. Raises :class:`ConfigError` naming the key
    (``where`` is its place, e.g. ``providers[0]``)."""
    catalog_id = entry.get("provider")
    if catalog_id is None:
        if not entry.get("parameters"):
            return dict(entry)
        entry = dict(entry)
        return _fill(entry, where=where, catalog_hosts=False,
                     known=_placeholders(_templated_texts(entry)))
    if not isinstance(catalog_id, str):
        raise ConfigError(f"{where}.provider: must be a catalog id (a string)")
    try:
        base = load_catalog_entry(catalog_id, catalog)
    except ConfigError as exc:
        raise ConfigError(f"{where}.provider: {exc}") from None
    for key in CATALOG_ONLY_KEYS:
        base.pop(key, None)
    base.pop("provider", None)
    base.setdefault("id", catalog_id)
    user_hosts = entry.get("hosts")
    # A provider binding its grants to their tenant (grant_hosts, proxy.binding) takes a
    # wildcard as its ceiling: each grant's credential goes only to the grant's own hosts.
    binds = bool(entry.get("grant_hosts", base.get("grant_hosts")))
    if isinstance(user_hosts, list) and not binds and _per_tenant(base):
        for i, host in enumerate(user_hosts):
            if isinstance(host, str) and "*" in host:
                fix = ("keep the catalog's grant_hosts (each grant bound to its tenant), "
                       "or list your tenant's host" if base.get("grant_hosts") else
                       "list your tenant's host, or set the catalog entry's parameter")
                raise ConfigError(
                    f"{where}.hosts[{i}]: {host!r} is a wildcard over a per-tenant provider "
                    f"({catalog_id}) without grant_hosts: any tenant's host would get the "
                    f"user's token; {fix}")
    merged = _merge(base, entry)
    _refuse_unbound_resource_wildcards(base, entry, merged, where=where,
                                       catalog_id=catalog_id)
    # The names the catalog entry itself takes (its placeholders, its defaults): a user's
    # override of a URL may leave one unused, but a name outside these is a typo.
    known = _placeholders(_templated_texts(base)) | set(base.get("parameters") or {})
    return _fill(merged, where=where, catalog_hosts="hosts" not in entry and not binds,
                 known=known)


def _per_tenant(unit: Mapping[str, Any]) -> bool:
    """Whether a catalog provider or resource is per tenant: it binds grants to their
    tenant (``grant_hosts``) or names its host by a ``{parameter}``."""
    hosts = unit.get("hosts")
    return bool(unit.get("grant_hosts")) or (
        isinstance(hosts, list) and any(_PLACEHOLDER.search(str(h)) for h in hosts))


def _refuse_unbound_resource_wildcards(base: Mapping[str, Any], entry: Mapping[str, Any],
                                       merged: Mapping[str, Any], *, where: str,
                                       catalog_id: str) -> None:
    """A catalog resource the user's entry leaves without ``grant_hosts`` never routes a
    wildcard the catalog gave it, nor one the user gave a per-tenant resource: any
    tenant's host would get the user's token (the provider's own hosts: see
    :func:`expand_provider`). Raises :class:`ConfigError`."""
    resources, bases = merged.get("resources"), base.get("resources")
    users = entry.get("resources")
    if not isinstance(resources, Mapping) or not isinstance(bases, Mapping):
        return
    for rid, r in resources.items():
        base_r, user_r = bases.get(rid), users.get(rid) if isinstance(users, Mapping) else None
        if not isinstance(r, Mapping) or not isinstance(base_r, Mapping) or r.get("grant_hosts"):
            continue
        if isinstance(user_r, Mapping) and "hosts" in user_r and not _per_tenant(base_r):
            continue
        hosts = r.get("hosts")
        for i, host in enumerate(hosts if isinstance(hosts, list) else []):
            if isinstance(host, str) and "*" in host:
                raise ConfigError(
                    f"{where}.resources.{rid}.hosts[{i}]: {host!r} is a wildcard over a "
                    f"per-tenant resource ({catalog_id}) without grant_hosts: any tenant's "
                    "host would get the user's token; keep its grant_hosts, or list your "
                    "tenant's host")


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _placeholders(texts: list[tuple[str, object]]) -> set[str]:
    return {name for _, text in texts if isinstance(text, str)
            for name in _PLACEHOLDER.findall(text)}


def _fill(entry: dict[str, Any], *, where: str, catalog_hosts: bool,
          known: set[str]) -> dict[str, Any]:
    """``entry`` with its ``{name}`` placeholders filled (see :func:`expand_provider`).
    A parameter outside ``known`` is refused (a misspelt name)."""
    values = _parameter_values(entry, where)
    grant_values = entry.get("grant_values")
    per_grant = set(grant_values) if isinstance(grant_values, Mapping) else set()
    clash = sorted(per_grant & set(entry.get("parameters") or {}))
    if clash:
        raise ConfigError(f"{where}.parameters: {clash} are also grant_values; a name is "
                          "either set in the file (parameters) or read per grant")
    texts = _templated_texts(entry)
    _require_parameters(texts, values, where, per_grant=per_grant)
    unknown = sorted(set(entry.get("parameters") or {}) - known)
    if unknown:
        raise ConfigError(f"{where}.parameters: {unknown} {'is' if len(unknown) == 1 else 'are'}"
                          f" used nowhere in this provider's URLs or hosts (it takes "
                          f"{sorted(known - {'client_id'}) or 'no parameters'}): a misspelt "
                          "name would leave the default in place")

    def fill(text: object) -> object:
        if not isinstance(text, str):
            return text
        # A grant value's placeholder stays: it is filled per grant (proxy.binding).
        return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)

    def fill_all(texts: object) -> object:
        return [fill(t) for t in texts] if isinstance(texts, list) else texts

    for key in _TEMPLATED:
        if key in entry:
            entry[key] = fill(entry[key])
    if "grant_hosts" in entry:
        entry["grant_hosts"] = fill_all(entry["grant_hosts"])
    resources = entry.get("resources")
    if isinstance(resources, Mapping):
        entry["resources"] = {
            rid: {**r, **{k: fill_all(r[k]) for k in ("hosts", "grant_hosts", "scopes")
                          if k in r}} if isinstance(r, Mapping) else r
            for rid, r in resources.items()}
    if isinstance(grant_values, Mapping):
        entry["grant_values"] = {
            name: {**v, "url": fill(v["url"])} if isinstance(v, Mapping) and "url" in v else v
            for name, v in grant_values.items()}
    revocation = entry.get("revocation")
    if isinstance(revocation, Mapping) and "console_url" in revocation:
        entry["revocation"] = {**revocation, "console_url": fill(revocation["console_url"])}
    hosts = entry.get("hosts")
    if isinstance(hosts, list):
        entry["hosts"] = [fill(h) for h in hosts]
        for i, host in enumerate(entry["hosts"]):
            if catalog_hosts and isinstance(host, str) and "*" in host:
                raise ConfigError(
                    f"{where}.hosts[{i}]: the catalog entry would route {host!r}, a "
                    "wildcard (any tenant's host would get the user's token); list your "
                    "tenant's host under hosts, or set its parameter")
    return entry


def _parameter_values(entry: Mapping[str, Any], where: str) -> dict[str, str]:
    params = entry.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}.parameters: must be a mapping of names to strings")
    values: dict[str, str] = {}
    for name, value in params.items():
        if not isinstance(value, str) or not _PARAMETER_VALUE.fullmatch(value):
            raise ConfigError(f"{where}.parameters.{name}: must be a host label or tenant id "
                              "(letters, digits, '.', '-', '_'; no wildcard, '/', ':' or '@')")
        values[str(name)] = value
    client_id = entry.get("client_id")
    if isinstance(client_id, str) and "client_id" not in values:
        values["client_id"] = client_id
    return values


def _templated_texts(entry: Mapping[str, Any]) -> list[tuple[str, object]]:
    """(key, text) of every value that may hold placeholders."""
    texts: list[tuple[str, object]] = [(k, entry[k]) for k in _TEMPLATED if k in entry]
    revocation = entry.get("revocation")
    if isinstance(revocation, Mapping) and "console_url" in revocation:
        texts.append(("revocation.console_url", revocation["console_url"]))
    hosts = entry.get("hosts")
    if isinstance(hosts, list):
        texts += [(f"hosts[{i}]", h) for i, h in enumerate(hosts)]
    grant_hosts = entry.get("grant_hosts")
    if isinstance(grant_hosts, list):
        texts += [(f"grant_hosts[{i}]", h) for i, h in enumerate(grant_hosts)]
    resources = entry.get("resources")
    if isinstance(resources, Mapping):
        for rid, r in resources.items():
            for key in ("hosts", "grant_hosts", "scopes"):
                items = r.get(key) if isinstance(r, Mapping) else None
                if isinstance(items, list):
                    texts += [(f"resources.{rid}.{key}[{i}]", t) for i, t in enumerate(items)]
    grant_values = entry.get("grant_values")
    if isinstance(grant_values, Mapping):
        texts += [(f"grant_values.{name}.url", v["url"]) for name, v in grant_values.items()
                  if isinstance(v, Mapping) and "url" in v]
    return texts


def _require_parameters(texts: list[tuple[str, object]], values: Mapping[str, str],
                        where: str, *, per_grant: Collection[str] = ()) -> None:
    """One error naming every parameter the texts use and ``values`` lacks, and where
    (``per_grant``: grant value names, filled per grant, never missing here)."""
    missing: dict[str, list[str]] = {}
    for key, text in texts:
        for name in _PLACEHOLDER.findall(text) if isinstance(text, str) else ():
            if name not in values and name not in per_grant:
                missing.setdefault(name, []).append(key)
    if missing:
        needed = "; ".join(f"{name!r} (used in {', '.join(keys)})"
                           for name, keys in sorted(missing.items()))
        raise ConfigError(f"{where}.parameters: this provider needs {needed}: set "
                          f"{'it' if len(missing) == 1 else 'them'} under parameters")


def describe_catalog(catalog: Catalog | None = None) -> list[dict[str, Any]]:
    """One line of facts per catalog entry, for ``credproxy providers``: id, title, hosts,
    the parameters it needs (``{name}`` placeholders without a default) and its
    revocation style. Entries that cannot be read are listed with an ``error``."""
    out: list[dict[str, Any]] = []
    for catalog_id in catalog_ids(catalog):
        try:
            data = load_catalog_entry(catalog_id, catalog)
        except ConfigError as exc:
            out.append({"id": catalog_id, "error": str(exc)})
            continue
        defaults = data.get("parameters") or {}
        texts = [str(data.get(k, "")) for k in _TEMPLATED] + [
            str(h) for h in data.get("hosts") or []]
        needed = sorted({m for t in texts for m in _PLACEHOLDER.findall(t)}
                        - set(defaults) - {"client_id"} - set(data.get("grant_values") or {}))
        revocation = data.get("revocation") or {}
        out.append({"id": catalog_id, "title": data.get("title", catalog_id),
                    "hosts": list(data.get("hosts") or []), "parameters": needed,
                    "grant_values": sorted(data.get("grant_values") or {}),
                    "grant_hosts": list(data.get("grant_hosts") or []),
                    "parameter_defaults": dict(defaults),
                    "revocation": revocation.get("style", "rfc7009")
                    if isinstance(revocation, Mapping) else "rfc7009"})
    return out
