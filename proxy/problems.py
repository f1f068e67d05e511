"""RFC 9457 problem responses for every refusal the proxy answers itself."""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import quote

from proxy.errors import ProxyRefusal

PROBLEM_PREFIX = "urn:credproxy:problem:"
ERROR_HEADER = "X-Credproxy-Error"


@dataclass(frozen=True, slots=True)
class ProblemResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def problem_response(error: ProxyRefusal, *, request_id: str | None = None) -> ProblemResponse:
    """The response for ``error``. Details never contain tokens: refusals are built from
    fixed text and identifiers only."""
    body: dict[str, object] = {
        "type": PROBLEM_PREFIX + error.slug,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
    }
    if request_id:
        body["instance"] = f"urn:credproxy:request:{request_id}"
    body.update(error.extra())
    headers = {
        "Content-Type": "application/problem+json",
        "Cache-Control": "no-store",
        ERROR_HEADER: error.slug,
        **error.headers(),
    }
    return ProblemResponse(error.status, headers, json.dumps(body).encode())


# gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html) for the HTTP
# status of a refusal. A gRPC client reports any HTTP status but 200 as UNKNOWN or
# UNAVAILABLE ("HTTP to gRPC Status Code Mapping",
# https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md), so it gets the
# status the problem means instead.
GRPC_INVALID_ARGUMENT = 3
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16
_GRPC_FOR_STATUS = {
    401: GRPC_UNAUTHENTICATED,  # reauth-required
    407: GRPC_UNAUTHENTICATED,  # user-context-missing / -invalid
    403: GRPC_PERMISSION_DENIED,  # provider-not-permitted, unrouted-denied
    421: GRPC_PERMISSION_DENIED,  # misdirected-request
    429: GRPC_RESOURCE_EXHAUSTED,
    500: GRPC_INTERNAL,
    502: GRPC_UNAVAILABLE,  # upstream-unreachable, token-refresh-failed
    503: GRPC_UNAVAILABLE,  # credential-store-unavailable, audit-unavailable
    504: GRPC_UNAVAILABLE,
}
# grpc-message is percent-encoded: every byte outside printable ASCII, and "%" itself
# (gRPC over HTTP/2, "Responses": https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md).
_GRPC_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def is_grpc(content_type: str) -> bool:
    """Whether a request's ``Content-Type`` is gRPC's (``application/grpc``, ``+proto``,
    ``+json``, ``application/grpc-web...``), case-insensitive."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/grpc" or media.startswith(("application/grpc+",
                                                           "application/grpc-web"))


def grpc_status(error: ProxyRefusal) -> int:
    """The gRPC status code that stands for ``error``: 401/407 UNAUTHENTICATED, 403/421
    PERMISSION_DENIED, 429 RESOURCE_EXHAUSTED, 500 INTERNAL, 502/503/504 UNAVAILABLE, any
    other 4xx INVALID_ARGUMENT."""
    return _GRPC_FOR_STATUS.get(error.status, GRPC_INVALID_ARGUMENT if error.status < 500
                                else GRPC_INTERNAL)


def grpc_response(error: ProxyRefusal, content_type: str, *,
                  request_id: str | None = None) -> ProblemResponse:
    """``error`` as a gRPC "Trailers-Only" response (HTTP 200, no body, ``grpc-status`` and
    ``grpc-message`` in the header section: PROTOCOL-HTTP2.md above), so a gRPC client
    reports the status the problem means, with ``grpc-message`` = ``"<slug>: <detail>"``
    (percent-encoded) and the request id. ``content_type`` is the request's, echoed
    without parameters. ``X-Credproxy-Error`` and the refusal's own headers
    (``WWW-Authenticate``, ``Retry-After``) are kept."""
    message = f"{error.slug}: {error.detail}"
    if request_id:
        message += f" (request {request_id})"
    headers = {
        "Content-Type": content_type.split(";", 1)[0].strip().lower(),
        "grpc-status": str(grpc_status(error)),
        "grpc-message": quote(message, safe=_GRPC_MESSAGE_SAFE),
        "Cache-Control": "no-store",
        ERROR_HEADER: error.slug,
        **error.headers(),
    }
    return ProblemResponse(200, headers, b"")


def refusal_response(error: ProxyRefusal, *, request_id: str | None = None,
                     content_type: str = "") -> ProblemResponse:
    """The answer to a refused request in the client's own protocol: a gRPC status for a
    gRPC request (:func:`grpc_response`), else the RFC 9457 problem
    (:func:`problem_response`; an SSE client, ``Accept: text/event-stream``, gets that too:
    SSE has no error format of its own)."""
    if is_grpc(content_type):
        return grpc_response(error, content_type, request_id=request_id)
    return problem_response(error, request_id=request_id)
