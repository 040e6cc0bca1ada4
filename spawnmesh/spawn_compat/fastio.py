"""Socket reads and writes for the Spawn port's hot path, with one system call when possible.

trio's ``send_all`` and ``receive_some`` each pass through the scheduler even when the socket
is ready at once (a checkpoint per call: one more run-loop iteration, with its ``epoll_wait``).
A Spawn invocation does four of them on the node; the messages are small, so a write nearly
always fits the socket buffer and a read often finds its bytes waiting. These helpers try the
system call first (``os.write``/``os.read`` on the stream's descriptor, public API) and fall
back to trio's waiting only when the socket is not ready. They take no timeout: the server's
connections are bounded by its idle reaper, the client's by its caller's scopes.

A call that found its socket ready is not a checkpoint, so a loop of them never yields: a
client pipelining requests whose answers need no waiting, or a peer at EOF, would hold the
event loop (other connections, the cluster's gossip, every deadline). So a call yields first
(a checkpoint, before its system call) when :data:`READY_RUN` calls in a row did not wait, or
when :data:`RUN_S` has passed since fastio last yielded (counted over all tasks: while one task
runs without yielding no other does). A Spawn invocation waits at least once on each side,
which resets both.

A read given a :class:`~.busypoll.SpinSite` may spin on its socket before it waits (see
:mod:`.busypoll`); a read that got its bytes spinning did not yield. The time bound is what
keeps a run of such reads short: each may spin up to ``spawn.busy_poll_us``, so counting calls
alone let 32 of them (about 3 ms measured) pass without the loop polling its other sockets;
with it, the loop polls them at least every :data:`RUN_S` plus one spin and the work between
two calls (about half a millisecond measured).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

import trio

from spawnmesh.clock import spin_clock

if TYPE_CHECKING:
    from spawnmesh.spawn_compat.busypoll import SpinSite

READY_RUN: Final = 32
"""Calls in a row that found their socket ready before one yields (cancellable)."""

RUN_S: Final = 200e-6
"""Seconds since fastio last yielded after which the next call yields first."""

_ready_run = 0
"""Calls in a row, over every task, that did not wait on their socket."""

_ran_since = 0.0
"""``spin_clock()`` when fastio last yielded (a checkpoint or a wait)."""


async def _yield() -> None:
    global _ready_run, _ran_since
    _ready_run = 0
    await trio.lowlevel.checkpoint()
    _ran_since = spin_clock()


async def send(stream: trio.SocketStream, data: bytes) -> None:
    """Write all of ``data`` (raises OSError or trio's errors like ``send_all``)."""
    global _ready_run, _ran_since
    _ready_run += 1
    if _ready_run >= READY_RUN or spin_clock() - _ran_since >= RUN_S:
        await _yield()
    try:
        n = os.write(stream.socket.fileno(), data)
    except BlockingIOError:
        n = 0
    if n < len(data):
        _ready_run = 0
        await stream.send_all(data[n:])
        _ran_since = spin_clock()


async def receive(
    stream: trio.SocketStream, max_bytes: int, site: SpinSite | None = None
) -> bytes:
    """Some bytes (``b""`` at EOF), waiting for them only if none are there yet. With a
    ``site``, a wait may first spin on the socket (:mod:`.busypoll`)."""
    global _ready_run, _ran_since
    _ready_run += 1
    if _ready_run >= READY_RUN or spin_clock() - _ran_since >= RUN_S:
        await _yield()
    sock = stream.socket
    fd = sock.fileno()
    try:
        return os.read(fd, max_bytes)
    except BlockingIOError:
        pass
    if site is not None:
        stats = trio.lowlevel.current_statistics()
        budget = site.budget(stats.tasks_runnable, stats.seconds_to_next_deadline)
        if budget:
            data = site.spin(fd, max_bytes, budget)
            if data is not None:  # no yield: counts as a call that found its socket ready
                return data
    _ready_run = 0
    while True:
        await trio.lowlevel.wait_readable(sock)
        _ran_since = spin_clock()
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            pass
