"""The provider dialect as data (proxy.dialect): the one classification of token-endpoint
answers, revoked-token signals in API answers, revocation answers, and the catalog
loader. Pure functions, table-driven: each row is one documented provider behaviour from
issue 13 (faults 1, 2, 3, 5, 6, 8) and the answer credproxy must give it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from proxy import reasons
from proxy.dialect import (
    ApiSignals,
    Revocation,
    api_signal,
    builtin_catalog,
    catalog_ids,
    describe_catalog,
    expand_provider,
    read_revocation_response,
    read_token_response,
)
from proxy.errors import ConfigError
from proxy.secret import Secret
from proxy.settings import ProviderSettings, parse_settings
from tests.proxy.dialects import dialect, provider

NOW = 1_800_000_000.0
JSON = "application/json"


def body(**members: Any) -> bytes:
    return json.dumps(members).encode()


def tokens(**extra: Any) -> bytes:
    return body(access_token="at-new", token_type="Bearer", refresh_token="rt-new", **extra)


# name, dialect, HTTP status, content type, body, grant, outcome, reason
ANSWERS = [
    # -- fault 1: token-endpoint errors other than invalid_grant -----------------------
    ("textbook-success", "textbook", 200, JSON, tokens(expires_in=3600), "refresh_token",
     "success", None),
    ("textbook-invalid-grant", "textbook", 400, JSON, body(error="invalid_grant"),
     "refresh_token", "reauth", "invalid_grant"),
    ("textbook-invalid-client", "textbook", 401, JSON, body(error="invalid_client"),
     "refresh_token", "operator", "invalid_client"),
    ("textbook-unauthorized-client", "textbook", 400, JSON,
     body(error="unauthorized_client"), "refresh_token", "operator", "unauthorized_client"),
    ("textbook-unsupported-grant-type", "textbook", 400, JSON,
     body(error="unsupported_grant_type"), "refresh_token", "operator",
     "unsupported_grant_type"),
    ("textbook-transient-code", "textbook", 400, JSON, body(error="temporarily_unavailable"),
     "refresh_token", "transient", "token_endpoint_unavailable"),
    ("textbook-503-html", "textbook", 503, "text/html", b"<h1>down</h1>", "refresh_token",
     "transient", "token_endpoint_unavailable"),
    ("textbook-429-empty", "textbook", 429, None, b"", "refresh_token", "transient",
     "token_endpoint_unavailable"),
    ("textbook-unknown-code", "textbook", 400, JSON, body(error="invalid_request"),
     "refresh_token", "failed", "token_endpoint_error"),
    ("textbook-400-no-code", "textbook", 400, "text/plain", b"nope", "refresh_token",
     "failed", "token_endpoint_error"),
    ("textbook-200-not-json", "textbook", 200, "text/html", b"<html>", "refresh_token",
     "failed", "token_endpoint_error"),
    ("textbook-200-no-access-token", "textbook", 200, JSON, body(token_type="Bearer"),
     "refresh_token", "failed", "token_endpoint_error"),
    ("textbook-an-outage-never-kills-a-grant", "textbook", 500, JSON,
     body(error="invalid_grant"), "refresh_token", "transient", "token_endpoint_unavailable"),
    ("github-200-bad-refresh-token", "github", 200, JSON, body(error="bad_refresh_token"),
     "refresh_token", "reauth", "bad_refresh_token"),
    ("github-form-encoded", "github", 200, "application/x-www-form-urlencoded",
     b"error=bad_refresh_token&error_description=expired", "refresh_token", "reauth",
     "bad_refresh_token"),
    ("textbook-200-error-is-never-success", "textbook", 200, JSON,
     body(error="bad_refresh_token", access_token="at-x"), "refresh_token", "failed",
     "token_endpoint_error"),
    ("slack-ok-false-dead-refresh-token", "slack", 200, JSON,
     body(ok=False, error="invalid_refresh_token"), "refresh_token", "reauth",
     "invalid_refresh_token"),
    ("slack-ok-false-operator", "slack", 200, JSON, body(ok=False, error="bad_client_secret"),
     "refresh_token", "operator", "provider_misconfigured"),
    ("slack-ok-false-without-error", "slack", 200, JSON, body(ok=False), "refresh_token",
     "failed", "token_endpoint_error"),
    ("entra-interaction-required", "entra", 400, JSON,
     body(error="interaction_required", error_description="AADSTS50076: MFA"),
     "refresh_token", "reauth", "interaction_required"),
    ("entra-consent-required", "entra", 400, JSON, body(error="consent_required"),
     "refresh_token", "reauth", "consent_required"),
    ("hubspot-v1-status-field", "hubspot", 400, JSON,
     body(status="BAD_REFRESH_TOKEN", message="missing or invalid refresh token"),
     "refresh_token", "reauth", "bad_refresh_token"),
    ("atlassian-403-unauthorized-client-is-reauth", "atlassian", 403, JSON,
     body(error="unauthorized_client", error_description="refresh_token is invalid"),
     "refresh_token", "reauth", "unauthorized_client"),
    # -- fault 8: where the user's token set is ---------------------------------------
    ("slack-code-user-token", "slack", 200, JSON,
     body(ok=True, access_token="xoxb-bot", token_type="bot",
          authed_user={"id": "U1", "access_token": "xoxp-user", "token_type": "user",
                       "refresh_token": "xoxe-1-user", "expires_in": 43200}),
     "authorization_code", "success", None),
    ("slack-code-bot-token-only", "slack", 200, JSON,
     body(ok=True, access_token="xoxb-bot", token_type="bot", authed_user={"id": "U1"}),
     "authorization_code", "failed", "no_user_token"),
    ("slack-refresh-top-level", "slack", 200, JSON,
     body(ok=True, access_token="xoxe.xoxp-user", token_type="user",
          refresh_token="xoxe-1-next", expires_in=43200), "refresh_token", "success", None),
    # A refresh answered with the app's bot token is no user's credential either.
    ("slack-refresh-bot-token", "slack", 200, JSON,
     body(ok=True, access_token="xoxb-bot", token_type="bot", refresh_token="rt-b",
          expires_in=43200), "refresh_token", "failed", "no_user_token"),
    ("slack-refresh-no-token-type", "slack", 200, JSON,
     body(ok=True, access_token="xoxb-bot", refresh_token="rt-b"), "refresh_token",
     "failed", "no_user_token"),
]


@pytest.mark.parametrize(("name", "dialect_name", "status", "ctype", "raw", "grant",
                          "outcome", "reason"),
                         ANSWERS, ids=[row[0] for row in ANSWERS])
def test_token_answers_are_classified_by_the_dialect(name: str, dialect_name: str,
                                                     status: int, ctype: str | None,
                                                     raw: bytes, grant: Any, outcome: str,
                                                     reason: str | None) -> None:
    answer = read_token_response(dialect(dialect_name), status, ctype, raw, grant=grant,
                                 now=NOW)
    assert (answer.outcome, answer.reason) == (outcome, reason), answer.detail
    if outcome == "success":
        assert answer.tokens is not None
    else:
        assert answer.tokens is None
        assert reasons.known(answer.reason), answer.reason  # one registry
    assert "at-new" not in answer.detail and "rt-new" not in answer.detail


def test_slack_code_exchange_stores_the_users_token_never_the_bot_token() -> None:
    """Fault 8: with bot scopes too, the top level is the app's bot token, shared by every
    user; the user's own token set is under authed_user."""
    raw = body(ok=True, access_token="xoxb-bot", token_type="bot", scope="chat:write",
               authed_user={"id": "U1", "access_token": "xoxp-user", "token_type": "user",
                            "scope": "search:read", "refresh_token": "xoxe-1-user",
                            "expires_in": 43200})
    answer = read_token_response(dialect("slack"), 200, JSON, raw,
                                 grant="authorization_code", now=NOW)
    assert answer.tokens is not None
    assert answer.tokens.access_token == Secret("xoxp-user")
    assert answer.tokens.refresh_token == Secret("xoxe-1-user")
    assert (answer.tokens.scope, answer.tokens.expires_at) == ("search:read", NOW + 43200)


