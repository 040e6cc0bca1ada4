"""What the Spawn port's busy-polling costs a node that is idle or called at a steady pace.

``bench/spawn_http.py`` measures what busy-polling (``spawn.busy_poll_us``) buys a caller that
calls back to back; this measures its cost where it buys little: the node's CPU (user + system,
from ``/proc``) while idle, and while one caller invokes at a fixed pace (100 and 1,000 calls
per second, sequential), with busy-polling at the given bound and off, alternating, in fresh
node and host processes each time (the same node and Spawn-protocol host as spawn_http.py).

Usage: python bench/spawn_busy_poll_cost.py [--busy-poll-us 200] [--seconds 5] [--runs 2]
Prints each run's figures, then one JSON line (per setting: the mean share of a core, and
the CPU microseconds per call).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import spawn_http as sh  # noqa: E402  (the node, host and client pieces of the main bench)

RATES = (100, 1000)


def measure(busy_poll_us: int, seconds: float) -> dict[str, float]:
    """Node CPU idle and at each paced rate, in one fresh node + host pair."""
    import trio

    host, host_port = sh.start_host()
    port = sh.free_port()
    node = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "spawn_http.py"), "--serve-node", str(port),
         str(host_port), str(busy_poll_us)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:  # the node is up once its Spawn port accepts
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or node.poll() is not None:
                raise SystemExit("the node did not start") from None
            time.sleep(0.05)
    out: dict[str, float] = {}

    async def run() -> None:
        from spawnmesh.spawn_compat.http_client import HttpPool

        register = HttpPool("127.0.0.1", host_port)
        status, text = await register.post(f"/debug/register?proxy=127.0.0.1:{port}", b"")
        if status != 200 or json.loads(text).get("status") != "OK":
            raise SystemExit(f"the host did not register: {text!r}")
        register.close()
        pool = HttpPool("127.0.0.1", port)
        body = sh.invocation("b0")
        path = f"/api/v1/system/{sh.SYSTEM}/actors/b0/invoke"
        for _ in range(200):  # connections, the activation, caches
            await pool.post(path, body)
        before = sh.cpu_s(node.pid)
        await trio.sleep(seconds)
        out["idle_core_share"] = (sh.cpu_s(node.pid) - before) / seconds
        for rate in RATES:
            n = int(rate * seconds)
            before = sh.cpu_s(node.pid)
            t0 = time.perf_counter()
            for i in range(n):
                status, _ = await pool.post(path, body)
                if status != 200:
                    raise SystemExit(f"invoke failed: HTTP {status}")
                delay = t0 + (i + 1) / rate - time.perf_counter()
                if delay > 0:
                    await trio.sleep(delay)
            cpu = sh.cpu_s(node.pid) - before
            out[f"{rate}_per_s_core_share"] = cpu / (time.perf_counter() - t0)
            out[f"{rate}_per_s_cpu_us_per_call"] = cpu * 1e6 / n
        pool.close()

    try:
        trio.run(run)
    finally:
        for proc in (node, host):
            proc.terminate()
            proc.wait()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--busy-poll-us", type=int, default=None,
                   help="the bound compared with 0 (default: the setting's default)")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    p.add_argument("--runs", type=int, default=2, help="alternated runs of each setting")
    args = p.parse_args()
    if args.busy_poll_us is None:
        from spawnmesh.config import SpawnConfig

        args.busy_poll_us = SpawnConfig().busy_poll_us
    settings = (args.busy_poll_us, 0)
    results: dict[int, list[dict[str, float]]] = {s: [] for s in settings}
    for _ in range(args.runs):
        for s in settings:
            r = measure(s, args.seconds)
            results[s].append(r)
            print(
                f"busy-poll {s:4d} us: idle {r['idle_core_share']:.1%} of a core; "
                + "; ".join(
                    f"{rate}/s {r[f'{rate}_per_s_core_share']:.1%} "
                    f"({r[f'{rate}_per_s_cpu_us_per_call']:.0f} us/call)"
                    for rate in RATES
                ),
                flush=True,
            )
    summary = {
        f"busy_poll_{s}us": {
            k: round(sum(r[k] for r in rs) / len(rs), 4) for k in rs[0]
        }
        for s, rs in results.items()
    }
    print(json.dumps({**summary, "cpus": os.cpu_count(), "load_avg":
                      round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
