"""The scope settings (default, ceiling, required), the self-service page's session
sealing and connection ids, and the account read from an ID token."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from proxy.connect import missing_required, reported_account
from proxy.errors import ConfigError
from proxy.selfservice import Sessions, render
from proxy.settings import ProviderSettings, parse_settings
from tests.proxy.test_settings import config, provider


def _scoped(**keys: Any) -> ProviderSettings:
    return parse_settings(config(provider(**keys))).providers[0]


def test_the_ceiling_defaults_to_the_scopes() -> None:
    p = _scoped(scopes=["read"])
    assert (p.scope_ceiling, p.allowed_scopes, p.required_scopes) == (None, ["read"], [])


def test_a_ceiling_and_required_scopes_within_it() -> None:
    p = _scoped(scopes=["read"], scope_ceiling=["read", "write"], required_scopes=["read"])
    assert (p.allowed_scopes, p.required_scopes) == (["read", "write"], ["read"])


@pytest.mark.parametrize("keys,message", [
    pytest.param({"scopes": ["read", "admin"], "scope_ceiling": ["read"]},
                 "scopes: ['admin'] not in scope_ceiling", id="default-outside"),
    pytest.param({"scopes": ["read"], "required_scopes": ["write"]},
                 "required_scopes: ['write'] not in scope_ceiling", id="required-outside"),
    pytest.param({"scopes": ["read"], "scope_ceiling": ["read"],
                  "required_scopes": ["write"]},
                 "required_scopes: ['write'] not in scope_ceiling", id="required-outside-2"),
    pytest.param({"scopes": ["read"], "scope_ceiling": []},
                 "scopes: ['read'] not in scope_ceiling", id="empty-ceiling"),
    pytest.param({"scope_ceiling": ["read write"]}, "scope_ceiling[0]", id="space"),
    pytest.param({"scope_ceiling": ['re"ad']}, "scope_ceiling[0]", id="quote"),
    pytest.param({"scopes": ["a\\b"]}, "scopes[0]", id="backslash"),
    pytest.param({"required_scopes": ["é"]}, "required_scopes[0]", id="non-ascii"),
    pytest.param({"scope_ceiling": "read"}, "scope_ceiling", id="not-a-list"),
])
def test_bad_scope_settings_name_the_key(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _scoped(**keys)
    assert "providers[0]" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("scope,missing", [
    ("read write", []), ("write", ["read"]), ("", ["read"]), (None, []),
    ("read,write", []),  # a comma-separated answer (Slack-style providers)
])
def test_missing_required(scope: str | None, missing: list[str]) -> None:
    p = _scoped(scopes=["read"], scope_ceiling=["read", "write"], required_scopes=["read"],
                scope_separator=",")
    assert missing_required(p, scope) == missing


KEY = bytes(range(32))


def test_a_session_round_trips_and_expires() -> None:
    sessions = Sessions(KEY)
    made, cookie = sessions.new("alice", frozenset({"docs"}), ttl=900, now=1000.0)
    got = sessions.read(cookie, now=1899.0)
    assert got == made and got.permits("docs") and not got.permits("other")
    assert sessions.read(cookie, now=1900.0) is None  # expired
    assert "alice" not in cookie and made.csrf not in cookie  # sealed, not signed plaintext


def _flip(cookie: str, at: int) -> str:
    chars = list(cookie)
    chars[at] = "A" if chars[at] != "A" else "B"
    return "".join(chars)


@pytest.mark.parametrize("bad", ["", "x", "====", "a" * 5000, "tamper-first",
                                 "tamper-last", "other-key", "not-base64!"])
def test_a_bad_session_cookie_is_no_session(bad: str) -> None:
    sessions = Sessions(KEY)
    _, cookie = sessions.new("alice", None, ttl=900, now=0.0)
    value = {"tamper-first": _flip(cookie, 0), "tamper-last": _flip(cookie, -2),
             "other-key": Sessions(bytes(32)).new("alice", None, ttl=900, now=0.0)[1]
             }.get(bad, bad)
    assert sessions.read(value, now=1.0) is None


def test_connection_ids_are_per_user_and_key() -> None:
    a, b = Sessions(KEY), Sessions(bytes(32))
    assert a.connection_id("alice", "docs") == a.connection_id("alice", "docs")
    assert a.connection_id("alice", "docs") != a.connection_id("bob", "docs")
    assert a.connection_id("alice", "docs") != a.connection_id("alice", "keyed")
    assert a.connection_id("alice", "docs") != b.connection_id("alice", "docs")
    assert a.connection_id("al", "ice\x00docs") != a.connection_id("al\x00ice", "docs")


def _id_token(claims: dict[str, Any]) -> str:
    def part(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")
    return f"{part({'alg': 'RS256'})}.{part(claims)}.sig"


@pytest.mark.parametrize("response,account", [
    ({"id_token": _id_token({"sub": "1", "email": "a@x.example"})}, "a@x.example"),
    ({"id_token": _id_token({"sub": "1", "preferred_username": "alice"})}, "alice"),
    ({"id_token": _id_token({"sub": "u-1"})}, "u-1"),
    ({"id_token": _id_token({"email": "  "})}, None),
    ({"id_token": _id_token({"email": "a\nb"})}, None),
    ({"id_token": _id_token({"email": 5})}, None),
    ({"id_token": "not.a.jwt!"}, None),
    ({"id_token": "onlyonepart"}, None),
    ({"id_token": 7}, None),
    ({}, None),
])
def test_the_reported_account(response: dict[str, Any], account: str | None) -> None:
    assert reported_account(response) == account


def test_the_page_escapes_what_it_shows() -> None:
    from proxy.selfservice import Row
    row = Row(provider="docs", connection_id="c1", account="<b>me</b>", status="active",
              reason=None, scope="<i>", expires_at=None, last_used=None,
              ceiling=["<s>"], required=[], checked=[], missing=[], choices=[("x", "<y>")])
    page = render("<u>", [row], "csrf")
    assert "<b>me" not in page and "<u>" not in page and "<i>" not in page
    assert "<s>" not in page and "<y>" not in page
    assert "&lt;b&gt;me&lt;/b&gt;" in page
