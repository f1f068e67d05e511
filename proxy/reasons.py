"""The one registry of reason codes: every ``reason`` credproxy writes into a problem
body, an audit record, a grant's re-auth mark or a metric label.

A reason is a short, stable, machine-readable code: one spelling, snake_case, meaning one
thing per event. Free text (what the provider said, which configuration key is wrong) goes
in the problem's ``detail``, never in the reason. Metrics use :func:`label`, so a label
value is always a registered code (or ``other``): never something a client or a provider
can choose freely.

Three kinds of entries:

- *fixed* codes (:data:`REGISTRY`), each with the events it appears in and its meaning;
- *families* (:data:`FAMILIES`): ``<family>:<provider's code>`` in connect rejections,
  e.g. ``token_exchange_failed:invalid_grant``; counted under the family's name;
- *provider codes*: a provider dialect (``token_errors.reauth``, ``api_signals.reauth``)
  names the provider's own error codes; a grant marked for one carries the code itself,
  normalised by :func:`from_provider_code` (``BAD_REFRESH_TOKEN`` -> ``bad_refresh_token``).
  The codes the built-in catalog uses are registered below; another one is still the
  reason, and is counted as ``other``.

:data:`LEGACY_KEBAB` lists the codes still spelled in kebab-case by code outside this
change (request-syntax refusals in ``proxy/headers.py`` and ``addons/``, audit-sink
failures); they are registered under their current spelling until they are renamed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

# Events (audit record events, or where else a reason shows).
IDENTITY = "identity.rejected"
DENIED = "credential.denied"
REAUTH = "reauth.required"
FAILED = "request.failed"
CONNECT = "connection.created"
REVOKED = "connection.revoked"
OFFBOARDED = "user.offboarded"
RELOADED = "config.reloaded"
GRANT = "grant mark"  # the reason stored on a grant marked reauth_required
METRIC = "metric only"  # counted, never answered


@dataclass(frozen=True, slots=True)
class Reason:
    """One reason code: where it appears (``events``) and what it means."""

    code: str
    events: tuple[str, ...]
    meaning: str


def _table(*rows: tuple[str, tuple[str, ...], str]) -> Mapping[str, Reason]:
    out: dict[str, Reason] = {}
    for code, events, meaning in rows:
        if code in out:
            raise ValueError(f"reason {code!r} registered twice")
        out[code] = Reason(code, events, meaning)
    return MappingProxyType(out)


REGISTRY: Final[Mapping[str, Reason]] = _table(
    # -- offboarding (connection.revoked, user.offboarded); what remains is in detail --
    ("upstream_revoked", (REVOKED,), "the provider revoked the grant (or it was dead)"),
    ("upstream_pending", (REVOKED,), "upstream revocation failed after retries: to redo"),
    ("upstream_unsupported", (REVOKED,), "no revocation endpoint is configured"),
    ("upstream_none", (REVOKED,),
     "the provider has no per-grant revocation; detail names the admin console"),
    ("upstream_not_attempted", (REVOKED,), "a corrupt record: its tokens were unreadable"),
    ("pending", (OFFBOARDED,), "some of the user's grants are not fully offboarded"),
    # -- the user context (407 user-context-missing / user-context-invalid) -------------
    ("missing", (IDENTITY,), "no user context on a request to a provider"),
    ("malformed", (IDENTITY,), "the user context is not a well-formed JWS / JWT"),
    ("bad_signature", (IDENTITY,), "the user context's signature does not verify"),
    ("alg_not_allowed", (IDENTITY,), "the JWS algorithm is not in identity.algorithms"),
    ("alg_key_mismatch", (IDENTITY,), "the algorithm does not fit the key type (confusion)"),
    ("unknown_kid", (IDENTITY,), "the JWS kid names no configured key"),
    ("expired", (IDENTITY, REAUTH, GRANT),
     "identity.rejected: the user context's exp has passed; reauth.required: the access "
     "token expired and the grant has no refresh token"),
    ("not_yet_valid", (IDENTITY,), "the user context's iat/nbf is in the future"),
    ("lifetime_too_long", (IDENTITY,), "exp - iat exceeds identity.max_lifetime"),
    ("wrong_issuer", (IDENTITY,), "iss is not identity.issuer"),
    ("wrong_audience", (IDENTITY,), "aud does not contain identity.audience"),
    ("wrong_typ", (IDENTITY,), "the JWS typ is not identity.typ"),
    ("missing_claim", (IDENTITY,), "a required claim is missing (jti with one_time_jti)"),
    ("duplicate_header", (IDENTITY,), "an identity header was sent more than once"),
    ("lookalike_header", (IDENTITY,), "an identity header was sent under a lookalike "
     "spelling (X_User_Context)"),
    ("oversized", (IDENTITY,), "the user context exceeds identity.max_token_bytes"),
    ("replayed", (IDENTITY,), "a one-time jti was used before"),
    ("keys_unavailable", (IDENTITY,), "the verification keys cannot be fetched"),
    # -- request syntax (400 malformed-request, 417) -----------------------------------
    ("obs_fold", (DENIED,), "a folded header line"),
    ("control_character", (DENIED,), "a control character in a header value"),
    ("bad_field_name", (DENIED,), "a header name that is not a token"),
    ("bad_connection", (DENIED,), "Connection nominates a framing/routing field or a "
     "non-token"),
    ("bad_method", (DENIED,), "the method is not a token"),
    ("bad_target", (DENIED,), "the request-target is not origin-form"),
    ("ambiguous_target", (DENIED,), "a credentialed request-target starting with //"),
    ("bad_framing", (DENIED,), "malformed chunked framing"),
    ("bad_expect", (DENIED,), "an Expect other than 100-continue"),
    ("trailers", (DENIED, FAILED), "an HTTP/1 trailer section (cannot be forwarded)"),
    # -- routing (403, 421) ------------------------------------------------------------
    ("host_mismatch", (DENIED,), "Host or SNI disagrees with the real destination"),
    ("target_mismatch", (DENIED,), "an absolute-form target names another authority"),
    ("bad_destination", (DENIED,), "the destination is the unspecified address"),
    ("insecure_transport", (DENIED,), "plain http to a TLS-only provider"),
    ("context_excludes_provider", (DENIED,), "the context's providers claim excludes it"),
    ("method_not_allowed", (DENIED,), "the method is not in the provider's methods"),
    ("unrouted", (DENIED,), "unrouted: deny and the destination is no provider"),
    ("provider_removed", (DENIED,), "the destination was a provider until a reload"),
    ("insufficient_scope", (DENIED,), "the upstream asked for more scope than the grant "
     "holds (RFC 6750 insufficient_scope): the user re-consents with the union"),
    ("suspended", (DENIED, FAILED, CONNECT), "an operator suspended the user, the user context or "
     "the provider (credproxy suspend): credential.denied, the problem names which and "
     "since when; request.failed, an exchange under way was cut"),
    ("not_grant_host", (DENIED,), "the destination is under the provider's hosts but not "
     "one of the user's grant's own hosts (another tenant: docs/tenants.md)"),
    # -- the grant (401 reauth-required) -----------------------------------------------
    ("no_connection", (REAUTH,), "the user has no grant for the provider"),
    ("invalid_grant", (REAUTH, GRANT), "the token endpoint refused the refresh token "
     "(RFC 6749 section 5.2)"),
    ("revoked_upstream", (REAUTH, GRANT), "the provider rejected the user's token and a "
     "forced refresh could not get a new one"),
    ("revoked", (REAUTH, GRANT), "the grant is being offboarded (credproxy revoke) or was "
     "revoked/replaced while a refresh ran"),
    ("reauth_required", (REAUTH,), "the grant is marked, with no recorded reason"),
    # -- provider codes a dialect maps to re-auth (token endpoint or API signal) --------
    ("bad_refresh_token", (REAUTH, GRANT), "GitHub (HTTP 200) / HubSpot v1 (status "
     "BAD_REFRESH_TOKEN): the refresh token is dead"),
    ("invalid_refresh_token", (REAUTH, GRANT), "Slack: the refresh token is dead"),
    ("interaction_required", (REAUTH, GRANT), "Entra ID: MFA or conditional access needs "
     "the user"),
    ("consent_required", (REAUTH, GRANT), "Entra ID: the user must consent again"),
    ("login_required", (REAUTH, GRANT), "OpenID Connect: the user must sign in again"),
    ("token_revoked", (REAUTH, GRANT), "Slack API signal: the token was revoked"),
    ("invalid_auth", (REAUTH, GRANT), "Slack API signal: the token is not valid"),
    ("token_expired", (REAUTH, GRANT), "Slack API signal: the token expired"),
    ("account_inactive", (REAUTH, GRANT), "Slack API signal: the user or workspace is gone"),
    ("not_authed", (REAUTH, GRANT), "Slack API signal: no token reached the API"),
    # -- the token endpoint (502 token-refresh-failed, provider-misconfigured) ---------
    ("token_endpoint_unavailable", (DENIED,), "timeouts, network errors, 5xx, 429 or a "
     "transient error code after the bounded retries"),
    ("token_endpoint_error", (DENIED,), "an error the dialect does not classify, or a "
     "malformed answer; the grant is untouched"),
    ("refresh_held", (DENIED,), "a refresh failed moments ago for a reason retrying cannot "
     "fix soon; answered without calling the token endpoint again"),
    ("invalid_client", (DENIED, CONNECT), "operator: the provider refused the client "
     "(client_id, secret or token_endpoint_auth_method)"),
    ("unauthorized_client", (DENIED, CONNECT), "operator: the client may not use this "
     "grant type"),
    ("unsupported_grant_type", (DENIED, CONNECT), "operator: the grant type is unsupported"),
    ("provider_misconfigured", (DENIED, CONNECT), "operator: another error the dialect "
     "lists in token_errors.operator"),
    # -- credential store and coordination (503) ---------------------------------------
    ("vault_unavailable", (DENIED, CONNECT), "the vault cannot be read or written"),
    ("vault_record_corrupt", (DENIED,), "a vault record fails authentication"),
    ("vault_write_failed", (DENIED,), "refreshed tokens could not be stored (kept in "
     "memory, retried)"),
    ("coordination_unavailable", (DENIED, IDENTITY), "Redis cannot be reached"),
    ("fencing", (DENIED,), "refreshes held back after Redis lost its data"),
    ("suspensions_unknown", (DENIED,), "this replica has not yet read the suspensions "
     "(Redis unreachable since it started, or an unreadable suspensions file)"),
    ("token_superseded", (DENIED,), "an upstream 401 on a token a concurrent refresh "
     "already replaced: retry"),
    ("token_refreshed", (DENIED,), "an upstream 401; a forced refresh obtained a new "
     "token: retry"),
    # -- audit and internal (503, 500) -------------------------------------------------
    ("audit_write_failed", (DENIED,), "the audit sink failed a write"),
    ("audit_sink_stalled", (DENIED,), "stdout stalled beyond audit.stall_timeout"),
    ("internal_error", (DENIED, FAILED), "a bug (fail closed)"),
    ("unconfigured", (DENIED,), "the addon runs without credproxy_config"),
    # -- exchanges that broke after the decision (request.failed, 502) -----------------
    ("upstream_unreachable", (DENIED, FAILED), "DNS, connect or TLS failed; nothing sent"),
    ("upstream_protocol_error", (DENIED, FAILED), "the destination broke off or answered "
     "what cannot be forwarded"),
    ("client_protocol_error", (DENIED, FAILED), "mitmproxy could not parse the client"),
    ("client_disconnected", (FAILED,), "the client went away"),
    ("exchange_failed", (FAILED,), "the exchange failed for another reason"),
    # -- connecting a user (connection.created, outcome rejected) ----------------------
    ("unknown_provider", (CONNECT,), "no provider with that id"),
    ("provider_not_permitted", (CONNECT,), "the user context's providers claim excludes "
     "the provider being connected"),
    ("imported", (CONNECT,), "a token set imported by credproxy vault put"),
    ("no_authorize_url", (CONNECT,), "the provider has no authorize_url"),
    ("scope_not_allowed", (CONNECT,), "a requested scope is outside the provider's "
     "scope_ceiling"),
    ("required_scope_not_requested", (CONNECT,), "the scopes chosen leave out one of the "
     "provider's required_scopes"),
    ("required_scope_not_granted", (CONNECT,), "the provider granted less than the "
     "provider's required_scopes (outcome connected: the grant is stored)"),
    ("return_url_not_allowed", (CONNECT,), "return_to is not under connect.return_urls"),
    ("missing_state", (CONNECT,), "the callback has no state"),
    ("unknown_state", (CONNECT,), "the state was not issued here (or is unreadable)"),
    ("replayed_state", (CONNECT,), "the state was already used"),
    ("expired_state", (CONNECT,), "the sign-in took longer than connect.state_ttl"),
    ("browser_mismatch", (CONNECT,), "the callback came from another browser"),
    # An mcp provider (proxy.mcpauth): discovery, registration, RFC 9207.
    ("mcp_no_resource_metadata", (CONNECT, DENIED),
     "the MCP server publishes no protected resource metadata (RFC 9728)"),
    ("mcp_resource_mismatch", (CONNECT, DENIED),
     "the resource metadata describes another resource (RFC 9728 section 3.3)"),
    ("mcp_no_authorization_server", (CONNECT, DENIED),
     "the resource metadata names no authorization server"),
    ("mcp_no_authorization_server_metadata", (CONNECT, DENIED),
     "the authorization server publishes no RFC 8414 / OpenID Connect metadata"),
    ("mcp_issuer_mismatch", (CONNECT, DENIED),
     "the metadata's issuer is not the one it was fetched for (RFC 8414 section 3.3)"),
    ("mcp_pkce_unsupported", (CONNECT, DENIED),
     "the authorization server does not list PKCE S256"),
    ("mcp_metadata_invalid", (CONNECT, DENIED),
     "the discovered metadata is malformed (not JSON, missing or non-https endpoints)"),
    ("mcp_discovery_unavailable", (CONNECT, DENIED),
     "a metadata endpoint failed after the retries"),
    ("mcp_no_registration", (CONNECT,),
     "no pre-registered client, no client metadata document support and no RFC 7591 "
     "registration endpoint"),
    ("mcp_registration_failed", (CONNECT,), "RFC 7591 dynamic registration failed"),
    ("mcp_issuer_changed", (CONNECT, REAUTH),
     "the MCP server's authorization server (or client) is not the one that minted the "
     "flow or grant"),
    ("mcp_grant_incomplete", (REAUTH,),
     "an mcp grant does not record the issuer and client that minted it"),
    ("mcp_resource_changed", (REAUTH,),
     "the grant was minted for another MCP server URL than the provider's mcp now names"),
    ("outside_mcp_resource", (DENIED,),
     "the request is for another path on the MCP server's host than the server's endpoint "
     "(the token's audience)"),
    ("mcp_header_mismatch", (DENIED,),
     "an MCP request's Mcp-Method / Mcp-Name fields disagree with its JSON-RPC body"),
    ("iss_mismatch", (CONNECT,),
     "the authorization response's iss is another issuer (RFC 9207)"),
    ("iss_missing", (CONNECT,),
     "the authorization response has no iss though the server advertises it (RFC 9207)"),
    ("missing_code", (CONNECT,), "the callback has no code"),
    ("missing_pkce_verifier", (CONNECT,), "the state record has no PKCE verifier"),
    ("token_exchange_failed", (CONNECT,), "the code could not be exchanged (network, "
     "5xx, malformed answer)"),
    ("no_user_token", (CONNECT,), "the token response has no user token set where the "
     "provider puts it (token_response.user_token_path): an app or bot token is never "
     "stored as a user's credential"),
    # -- grants bound to their tenant (docs/tenants.md) --------------------------------
    ("grant_value_missing", (CONNECT, REAUTH, GRANT), "a grant value is absent (at "
     "connect), or the stored grant lacks one the running config needs (reconnect)"),
    ("grant_value_invalid", (CONNECT, REAUTH), "a grant value does not match its kind or "
     "pattern"),
    ("grant_value_mismatch", (CONNECT,), "the callback names another value than the one "
     "chosen when the sign-in began (Shopify's shop)"),
    ("grant_host_not_allowed", (CONNECT, REAUTH), "a grant value would bind a host outside "
     "the provider's hosts (its ceiling)"),
    ("discovery_failed", (CONNECT,), "a discovery call after the code exchange failed"),
    # -- administrative actions -------------------------------------------------------
    ("config_rejected", (RELOADED,), "a changed configuration failed its checks; the "
     "previous one keeps serving (detail: why)"),
)

# ``<family>:<the provider's error code>``: a connect rejection that names what the
# provider answered (free-form after the colon, so only the family is a metric label).
FAMILIES: Final[Mapping[str, str]] = MappingProxyType({
    "provider_error": "the authorization endpoint redirected back with this error "
                      "(RFC 6749 section 4.1.2.1)",
    "token_exchange_failed": "the token endpoint refused the code with this error",
})

# Registered under their current kebab-case spelling (outside proxy/reasons.py's change).
LEGACY_KEBAB: Final = frozenset(code for code in REGISTRY if "-" in code)

_SNAKE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
_NOT_WORD = re.compile(r"[^a-z0-9]+")


def is_snake(code: str) -> bool:
    return _SNAKE.fullmatch(code) is not None


def known(reason: str | None) -> bool:
    """Whether ``reason`` is a registered code or ``<family>:<code>``."""
    if reason is None:
        return False
    if reason in REGISTRY:
        return True
    family, sep, _ = reason.partition(":")
    return bool(sep) and family in FAMILIES


def label(reason: str | None) -> str:
    """The metric label for ``reason``: the code itself when registered, a family's name
    for ``<family>:<code>``, else ``"other"`` (never free text as a label value)."""
    if reason is None:
        return "other"
    if reason in REGISTRY:
        return reason
    family, sep, _ = reason.partition(":")
    return family if sep and family in FAMILIES else "other"


def from_provider_code(code: str) -> str:
    """A provider's error code as a reason: lower snake_case, at most 64 characters
    (``BAD_REFRESH_TOKEN`` -> ``bad_refresh_token``, ``invalid-grant`` ->
    ``invalid_grant``). Empty or nothing but punctuation: ``token_endpoint_error``."""
    snake = _NOT_WORD.sub("_", code.strip().lower()).strip("_")[:64].rstrip("_")
    if not snake or not snake[0].isalpha():
        return "token_endpoint_error" if not snake else f"code_{snake}"[:64]
    return snake
