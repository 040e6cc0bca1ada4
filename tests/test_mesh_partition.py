"""Tier 5: a node cut off by a network partition rejoins without lost updates.

A private lab is built inside ``unshare --net`` (so no packet can leave the machine): a bridge
``10.77.0.1/24`` in the lab's own namespace, where PostgreSQL listens and the load client runs,
and three nodes ``p1..p3``, each in its own network namespace with a veth into the bridge and
its own address. Every node runs ``tests/mesh_app.py`` with an encrypted cluster (the nodes bind
non-loopback addresses). The client adds 1 to many write-through counters through all three
nodes; then nftables in p3's namespace drops every packet between p3 and the other nodes
(both ways; PostgreSQL and the client still reach p3). p1 and p2 declare p3 dead and take its
actors over; p3, alone, declares them dead and takes every actor: both sides write while the
statestore's fencing rejects stale writes. Then the link heals, p3 rejoins (alive again at a
higher incarnation), actors move back to one activation each, and every acknowledged
increment is in the state.

The test drives the lab from a child process (``python -m tests.test_mesh_partition WORKDIR``
under ``unshare --net``) that prints one JSON line of observations; the assertions are here.
Skipped with the reason when the lab cannot be built (not root, no ``ip``/``nft``/``unshare``/
``nsenter``, no PostgreSQL server binaries, namespaces not permitted).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import CLI, NodeProcess, clean_env, new_key, wait_for
from tests.test_e2e_mesh import (
    COUNTERS,
    Call,
    Cluster,
    Load,
    active_on,
    audit,
    check_one_activation_each,
    invoke,
    status_of,
)

REPO = Path(__file__).resolve().parent.parent
NET = "10.77.0"
BRIDGE = f"{NET}.1"
NODES = {"p1": f"{NET}.11", "p2": f"{NET}.12", "p3": f"{NET}.13"}
CUT = "p3"
PG_PORT = 5432
OPS_PORT = 8080
GOSSIP_PORT = 7946
PEER_PORT = 7947
LAB_TIMEOUT_S = 150.0
"""The whole lab run, set-up included (about 35-45 s on a loaded 2-core machine)."""

SETTINGS = (
    "--app", "mesh_app:system",
    "--set", "cluster.preset=local",
    "--set", "cluster.probe_interval_ms=500",
    "--set", "cluster.suspicion_mult=2",
    "--set", "cluster.join_retry_min_ms=200",
    "--set", "cluster.join_retry_max_ms=1000",
    "--set", "actors.default_timeout_ms=20000",
)  # fmt: skip
"""The majority sees a cut node dead in about 2 s; the node alone, with nobody to confirm its
suspicions, after the maximum suspicion timeout (6 x 2 x 500 ms = 6 s)."""


# ------------------------------------------------------------------------------- the pytest side


def pg_bin() -> Path | None:
    """The newest PostgreSQL server binaries on this machine."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)  # fmt: skip
    return found[-1].parent if found else None


