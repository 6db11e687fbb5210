"""The registry: services -> endpoints, as versioned immutable snapshots.

Writers call ``apply(changes)``; readers take ``registry.snapshot`` (a plain attribute read,
no await, no lock) or iterate ``watch(since)``, which is level-triggered: a slow consumer skips
versions instead of queueing them, and a write that changes nothing wakes nobody. Nothing here
knows Docker or sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from stablenet.model import (
    Change,
    Drain,
    Endpoint,
    Front,
    Problem,
    Remove,
    Resync,
    SetFront,
    SetRemote,
    SetSynced,
    SetVerdict,
    State,
    Undrain,
    Upsert,
)

logger = logging.getLogger(__name__)
LOCAL_FIRST = "local-first"  # route to other hosts' endpoints only when this host has none ready
SPREAD = "spread"  # route to every ready endpoint, wherever it runs


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent view of every endpoint. Build with ``Snapshot.build``."""

    version: int
    endpoints: Mapping[str, Endpoint]  # container id -> endpoint
    services: Mapping[str, tuple[Endpoint, ...]]  # service -> endpoints, sorted by name
    ready: Mapping[str, tuple[Endpoint, ...]]  # service -> endpoints to route to (READY; see
    # _routable for panic mode)
    by_name: Mapping[str, Endpoint]  # container name -> endpoint
    by_address: Mapping[str, Endpoint]  # any address a registered container holds -> endpoint
    synced: bool = False
    problems: Mapping[str, str] = field(default_factory=dict)  # container id -> why skipped
    created: float = 0.0  # unix time this version was made
    fronted: Mapping[str, Front] = field(default_factory=dict)  # service -> how it is fronted

    @classmethod
    def build(
        cls,
        version: int,
        endpoints: Mapping[str, Endpoint],
        synced: bool,
        problems: Mapping[str, str],
        prefer: str = LOCAL_FIRST,
        fronted: Mapping[str, Front] | None = None,
    ) -> Snapshot:
        services: dict[str, list[Endpoint]] = {}
        by_address: dict[str, Endpoint] = {}
        for ep in endpoints.values():
            services.setdefault(ep.service, []).append(ep)
            if ep.origin is None:  # a remote endpoint's address is its host's, shared
                for addr in ep.addresses or (ep.address,):
                    by_address[addr] = ep
        ordered = {
            name: tuple(sorted(eps, key=lambda e: (e.name, e.id)))
            for name, eps in sorted(services.items())
        }
        ready = {name: _preferred(_routable(eps), prefer) for name, eps in ordered.items()}
        return cls(
            version=version,
            endpoints=MappingProxyType(dict(endpoints)),
            services=MappingProxyType(ordered),
            ready=MappingProxyType(ready),
            by_name=MappingProxyType({ep.name: ep for ep in endpoints.values()}),
            by_address=MappingProxyType(by_address),
            synced=synced,
            problems=MappingProxyType(dict(problems)),
            created=time.time(),
            fronted=MappingProxyType(dict(fronted or {})),
        )


