"""Signed checkpoints: make the loss of the newest audit records detectable.

The hash chain (:mod:`proxy.audit`) shows edits, deletions and reordering in the middle of
the trail, not the loss of its end: whoever deletes the last records leaves a valid, shorter
chain. A checkpoint closes that. Every ``every_records`` records or ``every_seconds``
seconds (and at shutdown), the writer appends a record::

    {"event": "audit.checkpoint", "outcome": "signed", "actor": {"kind": "system", ...},
     "detail": "seq=41 head=<64 hex> key=<16 hex> sig=<base64url>", "seq": 42,
     "prev": "<the same 64 hex>", ...}

stating that record ``seq`` of this ``instance`` has hash ``head``, signed with an Ed25519
key (RFC 8032) the operator provides. The signed message is domain-separated and
canonical::

    b"credproxy audit checkpoint v1\\n" + canonical_json({"head": H, "instance": I, "seq": S})

``key`` is the key id: the first 16 hex characters of SHA-256 over the raw 32-byte public
key. The checkpoint record is itself a link of the chain (its ``prev`` is ``head``), so
it can be neither moved nor dropped without breaking the chain, and is sent to a second
sink as well (``audit.checkpoint.sink``): a copy out of reach of whoever can truncate the
main log.

:class:`CheckpointCheck` verifies them (``credproxy audit verify --key PUB.pem``): every
checkpoint's signature under a given public key, that it states its own place in the chain,
how many records of each instance follow the last checkpoint (unproven), and, given the
second sink's copies, that the log still holds every record they state (``--checkpoints``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from proxy.audit import AUDIT_CHECKPOINT, Record, canonical_json, chain_hash, parse_lines
from proxy.errors import ConfigError

DOMAIN: Final = b"credproxy audit checkpoint v1\n"
OUTCOME: Final = "signed"
_DETAIL: Final = re.compile(
    r"seq=(?P<seq>[1-9][0-9]{0,18}) head=(?P<head>[0-9a-f]{64}) "
    r"key=(?P<key>[0-9a-f]{16}) sig=(?P<sig>[A-Za-z0-9_-]{86})")


def message(instance: str, seq: int, head: str) -> bytes:
    """The bytes a checkpoint signs: :data:`DOMAIN` + canonical JSON of instance, seq and
    head (UTF-8)."""
    body = canonical_json({"instance": instance, "seq": seq, "head": head})
    return DOMAIN + body.encode("utf-8", "surrogatepass")


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex characters of SHA-256 over the raw public key (32 bytes)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """An Ed25519 private key that signs checkpoints."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.key_id = key_id(private.public_key())

    @classmethod
    def from_pem(cls, pem: bytes, source: str) -> Signer:
        """Load a PKCS#8 PEM Ed25519 private key (unencrypted, as ``openssl genpkey
        -algorithm ed25519`` or ``credproxy audit keygen`` writes it). ``source`` names
        where it came from in errors. Raises :class:`ConfigError`."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"audit.checkpoint: {source} is not an unencrypted PEM "
                              f"private key ({exc}); make one with `credproxy audit "
                              "keygen`") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"audit.checkpoint: {source} holds a {type(key).__name__}, "
                              "not an Ed25519 key; make one with `credproxy audit keygen`")
        return cls(key)

    @classmethod
    def from_file(cls, path: str) -> Signer:
        """:meth:`from_pem` on a file (a Key Vault secret mounted by the Secrets Store CSI
        driver, a Kubernetes Secret). Raises :class:`ConfigError`."""
        full = os.path.expanduser(path)
        try:
            pem = Path(full).read_bytes()
        except OSError as exc:
            raise ConfigError(f"audit.checkpoint.key_file: cannot read {full}: "
                              f"{exc.strerror}") from None
        return cls.from_pem(pem, f"key_file {full}")

    def public_pem(self) -> str:
        return self._private.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    def detail(self, instance: str, seq: int, head: str) -> str:
        """The checkpoint record's ``detail``: ``seq=S head=H key=K sig=B64URL``."""
        sig = self._private.sign(message(instance, seq, head))
        return f"seq={seq} head={head} key={self.key_id} sig={_b64url(sig)}"


