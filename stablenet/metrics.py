"""Prometheus metrics: one collector that reads the plain counters the parts keep (registry,
Docker source, health checker, DNS, proxy) at scrape time. Hot paths only bump integers; the
cost of building metric families is paid by the scraper, not by requests or queries."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from stablenet.controller import Controller
from stablenet.dns import DnsServer
from stablenet.dns.stats import DnsStats
from stablenet.docker.source import DockerSource, SourceStats
from stablenet.health.checker import HealthChecker
from stablenet.health.state import Refusal
from stablenet.histogram import Histogram
from stablenet.model import State
from stablenet.proxy import Proxy
from stablenet.proxy.budget import Budget, Held
from stablenet.registry import Registry


class Collector:
    """Builds every stablenet_* family from the parts given. Any part may be None (disabled)."""

    def __init__(
        self,
        registry: Registry,
        source: DockerSource | None = None,
        health: HealthChecker | None = None,
        dns: DnsServer | None = None,
        proxy: Proxy | None = None,
        controller: Controller | None = None,
        extra: Sequence[Callable[[], Iterable[Metric]]] = (),
        ready: Callable[[], float | None] | None = None,
    ) -> None:
        self._ready = ready
        self._registry = registry
        self._controller = controller
        self._extra = extra
        self._source = source
        self._health = health
        self._dns = dns
        self._proxy = proxy

    def collect(self) -> Iterable[Metric]:
        yield from self._registry_metrics()
        ready = self._ready() if self._ready is not None else None
        if ready is not None:
            yield GaugeMetricFamily(
                "stablenet_ready_seconds",
                "Seconds from this process's start to serving (synced, listeners accepting).",
                value=ready,
            )
        if self._source is not None:
            yield from self._source_metrics(self._source.stats)
        if self._health is not None:
            yield from self._health_metrics(self._health)
        if self._dns is not None:
            yield from self._dns_metrics(self._dns.stats)
        if self._proxy is not None:
            yield from self._proxy_metrics(self._proxy)
        for part in self._extra:
            yield from part()
        if self._controller is not None:
            yield from self._controller_metrics(self._controller)

    def _controller_metrics(self, controller: Controller) -> Iterable[Metric]:
        actions = CounterMetricFamily(
            "stablenet_controller_actions",
            "Controller actions by service, action and reason.",
            labels=["service", "action", "reason"],
        )
        for (service, action, reason), count in sorted(controller.actions.items()):
            actions.add_metric([service, action, reason], count)
        yield actions
        replicas = GaugeMetricFamily(
            "stablenet_service_replicas",
            "Managed services' replicas: desired (the count kept) and ready.",
            labels=["service", "kind"],
        )
        degraded = GaugeMetricFamily(
            "stablenet_service_degraded",
            "1 when the controller's breaker stopped acting on the service.",
            labels=["service"],
        )
        for name, status in sorted(controller.status.items()):
            if status.desired is not None:
                replicas.add_metric([name, "desired"], status.desired)
            replicas.add_metric([name, "ready"], status.ready)
            degraded.add_metric([name], 1 if status.degraded else 0)
        concurrency = GaugeMetricFamily(
            "stablenet_service_concurrency",
            "Autoscaled services' average requests in flight (held included), by window.",
            labels=["service", "window"],
        )
        for name, status in sorted(controller.status.items()):
            if status.autoscale is not None:
                concurrency.add_metric([name, "stable"], status.autoscale["concurrency"])
                concurrency.add_metric([name, "panic"], status.autoscale["panic_concurrency"])
                replicas.add_metric([name, "recommended"], status.autoscale["recommendation"])
        yield replicas
        yield degraded
        yield concurrency
        yield GaugeMetricFamily(
            "stablenet_controller_active",
            "1 when this stablenet holds the controller lock and acts.",
            value=1 if controller.active else 0,
        )

    def _registry_metrics(self) -> Iterable[Metric]:
        snap = self._registry.snapshot
        endpoints = GaugeMetricFamily(
            "stablenet_endpoints", "Endpoints by service and state.", labels=["service", "state"]
        )
        for name, eps in snap.services.items():
            for state in State:
                endpoints.add_metric([name, state.value], sum(e.state is state for e in eps))
        yield endpoints
        yield GaugeMetricFamily(
            "stablenet_registry_version", "Registry snapshot version.", value=snap.version
        )
        yield GaugeMetricFamily(
            "stablenet_docker_synced",
            "1 when synced with the Docker Engine.",
            value=1 if snap.synced else 0,
        )
        yield GaugeMetricFamily(
            "stablenet_containers_skipped",
            "Containers skipped for bad labels.",
            value=len(snap.problems),
        )

    def _source_metrics(self, stats: SourceStats) -> Iterable[Metric]:
        events = CounterMetricFamily(
            "stablenet_docker_events", "Docker events handled, by action.", labels=["action"]
        )
        for action, count in sorted(stats.handled_by_action.items()):
            events.add_metric([action], count)
        yield events
        yield CounterMetricFamily(
            "stablenet_docker_resyncs", "Full resyncs with the Docker Engine.", value=stats.resyncs
        )
        yield CounterMetricFamily(
            "stablenet_docker_reconnects",
            "Reconnection attempts to the Docker Engine.",
            value=stats.reconnects,
        )
        yield GaugeMetricFamily(
            "stablenet_docker_resync_duration_seconds",
            "Duration of the last full resync.",
            value=stats.last_resync_seconds,
        )
        yield GaugeMetricFamily(
            "stablenet_docker_event_lag_seconds",
            "From the last handled event's timestamp to its registry update.",
            value=stats.last_event_lag,
        )

    def _health_metrics(self, health: HealthChecker) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "stablenet_health_checks",
            "Active health checks and probes run.",
            value=health.checks,
        )
        yield CounterMetricFamily(
            "stablenet_health_transitions",
            "Health state transitions (up, down, ejected).",
            value=health.transitions,
        )
        refused = CounterMetricFamily(
            "stablenet_health_ejections_refused",
            "Passive ejections not made (once per run of failures), by reason: the last ready"
            " endpoint of its service, or health.max_ejection_percent reached.",
            labels=["reason"],
        )
        for refusal in Refusal:
            refused.add_metric([refusal.value], health.refused[refusal])
        yield refused

    def _dns_metrics(self, stats: DnsStats) -> Iterable[Metric]:
        for name, doc, label, counts in (
            ("queries", "DNS queries answered, by type.", "qtype", stats.queries_by_type()),
            ("responses", "DNS responses, by rcode.", "rcode", stats.replies_by_rcode()),
            (
                "tcp_rejected",
                "TCP connections closed at once, by reason.",
                "reason",
                dict(stats.tcp_rejected),
            ),
        ):
            family = CounterMetricFamily(f"stablenet_dns_{name}", doc, labels=[label])
            for key, count in sorted(counts.items()):
                family.add_metric([key], count)
            yield family
        for attr, doc in (
            ("cache_hits", "Answers served from prepared wire responses."),
            ("forwarded", "Questions forwarded upstream."),
            ("forward_cache_hits", "Forwarded names answered from cache."),
            ("forward_failures", "Upstream failures answered SERVFAIL."),
            ("forward_overflow", "SERVFAIL at once: max_forwards already in flight."),
            ("upstream_errors", "Upstream error answers (the next upstream was asked)."),
            ("refused", "Queries refused (client not allowed)."),
            ("malformed", "Malformed packets."),
            ("dropped", "Packets not answered at all."),
            ("truncated", "UDP answers truncated (TC)."),
            ("tcp_evicted", "Idle TCP connections closed to let a new client in."),
            ("internal_errors", "Queries lost to an internal error."),
        ):
            yield CounterMetricFamily(f"stablenet_dns_{attr}", doc, value=getattr(stats, attr))

    def _proxy_metrics(self, proxy: Proxy) -> Iterable[Metric]:
        counted = {
            attr: CounterMetricFamily(f"stablenet_proxy_{attr}", doc, labels=["service"])
            for attr, doc in (
                ("requests", "Requests received, by service."),
                ("retries", "Requests retried on another endpoint."),
                ("holds", "Requests held while the service had no ready endpoint."),
                ("errors", "Errors answered by the proxy (5xx) or responses cut short."),
                ("bad_requests", "Client requests rejected (400, 405, 408, 431, 501, 505)."),
                ("slow_clients", "Clients closed for not reading a response (send_timeout)."),
            )
        }
        for service, c in sorted(proxy.dispatcher.counters.items()):
            for attr, counter in counted.items():
                counter.add_metric([service], getattr(c, attr))
        yield from counted.values()
        yield CounterMetricFamily(
            "stablenet_proxy_internal_errors",
            "Exceptions in the proxy's own code while serving a connection (each closed it).",
            value=proxy.dispatcher.internal_errors,
        )
        if proxy.dispatcher.responses:
            by_class = CounterMetricFamily(
                "stablenet_proxy_responses",
                "Responses by service, endpoint and status class.",
                labels=["service", "endpoint", "class"],
            )
            for (service, endpoint, cls), count in sorted(proxy.dispatcher.responses.items()):
                by_class.add_metric([service, endpoint, cls], count)
            yield by_class
        yield from _histograms(
            "stablenet_proxy_request_duration_seconds",
            "Time from request headers to the end of the response, by service.",
            proxy.dispatcher.latency,
        )
        yield from _histograms(
            "stablenet_proxy_hold_duration_seconds",
            "Time requests were held waiting for a ready endpoint, by service.",
            proxy.dispatcher.hold_time,
        )
        yield from _budget_metrics(proxy.dispatcher.gate.budget)


def _budget_metrics(budget: Budget[Held]) -> Iterable[Metric]:
    """The proxy's connection budget: what it holds, its limits, what it refused or closed."""
    yield GaugeMetricFamily(
        "stablenet_proxy_connections",
        "Client connections open (HTTP and TCP listeners).",
        value=budget.open,
    )
    yield GaugeMetricFamily(
        "stablenet_proxy_connections_idle",
        "Keep-alive client connections with no request in flight.",
        value=budget.idle_count,
    )
    limits = GaugeMetricFamily(
        "stablenet_proxy_connections_limit", "Client connection limits.", labels=["limit"]
    )
    limits.add_metric(["max_connections"], budget.limits.total)
    limits.add_metric(["max_connections_per_source"], budget.limits.per_source)
    yield limits
    for name, doc, counts in (
        ("rejected", "Client connections refused, by the limit reached.", budget.refused),
        ("closed_idle", "Idle connections closed to make room, by limit.", budget.closed_idle),
    ):
        family = CounterMetricFamily(f"stablenet_proxy_connections_{name}", doc, labels=["reason"])
        for reason, count in counts.items():
            family.add_metric([reason], count)
        yield family


def _histograms(name: str, doc: str, by_service: Mapping[str, Histogram]) -> Iterable[Metric]:
    if by_service:
        family = HistogramMetricFamily(name, doc, labels=["service"])
        for service, hist in sorted(by_service.items()):
            family.add_metric([service], hist.buckets(), hist.total)
        yield family


def exposition(collector: Collector) -> bytes:
    """The Prometheus text format for one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
