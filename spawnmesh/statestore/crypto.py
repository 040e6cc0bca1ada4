"""Encryption at rest for actor state: AES-256-GCM under a keyring with key ids (for rotation).

Every state is sealed with a fresh random 96-bit nonce; the authenticated data binds the ciphertext
to its actor (system, name) and revision, so a row copied onto another actor or another revision
fails to open (``StateCorrupt``) instead of being accepted.

Key sources (config maps ``SPAWNMESH_STATESTORE_KEY`` / ``SPAWN_STATESTORE_KEY`` to ``key``):

* ``key``: base64 of 32 random bytes. Its id is derived from the key (``k`` + 8 hex digits of its
  SHA-256), so the same key always has the same id. Several keys may be given separated by commas,
  each as ``id:base64`` or bare base64; the last one is the newest.
* ``key_file``: a text file with one ``id:base64key`` per line, the last line is the newest (the one
  that encrypts); blank lines and lines starting with ``#`` are ignored. Ids are 1-32 characters of
  ``A-Z a-z 0-9 _ . -``; ``plain`` is reserved for unencrypted rows.

Rotation: append a new line to the key file, restart, call ``rotate_keys()`` on the store, and
remove the old line once it reports nothing left under the old id.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from spawnmesh.errors import ConfigError, StateCorrupt

PLAIN_KEY_ID = "plain"
"""Key id stored with rows written without encryption (allow_plaintext)."""

NONCE_BYTES = 12
KEY_BYTES = 32
_KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,32}$")
_AAD_PREFIX = b"spawnmesh.state.v1\x00"
_URLSAFE = str.maketrans("-_", "+/")


def state_aad(system: str, name: str, revision: int) -> bytes:
    """Authenticated data of one state row: actor identity and revision, unambiguously framed:
    prefix, then length-prefixed (u32 big-endian) system and name, then the revision (i64)."""
    s = system.encode()
    n = name.encode()
    return b"%b%b%b%b%b%b" % (
        _AAD_PREFIX, _U32(len(s)), s, _U32(len(n)), n, _I64(revision)
    )


def schedule_aad(schedule_id: str) -> bytes:
    """Authenticated data of a kept schedule's payload: its id."""
    return b"spawnmesh.schedule.v1\x00" + schedule_id.encode()


_U32 = struct.Struct(">I").pack
_I64 = struct.Struct(">q").pack


def derived_key_id(key: bytes) -> str:
    """Stable id of a key given without one: ``k`` + 8 hex digits of its SHA-256."""
    return "k" + hashlib.sha256(b"spawnmesh.keyid\x00" + key).hexdigest()[:8]


def _decode_key(text: str, setting: str, where: str) -> bytes:
    text = text.strip()
    try:  # standard or URL-safe alphabet
        raw = base64.b64decode(text.translate(_URLSAFE), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            setting,
            f"{where}: not valid base64 (expected base64 of {KEY_BYTES} random "
            "bytes, e.g. from `openssl rand -base64 32`)",
        ) from None
    if len(raw) != KEY_BYTES:
        raise ConfigError(
            setting,
            f"{where}: key decodes to {len(raw)} bytes, AES-256 needs exactly "
            f"{KEY_BYTES} (base64 of 32 random bytes, e.g. `openssl rand -base64 32`)",
        )
    return raw


def _parse_entry(entry: str, setting: str, where: str, allow_bare: bool) -> tuple[str, bytes]:
    entry = entry.strip()
    if ":" in entry:
        key_id, _, b64 = entry.partition(":")
        key_id = key_id.strip()
        if not _KEY_ID_RE.match(key_id):
            raise ConfigError(
                setting, f"{where}: key id {key_id!r} must be 1-32 characters of A-Z a-z 0-9 _ . -"
            )
        if key_id == PLAIN_KEY_ID:
            raise ConfigError(setting, f"{where}: key id 'plain' is reserved for unencrypted rows")
        return key_id, _decode_key(b64, setting, where)
    if not allow_bare:
        raise ConfigError(setting, f"{where}: expected 'id:base64key'")
    key = _decode_key(entry, setting, where)
    return derived_key_id(key), key


