"""The self-service page's pieces that are not HTTP: its session, its connection ids and its
HTML (the admin server serves it: proxy/admin.py, ``/connections``; README "The
self-service page").

- :class:`Sessions` seals a session (user, the providers the handed-over user context
  permits, a CSRF token, an expiry) into a cookie value with AES-GCM under a key derived
  from the vault key (as the connect flow's state is sealed), so any replica sharing the
  vault key reads it and nothing is stored server-side. A cookie that is altered, sealed
  under another key, or past its expiry reads as no session.
- A connection is named in forms by an opaque id, a keyed hash of (user, provider) under
  the same key: a user's page never holds another user's ids, and an id posted by someone
  else names no connection of theirs.
- :func:`render` writes plain HTML: one section per provider, each with a definition list
  (account, status, granted scopes, expiry, last used) and its forms. Every control has a
  visible ``<label>`` (or is a button whose text names its action and provider), the
  document order is the focus order, and notices are ``role="status"`` / ``role="alert"``;
  no script.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SESSION_COOKIE = "credproxy_session"
_AAD = b"credproxy self-service session v1"


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in page user. ``providers``: those the handed-over context permits (None:
    all); ``csrf``: the token every form of this session carries; ``expires_at``: unix
    seconds."""

    user: str
    providers: frozenset[str] | None
    csrf: str
    expires_at: float

    def permits(self, provider: str) -> bool:
        return self.providers is None or provider in self.providers


