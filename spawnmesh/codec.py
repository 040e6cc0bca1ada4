"""State and payload codecs: typed Python values <-> bytes.

Dataclasses, msgspec Structs and builtins are encoded as msgpack with msgspec (maps keyed by
field name, so adding a field with a default or dropping one keeps old rows readable);
betterproto2 messages as protobuf; ``bytes`` as themselves. One codec per type, built once
when an actor is defined, so the per-turn cost is a single C call.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Protocol

import msgspec

from spawnmesh.errors import InvalidArgument, StateCorrupt

_ENCODER = msgspec.msgpack.Encoder()


class Codec(Protocol):
    """Encodes one type of value to bytes and back."""

    type_name: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, blob: bytes) -> Any: ...


def type_name(tp: type | None) -> str:
    """The name stored next to state and carried in Spawn's ``Any`` type URLs."""
    if tp is None:
        return "any"
    return f"{tp.__module__}.{tp.__qualname__}"


class MsgpackCodec:
    """msgspec msgpack for dataclasses, Structs, builtins; ``tp=None`` decodes untyped."""

    __slots__ = ("_decoder", "encode", "type_name")

    def __init__(self, tp: type | None) -> None:
        self.type_name = type_name(tp)
        self.encode = _ENCODER.encode
        self._decoder: msgspec.msgpack.Decoder[Any] = (
            msgspec.msgpack.Decoder(tp) if tp is not None else msgspec.msgpack.Decoder()
        )

    def decode(self, blob: bytes) -> Any:
        try:
            return self._decoder.decode(blob)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            raise StateCorrupt(f"cannot decode {self.type_name}: {exc}") from exc


class ProtobufCodec:
    """betterproto2 messages (``bytes(msg)`` / ``Message.parse``)."""

    __slots__ = ("_tp", "type_name")

    def __init__(self, tp: type) -> None:
        self._tp = tp
        self.type_name = type_name(tp)

    def encode(self, value: Any) -> bytes:
        return bytes(value)

    def decode(self, blob: bytes) -> Any:
        try:
            return self._tp().parse(blob)
        except Exception as exc:
            raise StateCorrupt(f"cannot decode protobuf {self.type_name}: {exc}") from exc


class BytesCodec:
    """Raw bytes state, stored as is."""

    __slots__ = ("type_name",)

    def __init__(self) -> None:
        self.type_name = "bytes"

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise InvalidArgument(f"state must be bytes, got {type(value).__name__}")
        return bytes(value)

    def decode(self, blob: bytes) -> Any:
        return blob


def _is_protobuf(tp: type) -> bool:
    # A betterproto2 message class exists only if betterproto2 was imported: never import it
    # here just to answer no (a node without protobuf types does not load it at all).
    betterproto2 = sys.modules.get("betterproto2")
    if betterproto2 is None:
        return False
    return isinstance(tp, type) and issubclass(tp, betterproto2.Message)


def codec_for(tp: type | None) -> Codec:
    """The codec for values of ``tp`` (None: any msgpack-able value)."""
    if tp is bytes:
        return BytesCodec()
    if tp is not None and _is_protobuf(tp):
        return ProtobufCodec(tp)
    return MsgpackCodec(tp)


def convert(value: Any, tp: type | None) -> Any:
    """Turn a JSON-like value (from the CLI, HTTP or the wire) into ``tp``; InvalidArgument if
    it does not fit. Values already of the type pass through untouched."""
    if tp is None or tp is Any:
        return value
    try:
        if isinstance(tp, type) and isinstance(value, tp):
            return value
    except TypeError:  # subscripted generics
        pass
    if isinstance(tp, type) and _is_protobuf(tp):
        if isinstance(value, dict):
            return tp.from_dict(value)  # type: ignore[attr-defined]
        raise InvalidArgument(f"expected an object for {type_name(tp)}")
    try:
        return msgspec.convert(value, tp, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"payload does not fit {getattr(tp, '__name__', tp)}: {exc}") from exc


def to_builtins(value: Any) -> Any:
    """Turn any state or reply value into JSON-able builtins (for the CLI and HTTP).

    Dataclass fields are listed explicitly: msgspec leaves fields that took their default out
    of ``__dict__`` and would omit them from the output."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if hasattr(value, "to_dict") and _is_protobuf(type(value)):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_builtins(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_builtins(v) for v in value]
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: to_builtins(v) for k, v in value.items()}
    return msgspec.to_builtins(value, str_keys=True)
