"""The `credproxy` command line, run as a real subprocess against the real stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


# -- a config of its own (vault, CA, audit, ports), for tests that damage things ----------


def _own_config(stack: Stack, tmp_path: Path, **overrides: Any) -> Path:
    """The stack's config with everything that lands on disk moved under ``tmp_path`` (a
    vault that does not exist yet, no CA, audit to stdout) and free ports."""
    import yaml

    from devstack.procs import free_port

    cfg = yaml.safe_load(stack.config_path.read_text())
    cfg.update({"listen": f"127.0.0.1:{free_port()}", "admin": f"127.0.0.1:{free_port()}",
                "ca_dir": str(tmp_path / "ca"), "audit": {"sink": "stdout"}})
    cfg["vault"] = {**cfg["vault"], "path": str(tmp_path / "vault.db")}
    cfg.update(overrides)
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cli_at(stack: Stack, config: Path, *args: str, stdin: str | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args, "--config", str(config)],
                          input=stdin, capture_output=True, text=True,
                          env={**os.environ, **stack.env, **(env or {})}, timeout=60)


def _refused(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("credproxy: ") or "\ncredproxy: " in r.stderr, r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


def test_vault_init_creates_the_first_vault_once(stack: Stack, tmp_path: Path) -> None:
    config = _own_config(stack, tmp_path)
    vault = tmp_path / "vault.db"
    r = cli_at(stack, config, "vault", "init")
    assert r.returncode == 0, r.stderr
    assert str(vault) in r.stderr and vault.stat().st_mode & 0o777 == 0o600
    assert cli_at(stack, config, "check").returncode == 0
    before = vault.read_bytes()
    again = cli_at(stack, config, "vault", "init")
    _refused(again, f"vault file {vault} already exists; nothing changed")
    assert vault.read_bytes() == before


def _damage(vault: Path, how: str) -> None:
    if how == "zero-bytes":
        vault.write_bytes(b"")
    elif how == "deleted":
        vault.unlink()
    elif how == "garbage":
        vault.write_bytes(b"this is not a vault\n" * 100)
    elif how == "foreign-sqlite":
        import sqlite3
        from contextlib import closing

        vault.unlink()
        with closing(sqlite3.connect(vault)) as db, db:
            db.execute("CREATE TABLE t (x)")


@pytest.mark.parametrize("how,message", [
    ("zero-bytes", "is empty (truncated, or never initialised)"),
    ("deleted", "does not exist. For a first run create it with `credproxy vault init"),
    ("garbage", "is not a readable SQLite database"),
    ("foreign-sqlite", "is a SQLite database but not a credproxy vault"),
])
@pytest.mark.parametrize("command", ["run", "check", "connections"])
def test_a_vault_that_went_missing_or_empty_is_never_replaced(
        stack: Stack, tmp_path: Path, how: str, message: str, command: str) -> None:
    config = _own_config(stack, tmp_path)
    vault = tmp_path / "vault.db"
    assert cli_at(stack, config, "vault", "init").returncode == 0
    put = cli_at(stack, config, "vault", "put", "--user", "keeper", "--provider", "docs",
                 stdin=json.dumps(stack.grant("keeper")))
    assert put.returncode == 0, put.stderr
    _damage(vault, how)
    before = vault.read_bytes() if vault.exists() else None
    r = cli_at(stack, config, command)
    _refused(r, str(vault), message)
    # Nothing was created or initialised: the damaged file is as it was, no CA either.
    assert (vault.read_bytes() if vault.exists() else None) == before
    assert not (tmp_path / "ca").exists()


def _corrupt_record(vault: Path, user: str, provider: str) -> None:
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(vault)) as db, db:
        sealed = bytearray(db.execute("SELECT sealed FROM grants WHERE user = ? AND "
                                      "provider = ?", (user, provider)).fetchone()[0])
        sealed[20] ^= 0xFF  # a ciphertext byte: the record fails authentication
        db.execute("UPDATE grants SET sealed = ? WHERE user = ? AND provider = ?",
                   (bytes(sealed), user, provider))


def test_a_corrupt_record_is_listed_and_revoke_removes_what_it_can(
        stack: Stack, tmp_path: Path) -> None:
    config = _own_config(stack, tmp_path)
    assert cli_at(stack, config, "vault", "init").returncode == 0
    grants = {}
    for user, provider in (("dana", "docs"), ("dana", "keyed"), ("erin", "docs")):
        grants[(user, provider)] = stack.grant(user)
        r = cli_at(stack, config, "vault", "put", "--user", user, "--provider", provider,
                   stdin=json.dumps(grants[(user, provider)]))
        assert r.returncode == 0, r.stderr
    _corrupt_record(tmp_path / "vault.db", "dana", "keyed")
    # Listings show it as corrupt; the others are listed as before.
    listing = cli_at(stack, config, "connections")
    assert listing.returncode == 0, listing.stderr
    rows = {tuple(line.split()[:3]) for line in listing.stdout.splitlines()[1:]}
    assert rows == {("dana", "docs", "active"), ("dana", "keyed", "corrupt"),
                    ("erin", "docs", "active")}
    as_json = [json.loads(x) for x in cli_at(stack, config, "connections", "--json",
                                             "--user", "dana").stdout.splitlines()]
    assert [(x["provider"], x["status"], x["reason"]) for x in as_json] == [
        ("docs", "active", None), ("keyed", "corrupt", "vault_record_corrupt")]
    dry = cli_at(stack, config, "revoke", "--user", "dana", "--dry-run")
    assert dry.returncode == 0 and "dana / keyed (corrupt record: would be deleted" in dry.stdout
    # Revoke: the readable grant is revoked upstream and removed; the corrupt one is
    # deleted and reported (its tokens could not be revoked), so the exit status is 1.
    r = cli_at(stack, config, "revoke", "--user", "dana")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "docs: removed; upstream revoked" in r.stdout
    assert "keyed: removed locally; corrupt record: its tokens could not be read" in r.stdout
    assert stack.introspect(grants[("dana", "docs")]["access_token"])["active"] is False
    after = cli_at(stack, config, "connections")
    assert "dana" not in after.stdout and "erin" in after.stdout
    audit = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    revoked = {a["provider"]: a for a in audit if a["event"] == "connection.revoked"}
    assert revoked["keyed"]["outcome"] == "pending" and revoked["docs"]["outcome"] == "revoked"
    for out in (listing, r, after):
        for g in grants.values():
            assert g["access_token"] not in out.stdout + out.stderr


def _dump(cfg: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False)


def _set(**overrides: Any) -> Any:
    return lambda cfg, tmp: _dump({**cfg, **overrides})


def _nested(section: str, **overrides: Any) -> Any:
    return lambda cfg, tmp: _dump({**cfg, section: {**cfg.get(section, {}), **overrides}})


def _provider(**overrides: Any) -> Any:
    return lambda cfg, tmp: _dump({**cfg, "providers": [{**cfg["providers"][0], **overrides},
                                                        *cfg["providers"][1:]]})


def _text(edit: Any) -> Any:
    return lambda cfg, tmp: edit(_dump(cfg))


def _audit_in_missing_dir(cfg: dict[str, Any], tmp: Path) -> str:
    return _dump({**cfg, "audit": {"sink": str(tmp / "no-such-dir" / "audit.jsonl")}})


def _audit_is_a_dir(cfg: dict[str, Any], tmp: Path) -> str:
    return _dump({**cfg, "audit": {"sink": str(tmp)}})


def _ca_dir_is_a_file(cfg: dict[str, Any], tmp: Path) -> str:
    (tmp / "a-file").write_text("x")
    return _dump({**cfg, "ca_dir": str(tmp / "a-file")})


def _missing_file(key: str) -> Any:
    def make(cfg: dict[str, Any], tmp: Path) -> str:
        if key == "jwks_file":
            return _dump({**cfg, "identity": {**cfg["identity"],
                                              "jwks_file": str(tmp / "gone.json")}})
        return _dump({**cfg, key: str(tmp / "gone.pem")})
    return make


# Each row: a config `check` and `run` must both refuse, naming the key (or file, or line),
# with exit status 1, no traceback, and nothing created on disk (vault, CA, audit file).
BAD_CONFIGS = [
    pytest.param(_audit_in_missing_dir, "audit.sink: directory", id="audit-dir-missing"),
    pytest.param(_audit_is_a_dir, "audit.sink:", id="audit-sink-is-a-directory"),
    pytest.param(_set(stream_large_bodies="lots"), "stream_large_bodies: must be a size",
                 id="stream-large-bodies-word"),
    pytest.param(_set(stream_large_bodies="-1m"), "stream_large_bodies:", id="size-negative"),
    pytest.param(_set(stream_large_bodies="1 MB"), "stream_large_bodies:", id="size-spaced"),
    pytest.param(_set(public_url="not a url"), "public_url: must be an absolute http(s) URL",
                 id="public-url-not-a-url"),
    pytest.param(_set(public_url="ftp://files.example.com"), "public_url:", id="public-url-ftp"),
    pytest.param(_set(public_url="https://x.example.com/?a=b"), "public_url:",
                 id="public-url-query"),
    pytest.param(_text(lambda t: t + "unrouted: deny\n"),
                 "not valid YAML: line", id="duplicate-top-level-key"),
    pytest.param(_text(lambda t: t.replace("  issuer: ", "  issuer: https://other\n  issuer: ",
                                           1)),
                 "duplicate key 'issuer' (first given on line", id="duplicate-nested-key"),
    pytest.param(_text(lambda t: t.replace("  client_id: ", "  client_id: x\n  client_id: ",
                                           1)),
                 "duplicate key 'client_id'", id="duplicate-key-in-a-provider"),
    pytest.param(_nested("refresh", timeout=-1), "refresh.timeout:", id="negative-timeout"),
    pytest.param(_nested("coordination", op_timeout=0), "coordination.op_timeout:",
                 id="zero-redis-timeout"),
    pytest.param(_nested("vault", timeout=-5), "vault.timeout:", id="negative-vault-timeout"),
    pytest.param(_set(listen="127.0.0.1"), "listen: must be HOST:PORT", id="listen-no-port"),
    pytest.param(_set(admin="127.0.0.1:99999"), "admin: must be HOST:PORT", id="admin-bad-port"),
    pytest.param(_set(unrouted="allow"), "unrouted:", id="unknown-unrouted-mode"),
    pytest.param(_set(reload={"settle": -1}), "reload.settle:", id="negative-settle"),
    pytest.param(_set(reload={"allow_provider_removal": ["Not An Id"]}),
                 "reload.allow_provider_removal[0]:", id="bad-removal-id"),
    pytest.param(_provider(token_url="http://login.example.com/token"),
                 "providers[0]: Value error, token_url must be an https URL"
                 .replace("Value error, ", ""), id="http-token-url"),
    pytest.param(_provider(hosts=[]), "providers[0].hosts:", id="provider-without-hosts"),
    pytest.param(_set(identity=None), "identity:", id="identity-null"),
    pytest.param(_missing_file("jwks_file"), "gone.json", id="jwks-file-missing"),
    pytest.param(_missing_file("upstream_ca_file"), "upstream_ca_file: cannot load",
                 id="upstream-ca-missing"),
    pytest.param(_ca_dir_is_a_file, "ca_dir:", id="ca-dir-is-a-file"),
    pytest.param(lambda cfg, tmp: "", "the top level must be a mapping", id="empty-file"),
    pytest.param(lambda cfg, tmp: "- a\n- b\n", "the top level must be a mapping",
                 id="top-level-list"),
    pytest.param(lambda cfg, tmp: "listen: [\n", "not valid YAML: line", id="yaml-syntax"),
    pytest.param(lambda cfg, tmp: _dump(cfg), "vault init", id="valid-but-no-vault"),
]


@pytest.mark.parametrize("make,message", BAD_CONFIGS)
def test_check_and_run_refuse_what_would_fail_at_run_time(
        stack: Stack, tmp_path: Path, make: Any, message: str) -> None:
    import yaml

    base = yaml.safe_load(_own_config(stack, tmp_path).read_text())
    config = tmp_path / "bad.yaml"
    config.write_text(make(base, tmp_path))
    before = sorted(p.name for p in tmp_path.iterdir())
    for command in ("check", "run"):
        r = cli_at(stack, config, command)
        _refused(r, message)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, command  # nothing made
    assert not (tmp_path / "vault.db").exists() and not (tmp_path / "ca").exists()


@pytest.mark.parametrize("which", ["listen", "admin"])
def test_run_with_a_port_taken_names_the_key(stack: Stack, tmp_path: Path, which: str) -> None:
    import socket

    config = _own_config(stack, tmp_path)
    assert cli_at(stack, config, "vault", "init").returncode == 0
    import yaml

    addr = yaml.safe_load(config.read_text())[which]
    host, _, port = addr.rpartition(":")
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind((host, int(port)))
        holder.listen()
        r = cli_at(stack, config, "run")
    _refused(r, f"{which}: cannot listen on {addr}", "another process is using the port")
    assert not (tmp_path / "ca").exists()


def test_context_mint_with_a_missing_key_file_names_it(stack: Stack, tmp_path: Path) -> None:
    missing = tmp_path / "no-key.jwk"
    r = cli(stack, "context", "mint", "--user", "u", "--key", str(missing))
    _refused(r, f"cannot read signing key file {missing}", "credproxy context keygen")


def test_vault_create_makes_only_a_missing_file(stack: Stack, tmp_path: Path) -> None:
    """vault.create: true (a per-pod emptyDir) creates a missing vault; an existing empty
    one is still refused."""
    import yaml

    cfg = yaml.safe_load(_own_config(stack, tmp_path).read_text())
    cfg["vault"]["create"] = True
    config = tmp_path / "create.yaml"
    config.write_text(yaml.safe_dump(cfg))
    vault = tmp_path / "vault.db"
    r = cli_at(stack, config, "check")
    assert r.returncode == 0, r.stderr
    assert vault.stat().st_size > 0
    vault.write_bytes(b"")
    _refused(cli_at(stack, config, "check"), f"vault file {vault} is empty")
    assert vault.read_bytes() == b""


def test_providers_lists_the_whole_catalog_with_what_each_entry_needs() -> None:
    """`credproxy providers` needs no config: every shipped catalog entry, its hosts (a
    wildcard only as the ceiling of an entry that binds each grant to its tenant:
    ``grant_hosts``), the parameters a config must give, the grant values it reads and the
    revocation style."""
    shipped = sorted(p.stem for p in (Path(__file__).parents[2] / "proxy" / "catalog")
                     .glob("*.yaml"))
    r = cli(None, "providers", "--json")
    assert r.returncode == 0, r.stderr
    entries = {e["id"]: e for e in json.loads(r.stdout)}
    assert sorted(entries) == shipped and len(shipped) >= 17
    for e in entries.values():
        assert "error" not in e, e
        assert e["hosts"], e
        assert e["grant_hosts"] or not any(h.startswith("*") for h in e["hosts"]), e
        assert e["revocation"] in {"rfc7009", "json", "bearer", "github-grant", "slack",
                                   "none"}
    assert entries["salesforce"]["parameters"] == []
    assert "instance" in entries["salesforce"]["grant_values"]
    assert entries["salesforce"]["grant_hosts"] == ["{instance}"]
    assert entries["sharepoint"]["parameters"] == ["sharepoint_tenant"]
    assert entries["slack"]["revocation"] == "slack"
    text = cli(None, "providers")
    assert text.returncode == 0 and "provider: <id>" in text.stdout