# -- faults 3 and 5: the expiry -----------------------------------------------------------
@pytest.mark.parametrize(("dialect_name", "members", "expires_at", "noted"), [
    pytest.param("textbook", {"expires_in": 3600}, NOW + 3600, False, id="number"),
    pytest.param("textbook", {"expires_in": "3600"}, NOW + 3600, False, id="digit-string"),
    pytest.param("textbook", {}, None, False, id="absent-unknown"),
    pytest.param("salesforce", {}, NOW + 3600, False, id="absent-default-expires-in"),
    pytest.param("textbook", {"expires_in": "3600abc"}, None, True, id="garbage-string"),
    pytest.param("textbook", {"expires_in": -5}, None, True, id="negative"),
    pytest.param("textbook", {"expires_in": True}, None, True, id="boolean"),
    pytest.param("textbook", {"expires_in": 10**400}, None, True, id="huge"),
    pytest.param("textbook", {"expires_at": "2025-10-10T12:00:00Z"}, None, True,
                 id="iso-expires-at-alone"),
    pytest.param("textbook", {"expires_at": NOW + 60}, NOW + 60, False, id="numeric-expires-at"),
    pytest.param("salesforce", {"expires_in": "3600abc"}, NOW + 3600, True,
                 id="garbage-then-default"),
])
def test_a_malformed_expiry_never_drops_the_rotated_refresh_token(
        dialect_name: str, members: dict[str, Any], expires_at: float | None,
        noted: bool) -> None:
    """Fault 5: the 200 answer carries a rotated refresh token; discarding it made the next
    request present the spent one. A bad expiry is unknown (or default_expires_in), and a
    note says so for the log."""
    answer = read_token_response(dialect(dialect_name), 200, JSON, tokens(**members),
                                 grant="refresh_token", now=NOW)
    assert answer.outcome == "success" and answer.tokens is not None
    assert answer.tokens.refresh_token == Secret("rt-new")
    assert answer.tokens.expires_at == expires_at
    assert answer.tokens.issued_at == NOW
    assert bool(answer.notes) is noted
    assert all("rt-new" not in n for n in answer.notes)


