"""A Spawn-protocol actor host in Python, as a Spawn SDK would be: a separate process speaking
Spawn's HTTP protocol, with messages generated from ``spec/spawn/`` by protoc (Google protobuf).

It imports nothing from spawnmesh. It serves ``POST /api/v1/actors/actions`` (one
``ActorInvocation`` in, one ``ActorInvocationResponse`` out, keep-alive), registers its actor
system with the proxy (``POST /api/v1/system``) and calls the proxy from inside actions
(``POST /api/v1/system/{system}/actors/{actor}/invoke``), like the SDKs do. For the tests it also
serves ``GET /debug/turns`` (every turn it received, as JSON, with the connection it came on
and its place there), ``POST /debug/reset`` (forget them),
``POST /debug/register?proxy=host:port&variant=v2&host_address=1&extra=tck`` (register, again or
with another proxy), ``POST /debug/drop-idle`` (close every keep-alive connection waiting for
its next request, as a server's idle timeout does) and ``POST /echo`` (the body back: the
benchmark's raw round trip).

    python tests/spawn_host.py --proxy 127.0.0.1:9001 --port 8090 [--system spawn-tck]
        [--host-address] [--variant base|v2]

It prints ``READY <port> <registration outcome>`` once its server listens and the proxy accepted
the registration (with ``--proxy ''`` at once: it registers when told to).

The actor system (default name ``spawn-tck``); states are ``Count`` values under the custom type
URL ``type.googleapis.com/spawntck.Count`` (an Int64Value's bytes: the proxy cannot know the type
and must keep it byte for byte)::

    counter  NAMED stateful, registered state Count(5), tags {origin: registered}; actions init
             (n += 100, tag inited), add, whoami, fail, effect, broadcast, pipe, forward,
             checkpoint, call, slow
    echo     NAMED stateless: echo(Int64Value v) -> Int64Value(v + 1); whoami
    sink     NAMED stateful, channel "news" -> heard; add, heard (n += v, tag last_meta)
    ticker   NAMED stateful, timer tick every 100 ms (n += 1)
    cart     UNNAMED stateful: add (n += v, checkpoint), whoami
    bench    UNNAMED stateful: add (n += v), for bench/spawn_http.py
    pool     POOLED (2): work -> JSON {name, parent}
    custom   NAMED stateful, registers "get" itself (answers StringValue "host-get")
    log      NAMED stateful: append(StringValue s) -> state text + s
    late     (variant v2 only) NAMED stateless: hello -> StringValue "late"

The extra system (``extra=NAME``; no timers, so its connections carry only the turns asked)::

    spawnee  NAMED stateless: whoami -> the payload back
    dropper  NAMED stateless: vanish (the turn is logged, then the connection is closed
             without an answer: a host that crashed in the middle of a turn)
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h11
import trio
from google.protobuf.message import DecodeError

SPEC = Path(__file__).resolve().parents[1] / "spec"
COUNT_URL = "type.googleapis.com/spawntck.Count"
LOG_URL = "type.googleapis.com/spawntck.Log"
INT_URL = "type.googleapis.com/google.protobuf.Int64Value"
STR_URL = "type.googleapis.com/google.protobuf.StringValue"
JSON_URL = "type.googleapis.com/spawn.JSONType"


# ---------------------------------------------------------------------------- protos


def load_protos() -> SimpleNamespace:
    """Generate (once per spec change) and import Spawn's messages from spec/spawn/."""
    out = Path(
        os.environ.get("SPAWN_HOST_PROTOS")
        or Path(tempfile.gettempdir()) / f"spawn-host-protos-{os.getuid()}"
    )
    protos = sorted(SPEC.glob("spawn/actors/*.proto"))
    marker = out / "spawn" / "actors" / "protocol_pb2.py"
    newest = max(p.stat().st_mtime for p in protos)
    if not marker.exists() or marker.stat().st_mtime < newest:
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{SPEC}",
                f"--python_out={out}",
                *(str(p.relative_to(SPEC)) for p in protos),
            ],
            check=True,
            cwd=SPEC,
        )
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    from google.protobuf import wrappers_pb2

    return SimpleNamespace(
        actor=importlib.import_module("spawn.actors.actor_pb2"),
        protocol=importlib.import_module("spawn.actors.protocol_pb2"),
        wrappers=wrappers_pb2,
    )


P = load_protos()
pa, pp, wr = P.actor, P.protocol, P.wrappers


