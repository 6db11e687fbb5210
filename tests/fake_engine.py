"""A scripted Docker Engine for ordering tests and benchmarks, beside the real engine (which the
other Docker tests use and which stays the reference for what the JSON looks like).

It is an in-process stand-in for the few calls DockerSource makes on the SDK's APIClient
(``events``, ``containers``, ``inspect_container``, ``close``), not an HTTP server: the point is
exact control over timing, which a socket would blur. A test knows the moment an inspect has
begun (and read the container's state), and decides when it returns: ``hold(cid)`` makes the
container's next inspects wait for ``release()`` (or a delay), so "a start's inspect that
returns after a later die" is a script, not a race. Events are pushed by the test; the listing
a resync reads can be held the same way. Every call runs in the source's worker threads, as
with the real client, so the source under test is unchanged."""

from __future__ import annotations

import asyncio
import copy
import itertools
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import docker
import docker.errors

IMAGE = "stablenet-test/busybox:fake"
HOLD_BOUND = 30.0  # a held call returns after this at the latest, so a broken test cannot hang


def rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Hold:
    """Makes calls wait: ``started`` is set when one begins; it returns on ``release()`` or
    after ``delay`` seconds, whichever comes first."""

    delay: float = HOLD_BOUND
    started: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()

    def wait(self) -> None:
        self.started.set()
        self.released.wait(self.delay)

    async def begun(self, within: float = 10.0) -> None:
        """Return once a held call has begun; fail after ``within`` seconds."""
        if not await asyncio.to_thread(self.started.wait, within):
            raise AssertionError(f"no held call began within {within}s")