class Sessions:
    def __init__(self, key: bytes) -> None:
        """``key``: 32 bytes (a subkey of the vault key, ``derive_subkey(key, "credproxy
        self-service session")``)."""
        self._aead = AESGCM(key)
        self._id_key = hashlib.sha256(b"credproxy connection id\x00" + key).digest()

    def new(self, user: str, providers: frozenset[str] | None, *, ttl: float,
            now: float) -> tuple[Session, str]:
        """A fresh session for ``user`` lasting ``ttl`` seconds, and its cookie value."""
        session = Session(user, providers, secrets.token_urlsafe(32), now + ttl)
        record = {"u": user, "p": sorted(providers) if providers is not None else None,
                  "x": session.csrf, "e": session.expires_at}
        nonce = secrets.token_bytes(12)
        sealed = nonce + self._aead.encrypt(nonce, json.dumps(record).encode(), _AAD)
        return session, base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def read(self, cookie: str | None, *, now: float) -> Session | None:
        """The session a cookie value holds; None when it is missing, altered, sealed
        under another key, malformed or expired."""
        if not cookie or len(cookie) > 4096:
            return None
        try:
            blob = base64.urlsafe_b64decode(cookie + "=" * (-len(cookie) % 4))
            rec = json.loads(self._aead.decrypt(blob[:12], blob[12:], _AAD))
        except (InvalidTag, ValueError):
            return None
        if not isinstance(rec, dict):
            return None
        user, providers, csrf, expires = rec.get("u"), rec.get("p"), rec.get("x"), rec.get("e")
        if not (isinstance(user, str) and user and isinstance(csrf, str) and csrf
                and isinstance(expires, int | float) and expires > now
                and (providers is None or (isinstance(providers, list)
                                           and all(isinstance(p, str) for p in providers)))):
            return None
        return Session(user, frozenset(providers) if providers is not None else None, csrf,
                       float(expires))

    def connection_id(self, user: str, provider: str) -> str:
        """The opaque id of ``user``'s connection to ``provider`` in forms: ``c`` and 24
        hex characters of HMAC-SHA256 under a subkey of the session key."""
        mac = hmac.new(self._id_key, json.dumps([user, provider]).encode(), hashlib.sha256)
        return "c" + mac.hexdigest()[:24]

    @staticmethod
    def csrf_ok(session: Session, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(session.csrf.encode(),
                                                         given.encode())


@dataclass(frozen=True, slots=True)
class Row:
    """One provider on the page (never a token value). ``status``: ``active``,
    ``reauth_required``, ``corrupt`` or ``not_connected``; ``expires_at`` / ``last_used``:
    unix seconds or None; ``checked``: the scopes ticked in its connect form (the granted
    ones, else the defaults); ``choices``: (parameter, label, current value) of the grant
    values a connect asks the user for (docs/tenants.md)."""

    provider: str
    connection_id: str
    account: str | None
    status: str
    reason: str | None
    scope: str | None
    expires_at: float | None
    last_used: float | None
    ceiling: Sequence[str]
    required: Sequence[str]
    checked: Sequence[str]
    missing: Sequence[str]
    choices: Sequence[tuple[str, str]]


_STATUS = {"active": "Connected", "reauth_required": "Needs reconnecting",
           "corrupt": "Damaged record (disconnect it)", "not_connected": "Not connected",
           "suspended": "Suspended"}


def _when(at: float | None) -> str:
    if at is None:
        return "unknown"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
    return f'<time datetime="{time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))}">{stamp}</time>'


def _row(row: Row, csrf: str) -> str:
    e = html.escape
    pid = e(row.provider)
    slug = "p-" + e(row.connection_id)
    status = _STATUS.get(row.status, row.status)
    if row.reason and row.status != "active":
        status += f" ({row.reason})"
    granted = e(row.scope) if row.scope else ("none" if row.status == "not_connected"
                                              else "unknown")
    missing = ""
    if row.missing:
        missing = (f'<p role="alert" class="warn">{pid} did not grant the required scopes '
                   f'{e(" ".join(row.missing))}: calls that need them will fail. Reconnect '
                   "and approve them.</p>")
    hidden = (f'<input type="hidden" name="csrf" value="{e(csrf)}">'
              f'<input type="hidden" name="connection" value="{e(row.connection_id)}">')
    boxes = []
    for i, scope in enumerate(row.ceiling):
        box = f"{slug}-s{i}"
        tick = " checked" if scope in row.checked else ""
        note = " (required)" if scope in row.required else ""
        boxes.append(f'<div><input type="checkbox" id="{box}" name="scope" '
                     f'value="{e(scope)}"{tick}> <label for="{box}">{e(scope)}{note}'
                     "</label></div>")
    fields = []
    for i, (param, value) in enumerate(row.choices):
        field = f"{slug}-v{i}"
        fields.append(f'<div><label for="{field}">{e(param)}</label> <input type="text" '
                      f'id="{field}" name="value:{e(param)}" value="{e(value)}"></div>')
    scopes = (f'<fieldset><legend>Scopes to allow for {pid}</legend>{"".join(boxes)}'
              "</fieldset>") if boxes else ""
    verb = "Connect" if row.status == "not_connected" else "Reconnect"
    connect = (f'<form method="post" action="/connections/connect">{hidden}{scopes}'
               f'{"".join(fields)}<button type="submit">{verb} {pid}</button></form>')
    disconnect = ""
    if row.status != "not_connected":
        disconnect = (f'<form method="post" action="/connections/disconnect">{hidden}'
                      f'<button type="submit">Disconnect {pid}</button></form>')
    return (f'<section aria-labelledby="{slug}-h"><h2 id="{slug}-h">{pid}</h2>{missing}'
            f"<dl><dt>Account</dt><dd>{e(row.account) if row.account else 'unknown'}</dd>"
            f"<dt>Status</dt><dd>{e(status)}</dd>"
            f"<dt>Granted scopes</dt><dd>{granted}</dd>"
            f"<dt>Expires</dt><dd>{_when(row.expires_at)}</dd>"
            f"<dt>Last used</dt><dd>{_when(row.last_used) if row.last_used else 'never'}"
            f"</dd></dl>{connect}{disconnect}</section>")


def render(user: str, rows: Sequence[Row], csrf: str, *,
           notice: str | None = None, alert: str | None = None) -> str:
    """The page for ``user``: ``notice`` (a done action) and ``alert`` (a refused one) are
    announced to screen readers."""
    e = html.escape
    top = ""
    if notice:
        top += f'<p role="status">{e(notice)}</p>'
    if alert:
        top += f'<p role="alert">{e(alert)}</p>'
    body = "".join(_row(r, csrf) for r in rows) or "<p>No providers are available to you.</p>"
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            "<title>Your connections</title><style>body{font-family:sans-serif;"
            "max-width:48rem;margin:1rem auto;padding:0 1rem}section{border-top:1px solid "
            "#888;margin-top:1rem}dt{font-weight:bold}.warn,[role=alert]{color:#a00}"
            "button{margin:.25rem 0}:focus{outline:3px solid #1a5fb4}</style></head><body>"
            f"<main><h1>Your connections</h1><p>Signed in as {e(user)}.</p>{top}{body}"
            "</main></body></html>")


def message_page(title: str, text: str, *, link: tuple[str, str] | None = None,
                 refresh: str | None = None) -> str:
    """A short page: ``link`` (href, text) to go on; ``refresh``: a same-site URL to load
    at once (a meta refresh, so the next request is same-site and carries a
    ``SameSite=Strict`` cookie)."""
    e = html.escape
    meta = f"<meta http-equiv='refresh' content='0;url={e(refresh)}'>" if refresh else ""
    more = f'<p><a href="{e(link[0])}">{e(link[1])}</a></p>' if link else ""
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>{meta}"
            f"<title>{e(title)}</title></head><body><main><h1>{e(title)}</h1>"
            f"<p>{e(text)}</p>{more}</main></body></html>")


def choices_of(form: Mapping[str, str]) -> dict[str, str]:
    """The grant-value choices of a connect form (fields ``value:<param>``)."""
    return {k.removeprefix("value:"): v for k, v in form.items()
            if k.startswith("value:") and v}