def test_refresh_token_under_another_name() -> None:
    p = provider(token_response={"refresh_token_field": "refreshToken"})
    raw = body(access_token="at", refreshToken="rt-other", expires_in=60)
    answer = read_token_response(p, 200, JSON, raw, grant="refresh_token", now=NOW)
    assert answer.tokens is not None and answer.tokens.refresh_token == Secret("rt-other")


# -- fault 2: revoked-token signals in API answers ----------------------------------------
SLACK_SIGNALS = dialect("slack").api_signals


@pytest.mark.parametrize(("signals", "status", "ctype", "raw", "reason"), [
    pytest.param(SLACK_SIGNALS, 200, JSON, body(ok=False, error="token_revoked"),
                 "token_revoked", id="slack-token-revoked"),
    pytest.param(SLACK_SIGNALS, 200, "application/json; charset=utf-8",
                 body(ok=False, error="invalid_auth"), "invalid_auth", id="slack-invalid-auth"),
    pytest.param(SLACK_SIGNALS, 200, JSON, body(ok=False, error="account_inactive"),
                 "account_inactive", id="slack-account-inactive"),
    pytest.param(SLACK_SIGNALS, 200, JSON, body(ok=True, error="token_revoked"), None,
                 id="slack-ok-true-is-not-a-signal"),
    pytest.param(SLACK_SIGNALS, 200, JSON, body(ok=False, error="channel_not_found"), None,
                 id="slack-other-error"),
    pytest.param(SLACK_SIGNALS, 200, "text/html", body(ok=False, error="token_revoked"), None,
                 id="not-json"),
    pytest.param(SLACK_SIGNALS, 200, JSON,
                 body(ok=False, error="token_revoked", pad="x" * 70_000), None,
                 id="larger-than-max-bytes"),
    pytest.param(SLACK_SIGNALS, 200, JSON, b"[1, 2]", None, id="not-an-object"),
    pytest.param(ApiSignals(), 200, JSON, body(ok=False, error="token_revoked"), None,
                 id="textbook-declares-none"),
    pytest.param(ApiSignals(reauth=["TOKEN_REVOKED"]), 403, JSON,
                 body(error="token_revoked"), "token_revoked",
                 id="no-success-field-any-status"),
])
def test_api_signal(signals: ApiSignals, status: int, ctype: str, raw: bytes,
                    reason: str | None) -> None:
    got = api_signal(signals, status, ctype, raw)
    assert got == reason
    assert got is None or reasons.known(got)


