"""The node's ops HTTP server: health, readiness, metrics, node info and an admin invoke route.

A small HTTP/1.1 server on trio and h11 (much cheaper than a full ASGI stack for tiny requests).
It is built so that no client can take the node down: request heads are bounded by h11, bodies by
``max_body_bytes`` (rejected with 413 from the ``Content-Length`` alone), every read and write by
``idle_timeout_s``, concurrent connections by ``max_connections``; malformed HTTP gets a 400 and
the connection is closed; an exception in a handler becomes a logged 500 and the server goes on.

Routes::

    GET  /healthz                                          liveness   (200 / 503)
    GET  /readyz                                           readiness  (200 / 503)
    GET  /metrics                                          Prometheus text format 0.0.4
    GET  /v1/node                                          node info (JSON)
    GET  /v1/members                                       cluster members and gossip counters
    GET  /v1/actors?limit=N                                actors active on this node
    GET  /v1/placement/{system}/{actor}?parent=T           the owner of an actor in this view
    GET  /v1/status?actors=N&q=S                           this node in one document
    GET  /v1/cluster/status?actors=N&q=S                   every member's status, ring balance
    GET  /dashboard                                        the live cluster dashboard (HTML)
    POST /v1/cluster/join      {"addrs": ["host:port"]}    join through these members
    POST /v1/cluster/leave                                 leave the cluster, then exit
    POST /v1/systems/{system}/actors/{actor}/actions/{action}   invoke an actor (JSON)
"""

from __future__ import annotations

import errno
import json
import logging
import math
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, Protocol
from urllib.parse import parse_qs, unquote_to_bytes

import h11
import trio

from spawnmesh.errors import ConfigError, SpawnmeshError
from spawnmesh.ops.dashboard import DASHBOARD_CSP, dashboard_html

__all__ = [
    "GRPC_TO_HTTP",
    "METRICS_CONTENT_TYPE",
    "OpsBackend",
    "http_status_for",
    "serve_ops",
]

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
"""Content type of ``GET /metrics``."""

JSON_CONTENT_TYPE: Final = "application/json"

GRPC_TO_HTTP: Final[dict[str, int]] = {
    "NOT_FOUND": 404,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "INVALID_ARGUMENT": 400,
    "UNIMPLEMENTED": 404,
    "DEADLINE_EXCEEDED": 504,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "FAILED_PRECONDITION": 409,
    "ABORTED": 409,
    "UNKNOWN": 500,
    "DATA_LOSS": 500,
    "INTERNAL": 500,
}
"""The one table mapping an error's ``grpc_status`` to an HTTP status (anything else: 500)."""

_RECEIVE_SIZE: Final = 64 * 1024
# After an error response on a connection we are about to close, read (and drop) at most this
# much for at most this long, so the client sees the response instead of a TCP reset.
_LINGER_BYTES: Final = 256 * 1024
_LINGER_SECONDS: Final = 1.0
# Accept errors that mean "out of resources right now": back off instead of dying.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
_ACCEPT_BACKOFF_SECONDS: Final = 0.1

ACTORS_LIMIT_DEFAULT: Final = 1000
"""Rows ``GET /v1/actors`` returns unless ``?limit=`` says otherwise."""
ACTORS_LIMIT_MAX: Final = 100_000
"""The largest ``?limit=`` accepted (the reply stays a few MB at most)."""

_INVOKE_FIELDS: Final = frozenset(
    {"payload", "metadata", "timeout_ms", "async", "delay_ms", "parent"}
)


def http_status_for(err: SpawnmeshError) -> int:
    """HTTP status for ``err``, from its ``grpc_status`` through :data:`GRPC_TO_HTTP`."""
    return GRPC_TO_HTTP.get(err.grpc_status, 500)


