"""One authenticated peer connection: multiplexed, pipelined requests in both directions.

Tasks (all in the connection's nursery): the reader (decodes every frame of each ``recv`` and
dispatches it), the writer (sends everything queued since its last send in one call), the
pinger, and up to ``max_handlers`` workers that run the handler for the peer's requests.

Hot path choices (measured, spec/wire.md "Performance"):

* A caller parks with ``wait_task_rescheduled`` and the reader reschedules it with the reply:
  no Event, no per-request task. Cancelling the caller's scope aborts the park, which queues a
  Cancel frame.
* A frame goes straight to the socket when the connection has nothing else in flight (one
  synchronous ``send``, no task switch); otherwise it is queued and the writer, woken once,
  sends the whole batch with one call when the current scheduler batch is done.
* Workers are reused: an idle worker parks and the reader hands it the next request.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import outcome
import trio

from spawnmesh.errors import (
    FrameTooLarge,
    InvalidArgument,
    InvocationTimeout,
    Overloaded,
    PeerUnavailable,
    ProtocolError,
    SpawnmeshError,
)
from spawnmesh.wire import messages as m
from spawnmesh.wire.codec import FrameDecoder, append_frame
from spawnmesh.wire.handshake import Session
from spawnmesh.wire.transport import Transport

log = logging.getLogger("spawnmesh.wire")

Handler = Callable[[m.Request, str], Awaitable[bytes | None]]
"""``handle(request, origin_node_id) -> reply payload``; raise a SpawnmeshError to fail it."""

IDLE_WORKERS_MAX: Final = 64
"""Parked workers kept per connection; more exit when they go idle."""

_INF = math.inf
_encode_into = m.encode_into
_reschedule = trio.lowlevel.reschedule
_wait = trio.lowlevel.wait_task_rescheduled
_current_task = trio.lowlevel.current_task
_SUCCEEDED = trio.lowlevel.Abort.SUCCEEDED
_Value = outcome.Value
_Error = outcome.Error


@dataclass(frozen=True, slots=True)
class ConnLimits:
    """Per-connection limits (see ``PeerLimits`` for the meaning of each)."""

    max_frame_bytes: int
    max_in_flight: int
    max_handlers: int
    ping_interval_s: float
    idle_timeout_s: float
    flush_timeout_s: float = 1.0


def _as_bytes(payload: object) -> bytes:
    """A handler's reply as bytes (bytes-like accepted); anything else is the handler's bug."""
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    raise TypeError(f"the peer handler returned {type(payload).__name__}, not bytes or None")


def _spent(scope: trio.CancelScope) -> bool:
    """Whether ``scope`` was cancelled (a function, so type checkers do not assume a property
    keeps its value across awaits)."""
    return scope.cancel_called


class _Worker:
    """A task that runs the handler for one peer request at a time."""

    __slots__ = ("cancelled_by_peer", "req", "scope", "started", "task")

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.req: m.Request | None = None
        """The request handed to this worker, from dispatch until it is answered."""
        self.started = False
        """Whether the handler for :attr:`req` is running (a Cancel cancels it then)."""
        self.scope: trio.CancelScope | None = None
        self.cancelled_by_peer = False


class Connection:
    """A peer connection after a successful handshake (both roles on one socket)."""

    def __init__(
        self,
        transport: Transport,
        decoder: FrameDecoder,
        session: Session,
        *,
        node_id: str,
        dialer: str,
        handler: Handler,
        limits: ConnLimits,
        on_closed: Callable[[Connection], None] | None = None,
        on_protocol_error: Callable[[Connection, ProtocolError], None] | None = None,
    ) -> None:
        self.transport = transport
        self.session = session
        self.peer_id = session.peer_node_id
        self.peer_incarnation = session.peer_incarnation
        self.node_id = node_id
        self.dialer = dialer
        """Node id of the side that dialed (duplicate connections keep the lower id's dial)."""
        self._decoder = decoder
        decoder.max_frame_bytes = limits.max_frame_bytes
        self._handler = handler
        self._limits = limits
        self._on_closed = on_closed
        self._on_protocol_error = on_protocol_error
        """Told of a protocol violation by the peer (which ends the connection with a Reject)."""
        self._peer_max_frame = session.peer_max_frame_bytes
        self._max_in_flight = min(limits.max_in_flight, session.peer_max_in_flight)
        # client role
        self._pending: dict[int, trio.lowlevel.Task] = {}
        self._next_id = 1
        # server role
        self._running: dict[int, _Worker] = {}
        self._idle: list[_Worker] = []
        self._n_workers = 0
        # writer
        self._out = bytearray()
        self._writer_parked: trio.lowlevel.Task | None = None
        self._writer_busy = False
        self._writer_stop = False
        self._writer_done = trio.Event()
        # lifecycle
        self._open = True
        """Accepting new requests from this side (False once draining or closed)."""
        self._sent_goaway = False
        self._got_goaway = False
        self._lost: SpawnmeshError | None = None
        self._broken = False
        """The byte stream ended or failed (nothing more can be sent or read)."""
        self._reset = False
        """Close with a reset: the peer is dead or unreachable, so bytes still queued for it
        must never be delivered (say, once a partition heals, after their requests were
        retried elsewhere)."""
        self._reject: SpawnmeshError | None = None
        self._reader_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._recv_count = 0
        self._batch = 0
        """Frames in the last read (1: a lone request, answered straight to the socket)."""
        self.closed = trio.Event()
        """Set once the connection is fully closed."""

    # ------------------------------------------------------------------ public

    @property
    def usable(self) -> bool:
        """Whether new requests may be sent on this connection."""
        return self._open and not self._got_goaway

    @property
    def in_flight(self) -> int:
        """Requests this side sent that await an answer."""
        return len(self._pending)

    @property
    def handling(self) -> int:
        """Peer requests whose handler is running here."""
        return len(self._running)

    async def request(self, req: m.Request, deadline: float | None = None) -> bytes | None:
        """Send ``req`` (its ``id`` is set here, and ``deadline_ms`` from the caller's cancel
        scopes when it has a deadline) and wait for the answer.

        Raises the peer's rebuilt error, ``Overloaded`` when ``max_in_flight`` requests are
        already waiting, ``FrameTooLarge`` if the request exceeds the peer's frame limit, or
        ``PeerUnavailable`` if the connection is lost first."""
        if deadline is None:
            deadline = trio.current_effective_deadline()
        if deadline == _INF:
            pass  # no scope: the sender's own bound (``deadline_ms`` as given, None: none)
        else:
            remaining = deadline - trio.current_time()
            if remaining <= 0:  # the schedule point turns the passed deadline into Cancelled
                await trio.lowlevel.checkpoint()
                remaining = 0.0
            req.deadline_ms = math.ceil(remaining * 1000)
        if not self._open or self._got_goaway:
            raise PeerUnavailable(f"connection to node {self.peer_id} is closing")
        pending = self._pending
        if len(pending) >= self._max_in_flight:
            raise Overloaded(f"{len(pending)} requests already in flight to node {self.peer_id}")
        rid = self._next_id
        self._next_id = rid + 1
        req.id = rid
        try:
            self._send(req, not pending)
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            raise InvalidArgument(f"request cannot be encoded: {exc}") from None
        pending[rid] = _current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            if pending.pop(rid, None) is not None and not self._writer_stop:
                self._send(m.Cancel(rid), False)
                if not self._open:
                    self._check_drained()
            return _SUCCEEDED

        return await _wait(abort)  # type: ignore[no-any-return]

    def go_away(self, code: str = "", message: str = "") -> None:
        """Drain: send no new requests, ask the peer to do the same, close once nothing is in
        flight either way."""
        if self._sent_goaway or self._writer_stop:
            return
        self._open = False
        self._sent_goaway = True
        self._send(m.GoAway(code, message), False)
        self._check_drained()

    def abort(self, reason: SpawnmeshError) -> None:
        """Close at once, with a reset: requests in flight fail with ``reason``, and nothing
        queued for the peer is sent."""
        self._drop(reason)

    async def run(self) -> None:
        """Serve the connection until it closes, starting with any bytes the decoder holds
        from the read that carried the last handshake frame (decoded under the session
        limit)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._pinger)
                with self._reader_scope:
                    try:
                        await self._reader()
                    except ProtocolError as exc:
                        self._reject = exc
                        if self._on_protocol_error is not None:
                            self._on_protocol_error(self, exc)
                        self._lose(
                            PeerUnavailable(
                                f"protocol error on the connection to node {self.peer_id}: {exc}"
                            )
                        )
                    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        self._broken = True
                        self._lose(
                            PeerUnavailable(f"connection to node {self.peer_id} lost: {exc!r}")
                        )
                self._open = False
                self._fail_pending()
                if self._reject is not None:
                    self._queue_reject(self._reject)
                self._writer_stop = True
                self._wake_writer()
                if not self._reset:  # a reset already closed the socket: nothing to flush
                    with trio.move_on_after(self._limits.flush_timeout_s):
                        await self._writer_done.wait()
                        if not self._broken:
                            await self._linger()
                nursery.cancel_scope.cancel()
        finally:
            self._open = False
            self._writer_stop = True
            self._fail_pending()
            self.transport.close(reset=self._reset)
            self.closed.set()
            if self._on_closed is not None:
                self._on_closed(self)

    # ------------------------------------------------------------------ reading

    async def _reader(self) -> None:
        receive = self.transport.receive_some
        decoder = self._decoder
        feed = decoder.feed
        if decoder.buffered:
            self._dispatch_all(feed(b""))
        while True:
            if decoder.failed:  # frames before an oversized header were dispatched: now fail
                feed(b"")
            data = await receive()
            if not data:
                self._broken = True
                if self._sent_goaway and self._got_goaway and self._idle_both_ways():
                    return  # clean close after a drain
                self._lose(PeerUnavailable(f"node {self.peer_id} closed the connection"))
                return
            self._recv_count += 1
            self._dispatch_all(feed(data))

    def _dispatch_all(self, bodies: list[bytes]) -> None:
        self._batch = len(bodies)
        decode = m.decode
        pending = self._pending
        for body in bodies:
            try:
                msg = decode(body)
            except ProtocolError as exc:
                if self._salvage(body, exc):
                    continue
                raise
            cls = msg.__class__
            if cls is m.Reply:
                task = pending.pop(msg.id, None)  # type: ignore[union-attr]
                if task is not None:
                    _reschedule(task, _Value(msg.payload))  # type: ignore[union-attr]
                    if not self._open:
                        self._check_drained()
            elif cls is m.Request:
                self._on_request(msg)  # type: ignore[arg-type]
            elif cls is m.Error:
                task = pending.pop(msg.id, None)  # type: ignore[union-attr]
                if task is not None:
                    _reschedule(task, _Error(m.unbox(msg)))  # type: ignore[arg-type]
                    if not self._open:
                        self._check_drained()
            elif cls is m.Cancel:
                w = self._running.get(msg.id)  # type: ignore[union-attr]
                if w is not None:
                    w.cancelled_by_peer = True  # not started yet: it never runs
                    if w.started and w.scope is not None:
                        w.scope.cancel()
            elif cls is m.Ping:
                self._send(m.Pong(msg.token), False)  # type: ignore[union-attr]
            elif cls is m.Pong or msg is None:
                pass  # liveness only / a newer message type: skipped
            elif cls is m.GoAway:
                self._got_goaway = True
                if not self._sent_goaway:
                    self.go_away("drain", "answering a GoAway")
                self._check_drained()
            elif cls is m.Reject:
                err = m.rejected(msg)  # type: ignore[arg-type]
                self._lose(PeerUnavailable(f"node {self.peer_id} closed the connection: {err}"))
                self._reader_scope.cancel()
                return
            else:
                raise ProtocolError(f"unexpected {cls.__name__} after the handshake")

    def _salvage(self, body: bytes, exc: ProtocolError) -> bool:
        """A malformed Request, Reply or Error whose id can be read fails that request only
        (spec/wire.md 3.4): the peer's bug should not fail every request on the connection."""
        head = m.head(body)
        if head is None:
            return False
        code, rid = head
        err = ProtocolError(
            f"malformed {m.MESSAGE_TYPES[code].__name__} from {self.peer_id}: {exc}"
        )
        if code == m.Request.__struct_config__.tag:
            if rid in self._running:
                return False
            self._answer(m.Error(rid, err.to_wire(), self.node_id), False)
            return True
        if code in (m.Reply.__struct_config__.tag, m.Error.__struct_config__.tag):
            task = self._pending.pop(rid, None)
            if task is not None:
                err.origin = self.peer_id
                _reschedule(task, _Error(err))
                if not self._open:
                    self._check_drained()
            return True
        return False

    # ------------------------------------------------------------------ serving

    def _on_request(self, req: m.Request) -> None:
        """Hand ``req`` to a worker. It counts as running from here on, not from when the
        worker gets to it: a GoAway read in the same batch must not find the connection idle
        and close it under the request, whose answer would then be dropped after it ran."""
        running = self._running
        if req.id in running:
            raise ProtocolError(f"request id {req.id} is already running")
        if self._idle:
            w = self._idle.pop()
            running[req.id] = w
            w.req = req
            w.cancelled_by_peer = False
            _reschedule(w.task, _Value(req))  # type: ignore[arg-type]
        elif self._n_workers < self._limits.max_handlers and self._nursery is not None:
            self._n_workers += 1
            w = _Worker()
            running[req.id] = w
            w.req = req
            self._nursery.start_soon(self._worker, w, req)
        else:
            self._answer(
                m.Error(
                    req.id,
                    Overloaded(
                        f"node {self.node_id} is running {len(self._running)} requests from "
                        f"{self.peer_id} (max {self._limits.max_handlers})"
                    ).to_wire(),
                    self.node_id,
                ),
                False,
            )

    async def _worker(self, w: _Worker, first: m.Request) -> None:
        """Run peer requests one after another until idle too long or the connection ends.

        One cancel scope serves many requests (entering one costs about 4 us): its deadline is
        set per request, and it is replaced only after it was cancelled (a deadline passed, a
        Cancel arrived, or a stale deadline fired while the worker was parked)."""
        w.task = _current_task()
        req: m.Request | None = first
        idle = self._idle

        def abort(_: Any) -> trio.lowlevel.Abort:
            if w in idle:
                idle.remove(w)
            return _SUCCEEDED

        try:
            while True:
                if req is None:
                    if len(idle) >= IDLE_WORKERS_MAX:
                        return
                    idle.append(w)
                    req = await _wait(abort)
                with trio.CancelScope() as scope:
                    w.scope = scope
                    while True:
                        await self._run_one(w, req, scope)
                        req = None
                        if _spent(scope) or len(idle) >= IDLE_WORKERS_MAX:
                            break
                        idle.append(w)
                        req = await _wait(abort)
                        if _spent(scope):
                            break  # a stale deadline fired as this request arrived
                w.scope = None
                if w.started:  # cancelled in the handler: deadline or Cancel
                    cancelled = w.req
                    assert cancelled is not None
                    w.req = req = None
                    w.started = False
                    del self._running[cancelled.id]
                    if not w.cancelled_by_peer:
                        self._finish(cancelled, self._timed_out(cancelled))
                    elif not self._open:
                        self._check_drained()
        finally:
            self._n_workers -= 1

    def _timed_out(self, req: m.Request) -> m.Error:
        err = InvocationTimeout(
            f"{req.system}/{req.name}.{req.action}: deadline of {req.deadline_ms} ms passed "
            f"on node {self.node_id}"
        )
        return m.Error(req.id, err.to_wire(), self.node_id)

    async def _run_one(self, w: _Worker, req: m.Request, scope: trio.CancelScope) -> None:
        """Run the handler for ``req`` (already in ``_running``) inside ``scope`` and send its
        answer; one the peer cancelled before it started is dropped unanswered."""
        if w.cancelled_by_peer:
            w.req = None
            del self._running[req.id]
            if not self._open:
                self._check_drained()
            return
        w.started = True
        if req.deadline_ms is not None:
            scope.deadline = trio.current_time() + req.deadline_ms / 1000
        elif scope.deadline != _INF:
            scope.deadline = _INF
        try:
            payload = await self._handler(req, self.peer_id)
            if payload is not None and payload.__class__ is not bytes:
                payload = _as_bytes(payload)
            answer: m.Reply | m.Error = m.Reply(req.id, payload)
        except SpawnmeshError as exc:
            answer = m.Error(req.id, exc.to_wire(), self.node_id)
        except Exception as exc:
            log.exception("peer request handler failed (request from %s)", self.peer_id)
            answer = m.Error(
                req.id,
                {"code": "internal", "message": f"{type(exc).__name__}: {exc}"},
                self.node_id,
            )
        w.req = None
        w.started = False
        del self._running[req.id]
        self._finish(req, answer)

    def _finish(self, req: m.Request, answer: m.Reply | m.Error) -> None:
        if not self._writer_stop:
            # straight to the socket only when this request came alone (else the writer
            # sends this batch's answers in one call)
            self._answer(answer, not self._running and self._batch == 1)
        if not self._open:
            self._check_drained()

    def _answer(self, answer: m.Reply | m.Error, direct: bool) -> None:
        """Send an answer; one that cannot be sent as is (too large, or an error box holding
        values msgpack cannot encode) becomes an Error saying why, never a dead connection."""
        try:
            self._send(answer, direct)
        except FrameTooLarge as exc:
            self._send(m.Error(answer.id, exc.to_wire(), self.node_id), direct)
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            log.error("peer answer to %s cannot be encoded: %r", self.peer_id, exc)
            box = {"code": "internal", "message": f"answer cannot be encoded: {exc}"}
            self._send(m.Error(answer.id, box, self.node_id), direct)

    # ------------------------------------------------------------------ writing

    def _send(self, msg: m.Message, direct: bool) -> None:
        """Queue one frame; send it at once if ``direct`` and nothing else is queued."""
        if self._writer_stop:
            raise PeerUnavailable(f"connection to node {self.peer_id} is closed")
        out = self._out
        was_empty = not out
        append_frame(out, _encode_into, msg, self._peer_max_frame)
        if direct and was_empty and not self._writer_busy and self.transport.direct:
            try:
                n = self.transport.try_send(out)
            except OSError:
                n = 0  # the writer meets the error and ends the connection
            if n == len(out):
                out.clear()
                return
            del out[:n]
        self._wake_writer()

    def _wake_writer(self) -> None:
        task = self._writer_parked
        if task is not None:
            self._writer_parked = None
            _reschedule(task)

    async def _writer(self) -> None:
        def abort(_: Any) -> trio.lowlevel.Abort:
            self._writer_parked = None
            return _SUCCEEDED

        send_all = self.transport.send_all
        try:
            while True:
                if not self._out:
                    if self._writer_stop:
                        return
                    self._writer_parked = _current_task()
                    await _wait(abort)
                    continue
                data = self._out
                self._out = bytearray()
                self._writer_busy = True
                await send_all(data)
                self._writer_busy = False
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._broken = True
            self._lose(PeerUnavailable(f"connection to node {self.peer_id} lost: {exc!r}"))
        finally:
            self._writer_busy = False
            self._writer_done.set()

    async def _linger(self) -> None:
        """Half-close and read until the peer closes too, so that closing with unread bytes
        does not reset the connection and destroy our last frames (a Reject, the last
        replies) before the peer reads them."""
        try:
            self.transport.shutdown_write()
            while await self.transport.receive_some():
                pass
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _queue_reject(self, exc: SpawnmeshError) -> None:
        try:
            self._send(m.Reject(exc.code, str(exc)), False)
        except SpawnmeshError:
            pass

    # ------------------------------------------------------------------ liveness, lifecycle

    async def _pinger(self) -> None:
        interval = self._limits.ping_interval_s
        seen = self._recv_count
        quiet = 0.0
        token = 0
        while True:
            await trio.sleep(interval)
            if self._recv_count != seen:
                seen = self._recv_count
                quiet = 0.0
                continue
            quiet += interval
            if quiet >= self._limits.idle_timeout_s:
                self._drop(  # a dead peer: no lingering, no late bytes
                    PeerUnavailable(
                        f"node {self.peer_id} sent nothing for {quiet:.1f} s (ping timeout)"
                    )
                )
                return
            if self._writer_stop:
                return
            token += 1
            self._send(m.Ping(token), False)

    def _idle_both_ways(self) -> bool:
        return not self._pending and not self._running

    def _check_drained(self) -> None:
        if self._sent_goaway and self._got_goaway and self._idle_both_ways():
            self._reader_scope.cancel()

    def _drop(self, reason: SpawnmeshError) -> None:
        """End with a reset, now: requests in flight fail with ``reason``, queued frames are
        discarded and the socket is closed (SO_LINGER 0) before the writer can send the batch
        it holds. The peer is dead or unreachable; bytes delivered later (say, once a partition
        heals) would run requests whose callers already failed over elsewhere (spec/wire.md 8)."""
        self._broken = self._reset = True
        self._writer_stop = True
        self._out.clear()
        self._lose(reason)
        self.transport.close(reset=True)

    def _lose(self, reason: SpawnmeshError) -> None:
        """End the connection: first reason wins; requests in flight fail with it."""
        if self._lost is None:
            self._lost = reason
        self._open = False
        self._fail_pending()
        self._reader_scope.cancel()

    def _fail_pending(self) -> None:
        if not self._pending:
            return
        reason = self._lost or PeerUnavailable(f"connection to node {self.peer_id} closed")
        pending = list(self._pending.values())
        self._pending.clear()
        for task in pending:
            err = PeerUnavailable(str(reason))
            err.origin = self.node_id
            _reschedule(task, _Error(err))
