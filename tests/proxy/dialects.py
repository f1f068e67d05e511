"""Provider entries for the dialect tests: each states one documented behaviour of a real
provider (the issue 13 list), as the catalog would, with the source in a comment. Local
test values only (hosts, URLs): the real catalog is proxy/catalog/*.yaml."""

from __future__ import annotations

from typing import Any

from proxy.settings import ProviderSettings


def provider(provider_id: str = "textbook", base: str = "https://login.example.com",
             **overrides: Any) -> ProviderSettings:
    """A provider entry with textbook defaults, then ``overrides`` (dialect keys)."""
    values: dict[str, Any] = {
        "id": provider_id, "hosts": [f"{provider_id}.example.com"],
        "authorize_url": f"{base}/authorize", "token_url": f"{base}/token",
        "revocation_url": f"{base}/revoke", "client_id": "client-1",
        "client_secret_env": "TEST_CLIENT_SECRET", "allow_http": base.startswith("http:"),
        "scopes": ["read", "write"]}
    values.update(overrides)
    return ProviderSettings.model_validate(values)


# Each: the dialect keys for one provider's documented behaviour.
DIALECTS: dict[str, dict[str, Any]] = {
    "textbook": {},
    # GitHub: a dead refresh token is HTTP 200 {"error": "bad_refresh_token"}
    # (https://docs.github.com/en/apps/creating-github-apps/authenticating-with-a-github-app/refreshing-user-access-tokens)
    "github": {"token_errors": {"reauth": ["bad_refresh_token", "invalid_grant"]},
               "revocation": {"style": "github-grant"}},
    # Slack: HTTP 200 {"ok": false, "error": ...}; the user's token under authed_user;
    # comma-separated user_scope; auth.revoke answers ok (https://api.slack.com/methods/oauth.v2.access,
    # https://api.slack.com/methods/auth.revoke, https://api.slack.com/authentication/rotation)
    "slack": {"token_errors": {"success_field": "ok",
                               "reauth": ["invalid_refresh_token", "invalid_grant"],
                               "operator": ["invalid_client_id", "bad_client_secret",
                                            "invalid_client"]},
              "token_response": {"user_token_path": ["authed_user"],
                                 "user_token_type": "user"},
              "scope_param": "user_scope", "scope_separator": ",",
              "api_signals": {"success_field": "ok", "reauth": [
                  "token_revoked", "invalid_auth", "token_expired", "account_inactive",
                  "not_authed"]},
              "revocation": {"style": "slack", "already_revoked": ["token_revoked",
                                                                   "invalid_auth"]}},
    # Entra ID: MFA / conditional access as 400 interaction_required / consent_required
    # (https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-auth-code-flow#error-codes-for-token-endpoint-errors);
    # no per-grant revocation (https://learn.microsoft.com/en-us/graph/api/user-revokesigninsessions)
    "entra": {"token_errors": {"reauth": ["invalid_grant", "interaction_required",
                                          "consent_required", "login_required"]},
              "revocation": {"style": "none",
                             "console_url": "https://entra.microsoft.com/#view/enterprise-apps"}},
    # HubSpot v1: 400 {"status": "BAD_REFRESH_TOKEN", "message": ...} and no "error"
    # (https://legacydocs.hubspot.com/docs/methods/oauth2/refresh-access-token)
    "hubspot": {"token_errors": {"error_fields": ["error", "status"],
                                 "reauth": ["BAD_REFRESH_TOKEN", "invalid_grant"]}},
    # Atlassian: a dead refresh token is 403 unauthorized_client "refresh_token is invalid"
    # (https://developer.atlassian.com/cloud/jira/platform/oauth-2-3lo-apps/#how-do-i-get-a-new-access-token--if-my-access-token-expires-or-is-revoked-)
    "atlassian": {"token_errors": {"reauth": ["invalid_grant", "unauthorized_client"],
                                   "operator": ["invalid_client", "unsupported_grant_type"]},
                  "authorize_params": {"audience": "api.atlassian.com", "prompt": "consent"},
                  "revocation": {"style": "none"}},
    # Salesforce: no expires_in at all (https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_refresh_token_flow.htm)
    "salesforce": {"default_expires_in": 3600},
    # Google: no refresh token without access_type=offline (prompt=consent to get one
    # again); 400 invalid_token revoking a token already dead
    # (https://developers.google.com/identity/protocols/oauth2/web-server#offline)
    "google": {"authorize_params": {"access_type": "offline", "prompt": "consent"},
               "revocation": {"token": "both", "already_revoked": ["invalid_token"]}},
    # Dropbox: token_access_type=offline; revocation is a bearer call with no body
    # (https://www.dropbox.com/developers/documentation/http/documentation#auth-token-revoke)
    "dropbox": {"authorize_params": {"token_access_type": "offline"},
                "revocation": {"style": "bearer"}},
    # Intuit QuickBooks: revocation takes a JSON body
    # (https://developer.intuit.com/app/developer/qbo/docs/develop/authentication-and-authorization/oauth-2.0#revoke-token-disconnect)
    "quickbooks": {"revocation": {"style": "json"}},
    # Shopify: expiring offline tokens need expiring=1 on the token request
    # (https://shopify.dev/docs/apps/build/authentication-authorization/access-token-types/offline-access-tokens)
    "shopify": {"token_params": {"expiring": "1"}, "scope_separator": ","},
    # Zoom: comma-separated scopes; revoke takes the access token
    # (https://developers.zoom.us/docs/integrations/oauth/)
    "zoom": {"scope_separator": ",", "revocation": {"token": "access_token"}},
    # Xero: the revocation endpoint takes the refresh token only
    # (https://developer.xero.com/documentation/guides/oauth2/auth-flow/#revoking-tokens)
    "xero": {"revocation": {"token": "refresh_token"}},
}


def dialect(name: str, base: str = "https://login.example.com",
            **extra: Any) -> ProviderSettings:
    return provider(name, base, **{**DIALECTS[name], **extra})
