"""The membership transport (trio shell): one UDP socket and one TCP listener on the same port,
every packet sealed or opened by :class:`~spawnmesh.cluster.seal.PacketSealer`.

UDP carries SWIM datagrams. TCP carries one request frame and one reply frame per connection
(push-pull state sync, join, fallback ping): a frame is a 4-byte big-endian length and the
sealed packet, at most ``max_frame_bytes``. Every exchange runs under a cancel scope (the
core's ``timeout_ms``), inbound and outbound connections are bounded by semaphores, and a packet
that fails to open is counted per reason, logged at most once per ``REJECT_LOG_INTERVAL_S`` per
reason (naming the source address), and never handed on. Time is ``trio.current_time()``.
"""

from __future__ import annotations

import errno
import logging
import socket as _socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from spawnmesh.cluster.addr import format_addr
from spawnmesh.cluster.messages import Addr
from spawnmesh.cluster.seal import MAX_OVERHEAD, Channel, PacketSealer
from spawnmesh.errors import ConfigError, PacketRejected

log = logging.getLogger("spawnmesh.cluster.transport")

REJECT_LOG_INTERVAL_S = 10.0
"""At most one log line per rejection reason in this many seconds (the rest are counted)."""
MAX_FRAME_BYTES = 8 << 20
"""Default bound of one TCP frame (a push-pull of a few thousand members fits)."""
_LEN = struct.Struct(">I")
_UDP_RECEIVE = 65_536
_ADDR_ERRORS = (OSError, OverflowError, ValueError, TypeError)
"""What a send or connect to a bad address raises (port out of range: OverflowError; a NUL in
the host: ValueError or TypeError): counted as a failed send, never a crash of membership."""


@dataclass(slots=True)
class TransportStats:
    """Traffic and rejection counters (bytes include the security header and tag)."""

    udp_sent_packets: int = 0
    udp_sent_bytes: int = 0
    udp_received_packets: int = 0
    udp_received_bytes: int = 0
    udp_send_errors: int = 0
    tcp_sent_bytes: int = 0
    tcp_received_bytes: int = 0
    tcp_outbound: int = 0
    tcp_outbound_failed: int = 0
    tcp_outbound_dropped: int = 0
    """Outbound exchanges not started because ``max_outbound`` were already in flight."""
    tcp_inbound: int = 0
    tcp_inbound_failed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    """Packets refused before the core, by reason."""

    def as_dict(self) -> dict[str, object]:
        """JSON-able copy."""
        out: dict[str, object] = {
            name: getattr(self, name) for name in self.__slots__ if name != "rejected"
        }
        out["rejected"] = dict(self.rejected)
        out["sent_bytes"] = self.udp_sent_bytes + self.tcp_sent_bytes
        return out


