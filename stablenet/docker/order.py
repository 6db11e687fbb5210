"""Per-container order between Docker events and the inspects they ask for, and when a container
left draining is routed again. Pure: no I/O, no asyncio, no docker SDK; time is a parameter.

Drain and remove events apply at once and never wait for an inspect. An inspect runs later (it
can take up to the API timeout) and may return after later events about the same container, so
each container has at most one inspect in flight, and the events that arrive meanwhile settle
its result: a remove voids it (the container released its addresses; a start after the remove
asks for a fresh inspect), a drain (or the container's own stop signal) is applied on top of it.

A container that survives its stop signal (a PID 1 that ignores SIGTERM) would stay draining
for good: once its stop timeout plus a margin has passed since the drain, an inspect that finds
the same incarnation still running routes it again (its health still decides whether it is
ready)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from stablenet.docker.translate import Action, stops
from stablenet.model import Change, Drain, Endpoint, Remove, Undrain, Upsert

DEFAULT_STOP_TIMEOUT = 10.0  # docker stop's wait when the container sets no StopTimeout
DRAIN_MARGIN = 5.0  # on top of the stop timeout: time for the kill and the die to arrive


def stop_timeout(ep: Endpoint) -> float:
    """How long docker stop waits for this container before it kills it."""
    return DEFAULT_STOP_TIMEOUT if ep.stop_timeout is None else ep.stop_timeout


@dataclass(frozen=True, slots=True)
class Signalled:
    """A kill with a signal that stops only a container whose STOPSIGNAL it is."""

    at: float | None
    signal: str


@dataclass(slots=True)
class _Track:
    """One container's inspects: whether one more is wanted, and what came meanwhile."""

    wanted: bool = False
    since: list[Drain | Remove | Signalled] = field(default_factory=list)


@dataclass(slots=True)
class _Drained:
    at: float  # when the drain event happened (unix time)
    asked: bool = False  # an inspect was asked for after the deadline


@dataclass(frozen=True, slots=True)
class Step:
    """What one event means now: changes to apply at once, and whether a worker must start
    inspecting the container (False when none is needed or one already runs for it)."""

    changes: tuple[Change, ...] = ()
    start_worker: bool = False


class EventOrder:
    """The per-container bookkeeping of one Docker source."""

    def __init__(self, margin: float = DRAIN_MARGIN) -> None:
        self.margin = margin
        self._tracks: dict[str, _Track] = {}  # containers with an inspect wanted or running
        self._drains: dict[str, _Drained] = {}  # containers drained and not yet gone

    def reset(self) -> None:
        """A new connection: no inspect is in flight any more. Drain times are kept, and a
        deadline inspect lost with the old connection is asked for again."""
        self._tracks.clear()
        for drained in self._drains.values():
            drained.asked = False

    def event(
        self,
        action: Action,
        cid: str,
        at: float | None,
        signal: str,
        current: Endpoint | None,
        now: float,
    ) -> Step:
        """One classified event about container ``cid``; ``current`` is its registry entry."""
        track = self._tracks.get(cid)
        if action is Action.INSPECT:
            if track is not None:
                track.wanted = True
                return Step()
            self._tracks[cid] = _Track(wanted=True)
            return Step(start_worker=True)
        item: Drain | Remove | Signalled
        if action is Action.REMOVE:
            item = Remove(cid, at)
            self._drains.pop(cid, None)
        elif action is Action.DRAIN or (current is not None and stops(signal, current.stop_signal)):
            item = Drain(cid, at)
            self._drains[cid] = _Drained(now if at is None else at)
        else:
            item = Signalled(at, signal)
        if track is not None:  # an inspect is under way or about to begin: it must see this
            track.since.append(item)
        return Step(() if isinstance(item, Signalled) else (item,))

    def begin(self, cid: str) -> bool:
        """A worker asks whether to inspect ``cid`` (again); False ends the worker."""
        track = self._tracks.get(cid)
        if track is None or not track.wanted:
            self._tracks.pop(cid, None)
            return False
        # What came before this inspect begins: a remove is older than what it will find; a
        # drain or a stop signal after the last remove still holds for the container it finds
        # (the registry ignores a drain older than the incarnation it finds).
        removed = [i for i, item in enumerate(track.since) if isinstance(item, Remove)]
        track.since = track.since[removed[-1] + 1 :] if removed else track.since
        track.wanted = False
        return True

    def finish(
        self, cid: str, change: Change, current: Endpoint | None, now: float
    ) -> list[Change]:
        """The changes an inspect's result (``change``) makes, given the events that arrived
        while it ran and the container's registry entry now."""
        track = self._tracks.get(cid)
        since = track.since if track is not None else []
        if track is not None:
            track.since = []
        if any(isinstance(item, Remove) for item in since):
            return []  # the container left after this inspect began: the result is stale
        fresh = change.endpoint if isinstance(change, Upsert) else None
        changes = [change]
        for item in since:
            if isinstance(item, Drain):
                changes.append(item)
            elif (
                isinstance(item, Signalled)
                and fresh is not None
                and stops(item.signal, fresh.stop_signal)
            ):
                changes.append(Drain(cid, item.at))
                self._drains[cid] = _Drained(now if item.at is None else item.at)
        drained = self._drains.get(cid)
        if drained is None or len(changes) > 1:
            return changes
        if fresh is None:
            del self._drains[cid]  # not running (or no endpoint): nothing to route again
        elif (
            current is not None
            and current.draining
            and current.started_at == fresh.started_at
            and now >= self.deadline(drained, fresh)
        ):
            del self._drains[cid]
            changes.append(Undrain(cid, fresh.started_at))
        return changes

    def deadline(self, drained: _Drained, ep: Endpoint) -> float:
        return drained.at + stop_timeout(ep) + self.margin

    def due(self, endpoints: Mapping[str, Endpoint], now: float) -> tuple[list[str], float | None]:
        """Draining containers whose stop timeout and margin have passed, to be inspected once
        (the inspect decides), and the next such deadline (None: none is pending). A draining
        endpoint with no known drain time (a reconnect, a resync) is counted from ``now``."""
        for cid in [c for c, e in endpoints.items() if e.draining and c not in self._drains]:
            self._drains[cid] = _Drained(now)
        due: list[str] = []
        upcoming: float | None = None
        for cid, drained in list(self._drains.items()):
            ep = endpoints.get(cid)
            if ep is None:
                continue  # not registered (yet): its inspect or its die settles it
            if not ep.draining:
                del self._drains[cid]
                continue
            deadline = self.deadline(drained, ep)
            if deadline <= now:
                if not drained.asked:
                    drained.asked = True
                    due.append(cid)
            elif upcoming is None or deadline < upcoming:
                upcoming = deadline
        return due, upcoming

    def retain(self, running: Collection[str]) -> None:
        """Forget drains of containers a full listing no longer shows (their die was missed)."""
        for cid in [cid for cid in self._drains if cid not in running]:
            del self._drains[cid]
