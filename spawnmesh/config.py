"""Node configuration: command-line flags > ``SPAWNMESH_*`` environment > TOML file > defaults.

Each section is a frozen dataclass whose fields carry their documentation and limits in
``dataclasses.field(metadata=...)``; :class:`NodeConfig` composes the sections. The loader,
the validation, the docs (``docs/configuration.md``) and ``spawnmesh config show`` are all
derived from those dataclasses, so adding a section is adding a dataclass field to
:class:`NodeConfig` and nothing else.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import logging
import os
import textwrap
import tomllib
import typing
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from spawnmesh.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "RESERVED_ENV",
    "ActorsConfig",
    "ClusterConfig",
    "HostConfig",
    "LogConfig",
    "NodeConfig",
    "OpsConfig",
    "SettingDoc",
    "SpawnConfig",
    "StatestoreConfig",
    "load_config",
    "redacted",
    "render_docs_markdown",
    "setting",
    "settings",
    "to_toml",
]

log = logging.getLogger(__name__)

ENV_PREFIX = "SPAWNMESH_"
"""Every setting's environment variable starts with this prefix."""

RESERVED_ENV: frozenset[str] = frozenset({"SPAWNMESH_CONFIG", "SPAWNMESH_NODE"})
"""``SPAWNMESH_*`` variables that are not settings but are known (no warning is logged)."""

_T = TypeVar("_T")

# Checks beyond type/range/choices: return an error text, or None when the value is fine.
Check = Callable[[Any], str | None]


def setting(
    default: _T,
    help: str,
    *,
    min: int | float | None = None,
    max: int | float | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
    env_aliases: tuple[str, ...] = (),
    unit: str = "",
    check: Check | None = None,
    redact: Callable[[Any], Any] | None = None,
) -> _T:
    """Declare one setting: a dataclass field whose metadata documents and bounds it.

    ``unit`` is "ms", "bytes", ... (a field with a unit must end in ``_<unit>``); ``check`` is
    an extra validator returning an error text or None; ``redact`` masks the sensitive part of
    a value that is not wholly secret (e.g. a password in a URL). Secret and redacted fields
    are left out of ``repr`` so a logged config cannot leak them.
    """
    meta = {
        "help": help,
        "min": min,
        "max": max,
        "choices": choices,
        "secret": secret,
        "env_aliases": tuple(env_aliases),
        "unit": unit,
        "check": check,
        "redact": redact,
    }
    out: _T = field(default=default, metadata=meta, repr=not secret and redact is None)
    return out


def _check_key(value: Any) -> str | None:
    """Validate key(s) with the keyring's own parser, so both agree on the grammar."""
    if str(value).strip() == "":
        return None
    from spawnmesh.keyring import Keyring  # lazy: pulls in `cryptography`

    try:
        Keyring.parse(str(value))
    except ConfigError as err:
        return str(err).removeprefix(f"{err.setting}: ")
    return None


def _redact_url(value: Any) -> Any:
    """Mask the password of a URL like ``postgresql://user:pw@host/db``."""
    parts = urllib.parse.urlsplit(str(value))
    if parts.password is None:
        return value
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _check_nonempty(value: Any) -> str | None:
    return "must not be empty" if value == "" else None


def _check_app(value: Any) -> str | None:
    if value == "":
        return None
    module, sep, attr = str(value).partition(":")
    if not sep or not module or not attr:
        return "must look like 'package.module:attribute'"
    return None


@dataclass(frozen=True)
class OpsConfig:
    """The operations HTTP endpoint: health, metrics, and the API the CLI talks to."""

    host: str = setting(
        "127.0.0.1",
        "Address the ops HTTP server binds to. Loopback by default because the ops API can "
        "invoke actors; use 0.0.0.0 in a container behind a network policy.",
        check=_check_nonempty,
    )
    port: int = setting(
        9090,
        "TCP port of the ops HTTP server; 0 picks a free port (handy for tests). 9090 is a "
        "conventional metrics/ops port.",
        min=0,
        max=65535,
    )


