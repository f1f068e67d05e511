"""Reading MCP requests (Streamable HTTP) and answering refusals in their protocol.

MCP's Streamable HTTP transport (MCP specification, "Transports", revisions 2025-03-26 to
2026-07-28) sends every client message as an HTTP POST whose body is one JSON-RPC 2.0
message (a batch, a JSON array, only in 2025-03-26), with ``Accept`` listing
``application/json`` and ``text/event-stream``; after initialization the client adds
``Mcp-Session-Id`` and ``MCP-Protocol-Version``; revision 2026-07-28 also names the method
and the tool/resource in ``Mcp-Method`` / ``Mcp-Name``.

This module (no mitmproxy import) answers three questions about a request:

* :func:`may_be_mcp`: from the header section alone, whether the body must be read before
  the decision (a small, uncompressed JSON POST);
* :func:`read_call`: from the header section and that body, whether it is an MCP request and
  what it calls (:class:`McpCall`: method, tool/resource/prompt name, JSON-RPC id, protocol
  version). Never argument values: they may hold personal data;
* :func:`refusal_answer`: a refusal (:class:`proxy.errors.ProxyRefusal`) as the JSON-RPC
  error an MCP client understands.

Decisions (documented in README, "MCP servers"):

* A POST is MCP when its body is a JSON-RPC 2.0 message (``"jsonrpc": "2.0"`` and a
  string ``method``, a client's response, or a non-empty array of such) *and* the request
  says it speaks MCP: ``Accept`` lists ``text/event-stream``, or one of
  ``Mcp-Session-Id``, ``MCP-Protocol-Version``, ``Mcp-Method`` is present. A POST whose
  body was not read is MCP by those fields (or an ``Accept`` listing both
  ``application/json`` and ``text/event-stream``); a GET or DELETE only by
  ``Mcp-Session-Id`` / ``MCP-Protocol-Version`` (an SSE client's ``Accept`` is not MCP).
  Another JSON API keeps RFC 9457.
* The body, when read, names the call; header fields that disagree with it are a
  conflict (:attr:`McpCall.conflict`), which the sidecar refuses.
* Every refusal of an MCP request is a JSON-RPC error, not only ``reauth-required`` and
  ``insufficient-scope``: an MCP client turns any non-2xx answer to a request into an
  opaque transport error (and a 401 into its own OAuth dance against the server's
  authorization server), while a JSON-RPC error reaches the agent with its message and
  data. The HTTP status is 200.
* Error code: ``-32042`` (``URLElicitationRequiredError``, MCP 2025-11-25, "Elicitation",
  URL mode) for a refusal the user resolves at a connect URL (``reauth-required``,
  ``insufficient-scope``) when the request's protocol version is 2025-11-25, the one
  revision that defines it (2026-07-28 retired the code); its ``data.elicitations`` holds
  one URL elicitation with the connect URL. Otherwise ``-32010`` for those
  (:data:`CONSENT_REQUIRED`) and ``-32011`` (:data:`REFUSED`) for every other refusal:
  both in the JSON-RPC implementation-defined server-error range (-32000..-32099; MCP
  2026-07-28 leaves -32000..-32019 to implementations; the SDK uses -32000 and -32001).
* ``data`` always carries ``type`` (the problem type URI), ``slug``, ``status`` (the HTTP
  status the problem would have had), ``reason`` and the problem's extension members
  (``provider``, ``connect_url``, ``scope``, ... where present).
* A notification or a client response (no ``id``): JSON-RPC has no answer for it; MCP says
  the server answers an HTTP error status, its body optionally a JSON-RPC error without an
  ``id``. So: the refusal's HTTP status, except 401, answered 403 (a 401 would start the
  client's OAuth dance), with that JSON-RPC error (``"id": null``) as the body.
* A batch: an array of error responses, one per request in it (notifications get none); a
  batch of notifications only is answered as one notification.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from proxy.errors import ProxyRefusal
from proxy.problems import ERROR_HEADER, PROBLEM_PREFIX

MAX_BODY: Final = 1024 * 1024
"""Bytes of a JSON POST body read before the decision to learn whether it is MCP and what it
calls (larger, compressed, chunked bodies, and those past ``stream_large_bodies``, stream as
before and are read from their header section only)."""

URL_ELICITATION_REQUIRED: Final = -32042
"""MCP 2025-11-25 ``URLElicitationRequiredError`` (retired in 2026-07-28)."""
URL_ELICITATION_VERSIONS: Final = frozenset({"2025-11-25"})
CONSENT_REQUIRED: Final = -32010
"""credproxy: the user must (re)connect at ``data.connect_url`` (no URL elicitation)."""
REFUSED: Final = -32011
"""credproxy: any other refusal (``data.slug`` says which)."""

_CONSENT_SLUGS: Final = frozenset({"reauth-required", "insufficient-scope"})
_JSON_TYPES: Final = ("application/json",)
_MCP_HEADERS: Final = ("mcp-session-id", "mcp-protocol-version", "mcp-method")
_MAX_NAME: Final = 256  # a tool/resource name longer than this is cut in the audit


@dataclass(frozen=True, slots=True)
class McpCall:
    """What an MCP request calls.

    ``method``: the JSON-RPC method (``"tools/call"``; ``"batch"`` for a batch;
    ``"response"`` for a client's JSON-RPC response); None for a transport request that
    carries no JSON-RPC message (the GET opening the server's event stream, the DELETE
    ending a session) or a POST whose body was not read and has no ``Mcp-Method``;
    ``name``: the tool (``tools/call``), resource URI without query or fragment
    (``resources/read``, ``.../subscribe``) or prompt (``prompts/get``) name, at most 256
    characters, else None; ``calls``: for a batch, the (method, name) of each message in
    it; ``ids``: the JSON-RPC ids of the request(s) to answer (empty for a notification,
    a client response, or a body not read); ``version``: the MCP protocol version
    (``MCP-Protocol-Version``, else ``initialize``'s ``params.protocolVersion``), or
    None; ``batch``: the body was a JSON array; ``conflict``: why the ``Mcp-Method`` /
    ``Mcp-Name`` header fields disagree with the body (the request is refused: a server
    routing by the fields would run another tool than the audit names), else None."""

    method: str | None
    name: str | None = None
    ids: tuple[str | int, ...] = ()
    version: str | None = None
    batch: bool = False
    calls: tuple[tuple[str, str | None], ...] = ()
    conflict: str | None = None


def _header(headers: Iterable[tuple[bytes, bytes]] | Mapping[str, str], name: str
            ) -> str | None:
    if isinstance(headers, Mapping):
        for key, value in headers.items():
            if key.lower() == name:
                return value
        return None
    for key, raw in headers:
        if key.decode("latin-1").lower() == name:
            return raw.decode("latin-1")
    return None


def may_be_mcp(method: str, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request with this method and header section (raw fields, as read) may be
    an MCP request whose body must be read before the decision: a POST with a JSON
    ``Content-Type``, no ``Content-Encoding`` and a ``Content-Length`` of at most
    :data:`MAX_BODY` bytes (the caller also checks the body is not streamed)."""
    fields = list(headers)
    if method.upper() != "POST":
        return False
    media = (_header(fields, "content-type") or "").split(";", 1)[0].strip().lower()
    if media not in _JSON_TYPES or _header(fields, "content-encoding"):
        return False
    length = (_header(fields, "content-length") or "").strip()
    return length.isdigit() and int(length) <= MAX_BODY


def _mcp_fields(fields: list[tuple[bytes, bytes]]) -> bool:
    return any(_header(fields, h) is not None for h in _MCP_HEADERS)


def _accepts_streamable(fields: list[tuple[bytes, bytes]]) -> bool:
    """``Accept`` lists both ``application/json`` and ``text/event-stream``: what every
    Streamable HTTP client POST must say (MCP "Transports", "Sending Messages")."""
    accept = (_header(fields, "accept") or "").lower()
    return "text/event-stream" in accept and "application/json" in accept


def _name(method: str, params: object) -> str | None:
    if not isinstance(params, dict):
        return None
    key = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri",
           "resources/subscribe": "uri", "resources/unsubscribe": "uri"}.get(method)
    value = params.get(key) if key else None
    return _clip(method, value) if isinstance(value, str) else None


def _clip(method: str, name: str) -> str:
    """``name`` as audited: a resource URI without its query or fragment (like a request
    path, they may carry personal data), at most 256 characters."""
    if method.startswith("resources/"):
        name = name.split("#", 1)[0].split("?", 1)[0]
    return name[:_MAX_NAME]


def _message(obj: object) -> tuple[str, str | None, str | int | None, object] | None:
    """(method, name, id, params) of one JSON-RPC 2.0 request or notification; a client's
    JSON-RPC response (``result`` or ``error`` with an ``id``) is method ``"response"``
    with no id to answer; None for anything else."""
    if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0":
        return None
    method = obj.get("method")
    if not isinstance(method, str):
        if "method" not in obj and "id" in obj and ("result" in obj or "error" in obj):
            return "response", None, None, None
        return None
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        rid = None
    params = obj.get("params")
    return method, _name(method, params), rid, params


def read_call(headers: Iterable[tuple[bytes, bytes]], body: bytes | None, *,
              method: str = "POST") -> McpCall | None:
    """The MCP call a request makes, or None when it is not an MCP request (see the module
    docstring). ``headers`` are the request's raw fields; ``body`` its whole body (None when
    it was not read: then only ``Mcp-Method`` / ``Mcp-Name`` can name the call, and no id is
    known); ``method`` the HTTP method. When the body was read it names the call, and
    ``Mcp-Method`` / ``Mcp-Name`` that disagree with it set :attr:`McpCall.conflict`."""
    fields = list(headers)
    version = _header(fields, "mcp-protocol-version")
    if method.upper() != "POST":
        # The GET of the server's event stream and the DELETE of a session: MCP only by the
        # fields only MCP clients send (an SSE client's Accept alone is not MCP).
        return McpCall(None, version=version) if _mcp_fields(fields) else None
    if not (_mcp_fields(fields) or "text/event-stream" in (
            _header(fields, "accept") or "").lower()):
        return None
    h_method, h_name = _header(fields, "mcp-method"), _header(fields, "mcp-name")
    parsed: object = None
    if body:
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            parsed = None
    if isinstance(parsed, list) and parsed:
        messages = [_message(m) for m in parsed]
        if any(m is None for m in messages):
            return None
        found = [m for m in messages if m is not None]
        ids = tuple(m[2] for m in found if m[2] is not None)
        return McpCall("batch", None, ids, version, batch=True,
                       calls=tuple((m[0], m[1]) for m in found),
                       conflict=("Mcp-Method on a batch" if h_method is not None
                                 else None))
    one = _message(parsed)
    if one is None:
        if h_method is not None:
            return McpCall(h_method, _clip(h_method, h_name) if h_name else None, (),
                           version)
        if body is None and (_mcp_fields(fields) or _accepts_streamable(fields)):
            # Not read (chunked, compressed, too large): MCP by its header fields.
            return McpCall(None, version=version)
        return None  # a body that is no JSON-RPC message: another API
    name_method, name, rid, params = one
    if version is None and name_method == "initialize" and isinstance(params, dict):
        offered = params.get("protocolVersion")
        version = offered if isinstance(offered, str) else None
    conflict = None
    if h_method is not None and h_method != name_method:
        conflict = f"Mcp-Method {h_method[:64]!r} but the body calls {name_method!r}"
    elif h_name is not None and name is not None and _clip(name_method, h_name) != name:
        conflict = f"Mcp-Name {h_name[:64]!r} but the body names {name!r}"
    return McpCall(name_method, name, () if rid is None else (rid,), version,
                   conflict=conflict)


@dataclass(frozen=True, slots=True)
class McpAnswer:
    """An HTTP answer: status, header fields, body."""

    status: int
    headers: dict[str, str]
    body: bytes


def error_object(refusal: ProxyRefusal, version: str | None) -> dict[str, object]:
    """The JSON-RPC ``error`` member for ``refusal`` (code, message = the problem's
    detail, data; see the module docstring)."""
    extra = refusal.extra()
    data: dict[str, object] = {"type": PROBLEM_PREFIX + refusal.slug, "slug": refusal.slug,
                               "status": refusal.status, **extra}
    connect_url = extra.get("connect_url")
    if refusal.slug in _CONSENT_SLUGS and isinstance(connect_url, str):
        if version in URL_ELICITATION_VERSIONS:
            # MCP 2025-11-25 "Elicitation": each elicitation has its own id.
            data["elicitations"] = [{"mode": "url", "message": refusal.detail,
                                     "url": connect_url,
                                     "elicitationId": f"credproxy-{secrets.token_hex(12)}"}]
            code = URL_ELICITATION_REQUIRED
        else:
            code = CONSENT_REQUIRED
    else:
        code = REFUSED
    return {"code": code, "message": refusal.detail, "data": data}


def refusal_answer(refusal: ProxyRefusal, call: McpCall) -> McpAnswer:
    """``refusal`` answered to the MCP request ``call`` (see the module docstring): HTTP 200
    with one JSON-RPC error response per id (an array for a batch), or, with no id to
    answer, the refusal's status (401 as 403) with an error whose ``id`` is null."""
    error = error_object(refusal, call.version)
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store",
               ERROR_HEADER: refusal.slug}
    if not call.ids:
        body = {"jsonrpc": "2.0", "id": None, "error": error}
        status = 403 if refusal.status == 401 else refusal.status
        extra = {k: v for k, v in refusal.headers().items()
                 if k.lower() != "www-authenticate"}
        return McpAnswer(status, {**headers, **extra}, json.dumps(body).encode())
    answers = [{"jsonrpc": "2.0", "id": rid, "error": error} for rid in call.ids]
    payload: object = answers if call.batch else answers[0]
    return McpAnswer(200, headers, json.dumps(payload).encode())


__all__ = ["CONSENT_REQUIRED", "MAX_BODY", "REFUSED", "URL_ELICITATION_REQUIRED", "McpAnswer",
           "McpCall", "error_object", "may_be_mcp", "read_call", "refusal_answer"]
