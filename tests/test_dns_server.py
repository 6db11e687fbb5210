"""The DNS server with real clients on loopback: dnspython, dig, a local dnsmasq upstream, and a
container that uses stablenet as its resolver on a network the test creates."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from stablenet.config import DnsConfig
from stablenet.dns import DnsServer
from stablenet.errors import StartupError
from stablenet.model import Endpoint, Upsert
from stablenet.registry import Registry
from tests.helpers import Containers, free_port, ip_of, off_loop

ZONE = "stablenet.internal"


def config(port: int, **kw: Any) -> DnsConfig:
    base = DnsConfig(
        listen=(f"127.0.0.1:{port}",),
        allow=("127.0.0.0/8",),
        upstreams=(),
        ttl=1.0,
        forward_timeout=1.0,
    )
    return replace(base, **kw)


def endpoint(i: int, service: str = "web", prefix: str = "10.3") -> Endpoint:
    address = f"{prefix}.{i // 200}.{i % 200 + 1}"
    return Endpoint(
        id=f"id{service}{i}",
        name=f"{service}-{i}",
        service=service,
        address=address,
        port=80,
        network="bridge",
        addresses=(address,),
    )


@pytest.fixture
def reg() -> Registry:
    registry = Registry()
    registry.apply([Upsert(endpoint(i)) for i in range(2)])
    registry.apply([Upsert(endpoint(i, "big", "10.4")) for i in range(100)])
    return registry


@contextlib.asynccontextmanager
async def serving(registry: Registry, cfg: DnsConfig) -> AsyncIterator[DnsServer]:
    async with DnsServer(registry, cfg) as server:
        yield server


@pytest.fixture
async def server(reg: Registry) -> AsyncIterator[DnsServer]:
    async with serving(reg, config(free_port())) as srv:
        yield srv


def port_of(server: DnsServer) -> int:
    return server.bound[0][1]


async def udp(server: DnsServer, name: str, rdtype: str = "A", **kw: Any) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port_of(server), timeout=5)


async def test_dnspython_over_udp_and_tcp(server: DnsServer) -> None:
    reply = await udp(server, f"web.{ZONE}")
    assert reply.flags & dns.flags.AA
    assert {r.to_text() for r in reply.answer[0]} == {"10.3.0.1", "10.3.0.2"}
    assert reply.answer[0].ttl == 1  # dns.ttl: answers that can change live one second
    query = dns.message.make_query(f"web-1.{ZONE}", "A")
    over_tcp = await dns.asyncquery.tcp(query, "127.0.0.1", port=port_of(server), timeout=5)
    assert [r.to_text() for r in over_tcp.answer[0]] == ["10.3.0.2"]
    missing = await udp(server, f"nope.{ZONE}")
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert missing.authority[0].rdtype == dns.rdatatype.SOA


async def test_truncated_udp_answer_is_retried_over_tcp(server: DnsServer) -> None:
    query = dns.message.make_query(f"big.{ZONE}", "A")
    reply, used_tcp = await dns.asyncquery.udp_with_fallback(
        query, "127.0.0.1", port=port_of(server), timeout=5
    )
    assert used_tcp
    assert len(reply.answer[0]) == 100
    assert server.stats.truncated >= 1


async def dig(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "dig", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_dig(server: DnsServer) -> None:
    at = ["@127.0.0.1", "-p", str(port_of(server))]
    short = await dig(*at, f"web.{ZONE}", "A", "+short")
    assert sorted(short.split()) == ["10.3.0.1", "10.3.0.2"]
    full = await dig(*at, f"web-0.{ZONE}", "AAAA")
    assert "status: NOERROR" in full and " aa" in full and "ANSWER: 0" in full
    assert "SOA" in full  # NODATA: the SOA is in authority
    nx = await dig(*at, f"nope.{ZONE}")
    assert "status: NXDOMAIN" in nx
    big = await dig(*at, f"big.{ZONE}", "+tcp", "+short")
    assert len(big.split()) == 100
    # dig retries over TCP on its own after a truncated UDP answer
    retried = await dig(*at, f"big.{ZONE}", "+bufsize=512")
    assert "Truncated, retrying in TCP mode" in retried and "ANSWER: 100" in retried
    srv = await dig(*at, f"_80._tcp.web.{ZONE}", "SRV", "+short")
    assert sorted(srv.splitlines()) == [f"0 1 80 web-0.{ZONE}.", f"0 1 80 web-1.{ZONE}."]
    ptr = await dig(*at, "-x", "10.3.0.1", "+short")
    assert ptr.strip() == f"web-0.{ZONE}."


async def test_refused_for_a_client_outside_allow(reg: Registry) -> None:
    async with serving(reg, config(free_port(), allow=("10.0.0.0/8",))) as srv:
        for name in (f"web.{ZONE}", "example.com"):
            reply = await udp(srv, name)
            assert reply.rcode() == dns.rcode.REFUSED
        assert srv.stats.refused == 2
        assert srv.stats.forwarded == 0


async def test_listen_on_a_busy_port_is_a_startup_error(reg: Registry) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        with pytest.raises(StartupError, match="dns.listen"):
            async with serving(reg, config(port)):
                pass


async def test_garbage_over_the_socket_is_counted_and_server_keeps_answering(
    server: DnsServer,
) -> None:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port_of(server)))
        for packet in (
            b"",
            b"\x00",
            b"\xff" * 11,
            b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x40",
        ):
            await loop.sock_sendall(sock, packet)
        reply = await asyncio.wait_for(loop.sock_recv(sock, 512), 5)  # the FORMERR one
        assert reply[:2] == b"\x12\x34" and reply[3] & 0xF == dns.rcode.FORMERR
    assert (await udp(server, f"web.{ZONE}")).rcode() == dns.rcode.NOERROR
    assert server.stats.malformed == 4


# -- forwarding -----------------------------------------------------------------------------


class Dnsmasq:
    """A dnsmasq on a loopback port with known records, started and stopped by its PID."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        self.proc = subprocess.Popen(
            [
                dnsmasq,
                "--no-daemon",
                "--conf-file=/dev/null",
                "--port",
                str(self.port),
                "--listen-address",
                "127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--local-ttl=60",
                "--address=/known.test/10.9.9.9",
                "--address=/other.test/10.9.9.10",
                "--user=root",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        probe = dns.message.make_query("known.test", "A")
        while True:  # ready when it answers
            try:
                dns.query.udp(probe, "127.0.0.1", port=self.port, timeout=0.2)
                return
            except (dns.exception.Timeout, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("dnsmasq did not start") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def dnsmasq() -> Iterator[Dnsmasq]:
    upstream = Dnsmasq()
    upstream.start()
    yield upstream
    upstream.stop()


async def test_forwarding_cache_and_servfail_when_the_upstream_is_down(
    reg: Registry, dnsmasq: Dnsmasq
) -> None:
    cfg = config(free_port(), upstreams=(f"127.0.0.1:{dnsmasq.port}",), forward_timeout=1.0)
    async with serving(reg, cfg) as srv:
        reply = await udp(srv, "known.test")
        assert [r.to_text() for r in reply.answer[0]] == ["10.9.9.9"]
        assert not reply.flags & dns.flags.AA and reply.flags & dns.flags.RA
        assert srv.stats.forwarded == 1
        # zone names are never forwarded
        assert (await udp(srv, f"nope.{ZONE}")).rcode() == dns.rcode.NXDOMAIN
        assert srv.stats.forwarded == 1
        await off_loop(dnsmasq.stop)
        cached = await udp(srv, "known.test")
        assert [r.to_text() for r in cached.answer[0]] == ["10.9.9.9"]
        assert 0 < cached.answer[0].ttl <= 60
        assert srv.stats.forwarded == 1
        started = time.monotonic()
        down = await udp(srv, "other.test")
        assert down.rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - started < cfg.forward_timeout + 0.5
        assert srv.stats.forward_failures == 1


class SilentUpstream(asyncio.DatagramProtocol):
    """Receives queries and never answers: an upstream that is blackholed."""

    def __init__(self) -> None:
        self.received = 0
        self.got_one = asyncio.Event()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received += 1
        self.got_one.set()


class TruncatingUpstream(asyncio.DatagramProtocol):
    """Answers every UDP query with TC set and no records; the full answer is on TCP."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = dns.message.make_response(dns.message.from_wire(data))
        reply.flags |= dns.flags.TC
        self.transport.sendto(reply.to_wire(), addr)


def big_answer(data: bytes) -> bytes:
    query = dns.message.from_wire(data)
    reply = dns.message.make_response(query)
    name = query.question[0].name.to_text()
    reply.answer.append(
        dns.rrset.from_text_list(name, 30, "IN", "A", [f"10.8.{i}.1" for i in range(60)])
    )
    return reply.to_wire()


async def test_upstream_timeout_is_servfail_within_the_timeout(reg: Registry) -> None:
    loop = asyncio.get_running_loop()
    transport, silent = await loop.create_datagram_endpoint(
        SilentUpstream, local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    try:
        cfg = config(free_port(), upstreams=(f"127.0.0.1:{port}",), forward_timeout=0.5)
        async with serving(reg, cfg) as srv:
            started = time.monotonic()
            reply = await udp(srv, "slow.test")
            elapsed = time.monotonic() - started
            assert reply.rcode() == dns.rcode.SERVFAIL
            assert 0.4 < elapsed < 1.5
            assert silent.received == 1
    finally:
        transport.close()


async def test_forwards_in_flight_are_capped(reg: Registry) -> None:
    loop = asyncio.get_running_loop()
    transport, silent = await loop.create_datagram_endpoint(
        SilentUpstream, local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    try:
        cfg = config(
            free_port(), upstreams=(f"127.0.0.1:{port}",), forward_timeout=1.0, max_forwards=1
        )
        async with serving(reg, cfg) as srv:
            async with asyncio.TaskGroup() as tasks:
                first = tasks.create_task(udp(srv, "one.test"))
                async with asyncio.timeout(5):
                    await silent.got_one.wait()  # the first question is in flight upstream
                started = time.monotonic()
                second = await udp(srv, "two.test")
                assert second.rcode() == dns.rcode.SERVFAIL
                assert time.monotonic() - started < 0.5  # at once, not after the timeout
                assert srv.stats.forward_overflow == 1
            assert first.result().rcode() == dns.rcode.SERVFAIL
    finally:
        transport.close()


async def test_truncated_upstream_reply_is_retried_over_tcp(reg: Registry) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        TruncatingUpstream, local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]

    async def tcp_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int.from_bytes(await reader.readexactly(2), "big")
        reply = big_answer(await reader.readexactly(size))
        writer.write(len(reply).to_bytes(2, "big") + reply)
        await writer.drain()
        writer.close()

    tcp_server = await asyncio.start_server(tcp_upstream, "127.0.0.1", port)
    try:
        cfg = config(free_port(), upstreams=(f"127.0.0.1:{port}",))
        async with serving(reg, cfg) as srv:
            query = dns.message.make_query("many.test", "A")
            reply, used_tcp = await dns.asyncquery.udp_with_fallback(
                query, "127.0.0.1", port=port_of(srv), timeout=5
            )
            assert used_tcp  # too big for the client's 512 bytes: TC to it as well
            assert len(reply.answer[0]) == 60
            assert srv.stats.forwarded == 1  # the TCP retry was served from the cache
    finally:
        transport.close()
        tcp_server.close()
        await tcp_server.wait_closed()


# -- a container that uses stablenet as its resolver -------------------------------------------


def nslookup(client: Any, name: str) -> set[str]:
    result = client.exec_run(["nslookup", "-type=a", name])
    text = result.output.decode()
    assert result.exit_code == 0, text
    found = set()
    after_name = False
    for line in text.splitlines():
        if line.startswith("Name:"):
            after_name = True
        elif after_name and line.startswith("Address:"):
            found.add(line.split()[1])
    return found


@pytest.mark.engine
async def test_container_resolves_a_service_and_sees_its_new_address_after_restart(
    containers: Containers, registry: Registry
) -> None:
    # A network of the test's own: stablenet listens on its gateway (an address on this host
    # that the engine added for the test), port 53, as `dns.listen = docker:53` would in use.
    net = await off_loop(containers.network, "dns")
    net.reload()
    ipam = net.attrs["IPAM"]["Config"][0]
    gateway, subnet = ipam["Gateway"], ipam["Subnet"]
    service = containers.name("svc")
    svc = await off_loop(containers.run, "svc", labels={"stablenet.service": service})
    old_ip = await off_loop(ip_of, svc)
    cfg = config(53, listen=(f"{gateway}:53",), allow=(subnet,), ttl=1.0)
    async with DnsServer(registry, cfg):
        async with asyncio.timeout(30):
            await registry.until(
                lambda snap: [e.address for e in snap.ready.get(service, ())] == [old_ip]
            )
        client = await off_loop(
            containers.run, "client", command=["sleep", "120"], network=net.name, dns=[gateway]
        )
        name = f"{service}.{ZONE}"
        assert await off_loop(nslookup, client, name) == {old_ip}

        # Restart the service with a new address: while it is stopped, another container takes
        # its old one.
        await off_loop(svc.stop, timeout=1)
        await off_loop(containers.run, "squatter")
        await off_loop(svc.start)
        new_ip = await off_loop(ip_of, svc)
        assert new_ip != old_ip
        async with asyncio.timeout(30):
            await registry.until(
                lambda snap: [e.address for e in snap.ready.get(service, ())] == [new_ip]
            )
        # Neither stablenet nor busybox nor Docker's embedded resolver caches past the registry
        # change: the next lookup already has only the new address (others may keep the old
        # one for at most dns.ttl, 1 s here).
        assert await off_loop(nslookup, client, name) == {new_ip}


class ScriptedUpstream(asyncio.DatagramProtocol):
    """An upstream that answers by a script: ``rcode`` for every question, or an A record; names
    listed in ``hold`` are kept unanswered until ``release(name)``. Every question is recorded."""

    def __init__(
        self, rcode: dns.rcode.Rcode = dns.rcode.NOERROR, hold: tuple[str, ...] = ()
    ) -> None:
        self.rcode = rcode
        self.hold = set(hold)
        self.asked: list[str] = []
        self.held: dict[str, tuple[dns.message.Message, Any]] = {}
        self.changed = asyncio.Event()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        name = query.question[0].name.to_text(omit_final_dot=True)
        self.asked.append(name)
        self.changed.set()
        if name in self.hold:
            self.held[name] = (query, addr)
        else:
            self.answer(query, addr)

    def answer(self, query: dns.message.Message, addr: Any) -> None:
        reply = dns.message.make_response(query)
        reply.set_rcode(self.rcode)
        if self.rcode == dns.rcode.NOERROR:
            name = query.question[0].name
            reply.answer.append(dns.rrset.from_text(name, 30, "IN", "A", "10.7.7.7"))
        self.transport.sendto(reply.to_wire(), addr)

    def release(self, name: str) -> None:
        self.answer(*self.held.pop(name))

    async def until_asked(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.asked) < count:
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def scripted(**kw: Any) -> AsyncIterator[tuple[ScriptedUpstream, str]]:
    """A ScriptedUpstream on a loopback port, and its address for dns.upstreams."""
    loop = asyncio.get_running_loop()
    transport, upstream = await loop.create_datagram_endpoint(
        lambda: ScriptedUpstream(**kw), local_addr=("127.0.0.1", 0)
    )
    try:
        yield upstream, f"127.0.0.1:{transport.get_extra_info('sockname')[1]}"
    finally:
        transport.close()


@pytest.mark.parametrize("rcode", [dns.rcode.SERVFAIL, dns.rcode.REFUSED])
async def test_an_upstream_error_answer_tries_the_next_upstream(
    reg: Registry, rcode: dns.rcode.Rcode
) -> None:
    async with (
        scripted(rcode=rcode) as (failing, first),
        scripted() as (working, second),
        serving(reg, config(free_port(), upstreams=(first, second))) as srv,
    ):
        reply = await udp(srv, "next.test")
        assert reply.rcode() == dns.rcode.NOERROR
        assert [r.to_text() for r in reply.answer[0]] == ["10.7.7.7"]
        assert failing.asked == working.asked == ["next.test"]
        assert srv.stats.upstream_errors == 1


async def test_servfail_only_when_every_upstream_fails(reg: Registry) -> None:
    async with (
        scripted(rcode=dns.rcode.REFUSED) as (one, first),
        scripted(rcode=dns.rcode.SERVFAIL) as (two, second),
        serving(reg, config(free_port(), upstreams=(first, second))) as srv,
    ):
        reply = await udp(srv, "nowhere.test")
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert one.asked == two.asked == ["nowhere.test"]
