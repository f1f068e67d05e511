"""`unrouted: deny` and `unrouted: tunnel` through the real proxy."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from devstack.stack import Stack, build_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["deny", "tunnel"])
def mode_stack(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = build_stack(Path(tmp_path_factory.mktemp(request.param)),
                    config={"unrouted": request.param})
    s.vault_put("modes", s.grant("modes"))
    yield s
    s.close()


def test_routed_requests_still_get_credentials(mode_stack: Stack) -> None:
    with mode_stack.client(context=mode_stack.context("modes")) as c:
        r = c.get(f"{mode_stack.docs_url}/echo")
    assert r.status_code == 200
    assert any(k.lower() == "authorization" and v.startswith("Bearer at_")
               for k, v in r.json()["headers"])


def test_unrouted_destinations(mode_stack: Stack) -> None:
    echo = mode_stack.echo_server(tls=True)
    url = echo.url.replace("127.0.0.1", "localhost")
    if mode_stack.config["unrouted"] == "deny":
        with mode_stack.client(context=mode_stack.context("modes")) as c:
            r = c.get(f"{url}/echo")
        assert r.status_code == 403
        assert r.headers["X-Credproxy-Error"] == "unrouted-denied"
        assert "/echo" not in echo.stderr_text()
        return
    # tunnel: TLS to unrouted hosts is not intercepted. A client that trusts only the proxy
    # CA fails; one that trusts the upstream's own CA talks to the upstream end to end.
    with pytest.raises(httpx2.ConnectError):
        with mode_stack.client() as c:
            c.get(f"{url}/echo")
    own = ssl.create_default_context(cafile=str(mode_stack.ca.cert_path))
    with httpx2.Client(proxy=mode_stack.proxy_url, verify=own, trust_env=False) as c:
        r = c.get(f"{url}/echo", headers={"Authorization": "Bearer agent-own"})
    assert r.status_code == 200
    assert ["Authorization", "Bearer agent-own"] in r.json()["headers"]
