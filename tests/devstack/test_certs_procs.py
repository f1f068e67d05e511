"""Test PKI and subprocess helpers, without the full stack."""

from __future__ import annotations

import json
import socket
import ssl
import stat
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from devstack.certs import load_ca, make_ca, make_leaf, write_bundle
from devstack.procs import ServerStartError, free_port, start_server, tcp_check


def _handshake(ca_file: Path, cert: Path, key: Path, server_hostname: str) -> None:
    """A real TLS handshake against ssl.create_default_context() (VERIFY_X509_STRICT on 3.13)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    assert client_ctx.verify_flags & ssl.VERIFY_X509_STRICT
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        errors: list[BaseException] = []

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as s:
                    s.recv(1)
            except (OSError, ssl.SSLError) as e:
                errors.append(e)

        t = threading.Thread(target=serve)
        t.start()
        try:
            with socket.create_connection(listener.getsockname()) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                    tls.sendall(b"x")
        finally:
            t.join(5)


def test_certs_pass_strict_verification(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    cert, key = make_leaf(ca, ["localhost", "127.0.0.1", "::1"], tmp_path, "srv")
    for name in ("localhost", "127.0.0.1"):
        _handshake(ca.cert_path, cert, key, name)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ca.cert_path, cert, key, "other.example")

    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    for p in (ca.cert_path, ca.key_path, cert, key):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600

    # A reloaded CA signs leaves that chain to it; a bundle trusts both CAs.
    other = make_ca(tmp_path / "other")
    cert2, key2 = make_leaf(load_ca(other.cert_path, other.key_path), ["localhost"], tmp_path,
                            "srv2")
    bundle = write_bundle([ca.cert_path, other.cert_path], tmp_path / "bundle.pem")
    _handshake(bundle, cert, key, "localhost")
    _handshake(bundle, cert2, key2, "localhost")


def test_rsa_leaf(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, key_type="rsa")
    cert, key = make_leaf(ca, ["localhost"], tmp_path, key_type="rsa")
    _handshake(ca.cert_path, cert, key, "localhost")


def test_start_server_reports_early_exit(tmp_path: Path) -> None:
    with pytest.raises(ServerStartError, match="No such file"):
        start_server(
            ["-m", "devstack.authserver", "--clients", str(tmp_path / "missing.json"),
             "--ready-file", str(tmp_path / "r.json")],
            tmp_path / "r.json",
            log_dir=tmp_path,
        )


def test_start_server_timeout_kills(tmp_path: Path) -> None:
    with pytest.raises(ServerStartError, match="not ready"):
        start_server(["-c", "import time; time.sleep(30)"], tmp_path / "never.json",
                     timeout=0.5, log_dir=tmp_path)


def test_start_server_tcp_readiness(tmp_path: Path) -> None:
    port = free_port()
    code = (
        "import socket, time\n"
        f"s = socket.create_server(('127.0.0.1', {port}))\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    with start_server([sys.executable, "-c", code], ready=tcp_check("127.0.0.1", port),
                      python=False, log_dir=tmp_path, name="tcp") as proc:
        assert proc.url == f"http://127.0.0.1:{port}"
        assert proc.alive()
    assert not proc.alive()
    assert "up" in proc.stdout_text()


def test_ready_file_contents(tmp_path: Path) -> None:
    clients = tmp_path / "clients.json"
    clients.write_text("[]")
    rf = tmp_path / "ready.json"
    with start_server(["-m", "devstack.authserver", "--clients", str(clients),
                       "--ready-file", str(rf)], rf, log_dir=tmp_path) as proc:
        info = json.loads(rf.read_text())
        assert info["url"] == proc.url
        assert proc.url.startswith("http://127.0.0.1:")
        assert info["pid"] == proc.pid
    assert "listening on" in proc.stdout_text()