# -- fault 6: revocation answers ------------------------------------------------------------
@pytest.mark.parametrize(("revocation", "status", "ctype", "raw", "outcome"), [
    pytest.param(Revocation(), 200, None, b"", "revoked", id="rfc7009-200"),
    pytest.param(Revocation(), 400, JSON, body(error="invalid_token"), "revoked",
                 id="rfc7009-already-dead-google"),
    pytest.param(Revocation(), 400, JSON, body(error="invalid_request"), "refused",
                 id="rfc7009-refused"),
    pytest.param(Revocation(), 503, None, b"", "transient", id="rfc7009-503"),
    pytest.param(Revocation(style="json"), 200, JSON, b"", "revoked", id="json-200"),
    pytest.param(Revocation(style="bearer"), 200, JSON, b"null", "revoked", id="bearer-200"),
    pytest.param(Revocation(style="bearer", already_revoked=["invalid_access_token"]), 401,
                 JSON, body(error={".tag": "invalid_access_token"}), "revoked",
                 id="bearer-dropbox-tagged-error"),
    pytest.param(Revocation(style="github-grant"), 204, None, b"", "revoked",
                 id="github-204"),
    pytest.param(Revocation(style="github-grant", already_revoked=["404"]), 404, JSON,
                 body(message="Not Found"), "revoked", id="github-404-as-status"),
    pytest.param(Revocation(style="github-grant"), 422, JSON, body(message="Invalid"),
                 "refused", id="github-422"),
    pytest.param(Revocation(style="slack"), 200, JSON, body(ok=True, revoked=True), "revoked",
                 id="slack-ok-true"),
    pytest.param(Revocation(style="slack"), 200, JSON, body(ok=False, error="invalid_arg"),
                 "refused", id="slack-ok-false-is-not-revoked"),
    pytest.param(Revocation(style="slack"), 200, JSON, body(ok=True, revoked=False),
                 "refused", id="slack-revoked-false"),
    pytest.param(Revocation(style="slack"), 200, JSON, body(ok=True), "refused",
                 id="slack-ok-true-without-revoked"),
    pytest.param(Revocation(), 200, JSON, body(error="invalid_request"), "refused",
                 id="rfc7009-200-with-an-error"),
    pytest.param(Revocation(style="github-grant"), 200, JSON,
                 body(error="bad_verification_code"), "refused", id="github-200-with-an-error"),
    pytest.param(Revocation(style="slack", already_revoked=["token_revoked"]), 200, JSON,
                 body(ok=False, error="token_revoked"), "revoked", id="slack-already-dead"),
])
def test_revocation_answers(revocation: Revocation, status: int, ctype: str | None,
                            raw: bytes, outcome: str) -> None:
    assert read_revocation_response(revocation, status, ctype, raw)[0] == outcome


