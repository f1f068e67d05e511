"""A minimal stack for the devstack's own tests: test CA, authorization server, document API.

(The full deployment including the proxy is ``devstack.stack.build_stack``; these tests check
the servers themselves and so start only them, with settings the tests rely on.)
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx2

from devstack.certs import CA, make_ca, make_leaf
from devstack.procs import Running, start_server

SCOPE = "documents.read"

# Two users who can see different things: the point of per-user credentials.
PERMISSIONS: dict[str, Any] = {
    "documents": [
        {"id": "doc-1", "title": "Engagement letter", "matter": "matter-a"},
        {"id": "doc-2", "title": "Witness statement", "matter": "matter-a"},
        {"id": "doc-3", "title": "Board minutes", "matter": "matter-b"},
        {"id": "doc-4", "title": "Settlement draft", "matter": "matter-b"},
    ],
    "users": {"alice": ["matter-a"], "bob": ["matter-b"], "carol": ["matter-a", "matter-b"]},
}


def _write_json(path: Path, data: Any) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    return path


@dataclass
class DevStack:
    directory: Path
    ca: CA
    auth: Running
    docapi: Running
    client_id: str
    client_secret: str
    resource_client_id: str
    resource_client_secret: str
    scope: str

    def ssl_context(self) -> ssl.SSLContext:
        """A strict default client context trusting the stack's CA."""
        return ssl.create_default_context(cafile=str(self.ca.cert_path))

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """Call the authorization server's /_admin/ API and return the decoded JSON."""
        with httpx2.Client(verify=self.ssl_context(), timeout=10.0) as c:
            r = c.request(method, self.auth.url + path, json=body)
            r.raise_for_status()
            return r.json()

    def close(self) -> None:
        self.docapi.close()
        self.auth.close()

    def __enter__(self) -> DevStack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_stack(
    directory: Path,
    *,
    redirect_uris: Sequence[str],
    client_id: str = "credproxy",
    introspect_cache_ttl: float = 1.0,
) -> DevStack:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = make_ca(directory)
    cert, key = make_leaf(ca, ["localhost", "127.0.0.1", "::1"], directory, "server")
    client_secret = secrets.token_urlsafe(24)
    rs_id, rs_secret = "docapi", secrets.token_urlsafe(24)
    clients = [
        {"client_id": client_id, "client_secret": client_secret,
         "redirect_uris": list(redirect_uris), "scope": SCOPE, "kind": "client"},
        {"client_id": rs_id, "client_secret": rs_secret, "redirect_uris": [], "scope": "",
         "kind": "resource_server"},
    ]
    clients_file = _write_json(directory / "clients.json", clients)
    perms_file = _write_json(directory / "permissions.json", PERMISSIONS)

    common = ["--host", "127.0.0.1", "--port", "0", "--cert", str(cert), "--key", str(key)]
    auth_ready = directory / "authserver.ready.json"
    auth = start_server(
        ["-m", "devstack.authserver", *common, "--clients", str(clients_file), "--admin",
         "--ready-file", str(auth_ready)],
        auth_ready, name="authserver", log_dir=directory,
    )
    try:
        doc_ready = directory / "docapi.ready.json"
        docapi = start_server(
            ["-m", "devstack.docapi", *common,
             "--introspect-url", f"{auth.url}/introspect",
             "--client-id", rs_id, "--client-secret-env", "DEVSTACK_DOCAPI_SECRET",
             "--ca-file", str(ca.cert_path), "--permissions", str(perms_file),
             "--introspect-cache-ttl", str(introspect_cache_ttl),
             "--ready-file", str(doc_ready)],
            doc_ready, env={"DEVSTACK_DOCAPI_SECRET": rs_secret}, name="docapi",
            log_dir=directory,
        )
    except BaseException:
        auth.close()
        raise
    return DevStack(directory, ca, auth, docapi, client_id, client_secret, rs_id, rs_secret,
                    SCOPE)
