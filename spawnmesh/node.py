"""The composition root: one node = statestore + actor runtime + ops endpoints, supervised.

``open_node`` embeds a node in a trio program; ``serve`` runs one from a plain program;
``run_node`` is what ``spawnmesh run`` calls (signals, logging, exit code).
"""

from __future__ import annotations

import heapq
import importlib
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from spawnmesh._version import __version__
from spawnmesh.actors.definition import ActionDef, ActorDef, Kind
from spawnmesh.actors.runtime import Runtime, RuntimeSettings
from spawnmesh.clock import wall_ms
from spawnmesh.cluster.addr import format_addr
from spawnmesh.cluster.membership import Membership, MembershipSettings
from spawnmesh.cluster.messages import NodeMeta
from spawnmesh.cluster.state import Status
from spawnmesh.codec import convert, to_builtins
from spawnmesh.config import NodeConfig, load_config
from spawnmesh.errors import (
    ActionNotFound,
    ConfigError,
    InvalidArgument,
    NodeShuttingDown,
    SpawnmeshError,
    StatestoreUnavailable,
)
from spawnmesh.ids import ActorId
from spawnmesh.mesh.router import KIND_NAMES, Router, actor_type
from spawnmesh.mesh.schedules import ScheduleAdoption
from spawnmesh.ops.http import serve_ops
from spawnmesh.ops.metrics import Metrics
from spawnmesh.ops.status import fetch_statuses
from spawnmesh.ops.tracing import open_tracing
from spawnmesh.refs import ActorRef
from spawnmesh.statestore.base import StateStore
from spawnmesh.statestore.memory import MemoryStateStore
from spawnmesh.supervisor import ChildSpec, Supervisor
from spawnmesh.system import ActorSystem
from spawnmesh.wire.peer import PeerLimits, PeerNode

log = logging.getLogger("spawnmesh.node")


def runtime_settings(config: NodeConfig) -> RuntimeSettings:
    """The runtime's knobs from the node configuration."""
    a = config.actors
    return RuntimeSettings(
        default_timeout_s=a.default_timeout_ms / 1000,
        max_queue_per_actor=a.max_queue_per_actor,
        max_queued_per_node=a.max_queued_per_node,
        deactivate_after_s=a.deactivate_after_ms / 1000,
        sweep_interval_s=a.sweep_interval_ms / 1000,
        write_behind_s=a.write_behind_ms / 1000,
        write_batch_max=a.write_batch_max,
        schedule_horizon_s=a.schedule_horizon_ms / 1000,
    )


def open_store(config: NodeConfig, node_id: str) -> StateStore:
    """The statestore the configuration names (``memory://`` needs no extra module)."""
    s = config.statestore
    if s.url.startswith("memory:"):
        return MemoryStateStore()
    from spawnmesh.statestore.factory import open_statestore

    return open_statestore(
        s.url, key=s.key, key_file=s.key_file, allow_plaintext=s.allow_plaintext,
        pool_size=s.pool_size, node_id=node_id, history_keep=s.history_keep,
        history_max_age_s=s.history_max_age_ms / 1000, writer_process=s.writer_process,
    )


