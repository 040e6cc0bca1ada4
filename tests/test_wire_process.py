"""Peer wire between real processes: a peer killed with SIGKILL mid-request."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import trio

from spawnmesh.errors import PeerUnavailable, SpawnmeshError
from spawnmesh.keyring import Keyring
from spawnmesh.wire.messages import Request
from spawnmesh.wire.peer import PeerLimits, PeerNode

pytestmark = pytest.mark.slow

SERVER = textwrap.dedent(
    """
    import sys, trio
    from spawnmesh.keyring import Keyring
    from spawnmesh.wire.peer import PeerNode

    blocked = 0

    async def handle(req, origin):
        global blocked
        if req.action == "block":
            blocked += 1
            await trio.sleep_forever()
        if req.action == "blocked":
            return str(blocked).encode()
        return req.payload

    async def main():
        node = PeerNode("victim", 1, "c", handle, keyring=Keyring.parse(sys.argv[1]))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(node.serve, "127.0.0.1", 0)
            print(port, flush=True)

    trio.run(main)
    """
)


async def test_in_flight_requests_fail_retryably_when_the_peer_is_killed() -> None:
    key_text = f"k1:{base64.b64encode(os.urandom(32)).decode()}"
    key = Keyring.parse(key_text)
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before any trio work
        [sys.executable, "-c", SERVER, key_text], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(await trio.to_thread.run_sync(proc.stdout.readline))
        addr = ("127.0.0.1", port)

        async def nothing(req: Request, origin: str) -> bytes | None:
            return None

        client = PeerNode(
            "caller",
            1,
            "c",
            nothing,
            keyring=key,
            limits=PeerLimits(backoff_initial_ms=1000, backoff_max_ms=1000),
        )
        errors: list[SpawnmeshError] = []

        async def call() -> None:
            try:
                await client.request("victim", addr, Request(0, "s", "n", None, "block"))
            except SpawnmeshError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            await nursery.start(client.serve, "127.0.0.1", 0)
            assert (
                await client.request("victim", addr, Request(0, "s", "n", None, "echo", b"alive"))
                == b"alive"
            )
            async with trio.open_nursery() as callers:
                for _ in range(5):
                    callers.start_soon(call)
                with trio.fail_after(20):
                    blocked = Request(0, "s", "n", None, "blocked")
                    while await client.request("victim", addr, blocked) != b"5":  # noqa: ASYNC110
                        await trio.sleep(0.01)
                proc.send_signal(signal.SIGKILL)
                with trio.fail_after(5):  # the kernel closes the socket: failures are prompt
                    while len(errors) < 5:  # noqa: ASYNC110 - polling a list
                        await trio.sleep(0.01)
            assert all(isinstance(e, PeerUnavailable) and e.retryable for e in errors), errors
            assert client.connected_peers == []
            with pytest.raises(PeerUnavailable) as refused:
                await client.request("victim", addr, Request(0, "s", "n", None, "echo"))
            assert refused.value.retryable
            dials = client.stats.dials
            with pytest.raises(PeerUnavailable, match="next dial"):  # backing off: no dial
                await client.request("victim", addr, Request(0, "s", "n", None, "echo"))
            assert client.stats.dials == dials
            await client.close()
    finally:
        proc.kill()
        proc.wait()