@dataclass(frozen=True)
class ActorsConfig:
    """Actor runtime limits and timings: deadlines, queue bounds, passivation, persistence."""

    default_timeout_ms: int = setting(
        30_000,
        "Request/reply deadline in milliseconds when the caller gives none. 30 s is long "
        "enough for slow handlers yet bounds a stuck call.",
        min=1,
        max=3_600_000,
        unit="ms",
    )
    max_queue_per_actor: int = setting(
        1_024,
        "Invocations (count) that may wait for one actor before new ones fail with "
        "Overloaded. Bounded so a hot actor pushes back instead of eating memory.",
        min=1,
        max=1_000_000,
    )
    max_queued_per_node: int = setting(
        100_000,
        "Invocations (count) that may wait on the whole node before new ones fail with "
        "Overloaded; caps memory across all actors.",
        min=1,
        max=100_000_000,
    )
    deactivate_after_ms: int = setting(
        60_000,
        "Idle time in milliseconds before an actor is passivated (state flushed, memory "
        "freed). A definition may override it. One minute keeps hot actors warm.",
        min=1,
        max=604_800_000,
        unit="ms",
    )
    sweep_interval_ms: int = setting(
        1_000,
        "How often, in milliseconds, idle actors are looked for. Passivation may lag by up "
        "to this much; 1 s is cheap and precise enough.",
        min=10,
        max=600_000,
        unit="ms",
    )
    write_behind_ms: int = setting(
        1_000,
        "Default write-behind snapshot interval in milliseconds: dirty state is written at "
        "most this long after it changed, batching writes of busy actors.",
        min=1,
        max=3_600_000,
        unit="ms",
    )
    write_batch_max: int = setting(
        1_000,
        "Most state writes (count) per statestore transaction; keeps transactions short.",
        min=1,
        max=100_000,
    )
    schedule_horizon_ms: int = setting(
        600_000,
        "Delayed and scheduled casts due within this many milliseconds are held in memory "
        "(about 1 KB each), later ones only in the statestore, loaded as they come within "
        "reach (every quarter of it, at most every minute). Bounds a node's memory however "
        "many casts are scheduled far ahead; 10 minutes keeps store reads rare.",
        min=1_000,
        max=604_800_000,
        unit="ms",
    )
    shutdown_grace_ms: int = setting(
        10_000,
        "Time in milliseconds allowed on SIGTERM to finish turns in flight and flush state. "
        "10 s fits inside Kubernetes' default 30 s termination grace period.",
        min=0,
        max=3_600_000,
        unit="ms",
    )


@dataclass(frozen=True)
class StatestoreConfig:
    """Where actor state is persisted, and how it is encrypted at rest."""

    url: str = setting(
        "sqlite:///.spawnmesh/state.db",
        "SQLAlchemy URL of the statestore (sqlite, postgresql+psycopg, mysql+pymysql), or "
        "memory:// for a non-persistent store. Embedded SQLite needs no server. A password "
        "in the URL is shown as ***.",
        check=_check_nonempty,
        redact=_redact_url,
    )
    key: str = setting(
        "",
        "Encryption key for state at rest: base64 of 32 random bytes (AES-256-GCM), e.g. "
        "from `openssl rand -base64 32`. For rotation, several comma-separated keys, each "
        "'id:base64' or bare base64; the last one encrypts. Secret: never printed. Empty "
        "means use key_file (or, with allow_plaintext, no encryption).",
        secret=True,
        env_aliases=("SPAWN_STATESTORE_KEY",),
        check=_check_key,
    )
    key_file: str = setting(
        "",
        "Path to a file of encryption keys, one 'id:base64key' a line, the last line "
        "encrypts; keeps keys out of the environment and eases rotation. Set key or key_file, "
        "not both. Empty means none.",
    )
    allow_plaintext: bool = setting(
        False,
        "Development opt-out: store state unencrypted when no key is configured. Off by "
        "default so production never stores plaintext by accident; logged loudly when on.",
    )
    pool_size: int = setting(
        8,
        "Database connections (count) in the statestore pool; 8 covers write-behind "
        "batches plus activation reads without exhausting the database.",
        min=1,
        max=1_024,
    )
    writer_process: str = setting(
        "auto",
        "Seal and write state batches in a child process, off the node's interpreter: 'auto' "
        "starts it once the node has written 2,000 rows (a light node, e.g. an edge device, "
        "never pays for a second interpreter), 'on' at start, 'off' never.",
        choices=("auto", "on", "off"),
    )
    history_keep: int = setting(
        0,
        "Past revisions (count) kept per actor for `spawnmesh state history` and point-in-time "
        "restore; 0 keeps none unless history_max_age_ms is set.",
        min=0,
        max=1_000_000,
    )
    history_max_age_ms: int = setting(
        0,
        "Keep past revisions younger than this many milliseconds (with history_keep: a "
        "revision is pruned once it is beyond both bounds); 0 means no age bound.",
        min=0,
        max=31_536_000_000,
        unit="ms",
    )


@dataclass(frozen=True)
class LogConfig:
    """Logging output of the node."""

    format: str = setting(
        "human",
        "Log line format: human (readable lines) for terminals, json (one object per line) "
        "for log collectors.",
        choices=("human", "json"),
    )
    level: str = setting(
        "info",
        "Least severe level that is logged. info shows lifecycle events without per-call noise.",
        choices=("debug", "info", "warning", "error"),
    )


def _check_addresses(value: Any) -> str | None:
    from spawnmesh.cluster.addr import parse_host_port
    from spawnmesh.errors import InvalidArgument

    for item in value:
        try:
            parse_host_port(item, default_port=1)
        except InvalidArgument as exc:
            return f"bad address {exc}"
    return None


def _check_optional_address(value: Any) -> str | None:
    return _check_addresses([value]) if str(value).strip() else None


def _check_tags(value: Any) -> str | None:
    for item in value:
        key, sep, _ = str(item).partition("=")
        if not sep or not key.strip():
            return f"tag {item!r} must be key=value"
    return None


