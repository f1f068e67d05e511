"""A complete local credproxy deployment in one directory: the demo and the integration
tests both run on it.

Real processes talking HTTP(S): an OAuth authorization server (authlib), a TLS document API
that introspects tokens, and the credproxy sidecar started with ``credproxy run``.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import yaml

from devstack.certs import CA, make_ca, make_leaf
from devstack.procs import Running, free_port, start_server, tcp_check
from proxy.devkeys import mint, write_dev_keys
from proxy.secret import Secret
from proxy.vault.keys import generate_key

PROVIDER = "docs"
# Two more providers on the same authorization server: ``keyed`` injects X-Api-Key into
# Stack.keyed_upstream(); ``wild`` owns *.wild.test (names that resolve nowhere: routing
# tests see its decisions in the audit log).
KEYED_PROVIDER = "keyed"
WILD_PROVIDER = "wild"
CLIENT_ID = "credproxy-docs"
RESOURCE_ID = "docapi"

DOCUMENTS = {
    "documents": [
        {"id": "doc-1", "title": "Acme v. Globex: settlement draft", "matter": "acme-litigation"},
        {"id": "doc-2", "title": "Acme board minutes", "matter": "acme-litigation"},
        {"id": "doc-3", "title": "Globex merger term sheet", "matter": "globex-merger"},
        {"id": "doc-4", "title": "Firm holiday schedule", "matter": "firm-wide"},
    ],
    # An ethical wall: alice works for Acme, bob for Globex; neither may see the other side.
    "users": {
        "alice": ["acme-litigation", "firm-wide"],
        "bob": ["globex-merger", "firm-wide"],
        "carol": ["firm-wide"],
    },
}


@dataclass
class Stack:
    workdir: Path
    ca: CA
    auth: Running
    docs: Running
    env: dict[str, str]
    context_key: Path
    config_path: Path
    config: dict[str, Any]
    proxy: Running | None = None
    extra: list[Running] = field(default_factory=list)

    # -- addresses ---------------------------------------------------------------------
    @property
    def docs_url(self) -> str:
        return self.docs.url.replace("127.0.0.1", "localhost")

    @property
    def proxy_url(self) -> str:
        return f"http://{self.config['listen']}"

    def admin_tls(self) -> ssl.SSLContext:
        """Trusts the test CA (the authorization server's certificate)."""
        return ssl.create_default_context(cafile=str(self.ca.cert_path))

    def mitm_tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.mitm_ca))

    @property
    def mitm_ca(self) -> Path:
        return Path(self.config["ca_dir"]) / "mitmproxy-ca-cert.pem"

    # -- processes ---------------------------------------------------------------------
    def start_proxy(self, *, name: str = "credproxy", timeout: float = 30.0) -> Running:
        host, _, port = self.config["listen"].rpartition(":")
        self.proxy = start_server(
            ["-m", "proxy.cli", "run", "--config", str(self.config_path)],
            ready=tcp_check(host, int(port)), env=self.env, name=name,
            log_dir=self.workdir / "logs", timeout=timeout,
        )
        return self.proxy

    def start_replicas(self, n: int, *, timeout: float = 30.0, name: str = "replica",
                       overrides: Mapping[str, Any] | None = None) -> list[Running]:
        """``n`` more credproxy processes on the same config (vault, Redis), each on its
        own port, started side by side; they are closed with the stack. Each is named
        ``<name>-<i>`` (its config file, its logs); ``overrides`` replaces top-level config
        keys for these processes only (e.g. another ``coordination``)."""
        from concurrent.futures import ThreadPoolExecutor

        def start(i: int) -> Running:
            port = free_port()
            cfg = {**self.config, **(overrides or {}), "listen": f"127.0.0.1:{port}",
                   "admin": f"127.0.0.1:{free_port()}"}
            path = self.workdir / f"{name}-{i}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            r = start_server(["-m", "proxy.cli", "run", "--config", str(path)],
                             ready=tcp_check("127.0.0.1", port), env=self.env,
                             name=f"{name}-{i}", log_dir=self.workdir / "logs",
                             timeout=timeout)
            r.info["proxy_url"] = f"http://127.0.0.1:{port}"
            r.info["admin_url"] = f"http://{cfg['admin']}"
            return r

        replicas = []
        failure: BaseException | None = None
        first = 0
        if n and not self.mitm_ca.exists():
            # The first process creates the shared CA in ca_dir: alone, or they race.
            replicas.append(start(0))
            first = 1
        with ThreadPoolExecutor(max_workers=max(1, n)) as pool:
            futures = [pool.submit(start, i) for i in range(first, n)]
        for f in futures:
            try:
                replicas.append(f.result())
            except BaseException as exc:  # noqa: BLE001 (the first is raised below)
                failure = failure or exc
        if failure is not None:
            for r in replicas:
                r.close()
            raise failure
        self.extra.extend(replicas)
        return replicas

    def client_via(self, proxy_url: str, *, context: str | None = None) -> httpx2.Client:
        headers = {"X-User-Context": context} if context else {}
        return httpx2.Client(proxy=proxy_url, verify=self.mitm_tls(), headers=headers,
                             timeout=30, trust_env=False)

    def fake_dns(self, rules: str) -> None:
        """Resolve the host names in ``rules`` (the ``DEVSTACK_FAKE_DNS`` format of
        :mod:`devstack.fakedns.sitecustomize`) to their fake server, port 443 included, in
        every process started with :attr:`env` from now on: the proxy, replicas, CLI runs.
        Raises ValueError for malformed rules."""
        from devstack import fakedns

        self.env.update(fakedns.environ(rules))

    def write_config(self, **overrides: Any) -> None:
        """Rewrite the config with top-level ``overrides`` (restart the proxy to apply)."""
        self.config.update(overrides)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def echo_server(self, *, tls: bool, name: str | None = None, port: int = 0,
                    required_scope: str | None = None, resource: str | None = None
                    ) -> Running:
        """An extra document API that reports what arrived (started on first use): by
        default on a free port no provider lists, an *unrouted* upstream.
        ``required_scope``: its /documents insists on that scope (403 insufficient_scope,
        RFC 6750 section 3.1), introspecting tokens at the stack's authorization server."""
        name = name or f"echo-{'https' if tls else 'http'}"
        for r in self.extra:
            if r.name == name:
                return r
        args = ["-m", "devstack.docapi", "--introspect-url", f"{self.auth.url}/introspect",
                "--client-id", RESOURCE_ID, "--client-secret-env", "DOCAPI_SECRET",
                "--permissions", str(self.workdir / "permissions.json"),
                "--ready-file", str(self.workdir / f"{name}.ready"), "--port", str(port)]
        if tls:
            args += ["--cert", str(self.workdir / "pki" / "server.pem"),
                     "--key", str(self.workdir / "pki" / "server.key")]
        if required_scope:
            args += ["--required-scope", required_scope]
        if required_scope or resource:
            args += ["--ca-file", str(self.ca.cert_path)]
        if resource:
            # An OAuth protected resource (RFC 9728 metadata naming the stack's
            # authorization server; tokens must have aud == resource): an MCP server's.
            args += ["--resource", resource, "--authorization-server", self.auth.url]
        r = start_server(args, self.workdir / f"{name}.ready",
                         env={"DOCAPI_SECRET": self.env["DOCAPI_SECRET"]},
                         log_dir=self.workdir / "logs", name=name)
        self.extra.append(r)
        return r

    def ingress(self) -> Running:
        """A TLS-terminating reverse proxy in front of the admin server (started on first
        use; devstack.ingress): set ``public_url`` to its URL before starting the proxy."""
        for r in self.extra:
            if r.name == "ingress":
                return r
        r = start_server(
            ["-m", "devstack.ingress", "--backend", f"http://{self.config['admin']}",
             "--cert", str(self.workdir / "pki" / "server.pem"),
             "--key", str(self.workdir / "pki" / "server.key"),
             "--ready-file", str(self.workdir / "ingress.ready")],
            self.workdir / "ingress.ready", log_dir=self.workdir / "logs", name="ingress")
        self.extra.append(r)
        return r

    def keyed_upstream(self) -> Running:
        """The upstream of the ``keyed`` provider (its credential goes in ``X-Api-Key``): a
        document API on the port the config reserved for it (started on first use)."""
        keyed = next(p for p in self.config["providers"] if p["id"] == KEYED_PROVIDER)
        port = int(keyed["hosts"][0].rsplit(":", 1)[1])
        return self.echo_server(tls=True, name="echo-keyed", port=port)

    @property
    def keyvault(self) -> Running | None:
        return next((r for r in self.extra if r.name == "keyvault"), None)

    def kv_admin(self, method: str, path: str, body: Any = None) -> Any:
        kv = self.keyvault
        assert kv is not None
        with httpx2.Client(verify=self.admin_tls(), timeout=15) as c:
            r = c.request(method, kv.url + path, json=body)
            r.raise_for_status()
            return r.json()

    def close(self) -> None:
        for r in [self.proxy, *self.extra, self.docs, self.auth]:
            if r is not None:
                r.close()

    # -- users and tokens --------------------------------------------------------------
    def context(self, user: str, **kw: Any) -> str:
        kw.setdefault("ctx_kind", "chat")
        kw.setdefault("ctx_id", f"conv-{user}")
        return mint(sub=user, issuer=self.config["identity"]["issuer"],
                    audience=self.config["identity"]["audience"], key_file=str(self.context_key),
                    **kw).reveal()

    def grant(self, user: str, *, expires_in: int = 3600,
              absolute_expiry: bool = False) -> dict[str, Any]:
        """A fresh grant at the authorization server, as if the user had consented.
        ``absolute_expiry``: the response carries ``expires_at`` on the server's clock too
        (which the vault import prefers over ``expires_in``)."""
        with self.admin() as c:
            r = c.post("/_admin/grants", json={"user": user, "client_id": CLIENT_ID,
                                               "scope": "documents.read",
                                               "access_expires_in": expires_in,
                                               "absolute_expiry": absolute_expiry})
            r.raise_for_status()
            token: dict[str, Any] = r.json()
            return token

    def vault_put_cli(self, user: str, token_response: Mapping[str, Any]) -> None:
        """Import a token set with the real `credproxy vault put` command."""
        import subprocess

        subprocess.run(
            [sys.executable, "-m", "proxy.cli", "vault", "put", "--config",
             str(self.config_path), "--user", user, "--provider", PROVIDER],
            input=json.dumps(token_response).encode(), env={**os.environ, **self.env},
            check=True, capture_output=True, timeout=60,
        )

    def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662 introspection at the authorization server (as the document API)."""
        with self.admin() as c:
            r = c.post("/introspect", data={"token": token},
                       auth=(RESOURCE_ID, self.env["DOCAPI_SECRET"]))
            r.raise_for_status()
            data: dict[str, Any] = r.json()
            return data

    def docs_saw(self, marker: str) -> bool:
        """Whether the document API logged a request whose path contains ``marker``."""
        return marker in self.docs.stderr_text()

    def _open_vault(self) -> Any:
        """The stack's vault, whatever its backend, opened as the proxy opens it."""
        from proxy.app import open_vault
        from proxy.settings import load_settings

        vault, _ = open_vault(load_settings(self.config_path), environ=self.env)
        return vault

    def vault_put(self, user: str, token_response: Mapping[str, Any],
                  provider: str = PROVIDER, *, keep_values: bool = True) -> None:
        """Import a token set directly through the vault API (fast; for bulk test set-up).
        The grant values of the grant it replaces are kept (as ``credproxy vault put``
        keeps them), unless ``keep_values`` is False."""
        import asyncio

        from proxy.tokenset import TokenSet
        from proxy.vault.base import Grant

        async def put() -> None:
            vault = self._open_vault()
            try:
                tokens = TokenSet.from_response(token_response, now=time.time())
                current = await vault.get(user, provider) if keep_values else None
                values = current.values if current is not None else {}
                await vault.put(Grant(user=user, provider=provider, tokens=tokens,
                                      values=values,
                                      client_secret=current.client_secret if current else None))
            finally:
                await vault.close()

        asyncio.run(put())

    def audit_records(self) -> list[dict[str, Any]]:
        """The proxy's audit records so far (its stdout sink: one JSON object per line;
        log lines are not JSON)."""
        assert self.proxy is not None
        return [json.loads(line) for line in self.proxy.stdout_text().splitlines()
                if line.startswith("{")]

    def vault_get(self, user: str, provider: str = PROVIDER) -> Any:
        import asyncio

        async def get() -> Any:
            vault = self._open_vault()
            try:
                return await vault.get(user, provider)
            finally:
                await vault.close()

        return asyncio.run(get())

    def admin(self) -> httpx2.Client:
        tls = ssl.create_default_context(cafile=str(self.ca.cert_path))
        return httpx2.Client(base_url=self.auth.url, verify=tls, timeout=10)

    def stats(self) -> dict[str, Any]:
        with self.admin() as c:
            data: dict[str, Any] = c.get("/_admin/stats").json()
            return data

    def client(self, *, context: str | None = None, **kw: Any) -> httpx2.Client:
        """An agent's HTTP client: through the proxy, trusting the proxy's CA."""
        headers = {"X-User-Context": context} if context else {}
        return httpx2.Client(proxy=self.proxy_url, verify=self.mitm_tls(), headers=headers,
                             timeout=kw.pop("timeout", 30), trust_env=False, **kw)

    def issued_tokens(self) -> list[str]:
        with self.admin() as c:
            data = c.get("/_admin/issued").json()
        return [*data["access_tokens"], *data["refresh_tokens"]]


