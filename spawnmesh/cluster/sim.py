"""Deterministic discrete-event simulator for the SWIM core (no trio, no sockets, no clocks).

Runs the real :class:`~spawnmesh.cluster.swim.Swim` with the real encoding over a simulated
network (delay, loss, duplication, partitions, one-way cuts, clogging, CPU-starved nodes) and
checks invariants. One seed reproduces a whole run::

    python -m spawnmesh.cluster.sim --seed 1234 --scenario crash --nodes 50
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from spawnmesh import clock
from spawnmesh.cluster.broadcasts import BroadcastQueue
from spawnmesh.cluster.config import PRESETS, SwimConfig, lan
from spawnmesh.cluster.messages import Addr, MemberState, PushPull, encode
from spawnmesh.cluster.state import Status
from spawnmesh.cluster.swim import EventKind, MemberEvent, Output, Swim, TcpKind

_DELIVER, _WAKE, _TCP, _ACTION = 0, 1, 2, 3
STARVE_MS = 1_000
_PUSH_PULL_PREFIX = encode([PushPull(False, "", [])])[:5]
"""A packet whose first message is a push-pull starts with these bytes (header, code 9)."""
"""How often a CPU-starved node runs in ``starve-frac`` (ms): it answers up to this late."""
_NEVER = 1 << 62
_LIVE_KINDS = frozenset({EventKind.JOIN, EventKind.ALIVE, EventKind.UPDATE, EventKind.SUSPECT})


@dataclass(slots=True)
class NetConfig:
    """Network fault knobs (all mutable during a run through :class:`Sim` methods)."""

    delay_min_ms: int = 1
    """Fixed part of one-way latency (ms)."""
    delay_jitter_ms: float = 2.0
    """Mean of the exponential extra latency (ms)."""
    loss: float = 0.0
    """Probability a datagram is dropped (TCP exchanges are not lossy, only cut)."""
    duplicate: float = 0.0
    """Probability a datagram is delivered twice."""


@dataclass(slots=True)
class SimNode:
    """One simulated process: its core, inbox and fault flags."""

    idx: int
    name: str
    addr: Addr
    swim: Swim
    gen: int = 0
    running: bool = True
    leaving: bool = False
    starve_every_ms: int = 0
    inbox: list[tuple[int, int, Addr, bytes]] = field(default_factory=list)
    wake_at: int = _NEVER


@dataclass(slots=True)
class SimReport:
    """Outcome of one scenario run."""

    scenario: str
    seed: int
    nodes: int
    lifeguard: bool = True
    tcp_ping: bool = True
    preset: str = "lan"
    duration_ms: int = 60_000
    """The requested duration (what the replay command passes back)."""
    overrides: dict[str, int | bool] = field(default_factory=dict)
    """``SwimConfig`` fields set on top of the preset (``--set name=value``)."""
    sim_ms: int = 0
    wall_s: float = 0.0
    datagrams: int = 0
    udp_bytes: int = 0
    tcp_bytes: int = 0
    """Bytes of completed TCP exchanges (request + reply; refused connections carry none)."""
    false_dead: int = 0
    false_suspect: int = 0
    detect_max_ms: int = -1
    converged_ms: int = -1
    violations: list[str] = field(default_factory=list)
    notes: dict[str, float] = field(default_factory=dict)
    samples: list[int] = field(default_factory=list)
    """Per-event measurements of the scenario (``detect``: ms from a crash until all knew)."""

    def replay_command(self) -> str:
        """The one-line command that replays this run."""
        extra = "" if self.lifeguard else " --no-lifeguard"
        extra += "" if self.tcp_ping else " --no-tcp-ping"
        extra += "" if self.preset == "lan" else f" --preset {self.preset}"
        for name, value in sorted(self.overrides.items()):
            extra += f" --set {name}={str(value).lower() if isinstance(value, bool) else value}"
        return (
            f"python -m spawnmesh.cluster.sim --seed {self.seed} --scenario {self.scenario}"
            f" --nodes {self.nodes} --seconds {self.duration_ms / 1000:g}{extra}"
        )

    def summary(self) -> str:
        """Human-readable one-paragraph result."""
        speed = self.nodes * self.sim_ms / 1000 / max(self.wall_s, 1e-9)
        notes = " ".join(f"{k}={v:g}" for k, v in sorted(self.notes.items()))
        return (
            f"{self.scenario} n={self.nodes} seed={self.seed} lifeguard={self.lifeguard}"
            f" sim={self.sim_ms / 1000:g}s wall={self.wall_s:.2f}s"
            f" speed={speed:,.0f} node-s/s datagrams={self.datagrams}"
            f" udp_bytes={self.udp_bytes} tcp_bytes={self.tcp_bytes}"
            f" false_dead={self.false_dead} false_suspect={self.false_suspect}"
            f" detect_max_ms={self.detect_max_ms} converged_ms={self.converged_ms}"
            f" {notes} violations={len(self.violations)}"
        )


class Sim:
    """A cluster of ``n`` Swim cores on one simulated network, driven by a priority queue."""

    def __init__(
        self,
        n: int,
        seed: int,
        config: SwimConfig | None = None,
        net: NetConfig | None = None,
        prefill: bool = True,
        discovery: bool = True,
    ) -> None:
        self.seed = seed
        self.config = config or lan()
        self.net = net or NetConfig()
        self.now = 0
        self.rng = random.Random(f"{seed}:net")
        self._heap: list[tuple[int, int, int, int, Any]] = []
        self._seq = 0
        self.nodes: list[SimNode] = []
        self.by_addr: dict[Addr, SimNode] = {}
        self.by_name: dict[str, SimNode] = {}
        self.group: list[int] = [0] * n
        self.cut: set[tuple[int, int]] = set()
        self.clog_out: list[int] = [0] * n
        self.clog_in: list[int] = [0] * n
        self.views: list[set[str]] = []
        self.last_inc: dict[tuple[int, str], int] = {}
        self.violations: list[str] = []
        self.false_dead = 0
        self.false_suspect = 0
        self.false_dead_samples: list[str] = []
        self.left_seen_dead = 0
        """``dead`` events about a node that left gracefully (0 unless faults hid its news)."""
        self.crashed_at: dict[str, int] = {}
        self.detected: dict[tuple[str, int], int] = {}
        self.datagrams = 0
        self.udp_bytes = 0
        self.tcp_bytes = 0
        self.push_pull_bytes = 0
        """The part of ``tcp_bytes`` that was push-pull (anti-entropy, join) exchanges."""
        self.false_dead_kinds = {"about_starved": 0, "by_starved": 0, "healthy": 0}
        """False deaths split by who was starved: the subject, else the observer, else neither."""
        self.trace: Callable[[str], None] | None = None
        """If set, receives one readable line per membership event and per fault."""
        self.trace_member: str | None = None
        """Restrict event lines to events about this member name."""
        for i in range(n):
            name = f"n{i:04d}"
            node = SimNode(i, name, (f"10.{i // 250}.{i % 250}.1", 7946), self._core(i, name, 0))
            self.nodes.append(node)
            self.by_addr[node.addr] = node
            self.by_name[name] = node
            self.views.append({name})
        self.discovery_interval_ms = self.config.reconnect_interval_ms if discovery else 0
        """Period of the modelled discovery loop (see ``_discovery_round``); 0 disables."""
        if self.discovery_interval_ms:
            self.at(self.discovery_interval_ms, self._discovery_round)
        if prefill:
            self._prefill()
        else:
            for node in self.nodes[1:]:
                self.at(node.idx * 10, partial(self._join, node, [self.nodes[0].addr]))
        for node in self.nodes:
            self._reschedule(node, 0)

    # -- setup --------------------------------------------------------------------------------

    def _core(self, i: int, name: str, gen: int) -> Swim:
        rng = random.Random(f"{self.seed}:{i}:{gen}")
        addr = (f"10.{i // 250}.{i % 250}.{1 + gen}", 7946)
        return Swim(name, addr, b"", self.config, rng, self.now)

    def _prefill(self) -> None:
        """Start converged: every core learns every member by one merge, with empty queues."""
        rows = [MemberState(x.name, 0, x.addr, b"", int(Status.ALIVE)) for x in self.nodes]
        state = encode([PushPull(False, "sim", rows)])
        everyone = {x.name for x in self.nodes}
        for node in self.nodes:
            node.swim.merge_push_pull(state, 0)  # n join events, all at incarnation 0
            self.views[node.idx] = set(everyone)
            node.swim.queue = BroadcastQueue()

    def _join(self, node: SimNode, seeds: list[Addr]) -> None:
        self._handle(node, node.swim.join(seeds, self.now))

    def _discovery_round(self) -> None:
        """Model the shell's discovery loop: each running node resolves one random running peer
        and joins it if that peer is not live at that address in its view (heals islands)."""
        up = [x for x in self.nodes if self._is_up(x)]
        if len(up) > 1:
            for node in up:
                peer = self.rng.choice(up)
                if peer is node:
                    continue
                view = node.swim.member(peer.name)
                if view is None or view.status > Status.SUSPECT or view.addr != peer.addr:
                    self._join(node, [peer.addr])
        if self.discovery_interval_ms:
            self.at(self.now + self.discovery_interval_ms, self._discovery_round)

    # -- scheduling ---------------------------------------------------------------------------

    def _push(self, t: int, kind: int, idx: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, idx, payload))

    def at(self, t_ms: int, action: Callable[[], None]) -> None:
        """Run ``action`` at simulated time ``t_ms``."""
        self._push(t_ms, _ACTION, -1, action)

    def _reschedule(self, node: SimNode, now: int) -> None:
        d = node.swim.next_deadline_ms()
        if d <= now or node.inbox:  # a starved node reads its inbox at its next run
            d = now + 1
        every = node.starve_every_ms
        if every:
            d = -(-d // every) * every
        if d < node.wake_at:
            node.wake_at = d
            self._push(d, _WAKE, node.idx, node.gen)

    def run(self, until_ms: int) -> None:
        """Process events up to simulated time ``until_ms``."""
        heap = self._heap
        nodes = self.nodes
        pop = heapq.heappop
        while heap and heap[0][0] <= until_ms:
            t, _, kind, idx, payload = pop(heap)
            self.now = t
            if kind == _DELIVER:
                node = nodes[idx]
                gen, src_addr, data = payload
                if not node.running or gen != node.gen:
                    continue
                if node.starve_every_ms:
                    node.inbox.append((_DELIVER, -1, src_addr, data))
                    self._reschedule(node, t)
                    continue
                self._handle(node, node.swim.receive(src_addr, data, t))
            elif kind == _WAKE:
                node = nodes[idx]
                if payload != node.gen or not node.running or node.wake_at != t:
                    continue
                node.wake_at = _NEVER
                out = node.swim.tick(t)
                if node.inbox:
                    self._handle(node, out, reschedule=False)
                    inbox, node.inbox = node.inbox, []
                    for item in inbox:
                        self._process(node, item)
                    self._reschedule(node, t)
                else:
                    self._handle(node, out)
                if node.leaving and node.swim.leave_complete:
                    node.running = False
            elif kind == _TCP:
                node = nodes[idx]
                gen, src_idx, src_addr, data = payload
                if not node.running or gen != node.gen:
                    continue
                if node.starve_every_ms:
                    node.inbox.append((_TCP, src_idx, src_addr, data))
                    self._reschedule(node, t)
                    continue
                self._process(node, (_TCP, src_idx, src_addr, data))
            else:
                payload()
        self.now = until_ms

    def _process(self, node: SimNode, item: tuple[int, int, Addr, bytes]) -> None:
        kind, src_idx, src_addr, data = item
        t = self.now
        if kind == _DELIVER:
            self._handle(node, node.swim.receive(src_addr, data, t))
            return
        reply, out = node.swim.serve_tcp(src_addr, data, t)
        self._handle(node, out)
        src = self.nodes[src_idx]
        size = len(data) + (0 if reply is None else len(reply))
        self.tcp_bytes += size
        if data[:5] == _PUSH_PULL_PREFIX:
            self.push_pull_bytes += size
        if reply is not None and self._open(node.idx, src_idx):
            self._push(
                t + self._delay(node.idx, src_idx), _DELIVER, src_idx, (src.gen, node.addr, reply)
            )

    # -- network ------------------------------------------------------------------------------

    def _open(self, a: int, b: int) -> bool:
        ga, gb = self.group[a], self.group[b]
        return ga == gb or (ga, gb) not in self.cut

    def _delay(self, a: int, b: int) -> int:
        net = self.net
        d = net.delay_min_ms + int(self.rng.expovariate(1.0 / net.delay_jitter_ms))
        return d + self.clog_out[a] + self.clog_in[b]

    def _handle(self, node: SimNode, out: Output, reschedule: bool = True) -> None:
        if out.datagrams:
            net = self.net
            rng = self.rng
            by_addr = self.by_addr
            src = node.idx
            for addr, data in out.datagrams:
                self.datagrams += 1
                self.udp_bytes += len(data)
                dst = by_addr.get(addr)
                if dst is None or not self._open(src, dst.idx):
                    continue
                if net.loss and rng.random() < net.loss:
                    continue
                payload = (dst.gen, node.addr, data)
                self._push(self.now + self._delay(src, dst.idx), _DELIVER, dst.idx, payload)
                if net.duplicate and rng.random() < net.duplicate:
                    self._push(self.now + self._delay(src, dst.idx), _DELIVER, dst.idx, payload)
        if out.events:
            self._on_events(node, out.events)
        for req in out.tcp_requests:
            dst = self.by_addr.get(req.addr)
            if dst is None or not self._open(node.idx, dst.idx):
                continue
            if req.kind is TcpKind.PING and not self.config.tcp_ping:
                continue
            d = self._delay(node.idx, dst.idx)
            self._push(self.now + d, _TCP, dst.idx, (dst.gen, node.idx, node.addr, req.data))
        if reschedule:
            self._reschedule(node, self.now)

    # -- checkers -----------------------------------------------------------------------------

    def _is_up(self, node: SimNode) -> bool:
        return node.running and not node.leaving

    def _on_events(self, node: SimNode, events: list[MemberEvent]) -> None:
        view = self.views[node.idx]
        obs = node.idx
        for ev in events:
            mv = ev.member
            name = mv.name
            key = (obs, name)
            last = self.last_inc.get(key)
            if last is not None and mv.incarnation < last:
                self.violations.append(
                    f"t={self.now} {node.name} saw {name} incarnation drop {last}->{mv.incarnation}"
                )
            self.last_inc[key] = mv.incarnation
            kind = ev.kind
            if self.trace is not None and self.trace_member in (None, name):
                self.trace(f"t={self.now} {node.name}: {name} {kind.value} @{mv.incarnation}")
            if kind in _LIVE_KINDS:
                view.add(name)
                if kind is EventKind.SUSPECT:
                    subject = self.by_name.get(name)
                    if subject is not None and self._is_up(subject):
                        self.false_suspect += 1
                continue
            view.discard(name)
            subject = self.by_name.get(name)
            if subject is None:
                continue
            if kind is EventKind.DEAD:
                if self._is_up(subject):
                    self.false_dead += 1
                    kinds = self.false_dead_kinds
                    if subject.starve_every_ms:
                        kinds["about_starved"] += 1
                    elif node.starve_every_ms:
                        kinds["by_starved"] += 1
                    else:
                        kinds["healthy"] += 1
                    if len(self.false_dead_samples) < 5:
                        self.false_dead_samples.append(f"t={self.now} {node.name} -> {name}")
                elif subject.leaving:
                    self.left_seen_dead += 1
                    if len(self.false_dead_samples) < 5:
                        self.false_dead_samples.append(f"t={self.now} {node.name} -> {name} (left)")
            crashed = self.crashed_at.get(name)
            if crashed is not None and (name, obs) not in self.detected:
                self.detected[(name, obs)] = self.now - crashed

    def truth(self) -> set[str]:
        """Names of nodes that are running and not leaving."""
        return {x.name for x in self.nodes if self._is_up(x)}

    def disagreements(self) -> list[str]:
        """Live nodes whose view of the live set differs from the truth."""
        truth = self.truth()
        return [x.name for x in self.nodes if self._is_up(x) and self.views[x.idx] != truth]

    def run_until_agreement(self, limit_ms: int, step_ms: int = 1000) -> int:
        """Run until every live view equals the truth; return when (ms) or -1 past the limit."""
        while self.now < limit_ms:
            if not self.disagreements():
                return self.now
            self.run(min(limit_ms, self.now + step_ms))
        return self.now if not self.disagreements() else -1

    def detection_bound_ms(self) -> int:
        """Crash detection bound: 5 probe periods + max suspicion + 10 s of dissemination."""
        n = len(self.nodes)
        return 5 * self.config.probe_interval_ms + self.config.suspicion_max_ms(n) + 10_000

    def check_crash_detection(self, bound_ms: int) -> int:
        """Record a violation for each live observer that missed a crash within the bound."""
        worst = -1
        for name, t0 in self.crashed_at.items():
            if self.by_name[name].running:
                continue
            for obs in self.nodes:
                if not self._is_up(obs) or obs.name == name:
                    continue
                dt = self.detected.get((name, obs.idx))
                if dt is None:
                    if self.now - t0 > bound_ms:
                        self.violations.append(f"{obs.name} never saw crash of {name}")
                    continue
                worst = max(worst, dt)
                if dt > bound_ms:
                    self.violations.append(f"{obs.name} saw crash of {name} after {dt} ms")
        return worst

    # -- faults -------------------------------------------------------------------------------

    def _fault(self, what: str) -> None:
        if self.trace is not None:
            self.trace(f"t={self.now} FAULT {what}")

    def crash(self, i: int) -> None:
        """Stop node ``i`` abruptly (it answers nothing)."""
        self._fault(f"crash {self.nodes[i].name}")
        node = self.nodes[i]
        node.running = False
        node.inbox.clear()
        self.crashed_at[node.name] = self.now

    def restart(self, i: int, seeds: list[int]) -> None:
        """Start node ``i`` again: same name, new address, incarnation 0; join via ``seeds``."""
        self._fault(f"restart {self.nodes[i].name}")
        node = self.nodes[i]
        del self.by_addr[node.addr]
        node.gen += 1
        node.swim = self._core(i, node.name, node.gen)
        node.addr = node.swim.addr
        self.by_addr[node.addr] = node
        node.running, node.leaving, node.wake_at = True, False, _NEVER
        self.crashed_at.pop(node.name, None)
        self.views[i] = {node.name}
        for key in [k for k in self.last_inc if k[0] == i]:
            del self.last_inc[key]
        self._join(node, [self.nodes[s].addr for s in seeds])

    def leave(self, i: int) -> None:
        """Node ``i`` leaves gracefully (it stops once its leave news is spread)."""
        self._fault(f"leave {self.nodes[i].name}")
        node = self.nodes[i]
        node.leaving = True
        self._handle(node, node.swim.leave(self.now))

    def partition(self, groups: list[list[int]]) -> None:
        """Split into ``groups`` (nodes not listed stay in group 0); cut every cross pair."""
        self._fault(f"partition {groups}")
        self.group = [0] * len(self.nodes)
        for g, members in enumerate(groups, start=1):
            for i in members:
                self.group[i] = g
        ids = set(self.group)
        self.cut = {(a, b) for a in ids for b in ids if a != b}

    def one_way(self, sources: list[int], targets: list[int]) -> None:
        """Drop everything from ``sources`` to ``targets`` (the reverse direction still works)."""
        self._fault(f"one-way cut {sources} -> {targets}")
        self.group = [0] * len(self.nodes)
        for i in sources:
            self.group[i] = 1
        for i in targets:
            self.group[i] = 2
        self.cut = {(1, 2)}

    def heal(self) -> None:
        """Remove every partition and one-way cut."""
        self._fault("heal")
        self.group = [0] * len(self.nodes)
        self.cut = set()

    def clog(self, i: int, out_ms: int = 0, in_ms: int = 0) -> None:
        """Add latency to node ``i``'s outbound and/or inbound traffic."""
        self._fault(f"clog {self.nodes[i].name} out +{out_ms} ms in +{in_ms} ms")
        self.clog_out[i] = out_ms
        self.clog_in[i] = in_ms

    def starve(self, i: int, every_ms: int) -> None:
        """Node ``i`` runs only every ``every_ms`` (timers and inbox late); 0 restores it."""
        self._fault(f"starve {self.nodes[i].name} every {every_ms} ms")
        node = self.nodes[i]
        node.starve_every_ms = every_ms
        node.wake_at = _NEVER
        self._reschedule(node, self.now)

    def report(self, scenario: str, wall_s: float) -> SimReport:
        """Collect the counters into a report."""
        return SimReport(
            scenario=scenario,
            seed=self.seed,
            nodes=len(self.nodes),
            lifeguard=self.config.lifeguard,
            sim_ms=self.now,
            wall_s=wall_s,
            datagrams=self.datagrams,
            udp_bytes=self.udp_bytes,
            tcp_bytes=self.tcp_bytes,
            false_dead=self.false_dead,
            false_suspect=self.false_suspect,
            violations=list(self.violations),
        )


