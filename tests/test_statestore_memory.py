"""The in-memory store passes the statestore conformance suite."""

from collections.abc import AsyncIterator

import pytest

from spawnmesh.statestore import MemoryStateStore
from spawnmesh.testing.statestore import StateStoreConformance


class TestMemoryStore(StateStoreConformance):
    @pytest.fixture
    async def store(self) -> AsyncIterator[MemoryStateStore]:
        s = MemoryStateStore()
        await s.open()
        yield s
        await s.aclose()
