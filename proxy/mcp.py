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

* A request is MCP when its body is a JSON-RPC 2.0 message (``"jsonrpc": "2.0"`` and a
  string ``method``, or a non-empty array of such) *and* the request says it speaks MCP:
  ``Accept`` lists ``text/event-stream``, or one of ``Mcp-Session-Id``,
  ``MCP-Protocol-Version``, ``Mcp-Method`` is present. Another JSON API keeps RFC 9457.
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from proxy.errors import ProxyRefusal
from proxy.problems import ERROR_HEADER, PROBLEM_PREFIX

MAX_BODY: Final = 64 * 1024
"""Bytes of a request body read before the decision to learn whether it is MCP (larger or
compressed bodies stream as before and are read from their headers only)."""

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

    ``method``: the JSON-RPC method (``"tools/call"``; ``"batch"`` for a batch);
    ``name``: the tool (``tools/call``), resource URI without query or fragment
    (``resources/read``, ``.../subscribe``) or prompt (``prompts/get``) name, at most 256
    characters, else None; ``ids``: the JSON-RPC ids of the request(s)
    to answer (empty for a notification or a client response); ``version``: the MCP
    protocol version (``MCP-Protocol-Version``, else ``initialize``'s
    ``params.protocolVersion``), or None; ``batch``: the body was a JSON array."""

    method: str
    name: str | None = None
    ids: tuple[str | int, ...] = ()
    version: str | None = None
    batch: bool = False


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
    :data:`MAX_BODY` bytes."""
    fields = list(headers)
    if method.upper() != "POST":
        return False
    media = (_header(fields, "content-type") or "").split(";", 1)[0].strip().lower()
    if media not in _JSON_TYPES or _header(fields, "content-encoding"):
        return False
    length = (_header(fields, "content-length") or "").strip()
    return length.isdigit() and int(length) <= MAX_BODY


def _speaks_mcp(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    fields = list(headers)
    if any(_header(fields, h) is not None for h in _MCP_HEADERS):
        return True
    accept = (_header(fields, "accept") or "").lower()
    return "text/event-stream" in accept


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
    """(method, name, id, params) of one JSON-RPC 2.0 request or notification, None for
    anything else."""
    if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0":
        return None
    method = obj.get("method")
    if not isinstance(method, str):
        return None
    rid = obj.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        rid = None
    params = obj.get("params")
    return method, _name(method, params), rid, params


def read_call(headers: Iterable[tuple[bytes, bytes]], body: bytes | None) -> McpCall | None:
    """The MCP call a request makes, or None when it is not an MCP request (see the module
    docstring). ``headers`` are the request's raw fields; ``body`` its whole body (None when
    it was not read: then only ``Mcp-Method`` / ``Mcp-Name`` can name the call, and no id is
    known). ``Mcp-Method`` / ``Mcp-Name`` win over the body for the method and name."""
    fields = list(headers)
    if not _speaks_mcp(fields):
        return None
    version = _header(fields, "mcp-protocol-version")
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
        ids = tuple(m[2] for m in messages if m is not None and m[2] is not None)
        method = h_method or "batch"
        return McpCall(method, _clip(method, h_name) if h_name else None, ids, version,
                       batch=True)
    one = _message(parsed)
    if one is None:
        if h_method is None:
            return None
        return McpCall(h_method, _clip(h_method, h_name) if h_name else None, (), version)
    method, name, rid, params = one
    if version is None and method == "initialize" and isinstance(params, dict):
        offered = params.get("protocolVersion")
        version = offered if isinstance(offered, str) else None
    method = h_method or method
    return McpCall(method, _clip(method, h_name) if h_name else name,
                   () if rid is None else (rid,), version)


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
            data["elicitations"] = [{"mode": "url", "message": refusal.detail,
                                     "url": connect_url,
                                     "elicitationId": f"credproxy-{refusal.slug}"}]
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
