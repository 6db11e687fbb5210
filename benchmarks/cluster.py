"""The cluster layer on a real 3-member etcd cluster on loopback (members started here, stopped
by PID).

* propagation: an endpoint appears in host A's registry (as the Docker source puts it there) ->
  it is routable in host B's registry (its ``ready`` set); p50/p99 over N samples. Docker's own
  event latency (container start -> A's registry) is not included: see the README.
* removal: host A dies (its loops stop, no revoke) -> its endpoint leaves B's registry; for
  lease TTLs of 2 s and 10 s. Goal: within TTL + 1 s.
* scale: 50 simulated hosts x 20 endpoints (publishers without Docker, each with its lease and a
  watch of the whole prefix, as every host has), 1 change per host per second for D seconds:
  etcd requests/s, watch events delivered/s, etcd members' CPU, time for a full host to see all.

    .venv/bin/python -m benchmarks.cluster --samples 200 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from benchmarks.processes import cpu_seconds
from stablenet.cluster import Cluster
from stablenet.cluster.etcd import EtcdClient, Unavailable
from stablenet.config import ClusterConfig
from stablenet.model import Endpoint, SetSynced, Upsert
from stablenet.registry import SPREAD, Registry, Snapshot
from tests.etcd_members import EtcdCluster, etcd_cluster

RESULTS = Path(__file__).resolve().parent / "results"


def endpoint(host: str, i: int, draining: bool = False) -> Endpoint:
    cid = f"{host}-{i:05d}".ljust(64, "0")
    return Endpoint(
        cid, f"web-{host}-{i}", f"svc{i % 5}", "172.30.0.2", 8080, "net",
        host_port=30000 + i, started_at=1.0, draining=draining,
    )  # fmt: skip


class Publisher(Cluster):
    """A simulated host that only publishes (lease and writes); its watch load is made by a
    plain stream beside it, so one process can stand in for 50 hosts."""

    async def run(self) -> None:
        async with self.client() as client, asyncio.TaskGroup() as tasks:
            self._client = client
            tasks.create_task(self._lease_loop(client))
            tasks.create_task(self._desire_loop())
            tasks.create_task(self._publish_loop(client))


@contextlib.asynccontextmanager
async def host(
    name: str, urls: list[str], prefix: str, ttl: int, publish_only: bool = False
) -> AsyncIterator[Cluster]:
    registry = Registry(SPREAD)
    registry.apply([SetSynced(True)])
    config = ClusterConfig(
        etcd=tuple(urls), prefix=prefix, host_name=name, host_address="10.9.0.1",
        lease_ttl=float(ttl),
    )  # fmt: skip
    cluster = (Publisher if publish_only else Cluster)(registry, config)
    task = asyncio.get_running_loop().create_task(cluster.run(), name=f"host-{name}")
    try:
        async with asyncio.timeout(10):
            await cluster.joined.wait()
        yield cluster
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def propagation(etcd: EtcdCluster, samples: int) -> dict[str, Any]:
    prefix = f"/bench{time.monotonic_ns()}"
    latencies = []
    async with host("a", etcd.urls(), prefix, 10) as a, host("b", etcd.urls(), prefix, 10) as b:
        for i in range(samples):
            ep = endpoint("a", i)

            def routed(snap: Snapshot, ep: Endpoint = ep) -> bool:
                return any(e.id == ep.id for e in snap.ready.get(ep.service, ()))

            t0 = time.perf_counter()
            a.registry.apply([Upsert(ep)])
            async with asyncio.timeout(5):
                await b.registry.until(routed)
            latencies.append((time.perf_counter() - t0) * 1000)
    return {
        "samples": samples,
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(pct(latencies, 0.99), 2),
        "max_ms": round(max(latencies), 2),
    }


async def removal(etcd: EtcdCluster, ttl: int, samples: int) -> dict[str, Any]:
    times = []
    ep = endpoint("a", 0)
    for _ in range(samples):
        prefix = f"/bench{time.monotonic_ns()}"
        async with host("b", etcd.urls(), prefix, ttl) as b:
            async with host("a", etcd.urls(), prefix, ttl) as a:
                a.registry.apply([Upsert(ep)])
                async with asyncio.timeout(5):
                    await b.registry.until(lambda s: ep.id in s.endpoints)
                # leaving the context cancels a's loops: it dies without a word to etcd
            died = time.perf_counter()
            async with asyncio.timeout(ttl + 5):
                await b.registry.until(lambda s: ep.id not in s.endpoints)
            times.append(time.perf_counter() - died)
    return {
        "ttl_s": ttl,
        "samples": samples,
        "mean_s": round(statistics.mean(times), 2),
        "max_s": round(max(times), 2),
        "within_ttl_plus_1s": max(times) <= ttl + 1,
    }


async def _watch_count(client: EtcdClient, prefix: str, counts: list[int]) -> None:
    start = 0
    while True:
        try:
            if start == 0:
                revision, _ = await client.range_prefix(prefix)
                start = revision + 1
            async for _, events in client.watch(prefix, start):
                counts[0] += len(events)
                if events:
                    start = events[-1].mod_revision + 1
        except Unavailable:
            await asyncio.sleep(0.1)


async def scale(etcd: EtcdCluster, hosts: int, per_host: int, seconds: float) -> dict[str, Any]:
    """``hosts`` publishers (each a Cluster node with a registry of its own, but only one of
    them merging: the others' watches are plain streams that count events, as the merge's cost
    is per host, measured by propagation) and one full host that must see everything."""
    prefix = f"/scale{time.monotonic_ns()}"
    counts = [0]
    async with contextlib.AsyncExitStack() as stack:
        full = await stack.enter_async_context(host("full", etcd.urls(), prefix, 10))
        publishers = []
        t0 = time.perf_counter()
        for h in range(hosts - 1):
            name = f"h{h:02d}"
            node = await stack.enter_async_context(host(name, etcd.urls(), prefix, 10, True))
            node.registry.apply([Upsert(endpoint(name, i)) for i in range(per_host)])
            publishers.append(node)
        tasks = await stack.enter_async_context(asyncio.TaskGroup())
        watchers = []
        for _ in range(hosts - 1):  # every other host watches the whole prefix too
            client = await stack.enter_async_context(EtcdClient(etcd.urls()))
            watchers.append(tasks.create_task(_watch_count(client, prefix + "/hosts/", counts)))
        want = (hosts - 1) * per_host
        try:
            async with asyncio.timeout(60):
                await full.registry.until(lambda s: len(s.endpoints) >= want)
        except TimeoutError:
            raise RuntimeError(
                f"the full host saw {len(full.registry.snapshot.endpoints)} of {want} endpoints"
            ) from None
        converged = time.perf_counter() - t0
        requests0 = sum(n.requests for n in [*publishers, full])
        events0 = counts[0]
        etcd_cpu0 = sum(cpu_seconds(m.proc.pid) for m in etcd.members if m.proc)
        started = time.perf_counter()
        tick = 0
        while time.perf_counter() - started < seconds:
            for node in publishers:  # one endpoint per host flips draining each second
                ep = endpoint(node.layout.host, tick % per_host, draining=tick % 2 == 0)
                node.registry.apply([Upsert(ep)])
            tick += 1
            await asyncio.sleep(1.0)
        elapsed = time.perf_counter() - started
        requests = sum(n.requests for n in [*publishers, full]) - requests0
        etcd_cpu = sum(cpu_seconds(m.proc.pid) for m in etcd.members if m.proc) - etcd_cpu0
        for task in watchers:
            task.cancel()
        return {
            "hosts": hosts,
            "endpoints_per_host": per_host,
            "converged_s": round(converged, 2),
            "changes_per_s": round(tick * len(publishers) / elapsed, 1),
            "etcd_requests_per_s": round(requests / elapsed, 1),
            "watch_events_delivered_per_s": round((counts[0] - events0) / elapsed, 1),
            "etcd_cpu_share_of_one_core": round(etcd_cpu / elapsed, 3),
        }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, etcd_cluster(Path(tmp)) as etcd:
        result: dict[str, Any] = {}
        if args.samples:
            result["propagation"] = await propagation(etcd, args.samples)
            result["removal"] = [await removal(etcd, 2, 3), await removal(etcd, 10, 1)]
        result["scale"] = await scale(etcd, args.hosts, args.per_host, args.seconds)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--per-host", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cluster.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
