"""The one bridge between the trio node and the asyncio world of grpclib.

grpclib runs on asyncio only; the node runs on trio. Everything asyncio in spawnmesh goes
through a :class:`Bridge`, built on four primitives:

- :meth:`Bridge.aio_soon` / :meth:`Bridge.trio_soon`: run a plain callback on the other side;
- :meth:`Bridge.to_trio` (from asyncio): await a trio function, run in the bridge's nursery;
  cancelling the asyncio caller cancels the trio task;
- :meth:`Bridge.to_aio` (from trio): await an asyncio coroutine function, run as an asyncio
  task; cancelling the trio caller cancels the task.

Two implementations, chosen by ``host.bridge`` (docs/host-protocol.md has the measurements):

- ``stepped`` (the default): a native asyncio loop whose iterations a trio task runs, in the
  trio thread. Its selector never blocks; when nothing is ready the task waits, through trio,
  for the selector's fd (epoll or kqueue) to become readable, for the loop's next timer, or for
  a callback from trio. Crossings are plain calls: no thread hand-off, no wake-up syscall, no
  GIL contention. It steps the loop with ``BaseEventLoop._run_once``, which every CPython since
  3.4 has; where it is missing the bridge falls back to ``thread``.
- ``thread``: a native asyncio loop in a dedicated thread; crossings are
  ``call_soon_threadsafe`` / ``TrioToken.run_sync_soon`` (a syscall and a thread wake-up each).

trio-asyncio, the third candidate, ran asyncio inside trio too but cost more per asyncio event
than the thread's crossings; it was measured and dropped (docs/host-protocol.md).
"""

from __future__ import annotations

import asyncio
import logging
import selectors
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

BRIDGES = ("stepped", "thread")
DRAIN_S = 5.0
"""How long closing a bridge waits for the asyncio tasks it cancels to finish."""

log = logging.getLogger("spawnmesh.host")


class Bridge:
    """Crossings between trio and one asyncio event loop (see the module docstring)."""

    name = ""

    def __init__(self, loop: asyncio.AbstractEventLoop, nursery: trio.Nursery) -> None:
        self.loop = loop
        self._nursery = nursery

    # The two primitives each implementation provides.

    def aio_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """From trio (or asyncio): call ``fn(*args)`` soon on the asyncio loop."""
        raise NotImplementedError

    def trio_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """From asyncio (or trio): call ``fn(*args)`` soon in the trio thread."""
        raise NotImplementedError

    # Awaiting across, built on the primitives.

    async def to_trio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From asyncio: run ``await fn(*args)`` as a trio task and return its result; a
        cancelled caller cancels the trio task (which then finishes on its own)."""
        fut: asyncio.Future[T] = self.loop.create_future()
        scope = trio.CancelScope()
        self.trio_soon(self._nursery.start_soon, self._run_trio, fn, args, scope, fut)
        try:
            return await fut
        except asyncio.CancelledError:
            self.trio_soon(scope.cancel)
            raise

    async def _run_trio(
        self,
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        scope: trio.CancelScope,
        fut: asyncio.Future[Any],
    ) -> None:
        result: outcome.Outcome[Any] | None = None
        try:
            with scope:
                result = outcome.Value(await fn(*args))
        except Exception as exc:  # travels to the asyncio caller
            result = outcome.Error(exc)
        finally:
            self.aio_soon(_settle, fut, result)

    async def to_aio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From trio: run ``await fn(*args)`` as an asyncio task and return its result; a
        cancelled caller cancels the task (without waiting for it)."""
        waiter = _AioWaiter(self, trio.lowlevel.current_task())
        self.aio_soon(waiter.start, fn, args)
        result: T = await trio.lowlevel.wait_task_rescheduled(waiter.abort)
        return result


def _settle(fut: asyncio.Future[Any], result: outcome.Outcome[Any] | None) -> None:
    if fut.done():
        return
    if isinstance(result, outcome.Value):
        fut.set_result(result.value)
    elif isinstance(result, outcome.Error):
        fut.set_exception(result.error)
    else:  # the trio task was cancelled
        fut.cancel()


