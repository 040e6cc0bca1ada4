"""Tier 2: a few Swim cores pumped by hand (zero-latency FIFO network, manual time)."""

from __future__ import annotations

import random
from collections import deque

import pytest

from spawnmesh.cluster import messages as m
from spawnmesh.cluster.broadcasts import BroadcastQueue
from spawnmesh.cluster.config import SwimConfig, lan
from spawnmesh.cluster.state import Status
from spawnmesh.cluster.swim import EventKind, MemberEvent, Output, Swim, TcpKind
from spawnmesh.errors import ConfigError

Addr = tuple[str, int]


class Net:
    """Hand-pumped network of cores: instant FIFO delivery, optional cuts and crashes."""

    def __init__(self, names: list[str], config: SwimConfig | None = None, seed: int = 0) -> None:
        self.config = config or lan().replace(push_pull_interval_ms=0, reconnect_interval_ms=0)
        self.now = 0
        self.seed = seed
        self.cores: dict[Addr, Swim] = {}
        self.by_name: dict[str, Swim] = {}
        self.down: set[str] = set()
        self.cut: set[tuple[str, str]] = set()
        """Directed UDP cuts (sender, receiver)."""
        self.tcp = True
        self.fifo: deque[tuple[Addr, Addr, bytes]] = deque()
        self.events: dict[str, list[MemberEvent]] = {}
        self.sent: list[tuple[str, Addr, bytes]] = []
        for i, name in enumerate(names):
            self.add(name, ("10.0.0.1", 7000 + i))

    def add(self, name: str, addr: Addr, incarnation: int = 0) -> Swim:
        old = self.by_name.get(name)
        if old is not None:  # a restart: the old process is gone for good
            self.cores.pop(old.addr, None)
        core = Swim(
            name,
            addr,
            b"",
            self.config,
            random.Random(f"{self.seed}:{name}:{addr}"),
            self.now,
            incarnation,
        )
        self.cores[addr] = core
        self.by_name[name] = core
        self.events.setdefault(name, [])
        self.down.discard(name)
        return core

    def join_all(self) -> None:
        first = next(iter(self.by_name.values()))
        for core in list(self.by_name.values())[1:]:
            self.handle(core, core.join([first.addr], self.now))
        self.pump()

    def handle(self, core: Swim, out: Output) -> None:
        self.events[core.name].extend(out.events)
        for addr, data in out.datagrams:
            assert len(data) <= self.config.udp_buffer_bytes
            self.sent.append((core.name, addr, data))
            self.fifo.append((core.addr, addr, data))
        for req in out.tcp_requests:
            dst = self.cores.get(req.addr)
            if dst is None or dst.name in self.down or not self.tcp:
                continue
            reply, out2 = dst.serve_tcp(core.addr, req.data, self.now)
            self.handle(dst, out2)
            if reply is not None:
                self.handle(core, core.receive(dst.addr, reply, self.now))

    def pump(self) -> None:
        while self.fifo:
            src, addr, data = self.fifo.popleft()
            dst = self.cores.get(addr)
            s = self.cores[src]
            if dst is None or dst.name in self.down or s.name in self.down:
                continue
            if (s.name, dst.name) in self.cut:
                continue
            self.handle(dst, dst.receive(src, data, self.now))

    def advance(self, ms: int, step: int = 10) -> None:
        end = self.now + ms
        while self.now < end:
            self.now += step
            for core in list(self.cores.values()):
                if core.name in self.down or self.cores.get(core.addr) is not core:
                    continue
                if core.next_deadline_ms() <= self.now:
                    self.handle(core, core.tick(self.now))
            self.pump()

    def status(self, observer: str, member: str) -> Status | None:
        view = self.by_name[observer].member(member)
        return None if view is None else view.status

    def kinds(self, observer: str, member: str) -> list[EventKind]:
        return [e.kind for e in self.events[observer] if e.member.name == member]


def test_join_and_ping_ack() -> None:
    net = Net(["a", "b"])
    net.join_all()
    assert net.status("a", "b") is Status.ALIVE and net.status("b", "a") is Status.ALIVE
    assert net.kinds("a", "b") == [EventKind.JOIN]
    net.advance(10_000)
    a = net.by_name["a"]
    assert a.stats.probes >= 9 and a.stats.probe_failures == 0
    assert a.awareness.score == 0
    assert net.kinds("a", "b") == [EventKind.JOIN]


