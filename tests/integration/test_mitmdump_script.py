"""The addon also loads into plain `mitmdump -s addons/credproxy.py`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from devstack.procs import free_port, start_server, tcp_check
from devstack.stack import Stack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_mitmdump_loads_the_addon_and_injects(stack: Stack, user: str, marker: str) -> None:
    import yaml

    port, admin = free_port(), free_port()
    cfg = yaml.safe_load(stack.config_path.read_text())
    cfg["admin"] = f"127.0.0.1:{admin}"
    config = stack.workdir / "mitmdump.yaml"
    config.write_text(yaml.safe_dump(cfg))
    mitmdump = Path(sys.executable).parent / "mitmdump"
    proc = start_server(
        [str(mitmdump), "-q", "-s", str(ROOT / "addons" / "credproxy.py"),
         "--listen-host", "127.0.0.1", "--listen-port", str(port),
         "--set", f"confdir={stack.config['ca_dir']}",
         "--set", f"credproxy_config={config}",
         "--set", f"ssl_verify_upstream_trusted_ca={stack.ca.cert_path}",
         "--set", "connection_strategy=lazy", "--set", "stream_large_bodies=1m"],
        ready=tcp_check("127.0.0.1", port), env=stack.env, python=False, name="mitmdump",
        log_dir=stack.workdir / "logs", timeout=30,
    )
    try:
        import httpx2

        with httpx2.Client(proxy=f"http://127.0.0.1:{port}", verify=stack.mitm_tls(),
                           trust_env=False) as c:
            ok = c.get(f"{stack.docs_url}/echo/{marker}",
                       headers={"X-User-Context": stack.context(user)})
            refused = c.get(f"{stack.docs_url}/echo/{marker}-none")
            # Above stream_large_bodies: mitmproxy streams the body before the addon decides.
            streamed = c.post(f"{stack.docs_url}/echo/{marker}-big",
                              content=b"streamed-refused-body:" * (128 * 1024))
        headers = {k.lower(): v for k, v in ok.json()["headers"]}
        assert headers["authorization"] == (
            f"Bearer {stack.vault_get(user).tokens.access_token.reveal()}")
        assert "x-user-context" not in headers
        assert refused.status_code == 407
        assert streamed.status_code == 407
        assert streamed.headers["X-Credproxy-Error"] == "user-context-missing"
        assert not stack.docs_saw(f"{marker}-big")
        # The addon brings the admin server with it under plain mitmdump too.
        assert httpx2.get(f"http://127.0.0.1:{admin}/healthz").json() == {"status": "ok"}
    finally:
        proc.close()
    assert '"event":"credential.injected"' in proc.stdout_text()
    assert "streamed-refused-body" not in proc.logs() and "Traceback" not in proc.logs()


def test_mitmdump_without_a_config_fails_closed_at_startup(stack: Stack) -> None:
    """Without credproxy_config the addon logs one clear error, and mitmdump (which exits on
    an error logged during start-up) stops before it listens: nothing is ever forwarded."""
    import subprocess

    port = free_port()
    mitmdump = Path(sys.executable).parent / "mitmdump"
    proc = subprocess.run(
        [str(mitmdump), "-q", "-s", str(ROOT / "addons" / "credproxy.py"),
         "--listen-host", "127.0.0.1", "--listen-port", str(port),
         "--set", f"confdir={stack.config['ca_dir']}"],
        capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("credproxy_config is not set") == 1, out
    assert "Traceback" not in out


# A mitmproxy host without mitmdump's start-up error check (any embedder): the addon is
# loaded with no credproxy_config and keeps serving.
_UNCONFIGURED_PROXY = """
import asyncio, logging, sys
from mitmproxy import master, options
from mitmproxy.addons import core, next_layer, proxyserver, tlsconfig
from addons.credproxy import CredentialInjector

async def main():
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    port, confdir, upstream_ca = sys.argv[1:4]
    opts = options.Options(listen_host="127.0.0.1", listen_port=int(port), confdir=confdir)
    m = master.Master(opts, with_termlog=False)
    m.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(),
                 tlsconfig.TlsConfig(), CredentialInjector())
    opts.update(connection_strategy="lazy", stream_large_bodies="1m",
                ssl_verify_upstream_trusted_ca=upstream_ca)
    await m.run()

