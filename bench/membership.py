"""Membership benchmark: the SWIM + Lifeguard core in the deterministic simulator, LAN preset
(1 s probe interval), plus real processes on loopback when ``bench/membership_real.py`` is there.

From the simulator, for n = 20 (detection only), 100 and 1,000:

* ``detect_p50_s`` / ``detect_p99_s`` / ``detect_max_s``: from a crash until every live node
  has the victim dead (scenario ``detect``: repeated crashes, each victim restarted later),
  over ``detect_crashes`` crashes on several seeds; the same core with memberlist's LAN
  suspicion settings (suspicion_mult 4, k 2, no ring probe) is measured beside it at n = 20
  and 100 (``memberlist_settings``);
* ``false_dead_per_node_hour_loss5``: dead events about live members (counted at every
  observer) per node-hour with 5 % packet loss and the TCP fallback probe off, so only UDP
  carries probes and refutations (with TCP on, the simulator's lossless TCP makes it 0);
* ``false_dead_per_node_hour_starved_on`` / ``_off``: 5 % of the nodes run only every second
  (scenario ``starve-frac``), Lifeguard on and off, in the same run;
* ``msgs_per_node_per_s``, ``udp_bytes_per_node_per_s``, ``tcp_bytes_per_node_per_s``,
  ``bytes_per_node_per_s``: steady state after a short warm-up (scenario ``traffic``). Datagrams and
  UDP bytes are counted; TCP is the push-pull rate (one exchange of two full tables, of the
  measured size, per node per ``ceil(n / 32)`` x 30 s: at n = 1,000 that is 16 minutes, longer
  than the window) plus the TCP fallback pings counted in the window;
* ``converge_after_partition_s``: a 50/50 partition for 60 s, then until every live view is
  the truth (scenario ``partition``). At n = 1,000 that scenario moves ~30 million gossip items
  (4-5 CPU minutes), so it runs only with ``--full``; otherwise the figure recorded in
  docs/membership.md is printed with its replay command and the JSON holds null.

Real processes (``--real``, on by default when ``bench/membership_real.py`` imports): n = 5,
10, 20 nodes; ``real_detect_s`` and ``real_bytes_per_node_per_s``.

Every simulator figure prints the one-line command that replays it. Other programs share this
machine, so wall times are noisy; simulated figures are exact for their seeds.

    python bench/membership.py [--quick] [--full] [--no-real]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spawnmesh.cluster import sim as simmod  # noqa: E402
from spawnmesh.cluster.sim import SimReport, percentile, run_scenario  # noqa: E402

SERF_BYTES_PER_NODE_PER_S = 213
"""Serf (memberlist LAN profile) measured on this machine, from the issue (for scale)."""
MEMBERLIST = {"suspicion_mult": 4, "suspicion_k": 2, "ring_probe": False}
"""memberlist's DefaultLANConfig suspicion settings on the same core (k = mult - 2)."""
N1000_PARTITION_S = 34.0
"""converge_after_partition_s at n = 1,000 from the --full run recorded in docs/membership.md."""


def log(line: str) -> None:
    print(line, flush=True)


def run(scenario: str, n: int, seconds: float, seed: int = 1, **kw: Any) -> SimReport:
    """One scenario; print its summary and replay command; fail loudly on violations."""
    rep = run_scenario(scenario, seed, n, int(seconds * 1000), **kw)
    log(f"  {rep.summary()}")
    log(f"    replay: {rep.replay_command()}")
    for v in rep.violations[:5]:
        log(f"    VIOLATION {v}")
    return rep


def detection(n: int, seeds: int, seconds: float, **kw: Any) -> dict[str, Any]:
    samples: list[int] = []
    violations = 0
    for seed in range(1, seeds + 1):
        rep = run("detect", n, seconds, seed, **kw)
        samples += rep.samples
        violations += len(rep.violations)
    return {
        "detect_p50_s": percentile(samples, 0.5) / 1000,
        "detect_p99_s": percentile(samples, 0.99) / 1000,
        "detect_max_s": max(samples, default=-1) / 1000,
        "detect_crashes": len(samples),
        "detect_violations": violations,
    }


