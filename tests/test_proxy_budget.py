"""The connection budget on real sockets: a flood from one loopback source is held to its share
(idle keep-alive connections closed first, then new ones refused) while other sources are
served; the proxy's TCP listeners count in the same budget; and `stablenet run` under a small
descriptor limit keeps serving a well-behaved client and the admin API through a flood larger
than that limit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from stablenet.metrics import Collector, exposition
from stablenet.model import Upsert
from stablenet.proxy.budget import Limits
from stablenet.registry import Registry
from tests.helpers import Containers, free_port, off_loop
from tests.test_cli import start_daemon, stop_daemon, wait_for_line
from tests.test_metrics import samples
from tests.test_proxy_http import HOST, endpoint, running_proxy, serve_app, whoami_app

WAIT = 10.0  # seconds any one step may take


@dataclass
class Client:
    """One raw client connection from a chosen loopback source address."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        return cls(reader, writer)

    async def get(self, host: str = HOST) -> tuple[int, bytes]:
        """A keep-alive GET and its whole response: afterwards the connection is idle."""
        self.writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        async with asyncio.timeout(WAIT):
            head = await self.reader.readuntil(b"\r\n\r\n")
            fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
            body = await self.reader.readexactly(int(fields[b"Content-Length"]))
        return int(head.split()[1]), body

    async def start_upload(self) -> None:
        """A POST that waits for 100 Continue and sends no body: busy from then on."""
        self.writer.write(
            f"POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        async with asyncio.timeout(WAIT):
            assert (await self.reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100")

    async def closed_by_proxy(self) -> bool:
        """True once the proxy closed or reset the connection (False: it sent bytes)."""
        async with asyncio.timeout(WAIT):
            try:
                return await self.reader.read(1) == b""
            except ConnectionResetError:
                return True

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def clients() -> AsyncIterator[list[Client]]:
    opened: list[Client] = []
    try:
        yield opened
    finally:
        for client in opened:
            client.close()


async def test_a_flood_from_one_source_gives_way_while_other_sources_are_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = Registry()
    tcp = f"web=tcp:127.0.0.1:{free_port()}"
    options = {"max_connections": 6, "max_connections_per_source": 4, "listeners": (tcp,)}
    async with (
        serve_app(whoami_app("one")) as backend,
        running_proxy(registry, **options) as (proxy, _),
        clients() as opened,
    ):
        registry.apply([Upsert(endpoint(backend))])
        port, tcp_port = proxy.bound[0][1], proxy.bound[1][1]

        async def connect(source: str, on: int = port) -> Client:
            opened.append(await Client.open(on, source))
            return opened[-1]

        # 127.0.0.1 fills its share: two idle keep-alive connections, two busy uploads.
        idle = [await connect("127.0.0.1") for _ in range(2)]
        for client in idle:
            assert await client.get() == (200, b"one")
        for _ in range(2):
            await (await connect("127.0.0.1")).start_upload()
        # Past its share, its connections idle longest are closed, oldest first ...
        await (await connect("127.0.0.1")).start_upload()
        assert await idle[0].closed_by_proxy()
        await (await connect("127.0.0.1")).start_upload()
        assert await idle[1].closed_by_proxy()
        # ... and with none idle, new ones are refused, on the TCP listener too.
        assert await (await connect("127.0.0.1")).closed_by_proxy()
        assert await (await connect("127.0.0.1", tcp_port)).closed_by_proxy()

        # Another source is served.
        polite = await connect("127.0.0.2")
        assert await polite.get() == (200, b"one")
        await (await connect("127.0.0.3")).start_upload()  # 6 of 6 connections now
        # All sources at max_connections: the connection idle longest gives way, whoever's ...
        await (await connect("127.0.0.4")).start_upload()
        assert await polite.closed_by_proxy()
        # ... and with none idle, a new source is refused.
        assert await (await connect("127.0.0.5")).closed_by_proxy()

        values = samples(exposition(Collector(registry, proxy=proxy)).decode())
        assert values[("stablenet_proxy_connections", ())] == 6
        rejected = "stablenet_proxy_connections_rejected_total"
        assert values[(rejected, (("reason", "max_connections_per_source"),))] == 2
        assert values[(rejected, (("reason", "max_connections"),))] == 1
        closed = "stablenet_proxy_connections_closed_idle_total"
        assert values[(closed, (("reason", "max_connections_per_source"),))] == 2
        assert values[(closed, (("reason", "max_connections"),))] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # the first at once; the rest within 10 s are counted for later
    assert warnings[0].startswith("proxy connection limit reached: refused none; closed idle 1")


def descriptor_limits(soft: int, hard: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_run_under_a_small_descriptor_limit_serves_through_a_larger_flood(
    containers: Containers,
) -> None:
    # A soft limit of 128 that stablenet raises to the hard one, 300; a flood of 400. The
    # flood's silent connections are not timed out while the test runs.
    daemon = await start_daemon(
        env={"STABLENET_DNS_ENABLED": "false", "STABLENET_PROXY_HEADER_TIMEOUT": "5m"},
        serving=True,
        preexec_fn=lambda: descriptor_limits(128, 300),
    )
    proxy_port = daemon.proxy_port
    share = Limits.derive(0, 0, 300).per_source
    service = containers.name("budget")
    try:
        await off_loop(containers.run, "web", labels={"stablenet.service": service})
        await wait_for_line(daemon.proc, f"added to service {service}", daemon.log)
        started = "".join(daemon.log)
        assert "descriptor limit (RLIMIT_NOFILE) raised from 128 to 300" in started
        assert f"{share} per source address (descriptor limit 300)" in started
        async with clients() as flood:
            for _ in range(share):  # idle keep-alive connections (404: no such service)
                flood.append(await Client.open(proxy_port))
                assert (await flood[-1].get("nothing.example"))[0] == 404
            for n in range(400):
                flood.append(await Client.open(proxy_port))
                if n < share:  # each closes the flood's connection idle longest
                    assert await flood[n].closed_by_proxy()
                else:  # then, with none idle, each is refused
                    assert await flood[-1].closed_by_proxy()
            polite = await Client.open(proxy_port, "127.0.0.2")
            status, body = await polite.get(f"{service}.stablenet.internal")
            polite.close()
            assert (status, body) == (200, b"ok\n")
            async with aiohttp.ClientSession() as http, asyncio.timeout(WAIT):
                async with http.get(daemon.admin + "/healthz") as resp:
                    assert resp.status == 200
                async with http.get(daemon.admin + "/metrics") as resp:
                    values = samples(await resp.text())
        rejected = ("reason", "max_connections_per_source")
        assert values[("stablenet_proxy_connections_rejected_total", (rejected,))] == 400 - share
        assert values[("stablenet_proxy_connections_closed_idle_total", (rejected,))] == share
    finally:
        await stop_daemon(daemon)
    assert "proxy connection limit reached" in "".join(daemon.log)
    assert "Traceback" not in "".join(daemon.log), "".join(daemon.log)
