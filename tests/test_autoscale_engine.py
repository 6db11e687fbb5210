"""Autoscaling against the real engine, through the real proxy, with short windows: a load step
raises the count and its end lowers it again, within min and max; a service scaled to zero keeps
its route, and its first request is held while a parked replica starts; nothing fails."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import docker
import docker.errors
import pytest

from stablenet.config import ControllerConfig, ProxyConfig
from stablenet.controller import Controller
from stablenet.proxy import Proxy
from stablenet.registry import Registry
from tests.helpers import Containers, free_port, off_loop

pytestmark = pytest.mark.engine

# A CGI that takes 300 ms: each request keeps one in flight for that long.
SLOW = [
    "sh",
    "-c",
    "printf '#!/bin/sh\\nsleep 0.3\\n"
    'printf "Content-Type: text/plain\\\\r\\\\n\\\\r\\\\nok\\\\n"\\n\''
    " > /www/cgi-bin/slow && chmod +x /www/cgi-bin/slow && exec httpd -f -p 80 -h /www",
]


@dataclasses.dataclass
class Stack:
    registry: Registry
    proxy: Proxy
    controller: Controller
    url: str

    async def settle(self, check: Callable[[Controller], object], within: float) -> None:
        try:
            async with asyncio.timeout(within):
                await self.controller.until(lambda c: bool(check(c)))
        except TimeoutError:
            raise AssertionError(
                f"not settled in {within}s: {self.controller.services()}"
            ) from None


@contextlib.asynccontextmanager
async def stack(registry: Registry, state: Path) -> AsyncIterator[Stack]:
    port = free_port()
    config = dataclasses.replace(ProxyConfig(), listen=f"127.0.0.1:{port}", hold_timeout=20.0)
    async with Proxy(registry, config) as proxy:
        ctl = Controller(
            registry,
            ControllerConfig(state_dir=str(state), drain_timeout=5.0),
            busy=proxy.in_flight,
            concurrency=proxy.concurrency,
            requests=lambda service: proxy.count(service).requests,
        )
        proxy.dispatcher.on_hold = ctl.demand
        ctl.prepare()
        task = asyncio.get_running_loop().create_task(ctl.run())
        try:
            async with asyncio.timeout(20):
                await ctl.until(lambda c: c.passes >= 1)
            yield Stack(registry, proxy, ctl, f"http://127.0.0.1:{port}")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def cleanup(client: docker.DockerClient, service: str) -> None:
    for box in client.containers.list(all=True, filters={"label": f"stablenet.service={service}"}):
        with contextlib.suppress(docker.errors.NotFound):
            box.remove(force=True)


def running(client: docker.DockerClient, service: str) -> int:
    return len(client.containers.list(filters={"label": f"stablenet.service={service}"}))


async def load(url: str, service: str, clients: int, seconds: float) -> tuple[int, list[str]]:
    """``clients`` loops of GET /cgi-bin/slow for ``seconds``: (answered 200, failures)."""
    ok, failures = 0, []
    deadline = time.monotonic() + seconds
    host = {"Host": f"{service}.stablenet.internal"}

    async def one(http: aiohttp.ClientSession) -> None:
        nonlocal ok
        while time.monotonic() < deadline:
            try:
                async with http.get(url + "/cgi-bin/slow", headers=host) as resp:
                    body = await resp.text()
                    if resp.status == 200 and body == "ok\n":
                        ok += 1
                    else:
                        failures.append(f"{resp.status} {body[:80]!r}")
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(*(one(http) for _ in range(clients)))
    return ok, failures


async def test_a_load_step_scales_up_and_its_end_scales_down(
    registry: Registry, containers: Containers, tmp_path: Path
) -> None:
    service = containers.name("auto")
    labels = {
        "stablenet.service": service,
        "stablenet.replicas.min": "1",
        "stablenet.replicas.max": "3",
        "stablenet.scale.target": "2",
        "stablenet.scale.window": "2s",
        "stablenet.scale.down_window": "3s",
    }
    try:
        async with stack(registry, tmp_path) as s:
            await off_loop(containers.run, "auto", labels=labels, command=SLOW)
            await s.settle(lambda c: c.status.get(service) and c.status[service].ready == 1, 30)
            # 8 clients of 300 ms requests: about 8 in flight, 4 replicas' worth; max is 3.
            ok, failures = await load(s.url, service, 8, 8.0)
            assert failures == []
            assert ok > 50
            peak = s.controller.status[service]
            assert peak.autoscale is not None and peak.autoscale["recommendation"] == 3
            assert await off_loop(running, containers.client, service) == 3
            ups = [k for k in s.controller.actions if k[:2] == (service, "scale_up")]
            assert ups, s.controller.actions
            steps_up = sum(s.controller.actions[k] for k in ups)
            # Quiet: back to the minimum after the windows, by parking, not removing.
            await s.settle(
                lambda c: c.status[service].ready == 1 and c.status[service].in_flight == 0, 40
            )
            assert await off_loop(running, containers.client, service) == 1
            everything = containers.client.containers.list(
                all=True, filters={"label": f"stablenet.service={service}"}
            )
            assert len(everything) == 3  # two parked, to start again faster than new ones
            # Each step down is one decision: not taken back while its replica drains.
            ups = [k for k in s.controller.actions if k[:2] == (service, "scale_up")]
            assert sum(s.controller.actions[k] for k in ups) == steps_up, s.controller.actions
            downs = [k for k in s.controller.actions if k[:2] == (service, "scale_down")]
            assert sum(s.controller.actions[k] for k in downs) == 2, s.controller.actions
    finally:
        await off_loop(cleanup, containers.client, service)


async def test_scale_to_zero_and_the_first_request_starts_a_parked_replica(
    registry: Registry, containers: Containers, tmp_path: Path
) -> None:
    service = containers.name("zero")
    labels = {
        "stablenet.service": service,
        "stablenet.replicas.min": "0",
        "stablenet.replicas.max": "3",
        "stablenet.scale.target": "5",
        "stablenet.scale.window": "1s",
        "stablenet.scale.idle": "2s",
    }
    try:
        async with stack(registry, tmp_path) as s:
            boxes = [
                await off_loop(containers.run, name, labels=labels, command=SLOW)
                for name in ("zero-a", "zero-b")
            ]
            await s.settle(lambda c: c.status.get(service) and c.status[service].ready == 2, 30)
            # Idle: every replica parked, the route and the proxy's front stay.
            await s.settle(
                lambda c: c.status[service].replicas == 0 and c.status[service].in_flight == 0, 30
            )
            assert registry.snapshot.services.get(service, ()) == ()
            assert registry.snapshot.fronted[service].parked
            for box in boxes:
                box.reload()
                assert box.status == "exited"
            began = time.monotonic()
            async with aiohttp.ClientSession() as http:
                async with http.get(
                    s.url + "/cgi-bin/slow", headers={"Host": f"{service}.stablenet.internal"}
                ) as resp:
                    assert resp.status == 200 and await resp.text() == "ok\n"
            cold = time.monotonic() - began
            assert cold < 10, cold
            # One request wants one replica: one parked one is started again (not a new one),
            # and the passes that run while it starts count it, so the other stays parked.
            await s.settle(
                lambda c: c.status[service].ready == 1 and c.status[service].in_flight == 0, 30
            )
            passes = s.controller.passes
            await s.settle(lambda c: c.passes >= passes + 3, 10)
            assert await off_loop(running, containers.client, service) == 1
            assert s.controller.status[service].replicas == 1
            everything = containers.client.containers.list(
                all=True, filters={"label": f"stablenet.service={service}"}
            )
            assert {c.id for c in everything} == {b.id for b in boxes}
            assert s.controller.actions[(service, "scale_down", "idle")] >= 1
    finally:
        await off_loop(cleanup, containers.client, service)
