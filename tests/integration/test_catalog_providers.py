"""Every catalog provider end to end (issue 13, "Done when"): the real sidecar and the real
CLI against :mod:`devstack.fakeprovider`, which reproduces each provider's documented
behaviour (its sources are in the fake's QUIRKS table).

The config entry of each provider is what a user writes: ``provider: <id>``, the client
reference and the parameters, with only the URL and host keys pointed at the fake (user
keys win over the catalog), TLS with the stack's CA and ``allow_http`` false. Per provider:

- connect through the admin server's ``/connect/<id>`` (the fake consents at once): the
  authorize request carries the catalog's extra parameters and scope separator, the code
  exchange its client authentication and token parameters, and the stored credential is
  the user's (never Slack's shared bot token);
- a request through the proxy carries the credential in the catalog's header format;
- an expired token is refreshed; where the provider rotates, the old refresh token is
  never presented again;
- the API's revoked-token signal (401, Slack's HTTP 200 ``ok: false``) is reauth-required;
- a dead refresh token is reauth-required in ONE token-endpoint call, the next request
  makes none;
- ``credproxy revoke`` reports the upstream revocation truthfully for the style (none:
  names the console URL, exit 0; Slack ``ok: false``: not revoked, exit 1).

One stack and one fake process (one port per provider) for the module.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx2
import pytest

from devstack.fakeprovider import QUIRKS
from devstack.procs import Running, start_server
from devstack.stack import Stack, build_stack
from proxy.dialect import describe_catalog, load_catalog_entry

pytestmark = pytest.mark.integration

CATALOG = [entry["id"] for entry in describe_catalog()]
CLIENT_ID = "credproxy-fake-client"
SECRET_ENV = "FAKE_PROVIDER_SECRET"
# The proxy notices another process's vault writes by polling its epoch every 0.25 s.
SETTLE = 0.6


def test_the_fake_covers_every_catalog_entry() -> None:
    """A catalog entry without a fake row would go untested."""
    assert sorted(QUIRKS) == CATALOG


# ---------------------------------------------------------------------------------------
# The stack: the fake, then credproxy configured from the catalog
# ---------------------------------------------------------------------------------------

class Env:
    """The module's stack, the fake, and helpers to drive and inspect them."""

    def __init__(self, stack: Stack, fake: Running, ports: dict[str, int]) -> None:
        self.stack = stack
        self.fake = fake
        self.ports = ports

    def base(self, pid: str) -> str:
        return f"https://localhost:{self.ports[pid]}"

    def fake_call(self, pid: str, what: str, body: Any = None) -> Any:
        with httpx2.Client(verify=self.stack.admin_tls(), timeout=10, trust_env=False) as c:
            if body is None:
                return c.get(f"{self.base(pid)}/_fake/{what}").json()
            r = c.post(f"{self.base(pid)}/_fake/{what}", json=body)
            r.raise_for_status()
            return r.json()

    def requests(self, pid: str, kind: str, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.fake_call(pid, "requests")
                if r["kind"] == kind and all(r.get(k) == v for k, v in match.items())]

    def connect(self, pid: str, user: str) -> None:
        """The browser flow: /connect/<id>, the provider's consent, the callback."""
        admin = f"http://{self.stack.config['admin']}"
        # A store chosen at connect time (Shopify's shop) is the fake's own host.
        choices = {spec.get("param", name): f"localhost:{self.ports[pid]}"
                   for name, spec in (load_catalog_entry(pid).get("grant_values") or {}).items()
                   if spec.get("from") == "choice"}
        with httpx2.Client(verify=self.stack.admin_tls(), follow_redirects=False, timeout=20,
                           trust_env=False) as b:
            r = b.get(f"{admin}/connect/{pid}",
                      params={"context": self.stack.context(user), **choices})
            assert r.status_code == 302, r.text
            authorize = r.headers["location"]
            assert authorize.startswith(f"{self.base(pid)}/authorize?")
            r = b.get(authorize + f"&login_hint={user}")
            assert r.status_code == 302, r.text
            r = b.get(r.headers["location"])
            assert r.status_code == 200 and "now connected" in r.text, r.text

    def call(self, pid: str, user: str, marker: str = "x") -> httpx2.Response:
        with self.stack.client(context=self.stack.context(user)) as c:
            return c.get(f"{self.base(pid)}/api/{marker}")

    def stored(self, pid: str, user: str) -> Any:
        async def get() -> Any:
            vault = self.stack._open_vault()
            try:
                return await vault.get(user, pid)
            finally:
                await vault.close()
        return asyncio.run(get())

    def expire(self, pid: str, user: str) -> Any:
        """Store the user's current tokens as expired (as if their lifetime had passed)."""
        grant = self.stored(pid, user)
        tokens = grant.tokens
        response: dict[str, Any] = {"access_token": tokens.access_token.reveal(),
                                    "expires_in": 0}
        if tokens.refresh_token is not None:
            response["refresh_token"] = tokens.refresh_token.reveal()
        self.stack.vault_put(user, response, provider=pid)
        time.sleep(SETTLE)
        return grant

    def revoke_cli(self, pid: str, user: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", "revoke", "--config",
             str(self.stack.config_path), "--user", user, "--provider", pid],
            env={**os.environ, **self.stack.env}, capture_output=True, text=True,
            timeout=60)