def generate_pem() -> bytes:
    """A new Ed25519 private key, PKCS#8 PEM, unencrypted."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def load_public_keys(paths: Sequence[str]) -> dict[str, Ed25519PublicKey]:
    """Public keys by key id, from PEM files (a public key, or a private key whose public
    half is taken). Raises :class:`ConfigError` naming the file."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"--key {path}: {exc.strerror}") from None
        public: object
        try:
            public = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError):
            try:
                public = serialization.load_pem_private_key(pem, password=None).public_key()
            except (ValueError, TypeError):
                raise ConfigError(f"--key {path}: not a PEM Ed25519 public key") from None
        if not isinstance(public, Ed25519PublicKey):
            raise ConfigError(f"--key {path}: a {type(public).__name__}, not an Ed25519 key")
        keys[key_id(public)] = public
    return keys


@dataclass(frozen=True, slots=True)
class Statement:
    """What a checkpoint record states: record ``seq`` of ``instance`` has hash ``head``."""

    instance: str
    seq: int
    head: str
    key: str
    signature: bytes


def parse(rec: Record) -> Statement | str:
    """The statement of a checkpoint record, or what is wrong with its ``detail``."""
    detail = rec.get("detail")
    match = _DETAIL.fullmatch(detail) if isinstance(detail, str) else None
    if match is None:
        return "checkpoint detail malformed (not 'seq=S head=H key=K sig=S')"
    try:
        sig = _unb64url(match["sig"])
    except (binascii.Error, ValueError):
        return "checkpoint signature is not base64url"
    return Statement(rec["instance"], int(match["seq"]), match["head"], match["key"], sig)


def check_signature(st: Statement, keys: dict[str, Ed25519PublicKey]) -> str | None:
    """None when ``st`` is signed by one of ``keys``; else why not."""
    public = keys.get(st.key)
    if public is None:
        return f"checkpoint signed with key {st.key}, not one given with --key"
    try:
        public.verify(st.signature, message(st.instance, st.seq, st.head))
    except InvalidSignature:
        return "checkpoint signature does not verify (forged or edited)"
    return None


@dataclass(slots=True)
class _Instance:
    last_seq: int = 0
    last_checkpoint: int = 0  # seq of the last valid checkpoint record (0: none)
    hashes: dict[int, str] = field(default_factory=dict)  # seq -> hash, when asked for


@dataclass(frozen=True, slots=True)
class Unproven:
    """Records of one instance after its last valid checkpoint (or all, without one)."""

    instance: str
    records: int
    last_checkpoint: int | None  # seq of that checkpoint record


