"""Verification of the signed user context (a compact JWS) carried by each request.

Every rejection is a :class:`proxy.errors.UserContextInvalid` whose ``reason`` is a short
slug (``expired``, ``bad_signature``, ...) and whose detail says what was wrong without
echoing the token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx2
from joserfc import jwt
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import ECKey, Key, KeySet, OctKey, OKPKey, RSAKey

from proxy.audit import ContextInfo
from proxy.errors import (
    ConfigError,
    CoordinationUnavailable,
    CredentialStoreUnavailable,
    UserContextInvalid,
    UserContextMissing,
)
from proxy.headers import PROXY_AUTHORIZATION, ReadHeaders, field_key
from proxy.secret import Secret
from proxy.settings import IdentitySettings, resolve_secret

# Algorithm name prefix -> the only key type it may be verified with.
_KEY_TYPES: dict[str, type[Key]] = {"Ed": OKPKey, "ES": ECKey, "RS": RSAKey, "PS": RSAKey,
                                    "HS": OctKey}
_REQUIRED = ("iss", "aud", "sub", "exp", "iat")

# RFC 9864 deprecates the polymorphic "EdDSA" name in favour of "Ed25519", and joserfc warns
# on it; most issuers still send "EdDSA", and an operator who lists it chose it knowingly.
warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)
_CACHE_SIZE = 10_000
# A JWKS fetched from a URL is trusted this long (less if its Cache-Control max-age says so)
# before it is fetched again, so a key the issuer removed stops verifying; if refetching
# fails, the last good set keeps serving this much longer, then tokens are refused.
_IDENTIFIER = re.compile(r"[^\x00-\x1f\x7f]{1,256}")


def valid_identifier(value: object) -> bool:
    """Whether ``value`` is an id credproxy accepts for a user (``sub``) or a user
    context (``ctx.id``): a string of 1-256 characters, no control characters, no
    surrounding whitespace. One rule for what the verifier lets in and what an operator
    can name (``credproxy suspend --user`` / ``--context-id``), so every user and run the
    proxy serves can be stopped."""
    return (isinstance(value, str) and value == value.strip()
            and _IDENTIFIER.fullmatch(value) is not None)


JWKS_MAX_AGE = 600.0
JWKS_MAX_STALE = 3600.0

log = logging.getLogger("credproxy.identity")


@dataclass(frozen=True, slots=True)
class UserContext:
    """A verified user context."""

    user: str
    issuer: str
    expires_at: float
    context_kind: str | None = None
    context_id: str | None = None
    providers: frozenset[str] | None = None  # None = no restriction in the token
    jti: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def context(self) -> ContextInfo | None:
        if self.context_kind is None and self.context_id is None:
            return None
        return ContextInfo(kind=self.context_kind or "", id=self.context_id or "")

    def permits(self, provider_id: str) -> bool:
        return self.providers is None or provider_id in self.providers


class ReplayStore(Protocol):
    async def first_use(self, issuer: str, jti: str, expires_at: float,
                        issued_at: float | None = None) -> bool: ...


class ReplayGuard:
    """One-time use of ``jti`` values in this process (Redis coordination shares them).

    A token issued before this process started may have been used by its predecessor,
    whose records are gone: it is refused rather than accepted unchecked."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._seen: dict[str, float] = {}
        self._clock = clock
        self._started = int(clock())  # iat has one-second resolution

    async def first_use(self, issuer: str, jti: str, expires_at: float,
                        issued_at: float | None = None) -> bool:
        if issued_at is not None and issued_at < self._started:
            return False
        now = self._clock()
        if len(self._seen) > _CACHE_SIZE:
            self._seen = {k: v for k, v in self._seen.items() if v > now}
        key = f"{issuer}\x00{jti}"
        if key in self._seen and self._seen[key] > now:
            return False
        self._seen[key] = expires_at
        return True


