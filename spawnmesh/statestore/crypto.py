"""Encryption at rest for actor state: AES-256-GCM under a keyring with key ids (for rotation).

The keyring itself is generic (``spawnmesh.keyring``); this module adds the statestore's
authenticated data, settings and error (StateCorrupt) and re-exports the rest.

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

import struct
from collections.abc import Iterable
from typing import ClassVar

from spawnmesh.errors import SpawnmeshError, StateCorrupt
from spawnmesh.keyring import KEY_BYTES, NONCE_BYTES, PLAIN_KEY_ID, Sealed, derived_key_id
from spawnmesh.keyring import Keyring as _GenericKeyring

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "PLAIN_KEY_ID",
    "Keyring",
    "Sealed",
    "derived_key_id",
    "load_keyring",
    "schedule_aad",
    "state_aad",
    "state_aads",
]

_AAD_PREFIX = b"spawnmesh.state.v1\x00"


def state_aad(system: str, name: str, revision: int) -> bytes:
    """Authenticated data of one state row: actor identity and revision, unambiguously framed:
    prefix, then length-prefixed (u32 big-endian) system and name, then the revision (i64)."""
    s = system.encode()
    n = name.encode()
    return b"%b%b%b%b%b%b" % (
        _AAD_PREFIX, _U32(len(s)), s, _U32(len(n)), n, _I64(revision)
    )


def state_aads(rows: Iterable[tuple[str, str, int]]) -> list[bytes]:
    """``state_aad`` of many (system, name, revision) rows, the framed system computed once
    per distinct system (the writer's batches are mostly one system)."""
    out: list[bytes] = []
    append = out.append
    heads: dict[str, bytes] = {}
    for system, name, revision in rows:
        head = heads.get(system)
        if head is None:
            s = system.encode()
            head = heads[system] = _AAD_PREFIX + _U32(len(s)) + s
        n = name.encode()
        append(b"%b%b%b%b" % (head, _U32(len(n)), n, _I64(revision)))
    return out


def schedule_aad(schedule_id: str) -> bytes:
    """Authenticated data of a kept schedule's payload: its id."""
    return b"spawnmesh.schedule.v1\x00" + schedule_id.encode()


_U32 = struct.Struct(">I").pack
_I64 = struct.Struct(">q").pack


class Keyring(_GenericKeyring):
    """The generic keyring (``spawnmesh.keyring``) with the statestore's settings and error: a
    row that fails to open is StateCorrupt (only that actor is affected)."""

    open_error: ClassVar[type[SpawnmeshError]] = StateCorrupt
    default_setting: ClassVar[str] = "statestore.key"
    default_file_setting: ClassVar[str] = "statestore.key_file"


def load_keyring(key: str = "", key_file: str = "") -> Keyring | None:
    """The keyring configured by ``key`` or ``key_file`` (not both), or None if neither is set."""
    return Keyring.load(key, key_file)
