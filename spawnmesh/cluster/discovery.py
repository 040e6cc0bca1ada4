"""Seed discovery (trio shell): a static list of ``host:port`` and a DNS name, as a Kubernetes
headless Service publishes it.

* static seeds: IP literals are used as they are; names go through the system resolver
  (``getaddrinfo``: /etc/hosts, then DNS), every address of a name counts;
* ``dns_name``: A and AAAA records of ``name[:port]`` (the port defaults to the gossip port), or,
  when the name starts with an underscore (``_gossip._udp.svc.ns.svc.cluster.local``), SRV
  records: each target's A/AAAA addresses with the record's port.

DNS queries use dnspython's async resolver (it runs under trio), against the system's
configured servers or ``nameserver``. dnspython is imported on the first query, so a node without
``dns_name`` never loads it (2-4 MB of RSS, docs/edge.md). Everything is resolved again on every
call, so a retry sees pods that appeared since; a failed lookup is logged and yields what the
other sources gave.
"""

from __future__ import annotations

import logging
import socket as _socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from spawnmesh.cluster.addr import ip_literal, parse_host_port
from spawnmesh.cluster.messages import Addr
from spawnmesh.errors import InvalidArgument

if TYPE_CHECKING:
    import dns.asyncresolver

log = logging.getLogger("spawnmesh.cluster.discovery")


async def resolve_host_port(text: str, default_port: int) -> list[Addr]:
    """Every address of ``host[:port]`` (``InvalidArgument`` if malformed, [] if unresolvable)."""
    host, port = parse_host_port(text, default_port)
    ip = ip_literal(host)
    if ip is not None:
        return [(ip, port)]
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=_socket.SOCK_DGRAM)
    except OSError as exc:
        log.warning("discovery: cannot resolve %s: %s", host, exc)
        return []
    out: list[Addr] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (_socket.AF_INET, _socket.AF_INET6):
            addr: Addr = (str(sockaddr[0]), int(sockaddr[1]))
            if addr not in out:
                out.append(addr)
    return out


class Discovery:
    """Where to look for members: static seeds and an optional DNS name."""

    def __init__(
        self,
        seeds: Sequence[str],
        dns_name: str,
        default_port: int,
        *,
        nameserver: str = "",
        timeout_s: float = 2.0,
    ) -> None:
        for seed in seeds:
            parse_host_port(seed, default_port or 1)  # fail early on a malformed seed
        self.seeds = list(seeds)
        self.dns_name = dns_name.strip()
        self.default_port = default_port
        self.timeout_s = timeout_s
        self._nameserver = self._parse_nameserver(nameserver)  # fail early on a bad one
        self._resolver_: dns.asyncresolver.Resolver | None = None

    @property
    def configured(self) -> bool:
        """Whether there is anywhere to look (else the node waits to be joined)."""
        return bool(self.seeds or self.dns_name)

    @staticmethod
    def _parse_nameserver(nameserver: str) -> tuple[str, int] | None:
        if not nameserver.strip():
            return None
        host, port = parse_host_port(nameserver, 53)
        ip = ip_literal(host)
        if ip is None:
            raise InvalidArgument(f"DNS server {nameserver!r} must be an IP address")
        return ip, port

    @property
    def _resolver(self) -> dns.asyncresolver.Resolver:
        """The DNS resolver, made (and dnspython imported) on first use."""
        if self._resolver_ is None:
            import dns.asyncresolver
            import dns.resolver

            if self._nameserver is None:
                try:
                    resolver = dns.asyncresolver.Resolver()
                except dns.resolver.NoResolverConfiguration:
                    resolver = dns.asyncresolver.Resolver(configure=False)
            else:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [self._nameserver[0]]
                resolver.port = self._nameserver[1]
            resolver.lifetime = self.timeout_s
            resolver.timeout = self.timeout_s
            self._resolver_ = resolver
        return self._resolver_

    async def resolve(self) -> list[Addr]:
        """Every address the sources give now (deduplicated, in source order)."""
        out: list[Addr] = []
        for seed in self.seeds:
            try:
                out.extend(await resolve_host_port(seed, self.default_port))
            except InvalidArgument as exc:  # e.g. no port, and no gossip port to assume
                log.warning("discovery: skipping seed %s", exc)
        if self.dns_name:
            if self.dns_name.startswith("_"):
                out.extend(await self.resolve_srv(self.dns_name))
            else:
                try:
                    host, port = parse_host_port(self.dns_name, self.default_port)
                except InvalidArgument as exc:
                    log.warning("discovery: skipping DNS name %s", exc)
                else:
                    out.extend((ip, port) for ip in await self.resolve_ips(host))
        seen: set[Addr] = set()
        unique = []
        for addr in out:
            if addr not in seen:
                seen.add(addr)
                unique.append(addr)
        return unique

    async def resolve_ips(self, name: str) -> list[str]:
        """A and AAAA records of ``name`` through the DNS resolver."""
        import dns.exception
        import dns.rdatatype
        import dns.resolver

        ips: list[str] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = await self._resolver.resolve(name, rdtype, search=False)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except (dns.exception.DNSException, OSError) as exc:
                log.warning("discovery: DNS %s %s failed: %s", rdtype.name, name, exc)
                continue
            ips.extend(str(ip_literal(r.address)) for r in answer)
        if not ips:
            log.warning("discovery: DNS name %s has no A/AAAA records", name)
        return ips

    async def resolve_srv(self, name: str) -> list[Addr]:
        """SRV records of ``name``: each target's addresses with the record's port, in
        priority order (lowest first), then by weight (highest first)."""
        import dns.exception
        import dns.rdatatype
        import dns.resolver

        try:
            answer = await self._resolver.resolve(name, dns.rdatatype.SRV, search=False)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            log.warning("discovery: DNS name %s has no SRV records", name)
            return []
        except (dns.exception.DNSException, OSError) as exc:
            log.warning("discovery: DNS SRV %s failed: %s", name, exc)
            return []
        records = sorted(answer, key=lambda r: (r.priority, -r.weight))
        out: list[Addr] = []
        for rec in records:
            target = rec.target.to_text(omit_final_dot=True)
            ip = ip_literal(target)
            ips = [ip] if ip is not None else await self.resolve_ips(target)
            out.extend((x, int(rec.port)) for x in ips)
        return out
