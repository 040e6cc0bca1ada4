"""Invocations of a host actor through a node over gRPC, against a plain grpclib echo.

Every figure comes from separate processes on loopback, in the same run:

- host path: a client process (plain asyncio, grpclib) calls NodeService.Invoke on a node
  process (trio, host API on the given bridge); the node hands the turn to a host process over
  its Connect stream; the host replies with the new state (a cart line's quantity + 1). So each
  invocation crosses gRPC twice. Sequential: one caller, one cart. Concurrent: 32 callers, each
  on its own cart. Two hosts, both grpclib on asyncio, differing only in their message codec:
  ``upb`` (this file's host, Google protobuf messages generated from spec/) and
  ``betterproto2`` (examples/hosts/grpclib_host.py, betterproto2's pure-Python codec, which
  costs that host about 150 us per turn more).
- raw: a plain grpclib unary echo of a 200-byte message between two asyncio processes.

The client makes both kinds of call the same way (``Channel.request``, no deadline), with Google
protobuf messages for the invocations: what the client's codec costs is the client's, not the
mesh's. One client process alternates blocks of raw echo calls and host invocations (250
sequential, then 1,000 with 32 callers), so both sides of each ratio see the same machine load.

Usage: python bench/host_grpc.py [--seq 2000] [--conc 6000] [--bridges stepped,thread]
                                 [--hosts upb,betterproto2]
Prints the figures, then one JSON line (the headline uses the first bridge and the first host).
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
INVOKE_PATH = "/spawnmesh.v1.NodeService/Invoke"
HOSTS = {
    "upb": [sys.executable, __file__, "upb-host"],
    "betterproto2": [sys.executable, str(ROOT / "examples/hosts/grpclib_host.py"), "--node"],
}


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


def serve_upb_host(node_port: int) -> None:
    """A host on grpclib + Google protobuf messages: registers the "tck" system over a Connect
    stream (the example host's registration) and runs cart turns, one asyncio task per turn as
    the example host does. Prints "registered tck" once the node accepted it."""
    import grpclib.client
    import grpclib.const

    sys.path.insert(0, str(ROOT / "examples" / "hosts"))
    from grpclib_host import registration  # type: ignore[import-not-found]

    from spawnmesh.pb.gen.spawnmesh.tck.v1 import tck_pb2
    from spawnmesh.pb.gen.spawnmesh.v1 import host_pb2

    prefix = "type.googleapis.com/"
    cart_url, value_url = (prefix + m.DESCRIPTOR.full_name for m in (tck_pb2.Cart, tck_pb2.Value))

    def add_item(turn: Any, out: Any) -> None:
        inv = turn.invocation
        res = out.result
        res.id = turn.id
        cart = tck_pb2.Cart()
        state = inv.current_context.state
        if state.value:
            cart.ParseFromString(state.value)
        item = tck_pb2.LineItem.FromString(inv.value.value)
        for line in cart.items:
            if line.sku == item.sku:
                line.qty += item.qty
                break
        else:
            cart.items.append(item)
        resp = res.response
        resp.actor_name = inv.actor.name
        resp.actor_system = inv.actor.system
        new = resp.updated_context.state
        new.type_url = cart_url
        new.value = cart.SerializeToString()
        resp.value.type_url = value_url
        resp.value.value = tck_pb2.Value(n=len(cart.items)).SerializeToString()

    async def main() -> None:
        channel = grpclib.client.Channel("127.0.0.1", node_port)
        async with channel.request(
            "/spawnmesh.v1.NodeService/Connect",
            grpclib.const.Cardinality.STREAM_STREAM,
            host_pb2.HostMessage,
            host_pb2.NodeMessage,
        ) as stream:
            hello = host_pb2.HostMessage()
            hello.register.ParseFromString(bytes(registration("tck")))
            await stream.send_message(hello)
            first = await stream.recv_message()
            assert first is not None and first.WhichOneof("kind") == "registered"
            print("registered tck", flush=True)
            lock = asyncio.Lock()

            async def answer(turn: Any) -> None:
                out = host_pb2.HostMessage()
                add_item(turn, out)
                async with lock:
                    await stream.send_message(out)

            tasks = set()
            async for msg in stream:
                if msg.WhichOneof("kind") == "turn":
                    task = asyncio.create_task(answer(msg.turn))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

    asyncio.run(main())


def client_mixed(echo_port: int, node_port: int, n_seq: int, n_conc: int) -> None:
    """Alternate blocks of raw echo calls and host invocations (sequential, then with 32
    concurrent callers), so both sides see the same machine load; print their rates."""
    import grpclib.client
    import grpclib.const

    from spawnmesh.host.gen.spawn import JsonType
    from spawnmesh.pb.gen.spawn.actors import protocol_pb2 as proto
    from spawnmesh.pb.gen.spawnmesh.tck.v1 import tck_pb2

    unary = grpclib.const.Cardinality.UNARY_UNARY

    async def main() -> None:
        echo_ch = grpclib.client.Channel("127.0.0.1", echo_port)
        node_ch = grpclib.client.Channel("127.0.0.1", node_port)
        msg = JsonType(content="x" * 197)  # 200 bytes encoded
        assert len(bytes(msg)) == 200
        item = tck_pb2.LineItem(sku="tea", qty=1, price_cents=4)
        reqs = []
        for i in range(CONCURRENCY):
            req = proto.InvocationRequest(action_name="add_item")
            req.system.name = "tck"
            req.actor.id.name, req.actor.id.system = f"bench-cart-{i}", "tck"
            req.actor.id.parent = "cart"
            req.value.Pack(item)
            reqs.append(req)

        async def echo(_: int) -> None:
            async with echo_ch.request(ECHO_PATH, unary, JsonType, JsonType) as st:
                await st.send_message(msg, end=True)
                await st.recv_message()
                await st.recv_trailing_metadata()

        async def invoke(i: int) -> None:
            async with node_ch.request(
                INVOKE_PATH, unary, proto.InvocationRequest, proto.InvocationResponse
            ) as st:
                await st.send_message(reqs[i], end=True)
                await st.recv_message()
                await st.recv_trailing_metadata()

        async def block(call: Any, n: int, workers: int) -> float:
            left = [n]

            async def worker(i: int) -> None:
                while left[0] > 0:
                    left[0] -= 1
                    await call(i)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(i) for i in range(workers)))
            return time.perf_counter() - t0

        for call in (echo, invoke):  # warm up: connections, every cart activated
            await block(call, 200, 1)
            await asyncio.gather(*(call(i) for i in range(CONCURRENCY)))
        spent = {"raw_seq": 0.0, "host_seq": 0.0, "raw_conc": 0.0, "host_conc": 0.0}
        for kind, total, workers, step in (("seq", n_seq, 1, 250), ("conc", n_conc, 32, 1000)):
            for _ in range(max(1, total // step)):
                spent[f"raw_{kind}"] += await block(echo, step, workers)
                spent[f"host_{kind}"] += await block(invoke, step, workers)
        rounds = {"seq": max(1, n_seq // 250) * 250, "conc": max(1, n_conc // 1000) * 1000}
        echo_ch.close()
        node_ch.close()
        print(json.dumps({k: rounds[k.split("_")[1]] / v for k, v in spent.items()}))

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


def _client(echo_port: int, node_port: int, n_seq: int, n_conc: int) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "client",
            str(echo_port),
            str(node_port),
            str(n_seq),
            str(n_conc),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_pair(
    tmp: Path, echo_port: int, bridge: str, host_kind: str, n_seq: int, n_conc: int
) -> dict[str, float]:
    """Node (on ``bridge``) + a host; the client alternates raw and host blocks."""
    node, port = _start(["node", bridge], tmp, f"node-{bridge}")
    host = subprocess.Popen(
        [*HOSTS[host_kind], f"127.0.0.1:{port}"], cwd=ROOT, stdout=subprocess.PIPE
    )
    try:
        assert host.stdout is not None
        line = host.stdout.readline()
        if b"registered" not in line:
            raise RuntimeError(f"host did not register: {line!r}")
        return _client(echo_port, port, n_seq, n_conc)
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
    if mode == "client":
        return client_mixed(*(int(a) for a in sys.argv[2:6]))
    if mode == "upb-host":
        return serve_upb_host(int(sys.argv[2].rpartition(":")[2]))
    p = argparse.ArgumentParser(description="host actor invocations over gRPC vs raw grpclib")
    p.add_argument("--seq", type=int, default=2000)
    p.add_argument("--conc", type=int, default=6000)
    p.add_argument("--bridges", default="stepped,thread")
    p.add_argument("--hosts", default="upb,betterproto2")
    args = p.parse_args()
    import tempfile

    bridges = [b for b in args.bridges.split(",") if b]
    hosts = [h for h in args.hosts.split(",") if h]
    runs = [(bridges[0], h) for h in hosts] + [(b, hosts[0]) for b in bridges[1:]]
    res: dict[tuple[str, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        echo, echo_port = _start(["echo-server"], tmp, "echo")
        try:
            for b, h in runs:
                r = res[b, h] = run_pair(tmp, echo_port, b, h, args.seq, args.conc)
                print(
                    f"{b:12s} bridge, {h:12s} host: seq {r['host_seq']:5.0f}/s vs raw echo "
                    f"{r['raw_seq']:5.0f}/s ({r['host_seq'] / r['raw_seq']:.3f});  "
                    f"conc({CONCURRENCY}) {r['host_conc']:5.0f}/s vs raw "
                    f"{r['raw_conc']:5.0f}/s ({r['host_conc'] / r['raw_conc']:.3f})",
                    flush=True,
                )
        finally:
            echo.kill()
            echo.wait()
    head = res[runs[0]]
    out: dict[str, Any] = {
        "bridge": bridges[0],
        "host": hosts[0],
        "host_seq_invokes_per_s": round(head["host_seq"]),
        "host_conc_invokes_per_s": round(head["host_conc"]),
        "raw_grpclib_seq_per_s": round(head["raw_seq"]),
        "raw_grpclib_conc_per_s": round(head["raw_conc"]),
        "host_seq_ratio": round(head["host_seq"] / head["raw_seq"], 3),
        "host_conc_ratio": round(head["host_conc"] / head["raw_conc"], 3),
    }
    for (b, h), r in list(res.items())[1:]:
        key = (h if b == bridges[0] else f"{b}_bridge").replace("-", "_")
        out[f"{key}_host_seq_ratio"] = round(r["host_seq"] / r["raw_seq"], 3)
        out[f"{key}_host_conc_ratio"] = round(r["host_conc"] / r["raw_conc"], 3)
    out["cpus"] = os.cpu_count()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
