"""Peer-wire handshake (sans-IO): version negotiation, cluster and identity checks, and mutual
proof of the cluster key by challenge-response.

Transcript (spec/wire.md, "Handshake")::

    client -> server   Hello    (versions, cluster, node id, incarnation, nonce, key id, limits)
    server -> client   Welcome  (version, cluster, node id, incarnation, nonce, key id, limits)
    server -> client   Proof    (key id, AEAD tag over "server" + H)
    client -> server   Proof    (key id, AEAD tag over "client" + H)
    server -> client   Ready

``H`` is SHA-256 over the exact Hello and Welcome bodies (so both nonces, both version ranges
and both identities are bound, and a downgrade or replay fails). A proof is an AES-256-GCM seal
of nothing under the sender's newest key with ``label + role + H`` as authenticated data; the
receiver opens it under the named key id. Without a keyring a side sends an empty Proof and
accepts only an empty one. Either side that finds a problem raises a typed error and leaves the
body of a Reject in ``reject`` for the shell to send before closing; a Reject received becomes
its typed error. The machines take frame bodies and return frame bodies; nonces come in from
the caller, so they hold no randomness, clock or socket.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final, TypeVar

from spawnmesh.errors import (
    AuthenticationFailed,
    ClusterMismatch,
    PeerUnavailable,
    ProtocolError,
    SpawnmeshError,
    VersionMismatch,
)
from spawnmesh.keyring import Keyring
from spawnmesh.wire import messages as m

HANDSHAKE_MAX_FRAME_BYTES: Final = 16 * 1024
"""Largest frame accepted before the session opens (unauthenticated input stays small)."""
MIN_FRAME_BYTES: Final = 1024
"""Smallest max frame size a peer may announce."""
_M = TypeVar("_M", bound=m.Message)
_TRANSCRIPT_LABEL: Final = b"spawnmesh.wire.transcript.v1\x00"
_PROOF_LABEL: Final = b"spawnmesh.wire.proof.v1\x00"


@dataclass(frozen=True, slots=True)
class HandshakeConfig:
    """This node's side of a handshake."""

    cluster: str
    node_id: str
    incarnation: int
    keyring: Keyring | None = None
    max_frame_bytes: int = 4 * 1024 * 1024
    max_in_flight: int = 1024
    version_min: int = m.PROTOCOL_VERSION_MIN
    version_max: int = m.PROTOCOL_VERSION_MAX


@dataclass(frozen=True, slots=True)
class Session:
    """What a completed handshake established about the peer."""

    version: int
    peer_node_id: str
    peer_incarnation: int
    peer_max_frame_bytes: int
    peer_max_in_flight: int
    peer_key_id: str
    """Key id the peer proved ("" when unauthenticated)."""


def negotiate(lo_a: int, hi_a: int, lo_b: int, hi_b: int) -> int:
    """Highest version in both ranges; VersionMismatch if they do not overlap."""
    lo, hi = max(lo_a, lo_b), min(hi_a, hi_b)
    if lo > hi:
        raise VersionMismatch(
            f"no common protocol version: peer speaks {lo_b}..{hi_b}, this node {lo_a}..{hi_a}"
        )
    return hi


def transcript(hello: bytes, welcome: bytes) -> bytes:
    """SHA-256 over both bodies, each length-prefixed (unambiguous)."""
    h = hashlib.sha256(_TRANSCRIPT_LABEL)
    for part in (hello, welcome):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def _aad(role: bytes, digest: bytes) -> bytes:
    return _PROOF_LABEL + role + b"\x00" + digest


def make_proof(keyring: Keyring | None, role: bytes, digest: bytes) -> m.Proof:
    """This side's Proof (empty without a keyring)."""
    if keyring is None:
        return m.Proof()
    sealed = keyring.seal(b"", _aad(role, digest))
    return m.Proof(sealed.key_id, sealed.data)


