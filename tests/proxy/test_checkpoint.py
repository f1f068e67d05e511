"""Signed checkpoints: written by the real AuditLog to real files, checked by the real
``credproxy audit verify --key`` (proxy.cli.main); tables of forgeries and truncations."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy import checkpoint
from proxy.audit import AuditLog, CheckpointPolicy, FileSink, chain_hash
from proxy.cli import main
from proxy.errors import ConfigError

Rec = dict[str, Any]


def _keypair(tmp: Path, name: str) -> tuple[checkpoint.Signer, Path]:
    priv = tmp / f"{name}.pem"
    priv.write_bytes(checkpoint.generate_pem())
    signer = checkpoint.Signer.from_file(str(priv))
    pub = tmp / f"{name}.pub.pem"
    pub.write_text(signer.public_pem())
    return signer, pub


def _write(tmp: Path, signer: checkpoint.Signer, n: int, *, instance: str = "host/a",
           every: int | None = 3, name: str = "audit.jsonl",
           second: Path | None = None) -> Path:
    path = tmp / name
    log = AuditLog(FileSink(str(path)), instance=instance, fingerprint_key=b"k" * 32,
                   checkpoint=CheckpointPolicy(signer.detail, every_records=every,
                                               every_seconds=None,
                                               sink=FileSink(str(second)) if second else None))
    for i in range(n):
        log.record("credential.injected", user=f"u{i}", provider="docs", outcome="injected")
    log.close()
    return path


def _read(path: Path) -> list[Rec]:
    return [json.loads(x) for x in path.read_text().splitlines() if x]


def _rechain(recs: list[Rec]) -> list[Rec]:
    """What a writer who rewrites the log does: recompute every seq, prev and hash, so the
    plain chain verifies again. Only the signatures can tell."""
    out: list[Rec] = []
    heads: dict[str, tuple[int, str | None]] = {}
    for rec in recs:
        seq, prev = heads.get(rec["instance"], (0, None))
        r = {k: v for k, v in rec.items() if k != "hash"}
        r["seq"], r["prev"] = seq + 1, prev
        r["hash"] = chain_hash(prev, r)
        heads[rec["instance"]] = (r["seq"], r["hash"])
        out.append(r)
    return out


def _save(path: Path, recs: list[Rec]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["audit", "verify", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_checkpoints_every_n_records_and_at_close(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    signer, pub = _keypair(tmp_path, "cp")
    path = _write(tmp_path, signer, 7)
    recs = _read(path)
    events = [r["event"] for r in recs]
    # 3 records, a checkpoint, 3 more, a checkpoint, 1 more, the final checkpoint at close.
    assert [i + 1 for i, e in enumerate(events) if e == "audit.checkpoint"] == [4, 8, 10]
    cp = recs[3]
    assert cp["actor"] == {"kind": "system", "id": "credproxy"}
    assert cp["outcome"] == "signed"
    assert cp["detail"].startswith(f"seq=3 head={recs[2]['hash']} key={signer.key_id} sig=")
    code, out = _verify(capsys, str(path), "--key", str(pub), "--require-proof")
    assert code == 0, out
    assert "10 records in 1 chains verified, 3 signed checkpoints" in out
    assert "unproven" not in out


def test_a_timer_checkpoints_an_idle_log(tmp_path: Path) -> None:
    signer, _ = _keypair(tmp_path, "cp")
    path = tmp_path / "audit.jsonl"
    log = AuditLog(FileSink(str(path)), instance="host/t", fingerprint_key=b"k" * 32,
                   checkpoint=CheckpointPolicy(signer.detail, every_records=None,
                                               every_seconds=0.1))
    log.record("credential.injected", user="u", outcome="injected")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "audit.checkpoint" not in path.read_text():
        time.sleep(0.05)
    recs = _read(path)
    assert [r["event"] for r in recs] == ["credential.injected", "audit.checkpoint"]
    time.sleep(0.3)  # nothing new: no second checkpoint
    log.close()
    assert len(_read(path)) == 2


def test_without_checkpoints_nothing_changes(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(FileSink(str(path)), instance="host/n", fingerprint_key=b"k" * 32)
    log.record("credential.injected", user="u", outcome="injected")
    log.close()
    assert [r["event"] for r in _read(path)] == ["credential.injected"]
    code, out = _verify(capsys, str(path))
    assert code == 0 and "signed checkpoints" not in out


def _edit_detail(field: str, value: str) -> Callable[[list[Rec]], list[Rec]]:
    def edit(recs: list[Rec]) -> list[Rec]:
        cp = recs[3]
        parts = dict(p.split("=", 1) for p in cp["detail"].split(" "))
        parts[field] = value
        cp["detail"] = " ".join(f"{k}={v}" for k, v in parts.items())
        return _rechain(recs)
    return edit


def _edit_user(recs: list[Rec]) -> list[Rec]:
    recs[1]["user"] = "mallory"
    return _rechain(recs)


def _edit_user_and_head(recs: list[Rec]) -> list[Rec]:
    recs[1]["user"] = "mallory"
    recs = _rechain(recs)
    return _edit_detail("head", recs[2]["hash"])(recs)


def _move_checkpoint(recs: list[Rec]) -> list[Rec]:
    cp = recs.pop(3)
    recs.insert(5, cp)
    return _rechain(recs)


def _drop_checkpoints_and_rechain(recs: list[Rec]) -> list[Rec]:
    return _rechain([r for r in recs if r["event"] != "audit.checkpoint"])


# (name, how the log is rewritten, what verify --key says)
FORGERIES: list[tuple[str, Callable[[list[Rec]], list[Rec]], str]] = [
    ("record edited, chain recomputed", _edit_user, "moved or forged"),
    ("record edited, chain and head recomputed", _edit_user_and_head,
     "signature does not verify"),
    ("checkpoint moved later", _move_checkpoint, "moved or forged"),
    ("signature replaced", _edit_detail("sig", "A" * 86), "signature does not verify"),
    ("signature not base64url", _edit_detail("sig", "*" * 86), "detail malformed"),
    ("signature truncated", _edit_detail("sig", "A" * 40), "detail malformed"),
    ("seq changed", _edit_detail("seq", "2"), "moved or forged"),
    ("key id of another key", _edit_detail("key", "0123456789abcdef"),
     "not one given with --key"),
    ("detail emptied", lambda r: _rechain([*r[:3], {**r[3], "detail": None}, *r[4:]]),
     "detail malformed"),
    ("detail extended", _edit_detail("sig", "A" * 86 + " extra=1"), "detail malformed"),
]


@pytest.mark.parametrize(("name", "forge", "says"), FORGERIES, ids=[f[0] for f in FORGERIES])
def test_forged_checkpoints_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         name: str, forge: Callable[[list[Rec]], list[Rec]],
                                         says: str) -> None:
    signer, pub = _keypair(tmp_path, "cp")
    path = _write(tmp_path, signer, 7)
    forged = _save(tmp_path / "forged.jsonl", forge(_read(path)))
    code, out = _verify(capsys, str(forged))  # the plain chain is whole again
    assert code == 0, out
    code, out = _verify(capsys, str(forged), "--key", str(pub))
    assert code == 1, out
    assert "BROKEN" in out and says in out, out


def test_a_checkpoint_from_another_instance_does_not_verify(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    signer, pub = _keypair(tmp_path, "cp")
    a = _read(_write(tmp_path, signer, 3, instance="host/a", every=None, name="a.jsonl"))
    b = _read(_write(tmp_path, signer, 3, instance="host/b", every=None, name="b.jsonl"))
    # b's checkpoint (over seq 3 of b) spliced into a after a's own seq 3.
    spliced = [*a[:3], {**b[3], "instance": "host/a"}]
    spliced[3]["detail"] = spliced[3]["detail"].replace(
        f"head={b[2]['hash']}", f"head={a[2]['hash']}")
    forged = _save(tmp_path / "f.jsonl", _rechain(spliced))
    code, out = _verify(capsys, str(forged), "--key", str(pub))
    assert code == 1 and "signature does not verify" in out, out


def test_verify_with_the_wrong_key_fails_and_a_rotated_key_can_be_added(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    signer, pub = _keypair(tmp_path, "cp")
    _, other = _keypair(tmp_path, "other")
    path = _write(tmp_path, signer, 4)
    code, out = _verify(capsys, str(path), "--key", str(other))
    assert code == 1 and f"signed with key {signer.key_id}" in out
    code, out = _verify(capsys, str(path), "--key", str(other), "--key", str(pub))
    assert code == 0, out


def test_deleting_the_newest_records_is_reported(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    signer, pub = _keypair(tmp_path, "cp")
    second = tmp_path / "checkpoints.jsonl"
    path = _write(tmp_path, signer, 7, second=second)
    recs = _read(path)
    assert [r["seq"] for r in _read(second)] == [4, 8, 10]
    # Delete the final checkpoint and the record before it: a valid, shorter chain.
    cut = _save(tmp_path / "cut.jsonl", recs[:-2])
    code, out = _verify(capsys, str(cut))
    assert code == 0, out  # the plain chain cannot tell
    code, out = _verify(capsys, str(cut), "--key", str(pub))
    assert code == 0
    assert "warning: instance host/a: 0 records" not in out
    assert "instance host/a: 0" not in out
    code, out = _verify(capsys, str(cut), "--key", str(pub), "--require-proof")
    # The checkpoint at seq 8 is the last; nothing follows it: proven up to there.
    assert code == 0, out
    cut2 = _save(tmp_path / "cut2.jsonl", recs[:-1])  # only the final checkpoint deleted
    code, out = _verify(capsys, str(cut2), "--key", str(pub))
    assert code == 0
    assert "instance host/a: 1 records after the last checkpoint (seq 8) are unproven" in out
    code, out = _verify(capsys, str(cut2), "--key", str(pub), "--require-proof")
    assert code == 1 and "UNPROVEN" in out
    # The second sink's copy of the final checkpoint proves the log was longer.
    for cut_file in (cut, cut2):
        code, out = _verify(capsys, str(cut_file), "--key", str(pub),
                            "--checkpoints", str(second))
        assert code == 1, out
        assert "the newest records were deleted" in out
    code, out = _verify(capsys, str(path), "--key", str(pub), "--checkpoints", str(second))
    assert code == 0, out


def test_a_rewritten_log_contradicts_the_second_sink(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    signer, pub = _keypair(tmp_path, "cp")
    second = tmp_path / "checkpoints.jsonl"
    path = _write(tmp_path, signer, 7, second=second)
    rewritten = _edit_user(_read(path))
    forged = _save(tmp_path / "f.jsonl", _drop_checkpoints_and_rechain(rewritten))
    code, out = _verify(capsys, str(forged), "--key", str(pub), "--checkpoints", str(second))
    assert code == 1
    assert "has another hash than a second-sink checkpoint states (rewritten)" in out


BAD_SECOND_SINK: list[tuple[str, Callable[[Rec], Rec], str]] = [
    ("edited", lambda r: {**r, "user": "x"}, "hash does not match"),
    ("not a checkpoint", lambda r: {**r, "event": "credential.injected"},
     "not a checkpoint record"),
    ("signature replaced", lambda r: _resign(r, "A" * 86), "signature does not verify"),
]


def _resign(rec: Rec, sig: str) -> Rec:
    r = {**rec, "detail": rec["detail"].rsplit("sig=", 1)[0] + f"sig={sig}"}
    r["hash"] = chain_hash(r["prev"], {k: v for k, v in r.items() if k != "hash"})
    return r


@pytest.mark.parametrize(("name", "bad", "says"), BAD_SECOND_SINK,
                         ids=[b[0] for b in BAD_SECOND_SINK])
def test_bad_second_sink_records_are_reported(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str], name: str,
                                              bad: Callable[[Rec], Rec], says: str) -> None:
    signer, pub = _keypair(tmp_path, "cp")
    second = tmp_path / "checkpoints.jsonl"
    path = _write(tmp_path, signer, 4, second=second)
    copies = _read(second)
    _save(second, [bad(copies[0]), *copies[1:]])
    code, out = _verify(capsys, str(path), "--key", str(pub), "--checkpoints", str(second))
    assert code == 1 and says in out, out


def test_an_instance_missing_from_the_log(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    signer, pub = _keypair(tmp_path, "cp")
    second = tmp_path / "checkpoints.jsonl"
    _write(tmp_path, signer, 4, instance="host/gone", second=second, name="old.jsonl")
    path = _write(tmp_path, signer, 2, instance="host/new", name="new.jsonl")
    code, out = _verify(capsys, str(path), "--key", str(pub), "--checkpoints", str(second))
    assert code == 1 and "instance host/gone" in out and "no record of this instance" in out
    code, out = _verify(capsys, str(path), "--key", str(pub), "--checkpoints", str(second),
                        "--allow-partial")
    assert code == 0, out


def test_verify_options_and_keys_are_checked(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    signer, pub = _keypair(tmp_path, "cp")
    path = _write(tmp_path, signer, 2)
    code, out = _verify(capsys, str(path), "--checkpoints", str(path))
    assert code == 1 and "need --key" in out
    code, out = _verify(capsys, str(path), "--require-proof")
    assert code == 1 and "need --key" in out
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(
    ).public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    bad = {"rsa.pem": rsa_pem, "garbage.pem": b"not a key", "empty.pem": b""}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        code, out = _verify(capsys, str(path), "--key", str(tmp_path / name))
        assert code == 1 and f"--key {tmp_path / name}" in out, out
    code, out = _verify(capsys, str(path), "--key", str(tmp_path / "absent.pem"))
    assert code == 1 and "absent.pem" in out
    # The private key file works as --key too (its public half is used).
    code, out = _verify(capsys, str(path), "--key", str(tmp_path / "cp.pem"))
    assert code == 0, out


@pytest.mark.parametrize("content", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"
                                     b"-----END PRIVATE KEY-----\n", "rsa"])
def test_a_bad_signing_key_is_a_config_error(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "key.pem"
    if content == "rsa":
        path.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048)
                         .private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    else:
        assert isinstance(content, bytes)
        path.write_bytes(content)
    with pytest.raises(ConfigError, match="audit.checkpoint") as exc:
        checkpoint.Signer.from_file(str(path))
    assert "keygen" in str(exc.value)
    with pytest.raises(ConfigError, match="cannot read"):
        checkpoint.Signer.from_file(str(tmp_path / "missing.pem"))


def test_a_failing_second_sink_never_fails_a_record(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    signer, _ = _keypair(tmp_path, "cp")
    path = tmp_path / "audit.jsonl"
    # /dev/full: every write fails with ENOSPC.
    log = AuditLog(FileSink(str(path)), instance="host/f", fingerprint_key=b"k" * 32,
                   checkpoint=CheckpointPolicy(signer.detail, every_records=1,
                                               every_seconds=None,
                                               sink=FileSink("/dev/full")))
    log.record("credential.injected", user="u", outcome="injected")
    log.close()
    assert [r["event"] for r in _read(path)] == ["credential.injected", "audit.checkpoint"]
    assert "not written to the checkpoint sink" in caplog.text


def test_keygen_writes_a_private_key_once(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "cp.pem"
    assert main(["audit", "keygen", "--out", str(key), "--public",
                 str(tmp_path / "cp.pub")]) == 0
    out = capsys.readouterr()
    assert key.stat().st_mode & 0o777 == 0o600
    assert out.out.startswith("-----BEGIN PUBLIC KEY-----")
    assert (tmp_path / "cp.pub").read_text() == out.out
    signer = checkpoint.Signer.from_file(str(key))
    assert f"key id {signer.key_id}" in out.err
    assert main(["audit", "keygen", "--out", str(key)]) == 1
    assert "not overwriting" in capsys.readouterr().err
