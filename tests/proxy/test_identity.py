"""Verification of the signed user context (proxy.identity) against the product contract."""

from __future__ import annotations

import base64
import json
import math
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from joserfc.jwk import KeySet, OKPKey

from proxy.devkeys import mint, write_dev_keys
from proxy.errors import (
    ConfigError,
    CoordinationUnavailable,
    CredentialStoreUnavailable,
    UserContextInvalid,
    UserContextMissing,
)
from proxy.identity import (
    IdentityVerifier,
    KeySource,
    ReplayGuard,
    UserContext,
    context_from_proxy_authorization,
)
from proxy.secret import Secret
from proxy.settings import IdentitySettings

from .conftest import (
    AUDIENCE,
    DROP,
    HS_SECRET,
    ISSUER,
    NOW,
    TYP,
    Clock,
    Keys,
    MakeContext,
    MakeVerifier,
    b64url,
    identity_settings,
    make_claims,
)

Build = Callable[[MakeContext, Keys], str]


def _pem(key: Any) -> bytes:
    return key.as_pem(private=False)


def _with_payload(token: str, claims: dict[str, Any]) -> str:
    header, _, sig = token.split(".")
    return f"{header}.{b64url(json.dumps(claims))}.{sig}"


def _with_header_part(token: str, header_part: str) -> str:
    return header_part + "." + token.split(".", 1)[1]


async def _reject(verifier: IdentityVerifier, token: str) -> UserContextInvalid:
    with pytest.raises(UserContextInvalid) as info:
        await verifier.verify(Secret(token))
    return info.value


# --- accepted -------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256"])
async def test_valid_asymmetric_tokens_are_accepted(
    alg: str, make_context: MakeContext, make_verifier: MakeVerifier
) -> None:
    token = make_context(alg=alg, claims={"providers": ["docs"], "jti": "j-1"})
    ctx = await make_verifier().verify(Secret(token))
    assert ctx == UserContext(
        user="alice@example.com", issuer=ISSUER, expires_at=NOW + 300, context_kind="chat",
        context_id="c-42", providers=frozenset({"docs"}), jti="j-1", claims=ctx.claims,
    )
    assert ctx.claims["sub"] == "alice@example.com"
    assert ctx.permits("docs") and not ctx.permits("mail")
    ctx_info = ctx.context()
    assert ctx_info is not None and (ctx_info.kind, ctx_info.id) == ("chat", "c-42")


async def test_hs256_token_is_accepted_with_an_hs256_secret(make_context: MakeContext) -> None:
    settings = identity_settings(jwks_file=None, hs256_secret_env="CTX_SECRET",
                                 algorithms=["HS256"])
    keys = KeySource.from_settings(settings, environ={"CTX_SECRET": HS_SECRET})
    verifier = IdentityVerifier(settings, keys, clock=Clock())
    ctx = await verifier.verify(Secret(make_context(alg="HS256")))
    assert ctx.user == "alice@example.com"


ACCEPTED: list[Any] = [
    pytest.param({}, {}, id="defaults"),
    pytest.param({"exp": int(NOW) - 10, "iat": int(NOW) - 300}, {}, id="expired-within-leeway"),
    pytest.param({"nbf": int(NOW) + 10}, {}, id="nbf-within-leeway"),
    pytest.param({"nbf": int(NOW) - 10}, {}, id="nbf-past"),
    pytest.param({"iat": int(NOW) + 10, "exp": int(NOW) + 300}, {}, id="iat-within-leeway"),
    pytest.param({"iat": int(NOW), "exp": int(NOW) + 900}, {}, id="lifetime-exactly-cap"),
    pytest.param({"aud": ["other", AUDIENCE]}, {}, id="aud-list-containing-ours"),
    pytest.param({}, {"typ": "application/user-context+jwt"}, id="typ-application-prefix"),
    pytest.param({}, {"typ": "User-Context+JWT"}, id="typ-case-insensitive"),
    pytest.param({"ctx": DROP}, {}, id="no-ctx"),
    pytest.param({"ctx": None}, {}, id="ctx-null"),
    pytest.param({"providers": []}, {}, id="providers-empty-list"),
    pytest.param({"exp": NOW + 300.5, "iat": NOW + 0.5}, {}, id="float-times"),
]


@pytest.mark.parametrize(("claims", "header"), ACCEPTED)
async def test_accepted(claims: dict[str, Any], header: dict[str, Any],
                        make_context: MakeContext, make_verifier: MakeVerifier) -> None:
    ctx = await make_verifier().verify(Secret(make_context(claims=claims, header=header)))
    assert ctx.user == "alice@example.com"
    assert ctx.issuer == ISSUER


async def test_surrounding_whitespace_is_ignored(make_context: MakeContext,
                                                 make_verifier: MakeVerifier) -> None:
    ctx = await make_verifier().verify(Secret(f"  {make_context()}\r\n"))
    assert ctx.user == "alice@example.com"


async def test_context_without_ctx_or_providers_is_unrestricted(
    make_context: MakeContext, make_verifier: MakeVerifier
) -> None:
    ctx = await make_verifier().verify(Secret(make_context(claims={"ctx": DROP})))
    assert ctx.context() is None
    assert ctx.providers is None and ctx.permits("anything")


