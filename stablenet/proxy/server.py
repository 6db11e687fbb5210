"""The proxy's lifecycle: listeners on the virtual address, per-service ones from config and from
labels (and the stable addresses DNS answers for them), the timeout sweep, following the registry,
and the ordered drain on shutdown. An async context manager the daemon stacks. Where requests go
is dispatch.py's; the connections are client.py, upstream.py and tcp.py. Nothing here knows
Docker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from stablenet.config import ProxyConfig
from stablenet.errors import StartupError
from stablenet.lifecycle import Server
from stablenet.proxy import vip
from stablenet.proxy.client import ClientConnection
from stablenet.proxy.dispatch import Counters, Dispatcher, OutcomeHook, no_outcome
from stablenet.proxy.routes import REMEMBER
from stablenet.proxy.tcp import TcpClient
from stablenet.registry import Registry, Snapshot
from stablenet.units import parse_hostport

__all__ = ["Counters", "OutcomeHook", "Proxy", "no_outcome"]

logger = logging.getLogger(__name__)

SWEEP_INTERVAL = 0.25  # seconds between timeout sweeps
DRAIN_GRACE = 10.0  # seconds in-flight requests get to finish on shutdown
DRAIN_IDLE = 1.0  # seconds a kept-alive connection may stay quiet while draining, then closed

DynamicKey = tuple[str, str, str, int]  # service, kind, host, port
StableHook = Callable[[dict[str, tuple[str, ...]]], None]
"""Called with service -> addresses of its dedicated listeners whenever that changes (DNS
answers those services with these stable addresses)."""


def no_stable(stable: dict[str, tuple[str, ...]]) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Listener:
    """Where one listener binds, and what it serves: Host routing (service None) or one service."""

    host: str
    port: int
    kind: str  # "http" or "tcp"
    service: str | None
    key: str  # the config key named in errors

    @classmethod
    def parse(cls, spec: str) -> Listener:
        service, _, rest = spec.partition("=")
        kind, _, hostport = rest.partition(":")
        host, port = parse_hostport(hostport)
        return cls(host, port, kind, service, f"proxy.listeners ({spec})")


class Proxy(Server):
    """The proxy's listeners and lifecycle. Enter it to listen; leave it to drain. What the
    connections share and decide lives in ``dispatcher``."""

    def __init__(
        self,
        registry: Registry,
        config: ProxyConfig,
        zone: str = "stablenet.internal",
        report: OutcomeHook = no_outcome,
        metrics: bool = True,
        on_stable: StableHook = no_stable,
    ) -> None:
        super().__init__()
        self.registry = registry
        self.config = config
        self.dispatcher = Dispatcher(registry, config, self.spawn, zone, report, metrics)
        host, port = parse_hostport(config.listen)
        self.listeners = [Listener(host, port, "http", None, "proxy.listen")] + [
            Listener.parse(spec) for spec in config.listeners
        ]
        self._servers: list[asyncio.Server] = []
        self._added: list[str] = []
        # Listeners declared by the stablenet.proxy.listen label: (service, kind, host, port).
        self._dynamic: dict[DynamicKey, asyncio.Server] = {}
        self._dynamic_seen: dict[DynamicKey, float] = {}
        self._wanted: set[DynamicKey] = set()  # what the labels declare, as of the last refresh
        self._vip_listeners: frozenset[DynamicKey] = frozenset()  # per-service virtual addresses
        self._stable: dict[str, tuple[str, ...]] | None = None
        self._fronted: tuple[str, ...] = ()  # services fronted as of the last refresh
        self.on_stable = on_stable
        self._dynamic_failed: set[DynamicKey] = set()
        self._dynamic_lock = asyncio.Lock()
        self.loop = asyncio.get_event_loop()
        self.bound: list[tuple[str, int]] = []  # actual addresses, in listener order
        self.keep_addresses = False  # a successor serves on them: leave them on the interface

    def count(self, service: str | None) -> Counters:
        """The service's counters (``None``: requests no service took)."""
        return self.dispatcher.count(service)

    def in_flight(self, endpoint_id: str) -> int:
        """Requests (and TCP connections) an endpoint is serving now: what draining waits for."""
        return self.dispatcher.balancer.inflight.get(endpoint_id, 0)

    def held(self, service: str) -> int:
        """Requests (and TCP connections) of a service waiting for a ready endpoint."""
        dispatcher = self.dispatcher
        return len(dispatcher.waiters.get(service, ())) + dispatcher.tcp_waiting.get(service, 0)

    def concurrency(self, service: str) -> int:
        """What a service is asked to do at once: requests and TCP connections in flight at
        its endpoints, plus those held for it."""
        inflight = self.dispatcher.balancer.inflight
        endpoints = self.registry.snapshot.services.get(service, ())
        return self.held(service) + sum(inflight.get(ep.id, 0) for ep in endpoints)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = self.dispatcher.loop = asyncio.get_running_loop()
        try:
            for listener in self.listeners:
                await self._listen(listener)
        except BaseException:
            await self._shutdown()
            raise
        self.spawn(self._sweep(), name="proxy-sweep")
        self.dispatcher.routes()
        self.spawn(self._watch(-1), name="proxy-watch")  # -1: see the current snapshot too

    async def stop(self) -> None:
        await self._shutdown()

    async def _listen(self, listener: Listener) -> asyncio.Server:
        if listener.host not in self._added and await vip.ensure_local(listener.host, listener.key):
            self._added.append(listener.host)
        service = listener.service

        def http_factory() -> asyncio.Protocol:
            return cast(asyncio.Protocol, ClientConnection(self.dispatcher, service))

        def tcp_factory() -> asyncio.Protocol:
            assert service is not None
            return TcpClient(self.dispatcher, service)

        factory = http_factory if listener.kind == "http" else tcp_factory
        try:
            sock = self.sockets("tcp", listener.host, listener.port)  # bound early or inherited
            if sock is not None:
                server = await self.loop.create_server(factory, sock=sock, backlog=1024)
            else:
                server = await self.loop.create_server(
                    factory, listener.host, listener.port, reuse_address=True, backlog=1024
                )
        except OSError as exc:
            raise StartupError(
                f"{listener.key}: cannot listen on {listener.host}:{listener.port}: "
                f"{exc.strerror or exc}"
            ) from None
        self._servers.append(server)
        # uvloop gives a list where the stubs say tuple: index it untyped.
        sock = cast(Any, server).sockets[0].getsockname()
        self.bound.append((str(sock[0]), int(sock[1])))
        logger.info(
            "proxy listening on %s:%d (%s%s)",
            sock[0],
            sock[1],
            listener.kind,
            f" for service {service}" if service else ", routed by Host",
        )
        return server

    # -- listeners declared by labels ---------------------------------------------------------

    def _declared(self, snap: Snapshot) -> set[DynamicKey]:
        """Listeners the snapshot's labels ask for, plus those of services momentarily gone
        (a restarting container keeps its listener, and requests are held there)."""
        now = self.loop.time()
        wanted: set[DynamicKey] = set()
        declared = [(ep.service, ep.listeners) for ep in snap.endpoints.values()]
        declared += [(service, front.listeners) for service, front in snap.fronted.items()]
        for service, listeners in declared:
            for entry in listeners:
                kind, _, hostport = entry.partition(":")
                host, port = parse_hostport(hostport)
                key = (service, kind, host, port)
                wanted.add(key)
                self._dynamic_seen[key] = now
        for key in self._vip_listeners:
            wanted.add(key)
            self._dynamic_seen[key] = now
        for key, seen in list(self._dynamic_seen.items()):
            if key not in wanted:
                if now - seen < REMEMBER:
                    wanted.add(key)
                else:
                    del self._dynamic_seen[key]
        return wanted

    def refresh(self, snap: Snapshot) -> set[DynamicKey]:
        """Take the listeners a snapshot declares; tell ``on_stable`` when the services'
        stable addresses change. Returns the declared listeners."""
        self._wanted = self._declared(snap)
        self._fronted = tuple(snap.fronted)
        stable = self.stable_addresses()
        if stable != self._stable:
            self._stable = stable
            self.on_stable(stable)
        return self._wanted

    def stable_addresses(self) -> dict[str, tuple[str, ...]]:
        """Service -> the addresses of its dedicated listeners (config and labels), or the
        proxy's own for a fronted service with none, for DNS."""
        out: dict[str, list[str]] = {}
        keys = [(lst.service, lst.host) for lst in self.listeners if lst.service]
        keys += [(service, host) for service, _, host, _ in self._wanted]
        for service, host in keys:
            if service and host not in ("0.0.0.0", "::") and host not in out.get(service, []):
                out.setdefault(service, []).append(host)
        # A fronted service without a listener of its own is reached on the proxy's address.
        main = self.listeners[0].host
        for service in self._fronted:
            if service not in out and main not in ("0.0.0.0", "::"):
                out[service] = [main]
        return {service: tuple(hosts) for service, hosts in out.items()}

    def set_vip_listeners(self, keys: set[DynamicKey]) -> None:
        """Listeners on the virtual addresses of services served by the proxy (vips' proxy
        data path): opened like label-declared ones, and answered in DNS the same way."""
        self._vip_listeners = frozenset(keys)
        if not self.dispatcher.closing:
            wanted = self.refresh(self.registry.snapshot)
            self.spawn(self._sync_dynamic(wanted), name="proxy-listeners")

    async def _sync_dynamic(self, wanted: set[DynamicKey]) -> None:
        async with self._dynamic_lock:
            if self.dispatcher.closing:
                return
            static = {(lst.host, lst.port) for lst in self.listeners}
            for key in sorted(wanted - set(self._dynamic) - self._dynamic_failed):
                service, kind, host, port = key
                clash = (host, port) in static or any(
                    (h, p) == (host, port) for _, _, h, p in self._dynamic
                )
                where = (
                    f"virtual address of service {service}"
                    if key in self._vip_listeners
                    else f"label stablenet.proxy.listen of service {service}"
                )
                if clash:
                    logger.error(
                        "%s: %s:%d is already in use by another listener", where, host, port
                    )
                    self._dynamic_failed.add(key)
                    continue
                try:
                    self._dynamic[key] = await self._listen(
                        Listener(host, port, kind, service, where)
                    )
                except StartupError as exc:
                    logger.error("%s", exc)
                    self._dynamic_failed.add(key)
            for key in [k for k in self._dynamic if k not in wanted]:
                server = self._dynamic.pop(key)
                server.close()
                self._servers.remove(server)
                logger.info("proxy listener %s:%d for service %s closed", key[2], key[3], key[0])
                host = key[2]
                in_use = {lst.host for lst in self.listeners} | {k[2] for k in self._dynamic}
                if host in self._added and host not in in_use:
                    self._added.remove(host)
                    await vip.remove(host)
            self._dynamic_failed &= wanted

    async def sync_listeners(self) -> None:
        """Open and close label-declared listeners to match the registry now (the watch loop
        does this on every change; callers that must know it is done await this)."""
        await self._sync_dynamic(self.refresh(self.registry.snapshot))

    async def _shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close the rest."""
        dispatcher = self.dispatcher
        dispatcher.closing = True
        for server in self._servers:
            server.close()
        clients = dispatcher.clients
        began = self.loop.time()
        deadline = began + DRAIN_GRACE
        while (clients or dispatcher.tcp_clients) and self.loop.time() < deadline:
            # A request on a kept-alive connection is answered with Connection: close (client
            # .py); a connection quiet for DRAIN_IDLE since the drain began is closed, so a
            # client is not cut off just as it sends its next request.
            quiet = self.loop.time() - DRAIN_IDLE
            for conn in list(clients):
                if not conn.queue and conn.transport is not None:
                    if max(conn.idle_since, began) <= quiet:
                        conn.transport.close()
            await asyncio.sleep(0.05)  # noqa: ASYNC110 - bounded drain, no event to wait on
        for conn in list(clients):
            if conn.transport is not None:
                conn.transport.abort()
        for tcp in list(dispatcher.tcp_clients):
            if tcp.transport is not None:
                tcp.transport.abort()
        dispatcher.close_pools()
        await self.cancel_tasks()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        for host in self._added if not self.keep_addresses else ():
            await vip.remove(host)
        self._added.clear()

    async def _watch(self, since: int) -> None:
        """Follow the registry: label-declared listeners, held requests, pooled connections."""
        async for snap in self.registry.watch(since):
            self.dispatcher.wake(snap)
            wanted = self.refresh(snap)
            if wanted - self._dynamic_failed != set(self._dynamic):
                self.spawn(self._sync_dynamic(wanted), name="proxy-listeners")

    # -- timeouts -----------------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            dispatcher = self.dispatcher
            dispatcher.now = dispatcher.loop.time()
            dispatcher.expire(dispatcher.now)
