"""OAuth client steps shared by the devstack tests (a browser-less client, by hand)."""

from __future__ import annotations

import base64
import hashlib
import secrets
import urllib.parse
from typing import Any

import httpx2

from ._stack import DevStack

# Nothing listens here: the client never follows the final redirect, it reads the Location.
REDIRECT_URI = "http://127.0.0.1:9/callback"

def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.rstrip(b"=").decode()


def authorize(http: httpx2.Client, stack: DevStack, **params: str) -> httpx2.Response:
    query = {
        "response_type": "code",
        "client_id": stack.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": stack.scope,
        "state": "st-123",
        **params,
    }
    return http.get(f"{stack.auth.url}/authorize", params=query, follow_redirects=False)


def redirect_params(resp: httpx2.Response) -> dict[str, str]:
    assert resp.status_code == 302, resp.text
    loc = resp.headers["location"]
    assert loc.startswith(REDIRECT_URI + "?"), loc
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(loc).query))


def code_flow(http: httpx2.Client, stack: DevStack, user: str) -> dict[str, Any]:
    """Authorization code + PKCE, the way a browser-less client does it."""
    verifier, challenge = pkce_pair()
    params = redirect_params(
        authorize(http, stack, login_hint=user, code_challenge=challenge,
                  code_challenge_method="S256")
    )
    r = http.post(
        f"{stack.auth.url}/token",
        data={"grant_type": "authorization_code", "code": params["code"],
              "redirect_uri": REDIRECT_URI, "code_verifier": verifier},
        auth=(stack.client_id, stack.client_secret),
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def refresh(http: httpx2.Client, stack: DevStack, refresh_token: str) -> httpx2.Response:
    # client_secret_post here (code_flow uses client_secret_basic): both must work.
    return http.post(
        f"{stack.auth.url}/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token,
              "client_id": stack.client_id, "client_secret": stack.client_secret},
    )


def introspect(http: httpx2.Client, stack: DevStack, token: str) -> dict[str, Any]:
    r = http.post(
        f"{stack.auth.url}/introspect",
        data={"token": token},
        auth=(stack.resource_client_id, stack.resource_client_secret),
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def grant(stack: DevStack, user: str, **extra: Any) -> dict[str, Any]:
    return dict(
        stack.admin("POST", "/_admin/grants", {"user": user, "client_id": stack.client_id,
                                               **extra})
    )
