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

A handler's own time bound (a Spawn call's ``request-timeout``) goes the same way:
``Request.limit(seconds, on_timeout)`` notes a deadline on the connection, and the reaper, which
sleeps until the earliest one, cancels the connection's scope if the handler is still running
then; the connection answers ``on_timeout()`` and goes on under a new scope. Entering a cancel
scope per request cost 5 us (more with cold caches): a tenth of the node's Python per call.
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Final, NamedTuple
from urllib.parse import unquote

import trio

from spawnmesh.spawn_compat import fastio
from spawnmesh.spawn_compat.busypoll import BusyPoll, SpinSite
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


class Response(NamedTuple):
    """What the handler answers."""

    status: int
    body: bytes
    content_type: str = "application/octet-stream"
    headers: tuple[tuple[str, str], ...] = ()


Limit = Callable[[float, Callable[[], Response]], None]
"""``limit(seconds, on_timeout)``: see :attr:`Request.limit`."""


def _unbounded(seconds: float, on_timeout: Callable[[], Response]) -> None:
    """The ``limit`` of a request made outside a server (tests): no bound."""


class Request(NamedTuple):
    """One HTTP request as the handler sees it."""

    method: str
    path: list[str]
    """URL-decoded path segments (``/api/v1/system`` is ``["api", "v1", "system"]``)."""
    query: str
    body: bytes
    peer: str
    """The client's IP address."""
    limit: Limit = _unbounded
    """Bound the rest of the handler's run to ``seconds``: past it, the handler is cancelled
    and the server answers ``on_timeout()`` instead (no cancel scope is entered for it)."""


Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, text: str) -> Response:
    return Response(status, text.encode(), "text/plain; charset=utf-8")


def split_target(target: bytes) -> tuple[list[str], str] | None:
    """(decoded path segments, raw query) of an origin-form target; None if malformed."""
    raw = target.decode("ascii", "replace")
    path, _, query = raw.split("#", 1)[0].partition("?")
    if not path.startswith("/"):
        return None
    if "%" not in path:  # nothing to decode (every Spawn route): a third of the cost
        return path[1:].split("/"), query
    try:
        return [unquote(seg, errors="strict") for seg in path[1:].split("/")], query
    except UnicodeDecodeError:
        return None


class _Reaper:
    """The server's one timekeeper: closes idle connections and cuts handlers past their
    :attr:`Request.limit`. Sleeps until the next idle check or the earliest handler deadline,
    whichever comes first; a connection that sets an earlier deadline wakes it."""

    def __init__(self, idle_s: float) -> None:
        self.tick = min(max(idle_s / 4, 0.01), 5.0)
        self.connections: set[_Connection] = set()
        self.wake_at = math.inf
        """When the reaper will wake next (inf while it is not sleeping)."""
        self._lot = trio.lowlevel.ParkingLot()

    def deadline_set(self, at: float) -> None:
        if at < self.wake_at:
            self.wake_at = at
            self._lot.unpark_all()

    async def run(self) -> None:
        next_idle = trio.current_time() + self.tick
        while True:
            now = trio.current_time()
            idle_check = now >= next_idle
            if idle_check:
                next_idle = now + self.tick
            wake = next_idle
            for conn in list(self.connections):
                if idle_check:
                    conn.expire(now)
                at = conn.deadline
                if at <= now:
                    conn.time_out()
                elif at < wake:
                    wake = at
            self.wake_at = wake
            with trio.move_on_at(wake):
                await self._lot.park()