@dataclass(frozen=True, slots=True)
class Sealed:
    """A sealed state: the key id that sealed it and nonce + ciphertext + tag."""

    key_id: str
    data: bytes


class Keyring:
    """Named AES-256-GCM keys: the newest seals, any known id opens."""

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ConfigError("statestore.key", "the keyring needs at least one key")
        self._aead: dict[str, AESGCM] = {}
        for key_id, key in keys:
            if len(key) != KEY_BYTES:
                raise ConfigError("statestore.key", f"key {key_id!r} is not {KEY_BYTES} bytes")
            if key_id in self._aead:
                raise ConfigError("statestore.key", f"key id {key_id!r} appears twice")
            self._aead[key_id] = AESGCM(key)
        self.newest_id = keys[-1][0]
        """Id of the key that seals new writes."""
        self._newest = self._aead[self.newest_id]

    @property
    def key_ids(self) -> list[str]:
        """All known key ids, oldest first."""
        return list(self._aead)

    @classmethod
    def parse(cls, text: str, *, setting: str = "statestore.key") -> Keyring:
        """Keys from a config string: comma- or newline-separated ``id:base64`` or bare base64."""
        entries = [e for e in re.split(r"[,\n]", text) if e.strip()]
        if not entries:
            raise ConfigError(setting, "empty key (expected base64 of 32 random bytes)")
        keys = [
            _parse_entry(e, setting, f"key #{i + 1}", allow_bare=True)
            for i, e in enumerate(entries)
        ]
        return cls(keys)

    @classmethod
    def from_file(cls, path: str | Path) -> Keyring:
        """Keys from a key file: one ``id:base64key`` per line, last line newest."""
        setting = "statestore.key_file"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(setting, f"cannot read key file {path}: {exc.strerror}") from None
        keys: list[tuple[str, bytes]] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            keys.append(_parse_entry(line, setting, f"{path}:{lineno}", allow_bare=False))
        if not keys:
            raise ConfigError(setting, f"key file {path} holds no keys (one 'id:base64key' a line)")
        return cls(keys)

    def seal(self, plaintext: bytes, aad: bytes) -> Sealed:
        """Encrypt under the newest key with a fresh random nonce."""
        nonce = os.urandom(NONCE_BYTES)
        return Sealed(self.newest_id, nonce + self._newest.encrypt(nonce, plaintext, aad))

    def seal_many(self, items: list[tuple[bytes, bytes]]) -> tuple[str, list[bytes]]:
        """Seal several (plaintext, aad) pairs under the newest key: its id and the sealed
        bytes in order (one random read for every nonce of the batch)."""
        nonces = os.urandom(NONCE_BYTES * len(items))
        enc = self._newest.encrypt
        out = []
        for i, (plaintext, aad) in enumerate(items):
            nonce = nonces[i * NONCE_BYTES : (i + 1) * NONCE_BYTES]
            out.append(nonce + enc(nonce, plaintext, aad))
        return self.newest_id, out

    def open(self, key_id: str, data: bytes, aad: bytes) -> bytes:
        """Decrypt ``data`` sealed under ``key_id``; StateCorrupt if unknown key or tampered."""
        aead = self._aead.get(key_id)
        if aead is None:
            raise StateCorrupt(
                f"sealed under key id {key_id!r}, which this node does not have "
                f"(known: {', '.join(self._aead)})"
            )
        if len(data) < NONCE_BYTES + 16:
            raise StateCorrupt(f"ciphertext of {len(data)} bytes is too short")
        try:
            return aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], aad)
        except InvalidTag:
            raise StateCorrupt(
                f"authentication failed under key id {key_id!r} (wrong key, tampered row, "
                "or a row copied from another actor or revision)"
            ) from None


def load_keyring(key: str = "", key_file: str = "") -> Keyring | None:
    """The keyring configured by ``key`` or ``key_file`` (not both), or None if neither is set."""
    if key.strip() and key_file.strip():
        raise ConfigError(
            "statestore.key",
            "set either statestore.key or statestore.key_file, not both "
            "(put every key in the key file, newest last)",
        )
    if key_file.strip():
        return Keyring.from_file(key_file.strip())
    if key.strip():
        return Keyring.parse(key)
    return None
