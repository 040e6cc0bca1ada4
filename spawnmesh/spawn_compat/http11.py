"""The Spawn port's sans-IO HTTP/1.1 codec: messages read from bytes, bytes built.

A Spawn invocation crosses the node's HTTP twice (the caller's request in, the host's turn
out). h11 (which the ops server uses) spent 60-80 us of CPU per exchange on each side here;
the parsing is therefore llhttp's, Node.js's parser, through ``httptools``: a Spawn request
with eight headers is read in 3.7 us, callbacks included, against 7.4 us for the regex parser
this module had before (``python bench/spawn_http.py`` measures the whole path). What llhttp
leaves to its user is here: the head and body bounds, the framing we accept
(``Content-Length`` or chunked), keep-alive for HTTP/1.0 and 1.1, ``Expect: 100-continue``,
pipelined messages, interim 1xx answers, a response body read until EOF, upgrade requests
answered over HTTP/1.1, trailer fields bounded like a head, EOF before a whole response an
error (:class:`ConnectionClosed`). No I/O, no clock: :class:`MessageReader` is fed bytes and
hands out whole messages; the trio shells are :mod:`.http_server` and :mod:`.http_client`.
Everything malformed or over a bound is a :class:`ProtocolError` with the status to answer;
``tests/test_spawn_http11.py`` checks it against h11 as the oracle.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Final

import httptools

MAX_HEAD_BYTES: Final = 64 * 1024
"""Largest start line plus headers accepted."""
_CRLF2: Final = b"\r\n\r\n"
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


class ConnectionClosed(ProtocolError):
    """The peer closed the connection before a whole response (``partial``: after some of it).

    A request reader does not raise it between requests: there EOF is the client being done."""

    def __init__(self, message: str, *, partial: bool) -> None:
        super().__init__(message)
        self.partial = partial


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


_VERSIONS: Final = {"1.1": b"1.1", "1.0": b"1.0"}
_NO_BODY_STATUSES: Final = frozenset({204, 304})


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")}


class MessageReader:
    """Incremental reader of HTTP/1.1 requests (``is_request``) or responses from one
    connection's bytes: :meth:`feed` what arrives (``b""`` at EOF), take :meth:`next` until it
    answers None (it needs more bytes).

    The parsing is llhttp's (through ``httptools``); this class keeps what it leaves to its
    user: the head and body bounds, the framing rules we accept (``Content-Length`` or chunked,
    nothing else), keep-alive, ``Expect: 100-continue``, interim 1xx answers skipped, a
    response body that ends at EOF, pipelined messages queued in order. An error is held until
    the messages read before it have been taken, then raised by :meth:`next`. After EOF a
    response reader never answers None again (no response at all is :class:`ConnectionClosed`),
    so a caller's read loop always ends; a request reader at EOF between requests is
    :attr:`idle` and answers None (the client is done).

    What follows a body (a chunked body's trailer section, or any bytes that make no progress
    in a body, like an endless chunk extension) counts against ``max_head_bytes`` too: llhttp
    would otherwise buffer a trailer field without end.
    """

    def __init__(
        self, *, is_request: bool, max_body_bytes: int, max_head_bytes: int = MAX_HEAD_BYTES
    ) -> None:
        self.is_request = is_request
        self.max_body = max_body_bytes
        self.max_head = max_head_bytes
        self._request_parser: httptools.HttpRequestParser | None = None
        self._response_parser: httptools.HttpResponseParser | None = None
        self._parser: httptools.HttpRequestParser | httptools.HttpResponseParser
        if is_request:
            self._parser = self._request_parser = httptools.HttpRequestParser(self)
        else:
            self._parser = self._response_parser = httptools.HttpResponseParser(self)
        self._ready: deque[Message] = deque()
        self._error: ProtocolError | None = None
        self._closed = False
        """EOF was fed, or the peer asked for an upgrade: later bytes are not HTTP to us."""
        self._msg: Message | None = None
        """The message begun and not complete yet."""
        self._in_head = False
        self._seq = 0
        """Messages begun so far (tells a head that spans feeds from the next one's)."""
        self._head_seen = 0
        """Head bytes seen by the callbacks (start line and header fields, not separators)."""
        self._head_fed = 0
        """Bytes of whole feeds that began and ended inside the current head (a header line
        that never ends is bounded by this: llhttp buffers it without a callback)."""
        self._tail = 0
        """Bytes since the body last went on: trailer fields (counted when complete) and
        feeds that brought no byte of body (a trailer field that never ends), bounded by
        ``max_head``; a field spanning feeds counts twice, so the bound is approximate."""
        self._headers: list[tuple[bytes, bytes]] = []
        """The current message's header list (its ``headers``), for :meth:`on_header`."""
        self._chunks: list[bytes] = []
        self._body_len = 0
        self._until_eof = False
        """The response in progress has no length: its body ends at EOF."""
        self._declared = 0
        """The message in progress's ``Content-Length`` (-1: chunked)."""
        self._raw: Message | None = None
        """An upgrade request whose body llhttp left to us (it stops at the head): its body
        is read here, ``_declared`` bytes, then the connection is done."""
        self.wants_continue = False
        """A request head asked for ``100 Continue`` and its body has not come yet."""

    @property
    def idle(self) -> bool:
        """No message is partly read (a connection may close here without harm)."""
        return self._msg is None and self._raw is None and not self._ready

    def feed(self, data: bytes) -> None:
        """Bytes from the connection; ``b""`` means the peer closed its side."""
        if self._error is not None:
            return
        if self._raw is not None:
            self._raw_body(data)
            return
        if not data:
            self._eof()
            return
        if self._closed:
            return
        seq, in_head, body_len, tail = self._seq, self._in_head, self._body_len, self._tail
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data[exc.args[0] :])
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._fail(cause if isinstance(cause, ProtocolError) else ProtocolError(str(exc)))
            return
        except httptools.HttpParserError as exc:
            text = str(exc)
            self._fail(ProtocolError(text, 505 if "HTTP version" in text else 400))
            return
        if self._seq == seq and self._msg is not None:  # the same message as before the feed
            if self._in_head:  # (so it was in the head before too)
                self._head_fed += len(data)
                if self._head_fed > self.max_head:
                    self._fail(ProtocolError("request head too large", 431))
            elif in_head:  # the body began in this feed
                pass
            elif self._body_len != body_len:  # the body went on: only what follows it counts
                if tail:
                    self._tail -= tail
            else:  # not a byte of body: trailer fields, chunk framing, an endless extension
                self._tail += len(data)
                if self._tail > self.max_head:
                    self._fail(ProtocolError("trailer section too large", 431))

    def next(self) -> Message | None:
        """The next complete message, or None until more bytes are fed."""
        if self._ready:
            return self._ready.popleft()
        if self._error is not None:
            raise self._error
        return None

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped at an upgrade request (``Connection: upgrade``, or CONNECT); ``rest``
        is what followed it. We do not switch protocols: the request is answered over
        HTTP/1.1 and the connection closes after it (RFC 9110 7.8)."""
        self._closed = True
        if self._raw is not None:
            if rest:
                self._raw_body(rest)
        elif self._ready:
            self._ready[-1].keep_alive = False

    def _raw_body(self, data: bytes) -> None:
        msg = self._raw
        assert msg is not None
        if not data:
            self._raw = None
            self._fail(ConnectionClosed("connection closed in the middle of a body", partial=True))
            return
        self._chunks.append(data)
        self._body_len += len(data)
        if self._body_len >= self._declared:
            msg.body = b"".join(self._chunks)[: self._declared]
            msg.keep_alive = False
            self._raw = None
            self._ready.append(msg)

    def _fail(self, error: ProtocolError) -> None:
        self._error = error
        self._msg = None
        self.wants_continue = False

    def _eof(self) -> None:
        self._closed = True
        if self._msg is not None:
            if not self._until_eof:
                what = "head" if self._in_head else "body"
                self._fail(ConnectionClosed(f"connection closed in the middle of a {what}",
                                            partial=True))
                return
            self.on_message_complete()
        if not self.is_request:  # nothing more will come: after what is ready, an error
            self._fail(ConnectionClosed("connection closed before a response", partial=False))

    # llhttp's callbacks (through httptools), in the order it makes them

    def on_message_begin(self) -> None:
        self._msg = msg = Message()
        self._headers = msg.headers
        self._in_head = True
        self._seq += 1
        self._head_seen = self._head_fed = self._tail = 0
        self._chunks = []
        self._body_len = 0
        self._until_eof = False
        self._declared = 0

    def _seen(self, n: int) -> None:
        self._head_seen += n
        if self._head_seen > self.max_head:
            raise ProtocolError("request head too large", 431)

    def on_url(self, url: bytes) -> None:
        msg = self._msg
        assert msg is not None
        msg.target += url
        self._seen(len(url))

    def on_status(self, reason: bytes) -> None:
        self._seen(len(reason))

    def on_header(self, name: bytes, value: bytes) -> None:
        # the hottest callback (one per header): kept to the bone
        if self._in_head:
            self._head_seen += len(name) + len(value) + 4
            if self._head_seen > self.max_head:
                raise ProtocolError("request head too large", 431)
            self._headers.append((name.lower(), value.rstrip(b" \t")))
        else:  # a trailer field of a chunked body: not kept, bounded like a head
            self._tail += len(name) + len(value) + 4
            if self._tail > self.max_head:
                raise ProtocolError("trailer section too large", 431)

    def on_headers_complete(self) -> None:
        msg = self._msg
        assert msg is not None
        self._in_head = False
        parser = self._parser
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise ProtocolError(f"unsupported version {parser.get_http_version()!r}", 505)
        msg.version = version
        if self._request_parser is not None:
            msg.method = self._request_parser.get_method()
        else:
            assert self._response_parser is not None
            msg.status = self._response_parser.get_status_code()
        fields = dict(msg.headers)  # the last value of each
        te = fields.get(b"transfer-encoding")
        cl = fields.get(b"content-length")
        conn = fields.get(b"connection")
        expect = fields.get(b"expect")
        if conn is None:
            msg.keep_alive = version == b"1.1"
        else:
            tokens = _tokens(conn)
            if version == b"1.1":
                msg.keep_alive = b"close" not in tokens
            else:
                msg.keep_alive = b"keep-alive" in tokens
        if te is not None:
            if _tokens(te) != {b"chunked"}:
                raise ProtocolError(f"unsupported transfer-encoding {te[:40]!r}", 501)
            if cl is not None:
                raise ProtocolError("both transfer-encoding and content-length")
            has_body = True
            self._declared = -1
        elif cl is not None:
            # llhttp has checked it is digits and not repeated
            length = int(cl)
            if length > self.max_body:
                raise ProtocolError(f"body of {length} bytes is too large", 413)
            has_body = length > 0
            self._declared = length
        elif self.is_request or msg.status in _NO_BODY_STATUSES or msg.status < 200:
            has_body = False
        else:
            self._until_eof = True  # a response without a length: its body ends at EOF
            msg.keep_alive = False
            has_body = True
        self.wants_continue = bool(
            has_body
            and expect is not None
            and self.is_request
            and expect.lower() == b"100-continue"
            and version == b"1.1"
        )

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self.max_body:
            raise ProtocolError("body too large", 413)
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        msg = self._msg
        assert msg is not None
        self._msg = None
        self.wants_continue = False
        if 100 <= msg.status < 200 and msg.status != 101:
            return  # an interim 1xx answer: skip it, the real one follows
        if self._declared and self.is_request and self._parser.should_upgrade():
            # llhttp hands everything after an upgrade request's head over as the new
            # protocol's bytes; its body is still HTTP to us
            if self._declared < 0:
                raise ProtocolError("an upgrade request with a chunked body", 501)
            self._raw = msg
            return
        chunks = self._chunks
        msg.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._ready.append(msg)


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
