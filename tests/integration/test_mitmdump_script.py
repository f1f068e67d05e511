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
        headers = {k.lower(): v for k, v in ok.json()["headers"]}
        assert headers["authorization"] == (
            f"Bearer {stack.vault_get(user).tokens.access_token.reveal()}")
        assert "x-user-context" not in headers
        assert refused.status_code == 407
        # The addon brings the admin server with it under plain mitmdump too.
        assert httpx2.get(f"http://127.0.0.1:{admin}/healthz").json() == {"status": "ok"}
    finally:
        proc.close()
    assert '"event":"credential.injected"' in proc.stdout_text()