# -- scenarios --------------------------------------------------------------------------------


def _pick(sim: Sim, k: int) -> list[int]:
    return sorted(random.Random(f"{sim.seed}:pick").sample(range(len(sim.nodes)), k))


def _scenario_steady(sim: Sim, duration_ms: int) -> SimReport:
    sim.run(duration_ms)
    rep = sim.report("steady", 0)
    if sim.disagreements():
        rep.violations.append(f"no agreement: {sim.disagreements()[:5]}")
    return rep


def _scenario_traffic(sim: Sim, duration_ms: int) -> SimReport:
    """Steady-state traffic per node and second over ``duration`` after a warm-up of five
    probe periods: datagrams and UDP bytes counted; TCP = push-pull at its steady rate (below)
    plus the other TCP exchanges (fallback pings) counted."""
    warm = 5 * sim.config.probe_interval_ms
    sim.run(warm)
    d0, u0, t0, p0 = sim.datagrams, sim.udp_bytes, sim.tcp_bytes, sim.push_pull_bytes
    sim.run(warm + duration_ms)
    rep = sim.report("traffic", 0)
    n = len(sim.nodes)
    per = n * duration_ms / 1000
    # Anti-entropy at large n runs every ceil(n / 32) x 30 s, longer than any affordable
    # window: its steady rate is one exchange (request + reply, each a full table) per node
    # per scaled interval, from the measured table size. Other TCP (fallback pings) is counted.
    table = len(sim.nodes[0].swim.push_pull_state())
    pp_rate = 2 * table * 1000 / sim.config.push_pull_scaled_ms(n)
    other_tcp = (sim.tcp_bytes - t0) - (sim.push_pull_bytes - p0)
    rep.notes.update(
        msgs_per_node_per_s=round((sim.datagrams - d0) / per, 2),
        udp_bytes_per_node_per_s=round((sim.udp_bytes - u0) / per, 1),
        push_pull_bytes_per_node_per_s=round(pp_rate, 1),
        tcp_bytes_per_node_per_s=round(pp_rate + other_tcp / per, 1),
        push_pull_table_bytes=table,
    )
    if sim.false_dead or sim.disagreements():
        rep.violations.append(f"{sim.false_dead} false deaths; disagree: {sim.disagreements()[:5]}")
    return rep


