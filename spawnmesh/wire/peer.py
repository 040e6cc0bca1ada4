"""The peer layer of one node: serves the wire protocol and keeps one connection per peer.

``PeerNode(node_id, incarnation, cluster, handler, keyring=..., tls=..., limits=...)``:

* ``await nursery.start(peer.serve, host, port)`` listens (``task_status.started(port)``) and
  hosts every connection and dial in its nursery;
* ``await peer.request(peer_id, addr, req)`` sends a Request to ``peer_id`` (dialing ``addr``
  on first use) and returns the reply payload, or raises the peer's rebuilt error;
* ``await peer.close()`` drains: GoAway on every connection, answers what already arrived,
  waits for the replies it is owed (up to ``drain_timeout_ms``), then ``serve`` returns.

One connection per peer pair: a dial and an inbound connection from the same peer may both
complete; the one dialed by the lower node id is kept (both sides decide alike), the other is
drained with a GoAway. A connection from a newer incarnation of a peer replaces the old one.
Dial failures back off exponentially (with jitter); during the backoff, requests to that peer
fail at once with the last error.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Final

import trio

from spawnmesh.errors import (
    PeerUnavailable,
    ProtocolError,
    SpawnmeshError,
)
from spawnmesh.keyring import Keyring
from spawnmesh.wire import messages as m
from spawnmesh.wire.codec import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode_frame
from spawnmesh.wire.connection import Connection, ConnLimits, Handler
from spawnmesh.wire.handshake import (
    HANDSHAKE_MAX_FRAME_BYTES,
    ClientHandshake,
    HandshakeConfig,
    ServerHandshake,
    Session,
)
from spawnmesh.wire.transport import TlsConfig, Transport, accept, connect, parse_addr, tls_error

log = logging.getLogger("spawnmesh.wire")

_ACCEPT_RETRY_ERRNOS: Final = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_STREAM_ERRORS: Final = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(frozen=True, slots=True)
class PeerLimits:
    """Bounds and timers of the peer layer (defaults suit a LAN)."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    """Largest frame body this node accepts; announced in the handshake."""
    max_in_flight: int = 1024
    """Requests this node may have waiting on one peer; beyond it ``Overloaded`` at once."""
    max_handlers: int = 1024
    """Requests from one peer running here at once; beyond it they are answered ``Overloaded``."""
    connect_timeout_ms: int = 5000
    """Dial + TLS + handshake must finish within this."""
    ping_interval_ms: int = 5000
    """A quiet connection is pinged this often."""
    idle_timeout_ms: int = 20000
    """A connection that received nothing for this long is dead (in-flight requests fail)."""
    backoff_initial_ms: int = 50
    """First wait after a failed dial; doubles per failure."""
    backoff_max_ms: int = 5000
    """Longest wait between dials to one peer."""
    drain_timeout_ms: int = 5000
    """``close()`` waits this long for connections to drain before cutting them."""
    recv_bytes: int = 65536
    """Largest single read from a socket."""
    max_handshakes: int = 64
    """Inbound connections allowed in the (unauthenticated) handshake phase at once."""


@dataclass
class _Dial:
    """A dial in progress; requests for the same peer wait on it."""

    done: trio.Event = field(default_factory=trio.Event)
    conn: Connection | None = None
    error: SpawnmeshError | None = None


@dataclass
class _Backoff:
    failures: int = 0
    retry_at: float = 0.0
    error: SpawnmeshError | None = None


@dataclass
class PeerStats:
    """Counters for tests and metrics."""

    dials: int = 0
    dial_failures: int = 0
    accepted: int = 0
    handshake_failures: int = 0
    duplicates_closed: int = 0
    connections_closed: int = 0
    protocol_errors: int = 0
    """Open sessions ended by the peer's protocol violation (malformed frame, oversized header,
    unexpected message): answered with a Reject, logged (rate-limited)."""


def _again(err: SpawnmeshError, prefix: str) -> SpawnmeshError:
    """A fresh instance of ``err``'s type (errors are raised in many tasks; never share one)."""
    try:
        fresh = type(err)(f"{prefix}{err}")
    except TypeError:
        fresh = PeerUnavailable(f"{prefix}{err}")
    fresh.origin = err.origin
    return fresh


