"""Host API semantics with real host processes on loopback: a crashed host fails its actors
fast (in-flight turns too) and serves again after it re-registers, with its state; cancellation
from a gRPC caller reaches the host; tokens and mutual TLS; registration refusals."""

from __future__ import annotations

import datetime
import os
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpclib.client
import pytest
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from spawnmesh.config import load_config
from spawnmesh.errors import CallCycle, HostUnavailable
from spawnmesh.host.bridge import Bridge, open_bridge
from spawnmesh.host.convert import from_any, to_any
from spawnmesh.host.gen import spawn
from spawnmesh.host.gen.spawn import actors as pb
from spawnmesh.host.gen.spawnmesh import v1
from spawnmesh.host.gen.spawnmesh.tck.v1 import Value
from spawnmesh.host.status import RichStatusCodec
from spawnmesh.node import open_node
from spawnmesh.testing.host_conformance import open_host_harness, wait_until

ROOT = Path(__file__).resolve().parents[1]
HOST = [sys.executable, str(ROOT / "examples/hosts/grpclib_host.py")]

pytestmark = pytest.mark.slow


@asynccontextmanager
async def node_client(
    port: int, *, token: str = "", ssl_ctx: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[Bridge, v1.NodeServiceStub]]:
    """A grpclib NodeService client (on an asyncio bridge) for calls from the test."""
    async with open_bridge("thread") as bridge:

        async def make() -> grpclib.client.Channel:
            return grpclib.client.Channel(
                "127.0.0.1", port, ssl=ssl_ctx, status_details_codec=RichStatusCodec()
            )

        channel = await bridge.to_aio(make)
        md = {"authorization": f"Bearer {token}"} if token else None
        try:
            yield bridge, v1.NodeServiceStub(channel, metadata=md)
        finally:
            bridge.aio_soon(channel.close)


def invocation(
    name: str, action: str, value: Any = None, system: str = "tck"
) -> spawn.InvocationRequest:
    req = spawn.InvocationRequest(
        system=pb.ActorSystem(name=system),
        action_name=action,
        actor=pb.Actor(id=pb.ActorId(name=name, system=system)),
    )
    if value is None:
        req.noop = spawn.Noop()
    else:
        req.value = to_any(value)
    return req


async def test_a_crashed_host_fails_fast_and_serves_again_after_reregistering() -> None:
    async with open_host_harness(HOST) as h:
        c = h.ref("counter")
        assert from_any(await c.invoke("add", Value(n=5)), Value).n == 5
        outcome: list[BaseException] = []

        async def slow_call() -> None:
            try:
                await c.invoke("slow", Value(n=20_000))
            except HostUnavailable as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_call)
            await wait_until(
                lambda: h.node.host_api.hosts.systems["tck"].sessions[0].load(),
                "the slow turn to reach the host",
            )
            t0 = trio.current_time()
            h.process.kill()  # SIGKILL: no goodbye
        assert outcome and "in flight" in str(outcome[0]), outcome
        assert trio.current_time() - t0 < 5, "the in-flight turn did not fail fast"
        t1 = trio.current_time()
        with pytest.raises(HostUnavailable):
            await c.invoke("add", Value(n=1))
        with pytest.raises(HostUnavailable):
            await h.ref("cart-x", parent="cart").invoke("checkout")
        assert trio.current_time() - t1 < 1.0
        again = await trio.lowlevel.open_process(
            HOST, env={**os.environ, "SPAWNMESH_NODE_ADDRESS": f"127.0.0.1:{h.node.host_api.port}"}
        )
        try:
            await wait_until(h.attached, "the restarted host to register again")
            assert from_any(await c.invoke("add", Value(n=1)), Value).n == 6  # state kept
        finally:
            again.kill()
            await again.wait()


async def test_cancelling_a_grpc_call_cancels_the_turn_on_the_host() -> None:
    async with open_host_harness(HOST) as h, node_client(h.node.host_api.port) as (bridge, stub):

        async def call_then_cancel() -> str:
            import asyncio

            task = asyncio.ensure_future(
                stub.invoke(invocation("counter", "slow", Value(n=20_000)))
            )
            await asyncio.sleep(0.3)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return "cancelled"
            return "finished"

        assert await bridge.to_aio(call_then_cancel) == "cancelled"
        with trio.fail_after(3):  # the actor is free again: its turn was cancelled
            assert from_any(await h.ref("counter").invoke("add", Value(n=1)), Value).n >= 1
        hs = h.node.host_api.hosts.systems["tck"]
        await wait_until(lambda: hs.sessions[0].load() == 0, "no turn left on the host")


async def test_a_grpc_deadline_bounds_the_turn() -> None:
    async with open_host_harness(HOST) as h, node_client(h.node.host_api.port) as (bridge, stub):

        async def call() -> Status:
            try:
                await stub.invoke(invocation("counter", "slow", Value(n=20_000)), timeout=0.3)
            except GRPCError as exc:
                return exc.status
            except TimeoutError:  # grpclib's own client-side deadline
                return Status.DEADLINE_EXCEEDED
            return Status.OK

        t0 = trio.current_time()
        assert await bridge.to_aio(call) is Status.DEADLINE_EXCEEDED
        assert trio.current_time() - t0 < 3
        with trio.fail_after(3):
            await h.ref("counter").invoke("add", Value(n=1))