class Node:
    """One spawnmesh node. Create it with :func:`open_node`; it implements the ops backend."""

    def __init__(
        self, config: NodeConfig, systems: Iterable[ActorSystem | ActorDef], store: StateStore
    ) -> None:
        self.config = config
        self.name = config.name or f"{socket.gethostname()}-{config.ops.port or os.getpid()}"
        self.node_name = self.name
        """The node id (ops backend protocol)."""
        self.store = store
        self.metrics = Metrics(self.name)
        self.runtime = Runtime(store, self.metrics, runtime_settings(config), self.name)
        self.tracing = open_tracing(config.tracing, self.name)
        """OpenTelemetry tracing (None unless tracing.enabled)."""
        self.runtime.tracer = self.tracing
        self.started_at: float | None = None
        """``trio.current_time()`` when the node became ready (for the uptime)."""
        self.metrics.add_gauge_source(self._node_gauges)
        self.ops_port = 0
        self.host_api: Any = None
        """The gRPC host API (spawnmesh.host.server.HostApi) when host.enabled, once started."""
        self.spawn_proxy: Any = None
        """Spawn's HTTP API (spawnmesh.spawn_compat.proxy.SpawnProxy) when spawn.enabled."""
        self._ready = False
        self._store_ok = True
        self._keys_checked = False
        """Whether the store's rows were found to open under the configured keys (checked
        once, when the store is first reachable)."""
        self._drained: bool | None = None
        self.supervisor: Supervisor | None = None
        self.membership: Membership | None = None
        """Cluster membership (None while not started, or with cluster.enabled off)."""
        self.peers: PeerNode | None = None
        """The peer-wire server and client (with clustering on, once started)."""
        self.router: Router | None = None
        """The mesh router (with clustering on, once started)."""
        self._cluster_settings = (
            MembershipSettings.from_config(config.cluster) if config.cluster.enabled else None
        )
        self.stop_requested = trio.Event()
        """Set when an operator asked this node to exit (``spawnmesh leave``)."""
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        self._edge_calls = 0
        """HTTP/CLI invocations in flight (shutdown lets them finish before draining)."""
        self._edges_idle = trio.Event()
        for item in systems:
            self.register(item)

    # ---------------------------------------------------------------- SDK surface

    def register(self, system: ActorSystem | ActorDef) -> None:
        """Add an actor system's definitions (or one definition) to this node."""
        defs = system.definitions() if isinstance(system, ActorSystem) else [system]
        for adef in defs:
            self.runtime.register(adef)

    def ref(self, system: str, name: str, *, parent: str | None = None) -> ActorRef:
        """A reference to actor ``system/name`` (``parent``: the template of an unnamed one)."""
        return ActorRef(self.runtime, ActorId(system, name, parent))

    async def spawn(self, system: str, name: str, template: str) -> ActorRef:
        """Spawn unnamed instance ``name`` of ``template`` and return its reference."""
        return ActorRef(self.runtime, await self.runtime.spawn(system, name, template))

    async def broadcast(self, system: str, channel: str, payload: Any = None) -> int:
        """Publish ``payload`` to channel group ``channel``; returns deliveries queued."""
        from spawnmesh.actors.context import Broadcast

        n = self.runtime.broadcast(system, Broadcast(channel, payload))
        await trio.lowlevel.checkpoint()
        return n

    # ---------------------------------------------------------------- ops backend

    def readiness(self) -> tuple[bool, list[str]]:
        """Ready when started, not draining, and the statestore answers."""
        reasons = []
        if not self._ready:
            reasons.append("node is starting or shutting down")
        if not self._store_ok:
            reasons.append("statestore unavailable")
        if not self.runtime.writer.healthy:
            reasons.append(f"state writes failing: {self.runtime.writer.last_error}")
        return (not reasons, reasons)

    def liveness(self) -> tuple[bool, list[str]]:
        """Alive while the process serves (the supervisor restarts what fails)."""
        return (True, [])

    def metrics_text(self) -> bytes:
        """Prometheus text of this node's metrics."""
        return self.metrics.render()

    def node_info(self) -> dict[str, object]:
        """Identity and a summary, for ``GET /v1/node``."""
        m = self.membership
        return {
            "name": self.name,
            "version": __version__,
            "ops_port": self.ops_port,
            "ready": self.readiness()[0],
            "active_actors": self.runtime.active_count(),
            "actors": self._actor_types(),
            "cluster": None if m is None else {
                "name": m.settings.cluster,
                "gossip_address": format_addr(m.addr),
                "encrypted": m.settings.keyring is not None,
                "live_members": len(m.live()),
            },
        }

    def status(self, actors: int = 0, query: str = "") -> dict[str, object]:
        """``GET /v1/status``: this node in one document (identity, readiness and why, uptime,
        actors by type, counters for throughput, recent errors; up to ``actors`` active actors
        whose ``system/name`` contains ``query``), for ``spawnmesh status`` and the dashboard."""
        ready, reasons = self.readiness()
        by_type: dict[str, int] = {}
        for a in self.runtime.activations():
            t = f"{a.adef.system}/{a.adef.name}"
            by_type[t] = by_type.get(t, 0) + 1
        router = self.router
        doc: dict[str, object] = {
            "name": self.name,
            "version": __version__,
            "ready": ready,
            "reasons": reasons,
            "uptime_s": round(trio.current_time() - self.started_at, 3)
            if self.started_at is not None else 0.0,
            "now_ms": wall_ms(),
            "ops_address": f"{self.config.ops.host}:{self.ops_port}",
            "actor_types": self._actor_types(),
            "active_actors": self.runtime.active_count(),
            "actors_by_type": dict(sorted(by_type.items())),
            "queued": self.runtime.queued_count(),
            "handing_off": self.runtime.handing_off(),
            "invocations": self.metrics.invocation_counts(),
            "turn_failures": self.metrics.turn_failures_total,
            "placement_version": router.placement.version if router is not None else None,
            "recent_errors": list(reversed(self.metrics.recent_errors)),
            "tracing": self.tracing is not None,
        }
        if actors > 0:
            rows = []
            needle = query.lower()
            acts = self.runtime.activations()
            if needle:
                acts = [a for a in acts if needle in f"{a.id.system}/{a.id.name}".lower()]
            now = trio.current_time()
            for a in heapq.nlargest(actors, acts, key=lambda a: a.last_used):
                rows.append({
                    "system": a.id.system, "name": a.id.name, "parent": a.id.parent,
                    "type": f"{a.adef.system}/{a.adef.name}", "revision": a.revision,
                    "queued": a.queued(),
                    "idle_s": round(now - a.last_used, 3) if a.loaded else None,
                })
            doc["actors"] = rows
        return doc

    async def cluster_status(self, actors: int = 0, query: str = "") -> dict[str, object]:
        """``GET /v1/cluster/status``: every member this node knows, with the ``/v1/status`` of
        each live one (asked over the ops network, in parallel, 2 s each; one that does not
        answer is marked unreachable), and the ring balance: actors owned per member per
        type."""
        members = self.cluster_members()
        rows: list[dict[str, object]] = []
        targets: dict[str, str] = {}
        for r in members["members"]:  # type: ignore[attr-defined]
            row = dict(r)
            rows.append(row)
            if r["self"] or r["status"] not in ("alive", "suspect"):
                continue
            if r["ops_address"]:
                targets[r["name"]] = r["ops_address"]
        if not rows:  # clustering off: a cluster of one
            rows.append({"name": self.name, "status": "alive", "incarnation": 0,
                         "address": "", "ops_address": f"{self.config.ops.host}:{self.ops_port}",
                         "self": True, "actor_types": self._actor_types()})
        path = f"/v1/status?actors={actors}" + (f"&q={_quote(query)}" if query else "")
        fetched = await fetch_statuses(targets, path, timeout_s=2.0)
        ring: dict[str, dict[str, int]] = {}
        for row in rows:
            name = str(row["name"])
            doc: object
            if row["self"]:
                doc = self.status(actors, query)
            elif name in fetched:
                doc = fetched[name]
            else:
                doc = None
            if isinstance(doc, dict):
                row["node"] = doc
                by_type = doc.get("actors_by_type")
                if isinstance(by_type, dict):
                    for t, n in by_type.items():
                        ring.setdefault(str(t), {})[name] = int(n)
            elif isinstance(doc, str):
                row["error"] = doc
        return {
            "self": self.name,
            "cluster": members.get("cluster"),
            "now_ms": wall_ms(),
            "members": rows,
            "ring": {t: dict(sorted(v.items())) for t, v in sorted(ring.items())},
        }

    # ---------------------------------------------------------------- cluster (ops backend)

    def cluster_members(self) -> dict[str, object]:
        """``GET /v1/members``: every known member with its status, and the transport's
        counters (empty list with clustering off)."""
        m = self.membership
        if m is None:
            return {"enabled": False, "self": self.name, "members": []}
        rows = []
        live = m.live()
        for v in sorted(m.members(), key=lambda v: v.name):
            meta = live.get(v.name) if v.status <= Status.SUSPECT else None
            if meta is None:
                meta = _decode_meta_or_none(v.meta)
            rows.append({
                "name": v.name,
                "address": format_addr(v.addr),
                "status": v.status.name.lower(),
                "incarnation": v.incarnation,
                "tags": dict(meta.tags) if meta else {},
                "actor_types": list(meta.actor_types) if meta else [],
                "peer_address": format_addr(meta.peer_addr) if meta else "",
                "ops_address": _ops_address(meta.ops_addr, v.addr[0]) if meta else "",
                "rtt_ms": m.rtt_ms(v.name),
                "self": v.name == self.name,
            })
        return {
            "enabled": True,
            "cluster": m.settings.cluster,
            "self": self.name,
            "gossip_address": format_addr(m.addr),
            "encrypted": m.settings.keyring is not None,
            "members": rows,
            "stats": m.stats(),
        }

    async def cluster_join(self, addrs: list[str]) -> dict[str, object]:
        """``POST /v1/cluster/join``: push-pull with each address; how many answered."""
        if self.membership is None:
            raise InvalidArgument("clustering is off on this node (cluster.enabled=false)")
        answered = await self.membership.join(addrs)
        return {"answered": answered, "tried": len(addrs)}

    async def cluster_leave(self) -> dict[str, object]:
        """``POST /v1/cluster/leave``: leave the cluster gracefully, then exit (a node run by
        ``spawnmesh run`` drains and stops; an embedded one only sets ``stop_requested``)."""
        left = True
        if self.membership is not None:
            left = await self.membership.leave()
        if self._nursery is not None:
            self._nursery.start_soon(self._request_stop)
        return {"left": left, "shutting_down": True}

    def actors_list(self, limit: int) -> dict[str, object]:
        """``GET /v1/actors``: up to ``limit`` actors active here (most recently used first)
        and the keys being handed off to their new owner."""
        acts = self.runtime.activations()
        now = trio.current_time()
        rows = [{
            "system": a.id.system,
            "name": a.id.name,
            "parent": a.id.parent,
            "type": f"{a.adef.system}/{a.adef.name}",
            "kind": a.adef.kind.value,
            "revision": a.revision,
            "queued": a.queued(),
            "busy": a.busy,
            "dirty": a.dirty_since != 0.0,
            "idle_s": round(now - a.last_used, 3) if a.loaded else None,
        } for a in heapq.nlargest(limit, acts, key=lambda a: a.last_used)]
        return {
            "node": self.name,
            "active": self.runtime.active_count(),
            "truncated": self.runtime.active_count() > limit,
            "actors": rows,
            "handing_off": [{"system": s, "name": n} for s, n in self.runtime.moving_keys()],
        }

    async def placement_of(self, system: str, actor: str, parent: str | None) -> dict[str, object]:
        """``GET /v1/placement/{system}/{actor}``: the owner of an actor under this node's
        view of the cluster (this node when clustering is off)."""
        target = ActorId(system, actor, parent)
        adef = self.runtime.definition_for(target) or await self.runtime.learn_template(target)
        t = actor_type(adef)
        router, m = self.router, self.membership
        if router is None or m is None:
            members, version, view = [self.name], None, None
            owner: str | None = self.name
            ops = {self.name: f"{self.config.ops.host}:{self.ops_port}"}
        else:
            p = router.placement
            members, version, view = list(p.members(t)), p.version, router.view_version
            owner = None if adef.kind is Kind.POOLED else p.owner(t, actor)
            ops = {n: _ops_address(meta.ops_addr, meta.peer_addr[0])
                   for n, meta in m.live().items()}
        return {
            "node": self.name,
            "system": system,
            "actor": actor,
            "type": t,
            "kind": adef.kind.value,
            "owner": owner,
            "owner_ops_address": ops.get(owner, "") if owner else "",
            "active_here": self.runtime.owns((system, actor)),
            "placement_version": version,
            "view_version": view,
            "members": members,
        }

    async def _request_stop(self) -> None:
        await trio.sleep(0.1)  # let the HTTP reply go out before the node starts stopping
        self.stop_requested.set()

    async def advertise_actor_types(self) -> None:
        """Publish this node's actor types again (a host registered new ones), so that
        placement routes them here."""
        m = self.membership
        if m is not None:
            meta = m.meta
            await m.update_meta(NodeMeta(meta.peer_addr, self._actor_types(), meta.protocol_min,
                                         meta.protocol_max, meta.tags, meta.ops_addr))

    def _actor_types(self) -> list[str]:
        return sorted(f"{d.system}/{d.name}" for d in self.runtime.definitions())

    def _node_meta(self, peer_port: int) -> NodeMeta:
        c = self.config.cluster
        tags = dict(t.split("=", 1) for t in c.tags)
        ops = f"{self.config.ops.host}:{self.ops_port}" if self.ops_port else ""
        return NodeMeta(("", peer_port), self._actor_types(), tags=tags, ops_addr=ops)

    def _cluster_gauges(self) -> list[tuple[str, str, dict[str, str], float]]:
        m = self.membership
        if m is None:
            return []
        st = m.stats()
        out: list[tuple[str, str, dict[str, str], float]] = []
        members = st["members"]
        assert isinstance(members, dict)
        for status, n in members.items():
            out.append(("spawnmesh_cluster_members", "Known cluster members by status.",
                        {"status": status}, n))
        swim = m.swim
        out.append(("spawnmesh_cluster_health_score", "Lifeguard local health score (0 is "
                    "healthy; timeouts are stretched by score + 1).", {}, swim.awareness.score))
        out.append(("spawnmesh_cluster_incarnation", "This node's incarnation number.", {},
                    swim.incarnation))
        router = self.router
        if router is not None:
            p = router.placement
            out.append(("spawnmesh_placement_info", "The placement table in force (its "
                        "version label is equal on members with the same view); always 1.",
                        {"version": p.version}, 1))
            for t in sorted(p.actor_types):
                out.append(("spawnmesh_placement_members", "Live members hosting each actor "
                            "type (the ring's size).", {"type": t}, len(p.members(t))))
        peers = self.peers
        if peers is not None:
            out.append(("spawnmesh_peer_connections", "Open peer-wire connections (including "
                        "draining ones).", {}, peers.open_connections))
            out.append(("spawnmesh_peer_connected_peers", "Peers with a usable peer-wire "
                        "connection.", {}, len(peers.connected_peers)))
            in_flight = handling = 0
            for name in peers.connected_peers:
                conn = peers.connection(name)
                if conn is not None:
                    in_flight += conn.in_flight
                    handling += conn.handling
            out.append(("spawnmesh_peer_requests_in_flight", "Requests this node sent to peers "
                        "that await an answer.", {}, in_flight))
            out.append(("spawnmesh_peer_requests_handling", "Peer requests whose handler is "
                        "running here.", {}, handling))
        return out

    def _cluster_counters(self) -> list[tuple[str, str, dict[str, str], float]]:
        """Running totals of the membership transport and core and of the peer layer."""
        m = self.membership
        if m is None:
            return []
        out: list[tuple[str, str, dict[str, str], float]] = []
        tr = m.transport.stats
        for channel, sent, received in (
            ("udp", tr.udp_sent_bytes, tr.udp_received_bytes),
            ("tcp", tr.tcp_sent_bytes, tr.tcp_received_bytes),
        ):
            out.append(("spawnmesh_cluster_sent_bytes_total", "Gossip bytes sent (security "
                        "header and tag included).", {"channel": channel}, sent))
            out.append(("spawnmesh_cluster_received_bytes_total", "Gossip bytes received.",
                        {"channel": channel}, received))
        out.append(("spawnmesh_cluster_sent_packets_total", "Gossip UDP packets sent.", {},
                    tr.udp_sent_packets))
        out.append(("spawnmesh_cluster_received_packets_total", "Gossip UDP packets received.",
                    {}, tr.udp_received_packets))
        for reason, n in tr.rejected.items():
            out.append(("spawnmesh_cluster_rejected_packets_total", "Gossip packets rejected "
                        "before the membership core, by reason.", {"reason": reason}, n))
        for direction, ok, failed in (("outbound", tr.tcp_outbound, tr.tcp_outbound_failed),
                                      ("inbound", tr.tcp_inbound, tr.tcp_inbound_failed)):
            out.append(("spawnmesh_cluster_tcp_exchanges_total", "Gossip TCP exchanges "
                        "(push-pull, join, fallback probes), by direction.",
                        {"direction": direction}, ok))
            out.append(("spawnmesh_cluster_tcp_exchange_failures_total", "Gossip TCP exchanges "
                        "that failed, by direction.", {"direction": direction}, failed))
        s = m.swim.stats
        for name, value, doc in (
            ("probes", s.probes, "Direct probes (pings) started."),
            ("probe_failures", s.probe_failures, "Probes that got no ack in their period."),
            ("indirect_probes", s.indirect_probes, "Probes that fell back to ping-req helpers."),
            ("suspicions", s.suspicions_started, "Suspicions started (a member suspected)."),
            ("refutes", s.refutes, "Suspicions of this node that it refuted."),
            ("deaths", s.deaths_declared, "Members this node declared dead."),
            ("malformed_messages", s.malformed, "Gossip messages that could not be decoded."),
        ):
            out.append((f"spawnmesh_cluster_{name}_total", doc, {}, value))
        if self.router is not None:
            out.append(("spawnmesh_placement_changes_total", "Placement tables adopted (view "
                        "changes that changed placement).", {}, self.router.view_version))
        peers = self.peers
        if peers is not None:
            st = peers.stats
            for name, value, doc in (
                ("dials", st.dials, "Peer-wire connections dialed."),
                ("dial_failures", st.dial_failures, "Peer-wire dials that failed."),
                ("accepted", st.accepted, "Peer-wire connections accepted."),
                ("handshake_failures", st.handshake_failures,
                 "Inbound peer-wire handshakes refused or failed."),
                ("protocol_errors", st.protocol_errors,
                 "Peer-wire sessions ended by a malformed frame from the peer."),
                ("duplicate_connections", st.duplicates_closed,
                 "Duplicate peer-wire connections closed (one per peer pair is kept)."),
                ("connections_closed", st.connections_closed, "Peer-wire connections closed."),
            ):
                out.append((f"spawnmesh_peer_{name}_total", doc, {}, value))
        return out

    def _node_gauges(self) -> list[tuple[str, str, dict[str, str], float]]:
        """Readiness, uptime, and the host API's attached hosts."""
        out: list[tuple[str, str, dict[str, str], float]] = [
            ("spawnmesh_ready", "1 when the node takes traffic (GET /readyz is 200), else 0.",
             {}, 1 if self.readiness()[0] else 0),
            ("spawnmesh_build_info", "The running spawnmesh version; always 1.",
             {"version": __version__}, 1),
        ]
        if self.started_at is not None:
            out.append(("spawnmesh_uptime_seconds", "Seconds since the node became ready.", {},
                        trio.current_time() - self.started_at))
        api = self.host_api
        if api is not None:
            for name, hs in sorted(api.hosts.systems.items()):
                out.append(("spawnmesh_host_sessions", "Hosts attached over Connect streams, "
                            "by actor system.", {"system": name}, len(hs.sessions)))
                out.append(("spawnmesh_host_callbacks", "1 when the system's host is reached "
                            "by HandleTurn callbacks, by actor system.", {"system": name},
                            1 if hs.callback is not None else 0))
        return out

    async def admin_invoke(
        self,
        system: str,
        actor: str,
        action: str,
        payload: object,
        *,
        metadata: dict[str, str],
        timeout_ms: int | None,
        is_async: bool,
        delay_ms: int | None,
        parent: str | None,
    ) -> object:
        """Invoke with a JSON payload (CLI, HTTP): convert it to the action's payload type and
        the reply to JSON-able builtins. Counted while in flight: shutdown waits for these
        (a call already sent to another node must get its answer back to its HTTP client,
        or the client would retry a call that was applied)."""
        if self._stopping:
            raise NodeShuttingDown(f"node {self.name} is shutting down")
        self._edge_calls += 1
        try:
            return await self._admin_invoke(system, actor, action, payload, metadata=metadata,
                                            timeout_ms=timeout_ms, is_async=is_async,
                                            delay_ms=delay_ms, parent=parent)
        finally:
            self._edge_calls -= 1
            if self._edge_calls == 0:
                self._edges_idle.set()

    async def _admin_invoke(
        self,
        system: str,
        actor: str,
        action: str,
        payload: object,
        *,
        metadata: dict[str, str],
        timeout_ms: int | None,
        is_async: bool,
        delay_ms: int | None,
        parent: str | None,
    ) -> object:
        target = ActorId(system, actor, parent)
        ad = self._action(target, action)
        if ad is not None and (payload is not None or not ad.payload_optional):
            payload = convert(payload, ad.payload_type)  # no payload: the handler's default
        if is_async or delay_ms:
            self.runtime.cast_nowait(target, action, payload, metadata=metadata,
                                     delay_ms=delay_ms)
            return None
        if timeout_ms is None:  # an edge: the node's default deadline applies
            timeout_ms = self.config.actors.default_timeout_ms
        value = await self.runtime.invoke(
            target, action, payload, metadata=metadata, timeout_ms=timeout_ms
        )
        return to_builtins(value)

    def _action(self, target: ActorId, action: str) -> ActionDef | None:
        """The definition of ``target``'s ``action`` (None: unknown here, or a state action);
        ActionNotFound if the actor is known and has no such action."""
        adef = self.runtime.definition_for(target)
        if adef is None:
            return None
        ad = adef.actions.get(action)
        if ad is None and adef.actions and action not in ("get_state", "getState", "get"):
            raise ActionNotFound(f"{target} has no action {action!r}")
        return ad

    # ---------------------------------------------------------------- lifecycle

    async def _start(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Open the store, start every service under the supervisor, activate eager actors."""
        try:
            await self.store.open()
        except SpawnmeshError as exc:
            self._store_ok = False
            log.error("statestore unavailable at start: %s", exc)
        else:  # the wrong key stops the node here (ConfigError), before it reports ready
            self._store_ok = await self._check_store_keys()
        children = [ChildSpec(name, fn) for name, fn in self.runtime.services()]
        children.append(ChildSpec("ops-http", self._serve_ops))
        children.append(ChildSpec("store-health", self._watch_store))
        if self.config.host.enabled:  # imported here: grpclib only in nodes that serve hosts
            from spawnmesh.host.server import HostApi

            self.host_api = HostApi(self.runtime, self.config.host,
                                    self.config.actors.default_timeout_ms,
                                    on_registered=self.advertise_actor_types)
            children.append(ChildSpec("host-api", self.host_api.serve))
        if self.config.spawn.enabled:  # Spawn's HTTP protocol (docs/spawn-compat.md)
            from spawnmesh.spawn_compat.proxy import SpawnProxy

            self.spawn_proxy = SpawnProxy(self.runtime, self.config.spawn,
                                          default_timeout_ms=self.config.actors.default_timeout_ms,
                                          readiness=self.readiness,
                                          on_registered=self.advertise_actor_types)
            children.append(ChildSpec("spawn-proxy", self.spawn_proxy.serve))
        self.supervisor = Supervisor("node", children)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.supervisor.run)
            if self._cluster_settings is not None:
                await self._start_mesh(self.supervisor, self._cluster_settings)
            await self.runtime.activate_eager()
            # in a cluster, other members' schedules are taken over as they die or leave
            self.runtime.schedules.start_recovery(adopt_all=self._cluster_settings is None)
            self._ready = True
            _trim_heap()
            self.started_at = trio.current_time()
            task_status.started()

    async def _start_mesh(self, sup: Supervisor, settings: MembershipSettings) -> None:
        """Peer wire first (its port goes into this node's metadata), then membership, then
        the router that follows it; each a supervised child."""
        c = self.config.cluster
        self.peers = peers = PeerNode(
            self.name, wall_ms(), settings.cluster, self._peer_request,
            keyring=settings.keyring,
            # closing waits for the answers owed as long as the drain may take: an answer
            # cut off makes its caller retry a call that ran
            limits=PeerLimits(drain_timeout_ms=max(5_000, self.config.actors.shutdown_grace_ms)),
        )
        self.router = Router(
            self.runtime, peers, self.metrics, self.name,
            default_timeout_s=self.config.actors.default_timeout_ms / 1000,
        )
        await sup.start_child(ChildSpec("peer-wire", _serve_at(peers, c.bind_host, c.peer_port)))
        assert peers.port is not None
        self.membership = Membership(self.name, settings, self._node_meta(peers.port))
        rtt = self.metrics.probe_rtt_seconds
        self.membership.on_rtt = lambda ms: rtt.observe(ms / 1000)
        await self.membership.open()
        self.metrics.add_gauge_source(self._cluster_gauges)
        self.metrics.add_counter_source(self._cluster_counters)
        await sup.start_child(ChildSpec("membership", self.membership.run))
        await sup.start_child(ChildSpec("router", _follow(self.router, self.membership)))
        adoption = ScheduleAdoption(self.runtime, c.orphan_schedules_after_ms)
        await sup.start_child(ChildSpec("schedule-adoption", _follow(adoption, self.membership)))
        self.runtime.router = self.router

    async def _peer_request(self, req: Any, origin: str) -> bytes | None:
        """The peer layer's handler: counted, traced (a child of the caller's span when the
        request carries one), then routed."""
        router = self.router
        if router is None:  # pragma: no cover - the handler is only reachable once started
            raise NodeShuttingDown(f"node {self.name} is not routing yet")
        metrics = self.metrics
        kind = KIND_NAMES.get(req.kind, "unknown")
        received = metrics.peer_requests_received
        received[kind] = received.get(kind, 0) + 1
        metrics.peer_received_payload_bytes_total += len(req.payload)
        tracer = self.tracing
        try:
            if tracer is None:
                reply = await router.handle(req, origin)
            else:
                attrs = {"spawnmesh.actor": str(req.target), "spawnmesh.action": req.action,
                         "spawnmesh.peer": origin, "spawnmesh.request_kind": kind}
                with tracer.span("spawnmesh.peer.handle", "server", attrs, req.trace or None):
                    reply = await router.handle(req, origin)
        except SpawnmeshError as exc:
            errors = metrics.peer_request_errors
            key = ("inbound", exc.code)
            errors[key] = errors.get(key, 0) + 1
            raise
        if reply:
            metrics.peer_sent_payload_bytes_total += len(reply)
        return reply

    async def _serve_ops(self, *, task_status: trio.TaskStatus[None]) -> None:
        port = self.ops_port or self.config.ops.port
        status = _PortStatus(task_status, self)
        await serve_ops(self, self.config.ops.host, port, task_status=status)

    async def _watch_store(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Track the store's health for readiness; the first time it answers (if it did not
        at start), check its keys first: a ConfigError escalates and stops the node."""
        task_status.started()
        while True:
            await trio.sleep(2.0)
            ok = False  # a check that does not answer within 5 s counts as down
            with trio.move_on_after(5.0):
                ok = await self.store.healthy()
            if ok and not self._keys_checked:
                ok = await self._check_store_keys()
            self._store_ok = ok

    async def _check_store_keys(self) -> bool:
        """Check once that the configured keys open the store's rows: ConfigError if they do
        not; False if the store stopped answering meanwhile (checked again later)."""
        try:
            await self.store.check_keys()
        except StatestoreUnavailable as exc:
            log.warning("statestore keys not checked yet (store unavailable): %s", exc)
            return False
        self._keys_checked = True
        return True

    async def shutdown(self, grace_s: float | None = None) -> bool:
        """Leave the cluster (the others see ``left`` at once), then drain: refuse new
        invocations, finish turns, flush state. True if clean. Idempotent: a second call
        returns the first one's result."""
        if self._drained is not None:
            return self._drained
        self._ready = False
        if self.membership is not None:
            self.runtime.schedules.hand_over()  # a survivor fires them once this node has left
            await self.membership.leave()
            if self.router is not None:  # hand every actor off now, not at the next view poll
                self.router.update_view(self.membership.live())
        grace = self.config.actors.shutdown_grace_ms / 1000 if grace_s is None else grace_s
        self._stopping = True  # new edge calls are refused; those in flight get their answer
        with trio.move_on_after(grace):
            while self._edge_calls:
                self._edges_idle = trio.Event()
                await self._edges_idle.wait()
            if self.router is not None:
                await self.router.wait_sends()  # casts and broadcasts sent in the background
        clean = await self.runtime.drain(grace)
        if self.peers is not None:  # after the drain: peers' calls were forwarded meanwhile
            await self.peers.close()
        self._drained = clean
        if self.tracing is not None:  # spans of the drain included
            await trio.to_thread.run_sync(self.tracing.shutdown)
        log.info("node %s drained (%s)", self.name, "clean" if clean else "with losses")
        return clean


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas before any thread starts: the node's few worker threads
    (statestore calls) would each get an arena of their own, for little gain in a process
    whose Python code holds one lock anyway. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc
        pass


def _trim_heap() -> None:
    """Give the memory freed by start-up (import-time garbage) back to the OS: glibc keeps it in
    the heap otherwise (about 2-3 MB of idle RSS on a small device). A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import gc
    import re

    re.purge()  # patterns the libraries compiled at import time, used once
    gc.collect()  # start-up garbage first, so its pages can go back too
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols include libc's
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def _serve_at(peers: PeerNode, host: str, port: int) -> Any:
    async def serve(*, task_status: trio.TaskStatus[int]) -> None:
        await peers.serve(host, port, task_status=task_status)
        await trio.sleep_forever()  # closed by shutdown: not an exit to restart from

    return serve


def _follow(follower: Router | ScheduleAdoption, membership: Membership) -> Any:
    async def run(*, task_status: trio.TaskStatus[None]) -> None:
        await follower.run(membership, task_status=task_status)

    return run


class _PortStatus:
    """Records the bound ops port before passing ``started`` on."""

    def __init__(self, inner: trio.TaskStatus[None], node: Node) -> None:
        self._inner = inner
        self._node = node

    def started(self, value: int | None = None) -> None:
        if value is not None:
            self._node.ops_port = value
        self._inner.started()


@asynccontextmanager
async def open_node(
    config: NodeConfig | None = None,
    *systems: ActorSystem | ActorDef,
    store: StateStore | None = None,
) -> AsyncIterator[Node]:
    """Run a node inside the current trio program for the duration of the block.

    ``config`` defaults to the layered configuration (environment, file, defaults) with an
    in-memory store and an ephemeral ops port; leaving the block drains and flushes."""
    if config is None:
        config = load_config(
            overrides={"statestore.url": "memory://", "ops.port": 0, "cluster.gossip_port": 0,
                       "cluster.peer_port": 0}
        )
    node = Node(config, systems, store or open_store(config, config.name or "embedded"))
    try:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(node._start)
            except BaseException:  # e.g. the wrong statestore key: release what open() took
                with trio.CancelScope(shield=True):
                    await node.store.aclose()
                raise
            try:
                yield node
            finally:
                with trio.CancelScope(shield=True):
                    await node.shutdown()
                    nursery.cancel_scope.cancel()
                    await node.store.aclose()
    except BaseExceptionGroup as group:
        # The services never raise groups (the supervisor escalates one error), so a group
        # with one member carries the caller's own exception (or a start-up error, possibly
        # through nested nurseries): give it back unwrapped.
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is not group:
            raise inner from None
        raise
    finally:
        if node.membership is not None:
            node.membership.close()  # after every task using the sockets has stopped


def serve(*systems: ActorSystem, config: NodeConfig | None = None) -> int:
    """Run a node from a plain (non-trio) program until SIGINT/SIGTERM; returns the exit code."""
    try:
        cfg = config or load_config()
        return trio.run(_serve_until_signal, cfg, list(systems))
    except ConfigError as exc:
        print(f"spawnmesh: error: {exc}", file=sys.stderr)
        return 2


async def _serve_until_signal(config: NodeConfig, systems: Sequence[ActorSystem]) -> int:
    import signal

    node_id = config.name or None
    store = open_store(config, node_id or "node")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(config, *systems, store=store) as node:
            _announce(node, systems)
            async with trio.open_nursery() as waiting:

                async def on_signal() -> None:
                    async for signum in signals:
                        log.info("received %s: draining", signal.Signals(signum).name)
                        break
                    waiting.cancel_scope.cancel()

                async def on_request() -> None:
                    await node.stop_requested.wait()
                    log.info("asked to leave: leaving and draining")
                    waiting.cancel_scope.cancel()

                waiting.start_soon(on_signal)
                waiting.start_soon(on_request)
            clean = await node.shutdown()
    return 0 if clean else 1


def _announce(node: Node, systems: Sequence[ActorSystem]) -> None:
    host = node.config.ops.host
    url = f"http://{host}:{node.ops_port}"
    lines = [
        f"spawnmesh {__version__} node {node.name} ready",
        f"  ops/admin   {url}  (/healthz /readyz /metrics)",
        f"  statestore  {_safe_url(node.config.statestore.url)}",
    ]
    m = node.membership
    if m is not None:
        security = "encrypted" if m.settings.keyring is not None else "NOT encrypted"
        joining = f", seeds {', '.join(m.settings.seeds)}" if m.settings.seeds else ""
        if m.settings.dns_name:
            joining += f", dns {m.settings.dns_name}"
        lines.append(f"  cluster     {m.settings.cluster!r} gossip {format_addr(m.addr)} "
                     f"({security}{joining})")
    for adef in node.runtime.definitions():
        actions = ", ".join(sorted(adef.actions))
        lines.append(f"  actor       {adef.system}/{adef.name} [{adef.kind.value}]: {actions}")
    example = _example_command(node, url)
    if example:
        lines.append(f"  try:        {example}")
    print("\n".join(lines), flush=True)


def _example_command(node: Node, url: str) -> str:
    exe = _command_name(sys.argv[0] if sys.argv else "")
    for adef in node.runtime.definitions():
        if adef.name == "counter" and "add" in adef.actions:
            return f"{exe} invoke --node {url} {adef.system} counter add --data 1"
    return ""


def _command_name(argv0: str) -> str:
    """How to call this executable again from the current directory: ``spawnmesh`` when that
    name on PATH is this file, else a path to paste (``.venv/bin/spawnmesh``,
    ``./spawnmesh``, or absolute when it is outside the current directory)."""
    import shutil

    exe = "spawnmesh"
    if os.path.basename(argv0) != exe:
        return exe
    on_path = shutil.which(exe)
    if on_path and os.path.realpath(on_path) == os.path.realpath(argv0):
        return exe
    rel = os.path.relpath(argv0)
    if rel.startswith(os.pardir) or os.path.isabs(argv0):
        return os.path.abspath(argv0)
    return rel if os.sep in rel else os.path.join(os.curdir, rel)


def _safe_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _ops_address(ops_addr: str, gossip_host: str) -> str:
    """A member's ops ``host:port`` as others can reach it: a wildcard bind host (0.0.0.0,
    ::, empty) is replaced by the member's gossip host."""
    if not ops_addr:
        return ""
    host, _, port = ops_addr.rpartition(":")
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        return format_addr((gossip_host, int(port)))
    return ops_addr