async def test_empty_providers_list_permits_nothing(make_context: MakeContext,
                                                    make_verifier: MakeVerifier) -> None:
    ctx = await make_verifier().verify(Secret(make_context(claims={"providers": []})))
    assert not ctx.permits("docs")


async def test_single_key_is_used_for_a_token_without_kid(make_context: MakeContext,
                                                          make_verifier: MakeVerifier,
                                                          keys: Keys) -> None:
    only_ed = KeySet([OKPKey.import_key(keys.ed.as_dict(private=False))])
    token = make_context(header={"kid": DROP})
    ctx = await make_verifier(key_set=only_ed).verify(Secret(token))
    assert ctx.user == "alice@example.com"


@pytest.mark.parametrize("header", [
    pytest.param({"typ": DROP}, id="missing"),
    pytest.param({"typ": "JWT"}, id="JWT"),
    pytest.param({"typ": "something-else"}, id="other"),
])
async def test_typ_check_disabled_accepts_any_typ(header: dict[str, Any],
                                                  make_context: MakeContext,
                                                  make_verifier: MakeVerifier) -> None:
    ctx = await make_verifier(typ=None).verify(Secret(make_context(header=header)))
    assert ctx.user == "alice@example.com"


async def test_custom_typ_is_enforced(make_context: MakeContext,
                                      make_verifier: MakeVerifier) -> None:
    verifier = make_verifier(typ="agent+jwt")
    assert (await verifier.verify(Secret(make_context(header={"typ": "agent+jwt"})))).user
    assert (await _reject(verifier, make_context())).reason == "wrong_typ"


# --- missing --------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [
    pytest.param(None, id="none"),
    pytest.param(Secret(""), id="empty"),
    pytest.param(Secret(" \t "), id="blank"),
])
async def test_missing_context(token: Secret | None, make_verifier: MakeVerifier) -> None:
    with pytest.raises(UserContextMissing, match="X-User-Context") as info:
        await make_verifier().verify(token)
    assert type(info.value) is UserContextMissing
    assert info.value.reason == "missing"
    assert info.value.status == 407


# --- rejected -------------------------------------------------------------------------------

_T = int(NOW)