def check_proof(
    keyring: Keyring | None, proof: m.Proof, role: bytes, digest: bytes, peer: str
) -> None:
    """Verify the peer's Proof; AuthenticationFailed unless both sides agree on the key."""
    if keyring is None:
        if proof.key_id or proof.proof:
            raise AuthenticationFailed(
                f"peer {peer} authenticates with key id {proof.key_id!r} but this node has no "
                "cluster key"
            )
        return
    if not proof.key_id:
        raise AuthenticationFailed(
            f"peer {peer} sent no proof of the cluster key, which this node requires"
        )
    try:
        plain = keyring.open(proof.key_id, proof.proof, _aad(role, digest))
    except SpawnmeshError as exc:
        raise AuthenticationFailed(f"peer {peer} failed to prove the cluster key: {exc}") from None
    if plain:
        raise AuthenticationFailed(f"peer {peer} sent a malformed proof")


def _check_limits(max_frame: int, max_in_flight: int, peer: str) -> None:
    if max_frame < MIN_FRAME_BYTES or max_in_flight < 1:
        raise ProtocolError(
            f"peer {peer} announces unusable limits (max frame {max_frame} bytes, "
            f"max in flight {max_in_flight})"
        )


class _Machine:
    """Shared state: the outcome, and the Reject to send when this side failed."""

    def __init__(self, config: HandshakeConfig, nonce: bytes) -> None:
        if not 16 <= len(nonce) <= 64:
            raise ValueError("nonce must be 16..64 bytes")
        if config.version_min > config.version_max:
            raise ValueError("version_min must not exceed version_max")
        self.config = config
        self.nonce = nonce
        self.session: Session | None = None
        """Set once the handshake completed."""
        self.reject: bytes | None = None
        """Body of the Reject to send before closing, after this side raised."""
        self._failed = False
        self.rejected_by_peer = False
        """The peer sent a Reject (nothing to send back)."""

    @property
    def done(self) -> bool:
        """Whether the session is open."""
        return self.session is not None

    def _fail(self, exc: SpawnmeshError, *, from_peer: bool = False) -> SpawnmeshError:
        self._failed = True
        self.rejected_by_peer = from_peer
        if not from_peer:
            self.reject = m.encode(m.Reject(exc.code, str(exc)))
        return exc

    def _decode(self, body: bytes, tp: type[_M]) -> _M:
        if self._failed or self.done:
            raise ProtocolError("handshake already finished")
        msg = m.decode(body)
        if isinstance(msg, tp):
            return msg
        if isinstance(msg, m.Reject):
            raise self._fail(m.rejected(msg), from_peer=True)
        got = type(msg).__name__ if msg is not None else "an unknown message type"
        raise self._fail(ProtocolError(f"handshake: expected {tp.__name__}, got {got}"))


