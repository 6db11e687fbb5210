"""DNS wire format, the small part the hot path needs: read a query's header, question and EDNS0
OPT record without building objects, and write the short replies (errors, truncation) by hand.
Pure functions over bytes; no sockets, no clocks, no registry. Building full answers is zone.py's
job (with dnslib)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("!HHHHHH")
_TYPE_CLASS = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")

# Header flag bits.
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
OPCODE_MASK = 0x7800

# Response codes.
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5
BADVERS = 16  # extended (EDNS0) rcode: upper 8 bits travel in the OPT record

# Types and classes used here.
A = 1
NS = 2
SOA = 6
PTR = 12
HINFO = 13
AAAA = 28
SRV = 33
OPT = 41
AXFR = 252
IXFR = 251
ANY = 255
CLASS_IN = 1

MIN_UDP_PAYLOAD = 512
OUR_UDP_PAYLOAD = 1232  # the size the DNS flag day 2020 recommends: no IP fragmentation

RCODE_NAMES = {
    NOERROR: "NOERROR",
    FORMERR: "FORMERR",
    SERVFAIL: "SERVFAIL",
    NXDOMAIN: "NXDOMAIN",
    NOTIMP: "NOTIMP",
    REFUSED: "REFUSED",
    BADVERS: "BADVERS",
}
TYPE_NAMES = {
    A: "A",
    NS: "NS",
    SOA: "SOA",
    PTR: "PTR",
    HINFO: "HINFO",
    AAAA: "AAAA",
    SRV: "SRV",
    OPT: "OPT",
    AXFR: "AXFR",
    IXFR: "IXFR",
    ANY: "ANY",
    5: "CNAME",
    15: "MX",
    16: "TXT",
    64: "SVCB",
    65: "HTTPS",
}


class Malformed(Exception):
    """The packet is not a query we can read. ``header`` is the 12-byte header when one could
    be read (the sender gets FORMERR), None when not even that (the packet is dropped)."""

    def __init__(self, reason: str, header: bytes | None = None) -> None:
        super().__init__(reason)
        self.header = header


class NotAQuery(Exception):
    """The packet is a response (QR set): never answered, so two servers cannot loop."""


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

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11

    @property
    def name(self) -> str:
        """The name as text, lower-case, no trailing dot ('' is the root)."""
        return ".".join(label.decode("ascii", "backslashreplace") for label in self.labels)

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
        for index in range(ancount + nscount + arcount):
            offset = skip_name(data, offset)
            if offset + _RR_FIXED.size > len(data):
                raise ValueError("record runs past the end of the packet")
            rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, offset)
            offset += _RR_FIXED.size + rdlength
            if offset > len(data):
                raise ValueError("record data runs past the end of the packet")
            if rtype == OPT:
                if index < ancount + nscount or payload is not None:
                    raise ValueError("OPT record misplaced or repeated")
                payload = rclass
                version = (ttl >> 16) & 0xFF
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
    )


def opt_record(payload: int = OUR_UDP_PAYLOAD, ext_rcode: int = 0) -> bytes:
    """An OPT pseudo-record advertising our UDP payload size (no options)."""
    return b"\x00" + _RR_FIXED.pack(OPT, payload, (ext_rcode & 0xFF) << 24, 0)


def reply_flags(query_flags: int, rcode: int, aa: bool = False, tc: bool = False) -> int:
    """Reply flags: QR, the query's opcode and RD, RA, and the low four bits of the rcode."""
    flags = QR | RA | (query_flags & (OPCODE_MASK | RD)) | (rcode & 0xF)
    if aa:
        flags |= AA
    if tc:
        flags |= TC
    return flags


def short_reply(query: Query, rcode: int, aa: bool = False, tc: bool = False) -> bytes:
    """A reply with the question and no records: errors and truncated answers. Carries an OPT
    record when the query had one (the extended rcode bits go there)."""
    edns = query.payload is not None
    head = HEADER.pack(query.id, reply_flags(query.flags, rcode, aa, tc), 1, 0, 0, 1 if edns else 0)
    tail = opt_record(ext_rcode=rcode >> 4) if edns else b""
    return head + query.question + tail


def header_reply(header: bytes, rcode: int) -> bytes:
    """A reply to a query whose question could not be read: the header only."""
    qid, flags, *_ = HEADER.unpack(header)
    return HEADER.pack(qid, reply_flags(flags, rcode), 0, 0, 0, 0)


def encode_name(labels: tuple[bytes, ...]) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


def encode_query(qid: int, labels: tuple[bytes, ...], qtype: int, qclass: int) -> bytes:
    """A recursive query with an EDNS0 record (what the forwarder sends upstream)."""
    return (
        HEADER.pack(qid, RD, 1, 0, 0, 1)
        + encode_name(labels)
        + _TYPE_CLASS.pack(qtype, qclass)
        + opt_record()
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
