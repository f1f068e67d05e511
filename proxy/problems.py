"""RFC 9457 problem responses for every refusal the proxy answers itself."""

from __future__ import annotations

import json
from dataclasses import dataclass

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
