"""SWIM messages with append-only integer type codes, and the datagram codec (msgspec msgpack).

A packet is ``[protocol_version, [message, ...]]``; every message is a msgpack array whose first
element is its type code. Rules (see spec/swim.md): codes and fields are append-only; new fields
go last with a default; a receiver ignores trailing fields it does not know and skips messages
whose code is above the highest code it knows. Anything else malformed raises ``ProtocolError``.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec

from spawnmesh.errors import ProtocolError

PROTOCOL_VERSION: Final = 1
"""Version this code speaks (sent in every packet)."""
PROTOCOL_VERSION_MIN: Final = 1
"""Oldest packet version this code accepts."""

Addr = tuple[str, int]
"""A member's gossip address on the wire; the core treats it as an opaque hashable value."""

MAX_INCARNATION: Final = 2**63 - 1
"""Largest incarnation on the wire (int64); above it a packet is malformed. Refutation saturates
here, so the core never produces an unencodable number."""
Incarnation = Annotated[int, msgspec.Meta(ge=0, le=MAX_INCARNATION)]
Seq = Annotated[int, msgspec.Meta(ge=0)]


class Ping(msgspec.Struct, array_like=True, frozen=True, tag=1):
    """Direct probe; ``target`` guards against a different node now living at the address."""

    seq: Seq
    target: str
    source: str
    source_addr: Addr


class PingReq(msgspec.Struct, array_like=True, frozen=True, tag=2):
    """Ask a member to probe ``target`` for us and relay the ack (and a nack if ``nack``)."""

    seq: Seq
    target: str
    target_addr: Addr
    source: str
    source_addr: Addr
    nack: bool = False


class Ack(msgspec.Struct, array_like=True, frozen=True, tag=3):
    """Answer to a ping (or a relayed ping-req) with the probe's sequence number."""

    seq: Seq


class Nack(msgspec.Struct, array_like=True, frozen=True, tag=4):
    """Relay's report that the target of a ping-req did not answer in time (Lifeguard)."""

    seq: Seq


class Alive(msgspec.Struct, array_like=True, frozen=True, tag=5):
    """``name`` is alive at ``incarnation`` with this address and metadata."""

    name: str
    incarnation: Incarnation
    addr: Addr
    meta: bytes = b""


class Suspect(msgspec.Struct, array_like=True, frozen=True, tag=6):
    """``sender`` suspects ``name`` at ``incarnation``."""

    name: str
    incarnation: Incarnation
    sender: str


class Dead(msgspec.Struct, array_like=True, frozen=True, tag=7):
    """``sender`` declares ``name`` dead at ``incarnation``."""

    name: str
    incarnation: Incarnation
    sender: str


class Left(msgspec.Struct, array_like=True, frozen=True, tag=8):
    """``name`` left the cluster gracefully at ``incarnation``."""

    name: str
    incarnation: Incarnation


class MemberState(msgspec.Struct, array_like=True, frozen=True):
    """One row of a push-pull state exchange (state is a ``state.Status`` value)."""

    name: str
    incarnation: Incarnation
    addr: Addr
    meta: bytes
    status: int


class PushPull(msgspec.Struct, array_like=True, frozen=True, tag=9):
    """Full member table for anti-entropy and join (carried over TCP by the shell)."""

    join: bool
    source: str
    members: list[MemberState]


Message = Ping | PingReq | Ack | Nack | Alive | Suspect | Dead | Left | PushPull
"""Every message this version knows."""

MESSAGE_TYPES: Final[dict[int, type[Message]]] = {
    1: Ping,
    2: PingReq,
    3: Ack,
    4: Nack,
    5: Alive,
    6: Suspect,
    7: Dead,
    8: Left,
    9: PushPull,
}
"""Append-only: never reuse or renumber a code."""
MAX_KNOWN_CODE: Final = max(MESSAGE_TYPES)


