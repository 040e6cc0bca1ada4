"""A small pooled HTTP/1.1 client on trio and h11: the node's calls to a Spawn host.

Each turn of a Spawn-registered actor is one ``POST /api/v1/actors/actions`` to the host. The
pool keeps connections alive between turns (Spawn's proxy sends ``Connection: keep-alive``),
opens more while turns run concurrently (up to ``max_connections``; further turns wait), and
writes each request, head and body, in one ``send_all`` (one segment for a small turn).

A connection is put back only after a complete exchange; one interrupted in any way (the turn's
deadline, a cancelled caller, an error) is closed, so no late answer can be read as another
turn's. A reused connection that the host closed while it sat idle is noticed on the next
request (EOF before any byte of the answer) and that request is sent again once on a new
connection: nothing was read, so the host did not take it. Errors are ``HostUnavailable``
(retryable): refused, reset, closed, or an answer that is not HTTP.
"""

from __future__ import annotations

import logging
from typing import Final

import h11
import trio

from spawnmesh.errors import HostUnavailable

log = logging.getLogger("spawnmesh.spawn")

_RECEIVE_SIZE: Final = 64 * 1024


class _Conn:
    """One keep-alive connection: its stream and h11 state."""

    __slots__ = ("h11", "reused", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.reused = False


class _Stale(Exception):
    """A reused connection was closed by the host before it answered: retry on a new one."""


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
    ) -> None:
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
        headers = [
            ("host", self.address),
            ("content-type", content_type),
            ("accept", "application/octet-stream"),
            ("connection", "keep-alive"),
            ("content-length", str(len(body))),
        ]
        request = h11.Request(method="POST", target=path, headers=headers)
        conn = await self._acquire()
        try:
            return await self._exchange(conn, request, body)
        except _Stale:
            pass
        conn = await self._acquire(fresh=True)
        try:
            return await self._exchange(conn, request, body)
        except _Stale:
            raise HostUnavailable(f"{self.address} closed the connection") from None

    async def _acquire(self, *, fresh: bool = False) -> _Conn:
        while True:
            if self._idle and not fresh:
                conn = self._idle.pop()
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
                return _Conn(stream)
            fresh = False  # waited for a slot: an idle connection is as good as a new one
            await self._slot.park()

    async def _exchange(self, conn: _Conn, request: h11.Request, body: bytes) -> tuple[int, bytes]:
        """Send one request on ``conn`` and read the answer; return the connection to the
        pool after a complete exchange, close it otherwise."""
        keep = False
        try:
            h = conn.h11
            data = h.send(request) + h.send(h11.Data(data=body)) + h.send(h11.EndOfMessage())
            try:
                await conn.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if conn.reused:
                    raise _Stale from None
                raise HostUnavailable(f"sending to {self.address} failed: {exc}") from None
            status, data = await self._read(conn)
            if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
                conn.h11.start_next_cycle()
                keep = True
            return status, data
        finally:
            if keep and not self.closed:
                self._idle.append(conn)
                self._slot.unpark()
            else:
                self._open -= 1
                self._slot.unpark()
                conn.stream.socket.close()

    async def _read(self, conn: _Conn) -> tuple[int, bytes]:
        status = 0
        chunks: list[bytes] = []
        size = 0
        got_any = False
        h = conn.h11
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise HostUnavailable(
                    f"the host at {self.address} answered malformed HTTP: {exc}"
                ) from None
            if event is h11.NEED_DATA:
                try:
                    data = await conn.stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    if conn.reused and not got_any:
                        raise _Stale from None
                    raise HostUnavailable(f"reading from {self.address} failed: {exc}") from None
                if not data and conn.reused and not got_any:
                    raise _Stale
                got_any = True
                h.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self._max_response:
                    raise HostUnavailable(
                        f"the host at {self.address} answered more than {self._max_response} bytes"
                    )
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, b"".join(chunks) if len(chunks) != 1 else chunks[0]
            elif isinstance(event, h11.ConnectionClosed):
                raise HostUnavailable(f"the host at {self.address} closed the connection")
            # InformationalResponse (100 Continue): keep reading

    def close_idle(self) -> None:
        """Close the idle connections (new requests open new ones)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            self._open -= 1
            conn.stream.socket.close()
        self._slot.unpark_all()

    def close(self) -> None:
        """Close idle connections and refuse new requests (in-flight ones finish)."""
        self.closed = True
        self.close_idle()