@dataclass(frozen=True)
class ClusterConfig:
    """Cluster membership: SWIM + Lifeguard gossip over UDP, with TCP for state sync, on one
    port. Identity, addresses, seeds and DNS discovery, timing presets, and packet security."""

    enabled: bool = setting(
        True,
        "Join a cluster: run the membership service (gossip on cluster.gossip_port). Off, the "
        "node runs alone and `spawnmesh members` has nothing to show.",
    )
    name: str = setting(
        "spawnmesh",
        "Cluster name. Packets of another cluster are rejected (authenticated with the key, "
        "carried as a tag without one), so two clusters sharing a network never merge.",
        check=_check_nonempty,
    )
    bind_host: str = setting(
        "127.0.0.1",
        "Address the gossip UDP socket and TCP listener bind to. Loopback by default; a "
        "non-loopback address (e.g. 0.0.0.0 in a container) needs a cluster key.",
        check=_check_nonempty,
    )
    gossip_port: int = setting(
        7946,
        "UDP and TCP port of the gossip protocol (the same number for both, like serf and "
        "memberlist); 0 picks a free port (tests).",
        min=0,
        max=65535,
    )
    advertise_host: str = setting(
        "",
        "Address other members use to reach this node (e.g. the pod IP). Empty means the bind "
        "address, or the address of the default route when binding 0.0.0.0 or ::.",
    )
    advertise_port: int = setting(
        0,
        "Gossip port other members use to reach this node (behind port mapping); 0 means the "
        "bound gossip port.",
        min=0,
        max=65535,
    )
    peer_port: int = setting(
        7947,
        "Port of this node's peer-wire server (actor invocations between nodes), advertised "
        "to the other members in this node's metadata with the advertise host.",
        min=0,
        max=65535,
    )
    seeds: tuple[str, ...] = setting(
        (),
        "Members to join at start, as host:port (names are resolved, again on every retry). "
        "Retried with backoff until one answers, and again whenever this node is alone. "
        "Listing this node itself is fine (it is skipped).",
        check=_check_addresses,
    )
    dns_name: str = setting(
        "",
        "DNS name whose records list members, like a Kubernetes headless Service: A/AAAA "
        "records of name[:port] (port: the gossip port), or SRV records when the name starts "
        "with an underscore (_gossip._udp.name; the port comes from each record). Resolved "
        "at start, on every retry and every dns_refresh_ms. Empty means none.",
    )
    dns_nameserver: str = setting(
        "",
        "DNS server (host[:port]) for dns_name. Empty means the system resolver "
        "(/etc/resolv.conf).",
        check=_check_optional_address,
    )
    dns_refresh_ms: int = setting(
        30_000,
        "While joined, re-resolve seeds and dns_name this often, in milliseconds, and join "
        "any address that is not a live member, so islands formed during a partition merge.",
        min=100,
        max=86_400_000,
        unit="ms",
    )
    join_retry_min_ms: int = setting(
        500,
        "First delay in milliseconds before retrying a join no seed answered; doubled each "
        "time up to join_retry_max_ms.",
        min=10,
        max=3_600_000,
        unit="ms",
    )
    join_retry_max_ms: int = setting(
        30_000,
        "Longest delay in milliseconds between join retries while no seed answers.",
        min=10,
        max=3_600_000,
        unit="ms",
    )
    preset: str = setting(
        "lan",
        "Timing preset (memberlist's): lan (1 s probes), wan (5 s probes, slower suspicion), "
        "local (loopback, 200 ms probe timeout). The settings below override single knobs.",
        choices=("lan", "wan", "local"),
    )
    probe_interval_ms: int = setting(
        0,
        "Time between two probes of one member in milliseconds; 0 keeps the preset's value.",
        min=0,
        max=600_000,
        unit="ms",
    )
    probe_timeout_ms: int = setting(
        0,
        "Wait for a direct ack before indirect probes, in milliseconds, about the p99 round "
        "trip; 0 keeps the preset's value.",
        min=0,
        max=600_000,
        unit="ms",
    )
    suspicion_mult: int = setting(
        0,
        "Suspicion timeout multiplier (min timeout = mult x max(1, log10 n) x probe "
        "interval); 0 keeps the preset's value.",
        min=0,
        max=100,
    )
    gossip_interval_ms: int = setting(
        0,
        "Time between gossip rounds of queued news in milliseconds; 0 keeps the preset's value.",
        min=0,
        max=600_000,
        unit="ms",
    )
    push_pull_interval_ms: int = setting(
        0,
        "Full-state TCP sync with one random member this often, in milliseconds; 0 keeps the "
        "preset's value.",
        min=0,
        max=86_400_000,
        unit="ms",
    )
    key: str = setting(
        "",
        "Cluster key: base64 of 32 random bytes (`spawnmesh keygen`); every packet is "
        "encrypted and authenticated with AES-256-GCM. For rotation, comma-separated keys, "
        "each 'id:base64' or bare base64; the last one encrypts, all of them decrypt. Secret.",
        secret=True,
        check=_check_key,
    )
    key_file: str = setting(
        "",
        "Path to a file of cluster keys, one 'id:base64key' a line, the last line encrypts. "
        "Set key or key_file, not both.",
    )
    allow_insecure: bool = setting(
        False,
        "Let a node bound to a non-loopback address gossip without a cluster key (anyone who "
        "can reach the port can join or forge membership news). Logged loudly when used.",
    )
    leave_timeout_ms: int = setting(
        5_000,
        "On shutdown, time in milliseconds allowed for the leave news to be retransmitted "
        "before the node stops gossiping; the others then mark it left, never dead.",
        min=0,
        max=600_000,
        unit="ms",
    )
    tags: tuple[str, ...] = setting(
        (),
        "key=value labels in this node's metadata, shown by `spawnmesh members` (e.g. "
        "zone=eu-1).",
        check=_check_tags,
    )
    orphan_schedules_after_ms: int = setting(
        60_000,
        "Kept schedules (delayed casts) of a node that no member knows as alive are taken "
        "over once overdue by this many milliseconds (those of a member seen dead or left are "
        "taken over at once). It bounds how late such a schedule fires; long enough that a "
        "live owner has fired and forgotten its own.",
        min=100,
        max=86_400_000,
        unit="ms",
    )


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass(frozen=True)
class HostConfig:
    """The gRPC host API: actor hosts in any language attach here (docs/host-protocol.md)."""

    enabled: bool = setting(
        False,
        "Serve the host API. Off by default so a node opens no port it does not need.",
    )
    host: str = setting(
        "127.0.0.1",
        "Address the host API binds to. Loopback by default; any other address requires "
        "a token or mutual TLS (tls_cert_file, tls_key_file and tls_client_ca_file).",
        check=_check_nonempty,
    )
    port: int = setting(
        9001,
        "TCP port of the host API; 0 picks a free port (tests). 9001 is Spawn's proxy port.",
        min=0,
        max=65535,
    )
    token: str = setting(
        "",
        "Shared secret hosts send as 'authorization: Bearer <token>' metadata; a missing or "
        "wrong one is UNAUTHENTICATED. Empty: no token (loopback only). Secret: never printed.",
        secret=True,
    )
    tls_cert_file: str = setting(
        "",
        "PEM certificate chain of the host API (TLS). Empty: plaintext HTTP/2.",
    )
    tls_key_file: str = setting("", "PEM private key of tls_cert_file.")
    tls_client_ca_file: str = setting(
        "",
        "PEM CA bundle that client certificates must chain to (mutual TLS). Empty: client "
        "certificates are not asked for.",
    )
    max_message_bytes: int = setting(
        4 * 1024 * 1024,
        "Largest gRPC message (bytes) accepted; bigger ones are refused with "
        "RESOURCE_EXHAUSTED before they are read. 4 MiB is gRPC's usual default.",
        min=1024,
        max=1 << 30,
        unit="bytes",
    )
    keepalive_ms: int = setting(
        10_000,
        "Interval in milliseconds of the HTTP/2 pings the node sends on a connection that "
        "carries a host's Connect stream; a host that does not answer one within "
        "keepalive_timeout_ms is dropped, so a host that hangs or vanishes without closing its "
        "connection is detached in seconds, not after TCP's timeouts. 0 sends none.",
        min=0,
        max=3_600_000,
        unit="ms",
    )
    keepalive_timeout_ms: int = setting(
        20_000,
        "Time in milliseconds a host has to answer a keepalive ping before its connection "
        "is closed (its sessions detached). 20 s is gRPC's usual default.",
        min=100,
        max=3_600_000,
        unit="ms",
    )
    bridge: str = setting(
        "stepped",
        "How grpclib's asyncio runs beside the trio node: stepped (a native asyncio loop "
        "whose iterations a trio task runs, in the trio thread) or thread (a native asyncio "
        "loop in a dedicated thread). Chosen by measurement: docs/host-protocol.md.",
        choices=("stepped", "thread"),
    )
    transport: str = setting(
        "any",
        "Turn transports hosts may use: stream (turns over the host's Connect stream, the "
        "node never dials out), callback (the node calls the host's HostService), or any.",
        choices=("any", "stream", "callback"),
    )

    def __post_init__(self) -> None:
        if not self.enabled or _loopback(self.host):
            return
        mtls = self.tls_cert_file and self.tls_key_file and self.tls_client_ca_file
        if not self.token and not mtls:
            raise ConfigError(
                "host.host",
                f"binding the host API to {self.host!r} (not loopback) requires host.token "
                "or mutual TLS (host.tls_cert_file, host.tls_key_file, host.tls_client_ca_file)",
            )


