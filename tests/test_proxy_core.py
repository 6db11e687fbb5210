"""The proxy's pure parts: balancing policies and weights, Host routing and its memory."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from stablenet.model import Endpoint, Remove, Upsert
from stablenet.proxy.balance import Balancer, retry_backoff, target_of
from stablenet.proxy.routes import build_routes, normalize_host
from stablenet.registry import Registry


def ep(n: int, weight: int = 1, service: str = "web", **kwargs: object) -> Endpoint:
    return Endpoint(
        id=f"{n:064x}",
        name=f"{service}-{n}",
        service=service,
        address=f"10.0.0.{n}",
        port=80,
        network="n",
        weight=weight,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("policy", ["p2c", "round_robin", "least_requests"])
def test_every_policy_spreads_equal_weights(policy: str) -> None:
    balancer = Balancer(policy, random.Random(1))
    ready = (ep(1), ep(2), ep(3))
    picks = Counter(balancer.pick("web", ready).name for _ in range(3000))  # type: ignore[union-attr]
    assert set(picks) == {"web-1", "web-2", "web-3"}
    assert min(picks.values()) > 800


def test_round_robin_follows_weights_smoothly() -> None:
    balancer = Balancer("round_robin")
    ready = (ep(1, weight=3), ep(2, weight=1))
    names = [balancer.pick("web", ready).name for _ in range(8)]  # type: ignore[union-attr]
    assert names.count("web-1") == 6
    assert names[:4] != ["web-1", "web-1", "web-1", "web-2"] or names[1] == "web-2"


@pytest.mark.parametrize("policy", ["p2c", "least_requests"])
def test_load_aware_policies_avoid_the_busy_endpoint(policy: str) -> None:
    balancer = Balancer(policy, random.Random(2))
    busy, idle = ep(1), ep(2)
    for _ in range(10):
        balancer.begin(busy)
    picks = Counter(balancer.pick("web", (busy, idle)).name for _ in range(100))  # type: ignore[union-attr]
    assert picks["web-2"] == 100
    for _ in range(10):
        balancer.end(busy)
    assert balancer.inflight == {}


def test_p2c_weights_shift_the_share() -> None:
    balancer = Balancer("p2c", random.Random(3))
    ready = (ep(1, weight=1), ep(2, weight=4), ep(3, weight=1))
    picks = Counter(balancer.pick("web", ready).name for _ in range(3000))  # type: ignore[union-attr]
    assert picks["web-2"] > picks["web-1"] + picks["web-3"]


def test_tried_targets_are_skipped_and_exhaustion_is_none() -> None:
    balancer = Balancer("round_robin")
    ready = (ep(1), ep(2))
    tried = {target_of(ready[0])}
    assert all(balancer.pick("web", ready, tried) is ready[1] for _ in range(5))
    assert balancer.pick("web", ready, tried | {target_of(ready[1])}) is None
    assert balancer.pick("web", ()) is None


def test_a_restarted_container_is_a_new_target() -> None:
    before = ep(1, started_at=100.0)
    after = ep(1, started_at=200.0)
    assert target_of(before) != target_of(after)
    assert Balancer().pick("web", (after,), {target_of(before)}) is after


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        ("Web.Stablenet.Internal", "web.stablenet.internal"),
        ("web.stablenet.internal.:8080", "web.stablenet.internal"),
        ("[::1]:80", "::1"),
        ("10.0.0.1:80", "10.0.0.1"),
    ],
)
def test_normalize_host(raw: str, host: str) -> None:
    assert normalize_host(raw) == host


def test_routes_zone_names_and_labels_and_memory() -> None:
    registry = Registry()
    registry.apply([Upsert(ep(1, http_hosts=("Shop.Example.com",))), Upsert(ep(2, service="api"))])
    routes = build_routes(registry.snapshot, "stablenet.internal", None, now=0.0)
    assert routes.service_for("web.stablenet.internal") == "web"
    assert routes.service_for("shop.example.com") == "web"
    assert routes.service_for("api.stablenet.internal") == "api"
    assert routes.service_for("other.stablenet.internal") is None
    registry.apply([Remove(f"{1:064x}")])
    later = build_routes(registry.snapshot, "stablenet.internal", routes, now=10.0)
    assert later.service_for("web.stablenet.internal") == "web"  # held, not 404
    forgotten = build_routes(registry.snapshot, "stablenet.internal", later, now=10.0 + 601)
    forgotten = build_routes(registry.snapshot, "stablenet.internal", forgotten, now=10.0 + 1200)
    assert forgotten.service_for("web.stablenet.internal") is None


def test_zone_name_wins_over_another_services_label() -> None:
    registry = Registry()
    registry.apply(
        [Upsert(ep(1, service="web")), Upsert(ep(2, service="api", http_hosts=("web.z",)))]
    )
    routes = build_routes(registry.snapshot, "z", None, now=0.0)
    assert routes.service_for("web.z") == "web"


def test_p2c_with_only_weight_zero_endpoints_still_picks() -> None:
    balancer = Balancer("p2c", random.Random(3))
    ready = [ep(i, weight=0) for i in range(1, 4)]
    picked = {balancer.pick("web", ready, set()).id for _ in range(60)}  # type: ignore[union-attr]
    assert picked <= {e.id for e in ready} and len(picked) > 1


def test_retry_backoff_doubles_to_a_cap_and_never_passes_the_deadline() -> None:
    waits, previous = [], 0.0
    for _ in range(8):
        wait, previous = retry_backoff(previous, now=0.0, deadline=100.0)
        waits.append(wait)
    assert waits == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert retry_backoff(0.8, now=9.7, deadline=10.0)[0] == pytest.approx(0.3)
    assert retry_backoff(0.8, now=10.5, deadline=10.0)[0] == 0.0
