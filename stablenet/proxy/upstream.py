"""One connection to one backend endpoint: parses its responses with llhttp and hands them to
the client connection of the exchange it carries; pooled between requests. An asyncio protocol
by shape (a plain class, so that it can be compiled to a native one). It decides nothing about
retries or routing: it reports what happened to the exchange's client connection."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import httptools

from stablenet.proxy.exchange import (
    TUNNEL,
    Exchange,
)

if TYPE_CHECKING:
    from stablenet.proxy.client import ClientConnection
    from stablenet.proxy.dispatch import Dispatcher


class UpstreamConnection:
    """One connection to one backend endpoint; pooled between requests."""

    __slots__ = (
        "dispatcher",
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
        "idle_since",
        "carried_upgrade",
    )

    def __init__(self, dispatcher: Dispatcher, key: tuple[str, str, int]) -> None:
        self.dispatcher = dispatcher
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
        self.idle_since = 0.0  # when it last went back to the pool
        self.carried_upgrade = False  # it carried an Upgrade request: never pooled again

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.dispatcher.upstreams.add(self)

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
        dispatcher = self.dispatcher
        dispatcher.now = dispatcher.loop.time()
        self.deadline = dispatcher.now + dispatcher.response_timeout
        conn = ex.conn
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            conn.flush()
            rest = data[upgrade.args[0] :]
            if conn.transport is not None and rest:
                conn.transport.write(rest)
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if not isinstance(cause, _Garbage):
                self._drop()
                conn.internal_error(ex, cause)
                return
            self._garbage(ex, str(cause))
            return
        except httptools.HttpParserError as exc:
            self._garbage(ex, f"invalid response: {exc}")
            return
        conn.flush()
        if self.renew_parser:
            self.renew_parser = False
            self.parser = httptools.HttpResponseParser(self)

    def _drop(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.exchange = None

    def _garbage(self, ex: Exchange, why: str) -> None:
        self._drop()
        if not ex.done:
            ex.conn.upstream_garbage(ex, self, why)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        dispatcher = self.dispatcher
        dispatcher.now = dispatcher.loop.time()
        dispatcher.upstreams.discard(self)
        dispatcher.pool_discard(self)
        tunnel = self.tunnel_to
        ex = self.exchange
        self.exchange = None
        self.transport = None
        if ex is not None and not ex.done:
            ex.conn.upstream_lost(ex, self, exc)
        elif tunnel is not None and tunnel.transport is not None:
            tunnel.transport.close()

    def pause_writing(self) -> None:
        ex = self.exchange
        client = ex.conn if ex is not None else self.tunnel_to
        if client is not None:
            client.pause_for_upstream(True)

    def resume_writing(self) -> None:
        ex = self.exchange
        client = ex.conn if ex is not None else self.tunnel_to
        if client is not None:
            client.pause_for_upstream(False)

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
            raise _Garbage("101 to a request without Upgrade")
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
        if ex.phase == TUNNEL:
            return
        ex.conn.response_done(ex, self)

    def timed_out(self, now: float) -> None:
        ex = self.exchange
        transport = self.transport
        if ex is None:
            if transport is not None:
                transport.close()  # idle in the pool too long
            return
        if ex.phase == TUNNEL:
            return
        if ex.conn.write_paused:
            # Our own flow control stopped reading (a slow client), not the backend: the
            # client's send timeout decides, not this one.
            self.deadline = now + self.dispatcher.send_timeout
            return
        self.exchange = None
        if transport is not None:
            transport.abort()
        ex.conn.upstream_timeout(ex)


class _Garbage(Exception):
    """Raised from a response parser callback: the backend sent something we will not pass on."""