@dataclass(frozen=True)
class SpawnConfig:
    """Spawn compatibility: Spawn SDK hosts talk Spawn's HTTP protocol to this node
    (docs/spawn-compat.md)."""

    enabled: bool = setting(
        False,
        "Serve Spawn's proxy HTTP API (registration, spawn, invoke, health) and call Spawn "
        "hosts back for their actors' turns. Off by default: no port a node does not need.",
    )
    host: str = setting(
        "127.0.0.1",
        "Address the Spawn HTTP API binds to. Loopback by default: Spawn's protocol has no "
        "authentication, so a host shares the node's network namespace (a Kubernetes pod "
        "sidecar); another address also needs spawn.allow_remote.",
        check=_check_nonempty,
    )
    port: int = setting(
        9001,
        "TCP port of the Spawn HTTP API; 0 picks a free port (tests). 9001 is Spawn's proxy "
        "port, which SDKs assume (it is also host.port's default: enable one of them on it).",
        min=0,
        max=65535,
        env_aliases=("PROXY_HTTP_PORT",),
    )
    allow_remote: bool = setting(
        False,
        "Allow binding spawn.host to a non-loopback address, which exposes an unauthenticated "
        "API: only on a network where every client is trusted.",
    )
    deployment_mode: str = setting(
        "sidecar",
        "Where a Spawn host receives its turns: sidecar (at user_function_host:"
        "user_function_port) or daemon (at the registering client's IP, on "
        "user_function_port), as Spawn's PROXY_DEPLOYMENT_MODE.",
        choices=("sidecar", "daemon"),
        env_aliases=("PROXY_DEPLOYMENT_MODE",),
    )
    user_function_host: str = setting(
        "127.0.0.1",
        "Host of the Spawn host's HTTP server (sidecar mode). A registration may name its "
        "own 'host:port' in RegistrationRequest.host_address (a spawnmesh extension).",
        check=_check_nonempty,
        env_aliases=("USER_FUNCTION_HOST",),
    )
    user_function_port: int = setting(
        8090,
        "Port of the Spawn host's HTTP server (Spawn's default, 8090).",
        min=1,
        max=65535,
        env_aliases=("USER_FUNCTION_PORT",),
    )
    max_body_bytes: int = setting(
        4 * 1024 * 1024,
        "Largest request body (bytes) the Spawn API accepts, and largest answer read from a "
        "host; bigger requests are refused with 413 before they are read.",
        min=1024,
        max=1 << 30,
        unit="bytes",
    )
    max_host_connections: int = setting(
        64,
        "Keep-alive connections (count) the node opens to one Spawn host at most; turns of "
        "different actors run concurrently on them, further turns wait for one.",
        min=1,
        max=4096,
    )
    busy_poll_us: int = setting(
        200,
        "Microseconds a wait for a Spawn host's answer or a caller's next request may poll its "
        "socket before sleeping, while the port is lightly loaded and nothing else can run: "
        "where waking an idle CPU is dear (virtual machines) it saves a wake-up per hop, as "
        "BEAM's scheduler busy-wait does for Spawn's own proxy. Adaptive (off while waits are "
        "longer), off with fewer than two usable CPUs (affinity, cgroup quota); 0 turns it off "
        "(battery-powered devices).",
        min=0,
        max=10_000,
        unit="us",
    )

    def __post_init__(self) -> None:
        if self.enabled and not _loopback(self.host) and not self.allow_remote:
            raise ConfigError(
                "spawn.host",
                f"binding the Spawn API to {self.host!r} (not loopback) exposes an "
                "unauthenticated API: set spawn.allow_remote = true to do it anyway",
            )


