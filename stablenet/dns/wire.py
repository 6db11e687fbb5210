"""DNS wire format, the small part the hot path needs: read a query's header, question and EDNS0
OPT record without building objects, and write the short replies (errors, truncation) by hand.
Pure functions over bytes; no sockets, no clocks, no registry. Building full answers is zone.py's
job (with dnslib).

Header bits in replies (RFC 1035 4.1.1, RFC 4035 3.2.2, RFC 6891, RFC 3225), one rule for every
reply this server writes:
  * QR set, the opcode copied; for the QUERY opcode RD and CD are copied, RA is set only when
    recursion is offered to this client (never to one outside dns.allow), AA on zone answers;
  * for any other opcode (answered NOTIMP) the other bits are left clear: their meaning belongs
    to that opcode (UPDATE calls them Z);
  * the header's Z bit and unknown EDNS flags are never echoed; the DO bit is (RFC 3225 3);
  * the OPT record, when the query had one, is version 0, our payload size, no options, and
    carries the upper bits of an extended rcode (BADVERS)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

HEADER = struct.Struct("!HHHHHH")
_TYPE_CLASS = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")

# Header flag bits.
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
Z = 0x0040
AD = 0x0020
CD = 0x0010
OPCODE_MASK = 0x7800
EDNS_DO = 0x8000  # the DNSSEC OK bit, in the OPT record's flags (RFC 3225)


class Opcode(IntEnum):
    QUERY = 0
    IQUERY = 1
    STATUS = 2
    NOTIFY = 4
    UPDATE = 5
    DSO = 6


class Rcode(IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    BADVERS = 16  # extended (EDNS0): the upper 8 bits travel in the OPT record


class Type(IntEnum):
    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    HINFO = 13
    MX = 15
    TXT = 16
    AAAA = 28
    SRV = 33
    OPT = 41
    DS = 43
    RRSIG = 46
    NSEC = 47
    DNSKEY = 48
    SVCB = 64
    HTTPS = 65
    IXFR = 251
    AXFR = 252
    ANY = 255


class Class(IntEnum):
    IN = 1
    CH = 3
    ANY = 255


MIN_UDP_PAYLOAD = 512
OUR_UDP_PAYLOAD = 1232  # the size the DNS flag day 2020 recommends: no IP fragmentation
NO_QUESTION = -1  # the "qtype" counted for replies to packets whose question could not be read

_TYPE_NAMES = {t.value: t.name for t in Type}
_RCODE_NAMES = {r.value: r.name for r in Rcode}


def type_name(qtype: int) -> str:
    """'A', 'TYPE666' (RFC 3597 form), or 'none' for a reply without a question."""
    if qtype == NO_QUESTION:
        return "none"
    return _TYPE_NAMES.get(qtype) or f"TYPE{qtype}"


def rcode_name(rcode: int) -> str:
    return _RCODE_NAMES.get(rcode) or f"RCODE{rcode}"


class Malformed(Exception):
    """The packet is not a query we can read. ``header`` is the 12-byte header when one could
    be read (the sender gets FORMERR), None when not even that (the packet is dropped)."""

    def __init__(self, reason: str, header: bytes | None = None) -> None:
        super().__init__(reason)
        self.header = header


class NotAQuery(Exception):
    """The packet is a response (QR set): never answered, so two servers cannot loop."""


class Question(NamedTuple):
    """What is asked upstream, and the forward cache's key: the DNSSEC bits change the answer
    (DO adds signatures, CD lets through what validation would reject)."""

    labels: tuple[bytes, ...]
    qtype: int
    qclass: int
    do: bool = False
    cd: bool = False


@dataclass(frozen=True, slots=True)
class Query:
    """One parsed question. ``labels`` are lower-cased for lookups; ``question`` keeps the bytes
    as sent (case included) so replies echo them exactly."""

    id: int
    flags: int
    labels: tuple[bytes, ...]
    qtype: int
    qclass: int
    question: bytes  # wire bytes of the question section: name, type, class
    payload: int | None  # the client's EDNS0 UDP payload size, None without OPT
    edns_version: int = 0
    edns_flags: int = 0  # the 16 flag bits of the OPT record (DO and the unknown Z bits)

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11

    @property
    def do(self) -> bool:
        """DNSSEC OK: the client wants DNSSEC records (forwarded on, echoed back)."""
        return bool(self.edns_flags & EDNS_DO)

    @property
    def cd(self) -> bool:
        """Checking Disabled: the client validates itself (forwarded on, echoed back)."""
        return bool(self.flags & CD)

    @property
    def name(self) -> str:
        """The name as text, lower-case, no trailing dot ('' is the root)."""
        return ".".join(label.decode("ascii", "backslashreplace") for label in self.labels)

    @property
    def forward_question(self) -> Question:
        return Question(self.labels, self.qtype, self.qclass, self.do, self.cd)

    def udp_limit(self) -> int:
        """The largest UDP reply this client accepts."""
        if self.payload is None:
            return MIN_UDP_PAYLOAD
        return max(MIN_UDP_PAYLOAD, min(self.payload, OUR_UDP_PAYLOAD))


def read_name(data: bytes, offset: int) -> tuple[tuple[bytes, ...], int]:
    """Read an uncompressed name at ``offset``; return its labels (case kept) and the offset
    after it. A question name must not use compression (nothing precedes it to point at)."""
    labels: list[bytes] = []
    total = 0
    end = len(data)
    while True:
        if offset >= end:
            raise ValueError("name runs past the end of the packet")
        length = data[offset]
        offset += 1
        if length == 0:
            return tuple(labels), offset
        if length > 63:
            raise ValueError("compressed or oversized label in the question name")
        total += length + 1
        if total > 254:
            raise ValueError("name longer than 255 octets")
        if offset + length > end:
            raise ValueError("label runs past the end of the packet")
        labels.append(data[offset : offset + length])
        offset += length


def skip_name(data: bytes, offset: int) -> int:
    """The offset after a possibly compressed name (pointers are not followed)."""
    end = len(data)
    for _ in range(128):
        if offset >= end:
            raise ValueError("name runs past the end of the packet")
        length = data[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:
            if offset + 2 > end:
                raise ValueError("truncated compression pointer")
            return offset + 2
        if length > 63:
            raise ValueError("bad label type")
        offset += 1 + length
    raise ValueError("too many labels")


def parse_query(data: bytes) -> Query:
    """Parse a query. Raises NotAQuery for responses and Malformed for everything unreadable."""
    if len(data) < HEADER.size:
        raise Malformed("shorter than a DNS header")
    header = data[: HEADER.size]
    qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack(header)
    if flags & QR:
        raise NotAQuery("response received")
    if qdcount != 1:
        raise Malformed(f"{qdcount} questions (exactly one is supported)", header)
    try:
        raw_labels, offset = read_name(data, HEADER.size)
        if offset + 4 > len(data):
            raise ValueError("question type and class missing")
        qtype, qclass = _TYPE_CLASS.unpack_from(data, offset)
        offset += 4
        question = data[HEADER.size : offset]
        payload: int | None = None
        version = 0
        edns_flags = 0
        for index in range(ancount + nscount + arcount):
            offset = skip_name(data, offset)
            if offset + _RR_FIXED.size > len(data):
                raise ValueError("record runs past the end of the packet")
            rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, offset)
            offset += _RR_FIXED.size + rdlength
            if offset > len(data):
                raise ValueError("record data runs past the end of the packet")
            if rtype == Type.OPT:
                if index < ancount + nscount or payload is not None:
                    raise ValueError("OPT record misplaced or repeated")
                payload = rclass
                version = (ttl >> 16) & 0xFF
                edns_flags = ttl & 0xFFFF
    except (ValueError, struct.error) as exc:
        raise Malformed(str(exc), header) from None
    return Query(
        id=qid,
        flags=flags,
        labels=tuple(label.lower() for label in raw_labels),
        qtype=qtype,
        qclass=qclass,
        question=question,
        payload=payload,
        edns_version=version,
        edns_flags=edns_flags,
    )


def opt_record(payload: int = OUR_UDP_PAYLOAD, ext_rcode: int = 0, do: bool = False) -> bytes:
    """An OPT pseudo-record: our UDP payload size, version 0, no options, the DO bit when asked
    (RFC 3225: echoed from the query), the upper bits of an extended rcode."""
    ttl = (ext_rcode & 0xFF) << 24 | (EDNS_DO if do else 0)
    return b"\x00" + _RR_FIXED.pack(Type.OPT, payload, ttl, 0)


def reply_flags(query_flags: int, rcode: int, ra: bool, aa: bool = False, tc: bool = False) -> int:
    """Reply header flags by the rule in the module docstring; ``ra``: recursion is offered to
    this client."""
    flags = QR | (query_flags & OPCODE_MASK) | (rcode & 0xF)
    if query_flags & OPCODE_MASK:  # not QUERY: the remaining bits are the opcode's own
        return flags
    flags |= query_flags & (RD | CD)
    if ra:
        flags |= RA
    if aa:
        flags |= AA
    if tc:
        flags |= TC
    return flags


def short_reply(query: Query, rcode: int, ra: bool, aa: bool = False, tc: bool = False) -> bytes:
    """A reply with the question and no records: errors and truncated answers. Carries an OPT
    record when the query had one (the extended rcode bits go there)."""
    edns = query.payload is not None
    flags = reply_flags(query.flags, rcode, ra, aa, tc)
    head = HEADER.pack(query.id, flags, 1, 0, 0, 1 if edns else 0)
    tail = opt_record(ext_rcode=rcode >> 4, do=query.do) if edns else b""
    return head + query.question + tail


def header_reply(header: bytes, rcode: int, ra: bool) -> bytes:
    """A reply to a query whose question could not be read: the header only."""
    qid, flags, *_ = HEADER.unpack(header)
    return HEADER.pack(qid, reply_flags(flags, rcode, ra), 0, 0, 0, 0)


def with_opt(packed: bytes, query: Query) -> bytes:
    """A packed reply (no OPT yet) with our OPT record appended when the query had one."""
    if query.payload is None:
        return packed
    arcount = (packed[10] << 8 | packed[11]) + 1
    return packed[:10] + arcount.to_bytes(2, "big") + packed[12:] + opt_record(do=query.do)


def encode_name(labels: tuple[bytes, ...]) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


def encode_query(
    qid: int,
    labels: tuple[bytes, ...],
    qtype: int,
    qclass: int,
    do: bool = False,
    cd: bool = False,
) -> bytes:
    """A recursive query with an EDNS0 record (what the forwarder sends upstream), passing on the
    client's DO and CD bits."""
    return (
        HEADER.pack(qid, RD | (CD if cd else 0), 1, 0, 0, 1)
        + encode_name(labels)
        + _TYPE_CLASS.pack(qtype, qclass)
        + opt_record(do=do)
    )


def answers_query(reply: bytes, qid: int, question: bytes) -> bool:
    """Whether ``reply`` is the response to our query ``qid`` about ``question`` (the bytes of a
    question section); anything else (spoofed, late, stray) is ignored."""
    if len(reply) < HEADER.size + len(question):
        return False
    rid, flags, qdcount = HEADER.unpack_from(reply)[:3]
    if rid != qid or not flags & QR or qdcount != 1:
        return False
    end = HEADER.size + len(question)
    return reply[HEADER.size : end].lower() == question.lower()


def truncated(reply: bytes) -> bool:
    return len(reply) >= 4 and bool(reply[2] & (TC >> 8))


def rcode_of(reply: bytes) -> int:
    """The header's four rcode bits (the extended ones would be in an OPT record)."""
    return reply[3] & 0xF if len(reply) >= 4 else Rcode.SERVFAIL
