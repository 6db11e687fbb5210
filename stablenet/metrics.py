"""Prometheus metrics: one collector that reads the plain counters the parts keep (registry,
Docker source, health checker, DNS, proxy) at scrape time. Hot paths only bump integers; the
cost of building metric families is paid by the scraper, not by requests or queries."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from stablenet.histogram import Histogram
from stablenet.model import State
from stablenet.registry import Registry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Collector:
    """Builds every stablenet_* family from the parts given. Any part may be None (disabled)."""

    def __init__(
        self,
        registry: Registry,
        source: Any = None,
        health: Any = None,
        dns: Any = None,
        proxy: Any = None,
    ) -> None:
        self._registry = registry
        self._source = source
        self._health = health
        self._dns = dns
        self._proxy = proxy

    def collect(self) -> Iterable[Metric]:
        yield from self._registry_metrics()
        if self._source is not None:
            yield from self._source_metrics(self._source.stats)
        if self._health is not None:
            yield from self._health_metrics()
        if self._dns is not None:
            yield from self._dns_metrics(self._dns.stats)
        if self._proxy is not None:
            yield from self._proxy_metrics(self._proxy)

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

    def _source_metrics(self, stats: Any) -> Iterable[Metric]:
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

    def _health_metrics(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "stablenet_health_checks",
            "Active health checks and probes run.",
            value=self._health.checks,
        )
        yield CounterMetricFamily(
            "stablenet_health_transitions",
            "Health state transitions (up, down, ejected).",
            value=self._health.transitions,
        )

    def _dns_metrics(self, stats: Any) -> Iterable[Metric]:
        queries = CounterMetricFamily(
            "stablenet_dns_queries", "DNS queries answered, by type.", labels=["qtype"]
        )
        for qtype, count in sorted(stats.queries_by_type().items()):
            queries.add_metric([qtype], count)
        yield queries
        rcodes = CounterMetricFamily(
            "stablenet_dns_responses", "DNS responses, by rcode.", labels=["rcode"]
        )
        for rcode, count in sorted(stats.replies_by_rcode().items()):
            rcodes.add_metric([rcode], count)
        yield rcodes
        for name, attr, doc in (
            ("cache_hits", "cache_hits", "Answers served from prepared wire responses."),
            ("forwarded", "forwarded", "Questions forwarded upstream."),
            ("forward_cache_hits", "forward_cache_hits", "Forwarded names answered from cache."),
            ("forward_failures", "forward_failures", "Upstream failures answered SERVFAIL."),
            ("refused", "refused", "Queries refused (client not allowed)."),
            ("malformed", "malformed", "Malformed packets."),
            ("truncated", "truncated", "UDP answers truncated (TC)."),
        ):
            yield CounterMetricFamily(f"stablenet_dns_{name}", doc, value=getattr(stats, attr))

    def _proxy_metrics(self, proxy: Any) -> Iterable[Metric]:
        counters: Mapping[str, Any] = proxy.counters
        counted = {
            attr: CounterMetricFamily(f"stablenet_proxy_{attr}", doc, labels=["service"])
            for attr, doc in (
                ("requests", "Requests received, by service."),
                ("retries", "Requests retried on another endpoint."),
                ("holds", "Requests held while the service had no ready endpoint."),
                ("errors", "Errors answered by the proxy (5xx) or responses cut short."),
                ("bad_requests", "Client requests rejected (400, 408, 431)."),
            )
        }
        for service, c in sorted(counters.items()):
            for attr, counter in counted.items():
                counter.add_metric([service], getattr(c, attr, 0))
        yield from counted.values()
        responses: Mapping[tuple[str, str, str], int] = getattr(proxy, "responses", {})
        if responses:
            by_class = CounterMetricFamily(
                "stablenet_proxy_responses",
                "Responses by service, endpoint and status class.",
                labels=["service", "endpoint", "class"],
            )
            for (service, endpoint, cls), count in sorted(responses.items()):
                by_class.add_metric([service, endpoint, cls], count)
            yield by_class
        latency: Mapping[str, Histogram] = getattr(proxy, "latency", {})
        if latency:
            durations = HistogramMetricFamily(
                "stablenet_proxy_request_duration_seconds",
                "Time from request headers to the end of the response, by service.",
                labels=["service"],
            )
            for service, hist in sorted(latency.items()):
                durations.add_metric([service], hist.buckets(), hist.total)
            yield durations
        hold: Mapping[str, Histogram] = getattr(proxy, "hold_time", {})
        if hold:
            holds = HistogramMetricFamily(
                "stablenet_proxy_hold_duration_seconds",
                "Time requests were held waiting for a ready endpoint, by service.",
                labels=["service"],
            )
            for service, hist in sorted(hold.items()):
                holds.add_metric([service], hist.buckets(), hist.total)
            yield holds


def exposition(collector: Collector) -> bytes:
    """The Prometheus text format for one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)
