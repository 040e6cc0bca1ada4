"""Supervisor tree: runs every service of a node and restarts what fails.

Erlang/OTP semantics on trio idioms. A :class:`Supervisor` owns one nursery; each child runs
there inside its own cancel scope, started with ``nursery.start`` so start-up is ordered.
Children's exceptions never reach the nursery: a small wrapper catches them and reports the
exit on a channel to the supervisor's loop, which decides (by :class:`Restart` and
:class:`Strategy`) whether to restart, with exponential backoff. Too many restarts within a
sliding window stops the whole subtree and raises :class:`RestartIntensityExceeded`, which a
parent supervisor sees as an ordinary failure of that child (escalation). A child failing
during start-up is retried alone (same rules) before the next child starts. Base exceptions
that are not ``Exception`` (cancellation, ``KeyboardInterrupt``) are never caught.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from spawnmesh.errors import ConfigError, SpawnmeshError

logger = logging.getLogger("spawnmesh.supervisor")


class Restart(enum.Enum):
    """When a child is restarted: always, only after an exception, or never."""

    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


class Strategy(enum.Enum):
    """Which children restart when one fails: that one alone, or all of them in order."""

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"


class RestartIntensityExceeded(SpawnmeshError):
    """A supervisor saw more than ``max_restarts`` restarts within ``within_s`` and gave up.

    Raised ``from`` the last child exception (also kept as ``last_error``) so the parent
    supervisor treats it as a failure of this whole subtree.
    """

    code = "restart_intensity"
    grpc_status = "UNAVAILABLE"

    def __init__(self, supervisor: str, child: str, last_error: BaseException | None) -> None:
        super().__init__(
            f"supervisor {supervisor}: restart intensity exceeded (last failure: child {child}:"
            f" {last_error!r})"
        )
        self.supervisor = supervisor
        self.child = child
        self.last_error = last_error

    def details(self) -> dict[str, Any]:
        return {"supervisor": self.supervisor, "child": self.child}


@dataclass(frozen=True)
class ChildSpec:
    """How to run one child: ``fn(task_status=...)`` must call ``task_status.started()``."""

    name: str
    fn: Callable[..., Awaitable[object]]
    restart: Restart = Restart.PERMANENT


@dataclass(eq=False)
class _Child:
    """One incarnation of a child: its cancel scope, when it started, when it finished."""

    spec: ChildSpec
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    started_at: float | None = None


class _StartedHook:
    """A ``task_status`` that runs a hook, then passes ``started`` on to trio."""

    def __init__(self, inner: trio.TaskStatus[Any], hook: Callable[[], None]) -> None:
        self._inner = inner
        self._hook = hook

    def started(self, value: object = None) -> None:
        """Mark the child as up (see the hook), then let ``nursery.start`` return."""
        self._hook()
        self._inner.started(value)


def _unwrap(exc: Exception) -> Exception:
    """A group holding exactly one exception stands for that exception."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Supervisor:
    """Runs children in a nursery it owns and restarts them by OTP rules; nestable as a child."""

    def __init__(
        self,
        name: str,
        children: Sequence[ChildSpec] = (),
        *,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        max_restarts: int = 5,
        within_s: float = 10.0,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 5.0,
        backoff_factor: float = 2.0,
    ) -> None:
        if max_restarts < 0 or within_s <= 0:
            raise ValueError("max_restarts must be >= 0 and within_s > 0")
        if backoff_initial_s < 0 or backoff_max_s < 0 or backoff_factor < 1:
            raise ValueError("backoff times must be >= 0 and backoff_factor >= 1")
        self.name = name
        self.strategy = strategy
        self.max_restarts = max_restarts
        self.within_s = within_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.backoff_factor = backoff_factor
        self._declared = tuple(children)
        self._specs: list[ChildSpec] = []
        self.restarts: dict[str, int] = {}  # restarts decided for each child's own failures
        for spec in children:
            self._add_spec(spec)
        self._running: dict[str, _Child] = {}
        self._streak: dict[str, int] = {}  # consecutive restarts per child, for backoff
        self._history: deque[float] = deque()  # times of recent restarts, for intensity
        self._nursery: trio.Nursery | None = None
        self._escalation: RestartIntensityExceeded | None = None
        self._exits_send, self._exits_recv = trio.open_memory_channel[
            tuple[_Child, Exception | None]
        ](math.inf)

    def child_names(self) -> list[str]:
        """Names of the children supervised now (running or awaiting restart), in start order."""
        return [spec.name for spec in self._specs]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the children in order, report started, then supervise until cancelled.

        Raises :class:`RestartIntensityExceeded` (after stopping every child) on escalation.
        """
        if self._nursery is not None:
            raise RuntimeError(f"supervisor {self.name} is already running")
        self._history.clear()
        self._specs = list(self._declared)  # a restarted subtree starts from its declared children
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for spec in list(self._specs):
                    await self._start(spec)
                task_status.started()
                await self._supervise()
        except BaseExceptionGroup as group:
            # Our escalation may come out of several tasks (only ours: children's are caught);
            # anything else, such as KeyboardInterrupt, goes on as it is.
            if group.split(RestartIntensityExceeded)[1] is not None or self._escalation is None:
                raise
        finally:
            self._nursery = None
            self._running.clear()
            escalation, self._escalation = self._escalation, None
        if escalation is not None:
            raise escalation

    async def start_child(self, spec: ChildSpec) -> None:
        """Add and start a child while running; returns once its start-up has finished.

        Run-time children are not redeclared: a restarted supervisor starts its declared ones.
        """
        if self._nursery is None:
            raise RuntimeError(f"supervisor {self.name} is not running")
        self._add_spec(spec)
        await self._start(spec)

    def _add_spec(self, spec: ChildSpec) -> None:
        if spec.name in self.child_names():
            raise ValueError(f"supervisor {self.name}: duplicate child name {spec.name!r}")
        self._specs.append(spec)
        self.restarts.setdefault(spec.name, 0)

    async def _start(self, spec: ChildSpec) -> None:
        """Start one child, retrying start-up failures by the restart rules."""
        while True:
            if self._nursery is None:
                raise RuntimeError(f"supervisor {self.name} stopped")
            child = _Child(spec)
            try:
                await self._nursery.start(self._child_main, child)
                return
            except Exception as exc:
                delay = self._on_exit(child, _unwrap(exc))
            if delay is None:
                return
            await trio.sleep(delay)

    async def _child_main(self, child: _Child, *, task_status: trio.TaskStatus[Any]) -> None:
        """Run one incarnation; after start-up, report its exit (not our cancellation)."""

        def up() -> None:  # registered before the child can run on, so no exit is missed
            child.started_at = trio.current_time()
            self._running[child.spec.name] = child

        try:
            with child.scope:
                try:
                    await child.spec.fn(task_status=_StartedHook(task_status, up))
                except Exception as exc:
                    if child.started_at is None:
                        raise  # start-up failure: surfaces from nursery.start
                    self._exits_send.send_nowait((child, _unwrap(exc)))
                else:
                    if child.started_at is not None:
                        self._exits_send.send_nowait((child, None))
        finally:
            child.done.set()

    async def _supervise(self) -> None:
        """Handle child exits one by one, for ever."""
        async for child, exc in self._exits_recv:
            if self._running.get(child.spec.name) is not child:
                continue  # an incarnation we stopped ourselves
            del self._running[child.spec.name]
            delay = self._on_exit(child, exc)
            if delay is None:
                continue
            if self.strategy is Strategy.ONE_FOR_ONE:
                assert self._nursery is not None
                self._nursery.start_soon(self._restart_one, child.spec, delay)
            else:
                await self._restart_all(delay)

    async def _restart_one(self, spec: ChildSpec, delay: float) -> None:
        await trio.sleep(delay)
        await self._start(spec)

    async def _restart_all(self, delay: float) -> None:
        """Stop every running child (waiting for each), back off, start them all in order.

        Temporary siblings are stopped but, as in OTP, not started again.
        """
        stopping = list(self._running.values())
        self._running.clear()
        for child in stopping:
            child.scope.cancel()
        for child in stopping:
            await child.done.wait()
        self._specs = [spec for spec in self._specs if spec.restart is not Restart.TEMPORARY]
        await trio.sleep(delay)
        for spec in list(self._specs):
            if spec.name not in self._running:
                await self._start(spec)

    def _on_exit(self, child: _Child, exc: Exception | None) -> float | None:
        """Decide on a child's exit: None to let it go, else the backoff before restarting.

        Counts the restart against the intensity window and escalates when it is exceeded.
        """
        spec, now = child.spec, trio.current_time()
        wanted = spec.restart is Restart.PERMANENT or (
            spec.restart is Restart.TRANSIENT and exc is not None
        )
        if not wanted:
            logger.info(
                "supervisor %s: child %s ended (%r), not restarted", self.name, spec.name, exc
            )
            self._specs.remove(spec)
            return None
        if isinstance(exc, ConfigError):  # a configuration mistake does not heal on restart
            logger.error("supervisor %s: child %s cannot run: %s", self.name, spec.name, exc)
            self._escalate(spec, exc)
        self._history.append(now)
        while self._history and self._history[0] <= now - self.within_s:
            self._history.popleft()
        if len(self._history) > self.max_restarts:
            self._escalate(spec, exc)
        self.restarts[spec.name] += 1
        if child.started_at is not None and now - child.started_at >= self.within_s:
            self._streak[spec.name] = 0  # it ran healthily: back off from scratch
        streak = self._streak.get(spec.name, 0) + 1
        self._streak[spec.name] = streak
        delay = min(
            self.backoff_initial_s * self.backoff_factor ** (streak - 1), self.backoff_max_s
        )
        logger.warning(
            "supervisor %s: child %s %s; restart attempt %d in %.3fs",
            self.name,
            spec.name,
            "returned" if exc is None else f"failed: {exc!r}",
            streak,
            delay,
            exc_info=exc,
        )
        return delay

    def _escalate(self, spec: ChildSpec, exc: Exception | None) -> None:
        """Stop the whole subtree and raise :class:`RestartIntensityExceeded` from ``exc``."""
        logger.error("supervisor %s: restart intensity exceeded by child %s", self.name, spec.name)
        err = RestartIntensityExceeded(self.name, spec.name, exc)
        self._escalation = err
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        raise err from exc
