"""Scope choice within a ceiling, and the self-service page's HTTP contract, through the
real stack: the authorization server (which can grant less than asked), credproxy's admin
server and proxy, the vault, real HTTP clients and the real ``credproxy connect`` CLI.

The provider ``docs`` defaults to read-only, may be given write (its ``scope_ceiling``) and
needs read (``required_scopes``). The page in a real browser: test_selfservice_browser.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest

from devstack.redisproc import RedisServer
from devstack.stack import Stack, build_stack
from proxy.devkeys import mint

pytestmark = pytest.mark.integration

READ, WRITE = "documents.read", "documents.write"


def scoped_stack(tmp: Path, **provider: object) -> Stack:
    """A stack whose ``docs`` provider has a scope ceiling (read by default, write
    allowed, read required) and ``provider`` over that."""
    stack = build_stack(tmp, start_proxy=False)
    docs = stack.config["providers"][0]
    docs.update({"scopes": [READ], "scope_ceiling": [READ, WRITE],
                 "required_scopes": [READ], **provider})
    stack.write_config()
    try:
        stack.start_proxy()
    except Exception:
        stack.close()
        raise
    return stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = scoped_stack(tmp_path_factory.mktemp("scopes"))
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _reset(stack: Stack) -> Iterator[None]:
    yield
    with stack.admin() as c:
        c.post("/_admin/reset")


def _admin(stack: Stack) -> str:
    return f"http://{stack.config['admin']}"


def _browser() -> httpx2.Client:
    return httpx2.Client(follow_redirects=False, timeout=20, trust_env=False)


def _authorize_calls(stack: Stack) -> int:
    return int(stack.stats()["authorize_calls"])


def _connect_audit(stack: Stack, user: str) -> list[dict[str, object]]:
    return [r for r in stack.audit_records()
            if r["event"] == "connection.created" and r["user"] == user]


# -- the ceiling, at connect ------------------------------------------------------------

@pytest.mark.parametrize("scope,reason", [
    pytest.param("documents.admin", "scope_not_allowed", id="outside-ceiling"),
    pytest.param(f"{READ} documents.admin", "scope_not_allowed", id="one-of-two-outside"),
    pytest.param(f"{READ},documents.admin", "scope_not_allowed", id="comma-list"),
    pytest.param(f"{READ} DOCUMENTS.WRITE", "scope_not_allowed", id="case-differs"),
    pytest.param(f'{READ} "{WRITE}"', "scope_not_allowed", id="quoted"),
    pytest.param(f"{READ} {WRITE}x", "scope_not_allowed", id="suffix"),
    pytest.param(WRITE, "required_scope_not_requested", id="without-required"),
])
def test_a_web_connect_outside_the_ceiling_is_refused_before_the_provider(
        stack: Stack, scope: str, reason: str) -> None:
    user = f"ceil-{reason}-{abs(hash(scope)) % 10_000}"
    before = _authorize_calls(stack)
    with _browser() as b:
        r = b.get(f"{_admin(stack)}/connect/docs",
                  params={"context": stack.context(user), "scope": scope})
    assert r.status_code == 400 and reason in r.text
    assert "location" not in r.headers
    assert _authorize_calls(stack) == before  # the provider was never contacted
    assert stack.vault_get(user) is None
    assert [(a["outcome"], a["reason"]) for a in _connect_audit(stack, user)] == [
        ("rejected", reason)]


def test_the_cli_refuses_a_scope_outside_the_ceiling(stack: Stack) -> None:
    before = _authorize_calls(stack)
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "connect", "--config",
                        str(stack.config_path), "--user", "cli-ceil", "--provider", "docs",
                        "--scope", READ, "--scope", "documents.admin", "--timeout", "5"],
                       capture_output=True, text=True, env={**os.environ, **stack.env},
                       timeout=60)
    assert r.returncode == 1
    assert "scope_ceiling" in r.stderr and "scope_not_allowed" in r.stderr
    assert "http" not in r.stderr.split("scope_ceiling")[0]  # no authorize URL was printed
    assert _authorize_calls(stack) == before


def _consent(stack: Stack, b: httpx2.Client, user: str, scope: str | None) -> httpx2.Response:
    """The web flow up to the callback's answer (login_hint stands in for the login)."""
    params = {"context": stack.context(user)}
    if scope is not None:
        params["scope"] = scope
    r = b.get(f"{_admin(stack)}/connect/docs", params=params)
    assert r.status_code == 302, r.text
    with httpx2.Client(verify=stack.admin_tls(), follow_redirects=False, timeout=20,
                       trust_env=False) as provider:
        callback = provider.get(r.headers["location"] + f"&login_hint={user}")
    assert callback.status_code == 302
    return b.get(callback.headers["location"])


