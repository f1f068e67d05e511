"""Shared factories for the proxy unit tests: keys, hand-built user contexts, verifiers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import ECKey, Key, KeySet, OctKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

from proxy.identity import IdentityVerifier, KeySource
from proxy.live import LiveConfig
from proxy.secret import Secret
from proxy.settings import IdentitySettings, ProviderSettings, Settings

ISSUER = "https://platform.example.com"
AUDIENCE = "credproxy"
TYP = "user-context+jwt"
NOW = 1_800_000_000.0
HS_SECRET = "an-hmac-secret-of-at-least-32-bytes!!"

_DROP = object()


class Clock:
    """An injectable clock: ``clock()`` returns ``now``; ``advance`` moves it forward."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def b64url(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _json_part(value: Mapping[str, Any] | bytes | str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    # allow_nan: some rows deliberately put NaN in a claim.
    return json.dumps(value, separators=(",", ":")).encode()


def sign_compact(header: Mapping[str, Any] | bytes, payload: Mapping[str, Any] | bytes,
                 key: Key | bytes | None, alg: str | None = None) -> str:
    """A compact JWS built by hand, so malformed or hostile tokens can be made.

    ``key`` may be raw bytes (HMAC secret, e.g. a public key's PEM for algorithm confusion)
    or ``None`` (no signature).
    """
    if alg is None:
        alg = header["alg"] if isinstance(header, Mapping) else None
    signing_input = f"{b64url(_json_part(header))}.{b64url(_json_part(payload))}"
    if key is None:
        sig = b""
    elif isinstance(key, bytes):
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384,
                  "HS512": hashlib.sha512}[str(alg)]
        sig = hmac.new(key, signing_input.encode(), digest).digest()
    else:
        sig = JWSRegistry.algorithms[str(alg)].sign(signing_input.encode(), key)
    return f"{signing_input}.{b64url(sig)}"


@dataclass(frozen=True)
class Keys:
    """Signing keys (private) the tests sign with; the verifier gets the public halves."""

    ed: OKPKey  # kid ed-1, EdDSA
    es: ECKey  # kid es-1, ES256
    rsa: RSAKey  # kid rs-1, RS256
    ed_impostor: OKPKey  # another Ed25519 key that also says kid ed-1
    es384: ECKey  # kid es384-1, not in the verifier's set
    oct: OctKey  # HS_SECRET

    def for_alg(self, alg: str) -> Key:
        return {"EdDSA": self.ed, "Ed25519": self.ed, "ES256": self.es, "RS256": self.rsa,
                "PS256": self.rsa, "ES384": self.es384, "HS256": self.oct}[alg]

    def public_set(self) -> KeySet:
        return KeySet([OKPKey.import_key(self.ed.as_dict(private=False)),
                       ECKey.import_key(self.es.as_dict(private=False)),
                       RSAKey.import_key(self.rsa.as_dict(private=False))])


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(
        ed=OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"}),
        es=ECKey.generate_key("P-256", parameters={"kid": "es-1"}),
        rsa=RSAKey.generate_key(2048, parameters={"kid": "rs-1"}),
        ed_impostor=OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"}),
        es384=ECKey.generate_key("P-384", parameters={"kid": "es384-1"}),
        oct=OctKey.import_key(HS_SECRET.encode()),
    )


@pytest.fixture(scope="session")
def jwks_file(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("identity") / "jwks.json"
    path.write_text(json.dumps(keys.public_set().as_dict(private=False)))
    return path


def make_claims(now: float = NOW, **overrides: Any) -> dict[str, Any]:
    """Valid claims; an override of ``DROP`` removes the claim."""
    claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice@example.com",
                              "iat": int(now), "exp": int(now) + 300,
                              "ctx": {"kind": "chat", "id": "c-42"}}
    for name, value in overrides.items():
        if value is _DROP:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


DROP = _DROP

MakeContext = Callable[..., str]


@pytest.fixture(scope="session")
def make_context(keys: Keys) -> MakeContext:
    """``make_context(claims=..., header=..., key=..., alg=...)`` -> a compact JWS string.

    ``claims``/``header`` entries override the defaults (``DROP`` removes one); passing
    bytes instead uses them verbatim. ``key`` defaults to the test key for ``alg``.
    """

    def make(*, alg: str = "EdDSA", claims: Mapping[str, Any] | bytes | None = None,
             header: Mapping[str, Any] | bytes | None = None,
             key: Key | bytes | None | object = _DROP, now: float = NOW) -> str:
        signing_key = keys.for_alg(alg) if key is _DROP else key
        if isinstance(header, bytes):
            hdr: Mapping[str, Any] | bytes = header
        else:
            base: dict[str, Any] = {"alg": alg, "typ": TYP}
            kid = getattr(signing_key, "kid", None)
            if kid:
                base["kid"] = kid
            for name, value in (header or {}).items():
                if value is _DROP:
                    base.pop(name, None)
                else:
                    base[name] = value
            hdr = base
        payload = claims if isinstance(claims, bytes) else make_claims(now, **(claims or {}))
        return sign_compact(hdr, payload, signing_key, alg)  # type: ignore[arg-type]

    return make


def identity_settings(**overrides: Any) -> IdentitySettings:
    values: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE,
                              "jwks_file": "/nonexistent/jwks.json"}
    values.update(overrides)
    return IdentitySettings(**values)


MakeVerifier = Callable[..., IdentityVerifier]


@pytest.fixture(scope="session")
def make_verifier(keys: Keys) -> MakeVerifier:
    """``make_verifier(clock=..., keys=KeySet|None, **identity settings)``."""

    def make(*, clock: Callable[[], float] | None = None, key_set: KeySet | None = None,
             settings: IdentitySettings | None = None, **overrides: Any) -> IdentityVerifier:
        s = settings if settings is not None else identity_settings(**overrides)
        return IdentityVerifier(s, KeySource(key_set if key_set is not None
                                             else keys.public_set()),
                                clock=clock or Clock())

    return make


@pytest.fixture
def clock() -> Clock:
    return Clock()


def live_config(*providers: ProviderSettings, settings: Settings | None = None,
                verifier: IdentityVerifier | None = None,
                secrets: Mapping[str, Secret | None] | None = None, **top: Any) -> LiveConfig:
    """The running configuration of a unit test: ``settings``, or the test identity with
    ``providers`` and the top-level keys ``top`` (``public_url=...``, ``refresh=...``).
    ``verifier`` defaults to one that knows no key (for tests that verify no user
    context); ``secrets`` (client secrets by provider id) to None for every provider."""
    s = settings if settings is not None else Settings(
        identity=identity_settings(), providers=list(providers), **top)
    return LiveConfig.of(s, verifier or IdentityVerifier(s.identity, KeySource(KeySet([]))),
                         secrets=secrets if secrets is not None
                         else dict.fromkeys((p.id for p in s.providers), None))


class RecordingSink:
    """An audit sink that records its lines, or fails while ``broken`` (a full disk)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.broken = False

    def write(self, line: str) -> None:
        if self.broken:
            raise OSError("disk full")
        self.lines.append(line)

    def close(self) -> None:
        pass

    def events(self) -> list[str]:
        """The ``event`` of each record written, in order."""
        return [json.loads(line)["event"] for line in self.lines]