class _AioWaiter:
    """One trio task waiting for an asyncio task (see :meth:`Bridge.to_aio`)."""

    __slots__ = ("_bridge", "_cancelled", "_task", "_trio_task")

    def __init__(self, bridge: Bridge, trio_task: trio.lowlevel.Task) -> None:
        self._bridge = bridge
        self._trio_task = trio_task
        self._task: asyncio.Task[Any] | None = None
        self._cancelled = False

    def start(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if self._cancelled:
            return
        self._task = self._bridge.loop.create_task(fn(*args))
        self._task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        if self._cancelled:  # nobody waits: retrieve the outcome so asyncio does not warn
            if not task.cancelled():
                task.exception()
            return
        self._bridge.trio_soon(self._wake, task)

    def _wake(self, task: asyncio.Task[Any]) -> None:
        if self._cancelled:
            return
        if task.cancelled():
            result: outcome.Outcome[Any] = outcome.Error(
                RuntimeError("the asyncio side cancelled the call")
            )
        elif (exc := task.exception()) is not None:
            result = outcome.Error(exc)
        else:
            result = outcome.Value(task.result())
        trio.lowlevel.reschedule(self._trio_task, result)

    def abort(self, _: Any) -> trio.lowlevel.Abort:
        self._cancelled = True
        self._bridge.aio_soon(self._cancel_task)
        return trio.lowlevel.Abort.SUCCEEDED

    def _cancel_task(self) -> None:
        if self._task is not None:
            self._task.cancel()


class ThreadBridge(Bridge):
    """A native asyncio loop in its own thread."""

    name = "thread"

    def __init__(self, loop: asyncio.AbstractEventLoop, nursery: trio.Nursery) -> None:
        super().__init__(loop, nursery)
        self._token = trio.lowlevel.current_trio_token()

    def aio_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def trio_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self._token.run_sync_soon(fn, *args)


class _PollingSelector(selectors.DefaultSelector):
    """asyncio's selector that never blocks: the trio task stepping the loop waits instead, on
    the selector's own fd (epoll on Linux, kqueue on BSD and macOS: both are pollable)."""

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        return super().select(0)


def can_step(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this CPython's event loop has what :class:`SteppedBridge` uses."""
    return all(hasattr(loop, a) for a in ("_run_once", "_ready", "_scheduled", "_selector"))


class SteppedBridge(Bridge):
    """A native asyncio loop stepped by a trio task in the trio thread (:meth:`drive`)."""

    name = "stepped"

    def __init__(self, loop: asyncio.AbstractEventLoop, nursery: trio.Nursery) -> None:
        super().__init__(loop, nursery)
        self._parked: trio.CancelScope | None = None

    def aio_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon(fn, *args)
        self._wake()

    def trio_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        fn(*args)  # same thread, and asyncio callbacks run inside the driver's trio task

    def _wake(self) -> None:
        if self._parked is not None:
            self._parked.cancel()
            self._parked = None

    async def drive(self, until: Callable[[], bool] | None = None) -> None:
        """Run the loop's iterations in this trio task: step while callbacks are ready; when
        none is, wait for the selector's fd, the next timer or an :meth:`aio_soon`.
        Runs until cancelled, or until ``until()`` is true after a step."""
        loop: Any = self.loop
        fd = loop._selector.fileno()
        clock = loop.time
        set_running = asyncio.events._set_running_loop
        patched = sys.modules.get("trio_asyncio")
        if patched is not None:  # it makes asyncio look up a trio task's loop in this variable
            patched.current_loop.set(loop)
        while True:
            set_running(loop)
            try:
                loop._run_once()
            finally:
                set_running(None)
            if until is not None and until():
                return
            if loop._ready:
                await trio.lowlevel.checkpoint()
                continue
            with trio.CancelScope() as scope:
                if loop._scheduled:
                    scope.deadline = trio.current_time() + max(
                        0.0, loop._scheduled[0]._when - clock()
                    )
                self._parked = scope
                await trio.lowlevel.wait_readable(fd)
            self._parked = None

    async def drain(self) -> None:
        """With the driver gone: cancel every task still on the loop and step the loop until
        they finish (at most DRAIN_S)."""
        tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in tasks:
            t.cancel()
        with trio.move_on_after(DRAIN_S):
            await self.drive(until=lambda: all(t.done() for t in tasks))


@asynccontextmanager
async def open_bridge(kind: str = "stepped") -> AsyncIterator[Bridge]:
    """A bridge of ``kind`` (one of :data:`BRIDGES`) for the duration of the block; leaving it
    cancels what still runs on both sides and closes the loop."""
    if kind not in BRIDGES:
        raise ValueError(f"unknown bridge {kind!r}: one of {', '.join(BRIDGES)}")
    if kind == "stepped":
        loop = asyncio.SelectorEventLoop(_PollingSelector())
        if can_step(loop):
            stepped: SteppedBridge | None = None
            try:
                async with trio.open_nursery() as nursery:
                    stepped = SteppedBridge(loop, nursery)
                    nursery.start_soon(stepped.drive)
                    yield stepped
                    nursery.cancel_scope.cancel()
            finally:
                if stepped is not None:
                    with trio.CancelScope(shield=True):
                        await stepped.drain()
                loop.close()
            return
        loop.close()
        log.warning(
            "this Python's asyncio loop cannot be stepped: host.bridge falls back to thread"
        )
    loop = asyncio.SelectorEventLoop()
    thread = threading.Thread(
        target=_run_loop, args=(loop,), name="spawnmesh-host-aio", daemon=True
    )
    thread.start()
    try:
        async with trio.open_nursery() as nursery:
            yield ThreadBridge(loop, nursery)
            nursery.cancel_scope.cancel()
    finally:
        loop.call_soon_threadsafe(_stop_loop, loop)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(thread.join)
        loop.close()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


def _stop_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel every task still on the loop, let them finish, then stop it."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if not tasks:
        loop.stop()
        return
    gathered = asyncio.gather(*tasks, return_exceptions=True)
    gathered.add_done_callback(lambda _: loop.stop())
