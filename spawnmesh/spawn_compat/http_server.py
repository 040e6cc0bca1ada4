"""A small HTTP/1.1 server on trio and h11 for the Spawn proxy port.

It mirrors the ops server (``spawnmesh/ops/http.py``) with what a protocol endpoint needs: a
handler per request taking the method, path, query and body; keep-alive connections (Spawn SDKs
reuse theirs); request heads bounded by h11, bodies by ``max_body_bytes`` (refused with 413 from
the ``Content-Length`` alone), every read and write by ``idle_timeout_s``, connections by
``max_connections``. Malformed HTTP gets a 400 and the connection is closed; an exception in a
handler becomes a logged 500 and the server goes on.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Final, NamedTuple
from urllib.parse import unquote

import h11
import trio

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
    """Serves requests on one connection until it closes or idles out."""

    def __init__(
        self, stream: trio.SocketStream, handler: Handler, max_body: int, idle_s: float
    ) -> None:
        self.stream = stream
        self.handler = handler
        self.max_body = max_body
        self.idle_s = idle_s
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            self.peer = str(stream.socket.getpeername()[0])
        except OSError:
            self.peer = ""

    async def run(self) -> None:
        try:
            while True:
                if not await self._one():
                    return
                self.conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        finally:
            await trio.aclose_forcefully(self.stream)

    async def _one(self) -> bool:
        """Serve one request; whether the connection may carry another."""
        conn = self.conn
        body: bytes | None = None
        with trio.move_on_after(self.idle_s) as scope:
            try:
                event = await self._next_event()
                if not isinstance(event, h11.Request):
                    return False  # closed
                request = event
                too_big = self._too_big(event)
                if too_big is not None:
                    await self._send(too_big, close=True)
                    return False
                body = await self._body()
            except h11.RemoteProtocolError as exc:
                await self._protocol_error(exc)
                return False
        if scope.cancelled_caught:
            return False
        if body is None:
            await self._send(_error(413, f"body exceeds {self.max_body} bytes"), close=True)
            return False
        target = split_target(request.target)
        if target is None:
            response = _error(400, "the request target must be an absolute path")
        else:
            method = request.method.decode("ascii", "replace")
            try:
                response = await self.handler(
                    Request(method, target[0], target[1], body, self.peer)
                )
            except Exception:
                log.exception("spawn proxy: %s %s failed", method, request.target)
                response = _error(500, "internal error")
        with trio.move_on_after(self.idle_s):
            await self._send(response, close=False)
            return conn.our_state is h11.DONE and conn.their_state is h11.DONE
        return False

    async def _next_event(self) -> object:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.conn.they_are_waiting_for_100_continue:
                await self.stream.send_all(
                    self.conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                )
            self.conn.receive_data(await self.stream.receive_some(_RECEIVE_SIZE))

    def _too_big(self, request: h11.Request) -> Response | None:
        for name, value in request.headers:
            if name == b"content-length" and (len(value) > 18 or int(value) > self.max_body):
                return _error(413, f"body exceeds {self.max_body} bytes")
        return None

    async def _body(self) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body:
                    return None
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            else:
                raise h11.RemoteProtocolError("unexpected event in body", 400)

    async def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
        with trio.move_on_after(self.idle_s):
            try:
                await self._send(_error(status, f"malformed HTTP request: {exc}"), close=True)
            except h11.LocalProtocolError:
                pass

    async def _send(self, response: Response, *, close: bool) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        if close:
            headers.append(("connection", "close"))
        conn = self.conn
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        if response.body:
            data += conn.send(h11.Data(data=response.body))
        data += conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)


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