def _entry(pid: str, base: str, port: int) -> dict[str, Any]:
    """What a user writes for ``pid``, with the URL and host keys on the fake."""
    catalog = load_catalog_entry(pid)
    entry: dict[str, Any] = {
        "provider": pid, "client_id": CLIENT_ID, "client_secret_env": SECRET_ENV,
        "hosts": [f"localhost:{port}"], "authorize_url": f"{base}/authorize",
        "token_url": f"{base}/token", "allow_http": False,
    }
    if "revocation_url" in catalog:
        # Keep the catalog's path shape: GitHub's carries {client_id}.
        path = urlsplit(str(catalog["revocation_url"])).path
        entry["revocation_url"] = (f"{base}/applications/{{client_id}}/grant"
                                   if "{client_id}" in path else f"{base}/revoke")
    needed = next(e["parameters"] for e in describe_catalog() if e["id"] == pid)
    if needed:
        entry["parameters"] = {name: f"test-{name}" for name in needed}
    # Discovery calls after connecting go to the fake, on the same path and query.
    discovered = {name: {"url": base + urlsplit(str(spec["url"]))._replace(
                     scheme="", netloc="").geturl()}
                  for name, spec in (catalog.get("grant_values") or {}).items()
                  if spec.get("from") == "discovery"}
    if discovered:
        entry["grant_values"] = discovered
    # A resource of the same grant (Microsoft 365's SharePoint) is the fake reached by IP.
    if catalog.get("resources"):
        entry["resources"] = {rid: {"hosts": [f"127.0.0.1:{port}"]}
                              for rid in catalog["resources"]}
    return entry


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("catalog")
    stack = build_stack(workdir, start_proxy=False)
    secret = secrets.token_urlsafe(24)
    stack.env[SECRET_ENV] = secret
    pki = workdir / "pki"
    fake = start_server(
        ["-m", "devstack.fakeprovider", "--cert", str(pki / "server.pem"),
         "--key", str(pki / "server.key"), "--providers", ",".join(CATALOG),
         "--client-id", CLIENT_ID, "--client-secret-env", SECRET_ENV,
         "--ready-file", str(workdir / "fake.ready")],
        workdir / "fake.ready", env={SECRET_ENV: secret}, log_dir=workdir / "logs",
        name="fakeprovider")
    ports = {k: int(v) for k, v in fake.info["ports"].items()}
    try:
        stack.write_config(providers=[
            _entry(pid, f"https://localhost:{ports[pid]}", ports[pid]) for pid in CATALOG])
        stack.start_proxy()
        yield Env(stack, fake, ports)
    finally:
        fake.close()
        stack.close()


def _user(pid: str, what: str) -> str:
    return f"{what}-{pid}-{secrets.token_hex(3)}"


def _problem(r: httpx2.Response) -> dict[str, Any]:
    assert r.headers.get("content-type", "").startswith("application/"), r.text
    data: dict[str, Any] = r.json()
    return data


# ---------------------------------------------------------------------------------------
# Connect and inject
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pid", CATALOG)
def test_connect_then_inject(env: Env, pid: str) -> None:
    """The authorize request carries the catalog's extra parameters, its scopes joined by
    its separator under its scope parameter; the code exchange uses its client
    authentication and token parameters; the credential the proxy then injects is the
    user's access token (Slack: authed_user's, never the shared bot token) in the
    catalog's header format."""
    catalog = load_catalog_entry(pid)
    user = _user(pid, "connect")
    env.connect(pid, user)

    [authorize] = [r for r in env.requests(pid, "authorize")
                   if r["query"].get("login_hint") == user]
    q = authorize["query"]
    for name, value in (catalog.get("authorize_params") or {}).items():
        assert q.get(name) == value, f"authorize param {name}"
    scopes = catalog.get("scopes") or []
    param = catalog.get("scope_param", "scope")
    if scopes:
        assert q[param] == catalog.get("scope_separator", " ").join(scopes)
    else:
        assert param not in q
    [exchange] = env.requests(pid, "token", user=user, grant_type="authorization_code")
    assert exchange["status"] == 200
    assert exchange["client_auth"] == catalog["token_endpoint_auth_method"]
    for name, value in (catalog.get("token_params") or {}).items():
        assert exchange["body"].get(name) == value, f"token param {name}"

    stored = env.stored(pid, user)
    access = stored.tokens.access_token.reveal()
    assert access.startswith("at_"), "the user's token, not an app or bot token"
    quirks = QUIRKS[pid]
    # The catalog's request parameters are what the provider needs to issue a refresh
    # token at all (Google access_type=offline, Dropbox token_access_type=offline, ...).
    assert (stored.tokens.refresh_token is not None) == quirks.refresh

    r = env.call(pid, user, "connect")
    assert r.status_code == 200, r.text
    assert r.json()["user"] == user
    inject = catalog.get("inject") or {"header": "Authorization",
                                       "format": "Bearer {access_token}"}
    [seen] = env.requests(pid, "api", path="/api/connect")[-1:]
    assert seen["headers"][inject["header"].lower()] == inject["format"].format(
        access_token=access)


