"""The sans-IO SWIM + Lifeguard membership core.

No clocks, sockets or tasks: every call takes ``now_ms`` and returns an :class:`Output` (datagrams
to send, membership events, TCP exchanges for the shell). The shell calls :meth:`Swim.tick` at
:meth:`Swim.next_deadline_ms` and :meth:`Swim.receive` for every datagram. Randomness comes from
the ``random.Random`` passed in, so one seed reproduces a run.
"""

from __future__ import annotations

import enum
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from spawnmesh.cluster import messages as m
from spawnmesh.cluster.awareness import Awareness
from spawnmesh.cluster.broadcasts import BroadcastQueue
from spawnmesh.cluster.config import SwimConfig
from spawnmesh.cluster.messages import Addr
from spawnmesh.cluster.state import (
    Action,
    Current,
    Member,
    MemberTable,
    MemberView,
    News,
    Status,
    decide,
)
from spawnmesh.cluster.suspicion import Suspicion
from spawnmesh.errors import ConfigError, ProtocolError

_HEADER_RESERVE = m.packet_overhead(70000)
_FOREVER = 1 << 62


class EventKind(enum.Enum):
    """What happened to a member, as seen by this node."""

    JOIN = "join"
    """Became alive (new, or back from dead/left)."""
    UPDATE = "update"
    """Address or metadata changed while alive."""
    SUSPECT = "suspect"
    ALIVE = "alive"
    """A suspicion was refuted."""
    DEAD = "dead"
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """One membership change (``member`` is the record after the change)."""

    kind: EventKind
    member: MemberView


class TcpKind(enum.Enum):
    """TCP exchanges the shell performs for the core."""

    PING = "ping"
    """Fallback probe: send ``data``, feed the reply (an ack packet) to :meth:`Swim.receive`."""
    PUSH_PULL = "push_pull"
    """Anti-entropy / join: send ``data``, feed the reply to :meth:`Swim.receive`."""


@dataclass(frozen=True, slots=True)
class TcpRequest:
    """Ask the shell to open TCP to ``addr``, send ``data`` and hand back the reply packet."""

    kind: TcpKind
    addr: Addr
    data: bytes
    timeout_ms: int


@dataclass(slots=True)
class Output:
    """Everything one call asks of the shell."""

    datagrams: list[tuple[Addr, bytes]] = field(default_factory=list)
    events: list[MemberEvent] = field(default_factory=list)
    tcp_requests: list[TcpRequest] = field(default_factory=list)


@dataclass(slots=True)
class SwimStats:
    """Counters for diagnostics and the simulator."""

    probes: int = 0
    probe_failures: int = 0
    indirect_probes: int = 0
    refutes: int = 0
    suspicions_started: int = 0
    deaths_declared: int = 0
    malformed: int = 0


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    addr: Addr
    timeout_at: int
    end_at: int
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class _Relay:
    orig_seq: int
    source_addr: Addr
    nack: bool


