"""Cluster status aggregation: ask other members' ops servers for their ``/v1/status``.

``GET /v1/cluster/status`` (and through it ``spawnmesh status`` and the dashboard) shows every
member from one node: that node asks each live member's ops address, in parallel and with a
deadline, over a minimal HTTP/1.1 GET client on trio and h11 (the libraries the ops server
already uses; no HTTP client dependency for one GET per member).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final

import h11
import trio

__all__ = ["MAX_STATUS_BYTES", "fetch_json", "fetch_statuses"]

MAX_STATUS_BYTES: Final = 8 * 1024 * 1024
"""A member's status reply larger than this is refused (a few thousand actor rows fit)."""


class FetchError(Exception):
    """A member's ops server did not answer with a JSON object; the message says why."""


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise FetchError(f"ops address {address!r} is not host:port")
    return host.strip("[]"), int(port)


async def fetch_json(address: str, path: str) -> dict[str, object]:
    """``GET path`` from the ops server at ``address`` (``host:port``): its JSON object.
    Raises :class:`FetchError` (or ``OSError``) when the answer is not a 200 JSON object;
    callers bound it with a cancel scope."""
    host, port = _split(address)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        head = h11.Request(
            method="GET",
            target=path,
            headers=[("host", address), ("accept", "application/json"), ("connection", "close")],
        )
        await stream.send_all(conn.send(head) + conn.send(h11.EndOfMessage()))
        status = 0
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_STATUS_BYTES:
                    raise FetchError(f"status of {address} exceeds {MAX_STATUS_BYTES} bytes")
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    if status != 200:
        raise FetchError(f"{address}{path} answered HTTP {status}")
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise FetchError(f"{address}{path} answered invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FetchError(f"{address}{path} answered JSON that is not an object")
    return value


async def fetch_statuses(
    targets: Mapping[str, str], path: str, *, timeout_s: float
) -> dict[str, dict[str, object] | str]:
    """``GET path`` from every ``{member: ops address}`` at once; per member its JSON object,
    or a one-line reason it has none (refused, timed out, bad answer)."""
    out: dict[str, dict[str, object] | str] = {}

    async def one(name: str, address: str) -> None:
        with trio.move_on_after(timeout_s) as scope:
            try:
                out[name] = await fetch_json(address, path)
            except (FetchError, OSError, h11.ProtocolError, trio.BrokenResourceError) as exc:
                out[name] = f"unreachable: {exc}"
        if scope.cancelled_caught:
            out[name] = f"unreachable: no answer from {address} within {timeout_s:g} s"

    async with trio.open_nursery() as nursery:
        for name, address in targets.items():
            nursery.start_soon(one, name, address)
    return out