# ---------------------------------------------------------------------------------------
# Refresh
# ---------------------------------------------------------------------------------------

REFRESHING = [pid for pid in CATALOG if QUIRKS[pid].refresh]


@pytest.mark.parametrize("pid", REFRESHING)
def test_expired_token_is_refreshed_and_a_rotated_refresh_token_never_reused(
        env: Env, pid: str) -> None:
    """Two lifetimes pass: each request refreshes once. Where the provider rotates, the
    second refresh presents the new refresh token (a strict provider would kill the grant
    on the old one); where it does not, the same one again."""
    user = _user(pid, "refresh")
    env.connect(pid, user)
    first = env.expire(pid, user)
    short = QUIRKS[pid].expires_in is not None
    if short:  # the refreshed token lives 2 s: the next request refreshes again
        env.fake_call(pid, "knobs", {"expires_in": 2})
    try:
        r = env.call(pid, user, "refresh1")
    finally:
        env.fake_call(pid, "knobs", {"expires_in": QUIRKS[pid].expires_in})
    assert r.status_code == 200, r.text
    second = env.stored(pid, user)
    assert second.tokens.access_token.reveal() != first.tokens.access_token.reveal()
    if short:
        time.sleep(1.2)  # past the margin, min(refresh_skew, lifetime / 2)
        r = env.call(pid, user, "refresh2")
    else:
        # No expires_in (Salesforce): the session times out, the API answers 401, the
        # proxy refreshes once on it and tells the agent to retry (503 token_refreshed).
        env.fake_call(pid, "end_sessions", {"user": user})
        r = env.call(pid, user, "refresh-401")
        assert r.status_code == 503, r.text
        r = env.call(pid, user, "refresh2")
    assert r.status_code == 200, r.text
    third = env.stored(pid, user)
    presented = [x["body"]["refresh_token"]
                 for x in env.requests(pid, "token", user=user, grant_type="refresh_token")]
    rt = [g.tokens.refresh_token.reveal() for g in (first, second, third)]
    if QUIRKS[pid].rotation == "none":
        assert presented == [rt[0], rt[0]] and rt[0] == rt[1] == rt[2]
    else:
        assert presented == [rt[0], rt[1]] and len(set(rt)) == 3
    injected = {x["headers"].get("authorization") or x["headers"].get("x-auth-token")
                or x["headers"].get("x-shopify-access-token")
                for x in env.requests(pid, "api") if x["path"] == "/api/refresh2"}
    assert any(third.tokens.access_token.reveal() in (h or "") for h in injected)


# ---------------------------------------------------------------------------------------
# Revoked-token signal and dead refresh token
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pid", CATALOG)
def test_api_revoked_signal_is_reauth_required(env: Env, pid: str) -> None:
    """The user removes the app at the provider: every token is dead and the API answers
    with the provider's signal (401; Slack HTTP 200 ok:false token_revoked). The agent
    gets 401 reauth-required (after at most one forced refresh, which fails)."""
    user = _user(pid, "signal")
    env.connect(pid, user)
    assert env.call(pid, user, "before").status_code == 200
    env.fake_call(pid, "kill", {"user": user})
    r = env.call(pid, user, "after")
    if r.status_code == 503:  # a forced refresh told the agent to retry
        r = env.call(pid, user, "retry")
    assert r.status_code == 401, f"{r.status_code} {r.text}"
    assert r.headers.get("X-Credproxy-Error") == "reauth-required"
    assert _problem(r)["provider"] == pid
    assert env.stored(pid, user).status == "reauth_required"