def lab_missing() -> str | None:
    """Why the lab cannot be built here, or None."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "the partition lab needs root on Linux (network namespaces, nftables)"
    if any(shutil.which(t) is None for t in ("ip", "nft", "unshare", "nsenter")):
        subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "scripts" /
                                    "lab-deps.sh")],
                       capture_output=True, timeout=600, check=False)  # installs what it can
    for tool in ("ip", "nft", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            hint = " (apt-get install nftables)" if tool == "nft" else ""
            return f"the partition lab needs `{tool}`{hint}"
    if pg_bin() is None:
        return "the partition lab needs the PostgreSQL server (/usr/lib/postgresql/*/bin)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "the partition lab needs a `postgres` user to run PostgreSQL as"
    probe = subprocess.run(
        ["unshare", "--net", "--", "nft", "list", "ruleset"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if probe.returncode != 0:
        return f"cannot make a network namespace with nftables here: {probe.stderr.strip()}"
    return None


@pytest.mark.slow
def test_partitioned_node_rejoins_without_lost_updates(tmp_path: Path) -> None:
    reason = lab_missing()
    if reason is not None:
        pytest.skip(reason)
    out, err = tmp_path / "lab.out", tmp_path / "lab.err"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
        "PYTHONUNBUFFERED": "1",
    }
    started = time.monotonic()
    with out.open("wb") as fo, err.open("wb") as fe:
        lab = subprocess.Popen(
            ["unshare", "--net", "--", sys.executable, "-m", "tests.test_mesh_partition",
             str(tmp_path)],
            cwd=REPO, env=env, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its whole group (nodes, PostgreSQL) is killed below
        )  # fmt: skip
        try:
            rc = lab.wait(LAB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(lab.pid, signal.SIGKILL)
            lab.wait()
    runtime_s = time.monotonic() - started
    detail = f"--- lab stderr (tail)\n{err.read_text()[-6000:]}\n--- node logs in {tmp_path}"
    assert rc is not None, f"the lab did not finish within {LAB_TIMEOUT_S:g} s\n{detail}"
    assert rc == 0, f"the lab failed (exit {rc})\n{detail}"
    r: dict[str, Any] = json.loads(out.read_text().strip().splitlines()[-1])

    # The cut node rejoined: alive again everywhere, at a higher incarnation.
    for observer in ("p1", "p2"):
        assert r["after"][observer][CUT]["status"] == "alive", r["after"]
        assert r["after"][observer][CUT]["incarnation"] > r["incarnation_before"], r
    # Both sides really wrote while split: the minority through p3 alone, the majority
    # through p1 and p2, to the same counters.
    assert r["split_acked"]["minority"] > 0, r["split_acked"]
    assert r["split_acked"]["majority"] > 0, r["split_acked"]
    # No acknowledged update lost; nothing applied that was never sent.
    for name in COUNTERS:
        c = r["counters"][name]
        assert c["lost"] == [] and c["invented"] == [], (name, c)
        assert c["value"] == c["applied"] >= c["acked"], (name, c)
    # A call may be applied twice only if its outcome was unknown: it failed, or it was in
    # flight across the cut (applied on one side, its reply lost, retried on the other).
    cut_done = r["t"]["cut_done_s"]
    twice = [x for x in r["applied_twice"] if x["ok"] and not x["start"] <= cut_done <= x["end"]]
    assert twice == [], f"calls applied twice: {twice}"
    # Once healed and converged, every call succeeds.
    assert r["failed_after_heal"] == [], r["failed_after_heal"][:3]
    surplus = sum(c["value"] - c["acked"] for c in r["counters"].values())
    print(
        f"\n[partition] stale_activations_total per node {r['stale']} "
        f"(sum {sum(r['stale'].values()):g}); calls {r['calls']}, failed during the "
        f"partition {r['failed']} {r['failures']}, applied twice "
        f"{len(r['applied_twice'])}, acked while split: {r['split_acked']}; applied beyond "
        f"acknowledged {surplus}; majority saw {CUT} dead after {r['t']['majority_dead_s']:.1f}"
        f" s, {CUT} saw the others dead after {r['t']['minority_alone_s']:.1f} s, rejoined "
        f"{r['t']['rejoin_s']:.1f} s after the heal (incarnation {r['incarnation_before']} -> "
        f"{r['after']['p1'][CUT]['incarnation']}); lab set-up {r['t']['setup_s']:.1f} s, "
        f"whole test {runtime_s:.1f} s"
    )


# -------------------------------------------------------------------------- the lab (child side)


def sh(*argv: str) -> str:
    """Run a command to completion; its stdout (raises with its stderr if it fails)."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def in_ns(pid: int) -> list[str]:
    """Command prefix running a program in the network namespace of process ``pid``."""
    return ["nsenter", f"--net=/proc/{pid}/ns/net", "--"]


def log(msg: str) -> None:
    print(f"lab {time.strftime('%H:%M:%S')}: {msg}", file=sys.stderr, flush=True)


