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
event loop (other connections, the cluster's gossip, every deadline). So every
:data:`READY_RUN`-th call in a row that did not wait (counted over all tasks: while one task
runs without yielding no other does) is a checkpoint, before its system call: at most a few
hundred microseconds of such calls pass without yielding. A Spawn invocation waits at least
once on each side, which resets the count: its calls stay free of checkpoints.

A read given a :class:`~.busypoll.SpinSite` may spin on its socket before it waits (see
:mod:`.busypoll`); a read that got its bytes spinning did not yield, and counts as ready.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from spawnmesh.spawn_compat.busypoll import SpinSite

READY_RUN: Final = 32
"""Calls in a row that found their socket ready before one yields (cancellable)."""

_ready_run = 0
"""Calls in a row, over every task, that did not wait on their socket."""


async def send(stream: trio.SocketStream, data: bytes) -> None:
    """Write all of ``data`` (raises OSError or trio's errors like ``send_all``)."""
    global _ready_run
    _ready_run += 1
    if _ready_run >= READY_RUN:
        _ready_run = 0
        await trio.lowlevel.checkpoint()
    try:
        n = os.write(stream.socket.fileno(), data)
    except BlockingIOError:
        n = 0
    if n < len(data):
        _ready_run = 0
        await stream.send_all(data[n:])


async def receive(
    stream: trio.SocketStream, max_bytes: int, site: SpinSite | None = None
) -> bytes:
    """Some bytes (``b""`` at EOF), waiting for them only if none are there yet. With a
    ``site``, a wait may first spin on the socket (:mod:`.busypoll`)."""
    global _ready_run
    _ready_run += 1
    if _ready_run >= READY_RUN:
        _ready_run = 0
        await trio.lowlevel.checkpoint()
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
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            pass
