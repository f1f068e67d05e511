"""Run the whole demo (`credproxy demo`) and grep everything every process wrote for every
secret the run produced: access and refresh tokens, user-context JWS, client secret, vault
key. None may appear anywhere but where they belong (the authorization server's client
registry and the canary list itself)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_runs_and_no_secret_reaches_any_output(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "demo", "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Demo complete: every expectation held." in out.stdout
    canaries = json.loads((workdir / "canaries.json").read_text())
    secrets = [*canaries["tokens"], *canaries["contexts"], *canaries["env"]]
    assert len(canaries["tokens"]) >= 6 and canaries["contexts"]
    # Everything the processes wrote, plus the files credproxy keeps at rest.
    haystacks = {"demo stdout": out.stdout, "demo stderr": out.stderr}
    for f in sorted((workdir / "logs").iterdir()):
        haystacks[f.name] = f.read_text(errors="replace")
    haystacks["vault.db"] = (workdir / "vault.db").read_bytes().decode("latin-1")
    haystacks["credproxy.yaml"] = (workdir / "credproxy.yaml").read_text()
    assert any("credential.injected" in h for h in haystacks.values())
    leaks = [(name, s[:12]) for name, text in haystacks.items() for s in secrets if s in text]
    assert leaks == []
