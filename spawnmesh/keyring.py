"""Named AES-256-GCM keys shared by everything that seals bytes (state at rest, cluster packets,
the peer-wire handshake): the newest key seals, any known key id opens, so keys rotate by adding
a new one first and removing the old one later.

Grammar (the same for every user, so one key file format serves all):

* a config string: comma- or newline-separated entries, each ``id:base64`` or bare base64 (a bare
  key gets the id ``k`` + 8 hex digits of its SHA-256, so the same key always has the same id);
  the last one is the newest.
* a key file: one ``id:base64key`` per line, the last line is the newest; blank lines and lines
  starting with ``#`` are ignored.

Keys are base64 (standard or URL-safe) of exactly 32 random bytes. Ids are 1-32 characters of
``A-Z a-z 0-9 _ . -``; ``plain`` is reserved (it marks unencrypted statestore rows).

Sans-IO apart from reading the key file: the nonce comes from ``os.urandom``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from spawnmesh.errors import ConfigError, ProtocolError, SpawnmeshError

PLAIN_KEY_ID = "plain"
"""Reserved key id (statestore rows written without encryption); never a real key's id."""

NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,32}$")
_URLSAFE = str.maketrans("-_", "+/")


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
        if not KEY_ID_RE.match(key_id):
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
    """Sealed bytes: the key id that sealed them and nonce + ciphertext + tag."""

    key_id: str
    data: bytes


class Keyring:
    """Named AES-256-GCM keys: the newest seals, any known id opens.

    ``open`` raises ``open_error`` (a subclass picks its own: the statestore's is StateCorrupt);
    ``setting`` names the configuration setting in ConfigErrors."""

    open_error: ClassVar[type[SpawnmeshError]] = ProtocolError
    default_setting: ClassVar[str] = "key"
    default_file_setting: ClassVar[str] = "key_file"

    def __init__(self, keys: list[tuple[str, bytes]], *, setting: str = "") -> None:
        setting = setting or self.default_setting
        if not keys:
            raise ConfigError(setting, "the keyring needs at least one key")
        self._aead: dict[str, AESGCM] = {}
        for key_id, key in keys:
            if len(key) != KEY_BYTES:
                raise ConfigError(setting, f"key {key_id!r} is not {KEY_BYTES} bytes")
            if key_id in self._aead:
                raise ConfigError(setting, f"key id {key_id!r} appears twice")
            self._aead[key_id] = AESGCM(key)
        self.newest_id = keys[-1][0]
        """Id of the key that seals new data."""
        self._newest = self._aead[self.newest_id]
        self._material = tuple(keys)

    def export(self) -> list[tuple[str, bytes]]:
        """The keys as (id, key bytes), oldest first: to rebuild this keyring in a child process
        (the statestore's writer process seals there). Never log or persist the result."""
        return list(self._material)

    @property
    def key_ids(self) -> list[str]:
        """All known key ids, oldest first."""
        return list(self._aead)

    def has(self, key_id: str) -> bool:
        """Whether this keyring holds a key with this id."""
        return key_id in self._aead

    @classmethod
    def parse(cls, text: str, *, setting: str = "") -> Self:
        """Keys from a config string: comma- or newline-separated ``id:base64`` or bare base64."""
        setting = setting or cls.default_setting
        entries = [e for e in re.split(r"[,\n]", text) if e.strip()]
        if not entries:
            raise ConfigError(setting, "empty key (expected base64 of 32 random bytes)")
        keys = [
            _parse_entry(e, setting, f"key #{i + 1}", allow_bare=True)
            for i, e in enumerate(entries)
        ]
        return cls(keys, setting=setting)

    @classmethod
    def from_file(cls, path: str | Path, *, setting: str = "") -> Self:
        """Keys from a key file: one ``id:base64key`` per line, last line newest."""
        setting = setting or cls.default_file_setting
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
        return cls(keys, setting=setting)

    @classmethod
    def load(
        cls, key: str = "", key_file: str = "", *, setting: str = "", file_setting: str = ""
    ) -> Self | None:
        """The keyring configured by ``key`` or ``key_file`` (not both), or None if neither."""
        setting = setting or cls.default_setting
        file_setting = file_setting or cls.default_file_setting
        if key.strip() and key_file.strip():
            raise ConfigError(
                setting,
                f"set either {setting} or {file_setting}, not both "
                "(put every key in the key file, newest last)",
            )
        if key_file.strip():
            return cls.from_file(key_file.strip(), setting=file_setting)
        if key.strip():
            return cls.parse(key, setting=setting)
        return None

    def seal(self, plaintext: bytes, aad: bytes) -> Sealed:
        """Encrypt under the newest key with a fresh random nonce."""
        nonce = os.urandom(NONCE_BYTES)
        return Sealed(self.newest_id, nonce + self._newest.encrypt(nonce, plaintext, aad))

    def seal_many(
        self, plaintexts: Sequence[bytes], aads: Sequence[bytes]
    ) -> tuple[str, list[bytes]]:
        """Seal plaintexts, each with its authenticated data, under the newest key: its id and
        the sealed bytes in order (one random read for every nonce of the batch)."""
        if len(plaintexts) != len(aads):
            raise ValueError("seal_many needs one authenticated data per plaintext")
        size = NONCE_BYTES * len(plaintexts)
        pool = os.urandom(size)
        nonces = [pool[i : i + NONCE_BYTES] for i in range(0, size, NONCE_BYTES)]
        enc = self._newest.encrypt
        return self.newest_id, [
            n + enc(n, p, a) for n, p, a in zip(nonces, plaintexts, aads, strict=True)
        ]

    def open(self, key_id: str, data: bytes, aad: bytes) -> bytes:
        """Decrypt ``data`` sealed under ``key_id``; ``open_error`` if unknown key or tampered."""
        aead = self._aead.get(key_id)
        if aead is None:
            raise self.open_error(
                f"sealed under key id {key_id!r}, which this node does not have "
                f"(known: {', '.join(self._aead)})"
            )
        if len(data) < NONCE_BYTES + TAG_BYTES:
            raise self.open_error(f"ciphertext of {len(data)} bytes is too short")
        try:
            return aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], aad)
        except InvalidTag:
            raise self.open_error(
                f"authentication failed under key id {key_id!r} (wrong key, tampered data, "
                "or data sealed for another purpose)"
            ) from None
