"""One Spawn turn as messages: the ``ActorInvocation`` the node sends, the host's answer read back.

Pure functions over Google protobuf (upb) messages generated from ``spec/spawn/``; no I/O. What
Spawn's proxy does with a host's answer (lib/actors/actor/entity/invocation.ex and
lib/actors/actor/interface/http.ex in eigr/spawn) is mirrored here: an ``updated_context``
replaces the state when it carries one and always replaces the tags; the value (or Noop) is the
reply; the workflow's side effects get the turn's metadata under their own; pipe sends the
turn's output on and forward its input; ``checkpoint`` asks for a durable write.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from spawnmesh.errors import InvalidArgument
from spawnmesh.ids import ActorId
from spawnmesh.pb.gen.spawn.actors import actor_pb2
from spawnmesh.pb.gen.spawn.actors import protocol_pb2 as pb

Parts = tuple[str, bytes]
"""An ``Any`` as ``(type_url, value bytes)``."""


@dataclass(slots=True)
class Effect:
    """A side effect to cast after the turn commits."""

    target: ActorId
    action: str
    payload: Parts | None
    metadata: dict[str, str]
    delay_ms: int | None


@dataclass(slots=True)
class Route:
    """Pipe (``pipe``: the turn's output goes on) or forward (its input goes on)."""

    target: ActorId
    action: str
    pipe: bool


@dataclass(slots=True)
class TurnResult:
    """A host's ``ActorInvocationResponse``, read (read-only: nothing is allocated for the
    parts a plain turn leaves out)."""

    has_context: bool = False
    state: Parts | None = None
    """The new state's Any; None leaves the state as it is."""
    tags: Mapping[str, str] | None = None
    """The new tags (None: none)."""
    value: Parts | None = None
    effects: Sequence[Effect] = ()
    broadcast: tuple[str, Parts | None, str] | None = None
    """(channel, payload, action or "") of the workflow's broadcast."""
    route: Route | None = None
    checkpoint: bool = False


def _set_id(msg: actor_pb2.ActorId, aid: ActorId) -> None:
    msg.name = aid.name
    msg.system = aid.system
    if aid.parent:
        msg.parent = aid.parent


def build_invocation(
    self_id: ActorId,
    action: str,
    state: Parts | None,
    tags: Mapping[str, str],
    metadata: Mapping[str, str],
    caller: ActorId | None,
    payload: Parts | None,
) -> bytes:
    """The serialized ``ActorInvocation`` of one turn (Spawn's ``build_request``: the caller
    goes in both ``caller`` fields, ``self`` and ``actor`` are the running actor with its
    ``parent``, the payload is a value or Noop)."""
    inv = pb.ActorInvocation()
    _set_id(inv.actor, self_id)
    inv.action_name = action
    ctx = inv.current_context
    if state is not None:
        ctx.state.type_url = state[0]
        ctx.state.value = state[1]
    if metadata:
        ctx.metadata.update(metadata)
    if tags:
        ctx.tags.update(tags)
    _set_id(ctx.self, self_id)
    if caller is not None:
        _set_id(ctx.caller, caller)
        _set_id(inv.caller, caller)
    if payload is None:
        inv.noop.SetInParent()
    else:
        inv.value.type_url = payload[0]
        inv.value.value = payload[1]
    return inv.SerializeToString()


def _id(msg: actor_pb2.ActorId, system: str, parent: str = "") -> ActorId:
    if not msg.name:
        raise InvalidArgument("a workflow step names no actor")
    return ActorId(msg.system or system, msg.name, msg.parent or parent or None)


def _parts(msg: pb.ActorInvocationResponse | pb.Broadcast | pb.InvocationRequest) -> Parts | None:
    if msg.WhichOneof("payload") == "value":
        return msg.value.type_url, msg.value.value
    return None


def read_response(
    body: bytes, self_id: ActorId, metadata: Mapping[str, str], now_ms: int
) -> TurnResult:
    """Read a host's ``ActorInvocationResponse`` for a turn of ``self_id`` that carried
    ``metadata`` (``now_ms``: Unix epoch ms, for ``scheduled_to``); InvalidArgument if it is
    not one."""
    try:
        resp = pb.ActorInvocationResponse.FromString(body)
    except DecodeError as exc:
        raise InvalidArgument(
            f"the host's answer is not an ActorInvocationResponse: {exc}"
        ) from None
    out = TurnResult(value=_parts(resp), checkpoint=resp.checkpoint)
    if resp.HasField("updated_context"):
        uc = resp.updated_context
        out.has_context = True
        if uc.HasField("state"):
            out.state = (uc.state.type_url, uc.state.value)
        if uc.tags:
            out.tags = dict(uc.tags)
    if not resp.HasField("workflow"):
        return out
    wf = resp.workflow
    system = self_id.system
    effects: list[Effect] = []
    out.effects = effects
    for eff in wf.effects:
        req = eff.request
        target = _id(req.actor.id, req.system.name or system, req.register_ref)
        meta = dict(metadata)
        meta.update(req.metadata)
        delay = max(0, req.scheduled_to - now_ms) if req.scheduled_to else None
        effects.append(Effect(target, req.action_name, _parts(req), meta, delay))
    if wf.HasField("broadcast"):
        b = wf.broadcast
        out.broadcast = (b.channel_group, _parts(b), b.action_name)
    kind = wf.WhichOneof("routing")
    if kind is not None:
        r = wf.pipe if kind == "pipe" else wf.forward
        if not r.actor or not r.action_name:
            raise InvalidArgument(f"a {kind} needs an actor and an action_name")
        target = ActorId(system, r.actor, r.register_ref or None)
        out.route = Route(target, r.action_name, pipe=kind == "pipe")
    return out
