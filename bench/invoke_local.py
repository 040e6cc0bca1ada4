"""Local invocation benchmark: the SDK embedded in one process (the node issue's figures).

Prints figures, then one JSON line: seq_invokes_per_s, seq_p50_us, seq_p99_us,
concurrent_invokes_per_s (64 callers over 10,000 actors), activations_per_s and
bytes_per_idle_actor (RSS growth per activated idle stateful actor with ~100 bytes of state,
over 200,000 actors, measured in a fresh subprocess).

    python bench/invoke_local.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import trio

from spawnmesh import ActorSystem, Context, WriteBehind, action, open_node
from spawnmesh.config import load_config


@dataclass
class Note:
    """~100 bytes of state: a counter and a 90-character note."""

    value: int = 0
    note: str = "n" * 90


def build_system() -> ActorSystem:
    bench = ActorSystem("bench")

    @bench.actor("note", kind="unnamed", state=Note, snapshot=WriteBehind(every_ms=100))
    class NoteActor:
        @action
        async def bump(self, ctx: Context[Note], n: int) -> int:
            ctx.state = Note(ctx.state.value + n, ctx.state.note)
            return ctx.state.value

        @action
        async def touch(self, ctx: Context[Note]) -> None:
            return None

    return bench


def config() -> object:
    return load_config(
        overrides={"statestore.url": "memory://", "ops.port": 0,
                   "actors.deactivate_after_ms": 3_600_000},
        env={},
    )


async def seq(node: object, n: int) -> tuple[float, float, float]:
    ref = node.ref("bench", "seq-actor", parent="note")  # type: ignore[attr-defined]
    for _ in range(2000):
        await ref.invoke("bump", 1)
    lat: list[int] = []
    perf = time.perf_counter_ns
    t0 = time.perf_counter()
    for _ in range(n):
        s = perf()
        await ref.invoke("bump", 1)
        lat.append(perf() - s)
    dt = time.perf_counter() - t0
    lat.sort()
    return n / dt, lat[len(lat) // 2] / 1000, lat[int(len(lat) * 0.99)] / 1000


async def concurrent(node: object, n_actors: int, callers: int, per_caller: int) -> float:
    refs = [node.ref("bench", f"c-{i}", parent="note") for i in range(n_actors)]  # type: ignore[attr-defined]
    async with trio.open_nursery() as nursery:  # activate all first
        for i in range(callers):
            nursery.start_soon(_touch_all, refs[i::callers])

    async def caller(k: int) -> None:
        r = refs
        m = len(r)
        for j in range(per_caller):
            await r[(k * 7919 + j * 31) % m].invoke("bump", 1)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k in range(callers):
            nursery.start_soon(caller, k)
    return callers * per_caller / (time.perf_counter() - t0)


async def _touch_all(refs: list[object]) -> None:
    for r in refs:
        await r.invoke("touch")  # type: ignore[attr-defined]


async def activations(node: object, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        await node.ref("bench", f"act-{i}", parent="note").invoke("touch")  # type: ignore[attr-defined]
    return n / (time.perf_counter() - t0)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def memory_part(n: int) -> None:
    async with open_node(config(), build_system()) as node:  # type: ignore[arg-type]
        for i in range(1000):  # warm up allocator and code paths
            await node.ref("bench", f"warm-{i}", parent="note").invoke("bump", 1)
        await trio.sleep(0.3)
        gc.collect()
        before = rss_bytes()
        for i in range(n):
            await node.ref("bench", f"m-{i}", parent="note").invoke("bump", 1)
        await trio.sleep(0.3)  # let write-behind flush: the stored copy counts too
        gc.collect()
        after = rss_bytes()
        assert node.runtime.active_count() >= n
        print(json.dumps({"bytes_per_idle_actor": (after - before) / n}))


async def main(quick: bool) -> dict[str, float]:
    n_seq = 50_000 if quick else 300_000
    async with open_node(config(), build_system()) as node:  # type: ignore[arg-type]
        rate, p50, p99 = await seq(node, n_seq)
        print(f"sequential: {rate:,.0f} invokes/s  p50 {p50:.1f} us  p99 {p99:.1f} us")
        conc = await concurrent(node, 10_000, 64, 1_000 if quick else 5_000)
        print(f"concurrent (64 callers, 10,000 actors): {conc:,.0f} invokes/s")
        acts = await activations(node, 20_000 if quick else 100_000)
        print(f"activations: {acts:,.0f}/s")
        store = node.store
        print(f"state writes to the memory store: {store.writes:,} in {store.batches:,} batches")  # type: ignore[attr-defined]
    return {"seq_invokes_per_s": rate, "seq_p50_us": p50, "seq_p99_us": p99,
            "concurrent_invokes_per_s": conc, "activations_per_s": acts}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--memory-part", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_part:
        trio.run(memory_part, args.memory_part)
        sys.exit(0)
    py = platform.python_version()
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, Python {py}")
    results = trio.run(main, args.quick)
    n_mem = 50_000 if args.quick else 200_000
    out = subprocess.run([sys.executable, __file__, "--memory-part", str(n_mem)],
                         check=True, capture_output=True, text=True).stdout
    mem = json.loads(out.strip().splitlines()[-1])
    print(f"memory: {mem['bytes_per_idle_actor']:.0f} bytes per idle actor over {n_mem:,} actors")
    results.update(mem)
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))
