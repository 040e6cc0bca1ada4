"""The ``spawnmesh`` command line: a thin layer that parses into NodeConfig and calls the library.

It is a click group so later commands (members, join, leave, state, ...) are added with
``@main.command()``. Errors are printed as one line ``spawnmesh: ...`` on stderr; configuration
errors exit 2, failed invocations exit 1.
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import click

from spawnmesh._version import __version__
from spawnmesh.config import NodeConfig, load_config, redacted, render_docs_markdown, to_toml
from spawnmesh.errors import ConfigError

__all__ = ["DEFAULT_NODE_URL", "main"]

DEFAULT_NODE_URL = "http://127.0.0.1:9090"
"""Where ``invoke`` finds a node when neither ``--node`` nor ``SPAWNMESH_NODE`` is given."""

EXIT_FAILED = 1
EXIT_USAGE = 2

_F = TypeVar("_F", bound=Callable[..., Any])


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print one ``spawnmesh: ...`` line on stderr and exit with ``code``."""
    click.echo(f"spawnmesh: {message}", err=True)
    sys.exit(code)


def _config_error(err: ConfigError) -> NoReturn:
    _fail(f"error: {err}", EXIT_USAGE)


def _parse_assignments(items: tuple[str, ...], option: str) -> list[tuple[str, str]]:
    """Split ``key=value`` items (from a repeatable option); a missing ``=`` is a usage error."""
    out: list[tuple[str, str]] = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _fail(f"error: {option} expects key=value, got {item!r}", EXIT_USAGE)
        out.append((key.strip(), value))
    return out


def _build_config(
    config_file: str | None,
    sets: tuple[str, ...],
    flags: Mapping[str, tuple[str, object]],
) -> NodeConfig:
    """Load the config with ``--set`` items, then explicit flags (which win), as overrides."""
    overrides: dict[str, object] = {}
    origins: dict[str, str] = {}
    for key, value in _parse_assignments(sets, "--set"):
        overrides[key] = value
        origins[key] = f"--set {key}"
    for setting_name, (flag, flag_value) in flags.items():
        if flag_value is not None:
            overrides[setting_name] = flag_value
            origins[setting_name] = flag
    try:
        return load_config(overrides=overrides, file=config_file, override_origins=origins)
    except ConfigError as err:
        _config_error(err)


def _config_options(func: _F) -> _F:
    """The options every command that builds a NodeConfig shares: ``--config`` and ``--set``."""
    func = click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="SECTION.KEY=VALUE",
        help="Set any setting (repeatable); see `spawnmesh config docs`.",
    )(func)
    func = click.option(
        "--config",
        "config_file",
        metavar="FILE",
        default=None,
        help="TOML config file (default: $SPAWNMESH_CONFIG).",
    )(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    __version__, "--version", prog_name="spawnmesh", message="%(prog)s %(version)s"
)
def main() -> None:
    """spawnmesh: an actor mesh of virtual actors, one process per machine."""


@main.command(short_help="Run a node.")
@click.option("--app", metavar="MODULE:ATTR", help="The ActorSystem(s) to host.")
@_config_options
@click.option("--name", metavar="NAME",
              help="Node id (default: <hostname>-<ops port>, <hostname>-<pid> with port 0).")
@click.option("--ops-host", metavar="HOST", help="Address of the ops HTTP server.")
@click.option("--ops-port", metavar="N", help="Port of the ops HTTP server (0 = any free port).")
@click.option("--statestore", metavar="URL", help="Statestore SQLAlchemy URL or memory://.")
@click.option("--log-format", metavar="human|json", help="Log line format.")
@click.option("--log-level", metavar="LEVEL", help="debug, info, warning or error.")
def run(
    app: str | None,
    config_file: str | None,
    sets: tuple[str, ...],
    name: str | None,
    ops_host: str | None,
    ops_port: str | None,
    statestore: str | None,
    log_format: str | None,
    log_level: str | None,
) -> None:
    """Run a node until SIGINT/SIGTERM (flags > SPAWNMESH_* env > config file > defaults)."""
    config = _build_config(
        config_file,
        sets,
        {
            "app": ("--app", app),
            "name": ("--name", name),
            "ops.host": ("--ops-host", ops_host),
            "ops.port": ("--ops-port", ops_port),
            "statestore.url": ("--statestore", statestore),
            "log.format": ("--log-format", log_format),
            "log.level": ("--log-level", log_level),
        },
    )
    from spawnmesh.logs import setup_logging

    setup_logging(config.log.format, config.log.level)
    from spawnmesh.ops.http import check_ops_bind

    if config.ops.port:  # a busy port: one line now, not a supervisor retrying it
        try:
            check_ops_bind(config.ops.host, config.ops.port)
        except ConfigError as err:
            _config_error(err)
    # Lazy: the node pulls in the whole runtime, and the CLI must import without it.
    run_node: Callable[[NodeConfig], int] = importlib.import_module("spawnmesh.node").run_node
    from spawnmesh.supervisor import RestartIntensityExceeded

    try:
        code = run_node(config)
    except RestartIntensityExceeded as err:
        # a service kept failing on its configuration (e.g. the port was taken meanwhile)
        if isinstance(err.last_error, ConfigError):
            _config_error(err.last_error)
        raise
    sys.exit(code)