asyncio.run(main())
"""


def test_unconfigured_addon_refuses_every_request(stack: Stack, user: str, marker: str) -> None:
    import httpx2

    port = free_port()
    proc = start_server(
        ["-c", _UNCONFIGURED_PROXY, str(port), stack.config["ca_dir"], str(stack.ca.cert_path)],
        ready=tcp_check("127.0.0.1", port), name="unconfigured", log_dir=stack.workdir / "logs",
        timeout=30)
    echo = stack.echo_server(tls=False)
    token = stack.context(user)
    try:
        with httpx2.Client(proxy=f"http://127.0.0.1:{port}", verify=stack.mitm_tls(),
                           trust_env=False, timeout=30) as c:
            answers = [
                c.get(f"{stack.docs_url}/echo/{marker}", headers={"X-User-Context": token}),
                c.get(f"{echo.url}/echo/{marker}", headers={"X-User-Context": token}),
                c.post(f"{stack.docs_url}/echo/{marker}", content=b"x" * (2 << 20)),
            ]
    finally:
        proc.close()
    for r in answers:
        assert r.status_code == 500, r.text
        assert r.headers["X-Credproxy-Error"] == "internal-error"
        assert r.json()["reason"] == "unconfigured"
    assert not stack.docs_saw(marker) and marker not in echo.stderr_text()
    logs = proc.logs()
    assert logs.count("credproxy_config is not set") == 1, logs
    assert "Traceback" not in logs and token not in logs


def test_flow_saving_addons_work_beside_credproxy(stack: Stack, user: str, marker: str,
                                                 tmp_path: Path) -> None:
    """mitmdump's own flow writer (``-w``) snapshots every flow with ``flow.get_state()``;
    credproxy keeps its per-flow state (which holds the credential) out of
    ``flow.metadata``, so saving neither breaks nor captures credproxy's state. (The saved
    request headers are what went upstream: ``-w`` is a debugging tool, never for
    production.)"""
    import httpx2
    import yaml
    from mitmproxy.io import FlowReader

    port, admin = free_port(), free_port()
    cfg = yaml.safe_load(stack.config_path.read_text())
    cfg["admin"] = f"127.0.0.1:{admin}"
    config = tmp_path / "mitmdump.yaml"
    config.write_text(yaml.safe_dump(cfg))
    saved = tmp_path / "flows.mitm"
    proc = start_server(
        [str(Path(sys.executable).parent / "mitmdump"), "-q",
         "-s", str(ROOT / "addons" / "credproxy.py"), "-w", str(saved),
         "--listen-host", "127.0.0.1", "--listen-port", str(port),
         "--set", f"confdir={stack.config['ca_dir']}",
         "--set", f"credproxy_config={config}",
         "--set", f"ssl_verify_upstream_trusted_ca={stack.ca.cert_path}",
         "--set", "connection_strategy=lazy"],
        ready=tcp_check("127.0.0.1", port), env=stack.env, python=False,
        name="mitmdump-save", log_dir=tmp_path / "logs", timeout=30)
    try:
        with httpx2.Client(proxy=f"http://127.0.0.1:{port}", verify=stack.mitm_tls(),
                           trust_env=False, timeout=30) as c:
            ok = c.get(f"{stack.docs_url}/echo/{marker}",
                       headers={"X-User-Context": stack.context(user)})
            refused = c.get(f"{stack.docs_url}/echo/{marker}-none")
    finally:
        proc.close()
    assert ok.status_code == 200 and refused.status_code == 407
    with saved.open("rb") as fh:
        flows = list(FlowReader(fh).stream())
    assert len(flows) >= 2
    for f in flows:
        assert "credproxy" not in f.metadata
        assert "x-user-context" not in {k.lower() for k in f.request.headers}
    assert "Traceback" not in proc.logs() and "TypeError" not in proc.logs()
