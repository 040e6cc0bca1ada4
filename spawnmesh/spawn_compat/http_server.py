"""A small HTTP/1.1 server on trio for the Spawn proxy port (the codec: :mod:`.http11`).

It mirrors the ops server (``spawnmesh/ops/http.py``) with what a protocol endpoint needs: a
handler per request taking the method, path, query and body; keep-alive connections (Spawn SDKs
reuse theirs) and pipelined requests; heads bounded to 64 KiB, bodies by ``max_body_bytes``
(refused with 413 from the ``Content-Length`` alone), every read and write by
``idle_timeout_s``, connections by ``max_connections``. Malformed HTTP gets its 4xx and the
connection is closed; an exception in a handler becomes a logged 500 and the server goes on.

The idle bound costs nothing per request: a connection notes when it starts waiting on its
socket, and one reaper task per server, waking every quarter of the bound (at most 5 s),
cancels the connections that have waited longer (a cancel scope per read and write cost the
node some 14 us per Spawn invocation). A connection is closed between ``idle_timeout_s`` and
1.25 times it (at most 5 s more) after it went quiet.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Final, NamedTuple
from urllib.parse import unquote

import trio

from spawnmesh.spawn_compat import fastio
from spawnmesh.spawn_compat.http11 import (
    CONTINUE,
    Message,
    MessageReader,
    ProtocolError,
    response_bytes,
)

log = logging.getLogger("spawnmesh.spawn")

_RECEIVE_SIZE: Final = 64 * 1024
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)


class Request(NamedTuple):
    """One HTTP request as the handler sees it."""

    method: str
    path: list[str]
    """URL-decoded path segments (``/api/v1/system`` is ``["api", "v1", "system"]``)."""
    query: str
    body: bytes
    peer: str
    """The client's IP address."""


class Response(NamedTuple):
    """What the handler answers."""

    status: int
    body: bytes
    content_type: str = "application/octet-stream"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, text: str) -> Response:
    return Response(status, text.encode(), "text/plain; charset=utf-8")


def split_target(target: bytes) -> tuple[list[str], str] | None:
    """(decoded path segments, raw query) of an origin-form target; None if malformed."""
    raw = target.decode("ascii", "replace")
    path, _, query = raw.split("#", 1)[0].partition("?")
    if not path.startswith("/"):
        return None
    try:
        return [unquote(seg, errors="strict") for seg in path[1:].split("/")], query
    except UnicodeDecodeError:
        return None


class _Connection:
    """Serves requests on one connection until it closes, errs or idles out."""

    def __init__(
        self, stream: trio.SocketStream, handler: Handler, max_body: int, idle_s: float
    ) -> None:
        self.stream = stream
        self.handler = handler
        self.idle_s = idle_s
        self.reader = MessageReader(is_request=True, max_body_bytes=max_body)
        self.scope = trio.CancelScope()
        """The connection's lifetime; :meth:`expire` cancels it."""
        self.waiting_since: float | None = None
        """trio time at which the connection began to wait on its socket (None: it is not
        waiting, e.g. while the handler runs)."""
        self.expired = False
        try:
            self.peer = str(stream.socket.getpeername()[0])
        except OSError:
            self.peer = ""

    def expire(self, now: float) -> None:
        """Cancel the connection if it has waited on its socket longer than the idle bound."""
        since = self.waiting_since
        if since is not None and now - since >= self.idle_s:
            self.expired = True
            self.scope.cancel()

    async def run(self) -> None:
        try:
            with self.scope:
                while await self._one():
                    pass
            if self.expired and not self.reader.idle:  # a request stalled half-way
                await self._refuse(ProtocolError("request not received in time", 408))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        finally:
            await trio.aclose_forcefully(self.stream)

    async def _refuse(self, exc: ProtocolError) -> None:
        """Answer a malformed or stalled request with its 4xx (bounded), then close."""
        with trio.move_on_after(self.idle_s):
            await self.stream.send_all(
                response_bytes(
                    exc.status,
                    f"malformed HTTP request: {exc}".encode(),
                    [("content-type", "text/plain; charset=utf-8")],
                    close=True,
                )
            )

    async def _read(self) -> Message | None:
        """The next request (None: the client closed between requests)."""
        reader = self.reader
        stream = self.stream
        continued = False
        while True:
            msg = reader.next()
            if msg is not None:
                return msg
            if reader.wants_continue and not continued:
                continued = True
                await self._send(CONTINUE)
            self.waiting_since = trio.current_time()
            data = await fastio.receive(stream, _RECEIVE_SIZE)
            self.waiting_since = None
            reader.feed(data)
            if not data and reader.idle:
                return None

    async def _send(self, data: bytes) -> None:
        self.waiting_since = trio.current_time()
        await fastio.send(self.stream, data)
        self.waiting_since = None

    async def _one(self) -> bool:
        """Serve one request; whether the connection may carry another."""
        try:
            msg = await self._read()
        except ProtocolError as exc:
            await self._refuse(exc)
            return False
        if msg is None:
            return False
        target = split_target(msg.target)
        method = msg.method.decode("ascii", "replace")
        if target is None:
            response = _error(400, "the request target must be an absolute path")
        else:
            try:
                response = await self.handler(
                    Request(method, target[0], target[1], msg.body, self.peer)
                )
            except Exception:
                log.exception("spawn proxy: %s %r failed", method, msg.target)
                response = _error(500, "internal error")
        headers = [("content-type", response.content_type), *response.headers]
        data = response_bytes(response.status, response.body, headers, close=not msg.keep_alive)
        await self._send(data)
        return msg.keep_alive


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    max_body_bytes: int,
    max_connections: int = 1024,
    idle_timeout_s: float = 60.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``host:port`` until cancelled; ``started(port)`` once listening
    (``port=0`` picks a free port)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    if port == 0 and len(listeners) > 1:
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    bound: int = listeners[0].socket.getsockname()[1]
    slots = trio.Semaphore(max_connections)
    connections: set[_Connection] = set()

    async def serve_one(stream: trio.SocketStream) -> None:
        conn = _Connection(stream, handler, max_body_bytes, idle_timeout_s)
        connections.add(conn)
        try:
            await conn.run()
        finally:
            connections.discard(conn)
            slots.release()

    async def reap() -> None:
        tick = min(max(idle_timeout_s / 4, 0.01), 5.0)
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for conn in list(connections):
                conn.expire(now)

    async def accept(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.warning("spawn proxy: accept failed (%s); backing off", exc)
                await trio.sleep(0.1)
                continue
            except BaseException:
                slots.release()
                raise
            nursery.start_soon(serve_one, stream)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reap)
            for listener in listeners:
                nursery.start_soon(accept, listener, nursery)
            task_status.started(bound)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
