"""The mesh: placement-driven routing of invocations between nodes, and hand-off."""
