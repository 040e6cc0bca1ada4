"""Spawn-registered actors across a cluster: two embedded nodes on loopback (real gossip, real
peer wire) sharing one encrypted SQLite statestore, each with its own Spawn-protocol host
process (Spawn's sidecar model: every node's host registers the same system).

Actors are placed over both nodes and each turn runs on its owner's host; a call entering
either node reaches the owner with its ``Any`` payload and reply byte for byte; state persists
sealed; SDK actors call Spawn actors across nodes and are called by them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from google.protobuf import wrappers_pb2 as wr

from spawnmesh import ActorSystem, Context, Node, action, open_node
from spawnmesh.keyring import Keyring
from spawnmesh.spawn_compat.values import RawAny
from spawnmesh.statestore.sql import SqlStateStore
from tests.conftest import test_config
from tests.test_spawn_proxy import (
    COUNT_URL,
    INT_URL,
    JSON_URL,
    SYSTEM,
    HostProc,
    Proxy,
    count,
    i64,
    json_of,
    json_parts,
    start_host,
    stop_host,
)
from tests.test_statestore_sql import KEY1, _db_files

pytestmark = pytest.mark.slow

sdk = ActorSystem("sdk")


@sdk.actor("greeter", stateful=False)
class Greeter:
    @action
    async def hello(self, ctx: Context[None], who: dict[str, Any]) -> dict[str, Any]:
        return {"hello": who.get("name"), "node": ctx.node_id}


@sdk.actor("asker", stateful=False)
class Asker:
    @action
    async def ask(self, ctx: Context[None], n: int) -> int:
        """Adds ``n`` to the Spawn counter (wherever it lives); its new count back."""
        payload = RawAny(type_url=INT_URL, value=wr.Int64Value(value=n).SerializeToString())
        reply = await ctx.ref("counter", system=SYSTEM).invoke("add", payload)
        assert isinstance(reply, RawAny) and reply.type_url == COUNT_URL
        return int(wr.Int64Value.FromString(reply.value).value)


@asynccontextmanager
async def spawn_cluster(tmp_path: Path) -> AsyncIterator[list[tuple[Node, Proxy, HostProc]]]:
    """Two clustered nodes, each with the Spawn API and its own registered host process."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    hosts = [start_host("--proxy", "", "--port", "0") for _ in range(2)]
    try:
        async with AsyncExitStack() as stack:
            out: list[tuple[Node, Proxy, HostProc]] = []
            seeds = ""
            for i, host in enumerate(hosts):
                store = SqlStateStore(url, keyring=Keyring.parse(KEY1), pool_size=2)
                cfg = test_config(
                    name=f"n{i}",
                    **{
                        "cluster.seeds": seeds,
                        "cluster.preset": "local",
                        "actors.default_timeout_ms": 10_000,
                        "spawn.enabled": True,
                        "spawn.port": 0,
                        "spawn.user_function_port": host.port,
                    },
                )
                node = await stack.enter_async_context(open_node(cfg, sdk, store=store))
                assert node.membership is not None
                seeds = seeds or f"127.0.0.1:{node.membership.addr[1]}"
                proxy = Proxy(node, node.spawn_proxy.port)
                stack.callback(proxy.pool.close)
                outcome = await host.register(proxy.port)
                assert outcome["status"] == "OK", outcome
                out.append((node, proxy, host))
            await converged([n for n, _, _ in out], f"{SYSTEM}/cart")
            yield out
    finally:
        for host in hosts:
            stop_host(host)


async def converged(nodes: list[Node], actor_type: str, timeout_s: float = 15.0) -> None:
    """Until every node's placement puts ``actor_type`` on all of them."""
    want = {n.name for n in nodes}

    def spread() -> bool:
        return all(
            n.router is not None and set(n.router.placement.members(actor_type)) == want
            for n in nodes
        )

    with trio.fail_after(timeout_s):
        while not spread():  # noqa: ASYNC110 (placement has no event to wait on)
            await trio.sleep(0.02)


