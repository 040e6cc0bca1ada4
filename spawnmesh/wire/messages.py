"""Peer-wire messages (sans-IO): msgspec array-like structs with append-only integer type codes.

A frame body is one msgpack array ``[type_code, field, ...]``. Rules (spec/wire.md): codes and
fields are append-only; a new field goes last with a default; trailing fields a receiver does
not know are ignored; a body whose type code is above every code this version knows is skipped
(``decode`` returns None); anything else malformed raises ``ProtocolError``, never another
exception.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Final

import msgspec

from spawnmesh.errors import ProtocolError, SpawnmeshError, from_wire
from spawnmesh.ids import ActorId

PROTOCOL_VERSION_MIN: Final = 1
"""Oldest protocol version this code speaks."""
PROTOCOL_VERSION_MAX: Final = 1
"""Newest protocol version this code speaks."""

U64 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
I64 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Version = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Name = Annotated[str, msgspec.Meta(max_length=1024)]
Nonce = Annotated[bytes, msgspec.Meta(min_length=16, max_length=64)]


class Kind(enum.IntEnum):
    """What a Request asks for (append-only)."""

    CALL = 0
    """Request/reply: the Reply carries the handler's reply payload."""
    CAST = 1
    """Fire-and-forget, acknowledged once queued on the owner (empty Reply)."""
    DELAYED = 2
    """A cast to run ``when_ms`` milliseconds after it is queued."""
    SCHEDULED = 3
    """A cast to run at ``when_ms`` (Unix epoch milliseconds)."""
    RELEASE = 4
    """Mesh: hand actor ``system/name`` off now (its new owner asks before loading it); the
    empty Reply comes once its state is flushed."""
    BROADCAST = 5
    """Mesh: deliver a broadcast on channel ``name`` of ``system`` (``action``: the action to
    run, empty for each subscriber's own) to the unnamed subscribers active on the receiver."""
    SPAWN = 6
    """Mesh: record unnamed instance ``system/name`` of template ``parent`` on its owner."""


class Hello(msgspec.Struct, array_like=True, tag=1):
    """Client's first frame: its version range, identity, nonce and newest key id."""

    version_min: Version
    version_max: Version
    cluster: Name
    node_id: Name
    incarnation: I64
    nonce: Nonce
    key_id: Name = ""
    max_frame_bytes: U64 = 0
    max_in_flight: U64 = 0


class Welcome(msgspec.Struct, array_like=True, tag=2):
    """Server's answer to Hello: the chosen version, its identity, nonce and newest key id."""

    version: Version
    cluster: Name
    node_id: Name
    incarnation: I64
    nonce: Nonce
    key_id: Name = ""
    max_frame_bytes: U64 = 0
    max_in_flight: U64 = 0


class Proof(msgspec.Struct, array_like=True, tag=3):
    """Proof of the cluster key over the handshake transcript (empty without a keyring)."""

    key_id: Name = ""
    proof: Annotated[bytes, msgspec.Meta(max_length=256)] = b""


class Ready(msgspec.Struct, array_like=True, tag=4):
    """Server accepted the client's proof: the session is open."""


class Reject(msgspec.Struct, array_like=True, tag=5):
    """The sender refuses the connection (handshake or protocol failure) and closes it."""

    code: str
    message: str = ""


class GoAway(msgspec.Struct, array_like=True, tag=6):
    """The sender sends no new requests on this connection and asks the receiver to do the same;
    requests already sent are still answered (drain), then the connection closes."""

    code: str = ""
    message: str = ""


class Ping(msgspec.Struct, array_like=True, tag=7):
    """Liveness probe; the receiver answers with a Pong carrying the same token."""

    token: U64 = 0


class Pong(msgspec.Struct, array_like=True, tag=8):
    """Answer to a Ping."""

    token: U64 = 0


class Request(msgspec.Struct, array_like=True, tag=9):
    """An invocation for the receiving node. ``id`` is unique among the sender's requests in
    flight on this connection; ``deadline_ms`` is the caller's remaining time (None: none);
    ``payload`` is the invocation payload as msgpack bytes; ``when_ms`` is the delay
    (DELAYED) or epoch time (SCHEDULED); ``hops`` counts forwards between owners; ``trace`` is
    the caller's W3C trace context (``traceparent``, ``tracestate``; empty when not traced)."""

    id: U64
    system: Name
    name: Name
    parent: Name | None = None
    action: Name = ""
    payload: bytes = b""
    metadata: dict[str, str] = {}
    caller: ActorId | None = None
    chain: list[tuple[str, str]] = []
    deadline_ms: I64 | None = None
    kind: Kind = Kind.CALL
    when_ms: I64 = 0
    hops: Annotated[int, msgspec.Meta(ge=0, le=255)] = 0
    trace: Annotated[dict[str, str], msgspec.Meta(max_length=8)] = {}

    @property
    def target(self) -> ActorId:
        """The target actor."""
        return ActorId(self.system, self.name, self.parent)


