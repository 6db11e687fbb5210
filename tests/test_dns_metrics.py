"""DNS counters as /metrics shows them: every counter exported, rcodes and types named exactly."""

from __future__ import annotations

import dataclasses

import dns.message
from prometheus_client.parser import text_string_to_metric_families

from stablenet.config import DnsConfig
from stablenet.dns import DnsServer
from stablenet.metrics import Collector, exposition
from stablenet.registry import Registry
from stablenet.units import parse_network


def scrape(server: DnsServer, registry: Registry) -> dict[tuple[str, tuple[str, ...]], float]:
    text = exposition(Collector(registry, dns=server)).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.values()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("stablenet_dns_")
    }


def test_every_dns_counter_is_exported() -> None:
    registry = Registry()
    server = DnsServer(registry, DnsConfig())
    scalar = [
        f.name
        for f in dataclasses.fields(server.stats)
        if isinstance(getattr(server.stats, f.name), int)
    ]
    for position, name in enumerate(scalar, start=1):
        setattr(server.stats, name, position)
    values = scrape(server, registry)
    for position, name in enumerate(scalar, start=1):
        assert values[(f"stablenet_dns_{name}_total", ())] == position, name
    server.stats.tcp_rejected["per_client"] = 3
    values = scrape(server, registry)
    assert values[("stablenet_dns_tcp_rejected_total", ("per_client",))] == 3


def test_badvers_and_formerr_are_labelled_exactly() -> None:
    registry = Registry()
    server = DnsServer(registry, DnsConfig())
    server.resolver.set_allow([parse_network("127.0.0.0/8")])
    snap = registry.snapshot
    future = dns.message.make_query("web.stablenet.internal", "A", use_edns=1)
    server.resolver.udp(future.to_wire(), "127.0.0.1", snap, 0.0)
    unreadable = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05ab"
    server.resolver.udp(unreadable, "127.0.0.1", snap, 0.0)
    values = scrape(server, registry)
    assert values[("stablenet_dns_responses_total", ("BADVERS",))] == 1
    assert values[("stablenet_dns_responses_total", ("FORMERR",))] == 1
    assert ("stablenet_dns_responses_total", ("NOERROR",)) not in values
    assert values[("stablenet_dns_queries_total", ("A",))] == 1
    assert values[("stablenet_dns_queries_total", ("none",))] == 1
    assert ("stablenet_dns_queries_total", ("TYPE0",)) not in values
