"""The actor runtime of one node: activation table, turns, invocations, workflows, lifecycle.

Turns: each activation carries a baton (``busy``). An invocation that finds its actor idle
takes the baton and runs the turn in the caller's own task (no task switch, no queue); one that
finds it busy parks in the actor's FIFO queue and is handed the baton in arrival order.
Fire-and-forget invocations queue the same way and run in a task of the runtime's nursery.
Queues are bounded per actor and per node (``Overloaded`` when full).

State: a turn's new state is encoded at the end of every successful turn; that blob is the
committed state (what the writer persists, and what a failing turn is reset to).

Deadlines are trio cancel scopes. An in-process invocation runs the turn in the caller's own
task, so the caller's scopes (``trio.fail_after``...) bound it, and nested invocations inherit
them: the deadline travels with the call chain for free. ``timeout_ms`` adds a scope for that
call only (a cancel scope costs about 5 us, half the budget of an invocation, so none is
entered unless asked for); invocations from the edges (HTTP, peers, hosts) and async turns get
``default_timeout_s``. ``invoke`` is always a cancellation point, and a schedule point at
least every ``SLICE_S`` seconds of continuous running (a full checkpoint costs about 3 us).
"""

from __future__ import annotations

import logging
import math
import traceback
import types
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec
import trio

from spawnmesh.actors.activation import Activation
from spawnmesh.actors.context import _UNSET, Broadcast, Context, Reply
from spawnmesh.actors.definition import STATE_ACTIONS, ActorDef, Kind, WriteThrough
from spawnmesh.actors.kept import Kept, ScheduleKeeper
from spawnmesh.actors.routing import Routing
from spawnmesh.actors.scheduler import Scheduler
from spawnmesh.actors.writer import StateWriter
from spawnmesh.clock import wall_ms
from spawnmesh.codec import convert
from spawnmesh.errors import (
    ActionNotFound,
    ActorFailed,
    ActorNotFound,
    CallCycle,
    DefinitionError,
    InvalidArgument,
    InvocationTimeout,
    NodeShuttingDown,
    Overloaded,
    SpawnmeshError,
    StaleActivation,
    StatestoreUnavailable,
)
from spawnmesh.ids import ActorId, key_str
from spawnmesh.ops.metrics import Metrics
from spawnmesh.statestore.base import Schedule, StateStore, StoredState

if TYPE_CHECKING:
    from spawnmesh.ops.tracing import Tracing

log = logging.getLogger("spawnmesh.runtime")

STALE_RETRIES = 4
"""A turn fenced off (StaleActivation) is retried on fresh state this many times: during a
hand-off the old owner may still write once or twice before it lets go."""

SLICE_S = 0.001
"""Longest stretch a task may run invocations without yielding to the scheduler."""

DROPPED = 0
"""The epoch of an activation fenced off as stale (live ones count from 1)."""

_NO_METADATA: Mapping[str, str] = types.MappingProxyType({})
Key = tuple[str, str]


class _Turn(NamedTuple):
    """The turn running in the current task: used for the caller id and cycle detection."""

    key: Key
    actor_id: ActorId
    chain: tuple[Key, ...]


_CURRENT: ContextVar[_Turn | None] = ContextVar("spawnmesh_turn", default=None)
_EDGE_SPAN: ContextVar[bool] = ContextVar("spawnmesh_edge_span", default=False)
"""Set inside the edge span of a traced invocation (read only when tracing is on)."""


class _Job:
    """A queued fire-and-forget invocation."""

    __slots__ = ("action", "caller", "metadata", "payload", "tick")

    def __init__(
        self, action: str, payload: Any, metadata: Mapping[str, str] | None,
        caller: ActorId | None, *, tick: bool = False,
    ) -> None:
        self.action = action
        self.payload = payload
        self.metadata = metadata
        self.caller = caller
        self.tick = tick
        """A timer's turn."""


class _Held:
    """Casts to an actor being resolved (its template looked up in the store, or its
    hand-off finishing): queued on it in arrival order once resolved."""

    __slots__ = ("done", "jobs")

    def __init__(self) -> None:
        self.jobs: list[_Job] = []
        self.done = trio.Event()


class RuntimeSettings(NamedTuple):
    """The runtime's knobs (from ``ActorsConfig``), in seconds where time."""

    default_timeout_s: float = 30.0
    max_queue_per_actor: int = 1024
    max_queued_per_node: int = 100_000
    deactivate_after_s: float = 60.0
    sweep_interval_s: float = 1.0
    write_behind_s: float = 1.0
    write_batch_max: int = 1000
    schedule_horizon_s: float = 600.0