# -- the settings keys ------------------------------------------------------------------------
def test_an_entry_without_dialect_keys_is_the_textbook() -> None:
    """Every dialect key has the RFC 6749 / RFC 7009 default: existing configs unchanged."""
    p = provider()
    assert (p.scope_separator, p.scope_param, p.default_expires_in) == (" ", "scope", None)
    assert (p.authorize_params, p.token_params, p.refresh_params) == ({}, {}, {})
    assert p.token_errors.reauth == ["invalid_grant"]
    assert p.token_errors.error_fields == ["error"] and p.token_errors.success_field is None
    assert p.token_response.user_token_path == []
    assert (p.revocation.style, p.revocation.token) == ("rfc7009", "both")
    assert p.api_signals.reauth == []


@pytest.mark.parametrize(("overrides", "message"), [
    pytest.param({"authorize_params": {"state": "x"}}, "set by credproxy", id="reserved-state"),
    pytest.param({"authorize_params": {"scope": "x"}}, "set by credproxy", id="reserved-scope"),
    pytest.param({"scope_param": "user_scope", "authorize_params": {"user_scope": "x"}},
                 "is the scope_param", id="scope-param-twice"),
    pytest.param({"token_params": {"grant_type": "password"}}, "set by credproxy",
                 id="reserved-grant-type"),
    pytest.param({"refresh_params": {"refresh_token": "x"}}, "set by credproxy",
                 id="reserved-refresh-token"),
    pytest.param({"token_errors": {"reauth": ["invalid_client"]}}, "both",
                 id="code-in-two-lists"),
    pytest.param({"revocation": {"style": "magic"}}, "style", id="unknown-style"),
    pytest.param({"revocation": {"style": "none", "console_url": "http://x"}}, "https",
                 id="console-url-http"),
    pytest.param({"default_expires_in": 0}, "default_expires_in", id="zero-default-expiry"),
    pytest.param({"scope_separator": ""}, "scope_separator", id="empty-separator"),
    pytest.param({"token_errors": {"colour": "red"}}, "unknown key", id="unknown-key"),
])
def test_bad_dialect_keys_are_config_errors_naming_the_key(overrides: dict[str, Any],
                                                           message: str) -> None:
    data = {"identity": {"issuer": "i", "audience": "a", "hs256_secret_env": "X",
                         "algorithms": ["HS256"]},
            "providers": [{"id": "p", "hosts": ["p.example.com"], "client_id": "c",
                           "token_endpoint_auth_method": "none",
                           "token_url": "https://p.example.com/token", **overrides}]}
    with pytest.raises(ConfigError, match=message) as exc:
        parse_settings(data)
    assert "providers[0]" in str(exc.value) or "providers.0" in str(exc.value)


# -- the catalog --------------------------------------------------------------------------
@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    """A catalog directory of fixtures (the real one is proxy/catalog/*.yaml)."""
    root = tmp_path / "catalog"
    root.mkdir()
    (root / "chat.yaml").write_text(
        "# source: https://chat.example/docs\n"
        "title: Chat\n"
        "hosts: [api.chat.example]\n"
        "authorize_url: https://chat.example/oauth/authorize\n"
        "token_url: https://chat.example/api/oauth.access\n"
        "revocation_url: https://chat.example/api/auth.revoke\n"
        "scope_separator: ','\n"
        "token_errors: {success_field: ok, reauth: [invalid_refresh_token]}\n"
        "revocation: {style: slack}\n")
    (root / "crm.yaml").write_text(
        "title: CRM (one org)\n"
        "hosts: ['{instance}.my.crm.example']\n"
        "authorize_url: https://login.crm.example/services/oauth2/authorize\n"
        "token_url: https://{instance}.my.crm.example/services/oauth2/token\n"
        "revocation_url: https://{instance}.my.crm.example/services/oauth2/revoke\n"
        "default_expires_in: 7200\n")
    (root / "tenant.yaml").write_text(
        "hosts: [graph.tenant.example]\n"
        "parameters: {tenant: common}\n"
        "token_url: https://login.tenant.example/{tenant}/oauth2/v2.0/token\n"
        "revocation: {style: none, console_url: 'https://admin.tenant.example/{tenant}'}\n")
    (root / "wild.yaml").write_text(
        "hosts: ['*.my.wild.example']\n"
        "token_url: https://login.wild.example/token\n")
    (root / "gh.yaml").write_text(
        "hosts: [api.gh.example]\n"
        "token_url: https://gh.example/login/oauth/access_token\n"
        "revocation_url: https://api.gh.example/applications/{client_id}/grant\n"
        "revocation: {style: github-grant}\n")
    return root


