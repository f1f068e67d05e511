"""OCSF mapping and the OTLP export: records written by the real AuditLog, sent by the
official OpenTelemetry SDK exporter to a real OTLP/HTTP receiver (devstack.otlpreceiver),
rebuilt from what it received and checked by the real ``credproxy audit verify``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.otlpreceiver import OtlpReceiver
from proxy import auditexport
from proxy.audit import Actor, AuditLog, ContextInfo, FileSink, RequestInfo
from proxy.cli import main
from proxy.secret import Secret
from proxy.settings import ExportSettings, OtlpSettings

Rec = dict[str, Any]


def _records(path: Path, log: AuditLog | None = None) -> AuditLog:
    log = log or AuditLog(FileSink(str(path)), instance="host-1/abcd", fingerprint_key=b"k" * 32)
    ctx = ContextInfo("chat", "conv-1")
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "PROPFIND"):
        log.record("credential.injected", user="alice", provider="docs", context=ctx,
                   request=RequestInfo("r-" + method, method, "api.example", "/v1/doc"),
                   outcome="injected", token=Secret("tok"), token_source="cache")
    log.record("credential.denied", user="bob", provider="docs",
               request=RequestInfo("r-x", "GET", "api.example", "/x"), outcome="denied",
               reason="no_connection", upstream_status=None)
    log.record("request.failed", user="alice", provider="docs",
               request=RequestInfo("r-f", "GET", "api.example", "/f"), outcome="failed",
               reason="upstream_unreachable", upstream_status=502)
    log.record("connection.created", user="carol", provider="docs", outcome="connected",
               actor=Actor("user", "carol"), detail="scope=documents.read")
    log.record("connection.revoked", user="carol", provider="docs", outcome="revoked",
               actor=Actor("cli", "ops@host"), reason="upstream_revoked")
    log.record("config.reloaded", outcome="applied", actor=Actor("system", "sighup"),
               detail="digest=0123 changed=config")
    log.record("suspension.added", user="dave", outcome="suspended",
               actor=Actor("admin", "sec-team"))
    return log


@pytest.fixture
def audit_file(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    _records(path).close()
    return path


def _lines(path: Path) -> list[Rec]:
    return [json.loads(x) for x in path.read_text().splitlines() if x]


def test_ocsf_classes_and_fields(audit_file: Path) -> None:
    events = [auditexport.to_ocsf(r) for r in _lines(audit_file)]
    by_op = [(e["class_uid"], e["activity_id"], e["type_uid"]) for e in events]
    assert by_op == [
        (6003, 2, 600302), (6003, 1, 600301), (6003, 3, 600303), (6003, 4, 600304),
        (6003, 3, 600303), (6003, 2, 600302), (6003, 99, 600399),  # PROPFIND: Other
        (6003, 2, 600302), (6003, 2, 600302),
        (3003, 1, 300301), (3003, 99, 300399),  # connection.created / revoked
        (6003, 99, 600399),  # config.reloaded
        (3003, 99, 300399),  # suspension.added
    ]
    get, denied, failed, created = events[0], events[7], events[8], events[9]
    assert get["category_uid"] == 6 and get["class_name"] == "API Activity"
    assert get["api"] == {"operation": "credential.injected", "service": {"name": "docs"},
                          "request": {"uid": "r-GET"}}
    assert get["http_request"] == {"http_method": "GET",
                                   "url": {"hostname": "api.example", "path": "/v1/doc"}}
    assert get["dst_endpoint"] == {"hostname": "api.example"}
    assert get["src_endpoint"] == {"hostname": "host-1"}
    assert get["actor"] == {"user": {"uid": "alice", "name": "alice"}}
    assert (get["status_id"], get["severity_id"]) == (1, 1)
    assert isinstance(get["time"], int) and get["time"] > 1_700_000_000_000
    md = get["metadata"]
    assert md["version"] == auditexport.OCSF_VERSION
    assert md["product"]["name"] == "credproxy"
    assert (md["uid"], md["sequence"], md["log_name"]) == (
        _lines(audit_file)[0]["hash"], 1, "host-1/abcd")
    assert get["unmapped"] == {"credproxy": _lines(audit_file)[0]}
    assert (denied["status_id"], denied["severity_id"], denied["status_code"]) == (
        2, 3, "no_connection")
    assert failed["http_response"] == {"code": 502}
    assert created["category_uid"] == 3 and created["class_name"] == "Authorize Session"
    assert created["actor"]["user"] == {"uid": "carol", "name": "carol", "type": "user"}
    assert created["user"] == {"uid": "carol", "name": "carol"}
    assert events[10]["actor"]["user"]["type"] == "cli"
    # Never a null in the mapped fields (absent values are left out).
    assert "null" not in json.dumps({k: v for k, v in get.items() if k != "unmapped"})
    # No token, not even its fingerprint, outside the carried record.
    assert "fingerprint" not in json.dumps({k: v for k, v in get.items() if k != "unmapped"})


def test_audit_export_then_verify_round_trips(audit_file: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "export", "--format", "ocsf", str(audit_file)]) == 0
    ocsf = capsys.readouterr().out
    assert len(ocsf.splitlines()) == 13
    out = tmp_path / "ocsf.jsonl"
    out.write_text(ocsf)
    assert main(["audit", "verify", str(out)]) == 0
    assert "13 records in 1 chains verified" in capsys.readouterr().out


def _set(path: str, value: Any) -> Callable[[Rec], None]:
    def edit(event: Rec) -> None:
        *parents, last = path.split(".")
        node = event
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


def _del(path: str) -> Callable[[Rec], None]:
    def edit(event: Rec) -> None:
        *parents, last = path.split(".")
        node = event
        for p in parents:
            node = node[p]
        del node[last]
    return edit


# (name, edit of the first OCSF event, what verify says)
OCSF_EDITS: list[tuple[str, Callable[[Rec], None], str]] = [
    ("actor changed", _set("actor.user.uid", "mallory"), "OCSF field actor.user.uid"),
    ("host changed", _set("http_request.url.hostname", "evil"),
     "OCSF field http_request.url.hostname"),
    ("status flipped", _set("status_id", 2), "OCSF field status_id"),
    ("time moved", _set("time", 0), "OCSF field time"),
    ("class changed", _set("class_uid", 3003), "OCSF field"),
    ("api dropped", _del("api"), "OCSF field api"),
    ("carried record edited", _set("unmapped.credproxy.user", "mallory"), "OCSF field"),
    ("carried record removed", _del("unmapped"), "without unmapped.credproxy"),
    ("carried record not an object", _set("unmapped.credproxy", "x"),
     "without unmapped.credproxy"),
    ("carried record's hash edited", lambda e: (_set("unmapped.credproxy.hash", "0" * 64)(e),
                                                _set("metadata.uid", "0" * 64)(e)),
     "hash does not match the record"),
]


@pytest.mark.parametrize(("name", "edit", "says"), OCSF_EDITS, ids=[e[0] for e in OCSF_EDITS])
def test_edited_ocsf_events_fail_verify(audit_file: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], name: str,
                                        edit: Callable[[Rec], None], says: str) -> None:
    events = [auditexport.to_ocsf(r) for r in _lines(audit_file)]
    edit(events[0])
    path = tmp_path / "edited.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    assert main(["audit", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "BROKEN: line 1" in out and says in out, out


def test_fields_a_siem_adds_are_fine(audit_file: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    events = [auditexport.to_ocsf(r) for r in _lines(audit_file)]
    for e in events:
        e["enrichments"] = [{"name": "geo", "value": "x"}]
        e["metadata"]["processed_time"] = 1
    path = tmp_path / "siem.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    assert main(["audit", "verify", str(path)]) == 0, capsys.readouterr().out


# --- OTLP -----------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


def _export(receiver: OtlpReceiver, fmt: str = "raw", **kw: Any) -> auditexport.OtlpExport:
    settings = ExportSettings(format=fmt, otlp=OtlpSettings(  # type: ignore[arg-type]
        endpoint=receiver.endpoint, delay=0.05, timeout=kw.pop("timeout", 5.0), **kw))
    return auditexport.OtlpExport(settings, instance="host-1/abcd",
                                  environ={"OTLP_KEY": "k3y"})


def _rebuild(receiver: OtlpReceiver, path: Path) -> Path:
    """The JSON lines a SIEM gives back: each log record's body."""
    path.write_text("".join(b + "\n" for b in receiver.bodies()))
    return path


