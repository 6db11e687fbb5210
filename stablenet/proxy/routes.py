"""Host routing: which service a request's Host names. Pure: built from a registry Snapshot,
the DNS zone and the previous table, with time as a parameter. A name is exact
(``shop.example.com``) or a wildcard (``*.example.com``: one or more leading labels); the most
specific name that covers a host wins. A name whose service has momentarily no endpoint at all
(its only container is restarting) is remembered for a while, so its requests are held instead
of answered 404."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from stablenet.registry import Snapshot

REMEMBER = 600.0  # seconds a host stays routable after its service left the registry


@dataclass(frozen=True, slots=True)
class Routes:
    """Name (lower case, no port, no trailing dot; ``*.suffix`` for a wildcard) -> service, for
    one snapshot version."""

    version: int
    hosts: Mapping[str, str] = field(default_factory=dict)
    gone: Mapping[str, tuple[str, float]] = field(default_factory=dict)  # host -> (service, since)

    wildcards: bool = False  # some name in hosts or gone is a wildcard

    def service_for(self, host: str) -> str | None:
        """The service of the most specific name covering ``host``: the exact name, then the
        wildcard with the longest suffix (``*.b.example.com`` before ``*.example.com``, and
        ``*.example.com`` covers ``a.example.com`` and ``a.b.example.com``, not
        ``example.com``). A remembered name ranks as if it were still there: a restarting
        service keeps its own host from a wildcard of another."""
        service = self._named(host)
        if service is not None or not self.wildcards:
            return service
        dot = host.find(".", 1)
        while dot > 0:
            service = self._named("*" + host[dot:])
            if service is not None:
                return service
            dot = host.find(".", dot + 1)
        return None

    def _named(self, name: str) -> str | None:
        service = self.hosts.get(name)
        if service is None:
            remembered = self.gone.get(name)
            if remembered is not None:
                return remembered[0]
        return service


def normalize_host(raw: str) -> str:
    """'Web.Stablenet.Internal.:8080' -> 'web.stablenet.internal'; '[::1]:80' -> '::1'."""
    host = raw.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def build_routes(
    snap: Snapshot, zone: str, previous: Routes | None, now: float, remember: float = REMEMBER
) -> Routes:
    """``<service>.<zone>`` for every service (fronted ones too), plus every name (exact or
    wildcard) in an endpoint's (or a front's) ``stablenet.http.host`` label. The zone name of
    a service wins over another service's label; between labels naming the same name, the
    first service by name wins."""
    hosts: dict[str, str] = {}
    suffix = "." + zone.strip(".").lower()
    for service in (*snap.services, *snap.fronted):
        hosts[service.lower() + suffix] = service
    for service, endpoints in snap.services.items():
        for ep in endpoints:
            for name in ep.http_hosts:
                hosts.setdefault(normalize_host(name), service)
    for service, front in snap.fronted.items():  # fronted with no endpoint: its own names
        for name in front.http_hosts:
            hosts.setdefault(normalize_host(name), service)
    gone: dict[str, tuple[str, float]] = {}
    if previous is not None:
        for host, service in previous.hosts.items():
            if host not in hosts:
                gone[host] = (service, now)
        for host, (service, since) in previous.gone.items():
            if host not in hosts and host not in gone and now - since < remember:
                gone[host] = (service, since)
    wildcards = any(name.startswith("*.") for name in (*hosts, *gone))
    return Routes(snap.version, MappingProxyType(hosts), MappingProxyType(gone), wildcards)
