"""The host-served transport: the node calls the host's ``HostService.HandleTurn`` per turn.

For hosts that prefer serving gRPC to holding a stream open (registration names their
``host_address``). The call's deadline is the turn's; a trio caller that is cancelled cancels
the call (grpclib resets the HTTP/2 stream, the host sees a cancelled RPC).
"""

from __future__ import annotations

from typing import Any

import grpclib.client
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from spawnmesh.config import HostConfig
from spawnmesh.errors import ActorFailed, HostUnavailable, InvocationTimeout, SpawnmeshError
from spawnmesh.host.bridge import Bridge
from spawnmesh.host.gen.google import rpc
from spawnmesh.host.status import DOMAIN, RichStatusCodec, error_from_status
from spawnmesh.ops.tracing import TRACE_KEYS
from spawnmesh.pb.gen.spawn.actors import protocol_pb2 as proto

HANDLE_TURN = "/spawnmesh.v1.HostService/HandleTurn"


class CallbackTransport:
    """Turns of one system sent to its host's HostService at ``address`` ("host:port")."""

    def __init__(self, bridge: Bridge, address: str, config: HostConfig) -> None:
        self._bridge = bridge
        self.address = address
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"host_address {address!r} is not host:port")
        self._host, self._port = host.strip("[]"), int(port)
        self._metadata = {"authorization": f"Bearer {config.token}"} if config.token else None
        self._channel: grpclib.client.Channel | None = None
        self._load = 0
        self._closed = False

    def load(self) -> int:
        return self._load

    async def call(
        self, inv: proto.ActorInvocation, timeout_ms: int
    ) -> proto.ActorInvocationResponse:
        if self._closed:
            raise HostUnavailable(f"the host at {self.address} was replaced or removed")
        self._load += 1
        try:
            resp: proto.ActorInvocationResponse = await self._bridge.to_aio(
                self._handle_turn, inv, timeout_ms
            )
            return resp
        finally:
            self._load -= 1

    async def _handle_turn(
        self, inv: proto.ActorInvocation, timeout_ms: int
    ) -> proto.ActorInvocationResponse:
        """On the asyncio loop: one HandleTurn call, errors mapped to spawnmesh errors."""
        if self._channel is None:
            self._channel = grpclib.client.Channel(
                self._host, self._port, status_details_codec=RichStatusCodec()
            )
        metadata = self._metadata
        ctx = inv.current_context
        if "traceparent" in ctx.metadata:  # tracing on: W3C context in gRPC metadata
            metadata = {
                **(metadata or {}),
                **{k: ctx.metadata[k] for k in TRACE_KEYS if k in ctx.metadata},
            }
        method: grpclib.client.UnaryUnaryMethod[
            proto.ActorInvocation, proto.ActorInvocationResponse
        ] = grpclib.client.UnaryUnaryMethod(
            self._channel, HANDLE_TURN, proto.ActorInvocation, proto.ActorInvocationResponse
        )
        try:
            return await method(
                inv, timeout=timeout_ms / 1000 if timeout_ms else None, metadata=metadata
            )
        except GRPCError as exc:
            raise _turn_error(inv, exc) from None
        except (OSError, StreamTerminatedError) as exc:
            raise HostUnavailable(f"the host at {self.address} cannot be reached: {exc}") from None
        except TimeoutError:
            raise InvocationTimeout(
                f"the host at {self.address} did not answer in {timeout_ms} ms"
            ) from None

    def close(self) -> None:
        self._closed = True
        channel, self._channel = self._channel, None
        if channel is not None:
            self._bridge.aio_soon(channel.close)


def _turn_error(inv: proto.ActorInvocation, exc: GRPCError) -> SpawnmeshError:
    msg = exc.message or exc.status.name
    details: Any = exc.details or ()
    aid = inv.actor
    who = f"{aid.system}/{aid.name}"
    if any(isinstance(d, rpc.ErrorInfo) and d.domain == DOMAIN for d in details):
        err = error_from_status(exc.status, msg, details)
        if isinstance(err, ActorFailed) and not err.actor:
            err = ActorFailed(
                who, err.error_type or "HostError", err.error_message or msg, err.traceback_text
            )
        return err
    if exc.status is Status.UNKNOWN:
        return ActorFailed(who, "HostError", msg)
    if exc.status is Status.UNAVAILABLE:
        return HostUnavailable(msg)
    if exc.status is Status.DEADLINE_EXCEEDED:
        return InvocationTimeout(msg)
    return error_from_status(exc.status, msg, details)
