"""The shipped example configuration stays valid, and the README's newcomer path works as
written: its commands are run literally, in a temporary HOME, by a real shell."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from devstack.procs import free_port
from proxy.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "credproxy.example.yaml"


def test_example_config_is_valid() -> None:
    s = load_settings(EXAMPLE)
    assert [p.id for p in s.providers] == ["docs", "graph", "salesforce", "quickbooks"]
    assert s.identity.algorithms == ["EdDSA", "ES256", "RS256"]


def _using_it() -> tuple[str, list[str]]:
    """The README's "Using it" section and its shell blocks, in order."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using it\n"):]
    section = section[:section.index("\n## ", 1)]
    return section, re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def test_every_secret_the_example_names_is_explained_with_its_command() -> None:
    section, _ = _using_it()
    s = load_settings(EXAMPLE)
    named = [s.vault.key_env, *(p.client_secret_env for p in s.providers)]
    assert all(named)
    for env in named:
        assert f"`{env}`" in section, env  # in the table of secrets
        assert f"export {env}=" in section, env  # and set in the commands
    assert s.identity.jwks_file is not None
    assert Path(s.identity.jwks_file).name in section
    for command in ("credproxy vault keygen", "credproxy context keygen",
                    "credproxy vault init", "credproxy context mint"):
        assert command in section, command


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_the_readme_newcomer_path_works_as_written(tmp_path: Path) -> None:
    """Runs the README's two shell blocks in a fresh directory and HOME. Two departures:
    the ports 8080/9090 become free ones (in the config copy and the agent's command: the
    test machine is shared), and `./run.sh setup` is the repository's own (it sets up the
    .venv beside it, which the fresh directory links to; run from a copy it would install
    the project from that copy)."""
    _, blocks = _using_it()
    first, agent = blocks[0], blocks[1]
    assert first.startswith("./run.sh setup && ")
    first = f"{ROOT / 'run.sh'} setup && " + first.removeprefix("./run.sh setup && ")
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    proxy_port, admin_port = free_port(), free_port()
    (work / "config").mkdir()
    (work / "config" / EXAMPLE.name).write_text(
        EXAMPLE.read_text().replace("listen: 127.0.0.1:8080", f"listen: 127.0.0.1:{proxy_port}")
        .replace("admin: 127.0.0.1:9090", f"admin: 127.0.0.1:{admin_port}"))
    agent = agent.replace("127.0.0.1:8080", f"127.0.0.1:{proxy_port}")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CREDPROXY_", "VIRTUAL_ENV"))
           and not k.endswith("_CLIENT_SECRET")}
    env.update(HOME=str(home), PATH="/usr/local/bin:/usr/bin:/bin")
    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        # Its own session: the test stops the shell and the `credproxy run` it started
        # together, by that process group id.
        shell = subprocess.Popen(["bash", "-euo", "pipefail", "-c", first], cwd=work, env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _accepting(proxy_port):
            assert shell.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", agent], cwd=work, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        import json

        problem = json.loads(r.stdout)
        assert problem["type"] == "urn:credproxy:problem:reauth-required"
        assert problem["reason"] == "no_connection" and problem["provider"] == "docs"
        assert problem["connect_url"] == f"http://127.0.0.1:{admin_port}/connect/docs"
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGTERM)
        shell.wait(30)
    text = log.read_text()
    assert "Traceback" not in text, text
    assert (home / ".credproxy" / "vault.db").stat().st_mode & 0o777 == 0o600
    assert (work / "credproxy-ca.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"  # exited; waiting for init to reap it


@pytest.mark.integration
def test_demo_keep_says_how_to_stop_what_it_leaves_running(tmp_path: Path) -> None:
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "credproxy"), "demo", "--keep",
                        "--workdir", str(tmp_path / "demo")], capture_output=True, text=True,
                       timeout=300)
    pids = [int(x) for x in (tmp_path / "demo" / "pids").read_text().split()]
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert len(pids) == 3 and not any(_gone(p) for p in pids)
        stop = re.search(r"Stop them with:  (kill .*)", r.stdout)
        assert stop is not None, r.stdout
        subprocess.run(["bash", "-c", stop.group(1)], check=True, timeout=30)
        deadline = time.monotonic() + 30
        while not all(_gone(p) for p in pids):
            assert time.monotonic() < deadline, [p for p in pids if not _gone(p)]
            time.sleep(0.2)
    finally:
        for pid in pids:  # only the processes this demo run reported
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