class CheckpointCheck:
    """Checks checkpoints while :func:`proxy.audit.verify` walks the chain (pass
    :meth:`see` as its ``check``), then :meth:`finish`.

    ``keys``: public keys by id (:func:`load_public_keys`). ``external``: checkpoint
    records from the second sink; each must be signed, and the log must hold the record it
    states with that hash (else records were deleted from the end or rewritten).
    ``allow_partial``: an instance of ``external`` absent from the log is not an error (its
    files were rotated away).
    """

    def __init__(self, keys: dict[str, Ed25519PublicKey],
                 external: Iterable[Record] = (), *, allow_partial: bool = False) -> None:
        self._keys = keys
        self._seen: dict[str, _Instance] = {}
        self._allow_partial = allow_partial
        self.checkpoints = 0  # valid checkpoint records in the log
        self._wanted: dict[str, dict[int, str]] = {}
        self._external: list[Statement] = []
        self.errors: list[str] = []
        for rec in external:
            self._take_external(rec)

    def _take_external(self, rec: Record) -> None:
        where = f"second-sink checkpoint (instance {rec.get('instance')}, seq {rec.get('seq')})"
        if rec.get("event") != AUDIT_CHECKPOINT or not isinstance(rec.get("instance"), str):
            self.errors.append(f"{where}: not a checkpoint record")
            return
        body = {k: v for k, v in rec.items() if k != "hash"}
        prev = rec.get("prev")
        if not isinstance(prev, str) or chain_hash(prev, body) != rec.get("hash"):
            self.errors.append(f"{where}: hash does not match the record (edited)")
            return
        st = parse(rec)
        if isinstance(st, str):
            self.errors.append(f"{where}: {st}")
            return
        problem = self._own_place(rec, st) or check_signature(st, self._keys)
        if problem is not None:
            self.errors.append(f"{where}: {problem}")
            return
        self._external.append(st)
        self._wanted.setdefault(st.instance, {})[st.seq] = st.head

    @staticmethod
    def _own_place(rec: Record, st: Statement) -> str | None:
        if rec.get("seq") != st.seq + 1 or rec.get("prev") != st.head:
            return (f"checkpoint states seq {st.seq} head {st.head[:12]}… but follows seq "
                    f"{rec.get('seq', 0) - 1 if isinstance(rec.get('seq'), int) else '?'} "
                    "(moved or forged)")
        return None

    def see(self, rec: Record) -> str | None:
        """Called for each record whose hash and link verified; a problem or None."""
        inst = self._seen.setdefault(rec["instance"], _Instance())
        seq: int = rec["seq"]
        inst.last_seq = seq
        wanted = self._wanted.get(rec["instance"])
        if wanted is not None and seq in wanted:
            inst.hashes[seq] = rec["hash"]
        if rec.get("event") != AUDIT_CHECKPOINT:
            return None
        st = parse(rec)
        if isinstance(st, str):
            return st
        problem = self._own_place(rec, st) or check_signature(st, self._keys)
        if problem is None:
            self.checkpoints += 1
            inst.last_checkpoint = seq
        return problem

    def finish(self) -> tuple[list[str], list[Unproven]]:
        """``(errors, unproven)``: errors (second-sink checkpoints that the log
        contradicts, bad second-sink records) and, per instance with records after its
        last checkpoint, how many."""
        errors = list(self.errors)
        for st in self._external:
            inst = self._seen.get(st.instance)
            if inst is None:
                if not self._allow_partial:
                    errors.append(f"instance {st.instance}: a second-sink checkpoint states "
                                  f"seq {st.seq} but the log has no record of this instance "
                                  "(deleted? --allow-partial if its files were rotated away)")
                continue
            if inst.last_seq <= st.seq:
                errors.append(f"instance {st.instance}: the log ends at seq {inst.last_seq} "
                              f"but a second-sink checkpoint states seq {st.seq + 1} "
                              "(the newest records were deleted)")
            elif inst.hashes.get(st.seq) not in (None, st.head):
                errors.append(f"instance {st.instance}: record seq {st.seq} has another hash "
                              "than a second-sink checkpoint states (rewritten)")
        unproven = [Unproven(name, inst.last_seq - inst.last_checkpoint,
                             inst.last_checkpoint or None)
                    for name, inst in self._seen.items()
                    if inst.last_seq > inst.last_checkpoint]
        return errors, unproven


class ExternalUnusable(ValueError):
    """A second-sink file that cannot prove anything (empty, or a line that is not a JSON
    record): the proof against deleting the newest records would silently be missing."""


def read_external(paths: Sequence[str]) -> list[Record]:
    """The records in second-sink files (``audit.checkpoint.sink``). Raises
    :class:`ExternalUnusable` for a file with no record or with a line that is not one
    (damaged, cut, or not that file), and :class:`OSError` for one that cannot be read."""
    out: list[Record] = []
    for path in paths:
        found = 0
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, rec, err in parse_lines(f):
                if rec is None:
                    raise ExternalUnusable(f"{path} line {number} is not a checkpoint "
                                           f"record ({err}): the file is damaged or not "
                                           "the checkpoint sink")
                found += 1
                out.append(rec)
        if not found:
            raise ExternalUnusable(f"{path} holds no checkpoint: it proves nothing (emptied, "
                                   "or not the checkpoint sink)")
    return out