class _Connection:
    """Serves requests on one connection until it closes, errs or idles out."""

    def __init__(
        self,
        stream: trio.SocketStream,
        handler: Handler,
        max_body: int,
        idle_s: float,
        reaper: _Reaper,
        spin: SpinSite | None,
        on_cut: Callable[[Request], Response] | None = None,
    ) -> None:
        self.stream = stream
        self.on_cut = on_cut
        self.current: Request | None = None
        """The request whose handler runs (None between requests): if the server is cancelled
        meanwhile, ``on_cut(current)`` is answered before the connection closes."""
        self.spin = spin
        """The server's wait for requests (spins only while no request is being handled)."""
        self.handler = handler
        self.idle_s = idle_s
        self.reaper = reaper
        self.reader = MessageReader(is_request=True, max_body_bytes=max_body)
        self.scope = trio.CancelScope()
        """The scope requests are served in; the reaper cancels it (idle, or a handler past
        its limit, after which the connection goes on in a new one)."""
        self.waiting_since: float | None = None
        """trio time at which the connection began to wait on its socket (None: it is not
        waiting, e.g. while the handler runs)."""
        self.expired = False
        self.deadline = math.inf
        """When the running handler's limit passes (inf: no handler with a limit runs)."""
        self.on_timeout: Callable[[], Response] | None = None
        self.timed_out = False
        self.keep_alive = True
        """Whether the request being handled lets the connection carry another."""
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

    def limit(self, seconds: float, on_timeout: Callable[[], Response]) -> None:
        """:attr:`Request.limit` of the request being handled."""
        self.on_timeout = on_timeout
        self.deadline = at = trio.current_time() + seconds
        if at < self.reaper.wake_at:
            self.reaper.deadline_set(at)

    def time_out(self) -> None:
        """The handler ran past its limit: cancel it (the connection answers for it)."""
        self.deadline = math.inf
        self.timed_out = True
        self.scope.cancel()

    async def run(self) -> None:
        try:
            owed: Response | None = None
            while True:
                with self.scope:
                    # the answer owed for a handler cut at its limit, under the new scope (so
                    # the idle bound covers a client that does not read it)
                    if owed is not None:
                        response, owed = owed, None
                        if not await self._answer(response, self.keep_alive):
                            return
                    while await self._one():
                        pass
                    return
                self.current = None  # cut by the reaper: answered below, not by on_cut
                if not self.timed_out:
                    break
                # a handler ran past its limit and was cancelled: answer for it, go on
                on_timeout = self.on_timeout
                self.timed_out = False
                self.on_timeout = None
                assert on_timeout is not None
                owed = on_timeout()
                self.scope = trio.CancelScope()
            if self.expired and not self.reader.idle:  # a request stalled half-way
                await self._refuse(ProtocolError("request not received in time", 408))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except trio.Cancelled:  # the server stops (the node's drain is over): a handler still
            cut = self.current  # running gets an answer saying so, not a closed connection
            if cut is not None and self.on_cut is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(min(self.idle_s, 1.0)):
                    try:
                        await self._answer(self.on_cut(cut), False)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
            raise
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
            data = await fastio.receive(stream, _RECEIVE_SIZE, self.spin)
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
            self.keep_alive = msg.keep_alive
            spin = self.spin
            if spin is not None:
                spin.active += 1
            self.current = req = Request(
                method, target[0], target[1], msg.body, self.peer, self.limit
            )
            try:
                response = await self.handler(req)
            except Exception:
                log.exception("spawn proxy: %s %r failed", method, msg.target)
                response = _error(500, "internal error")
            finally:
                self.deadline = math.inf  # from here on, nothing cuts this request's answer
                if spin is not None:
                    spin.active -= 1
            self.current = None  # not reached when cancelled: run() answers on_cut for it
            if self.scope.cancel_called:  # it ran past its limit and did not stop at the cut:
                await trio.lowlevel.checkpoint()  # answered as timed out (raises Cancelled)
        return await self._answer(response, msg.keep_alive)

    async def _answer(self, response: Response, keep_alive: bool) -> bool:
        """Send ``response``; whether the connection may carry another request."""
        headers = [("content-type", response.content_type), *response.headers]
        data = response_bytes(response.status, response.body, headers, close=not keep_alive)
        await self._send(data)
        return keep_alive


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    max_body_bytes: int,
    max_connections: int = 1024,
    idle_timeout_s: float = 60.0,
    busy_poll: BusyPoll | None = None,
    on_cut: Callable[[Request], Response] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``host:port`` until cancelled; ``started(port)`` once listening
    (``port=0`` picks a free port). With ``busy_poll``, a connection's wait for its next
    request may spin while no request is being handled (:mod:`.busypoll`). With ``on_cut``,
    a request whose handler is still running when the server is cancelled is answered
    ``on_cut(request)`` (within a second) before its connection closes."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    if port == 0 and len(listeners) > 1:
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    bound: int = listeners[0].socket.getsockname()[1]
    slots = trio.Semaphore(max_connections)
    reaper = _Reaper(idle_timeout_s)
    connections = reaper.connections
    spin = busy_poll.site(0) if busy_poll is not None and busy_poll.enabled else None

    async def serve_one(stream: trio.SocketStream) -> None:
        conn = _Connection(
            stream, handler, max_body_bytes, idle_timeout_s, reaper, spin, on_cut
        )
        connections.add(conn)
        try:
            await conn.run()
        finally:
            connections.discard(conn)
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
            nursery.start_soon(reaper.run)
            for listener in listeners:
                nursery.start_soon(accept, listener, nursery)
            task_status.started(bound)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