class OpsBackend(Protocol):
    """What the ops server needs from the node (the node implements it; tests fake it)."""

    node_name: str

    def readiness(self) -> tuple[bool, list[str]]:
        """``(ready, reasons it is not)``: may this node take traffic?"""
        ...

    def liveness(self) -> tuple[bool, list[str]]:
        """``(alive, reasons it is not)``: should this process be restarted?"""
        ...

    def metrics_text(self) -> bytes:
        """The node's metrics in the Prometheus text format 0.0.4."""
        ...

    def node_info(self) -> dict[str, object]:
        """A JSON-able description of the node, served by ``GET /v1/node``."""
        ...

    async def admin_invoke(
        self,
        system: str,
        actor: str,
        action: str,
        payload: object,
        *,
        metadata: dict[str, str],
        timeout_ms: int | None,
        is_async: bool,
        delay_ms: int | None,
        parent: str | None,
    ) -> object:
        """Invoke ``action`` on ``actor``; returns a JSON-able value or raises SpawnmeshError."""
        ...

    def cluster_members(self) -> dict[str, object]:
        """A JSON-able member list and gossip counters, served by ``GET /v1/members``."""
        ...

    async def cluster_join(self, addrs: list[str]) -> dict[str, object]:
        """Join the cluster through ``host:port`` addresses; JSON-able outcome."""
        ...

    async def cluster_leave(self) -> dict[str, object]:
        """Leave the cluster gracefully, then stop the node; JSON-able outcome."""
        ...

    def actors_list(self, limit: int) -> dict[str, object]:
        """Up to ``limit`` actors active on this node and hand-offs in progress (JSON-able)."""
        ...

    async def placement_of(
        self, system: str, actor: str, parent: str | None
    ) -> dict[str, object]:
        """Who owns ``actor`` in this node's view, the placement version and the members
        hosting its type (JSON-able)."""
        ...

    def status(self, actors: int, query: str) -> dict[str, object]:
        """This node in one JSON-able document (up to ``actors`` actors matching ``query``)."""
        ...

    async def cluster_status(self, actors: int, query: str) -> dict[str, object]:
        """Every member with its status document and the ring balance (JSON-able)."""
        ...


