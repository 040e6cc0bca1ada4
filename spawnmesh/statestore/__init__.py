"""Statestores: where actor state lives between activations (protocol, memory, SQL)."""

from spawnmesh.statestore.base import StateStore, StateWrite, StoredState, WriteResult
from spawnmesh.statestore.memory import MemoryStateStore

__all__ = ["MemoryStateStore", "StateStore", "StateWrite", "StoredState", "WriteResult"]