def test_indirect_probe_saves_target() -> None:
    net = Net(["a", "b", "c"])
    net.join_all()
    net.advance(3_000)
    net.tcp = False
    net.cut |= {("a", "c"), ("c", "a")}
    net.advance(10_000)
    assert net.by_name["b"].stats.probes > 0
    a = net.by_name["a"]
    assert a.stats.indirect_probes >= 1
    assert a.stats.probe_failures == 0
    assert EventKind.SUSPECT not in net.kinds("a", "c")


def test_tcp_fallback_probe() -> None:
    net = Net(["a", "b"])
    net.join_all()
    net.cut |= {("a", "b")}  # UDP a -> b lost, TCP still works
    streams: list[TcpKind] = []
    real = net.handle

    def spy(core: Swim, out: Output) -> None:
        streams.extend(r.kind for r in out.tcp_requests)
        real(core, out)

    net.handle = spy  # type: ignore[method-assign]
    net.advance(5_000)
    assert TcpKind.PING in streams
    assert net.by_name["a"].stats.probe_failures == 0


def test_crash_suspect_then_dead_with_nacks() -> None:
    net = Net(["a", "b", "c"])
    net.join_all()
    net.advance(2_000)
    net.down.add("c")
    net.advance(60_000)
    for obs in ("a", "b"):
        kinds = net.kinds(obs, "c")
        assert EventKind.DEAD in kinds, kinds
        assert net.status(obs, "c") is Status.DEAD
    # relays answered with nacks, so the observers do not blame themselves much
    assert net.by_name["a"].awareness.score <= 2


def test_suspect_refute_bumps_incarnation_and_awareness() -> None:
    net = Net(["a", "b", "c"])
    net.join_all()
    b = net.by_name["b"]
    data = m.encode([m.Suspect("b", 0, "a")])
    net.handle(b, b.receive(net.by_name["a"].addr, data, net.now))
    assert b.incarnation == 1 and b.stats.refutes == 1 and b.awareness.score == 1
    # a suspects b too; b's alive@1 then overrides it everywhere
    a = net.by_name["a"]
    net.handle(a, a.receive(b.addr, m.encode([m.Suspect("b", 0, "c")]), net.now))
    assert net.status("a", "b") is Status.SUSPECT
    net.advance(3_000)
    assert net.status("a", "b") is Status.ALIVE
    assert net.by_name["a"].member("b").incarnation == 1  # type: ignore[union-attr]
    assert net.kinds("a", "b")[-2:] == [EventKind.SUSPECT, EventKind.ALIVE]


def test_buddy_rule_piggybacks_suspicion_on_ping() -> None:
    net = Net(["a", "b"], lan().replace(gossip_interval_ms=0, push_pull_interval_ms=0))
    net.join_all()
    a, b = net.by_name["a"], net.by_name["b"]
    net.handle(a, a.receive(b.addr, m.encode([m.Suspect("b", 0, "x")]), net.now))
    net.fifo.clear()
    # drive a alone until it pings b: that ping carries the suspicion right after it
    while True:
        net.now = max(net.now + 1, a.next_deadline_ms())
        out = a.tick(net.now)
        pings = [m.decode(d) for addr, d in out.datagrams if addr == b.addr]
        first = next((msgs for msgs in pings if isinstance(msgs[0], m.Ping)), None)
        if first is not None:
            break
    assert first[1] == m.Suspect("b", 0, "a")
    reply = b.receive(a.addr, m.encode(first), net.now)
    assert b.incarnation >= 1  # refuted straight from the ping
    # the refutation goes straight back to the sender of the suspicion
    back = [m.decode(d) for addr, d in reply.datagrams if addr == a.addr]
    assert any(m.Alive("b", 1, b.addr, b"") in msgs for msgs in back), back


