"""Audit through the real proxy: one record per decision, a verifiable chain, fail closed."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import Stack, build_stack

pytestmark = pytest.mark.integration


def test_one_record_per_decision_and_the_chain_verifies(stack: Stack, user: str,
                                                        marker: str) -> None:
    good = stack.context(user)
    with stack.client() as c:
        c.get(f"{stack.docs_url}/echo/{marker}/injected", headers={"X-User-Context": good})
        c.get(f"{stack.docs_url}/echo/{marker}/missing")
        c.get(f"{stack.docs_url}/echo/{marker}/invalid", headers={"X-User-Context": "x.y.z"})
        c.get(f"{stack.docs_url}/echo/{marker}/noconn",
              headers={"X-User-Context": stack.context(f"ghost-{marker}")})
    mine = [r for r in stack.audit_records() if marker in str(r["request"])]
    by_path = Counter(str(r["request"]["path"]).rsplit("/", 1)[1] for r in mine)  # type: ignore[index]
    assert by_path == {"injected": 1, "missing": 1, "invalid": 1, "noconn": 1}
    events = {str(r["request"]["path"]).rsplit("/", 1)[1]: r for r in mine}  # type: ignore[index]
    assert events["injected"]["event"] == "credential.injected"
    assert events["injected"]["user"] == user
    assert events["injected"]["context"] == {"kind": "chat", "id": f"conv-{user}"}
    assert events["missing"]["event"] == "identity.rejected"
    assert events["invalid"]["event"] == "identity.rejected"
    assert events["noconn"]["event"] == "reauth.required"
    assert events["noconn"]["reason"] == "no_connection"
    for r in mine:
        assert set(r) == {"ts", "event", "user", "provider", "context", "request", "outcome",
                          "reason", "detail", "upstream_status", "token", "actor", "instance",
                          "seq", "prev", "hash"}
    assert stack.proxy is not None
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "verify",
                          str(stack.proxy.stdout_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok:")


def test_query_strings_never_reach_the_audit_log(stack: Stack, user: str, marker: str) -> None:
    with stack.client(context=stack.context(user)) as c:
        c.get(f"{stack.docs_url}/echo/{marker}?code=secret-{marker}")
    assert stack.proxy is not None
    assert f"secret-{marker}" not in stack.proxy.logs()


@pytest.fixture(scope="module")
def broken_audit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # /dev/full accepts open() and fails every write with ENOSPC: a full disk.
    s = build_stack(Path(tmp_path_factory.mktemp("noaudit")), audit_sink="/dev/full")
    yield s
    s.close()


def test_audit_failure_refuses_the_request(broken_audit: Stack, marker: str) -> None:
    s = broken_audit
    s.vault_put("auditless", s.grant("auditless"))
    with s.client(context=s.context("auditless")) as c:
        r = c.get(f"{s.docs_url}/echo/{marker}")
    assert r.status_code == 503
    assert r.headers["X-Credproxy-Error"] == "audit-unavailable"
    assert "Retry-After" in r.headers
    assert not s.docs_saw(marker)


def _audit_failures(stack: Stack) -> float:
    import httpx2

    text = httpx2.get(f"http://{stack.config['admin']}/metrics").text
    [line] = [x for x in text.splitlines()
              if x.startswith("credproxy_audit_write_failures_total ")]
    return float(line.split()[1])


def test_every_failed_audit_write_is_counted(broken_audit: Stack, marker: str) -> None:
    """Denials and re-auth decisions are audited too: when those records cannot be written
    the agent gets audit-unavailable, and the failure metric counts each one."""
    s = broken_audit
    before = _audit_failures(s)
    with s.client() as c:
        missing = c.get(f"{s.docs_url}/echo/{marker}/missing")
        noconn = c.get(f"{s.docs_url}/echo/{marker}/noconn",
                       headers={"X-User-Context": s.context(f"ghost-{marker}")})
    for r in (missing, noconn):
        assert r.status_code == 503
        assert r.headers["X-Credproxy-Error"] == "audit-unavailable"
    assert _audit_failures(s) == before + 2
    assert not s.docs_saw(marker)
