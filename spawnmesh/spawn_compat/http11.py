"""A lean sans-IO HTTP/1.1 codec for the Spawn port: messages parsed from bytes, bytes built.

Why not h11 (which the ops server uses): a Spawn invocation crosses the node's HTTP twice (the
caller's request in, the host's turn out), and h11 spent 60-80 us of CPU per exchange on each
side here (event objects, header validation, its state machine), most of the node's share of
an invocation. This codec does the subset Spawn's protocol uses in a few microseconds: requests
and responses with ``Content-Length`` or chunked bodies, keep-alive and ``Connection: close``,
HTTP/1.0 and 1.1, ``Expect: 100-continue``, pipelined requests, a response body read until EOF.
No I/O, no clock: :class:`MessageReader` is fed bytes and hands out whole messages; the trio
shells are :mod:`.http_server` and :mod:`.http_client`. Everything malformed or over a bound is
a :class:`ProtocolError` with the status to answer; ``tests/test_spawn_http11.py`` checks it
against h11 as the oracle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

MAX_HEAD_BYTES: Final = 64 * 1024
"""Largest start line plus headers accepted."""
_CRLF2: Final = b"\r\n\r\n"
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_TOKEN: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_REASONS: Final = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
}


class ProtocolError(Exception):
    """The peer sent something that is not (acceptable) HTTP/1.1; ``status`` to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Message:
    """One parsed request or response."""

    method: bytes = b""
    """Request method (empty for a response)."""
    target: bytes = b""
    """Request target (empty for a response)."""
    status: int = 0
    """Response status (0 for a request)."""
    version: bytes = b"1.1"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    """(lower-case name, value) in order."""
    body: bytes = b""
    keep_alive: bool = True
    """Whether the connection may carry another message after this one."""

    def header(self, name: bytes) -> bytes | None:
        """The last value of header ``name`` (lower case), if any."""
        for k, v in reversed(self.headers):
            if k == name:
                return v
        return None