class Transport:
    """Sockets, framing and sealing for one node's gossip; the membership service drives it."""

    def __init__(
        self,
        sealer: PacketSealer,
        *,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        max_inbound: int = 64,
        max_outbound: int = 32,
        inbound_timeout_s: float = 10.0,
    ) -> None:
        self.sealer = sealer
        self.max_frame_bytes = max_frame_bytes
        self.inbound_timeout_s = inbound_timeout_s
        self.stats = TransportStats()
        self._inbound = trio.Semaphore(max_inbound)
        self._outbound = trio.Semaphore(max_outbound)
        self._udp: trio.socket.SocketType | None = None
        self._tcp: trio.socket.SocketType | None = None
        self.bound: Addr = ("", 0)
        """(host, port) actually bound (same port for UDP and TCP)."""
        self._reject_logged: dict[str, tuple[float, int]] = {}

    # -- sockets ------------------------------------------------------------------------------

    async def bind(self, host: str, port: int) -> Addr:
        """Bind UDP and TCP on ``host:port`` (0: a free port both protocols can have)."""
        family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
        last: OSError | None = None
        for _ in range(1 if port else 20):
            udp = trio.socket.socket(family, _socket.SOCK_DGRAM)
            tcp = trio.socket.socket(family, _socket.SOCK_STREAM)
            try:
                await udp.bind((host, port))
                actual = udp.getsockname()[1]
                tcp.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
                await tcp.bind((host, actual))
                tcp.listen(128)
            except OSError as exc:
                udp.close()
                tcp.close()
                last = exc
                if exc.errno not in (errno.EADDRINUSE, errno.EACCES) or port:
                    break
                continue
            self._udp, self._tcp = udp, tcp
            self.bound = (host, actual)
            return self.bound
        reason = last.strerror if last is not None else "no free port"
        raise ConfigError(
            "cluster.gossip_port",
            f"cannot bind gossip UDP+TCP on {format_addr((host, port))}: {reason} (another node "
            "on this port? set cluster.gossip_port, 0 picks a free one)",
        )

    def close(self) -> None:
        """Close both sockets (idempotent)."""
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = None

    @property
    def is_bound(self) -> bool:
        """Whether the sockets are open."""
        return self._udp is not None

    # -- UDP ----------------------------------------------------------------------------------

    async def send_datagram(self, addr: Addr, packet: bytes) -> None:
        """Seal and send one datagram; a send error (any bad address included) is counted, never
        raised."""
        udp = self._udp
        if udp is None:
            return
        data = self.sealer.seal(packet, Channel.UDP)
        try:
            await udp.sendto(data, addr)
        except _ADDR_ERRORS as exc:
            self.stats.udp_send_errors += 1
            log.debug("gossip: datagram to %s failed: %s", format_addr(addr), exc)
            return
        self.stats.udp_sent_packets += 1
        self.stats.udp_sent_bytes += len(data)

    async def receive_datagrams(self, handle: Callable[[Addr, bytes], Awaitable[None]]) -> None:
        """Receive forever; every datagram that opens is passed to ``handle(source, packet)``."""
        udp = self._udp
        assert udp is not None, "bind() first"
        while True:
            try:
                data, source = await udp.recvfrom(_UDP_RECEIVE)
            except OSError as exc:  # e.g. ICMP errors surfacing on some platforms
                log.debug("gossip: receive failed: %s", exc)
                continue
            self.stats.udp_received_packets += 1
            self.stats.udp_received_bytes += len(data)
            addr: Addr = (source[0], source[1])
            packet = self.open(data, addr, Channel.UDP)
            if packet is not None:
                await handle(addr, packet)

    def open(self, data: bytes, source: Addr, channel: Channel) -> bytes | None:
        """Open one packet; a rejection is counted and logged (rate-limited), giving None."""
        try:
            return self.sealer.open(data, channel)
        except PacketRejected as exc:
            self._rejected(source, channel, exc)
            return None

    def _rejected(self, source: Addr, channel: Channel, exc: PacketRejected) -> None:
        reason = exc.reason
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        now = trio.current_time()
        last, suppressed = self._reject_logged.get(reason, (-1e18, 0))
        if now - last >= REJECT_LOG_INTERVAL_S:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            log.warning(
                "gossip: rejected %s packet from %s: %s%s",
                channel.name,
                format_addr(source),
                exc,
                more,
            )
            self._reject_logged[reason] = (now, 0)
        else:
            self._reject_logged[reason] = (last, suppressed + 1)

    # -- TCP ----------------------------------------------------------------------------------

    async def serve_tcp(
        self,
        handle: Callable[[Addr, bytes], Awaitable[bytes | None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections forever: one request frame in, ``handle``, one reply frame out."""
        tcp = self._tcp
        assert tcp is not None, "bind() first"
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await self._inbound.acquire()
                try:
                    conn, source = await tcp.accept()
                except OSError as exc:
                    self._inbound.release()
                    log.warning("gossip: accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                except BaseException:
                    self._inbound.release()
                    raise
                nursery.start_soon(self._serve_one, conn, (source[0], source[1]), handle)

    async def _serve_one(
        self,
        conn: trio.socket.SocketType,
        source: Addr,
        handle: Callable[[Addr, bytes], Awaitable[bytes | None]],
    ) -> None:
        stream = trio.SocketStream(conn)
        self.stats.tcp_inbound += 1
        try:
            with trio.move_on_after(self.inbound_timeout_s) as scope:
                data = await self._read_frame(stream)
                if data is None:
                    self.stats.tcp_inbound_failed += 1
                    return
                packet = self.open(data, source, Channel.TCP)
                if packet is None:
                    return
                reply = await handle(source, packet)
                if reply is not None:
                    await self._write_frame(stream, self.sealer.seal(reply, Channel.TCP))
            if scope.cancelled_caught:
                self.stats.tcp_inbound_failed += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.stats.tcp_inbound_failed += 1
        finally:
            self._inbound.release()
            await trio.aclose_forcefully(stream)

    async def exchange(self, addr: Addr, packet: bytes, timeout_s: float) -> bytes | None:
        """Send one request frame to ``addr`` and return the opened reply (None: no connection,
        timeout, no reply, rejected reply, or too many exchanges in flight)."""
        try:
            self._outbound.acquire_nowait()
        except trio.WouldBlock:
            self.stats.tcp_outbound_dropped += 1
            return None
        self.stats.tcp_outbound += 1
        try:
            with trio.move_on_after(timeout_s):
                try:
                    stream = await trio.open_tcp_stream(addr[0], addr[1])
                    async with stream:
                        await self._write_frame(stream, self.sealer.seal(packet, Channel.TCP))
                        data = await self._read_frame(stream)
                    if data is not None:
                        return self.open(data, addr, Channel.TCP)
                except (trio.BrokenResourceError, trio.ClosedResourceError, *_ADDR_ERRORS) as exc:
                    log.debug("gossip: TCP exchange with %s failed: %s", format_addr(addr), exc)
            self.stats.tcp_outbound_failed += 1
            return None
        finally:
            self._outbound.release()

    async def _write_frame(self, stream: trio.SocketStream, data: bytes) -> None:
        await stream.send_all(_LEN.pack(len(data)) + data)
        self.stats.tcp_sent_bytes += 4 + len(data)

    async def _read_frame(self, stream: trio.SocketStream) -> bytes | None:
        """One frame, or None on EOF or an oversized length (the connection is then dropped)."""
        head = await _read_exactly(stream, 4)
        if head is None:
            return None
        (size,) = _LEN.unpack(head)
        if size > self.max_frame_bytes + MAX_OVERHEAD:
            log.warning(
                "gossip: TCP frame of %d bytes exceeds %d; dropped", size, self.max_frame_bytes
            )
            return None
        data = await _read_exactly(stream, size)
        if data is not None:
            self.stats.tcp_received_bytes += 4 + size
        return data


async def _read_exactly(stream: trio.SocketStream, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(min(n - len(buf), 1 << 16))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
