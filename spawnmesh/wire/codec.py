"""Peer-wire framing (sans-IO): a frame is a 4-byte big-endian body length, then the body.

``FrameDecoder.feed(data)`` returns every complete frame body in ``data`` plus what it buffered
before, and keeps the incomplete tail. Between calls it holds at most ``HEADER_BYTES +
max_frame_bytes - 1`` bytes; a header announcing a larger body raises ``FrameTooLarge`` at once
(before its body arrives), and the decoder is then unusable (the connection must close). Frames
complete before that header are returned first and the error is raised by the next call
(``failed`` tells the caller to make it), so answers that arrived are not lost.
``FrameDecoder.feed_one(data)`` returns the first complete body only and keeps the rest
undecoded, for a caller whose limit changes after that frame (the frame that opens a session).
``append_frame`` encodes a message straight into an output buffer (no intermediate bytes).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final

from spawnmesh.errors import FrameTooLarge, ProtocolError

HEADER_BYTES: Final = 4
"""Size of the length prefix."""
DEFAULT_MAX_FRAME_BYTES: Final = 4 * 1024 * 1024
"""Default largest body a peer accepts (4 MiB): bounds per-connection memory."""
MAX_FRAME_LIMIT: Final = 2**32 - 1
"""Largest body the header can describe."""

_HEADER = struct.Struct(">I")
_unpack_from = _HEADER.unpack_from
_pack_into = _HEADER.pack_into
_ZERO_HEADER: Final = b"\x00" * HEADER_BYTES


def check_max_frame(max_frame_bytes: int) -> int:
    """Validate a maximum frame size (1 .. 2**32-1); returns it."""
    if not 1 <= max_frame_bytes <= MAX_FRAME_LIMIT:
        raise ValueError(f"max_frame_bytes must be 1..{MAX_FRAME_LIMIT}, got {max_frame_bytes}")
    return max_frame_bytes


class FrameDecoder:
    """Splits a byte stream into frame bodies, with bounded buffering.

    Bodies are returned as ``bytes`` (copies) so they outlive the next ``feed``."""

    __slots__ = ("_buf", "_failed", "_pending", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = check_max_frame(max_frame_bytes)
        self._buf = bytearray()
        self._failed = False
        self._pending: FrameTooLarge | None = None
        """The error found after frames a call returned; the next call raises it."""

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (or, after ``feed_one``, frames not yet taken)."""
        return len(self._buf)

    @property
    def failed(self) -> bool:
        """Whether the stream is broken: the next call raises (the connection must close)."""
        return self._failed

    def _check(self) -> None:
        """Raise for a failed decoder: first the pending error, then ``ProtocolError``."""
        pending, self._pending = self._pending, None
        if pending is not None:
            raise pending
        raise ProtocolError("frame decoder already failed; the connection must close")

    def _too_large(self, size: int) -> FrameTooLarge:
        self._failed = True
        self._buf = bytearray()
        return FrameTooLarge(
            f"frame of {size} bytes exceeds the maximum of {self.max_frame_bytes}"
        )

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add ``data``; return the bodies of every frame it completes, in order.

        Raises ``FrameTooLarge`` (a ``ProtocolError``) for a header above the maximum; after
        that every call raises ``ProtocolError`` (the stream cannot be resynchronised). If
        frames completed before that header, they are returned and the next call raises."""
        if self._failed:
            self._check()
        buf = self._buf
        if buf:
            buf += data
            src: bytes | bytearray | memoryview = buf
        else:
            src = data
        out: list[bytes] = []
        n = len(src)
        pos = 0
        limit = self.max_frame_bytes
        while n - pos >= HEADER_BYTES:
            (size,) = _unpack_from(src, pos)
            if size > limit:
                err = self._too_large(size)
                if out:  # deliver what arrived before the bad header; raise on the next call
                    self._pending = err
                    return out
                raise err
            end = pos + HEADER_BYTES + size
            if end > n:
                break
            out.append(bytes(src[pos + HEADER_BYTES : end]))
            pos = end
        if src is buf:
            del buf[:pos]
        elif pos < n:
            buf += src[pos:]
        return out

    def feed_one(self, data: bytes | bytearray | memoryview = b"") -> bytes | None:
        """Add ``data``; return the body of the first complete frame (None: none yet). What
        follows stays buffered undecoded, so a header after this frame is checked against the
        limit in force at the next call (set ``max_frame_bytes`` in between). Errors as
        :meth:`feed`."""
        if self._failed:
            self._check()
        buf = self._buf
        buf += data
        if len(buf) < HEADER_BYTES:
            return None
        (size,) = _unpack_from(buf, 0)
        if size > self.max_frame_bytes:
            raise self._too_large(size)
        end = HEADER_BYTES + size
        if len(buf) < end:
            return None
        body = bytes(buf[HEADER_BYTES:end])
        del buf[:end]
        return body


def encode_frame(body: bytes) -> bytes:
    """One frame: length prefix + body (tests and the handshake; the hot path uses
    :func:`append_frame`)."""
    return _HEADER.pack(len(body)) + body


def append_frame(
    out: bytearray, encode_into: Callable[[Any, bytearray, int], None], msg: Any, max_body: int
) -> int:
    """Encode ``msg`` as one frame at the end of ``out`` with msgspec's ``encode_into``; returns
    the body size. If the body exceeds ``max_body``, ``out`` is restored and ``FrameTooLarge``
    raised, so one oversized message never corrupts the buffer; so is it if encoding fails (the
    encoder's error propagates)."""
    start = len(out)
    out += _ZERO_HEADER
    try:
        encode_into(msg, out, start + HEADER_BYTES)
    except BaseException:
        del out[start:]
        raise
    size = len(out) - start - HEADER_BYTES
    if size > max_body:
        del out[start:]
        raise FrameTooLarge(f"frame of {size} bytes exceeds the peer's maximum of {max_body}")
    _pack_into(out, start, size)
    return size
