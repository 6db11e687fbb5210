"""The probes of ISC's DNS compliance tests (genreport / ednscomp: plain DNS, header flags,
EDNS versions, options and flags, opcodes, unknown types, TCP) sent over real UDP and TCP to a
DnsServer on loopback, each reply checked exactly: rcode, every header flag, the sections, and
the OPT record. README's DNS section lists the same results."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest

from stablenet.dns import DnsServer
from stablenet.dns.wire import HEADER
from stablenet.registry import Registry
from tests.helpers import free_port
from tests.test_dns_server import ZONE, config, serving

QR, AA, RD, RA, CD = dns.flags.QR, dns.flags.AA, dns.flags.RD, dns.flags.RA, dns.flags.CD
NO_EDNS = -1


@dataclass(frozen=True)
class Probe:
    """One ISC check: the query, and the reply expected in every detail."""

    query: Callable[[], dns.message.Message]
    rcode: dns.rcode.Rcode
    flags: int  # the reply's header flags, exactly
    answer: tuple[str, ...] = ()  # rdtypes of the answer section
    authority: tuple[str, ...] = ()
    edns: int = NO_EDNS  # the reply's OPT version, NO_EDNS for none
    ednsflags: int = 0  # the reply's EDNS flags, exactly (DO when echoed)
    tcp: bool = False


def q(rdtype: str = "SOA", flags: int = 0, **edns: object) -> Callable[[], dns.message.Message]:
    """A query for the zone apex, recursion not desired unless ``flags`` says so."""

    def make() -> dns.message.Message:
        version = edns.pop("use_edns", None)
        query = dns.message.make_query(ZONE, rdtype, use_edns=version, **edns)  # type: ignore[arg-type]
        query.flags = flags
        return query

    return make


def opt(code: int) -> dns.edns.GenericOption:
    return dns.edns.GenericOption(dns.edns.OptionType(code), b"")


PROBES = {
    # genreport "dns": plain DNS, no EDNS
    "dns": Probe(q(), dns.rcode.NOERROR, QR | AA | RA, answer=("SOA",)),
    # "aa" / "rd": AA on the zone's answers; RD copied
    "rd": Probe(q(flags=RD), dns.rcode.NOERROR, QR | AA | RD | RA, answer=("SOA",)),
    # "zflag": the header's Z bit is ignored and not echoed
    "zflag": Probe(q(flags=0x0040), dns.rcode.NOERROR, QR | AA | RA, answer=("SOA",)),
    # "cd": CD copied (RFC 4035 3.2.2); "ad": AD not set, nothing here is validated
    "cd": Probe(q(flags=CD), dns.rcode.NOERROR, QR | AA | RA | CD, answer=("SOA",)),
    "ad": Probe(q(flags=dns.flags.AD), dns.rcode.NOERROR, QR | AA | RA, answer=("SOA",)),
    # "edns": EDNS version 0, OPT version 0 back
    "edns": Probe(q(use_edns=0), dns.rcode.NOERROR, QR | AA | RA, answer=("SOA",), edns=0),
    # "edns1": an unknown EDNS version gets BADVERS with an OPT of version 0, no answer
    "edns1": Probe(q(use_edns=1), dns.rcode.BADVERS, QR | RA, edns=0),
    # "edns@512": DNSKEY with DO and a 512-byte buffer: a NODATA that fits
    "edns@512": Probe(
        q("DNSKEY", use_edns=0, payload=512, want_dnssec=True),
        dns.rcode.NOERROR,
        QR | AA | RA,
        authority=("SOA",),
        edns=0,
        ednsflags=dns.flags.DO,
    ),
    # "ednsopt": an unknown option is ignored, not echoed
    "ednsopt": Probe(
        q(use_edns=0, options=[opt(100)]), dns.rcode.NOERROR, QR | AA | RA, ("SOA",), edns=0
    ),
    # "edns1opt": version 1 with an unknown option: BADVERS, version 0, no option
    "edns1opt": Probe(q(use_edns=1, options=[opt(100)]), dns.rcode.BADVERS, QR | RA, edns=0),
    # "do": DO echoed (RFC 3225 3)
    "do": Probe(
        q(use_edns=0, want_dnssec=True),
        dns.rcode.NOERROR,
        QR | AA | RA,
        ("SOA",),
        edns=0,
        ednsflags=dns.flags.DO,
    ),
    # "docd"
    "docd": Probe(
        q(flags=CD, use_edns=0, want_dnssec=True),
        dns.rcode.NOERROR,
        QR | AA | RA | CD,
        ("SOA",),
        edns=0,
        ednsflags=dns.flags.DO,
    ),
    # "ednsflags": an unknown EDNS flag is ignored and cleared
    "ednsflags": Probe(
        q(use_edns=0, ednsflags=0x80), dns.rcode.NOERROR, QR | AA | RA, ("SOA",), edns=0
    ),
    # "optlist": NSID, ECS, EXPIRE, COOKIE: none implemented, all ignored, none echoed
    "optlist": Probe(
        q(
            use_edns=0,
            options=[
                opt(dns.edns.NSID),
                opt(dns.edns.ECS),
                opt(dns.edns.EXPIRE),
                opt(dns.edns.COOKIE),
            ],
        ),
        dns.rcode.NOERROR,
        QR | AA | RA,
        ("SOA",),
        edns=0,
    ),
    # "ednstcp": EDNS over TCP
    "ednstcp": Probe(q(use_edns=0), dns.rcode.NOERROR, QR | AA | RA, ("SOA",), edns=0, tcp=True),
    "tcp": Probe(q(), dns.rcode.NOERROR, QR | AA | RA, ("SOA",), tcp=True),
    # "type666": an unknown type at an existing name is NODATA with the SOA
    "type666": Probe(q("TYPE666"), dns.rcode.NOERROR, QR | AA | RA, authority=("SOA",)),
    "ns": Probe(q("NS"), dns.rcode.NOERROR, QR | AA | RA, answer=("NS",)),
    "nxdomain": Probe(
        lambda: dns.message.make_query(f"nope.{ZONE}", "A", use_edns=None),
        dns.rcode.NXDOMAIN,
        QR | AA | RD | RA,
        authority=("SOA",),
    ),
    # CHAOS class (version.bind and friends) is not served
    "chaos": Probe(
        lambda: dns.message.make_query("version.bind", "TXT", "CH"),
        dns.rcode.REFUSED,
        QR | RD | RA,
    ),
    # a zone transfer is not offered
    "axfr": Probe(q("AXFR"), dns.rcode.REFUSED, QR | RA, tcp=True),
}


@pytest.fixture
async def server() -> AsyncIterator[DnsServer]:
    async with serving(Registry(), config(free_port())) as srv:
        yield srv


def rdtypes(section: list[dns.rrset.RRset]) -> tuple[str, ...]:
    return tuple(dns.rdatatype.to_text(rrset.rdtype) for rrset in section)


@pytest.mark.parametrize("name", PROBES)
async def test_isc_compliance_probe(server: DnsServer, name: str) -> None:
    probe = PROBES[name]
    query = probe.query()
    port = server.bound[0][1]
    send = dns.asyncquery.tcp if probe.tcp else dns.asyncquery.udp
    reply = await send(query, "127.0.0.1", port=port, timeout=5)
    assert reply.id == query.id
    assert reply.rcode() == probe.rcode
    assert dns.flags.to_text(reply.flags) == dns.flags.to_text(probe.flags)
    assert reply.opcode() == dns.opcode.QUERY
    assert reply.question == query.question
    assert rdtypes(reply.answer) == probe.answer
    assert rdtypes(reply.authority) == probe.authority
    assert not reply.additional
    assert reply.edns == probe.edns
    if probe.edns != NO_EDNS:
        assert reply.options == ()
        assert reply.ednsflags & 0xFFFF == probe.ednsflags  # above: version, extended rcode
        assert reply.payload == 1232


async def udp_raw(server: DnsServer, packet: bytes, source: str = "127.0.0.1") -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", server.bound[0][1]))
        await loop.sock_sendall(sock, packet)
        async with asyncio.timeout(5):
            return await loop.sock_recv(sock, 4096)


@pytest.mark.parametrize("opcode", [1, 2, 3, 4, 5, 6, 15])
async def test_isc_opcode_probe_without_a_question_is_notimp(
    server: DnsServer, opcode: int
) -> None:
    # genreport "opcode": dig +opcode=N +header-only: every opcode but QUERY is NOTIMP
    reply = await udp_raw(server, HEADER.pack(0x5151, opcode << 11 | 0x0100, 0, 0, 0, 0))
    qid, flags, *counts = HEADER.unpack(reply)
    assert qid == 0x5151
    assert flags == 0x8000 | opcode << 11 | dns.rcode.NOTIMP  # QR, the opcode, nothing else
    assert counts == [0, 0, 0, 0]


async def test_isc_opcode_probe_with_a_question_is_notimp(server: DnsServer) -> None:
    query = dns.message.make_query(ZONE, "SOA", use_edns=0)
    query.set_opcode(dns.opcode.NOTIFY)
    reply = await udp_raw(server, query.to_wire())
    qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(reply)
    assert qid == query.id
    assert flags == 0x8000 | dns.opcode.NOTIFY << 11 | dns.rcode.NOTIMP
    assert (qdcount, ancount, nscount, arcount) == (1, 0, 0, 1)  # the question, our OPT


async def test_clients_outside_allow_get_refused_without_recursion() -> None:
    async with serving(Registry(), config(free_port(), allow=("127.0.0.1/32",))) as srv:
        query = dns.message.make_query(ZONE, "SOA")
        reply = dns.message.from_wire(await udp_raw(srv, query.to_wire(), source="127.0.0.2"))
        assert reply.rcode() == dns.rcode.REFUSED
        # no RA: recursion is not on offer to it
        assert dns.flags.to_text(reply.flags) == dns.flags.to_text(QR | RD)
        assert not reply.answer and not reply.authority
