"""The HTTP proxy against hostile clients and lying or crashing backends, on loopback: request
smuggling through Upgrade and CONNECT, a POST that must not run twice, a request that crashes
every backend it reaches, responses cut short, long pipelines, bugs of our own, clients that
close or stop reading, and framing a strict proxy refuses. Backends are raw asyncio servers that
record what they execute, so each test checks what reached the backend, not only the answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from stablenet.model import Endpoint, Upsert
from stablenet.registry import Registry, Snapshot
from tests.test_proxy_http import HOST, endpoint, eventually, exchange_raw, running_proxy

Handler = Callable[["Backend", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


@dataclass
class Request:
    line: bytes
    headers: dict[bytes, bytes]
    body: bytes
    raw: bytes  # the head as the backend read it


@dataclass
class Backend:
    """A raw HTTP/1.1 backend that logs every request it reads (in order, with the number of
    the request on its connection) and lets the test decide how each is answered."""

    port: int = 0
    seen: list[tuple[Request, int]] = field(default_factory=list)

    def paths(self) -> list[bytes]:
        return [req.line.split(b" ")[1] for req, _ in self.seen]


async def read_request(reader: asyncio.StreamReader) -> Request:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if b"content-length" in headers:
        body = await reader.readexactly(int(headers[b"content-length"]))
    return Request(lines[0], headers, body, head)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def answer_ok(
    backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
) -> bool:
    writer.write(OK)
    return True


@contextlib.asynccontextmanager
async def backend(handler: Handler = answer_ok) -> AsyncIterator[Backend]:
    """Serve requests on keep-alive connections until the handler returns False."""
    state = Backend()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        try:
            while True:
                req = await read_request(reader)
                n += 1
                state.seen.append((req, n))
                if not await handler(state, reader, writer, n):
                    break
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    state.port = int(server.sockets[0].getsockname()[1])
    try:
        yield state
    finally:
        server.close()


async def send_raw(url: str, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    return reader, writer


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


async def read_answers(
    reader: asyncio.StreamReader, got: bytes, status: bytes, count: int
) -> bytes:
    """Read on until ``count`` responses with ``status`` have arrived (the connection must not
    close before); returns everything read."""
    while got.count(b"HTTP/1.1 %b " % status) < count:
        chunk = await reader.read(1 << 20)
        assert chunk, f"closed after {got.count(b'HTTP/1.1 %b ' % status)} answers"
        got += chunk
    return got


def one_service(*backends: Backend) -> Registry:
    registry = Registry()
    registry.apply([Upsert(endpoint(b.port, n + 1)) for n, b in enumerate(backends)])
    return registry


# -- 1. request smuggling through Upgrade and CONNECT -------------------------------------------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nX-Forwarded-For: 6.6.6.6\r\nX-Padding: "


@pytest.mark.parametrize(
    "attack",
    [
        b"GET /attack HTTP/1.1\r\nHost: %b\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        % HOST.encode(),
        b"CONNECT %b:80 HTTP/1.1\r\nHost: %b\r\n\r\n" % (HOST.encode(), HOST.encode()),
    ],
    ids=["upgrade", "connect"],
)
async def test_bytes_after_a_declined_switch_never_reach_another_clients_request(
    attack: bytes,
) -> None:
    async with backend() as be:
        async with running_proxy(one_service(be), upstream_keepalive=4) as (_, url):
            attacker_r, attacker_w = await send_raw(url, attack + SMUGGLED)
            attacker_answer = await asyncio.wait_for(attacker_r.read(-1), 5)
            attacker_w.close()
            victim = b"GET /victim HTTP/1.1\r\nHost: %b\r\nCookie: session=secret\r\n\r\n"
            reader, writer = await send_raw(url, victim % HOST.encode())
            head, body = await asyncio.wait_for(read_response(reader), 5)
            writer.close()
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"ok"
    assert b"/smuggled" not in b"".join(req.raw for req, _ in be.seen)
    assert b"6.6.6.6" not in b"".join(req.raw for req, _ in be.seen)
    victims = [req for req, _ in be.seen if req.line.startswith(b"GET /victim ")]
    assert len(victims) == 1 and victims[0].headers[b"cookie"] == b"session=secret"
    if attack.startswith(b"CONNECT"):
        assert attacker_answer.startswith(b"HTTP/1.1 405 ")
        assert be.paths() == [b"/victim"]
    else:
        assert attacker_answer.startswith(b"HTTP/1.1 200 ")  # declined: an ordinary answer
        assert be.paths() == [b"/attack", b"/victim"]


async def test_bytes_sent_before_the_101_reach_the_backend_after_it() -> None:
    async def upgrade_then_echo(
        state: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
        )
        await writer.drain()
        writer.write(b"echo:" + await reader.readexactly(5))
        return False

    async with backend(upgrade_then_echo) as be:
        async with running_proxy(one_service(be)) as (_, url):
            request = b"GET / HTTP/1.1\r\nHost: %b\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"
            reader, writer = await send_raw(url, request % HOST.encode() + b"early")
            got = await asyncio.wait_for(reader.read(-1), 5)
            writer.close()
    assert got.startswith(b"HTTP/1.1 101 ") and got.endswith(b"echo:early")


# -- 2. a POST is never executed twice ---------------------------------------------------------


async def test_a_post_that_reached_a_backend_is_never_replayed() -> None:
    """The backend reads the POST on a reused keep-alive connection, executes it, and dies
    before answering: indistinguishable from the keep-alive race, so it must not be sent
    again, to this endpoint or another."""

    async def die_on_second(
        state: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        if n >= 2:
            writer.transport.abort()  # executed, then crashed before answering
            return False
        writer.write(OK)
        return True

    async with backend(die_on_second) as one, backend(die_on_second) as two:
        async with running_proxy(one_service(one, two), balance="round_robin") as (proxy, url):
            reader, writer = await send_raw(
                url, b"GET / HTTP/1.1\r\nHost: %b\r\n\r\n" % HOST.encode()
            )
            await read_response(reader)
            reader2, writer2 = await send_raw(
                url, b"GET / HTTP/1.1\r\nHost: %b\r\n\r\n" % HOST.encode()
            )
            await read_response(reader2)  # both endpoints now have a pooled connection
            post = b"POST /charge HTTP/1.1\r\nHost: %b\r\nContent-Length: 4\r\n\r\ncard"
            writer.write(post % HOST.encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.close()
            writer2.close()
    executed = [req for b in (one, two) for req, _ in b.seen if req.line.startswith(b"POST")]
    assert len(executed) == 1
    assert head.startswith(b"HTTP/1.1 502 ")
    assert proxy.count("web").retries == 0


# -- 3. one bad request cannot take a service down ---------------------------------------------


async def test_a_query_of_death_reaches_at_most_retries_plus_one_backends() -> None:
    async def crash_on_qod(
        state: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        if state.seen[-1][0].line.startswith(b"GET /qod "):
            writer.transport.abort()
            return False
        writer.write(OK)
        return True

    reports: list[tuple[str, bool]] = []

    def report(ep: Endpoint, ok: bool, reason: str) -> None:
        reports.append((ep.name, ok))

    async with (
        backend(crash_on_qod) as a,
        backend(crash_on_qod) as b,
        backend(crash_on_qod) as c,
    ):
        registry = one_service(a, b, c)
        async with running_proxy(registry, retries=2, hold_timeout=2.0) as (proxy, url):
            proxy.dispatcher.report = report
            qod = b"GET /qod HTTP/1.1\r\nHost: %b\r\n\r\n" % HOST.encode()
            answer = await exchange_raw(url, qod)
            normal = await exchange_raw(
                url, b"GET / HTTP/1.1\r\nHost: %b\r\nConnection: close\r\n\r\n" % HOST.encode()
            )
    reached = [p for be in (a, b, c) for p in be.paths() if p == b"/qod"]
    assert len(reached) == 3  # the first attempt and proxy.retries more, each elsewhere
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert normal.startswith(b"HTTP/1.1 200 ")
    assert [ok for _, ok in reports].count(False) == 1  # one request, one passive failure


# -- 4. a broken response stays broken ---------------------------------------------------------


async def test_a_reset_mid_body_is_not_passed_on_as_complete() -> None:
    forwarded = asyncio.Event()

    async def reset_mid_body(
        state: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npartial")  # close-delimited
        await writer.drain()
        await forwarded.wait()
        sock = writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()
        return False

    reports: list[bool] = []
    async with backend(reset_mid_body) as be:
        async with running_proxy(one_service(be)) as (proxy, url):
            proxy.dispatcher.report = lambda ep, ok, why: reports.append(ok)
            reader, writer = await send_raw(
                url, b"GET / HTTP/1.1\r\nHost: %b\r\n\r\n" % HOST.encode()
            )
            got = b""
            while b"partial" not in got:
                got += await asyncio.wait_for(reader.read(65536), 5)
            forwarded.set()
            with contextlib.suppress(ConnectionError):
                while chunk := await asyncio.wait_for(reader.read(65536), 5):
                    got += chunk
            writer.close()
    assert got.startswith(b"HTTP/1.1 200 ")
    assert not got.endswith(b"0\r\n\r\n")  # no terminating chunk: the client sees a cut
    assert reports == [False]
    assert proxy.count("web").errors == 1


# -- 5. pipelines and our own errors -------------------------------------------------------------


async def test_a_long_pipeline_behind_a_held_request_is_answered_in_full() -> None:
    """The first request is held (its only endpoint is draining), 2,000 answered locally
    (404) queue behind it; when the hold ends they must all be answered, not overflow the
    stack into a 400."""
    registry = Registry()
    registry.apply([Upsert(endpoint(1, draining=True))])
    async with running_proxy(registry, hold_timeout=0.2) as (_, url):
        n = 2000
        held = b"GET / HTTP/1.1\r\nHost: %b\r\n\r\n" % HOST.encode()
        reader, writer = await send_raw(url, held + b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n" * n)
        async with asyncio.timeout(10):
            got = await read_answers(reader, b"", b"404", n)
        writer.close()
    assert got.startswith(b"HTTP/1.1 503 ")
    assert b"HTTP/1.1 400 " not in got


class BrokenRegistry(Registry):
    """A registry whose snapshot read fails once ``broken`` is set: a stand-in for any bug of
    ours met while serving a request."""

    broken = False

    @property
    def snapshot(self) -> Snapshot:
        if self.broken:
            raise RuntimeError("a bug of ours")
        return self._snap

    @snapshot.setter
    def snapshot(self, snap: Snapshot) -> None:
        self._snap = snap


async def test_a_bug_of_ours_is_a_logged_500_not_a_400(caplog: pytest.LogCaptureFixture) -> None:
    async with backend() as be:
        registry = BrokenRegistry()
        registry.apply([Upsert(endpoint(be.port))])
        async with running_proxy(registry) as (proxy, url):
            registry.broken = True
            with caplog.at_level(logging.ERROR, logger="stablenet.proxy"):
                answer = await exchange_raw(
                    url, b"GET / HTTP/1.1\r\nHost: %b\r\n\r\n" % HOST.encode()
                )
            registry.broken = False
    assert answer.startswith(b"HTTP/1.1 500 ")
    assert proxy.dispatcher.internal_errors == 1
    assert proxy.count(None).bad_requests == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and errors[0].exc_info is not None
    assert "a bug of ours" in str(errors[0].exc_info[1])


# -- 6. a client that closes is let go at once -------------------------------------------------


async def test_a_client_that_closes_is_let_go_at_once() -> None:
    async with backend() as be:
        async with running_proxy(one_service(be), idle_timeout=60.0) as (proxy, url):
            reader, writer = await send_raw(
                url, b"GET / HTTP/1.1\r\nHost: %b\r\n\r\n" % HOST.encode()
            )
            await read_response(reader)
            writer.close()
            await eventually(lambda: not proxy.dispatcher.clients, within=2.0)
            # Half-closed with a request in flight: the answer still comes, then the close.
            reader, writer = await send_raw(
                url, b"GET / HTTP/1.1\r\nHost: %b\r\n\r\n" % HOST.encode()
            )
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(-1), 2)
            writer.close()
            await eventually(lambda: not proxy.dispatcher.clients, within=2.0)
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"ok")


# -- 7. a client that stops reading releases its backend ---------------------------------------


async def test_a_client_that_does_not_read_is_closed_and_its_backend_released() -> None:
    block = b"x" * 65536

    async def endless(
        state: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
        for _ in range(16384):  # 1 GiB at most, far more than any buffer on the way
            writer.write(block)
            await writer.drain()
        return False

    async with backend(endless) as be:
        async with running_proxy(one_service(be), send_timeout=0.5, response_timeout=30.0) as (
            proxy,
            url,
        ):
            host, _, port = url.removeprefix("http://").partition(":")
            sock = socket.create_connection((host, int(port)))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: %b\r\n\r\n" % HOST.encode())
            try:
                await eventually(lambda: proxy.count("web").slow_clients == 1, within=10.0)
                await eventually(
                    lambda: not proxy.dispatcher.clients and not proxy.dispatcher.upstreams,
                    within=5.0,
                )
            finally:
                sock.close()
    assert proxy.dispatcher.balancer.inflight == {}


# -- 8. framing a strict proxy refuses ---------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST / HTTP/1.0\r\nHost: H\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
        (b"GET / HTTP/2.0\r\nHost: H\r\n\r\n", 505),
        (b"GET nonsense HTTP/1.1\r\nHost: H\r\n\r\n", 400),
    ],
    ids=["te-in-1.0", "te-gzip", "te-gzip-chunked", "http2-line", "bad-target"],
)
async def test_strict_framing_is_refused_before_anything_reaches_a_backend(
    request_bytes: bytes, status: int
) -> None:
    async with backend() as be:
        async with running_proxy(one_service(be)) as (_, url):
            answer = await exchange_raw(
                url, request_bytes.replace(b"Host: H", b"Host: " + HOST.encode())
            )
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:80]
    assert b"Connection: close" in answer
    assert be.seen == []


async def test_absolute_form_is_routed_by_its_authority_and_sent_in_origin_form() -> None:
    async with backend() as web, backend() as other:
        registry = Registry()
        registry.apply([Upsert(endpoint(web.port, 1)), Upsert(endpoint(other.port, 2, "other"))])
        async with running_proxy(registry) as (_, url):
            request = (
                b"GET http://other.stablenet.internal/p?q=1 HTTP/1.1\r\nHost: %b\r\n"
                b"Connection: close\r\n\r\n" % HOST.encode()
            )
            answer = await exchange_raw(url, request)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert web.seen == []
    ((req, _),) = other.seen
    assert req.line == b"GET /p?q=1 HTTP/1.1"
    assert req.headers[b"host"] == b"other.stablenet.internal"


# -- found on review: pipelined HEAD, long pipelines, a half-closed upgrade -------------------


async def test_a_pipelined_head_never_hands_a_response_to_another_client() -> None:
    victim_sent = asyncio.Event()

    async def answer(
        state: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        req = state.seen[-1][0]
        if req.line.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            return True
        if req.line.startswith(b"GET /a "):
            await victim_sent.wait()  # the other client's request is out by now
        body = b"for " + req.line.split(b" ")[1]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        return True

    async with backend(answer) as be:
        async with running_proxy(one_service(be), upstream_keepalive=4) as (proxy, url):
            h = HOST.encode()
            pipelined = b"HEAD /h HTTP/1.1\r\nHost: %b\r\n\r\nGET /a HTTP/1.1\r\nHost: %b\r\n\r\n"
            r1, w1 = await send_raw(url, pipelined % (h, h))
            await eventually(lambda: proxy.count("web").requests == 2)
            r2, w2 = await send_raw(url, b"GET /victim HTTP/1.1\r\nHost: %b\r\n\r\n" % h)
            await eventually(lambda: proxy.count("web").requests == 3)
            victim_sent.set()
            _, victim_body = await asyncio.wait_for(read_response(r2), 5)
            head1 = await asyncio.wait_for(r1.readuntil(b"\r\n\r\n"), 5)
            _, body1 = await asyncio.wait_for(read_response(r1), 5)
            w1.close()
            w2.close()
    assert victim_body == b"for /victim"
    assert head1.startswith(b"HTTP/1.1 200 ") and body1 == b"for /a"


async def test_a_long_pipeline_arriving_in_large_reads_is_not_taken_for_a_huge_head() -> None:
    async with running_proxy(Registry(), max_header_size=1024) as (proxy, url):
        n = 500  # about 17 KiB, more than 4 x max_header_size, in as few reads as it takes
        reader, writer = await send_raw(
            url, b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n" * n + b"GET / HTTP/1.1\r\nHo"
        )
        async with asyncio.timeout(10):
            got = await read_answers(reader, b"", b"404", n)
            writer.write(b"st: nowhere\r\n\r\n")
            got = await read_answers(reader, got, b"404", n + 1)
        writer.close()
    assert proxy.count(None).bad_requests == 0


async def test_a_client_that_half_closes_before_the_101_half_closes_the_tunnel() -> None:
    client_closed = asyncio.Event()

    async def upgrade_then_read_to_eof(
        state: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> bool:
        await client_closed.wait()
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
        )
        writer.write(b"got:" + await reader.read(-1))  # until the client's EOF reaches us
        return False

    async with backend(upgrade_then_read_to_eof) as be:
        async with running_proxy(one_service(be)) as (proxy, url):
            request = b"GET / HTTP/1.1\r\nHost: %b\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"
            reader, writer = await send_raw(url, request % HOST.encode() + b"early")
            writer.write_eof()
            await eventually(lambda: any(c.client_eof for c in proxy.dispatcher.clients))
            client_closed.set()
            got = await asyncio.wait_for(reader.read(-1), 5)
            writer.close()
    assert got.startswith(b"HTTP/1.1 101 ") and got.endswith(b"got:early")
