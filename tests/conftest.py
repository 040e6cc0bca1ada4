"""Shared fixtures: an embedded node on the in-memory store with an ephemeral ops port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from spawnmesh import ActorSystem, Node, open_node
from spawnmesh.config import NodeConfig, load_config
from spawnmesh.statestore import MemoryStateStore

NodeFactory = Callable[..., AbstractAsyncContextManager[Node]]


def test_config(**overrides: Any) -> NodeConfig:
    """A config for embedded test nodes: memory store, ephemeral ops and gossip ports (each
    test node is a cluster of one unless a test joins it), no environment."""
    values: dict[str, Any] = {
        "statestore.url": "memory://", "ops.port": 0, "name": "test-node",
        "cluster.gossip_port": 0, "cluster.peer_port": 0,
    }
    values.update(overrides)
    return load_config(overrides=values, env={})


test_config.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture
def make_node() -> NodeFactory:
    """``async with make_node(system, store=..., **config_overrides) as node``."""

    def factory(
        *systems: ActorSystem, store: MemoryStateStore | None = None, **overrides: Any
    ) -> AbstractAsyncContextManager[Node]:
        return open_node(test_config(**overrides), *systems, store=store)

    return factory


@pytest.fixture
async def store() -> AsyncIterator[MemoryStateStore]:
    s = MemoryStateStore()
    yield s