_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb"+) ([^\x00-\x20\x7f]+) (HTTP/[0-9.]+)")
_STATUS_LINE = re.compile(rb"(HTTP/[0-9.]+) ([0-9]{3})(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
_HEADER_LINE = re.compile(rb"(" + _TCHAR + rb"+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")


def _parse_head(head: bytes, is_request: bool) -> Message:
    lines = head.split(b"\r\n")
    start = lines[0]
    msg = Message()
    if is_request:
        m = _REQUEST_LINE.fullmatch(start)
        if m is None:
            raise ProtocolError(f"malformed request line {start[:80]!r}")
        msg.method, msg.target, version = m.groups()
    else:
        m = _STATUS_LINE.fullmatch(start)
        if m is None:
            raise ProtocolError(f"malformed status line {start[:80]!r}")
        version = m.group(1)
        msg.status = int(m.group(2))
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ProtocolError(f"unsupported version {version[:20]!r}", 505)
    msg.version = version[5:]
    headers = msg.headers
    match = _HEADER_LINE.fullmatch
    for line in lines[1:]:
        h = match(line)
        if h is None:
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        headers.append((h.group(1).lower(), h.group(2)))
    return msg


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")}


class MessageReader:
    """Incremental reader of HTTP/1.1 requests (``is_request``) or responses from one
    connection's bytes: :meth:`feed` what arrives (``b""`` at EOF), take :meth:`next` until it
    answers None (it needs more bytes)."""

    def __init__(
        self, *, is_request: bool, max_body_bytes: int, max_head_bytes: int = MAX_HEAD_BYTES
    ) -> None:
        self.is_request = is_request
        self.max_body = max_body_bytes
        self.max_head = max_head_bytes
        self._buf = bytearray()
        self._eof = False
        self._msg: Message | None = None
        """The message whose head is read and whose body is not complete yet."""
        self._length = -1
        """Body bytes still expected; -1 chunked, -2 until EOF."""
        self._chunks: list[bytes] = []
        self._chunk_left = 0
        self._trailers = False
        self.wants_continue = False
        """A request head asked for ``100 Continue`` and its body has not come yet."""

    @property
    def idle(self) -> bool:
        """No message is partly read (a connection may close here without harm)."""
        return self._msg is None and not self._buf

    def feed(self, data: bytes) -> None:
        """Bytes from the connection; ``b""`` means the peer closed its side."""
        if data:
            self._buf += data
        else:
            self._eof = True

    def next(self) -> Message | None:
        """The next complete message, or None until more bytes are fed."""
        if self._msg is None:
            end = self._buf.find(_CRLF2)
            if end < 0:
                if len(self._buf) > self.max_head:
                    raise ProtocolError("request head too large", 431)
                if self._eof and self._buf:
                    raise ProtocolError("connection closed in the middle of a head")
                return None
            if end > self.max_head:
                raise ProtocolError("request head too large", 431)
            head = bytes(self._buf[:end])
            del self._buf[: end + 4]
            if not self.is_request:
                while head.startswith(b"HTTP/1.1 1") and not head.startswith(b"HTTP/1.1 101"):
                    # an interim 1xx answer: skip it, the real one follows
                    end = self._buf.find(_CRLF2)
                    if end < 0:
                        return None
                    head = bytes(self._buf[:end])
                    del self._buf[: end + 4]
            self._start(_parse_head(head, self.is_request))
        return self._body()

    def _start(self, msg: Message) -> None:
        te = msg.header(b"transfer-encoding")
        cl = [v for k, v in msg.headers if k == b"content-length"]
        conn = _tokens(msg.header(b"connection") or b"")
        msg.keep_alive = b"close" not in conn if msg.version == b"1.1" else b"keep-alive" in conn
        if te is not None:
            if _tokens(te) != {b"chunked"}:
                raise ProtocolError(f"unsupported transfer-encoding {te[:40]!r}", 501)
            if cl:
                raise ProtocolError("both transfer-encoding and content-length")
            self._length = -1
        elif cl:
            if len(set(cl)) != 1 or not cl[0].isdigit() or len(cl[0]) > 18:
                raise ProtocolError("malformed content-length")
            self._length = int(cl[0])
            if self._length > self.max_body:
                raise ProtocolError(f"body of {self._length} bytes is too large", 413)
        elif self.is_request or msg.status in (204, 304) or 100 <= msg.status < 200:
            self._length = 0
        else:
            self._length = -2  # a response without a length: its body ends at EOF
            msg.keep_alive = False
        self._msg = msg
        self._chunks = []
        self._chunk_left = 0
        self._trailers = False
        expect = msg.header(b"expect")
        self.wants_continue = bool(
            self.is_request
            and expect is not None
            and expect.lower() == b"100-continue"
            and msg.version == b"1.1"
            and self._length != 0
        )

    def _done(self, body: bytes) -> Message:
        msg = self._msg
        assert msg is not None
        msg.body = body
        self._msg = None
        self.wants_continue = False
        return msg

    def _body(self) -> Message | None:
        buf = self._buf
        n = self._length
        if n >= 0:
            if len(buf) < n:
                if self._eof:
                    raise ProtocolError("connection closed in the middle of a body")
                return None
            body = bytes(buf[:n])
            del buf[:n]
            return self._done(body)
        if n == -2:
            if len(buf) > self.max_body:
                raise ProtocolError("response body too large", 413)
            if not self._eof:
                return None
            body = bytes(buf)
            buf.clear()
            return self._done(body)
        return self._chunked()

    def _chunked(self) -> Message | None:
        buf = self._buf
        while True:
            if self._trailers:
                end = buf.find(b"\r\n")
                if end < 0:
                    self._need(len(buf) > self.max_head, "trailers too large")
                    return None
                line = bytes(buf[:end])
                del buf[: end + 2]
                if not line:
                    return self._done(b"".join(self._chunks))
                continue
            if self._chunk_left == 0:
                end = buf.find(b"\r\n")
                if end < 0:
                    self._need(len(buf) > 1024, "chunk size line too long")
                    return None
                size_text = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[: end + 2]
                if not size_text or len(size_text) > 16 or not all(c in _HEX for c in size_text):
                    raise ProtocolError(f"malformed chunk size {size_text[:20]!r}")
                size = int(size_text, 16)
                if size == 0:
                    self._trailers = True
                    continue
                if sum(map(len, self._chunks)) + size > self.max_body:
                    raise ProtocolError("chunked body too large", 413)
                self._chunk_left = size
            size = self._chunk_left
            if len(buf) < size + 2:  # a chunk is taken whole, with its CRLF
                self._need(False, "")
                return None
            if buf[size : size + 2] != b"\r\n":
                raise ProtocolError("chunk data not followed by CRLF")
            self._chunks.append(bytes(buf[:size]))
            del buf[: size + 2]
            self._chunk_left = 0

    def _need(self, too_big: bool, what: str) -> None:
        """More bytes are needed: fine unless over a bound or the peer closed."""
        if too_big:
            raise ProtocolError(what, 413)
        if self._eof:
            raise ProtocolError("connection closed in the middle of a chunked body")


def response_bytes(
    status: int, body: bytes, headers: list[tuple[str, str]], *, close: bool = False
) -> bytes:
    """A whole response: status line, ``headers``, ``content-length``, body."""
    reason = _REASONS.get(status, b"")
    head = [b"HTTP/1.1 %d %s" % (status, reason)]
    head.extend(f"{k}: {v}".encode("latin-1") for k, v in headers)
    head.append(b"content-length: %d" % len(body))
    if close:
        head.append(b"connection: close")
    return b"\r\n".join(head) + _CRLF2 + body


def request_bytes(
    method: str, target: str, authority: str, body: bytes, headers: list[tuple[str, str]]
) -> bytes:
    """A whole request with ``host`` and ``content-length`` (one write, one segment)."""
    head = [f"{method} {target} HTTP/1.1".encode("latin-1"), f"host: {authority}".encode("latin-1")]
    head.extend(f"{k}: {v}".encode("latin-1") for k, v in headers)
    head.append(b"content-length: %d" % len(body))
    return b"\r\n".join(head) + _CRLF2 + body


CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
