"""Gossip addresses from the network are checked: a packet whose address is not an IP literal with
a port in 1..65535 is malformed (counted and dropped), and no send to any address can crash the
membership service (decoder properties, then real loopback sockets)."""

from __future__ import annotations

import socket

import msgspec
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from spawnmesh import Node
from spawnmesh.cluster import messages as m
from spawnmesh.cluster.seal import Channel
from spawnmesh.errors import ProtocolError
from tests.conftest import NodeFactory
from tests.test_transport_shell import all_alive, cluster, until

GOOD = ("127.0.0.1", 7946)
META = m.encode_meta(m.NodeMeta(("127.0.0.1", 1)))

bad_ports = st.one_of(st.integers(-(2**63), 0), st.integers(65536, 2**64 - 1))
bad_hosts = st.one_of(
    st.text(max_size=80).filter(lambda h: not m.valid_host(h)),
    st.just("127.0.0.1\x00"),
    st.just("localhost"),
    st.just("fe80::1%\x00"),
    st.just("1" * 65),
)
good_ports = st.integers(1, 65535)
good_hosts = st.ip_addresses().map(str)
bad_addrs = st.one_of(st.tuples(good_hosts, bad_ports), st.tuples(bad_hosts, good_ports))


def carriers(addr: tuple[str, int]) -> list[m.Message]:
    """Every message that carries a gossip address, with ``addr`` in each address field."""
    return [
        m.Ping(1, "a", "b", addr),
        m.PingReq(2, "c", addr, "b", GOOD),
        m.PingReq(2, "c", GOOD, "b", addr),
        m.Alive("ghost", 0, addr, META),
        m.PushPull(False, "b", [m.MemberState("ghost", 0, addr, META, 0)]),
    ]


@given(bad_addrs, st.integers(0, 4), st.lists(st.builds(m.Ack, st.integers(0, 99)), max_size=3))
def test_a_bad_address_makes_the_packet_malformed(
    addr: tuple[str, int], which: int, others: list[m.Message]
) -> None:
    data = m.encode([*others, carriers(addr)[which]])  # the encoder does not check
    with pytest.raises(ProtocolError):
        m.decode(data)


@given(st.tuples(good_hosts, good_ports))
def test_every_ip_literal_and_port_is_accepted(addr: tuple[str, int]) -> None:
    msgs = carriers(addr)
    assert m.decode(m.encode(msgs)) == msgs


def test_scoped_ipv6_is_an_address_and_peer_addr_may_lack_a_host() -> None:
    addr = ("fe80::1%eth0", 7946)
    assert m.decode(m.encode([m.Alive("a", 0, addr)])) == [m.Alive("a", 0, addr)]
    meta = m.NodeMeta(("", 7000))
    assert m.decode_meta(m.encode_meta(meta)) == meta
    with pytest.raises(ProtocolError):
        m.decode_meta(msgspec.msgpack.encode([["127.0.0.1", 70000]]))


# ---------------------------------------------------------------- real sockets


async def test_sends_to_bad_addresses_are_counted_not_raised(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with cluster() as start:
        a = await start("a")
        tr = a.m.transport
        for addr in (("127.0.0.1", 70000), ("127.0.0.1", -1), ("127.0.0.1\x00", 1)):
            await tr.send_datagram(addr, m.encode([m.Ack(1)]))
            assert await tr.exchange(addr, m.encode([m.Ack(1)]), 1.0) is None
        assert tr.stats.udp_send_errors == 3


def hostile_packets() -> list[bytes]:
    out: list[bytes] = []
    for addr in (("127.0.0.1", 70000), ("127.0.0.1\x00", 1), ("127.0.0.1", 0)):
        for msg in carriers(addr)[:4]:
            out.append(m.encode([msg]))
    return out


async def test_a_member_survives_packets_with_bad_addresses(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with cluster() as start:
        a = await start("a")
        b = await start("b", seeds=(a.addr,))
        await until(lambda: all_alive([a, b]), "a and b joined")
        before = a.m.swim.stats.malformed
        packets = hostile_packets()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for pkt in packets:
                sock.sendto(a.m.transport.sealer.seal(pkt, Channel.UDP), a.m.addr)
        push = m.encode([m.PushPull(True, "x", [m.MemberState("ghost", 0, ("127.0.0.1", 70000),
                                                                META, 0)])])
        assert await b.m.transport.exchange(a.m.addr, push, 5.0) is None  # dropped, no reply
        await until(lambda: a.m.swim.stats.malformed >= before + len(packets) + 1, "counted")
        await trio.sleep(30)  # many protocol periods: probes and gossip would reach the ghost
        for s in (a, b):
            assert s.status_of("ghost") is None
            assert set(s.m.live()) == {"a", "b"}
        assert not a.scope.cancel_called  # the service ran on (a crash fails the test)


async def test_a_node_keeps_its_membership_service_on_bad_addresses(
    make_node: NodeFactory,
) -> None:
    node: Node
    async with make_node() as node:
        ms = node.membership
        assert ms is not None and node.supervisor is not None
        packets = hostile_packets()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for pkt in packets:
                sock.sendto(ms.transport.sealer.seal(pkt, Channel.UDP), ms.addr)
        with trio.fail_after(10):
            while ms.swim.stats.malformed < len(packets):  # noqa: ASYNC110 - polling a counter
                await trio.sleep(0.01)
        await trio.sleep(2)  # two protocol periods
        assert not any(node.supervisor.restarts.values()), node.supervisor.restarts
        assert [v.name for v in ms.members()] == [node.name]