async def test_token_is_required_when_configured() -> None:
    overrides = {"host.token": "s3cret"}
    async with open_host_harness(HOST, overrides=overrides) as h:  # the host sends the token
        port = h.node.host_api.port
        for token in ("", "wrong"):
            async with node_client(port, token=token) as (bridge, stub):
                with pytest.raises(GRPCError) as info:
                    await bridge.to_aio(stub.invoke, invocation("echo", "echo", Value(n=1)))
                assert info.value.status is Status.UNAUTHENTICATED
        async with node_client(port, token="s3cret") as (bridge, stub):
            resp = await bridge.to_aio(stub.invoke, invocation("echo", "echo", Value(n=1)))
            assert from_any(resp.value, Value) == Value(n=1, text="echo:")
        wrong = await trio.run_process(
            [*HOST, "--node", f"127.0.0.1:{port}", "--token", "x"], capture_stdout=True, check=False
        )
        assert wrong.returncode == 2 and b"UNAUTHENTICATED" in wrong.stdout


async def test_registration_refusals() -> None:
    cfg = load_config(
        env={},
        overrides={
            "statestore.url": "memory://",
            "ops.port": 0,
            "cluster.enabled": False,
            "host.enabled": True,
            "host.port": 0,
            "host.transport": "stream",
        },
    )
    from spawnmesh.testing.host_conformance import relay_system

    async with open_node(cfg, relay_system) as node, node_client(node.host_api.port) as (b, stub):

        async def register(req: spawn.RegistrationRequest) -> GRPCError:
            with pytest.raises(GRPCError) as info:
                await b.to_aio(stub.register, req)
            return info.value

        def system(name: str, actor: str, **kw: Any) -> spawn.RegistrationRequest:
            return spawn.RegistrationRequest(
                actor_system=pb.ActorSystem(
                    name=name,
                    registry=pb.Registry(actors={actor: pb.Actor(actions=[pb.Action(name="a")])}),
                ),
                **kw,
            )

        err = await register(
            spawn.RegistrationRequest(
                service_info=spawn.ServiceInfo(protocol_major_version=2),
                actor_system=system("x", "y").actor_system,
            )
        )
        assert err.status is Status.FAILED_PRECONDITION and "speaks 1.0" in (err.message or "")
        err = await register(system("x", "y", host_address="127.0.0.1:1"))
        assert err.status is Status.INVALID_ARGUMENT and "host.transport" in (err.message or "")
        err = await register(system("tck-sdk", "relay"))
        assert err.status is Status.INVALID_ARGUMENT and "already defined" in (err.message or "")
        ok = await b.to_aio(stub.register, system("x", "y"))
        assert ok.proxy_info is not None and ok.proxy_info.protocol_major_version == 1
        with pytest.raises(HostUnavailable):  # registered, but no stream is attached
            await node.ref("x", "y").invoke("a")


def _certs(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def make(cn: str, issuer: Any, issuer_key: Any, ca: bool, san: Any = None) -> Any:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(issuer or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san is not None:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = b.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    ca_key, ca = make("test-ca", None, None, True)
    out: dict[str, Path] = {}

    def write(name: str, key: Any, cert: Any) -> None:
        out[name + ".key"] = tmp / f"{name}.key"
        out[name + ".crt"] = tmp / f"{name}.crt"
        out[name + ".key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        out[name + ".crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    write("ca", ca_key, ca)
    write(
        "server",
        *make(
            "server", ca.subject, ca_key, False, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        ),
    )
    write("client", *make("client", ca.subject, ca_key, False))
    return out


async def test_mutual_tls(tmp_path: Path) -> None:
    c = _certs(tmp_path)
    cfg = load_config(
        env={},
        overrides={
            "statestore.url": "memory://",
            "ops.port": 0,
            "cluster.enabled": False,
            "host.enabled": True,
            "host.port": 0,
            "host.tls_cert_file": str(c["server.crt"]),
            "host.tls_key_file": str(c["server.key"]),
            "host.tls_client_ca_file": str(c["ca.crt"]),
        },
    )

    def client_ctx(with_cert: bool) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(c["ca.crt"]))
        if with_cert:
            ctx.load_cert_chain(str(c["client.crt"]), str(c["client.key"]))
        ctx.set_alpn_protocols(["h2"])
        return ctx

    req = spawn.RegistrationRequest(
        actor_system=pb.ActorSystem(
            name="tls", registry=pb.Registry(actors={"a": pb.Actor(actions=[pb.Action(name="a")])})
        )
    )
    async with open_node(cfg) as node:
        port = node.host_api.port
        async with node_client(port, ssl_ctx=client_ctx(True)) as (bridge, stub):
            resp = await bridge.to_aio(stub.register, req)
            assert resp.status is not None and resp.status.status == spawn.Status.OK
        async with node_client(port, ssl_ctx=client_ctx(False)) as (bridge, stub):
            with pytest.raises((OSError, GRPCError, StreamTerminatedError)):
                with trio.fail_after(10):
                    await bridge.to_aio(lambda: stub.register(req, timeout=5))


async def test_a_host_turn_calls_other_actors_as_their_caller() -> None:
    """A host's nested Invoke naming the actor whose turn is running joins that turn's call
    chain: it works, and calling back into the running actor is a CallCycle, not a deadlock."""
    async with open_host_harness(HOST) as h:
        c = h.ref("counter")
        got = from_any(await c.invoke("call", Value(n=3, text="echo")), Value)
        assert got == Value(n=3, text="echo:nested")
        t0 = trio.current_time()
        with pytest.raises(CallCycle) as info:
            await c.invoke("call", Value(text="counter"))
        assert trio.current_time() - t0 < 5
        assert "tck/counter -> tck/counter" in str(info.value)
