"""The floor of stablenet's data path: the least a proxy built the same way (asyncio Protocols,
httptools, uvloop, interpreted) can do per request. One backend, a pool of kept-alive
connections, requests and responses re-serialised with X-Forwarded-For, nothing else: no
routing, balancing, retries, holding, timeouts, limits, metrics or error handling. Not for use;
the benchmark runs it beside stablenet so the distance between them is the cost of the features.

    python -m benchmarks.proxy.floor --listen 127.0.0.1:18082 --backend 127.0.0.1:18080
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any, cast

import httptools
import uvloop

from stablenet.units import parse_hostport

CONNECTING: set[asyncio.Task[None]] = set()  # connects in progress, referenced until done


class Side(asyncio.Protocol):
    """A connection whose bytes go to an llhttp parser calling back this object."""

    parser: Any  # the request or the response parser, set by the subclass

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.headers: list[tuple[bytes, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


class Upstream(Side):
    def __init__(self, pool: list[Upstream]) -> None:
        super().__init__()
        self.pool = pool
        self.client: Client | None = None
        self.parser = httptools.HttpResponseParser(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)

    def on_headers_complete(self) -> None:
        assert self.client is not None
        out = [b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code()]
        for name, value in self.headers:
            if name.lower() != b"connection":
                out.append(b"%b: %b\r\n" % (name, value))
        out.append(b"\r\n")
        self.client.wbuf.append(b"".join(out))

    def on_body(self, body: bytes) -> None:
        assert self.client is not None
        self.client.wbuf.append(body)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        assert client is not None and client.transport is not None
        if not client.transport.is_closing():
            client.transport.write(b"".join(client.wbuf))
        client.wbuf.clear()
        self.pool.append(self)


class Client(Side):
    def __init__(self, backend: tuple[str, int], pool: list[Upstream]) -> None:
        super().__init__()
        self.backend = backend
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.wbuf: list[bytes] = []
        self.url = b""

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        parts = [self.parser.get_method(), b" ", self.url, b" HTTP/1.1\r\n"]
        for name, value in self.headers:
            parts.append(b"%b: %b\r\n" % (name, value))
        parts.append(b"X-Forwarded-For: 127.0.0.1\r\n\r\n")
        head = b"".join(parts)
        if self.pool:
            self.send(self.pool.pop(), head)
        else:
            task = asyncio.get_running_loop().create_task(self.connect(head))
            CONNECTING.add(task)
            task.add_done_callback(CONNECTING.discard)

    async def connect(self, head: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(lambda: Upstream(self.pool), *self.backend)
        self.send(up, head)

    def send(self, up: Upstream, head: bytes) -> None:
        assert up.transport is not None
        up.client = self
        up.transport.write(head)


async def serve(listen: str, backend: str) -> None:
    pool: list[Upstream] = []
    target = parse_hostport(backend)
    host, port = parse_hostport(listen)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    server = await loop.create_server(lambda: Client(target, pool), host, port, backlog=1024)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--backend", required=True)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.listen, args.backend))


if __name__ == "__main__":
    main()
