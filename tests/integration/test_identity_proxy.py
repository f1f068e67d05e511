"""User-context verification through a real mitmproxy process: every bad variant gets a 407
problem naming the reason, and nothing reaches the upstream."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, OKPKey, RSAKey

from devstack.stack import Stack
from tests.integration import rawhttp

pytestmark = pytest.mark.integration


def _b64(data: dict[str, object] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _claims(user: str, **over: object) -> dict[str, object]:
    now = int(time.time())
    c: dict[str, object] = {"iss": "https://agents.example.com", "aud": "credproxy",
                            "sub": user, "iat": now, "exp": now + 300,
                            "ctx": {"kind": "chat", "id": "c1"}}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def _sign(stack: Stack, claims: dict[str, object], header: dict[str, object] | None = None,
          key: object = None) -> str:
    from proxy.devkeys import load_signing_key

    k = key or load_signing_key(str(stack.context_key))
    h = {"alg": "EdDSA", "typ": "user-context+jwt", "kid": "dev-1"}
    h.update(header or {})
    h = {a: b for a, b in h.items() if b is not None}
    return jwt.encode(h, claims, k, algorithms=[str(h["alg"])])  # type: ignore[arg-type]


def _hs256(claims: dict[str, object], secret: bytes) -> str:
    """HS256 by hand, with any bytes as the HMAC secret."""
    header = _b64({"alg": "HS256", "typ": "user-context+jwt", "kid": "dev-1"})
    signing_input = f"{header}.{_b64(claims)}"
    return f"{signing_input}.{_b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"  # noqa: E501


def _confusion_secrets(stack: Stack) -> dict[str, bytes]:
    """The configured public key in every form an attacker might try as an HMAC secret
    (RFC 8725 section 2.1): the JWKS file, the JWK, its PEM, and the raw key bytes."""
    jwks = Path(stack.config["identity"]["jwks_file"]).read_bytes()
    key = KeySet.import_key_set(json.loads(jwks)).keys[0]
    jwk = key.as_dict(private=False)
    raw = base64.urlsafe_b64decode(str(jwk["x"]) + "==")
    return {"jwks-file": jwks, "jwk-json": json.dumps(jwk).encode(),
            "pem": key.as_pem(private=False), "raw-public-key": raw}


def _bad_tokens(stack: Stack, user: str) -> list[tuple[str, str, str]]:
    """(id, header value, expected reason)"""
    good = stack.context(user)
    h, p, s = good.split(".")
    other = OKPKey.generate_key("Ed25519", parameters={"kid": "dev-1"})
    rsa = RSAKey.generate_key(2048, parameters={"kid": "dev-1"})
    now = int(time.time())
    return [
        ("malformed-two-parts", f"{h}.{p}", "malformed"),
        ("malformed-garbage", "not-a-jwt", "malformed"),
        ("malformed-header", f"{_b64(b'{nope')}.{p}.{s}", "malformed"),
        ("bad-signature-tampered", f"{h}.{_b64(_claims('mallory'))}.{s}", "bad_signature"),
        ("bad-signature-other-key", _sign(stack, _claims(user), key=other), "bad_signature"),
        ("alg-none", f"{_b64({'alg': 'none', 'typ': 'user-context+jwt'})}.{p}.",
         "alg_not_allowed"),
        ("alg-none-sig", f"{_b64({'alg': 'none', 'typ': 'user-context+jwt'})}.{p}.{s}",
         "alg_not_allowed"),
        ("alg-hs256-not-allowed", f"{_b64({'alg': 'HS256', 'typ': 'user-context+jwt', 'kid': 'dev-1'})}.{p}.{s}",  # noqa: E501
         "alg_not_allowed"),
        ("alg-rs256-with-okp-key", _sign(stack, _claims(user), {"alg": "RS256"}, key=rsa),
         "alg_key_mismatch"),
        ("unknown_kid", _sign(stack, _claims(user), {"kid": "nope"}), "unknown_kid"),
        ("expired", _sign(stack, _claims(user, iat=now - 600, exp=now - 120)), "expired"),
        ("not_yet_valid", _sign(stack, _claims(user, nbf=now + 600)), "not_yet_valid"),
        ("issued-in-future", _sign(stack, _claims(user, iat=now + 600, exp=now + 900)),
         "not_yet_valid"),
        ("lifetime-over-cap", _sign(stack, _claims(user, exp=now + 3600)), "lifetime_too_long"),
        ("wrong-iss", _sign(stack, _claims(user, iss="https://evil.example")), "wrong_issuer"),
        ("wrong-aud", _sign(stack, _claims(user, aud="someone-else")), "wrong_audience"),
        ("wrong_typ", _sign(stack, _claims(user), {"typ": "JWT"}), "wrong_typ"),
        ("missing-typ", _sign(stack, _claims(user), {"typ": None}), "wrong_typ"),
        ("missing-sub", _sign(stack, _claims(user, sub=None)), "missing_claim"),
        ("missing-exp", _sign(stack, _claims(user, exp=None)), "missing_claim"),
        ("oversized", _sign(stack, _claims(user, pad="x" * 9000)), "oversized"),
        *((f"alg-confusion-hs256-{form}", _hs256(_claims(user), secret), "alg_not_allowed")
          for form, secret in _confusion_secrets(stack).items()),
    ]


@pytest.fixture(scope="module")
def bad_tokens(stack: Stack) -> dict[str, tuple[str, str]]:
    stack.vault_put("idtest", stack.grant("idtest"))
    return {i: (v, r) for i, v, r in _bad_tokens(stack, "idtest")}


_IDS = [i for i, _, _ in [
    ("malformed-two-parts", 0, 0), ("malformed-garbage", 0, 0), ("malformed-header", 0, 0),
    ("bad-signature-tampered", 0, 0), ("bad-signature-other-key", 0, 0), ("alg-none", 0, 0),
    ("alg-none-sig", 0, 0), ("alg-hs256-not-allowed", 0, 0), ("alg-rs256-with-okp-key", 0, 0),
    ("unknown_kid", 0, 0), ("expired", 0, 0), ("not_yet_valid", 0, 0),
    ("issued-in-future", 0, 0), ("lifetime-over-cap", 0, 0), ("wrong-iss", 0, 0),
    ("wrong-aud", 0, 0), ("wrong_typ", 0, 0), ("missing-typ", 0, 0), ("missing-sub", 0, 0),
    ("missing-exp", 0, 0), ("oversized", 0, 0)]] + [
    f"alg-confusion-hs256-{form}" for form in ("jwks-file", "jwk-json", "pem", "raw-public-key")]


@pytest.mark.parametrize("case", _IDS)
def test_bad_user_context_header_is_refused(stack: Stack, bad_tokens: dict[str, tuple[str, str]],
                                            case: str, marker: str) -> None:
    token, reason = bad_tokens[case]
    with stack.client() as c:
        r = c.get(f"{stack.docs_url}/echo/{marker}", headers={"X-User-Context": token})
    assert r.status_code == 407, r.text
    assert r.headers["X-Credproxy-Error"] == "user-context-invalid"
    assert r.headers["Content-Type"] == "application/problem+json"
    body = r.json()
    assert body["type"] == "urn:credproxy:problem:user-context-invalid"
    assert body["reason"] == reason
    assert token not in r.text
    assert not stack.docs_saw(marker)


@pytest.mark.parametrize("case", ["expired", "bad-signature-tampered", "alg-none"])
def test_bad_user_context_in_proxy_authorization_is_refused(
        stack: Stack, bad_tokens: dict[str, tuple[str, str]], case: str, marker: str) -> None:
    token, reason = bad_tokens[case]
    port = stack.docs_url.rsplit(":", 1)[1]
    r = rawhttp.request(stack.proxy_url, connect=f"localhost:{port}",
                        host_header=f"localhost:{port}", path=f"/echo/{marker}",
                        proxy_authorization=f"Bearer {token}", ca_file=str(stack.mitm_ca))
    assert r.status == 407
    assert r.json()["reason"] == reason
    assert not stack.docs_saw(marker)


def test_missing_user_context_is_407_missing(stack: Stack, marker: str) -> None:
    with stack.client() as c:
        r = c.get(f"{stack.docs_url}/echo/{marker}")
    assert r.status_code == 407
    assert r.headers["X-Credproxy-Error"] == "user-context-missing"
    assert r.headers["Proxy-Authenticate"].startswith("Bearer")
    assert not stack.docs_saw(marker)


def test_user_without_connection_gets_a_bearer_challenge(stack: Stack, marker: str) -> None:
    """RFC 9110 section 15.5.2: a 401 carries WWW-Authenticate (RFC 6750 section 3 form)."""
    with stack.client(context=stack.context(f"ghost-{marker}")) as c:
        r = c.get(f"{stack.docs_url}/echo/{marker}")
    assert r.status_code == 401
    assert r.headers["X-Credproxy-Error"] == "reauth-required"
    assert r.headers["WWW-Authenticate"] == (
        'Bearer realm="credproxy", error="invalid_token", error_description="the user must '
        're-authorize docs (no_connection); see connect_url"')
    assert r.json()["connect_url"].endswith("/connect/docs")
    assert not stack.docs_saw(marker)


def test_duplicate_user_context_header_is_refused(stack: Stack, user: str, marker: str) -> None:
    token = stack.context(user)
    port = stack.docs_url.rsplit(":", 1)[1]
    r = rawhttp.request(stack.proxy_url, connect=f"localhost:{port}",
                        host_header=f"localhost:{port}", path=f"/echo/{marker}",
                        headers={"X-User-Context": token, "x-user-context": token},
                        ca_file=str(stack.mitm_ca))
    assert r.status == 407
    assert r.json()["reason"] == "duplicate_header"
    assert not stack.docs_saw(marker)


def test_proxy_authorization_bearer_on_connect(stack: Stack, user: str, marker: str) -> None:
    token = stack.context(user)
    port = stack.docs_url.rsplit(":", 1)[1]
    r = rawhttp.request(stack.proxy_url, connect=f"localhost:{port}",
                        host_header=f"localhost:{port}", path=f"/echo/{marker}",
                        proxy_authorization=f"Bearer {token}", ca_file=str(stack.mitm_ca))
    assert r.status == 200, r.body
    names = [k.lower() for k, _ in r.json()["headers"]]
    assert "proxy-authorization" not in names and "x-user-context" not in names
    auth = [v for k, v in r.json()["headers"] if k.lower() == "authorization"]
    assert auth and auth[0].startswith("Bearer at_")


def test_proxy_url_userinfo_basic_form(stack: Stack, user: str, marker: str) -> None:
    """HTTPS_PROXY=http://ctx:<jws>@host:port: clients send Basic on CONNECT."""
    import httpx2

    token = stack.context(user)
    proxy = stack.proxy_url.replace("http://", f"http://ctx:{token}@")
    with httpx2.Client(proxy=proxy, verify=stack.mitm_tls(), trust_env=False) as c:
        r = c.get(f"{stack.docs_url}/echo/{marker}")
    assert r.status_code == 200, r.text
    headers = {k.lower(): v for k, v in r.json()["headers"]}
    assert headers["authorization"].startswith("Bearer at_")
    assert "proxy-authorization" not in headers
    assert token not in r.text


def test_request_header_wins_over_connection_context(stack: Stack, marker: str) -> None:
    import httpx2

    a, b = "winner-a", "winner-b"
    ta, tb = stack.grant(a), stack.grant(b)
    stack.vault_put(a, ta)
    stack.vault_put(b, tb)
    proxy = stack.proxy_url.replace("http://", f"http://ctx:{stack.context(a)}@")
    with httpx2.Client(proxy=proxy, verify=stack.mitm_tls(), trust_env=False) as c:
        r = c.get(f"{stack.docs_url}/echo/{marker}",
                  headers={"X-User-Context": stack.context(b)})
    headers = {k.lower(): v for k, v in r.json()["headers"]}
    assert headers["authorization"] == f"Bearer {tb['access_token']}"


def test_malformed_proxy_authorization_is_refused(stack: Stack, marker: str) -> None:
    port = stack.docs_url.rsplit(":", 1)[1]
    r = rawhttp.request(stack.proxy_url, connect=f"localhost:{port}",
                        host_header=f"localhost:{port}", path=f"/echo/{marker}",
                        proxy_authorization="Digest abc", ca_file=str(stack.mitm_ca))
    assert r.status == 407
    assert r.json()["reason"] == "malformed"
    assert not stack.docs_saw(marker)
