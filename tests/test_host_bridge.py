"""The trio <-> asyncio bridge, both kinds (stepped and thread): results, errors and
cancellation in both directions, a drained shutdown, and a real grpclib server and client on
loopback through it."""

from __future__ import annotations

import asyncio
from typing import Any

import grpclib.client
import grpclib.const
import grpclib.server
import pytest
import trio

from spawnmesh.host.bridge import BRIDGES, Bridge, can_step, open_bridge
from spawnmesh.host.gen.spawn import JsonType

pytestmark = pytest.mark.parametrize("kind", BRIDGES)


async def test_asyncio_awaits_trio(kind: str) -> None:
    async with open_bridge(kind) as bridge:

        async def double(x: int) -> int:
            await trio.lowlevel.checkpoint()
            return 2 * x

        async def boom() -> None:
            await trio.lowlevel.checkpoint()
            raise ValueError("boom")

        async def aio() -> tuple[int, str]:
            v = await bridge.to_trio(double, 21)
            try:
                await bridge.to_trio(boom)
            except ValueError as exc:
                return v, str(exc)
            return v, ""

        assert await bridge.to_aio(aio) == (42, "boom")


async def test_cancelling_the_asyncio_caller_cancels_the_trio_task(kind: str) -> None:
    async with open_bridge(kind) as bridge:
        cancelled = trio.Event()
        started = trio.Event()

        async def forever() -> None:
            started.set()
            try:
                await trio.sleep_forever()
            finally:
                cancelled.set()

        async def aio() -> str:
            task = asyncio.ensure_future(bridge.to_trio(forever))
            await asyncio.sleep(0.05)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return "cancelled"
            return "not cancelled"

        assert await bridge.to_aio(aio) == "cancelled"
        with trio.fail_after(5):
            await cancelled.wait()
        assert started.is_set()


async def test_trio_awaits_asyncio_and_cancels_it(kind: str) -> None:
    async with open_bridge(kind) as bridge:
        seen: list[str] = []

        async def sleeper() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        async def fails() -> None:
            raise KeyError("k")

        with pytest.raises(KeyError):
            await bridge.to_aio(fails)
        with trio.move_on_after(0.1) as scope:
            await bridge.to_aio(sleeper)
        assert scope.cancelled_caught

        async def check() -> list[str]:
            await asyncio.sleep(0.01)
            return seen

        assert await bridge.to_aio(check) == ["cancelled"]


class _Echo:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            "/t.Echo/Echo": grpclib.const.Handler(
                self.echo, grpclib.const.Cardinality.UNARY_UNARY, JsonType, JsonType
            )
        }

    async def echo(self, stream: Any) -> None:
        msg = await stream.recv_message()

        async def upper(m: JsonType) -> JsonType:
            await trio.lowlevel.checkpoint()
            return JsonType(content=m.content.upper())

        await stream.send_message(await self.bridge.to_trio(upper, msg))


async def test_grpclib_server_and_client_through_the_bridge(kind: str) -> None:
    async with open_bridge(kind) as bridge:

        async def start() -> grpclib.server.Server:
            server = grpclib.server.Server([_Echo(bridge)])  # built on the loop: it binds to it
            await server.start("127.0.0.1", 0)
            return server

        server = await bridge.to_aio(start)
        port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        async def call_many() -> list[str]:
            channel = grpclib.client.Channel("127.0.0.1", port)
            try:
                out = []
                for i in range(20):
                    async with channel.request(
                        "/t.Echo/Echo", grpclib.const.Cardinality.UNARY_UNARY, JsonType, JsonType
                    ) as st:
                        await st.send_message(JsonType(content=f"m{i}"), end=True)
                        reply = await st.recv_message()
                        assert reply is not None
                        out.append(reply.content)
                return out
            finally:
                channel.close()

        assert await bridge.to_aio(call_many) == [f"M{i}" for i in range(20)]

        async def stop() -> None:  # on the loop: the server is not thread-safe
            server.close()
            await server.wait_closed()

        await bridge.to_aio(stop)


async def test_leaving_the_bridge_cancels_asyncio_tasks_and_lets_them_finish(kind: str) -> None:
    """Shutdown drains: a task still running on the loop is cancelled and its cleanup runs."""
    cleaned: list[str] = []
    async with open_bridge(kind) as bridge:
        started = trio.Event()

        async def forever() -> None:
            try:
                bridge.trio_soon(started.set)
                await asyncio.sleep(3600)
            finally:
                await asyncio.sleep(0.01)  # cleanup that itself awaits
                cleaned.append("done")

        async def spawn() -> None:
            asyncio.get_running_loop().create_task(forever())

        await bridge.to_aio(spawn)
        await started.wait()
    assert cleaned == ["done"]


async def test_this_python_can_step_its_event_loop(kind: str) -> None:
    """The stepped bridge's use of BaseEventLoop internals holds here (else it falls back)."""
    loop = asyncio.SelectorEventLoop()
    try:
        assert can_step(loop)
    finally:
        loop.close()
    async with open_bridge(kind) as bridge:
        assert bridge.name == kind
