"""The interception CA in mitmproxy's on-disk format, created when absent.

mitmproxy reads ``<confdir>/mitmproxy-ca.pem`` (private key + certificate in one PEM);
``mitmproxy-ca-cert.pem`` is the certificate alone, the file agents add to their trust store.
Creating it here (rather than letting mitmproxy do it on first start) lets ``credproxy ca``
print the certificate before the proxy ever ran.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_FILE = "mitmproxy-ca.pem"
CERT_FILE = "mitmproxy-ca-cert.pem"


def ensure_ca(ca_dir: str | os.PathLike[str], *, common_name: str = "credproxy CA") -> Path:
    """Create the CA in ``ca_dir`` unless one is there; return the certificate path."""
    d = Path(ca_dir).expanduser()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path = d / CERT_FILE
    if (d / CA_FILE).exists():
        if not cert_path.exists():
            pem = (d / CA_FILE).read_bytes()
            cert = x509.load_pem_x509_certificate(pem[pem.index(b"-----BEGIN CERTIFICATE"):])
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "credproxy")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    fd = os.open(d / CA_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem + cert_pem)
    cert_path.write_bytes(cert_pem)
    return cert_path
