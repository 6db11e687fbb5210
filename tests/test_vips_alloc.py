"""Virtual address allocation, labels and the range check: pure, no I/O."""

from __future__ import annotations

import ipaddress

import pytest

from stablenet.model import Endpoint
from stablenet.vips import alloc, store
from stablenet.vips.labels import Mode, PortMap, endpoint_ports, label_problem, mode_of, parse_ports

NET = ipaddress.IPv4Network("198.18.0.0/24")


def test_preferred_address_is_a_function_of_the_name() -> None:
    assert alloc.preferred("web", NET) == alloc.preferred("web", NET)
    assert alloc.preferred("web", NET) != alloc.preferred("api", NET)
    assert ipaddress.IPv4Address(alloc.preferred("web", NET)) in NET


def test_assignment_does_not_depend_on_order_seen() -> None:
    names = [f"svc{i}" for i in range(200)]
    one = alloc.assign(names, NET, {})
    two = alloc.assign(reversed(names), NET, {})
    assert one == two
    assert len(set(one.values())) == 200  # probing past collisions: 200 names in 254 addresses


def test_kept_addresses_never_move_and_collisions_probe_forward() -> None:
    first = alloc.assign(["web"], NET, {})
    squatter = {"other": alloc.preferred("api", NET), **first}
    later = alloc.assign(["web", "api"], NET, squatter)
    assert later["web"] == first["web"]
    assert later["api"] != squatter["other"]
    start = int(ipaddress.IPv4Address(alloc.preferred("api", NET)))
    assert int(ipaddress.IPv4Address(later["api"])) in (start + 1, int(NET.network_address) + 1)


def test_network_and_broadcast_addresses_are_never_given() -> None:
    small = ipaddress.IPv4Network("198.18.0.0/30")
    got = alloc.assign(["a", "b"], small, {})
    assert set(got.values()) == {"198.18.0.1", "198.18.0.2"}
    with pytest.raises(alloc.RangeFull):
        alloc.assign(["a", "b", "c"], small, {})


def test_addresses_outside_a_changed_range_are_allocated_afresh() -> None:
    got = alloc.assign(["web"], NET, {"web": "10.0.0.1"})
    assert ipaddress.IPv4Address(got["web"]) in NET


def test_store_round_trip_is_atomic(tmp_path: object) -> None:
    path = str(tmp_path)
    assert store.load(path) == {}
    store.save(path, {"web": "198.18.0.7"})
    assert store.load(path) == {"web": "198.18.0.7"}
    import os

    assert [n for n in os.listdir(path) if n.startswith(".vips.")] == []


def test_range_problem_names_key_value_and_what_it_overlaps() -> None:
    net = ipaddress.IPv4Network("172.17.0.0/24")
    problem = alloc.range_problem(net, [("bridge", "172.17.0.0/16")], [])
    assert problem is not None
    assert "vips.range" in problem and "172.17.0.0/24" in problem and "bridge" in problem
    problem = alloc.range_problem(NET, [], [("198.18.0.0/15", "veth0")])
    assert problem is not None and "route" in problem and "veth0" in problem
    assert alloc.range_problem(NET, [("bridge", "172.17.0.0/16")], [("fd00::/64", "x")]) is None


def _ep(**kw: object) -> Endpoint:
    base: dict[str, object] = dict(
        id="c1", name="web-1", service="web", address="172.17.0.2", port=8080, network="bridge"
    )
    base.update(kw)
    return Endpoint(**base)  # type: ignore[arg-type]


def test_ports_from_exposed_ports_port_label_and_mapping() -> None:
    ep = _ep(exposed=("53/udp", "8080/tcp"), labels={"stablenet.vip.ports": "80:8080"})
    assert endpoint_ports(ep) == (PortMap("tcp", 80, 8080), PortMap("udp", 53, 53))
    ep = _ep(exposed=("9000/tcp",), port=None)
    assert endpoint_ports(ep) == (PortMap("tcp", 9000, 9000),)
    ep = _ep(labels={"stablenet.vip.ports": "5300:53/udp"}, port=None)
    assert endpoint_ports(ep) == (PortMap("udp", 5300, 53),)


def test_label_values() -> None:
    assert parse_ports("80:8080, 53/udp") == (PortMap("tcp", 80, 8080), PortMap("udp", 53, 53))
    for bad in ("80:x", "0:80", "80:8080/sctp", ","):
        with pytest.raises(ValueError):
            parse_ports(bad)
    assert label_problem({"stablenet.vip.mode": "ipvs"}) == (
        "stablenet.vip.mode",
        "expected kernel, proxy or proxy-tcp",
    )
    assert label_problem({"stablenet.vip.mode": "proxy", "stablenet.vip.ports": "80"}) is None
    assert mode_of(_ep(labels={"stablenet.vip.mode": "proxy-tcp"})) is Mode.PROXY_TCP
    assert mode_of(_ep()) is Mode.KERNEL