def test_a_choice_within_the_ceiling_is_asked_for_granted_and_stored(stack: Stack) -> None:
    user = "ceil-write"
    with _browser() as b:
        r = b.get(f"{_admin(stack)}/connect/docs",
                  params={"context": stack.context(user), "scope": f"{WRITE} {READ}"})
        # In the ceiling's order, whatever order they were asked in.
        assert parse_qs(urlsplit(r.headers["location"]).query)["scope"] == [
            f"{READ} {WRITE}"]
        done = _consent(stack, b, user, f"{WRITE} {READ}")
    assert done.status_code == 200 and f"{READ} {WRITE}" in done.text
    assert stack.vault_get(user).tokens.scope == f"{READ} {WRITE}"
    assert [(a["outcome"], a["reason"]) for a in _connect_audit(stack, user)][-1] == (
        "connected", None)


def test_no_choice_asks_for_the_default_scopes(stack: Stack) -> None:
    user = "ceil-default"
    with _browser() as b:
        done = _consent(stack, b, user, None)
    assert done.status_code == 200
    assert stack.vault_get(user).tokens.scope == READ


def test_a_grant_narrower_than_required_is_reported_at_connect(stack: Stack) -> None:
    user = "ceil-narrowed"
    with stack.admin() as c:  # the user unticks "read" at the provider's consent screen
        c.post("/_admin/consent", json={"drop": [READ]}).raise_for_status()
    with _browser() as b:
        done = _consent(stack, b, user, f"{READ} {WRITE}")
        assert done.status_code == 200
        assert f"did not grant the required scopes {READ}" in done.text
        assert 'href="/connections"' in done.text
        page = b.get(f"{_admin(stack)}/connections")
    # Stored (it serves what it covers), reported now, on the page and in the audit log.
    assert stack.vault_get(user).tokens.scope == WRITE
    assert page.status_code == 200
    assert re.search(rf'role="alert"[^>]*>docs did not grant the required scopes {READ}',
                     page.text)
    record = _connect_audit(stack, user)[-1]
    assert (record["outcome"], record["reason"]) == ("connected",
                                                     "required_scope_not_granted")
    assert f"missing_required={READ}" in str(record["detail"])
    assert record["actor"] == {"kind": "user", "id": user}


def test_the_step_up_link_stays_within_the_ceiling(tmp_path: Path) -> None:
    """An upstream that asks for a scope outside the ceiling: the 403 says an operator must
    widen ``scope_ceiling``, and following its connect_url is refused before the
    provider is contacted."""
    s = build_stack(tmp_path / "s", start_proxy=False)
    try:
        api = s.echo_server(tls=True, name="admin-api", required_scope="documents.admin")
        docs = s.config["providers"][0]
        docs.update({"scopes": [READ], "scope_ceiling": [READ, WRITE],
                     "hosts": [*docs["hosts"], f"localhost:{api.url.rsplit(':', 1)[1]}"]})
        s.write_config()
        s.start_proxy()
        user = "stepper"
        s.vault_put(user, s.grant(user))
        with s.client(context=s.context(user)) as c:
            r = c.get(f"https://localhost:{api.url.rsplit(':', 1)[1]}/documents")
        assert r.status_code == 403, r.text
        body = r.json()
        assert "documents.admin is not in providers[docs].scope_ceiling" in body["detail"]
        before = _authorize_calls(s)
        url = body["connect_url"]
        with _browser() as b:
            r = b.get(f"{url}&{httpx2.QueryParams({'context': s.context(user)})}")
        assert r.status_code == 400 and "scope_not_allowed" in r.text
        assert _authorize_calls(s) == before
    finally:
        s.close()


