"""Membership with real processes: n ``spawnmesh run`` nodes on loopback, gossip bytes in steady
state and the time until every survivor reports a SIGKILLed node dead.

    python bench/membership_real.py [--sizes 5,10,20] [--preset lan] [--steady 10] [--plain]

For each size: start n nodes (memory statestore, ephemeral ops and gossip ports, one seed,
a cluster key unless --plain), wait until every node reports n alive members (``converge_s``),
read each node's gossip byte counters (UDP + TCP, security header and tag included) over
``--steady`` seconds after a 5 s settle (``real_bytes_per_node_per_s``), SIGKILL one node and
poll every survivor's ``/v1/members`` every 50 ms until ALL of them report it dead
(``real_detect_s``; the first survivor's time is ``real_detect_first_s``). Prints figures
per size and, last, one JSON line.

``run_real(n, preset)`` is importable (``bench/membership.py`` puts these next to the
simulator's figures). Other programs share this machine, so absolute figures are noisy; the
process count also loads the machine itself (n Python processes on the cores there are).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CLI = [str(Path(sys.executable).with_name("spawnmesh"))]
if not Path(CLI[0]).exists():
    CLI = [sys.executable, "-m", "spawnmesh.cli"]
_OPS_RE = re.compile(r"^\s*ops/admin\s+(http://\S+)", re.MULTILINE)
POLL_S = 0.05


@dataclass
class Proc:
    """One node process and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path
    url: str = ""

    def get(self, path: str, timeout: float = 2.0) -> dict[str, object]:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            value = json.loads(r.read())
        assert isinstance(value, dict)
        return value

    def members(self) -> dict[str, dict[str, object]]:
        rows = self.get("/v1/members")["members"]
        assert isinstance(rows, list)
        return {str(r["name"]): r for r in rows}

    def sent(self) -> tuple[int, int, int]:
        """(UDP + TCP bytes sent, UDP bytes sent, UDP packets sent) so far."""
        stats = self.get("/v1/members")["stats"]
        assert isinstance(stats, dict)
        tr = stats["transport"]
        return int(tr["sent_bytes"]), int(tr["udp_sent_bytes"]), int(tr["udp_sent_packets"])

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


def _start(workdir: Path, name: str, env: dict[str, str]) -> Proc:
    out, err = workdir / f"{name}.out", workdir / f"{name}.err"
    argv = [
        *CLI,
        "run",
        "--name",
        name,
        "--ops-host",
        "127.0.0.1",
        "--ops-port",
        "0",
        "--statestore",
        "memory://",
        "--log-level",
        "warning",
    ]
    with out.open("wb") as fo, err.open("wb") as fe:
        popen = subprocess.Popen(
            argv,
            stdout=fo,
            stderr=fe,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=workdir,
            start_new_session=True,
        )
    return Proc(name, popen, out, err)


def _wait(pred: object, what: str, timeout: float) -> None:
    assert callable(pred)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def _ready(p: Proc) -> bool:
    if p.popen.poll() is not None:
        raise RuntimeError(f"{p.name} exited {p.popen.returncode}: {p.err.read_text()[-2000:]}")
    if not p.url:
        m = _OPS_RE.search(p.out.read_text("utf-8", "replace"))
        if not m:
            return False
        p.url = m.group(1)
    return True


def _base_env(preset: str, key: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPAWNMESH_", "SPAWN_"))}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "SPAWNMESH_CLUSTER_GOSSIP_PORT": "0",
            "SPAWNMESH_CLUSTER_PEER_PORT": "0",
            "SPAWNMESH_CLUSTER_PRESET": preset,
        }
    )
    if key:
        env["SPAWNMESH_CLUSTER_KEY"] = key
    return env