def test_buddy_rule_on_acks_and_relayed_pings() -> None:
    """Every packet to a suspect carries the suspicion, not only our own pings: the ack to its
    ping and a ping relayed for someone else (a member deaf for a moment hears of it first)."""
    net = Net(["a", "b", "c"], lan().replace(gossip_interval_ms=0, push_pull_interval_ms=0))
    net.join_all()
    a, b, c = net.by_name["a"], net.by_name["b"], net.by_name["c"]
    net.handle(a, a.receive(c.addr, m.encode([m.Suspect("b", 0, "c")]), net.now))
    assert net.status("a", "b") is Status.SUSPECT
    net.fifo.clear()
    # b pings a: a's ack tells b it is suspected, and b refutes from the ack
    out = a.receive(b.addr, m.encode([m.Ping(77, "a", "b", b.addr)]), net.now)
    acks = [m.decode(d) for addr, d in out.datagrams if addr == b.addr]
    assert acks and acks[0][:2] == [m.Ack(77), m.Suspect("b", 0, "a")], acks
    b.receive(a.addr, m.encode(acks[0]), net.now)
    assert b.incarnation == 1
    # c asks a to probe b for it: the relayed ping carries the suspicion too
    net.handle(a, a.receive(c.addr, m.encode([m.Suspect("b", 0, "c")]), net.now))
    out = a.receive(c.addr, m.encode([m.PingReq(5, "b", b.addr, "c", c.addr, True)]), net.now)
    relayed = [m.decode(d) for addr, d in out.datagrams if addr == b.addr]
    assert relayed and isinstance(relayed[0][0], m.Ping), relayed
    assert relayed[0][1] == m.Suspect("b", 0, "a"), relayed
    # a member we hold alive is told of no suspicion of itself (other news still rides along)
    out = a.receive(c.addr, m.encode([m.Ping(78, "a", "c", c.addr)]), net.now)
    to_c = [m.decode(d) for addr, d in out.datagrams if addr == c.addr]
    assert to_c and not any(isinstance(x, m.Suspect) and x.name == "c" for x in to_c[0]), to_c


def test_graceful_leave_is_left_never_dead() -> None:
    net = Net(["a", "b", "c"])
    net.join_all()
    net.advance(2_000)
    c = net.by_name["c"]
    net.handle(c, c.leave(net.now))
    net.pump()
    net.advance(5_000)
    assert c.leave_complete
    net.down.add("c")
    net.advance(60_000)
    for obs in ("a", "b"):
        assert net.status(obs, "c") is Status.LEFT
        assert EventKind.DEAD not in net.kinds(obs, "c")
        assert EventKind.SUSPECT not in net.kinds(obs, "c")


def test_restart_rejoins_with_higher_incarnation() -> None:
    net = Net(["a", "b", "c"])
    net.join_all()
    net.advance(2_000)
    net.down.add("c")
    net.advance(60_000)
    assert net.status("a", "c") is Status.DEAD
    old = net.by_name["a"].member("c").incarnation  # type: ignore[union-attr]
    c2 = net.add("c", ("10.0.0.2", 9999))  # same name, new address, incarnation 0
    net.handle(c2, c2.join([net.by_name["a"].addr], net.now))
    net.pump()
    assert c2.incarnation == old + 1
    net.advance(5_000)
    for obs in ("a", "b"):
        view = net.by_name[obs].member("c")
        assert view is not None and view.status is Status.ALIVE
        assert view.addr == ("10.0.0.2", 9999) and view.incarnation == old + 1
        assert net.kinds(obs, "c")[-1] in (EventKind.JOIN, EventKind.UPDATE)


def test_restart_before_detection_refutes_stale_alive() -> None:
    net = Net(["a", "b"])
    net.join_all()
    a = net.by_name["a"]
    net.handle(a, a.receive(("x", 1), m.encode([m.Alive("b", 7, ("10.0.0.1", 7001))]), 0))
    b2 = net.add("b", ("10.0.0.3", 7001))
    net.handle(b2, b2.join([a.addr], net.now))
    net.pump()
    assert b2.incarnation == 8


def test_metadata_update_spreads() -> None:
    net = Net(["a", "b"])
    net.join_all()
    b = net.by_name["b"]
    meta = m.encode_meta(m.NodeMeta(("10.0.0.1", 9000), ["counter"], 1, 1, {"zone": "z"}))
    net.handle(b, b.update_meta(meta, net.now))
    net.advance(2_000)
    view = net.by_name["a"].member("b")
    assert view is not None and view.meta == meta and view.incarnation == 1
    assert EventKind.UPDATE in net.kinds("a", "b")
    with pytest.raises(ConfigError):
        b.update_meta(b"x" * 10_000, net.now)


