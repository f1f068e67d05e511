"""RFC 9457 problem responses (proxy.problems) for every refusal class."""

from __future__ import annotations

import json
import re

import pytest

from proxy.errors import (
    AuditUnavailable,
    CredentialStoreUnavailable,
    InternalError,
    MisdirectedRequest,
    ProviderMisconfigured,
    ProviderNotPermitted,
    ProxyRefusal,
    ReauthRequired,
    TokenRefreshFailed,
    UnroutedDenied,
    UserContextInvalid,
    UserContextMissing,
)
from proxy.problems import ERROR_HEADER, PROBLEM_PREFIX, problem_response

REFUSALS = [
    pytest.param(UserContextMissing("no context", reason="missing"), 407,
                 "user-context-missing", {"Proxy-Authenticate": 'Bearer realm="credproxy"'},
                 id="user-context-missing"),
    pytest.param(UserContextInvalid("expired", reason="expired"), 407, "user-context-invalid",
                 {"Proxy-Authenticate": 'Bearer realm="credproxy"'}, id="user-context-invalid"),
    pytest.param(MisdirectedRequest("host mismatch"), 421, "misdirected-request", {},
                 id="misdirected-request"),
    pytest.param(ProviderNotPermitted("not for you"), 403, "provider-not-permitted", {},
                 id="provider-not-permitted"),
    pytest.param(UnroutedDenied("unrouted"), 403, "unrouted-denied", {}, id="unrouted-denied"),
    pytest.param(ReauthRequired("re-authorize", reason="invalid_grant", provider="docs",
                                connect_url="https://proxy/connect/docs"),
                 401, "reauth-required",
                 {"WWW-Authenticate": 'Bearer realm="credproxy", error="invalid_token", '
                                      'error_description="the user must re-authorize docs '
                                      '(invalid_grant); see connect_url"'},
                 id="reauth-required"),
    pytest.param(TokenRefreshFailed("endpoint down"), 502, "token-refresh-failed", {},
                 id="token-refresh-failed"),
    pytest.param(TokenRefreshFailed("unclassified", retry_after=12), 502,
                 "token-refresh-failed", {"Retry-After": "12"}, id="token-refresh-failed-held"),
    pytest.param(ProviderMisconfigured("check providers[docs].client_id",
                                       reason="invalid_client"), 502,
                 "provider-misconfigured", {}, id="provider-misconfigured"),
    pytest.param(CredentialStoreUnavailable("vault down"), 503, "credential-store-unavailable",
                 {"Retry-After": "5"}, id="credential-store-unavailable"),
    pytest.param(CredentialStoreUnavailable("vault down", retry_after=30), 503,
                 "credential-store-unavailable", {"Retry-After": "30"},
                 id="credential-store-unavailable-custom-retry"),
    pytest.param(AuditUnavailable("disk full"), 503, "audit-unavailable", {"Retry-After": "5"},
                 id="audit-unavailable"),
    pytest.param(InternalError("bug"), 500, "internal-error", {}, id="internal-error"),
]


@pytest.mark.parametrize(("error", "status", "slug", "extra_headers"), REFUSALS)
def test_problem_response(error: ProxyRefusal, status: int, slug: str,
                          extra_headers: dict[str, str]) -> None:
    resp = problem_response(error)
    assert resp.status == status
    assert resp.headers == {"Content-Type": "application/problem+json",
                            "Cache-Control": "no-store", ERROR_HEADER: slug, **extra_headers}
    body = json.loads(resp.body)
    assert body["type"] == f"urn:credproxy:problem:{slug}" == PROBLEM_PREFIX + slug
    assert body["title"] == error.title and isinstance(body["title"], str) and body["title"]
    assert body["status"] == status
    assert body["detail"] == error.detail
    assert body["reason"] == error.reason
    assert "instance" not in body


@pytest.mark.parametrize(("error", "status", "slug", "extra_headers"), REFUSALS)
def test_every_slug_and_title_is_distinct_per_class(error: ProxyRefusal, status: int, slug: str,
                                                    extra_headers: dict[str, str]) -> None:
    assert error.slug == slug and error.status == status
    others = [p.values[0] for p in REFUSALS if type(p.values[0]) is not type(error)]
    assert all(o.slug != slug for o in others)


def test_reason_defaults_to_the_slug_in_snake_case() -> None:
    # Reasons are one spelling, snake_case (proxy/reasons.py); slugs stay kebab-case (they
    # name the problem type URN).
    body = json.loads(problem_response(UnroutedDenied("x")).body)
    assert body["reason"] == "unrouted_denied" and body["type"].endswith(":unrouted-denied")


def test_reauth_required_names_provider_and_connect_url() -> None:
    error = ReauthRequired("the refresh token was revoked", reason="invalid_grant",
                           provider="docs", connect_url="https://proxy.example.com/connect/docs")
    body = json.loads(problem_response(error).body)
    assert body == {
        "type": "urn:credproxy:problem:reauth-required",
        "title": "The user must re-authorize this provider",
        "status": 401,
        "detail": "the refresh token was revoked",
        "reason": "invalid_grant",
        "provider": "docs",
        "connect_url": "https://proxy.example.com/connect/docs",
    }


def test_request_id_becomes_the_instance() -> None:
    body = json.loads(problem_response(MisdirectedRequest("x"), request_id="r-123").body)
    assert body["instance"] == "urn:credproxy:request:r-123"


def test_body_is_json_even_with_unusual_detail() -> None:
    detail = 'quote " backslash \\ newline \n unicode \u00e9 \u2028'
    body = json.loads(problem_response(InternalError(detail)).body)
    assert body["detail"] == detail


# RFC 6750 section 3: error_description is %x20-21 / %x23-5B / %x5D-7E, inside quotes.
_CHALLENGE = re.compile(r'Bearer realm="credproxy", error="invalid_token", '
                        r'error_description="([\x20\x21\x23-\x5b\x5d-\x7e]*)"')


@pytest.mark.parametrize(("provider", "reason"), [
    pytest.param("docs", "no_connection", id="plain"),
    pytest.param('do"cs', 'a\\b"c', id="quote-and-backslash"),
    pytest.param("d\r\nX-Injected: 1", "r\u00e9\u2028", id="crlf-and-non-ascii"),
])
def test_reauth_required_challenge_is_a_well_formed_rfc6750_header(provider: str,
                                                                   reason: str) -> None:
    """RFC 9110 section 15.5.2: every 401 carries WWW-Authenticate; the description cannot
    break out of its quotes or the header line, whatever the provider id and reason hold."""
    error = ReauthRequired("x", reason=reason, provider=provider, connect_url="https://c")
    challenge = problem_response(error).headers["WWW-Authenticate"]
    assert _CHALLENGE.fullmatch(challenge), challenge
