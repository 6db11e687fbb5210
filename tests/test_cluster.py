"""The cluster layer's pure parts: key layout and records, the publish plan, the merged view and
its failure rules, the registry's remote layer and preference, and DNS answers for endpoints of
other hosts. No etcd, no sockets (tests/test_cluster_etcd.py runs against real etcd)."""

from __future__ import annotations

import json
from dataclasses import replace

from dnslib import DNSLabel

from stablenet.cluster.etcd import Delete, Event, KeyValue, Op, Put, prefix_end
from stablenet.cluster.layout import CONTAINER, Layout, parse_endpoint, parse_key
from stablenet.cluster.node import plan
from stablenet.cluster.view import Link, RemoteView
from stablenet.dns import wire
from stablenet.dns.zone import ZoneIndex, ZoneSettings
from stablenet.model import (
    Drain,
    Endpoint,
    Origin,
    Resync,
    SetRemote,
    SetVerdict,
    State,
    Upsert,
    Verdict,
)
from stablenet.registry import SPREAD, Registry

A = Layout(prefix="/sn", host="a", host_address="10.0.0.1", ttl=10)
B = Layout(prefix="/sn", host="b", host_address="10.0.0.2", ttl=6)


def local(cid: str, service: str = "web", host_port: int | None = 32768) -> Endpoint:
    return Endpoint(
        cid * 8, f"{service}-{cid}", service, f"172.18.0.{len(cid) + 1}", 8080, "net",
        host_port=host_port, started_at=5.0,
    )  # fmt: skip


def remote_of(layout: Layout, *eps: Endpoint) -> list[KeyValue]:
    rows = [KeyValue(layout.info_key(), layout.info_value(), 1)]
    for key, value in layout.desired({ep.id: ep for ep in eps}).items():
        if key.startswith(layout.hosts):
            rows.append(KeyValue(key, value, 2))
    return rows


def test_keys_and_records_round_trip() -> None:
    ep = local("1")
    desired = A.desired({ep.id: ep})
    key = A.endpoint_key(ep.id)
    assert key == f"/sn/hosts/a/endpoints/{ep.id}"
    assert parse_key(A.hosts, key) == ("a", "endpoints", ep.id)
    assert parse_key(A.hosts, "/sn/hosts/a/info") == ("a", "info", "")
    assert parse_key(A.hosts, "/sn/hosts/a/other/x") is None
    back = parse_endpoint("a", desired[key])
    assert back is not None and back.origin is not None
    # Other hosts reach it on this host's address and the published port.
    assert (back.address, back.port, back.origin.target_port) == ("10.0.0.1", 32768, 8080)
    assert (back.service, back.name, back.host, back.state) == ("web", "web-1", "a", State.READY)
    assert parse_endpoint("a", b"{not json") is None
    assert parse_endpoint("a", b'{"id": "x"}') is None


def test_skydns_records_for_ready_endpoints_only() -> None:
    ready, draining = local("1"), replace(local("2"), draining=True)
    desired = A.desired({ready.id: ready, draining.id: draining})
    sky = {k: json.loads(v) for k, v in desired.items() if k.startswith("/skydns/")}
    assert sky == {
        f"/skydns/internal/stablenet/web/a-{ready.id[:12]}": {
            "host": "10.0.0.1", "port": 32768, "ttl": 5,
        }
    }  # fmt: skip
    off = Layout(prefix="/sn", host="a", host_address="10.0.0.1", ttl=10, skydns_prefix=None)
    assert not any(k.startswith("/skydns") for k in off.desired({ready.id: ready}))


def test_unpublished_and_remote_endpoints_are_not_published() -> None:
    unpublished = local("1", host_port=None)
    foreign = replace(local("2"), origin=Origin("b", State.READY, "running"))
    desired = A.desired({e.id: e for e in (unpublished, foreign)})
    assert list(desired) == [A.info_key()]
    routed = Layout(prefix="/sn", host="a", host_address="10.0.0.1", ttl=10, advertise=CONTAINER)
    record = parse_endpoint("a", routed.desired({unpublished.id: unpublished})[
        routed.endpoint_key(unpublished.id)
    ])  # fmt: skip
    assert record is not None and (record.address, record.port) == (unpublished.address, 8080)


def test_plan_writes_only_the_difference() -> None:
    published = {"k1": b"1", "k2": b"2", "gone": b"x"}
    desired = {"k1": b"1", "k2": b"changed", "new": b"n"}
    ops = plan(published, desired, 7)
    assert ops == [Put("k2", b"changed", 7), Put("new", b"n", 7), *_deletes("gone")]
    assert plan(desired, desired, 7) == []
    # After a new lease every key counts as unwritten: all are put again with it.
    assert len(plan(dict.fromkeys(desired, b""), desired, 8)) == 3


def _deletes(*keys: str) -> list[Op]:
    return [Delete(k) for k in keys]


def test_prefix_end() -> None:
    assert prefix_end("/sn/hosts/") == b"/sn/hosts0"
    assert prefix_end("ab") == b"ac"


