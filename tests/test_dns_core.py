"""The DNS core without sockets: zone answers, caches, forwarding decisions, garbage."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stablenet.dns import wire
from stablenet.dns.core import Forward, Resolver
from stablenet.dns.zone import ZoneSettings
from stablenet.model import Endpoint, Upsert, Verdict
from stablenet.registry import Registry, Snapshot
from stablenet.units import parse_network

ZONE = "stablenet.internal"
LOOPBACK = [parse_network("127.0.0.0/8")]


def ep(cid: str, name: str, service: str, address: str, **kw: object) -> Endpoint:
    return Endpoint(
        id=cid,
        name=name,
        service=service,
        address=address,
        port=kw.pop("port", 8080),  # type: ignore[arg-type]
        network="bridge",
        addresses=(address,),
        **kw,  # type: ignore[arg-type]
    )


def registry(*endpoints: Endpoint) -> Registry:
    reg = Registry()
    reg.apply([Upsert(e) for e in endpoints])
    return reg


def web_registry() -> Registry:
    return registry(
        ep("c1", "web-1", "web", "172.17.0.5"),
        ep("c2", "web-2", "web", "172.17.0.6", address6="fd00::6"),
        ep("c3", "web-3", "web", "172.17.0.7", draining=True),
        ep("c4", "web-4", "web", "172.17.0.8", verdict=Verdict(False, "HTTP 500", 1.0)),
        ep("c5", "db", "db", "172.17.0.9", port=None),
    )


def ask(
    resolver: Resolver,
    snap: Snapshot,
    name: str,
    rdtype: str = "A",
    client: str = "127.0.0.1",
    now: float = 0.0,
    **make: object,
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **make)  # type: ignore[arg-type]
    out = resolver.udp(query.to_wire(), client, snap, now)
    assert isinstance(out, bytes), out
    reply = dns.message.from_wire(out)
    assert reply.id == query.id
    return reply


def addresses(reply: dns.message.Message) -> set[str]:
    return {rdata.to_text() for rrset in reply.answer for rdata in rrset}


def new_resolver() -> Resolver:
    return Resolver(ZoneSettings(ttl=5, negative_ttl=3), allow=LOOPBACK)


def test_service_answers_only_ready_endpoints_authoritatively() -> None:
    reg, res = web_registry(), new_resolver()
    reply = ask(res, reg.snapshot, f"web.{ZONE}")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.AA
    assert addresses(reply) == {"172.17.0.5", "172.17.0.6"}
    assert {rrset.ttl for rrset in reply.answer} == {5}
    six = ask(res, reg.snapshot, f"web.{ZONE}", "AAAA")
    assert addresses(six) == {"fd00::6"}


def test_container_name_resolves_even_when_not_ready() -> None:
    reg, res = web_registry(), new_resolver()
    assert addresses(ask(res, reg.snapshot, f"web-3.{ZONE}")) == {"172.17.0.7"}
    assert addresses(ask(res, reg.snapshot, f"WEB-1.{ZONE.upper()}")) == {"172.17.0.5"}


def test_nxdomain_and_nodata_carry_the_soa_with_the_negative_ttl() -> None:
    reg, res = web_registry(), new_resolver()
    missing = ask(res, reg.snapshot, f"nope.{ZONE}")
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert missing.flags & dns.flags.AA
    assert not missing.answer
    assert [rrset.rdtype for rrset in missing.authority] == [dns.rdatatype.SOA]
    soa = missing.authority[0]
    assert soa.ttl == 3 and soa[0].minimum == 3
    nodata = ask(res, reg.snapshot, f"web-1.{ZONE}", "AAAA")
    assert nodata.rcode() == dns.rcode.NOERROR
    assert not nodata.answer
    assert nodata.authority[0].rdtype == dns.rdatatype.SOA
    # A service whose endpoints are all gone from routing still exists: NODATA, not NXDOMAIN.
    reg.apply([Upsert(ep("c9", "solo", "quiet", "172.17.0.20", draining=True))])
    quiet = ask(res, reg.snapshot, f"quiet.{ZONE}")
    assert quiet.rcode() == dns.rcode.NOERROR and not quiet.answer


def test_apex_has_soa_and_ns() -> None:
    reg, res = web_registry(), new_resolver()
    soa = ask(res, reg.snapshot, ZONE, "SOA")
    assert soa.answer[0].rdtype == dns.rdatatype.SOA
    assert soa.answer[0][0].serial == reg.snapshot.version
    ns = ask(res, reg.snapshot, ZONE, "NS")
    assert ns.answer[0][0].target.to_text() == f"{ZONE}."


def test_srv_lists_ready_endpoints_with_port_and_target_addresses() -> None:
    reg, res = web_registry(), new_resolver()
    reply = ask(res, reg.snapshot, f"_8080._tcp.web.{ZONE}", "SRV")
    targets = {(r.port, r.target.to_text()) for r in reply.answer[0]}
    assert targets == {(8080, f"web-1.{ZONE}."), (8080, f"web-2.{ZONE}.")}
    glue = {rdata.to_text() for rrset in reply.additional for rdata in rrset}
    assert {"172.17.0.5", "172.17.0.6", "fd00::6"} <= glue
    assert ask(res, reg.snapshot, f"_9999._tcp.web.{ZONE}", "SRV").rcode() == dns.rcode.NXDOMAIN
    between = ask(res, reg.snapshot, f"_tcp.web.{ZONE}", "SRV")
    assert between.rcode() == dns.rcode.NOERROR and not between.answer


def test_ptr_for_container_addresses_and_forward_for_others() -> None:
    reg, res = web_registry(), new_resolver()
    reply = ask(res, reg.snapshot, "5.0.17.172.in-addr.arpa", "PTR")
    assert reply.answer[0][0].target.to_text() == f"web-1.{ZONE}."
    query = dns.message.make_query("1.1.10.10.in-addr.arpa", "PTR")
    assert isinstance(res.udp(query.to_wire(), "127.0.0.1", reg.snapshot, 0.0), Forward)


def test_stable_address_replaces_endpoints_when_the_service_is_proxied() -> None:
    reg, res = web_registry(), new_resolver()
    assert addresses(ask(res, reg.snapshot, f"web.{ZONE}")) == {"172.17.0.5", "172.17.0.6"}
    res.set_stable({"web": ("169.254.100.7",)})
    assert addresses(ask(res, reg.snapshot, f"web.{ZONE}")) == {"169.254.100.7"}
    ptr = ask(res, reg.snapshot, "7.100.254.169.in-addr.arpa", "PTR")
    assert ptr.answer[0][0].target.to_text() == f"web.{ZONE}."


def test_any_is_minimal() -> None:
    reg, res = web_registry(), new_resolver()
    inside = ask(res, reg.snapshot, f"web.{ZONE}", "ANY")
    assert [rrset.rdtype for rrset in inside.answer] == [dns.rdatatype.A]
    outside = ask(res, reg.snapshot, "example.com", "ANY")
    assert outside.answer[0].rdtype == dns.rdatatype.HINFO
    assert outside.answer[0][0].cpu == b"RFC8482"


def test_prepared_reply_is_reused_with_the_new_id_until_the_registry_changes() -> None:
    reg, res = web_registry(), new_resolver()
    first = ask(res, reg.snapshot, f"web.{ZONE}")
    again = ask(res, reg.snapshot, f"web.{ZONE}")
    assert res.stats.cache_hits == 1
    assert addresses(first) == addresses(again)
    # web-1 restarts with a new address: the very next answer has only the new one.
    reg.apply([Upsert(ep("c1", "web-1", "web", "172.17.0.50"))])
    after = ask(res, reg.snapshot, f"web.{ZONE}")
    assert addresses(after) == {"172.17.0.50", "172.17.0.6"}
    assert res.stats.cache_hits == 1


def many() -> Registry:
    return registry(*(ep(f"c{i}", f"big-{i}", "big", f"10.1.{i}.1") for i in range(80)))


def test_large_answers_truncate_over_udp_and_are_whole_over_tcp() -> None:
    reg, res = many(), new_resolver()
    plain = ask(res, reg.snapshot, f"big.{ZONE}")
    assert plain.flags & dns.flags.TC and not plain.answer
    small_edns = ask(res, reg.snapshot, f"big.{ZONE}", use_edns=0, payload=600)
    assert small_edns.flags & dns.flags.TC
    assert res.stats.truncated == 2
    big_edns = ask(res, reg.snapshot, f"big.{ZONE}", use_edns=0, payload=4096)
    assert big_edns.flags & dns.flags.TC  # 80 records exceed the 1232 bytes we send over UDP
    query = dns.message.make_query(f"big.{ZONE}", "A")
    out = res.tcp(query.to_wire(), "127.0.0.1", reg.snapshot, 0.0)
    assert isinstance(out, bytes)
    whole = dns.message.from_wire(out)
    assert not whole.flags & dns.flags.TC
    assert len(addresses(whole)) == 80


def test_edns_payload_is_honoured_when_it_fits() -> None:
    reg = registry(*(ep(f"c{i}", f"mid-{i}", "mid", f"10.2.{i}.1") for i in range(40)))
    res = new_resolver()
    assert ask(res, reg.snapshot, f"mid.{ZONE}").flags & dns.flags.TC
    fits = ask(res, reg.snapshot, f"mid.{ZONE}", use_edns=0, payload=1232)
    assert not fits.flags & dns.flags.TC and len(addresses(fits)) == 40
    assert fits.edns == 0


def test_clients_outside_allow_are_refused() -> None:
    reg, res = web_registry(), new_resolver()
    for name in (f"web.{ZONE}", "example.com"):
        assert ask(res, reg.snapshot, name, client="192.0.2.9").rcode() == dns.rcode.REFUSED
    assert res.stats.refused == 2
    # A cached answer does not leak to a refused client either.
    ask(res, reg.snapshot, f"web.{ZONE}")
    assert ask(res, reg.snapshot, f"web.{ZONE}", client="192.0.2.9").rcode() == dns.rcode.REFUSED


def test_garbage_is_dropped_or_formerr_and_counted() -> None:
    reg, res = web_registry(), new_resolver()
    snap = reg.snapshot
    assert res.udp(b"\x01\x02\x03", "127.0.0.1", snap, 0.0) is None
    bad_question = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05ab"
    out = res.udp(bad_question, "127.0.0.1", snap, 0.0)
    assert isinstance(out, bytes)
    reply = dns.message.from_wire(out)
    assert reply.id == 0xABCD and reply.rcode() == dns.rcode.FORMERR
    response = dns.message.make_response(dns.message.make_query("x.", "A")).to_wire()
    assert res.udp(response, "127.0.0.1", snap, 0.0) is None
    assert res.stats.malformed == 2
    assert res.stats.dropped == 2


def test_other_opcodes_and_edns_versions() -> None:
    reg, res = web_registry(), new_resolver()
    update = dns.message.make_query(f"web.{ZONE}", "A")
    update.set_opcode(dns.opcode.UPDATE)
    out = res.udp(update.to_wire(), "127.0.0.1", reg.snapshot, 0.0)
    assert isinstance(out, bytes)
    assert out[:2] == update.to_wire()[:2]
    assert out[3] & 0xF == dns.rcode.NOTIMP  # dnspython reads UPDATE replies as zone updates
    future = ask(res, reg.snapshot, f"web.{ZONE}", use_edns=1)
    assert future.rcode() == dns.rcode.BADVERS


def upstream_reply(query: wire.Query, ttl: int, address: str | None) -> bytes:
    asked = dns.message.make_query(query.name, dns.rdatatype.RdataType(query.qtype))
    reply = dns.message.make_response(asked)
    if address is None:
        reply.set_rcode(dns.rcode.NXDOMAIN)
        reply.authority.append(
            dns.rrset.from_text("test.", ttl, "IN", "SOA", "ns.test. h.test. 1 2 3 4 30")
        )
    else:
        reply.answer.append(dns.rrset.from_text(query.name + ".", ttl, "IN", "A", address))
    return reply.to_wire()


def forward_once(
    res: Resolver, snap: Snapshot, name: str, ttl: int, address: str | None, now: float
) -> tuple[dns.message.Message, dns.message.Message]:
    """Ask a name the resolver forwards, answer it as an upstream would: (query, reply)."""
    query = dns.message.make_query(name, "A")
    request = res.udp(query.to_wire(), "127.0.0.1", snap, now)
    assert isinstance(request, Forward)
    reply = res.forwarded(request, upstream_reply(request.query, ttl, address), now)
    return query, dns.message.from_wire(reply)


def test_forwarded_answers_are_cached_for_their_ttl() -> None:
    reg, res = web_registry(), new_resolver()
    query, first = forward_once(res, reg.snapshot, "known.test", 60, "10.9.9.9", 100.0)
    assert addresses(first) == {"10.9.9.9"} and first.id == query.id
    assert not first.flags & dns.flags.AA
    later = ask(res, reg.snapshot, "known.test", now=130.0)
    assert addresses(later) == {"10.9.9.9"}
    assert later.answer[0].ttl == 30  # counted down
    assert res.stats.forward_cache_hits == 1
    expired = dns.message.make_query("known.test", "A")
    assert isinstance(res.udp(expired.to_wire(), "127.0.0.1", reg.snapshot, 161.0), Forward)


def test_negative_forwarded_answers_are_cached_for_the_soa_minimum() -> None:
    reg, res = web_registry(), new_resolver()
    forward_once(res, reg.snapshot, "gone.test", 300, None, 0.0)
    cached = ask(res, reg.snapshot, "gone.test", now=20.0)
    assert cached.rcode() == dns.rcode.NXDOMAIN
    again = dns.message.make_query("gone.test", "A")
    assert isinstance(res.udp(again.to_wire(), "127.0.0.1", reg.snapshot, 31.0), Forward)


def test_upstream_failure_is_servfail_and_not_cached() -> None:
    reg, res = web_registry(), new_resolver()
    query = dns.message.make_query("down.test", "A")
    request = res.udp(query.to_wire(), "127.0.0.1", reg.snapshot, 0.0)
    assert isinstance(request, Forward)
    reply = dns.message.from_wire(res.forwarded(request, None, 0.0))
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert res.stats.forward_failures == 1
    assert isinstance(res.udp(query.to_wire(), "127.0.0.1", reg.snapshot, 0.0), Forward)


def test_counters_by_type_and_rcode() -> None:
    reg, res = web_registry(), new_resolver()
    ask(res, reg.snapshot, f"web.{ZONE}")
    ask(res, reg.snapshot, f"web.{ZONE}")
    ask(res, reg.snapshot, f"nope.{ZONE}", "AAAA")
    assert res.stats.queries_by_type() == {"A": 2, "AAAA": 1}
    assert res.stats.replies_by_rcode() == {"NOERROR": 2, "NXDOMAIN": 1}


VALID = [
    dns.message.make_query(f"web.{ZONE}", "A").to_wire(),
    dns.message.make_query(f"_8080._tcp.web.{ZONE}", "SRV", use_edns=0).to_wire(),
    dns.message.make_query("example.com", "AAAA", want_dnssec=True).to_wire(),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    packet = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(0, len(packet) - 1)))
        if kind == "flip" and packet:
            packet[pos] = draw(st.integers(0, 255))
        elif kind == "cut":
            del packet[pos:]
        else:
            packet[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(packet)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packet=st.one_of(st.binary(max_size=300), mutated()))
def test_any_packet_gets_a_sane_reply_or_none(packet: bytes) -> None:
    reg, res = web_registry(), new_resolver()
    for tcp in (False, True):
        before = res.stats.malformed + res.stats.dropped
        handle = res.tcp if tcp else res.udp
        out = handle(packet, "127.0.0.1", reg.snapshot, 0.0)
        if out is None:
            assert res.stats.malformed + res.stats.dropped > before
            continue
        if isinstance(out, Forward):
            continue
        assert out[:2] == packet[:2]
        assert out[2] & 0x80  # QR
        if out[3] & 0xF == dns.rcode.FORMERR:
            assert res.stats.malformed > 0
        if out[2] & 0x78 == 0:  # a QUERY reply: a real client can read it
            dns.message.from_wire(out)


# -- exact replies (#12) ----------------------------------------------------------------------


def raw(data: bytes, res: Resolver, snap: Snapshot, client: str = "127.0.0.1") -> bytes:
    out = res.udp(data, client, snap, 0.0)
    assert isinstance(out, bytes), out
    return out


def test_do_bit_is_echoed_forwarded_and_part_of_the_forward_cache_key() -> None:
    reg, res = web_registry(), new_resolver()
    signed = ask(res, reg.snapshot, f"web.{ZONE}", want_dnssec=True)
    assert signed.ednsflags & dns.flags.DO  # RFC 3225 3: echoed
    assert not ask(res, reg.snapshot, f"web.{ZONE}", use_edns=0).ednsflags & dns.flags.DO
    query = dns.message.make_query("signed.test", "A", want_dnssec=True)
    query.flags |= dns.flags.CD
    request = res.udp(query.to_wire(), "127.0.0.1", reg.snapshot, 0.0)
    assert isinstance(request, Forward)
    assert request.question.do and request.question.cd
    upstream = dns.message.from_wire(wire.encode_query(7, *request.question))
    assert upstream.ednsflags & dns.flags.DO and upstream.flags & dns.flags.CD
    reply = res.forwarded(request, upstream_reply(request.query, 60, "10.9.9.9"), 0.0)
    relayed = dns.message.from_wire(reply)
    assert relayed.ednsflags & dns.flags.DO and relayed.flags & dns.flags.CD
    # The answer kept for DO+CD is not the one a plain client gets: that is asked anew.
    plain = dns.message.make_query("signed.test", "A")
    assert isinstance(res.udp(plain.to_wire(), "127.0.0.1", reg.snapshot, 1.0), Forward)
    again = ask(res, reg.snapshot, "signed.test", now=1.0, want_dnssec=True, flags=query.flags)
    assert addresses(again) == {"10.9.9.9"}


def test_cached_negative_answer_advertises_what_is_left_of_the_negative_ttl() -> None:
    reg, res = web_registry(), new_resolver()
    # The upstream's SOA: TTL 300, minimum 30. RFC 2308: the negative TTL is min(300, 30).
    _, first = forward_once(res, reg.snapshot, "gone.test", 300, None, 0.0)
    assert first.authority[0].ttl == 30
    later = ask(res, reg.snapshot, "gone.test", now=20.0)
    assert later.rcode() == dns.rcode.NXDOMAIN
    assert later.authority[0].ttl == 10  # not 300 - 20: downstream keeps it 10 s more at most


def test_unknown_opcode_without_a_question_is_notimp() -> None:
    reg, res = web_registry(), new_resolver()
    header_only = wire.HEADER.pack(0x4242, 15 << 11, 0, 0, 0, 0)  # opcode 15, no question
    out = raw(header_only, res, reg.snapshot)
    qid, flags, *counts = wire.HEADER.unpack(out)
    assert qid == 0x4242 and flags & wire.QR
    assert (flags & wire.OPCODE_MASK) >> 11 == 15
    assert flags & 0xF == dns.rcode.NOTIMP and counts == [0, 0, 0, 0]
    assert res.stats.replies_by_rcode() == {"NOTIMP": 1}


def test_ra_only_for_allowed_clients_and_no_query_bits_on_other_opcodes() -> None:
    reg, res = web_registry(), new_resolver()
    allowed = ask(res, reg.snapshot, f"web.{ZONE}")
    assert allowed.flags & dns.flags.RA and allowed.flags & dns.flags.RD
    outsider = ask(res, reg.snapshot, f"web.{ZONE}", client="192.0.2.9")
    assert outsider.rcode() == dns.rcode.REFUSED
    assert not outsider.flags & dns.flags.RA  # no recursion on offer for it
    assert outsider.flags & dns.flags.RD  # RD is copied (RFC 1035 4.1.1)
    notify = dns.message.make_query(f"web.{ZONE}", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    out = raw(notify.to_wire(), res, reg.snapshot)
    flags = wire.HEADER.unpack_from(out)[1]
    assert flags & 0xF == wire.Rcode.NOTIMP
    assert flags & ~(wire.QR | wire.OPCODE_MASK | 0xF) == 0  # no RD, RA: NOTIFY's own bits
    zflag = dns.message.make_query(f"web.{ZONE}", "A")
    zflag.flags |= wire.Z
    assert not ask_wire(res, reg.snapshot, zflag).flags & wire.Z


def ask_wire(res: Resolver, snap: Snapshot, query: dns.message.Message) -> dns.message.Message:
    return dns.message.from_wire(raw(query.to_wire(), res, snap))


def test_malformed_packet_from_outside_allow_is_dropped() -> None:
    reg, res = web_registry(), new_resolver()
    bad_question = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05ab"
    assert res.udp(bad_question, "192.0.2.9", reg.snapshot, 0.0) is None
    assert res.tcp(bad_question, "192.0.2.9", reg.snapshot, 0.0) is None
    assert res.stats.dropped == 2 and not res.stats.answers


def test_counters_keep_the_extended_rcode_and_replies_without_a_question() -> None:
    reg, res = web_registry(), new_resolver()
    assert ask(res, reg.snapshot, f"web.{ZONE}", use_edns=1).rcode() == dns.rcode.BADVERS
    raw(b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05ab", res, reg.snapshot)
    assert res.stats.replies_by_rcode() == {"BADVERS": 1, "FORMERR": 1}
    assert res.stats.queries_by_type() == {"A": 1, "none": 1}
    assert wire.type_name(666) == "TYPE666" and wire.rcode_name(wire.Rcode.BADVERS) == "BADVERS"
