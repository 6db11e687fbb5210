"""Traffic history: rates from cumulative counters, p99 from histogram deltas, bounded rings,
forgotten services. Pure: readings and times are given, no sockets, no sleeps; the reading of
a proxy's figures on a proxy object that never listened."""

from __future__ import annotations

import json
import math

import pytest

from stablenet import config
from stablenet.histogram import Histogram
from stablenet.proxy import Proxy
from stablenet.traffic import FIELDS, History, Reading, quantile, read_figures
from tests.test_dns_core import web_registry

BOUNDS = (0.01, 0.1, 1.0)


def latency(*values: float) -> tuple[int, ...]:
    hist = Histogram(bounds=BOUNDS)
    for value in values:
        hist.observe(value)
    return tuple(hist.counts)


def test_first_reading_is_a_base_and_rates_follow_from_counter_deltas() -> None:
    history = History(span=10, bounds=BOUNDS)
    history.record(100.0, {"web": Reading(requests=40, errors=3, ready=1)})
    assert history.as_json()["services"] == {}  # no rate without an interval to measure
    history.record(101.0, {"web": Reading(requests=50, errors=4, in_flight=2, held=1, ready=2)})
    history.record(103.0, {"web": Reading(requests=56, errors=4, ready=2, desired=3)})
    body = history.as_json()
    assert body["tick"] == 3
    assert body["services"]["web"] == {
        "t": [101.0, 103.0],
        "requests": [10.0, 3.0],  # the second interval lasted two seconds
        "errors": [1.0, 0.0],
        "p99": [None, None],
        "in_flight": [2, 0],
        "held": [1, 0],
        "ready": [2, 2],
        "desired": [None, 3],
    }


def test_p99_covers_only_the_requests_of_the_interval() -> None:
    history = History(span=10, bounds=BOUNDS)
    slow = [0.5] * 10
    history.record(0.0, {"web": Reading(requests=0, latency=latency())})
    history.record(1.0, {"web": Reading(requests=10, latency=latency(*slow))})
    fast = [0.005] * 100
    history.record(2.0, {"web": Reading(requests=110, latency=latency(*slow, *fast))})
    history.record(3.0, {"web": Reading(requests=110, latency=latency(*slow, *fast))})
    p99 = history.as_json()["services"]["web"]["p99"]
    assert p99[0] == pytest.approx(0.1 + 0.9 * 0.99)  # ten slow ones: within (0.1, 1]
    assert p99[1] == pytest.approx(0.01 * 0.99)  # only the fast ones ended in this second
    assert p99[2] is None  # nothing ended


def test_quantile_interpolates_within_a_bucket_and_caps_at_the_last_bound() -> None:
    assert quantile(0.5, (2, 2, 0, 0), BOUNDS) == pytest.approx(0.01)
    assert quantile(0.99, (0, 0, 0, 5), BOUNDS) == 1.0  # above every bound
    assert quantile(0.99, (0, 100, 0, 0), BOUNDS) == pytest.approx(0.01 + 0.09 * 0.99)
    assert math.isnan(quantile(0.99, (0, 0, 0, 0), BOUNDS))


def test_since_returns_only_what_is_new() -> None:
    history = History(span=10, bounds=BOUNDS)
    for second in range(5):
        history.record(float(second), {"web": Reading(requests=second * 2)})
    first = history.as_json()
    assert first["services"]["web"]["t"] == [1.0, 2.0, 3.0, 4.0]
    history.record(5.0, {"web": Reading(requests=10)})
    later = history.as_json(since=first["tick"])
    assert later["services"]["web"]["t"] == [5.0]
    assert later["services"]["web"]["requests"] == [2.0]
    assert history.as_json(since=later["tick"])["services"] == {}


def test_the_answer_in_pieces_is_the_answer_and_stops_at_its_tick() -> None:
    history = History(span=10, bounds=BOUNDS)
    for second in range(4):
        history.record(float(second), {"a": Reading(requests=second), "b": Reading(desired=1)})
    assert json.loads("".join(history.chunks(1))) == history.as_json(1)
    pieces = history.chunks(0)
    text = next(pieces) + next(pieces) + next(pieces)  # the head and service "a"
    history.record(4.0, {"a": Reading(requests=9), "b": Reading(desired=2)})
    text += "".join(pieces)
    body = json.loads(text)
    assert body["tick"] == 4 and body["services"]["b"]["t"] == [1.0, 2.0, 3.0]
    assert body["services"]["b"]["desired"] == [1, 1, 1]
    assert history.as_json(4)["services"]["b"]["desired"] == [2]


