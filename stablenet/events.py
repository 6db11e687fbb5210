"""Recent changes, for people: a bounded log of endpoint transitions (added, moved, state
changes, removed) derived by diffing consecutive registry snapshots. The status page and the
admin API read it; nothing here changes state."""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass

from stablenet.model import Endpoint
from stablenet.registry import Registry, transitions

CAPACITY = 500


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    at: float  # unix time of the snapshot that showed the change
    service: str
    endpoint: str
    kind: str  # added, moved, state, removed, docker, controller
    message: str

    def as_dict(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "at": self.at,
            "service": self.service,
            "endpoint": self.endpoint,
            "kind": self.kind,
            "message": self.message,
        }


def diff(
    old: Mapping[str, Endpoint], new: Mapping[str, Endpoint]
) -> list[tuple[str, str, str, str]]:
    """(service, endpoint, kind, message) for every change between two endpoint maps."""
    out = []
    for kind, before, ep in transitions(old, new):
        where = f"{ep.address}:{ep.port}" if ep.port else ep.address
        if kind == "added":
            message = f"added at {where}, {ep.state.value}"
        elif kind == "moved":
            message = f"moved to {where}"
        elif kind == "state":
            message = f"{before.state.value} -> {ep.state.value} ({ep.reason})"
        else:
            message = f"removed from {ep.address}"
        out.append((ep.service, ep.name, kind, message))
    return out


class EventLog:
    """Follows the registry and keeps the last CAPACITY changes."""

    def __init__(self, registry: Registry, capacity: int = CAPACITY) -> None:
        self._registry = registry
        self._events: collections.deque[Event] = collections.deque(maxlen=capacity)
        self._seq = itertools.count(1)

    def add(self, service: str, endpoint: str, kind: str, message: str) -> None:
        """Record a change another part made (the controller's actions)."""
        self._events.append(Event(next(self._seq), time.time(), service, endpoint, kind, message))

    def since(self, seq: int = 0) -> list[Event]:
        return [e for e in self._events if e.seq > seq]

    async def run(self) -> None:
        first = self._registry.snapshot
        synced = first.synced
        previous = first.endpoints
        async for snap in self._registry.watch(first.version):
            for service, endpoint, kind, message in diff(previous, snap.endpoints):
                self._events.append(
                    Event(next(self._seq), snap.created, service, endpoint, kind, message)
                )
            if snap.synced != synced:
                text = "Docker Engine connected" if snap.synced else "Docker Engine lost"
                self._events.append(Event(next(self._seq), snap.created, "", "", "docker", text))
                synced = snap.synced
            previous = snap.endpoints
