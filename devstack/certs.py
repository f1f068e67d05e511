"""Throw-away test PKI for the development stack.

Python 3.13 turns on ``VERIFY_X509_STRICT`` in ``ssl.create_default_context()``, which rejects
certificates that many quick "self-signed" recipes produce (no authorityKeyIdentifier, a CA
without keyUsage, a leaf without SAN, ...). The certificates made here carry every extension
that strict verification (and RFC 5280) asks for, so the servers of the stack can be verified
by an ordinary default context that trusts only the test CA, exactly like a real upstream.

Keys are EC P-256 by default: generation is instantaneous, which keeps test start-up fast.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# Back-date certificates a little so that small clock differences between processes (or a
# container whose clock lags) never make a freshly minted certificate "not yet valid".
_BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class CA:
    """A test certificate authority: its files and the loaded objects needed to sign leaves."""

    cert_path: Path
    key_path: Path
    cert: x509.Certificate
    key: PrivateKey


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only (also for certificates: these are
    throw-away test files and nobody else on the machine has a reason to read them)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    # os.open's mode is only applied on creation; tighten a pre-existing file as well.
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(
    directory: str | os.PathLike[str],
    *,
    common_name: str | None = None,
    days: int = 365,
    key_type: KeyType = "ec",
) -> CA:
    """Create a CA in ``directory`` as ``ca.pem`` and ``ca.key`` (both mode 0600).

    The common name gets a random suffix by default so that two test runs never produce two
    different CAs with the same subject (which confuses path building if both end up trusted).
    """
    directory = Path(directory)
    key = _new_key(key_type)
    cn = common_name or f"credproxy devstack test CA {secrets.token_hex(4)}"
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "credproxy devstack"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        # Self-signed, so the AKI names our own key; harmless and some validators like it.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "ca.pem"
    key_path = directory / "ca.key"
    _write_private(key_path, _key_pem(key))
    _write_private(cert_path, _cert_pem(cert))
    return CA(cert_path=cert_path, key_path=key_path, cert=cert, key=key)


def load_ca(cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> CA:
    """Load a CA previously written by :func:`make_ca` (e.g. to reuse it across demo runs)."""
    cert_path, key_path = Path(cert_path), Path(key_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"unsupported CA key type: {type(key).__name__}")
    return CA(cert_path=cert_path, key_path=key_path, cert=cert, key=key)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_leaf(
    ca: CA,
    names: Sequence[str],
    directory: str | os.PathLike[str],
    stem: str = "server",
    *,
    days: int = 30,
    key_type: KeyType = "ec",
    client_auth: bool = False,
) -> tuple[Path, Path]:
    """Issue a TLS server certificate for ``names`` (DNS names and/or IP literals).

    Writes ``<stem>.pem`` and ``<stem>.key`` (mode 0600) to ``directory`` and returns their
    paths. The first name becomes the subject CN; verification only ever looks at the SAN.
    ``client_auth`` adds the clientAuth usage, for a server that also connects to its peers
    with the same certificate (a Redis Cluster's TLS bus demands a client certificate).
    """
    if not names:
        raise ValueError("a leaf certificate needs at least one name")
    directory = Path(directory)
    key = _new_key(key_type)
    now = datetime.datetime.now(datetime.UTC)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                # keyEncipherment only makes sense for RSA key transport; an EC key never
                # encrypts a premaster secret, so claiming it would be wrong.
                key_encipherment=key_type == "rsa",
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]
                                  + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}.key"
    _write_private(key_path, _key_pem(key))
    _write_private(cert_path, _cert_pem(cert))
    return cert_path, key_path


def write_bundle(paths: Iterable[str | os.PathLike[str]], out: str | os.PathLike[str]) -> Path:
    """Concatenate PEM files (e.g. the test CA plus a system bundle) into ``out`` (mode 0600)."""
    parts: list[bytes] = []
    for p in paths:
        data = Path(p).read_bytes()
        parts.append(data if data.endswith(b"\n") else data + b"\n")
    out = Path(out)
    _write_private(out, b"".join(parts))
    return out
