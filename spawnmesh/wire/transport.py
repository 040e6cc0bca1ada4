"""Byte transports under a peer connection: plain TCP on a non-blocking socket, or TLS.

Plain TCP bypasses ``trio.SocketStream`` on purpose (measured, spec/wire.md "Performance"): the
connection can send a frame synchronously when the socket takes it (no task switch, no
checkpoint), and a read that finds data returns it without the extra schedule point trio's
stream adds after every successful ``recv``. Waiting uses ``trio.lowlevel.wait_readable`` /
``wait_writable``, so cancellation and the event loop work as usual. TLS runs on
``trio.SSLStream`` (mutual authentication, contexts from :class:`TlsConfig`).
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

import trio

from spawnmesh.errors import AuthenticationFailed, PeerUnavailable

STREAK_MAX = 8
"""Reads that found data without waiting before a read yields to the scheduler (fairness)."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS for peer connections: the server context requires a client certificate (mutual
    authentication), the client context verifies the server's.

    ``server_hostname``: the name to check in the server's certificate when the client context
    checks host names (None: the host part of the dialed address)."""

    server_context: ssl.SSLContext
    client_context: ssl.SSLContext
    server_hostname: str | None = None

    @classmethod
    def from_files(
        cls,
        cert_file: str | Path,
        key_file: str | Path,
        ca_file: str | Path,
        *,
        check_hostname: bool = False,
    ) -> TlsConfig:
        """Both contexts from one node certificate and key and the cluster CA (TLS 1.2+).

        Host names are not checked by default: nodes are addressed by IP, and the peer's
        identity is its certificate (signed by the cluster CA) plus the handshake's node id."""
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca_file))
        server.verify_mode = ssl.CERT_REQUIRED
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
        client.check_hostname = check_hostname
        for ctx in (server, client):
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(cert_file), str(key_file))
        return cls(server, client)


class Transport:
    """Plain TCP on a non-blocking stdlib socket (see the module docstring)."""

    direct = True
    """Whether :meth:`try_send` can send synchronously."""

    def __init__(self, sock: socket.socket, recv_bytes: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.recv_bytes = recv_bytes
        self._streak = 0
        self._closed = False
        try:
            host, port = sock.getpeername()[:2]
            self.peer_address = f"{host}:{port}"
        except OSError:
            self.peer_address = "?"

    async def receive_some(self) -> bytes | bytearray:
        """Up to ``recv_bytes`` bytes; b"" at end of stream. Raises OSError on reset."""
        sock = self.sock
        if self._streak >= STREAK_MAX:
            self._streak = 0
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = sock.recv(self.recv_bytes)
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            self._streak += 1
            return data

    def try_send(self, data: bytearray) -> int:
        """Send what the socket takes now, without waiting; bytes sent (0 if it would block)."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0

    async def send_all(self, data: bytes | bytearray) -> None:
        """Send everything, waiting for the socket to drain as needed."""
        sock = self.sock
        with memoryview(data) as view:
            total = len(view)
            sent = 0
            while sent < total:
                try:
                    sent += sock.send(view[sent:])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)

    def shutdown_write(self) -> None:
        """Half-close: the peer reads end of stream after our last byte (under TLS: a TCP
        end of stream without close_notify, which the peer's reader takes as the end)."""
        self.sock.shutdown(socket.SHUT_WR)

    def close(self, *, reset: bool = False) -> None:
        """Close at once (tasks waiting on the socket get ``ClosedResourceError``); with
        ``reset``, discard unsent bytes and reset the connection (SO_LINGER 0) instead of
        letting the kernel deliver them later."""
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.sock)
            if reset:
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
                except OSError:
                    pass
            self.sock.close()


class TlsTransport(Transport):
    """TLS over ``trio.SSLStream`` (never sends synchronously)."""

    direct = False

    def __init__(
        self, sock: socket.socket, stream: trio.SSLStream[trio.SocketStream], recv_bytes: int
    ) -> None:
        super().__init__(sock, recv_bytes)
        self.stream = stream

    async def receive_some(self) -> bytes | bytearray:
        return await self.stream.receive_some(self.recv_bytes)

    def try_send(self, data: bytearray) -> int:
        return 0

    async def send_all(self, data: bytes | bytearray) -> None:
        await self.stream.send_all(data)


def _detach(stream: trio.SocketStream) -> socket.socket:
    """The stdlib socket under a trio stream (trio's wrapper lets go of the descriptor)."""
    fd = stream.socket.detach()
    return socket.socket(fileno=fd)


async def _wrap(
    sock: socket.socket, tls: TlsConfig | None, server_side: bool, host: str, recv_bytes: int
) -> Transport:
    if tls is None:
        return Transport(sock, recv_bytes)
    base = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    if server_side:
        stream = trio.SSLStream(base, tls.server_context, server_side=True)
    else:
        name = tls.server_hostname or (host if tls.client_context.check_hostname else None)
        stream = trio.SSLStream(base, tls.client_context, server_hostname=name)
    transport = TlsTransport(sock, stream, recv_bytes)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        transport.close()
        raise tls_error(exc) from None
    except BaseException:
        transport.close()
        raise
    return transport


def tls_error(exc: BaseException) -> Exception:
    """A TLS failure as a typed error: certificate problems are AuthenticationFailed."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLError):
        return AuthenticationFailed(f"TLS: {cause.reason or cause}")
    return PeerUnavailable(f"TLS: {cause or exc}")


async def connect(host: str, port: int, tls: TlsConfig | None, recv_bytes: int) -> Transport:
    """Dial ``host:port`` (TCP_NODELAY is set by trio), then TLS if configured."""
    stream = await trio.open_tcp_stream(host, port)
    return await _wrap(_detach(stream), tls, False, host, recv_bytes)


async def accept(stream: trio.SocketStream, tls: TlsConfig | None, recv_bytes: int) -> Transport:
    """Take over an accepted connection, then TLS if configured."""
    return await _wrap(_detach(stream), tls, True, "", recv_bytes)


def parse_addr(addr: str | tuple[str, int]) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) or a (host, port) tuple -> (host, port)."""
    if isinstance(addr, tuple):
        return addr[0], int(addr[1])
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"peer address {addr!r} is not host:port")
    return host.strip("[]"), int(port)
