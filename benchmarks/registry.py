"""Registry benchmark against the real engine at DOCKER_HOST:

* event-to-registry latency: a labelled container is restarted N times; for each restart, the
  time from the `start` event's own timestamp (timeNano) to the registry snapshot that holds the
  restarted endpoint;
* initial sync and full resync time, and memory, for M running containers;
* a `die` behind slow inspects, against the scripted engine of tests/fake_engine.py (the one
  place where an inspect can be made to take 5 s on purpose): K containers each get an event
  whose inspect is held for up to D seconds, then a registered container dies; each sample is
  the time from the `die` event's timestamp to the snapshot without that container. The held
  inspects are released, and the container started again, after each sample.

    .venv/bin/python -m benchmarks.registry --restarts 50 --containers 300
    .venv/bin/python -m benchmarks.registry --only die --slow 50 --delay 5 --samples 200

Prints a table and writes JSON to benchmarks/results/registry.json (the parts that ran).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import json
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import docker

from stablenet.config import DockerConfig, HealthConfig
from stablenet.docker.source import DockerSource, default_client
from stablenet.docker.translate import Settings
from stablenet.registry import Registry, Snapshot
from tests.fake_engine import FakeEngine
from tests.helpers import ensure_image

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def restarted(name: str, before: float, snap: Snapshot) -> bool:
    return name in snap.by_name and snap.by_name[name].started_at != before


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def start(registry: Registry, interval: float = 3600) -> tuple[DockerSource, Any]:
    source = DockerSource(registry, Settings.from_config(DockerConfig(), HealthConfig()), interval)
    task = asyncio.get_running_loop().create_task(source.run())
    async with asyncio.timeout(120):
        await registry.until(lambda s: s.synced)
    return source, task


async def event_latency(client: docker.DockerClient, image: str, restarts: int) -> dict[str, Any]:
    name = f"snb-lat-{uuid.uuid4().hex[:6]}"
    box = client.containers.run(
        image,
        ["httpd", "-f", "-p", "80", "-h", "/www"],
        name=name,
        detach=True,
        labels={"stablenet.service": "bench-latency"},
    )
    start_times: dict[int, float] = {}
    got_start = threading.Event()
    stream = client.api.events(decode=True, filters={"container": box.id, "event": "start"})

    def read() -> None:
        for count, event in enumerate(stream, start=1):
            start_times[count] = event["timeNano"] / 1e9
            got_start.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    registry = Registry()
    _, task = await start(registry)
    latencies: list[float] = []
    try:
        for i in range(1, restarts + 1):
            got_start.clear()
            before = registry.snapshot.by_name[name].started_at
            await asyncio.to_thread(box.restart, timeout=0)
            async with asyncio.timeout(30):
                snap = await registry.until(functools.partial(restarted, name, before))
            await asyncio.to_thread(got_start.wait, 30)
            latencies.append(snap.created - start_times[i])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        stream.close()
        box.remove(force=True)
    ms = [x * 1000 for x in latencies]
    return {
        "restarts": restarts,
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2),
        "mean_ms": round(statistics.mean(ms), 2),
    }


async def resync_cost(client: docker.DockerClient, image: str, count: int) -> dict[str, Any]:
    prefix = f"snb-many-{uuid.uuid4().hex[:6]}"
    ids: list[str] = []

    def run_one(i: int) -> str:
        box = client.containers.run(
            image,
            ["sleep", "3600"],
            name=f"{prefix}-{i}",
            detach=True,
            labels={"stablenet.service": "bench-many", "stablenet.port": "80"},
        )
        return str(box.id)

    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(run_one, range(count)))
    created_s = time.monotonic() - began
    try:
        rss_before = rss_mib()
        registry = Registry()
        t0 = time.monotonic()
        source, task = await start(registry)
        initial = time.monotonic() - t0
        rss_after = rss_mib()
        assert len(registry.snapshot.services["bench-many"]) == count
        api = await asyncio.to_thread(default_client)
        timings = []
        for _ in range(5):
            t0 = time.monotonic()
            await source.resync(api)
            timings.append(time.monotonic() - t0)
        api.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda cid: client.api.remove_container(cid, force=True), ids))
    return {
        "containers": count,
        "start_containers_s": round(created_s, 1),
        "initial_sync_s": round(initial, 3),
        "resync_median_s": round(statistics.median(timings), 3),
        "resync_max_s": round(max(timings), 3),
        "rss_growth_mib": round(rss_after - rss_before, 1),
        "rss_mib": round(rss_after, 1),
    }


async def die_behind_inspects(slow: int, delay: float, samples: int) -> dict[str, Any]:
    engine = FakeEngine()
    target = engine.add("target")
    held = [engine.add(f"slow-{j}") for j in range(slow)]
    registry = Registry()
    settings = Settings.from_config(DockerConfig(), HealthConfig())
    source = DockerSource(registry, settings, 3600, client_factory=engine.client)
    task = asyncio.get_running_loop().create_task(source.run())
    latencies: list[float] = []
    try:
        async with asyncio.timeout(60):
            await registry.until(lambda s: s.synced)
        for done in range(1, samples + 1):
            holds = [engine.hold(cid, delay) for cid in held]
            for cid in held:
                engine.emit(cid, "health_status: healthy")
            await holds[0].begun()  # the die comes while inspects are under way
            at = engine.die(target)
            async with asyncio.timeout(slow * delay + 60):
                snap = await registry.until(functools.partial(gone, target))
            latencies.append(snap.created - at)
            # Not measured: release the held inspects, start the target again, and let every
            # inspect return before the next sample (the listing's, then slow + 1 per sample).
            engine.release_all()
            engine.start(target)
            async with asyncio.timeout(60):
                await registry.until(lambda s: target in s.endpoints)
            if not await asyncio.to_thread(engine.wait_returned, (1 + slow) * (1 + done), 60):
                raise RuntimeError("released inspects did not return")
    finally:
        engine.release_all()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    ms = [x * 1000 for x in latencies]
    return {
        "held_inspects": slow,
        "delay_s": delay,
        "samples": samples,
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(max(ms), 3),
    }


def gone(cid: str, snap: Snapshot) -> bool:
    return cid not in snap.endpoints


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["engine", "die"], help="run one part (default: all)")
    parser.add_argument("--restarts", type=int, default=50)
    parser.add_argument("--containers", type=int, default=300)
    parser.add_argument("--slow", type=int, default=50, help="held inspects per die sample")
    parser.add_argument("--delay", type=float, default=5.0, help="hold of each inspect, s")
    parser.add_argument("--samples", type=int, default=200, help="die samples")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    if args.only in (None, "engine"):
        client = docker.from_env(version="auto", timeout=120)
        image = ensure_image(client)
        latency = await event_latency(client, image, args.restarts)
        print(
            f"event -> registry over {latency['restarts']} restarts: p50 {latency['p50_ms']} ms, "
            f"p99 {latency['p99_ms']} ms, max {latency['max_ms']} ms"
        )
        resync = await resync_cost(client, image, args.containers)
        print(
            f"{resync['containers']} containers: initial sync {resync['initial_sync_s']} s, "
            f"full resync median {resync['resync_median_s']} s (max {resync['resync_max_s']} s), "
            f"RSS {resync['rss_mib']} MiB (+{resync['rss_growth_mib']} MiB for the registry "
            "and source)"
        )
        client.close()
        results.update(latency=latency, resync=resync)
    if args.only in (None, "die"):
        die = await die_behind_inspects(args.slow, args.delay, args.samples)
        print(
            f"die -> registry with {die['held_inspects']} inspects held {die['delay_s']:g} s each, "
            f"{die['samples']} samples: p50 {die['p50_ms']} ms, p99 {die['p99_ms']} ms, "
            f"max {die['max_ms']} ms"
        )
        results.update(die_behind_inspects=die)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "registry.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(previous | results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