def _user(**entry: Any) -> dict[str, Any]:
    return {"client_id": "cid", "client_secret_env": "S", **entry}


def test_catalog_entry_then_the_users_keys(catalog: Path) -> None:
    got = expand_provider(_user(provider="chat", scopes=["search:read"],
                                token_errors={"reauth": ["invalid_refresh_token",
                                                         "token_expired"]}),
                          where="providers[0]", catalog=catalog)
    p = ProviderSettings.model_validate(got)
    assert p.id == "chat" and p.provider == "chat"  # id defaults to the catalog id
    assert p.hosts == ["api.chat.example"] and p.scope_separator == ","
    assert p.scopes == ["search:read"]
    # Nested mappings merge key by key (success_field kept), lists are replaced whole.
    assert p.token_errors.success_field == "ok"
    assert p.token_errors.reauth == ["invalid_refresh_token", "token_expired"]
    assert p.revocation.style == "slack"


def test_parameters_fill_hosts_and_urls(catalog: Path) -> None:
    got = expand_provider(_user(provider="crm", id="crm-acme",
                                parameters={"instance": "acme"}),
                          where="providers[0]", catalog=catalog)
    p = ProviderSettings.model_validate(got)
    assert p.id == "crm-acme" and p.hosts == ["acme.my.crm.example"]
    assert p.token_url == "https://acme.my.crm.example/services/oauth2/token"
    assert p.default_expires_in == 7200


def test_parameter_defaults_and_console_url(catalog: Path) -> None:
    p = ProviderSettings.model_validate(expand_provider(_user(provider="tenant"),
                                                        where="p", catalog=catalog))
    assert p.token_url == "https://login.tenant.example/common/oauth2/v2.0/token"
    contoso = ProviderSettings.model_validate(expand_provider(
        _user(provider="tenant", parameters={"tenant": "contoso.onmicrosoft.com"}),
        where="p", catalog=catalog))
    assert contoso.token_url.startswith("https://login.tenant.example/contoso.onmicrosoft.com/")
    assert contoso.revocation.console_url == "https://admin.tenant.example/contoso.onmicrosoft.com"


def test_client_id_fills_the_github_grant_url(catalog: Path) -> None:
    p = ProviderSettings.model_validate(expand_provider(_user(provider="gh"), where="p",
                                                        catalog=catalog))
    assert p.revocation_url == "https://api.gh.example/applications/cid/grant"


