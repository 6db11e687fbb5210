"""/metrics in Prometheus text format, parsed by Prometheus' own parser, with counters that
move with real DNS queries and HTTP requests; the event log; the histogram."""

from __future__ import annotations

import aiohttp
import dns.asyncquery
import dns.message
from prometheus_client.parser import text_string_to_metric_families

from stablenet.events import diff
from stablenet.histogram import Histogram
from stablenet.model import Endpoint
from tests.helpers import Containers, off_loop
from tests.test_cli import start_daemon, stop_daemon, wait_for_line


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return sum(
        v
        for (n, lbls), v in values.items()
        if n == name and all((k, val) in lbls for k, val in labels.items())
    )


async def test_metrics_parse_and_move_with_traffic(containers: Containers) -> None:
    daemon = await start_daemon(serving=True)
    dns_port, proxy_port = daemon.dns_port, daemon.proxy_port
    try:
        await off_loop(
            containers.run, "m", labels={"stablenet.service": "metered", "stablenet.port": "80"}
        )
        async with aiohttp.ClientSession() as http:

            async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
                async with http.get(daemon.admin + "/metrics") as resp:
                    assert resp.status == 200
                    assert resp.headers["Content-Type"].startswith("text/plain")
                    return samples(await resp.text())

            await wait_for_line(daemon.proc, "added to service metered", daemon.log)
            before = await scrape()
            for _ in range(3):
                query = dns.message.make_query("metered.stablenet.internal", "A")
                reply = await dns.asyncquery.udp(query, "127.0.0.1", port=dns_port, timeout=5)
                assert reply.answer
            for _ in range(4):
                async with http.get(
                    f"http://127.0.0.1:{proxy_port}/",
                    headers={"Host": "metered.stablenet.internal"},
                ) as resp:
                    assert resp.status == 200
            after = await scrape()
    finally:
        await stop_daemon(daemon)
    assert (
        total(after, "stablenet_dns_queries_total", qtype="A")
        - total(before, "stablenet_dns_queries_total", qtype="A")
        == 3
    )
    assert (
        total(after, "stablenet_proxy_requests_total", service="metered")
        - total(before, "stablenet_proxy_requests_total", service="metered")
        == 4
    )
    assert (
        total(after, "stablenet_proxy_responses_total", service="metered", **{"class": "2xx"})
        - total(before, "stablenet_proxy_responses_total", service="metered", **{"class": "2xx"})
        == 4
    )
    assert (
        total(after, "stablenet_proxy_request_duration_seconds_count", service="metered")
        - total(before, "stablenet_proxy_request_duration_seconds_count", service="metered")
        == 4
    )
    assert total(after, "stablenet_docker_synced") == 1
    assert total(after, "stablenet_docker_events_total") >= 1
    assert total(after, "stablenet_docker_resyncs_total") >= 1
    names = {name for name, _ in after}
    for name in names:
        assert name.startswith("stablenet_") or name.startswith(("python_", "process_")), name


def test_histogram_buckets_are_cumulative() -> None:
    hist = Histogram(bounds=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        hist.observe(value)
    assert hist.buckets() == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert hist.total == 3.65


def ep(cid: str, address: str, draining: bool = False) -> Endpoint:
    return Endpoint(
        id=cid,
        name=f"c-{cid}",
        service="web",
        address=address,
        port=80,
        network="bridge",
        draining=draining,
    )


def test_event_diff_names_every_change() -> None:
    old = {"a": ep("a", "10.0.0.2"), "b": ep("b", "10.0.0.3"), "c": ep("c", "10.0.0.4")}
    new = {
        "a": ep("a", "10.0.0.9"),
        "b": ep("b", "10.0.0.3", draining=True),
        "d": ep("d", "10.0.0.5"),
    }
    changes = {(e, kind): msg for _, e, kind, msg in diff(old, new)}
    assert changes[("c-a", "moved")] == "moved to 10.0.0.9:80"
    assert changes[("c-b", "state")] == "ready -> draining (container is stopping)"
    assert changes[("c-d", "added")] == "added at 10.0.0.5:80, ready"
    assert changes[("c-c", "removed")] == "removed from 10.0.0.4"
