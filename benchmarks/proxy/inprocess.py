"""The proxy's own cost per request, with no sockets: one keep-alive client connection and one
pooled backend connection on transports that only record what is written, fed a request and the
backend's response in turn, through the real protocol classes (compiled when the build is
current, like the daemon). What a run measures is stablenet's code and llhttp, not uvloop or the
kernel, so two versions can be compared on a busy machine: take the best of several rounds.

    .venv/bin/python -m benchmarks.proxy.inprocess --requests 200000 --rounds 7
    STABLENET_PURE=1 .venv/bin/python -m benchmarks.proxy.inprocess    # the Python sources
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from typing import Any

from stablenet import native
from stablenet.config import ProxyConfig
from stablenet.model import Endpoint, Upsert
from stablenet.proxy import Proxy
from stablenet.registry import Registry

HOST = b"web.stablenet.internal"
ENDPOINT = Endpoint("f" * 64, "web-1", "web", "127.0.0.1", 9, "bench", started_at=1.0)
REQUEST = b"GET /small HTTP/1.1\r\nHost: " + HOST + b"\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
RESPONSES = {
    "small": b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
    "chunked": b"HTTP/1.1 200 OK\r\nServer: nginx\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
}


class NullTransport:
    """Counts what is written; never closes on its own."""

    def __init__(self) -> None:
        self.written = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


async def measure(requests: int, response: bytes) -> float:
    """Microseconds of stablenet's code per request, for ``requests`` requests in a row."""
    from stablenet.proxy import client, upstream  # after native.extend has chosen the build

    registry = Registry()
    registry.apply([Upsert(ENDPOINT)])
    config = dataclasses.replace(ProxyConfig(), listen="127.0.0.1:1")
    proxy = Proxy(registry, config, metrics=True)
    shared = proxy.dispatcher
    shared.loop = asyncio.get_running_loop()
    up = upstream.UpstreamConnection(shared, (ENDPOINT.id, ENDPOINT.address, 9))
    up.connection_made(NullTransport())  # type: ignore[arg-type]
    shared.pool_put(up)
    conn = client.ClientConnection(shared)
    transport = NullTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    feed_client, feed_backend = conn.data_received, up.data_received
    started = time.perf_counter()
    for _ in range(requests):
        feed_client(REQUEST)
        feed_backend(response)
    elapsed = time.perf_counter() - started
    if transport.closed or up.exchange is not None:
        raise RuntimeError("the exchange did not complete as a keep-alive request")
    return elapsed / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--response", choices=sorted(RESPONSES), default="small")
    args = parser.parse_args()
    runs = [
        asyncio.run(measure(args.requests, RESPONSES[args.response])) for _ in range(args.rounds)
    ]
    build = "compiled" if native.enabled() else "python"
    print(json.dumps({"build": build, "best_us": round(min(runs), 3), "runs": runs}))


if __name__ == "__main__":
    main()