REJECTED: list[Any] = [
    # malformed
    pytest.param(lambda mk, k: "abcdef", "malformed", id="one-part"),
    pytest.param(lambda mk, k: mk().rsplit(".", 1)[0], "malformed", id="two-parts"),
    pytest.param(lambda mk, k: mk() + ".extra", "malformed", id="four-parts"),
    pytest.param(lambda mk, k: _with_header_part(mk(), ""), "malformed", id="empty-header"),
    pytest.param(lambda mk, k: ".".join(["a", "", mk().rsplit(".", 1)[1]]), "malformed",
                 id="empty-payload"),
    pytest.param(lambda mk, k: _with_header_part(mk(), "!!!*"), "malformed",
                 id="header-bad-base64"),
    pytest.param(lambda mk, k: _with_header_part(mk(), b64url(b"\xff\xfe\xfd")), "malformed",
                 id="header-not-utf8"),
    pytest.param(lambda mk, k: _with_header_part(mk(), "é"), "malformed",
                 id="header-non-ascii"),
    pytest.param(lambda mk, k: _with_header_part(mk(), b64url("alg=EdDSA")), "malformed",
                 id="header-not-json"),
    pytest.param(lambda mk, k: mk(header=b'["EdDSA"]'), "malformed", id="header-json-array"),
    pytest.param(lambda mk, k: mk(header=b'"EdDSA"'), "malformed", id="header-json-string"),
    pytest.param(lambda mk, k: mk(claims=b"not json"), "malformed", id="payload-not-json"),
    pytest.param(lambda mk, k: mk(claims=b"[1, 2]"), "malformed", id="payload-json-array"),
    pytest.param(lambda mk, k: mk(header={"kid": 7}), "malformed", id="kid-not-string"),
    pytest.param(lambda mk, k: mk(header={"crit": ["exp"], "exp": 1}), "malformed",
                 id="crit-header"),
    pytest.param(lambda mk, k: mk(claims={"exp": str(_T + 300)}), "malformed", id="exp-string"),
    pytest.param(lambda mk, k: mk(claims={"exp": True}), "malformed", id="exp-bool"),
    pytest.param(lambda mk, k: mk(claims={"iat": "now"}), "malformed", id="iat-string"),
    pytest.param(lambda mk, k: mk(claims={"nbf": [1]}), "malformed", id="nbf-list"),
    pytest.param(lambda mk, k: mk(claims={"sub": 42}), "malformed", id="sub-not-string"),
    pytest.param(lambda mk, k: mk(claims={"sub": ["alice"]}), "malformed", id="sub-list"),
    pytest.param(lambda mk, k: mk(claims={"sub": "a" * 257}), "malformed", id="sub-too-long"),
    pytest.param(lambda mk, k: mk(claims={"ctx": "chat"}), "malformed", id="ctx-string"),
    pytest.param(lambda mk, k: mk(claims={"ctx": ["chat"]}), "malformed", id="ctx-list"),
    pytest.param(lambda mk, k: mk(claims={"ctx": {"kind": 1}}), "malformed",
                 id="ctx-kind-not-string"),
    pytest.param(lambda mk, k: mk(claims={"ctx": {"id": {"x": 1}}}), "malformed",
                 id="ctx-id-not-string"),
    pytest.param(
        lambda mk, k: mk(claims={"ctx": []}), "malformed", id="ctx-empty-list"),
    pytest.param(lambda mk, k: mk(claims={"providers": "docs"}), "malformed",
                 id="providers-string"),
    pytest.param(lambda mk, k: mk(claims={"providers": {"docs": True}}), "malformed",
                 id="providers-object"),
    pytest.param(lambda mk, k: mk(claims={"providers": ["docs", 1]}), "malformed",
                 id="providers-non-string-item"),
    # bad signature
    pytest.param(lambda mk, k: _with_payload(mk(), make_claims(sub="mallory@example.com")),
                 "bad_signature", id="tampered-payload"),
    pytest.param(lambda mk, k: mk(key=k.ed_impostor), "bad_signature",
                 id="other-key-same-kid"),
    pytest.param(lambda mk, k: mk()[:-6], "bad_signature", id="signature-truncated"),
    pytest.param(lambda mk, k: mk().rsplit(".", 1)[0] + ".", "bad_signature",
                 id="signature-empty"),
    pytest.param(lambda mk, k: mk().rsplit(".", 1)[0] + "." +
                 mk(claims={"sub": "bob"}).rsplit(".", 1)[1],
                 "bad_signature", id="signature-of-another-token"),
    # alg none / not allowed / confusion
    pytest.param(lambda mk, k: mk(alg="none", key=None), "alg_not_allowed",
                 id="alg-none-unsigned"),
    pytest.param(lambda mk, k: mk(alg="none", key=None) + b64url(b"sig"), "alg_not_allowed",
                 id="alg-none-with-signature"),
    pytest.param(lambda mk, k: mk(header={"alg": "None"}), "alg_not_allowed",
                 id="alg-None-capitalised"),
    pytest.param(lambda mk, k: mk(header={"alg": "NONE"}), "alg_not_allowed",
                 id="alg-NONE"),
    pytest.param(lambda mk, k: mk(header={"alg": DROP}), "alg_not_allowed", id="alg-missing"),
    pytest.param(lambda mk, k: mk(header={"alg": ["EdDSA"]}), "alg_not_allowed",
                 id="alg-not-a-string"),
    pytest.param(lambda mk, k: mk(alg="ES384"), "alg_not_allowed", id="alg-ES384-not-allowed"),
    pytest.param(lambda mk, k: mk(alg="PS256"), "alg_not_allowed", id="alg-PS256-not-allowed"),
    pytest.param(lambda mk, k: mk(alg="HS256", key=_pem(k.rsa), header={"kid": "rs-1"}),
                 "alg_not_allowed", id="hs256-with-rsa-public-pem"),
    pytest.param(lambda mk, k: mk(alg="HS256", key=_pem(k.es), header={"kid": "es-1"}),
                 "alg_not_allowed", id="hs256-with-ec-public-pem"),
    pytest.param(lambda mk, k: mk(alg="ES256", header={"kid": "ed-1"}), "alg_key_mismatch",
                 id="es256-naming-the-ed25519-key"),
    pytest.param(lambda mk, k: mk(alg="RS256", header={"kid": "es-1"}), "alg_key_mismatch",
                 id="rs256-naming-the-ec-key"),
    # key selection
    pytest.param(lambda mk, k: mk(header={"kid": "nope"}), "unknown_kid", id="unknown_kid"),
    pytest.param(lambda mk, k: mk(header={"kid": DROP}), "unknown_kid",
                 id="no-kid-several-keys"),
    # time
    pytest.param(lambda mk, k: mk(claims={"exp": _T - 31, "iat": _T - 300}), "expired",
                 id="expired-beyond-leeway"),
    pytest.param(lambda mk, k: mk(claims={"nbf": _T + 31}), "not_yet_valid",
                 id="nbf-in-future"),
    pytest.param(lambda mk, k: mk(claims={"iat": _T + 31, "exp": _T + 300}), "not_yet_valid",
                 id="iat-in-future"),
    pytest.param(lambda mk, k: mk(claims={"exp": _T + 901}), "lifetime_too_long",
                 id="lifetime-over-cap"),
    pytest.param(lambda mk, k: mk(claims={"iat": _T - 1000, "exp": _T + 10}),
                 "lifetime_too_long", id="lifetime-over-cap-old-iat"),
    pytest.param(lambda mk, k: mk(claims={"exp": float("inf")}), "malformed",
                 id="exp-infinity"),
    pytest.param(lambda mk, k: mk(claims={"exp": float("nan")}), "malformed", id="exp-nan"),
    pytest.param(lambda mk, k: mk(claims={"iat": float("nan"), "exp": _T + 365 * 86400}),
                 "malformed", id="iat-nan-bypasses-lifetime-cap"),
    # issuer / audience
    pytest.param(lambda mk, k: mk(claims={"iss": "https://evil.example.com"}), "wrong_issuer",
                 id="wrong-iss"),
    pytest.param(lambda mk, k: mk(claims={"iss": ISSUER + "/"}), "wrong_issuer",
                 id="iss-trailing-slash"),
    pytest.param(lambda mk, k: mk(claims={"iss": [ISSUER]}), "wrong_issuer", id="iss-list"),
    pytest.param(lambda mk, k: mk(claims={"aud": "someone-else"}), "wrong_audience",
                 id="wrong-aud-string"),
    pytest.param(lambda mk, k: mk(claims={"aud": ["a", "b"]}), "wrong_audience",
                 id="wrong-aud-list"),
    pytest.param(lambda mk, k: mk(claims={"aud": []}), "wrong_audience", id="aud-empty-list"),
    pytest.param(lambda mk, k: mk(claims={"aud": {AUDIENCE: True}}), "wrong_audience",
                 id="aud-object"),
    pytest.param(lambda mk, k: mk(claims={"aud": AUDIENCE.upper()}), "wrong_audience",
                 id="aud-case-differs"),
    # typ
    pytest.param(lambda mk, k: mk(header={"typ": DROP}), "wrong_typ", id="typ-missing"),
    pytest.param(lambda mk, k: mk(header={"typ": "JWT"}), "wrong_typ", id="typ-JWT"),
    pytest.param(lambda mk, k: mk(header={"typ": "at+jwt"}), "wrong_typ", id="typ-at+jwt"),
    pytest.param(lambda mk, k: mk(header={"typ": ["user-context+jwt"]}), "wrong_typ",
                 id="typ-not-a-string"),
    # required claims
    *[pytest.param(lambda mk, k, c=c: mk(claims={c: DROP}), "missing_claim",
                   id=f"missing-{c}") for c in ("iss", "aud", "sub", "exp", "iat")],
    *[pytest.param(lambda mk, k, c=c: mk(claims={c: None}), "missing_claim",
                   id=f"null-{c}") for c in ("iss", "sub", "exp")],
    pytest.param(lambda mk, k: mk(claims={"sub": ""}), "missing_claim", id="sub-empty"),
    # size
    pytest.param(lambda mk, k: mk(claims={"pad": "x" * 9000}), "oversized",
                 id="oversized-signed"),
    pytest.param(lambda mk, k: "a" * 8193, "oversized", id="oversized-garbage"),
]


