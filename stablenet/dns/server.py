"""The DNS server: UDP and TCP listeners on every `[dns] listen` address, as one async context
manager. It only moves bytes between sockets and the pure Resolver (core.py), and asks upstreams
through the Forwarder when the resolver says so; TCP connections are tcp.py's. It owns the
forwarding tasks and the Docker networks refresh (for `allow = ["docker"]`), and cancels them on
close. Nothing here talks to Docker directly: the daemon passes a callable that lists the
engine's networks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from stablenet.config import DnsConfig
from stablenet.dns.core import Forward, Network, Resolver
from stablenet.dns.forward import Forwarder, parse_upstream, resolv_conf_upstreams, without_self
from stablenet.dns.stats import DnsStats
from stablenet.dns.tcp import TcpFrontend, TcpLimits
from stablenet.dns.zone import ZoneSettings
from stablenet.errors import StartupError
from stablenet.lifecycle import Server
from stablenet.registry import Registry
from stablenet.units import parse_hostport, parse_network

logger = logging.getLogger(__name__)

DOCKER = "docker"  # in dns.listen: the engine's default bridge gateway; in dns.allow: its subnets
NETWORKS_REFRESH_MIN = 2.0  # seconds between two listings of the engine's networks


@dataclass(frozen=True, slots=True)
class EngineNetworks:
    """What the DNS server needs to know about the engine's networks."""

    subnets: tuple[str, ...]  # CIDRs of every network, IPv4 and IPv6
    bridge_gateway: str | None  # the default bridge's gateway (e.g. 172.17.0.1)


EngineLookup = Callable[[], Awaitable[EngineNetworks]]


def listen_addresses(listen: tuple[str, ...], gateway: str | None) -> list[tuple[str, int]]:
    """dns.listen entries as (host, port); 'docker:PORT' becomes the bridge gateway."""
    out = []
    for entry in listen:
        host, _, port = entry.rpartition(":")
        if host == DOCKER:
            if gateway is None:
                raise StartupError(
                    f"dns.listen: {entry!r} needs the Docker default bridge's gateway and the "
                    "engine did not report one; list the address itself (e.g. 172.17.0.1:53)"
                )
            out.append((gateway, int(port)))
        else:
            out.append(parse_hostport(entry))
    return out


def allow_networks(allow: tuple[str, ...], engine: EngineNetworks | None) -> list[Network]:
    nets = [parse_network(entry) for entry in allow if entry != DOCKER]
    if DOCKER in allow and engine is not None:
        nets.extend(parse_network(subnet) for subnet in engine.subnets)
    return nets


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._resolver = server.resolver
        self._registry = server.registry
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, ...]) -> None:
        try:
            out = self._resolver.udp(data, addr[0], self._registry.snapshot, self._loop.time())
        except Exception:  # a bug must cost one query, never the server
            self._server.stats.internal_errors += 1
            logger.exception("DNS query from %s failed", addr[0])
            return
        if out is None:
            return
        if isinstance(out, bytes):
            assert self.transport is not None
            self.transport.sendto(out, addr)
        else:
            self._server.spawn(self._forward(out, addr))

    async def _forward(self, request: Forward, addr: tuple[str | Any, ...]) -> None:
        reply = await self._server.forward(request)
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        logger.debug("DNS UDP socket error: %s", exc)