@pytest.mark.parametrize("fmt", ["raw", "ocsf"])
def test_otlp_receiver_gets_every_record_and_verify_passes(
        tmp_path: Path, receiver: OtlpReceiver, capsys: pytest.CaptureFixture[str],
        fmt: str) -> None:
    export = _export(receiver, fmt)
    path = tmp_path / "audit.jsonl"
    log = AuditLog(FileSink(str(path)), instance="host-1/abcd", fingerprint_key=b"k" * 32,
                   on_record=export.emit)
    _records(path, log)
    log.close()
    export.close()
    local = _lines(path)
    got = receiver.received
    assert len(got) == len(local) == 13
    assert export.counters.exported == 13 and export.counters.lag == 0
    first = got[0]
    assert first.attributes == {"credproxy.instance": "host-1/abcd", "credproxy.seq": 1,
                                "credproxy.prev": "", "credproxy.hash": local[0]["hash"],
                                "credproxy.event": "credential.injected"}
    assert first.event_name == "credential.injected"
    assert first.resource["service.name"] == "credproxy"
    assert first.resource["service.instance.id"] == "host-1/abcd"
    assert first.time_unix_nano // 1_000_000 == auditexport.to_ocsf(local[0])["time"]
    bodies = [json.loads(b) for b in receiver.bodies()]
    if fmt == "ocsf":
        assert [b["unmapped"]["credproxy"] for b in bodies] == local
        assert bodies[0]["class_uid"] == 6003
    else:
        assert bodies == local
    rebuilt = _rebuild(receiver, tmp_path / "siem.jsonl")
    assert main(["audit", "verify", str(rebuilt)]) == 0
    assert "13 records in 1 chains verified" in capsys.readouterr().out
    # One record tampered with in the SIEM: verify names it.
    lines = rebuilt.read_text().splitlines()
    lines[4] = lines[4].replace("alice", "mallory")
    rebuilt.write_text("\n".join(lines) + "\n")
    assert main(["audit", "verify", str(rebuilt)]) == 1
    assert "BROKEN: line 5" in capsys.readouterr().out
    # One lost in transit: the gap shows.
    rebuilt.write_text("\n".join(lines[:4] + lines[5:]) + "\n")
    assert main(["audit", "verify", str(rebuilt)]) == 1
    assert "records missing" in capsys.readouterr().out


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_failing_collector_never_fails_a_record_and_is_counted(
        tmp_path: Path, receiver: OtlpReceiver) -> None:
    receiver.fail_with = 400  # not retryable: the SDK gives up at once
    export = _export(receiver)
    path = tmp_path / "audit.jsonl"
    log = AuditLog(FileSink(str(path)), instance="host-1/abcd", fingerprint_key=b"k" * 32,
                   on_record=export.emit)
    for i in range(5):
        log.record("credential.injected", user=f"u{i}", outcome="injected")
    _wait(lambda: export.counters.failed == 5)
    assert export.counters.lag == 5 and export.counters.exported == 0
    assert len(_lines(path)) == 5  # the local trail has them all
    receiver.fail_with = None
    log.record("credential.injected", user="later", outcome="injected")
    _wait(lambda: export.counters.exported == 1)
    assert export.counters.lag == 5  # the five the collector never got
    log.close()
    export.close()