@pytest.mark.parametrize(("build", "reason"), REJECTED)
async def test_rejected(build: Build, reason: str, make_context: MakeContext, keys: Keys,
                        make_verifier: MakeVerifier) -> None:
    token = build(make_context, keys)
    exc = await _reject(make_verifier(), token)
    assert exc.reason == reason
    assert exc.status == 407
    # The detail (shown to the agent and in logs) never echoes the token or a part of it.
    for text in (exc.detail, str(exc), repr(exc)):
        assert token not in text
        for part in token.split("."):
            if len(part) >= 12:
                assert part not in text


@pytest.mark.parametrize("pem_of", [
    pytest.param(lambda k: _pem(k.rsa), id="rsa"),
    pytest.param(lambda k: _pem(k.es), id="ec"),
])
@pytest.mark.parametrize("kid", ["rs-1", "es-1"])
async def test_algorithm_confusion_is_refused_even_if_hs256_were_allowed(
    pem_of: Callable[[Keys], bytes], kid: str, make_context: MakeContext, keys: Keys,
    make_verifier: MakeVerifier
) -> None:
    # Settings forbid mixing HS256 with asymmetric keys; bypass that validation to check
    # the verifier's own defence (RFC 8725 section 2.1).
    mixed = IdentitySettings.model_construct(issuer=ISSUER, audience=AUDIENCE,
                                             jwks_file="x",
                                             algorithms=["EdDSA", "ES256", "RS256", "HS256"])
    token = make_context(alg="HS256", key=pem_of(keys), header={"kid": kid})
    exc = await _reject(make_verifier(settings=mixed), token)
    assert exc.reason == "alg_key_mismatch"


async def test_oversized_limit_is_configurable(make_context: MakeContext,
                                               make_verifier: MakeVerifier) -> None:
    token = make_context()
    verifier = make_verifier(max_token_bytes=256)
    assert len(token) > 256
    assert (await _reject(verifier, token)).reason == "oversized"
    assert (await make_verifier(max_token_bytes=len(token)).verify(Secret(token))).user


async def test_leeway_and_lifetime_are_configurable(make_context: MakeContext,
                                                    make_verifier: MakeVerifier) -> None:
    expired_5s = make_context(claims={"exp": _T - 5, "iat": _T - 60})
    assert (await _reject(make_verifier(leeway=0), expired_5s)).reason == "expired"
    long_lived = make_context(claims={"exp": _T + 3600})
    assert (await make_verifier(max_lifetime=3600).verify(Secret(long_lived))).user
    assert (await _reject(make_verifier(max_lifetime=60), make_context())).reason == (
        "lifetime_too_long")


def test_header_property(make_verifier: MakeVerifier) -> None:
    assert make_verifier(header="X-Agent-Context").header == "X-Agent-Context"


# --- cache ----------------------------------------------------------------------------------


