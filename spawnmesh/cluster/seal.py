"""Packet security for the membership transport (sans-IO): every datagram and every TCP frame is
wrapped in a small versioned header and, with a cluster key, sealed with AES-256-GCM.

Layout (version 1)::

    magic "sM" (2) | version (1) | flags (1) | cluster tag (4) | key id length (1) | key id (n)
    then, sealed:   nonce (12) | ciphertext | tag (16)      (flags bit 0 set)
    or, plain:      the packet as is                        (no cluster key configured)

The cluster tag is the first 4 bytes of BLAKE2b(cluster name), so a packet of another cluster is
told apart even without a key. When sealed, the authenticated data is the header, one byte for
the channel (UDP or TCP, so a datagram cannot be replayed as a stream frame) and the whole
cluster name: a node with another cluster name or a wrong key fails to open it. The newest key
of the keyring seals; any key the keyring knows opens (rotation: add the new key everywhere,
then make it newest, then drop the old one).

:meth:`PacketSealer.open` returns the packet or raises :class:`PacketRejected` (one error type,
with a ``reason``); nothing that fails reaches the SWIM core. There is no replay protection (as in
memberlist): SWIM news is idempotent and incarnation-ordered.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Final

from spawnmesh.errors import PacketRejected
from spawnmesh.keyring import NONCE_BYTES, TAG_BYTES, Keyring

MAGIC: Final = b"sM"
VERSION: Final = 1
"""Header version this code writes and reads."""
FLAG_SEALED: Final = 0x01
_KNOWN_FLAGS: Final = FLAG_SEALED
_FIXED: Final = len(MAGIC) + 1 + 1 + 4 + 1
MAX_OVERHEAD: Final = _FIXED + 32 + NONCE_BYTES + TAG_BYTES
"""Most bytes the wrapping adds to a packet (a 32-character key id)."""


class Channel(enum.IntEnum):
    """What carries the packet; part of the authenticated data."""

    UDP = 0
    TCP = 1


class Reason(enum.Enum):
    """Why a packet was rejected (the values are what logs and counters show)."""

    MALFORMED = "malformed"
    """Not a spawnmesh membership packet: bad magic, truncated header, unknown flags."""
    UNSUPPORTED_VERSION = "unsupported version"
    WRONG_CLUSTER = "wrong cluster"
    NOT_ENCRYPTED = "not encrypted"
    """A plaintext packet reached a node that has a cluster key."""
    UNEXPECTED_ENCRYPTION = "encrypted but no key here"
    UNKNOWN_KEY_ID = "unknown key id"
    BAD_TAG = "bad tag"
    """Authentication failed: wrong key under a known id, another cluster name, tampering."""


def cluster_tag(name: str) -> bytes:
    """The 4-byte tag of a cluster name carried in every header."""
    return hashlib.blake2b(name.encode(), digest_size=4).digest()


def _reject(reason: Reason, detail: str) -> PacketRejected:
    return PacketRejected(f"{reason.value}: {detail}", reason.value)


class PacketSealer:
    """Wraps and unwraps packets of one cluster (``keyring`` None: unauthenticated mode)."""

    def __init__(self, cluster: str, keyring: Keyring | None) -> None:
        self.cluster = cluster
        self.keyring = keyring
        self._name = cluster.encode()
        self._tag = cluster_tag(cluster)
        self._plain_header = MAGIC + bytes((VERSION, 0)) + self._tag + b"\x00"

    @property
    def encrypted(self) -> bool:
        """Whether packets are sealed (a cluster key is configured)."""
        return self.keyring is not None

    def _header(self, flags: int, key_id: bytes) -> bytes:
        return MAGIC + bytes((VERSION, flags)) + self._tag + bytes((len(key_id),)) + key_id

    def seal(self, packet: bytes, channel: Channel) -> bytes:
        """Wrap one packet for ``channel``: sealed under the newest key, or plain with a header."""
        ring = self.keyring
        if ring is None:
            return self._plain_header + packet
        header = self._header(FLAG_SEALED, ring.newest_id.encode())
        sealed = ring.seal(packet, header + bytes((channel,)) + self._name)
        return header + sealed.data

    def open(self, data: bytes, channel: Channel) -> bytes:
        """Unwrap one packet received on ``channel``; :class:`PacketRejected` if it must not be
        processed (the reason names what was wrong)."""
        if len(data) < _FIXED or data[:2] != MAGIC:
            raise _reject(Reason.MALFORMED, "not a spawnmesh membership packet")
        version, flags = data[2], data[3]
        if version != VERSION:
            raise _reject(Reason.UNSUPPORTED_VERSION, f"version {version}, this node speaks 1")
        if flags & ~_KNOWN_FLAGS:
            raise _reject(Reason.MALFORMED, f"unknown header flags {flags:#04x}")
        if data[4:8] != self._tag:
            raise _reject(
                Reason.WRONG_CLUSTER, f"tag {data[4:8].hex()} is not cluster {self.cluster!r}"
            )
        id_len = data[8]
        start = _FIXED + id_len
        if len(data) < start:
            raise _reject(Reason.MALFORMED, "truncated header")
        ring = self.keyring
        if not flags & FLAG_SEALED:
            if ring is not None:
                raise _reject(Reason.NOT_ENCRYPTED, "plaintext packet; this cluster uses a key")
            if id_len:
                raise _reject(Reason.MALFORMED, "plaintext packet with a key id")
            return data[start:]
        try:
            key_id = data[_FIXED:start].decode("ascii")
        except UnicodeDecodeError:
            raise _reject(Reason.MALFORMED, "key id is not ASCII") from None
        if ring is None:
            raise _reject(
                Reason.UNEXPECTED_ENCRYPTION, f"sealed under key id {key_id!r}; no key here"
            )
        if not ring.has(key_id):
            raise _reject(Reason.UNKNOWN_KEY_ID, f"{key_id!r} (known: {', '.join(ring.key_ids)})")
        body = data[start:]
        if len(body) < NONCE_BYTES + TAG_BYTES:
            raise _reject(Reason.MALFORMED, f"sealed body of {len(body)} bytes is too short")
        try:
            return ring.open(key_id, body, data[:start] + bytes((channel,)) + self._name)
        except ring.open_error:
            raise _reject(
                Reason.BAD_TAG, f"authentication failed under key id {key_id!r}"
            ) from None
