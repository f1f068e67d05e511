"""Development signing keys and user-context minting (``credproxy context``).

Production user contexts are minted by the agent platform; this exists for demos and tests.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

from joserfc import jwt
from joserfc.jwk import ECKey, Key, KeySet, OctKey, OKPKey, RSAKey, import_key

import proxy.identity  # noqa: F401  (registers the EdDSA warning filter)
from proxy.errors import ConfigError
from proxy.secret import Secret


def write_dev_keys(out_dir: Path, *, alg: str = "EdDSA", kid: str = "dev-1") -> tuple[Path, Path]:
    """Write ``context-key.jwk`` (private, 0600) and ``context-jwks.json`` (public)."""
    key: Key
    if alg == "EdDSA":
        key = OKPKey.generate_key("Ed25519", parameters={"kid": kid, "alg": alg})
    elif alg == "ES256":
        key = ECKey.generate_key("P-256", parameters={"kid": kid, "alg": alg})
    else:
        key = RSAKey.generate_key(2048, parameters={"kid": kid, "alg": alg})
    out_dir.mkdir(parents=True, exist_ok=True)
    priv, pub = out_dir / "context-key.jwk", out_dir / "context-jwks.json"
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(key.as_dict(private=True), f)
    pub.write_text(json.dumps(KeySet([key]).as_dict(private=False)))
    return priv, pub


def load_signing_key(path: str) -> Key:
    """The private key in ``path`` (a JWK or PEM). Raises :class:`ConfigError` naming the
    file when it cannot be read or holds no usable key."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read signing key file {path}: {exc.strerror} (make one "
                          "with `credproxy context keygen --out-dir DIR`)") from None
    try:
        if data.lstrip().startswith(b"{"):
            return import_key(json.loads(data))
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        private = load_pem_private_key(data, password=None)
        kinds: list[tuple[type, type[Key]]] = [(rsa.RSAPrivateKey, RSAKey),
                                              (ec.EllipticCurvePrivateKey, ECKey),
                                              (ed25519.Ed25519PrivateKey, OKPKey)]
        for kind, cls in kinds:
            if isinstance(private, kind):
                return cls.import_key(data)
        raise ValueError("unsupported key type")
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load signing key {path}: {exc}") from exc


def mint(*, sub: str, issuer: str, audience: str, ttl: int = 300,
         key_file: str | None = None, hs256_secret_env: str | None = None,
         typ: str = "user-context+jwt", ctx_kind: str | None = "chat",
         ctx_id: str | None = "dev", providers: list[str] | None = None,
         jti: bool = False, now: float | None = None) -> Secret:
    key: Key
    if key_file:
        key = load_signing_key(key_file)
        alg = key.alg or {"OKP": "EdDSA", "EC": "ES256", "RSA": "RS256"}[key.key_type]
    elif hs256_secret_env:
        value = os.environ.get(hs256_secret_env)
        if not value:
            raise ConfigError(f"environment variable {hs256_secret_env} is not set")
        key, alg = OctKey.import_key(value.encode()), "HS256"
    else:
        raise ConfigError("give a signing key file or an HS256 secret env var")
    issued = int(now if now is not None else time.time())
    claims: dict[str, object] = {"iss": issuer, "aud": audience, "sub": sub, "iat": issued,
                                 "exp": issued + ttl}
    if ctx_kind or ctx_id:
        claims["ctx"] = {"kind": ctx_kind, "id": ctx_id}
    if providers is not None:
        claims["providers"] = providers
    if jti:
        claims["jti"] = secrets.token_urlsafe(16)
    header = {"alg": alg, "typ": typ}
    if key.kid:
        header["kid"] = key.kid
    # EdDSA is "not recommended" by joserfc (RFC 9864 prefers Ed25519) but is what most
    # issuers still send; naming it explicitly allows it.
    return Secret(jwt.encode(header, claims, key, algorithms=[alg]))