def count(n: int) -> tuple[str, bytes]:
    return COUNT_URL, wr.Int64Value(value=n).SerializeToString()


def int_of(url_value: Any) -> int:
    """The count in an Any (0 if it holds none: the checkpoint action stores any bytes)."""
    try:
        return int(wr.Int64Value.FromString(url_value.value).value)
    except DecodeError:
        return 0


def set_any(field: Any, url: str, value: bytes) -> None:
    field.type_url = url
    field.value = value


# ---------------------------------------------------------------------------- client


class Client:
    """A keep-alive HTTP/1.1 client for the proxy (one connection per concurrent call)."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port, self.address = host, int(port), address
        self.idle: list[tuple[trio.SocketStream, h11.Connection]] = []

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.idle:
            stream, conn = self.idle.pop()
        else:
            stream = await trio.open_tcp_stream(self.host, self.port)
            conn = h11.Connection(h11.CLIENT)
        ok = False
        try:
            head = h11.Request(
                method="POST",
                target=path,
                headers=[
                    ("host", self.address),
                    ("content-type", "application/octet-stream"),
                    ("content-length", str(len(body))),
                ],
            )
            await stream.send_all(
                conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            )
            status, chunks = 0, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("proxy closed the connection")
            conn.start_next_cycle()
            ok = True
            return status, b"".join(chunks)
        finally:
            if ok:
                self.idle.append((stream, conn))
            else:
                await trio.aclose_forcefully(stream)


# ---------------------------------------------------------------------------- the actors


class Host:
    """The actor system's behaviour; one turn in, one response out."""

    def __init__(self, system: str, proxy: Client, variant: str) -> None:
        self.system = system
        self.proxy = proxy
        self.variant = variant
        self.turns: list[dict[str, Any]] = []
        self.log = True
        """Keep a log of the turns (off for the benchmark)."""

    def registration(self, host_address: str, system: str = "") -> bytes:
        """The RegistrationRequest of this host's system (or, with ``system``, of a small
        extra system: ``spawnee``, to be called by other hosts' actors, and ``dropper``)."""
        req = pp.RegistrationRequest()
        si = req.service_info
        si.service_name = system or self.system
        si.service_version = "1.0"
        si.service_runtime = f"python {sys.version.split()[0]}"
        si.support_library_name = "spawn-test-host"
        si.support_library_version = "1.0"
        si.protocol_major_version = 1
        si.protocol_minor_version = 2
        req.actor_system.name = system or self.system
        if host_address:
            req.host_address = host_address
        actors = req.actor_system.registry.actors

        def actor(
            name: str,
            actions: list[str],
            *,
            kind: int = pa.NAMED,
            stateful: bool = True,
            **extra: Any,
        ) -> Any:
            a = actors[name]
            a.id.name = name
            a.id.system = system or self.system
            a.settings.kind = kind
            a.settings.stateful = stateful
            a.settings.snapshot_strategy.timeout.timeout = extra.get("snapshot_ms", 60_000)
            a.settings.deactivation_strategy.timeout.timeout = extra.get("deactivate_ms", 60_000)
            if extra.get("pool"):
                a.settings.max_pool_size = extra["pool"]
            for n in actions:
                a.actions.add().name = n
            for topic, action in extra.get("channels", []):
                ch = a.metadata.channel_group.add()
                ch.topic = topic
                ch.action = action
            for every_ms, action in extra.get("timers", []):
                t = a.timer_actions.add()
                t.seconds = every_ms
                t.action.name = action
            a.metadata.tags.update(extra.get("tags", {}))
            return a

        if system:
            actor("spawnee", ["whoami"], stateful=False)
            actor("dropper", ["vanish"], stateful=False)
            return req.SerializeToString()
        c = actor(
            "counter",
            [
                "init",
                "add",
                "whoami",
                "fail",
                "effect",
                "broadcast",
                "pipe",
                "forward",
                "checkpoint",
                "call",
                "slow",
            ],
            tags={"suite": "spawn"},
        )
        set_any(c.state.state, *count(5))
        c.state.tags["origin"] = "registered"
        actor("echo", ["echo", "whoami"], stateful=False)
        actor("sink", ["add", "heard"], channels=[("news", "heard")])
        actor("ticker", [], timers=[(100, "tick")])
        actor("cart", ["add", "whoami"], kind=pa.UNNAMED)
        actor("bench", ["add"], kind=pa.UNNAMED)
        actor("pool", ["work"], kind=pa.POOLED, stateful=False, pool=2)
        actor("custom", ["get"])
        actor("log", ["append"])
        if self.variant == "v2":
            actor("late", ["hello"], stateful=False)
        return req.SerializeToString()

    async def turn(self, body: bytes, where: tuple[int, int] = (0, 0)) -> tuple[int, bytes]:
        """Run one turn; ``where`` is (connection number, request number on it), logged."""
        inv = pp.ActorInvocation.FromString(body)
        ctx = inv.current_context
        who = inv.actor.parent or inv.actor.name.split("#")[0]
        if self.log:
            self.log_turn(inv, where)
        if inv.action_name == "vanish":
            raise Vanish
        if inv.action_name == "fail":
            return 500, b"boom: failed on purpose"
        resp = pp.ActorInvocationResponse(actor_name=inv.actor.name, actor_system=inv.actor.system)
        uc = resp.updated_context
        uc.CopyFrom(ctx)  # SDKs send the context back; state and tags changed below
        method = getattr(self, f"a_{who}", None)
        if method is None:
            self.json(resp, {"unknown": f"{who}.{inv.action_name}"})
        else:
            try:
                await method(inv, resp)
            except Exception as exc:  # an SDK answers a failed action with an HTTP error
                return 500, f"{type(exc).__name__}: {exc}".encode()
        return 200, resp.SerializeToString()

    def log_turn(self, inv: Any, where: tuple[int, int] = (0, 0)) -> None:
        """Remember what the turn carried (GET /debug/turns)."""
        ctx = inv.current_context
        self.turns.append(
            {
                "actor": inv.actor.name,
                "parent": inv.actor.parent,
                "system": inv.actor.system,
                "action": inv.action_name,
                "caller": f"{inv.caller.system}/{inv.caller.name}"
                if inv.HasField("caller")
                else "",
                "metadata": dict(ctx.metadata),
                "tags": dict(ctx.tags),
                "state": [ctx.state.type_url, base64.b64encode(ctx.state.value).decode()]
                if ctx.HasField("state")
                else None,
                "payload": inv.WhichOneof("payload") or "",
                "conn": where[0],
                "nth": where[1],
            }
        )

    @staticmethod
    def json(resp: Any, value: object) -> None:
        set_any(
            resp.value,
            JSON_URL,
            pp.JSONType(content=json.dumps(value, sort_keys=True)).SerializeToString(),
        )

    def whoami(self, inv: Any, resp: Any) -> None:
        ctx = inv.current_context
        self.json(
            resp,
            {
                "self": [ctx.self.system, ctx.self.name, ctx.self.parent],
                "caller": [ctx.caller.system, ctx.caller.name] if ctx.HasField("caller") else None,
                "metadata": dict(ctx.metadata),
                "tags": dict(ctx.tags),
                "state": [ctx.state.type_url, base64.b64encode(ctx.state.value).decode()]
                if ctx.HasField("state")
                else None,
            },
        )

    async def a_counter(self, inv: Any, resp: Any) -> None:
        a = inv.action_name
        st = inv.current_context.state
        uc = resp.updated_context
        n = int_of(st)
        arg = int_of(inv.value) if inv.WhichOneof("payload") == "value" else 0
        if a == "init":
            set_any(uc.state, *count(n + 100))
            uc.tags["inited"] = "yes"
            resp.noop.SetInParent()
        elif a == "add":
            set_any(uc.state, *count(n + arg))
            set_any(resp.value, *count(n + arg))
        elif a == "whoami":
            self.whoami(inv, resp)
        elif a == "effect":
            eff = resp.workflow.effects.add().request
            eff.system.name = self.system
            eff.actor.id.name = "sink"
            eff.actor.id.system = self.system
            eff.action_name = "add"
            set_any(eff.value, INT_URL, wr.Int64Value(value=arg).SerializeToString())
            eff.metadata["effect"] = "1"
            set_any(resp.value, *count(n))
        elif a == "broadcast":
            resp.workflow.broadcast.channel_group = "news"
            set_any(
                resp.workflow.broadcast.value, INT_URL, wr.Int64Value(value=arg).SerializeToString()
            )
            set_any(resp.value, *count(n))
        elif a == "pipe":
            set_any(resp.value, INT_URL, wr.Int64Value(value=arg * 10).SerializeToString())
            resp.workflow.pipe.actor = "echo"
            resp.workflow.pipe.action_name = "echo"
        elif a == "forward":
            resp.noop.SetInParent()
            resp.workflow.forward.actor = "echo"
            resp.workflow.forward.action_name = "echo"
        elif a == "checkpoint":  # the payload, verbatim, becomes the state
            uc.state.CopyFrom(inv.value)
            resp.checkpoint = True
            resp.value.CopyFrom(inv.value)
        elif a == "slow":
            await trio.sleep(arg / 1000)
            set_any(resp.value, INT_URL, wr.Int64Value(value=arg).SerializeToString())
        elif a == "call":  # "system/actor.action" with the given Any, made as this actor
            spec = json.loads(pp.JSONType.FromString(inv.value.value).content)
            req = pp.InvocationRequest()
            req.system.name = spec["system"]
            req.actor.id.name = spec["actor"]
            req.actor.id.system = spec["system"]
            req.action_name = spec["action"]
            req.caller.CopyFrom(inv.actor)
            set_any(req.value, spec["type_url"], base64.b64decode(spec["value"]))
            status, body = await self.proxy.post(
                f"/api/v1/system/{spec['system']}/actors/{spec['actor']}/invoke",
                req.SerializeToString(),
            )
            out = pp.InvocationResponse.FromString(body)
            if out.status.status != pp.OK:
                self.json(resp, {"error": out.status.message, "http": status})
            else:
                resp.value.CopyFrom(out.value)

    async def a_echo(self, inv: Any, resp: Any) -> None:
        if inv.action_name == "whoami":
            self.whoami(inv, resp)
        elif inv.value.type_url == INT_URL:
            set_any(
                resp.value, INT_URL, wr.Int64Value(value=int_of(inv.value) + 1).SerializeToString()
            )
        else:
            resp.value.CopyFrom(inv.value)

    async def a_sink(self, inv: Any, resp: Any) -> None:
        uc = resp.updated_context
        n = int_of(inv.current_context.state) + int_of(inv.value)
        set_any(uc.state, *count(n))
        uc.tags["last"] = inv.action_name
        uc.tags["last_meta"] = json.dumps(dict(inv.current_context.metadata), sort_keys=True)
        set_any(resp.value, *count(n))

    async def a_ticker(self, inv: Any, resp: Any) -> None:
        set_any(resp.updated_context.state, *count(int_of(inv.current_context.state) + 1))
        resp.noop.SetInParent()

    async def a_cart(self, inv: Any, resp: Any) -> None:
        if inv.action_name == "whoami":
            self.whoami(inv, resp)
            return
        n = int_of(inv.current_context.state) + int_of(inv.value)
        set_any(resp.updated_context.state, *count(n))
        set_any(resp.value, *count(n))
        resp.checkpoint = True

    async def a_bench(self, inv: Any, resp: Any) -> None:
        n = int_of(inv.current_context.state) + int_of(inv.value)
        set_any(resp.updated_context.state, *count(n))
        set_any(resp.value, *count(n))

    async def a_pool(self, inv: Any, resp: Any) -> None:
        self.json(resp, {"name": inv.actor.name, "parent": inv.actor.parent})

    async def a_custom(self, inv: Any, resp: Any) -> None:
        set_any(
            resp.value, STR_URL, wr.StringValue(value=f"host-{inv.action_name}").SerializeToString()
        )

    async def a_log(self, inv: Any, resp: Any) -> None:
        st = inv.current_context.state
        old = wr.StringValue.FromString(st.value).value if st.value else ""
        text = old + wr.StringValue.FromString(inv.value.value).value
        set_any(resp.updated_context.state, LOG_URL, wr.StringValue(value=text).SerializeToString())
        resp.noop.SetInParent()

    async def a_spawnee(self, inv: Any, resp: Any) -> None:
        resp.value.CopyFrom(inv.value)  # the caller's own message back, untouched

    async def a_late(self, inv: Any, resp: Any) -> None:
        set_any(resp.value, STR_URL, wr.StringValue(value="late").SerializeToString())


