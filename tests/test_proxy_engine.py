"""The proxy in front of real containers (busybox httpd) registered by a real DockerSource:
routing by Host, balancing across replicas, a request held across a restart, and a client inside
a container reaching a service through the fixed virtual address."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from stablenet.config import ProxyConfig
from stablenet.proxy import Proxy, vip
from stablenet.registry import Registry
from tests.helpers import Containers, free_port, off_loop, until

pytestmark = pytest.mark.engine


@contextlib.asynccontextmanager
async def proxy_on(registry: Registry, listen: str, **options: Any) -> AsyncIterator[Proxy]:
    config = dataclasses.replace(ProxyConfig(), listen=listen, **options)
    async with Proxy(registry, config) as proxy:
        yield proxy


async def ready_count(registry: Registry, service: str, count: int) -> None:
    await until(registry, lambda snap: len(snap.ready.get(service, ())) == count, 30)


async def test_routes_by_host_and_balances_across_replicas(
    registry: Registry, containers: Containers
) -> None:
    service = containers.name("web")
    for n in range(3):
        await off_loop(containers.run, f"web{n}", labels={"stablenet.service": service})
    await off_loop(
        containers.run,
        "shop",
        labels={"stablenet.service": containers.name("shop"), "stablenet.http.host": "shop.test"},
    )
    await ready_count(registry, service, 3)
    await ready_count(registry, containers.name("shop"), 1)
    port = free_port()
    async with proxy_on(registry, f"127.0.0.1:{port}"), aiohttp.ClientSession() as http:
        seen: dict[str, int] = {}
        for _ in range(30):
            async with http.get(
                f"http://127.0.0.1:{port}/cgi-bin/whoami",
                headers={"Host": f"{service}.stablenet.internal"},
            ) as resp:
                assert resp.status == 200
                name = (await resp.text()).strip()
                seen[name] = seen.get(name, 0) + 1
        assert len(seen) == 3, seen
        async with http.get(f"http://127.0.0.1:{port}/", headers={"Host": "shop.test"}) as resp:
            assert await resp.text() == "ok\n"


async def test_request_held_across_a_restart_succeeds(
    registry: Registry, containers: Containers
) -> None:
    service = containers.name("solo")
    container = await off_loop(containers.run, "solo", labels={"stablenet.service": service})
    await ready_count(registry, service, 1)
    port = free_port()
    async with proxy_on(registry, f"127.0.0.1:{port}", hold_timeout=20.0) as proxy:
        async with aiohttp.ClientSession() as http:
            async with http.get(
                f"http://127.0.0.1:{port}/", headers={"Host": f"{service}.stablenet.internal"}
            ) as resp:
                assert resp.status == 200
            await off_loop(container.stop, timeout=1)
            await ready_count(registry, service, 0)
            request = asyncio.get_running_loop().create_task(
                http.get(
                    f"http://127.0.0.1:{port}/healthz",
                    headers={"Host": f"{service}.stablenet.internal"},
                )
            )
            await asyncio.sleep(0.5)
            assert not request.done()  # held, not failed
            await off_loop(container.start)
            async with asyncio.timeout(25):
                resp = await request
            assert resp.status == 200
            assert await resp.text() == "healthy\n"
            resp.release()
        assert proxy.count(service).holds == 1


async def test_503_with_retry_after_when_nothing_comes_back(
    registry: Registry, containers: Containers
) -> None:
    service = containers.name("gone")
    container = await off_loop(containers.run, "gone", labels={"stablenet.service": service})
    await ready_count(registry, service, 1)
    port = free_port()
    async with proxy_on(registry, f"127.0.0.1:{port}", hold_timeout=1.0):
        await off_loop(container.stop, timeout=1)
        await ready_count(registry, service, 0)
        async with aiohttp.ClientSession() as http:
            async with http.get(
                f"http://127.0.0.1:{port}/", headers={"Host": f"{service}.stablenet.internal"}
            ) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"


async def test_client_in_a_container_reaches_the_virtual_address(
    registry: Registry, containers: Containers
) -> None:
    """The proxy adds a 169.254.x.y of its own to lo; a container reaches it via its gateway."""
    address = f"169.254.{200 + uuid.uuid4().int % 50}.{1 + uuid.uuid4().int % 250}"
    if await vip.is_local(address):
        pytest.fail(f"{address} is already local; the test needs an address of its own")
    service = containers.name("vipweb")
    await off_loop(containers.run, "vipweb", labels={"stablenet.service": service})
    await ready_count(registry, service, 1)
    port = free_port()
    async with proxy_on(registry, f"{address}:{port}"):
        assert await vip.is_local(address)  # checked before anything is sent to it
        request = (
            f"printf 'GET / HTTP/1.0\\r\\nHost: {service}.stablenet.internal\\r\\n\\r\\n'"
            f" | nc -w 3 {address} {port}"
        )
        client = await off_loop(
            containers.run,
            "vipclient",
            labels={"stablenet.enable": "false"},
            command=["sh", "-c", request],
        )
        result = await off_loop(client.wait, timeout=30)
        logs = (await off_loop(client.logs)).decode()
        assert result["StatusCode"] == 0, logs
        assert logs.startswith("HTTP/1.1 200 "), logs
        assert logs.endswith("ok\n")
    assert not await vip.is_local(address)  # removed on shutdown: it was added here
    out = await off_loop(
        subprocess.run, ["ip", "addr", "show", "dev", "lo"], capture_output=True, text=True
    )
    assert address not in out.stdout
