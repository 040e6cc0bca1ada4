"""Tier 5: the mesh with real ``spawnmesh run`` processes on loopback sharing one PostgreSQL.

Every node runs ``tests/mesh_app.py`` (unnamed write-through counters that can say where they
run). Load comes from HTTP clients (threads with keep-alive connections) adding 1 to many
counters through some nodes; each call is recorded with its start and end time, its node and
its outcome. Checked:

* invocations through every node reach one activation per actor (``/v1/actors`` of every node,
  ``where`` from every node, the CLI's ``actors --all`` and ``placement``, ``invoke`` against
  every node);
* a new node takes its share of actors under load without a restart of the others; then
  ``spawnmesh leave`` and SIGTERM take two nodes away under load, with zero failed calls and
  every counter equal to the increments acknowledged;
* SIGKILL of the owner of busy counters under load from the others: once every survivor marks
  it dead, every counter answers again from one survivor, no call started after that fails,
  and every acknowledged increment is there (a counter may exceed its acknowledged increments
  only by the calls that failed or were in flight at the kill: their outcome was unknown).

``spawnmesh_stale_activations_total`` (duplicate activations fenced off by the statestore) is
summed over the nodes at the end of each scenario and printed (``pytest -s``).
Needs ``SPAWNMESH_TEST_POSTGRES_URL`` (run under ``bash scripts/test-dbs.sh``).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import NodeProcess, http_get, new_key, run_cli, start_node, wait_for
from tests.test_statestore_sql import fresh_database

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
PYTHONPATH = os.environ.get("PYTHONPATH", "")
SYSTEM = "e2e"
COUNTERS = [f"c{i}" for i in range(24)]
CLIENTS = 6

FAST = (
    "--app", "mesh_app:system",
    "--set", "cluster.preset=local",
    "--set", "cluster.probe_interval_ms=500",
    "--set", "cluster.join_retry_min_ms=200",
    "--set", "cluster.join_retry_max_ms=1000",
    "--set", "actors.default_timeout_ms=20000",
)  # fmt: skip
"""Probes every 500 ms, suspicion 3 x 500 ms: a SIGKILLed node is dead in about 2-3 s."""


# -------------------------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    """Node processes sharing one PostgreSQL database and one statestore key."""

    tmp: Path
    db_url: str
    key: str = field(default_factory=new_key)
    nodes: dict[str, NodeProcess] = field(default_factory=dict)
    seed: str = ""
    stale_before_exit: dict[str, float] = field(default_factory=dict)
    """The stale-activation count of nodes that were stopped, read just before."""

    def start(self, *names: str) -> list[NodeProcess]:
        """Start nodes (in parallel) and wait until each is ready; the first node of the
        cluster is the seed of the others."""
        started = []
        for name in names:
            args = ["--name", name, *FAST]
            if self.seed:
                args += ["--set", f"cluster.seeds={self.seed}"]
            env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), PYTHONPATH]))}
            node = start_node(
                self.tmp / name, *args, key=self.key, url=self.db_url, env=env, wait=False
            )
            self.nodes[name] = node
            started.append(node)
            if not self.seed:
                node.wait_ready()
                self.seed = gossip_address(node)
        for node in started:
            node.wait_ready()
        return started

    def live(self) -> list[NodeProcess]:
        return [n for n in self.nodes.values() if n.proc.poll() is None]

    def names(self) -> list[str]:
        return [name for name, n in self.nodes.items() if n.proc.poll() is None]

    def describe(self) -> str:
        return "\n".join(
            f"{name} {n.url}: {status_of(n)}"
            for name, n in self.nodes.items()
            if n.proc.poll() is None
        )

    def wait_converged(self, names: list[str], timeout: float = 30.0) -> None:
        """Until every node in ``names`` sees exactly ``names`` alive and places the counters
        with one placement version."""

        def agreed() -> bool:
            versions = set()
            for name in names:
                node = self.nodes[name]
                if sorted(k for k, v in status_of(node).items() if v == "alive") != sorted(names):
                    return False
                body = get_json(node, f"/v1/placement/{SYSTEM}/{COUNTERS[0]}?parent=counter")
                if body is None or sorted(body["members"]) != sorted(names):
                    return False
                versions.add(body["placement_version"])
            return len(versions) == 1

        wait_for(agreed, f"{names} converged", timeout, describe=self.describe)

    def stale_activations(self) -> dict[str, float]:
        """``spawnmesh_stale_activations_total`` of every node: read now if it runs, else
        as read just before it was stopped."""
        out = dict(self.stale_before_exit)
        for name, n in self.nodes.items():
            if n.proc.poll() is None:
                out[name] = metric(n, "spawnmesh_stale_activations_total")
        return out

    def before_exit(self, name: str) -> NodeProcess:
        """Read a node's stale-activation count before stopping it; the node."""
        node = self.nodes[name]
        self.stale_before_exit[name] = metric(node, "spawnmesh_stale_activations_total")
        return node


