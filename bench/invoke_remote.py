"""Remote invocation benchmark (issue 5): the raw TCP baseline and the peer wire layer.

Every figure is measured between two processes on loopback: this process is the client, a
child process (this file with ``--serve raw|wire``) the server. Figures:

* ``raw_trio_rtt_per_s``: plain trio, one 200-byte frame sent and echoed back, sequentially;
* ``wire_seq_per_s``, ``wire_seq_p50_us``, ``wire_seq_p99_us``: one caller, sequential
  requests through ``spawnmesh.wire.PeerNode`` to an echo handler (150-byte payload, about 200
  bytes a frame);
* ``wire_pipelined_per_s``: 64 callers in flight over the one connection, and the CPU time
  each process spent per request meanwhile (``wire_pipelined_client_cpu_us``,
  ``wire_pipelined_server_cpu_us``: the layer's capacity, whatever other processes take);
* ``wire_seq_ratio`` = wire_seq_per_s / raw_trio_rtt_per_s (medians over the rounds; within a
  round raw and wire alternate in blocks of 250 calls, so background load hits both alike);
* ``raw_trio_rtt_p50_us`` and ``wire_seq_p50_ratio`` = raw p50 / wire p50 latency: the same
  comparison, far less sensitive to other processes stealing the CPU than a mean rate.

End to end (the issue's figures), through a 3-node cluster: two ``spawnmesh run`` processes
(``--app invoke_remote:bench_system``) and this process's embedded node, all on loopback with a
cluster key:

* ``remote_seq_invokes_per_s``, ``remote_seq_p50_us``, ``remote_seq_p99_us``: one caller in
  this process invoking, one after the other, stateless actors owned by the other two nodes
  (150-byte payload and reply), through the SDK (``ActorRef.invoke``: router, peer wire, the
  owner's runtime and turn, and back); measured in the same alternating blocks as the raw and
  wire calls;
* ``remote_pipelined_invokes_per_s``: 64 callers in flight from this node to actors on the
  other two;
* ``remote_seq_ratio`` = remote_seq_invokes_per_s / raw_trio_rtt_per_s.

Other work on the machine makes absolute figures noisy: compare ratios.

    python bench/invoke_remote.py [--quick] [--rounds N]

Prints figures, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from spawnmesh import ActorSystem, Context, Node, action, open_node
from spawnmesh.actors.definition import Kind
from spawnmesh.config import load_config
from spawnmesh.ids import ActorId
from spawnmesh.keyring import Keyring
from spawnmesh.wire.messages import Request
from spawnmesh.wire.peer import PeerNode

FRAME = b"x" * 200
PAYLOAD = b"p" * 150
CLUSTER = "bench"
IN_FLIGHT = 64
perf = time.perf_counter


# ---------------------------------------------------------------- servers (child process)


async def serve_raw() -> None:
    """Echo every byte back (the peer of the raw round trip)."""

    async def echo(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(echo, listeners)


async def serve_wire(key: str) -> None:
    """A PeerNode with an echo handler."""

    async def echo(req: Request, origin: str) -> bytes | None:
        return req.payload

    node = PeerNode("server", 1, CLUSTER, echo, keyring=Keyring.parse(key))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(node.serve, "127.0.0.1", 0)
        print(port, flush=True)


bench_system = ActorSystem("bench")
"""The end-to-end app: stateless echo actors, one per name (placed over the cluster)."""


@bench_system.actor("echo", kind=Kind.UNNAMED, stateful=False)
class Echo:
    @action
    async def echo(self, ctx: Context[None], data: bytes) -> bytes:
        return data


def node_config(key: str, seeds: str = "") -> object:
    return load_config(
        overrides={
            "name": "driver", "statestore.url": "memory://", "ops.port": 0,
            "cluster.gossip_port": 0, "cluster.peer_port": 0, "cluster.key": key,
            "cluster.preset": "local", "cluster.seeds": seeds,
        },
        env={},
    )


class ClusterNode:
    """One ``spawnmesh run`` process of the end-to-end cluster."""

    def __init__(self, name: str, key: str, seed: str) -> None:
        env = dict(
            os.environ,
            PYTHONPATH=str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            SPAWNMESH_NAME=name, SPAWNMESH_STATESTORE_URL="memory://", SPAWNMESH_OPS_PORT="0",
            SPAWNMESH_CLUSTER_GOSSIP_PORT="0", SPAWNMESH_CLUSTER_PEER_PORT="0",
            SPAWNMESH_CLUSTER_KEY=key, SPAWNMESH_CLUSTER_PRESET="local",
            SPAWNMESH_CLUSTER_SEEDS=seed, SPAWNMESH_LOG_LEVEL="warning",
        )
        exe = Path(sys.executable).with_name("spawnmesh")
        self.proc = subprocess.Popen(
            [str(exe), "run", "--app", "invoke_remote:bench_system"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


async def remote_names(node: Node, n: int) -> list[ActorId]:
    """``n`` echo actors owned by the other members, once the cluster has three."""
    with trio.fail_after(60):
        while True:
            if node.router is not None and len(node.router.placement.members("bench/echo")) >= 3:
                break
            await trio.sleep(0.05)
    adef = node.runtime.definition("bench", "echo")
    assert adef is not None and node.router is not None
    out = []
    i = 0
    while len(out) < n:
        aid = ActorId("bench", f"e{i}", "echo")
        if node.router.remote_owner(aid, adef) is not None:
            out.append(aid)
        i += 1
    return out


def remote_call(node: Node, targets: list[ActorId]) -> Callable[[], Awaitable[object]]:
    """One sequential invocation of a remote echo actor (round robin over ``targets``)."""
    refs = [node.ref(t.system, t.name, parent=t.parent) for t in targets]
    state = {"i": 0}

    async def call() -> object:
        i = state["i"] = (state["i"] + 1) % len(refs)
        return await refs[i].invoke("echo", PAYLOAD)

    return call


async def remote_pipelined(node: Node, targets: list[ActorId], n: int) -> float:
    """Invocations/s with ``IN_FLIGHT`` callers in flight to actors on the other nodes."""
    refs = [node.ref(t.system, t.name, parent=t.parent) for t in targets]
    per = n // IN_FLIGHT

    async def caller(k: int) -> None:
        for j in range(per):
            await refs[(k * 31 + j) % len(refs)].invoke("echo", PAYLOAD)

    async with trio.open_nursery() as nursery:  # warm up
        for k in range(IN_FLIGHT):
            nursery.start_soon(caller, k)
    t0 = perf()
    async with trio.open_nursery() as nursery:
        for k in range(IN_FLIGHT):
            nursery.start_soon(caller, k)
    return per * IN_FLIGHT / (perf() - t0)


class Server:
    """A server child process; its port is read from its first line of output."""

    def __init__(self, kind: str, key: str) -> None:
        env = dict(os.environ, BENCH_KEY=key)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


# ---------------------------------------------------------------- figures (client side)


class RawClient:
    """The raw baseline: a plain trio stream to the echo server, one 200-byte frame at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    @classmethod
    async def open(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def round_trip(self) -> None:
        await self.stream.send_all(FRAME)
        got = 0
        while got < len(FRAME):
            got += len(await self.stream.receive_some(65536))


def request() -> Request:
    return Request(0, "bench", "echo", None, "echo", PAYLOAD)


def wire_call(node: PeerNode, port: int) -> Callable[[], Awaitable[object]]:
    """One sequential request through the peer layer to the echo server."""
    addr = ("127.0.0.1", port)
    return lambda: node.request("server", addr, request())


Seq = tuple[float, float, float]
"""(calls/s, p50 us, p99 us)"""


async def interleaved(
    calls: dict[str, Callable[[], Awaitable[object]]], n: int, block: int = 250
) -> dict[str, Seq]:
    """Sequential figures for several kinds of call measured in alternating blocks of
    ``block`` calls, so a burst of load from other processes hits each kind alike (the
    ratios then compare like with like). ``raw_trio_rtt`` and ``wire_seq`` come from here;
    the end-to-end ``remote_seq`` joins as one more entry."""
    for call in calls.values():  # warm up
        for _ in range(min(n, 2000)):
            await call()
    lat: dict[str, list[float]] = {name: [] for name in calls}
    spent = dict.fromkeys(calls, 0.0)
    for _ in range(max(1, n // block)):
        for name, call in calls.items():
            out = lat[name]
            t0 = perf()
            for _ in range(block):
                s = perf()
                await call()
                out.append(perf() - s)
            spent[name] += perf() - t0
    figures = {}
    for name, values in lat.items():
        values.sort()
        figures[name] = (
            len(values) / spent[name],
            values[len(values) // 2] * 1e6,
            values[int(len(values) * 0.99)] * 1e6,
        )
    return figures


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wire_pipelined(
    node: PeerNode, port: int, n: int, server_pid: int
) -> tuple[float, float, float]:
    """(requests/s, client CPU us/request, server CPU us/request) with ``IN_FLIGHT`` callers
    sharing the connection. CPU per request does not depend on how much CPU other processes
    leave us, so it shows the layer's capacity on a busy machine."""
    addr = ("127.0.0.1", port)
    per = n // IN_FLIGHT

    async def caller() -> None:
        for _ in range(per):
            await node.request("server", addr, request())

    async with trio.open_nursery() as nursery:  # warm up
        for _ in range(IN_FLIGHT):
            nursery.start_soon(caller)
    c0, s0 = cpu_s(os.getpid()), cpu_s(server_pid)
    t0 = perf()
    async with trio.open_nursery() as nursery:
        for _ in range(IN_FLIGHT):
            nursery.start_soon(caller)
    dt = perf() - t0
    done = per * IN_FLIGHT
    c1, s1 = cpu_s(os.getpid()), cpu_s(server_pid)
    return done / dt, (c1 - c0) / done * 1e6, (s1 - s0) / done * 1e6


async def with_client(key: str, fn: Callable[[PeerNode], Awaitable[None]]) -> None:
    """Run ``fn`` with a client PeerNode serving in a nursery."""

    async def nothing(req: Request, origin: str) -> bytes | None:
        return None

    node = PeerNode("client", 1, CLUSTER, nothing, keyring=Keyring.parse(key))
    async with trio.open_nursery() as nursery:
        await nursery.start(node.serve, "127.0.0.1", 0)
        await fn(node)
        await node.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve", choices=["raw", "wire"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve == "raw":
        trio.run(serve_raw)
        return
    if args.serve == "wire":
        trio.run(serve_wire, os.environ["BENCH_KEY"])
        return
    key = _new_key()
    n_seq = 3000 if args.quick else 20000
    n_pipe = 12800 if args.quick else 128000
    rounds = 1 if args.quick else args.rounds

    raw_s, wire_s = Server("raw", key), Server("wire", key)
    raw: list[Seq] = []
    seq: list[Seq] = []
    pipe: list[tuple[float, float, float]] = []
    remote: list[Seq] = []
    remote_pipe: list[float] = []
    members: list[ClusterNode] = []
    try:

        async def run(node: PeerNode) -> None:
            raw_client = await RawClient.open(raw_s.port)
            async with open_node(node_config(key), bench_system) as driver:  # type: ignore[arg-type]
                assert driver.membership is not None
                seed = f"127.0.0.1:{driver.membership.addr[1]}"
                members.extend(ClusterNode(f"member-{i}", key, seed) for i in (1, 2))
                targets = await remote_names(driver, 64)
                calls = {
                    "raw": raw_client.round_trip,
                    "wire": wire_call(node, wire_s.port),
                    "remote": remote_call(driver, targets),
                }
                for _ in range(rounds):
                    figures = await interleaved(calls, n_seq)
                    raw.append(figures["raw"])
                    seq.append(figures["wire"])
                    remote.append(figures["remote"])
                    pipe.append(await wire_pipelined(node, wire_s.port, n_pipe,
                                                     wire_s.proc.pid))
                    remote_pipe.append(await remote_pipelined(driver, targets, n_pipe // 2))
            await raw_client.stream.aclose()

        trio.run(with_client, key, run)
    finally:
        raw_s.stop()
        wire_s.stop()
        for m in members:
            m.stop()

    raw_per_s = statistics.median(r[0] for r in raw)
    raw_p50 = statistics.median(r[1] for r in raw)
    seq_per_s = statistics.median(s[0] for s in seq)
    figures = {
        "raw_trio_rtt_per_s": round(raw_per_s),
        "raw_trio_rtt_p50_us": round(raw_p50, 1),
        "wire_seq_per_s": round(seq_per_s),
        "wire_seq_p50_us": round(statistics.median(s[1] for s in seq), 1),
        "wire_seq_p99_us": round(statistics.median(s[2] for s in seq), 1),
        "wire_pipelined_per_s": round(statistics.median(p[0] for p in pipe)),
        "wire_pipelined_client_cpu_us": round(statistics.median(p[1] for p in pipe), 1),
        "wire_pipelined_server_cpu_us": round(statistics.median(p[2] for p in pipe), 1),
        "wire_seq_ratio": round(seq_per_s / raw_per_s, 3),
        "wire_seq_p50_ratio": round(raw_p50 / statistics.median(s[1] for s in seq), 3),
    }
    remote_per_s = statistics.median(r[0] for r in remote)
    figures.update({
        "remote_seq_invokes_per_s": round(remote_per_s),
        "remote_seq_p50_us": round(statistics.median(r[1] for r in remote), 1),
        "remote_seq_p99_us": round(statistics.median(r[2] for r in remote), 1),
        "remote_pipelined_invokes_per_s": round(statistics.median(remote_pipe)),
        "remote_seq_ratio": round(remote_per_s / raw_per_s, 3),
        "remote_seq_p50_ratio": round(raw_p50 / statistics.median(r[1] for r in remote), 3),
    })
    print(
        f"python {platform.python_version()}, trio {trio.__version__}, {os.cpu_count()} cpus, "
        f"{rounds} round(s), medians"
    )
    for i in range(len(raw)):
        print(
            f"  round {i + 1}: raw {raw[i][0]:,.0f}/s (p50 {raw[i][1]:.0f} us)  "
            f"wire seq {seq[i][0]:,.0f}/s "
            f"(p50 {seq[i][1]:.0f} us, p99 {seq[i][2]:.0f} us)  pipelined {pipe[i][0]:,.0f}/s "
            f"(CPU/request: client {pipe[i][1]:.1f} us, server {pipe[i][2]:.1f} us)"
        )
        print(
            f"           remote seq {remote[i][0]:,.0f}/s (p50 {remote[i][1]:.0f} us, "
            f"p99 {remote[i][2]:.0f} us)  remote pipelined {remote_pipe[i]:,.0f}/s"
        )
    for name, value in figures.items():
        print(f"{name:>28}: {value:,}")
    print(json.dumps(figures))


def _new_key() -> str:
    import base64

    return base64.b64encode(os.urandom(32)).decode()


if __name__ == "__main__":
    main()