def _scenario_crash(sim: Sim, duration_ms: int) -> SimReport:
    n = len(sim.nodes)
    victims = _pick(sim, max(1, n // 20))
    for i in victims:
        sim.at(5_000, partial(sim.crash, i))
    bound = sim.detection_bound_ms()
    sim.run(max(duration_ms, 5_000 + bound + 1_000))
    worst = sim.check_crash_detection(bound)
    rep = sim.report("crash", 0)
    rep.detect_max_ms = worst
    rep.notes["bound_ms"] = bound
    rep.notes["crashed"] = len(victims)
    if sim.false_dead:
        rep.violations.append(f"{sim.false_dead} false deaths: {sim.false_dead_samples}")
    return rep


def _scenario_loss(sim: Sim, duration_ms: int) -> SimReport:
    sim.net.loss = 0.05
    sim.run(duration_ms)
    rep = sim.report("loss", 0)
    if sim.false_dead:
        rep.violations.append(f"{sim.false_dead} false deaths: {sim.false_dead_samples}")
    return rep


def _scenario_partition(sim: Sim, duration_ms: int) -> SimReport:
    n = len(sim.nodes)
    half = _pick(sim, n // 2)
    sim.at(5_000, lambda: sim.partition([half]))
    sim.at(65_000, sim.heal)
    sim.run(65_000)
    limit = 65_000 + 3 * sim.config.reconnect_interval_ms + 30_000
    t = sim.run_until_agreement(max(limit, duration_ms))
    rep = sim.report("partition", 0)
    rep.converged_ms = -1 if t < 0 else t - 65_000
    if t < 0:
        rep.violations.append(f"no agreement {limit - 65_000} ms after heal")
    return rep


def _scenario_isolate(sim: Sim, duration_ms: int) -> SimReport:
    (lone,) = _pick(sim, 1)
    sim.at(5_000, lambda: sim.partition([[lone]]))
    sim.at(45_000, sim.heal)
    sim.run(45_000)
    limit = 45_000 + 3 * sim.config.reconnect_interval_ms + 30_000
    t = sim.run_until_agreement(max(limit, duration_ms))
    rep = sim.report("isolate", 0)
    rep.converged_ms = -1 if t < 0 else t - 45_000
    if t < 0:
        rep.violations.append("no agreement after heal")
    return rep


def _scenario_oneway(sim: Sim, duration_ms: int) -> SimReport:
    (lone,) = _pick(sim, 1)
    others = [i for i in range(len(sim.nodes)) if i != lone]
    sim.at(5_000, lambda: sim.one_way([lone], others))
    sim.at(35_000, sim.heal)
    sim.run(35_000)
    t = sim.run_until_agreement(35_000 + 3 * sim.config.reconnect_interval_ms + 30_000)
    rep = sim.report("oneway", 0)
    rep.converged_ms = -1 if t < 0 else t - 35_000
    if t < 0:
        rep.violations.append("no agreement after heal")
    return rep


def _scenario_clog(sim: Sim, duration_ms: int) -> SimReport:
    (slow,) = _pick(sim, 1)
    sim.at(5_000, lambda: sim.clog(slow, out_ms=300, in_ms=300))
    sim.run(duration_ms)
    rep = sim.report("clog", 0)
    rep.notes["false_dead"] = sim.false_dead
    return rep


def _scenario_starve(sim: Sim, duration_ms: int) -> SimReport:
    (slow,) = _pick(sim, 1)
    sim.at(5_000, lambda: sim.starve(slow, 2_000))
    sim.run(duration_ms)
    rep = sim.report("starve", 0)
    rep.notes.update({f"false_dead_{k}": v for k, v in sim.false_dead_kinds.items()})
    rep.notes["starved_score"] = sim.nodes[slow].swim.awareness.score
    rep.notes["starved_probe_failures"] = sim.nodes[slow].swim.stats.probe_failures
    return rep


def _scenario_starve_many(sim: Sim, duration_ms: int) -> SimReport:
    slow = _pick(sim, 3)
    for i in slow:
        sim.at(5_000, partial(sim.starve, i, 3_000))
    sim.run(duration_ms)
    rep = sim.report("starve-many", 0)
    rep.notes["starved_probe_failures"] = sum(sim.nodes[i].swim.stats.probe_failures for i in slow)
    return rep


def _scenario_starve_frac(sim: Sim, duration_ms: int) -> SimReport:
    """5 % of the nodes (at least one) run only every ``STARVE_MS`` from t = 5 s on; false
    deaths are split by direction (about a starved node, by one, or between healthy ones)."""
    n = len(sim.nodes)
    slow = _pick(sim, max(1, n // 20))
    for i in slow:
        sim.at(5_000, partial(sim.starve, i, STARVE_MS))
    sim.run(duration_ms)
    rep = sim.report("starve-frac", 0)
    rep.notes.update({f"false_dead_{k}": v for k, v in sim.false_dead_kinds.items()})
    rep.notes["starved"] = len(slow)
    rep.notes["starved_probe_failures"] = sum(sim.nodes[i].swim.stats.probe_failures for i in slow)
    return rep


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile of ``values`` (``q`` in 0..1); -1 when empty."""
    if not values:
        return -1
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _scenario_detect(sim: Sim, duration_ms: int) -> SimReport:
    """Repeated crashes: every 20 probe periods (20 s on lan) from t = 5 s, ``max(1, n // 200)``
    random live nodes crash and restart 15 periods later. A sample is the time from a crash
    until every node that stayed up had the victim dead; a victim someone still holds live
    when it restarts is a violation."""
    n = len(sim.nodes)
    rng = random.Random(f"{sim.seed}:detect")
    per = max(1, n // 200)
    period = 20 * sim.config.probe_interval_ms
    wait = 15 * sim.config.probe_interval_ms
    samples: list[int] = []
    missed: list[str] = []

    def crash_round() -> None:
        up = [x.idx for x in sim.nodes if sim._is_up(x)]
        victims = rng.sample(up, min(per, len(up) - 2))
        observers = [i for i in up if i not in victims]
        for v in victims:
            sim.crash(v)
        sim.at(sim.now + wait, partial(finish, victims, observers))

    def finish(victims: list[int], observers: list[int]) -> None:
        live = [i for i in observers if sim._is_up(sim.nodes[i])]
        for v in victims:
            name = sim.nodes[v].name
            times = [sim.detected.get((name, o)) for o in live]
            for o in range(n):
                sim.detected.pop((name, o), None)
            if any(t is None for t in times):
                missed.append(f"t={sim.now} {name}")
            else:
                samples.append(max(t for t in times if t is not None))
            sim.restart(v, live[:3])

    t = 5_000
    while t + wait <= max(duration_ms, period):
        sim.at(t, crash_round)
        t += period
    sim.run(t)
    rep = sim.report("detect", 0)
    rep.samples = samples
    rep.detect_max_ms = max(samples, default=-1)
    rep.notes.update(
        crashes=len(samples) + len(missed),
        detect_p50_ms=percentile(samples, 0.5),
        detect_p99_ms=percentile(samples, 0.99),
    )
    if missed:
        rep.violations.append(f"{len(missed)} crashes not seen by all in {wait} ms: {missed[:5]}")
    if sim.false_dead:
        rep.violations.append(f"{sim.false_dead} false deaths: {sim.false_dead_samples}")
    return rep


def _scenario_leave(sim: Sim, duration_ms: int) -> SimReport:
    n = len(sim.nodes)
    leavers = _pick(sim, max(1, n // 10))
    for i in leavers:
        sim.at(5_000, partial(sim.leave, i))
    sim.run(5_001)
    t = sim.run_until_agreement(60_000)
    sim.run(max(duration_ms, 120_000))
    rep = sim.report("leave", 0)
    rep.converged_ms = -1 if t < 0 else t - 5_000
    if t < 0 or sim.disagreements():
        rep.violations.append("leavers not removed everywhere")
    for obs in sim.nodes:
        for i in leavers:
            if sim._is_up(obs) and obs.swim.member(sim.nodes[i].name) is not None:
                status = obs.swim.member(sim.nodes[i].name).status  # type: ignore[union-attr]
                if status is not Status.LEFT:
                    rep.violations.append(f"{obs.name} holds leaver {i} as {status.name}")
    if sim.false_dead or sim.left_seen_dead:
        rep.violations.append(
            f"{sim.false_dead} false deaths, {sim.left_seen_dead} leavers seen dead:"
            f" {sim.false_dead_samples}"
        )
    return rep


def _scenario_restart(sim: Sim, duration_ms: int) -> SimReport:
    n = len(sim.nodes)
    victims = _pick(sim, max(1, n // 20))
    seeds = [i for i in range(n) if i not in victims][:3]
    for i in victims:
        sim.at(5_000, partial(sim.crash, i))
        sim.at(45_000, partial(sim.restart, i, seeds))
    sim.run(45_000)
    t = sim.run_until_agreement(max(duration_ms, 120_000))
    rep = sim.report("restart", 0)
    rep.converged_ms = -1 if t < 0 else t - 45_000
    if t < 0:
        rep.violations.append("restarted nodes not alive everywhere")
    return rep


def _scenario_join(sim: Sim, duration_ms: int) -> SimReport:
    t = sim.run_until_agreement(max(duration_ms, 60_000))
    rep = sim.report("join", 0)
    rep.converged_ms = t
    if t < 0:
        rep.violations.append("cluster did not converge after joins")
    return rep


def _chaos_step(sim: Sim, rng: random.Random, log: list[str]) -> None:
    n = len(sim.nodes)
    up = [x.idx for x in sim.nodes if sim._is_up(x)]
    down = [x.idx for x in sim.nodes if not x.running]
    kind = rng.choice(["crash", "restart", "partition", "heal", "loss", "starve", "clog", "leave"])
    if kind in ("crash", "leave") and len(up) <= n // 2 + 1:
        kind = "restart"
    if kind == "restart" and not down:
        kind = "heal"
    if kind == "crash":
        i = rng.choice(up)
        sim.crash(i)
    elif kind == "leave":
        i = rng.choice(up)
        sim.leave(i)
    elif kind == "restart":
        i = rng.choice(down)
        sim.restart(i, rng.sample(up, min(3, len(up))))
    elif kind == "partition":
        side = rng.sample(range(n), rng.randrange(1, n // 2 + 1))
        if rng.random() < 0.3:
            others = [j for j in range(n) if j not in side]
            sim.one_way(side, others)
        else:
            sim.partition([side])
        i = len(side)
    elif kind == "heal":
        sim.heal()
        i = -1
    elif kind == "loss":
        sim.net.loss = rng.choice([0.0, 0.01, 0.05, 0.1])
        i = int(sim.net.loss * 100)
    elif kind == "starve":
        i = rng.randrange(n)
        sim.starve(i, rng.choice([0, 1_000, 3_000]))
    else:
        i = rng.randrange(n)
        sim.clog(i, rng.choice([0, 50, 400]), rng.choice([0, 50, 400]))
    log.append(f"t={sim.now} {kind} {i}")


def _scenario_chaos(sim: Sim, duration_ms: int) -> SimReport:
    """Random faults (crash, restart, leave, partitions, loss, starvation, clogging) for the
    run, then calm: every live node must agree, every crash must be seen everywhere."""
    rng = random.Random(f"{sim.seed}:chaos")
    log: list[str] = []
    fault_end = max(duration_ms, 60_000)
    t = 2_000
    while True:
        t += rng.randrange(1_000, 8_000)
        if t >= fault_end:
            break
        sim.at(t, partial(_chaos_step, sim, rng, log))
    sim.run(fault_end)
    sim.heal()
    sim.net.loss = 0.0
    for x in sim.nodes:
        sim.clog(x.idx)
        if x.starve_every_ms:
            sim.starve(x.idx, 0)
    limit = fault_end + sim.detection_bound_ms() + 2 * sim.config.reconnect_interval_ms + 30_000
    done = sim.run_until_agreement(limit)
    rep = sim.report("chaos", 0)
    rep.converged_ms = -1 if done < 0 else done - fault_end
    rep.notes["faults"] = len(log)
    rep.notes["left_seen_dead"] = sim.left_seen_dead
    if done < 0:
        bad = sim.disagreements()
        rep.violations.append(
            f"no agreement {limit - fault_end} ms after faults stopped: {bad[:5]}"
        )
        rep.violations.extend(log[-10:])
    return rep


SCENARIOS: dict[str, Callable[[Sim, int], SimReport]] = {
    "steady": _scenario_steady,
    "traffic": _scenario_traffic,
    "crash": _scenario_crash,
    "loss": _scenario_loss,
    "partition": _scenario_partition,
    "isolate": _scenario_isolate,
    "oneway": _scenario_oneway,
    "clog": _scenario_clog,
    "starve": _scenario_starve,
    "starve-many": _scenario_starve_many,
    "starve-frac": _scenario_starve_frac,
    "detect": _scenario_detect,
    "leave": _scenario_leave,
    "restart": _scenario_restart,
    "join": _scenario_join,
    "chaos": _scenario_chaos,
}
"""Scenario name -> function(sim, duration_ms) -> report."""


def run_scenario(
    scenario: str,
    seed: int,
    nodes: int,
    duration_ms: int = 60_000,
    lifeguard: bool = True,
    preset: str = "lan",
    tcp_ping: bool = True,
    trace: Callable[[str], None] | None = None,
    trace_member: str | None = None,
    overrides: dict[str, int | bool] | None = None,
) -> SimReport:
    """Build a cluster, run one named scenario and return its report (violations inside).
    ``overrides`` sets ``SwimConfig`` fields on top of the preset (replayed with ``--set``)."""
    config = PRESETS[preset]().replace(lifeguard=lifeguard, tcp_ping=tcp_ping, **(overrides or {}))
    start = clock.wall_ms()  # the simulator's own speed only; protocol time is simulated
    sim = Sim(nodes, seed, config, prefill=scenario != "join")
    sim.trace, sim.trace_member = trace, trace_member
    rep = SCENARIOS[scenario](sim, duration_ms)
    rep.scenario = scenario
    rep.duration_ms = duration_ms
    rep.tcp_ping = tcp_ping
    rep.preset = preset
    rep.overrides = dict(overrides or {})
    rep.wall_s = (clock.wall_ms() - start) / 1000
    rep.sim_ms = sim.now
    rep.datagrams = sim.datagrams
    rep.udp_bytes = sim.udp_bytes
    rep.tcp_bytes = sim.tcp_bytes
    rep.false_dead = sim.false_dead
    rep.false_suspect = sim.false_suspect
    rep.notes.setdefault("max_incarnation", max(x.swim.incarnation for x in sim.nodes))
    rep.notes.setdefault("log10n", round(math.log10(nodes), 2))
    return rep


def parse_overrides(items: list[str]) -> dict[str, int | bool]:
    """``["suspicion_mult=4", "ring_probe=false"]`` -> typed ``SwimConfig`` field values."""
    fields = {f.name: f for f in dataclasses.fields(SwimConfig)}
    out: dict[str, int | bool] = {}
    for item in items:
        name, _, raw = item.partition("=")
        if name not in fields or name in ("lifeguard", "tcp_ping"):
            raise ValueError(f"--set {item}: no such SwimConfig field (lifeguard, tcp_ping: flags)")
        if isinstance(getattr(SwimConfig(), name), bool):
            if raw.lower() not in ("true", "false"):
                raise ValueError(f"--set {item}: expected true or false")
            out[name] = raw.lower() == "true"
        else:
            out[name] = int(raw)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: run one scenario, print the report and the replay command."""
    ap = argparse.ArgumentParser(prog="python -m spawnmesh.cluster.sim")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="crash")
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60.0, help="simulated seconds (minimum)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="lan")
    ap.add_argument("--no-lifeguard", action="store_true")
    ap.add_argument("--no-tcp-ping", action="store_true", help="disable the TCP fallback probe")
    ap.add_argument("--profile", action="store_true", help="run under cProfile, print top 25")
    ap.add_argument("--trace", action="store_true", help="print every membership event and fault")
    ap.add_argument("--trace-member", default=None, help="only trace events about this member")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a SwimConfig field of the preset (repeatable), e.g. suspicion_mult=4",
    )
    args = ap.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
    except ValueError as exc:
        ap.error(str(exc))

    def go() -> SimReport:
        return run_scenario(
            args.scenario,
            args.seed,
            args.nodes,
            int(args.seconds * 1000),
            lifeguard=not args.no_lifeguard,
            preset=args.preset,
            tcp_ping=not args.no_tcp_ping,
            trace=print if args.trace or args.trace_member else None,
            trace_member=args.trace_member,
            overrides=overrides,
        )

    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        rep = prof.runcall(go)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    else:
        rep = go()
    try:
        print(rep.summary())
        for v in rep.violations[:20]:
            print("VIOLATION", v)
        print("replay:", rep.replay_command())
    except BrokenPipeError:  # e.g. piped into head
        pass
    return 1 if rep.violations else 0


if __name__ == "__main__":
    sys.exit(main())