async def test_cached_token_is_rejected_once_it_expires(make_context: MakeContext,
                                                        make_verifier: MakeVerifier) -> None:
    clock = Clock()
    verifier = make_verifier(clock=clock)
    token = Secret(make_context())  # exp = NOW + 300, leeway 30
    first = await verifier.verify(token)
    clock.advance(329)
    assert await verifier.verify(token) is first  # served from the cache, within leeway
    clock.advance(2)
    with pytest.raises(UserContextInvalid) as info:
        await verifier.verify(token)
    assert info.value.reason == "expired"


async def test_cache_does_not_admit_a_tampered_copy(make_context: MakeContext,
                                                    make_verifier: MakeVerifier) -> None:
    verifier = make_verifier()
    token = make_context()
    await verifier.verify(Secret(token))
    forged = _with_payload(token, make_claims(sub="mallory@example.com"))
    assert (await _reject(verifier, forged)).reason == "bad_signature"


# --- one-time jti ---------------------------------------------------------------------------


async def test_one_time_jti_second_use_is_replayed(make_context: MakeContext,
                                                   make_verifier: MakeVerifier) -> None:
    verifier = make_verifier(one_time_jti=True)
    token = make_context(claims={"jti": "once"})
    assert (await verifier.verify(Secret(token))).jti == "once"
    exc = await _reject(verifier, token)
    assert exc.reason == "replayed"
    # A different token with a fresh jti is still fine.
    assert (await verifier.verify(Secret(make_context(claims={"jti": "twice"})))).jti == "twice"


@pytest.mark.parametrize("jti", [pytest.param(DROP, id="absent"), pytest.param("", id="empty"),
                                 pytest.param(None, id="null")])
async def test_one_time_jti_requires_jti(jti: Any, make_context: MakeContext,
                                         make_verifier: MakeVerifier) -> None:
    exc = await _reject(make_verifier(one_time_jti=True), make_context(claims={"jti": jti}))
    assert exc.reason == "missing_claim"
    assert "jti" in exc.detail


async def test_one_time_jti_must_be_a_string(make_context: MakeContext,
                                             make_verifier: MakeVerifier) -> None:
    exc = await _reject(make_verifier(one_time_jti=True), make_context(claims={"jti": 12345}))
    assert exc.reason in {"malformed", "missing_claim"}


async def test_one_time_jti_cannot_be_replayed_within_leeway(make_context: MakeContext,
                                                             make_verifier: MakeVerifier) -> None:
    clock = Clock()
    verifier = make_verifier(clock=clock, one_time_jti=True)
    token = make_context(claims={"jti": "once"})  # exp = NOW + 300, leeway 30
    await verifier.verify(Secret(token))
    clock.advance(310)  # past exp, still inside the leeway: the token itself is still valid
    exc = await _reject(verifier, token)
    assert exc.reason == "replayed"


async def test_one_time_jti_store_outage_is_503(make_context: MakeContext, keys: Keys) -> None:
    class Down:
        async def first_use(self, issuer: str, jti: str, expires_at: float,
                            issued_at: float | None = None) -> bool:
            raise CoordinationUnavailable("redis down")

    verifier = IdentityVerifier(identity_settings(one_time_jti=True),
                                KeySource(keys.public_set()), replay=Down(), clock=Clock())
    with pytest.raises(CredentialStoreUnavailable) as info:
        await verifier.verify(Secret(make_context(claims={"jti": "j"})))
    assert info.value.reason == "coordination_unavailable"
    assert info.value.status == 503


async def test_replay_guard() -> None:
    clock = Clock()
    guard = ReplayGuard(clock)
    assert await guard.first_use("iss", "j", NOW + 10)
    assert not await guard.first_use("iss", "j", NOW + 10)
    assert await guard.first_use("other-iss", "j", NOW + 10)
    clock.advance(11)
    assert await guard.first_use("iss", "j", NOW + 100)  # the old entry has expired


async def test_replay_guard_refuses_tokens_issued_before_it_started() -> None:
    """A restarted proxy has forgotten which jti values its predecessor saw."""
    clock = Clock()
    guard = ReplayGuard(clock)
    assert not await guard.first_use("iss", "old", NOW + 100, issued_at=NOW - 5)
    assert await guard.first_use("iss", "new", NOW + 100, issued_at=NOW)


# --- Proxy-Authorization --------------------------------------------------------------------


def _basic(userpass: bytes) -> str:
    return "Basic " + base64.b64encode(userpass).decode()


@pytest.mark.parametrize(("value", "expected"), [
    pytest.param("Bearer abc.def.ghi", "abc.def.ghi", id="bearer"),
    pytest.param("  bearer   abc.def.ghi  ", "abc.def.ghi", id="bearer-lowercase-spaces"),
    pytest.param(_basic(b"ctx:abc.def.ghi"), "abc.def.ghi", id="basic-ctx"),
    pytest.param("basic " + base64.b64encode(b":abc").decode(), "abc", id="basic-no-user"),
    pytest.param(_basic(b"ctx:a:b"), "a:b", id="basic-password-with-colon"),
])
def test_proxy_authorization_accepted(value: str, expected: str) -> None:
    secret = context_from_proxy_authorization(value)
    assert isinstance(secret, Secret)
    assert secret.reveal() == expected