def _decode_meta_or_none(data: bytes) -> NodeMeta | None:
    from spawnmesh.cluster.messages import decode_meta
    from spawnmesh.errors import ProtocolError

    try:
        return decode_meta(data)
    except ProtocolError:
        return None


def load_app(spec: str) -> list[ActorSystem]:
    """Import ``module:attr`` naming an ActorSystem, a list of them, or a function returning
    either; empty: the built-in examples."""
    if not spec:
        spec = "spawnmesh.examples:systems"
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError("app", f"cannot import {mod_name!r}: {exc}") from exc
    try:
        obj: Any = getattr(mod, attr or "system")
    except AttributeError as exc:
        raise ConfigError("app", f"{mod_name!r} has no attribute {attr!r}") from exc
    if callable(obj) and not isinstance(obj, ActorSystem):
        obj = obj()
    if isinstance(obj, ActorSystem):
        return [obj]
    if isinstance(obj, list | tuple) and all(isinstance(s, ActorSystem) for s in obj):
        return list(obj)
    raise ConfigError("app", f"{spec!r} is not an ActorSystem or a list of them")


def run_node(config: NodeConfig) -> int:
    """``spawnmesh run``: load the app, run until SIGINT/SIGTERM, drain; the exit code."""
    _limit_malloc_arenas()
    try:
        systems = load_app(config.app)
        for s in systems:
            s.definitions()
    except SpawnmeshError as exc:
        print(f"spawnmesh: error: {exc}", file=sys.stderr)
        return 2
    try:
        return serve(*systems, config=config)
    except ConfigError as exc:
        print(f"spawnmesh: error: {exc}", file=sys.stderr)
        return 2

