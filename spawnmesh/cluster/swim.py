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
from spawnmesh.cluster.targets import Targets
from spawnmesh.errors import ConfigError, ProtocolError

_HEADER_RESERVE = m.packet_overhead(70000)
_FOREVER = 1 << 62
_News = m.Alive | m.Suspect | m.Dead | m.Left
_NEWS = (m.Alive, m.Suspect, m.Dead, m.Left)


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
    rtts_ms: list[int] = field(default_factory=list)
    """Round-trip times of the direct probes answered in this call (ping to ack, in the
    core's millisecond clock), for the shell's metrics."""


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
    stalls: int = 0
    """Calls that came more than ``stall_tolerance_ms`` after the core's deadline (Lifeguard)."""
    confirmations_sent: int = 0
    """Suspicions this node confirmed from its own failed relayed ping (Lifeguard)."""


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    addr: Addr
    started_at: int
    timeout_at: int
    end_at: int
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0
    helpers: list[Addr] = field(default_factory=list)


@dataclass(slots=True)
class _Relay:
    orig_seq: int
    source_addr: Addr
    nack: bool
    target: str


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
        self.targets = Targets(self_name, rng)
        self._probes: list[_Probe] = []
        self.last_rtt_ms: dict[str, int] = {}
        """Round-trip time of the last direct probe each member answered (ms)."""
        self._seq = rng.randrange(1 << 31)
        self._suspicions: dict[str, Suspicion] = {}
        self._suspicion_heap: list[tuple[int, str]] = []
        self._relays: dict[int, _Relay] = {}
        self._relay_heap: list[tuple[int, int]] = []
        self._evidence: dict[str, int] = {}
        """Member -> when a ping this node relayed for another member went unanswered."""
        self._seeds: list[Addr] = []
        self._last_call = now_ms
        self._stall_tolerance = cfg.stall_tolerance_ms()
        self._grace = 1 if cfg.lifeguard else 0
        """Lifeguard: accusing timers (probe failure, relay nack, suspicion expiry) fire only on
        a call at least this long (ms) after their deadline, so input that arrived by then is read
        first when the shell wakes both at once; longer delays are stalls (``_check_stall``)."""
        self._seen: dict[str, tuple[tuple[int, Status], set[m.Message]]] = {}
        """Member -> (its incarnation and status, news already applied in that state)."""
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
        self._probes.clear()
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
        self._check_stall(now_ms)
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
                self._dispatch(msg, src_addr, now_ms, out)
        return reply, out

    def receive(self, src_addr: Addr, data: bytes, now_ms: int) -> Output:
        """Handle one datagram (or a TCP reply packet); malformed input is counted and dropped."""
        out = Output()
        self._check_stall(now_ms)
        try:
            msgs = m.decode(data)
        except ProtocolError:
            self.stats.malformed += 1
            return out
        incarnation = self.incarnation
        for msg in msgs:
            if isinstance(msg, _NEWS):
                self._on_news(msg, src_addr, now_ms, out)
            else:
                self._dispatch(msg, src_addr, now_ms, out)
        if self.incarnation != incarnation and self.config.lifeguard and src_addr != self.addr:
            # We just refuted news about ourselves: answer the sender at once (it is usually the
            # accuser, who then spreads the refutation instead of the suspicion).
            self._send(out, src_addr, [])
        return out

    def next_deadline_ms(self) -> int:
        """When :meth:`tick` next has work (ms); the shell sleeps until then."""
        t = self._next_push_pull
        if self._next_reconnect < t:
            t = self._next_reconnect
        if not self.leaving:
            if self._probes:
                for p in self._probes:
                    d = p.end_at + self._grace if p.indirect_sent else p.timeout_at
                    if d < t:
                        t = d
            elif self._next_probe < t:
                t = self._next_probe
        if self._next_gossip < t and len(self.queue) and self.config.gossip_interval_ms:
            t = self._next_gossip
        if self._suspicion_heap and self._suspicion_heap[0][0] + self._grace < t:
            t = self._suspicion_heap[0][0] + self._grace
        if self._relay_heap and self._relay_heap[0][0] + self._grace < t:
            t = self._relay_heap[0][0] + self._grace
        return t

    def tick(self, now_ms: int) -> Output:
        """Run everything due at ``now_ms``: probes, relays, suspicion expiry, gossip, syncs."""
        out = Output()
        self._check_stall(now_ms)
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

    # -- Lifeguard: this node's own stalls -----------------------------------------------------

    def _check_stall(self, now_ms: int) -> None:
        """Detect that the shell ran this core late (a starved event loop) and discount it.

        The core asked to run at ``next_deadline_ms()``; a call more than ``stall_tolerance_ms``
        after both that deadline and the previous call means the process was not running. Time
        it did not run must not count against others: every pending probe, relay and suspicion
        deadline moves back by the stall, so acks and refutations that queued up meanwhile are
        read before any of those timers can fire; the local health score rises by one.
        """
        last = self._last_call
        self._last_call = now_ms
        tolerance = self._stall_tolerance
        if now_ms - last <= tolerance or not self.config.lifeguard:
            return  # (the lag below is at most the time since the last call)
        lag = now_ms - max(self.next_deadline_ms(), last)
        if lag <= tolerance:
            return
        self.stats.stalls += 1
        self.awareness.apply_delta(1)
        for p in self._probes:
            p.timeout_at += lag
            p.end_at += lag
        if self._relay_heap:
            self._relay_heap = [(t + lag, seq) for t, seq in self._relay_heap]
        if self._suspicions:
            for s in self._suspicions.values():
                s.start_ms += lag
            self._suspicion_heap = [(s.deadline_ms(), n) for n, s in self._suspicions.items()]
            heapq.heapify(self._suspicion_heap)

    # -- sending ------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send(self, out: Output, addr: Addr, primary: list[bytes]) -> None:
        budget = self.config.udp_buffer_bytes - _HEADER_RESERVE - sum(map(len, primary))
        extra = self.queue.get(budget, self._retransmit_limit()) if len(self.queue) else []
        if primary or extra:
            out.datagrams.append((addr, m.pack(primary + extra if extra else primary)))

    def _buddy(self, name: str) -> list[bytes]:
        """Lifeguard's buddy rule, applied to every packet we address to a member (probes,
        relayed probes, acks, gossip): if we suspect it, tell it, so it can refute at once.
        Dissemination alone is not enough: a member that was briefly deaf missed the few
        retransmissions of its own suspicion and would otherwise learn of it only from a direct
        probe, which in a small cluster may come after the suspicion has expired."""
        x = self.table.by_name.get(name)
        if x is None or x.status is not Status.SUSPECT or not self.config.lifeguard:
            return []
        return [m.encode_message(m.Suspect(name, x.incarnation, self.name))]

    def _retransmit_limit(self) -> int:
        return self.config.retransmit_limit(self.table.live_count)

    def _is_live(self, name: str) -> bool:
        return self.table.by_name[name].status <= Status.SUSPECT

    def _is_alive(self, name: str) -> bool:
        return self.table.by_name[name].status == Status.ALIVE

    def _gossip(self, now_ms: int, out: Output) -> None:
        gttd = self.config.gossip_to_the_dead_ms
        table = self.table.by_name

        def ok(name: str) -> bool:
            x = table[name]
            return x.status <= Status.SUSPECT or (
                x.status == Status.DEAD and now_ms - x.since_ms < gttd
            )

        budget = self.config.udp_buffer_bytes - _HEADER_RESERVE
        for name in self.targets.sample(self.config.gossip_nodes, ok):
            if not len(self.queue):
                break
            buddy = self._buddy(name)
            extra = self.queue.get(budget - sum(map(len, buddy)), self._retransmit_limit())
            if extra:
                out.datagrams.append((table[name].addr, m.pack(buddy + extra)))

    def _push_pull(self, now_ms: int, out: Output, dead: bool) -> None:
        if dead:  # rare (every reconnect interval): scan, so a lone dead member is found too
            dead_ones = [x for x in self.table.by_name.values() if x.status == Status.DEAD]
            targets = [self.rng.choice(dead_ones)] if dead_ones else []
        else:
            targets = [self.table.by_name[n] for n in self.targets.sample(1, self._is_alive)]
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
        if self._probes:
            for p in list(self._probes):
                if not p.indirect_sent and now_ms >= p.timeout_at:
                    self._indirect(p, now_ms, out)
                if now_ms >= p.end_at + self._grace:
                    self._probe_failed(p, now_ms, out)
        if not self._probes and now_ms >= self._next_probe:
            self._start_probes(now_ms, out)

    def _start_probes(self, now_ms: int, out: Output) -> None:
        """One probe per period in round-robin order, plus one of the ring successor."""
        cfg = self.config
        interval = self.awareness.scale_ms(cfg.probe_interval_ms)
        self._next_probe = now_ms + interval
        names: list[str] = []
        target = self.targets.next_probe(self._is_live)
        if target is not None:
            names.append(target)
        if cfg.ring_probe:
            successor = self.targets.successor(self._is_live)
            if successor is not None and successor != target:
                names.append(successor)
        timeout = self.awareness.scale_ms(cfg.probe_timeout_ms)
        for name in names:
            x = self.table.by_name[name]
            seq = self._next_seq()
            self._probes.append(
                _Probe(seq, name, x.addr, now_ms, now_ms + timeout, now_ms + interval)
            )
            self.stats.probes += 1
            primary = [m.encode_message(m.Ping(seq, name, self.name, self.addr))]
            self._send(out, x.addr, primary + self._buddy(name))

    def _indirect(self, p: _Probe, now_ms: int, out: Output) -> None:
        cfg = self.config
        p.indirect_sent = True
        self.stats.indirect_probes += 1
        helpers = self.targets.sample(cfg.indirect_checks, self._is_alive, exclude=p.target)
        nack = cfg.lifeguard
        req = m.encode_message(m.PingReq(p.seq, p.target, p.addr, self.name, self.addr, nack))
        for name in helpers:
            addr = self.table.by_name[name].addr
            p.helpers.append(addr)
            self._send(out, addr, [req])
        if nack:
            p.expected_nacks = len(helpers)
        if cfg.tcp_ping:
            data = m.encode([m.Ping(p.seq, p.target, self.name, self.addr)])
            remaining = max(1, p.end_at - now_ms)
            out.tcp_requests.append(TcpRequest(TcpKind.PING, p.addr, data, remaining))

    def _probe_failed(self, p: _Probe, now_ms: int, out: Output) -> None:
        self._probes.remove(p)
        self.stats.probe_failures += 1
        lifeguard = self.config.lifeguard
        if lifeguard:
            if p.expected_nacks > 0:
                self.awareness.apply_delta(max(0, p.expected_nacks - p.nacks))
            else:
                self.awareness.apply_delta(1)
        x = self.table.get(p.target)
        if x is None or x.status > Status.SUSPECT:
            return
        msg = m.Suspect(x.name, x.incarnation, self.name)
        self._on_suspect(msg, now_ms, out)
        if lifeguard:
            # Tell the subject at once (it refutes if it lives) and the helpers (each confirms
            # if its own relayed ping went unanswered too: an independent witness).
            data = [m.encode_message(msg)]
            for addr in [x.addr, *p.helpers]:
                self._send(out, addr, data)

    def _probe_by_seq(self, seq: int) -> _Probe | None:
        for p in self._probes:
            if p.seq == seq:
                return p
        return None

    def _on_ack(self, seq: int, now_ms: int, out: Output) -> None:
        p = self._probe_by_seq(seq)
        if p is not None:
            self._probes.remove(p)
            if not p.indirect_sent:  # a direct answer: its round trip is the link's
                rtt = now_ms - p.started_at
                self.last_rtt_ms[p.target] = rtt
                out.rtts_ms.append(rtt)
                if self.config.lifeguard:
                    self.awareness.apply_delta(-1)
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            self._send(out, relay.source_addr, [m.encode_message(m.Ack(relay.orig_seq))])

    def _on_ping_req(self, msg: m.PingReq, now_ms: int, out: Output) -> None:
        seq = self._next_seq()
        self._relays[seq] = _Relay(msg.seq, msg.source_addr, msg.nack, msg.target)
        heapq.heappush(self._relay_heap, (now_ms + self.config.probe_timeout_ms, seq))
        ping = m.encode_message(m.Ping(seq, msg.target, self.name, self.addr))
        self._send(out, msg.target_addr, [ping, *self._buddy(msg.target)])

    def _expire_relays(self, now_ms: int, out: Output) -> None:
        heap = self._relay_heap
        while heap and heap[0][0] + self._grace <= now_ms:
            _, seq = heapq.heappop(heap)
            relay = self._relays.pop(seq, None)
            if relay is None:
                continue
            if relay.nack:
                self._send(out, relay.source_addr, [m.encode_message(m.Nack(relay.orig_seq))])
            if self.config.lifeguard:
                self._witness(relay.target, relay.source_addr, now_ms, out)

    def _witness(self, name: str, reply_to: Addr, now_ms: int, out: Output) -> None:
        """A ping this node relayed went unanswered: keep it as evidence for a while, and if
        the member is already suspected, confirm the suspicion now (Lifeguard)."""
        window = self.config.probe_interval_ms
        if len(self._evidence) > 64:
            self._evidence = {k: t for k, t in self._evidence.items() if now_ms - t <= window}
        self._evidence[name] = now_ms
        x = self.table.get(name)
        if x is not None and x.status is Status.SUSPECT:
            self._confirm_from_evidence(x, reply_to, now_ms, out)

    def _confirm_from_evidence(self, x: Member, reply_to: Addr, now_ms: int, out: Output) -> None:
        """Confirm a suspicion of ``x`` with our own Suspect if we hold fresh evidence and are
        healthy ourselves; the confirmation goes straight back to ``reply_to`` and is gossiped."""
        s = self._suspicions.get(x.name)
        seen = self._evidence.pop(x.name, None)  # one piece of evidence confirms once
        if (
            s is None
            or seen is None
            or now_ms - seen > self.config.probe_interval_ms
            or self.awareness.score
        ):
            return
        msg = m.Suspect(x.name, x.incarnation, self.name)
        if s.confirm(self.name):
            heapq.heappush(self._suspicion_heap, (s.deadline_ms(), x.name))
        self.queue.queue(x.name, m.encode_message(msg))
        self.stats.confirmations_sent += 1
        self._send(out, reply_to, [m.encode_message(msg)])

    # -- news ---------------------------------------------------------------------------------

    def _dispatch(self, msg: m.Message, src: Addr, now_ms: int, out: Output) -> None:
        if isinstance(msg, m.Ping):
            if msg.target in ("", self.name):
                ack = m.encode_message(m.Ack(msg.seq))
                self._send(out, msg.source_addr, [ack, *self._buddy(msg.source)])
        elif isinstance(msg, m.Ack):
            self._on_ack(msg.seq, now_ms, out)
        elif isinstance(msg, m.Alive):
            self._on_alive(msg, now_ms, out)
        elif isinstance(msg, m.Suspect):
            self._on_suspect(msg, now_ms, out, src)
        elif isinstance(msg, m.Dead):
            self._on_dead(msg, now_ms, out, src)
        elif isinstance(msg, m.Left):
            self._on_left(msg, now_ms, out)
        elif isinstance(msg, m.PingReq):
            self._on_ping_req(msg, now_ms, out)
        elif isinstance(msg, m.Nack):
            p = self._probe_by_seq(msg.seq)
            if p is not None:
                p.nacks += 1
        elif isinstance(msg, m.PushPull):
            self._merge(msg, now_ms, out)

    def _on_news(self, msg: _News, src: Addr, now_ms: int, out: Output) -> None:
        """Membership news from a datagram, skipping exact repeats: each item arrives about
        ``retransmit limit`` times, and a repeat in an unchanged state has no effect. Stale news
        (older incarnation) is never skipped: every copy may need a correction sent back."""
        name = msg.name
        table = self.table.by_name
        x = table.get(name)
        entry = self._seen.get(name)
        if (
            x is not None
            and entry is not None
            and entry[0] == (x.incarnation, x.status)
            and msg in entry[1]
        ):
            return
        self._dispatch(msg, src, now_ms, out)
        x = table.get(name)
        if x is None or msg.incarnation < x.incarnation:
            return
        key = (x.incarnation, x.status)
        entry = self._seen.get(name)
        if entry is not None and entry[0] == key:
            entry[1].add(msg)
        else:
            self._seen[name] = (key, {msg})

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
            self.targets.add(x.name)
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
                self.targets.insert_probe(x.name)
            if changed and old <= Status.SUSPECT:
                kinds.append(EventKind.UPDATE)
            if old is not Status.ALIVE:
                self.table.set_status(x, Status.ALIVE, now_ms)
                self._suspicions.pop(x.name, None)
        for kind in kinds:
            out.events.append(MemberEvent(kind, self._view(x)))
        self.queue.queue(msg.name, m.encode_message(msg))

    def _on_suspect(
        self, msg: m.Suspect, now_ms: int, out: Output, src: Addr | None = None, probed: bool = True
    ) -> None:
        """Suspicion news. ``probed`` is False for a push-pull row (its source did not probe the
        member, so it is no independent confirmation); ``src`` is where a confirmation of ours
        goes straight back to."""
        x, cur, held = self._current(msg.name)
        action = decide(News.SUSPECT, cur, msg.incarnation, held)
        if action is Action.IGNORE or x is None:
            if src is not None and x is not None and msg.incarnation < held:
                self._correct(x, src, out)
            return
        if action is Action.REFUTE:
            self._refute(msg.incarnation)
            return
        if action is Action.CONFIRM:
            s = self._suspicions.get(x.name)
            if s is not None and probed and s.confirm(msg.sender):
                heapq.heappush(self._suspicion_heap, (s.deadline_ms(), x.name))
                data = m.encode_message(msg)
                if msg.sender == self.name:  # our own evidence: spread it fully
                    self.queue.queue(msg.name, data)
                else:  # relayed: ride the suspicion's remaining retransmissions
                    self.queue.refresh(msg.name, data)
            if src is not None and self._evidence:
                self._confirm_from_evidence(x, src, now_ms, out)
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
        if src is not None and self._evidence:
            self._confirm_from_evidence(x, src, now_ms, out)

    def _expire_suspicions(self, now_ms: int, out: Output) -> None:
        heap = self._suspicion_heap
        while heap and heap[0][0] + self._grace <= now_ms:
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
            self._gossip(now_ms, out)  # spread a death at once, not at the next gossip round

    def _on_dead(self, msg: m.Dead, now_ms: int, out: Output, src: Addr | None = None) -> None:
        x, cur, held = self._current(msg.name)
        action = decide(News.DEAD, cur, msg.incarnation, held)
        if action is Action.IGNORE or x is None:
            if src is not None and x is not None and msg.incarnation < held:
                self._correct(x, src, out)
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
        meta_max = self.config.meta_max_bytes
        for row in pp.members:
            x = table.get(row.name)
            if x is None:
                if row.status == Status.ALIVE and len(row.meta) <= meta_max:
                    self._learn(row, now_ms, out)  # the table's "alive, unknown" cell, inline
                    continue
            elif (
                x.incarnation == row.incarnation
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
                self._on_suspect(suspect, now_ms, out, probed=False)

    def _learn(self, row: m.MemberState, now_ms: int, out: Output) -> None:
        """A member we never heard of, alive in a push-pull row (a join merges n of them)."""
        x = Member(row.name, row.addr, row.meta, row.incarnation, Status.ALIVE, now_ms)
        self.table.add(x)
        self.targets.add(x.name)
        view = MemberView(x.name, x.addr, x.meta, x.incarnation, Status.ALIVE)
        out.events.append(MemberEvent(EventKind.JOIN, view))
        alive = m.Alive(row.name, row.incarnation, row.addr, row.meta)
        self.queue.queue(row.name, m.encode_message(alive))

    def _correct(self, x: Member, src: Addr, out: Output) -> None:
        """``src`` spread a suspicion or death older than our alive record of ``x`` (it missed a
        refutation): send it the refutation, so it stops spreading the stale news and its own
        timer cannot kill ``x`` (Lifeguard on only; costs one datagram per stale sender)."""
        if self.config.lifeguard and x.status is Status.ALIVE and src != self.addr:
            alive = m.Alive(x.name, x.incarnation, x.addr, x.meta)
            self._send(out, src, [m.encode_message(alive)])

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

    def _reap(self, now_ms: int) -> None:
        horizon = now_ms - self.config.dead_reap_ms
        for name in [
            x.name
            for x in self.table.by_name.values()
            if x.status >= Status.DEAD and x.since_ms < horizon and x is not self._self
        ]:
            self.table.remove(name)
            self.queue.drop(name)
            self.targets.remove(name)
            self.last_rtt_ms.pop(name, None)
            self._evidence.pop(name, None)
            self._seen.pop(name, None)