def test_view_merges_full_read_and_events_and_skips_its_own_host() -> None:
    view = RemoteView(A.hosts, "a", 10)
    mine = remote_of(A, local("1"))
    theirs = remote_of(B, local("2"), local("3"))
    view.reset(5, mine + theirs)
    assert [ep.name for ep in view.endpoints()] == ["web-2", "web-3"]
    assert view.hosts == {"b": view.hosts["b"]} and view.ttl("b") == 6
    gone = B.endpoint_key(local("2").id)
    view.apply(6, [Event("delete", gone, b"", 6), Event("put", "/sn/hosts/b/endpoints/x", b"?", 6)])
    assert [ep.name for ep in view.endpoints()] == ["web-3"]
    assert view.revision == 6 and view.malformed == 1


def test_failure_rules_cut_off_drops_as_leases_expire_down_keeps_all() -> None:
    view = RemoteView(A.hosts, "a", 10)
    c = Layout(prefix="/sn", host="c", host_address="10.0.0.3", ttl=20)
    view.reset(5, remote_of(B, local("2")) + remote_of(c, local("3")))
    assert view.expired(Link(True, 100.0), 1000.0) == (frozenset(), None)
    cut = Link(False, 100.0, refused=False)
    assert view.expired(cut, 105.0) == (frozenset(), 106.0)  # b's ttl is 6
    assert view.expired(cut, 106.0) == (frozenset({"b"}), 120.0)
    assert view.expired(cut, 121.0) == (frozenset({"b", "c"}), None)
    assert view.expired(Link(False, 100.0, refused=True), 10_000.0) == (frozenset(), None)
    assert [e.host for e in view.endpoints(frozenset({"b"}))] == ["c"]


def remote(cid: str, host: str, state: State = State.READY, port: int = 32768) -> Endpoint:
    return Endpoint(
        cid * 8, f"web-{cid}", "web", "10.0.0.9", port, "net", started_at=5.0,
        origin=Origin(host, state, "running", target_port=8080),
    )  # fmt: skip


def test_docker_resync_never_wipes_remote_endpoints() -> None:
    registry = Registry()
    registry.apply([Upsert(local("1")), SetRemote((remote("r", "b"),))])
    snap = registry.apply([Resync(())])
    assert [ep.name for ep in snap.endpoints.values()] == ["web-r"]
    snap = registry.apply([Resync((local("1"),)), SetRemote(())])
    assert [ep.name for ep in snap.endpoints.values()] == ["web-1"]


def test_local_first_and_spread() -> None:
    first, spread = Registry(), Registry(SPREAD)
    for reg in (first, spread):
        reg.apply([Upsert(local("1")), SetRemote((remote("r", "b"),))])
    assert [e.name for e in first.snapshot.ready["web"]] == ["web-1"]
    assert [e.name for e in spread.snapshot.ready["web"]] == ["web-1", "web-r"]
    # No local endpoint ready: the remote one takes the traffic.
    snap = first.apply([Drain(local("1").id)])
    assert [e.name for e in snap.ready["web"]] == ["web-r"]


def test_remote_state_comes_from_its_host_and_local_ejection_sticks() -> None:
    registry = Registry()
    snap = registry.apply([SetRemote((remote("r", "b", State.UNHEALTHY),))])
    ep = snap.endpoints[remote("r", "b").id]
    assert ep.state is State.UNHEALTHY and ep.reason == "on b: running"
    assert ep.host == "b" and snap.by_address == {}
    snap = registry.apply(
        [
            SetRemote((remote("r", "b"),)),
            SetVerdict(ep.id, ep.address, Verdict(False, "ejected: 5 failed requests", 1.0)),
        ]
    )
    assert snap.endpoints[ep.id].state is State.UNHEALTHY
    # The host republishes the same incarnation: this host's ejection is kept.
    snap = registry.apply([SetRemote((remote("r", "b"),))])
    assert snap.endpoints[ep.id].state is State.UNHEALTHY


def _answer(index: ZoneIndex, name: str, qtype: int) -> list[str]:
    result = index.lookup(tuple(DNSLabel(name).label), qtype)
    assert result is not None
    return sorted(str(rr.rdata) for rr in result.answer + result.additional)


def test_dns_answers_remote_endpoints_on_srv_and_a_only_where_the_port_is_open() -> None:
    registry = Registry(SPREAD)
    direct = replace(remote("d", "c", port=8080), address="10.8.0.5")
    snap = registry.apply([Upsert(local("1")), SetRemote((remote("r", "b"), direct))])
    index = ZoneIndex(snap, ZoneSettings())
    # A: the local container and the remote one reached on the container's own port; never the
    # host address where only the published port is open.
    assert _answer(index, "web.stablenet.internal", wire.Type.A) == ["10.8.0.5", "172.18.0.2"]
    srv = _answer(index, "_8080._tcp.web.stablenet.internal", wire.Type.SRV)
    assert "0 1 32768 b.hosts.stablenet.internal." in srv and "10.0.0.9" in srv
    assert _answer(index, "b.hosts.stablenet.internal", wire.Type.A) == ["10.0.0.9"]
    missing = index.lookup(tuple(DNSLabel("web-r.stablenet.internal").label), wire.Type.A)
    assert missing is not None and missing.rcode == wire.Rcode.NXDOMAIN
    # A service with a stable address answers that, whatever runs where.
    stable = ZoneIndex(snap, ZoneSettings(stable={"web": ("169.254.100.7",)}))
    assert _answer(stable, "web.stablenet.internal", wire.Type.A) == ["169.254.100.7"]
