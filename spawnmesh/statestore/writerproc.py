"""The statestore's writer process: sealing and SQL of state batches off the node's GIL.

A node's turns and its state writer share one interpreter lock. Per persisted row the writer
spends about as much Python (sealing, statement parameters, the driver's binding and escaping)
as a turn does, so in one process write-behind cannot keep up with turns (docs/statestores.md,
benchmark). ``SqlStateStore.save_many`` therefore hands each batch to a child process running
this module: the node only encodes the batch (msgpack, about 0.1 us a row) and applies the
revisions that come back; the child validates, seals and runs the very same fenced statements
(``SqlStateStore`` with ``writer_process=False``) on its own connection.

Protocol on the child's stdin/stdout: frames of a 4-byte big-endian length and a body. The
node's first frame is the setup (msgpack: URL, keys, options), the child's first is ``[4]``
(READY: imports done). Then each request, an 8-byte id and ``[now_ms, rows]`` in msgpack, gets
one reply ``[id, 0, results, totals]`` (per row the new revision, or the StaleActivation's message
as a string; totals are the child's batches/writes/rechecks/fallbacks/retries so far) or
``[id, 1, message]`` (StatestoreUnavailable), ``[id, 2, message]`` (InvalidArgument), ``[id, 3,
message]`` (an unexpected error). A child on a database server handles two requests at once, on
two connections (one encodes while the server runs the other), so replies may come out of order;
on SQLite, one at a time. The child exits when its stdin closes (the node closed the store, or
died: a SIGKILLed node leaves no orphan once the batch in hand is done) and ignores SIGINT and
SIGTERM, which a terminal or a service manager may send to the whole process group: the node
drains through it on shutdown.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import trio

from spawnmesh.errors import StatestoreUnavailable

log = logging.getLogger("spawnmesh.statestore")

_HEADER = struct.Struct(">I")
_ID = struct.Struct(">Q")
_MAX_FRAME = 1 << 30
_PIPE_BYTES = 1 << 20
"""Pipe capacity asked for (Linux): a batch of 1,000 rows of 200 bytes goes in one write."""
_EXIT_WAIT_S = 10.0

OK, UNAVAILABLE, INVALID, ERROR, READY = 0, 1, 2, 3, 4
"""Reply status codes (READY: the child's first frame, once it can write)."""

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def frame(body: bytes) -> bytes:
    """One protocol frame: the length, then the body."""
    return _HEADER.pack(len(body)) + body


class FrameError(Exception):
    """The stream does not hold frames (a length beyond the bound)."""


class FrameBuffer:
    """Sans-IO frame splitter: ``feed`` bytes as they arrive, ``pop`` whole frame bodies."""

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = _MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes | bytearray) -> None:
        """Append received bytes."""
        self._buf += data

    def pop(self) -> bytes | None:
        """The next whole frame's body, or None until more bytes arrive; FrameError if the
        length exceeds ``max_frame``."""
        buf = self._buf
        if len(buf) < _HEADER.size:
            return None
        size: int = _HEADER.unpack_from(buf)[0]
        if size > self.max_frame:
            raise FrameError(f"frame of {size} bytes (at most {self.max_frame})")
        end = _HEADER.size + size
        if len(buf) < end:
            return None
        body = bytes(buf[_HEADER.size : end])
        del buf[:end]
        return body

    def missing(self) -> int:
        """Bytes still needed for the frame in progress (at least 1)."""
        buf = self._buf
        if len(buf) < _HEADER.size:
            return _HEADER.size - len(buf)
        size: int = _HEADER.unpack_from(buf)[0]
        return max(1, _HEADER.size + size - len(buf))

    def clear(self) -> None:
        """Forget buffered bytes (a new stream)."""
        self._buf.clear()


class _Pending:
    """A request sent and not yet answered."""

    __slots__ = ("error", "reply")

    def __init__(self) -> None:
        self.reply: Any = None
        self.error: StatestoreUnavailable | None = None

    def done(self) -> bool:
        """Answered, or failed."""
        return self.reply is not None or self.error is not None


COMMAND = [sys.executable, "-m", "spawnmesh.statestore.writerproc"]
_BROKEN_AFTER = 3
"""Children in a row that die before answering anything: the writer process is broken."""