@dataclass(slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = JSON_CONTENT_TYPE
    extra_headers: tuple[tuple[str, str], ...] = ()


class _BadRequest(Exception):
    """The request body or path cannot be understood (answered with 400 invalid_argument)."""


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def _error(status: int, code: str, message: str, **extra: object) -> _Response:
    return _Response(status, _json_bytes({"error": {"code": code, "message": message, **extra}}))


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _optional_int(body: dict[str, Any], field: str, minimum: int) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadRequest(f"{field} must be an integer or null")
    if value < minimum:
        raise _BadRequest(f"{field} must be >= {minimum}")
    return value


@dataclass(slots=True)
class _InvokeRequest:
    payload: object
    metadata: dict[str, str]
    timeout_ms: int | None
    is_async: bool
    delay_ms: int | None
    parent: str | None


def _parse_invoke_body(raw: bytes) -> _InvokeRequest:
    """Decode and type-check the invoke body; every field is optional, an empty body is ``{}``."""
    if raw.strip():
        try:
            body = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise _BadRequest(f"body is not valid JSON: {e}") from None
    else:
        body = {}
    if not isinstance(body, dict):
        raise _BadRequest("body must be a JSON object")
    unknown = sorted(set(body) - _INVOKE_FIELDS)
    if unknown:
        raise _BadRequest(f"unknown fields: {', '.join(unknown)}")
    metadata = body.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _BadRequest("metadata must be an object of string values")
    is_async = body.get("async", False)
    if is_async is None:
        is_async = False
    if not isinstance(is_async, bool):
        raise _BadRequest("async must be a boolean")
    parent = body.get("parent")
    if parent is not None and not isinstance(parent, str):
        raise _BadRequest("parent must be a string or null")
    return _InvokeRequest(
        payload=body.get("payload"),
        metadata=metadata,
        timeout_ms=_optional_int(body, "timeout_ms", 1),
        is_async=is_async,
        delay_ms=_optional_int(body, "delay_ms", 0),
        parent=parent,
    )


def _parse_join_body(raw: bytes) -> list[str]:
    """``{"addrs": ["host:port", ...]}`` (at least one, at most 256)."""
    try:
        body = json.loads(raw or b"{}", parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise _BadRequest(f"body is not valid JSON: {e}") from None
    addrs = body.get("addrs") if isinstance(body, dict) else None
    if (
        not isinstance(addrs, list)
        or not 0 < len(addrs) <= 256
        or not all(isinstance(a, str) and a.strip() for a in addrs)
    ):
        raise _BadRequest('body must be {"addrs": ["host:port", ...]} (1 to 256 addresses)')
    return addrs


def _split_path(target: bytes) -> list[str]:
    """Split an origin-form target into URL-decoded path segments (the query is ignored)."""
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    if not path.startswith(b"/"):
        raise _BadRequest("request target must be an absolute path")
    try:
        return [unquote_to_bytes(seg).decode("utf-8") for seg in path[1:].split(b"/")]
    except UnicodeDecodeError:
        raise _BadRequest("path is not valid percent-encoded UTF-8") from None


def _query(target: bytes) -> dict[str, str]:
    """The query string of ``target`` as a dict (last value wins); 400 if it is not UTF-8."""
    _, sep, query = target.split(b"#", 1)[0].partition(b"?")
    if not sep:
        return {}
    try:
        parsed = parse_qs(query.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise _BadRequest("query string is not valid percent-encoded UTF-8") from None
    return {k: v[-1] for k, v in parsed.items()}


def _status_args(query: dict[str, str]) -> tuple[int, str]:
    """``?actors=N`` (0..ACTORS_LIMIT_MAX, default 0) and ``?q=`` (at most 200 characters)."""
    raw = query.get("actors", "0")
    if not (raw.isascii() and raw.isdigit()) or int(raw) > ACTORS_LIMIT_MAX:
        raise _BadRequest(f"actors must be an integer from 0 to {ACTORS_LIMIT_MAX}")
    q = query.get("q", "")
    if len(q) > 200:
        raise _BadRequest("q must be at most 200 characters")
    return int(raw), q


def _limit(query: dict[str, str]) -> int:
    raw = query.get("limit")
    if raw is None:
        return ACTORS_LIMIT_DEFAULT
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= ACTORS_LIMIT_MAX:
        raise _BadRequest(f"limit must be an integer from 1 to {ACTORS_LIMIT_MAX}")
    return int(raw)


class _Router:
    """Maps a request to the backend; knows nothing about sockets or HTTP framing."""

    def __init__(self, backend: OpsBackend) -> None:
        self._backend = backend

    async def handle(self, method: str, target: bytes, body: bytes) -> _Response:
        try:
            return await self._route(method, target, body)
        except _BadRequest as e:
            return _error(400, "invalid_argument", str(e))
        except SpawnmeshError as e:
            try:
                return _Response(http_status_for(e), _json_bytes({"error": e.to_wire()}))
            except Exception:
                log.exception("ops: cannot encode %s", type(e).__name__)
                return _error(500, "internal", "internal error")
        except Exception:
            log.exception("ops: handler for %s %r failed", method, target[:200])
            return _error(500, "internal", "internal error")

    async def _route(self, method: str, target: bytes, body: bytes) -> _Response:
        parts = _split_path(target)
        read = ("GET", "HEAD")
        match parts:
            case ["healthz"]:
                return _allow(method, read) or self._probe(self._backend.liveness, "liveness")
            case ["readyz"]:
                return _allow(method, read) or self._probe(self._backend.readiness, "readiness")
            case ["metrics"]:
                return _allow(method, read) or _Response(
                    200, bytes(self._backend.metrics_text()), METRICS_CONTENT_TYPE
                )
            case ["v1", "node"]:
                return _allow(method, read) or _Response(
                    200, _json_bytes(self._backend.node_info())
                )
            case ["v1", "members"]:
                return _allow(method, read) or _Response(
                    200, _json_bytes(self._backend.cluster_members())
                )
            case ["v1", "actors"]:
                return _allow(method, read) or _Response(
                    200, _json_bytes(self._backend.actors_list(_limit(_query(target))))
                )
            case ["v1", "placement", system, actor] if system and actor:
                if (denied := _allow(method, read)) is not None:
                    return denied
                parent = _query(target).get("parent") or None
                return _Response(
                    200, _json_bytes(await self._backend.placement_of(system, actor, parent))
                )
            case ["v1", "status"]:
                if (denied := _allow(method, read)) is not None:
                    return denied
                n, q = _status_args(_query(target))
                return _Response(200, _json_bytes(self._backend.status(n, q)))
            case ["v1", "cluster", "status"]:
                if (denied := _allow(method, read)) is not None:
                    return denied
                n, q = _status_args(_query(target))
                return _Response(200, _json_bytes(await self._backend.cluster_status(n, q)))
            case ["dashboard"] | ["dashboard", ""]:
                return _allow(method, read) or _Response(
                    200, dashboard_html(), "text/html; charset=utf-8",
                    (("content-security-policy", DASHBOARD_CSP),),
                )
            case ["v1", "cluster", "join"]:
                return _allow(method, ("POST",)) or _Response(
                    200, _json_bytes(await self._backend.cluster_join(_parse_join_body(body)))
                )
            case ["v1", "cluster", "leave"]:
                return _allow(method, ("POST",)) or _Response(
                    200, _json_bytes(await self._backend.cluster_leave())
                )
            case ["v1", "systems", system, "actors", actor, "actions", action] if (
                system and actor and action
            ):
                return _allow(method, ("POST",)) or await self._invoke(system, actor, action, body)
            case _:
                return _error(404, "not_found", "no such route")

    def _probe(self, check: Callable[[], tuple[bool, list[str]]], what: str) -> _Response:
        try:
            ok, reasons = check()
        except Exception as e:
            log.exception("ops: %s check raised", what)
            ok, reasons = False, [f"{what} check raised {type(e).__name__}"]
        if ok:
            return _Response(200, _json_bytes({"status": "ok"}))
        return _Response(503, _json_bytes({"status": "failing", "reasons": list(reasons)}))

    async def _invoke(self, system: str, actor: str, action: str, body: bytes) -> _Response:
        req = _parse_invoke_body(body)
        value = await self._backend.admin_invoke(
            system,
            actor,
            action,
            req.payload,
            metadata=req.metadata,
            timeout_ms=req.timeout_ms,
            is_async=req.is_async,
            delay_ms=req.delay_ms,
            parent=req.parent,
        )
        return _Response(200, _json_bytes({"value": value}))


def _reason(response: _Response) -> bytes:
    try:
        return HTTPStatus(response.status).phrase.encode("ascii")
    except ValueError:
        return b""


def _allow(method: str, allowed: tuple[str, ...]) -> _Response | None:
    """``None`` if ``method`` is allowed, else the 405 response (with ``Allow``)."""
    if method in allowed:
        return None
    resp = _error(405, "method_not_allowed", f"method {method} not allowed")
    resp.extra_headers = (("allow", ", ".join(allowed)),)
    return resp


class _Connection:
    """One client connection: read a request, answer it, repeat while keep-alive holds."""

    def __init__(
        self,
        stream: trio.SocketStream,
        router: _Router,
        *,
        max_body_bytes: int,
        idle_timeout_s: float,
    ) -> None:
        self.stream = stream
        self.router = router
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.conn = h11.Connection(h11.SERVER)

    async def run(self) -> None:
        """Serve requests until the client closes, misbehaves or idles out; never raises."""
        linger = False
        try:
            while True:
                keep_alive, linger = await self._one_exchange()
                if not keep_alive:
                    break
                self.conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:
            log.exception("ops: connection handler failed")
        finally:
            await self._close(linger)

    async def _one_exchange(self) -> tuple[bool, bool]:
        """Handle one request. Returns ``(keep the connection, linger before closing)``."""
        conn = self.conn
        got: tuple[h11.Request, bytes] | _Response | None = None
        # The whole request (head and body, including idle keep-alive time before it) must
        # arrive within idle_timeout_s: a slow-loris client cannot hold a slot forever.
        with trio.move_on_after(self.idle_timeout_s) as read_scope:
            try:
                got = await self._read_request()
            except h11.RemoteProtocolError as e:
                await self._send_protocol_error(e)
                return False, True
        if read_scope.cancelled_caught:
            buffered, _closed = conn.trailing_data
            if buffered or conn.their_state is not h11.IDLE:
                await self._send_protocol_error(None)  # a request was under way: 408
                return False, True
            return False, False  # idle keep-alive connection: just close
        if got is None:
            return False, False  # the client closed
        if isinstance(got, _Response):  # 413/505: answer without reading the rest, then close
            with trio.move_on_after(self.idle_timeout_s):
                await self._send(got, close=True)
            return False, True

        request, body = got
        method = request.method.decode("ascii", "replace")  # methods are case-sensitive
        response = await self.router.handle(method, request.target, body)
        with trio.move_on_after(self.idle_timeout_s):
            await self._send(response, close=False, head=method == "HEAD")
            return conn.our_state is h11.DONE and conn.their_state is h11.DONE, False
        return False, False  # the client did not read the response in time

    async def _read_request(self) -> tuple[h11.Request, bytes] | _Response | None:
        """Read one request and its body; ``None`` if the client closed, or a 413/505 to send."""
        event = await self._next_event()
        if not isinstance(event, h11.Request):
            return None  # ConnectionClosed (or PAUSED, which cannot happen here)
        if event.http_version not in (b"1.0", b"1.1"):
            return _error(
                505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served"
            )
        too_big = self._content_length_too_big(event)
        if too_big is not None:
            return too_big
        body = await self._read_body()
        if body is None:
            return _error(413, "payload_too_large", f"body exceeds {self.max_body_bytes} bytes")
        return event, body

    async def _next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.conn.they_are_waiting_for_100_continue:
                await self._send_raw(
                    self.conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                )
            data = await self.stream.receive_some(_RECEIVE_SIZE)
            self.conn.receive_data(data)  # b"" tells h11 about EOF

    def _content_length_too_big(self, request: h11.Request) -> _Response | None:
        for name, value in request.headers:
            if name == b"content-length" and (len(value) > 18 or int(value) > self.max_body_bytes):
                return _error(
                    413,
                    "payload_too_large",
                    f"body of {value.decode('ascii', 'replace')} bytes exceeds "
                    f"{self.max_body_bytes}",
                )
        return None

    async def _read_body(self) -> bytes | None:
        """Read the request body; ``None`` if it grows past ``max_body_bytes``."""
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body_bytes:
                    return None
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:  # ConnectionClosed mid-body surfaces as RemoteProtocolError; be safe anyway
                raise h11.RemoteProtocolError("unexpected event in body", 400)

    async def _send_protocol_error(self, err: h11.RemoteProtocolError | None) -> None:
        """Answer a broken (400/431/...) or timed-out (408) request, if h11 still lets us."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        if err is None:
            response = _error(408, "request_timeout", "request not received in time")
        else:
            status = err.error_status_hint if 400 <= err.error_status_hint < 500 else 400
            response = _error(status, "bad_request", f"malformed HTTP request: {err}")
        with trio.move_on_after(self.idle_timeout_s):
            try:
                await self._send(response, close=True)
            except h11.LocalProtocolError:
                pass

    async def _send(self, response: _Response, *, close: bool, head: bool = False) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            ("cache-control", "no-store"),
            *response.extra_headers,
        ]
        if close:
            headers.append(("connection", "close"))
        conn = self.conn
        data = conn.send(
            h11.Response(status_code=response.status, headers=headers, reason=_reason(response))
        )
        if not head and response.body:
            data += conn.send(h11.Data(data=response.body))
        data += conn.send(h11.EndOfMessage())
        await self._send_raw(data)

    async def _send_raw(self, data: bytes | None) -> None:
        if data:
            await self.stream.send_all(data)

    async def _close(self, linger: bool) -> None:
        """Close the socket; after an error response, half-close and drain a little first."""
        stream = self.stream
        try:
            if linger:
                with trio.move_on_after(_LINGER_SECONDS):
                    await stream.send_eof()
                    drained = 0
                    while drained < _LINGER_BYTES:
                        chunk = await stream.receive_some(_RECEIVE_SIZE)
                        if not chunk:
                            break
                        drained += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:  # also when cancelled (server shutdown) mid-linger
            await trio.aclose_forcefully(stream)


_BIND_ERRNOS: Final = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL})
"""Bind failures that are the configuration's fault (port taken or privileged, host not local)."""


async def open_ops_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners(port, host=host)``; a bind the configuration makes impossible
    (port in use or privileged, address not on this machine, host unknown) is a
    :class:`ConfigError` naming ``ops.port`` or ``ops.host``."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except socket.gaierror as exc:
        raise ConfigError("ops.host", f"cannot resolve {host!r}: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno not in _BIND_ERRNOS:
            raise
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(
                "ops.host",
                f"cannot bind the ops HTTP server on {where}: {exc.strerror} (not an address "
                "of this machine? set ops.host)",
            ) from None
        raise ConfigError(
            "ops.port",
            f"cannot bind the ops HTTP server on {where}: {exc.strerror} (another node on "
            "this port? set ops.port, 0 picks a free one)",
        ) from None


def check_ops_bind(host: str, port: int) -> None:
    """Raise the :class:`ConfigError` of :func:`open_ops_listeners` now if ``host:port`` cannot
    be bound (the listeners are closed again): ``spawnmesh run`` checks before starting, as
    the node's supervisor would retry a failing ops server until its restart limit."""

    async def probe() -> None:
        for listener in await open_ops_listeners(host, port):
            await listener.aclose()

    trio.run(probe)


async def serve_ops(
    backend: OpsBackend,
    host: str,
    port: int,
    *,
    max_body_bytes: int = 1 << 20,
    max_connections: int = 256,
    idle_timeout_s: float = 30.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the ops HTTP API on ``host:port`` until cancelled.

    Binds (``port=0`` picks an ephemeral port; if ``host`` resolves to several addresses only the
    first is kept then, so the reported port is the one served), reports the bound port through
    ``task_status.started``, and handles every connection in a nursery owned by this call. At most
    ``max_connections`` connections are served at once; further clients wait in the kernel's
    accept backlog. A port that cannot be bound is a :class:`ConfigError` (``ops.port``).
    """
    if max_body_bytes < 0 or max_connections < 1 or not idle_timeout_s > 0:
        raise ValueError("max_body_bytes >= 0, max_connections >= 1 and idle_timeout_s > 0")
    if math.isinf(idle_timeout_s):
        raise ValueError("idle_timeout_s must be finite")
    listeners = await open_ops_listeners(host, port)
    if port == 0 and len(listeners) > 1:
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    actual_port: int = listeners[0].socket.getsockname()[1]
    router = _Router(backend)
    slots = trio.Semaphore(max_connections)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await _Connection(
                stream, router, max_body_bytes=max_body_bytes, idle_timeout_s=idle_timeout_s
            ).run()
        finally:
            slots.release()

    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, slots, nursery.start_soon, handle)
            log.info("ops HTTP server for node %s on %s:%d", backend.node_name, host, actual_port)
            task_status.started(actual_port)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def _accept_loop(
    listener: trio.SocketListener,
    slots: trio.Semaphore,
    spawn: Callable[[Callable[[trio.SocketStream], Awaitable[None]], trio.SocketStream], None],
    handle: Callable[[trio.SocketStream], Awaitable[None]],
) -> None:
    """Accept connections while a slot is free; back off on fd/memory exhaustion."""
    while True:
        await slots.acquire()
        try:
            stream = await listener.accept()
        except OSError as e:
            slots.release()
            if e.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            log.warning("ops: accept failed (%s); backing off", errno.errorcode.get(e.errno or 0))
            await trio.sleep(_ACCEPT_BACKOFF_SECONDS)
            continue
        except BaseException:
            slots.release()
            raise
        spawn(handle, stream)
