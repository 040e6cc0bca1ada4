"""Tier 5: real ``spawnmesh run`` processes on loopback form a cluster and keep it right.

Five nodes join through one seed (one of them through ``spawnmesh join``); a SIGKILLed node is
marked dead by every survivor; restarted under the same name it rejoins alive at a higher
incarnation; a node told to ``spawnmesh leave`` and one stopped with SIGTERM are marked ``left``
at once and never suspected. Timings: 1 s probes, suspicion multiplier 2 (2 s), so a crash is
seen in a few seconds even on a loaded machine.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.e2e import NodeProcess, killing, run_cli, spawn_process, start_node, wait_for

pytestmark = pytest.mark.slow

FAST = (
    "--set",
    "cluster.probe_interval_ms=1000",
    "--set",
    "cluster.probe_timeout_ms=500",
    "--set",
    "cluster.suspicion_mult=2",
    "--set",
    "cluster.gossip_interval_ms=100",
    "--set",
    "cluster.join_retry_min_ms=200",
    "--set",
    "cluster.join_retry_max_ms=1000",
)


def members(node: NodeProcess) -> dict[str, dict[str, object]]:
    """name -> member row as ``GET /v1/members`` reports it ({} if the node does not answer)."""
    try:
        status, body = node.get("/v1/members")
    except OSError:
        return {}
    if status != 200:
        return {}
    return {str(r["name"]): r for r in json.loads(body)["members"]}


def incarnation(row: dict[str, object]) -> int:
    value = row["incarnation"]
    assert isinstance(value, int)
    return value


def gossip_addr(node: NodeProcess) -> str:
    status, body = node.get("/v1/node")
    assert status == 200, body
    return str(json.loads(body)["cluster"]["gossip_address"])


def start(tmp: Path, name: str, *seeds: str, wait: bool = True) -> NodeProcess:
    args = ["--name", name, *FAST]
    for seed in seeds:
        args += ["--set", f"cluster.seeds={seed}"]
    return start_node(tmp / name, *args, key=None, url="memory://", wait=wait)


def all_see(observers: list[NodeProcess], name: str, status: str) -> bool:
    return all(members(o).get(name, {}).get("status") == status for o in observers)


def describe(nodes: list[NodeProcess]) -> str:
    return "\n".join(f"{n.url}: {members(n)}" for n in nodes if n.proc.poll() is None)


def test_cluster_forms_detects_a_crash_rejoins_and_leaves(tmp_path: Path) -> None:
    n1 = start(tmp_path, "n1")
    nodes = [n1]
    with killing(n1):
        seed = gossip_addr(n1)
        others = [start(tmp_path, f"n{i}", seed, wait=False) for i in (2, 3, 4)]
        nodes += others
        # n5 starts with no seed and is joined by the operator through the CLI
        n5 = start(tmp_path, "n5", wait=False)
        nodes.append(n5)
        with killing(*nodes):
            for n in [*others, n5]:
                n.wait_ready()
            joined = run_cli("join", "--node", n5.url, seed).ok()
            assert "joined through 1 of 1" in joined.stdout, joined
            names = {f"n{i}" for i in range(1, 6)}

            def formed() -> bool:
                return all(
                    {k for k, r in members(n).items() if r["status"] == "alive"} == names
                    for n in nodes
                )

            wait_for(formed, "five members alive everywhere", 20, describe=lambda: describe(nodes))
            def timed() -> bool:  # n3 has probed every other member at least once
                return all(r["rtt_ms"] is not None for k, r in members(nodes[2]).items()
                           if k != "n3")

            wait_for(timed, "n3 timed a probe of every member", 20)
            table = run_cli("members", "--node", nodes[2].url).ok().stdout.splitlines()
            assert table[0].split()[:5] == ["Node", "Address", "Status", "Incarnation", "RTT"]
            assert sorted(line.split()[0] for line in table[1:]) == sorted(names)
            assert all(line.split()[2] == "alive" for line in table[1:]), table
            rtts = {line.split()[0]: line.split()[4] for line in table[1:]}
            assert rtts.pop("n3") == "-"  # a node does not probe itself
            assert all(0 <= int(v) < 500 for v in rtts.values()), table  # "N ms" on loopback
            row = members(n1)["n3"]
            assert "examples/counter" in row["actor_types"]  # type: ignore[operator]

            # SIGKILL n5: every survivor marks it dead.
            n5.kill()
            survivors = nodes[:4]
            t0 = time.monotonic()
            wait_for(
                lambda: all_see(survivors, "n5", "dead"),
                "n5 dead at every survivor",
                30,
                describe=lambda: describe(survivors),
            )
            detect_s = time.monotonic() - t0
            dead_inc = max(incarnation(members(o)["n5"]) for o in survivors)

            # Restart it under the same name (new port): alive again, higher incarnation.
            n5b = start(tmp_path, "n5", seed)
            nodes[4] = n5b
            with killing(n5b):

                def back() -> bool:
                    rows = [members(o).get("n5", {}) for o in survivors]
                    return all(
                        r.get("status") == "alive" and incarnation(r) > dead_inc for r in rows
                    )

                wait_for(
                    back,
                    "restarted n5 alive at a higher incarnation everywhere",
                    20,
                    describe=lambda: describe(survivors),
                )

                # Graceful: `spawnmesh leave` on n4, SIGTERM on n3: left at once, never
                # suspected or dead.
                watchers = [n1, nodes[1], n5b]
                marks = {id(w): len(w.stderr) for w in watchers}
                out = run_cli("leave", "--node", nodes[3].url).ok()
                assert "left the cluster" in out.stdout, out
                assert nodes[3].wait_exit(15).returncode == 0
                wait_for(
                    lambda: all_see(watchers, "n4", "left"),
                    "n4 left everywhere",
                    5,
                    describe=lambda: describe(watchers),
                )
                gone = nodes[2].stop(signal.SIGTERM)
                assert gone.returncode == 0, gone
                wait_for(
                    lambda: all_see(watchers, "n3", "left"),
                    "n3 left everywhere",
                    5,
                    describe=lambda: describe(watchers),
                )
                for w in watchers:
                    tail = w.stderr[marks[id(w)] :]
                    for who in ("n3", "n4"):
                        assert f"member {who} left" in tail, tail
                        assert f"member {who} suspect" not in tail, tail
                        assert f"member {who} dead" not in tail, tail
    print(f"crash detected by all survivors in {detect_s:.1f} s")


def test_non_loopback_gossip_without_a_key_refuses_to_start(tmp_path: Path) -> None:
    from tests.e2e import CLI, clean_env

    argv = [
        *CLI,
        "run",
        "--ops-port",
        "0",
        "--statestore",
        "memory://",
        "--set",
        "cluster.bind_host=0.0.0.0",
    ]
    proc = spawn_process(argv, tmp_path, clean_env())
    with killing(proc):
        gone = proc.wait_exit(20)
    assert gone.returncode == 2, gone
    lines = gone.stderr.strip().splitlines()
    assert len(lines) == 1 and "cluster.key" in lines[0] and "SPAWNMESH_CLUSTER_KEY" in lines[0], (
        gone.stderr
    )
    assert gone.stdout == ""


def test_gossip_port_in_use_exits_2_with_one_line(tmp_path: Path) -> None:
    import socket

    from tests.e2e import CLI, clean_env

    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    with taken:
        port = taken.getsockname()[1]
        argv = [
            *CLI,
            "run",
            "--ops-port",
            "0",
            "--statestore",
            "memory://",
            "--set",
            f"cluster.gossip_port={port}",
        ]
        proc = spawn_process(argv, tmp_path, clean_env())
        with killing(proc):
            gone = proc.wait_exit(20)
    assert gone.returncode == 2, gone
    errors = [x for x in gone.stderr.splitlines() if x.startswith("spawnmesh: error: ")]
    assert len(errors) == 1 and "cluster.gossip_port" in errors[0] and str(port) in errors[0], (
        gone.stderr
    )
    assert "Traceback" not in gone.stderr
