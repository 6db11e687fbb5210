"""The HTTP data plane: asyncio Protocols that move one client connection's requests to backend
connections and the responses back, parsed by llhttp (httptools), streamed both ways with flow
control, never fully buffered.

ClientConnection parses requests (pipelined ones queue behind the active one); each request is
an Exchange; UpstreamConnection parses the backend's responses. Decisions that do not need
sockets (where to route, which endpoint, what to retry) are asked of the Proxy runtime and the
pure modules beside this one. Nothing here knows Docker."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from stablenet.model import Endpoint, State
from stablenet.proxy.balance import target_of
from stablenet.proxy.http1 import (
    HOP_BY_HOP,
    IDEMPOTENT,
    NO_BODY_STATUS,
    SET_BY_PROXY,
    connection_tokens,
    error_response,
    printable,
)

if TYPE_CHECKING:
    from stablenet.proxy.server import Proxy

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("stablenet.proxy.access")

PENDING_LIMIT = 256 * 1024  # request body bytes held while no backend is attached
REPLAY_LIMIT = 64 * 1024  # request body bytes kept so the request can be retried
MAX_PIPELINED = 32  # pipelined requests a client may have waiting before we stop reading
SETTLE_EMPTY = 0.25  # seconds to let the registry catch up before forwarding an empty body

# Request body framing
BODY_NONE, BODY_LENGTH, BODY_CHUNKED = 0, 1, 2
# Response framing towards the client
OUT_RAW, OUT_CHUNKED, OUT_UNTIL_CLOSE = 0, 1, 2
# Client deadline kinds
DEADLINE_NONE, DEADLINE_HEAD, DEADLINE_IDLE = 0, 1, 2

_LAST_CHUNK = b"0\r\n\r\n"


class Exchange:
    """One request and its response, from the first request byte to the last response byte."""

    __slots__ = (
        "conn",
        "method",
        "url",
        "version",
        "headers",
        "host",
        "xff",
        "cookie",
        "conn_tokens",
        "upgrade",
        "body_mode",
        "error",
        "head",
        "head_done",
        "body_done",
        "buffered",
        "buffered_size",
        "replayable",
        "service",
        "endpoint",
        "upstream",
        "tried",
        "retry_delay",
        "pending_head",
        "hold_started",
        "fresh_only",
        "race_retried",
        "started",
        "hold_deadline",
        "hold_handle",
        "held",
        "connecting",
        "closed",
        "response_started",
        "status",
        "out_mode",
        "head_request",
        "keep_alive",
        "tunnel",
        "sticky",
        "counted",
    )

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.method = ""
        self.url = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.host: bytes | None = None
        self.xff: bytes | None = None
        self.cookie: bytes | None = None
        self.conn_tokens: list[bytes] | None = None
        self.upgrade: bytes | None = None
        self.body_mode = BODY_NONE
        self.error: tuple[int, str] | None = None
        self.head = b""
        self.head_done = False
        self.body_done = False
        self.buffered: list[bytes] = []
        self.buffered_size = 0
        self.replayable = True
        self.service = ""
        self.endpoint: Endpoint | None = None
        self.upstream: UpstreamConnection | None = None
        self.tried: set[tuple[str, str, int, float]] = set()
        self.retry_delay = 0.0
        self.pending_head: bytes | None = None
        self.hold_started = 0.0
        self.fresh_only = False
        self.race_retried = False
        self.started = 0.0
        self.hold_deadline = 0.0
        self.hold_handle: asyncio.TimerHandle | None = None
        self.held = False
        self.connecting = False
        self.closed = False  # the client went away
        self.response_started = False
        self.status = 0
        self.out_mode = OUT_RAW
        self.head_request = False
        self.keep_alive = True
        self.tunnel = False
        self.sticky: str | None = None
        self.counted = False  # the balancer counts this exchange as in flight on ``endpoint``


class ClientConnection:
    """One client TCP connection (an asyncio protocol by shape: a plain class, so that it can
    be compiled to a native one). ``service`` fixes the service for a dedicated listener;
    otherwise each request is routed by its Host."""

    __slots__ = (
        "proxy",
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
        "paused_for_upstream",
        "paused_for_buffer",
        "paused_for_queue",
        "write_paused",
        "tunnel_to",
        "closing",
        "wbuf",
    )

    def __init__(self, proxy: Proxy, fixed_service: str | None = None) -> None:
        self.proxy = proxy
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
        self.paused_for_upstream = False
        self.paused_for_buffer = False
        self.paused_for_queue = False  # too many pipelined requests waiting
        self.write_paused = False
        self.tunnel_to: UpstreamConnection | None = None
        self.closing = False
        self.wbuf: list[bytes] = []  # response bytes gathered during one backend read

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = str(peer[0]).encode()
        proxy = self.proxy
        proxy.clients.add(self)
        proxy.now = proxy.loop.time()
        self.deadline = proxy.now + proxy.header_timeout
        self.deadline_kind = DEADLINE_HEAD

    def data_received(self, data: bytes) -> None:
        self.proxy.now = self.proxy.loop.time()
        if self.tunnel_to is not None:
            transport = self.tunnel_to.transport
            if transport is not None:
                transport.write(data)
            return
        if self.closing:
            return
        if self.queue and self.queue[-1].upgrade is not None and self.queue[-1].body_done:
            self._send_body(self.queue[-1], data)  # after an Upgrade request: passed on as is
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0] :]
            if rest and self.queue:
                self._send_body(self.queue[-1], rest)
            return
        except httptools.HttpParserCallbackError:
            if not self.closing:
                self._reject(400, "bad request")
            return
        except httptools.HttpParserError as exc:
            self._reject(400, f"bad request: {printable(str(exc).encode())}")
            return
        if self.reading is not None and not self.reading.head_done:
            self.raw_pending += len(data)
            if self.raw_pending > 4 * self.proxy.max_header_size:
                self._reject(431, "request header fields too large")

    def eof_received(self) -> bool | None:
        # A half-closed client may still read the response to what it sent.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.proxy.clients.discard(self)
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
            self.paused_for_buffer or self.paused_for_upstream or self.paused_for_queue
        ):
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        up = self.queue[0].upstream if self.queue else self.tunnel_to
        if up is not None:
            up.set_reading(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        up = self.queue[0].upstream if self.queue else self.tunnel_to
        if up is not None:
            up.set_reading(True)

    # -- llhttp callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
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
            self.deadline = self.proxy.now + self.proxy.header_timeout
            self.deadline_kind = DEADLINE_HEAD

    def on_url(self, url: bytes) -> None:
        ex = self.reading
        assert ex is not None
        ex.url = ex.url + url if ex.url else url
        self.head_size += len(url)
        if self.head_size > self.proxy.max_header_size:
            self._reject(431, "request header fields too large")
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.reading
        assert ex is not None
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.proxy.max_header_size:
            self._reject(431, "request header fields too large")
            raise _Stop
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                tokens = connection_tokens(value)
                ex.conn_tokens = tokens if ex.conn_tokens is None else ex.conn_tokens + tokens
            elif lname == b"transfer-encoding":
                ex.body_mode = BODY_CHUNKED
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
            ex.body_mode = BODY_LENGTH if value.strip(b" \t") != b"0" else BODY_NONE
        elif lname == b"cookie" and self.proxy.sticky_cookie:
            ex.cookie = value if ex.cookie is None else ex.cookie + b"; " + value
        ex.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.reading
        assert ex is not None
        parser = self.parser
        ex.method = parser.get_method().decode("ascii", "replace")
        keep = parser.should_keep_alive()
        ex.keep_alive = keep
        if keep and (ex.conn_tokens is None or b"keep-alive" not in ex.conn_tokens):
            ex.version = "1.1"  # only HTTP/1.1 is kept alive without asking (llhttp's rule)
        else:
            ex.version = parser.get_http_version()  # formats a string: not on the hot path
        ex.head_request = ex.method == "HEAD"
        self.raw_pending = 0
        if ex.upgrade is not None and not parser.should_upgrade():
            ex.upgrade = None
        if ex.upgrade is not None:
            ex.replayable = False
            ex.keep_alive = False
        if ex.host is None:
            if ex.version != "1.0":
                ex.error = ex.error or (400, "missing Host header")
            ex.host = b""
        ex.head = self._build_head(ex)
        ex.head_done = True
        if ex.body_mode == BODY_NONE and ex.upgrade is None:
            ex.body_done = True  # llhttp completes the message right after this callback
        if ex is self.queue[0]:
            self.deadline_kind = DEADLINE_NONE
            self._start(ex)

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

    def _build_head(self, ex: Exchange) -> bytes:
        headers = ex.headers
        if ex.conn_tokens:
            drop = set(ex.conn_tokens) - {b"host", b"content-length"}
            headers = [(n, v) for n, v in headers if n.lower() not in drop]
        xff = self.peer if ex.xff is None else ex.xff + b", " + self.peer
        parts = [ex.method.encode(), b" ", ex.url, b" HTTP/1.1\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if ex.body_mode == BODY_CHUNKED:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if ex.upgrade is not None:
            parts += (b"Upgrade: ", ex.upgrade, b"\r\nConnection: upgrade\r\n")
        parts += (
            b"X-Forwarded-For: ",
            xff,
            b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: ",
            ex.host or b"",
            b"\r\n\r\n",
        )
        return b"".join(parts)

    def _send_body(self, ex: Exchange, data: bytes) -> None:
        up = ex.upstream
        if up is not None and up.transport is not None:
            up.transport.write(data)
            up.deadline = self.proxy.now + self.proxy.response_timeout  # still uploading
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

    def _start(self, ex: Exchange) -> None:
        """The exchange at the head of the queue has a complete head: route it."""
        proxy = self.proxy
        ex.started = proxy.now
        if ex.error is not None:
            self._reject(*ex.error)
            return
        if self.fixed_service is not None:
            service: str | None = self.fixed_service
        else:
            service = proxy.route(ex.host or b"")
            if service is None:
                proxy.count(None).requests += 1
                self.respond(
                    ex, 404, f"no service for host {printable(ex.host or b'')!r}", close=False
                )
                return
        assert service is not None
        ex.service = service
        proxy.count(service).requests += 1
        if self.proxy.sticky_cookie and ex.cookie is not None:
            ex.sticky = _cookie_value(ex.cookie, self.proxy.sticky_cookie)
        ex.hold_deadline = ex.started + proxy.hold_timeout
        proxy.dispatch(ex)

    def attach(self, ex: Exchange, up: UpstreamConnection, reused: bool) -> None:
        """Send the exchange's request on this backend connection."""
        ex.upstream = up
        up.exchange = ex
        up.reused = reused
        up.got_bytes = False
        up.interim = False
        up.deadline = self.proxy.now + self.proxy.response_timeout
        transport = up.transport
        assert transport is not None
        if ex.buffered:
            transport.write(ex.head + b"".join(ex.buffered))
            if not ex.replayable:
                ex.buffered = []
                ex.buffered_size = 0
        else:
            transport.write(ex.head)
        if self.paused_for_buffer:
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
        """Answer the exchange with the proxy's own response."""
        if ex.closed or self.transport is None:
            return
        self.flush()
        if ex.response_started:
            self.transport.abort()
            self.finish(ex, close=True)
            return
        close = close or not ex.keep_alive or not ex.body_done
        if ex.version == "1.0" and not close:
            extra = extra + ((b"Connection", b"keep-alive"),)
        ex.status = status
        ex.response_started = True
        self.transport.write(
            error_response(status, message, close=close, head_only=ex.head_request, extra=extra)
        )
        if status >= 500:
            self.proxy.count(ex.service).errors += 1
        self.finish(ex, close=close)

    def finish(self, ex: Exchange, close: bool = False) -> None:
        """The response is complete: log it, then close or move on to the next request."""
        if self.wbuf:
            self.flush()
        proxy = self.proxy
        proxy.release(ex)
        if proxy.metrics and ex.service:
            proxy.record(ex)
        ex.upstream = None
        if proxy.access_log:
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
                (proxy.loop.time() - ex.started) * 1000,
            )
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        transport = self.transport
        if transport is None:
            return
        if close or not ex.keep_alive or not ex.body_done:
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
                self._start(nxt)
            else:
                self.deadline = proxy.now + proxy.header_timeout
                self.deadline_kind = DEADLINE_HEAD
        else:
            self.deadline = proxy.now + proxy.idle_timeout
            self.deadline_kind = DEADLINE_IDLE

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
                out.append(b"Upgrade: " + (upgrade or ex.upgrade) + b"\r\n")
                out.append(b"Connection: upgrade\r\n\r\n")
                ex.tunnel = True
                ex.status = status
                ex.response_started = True
                self.wbuf.append(b"".join(out))
                self.tunnel_to = up
                up.tunnel_to = self
                return
            up.interim = True
            if ex.version != "1.0" and status != 101:
                out.append(b"\r\n")
                self.wbuf.append(b"".join(out))
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
        cookie = self.proxy.sticky_cookie
        if cookie and ex.endpoint is not None:
            token = self.proxy.token(ex.endpoint)  # cached per endpoint, as dispatch uses it
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
        ex.response_started = True
        if ex.replayable and ex.method in IDEMPOTENT and not ex.head_request:
            # Held back until the first body byte (usually in the same read): if the backend
            # dies before any, nothing reached the client and the request can be retried.
            ex.pending_head = b"".join(out)
        else:
            self.wbuf.append(b"".join(out))
        if status >= 500 and ex.endpoint is not None:
            self.proxy.report(ex.endpoint, False, f"HTTP {status}")
        if ex.head_request:
            up.renew_parser = True
            self.response_done(ex, up)

    def response_body(self, ex: Exchange, data: bytes) -> None:
        if ex.pending_head is not None:
            self.wbuf.append(ex.pending_head)
            ex.pending_head = None
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
            self.wbuf.append(ex.pending_head)
            ex.pending_head = None
        if ex.out_mode == OUT_CHUNKED:
            self.wbuf.append(_LAST_CHUNK)
        ep = ex.endpoint
        up.exchange = None
        reusable = ex.body_done and not up.until_close and up.parser.should_keep_alive()
        if ep is not None and ex.status < 500:
            self.proxy.report(ep, True, "ok")
        self.flush()  # before the pool: a write that pauses the backend must not follow it there
        if reusable and ep is not None:
            self.proxy.pool_put(up)
        elif up.transport is not None:
            up.transport.close()
        self.finish(ex, close=ex.out_mode == OUT_UNTIL_CLOSE)

    def upstream_lost(self, ex: Exchange, up: UpstreamConnection, exc: Exception | None) -> None:
        """The backend connection closed while this exchange used it."""
        ep = ex.endpoint
        proxy = self.proxy
        if ex.tunnel:
            if self.transport is not None:
                self.transport.close()
            self.finish(ex, close=True)
            return
        if ex.response_started and ex.pending_head is not None and ex.status >= 200:
            # Only the head arrived, and the client has seen none of it.
            close_delimited = ex.out_mode == OUT_UNTIL_CLOSE or up.until_close
            if close_delimited and not self._endpoint_gone(ep):
                # An empty close-delimited body, or a backend killed a moment ago whose
                # kill/die event is still on its way: let the registry settle first.
                proxy.loop.call_later(SETTLE_EMPTY, self._settle_empty, ex, up, exc)
                return
            ex.pending_head = None  # cut short by a dying backend: answer as if never started
            ex.response_started = False
            ex.status = 0
        if ex.response_started:
            if ex.status >= 200 and (ex.out_mode == OUT_UNTIL_CLOSE or up.until_close):
                self.response_done(ex, up)
                return
            if ep is not None:
                proxy.report(ep, False, "connection closed mid-response")
            proxy.count(ex.service).errors += 1
            if self.transport is not None:
                self.transport.abort()
            self.finish(ex, close=True)
            return
        ex.upstream = None
        proxy.release(ex)
        why = f"backend closed the connection before responding ({exc or 'EOF'})"
        if not up.got_bytes and up.reused and not ex.race_retried and ex.replayable:
            # The keep-alive race: the backend closed an idle connection as we reused it.
            ex.race_retried = True
            ex.fresh_only = True
            proxy.count(ex.service).retries += 1
            logger.debug("retrying %s on a fresh connection: %s", ex.service, why)
            proxy.dispatch(ex)
            return
        if ep is not None:
            proxy.report(ep, False, why)
        # Nothing reached the client (a partial head from a dying backend is not forwarded):
        # an idempotent request may go elsewhere.
        if ex.replayable and ex.method in IDEMPOTENT and ep is not None:
            ex.tried.add(target_of(ep))
            proxy.count(ex.service).retries += 1
            logger.debug("retrying %s %s elsewhere: %s", ex.method, ex.service, why)
            proxy.dispatch(ex)
            return
        self.respond(ex, 502, f"bad gateway: {why}")

    def _settle_empty(self, ex: Exchange, up: UpstreamConnection, exc: Exception | None) -> None:
        self.proxy.now = self.proxy.loop.time()
        if ex.closed:
            return
        if self._endpoint_gone(ex.endpoint):
            ex.pending_head = None
            ex.response_started = False
            ex.status = 0
            self.upstream_lost(ex, up, exc)
        else:
            self.response_done(ex, up)

    def _endpoint_gone(self, ep: Endpoint | None) -> bool:
        """The endpoint is no longer routed as it was (draining, removed, moved, restarted)."""
        if ep is None:
            return True
        current = self.proxy.registry.snapshot.endpoints.get(ep.id)
        return (
            current is None
            or current.state is not State.READY
            or target_of(current) != target_of(ep)
        )

    def upstream_garbage(self, ex: Exchange, up: UpstreamConnection, why: str) -> None:
        if ex.endpoint is not None:
            self.proxy.report(ex.endpoint, False, why)
        self.respond(ex, 502, f"bad gateway: {why}")

    def upstream_timeout(self, ex: Exchange) -> None:
        if ex.endpoint is not None:
            self.proxy.report(ex.endpoint, False, "response timeout")
        self.respond(ex, 504, "gateway timeout: the backend did not answer in time")

    # -- errors and teardown ------------------------------------------------------------------

    def _reject(self, status: int, message: str) -> None:
        """The client sent something we cannot read: answer and close."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        active = self.queue[0] if self.queue else None
        self.proxy.count(None).bad_requests += 1
        logger.debug("client %s: %d %s", self.peer.decode(), status, message)
        if active is not None and (
            active.response_started
            or active.upstream is not None
            or active.held
            or active.connecting
        ):
            if active.head_done and active is not self.reading:
                # A response is under way for an earlier request; cut the connection.
                self.transport.abort()
                return
        self.flush()
        self.transport.write(error_response(status, message))
        self.transport.close()

    def _abandon(self, ex: Exchange) -> None:
        ex.closed = True
        proxy = self.proxy
        if ex.held:  # unhold cancels its timer (only a held exchange has one)
            proxy.unhold(ex)
        up = ex.upstream
        if up is not None:
            ex.upstream = None
            up.exchange = None
            if up.transport is not None:
                if ex.tunnel:
                    up.transport.close()
                else:
                    up.transport.abort()
        proxy.release(ex)

    def timed_out(self, now: float) -> None:
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


class _Stop(Exception):
    """Raised from a parser callback to stop parsing a connection already answered."""


def _cookie_value(header: bytes, name: str) -> str | None:
    wanted = name.encode()
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == wanted:
            return value.strip().decode("latin-1")
    return None


class UpstreamConnection:
    """One connection to one backend endpoint; pooled between requests (an asyncio protocol by
    shape, like ClientConnection)."""

    __slots__ = (
        "proxy",
        "key",
        "transport",
        "parser",
        "exchange",
        "headers",
        "reason",
        "reused",
        "got_bytes",
        "interim",
        "until_close",
        "renew_parser",
        "deadline",
        "tunnel_to",
        "read_paused",
    )

    def __init__(self, proxy: Proxy, key: tuple[str, str, int]) -> None:
        self.proxy = proxy
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.reused = False
        self.got_bytes = False
        self.interim = False
        self.until_close = False
        self.renew_parser = False
        self.deadline = 0.0
        self.tunnel_to: ClientConnection | None = None
        self.read_paused = False  # by our flow control: the client reads slower than we get

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.proxy.upstreams.add(self)

    def set_reading(self, reading: bool) -> None:
        transport = self.transport
        if transport is None or reading != self.read_paused:
            return
        self.read_paused = not reading
        if reading:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self.tunnel_to is not None:
            client = self.tunnel_to.transport
            if client is not None:
                client.write(data)
            return
        ex = self.exchange
        if ex is None:
            # Bytes from a backend with no request outstanding: it cannot be reused.
            if self.transport is not None:
                self.transport.close()
            return
        self.got_bytes = True
        proxy = self.proxy
        proxy.now = proxy.loop.time()
        self.deadline = proxy.now + proxy.response_timeout
        conn = ex.conn
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            conn.flush()
            rest = data[upgrade.args[0] :]
            if conn.transport is not None and rest:
                conn.transport.write(rest)
            return
        except httptools.HttpParserError as exc:
            if self.transport is not None:
                self.transport.abort()
            if ex is self.exchange:
                self.exchange = None
                ex.conn.upstream_garbage(ex, self, f"invalid response: {exc}")
            return
        conn.flush()
        if self.renew_parser:
            self.renew_parser = False
            self.parser = httptools.HttpResponseParser(self)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        proxy = self.proxy
        proxy.now = proxy.loop.time()
        proxy.upstreams.discard(self)
        proxy.pool_discard(self)
        tunnel = self.tunnel_to
        ex = self.exchange
        self.exchange = None
        self.transport = None
        if ex is not None and not ex.closed:
            ex.conn.upstream_lost(ex, self, exc)
        elif tunnel is not None and tunnel.transport is not None:
            tunnel.transport.close()

    def pause_writing(self) -> None:
        ex = self.exchange
        client = ex.conn if ex is not None else self.tunnel_to
        if client is not None and client.transport is not None:
            client.paused_for_upstream = True
            client.transport.pause_reading()

    def resume_writing(self) -> None:
        ex = self.exchange
        client = ex.conn if ex is not None else self.tunnel_to
        if client is not None:
            client.paused_for_upstream = False
            client.resume_if_free()

    # -- llhttp callbacks ---------------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason = status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        # This message's fields and reason, taken so the next message starts empty (cheaper
        # than an on_message_begin callback per response).
        headers, reason = self.headers, self.reason
        self.headers = []
        self.reason = b""
        ex = self.exchange
        if ex is None:
            return
        status = self.parser.get_status_code()
        if status == 101 and ex.upgrade is None:
            raise _Stop("101 to a request without Upgrade")
        self.until_close = False
        ex.conn.response_head(ex, self, status, headers, reason)

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex is not None:
            ex.conn.response_body(ex, body)

    def on_message_complete(self) -> None:
        ex = self.exchange
        if ex is None:
            return
        if self.interim:
            self.interim = False
            return
        if ex.tunnel:
            return
        ex.conn.response_done(ex, self)

    def timed_out(self, now: float) -> None:
        ex = self.exchange
        transport = self.transport
        if ex is None:
            if transport is not None:
                transport.close()  # idle in the pool too long
            return
        if ex.tunnel:
            return
        if ex.conn.write_paused:
            # Our own flow control stopped reading (a slow client), not the backend.
            self.deadline = now + self.proxy.response_timeout
            return
        self.exchange = None
        if transport is not None:
            transport.abort()
        ex.conn.upstream_timeout(ex)