class Reply(msgspec.Struct, array_like=True, tag=10):
    """Successful answer to request ``id`` (payload None: no value, e.g. an acknowledged cast)."""

    id: U64
    payload: bytes | None = None


class Error(msgspec.Struct, array_like=True, tag=11):
    """Failed answer to request ``id``: the error boxed by ``SpawnmeshError.to_wire()`` and the
    node where it was raised."""

    id: U64
    error: dict[str, Any]
    origin: Name = ""


class Cancel(msgspec.Struct, array_like=True, tag=12):
    """The caller gave up on request ``id``: cancel its handler (no answer follows)."""

    id: U64


Message = (
    Hello
    | Welcome
    | Proof
    | Ready
    | Reject
    | GoAway
    | Ping
    | Pong
    | Request
    | Reply
    | Error
    | Cancel
)
"""Every message this version knows."""

MESSAGE_TYPES: Final[dict[int, type[Message]]] = {
    1: Hello,
    2: Welcome,
    3: Proof,
    4: Ready,
    5: Reject,
    6: GoAway,
    7: Ping,
    8: Pong,
    9: Request,
    10: Reply,
    11: Error,
    12: Cancel,
}
"""Append-only: never reuse or renumber a code."""
MAX_KNOWN_CODE: Final = max(MESSAGE_TYPES)

_DECODE_ERRORS = (
    msgspec.DecodeError,
    msgspec.ValidationError,
    ValueError,
    TypeError,
    RecursionError,  # deeply nested garbage
    OverflowError,
)

_encoder = msgspec.msgpack.Encoder()
encode_into = _encoder.encode_into
"""``encode_into(msg, buffer, offset)``: msgspec's encoder, for :func:`codec.append_frame`."""
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)
_head_decoder = msgspec.msgpack.Decoder(list[msgspec.Raw])
_int_decoder = msgspec.msgpack.Decoder(int)
_id_decoder = msgspec.msgpack.Decoder(U64)



def encode(msg: Message) -> bytes:
    """Encode one message as a frame body."""
    return _encoder.encode(msg)


def decode(body: bytes | memoryview) -> Message | None:
    """Decode one frame body; None if its type code is newer than this version knows.

    Raises ``ProtocolError`` (only) for anything malformed."""
    try:
        return _decoder.decode(body)
    except _DECODE_ERRORS as exc:
        return _decode_slow(body, exc)


def _decode_slow(body: bytes | memoryview, exc: Exception) -> Message | None:
    try:
        head = _head_decoder.decode(body)
        code = _int_decoder.decode(head[0]) if head else None
    except _DECODE_ERRORS:
        code = None
    if isinstance(code, int) and code > MAX_KNOWN_CODE:
        return None  # a newer message type: skipped (spec/wire.md, "Unknown types")
    raise ProtocolError(f"malformed frame: {exc}") from None


_ID_CODES: Final = frozenset({9, 10, 11})
"""Request, Reply, Error: messages whose second element is a request id."""


def head(body: bytes | memoryview) -> tuple[int, int] | None:
    """(type code, request id) of a Request, Reply or Error body whose other fields may be
    malformed; None if even those cannot be read."""
    try:
        parts = _head_decoder.decode(body)
        if len(parts) < 2:
            return None
        code = _int_decoder.decode(parts[0])
        rid = _id_decoder.decode(parts[1])
    except _DECODE_ERRORS:
        return None
    return (code, rid) if code in _ID_CODES else None


def rejected(msg: Reject) -> SpawnmeshError:
    """The typed error a peer's Reject stands for."""
    return from_wire({"code": msg.code, "message": msg.message})


def unbox(msg: Error) -> SpawnmeshError:
    """Rebuild the error of an Error frame, with its origin node."""
    try:
        err = from_wire(msg.error)
    except Exception as exc:  # a hostile box must not escape as a non-Spawnmesh error
        err = ProtocolError(f"undecodable error from {msg.origin}: {exc!r}")
    err.origin = msg.origin
    return err