def owner(nodes: list[Node], name: str) -> int:
    """Index of the node that owns Spawn actor ``name`` (an instance of cart)."""
    found = [i for i, n in enumerate(nodes) if n.runtime.owns((SYSTEM, name))]
    assert len(found) == 1, found
    return found[0]


async def test_spawn_actors_are_placed_persisted_and_invoked_across_the_cluster(
    tmp_path: Path,
) -> None:
    async with spawn_cluster(tmp_path) as members:
        nodes = [m[0] for m in members]
        (_, pa, ha), (_, pb_, hb) = members[0][:3], members[1][:3]
        names = [f"c{i}" for i in range(12)]
        await pa.spawn(*names, parent="cart")
        for i, name in enumerate(names):  # every call enters through node 0
            assert await pa.value(name, "add", i64(i + 1)) == count(i + 1)
        owners = {name: owner(nodes, name) for name in names}
        assert set(owners.values()) == {0, 1}, owners  # placed over both nodes
        # each turn ran on its owner's host, and only there
        for idx, host in enumerate((ha, hb)):
            ran = {t["actor"] for t in await host.turns() if t["parent"] == "cart"}
            assert ran == {n for n, o in owners.items() if o == idx}
        # through the other node too, the Any arrives and returns byte for byte
        remote = next(n for n, o in owners.items() if o == 1)
        odd = (COUNT_URL, b"\x08\x07\xfa\x01\x03abc")
        odd_b64 = base64.b64encode(odd[1]).decode()
        whoami = json_of(await pa.invoke(remote, "whoami"))
        assert whoami["self"] == [SYSTEM, remote, "cart"]
        assert await pb_.value(remote, "get") == await pa.value(remote, "get")
        # persisted (cart checkpoints) and sealed: the marker is in the store, not on disk
        marker = b"SPAWN-STATE-MARKER-31c9"
        await pa.invoke("counter", "checkpoint", (COUNT_URL, marker))
        assert await pb_.value("counter", "get") == (COUNT_URL, marker)
        stored = await nodes[0].store.load((SYSTEM, "counter"))
        assert stored is not None and marker in stored.blob
        for name, data in _db_files(tmp_path).items():
            assert marker not in data, f"plaintext state in {name}"
        await pb_.invoke("counter", "checkpoint", odd)
        seen = json_of(await pa.invoke("counter", "whoami"))
        assert seen["state"] == [COUNT_URL, odd_b64]


async def test_sdk_and_spawn_actors_call_each_other_across_nodes(tmp_path: Path) -> None:
    async with spawn_cluster(tmp_path) as members:
        nodes = [m[0] for m in members]
        pa, pb_ = members[0][1], members[1][1]
        base = await pa.value("counter", "get")
        assert base is not None
        n0 = int(wr.Int64Value.FromString(base[1]).value)
        # an SDK actor calls the Spawn counter (on whichever node owns each of them)
        for i, node in enumerate(nodes):
            got = await node.ref("sdk", "asker").invoke("ask", i + 1)
            n0 += i + 1
            assert got == n0
        # a Spawn client calls an SDK actor: JSON in, JSON out
        hello = json_of(
            await pb_.invoke("greeter", "hello", json_parts({"name": "spawn"}), system="sdk")
        )
        assert hello["hello"] == "spawn" and hello["node"] in {n.name for n in nodes}
        # a Spawn action calls an SDK actor from inside its turn
        spec = {
            "system": "sdk",
            "actor": "greeter",
            "action": "hello",
            "type_url": JSON_URL,
            "value": base64.b64encode(json_parts({"name": "nested"})[1]).decode(),
        }
        nested = json_of(await pa.invoke("counter", "call", json_parts(spec)))
        assert nested["hello"] == "nested"
        assert json.loads(json.dumps(nested))  # plain JSON all the way
