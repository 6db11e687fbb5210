"""The resolver's decisions, without I/O: given the bytes of a query, the client's address, the
registry snapshot and the time, return the reply bytes, a Forward request (the adapter asks an
upstream and hands the result back to ``forwarded``), or None (drop).

Speed comes from the prepared-response cache: a reply is kept as wire bytes without its
transaction id, keyed by everything in the query after the id (flags, question, EDNS0 record), so
a repeated question costs one dict lookup and a two-byte splice. Registry answers in it live until
the registry version changes; forwarded ones for at most a second (so TTLs count down) and never
past their TTL. dnslib builds replies on a miss only.

Owns: the zone index per snapshot version, both caches, the allow list check, counters. Must not
touch sockets, clocks or the registry (it only reads the snapshot it is given)."""

from __future__ import annotations

import ipaddress
import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

from dnslib import RD as RAW_RD
from dnslib import RR, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from stablenet.dns import wire
from stablenet.dns.stats import DnsStats
from stablenet.dns.zone import Result, ZoneIndex, ZoneSettings
from stablenet.registry import Snapshot

logger = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
FastEntry = tuple[float, bytes, tuple[int, int]]  # (expires, reply without id, (qtype, rcode))

FORWARD_MAX_TTL = 86400  # a forwarded answer is never kept longer than this
FORWARD_NEGATIVE_MAX_TTL = 300.0  # nor a forwarded negative one (NXDOMAIN, NODATA) longer
FORWARD_FRESH = 1.0  # a prepared forwarded reply is rebuilt (TTLs counted down) this often
_ALLOWED_MEMO = 4096
_HINFO_RFC8482 = RAW_RD(b"\x07RFC8482\x00")
_NEVER = math.inf


@dataclass(frozen=True, slots=True)
class Forward:
    """Ask an upstream this question, then call ``Resolver.forwarded`` with its reply."""

    query: wire.Query
    tcp: bool
    key: bytes | None  # prepared-response cache key (UDP only)

    @property
    def question(self) -> wire.Question:
        return self.query.forward_question


@dataclass(frozen=True, slots=True)
class _Cached:
    record: DNSRecord
    stored: float
    expires: float