class WriterProcess:
    """Node side of one writer process: started ahead by ``start`` (or by the first request),
    restarted after it died.

    ``call`` sends one request and returns its decoded reply; requests may overlap (each
    caller reads replies, whoever's they are, until its own arrived), which lets the node
    prepare the next batch while the child writes the previous one. ``broken`` turns true
    once several children in a row died before answering (it cannot start here): the store
    then writes in its own process.
    """

    def __init__(self, setup: dict[str, Any], where: str, command: list[str] | None = None) -> None:
        self._command = command or COMMAND
        self._setup = _encode(setup)
        self._where = where
        self._proc: trio.Process | None = None
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._send_lock = trio.Lock()
        self._recv_lock = trio.Lock()
        self._frames = FrameBuffer()
        self._answered = False
        """The running child has answered at least once."""
        self._asked = False
        """The running child was sent a request."""
        self._ready = False
        """The running child said READY (its imports are done)."""
        self._closed = False
        self._stillborn = 0
        """Children in a row that died before answering."""
        self.starts = 0
        """Child processes started (for tests: a restart after a crash counts)."""
        self.replies = 0
        """Requests answered by children (for tests: which batches went through one)."""

    @property
    def broken(self) -> bool:
        """Several children in a row died before answering: do not start another."""
        return self._stillborn >= _BROKEN_AFTER

    async def poll_ready(self) -> bool:
        """Whether the running child is ready for requests, without waiting: reads its READY
        frame if it has arrived. A child found dead is forgotten (the next ``start`` makes a new
        one)."""
        proc = self._proc
        if proc is None:
            return False
        if self._ready:
            return True
        stdout = proc.stdout
        if self._recv_lock.locked() or not isinstance(stdout, trio.lowlevel.FdStream):
            return False
        try:
            data = os.read(stdout.fileno(), 65536)  # the fd is non-blocking (trio's)
        except BlockingIOError:
            return False
        except OSError as err:
            await self._died(proc, f"cannot read from it: {err!r}")
            return False
        if not data:
            await self._died(proc, "it exited")
            return False
        self._frames.feed(data)
        try:
            await self._take_ready(proc)
        except FrameError as err:
            await self._died(proc, f"it sent garbage: {err}")
        return self._ready

    async def _take_ready(self, proc: trio.Process) -> None:
        """Consume the READY frame if it is buffered (it comes before any reply)."""
        if self._ready:
            return
        body = self._frames.pop()
        if body is None:
            return
        if _decode(body) != [READY]:
            await self._died(proc, "its first frame was not READY")
            return
        self._ready = True

    @property
    def pid(self) -> int | None:
        """The running child's process id, if one runs."""
        return self._proc.pid if self._proc is not None else None

    async def call(self, body: bytes) -> Any:
        """Send ``body`` as one request and return the decoded reply. Raises
        StatestoreUnavailable if the child cannot be started or died meanwhile. Not
        cancellable once sent (like a database call: the caller must learn what was written)."""
        with trio.CancelScope(shield=True):
            async with self._send_lock:
                proc = self._proc or await self._start()
                item = _Pending()
                self._next_id += 1
                request = self._next_id
                self._pending[request] = item
                self._asked = True
                stdin = proc.stdin
                assert stdin is not None
                try:
                    await stdin.send_all(frame(_ID.pack(request) + body))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
                    await self._died(proc, f"cannot write to it: {err!r}")
            while not item.done():
                async with self._recv_lock:
                    if item.done():  # another caller read it meanwhile
                        break
                    reply = await self._read_reply(proc)
                    if reply is not None:
                        answered = self._pending.pop(reply[0], None)
                        if answered is None:
                            await self._died(proc, f"it answered request {reply[0]}, not asked")
                            continue
                        self.replies += 1
                        self._answered = True
                        self._stillborn = 0
                        answered.reply = reply[1:]
            if item.error is not None:
                raise item.error
            return item.reply

    async def start(self) -> None:
        """Start a child now (its imports take a good part of a second) unless one runs; never
        raises (the first batch tries again)."""
        if self._proc is None and not self._closed and not self.broken:
            async with self._send_lock:
                if self._proc is None:
                    with contextlib.suppress(StatestoreUnavailable):
                        await self._start()

    async def _start(self) -> trio.Process:
        if self._closed or self.broken:
            raise StatestoreUnavailable(
                f"statestore {self._where}: the writer process is "
                f"{'closed' if self._closed else 'broken'}"
            )
        try:
            proc = await trio.lowlevel.open_process(
                self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
        except OSError as err:
            self._stillborn += 1
            raise StatestoreUnavailable(
                f"statestore {self._where}: cannot start the writer process: {err}"
            ) from err
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(AttributeError, OSError):  # best effort, Linux only
                fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)  # type: ignore[union-attr]
        self._proc = proc
        self._frames.clear()
        self._answered = False
        self._asked = False
        self._ready = False
        self.starts += 1
        assert proc.stdin is not None
        try:
            await proc.stdin.send_all(frame(self._setup))
        except (trio.BrokenResourceError, OSError) as err:
            await self._died(proc, f"cannot write to it: {err!r}")
        return proc

    async def _read_reply(self, proc: trio.Process) -> Any:
        """The next reply frame, decoded; None (and every pending request failed) if the child
        died."""
        stdout = proc.stdout
        assert stdout is not None
        frames = self._frames
        while True:
            try:
                await self._take_ready(proc)
                body = frames.pop() if self._ready else None
            except FrameError as err:
                await self._died(proc, f"it sent garbage: {err}")
                return None
            if self._proc is not proc:  # died meanwhile (_take_ready)
                return None
            if body is not None:
                return _decode(body)
            try:
                data = await stdout.receive_some(max(65536, frames.missing()))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
                data = b""
                why = f"cannot read from it: {err!r}"
            else:
                why = "it exited"
            if not data:
                await self._died(proc, why)
                return None
            frames.feed(data)

    async def _died(self, proc: trio.Process, why: str) -> None:
        """Forget a dead (or broken) child: fail every pending request; the next call starts a
        new one."""
        if self._proc is proc:
            self._proc = None
            if not self._answered:
                self._stillborn += 1
        with contextlib.suppress(OSError):
            proc.kill()
        with trio.move_on_after(_EXIT_WAIT_S):
            await proc.wait()
        err = StatestoreUnavailable(
            f"statestore {self._where}: the writer process failed ({why}; exit code "
            f"{proc.returncode}); the batch's outcome is unknown and it will be retried"
        )
        log.warning("%s", err)
        pending, self._pending = self._pending, {}
        for item in pending.values():
            item.error = err

    async def aclose(self) -> None:
        """Let the child finish and exit (its stdin closes); kill it if it does not."""
        self._closed = True
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            if not self._asked:  # started ahead and never used (a CLI command): no waiting
                with contextlib.suppress(OSError):
                    proc.kill()
            if proc.stdin is not None:
                with contextlib.suppress(trio.BrokenResourceError, OSError):
                    await proc.stdin.aclose()
            with trio.move_on_after(_EXIT_WAIT_S) as scope:
                await proc.wait()
            if scope.cancelled_caught:
                log.warning("statestore %s: writer process did not exit, killed", self._where)
                proc.kill()
                await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()


