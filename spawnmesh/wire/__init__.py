"""The peer wire protocol: sans-IO frame codec, messages and handshake (L0), and the trio peer
layer (connections, dialing, serving) that carries invocations between nodes. See spec/wire.md."""
