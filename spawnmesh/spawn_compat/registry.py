"""Spawn-registered actor systems on one node, and the turn of a Spawn actor.

A Spawn host's registration becomes ordinary :class:`ActorDef`s (validated and mapped by
:mod:`spawnmesh.host.registration`, as for gRPC hosts), so placement, persistence, encryption,
timers, channels, passivation and the mesh treat them like any actor. What differs is the turn:
each one is an HTTP ``POST /api/v1/actors/actions`` to the host with an ``ActorInvocation``
(:mod:`spawnmesh.spawn_compat.turns`), and around it the node does what Spawn's proxy does
(eigr/spawn ``lib/actors/actor/entity/invocation.ex``, ``lifecycle.ex``,
``interface/http.ex``):

- the state is a :class:`SpawnState` (the state ``Any`` kept verbatim, and the tags); an actor
  with nothing stored starts from its registered ``Actor.state`` (else an empty message of
  ``settings.state_type``), with the registered tags;
- the default actions (``get``, ``Get``, ``get_state``, ``getState``, ``GetState``) are answered
  by the node with the current state, unless the host registered one of them (then they all go
  to the host, as in Spawn);
- on activation the first registered ``init``/``Init``/``setup``/``Setup`` action runs before
  any other turn (Noop payload, the actor as its own caller); its new state is kept, its errors
  are logged and ignored;
- named actors are activated at registration (stateful ones, and those with timers or channel
  subscriptions), in the background after the registration is answered;
- a later registration of the same system replaces the actors' settings and adds new actors;
  live activations and their state stay (their handlers read the current registration).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from spawnmesh._version import __version__
from spawnmesh.actors.context import Context, Reply
from spawnmesh.actors.definition import ActionDef, ActorDef, Handler, Kind
from spawnmesh.actors.runtime import _CURRENT  # the running turn (nested calls from a host)
from spawnmesh.clock import wall_ms
from spawnmesh.errors import (
    ActorFailed,
    HostUnavailable,
    NoOwner,
    SpawnmeshError,
    VersionMismatch,
)
from spawnmesh.host import registration
from spawnmesh.host.convert import from_any
from spawnmesh.host.gen import spawn
from spawnmesh.host.gen.google.protobuf import Any as AnyMsg
from spawnmesh.host.gen.spawn import actors as pba
from spawnmesh.ids import ActorId
from spawnmesh.spawn_compat.busypoll import BusyPoll
from spawnmesh.spawn_compat.http_client import HttpPool
from spawnmesh.spawn_compat.turns import Parts, build_invocation, read_response
from spawnmesh.spawn_compat.values import RawAny, SpawnState, any_parts, initial_state

if TYPE_CHECKING:
    from spawnmesh.actors.runtime import Runtime

log = logging.getLogger("spawnmesh.spawn")

ACTIONS_PATH = "/api/v1/actors/actions"
"""Where a Spawn host receives its turns."""
DEFAULT_ACTIONS = ("get", "Get", "get_state", "getState", "GetState")
"""Spawn's default actions: answered with the state unless the host registered one."""
INIT_ACTIONS = ("init", "Init", "setup", "Setup")
"""Spawn's init actions: the first registered one runs on activation."""
ACTIVATE = "spawnmesh:activate"
"""Internal action invoked to activate an actor at registration (runs its init action)."""
REGISTERED_MESSAGE = "Accepted"
"""``RequestStatus.message`` of an accepted registration or spawn (Spawn's proxy's text)."""
PROTOCOL = (1, 2)
"""``ProxyInfo`` protocol version Spawn's proxy answers with (major, minor)."""


@dataclasses.dataclass(slots=True)
class SpawnActor:
    """The current registration of one actor (replaced by a re-registration)."""

    name: str
    stateful: bool
    init_action: str | None
    local_defaults: bool
    """Whether the node answers the default actions (the host registered none)."""
    initial: SpawnState
    """The registered state and tags (also the context of stateless actors)."""


class SpawnSystem:
    """One registered actor system: its host's address and its actors."""

    def __init__(self, name: str, pool: HttpPool) -> None:
        self.name = name
        self.pool = pool
        self.actors: dict[str, SpawnActor] = {}


CallbackAddress = Callable[[spawn.RegistrationRequest, str], tuple[str, int]]
"""(registration, registering peer's IP) -> the host's (address, port) for turns."""


