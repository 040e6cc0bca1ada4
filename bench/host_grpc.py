"""Invocations of a host actor through a node over gRPC, against a plain grpclib echo.

Every figure comes from separate processes on loopback, in the same run:

- host path: a client process (plain asyncio, grpclib) calls NodeService.Invoke on a node
  process (trio, host API on the given bridge); the node hands the turn to the betterproto2 /
  grpclib example host process over its Connect stream; the host replies with the new state
  (a cart line's quantity + 1). So each invocation crosses gRPC twice. Sequential: one caller,
  one cart. Concurrent: 32 callers, each on its own cart.
- raw: a plain grpclib unary echo of a 200-byte message between two asyncio processes.

Usage: python bench/host_grpc.py [--seq 2000] [--conc 6000] [--bridges thread,trio-asyncio]
Prints the figures, then one JSON line (the headline host figures use the first bridge).
Other work on the machine makes absolute figures noisy; the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONCURRENCY = 32
ECHO_PATH = "/bench.Echo/Echo"


# ---------------------------------------------------------------------------- processes


def serve_echo(port_file: str) -> None:
    """A plain asyncio grpclib server echoing JSONType messages."""
    import grpclib.const
    import grpclib.server

    from spawnmesh.host.gen.spawn import JsonType

    class Echo:
        def __mapping__(self) -> dict[str, grpclib.const.Handler]:
            return {
                ECHO_PATH: grpclib.const.Handler(
                    self.echo, grpclib.const.Cardinality.UNARY_UNARY, JsonType, JsonType
                )
            }

        async def echo(self, stream: Any) -> None:
            await stream.send_message(await stream.recv_message())

    async def main() -> None:
        server = grpclib.server.Server([Echo()])
        await server.start("127.0.0.1", 0)
        port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        Path(port_file).write_text(str(port))  # noqa: ASYNC240 (once, at start-up)
        await server.wait_closed()

    asyncio.run(main())


def serve_node(port_file: str, bridge: str) -> None:
    """A spawnmesh node with the host API on a free port (memory store, no gossip)."""
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
                "host.enabled": True,
                "host.port": 0,
                "host.bridge": bridge,
                "log.level": "warning",
            },
        )
        async with open_node(cfg) as node:
            Path(port_file).write_text(str(node.host_api.port))  # noqa: ASYNC240 (once)
            await trio.sleep_forever()

    trio.run(main)


async def measure(call: Any, n_seq: int, n_conc: int) -> tuple[float, float]:
    """(sequential calls/s, 32-concurrent calls/s) of ``call(worker_index)``."""
    for _ in range(200):
        await call(0)
    t0 = time.perf_counter()
    for _ in range(n_seq):
        await call(0)
    seq = n_seq / (time.perf_counter() - t0)
    left = [n_conc]

    async def worker(i: int) -> None:
        while left[0] > 0:
            left[0] -= 1
            await call(i)

    await asyncio.gather(*(call(i) for i in range(CONCURRENCY)))  # warm every cart
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    return seq, n_conc / (time.perf_counter() - t0)


def client_echo(port: int, n_seq: int, n_conc: int) -> None:
    import grpclib.client
    import grpclib.const

    from spawnmesh.host.gen.spawn import JsonType

    async def main() -> None:
        channel = grpclib.client.Channel("127.0.0.1", port)
        msg = JsonType(content="x" * 197)  # 200 bytes encoded
        assert len(bytes(msg)) == 200

        async def call(_: int) -> None:
            async with channel.request(
                ECHO_PATH, grpclib.const.Cardinality.UNARY_UNARY, JsonType, JsonType
            ) as st:
                await st.send_message(msg, end=True)
                await st.recv_message()
                await st.recv_trailing_metadata()

        seq, conc = await measure(call, n_seq, n_conc)
        channel.close()
        print(json.dumps({"seq": seq, "conc": conc}))

    asyncio.run(main())


def client_invoke(port: int, n_seq: int, n_conc: int) -> None:
    import grpclib.client

    from spawnmesh.host.gen import spawn
    from spawnmesh.host.gen.google.protobuf import Any as AnyMsg
    from spawnmesh.host.gen.message_pool import default_message_pool
    from spawnmesh.host.gen.spawn import actors as pb
    from spawnmesh.host.gen.spawnmesh import v1
    from spawnmesh.host.gen.spawnmesh.tck.v1 import LineItem

    async def main() -> None:
        channel = grpclib.client.Channel("127.0.0.1", port)
        stub = v1.NodeServiceStub(channel)
        item = AnyMsg.pack(LineItem(sku="tea", qty=1, price_cents=4), default_message_pool)
        reqs = [
            spawn.InvocationRequest(
                system=pb.ActorSystem(name="tck"),
                action_name="add_item",
                value=item,
                actor=pb.Actor(id=pb.ActorId(name=f"bench-cart-{i}", system="tck", parent="cart")),
            )
            for i in range(CONCURRENCY)
        ]

        async def call(i: int) -> None:
            await stub.invoke(reqs[i], timeout=30)

        seq, conc = await measure(call, n_seq, n_conc)
        channel.close()
        print(json.dumps({"seq": seq, "conc": conc}))

    asyncio.run(main())


# ---------------------------------------------------------------------------- orchestration


def _start(args: list[str], tmp: Path, name: str) -> tuple[subprocess.Popen[bytes], int]:
    port_file = tmp / f"{name}.port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, *args, str(port_file)], cwd=ROOT)
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{name} did not start")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def _client(mode: str, port: int, n_seq: int, n_conc: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, mode, str(port), str(n_seq), str(n_conc)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_raw(tmp: Path, n_seq: int, n_conc: int) -> dict[str, float]:
    server, port = _start(["echo-server"], tmp, "echo")
    try:
        return _client("echo-client", port, n_seq, n_conc)
    finally:
        server.kill()
        server.wait()


def run_host(tmp: Path, bridge: str, n_seq: int, n_conc: int) -> dict[str, float]:
    node, port = _start(["node", bridge], tmp, f"node-{bridge}")
    host = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples/hosts/grpclib_host.py"),
            "--node",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert host.stdout is not None
        line = host.stdout.readline()
        if b"registered" not in line:
            raise RuntimeError(f"host did not register: {line!r}")
        return _client("invoke-client", port, n_seq, n_conc)
    finally:
        for p in (host, node):
            p.kill()
            p.wait()


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "echo-server":
        return serve_echo(sys.argv[2])
    if mode == "node":
        return serve_node(sys.argv[3], sys.argv[2])
    if mode in ("echo-client", "invoke-client"):
        fn = client_echo if mode == "echo-client" else client_invoke
        return fn(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    p = argparse.ArgumentParser(description="host actor invocations over gRPC vs raw grpclib")
    p.add_argument("--seq", type=int, default=2000)
    p.add_argument("--conc", type=int, default=6000)
    p.add_argument("--bridges", default="thread,trio-asyncio")
    p.add_argument("--rounds", type=int, default=1, help="repeat and keep each figure's best")
    args = p.parse_args()
    import tempfile

    bridges = [b for b in args.bridges.split(",") if b]
    best: dict[str, float] = {}

    def keep(key: str, value: float) -> None:
        best[key] = max(best.get(key, 0.0), value)

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for rnd in range(args.rounds):
            raw = run_raw(tmp, args.seq, args.conc)
            keep("raw_seq", raw["seq"])
            keep("raw_conc", raw["conc"])
            print(
                f"round {rnd + 1}: raw grpclib echo   seq {raw['seq']:8.0f}/s   "
                f"conc({CONCURRENCY}) {raw['conc']:8.0f}/s",
                flush=True,
            )
            for b in bridges:
                r = run_host(tmp, b, args.seq, args.conc)
                keep(f"{b}_seq", r["seq"])
                keep(f"{b}_conc", r["conc"])
                print(
                    f"round {rnd + 1}: host via {b:13s} seq {r['seq']:8.0f}/s   "
                    f"conc({CONCURRENCY}) {r['conc']:8.0f}/s",
                    flush=True,
                )
    head = bridges[0]
    out: dict[str, Any] = {
        "bridge": head,
        "host_seq_invokes_per_s": round(best[f"{head}_seq"]),
        "host_conc_invokes_per_s": round(best[f"{head}_conc"]),
        "raw_grpclib_seq_per_s": round(best["raw_seq"]),
        "raw_grpclib_conc_per_s": round(best["raw_conc"]),
        "host_seq_ratio": round(best[f"{head}_seq"] / best["raw_seq"], 3),
        "host_conc_ratio": round(best[f"{head}_conc"] / best["raw_conc"], 3),
    }
    for b in bridges[1:]:
        key = b.replace("-", "_")
        out[f"{key}_seq_invokes_per_s"] = round(best[f"{b}_seq"])
        out[f"{key}_conc_invokes_per_s"] = round(best[f"{b}_conc"])
    out["cpus"] = os.cpu_count()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