# --------------------------------------------------------------------------------------------
# invoke


def _invoke_url(node: str, system: str, actor: str, action: str) -> str:
    parts = [urllib.parse.quote(p, safe="") for p in (system, actor, action)]
    return f"{node}/v1/systems/{parts[0]}/actors/{parts[1]}/actions/{parts[2]}"


def _error_line(status: int, body: bytes) -> str:
    """The one-line message for a non-200 reply: ``<code>: <message>`` if the body says so."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        error = parsed["error"]
        return f"{error.get('code', 'internal')}: {error.get('message', '')}"
    text = body.decode("utf-8", "replace").strip().splitlines()
    return f"http_{status}: {text[0][:200] if text else 'no error details in the reply'}"


@main.command(short_help="Invoke an action on an actor of a running node.")
@click.argument("system")
@click.argument("actor")
@click.argument("action")
@click.option("--data", metavar="JSON", help="Payload as JSON (default: null).")
@click.option("--metadata", multiple=True, metavar="K=V", help="Metadata entry (repeatable).")
@click.option("--timeout-ms", type=click.IntRange(min=1), help="Reply deadline in ms.")
@click.option("--async", "is_async", is_flag=True, help="Fire and forget: do not wait for a reply.")
@click.option("--delay-ms", type=click.IntRange(min=0),
              help="With --async: deliver after this many ms (a delayed call has no reply).")
@click.option("--parent", metavar="TEMPLATE", help="Spawn the actor from this template if new.")
@click.option(
    "--node",
    metavar="URL",
    envvar="SPAWNMESH_NODE",
    default=DEFAULT_NODE_URL,
    show_default=True,
    help="Ops URL of a running node (env SPAWNMESH_NODE).",
)
def invoke(
    system: str,
    actor: str,
    action: str,
    data: str | None,
    metadata: tuple[str, ...],
    timeout_ms: int | None,
    is_async: bool,
    delay_ms: int | None,
    parent: str | None,
    node: str,
) -> None:
    """Invoke ACTION on ACTOR of SYSTEM through a running node's ops HTTP API; print the value
    (with --async: null, once the node has queued the call)."""
    if delay_ms is not None and not is_async:
        _fail("error: --delay-ms needs --async: a delayed call is fire-and-forget, it has no "
              "reply to print", EXIT_USAGE)
    payload: object = None
    if data is not None:
        try:
            payload = json.loads(data)
        except ValueError as exc:
            _fail(f"error: --data is not valid JSON: {exc}", EXIT_USAGE)
    node = node.rstrip("/")
    if urllib.parse.urlsplit(node).scheme not in ("http", "https"):
        _fail(f"error: --node must be an http:// or https:// URL, got {node!r}", EXIT_USAGE)
    body = {
        "payload": payload,
        "metadata": dict(_parse_assignments(metadata, "--metadata")),
        "timeout_ms": timeout_ms,
        "async": is_async,
        "delay_ms": delay_ms,
        "parent": parent,
    }
    url = _invoke_url(node, system, actor, action)
    # imported here: 0.5 MB of idle RSS that `spawnmesh run` would keep for nothing
    from urllib.error import HTTPError, URLError
    from urllib.request import Request, urlopen

    request = Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    # The node enforces the deadline; the socket timeout only guards against a hung node.
    http_timeout_s = (timeout_ms if timeout_ms is not None else 3_600_000) / 1000 + 10
    try:
        with urlopen(request, timeout=http_timeout_s) as response:
            status, raw = response.status, response.read()
    except HTTPError as exc:
        status, raw = exc.code, exc.read()
    except URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            _fail(f"cannot connect to {node}: connection refused (is a node running there?)")
        if isinstance(reason, TimeoutError):
            _fail(f"timeout: no reply from {node} within {http_timeout_s:g} s")
        _fail(f"cannot reach {node}: {reason}")
    except TimeoutError:
        _fail(f"timeout: no reply from {node} within {http_timeout_s:g} s")
    except (ConnectionError, OSError) as exc:
        _fail(f"cannot talk to {node}: {exc}")
    if status != 200:
        _fail(_error_line(status, raw))
    try:
        reply = json.loads(raw)
    except ValueError:
        _fail(f"internal: {url} answered 200 with a body that is not JSON")
    if not isinstance(reply, dict) or "value" not in reply:
        _fail(f"internal: {url} answered 200 without a 'value'")
    if sys.stdout.isatty():
        click.echo(json.dumps(reply["value"], indent=2, ensure_ascii=False))
    else:
        click.echo(json.dumps(reply["value"], separators=(",", ":"), ensure_ascii=False))


# --------------------------------------------------------------------------------------------
# members, join, leave: the cluster as one running node sees it


def _node_option(func: _F) -> _F:
    """``--node URL`` (env SPAWNMESH_NODE), as ``invoke`` takes it."""
    return click.option(
        "--node",
        metavar="URL",
        envvar="SPAWNMESH_NODE",
        default=DEFAULT_NODE_URL,
        show_default=True,
        help="Ops URL of a running node (env SPAWNMESH_NODE).",
    )(func)


class _CallFailed(Exception):
    """A request to a node's ops API failed; the message is the one line to print."""


