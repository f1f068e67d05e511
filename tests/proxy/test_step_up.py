"""Reading an ``insufficient_scope`` challenge (RFC 6750 section 3): which answers are a
step-up, and which scope tokens they ask for (RFC 6749 section 3.3 scope-token grammar;
anything else dropped). The behaviour through the real sidecar is
tests/integration/test_step_up.py."""

from __future__ import annotations

import pytest

from proxy.sidecar import challenged_scopes as asked


@pytest.mark.parametrize(("challenge", "scopes"), [
    pytest.param('Bearer error="insufficient_scope", scope="files.write files.read"',
                 ["files.write", "files.read"], id="rfc6750"),
    pytest.param('Bearer realm="mcp", error="insufficient_scope", scope="tools:write", '
                 'resource_metadata="https://mcp.example.com/.well-known/oauth-protected-'
                 'resource"', ["tools:write"], id="mcp-scope-challenge"),
    pytest.param("Bearer error=insufficient_scope, scope=admin", ["admin"], id="token-form"),
    pytest.param('bearer ERROR="INSUFFICIENT_SCOPE", SCOPE="a"', ["a"], id="case"),
    pytest.param('Bearer error="insufficient_scope"', [], id="no-scope-named"),
    pytest.param('Bearer error="insufficient_scope", scope="a  a b"', ["a", "b"],
                 id="repeats-and-double-spaces"),
    pytest.param('Bearer error="insufficient_scope", scope="ok bad\\\\ \x01ctl"', ["ok"],
                 id="invalid-scope-tokens-dropped"),
    pytest.param('Bearer error="insufficient_scope", scope="' + "x" * 300 + ' ok"', ["ok"],
                 id="overlong-token-dropped"),
    pytest.param('Bearer error="insufficient_scope", scope="' + " ".join(
        f"s{i}" for i in range(100)) + '"', [f"s{i}" for i in range(64)],
                 id="at-most-64"),
    pytest.param('Bearer error="invalid_token"', None, id="invalid-token-is-not-step-up"),
    pytest.param('Basic realm="x"', None, id="basic"),
    pytest.param("", None, id="no-challenge"),
    pytest.param('Bearer error_description="insufficient_scope"', None,
                 id="only-in-a-description"),
])
def test_challenges(challenge: str, scopes: list[str] | None) -> None:
    assert asked(challenge) == scopes
