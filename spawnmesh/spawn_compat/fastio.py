"""Socket reads and writes for the Spawn port's hot path, with one system call when possible.

trio's ``send_all`` and ``receive_some`` each pass through the scheduler even when the socket
is ready at once (a checkpoint per call: one more run-loop iteration, with its ``epoll_wait``).
A Spawn invocation does four of them on the node; the messages are small, so a write nearly
always fits the socket buffer and a read often finds its bytes waiting. These helpers try the
system call first (``os.write``/``os.read`` on the stream's descriptor, public API) and fall
back to trio's waiting only when the socket is not ready. They are not checkpoints when the
socket is ready: callers (the proxy's request loop) yield elsewhere. They take no timeout:
the server's connections are bounded by its idle reaper, the client's by its caller's scopes.
"""

from __future__ import annotations

import os

import trio


async def send(stream: trio.SocketStream, data: bytes) -> None:
    """Write all of ``data`` (raises OSError or trio's errors like ``send_all``)."""
    try:
        n = os.write(stream.socket.fileno(), data)
    except BlockingIOError:
        n = 0
    if n < len(data):
        await stream.send_all(data[n:])


async def receive(stream: trio.SocketStream, max_bytes: int) -> bytes:
    """Some bytes (``b""`` at EOF), waiting for them only if none are there yet."""
    sock = stream.socket
    while True:
        try:
            return os.read(sock.fileno(), max_bytes)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