def build_stack(workdir: Path, *, start_proxy: bool = True, access_ttl: int = 3600,
                audit_sink: str = "stdout", config: Mapping[str, Any] | None = None,
                introspect_cache_ttl: float = 0.0, keyvault: bool = False,
                clock_offset: float = 0.0, client_metadata_documents: bool = False,
                confidential_registration: bool = False) -> Stack:
    """``clock_offset``: seconds the provider's clock (authorization server and document
    API) runs ahead of this machine's."""
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    pki = workdir / "pki"
    ca = make_ca(pki)
    cert, key = make_leaf(ca, ["localhost", "127.0.0.1"], pki, "server")
    client_secret = secrets.token_urlsafe(24)
    resource_secret = secrets.token_urlsafe(24)
    clients = [
        # documents.write: what a step-up (an insufficient_scope challenge) may add.
        {"client_id": CLIENT_ID, "client_secret": client_secret, "kind": "client",
         "redirect_uris": ["http://127.0.0.1/oauth/callback"],
         "scope": "documents.read documents.write"},
        {"client_id": RESOURCE_ID, "client_secret": resource_secret, "kind": "resource_server",
         "redirect_uris": [], "scope": ""},
    ]
    (workdir / "clients.json").write_text(json.dumps(clients))
    (workdir / "permissions.json").write_text(json.dumps(DOCUMENTS))
    # Request logs (paths only, scrubbed) let tests assert what did or did not reach a server.
    tls = ["--cert", str(cert), "--key", str(key)]
    auth = start_server(
        ["-m", "devstack.authserver", "--clients", str(workdir / "clients.json"), "--admin",
         "--access-ttl", str(access_ttl), *tls, "--ready-file", str(workdir / "auth.ready"),
         "--clock-offset", str(clock_offset),
         *(["--client-metadata-documents", "--ca-file", str(ca.cert_path)]
           if client_metadata_documents else []),
         *(["--confidential-registration"] if confidential_registration else [])],
        workdir / "auth.ready", log_dir=logs, name="authserver",
    )
    docs = start_server(
        ["-m", "devstack.docapi", "--introspect-url", f"{auth.url}/introspect",
         "--client-id", RESOURCE_ID, "--client-secret-env", "DOCAPI_SECRET",
         "--ca-file", str(ca.cert_path), "--permissions", str(workdir / "permissions.json"),
         "--introspect-cache-ttl", str(introspect_cache_ttl), *tls,
         "--ready-file", str(workdir / "docs.ready"), "--clock-offset", str(clock_offset)],
        workdir / "docs.ready", env={"DOCAPI_SECRET": resource_secret}, log_dir=logs,
        name="docapi",
    )
    context_key, jwks = write_dev_keys(workdir / "keys")
    env = {"CREDPROXY_VAULT_KEY": generate_key(), "DOCS_CLIENT_SECRET": client_secret,
           "DOCAPI_SECRET": resource_secret}
    docs_port = docs.url.rsplit(":", 1)[1]
    cfg: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "admin": f"127.0.0.1:{free_port()}",
        "ca_dir": str(workdir / "ca"),
        "upstream_ca_file": str(ca.cert_path),
        "unrouted": "passthrough",
        "identity": {
            "header": "X-User-Context",
            "issuer": "https://agents.example.com",
            "audience": "credproxy",
            "jwks_file": str(jwks),
            "algorithms": ["EdDSA", "ES256", "RS256"],
        },
        "vault": {"backend": "local", "path": str(workdir / "vault.db"),
                  "key_env": "CREDPROXY_VAULT_KEY"},
        "audit": {"sink": audit_sink},
        "refresh": {"attempts": 3, "backoff": 0.05, "timeout": 5},
        "providers": [{
            "id": PROVIDER,
            "hosts": [f"localhost:{docs_port}", f"127.0.0.1:{docs_port}"],
            "authorize_url": f"{auth.url}/authorize",
            "token_url": f"{auth.url}/token",
            "revocation_url": f"{auth.url}/revoke",
            "client_id": CLIENT_ID,
            "client_secret_env": "DOCS_CLIENT_SECRET",
            "scopes": ["documents.read"],
            "refresh_skew": 60,
        }],
    }
    docs_provider = cfg["providers"][0]
    cfg["providers"] += [
        {**docs_provider, "id": KEYED_PROVIDER, "hosts": [f"localhost:{free_port()}"],
         "inject": {"header": "X-Api-Key", "format": "{access_token}"}},
        {**docs_provider, "id": WILD_PROVIDER, "hosts": ["*.wild.test"]},
    ]
    extra: list[Running] = []
    if keyvault:
        kv = start_server(
            ["-m", "devstack.keyvault", "--cert", str(cert), "--key", str(key), "--admin",
             "--ready-file", str(workdir / "kv.ready")],
            workdir / "kv.ready", log_dir=logs, name="keyvault")
        extra.append(kv)
        token = workdir / "kv-token"
        token.write_text("test-token-for-the-local-key-vault")
        cfg["vault"] = {"backend": "azure", "url": kv.url, "key_env": "CREDPROXY_VAULT_KEY",
                        "ca_file": str(ca.cert_path), "token_file": str(token),
                        "verify_challenge_resource": False, "poll_interval": 0.05}
    for k, v in (config or {}).items():
        cfg[k] = v
    stack = Stack(workdir, ca, auth, docs, env, context_key, workdir / "credproxy.yaml", cfg,
                  extra=extra)
    stack.write_config()
    if cfg["vault"].get("backend", "local") == "local":
        _init_vault(stack)  # the explicit first run (`credproxy vault init`)
    if start_proxy:
        try:
            stack.start_proxy()
        except Exception:
            stack.close()
            raise
    return stack


def _init_vault(stack: Stack) -> None:
    from proxy.app import init_vault
    from proxy.settings import load_settings

    init_vault(load_settings(stack.config_path), environ=stack.env)


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


__all__ = ["Secret", "Stack", "build_stack", "wait_until"]
