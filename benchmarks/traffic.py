"""What the status page's traffic history costs: per-second work and memory for S services.

Times the pure core (``History.record`` with a full ring), the reading of a proxy's figures
(``read_figures`` on a proxy object with S services of two endpoints each, counters filled as
serving leaves them), and the admin API's answers (everything, and only the newest second;
written one service at a time, so the longest piece is what holds the loop), and measures the
history's memory per service with tracemalloc. No sockets, no engine.

    .venv/bin/python -m benchmarks.traffic --services 1000 --history 600

Prints a table and writes JSON to benchmarks/results/traffic.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stablenet import config
from stablenet.histogram import Histogram
from stablenet.model import Endpoint, Upsert
from stablenet.proxy import Proxy
from stablenet.registry import Registry
from stablenet.traffic import History, Reading, read_figures

RESULTS = Path(__file__).resolve().parent / "results"


def registry(services: int) -> Registry:
    reg = Registry()
    reg.apply(
        [
            Upsert(
                Endpoint(
                    id=f"c{s}-{r}",
                    name=f"svc{s}-{r}",
                    service=f"svc{s}",
                    address=f"10.{s // 250}.{s % 250}.{r + 1}",
                    port=80,
                    network="bridge",
                )
            )
            for s in range(services)
            for r in range(2)
        ]
    )
    return reg


def timed(fn: Callable[[], object], rounds: int) -> dict[str, float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return {"median_ms": statistics.median(samples), "max_ms": max(samples)}


async def measure(services: int, span: float, rounds: int) -> dict[str, Any]:
    reg = registry(services)
    proxy = Proxy(reg, config.parse("", env={}).proxy)
    served = proxy.dispatcher
    for s in range(services):
        served.count(f"svc{s}").requests = 1000 + s
        served.responses[(f"svc{s}", f"svc{s}-0", "2xx")] = 990
        served.responses[(f"svc{s}", f"svc{s}-0", "5xx")] = 10
        hist = served.latency[f"svc{s}"] = Histogram()
        for value in (0.001, 0.004, 0.02, 0.3):
            hist.observe(value)

    tracemalloc.start()
    history = History(span)
    before = tracemalloc.get_traced_memory()[0]
    now = 0.0
    readings: dict[str, Reading] = {}
    for tick in range(history.capacity + 1):
        readings = {
            name: Reading(r.requests + tick if r.requests is not None else None, **rest(r))
            for name, r in (read_figures(reg, proxy).items() if tick == 0 else readings.items())
        }
        history.record(now, readings)
        now += 1.0
    memory = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()

    def step() -> None:
        nonlocal now
        history.record(now, readings)
        now += 1.0

    return {
        "services": services,
        "history_s": span,
        "record": timed(step, rounds),
        "read_figures": timed(lambda: read_figures(reg, proxy), rounds),
        "json_newest": timed(lambda: "".join(history.chunks(history.tick - 1)), rounds),
        "json_all": timed(lambda: "".join(history.chunks(0)), max(1, rounds // 10)),
        "json_all_piece": longest_piece(history),
        "memory_per_service_kib": memory / services / 1024,
    }


def longest_piece(history: History) -> dict[str, float]:
    """The longest the loop is held while the whole history is written (one service)."""
    longest, pieces = 0.0, history.chunks(0)
    while True:
        start = time.perf_counter()
        if next(pieces, None) is None:
            break
        longest = max(longest, time.perf_counter() - start)
    return {"median_ms": longest * 1000, "max_ms": longest * 1000}


def rest(r: Reading) -> dict[str, Any]:
    return {
        "errors": r.errors,
        "latency": r.latency,
        "in_flight": r.in_flight,
        "held": r.held,
        "ready": r.ready,
        "desired": r.desired,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--history", type=float, default=600.0, help="seconds kept")
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    result = asyncio.run(measure(args.services, args.history, args.rounds))
    print(f"traffic history: {result['services']} services, {result['history_s']:.0f} s kept")
    for key in ("record", "read_figures", "json_newest", "json_all", "json_all_piece"):
        t = result[key]
        print(f"  {key:<14} median {t['median_ms']:8.2f} ms   max {t['max_ms']:8.2f} ms")
    print(f"  memory         {result['memory_per_service_kib']:.1f} KiB per service")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "traffic.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
