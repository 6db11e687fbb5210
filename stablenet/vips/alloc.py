"""Stable virtual addresses: a service's address is derived from a hash of its name, probing
forward past addresses already taken, and then kept (the store persists it), so neither a restart
of stablenet nor of the service ever moves it. Pure: no I/O, no clock."""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping

Network = ipaddress.IPv4Network


class RangeFull(Exception):
    """Every usable address of the range is taken."""


def usable(network: Network) -> int:
    """Addresses a service can get: the range minus its network and broadcast addresses (a /31
    or /32 has no such pair)."""
    return network.num_addresses if network.prefixlen >= 31 else network.num_addresses - 2


def _first(network: Network) -> int:
    return int(network.network_address) + (0 if network.prefixlen >= 31 else 1)


def preferred(name: str, network: Network) -> str:
    """The address a name gets when nothing else holds it."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    offset = int.from_bytes(digest[:8], "big") % usable(network)
    return str(ipaddress.IPv4Address(_first(network) + offset))


def allocate(name: str, network: Network, taken: Iterable[str]) -> str:
    """The name's preferred address, or the next free one after it (wrapping round)."""
    held = set(taken)
    size = usable(network)
    first = _first(network)
    start = int(ipaddress.IPv4Address(preferred(name, network))) - first
    for step in range(size):
        candidate = str(ipaddress.IPv4Address(first + (start + step) % size))
        if candidate not in held:
            return candidate
    raise RangeFull(f"vips.range: every address of {network} is taken; use a larger range")


def assign(names: Iterable[str], network: Network, current: Mapping[str, str]) -> dict[str, str]:
    """``current`` plus an address for every name that has none, in name order (so the result
    does not depend on the order names were seen in). Addresses outside ``network`` (the range
    changed) are given up and allocated afresh."""
    out = {
        name: address
        for name, address in current.items()
        if ipaddress.IPv4Address(address) in network
        and (network.prefixlen >= 31 or address not in _ends(network))
    }
    taken = set(out.values())
    for name in sorted(set(names) - set(out)):
        address = allocate(name, network, taken)
        out[name] = address
        taken.add(address)
    return out


def _ends(network: Network) -> tuple[str, str]:
    return str(network.network_address), str(network.broadcast_address)


def range_problem(
    network: Network, subnets: Iterable[tuple[str, str]], routes: Iterable[tuple[str, str]]
) -> str | None:
    """Why ``network`` cannot be the range: it overlaps an engine network ((name, subnet)) or a
    host route ((destination, device)); None when it overlaps neither."""
    fix = (
        "choose a range that no Docker network and no route uses (vips.range, or "
        "STABLENET_VIPS_RANGE)"
    )
    for name, subnet in subnets:
        other = _v4(subnet)
        if other is not None and network.overlaps(other):
            return f"vips.range: {str(network)!r} overlaps Docker network {name} ({other}); {fix}"
    for dst, dev in routes:
        other = _v4(dst)
        if other is not None and network.overlaps(other):
            return f"vips.range: {str(network)!r} overlaps the host route {other} dev {dev}; {fix}"
    return None


def _v4(text: str) -> Network | None:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    return net if isinstance(net, Network) else None
