"""The gRPC host API: actor hosts in any language attach to a node (docs/host-protocol.md).

The only package that touches asyncio and grpclib; everything asyncio stays behind the bridge
in :mod:`spawnmesh.host.bridge`. ``gen/`` is generated from ``spec/*.proto`` (``make proto``).
"""
