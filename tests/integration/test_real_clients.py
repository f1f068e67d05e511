"""Unchanged clients through the proxy with only environment variables set, as in the
Kubernetes sidecar: HTTPS_PROXY carries the user context as the proxy password
(`http://ctx:<jws>@127.0.0.1:<port>`), and the trust variables point at a bundle of the
system roots plus the proxy CA. Each client must arrive with the user's own token.

Node.js: HTTPS_PROXY is honoured only from Node 22.21 / 24.5 with NODE_USE_ENV_PROXY=1.
Older Node (this machine has 20) needs a proxy agent loaded without code changes:
`NODE_OPTIONS=--require global-agent/bootstrap` with GLOBAL_AGENT_HTTP_PROXY set; the test
does exactly that (docs/kubernetes.md says the same)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import certifi
import pytest

from devstack.stack import Stack

pytestmark = pytest.mark.integration

SCRIPT_PY = "import {lib}, sys; print({lib}.get(sys.argv[1], timeout=30).text)"
SCRIPT_NODE = """
const https = require('https');
https.get(process.argv[1], (res) => {
  let body = ''; res.on('data', (c) => body += c); res.on('end', () => console.log(body));
}).on('error', (e) => { console.error(e.message); process.exit(1); });
"""


@pytest.fixture(scope="module")
def client_env(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    user = "unchanged-client"
    stack.vault_put(user, stack.grant(user))
    bundle = tmp_path_factory.mktemp("trust") / "bundle.pem"
    bundle.write_text(Path(certifi.where()).read_text() + "\n" + stack.mitm_ca.read_text())
    proxy = stack.proxy_url.replace("http://", f"http://ctx:{stack.context(user)}@")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update({
        "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "NO_PROXY": "",
        "SSL_CERT_FILE": str(bundle), "REQUESTS_CA_BUNDLE": str(bundle),
        "CURL_CA_BUNDLE": str(bundle), "NODE_EXTRA_CA_CERTS": str(stack.mitm_ca),
    })
    return env


def _check(stack: Stack, out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    headers = {k.lower(): v for k, v in seen["headers"]}
    token = stack.vault_get("unchanged-client").tokens.access_token.reveal()
    assert headers["authorization"] == f"Bearer {token}"
    assert "proxy-authorization" not in headers and "x-user-context" not in headers


def test_curl(stack: Stack, client_env: dict[str, str]) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is required"
    out = subprocess.run([curl, "-sS", "--fail", f"{stack.docs_url}/echo"], env=client_env,
                         capture_output=True, text=True, timeout=60)
    _check(stack, out)


@pytest.mark.parametrize("lib", ["requests", "httpx"])
def test_python_clients(stack: Stack, client_env: dict[str, str], lib: str) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT_PY.format(lib=lib),
                          f"{stack.docs_url}/echo"], env=client_env, capture_output=True,
                         text=True, timeout=60)
    _check(stack, out)


def test_node(stack: Stack, client_env: dict[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> None:
    node = shutil.which("node")
    assert node, "node is required"
    version = tuple(int(x) for x in subprocess.run(
        [node, "-p", "process.versions.node"], capture_output=True, text=True
    ).stdout.strip().split("."))
    env = dict(client_env)
    if version >= (24, 5) or (22, 21) <= version < (23,):
        env["NODE_USE_ENV_PROXY"] = "1"
    else:
        npm = shutil.which("npm")
        assert npm, "npm is required for Node older than 22.21"
        where = tmp_path_factory.mktemp("node")
        subprocess.run([npm, "install", "--silent", "--no-audit", "--no-fund",
                        "global-agent@3.0.0"], cwd=where, check=True, timeout=180,
                       capture_output=True)
        env["NODE_OPTIONS"] = f"--require {where}/node_modules/global-agent/bootstrap"
        env["GLOBAL_AGENT_HTTP_PROXY"] = client_env["HTTPS_PROXY"]
    out = subprocess.run([node, "-e", SCRIPT_NODE, f"{stack.docs_url}/echo"], env=env,
                         capture_output=True, text=True, timeout=60)
    _check(stack, out)