# --------------------------------------------------------------------------- the child


def _read_exact(f: Any, n: int) -> bytes | None:
    data = f.read(n)
    if len(data) < n:
        return None
    return bytes(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def serve(rfd: int, wfd: int) -> None:
    """The child's loop: read the setup, then answer requests until stdin closes (two at a time
    in threads on a database server: the GIL is free while one waits for the server)."""
    from spawnmesh.errors import InvalidArgument
    from spawnmesh.statestore.crypto import Keyring
    from spawnmesh.statestore.sql import SqlStateStore

    reader = os.fdopen(rfd, "rb", buffering=_PIPE_BYTES)
    head = _read_exact(reader, _HEADER.size)
    if head is None:
        return
    setup = _decode(_read_exact(reader, _HEADER.unpack(head)[0]) or b"")
    keys = setup["keys"]
    workers = 1 if str(setup["url"]).startswith("sqlite") else 2
    store = SqlStateStore(
        setup["url"],
        keyring=Keyring([(k, v) for k, v in keys]) if keys else None,
        allow_plaintext=setup["allow_plaintext"],
        pool_size=workers,
        node_id=setup["node_id"],
        history_keep=setup["history_keep"],
        history_max_age_s=setup["history_max_age_s"],
        connect_timeout_s=setup["connect_timeout_s"],
        writer_process=False,
    )
    store._in_writer_process = True
    write_lock = threading.Lock()

    def handle(request: int, body: memoryview) -> None:
        try:
            reply: list[Any] = [request, *store.save_rows_sync(body)]
        except StatestoreUnavailable as err:
            reply = [request, UNAVAILABLE, str(err)]
        except InvalidArgument as err:
            reply = [request, INVALID, str(err)]
        except Exception as err:  # report it; the node logs it and retries
            log.exception("writer process: unexpected error")
            reply = [request, ERROR, f"{type(err).__name__}: {err}"]
        data = frame(_encode(reply))
        with write_lock:
            _write_all(wfd, data)

    _write_all(wfd, frame(_encode([READY])))  # imports done: the node may send batches now
    pool = ThreadPoolExecutor(workers, thread_name_prefix="writer") if workers > 1 else None
    try:
        while True:
            head = _read_exact(reader, _HEADER.size)
            if head is None:
                return
            body = _read_exact(reader, _HEADER.unpack(head)[0])
            if body is None or len(body) < _ID.size:
                return
            request = _ID.unpack_from(body)[0]
            if pool is None:
                handle(request, memoryview(body)[_ID.size :])
            else:
                pool.submit(handle, request, memoryview(body)[_ID.size :])
    finally:
        if pool is not None:
            pool.shutdown(wait=True)  # requests taken are answered before the child exits
        store.dispose_sync()


def main() -> None:
    """Entry point of ``python -m spawnmesh.statestore.writerproc`` (started by the store)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The protocol gets its own copies of stdin/stdout; stray prints go to stderr instead.
    rfd, wfd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s (writer process): %(message)s",
    )
    serve(rfd, wfd)


if __name__ == "__main__":
    main()
