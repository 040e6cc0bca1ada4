"""Gossip addresses as text: ``host:port``, ``[v6]:port`` or a bare host (sans-IO parsing only;
names are resolved by the discovery shell)."""

from __future__ import annotations

import ipaddress

from spawnmesh.cluster.messages import Addr
from spawnmesh.errors import InvalidArgument


def parse_host_port(text: str, default_port: int = 0) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` / ``host`` / ``v6`` into (host, port); a missing port is
    ``default_port``. ``InvalidArgument`` if the text cannot be an address."""
    s = text.strip()
    if not s:
        raise InvalidArgument("empty address")
    port_text = ""
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise InvalidArgument(f"{text!r}: expected [ipv6]:port")
        port_text = rest[1:]
    elif s.count(":") == 1:
        host, _, port_text = s.partition(":")
    else:
        host = s  # a bare name, IPv4 or IPv6 literal
    if not host or any(c.isspace() for c in host):
        raise InvalidArgument(f"{text!r}: no host")
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise InvalidArgument(f"{text!r}: port must be 1..65535")
        port = int(port_text)
    if not 0 < port < 65536:
        raise InvalidArgument(f"{text!r}: no port (write host:port)")
    return host, port


def ip_literal(host: str) -> str | None:
    """The normalised IP if ``host`` is an IP literal, else None (a name to resolve)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or the name ``localhost``."""
    if host.strip().lower() == "localhost":
        return True
    ip = ip_literal(host)
    return ip is not None and ipaddress.ip_address(ip).is_loopback


def is_unspecified(host: str) -> bool:
    """Whether ``host`` binds every interface (``0.0.0.0``, ``::`` or empty)."""
    ip = ip_literal(host) if host else "0.0.0.0"
    return ip is not None and ipaddress.ip_address(ip).is_unspecified


def format_addr(addr: Addr) -> str:
    """``host:port`` (``[v6]:port`` for IPv6)."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