def test_garbage_is_dropped_and_counted() -> None:
    net = Net(["a"])
    a = net.by_name["a"]
    for junk in (b"", b"\xc1", b"\x92\x01\x91\x92\x03\xa1x", m.encode([m.Ack(1)])[:-1]):
        out = a.receive(("x", 1), junk, 0)
        assert out.datagrams == [] and out.events == []
    assert a.stats.malformed == 4


def test_datagrams_respect_budget_with_many_updates() -> None:
    net = Net([f"n{i}" for i in range(40)])
    net.join_all()  # join news for 39 members floods the queues
    net.advance(3_000)
    assert net.sent and max(len(d) for _, _, d in net.sent) <= 1400


def test_same_seed_same_bytes() -> None:
    def run() -> list[tuple[str, tuple[str, int], bytes]]:
        net = Net(["a", "b", "c", "d"], seed=42)
        net.join_all()
        net.down.add("d")
        net.advance(20_000)
        return net.sent

    assert run() == run()


def test_next_deadline_is_never_in_the_past_after_tick() -> None:
    net = Net(["a", "b", "c"])
    net.join_all()
    for _ in range(200):
        net.advance(37)
        for core in net.cores.values():
            assert core.next_deadline_ms() > net.now - 1 or len(core.queue) > 0


def test_quick_restart_same_incarnation_new_address_refutes_at_once() -> None:
    net = Net(["a", "b"])
    net.join_all()
    a = net.by_name["a"]
    b2 = net.add("b", ("10.0.0.9", 7001))  # a still holds b alive@0 at the old address
    net.handle(b2, b2.join([a.addr], net.now))
    net.pump()
    assert b2.incarnation == 1
    net.advance(1_000)
    view = a.member("b")
    assert view is not None and view.addr == ("10.0.0.9", 7001) and view.incarnation == 1
    assert EventKind.SUSPECT not in net.kinds("a", "b")


def test_join_is_retried_while_alone() -> None:
    net = Net(["a", "b"], lan().replace(push_pull_interval_ms=0, reconnect_interval_ms=5_000))
    a, b = net.by_name["a"], net.by_name["b"]
    net.tcp = False
    net.handle(b, b.join([a.addr], net.now))
    assert b.member("a") is None
    net.tcp = True
    net.advance(12_000)
    assert net.status("b", "a") is Status.ALIVE and net.status("a", "b") is Status.ALIVE


def test_refuting_the_highest_incarnation_stays_encodable() -> None:
    net = Net(["a", "b"])
    net.join_all()
    b = net.by_name["b"]
    for inc in (m.MAX_INCARNATION - 1, m.MAX_INCARNATION):
        net.handle(b, b.receive(("x", 1), m.encode([m.Suspect("b", inc, "a")]), net.now))
        assert b.incarnation == m.MAX_INCARNATION  # saturates instead of overflowing
    net.advance(2_000)
    assert net.by_name["a"].stats.malformed == 0


def test_leave_alone_completes_at_once() -> None:
    net = Net(["a"])
    a = net.by_name["a"]
    net.handle(a, a.leave(net.now))
    assert a.leave_complete


def test_newer_suspicion_does_not_inherit_the_old_timer() -> None:
    net = Net(["a", "b", "c"], lan().replace(lifeguard=False))
    net.join_all()
    a = net.by_name["a"]
    net.down.add("b")  # b neither refutes nor answers; only a's timers matter here
    net.handle(a, a.receive(("x", 1), m.encode([m.Suspect("b", 0, "c")]), net.now))
    first = a._suspicions["b"].deadline_ms()
    net.now = first - 10
    net.handle(a, a.receive(("x", 1), m.encode([m.Suspect("b", 1, "c")]), net.now))
    view = a.member("b")
    assert view is not None and view.status is Status.SUSPECT and view.incarnation == 1
    assert a._suspicions["b"].deadline_ms() == first - 10 + a.config.suspicion_min_ms(3)
    net.handle(a, a.tick(first + 10))
    assert net.status("a", "b") is Status.SUSPECT  # the old deadline no longer kills it


