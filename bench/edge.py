"""The node on a small device: cold start to ready, idle RSS and idle CPU of a one-node cluster,
and (``--load-s``) RSS and CPU under load, the figures behind k8s/ resource requests.

    python bench/edge.py [--exe dist/spawnmesh-x86_64] [--idle-s 45] [--warm 3] [--load-s 20]

The node is ``EXE run`` with an embedded SQLite statestore (encrypted), membership on (a
one-node cluster: gossip and peer ports bound, probing nobody), the example actors, logs at
warning. Measured:

* ``cold_first_s``: process start until ``/readyz`` answers 200, the first run of a freshly
  built pex (its ``PEX_ROOT`` is a new empty directory, so the pex unpacks its venv first);
  ``cold_warm_s``: the median of ``--warm`` later runs (venv already unpacked). The OS page cache
  is warm in both (dropping it would disturb everything else on the machine). ``*_cpu_s``: the
  CPU time the process used until ready, which is what the start takes on an idle core (on
  this shared machine the wall time also counts waiting for a core);
* ``idle_rss_mb``: resident set of the node's process tree after ``--idle-s`` of idleness,
  with ``idle_pss_mb`` (shared library pages divided among their users) beside it;
* ``idle_cpu_pct``: user+system CPU time of the process tree over ``--idle-s``, in % of one core;
* with ``--load-s``: ``load_calls_per_s`` (4 keep-alive HTTP clients through the ops API: a
  write-through counter and a pooled worker), ``load_cpu_pct`` and ``load_rss_mb`` (peak
  resident set).

Targets (issue 8): ready within 1.5 s, idle RSS <= 60 MB, idle CPU < 1 % of a core. Other
programs share this machine, so absolute figures are noisy; the idle CPU figure is the least
affected (it counts this process tree's CPU time only). Prints figures and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_READY_S = 1.5
TARGET_RSS_MB = 60.0
TARGET_CPU_PCT = 1.0
TICKS = os.sysconf("SC_CLK_TCK")


def default_exe() -> list[str]:
    """The x86-64 single file if built (``make dist``), else the venv's entry point."""
    pex = ROOT / "dist" / "spawnmesh-x86_64"
    if pex.exists():
        return [str(pex)]
    return [str(Path(sys.executable).with_name("spawnmesh"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (e.g. a statestore writer process)."""
    out = [pid]
    for p in out:
        with contextlib.suppress(OSError):
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            out.extend(int(k) for k in kids)
    return out


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def status_kb(pids: list[int], key: str) -> int:
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
    return total


def pss_kb(pids: list[int]) -> int:
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total


@dataclass
class Node:
    """A started node process."""

    proc: subprocess.Popen[bytes]
    port: int
    ready_s: float
    ready_cpu_s: float
    """CPU time the process tree used until ready (what an otherwise idle core would take)."""
    workdir: Path

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode


def ready(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def start(
    exe: list[str], workdir: Path, env: dict[str, str], extra: list[str], timeout: float = 60.0
) -> Node:
    """Start a node and time it from just before exec until ``/readyz`` answers 200."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [
        *exe, "run", "--name", "edge", "--ops-host", "127.0.0.1", "--ops-port", str(port),
        "--statestore", f"sqlite:///{workdir / 'state.db'}", "--log-level", "warning",
        "--set", f"cluster.gossip_port={free_port()}", "--set", f"cluster.peer_port={free_port()}",
        *extra,
    ]  # fmt: skip
    with (workdir / "node.out").open("ab") as out, (workdir / "node.err").open("ab") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=workdir)
    deadline = t0 + timeout
    while not ready(port):
        if proc.poll() is not None or time.perf_counter() > deadline:
            proc.kill()
            raise SystemExit(f"node did not get ready: {(workdir / 'node.err').read_text()}")
        time.sleep(0.005)
    wall = time.perf_counter() - t0
    return Node(proc, port, wall, cpu_ticks(tree(proc.pid)) / TICKS, workdir)


def measure_idle(node: Node, seconds: float) -> dict[str, float]:
    time.sleep(3.0)  # let start-up work (first gossip rounds, store checks) settle
    pids = tree(node.proc.pid)
    c0, t0 = cpu_ticks(pids), time.monotonic()
    time.sleep(seconds)
    pids = tree(node.proc.pid)
    c1, t1 = cpu_ticks(pids), time.monotonic()
    return {
        "idle_cpu_pct": round(100.0 * (c1 - c0) / TICKS / (t1 - t0), 3),
        "idle_rss_mb": round(status_kb(pids, "VmRSS") / 1024, 1),
        "idle_pss_mb": round(pss_kb(pids) / 1024, 1),
        "processes": len(pids),
    }


def measure_load(node: Node, seconds: float, clients: int = 4) -> dict[str, float]:
    """``clients`` keep-alive HTTP clients for ``seconds``: half add 1 to the write-through
    counter (a durable SQLite write per call), half call the pooled worker (no state)."""
    stop = threading.Event()
    done = [0] * clients
    errors: list[str] = []
    calls = [
        ("/v1/systems/examples/actors/counter/actions/add", {"payload": 1}),
        ("/v1/systems/examples/actors/worker/actions/digest", {"payload": "x" * 100}),
    ]

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10.0)
        path, body = calls[i % 2]
        data = json.dumps(body)
        n = 0
        while not stop.is_set():
            conn.request("POST", path, data, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors.append(f"{resp.status} {path}")
                return
            n += 1
            done[i] = n

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    pids = tree(node.proc.pid)
    c0, t0 = cpu_ticks(pids), time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(15)
    c1, t1 = cpu_ticks(pids), time.monotonic()
    if errors:
        raise SystemExit(f"load failed: {errors[:3]}")
    return {
        "load_calls_per_s": round(sum(done) / (t1 - t0)),
        "load_cpu_pct": round(100.0 * (c1 - c0) / TICKS / (t1 - t0), 1),
        "load_rss_mb": round(status_kb(tree(node.proc.pid), "VmHWM") / 1024, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--exe", help="node executable (default: dist/spawnmesh-x86_64, else venv)")
    ap.add_argument("--idle-s", type=float, default=45.0)
    ap.add_argument("--warm", type=int, default=3, help="warm starts to time")
    ap.add_argument("--load-s", type=float, default=0.0, help="also measure under load")
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a node setting (repeatable), e.g. host.enabled=true",
    )
    args = ap.parse_args()
    extra = [x for kv in args.sets for x in ("--set", kv)]
    exe = default_exe()
    if args.exe:  # the node runs in its own directory: make a path absolute
        exe = [str(Path(args.exe).resolve()) if os.sep in args.exe else args.exe]
    key = base64.b64encode(os.urandom(32)).decode()
    with tempfile.TemporaryDirectory(prefix="spawnmesh-edge-") as tmp:
        base = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SPAWNMESH_", "PEX_"))}
        env.update(SPAWNMESH_STATESTORE_KEY=key, PEX_ROOT=str(base / "pex-root"))
        first = start(exe, base / "first", env, extra)
        first.stop()
        warm: list[float] = []
        warm_cpu: list[float] = []
        for i in range(args.warm):
            n = start(exe, base / f"warm{i}", env, extra)
            warm.append(n.ready_s)
            warm_cpu.append(n.ready_cpu_s)
            n.stop()
        node = start(exe, base / "idle", env, extra)
        try:
            idle = measure_idle(node, args.idle_s)
            load = measure_load(node, args.load_s) if args.load_s > 0 else {}
        finally:
            rc = node.stop()
    result: dict[str, object] = {
        "bench": "edge",
        "exe": " ".join(exe),
        "settings": args.sets,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "cold_first_s": round(first.ready_s, 3),
        "cold_warm_s": round(statistics.median(warm), 3) if warm else None,
        "cold_first_cpu_s": round(first.ready_cpu_s, 3),
        "cold_warm_cpu_s": round(statistics.median(warm_cpu), 3) if warm_cpu else None,
        **idle,
        "idle_s": args.idle_s,
        **load,
        "exit_code": rc,
    }
    result["targets_met"] = {
        "ready": (result["cold_warm_s"] or first.ready_s) <= TARGET_READY_S,
        "idle_rss": float(idle["idle_rss_mb"]) <= TARGET_RSS_MB,
        "idle_cpu": float(idle["idle_cpu_pct"]) < TARGET_CPU_PCT,
    }
    print(f"executable        {result['exe']}")
    print(f"machine           {result['machine']}")
    print(
        f"cold start        first run {result['cold_first_s']} s, warm median "
        f"{result['cold_warm_s']} s of {args.warm} (target {TARGET_READY_S} s)"
    )
    print(
        f"  CPU until ready first run {result['cold_first_cpu_s']} s, warm median "
        f"{result['cold_warm_cpu_s']} s (the wall time on an otherwise idle core)"
    )
    print(
        f"idle RSS          {idle['idle_rss_mb']} MB (PSS {idle['idle_pss_mb']} MB, "
        f"{idle['processes']} process(es); target {TARGET_RSS_MB:g} MB)"
    )
    print(
        f"idle CPU          {idle['idle_cpu_pct']} % of a core over {args.idle_s:g} s "
        f"(target < {TARGET_CPU_PCT:g} %)"
    )
    if load:
        print(
            f"under load        {load['load_calls_per_s']} calls/s, {load['load_cpu_pct']} % "
            f"CPU, peak RSS {load['load_rss_mb']} MB ({args.load_s:g} s)"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