def per_node_hour(rep: SimReport, n: int, start_ms: int = 0) -> float:
    hours = n * (rep.sim_ms - start_ms) / 3_600_000
    return round(rep.false_dead / hours, 3)


def simulate(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Every simulator figure (see the module docstring) into ``out``."""
    q = 0.2 if args.quick else 1.0
    sim: dict[str, dict[str, Any]] = out["sim"]

    log("== detection: crash -> every live node has it dead (scenario detect)")
    plan = {20: (6, 300), 100: (3, 300), 1000: (1, 160)}
    for n, (seeds, seconds) in plan.items():
        sim[str(n)] = detection(n, max(1, int(seeds * q)), max(60, seconds * q))
        log(f"n={n}: {sim[str(n)]}")
    for n, (seeds, seconds) in ((20, (6, 300)), (100, (1, 300))):
        res = detection(n, max(1, int(seeds * q)), max(60, seconds * q), overrides=MEMBERLIST)
        out["memberlist_settings"][str(n)] = res
        log(f"n={n} with memberlist's suspicion settings {MEMBERLIST}: {res}")

    log("== steady-state traffic (scenario traffic, after a warm-up)")
    for n, seconds in ((100, 300), (1000, 60)):
        rep = run("traffic", n, seconds * q)
        notes = rep.notes
        total = notes["udp_bytes_per_node_per_s"] + notes["tcp_bytes_per_node_per_s"]
        sim[str(n)].update(
            msgs_per_node_per_s=notes["msgs_per_node_per_s"],
            udp_bytes_per_node_per_s=notes["udp_bytes_per_node_per_s"],
            tcp_bytes_per_node_per_s=notes["tcp_bytes_per_node_per_s"],
            push_pull_bytes_per_node_per_s=notes["push_pull_bytes_per_node_per_s"],
            bytes_per_node_per_s=round(total, 1),
        )
        log(
            f"n={n}: {notes['msgs_per_node_per_s']} msgs, {round(total, 1)} B per node per s"
            f" (UDP {notes['udp_bytes_per_node_per_s']}, TCP {notes['tcp_bytes_per_node_per_s']};"
            f" Serf ~{SERF_BYTES_PER_NODE_PER_S})"
        )

    log("== 5 % packet loss, UDP only (scenario loss, --no-tcp-ping)")
    for n, seconds in ((100, 900), (1000, 120)):
        rep = run("loss", n, seconds * q, tcp_ping=False)
        sim[str(n)]["false_dead_per_node_hour_loss5"] = per_node_hour(rep, n)
        sim[str(n)]["false_suspect_per_node_hour_loss5"] = round(
            rep.false_suspect / (n * rep.sim_ms / 3_600_000), 1
        )
        log(f"n={n}: {rep.false_dead} false deaths in {n * rep.sim_ms / 3_600_000:.1f} node-hours")

    log(f"== 5 % of nodes CPU-starved (run every {simmod.STARVE_MS} ms), Lifeguard on vs off")
    # Lifeguard off at n = 1000 is a storm (about 9 CPU-s per simulated second): 15 s by
    # default (10 s starved), 65 s with --full.
    for n, on_s, off_s in ((100, 300, 300), (1000, 60, 65 if args.full else 15)):
        on = run("starve-frac", n, on_s * q)
        off = run("starve-frac", n, max(15, off_s * q), lifeguard=False)
        row = sim[str(n)]
        row["false_dead_per_node_hour_starved_on"] = per_node_hour(on, n, 5_000)
        row["false_dead_per_node_hour_starved_off"] = per_node_hour(off, n, 5_000)
        row["false_dead_starved_on"] = on.false_dead
        row["false_dead_starved_off"] = off.false_dead
        row["starved_node_hours_on"] = round(n * (on.sim_ms - 5_000) / 3_600_000, 2)
        row["starved_node_hours_off"] = round(n * (off.sim_ms - 5_000) / 3_600_000, 2)
        row["starved_off_split"] = {k[11:]: v for k, v in off.notes.items() if "false_dead_" in k}
        ratio = "inf" if on.false_dead == 0 else f"{off.false_dead / on.false_dead:.1f}"
        log(f"n={n}: false deaths on {on.false_dead}, off {off.false_dead} (off/on = {ratio})")

    log("== 50/50 partition for 60 s, then until every view is the truth (scenario partition)")
    for n in (100, 1000):
        if n == 1000 and not args.full:
            sim["1000"]["converge_after_partition_s"] = None
            log(
                f"n=1000: skipped (--full); recorded figure {N1000_PARTITION_S} s, replay:"
                " python -m spawnmesh.cluster.sim --seed 1 --scenario partition --nodes 1000"
            )
            continue
        rep = run("partition", n, 60)
        conv = rep.converged_ms / 1000 if rep.converged_ms >= 0 else None
        sim[str(n)]["converge_after_partition_s"] = conv
        log(f"n={n}: converged {conv} s after the heal")


def real_processes(out: dict[str, Any]) -> None:
    """n = 5, 10, 20 real nodes through bench/membership_real.py's ``run_real``."""
    path = ROOT / "bench" / "membership_real.py"
    spec = importlib.util.spec_from_file_location("membership_real", path)
    assert spec is not None and spec.loader is not None
    real = importlib.util.module_from_spec(spec)
    sys.modules["membership_real"] = real  # dataclasses look their module up there
    spec.loader.exec_module(real)
    log("== real processes on loopback (bench/membership_real.py)")
    for n in (5, 10, 20):
        try:
            res = real.run_real(n, "lan")
        except Exception as exc:  # report it, keep the other figures
            res = {"error": f"{type(exc).__name__}: {exc}"}
        out["real"][str(n)] = res
        log(f"n={n}: {res}")


def targets(out: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, from whatever this run measured."""
    sim = out["sim"]
    got: dict[str, Any] = {}
    if sim:
        s20, s100, s1000 = sim["20"], sim["100"], sim["1000"]
        got["sim_detect_p99_n20_le_4s"] = s20["detect_p99_s"] <= 4.0
        got["zero_false_dead_loss5"] = (
            s100["false_dead_per_node_hour_loss5"] == 0
            and s1000["false_dead_per_node_hour_loss5"] == 0
        )
        got["starved_off_ge_20x_on_n100"] = s100["false_dead_starved_off"] >= 20 * max(
            1, s100["false_dead_starved_on"]
        )
        got["starved_zero_on"] = s100["false_dead_starved_on"] + s1000["false_dead_starved_on"] == 0
        got["bytes_1000_over_100"] = round(
            s1000["bytes_per_node_per_s"] / s100["bytes_per_node_per_s"], 2
        )
    real20 = out["real"].get("20", {})
    if isinstance(real20.get("real_detect_s"), (int, float)):
        got["real_detect_n20_le_5s"] = real20["real_detect_s"] <= 5.0
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    ap.add_argument("--full", action="store_true", help="also the n=1000 partition (slow)")
    ap.add_argument("--real", dest="real", action="store_true", default=None)
    ap.add_argument("--no-real", dest="real", action="store_false")
    ap.add_argument("--no-sim", dest="sim", action="store_false", help="real processes only")
    args = ap.parse_args()
    started = time.monotonic()
    cpu0 = time.process_time()
    out: dict[str, Any] = {"preset": "lan", "sim": {}, "memberlist_settings": {}, "real": {}}
    if args.sim:
        simulate(args, out)
    real_path = ROOT / "bench" / "membership_real.py"
    if (args.real if args.real is not None else real_path.exists()) and real_path.exists():
        try:
            real_processes(out)
        except Exception as exc:  # the simulator's figures still make the JSON line
            out["real"]["error"] = f"{type(exc).__name__}: {exc}"
            log(f"real processes failed: {out['real']['error']}")
    out["targets"] = targets(out)
    out["wall_s"] = round(time.monotonic() - started, 1)
    out["cpu_s"] = round(time.process_time() - cpu0, 1)
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    out["quick"] = args.quick
    log(f"== targets: {out['targets']}")
    log(f"wall {out['wall_s']} s, cpu {out['cpu_s']} s, load {out['loadavg']} (noisy machine)")
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