class ClientHandshake(_Machine):
    """The dialing side. ``expect_node_id``: the node the caller meant to reach (None: any).

    Expects, in order: Welcome, the server's Proof, Ready."""

    def __init__(
        self, config: HandshakeConfig, nonce: bytes, expect_node_id: str | None = None
    ) -> None:
        super().__init__(config, nonce)
        self.expect_node_id = expect_node_id
        self._hello = b""
        self._welcome: m.Welcome | None = None
        self._digest = b""
        self._peer_key_id: str | None = None

    def start(self) -> list[bytes]:
        """The first frame body: Hello."""
        c = self.config
        self._hello = m.encode(
            m.Hello(
                c.version_min,
                c.version_max,
                c.cluster,
                c.node_id,
                c.incarnation,
                self.nonce,
                c.keyring.newest_id if c.keyring else "",
                c.max_frame_bytes,
                c.max_in_flight,
            )
        )
        return [self._hello]

    def receive(self, body: bytes) -> list[bytes]:
        """Feed one frame body from the server; returns bodies to send."""
        if not self._hello:
            raise ProtocolError("handshake: start() first")
        if self._welcome is None:
            return self._on_welcome(body)
        if self._peer_key_id is None:
            return self._on_proof(body, self._welcome)
        self._decode(body, m.Ready)
        w = self._welcome
        self.session = Session(
            w.version,
            w.node_id,
            w.incarnation,
            w.max_frame_bytes,
            w.max_in_flight,
            self._peer_key_id,
        )
        return []

    def _on_welcome(self, body: bytes) -> list[bytes]:
        c = self.config
        w = self._decode(body, m.Welcome)
        try:
            if w.cluster != c.cluster:
                raise ClusterMismatch(
                    f"peer {w.node_id} is in cluster {w.cluster!r}, this node in {c.cluster!r}"
                )
            if not c.version_min <= w.version <= c.version_max:
                raise VersionMismatch(
                    f"peer {w.node_id} chose protocol version {w.version}, this node speaks "
                    f"{c.version_min}..{c.version_max}"
                )
            if self.expect_node_id is not None and w.node_id != self.expect_node_id:
                raise PeerUnavailable(
                    f"the address of node {self.expect_node_id} is served by node {w.node_id}"
                )
            if w.node_id == c.node_id:
                raise ProtocolError(f"node {c.node_id} connected to itself")
            _check_limits(w.max_frame_bytes, w.max_in_flight, w.node_id)
        except SpawnmeshError as exc:
            raise self._fail(exc) from None
        self._welcome = w
        self._digest = transcript(self._hello, bytes(body))
        return []

    def _on_proof(self, body: bytes, w: m.Welcome) -> list[bytes]:
        proof = self._decode(body, m.Proof)
        try:
            check_proof(self.config.keyring, proof, b"server", self._digest, w.node_id)
        except SpawnmeshError as exc:
            raise self._fail(exc) from None
        self._peer_key_id = proof.key_id
        return [m.encode(make_proof(self.config.keyring, b"client", self._digest))]


class ServerHandshake(_Machine):
    """The accepting side."""

    def __init__(self, config: HandshakeConfig, nonce: bytes) -> None:
        super().__init__(config, nonce)
        self._hello: m.Hello | None = None
        self._digest = b""
        self.peer_node_id = ""
        """The client's node id, once its Hello arrived (for logs)."""

    def receive(self, body: bytes) -> list[bytes]:
        """Feed one frame body from the client; returns bodies to send."""
        c = self.config
        if self._hello is None:
            h = self._decode(body, m.Hello)
            self.peer_node_id = h.node_id
            try:
                if h.cluster != c.cluster:
                    raise ClusterMismatch(
                        f"peer {h.node_id} is in cluster {h.cluster!r}, this node in {c.cluster!r}"
                    )
                if h.version_min > h.version_max:
                    raise ProtocolError(
                        f"peer {h.node_id} sent an empty version range "
                        f"{h.version_min}..{h.version_max}"
                    )
                version = negotiate(c.version_min, c.version_max, h.version_min, h.version_max)
                if h.node_id == c.node_id:
                    raise ProtocolError(f"node {c.node_id} connected to itself")
                _check_limits(h.max_frame_bytes, h.max_in_flight, h.node_id)
            except SpawnmeshError as exc:
                raise self._fail(exc) from None
            self._hello = h
            welcome = m.encode(
                m.Welcome(
                    version,
                    c.cluster,
                    c.node_id,
                    c.incarnation,
                    self.nonce,
                    c.keyring.newest_id if c.keyring else "",
                    c.max_frame_bytes,
                    c.max_in_flight,
                )
            )
            self._version = version
            self._digest = transcript(bytes(body), welcome)
            return [welcome, m.encode(make_proof(c.keyring, b"server", self._digest))]
        h = self._hello
        proof = self._decode(body, m.Proof)
        try:
            check_proof(c.keyring, proof, b"client", self._digest, h.node_id)
        except SpawnmeshError as exc:
            raise self._fail(exc) from None
        self.session = Session(
            self._version,
            h.node_id,
            h.incarnation,
            h.max_frame_bytes,
            h.max_in_flight,
            proof.key_id,
        )
        return [m.encode(m.Ready())]
