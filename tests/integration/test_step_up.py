"""Step-up (issue 15, item 5; every provider): an upstream that answers a valid token with
``error="insufficient_scope"`` (RFC 6750 section 3.1; the MCP authorization spec's scope
challenge) gets the agent a 403 ``insufficient-scope`` naming the union of the grant's
scopes and the challenged ones, with a connect URL that requests exactly that. No refresh
(it would keep the scope and loop), the grant stays active for what it covers, the answer
is audited; after the user consents again, the request works.

Through the real sidecar, the stack's authorization server and a document API that insists
on ``documents.write`` (devstack.docapi ``--required-scope``), and the real web connect
flow."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest

from devstack.stack import PROVIDER, Stack, build_stack

from .test_mcp_connect import connect_in_browser

pytestmark = pytest.mark.integration

WRITE = "writer"  # the provider whose API insists on documents.write


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = build_stack(tmp_path_factory.mktemp("stepup"), start_proxy=False)
    try:
        api = s.echo_server(tls=True, name="write-api", required_scope="documents.write")
        port = api.url.rsplit(":", 1)[1]
        docs = s.config["providers"][0]
        s.config["providers"].append({**docs, "id": WRITE, "hosts": [f"localhost:{port}"],
                                      "scopes": ["documents.read", "documents.write"]})
        s.write_config()
        s.start_proxy()
        s.write_api = f"https://localhost:{port}"  # type: ignore[attr-defined]
        yield s
    finally:
        s.close()


def _get(stack: Stack, user: str) -> httpx2.Response:
    with stack.client(context=stack.context(user)) as c:
        return c.get(f"{stack.write_api}/documents")  # type: ignore[attr-defined]


def consent_at(stack: Stack, user: str, connect_url: str) -> None:
    """The user's browser follows a refusal's connect link (the user context appended, as
    a browser would), consents to exactly documents.read and documents.write, and the
    callback stores the grant."""
    asked = connect_in_browser(stack, user, connect_url)
    assert asked["scope"][0].split() == ["documents.read", "documents.write"], asked


def test_a_scope_challenge_is_a_step_up_then_works_after_consent(stack: Stack) -> None:
    user = "stepup-alice"
    stack.vault_put(user, stack.grant(user), provider=WRITE)  # documents.read only
    refreshes = stack.stats()["refresh_by_user"].get(user, 0)
    r = _get(stack, user)
    assert r.status_code == 403, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["x-credproxy-error"] == "insufficient-scope"
    body = r.json()
    assert body["type"] == "urn:credproxy:problem:insufficient-scope"
    assert (body["reason"], body["provider"]) == ("insufficient_scope", WRITE)
    assert body["scope"] == "documents.read documents.write"
    query = parse_qs(urlsplit(body["connect_url"]).query)
    assert query == {"scope": ["documents.read documents.write"]}
    assert "documents.write" in body["detail"]
    assert "insufficient_scope" not in r.headers.get("www-authenticate", "")
    # No refresh (it would keep the scope), the grant still active and still used for
    # what it covers; the refusal audited with the upstream's status.
    assert stack.stats()["refresh_by_user"].get(user, 0) == refreshes
    grant = stack.vault_get(user, WRITE)
    assert grant is not None and grant.status == "active"
    again = _get(stack, user)
    assert again.status_code == 403 and again.json()["reason"] == "insufficient_scope"
    assert stack.stats()["refresh_by_user"].get(user, 0) == refreshes  # never a loop
    denied = [a for a in stack.audit_records() if a.get("user") == user
              and a["event"] == "credential.denied"]
    assert denied and denied[-1]["reason"] == "insufficient_scope"
    assert denied[-1]["upstream_status"] == 403
    # The user consents to the union; the same request then works.
    consent_at(stack, user, body["connect_url"])
    ok = _get(stack, user)
    assert ok.status_code == 200 and ok.json()["user"] == user, ok.text


def test_the_other_providers_keep_working_and_401s_still_refresh(stack: Stack) -> None:
    """The step-up is only for ``insufficient_scope``: the document API of the stack's
    own provider answers as before."""
    user = "stepup-bob"
    stack.vault_put(user, stack.grant(user), provider=PROVIDER)
    with stack.client(context=stack.context(user)) as c:
        r = c.get(f"{stack.docs_url}/documents")
    assert r.status_code == 200 and r.json()["user"] == user
