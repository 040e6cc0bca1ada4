"""A small HTTP/1.1 server on trio for the Spawn proxy port (the codec: :mod:`.http11`).

It mirrors the ops server (``spawnmesh/ops/http.py``) with what a protocol endpoint needs: a
handler per request taking the method, path, query and body; keep-alive connections (Spawn SDKs
reuse theirs) and pipelined requests; heads bounded to 64 KiB, bodies by ``max_body_bytes``
(refused with 413 from the ``Content-Length`` alone), every read and write by
``idle_timeout_s``, connections by ``max_connections``. Malformed HTTP gets its 4xx and the
connection is closed; an exception in a handler becomes a logged 500 and the server goes on.
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
        try:
            self.peer = str(stream.socket.getpeername()[0])
        except OSError:
            self.peer = ""

    async def run(self) -> None:
        try:
            while await self._one():
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        finally:
            await trio.aclose_forcefully(self.stream)

    async def _read(self) -> Message | None:
        """The next request (None: the client closed, or idled out between requests)."""
        reader = self.reader
        stream = self.stream
        continued = False
        while True:
            msg = reader.next()
            if msg is not None:
                return msg
            if reader.wants_continue and not continued:
                continued = True
                await fastio.send(stream, CONTINUE)
            with trio.move_on_after(self.idle_s):
                data = await fastio.receive(stream, _RECEIVE_SIZE)
                reader.feed(data)
                if not data and reader.idle:
                    return None
                continue
            if reader.idle:
                return None  # an idle keep-alive connection: just close
            raise ProtocolError("request not received in time", 408)

    async def _one(self) -> bool:
        """Serve one request; whether the connection may carry another."""
        try:
            msg = await self._read()
        except ProtocolError as exc:
            with trio.move_on_after(self.idle_s):
                await self.stream.send_all(
                    response_bytes(
                        exc.status,
                        f"malformed HTTP request: {exc}".encode(),
                        [("content-type", "text/plain; charset=utf-8")],
                        close=True,
                    )
                )
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
        with trio.move_on_after(self.idle_s):
            await fastio.send(self.stream, data)
            return msg.keep_alive
        return False


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

    async def serve_one(stream: trio.SocketStream) -> None:
        try:
            await _Connection(stream, handler, max_body_bytes, idle_timeout_s).run()
        finally:
            slots.release()

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
            for listener in listeners:
                nursery.start_soon(accept, listener, nursery)
            task_status.started(bound)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
