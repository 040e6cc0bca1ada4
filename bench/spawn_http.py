"""Spawn's HTTP protocol through a node, against a plain HTTP round trip on the same stack.

Every figure comes from separate processes on loopback, in the same run:

- Spawn path: this client (trio, the node's pooled HTTP client) POSTs an ``InvocationRequest``
  to a node process (``spawnmesh run``-like: trio, the Spawn API, memory store); the node runs
  the turn by POSTing an ``ActorInvocation`` to the Spawn-protocol host process
  (``tests/spawn_host.py``: trio + h11, Google protobuf), which answers with the new state (a
  count + 1). Two HTTP round trips per invocation. Sequential: one caller on one actor (an
  instance of the host's ``bench`` template). Concurrent: 32 callers, each on its own instance.
- raw: the same client POSTs a body of the same size to the same host process's ``/echo``
  (the body back): one HTTP round trip between two processes on the same stack.
- floor (sequential only, for the record): the same calls through a minimal proxy process built
  from the node's own HTTP server, HTTP client and protobuf turn codec, with no actor runtime
  (it keeps the count in a dict). What a Spawn invoke costs on this stack before any of the
  node's logic: the ratio the node could reach at best.

The node runs with its defaults, so it busy-polls its Spawn port's waits
(``spawn.busy_poll_us``); the floor polls the same way. The bench client and the host never
poll, so the raw round trip does not depend on the setting. ``--busy-poll-us 0`` measures the
node and the floor without it (docs/spawn-compat.md, "Benchmark").

The client alternates blocks (raw sequential, Spawn sequential, floor, raw concurrent, Spawn
concurrent) so both sides of each ratio see the same machine load; totals are summed per kind.

Trials: the whole measurement runs ``--trials`` times, each with fresh processes, because a
run's ratio depends on where the scheduler puts the four processes on the CPUs and where their
memory lands (here the sequential ratio ranged 0.34-0.43 between runs a minute apart,
with blocks inside one run steady). The figures printed, and the JSON line, are those of the
trial with the median sequential ratio, all from that one trial; every trial's ratio is listed.

Usage: python bench/spawn_http.py [--seq 4000] [--conc 8000] [--rounds 4] [--trials 7]
[--busy-poll-us N]
Prints the figures, then one JSON line. Other work on the machine makes absolute figures
noisy; the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONCURRENCY = 32
SYSTEM = "spawn-tck"
INT_URL = "type.googleapis.com/google.protobuf.Int64Value"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve_node(spawn_port: int, host_port: int, busy_poll_us: int) -> None:
    """A node with the Spawn API (memory store, clustering off), until killed."""
    import trio

    from spawnmesh.config import load_config
    from spawnmesh.node import open_node

    async def main() -> None:
        cfg = load_config(
            env={},
            overrides={
                "statestore.url": "memory://",
                "ops.port": 0,
                "cluster.enabled": False,
                "spawn.enabled": True,
                "spawn.port": spawn_port,
                "spawn.user_function_port": host_port,
                "spawn.busy_poll_us": busy_poll_us,
                "log.level": "warning",
            },
        )
        async with open_node(cfg):
            await trio.sleep_forever()

    trio.run(main)


def serve_floor(port: int, host_port: int, busy_poll_us: int) -> None:
    """The floor: a Spawn invoke relayed to the host with nothing but the node's HTTP and
    turn codec (no runtime, no registry, no metrics), until killed; it busy-polls as the node
    does."""
    import trio

    from spawnmesh.ids import ActorId
    from spawnmesh.pb.gen.spawn.actors import protocol_pb2 as pb
    from spawnmesh.spawn_compat.busypoll import BusyPoll
    from spawnmesh.spawn_compat.http_client import HttpPool
    from spawnmesh.spawn_compat.http_server import Request, Response, serve_http
    from spawnmesh.spawn_compat.turns import Parts, build_invocation, read_response

    busy_poll = BusyPoll(busy_poll_us)
    pool = HttpPool("127.0.0.1", host_port, busy_poll=busy_poll)
    states: dict[str, Parts | None] = {}

    async def handle(req: Request) -> Response:
        out = pb.InvocationResponse()
        out.status.status = pb.OK
        if req.path[-1] != "invoke":  # the host's registration
            return Response(200, pb.RegistrationResponse(status=out.status).SerializeToString())
        inv = pb.InvocationRequest.FromString(req.body)
        sid = ActorId(inv.system.name, inv.actor.id.name, inv.register_ref or None)
        value = (inv.value.type_url, inv.value.value)
        body = build_invocation(sid, inv.action_name, states.get(sid.name), {}, {}, None, value)
        status, data = await pool.post("/api/v1/actors/actions", body)
        res = read_response(data, sid, {}, 0)
        if res.has_context:
            states[sid.name] = res.state
        if res.value is not None:
            out.value.type_url, out.value.value = res.value
        return Response(status, out.SerializeToString())

    async def main() -> None:
        await serve_http(handle, "127.0.0.1", port, max_body_bytes=1 << 20, busy_poll=busy_poll)

    trio.run(main)


def start_host() -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "spawn_host.py"),
            "--proxy",
            "",
            "--port",
            "0",
            "--no-log",
        ],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("READY"):
        proc.kill()
        raise SystemExit(f"the Spawn host did not start: {line!r}")
    return proc, int(line.split()[1])


def invocation(name: str) -> bytes:
    from google.protobuf import wrappers_pb2

    from spawnmesh.pb.gen.spawn.actors import protocol_pb2 as pb

    req = pb.InvocationRequest(action_name="add", register_ref="bench")
    req.system.name = SYSTEM
    req.actor.id.name = name
    req.actor.id.system = SYSTEM
    req.value.type_url = INT_URL
    req.value.value = wrappers_pb2.Int64Value(value=1).SerializeToString()
    return req.SerializeToString()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def client(
    spawn_port: int,
    host_port: int,
    floor_port: int,
    n_seq: int,
    n_conc: int,
    rounds: int,
    pids: dict[str, int],
) -> dict[str, float]:
    import trio

    from spawnmesh.pb.gen.spawn.actors import protocol_pb2 as pb
    from spawnmesh.spawn_compat.http_client import HttpPool

    node = HttpPool("127.0.0.1", spawn_port, max_connections=CONCURRENCY)
    host = HttpPool("127.0.0.1", host_port, max_connections=CONCURRENCY)
    register = HttpPool("127.0.0.1", host_port)
    for port in (spawn_port, floor_port):  # the host registers with the node, then the floor
        status, out = await register.post(f"/debug/register?proxy=127.0.0.1:{port}", b"")
        assert status == 200 and json.loads(out)["status"] == "OK", out
    register.close()
    floor = HttpPool("127.0.0.1", floor_port)
    bodies = [invocation(f"b{i}") for i in range(CONCURRENCY)]
    paths = [f"/api/v1/system/{SYSTEM}/actors/b{i}/invoke" for i in range(CONCURRENCY)]
    raw_body = bodies[0]

    async def spawn_call(i: int) -> None:
        status, body = await node.post(paths[i], bodies[i])
        if status != 200:
            raise RuntimeError(f"invoke failed: {pb.InvocationResponse.FromString(body)}")

    async def floor_call(i: int) -> None:
        status, body = await floor.post(paths[i], bodies[i])
        if status != 200:
            raise RuntimeError(f"floor invoke failed: {body!r}")

    async def raw_call(i: int) -> None:
        status, body = await host.post("/echo", raw_body)
        if status != 200 or len(body) != len(raw_body):
            raise RuntimeError("echo failed")

    cpu: dict[str, float] = {}

    async def block(call: Any, n: int, workers: int, kind: str = "") -> float:
        per = n // workers

        async def worker(i: int) -> None:
            for _ in range(per):
                await call(i)

        before = {k: cpu_s(pid) for k, pid in pids.items()}
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(workers):
                nursery.start_soon(worker, i)
        rate = (per * workers) / (time.perf_counter() - t0) if per else 0.0
        for k, pid in pids.items() if kind else ():  # CPU per call, summed per kind
            key = f"{kind}_{k}_cpu_us"
            cpu[key] = cpu.get(key, 0.0) + (cpu_s(pid) - before[k]) * 1e6 / (per * workers)
        return rate

    for warm in (raw_call, spawn_call, floor_call):  # connections, activations, caches
        await block(warm, 200, CONCURRENCY)
    totals: dict[str, list[float]] = {
        "raw_seq": [],
        "spawn_seq": [],
        "floor_seq": [],
        "raw_conc": [],
        "spawn_conc": [],
    }
    for _ in range(rounds):
        totals["raw_seq"].append(await block(raw_call, n_seq // rounds, 1, "raw"))
        totals["spawn_seq"].append(await block(spawn_call, n_seq // rounds, 1, "spawn"))
        totals["floor_seq"].append(await block(floor_call, n_seq // rounds, 1, "floor"))
        totals["raw_conc"].append(await block(raw_call, n_conc // rounds, CONCURRENCY))
        totals["spawn_conc"].append(await block(spawn_call, n_conc // rounds, CONCURRENCY))
    node.close()
    host.close()
    floor.close()

    def mean(xs: list[float]) -> float:  # rate over equal work: harmonic mean of the blocks
        return len(xs) / sum(1 / x for x in xs)

    out_rates = {k: mean(v) for k, v in totals.items()}
    out_rates["body_bytes"] = len(raw_body)
    out_rates.update({k: v / rounds for k, v in cpu.items()})
    return out_rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--seq", type=int, default=4000, help="sequential calls per kind")
    p.add_argument("--conc", type=int, default=8000, help="concurrent calls per kind")
    p.add_argument("--rounds", type=int, default=4, help="interleaved blocks per kind")
    p.add_argument(
        "--trials", type=int, default=7, help="runs with fresh processes (the median is kept)"
    )
    p.add_argument(
        "--busy-poll-us",
        type=int,
        help="the node's spawn.busy_poll_us (and the floor's; default: the setting's default); "
        "0 turns busy-polling off",
    )
    p.add_argument("--serve-node", nargs=3, type=int, help=argparse.SUPPRESS)
    p.add_argument("--serve-floor", nargs=3, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.busy_poll_us is None:
        from spawnmesh.config import SpawnConfig

        args.busy_poll_us = SpawnConfig().busy_poll_us
    if args.serve_node:
        serve_node(*args.serve_node)
        return
    if args.serve_floor:
        serve_floor(*args.serve_floor)
        return
    trials = [trial(args) for _ in range(args.trials)]
    # every figure comes from one trial (both sides of a ratio from the same processes): the
    # trial whose sequential ratio is the median
    by_ratio = sorted(trials, key=lambda r: r["spawn_seq"] / r["raw_seq"])
    rates = by_ratio[len(by_ratio) // 2]
    seq_ratios = [round(r["spawn_seq"] / r["raw_seq"], 3) for r in trials]
    floor_ratios = [round(r["floor_seq"] / r["raw_seq"], 3) for r in trials]
    load = os.getloadavg()[0]
    seq_ratio = rates["spawn_seq"] / rates["raw_seq"]
    floor_ratio = rates["floor_seq"] / rates["raw_seq"]
    conc_ratio = rates["spawn_conc"] / rates["raw_conc"]
    print(
        f"body {rates['body_bytes']:.0f} bytes; {args.trials} trials of {args.rounds} "
        f"interleaved rounds; load average {load:.1f} on {os.cpu_count()} CPUs; node and floor "
        f"busy-poll {args.busy_poll_us} us"
    )
    print(f"sequential ratio per trial: {seq_ratios}  (floor: {floor_ratios})")
    print("the median trial:")
    print(
        f"sequential  Spawn invoke via node and host {rates['spawn_seq']:8.0f}/s   "
        f"raw HTTP round trip {rates['raw_seq']:8.0f}/s   ratio {seq_ratio:.2f}"
    )
    print(
        f"sequential  floor: the same via a minimal proxy (the node's HTTP and turn codec, no "
        f"runtime) {rates['floor_seq']:8.0f}/s   ratio {floor_ratio:.2f}"
    )
    print(
        f"32 callers  Spawn invoke via node and host {rates['spawn_conc']:8.0f}/s   "
        f"raw HTTP round trip {rates['raw_conc']:8.0f}/s   ratio {conc_ratio:.2f}"
    )
    print(
        "CPU per sequential call (us, from /proc): Spawn path: client "
        f"{rates['spawn_client_cpu_us']:.0f} + node {rates['spawn_node_cpu_us']:.0f} + host "
        f"{rates['spawn_host_cpu_us']:.0f};  raw: client {rates['raw_client_cpu_us']:.0f} + "
        f"host {rates['raw_host_cpu_us']:.0f};  floor: client {rates['floor_client_cpu_us']:.0f} + "
        f"floor {rates['floor_floor_cpu_us']:.0f} + host {rates['floor_host_cpu_us']:.0f}"
    )
    print(
        json.dumps(
            {
                "spawn_http_seq_invokes_per_s": round(rates["spawn_seq"]),
                "spawn_http_conc_invokes_per_s": round(rates["spawn_conc"]),
                "raw_http_roundtrip_per_s": round(rates["raw_seq"]),
                "raw_http_conc_roundtrip_per_s": round(rates["raw_conc"]),
                "spawn_seq_ratio": round(seq_ratio, 3),
                "spawn_conc_ratio": round(conc_ratio, 3),
                "spawn_seq_ratio_trials": seq_ratios,
                "floor_seq_invokes_per_s": round(rates["floor_seq"]),
                "floor_seq_ratio": round(floor_ratio, 3),
                "floor_seq_ratio_trials": floor_ratios,
                "node_cpu_us_per_invoke": round(rates["spawn_node_cpu_us"]),
                "floor_cpu_us_per_invoke": round(rates["floor_floor_cpu_us"]),
                "host_cpu_us_per_turn": round(rates["spawn_host_cpu_us"]),
                "raw_host_cpu_us_per_roundtrip": round(rates["raw_host_cpu_us"]),
                "client_cpu_us_spawn_raw": [
                    round(rates["spawn_client_cpu_us"]),
                    round(rates["raw_client_cpu_us"]),
                ],
                "busy_poll_us": args.busy_poll_us,
                "cpus": os.cpu_count(),
                "load_avg": round(load, 1),
            }
        )
    )


def trial(args: argparse.Namespace) -> dict[str, float]:
    """One trial: fresh host, node and floor processes, the client's interleaved blocks."""
    import trio

    host, host_port = start_host()
    spawn_port, floor_port = free_port(), free_port()
    node, floor = (
        subprocess.Popen(
            [sys.executable, __file__, flag, str(port), str(host_port), str(args.busy_poll_us)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
        for flag, port in (("--serve-node", spawn_port), ("--serve-floor", floor_port))
    )
    try:
        deadline = time.monotonic() + 30
        for port, proc in ((spawn_port, node), (floor_port, floor)):
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("the node (or the floor proxy) did not start") from None
                    time.sleep(0.05)
        pids = {"node": node.pid, "floor": floor.pid, "host": host.pid, "client": os.getpid()}
        rates: dict[str, float] = trio.run(
            client, spawn_port, host_port, floor_port, args.seq, args.conc, args.rounds, pids
        )
    finally:
        for proc in (node, floor, host):
            proc.terminate()
            proc.wait()
    print(
        f"trial: sequential ratio {rates['spawn_seq'] / rates['raw_seq']:.3f}, floor "
        f"{rates['floor_seq'] / rates['raw_seq']:.3f}, 32 callers "
        f"{rates['spawn_conc'] / rates['raw_conc']:.3f}",
        flush=True,
    )
    return rates


if __name__ == "__main__":
    main()
