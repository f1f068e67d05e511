"""The vault key: loading it from an env var or a file, and deriving per-purpose subkeys.

The key is 32 random bytes, written as base64 (standard or URL-safe, padding optional) or
as 64 hex characters. Error messages name where the key was looked for, never its value.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.errors import VaultKeyError

KEY_BYTES: Final = 32
_HEX_DIGITS: Final = frozenset(string.hexdigits)


def load_key(
    *,
    key_env: str | None,
    key_file: str | os.PathLike[str] | None,
    environ: Mapping[str, str] = os.environ,
) -> bytes:
    """Return the 32-byte vault key from the env var ``key_env`` or the file ``key_file``.

    When both are named, a set, non-empty env var wins (so a deployment can override a
    mounted file); otherwise the file is read. Raises :class:`VaultKeyError`.
    """
    if key_env is not None and environ.get(key_env, "").strip():
        return _decode(environ[key_env], f"env var {key_env}")
    if key_file is not None:
        path = Path(key_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise VaultKeyError(f"cannot read vault key file {path}: {why}") from None
        return _decode(text, f"file {path}")
    if key_env is not None:
        raise VaultKeyError(f"vault key env var {key_env} is not set or is empty")
    raise VaultKeyError("no vault key configured (set vault.key_env or vault.key_file)")


def generate_key() -> str:
    """A new random key in the form :func:`load_key` reads (for ``credproxy`` operators)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def derive_subkey(key: bytes, purpose: str) -> bytes:
    """A 32-byte key for ``purpose`` (HKDF-SHA256), independent of every other purpose.

    Components that need their own key (record encryption, audit fingerprints) derive it
    here, so the one operator-held key is never used for two jobs directly.
    """
    if len(key) != KEY_BYTES:
        raise VaultKeyError(f"vault key must be {KEY_BYTES} bytes")
    if not purpose:
        raise ValueError("purpose must be a non-empty string")
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=b"credproxy/" + purpose.encode("utf-8"),
    )
    return hkdf.derive(key)


def _decode(text: str, source: str) -> bytes:
    value = text.strip()
    malformed = VaultKeyError(
        f"vault key from {source} is not {KEY_BYTES} bytes "
        f"(expected base64 or {2 * KEY_BYTES} hex characters)"
    )
    if not value:
        raise VaultKeyError(f"vault key from {source} is empty")
    # Hex first: 64 hex characters are also valid base64 (of 48 bytes).
    if len(value) == 2 * KEY_BYTES and _HEX_DIGITS.issuperset(value):
        return bytes.fromhex(value)
    try:
        # Accept both alphabets and missing padding; validate=True rejects stray characters.
        std = value.replace("-", "+").replace("_", "/")
        key = base64.b64decode(std + "=" * (-len(std) % 4), validate=True)
    except (binascii.Error, ValueError):
        # `from None`: the decoder's message is harmless, but the key never travels anywhere.
        raise malformed from None
    if len(key) != KEY_BYTES:
        raise malformed
    return key