@pytest.mark.parametrize(("value", "match"), [
    pytest.param(_basic(b"ctx:"), "Bearer <jws> or Basic", id="basic-empty-password"),
    pytest.param(_basic(b"ctxonly"), "Bearer <jws> or Basic", id="basic-no-colon"),
    pytest.param("Basic !!!not-base64", "not valid base64", id="basic-bad-base64"),
    pytest.param("Basic Y3g", "not valid base64", id="basic-unpadded"),
    pytest.param(_basic(b"ctx:\xff\xfe"), "not valid base64", id="basic-not-utf8"),
    pytest.param("Basic", "Bearer <jws> or Basic", id="basic-without-credentials"),
    pytest.param("Bearer", "Bearer <jws> or Basic", id="bearer-without-token"),
    pytest.param("Bearer   ", "Bearer <jws> or Basic", id="bearer-blank-token"),
    pytest.param("Digest abc", "Bearer <jws> or Basic", id="unknown-scheme"),
    pytest.param("", "Bearer <jws> or Basic", id="empty"),
    pytest.param("   ", "Bearer <jws> or Basic", id="blank"),
])
def test_proxy_authorization_rejected(value: str, match: str) -> None:
    with pytest.raises(UserContextInvalid, match=match) as info:
        context_from_proxy_authorization(value)
    assert info.value.reason == "malformed"


# --- key sources ----------------------------------------------------------------------------


async def test_key_source_from_jwks_file(jwks_file: Path, make_context: MakeContext) -> None:
    settings = identity_settings(jwks_file=str(jwks_file))
    verifier = IdentityVerifier(settings, KeySource.from_settings(settings), clock=Clock())
    for alg in ("EdDSA", "ES256", "RS256"):
        assert (await verifier.verify(Secret(make_context(alg=alg)))).user


@pytest.mark.filterwarnings("ignore:Using implicit key type")
@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_key_source_from_pem_file(alg: str, tmp_path: Path, keys: Keys,
                                        make_context: MakeContext) -> None:
    pem = tmp_path / "key.pem"
    pem.write_bytes(_pem(keys.for_alg(alg)))
    settings = identity_settings(jwks_file=None, pem_file=str(pem), algorithms=[alg])
    verifier = IdentityVerifier(settings, KeySource.from_settings(settings), clock=Clock())
    ctx = await verifier.verify(Secret(make_context(alg=alg, header={"kid": DROP})))
    assert ctx.user == "alice@example.com"
    other = "ES256" if alg != "ES256" else "EdDSA"
    exc = await _reject(verifier, make_context(alg=other, header={"kid": DROP}))
    assert exc.reason == "alg_not_allowed"


def test_pem_key_loads_without_warnings(tmp_path: Path, keys: Keys) -> None:
    pem = tmp_path / "key.pem"
    pem.write_bytes(_pem(keys.rsa))
    settings = identity_settings(jwks_file=None, pem_file=str(pem), algorithms=["RS256"])
    KeySource.from_settings(settings)


async def test_single_key_sources_ignore_the_token_kid(tmp_path: Path, keys: Keys,
                                                       make_context: MakeContext) -> None:
    settings = identity_settings(jwks_file=None, hs256_secret_env="S", algorithms=["HS256"])
    verifier = IdentityVerifier(settings,
                                KeySource.from_settings(settings, environ={"S": HS_SECRET}),
                                clock=Clock())
    ctx = await verifier.verify(Secret(make_context(alg="HS256", header={"kid": "hs-2025"})))
    assert ctx.user == "alice@example.com"


@pytest.mark.parametrize(("overrides", "environ", "write", "match"), [
    pytest.param({"hs256_secret_env": "S", "algorithms": ["HS256"]}, {"S": "short"}, None,
                 "identity.hs256_secret: must be at least 32 bytes", id="hs-secret-short"),
    pytest.param({"hs256_secret_env": "S", "algorithms": ["HS256"]}, {}, None,
                 "environment variable S is not set", id="hs-secret-env-unset"),
    pytest.param({"hs256_secret_file": "{dir}/missing", "algorithms": ["HS256"]}, {}, None,
                 "identity.hs256_secret: cannot read", id="hs-secret-file-missing"),
    pytest.param({"jwks_file": "{dir}/missing.json"}, {}, None,
                 "identity: cannot load verification keys", id="jwks-file-missing"),
    pytest.param({"jwks_file": "{dir}/k.json"}, {}, b"{not json",
                 "identity: cannot load verification keys", id="jwks-file-not-json"),
    pytest.param({"jwks_file": "{dir}/k.json"}, {}, b'{"keys": [{"kty": "nope"}]}',
                 "identity: cannot load verification keys", id="jwks-file-bad-key"),
    pytest.param({"pem_file": "{dir}/k.json"}, {}, b"-----BEGIN NOTHING-----",
                 "identity.pem_file: .* is not a PEM public key", id="pem-file-garbage"),
    pytest.param({"pem_file": "{dir}/k.json"}, {}, b'{"kty": "OKP", "crv": "Ed25519"}',
                 "identity.pem_file: .* is not a PEM public key", id="pem-file-holding-a-jwk"),
    pytest.param({"pem_file": "{dir}/k.json"}, {}, b"not a key at all",
                 "identity.pem_file: .* is not a PEM public key", id="pem-file-plain-text"),
])
@pytest.mark.filterwarnings("ignore:Using implicit key type")
@pytest.mark.filterwarnings("ignore:This key should not be used as an oct key")
def test_key_source_config_errors(overrides: dict[str, Any], environ: dict[str, str],
                                  write: bytes | None, match: str, tmp_path: Path) -> None:
    values = {k: v.format(dir=tmp_path) if isinstance(v, str) else v
              for k, v in overrides.items()}
    if write is not None:
        (tmp_path / "k.json").write_bytes(write)
    settings = identity_settings(**{"jwks_file": None, **values})
    with pytest.raises(ConfigError, match=match) as info:
        KeySource.from_settings(settings, environ=environ)
    assert "short" not in str(info.value)


