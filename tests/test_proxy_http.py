"""The HTTP proxy against loopback backends (aiohttp and raw asyncio servers): framing, streaming,
keep-alive, retries, holding, timeouts, WebSocket. Registry fed by hand."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from stablenet.config import ProxyConfig
from stablenet.model import Drain, Endpoint, Remove, Upsert
from stablenet.proxy import Proxy
from stablenet.proxy.dispatch import HOST_CACHE
from stablenet.registry import Registry
from tests.helpers import free_port

HOST = "web.stablenet.internal"


def endpoint(port: int, n: int = 1, service: str = "web", **kwargs: Any) -> Endpoint:
    return Endpoint(
        id=f"{n:064x}",
        name=f"{service}-{n}",
        service=service,
        address="127.0.0.1",
        port=port,
        network="test",
        **kwargs,
    )


def whoami_app(name: str) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/echo":
            digest = hashlib.sha256()
            size = 0
            async for chunk in request.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
            return web.json_response(
                {"size": size, "sha256": digest.hexdigest(), "headers": dict(request.headers)}
            )
        if request.path == "/big":
            size = int(request.query.get("size", "0"))
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            block = b"x" * 65536
            sent = 0
            while sent < size:
                piece = block[: min(len(block), size - sent)]
                await response.write(piece)
                sent += len(piece)
            await response.write_eof()
            return response
        if request.path == "/status":
            return web.Response(status=int(request.query["code"]), text="status\n")
        if request.path == "/ws":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await ws.send_str(f"{name}:{msg.data}")
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
            return ws
        return web.Response(text=name)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@contextlib.asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_backend(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


@contextlib.asynccontextmanager
async def running_proxy(registry: Registry, **options: Any) -> AsyncIterator[tuple[Proxy, str]]:
    config = dataclasses.replace(ProxyConfig(), listen=f"127.0.0.1:{free_port()}", **options)
    async with Proxy(registry, config) as proxy:
        host, port = proxy.bound[0]
        yield proxy, f"http://{host}:{port}"


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Wait for the proxy's state to satisfy ``predicate`` (it has no event for each of these,
    so look after every short turn of the loop); fail after ``within`` s."""
    for _ in range(int(within / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached within {within} s")


async def exchange_raw(url: str, data: bytes, wait: float = 5.0) -> bytes:
    """Send bytes to the proxy and read everything until it closes."""
    host, _, port = url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        async with asyncio.timeout(wait):
            return await reader.read(-1)
    finally:
        writer.close()


@pytest.fixture
async def one_backend() -> AsyncIterator[tuple[Registry, int]]:
    registry = Registry()
    async with serve_app(whoami_app("one")) as port:
        registry.apply([Upsert(endpoint(port))])
        yield registry, port


async def test_routes_by_host_and_404_names_the_host(one_backend: tuple[Registry, int]) -> None:
    registry, _ = one_backend
    async with running_proxy(registry) as (_, url), aiohttp.ClientSession() as http:
        async with http.get(url + "/", headers={"Host": HOST}) as resp:
            assert resp.status == 200
            assert await resp.text() == "one"
        async with http.get(url + "/", headers={"Host": "WEB.stablenet.internal.:80"}) as resp:
            assert await resp.text() == "one"
        async with http.get(url + "/", headers={"Host": "nothing.example"}) as resp:
            assert resp.status == 404
            assert "nothing.example" in await resp.text()


async def test_label_hosts_route_too() -> None:
    registry = Registry()
    async with serve_app(whoami_app("labelled")) as port:
        registry.apply([Upsert(endpoint(port, http_hosts=("shop.example.com",)))])
        async with running_proxy(registry) as (_, url), aiohttp.ClientSession() as http:
            async with http.get(url + "/", headers={"Host": "shop.example.com"}) as resp:
                assert await resp.text() == "labelled"


async def test_forwarded_headers_set_and_hop_by_hop_removed(
    one_backend: tuple[Registry, int],
) -> None:
    registry, _ = one_backend
    async with running_proxy(registry) as (_, url), aiohttp.ClientSession() as http:
        headers = {
            "Host": HOST,
            "X-Forwarded-For": "10.9.9.9",
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "must not pass",
            "Keep-Alive": "timeout=5",
            "X-Forwarded-Proto": "https",
        }
        async with http.post(url + "/echo", data=b"abc", headers=headers) as resp:
            seen = (await resp.json())["headers"]
    assert seen["X-Forwarded-For"] == "10.9.9.9, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"] == HOST
    assert "X-Secret" not in seen
    assert "Keep-Alive" not in seen


@pytest.mark.parametrize(
    ("fields", "kept", "dropped"),
    [
        # The common case: only Connection: keep-alive, cut from the head as received.
        (b"Connection: keep-alive\r\nX-Kept: 1\r\n", [b"x-kept: 1"], [b"connection: keep"]),
        # Connection naming another field drops that field too, whatever its case.
        (
            b"Connection: keep-alive, X-Internal\r\nx-internal: secret\r\nX-Kept: 1\r\n",
            [b"x-kept: 1"],
            [b"x-internal", b"connection: keep"],
        ),
        # Every hop-by-hop field, upper case, with a token list.
        (
            b"KEEP-ALIVE: timeout=5\r\nCONNECTION: Close, X-A\r\nX-A: 1\r\nTE: trailers\r\n"
            b"Trailer: X-T\r\nProxy-Connection: keep-alive\r\nX-Kept: 1\r\n",
            [b"x-kept: 1"],
            [b"keep-alive:", b"x-a:", b"te:", b"trailer:", b"proxy-connection:"],
        ),
    ],
)
async def test_response_hop_by_hop_fields_removed(
    fields: bytes, kept: list[bytes], dropped: list[bytes]
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 Fine Thanks\r\n" + fields + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    registry = Registry()
    async with raw_backend(answer) as port:
        registry.apply([Upsert(endpoint(port))])
        async with running_proxy(registry) as (_, url):
            answer_bytes = await exchange_raw(
                url, b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % HOST.encode()
            )
    head, _, body = answer_bytes.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"http/1.1 200 fine thanks"
    assert body == b"ok"
    for field in kept:
        assert field in lines
    for field in dropped:
        assert not any(line.startswith(field) for line in lines), (field, lines)
    assert lines.count(b"connection: close") == 1  # ours: the client asked to close


async def test_a_response_without_reason_phrase_does_not_inherit_one() -> None:
    """Two responses on one pooled backend connection; the second has no reason phrase."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 Fine Thanks\r\nContent-Length: 2\r\n\r\nok")
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 204\r\n\r\n")
        await reader.read()

    registry = Registry()
    request = b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % HOST.encode()
    async with raw_backend(answer) as port:
        registry.apply([Upsert(endpoint(port))])
        async with running_proxy(registry) as (proxy, url):
            first = await exchange_raw(
                url, request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
            )
            second = await exchange_raw(
                url, request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
            )
            assert len(proxy.dispatcher.upstreams) == 1  # the same backend connection served both
    assert first.startswith(b"HTTP/1.1 200 Fine Thanks\r\n")
    assert second.startswith(b"HTTP/1.1 204 \r\n")


async def test_host_routes_follow_the_registry_and_stay_bounded() -> None:
    registry = Registry()
    async with running_proxy(registry) as (proxy, _):
        assert proxy.dispatcher.route(HOST.encode()) is None
        registry.apply([Upsert(endpoint(free_port()))])
        # A new routing table: the remembered miss is gone; case, port and a final dot are
        # the same host.
        for raw in (HOST, HOST.upper(), HOST + ":80", HOST + "."):
            assert proxy.dispatcher.route(raw.encode()) == "web", raw
        for n in range(3 * HOST_CACHE):
            assert proxy.dispatcher.route(b"random-%d.example" % n) is None
        assert proxy.dispatcher.route(HOST.encode()) == "web"
        assert len(proxy.dispatcher._by_host) <= HOST_CACHE
        proxy.dispatcher.route(b"x" * 4000)  # too long to remember
        assert b"x" * 4000 not in proxy.dispatcher._by_host


async def test_access_log_names_request_status_service_and_endpoint(
    one_backend: tuple[Registry, int], caplog: pytest.LogCaptureFixture
) -> None:
    registry, port = one_backend
    caplog.set_level(logging.INFO, logger="stablenet.proxy.access")
    async with (
        running_proxy(registry, access_log=True) as (_, url),
        aiohttp.ClientSession() as http,
    ):
        async with http.get(url + "/a%20b?q=\x01", headers={"Host": HOST}) as resp:
            assert resp.status == 200
        async with http.get(url + "/", headers={"Host": "nothing.example"}) as resp:
            assert resp.status == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "stablenet.proxy.access"]
    assert len(lines) == 2, lines
    assert re.fullmatch(
        rf'127\.0\.0\.1 "GET /a%20b\?q=\S* HTTP/1\.1" 200 web 127\.0\.0\.1:{port} [\d.]+ms',
        lines[0],
    ), lines[0]
    assert re.fullmatch(r'127\.0\.0\.1 "GET / HTTP/1\.1" 404 - - [\d.]+ms', lines[1]), lines[1]


async def test_keep_alive_reuses_backend_connections(one_backend: tuple[Registry, int]) -> None:
    registry, _ = one_backend
    async with running_proxy(registry) as (proxy, url):
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as http:
            for _ in range(20):
                async with http.get(url + "/", headers={"Host": HOST}) as resp:
                    assert await resp.text() == "one"
        assert len(proxy.dispatcher.upstreams) == 1


async def test_streams_large_bodies_both_ways_without_buffering(
    one_backend: tuple[Registry, int],
) -> None:
    registry, _ = one_backend
    size = 64 * 1024 * 1024
    block = bytes(range(256)) * 256

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    expected = hashlib.sha256()
    for _ in range(size // len(block)):
        expected.update(block)
    async with running_proxy(registry) as (proxy, url), aiohttp.ClientSession() as http:
        # Upload, chunked: the backend hashes what arrives.
        async with http.post(url + "/echo", data=body(), headers={"Host": HOST}) as resp:
            got = await resp.json()
        assert got["size"] == size
        assert got["sha256"] == expected.hexdigest()
        # Download, chunked from the backend, read slowly: the proxy must not pile it up.
        received = 0
        async with http.get(url + f"/big?size={size}", headers={"Host": HOST}) as resp:
            async for chunk in resp.content.iter_chunked(1 << 20):
                received += len(chunk)
                if received < 8 << 20:
                    await asyncio.sleep(0.01)
                    buffered = sum(
                        c.transport.get_write_buffer_size()
                        for c in proxy.dispatcher.clients
                        if c.transport is not None
                    )
                    assert buffered < 4 << 20
        assert received == size


async def test_head_and_no_body_statuses_keep_the_connection_usable(
    one_backend: tuple[Registry, int],
) -> None:
    registry, _ = one_backend
    async with running_proxy(registry) as (proxy, url):
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as http:
            for _ in range(3):
                async with http.head(url + "/", headers={"Host": HOST}) as resp:
                    assert resp.status == 200
                    assert resp.headers["Content-Length"] == "3"
                async with http.get(url + "/status?code=204", headers={"Host": HOST}) as resp:
                    assert resp.status == 204
                async with http.get(url + "/", headers={"Host": HOST}) as resp:
                    assert await resp.text() == "one"


async def test_expect_100_continue(one_backend: tuple[Registry, int]) -> None:
    registry, _ = one_backend
    async with running_proxy(registry) as (_, url):
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-v", "--max-time", "5", "-H", f"Host: {HOST}",
            "-H", "Expect: 100-continue", "--data-binary", "@-", url + "/echo",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate(b"y" * 5000)
    assert b"HTTP/1.1 100 Continue" in err
    assert b'"size": 5000' in out


async def test_websocket_echo_through_the_proxy(one_backend: tuple[Registry, int]) -> None:
    registry, _ = one_backend
    async with running_proxy(registry) as (_, url), aiohttp.ClientSession() as http:
        async with http.ws_connect(url + "/ws", headers={"Host": HOST}) as ws:
            for i in range(5):
                await ws.send_str(f"hello {i}")
                assert (await ws.receive_str()) == f"one:hello {i}"
            await ws.send_bytes(b"\x00" * 100_000)
            assert (await ws.receive_bytes()) == b"\x00" * 100_000


AMBIGUOUS = {
    "content-length and transfer-encoding": b"POST / HTTP/1.1\r\nHost: %s\r\n"
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "repeated content-length": b"POST / HTTP/1.1\r\nHost: %s\r\n"
    b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "content-length list": b"POST / HTTP/1.1\r\nHost: %s\r\nContent-Length: 3, 3\r\n\r\nabc",
    "invalid content-length": b"POST / HTTP/1.1\r\nHost: %s\r\nContent-Length: +3\r\n\r\nabc",
    "invalid chunk size": b"POST / HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",
    "chunk size overflow": b"POST / HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"fffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
    "transfer-encoding not ending in chunked": b"POST / HTTP/1.1\r\nHost: %s\r\n"
    b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: %s\r\nX-A: a\r\n b\r\n\r\n",
    "bare LF": b"GET / HTTP/1.1\nHost: %s\n\n",
    "bare LF in a header": b"GET / HTTP/1.1\r\nHost: %s\nX-A: b\r\n\r\n",
    "bare CR in a header": b"GET / HTTP/1.1\r\nHost: %s\r\nX-A: a\rb\r\n\r\n",
    "NUL in a header value": b"GET / HTTP/1.1\r\nHost: %s\r\nX-A: a\x00b\r\n\r\n",
    "NUL in a header name": b"GET / HTTP/1.1\r\nHost: %s\r\nX\x00A: b\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost : %s\r\n\r\n",
    "two Host headers": b"GET / HTTP/1.1\r\nHost: %s\r\nHost: other\r\n\r\n",
    "no Host in HTTP/1.1": b"GET / HTTP/1.1\r\nX-Host: %s\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(AMBIGUOUS))
async def test_ambiguous_framing_is_rejected_and_closed(
    case: str, one_backend: tuple[Registry, int]
) -> None:
    registry, _ = one_backend
    async with running_proxy(registry) as (proxy, url):
        data = AMBIGUOUS[case] % HOST.encode()
        answer = await exchange_raw(url, data + b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % b"x")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert answer.count(b"HTTP/1.1") == 1  # nothing after the 400: the connection was closed
    assert b"Traceback" not in answer
    if "chunk size" not in case:  # a bad chunk is found after the head went on its way
        assert proxy.count("web").requests == 0


async def test_oversized_head_gets_431(one_backend: tuple[Registry, int]) -> None:
    registry, _ = one_backend
    async with running_proxy(registry, max_header_size=4096) as (_, url):
        big = b"GET / HTTP/1.1\r\nHost: %s\r\nX-Big: %s\r\n\r\n" % (HOST.encode(), b"a" * 8000)
        assert (await exchange_raw(url, big)).startswith(b"HTTP/1.1 431 ")
        many = b"".join(b"X-%d: %s\r\n" % (i, b"b" * 100) for i in range(100))
        answer = await exchange_raw(url, b"GET / HTTP/1.1\r\nHost: h\r\n" + many + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431 ")


async def test_slow_head_gets_408_and_idle_connection_closes(
    one_backend: tuple[Registry, int],
) -> None:
    registry, _ = one_backend
    async with running_proxy(registry, header_timeout=0.3, idle_timeout=0.3) as (_, url):
        answer = await exchange_raw(url, b"GET / HTTP/1.1\r\nHost: ", wait=3)
        assert answer.startswith(b"HTTP/1.1 408 ")
        answer = await exchange_raw(url, b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % HOST.encode(), 3)
        assert answer.startswith(b"HTTP/1.1 200 ")  # then closed after idle_timeout


async def test_pipelined_requests_answered_in_order(one_backend: tuple[Registry, int]) -> None:
    registry, _ = one_backend
    async with running_proxy(registry) as (_, url):
        one = b"GET /status?code=%d HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n\r\n"
        data = b"".join(one % code for code in (201, 202, 203))
        data += b"GET / HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nConnection: close\r\n\r\n"
        answer = await exchange_raw(url, data)
    codes = re.findall(rb"HTTP/1.1 (\d{3}) ", answer)
    assert codes == [b"201", b"202", b"203", b"200"]


async def test_a_long_pipeline_is_read_in_steps_and_fully_answered(
    one_backend: tuple[Registry, int],
) -> None:
    """Far more pipelined requests than the proxy queues at once: reading pauses and resumes,
    and every request is answered, in order."""
    registry, _ = one_backend
    async with running_proxy(registry) as (_, url):
        one = b"GET /status?code=%d HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n\r\n"
        codes_sent = [200 + i % 50 for i in range(150)]
        data = b"".join(one % code for code in codes_sent)
        data += b"GET / HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nConnection: close\r\n\r\n"
        answer = await exchange_raw(url, data)
    codes = [int(c) for c in re.findall(rb"HTTP/1.1 (\d{3}) ", answer)]
    assert codes == [*codes_sent, 200]


async def test_backend_response_timeout_is_504() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(5)

    registry = Registry()
    async with raw_backend(silent) as port:
        registry.apply([Upsert(endpoint(port))])
        async with running_proxy(registry, response_timeout=0.3) as (proxy, url):
            answer = await exchange_raw(url, b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % HOST.encode())
    assert answer.startswith(b"HTTP/1.1 504 ")
    assert proxy.count("web").errors == 1


async def test_keep_alive_race_is_retried_on_a_fresh_connection() -> None:
    """The backend answers one request per connection but says keep-alive, then closes: the
    pooled connection is dead when reused, and every idempotent request must still succeed."""
    served = 0

    async def one_shot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # Close without reading the next request: a reused connection sees EOF or a reset.
        await asyncio.sleep(0.05)

    registry = Registry()
    async with raw_backend(one_shot) as port:
        registry.apply([Upsert(endpoint(port))])
        async with running_proxy(registry) as (proxy, url):
            connector = aiohttp.TCPConnector(limit=1)
            async with aiohttp.ClientSession(connector=connector) as http:
                for i in range(10):
                    async with http.put(url + "/", data=b"body", headers={"Host": HOST}) as resp:
                        assert resp.status == 200, i
                        assert await resp.read() == b"ok"
                        await asyncio.sleep(0.01 if i % 2 else 0.1)
    assert served == 10
    assert proxy.count("web").retries >= 1  # the race did happen and was retried


async def test_connection_failure_moves_to_another_endpoint() -> None:
    registry = Registry()
    dead = free_port()  # nothing listens here
    async with serve_app(whoami_app("alive")) as port:
        registry.apply([Upsert(endpoint(dead, 1)), Upsert(endpoint(port, 2))])
        async with running_proxy(registry, balance="round_robin") as (proxy, url):
            async with aiohttp.ClientSession() as http:
                for _ in range(6):
                    async with http.post(url + "/", data=b"x", headers={"Host": HOST}) as resp:
                        assert await resp.text() == "alive"
        assert proxy.count("web").retries >= 3


async def test_idempotent_request_retried_when_backend_resets_before_answering() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    registry = Registry()
    async with raw_backend(reset) as bad, serve_app(whoami_app("good")) as good:
        registry.apply([Upsert(endpoint(bad, 1)), Upsert(endpoint(good, 2))])
        async with running_proxy(registry, balance="round_robin") as (_, url):
            async with aiohttp.ClientSession() as http:
                for _ in range(4):
                    async with http.get(url + "/", headers={"Host": HOST}) as resp:
                        assert await resp.text() == "good"
                # POST is not idempotent: a reset after it was sent is a 502, not a retry.
                statuses = set()
                for _ in range(4):
                    async with http.post(url + "/", data=b"x", headers={"Host": HOST}) as resp:
                        statuses.add(resp.status)
                assert statuses == {200, 502}


async def test_hold_then_503_with_retry_after() -> None:
    registry = Registry()
    async with running_proxy(registry, hold_timeout=0.5) as (proxy, url):
        registry.apply([Upsert(endpoint(free_port(), 1))])
        assert proxy.dispatcher.route(HOST.encode()) == "web"  # the proxy saw the service
        registry.apply([Remove(f"{1:064x}")])  # a service the proxy saw, now with no endpoint
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/", headers={"Host": HOST}) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
        assert 0.45 < loop.time() - started < 3
        assert proxy.count("web").holds == 1


async def test_held_request_served_when_an_endpoint_becomes_ready() -> None:
    registry = Registry()
    async with serve_app(whoami_app("late")) as port, running_proxy(registry) as (proxy, url):
        registry.apply([Upsert(endpoint(port, 1)), Drain(f"{1:064x}")])  # known, not ready
        async with aiohttp.ClientSession() as http:
            request = asyncio.get_running_loop().create_task(
                http.get(url + "/", headers={"Host": HOST})
            )
            await eventually(lambda: bool(proxy.dispatcher.waiters.get("web")))
            assert not request.done()
            registry.apply([Upsert(endpoint(port, 2))])
            async with asyncio.timeout(5):
                resp = await request
            assert await resp.text() == "late"
            resp.release()


async def test_draining_endpoint_gets_no_new_requests() -> None:
    registry = Registry()
    async with serve_app(whoami_app("a")) as a, serve_app(whoami_app("b")) as b:
        registry.apply([Upsert(endpoint(a, 1)), Upsert(endpoint(b, 2)), Drain(f"{1:064x}")])
        async with running_proxy(registry) as (_, url), aiohttp.ClientSession() as http:
            for _ in range(10):
                async with http.get(url + "/", headers={"Host": HOST}) as resp:
                    assert await resp.text() == "b"


async def test_sticky_cookie_pins_a_client() -> None:
    registry = Registry()
    async with serve_app(whoami_app("a")) as a, serve_app(whoami_app("b")) as b:
        registry.apply([Upsert(endpoint(a, 1)), Upsert(endpoint(b, 2))])
        async with running_proxy(registry, sticky_cookie="snsticky", balance="round_robin") as (
            _,
            url,
        ):
            async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
                seen = set()
                for _ in range(6):
                    async with http.get(url + "/", headers={"Host": HOST}) as resp:
                        seen.add(await resp.text())
                assert len(seen) == 1


async def test_outcomes_reach_the_health_hook() -> None:
    outcomes: list[tuple[str, bool, str]] = []
    registry = Registry()
    async with serve_app(whoami_app("a")) as port:
        registry.apply([Upsert(endpoint(port, 1)), Upsert(endpoint(free_port(), 2))])
        config = dataclasses.replace(
            ProxyConfig(), listen=f"127.0.0.1:{free_port()}", balance="round_robin"
        )
        hook = lambda ep, ok, why: outcomes.append((ep.name, ok, why))  # noqa: E731
        async with Proxy(registry, config, report=hook) as proxy:
            url = "http://{}:{}".format(*proxy.bound[0])
            async with aiohttp.ClientSession() as http:
                for path in ("/", "/", "/status?code=503"):
                    async with http.get(url + path, headers={"Host": HOST}) as resp:
                        await resp.read()
    assert ("web-1", True, "ok") in outcomes
    assert any(name == "web-2" and not ok and "connect" in why for name, ok, why in outcomes)
    assert ("web-1", False, "HTTP 503") in outcomes


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A plain TCP backend that sends back what it reads."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def test_dedicated_tcp_listener() -> None:
    registry = Registry()
    port = free_port()
    async with raw_backend(echo) as backend:
        registry.apply([Upsert(endpoint(backend, 1, service="redis"))])
        async with running_proxy(registry, listeners=(f"redis=tcp:127.0.0.1:{port}",)):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PING\r\n" * 1000)
            got = await asyncio.wait_for(reader.readexactly(6000), 5)
            writer.close()
    assert got == b"PING\r\n" * 1000


async def test_label_declared_tcp_listener_opens_outlives_a_restart_and_closes() -> None:
    """stablenet.proxy.listen on a container opens a dedicated listener; while the container
    is away (restarting) the listener stays and holds the connection; the listener is closed
    once no container declares it any more (here with no memory, to see it close)."""

    registry = Registry()
    port = free_port()
    declared = endpoint(0, 1, service="cache", listeners=(f"tcp:127.0.0.1:{port}",))
    async with raw_backend(echo) as backend:
        async with running_proxy(registry, hold_timeout=10.0) as (proxy, _):
            registry.apply([Upsert(dataclasses.replace(declared, port=backend))])
            await proxy.sync_listeners()
            assert ("127.0.0.1", port) in proxy.bound
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"one")
            assert await asyncio.wait_for(reader.readexactly(3), 5) == b"one"
            writer.close()
            # The container restarts: gone from the registry, the listener stays and holds.
            registry.apply([Remove(declared.id)])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"two")
            registry.apply([Upsert(dataclasses.replace(declared, port=backend, started_at=2.0))])
            assert await asyncio.wait_for(reader.readexactly(3), 5) == b"two"
            writer.close()
            assert proxy.stable_addresses() == {"cache": ("127.0.0.1",)}
            # No container declares it any more and the memory has run out: closed.
            registry.apply([Remove(declared.id)])
            proxy._dynamic_seen.clear()
            registry.apply([Upsert(endpoint(backend, 2, service="other"))])
            await proxy.sync_listeners()
            assert not proxy._dynamic
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