class _RateLimitedLog:
    """At most one warning per reason per interval, with a count of those suppressed."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, reason: str, msg: str, *args: object) -> None:
        now = trio.current_time()
        last, suppressed = self._last.get(reason, (-1e18, 0))
        if now - last < self.interval_s:
            self._last[reason] = (last, suppressed + 1)
            return
        self._last[reason] = (now, 0)
        if suppressed:
            msg += f" ({suppressed} more suppressed)"
        log.warning(msg, *args)


class PeerNode:
    """Serves and dials peer connections for one node; see the module docstring."""

    def __init__(
        self,
        node_id: str,
        incarnation: int,
        cluster: str,
        handler: Handler,
        *,
        keyring: Keyring | None = None,
        tls: TlsConfig | None = None,
        limits: PeerLimits | None = None,
        rng: random.Random | None = None,
        versions: tuple[int, int] = (m.PROTOCOL_VERSION_MIN, m.PROTOCOL_VERSION_MAX),
    ) -> None:
        self.node_id = node_id
        self.incarnation = incarnation
        self.cluster = cluster
        self.limits = limits = limits or PeerLimits()
        self._handler = handler
        self._tls = tls
        self._hs_config = HandshakeConfig(
            cluster,
            node_id,
            incarnation,
            keyring,
            limits.max_frame_bytes,
            limits.max_handlers,
            versions[0],
            versions[1],
        )
        self._conn_limits = ConnLimits(
            max_frame_bytes=limits.max_frame_bytes,
            max_in_flight=limits.max_in_flight,
            max_handlers=limits.max_handlers,
            ping_interval_s=limits.ping_interval_ms / 1000,
            idle_timeout_s=limits.idle_timeout_ms / 1000,
        )
        self._rng = rng or random.Random(os.urandom(16))
        self._conns: dict[str, Connection] = {}
        self._all: set[Connection] = set()
        self._dials: dict[str, _Dial] = {}
        self._backoff: dict[str, _Backoff] = {}
        self._nursery: trio.Nursery | None = None
        self._listeners: list[trio.SocketListener] = []
        self._accept_scope = trio.CancelScope()
        self._handshaking = 0
        self._closing = False
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._all_closed = trio.Event()
        self._all_closed.set()
        self._warn = _RateLimitedLog()
        self.stats = PeerStats()
        self.port: int | None = None
        """Listening port once serving."""

    # ------------------------------------------------------------------ public

    def connection(self, peer_id: str) -> Connection | None:
        """The usable connection to ``peer_id``, if any."""
        conn = self._conns.get(peer_id)
        return conn if conn is not None and conn.usable else None

    @property
    def connected_peers(self) -> list[str]:
        """Peers with a usable connection."""
        return sorted(p for p, c in self._conns.items() if c.usable)

    @property
    def open_connections(self) -> int:
        """Connections not yet closed (including draining ones)."""
        return len(self._all)

    def disconnect(self, peer_id: str, reason: str = "") -> None:
        """Drop every connection to ``peer_id`` now (e.g. membership declared it dead): its
        requests in flight fail at once with ``PeerUnavailable``."""
        for conn in [c for c in self._all if c.peer_id == peer_id]:
            conn.abort(
                PeerUnavailable(f"node {peer_id} disconnected{': ' if reason else ''}{reason}")
            )

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and run every connection until :meth:`close` (or
        cancellation); ``task_status.started(port)`` once listening."""
        if self._nursery is not None or self._stopped.is_set():
            raise RuntimeError("PeerNode.serve() runs once")
        listeners = await trio.open_tcp_listeners(port, host=host)
        self._listeners = listeners
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._accept_all, listeners)
                self.port = listeners[0].socket.getsockname()[1]
                task_status.started(self.port)
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._closing = True
            self._nursery = None
            for listener in listeners:
                listener.socket.close()
            self._stopped.set()

    async def close(self) -> None:
        """Drain and stop: no new requests or connections; answer what arrived and wait for
        what we are owed (up to ``drain_timeout_ms``); then ``serve`` returns."""
        if self._nursery is None:
            self._closing = True
            self._stopped.set()
            return
        self._closing = True
        self._accept_scope.cancel()
        for listener in self._listeners:
            await listener.aclose()
        for conn in list(self._all):
            conn.go_away("shutting_down", f"node {self.node_id} is shutting down")
        with trio.move_on_after(self.limits.drain_timeout_ms / 1000):
            await self._all_closed.wait()
        self._stop.set()
        await self._stopped.wait()

    async def request(
        self,
        peer_id: str,
        addr: str | tuple[str, int],
        req: m.Request,
        *,
        deadline: float | None = None,
    ) -> bytes | None:
        """Send ``req`` to node ``peer_id`` at ``addr`` (dialed if there is no connection yet)
        and return the reply payload. ``req.id`` and ``req.deadline_ms`` are set here, the
        latter from the caller's effective deadline; the frame is encoded before anything else
        can run, so one Request may be sent to several peers concurrently. Errors: the peer's
        rebuilt error, ``PeerUnavailable`` (retryable: cannot connect, or lost with the request
        in flight), ``Overloaded``, ``FrameTooLarge``, or the handshake's typed errors.
        ``deadline``: the caller's ``trio.current_effective_deadline()`` when it already has it
        (it walks every enclosing scope; callers on a hot path look it up once)."""
        conn = self._conns.get(peer_id)
        if conn is None or not conn.usable:
            conn = await self._connection_for(peer_id, addr)
        return await conn.request(req, deadline)

    # ------------------------------------------------------------------ dialing

    async def _connection_for(self, peer_id: str, addr: str | tuple[str, int]) -> Connection:
        if self._closing or self._nursery is None:
            raise PeerUnavailable(f"node {self.node_id} is not serving the peer protocol")
        if peer_id == self.node_id:
            raise ProtocolError(f"node {self.node_id} cannot send a peer request to itself")
        dial = self._dials.get(peer_id)
        if dial is None:
            back = self._backoff.get(peer_id)
            now = trio.current_time()
            if back is not None and back.error is not None and now < back.retry_at:
                raise _again(
                    back.error,
                    f"node {peer_id} unreachable (next dial in "
                    f"{(back.retry_at - now) * 1000:.0f} ms): ",
                )
            dial = _Dial()
            self._dials[peer_id] = dial
            self._nursery.start_soon(self._dial, peer_id, addr, dial)
        await dial.done.wait()
        if dial.error is not None:
            raise _again(dial.error, "")
        conn = self._conns.get(peer_id)
        if conn is None or not conn.usable:
            raise PeerUnavailable(f"connection to node {peer_id} closed right after it opened")
        return conn

    async def _dial(self, peer_id: str, addr: str | tuple[str, int], dial: _Dial) -> None:
        self.stats.dials += 1
        transport: Transport | None = None
        try:
            try:
                host, port = parse_addr(addr)
                with trio.fail_after(self.limits.connect_timeout_ms / 1000):
                    transport = await connect(host, port, self._tls, self.limits.recv_bytes)
                    machine = ClientHandshake(self._hs_config, os.urandom(32), peer_id)
                    session, decoder = await self._handshake(transport, machine)
            except (SpawnmeshError, trio.TooSlowError, ValueError, *_STREAM_ERRORS) as exc:
                if transport is not None:
                    transport.close()
                self._dial_failed(peer_id, dial, self._dial_error(peer_id, addr, exc))
                return
            self._backoff.pop(peer_id, None)
            conn = self._new_connection(transport, decoder, session, dialer=self.node_id)
            dial.conn = conn
        finally:
            if self._dials.get(peer_id) is dial:
                del self._dials[peer_id]
            if dial.conn is None and dial.error is None:
                dial.error = PeerUnavailable(f"dial to node {peer_id} was cancelled")
            dial.done.set()
        await conn.run()

    def _dial_failed(self, peer_id: str, dial: _Dial, err: SpawnmeshError) -> None:
        self.stats.dial_failures += 1
        back = self._backoff.setdefault(peer_id, _Backoff())
        delay_ms = min(
            self.limits.backoff_max_ms,
            self.limits.backoff_initial_ms * 2 ** min(back.failures, 30),
        )
        back.failures += 1
        back.retry_at = trio.current_time() + delay_ms / 1000 * (0.5 + self._rng.random() / 2)
        back.error = err
        dial.error = err

    def _dial_error(
        self, peer_id: str, addr: str | tuple[str, int], exc: BaseException
    ) -> SpawnmeshError:
        if isinstance(exc, SpawnmeshError):
            return exc
        if isinstance(exc, trio.TooSlowError):
            return PeerUnavailable(
                f"node {peer_id} at {addr}: no connection within "
                f"{self.limits.connect_timeout_ms} ms"
            )
        if isinstance(exc, trio.BrokenResourceError):
            err = tls_error(exc)
            if isinstance(err, SpawnmeshError):
                return err
        return PeerUnavailable(f"cannot connect to node {peer_id} at {addr}: {exc}")

    # ------------------------------------------------------------------ accepting

    async def _accept_all(self, listeners: list[trio.SocketListener]) -> None:
        with self._accept_scope:  # close() cancels accepting, not the connections
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY_ERRNOS:
                    self._warn.warning("accept", "peer listener: %s; retrying", exc)
                    await trio.sleep(0.1)
                    continue
                raise
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            if self._handshaking >= self.limits.max_handshakes or self._nursery is None:
                self._warn.warning(
                    "handshakes",
                    "peer listener: too many handshakes at once; closing a new connection",
                )
                await stream.aclose()
                continue
            self.stats.accepted += 1
            self._handshaking += 1  # counted from here, so a burst cannot pass the check
            self._nursery.start_soon(self._inbound, stream)

    async def _inbound(self, stream: trio.SocketStream) -> None:
        transport: Transport | None = None
        where = "?"
        try:
            try:
                host, port = stream.socket.getpeername()[:2]
                where = f"{host}:{port}"
            except OSError:
                pass
            with trio.fail_after(self.limits.connect_timeout_ms / 1000):
                transport = await accept(stream, self._tls, self.limits.recv_bytes)
                machine = ServerHandshake(self._hs_config, os.urandom(32))
                session, decoder = await self._handshake(transport, machine)
        except (SpawnmeshError, trio.TooSlowError, *_STREAM_ERRORS) as exc:
            if transport is not None:
                transport.close()
            else:
                await trio.aclose_forcefully(stream)
            self.stats.handshake_failures += 1
            reason = exc.code if isinstance(exc, SpawnmeshError) else type(exc).__name__
            shown: object = exc
            if isinstance(exc, trio.BrokenResourceError):
                shown = tls_error(exc)
            elif isinstance(exc, trio.TooSlowError):
                shown = "timed out"
            self._warn.warning(
                reason, "peer handshake from %s refused (%s): %s", where, reason, shown
            )
            return
        finally:
            self._handshaking -= 1
        conn = self._new_connection(transport, decoder, session, dialer=session.peer_node_id)
        await conn.run()

    # ------------------------------------------------------------------ both

    async def _handshake(
        self, transport: Transport, machine: ClientHandshake | ServerHandshake
    ) -> tuple[Session, FrameDecoder]:
        """Run a handshake machine over ``transport``; returns the session and the decoder,
        which may hold bytes that followed the last handshake frame, still undecoded.

        Frames are taken one at a time: the frame that opens the session ends the 16 KiB
        pre-session limit, and what follows it (the acceptor may send requests right after its
        Ready, in the same segment) is decoded by the connection under the session limit."""
        decoder = FrameDecoder(HANDSHAKE_MAX_FRAME_BYTES)
        if isinstance(machine, ClientHandshake):
            await transport.send_all(b"".join(encode_frame(b) for b in machine.start()))
        while True:
            data = await transport.receive_some()
            if not data:
                raise PeerUnavailable("the peer closed the connection during the handshake")
            try:
                body = decoder.feed_one(data)
                while body is not None:
                    out = machine.receive(body)
                    if out:
                        await transport.send_all(b"".join(encode_frame(b) for b in out))
                    if machine.session is not None:
                        return machine.session, decoder
                    body = decoder.feed_one()
            except SpawnmeshError as exc:
                reject = machine.reject
                if reject is None and not machine.rejected_by_peer:
                    reject = m.encode(m.Reject(exc.code, str(exc)))  # e.g. a bad frame
                if reject is not None:
                    with trio.move_on_after(1), contextlib.suppress(*_STREAM_ERRORS):
                        await transport.send_all(encode_frame(reject))
                        transport.shutdown_write()
                        while await transport.receive_some():
                            pass
                raise

    def _new_connection(
        self, transport: Transport, decoder: FrameDecoder, session: Session, *, dialer: str
    ) -> Connection:
        conn = Connection(
            transport,
            decoder,
            session,
            node_id=self.node_id,
            dialer=dialer,
            handler=self._handler,
            limits=self._conn_limits,
            on_closed=self._closed_conn,
            on_protocol_error=self._protocol_error,
        )
        self._all.add(conn)
        if self._all_closed.is_set():  # keep the pending one: close() may be waiting on it
            self._all_closed = trio.Event()
        if self._closing:
            conn.go_away("shutting_down", f"node {self.node_id} is shutting down")
            return conn
        self._register(conn)
        return conn

    def _register(self, conn: Connection) -> None:
        """Keep one connection per peer (see the module docstring)."""
        peer = conn.peer_id
        old = self._conns.get(peer)
        if old is None or not old.usable:
            self._conns[peer] = conn
            return
        if conn.peer_incarnation != old.peer_incarnation:
            newer, older = (
                (conn, old) if conn.peer_incarnation > old.peer_incarnation else (old, conn)
            )
        else:
            winner = min(self.node_id, peer)
            if conn.dialer == winner and old.dialer != winner:
                newer, older = conn, old
            else:
                newer, older = old, conn
        self._conns[peer] = newer
        self.stats.duplicates_closed += 1
        older.go_away("duplicate", "one connection per peer pair")

    def _protocol_error(self, conn: Connection, exc: ProtocolError) -> None:
        """Count and log (rate-limited, like refused handshakes) a session ended by a protocol
        violation: the peer is buggy or hostile, and operators need to see it (spec 9)."""
        self.stats.protocol_errors += 1
        self._warn.warning(
            f"session:{exc.code}",
            "peer %s at %s: protocol error (%s), connection closed with a Reject: %s",
            conn.peer_id,
            conn.transport.peer_address,
            exc.code,
            exc,
        )

    def _closed_conn(self, conn: Connection) -> None:
        self.stats.connections_closed += 1
        self._all.discard(conn)
        if self._conns.get(conn.peer_id) is conn:
            del self._conns[conn.peer_id]
        if not self._all:
            self._all_closed.set()