@contextmanager
def cluster(tmp: Path) -> Iterator[Cluster]:
    with fresh_database("postgresql", tmp) as url:
        c = Cluster(tmp, url.render_as_string(hide_password=False))
        try:
            yield c
        finally:
            for node in c.nodes.values():
                node.kill()


def get_json(node: NodeProcess, path: str) -> Any:
    """The JSON reply of ``GET path`` (None if the node does not answer 200)."""
    try:
        status, body = http_get(node.url + path)
    except OSError:
        return None
    return json.loads(body) if status == 200 else None


def status_of(node: NodeProcess) -> dict[str, str]:
    body = get_json(node, "/v1/members")
    return {} if body is None else {r["name"]: r["status"] for r in body["members"]}


def gossip_address(node: NodeProcess) -> str:
    return str(get_json(node, "/v1/node")["cluster"]["gossip_address"])


def metric(node: NodeProcess, name: str) -> float:
    status, text = node.get("/metrics")
    assert status == 200
    values = [
        float(m.group(1))
        for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    ]
    return sum(values)


def active_on(nodes: list[NodeProcess]) -> dict[str, list[str]]:
    """Counter name -> the nodes reporting it active in ``/v1/actors``."""
    out: dict[str, list[str]] = {}
    for node in nodes:
        body = get_json(node, "/v1/actors?limit=100000")
        assert body is not None, node.describe()
        for row in body["actors"]:
            if row["system"] == SYSTEM:
                out.setdefault(row["name"], []).append(body["node"])
    return out


def invoke(node: NodeProcess, name: str, action: str, payload: object = None) -> Any:
    body = {"payload": payload, "parent": "counter"}
    status, reply = http_post(node.url, name, action, body)
    assert status == 200, (node.url, name, action, reply)
    return reply["value"]


def http_post(url: str, name: str, action: str, body: object) -> tuple[int, Any]:
    from tests.e2e import http_post_json

    return http_post_json(
        f"{url}/v1/systems/{SYSTEM}/actors/{name}/actions/{action}", body, timeout=30.0
    )


# ------------------------------------------------------------------------------------ the load


@dataclass
class Call:
    """One ``record`` (add 1) through a node: its id, when, where, and how it ended."""

    op: str
    counter: str
    node: str
    start: float
    end: float
    ok: bool
    error: str = ""


