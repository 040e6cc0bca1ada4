"""Spawn values inside the node: ``Any`` payloads that survive the mesh, and a Spawn actor's state.

Spawn hosts exchange ``google.protobuf.Any`` values whose types the node does not know. Inside the
node they travel as :class:`RawAny`, a betterproto2 ``Any`` (so the gRPC host path and
``spawnmesh.host.convert`` take it as the ``Any`` it is) whose builtins form is its raw bytes:
``{"@type": url, "@bytes": base64}``. That is what crosses the peer wire, so a payload or reply
reaches an actor on another node byte for byte, with its type URL (a plain ``Any`` of an
unregistered type cannot be turned into builtins at all).

A Spawn actor's state is a :class:`SpawnState`: the state ``Any`` as two fields (type URL and
bytes, kept verbatim, never re-labelled) plus the actor's tags, which Spawn keeps next to the
state (``ActorState``) and lets the host replace in ``updated_context.tags``. It is a msgspec
Struct, so the node stores it as msgpack (about a microsecond) and sealed like any state.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, Self

import msgspec

from spawnmesh.errors import InvalidArgument
from spawnmesh.host.convert import to_any
from spawnmesh.host.gen.google.protobuf import Any as AnyMsg

TYPE_KEY = "@type"
BYTES_KEY = "@bytes"
URL_PREFIX = "type.googleapis.com/"
"""The type URL prefix Spawn's proxy packs with (``Any.pack`` in every protobuf runtime)."""


class RawAny(AnyMsg):
    """An ``Any`` whose builtins form is its raw bytes (see the module docstring)."""

    def to_dict(self, **kwargs: Any) -> dict[str, Any]:
        return {TYPE_KEY: self.type_url, BYTES_KEY: base64.b64encode(self.value).decode()}

    @classmethod
    def from_dict(cls, value: Any, *, ignore_unknown_fields: bool = False) -> Self:
        raw = raw_from_builtins(value)
        if raw is None:
            raise InvalidArgument(f"not a raw Any: {str(value)[:80]}")
        return cls(type_url=raw[0], value=raw[1])


def raw_from_builtins(value: Any) -> tuple[str, bytes] | None:
    """``(type_url, bytes)`` of a :class:`RawAny` that crossed the wire, else None."""
    if not isinstance(value, dict) or value.keys() != {TYPE_KEY, BYTES_KEY}:
        return None
    url, data = value[TYPE_KEY], value[BYTES_KEY]
    if not isinstance(url, str) or not isinstance(data, str):
        return None
    try:
        return url, base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def any_parts(value: Any) -> tuple[str, bytes] | None:
    """A runtime payload or reply as ``(type_url, bytes)`` for a Spawn host; None is Noop.

    An ``Any`` (betterproto2 or Google's) passes verbatim; a RawAny that crossed the wire is
    recognised; a betterproto2 message is packed under its type URL; anything else (an SDK
    actor's dataclass, builtins) becomes ``spawn.JSONType``, as the gRPC host path does."""
    if value is None:
        return None
    if value.__class__ is RawAny or isinstance(value, AnyMsg):  # the first test is 10x faster
        return value.type_url, value.value
    type_url = getattr(value, "type_url", None)
    if isinstance(type_url, str) and hasattr(value, "SerializeToString"):  # Google's Any
        return type_url, bytes(value.value)
    raw = raw_from_builtins(value)
    if raw is not None:
        return raw
    if isinstance(value, SpawnState):  # a Spawn actor's state read by a state action
        return value.any()
    packed = to_any(value)
    assert packed is not None
    return packed.type_url, packed.value


def type_url_for(state_type: str) -> str:
    """The type URL of Spawn's ``ActorSettings.state_type`` (a full name, or already a URL)."""
    return state_type if "/" in state_type else URL_PREFIX + state_type


class SpawnState(msgspec.Struct, frozen=True, gc=False):
    """A Spawn actor's state: its ``Any`` (absent until the actor or its registration has
    one) and its tags. Frozen: a turn's new state is a new value, never an edit in place."""

    present: bool = False
    type_url: str = ""
    value: bytes = b""
    tags: dict[str, str] = {}

    def any(self) -> tuple[str, bytes] | None:
        """The state as ``(type_url, bytes)``, None while absent."""
        return (self.type_url, self.value) if self.present else None

    def with_any(
        self, parts: tuple[str, bytes] | None, tags: Mapping[str, str] | None
    ) -> SpawnState:
        """This state with a new ``Any`` (None keeps the current one) and tags (None: none)."""
        tags_d = dict(sorted(tags.items())) if tags else {}
        if parts is None:
            if tags_d == self.tags:
                return self
            return SpawnState(self.present, self.type_url, self.value, tags_d)
        if self.present and parts == (self.type_url, self.value) and tags_d == self.tags:
            return self
        return SpawnState(True, parts[0], parts[1], tags_d)


def initial_state(
    parts: tuple[str, bytes] | None, state_type: str, tags: Mapping[str, str]
) -> SpawnState:
    """The state of a Spawn actor nothing was stored for: the registered ``Actor.state``, else
    an empty message of ``settings.state_type`` (an empty protobuf message is zero bytes, which
    is what Spawn's proxy packs), else absent; with the registered tags."""
    tags_d = dict(sorted(tags.items()))
    if parts is not None:
        return SpawnState(True, parts[0], parts[1], tags_d)
    if state_type:
        return SpawnState(True, type_url_for(state_type), b"", tags_d)
    return SpawnState(False, "", b"", tags_d)