@dataclass(frozen=True)
class TracingConfig:
    """OpenTelemetry tracing of invocations across nodes and hosts (docs/observability.md)."""

    enabled: bool = setting(
        False,
        "Record OpenTelemetry spans for invocations (edge, peer calls, turns, host turns). Off "
        "by default: when off the hooks cost one attribute check. Needs the 'tracing' extra "
        "(pip install 'spawnmesh[tracing]').",
    )
    exporter: str = setting(
        "otlp",
        "Where spans go: otlp (OTLP/HTTP protobuf to endpoint, batched), file (one JSON "
        "object per span and line, appended to file), console (JSON on stdout), or memory "
        "(kept in the process, for tests).",
        choices=("otlp", "file", "console", "memory"),
    )
    endpoint: str = setting(
        "http://127.0.0.1:4318/v1/traces",
        "OTLP/HTTP traces endpoint (an OpenTelemetry Collector, Jaeger, Tempo...). 4318 is "
        "OTLP/HTTP's registered port.",
        check=_check_nonempty,
    )
    file: str = setting(
        "",
        "Path the file exporter appends to (JSON lines). Required with exporter = file.",
    )
    sample_ratio: float = setting(
        1.0,
        "Fraction of new traces recorded (parent-based: a call joins its caller's decision). "
        "1.0 records all; lower it for busy production nodes.",
        min=0.0,
        max=1.0,
    )
    service_name: str = setting(
        "spawnmesh",
        "The service.name resource attribute of every span (the node's name goes in "
        "service.instance.id).",
        check=_check_nonempty,
    )

    def __post_init__(self) -> None:
        if self.enabled and self.exporter == "file" and not self.file:
            raise ConfigError("tracing.file", "exporter = file needs tracing.file (a path)")


