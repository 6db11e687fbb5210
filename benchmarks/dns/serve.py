"""A stablenet DNS server for the benchmark: a registry holding N synthetic services
(svc-0 .. svc-N-1 in the zone, one ready endpoint each), forwarding other names to --upstream,
on uvloop. Prints "ready" once it listens; runs until SIGTERM.

    .venv/bin/python -m benchmarks.dns.serve --port 5300 --names 1000 --upstream 127.0.0.1:5302
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import uvloop

from stablenet.config import DnsConfig
from stablenet.dns import DnsServer
from stablenet.model import Endpoint, Upsert
from stablenet.registry import Registry


def address(i: int) -> str:
    return f"10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256 or 1}"


def names(count: int) -> list[tuple[str, str]]:
    """(service name, address) pairs shared with the dnsmasq hosts file."""
    return [(f"svc-{i}", address(i)) for i in range(count)]


async def main(args: argparse.Namespace) -> None:
    registry = Registry()
    registry.apply(
        [
            Upsert(
                Endpoint(
                    id=f"bench{i}",
                    name=f"ctr-{i}",
                    service=name,
                    address=ip,
                    port=80,
                    network="bridge",
                    addresses=(ip,),
                )
            )
            for i, (name, ip) in enumerate(names(args.names))
        ]
    )
    config = DnsConfig(
        listen=(f"127.0.0.1:{args.port}",),
        upstreams=(args.upstream,) if args.upstream else (),
        allow=("127.0.0.0/8",),
        ttl=5.0,
        cache_size=20000,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with DnsServer(registry, config, resolv_conf=Path("/dev/null")) as server:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await stop.wait()
        sys.stdout.write(repr(server.stats.as_dict()) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--names", type=int, default=1000)
    parser.add_argument("--upstream", default="")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(parser.parse_args()))
