"""Where each request goes, and what the proxy's connections share: the Host routing cache, the
balancer, the retry budgets, per-endpoint keep-alive pools, requests held while a service has no
endpoint to try, counters and metrics, and the hook that tells the health checker how requests
went. The connections (client.py, upstream.py, tcp.py) see only this object, never the listeners
or the lifecycle (server.py). Nothing here knows Docker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from stablenet.config import ProxyConfig
from stablenet.histogram import Histogram
from stablenet.model import Endpoint
from stablenet.proxy.balance import Balancer, Target, retry_backoff, sticky_token, target_of
from stablenet.proxy.budget import Gate
from stablenet.proxy.exchange import (
    CONNECTING,
    HELD,
    ROUTING,
    Exchange,
)
from stablenet.proxy.http1 import IDEMPOTENT
from stablenet.proxy.retry import RetryBudget, reuse_ok
from stablenet.proxy.routes import Routes, build_routes, normalize_host
from stablenet.proxy.upstream import UpstreamConnection
from stablenet.registry import Registry, Snapshot

if TYPE_CHECKING:
    from stablenet.proxy.client import ClientConnection
    from stablenet.proxy.tcp import TcpClient

logger = logging.getLogger(__name__)

POOL_IDLE = 30.0  # seconds an idle backend connection is kept
RETRY_AFTER = b"1"
STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
HOST_CACHE = 1024  # Host header values whose service is remembered per routing table
HOST_CACHE_KEY = 260  # longest one remembered: a DNS name (253) and a port


class Spawn(Protocol):
    """Runs a coroutine as a task its owner keeps track of (lifecycle.Server.spawn)."""

    def __call__(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> None: ...


OutcomeHook = Callable[[Endpoint, bool, str], None]
"""Called with (endpoint, ok, reason) after each request or connection attempt: ok False for a
connection failure, a reset before the response, a timeout or a 5xx answer. Passive health
checking plugs in here; it must be quick and must not raise."""


def no_outcome(endpoint: Endpoint, ok: bool, reason: str) -> None:
    return None


def no_hold(service: str) -> None:
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


class Dispatcher:
    """Everything the proxy's connections share, and the decisions that need no socket of
    their own: which service a Host names, which endpoint serves an exchange, holding,
    retrying elsewhere, pooling."""

    def __init__(
        self,
        registry: Registry,
        config: ProxyConfig,
        spawn: Spawn,
        zone: str = "stablenet.internal",
        report: OutcomeHook = no_outcome,
        metrics: bool = True,
    ) -> None:
        self.registry = registry
        self.config = config
        self.spawn = spawn
        self.zone = zone
        self.report = report
        self.metrics = metrics
        self.balancer = Balancer(config.balance)
        self.header_timeout = config.header_timeout
        self.idle_timeout = config.idle_timeout
        self.connect_timeout = config.connect_timeout
        self.response_timeout = config.response_timeout
        self.hold_timeout = config.hold_timeout
        self.send_timeout = config.send_timeout
        self.retries = config.retries
        self.reuse_idle = config.reuse_idle_non_idempotent
        self.max_header_size = config.max_header_size
        self.keepalive = config.upstream_keepalive
        self.sticky_cookie = config.sticky_cookie
        self.access_log = config.access_log
        self.internal_errors = 0  # exceptions in our own code while serving a connection
        self.budgets: dict[str, RetryBudget] = {}
        self.clients: set[ClientConnection] = set()
        self.upstreams: set[UpstreamConnection] = set()
        self.tcp_clients: set[TcpClient] = set()
        # Client connections held, in all and per source; closes idle ones or refuses past it.
        self.gate = Gate.for_config(config.max_connections, config.max_connections_per_source)
        self.pools: dict[tuple[str, str, int], list[UpstreamConnection]] = {}
        self.waiters: dict[str, list[Exchange]] = {}
        self.tcp_waiting: dict[str, int] = {}  # TCP connections held, per service
        # Told when a request starts waiting for a service with no ready endpoint (the
        # controller starts a replica of a service scaled to zero); must be quick.
        self.on_hold: Callable[[str], None] = no_hold
        self.counters: dict[str, Counters] = {}
        self.responses: dict[tuple[str, str, str], int] = {}  # (service, endpoint, class)
        self.latency: dict[str, Histogram] = {}
        self.hold_time: dict[str, Histogram] = {}
        self._routes = Routes(-1)
        self._by_host: dict[bytes, str | None] = {}
        self._tokens: dict[str, str] = {}
        self.closing = False  # shutting down: hold nothing, pool nothing
        self.loop = asyncio.get_event_loop()
        # The loop's clock as of the event being handled: refreshed when data arrives, when a
        # timer or a connect completes, and by the sweep, so never more than a sweep interval
        # old. Deadlines and latencies read it instead of asking the clock several times per
        # request.
        self.now = self.loop.time()

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
            budget.tick(self.now, self.count(service).requests)
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
        if ex.phase != ROUTING:
            return
        ready = self.registry.snapshot.ready.get(ex.service, ())
        sent_to, refused = ex.sent_to, ex.refused
        tried: set[Target] | tuple[()] = ()
        if sent_to is not None:
            tried = sent_to if refused is None else sent_to | refused
        elif refused is not None:
            tried = refused
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
            up = self.pool_take(ep, ex.method)
            if up is not None:
                ex.conn.attach(ex, up, reused=True)
                return
        ex.fresh_only = False
        ex.move(CONNECTING)
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
            if ex.phase != CONNECTING:
                return  # the client went away meanwhile
            logger.debug("service %s: %s:%d %s; trying another", ex.service, ep.address, port, why)
            ex.move(ROUTING)
            if ex.refused is None:
                ex.refused = set()
            ex.refused.add(target_of(ep))
            self.count(ex.service).retries += 1
            self.dispatch(ex)
            return
        self.now = self.loop.time()
        current = self.registry.snapshot.endpoints.get(ep.id)
        gone = ex.phase != CONNECTING
        if gone or current is None or current.address != ep.address or current.draining:
            if current is not None and current.address == ep.address:
                self.pool_put(up)
            elif up.transport is not None:
                up.transport.close()
            if not gone:  # the endpoint left the registry while we connected
                self.release(ex)
                ex.move(ROUTING)
                self.dispatch(ex)
            return
        ex.conn.attach(ex, up, reused=False)

    # -- holding ------------------------------------------------------------------------------

    def hold(self, ex: Exchange) -> None:
        """No endpoint to try now: wait for the registry to offer one, up to the deadline."""
        now = self.loop.time()
        if now >= ex.hold_deadline or self.closing:
            self._unavailable(ex)
            return
        self._enter_hold(ex, now)
        ex.hold_handle = self.loop.call_at(ex.hold_deadline, self._hold_expired, ex)

    def _enter_hold(self, ex: Exchange, now: float) -> None:
        if not ex.hold_started:
            ex.hold_started = now
            self.count(ex.service).holds += 1
            self.on_hold(ex.service)
            logger.debug("holding a request for %s: no endpoint to try", ex.service)
        ex.move(HELD)
        self.waiters.setdefault(ex.service, []).append(ex)

    def _retry_later(self, ex: Exchange) -> None:
        """Every ready endpoint refused this request's connection (typically a single replica
        that is back in the registry but not listening yet). Hold it: a new endpoint wakes it
        at once, and the refusing ones are tried again after ``retry_backoff``, all within
        the hold timeout. Endpoints the request was sent to are never tried again. The
        registry still holds those addresses for those very containers, so a retry cannot
        reach a container that took a freed address."""
        now = self.loop.time()
        if now >= ex.hold_deadline or self.closing:
            self._unavailable(ex)
            return
        delay, ex.retry_delay = retry_backoff(ex.retry_delay, now, ex.hold_deadline)
        self._enter_hold(ex, now)
        ex.hold_handle = self.loop.call_later(delay, self._retry_now, ex)

    def _retry_now(self, ex: Exchange) -> None:
        self.now = self.loop.time()
        ex.hold_handle = None
        self.unhold(ex)
        ex.refused = None
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
        if ex.phase == HELD:
            ex.move(ROUTING)

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

    def wake(self, snap: Snapshot) -> None:
        """A new registry snapshot: wake held requests whose service has a ready endpoint,
        forget sticky tokens and pooled connections of endpoints gone."""
        self.now = self.loop.time()
        self.routes()  # keeps hosts of services that just lost every endpoint
        for service in list(self.waiters):
            if snap.ready.get(service):
                for ex in self.waiters.pop(service, []):
                    if ex.hold_handle is not None:
                        ex.hold_handle.cancel()
                        ex.hold_handle = None
                    if ex.phase == HELD:
                        ex.move(ROUTING)
                        self.dispatch(ex)
        for cid in [cid for cid in self._tokens if cid not in snap.endpoints]:
            del self._tokens[cid]  # sticky tokens of containers gone for good
        for key in list(self.pools):
            ep = snap.endpoints.get(key[0])
            if ep is None or pool_key(ep) != key:
                for up in self.pools.pop(key):
                    if up.transport is not None:
                        up.transport.close()

    def close_pools(self) -> None:
        for pool in self.pools.values():
            for up in pool:
                if up.transport is not None:
                    up.transport.close()
        self.pools.clear()

    # -- keep-alive pools ---------------------------------------------------------------------

    def pool_take(self, ep: Endpoint, method: str = "GET") -> UpstreamConnection | None:
        """The most recently used idle connection to the endpoint, if it may carry the request
        (retry.reuse_ok: a request that cannot be replayed takes only a recently used one)."""
        pool = self.pools.get(pool_key(ep))
        while pool:
            up = pool[-1]
            idle = self.now - up.idle_since
            if idle >= self.reuse_idle and not reuse_ok(
                method in IDEMPOTENT, idle, self.reuse_idle
            ):
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
        if self.closing or len(pool) >= self.keepalive or transport.is_closing():
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

    def expire(self, now: float) -> None:
        """Act on every deadline that passed by ``now``; bring the retry budgets up to date."""
        counters = self.counters
        for service, budget in self.budgets.items():
            budget.tick(now, counters[service].requests)
        for conn in [c for c in self.clients if c.due(now)]:
            conn.timed_out(now)
        for up in [u for u in self.upstreams if u.deadline and u.deadline <= now]:
            up.deadline = 0.0
            up.timed_out(now)