def _node_call(node: str, method: str, path: str, body: object = None,
               timeout_s: float = 30.0) -> dict[str, Any]:
    """One JSON request to a node's ops API; any failure exits 1 with one line."""
    node = node.rstrip("/")
    if urllib.parse.urlsplit(node).scheme not in ("http", "https"):
        _fail(f"error: --node must be an http:// or https:// URL, got {node!r}", EXIT_USAGE)
    try:
        return _node_request(node, method, path, body, timeout_s)
    except _CallFailed as exc:
        _fail(str(exc))


def _node_request(node: str, method: str, path: str, body: object = None,
                  timeout_s: float = 30.0) -> dict[str, Any]:
    """One JSON request to a node's ops API (``node`` without a trailing slash); raises
    ``_CallFailed`` with a one-line message on any failure."""
    from urllib.error import HTTPError, URLError  # imported here, as in invoke
    from urllib.request import Request, urlopen

    data = None if body is None else json.dumps(body).encode()
    request = Request(
        node + path, data=data, method=method,
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        with urlopen(request, timeout=timeout_s) as response:
            status, raw = response.status, response.read()
    except HTTPError as exc:
        status, raw = exc.code, exc.read()
    except URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            raise _CallFailed(
                f"cannot connect to {node}: connection refused (is a node running there?)"
            ) from None
        raise _CallFailed(f"cannot reach {node}: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        raise _CallFailed(f"cannot talk to {node}: {exc}") from None
    if status != 200:
        raise _CallFailed(_error_line(status, raw))
    try:
        reply = json.loads(raw)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise _CallFailed(f"internal: {node}{path} answered 200 without a JSON object")
    return reply


def _print_table(table: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns, two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@main.command(short_help="List the cluster members a node knows.")
@_node_option
@click.option("--json", "as_json", is_flag=True, help="Print the node's JSON reply.")
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(["alive", "suspect", "dead", "left"]),
              help="Only members in this status (repeatable).")
def members(node: str, as_json: bool, statuses: tuple[str, ...]) -> None:
    """Print every member the node knows: name, gossip address, status, incarnation, the
    round trip of the node's last direct probe of it, tags."""
    reply = _node_call(node, "GET", "/v1/members")
    rows = [r for r in reply.get("members", []) if not statuses or r.get("status") in statuses]
    if as_json:
        _echo_json({**reply, "members": rows})
        return
    if not reply.get("enabled", True):
        click.echo(f"clustering is off on {reply.get('self', 'this node')} "
                   "(cluster.enabled=false)")
        return
    table = [("Node", "Address", "Status", "Incarnation", "RTT", "Actors", "Tags")]
    for r in rows:
        tags = ",".join(f"{k}={v}" for k, v in sorted(r.get("tags", {}).items()))
        rtt = r.get("rtt_ms")
        table.append((str(r["name"]), str(r["address"]), str(r["status"]),
                       str(r["incarnation"]), "-" if rtt is None else f"{rtt} ms",
                       str(len(r.get("actor_types", []))), tags))
    _print_table(table)


@main.command(short_help="Make a node join a cluster through given members.")
@click.argument("addrs", nargs=-1, required=True, metavar="HOST:PORT...")
@_node_option
def join(addrs: tuple[str, ...], node: str) -> None:
    """Ask the node to join through the gossip addresses given, each HOST:PORT or
    [IPv6]:PORT (exit 2 if one is not; exit 1 if none answered)."""
    from spawnmesh.cluster.addr import parse_host_port
    from spawnmesh.errors import InvalidArgument

    for addr in addrs:
        try:
            parse_host_port(addr)  # no default port: a bare word is a typo, not a member
        except InvalidArgument as exc:
            _fail(f"error: expected HOST:PORT (a member's gossip address), got {exc}",
                  EXIT_USAGE)
    reply = _node_call(node, "POST", "/v1/cluster/join", {"addrs": list(addrs)})
    answered = int(reply.get("answered", 0))
    click.echo(f"joined through {answered} of {len(addrs)} address(es)")
    if answered == 0:
        sys.exit(EXIT_FAILED)


@main.command(short_help="Make a node leave the cluster gracefully and exit.")
@_node_option
def leave(node: str) -> None:
    """Ask the node to leave (the others mark it left at once, never dead), then drain and exit.
    Exit 1, leaving the node running, if it is not in a cluster (cluster.enabled=false)."""
    members = _node_call(node, "GET", "/v1/members")
    if not members.get("enabled", True):
        _fail(f"{members.get('self', 'the node')} is not in a cluster (cluster.enabled=false): "
              "nothing to leave; it keeps running (stop it with SIGTERM)")
    reply = _node_call(node, "POST", "/v1/cluster/leave")
    how = "left the cluster" if reply.get("left") else "leave news not fully spread in time"
    click.echo(f"{how}; the node is shutting down")


# --------------------------------------------------------------------------------------------
# actors, placement: where actors live


def _ops_url(address: str, like: str) -> str:
    """``http://host:port`` for a member's ops address, with the scheme of ``like``."""
    scheme = urllib.parse.urlsplit(like).scheme or "http"
    return f"{scheme}://{address}"


@main.command(short_help="List the actors active on a node (or on every member).")
@_node_option
@click.option("--all", "every", is_flag=True,
              help="Every live member's actors (ops addresses from the node's member list).")
@click.option("--limit", type=click.IntRange(min=1, max=100_000), default=1000,
              show_default=True, help="At most this many actors per node (most recent first).")
@click.option("--json", "as_json", is_flag=True, help="Print the nodes' JSON replies.")
def actors(node: str, every: bool, limit: int, as_json: bool) -> None:
    """Print the actors active on the node: system, name, parent, revision, queued turns, idle
    time; and actors being handed off. With --all, every live member's (exit 1 if a member
    did not answer; the others are still printed)."""
    node = node.rstrip("/")
    path = f"/v1/actors?limit={limit}"
    urls = [node]
    if every:
        reply = _node_call(node, "GET", "/v1/members")
        if reply.get("enabled", True):
            rows = [r for r in reply.get("members", [])
                    if r.get("status") in ("alive", "suspect")]
            urls = []
            for r in sorted(rows, key=lambda r: str(r.get("name"))):
                if r.get("self"):
                    urls.append(node)
                elif r.get("ops_address"):
                    urls.append(_ops_url(str(r["ops_address"]), node))
                else:
                    click.echo(f"spawnmesh: member {r.get('name')} advertises no ops address",
                               err=True)
    replies: list[dict[str, Any]] = []
    failed = 0
    for url in urls:
        if url is node:
            replies.append(_node_call(url, "GET", path))
            continue
        try:
            replies.append(_node_request(url, "GET", path))
        except _CallFailed as exc:
            failed += 1
            click.echo(f"spawnmesh: {exc}", err=True)
    if as_json:
        _echo_json(replies if every else replies[0])
    else:
        table: list[tuple[str, ...]] = [
            ("Node", "System", "Name", "Parent", "Revision", "Queued", "Idle")
        ]
        notes = []
        for r in replies:
            for a in r.get("actors", []):
                idle = a.get("idle_s")
                table.append((str(r.get("node")), str(a["system"]), str(a["name"]),
                              str(a.get("parent") or "-"), str(a.get("revision")),
                              str(a.get("queued")), "-" if idle is None else f"{idle:.1f}s"))
            for h in r.get("handing_off", []):
                table.append((str(r.get("node")), str(h["system"]), str(h["name"]), "-", "-",
                              "-", "handing off"))
            if r.get("truncated"):
                notes.append(f"{r.get('node')}: {r.get('active')} active, "
                             f"{len(r.get('actors', []))} shown (--limit)")
        _print_table(table)
        for note in notes:
            click.echo(note)
    if failed:
        sys.exit(EXIT_FAILED)


@main.command(short_help="Name the node that owns an actor.")
@click.argument("system")
@click.argument("actor")
@click.option("--parent", metavar="TEMPLATE", help="The template of an unnamed actor.")
@_node_option
@click.option("--json", "as_json", is_flag=True, help="Print the node's JSON reply.")
def placement(system: str, actor: str, parent: str | None, node: str, as_json: bool) -> None:
    """Print which node owns ACTOR of SYSTEM in the node's view of the cluster, with the
    placement version (equal on nodes that agree) and the members hosting its type."""
    path = "/v1/placement/" + "/".join(urllib.parse.quote(p, safe="") for p in (system, actor))
    if parent:
        path += "?" + urllib.parse.urlencode({"parent": parent})
    reply = _node_call(node, "GET", path)
    if as_json:
        _echo_json(reply)
        return
    owner = reply.get("owner")
    if owner is None:
        click.echo(f"{system}/{actor}: pooled; calls spread over "
                   f"{', '.join(reply.get('members', [])) or 'no member'}")
    else:
        where = reply.get("owner_ops_address")
        click.echo(f"{system}/{actor}: owner {owner}" + (f" (ops {where})" if where else ""))
    click.echo(f"type {reply.get('type')} hosted by {', '.join(reply.get('members', []))}")
    here = " (active there)" if reply.get("active_here") else ""
    click.echo(f"placement {reply.get('placement_version') or '-'} as seen by "
               f"{reply.get('node')}{here}")


# --------------------------------------------------------------------------------------------
# status: the cluster on one screen


def _uptime(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


@main.command(short_help="Show a node, its members, ring balance and readiness on one screen.")
@_node_option
@click.option("--json", "as_json", is_flag=True,
              help="Print the node's GET /v1/cluster/status reply (for scripts).")
def status(node: str, as_json: bool) -> None:
    """Print this node (name, version, readiness and why, uptime), every member it knows
    (status, incarnation, address, readiness), the ring balance (actors each member owns per
    actor type, asked from every live member's ops address by the node) and the actors by
    type. Exit 1 if the node cannot be reached."""
    reply = _node_call(node, "GET", "/v1/cluster/status")
    if as_json:
        _echo_json(reply)
        return
    members = [m for m in reply.get("members", []) if isinstance(m, dict)]
    me = next((m for m in members if m.get("self")), {})
    doc: dict[str, Any] = me.get("node") or {}
    ready = "ready" if doc.get("ready") else "NOT READY"
    click.echo(f"node {reply.get('self')}  spawnmesh {doc.get('version', '?')}  {ready}  "
               f"up {_uptime(doc.get('uptime_s'))}  ops {doc.get('ops_address', '?')}  "
               f"cluster {reply.get('cluster') or '(clustering off)'}")
    for reason in doc.get("reasons", []):
        click.echo(f"  not ready: {reason}")
    click.echo("")
    table: list[tuple[str, ...]] = [
        ("Member", "Status", "Incarnation", "Address", "Ready", "Actors", "Uptime")
    ]
    not_ready: list[str] = []
    for m in members:
        d = m.get("node") if isinstance(m.get("node"), dict) else None
        if d is not None:
            is_ready = "yes" if d.get("ready") else "no"
            if not d.get("ready"):
                not_ready.append(f"{m.get('name')}: {'; '.join(d.get('reasons', []))}")
        elif m.get("error"):
            is_ready = "unreachable"
            not_ready.append(f"{m.get('name')}: {m.get('error')}")
        else:
            is_ready = "-"
        table.append((
            str(m.get("name")) + (" *" if m.get("self") else ""), str(m.get("status")),
            str(m.get("incarnation", "-")), str(m.get("address") or "-"), is_ready,
            str(d.get("active_actors", "-")) if d else "-",
            _uptime(d.get("uptime_s")) if d else "-",
        ))
    _print_table(table)
    ring = reply.get("ring") or {}
    names = [str(m.get("name")) for m in members if isinstance(m.get("node"), dict)]
    click.echo("")
    if ring:
        click.echo("Ring balance (actors owned per member)")
        rtable: list[tuple[str, ...]] = [("Type", *names, "Total")]
        totals: dict[str, int] = {}
        for t, counts in ring.items():
            row = [int(counts.get(n, 0)) for n in names]
            totals[t] = sum(row)
            rtable.append((str(t), *(str(n) for n in row), str(totals[t])))
        _print_table(rtable)
        click.echo("")
        click.echo("Actors by type: " + ", ".join(f"{t} {n}" for t, n in totals.items()))
    else:
        click.echo("Ring balance: no active actors")
    if not_ready:
        click.echo("Readiness: " + " | ".join(not_ready))
    else:
        click.echo(f"Readiness: all {len(names)} reachable members ready")


# --------------------------------------------------------------------------------------------
# version, config


@main.command(short_help="Print versions.")
def version() -> None:
    """Print the spawnmesh, Python and trio versions."""
    import trio

    click.echo(f"spawnmesh {__version__}")
    click.echo(f"python {platform.python_version()} ({platform.python_implementation()})")
    click.echo(f"trio {trio.__version__}")


@main.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("show", short_help="Print the effective configuration.")
@_config_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
def config_show(config_file: str | None, sets: tuple[str, ...], as_json: bool) -> None:
    """Print the effective configuration (flags > env > file > defaults), secrets as ***."""
    cfg = _build_config(config_file, sets, {})
    view = redacted(cfg)
    if as_json:
        click.echo(json.dumps(view, indent=2))
    else:
        click.echo(to_toml(view), nl=False)


@config.command("docs", short_help="Print the settings reference (markdown).")
def config_docs() -> None:
    """Print the markdown reference of every setting (the source of docs/configuration.md)."""
    click.echo(render_docs_markdown(), nl=False)


@main.command(short_help="Generate a statestore or cluster key.")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
              help="Write the key to this file (mode 0600; refuses to overwrite).")
def keygen(out: str | None) -> None:
    """Print (or write) a new random 256-bit key as one ``id:base64key`` line, the format of
    ``statestore.key_file`` (append it to rotate: the last line is the newest)."""
    import base64
    import os

    from spawnmesh.statestore.crypto import derived_key_id

    key = os.urandom(32)
    line = f"{derived_key_id(key)}:{base64.b64encode(key).decode()}"
    if out is None:
        click.echo(line)
        return
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        _fail(f"{out} exists; not overwriting a key")
    except OSError as exc:
        _fail(f"error: cannot create {out}: {exc.strerror}", EXIT_USAGE)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(line + "\n")
    except OSError as exc:  # e.g. a full disk: leave no partial key behind
        os.unlink(out)
        _fail(f"cannot write {out}: {exc.strerror}")
    click.echo(f"wrote a new key to {out}", err=True)


# --------------------------------------------------------------------------------------------
# state, statestore: operate directly on the configured statestore (no node needed)


def _store_options(func: _F) -> _F:
    """``--config``, ``--set`` and ``--statestore``: the statestore ``run`` would use."""
    func = click.option(
        "--statestore", "statestore_url", metavar="URL",
        help="Statestore SQLAlchemy URL (default: the configured statestore.url).",
    )(func)
    return _config_options(func)


def _store_call(
    config_file: str | None,
    sets: tuple[str, ...],
    statestore_url: str | None,
    fn: Callable[[Any], Any],
) -> Any:
    """Open the configured SQL statestore (migrating it), run ``await fn(store)``, close it.

    Configuration errors exit 2; an unreachable store or a failed operation exits 1."""
    cfg = _build_config(config_file, sets, {"statestore.url": ("--statestore", statestore_url)})
    s = cfg.statestore
    if s.url.strip().lower().startswith("memory:"):
        _fail("error: the statestore is memory:// (nothing persists); pass --statestore URL or "
              "set statestore.url", EXIT_USAGE)
    import trio

    from spawnmesh.errors import SpawnmeshError
    from spawnmesh.statestore.factory import open_statestore

    try:
        store = open_statestore(s.url, key=s.key, key_file=s.key_file,
                                allow_plaintext=s.allow_plaintext, pool_size=1, node_id="cli",
                                history_keep=s.history_keep,
                                history_max_age_s=s.history_max_age_ms / 1000)
    except ConfigError as err:
        _config_error(err)

    async def go() -> Any:
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.aclose()

    try:
        return trio.run(go)
    except ConfigError as err:  # e.g. a SQLite file whose directory cannot be created
        _config_error(err)
    except SpawnmeshError as err:
        _fail(f"{err.code}: {err}")


def _echo_json(value: object) -> None:
    if sys.stdout.isatty():
        click.echo(json.dumps(value, indent=2, ensure_ascii=False))
    else:
        click.echo(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


def _state_json(blob: bytes) -> dict[str, object]:
    """A state blob as JSON: decoded msgpack when it is exactly one msgpack value that maps
    to JSON, else base64."""
    import base64

    import msgspec

    try:
        value = msgspec.msgpack.decode(blob)
        # through msgspec's JSON: bytes become base64 text; non-string keys fail
        return {"encoding": "msgpack", "state": msgspec.json.decode(msgspec.json.encode(value))}
    except (msgspec.DecodeError, TypeError, ValueError, OverflowError):
        return {"encoding": "base64", "state": base64.b64encode(blob).decode()}


def _record_json(st: Any) -> dict[str, object]:
    """A ``StoredState`` as JSON (the state decoded by ``_state_json``)."""
    out: dict[str, object] = {
        "system": st.key[0],
        "name": st.key[1],
        "revision": st.revision,
        "state_type": st.state_type,
        "parent": st.parent,
        "tags": dict(st.tags),
        "updated_ms": st.updated_ms,
    }
    out.update(_state_json(st.blob))
    return out


@main.group()
def state() -> None:
    """Read, restore or delete one actor's stored state (directly in the statestore)."""


@state.command("get", short_help="Print an actor's current stored state.")
@click.argument("system")
@click.argument("name")
@_store_options
def state_get(system: str, name: str, config_file: str | None, sets: tuple[str, ...],
              statestore_url: str | None) -> None:
    """Print the current stored state of actor NAME of SYSTEM as JSON (exit 1 if none)."""

    async def fn(store: Any) -> Any:
        return await store.load((system, name))

    st = _store_call(config_file, sets, statestore_url, fn)
    if st is None:
        _fail(f"not_found: no stored state for {system}/{name}")
    _echo_json(_record_json(st))


@state.command("history", short_help="Print an actor's kept past revisions.")
@click.argument("system")
@click.argument("name")
@_store_options
def state_history(system: str, name: str, config_file: str | None, sets: tuple[str, ...],
                  statestore_url: str | None) -> None:
    """Print the kept revisions of actor NAME of SYSTEM, oldest first, as a JSON list
    (empty unless the store keeps history: statestore history settings)."""

    async def fn(store: Any) -> Any:
        return await store.history((system, name))

    _echo_json([_record_json(st) for st in _store_call(config_file, sets, statestore_url, fn)])


@state.command("restore", short_help="Write a past revision back as the current state.")
@click.argument("system")
@click.argument("name")
@click.argument("revision", type=click.IntRange(min=1))
@_store_options
def state_restore(system: str, name: str, revision: int, config_file: str | None,
                  sets: tuple[str, ...], statestore_url: str | None) -> None:
    """Point-in-time restore: write REVISION of actor NAME from history as a new revision.

    Run it while the actor is not active (node stopped, or the actor passivated): an active
    activation keeps answering reads from its old in-memory state until its next write, which
    is fenced off; that turn is then retried on the restored state (write-through) or its
    changes are discarded (write-behind). See docs/statestores.md, History."""

    async def fn(store: Any) -> Any:
        return await store.restore((system, name), revision)

    new = _store_call(config_file, sets, statestore_url, fn)
    _echo_json({"system": system, "name": name, "restored": revision, "revision": new})


@state.command("delete", short_help="Delete an actor's stored state and history.")
@click.argument("system")
@click.argument("name")
@_store_options
def state_delete(system: str, name: str, config_file: str | None, sets: tuple[str, ...],
                 statestore_url: str | None) -> None:
    """Delete the stored state (and history) of actor NAME of SYSTEM; exit 1 if there was none.

    Run it while the actor is not active (node stopped, or the actor passivated): an active
    activation keeps answering reads from its old in-memory state until its next write, which
    is fenced off; that turn is then retried on a fresh initial state (write-through) or its
    changes are discarded (write-behind). See docs/statestores.md, History."""

    async def fn(store: Any) -> Any:
        return await store.delete((system, name))

    if not _store_call(config_file, sets, statestore_url, fn):
        _fail(f"not_found: no stored state for {system}/{name}")
    _echo_json({"system": system, "name": name, "deleted": True})


@main.group()
def statestore() -> None:
    """Maintain the statestore: schema migrations and key rotation."""


@statestore.command("migrate", short_help="Create or migrate the statestore schema.")
@_store_options
def statestore_migrate(config_file: str | None, sets: tuple[str, ...],
                       statestore_url: str | None) -> None:
    """Apply pending schema migrations (nodes also do this on start); print the versions."""

    async def fn(store: Any) -> Any:
        return store.schema_versions

    before, after = _store_call(config_file, sets, statestore_url, fn)
    _echo_json({"from_version": before, "to_version": after})


@statestore.command("rotate-key", short_help="Re-encrypt every row under the newest key.")
@_store_options
def statestore_rotate_key(config_file: str | None, sets: tuple[str, ...],
                          statestore_url: str | None) -> None:
    """Re-seal every state and history row and kept schedule not under the newest key (the
    last key of statestore.key / the last line of the key file); print {resealed, skipped,
    key_id}. Rows that open under none of the configured keys are left as they are, logged and
    counted in skipped, and the command exits 1: keep the old key until a run reports
    resealed 0 and skipped 0."""

    async def fn(store: Any) -> Any:
        n, skipped = await store.rotate_keys_counted()
        return n, skipped, store.key_id

    n, skipped, key_id = _store_call(config_file, sets, statestore_url, fn)
    _echo_json({"resealed": n, "skipped": skipped, "key_id": key_id})
    if skipped:
        _fail(f"state_corrupt: {skipped} row(s) open under none of the configured keys and were "
              "left as they are (see the log); do not drop a key they may need")


@statestore.command("schedules", short_help="List kept schedules (delayed casts) and their owners.")
@click.option("--owner", metavar="NODE", help="Only those kept by this node name.")
@click.option("--overdue", is_flag=True,
              help="Only those already due (a live owner fires them within moments).")
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True,
              help="At most this many, soonest due first.")
@_store_options
def statestore_schedules(owner: str | None, overdue: bool, limit: int, config_file: str | None,
                         sets: tuple[str, ...], statestore_url: str | None) -> None:
    """Print the kept schedules, soonest due first, as a JSON list: the target actor and
    action, the payload (decoded like state), the metadata, when it is due (``due_ms``, and
    ``late_ms`` once overdue) and the node that keeps and fires it (``owner``)."""
    from spawnmesh.clock import wall_ms

    now = wall_ms()

    async def fn(store: Any) -> Any:
        return await store.list_schedules(limit, owner=owner,
                                          due_before_ms=now if overdue else None)

    rows = []
    for sc in _store_call(config_file, sets, statestore_url, fn):
        row: dict[str, object] = {
            "id": sc.id, "system": sc.system, "actor": sc.actor, "parent": sc.parent,
            "action": sc.action, "owner": sc.owner, "due_ms": sc.due_ms,
            "late_ms": max(0, now - sc.due_ms), "metadata": dict(sc.metadata),
        }
        if sc.payload:
            payload = _state_json(sc.payload)
            row["encoding"], row["payload"] = payload["encoding"], payload["state"]
        else:
            row["encoding"], row["payload"] = "none", None
        rows.append(row)
    _echo_json(rows)


if __name__ == "__main__":  # pragma: no cover - `python -m spawnmesh.cli`
    main(prog_name="spawnmesh")