def test_ring_keeps_the_last_span_in_order() -> None:
    history = History(span=5, bounds=BOUNDS)
    for second in range(20):
        history.record(float(second), {"web": Reading(requests=second * second)})
    web = history.as_json()["services"]["web"]
    assert web["t"] == [15.0, 16.0, 17.0, 18.0, 19.0]
    assert web["requests"] == [29.0, 31.0, 33.0, 35.0, 37.0]  # s^2 - (s-1)^2
    for since, expected in (
        (history.tick - 2, [18.0, 19.0]),
        (history.tick - 4, [16.0, 17.0, 18.0, 19.0]),
    ):
        assert history.as_json(since)["services"]["web"]["t"] == expected  # across the wrap
    series = history.series["web"]
    assert all(len(column) == 5 for column in series.columns) and len(series.ticks) == 5


def test_gone_services_are_forgotten_after_the_history_and_kept_before() -> None:
    history = History(span=3, bounds=BOUNDS)
    readings = {f"svc{i}": Reading(requests=0, ready=1) for i in range(100)}
    history.record(0.0, readings)
    history.record(1.0, readings)
    history.record(2.0, {"svc0": Reading(requests=5)})  # the other 99 are gone
    assert len(history.series) == 100
    assert history.samples("svc7") is not None  # still charted while inside the history
    for second in range(3, 6):
        history.record(float(second), {"svc0": Reading(requests=5)})
    assert set(history.series) == {"svc0"}
    assert history.samples("svc7") is None


def test_a_service_that_returns_measures_from_its_last_reading() -> None:
    history = History(span=100, bounds=BOUNDS)
    history.record(0.0, {"web": Reading(requests=0)})
    history.record(1.0, {"web": Reading(requests=4)})
    history.record(2.0, {})
    history.record(3.0, {})
    history.record(4.0, {"web": Reading(requests=16)})
    web = history.as_json()["services"]["web"]
    assert web["t"] == [1.0, 4.0]
    assert web["requests"] == [4.0, 4.0]  # 12 over the three seconds it was away


def test_a_counter_that_went_down_and_a_clock_that_stepped_back_give_no_negative_rate() -> None:
    history = History(span=10, bounds=BOUNDS)
    history.record(10.0, {"web": Reading(requests=50)})
    history.record(11.0, {"web": Reading(requests=20)})
    history.record(10.5, {"web": Reading(requests=23)})  # one interval assumed
    assert history.as_json()["services"]["web"]["requests"] == [0.0, 3.0]


def test_without_a_proxy_traffic_is_unknown_and_replicas_still_count() -> None:
    history = History(span=10, bounds=BOUNDS)
    history.record(0.0, {"web": Reading(ready=1, desired=2)})
    history.record(1.0, {"web": Reading(ready=2, desired=2)})
    web = history.as_json()["services"]["web"]
    assert web["requests"] == [None] and web["errors"] == [None]
    assert web["ready"] == [2] and web["desired"] == [2]
    assert set(web) == {"t", *FIELDS}


def test_memory_is_bounded_by_the_span_not_by_the_run() -> None:
    history = History(span=60, bounds=BOUNDS)
    for second in range(1000):
        names = {f"s{(second // 10) * 10 + i}": Reading(requests=second) for i in range(10)}
        history.record(float(second), names)
    assert len(history.series) <= 10 * (60 // 10 + 2)
    assert all(len(s.ticks) <= 60 for s in history.series.values())


async def test_figures_are_read_from_the_proxy_without_creating_its_counters() -> None:
    reg = web_registry()  # web: two ready, one draining, one unhealthy; db: one ready
    proxy = Proxy(reg, config.parse("", env={}).proxy)
    served = proxy.dispatcher  # as serving requests leaves it
    served.count("web").requests = 7
    served.responses[("web", "web-1", "5xx")] = 2
    served.responses[("web", "web-2", "5xx")] = 1
    served.responses[("web", "web-1", "2xx")] = 4
    served.latency["web"] = Histogram()
    served.latency["web"].observe(0.003)
    served.balancer.inflight.update({"c1": 3, "c3": 1})  # draining ones still serve
    served.tcp_waiting["web"] = 2
    readings = read_figures(reg, proxy, lambda: {"db": 2, "scaled-to-zero": 0})
    assert readings["web"] == Reading(
        requests=7,
        errors=3,
        latency=tuple(served.latency["web"].counts),
        in_flight=4,
        held=2,
        ready=len(reg.snapshot.ready["web"]),
        desired=None,
    )
    assert readings["db"] == Reading(requests=0, errors=0, ready=1, desired=2)
    assert readings["scaled-to-zero"] == Reading(requests=0, errors=0, ready=0, desired=0)
    assert set(served.counters) == {"web"}  # read, never created


async def test_without_per_request_metrics_errors_are_the_proxys_own_5xx() -> None:
    reg = web_registry()
    proxy = Proxy(reg, config.parse("", env={}).proxy, metrics=False)
    proxy.dispatcher.count("web").errors = 5
    assert read_figures(reg, proxy)["web"].errors == 5
    assert read_figures(reg, None)["web"] == Reading(ready=len(reg.snapshot.ready["web"]))