# -- the self-service page: its HTTP contract -------------------------------------------

def _sign_in(stack: Stack, b: httpx2.Client, user: str) -> tuple[str, dict[str, str]]:
    """Hand the context over once; returns the page and its forms' ids by provider."""
    r = b.get(f"{_admin(stack)}/connections", params={"context": stack.context(user)})
    assert r.status_code == 200 and "url=/connections" in r.text
    page = b.get(f"{_admin(stack)}/connections")
    assert page.status_code == 200
    ids = dict(zip(re.findall(r'<h2 id="[^"]+">([^<]+)</h2>', page.text),
                   re.findall(r'<section aria-labelledby="p-(c[0-9a-f]+)-h"', page.text),
                   strict=True))
    return page.text, ids


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found
    return found.group(1)


def test_the_session_cookie_is_httponly_strict_short_and_not_in_the_url(stack: Stack) -> None:
    with _browser() as b:
        r = b.get(f"{_admin(stack)}/connections", params={"context": stack.context("ck")})
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("credproxy_session=")
    attrs = {a.strip().split("=")[0].lower(): a.strip() for a in cookie.split(";")[1:]}
    assert "httponly" in attrs and attrs["samesite"].lower() == "samesite=strict"
    assert attrs["max-age"] == "Max-Age=900" and attrs["path"] == "Path=/"
    assert "secure" not in attrs  # served over http here; https: see the ingress test
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["referrer-policy"] == "no-referrer"
    # The reload drops the context from the URL.
    assert "url=/connections'" in r.text


def test_the_page_lists_only_the_users_own_connections(stack: Stack) -> None:
    mine, theirs = "page-me", "page-them"
    stack.vault_put(mine, stack.grant(mine))
    stack.vault_put(theirs, stack.grant(theirs))
    with stack.client(context=stack.context(mine)) as c:  # a use, noted for "last used"
        assert c.get(f"{stack.docs_url}/documents").status_code == 200
    with _browser() as b:
        page, ids = _sign_in(stack, b, mine)
    assert set(ids) == {"docs", "keyed", "wild"}
    assert f"Signed in as {mine}." in page and theirs not in page
    docs = page.split('<h2 id="p-')[1]
    assert "<dd>Connected</dd>" in docs and f"<dd>{READ}</dd>" in docs
    assert "Last used</dt><dd><time" in docs  # noted through the coordinator
    assert "(required)" in docs and f'value="{WRITE}"' in docs  # the ceiling, offered
    assert stack.vault_get(mine).tokens.access_token.reveal() not in page


def test_a_providers_claim_limits_the_page(stack: Stack) -> None:
    with _browser() as b:
        b.get(f"{_admin(stack)}/connections",
              params={"context": stack.context("page-claim", providers=["docs"])})
        page = b.get(f"{_admin(stack)}/connections").text
    assert re.findall(r'<h2 id="[^"]+">([^<]+)</h2>', page) == ["docs"]


@pytest.mark.parametrize("cookie", [
    pytest.param(None, id="none"),
    pytest.param("", id="empty"),
    pytest.param("AAAA", id="short"),
    pytest.param("x" * 5000, id="huge"),
    pytest.param("tampered", id="tampered"),
])
def test_the_page_without_a_valid_session_is_401(stack: Stack, cookie: str | None) -> None:
    with _browser() as b:
        if cookie == "tampered":
            b.get(f"{_admin(stack)}/connections", params={"context": stack.context("tam")})
            real = b.cookies["credproxy_session"]
            cookie = real[:-4] + ("AAAA" if real[-4:] != "AAAA" else "BBBB")
            b.cookies.clear()
        if cookie is not None:
            b.cookies.set("credproxy_session", cookie)
        r = b.get(f"{_admin(stack)}/connections")
    assert r.status_code == 401 and "Open the connections link from your agent" in r.text


