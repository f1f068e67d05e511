"""Connector and Offboarder rejections on real parts (local vault, memory coordination,
audit log); the full flows run against a real authorization server in
tests/integration/test_onboarding.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from proxy.audit import AuditLog, StdoutSink
from proxy.connect import Connector, ConnectRejected
from proxy.coordination import MemoryCoordinator
from proxy.offboard import Offboarder
from proxy.secret import Secret
from proxy.settings import parse_settings
from proxy.tokenset import TokenSet
from proxy.vault.base import Grant
from proxy.vault.local import LocalVault
from tests.proxy.conftest import live_config

KEY = bytes(range(32))


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


SETTINGS = parse_settings({
    "identity": {"issuer": "i", "audience": "a", "hs256_secret_env": "X",
                 "algorithms": ["HS256"]},
    "connect": {"state_ttl": 60, "return_urls": ["https://app.example.com/done"]},
    "providers": [
        {"id": "docs", "hosts": ["docs.example.com"], "client_id": "c",
         "token_endpoint_auth_method": "none", "scopes": ["read", "write"],
         "authorize_url": "https://login.example.com/authorize",
         "token_url": "https://login.example.com/token"},
        {"id": "graph", "hosts": ["graph.example.com"], "client_id": "g",
         "token_endpoint_auth_method": "none",
         "token_url": "https://login.example.com/token"},
    ],
})
LIVE = live_config(settings=SETTINGS)


@pytest.fixture
async def parts(tmp_path: Path):  # type: ignore[no-untyped-def]
    clock = Clock()
    vault = LocalVault.open(tmp_path / "v.db", KEY, clock=clock)
    coord = MemoryCoordinator(clock)
    out = io.StringIO()
    audit = AuditLog(StdoutSink(out), instance="t/1", fingerprint_key=KEY, clock=clock)
    connector = Connector(LIVE, vault, coord, audit, state_key=KEY, clock=clock)
    yield connector, vault, coord, out, clock
    await connector.aclose()
    await vault.close()


def _records(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(x) for x in out.getvalue().splitlines()]


async def _state(connector: Connector, **kw: object) -> str:
    url = await connector.begin("alice", "docs", redirect_uri="http://127.0.0.1/cb", **kw)  # type: ignore[arg-type]
    from urllib.parse import parse_qs, urlsplit

    return parse_qs(urlsplit(url).query)["state"][0]


async def test_begin_builds_a_pkce_s256_url_with_configured_scopes(parts) -> None:  # type: ignore[no-untyped-def]
    connector = parts[0]
    url = await connector.begin("alice", "docs", redirect_uri="http://127.0.0.1/cb")
    assert url.startswith("https://login.example.com/authorize?")
    assert "code_challenge_method=S256" in url and "scope=read+write" in url
    narrow = await connector.begin("alice", "docs", redirect_uri="http://127.0.0.1/cb",
                                   scopes=["write"])
    assert "scope=write" in narrow and "read" not in narrow.split("scope=")[1]


@pytest.mark.parametrize("kwargs,reason", [
    pytest.param({"scopes": ["admin"]}, "scope_not_allowed", id="wider-scope"),
    pytest.param({"return_to": "https://evil.example/"}, "return_url_not_allowed",
                 id="open-redirect"),
])
async def test_begin_rejections_are_audited(parts, kwargs, reason) -> None:  # type: ignore[no-untyped-def]
    connector, _, _, out, _ = parts
    with pytest.raises(ConnectRejected) as exc:
        await connector.begin("alice", "docs", redirect_uri="http://127.0.0.1/cb", **kwargs)
    assert exc.value.reason == reason
    assert _records(out)[-1]["reason"] == reason


async def test_provider_without_authorize_url(parts) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConnectRejected, match="no authorize_url"):
        await parts[0].begin("alice", "graph", redirect_uri="http://127.0.0.1/cb")


async def test_expired_state_is_rejected_and_nothing_stored(parts) -> None:  # type: ignore[no-untyped-def]
    connector, vault, _, out, clock = parts
    state = await _state(connector)
    clock.now += 61
    with pytest.raises(ConnectRejected) as exc:
        await connector.complete({"state": state, "code": "c"})
    assert exc.value.reason == "expired_state"
    assert await vault.list() == []
    assert _records(out)[-1]["user"] == "alice"


async def test_replayed_state(parts) -> None:  # type: ignore[no-untyped-def]
    connector = parts[0]
    state = await _state(connector)
    with pytest.raises(ConnectRejected, match="provider answered"):
        await connector.complete({"state": state, "error": "access_denied"})
    with pytest.raises(ConnectRejected) as exc:
        await connector.complete({"state": state, "code": "c"})
    assert exc.value.reason == "replayed_state"


async def test_missing_code_and_missing_verifier(parts) -> None:  # type: ignore[no-untyped-def]
    connector, _, coord, _, clock = parts
    state = await _state(connector)
    with pytest.raises(ConnectRejected) as exc:
        await connector.complete({"state": state})
    assert exc.value.reason == "missing_code"
    # A state record without a PKCE verifier (never produced by begin) is refused.
    forged = "s" * 43
    record = {"u": "alice", "p": "docs", "v": "", "r": "http://127.0.0.1/cb", "s": [],
              "t": None, "c": clock.now}
    await coord.put_once(connector._name(forged), connector._seal(forged, record), 60)
    with pytest.raises(ConnectRejected) as exc:
        await connector.complete({"state": forged, "code": "c"})
    assert exc.value.reason == "missing_pkce_verifier"


async def test_state_sealed_for_another_state_is_unreadable(parts) -> None:  # type: ignore[no-untyped-def]
    connector, _, coord, _, clock = parts
    record = {"u": "alice", "p": "docs", "v": "v" * 43, "r": "x", "s": [], "t": None,
              "c": clock.now}
    await coord.put_once(connector._name("b" * 43), connector._seal("a" * 43, record), 60)
    with pytest.raises(ConnectRejected) as exc:
        await connector.complete({"state": "b" * 43, "code": "c"})
    assert exc.value.reason == "unknown_state"


async def test_offboarding_a_provider_without_rfc7009(parts) -> None:  # type: ignore[no-untyped-def]
    _, vault, coord, out, clock = parts
    audit = AuditLog(StdoutSink(out), instance="t/2", fingerprint_key=KEY, clock=clock)
    off = Offboarder(LIVE, vault, coord, audit, settle=0)
    await vault.put(Grant("bob", "graph", TokenSet(Secret("at"), Secret("rt"))))
    assert [g.provider for g in await off.plan("bob")] == ["graph"]
    (result,) = await off.revoke("bob")
    assert result.upstream == "unsupported" and "revokeSignInSessions" in result.detail
    assert result.ok and result.removed
    assert await vault.get("bob", "graph") is None
    events = [r["event"] for r in _records(out)]
    assert events[-2:] == ["connection.revoked", "user.offboarded"]
    await off.aclose()


@pytest.mark.parametrize("begun,presented", [
    pytest.param("nonce-a", None, id="bound-flow-without-cookie"),
    pytest.param("nonce-a", "", id="bound-flow-empty-cookie"),
    pytest.param("nonce-a", "nonce-b", id="bound-flow-other-cookie"),
    pytest.param(None, "", id="unbound-flow-at-the-web-callback"),
])
async def test_browser_binding_refuses_another_browser(parts, begun, presented) -> None:  # type: ignore[no-untyped-def]
    connector, vault, _, out, _ = parts
    url = await connector.begin("alice", "docs", redirect_uri="http://127.0.0.1/cb",
                                browser=begun)
    from urllib.parse import parse_qs, urlsplit

    state = parse_qs(urlsplit(url).query)["state"][0]
    with pytest.raises(ConnectRejected) as exc:
        await connector.complete({"state": state, "code": "c"}, browser=presented)
    assert exc.value.reason == "browser_mismatch"
    assert await vault.list() == []
    rec = _records(out)[-1]
    assert (rec["user"], rec["outcome"], rec["reason"]) == ("alice", "rejected",
                                                           "browser_mismatch")
    # The state is spent: the rightful browser cannot be tricked into finishing it later.
    with pytest.raises(ConnectRejected, match="already completed"):
        await connector.complete({"state": state, "code": "c"}, browser=begun)


async def test_matching_browser_gets_past_the_binding(parts) -> None:  # type: ignore[no-untyped-def]
    connector = parts[0]
    url = await connector.begin("alice", "docs", redirect_uri="http://127.0.0.1/cb",
                                browser="nonce-a")
    from urllib.parse import parse_qs, urlsplit

    state = parse_qs(urlsplit(url).query)["state"][0]
    with pytest.raises(ConnectRejected) as exc:  # the next check: the provider's answer
        await connector.complete({"state": state, "error": "access_denied"}, browser="nonce-a")
    assert exc.value.reason == "provider_error:access_denied"


async def test_return_to_below_a_configured_url(parts) -> None:  # type: ignore[no-untyped-def]
    connector = parts[0]
    url = await connector.begin("alice", "docs", redirect_uri="http://127.0.0.1/cb",
                                return_to="https://app.example.com/done?tab=docs")
    assert url.startswith("https://login.example.com/authorize?")
    with pytest.raises(ConnectRejected) as exc:
        await connector.begin("alice", "docs", redirect_uri="http://127.0.0.1/cb",
                              return_to="https://app.example.com.evil.example/done")
    assert exc.value.reason == "return_url_not_allowed"


class _NoRedis(MemoryCoordinator):
    """Redis unreachable: no lock, no broadcast."""

    def lock(self, user: str, provider: str):  # type: ignore[no-untyped-def, override]
        from proxy.errors import CoordinationUnavailable

        raise CoordinationUnavailable("redis down")


async def test_offboarding_with_the_vault_down_and_no_redis_changes_nothing_and_says_so(
        parts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from proxy.errors import VaultUnavailable

    _, vault, _, out, clock = parts
    await vault.put(Grant("carol", "graph", TokenSet(Secret("at"), Secret("rt"))))

    class Down(LocalVault):
        async def get(self, user: str, provider: str) -> Grant | None:
            raise VaultUnavailable("store unreachable")

    down = Down.open(tmp_path / "down.db", KEY, clock=clock)
    audit = AuditLog(StdoutSink(out), instance="t/3", fingerprint_key=KEY, clock=clock)
    off = Offboarder(LIVE, down, _NoRedis(), audit, settle=0)
    try:
        result = await off._revoke_one(LIVE.current, "carol", "graph")
    finally:
        await off.aclose()
        await down.close()
    assert not result.ok and not result.marked and result.upstream == "not attempted"
    assert result.problems == ["nothing changed (vault unreachable); run it again"]
    assert _records(out)[-1]["outcome"] == "pending"


ISS = "https://login.example.com"
ISS_SETTINGS = parse_settings({
    "identity": {"issuer": "i", "audience": "a", "hs256_secret_env": "X",
                 "algorithms": ["HS256"]},
    "providers": [
        {"id": "docs", "hosts": ["docs.example.com"], "client_id": "c",
         "token_endpoint_auth_method": "none", "scopes": ["read"], "issuer": ISS,
         "authorize_url": f"{ISS}/authorize", "token_url": f"{ISS}/token"},
        {"id": "strict", "hosts": ["strict.example.com"], "client_id": "c",
         "token_endpoint_auth_method": "none", "scopes": ["read"], "issuer": ISS,
         "iss_required": True,
         "authorize_url": f"{ISS}/authorize", "token_url": f"{ISS}/token"},
    ],
})


@pytest.mark.parametrize("provider,iss,reason", [
    pytest.param("docs", "https://evil.example.com", "iss_mismatch", id="other-issuer"),
    pytest.param("docs", ISS + "/", "iss_mismatch", id="trailing-slash"),
    pytest.param("docs", ISS.upper(), "iss_mismatch", id="other-case"),
    pytest.param("docs", "", "iss_mismatch", id="empty"),
    pytest.param("strict", "https://evil.example.com", "iss_mismatch", id="strict-other"),
    pytest.param("strict", None, "iss_missing", id="strict-missing"),
    pytest.param("docs", None, "provider_error:access_denied", id="lenient-missing"),
    pytest.param("docs", ISS, "provider_error:access_denied", id="matching"),
])
async def test_the_authorization_responses_iss_is_checked_against_the_configured_issuer(
        tmp_path: Path, provider: str, iss: str | None, reason: str) -> None:
    """RFC 9207 section 2.4 for any provider whose ``issuer`` is configured: a response
    from another issuer is refused before the error or code in it is read (mix-up
    defence); without ``iss``, refused only when ``iss_required``. Nothing is stored."""
    clock = Clock()
    vault = LocalVault.open(tmp_path / "v.db", KEY, clock=clock)
    out = io.StringIO()
    audit = AuditLog(StdoutSink(out), instance="t/1", fingerprint_key=KEY, clock=clock)
    connector = Connector(live_config(settings=ISS_SETTINGS), vault, MemoryCoordinator(clock),
                          audit, state_key=KEY, clock=clock)
    try:
        from urllib.parse import parse_qs, urlsplit

        url = await connector.begin("alice", provider, redirect_uri="http://127.0.0.1/cb")
        state = parse_qs(urlsplit(url).query)["state"][0]
        params = {"state": state, "error": "access_denied"}
        if iss is not None:
            params["iss"] = iss
        with pytest.raises(ConnectRejected) as exc:
            await connector.complete(params)
        assert exc.value.reason == reason
        assert await vault.list() == []
        assert _records(out)[-1]["reason"] == reason
    finally:
        await connector.aclose()
        await vault.close()


@pytest.mark.parametrize("extra,message", [
    pytest.param({"issuer": "http://login.example.com"}, "issuer must be an https URL",
                 id="http"),
    pytest.param({"issuer": "https://login.example.com?x=1"}, "issuer must be", id="query"),
    pytest.param({"issuer": "https://login.example.com#f"}, "issuer must be", id="fragment"),
    pytest.param({"issuer": "login.example.com"}, "issuer must be", id="relative"),
    pytest.param({"iss_required": True}, "iss_required needs issuer", id="required-alone"),
])
def test_a_bad_issuer_setting_is_refused_naming_the_key(extra: dict[str, object],
                                                       message: str) -> None:
    provider = {"id": "docs", "hosts": ["docs.example.com"], "client_id": "c",
                "token_url": "https://login.example.com/token", **extra}
    with pytest.raises(Exception, match=message):
        parse_settings({"identity": {"issuer": "i", "audience": "a",
                                     "hs256_secret_env": "X", "algorithms": ["HS256"]},
                        "providers": [provider]})