class NodeMeta(msgspec.Struct, array_like=True, frozen=True):
    """Conventional content of a member's metadata blob (encode with :func:`encode_meta`)."""

    peer_addr: Addr
    actor_types: list[str] = []
    protocol_min: int = 1
    protocol_max: int = 1
    tags: dict[str, str] = {}
    ops_addr: str = ""
    """``host:port`` of the member's ops HTTP endpoints (for operators' tools), if known."""


_DECODE_ERRORS = (
    msgspec.DecodeError,
    msgspec.ValidationError,
    ValueError,
    RecursionError,  # deeply nested garbage
    OverflowError,
)

_encoder = msgspec.msgpack.Encoder()
_packet_decoder = msgspec.msgpack.Decoder(tuple[int, list[Message]])
_raw_packet_decoder = msgspec.msgpack.Decoder(tuple[int, list[msgspec.Raw]])
_message_decoder = msgspec.msgpack.Decoder(Message)
_any_decoder = msgspec.msgpack.Decoder()
_meta_decoder = msgspec.msgpack.Decoder(NodeMeta)


def encode_message(msg: Message) -> bytes:
    """Encode one message (an element of a packet)."""
    return _encoder.encode(msg)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 65536:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


_PACKET_PREFIX: Final = b"\x92" + _encoder.encode(PROTOCOL_VERSION)


def packet_overhead(n_messages: int) -> int:
    """Bytes a packet adds around ``n_messages`` encoded messages."""
    return len(_PACKET_PREFIX) + len(_array_header(n_messages))


def pack(encoded: list[bytes]) -> bytes:
    """Build one packet from already-encoded messages (no re-encoding of piggybacked news)."""
    return b"".join((_PACKET_PREFIX, _array_header(len(encoded)), *encoded))


def encode(msgs: list[Message]) -> bytes:
    """Encode messages into one packet."""
    return pack([_encoder.encode(m) for m in msgs])


def decode(data: bytes) -> list[Message]:
    """Decode a packet; raise ``ProtocolError`` (only) for malformed input; skip unknown codes."""
    try:
        version, msgs = _packet_decoder.decode(data)
    except _DECODE_ERRORS:
        return _decode_slow(data)
    if version < PROTOCOL_VERSION_MIN:
        raise ProtocolError(f"packet version {version} is older than {PROTOCOL_VERSION_MIN}")
    return msgs


def _decode_slow(data: bytes) -> list[Message]:
    try:
        version, raws = _raw_packet_decoder.decode(data)
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"malformed packet: {exc}") from None
    if version < PROTOCOL_VERSION_MIN:
        raise ProtocolError(f"packet version {version} is older than {PROTOCOL_VERSION_MIN}")
    out: list[Message] = []
    for raw in raws:
        try:
            out.append(_message_decoder.decode(raw))
            continue
        except _DECODE_ERRORS as exc:
            error = exc
        if _unknown_code(raw):
            continue
        raise ProtocolError(f"malformed message: {error}") from None
    return out


def _unknown_code(raw: msgspec.Raw) -> bool:
    try:
        value: Any = _any_decoder.decode(raw)
    except _DECODE_ERRORS:
        return False
    if not isinstance(value, list) or not value:
        return False
    code = value[0]
    return isinstance(code, int) and not isinstance(code, bool) and code > MAX_KNOWN_CODE


def decode_push_pull(data: bytes) -> PushPull:
    """Decode a push-pull packet (the TCP payload); ``ProtocolError`` if it is anything else."""
    for msg in decode(data):
        if isinstance(msg, PushPull):
            return msg
    raise ProtocolError("no push-pull message in packet")


def encode_meta(meta: NodeMeta) -> bytes:
    """Encode conventional node metadata to the opaque bytes SWIM carries."""
    return _encoder.encode(meta)


def decode_meta(data: bytes) -> NodeMeta:
    """Decode node metadata; ``ProtocolError`` if malformed."""
    try:
        return _meta_decoder.decode(data)
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"malformed node metadata: {exc}") from None
