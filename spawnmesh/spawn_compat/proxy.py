"""The proxy side of Spawn's HTTP protocol, served by a node (a supervised child, ``spawn-proxy``).

Routes, as Spawn's proxy serves them (eigr/spawn ``spawn_proxy/proxy/lib/proxy/router/router.ex``,
``routes/api.ex``, ``routes/health.ex``); bodies are protobuf (``application/octet-stream``)::

    POST /api/v1/system                                 RegistrationRequest -> RegistrationResponse
    POST /api/v1/system/{system}/actors/spawn[?revision=N]    SpawnRequest -> SpawnResponse
    POST /api/v1/system/{system}/actors/{actor}/invoke  InvocationRequest -> InvocationResponse
    GET  /health, /health/liveness, /health/readiness   {"status": "up" | "down"} (JSON)

A failure is answered as Spawn does: HTTP 500 with the route's response message whose
``RequestStatus`` is ``ERROR`` and says why (the spawnmesh error code leads the message and is
also in the ``spawnmesh-error-code`` header). An invocation runs like any other: on this node or
on the actor's owner in the cluster, SDK and gRPC-hosted actors included.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from google.protobuf.message import DecodeError

from spawnmesh.actors.runtime import _CURRENT
from spawnmesh.config import SpawnConfig
from spawnmesh.errors import (
    InvalidArgument,
    InvocationTimeout,
    NodeShuttingDown,
    SpawnmeshError,
)
from spawnmesh.host.gen import spawn
from spawnmesh.host.registration import RegistrationInvalid
from spawnmesh.ids import ActorId
from spawnmesh.ops.metrics import GaugeSample
from spawnmesh.pb.gen.spawn.actors import protocol_pb2 as pb
from spawnmesh.spawn_compat.busypoll import BusyPoll
from spawnmesh.spawn_compat.http_server import Limit, Request, Response, serve_http
from spawnmesh.spawn_compat.registry import REGISTERED_MESSAGE, SpawnRegistry
from spawnmesh.spawn_compat.values import RawAny, any_parts

if TYPE_CHECKING:
    from spawnmesh.actors.runtime import Runtime

log = logging.getLogger("spawnmesh.spawn")

OCTET = "application/octet-stream"
TIMEOUT_KEY = "request-timeout"
"""Invocation metadata Spawn's proxy reads as the call's timeout in milliseconds."""


def _json(status: int, value: object) -> Response:
    return Response(status, json.dumps(value).encode(), "application/json")


def _failed(
    message: pb.InvocationResponse | pb.SpawnResponse | pb.RegistrationResponse, exc: Exception
) -> Response:
    code = exc.code if isinstance(exc, SpawnmeshError) else "invalid_argument"
    message.status.status = pb.ERROR
    message.status.message = f"{code}: {exc}"
    return Response(500, message.SerializeToString(), OCTET, (("spawnmesh-error-code", code),))


def _timeout_ms(metadata: Mapping[str, str], default_ms: int) -> int:
    raw = metadata.get(TIMEOUT_KEY)
    if raw is None:
        return default_ms
    try:
        value = int(raw)
    except ValueError:
        raise InvalidArgument(f"metadata {TIMEOUT_KEY}={raw!r} is not milliseconds") from None
    if value <= 0:
        raise InvalidArgument(f"metadata {TIMEOUT_KEY} must be > 0 ms")
    return value


class SpawnProxy:
    """Spawn's HTTP API on one node, with the registry of Spawn systems (which outlives
    restarts of the server: hosts keep their registrations)."""

    def __init__(
        self,
        runtime: Runtime,
        config: SpawnConfig,
        *,
        default_timeout_ms: int,
        readiness: Callable[[], tuple[bool, list[str]]] = lambda: (True, []),
        on_registered: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.default_timeout_ms = default_timeout_ms
        self.readiness = readiness
        self.busy_poll = BusyPoll(config.busy_poll_us)
        """The port's busy-polling (its counts are metrics)."""
        runtime.metrics.add_counter_source(self._busy_poll_counters)
        self.registry = SpawnRegistry(
            runtime,
            self._callback_address,
            default_timeout_ms=default_timeout_ms,
            max_connections=config.max_host_connections,
            max_response_bytes=config.max_body_bytes,
            on_registered=on_registered,
            busy_poll=self.busy_poll,
        )
        self.port = 0
        """The bound port, once serving."""

    def _busy_poll_counters(self) -> Iterator[GaugeSample]:
        bp = self.busy_poll
        doc = "Waits on the Spawn port that polled their socket before sleeping, by outcome."
        yield ("spawnmesh_spawn_busy_polls_total", doc, {"outcome": "hit"}, bp.hits)
        yield ("spawnmesh_spawn_busy_polls_total", doc, {"outcome": "miss"}, bp.misses)
        yield (
            "spawnmesh_spawn_busy_poll_seconds_total",
            "CPU seconds the Spawn port spent polling sockets before sleeping.",
            {},
            bp.spun_s,
        )

    def _callback_address(self, req: spawn.RegistrationRequest, peer: str) -> tuple[str, int]:
        c = self.config
        if req.host_address:
            host, sep, port = req.host_address.rpartition(":")
            if not sep or not port.isdigit() or not host:
                raise RegistrationInvalid([("host_address", "must be host:port")])
            return host.strip("[]"), int(port)
        if c.deployment_mode == "daemon" and peer:
            return peer, c.user_function_port
        return c.user_function_host, c.user_function_port

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (a supervisor child); ``started`` once listening."""
        c = self.config
        try:
            async with trio.open_nursery() as nursery:
                self.registry.nursery = nursery
                self.port = await nursery.start(
                    partial(
                        serve_http,
                        self.handle,
                        c.host,
                        c.port,
                        max_body_bytes=c.max_body_bytes,
                        busy_poll=self.busy_poll,
                        on_cut=_cut,
                    )
                )
                log.info("Spawn HTTP API listening on %s:%d", c.host, self.port)
                task_status.started()
        finally:
            self.registry.nursery = None
            self.registry.close_idle()

    # ------------------------------------------------------------------ routes

    async def handle(self, req: Request) -> Response:
        """Route one HTTP request."""
        path = req.path
        if path[:2] == ["api", "v1"] and len(path) >= 3 and path[2] == "system":
            if req.method != "POST":
                return Response(405, b"use POST", "text/plain", (("allow", "POST"),))
            rest = path[3:]
            if not rest or rest == [""]:
                return await self._register(req)
            if len(rest) == 3 and rest[1:] == ["actors", "spawn"]:
                return await self._spawn(rest[0], req)
            if len(rest) == 4 and rest[1] == "actors" and rest[3] == "invoke":
                return await self._invoke(rest[0], rest[2], req.body, req.limit)
        elif path[0] == "health" and len(path) <= 2:
            what = path[1] if len(path) == 2 else ""
            if what in ("", "liveness"):
                return _json(200, {"status": "up"})
            if what == "readiness":
                ok, reasons = self.readiness()
                if ok:
                    return _json(200, {"status": "up"})
                return _json(503, {"status": "down", "reasons": reasons})
        return Response(404, b"Not found!", "text/plain")

    async def _register(self, req: Request) -> Response:
        out = pb.RegistrationResponse()
        try:
            try:
                msg = spawn.RegistrationRequest.parse(req.body)
            except Exception as exc:  # betterproto2 raises various types on garbage
                raise InvalidArgument(f"body is not a RegistrationRequest: {exc}") from None
            resp = await self.registry.register(msg, req.peer)
        except SpawnmeshError as exc:
            log.warning("Spawn registration from %s refused: %s", req.peer, exc)
            return _failed(out, exc)
        return Response(200, bytes(resp), OCTET)

    async def _spawn(self, system: str, req: Request) -> Response:
        out = pb.SpawnResponse()
        try:
            try:
                msg = pb.SpawnRequest.FromString(req.body)
            except DecodeError as exc:
                raise InvalidArgument(f"body is not a SpawnRequest: {exc}") from None
            revision = _revision(req.query)
            for pid in msg.actors:
                await self.spawn_actor(
                    ActorId(pid.system or system, pid.name, pid.parent or None), revision
                )
        except SpawnmeshError as exc:
            return _failed(out, exc)
        out.status.status = pb.OK
        out.status.message = REGISTERED_MESSAGE
        return Response(200, out.SerializeToString(), OCTET)

    async def spawn_actor(self, aid: ActorId, revision: int = 0) -> None:
        """Spawn an instance of an UNNAMED template; with ``revision``, its state becomes
        that revision from the statestore's history (Spawn's ``?revision=``)."""
        if not aid.name or not aid.system or not aid.parent:
            raise InvalidArgument(f"spawning {aid} needs a name, a system and a parent")
        await self.runtime.spawn(aid.system, aid.name, aid.parent)
        if revision <= 0:
            return
        restore = getattr(self.runtime.store, "restore", None)
        if restore is None:
            raise InvalidArgument("this statestore keeps no history: no revision to restore")
        await self.runtime.release(aid.key)  # a local activation flushes and is forgotten
        await restore(aid.key, revision)

    async def _invoke(self, system: str, actor: str, body: bytes, limit: Limit) -> Response:
        out = pb.InvocationResponse()
        try:
            try:
                req = pb.InvocationRequest.FromString(body)
            except DecodeError as exc:
                raise InvalidArgument(f"body is not an InvocationRequest: {exc}") from None
            value, is_async = await self.invoke(req, limit, system, actor)
        except SpawnmeshError as exc:
            return _failed(out, exc)
        out.status.status = pb.OK
        if req.HasField("system"):
            out.system.CopyFrom(req.system)
        if req.HasField("actor"):
            out.actor.CopyFrom(req.actor)
        if not is_async:
            parts = any_parts(value)
            if parts is None:
                out.noop.SetInParent()
            else:
                out.value.type_url = parts[0]
                out.value.value = parts[1]
        return Response(200, out.SerializeToString(), OCTET)

    async def invoke(
        self, req: pb.InvocationRequest, limit: Limit, system: str = "", actor: str = ""
    ) -> tuple[Any, bool]:
        """Run an InvocationRequest: (reply value, whether it was fire-and-forget). A call
        waits at most its ``request-timeout`` (or the default), bounded by ``limit``: the
        server cuts it then and answers the timeout error."""
        pid = req.actor.id
        system = req.system.name or pid.system or system
        name = pid.name or actor
        if not system or not name:
            raise InvalidArgument("the invocation names no actor system or no actor")
        if not req.action_name:
            raise InvalidArgument("the invocation names no action")
        ref = req.register_ref
        target = ActorId(system, name, pid.parent or ref or None)
        runtime = self.runtime
        if ref and runtime.definition_for(ActorId(system, name)) is None:
            await runtime.spawn(system, name, ref)  # Spawn spawns it first
        action = req.action_name
        value = None
        if req.HasField("value"):
            v = req.value
            value = RawAny(type_url=v.type_url, value=v.value)
        payload = self.registry.value_for(target, action, value)
        metadata = dict(req.metadata) if req.metadata else {}
        caller = None
        if req.HasField("caller") and req.caller.name:
            c = req.caller
            caller = ActorId(c.system or system, c.name, c.parent or None)
        if getattr(req, "async") or req.scheduled_to:
            await runtime.check_target(target)  # as Spawn's proxy looks the actor up first
            runtime.cast_nowait(
                target,
                action,
                payload,
                metadata=metadata,
                at_epoch_ms=req.scheduled_to or None,
                caller=caller,
            )
            await trio.lowlevel.checkpoint()
            return None, True
        timeout_ms = (
            _timeout_ms(metadata, self.default_timeout_ms) if metadata else self.default_timeout_ms
        )

        def timed_out() -> Response:
            exc = InvocationTimeout(f"{target}.{action}: no reply within {timeout_ms} ms")
            return _failed(pb.InvocationResponse(), exc)

        limit(timeout_ms / 1000, timed_out)
        if caller is not None:
            turn = self.registry.inflight_turn(caller)
            if turn is not None:  # a host calling from inside an action: join its chain
                token = _CURRENT.set(turn)
                try:
                    return await runtime.invoke(target, action, payload, metadata=metadata), False
                finally:
                    _CURRENT.reset(token)
            return await runtime.invoke_as(target, action, payload, metadata, caller, ()), False
        return await runtime.invoke(target, action, payload, metadata=metadata), False


def _cut(req: Request) -> Response:
    """The answer to a call still running when the node stops (its drain's grace is over):
    503 with the route's message, status ERROR (``shutting_down``), so the caller learns the
    call was cut (its turn may have run) instead of seeing the connection close."""
    route = req.path[-1] if req.path else ""
    message: pb.InvocationResponse | pb.SpawnResponse | pb.RegistrationResponse
    if route == "invoke":
        message = pb.InvocationResponse()
    elif route == "spawn":
        message = pb.SpawnResponse()
    else:
        message = pb.RegistrationResponse()
    exc = NodeShuttingDown("the node stopped before the call finished; it may have run")
    return _failed(message, exc)._replace(status=503)


def _revision(query: str) -> int:
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == "revision":
            if not value.isdigit():
                raise InvalidArgument(f"revision={value!r} is not a revision number")
            return int(value)
    return 0
