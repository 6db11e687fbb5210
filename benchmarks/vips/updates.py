"""Control-plane figures of the kernel data path, run inside a network namespace of its own (so
the host's tables never hold the synthetic services): the time from a registry change to the
kernel holding it (one endpoint replaced among N services), and a full reconcile of N services
into an empty table. No traffic is sent. Run by benchmarks/vips/run.sh, or:

    nsenter --net=/var/run/netns/NAME .venv/bin/python -m benchmarks.vips.updates --services 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time

from stablenet.model import Endpoint, Upsert
from stablenet.registry import Registry
from stablenet.vips import rules
from stablenet.vips.kernel import Nft
from stablenet.vips.sync import VipManager

RANGE = "198.18.0.0/15"


def endpoint(service: int, replica: int, generation: int = 0) -> Endpoint:
    n = service * 4 + replica + generation * 40000
    return Endpoint(
        id=f"s{service}r{replica}",
        name=f"svc{service}-{replica}",
        service=f"svc{service}",
        address=f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}",
        port=8080,
        network="bench",
        labels={"stablenet.vip.ports": "80:8080"},
    )


async def one(services: int, samples: int) -> dict[str, float]:
    await Nft().delete_table()
    registry = Registry()
    registry.apply([Upsert(endpoint(s, r)) for s in range(services) for r in range(2)])
    with tempfile.TemporaryDirectory() as state:
        vips = VipManager(registry, RANGE, state)
        vips._nft = Nft()
        began = time.perf_counter()
        await vips.reconcile(registry.snapshot)
        reconcile = time.perf_counter() - began
        assert len(vips.table.services) == services
        latencies = []
        for i in range(samples):
            s = (i * 7919) % services
            snap = registry.apply([Upsert(endpoint(s, 1, generation=1 + i))])
            took = await vips.update(snap)  # registry change -> the kernel holds it
            assert took is not None
            latencies.append(took)
        latencies.sort()
        # A second reconcile finds the kernel already right: the restart case.
        began = time.perf_counter()
        await vips.reconcile(registry.snapshot)
        again = time.perf_counter() - began
    await Nft().delete_table()
    return {
        "services": services,
        "reconcile_empty_s": reconcile,
        "reconcile_in_step_s": again,
        "update_p50_ms": statistics.median(latencies) * 1e3,
        "update_p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1e3,
        "update_max_ms": latencies[-1] * 1e3,
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--samples", type=int, default=300)  # at most 400: unique addresses
    args = parser.parse_args()
    assert rules.TABLE == "ip stablenet"
    for services in args.services:
        print(json.dumps(asyncio.run(one(services, min(args.samples, 5 * services)))), flush=True)


if __name__ == "__main__":
    main()