class DnsServer(Server):
    """UDP + TCP DNS on the configured addresses. ``bound`` lists (host, port) once started."""

    def __init__(
        self,
        registry: Registry,
        config: DnsConfig,
        engine: EngineLookup | None = None,
        stats: DnsStats | None = None,
        resolv_conf: Path = Path("/etc/resolv.conf"),
        tcp_limits: TcpLimits | None = None,
    ) -> None:
        super().__init__()
        self.registry = registry
        self.config = config
        self.stats = stats if stats is not None else DnsStats()
        self._engine = engine
        self._resolv_conf = resolv_conf
        self.resolver = Resolver(
            ZoneSettings(
                zone=config.zone,
                ttl=max(0, round(config.ttl)),
                negative_ttl=max(0, round(config.negative_ttl)),
            ),
            stats=self.stats,
            cache_size=config.cache_size,
        )
        self.forwarder = Forwarder((), config.forward_timeout, config.max_forwards, self.stats)
        self.bound: list[tuple[str, int]] = []
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        if tcp_limits is None:
            tcp_limits = TcpLimits(
                connections=config.tcp_connections, per_client=config.tcp_per_client
            )
        self.tcp = TcpFrontend(self.resolver, registry, self.forward, self.stats, tcp_limits)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        networks = await self._engine_networks() if self._needs_engine() else None
        addresses = listen_addresses(
            self.config.listen, networks.bridge_gateway if networks else None
        )
        self.resolver.set_allow(allow_networks(self.config.allow, networks))
        self.resolver.settings = dataclasses.replace(
            self.resolver.settings,
            own_addresses=tuple(h for h, _ in addresses if h not in ("0.0.0.0", "::")),
        )
        self.forwarder.upstreams = tuple(self._upstreams(addresses))
        if not self.forwarder.upstreams:
            logger.warning("DNS: no upstream resolvers; names outside the zone get SERVFAIL")
        try:
            for (host, port), entry in zip(addresses, self.config.listen, strict=True):
                await self._bind(host, port, entry)
        except BaseException:
            await self._close()
            raise
        if DOCKER in self.config.allow and self._engine is not None:
            self.spawn(self._follow_networks())
        logger.info(
            "DNS listening on %s (zone %s, upstreams %s)",
            ", ".join(f"{h}:{p}" for h, p in self.bound),
            self.config.zone,
            ", ".join(str(u) for u in self.forwarder.upstreams) or "none",
        )

    async def stop(self) -> None:
        await self._close()

    def _needs_engine(self) -> bool:
        return self._engine is not None and (
            DOCKER in self.config.allow
            or any(entry.rpartition(":")[0] == DOCKER for entry in self.config.listen)
        )

    async def _engine_networks(self) -> EngineNetworks | None:
        assert self._engine is not None
        try:
            return await self._engine()
        except Exception as exc:  # the engine may be down at start; the registry copes too
            logger.warning("DNS: cannot list Docker networks (%s); will retry on changes", exc)
            return None

    def _upstreams(self, own: list[tuple[str, int]]) -> list[Any]:
        if self.config.upstreams:
            configured = [parse_upstream(text) for text in self.config.upstreams]
        else:
            try:
                text = self._resolv_conf.read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                logger.warning("DNS: cannot read %s: %s", self._resolv_conf, exc)
                text = ""
            configured = resolv_conf_upstreams(text)
        kept = without_self(configured, own, {h for h, _ in own})
        for dropped in set(configured) - set(kept):
            logger.warning("DNS: upstream %s is this server itself; not forwarding to it", dropped)
        return kept

    async def _bind(self, host: str, port: int, entry: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            udp = self.sockets("udp", host, port)  # bound early or inherited, else here
            if udp is not None:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), sock=udp
                )
            else:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(host, port), reuse_port=False
                )
            self._udp.append(transport)
            tcp = self.sockets("tcp", host, port)
            if tcp is not None:
                server = await asyncio.start_server(self.tcp, sock=tcp, backlog=256)
            else:
                server = await asyncio.start_server(
                    self.tcp, host, port, reuse_address=True, backlog=256
                )
            self._tcp.append(server)
        except OSError as exc:
            raise StartupError(
                f"dns.listen: cannot listen on {entry!r} ({host}:{port}): "
                f"{exc.strerror or exc}; pick a free address or port"
            ) from None
        self.bound.append(transport.get_extra_info("sockname")[:2])

    async def _close(self) -> None:
        for transport in self._udp:
            transport.close()
        for server in self._tcp:
            server.close()
        self.tcp.close_all()
        await self.cancel_tasks()
        for server in self._tcp:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await server.wait_closed()
        self._udp.clear()
        self._tcp.clear()

    # -- runtime changes ----------------------------------------------------------------------

    def set_stable_addresses(
        self, stable: Mapping[str, tuple[str, ...]], lasting: frozenset[str] = frozenset()
    ) -> None:
        """Services reached through the proxy or a virtual address: answer their names with
        these addresses (a long TTL for the services in ``lasting``)."""
        self.resolver.set_stable(stable, lasting)

    async def _follow_networks(self) -> None:
        """Re-list the engine's networks (for allow = "docker") whenever the registry changes,
        at most every NETWORKS_REFRESH_MIN seconds: a new network comes with new containers."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        async for _ in self.registry.watch(self.registry.snapshot.version):
            wait = last + NETWORKS_REFRESH_MIN - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            last = loop.time()
            networks = await self._engine_networks()
            if networks is None:
                continue
            nets = allow_networks(self.config.allow, networks)
            if set(nets) != set(self.resolver.allow):
                logger.info("DNS: allowed networks now %s", ", ".join(map(str, nets)))
                self.resolver.set_allow(nets)

    # -- forwarding and TCP -------------------------------------------------------------------

    async def forward(self, request: Forward) -> bytes | None:
        """The client's reply to a forwarded question; None only when a bug lost it."""
        try:
            upstream = await self.forwarder.ask(request.question)
        except Exception:
            logger.exception("DNS forwarding of %s failed", request.query.name)
            upstream = None
        try:
            return self.resolver.forwarded(request, upstream, asyncio.get_running_loop().time())
        except Exception:  # a bug must cost one query, never the server
            self.stats.internal_errors += 1
            logger.exception("DNS reply to %s failed", request.query.name)
            return None


def gateway_of(subnet: str) -> str:
    """The address Docker gives a bridge's gateway when its IPAM config names none."""
    net = ipaddress.ip_network(subnet, strict=False)
    return str(next(net.hosts()))