@pytest.mark.parametrize(("entry", "message"), [
    pytest.param(_user(provider="nope"), r"unknown catalog provider 'nope'; known: chat, "
                 r"crm, gh, tenant, wild", id="unknown-id-lists-known"),
    pytest.param(_user(provider="crm"), r"providers\[0\]\.parameters: this provider needs "
                 r"'instance' \(used in token_url, revocation_url, hosts\[0\]\): set it under "
                 "parameters", id="missing-parameter"),
    pytest.param(_user(provider="crm", parameters={"instance": "*"}),
                 r"parameters\.instance", id="wildcard-parameter"),
    pytest.param(_user(provider="crm", parameters={"instance": "evil.example/x"}),
                 r"parameters\.instance", id="path-in-parameter"),
    pytest.param(_user(provider="wild"), r"hosts\[0\].*wildcard", id="catalog-wildcard-host"),
    pytest.param(_user(provider=3), "must be a catalog id", id="not-a-string"),
    pytest.param(_user(provider="tenant", parameters={"tenat": "contoso"}),
                 r"parameters: \['tenat'\] is used nowhere .* takes \['tenant'\]",
                 id="misspelt-parameter"),
    pytest.param(_user(provider="gh", parameters={"foo": "bar"}),
                 r"parameters: \['foo'\] is used nowhere .* no parameters",
                 id="parameter-of-a-provider-without-any"),
    pytest.param(_user(provider="crm", parameters={"instance": "acme"},
                       hosts=["*.my.crm.example"]),
                 r"hosts\[0\]: '\*\.my\.crm\.example' is a wildcard over a per-tenant",
                 id="user-wildcard-over-a-per-tenant-entry"),
])
def test_catalog_errors_name_the_key(catalog: Path, entry: dict[str, Any],
                                     message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        expand_provider(entry, where="providers[0]", catalog=catalog)


def test_a_user_may_list_their_own_hosts_over_a_catalog_wildcard(catalog: Path) -> None:
    """The wildcard rule is about what the catalog supplies: a user who names the host
    they mean overrides it (their own wildcard is their explicit choice)."""
    got = expand_provider(_user(provider="wild", hosts=["acme.my.wild.example"]), where="p",
                          catalog=catalog)
    assert got["hosts"] == ["acme.my.wild.example"]


def test_parse_settings_expands_catalog_entries(catalog: Path) -> None:
    data = {"identity": {"issuer": "i", "audience": "a", "hs256_secret_env": "X",
                         "algorithms": ["HS256"]},
            "providers": [_user(provider="chat"),
                          _user(provider="crm", parameters={"instance": "acme"})]}
    s = parse_settings(data, catalog=catalog)
    assert [p.id for p in s.providers] == ["chat", "crm"]
    with pytest.raises(ConfigError, match=r"config: providers\[1\]\.provider: unknown"):
        parse_settings({**data, "providers": [_user(provider="chat"), _user(provider="x")]},
                       catalog=catalog)


def test_describe_catalog_lists_needed_parameters(catalog: Path) -> None:
    listed = {e["id"]: e for e in describe_catalog(catalog)}
    assert listed["crm"]["parameters"] == ["instance"] and listed["crm"]["title"] == (
        "CRM (one org)")
    assert listed["tenant"]["parameters"] == [] and listed["tenant"]["revocation"] == "none"
    assert listed["gh"]["parameters"] == []  # {client_id} comes from the entry


# -- the shipped catalog (proxy/catalog/*.yaml), whatever it holds -------------------------
SHIPPED = catalog_ids(builtin_catalog())


@pytest.mark.skipif(not SHIPPED, reason="proxy/catalog/ has no entries yet")
@pytest.mark.parametrize("catalog_id", SHIPPED)
def test_every_shipped_entry_loads_and_uses_registered_reasons(catalog_id: str) -> None:
    """Each catalog entry validates with only a client and its parameters (placeholder
    values), routes a wildcard only as the ceiling of grants bound to their tenant (its
    own hosts and each resource's: docs/tenants.md), and every provider code it maps to
    re-auth is a registered reason (so it is counted under its own name)."""
    (facts,) = [e for e in describe_catalog() if e["id"] == catalog_id]
    assert "error" not in facts, facts
    entry = _user(provider=catalog_id, parameters={n: "tenant1" for n in facts["parameters"]})
    p = ProviderSettings.model_validate(expand_provider(entry, where="p"))
    assert p.grant_hosts or not any("*" in h for h in p.hosts)
    for r in p.resources.values():
        assert r.grant_hosts or not any("*" in h for h in r.hosts)
    for code in [*p.token_errors.reauth, *p.api_signals.reauth]:
        assert reasons.from_provider_code(code) in reasons.REGISTRY, code


@pytest.mark.parametrize("value", [True, "3600", 3600.5, 0, -1])
def test_default_expires_in_is_a_whole_positive_number(value: Any) -> None:
    with pytest.raises(ValidationError):
        provider(default_expires_in=value)
