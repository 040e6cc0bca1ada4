"""SWIM messages with append-only integer type codes, and the datagram codec (msgspec msgpack).

A packet is ``[protocol_version, [message, ...]]``; every message is a msgpack array whose first
element is its type code. Rules (see spec/swim.md): codes and fields are append-only; new fields
go last with a default; a receiver ignores trailing fields it does not know and skips messages
whose code is above the highest code it knows. Anything else malformed raises ``ProtocolError``.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Annotated, Any, Final

import msgspec

from spawnmesh.errors import ProtocolError

PROTOCOL_VERSION: Final = 1
"""Version this code speaks (sent in every packet)."""
PROTOCOL_VERSION_MIN: Final = 1
"""Oldest packet version this code accepts."""

MAX_HOST_CHARS: Final = 64
"""Longest host in a gossip address: an IPv6 literal (45 characters) with a zone id."""
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
"""A gossip port: 0 is never a valid destination (an ephemeral bind advertises its real port)."""
Host = Annotated[str, msgspec.Meta(min_length=2, max_length=MAX_HOST_CHARS)]
Addr = tuple[Host, Port]
"""A member's gossip address on the wire: an IP literal and a port (checked by :func:`decode`,
as the shell sends to it; discovery and ``advertise_host`` only ever produce IP literals). The
core treats it as an opaque hashable value."""

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


PeerAddr = tuple[
    Annotated[str, msgspec.Meta(max_length=255)], Annotated[int, msgspec.Meta(ge=0, le=65535)]
]
"""A node's peer-wire address in its metadata (host "" before the advertised host is known)."""


class NodeMeta(msgspec.Struct, array_like=True, frozen=True):
    """Conventional content of a member's metadata blob (encode with :func:`encode_meta`)."""

    peer_addr: PeerAddr
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
        msgs = _decode_slow(data)
    else:
        if version < PROTOCOL_VERSION_MIN:
            raise ProtocolError(f"packet version {version} is older than {PROTOCOL_VERSION_MIN}")
    for msg in msgs:
        _check_addrs(msg)
    return msgs


@lru_cache(maxsize=4096)
def valid_host(host: str) -> bool:
    """Whether ``host`` may be sent to: a printable IP literal of at most ``MAX_HOST_CHARS``
    (a name would make every send a DNS lookup; a NUL byte makes ``sendto`` raise)."""
    if not 2 <= len(host) <= MAX_HOST_CHARS or not host.isascii() or not host.isprintable():
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_addr(addr: Addr, what: str) -> None:
    if not valid_host(addr[0]):
        raise ProtocolError(f"malformed message: {what} host {addr[0][:80]!r} is not an IP address")


def _check_addrs(msg: Message) -> None:
    """``ProtocolError`` if a gossip address in ``msg`` is not an IP literal (ports are bounded
    by the ``Port`` type): the shell sends to these addresses."""
    if isinstance(msg, Ping):
        _check_addr(msg.source_addr, "source_addr")
    elif isinstance(msg, Alive):
        _check_addr(msg.addr, "addr")
    elif isinstance(msg, PingReq):
        _check_addr(msg.target_addr, "target_addr")
        _check_addr(msg.source_addr, "source_addr")
    elif isinstance(msg, PushPull):
        for row in msg.members:
            _check_addr(row.addr, "member addr")


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
