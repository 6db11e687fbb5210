"""DNS counters: a plain mutable object the resolver increments and metrics read. No I/O, no
locks (everything runs on the event loop)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from stablenet.dns import wire


@dataclass(slots=True)
class DnsStats:
    # (qtype, rcode) -> replies; the full (extended) rcode, wire.NO_QUESTION for no question
    answers: Counter[tuple[int, int]] = field(default_factory=Counter)
    cache_hits: int = 0  # replies served from a prepared wire response
    forwarded: int = 0  # questions sent upstream (forward cache misses)
    forward_cache_hits: int = 0  # forwarded names answered from the forward cache
    forward_failures: int = 0  # upstream timeouts, errors, garbage -> SERVFAIL
    forward_overflow: int = 0  # SERVFAIL because max_forwards were already in flight
    upstream_errors: int = 0  # upstream answers FORMERR/SERVFAIL/NOTIMP/REFUSED: next one tried
    refused: int = 0  # clients outside dns.allow (and refused question kinds)
    malformed: int = 0  # unreadable packets (FORMERR when a header could be read, else dropped)
    dropped: int = 0  # packets not answered at all (malformed without header, stray responses)
    truncated: int = 0  # UDP replies cut to TC because the client's payload size was too small
    internal_errors: int = 0  # queries lost to a bug (logged with a traceback)
    # TCP connections closed at once, by reason: not_allowed, per_client, full
    tcp_rejected: Counter[str] = field(default_factory=Counter)
    tcp_evicted: int = 0  # idle TCP connections closed to let a new client in

    def queries_by_type(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (qtype, _), count in self.answers.items():
            out[wire.type_name(qtype)] += count
        return dict(out)

    def replies_by_rcode(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_, rcode), count in self.answers.items():
            out[wire.rcode_name(rcode)] += count
        return dict(out)

    def as_dict(self) -> dict[str, object]:
        return {
            "queries_by_type": self.queries_by_type(),
            "replies_by_rcode": self.replies_by_rcode(),
            "cache_hits": self.cache_hits,
            "forwarded": self.forwarded,
            "forward_cache_hits": self.forward_cache_hits,
            "forward_failures": self.forward_failures,
            "forward_overflow": self.forward_overflow,
            "upstream_errors": self.upstream_errors,
            "refused": self.refused,
            "malformed": self.malformed,
            "dropped": self.dropped,
            "truncated": self.truncated,
            "internal_errors": self.internal_errors,
            "tcp_rejected": dict(self.tcp_rejected),
            "tcp_evicted": self.tcp_evicted,
        }