def run_real(
    n: int,
    preset: str = "lan",
    *,
    steady_s: float = 10.0,
    settle_s: float = 5.0,
    encrypted: bool = True,
) -> dict[str, object]:
    """Start ``n`` real nodes, measure steady-state gossip bytes (after ``settle_s`` for the
    join news to finish spreading) and SIGKILL detection by all survivors; returns the figures
    (see the module docstring)."""
    key = base64.b64encode(os.urandom(32)).decode() if encrypted else None
    env = _base_env(preset, key)
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="spawnmesh-bench-") as tmp:
        workdir = Path(tmp)
        try:
            t_start = time.monotonic()
            first = _start(workdir, "m00", env)
            procs.append(first)
            _wait(lambda: _ready(first), "the first node's banner", 60)
            info = first.get("/v1/node")["cluster"]
            assert isinstance(info, dict)
            seed_env = {**env, "SPAWNMESH_CLUSTER_SEEDS": str(info["gossip_address"])}
            for i in range(1, n):
                procs.append(_start(workdir, f"m{i:02d}", seed_env))
            for p in procs:
                _wait(lambda p=p: _ready(p), f"{p.name}'s banner", 120)  # type: ignore[misc]
            names = {p.name for p in procs}

            def converged() -> bool:
                return all(
                    {k for k, r in p.members().items() if r["status"] == "alive"} == names
                    for p in procs
                )

            _wait(converged, f"{n} members alive at every node", 120)
            converge_s = time.monotonic() - t_start

            # steady state: bytes sent per node per second, once the join news has spread
            time.sleep(settle_s)
            before = {p.name: p.sent() for p in procs}
            t0 = time.monotonic()
            time.sleep(steady_s)
            after = {p.name: p.sent() for p in procs}
            dt = time.monotonic() - t0
            total = [(after[k][0] - before[k][0]) / dt for k in before]
            udp = [(after[k][1] - before[k][1]) / dt for k in before]
            packets = [(after[k][2] - before[k][2]) / dt for k in before]

            # SIGKILL one; every survivor polls until it reports it dead
            victim, survivors = procs[-1], procs[:-1]
            seen: dict[str, float] = {}
            stop = threading.Event()

            def watch(p: Proc, t_kill: float) -> None:
                while not stop.is_set():
                    try:
                        status = p.members().get(victim.name, {}).get("status")
                    except OSError:
                        status = None
                    if status == "dead":
                        seen[p.name] = time.monotonic() - t_kill
                        return
                    time.sleep(POLL_S)

            victim.kill()
            t_kill = time.monotonic()
            threads = [
                threading.Thread(target=watch, args=(p, t_kill), daemon=True) for p in survivors
            ]
            for t in threads:
                t.start()
            deadline = t_kill + 120
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            stop.set()
            missing = sorted(p.name for p in survivors if p.name not in seen)
            detect = sorted(seen.values())
            return {
                "n": n,
                "preset": preset,
                "encrypted": encrypted,
                "converge_s": round(converge_s, 2),
                "steady_s": round(dt, 2),
                "real_bytes_per_node_per_s": round(statistics.mean(total), 1),
                "real_udp_bytes_per_node_per_s": round(statistics.mean(udp), 1),
                "real_udp_packets_per_node_per_s": round(statistics.mean(packets), 2),
                "real_detect_s": round(detect[-1], 2) if not missing else None,
                "real_detect_first_s": round(detect[0], 2) if detect else None,
                "real_detect_median_s": round(statistics.median(detect), 2) if detect else None,
                "not_detected_by": missing,
            }
        finally:
            for p in procs:
                if p.popen.poll() is None:
                    p.popen.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.popen.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="5,10,20")
    ap.add_argument("--preset", default="lan", choices=("lan", "wan", "local"))
    ap.add_argument("--steady", type=float, default=10.0, help="steady-state seconds")
    ap.add_argument("--plain", action="store_true", help="no cluster key (unencrypted)")
    args = ap.parse_args()
    results = []
    for n in (int(x) for x in args.sizes.split(",")):
        r = run_real(n, args.preset, steady_s=args.steady, encrypted=not args.plain)
        results.append(r)
        print(
            f"n={n:3d} preset={args.preset} {'encrypted' if r['encrypted'] else 'plain'}: "
            f"converged {r['converge_s']} s, {r['real_bytes_per_node_per_s']} B/node/s "
            f"(UDP {r['real_udp_bytes_per_node_per_s']} in "
            f"{r['real_udp_packets_per_node_per_s']} datagrams), SIGKILL seen dead by all "
            f"survivors in {r['real_detect_s']} s (first {r['real_detect_first_s']} s, median "
            f"{r['real_detect_median_s']} s)"
            + (f", never by {r['not_detected_by']}" if r["not_detected_by"] else ""),
            flush=True,
        )
    print(json.dumps({"bench": "membership_real", "preset": args.preset, "results": results}))


if __name__ == "__main__":
    main()
