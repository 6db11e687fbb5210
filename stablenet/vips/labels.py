"""The labels that choose how a service's virtual address is served, and the service ports an
endpoint offers. Pure: parsing and derivation only, used by the Docker translation (to refuse a
bad label) and by the sync loop.

  stablenet.vip.mode   kernel (default): nftables DNAT, no user-space work per connection
                       proxy: stablenet's own HTTP proxy listens on the address
                       proxy-tcp: stablenet's own TCP proxy listens on the address
  stablenet.vip.ports  SERVICE_PORT:CONTAINER_PORT[/tcp|/udp], comma-separated:
                       "80:8080,53:5353/udp"
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from stablenet.model import Endpoint

MODE_LABEL = "stablenet.vip.mode"
PORTS_LABEL = "stablenet.vip.ports"
PROTOCOLS = ("tcp", "udp")


class Mode(enum.Enum):
    KERNEL = "kernel"
    PROXY = "proxy"  # HTTP through the proxy: holding, retries, routed by address (no Host)
    PROXY_TCP = "proxy-tcp"  # plain TCP through the proxy


@dataclass(frozen=True, slots=True, order=True)
class PortMap:
    """One service port and the container port it reaches."""

    proto: str  # "tcp" or "udp"
    service_port: int
    container_port: int


def parse_mode(text: str) -> Mode:
    value = text.strip().lower()
    for mode in Mode:
        if mode.value == value:
            return mode
    raise ValueError("expected kernel, proxy or proxy-tcp")


def _port(text: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port (1-65535)")
    return int(text)


def parse_ports(text: str) -> tuple[PortMap, ...]:
    """'80:8080, 53:5353/udp' -> PortMaps. A bare '8080' serves the container port as itself."""
    out: list[PortMap] = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        body, _, proto = entry.partition("/")
        proto = proto.strip().lower() or "tcp"
        if proto not in PROTOCOLS:
            raise ValueError(f"{entry!r}: protocol must be tcp or udp")
        service, sep, container = body.partition(":")
        try:
            sport = _port(service)
            cport = _port(container) if sep else sport
        except ValueError as exc:
            raise ValueError(f"{entry!r}: {exc}; expected SERVICE_PORT:CONTAINER_PORT") from None
        out.append(PortMap(proto, sport, cport))
    if not out:
        raise ValueError("expected SERVICE_PORT:CONTAINER_PORT[/udp], comma-separated")
    return tuple(out)


def label_problem(labels: Mapping[str, str]) -> tuple[str, str] | None:
    """(label, why) for the first unusable vip label, or None."""
    try:
        if MODE_LABEL in labels:
            parse_mode(labels[MODE_LABEL])
    except ValueError as exc:
        return MODE_LABEL, str(exc)
    try:
        if PORTS_LABEL in labels:
            parse_ports(labels[PORTS_LABEL])
    except ValueError as exc:
        return PORTS_LABEL, str(exc)
    return None


def mode_of(ep: Endpoint) -> Mode:
    try:
        return parse_mode(ep.labels.get(MODE_LABEL, "kernel"))
    except ValueError:
        return Mode.KERNEL


def endpoint_ports(ep: Endpoint) -> tuple[PortMap, ...]:
    """Every service port this endpoint serves: each container port it exposes (or names in
    stablenet.port) is served at the same number unless stablenet.vip.ports maps it; each
    mapping is served even when the port is not exposed."""
    try:
        maps = parse_ports(ep.labels[PORTS_LABEL]) if PORTS_LABEL in ep.labels else ()
    except ValueError:
        maps = ()
    mapped = {(m.proto, m.container_port) for m in maps}
    container: set[tuple[str, int]] = set()
    if ep.port is not None:
        container.add(("tcp", ep.port))
    for spec in ep.exposed:
        number, _, proto = spec.partition("/")
        proto = proto or "tcp"
        if proto in PROTOCOLS and number.isdigit():
            container.add((proto, int(number)))
    out = set(maps)
    out.update(PortMap(p, n, n) for p, n in container if (p, n) not in mapped)
    return tuple(sorted(out))
