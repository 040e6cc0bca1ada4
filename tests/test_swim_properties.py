"""Hypothesis properties of one Swim core fed arbitrary membership news and garbage."""

from __future__ import annotations

import random

from hypothesis import example, given, settings
from hypothesis import strategies as st

from spawnmesh.cluster import messages as m
from spawnmesh.cluster.config import lan
from spawnmesh.cluster.state import Status
from spawnmesh.cluster.swim import EventKind, Swim

NAMES = ["me", "a", "b", "c"]
ADDRS = [("10.0.0.1", 1), ("10.0.0.2", 2)]
inc = st.integers(0, 6)
name = st.sampled_from(NAMES)
news = st.one_of(
    st.builds(m.Alive, name, inc, st.sampled_from(ADDRS), st.sampled_from([b"", b"x"])),
    st.builds(m.Suspect, name, inc, name),
    st.builds(m.Dead, name, inc, name),
    st.builds(m.Left, name, inc),
    st.builds(m.Ack, st.integers(0, 10)),
    st.builds(m.Nack, st.integers(0, 10)),
    st.builds(m.Ping, st.integers(0, 10), name, name, st.sampled_from(ADDRS)),
)
step = st.one_of(
    st.tuples(st.just("msg"), st.lists(news, min_size=1, max_size=4)),
    st.tuples(st.just("tick"), st.integers(0, 5_000)),
    st.tuples(st.just("junk"), st.binary(max_size=30)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=40), st.integers(0, 2**32))
@example(  # found in CI: a leave and a rejoin of one member in one packet
    [
        ("msg", [m.Alive("c", 0, ADDRS[0], b"")]),
        ("msg", [m.Left("c", 0), m.Alive("c", 1, ADDRS[0], b"")]),
    ],
    0,
)
def test_views_only_move_forward(steps: list[tuple[str, object]], seed: int) -> None:
    core = Swim("me", ("10.0.0.9", 9), b"", lan(), random.Random(seed), 0)
    now = 0
    seen: dict[str, int] = {}
    table: dict[str, int] = {}
    my_inc = 0
    for kind, arg in steps:
        if kind == "msg":
            out = core.receive(("x", 1), m.encode(arg), now)  # type: ignore[arg-type]
        elif kind == "tick":
            now += arg  # type: ignore[operator]
            out = core.tick(now)
        else:
            out = core.receive(("x", 1), arg, now)  # type: ignore[arg-type]
        for _addr, data in out.datagrams:
            assert len(data) <= core.config.udp_buffer_bytes
            m.decode(data)  # everything we send decodes
        last: dict[str, EventKind] = {}
        for ev in out.events:
            assert ev.member.name != "me"
            assert ev.member.incarnation >= seen.get(ev.member.name, 0)
            seen[ev.member.name] = ev.member.incarnation
            last[ev.member.name] = ev.kind
        for member_name, kind in last.items():
            # One packet may carry a leave and then a rejoin at a higher incarnation: only the
            # member's last event of the step must agree with the table.
            status = core.member(member_name).status  # type: ignore[union-attr]
            if kind in (EventKind.DEAD, EventKind.LEFT):
                assert status in (Status.DEAD, Status.LEFT)
        assert core.incarnation >= my_inc  # only ever refutes upward
        my_inc = core.incarnation
        me = core.member("me")
        assert me is not None and me.status is Status.ALIVE
        for v in core.members():
            if v.name != "me":  # the table never moves a member's incarnation backwards
                assert v.incarnation >= table.get(v.name, 0)
                table[v.name] = v.incarnation
        assert core.next_deadline_ms() >= 0
