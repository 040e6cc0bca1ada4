"""The host API: NodeService over grpclib (asyncio side), run as a supervised child of the node.

Handlers run on the bridge's asyncio loop and cross into trio for everything that touches the
node (:class:`~spawnmesh.host.hosts.HostRegistry`). Every request passes the token check (when a
token is configured) and the message size bound before it is decoded; errors leave as gRPC
status codes by the one table of :mod:`spawnmesh.host.status`. ``Invoke`` and ``Connect``, the
per-invocation paths, decode and encode with Google protobuf (upb, :mod:`spawnmesh.pb`);
``Register`` and ``Spawn`` with the betterproto2 messages.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import grpclib.config
import grpclib.const
import grpclib.events
import grpclib.server
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from spawnmesh.config import HostConfig
from spawnmesh.errors import AuthenticationFailed, FrameTooLarge, SpawnmeshError
from spawnmesh.host.bridge import Bridge, open_bridge
from spawnmesh.host.callback import CallbackTransport
from spawnmesh.host.gen import spawn
from spawnmesh.host.hosts import HostRegistry, StreamSession
from spawnmesh.host.registration import RegistrationInvalid
from spawnmesh.host.status import RichStatusCodec, grpc_error
from spawnmesh.ops.tracing import TRACE_KEYS
from spawnmesh.pb.gen.spawn.actors import protocol_pb2 as proto
from spawnmesh.pb.gen.spawnmesh.v1 import host_pb2

if TYPE_CHECKING:
    from spawnmesh.actors.runtime import Runtime

log = logging.getLogger("spawnmesh.host")

SERVICE = "/spawnmesh.v1.NodeService/"


class _Bounded:
    """Wraps grpclib's protocol stream: a message longer than ``limit`` is refused with
    RESOURCE_EXHAUSTED from its 5-byte prefix, before its body is read."""

    def __init__(self, inner: Any, limit: int) -> None:
        self._inner = inner
        self._limit = limit

    async def recv_data(self, size: int) -> bytes:
        if size > self._limit:
            err = FrameTooLarge(
                f"message of {size} bytes exceeds host.max_message_bytes ({self._limit})"
            )
            raise grpc_error(err)
        data: bytes = await self._inner.recv_data(size)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _bound(stream: grpclib.server.Stream[Any, Any], limit: int) -> None:
    if not isinstance(stream._stream, _Bounded):
        stream._stream = _Bounded(stream._stream, limit)  # type: ignore[assignment]


def _frame(msg: host_pb2.NodeMessage) -> bytes:
    """One gRPC length-prefixed message (uncompressed)."""
    body = msg.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def _peer(stream: grpclib.server.Stream[Any, Any]) -> str:
    addr = stream.peer.addr()
    return f"{addr[0]}:{addr[1]}" if addr else "?"


class NodeService:
    """grpclib handlers of ``spawnmesh.v1.NodeService`` (run on the asyncio loop)."""

    def __init__(
        self, bridge: Bridge, hosts: HostRegistry, config: HostConfig, default_timeout_ms: int
    ) -> None:
        self.bridge = bridge
        self.hosts = hosts
        self.config = config
        self.default_timeout_ms = default_timeout_ms

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        unary = grpclib.const.Cardinality.UNARY_UNARY
        return {
            SERVICE + "Register": grpclib.const.Handler(
                self._register, unary, spawn.RegistrationRequest, spawn.RegistrationResponse
            ),
            SERVICE + "Spawn": grpclib.const.Handler(
                self._spawn, unary, spawn.SpawnRequest, spawn.SpawnResponse
            ),
            SERVICE + "Invoke": grpclib.const.Handler(
                self._invoke, unary, proto.InvocationRequest, proto.InvocationResponse
            ),
            SERVICE + "Connect": grpclib.const.Handler(
                self._connect,
                grpclib.const.Cardinality.STREAM_STREAM,
                host_pb2.HostMessage,
                host_pb2.NodeMessage,
            ),
        }

    async def _recv(self, stream: grpclib.server.Stream[Any, Any]) -> Any:
        _bound(stream, self.config.max_message_bytes)
        msg = await stream.recv_message()
        if msg is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "no request message")
        return msg

    async def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run ``fn`` in trio; spawnmesh errors become gRPC status codes."""
        try:
            return await self.bridge.to_trio(fn, *args)
        except RegistrationInvalid as exc:
            raise grpc_error(exc, exc.violations) from None
        except SpawnmeshError as exc:
            raise grpc_error(exc) from None

    async def _register(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        req = await self._recv(stream)
        await stream.send_message(await self._call(self.hosts.register, req, None))

    async def _spawn(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        req = await self._recv(stream)
        await stream.send_message(await self._call(self.hosts.spawn, req))

    async def _invoke(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        req = await self._recv(stream)
        for key in TRACE_KEYS:  # a traced caller's W3C context continues in the invocation
            value = stream.metadata.get(key) if stream.metadata else None
            if isinstance(value, str) and key not in req.metadata:
                req.metadata[key] = value
        if stream.deadline is not None:  # the caller's deadline, else the node's default
            timeout_ms = max(1, int(stream.deadline.time_remaining() * 1000))
        else:
            timeout_ms = self.default_timeout_ms
        await stream.send_message(await self._call(self.hosts.invoke, req, timeout_ms))

    async def _connect(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        first = await self._recv(stream)
        if first.WhichOneof("kind") != "register":
            raise GRPCError(
                Status.INVALID_ARGUMENT, "the first message of Connect must be a registration"
            )
        request = spawn.RegistrationRequest.parse(first.register.SerializeToString())
        queue: asyncio.Queue[host_pb2.NodeMessage] = asyncio.Queue()
        session = StreamSession(self.bridge, queue.put_nowait, _peer(stream))
        attached = False
        try:
            response = await self._call(self.hosts.register, request, session)
            attached = True
            registered = host_pb2.NodeMessage()
            registered.registered.ParseFromString(bytes(response))
            await stream.send_message(registered)
            writer = asyncio.ensure_future(self._write(stream, queue))
            try:
                await self._read(stream, session)
            finally:
                writer.cancel()
        except StreamTerminatedError:
            pass  # the host went away; detached below
        finally:
            if attached:
                self.bridge.trio_soon(self.hosts.detach, session)

    async def _read(self, stream: grpclib.server.Stream[Any, Any], session: StreamSession) -> None:
        deliver = session.deliver
        while True:
            msg = await stream.recv_message()
            if msg is None:
                return
            kind = msg.WhichOneof("kind")
            if kind == "result":
                self.bridge.trio_soon(deliver, msg.result)
            elif kind == "register":
                raise GRPCError(
                    Status.FAILED_PRECONDITION,
                    "this stream is registered; open a new one to re-register",
                )

    @staticmethod
    async def _write(
        stream: grpclib.server.Stream[Any, Any], queue: asyncio.Queue[host_pb2.NodeMessage]
    ) -> None:
        """Send what is queued; messages queued together leave in one DATA frame (one
        syscall instead of one per turn when many turns are in flight)."""
        while True:
            msg = await queue.get()
            if queue.empty():
                await stream.send_message(msg)
                continue
            batch = [msg]
            while not queue.empty() and len(batch) < 256:
                batch.append(queue.get_nowait())
            await stream._stream.send_data(b"".join(map(_frame, batch)))


def _auth_listener(
    token: str,
) -> Callable[[grpclib.events.RecvRequest], Coroutine[Any, Any, None]]:
    want = f"Bearer {token}".encode()

    async def check(event: grpclib.events.RecvRequest) -> None:
        got = event.metadata.get("authorization", "")
        got_b = got.encode() if isinstance(got, str) else bytes(got)
        if not hmac.compare_digest(got_b, want):
            err = AuthenticationFailed("missing or wrong token (authorization: Bearer <token>)")
            raise grpc_error(err)

    return check


def server_ssl(config: HostConfig) -> ssl.SSLContext | None:
    """The TLS context of the host API (mutual when a client CA is configured), or None."""
    if not config.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(config.tls_cert_file, config.tls_key_file or None)
    if config.tls_client_ca_file:
        ctx.load_verify_locations(config.tls_client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    return ctx


class HostApi:
    """The host API service of one node: a bridge, a grpclib server, the host registry.

    ``serve`` is a supervisor child; the registry outlives restarts of the server (a restarted
    server loses its streams: hosts reconnect and register again)."""

    def __init__(
        self,
        runtime: Runtime,
        config: HostConfig,
        default_timeout_ms: int,
        on_registered: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.default_timeout_ms = default_timeout_ms
        self.port = 0
        self.hosts = HostRegistry(runtime, transport=config.transport, on_registered=on_registered)
        self.bridge: Bridge | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Run the server until cancelled; ``started`` once it listens (``self.port``)."""
        async with open_bridge(self.config.bridge) as bridge:
            self.bridge = bridge
            self.hosts.callback_factory = lambda addr: CallbackTransport(bridge, addr, self.config)
            service = NodeService(bridge, self.hosts, self.config, self.default_timeout_ms)
            server = await bridge.to_aio(self._start, service)
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self.hosts.close()
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await bridge.to_aio(self._stop, server)
                self.bridge = None

    async def _start(self, service: NodeService) -> grpclib.server.Server:
        server = grpclib.server.Server(
            [service], status_details_codec=RichStatusCodec(), config=_http2_config(self.config)
        )
        if self.config.token:
            grpclib.events.listen(
                server, grpclib.events.RecvRequest, _auth_listener(self.config.token)
            )
        await server.start(self.config.host, self.config.port, ssl=server_ssl(self.config))
        sockets = getattr(server._server, "sockets", None) or ()
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        log.info(
            "host API listening on %s:%d (%s bridge%s)",
            self.config.host,
            self.port,
            self.config.bridge,
            ", TLS" if self.config.tls_cert_file else "",
        )
        return server

    @staticmethod
    async def _stop(server: grpclib.server.Server) -> None:
        server.close()
        await server.wait_closed()


def _http2_config(config: HostConfig) -> grpclib.config.Configuration:
    """grpclib's connection settings: keepalive pings on connections with open streams (a
    host's Connect session), as often as ``keepalive_ms`` however long the stream is idle;
    a connection whose ping is not answered within ``keepalive_timeout_ms`` is closed."""
    if not config.keepalive_ms:
        return grpclib.config.Configuration()
    every_s = config.keepalive_ms / 1000
    return grpclib.config.Configuration(
        _keepalive_time=every_s,
        _keepalive_timeout=config.keepalive_timeout_ms / 1000,
        _keepalive_permit_without_calls=False,  # a connection without a stream holds nothing
        _http2_max_pings_without_data=0,  # an idle host's stream is pinged for as long as it lasts
        _http2_min_sent_ping_interval_without_data=every_s,
    )
