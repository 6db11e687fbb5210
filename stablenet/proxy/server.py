"""The proxy runtime: listeners on the virtual address (and per-service ones), the routing table
cached per snapshot version, the balancer, per-endpoint keep-alive pools, requests held while a
service has no ready endpoint, timeouts, counters, and the hook that tells the health checker how
requests went. An async context manager the daemon stacks. Nothing here knows Docker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from stablenet.config import ProxyConfig
from stablenet.errors import StartupError
from stablenet.histogram import Histogram
from stablenet.lifecycle import Server
from stablenet.model import Endpoint
from stablenet.proxy import vip
from stablenet.proxy.balance import Balancer, retry_backoff, sticky_token, target_of
from stablenet.proxy.client import ClientConnection
from stablenet.proxy.exchange import Exchange, Phase
from stablenet.proxy.http1 import IDEMPOTENT
from stablenet.proxy.retry import RetryBudget, reuse_ok
from stablenet.proxy.routes import REMEMBER, Routes, build_routes, normalize_host
from stablenet.proxy.tcp import TcpClient
from stablenet.proxy.upstream import UpstreamConnection
from stablenet.registry import Registry, Snapshot
from stablenet.units import parse_hostport

logger = logging.getLogger(__name__)

SWEEP_INTERVAL = 0.25  # seconds between timeout sweeps
POOL_IDLE = 30.0  # seconds an idle backend connection is kept
DRAIN_GRACE = 10.0  # seconds in-flight requests get to finish on shutdown
RETRY_AFTER = b"1"
STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
HOST_CACHE = 1024  # Host header values whose service is remembered per routing table
HOST_CACHE_KEY = 260  # longest one remembered: a DNS name (253) and a port

DynamicKey = tuple[str, str, str, int]  # service, kind, host, port
StableHook = Callable[[dict[str, tuple[str, ...]]], None]
"""Called with service -> addresses of its dedicated listeners whenever that changes (DNS
answers those services with these stable addresses)."""


def no_stable(stable: dict[str, tuple[str, ...]]) -> None:
    return None


OutcomeHook = Callable[[Endpoint, bool, str], None]
"""Called with (endpoint, ok, reason) after each request or connection attempt: ok False for a
connection failure, a reset before the response, a timeout or a 5xx answer. Passive health
checking plugs in here; it must be quick and must not raise."""


def no_outcome(endpoint: Endpoint, ok: bool, reason: str) -> None:
    return None


def pool_key(ep: Endpoint) -> tuple[str, str, int]:
    """Which keep-alive pool serves an endpoint: its container, address and port (80 when the
    container names none), so a moved or renumbered endpoint never gets an old connection."""
    return (ep.id, ep.address, ep.port or 80)


@dataclass(slots=True)
class Counters:
    """Per-service counts since start. Mutable, owned by the proxy; read them, don't write."""

    requests: int = 0
    retries: int = 0
    holds: int = 0
    errors: int = 0  # 5xx answered by the proxy itself, or responses cut short
    bad_requests: int = 0  # 400/405/408/431/501/505 sent to clients
    slow_clients: int = 0  # clients closed for not reading the response (send_timeout)


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
    """Everything the proxy's connections share. Enter it to listen; leave it to drain."""

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
        self.zone = zone
        self.report = report
        self.balancer = Balancer(config.balance)
        self.header_timeout = config.header_timeout
        self.idle_timeout = config.idle_timeout
        self.connect_timeout = config.connect_timeout
        self.response_timeout = config.response_timeout
        self.hold_timeout = config.hold_timeout
        self.send_timeout = config.send_timeout
        self.retries = config.retries
        self.reuse_idle = config.reuse_idle_non_idempotent
        self.internal_errors = 0  # exceptions in our own code while serving a connection
        self.budgets: dict[str, RetryBudget] = {}
        self.max_header_size = config.max_header_size
        self.keepalive = config.upstream_keepalive
        self.sticky_cookie = config.sticky_cookie
        self.access_log = config.access_log
        host, port = parse_hostport(config.listen)
        self.listeners = [Listener(host, port, "http", None, "proxy.listen")] + [
            Listener.parse(spec) for spec in config.listeners
        ]
        self.clients: set[ClientConnection] = set()
        self.upstreams: set[UpstreamConnection] = set()
        self.tcp_clients: set[TcpClient] = set()
        self.pools: dict[tuple[str, str, int], list[UpstreamConnection]] = {}
        self.waiters: dict[str, list[Exchange]] = {}
        self.counters: dict[str, Counters] = {}
        self.metrics = metrics
        self.responses: dict[tuple[str, str, str], int] = {}  # (service, endpoint, class)
        self.latency: dict[str, Histogram] = {}
        self.hold_time: dict[str, Histogram] = {}
        self._routes = Routes(-1)
        self._by_host: dict[bytes, str | None] = {}
        self._tokens: dict[str, str] = {}
        self._servers: list[asyncio.Server] = []
        self._added: list[str] = []
        self._closing = False
        # Listeners declared by the stablenet.proxy.listen label: (service, kind, host, port).
        self._dynamic: dict[DynamicKey, asyncio.Server] = {}
        self._dynamic_seen: dict[DynamicKey, float] = {}
        self._wanted: set[DynamicKey] = set()  # what the labels declare, as of the last refresh
        self._stable: dict[str, tuple[str, ...]] | None = None
        self.on_stable = on_stable
        self._dynamic_failed: set[DynamicKey] = set()
        self._dynamic_lock = asyncio.Lock()
        self.loop = asyncio.get_event_loop()
        # The loop's clock as of the event being handled: refreshed when data arrives, when a
        # timer or a connect completes, and by the sweep, so never more than SWEEP_INTERVAL
        # old. Deadlines and latencies read it instead of asking the clock several times per
        # request.
        self.now = self.loop.time()
        self.bound: list[tuple[str, int]] = []  # actual addresses, in listener order

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            for listener in self.listeners:
                await self._listen(listener)
        except BaseException:
            await self._shutdown()
            raise
        self.spawn(self._sweep(), name="proxy-sweep")
        self.routes()
        self.spawn(self._watch(-1), name="proxy-watch")  # -1: see the current snapshot too

    async def stop(self) -> None:
        await self._shutdown()

    async def _listen(self, listener: Listener) -> asyncio.Server:
        if listener.host not in self._added and await vip.ensure_local(listener.host, listener.key):
            self._added.append(listener.host)
        service = listener.service

        def http_factory() -> asyncio.Protocol:
            return cast(asyncio.Protocol, ClientConnection(self, service))

        def tcp_factory() -> asyncio.Protocol:
            assert service is not None
            return TcpClient(self, service)

        try:
            server = await self.loop.create_server(
                http_factory if listener.kind == "http" else tcp_factory,
                listener.host,
                listener.port,
                reuse_address=True,
                backlog=1024,
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
        for ep in snap.endpoints.values():
            for entry in ep.listeners:
                kind, _, hostport = entry.partition(":")
                host, port = parse_hostport(hostport)
                key = (ep.service, kind, host, port)
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
        stable = self.stable_addresses()
        if stable != self._stable:
            self._stable = stable
            self.on_stable(stable)
        return self._wanted

    def stable_addresses(self) -> dict[str, tuple[str, ...]]:
        """Service -> the addresses of its dedicated listeners (config and labels), for DNS."""
        out: dict[str, list[str]] = {}
        keys = [(lst.service, lst.host) for lst in self.listeners if lst.service]
        keys += [(service, host) for service, _, host, _ in self._wanted]
        for service, host in keys:
            if service and host not in ("0.0.0.0", "::") and host not in out.get(service, []):
                out.setdefault(service, []).append(host)
        return {service: tuple(hosts) for service, hosts in out.items()}

    async def _sync_dynamic(self, wanted: set[DynamicKey]) -> None:
        async with self._dynamic_lock:
            if self._closing:
                return
            static = {(lst.host, lst.port) for lst in self.listeners}
            for key in sorted(wanted - set(self._dynamic) - self._dynamic_failed):
                service, kind, host, port = key
                clash = (host, port) in static or any(
                    (h, p) == (host, port) for _, _, h, p in self._dynamic
                )
                where = f"label stablenet.proxy.listen of service {service}"
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
        self._closing = True
        for server in self._servers:
            server.close()
        for conn in list(self.clients):
            if not conn.queue and conn.transport is not None:
                conn.transport.close()  # idle keep-alive connection
        deadline = self.loop.time() + DRAIN_GRACE
        while (self.clients or self.tcp_clients) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)  # noqa: ASYNC110 - bounded drain, no event to wait on
            for conn in list(self.clients):
                if not conn.queue and conn.transport is not None:
                    conn.transport.close()
        for conn in list(self.clients):
            if conn.transport is not None:
                conn.transport.abort()
        for tcp in list(self.tcp_clients):
            if tcp.transport is not None:
                tcp.transport.abort()
        for pool in self.pools.values():
            for up in pool:
                if up.transport is not None:
                    up.transport.close()
        self.pools.clear()
        await self.cancel_tasks()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        for host in self._added:
            await vip.remove(host)
        self._added.clear()

    # -- routing and dispatch -----------------------------------------------------------------

    def routes(self) -> Routes:
        snap = self.registry.snapshot
        routes = self._routes
        if routes.version != snap.version:
            routes = self._routes = build_routes(snap, self.zone, routes, self.loop.time())
            self._by_host = {}
        return routes

    def route(self, host: bytes) -> str | None:
        """The service a Host header names, remembered per routing table by its raw bytes:
        at most HOST_CACHE values of a plausible length, started afresh when full, so random
        names neither grow it nor keep real ones out."""
        routes = self.routes()
        by_host = self._by_host
        if host in by_host:
            return by_host[host]
        service = routes.service_for(normalize_host(host.decode("latin-1")))
        if len(host) <= HOST_CACHE_KEY:
            if len(by_host) >= HOST_CACHE:
                by_host.clear()
            by_host[host] = service
        return service

    def count(self, service: str | None) -> Counters:
        key = service or "-"
        counters = self.counters.get(key)
        if counters is None:
            counters = self.counters[key] = Counters()
        return counters

    def budget(self, service: str) -> RetryBudget:
        budget = self.budgets.get(service)
        if budget is None:
            budget = self.budgets[service] = RetryBudget(self.config.retry_budget)
        return budget

    def token(self, ep: Endpoint) -> str:
        token = self._tokens.get(ep.id)
        if token is None:
            token = self._tokens[ep.id] = sticky_token(ep)
        return token

    def record(self, ex: Exchange) -> None:
        """Response counts by status class and latency, per service (metrics)."""
        ep = ex.endpoint
        key = (
            ex.service,
            ep.name if ep is not None else "-",
            STATUS_CLASS.get(ex.status // 100, "none"),
        )
        self.responses[key] = self.responses.get(key, 0) + 1
        hist = self.latency.get(ex.service)
        if hist is None:
            hist = self.latency[ex.service] = Histogram()
        hist.observe(self.now - ex.started)

    def _held_for(self, ex: Exchange) -> None:
        """The request leaves the hold (routed, or answered 503): record how long it waited."""
        if ex.hold_started and self.metrics:
            hist = self.hold_time.get(ex.service)
            if hist is None:
                hist = self.hold_time[ex.service] = Histogram()
            hist.observe(self.loop.time() - ex.hold_started)
        ex.hold_started = 0.0

    def dispatch(self, ex: Exchange) -> None:
        """Send a routed exchange to a ready endpoint it may still try, or hold it."""
        if ex.phase is not Phase.ROUTING:
            return
        ready = self.registry.snapshot.ready.get(ex.service, ())
        tried = ex.sent_to | ex.refused if ex.sent_to or ex.refused else ex.sent_to
        ep: Endpoint | None = None
        if ex.sticky is not None:
            for cand in ready:
                if self.token(cand) == ex.sticky and target_of(cand) not in tried:
                    ep = cand
                    break
        if ep is None:
            ep = self.balancer.pick(ex.service, ready, tried)
        if ep is None:
            if ready and ex.refused:
                self._retry_later(ex)
            else:
                self.hold(ex)
            return
        if ex.hold_started:
            self._held_for(ex)
        ex.endpoint = ep
        self.balancer.begin(ep)
        ex.counted = True
        if not ex.fresh_only:
            up = self.pool_take(ep, ex.method in IDEMPOTENT)
            if up is not None:
                ex.conn.attach(ex, up, reused=True)
                return
        ex.fresh_only = False
        ex.move(Phase.CONNECTING)
        self.spawn(self._connect(ex, ep))

    def release(self, ex: Exchange) -> None:
        """The exchange no longer occupies its endpoint."""
        if ex.counted:
            ex.counted = False
            if ex.endpoint is not None:
                self.balancer.end(ex.endpoint)

    async def _connect(self, ex: Exchange, ep: Endpoint) -> None:
        key = pool_key(ep)
        port = key[2]
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await self.loop.create_connection(
                    lambda: cast(asyncio.Protocol, UpstreamConnection(self, key)), ep.address, port
                )
            up = cast(UpstreamConnection, protocol)
        except (OSError, TimeoutError) as exc:
            self.now = self.loop.time()
            self.release(ex)
            why = "connect timeout" if isinstance(exc, TimeoutError) else f"connect: {exc}"
            self.report(ep, False, why)  # the endpoint's own failure: always counts
            if ex.phase is not Phase.CONNECTING:
                return  # the client went away meanwhile
            logger.debug("service %s: %s:%d %s; trying another", ex.service, ep.address, port, why)
            ex.move(Phase.ROUTING)
            ex.refused.add(target_of(ep))
            self.count(ex.service).retries += 1
            self.dispatch(ex)
            return
        self.now = self.loop.time()
        current = self.registry.snapshot.endpoints.get(ep.id)
        gone = ex.phase is not Phase.CONNECTING
        if gone or current is None or current.address != ep.address or current.draining:
            if current is not None and current.address == ep.address:
                self.pool_put(up)
            elif up.transport is not None:
                up.transport.close()
            if not gone:  # the endpoint left the registry while we connected
                self.release(ex)
                ex.move(Phase.ROUTING)
                self.dispatch(ex)
            return
        ex.conn.attach(ex, up, reused=False)

    # -- holding ------------------------------------------------------------------------------

    def hold(self, ex: Exchange) -> None:
        """No endpoint to try now: wait for the registry to offer one, up to the deadline."""
        now = self.loop.time()
        if now >= ex.hold_deadline or self._closing:
            self._unavailable(ex)
            return
        self._enter_hold(ex, now)
        ex.hold_handle = self.loop.call_at(ex.hold_deadline, self._hold_expired, ex)

    def _enter_hold(self, ex: Exchange, now: float) -> None:
        if not ex.hold_started:
            ex.hold_started = now
            self.count(ex.service).holds += 1
            logger.debug("holding a request for %s: no endpoint to try", ex.service)
        ex.move(Phase.HELD)
        self.waiters.setdefault(ex.service, []).append(ex)

    def _retry_later(self, ex: Exchange) -> None:
        """Every ready endpoint refused this request's connection (typically a single replica
        that is back in the registry but not listening yet). Hold it: a new endpoint wakes it
        at once, and the refusing ones are tried again after ``retry_backoff``, all within
        the hold timeout. Endpoints the request was sent to are never tried again. The
        registry still holds those addresses for those very containers, so a retry cannot
        reach a container that took a freed address."""
        now = self.loop.time()
        if now >= ex.hold_deadline or self._closing:
            self._unavailable(ex)
            return
        delay, ex.retry_delay = retry_backoff(ex.retry_delay, now, ex.hold_deadline)
        self._enter_hold(ex, now)
        ex.hold_handle = self.loop.call_later(delay, self._retry_now, ex)

    def _retry_now(self, ex: Exchange) -> None:
        self.now = self.loop.time()
        ex.hold_handle = None
        self.unhold(ex)
        ex.refused.clear()
        self.dispatch(ex)

    def unhold(self, ex: Exchange) -> None:
        """Leave the hold (back to routing), cancelling its timer."""
        if ex.hold_handle is not None:
            ex.hold_handle.cancel()
            ex.hold_handle = None
        waiting = self.waiters.get(ex.service)
        if waiting is not None and ex in waiting:
            waiting.remove(ex)
            if not waiting:
                del self.waiters[ex.service]
        if ex.phase is Phase.HELD:
            ex.move(Phase.ROUTING)

    def _hold_expired(self, ex: Exchange) -> None:
        self.now = self.loop.time()
        ex.hold_handle = None
        self.unhold(ex)
        self._unavailable(ex)

    def _unavailable(self, ex: Exchange) -> None:
        self._held_for(ex)
        ex.conn.respond(
            ex,
            503,
            f"service {ex.service!r} has no ready endpoint; retry shortly",
            close=False,
            extra=((b"Retry-After", RETRY_AFTER),),
        )

    async def _watch(self, since: int) -> None:
        """Wake held requests when their service gets a ready endpoint; drop pooled
        connections to endpoints the registry no longer holds."""
        async for snap in self.registry.watch(since):
            self.now = self.loop.time()
            self.routes()  # keeps hosts of services that just lost every endpoint
            wanted = self.refresh(snap)
            if wanted - self._dynamic_failed != set(self._dynamic):
                self.spawn(self._sync_dynamic(wanted), name="proxy-listeners")
            for service in list(self.waiters):
                if snap.ready.get(service):
                    for ex in self.waiters.pop(service, []):
                        if ex.hold_handle is not None:
                            ex.hold_handle.cancel()
                            ex.hold_handle = None
                        if ex.phase is Phase.HELD:
                            ex.move(Phase.ROUTING)
                            self.dispatch(ex)
            for cid in [cid for cid in self._tokens if cid not in snap.endpoints]:
                del self._tokens[cid]  # sticky tokens of containers gone for good
            for key in list(self.pools):
                ep = snap.endpoints.get(key[0])
                if ep is None or pool_key(ep) != key:
                    for up in self.pools.pop(key):
                        if up.transport is not None:
                            up.transport.close()

    # -- keep-alive pools ---------------------------------------------------------------------

    def pool_take(self, ep: Endpoint, idempotent: bool = True) -> UpstreamConnection | None:
        """The most recently used idle connection to the endpoint, if it may carry the request
        (retry.reuse_ok: a request that cannot be replayed takes only a recently used one)."""
        pool = self.pools.get(pool_key(ep))
        while pool:
            up = pool[-1]
            if not reuse_ok(idempotent, self.now - up.idle_since, self.reuse_idle):
                return None  # the others idled longer still
            pool.pop()
            transport = up.transport
            if transport is not None and not transport.is_closing():
                up.set_reading(True)  # a slow client may have paused it on its last use
                return up
        return None

    def pool_put(self, up: UpstreamConnection) -> None:
        transport = up.transport
        if transport is None:
            return
        pool = self.pools.get(up.key)
        if pool is None:
            pool = self.pools[up.key] = []
        if self._closing or len(pool) >= self.keepalive or transport.is_closing():
            transport.close()
            return
        up.deadline = self.now + POOL_IDLE
        up.idle_since = self.now
        pool.append(up)

    def pool_discard(self, up: UpstreamConnection) -> None:
        pool = self.pools.get(up.key)
        if pool and up in pool:
            pool.remove(up)

    # -- timeouts -----------------------------------------------------------------------------

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.now = self.loop.time()
            self.expire(self.now)

    def expire(self, now: float) -> None:
        """Act on every deadline that passed by ``now``."""
        for conn in [c for c in self.clients if c.due(now)]:
            conn.timed_out(now)
        for up in [u for u in self.upstreams if u.deadline and u.deadline <= now]:
            up.deadline = 0.0
            up.timed_out(now)
