"""Spawn compatibility: hosts written with eigr Spawn's SDKs run against a spawnmesh node.

The node serves the proxy side of Spawn's HTTP protocol (:mod:`.proxy`, ``SpawnProxy``) and
calls each host back for its actors' turns (:mod:`.registry`, :mod:`.http_client`), with Spawn's
messages generated from ``spec/spawn/`` (``gen/``, Google protobuf; :mod:`.codegen`) and Spawn's
semantics as its proxy implements them. Nothing is imported here, so ``codegen`` runs even when
``gen/`` is stale. See docs/spawn-compat.md.
"""