@pytest.mark.parametrize("claims", [
    pytest.param(None, id="garbage"),
    pytest.param({"ttl": -300}, id="expired"),
    pytest.param({"audience": "someone-else"}, id="audience"),
    pytest.param({"issuer": "https://evil.example"}, id="issuer"),
])
def test_a_bad_context_opens_no_session(stack: Stack, claims: dict[str, object] | None
                                        ) -> None:
    token = "not-a-jws"
    if claims is not None:
        fields: dict[str, object] = {"sub": "bad", "key_file": str(stack.context_key),
                                     "issuer": stack.config["identity"]["issuer"],
                                     "audience": stack.config["identity"]["audience"],
                                     **claims}
        token = mint(**fields).reveal()  # type: ignore[arg-type]
    with _browser() as b:
        r = b.get(f"{_admin(stack)}/connections", params={"context": token})
    assert r.status_code == 401 and "set-cookie" not in r.headers
    assert token not in r.text


def _post(b: httpx2.Client, stack: Stack, action: str, data: dict[str, str],
          headers: dict[str, str] | None = None) -> httpx2.Response:
    return b.post(f"{_admin(stack)}/connections/{action}", data=data,
                  headers={"Origin": _admin(stack), **(headers or {})})


@pytest.mark.parametrize("action", ["disconnect", "connect"])
@pytest.mark.parametrize("bad,status,says", [
    pytest.param({"headers": {"Origin": "https://evil.example"}}, 403, "another origin",
                 id="foreign-origin"),
    pytest.param({"headers": {"Origin": "null"}}, 403, "another origin", id="null-origin"),
    pytest.param({"headers": {"Sec-Fetch-Site": "cross-site"}}, 403, "cross-site",
                 id="sec-fetch-cross-site"),
    pytest.param({"headers": {"Sec-Fetch-Site": "same-site"}}, 403, "cross-site",
                 id="sec-fetch-same-site"),
    pytest.param({"no_origin": True}, 403, "without Origin", id="no-origin"),
    pytest.param({"csrf": ""}, 403, "security token", id="empty-csrf"),
    pytest.param({"csrf": None}, 403, "security token", id="no-csrf"),
    pytest.param({"csrf": "x" * 43}, 403, "security token", id="wrong-csrf"),
    pytest.param({"connection": "other"}, 404, "No connection of yours", id="other-users-id"),
    pytest.param({"connection": "c" + "0" * 24}, 404, "No connection of yours",
                 id="made-up-id"),
    pytest.param({"connection": "docs"}, 404, "No connection of yours", id="provider-name"),
    pytest.param({"connection": None}, 404, "No connection of yours", id="no-id"),
    pytest.param({"cookie": None}, 401, "session is missing", id="no-session"),
])
def test_a_refused_post_changes_nothing(stack: Stack, action: str, bad: dict[str, object],
                                        status: int, says: str) -> None:
    me, other = f"post-me-{action}", f"post-other-{action}"
    for u in (me, other):
        if stack.vault_get(u) is None:
            stack.vault_put(u, stack.grant(u))
    token = stack.vault_get(me).tokens.access_token.reveal()
    other_token = stack.vault_get(other).tokens.access_token.reveal()
    before = _authorize_calls(stack)
    with _browser() as theirs:
        _, other_ids = _sign_in(stack, theirs, other)
    with _browser() as b:
        page, ids = _sign_in(stack, b, me)
        data = {"csrf": _csrf(page), "connection": ids["docs"], "scope": READ}
        for key in ("csrf", "connection"):
            if key in bad:
                value = bad[key]
                if value is None:
                    del data[key]
                else:
                    data[key] = other_ids["docs"] if value == "other" else str(value)
        headers = dict(bad.get("headers", {}))  # type: ignore[call-overload]
        if "cookie" in bad:
            b.cookies.clear()
        if bad.get("no_origin"):
            r = b.post(f"{_admin(stack)}/connections/{action}", data=data)
        else:
            r = _post(b, stack, action, data, headers)
    assert r.status_code == status, r.text
    assert says in r.text and "nothing was changed" in r.text
    # Nothing revoked, here or at the authorization server; no flow begun.
    for u, t in ((me, token), (other, other_token)):
        assert stack.vault_get(u).tokens.access_token.reveal() == t
        assert stack.introspect(t)["active"] is True
    assert _authorize_calls(stack) == before
    assert not [r for r in stack.audit_records()
                if r["user"] in (me, other) and r["event"] == "connection.revoked"]