class _Stream:
    """The events stream: iterates what the engine emits until closed."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()

    def put(self, event: dict[str, Any] | None) -> None:
        self._queue.put(event)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while (event := self._queue.get()) is not None:
            yield event

    def close(self) -> None:
        self._queue.put(None)


class FakeEngine:
    """Containers as inspect JSON, an events stream, and holds on inspects and listings."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._containers: dict[str, dict[str, Any]] = {}  # id -> inspect JSON
        self._holds: dict[str, Hold] = {}
        self._streams: list[_Stream] = []
        self._clock = 0.0
        self._serial = itertools.count(1)
        self.list_hold: Hold | None = None
        self.inspects: dict[str, int] = {}  # id -> inspects begun
        self.in_flight: dict[str, int] = {}  # id -> inspects running now
        self.most_in_flight: dict[str, int] = {}  # id -> the most that ever ran at once
        self.returned = 0  # inspects that have returned (or raised), all containers
        self._returns = threading.Condition(self._lock)

    # -- the client side: what DockerSource calls, from its threads --------------------------

    def client(self) -> docker.APIClient:
        """The client factory: the engine is its own client (it has every method the source
        calls, which is all the typing claims here)."""
        return cast(docker.APIClient, self)

    def events(self, decode: bool = True, filters: dict[str, Any] | None = None) -> _Stream:
        stream = _Stream()
        with self._lock:
            self._streams.append(stream)
        return stream

    def containers(self, quiet: bool = False) -> list[dict[str, Any]]:
        with self._lock:
            listed = [{"Id": cid} for cid, c in self._containers.items() if c["State"]["Running"]]
            hold = self.list_hold
        if hold is not None:
            hold.wait()
        return listed

    def inspect_container(self, cid: str) -> dict[str, Any]:
        with self._lock:
            found = copy.deepcopy(self._containers.get(cid))  # the state when the call begins
            hold = self._holds.get(cid)
            self.inspects[cid] = self.inspects.get(cid, 0) + 1
            self.in_flight[cid] = self.in_flight.get(cid, 0) + 1
            self.most_in_flight[cid] = max(self.most_in_flight.get(cid, 0), self.in_flight[cid])
        try:
            if hold is not None:
                hold.wait()
        finally:
            with self._lock:
                self.in_flight[cid] -= 1
                self.returned += 1
                self._returns.notify_all()
        if found is None:
            raise docker.errors.NotFound(f"No such container: {cid}")
        return found

    def close(self) -> None:
        pass

    # -- the script side: what a test does ---------------------------------------------------

    def now(self) -> float:
        """Unix time, strictly increasing across calls (events and starts are ordered)."""
        with self._lock:
            self._clock = max(time.time(), self._clock + 1e-5)
            return self._clock

    def hold(self, cid: str, delay: float = HOLD_BOUND) -> Hold:
        """Hold the container's inspects from now on (until ``unhold`` or the hold's release)."""
        hold = Hold(delay)
        with self._lock:
            self._holds[cid] = hold
        return hold

    def wait_returned(self, count: int, within: float = HOLD_BOUND) -> bool:
        """Block until ``count`` inspects in all have returned (False after ``within`` s)."""
        with self._returns:
            return self._returns.wait_for(lambda: self.returned >= count, within)

    def release_all(self) -> None:
        """Let every held call return (at the end of a test, so no thread stays blocked)."""
        with self._lock:
            holds = [*self._holds.values(), *([self.list_hold] if self.list_hold else [])]
            self._holds.clear()
            self.list_hold = None
        for hold in holds:
            hold.release()

    def unhold(self, cid: str) -> None:
        with self._lock:
            hold = self._holds.pop(cid, None)
        if hold is not None:
            hold.release()

    def add(
        self,
        name: str,
        labels: dict[str, str] | None = None,
        stop_timeout: int | None = None,
        stop_signal: str = "",
    ) -> str:
        """A running container (no event: as if it ran before the source connected)."""
        serial = next(self._serial)
        cid = f"{serial:08x}" + "f" * 56
        config: dict[str, Any] = {
            "Labels": dict(labels or {}),
            "ExposedPorts": {"80/tcp": {}},
            "Image": IMAGE,
        }
        if stop_timeout is not None:
            config["StopTimeout"] = stop_timeout
        if stop_signal:
            config["StopSignal"] = stop_signal
        with self._lock:
            self._containers[cid] = {
                "Id": cid,
                "Name": "/" + name,
                "State": {"Running": False, "Paused": False, "Restarting": False},
                "Config": config,
                "HostConfig": {"NetworkMode": "bridge"},
                "NetworkSettings": {"Networks": {}},
            }
        self._set_running(cid, serial)
        return cid

    def address(self, cid: str) -> str:
        with self._lock:
            return str(self._containers[cid]["NetworkSettings"]["Networks"]["bridge"]["IPAddress"])

    def start(self, cid: str) -> None:
        """Start (again): a new StartedAt and a new address, then the `start` event."""
        self._set_running(cid, next(self._serial))
        self.emit(cid, "start")

    def die(self, cid: str, action: str = "die") -> float:
        """The container exits (its address is free from now on), then the event; returns the
        event's timestamp."""
        with self._lock:
            found = self._containers[cid]
            found["State"].update(Running=False, Status="exited")
            found["NetworkSettings"]["Networks"] = {}
        return self.emit(cid, action)

    def destroy(self, cid: str) -> None:
        with self._lock:
            del self._containers[cid]
        self.emit(cid, "destroy")

    def kill(self, cid: str, signal: str = "15") -> float:
        return self.emit(cid, "kill", signal=signal)

    def emit(self, cid: str, action: str, **attributes: str) -> float:
        """Push a container event to every open stream; returns its timestamp."""
        at = self.now()
        nano = int(at * 1e9)
        event = {
            "Type": "container",
            "Action": action,
            "status": action,
            "id": cid,
            "from": IMAGE,
            "Actor": {"ID": cid, "Attributes": {"image": IMAGE, **attributes}},
            "scope": "local",
            "time": nano // 10**9,
            "timeNano": nano,
        }
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.put(event)
        return at

    def _set_running(self, cid: str, serial: int) -> None:
        started = self.now()
        with self._lock:
            found = self._containers[cid]
            found["State"].update(
                Status="running", Running=True, Pid=1000 + serial, StartedAt=rfc3339(started)
            )
            address = f"10.{serial // 65536 % 256}.{serial // 256 % 256}.{serial % 256}"
            found["NetworkSettings"]["Networks"] = {
                "bridge": {"IPAddress": address, "GlobalIPv6Address": "", "NetworkID": "b" * 64}
            }