class SpawnRegistry:
    """The Spawn systems registered on this node and the turns of their actors."""

    def __init__(
        self,
        runtime: Runtime,
        callback_address: CallbackAddress,
        *,
        default_timeout_ms: int,
        max_connections: int = 64,
        max_response_bytes: int = 4 * 1024 * 1024,
        on_registered: Callable[[], Awaitable[None]] | None = None,
        busy_poll: BusyPoll | None = None,
    ) -> None:
        self.runtime = runtime
        self.busy_poll = busy_poll
        self.callback_address = callback_address
        self.default_timeout_ms = default_timeout_ms
        self.max_connections = max_connections
        self.max_response_bytes = max_response_bytes
        self.on_registered = on_registered
        self.systems: dict[str, SpawnSystem] = {}
        self.nursery: trio.Nursery | None = None
        """Where background activations run (set by the proxy service)."""
        self._inited: dict[tuple[str, str], int] = {}
        """Actor key -> the activation epoch whose init action has run."""
        self._inflight: dict[tuple[str, str], Any] = {}
        """Spawn actors whose turn is on the host right now -> that turn (nested calls)."""

    # ------------------------------------------------------------------ registration

    def is_spawn_def(self, adef: ActorDef) -> bool:
        """Whether ``adef`` was registered by a Spawn host on this node."""
        ss = self.systems.get(adef.system)
        return ss is not None and adef.name in ss.actors

    def _taken(self, system: str, name: str) -> bool:
        adef = self.runtime.definition(system, name)
        return adef is not None and not self.is_spawn_def(adef)

    async def register(
        self, req: spawn.RegistrationRequest, peer: str
    ) -> spawn.RegistrationResponse:
        """Validate and register (or merge) a host's actor system; raises DefinitionError
        (RegistrationInvalid, naming every problem) or VersionMismatch."""
        problem = registration.check_version(req.service_info)
        if problem is not None:
            raise VersionMismatch(problem[1])
        reg = registration.build(req, lambda action: self._forward(action), self._taken)
        address = self.callback_address(req, peer)
        ss = self.systems.get(reg.system)
        if ss is None or (ss.pool.host, ss.pool.port) != address:
            old = ss
            ss = SpawnSystem(
                reg.system,
                HttpPool(
                    address[0],
                    address[1],
                    max_connections=self.max_connections,
                    max_response_bytes=self.max_response_bytes,
                    busy_poll=self.busy_poll,
                ),
            )
            if old is not None:
                ss.actors = old.actors
                old.pool.close()
            self.systems[reg.system] = ss
        system_pb = req.actor_system
        pb_actors = system_pb.registry.actors if system_pb and system_pb.registry else {}
        defs = []
        for adef in reg.defs:
            spec, new = self._spawn_def(adef, pb_actors[adef.name])
            ss.actors[adef.name] = spec
            defs.append(new)
        for new in defs:
            self.runtime.register(new, replace=True)
        log.info(
            "Spawn host at %s registered actor system %s: %s",
            ss.pool.address,
            reg.system,
            ", ".join(registration.names(defs)),
        )
        if self.on_registered is not None:
            try:
                await self.on_registered()
            except SpawnmeshError as exc:
                log.warning("could not advertise the actor types of %s: %s", reg.system, exc)
        if self.nursery is not None:
            for new in defs:
                if new.kind is Kind.NAMED and (new.stateful or new.timers or new.channels):
                    self.nursery.start_soon(self._activate, ActorId(new.system, new.name))
        return spawn.RegistrationResponse(
            status=spawn.RequestStatus(status=spawn.Status.OK, message=REGISTERED_MESSAGE),
            proxy_info=spawn.ProxyInfo(
                protocol_major_version=PROTOCOL[0],
                protocol_minor_version=PROTOCOL[1],
                proxy_name="spawnmesh",
                proxy_version=__version__,
            ),
        )

    def _spawn_def(self, adef: ActorDef, actor: pba.Actor) -> tuple[SpawnActor, ActorDef]:
        """The Spawn form of a definition built by ``registration.build``: Spawn's state and
        actions, its default and init actions."""
        st = actor.state
        state_any = st.state if st is not None else None
        parts = (state_any.type_url, state_any.value) if state_any is not None else None
        settings = actor.settings or pba.ActorSettings()
        tags = {**adef.tags, **(st.tags if st is not None else {})}
        initial = initial_state(parts, settings.state_type, tags)
        names = [a.name for a in actor.actions]
        init = next((n for n in names if n in INIT_ACTIONS), None)
        local_defaults = not any(n in adef.actions for n in DEFAULT_ACTIONS)
        spec = SpawnActor(adef.name, adef.stateful, init, local_defaults, initial)
        actions = {
            name: ActionDef(name, self._forward(name), None, RawAny) for name in adef.actions
        }
        for name in DEFAULT_ACTIONS:
            if name not in actions:
                fn = self._state_action() if local_defaults else self._forward(name)
                actions[name] = ActionDef(name, fn, None, RawAny)
        actions[ACTIVATE] = ActionDef(ACTIVATE, self._activation_action(), None, None)
        new = dataclasses.replace(
            adef,
            actions=actions,
            state_type=SpawnState if adef.stateful else None,
            initial_state=(lambda: initial) if adef.stateful else None,
        )
        return spec, new

    async def _activate(self, aid: ActorId) -> None:
        """Activate a named actor where it is owned (its init action runs there). Placement
        learns the new actor types through membership a moment after the registration:
        until then NoOwner is waited out, within the default deadline."""
        backoff = 0.01
        with trio.move_on_after(self.default_timeout_ms / 1000):
            while True:
                try:
                    await self.runtime.invoke(aid, ACTIVATE)
                    return
                except NoOwner:
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 0.2)
                except SpawnmeshError as exc:
                    log.warning("could not activate %s at registration: %s", aid, exc)
                    return
        log.warning("could not activate %s at registration: no owner in time", aid)

    def close(self) -> None:
        """Close every host connection pool for good."""
        for ss in self.systems.values():
            ss.pool.close()

    def close_idle(self) -> None:
        """Close the idle host connections (the proxy stopped; turns may still reopen)."""
        for ss in self.systems.values():
            ss.pool.close_idle()

    # ------------------------------------------------------------------ handlers

    def _forward(self, action: str) -> Handler:
        async def handler(ctx: Context[Any], payload: Any) -> Reply:
            return await self.turn(ctx, action, payload)

        handler.__qualname__ = f"spawn_action[{action}]"
        return handler

    def _state_action(self) -> Handler:
        async def handler(ctx: Context[Any], payload: Any) -> Reply:
            _, spec, state = await self._prepare(ctx)
            parts = state.any()
            reply = Reply(RawAny(type_url=parts[0], value=parts[1]) if parts else None)
            if spec.stateful:
                reply.state = state
            return reply

        handler.__qualname__ = "spawn_default_action"
        return handler

    def _activation_action(self) -> Handler:
        async def handler(ctx: Context[Any], payload: Any) -> Reply:
            _, spec, state = await self._prepare(ctx)
            reply = Reply(None)
            if spec.stateful:
                reply.state = state
            return reply

        handler.__qualname__ = "spawn_activate"
        return handler

    def _lookup(self, sid: ActorId) -> tuple[SpawnSystem, SpawnActor]:
        ss = self.systems.get(sid.system)
        spec = ss.actors.get(sid.parent or sid.name) if ss is not None else None
        if ss is None or spec is None:
            raise HostUnavailable(f"no Spawn host registered {sid.system}/{sid.parent or sid.name}")
        return ss, spec

    async def _prepare(self, ctx: Context[Any]) -> tuple[SpawnSystem, SpawnActor, SpawnState]:
        """The system, registration and state of the turn's actor, after its init action
        if this activation has not run it yet."""
        sid = ctx.self_id
        ss, spec = self._lookup(sid)
        state: SpawnState = ctx.state if spec.stateful else spec.initial
        if spec.init_action is None:
            return ss, spec, state
        act = self.runtime._table.get(sid.key)  # the activation: its epoch tells a new one
        epoch = act.epoch if act is not None else -1
        if self._inited.get(sid.key) == epoch:
            return ss, spec, state
        state, done = await self._init(ss, spec, sid, state)
        if done:
            self._inited[sid.key] = epoch
            if len(self._inited) > 2 * len(self.runtime._table) + 1024:
                self._prune()
        if spec.stateful:
            ctx.state = state
        return ss, spec, state

    def _prune(self) -> None:
        table = self.runtime._table
        self._inited = {
            k: e
            for k, e in self._inited.items()
            if (a := table.get(k)) is not None and a.epoch == e
        }

    async def _init(
        self, ss: SpawnSystem, spec: SpawnActor, sid: ActorId, state: SpawnState
    ) -> tuple[SpawnState, bool]:
        """Run the init action; (new state, whether the host answered). Errors are logged
        and otherwise ignored, as Spawn does; an unreachable host is tried again next turn."""
        assert spec.init_action is not None
        body = build_invocation(sid, spec.init_action, state.any(), state.tags, {}, sid, None)
        try:
            status, data = await ss.pool.post(ACTIONS_PATH, body)
        except HostUnavailable as exc:
            log.warning("init action %s of %s: %s", spec.init_action, sid, exc)
            return state, False
        if not 200 <= status < 300:
            log.warning(
                "init action %s of %s: the host answered HTTP %d", spec.init_action, sid, status
            )
            return state, True
        try:
            res = read_response(data, sid, {}, wall_ms())
        except SpawnmeshError as exc:
            log.warning("init action %s of %s: %s", spec.init_action, sid, exc)
            return state, True
        if res.has_context:
            state = state.with_any(res.state, res.tags)
        return state, True

    async def turn(self, ctx: Context[Any], action: str, payload: Any) -> Reply:
        """One turn on the host: ActorInvocation out, ActorInvocationResponse in."""
        ss, spec, state = await self._prepare(ctx)
        sid = ctx.self_id
        metadata = ctx.metadata
        body = build_invocation(
            sid, action, state.any(), state.tags, metadata, ctx.caller, any_parts(payload)
        )
        key = sid.key
        self._inflight[key] = _CURRENT.get()
        try:
            status, data = await ss.pool.post(ACTIONS_PATH, body)
        finally:
            self._inflight.pop(key, None)
        if not 200 <= status < 300:
            text = data[:300].decode("utf-8", "replace")
            raise ActorFailed(
                str(sid),
                "HostError",
                f"the host answered HTTP {status}: {text}",
                "",
                self.runtime.node_id,
            )
        res = read_response(data, sid, metadata, wall_ms())
        value = RawAny(type_url=res.value[0], value=res.value[1]) if res.value else None
        reply = Reply(value)
        if spec.stateful:
            reply.state = state.with_any(res.state, res.tags) if res.has_context else state
        for eff in res.effects:
            reply.effect(
                eff.target,
                eff.action,
                self.payload_for(eff.target, eff.action, eff.payload),
                metadata=eff.metadata,
                delay_ms=eff.delay_ms,
            )
        if res.broadcast is not None:
            channel, parts, bcast_action = res.broadcast
            raw = RawAny(type_url=parts[0], value=parts[1]) if parts else None
            reply.broadcast(channel, raw, action=bcast_action or None)
        route = res.route
        if route is not None:  # both as a pipe of the right value, converted for the target
            if route.pipe:
                reply.value = self.payload_for(route.target, route.action, res.value)
            else:
                reply.value = self.value_for(route.target, route.action, payload)
            reply.pipe(route.target, route.action)
        if res.checkpoint:
            reply.checkpoint = True
        return reply

    # ------------------------------------------------------------------ values

    def payload_for(self, target: ActorId, action: str, parts: Parts | None) -> Any:
        """A Spawn value for ``target.action``: Spawn actors (and actors this node does not
        know) take the Any as is; SDK and gRPC-hosted actors get their action's payload type,
        as the gRPC host path converts it."""
        if parts is None:
            return None
        return self.value_for(target, action, RawAny(type_url=parts[0], value=parts[1]))

    def value_for(self, target: ActorId, action: str, value: Any) -> Any:
        """``value`` made fit for ``target.action``: an Any is converted for SDK and
        gRPC-hosted targets; anything else (a value an SDK actor sent) goes on unchanged."""
        if value.__class__ is not RawAny and not isinstance(value, AnyMsg):
            return value
        adef = self.runtime.definition_for(target)
        if adef is None or self.is_spawn_def(adef):
            return value
        ad = adef.actions.get(action)
        return from_any(value, ad.payload_type if ad is not None else None)

    def inflight_turn(self, caller: ActorId) -> Any:
        """The turn of ``caller`` that is on its host right now, if any (a host calling
        another actor from inside an action: the call joins that turn's chain)."""
        return self._inflight.get(caller.key)
