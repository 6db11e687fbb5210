"""DNS over TCP under abuse and load: admission before a slot is taken, per-address and total
limits, the first-query deadline, and pipelined queries answered as each is ready. The admission
rule is tested pure; the rest with real sockets on loopback (127.0.0.0/8 gives many sources)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from stablenet.dns import DnsServer
from stablenet.dns.tcp import RateLimitedWarning, TcpLimits, TcpSlots
from stablenet.registry import Registry
from tests.helpers import free_port
from tests.test_dns_server import ZONE, config, port_of, reg, scripted, serving

__all__ = ["reg"]  # the fixture


def closer() -> None:
    pass


# -- the admission rule, pure ---------------------------------------------------------------


def test_one_address_holds_at_most_per_client() -> None:
    slots = TcpSlots(TcpLimits(connections=10, per_client=2))
    assert slots.admit("10.0.0.1", closer, 0.0).slot is not None
    assert slots.admit("10.0.0.1", closer, 0.0).slot is not None
    third = slots.admit("10.0.0.1", closer, 0.0)
    assert third.slot is None and third.reason == "per_client"
    assert slots.admit("10.0.0.2", closer, 0.0).slot is not None
    assert len(slots) == 3


def test_a_full_pool_closes_the_longest_idle_of_the_biggest_holder() -> None:
    slots = TcpSlots(TcpLimits(connections=4, per_client=3))
    a1 = slots.admit("a", closer, 1.0).slot
    a2 = slots.admit("a", closer, 2.0).slot
    a3 = slots.admit("a", closer, 3.0).slot
    b1 = slots.admit("b", closer, 0.5).slot
    assert a1 and a2 and a3 and b1
    a1.idle_since = None  # a query in flight: never closed for a newcomer
    admitted = slots.admit("c", closer, 4.0)
    assert admitted.slot is not None and admitted.evicted is a2  # not b1: "a" holds the most
    assert slots.count("a") == 2 and len(slots) == 4
    a3.idle_since = None
    b1.idle_since = None
    assert admitted.slot is not None
    admitted.slot.idle_since = None
    full = slots.admit("d", closer, 5.0)  # every connection busy
    assert full.slot is None and full.reason == "full"


def test_a_newcomer_pushes_out_only_an_address_holding_more() -> None:
    slots = TcpSlots(TcpLimits(connections=4, per_client=3))
    for client, since in (("a", 1.0), ("a", 2.0), ("b", 0.5), ("b", 3.0)):
        slots.admit(client, closer, since)
    assert slots.admit("a", closer, 4.0).reason == "full"  # a holds 2, as much as b
    evicted = slots.admit("c", closer, 4.0).evicted
    assert evicted is not None and (evicted.client, evicted.idle_since) == ("b", 0.5)


# -- sockets ---------------------------------------------------------------------------------


async def connect_from(source: str, port: int) -> socket.socket:
    """A TCP connection to the server from a chosen loopback address."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((source, 0))
    await loop.sock_connect(sock, ("127.0.0.1", port))
    return sock


