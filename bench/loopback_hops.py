"""What one extra process hop costs on this machine, with no HTTP and no spawnmesh code.

A client sends 300 bytes and waits for them back, either from an echo process (one hop) or
through a relay process in front of the echo (two hops), on loopback TCP. Every process waits
the same way: ``block`` (a blocking ``recv``), ``epoll`` (non-blocking reads and ``epoll_wait``,
as an event loop does), or ``trio`` (trio's ``wait_readable``, as the node does). ``spin`` is
``epoll`` with a relay that busy-polls for 20 us after each write.

It tells whether a machine makes waking a sleeping process dear: where idle CPUs halt at once
(some VMs), the ratio two hops / one hop depends on when processes sleep more than on what they
compute, which bounds ``bench/spawn_http.py``'s sequential ratio (docs/spawn-compat.md,
"Benchmark"). ``--pin`` runs everything on CPU 0, where no wake-up crosses CPUs.

Usage: python bench/loopback_hops.py [--n 20000] [--rounds 3] [--pin]
Prints the figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable

MODES = ("block", "epoll", "trio", "spin")
MESSAGE = b"x" * 300


def _listen() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port: int = s.getsockname()[1]
    return s, port


def _nodelay(c: socket.socket) -> socket.socket:
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def _reader(s: socket.socket, mode: str) -> Callable[[], bytes]:
    """A function that returns the next bytes of ``s``, waiting the way ``mode`` waits."""
    if mode == "block":
        return lambda: s.recv(65536)
    s.setblocking(False)
    fd = s.fileno()
    ep = select.epoll()
    ep.register(fd, select.EPOLLIN)

    def read() -> bytes:
        while True:
            try:
                return os.read(fd, 65536)
            except BlockingIOError:
                ep.poll()

    return read


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _serve(fn: Callable[[], None]) -> int:
    """Run ``fn`` in a child process (exits with it); the child's pid."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    return pid


def _echo(srv: socket.socket, mode: str) -> None:
    c = _nodelay(srv.accept()[0])
    if mode == "trio":
        _trio_loop(c, lambda data: data)
        return
    read = _reader(c, mode)
    while data := read():
        os.write(c.fileno(), data)


def _relay(srv: socket.socket, up_port: int, mode: str) -> None:
    c = _nodelay(srv.accept()[0])
    up = _nodelay(socket.create_connection(("127.0.0.1", up_port)))
    if mode == "trio":
        _trio_relay(c, up)
        return
    read_c = _reader(c, "epoll" if mode == "spin" else mode)
    read_up = _reader(up, "epoll" if mode == "spin" else mode)
    pause = 20e-6 if mode == "spin" else 0.0
    while data := read_c():
        os.write(up.fileno(), data)
        if pause:
            _spin(pause)
        os.write(c.fileno(), read_up())
        if pause:
            _spin(pause)


async def _trio_read(s: socket.socket) -> bytes:
    import trio

    while True:
        try:
            return os.read(s.fileno(), 65536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(s)


def _trio_loop(c: socket.socket, answer: Callable[[bytes], bytes]) -> None:
    import trio

    c.setblocking(False)

    async def main() -> None:
        while data := await _trio_read(c):
            os.write(c.fileno(), answer(data))

    trio.run(main)


def _trio_relay(c: socket.socket, up: socket.socket) -> None:
    import trio

    c.setblocking(False)
    up.setblocking(False)

    async def main() -> None:
        while data := await _trio_read(c):
            os.write(up.fileno(), data)
            os.write(c.fileno(), await _trio_read(up))

    trio.run(main)


def _round_trips(port: int, mode: str, n: int) -> float:
    """Round trips per second from a client waiting like ``mode``."""
    c = _nodelay(socket.create_connection(("127.0.0.1", port)))
    try:
        if mode == "trio":
            import trio

            c.setblocking(False)

            async def main() -> float:
                for _ in range(500):
                    os.write(c.fileno(), MESSAGE)
                    await _trio_read(c)
                t = time.perf_counter()
                for _ in range(n):
                    os.write(c.fileno(), MESSAGE)
                    await _trio_read(c)
                return n / (time.perf_counter() - t)

            return trio.run(main)
        read = _reader(c, "epoll" if mode == "spin" else mode)
        for _ in range(500):
            os.write(c.fileno(), MESSAGE)
            read()
        t = time.perf_counter()
        for _ in range(n):
            os.write(c.fileno(), MESSAGE)
            read()
        return n / (time.perf_counter() - t)
    finally:
        c.close()


def measure(mode: str, n: int) -> tuple[float, float]:
    """(one hop, two hops) round trips per second, fresh processes for each."""
    pids = []
    try:
        srv, port = _listen()
        pids.append(_serve(lambda: _echo(srv, mode)))
        srv.close()
        one = _round_trips(port, mode, n)
        esrv, eport = _listen()
        pids.append(_serve(lambda: _echo(esrv, mode)))
        esrv.close()
        rsrv, rport = _listen()
        pids.append(_serve(lambda: _relay(rsrv, eport, mode)))
        rsrv.close()
        two = _round_trips(rport, mode, n)
        return one, two
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help="round trips per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per mode (alternated)")
    ap.add_argument("--pin", action="store_true", help="run every process on CPU 0")
    args = ap.parse_args()
    if args.pin:
        os.sched_setaffinity(0, {0})
    rates: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            rates[mode].append(measure(mode, args.n))
    out: dict[str, object] = {"cpus": os.cpu_count(), "pinned": args.pin}
    for mode in MODES:
        one = sum(r[0] for r in rates[mode]) / len(rates[mode])
        two = sum(r[1] for r in rates[mode]) / len(rates[mode])
        print(f"{mode:6} one hop {one:8.0f}/s ({1e6 / one:5.1f} us)   two hops {two:8.0f}/s "
              f"({1e6 / two:5.1f} us)   ratio {two / one:.3f}")
        out[f"{mode}_one_hop_per_s"] = round(one)
        out[f"{mode}_two_hops_per_s"] = round(two)
        out[f"{mode}_ratio"] = round(two / one, 3)
    try:
        with open("/sys/module/haltpoll/parameters/guest_halt_poll_ns") as f:
            out["guest_halt_poll_ns"] = int(f.read())
    except (OSError, ValueError):
        pass
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
