"""DNS for the registry: authoritative answers for the zone, forwarding for everything else.
core.Resolver decides (pure); server.DnsServer is the asyncio adapter, tcp.TcpFrontend its TCP
connections; forward.Forwarder asks upstreams. Nothing in this package talks to Docker or
changes the registry."""

from stablenet.dns.core import Resolver
from stablenet.dns.server import DnsServer, EngineNetworks
from stablenet.dns.stats import DnsStats
from stablenet.dns.zone import ZoneIndex, ZoneSettings

__all__ = ["DnsServer", "DnsStats", "EngineNetworks", "Resolver", "ZoneIndex", "ZoneSettings"]
