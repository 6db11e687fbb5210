"""The controller's hands on the Docker Engine: list the managed containers, inspect, create a
replica, start, stop, restart, remove, and read events. The docker SDK is synchronous, so every
call runs in a thread pool of its own; the loop never blocks on Docker."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import docker
import docker.errors

from stablenet.controller.spec import is_managed
from stablenet.controller.template import ReplicaPlan
from stablenet.docker.source import close_quietly, read_events

T = TypeVar("T")
EventQueue = asyncio.Queue[Mapping[str, Any] | BaseException]


class Engine:
    """One connection to the engine for the controller's own calls."""

    def __init__(self, client: docker.APIClient) -> None:
        self.client = client
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="controller")
        self._stream: Any = None

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def managed(self) -> list[Mapping[str, Any]]:
        """Every container, running or not, that carries a controller label (one listing,
        filtered here: the engine's label filters cannot say "any of these")."""
        listed = await self.call(self.client.containers, all=True)
        return [item for item in listed if is_managed(item.get("Labels") or {})]

    async def inspect(self, cid: str) -> Mapping[str, Any] | None:
        try:
            result: Mapping[str, Any] = await self.call(self.client.inspect_container, cid)
            return result
        except docker.errors.NotFound:
            return None

    async def create(self, plan: ReplicaPlan, name: str) -> str:
        """Create (not start) a replica and attach its further networks."""
        created = await self.call(self.client.create_container_from_config, dict(plan.body), name)
        cid = str(created["Id"])
        for network, endpoint in plan.networks:
            await self.call(
                self.client.connect_container_to_network,
                cid,
                network,
                aliases=endpoint.get("Aliases"),
                links=endpoint.get("Links"),
                driver_opt=endpoint.get("DriverOpts"),
            )
        return cid

    async def start(self, cid: str) -> None:
        await self.call(self.client.start, cid)

    async def stop(self, cid: str, grace: float | None) -> None:
        """Stop with ``grace`` seconds before SIGKILL (None: the container's own timeout)."""
        if grace is None:
            await self.call(self.client.stop, cid)
        else:
            await self.call(self.client.stop, cid, timeout=int(grace))

    async def restart(self, cid: str, grace: float | None) -> None:
        if grace is None:
            await self.call(self.client.restart, cid)
        else:
            await self.call(self.client.restart, cid, timeout=int(grace))

    async def remove(self, cid: str) -> None:
        try:
            await self.call(self.client.remove_container, cid, force=True)
        except docker.errors.NotFound:
            pass

    async def past_events(self, since: float, until: float) -> list[Mapping[str, Any]]:
        """Container events the engine still keeps from ``since`` (whole seconds, so a few
        may come again: callers compare event times) to ``until``."""

        def read() -> list[Mapping[str, Any]]:
            stream = self.client.events(
                since=int(since), until=int(until) + 1, decode=True, filters={"type": ["container"]}
            )
            try:
                return list(stream)
            finally:
                close_quietly(stream)

        return await self.call(read)

    async def follow(self) -> EventQueue:
        """Subscribe to container events; they arrive on the returned queue, and a
        BaseException on it says the stream ended."""
        self._stream = await self.call(
            self.client.events, decode=True, filters={"type": ["container"]}
        )
        queue: EventQueue = asyncio.Queue()
        threading.Thread(
            target=read_events,
            args=(self._stream, asyncio.get_running_loop(), queue),
            name="controller-events",
            daemon=True,
        ).start()
        return queue

    async def close(self) -> None:
        if self._stream is not None:
            await self.call(close_quietly, self._stream)
        await self.call(close_quietly, self.client)
        self._pool.shutdown(wait=False, cancel_futures=True)
