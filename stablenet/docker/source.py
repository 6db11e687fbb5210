"""The Docker source: list + inspect at start, then the events stream, a periodic resync, and
reconnect with capped backoff, all turned into registry changes.

The docker SDK is synchronous, so every call runs in a small thread pool and the event stream is
read by a dedicated thread that hands events to the loop; the loop never blocks on Docker. Events
never wait for an inspect: the order rules (which inspect result still counts, when a drain that
never ended is lifted) are in order.py. While the engine is gone the registry keeps its last
state and is marked not synced."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.constants import MINIMUM_DOCKER_API_VERSION
from docker.utils import kwargs_from_env

from stablenet.docker.order import DRAIN_MARGIN, EventOrder, stop_timeout
from stablenet.docker.translate import (
    Action,
    LabelError,
    Settings,
    classify,
    container_name,
    endpoint_from_inspect,
    event_signal,
    event_time,
)
from stablenet.model import (
    Change,
    Drain,
    Endpoint,
    Problem,
    Remove,
    Resync,
    SetSynced,
    Undrain,
    Upsert,
)
from stablenet.registry import Registry

logger = logging.getLogger(__name__)

T = TypeVar("T")
_BACKOFF_FIRST = 0.25
_BACKOFF_CAP = 5.0
_API_TIMEOUT = 15
_INSPECTS = 8  # event inspects at once, across containers
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


@dataclass(frozen=True, slots=True)
class _Session:
    """What one connection's handlers share: the client and the task group they spawn into."""

    client: docker.APIClient
    tasks: asyncio.TaskGroup


class DockerSource:
    """Keeps the registry equal to the running containers of one Docker Engine.

    Drain and remove events are applied as they are read. Inspects run in workers, one per
    container (in order for that container, see ``EventOrder``), at most ``inspects`` at once
    across containers, in a thread pool of their own so a resync's inspects never hold them up."""

    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        resync_interval: float = 30.0,
        client_factory: Callable[[], docker.APIClient] = default_client,
        drain_margin: float = DRAIN_MARGIN,
        inspects: int = _INSPECTS,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._resync_interval = resync_interval
        self._client_factory = client_factory
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="docker")
        self._inspect_pool = concurrent.futures.ThreadPoolExecutor(
            inspects, thread_name_prefix="docker-inspect"
        )
        self._order = EventOrder(drain_margin)
        self._asked_at: dict[str, float] = {}  # container -> oldest event awaiting its inspect
        self._drain_clock = asyncio.Event()  # set: look again for containers draining too long
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
                    cause = unwrap(exc)
                    self.stats.last_error = describe(cause)
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
            self._inspect_pool.shutdown(wait=False, cancel_futures=True)

    async def _call(
        self, fn: Callable[..., T], *args: Any, pool: concurrent.futures.Executor | None = None
    ) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool or self._pool, fn, *args)

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
                target=read_events,
                args=(stream, asyncio.get_running_loop(), queue),
                name="docker-events",
                daemon=True,
            )
            reader.start()
            self._order.reset()
            self._asked_at.clear()
            async with asyncio.TaskGroup() as tasks:
                session = _Session(client, tasks)
                tasks.create_task(self._consume(session, queue), name="docker-events")
                await self.resync(client)
                self._registry.apply([SetSynced(True)])
                logger.info(
                    "Docker Engine connected; synced %d endpoints in %.3fs",
                    len(self._registry.snapshot.endpoints),
                    self.stats.last_resync_seconds,
                )
                tasks.create_task(self._resync_loop(client), name="docker-resync")
                tasks.create_task(self._watch_drains(session), name="docker-drains")
        finally:
            if stream is not None:
                await self._call(close_quietly, stream)
            await self._call(close_quietly, client)

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
            self._order.retain(frozenset(ids) | keep)
            self._drain_clock.set()
            self.stats.resyncs += 1
            self.stats.last_resync_seconds = time.monotonic() - began

    async def _inspect(
        self,
        client: docker.APIClient,
        cid: str,
        pool: concurrent.futures.Executor | None = None,
    ) -> Mapping[str, Any] | None:
        try:
            result: Mapping[str, Any] = await self._call(client.inspect_container, cid, pool=pool)
            return result
        except docker.errors.NotFound:
            return None

    async def _consume(
        self, session: _Session, queue: asyncio.Queue[Mapping[str, Any] | BaseException]
    ) -> None:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise DockerLost(describe(item))
            self._handle_event(session, item)

    def _handle_event(self, session: _Session, event: Mapping[str, Any]) -> None:
        """Apply one Docker event: drain or remove at once; an inspect goes to the container's
        worker (started here when it has none). Never waits."""
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
        if action is Action.INSPECT:
            self._want(session, cid, at)
            return
        current = self._registry.snapshot.endpoints.get(cid)
        step = self._order.event(action, cid, at, event_signal(event), current, now=time.time())
        if step.changes:
            self._apply(step.changes, at)

    def _want(self, session: _Session, cid: str, at: float | None) -> None:
        """Have the container inspected (again) after any inspect of it that runs now."""
        if at is not None:
            self._asked_at.setdefault(cid, at)
        step = self._order.event(Action.INSPECT, cid, at, "", None, now=time.time())
        if step.start_worker:
            session.tasks.create_task(
                self._inspect_worker(session, cid), name=f"docker-inspect-{cid[:12]}"
            )

    async def _inspect_worker(self, session: _Session, cid: str) -> None:
        """Inspect one container for as long as events keep asking, one inspect at a time."""
        while self._order.begin(cid):
            at = self._asked_at.pop(cid, None)
            inspect = await self._inspect(session.client, cid, self._inspect_pool)
            change = self._translate(cid, inspect)
            current = self._registry.snapshot.endpoints.get(cid)
            changes = self._order.finish(cid, change, current, now=time.time())
            if self._touched is not None:
                self._touched.add(cid)
            if current is not None and any(isinstance(c, Undrain) for c in changes):
                logger.info(
                    "endpoint %s still runs after its stop timeout (%gs) and %gs more: it "
                    "ignored its stop signal, so it is routed again",
                    current.name,
                    stop_timeout(current),
                    self._order.margin,
                )
            self._apply(changes, at)

    async def _watch_drains(self, session: _Session) -> None:
        """Have every container left draining past its stop timeout inspected once; sleeps
        until the next such deadline or until a drain or a resync changes the picture."""
        while True:
            self._drain_clock.clear()
            due, deadline = self._order.due(self._registry.snapshot.endpoints, now=time.time())
            for cid in due:
                self._want(session, cid, None)
            delay = None if deadline is None else max(0.0, deadline - time.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._drain_clock.wait()

    def _apply(self, changes: Sequence[Change], at: float | None) -> None:
        if not changes:
            return
        self._registry.apply(changes)
        if any(isinstance(change, Drain) for change in changes):
            self._drain_clock.set()
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


def read_events(
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


def close_quietly(closable: Any) -> None:
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


def unwrap(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from a TaskGroup."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