class Lab:
    """Processes of the lab (killed in reverse order at the end) and its network."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.holders: dict[str, int] = {}
        self.pgdir = Path(tempfile.mkdtemp(prefix="spawnmesh-lab-pg."))

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        shutil.rmtree(self.pgdir, ignore_errors=True)

    def popen(self, argv: list[str], name: str, **kw: Any) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.out").open("wb") as fo, \
                (self.workdir / f"{name}.err").open("wb") as fe:  # fmt: skip
            p = subprocess.Popen(argv, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def network(self) -> None:
        sh("ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "br0", "type", "bridge")
        sh("ip", "addr", "add", f"{BRIDGE}/24", "dev", "br0")
        sh("ip", "link", "set", "br0", "up")
        own = os.readlink("/proc/self/ns/net")
        for i, (name, addr) in enumerate(NODES.items()):
            holder = self.popen(["unshare", "--net", "--", "sleep", "3600"], f"ns-{name}")
            wait_for(lambda h=holder: os.readlink(f"/proc/{h.pid}/ns/net") != own,
                     f"namespace of {name}", 10)  # fmt: skip
            pid = self.holders[name] = holder.pid
            sh(
                "ip",
                "link",
                "add",
                f"vh{i}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                str(pid),
            )
            sh("ip", "link", "set", f"vh{i}", "master", "br0", "up")
            sh(*in_ns(pid), "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
            sh(*in_ns(pid), "ip", "link", "set", "eth0", "up")
            sh(*in_ns(pid), "ip", "link", "set", "lo", "up")

    def postgres(self) -> str:
        """Start PostgreSQL on the bridge address; its DSN."""
        pg = pg_bin()
        assert pg is not None
        os.chmod(self.pgdir, 0o755)
        shutil.chown(self.pgdir, "postgres", "postgres")
        data = self.pgdir / "data"
        subprocess.run(
            [str(pg / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
             "--locale=C.UTF-8", "--no-sync"],
            user="postgres", cwd=self.pgdir, check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        with (data / "pg_hba.conf").open("a") as hba:  # the nodes connect from the lab's net
            hba.write(f"host all all {NET}.0/24 trust\n")
        self.popen(
            [str(pg / "postgres"), "-D", str(data), "-p", str(PG_PORT), "-k", str(self.pgdir),
             "-c", f"listen_addresses={BRIDGE}", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=100"],
            "postgres", user="postgres", cwd=self.pgdir,
        )  # fmt: skip
        import psycopg

        def ready() -> bool:
            try:
                psycopg.connect(
                    f"host={BRIDGE} port={PG_PORT} user=postgres dbname=postgres", connect_timeout=2
                ).close()
                return True
            except psycopg.OperationalError:
                return False

        wait_for(
            ready,
            "PostgreSQL accepting connections",
            30,
            describe=lambda: (self.workdir / "postgres.err").read_text()[-2000:],
        )
        return f"postgresql+psycopg://postgres@{BRIDGE}:{PG_PORT}/postgres"

    def node(self, name: str, dsn: str, cluster_key: str, state_key: str) -> NodeProcess:
        addr = NODES[name]
        argv = [
            *in_ns(self.holders[name]), *CLI, "run", "--name", name, "--ops-host", addr,
            "--ops-port", str(OPS_PORT), "--statestore", dsn, *SETTINGS,
            "--set", f"cluster.bind_host={addr}",
            "--set", f"cluster.gossip_port={GOSSIP_PORT}",
            "--set", f"cluster.peer_port={PEER_PORT}",
        ]  # fmt: skip
        if name != "p1":
            argv += ["--set", f"cluster.seeds={NODES['p1']}:{GOSSIP_PORT}"]
        tests_dir = str(REPO / "tests")
        env = clean_env(
            {
                "SPAWNMESH_CLUSTER_KEY": cluster_key,
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [tests_dir, os.environ.get("PYTHONPATH", "")])
                ),
            },
            key=state_key,
        )
        proc = self.popen(argv, name, env=env, cwd=self.workdir)
        return NodeProcess(proc, self.workdir / f"{name}.out", self.workdir / f"{name}.err",
                           env)  # fmt: skip

    def cut(self, name: str) -> None:
        """Drop every packet between ``name`` and the other nodes, both ways."""
        others = ", ".join(a for n, a in NODES.items() if n != name)
        rules = (
            "table inet cut {\n"
            f"  chain in {{ type filter hook input priority 0; ip saddr {{ {others} }} drop; }}\n"
            f"  chain out {{ type filter hook output priority 0; ip daddr {{ {others} }} drop; }}\n"
            "}\n"
        )
        rules_file = self.workdir / "cut.nft"
        rules_file.write_text(rules)
        sh(*in_ns(self.holders[name]), "nft", "-f", str(rules_file))

    def heal(self, name: str) -> None:
        sh(*in_ns(self.holders[name]), "nft", "delete", "table", "inet", "cut")


def _error_code(error: str) -> str:
    """The error code of a failed call's reply body (else the text's first 60 characters)."""
    try:
        return str(json.loads(error)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return error[:60]


def members_of(node: NodeProcess) -> dict[str, dict[str, Any]]:
    from tests.test_e2e_mesh import get_json

    body = get_json(node, "/v1/members")
    return {} if body is None else {r["name"]: r for r in body["members"]}


def run_lab(workdir: Path) -> dict[str, Any]:
    """Build the lab, run the scenario, return what was observed."""
    t0 = time.monotonic()
    lab = Lab(workdir)
    try:
        lab.network()
        dsn = lab.postgres()
        log(f"network and PostgreSQL ready in {time.monotonic() - t0:.1f} s")
        cluster_key, state_key = new_key(), new_key()
        c = Cluster(workdir, dsn)
        c.nodes["p1"] = lab.node("p1", dsn, cluster_key, state_key)
        c.nodes["p1"].wait_ready()
        for name in ("p2", "p3"):
            c.nodes[name] = lab.node(name, dsn, cluster_key, state_key)
        for node in c.nodes.values():
            node.wait_ready()
        names = list(NODES)
        c.wait_converged(names)
        check_one_activation_each(c)
        setup_s = time.monotonic() - t0
        log(f"cluster of three converged, lab set up in {setup_s:.1f} s")
        p1, p3 = c.nodes["p1"], c.nodes[CUT]
        majority = [c.nodes[n] for n in names if n != CUT]
        inc_before = members_of(p1)[CUT]["incarnation"]

        with Load(c.nodes) as load:
            load.wait_acked(150, "before the cut")
            t_cut = time.monotonic()
            lab.cut(CUT)
            t_cut_done = time.monotonic()
            log(f"{CUT} cut off")
            wait_for(lambda: all(status_of(n).get(CUT) == "dead" for n in majority),
                     f"{CUT} dead at p1 and p2", 30, describe=c.describe)  # fmt: skip
            t_majority = time.monotonic()
            wait_for(lambda: all(status_of(p3).get(n) == "dead" for n in names if n != CUT),
                     f"p1 and p2 dead at {CUT}", 40, describe=c.describe)  # fmt: skip
            t_alone = time.monotonic()
            log(
                f"split: majority saw {CUT} dead after {t_majority - t_cut:.1f} s, {CUT} alone "
                f"after {t_alone - t_cut:.1f} s"
            )

            def split_acked(side: str, until: float = math.inf) -> int:
                """Calls acknowledged through one side, started once both sides owned every
                counter and finished before ``until``."""
                return sum(
                    x.ok
                    and t_alone < x.start
                    and x.end < until
                    and (x.node == CUT) == (side == "minority")
                    for x in load.all_calls()
                )

            wait_for(lambda: split_acked("minority") >= 60 and split_acked("majority") >= 60,
                     "writes on both sides of the split", 30)  # fmt: skip
            t_heal = time.monotonic()
            lab.heal(CUT)
            log("healed")

            def rejoined() -> bool:
                for n in majority:
                    row = members_of(n).get(CUT, {})
                    if row.get("status") != "alive" or row.get("incarnation", -1) <= inc_before:
                        return False
                return True

            wait_for(rejoined, f"{CUT} alive again at a higher incarnation", 30,
                     describe=c.describe)  # fmt: skip
            t_rejoin = time.monotonic()
            c.wait_converged(names)
            t_converged = time.monotonic()
            log(f"{CUT} rejoined {t_rejoin - t_heal:.1f} s after the heal; converged")
            load.wait_acked(150, "after the heal", since=t_converged)
            split = {side: split_acked(side, t_heal) for side in ("minority", "majority")}

        def one_each() -> bool:
            where = active_on(c.live())
            return set(where) == set(COUNTERS) and all(len(v) == 1 for v in where.values())

        wait_for(one_each, "one activation per counter", 30, describe=c.describe)
        check_one_activation_each(c)
        calls = load.all_calls()
        a = audit(p1, load)

        def timeline(x: Call) -> dict[str, Any]:
            return {**vars(x), "start": x.start - t_cut, "end": x.end - t_cut}

        counters = {}
        for name in COUNTERS:
            mine = [x for x in calls if x.counter == name]
            counters[name] = {
                "value": invoke(p1, name, "value"),
                "applied": len(a.applied[name]),
                "acked": sum(x.ok for x in mine),
                "sent": len(mine),
                "lost": [timeline(x) for x in a.lost[name]],
                "invented": a.invented[name],
            }

        failed = [x for x in calls if not x.ok]
        return {
            "incarnation_before": inc_before,
            "after": {n: members_of(c.nodes[n]) for n in names},
            "split_acked": split,
            "counters": counters,
            "calls": len(calls),
            "failed": len(failed),
            "failures": sorted({_error_code(x.error) for x in failed}),
            "failed_after_heal": [timeline(x) for x in failed if x.start > t_converged],
            "applied_twice": [timeline(x) for x in a.duplicates()],
            "stale": c.stale_activations(),
            "t": {
                "setup_s": setup_s,
                "cut_done_s": t_cut_done - t_cut,
                "heal_s": t_heal - t_cut,
                "converged_s": t_converged - t_cut,
                "majority_dead_s": t_majority - t_cut,
                "minority_alone_s": t_alone - t_cut,
                "rejoin_s": t_rejoin - t_heal,
                "total_s": time.monotonic() - t0,
            },
        }
    finally:
        lab.close()


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Keep stdout for the one JSON line (library prints go to stderr)."""
    saved = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = saved


if __name__ == "__main__":
    with _stdout_to_stderr():
        result = run_lab(Path(sys.argv[1]))
    print(json.dumps(result), flush=True)