@dataclass(frozen=True)
class NodeConfig:
    """The whole configuration of one node: top-level settings and one field per section."""

    name: str = setting(
        "",
        "Node id, unique in the cluster. Empty means `<hostname>-<ops.port>` (the configured "
        "port), or `<hostname>-<process id>` when ops.port is 0, decided at start-up: unique "
        "per machine and port (or process).",
    )
    app: str = setting(
        "",
        "'module:attribute' of the user's ActorSystem (or a list of them) to host. Empty "
        "means the built-in examples, so a bare node is useful out of the box.",
        check=_check_app,
    )
    ops: OpsConfig = field(default_factory=OpsConfig)
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    statestore: StatestoreConfig = field(default_factory=StatestoreConfig)
    log: LogConfig = field(default_factory=LogConfig)
    host: HostConfig = field(default_factory=HostConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    spawn: SpawnConfig = field(default_factory=SpawnConfig)

    def __post_init__(self) -> None:
        h, sp = self.host, self.spawn
        if h.enabled and sp.enabled and h.port == sp.port != 0 and h.host == sp.host:
            raise ConfigError(
                "spawn.port",
                f"the gRPC host API (host.port) and the Spawn API (spawn.port) both use "
                f"{h.host}:{h.port}: move one of them",
            )


# --------------------------------------------------------------------------------------------
# Introspection: the tree of sections and settings, derived from the dataclasses.


@dataclass(frozen=True)
class SettingDoc:
    """One setting as documented: dotted name, env vars, type, default, help and limits."""

    name: str
    env: tuple[str, ...]
    type: str
    default: object
    help: str
    min: int | float | None = None
    max: int | float | None = None
    choices: tuple[str, ...] | None = None
    secret: bool = False
    unit: str = ""

    def allowed(self) -> str:
        """What values are allowed, in words (used in error messages and docs)."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.type in ("int", "float"):
            noun = "an integer" if self.type == "int" else "a number"
            if self.min is not None and self.max is not None:
                return f"{noun} in {self.min}..{self.max}"
            if self.min is not None:
                return f"{noun} >= {self.min}"
            if self.max is not None:
                return f"{noun} <= {self.max}"
            return noun
        if self.type == "bool":
            return "a boolean (true/false, 1/0, yes/no, on/off)"
        if self.type == "list[str]":
            return "a list of strings (comma-separated in the environment)"
        return "a string"


@dataclass(frozen=True)
class _Leaf:
    path: tuple[str, ...]
    typ: Any
    f: dataclasses.Field[Any]
    doc: SettingDoc


@functools.cache
def _attribute_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) as a fallback help text.

    This lets a section written without ``setting(...)`` (e.g. a plain tunables dataclass)
    be added to NodeConfig and still be documented.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef) or node.name != cls.__name__:
            continue
        for a, b in itertools.pairwise(node.body):
            if (
                isinstance(a, ast.AnnAssign)
                and isinstance(a.target, ast.Name)
                and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                out[a.target.id] = " ".join(b.value.value.split())
        break
    return out


def _unit_of(name: str, meta: Mapping[str, Any]) -> str:
    if meta.get("unit"):
        return str(meta["unit"])
    for unit in ("ms", "bytes"):
        if name.endswith("_" + unit):
            return unit
    return ""


def _section_doc(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split())


def _type_name(typ: Any) -> str:
    if typ is bool:
        return "bool"
    if typ is int:
        return "int"
    if typ is float:
        return "float"
    if typ is str:
        return "str"
    if typing.get_origin(typ) is tuple and typing.get_args(typ) in ((str, ...),):
        return "list[str]"
    raise TypeError(f"unsupported setting type {typ!r}")


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"setting {f.name} has no default")


def _env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "_".join(p.upper() for p in path)


def _walk(
    cls: type, prefix: tuple[str, ...] = ()
) -> Iterator[_Leaf | tuple[tuple[str, ...], type]]:
    """Yield sections (as (path, class)) and leaves of ``cls`` in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        path = (*prefix, f.name)
        if isinstance(typ, type) and dataclasses.is_dataclass(typ):
            yield (path, typ)
            yield from _walk(typ, path)
            continue
        meta = f.metadata
        help_text = str(meta.get("help", "")) or _attribute_docs(cls).get(f.name, "")
        if not help_text:
            raise TypeError(f"setting {'.'.join(path)} has no help text")
        doc = SettingDoc(
            name=".".join(path),
            env=(_env_name(path), *meta.get("env_aliases", ())),
            type=_type_name(typ),
            default=_default_of(f),
            help=help_text,
            min=meta.get("min"),
            max=meta.get("max"),
            choices=meta.get("choices"),
            secret=bool(meta.get("secret", False)),
            unit=_unit_of(f.name, meta),
        )
        yield _Leaf(path, typ, f, doc)


def _leaves(cls: type = NodeConfig) -> dict[str, _Leaf]:
    return {x.doc.name: x for x in _walk(cls) if isinstance(x, _Leaf)}


def _sections(cls: type = NodeConfig) -> dict[str, type]:
    return {".".join(x[0]): x[1] for x in _walk(cls) if not isinstance(x, _Leaf)}


def settings() -> list[SettingDoc]:
    """Every setting of :class:`NodeConfig`, in declaration order (for docs, checks, tests)."""
    return [leaf.doc for leaf in _leaves().values()]


# --------------------------------------------------------------------------------------------
# Parsing and validation of one value.

_TRUE = frozenset({"true", "1", "yes", "on", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "off", "n", "f"})


def _show(leaf: _Leaf, value: object) -> str:
    return "'***'" if leaf.doc.secret else repr(value)


def _convert(leaf: _Leaf, value: object, origin: str) -> Any:
    """Turn a raw value (a string from env/CLI, or a TOML/Python value) into a checked value."""
    doc = leaf.doc

    def bad(what: str | None = None) -> ConfigError:
        msg = what or f"must be {doc.allowed()}"
        return ConfigError(doc.name, f"{msg}, got {_show(leaf, value)} (from {origin})")

    out: Any
    if doc.type == "bool":
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.strip().lower() in _TRUE:
            out = True
        elif isinstance(value, str) and value.strip().lower() in _FALSE:
            out = False
        else:
            raise bad()
    elif doc.type in ("int", "float"):
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            try:
                out = int(text, 10) if doc.type == "int" else float(text)
            except ValueError:
                raise bad() from None
        elif isinstance(value, int):
            out = value if doc.type == "int" else float(value)
        elif isinstance(value, float) and doc.type == "float":
            out = value
        else:
            raise bad()
        if (doc.min is not None and out < doc.min) or (doc.max is not None and out > doc.max):
            raise bad()
    elif doc.type == "list[str]":
        if isinstance(value, str):
            out = tuple(p.strip() for p in value.split(",") if p.strip())
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            out = tuple(value)
        else:
            raise bad()
    else:  # str
        if not isinstance(value, str):
            raise bad()
        out = value
        if doc.choices:
            lowered = {c.lower(): c for c in doc.choices}
            if value.strip().lower() not in lowered:
                raise bad()
            out = lowered[value.strip().lower()]
    check: Check | None = leaf.f.metadata.get("check")
    if check is not None:
        problem = check(out)
        if problem is not None:
            raise bad(problem)
    return out


# --------------------------------------------------------------------------------------------
# Sources.


def _from_env(env: Mapping[str, str], leaves: Mapping[str, _Leaf]) -> dict[str, Any]:
    known: set[str] = set(RESERVED_ENV)
    out: dict[str, Any] = {}
    for name, leaf in leaves.items():
        known.update(leaf.doc.env)
        for var in leaf.doc.env:  # the primary name first, then aliases
            if var in env:
                out[name] = _convert(leaf, env[var], var)
                break
    for var in sorted(env):
        if var.startswith(ENV_PREFIX) and var not in known:
            log.warning("ignoring unknown environment variable %s (not a spawnmesh setting)", var)
    return out


def _read_toml(path: str, suffix: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror}{suffix}"
        raise ConfigError("config", msg) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}{suffix}") from None