class Registry:
    """Holds the current Snapshot and swaps it atomically on every effective change."""

    def __init__(self, prefer: str = LOCAL_FIRST) -> None:
        # Readers take it as it is (a plain attribute: the proxy reads it on every request);
        # only ``apply`` replaces it.
        self.prefer = prefer  # LOCAL_FIRST or SPREAD: which endpoints of a service get traffic
        self.snapshot = Snapshot.build(0, {}, False, {}, prefer)
        self._changed = asyncio.Event()
        self.wakeups = 0  # times a watcher was woken: a write that changes nothing adds none

    def apply(self, changes: Iterable[Change]) -> Snapshot:
        """Apply changes in order; publish a new version only if something differs."""
        old = self.snapshot
        endpoints = dict(old.endpoints)
        problems = dict(old.problems)
        synced = old.synced
        fronted = dict(old.fronted)
        for change in changes:
            match change:
                case Upsert(endpoint=ep):
                    endpoints[ep.id] = _carry_over(endpoints.get(ep.id), ep)
                    problems.pop(ep.id, None)
                case Remove(id=cid, at=at):
                    if not _newer(endpoints.get(cid), at):
                        endpoints.pop(cid, None)
                        problems.pop(cid, None)
                case Drain(id=cid, at=at):
                    current = endpoints.get(cid)
                    if current is not None and not current.draining and not _newer(current, at):
                        endpoints[cid] = dataclasses.replace(current, draining=True)
                case Undrain(id=cid, started_at=started):
                    current = endpoints.get(cid)
                    if current is not None and current.draining and current.started_at == started:
                        endpoints[cid] = dataclasses.replace(current, draining=False)
                case Resync(endpoints=listed, keep=keep, problems=found):
                    fresh = {
                        cid: ep
                        for cid, ep in endpoints.items()
                        if cid in keep or ep.origin is not None  # other hosts' stay
                    }
                    for ep in listed:
                        if ep.id not in keep:
                            fresh[ep.id] = _carry_over(endpoints.get(ep.id), ep)
                    endpoints = fresh
                    problems = {cid: m for cid, m in problems.items() if cid in keep}
                    problems.update((cid, m) for cid, m in found.items() if cid not in keep)
                case Problem(id=cid, message=message):
                    endpoints.pop(cid, None)
                    if message is None:
                        problems.pop(cid, None)
                    else:
                        problems[cid] = message
                case SetVerdict(id=cid, address=address, verdict=verdict):
                    current = endpoints.get(cid)
                    if (
                        current is not None
                        and current.address == address
                        and current.verdict != verdict
                    ):
                        endpoints[cid] = dataclasses.replace(current, verdict=verdict)
                case SetSynced(synced=value):
                    synced = value
                case SetRemote(endpoints=remote):
                    fresh = {cid: ep for cid, ep in endpoints.items() if ep.origin is None}
                    for ep in remote:
                        if ep.id not in fresh:
                            fresh[ep.id] = _carry_over(endpoints.get(ep.id), ep)
                    endpoints = fresh
                case SetFront(service=service, front=front):
                    if front is None:
                        fronted.pop(service, None)
                    else:
                        fronted[service] = front
        if (
            endpoints == old.endpoints
            and problems == old.problems
            and synced == old.synced
            and fronted == old.fronted
        ):
            return old
        _log_transitions(old.endpoints, endpoints)
        self.snapshot = Snapshot.build(
            old.version + 1, endpoints, synced, problems, self.prefer, fronted
        )
        woken, self._changed = self._changed, asyncio.Event()
        woken.set()
        return self.snapshot

    def publish(self, snap: Snapshot) -> None:
        """Take a snapshot made elsewhere as the current one (a proxy worker follows its main
        process's registry this way); an older or equal version is ignored."""
        if snap.version <= self.snapshot.version:
            return
        self.snapshot = snap
        woken, self._changed = self._changed, asyncio.Event()
        woken.set()

    async def watch(self, since: int = 0) -> AsyncIterator[Snapshot]:
        """Yield the newest snapshot whenever its version is above the last one seen."""
        while True:
            event = self._changed
            snap = self.snapshot
            if snap.version > since:
                since = snap.version
                yield snap
                continue
            await event.wait()
            self.wakeups += 1

    async def until(self, predicate: Callable[[Snapshot], bool]) -> Snapshot:
        """The first snapshot (the current one included) for which ``predicate`` is true.
        Bound the wait with ``asyncio.timeout``."""
        async for snap in self.watch(-1):
            if predicate(snap):
                return snap
        raise AssertionError("watch() never ends")


def _newer(ep: Endpoint | None, at: float | None) -> bool:
    """The endpoint started after an event about its container: the event concerns an earlier
    incarnation (events can be handled after a later inspect, e.g. across a restart)."""
    return ep is not None and at is not None and ep.started_at > at


def _routable(endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
    """READY endpoints; in panic mode, when none is ready, every endpoint not draining."""
    ready = tuple(e for e in endpoints if e.state is State.READY)
    if ready or not any(e.panic for e in endpoints):
        return ready
    return tuple(e for e in endpoints if e.state is not State.DRAINING)


def _preferred(ready: tuple[Endpoint, ...], prefer: str) -> tuple[Endpoint, ...]:
    """LOCAL_FIRST: this host's endpoints while it has any to route to, else other hosts'.
    SPREAD: all of them alike."""
    if prefer == SPREAD or all(e.origin is None for e in ready):
        return ready
    local = tuple(e for e in ready if e.origin is None)
    return local or ready


def _carry_over(old: Endpoint | None, new: Endpoint) -> Endpoint:
    """Keep what other writers set (health verdict, draining) across a fresh inspect of the
    same incarnation of a container at the same address."""
    if (
        old is None
        or old.address != new.address
        or old.port != new.port
        or old.started_at != new.started_at  # restarted: a new incarnation starts afresh
    ):
        return new
    return dataclasses.replace(
        new, verdict=new.verdict or old.verdict, draining=new.draining or old.draining
    )


def transitions(
    old: Mapping[str, Endpoint], new: Mapping[str, Endpoint]
) -> Iterator[tuple[str, Endpoint, Endpoint]]:
    """(kind, before, after) for every endpoint that changed between two endpoint maps: kind is
    added, moved, state or removed; before is after for added and removed ones."""
    for cid, ep in new.items():
        before = old.get(cid)
        if before is None:
            yield "added", ep, ep
        elif (before.address, before.port) != (ep.address, ep.port):
            yield "moved", before, ep
        elif before.state is not ep.state:
            yield "state", before, ep
    for cid, ep in old.items():
        if cid not in new:
            yield "removed", ep, ep


def _log_transitions(old: Mapping[str, Endpoint], new: Mapping[str, Endpoint]) -> None:
    for kind, before, ep in transitions(old, new):
        if kind == "added":
            logger.info(
                "endpoint %s added to service %s at %s:%s (%s)",
                ep.name, ep.service, ep.address, ep.port, ep.state.value,
            )  # fmt: skip
        elif kind == "moved":
            logger.info(
                "endpoint %s moved from %s:%s to %s:%s",
                ep.name, before.address, before.port, ep.address, ep.port,
            )  # fmt: skip
        elif kind == "state":
            logger.info(
                "endpoint %s: %s -> %s (%s)",
                ep.name, before.state.value, ep.state.value, ep.reason,
            )  # fmt: skip
        else:
            logger.info("endpoint %s removed from service %s (%s)", ep.name, ep.service, ep.address)
