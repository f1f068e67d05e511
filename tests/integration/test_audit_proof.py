"""The audit trail as proof, through real processes: the real sidecar (and real CLI runs)
writing signed checkpoints to a file and a second sink, exporting every record with the
OpenTelemetry SDK to a real OTLP/HTTP receiver, auditing reloads (SIGHUP, with the config
digest), connects and revokes with their actor; ``credproxy audit verify --key`` on the
file, on what the receiver got, and on the file with its newest records deleted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.otlpreceiver import OtlpReceiver
from devstack.stack import PROVIDER, Stack, build_stack, wait_until
from proxy import checkpoint

pytestmark = pytest.mark.integration


class Proof:
    def __init__(self, stack: Stack, receiver: OtlpReceiver, tmp: Path) -> None:
        self.stack, self.receiver, self.tmp = stack, receiver, tmp
        self.audit = tmp / "audit.jsonl"
        self.second = tmp / "checkpoints.jsonl"
        self.pub = tmp / "cp.pub.pem"

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.audit.read_text().splitlines() if x]

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy.cli", *args], input=stdin,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, **self.stack.env})

    def verify(self, *files: Path, extra: tuple[str, ...] = ()
               ) -> subprocess.CompletedProcess[str]:
        return self.cli("audit", "verify", *map(str, files), "--key", str(self.pub), *extra)


def signing_key(tmp: Path) -> Path:
    """A checkpoint signing key at ``tmp/cp.pem`` (0600) and its public half beside it,
    ``tmp/cp.pub.pem``."""
    key = tmp / "cp.pem"
    key.write_bytes(checkpoint.generate_pem())
    key.chmod(0o600)
    (tmp / "cp.pub.pem").write_text(checkpoint.Signer.from_file(str(key)).public_pem())
    return key


def proof_stack(tmp: Path, *, every_seconds: float) -> tuple[Stack, OtlpReceiver]:
    """A sidecar whose audit trail goes to ``tmp/audit.jsonl``, signed every 5 records or
    ``every_seconds`` (key: :func:`signing_key`), a copy of each checkpoint in
    ``tmp/checkpoints.jsonl``, and every record exported by OTLP/HTTP to a real receiver."""
    key = signing_key(tmp)
    receiver = OtlpReceiver()
    stack = build_stack(tmp / "stack", config={"audit": {
        "sink": str(tmp / "audit.jsonl"),
        "checkpoint": {"key_file": str(key), "every_records": 5,
                       "every_seconds": every_seconds,
                       "sink": str(tmp / "checkpoints.jsonl")},
        "export": {"format": "raw", "otlp": {"endpoint": receiver.endpoint, "delay": 0.1}},
    }})
    return stack, receiver


@pytest.fixture(scope="module")
def proof(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proof]:
    tmp = Path(tmp_path_factory.mktemp("proof"))
    stack, receiver = proof_stack(tmp, every_seconds=30)
    try:
        yield Proof(stack, receiver, tmp)
    finally:
        stack.close()
        receiver.close()


def test_start_reload_connect_revoke_are_audited_and_every_record_proven(
        proof: Proof, marker: str) -> None:
    s = proof.stack
    assert s.proxy is not None
    [loaded] = [r for r in proof.records() if r["event"] == "config.loaded"]
    assert loaded["actor"] == {"kind": "system", "id": "credproxy"}
    assert loaded["detail"].startswith("digest=")
    assert "vault_key=" in loaded["detail"] and "checkpoint_key=" in loaded["detail"]
    instance = loaded["instance"]

    # A connect by an operator at a terminal: the CLI user is the actor.
    user = f"carol-{marker}"
    s.vault_put_cli(user, s.grant(user))
    [created] = [r for r in proof.records()
                 if r["event"] == "connection.created" and r["user"] == user]
    assert created["actor"]["kind"] == "cli" and "@" in created["actor"]["id"]
    assert created["instance"] != instance  # the CLI run's own chain

    with s.client(context=s.context(user)) as c:
        for i in range(7):
            assert c.get(f"{s.docs_url}/echo/{marker}/{i}").status_code == 200
    injected = [r for r in proof.records() if r["event"] == "credential.injected"
                and marker in r["request"]["path"]]
    assert len(injected) == 7 and all(r["actor"] is None for r in injected)

    # SIGHUP with a changed config: config.reloaded names the digest and what changed.
    s.config["refresh"] = {**s.config["refresh"], "attempts": 2}
    s.write_config()
    s.proxy.signal(signal.SIGHUP)

    def reloads() -> list[dict[str, Any]]:
        return [r for r in proof.records() if r["event"] == "config.reloaded"]

    # The file watcher may see the change before the signal: then both reload.
    wait_until(lambda: any(r["actor"] == {"kind": "system", "id": "sighup"}
                           for r in reloads()))
    [changed] = [r for r in reloads() if "changed=config" in r["detail"]]
    assert changed["instance"] == instance and changed["outcome"] == "applied"
    assert changed["actor"]["id"] in ("sighup", "file-watch")
    assert changed["detail"].startswith("digest=")
    assert changed["detail"].split()[0] != loaded["detail"].split()[0]  # a new digest

    # A config that fails its checks: audited as rejected, the old one keeps serving.
    s.config["providers"] = [{**p, "client_secret_env": "UNSET_SECRET_" + marker.upper()
                              .replace("-", "_")} if p["id"] == PROVIDER else p
                             for p in s.config["providers"]]
    s.write_config()
    s.proxy.signal(signal.SIGHUP)
    wait_until(lambda: any(r["event"] == "config.reloaded" and r["outcome"] == "rejected"
                           for r in proof.records()))
    rejected = next(r for r in reloads() if r["outcome"] == "rejected")
    assert rejected["reason"] == "config_rejected" and "UNSET_SECRET_" in rejected["detail"]
    s.config["providers"][0] = {**s.config["providers"][0],
                                "client_secret_env": "DOCS_CLIENT_SECRET"}
    s.write_config()

    # A revoke at the terminal: the CLI user is the actor of each record.
    out = proof.cli("revoke", "--config", str(s.config_path), "--user", user)
    assert out.returncode == 0, out.stdout + out.stderr
    revoked = [r for r in proof.records()
               if r["event"] in ("connection.revoked", "user.offboarded") and r["user"] == user]
    assert {r["event"] for r in revoked} == {"connection.revoked", "user.offboarded"}
    assert all(r["actor"]["kind"] == "cli" for r in revoked)

    # Restart: a final checkpoint closes the old chain, the new one starts with config.loaded.
    s.proxy.close()
    s.start_proxy()
    wait_until(lambda: len([r for r in proof.records() if r["event"] == "config.loaded"]) == 2)
    s.proxy.close()  # its final checkpoint too
    recs = proof.records()
    by_instance: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        by_instance.setdefault(r["instance"], []).append(r)
    assert len(by_instance) == 4  # two sidecar runs, the vault put and the revoke
    for chain in by_instance.values():
        assert chain[-1]["event"] == "audit.checkpoint"  # every process closed with one
    # every_records=5: never more than 5 records without a checkpoint after them.
    run = 0
    for r in by_instance[instance]:
        run = 0 if r["event"] == "audit.checkpoint" else run + 1
        assert run <= 5, by_instance[instance]
    assert len([r for r in by_instance[instance] if r["event"] == "audit.checkpoint"]) >= 2

    out = proof.verify(proof.audit, extra=("--checkpoints", str(proof.second),
                                           "--require-proof"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(recs)} records in 4 chains verified" in out.stdout
    second = [json.loads(x) for x in proof.second.read_text().splitlines()]
    assert sorted(r["hash"] for r in recs if r["event"] == "audit.checkpoint") == sorted(
        r["hash"] for r in second)

    # What the OTLP receiver got: every record, and verify passes on it.
    wait_until(lambda: len(proof.receiver.received) >= len(recs))
    got = proof.tmp / "from-otlp.jsonl"
    got.write_text("".join(b + "\n" for b in proof.receiver.bodies()))
    assert sorted(json.loads(b)["hash"] for b in proof.receiver.bodies()) == sorted(
        r["hash"] for r in recs)
    out = proof.verify(got, extra=("--checkpoints", str(proof.second), "--require-proof"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert proof.receiver.received[0].resource["service.name"] == "credproxy"

    # Deleting the newest records after a checkpoint: the plain chain cannot tell; the
    # signed checkpoints and the second sink do.
    final = [r for r in recs if r["instance"] == instance][-1]
    assert final["event"] == "audit.checkpoint"
    cut = proof.tmp / "cut.jsonl"
    cut.write_text("".join(json.dumps(r) + "\n" for r in recs if r is not final))
    plain = proof.cli("audit", "verify", str(cut))
    assert plain.returncode == 0, plain.stdout
    out = proof.verify(cut)
    assert out.returncode == 0
    assert f"instance {instance}: " in out.stdout and "unproven" in out.stdout
    out = proof.verify(cut, extra=("--checkpoints", str(proof.second)))
    assert out.returncode == 1
    assert f"instance {instance}: the log ends at seq" in out.stdout
    assert "the newest records were deleted" in out.stdout


def test_export_lag_and_checkpoints_are_metrics(proof: Proof, marker: str) -> None:
    import httpx2

    s = proof.stack
    if s.proxy is None or s.proxy.proc.poll() is not None:
        s.start_proxy()
    text = ""

    def exported() -> bool:
        nonlocal text
        text = httpx2.get(f"http://{s.config['admin']}/metrics").text
        return 'credproxy_audit_export_records_total{outcome="exported"}' in text

    wait_until(exported)
    assert "credproxy_audit_export_lag_records" in text
    # The collector goes away: requests still succeed, the lag grows, failures count.
    proof.receiver.fail_with = 400
    user = f"dora-{marker}"
    s.vault_put(user, s.grant(user))
    with s.client(context=s.context(user)) as c:
        for i in range(3):
            assert c.get(f"{s.docs_url}/echo/{marker}/{i}").status_code == 200

    def lagging() -> bool:
        nonlocal text
        text = httpx2.get(f"http://{s.config['admin']}/metrics").text
        lag = [x for x in text.splitlines()
               if x.startswith("credproxy_audit_export_lag_records ")]
        return bool(lag) and float(lag[0].split()[1]) >= 3

    wait_until(lagging)
    assert 'credproxy_audit_export_records_total{outcome="failed"}' in text
    proof.receiver.fail_with = None