class KeySource:
    """The verification keys: a static set, or a JWKS URL.

    A fetched JWKS is fresh for ``max_age`` seconds, or for the response's Cache-Control
    ``max-age`` when that is shorter (``no-cache``/``no-store``: as short as allowed), and
    is fetched again on the first use after that; a token naming an unknown ``kid`` also
    triggers a fetch. Fetches happen at most every ``min_refetch`` seconds. When a fetch
    fails, the last good set keeps serving for at most ``max_stale`` seconds after it went
    stale; after that every token is refused (``keys_unavailable``) until a fetch succeeds.
    """

    def __init__(self, keys: KeySet | None, *, jwks_url: str | None = None,
                 http: httpx2.AsyncClient | None = None, min_refetch: float = 30.0,
                 max_age: float = JWKS_MAX_AGE, max_stale: float = JWKS_MAX_STALE,
                 any_kid: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self._keys = keys
        # A single configured key (PEM, HS secret) has no kid of its own: accept whatever
        # kid the issuer labels its tokens with.
        self._any_kid = any_kid
        self._url = jwks_url
        self._http = http
        self._min_refetch = min_refetch
        self._max_age = max_age
        self._max_stale = max_stale
        self._clock = clock
        self._fresh_until = -math.inf  # when the current set goes stale
        self._attempted_at = -math.inf  # the last fetch, successful or not
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, s: IdentitySettings, http: httpx2.AsyncClient | None = None,
                      environ: Mapping[str, str] | None = None) -> KeySource:
        try:
            if s.jwks_file:
                data = json.loads(Path(s.jwks_file).expanduser().read_text(encoding="utf-8"))
                return cls(KeySet.import_key_set(data))
            if s.pem_file:
                key = import_pem(Path(s.pem_file).expanduser().read_bytes(), s.pem_file)
                return cls(KeySet([key]), any_kid=True)
            if s.hs256_secret_env or s.hs256_secret_file:
                kwargs = {} if environ is None else {"environ": environ}
                secret = resolve_secret(env=s.hs256_secret_env, file=s.hs256_secret_file,
                                        what="identity.hs256_secret", **kwargs)
                if len(secret.reveal().encode()) < 32:
                    raise ConfigError("identity.hs256_secret: must be at least 32 bytes")
                return cls(KeySet([OctKey.import_key(secret.reveal().encode())]), any_kid=True)
        except (OSError, ValueError, JoseError) as exc:
            raise ConfigError(f"identity: cannot load verification keys: {exc}") from exc
        assert s.jwks_url is not None
        return cls(None, jwks_url=s.jwks_url, http=http)

    async def key_for(self, kid: str | None) -> Key:
        keys = await self._current(force=False)
        if self._any_kid:
            return keys.keys[0]
        try:
            return _pick(keys, kid)
        except UserContextInvalid:
            if self._url is None:
                raise
        # A rotated signing key: refetch the JWKS, at most every min_refetch seconds.
        return _pick(await self._current(force=True), kid)

    async def _current(self, *, force: bool) -> KeySet:
        if self._url is None:
            assert self._keys is not None
            return self._keys
        async with self._lock:
            now = self._clock()
            due = force or now >= self._fresh_until
            if self._keys is None or (due and now - self._attempted_at >= self._min_refetch):
                await self._fetch(now)
            if self._keys is None or now >= self._fresh_until + self._max_stale:
                raise UserContextInvalid("verification keys are unavailable",
                                         reason="keys_unavailable")
            return self._keys

    async def _fetch(self, now: float) -> None:
        """Replace the key set with the JWKS at the URL; on failure keep the old one."""
        assert self._url is not None and self._http is not None
        self._attempted_at = now
        try:
            resp = await self._http.get(self._url)
            resp.raise_for_status()
            keys = KeySet.import_key_set(resp.json())
        except (httpx2.HTTPError, ValueError, JoseError) as exc:
            if self._keys is not None:  # (without keys, each refusal is logged already)
                log.warning("JWKS fetch failed (%s); the last good keys serve until %.0f s "
                            "from now", type(exc).__name__,
                            self._fresh_until + self._max_stale - now)
            return
        self._keys = keys
        self._fresh_until = now + _freshness(resp.headers.get("Cache-Control"),
                                             self._max_age, self._min_refetch)