def _from_file(
    path: str, how: str, leaves: Mapping[str, _Leaf], sections: Mapping[str, type]
) -> dict[str, Any]:
    data = _read_toml(path, how)
    out: dict[str, Any] = {}
    origin = f"file {path}"

    def visit(table: Mapping[str, Any], prefix: str) -> None:
        for key, value in table.items():
            name = f"{prefix}{key}"
            if name in sections:
                if not isinstance(value, dict):
                    raise ConfigError(
                        name, f"must be a table [{name}], got {value!r} (from {origin})"
                    )
                visit(value, name + ".")
            elif name in leaves:
                out[name] = _convert(leaves[name], value, origin)
            else:
                hint = _known_hint(name, leaves, sections)
                raise ConfigError(name, f"unknown setting (from {origin}); {hint}")

    visit(data, "")
    return out


def _known_hint(name: str, leaves: Mapping[str, _Leaf], sections: Mapping[str, type]) -> str:
    section = name.rpartition(".")[0]
    here = [n for n in leaves if n.rpartition(".")[0] == section]
    if section and here:
        return "known here: " + ", ".join(here)
    top = [n for n in leaves if "." not in n] + [f"[{n}]" for n in sections if "." not in n]
    return "known: " + ", ".join(top)


def _from_overrides(
    overrides: Mapping[str, object],
    leaves: Mapping[str, _Leaf],
    sections: Mapping[str, type],
    origins: Mapping[str, str],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in overrides.items():
        origin = origins.get(name, "overrides")
        if name not in leaves:
            hint = _known_hint(name, leaves, sections)
            raise ConfigError(name, f"unknown setting (from {origin}); {hint}")
        out[name] = _convert(leaves[name], value, origin)
    return out


def _build(cls: type[_T], values: Mapping[str, Any], prefix: str = "") -> _T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f"{prefix}{f.name}"
        typ = hints[f.name]
        if isinstance(typ, type) and dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, values, name + ".")
        elif name in values:
            kwargs[f.name] = values[name]
    return cls(**kwargs)


