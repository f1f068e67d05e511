"""The `credproxy` command line, run as a real subprocess against the real stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.stack import Stack

pytestmark = pytest.mark.integration


def cli(stack: Stack | None, *args: str, stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, **(stack.env if stack else {}), **(env or {})}
    cfg = ["--config", str(stack.config_path)] if stack else []
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args, *cfg], input=stdin,
                          capture_output=True, text=True, env=e, timeout=60)


def test_check_reports_each_part(stack: Stack) -> None:
    r = cli(stack, "check")
    assert r.returncode == 0, r.stderr
    for part in ("config: ok", "vault (local): ok", "coordination (memory): ok", "ca: ok"):
        assert part in r.stdout


def test_check_names_a_missing_secret(stack: Stack) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DOCS_CLIENT_SECRET"}
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check", "--config",
                        str(stack.config_path)], capture_output=True, text=True,
                       env={**env, "CREDPROXY_VAULT_KEY": stack.env["CREDPROXY_VAULT_KEY"]})
    assert r.returncode == 1
    assert "DOCS_CLIENT_SECRET" in r.stderr


def test_check_rejects_a_wrong_vault_key(stack: Stack) -> None:
    from proxy.vault.keys import generate_key

    r = cli(stack, "check", env={"CREDPROXY_VAULT_KEY": generate_key()})
    assert r.returncode == 1
    assert "vault key" in r.stderr


def test_check_names_an_unknown_config_key(stack: Stack, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(stack.config_path.read_text().replace("unrouted:", "unrouted_typo:"))
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "check", "--config", str(bad)],
                       capture_output=True, text=True, env={**os.environ, **stack.env})
    assert r.returncode == 1
    assert "unrouted_typo: unknown key" in r.stderr


def test_ca_prints_the_certificate_the_proxy_uses(stack: Stack) -> None:
    r = cli(stack, "ca")
    assert r.returncode == 0
    assert r.stdout.startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" not in r.stdout
    assert r.stdout == stack.mitm_ca.read_text()


def test_vault_put_then_connections_never_show_values(stack: Stack) -> None:
    grant = stack.grant("cli-user")
    r = cli(stack, "vault", "put", "--user", "cli-user", "--provider", "docs",
            stdin=json.dumps(grant))
    assert r.returncode == 0, r.stderr
    listing = cli(stack, "connections", "--user", "cli-user")
    assert "cli-user" in listing.stdout and "docs" in listing.stdout and "active" in listing.stdout
    as_json = cli(stack, "connections", "--json")
    row = next(json.loads(x) for x in as_json.stdout.splitlines()
               if json.loads(x)["user"] == "cli-user")
    assert row["has_refresh_token"] is True and row["scope"] == "documents.read"
    for out in (r, listing, as_json):
        assert grant["access_token"] not in out.stdout + out.stderr
        assert grant["refresh_token"] not in out.stdout + out.stderr
    # vault put is audited as connection.created, without the token.
    created = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert created[0]["event"] == "connection.created" and created[0]["user"] == "cli-user"


@pytest.mark.parametrize("stdin,message", [
    ('{"access_token": "at_secret_canary", ', "not valid JSON"),
    ('{"refresh_token": "rt_secret_canary"}', "no access_token"),
    ('["at_secret_canary"]', "JSON object"),
    ('{"access_token": "at_secret_canary", "expires_in": "soon"}', "expires_in"),
])
def test_vault_put_rejects_bad_input_without_echoing_it(stack: Stack, stdin: str,
                                                        message: str) -> None:
    r = cli(stack, "vault", "put", "--user", "u", "--provider", "docs", stdin=stdin)
    assert r.returncode == 1
    assert message in r.stderr
    assert "secret_canary" not in r.stdout + r.stderr


def test_vault_put_unknown_provider(stack: Stack) -> None:
    r = cli(stack, "vault", "put", "--user", "u", "--provider", "nope", stdin="{}")
    assert r.returncode == 1 and "nope" in r.stderr


def test_context_mint_makes_a_token_the_proxy_accepts(stack: Stack, user: str) -> None:
    r = cli(stack, "context", "mint", "--user", user, "--key", str(stack.context_key))
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    with stack.client(context=token) as c:
        resp = c.get(f"{stack.docs_url}/echo")
    assert resp.status_code == 200


def _audit_file(stack: Stack, tmp_path: Path) -> Path:
    assert stack.proxy is not None
    with stack.client(context=stack.context("tail-user")) as c:
        c.get(f"{stack.docs_url}/echo/tail")
    p = tmp_path / "audit.jsonl"
    p.write_text(stack.proxy.stdout_text())
    return p


def test_audit_tail_filters(stack: Stack, tmp_path: Path) -> None:
    p = _audit_file(stack, tmp_path)
    r = cli(None, "audit", "tail", str(p), "--user", "tail-user", "--json")
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert recs and all(x["user"] == "tail-user" for x in recs)
    r = cli(None, "audit", "tail", "--event", "reauth.", stdin=p.read_text())
    assert r.stdout and all("reauth.required" in x for x in r.stdout.splitlines())
    r = cli(None, "audit", "tail", "--provider", "nope", stdin=p.read_text())
    assert r.stdout == ""


def test_audit_verify_names_the_first_broken_record(stack: Stack, tmp_path: Path) -> None:
    p = _audit_file(stack, tmp_path)
    lines = p.read_text().splitlines(keepends=True)
    records = [i for i, x in enumerate(lines) if x.startswith("{")]
    assert len(records) >= 3
    del lines[records[1]]  # delete the second record
    p.write_text("".join(lines))
    r = cli(None, "audit", "verify", str(p))
    assert r.returncode == 1
    assert r.stdout.startswith("BROKEN: line")
    assert "seq 3" in r.stdout


def test_run_stops_cleanly_on_sigterm(stack: Stack, tmp_path: Path) -> None:
    import yaml

    from devstack.procs import free_port, start_server, tcp_check

    port = free_port()
    cfg = yaml.safe_load(stack.config_path.read_text())
    cfg["listen"] = f"127.0.0.1:{port}"
    cfg["admin"] = f"127.0.0.1:{free_port()}"
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = start_server(["-m", "proxy.cli", "run", "--config", str(path)],
                        ready=tcp_check("127.0.0.1", port), env=stack.env, name="second",
                        log_dir=tmp_path)
    assert proc.close(timeout=10) == 0
    assert "Traceback" not in proc.stderr_text()