def _freshness(cache_control: str | None, max_age: float, floor: float) -> float:
    """Seconds a fetched JWKS stays fresh: ``max_age``, or the response's shorter
    Cache-Control max-age; never below ``floor`` (the refetch rate limit)."""
    seconds = max_age
    for directive in (cache_control or "").split(","):
        name, _, value = directive.strip().partition("=")
        if name.lower() in {"no-cache", "no-store"}:
            seconds = 0.0
        elif name.lower() == "max-age":
            try:
                seconds = min(seconds, float(int(value.strip().strip('"'))))
            except ValueError:
                continue
    return max(seconds, floor, 0.0)


def import_pem(data: bytes, source: str) -> Key:
    """A PEM public key with its type stated (guessing it would let non-PEM bytes become an
    HMAC secret)."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        public = load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"identity.pem_file: {source} is not a PEM public key") from exc
    if isinstance(public, rsa.RSAPublicKey):
        return RSAKey.import_key(data)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return ECKey.import_key(data)
    if isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return OKPKey.import_key(data)
    raise ConfigError(f"identity.pem_file: unsupported key type in {source}")


def _pick(keys: KeySet, kid: str | None) -> Key:
    if kid is None:
        if len(keys.keys) == 1:
            return keys.keys[0]
        raise UserContextInvalid("token has no kid and several keys are configured",
                                 reason="unknown_kid")
    for key in keys.keys:
        if key.kid == kid:
            return key
    raise UserContextInvalid("token kid does not name a configured key", reason="unknown_kid")


class IdentityVerifier:
    """Verifies user-context tokens per the settings. Thread-compatible, async."""

    def __init__(self, settings: IdentitySettings, keys: KeySource, *,
                 replay: ReplayStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._s = settings
        self._keys = keys
        self._replay = replay or ReplayGuard(clock)
        self._clock = clock
        # Verified tokens keyed by a hash of the token; expiry is re-checked on every hit.
        self._cache: OrderedDict[bytes, UserContext] = OrderedDict()

    @property
    def header(self) -> str:
        return self._s.header

    async def verify(self, token: Secret | None) -> UserContext:
        if token is None or not token.reveal().strip():
            raise UserContextMissing("this destination needs a user context "
                                     f"({self._s.header} header or Proxy-Authorization)",
                                     reason="missing")
        raw = token.reveal().strip()
        if len(raw) > self._s.max_token_bytes:
            raise UserContextInvalid(f"user context is larger than {self._s.max_token_bytes} "
                                     "bytes", reason="oversized")
        now = self._clock()
        digest = hashlib.sha256(raw.encode()).digest()
        cached = self._cache.get(digest)
        if cached is not None and not self._s.one_time_jti:
            self._check_time(cached.expires_at, None, now)
            self._cache.move_to_end(digest)
            return cached
        ctx = await self._verify(raw, now)
        if self._s.one_time_jti:
            if ctx.jti is None:
                raise UserContextInvalid("missing claims: jti", reason="missing_claim")
            try:
                # Remembered for as long as the token can be accepted: exp plus leeway.
                first = await self._replay.first_use(ctx.issuer, ctx.jti,
                                                     ctx.expires_at + self._s.leeway,
                                                     float(ctx.claims["iat"]))
            except CoordinationUnavailable as exc:
                raise CredentialStoreUnavailable("cannot record the one-time jti",
                                                 reason="coordination_unavailable") from exc
            if not first:
                raise UserContextInvalid("user context was already used (jti replayed), or "
                                         "was issued before the replay records were lost "
                                         "(a restart); mint a new one", reason="replayed")
        else:
            self._cache[digest] = ctx
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return ctx

    async def _verify(self, raw: str, now: float) -> UserContext:
        header = _parse_header(raw)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise UserContextInvalid("unsigned tokens (alg none) are not accepted",
                                     reason="alg_not_allowed")
        if alg not in self._s.algorithms:
            raise UserContextInvalid(f"algorithm {alg} is not allowed", reason="alg_not_allowed")
        typ = header.get("typ")
        if self._s.typ is not None and (not isinstance(typ, str) or
                                        _media(typ) != _media(self._s.typ)):
            raise UserContextInvalid(f"typ must be {self._s.typ}", reason="wrong_typ")
        if "crit" in header:
            raise UserContextInvalid("critical header parameters are not supported",
                                     reason="malformed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise UserContextInvalid("kid must be a string", reason="malformed")
        key = await self._keys.key_for(kid)
        expected = _KEY_TYPES[alg[:2]]
        if not isinstance(key, expected):
            # e.g. HS256 "signed" with an RSA public key: algorithm confusion (RFC 8725 2.1).
            raise UserContextInvalid(f"algorithm {alg} does not match the key type",
                                     reason="alg_key_mismatch")
        try:
            token = jwt.decode(raw, key, algorithms=[alg])
        except JoseError as exc:
            reason = "bad_signature" if exc.error in {"bad_signature"} else "malformed"
            raise UserContextInvalid(f"signature verification failed ({exc.error})",
                                     reason=reason) from None
        return self._claims(token.claims, now)

    def _claims(self, claims: Mapping[str, Any], now: float) -> UserContext:
        s = self._s
        missing = [c for c in _REQUIRED if claims.get(c) in (None, "")]
        if s.one_time_jti and not claims.get("jti"):
            missing.append("jti")
        if missing:
            raise UserContextInvalid(f"missing claims: {', '.join(missing)}",
                                     reason="missing_claim")
        exp, iat, nbf = claims["exp"], claims["iat"], claims.get("nbf")
        for name, value in (("exp", exp), ("iat", iat), ("nbf", nbf)):
            # JSON parsers accept NaN/Infinity, and every comparison with NaN is false.
            if value is not None and (isinstance(value, bool) or
                                      not isinstance(value, int | float) or
                                      not math.isfinite(value)):
                raise UserContextInvalid(f"{name} must be a finite number", reason="malformed")
        if claims["iss"] != s.issuer:
            raise UserContextInvalid("issuer is not the configured one", reason="wrong_issuer")
        aud = claims["aud"]
        auds = [aud] if isinstance(aud, str) else aud
        if not isinstance(auds, list) or s.audience not in auds:
            raise UserContextInvalid("audience does not include this proxy",
                                     reason="wrong_audience")
        self._check_time(float(exp), float(nbf) if nbf is not None else None, now)
        if iat > now + s.leeway:
            raise UserContextInvalid("issued in the future", reason="not_yet_valid")
        if exp - iat > s.max_lifetime:
            raise UserContextInvalid(f"lifetime exceeds {s.max_lifetime} seconds",
                                     reason="lifetime_too_long")
        sub = claims["sub"]
        if not valid_identifier(sub):
            raise UserContextInvalid("sub must be a string of 1-256 characters without "
                                     "control characters or surrounding spaces",
                                     reason="malformed")
        ctx = claims.get("ctx")
        if ctx is None:
            ctx = {}
        if not isinstance(ctx, dict) or not all(
            ctx.get(k) is None or valid_identifier(ctx.get(k)) for k in ("kind", "id")
        ):
            raise UserContextInvalid("ctx must be an object whose kind and id are strings "
                                     "of 1-256 characters without control characters or "
                                     "surrounding spaces", reason="malformed")
        providers = claims.get("providers")
        if providers is not None and not (isinstance(providers, list) and
                                          all(isinstance(p, str) for p in providers)):
            raise UserContextInvalid("providers must be a list of strings", reason="malformed")
        jti = claims.get("jti")
        if jti is not None and (not isinstance(jti, str) or len(jti) > 256):
            raise UserContextInvalid("jti must be a string of at most 256 chars",
                                     reason="malformed")
        return UserContext(
            user=sub,
            issuer=claims["iss"],
            expires_at=float(exp),
            context_kind=ctx.get("kind"),
            context_id=ctx.get("id"),
            providers=frozenset(providers) if providers is not None else None,
            jti=jti if isinstance(jti, str) else None,
            claims=dict(claims),
        )

    def _check_time(self, exp: float, nbf: float | None, now: float) -> None:
        if exp + self._s.leeway < now:
            raise UserContextInvalid("user context has expired", reason="expired")
        if nbf is not None and nbf > now + self._s.leeway:
            raise UserContextInvalid("user context is not valid yet", reason="not_yet_valid")


def _media(typ: str) -> str:
    # RFC 7515 4.1.9: "application/" may be omitted and media types compare case-insensitively.
    return typ.lower().removeprefix("application/")


def _parse_header(raw: str) -> dict[str, Any]:
    parts = raw.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise UserContextInvalid("not a compact JWS (header.payload.signature)",
                                 reason="malformed")
    try:
        padded = parts[0] + "=" * (-len(parts[0]) % 4)
        header = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError):
        raise UserContextInvalid("JWS header is not base64url JSON", reason="malformed") from None
    if not isinstance(header, dict):
        raise UserContextInvalid("JWS header is not a JSON object", reason="malformed")
    return header


def context_from_proxy_authorization(value: str) -> Secret | None:
    """Extract the JWS from ``Proxy-Authorization: Bearer <jws>`` or ``Basic`` (JWS as the
    password, so ``HTTPS_PROXY=http://ctx:<jws>@host:port`` works)."""
    scheme, _, rest = value.strip().partition(" ")
    rest = rest.strip()
    if scheme.lower() == "bearer" and rest:
        return Secret(rest)
    if scheme.lower() == "basic" and rest:
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise UserContextInvalid("Proxy-Authorization Basic is not valid base64",
                                     reason="malformed") from None
        _, sep, password = decoded.partition(":")
        if sep and password:
            return Secret(password)
    raise UserContextInvalid("Proxy-Authorization must be Bearer <jws> or Basic with the JWS "
                             "as password", reason="malformed")


ContextCandidate = Secret | UserContextInvalid | None
"""A user context as sent, before verification: the token, why it cannot be one, or none."""


def connection_context(read: ReadHeaders) -> ContextCandidate:
    """The user context a ``Proxy-Authorization`` header carries (on a CONNECT it holds for
    the whole tunnel; on a request sent straight to the proxy, for that request). A lookalike
    spelling (``Proxy_Authorization``) or a second copy is refused: a later hop could read
    either as the credential."""
    looks = [n for n in read.lookalikes if field_key(n) == field_key(PROXY_AUTHORIZATION)]
    if looks:
        return UserContextInvalid(f"{PROXY_AUTHORIZATION} was also sent as {looks[0]}",
                                  reason="lookalike_header")
    if not read.proxy_authorization:
        return None
    if len(read.proxy_authorization) > 1:
        return UserContextInvalid(f"{PROXY_AUTHORIZATION} was sent more than once",
                                  reason="duplicate_header")
    try:
        return context_from_proxy_authorization(read.proxy_authorization[0])
    except UserContextInvalid as exc:
        return exc


def choose_context(read: ReadHeaders, header: str, tunnel: ContextCandidate) -> ContextCandidate:
    """The one user context a request carries, by these rules in order:

    1. a lookalike spelling of an identity header (``X_User_Context``,
       ``Proxy_Authorization``) is refused (``lookalike_header``), whatever else was sent: a
       WSGI next hop would read it as the header (the proxy strips it either way);
    2. the per-request header sent more than once is refused (``duplicate_header``);
    3. the per-request header beats any ``Proxy-Authorization``;
    4. a ``Proxy-Authorization`` on the request itself beats the tunnel's (``tunnel``: what
       the CONNECT carried, see :func:`connection_context`).

    A refusal is returned, not raised: it matters only for a routed request."""
    if read.lookalikes:
        name = header if field_key(read.lookalikes[0]) == field_key(header) else PROXY_AUTHORIZATION
        return UserContextInvalid(f"{name} was also sent as {read.lookalikes[0]}",
                                  reason="lookalike_header")
    if len(read.context) > 1:
        return UserContextInvalid(f"{header} was sent more than once",
                                  reason="duplicate_header")
    if read.context:
        return Secret(read.context[0])
    own = connection_context(read)
    return own if own is not None else tunnel