class Load:
    """``CLIENTS`` threads adding 1 to every counter in turn through ``targets`` (keep-alive
    HTTP, one connection per client and node), recording every call."""

    def __init__(self, targets: dict[str, NodeProcess], clients: int = CLIENTS) -> None:
        self.targets = dict(targets)
        self.calls: list[list[Call]] = [[] for _ in range(clients)]
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(40.0)
        assert not any(t.is_alive() for t in self._threads), "a load client did not stop"

    def _client(self, i: int) -> None:
        conns: dict[str, http.client.HTTPConnection] = {}
        names = list(self.targets)
        headers = {"Content-Type": "application/json"}
        k = i
        while not self._stop.is_set():
            op = f"{i}.{k}"
            body = json.dumps({"payload": op, "parent": "counter"}).encode()
            counter = COUNTERS[k % len(COUNTERS)]
            target = names[(k // len(COUNTERS) + i) % len(names)]
            k += 1
            node = self.targets[target]
            conn = conns.get(target)
            if conn is None:
                host, port = node.url.removeprefix("http://").split(":")
                conn = conns[target] = http.client.HTTPConnection(host, int(port), timeout=40)
            start = time.monotonic()
            try:
                conn.request(
                    "POST", f"/v1/systems/{SYSTEM}/actors/{counter}/actions/record", body, headers
                )
                resp = conn.getresponse()
                raw = resp.read()
                ok, error = resp.status == 200, "" if resp.status == 200 else raw.decode()
            except (OSError, http.client.HTTPException) as exc:
                ok, error = False, f"{type(exc).__name__}: {exc}"
                conn.close()
                del conns[target]
            self.calls[i].append(Call(op, counter, target, start, time.monotonic(), ok, error))
        for conn in conns.values():
            conn.close()

    def all_calls(self) -> list[Call]:
        return [c for per_client in self.calls for c in per_client]

    def acked(self) -> dict[str, int]:
        out = dict.fromkeys(COUNTERS, 0)
        for c in self.all_calls():
            out[c.counter] += c.ok
        return out

    def failed(self) -> list[Call]:
        return [c for c in self.all_calls() if not c.ok]

    def wait_acked(self, n: int, what: str, timeout: float = 30.0, since: float = 0.0) -> None:
        """Until ``n`` more calls that started after ``since`` were acknowledged."""
        wait_for(
            lambda: sum(c.ok and c.start > since for c in self.all_calls()) >= n,
            f"{n} acknowledged adds {what}",
            timeout,
        )


@dataclass
class Audit:
    """Which recorded calls each counter applied, against what the clients saw."""

    lost: dict[str, list[Call]]
    """Acknowledged calls missing from the counter's state."""
    invented: dict[str, list[str]]
    """Ids in the state that no client sent."""
    duplicated: dict[str, list[Call]]
    """Calls applied more than once."""
    applied: dict[str, list[str]]

    def assert_nothing_lost(self) -> None:
        lost = {k: v for k, v in self.lost.items() if v}
        assert not lost, f"acknowledged calls lost: {lost}"
        invented = {k: v for k, v in self.invented.items() if v}
        assert not invented, f"applied but never sent: {invented}"

    def duplicates(self) -> list[Call]:
        return [c for calls in self.duplicated.values() for c in calls]


def audit(node: NodeProcess, load: Load) -> Audit:
    """Read every counter's applied call ids through ``node`` and compare with ``load``."""
    calls = {c.op: c for c in load.all_calls()}
    lost: dict[str, list[Call]] = {}
    invented: dict[str, list[str]] = {}
    duplicated: dict[str, list[Call]] = {}
    applied: dict[str, list[str]] = {}
    for name in COUNTERS:
        ops = applied[name] = invoke(node, name, "ops")
        seen = set(ops)
        lost[name] = [c for c in calls.values() if c.counter == name and c.ok and c.op not in seen]
        invented[name] = [op for op in seen if op not in calls or calls[op].counter != name]
        dups = {op for op in seen if ops.count(op) > 1}
        duplicated[name] = [calls[op] for op in sorted(dups) if op in calls]
    return Audit(lost, invented, duplicated, applied)


def check_one_activation_each(c: Cluster, values: dict[str, int] | None = None) -> dict[str, str]:
    """Every counter is active on exactly one live node, which every node names with
    ``where`` (after the read) and ``placement``; values equal ``values`` if given."""
    nodes = c.live()
    for name in COUNTERS:  # activate every counter (through every node in turn)
        got = [invoke(n, name, "value") for n in nodes]
        assert len(set(got)) == 1, (name, got)
        if values is not None:
            assert got[0] == values[name], (name, got[0], values[name])
    where = active_on(nodes)
    owner: dict[str, str] = {}
    for name in COUNTERS:
        assert len(where.get(name, [])) == 1, (name, where.get(name), c.describe())
        owner[name] = where[name][0]
        assert {invoke(n, name, "where") for n in nodes} == {owner[name]}
    return owner


def report(scenario: str, c: Cluster, **figures: object) -> None:
    stale = c.stale_activations()
    extra = " ".join(f"{k}={v}" for k, v in figures.items())
    print(
        f"\n[{scenario}] stale_activations_total per node {stale} "
        f"(sum {sum(stale.values()):g}) {extra}"
    )


# ---------------------------------------------------------------------------------- scenarios


def test_routing_join_leave_and_sigterm_under_load(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        c.start("n1", "n2", "n3")
        c.wait_converged(["n1", "n2", "n3"])
        n1, n2, n3 = (c.nodes[n] for n in ("n1", "n2", "n3"))

        # Invocations through every node reach one activation per actor.
        for name in COUNTERS:
            for j, node in enumerate((n1, n2, n3)):
                assert invoke(node, name, "add", 1) == j + 1
        values = {name: 3 for name in COUNTERS}
        owner = check_one_activation_each(c, values)
        assert set(owner.values()) == {"n1", "n2", "n3"}

        # The CLI: actors --all names the same owners; placement too; invoke via any node.
        listed = run_cli("actors", "--all", "--json", "--node", n2.url).ok().json()
        assert {a["name"]: r["node"] for r in listed for a in r["actors"]} == owner
        name = COUNTERS[7]
        for node in (n1, n2, n3):
            out = (
                run_cli(
                    "placement", SYSTEM, name, "--parent", "counter", "--json", "--node", node.url
                )
                .ok()
                .json()
            )
            assert out["owner"] == owner[name], out
            got = (
                run_cli(
                    "invoke",
                    "--node",
                    node.url,
                    SYSTEM,
                    name,
                    "add",
                    "--data",
                    "1",
                    "--parent",
                    "counter",
                )
                .ok()
                .json()
            )
            values[name] += 1
            assert got == values[name]

        with Load({"n1": n1, "n2": n2}) as load:
            load.wait_acked(100, "before the join")

            # A new node joins under load and takes its share without restarting anyone.
            (n4,) = c.start("n4")
            c.wait_converged(["n1", "n2", "n3", "n4"])
            t_join = time.monotonic()
            load.wait_acked(100, "after the join", since=t_join)
            mine = wait_for(
                lambda: sorted(active_on([n4]).keys()) or None,
                "n4 hosting some counters",
                15,
                describe=c.describe,
            )
            assert 0 < len(mine) < len(COUNTERS)

            # `spawnmesh leave` on n3 and SIGTERM on n4, under load from n1 and n2.
            c.before_exit("n3")
            out = run_cli("leave", "--node", n3.url).ok()
            assert "shutting down" in out.stdout, out
            assert n3.wait_exit(20).returncode == 0, n3.describe()
            c.wait_converged(["n1", "n2", "n4"])
            load.wait_acked(50, "after n3 left", since=time.monotonic())
            gone = c.before_exit("n4").stop(signal.SIGTERM, timeout=20)
            assert gone.returncode == 0, n4.describe()
            c.wait_converged(["n1", "n2"])
            load.wait_acked(50, "after n4 stopped", since=time.monotonic())

        failed = load.failed()
        assert failed == [], f"{len(failed)} failed calls, first: {failed[:3]}"
        a = audit(n1, load)
        a.assert_nothing_lost()
        # Graceful departures lose no answer, so no call runs twice. Until 2026-11-23 about
        # one run in 14 had one, most likely from the defect the DNS lab showed: requests read
        # in one batch with a GoAway ran after their connection was closed, answers dropped.
        assert a.duplicates() == [], f"calls applied twice: {a.duplicates()[:3]}"
        for name in COUNTERS:
            values[name] += len(a.applied[name])
        check_one_activation_each(c, values)  # what was applied is what the counters say
        report(
            "join/leave/sigterm",
            c,
            calls=len(load.all_calls()),
            failed=len(failed),
            n4_took=len(mine),
            applied_twice=len(a.duplicates()),
        )


def test_sigkill_of_an_owner_under_load(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        c.start("n1", "n2", "n3")
        c.wait_converged(["n1", "n2", "n3"])
        owner = check_one_activation_each(c)
        victim_name = owner[COUNTERS[0]]
        victim = c.nodes[victim_name]
        survivors = {n: c.nodes[n] for n in c.names() if n != victim_name}
        victims_counters = [n for n in COUNTERS if owner[n] == victim_name]
        assert victims_counters

        with Load(survivors) as load:
            load.wait_acked(200, "before the kill")
            c.before_exit(victim_name)
            t_kill = time.monotonic()
            victim.kill()
            wait_for(
                lambda: all(status_of(s).get(victim_name) == "dead" for s in survivors.values()),
                f"{victim_name} dead at every survivor",
                30,
                describe=c.describe,
            )
            t_notice = time.monotonic()
            # every counter answers again, through both survivors, after the notice
            wait_for(
                lambda: (
                    {
                        (c_.counter, c_.node)
                        for c_ in load.all_calls()
                        if c_.ok and c_.start > t_notice
                    }
                    >= {(n, s) for n in COUNTERS for s in survivors}
                ),
                "every counter acknowledged through every survivor after the notice",
                30,
                describe=c.describe,
            )

        calls = load.all_calls()
        failed = load.failed()
        late = [f for f in failed if f.start > t_notice]
        assert late == [], f"calls started after the notice failed: {late[:3]}"
        acked = load.acked()
        overlapping = {n: 0 for n in COUNTERS}  # outcome unknown: in flight at the kill
        for call in calls:
            if call.start <= t_kill <= call.end:
                overlapping[call.counter] += 1
        failures = {n: sum(f.counter == n for f in failed) for n in COUNTERS}
        owner_after = check_one_activation_each(c)
        assert victim_name not in owner_after.values()
        a = audit(next(iter(survivors.values())), load)
        a.assert_nothing_lost()
        # Only a call whose outcome was unknown (it failed, or was in flight at the kill) may
        # have been applied twice: the victim applied it, its reply was lost, and it was
        # retried on the new owner.
        unknown = [x for x in a.duplicates() if not x.ok or x.start <= t_kill <= x.end]
        assert unknown == a.duplicates(), f"known calls applied twice: {a.duplicates()[:3]}"
        surplus = {}
        for name in COUNTERS:
            value = invoke(survivors[owner_after[name]], name, "value")
            assert value == len(a.applied[name]), (name, value, len(a.applied[name]))
            assert value >= acked[name], (name, value, acked[name])
            assert value <= acked[name] + failures[name] + overlapping[name], (
                name,
                value,
                acked[name],
                failures[name],
                overlapping[name],
            )
            surplus[name] = value - acked[name]
        report(
            "sigkill",
            c,
            calls=len(calls),
            failed_in_window=len(failed),
            detect_s=f"{t_notice - t_kill:.1f}",
            victim_counters=len(victims_counters),
            in_flight_at_kill=sum(overlapping.values()),
            surplus=sum(surplus.values()),
            applied_twice=len(a.duplicates()),
        )


def test_frozen_owner_is_failed_over_and_rejoins(tmp_path: Path) -> None:
    """SIGSTOP the owner of busy counters (its sockets stay open, nothing answers): once the
    others mark it dead, calls in flight to it are re-routed at once instead of waiting for
    their deadline; SIGCONT: it learns it was declared dead, rejoins at a higher incarnation,
    its stale activations are fenced off, and nothing acknowledged is lost."""
    with cluster(tmp_path) as c:
        c.start("n1", "n2", "n3")
        names = ["n1", "n2", "n3"]
        c.wait_converged(names)
        owner = check_one_activation_each(c)
        frozen_name = owner[COUNTERS[0]]
        frozen = c.nodes[frozen_name]
        others = {n: c.nodes[n] for n in names if n != frozen_name}
        incarnation = next(
            m["incarnation"] for m in get_json(frozen, "/v1/members")["members"] if m["self"]
        )
        with Load(others) as load:
            load.wait_acked(200, "before the freeze")
            t_stop = time.monotonic()
            os.kill(frozen.pid, signal.SIGSTOP)
            try:
                wait_for(
                    lambda: all(status_of(s).get(frozen_name) == "dead" for s in others.values()),
                    f"{frozen_name} dead at the others",
                    30,
                    describe=c.describe,
                )
                t_notice = time.monotonic()
                load.wait_acked(100, "after the notice", since=t_notice)
            finally:
                os.kill(frozen.pid, signal.SIGCONT)
            t_cont = time.monotonic()

            def back() -> bool:
                rows = [get_json(s, "/v1/members") for s in others.values()]
                return all(
                    r is not None
                    and any(m["name"] == frozen_name and m["status"] == "alive"
                            and m["incarnation"] > incarnation for m in r["members"])
                    for r in rows
                )  # fmt: skip

            wait_for(back, f"{frozen_name} alive again", 30, describe=c.describe)
            c.wait_converged(names)
            load.wait_acked(100, "after the rejoin", since=time.monotonic())

        calls = load.all_calls()
        failed = load.failed()
        assert [x for x in failed if x.start > t_notice] == [], failed[:3]
        # Calls that were waiting on the frozen node when it was declared dead were re-routed
        # then, not left to their 20 s deadline.
        stuck = [x for x in calls if x.start < t_notice < x.end and x.end > t_notice + 5.0]
        assert stuck == [], f"calls held past the notice: {stuck[:3]}"
        a = audit(others[next(iter(others))], load)
        a.assert_nothing_lost()
        unknown = [x for x in a.duplicates() if not x.ok or x.start <= t_stop]
        assert unknown == a.duplicates(), f"calls applied twice: {a.duplicates()[:3]}"
        owner_after = check_one_activation_each(c)
        for name in COUNTERS:
            assert invoke(c.nodes[owner_after[name]], name, "value") == len(a.applied[name])
        report(
            "sigstop",
            c,
            calls=len(calls),
            failed_in_window=len(failed),
            detect_s=f"{t_notice - t_stop:.1f}",
            frozen_s=f"{t_cont - t_stop:.1f}",
            applied_twice=len(a.duplicates()),
            owned_after=sum(o == frozen_name for o in owner_after.values()),
        )