def test_disconnect_revokes_upstream_like_offboarding(stack: Stack) -> None:
    user = "page-disconnect"
    stack.vault_put(user, stack.grant(user))
    token = stack.vault_get(user).tokens.access_token.reveal()
    with _browser() as b:
        page, ids = _sign_in(stack, b, user)
        r = _post(b, stack, "disconnect", {"csrf": _csrf(page), "connection": ids["docs"]})
    assert r.status_code == 200
    assert re.search(r'role="status">Disconnected docs: refresh and access tokens revoked',
                     r.text)
    assert stack.vault_get(user) is None
    assert stack.introspect(token)["active"] is False
    revoked = [a for a in stack.audit_records()
               if a["user"] == user and a["event"] == "connection.revoked"]
    assert [(a["outcome"], a["actor"]) for a in revoked] == [
        ("revoked", {"kind": "user", "id": user})]
    with stack.client(context=stack.context(user)) as c:
        assert c.get(f"{stack.docs_url}/documents").status_code == 401


@pytest.mark.parametrize("scopes,status,says", [
    pytest.param([], 400, "Choose at least one scope", id="none-ticked"),
    pytest.param(["documents.admin"], 400, "scope_not_allowed", id="outside"),
    pytest.param([READ, "documents.admin"], 400, "scope_not_allowed", id="one-outside"),
    pytest.param([WRITE], 400, "required_scope_not_requested", id="required-left-out"),
])
def test_a_page_connect_outside_the_ceiling_is_refused(stack: Stack, scopes: list[str],
                                                      status: int, says: str) -> None:
    user = "page-ceil"
    before = _authorize_calls(stack)
    with _browser() as b:
        page, ids = _sign_in(stack, b, user)
        r = b.post(f"{_admin(stack)}/connections/connect",
                   data={"csrf": _csrf(page), "connection": ids["docs"], "scope": scopes},
                   headers={"Origin": _admin(stack)})
    assert r.status_code == status and says in r.text and 'role="alert"' in r.text
    assert _authorize_calls(stack) == before and stack.vault_get(user) is None


def test_a_page_connect_asks_for_the_ticked_scopes(stack: Stack) -> None:
    user = "page-connect"
    with _browser() as b:
        page, ids = _sign_in(stack, b, user)
        r = b.post(f"{_admin(stack)}/connections/connect",
                   data={"csrf": _csrf(page), "connection": ids["docs"],
                         "scope": [WRITE, READ]},
                   headers={"Origin": _admin(stack)})
        assert r.status_code == 303
        assert parse_qs(urlsplit(r.headers["location"]).query)["scope"] == [
            f"{READ} {WRITE}"]
        state_cookie = [c for c in r.headers.get_list("set-cookie")
                        if c.startswith("credproxy_connect_")]
        assert state_cookie and "Path=/oauth/callback" in state_cookie[0]
        with httpx2.Client(verify=stack.admin_tls(), follow_redirects=False,
                           trust_env=False) as provider:
            callback = provider.get(r.headers["location"] + f"&login_hint={user}")
        done = b.get(callback.headers["location"])
    assert done.status_code == 200
    assert stack.vault_get(user).tokens.scope == f"{READ} {WRITE}"
    record = _connect_audit(stack, user)[-1]
    assert record["actor"] == {"kind": "user", "id": user}


def test_the_session_cookie_is_secure_behind_an_https_public_url(tmp_path: Path) -> None:
    s = build_stack(tmp_path / "s", start_proxy=False)
    try:
        ingress = s.ingress()
        s.write_config(public_url=ingress.url)
        s.start_proxy()
        with httpx2.Client(verify=s.admin_tls(), follow_redirects=False, timeout=20,
                           trust_env=False) as b:
            r = b.get(f"{ingress.url}/connections", params={"context": s.context("tls")})
        cookie = r.headers["set-cookie"]
        assert "; Secure" in cookie and "SameSite=Strict" in cookie
    finally:
        s.close()


