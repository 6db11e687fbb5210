"""Run stablenet's proxy alone for the benchmark: one service with one endpoint (the benchmark's
backend), default proxy config (p2c, holds, retries, pools, outcome hook), uvloop.

    python -m benchmarks.proxy.serve_stablenet --listen 127.0.0.1:18081 --backend 127.0.0.1:18080

With ``--workers N`` (N > 1) the proxy runs as N worker processes fed and summed by this one,
as the daemon runs them with proxy.workers = N.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal

import uvloop

from stablenet.config import Config, HealthConfig, ProxyConfig
from stablenet.health.checker import HealthChecker
from stablenet.model import Endpoint, Upsert
from stablenet.proxy import Proxy
from stablenet.registry import Registry
from stablenet.units import parse_hostport
from stablenet.workers import Workers


async def serve(listen: str, backend: str, metrics: bool, workers: int = 1) -> None:
    host, port = parse_hostport(backend)
    registry = Registry()
    registry.apply(
        [Upsert(Endpoint("b" * 64, "bench-1", "web", host, port, "bench", started_at=1.0))]
    )
    health = HealthChecker(registry, HealthConfig())  # passive health, as the daemon wires it
    config = dataclasses.replace(ProxyConfig(), listen=listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    proxy = Proxy(registry, config, report=health.outcome, metrics=metrics)
    if workers > 1:
        settings = Config(proxy=config)
        async with Workers(proxy, registry, settings, health, workers):
            await stop.wait()
        return
    async with proxy:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--no-metrics", action="store_true", help="admin.metrics = false")
    parser.add_argument("--workers", type=int, default=1, help="proxy.workers")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.listen, args.backend, not args.no_metrics, args.workers))


if __name__ == "__main__":
    main()