def _successor(core: Swim) -> str | None:
    return core.targets.successor(core._is_live)


def test_ring_successor_is_probed_every_period() -> None:
    net = Net([f"n{i}" for i in range(6)])
    net.join_all()
    start = len(net.sent)
    net.advance(10_000)
    for core in net.by_name.values():
        succ = _successor(core)
        assert succ is not None and succ != core.name
        pings = [
            msgs[0]
            for src, _, data in net.sent[start:]
            if src == core.name and isinstance((msgs := m.decode(data))[0], m.Ping)
        ]
        assert sum(p.target == succ for p in pings) >= 9, (core.name, succ)
    # the ring is one cycle: following successors from any node visits every node once
    seen, name = [], "n0"
    for _ in range(6):
        seen.append(name)
        name = _successor(net.by_name[name])  # type: ignore[assignment]
    assert sorted(seen) == sorted(net.by_name) and name == "n0"


def _start_probe(net: Net, core: Swim) -> Output:
    """Run ``core`` (delivering everything) until a tick starts a probe; return that output."""
    while True:
        net.now = max(net.now, core.next_deadline_ms())
        out = core.tick(net.now)
        if core._probes:
            return out
        net.handle(core, out)
        net.pump()


@pytest.mark.parametrize("lifeguard", [True, False])
def test_a_stall_does_not_fail_probes_whose_acks_queued_up(lifeguard: bool) -> None:
    cfg = lan().replace(push_pull_interval_ms=0, reconnect_interval_ms=0, lifeguard=lifeguard)
    net = Net(["a", "b"], cfg)
    net.join_all()
    net.advance(2_000)
    a, b = net.by_name["a"], net.by_name["b"]
    out = _start_probe(net, a)
    ping = next(d for addr, d in out.datagrams if addr == b.addr)
    acks = b.receive(a.addr, ping, net.now).datagrams  # b answers at once...
    stalled = net.now + 3_000  # ...but a's loop stalls 3 s and runs its timers first
    net.handle(a, a.tick(stalled))
    for _, data in acks:
        net.handle(a, a.receive(b.addr, data, stalled))
    net.now = stalled
    net.pump()
    net.advance(2_000)
    if lifeguard:
        assert a.stats.stalls >= 1 and a.stats.probe_failures == 0
        assert EventKind.SUSPECT not in net.kinds("a", "b")
    else:  # memberlist without Lifeguard: the timer fired before the ack was read
        assert a.stats.probe_failures == 1
        assert EventKind.SUSPECT in net.kinds("a", "b")


def test_helpers_confirm_from_their_own_failed_relays() -> None:
    net = Net(["a", "b", "c", "d", "e"])
    net.join_all()
    net.advance(3_000)
    net.down.add("e")
    t0 = -1
    while t0 < 0:
        net.advance(10, step=10)
        if any(net.status(x, "e") is Status.SUSPECT for x in "abcd"):
            t0 = net.now
    assert sum(net.by_name[x].stats.confirmations_sent for x in "abcd") >= 1
    first = max(
        (net.by_name[x]._suspicions.get("e") for x in "abcd"),
        key=lambda s: -1 if s is None else s.confirmations,
    )
    assert first is not None and first.confirmations >= 2  # its helpers + ring/other probers
    net.advance(first.min_ms + 300)
    assert all(net.status(x, "e") is Status.DEAD for x in "abcd")


def test_suspected_member_is_told_at_once() -> None:
    cfg = lan().replace(push_pull_interval_ms=0, reconnect_interval_ms=0, gossip_interval_ms=0)
    net = Net(["a", "b", "c"], cfg)
    net.join_all()
    net.advance(2_000)
    net.tcp = False
    net.cut |= {("b", "a"), ("b", "c")}  # b hears everything, nobody hears b
    start = len(net.sent)
    while net.status("a", "b") is not Status.SUSPECT and net.status("c", "b") is not Status.SUSPECT:
        net.advance(10, step=10)
    told = [
        msgs
        for src, addr, data in net.sent[start:]
        if addr == net.by_name["b"].addr and src in "ac"
        for msgs in [m.decode(data)]
        if isinstance(msgs[0], m.Suspect) and msgs[0].name == "b"
    ]
    assert told, "the suspector sends the suspicion straight to the suspect"
    assert net.by_name["b"].incarnation >= 1