class Runtime:
    """Hosts the actors of one node (see the module docstring for the execution model)."""

    def __init__(
        self, store: StateStore, metrics: Metrics, settings: RuntimeSettings, node_id: str
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.metrics = metrics
        self.settings = settings
        self._defs: dict[Key, ActorDef] = {}
        self._table: dict[Key, Activation] = {}
        self._spawned: dict[Key, str] = {}
        self._pools: dict[Key, list[Activation]] = {}
        self._subscribers: dict[tuple[str, str], list[ActorDef]] = {}
        self._instances: dict[Key, set[Key]] = {}
        """Active instances of unnamed templates that subscribe to channels."""
        self._queued = 0
        self._busy = 0
        self._epochs = 0
        self._slice_start = 0.0
        self._closing = False
        self._idle = trio.Event()
        """Set when draining and no actor is busy."""
        self._jobs: trio.Nursery | None = None
        self._timeout_s = settings.default_timeout_s
        self._max_q = settings.max_queue_per_actor
        self._max_node_q = settings.max_queued_per_node
        self.writer = StateWriter(
            store,
            metrics,
            node_id=node_id,
            default_interval_ms=int(settings.write_behind_s * 1000),
            batch_max=settings.write_batch_max,
            on_stale=self._drop_stale,
        )
        self.scheduler = Scheduler()
        self.router: Routing | None = None
        """The mesh, when this node is part of a cluster (None: every actor is local)."""
        self._clock: Callable[[], float] = trio.current_time
        """``trio.current_time`` on the hot path; once running, the run's clock's own method
        (the same time, without the run-context lookup: 0.1-0.2 us less per read)."""
        self.tracer: Tracing | None = None
        """OpenTelemetry spans of invocations and turns (None: tracing off, the default)."""
        self._due: dict[Key, deque[Kept]] = {}
        """Due schedules being delivered to actors not active here, in due order, by actor."""
        self._held: dict[Key, _Held] = {}
        """Casts waiting for their actor to be resolved, by actor (invocations wait too)."""
        self._moving: dict[Key, trio.Event] = {}
        """Activations being handed off to their new owner (set when released)."""
        self.schedules = ScheduleKeeper(
            store, metrics, self.scheduler, node_id,
            horizon_ms=int(settings.schedule_horizon_s * 1000),
            on_due=self._fire_schedule, decode=self._schedule_payload,
        )
        """Delayed and scheduled casts, kept in the store until queued."""
        metrics.add_gauge_source(self._gauges)

    # ------------------------------------------------------------------ definitions

    def register(self, adef: ActorDef, *, replace: bool = False) -> None:
        """Add an actor definition (validated). Another definition under the same name is a
        DefinitionError unless ``replace`` (a host re-registering its system)."""
        adef.validate()
        old = self._defs.get((adef.system, adef.name))
        if old is not None and old is not adef and not replace:
            raise DefinitionError(f"actor {adef.system}/{adef.name} is defined twice")
        self._defs[(adef.system, adef.name)] = adef
        for topic in adef.channels:
            subs = self._subscribers.setdefault((adef.system, topic), [])
            subs[:] = [d for d in subs if d.name != adef.name] + [adef]
        snap = adef.snapshot
        if not isinstance(snap, WriteThrough):
            self.writer.note_interval(snap.every_ms)

    def definitions(self) -> list[ActorDef]:
        """Every registered definition."""
        return list(self._defs.values())

    def definition(self, system: str, name: str) -> ActorDef | None:
        """The definition registered under ``system/name``, if any."""
        return self._defs.get((system, name))

    def definition_for(self, target: ActorId) -> ActorDef | None:
        """The definition an invocation of ``target`` would run (named, pooled, or the
        template of an unnamed instance known by reference, spawn or activation)."""
        key = (target.system, target.name)
        act = self._table.get(key)
        if act is not None:
            return act.adef
        adef = self._defs.get(key)
        if adef is not None:
            return adef
        template = target.parent or self._spawned.get(key)
        return self._defs.get((target.system, template)) if template else None

    # ------------------------------------------------------------------ services

    def services(self) -> list[tuple[str, Any]]:
        """(name, serve function) of the runtime's background services, for the supervisor."""
        return [
            ("state-writer", self.writer.run),
            ("scheduler", self.scheduler.run),
            ("passivation", self._sweep_loop),
            ("async-turns", self._serve_jobs),
            ("schedules", self.schedules.run),
        ]

    async def _serve_jobs(self, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._jobs = nursery
                self._clock = trio.lowlevel.current_clock().current_time
                for act in self._table.values():  # restarted: jobs left queued meanwhile
                    if not act.busy and act.waiters:
                        act.busy = True
                        self._busy += 1
                        self._release(act)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._jobs = None

    def _start_job(self, act: Activation, job: _Job) -> bool:
        """Run ``job`` in the runtime's nursery (the baton is held for it); False if the
        service is down (restarting or stopped)."""
        jobs = self._jobs
        if jobs is None:
            return False
        try:
            jobs.start_soon(self._run_job, act, job)
        except RuntimeError:  # the nursery is closing: the service is being restarted
            return False
        return True

    async def activate_eager(self) -> None:
        """Activate named actors that have timers or channel subscriptions, so their timers
        run and they receive broadcasts from the start (as Spawn does at registration)."""
        for adef in list(self._defs.values()):
            if adef.kind is Kind.NAMED and (adef.timers or adef.channels):
                aid = ActorId(adef.system, adef.name)
                if aid.key in self._table:
                    continue
                try:
                    if self.router is not None and self.router.remote_owner(aid, adef):
                        continue  # its owner activates it
                    await self.ensure_active(aid)
                except SpawnmeshError as exc:
                    log.warning("could not activate %s/%s: %s", adef.system, adef.name, exc)

    async def ensure_active(self, target: ActorId) -> None:
        """Activate ``target`` (loading its state) without running a turn."""
        act = await self._resolve(target)
        if act.loaded:
            return
        await self._acquire(act)
        try:
            if not act.loaded:
                await self._load(act)
        finally:
            self._release(act)

    # ------------------------------------------------------------------ invoking

    async def invoke(
        self,
        target: ActorId,
        action: str,
        payload: Any = None,
        *,
        metadata: Mapping[str, str] | None = None,
        timeout_ms: int | None = None,
    ) -> Any:
        """Request/reply: run ``action`` on ``target`` and return the reply value. Bounded by
        the caller's cancel scopes, and by ``timeout_ms`` when given (InvocationTimeout)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        cur = _CURRENT.get()
        if cur is None:
            caller = None
            chain: tuple[Key, ...] = ()
            if self._closing:
                self.metrics.observe_invocation(NodeShuttingDown.code, 0.0)
                raise NodeShuttingDown(f"node {self.node_id} is shutting down")
            if self.tracer is not None and not _EDGE_SPAN.get():
                return await self._invoke_traced(target, action, payload, metadata, timeout_ms)
        else:
            caller = cur.actor_id
            chain = (*cur.chain, cur.key)
        t0 = self._clock()
        try:
            if timeout_ms is None:
                value = await self._invoke(target, action, payload, metadata, caller, chain)
            else:
                with trio.move_on_after(timeout_ms / 1000) as scope:
                    value = await self._invoke(target, action, payload, metadata, caller, chain)
                if scope.cancelled_caught:
                    raise InvocationTimeout(
                        f"{target}.{action}: no reply within {timeout_ms} ms"
                    )
        except SpawnmeshError as exc:
            self.metrics.observe_failure(exc.code, trio.current_time() - t0, str(target), action,
                                         str(exc))
            raise
        except trio.Cancelled:
            self.metrics.observe_invocation("cancelled", trio.current_time() - t0)
            raise
        now = self._clock()
        self.metrics.observe_invocation("ok", now - t0)
        if now - self._slice_start > SLICE_S:
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._slice_start = trio.current_time()
        return value

    async def _invoke_traced(
        self,
        target: ActorId,
        action: str,
        payload: Any,
        metadata: Mapping[str, str] | None,
        timeout_ms: int | None,
    ) -> Any:
        """:meth:`invoke` from outside any turn, inside its edge span (a ``traceparent`` in
        ``metadata`` names the caller's span as the parent)."""
        from spawnmesh.ops.tracing import trace_carrier

        assert self.tracer is not None
        attrs = {"spawnmesh.actor": str(target), "spawnmesh.action": action}
        token = _EDGE_SPAN.set(True)
        try:
            with self.tracer.span("spawnmesh.invoke", "server", attrs, trace_carrier(metadata)):
                return await self.invoke(target, action, payload, metadata=metadata,
                                         timeout_ms=timeout_ms)
        finally:
            _EDGE_SPAN.reset(token)

    async def _invoke(
        self,
        target: ActorId,
        action: str,
        payload: Any,
        metadata: Mapping[str, str] | None,
        caller: ActorId | None,
        chain: tuple[Key, ...],
        retried: int = 0,
    ) -> Any:
        key = (target.system, target.name)
        if chain and key in chain:
            names = [key_str(k) for k in (*chain, key)]
            raise CallCycle(f"call cycle: {' -> '.join(names)}", names)
        if self._held:
            held = self._held.get(key)
            if held is not None:  # casts made earlier wait for this actor: run after them
                await held.done.wait()
        act = self._table.get(key)
        if act is None:
            router = self.router
            if router is not None:
                adef = self.definition_for(target) or await self.learn_template(target)
                owner = router.remote_owner(target, adef)
                if owner is not None:
                    return await router.invoke_remote(
                        owner, target, action, payload, metadata, caller, chain
                    )
            act = await self._resolve(target)
        if act.busy:
            await self._wait_turn(act)
            if act.epoch == DROPPED:  # fenced off while this call waited: not on a dead copy
                self._release(act)
                return await self._invoke(target, action, payload, metadata, caller, chain,
                                          retried)
        else:
            act.busy = True
            self._busy += 1
        try:
            if not act.loaded:
                await self._load(act)
            result = await self._turn(act, action, payload, metadata, caller, chain)
        except StaleActivation:
            if retried >= STALE_RETRIES:
                raise
            retry = True
        else:
            retry = False
        finally:
            self._release(act)
        if retry:  # the stale activation was dropped; a fresh one loads the current state
            if retried:  # fenced again: another activation is still writing (a hand-off in
                await trio.sleep(0.01 * retried)  # progress elsewhere); let it finish
            return await self._invoke(
                target, action, payload, metadata, caller, chain, retried + 1
            )
        if result.__class__ is not Reply:
            return result
        nxt = result.next
        if nxt is None:
            return result.value
        nxt_payload = result.value if nxt.pipe else payload
        return await self._invoke(nxt.target, nxt.action, nxt_payload, metadata, caller, chain)

    def cast_nowait(
        self,
        target: ActorId,
        action: str,
        payload: Any = None,
        *,
        metadata: Mapping[str, str] | None = None,
        delay_ms: int | None = None,
        at_epoch_ms: int | None = None,
        caller: ActorId | None = None,
    ) -> None:
        """Fire-and-forget: queue ``action`` on ``target`` now, after ``delay_ms``, or at
        ``at_epoch_ms`` (Unix epoch ms; delayed ones are kept in the store until queued).
        Raises Overloaded if the actor's queue is full."""
        if self._closing and _CURRENT.get() is None:
            raise NodeShuttingDown(f"node {self.node_id} is shutting down")
        if caller is None:
            cur = _CURRENT.get()
            caller = cur.actor_id if cur is not None else None
        if at_epoch_ms is not None:
            delay_ms = max(0, at_epoch_ms - wall_ms())
        if delay_ms:
            self.schedules.keep(target, action, payload, metadata, caller, delay_ms)
            return
        self._cast(target, action, payload, metadata, caller)

    # ------------------------------------------------------------------ durable schedules

    def _fire_schedule(self, kept: Kept) -> None:
        """A delayed invocation is due: queue it on its actor (here, past the queue bound: it
        was admitted when made; or on its owner), then stop keeping it. An owner out of reach
        or refusing it for now is retried with backoff, the schedule kept meanwhile; once the
        node leaves its cluster, a kept one stays in the store for the member that takes it
        over. Schedules of one actor due together are queued in due order."""
        if self.schedules.adopter_fires(kept) or (self._closing and kept.durable):
            return  # left in the store: the adopter fires it, or this node once it is back
        sc = kept.schedule
        key = (sc.system, sc.actor)
        line = self._due.get(key)
        if line is not None:  # earlier ones of this actor are being delivered: after them
            line.append(kept)
            return
        act = self._table.get(key)
        if act is not None:  # active here: queued at once
            self._enqueue(act, _Job(sc.action, kept.payload, kept.meta, kept.caller),
                          admitted=True)
            self._fired(kept)
            return
        self._due[key] = deque([kept])
        try:
            self._spawn_job(self._deliver_due, key)
        except NodeShuttingDown:
            del self._due[key]  # still kept: it fires when the node is back

    async def _deliver_due(self, key: Key) -> None:
        """Queue the due invocations lined up for one actor, in order, each retried while
        what stops it may pass (an owner out of reach or overloaded, the store down) with
        backoff from 50 ms to 5 s; each is forgotten once queued."""
        line = self._due[key]
        try:
            while line:
                await self._deliver_one(line[0])
                line.popleft()
        finally:  # cancelled (the node stops): those left are still kept in the store
            del self._due[key]

    async def _deliver_one(self, kept: Kept) -> None:
        target, action = kept.target, kept.schedule.action
        backoff = 0.05
        waited = 0.0
        while not self.schedules.adopter_fires(kept):
            try:
                await self._cast_queued(target, action, kept.payload, kept.meta, kept.caller)
            except SpawnmeshError as exc:
                if isinstance(exc, NodeShuttingDown) or self._closing:
                    return  # still kept: it fires when the node is back
                if not exc.retryable:
                    log.warning("scheduled invocation %s.%s dropped: %s", target, action, exc)
                    self.schedules.fired(kept)
                    return
                if waited < 10.0 <= waited + backoff:  # once, not at every retry
                    log.warning("scheduled invocation %s.%s not queued for 10 s (retrying "
                                "every 5 s): %s", target, action, exc)
                await trio.sleep(backoff)
                waited += backoff
                backoff = min(backoff * 2, 5.0)
                continue
            self._fired(kept)
            return

    async def _cast_queued(
        self,
        target: ActorId,
        action: str,
        payload: Any,
        metadata: Mapping[str, str] | None,
        caller: ActorId | None,
    ) -> None:
        """Queue a due schedule's cast and return once it is queued here (not bounded again)
        or on its owner; raises what stopped it (:meth:`_cast` logs that instead)."""
        router = self.router
        if router is not None and (target.system, target.name) not in self._table:
            adef = self.definition_for(target) or await self.learn_template(target)
            owner = router.remote_owner(target, adef)
            if owner is not None:
                await router.cast_acked(owner, target, action, payload, metadata, caller)
                return
        act = await self._resolve(target)
        self._enqueue(act, _Job(action, payload, metadata, caller), admitted=True)

    def _fired(self, kept: Kept) -> None:
        """A due invocation was queued: count it, forget it in the store."""
        self.metrics.scheduled_fired_total += 1
        self.schedules.fired(kept)

    def _schedule_payload(self, target: ActorId, sc: Schedule) -> Any:
        if not sc.payload:
            return None
        try:
            value = msgspec.msgpack.decode(sc.payload)
        except msgspec.DecodeError as exc:
            raise InvalidArgument(f"payload is not msgpack: {exc}") from None
        adef = self.definition_for(target)
        ad = adef.actions.get(sc.action) if adef is not None else None
        return convert(value, ad.payload_type if ad is not None else None)

    def _cast(
        self,
        target: ActorId,
        action: str,
        payload: Any,
        metadata: Mapping[str, str] | None,
        caller: ActorId | None,
    ) -> None:
        key = (target.system, target.name)
        if self._held and key in self._held:  # behind casts waiting for the same actor
            self._hold(self._held[key], _Job(action, payload, metadata, caller))
            return
        act = self._table.get(key)
        if act is None:
            router = self.router
            adef = self.definition_for(target)
            if router is not None and adef is not None:
                owner = router.remote_owner(target, adef)
                if owner is not None:
                    router.cast_remote(owner, target, action, payload, metadata, caller)
                    return
            act = None if adef is None or key in self._moving else self._resolve_now(target)
            if act is None:  # needs a statestore lookup or a hand-off: resolve in a task
                held = _Held()
                self._hold(held, _Job(action, payload, metadata, caller))
                self._held[key] = held
                try:
                    self._spawn_job(self._cast_slow, target, held)
                except NodeShuttingDown:
                    del self._held[key]
                    self._queued -= 1
                    raise
                return
        self._enqueue(act, _Job(action, payload, metadata, caller))

    def _hold(self, held: _Held, job: _Job) -> None:
        """Hold a cast back until its actor is resolved (bounded like a queue)."""
        if len(held.jobs) >= self._max_q or self._queued >= self._max_node_q:
            self.metrics.overloaded_total += 1
            raise Overloaded(
                f"{len(held.jobs)} invocations wait for this actor to be found, "
                f"{self._queued} queued on this node; retry later"
            )
        held.jobs.append(job)
        self._queued += 1

    def _enqueue(self, act: Activation, job: _Job, *, admitted: bool = False) -> None:
        """Queue ``job`` on ``act`` (run it now if idle). ``admitted``: a due schedule, whose
        room was granted when it was made (its memory is already spent): not bounded again."""
        if act.busy:
            if not admitted:
                self._check_room(act)
            if act.waiters is None:
                act.waiters = deque()
            act.waiters.append(job)
            self._queued += 1
        else:
            act.busy = True
            self._busy += 1
            if not self._start_job(act, job):
                self._busy -= 1
                act.busy = False
                raise NodeShuttingDown("the runtime's async turns are not running")

    async def _cast_slow(self, target: ActorId, held: _Held) -> None:
        """Resolve ``target`` (or find its remote owner), then queue the casts held back for
        it there, in arrival order; those that arrive meanwhile join them."""
        key = (target.system, target.name)
        owner = None
        act = None
        error: SpawnmeshError | None = None
        try:
            router = self.router
            if router is not None:
                adef = self.definition_for(target) or await self.learn_template(target)
                owner = router.remote_owner(target, adef)
            if owner is None:
                act = await self._resolve(target)
        except SpawnmeshError as exc:
            error = exc
        finally:  # cancelled too: nobody else would release the casts or their waiters
            del self._held[key]
            self._queued -= len(held.jobs)
            held.done.set()
        if error is not None:
            log.warning("%d async invocations of %s dropped: %s", len(held.jobs), target,
                        error)
            return
        for job in held.jobs:  # synchronously: nothing can come between them
            if owner is not None:
                assert self.router is not None
                self.router.cast_remote(owner, target, job.action, job.payload, job.metadata,
                                        job.caller)
            elif act is not None:
                self._enqueue(act, job, admitted=True)

    def _cast_logged(
        self,
        target: ActorId,
        action: str,
        payload: Any,
        metadata: Mapping[str, str] | None,
        caller: ActorId | None,
        delay_ms: int | None = None,
    ) -> None:
        """A cast whose failure has nobody to report to (schedules, side effects, the next
        step of an async workflow): logged, never raised."""
        try:
            if delay_ms:
                self.cast_nowait(target, action, payload, metadata=metadata, delay_ms=delay_ms,
                                 caller=caller)
            else:
                self._cast(target, action, payload, metadata, caller)
        except SpawnmeshError as exc:
            log.warning("async invocation %s.%s dropped: %s", target, action, exc)

    def _spawn_job(self, fn: Any, *args: Any) -> None:
        if self._jobs is None:
            raise NodeShuttingDown("the runtime's services are not running")
        self._jobs.start_soon(fn, *args)

    async def _run_job(self, act: Activation, job: _Job) -> None:
        """Run one queued async turn; the baton is already held for it."""
        if act.epoch == DROPPED:  # fenced off while queued: run it on the current activation
            self._release(act)
            self._cast_logged(act.id, job.action, job.payload, job.metadata, job.caller)
            return
        result: Any = None
        try:
            with trio.move_on_after(self._timeout_s) as scope:
                if not act.loaded:
                    await self._load(act)
                result = await self._turn(
                    act, job.action, job.payload, job.metadata, job.caller, ()
                )
            if scope.cancelled_caught:
                log.warning("async invocation %s.%s timed out after %.1f s", act.id,
                            job.action, self._timeout_s)
        except SpawnmeshError as exc:
            log.info("async invocation %s.%s failed: %s", act.id, job.action, exc)
        except Exception:  # a bug here must not take the other async turns down with it
            log.exception("async invocation %s.%s failed", act.id, job.action)
        finally:
            self._release(act)
        if result.__class__ is Reply and result.next is not None:
            nxt = result.next
            self._cast_logged(
                nxt.target, nxt.action, result.value if nxt.pipe else job.payload,
                job.metadata, job.caller,
            )

    # ------------------------------------------------------------------ the baton

    def _check_room(self, act: Activation) -> None:
        if (act.waiters is not None and len(act.waiters) >= self._max_q) or (
            self._queued >= self._max_node_q
        ):
            self.metrics.overloaded_total += 1
            raise Overloaded(
                f"{act.id}: {act.queued()} invocations queued for this actor, "
                f"{self._queued} on this node; retry later"
            )

    async def _acquire(self, act: Activation) -> None:
        if act.busy:
            await self._wait_turn(act)
        else:
            act.busy = True
            self._busy += 1

    async def _wait_turn(self, act: Activation, *, check_room: bool = True) -> None:
        """Park in ``act``'s queue until the baton is handed over (FIFO). Cancellation (the
        caller's deadline) takes the caller out of the queue."""
        if check_room:
            self._check_room(act)
        task = trio.lowlevel.current_task()
        if act.waiters is None:
            act.waiters = deque()
        waiters = act.waiters
        waiters.append(task)
        self._queued += 1

        def abort(_: Any) -> trio.lowlevel.Abort:
            waiters.remove(task)
            self._queued -= 1
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _release(self, act: Activation) -> None:
        """Hand the baton to the next in line, or put it down."""
        waiters = act.waiters
        if waiters:
            nxt = waiters[0]
            if nxt.__class__ is not _Job:
                waiters.popleft()
                self._queued -= 1
                trio.lowlevel.reschedule(nxt)
                return
            if self._start_job(act, nxt):
                waiters.popleft()
                self._queued -= 1
                return
            # the async-turns service is restarting: the job waits, queued, for its restart
        act.busy = False
        self._busy -= 1
        if self._closing and self._busy == 0:
            self._idle.set()

    # ------------------------------------------------------------------ activation

    def _new_activation(self, adef: ActorDef, actor_id: ActorId) -> Activation:
        self._epochs += 1
        act = Activation(adef, actor_id, self._epochs)
        if not adef.stateful:
            act.loaded = True
            self._on_loaded(act)
        self._table[act.key] = act
        return act

    def _resolve_now(self, target: ActorId) -> Activation | None:
        """Find or create the activation for ``target`` without I/O; None if the statestore
        must be asked which template an unknown name belongs to."""
        key = (target.system, target.name)
        act = self._table.get(key)
        if act is not None:
            return act
        adef = self._defs.get(key)
        if adef is not None:
            if adef.kind is Kind.NAMED:
                return self._new_activation(adef, ActorId(target.system, target.name))
            if adef.kind is Kind.POOLED:
                return self._pool_member(adef)
            raise _template_called(target)
        template = target.parent or self._spawned.get(key)
        if template is None:
            return None
        return self._new_activation(self._template(target.system, template, target),
                                    ActorId(target.system, target.name, template))

    async def _resolve(self, target: ActorId) -> Activation:
        moving = self._moving.get((target.system, target.name))
        if moving is not None:  # the old activation is still flushing: load after it
            await moving.wait()
        act = self._resolve_now(target)
        if act is not None:
            return act
        key = (target.system, target.name)
        stored = await self.store.load(key)
        act = self._table.get(key)  # somebody else may have activated it meanwhile
        if act is not None:
            return act
        if stored is None or not stored.parent:
            raise ActorNotFound(
                f"no actor {target.system}/{target.name}: not a registered actor, not a "
                "spawned instance, and no stored state names its template"
            )
        self._spawned[key] = stored.parent
        act = self._new_activation(self._template(target.system, stored.parent, target),
                                   ActorId(target.system, target.name, stored.parent))
        self._apply_loaded(act, stored)
        return act

    async def check_target(self, target: ActorId) -> None:
        """Raise what invoking ``target`` would if it does not exist (ActorNotFound, or
        InvalidArgument for a template of unnamed actors), without activating it: a known
        actor costs two dict lookups, an unknown name one statestore read."""
        adef = self.definition_for(target) or await self.learn_template(target)
        if adef.kind is Kind.UNNAMED and adef.name == target.name:
            raise _template_called(target)

    async def learn_template(self, target: ActorId) -> ActorDef:
        """The definition of an unnamed instance known only by name: its stored row names
        its template (ActorNotFound when nothing does)."""
        stored = await self.store.load((target.system, target.name))
        adef = self.definition_for(target)  # somebody may have learnt it meanwhile
        if adef is not None:
            return adef
        if stored is None or not stored.parent:
            raise ActorNotFound(
                f"no actor {target.system}/{target.name}: not a registered actor, not a "
                "spawned instance, and no stored state names its template"
            )
        tdef = self._template(target.system, stored.parent, target)
        self._spawned[(target.system, target.name)] = stored.parent
        return tdef

    def _template(self, system: str, template: str, target: ActorId) -> ActorDef:
        tdef = self._defs.get((system, template))
        if tdef is None or tdef.kind is not Kind.UNNAMED:
            raise ActorNotFound(
                f"no actor {target.system}/{target.name}: {template!r} is not an unnamed "
                "actor template of this system"
            )
        return tdef

    def _pool_member(self, adef: ActorDef) -> Activation:
        """Pick an idle pool instance, grow the pool up to its size, else the shortest queue."""
        key = (adef.system, adef.name)
        members = self._pools.setdefault(key, [])
        for act in members:
            if not act.busy:
                return act
        if len(members) < adef.pool_size:
            taken = {m.id.name for m in members}  # a passivated member's index is free again
            index = next(i for i in range(adef.pool_size) if f"{adef.name}#{i}" not in taken)
            act = self._new_activation(
                adef, ActorId(adef.system, f"{adef.name}#{index}", adef.name)
            )
            members.append(act)
            return act
        return min(members, key=Activation.queued)

    async def spawn(self, system: str, name: str, template: str) -> ActorId:
        """Register an unnamed instance ``name`` of ``template`` (idempotent)."""
        aid = ActorId(system, name, template)
        self._template(system, template, aid)
        if (system, name) in self._defs:
            raise InvalidArgument(f"{system}/{name} is the name of a registered actor")
        self._spawned[(system, name)] = template
        if self.router is not None:
            owner = self.router.remote_owner(aid, self._defs[(system, template)])
            if owner is not None:  # its owner must know it too (calls by name go there)
                await self.router.spawn_remote(owner, aid)
                return aid
        await trio.lowlevel.checkpoint()
        return aid

    async def _load(self, act: Activation) -> None:
        if self.router is not None:
            await self.router.before_load(act)
        stored = await self.store.load(act.key)
        if not act.loaded:
            self._apply_loaded(act, stored)

    def _apply_loaded(self, act: Activation, stored: StoredState | None) -> None:
        adef = act.adef
        if stored is None:
            try:  # the definition's initial state: user code
                state = adef.new_state()
                blob = adef.codec.encode(state)
            except Exception as exc:
                raise ActorFailed(str(act.id), type(exc).__name__,
                                  f"initial state: {exc}", traceback.format_exc(),
                                  self.node_id) from exc
            act.state, act.blob, act.revision = state, blob, 0
            if adef.kind is Kind.UNNAMED and adef.stateful:
                # its first row names its template: after a restart, a hand-off or on another
                # node, the instance is found by its name alone (and need not be remembered)
                self.writer.mark_dirty(act, self._clock())
        else:
            act.state = adef.codec.decode(stored.blob)
            act.blob = stored.blob
            act.revision = stored.revision
        act.loaded = True
        self._on_loaded(act)

    def _on_loaded(self, act: Activation) -> None:
        self.metrics.activations_total += 1
        act.last_used = trio.current_time()
        adef = act.adef
        for timer in adef.timers:
            self._schedule_timer(act, act.epoch, timer.action, timer.every_ms / 1000)
        if adef.channels and adef.kind is Kind.UNNAMED:
            self._instances.setdefault((adef.system, adef.name), set()).add(act.key)

    def _schedule_timer(self, act: Activation, epoch: int, action: str, every_s: float) -> None:
        def fire() -> None:
            if self._table.get(act.key) is not act or act.epoch != epoch or self._closing:
                return  # passivated or replaced: the timer dies with its activation
            waiters = act.waiters
            if waiters and any(j.__class__ is _Job and j.tick and j.action == action
                               for j in waiters):
                log.debug("timer %s.%s skipped: its last tick has not run yet", act.id, action)
            else:  # at most one tick per timer waits: a slow timer does not fill the queue
                try:
                    self._enqueue(act, _Job(action, None, None, act.id, tick=True))
                    self.metrics.timers_fired_total += 1
                except SpawnmeshError as exc:
                    log.warning("timer %s.%s skipped: %s", act.id, action, exc)
            self._schedule_timer(act, epoch, action, every_s)

        self.scheduler.call_at(trio.current_time() + every_s, fire)

    def _drop_stale(self, act: Activation) -> None:
        """Forget an activation whose write was fenced off (another activation wrote the actor
        since it loaded). Invocations still queued on it run on a fresh activation instead:
        on this one they would run beside the fresh one, on state that can never be written."""
        act.epoch = DROPPED
        self._drop(act)

    def _drop(self, act: Activation) -> None:
        """Forget an activation (passivated or fenced off as stale)."""
        if self._table.get(act.key) is act:
            del self._table[act.key]
        adef = act.adef
        if act.revision and adef.kind is Kind.UNNAMED:
            self._spawned.pop(act.key, None)  # its stored row names its template
        if adef.kind is Kind.POOLED:
            members = self._pools.get((adef.system, adef.name))
            if members and act in members:
                members.remove(act)
        inst = self._instances.get((adef.system, adef.name))
        if inst is not None:
            inst.discard(act.key)

    # ------------------------------------------------------------------ the turn

    async def _turn(
        self,
        act: Activation,
        action: str,
        payload: Any,
        metadata: Mapping[str, str] | None,
        caller: ActorId | None,
        chain: tuple[Key, ...],
    ) -> Any:
        """Run one turn with the baton held: handler, commit, workflow side effects."""
        adef = act.adef
        ad = adef.actions.get(action)
        now = self._clock()
        act.last_used = now
        if ad is None:
            if action in STATE_ACTIONS and adef.stateful:
                return adef.codec.decode(act.blob)
            raise ActionNotFound(
                f"{act.id} has no action {action!r} (it has: {', '.join(sorted(adef.actions))})"
            )
        ctx: Context[Any] = Context(self, act.id, act.state, metadata or _NO_METADATA, caller)
        token = _CURRENT.set(_Turn(act.key, act.id, chain))
        try:
            tracer = self.tracer
            if tracer is None:
                result = await ad.fn(ctx, payload)
            else:
                with tracer.span("spawnmesh.turn", "internal",
                                 {"spawnmesh.actor": str(act.id), "spawnmesh.action": action}):
                    result = await ad.fn(ctx, payload)
        except BaseException as exc:
            self.metrics.turn_failures_total += 1
            self._reset(act)
            if isinstance(exc, SpawnmeshError) or not isinstance(exc, Exception):
                raise
            log.warning("%s.%s failed: %s: %s (state reset to the last committed)", act.id,
                        action, type(exc).__qualname__, exc,
                        exc_info=exc if log.isEnabledFor(logging.DEBUG) else None)
            raise ActorFailed(
                str(act.id), type(exc).__qualname__, str(exc),
                "".join(traceback.format_exception(exc)), self.node_id,
            ) from exc
        finally:
            _CURRENT.reset(token)
            self.metrics.turn_seconds.observe(self._clock() - now)
        if result.__class__ is Reply:
            new_state = ctx.state if result.state is _UNSET else result.state
        else:
            new_state = ctx.state
        if adef.stateful:
            await self._commit(act, new_state,
                               result.__class__ is Reply and result.checkpoint)
        if result.__class__ is Reply:
            if result.effects:
                for eff in result.effects:
                    self._cast_logged(eff.target, eff.action, eff.payload, eff.metadata, act.id,
                                      eff.delay_ms)
            if result.broadcasts:
                for b in result.broadcasts:
                    self.broadcast(act.id.system, b, caller=act.id)
        return result

    async def _commit(self, act: Activation, new_state: Any, durable: bool = False) -> None:
        codec = act.adef.codec
        try:
            blob = codec.encode(new_state)
        except Exception as exc:
            self._reset(act)
            raise ActorFailed(str(act.id), "StateEncodeError", str(exc), "", self.node_id) from exc
        if blob == act.blob:
            act.state = new_state
            return
        prev_blob = act.blob
        act.state = new_state
        act.blob = blob
        if not durable and not isinstance(act.adef.snapshot, WriteThrough):
            self.writer.mark_dirty(act, self._clock())
            return
        owed = act.dirty_since != 0.0  # the previous state is not durable yet either
        try:  # if the caller is cancelled meanwhile, the outcome is unknown to it; the
            await self.writer.write(act)  # writer keeps the state and retries until durable
        except StatestoreUnavailable:
            act.blob = prev_blob
            if not owed:  # back to a durable state: nothing to write
                self.writer.forget(act)
            # else the previous state stays pending: it was committed and acknowledged
            self._reset(act)
            raise

    def _reset(self, act: Activation) -> None:
        """Back to the last committed state after a failed turn (in-place edits included)."""
        if act.adef.stateful and act.loaded:
            act.state = act.adef.codec.decode(act.blob)

    def broadcast(
        self,
        system: str,
        b: Broadcast,
        *,
        caller: ActorId | None = None,
        unnamed_only: bool = False,
    ) -> int:
        """Deliver a broadcast to every subscriber of its channel; returns deliveries queued
        from this node. Named subscribers always receive (activated where they are owned);
        unnamed instances receive while active (on every member: the mesh fans the broadcast
        out, and the copies it delivers are ``unnamed_only``); a pool receives once."""
        if not unnamed_only:
            self.metrics.broadcasts_total += 1
            if self.router is not None:
                self.router.broadcast_remote(system, b, caller)
        delivered = 0
        for adef in self._subscribers.get((system, b.channel), ()):
            action = b.action or adef.channels[b.channel]
            if adef.kind is Kind.UNNAMED:
                keys = list(self._instances.get((adef.system, adef.name), ()))
                targets: Iterable[ActorId] = [self._table[k].id for k in keys if k in self._table]
            elif unnamed_only:
                continue
            else:
                targets = [ActorId(system, adef.name)]
            payload = b.payload
            if unnamed_only and targets:  # from a peer: builtins, typed per subscriber here
                ad = adef.actions.get(action)
                try:
                    payload = convert(payload, ad.payload_type if ad is not None else None)
                except SpawnmeshError as exc:
                    log.warning("broadcast on %s to %s dropped: %s", b.channel, adef.name, exc)
                    continue
            for target in targets:
                try:
                    self._cast(target, action, payload, None, caller)
                    delivered += 1
                except SpawnmeshError as exc:
                    log.warning("broadcast on %s to %s dropped: %s", b.channel, target, exc)
        return delivered

    # ------------------------------------------------------------------ passivation

    async def _sweep_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.settings.sweep_interval_s)
            await self.passivate_idle()

    def _idle_after_s(self, adef: ActorDef) -> float:
        ms = adef.deactivate_after_ms
        if ms is None:
            return self.settings.deactivate_after_s
        return math.inf if ms == 0 else ms / 1000

    async def passivate_idle(self, *, everything: bool = False) -> int:
        """Passivate actors idle longer than their deactivation timeout (all idle actors if
        ``everything``): flush their state, then forget them. Returns how many."""
        now = trio.current_time()
        candidates: list[Activation] = []
        for i, act in enumerate(list(self._table.values())):
            if i % 5000 == 4999:
                await trio.lowlevel.checkpoint()  # keep latency low while scanning
            if act.busy:
                continue
            if everything or now - act.last_used >= self._idle_after_s(act.adef):
                candidates.append(act)
        done = 0
        step = self.settings.write_batch_max
        for i in range(0, len(candidates), step):
            done += await self._passivate(candidates[i : i + step])
        return done

    async def _passivate(self, acts: list[Activation]) -> int:
        taken = [a for a in acts if not a.busy and self._table.get(a.key) is a]
        for a in taken:
            a.busy = True
            self._busy += 1
        dirty = [a for a in taken if a.dirty_since != 0.0]
        errors = await self.writer.write_many(dirty) if dirty else {}
        n = 0
        for a in taken:
            if a.key not in errors and not a.waiters:
                self._drop(a)
                self.metrics.passivations_total += 1
                n += 1
            self._release(a)
        return n

    # ------------------------------------------------------------------ the mesh

    async def invoke_as(
        self,
        target: ActorId,
        action: str,
        payload: Any,
        metadata: Mapping[str, str] | None,
        caller: ActorId | None,
        chain: tuple[Key, ...],
    ) -> Any:
        """Run an invocation that arrived from a peer, on behalf of ``caller`` with the
        call ``chain`` it carried (so cycles across nodes are still caught). Bounded by the
        caller's cancel scopes (the peer layer applies the deadline the request carried)."""
        if chain and caller is not None:
            token = _CURRENT.set(_Turn(chain[-1], caller, chain[:-1]))
        elif caller is not None:
            token = _CURRENT.set(_Turn(caller.key, caller, ()))
        else:  # accepted even while draining: a peer's call must not fail on a leaving node
            t0 = trio.current_time()
            try:
                value = await self._invoke(target, action, payload, metadata, None, ())
            except SpawnmeshError as exc:
                self.metrics.observe_failure(exc.code, trio.current_time() - t0, str(target),
                                             action, str(exc))
                raise
            self.metrics.observe_invocation("ok", trio.current_time() - t0)
            return value
        try:
            return await self.invoke(target, action, payload, metadata=metadata)
        finally:
            _CURRENT.reset(token)

    def pool_has_room(self, adef: ActorDef) -> bool:
        """Whether a call to pool ``adef`` would find an idle (or not yet started) instance
        here."""
        members = self._pools.get((adef.system, adef.name), ())
        return len(members) < adef.pool_size or any(not a.busy for a in members)

    def owns(self, key: Key) -> bool:
        """Whether ``key`` is activated here (and not being handed off)."""
        return key in self._table

    def hand_off(self, still_owned: Callable[[Activation], bool]) -> int:
        """Stop taking new turns for every activation this node no longer owns: each one
        finishes the turns already queued for it, flushes its state and is forgotten, in the
        background. New invocations go to the new owner meanwhile (or, if ownership comes
        back, wait here until the flush is done). Returns how many hand-offs started."""
        idle: list[Activation] = []
        n = 0
        for act in list(self._table.values()):
            if act.adef.kind is Kind.POOLED or still_owned(act):
                continue
            self._start_hand_off(act)
            n += 1
            if act.busy:  # after the turns queued for it
                self._spawn_job(self._hand_off, act)
            else:  # the baton is free: take it now, flush with the others in few batches
                act.busy = True
                self._busy += 1
                idle.append(act)
        step = self.settings.write_batch_max
        for i in range(0, len(idle), step):
            self._spawn_job(self._flush_and_forget, idle[i : i + step])
        return n

    async def release(self, key: Key) -> bool:
        """Hand ``key`` off now (its new owner asks before loading it); returns once its
        state is flushed. False if it was not active here."""
        act = self._table.get(key)
        if act is not None and act.adef.kind is not Kind.POOLED:
            self._start_hand_off(act)
            await self._hand_off(act)
            return True
        moving = self._moving.get(key)
        if moving is not None:
            await moving.wait()
            return True
        await trio.lowlevel.checkpoint()
        return False

    def _start_hand_off(self, act: Activation) -> None:
        del self._table[act.key]  # from here on, no new turn reaches this activation
        self._moving[act.key] = trio.Event()

    async def _hand_off(self, act: Activation) -> None:
        """Take the baton after every queued turn, then flush and forget."""
        try:
            if act.busy:
                await self._wait_turn(act, check_room=False)
            else:
                act.busy = True
                self._busy += 1
        except BaseException:
            self._forgotten([act])
            raise
        await self._flush_and_forget([act])

    async def _flush_and_forget(self, acts: list[Activation]) -> None:
        """Flush activations being handed off (their batons held) and forget them; the baton
        is never handed on. Retries while the store is unavailable: the state is committed."""
        try:
            backoff = 0.05
            while True:
                dirty = [a for a in acts if a.dirty_since != 0.0]
                if not dirty:
                    break
                errors = await self.writer.write_many(dirty)
                # durable, or fenced off by a newer owner's write (StaleActivation): done
                failed = [e for e in errors.values() if not isinstance(e, StaleActivation)]
                if not failed:
                    break
                log.warning("hand-off: %d actor states not flushed yet (retrying): %s",
                            len(failed), failed[0])
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        finally:
            self._busy -= len(acts)
            if self._closing and self._busy == 0:
                self._idle.set()
            self._forgotten(acts)

    def _forgotten(self, acts: list[Activation]) -> None:
        for act in acts:
            self._drop(act)
            self.metrics.handoffs_total += 1
            done = self._moving.pop(act.key, None)
            if done is not None:
                done.set()

    def handing_off(self) -> int:
        """Hand-offs in progress."""
        return len(self._moving)

    def moving_keys(self) -> list[Key]:
        """The actors being handed off right now (for operators: ``GET /v1/actors``)."""
        return list(self._moving)

    # ------------------------------------------------------------------ shutdown

    def stop_accepting(self) -> None:
        """Refuse new invocations from outside; turns in flight and queued ones go on."""
        self._closing = True

    async def drain(self, grace_s: float) -> bool:
        """Stop accepting, let turns in flight and queued finish (within ``grace_s``), then
        flush every committed state and kept schedule. True if nothing was left unfinished
        or unflushed."""
        self.stop_accepting()
        deadline = trio.current_time() + grace_s
        if self._busy == 0:
            self._idle.set()
        with trio.move_on_at(deadline):
            while True:
                if self._held:  # casts accepted before the drain, their actor being found
                    await next(iter(self._held.values())).done.wait()
                elif self._moving:  # hand-offs started by leaving the cluster: flushed too
                    await next(iter(self._moving.values())).wait()
                elif self._busy:
                    self._idle = trio.Event()
                    await self._idle.wait()
                else:
                    break
        finished = self._busy == 0 and not self._moving and not self._held
        if not finished:
            log.warning("%d actors still busy after the shutdown grace period", self._busy)
        with trio.move_on_at(deadline + grace_s) as scope:
            flushed = await self.writer.flush_all()
            await self.schedules.flush()
        if scope.cancelled_caught or not flushed:
            if self.writer.pending() or not flushed:
                log.error("%d actor states could not be flushed: %s", self.writer.pending(),
                          self.writer.last_error)
            if self.schedules.pending_writes():
                log.error("%d delayed invocations could not be kept or forgotten in the store",
                          self.schedules.pending_writes())
            return False
        return finished

    # ------------------------------------------------------------------ introspection

    def active_count(self) -> int:
        """Activated actors on this node."""
        return len(self._table)

    def queued_count(self) -> int:
        """Invocations waiting for their turn on this node."""
        return self._queued

    def activations(self) -> Iterable[Activation]:
        """The activation records (read-only use)."""
        return self._table.values()

    def _gauges(self) -> Iterable[tuple[str, str, dict[str, str], float]]:
        by_type: dict[Key, int] = {}
        for act in self._table.values():
            k = (act.adef.system, act.adef.name)
            by_type[k] = by_type.get(k, 0) + 1
        for (system, name), n in sorted(by_type.items()):
            yield ("spawnmesh_active_actors", "Activated actors by actor type",
                   {"system": system, "actor": name}, float(n))
        yield ("spawnmesh_queued_invocations", "Invocations waiting for their turn", {},
               float(self._queued))
        deepest = max((a.queued() for a in self._table.values() if a.waiters), default=0)
        yield ("spawnmesh_max_actor_queue_depth", "Deepest single-actor queue", {},
               float(deepest))
        yield ("spawnmesh_state_pending_writes", "Committed states not yet durable", {},
               float(self.writer.pending()))
        yield ("spawnmesh_scheduled_entries", "Timers and scheduled invocations pending", {},
               float(len(self.scheduler)))
        yield ("spawnmesh_schedules_held", "Delayed invocations held in memory (due within "
               "the horizon)", {}, float(self.schedules.held))
        yield ("spawnmesh_schedules_pending_writes", "Delayed invocations not yet kept, or "
               "queued and not yet forgotten, in the store", {},
               float(self.schedules.pending_writes()))


def _template_called(target: ActorId) -> InvalidArgument:
    return InvalidArgument(
        f"{target.system}/{target.name} is a template of unnamed actors: spawn an instance and "
        "invoke it by its own name"
    )


def check_definition_names(defs: Iterable[ActorDef]) -> None:
    """Reject two definitions with one name in one system."""
    seen: set[Key] = set()
    for d in defs:
        k = (d.system, d.name)
        if k in seen:
            raise DefinitionError(f"actor {key_str(k)} is defined twice")
        seen.add(k)
