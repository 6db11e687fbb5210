"""The Docker source: list + inspect at start, then the events stream, a periodic resync, and
reconnect with capped backoff, all turned into registry changes.

The docker SDK is synchronous, so every call runs in a small thread pool and the event stream is
read by a dedicated thread that hands events to the loop; the loop never blocks on Docker. While
the engine is gone the registry keeps its last state and is marked not synced."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.constants import MINIMUM_DOCKER_API_VERSION
from docker.utils import kwargs_from_env

from stablenet.docker.translate import (
    Action,
    LabelError,
    Settings,
    classify,
    container_name,
    endpoint_from_inspect,
    event_time,
    is_stop_signal,
)
from stablenet.model import Change, Drain, Endpoint, Problem, Remove, Resync, SetSynced, Upsert
from stablenet.registry import Registry

logger = logging.getLogger(__name__)

T = TypeVar("T")
_BACKOFF_FIRST = 0.25
_BACKOFF_CAP = 5.0
_API_TIMEOUT = 15
_CONNECTION_ERRORS = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
    OSError,
)


class DockerLost(Exception):
    """The connection to the engine broke; the session ends and a reconnect follows."""


@dataclass(slots=True)
class SourceStats:
    """Counters the admin API and metrics read."""

    resyncs: int = 0
    reconnects: int = 0
    last_resync_seconds: float = 0.0
    last_error: str = ""
    last_event_lag: float = 0.0  # seconds from the last event's timestamp to its registry update
    handled_by_action: dict[str, int] = field(default_factory=dict)


def default_client(base_url: str | None = None) -> docker.APIClient:
    """An API client configured the way Docker's own tools are (DOCKER_HOST, TLS variables),
    speaking the engine's API version. Closes its probe connection even when the engine is
    unreachable (the SDK's own version="auto" leaks it)."""
    kwargs: dict[str, Any] = dict(kwargs_from_env())
    if base_url is not None:
        kwargs["base_url"] = base_url
    _preflight(str(kwargs.get("base_url") or "unix:///var/run/docker.sock"))
    probe = docker.APIClient(version=MINIMUM_DOCKER_API_VERSION, timeout=_API_TIMEOUT, **kwargs)
    try:
        version = str(probe.version(api_version=False)["ApiVersion"])
    finally:
        probe.close()
    return docker.APIClient(version=version, timeout=_API_TIMEOUT, **kwargs)


def _preflight(url: str) -> None:
    """Fail fast, with a plain message, when a unix socket cannot be connected (the SDK would
    leak a socket on each such attempt)."""
    if not url.startswith(("unix://", "http+unix://")):
        return
    path = url.split("://", 1)[1]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(_API_TIMEOUT)
        try:
            sock.connect(path)
        except OSError as exc:
            raise DockerLost(f"cannot connect to {url}: {exc.strerror or exc}") from None


class DockerSource:
    """Keeps the registry equal to the running containers of one Docker Engine."""

    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        resync_interval: float = 30.0,
        client_factory: Callable[[], docker.APIClient] = default_client,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._resync_interval = resync_interval
        self._client_factory = client_factory
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="docker")
        self._touched: set[str] | None = None  # ids seen in events while a resync lists
        self._resync_lock = asyncio.Lock()
        self.stats = SourceStats()

    async def run(self) -> None:
        """Connect, sync, follow events; on any loss keep the last state and reconnect."""
        backoff = _BACKOFF_FIRST
        warned = False
        try:
            while True:
                try:
                    await self._session()
                except Exception as exc:  # any failure ends the session; the loop reconnects
                    cause = _unwrap(exc)
                    self.stats.last_error = _describe(cause)
                    if not isinstance(cause, _CONNECTION_ERRORS + (DockerLost,)):
                        logger.error("Docker source failed; reconnecting", exc_info=cause)
                was_synced = self._registry.snapshot.synced
                self._registry.apply([SetSynced(False)])
                if was_synced:
                    logger.warning(
                        "Docker Engine lost (%s); serving the last known state of %d endpoints "
                        "and reconnecting",
                        self.stats.last_error,
                        len(self._registry.snapshot.endpoints),
                    )
                    backoff = _BACKOFF_FIRST
                elif not warned:
                    logger.warning(
                        "Docker Engine unreachable (%s); retrying every %gs at most",
                        self.stats.last_error,
                        _BACKOFF_CAP,
                    )
                warned = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_CAP)
                self.stats.reconnects += 1
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    async def _session(self) -> None:
        client = await self._call(self._client_factory)
        stream: Any = None
        try:
            # Subscribe before listing so nothing between the two is missed.
            stream = await self._call(
                lambda: client.events(decode=True, filters={"type": ["container", "network"]})
            )
            queue: asyncio.Queue[Mapping[str, Any] | BaseException] = asyncio.Queue()
            reader = threading.Thread(
                target=_read_events,
                args=(stream, asyncio.get_running_loop(), queue),
                name="docker-events",
                daemon=True,
            )
            reader.start()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._consume(client, queue), name="docker-events")
                await self.resync(client)
                self._registry.apply([SetSynced(True)])
                logger.info(
                    "Docker Engine connected; synced %d endpoints in %.3fs",
                    len(self._registry.snapshot.endpoints),
                    self.stats.last_resync_seconds,
                )
                tasks.create_task(self._resync_loop(client), name="docker-resync")
        finally:
            if stream is not None:
                await self._call(_close_quietly, stream)
            await self._call(_close_quietly, client)

    async def _resync_loop(self, client: docker.APIClient) -> None:
        while True:
            await asyncio.sleep(self._resync_interval)
            await self.resync(client)

    async def resync(self, client: docker.APIClient) -> None:
        """List every running container, inspect each, and replace the registry's contents.
        Containers that events touched meanwhile keep their event-driven entry."""
        async with self._resync_lock:
            began = time.monotonic()
            self._touched = set()
            try:
                listed = await self._call(lambda: client.containers(quiet=True))
                ids = [str(item["Id"]) for item in listed]
                inspects = await asyncio.gather(*(self._inspect(client, cid) for cid in ids))
                endpoints: list[Endpoint] = []
                problems: dict[str, str] = {}
                for cid, inspect in zip(ids, inspects, strict=True):
                    match self._translate(cid, inspect):
                        case Upsert(endpoint=ep):
                            endpoints.append(ep)
                        case Problem(message=str(message)):
                            problems[cid] = message
                keep = frozenset(self._touched)
            finally:
                self._touched = None
            self._registry.apply([Resync(tuple(endpoints), keep=keep, problems=problems)])
            self.stats.resyncs += 1
            self.stats.last_resync_seconds = time.monotonic() - began

    async def _inspect(self, client: docker.APIClient, cid: str) -> Mapping[str, Any] | None:
        try:
            result: Mapping[str, Any] = await self._call(client.inspect_container, cid)
            return result
        except docker.errors.NotFound:
            return None

    async def _consume(
        self,
        client: docker.APIClient,
        queue: asyncio.Queue[Mapping[str, Any] | BaseException],
    ) -> None:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise DockerLost(_describe(item))
            await self.handle_event(client, item)

    async def handle_event(self, client: docker.APIClient, event: Mapping[str, Any]) -> None:
        """Apply one Docker event: drain or remove at once, or inspect just that container."""
        what = classify(event)
        if what is None:
            return
        action, cid = what
        self.stats.handled_by_action[action.value] = (
            self.stats.handled_by_action.get(action.value, 0) + 1
        )
        if self._touched is not None:
            self._touched.add(cid)
        at = event_time(event) or None
        if action is Action.SIGNAL:
            ep = self._registry.snapshot.endpoints.get(cid)
            if ep is not None and is_stop_signal(event, ep.stop_signal):
                self._registry.apply([Drain(cid, at)])
        elif action is Action.DRAIN:
            self._registry.apply([Drain(cid, at)])
        elif action is Action.REMOVE:
            self._registry.apply([Remove(cid, at)])
        else:
            inspect = await self._inspect(client, cid)
            if self._touched is not None:
                self._touched.add(cid)
            self._registry.apply([self._translate(cid, inspect)])
        if at is not None:
            self.stats.last_event_lag = max(0.0, time.time() - at)

    def _translate(self, cid: str, inspect: Mapping[str, Any] | None) -> Change:
        if inspect is None:
            return Remove(cid)
        try:
            ep = endpoint_from_inspect(inspect, self._settings)
        except LabelError as exc:
            if self._registry.snapshot.problems.get(cid) != str(exc):
                logger.warning("%s; skipping it", exc)
            return Problem(cid, str(exc))
        except Exception as exc:  # odd JSON must not stop the events or the resync
            message = _unreadable(inspect, exc)
            logger.warning("%s; skipping it", message, exc_info=True)
            return Problem(cid, message)
        if ep is None:
            logger.debug("container %s provides no endpoint", container_name(inspect))
            return Remove(cid)
        return Upsert(ep)


def _read_events(
    stream: Any,
    loop: asyncio.AbstractEventLoop,
    queue: asyncio.Queue[Mapping[str, Any] | BaseException],
) -> None:
    """Thread body: forward decoded events to the loop until the stream ends or breaks."""
    error: BaseException
    try:
        for event in stream:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        error = DockerLost("the events stream ended")
    except Exception as exc:  # the stream breaks in many ways; every one means "lost"
        error = exc
    try:
        loop.call_soon_threadsafe(queue.put_nowait, error)
    except RuntimeError:  # the loop is closed: the daemon is shutting down
        pass


def _close_quietly(closable: Any) -> None:
    try:
        closable.close()
    except Exception:  # closing a broken connection may fail; nothing to do about it
        logger.debug("close failed", exc_info=True)


def _unreadable(inspect: Mapping[str, Any], exc: Exception) -> str:
    try:
        name = container_name(inspect)
    except Exception:  # the name itself may be what is broken
        name = "?"
    return f"container {name}: cannot read its inspect data ({type(exc).__name__}: {exc})"


def _unwrap(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from a TaskGroup."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
