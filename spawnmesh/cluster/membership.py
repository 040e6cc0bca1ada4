"""The membership service (trio shell): drives the sans-IO SWIM core with the transport, joins
through discovery, and is the facade the rest of the node reads membership from.

Tasks (all in the nursery of :meth:`Membership.run`, a child of the node's supervisor):

* **tick**: sleeps until ``Swim.next_deadline_ms()`` (or until another task changed it), then
  ``tick()``; time is ``trio.current_time()``, so ``MockClock`` drives it in tests;
* **udp**: every datagram that opens goes to ``Swim.receive``;
* **tcp**: inbound frames go to ``Swim.serve_tcp``; outbound ``Output.tcp_requests`` run as tasks
  bounded by the transport (each under its ``timeout_ms``), the reply fed to ``receive``;
* **discovery**: resolves seeds and DNS, joins while alone with exponential backoff (again at
  once whenever the node becomes alone), and every ``refresh_s`` joins one discovered address
  that is not a live member (so islands formed during a partition merge).

Membership events are delivered to subscribers synchronously, in the order the core produced
them; :attr:`Membership.version` changes whenever :meth:`Membership.live` (names or metadata)
does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec
import trio

from spawnmesh.cluster import config as presets
from spawnmesh.cluster.addr import format_addr, ip_literal, is_loopback, is_unspecified
from spawnmesh.cluster.config import SwimConfig
from spawnmesh.cluster.discovery import Discovery, resolve_host_port
from spawnmesh.cluster.messages import Addr, NodeMeta, decode_meta, encode_meta
from spawnmesh.cluster.seal import PacketSealer
from spawnmesh.cluster.state import MemberView, Status
from spawnmesh.cluster.swim import EventKind, MemberEvent, Output, Swim, TcpKind, TcpRequest
from spawnmesh.cluster.transport import Transport
from spawnmesh.config import ClusterConfig
from spawnmesh.errors import ConfigError, InvalidArgument, ProtocolError
from spawnmesh.keyring import Keyring

log = logging.getLogger("spawnmesh.cluster")

__all__ = ["MemberEvent", "MemberView", "Membership", "MembershipSettings", "NodeMeta"]

_LIVE_CHANGES = frozenset({EventKind.JOIN, EventKind.UPDATE, EventKind.DEAD, EventKind.LEFT})


@dataclass(frozen=True)
class MembershipSettings:
    """Everything the service needs, resolved from :class:`~spawnmesh.config.ClusterConfig`."""

    cluster: str = "spawnmesh"
    bind_host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str = ""
    advertise_port: int = 0
    swim: SwimConfig = field(default_factory=presets.lan)
    keyring: Keyring | None = None
    seeds: tuple[str, ...] = ()
    dns_name: str = ""
    dns_nameserver: str = ""
    refresh_s: float = 30.0
    retry_min_s: float = 0.5
    retry_max_s: float = 30.0
    leave_timeout_s: float = 5.0

    @classmethod
    def from_config(cls, cfg: ClusterConfig) -> MembershipSettings:
        """Settings from the node configuration; ``ConfigError`` for an unsafe or bad setup
        (a non-loopback bind without a cluster key, unless ``allow_insecure``)."""
        keyring = Keyring.load(
            cfg.key, cfg.key_file, setting="cluster.key", file_setting="cluster.key_file"
        )
        if keyring is None and not is_loopback(cfg.bind_host):
            if not cfg.allow_insecure:
                raise ConfigError(
                    "cluster.key",
                    f"gossip binds {cfg.bind_host} (not loopback) without a cluster key, so "
                    "anyone who reaches the port could join or forge membership news; set "
                    "SPAWNMESH_CLUSTER_KEY (generate one with `spawnmesh keygen`) or "
                    "cluster.key_file (or, knowingly, cluster.allow_insecure=true)",
                )
            log.warning(
                "INSECURE: cluster gossip on %s without a cluster key (cluster.allow_insecure): "
                "anyone who reaches the port can join or forge membership news",
                cfg.bind_host,
            )
        swim = presets.PRESETS[cfg.preset]()
        overrides = {
            name: getattr(cfg, name)
            for name in (
                "probe_interval_ms",
                "probe_timeout_ms",
                "suspicion_mult",
                "gossip_interval_ms",
                "push_pull_interval_ms",
            )
            if getattr(cfg, name)
        }
        if "probe_interval_ms" in overrides and "probe_timeout_ms" not in overrides:
            overrides["probe_timeout_ms"] = min(swim.probe_timeout_ms, cfg.probe_interval_ms)
        try:
            swim = swim.replace(**overrides)
        except ConfigError as exc:
            raise ConfigError(f"cluster.{exc.setting}", str(exc).split(": ", 1)[-1]) from None
        return cls(
            cluster=cfg.name,
            bind_host=cfg.bind_host,
            port=cfg.gossip_port,
            advertise_host=cfg.advertise_host,
            advertise_port=cfg.advertise_port,
            swim=swim,
            keyring=keyring,
            seeds=cfg.seeds,
            dns_name=cfg.dns_name,
            dns_nameserver=cfg.dns_nameserver,
            refresh_s=cfg.dns_refresh_ms / 1000,
            retry_min_s=cfg.join_retry_min_ms / 1000,
            retry_max_s=max(cfg.join_retry_min_ms, cfg.join_retry_max_ms) / 1000,
            leave_timeout_s=cfg.leave_timeout_ms / 1000,
        )


def _now_ms() -> int:
    return math.floor(trio.current_time() * 1000)


class Membership:
    """This node's view of the cluster and the service that keeps it current.

    Create it, ``await open()`` (binds the port; errors surface before the node is ready),
    then run :meth:`run` as a supervised child; :meth:`leave` before stopping; :meth:`close`."""

    def __init__(
        self,
        name: str,
        settings: MembershipSettings,
        meta: NodeMeta,  # a peer_addr host of "" means this node's advertised gossip host
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.addr: Addr = ("", 0)
        """This node's advertised gossip address (known after :meth:`open`)."""
        self._meta, self._meta_bytes = self._encode(meta)
        self._rng = rng or random.Random()
        self.transport = Transport(
            PacketSealer(settings.cluster, settings.keyring),
            inbound_timeout_s=settings.swim.tcp_timeout_ms / 1000,
        )
        self.discovery = Discovery(
            settings.seeds,
            settings.dns_name,
            settings.advertise_port or settings.port,
            nameserver=settings.dns_nameserver,
        )
        self._swim: Swim | None = None
        self._subscribers: list[Callable[[MemberEvent], None]] = []
        self.on_rtt: Callable[[int], None] | None = None
        """Called with the round-trip time (ms) of every direct probe answered (metrics)."""
        self._version = 0
        self._changed = trio.Event()
        self._wake = trio.Event()
        self._progress = trio.Event()
        self._alone = trio.Event()
        self._metas: dict[str, tuple[bytes, NodeMeta | None]] = {}
        self._nursery: trio.Nursery | None = None
        self._runs = 0
        self._left = False
        self.joined_once = False
        """Whether a join (at start or later) was answered by at least one member."""

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> Addr:
        """Bind the gossip port and decide the advertised address; returns it."""
        s = self.settings
        if not self.transport.is_bound:
            host = s.bind_host
            if not ip_literal(host):
                resolved = await resolve_host_port(f"{host}:1", 1)
                if not resolved:
                    raise ConfigError("cluster.bind_host", f"cannot resolve {host!r}")
                host = resolved[0][0]
            first = self.addr == ("", 0)
            bound = await self.transport.bind(host, self.transport.bound[1] or s.port)
            self.addr = (self._advertise_host(bound[0]), s.advertise_port or bound[1])
            if not self.discovery.default_port:  # ephemeral port: assume peers use ours
                self.discovery.default_port = self.addr[1]
            self._meta, self._meta_bytes = self._encode(self._meta)
            if first and s.keyring is None:
                log.warning(
                    "cluster gossip on %s is neither encrypted nor authenticated (no cluster "
                    "key): fine on loopback, set SPAWNMESH_CLUSTER_KEY for anything else",
                    format_addr(bound),
                )
        if self._swim is None:
            self._swim = self._new_swim(0)
        return self.addr

    def _advertise_host(self, bound_host: str) -> str:
        s = self.settings
        if s.advertise_host:
            ip = ip_literal(s.advertise_host)
            if ip is None:
                raise ConfigError("cluster.advertise_host", "must be an IP address")
            return ip
        if not is_unspecified(bound_host):
            return bound_host
        import socket

        family = socket.AF_INET6 if ":" in bound_host else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_DGRAM)
        try:  # no packet is sent: connect() on UDP only picks the route's source address
            probe.connect(("2001:db8::1" if family == socket.AF_INET6 else "192.0.2.1", 9))
            return str(probe.getsockname()[0])
        except OSError as exc:
            raise ConfigError(
                "cluster.advertise_host",
                f"binding {bound_host}, and no default route to guess an address from "
                f"({exc.strerror}); set cluster.advertise_host",
            ) from None
        finally:
            probe.close()

    def _new_swim(self, incarnation: int) -> Swim:
        return Swim(
            self.name,
            self.addr,
            self._meta_bytes,
            self.settings.swim,
            random.Random(self._rng.getrandbits(64)),
            _now_ms(),
            incarnation=incarnation,
        )

    @property
    def swim(self) -> Swim:
        """The core (after :meth:`open`)."""
        if self._swim is None:
            raise RuntimeError("Membership.open() was not called")
        return self._swim

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the service until cancelled (a supervisor child). A restart after a crash keeps
        the port and rejoins with a higher incarnation."""
        if self._swim is None or not self.transport.is_bound:
            await self.open()
        swim = self.swim
        rejoin: list[Addr] = []
        if self._runs and not swim.leaving:  # restarted after a crash: fresh core, same identity
            rejoin = [m.addr for m in swim.members() if m.status <= Status.SUSPECT]
            self._swim = swim = self._new_swim(swim.incarnation + 1)
        self._runs += 1
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.transport.receive_datagrams, self._on_datagram)
                await nursery.start(self.transport.serve_tcp, self._on_tcp)
                nursery.start_soon(self._tick_loop)
                nursery.start_soon(self._discovery_loop)
                if rejoin:
                    nursery.start_soon(self._join_addrs, [a for a in rejoin if a != self.addr])
                log.info(
                    "cluster %r: %s gossiping on %s (advertised %s), %s",
                    self.settings.cluster,
                    self.name,
                    format_addr(self.transport.bound),
                    format_addr(self.addr),
                    "encrypted" if self.settings.keyring else "NOT encrypted",
                )
                task_status.started()
        finally:
            self._nursery = None

    def close(self) -> None:
        """Close the sockets (after :meth:`run` has stopped)."""
        self.transport.close()

    # -- the facade ---------------------------------------------------------------------------

    def members(self) -> list[MemberView]:
        """Every known member (this node included), any status."""
        return self.swim.members() if self._swim is not None else []

    def rtt_ms(self, name: str) -> int | None:
        """Round-trip time (ms) of the last direct probe ``name`` answered, if any."""
        return self.swim.last_rtt_ms.get(name) if self._swim is not None else None

    def live(self) -> dict[str, NodeMeta]:
        """Alive and suspect members (this node included while not leaving) with their decoded
        metadata; a member whose metadata does not decode is left out (and logged once)."""
        out: dict[str, NodeMeta] = {}
        for m in self.members():
            if m.status > Status.SUSPECT:
                continue
            cached = self._metas.get(m.name)
            if cached is None or cached[0] != m.meta:
                try:
                    meta: NodeMeta | None = decode_meta(m.meta)
                except ProtocolError as exc:
                    log.warning("member %s has undecodable metadata: %s", m.name, exc)
                    meta = None
                cached = (m.meta, meta)
                self._metas[m.name] = cached
            if cached[1] is not None:
                out[m.name] = cached[1]
        return out

    @property
    def version(self) -> int:
        """Changes whenever :meth:`live` (names or metadata) changes."""
        return self._version

    async def wait_changed(self, version: int) -> int:
        """Wait until :attr:`version` differs from ``version``; return the new version."""
        while self._version == version:
            await self._changed.wait()
        return self._version

    def subscribe(self, fn: Callable[[MemberEvent], None]) -> None:
        """Call ``fn(event)`` for every membership event, synchronously and in order (an
        exception in ``fn`` is logged and does not stop delivery)."""
        self._subscribers.append(fn)

    async def join(self, addrs: Sequence[str]) -> int:
        """Join through ``host:port`` addresses (names resolved); how many answered."""
        if self.swim.leaving:
            raise InvalidArgument(f"{self.name} has left the cluster; restart it to rejoin")
        default = self.settings.advertise_port or self.settings.port or self.addr[1]
        resolved: list[Addr] = []
        for text in addrs:
            try:
                resolved.extend(await resolve_host_port(text, default))
            except InvalidArgument as exc:
                raise InvalidArgument(f"bad address {exc}") from None
        return await self._join_addrs([a for a in resolved if a != self.addr])

    async def leave(self, timeout_s: float | None = None) -> bool:
        """Leave gracefully: the others mark this node ``left``, never dead. Returns whether
        the news was fully retransmitted within ``timeout_s`` (default: the setting)."""
        if self._swim is None:
            return True
        swim = self._swim
        if timeout_s is None:
            timeout_s = self.settings.leave_timeout_s
        if not swim.leaving:
            log.info("cluster: %s leaving", self.name)
            await self._apply(swim.leave(_now_ms()))
            self._bump()
        if self._nursery is None:  # not running: nobody would gossip it
            return swim.leave_complete
        with trio.move_on_after(timeout_s):
            while not swim.leave_complete:
                await self._progress.wait()
        self._left = swim.leave_complete
        if not self._left:
            log.warning("cluster: leave news not fully spread within %.1f s", timeout_s)
        return self._left

    async def update_meta(self, meta: NodeMeta) -> None:
        """Publish new metadata for this node (spread as alive news at a higher incarnation)."""
        meta, data = self._encode(meta)
        await self._apply(self.swim.update_meta(data, _now_ms()))
        self._meta, self._meta_bytes = meta, data
        self._bump()

    def _encode(self, meta: NodeMeta) -> tuple[NodeMeta, bytes]:
        """A peer address without a host gets this node's advertised host."""
        if not meta.peer_addr[0] and self.addr[0]:
            meta = msgspec.structs.replace(meta, peer_addr=(self.addr[0], meta.peer_addr[1]))
        data = encode_meta(meta)
        if len(data) > self.settings.swim.meta_max_bytes:
            raise ConfigError(
                "cluster",
                f"this node's metadata is {len(data)} bytes, more than "
                f"{self.settings.swim.meta_max_bytes} (too many actor types or tags)",
            )
        return meta, data

    @property
    def meta(self) -> NodeMeta:
        """This node's current metadata."""
        return self._meta

    def stats(self) -> dict[str, object]:
        """Counters for ``/v1/members`` and metrics: transport traffic and rejections, core
        probes and suspicions, members by status."""
        swim = self._swim
        counts = {s.name.lower(): 0 for s in Status}
        core: dict[str, object] = {}
        if swim is not None:
            for m in swim.members():
                counts[m.status.name.lower()] += 1
            core = dataclasses.asdict(swim.stats)
            core["health_score"] = swim.awareness.score
            core["incarnation"] = swim.incarnation
        return {"members": counts, "transport": self.transport.stats.as_dict(), "swim": core}

    # -- driving the core ---------------------------------------------------------------------

    async def _apply(self, out: Output) -> None:
        """Carry out one output: events first (in order, before anything can interleave),
        then TCP requests as tasks, then datagrams."""
        swim = self._swim
        if out.events:
            for event in out.events:
                self._deliver(event)
            if swim is not None and swim.alone and not swim.leaving:
                self._alone.set()
        if out.rtts_ms and self.on_rtt is not None:
            for rtt in out.rtts_ms:
                self.on_rtt(rtt)
        nursery = self._nursery
        if out.tcp_requests and nursery is not None:
            for req in out.tcp_requests:
                nursery.start_soon(self._tcp_request, req)
        for addr, packet in out.datagrams:
            await self.transport.send_datagram(addr, packet)
        self._wake.set()
        self._progress.set()
        self._progress = trio.Event()

    def _deliver(self, event: MemberEvent) -> None:
        m = event.member
        if m.name != self.name:
            level = logging.INFO if event.kind is not EventKind.UPDATE else logging.DEBUG
            log.log(
                level,
                "member %s %s (%s, incarnation %d)",
                m.name,
                event.kind.value,
                format_addr(m.addr),
                m.incarnation,
            )
        if event.kind in _LIVE_CHANGES:
            self._bump()
        for fn in list(self._subscribers):
            try:
                fn(event)
            except Exception:
                log.exception("membership subscriber %r failed on %s", fn, event.kind.value)

    def _bump(self) -> None:
        self._version += 1
        self._changed.set()
        self._changed = trio.Event()

    async def _on_datagram(self, addr: Addr, packet: bytes) -> None:
        await self._apply(self.swim.receive(addr, packet, _now_ms()))

    async def _on_tcp(self, addr: Addr, packet: bytes) -> bytes | None:
        reply, out = self.swim.serve_tcp(addr, packet, _now_ms())
        await self._apply(out)
        return reply

    async def _tcp_request(self, req: TcpRequest) -> bool:
        reply = await self.transport.exchange(req.addr, req.data, req.timeout_ms / 1000)
        if reply is None:
            return False
        await self._apply(self.swim.receive(req.addr, reply, _now_ms()))
        return True

    async def _tick_loop(self) -> None:
        while True:
            swim = self.swim
            deadline = swim.next_deadline_ms()
            if deadline > _now_ms():
                self._wake = trio.Event()
                with trio.move_on_at(deadline / 1000):
                    await self._wake.wait()
                if self._wake.is_set():
                    continue  # something else ran the core: its deadline may have moved
            # floor() of the clock may read just below a deadline we slept to: tick at it
            await self._apply(swim.tick(max(_now_ms(), deadline)))

    async def _join_addrs(self, addrs: list[Addr]) -> int:
        """Push-pull (join) with each address at once; how many answered."""
        if not addrs:
            return 0
        out = self.swim.join(addrs, _now_ms())
        answered = 0

        async def one(req: TcpRequest) -> None:
            nonlocal answered
            if await self._tcp_request(req):
                answered += 1

        async with trio.open_nursery() as nursery:
            for req in out.tcp_requests:
                nursery.start_soon(one, req)
        if answered:
            self.joined_once = True
        return answered

    async def _push_pull(self, addr: Addr) -> bool:
        data = self.swim.push_pull_state(join=True)
        req = TcpRequest(TcpKind.PUSH_PULL, addr, data, self.settings.swim.tcp_timeout_ms)
        return await self._tcp_request(req)

    def _still_alone(self) -> bool:
        return self.swim.alone

    async def _discovery_loop(self) -> None:
        s = self.settings
        if not self.discovery.configured:
            return
        delay = s.retry_min_s
        while True:
            addrs = [a for a in await self.discovery.resolve() if a != self.addr]
            swim = self.swim
            if swim.leaving:
                return
            if swim.alone:
                answered = await self._join_addrs(addrs) if addrs else 0
                if not answered or self._still_alone():
                    tried = ", ".join(format_addr(a) for a in addrs) or "no address resolved"
                    log.info("cluster: no seed answered (%s); retrying in %.1f s", tried, delay)
                    await trio.sleep(delay)
                    delay = min(delay * 2, s.retry_max_s)
                    continue
                log.info("cluster: joined through %d of %d seeds", answered, len(addrs))
            else:
                live = {m.addr for m in swim.members() if m.status <= Status.SUSPECT}
                unknown = [a for a in addrs if a not in live]
                if unknown:
                    await self._push_pull(self._rng.choice(unknown))
            delay = s.retry_min_s
            self._alone = trio.Event()
            if not swim.alone:
                with trio.move_on_after(s.refresh_s):
                    await self._alone.wait()
