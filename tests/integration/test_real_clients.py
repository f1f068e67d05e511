"""Unchanged clients through the proxy with the agent environment of the Kubernetes
manifests (deploy/k8s/base/deployment.yaml, read here): HTTPS_PROXY/HTTP_PROXY and their
lower-case spellings, NO_PROXY/no_proxy, the trust variables pointing at a bundle of the
public roots plus the proxy CA, NODE_USE_ENV_PROXY. Only what must differ on a test machine
changes: the proxy port, the trust file paths, and the NO_PROXY entries that name the test
upstream itself (localhost, 127.0.0.1: in a pod the providers are remote hosts). The user
context is the per-request `X-User-Context` header the manifests document (deploy/k8s,
overlays/dev), and also the proxy-URL form (`http://ctx:<jws>@...`) for clients that cannot
add headers. Each client must arrive with the user's own token.

Node.js reads the proxy variables natively only from 22.21 / 24.5 with NODE_USE_ENV_PROXY=1
(the manifests set it). This machine has Node 20: there the test loads global-agent without
code changes (`NODE_OPTIONS=--require global-agent/bootstrap`) and sets
GLOBAL_AGENT_ENVIRONMENT_VARIABLE_NAMESPACE="" so global-agent reads the same HTTPS_PROXY /
NO_PROXY (by default it reads only GLOBAL_AGENT_HTTP_PROXY); docs/kubernetes.md says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import certifi
import pytest
import yaml

from devstack.stack import Stack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
USER = "unchanged-client"
HEADER = "X-User-Context"
# NO_PROXY entries of the manifests that would send the test upstream (localhost:<port>)
# around the proxy; everything else is kept as the manifests have it.
UPSTREAM_NAMES = {"localhost", "127.0.0.1"}

SCRIPT_PY = """
import json, os, sys, {lib}
ctx = os.environ.get("TEST_USER_CONTEXT")
print({lib}.get(sys.argv[1], timeout=30, headers={{"{header}": ctx}} if ctx else {{}}).text)
"""
SCRIPT_NODE = """
const https = require('https');
const ctx = process.env.TEST_USER_CONTEXT;
https.get(process.argv[1], {headers: ctx ? {'HEADER': ctx} : {}}, (res) => {
  let body = ''; res.on('data', (c) => body += c); res.on('end', () => console.log(body));
}).on('error', (e) => { console.error(e.message); process.exit(1); });
""".replace("HEADER", HEADER)


def manifest_agent_env() -> dict[str, str]:
    docs = yaml.safe_load_all((ROOT / "deploy/k8s/base/deployment.yaml").read_text())
    dep: dict[str, Any] = next(d for d in docs if d and d["kind"] == "Deployment")
    (agent,) = [c for c in dep["spec"]["template"]["spec"]["containers"]
                if c["name"] == "agent"]
    return {e["name"]: e["value"] for e in agent["env"] if "value" in e}


@pytest.fixture(scope="module")
def client_env(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    stack.vault_put(USER, stack.grant(USER))
    trust = tmp_path_factory.mktemp("trust")
    (trust / "ca-bundle.pem").write_text(
        Path(certifi.where()).read_text() + "\n" + stack.mitm_ca.read_text())
    (trust / "credproxy-ca.pem").write_text(stack.mitm_ca.read_text())
    manifest = manifest_agent_env()
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    for name, value in manifest.items():
        if value == "http://127.0.0.1:8080":
            value = stack.proxy_url
        elif value.startswith("/etc/credproxy/trust/"):
            value = str(trust / Path(value).name)
        elif name.lower() == "no_proxy":
            value = ",".join(e for e in value.split(",") if e not in UPSTREAM_NAMES)
        env[name] = value
    # The shape is the manifests': every proxy variable in both spellings, the same NO_PROXY.
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        assert env[name] == stack.proxy_url, name
    assert env["NO_PROXY"] == env["no_proxy"] and ".svc" in env["NO_PROXY"].split(",")
    assert env["NODE_USE_ENV_PROXY"] == "1"
    return env


def with_context(env: dict[str, str], stack: Stack, form: str) -> dict[str, str]:
    out = dict(env)
    if form == "header":
        out["TEST_USER_CONTEXT"] = stack.context(USER)
    else:
        proxy = stack.proxy_url.replace("http://", f"http://ctx:{stack.context(USER)}@")
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
            out[name] = proxy
    return out


def _check(stack: Stack, out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    headers = {k.lower(): v for k, v in seen["headers"]}
    token = stack.vault_get(USER).tokens.access_token.reveal()
    assert headers["authorization"] == f"Bearer {token}"
    assert "proxy-authorization" not in headers and "x-user-context" not in headers


@pytest.mark.parametrize("form", ["header", "proxy-url"])
def test_curl(stack: Stack, client_env: dict[str, str], form: str) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is required"
    env = with_context(client_env, stack, form)
    extra = ["-H", f"{HEADER}: {env['TEST_USER_CONTEXT']}"] if form == "header" else []
    out = subprocess.run([curl, "-sS", "--fail", *extra, f"{stack.docs_url}/echo"], env=env,
                         capture_output=True, text=True, timeout=60)
    _check(stack, out)


@pytest.mark.parametrize("form", ["header", "proxy-url"])
@pytest.mark.parametrize("lib", ["requests", "httpx"])
def test_python_clients(stack: Stack, client_env: dict[str, str], lib: str,
                        form: str) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT_PY.format(lib=lib, header=HEADER),
                          f"{stack.docs_url}/echo"], env=with_context(client_env, stack, form),
                         capture_output=True, text=True, timeout=60)
    _check(stack, out)


@pytest.mark.parametrize("form", ["header", "proxy-url"])
def test_node(stack: Stack, client_env: dict[str, str], form: str,
              tmp_path_factory: pytest.TempPathFactory) -> None:
    node = shutil.which("node")
    assert node, "node is required"
    version = tuple(int(x) for x in subprocess.run(
        [node, "-p", "process.versions.node"], capture_output=True, text=True
    ).stdout.strip().split("."))
    env = with_context(client_env, stack, form)
    if not (version >= (24, 5) or (22, 21) <= version < (23,)):
        # NODE_USE_ENV_PROXY (from the manifests) is ignored here: load global-agent and
        # have it read the very same variables.
        npm = shutil.which("npm")
        assert npm, "npm is required for Node older than 22.21"
        where = tmp_path_factory.mktemp("node")
        subprocess.run([npm, "install", "--silent", "--no-audit", "--no-fund",
                        "global-agent@3.0.0"], cwd=where, check=True, timeout=180,
                       capture_output=True)
        env["NODE_OPTIONS"] = f"--require {where}/node_modules/global-agent/bootstrap"
        env["GLOBAL_AGENT_ENVIRONMENT_VARIABLE_NAMESPACE"] = ""
    out = subprocess.run([node, "-e", SCRIPT_NODE, f"{stack.docs_url}/echo"], env=env,
                         capture_output=True, text=True, timeout=60)
    _check(stack, out)
