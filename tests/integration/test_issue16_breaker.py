"""Trying to break issue 16 (scope choice within a ceiling, the self-service page, the kill
switch) as a new user would, through the real stack: the real ``credproxy run`` sidecar,
the authorization server, real HTTP clients and the real ``credproxy`` CLI.

Tests whose docstring starts with "Was a FAULT" failed on the product when a fresh tester
wrote them (all are fixed); the others are variants where it held.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import httpx2
import pytest
import yaml

from devstack.stack import Stack, build_stack
from tests.integration.test_killswitch import cli, get, suspended, within
from tests.integration.test_scopes_page import (
    READ,
    WRITE,
    _admin,
    _authorize_calls,
    _browser,
    _connect_audit,
    _consent,
    _csrf,
    _sign_in,
    scoped_stack,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = scoped_stack(tmp_path_factory.mktemp("breaker16"))
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _reset(stack: Stack) -> Iterator[None]:
    yield
    with stack.admin() as c:
        c.post("/_admin/reset")


_n = iter(range(1_000_000))


def _user(prefix: str) -> str:
    return f"{prefix}-{next(_n)}"


# -- item 1: scopes outside the ceiling, in every spelling ------------------------------------


def test_a_second_scope_parameter_outside_the_ceiling_is_refused(stack: Stack) -> None:
    """Was a FAULT (item 1): ``/connect/docs?scope=documents.read&scope=documents.admin`` asks for
    a scope outside the ceiling; it must be refused (400, ``scope_not_allowed`` or a
    "scope sent twice" error) before the provider is contacted. Today the first copy wins
    silently: the second is dropped, the browser is redirected to the provider."""
    user = _user("dup-scope")
    before = _authorize_calls(stack)
    with _browser() as b:
        r = b.get(f"{_admin(stack)}/connect/docs?{_qs(stack, user)}"
                  f"&scope={READ}&scope=documents.admin")
    assert r.status_code == 400, (r.status_code, r.headers.get("location"))
    assert "location" not in r.headers
    assert _authorize_calls(stack) == before


def _qs(stack: Stack, user: str) -> str:
    return f"context={quote(stack.context(user))}"


@pytest.mark.parametrize("scope", [
    pytest.param("documents.re\u0430d", id="cyrillic-a-lookalike"),
    pytest.param("\uff44ocuments.read", id="fullwidth-d"),
    pytest.param(f"{READ}\u200b{WRITE}", id="zero-width-space-joined"),
    pytest.param(f"{READ}\u200b", id="zero-width-suffix"),
    pytest.param(f"{READ};{WRITE}", id="semicolon-separator"),
    pytest.param(f"{READ}\uff0c{WRITE}", id="fullwidth-comma"),
    pytest.param(f"{READ}+documents.admin", id="plus-literal"),
    pytest.param("documents.*", id="wildcard"),
    pytest.param("*", id="star"),
    pytest.param(f"{READ} documents.read.admin", id="dotted-extension"),
    pytest.param(f"{READ} Documents.Read", id="case-duplicate"),
    pytest.param(f"{READ} {READ} documents.admin {READ}", id="duplicates-plus-outside"),
    pytest.param(f"{READ}\x00documents.admin", id="nul-joined"),
    pytest.param(f"{READ} <script>alert(1)</script>", id="html"),
    pytest.param(f"{READ} offline_access", id="offline-access-not-in-ceiling"),
    pytest.param(" ".join(f"s{i}" for i in range(600)), id="huge-list"),
])
def test_a_scope_spelling_outside_the_ceiling_is_refused_before_the_provider(
        stack: Stack, scope: str) -> None:
    user = _user("spell")
    before = _authorize_calls(stack)
    with _browser() as b:
        r = b.get(f"{_admin(stack)}/connect/docs",
                  params={"context": stack.context(user), "scope": scope})
    assert 400 <= r.status_code < 500, r.status_code
    assert "location" not in r.headers
    assert "<script>" not in r.text  # the refused choice is escaped on the page
    assert _authorize_calls(stack) == before
    assert stack.vault_get(user) is None


@pytest.mark.parametrize("scope,asked", [
    pytest.param("", READ, id="empty-means-default"),
    pytest.param(" , ,", READ, id="separators-only-means-default"),
    pytest.param(f"{WRITE} {READ} {WRITE} {READ}", f"{READ} {WRITE}", id="duplicates"),
    pytest.param(f"{READ},{WRITE}", f"{READ} {WRITE}", id="comma"),
    pytest.param(f"{READ}\t{WRITE}", f"{READ} {WRITE}", id="tab"),
])
def test_a_choice_within_the_ceiling_asks_exactly_for_it(stack: Stack, scope: str,
                                                          asked: str) -> None:
    with _browser() as b:
        r = b.get(f"{_admin(stack)}/connect/docs",
                  params={"context": stack.context(_user("within")), "scope": scope})
    assert r.status_code == 302, r.text
    assert parse_qs(urlsplit(r.headers["location"]).query)["scope"] == [asked]


@pytest.mark.parametrize("scopes,says", [
    pytest.param([""], "scope_not_allowed", id="empty-arg"),
    pytest.param([f"{READ} {WRITE}"], "scope_not_allowed", id="space-joined-arg"),
    pytest.param(["DOCUMENTS.READ"], "scope_not_allowed", id="upper-case"),
])
def test_the_cli_refuses_scope_spellings_outside_the_ceiling(stack: Stack, scopes: list[str],
                                                             says: str) -> None:
    before = _authorize_calls(stack)
    args = [a for s in scopes for a in ("--scope", s)]
    r = cli(stack, "connect", "--user", _user("cli-spell"), "--provider", "docs", *args,
            "--timeout", "5")
    assert r.returncode == 1 and says in r.stderr, r.stderr
    assert _authorize_calls(stack) == before


# -- item 2: the page --------------------------------------------------------------------------


@pytest.mark.parametrize("scopes", [
    pytest.param([READ, "documents.re\u0430d"], id="lookalike"),
    pytest.param([f"{READ} documents.admin"], id="space-in-one-box"),
    pytest.param([f"{READ},documents.admin"], id="comma-in-one-box"),
    pytest.param([READ, READ, "documents.admin"], id="duplicate-and-outside"),
    pytest.param([""], id="empty-box"),
])
def test_a_page_post_with_a_forged_scope_is_refused(stack: Stack, scopes: list[str]) -> None:
    user = _user("page-forge")
    before = _authorize_calls(stack)
    with _browser() as b:
        page, ids = _sign_in(stack, b, user)
        r = b.post(f"{_admin(stack)}/connections/connect",
                   data={"csrf": _csrf(page), "connection": ids["docs"], "scope": scopes},
                   headers={"Origin": _admin(stack), "Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 400, r.status_code
    assert "location" not in r.headers
    assert _authorize_calls(stack) == before
    assert [a["reason"] for a in _connect_audit(stack, user)] in (
        [], ["scope_not_allowed"])


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("action", ["connect", "disconnect"])
def test_state_changes_only_by_post(stack: Stack, method: str, action: str) -> None:
    user = _user("method")
    stack.vault_put(user, stack.grant(user))
    before = _authorize_calls(stack)
    with _browser() as b:
        page, ids = _sign_in(stack, b, user)
        r = b.request(method, f"{_admin(stack)}/connections/{action}",
                      params={"csrf": _csrf(page), "connection": ids["docs"], "scope": READ},
                      headers={"Origin": _admin(stack), "Sec-Fetch-Site": "same-origin"})
    assert r.status_code in (404, 405), r.status_code
    assert _authorize_calls(stack) == before
    assert stack.vault_get(user) is not None


@pytest.mark.parametrize("headers", [
    pytest.param({"Sec-Fetch-Site": "same-origin", "Origin": "https://evil.example"},
                 id="same-origin-claim-foreign-origin"),
    pytest.param({"Sec-Fetch-Site": "none"}, id="fetch-site-none"),
    pytest.param({"Sec-Fetch-Site": "SAME-ORIGIN"}, id="fetch-site-upper"),
    pytest.param({"Origin": "ORIGIN/path"}, id="origin-with-path"),
    pytest.param({"Origin": "ORIGIN.evil.example"}, id="origin-suffix"),
    pytest.param({"Origin": "ORIGIN, https://evil.example"}, id="origin-list"),
])
def test_a_cross_site_disconnect_in_other_spellings_is_refused(
        stack: Stack, headers: dict[str, str]) -> None:
    user = _user("xsite")
    stack.vault_put(user, stack.grant(user))
    with _browser() as b:
        page, ids = _sign_in(stack, b, user)
        sent = {k: v.replace("ORIGIN", _admin(stack)) for k, v in headers.items()}
        with httpx2.Client(follow_redirects=False, timeout=20, trust_env=False,
                           cookies=b.cookies) as raw:
            r = raw.post(f"{_admin(stack)}/connections/disconnect",
                         data={"csrf": _csrf(page), "connection": ids["docs"]},
                         headers=sent)
    assert r.status_code == 403, r.status_code
    assert stack.vault_get(user) is not None


def test_html_in_the_account_the_provider_reports_is_escaped(stack: Stack) -> None:
    user = _user("xss")
    evil = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    with stack.admin() as c:
        c.post("/_admin/consent", json={"id_token": {"email": evil}}).raise_for_status()
    with _browser() as b:
        assert _consent(stack, b, user, None).status_code == 200
        page = b.get(f"{_admin(stack)}/connections")
    assert page.status_code == 200
    assert "<script>" not in page.text and "<img" not in page.text
    assert "&lt;script&gt;" in page.text
    assert "script-src" not in page.headers["content-security-policy"]  # no script allowed
    assert page.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize("path", ["/connections", "/connections?context=garbage"])
def test_every_page_answer_is_uncacheable_and_unframable(stack: Stack, path: str) -> None:
    with _browser() as b:
        r = b.get(f"{_admin(stack)}{path}")
    assert r.status_code == 401
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-frame-options"] == "DENY"


def test_the_hand_over_answer_leaks_no_context_by_referer(stack: Stack) -> None:
    ctx = stack.context(_user("ref"))
    with _browser() as b:
        r = b.get(f"{_admin(stack)}/connections", params={"context": ctx})
    assert r.status_code == 200
    assert r.headers["referrer-policy"] == "no-referrer"
    assert ctx not in r.text
    assert ctx not in (stack.proxy.stdout_text() + stack.proxy.stderr_text())  # type: ignore[union-attr]


# -- item 3: the kill switch -------------------------------------------------------------------


def test_a_user_context_with_a_long_context_id_can_be_suspended(stack: Stack) -> None:
    """Was a FAULT (item 3): the proxy accepts a user context whose ``ctx.id`` is longer than
    256 characters (the verifier bounds ``sub`` and ``jti``, not ``ctx.id``), but
    ``credproxy suspend --context-id`` refuses any id over 256 characters ("must be 1-256
    characters"): that chat or workflow run cannot be stopped by its context id, and its
    requests keep getting credentials. Expected: either the verifier refuses such a context
    (then nothing is injected for it) or the suspension takes it; either way no credential
    goes out for it after the command."""
    user = _user("long-ctx")
    stack.vault_put(user, stack.grant(user))
    run = "run-" + "7f3a" * 70  # 284 characters: a long workflow-run URN
    ctx = stack.context(user, ctx_id=run)
    first = get(stack, stack.proxy_url, ctx)
    r = cli(stack, "suspend", "--context-id", run, "--reason", "agent loop")
    if first.status_code == 200:  # the context was accepted, so it must be suspendable
        assert r.returncode == 0, r.stderr
        within("long context id suspended",
               lambda: suspended(get(stack, stack.proxy_url, ctx)), 1.0)
        cli(stack, "resume", "--context-id", run, "--reason", "done")


@pytest.mark.parametrize("sub", [
    pytest.param(" padded", id="leading-space"),
    pytest.param("padded ", id="trailing-space"),
    pytest.param("tab\tuser", id="tab"),
])
def test_every_user_the_proxy_accepts_can_be_suspended(stack: Stack, sub: str) -> None:
    """Was a FAULT (item 3): the verifier accepts any ``sub`` up to 256 characters, including
    surrounding spaces and control characters, and injects that user's grant; but
    ``credproxy suspend --user`` refuses such a value ("without control characters or
    surrounding spaces"), so that user cannot be suspended. Expected: every user the proxy
    serves can be suspended (or the verifier refuses such a ``sub``)."""
    user = sub.replace("padded", f"padded{next(_n)}").replace("tab", f"tab{next(_n)}")
    stack.vault_put(user, stack.grant(user))
    ctx = stack.context(user)
    first = get(stack, stack.proxy_url, ctx)
    if first.status_code != 200:
        return  # refused up front: nothing can leak
    r = cli(stack, "suspend", "--user", user, "--reason", "left")
    assert r.returncode == 0, r.stderr
    try:
        within("odd user suspended", lambda: suspended(get(stack, stack.proxy_url, ctx)), 1.0)
    finally:
        cli(stack, "resume", "--user", user, "--reason", "back")


def test_forms_combine_and_resume_lifts_only_its_own(stack: Stack) -> None:
    """Suspend a user and the provider; resuming the user leaves the provider's in force
    (the 403 names it), resuming the provider restores access; every step audited."""
    user = _user("combo")
    stack.vault_put(user, stack.grant(user))
    ctx = stack.context(user)
    assert get(stack, stack.proxy_url, ctx).status_code == 200
    assert cli(stack, "suspend", "--user", user, "--reason", "u").returncode == 0
    assert cli(stack, "suspend", "--provider", "docs", "--reason",
               "INC-42 secret words").returncode == 0
    try:
        within("both", lambda: suspended(get(stack, stack.proxy_url, ctx)), 1.0)
        assert get(stack, stack.proxy_url, ctx).json()["suspension"]["kind"] == "user"
        assert cli(stack, "resume", "--user", user, "--reason", "u").returncode == 0
        within("provider still", lambda: get(stack, stack.proxy_url, ctx).json().get(
            "suspension", {}).get("kind") == "provider", 1.0)
        r = get(stack, stack.proxy_url, ctx)
        assert suspended(r) and "secret words" not in r.text  # the reason is never shown
        metrics = httpx2.get(f"{_admin(stack)}/metrics", trust_env=False).text
        assert 'credproxy_suspensions{kind="provider"} 1.0' in metrics
    finally:
        assert cli(stack, "resume", "--provider", "docs", "--reason", "p").returncode == 0
    within("resumed", lambda: get(stack, stack.proxy_url, ctx).status_code == 200, 1.0)
    again = cli(stack, "resume", "--provider", "docs", "--reason", "p")
    assert again.returncode == 1 and "not suspended" in again.stderr


def test_a_suspended_user_cannot_start_a_connect_that_injects(stack: Stack) -> None:
    """A suspended user connects nothing new (decision: a user who left must not add
    grants while suspended): the connect link is refused before the provider, nothing is
    stored, and nothing is injected until resume."""
    user = _user("susp-connect")
    assert cli(stack, "suspend", "--user", user, "--reason", "left").returncode == 0
    try:
        time.sleep(0.5)
        with _browser() as b:
            r = b.get(f"{_admin(stack)}/connect/docs", params={"context": stack.context(user)})
        assert r.status_code == 400 and "suspended" in r.text, r.text
        assert stack.vault_get(user) is None
        assert suspended(get(stack, stack.proxy_url, stack.context(user)))
    finally:
        cli(stack, "resume", "--user", user, "--reason", "x")


def test_a_csrf_token_of_another_session_of_the_same_user_is_refused(stack: Stack) -> None:
    user = _user("csrf-other")
    stack.vault_put(user, stack.grant(user))
    with _browser() as old, _browser() as new:
        old_page, _ = _sign_in(stack, old, user)
        _, ids = _sign_in(stack, new, user)
        r = new.post(f"{_admin(stack)}/connections/disconnect",
                     data={"csrf": _csrf(old_page), "connection": ids["docs"]},
                     headers={"Origin": _admin(stack), "Sec-Fetch-Site": "same-origin"})
        cookie = new.cookies.get("credproxy_session")
    assert r.status_code == 403 and "nothing was" in r.text
    assert stack.vault_get(user) is not None
    assert cookie and cookie not in (stack.proxy.stdout_text()  # type: ignore[union-attr]
                                     + stack.proxy.stderr_text())  # type: ignore[union-attr]


def test_a_suspend_run_away_from_the_proxy_with_key_vault_takes_effect_or_fails(
        tmp_path: Path) -> None:
    """Was a FAULT (item 3): with ``vault.backend: azure`` (a vault every host shares) and no
    Redis, the suspension goes to ``<ca_dir>/suspensions.json`` on the host that runs the
    command. An operator who runs ``credproxy suspend`` from their own machine (the same
    config; only ``ca_dir``, ``~/.credproxy/ca``, is theirs), as ``credproxy revoke``
    works from there, is told "suspended ... the running proxy refuses its requests within
    1 s" (exit 0), yet the proxy keeps injecting the user's credential. Expected: the
    suspension is kept where every proxy of that vault reads it, or the command fails
    ("NOT suspended") instead of claiming an effect it cannot have."""
    s = build_stack(tmp_path / "kv", keyvault=True)
    try:
        user = "kv-left"
        s.vault_put(user, s.grant(user))
        ctx = s.context(user)
        assert get(s, s.proxy_url, ctx).status_code == 200
        laptop = tmp_path / "laptop.yaml"
        laptop.write_text(yaml.safe_dump({**s.config, "ca_dir": str(tmp_path / "laptop-ca")},
                                         sort_keys=False))
        r = cli(s, "suspend", "--user", user, "--reason", "left the firm", config=laptop)
        if r.returncode == 0:
            assert "refuses its requests within 1 s" in r.stderr
            within("suspended from the laptop",
                   lambda: suspended(get(s, s.proxy_url, ctx)), 1.0)
        else:
            assert "NOT suspended" in r.stderr
    finally:
        s.close()
