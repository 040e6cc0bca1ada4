"""A small pooled HTTP/1.1 client on trio: the node's calls to a Spawn host (codec: :mod:`.http11`).

Each turn of a Spawn-registered actor is one ``POST /api/v1/actors/actions`` to the host. The
pool keeps connections alive between turns (Spawn's proxy sends ``Connection: keep-alive``),
opens more while turns run concurrently (up to ``max_connections``; further turns wait), and
writes each request, head and body, in one ``send_all`` (one segment for a small turn).

A connection is put back only after a complete exchange; one interrupted in any way (the turn's
deadline, a cancelled caller, an error) is closed, so no late answer can be read as another
turn's. A turn is not idempotent, so it is sent a second time only when the host cannot have
read it (the rule of urllib3, aiohttp and Go's net/http for requests that are not idempotent):

- before an idle connection is reused it is polled (one ``poll(0)``, about 0.3 us): readable
  means the host closed it while it sat idle (or sent something unasked), so it is closed and
  another one taken, the request not yet sent;
- a reused connection whose send fails (reset, broken pipe) is retried once on a new
  connection: the request never reached the host whole, so no turn ran;
- once the request is written, EOF or a reset before the whole answer is ``HostUnavailable``
  ("closed the connection without an answer") and is not retried, on a new connection as on a
  reused one: the host may have run the turn and died (the caller sees the error; the runtime
  does not run the turn again).

A pool given the node's :class:`~.busypoll.BusyPoll` lets a wait for an answer poll its socket
briefly while it has one turn in flight (:mod:`.busypoll`).

Errors are ``HostUnavailable`` (retryable): refused, reset, closed, or an answer that is not
HTTP.
"""
from __future__ import annotations

import logging
import select
from typing import Final

import trio

from spawnmesh.errors import HostUnavailable
from spawnmesh.spawn_compat import fastio
from spawnmesh.spawn_compat.busypoll import BusyPoll
from spawnmesh.spawn_compat.http11 import (
    ConnectionClosed,
    MessageReader,
    ProtocolError,
    request_bytes,
)

log = logging.getLogger("spawnmesh.spawn")

_RECEIVE_SIZE: Final = 64 * 1024


class _Conn:
    """One keep-alive connection: its stream, its response reader, and a poll object that
    tells whether the host closed it while it sat idle."""

    __slots__ = ("poll", "reader", "reused", "stream")

    def __init__(self, stream: trio.SocketStream, max_response: int) -> None:
        self.stream = stream
        self.reader = MessageReader(is_request=False, max_body_bytes=max_response)
        self.reused = False
        self.poll = select.poll()
        self.poll.register(stream.socket.fileno(), select.POLLIN)

    def closed_while_idle(self) -> bool:
        """Whether the idle connection is readable: EOF (the host closed it), a reset, or
        bytes nobody asked for; either way it cannot carry a request."""
        return bool(self.poll.poll(0))


class _Unsent(Exception):
    """Sending on a reused connection failed: the host did not get the request whole."""


