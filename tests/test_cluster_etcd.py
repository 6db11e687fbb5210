"""The cluster layer against a real 3-member etcd cluster on loopback: hosts here are Cluster
nodes with registries fed directly (no Docker; tests/test_cluster_hosts.py runs real engines).
Leases are 2 s, so "TTL + 1 s" is 3 s."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from stablenet.cluster import Cluster
from stablenet.cluster.etcd import Compacted, EtcdClient, Put
from stablenet.config import ClusterConfig
from stablenet.model import Endpoint, Remove, SetSynced, Upsert
from stablenet.registry import SPREAD, Registry, Snapshot
from tests.etcd_members import EtcdCluster, Relay, etcd_cluster
from tests.helpers import eventually

TTL = 2


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@dataclass
class Node:
    registry: Registry
    cluster: Cluster
    task: asyncio.Task[None]

    def remote(self) -> list[str]:
        return sorted(
            f"{e.name}@{e.host}" for e in self.registry.snapshot.endpoints.values() if e.host
        )


def endpoint(name: str, port: int = 30000) -> Endpoint:
    return Endpoint(
        (name * 64)[:64], name, "web", "172.30.0.2", 8080, "net", host_port=port, started_at=1.0
    )


@contextlib.asynccontextmanager
async def node(name: str, urls: Sequence[str], prefix: str) -> AsyncIterator[Node]:
    registry = Registry(SPREAD)
    registry.apply([SetSynced(True)])
    config = ClusterConfig(
        etcd=tuple(urls), prefix=prefix, host_name=name, host_address=f"10.9.0.{len(name)}",
        lease_ttl=TTL, timeout=0.5,
    )  # fmt: skip
    cluster = Cluster(registry, config)
    task = asyncio.get_running_loop().create_task(cluster.run(), name=f"node-{name}")
    try:
        async with asyncio.timeout(10):
            await cluster.joined.wait()
        yield Node(registry, cluster, task)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def until(reg: Registry, check: Callable[[Snapshot], bool], within: float) -> Snapshot:
    async with asyncio.timeout(within):
        return await reg.until(check)


def prefix() -> str:
    return f"/t{time.monotonic_ns()}"


async def test_hosts_share_endpoints_and_skydns_records(etcd: EtcdCluster) -> None:
    p = prefix()
    async with node("a", etcd.urls(), p) as a, node("bb", etcd.urls(), p) as b:
        a.registry.apply([Upsert(endpoint("web-a1")), Upsert(endpoint("web-a2", 30001))])
        b.registry.apply([Upsert(endpoint("web-b1"))])
        await until(b.registry, lambda s: len([e for e in s.endpoints.values() if e.host]) == 2, 5)
        await until(a.registry, lambda s: any(e.host == "bb" for e in s.endpoints.values()), 5)
        assert b.remote() == ["web-a1@a", "web-a2@a"] and a.remote() == ["web-b1@bb"]
        ep = b.registry.snapshot.by_name["web-a2"]
        assert (ep.address, ep.port) == ("10.9.0.1", 30001)
        assert [e.name for e in b.registry.snapshot.ready["web"]] == ["web-a1", "web-a2", "web-b1"]
        async with EtcdClient(etcd.urls()) as client:
            _, records = await client.range_prefix("/skydns/internal/stablenet/web/")
        assert {kv.key.rpartition("/")[2][:2] for kv in records} >= {"a-", "bb"}
        # A change is written as a change: one endpoint gone, one transaction.
        writes = a.cluster.writes
        a.registry.apply([Remove(endpoint("web-a1").id)])
        await until(b.registry, lambda s: "web-a1" not in s.by_name, 5)
        await eventually(lambda: a.cluster.writes == writes + 1, 2)
        assert b.remote() == ["web-a2@a"]
        # What /metrics shows of it.
        families = {m.name: m for m in b.cluster.metrics()}
        assert families["stablenet_cluster_etcd_connected"].samples[0].value == 1
        assert families["stablenet_cluster_remote_endpoints"].samples[0].value == 1
        assert families["stablenet_cluster_hosts"].samples[0].value == 1
        assert families["stablenet_cluster_watch_events"].samples[0].value > 0
        assert {m.name: m for m in a.cluster.metrics()}["stablenet_cluster_writes"].samples[
            0
        ].value == float(a.cluster.writes)


async def test_a_dead_host_is_gone_everywhere_within_ttl_plus_one(etcd: EtcdCluster) -> None:
    p = prefix()
    async with node("a", etcd.urls(), p) as a, node("b", etcd.urls(), p) as b:
        a.registry.apply([Upsert(endpoint("web-a1"))])
        await until(b.registry, lambda s: "web-a1" in s.by_name, 5)
        a.task.cancel()  # dies: no revoke, no delete; only the lease ends its keys
        died = time.monotonic()
        await until(b.registry, lambda s: "web-a1" not in s.by_name, TTL + 1)
        assert time.monotonic() - died <= TTL + 1


async def test_a_lost_lease_is_renewed_and_everything_republished(etcd: EtcdCluster) -> None:
    p = prefix()
    async with node("a", etcd.urls(), p) as a, node("b", etcd.urls(), p) as b:
        a.registry.apply([Upsert(endpoint("web-a1"))])
        await until(b.registry, lambda s: "web-a1" in s.by_name, 5)
        async with EtcdClient(etcd.urls()) as client:
            await client.revoke(a.cluster.lease)  # as when etcd forgets it
        await until(b.registry, lambda s: "web-a1" not in s.by_name, 5)
        await until(b.registry, lambda s: "web-a1" in s.by_name, TTL + 1)
        assert a.cluster.leases_granted == 2


async def test_one_member_down_changes_nothing(etcd: EtcdCluster) -> None:
    p = prefix()
    async with node("a", etcd.urls(), p) as a, node("b", etcd.urls(), p) as b:
        a.registry.apply([Upsert(endpoint("web-a1"))])
        await until(b.registry, lambda s: "web-a1" in s.by_name, 5)
        etcd.stop_member(0)
        try:
            a.registry.apply([Upsert(endpoint("web-a2", 30001))])
            await until(b.registry, lambda s: "web-a2" in s.by_name, 5)
            # Longer than a lease: both keep theirs, nothing is dropped or republished.
            await asyncio.sleep(TTL + 1)
            assert b.remote() == ["web-a1@a", "web-a2@a"]
            assert a.cluster.leases_granted == b.cluster.leases_granted == 1
            assert a.cluster.link.connected and b.cluster.link.connected
        finally:
            etcd.start_member(0)
            etcd.wait_healthy()


async def test_all_of_etcd_down_keeps_the_last_state_and_returns_without_a_flap(
    etcd: EtcdCluster,
) -> None:
    p = prefix()
    async with node("a", etcd.urls(), p) as a, node("b", etcd.urls(), p) as b:
        a.registry.apply([Upsert(endpoint("web-a1"))])
        await until(b.registry, lambda s: "web-a1" in s.by_name, 5)
        seen: list[int] = []

        async def record() -> None:
            async for snap in b.registry.watch():
                seen.append(len([e for e in snap.endpoints.values() if e.host]))

        async with asyncio.TaskGroup() as tasks:
            watcher = tasks.create_task(record())
            for i in range(etcd.size):
                etcd.stop_member(i, signal.SIGTERM)
            try:
                await eventually(
                    lambda: not (b.cluster.link.connected or a.cluster.link.connected), 5
                )
                assert b.cluster.status()["etcd"].startswith("down")
                await asyncio.sleep(TTL + 1)  # longer than any lease: still kept
                assert b.remote() == ["web-a1@a"]
            finally:
                for i in range(etcd.size):
                    etcd.start_member(i)
                etcd.wait_healthy()
            await eventually(lambda: b.cluster.link.connected and a.cluster.link.connected, 10)
            await asyncio.sleep(TTL + 1)  # a lease lost meanwhile would show by now
            watcher.cancel()
        assert b.remote() == ["web-a1@a"]
        assert 0 not in seen  # never dropped, not even for one version
        assert a.cluster.leases_granted == 1


async def test_a_cut_off_host_keeps_its_view_until_leases_expire(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    p = prefix()
    relays = [Relay(m.client_port) for m in etcd.members]
    async with contextlib.AsyncExitStack() as stack:
        for relay in relays:
            await stack.enter_async_context(relay)
        a = await stack.enter_async_context(node("a", etcd.urls(), p))
        b = await stack.enter_async_context(node("b", [r.url for r in relays], p))
        a.registry.apply([Upsert(endpoint("web-a1"))])
        b.registry.apply([Upsert(endpoint("web-b1"))])
        await until(b.registry, lambda s: "web-a1" in s.by_name, 5)
        await until(a.registry, lambda s: "web-b1" in s.by_name, 5)
        for relay in relays:
            relay.cut()
        cut = time.monotonic()
        # b keeps a's endpoint while a's lease could still be alive, then drops it; its own stays.
        await until(b.registry, lambda s: "web-a1" not in s.by_name, TTL + TTL / 3 + 2)
        assert time.monotonic() - cut >= TTL - TTL / 3 - 0.1
        assert "web-b1" in b.registry.snapshot.by_name
        assert b.cluster.status()["etcd"] == "unreachable"
        # Meanwhile a saw b's lease expire; a compaction takes b's watch history away.
        await until(a.registry, lambda s: "web-b1" not in s.by_name, TTL + 2)
        a.registry.apply([Upsert(endpoint("web-a2", 30001))])
        async with EtcdClient(etcd.urls()) as client:
            revision, _ = await client.range_prefix(p)
            await client.call("/v3/kv/compaction", {"revision": str(revision)})
        reads = b.cluster.full_reads
        for relay in relays:
            relay.heal()
        await until(b.registry, lambda s: {"web-a1", "web-a2"} <= set(s.by_name), 10)
        await until(a.registry, lambda s: "web-b1" in s.by_name, 10)  # republished
        assert b.cluster.full_reads > reads
        await eventually(lambda: b.cluster.leases_granted == 2, 5)


async def test_watch_from_a_compacted_revision_says_so(etcd: EtcdCluster) -> None:
    p = prefix()
    async with EtcdClient(etcd.urls()) as client:
        await client.txn([Put(p + "/x", b"1")])
        revision = await client.txn([Put(p + "/x", b"2")])
        await client.call("/v3/kv/compaction", {"revision": str(revision)})
        with pytest.raises(Compacted) as caught:
            async for _ in client.watch(p, revision - 1):
                pass
        assert caught.value.revision == revision