@pytest.mark.parametrize("lifeguard", [True, False])
def test_stale_suspicion_is_answered_with_the_refutation(lifeguard: bool) -> None:
    net = Net(["a", "b", "c"], lan().replace(lifeguard=lifeguard))
    net.join_all()
    a, b, c = (net.by_name[x] for x in "abc")
    fresh = m.encode([m.Alive("b", 1, b.addr, b"")])
    net.handle(a, a.receive(b.addr, fresh, net.now))
    net.handle(a, a.receive(b.addr, m.encode([m.Suspect("a", 0, "b")]), net.now))
    assert a.incarnation == 1  # refuted once
    a.queue = BroadcastQueue()  # only the answers below may carry alive news
    for stale in (m.Suspect("b", 0, "c"), m.Dead("b", 0, "c"), m.Suspect("a", 0, "c")):
        for _ in range(2):  # every stale copy is answered, repeats included
            out = a.receive(c.addr, m.encode([stale]), net.now)
            back = [m.decode(d) for addr, d in out.datagrams if addr == c.addr]
            got = [(x.name, x.incarnation) for ms in back for x in ms if isinstance(x, m.Alive)]
            assert got == ([(stale.name, 1)] if lifeguard else [])
    assert a.incarnation == 1  # a stale suspicion of ourselves needs no new refutation


def test_push_pull_rows_are_no_independent_confirmation() -> None:
    net = Net(["a", "b", "c", "d"])
    net.join_all()
    a = net.by_name["a"]
    net.handle(a, a.receive(("x", 1), m.encode([m.Suspect("b", 0, "c")]), net.now))
    rows = [m.MemberState("b", 0, net.by_name["b"].addr, b"", int(Status.DEAD))]
    net.handle(a, a.merge_push_pull(m.encode([m.PushPull(False, "d", rows)]), net.now))
    assert a._suspicions["b"].confirmations == 0
    net.handle(a, a.receive(("x", 1), m.encode([m.Suspect("b", 0, "d")]), net.now))
    assert a._suspicions["b"].confirmations == 1  # d's own suspicion does count


def test_direct_probes_report_their_round_trip() -> None:
    net = Net(["a", "b"], lan().replace(gossip_interval_ms=0, push_pull_interval_ms=0))
    net.join_all()
    a, b = net.by_name["a"], net.by_name["b"]
    net.fifo.clear()
    assert a.last_rtt_ms == {}
    while True:  # drive a alone until it pings b
        net.now = max(net.now + 1, a.next_deadline_ms())
        out = a.tick(net.now)
        ping = next((m.decode(d) for addr, d in out.datagrams if addr == b.addr), None)
        if ping is not None and isinstance(ping[0], m.Ping):
            break
    sent = net.now
    reply = b.receive(a.addr, m.encode(ping), sent + 3)  # 3 ms out
    [ack] = [d for addr, d in reply.datagrams if addr == a.addr]
    got = a.receive(b.addr, ack, sent + 7)  # 4 ms back
    assert got.rtts_ms == [7]
    assert a.last_rtt_ms == {"b": 7}
    assert b.last_rtt_ms == {}  # b answered; it measured nothing
    again = a.receive(b.addr, ack, sent + 9)  # a duplicate ack times nothing
    assert again.rtts_ms == [] and a.last_rtt_ms == {"b": 7}


def test_probes_answered_through_helpers_are_not_timed() -> None:
    net = Net(["a", "b", "c"])
    net.join_all()
    net.advance(3_000)
    net.tcp = False
    net.cut |= {("a", "c"), ("c", "a")}
    a = net.by_name["a"]
    before = a.last_rtt_ms.get("c")
    net.advance(10_000)
    assert a.stats.indirect_probes >= 1
    assert a.last_rtt_ms.get("c") == before  # c answers only through b now
    assert a.last_rtt_ms.get("b") == 0  # the hand-pumped network delivers at once