async def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes the connection within ``within`` seconds (EOF or reset)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within):
            return await loop.sock_recv(sock, 1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@contextlib.asynccontextmanager
async def held(sockets: list[socket.socket]) -> AsyncIterator[list[socket.socket]]:
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


async def tcp_query(server: DnsServer, name: str) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    return await dns.asyncquery.tcp(query, "127.0.0.1", port=port_of(server), timeout=5)


async def test_connections_from_outside_allow_hold_no_slot(reg: Registry) -> None:
    async with serving(reg, config(free_port(), allow=("127.0.0.1/32",))) as srv:
        port = port_of(srv)
        async with held([await connect_from("127.0.0.2", port) for _ in range(300)]) as flood:
            reply = await tcp_query(srv, f"web.{ZONE}")
            assert reply.rcode() == dns.rcode.NOERROR and reply.answer
            for sock in flood:
                assert await closed_by_server(sock, 5)
        assert srv.stats.tcp_rejected["not_allowed"] == 300


async def test_one_address_cannot_take_every_connection(
    reg: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "stablenet.dns.tcp")
    async with serving(reg, config(free_port())) as srv:
        port = port_of(srv)
        async with held([await connect_from("127.0.0.2", port) for _ in range(300)]) as flood:
            reply = await tcp_query(srv, f"web.{ZONE}")  # from 127.0.0.1, allowed as well
            assert reply.rcode() == dns.rcode.NOERROR and reply.answer
            per_client = srv.tcp.limits.per_client
            assert all([await closed_by_server(sock, 5) for sock in flood[per_client:]])
        assert srv.stats.tcp_rejected["per_client"] == 300 - per_client
    warnings = [r.getMessage() for r in caplog.records if "limit reached" in r.getMessage()]
    assert len(warnings) == 1 and "per_client" in warnings[0]  # rate-limited


async def test_a_full_pool_lets_a_new_allowed_client_in(reg: Registry) -> None:
    limits = TcpLimits(connections=8, per_client=4)
    async with DnsServer(reg, config(free_port()), tcp_limits=limits) as srv:
        port = port_of(srv)
        async with held(
            [await connect_from(f"127.0.0.{2 + i // 4}", port) for i in range(8)]
        ) as silent:
            reply = await tcp_query(srv, f"web.{ZONE}")
            assert reply.rcode() == dns.rcode.NOERROR and reply.answer
            assert await closed_by_server(silent[0], 5)  # the longest idle one made room
        assert srv.stats.tcp_evicted == 1


async def test_first_query_deadline_is_short_then_idle_timeout_applies(reg: Registry) -> None:
    async with serving(reg, config(free_port())) as srv:
        port = port_of(srv)
        loop = asyncio.get_running_loop()
        talker = await connect_from("127.0.0.1", port)
        async with held([talker, await connect_from("127.0.0.1", port)]) as (_, silent):
            query = dns.message.make_query(f"web.{ZONE}", "A")
            for attempt in range(2):
                wire = query.to_wire()
                await loop.sock_sendall(talker, struct.pack("!H", len(wire)) + wire)
                size = struct.unpack("!H", await recv_exactly(talker, 2))[0]
                reply = dns.message.from_wire(await recv_exactly(talker, size))
                assert reply.id == query.id and reply.answer
                if attempt == 0:
                    # A connection that never sends a query is closed after 2 s, not 10 s...
                    assert await closed_by_server(silent, 5)
            # ... while one that did stays open past that for its next query.


async def recv_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = b""
    async with asyncio.timeout(5):
        while len(out) < size:
            chunk = await loop.sock_recv(sock, size - len(out))
            assert chunk, "closed by the server"
            out += chunk
    return out


def framed(*queries: dns.message.Message) -> bytes:
    out = b""
    for query in queries:
        wire = query.to_wire()
        out += struct.pack("!H", len(wire)) + wire
    return out


async def read_reply(reader: asyncio.StreamReader) -> dns.message.Message:
    async with asyncio.timeout(3):
        size = struct.unpack("!H", await reader.readexactly(2))[0]
        return dns.message.from_wire(await reader.readexactly(size))


async def test_pipelined_queries_are_answered_as_each_is_ready(reg: Registry) -> None:
    async with scripted(hold=("slow.test",)) as (upstream, address):
        cfg = config(free_port(), upstreams=(address,), forward_timeout=5.0)
        async with serving(reg, cfg) as srv:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(srv))
            try:
                slow = dns.message.make_query("slow.test", "A")
                fast = dns.message.make_query(f"web.{ZONE}", "A")
                other = dns.message.make_query("other.test", "A")
                writer.write(framed(slow, fast, other))
                first, second = await read_reply(reader), await read_reply(reader)
                assert {first.id, second.id} == {fast.id, other.id}  # not behind the slow one
                upstream.release("slow.test")
                last = await read_reply(reader)
                assert last.id == slow.id and last.answer
            finally:
                writer.close()