@pytest.mark.parametrize("pid", REFRESHING)
def test_dead_refresh_token_is_reauth_required_in_one_call(env: Env, pid: str) -> None:
    """The provider's exact dead-refresh-token answer (GitHub 200 bad_refresh_token, Slack
    200 ok:false invalid_refresh_token, Entra 400 interaction_required, HubSpot 400
    BAD_REFRESH_TOKEN, Atlassian 403 unauthorized_client, textbook 400 invalid_grant) is
    reauth-required after exactly one token-endpoint call; the next request makes none."""
    user = _user(pid, "dead")
    env.connect(pid, user)
    env.fake_call(pid, "kill", {"user": user})
    env.expire(pid, user)
    r = env.call(pid, user, "dead1")
    assert r.status_code == 401, f"{r.status_code} {r.text}"
    assert r.headers.get("X-Credproxy-Error") == "reauth-required"
    assert _problem(r)["provider"] == pid
    assert len(env.requests(pid, "token", user=user, grant_type="refresh_token")) == 1
    r = env.call(pid, user, "dead2")
    assert r.status_code == 401 and r.headers.get("X-Credproxy-Error") == "reauth-required"
    assert len(env.requests(pid, "token", user=user, grant_type="refresh_token")) == 1
    assert not env.requests(pid, "api", path="/api/dead2")


# ---------------------------------------------------------------------------------------
# Offboarding
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pid", CATALOG)
def test_revoke_reports_the_upstream_truthfully(env: Env, pid: str) -> None:
    """``credproxy revoke``: a provider without revocation says so and names its console
    URL (exit 0, no call made); the others revoke in their style (method, body, client
    auth as the provider documents) and the token is dead at the provider; the grant is
    gone locally."""
    catalog = load_catalog_entry(pid)
    style = (catalog.get("revocation") or {}).get("style", "rfc7009")
    user = _user(pid, "revoke")
    env.connect(pid, user)
    r = env.call(pid, user, "pre-revoke")
    assert r.status_code == 200
    done = env.revoke_cli(pid, user)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert env.stored(pid, user) is None
    calls = env.requests(pid, "revoke")
    if style == "none":
        console = str(catalog["revocation"]["console_url"])
        described = next(e for e in describe_catalog() if e["id"] == pid)
        values = {**described["parameter_defaults"],
                  **(_entry(pid, "", 0).get("parameters") or {})}
        for name, value in values.items():
            console = console.replace(f"{{{name}}}", value)
        assert "no upstream revocation exists for this provider" in out
        assert "local removal done" in out and console in out
        return
    assert "upstream revoked" in out, out
    assert calls, "no revocation call reached the provider"
    last = calls[-1]
    if style == "github-grant":
        assert last["method"] == "DELETE" and last["path"] == f"/applications/{CLIENT_ID}/grant"
        assert last["client_auth"] == "client_secret_basic"
    elif style == "bearer":
        assert last["headers"]["authorization"].startswith("Bearer at_") and not last["body"]
    elif style == "json":
        assert last["headers"]["content-type"].startswith("application/json")
        assert "token" in last["body"]
    elif style == "slack":
        assert "token" in last["body"]
    # The grant is dead at the provider: its (old) access token no longer works there.
    with httpx2.Client(verify=env.stack.admin_tls(), timeout=10, trust_env=False) as c:
        header, prefix = QUIRKS[pid].api_header
        token = env.requests(pid, "api", path="/api/pre-revoke")[-1]["headers"][header.lower()]
        after = c.get(f"{env.base(pid)}/api/check", headers={header: token})
    assert (after.status_code, after.json()) == QUIRKS[pid].api_revoked


def test_slack_auth_revoke_ok_false_is_not_revoked(env: Env) -> None:
    """Slack answers auth.revoke with HTTP 200 {"ok": false}: the token still works, so
    the CLI must not say revoked (exit 1, upstream revocation pending)."""
    user = _user("slack", "refused")
    env.connect("slack", user)
    env.fake_call("slack", "knobs",
                  {"revoke_answer": [200, {"ok": False, "error": "not_allowed_token_type"}]})
    done = env.revoke_cli("slack", user)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "upstream revocation pending" in out and "ok: false" in out


def test_google_access_token_already_dead_counts_as_revoked(env: Env) -> None:
    """Google revokes the grant with the refresh token, then answers the access token's
    revocation 400 invalid_token (already dead): that is revoked, exit 0."""
    user = _user("google", "both")
    env.connect("google", user)
    done = env.revoke_cli("google", user)
    assert done.returncode == 0, done.stdout + done.stderr
    answers = env.requests("google", "revoke")[-2:]
    assert [c["body"].get("token_type_hint") for c in answers] == ["refresh_token",
                                                                   "access_token"]

