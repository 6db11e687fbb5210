"""Hostile bytes from clients and backends through the proxy's protocols, in-process (fake
transports, no sockets) so thousands of cases run in seconds, on whichever build of the request
path is current (compiled or not). Whatever arrives, no exception leaves a protocol callback
(uvloop would log it and drop the connection), the client gets nothing or whole HTTP/1.1
responses, and every request leaves the balancer's in-flight count when its connection ends."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stablenet.config import ProxyConfig
from stablenet.model import Endpoint, Upsert
from stablenet.proxy import Proxy
from stablenet.proxy.client import ClientConnection
from stablenet.proxy.upstream import UpstreamConnection
from stablenet.registry import Registry

HOST = b"web.stablenet.internal"
ENDPOINT = Endpoint("f" * 64, "web-1", "web", "127.0.0.1", 9, "fuzz", started_at=1.0)


class FakeTransport:
    """Records what the protocol writes. Like uvloop's: after close or abort, writes are
    dropped until the protocol is told (on a later loop turn); after that they raise."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.lost = False
        self.protocol: Any = None

    def write(self, data: bytes) -> None:
        if self.lost:
            raise RuntimeError("unable to perform operation: the handler is closed")
        if not self.closed:
            self.written += data

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self._lose)

    def _lose(self) -> None:
        self.lost = True
        if self.protocol is not None:
            self.protocol.connection_lost(None)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n",
    b"HEAD /x HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: " + HOST + b"\r\nContent-Length: 3\r\n\r\nabc",
    b"PUT /c HTTP/1.1\r\nHost: "
    + HOST
    + b"\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: " + HOST + b"\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: other.example:8080\r\nExpect: 100-continue\r\n\r\n",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 204\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, X-A\r\n"
    b"X-A: 1\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nuntil close",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n",
]
NOISE = [b"\r\n", b"\n", b"\r", b"\x00", b" ", b"\t", b":", b"\xff", b"0", b"-1", b";", b","]


@st.composite
def mangled(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A few valid messages back to back, then cut, duplicated or sprinkled with noise."""
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(seeds), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(0, 5))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "cut", "flip", "binary"]))
        if kind == "insert":
            data[at:at] = draw(st.sampled_from(NOISE))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        else:
            data[at:at] = draw(st.binary(max_size=16))
    return bytes(data)


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """The bytes as they might arrive: in up to five reads."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


async def exchange(
    client_bytes: list[bytes], backend_bytes: list[bytes], backend_closes: bool = False
) -> bytes:
    """Feed the client's reads, and the backend's whenever it has a request (then maybe close
    the backend's connection); return what the client received. Asserts what must hold
    whatever the bytes were."""
    registry = Registry()
    registry.apply([Upsert(ENDPOINT)])
    config = dataclasses.replace(
        ProxyConfig(), listen="127.0.0.1:1", hold_timeout=0.05, connect_timeout=0.05
    )
    proxy = Proxy(registry, config)
    proxy.dispatcher.loop = asyncio.get_running_loop()
    proxy.dispatcher.now = proxy.dispatcher.loop.time()
    up = UpstreamConnection(proxy.dispatcher, (ENDPOINT.id, ENDPOINT.address, ENDPOINT.port or 80))
    up_transport = FakeTransport()
    up_transport.protocol = up
    up.connection_made(up_transport)  # type: ignore[arg-type]
    proxy.dispatcher.pool_put(up)
    client = ClientConnection(proxy.dispatcher)
    transport = FakeTransport()
    transport.protocol = client
    client.connection_made(transport)  # type: ignore[arg-type]
    answers = iter(backend_bytes)
    for piece in client_bytes:
        if transport.closed:
            break
        client.data_received(piece)
        if up.exchange is not None or up.tunnel_to is not None:
            for answer in answers:  # the backend answers what it was sent, maybe in pieces
                if up_transport.closed:
                    break
                up.data_received(answer)
    if backend_closes:
        up_transport.abort()
        await asyncio.sleep(0.01)  # the retry's connect to a closed port, or the hold
    await asyncio.sleep(0)
    transport.abort()  # the client goes away: everything it started must be let go
    await asyncio.sleep(0)
    await proxy.cancel_tasks()
    written = bytes(transport.written)
    assert not written or written.startswith(b"HTTP/1.1 "), written[:200]
    assert proxy.dispatcher.balancer.inflight == {}, proxy.dispatcher.balancer.inflight
    assert not proxy.dispatcher.waiters
    return written


def test_the_harness_carries_a_plain_exchange(loop: asyncio.AbstractEventLoop) -> None:
    got = loop.run_until_complete(exchange([REQUESTS[0]], [RESPONSES[0]]))
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\nok")
    got = loop.run_until_complete(exchange([REQUESTS[0]], [RESPONSES[0][:20] + b"\x00"]))
    assert got.startswith(b"HTTP/1.1 502 ")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_hostile_requests_and_responses_never_escape_a_callback(
    loop: asyncio.AbstractEventLoop, data: st.DataObject
) -> None:
    request = data.draw(mangled(REQUESTS), label="request")
    response = data.draw(mangled(RESPONSES), label="response")
    loop.run_until_complete(
        exchange(
            data.draw(split(request)),
            data.draw(split(response)),
            data.draw(st.booleans(), label="backend closes"),
        )
    )