# ---------------------------------------------------------------------------- the server


class Vanish(Exception):
    """The turn's connection is to be closed without an answer."""


IDLE: set[trio.SocketStream] = set()
"""Keep-alive connections waiting for their next request, with no byte of it yet."""
_CONNECTIONS = [0]


async def drop_idle() -> int:
    """Close the idle keep-alive connections (a server's idle timeout); how many."""
    idle = list(IDLE)
    IDLE.clear()
    for stream in idle:
        await trio.aclose_forcefully(stream)
    return len(idle)


async def serve_connection(stream: trio.SocketStream, host: Host, register: Any) -> None:
    conn = h11.Connection(h11.SERVER)
    _CONNECTIONS[0] += 1
    number, nth = _CONNECTIONS[0], 0
    try:
        while True:
            request = None
            chunks: list[bytes] = []
            nth += 1
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if request is None and not conn.trailing_data[0]:
                        IDLE.add(stream)
                    try:
                        data = await stream.receive_some(65536)
                    finally:
                        IDLE.discard(stream)
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return  # closed
            assert request is not None
            body = b"".join(chunks)
            target = request.target.decode()
            ctype = "application/octet-stream"
            if target == "/api/v1/actors/actions":
                try:
                    status, out = await host.turn(body, (number, nth))
                except Vanish:
                    return  # closed (FIN) without an answer
            elif target == "/debug/drop-idle":
                status, out = 200, str(await drop_idle()).encode()
            elif target == "/echo":
                status, out = 200, body
            elif target == "/debug/turns":
                status, out, ctype = 200, json.dumps(host.turns).encode(), "application/json"
            elif target.startswith("/debug/register"):
                query = dict(q.split("=", 1) for q in target.partition("?")[2].split("&") if q)
                outcome = await register(query)
                status, out, ctype = 200, json.dumps(outcome).encode(), "application/json"
            elif target == "/debug/reset":
                host.turns.clear()
                status, out = 200, b""
            else:
                status, out = 404, b"not found"
            data = conn.send(
                h11.Response(
                    status_code=status,
                    headers=[("content-type", ctype), ("content-length", str(len(out)))],
                )
            )
            data += conn.send(h11.Data(data=out)) + conn.send(h11.EndOfMessage())
            await stream.send_all(data)
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--proxy",
        default=f"127.0.0.1:{os.environ.get('PROXY_HTTP_PORT', 9001)}",
        help="the proxy to register with at start ('' : wait for /debug/register?proxy=host:port)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("USER_FUNCTION_PORT", 8090)))
    parser.add_argument("--system", default="spawn-tck")
    parser.add_argument(
        "--host-address",
        action="store_true",
        help="name this host's address in the registration (spawnmesh extension)",
    )
    parser.add_argument("--variant", default="base")
    parser.add_argument("--no-log", action="store_true", help="keep no turn log (benchmark)")
    args = parser.parse_args()
    proxy = Client(args.proxy or "127.0.0.1:9001")
    host = Host(args.system, proxy, args.variant)
    host.log = not args.no_log
    listeners = await trio.open_tcp_listeners(args.port, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def register(query: dict[str, str]) -> dict[str, object]:
        """Register with a proxy (``proxy``, ``variant``, ``host_address``, ``extra``: also
        register the extra system of that name)."""
        if "proxy" in query:
            host.proxy = Client(query["proxy"])
        host.variant = query.get("variant", host.variant)
        address = f"127.0.0.1:{port}" if query.get("host_address", "") == "1" else ""
        status, out = await host.proxy.post("/api/v1/system", host.registration(address))
        resp = pp.RegistrationResponse.FromString(out)
        outcome: dict[str, object] = {
            "http": status,
            "status": pp.Status.Name(resp.status.status),
            "message": resp.status.message,
            "proxy": resp.proxy_info.proxy_name,
            "protocol": [
                resp.proxy_info.protocol_major_version,
                resp.proxy_info.protocol_minor_version,
            ],
        }
        if query.get("extra") and status == 200:
            status, out = await host.proxy.post(
                "/api/v1/system", host.registration(address, query["extra"])
            )
            outcome["extra"] = pp.Status.Name(pp.RegistrationResponse.FromString(out).status.status)
        return outcome

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            trio.serve_listeners, lambda s: serve_connection(s, host, register), listeners
        )
        outcome: dict[str, object] = {}
        if args.proxy:
            outcome = await register(
                {"variant": args.variant, "host_address": "1" if args.host_address else ""}
            )
            if outcome["status"] != "OK":
                print(f"REFUSED {json.dumps(outcome)}", flush=True)
                sys.exit(2)
        print(f"READY {port} {json.dumps(outcome)}", flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        trio.run(main)
    except* KeyboardInterrupt:
        pass