def _jwks_client(responses: list[Any], calls: list[int]) -> httpx2.AsyncClient:
    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        item = responses[min(len(calls), len(responses)) - 1]
        if isinstance(item, int):
            return httpx2.Response(item)
        return httpx2.Response(200, json=item.as_dict(private=False))

    return httpx2.AsyncClient(transport=httpx2.MockTransport(handler))


async def test_jwks_url_refetches_on_unknown_kid(keys: Keys, make_context: MakeContext) -> None:
    only_es = KeySet([keys.public_set().keys[1]])
    calls: list[int] = []
    async with _jwks_client([only_es, keys.public_set()], calls) as http:
        source = KeySource(None, jwks_url="https://issuer/jwks", http=http, min_refetch=-1)
        settings = identity_settings(jwks_file=None, jwks_url="https://issuer/jwks")
        verifier = IdentityVerifier(settings, source, clock=Clock())
        assert (await verifier.verify(Secret(make_context(alg="ES256")))).user
        assert len(calls) == 1
        assert (await verifier.verify(Secret(make_context(alg="EdDSA")))).user  # rotated in
        assert len(calls) == 2


async def test_jwks_url_refetch_is_rate_limited(keys: Keys, make_context: MakeContext) -> None:
    calls: list[int] = []
    async with _jwks_client([keys.public_set()], calls) as http:
        source = KeySource(None, jwks_url="https://issuer/jwks", http=http, min_refetch=3600)
        verifier = IdentityVerifier(identity_settings(), source, clock=Clock())
        for _ in range(3):
            exc = await _reject(verifier, make_context(header={"kid": "unknown"}))
            assert exc.reason == "unknown_kid"
        assert len(calls) == 1


async def test_jwks_url_unavailable(keys: Keys, make_context: MakeContext) -> None:
    calls: list[int] = []
    async with _jwks_client([503], calls) as http:
        source = KeySource(None, jwks_url="https://issuer/jwks", http=http)
        verifier = IdentityVerifier(identity_settings(), source, clock=Clock())
        assert (await _reject(verifier, make_context())).reason == "keys_unavailable"


async def test_jwks_url_outage_keeps_the_last_keys(keys: Keys,
                                                   make_context: MakeContext) -> None:
    calls: list[int] = []
    async with _jwks_client([keys.public_set(), 500], calls) as http:
        source = KeySource(None, jwks_url="https://issuer/jwks", http=http, min_refetch=-1)
        verifier = IdentityVerifier(identity_settings(), source, clock=Clock())
        assert (await verifier.verify(Secret(make_context()))).user
        exc = await _reject(verifier, make_context(header={"kid": "rotated"}))
        assert exc.reason == "unknown_kid" and len(calls) == 2
        assert (await verifier.verify(Secret(make_context(alg="ES256")))).user


# --- dev keys / minting ---------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
async def test_dev_keys_mint_verifiable_contexts(alg: str, tmp_path: Path) -> None:
    priv, pub = write_dev_keys(tmp_path / "keys", alg=alg, kid="dev-9")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert "\"d\"" not in pub.read_text()  # the public set holds no private part
    token = mint(sub="bob", issuer=ISSUER, audience=AUDIENCE, key_file=str(priv), now=NOW,
                 providers=["docs"], jti=True)
    settings = identity_settings(jwks_file=str(pub), one_time_jti=True)
    verifier = IdentityVerifier(settings, KeySource.from_settings(settings), clock=Clock())
    ctx = await verifier.verify(token)
    assert (ctx.user, ctx.providers, ctx.expires_at) == ("bob", frozenset({"docs"}), NOW + 300)
    assert ctx.jti and ctx.context_kind == "chat"
    header = json.loads(base64.urlsafe_b64decode(token.reveal().split(".")[0] + "=="))
    assert header == {"alg": alg, "typ": TYP, "kid": "dev-9"}


