"""checkov (the IaC scanner) on every rendered overlay, offline.

Each overlay is rendered with the real ``kubectl kustomize`` (as in test_manifests.py) and
scanned by the real checkov, pinned in constraints-tools.txt and installed by
``./run.sh setup`` into its own venv (.venv-tools: its pins clash with the project's).
No check may fail; a check may only be skipped by a ``checkov.io/skipN`` annotation that
gives a reason, and every skipped check must be justified for that overlay in the
"checkov" table of docs/kubernetes.md (and every row there must still be needed).

Offline: ``--skip-download``, no API key, the update check off, and every proxy variable
pointing at a local listener that records connection attempts: the test fails if checkov
tried to reach anything. A missing checkov is a failure, never a skip.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_manifests import ROOT, render

CHECKOV = ROOT / ".venv-tools" / "bin" / "checkov"
DOC = ROOT / "docs" / "kubernetes.md"
OVERLAYS = ["overlays/dev", "overlays/prod"]
# What issue 19 fixed must stay fixed (never skipped, never failing): secrets as files,
# high UIDs, namespaced objects; in prod, images by digest (which is what lets every
# container keep IfNotPresent).
FIXED = {"CKV_K8S_35", "CKV_K8S_40", "CKV_K8S_21"}
FIXED_IN_PROD = FIXED | {"CKV_K8S_43", "CKV_K8S_15"}


class ConnectionRecorder:
    """A TCP listener standing in for every proxy: records the first bytes of each
    connection (an HTTPS client through a proxy sends ``CONNECT host:443``) and answers
    nothing, so nothing ever leaves this machine."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.seen: list[bytes] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.seen.append(conn.recv(256))
                except OSError:
                    self.seen.append(b"")

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)


@pytest.fixture
def recorder() -> Iterator[ConnectionRecorder]:
    r = ConnectionRecorder()
    yield r
    r.close()


def _checkov() -> Path:
    if not CHECKOV.is_file():
        pytest.fail(f"checkov not found at {CHECKOV}: run ./run.sh setup (it installs the "
                    "pinned test tools of constraints-tools.txt into .venv-tools)")
    return CHECKOV


def run_checkov(manifest: Path, recorder: ConnectionRecorder, home: Path,
                *, offline: bool = True) -> dict[str, Any]:
    """checkov's JSON report for one rendered manifest. A minimal environment: no
    BC_API_KEY/PRISMA_* from the caller, HOME in a temporary folder, and every proxy
    variable pointing at ``recorder``."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
           "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true",
           "NO_PROXY": "", "no_proxy": ""}
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY"):
        env[var] = recorder.url
    args = [str(_checkov()), "--framework", "kubernetes", "--file", str(manifest),
            "--output", "json"]
    if offline:
        args.append("--skip-download")
        env["BC_SKIP_MAPPING"] = "TRUE"
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env,
                          cwd=manifest.parent, check=False)
    # Exit status 1 means "failed checks", which the caller reports in detail.
    assert proc.returncode in (0, 1), f"checkov crashed ({proc.returncode}):\n{proc.stderr}"
    try:
        report: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov printed no JSON report:\n{proc.stdout[:2000]}\n{proc.stderr}")
    return report


def documented_skips() -> dict[str, dict[str, str]]:
    """overlay -> {check id: justification} from the table in docs/kubernetes.md,
    section "checkov": rows ``| `CKV_K8S_n` name | dev, prod | why |``."""
    text = DOC.read_text(encoding="utf-8")
    section = re.search(r"^## checkov\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, "docs/kubernetes.md has no '## checkov' section"
    out: dict[str, dict[str, str]] = {o: {} for o in OVERLAYS}
    rows = re.findall(r"^\| `(CKV_K8S_\d+)`[^|]*\| ([^|]+) \| ([^|]+) \|$", section.group(1),
                      re.M)
    assert rows, "the checkov section has no table of accepted findings"
    for check, overlays, why in rows:
        for o in (s.strip() for s in overlays.split(",")):
            assert f"overlays/{o}" in out, f"{check}: unknown overlay {o!r} in the docs"
            out[f"overlays/{o}"][check] = why.strip()
    return out


def _render_to(tmp_path: Path, target: str) -> tuple[Path, int]:
    objs = render(target)
    path = tmp_path / (target.replace("/", "-") + ".yaml")
    path.write_text(yaml.safe_dump_all(objs, sort_keys=False), encoding="utf-8")
    return path, len(objs)


@pytest.mark.parametrize("target", OVERLAYS)
def test_checkov_passes_or_skips_every_check_with_a_documented_reason(
        target: str, tmp_path: Path, recorder: ConnectionRecorder) -> None:
    manifest, count = _render_to(tmp_path, target)
    report = run_checkov(manifest, recorder, tmp_path)
    summary, results = report["summary"], report["results"]
    # Everything was read and scanned.
    assert summary["parsing_errors"] == 0 and summary["resource_count"] >= count, summary
    assert summary["passed"] > 50
    failed = [f"{c['check_id']} {c['check_name']} ({c['resource']})"
              for c in results["failed_checks"]]
    assert failed == [], f"{target}: checkov findings neither fixed nor justified:\n" + \
        "\n".join(failed) + "\nFix them, or add a checkov.io/skipN annotation with the " \
        "reason and a row in docs/kubernetes.md, 'checkov'."
    skipped = {c["check_id"]: c["check_result"].get("suppress_comment", "")
               for c in results["skipped_checks"]}
    documented = documented_skips()[target]
    assert set(skipped) == set(documented), (
        f"{target}: skipped {sorted(skipped)} but docs/kubernetes.md justifies "
        f"{sorted(documented)}")
    for check, reason in skipped.items():
        assert reason != "No comment provided" and len(reason) >= 40, (check, reason)
    passed = {c["check_id"] for c in results["passed_checks"]}
    fixed = FIXED_IN_PROD if target == "overlays/prod" else FIXED
    assert fixed <= passed, f"{target}: no longer passing: {sorted(fixed - passed)}"
    # And it stayed on this machine.
    assert recorder.seen == [], f"checkov tried the network: {recorder.seen}"


def test_checkov_is_the_pinned_version(tmp_path: Path, recorder: ConnectionRecorder) -> None:
    """A stale .venv-tools would scan with other rules than CI's."""
    pins = (ROOT / "constraints-tools.txt").read_text(encoding="utf-8")
    pinned = re.search(r"^checkov==(\S+)$", pins, re.M)
    assert pinned
    manifest, _ = _render_to(tmp_path, "overlays/dev")
    report = run_checkov(manifest, recorder, tmp_path)
    assert report["summary"]["checkov_version"] == pinned.group(1)


def test_the_network_guard_sees_checkov_when_it_is_allowed_online(
        tmp_path: Path, recorder: ConnectionRecorder) -> None:
    """Guards the 'stayed on this machine' assertion above: without --skip-download
    checkov fetches its guidelines from the Prisma Cloud API, and the recorder (which
    forwards nothing) sees that attempt. So an empty record means no attempt was made."""
    manifest, _ = _render_to(tmp_path, "overlays/dev")
    run_checkov(manifest, recorder, tmp_path, offline=False)
    assert any(s.startswith(b"CONNECT ") for s in recorder.seen), recorder.seen
