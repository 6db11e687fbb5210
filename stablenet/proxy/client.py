"""One client connection of the HTTP proxy: parses requests with llhttp (pipelined ones queue
behind the active one), turns each into an Exchange, hands it to the proxy to route and dispatch,
and writes the backend's response back, streamed both ways with flow control, never fully
buffered. An asyncio protocol by shape (a plain class, so that it can be compiled to a native
one).

The exchange's phase (exchange.py) says what may happen next; when an attempt fails,
retry.decide says whether and how to try again. One error contract: what the client sent wrong
is a 4xx/5xx answer and a closed connection; an exception in our own code is logged with its
traceback, counted, and closes the connection (500 when the client saw nothing yet). Nothing
here knows Docker."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from stablenet.model import Endpoint, State
from stablenet.proxy.balance import target_of
from stablenet.proxy.exchange import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    DONE,
    HEAD_PENDING,
    HELD,
    OUT_CHUNKED,
    OUT_RAW,
    OUT_UNTIL_CLOSE,
    READING,
    ROUTING,
    SENT,
    STREAMING,
    TUNNEL,
    UPGRADE_PENDING,
    Exchange,
)
from stablenet.proxy.http1 import (
    HOP_BY_HOP,
    IDEMPOTENT,
    NO_BODY_STATUS,
    SET_BY_PROXY,
    build_request_head,
    connection_tokens,
    error_response,
    printable,
    split_absolute,
)
from stablenet.proxy.retry import Attempt, Verdict, decide

if TYPE_CHECKING:
    from stablenet.proxy.dispatch import Dispatcher
    from stablenet.proxy.upstream import UpstreamConnection

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("stablenet.proxy.access")

PENDING_LIMIT = 256 * 1024  # request body bytes held while no backend is attached
REPLAY_LIMIT = 64 * 1024  # request body bytes kept so the request can be retried
EARLY_LIMIT = 64 * 1024  # client bytes after an Upgrade request held until the backend agrees
MAX_PIPELINED = 32  # pipelined requests a client may have waiting before we stop reading
SETTLE_EMPTY = 0.25  # seconds to let the registry catch up before forwarding an empty body

# Client deadline kinds
DEADLINE_NONE, DEADLINE_HEAD, DEADLINE_IDLE = 0, 1, 2

_LAST_CHUNK = b"0\r\n\r\n"


class ClientConnection:
    """One client TCP connection. ``service`` fixes the service for a dedicated listener;
    otherwise each request is routed by its Host."""

    __slots__ = (
        "dispatcher",
        "fixed_service",
        "transport",
        "parser",
        "peer",
        "queue",
        "reading",
        "head_size",
        "raw_pending",
        "deadline",
        "deadline_kind",
        "send_deadline",
        "paused_for_upstream",
        "paused_for_buffer",
        "paused_for_queue",
        "write_paused",
        "tunnel_to",
        "switching",
        "closing",
        "client_eof",
        "starting",
        "began",
        "paused_for_write",
        "idle_since",
        "wbuf",
    )

    def __init__(self, dispatcher: Dispatcher, fixed_service: str | None = None) -> None:
        self.dispatcher = dispatcher
        self.fixed_service = fixed_service
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = b"unknown"
        self.queue: deque[Exchange] = deque()
        self.reading: Exchange | None = None
        self.head_size = 0
        self.raw_pending = 0  # bytes received in a head that is not complete yet
        self.deadline = 0.0
        self.deadline_kind = DEADLINE_NONE
        self.send_deadline = 0.0  # while the client does not read what we write
        self.paused_for_upstream = False
        self.paused_for_buffer = False
        self.paused_for_queue = False  # too many pipelined requests waiting
        self.write_paused = False
        self.tunnel_to: UpstreamConnection | None = None
        self.switching: Exchange | None = None  # an Upgrade request awaiting the backend's answer
        self.closing = False
        self.client_eof = False  # the client half-closed: close once the queue is answered
        self.starting = False  # _start_ready is running (it loops; nothing recurses)
        self.began = False  # a request began in the read being parsed
        self.paused_for_write = False  # the client reads nothing: take no more from it
        self.idle_since = 0.0  # when its last answer went out with nothing else in flight
        self.wbuf: list[bytes] = []  # response bytes gathered during one backend read

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = str(peer[0]).encode()
        dispatcher = self.dispatcher
        if not dispatcher.gate.accept(self, self.transport, dispatcher.loop.time()):
            return  # over the connection budget: refused, and closed already
        dispatcher.clients.add(self)
        dispatcher.now = dispatcher.loop.time()
        self.deadline = dispatcher.now + dispatcher.header_timeout
        self.deadline_kind = DEADLINE_HEAD

    def data_received(self, data: bytes) -> None:
        self.dispatcher.now = self.dispatcher.loop.time()
        if self.tunnel_to is not None:
            transport = self.tunnel_to.transport
            if transport is not None:
                transport.write(data)
            return
        if self.closing:
            return
        if self.switching is not None:
            self._hold_early(self.switching, data)
            return
        self.began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # An Upgrade request is complete; what follows is for the new protocol, and only
            # once the backend agrees (101). Until then it is held here, never sent.
            ex = self.queue[-1] if self.queue else None
            if ex is None or ex.upgrade is None:
                self._reject(400, "bad request: unexpected protocol switch")
                return
            self.switching = ex
            rest = data[upgrade.args[0] :]
            if rest:
                self._hold_early(ex, rest)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._reject(cause.status, cause.message)
            else:
                self.internal_error(self.queue[0] if self.queue else None, cause)
            return
        except httptools.HttpParserError as exc:
            self._reject(400, f"bad request: {printable(str(exc).encode())}")
            return
        if self.reading is not None and not self.reading.head_done:
            # Bytes of a head still incomplete, counted from the read after the one it began
            # in (llhttp buffers a field until it ends; head_size counts the complete ones).
            self.raw_pending += 0 if self.began else len(data)
            if self.raw_pending > 4 * self.dispatcher.max_header_size:
                self._reject(431, "request header fields too large")
                return
        if self.queue:
            try:
                self._start_ready()
            except Exception as exc:  # a bug of ours: never a 400, never silent
                self.internal_error(self.queue[0] if self.queue else None, exc)

    def eof_received(self) -> bool | None:
        tunnel = self.tunnel_to
        if tunnel is not None:
            if tunnel.transport is not None and tunnel.transport.can_write_eof():
                tunnel.transport.write_eof()
            return True
        if self.reading is not None or not self.queue:
            # Nothing in flight, or a request that can never be completed now: close at once.
            self.closing = True
            return False
        # A half-closed client may still read the responses to what it sent.
        self.client_eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.dispatcher.clients.discard(self)
        self.dispatcher.gate.release(self)  # the connection budget
        for ex in self.queue:
            self._abandon(ex)
        self.queue.clear()
        tunnel = self.tunnel_to
        if tunnel is not None and tunnel.transport is not None:
            tunnel.transport.close()

    def resume_if_free(self) -> None:
        """Read from the client again once no reason to pause is left (a slow backend, a
        body buffered with no backend yet, too many pipelined requests)."""
        if self.transport is not None and not (
            self.paused_for_buffer
            or self.paused_for_upstream
            or self.paused_for_queue
            or self.paused_for_write
        ):
            self.transport.resume_reading()

    def pause_for_upstream(self, paused: bool) -> None:
        """The backend's side is full (True) or has room again (False)."""
        self.paused_for_upstream = paused
        if paused:
            if self.transport is not None:
                self.transport.pause_reading()
        else:
            self.resume_if_free()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.send_deadline = self.dispatcher.now + self.dispatcher.send_timeout
        # Take nothing more from a client that reads nothing: its next requests' answers
        # would pile up here.
        self.paused_for_write = True
        if self.transport is not None:
            self.transport.pause_reading()
        up = self.queue[0].upstream if self.queue else self.tunnel_to
        if up is not None:
            up.set_reading(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.send_deadline = 0.0
        self.paused_for_write = False
        self.resume_if_free()
        up = self.queue[0].upstream if self.queue else self.tunnel_to
        if up is not None:
            up.set_reading(True)

    # -- llhttp callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.idle_since = 0.0  # busy: the connection budget will not close it now
        self.began = True
        ex = Exchange(self)
        self.reading = ex
        self.queue.append(ex)
        if len(self.queue) > MAX_PIPELINED and not self.paused_for_queue:
            self.paused_for_queue = True  # read no more until the backlog is answered
            if self.transport is not None:
                self.transport.pause_reading()
        self.head_size = 0
        self.raw_pending = 0
        if len(self.queue) == 1:
            self.deadline = self.dispatcher.now + self.dispatcher.header_timeout
            self.deadline_kind = DEADLINE_HEAD

    def on_url(self, url: bytes) -> None:
        ex = self.reading
        assert ex is not None
        ex.url = ex.url + url if ex.url else url
        self.head_size += len(url)
        if self.head_size > self.dispatcher.max_header_size:
            raise _Reject(431, "request header fields too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.reading
        assert ex is not None
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.dispatcher.max_header_size:
            raise _Reject(431, "request header fields too large")
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                tokens = connection_tokens(value)
                ex.conn_tokens = tokens if ex.conn_tokens is None else ex.conn_tokens + tokens
            elif lname == b"transfer-encoding":
                ex.body_mode = BODY_CHUNKED
                ex.te_seen = value if not ex.te_seen else ex.te_seen + b"," + value
            elif lname == b"upgrade":
                ex.upgrade = value
            return
        if lname == b"host":
            if ex.host is not None:
                ex.error = (400, "more than one Host header")
            ex.host = value
        elif lname in SET_BY_PROXY:
            if lname == b"x-forwarded-for":
                ex.xff = value if ex.xff is None else ex.xff + b", " + value
            return
        elif lname == b"content-length":
            ex.cl_seen = True
            if ex.body_mode != BODY_CHUNKED:
                ex.body_mode = BODY_LENGTH if value.strip(b" \t") != b"0" else BODY_NONE
        elif lname == b"cookie" and self.dispatcher.sticky_cookie:
            ex.cookie = value if ex.cookie is None else ex.cookie + b"; " + value
        ex.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.reading
        assert ex is not None
        parser = self.parser
        ex.method = parser.get_method().decode("ascii", "replace")
        keep = parser.should_keep_alive()
        if keep and self.dispatcher.closing:
            keep = False  # draining: this answer says Connection: close, then the connection ends
        ex.keep_alive = keep
        if keep and (ex.conn_tokens is None or b"keep-alive" not in ex.conn_tokens):
            ex.version = "1.1"  # only HTTP/1.1 is kept alive without asking (llhttp's rule)
        else:
            ex.version = parser.get_http_version()  # formats a string: not on the hot path
        ex.head_request = ex.method == "HEAD"
        self.raw_pending = 0
        self._check_head(ex)
        if ex.upgrade is not None and not parser.should_upgrade():
            ex.upgrade = None
        if ex.upgrade is not None:
            ex.replayable = False
            ex.keep_alive = False
        if ex.host is None:
            if ex.version != "1.0":
                ex.error = ex.error or (400, "missing Host header")
            ex.host = b""
        if ex.error is not None:
            raise _Reject(*ex.error)  # before llhttp goes on: the head never leaves
        ex.client_keep_alive = ex.keep_alive
        ex.head = build_request_head(
            ex.method,
            ex.url,
            ex.headers,
            ex.conn_tokens,
            ex.body_mode == BODY_CHUNKED,
            ex.upgrade,
            self.peer if ex.xff is None else ex.xff + b", " + self.peer,
            ex.host,
        )
        ex.head_done = True
        if ex.body_mode == BODY_NONE and ex.upgrade is None:
            ex.body_done = True  # llhttp completes the message right after this callback

    def _check_head(self, ex: Exchange) -> None:
        """Framing a strict proxy refuses (as nginx does), and the absolute form."""
        if ex.version != "1.1" and ex.version != "1.0":
            raise _Reject(505, f"HTTP version {ex.version} not supported")
        if ex.method == "CONNECT":
            raise _Reject(405, "CONNECT is not supported: this is a reverse proxy")
        if ex.te_seen:
            if ex.version == "1.0":
                raise _Reject(400, "Transfer-Encoding in an HTTP/1.0 request")
            if ex.te_seen.strip(b" \t").lower() != b"chunked":
                raise _Reject(501, "only the chunked transfer coding is supported")
            if ex.cl_seen:
                raise _Reject(400, "both Content-Length and Transfer-Encoding")
        if ex.url[:1] != b"/" and ex.url != b"*":
            absolute = split_absolute(ex.url)
            if absolute is None or not absolute[0] or b"@" in absolute[0]:
                raise _Reject(400, "request target not understood")
            authority, ex.url = absolute
            # RFC 9112 3.2.2: the URI's authority replaces Host; the backend gets origin-form.
            ex.headers = [(n, v) for n, v in ex.headers if n.lower() != b"host"]
            ex.headers.append((b"Host", authority))
            ex.host = authority
            if ex.error is not None and ex.error[1] == "more than one Host header":
                ex.error = None

    def on_body(self, body: bytes) -> None:
        ex = self.reading
        assert ex is not None
        if ex.body_mode == BODY_CHUNKED:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        self._send_body(ex, body)

    def on_message_complete(self) -> None:
        ex = self.reading
        assert ex is not None
        self.reading = None
        if ex.body_mode == BODY_CHUNKED:
            self._send_body(ex, _LAST_CHUNK)
        ex.body_done = True

    # -- request side -------------------------------------------------------------------------

    def _hold_early(self, ex: Exchange, data: bytes) -> None:
        """Client bytes after an Upgrade request: kept (bounded) until the backend answers."""
        ex.early.append(data)
        ex.early_size += len(data)
        if ex.early_size > EARLY_LIMIT and self.transport is not None:
            self.paused_for_buffer = True
            self.transport.pause_reading()

    def _send_body(self, ex: Exchange, data: bytes) -> None:
        up = ex.upstream
        if up is not None and up.transport is not None:
            up.transport.write(data)
            up.deadline = self.dispatcher.now + self.dispatcher.response_timeout  # still uploading
            if ex.replayable:
                ex.buffered.append(data)
                ex.buffered_size += len(data)
                if ex.buffered_size > REPLAY_LIMIT:
                    ex.replayable = False
                    ex.buffered = []
            return
        ex.buffered.append(data)
        ex.buffered_size += len(data)
        if ex.buffered_size > REPLAY_LIMIT:
            ex.replayable = False
        if ex.buffered_size > PENDING_LIMIT and not self.paused_for_buffer:
            self.paused_for_buffer = True
            if self.transport is not None:
                self.transport.pause_reading()

    def _start_ready(self) -> None:
        """Route every request at the head of the queue whose head is complete and valid. A
        loop, not recursion: a request answered at once (a 404) lets the next one start here."""
        if self.starting:
            return
        self.starting = True
        try:
            queue = self.queue
            while queue and not self.closing:
                ex = queue[0]
                if ex.phase != READING or not ex.head_done:
                    break
                self.deadline_kind = DEADLINE_NONE
                self._start(ex)
        finally:
            self.starting = False

    def _start(self, ex: Exchange) -> None:
        """The exchange at the head of the queue has a complete head: route it."""
        dispatcher = self.dispatcher
        ex.started = dispatcher.now
        ex.move(ROUTING)
        if self.fixed_service is not None:
            service: str | None = self.fixed_service
        else:
            service = dispatcher.route(ex.host or b"")
            if service is None:
                dispatcher.count(None).requests += 1
                self.respond(
                    ex, 404, f"no service for host {printable(ex.host or b'')!r}", close=False
                )
                return
        assert service is not None
        ex.service = service
        dispatcher.count(service).requests += 1
        if self.dispatcher.sticky_cookie and ex.cookie is not None:
            ex.sticky = _cookie_value(ex.cookie, self.dispatcher.sticky_cookie)
        ex.hold_deadline = ex.started + dispatcher.hold_timeout
        dispatcher.dispatch(ex)

    def attach(self, ex: Exchange, up: UpstreamConnection, reused: bool) -> None:
        """Send the exchange's request on this backend connection."""
        ex.move(SENT if ex.upgrade is None else UPGRADE_PENDING)
        ex.upstream = up
        ex.sends += 1
        up.exchange = ex
        up.reused = reused
        up.got_bytes = False
        up.interim = False
        up.carried_upgrade = ex.upgrade is not None
        up.deadline = self.dispatcher.now + self.dispatcher.response_timeout
        transport = up.transport
        assert transport is not None
        if ex.buffered:
            transport.write(ex.head + b"".join(ex.buffered))
            if not ex.replayable:
                ex.buffered = []
                ex.buffered_size = 0
        else:
            transport.write(ex.head)
        if self.paused_for_buffer and ex.upgrade is None:
            self.paused_for_buffer = False
            self.resume_if_free()
        if self.write_paused:
            up.set_reading(False)

    # -- response side ------------------------------------------------------------------------

    def respond(
        self,
        ex: Exchange,
        status: int,
        message: str,
        *,
        close: bool = True,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """Answer the exchange with the proxy's own response (or cut the connection, when the
        client already saw part of another)."""
        if ex.phase == DONE or self.transport is None:
            return
        self.flush()
        if ex.client_saw:
            self.transport.abort()
            self.finish(ex, close=True)
            return
        close = close or not ex.keep_alive or not ex.body_done
        if ex.version == "1.0" and not close:
            extra = extra + ((b"Connection", b"keep-alive"),)
        ex.status = status
        ex.client_saw = True
        ex.pending_head = None
        self.transport.write(
            error_response(status, message, close=close, head_only=ex.head_request, extra=extra)
        )
        if status >= 500:
            self.dispatcher.count(ex.service).errors += 1
        self.finish(ex, close=close)

    def finish(self, ex: Exchange, close: bool = False) -> None:
        """The response is complete: log it, then close or move on to the next request."""
        if self.wbuf:
            self.flush()
        dispatcher = self.dispatcher
        ex.move(DONE)
        dispatcher.release(ex)
        if dispatcher.metrics and ex.service:
            dispatcher.record(ex)
        ex.upstream = None
        if dispatcher.access_log:
            ep = ex.endpoint
            access_logger.info(
                '%s "%s %s HTTP/%s" %d %s %s %.1fms',
                self.peer.decode(),
                ex.method,
                printable(ex.url, 500),
                ex.version,
                ex.status,
                ex.service or "-",
                f"{ep.address}:{ep.port}" if ep is not None else "-",
                (dispatcher.loop.time() - ex.started) * 1000,
            )
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        if self.switching is ex:
            close = True  # the backend declined the upgrade: what followed is not HTTP we read
        transport = self.transport
        if transport is None:
            return
        if close or not ex.keep_alive or not ex.body_done or (self.client_eof and not self.queue):
            self.closing = True
            transport.close()
            return
        if self.paused_for_queue and len(self.queue) <= MAX_PIPELINED // 2:
            self.paused_for_queue = False
            self.resume_if_free()
        if self.paused_for_upstream:
            self.paused_for_upstream = False
            self.resume_if_free()
        if self.queue:
            nxt = self.queue[0]
            if nxt.head_done:
                self._start_ready()
            else:
                self.deadline = dispatcher.now + dispatcher.header_timeout
                self.deadline_kind = DEADLINE_HEAD
        else:
            self.deadline = dispatcher.now + dispatcher.idle_timeout
            self.deadline_kind = DEADLINE_IDLE
            self.idle_since = dispatcher.now  # the connection budget may close it to make room

    def response_head(
        self,
        ex: Exchange,
        up: UpstreamConnection,
        status: int,
        headers: list[tuple[bytes, bytes]],
        reason: bytes,
    ) -> None:
        transport = self.transport
        if transport is None:
            return
        keep = ex.keep_alive
        chunked = False
        length = False
        drop: list[bytes] | None = None
        upgrade: bytes | None = None
        out: list[bytes] = [b"HTTP/1.1 %d %b\r\n" % (status, reason)]
        for name, value in headers:
            lname = name.lower()
            if lname in HOP_BY_HOP:
                if lname == b"transfer-encoding":
                    chunked = True
                elif lname == b"connection":
                    plain = value.lower()
                    if plain != b"keep-alive" and plain != b"close":  # names other fields
                        tokens = connection_tokens(value)
                        drop = tokens if drop is None else drop + tokens
                elif lname == b"upgrade":
                    upgrade = value
                continue
            if lname == b"content-length":
                length = True
            out.append(b"%b: %b\r\n" % (name, value))
        if drop:
            drop_set = set(drop) - {b"content-length"}
            out = [out[0]] + [
                line for line in out[1:] if line.partition(b":")[0].lower() not in drop_set
            ]
        if status < 200:
            if status == 101 and ex.upgrade is not None:
                self._switch(ex, up, out, upgrade or ex.upgrade)
                return
            up.interim = True
            if ex.version != "1.0" and status != 101:
                out.append(b"\r\n")
                self.wbuf.append(b"".join(out))
                ex.client_saw = True
            return
        if ex.head_request or status in NO_BODY_STATUS:
            ex.out_mode = OUT_RAW
        elif length:
            ex.out_mode = OUT_RAW
        elif ex.version == "1.0":
            ex.out_mode = OUT_UNTIL_CLOSE
            keep = False
        else:
            ex.out_mode = OUT_CHUNKED
            out.append(b"Transfer-Encoding: chunked\r\n")
            if not chunked:
                up.until_close = True
        if not ex.body_done:
            keep = False
        cookie = self.dispatcher.sticky_cookie
        if cookie and ex.endpoint is not None:
            token = self.dispatcher.token(ex.endpoint)  # cached per endpoint, as dispatch uses it
            if token != ex.sticky:
                out.append(
                    b"Set-Cookie: %b=%b; Path=/; HttpOnly\r\n" % (cookie.encode(), token.encode())
                )
        if not keep:
            out.append(b"Connection: close\r\n")
        elif ex.version == "1.0":
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        ex.keep_alive = keep
        ex.status = status
        if ex.phase == SENT and ex.replayable and ex.method in IDEMPOTENT and not ex.head_request:
            # Held back until the first body byte (usually in the same read): if the backend
            # dies before any, nothing reached the client and the request can be retried.
            ex.move(HEAD_PENDING)
            ex.pending_head = b"".join(out)
        else:
            ex.move(STREAMING)
            ex.client_saw = True
            self.wbuf.append(b"".join(out))
        if status >= 500 and ex.endpoint is not None:
            self.dispatcher.report(ex.endpoint, False, f"HTTP {status}")
        if ex.head_request:
            up.renew_parser = True
            self.response_done(ex, up)

    def _switch(self, ex: Exchange, up: UpstreamConnection, out: list[bytes], proto: bytes) -> None:
        """The backend agreed to the upgrade: pass bytes unchanged both ways from now on, the
        client's held ones first."""
        out.append(b"Upgrade: " + proto + b"\r\n")
        out.append(b"Connection: upgrade\r\n\r\n")
        ex.move(TUNNEL)
        ex.status = 101
        ex.client_saw = True
        self.wbuf.append(b"".join(out))
        self.switching = None
        self.tunnel_to = up
        up.tunnel_to = self
        if ex.early and up.transport is not None:
            up.transport.write(b"".join(ex.early))
        ex.early = []
        ex.early_size = 0
        if self.client_eof and up.transport is not None and up.transport.can_write_eof():
            up.transport.write_eof()  # the client half-closed before the backend agreed
        if self.paused_for_buffer:
            self.paused_for_buffer = False
            self.resume_if_free()

    def _show_head(self, ex: Exchange) -> None:
        pending = ex.pending_head
        if pending is not None:
            self.wbuf.append(pending)
            ex.pending_head = None
            ex.client_saw = True
            ex.move(STREAMING)

    def response_body(self, ex: Exchange, data: bytes) -> None:
        if ex.pending_head is not None:
            self._show_head(ex)
        if ex.out_mode == OUT_CHUNKED:
            self.wbuf.append(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.wbuf.append(data)

    def flush(self) -> None:
        """Write what the last backend read produced, in one call."""
        wbuf = self.wbuf
        if wbuf:
            transport = self.transport
            if transport is not None:
                transport.write(wbuf[0] if len(wbuf) == 1 else b"".join(wbuf))
            wbuf.clear()

    def response_done(self, ex: Exchange, up: UpstreamConnection) -> None:
        """The backend finished its response."""
        if ex.pending_head is not None:
            self._show_head(ex)
        if ex.out_mode == OUT_CHUNKED:
            self.wbuf.append(_LAST_CHUNK)
        ep = ex.endpoint
        up.exchange = None
        reusable = (
            ex.body_done
            and not up.until_close
            and not up.carried_upgrade
            and not ex.head_request  # ended before llhttp ended the message: never reused
            and up.parser.should_keep_alive()
        )
        if ep is not None and ex.status < 500:
            self.dispatcher.report(ep, True, "ok")
        self.flush()  # before the pool: a write that pauses the backend must not follow it there
        if reusable and ep is not None:
            self.dispatcher.pool_put(up)
        elif up.transport is not None:
            up.transport.close()
        self.finish(ex, close=ex.out_mode == OUT_UNTIL_CLOSE)

    def upstream_lost(self, ex: Exchange, up: UpstreamConnection, exc: Exception | None) -> None:
        """The backend connection closed while this exchange used it."""
        ep = ex.endpoint
        dispatcher = self.dispatcher
        phase = ex.phase
        if phase == TUNNEL:
            if self.transport is not None:
                self.transport.close()
            self.finish(ex, close=True)
            return
        close_delimited = ex.out_mode == OUT_UNTIL_CLOSE or up.until_close
        if phase == HEAD_PENDING:
            # Only the head arrived, and the client has seen none of it.
            if close_delimited and exc is None and not self._endpoint_gone(ep):
                # An empty close-delimited body, or a backend killed a moment ago whose
                # kill/die event is still on its way: let the registry settle first.
                dispatcher.loop.call_later(SETTLE_EMPTY, self._settle_empty, ex, up, exc)
                return
        elif phase == STREAMING:
            if exc is None and close_delimited and ex.status >= 200:
                self.response_done(ex, up)  # a clean close ends a close-delimited body
                return
            # Cut short: the client must not take it for a whole response. No terminating
            # chunk, no keep-alive; it counts against the endpoint.
            why = f"backend connection lost mid-response ({exc or 'EOF'})"
            logger.info("service %s: response cut short: %s", ex.service, why)
            self._report_failure(ex, why)
            dispatcher.count(ex.service).errors += 1
            self.wbuf.clear()
            if self.transport is not None:
                self.transport.abort()
            self.finish(ex, close=True)
            return
        self.attempt_failed(
            ex, up, f"backend closed the connection before responding ({exc or 'EOF'})"
        )

    def attempt_failed(self, ex: Exchange, up: UpstreamConnection | None, why: str) -> None:
        """An attempt failed before the client saw any of its response: retry it as
        retry.decide says, or answer 502."""
        dispatcher = self.dispatcher
        ep = ex.endpoint
        ex.pending_head = None
        ex.status = 0
        ex.out_mode = OUT_RAW
        ex.keep_alive = ex.client_keep_alive  # the failed attempt's framing does not carry over
        ex.upstream = None
        dispatcher.release(ex)
        if self.paused_for_upstream:  # that backend's resume_writing will never come
            self.paused_for_upstream = False
            self.resume_if_free()
        service = ex.service
        budget = dispatcher.budget(service)
        attempt = Attempt(
            phase=ex.phase,
            idempotent=ex.method in IDEMPOTENT,
            replayable=ex.replayable,
            reused=up is not None and up.reused,
            got_bytes=up is not None and up.got_bytes,
            client_saw=ex.client_saw,
            sends=ex.sends,
            race_retried=ex.race_retried,
        )
        verdict = decide(attempt, dispatcher.retries, budget.allows(dispatcher.now))
        if verdict is Verdict.RETRY_FRESH:
            # The keep-alive race: the backend closed an idle connection as we reused it.
            ex.race_retried = True
            ex.fresh_only = True
            ex.move(ROUTING)
            dispatcher.count(service).retries += 1
            logger.debug("retrying %s on a fresh connection: %s", service, why)
            dispatcher.dispatch(ex)
            return
        self._report_failure(ex, why)
        if verdict is Verdict.RETRY and ep is not None:
            budget.spend(dispatcher.now)
            if ex.sent_to is None:
                ex.sent_to = set()
            ex.sent_to.add(target_of(ep))
            ex.move(ROUTING)
            dispatcher.count(service).retries += 1
            logger.debug("retrying %s %s elsewhere: %s", ex.method, service, why)
            dispatcher.dispatch(ex)
            return
        self.respond(ex, 502, f"bad gateway: {why}")

    def _report_failure(self, ex: Exchange, why: str) -> None:
        """Tell passive health, once per request: a request that fails everywhere it goes is
        more likely bad itself than every endpoint it reached."""
        if not ex.reported and ex.endpoint is not None:
            ex.reported = True
            self.dispatcher.report(ex.endpoint, False, why)

    def _settle_empty(self, ex: Exchange, up: UpstreamConnection, exc: Exception | None) -> None:
        self.dispatcher.now = self.dispatcher.loop.time()
        if ex.phase == DONE:
            return
        if self._endpoint_gone(ex.endpoint):
            self.attempt_failed(
                ex, up, f"backend closed the connection before responding ({exc or 'EOF'})"
            )
        else:
            self.response_done(ex, up)

    def _endpoint_gone(self, ep: Endpoint | None) -> bool:
        """The endpoint is no longer routed as it was (draining, removed, moved, restarted)."""
        if ep is None:
            return True
        current = self.dispatcher.registry.snapshot.endpoints.get(ep.id)
        return (
            current is None
            or current.state is not State.READY
            or target_of(current) != target_of(ep)
        )

    def upstream_garbage(self, ex: Exchange, up: UpstreamConnection, why: str) -> None:
        self._report_failure(ex, why)
        self.wbuf.clear()
        self.respond(ex, 502, f"bad gateway: {why}")

    def upstream_timeout(self, ex: Exchange) -> None:
        self._report_failure(ex, "response timeout")
        self.respond(ex, 504, "gateway timeout: the backend did not answer in time")

    # -- errors and teardown ------------------------------------------------------------------

    def _reject(self, status: int, message: str) -> None:
        """The client sent something we cannot read: answer and close."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        self.dispatcher.count(None).bad_requests += 1
        logger.debug("client %s: %d %s", self.peer.decode(), status, message)
        active = self.queue[0] if self.queue else None
        if active is not None and active.phase != READING and active is not self.reading:
            # A response is under way for an earlier request; cut the connection.
            self.transport.abort()
            return
        self.flush()
        self.transport.write(error_response(status, message))
        self.transport.close()

    def internal_error(self, ex: Exchange | None, exc: BaseException | None) -> None:
        """A bug of ours surfaced while serving this connection: log it with its traceback,
        count it, and close (with a 500 when the client saw nothing of the response)."""
        self.dispatcher.internal_errors += 1
        logger.error("internal error serving client %s: %r", self.peer.decode(), exc, exc_info=exc)
        transport = self.transport
        if self.closing or transport is None:
            return
        self.closing = True
        if ex is not None and not ex.client_saw:
            self.wbuf.clear()
            transport.write(error_response(500, "internal error"))
            transport.close()
        else:
            transport.abort()

    def _abandon(self, ex: Exchange) -> None:
        dispatcher = self.dispatcher
        if ex.phase == HELD:  # unhold cancels its timer (only a held exchange has one)
            dispatcher.unhold(ex)
        tunnel = ex.phase == TUNNEL
        if ex.phase != DONE:
            ex.move(DONE)
        up = ex.upstream
        if up is not None:
            ex.upstream = None
            up.exchange = None
            if up.transport is not None:
                if tunnel:
                    up.transport.close()
                else:
                    up.transport.abort()
        dispatcher.release(ex)

    def due(self, now: float) -> bool:
        """A deadline of this connection passed by ``now``."""
        return bool(self.deadline_kind and self.deadline <= now) or 0.0 < self.send_deadline <= now

    def timed_out(self, now: float) -> None:
        if self.write_paused and self.send_deadline and self.send_deadline <= now:
            # The client stopped reading what we send: let its backend connection go.
            self.dispatcher.count(self.queue[0].service if self.queue else None).slow_clients += 1
            logger.debug("client %s: not reading; closed", self.peer.decode())
            self.closing = True
            if self.transport is not None:
                self.transport.abort()
            return
        if self.deadline_kind == DEADLINE_IDLE:
            self.closing = True
            if self.transport is not None:
                self.transport.close()
        elif self.deadline_kind == DEADLINE_HEAD:
            if self.queue and self.queue[0].head_done:
                return  # a response is in progress; pipelined heads wait for it
            if self.queue:
                self._reject(408, "request timeout: the request head took too long")
            else:
                self.closing = True
                if self.transport is not None:
                    self.transport.close()
        self.deadline_kind = DEADLINE_NONE


class _Reject(Exception):
    """Raised from a parser callback: the client's request is refused with this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _cookie_value(header: bytes, name: str) -> str | None:
    wanted = name.encode()
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == wanted:
            return value.strip().decode("latin-1")
    return None
