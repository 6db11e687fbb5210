"""The authoritative zone, built from one registry snapshot: which names exist, their records,
and the answer to a question about them (NXDOMAIN vs NODATA, SOA in authority, AA). Also the PTR
names of the addresses containers hold. Pure: a ZoneIndex is made from a Snapshot and settings and
never changes; nothing here does I/O.

Names (relative to the zone):
  <service>                 A/AAAA: the service's stable address when it has one (the proxy's
                            virtual address, or its own virtual address from vips, answered
                            with a long TTL), else its READY endpoints (never draining/unhealthy)
  <container-name>          A/AAAA of that container (a service of the same name wins)
  _<port>._tcp.<service>    SRV for the READY endpoints, port number as the port name, e.g.
                            _8080._tcp.web; target <container-name>.<zone>, its A/AAAA added
  (apex)                    SOA, NS (the apex itself), A/AAAA of the server's own addresses
  <host>.hosts              A/AAAA of a cluster host: the SRV target of its endpoints that are
                            reached on a published port (no port is implied by this name)

Endpoints of other hosts (cluster): an A/AAAA answer must never send a client to an address where
the port it will use is not open. A remote endpoint is "direct" when other hosts reach it on the
container's own port (its advertised port equals the container's port: routed container
networks, or a port published under the same number); only direct endpoints appear in a
service's or a container's A/AAAA. The others are in SRV only, with their host's address and
published port; a service with a stable address (a dedicated listener) is answered with that
address as always, and the proxy behind it reaches every endpoint.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from dnslib import AAAA as AAAA_RD
from dnslib import NS as NS_RD
from dnslib import PTR as PTR_RD
from dnslib import RR, SOA, SRV, DNSLabel
from dnslib import A as A_RD

from stablenet.dns import wire
from stablenet.model import Endpoint
from stablenet.registry import Snapshot

NS_TTL = 3600  # the apex records never change while the daemon runs
LASTING_TTL = 600  # a service's virtual address (vips): it never moves
_GLUE = -1  # pseudo-type under which an SRV node keeps its targets' addresses
_ANY_ORDER = (
    wire.Type.A,
    wire.Type.AAAA,
    wire.Type.SRV,
    wire.Type.PTR,
    wire.Type.SOA,
    wire.Type.NS,
)


@dataclass(frozen=True, slots=True)
class ZoneSettings:
    zone: str = "stablenet.internal"
    ttl: int = 5  # answers that can change
    negative_ttl: int = 5  # NXDOMAIN / NODATA, the SOA minimum
    # service -> its stable (virtual) addresses; a service listed here is answered with them
    # instead of its endpoints. The proxy fills this in; empty means every service is answered
    # with its ready endpoints.
    stable: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    lasting: frozenset[str] = frozenset()  # services whose stable addresses never move
    own_addresses: tuple[str, ...] = ()  # the apex's A/AAAA: where this server listens

    @property
    def labels(self) -> tuple[bytes, ...]:
        return tuple(part.encode("ascii") for part in self.zone.lower().split("."))


@dataclass(frozen=True, slots=True)
class Result:
    """An authoritative answer (or None from ZoneIndex.lookup: not ours, forward it)."""

    rcode: int
    answer: tuple[RR, ...] = ()
    authority: tuple[RR, ...] = ()
    additional: tuple[RR, ...] = ()


Names = dict[tuple[bytes, ...], dict[int, list[RR]]]


class ZoneIndex:
    """Every name in the zone (and every known PTR name) with its records, for one snapshot."""

    def __init__(self, snap: Snapshot, settings: ZoneSettings) -> None:
        self.version = snap.version
        self.settings = settings
        self.zone = settings.labels
        self._apex = DNSLabel(self.zone)
        ttl = settings.ttl
        names: Names = {(): {}}
        ptr: Names = {}
        self.soa = RR(
            self._apex,
            wire.Type.SOA,
            ttl=settings.negative_ttl,
            rdata=SOA(
                self._apex,
                DNSLabel((b"hostmaster", *self.zone)),
                (snap.version & 0xFFFFFFFF, 3600, 600, 86400, settings.negative_ttl),
            ),
        )
        apex = names[()]
        apex[wire.Type.SOA] = [self.soa]
        apex[wire.Type.NS] = [RR(self._apex, wire.Type.NS, ttl=NS_TTL, rdata=NS_RD(self._apex))]
        _add_addresses(apex, self._apex, settings.own_addresses, NS_TTL)

        services: set[tuple[bytes, ...]] = set()
        stable_addresses = {a for addresses in settings.stable.values() for a in addresses}
        for service in sorted({*snap.services, *snap.fronted}):
            rel = _relative(service)
            if rel is None:
                continue
            services.add(rel)
            node = names.setdefault(rel, {})
            owner = self._owner(rel)
            stable = settings.stable.get(service)
            ready = snap.ready.get(service, ())
            if stable is not None:
                long = LASTING_TTL if service in settings.lasting else ttl
                _add_addresses(node, owner, stable, long)
                for address in stable:
                    _add_ptr(ptr, address, owner, long)
            else:
                direct = [ep for ep in ready if _direct(ep)]
                _add_addresses(node, owner, _endpoint_addresses(direct), ttl)
            self._add_srv(names, rel, ready, ttl)

        for ep in sorted(snap.endpoints.values(), key=lambda e: (e.name, e.id)):
            rel = _relative(ep.name)
            if rel is None:
                continue
            target = self._owner(rel)
            if not _direct(ep):
                continue
            if rel not in services and rel not in names:
                _add_addresses(names.setdefault(rel, {}), target, _endpoint_addresses([ep]), ttl)
            if ep.origin is not None:
                continue  # its address is its host's: no PTR to one container
            for address in sorted({*(ep.addresses or (ep.address,)), *_opt(ep.address6)}):
                if address not in stable_addresses:
                    _add_ptr(ptr, address, target, ttl)

        # Empty non-terminals (e.g. _tcp.web when _8080._tcp.web exists) exist, with no data.
        for rel in list(names):
            for cut in range(1, len(rel)):
                names.setdefault(rel[cut:], {})
        self._names = names
        self._ptr = ptr

    def _owner(self, rel: tuple[bytes, ...]) -> DNSLabel:
        return DNSLabel((*rel, *self.zone))

    def _add_srv(
        self, names: Names, rel: tuple[bytes, ...], ready: Iterable[Endpoint], ttl: int
    ) -> None:
        for ep in ready:
            target = _relative(ep.name) if _direct(ep) else _relative(ep.host + ".hosts")
            if ep.port is None or target is None:
                continue
            if not _direct(ep) and not names.get(target):  # a host's address, once
                _add_addresses(names.setdefault(target, {}), self._owner(target), [ep.address], ttl)
            named = ep.origin.target_port if ep.origin is not None else None  # the port's name
            srv_rel = (b"_%d" % (named or ep.port), b"_tcp", *rel)
            target_name = self._owner(target)
            node = names.setdefault(srv_rel, {})
            node.setdefault(wire.Type.SRV, []).append(
                RR(
                    self._owner(srv_rel),
                    wire.Type.SRV,
                    ttl=ttl,
                    rdata=SRV(0, max(0, min(ep.weight, 0xFFFF)), ep.port, target_name),
                )
            )
            glue: dict[int, list[RR]] = {}
            _add_addresses(glue, target_name, _endpoint_addresses([ep]), ttl)
            node.setdefault(_GLUE, []).extend(rr for rrs in glue.values() for rr in rrs)

    def in_zone(self, labels: tuple[bytes, ...]) -> bool:
        n = len(self.zone)
        return len(labels) >= n and labels[len(labels) - n :] == self.zone

    def lookup(self, labels: tuple[bytes, ...], qtype: int) -> Result | None:
        """The authoritative answer for (name, type), or None when the name is not ours."""
        if self.in_zone(labels):
            node = self._names.get(labels[: len(labels) - len(self.zone)])
        else:
            node = self._ptr.get(labels)
            if node is None:
                return None
        if node is None:
            return Result(wire.Rcode.NXDOMAIN, authority=(self.soa,))
        if qtype == wire.Type.ANY:  # RFC 8482: one RRset is enough
            qtype = next((t for t in _ANY_ORDER if node.get(t)), wire.Type.ANY)
        records = node.get(qtype)
        if not records:
            return Result(wire.Rcode.NOERROR, authority=(self.soa,))
        extra = tuple(node.get(_GLUE, ())) if qtype == wire.Type.SRV else ()
        return Result(wire.Rcode.NOERROR, answer=tuple(records), additional=extra)


def _direct(ep: Endpoint) -> bool:
    """This host's endpoint, or a remote one reached on the container's own port."""
    return ep.origin is None or ep.origin.target_port == ep.port


def _opt(value: str | None) -> tuple[str, ...]:
    return () if value is None else (value,)


def _endpoint_addresses(endpoints: Iterable[Endpoint]) -> list[str]:
    out: list[str] = []
    for ep in endpoints:
        for address in (ep.address, *_opt(ep.address6)):
            if address and address not in out:
                out.append(address)
    return out


def _add_addresses(
    node: dict[int, list[RR]], owner: DNSLabel, addresses: Iterable[str], ttl: int
) -> None:
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if ip.version == 4:
            node.setdefault(wire.Type.A, []).append(
                RR(owner, wire.Type.A, ttl=ttl, rdata=A_RD(str(ip)))
            )
        else:
            node.setdefault(wire.Type.AAAA, []).append(
                RR(owner, wire.Type.AAAA, ttl=ttl, rdata=AAAA_RD(str(ip)))
            )


def _add_ptr(ptr: Names, address: str, target: DNSLabel, ttl: int) -> None:
    name = _reverse(address)
    if name:
        records = ptr.setdefault(name, {}).setdefault(wire.Type.PTR, [])
        if not any(rr.rdata.label == target for rr in records):
            records.append(RR(DNSLabel(name), wire.Type.PTR, ttl=ttl, rdata=PTR_RD(target)))


def _relative(name: str) -> tuple[bytes, ...] | None:
    """A registry name as lower-case DNS labels, or None when it cannot be a DNS name."""
    try:
        raw = name.strip(".").lower().encode("ascii")
    except UnicodeEncodeError:
        return None
    labels = tuple(raw.split(b"."))
    if not raw or any(not label or len(label) > 63 for label in labels) or len(raw) > 200:
        return None
    return labels


def _reverse(address: str) -> tuple[bytes, ...]:
    try:
        pointer = ipaddress.ip_address(address).reverse_pointer
    except ValueError:
        return ()
    return tuple(pointer.encode("ascii").split(b"."))