class Swim:
    """One node's membership state machine."""

    def __init__(
        self,
        self_name: str,
        self_addr: Addr,
        meta: bytes,
        config: SwimConfig,
        rng: random.Random,
        now_ms: int,
        incarnation: int = 0,
    ) -> None:
        cfg = config.validate()
        if len(meta) > cfg.meta_max_bytes:
            raise ConfigError("meta", f"{len(meta)} bytes exceeds {cfg.meta_max_bytes}")
        self.name = self_name
        self.addr = self_addr
        self.config = cfg
        self.rng = rng
        self.incarnation = incarnation
        self.leaving = False
        self.awareness = Awareness(cfg.awareness_max_multiplier)
        self.queue = BroadcastQueue()
        self.table = MemberTable()
        self.stats = SwimStats()
        self._self = Member(self_name, self_addr, meta, incarnation, Status.ALIVE, now_ms)
        self.table.add(self._self)
        self._others: list[str] = []
        self._other_index: dict[str, int] = {}
        self._probe_order: list[str] = []
        self._probe_pos = 0
        self._probe: _Probe | None = None
        self._seq = rng.randrange(1 << 31)
        self._suspicions: dict[str, Suspicion] = {}
        self._suspicion_heap: list[tuple[int, str]] = []
        self._relays: dict[int, _Relay] = {}
        self._relay_heap: list[tuple[int, int]] = []
        self._seeds: list[Addr] = []
        self._next_probe = now_ms + rng.randrange(cfg.probe_interval_ms)
        self._next_gossip = now_ms
        pp = cfg.push_pull_interval_ms
        self._next_push_pull = now_ms + rng.randrange(pp) if pp else _FOREVER
        rc = cfg.reconnect_interval_ms
        self._next_reconnect = now_ms + rc + rng.randrange(rc) if rc else _FOREVER
        self._queue_alive_self()

    # -- public API ---------------------------------------------------------------------------

    def members(self) -> list[MemberView]:
        """Snapshot of every known member (this node included)."""
        return [
            MemberView(x.name, x.addr, x.meta, x.incarnation, x.status)
            for x in self.table.by_name.values()
        ]

    def member(self, name: str) -> MemberView | None:
        """Snapshot of one member, or None."""
        return self.table.view(name)

    @property
    def leave_complete(self) -> bool:
        """True once a leave was started and its news was fully retransmitted (or nobody is left
        to tell); the shell should still bound its wait with a timeout."""
        return self.leaving and (self.name not in self.queue or self.table.live_count == 0)

    @property
    def alone(self) -> bool:
        """True when this node knows no other live member (the shell should re-resolve seeds)."""
        return self.table.live_count - (0 if self.leaving else 1) <= 0

    def join(self, seed_addrs: list[Addr], now_ms: int) -> Output:
        """Ask the shell for a join push-pull with each seed."""
        out = Output()
        self._seeds = [a for a in seed_addrs if a != self.addr]
        self._join_seeds(out)
        return out

    def _join_seeds(self, out: Output) -> None:
        data = self.push_pull_state(join=True)
        for addr in self._seeds:
            if addr != self.addr:
                out.tcp_requests.append(
                    TcpRequest(TcpKind.PUSH_PULL, addr, data, self.config.tcp_timeout_ms)
                )

    def leave(self, now_ms: int) -> Output:
        """Leave gracefully: others mark this node ``left`` at once, never ``dead``."""
        out = Output()
        if self.leaving:
            return out
        self.leaving = True
        self._probe = None
        self.table.set_status(self._self, Status.LEFT, now_ms)
        self.queue.queue(self.name, m.encode_message(m.Left(self.name, self.incarnation)))
        self._gossip(now_ms, out)
        return out

    def update_meta(self, meta: bytes, now_ms: int) -> Output:
        """Change this node's metadata; spread it as alive news at a higher incarnation."""
        if len(meta) > self.config.meta_max_bytes:
            raise ConfigError("meta", f"{len(meta)} bytes exceeds {self.config.meta_max_bytes}")
        self._self.meta = meta
        self._bump_incarnation(self.incarnation + 1)
        return Output()

    def push_pull_state(self, join: bool = False) -> bytes:
        """This node's full member table, encoded for a TCP push-pull exchange."""
        rows = [
            m.MemberState(x.name, x.incarnation, x.addr, x.meta, int(x.status))
            for x in self.table.by_name.values()
        ]
        return m.encode([m.PushPull(join, self.name, rows)])

    def merge_push_pull(self, data: bytes, now_ms: int) -> Output:
        """Merge a remote table received over TCP (``ProtocolError`` if malformed)."""
        out = Output()
        self._merge(m.decode_push_pull(data), now_ms, out)
        return out

    def serve_tcp(self, src_addr: Addr, data: bytes, now_ms: int) -> tuple[bytes | None, Output]:
        """Handle one inbound TCP request; return the reply packet (if any) and the output."""
        out = Output()
        try:
            msgs = m.decode(data)
        except ProtocolError:
            self.stats.malformed += 1
            return None, out
        reply: bytes | None = None
        for msg in msgs:
            if isinstance(msg, m.Ping):
                if msg.target in ("", self.name):
                    reply = m.encode([m.Ack(msg.seq)])
            elif isinstance(msg, m.PushPull):
                # Merge first, so a refutation of news about us rides back in the reply.
                self._merge(msg, now_ms, out)
                reply = self.push_pull_state()
            else:
                self._dispatch(msg, now_ms, out)
        return reply, out

    def receive(self, src_addr: Addr, data: bytes, now_ms: int) -> Output:
        """Handle one datagram (or a TCP reply packet); malformed input is counted and dropped."""
        out = Output()
        try:
            msgs = m.decode(data)
        except ProtocolError:
            self.stats.malformed += 1
            return out
        for msg in msgs:
            self._dispatch(msg, now_ms, out)
        return out

    def next_deadline_ms(self) -> int:
        """When :meth:`tick` next has work (ms); the shell sleeps until then."""
        t = self._next_push_pull
        if self._next_reconnect < t:
            t = self._next_reconnect
        if not self.leaving:
            p = self._probe
            d = self._next_probe if p is None else (p.end_at if p.indirect_sent else p.timeout_at)
            if d < t:
                t = d
        if self._next_gossip < t and len(self.queue) and self.config.gossip_interval_ms:
            t = self._next_gossip
        if self._suspicion_heap and self._suspicion_heap[0][0] < t:
            t = self._suspicion_heap[0][0]
        if self._relay_heap and self._relay_heap[0][0] < t:
            t = self._relay_heap[0][0]
        return t

    def tick(self, now_ms: int) -> Output:
        """Run everything due at ``now_ms``: probes, relays, suspicion expiry, gossip, syncs."""
        out = Output()
        self._expire_relays(now_ms, out)
        self._expire_suspicions(now_ms, out)
        if not self.leaving:
            self._run_probe(now_ms, out)
        gi = self.config.gossip_interval_ms
        if gi and now_ms >= self._next_gossip:
            if len(self.queue):
                self._gossip(now_ms, out)
            self._next_gossip = now_ms + gi
        if now_ms >= self._next_push_pull:
            interval = self.config.push_pull_scaled_ms(self.table.live_count)
            self._next_push_pull = now_ms + interval // 2 + int(self.rng.random() * interval)
            if not self.leaving:
                self._push_pull(now_ms, out, dead=False)
        if now_ms >= self._next_reconnect:
            self._next_reconnect = now_ms + self.config.reconnect_interval_ms
            self._reap(now_ms)
            if not self.leaving:
                self._push_pull(now_ms, out, dead=True)
                if self.alone:
                    self._join_seeds(out)  # still alone: the join did not get through, retry
        return out

    # -- sending ------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send(self, out: Output, addr: Addr, primary: list[bytes]) -> None:
        budget = self.config.udp_buffer_bytes - _HEADER_RESERVE - sum(map(len, primary))
        extra = self.queue.get(budget, self._retransmit_limit()) if len(self.queue) else []
        out.datagrams.append((addr, m.pack(primary + extra if extra else primary)))

    def _retransmit_limit(self) -> int:
        return self.config.retransmit_limit(self.table.live_count)

    def _random_others(
        self, k: int, ok: Callable[[Member], bool], exclude: str = ""
    ) -> list[Member]:
        """Up to ``k`` distinct random members passing predicate ``ok`` (bounded attempts)."""
        others = self._others
        if not others or k <= 0:
            return []
        table = self.table.by_name
        chosen: list[Member] = []
        seen: set[str] = set()
        rand = self.rng.random
        n = len(others)
        pred = ok
        attempts = 3 * k + 8
        if n <= attempts:
            cands = others[:]
            self.rng.shuffle(cands)
            for name in cands:
                x = table[name]
                if name != exclude and pred(x):
                    chosen.append(x)
                    if len(chosen) >= k:
                        break
            return chosen
        for _ in range(attempts):
            name = others[int(rand() * n)]
            if name in seen or name == exclude:
                continue
            seen.add(name)
            x = table[name]
            if pred(x):
                chosen.append(x)
                if len(chosen) >= k:
                    break
        return chosen

    def _gossip(self, now_ms: int, out: Output) -> None:
        gttd = self.config.gossip_to_the_dead_ms

        def ok(x: Member) -> bool:
            return x.status <= Status.SUSPECT or (
                x.status == Status.DEAD and now_ms - x.since_ms < gttd
            )

        budget = self.config.udp_buffer_bytes - _HEADER_RESERVE
        for target in self._random_others(self.config.gossip_nodes, ok):
            if not len(self.queue):
                break
            extra = self.queue.get(budget, self._retransmit_limit())
            if extra:
                out.datagrams.append((target.addr, m.pack(extra)))

    def _push_pull(self, now_ms: int, out: Output, dead: bool) -> None:
        if dead:  # rare (every reconnect interval): scan, so a lone dead member is found too
            dead_ones = [x for x in self.table.by_name.values() if x.status == Status.DEAD]
            targets = [self.rng.choice(dead_ones)] if dead_ones else []
        else:
            targets = self._random_others(1, lambda x: x.status == Status.ALIVE)
        for target in targets:
            out.tcp_requests.append(
                TcpRequest(
                    TcpKind.PUSH_PULL,
                    target.addr,
                    self.push_pull_state(),
                    self.config.tcp_timeout_ms,
                )
            )

    # -- probing ------------------------------------------------------------------------------

    def _run_probe(self, now_ms: int, out: Output) -> None:
        p = self._probe
        if p is not None:
            if not p.indirect_sent and now_ms >= p.timeout_at:
                self._indirect(p, now_ms, out)
            if now_ms >= p.end_at:
                self._probe_failed(p, now_ms, out)
        if self._probe is None and now_ms >= self._next_probe:
            self._start_probe(now_ms, out)

    def _pick_probe_target(self) -> Member | None:
        table = self.table.by_name
        for _ in range(2):
            order = self._probe_order
            while self._probe_pos < len(order):
                name = order[self._probe_pos]
                self._probe_pos += 1
                x = table.get(name)
                if x is not None and x.status <= Status.SUSPECT:
                    return x
            self._probe_order = [n for n in self._others if table[n].status <= Status.SUSPECT]
            self.rng.shuffle(self._probe_order)
            self._probe_pos = 0
            if not self._probe_order:
                return None
        return None

    def _start_probe(self, now_ms: int, out: Output) -> None:
        cfg = self.config
        target = self._pick_probe_target()
        interval = self.awareness.scale_ms(cfg.probe_interval_ms)
        self._next_probe = now_ms + interval
        if target is None:
            return
        seq = self._next_seq()
        timeout = self.awareness.scale_ms(cfg.probe_timeout_ms)
        self._probe = _Probe(seq, target.name, target.addr, now_ms + timeout, now_ms + interval)
        self.stats.probes += 1
        primary = [m.encode_message(m.Ping(seq, target.name, self.name, self.addr))]
        if target.status == Status.SUSPECT and cfg.lifeguard:
            # Lifeguard buddy rule: tell a suspected member first, so it can refute at once.
            primary.append(m.encode_message(m.Suspect(target.name, target.incarnation, self.name)))
        self._send(out, target.addr, primary)

    def _indirect(self, p: _Probe, now_ms: int, out: Output) -> None:
        cfg = self.config
        p.indirect_sent = True
        self.stats.indirect_probes += 1
        helpers = self._random_others(
            cfg.indirect_checks, lambda x: x.status == Status.ALIVE, exclude=p.target
        )
        nack = cfg.lifeguard
        req = m.encode_message(m.PingReq(p.seq, p.target, p.addr, self.name, self.addr, nack))
        for helper in helpers:
            self._send(out, helper.addr, [req])
        if nack:
            p.expected_nacks = len(helpers)
        if cfg.tcp_ping:
            data = m.encode([m.Ping(p.seq, p.target, self.name, self.addr)])
            remaining = max(1, p.end_at - now_ms)
            out.tcp_requests.append(TcpRequest(TcpKind.PING, p.addr, data, remaining))

    def _probe_failed(self, p: _Probe, now_ms: int, out: Output) -> None:
        self._probe = None
        self.stats.probe_failures += 1
        if self.config.lifeguard:
            if p.expected_nacks > 0:
                self.awareness.apply_delta(max(0, p.expected_nacks - p.nacks))
            else:
                self.awareness.apply_delta(1)
        x = self.table.get(p.target)
        if x is None or x.status > Status.SUSPECT:
            return
        self._on_suspect(m.Suspect(x.name, x.incarnation, self.name), now_ms, out)

    def _on_ack(self, seq: int, now_ms: int, out: Output) -> None:
        p = self._probe
        if p is not None and p.seq == seq:
            self._probe = None
            if self.config.lifeguard and not p.indirect_sent:
                self.awareness.apply_delta(-1)
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            self._send(out, relay.source_addr, [m.encode_message(m.Ack(relay.orig_seq))])

    def _on_ping_req(self, msg: m.PingReq, now_ms: int, out: Output) -> None:
        seq = self._next_seq()
        self._relays[seq] = _Relay(msg.seq, msg.source_addr, msg.nack)
        heapq.heappush(self._relay_heap, (now_ms + self.config.probe_timeout_ms, seq))
        ping = m.encode_message(m.Ping(seq, msg.target, self.name, self.addr))
        self._send(out, msg.target_addr, [ping])

    def _expire_relays(self, now_ms: int, out: Output) -> None:
        heap = self._relay_heap
        while heap and heap[0][0] <= now_ms:
            _, seq = heapq.heappop(heap)
            relay = self._relays.pop(seq, None)
            if relay is not None and relay.nack:
                self._send(out, relay.source_addr, [m.encode_message(m.Nack(relay.orig_seq))])

    # -- news ---------------------------------------------------------------------------------

    def _dispatch(self, msg: m.Message, now_ms: int, out: Output) -> None:
        if isinstance(msg, m.Ping):
            if msg.target in ("", self.name):
                self._send(out, msg.source_addr, [m.encode_message(m.Ack(msg.seq))])
        elif isinstance(msg, m.Ack):
            self._on_ack(msg.seq, now_ms, out)
        elif isinstance(msg, m.Alive):
            self._on_alive(msg, now_ms, out)
        elif isinstance(msg, m.Suspect):
            self._on_suspect(msg, now_ms, out)
        elif isinstance(msg, m.Dead):
            self._on_dead(msg, now_ms, out)
        elif isinstance(msg, m.Left):
            self._on_left(msg, now_ms, out)
        elif isinstance(msg, m.PingReq):
            self._on_ping_req(msg, now_ms, out)
        elif isinstance(msg, m.Nack):
            p = self._probe
            if p is not None and p.seq == msg.seq:
                p.nacks += 1
        elif isinstance(msg, m.PushPull):
            self._merge(msg, now_ms, out)

    def _current(self, name: str) -> tuple[Member | None, Current, int]:
        if name == self.name:
            return (
                self._self,
                (Current.SELF_LEAVING if self.leaving else Current.SELF),
                (self.incarnation),
            )
        x = self.table.by_name.get(name)
        if x is None:
            return None, Current.UNKNOWN, 0
        return x, x.status, x.incarnation  # type: ignore[return-value]  # same int values

    def _on_alive(self, msg: m.Alive, now_ms: int, out: Output) -> None:
        x, cur, held = self._current(msg.name)
        action = decide(News.ALIVE, cur, msg.incarnation, held)
        if action is Action.IGNORE:
            return
        if action is Action.REFUTE_IF_CHANGED:
            me = self._self
            if msg.addr != me.addr or msg.meta != me.meta:
                self._refute(msg.incarnation)
            return
        if action is Action.REFUTE:
            self._refute(msg.incarnation)
            return
        if len(msg.meta) > self.config.meta_max_bytes:
            return
        kinds: list[EventKind] = []
        if x is None:
            x = Member(msg.name, msg.addr, msg.meta, msg.incarnation, Status.ALIVE, now_ms)
            self.table.add(x)
            self._add_other(x.name)
            kinds.append(EventKind.JOIN)
        else:
            old = x.status
            changed = x.addr != msg.addr or x.meta != msg.meta
            x.incarnation = msg.incarnation
            x.addr = msg.addr
            x.meta = msg.meta
            if old is Status.SUSPECT:
                kinds.append(EventKind.ALIVE)
            elif old is not Status.ALIVE:
                kinds.append(EventKind.JOIN)
                self._insert_probe(x.name)
            if changed and old <= Status.SUSPECT:
                kinds.append(EventKind.UPDATE)
            if old is not Status.ALIVE:
                self.table.set_status(x, Status.ALIVE, now_ms)
                self._suspicions.pop(x.name, None)
        for kind in kinds:
            out.events.append(MemberEvent(kind, self._view(x)))
        self.queue.queue(msg.name, m.encode_message(msg))

    def _on_suspect(self, msg: m.Suspect, now_ms: int, out: Output) -> None:
        x, cur, held = self._current(msg.name)
        action = decide(News.SUSPECT, cur, msg.incarnation, held)
        if action is Action.IGNORE or x is None:
            return
        if action is Action.REFUTE:
            self._refute(msg.incarnation)
            return
        if action is Action.CONFIRM:
            s = self._suspicions.get(x.name)
            if s is not None and s.confirm(msg.sender):
                heapq.heappush(self._suspicion_heap, (s.deadline_ms(), x.name))
                self.queue.queue(msg.name, m.encode_message(msg))
            return
        cfg = self.config
        x.incarnation = msg.incarnation
        self.table.set_status(x, Status.SUSPECT, now_ms)
        n = self.table.live_count
        lo = cfg.suspicion_min_ms(n)
        hi = cfg.suspicion_max_ms(n) if cfg.lifeguard else lo
        s = Suspicion(msg.sender, msg.incarnation, cfg.suspicion_confirmations(n), lo, hi, now_ms)
        self._suspicions[x.name] = s
        heapq.heappush(self._suspicion_heap, (s.deadline_ms(), x.name))
        self.stats.suspicions_started += 1
        out.events.append(MemberEvent(EventKind.SUSPECT, self._view(x)))
        self.queue.queue(msg.name, m.encode_message(msg))

    def _expire_suspicions(self, now_ms: int, out: Output) -> None:
        heap = self._suspicion_heap
        while heap and heap[0][0] <= now_ms:
            deadline, name = heapq.heappop(heap)
            s = self._suspicions.get(name)
            if s is None or s.deadline_ms() != deadline:
                continue
            x = self.table.get(name)
            if x is None or x.status is not Status.SUSPECT:
                self._suspicions.pop(name, None)
                continue
            self.stats.deaths_declared += 1
            self._on_dead(m.Dead(name, x.incarnation, self.name), now_ms, out)

    def _on_dead(self, msg: m.Dead, now_ms: int, out: Output) -> None:
        x, cur, held = self._current(msg.name)
        action = decide(News.DEAD, cur, msg.incarnation, held)
        if action is Action.IGNORE or x is None:
            return
        if action is Action.REFUTE:
            self._refute(msg.incarnation)
            return
        status = Status.LEFT if msg.sender == msg.name else Status.DEAD
        self._mark_gone(x, status, msg.incarnation, now_ms, out)
        self.queue.queue(msg.name, m.encode_message(msg))

    def _on_left(self, msg: m.Left, now_ms: int, out: Output) -> None:
        x, cur, held = self._current(msg.name)
        action = decide(News.LEFT, cur, msg.incarnation, held)
        if action is Action.IGNORE or x is None:
            return
        if action is Action.REFUTE:
            self._refute(msg.incarnation)
            return
        self._mark_gone(x, Status.LEFT, msg.incarnation, now_ms, out)
        self.queue.queue(msg.name, m.encode_message(msg))

    def _mark_gone(
        self, x: Member, status: Status, incarnation: int, now_ms: int, out: Output
    ) -> None:
        x.incarnation = incarnation
        self.table.set_status(x, status, now_ms)
        self._suspicions.pop(x.name, None)
        kind = EventKind.LEFT if status is Status.LEFT else EventKind.DEAD
        out.events.append(MemberEvent(kind, self._view(x)))

    def _merge(self, pp: m.PushPull, now_ms: int, out: Output) -> None:
        table = self.table.by_name
        for row in pp.members:
            x = table.get(row.name)
            if (
                x is not None
                and x.incarnation == row.incarnation
                and x.status == row.status
                and x.addr == row.addr
                and x is not self._self
            ):
                continue  # nothing new (the common case of anti-entropy)
            try:
                status = Status(row.status)
            except ValueError:
                continue
            if status is Status.ALIVE:
                alive = m.Alive(row.name, row.incarnation, row.addr, row.meta)
                self._on_alive(alive, now_ms, out)
            elif status is Status.LEFT:
                self._on_left(m.Left(row.name, row.incarnation), now_ms, out)
            else:
                # A remote "dead" is only a suspicion here, so a live member can still refute.
                suspect = m.Suspect(row.name, row.incarnation, pp.source)
                self._on_suspect(suspect, now_ms, out)

    def _refute(self, incoming: int) -> None:
        self.stats.refutes += 1
        if self.config.lifeguard:
            self.awareness.apply_delta(1)
        self._bump_incarnation(min(max(incoming, self.incarnation) + 1, m.MAX_INCARNATION))

    def _bump_incarnation(self, incarnation: int) -> None:
        self.incarnation = incarnation
        self._self.incarnation = incarnation
        self._queue_alive_self()

    def _queue_alive_self(self) -> None:
        me = self._self
        self.queue.queue(
            self.name, m.encode_message(m.Alive(self.name, self.incarnation, me.addr, me.meta))
        )

    # -- bookkeeping --------------------------------------------------------------------------

    def _view(self, x: Member) -> MemberView:
        return MemberView(x.name, x.addr, x.meta, x.incarnation, x.status)

    def _add_other(self, name: str) -> None:
        self._other_index[name] = len(self._others)
        self._others.append(name)
        self._insert_probe(name)

    def _insert_probe(self, name: str) -> None:
        order = self._probe_order
        lo = min(self._probe_pos, len(order))
        order.insert(lo + int(self.rng.random() * (len(order) - lo + 1)), name)

    def _reap(self, now_ms: int) -> None:
        horizon = now_ms - self.config.dead_reap_ms
        for name in [
            x.name
            for x in self.table.by_name.values()
            if x.status >= Status.DEAD and x.since_ms < horizon and x is not self._self
        ]:
            self.table.remove(name)
            self.queue.drop(name)
            i = self._other_index.pop(name)
            last = self._others.pop()
            if last != name:
                self._others[i] = last
                self._other_index[last] = i