def test_a_context_in_the_header_opens_the_page_at_once(stack: Stack) -> None:
    user = "page-header"
    with _browser() as b:
        r = b.get(f"{_admin(stack)}/connections",
                  headers={"X-User-Context": stack.context(user)})
        assert r.status_code == 200 and f"Signed in as {user}." in r.text
        assert r.headers["set-cookie"].startswith("credproxy_session=")
        # The forms carry the CSRF token of the session just opened: a POST works.
        ids = re.findall(r'<section aria-labelledby="p-(c[0-9a-f]+)-h"', r.text)
        answer = _post(b, stack, "disconnect", {"csrf": _csrf(r.text), "connection": ids[0]})
    assert answer.status_code == 200 and "was not connected" in answer.text


def test_a_context_sent_twice_opens_no_session(stack: Stack) -> None:
    with _browser() as b:
        r = b.get(f"{_admin(stack)}/connections",
                  headers=[("X-User-Context", stack.context("twice")),
                           ("X-User-Context", stack.context("other"))])
    assert r.status_code == 401 and "duplicate_header" in r.text
    assert "set-cookie" not in r.headers


def test_replicas_share_sessions_last_use_and_disconnect_through_redis(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """Two replicas on one Redis: a session opened on one is good on the other, the page on
    one shows a use through the other, and a disconnect on one stops the other at once."""
    s = build_stack(tmp_path / "s", start_proxy=False,
                    config={"coordination": {"backend": "redis", "url": redis_server.url,
                                             "key_prefix": "page:"}})
    try:
        one, two = s.start_replicas(2)
        user = "replica-user"
        s.vault_put(user, s.grant(user))
        token = s.vault_get(user).tokens.access_token.reveal()
        with httpx2.Client(proxy=str(one.info["proxy_url"]), verify=s.mitm_tls(),
                           trust_env=False, timeout=30,
                           headers={"X-User-Context": s.context(user)}) as agent:
            assert agent.get(f"{s.docs_url}/documents").status_code == 200
            with _browser() as b:
                b.get(f"{one.info['admin_url']}/connections",
                      params={"context": s.context(user)})
                other = str(two.info["admin_url"])
                page = b.get(f"{other}/connections")  # the cookie of replica one
                assert page.status_code == 200 and f"Signed in as {user}." in page.text
                docs = page.text.split('<h2 id="p-')[1]
                assert "Last used</dt><dd><time" in docs
                connection = re.findall(r'<section aria-labelledby="p-(c[0-9a-f]+)-h"',
                                        page.text)[0]
                r = b.post(f"{other}/connections/disconnect",
                           data={"csrf": _csrf(page.text), "connection": connection},
                           headers={"Origin": other})
                assert r.status_code == 200 and "Disconnected docs" in r.text
            refused = agent.get(f"{s.docs_url}/documents")
        assert refused.status_code == 401
        assert refused.headers["x-credproxy-error"] == "reauth-required"
        assert s.introspect(token)["active"] is False
    finally:
        s.close()


def test_the_page_shows_the_account_the_provider_reports(stack: Stack) -> None:
    user = "page-account"
    with stack.admin() as c:  # the code exchange returns an OpenID Connect ID token
        c.post("/_admin/consent", json={"id_token": {"email": "alice@corp.example",
                                                      "preferred_username": "alice"}}
               ).raise_for_status()
    with _browser() as b:
        assert _consent(stack, b, user, None).status_code == 200
        page = b.get(f"{_admin(stack)}/connections").text
    docs = page.split('<h2 id="p-')[1]
    assert "<dt>Account</dt><dd>alice@corp.example</dd>" in docs
    assert stack.vault_get(user).values["account"] == "alice@corp.example"
    # Only the claim: the ID token itself is not kept, logged or shown.
    assert "eyJ" not in page and "eyJ" not in stack.proxy.stdout_text()  # type: ignore[union-attr]