class HttpPool:
    """Keep-alive connections to one HTTP server (``host:port``)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_connections: int = 64,
        max_response_bytes: int = 4 * 1024 * 1024,
        connect_timeout_s: float = 5.0,
        busy_poll: BusyPoll | None = None,
    ) -> None:
        """``busy_poll``: waits for an answer may spin while this pool has one turn in flight
        (:mod:`.busypoll`); None never spins."""
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self._max = max_connections
        self._max_response = max_response_bytes
        self._connect_timeout_s = connect_timeout_s
        self._idle: list[_Conn] = []
        self._open = 0
        self._slot = trio.lowlevel.ParkingLot()
        self.closed = False
        self.requests_total = 0
        self.connections_opened_total = 0
        self._spin = busy_poll.site(1) if busy_poll is not None and busy_poll.enabled else None

    def __repr__(self) -> str:
        return f"<HttpPool {self.address} open={self._open} idle={len(self._idle)}>"

    @property
    def open_connections(self) -> int:
        """Connections open now (idle or carrying a request)."""
        return self._open

    async def post(
        self, path: str, body: bytes, content_type: str = "application/octet-stream"
    ) -> tuple[int, bytes]:
        """``POST path`` with ``body``; returns (status, response body). Bounded by the
        caller's cancel scopes; raises HostUnavailable when the server cannot be reached."""
        if self.closed:
            raise HostUnavailable(f"the connection pool to {self.address} is closed")
        self.requests_total += 1
        request = request_bytes(
            "POST",
            path,
            self.address,
            body,
            [
                ("content-type", content_type),
                ("accept", "application/octet-stream"),
                ("connection", "keep-alive"),
            ],
        )
        spin = self._spin
        if spin is not None:
            spin.active += 1
        try:
            conn = await self._acquire()
            try:
                return await self._exchange(conn, request)
            except _Unsent:
                pass
            conn = await self._acquire(fresh=True)
            try:
                return await self._exchange(conn, request)
            except _Unsent as exc:  # it waited for a slot and took an idle one, which failed too
                raise HostUnavailable(f"sending to {self.address} failed: {exc}") from None
        finally:
            if spin is not None:
                spin.active -= 1

    async def _acquire(self, *, fresh: bool = False) -> _Conn:
        while True:
            while self._idle and not fresh:
                conn = self._idle.pop()
                if conn.closed_while_idle():
                    self._discard(conn)
                    continue
                conn.reused = True
                return conn
            if self._open < self._max:
                self._open += 1
                try:
                    with trio.fail_after(self._connect_timeout_s):
                        stream = await trio.open_tcp_stream(self.host, self.port)
                except BaseException as exc:
                    self._open -= 1
                    self._slot.unpark()
                    if isinstance(exc, OSError | trio.TooSlowError):
                        raise HostUnavailable(
                            f"cannot connect to the host at {self.address}: {exc}"
                        ) from None
                    raise
                self.connections_opened_total += 1
                return _Conn(stream, self._max_response)
            fresh = False  # waited for a slot: an idle connection is as good as a new one
            await self._slot.park()

    def _discard(self, conn: _Conn) -> None:
        """Close a connection that will carry no more requests (frees its slot)."""
        self._open -= 1
        self._slot.unpark()
        conn.stream.socket.close()

    async def _exchange(self, conn: _Conn, request: bytes) -> tuple[int, bytes]:
        """Send one request on ``conn`` and read the answer; return the connection to the
        pool after a complete exchange, close it otherwise."""
        keep = False
        try:
            try:
                await fastio.send(conn.stream, request)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if conn.reused:
                    raise _Unsent(str(exc)) from None
                raise HostUnavailable(f"sending to {self.address} failed: {exc}") from None
            status, data, keep = await self._read(conn)
            return status, data
        finally:
            if keep and not self.closed:
                self._idle.append(conn)
                self._slot.unpark()
            else:
                self._discard(conn)

    async def _read(self, conn: _Conn) -> tuple[int, bytes, bool]:
        """(status, body, whether the connection may be reused). The request was written:
        whatever goes wrong now is not retried (the host may have run the turn)."""
        reader = conn.reader
        spin = self._spin
        while True:
            try:
                msg = reader.next()
            except ConnectionClosed as exc:
                what = "in the middle of its answer" if exc.partial else "without an answer"
                raise HostUnavailable(
                    f"the host at {self.address} closed the connection {what}"
                ) from None
            except ProtocolError as exc:
                if exc.status == 413:
                    raise HostUnavailable(
                        f"the host at {self.address} answered more than {self._max_response} bytes"
                    ) from None
                raise HostUnavailable(
                    f"the host at {self.address} answered malformed HTTP: {exc}"
                ) from None
            if msg is not None:
                return msg.status, msg.body, msg.keep_alive
            try:
                data = await fastio.receive(conn.stream, _RECEIVE_SIZE, spin)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise HostUnavailable(
                    f"the host at {self.address} broke the connection without a whole answer: "
                    f"{exc}"
                ) from None
            reader.feed(data)  # b"" at EOF: the reader answers or raises, never None again

    def close_idle(self) -> None:
        """Close the idle connections (new requests open new ones)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)
        self._slot.unpark_all()

    def close(self) -> None:
        """Close idle connections and refuse new requests (in-flight ones finish)."""
        self.closed = True
        self.close_idle()
