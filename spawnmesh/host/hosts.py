"""The node's record of attached hosts, and the turn of a host actor (trio side).

A host actor's action handler (built by :mod:`spawnmesh.host.registration`) calls
:meth:`HostRegistry.turn`: the turn becomes a Spawn ``ActorInvocation`` sent over one of the
system's transports (a Connect stream session, or the host's own HostService), and the host's
``ActorInvocationResponse`` becomes a :class:`Reply` (new state, value, workflow). A system with
no live transport fails fast with :class:`HostUnavailable`; a transport that goes away fails the
turns it carries. The runtime resets the state of every failed turn.

The messages of a turn and of ``Invoke`` are Google protobuf (upb) messages (:mod:`spawnmesh.pb`):
they are built and read once per invocation, where betterproto2's pure-Python codec cost the node
about half of its CPU. Registration, a cold path, keeps the betterproto2 messages.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import outcome
import trio

from spawnmesh._version import __version__
from spawnmesh.actors.context import Context, Reply
from spawnmesh.actors.definition import Handler, Kind
from spawnmesh.actors.runtime import _CURRENT  # the running turn: caller id and call chain
from spawnmesh.clock import wall_ms
from spawnmesh.errors import (
    ActorFailed,
    HostUnavailable,
    InvalidArgument,
    SpawnmeshError,
    VersionMismatch,
    from_wire,
)
from spawnmesh.host import registration
from spawnmesh.host.convert import (
    actor_id,
    any_in,
    any_or_none,
    from_any,
    set_any,
    set_id,
    to_any,
)
from spawnmesh.host.gen import spawn
from spawnmesh.host.gen.google.protobuf import Any as AnyMsg
from spawnmesh.host.registration import RegistrationInvalid
from spawnmesh.ids import ActorId
from spawnmesh.pb.gen.spawn.actors import protocol_pb2 as proto
from spawnmesh.pb.gen.spawnmesh.v1 import host_pb2

if TYPE_CHECKING:
    from spawnmesh.actors.runtime import Runtime
    from spawnmesh.host.bridge import Bridge

log = logging.getLogger("spawnmesh.host")


class Transport(Protocol):
    """Carries turns to one host."""

    def load(self) -> int:
        """Turns in flight (the least loaded transport of a system is used)."""
        ...

    async def call(
        self, inv: proto.ActorInvocation, timeout_ms: int
    ) -> proto.ActorInvocationResponse:
        """Run one turn on the host; raises a SpawnmeshError (HostUnavailable when lost)."""
        ...

    def close(self) -> None:
        """Stop using this transport; turns in flight fail with HostUnavailable."""
        ...


class StreamSession:
    """One host's Connect stream, trio side: turns out, results in, matched by id.

    ``send`` enqueues a NodeMessage for the stream's writer and is called on the asyncio loop
    (through the bridge); :meth:`deliver` and :meth:`close` are called in the trio thread."""

    def __init__(
        self, bridge: Bridge, send: Callable[[host_pb2.NodeMessage], None], peer: str
    ) -> None:
        self._bridge = bridge
        self._send = send
        self.peer = peer
        self.system = ""
        self.node = ""
        self.closed = False
        self._ids = itertools.count(1)
        self._pending: dict[int, trio.lowlevel.Task] = {}

    def __repr__(self) -> str:
        return f"<stream session {self.system} from {self.peer}>"

    def load(self) -> int:
        return len(self._pending)

    async def call(
        self, inv: proto.ActorInvocation, timeout_ms: int
    ) -> proto.ActorInvocationResponse:
        if self.closed:
            raise HostUnavailable(f"the host of {self.system} disconnected")
        tid = next(self._ids)
        self._pending[tid] = trio.lowlevel.current_task()
        msg = host_pb2.NodeMessage()
        turn = msg.turn
        turn.id = tid
        turn.invocation.CopyFrom(inv)
        turn.timeout_ms = timeout_ms
        self._bridge.aio_soon(self._send, msg)

        def abort(_: Any) -> trio.lowlevel.Abort:
            if self._pending.pop(tid, None) is not None and not self.closed:
                cancel = host_pb2.NodeMessage()
                cancel.cancel.id = tid
                self._bridge.aio_soon(self._send, cancel)
            return trio.lowlevel.Abort.SUCCEEDED

        result: host_pb2.TurnResult = await trio.lowlevel.wait_task_rescheduled(abort)
        kind = result.WhichOneof("outcome")
        if kind == "response":
            return result.response
        if kind == "error":
            raise turn_error(inv, result.error, self.node)
        raise InvalidArgument(f"the host answered turn {tid} with neither response nor error")

    def deliver(self, result: host_pb2.TurnResult) -> None:
        """A TurnResult arrived: wake the turn waiting for it (late ones are dropped)."""
        task = self._pending.pop(result.id, None)
        if task is not None:
            trio.lowlevel.reschedule(task, outcome.Value(result))

    def close(self) -> None:
        self.closed = True
        pending, self._pending = self._pending, {}
        for task in pending.values():
            trio.lowlevel.reschedule(
                task,
                outcome.Error(
                    HostUnavailable(
                        f"the host of {self.system} ({self.peer}) disconnected with the "
                        "turn in flight"
                    )
                ),
            )


def turn_error(
    inv: proto.ActorInvocation, err: host_pb2.TurnError, node: str = ""
) -> SpawnmeshError:
    """The error a TurnError stands for (a handler failure unless it names another code)."""
    if err.code in ("", ActorFailed.code):
        aid = inv.actor
        who = f"{aid.system}/{aid.name}"
        return ActorFailed(who, err.type or "HostError", err.message, err.traceback, node)
    return from_wire({"code": err.code, "message": err.message})


class HostSystem:
    """One registered actor system and the transports that reach its host."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sessions: list[Transport] = []
        self.callback: Transport | None = None
        self.tags: dict[str, dict[str, str]] = {}
        self.stateful: dict[str, bool] = {}

    def pick(self) -> Transport:
        """The least loaded live transport; HostUnavailable if none (fail fast)."""
        if self.sessions:
            return min(self.sessions, key=lambda s: s.load())
        if self.callback is not None:
            return self.callback
        raise HostUnavailable(f"no host of actor system {self.name!r} is connected")


