"""The mesh router: sends each invocation to the node that owns its actor, serves invocations
from peers, and hands actors off when the membership view changes.

Ownership is a pure function of the live view (:class:`~spawnmesh.cluster.placement.Placement`),
so there is no directory: every node with the same view picks the same owner. Views differ for a
moment during churn; then an invocation may reach a node that no longer owns its actor: that
node forwards it once, and past that answers ``NotOwner`` naming the owner it believes in, and
the caller retries within its deadline. Two nodes may briefly both activate one actor; the
statestore's fencing rejects the stale one's writes (``StaleActivation``: counted, the activation
dropped, the turn retried on fresh state), and hand-off makes the window small: the old owner
stops taking turns as soon as it sees the new view, and the new owner asks the old one to
release (finish, flush, forget) the actor before its first load.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from spawnmesh.actors.context import Broadcast
from spawnmesh.actors.definition import ActorDef, Kind
from spawnmesh.cluster.messages import NodeMeta
from spawnmesh.cluster.placement import Placement
from spawnmesh.cluster.state import Status
from spawnmesh.codec import convert, to_builtins
from spawnmesh.errors import (
    InvalidArgument,
    InvocationTimeout,
    NoOwner,
    NotOwner,
    PeerUnavailable,
    SpawnmeshError,
)
from spawnmesh.ids import ActorId
from spawnmesh.wire import messages as m

if TYPE_CHECKING:
    from spawnmesh.actors.activation import Activation
    from spawnmesh.actors.runtime import Runtime
    from spawnmesh.ops.metrics import Metrics
    from spawnmesh.wire.peer import PeerNode

log = logging.getLogger("spawnmesh.mesh")

Key = tuple[str, str]

_OWNER_CACHE_MAX = 100_000
"""Owner lookups cached per placement (a ring lookup hashes the key: ~0.7 us)."""

MAX_HOPS = 1
"""A node that receives an invocation it does not own forwards it this many times at most."""

KIND_NAMES = {k: k.name.lower() for k in m.Kind}
"""Request kinds as metric labels and span names (``call``, ``cast``, ...)."""

_encode = msgspec.msgpack.Encoder().encode
_PLAIN = frozenset({bytes, str, int, float, bool})
_decode = msgspec.msgpack.Decoder().decode


def actor_type(adef: ActorDef) -> str:
    """The placement type of a definition: ``system/name``."""
    return f"{adef.system}/{adef.name}"


def encode_value(value: Any) -> bytes:
    """A payload or reply as it travels: msgpack of its builtins (empty for None)."""
    if value is None:
        return b""
    try:
        if value.__class__ in _PLAIN:  # msgpack's own types travel as they are (bytes as bin)
            return _encode(value)
        return _encode(to_builtins(value))
    except (TypeError, ValueError, msgspec.EncodeError) as exc:
        raise InvalidArgument(f"value cannot cross the wire: {exc}") from None


def decode_value(data: bytes | None, typ: Any = None) -> Any:
    """The inverse of :func:`encode_value`, converted to ``typ`` when one is known."""
    if not data:
        return None
    try:
        value = _decode(data)
    except msgspec.DecodeError as exc:
        raise InvalidArgument(f"payload is not msgpack: {exc}") from None
    return value if typ is None else convert(value, typ)


def decode_reply(data: bytes | None, typ: Any) -> Any:
    """A reply value, typed like the action's annotation when it converts (else builtins:
    the caller may run other code than the owner during an upgrade)."""
    value = decode_value(data)
    if typ is None or value is None:
        return value
    try:
        return convert(value, typ)
    except SpawnmeshError:
        return value


class Router:
    """Routing of one node (implements the runtime's ``Routing`` protocol)."""

    def __init__(
        self,
        runtime: Runtime,
        peers: PeerNode,
        metrics: Metrics,
        node_id: str,
        *,
        default_timeout_s: float,
        release_window_s: float = 60.0,
        release_timeout_s: float = 5.0,
    ) -> None:
        self.runtime = runtime
        self.peers = peers
        self.metrics = metrics
        self.node_id = node_id
        self.placement = Placement({})
        self.view_version = 0
        """Bumps on every change of :attr:`placement`."""
        self._previous: Placement | None = None
        self._changed_at = -math.inf
        self._addrs: dict[str, tuple[str, int]] = {}
        self._changed = trio.Event()
        self._default_timeout_s = default_timeout_s
        self._release_window_s = release_window_s
        self._release_timeout_s = release_timeout_s
        self._nursery: trio.Nursery | None = None
        self._pool_counter = itertools.count()
        self._in_flight: dict[str, int] = {}
        self._sending = 0
        """Background sends (casts, broadcasts) in flight."""
        self._sends_idle = trio.Event()
        self._owners: dict[tuple[str, str], str] = {}
        """Owners looked up under the current placement (cleared when it changes)."""
        self._dead: set[str] = set()
        """Members seen dead (their connections were dropped when they died)."""

    # ------------------------------------------------------------------ the view

    def update_view(self, live: Mapping[str, NodeMeta]) -> bool:
        """Adopt a new live view: rebuild placement and hand off what this node no longer
        owns. Returns whether placement changed."""
        self._addrs = {n: (meta.peer_addr[0], meta.peer_addr[1]) for n, meta in live.items()}
        new = Placement(live, reuse=self.placement)
        if new == self.placement:
            return False
        self._previous, self.placement = self.placement, new
        self._owners = {}
        self._changed_at = trio.current_time()
        self.view_version += 1
        self._changed.set()
        self._changed = trio.Event()
        moving = self.runtime.hand_off(self._still_owned)
        if moving:
            log.info("placement %s: handing off %d actors", new.version, moving)
        if self._nursery is not None and self.node_id in self._addrs:
            # actors with timers or channels that this node owns now
            self._nursery.start_soon(self.runtime.activate_eager)
        return True

    def _still_owned(self, act: Activation) -> bool:
        return self.placement.owner(actor_type(act.adef), act.id.name) == self.node_id

    async def run(self, membership: Any, *, task_status: trio.TaskStatus[None]) -> None:
        """Follow ``membership`` (``live()``, ``version``, ``wait_changed``) and host the
        background sends; runs under the node's supervisor."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            version = membership.version
            self.update_view(membership.live())
            self._disconnect_dead(membership)
            task_status.started()
            try:
                while True:
                    version = await membership.wait_changed(version)
                    self.update_view(membership.live())
                    self._disconnect_dead(membership)
            finally:
                self._nursery = None

    def _disconnect_dead(self, membership: Any) -> None:
        """Drop the connections to members just declared dead. Requests in flight to one fail
        at once and are re-routed (a partitioned member would hold them until the peer
        layer's idle timeout), and none is delivered late, once the network heals, to run
        beside its retry. Members that left are not cut: they answer what they received."""
        dead = {v.name for v in membership.members() if v.status is Status.DEAD}
        for name in dead - self._dead:
            self.peers.disconnect(name, "membership declared it dead")
        self._dead = dead

    async def _view_change_or(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await self._changed.wait()

    # ------------------------------------------------------------------ ownership

    def owner(self, target: ActorId, adef: ActorDef, *, incoming: bool = False) -> str:
        """The node that owns ``target`` under the current view. When no live member hosts
        its type, this node does (it has the definition): its own advertisement of a type a
        host just registered has not reached its view yet, or it has left its cluster and
        finishes what it accepted while it drains, nobody else being able to. A pool
        has no single owner: a call runs here while a local instance is free (always, when it
        came from a peer), else on the member with the fewest of this node's calls in flight."""
        t = actor_type(adef)
        if adef.kind is Kind.POOLED:
            members = self.placement.members(t)
            if not members:  # this node hosts it (see the docstring)
                return self.node_id
            if self.node_id in members and (incoming or self.runtime.pool_has_room(adef)):
                return self.node_id
            n = next(self._pool_counter)
            pick = self.placement.pool_pick(t, str(n), adef.pool_size, self._in_flight)
            assert pick is not None
            return pick
        key = (t, target.name)
        owner = self._owners.get(key)
        if owner is None:
            owner = self.placement.owner(t, target.name)
            if owner is None:  # this node hosts it (see the docstring)
                return self.node_id
            if len(self._owners) >= _OWNER_CACHE_MAX:
                self._owners.clear()
            self._owners[key] = owner
        return owner

    def remote_owner(self, target: ActorId, adef: ActorDef) -> str | None:
        """The owning node if it is another one, else None (Routing protocol)."""
        owner = self.owner(target, adef)
        return None if owner == self.node_id else owner

    def _addr(self, node: str) -> tuple[str, int]:
        addr = self._addrs.get(node)
        if addr is None:
            raise PeerUnavailable(f"node {node} is not a live member")
        return addr

    def _request(
        self,
        kind: m.Kind,
        target: ActorId,
        action: str,
        payload: bytes,
        metadata: Mapping[str, str] | None,
        caller: ActorId | None,
        chain: tuple[Key, ...] = (),
        when_ms: int = 0,
    ) -> m.Request:
        return m.Request(
            0, target.system, target.name, target.parent, action, payload,
            dict(metadata) if metadata else {}, caller, list(chain), None, kind, when_ms,
        )

    # ------------------------------------------------------------------ outbound

    async def invoke_remote(
        self,
        owner: str,
        target: ActorId,
        action: str,
        payload: Any,
        metadata: Mapping[str, str] | None,
        caller: ActorId | None,
        chain: tuple[Key, ...],
    ) -> Any:
        """Run the invocation on ``owner``; when ownership moved (NotOwner, a lost peer),
        re-route and retry until the caller's deadline (the default one if it has none)."""
        adef = self.runtime.definition_for(target)
        if target.parent is None and adef is not None and adef.kind is Kind.UNNAMED:
            target = ActorId(target.system, target.name, adef.name)
        pooled = adef is not None and adef.kind is Kind.POOLED
        ad = adef.actions.get(action) if adef is not None else None
        reply_type = ad.reply_type if ad is not None else None
        req = self._request(m.Kind.CALL, target, action, encode_value(payload), metadata,
                            caller, chain)
        # A caller without a deadline gets the default one, as a bound the owner applies to
        # the turn and this loop to its retries, not as a cancel scope (one costs ~5 us, a
        # sixth of a remote call's CPU here).
        deadline = trio.current_effective_deadline()
        give_up = (trio.current_time() + self._default_timeout_s
                   if deadline == math.inf else math.inf)
        return await self._call(owner, target, action, req, payload, metadata, caller, chain,
                                give_up, deadline, pooled, reply_type)

    async def _call(
        self,
        owner: str,
        target: ActorId,
        action: str,
        req: m.Request,
        payload: Any,
        metadata: Mapping[str, str] | None,
        caller: ActorId | None,
        chain: tuple[Key, ...],
        give_up: float,
        deadline: float | None = None,
        pooled: bool = False,
        reply_type: Any = None,
    ) -> Any:
        backoff = 0.01
        while True:
            if give_up != math.inf:
                left = give_up - trio.current_time()
                if left <= 0:
                    raise InvocationTimeout(
                        f"{target}.{action}: no reply within "
                        f"{self._default_timeout_s * 1000:.0f} ms"
                    )
                req.deadline_ms = math.ceil(left * 1000)
            self.metrics.remote_invocations_total += 1
            if pooled:  # calls in flight per member spread a pool's calls
                self._in_flight[owner] = self._in_flight.get(owner, 0) + 1
            try:
                reply = await self._send(owner, req, deadline)
            except (NotOwner, PeerUnavailable, NoOwner) as exc:
                self.metrics.not_owner_retries_total += 1
                log.debug("%s.%s via %s: %s (re-routing)", target, action, owner, exc)
            else:
                return decode_reply(reply, reply_type)
            finally:
                if pooled:
                    n = self._in_flight[owner] - 1
                    if n:
                        self._in_flight[owner] = n
                    else:
                        del self._in_flight[owner]
            await self._view_change_or(min(backoff, max(0.0, give_up - trio.current_time())))
            backoff = min(backoff * 2, 0.5)
            # an unnamed instance handed off from here is known by its stored row
            adef = self.runtime.definition_for(target) or await self.runtime.learn_template(
                target
            )
            new_owner = self.owner(target, adef)
            if new_owner == self.node_id:  # it moved here: run it locally
                return await self.runtime.invoke_as(target, action, payload, metadata, caller,
                                                    chain)
            owner = new_owner

    async def _send(
        self, node: str, req: m.Request, deadline: float | None = None
    ) -> bytes | None:
        """Send ``req`` to ``node`` and return the reply payload: counted (requests by kind,
        payload bytes, errors by code) and, with tracing on, inside a client span whose
        context travels in the request's ``trace`` field."""
        metrics = self.metrics
        kind = KIND_NAMES[req.kind]
        sent = metrics.peer_requests_sent
        sent[kind] = sent.get(kind, 0) + 1
        metrics.peer_sent_payload_bytes_total += len(req.payload)
        tracer = self.runtime.tracer
        try:
            if tracer is None:
                reply = await self.peers.request(node, self._addr(node), req, deadline=deadline)
            else:
                attrs = {"spawnmesh.actor": str(req.target), "spawnmesh.action": req.action,
                         "spawnmesh.peer": node}
                with tracer.span(f"spawnmesh.peer.{kind}", "client", attrs):
                    req = msgspec.structs.replace(req, trace=tracer.carrier())
                    reply = await self.peers.request(node, self._addr(node), req,
                                                     deadline=deadline)
        except SpawnmeshError as exc:
            errors = metrics.peer_request_errors
            key = ("outbound", exc.code)
            errors[key] = errors.get(key, 0) + 1
            raise
        if reply:
            metrics.peer_received_payload_bytes_total += len(reply)
        return reply

    def cast_remote(
        self,
        owner: str,
        target: ActorId,
        action: str,
        payload: Any,
        metadata: Mapping[str, str] | None,
        caller: ActorId | None,
    ) -> None:
        """Send a fire-and-forget invocation to ``owner`` in the background (Routing)."""
        req = self._request(m.Kind.CAST, target, action, encode_value(payload), metadata, caller)
        self._background(self._cast, owner, target, req)

    async def cast_acked(
        self,
        owner: str,
        target: ActorId,
        action: str,
        payload: Any,
        metadata: Mapping[str, str] | None,
        caller: ActorId | None,
    ) -> None:
        """Send a fire-and-forget invocation to ``owner`` and return once it is queued there
        (or here, if ownership moved here meanwhile); raises what stopped it (Routing)."""
        req = self._request(m.Kind.CAST, target, action, encode_value(payload), metadata, caller)
        await self._deliver_cast(owner, target, req)

    async def _cast(self, owner: str, target: ActorId, req: m.Request) -> None:
        try:
            await self._deliver_cast(owner, target, req)
        except SpawnmeshError as exc:
            log.warning("async invocation %s.%s dropped: %s", target, req.action, exc)

    async def _deliver_cast(self, owner: str, target: ActorId, req: m.Request) -> None:
        """Send a cast until its owner queues it, re-routed while ownership moves, within the
        default timeout (InvocationTimeout past it); an owner's refusal is raised."""
        backoff = 0.01
        with trio.move_on_after(self._default_timeout_s):
            while True:
                self.metrics.remote_invocations_total += 1
                try:
                    await self._send(owner, req)
                    return
                except (NotOwner, PeerUnavailable, NoOwner) as exc:
                    self.metrics.not_owner_retries_total += 1
                    log.debug("cast %s.%s via %s: %s (re-routing)", target, req.action, owner,
                              exc)
                await self._view_change_or(backoff)
                backoff = min(backoff * 2, 0.5)
                # an unnamed instance handed off from here is known by its stored row
                adef = self.runtime.definition_for(target) or await self.runtime.learn_template(
                    target
                )
                try:
                    new_owner = self.owner(target, adef)
                except NoOwner:
                    continue
                if new_owner == self.node_id:
                    payload = decode_value(req.payload, _payload_type(adef, req.action))
                    self.runtime.cast_nowait(target, req.action, payload,
                                             metadata=req.metadata, caller=req.caller)
                    return
                owner = new_owner
        raise InvocationTimeout(f"{target}.{req.action}: no owner took the cast in time")

    def broadcast_remote(self, system: str, b: Broadcast, caller: ActorId | None) -> None:
        """Fan ``b`` out to every other live member (each delivers to its active unnamed
        subscribers; named subscribers are reached through their owner by the sender)."""
        prefix = system + "/"
        targets = [
            n for n in self._addrs
            if n != self.node_id
            and any(t.startswith(prefix) for t in self._types_of(n))
        ]
        if not targets:
            return
        req = self._request(m.Kind.BROADCAST, ActorId(system, b.channel), b.action or "",
                            encode_value(b.payload), None, caller)
        for node in targets:
            self._background(self._send_once, node, req)

    def _types_of(self, node: str) -> list[str]:
        return [t for t in self.placement.actor_types if node in self.placement.members(t)]

    async def _send_once(self, node: str, req: m.Request) -> None:
        with trio.move_on_after(self._default_timeout_s):
            try:
                await self._send(node, req)
            except SpawnmeshError as exc:
                log.warning("broadcast on %s/%s to %s dropped: %s", req.system, req.name, node,
                            exc)

    def _background(self, fn: Any, *args: Any) -> None:
        if self._nursery is None:
            raise PeerUnavailable(f"node {self.node_id}: the mesh router is not running")
        self._sending += 1
        self._nursery.start_soon(self._counted, fn, args)

    async def _counted(self, fn: Any, args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        finally:
            self._sending -= 1
            if not self._sending:
                self._sends_idle.set()

    async def wait_sends(self) -> None:
        """Until every background send (casts, broadcasts) has finished (shutdown)."""
        while self._sending:
            self._sends_idle = trio.Event()
            await self._sends_idle.wait()

    async def spawn_remote(self, owner: str, target: ActorId) -> None:
        """Tell ``owner`` about unnamed instance ``target`` (so calls by name find it)."""
        req = self._request(m.Kind.SPAWN, target, "", b"", None, None)
        await self._send(owner, req)

    async def before_load(self, act: Activation) -> None:
        """Before a first load shortly after a view change, ask the previous owner (if still
        live) to release the actor: it finishes queued turns and flushes, so the load sees
        its last state (Routing protocol)."""
        prev = self._previous
        if prev is None or trio.current_time() - self._changed_at > self._release_window_s:
            return
        old = prev.owner(actor_type(act.adef), act.id.name)
        if old is None or old == self.node_id or old not in self._addrs:
            return
        req = self._request(m.Kind.RELEASE, act.id, "", b"", None, None)
        with trio.move_on_after(self._release_timeout_s):
            try:
                await self._send(old, req)
            except SpawnmeshError as exc:  # gone or unreachable: fencing keeps state safe
                log.debug("release of %s by %s failed: %s", act.id, old, exc)

    # ------------------------------------------------------------------ inbound

    async def handle(self, req: m.Request, origin: str) -> bytes | None:
        """Serve one request from peer ``origin`` (the peer layer's handler)."""
        kind = req.kind
        target = req.target
        if kind is m.Kind.RELEASE:
            await self.runtime.release(target.key)
            return None
        if kind is m.Kind.BROADCAST:
            payload = decode_value(req.payload)
            self.runtime.broadcast(req.system, Broadcast(req.name, payload, req.action or None),
                                   caller=req.caller, unnamed_only=True)
            return None
        adef = self.runtime.definition_for(target)
        if adef is None:
            adef = await self.runtime.learn_template(target)
        owner = self.owner(target, adef, incoming=True)
        if owner != self.node_id:
            if req.hops >= MAX_HOPS:
                raise NotOwner(f"{target}: owned by {owner} in this node's view", owner)
            self.metrics.forwarded_invocations_total += 1
            fwd = msgspec.structs.replace(req, hops=req.hops + 1)
            return await self._send(owner, fwd)
        if kind is m.Kind.SPAWN:
            if target.parent is None:
                raise InvalidArgument(f"spawn of {target} names no template")
            await self.runtime.spawn(target.system, target.name, target.parent)
            return None
        payload = decode_value(req.payload, _payload_type(adef, req.action))
        if kind is m.Kind.CALL:
            chain = tuple((c[0], c[1]) for c in req.chain) if req.chain else ()
            value = await self.runtime.invoke_as(target, req.action, payload, req.metadata,
                                                 req.caller, chain)
            return encode_value(value)
        delay = req.when_ms if kind is m.Kind.DELAYED else None
        at = req.when_ms if kind is m.Kind.SCHEDULED else None
        self.runtime.cast_nowait(target, req.action, payload, metadata=req.metadata,
                                 delay_ms=delay, at_epoch_ms=at, caller=req.caller)
        return None


def _payload_type(adef: ActorDef, action: str) -> Any:
    ad = adef.actions.get(action)
    return ad.payload_type if ad is not None else None