def test_a_full_export_queue_drops_from_the_export_only_and_counts(
        tmp_path: Path, receiver: OtlpReceiver) -> None:
    receiver.fail_with = 503  # retryable: batches wait in the SDK's retries
    export = _export(receiver, max_queue=16, batch=4, timeout=2.0)
    path = tmp_path / "audit.jsonl"
    log = AuditLog(FileSink(str(path)), instance="host-1/abcd", fingerprint_key=b"k" * 32,
                   on_record=export.emit)
    started = time.monotonic()
    for i in range(100):
        log.record("credential.injected", user=f"u{i}", outcome="injected")
    assert time.monotonic() - started < 2.0  # never waits for the collector
    assert len(_lines(path)) == 100
    c = export.counters
    assert c.dropped >= 100 - 16 and c.written + c.dropped == 100
    receiver.fail_with = None
    log.close()
    export.close()
    assert c.exported + c.failed == c.written


def test_otlp_headers_come_from_the_environment(receiver: OtlpReceiver) -> None:
    from proxy.errors import ConfigError

    with pytest.raises(ConfigError, match="env var MISSING_KEY"):
        _export(receiver, headers_env={"X-Api-Key": "MISSING_KEY"})
    _export(receiver, headers_env={"X-Api-Key": "OTLP_KEY"}).close()


@pytest.mark.parametrize("endpoint", ["collector:4318", "ftp://x/v1/logs",
                                      "http://x/v1/logs?key=secret", "http://", ""])
def test_bad_otlp_endpoints_are_refused(endpoint: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="http"):
        OtlpSettings(endpoint=endpoint)