async def test_mint_hs256(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTX_SECRET", HS_SECRET)
    token = mint(sub="bob", issuer=ISSUER, audience=AUDIENCE, hs256_secret_env="CTX_SECRET",
                 now=NOW, ctx_kind=None, ctx_id=None)
    settings = identity_settings(jwks_file=None, hs256_secret_env="CTX_SECRET",
                                 algorithms=["HS256"])
    verifier = IdentityVerifier(settings, KeySource.from_settings(settings), clock=Clock())
    ctx = await verifier.verify(token)
    assert ctx.user == "bob" and ctx.context() is None
    assert not math.isnan(ctx.expires_at)


@pytest.mark.parametrize(("kwargs", "match"), [
    pytest.param({}, "signing key file or an HS256 secret", id="no-key"),
    pytest.param({"hs256_secret_env": "CREDPROXY_TEST_UNSET"}, "CREDPROXY_TEST_UNSET",
                 id="hs-env-unset"),
])
def test_mint_errors(kwargs: dict[str, str], match: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDPROXY_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match=match):
        mint(sub="bob", issuer=ISSUER, audience=AUDIENCE, **kwargs)


# --- JWKS URL freshness, against a real local HTTP server --------------------------------------


class _JwksServer:
    """Serves ``keys`` (or ``status``) at /jwks with ``cache_control``; counts requests."""

    def __init__(self, keys: KeySet) -> None:
        import http.server
        import threading

        self.keys = keys
        self.status = 200
        self.cache_control: str | None = None
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.requests += 1
                body = json.dumps(outer.keys.as_dict(private=False)).encode()
                if outer.status != 200:
                    body = b"{}"
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if outer.cache_control:
                    self.send_header("Cache-Control", outer.cache_control)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/jwks"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def jwks_server(keys: Keys) -> Any:
    server = _JwksServer(keys.public_set())
    yield server
    server.close()


@pytest.fixture
async def jwks_http() -> Any:
    async with httpx2.AsyncClient(trust_env=False, timeout=5) as http:
        yield http


def _url_verifier(server: _JwksServer, http: httpx2.AsyncClient,
                  clock: Clock) -> IdentityVerifier:
    # The key source has its own clock (monotonic seconds); tokens are checked at NOW.
    source = KeySource(None, jwks_url=server.url, http=http, min_refetch=30, clock=clock)
    return IdentityVerifier(identity_settings(jwks_file=None, jwks_url="https://issuer/jwks"),
                            source, clock=Clock())


async def test_jwks_key_removed_by_the_issuer_stops_verifying_after_max_age(
        jwks_server: _JwksServer, jwks_http: httpx2.AsyncClient, keys: Keys,
        make_context: MakeContext) -> None:
    source_clock = Clock(0)
    verifier = _url_verifier(jwks_server, jwks_http, source_clock)
    assert (await verifier.verify(Secret(make_context(claims={"jti": "1"})))).user
    jwks_server.keys = KeySet([keys.public_set().keys[1]])  # the issuer drops ed-1
    source_clock.advance(599)
    assert (await verifier.verify(Secret(make_context(claims={"jti": "2"})))).user
    assert jwks_server.requests == 1
    source_clock.advance(2)  # past the 600 s default
    exc = await _reject(verifier, make_context(claims={"jti": "3"}))
    assert exc.reason == "unknown_kid"
    assert jwks_server.requests == 2
    assert (await verifier.verify(Secret(make_context(alg="ES256")))).user


@pytest.mark.parametrize(("cache_control", "fresh_for"), [
    pytest.param("public, max-age=120", 120, id="shorter-max-age-honoured"),
    pytest.param("max-age=86400", 600, id="longer-max-age-capped"),
    pytest.param("no-cache", 30, id="no-cache-means-min-refetch"),
    pytest.param("max-age=5", 30, id="never-below-min-refetch"),
    pytest.param("max-age=soon", 600, id="unparseable-ignored"),
])
async def test_jwks_cache_control_max_age(jwks_server: _JwksServer,
                                          jwks_http: httpx2.AsyncClient,
                                          make_context: MakeContext, cache_control: str,
                                          fresh_for: int) -> None:
    jwks_server.cache_control = cache_control
    source_clock = Clock(0)
    verifier = _url_verifier(jwks_server, jwks_http, source_clock)
    await verifier.verify(Secret(make_context(claims={"jti": "a"})))
    source_clock.advance(fresh_for - 1)
    await verifier.verify(Secret(make_context(claims={"jti": "b"})))
    assert jwks_server.requests == 1
    source_clock.advance(1)
    await verifier.verify(Secret(make_context(claims={"jti": "c"})))
    assert jwks_server.requests == 2


async def test_jwks_outage_keeps_the_last_good_keys_for_a_bounded_time(
        jwks_server: _JwksServer, jwks_http: httpx2.AsyncClient,
        make_context: MakeContext) -> None:
    source_clock = Clock(0)
    verifier = _url_verifier(jwks_server, jwks_http, source_clock)
    await verifier.verify(Secret(make_context(claims={"jti": "0"})))
    jwks_server.status = 503
    source_clock.advance(600)  # stale: the refetch fails, the old keys keep serving
    assert (await verifier.verify(Secret(make_context(claims={"jti": "1"})))).user
    assert jwks_server.requests == 2
    source_clock.advance(10)  # failed fetches are retried at most every min_refetch
    assert (await verifier.verify(Secret(make_context(claims={"jti": "2"})))).user
    assert jwks_server.requests == 2
    source_clock.advance(3600 - 10)  # max_stale after going stale: refuse
    exc = await _reject(verifier, make_context(claims={"jti": "3"}))
    assert exc.reason == "keys_unavailable"
    assert jwks_server.requests == 3
    jwks_server.status = 200  # the issuer is back
    source_clock.advance(30)
    assert (await verifier.verify(Secret(make_context(claims={"jti": "4"})))).user
    assert jwks_server.requests == 4