def load_config(
    *,
    overrides: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    file: str | os.PathLike[str] | None = None,
    override_origins: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Build the effective :class:`NodeConfig`: overrides > environment > TOML file > defaults.

    ``overrides`` maps dotted names to values (strings are parsed like environment values);
    ``env`` defaults to ``os.environ``; ``file`` defaults to ``$SPAWNMESH_CONFIG`` when unset.
    ``override_origins`` names where each override came from (e.g. ``--ops-port``) for errors.
    Raises :class:`ConfigError` naming the setting, what is allowed and where the value came from.
    """
    return _load(NodeConfig, overrides, env, file, override_origins)


def _load(
    root: type[_T],
    overrides: Mapping[str, object] | None,
    env: Mapping[str, str] | None,
    file: str | os.PathLike[str] | None,
    override_origins: Mapping[str, str] | None,
) -> _T:
    """load_config for any root dataclass (tests use it to prove the loader is generic)."""
    environ: Mapping[str, str] = os.environ if env is None else env
    leaves = _leaves(root)
    sections = _sections(root)
    values: dict[str, Any] = {}
    if file is not None:
        path, how = os.fspath(file), ""
    else:
        path, how = environ.get("SPAWNMESH_CONFIG", ""), " (from SPAWNMESH_CONFIG)"
    if path:
        values.update(_from_file(path, how, leaves, sections))
    values.update(_from_env(environ, leaves))
    values.update(_from_overrides(overrides or {}, leaves, sections, override_origins or {}))
    return _build(root, values)


# --------------------------------------------------------------------------------------------
# Output: redacted view and generated docs.


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def redacted(config: NodeConfig) -> dict[str, object]:
    """The config as nested plain dicts for ``spawnmesh config show``; secrets become "***"."""
    out: dict[str, object] = {}
    for leaf in _leaves().values():
        node: dict[str, object] = out
        for part in leaf.path[:-1]:
            child = node.setdefault(part, {})
            assert isinstance(child, dict)
            node = child
        value: Any = config
        for part in leaf.path:
            value = getattr(value, part)
        if leaf.doc.secret and value not in ("", None, ()):
            value = "***"
        elif leaf.f.metadata.get("redact") is not None:
            value = leaf.f.metadata["redact"](value)
        node[leaf.path[-1]] = _plain(value)
    return out


def _toml_value(value: object) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def to_toml(data: Mapping[str, object]) -> str:
    """Render nested dicts (like :func:`redacted`'s) as TOML that :func:`load_config` reads."""
    lines: list[str] = []

    def emit(table: Mapping[str, object], prefix: str) -> None:
        scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping)]
        tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
        if prefix and (scalars or not tables):
            if lines:
                lines.append("")
            lines.append(f"[{prefix}]")
        for k, v in scalars:
            lines.append(f"{k} = {_toml_value(v)}")
        for k, v in tables:
            assert isinstance(v, Mapping)
            emit(v, f"{prefix}.{k}" if prefix else k)

    emit(data, "")
    return "\n".join(lines) + "\n"


def _md_default(doc: SettingDoc) -> str:
    if doc.default in ("", ()):
        return "empty"
    return f"`{_toml_value(_plain(doc.default))}`"


def render_docs_markdown() -> str:
    """The markdown of ``docs/configuration.md``, generated so the docs cannot drift from code."""
    out: list[str] = [
        "# Configuration",
        "",
        "<!-- Generated by `spawnmesh config docs` (spawnmesh.config.render_docs_markdown);",
        "     do not edit by hand. tests/test_config.py fails when this file is stale. -->",
        "",
        "A node reads its settings from four layers; the first one that sets a value wins:",
        "",
        "1. command-line flags of `spawnmesh run` (`--ops-port 9091`, or any setting with",
        "   `--set section.key=value`);",
        "2. environment variables `SPAWNMESH_<SECTION>_<KEY>` (top-level settings:",
        "   `SPAWNMESH_<KEY>`), plus the aliases listed below;",
        "3. a TOML file given with `--config FILE` or `SPAWNMESH_CONFIG=FILE`;",
        "4. the defaults documented here.",
        "",
        "Booleans accept true/false, 1/0, yes/no, on/off. Integers may use `_` separators.",
        "Durations are in milliseconds and their names end in `_ms`. Unknown keys in the file",
        "or on the command line are errors; unknown `SPAWNMESH_*` environment variables are",
        "ignored with a warning. A bad value stops the node with one line naming the setting,",
        "what is allowed and where the value came from. Secrets are never printed:",
        "`spawnmesh config show` prints the effective configuration with secrets as `***`.",
        "",
        "Example `spawnmesh.toml`:",
        "",
        "```toml",
        'name = "node-a"',
        "",
        "[ops]",
        "port = 9091",
        "",
        "[actors]",
        "default_timeout_ms = 5000",
        "",
        "[statestore]",
        'url = "postgresql+psycopg://spawn:secret@db/spawn"',
        "```",
        "",
    ]
    sections = _sections()
    current: str | None = None
    for doc in settings():
        section = doc.name.rpartition(".")[0]
        if section != current:
            current = section
            title = f"`[{section}]`" if section else "Top level"
            cls = sections[section] if section else NodeConfig
            out += [f"## {title}", "", _section_doc(cls), ""]
        out += [f"### `{doc.name}`", "", doc.help, ""]
        out.append("- environment: " + ", ".join(f"`{e}`" for e in doc.env))
        out.append(f"- allowed: {doc.allowed()}")
        out.append(f"- default: {_md_default(doc)}")
        if doc.secret:
            out.append("- secret: yes (shown as `***`)")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"