class ForwardCache:
    """Upstream replies by question (DO and CD included), kept for their TTL (negative ones for
    min(SOA TTL, SOA minimum), RFC 2308 5), least recently used evicted first. Pure: the time is
    a parameter."""

    def __init__(self, size: int, negative_max: float) -> None:
        self._size = size
        self._negative_max = negative_max
        self._entries: OrderedDict[wire.Question, _Cached] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: wire.Question, now: float) -> tuple[DNSRecord, float, float] | None:
        """(record, age in seconds, seconds left) or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry.record, now - entry.stored, entry.expires - now

    def put(self, key: wire.Question, record: DNSRecord, now: float) -> float | None:
        """Keep a reply for as long as ``ttl_of`` allows; returns that (None: not kept)."""
        ttl = self.ttl_of(record)
        if ttl is None or ttl <= 0:
            return ttl
        self._entries[key] = _Cached(record, now, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return ttl

    def ttl_of(self, record: DNSRecord) -> float | None:
        """How long a reply may be kept, or None when it must not be (errors, no SOA)."""
        rcode = record.header.rcode
        answers = [rr for rr in record.rr if rr.rtype != wire.Type.OPT]
        if rcode == wire.Rcode.NOERROR and answers:
            return float(min(min(rr.ttl for rr in answers), FORWARD_MAX_TTL))
        if rcode in (wire.Rcode.NOERROR, wire.Rcode.NXDOMAIN):
            soas = [rr for rr in record.auth if rr.rtype == wire.Type.SOA]
            if not soas:
                return None
            minimum = soas[0].rdata.times[4]
            return float(min(soas[0].ttl, minimum, self._negative_max))
        return None


class Resolver:
    """Decides the reply to each query. One per server; state is caches and counters."""

    def __init__(
        self,
        settings: ZoneSettings,
        allow: Iterable[Network] = (),
        stats: DnsStats | None = None,
        cache_size: int = 10000,
    ) -> None:
        self.settings = settings
        self.stats = stats if stats is not None else DnsStats()
        self._allow: tuple[Network, ...] = tuple(allow)
        self._allowed: dict[str, bool] = {}
        self._cache_size = cache_size
        self._fast: dict[bytes, FastEntry] = {}
        self._version = -1
        self._index: ZoneIndex | None = None
        self.forward_cache = ForwardCache(cache_size, FORWARD_NEGATIVE_MAX_TTL)

    # -- configuration that changes at run time --------------------------------------------

    def set_allow(self, networks: Iterable[Network]) -> None:
        self._allow = tuple(networks)
        self._allowed.clear()

    @property
    def allow(self) -> tuple[Network, ...]:
        return self._allow

    def set_stable(
        self, stable: Mapping[str, tuple[str, ...]], lasting: frozenset[str] = frozenset()
    ) -> None:
        """Services reached through the proxy: answered with these addresses from now on
        (with a long TTL for those in ``lasting``, whose addresses never move)."""
        self.settings = replace(
            self.settings, stable=MappingProxyType(dict(stable)), lasting=lasting
        )
        self._invalidate()

    def _invalidate(self) -> None:
        self._version = -1
        self._index = None
        self._fast.clear()

    # -- the hot path ------------------------------------------------------------------------

    def allowed(self, client: str) -> bool:
        verdict = self._allowed.get(client)
        if verdict is None:
            try:
                ip = ipaddress.ip_address(client.partition("%")[0])
            except ValueError:
                verdict = False
            else:
                if ip.version == 6 and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                verdict = any(ip in net for net in self._allow)
            if len(self._allowed) >= _ALLOWED_MEMO:
                self._allowed.clear()
            self._allowed[client] = verdict
        return verdict

    def udp(self, data: bytes, client: str, snap: Snapshot, now: float) -> bytes | Forward | None:
        """The reply to a UDP query (bytes), a Forward, or None to drop it."""
        if snap.version != self._version:
            self._fast.clear()
            self._version = snap.version
            self._index = None
        allowed = self._allowed.get(client)
        if allowed is None:
            allowed = self.allowed(client)
        if allowed:
            entry = self._fast.get(data[2:])
            if entry is not None and entry[0] > now:
                self.stats.cache_hits += 1
                self.stats.answers[entry[2]] += 1
                return data[:2] + entry[1]
        return self._decide(data, allowed, snap, now, tcp=False)

    def tcp(self, data: bytes, client: str, snap: Snapshot, now: float) -> bytes | Forward | None:
        """The reply to a query that came over TCP (never truncated)."""
        return self._decide(data, self.allowed(client), snap, now, tcp=True)

    # -- misses ------------------------------------------------------------------------------

    def _decide(
        self, data: bytes, allowed: bool, snap: Snapshot, now: float, tcp: bool
    ) -> bytes | Forward | None:
        try:
            query = wire.parse_query(data)
        except wire.NotAQuery:
            self.stats.dropped += 1
            return None
        except wire.Malformed as exc:
            self.stats.malformed += 1
            logger.debug("malformed query: %s", exc)
            if exc.header is None or not allowed:  # an error reply is of no use to outsiders
                self.stats.dropped += 1
                return None
            # An opcode we do not implement may come without a question (RFC 1035 4.1.1).
            opcode = (exc.header[2] << 8 & wire.OPCODE_MASK) >> 11
            rcode = wire.Rcode.FORMERR if opcode == wire.Opcode.QUERY else wire.Rcode.NOTIMP
            self.stats.answers[(wire.NO_QUESTION, rcode)] += 1
            return wire.header_reply(exc.header, rcode, ra=True)
        if not allowed:  # nothing for it, recursion included (no RA)
            self.stats.refused += 1
            return self._short(query, wire.Rcode.REFUSED, ra=False)
        if query.opcode != wire.Opcode.QUERY:
            return self._short(query, wire.Rcode.NOTIMP)
        if query.edns_version != 0:
            return self._short(query, wire.Rcode.BADVERS)
        if query.qclass not in (wire.Class.IN, wire.Class.ANY) or query.qtype in (
            wire.Type.AXFR,
            wire.Type.IXFR,
        ):
            self.stats.refused += 1
            return self._short(query, wire.Rcode.REFUSED)
        index = self._index
        if index is None or index.version != snap.version:
            index = self._index = ZoneIndex(snap, self.settings)
        key = None if tcp else data[2:]
        result = index.lookup(query.labels, query.qtype)
        if result is not None:
            reply = self._build(query, result, aa=True)
            return self._finish(query, reply, result.rcode, tcp, key, _NEVER)
        if query.qtype == wire.Type.ANY:  # RFC 8482: no forwarding, a synthesized HINFO
            hinfo = RR(DNSLabel(query.labels), wire.Type.HINFO, ttl=3600, rdata=_HINFO_RFC8482)
            reply = self._build(query, Result(wire.Rcode.NOERROR, answer=(hinfo,)), aa=False)
            return self._finish(query, reply, wire.Rcode.NOERROR, tcp, key, _NEVER)
        cached = self.forward_cache.get(query.forward_question, now)
        if cached is not None:
            record, age, left = cached
            self.stats.forward_cache_hits += 1
            reply = self._relay(query, record, int(age), left)
            expires = now + min(FORWARD_FRESH, left)
            return self._finish(query, reply, wire.rcode_of(reply), tcp, key, expires)
        return Forward(query, tcp, key)

    def forwarded(self, request: Forward, upstream: bytes | None, now: float) -> bytes:
        """The client's reply once the upstream answered (``upstream``) or failed (None)."""
        query = request.query
        if upstream is None:
            self.stats.forward_failures += 1
            return self._short(query, wire.Rcode.SERVFAIL)
        try:
            record = DNSRecord.parse(upstream)
        except Exception:  # dnslib raises many kinds on garbage; an upstream's garbage is a count
            self.stats.forward_failures += 1
            logger.debug("unreadable upstream reply for %s", query.name)
            return self._short(query, wire.Rcode.SERVFAIL)
        ttl = self.forward_cache.put(request.question, record, now)
        reply = self._relay(query, record, 0, ttl)
        expires = now + min(FORWARD_FRESH, ttl) if ttl else 0.0
        return self._finish(query, reply, wire.rcode_of(reply), request.tcp, request.key, expires)

    def _finish(
        self,
        query: wire.Query,
        reply: bytes,
        rcode: int,
        tcp: bool,
        key: bytes | None,
        expires: float,
    ) -> bytes:
        """Truncate for UDP when needed, count, and keep the prepared reply."""
        if not tcp and len(reply) > query.udp_limit():
            self.stats.truncated += 1
            aa = bool(reply[2] & (wire.AA >> 8))
            reply = wire.short_reply(query, rcode, ra=True, aa=aa, tc=True)
        stat = (query.qtype, rcode)
        self.stats.answers[stat] += 1
        if key is not None and expires > 0:
            if len(self._fast) >= self._cache_size:
                del self._fast[next(iter(self._fast))]
            self._fast[key] = (expires, reply[2:], stat)
        return reply

    def _short(self, query: wire.Query, rcode: int, ra: bool = True) -> bytes:
        self.stats.answers[(query.qtype, rcode)] += 1
        return wire.short_reply(query, rcode, ra=ra)

    def _build(self, query: wire.Query, result: Result, aa: bool) -> bytes:
        record = DNSRecord(
            DNSHeader(id=query.id, qr=1, aa=int(aa), ra=1, rcode=result.rcode),
            q=DNSQuestion(DNSLabel(query.labels), query.qtype, query.qclass),
            rr=list(result.answer),
            auth=list(result.authority),
            ar=list(result.additional),
        )
        return self._pack(query, record)

    def _relay(self, query: wire.Query, upstream: DNSRecord, age: int, left: float | None) -> bytes:
        """The upstream's reply for this client, TTLs counted down by ``age``. In a negative
        answer the authority records (the SOA, NSEC with DO) say how long it may still be kept:
        what is ``left`` of min(SOA TTL, SOA minimum) (RFC 2308 5, RFC 9077), not their own."""

        def aged(records: Sequence[RR], cap: int = FORWARD_MAX_TTL) -> list[RR]:
            return [
                RR(rr.rname, rr.rtype, rr.rclass, max(0, min(rr.ttl - age, cap)), rr.rdata)
                for rr in records
                if rr.rtype != wire.Type.OPT
            ]

        rcode = upstream.header.rcode & 0xF
        answers = aged(upstream.rr)
        negative = rcode == wire.Rcode.NXDOMAIN or (rcode == wire.Rcode.NOERROR and not answers)
        cap = int(left) if negative and left is not None else FORWARD_MAX_TTL
        record = DNSRecord(
            DNSHeader(id=query.id, qr=1, aa=0, ra=1, rcode=rcode),
            q=DNSQuestion(DNSLabel(query.labels), query.qtype, query.qclass),
            rr=answers,
            auth=aged(upstream.auth, cap),
            ar=aged(upstream.ar),
        )
        return self._pack(query, record)

    def _pack(self, query: wire.Query, record: DNSRecord) -> bytes:
        record.header.rd = 1 if query.flags & wire.RD else 0
        record.header.cd = 1 if query.flags & wire.CD else 0
        packed = bytes(record.pack())
        # Echo the question exactly as asked (same length; only letter case can differ).
        start = wire.HEADER.size
        packed = packed[:start] + query.question + packed[start + len(query.question) :]
        return wire.with_opt(packed, query)
