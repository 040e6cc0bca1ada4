"""Google protobuf (upb) modules generated from ``spec/``, for the node's hot paths.

The node parses and builds the messages it handles per invocation with Google's protobuf runtime
(upb, in C): the Spawn HTTP path, and the gRPC host API's ``Invoke`` and ``Connect``. A 260-byte
``ActorInvocation`` costs about 2 us to parse with upb against 75 us with betterproto2's pure
Python codec. betterproto2 stays the generated API for Python hosts and clients
(``spawnmesh/host/gen``); both are generated from the same ``spec/*.proto`` by ``make proto``.
"""
