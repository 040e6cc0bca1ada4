"""Placement benchmark: the hash ring's build time, lookup speed, balance, movement and memory.

Prints a table of the vnode trade-off (build time and memory against balance) at 16 and 64
members, lookup speed of the default ring and of ``Placement.owner``, the fraction of keys a
join and a leave move, and last one JSON line. Times are CPU time of this process (best of a few
runs); other work on the machine still makes them noisy (shared caches), so compare figures
within one run.

    python bench/placement.py [--quick] [--sets N] [--vnodes 256,768,1024]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import time
import tracemalloc
from collections import Counter

from spawnmesh.cluster.placement import Placement, moved
from spawnmesh.cluster.ring import DEFAULT_VNODES, SPACE, Ring, diff, key_point

KEYS = 100_000


def member_set(rng: random.Random, n: int) -> list[str]:
    """Member ids shaped like real node ids (host:port plus a random suffix)."""
    return [f"10.0.{rng.randrange(256)}.{rng.randrange(256)}:7946-{rng.getrandbits(32):08x}"
            for _ in range(n)]  # fmt: skip


def balance(ring: Ring, keys: list[str]) -> float:
    """max/mean actors per member over ``keys``."""
    counts = Counter(map(ring.owner, keys))
    return max(counts.values()) / (len(keys) / len(ring.members))


def ring_bytes(members: list[str], vnodes: int) -> int:
    """Bytes a ring keeps allocated (tracemalloc, after the build's temporaries are freed)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    ring = Ring(members, vnodes)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del ring
    return after - before


def best_of(fn: object, repeat: int) -> float:
    """Smallest CPU time of ``repeat`` calls (seconds). CPU time rather than wall time: the
    work is single-threaded and the machine is shared, so wall time mostly measures others."""
    times = []
    for _ in range(repeat):
        t = time.process_time()
        fn()  # type: ignore[operator]
        times.append(time.process_time() - t)
    return min(times)


def per_lookup_ns(fn: object, keys: list[str]) -> float:
    """ns per call of ``fn(key)`` over ``keys``, best of 5 passes."""

    def run() -> None:
        for k in keys:
            fn(k)  # type: ignore[operator]

    return best_of(run, 5) / len(keys) * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer member sets and vnode counts")
    ap.add_argument("--sets", type=int, help="random member sets per cell (default 5)")
    ap.add_argument("--vnodes", help="comma-separated vnode counts for the trade-off table")
    args = ap.parse_args()
    rng = random.Random(7)
    keys = [f"user-{rng.getrandbits(48):012x}" for _ in range(KEYS)]
    sets = args.sets or (2 if args.quick else 5)
    vnode_counts = [128, 512, DEFAULT_VNODES] if args.quick else [64, 128, 256, 512, 1024, 2048]
    if args.vnodes:
        vnode_counts = [int(v) for v in args.vnodes.split(",")]
    print(f"python {platform.python_version()}, {KEYS:,} keys, {sets} member sets per cell; "
          "other load on the machine makes times noisy")  # fmt: skip

    print("\nvnode trade-off: balance = max/mean actors per member (mean and worst over sets)")
    print(f"{'vnodes':>6} {'members':>7} {'build ms':>9} {'ring KiB':>9} "
          f"{'balance mean':>12} {'worst':>6} {'lookup ns':>9}")  # fmt: skip
    table: dict[str, dict[str, float]] = {}
    for vnodes in vnode_counts:
        for n in (16, 64):
            sets_members = [member_set(rng, n) for _ in range(sets)]
            build = min(best_of(lambda ms=ms, v=vnodes: Ring(ms, v), 3) for ms in sets_members)
            bal = [balance(Ring(ms, vnodes), keys) for ms in sets_members]
            kib = ring_bytes(sets_members[0], vnodes) / 1024
            ns = per_lookup_ns(Ring(sets_members[0], vnodes).owner, keys[:20_000])
            table[f"{vnodes}/{n}"] = {"build_ms": build * 1e3, "kib": kib,
                                      "balance_mean": statistics.mean(bal),
                                      "balance_worst": max(bal), "lookup_ns": ns}  # fmt: skip
            print(f"{vnodes:>6} {n:>7} {build * 1e3:>9.2f} {kib:>9.0f} "
                  f"{statistics.mean(bal):>12.3f} {max(bal):>6.3f} {ns:>9.0f}")  # fmt: skip

    # Lookups with the default vnodes: the ring, the placement table, and the hash alone.
    ms16, ms64 = member_set(rng, 16), member_set(rng, 64)
    ring16, ring64 = Ring(ms16), Ring(ms64)
    types = [f"app/type{i}" for i in range(20)]
    place = Placement({m: types for m in ms16})
    sample = keys[:50_000]
    hash_ns = per_lookup_ns(key_point, sample)
    ring16_ns = per_lookup_ns(ring16.owner, sample)
    ring64_ns = per_lookup_ns(ring64.owner, sample)
    owner = place.owner
    place_ns = per_lookup_ns(lambda k: owner("app/type3", k), sample)
    print(f"\nlookups, vnodes={DEFAULT_VNODES}: blake2b alone {hash_ns:.0f} ns; "
          f"Ring.owner {ring16_ns:.0f} ns at 16 members ({1e9 / ring16_ns:,.0f}/s), "
          f"{ring64_ns:.0f} ns at 64 ({1e9 / ring64_ns:,.0f}/s); "
          f"Placement.owner {place_ns:.0f} ns ({1e9 / place_ns:,.0f}/s)")  # fmt: skip

    # Movement: a 17th member joins 16, then leaves again (exact by arcs, and counted on keys).
    newcomer = member_set(rng, 1)[0]
    ring17 = Ring([*ms16, newcomer])
    join_exact = sum(a.length for a in diff(ring16, ring17)) / SPACE
    join_keys = sum(ring16.owner(k) != ring17.owner(k) for k in keys) / KEYS
    only_new = all(a.new == newcomer for a in diff(ring16, ring17))
    leaver = ms16[0]
    ring15 = Ring(ms16[1:])
    leave_exact = sum(a.length for a in diff(ring16, ring15)) / SPACE
    leave_keys = sum(ring16.owner(k) != ring15.owner(k) for k in keys) / KEYS
    only_leaver = all(a.old == leaver for a in diff(ring16, ring15))
    print(f"\nmovement at 16 members: join moves {join_keys:.4f} of keys (exact {join_exact:.4f},"
          f" 1/17 = {1 / 17:.4f}), all to the newcomer: {only_new}; leave moves "
          f"{leave_keys:.4f} (exact {leave_exact:.4f}, 1/16 = {1 / 16:.4f}), all the leaver's:"
          f" {only_leaver}")  # fmt: skip

    # Placement table builds: 20 types over the same 16 members share one ring.
    view17 = {m: types for m in [*ms16, newcomer]}
    fresh = best_of(lambda: Placement(view17), 3)
    reused = best_of(lambda: Placement({m: types[:10] for m in ms16}, reuse=place), 3)
    mv = best_of(lambda: moved(place, Placement(view17), [("app/type3", k) for k in sample]), 1)
    print(f"Placement build (20 types, 17 members): {fresh * 1e3:.1f} ms; with reuse of "
          f"unchanged rings {reused * 1e3:.2f} ms; moved() over {len(sample):,} active keys "
          f"{mv * 1e3:.0f} ms (with the build)")  # fmt: skip

    default16 = table.get(f"{DEFAULT_VNODES}/16", {})
    default64 = table.get(f"{DEFAULT_VNODES}/64", {})
    print(json.dumps({
        "vnodes": DEFAULT_VNODES,
        "ring_owner_ns_16": round(ring16_ns),
        "ring_owner_ns_64": round(ring64_ns),
        "placement_owner_ns": round(place_ns),
        "lookups_per_s": round(1e9 / place_ns),
        "blake2b_ns": round(hash_ns),
        "build_ms_16": round(default16.get("build_ms", 0), 2),
        "build_ms_64": round(default64.get("build_ms", 0), 2),
        "ring_kib_16": round(default16.get("kib", 0)),
        "ring_kib_64": round(default64.get("kib", 0)),
        "balance_16_mean": round(default16.get("balance_mean", 0), 3),
        "balance_16_worst": round(default16.get("balance_worst", 0), 3),
        "balance_64_mean": round(default64.get("balance_mean", 0), 3),
        "balance_64_worst": round(default64.get("balance_worst", 0), 3),
        "join_moved_fraction": round(join_keys, 4),
        "leave_moved_fraction": round(leave_keys, 4),
        "placement_build_ms": round(fresh * 1e3, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