async def test_pipelined_answers_in_progress_are_bounded(reg: Registry) -> None:
    names = ("s1.test", "s2.test", "s3.test")
    async with scripted(hold=names) as (upstream, address):
        cfg = config(free_port(), upstreams=(address,), forward_timeout=5.0)
        limits = TcpLimits(pipeline=2)
        async with DnsServer(reg, cfg, tcp_limits=limits) as srv:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(srv))
            try:
                writer.write(framed(*(dns.message.make_query(n, "A") for n in names)))
                await upstream.until_asked(2)
                await tcp_query(srv, f"web.{ZONE}")  # a round trip: the server had its turn
                assert upstream.asked == ["s1.test", "s2.test"]
                upstream.release("s1.test")
                assert (await read_reply(reader)).question[0].name.to_text() == "s1.test."
                await upstream.until_asked(3)  # room again: the third goes out
                upstream.release("s2.test")
                upstream.release("s3.test")
                rest = {(await read_reply(reader)).question[0].name.to_text() for _ in range(2)}
                assert rest == {"s2.test.", "s3.test."}
            finally:
                writer.close()


def test_limit_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "stablenet.dns.tcp")
    warn = RateLimitedWarning(every=10.0)
    for now in (0.0, 1.0, 2.0, 12.0):
        warn(now, "limit reached for %s", "x")
    assert [r.getMessage() for r in caplog.records] == [
        "limit reached for x",
        "limit reached for x (2 more since the last warning)",
    ]


async def test_connections_halfway_through_a_message_can_still_be_closed_for_a_newcomer(
    reg: Registry,
) -> None:
    """Sending a length and then nothing must not make a connection unevictable."""
    limits = TcpLimits(connections=4, per_client=2)
    async with DnsServer(reg, config(free_port()), tcp_limits=limits) as srv:
        port = port_of(srv)
        loop = asyncio.get_running_loop()
        half = [await connect_from(f"127.0.0.{2 + i // 2}", port) for i in range(4)]
        async with held(half):
            for sock in half:
                await loop.sock_sendall(sock, b"\x00\x40")  # 64 bytes announced, none sent
            reply = await tcp_query(srv, f"web.{ZONE}")
            assert reply.rcode() == dns.rcode.NOERROR and reply.answer
        assert srv.stats.tcp_evicted >= 1
        assert srv.stats.tcp_rejected["full"] == 0


async def test_a_client_that_never_reads_is_let_go_with_its_socket(reg: Registry) -> None:
    """Replies it never reads keep asyncio's close from ever finishing: the socket must be
    reset, not left open outside every limit."""
    from stablenet.model import Upsert
    from tests.test_dns_server import endpoint

    reg.apply([Upsert(endpoint(i, "big", "10.4")) for i in range(300)])  # ~20 KB answers
    limits = TcpLimits(write_timeout=0.3)
    async with DnsServer(reg, config(free_port()), tcp_limits=limits) as srv:
        port = port_of(srv)
        loop = asyncio.get_running_loop()
        sock = await connect_from("127.0.0.2", port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        query = dns.message.make_query(f"_80._tcp.big.{ZONE}", "SRV").to_wire()
        async with held([sock]):
            # About 10 MB of answers: more than every buffer on the way can hold.
            await loop.sock_sendall(sock, (struct.pack("!H", len(query)) + query) * 500)
            error = 0
            for _ in range(500):  # 5 s: the write timeout, then a second's grace, then a reset
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    break
                await asyncio.sleep(0.01)
        assert error == errno.ECONNRESET
        assert srv.tcp.slots.count("127.0.0.2") == 0


async def test_an_answer_too_large_for_tcp_is_servfail(reg: Registry) -> None:
    from stablenet.model import Upsert
    from tests.test_dns_server import endpoint

    reg.apply([Upsert(endpoint(i, "big", "10.4")) for i in range(1500)])
    async with serving(reg, config(free_port())) as srv:
        query = dns.message.make_query(f"_80._tcp.big.{ZONE}", "SRV")
        reply = await dns.asyncquery.tcp(query, "127.0.0.1", port=port_of(srv), timeout=5)
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert srv.stats.internal_errors == 1
