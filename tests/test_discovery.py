"""Seed discovery against a real DNS server on loopback (a tiny responder built with dnspython's
message API): A/AAAA and SRV records like a Kubernetes headless Service, re-resolution, failures,
static seeds, and a node joining another through DNS alone."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio

from spawnmesh.cluster import config as presets
from spawnmesh.cluster.discovery import Discovery, resolve_host_port
from spawnmesh.cluster.membership import Membership, MembershipSettings
from spawnmesh.cluster.messages import NodeMeta
from spawnmesh.cluster.state import Status
from spawnmesh.errors import InvalidArgument


class DnsServer:
    """Answers A/AAAA/SRV queries from ``records`` ({(name, type): [rdata text]}); unknown
    names get NXDOMAIN, known names without that type an empty NOERROR answer."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.queries: list[tuple[str, str]] = []
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            task_status.started()
            while True:
                data, addr = await sock.recvfrom(4096)
                query = dns.message.from_wire(data)
                reply = dns.message.make_response(query)
                q = query.question[0]
                name = q.name.to_text()
                kind = dns.rdatatype.to_text(q.rdtype)
                self.queries.append((name, kind))
                values = self.records.get((name, kind))
                if values:
                    reply.answer.append(dns.rrset.from_text(q.name, 5, "IN", kind, *values))
                elif not any(n == name for n, _ in self.records):
                    reply.set_rcode(dns.rcode.NXDOMAIN)
                await sock.sendto(reply.to_wire(), addr)


@pytest.fixture
async def dns_server(nursery: trio.Nursery) -> AsyncIterator[DnsServer]:
    server = DnsServer()
    await nursery.start(server.serve)
    yield server


def discovery(server: DnsServer, name: str, seeds: tuple[str, ...] = ()) -> Discovery:
    return Discovery(seeds, name, 7946, nameserver=f"127.0.0.1:{server.port}", timeout_s=2.0)


async def test_a_and_aaaa_records_with_the_gossip_port(dns_server: DnsServer) -> None:
    dns_server.records[("mesh.test.", "A")] = ["10.0.0.1", "10.0.0.2"]
    dns_server.records[("mesh.test.", "AAAA")] = ["fd00::3"]
    got = await discovery(dns_server, "mesh.test").resolve()
    assert sorted(got) == [("10.0.0.1", 7946), ("10.0.0.2", 7946), ("fd00::3", 7946)]
    assert got[-1] == ("fd00::3", 7946)  # A before AAAA
    got = await discovery(dns_server, "mesh.test:9000").resolve()
    assert sorted(got) == [("10.0.0.1", 9000), ("10.0.0.2", 9000), ("fd00::3", 9000)]


async def test_srv_records_give_targets_and_ports(dns_server: DnsServer) -> None:
    dns_server.records[("_gossip._udp.mesh.test.", "SRV")] = [
        "10 50 7002 node-b.mesh.test.",
        "0 50 7001 node-a.mesh.test.",
    ]
    dns_server.records[("node-a.mesh.test.", "A")] = ["10.0.0.1"]
    dns_server.records[("node-b.mesh.test.", "A")] = ["10.0.0.2"]
    got = await discovery(dns_server, "_gossip._udp.mesh.test").resolve()
    assert got == [("10.0.0.1", 7001), ("10.0.0.2", 7002)]  # priority order


async def test_every_resolve_asks_again(dns_server: DnsServer) -> None:
    d = discovery(dns_server, "mesh.test")
    dns_server.records[("mesh.test.", "A")] = ["10.0.0.1"]
    assert await d.resolve() == [("10.0.0.1", 7946)]
    dns_server.records[("mesh.test.", "A")] = ["10.0.0.1", "10.0.0.9"]  # a pod appeared
    assert sorted(await d.resolve()) == [("10.0.0.1", 7946), ("10.0.0.9", 7946)]


async def test_missing_name_logs_and_keeps_static_seeds(
    dns_server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "spawnmesh.cluster.discovery")
    d = discovery(dns_server, "nothing.test", seeds=("127.0.0.1:5", "[::1]:6"))
    assert await d.resolve() == [("127.0.0.1", 5), ("::1", 6)]
    assert any("nothing.test" in r.getMessage() for r in caplog.records)
    assert ("nothing.test.", "A") in dns_server.queries


async def test_a_dead_dns_server_times_out_to_nothing() -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    d = Discovery((), "mesh.test", 7946, nameserver=f"127.0.0.1:{port}", timeout_s=0.3)
    with trio.fail_after(5):
        assert await d.resolve() == []


async def test_static_seeds_resolve_names_and_reject_garbage() -> None:
    assert await resolve_host_port("localhost:7000", 1) in (
        [("127.0.0.1", 7000)],
        [("::1", 7000), ("127.0.0.1", 7000)],
        [("127.0.0.1", 7000), ("::1", 7000)],
    )
    assert await resolve_host_port("10.1.2.3", 7946) == [("10.1.2.3", 7946)]
    for bad in ("", "host:0", "host:99999", "[::1", "a b:1"):
        with pytest.raises(InvalidArgument):
            await resolve_host_port(bad, 7946)


async def test_a_node_joins_through_srv_records(dns_server: DnsServer) -> None:
    """Real clock: node b finds node a only through DNS (SRV with a's ephemeral port)."""
    fast = presets.local()

    def make(name: str, **kw: object) -> Membership:
        s = MembershipSettings(swim=fast, **kw)  # type: ignore[arg-type]
        return Membership(name, s, NodeMeta(("127.0.0.1", 1)))

    a = make("a")
    await a.open()
    dns_server.records[("_gossip._udp.mesh.test.", "SRV")] = [f"0 0 {a.addr[1]} 127.0.0.1."]
    b = make(
        "b",
        dns_name="_gossip._udp.mesh.test",
        dns_nameserver=f"127.0.0.1:{dns_server.port}",
    )
    await b.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)

        def a_alive() -> bool:
            return any(v.name == "a" and v.status is Status.ALIVE for v in b.members())

        with trio.fail_after(10):
            while not a_alive():  # noqa: ASYNC110 - polling a view
                await trio.sleep(0.05)
        assert b.joined_once
        nursery.cancel_scope.cancel()
    a.close()
    b.close()
