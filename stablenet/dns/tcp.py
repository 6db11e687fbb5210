"""DNS over TCP (RFC 7766): who gets a connection, and the per-connection loop.

Admission (``TcpSlots``, pure, the time is a parameter) runs before anything is read:
  * a client outside dns.allow is closed at once and never holds a slot;
  * one address holds at most ``per_client`` connections;
  * when all ``connections`` slots are taken, the longest idle connection of the address holding
    the most (more than the newcomer) is closed to let the newcomer in; only when every
    connection is busy with a query is the newcomer closed. So no set of addresses can keep an
    allowed client out by holding silent connections.
A connection must send its first query within ``first_query`` seconds, then may stay idle
``idle`` seconds between queries (RFC 7766 6.2.3: short idle timeouts under load); once a
message's length has arrived, its bytes must follow within ``first_query`` seconds, and the
connection counts as idle (so it can be closed for a newcomer) until they have. A connection we
give up on is reset if it has not flushed within a second: a client that never reads keeps no
socket. An answer too large for TCP's two-byte length is a SERVFAIL.

Queries pipelined on a connection are answered concurrently, at most ``pipeline`` at a time
(reading pauses beyond that), each reply written as soon as it is ready, so in any order
(RFC 7766 6.2.1.1). ``TcpFrontend`` is the asyncio adapter; DnsServer owns it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from stablenet.dns import wire
from stablenet.dns.core import Forward, Resolver
from stablenet.dns.stats import DnsStats
from stablenet.registry import Registry

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("!H")
_NO_LINGER = struct.pack("ii", 1, 0)
WARN_EVERY = 10.0  # seconds between two warnings about the same limit
MAX_MESSAGE = 0xFFFF  # the largest DNS message TCP's two-byte length can frame
CLOSE_GRACE = 1.0  # seconds a closing connection gets to flush its replies before a reset
YIELD_EVERY = 32  # queries answered on one connection before letting the others run


@dataclass(frozen=True, slots=True)
class TcpLimits:
    connections: int = 256  # open TCP connections in all
    per_client: int = 32  # open TCP connections from one address
    first_query: float = 2.0  # seconds from accept to the first query's last byte
    idle: float = 10.0  # seconds a connection may stay silent with no query in flight
    pipeline: int = 16  # queries of one connection answered at once
    write_timeout: float = 10.0  # seconds a client may leave replies unread


@dataclass(slots=True, eq=False)
class Slot:
    """One admitted connection. ``idle_since`` is None while a query is read or answered."""

    client: str
    idle_since: float | None
    close: Callable[[], None]
    pending: int = 0


@dataclass(frozen=True, slots=True)
class Admission:
    slot: Slot | None  # None: close the newcomer, for ``reason``
    evicted: Slot | None = None  # an idle connection closed to make room
    reason: str = ""


class TcpSlots:
    """The admission rule above. Pure: no sockets, the time is a parameter."""

    def __init__(self, limits: TcpLimits) -> None:
        self.limits = limits
        self._by_client: dict[str, set[Slot]] = {}
        self._total = 0

    def __len__(self) -> int:
        return self._total

    def count(self, client: str) -> int:
        return len(self._by_client.get(client, ()))

    def slots(self) -> list[Slot]:
        return [slot for held in self._by_client.values() for slot in held]

    def admit(self, client: str, close: Callable[[], None], now: float) -> Admission:
        held = self.count(client)
        if held >= self.limits.per_client:
            return Admission(None, reason="per_client")
        evicted = None
        if self._total >= self.limits.connections:
            evicted = self._victim(held)
            if evicted is None:
                return Admission(None, reason="full")
            self.release(evicted)
        slot = Slot(client, now, close)
        self._by_client.setdefault(client, set()).add(slot)
        self._total += 1
        return Admission(slot, evicted)

    def release(self, slot: Slot) -> None:
        """Give the slot back (again is harmless)."""
        held = self._by_client.get(slot.client)
        if held is None or slot not in held:
            return
        held.discard(slot)
        self._total -= 1
        if not held:
            del self._by_client[slot.client]

    def _victim(self, newcomer_holds: int) -> Slot | None:
        """The longest idle connection of the address holding the most, if that is more than
        the newcomer holds."""
        best: tuple[int, float] | None = None
        victim = None
        for held in self._by_client.values():
            if len(held) <= newcomer_holds:
                continue
            for slot in held:
                if slot.idle_since is None:
                    continue
                rank = (len(held), -slot.idle_since)
                if best is None or rank > best:
                    best, victim = rank, slot
        return victim


@dataclass(slots=True)
class RateLimitedWarning:
    """At most one warning per ``every`` seconds, saying how many were held back."""

    every: float = WARN_EVERY
    _last: float = field(default=-float("inf"))
    _held: int = 0

    def __call__(self, now: float, msg: str, *args: object) -> None:
        if now - self._last < self.every:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        if held:
            logger.warning(msg + " (%d more since the last warning)", *args, held)
        else:
            logger.warning(msg, *args)


Forwarding = Callable[[Forward], Awaitable[bytes | None]]


class TcpFrontend:
    """Accepts DNS-over-TCP connections for a DnsServer: admission, then the query loop."""

    def __init__(
        self,
        resolver: Resolver,
        registry: Registry,
        forward: Forwarding,
        stats: DnsStats,
        limits: TcpLimits,
    ) -> None:
        self._resolver = resolver
        self._registry = registry
        self._forward = forward
        self.stats = stats
        self.limits = limits
        self.slots = TcpSlots(limits)
        self._warn: dict[str, RateLimitedWarning] = {}
        self._handlers: set[asyncio.Task[None]] = set()

    def close_all(self) -> None:
        """Close every connection and stop its loop (server shutdown)."""
        for slot in self.slots.slots():
            slot.close()
        for task in self._handlers:
            task.cancel()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The asyncio.start_server callback: one per connection."""
        loop = asyncio.get_running_loop()
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else ""
        if not self._resolver.allowed(client):
            self.stats.tcp_rejected["not_allowed"] += 1
            writer.close()
            return
        admission = self.slots.admit(client, writer.transport.abort, loop.time())
        if admission.evicted is not None:
            self.stats.tcp_evicted += 1
            admission.evicted.close()
            self._warning("evicted")(
                loop.time(),
                "DNS: all %d TCP connections taken; closed an idle one from %s for %s",
                self.limits.connections,
                admission.evicted.client,
                client,
            )
        slot = admission.slot
        if slot is None:
            self.stats.tcp_rejected[admission.reason] += 1
            self._warning(admission.reason)(
                loop.time(),
                "DNS: TCP connection from %s closed, limit reached: %s (%d per address, %d in all)",
                client,
                admission.reason,
                self.limits.per_client,
                self.limits.connections,
            )
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            async with asyncio.TaskGroup() as replies:
                await self._read_queries(reader, writer, slot, replies)
        except asyncio.CancelledError:
            pass  # close_all at shutdown; asyncio would report a cancelled handler as an error
        finally:
            self._handlers.discard(task)
            self.slots.release(slot)
            await _close(writer)

    def _warning(self, reason: str) -> RateLimitedWarning:
        return self._warn.setdefault(reason, RateLimitedWarning())

    async def _read_queries(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        slot: Slot,
        replies: asyncio.TaskGroup,
    ) -> None:
        loop = asyncio.get_running_loop()
        room = asyncio.Semaphore(self.limits.pipeline)
        limit = self.limits.first_query
        answered = 0
        try:
            while True:
                since = slot.idle_since
                deadline = (loop.time() if since is None else since) + limit
                try:
                    async with asyncio.timeout_at(deadline):
                        head = await reader.readexactly(2)
                except TimeoutError:
                    if slot.pending or (
                        slot.idle_since is not None and slot.idle_since + limit > loop.time()
                    ):
                        continue  # answers were on their way: idle only since the last one
                    return
                async with asyncio.timeout(self.limits.first_query):  # the rest follows at once
                    data = await reader.readexactly(_LENGTH.unpack(head)[0])
                slot.idle_since = None
                limit = self.limits.idle
                out = self._answer(data, slot.client, loop.time())
                if isinstance(out, Forward):
                    await room.acquire()  # at most ``pipeline`` answers pending: stop reading
                    slot.pending += 1
                    replies.create_task(self._reply_later(out, writer, slot, room, data))
                elif out is not None:
                    writer.write(self._framed(out, data))
                elif len(data) < wire.HEADER.size:
                    return  # not even a header: nothing more will make sense
                if not slot.pending:
                    slot.idle_since = loop.time()
                async with asyncio.timeout(self.limits.write_timeout):
                    await writer.drain()  # a client that never reads is dropped
                answered += 1
                if answered % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # a long pipeline must not hold the loop
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return

    def _answer(self, data: bytes, client: str, now: float) -> bytes | Forward | None:
        try:
            return self._resolver.tcp(data, client, self._registry.snapshot, now)
        except Exception:  # a bug must cost one query, never the server
            self.stats.internal_errors += 1
            logger.exception("DNS query over TCP from %s failed", client)
            return None

    def _framed(self, out: bytes, query: bytes) -> bytes:
        """The reply with its two-byte length; SERVFAIL when it is too large to frame."""
        if len(out) > MAX_MESSAGE:
            self.stats.internal_errors += 1
            logger.warning(
                "DNS: an answer over TCP would be %d bytes, more than %d: answered SERVFAIL",
                len(out),
                MAX_MESSAGE,
            )
            try:
                out = wire.short_reply(wire.parse_query(query), wire.Rcode.SERVFAIL, ra=True)
            except (wire.NotAQuery, wire.Malformed):
                out = wire.header_reply(query[: wire.HEADER.size], wire.Rcode.SERVFAIL, ra=True)
        return _LENGTH.pack(len(out)) + out

    async def _reply_later(
        self,
        request: Forward,
        writer: asyncio.StreamWriter,
        slot: Slot,
        room: asyncio.Semaphore,
        query: bytes,
    ) -> None:
        try:
            out = await self._forward(request)
        finally:
            room.release()
            slot.pending -= 1
            if not slot.pending:
                slot.idle_since = asyncio.get_running_loop().time()
        if out is not None and not writer.is_closing():
            with contextlib.suppress(ConnectionError):
                writer.write(self._framed(out, query))


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close, letting queued replies go out for CLOSE_GRACE seconds, then reset: asyncio's close
    waits for the send buffer to empty, which a client that never reads never lets happen."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_GRACE):
            await writer.wait_closed()
    except (TimeoutError, ConnectionError, OSError):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # a reset: drop what the client never read
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
        writer.transport.abort()