CallbackFactory = Callable[[str], Transport]


class HostRegistry:
    """Registered host systems, their transports, and the turns of host actors."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        transport: str = "any",
        callback_factory: CallbackFactory | None = None,
        on_registered: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.runtime = runtime
        self.on_registered = on_registered
        """Called after a registration (the node advertises the new actor types)."""
        self.transport = transport
        self.callback_factory = callback_factory
        self.systems: dict[str, HostSystem] = {}
        self._inflight: dict[tuple[str, str], Any] = {}
        """Host actors whose turn is on a host right now -> that turn (for nested calls)."""

    # ------------------------------------------------------------------ registration

    def is_host_actor(self, system: str, name: str) -> bool:
        """Whether ``system/name`` is a definition registered by a host."""
        hs = self.systems.get(system)
        return hs is not None and name in hs.tags

    async def register(
        self, req: spawn.RegistrationRequest, session: StreamSession | None = None
    ) -> spawn.RegistrationResponse:
        """Validate and register a host's actor system (replacing an earlier registration);
        with ``session``, attach that stream as a transport of the system."""
        problem = registration.check_version(req.service_info)
        if problem is not None:
            raise VersionMismatch(problem[1])
        extra: list[registration.Violation] = []
        if req.host_address and self.transport == "stream":
            extra.append(
                (
                    "host_address",
                    "this node only sends turns over Connect streams (host.transport = stream)",
                )
            )
        if not req.host_address and self.transport == "callback":
            extra.append(
                (
                    "host_address",
                    "this node only calls hosts back (host.transport = "
                    "callback): give the address of your HostService",
                )
            )
        try:
            reg = registration.build(req, self._forward, self._taken)
        except RegistrationInvalid as exc:
            raise RegistrationInvalid(exc.violations + extra) from None
        if extra:
            raise RegistrationInvalid(extra)
        self.runtime.metrics.host_registrations_total += 1
        hs = self.systems.get(reg.system)
        if hs is None:
            hs = self.systems[reg.system] = HostSystem(reg.system)
        for adef in reg.defs:
            self.runtime.register(adef, replace=True)
            hs.tags[adef.name] = dict(adef.tags)
            hs.stateful[adef.name] = adef.stateful
        if reg.host_address and self.callback_factory is not None:
            if hs.callback is not None:
                hs.callback.close()
            hs.callback = self.callback_factory(reg.host_address)
        if session is not None:
            session.system = reg.system
            session.node = self.runtime.node_id
            hs.sessions.append(session)
        log.info(
            "host registered actor system %s (%s) via %s: %s",
            reg.system,
            "callback " + reg.host_address if reg.host_address else "stream",
            session.peer if session is not None else "Register",
            ", ".join(registration.names(reg.defs)),
        )
        if self.on_registered is not None:
            try:
                await self.on_registered()
            except SpawnmeshError as exc:
                log.warning("could not advertise the actor types of %s: %s", reg.system, exc)
        for adef in reg.defs:  # timers and channels work from the start, as for SDK actors
            if adef.kind is Kind.NAMED and (adef.timers or adef.channels):
                try:
                    await self.runtime.ensure_active(ActorId(adef.system, adef.name))
                except SpawnmeshError as exc:
                    log.warning("could not activate %s/%s: %s", adef.system, adef.name, exc)
        return spawn.RegistrationResponse(
            status=spawn.RequestStatus(status=spawn.Status.OK, message="registered"),
            proxy_info=spawn.ProxyInfo(
                protocol_major_version=registration.PROTOCOL_MAJOR,
                protocol_minor_version=registration.PROTOCOL_MINOR,
                proxy_name="spawnmesh",
                proxy_version=__version__,
            ),
        )

    def _taken(self, system: str, name: str) -> bool:
        return self.runtime.definition(system, name) is not None and not self.is_host_actor(
            system, name
        )

    def detach(self, session: StreamSession) -> None:
        """A stream ended: fail its turns in flight; its system stays registered (its actors
        fail fast with HostUnavailable until a host attaches again)."""
        session.close()
        hs = self.systems.get(session.system)
        if hs is not None and session in hs.sessions:
            hs.sessions.remove(session)
            log.warning(
                "host of %s disconnected (%s); %d sessions left",
                hs.name,
                session.peer,
                len(hs.sessions),
            )

    def close(self) -> None:
        """Fail every transport (the host API is stopping)."""
        for hs in self.systems.values():
            for s in list(hs.sessions):
                s.close()
            hs.sessions.clear()
            if hs.callback is not None:
                hs.callback.close()
                hs.callback = None

    # ------------------------------------------------------------------ turns

    def _forward(self, action: str) -> Handler:
        async def handler(ctx: Context[Any], payload: Any) -> Reply:
            return await self.turn(ctx, action, payload)

        handler.__qualname__ = f"host_action[{action}]"
        return handler

    async def turn(self, ctx: Context[Any], action: str, payload: Any) -> Reply:
        """Run one turn of a host actor on its host; returns the Reply the runtime commits."""
        sid = ctx.self_id
        hs = self.systems.get(sid.system)
        if hs is None:
            raise HostUnavailable(f"no host of actor system {sid.system!r} is registered")
        transport = hs.pick()
        defname = sid.parent or sid.name
        inv = proto.ActorInvocation(action_name=action)
        set_id(inv.actor, sid)
        cc = inv.current_context
        set_id(cc.self, sid)
        if ctx.caller is not None:
            set_id(inv.caller, ctx.caller)
            set_id(cc.caller, ctx.caller)
        if hs.stateful.get(defname, False):
            state = any_or_none(ctx.state)
            if state is not None:
                set_any(cc.state, state)
        if ctx.metadata:
            cc.metadata.update(ctx.metadata)
        tags = hs.tags.get(defname)
        if tags:
            cc.tags.update(tags)
        value = to_any(payload)
        if value is None:
            inv.noop.SetInParent()
        else:
            set_any(inv.value, value)
        deadline = trio.current_effective_deadline()
        timeout_ms = (
            0
            if deadline == math.inf
            else max(1, math.ceil((deadline - trio.current_time()) * 1000))
        )
        key = sid.key
        self._inflight[key] = _CURRENT.get()
        metrics = self.runtime.metrics
        metrics.host_turns_total += 1
        tracer = self.runtime.tracer
        try:
            if tracer is None:
                resp = await transport.call(inv, timeout_ms)
            else:  # the host continues the trace from the turn's context metadata
                attrs = {"spawnmesh.actor": str(sid), "spawnmesh.action": action}
                with tracer.span("spawnmesh.host.turn", "client", attrs):
                    cc.metadata.update(tracer.carrier())
                    resp = await transport.call(inv, timeout_ms)
        except SpawnmeshError as exc:
            errors = metrics.host_turn_errors
            errors[exc.code] = errors.get(exc.code, 0) + 1
            raise
        finally:
            self._inflight.pop(key, None)
        return self._reply(sid, resp)

    def _reply(self, sid: ActorId, resp: proto.ActorInvocationResponse) -> Reply:
        value = any_in(resp.value) if resp.HasField("value") else None
        reply = Reply(value)
        if resp.HasField("updated_context") and resp.updated_context.HasField("state"):
            reply.state = any_in(resp.updated_context.state)
        if resp.HasField("workflow"):
            wf = resp.workflow
            for eff in wf.effects:
                if not eff.HasField("request"):
                    continue
                req = eff.request
                pid = req.actor.id if req.HasField("actor") else None
                target = actor_id(pid, sid.system, req.register_ref)
                delay = max(0, req.scheduled_to - wall_ms()) if req.scheduled_to else None
                payload = any_in(req.value) if req.HasField("value") else None
                reply.effect(
                    target,
                    req.action_name,
                    self._payload_for(target, req.action_name, payload),
                    metadata=dict(req.metadata) or None,
                    delay_ms=delay,
                )
            if wf.HasField("broadcast"):
                b = wf.broadcast
                out = any_in(b.value) if b.HasField("value") else None
                reply.broadcast(b.channel_group, from_any(out, None), action=b.action_name or None)
            routing = wf.WhichOneof("routing")
            if routing is not None:
                route = wf.pipe if routing == "pipe" else wf.forward
                if not route.actor or not route.action_name:
                    raise InvalidArgument("a pipe or forward needs an actor and an action_name")
                target = ActorId(sid.system, route.actor, route.register_ref or None)
                if routing == "pipe":
                    reply.value = self._payload_for(target, route.action_name, value)
                    reply.pipe(target, route.action_name)
                else:
                    reply.forward(target, route.action_name)
        if resp.checkpoint:
            reply.checkpoint = True
        return reply

    def _payload_for(self, target: ActorId, action: str, value: AnyMsg | None) -> Any:
        """A payload for ``target``: host actors take the Any as is, SDK actors their
        action's payload type."""
        if self.is_host_actor(target.system, target.parent or target.name):
            return value
        adef = self.runtime.definition_for(target)
        ad = adef.actions.get(action) if adef is not None else None
        return from_any(value, ad.payload_type if ad is not None else None)

    # ------------------------------------------------------------------ the host's calls

    async def invoke(
        self, req: proto.InvocationRequest, timeout_ms: int | None
    ) -> proto.InvocationResponse:
        """A host's (or any gRPC client's) InvocationRequest, run like any invocation."""
        pid = req.actor.id if req.HasField("actor") else None
        target = actor_id(pid, req.system.name, req.register_ref)
        if not target.system:
            raise InvalidArgument("the invocation names no actor system")
        if not req.action_name:
            raise InvalidArgument("the invocation names no action")
        arg = any_in(req.value) if req.HasField("value") else None
        payload = self._payload_for(target, req.action_name, arg)
        metadata: Mapping[str, str] = dict(req.metadata)
        turn = None
        if req.caller.name:
            turn = self._inflight.get((req.caller.system or target.system, req.caller.name))
        if getattr(req, "async") or req.scheduled_to:
            self.runtime.cast_nowait(
                target,
                req.action_name,
                payload,
                metadata=metadata,
                at_epoch_ms=req.scheduled_to or None,
                caller=actor_id(req.caller, target.system) if req.caller.name else None,
            )
            await trio.lowlevel.checkpoint()
            value = None
        else:
            token = _CURRENT.set(turn) if turn is not None else None
            try:
                value = await self.runtime.invoke(
                    target, req.action_name, payload, metadata=metadata, timeout_ms=timeout_ms
                )
            finally:
                if token is not None:
                    _CURRENT.reset(token)
        resp = proto.InvocationResponse()
        resp.status.status = proto.OK
        resp.system.name = target.system
        set_id(resp.actor.id, target)
        out = to_any(value)
        if out is None:
            resp.noop.SetInParent()
        else:
            set_any(resp.value, out)
        return resp

    async def spawn(self, req: spawn.SpawnRequest) -> spawn.SpawnResponse:
        """Spawn each named instance of its UNNAMED template."""
        for pid in req.actors:
            aid = actor_id(pid)
            if not aid.system or not aid.parent:
                raise InvalidArgument(f"spawning {aid} needs a system and a parent template")
            await self.runtime.spawn(aid.system, aid.name, aid.parent)
        return spawn.SpawnResponse(status=spawn.RequestStatus(status=spawn.Status.OK))
