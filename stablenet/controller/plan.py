"""The controller's decisions: a service's observed replicas in, at most a few actions out.
Pure (no I/O, no clock: ``now`` is an argument), so every rule is tested without an engine.

The rules, in order:
1. A degraded service (its breaker tripped) or one whose template cannot be replicated gets
   nothing that would create a container.
2. One operation at a time per service, unless fewer than half of its count are ready.
3. A replica stablenet created but never started (stablenet stopped between the two) is started.
4. A failed replica (exited on its own and Docker will not restart it) is healed; so is one
   unhealthy for longer than the grace. ``replace`` starts a fresh copy first; ``restart``
   restarts it in place. Both wait for the backoff.
5. With a count: fewer replicas (running, starting, or stopped by the operator, who keeps
   their slot) than the count: create one (after the backoff when failures are recent); more:
   remove one, not-ready first, then the newest. Containers stopped by the operator are never
   chosen. An autoscaled service starts parked replicas before it creates any, creates every
   missing one at once, and parks (stops, keeps) surplus ones instead of removing them."""

from __future__ import annotations

import math
from dataclasses import dataclass

LIVE = frozenset({"running", "restarting", "paused", "created"})


@dataclass(frozen=True, slots=True)
class Replica:
    """One container of a managed service, as the controller sees it."""

    id: str
    name: str
    created: float  # unix time
    status: str  # Docker's: running, created, restarting, paused, exited, dead
    ready: bool = False
    unhealthy_since: float | None = None  # first seen unhealthy (still unhealthy)
    held: bool = False  # stopped by the operator: left alone, keeps its slot
    failed: str | None = None  # why it failed, when it exited on its own for good
    ours: bool = False  # created by stablenet
    started: bool = True  # False: created by stablenet and never started
    busy: bool = False  # an operation is acting on it
    parked: bool = False  # stopped by the autoscaler; started again before creating
    replaced: bool = False  # a new container from docker compose is taking its place


@dataclass(frozen=True, slots=True)
class View:
    """A service as the controller decides on it."""

    name: str
    replicas: tuple[Replica, ...]
    desired: int | None  # None: heal only, no count kept
    heal: str  # replace | restart
    in_flight: int = 0  # operations running
    creating: int = 0  # of those, how many will add a container not yet listed
    next_try: float = 0.0  # backoff: no new attempt before this (unix time)
    degraded: str | None = None
    refused: str | None = None  # why its template cannot be replicated
    park: bool = False  # autoscaled: surplus replicas are stopped (parked), not removed


@dataclass(frozen=True, slots=True)
class Start:
    target: str
    reason: str


@dataclass(frozen=True, slots=True)
class Heal:
    target: str
    how: str  # replace | restart
    reason: str


@dataclass(frozen=True, slots=True)
class Grow:
    template: str  # container whose configuration the new replica copies
    reason: str


@dataclass(frozen=True, slots=True)
class Shrink:
    target: str
    reason: str


@dataclass(frozen=True, slots=True)
class Park:
    """Drain and stop a surplus replica but keep it, to start it again when load returns."""

    target: str
    reason: str


@dataclass(frozen=True, slots=True)
class Discard:
    """Remove a failed container nothing needs any more (the count is met without it)."""

    target: str
    reason: str


Action = Start | Heal | Grow | Shrink | Park | Discard


def counted(view: View) -> list[Replica]:
    """The replicas that fill the count: live ones, those an operation is still acting on (a
    new replica that exited before its operation judged it, or a parked one being started,
    listed as stopped until its start returns), and those the operator stopped; not parked
    ones, nor one docker compose is replacing (its successor counts)."""
    return [
        r
        for r in view.replicas
        if (((r.failed is None and (r.status in LIVE or r.busy)) or r.held) and not r.parked)
        or (r.parked and r.busy)
        if not r.replaced
    ]


def ready_count(view: View) -> int:
    return sum(1 for r in view.replicas if r.ready and not r.held)


def urgent(view: View) -> bool:
    """Fewer than half of the count ready: operations may run side by side."""
    return view.desired is not None and ready_count(view) < view.desired / 2


def decide(view: View, now: float, grace: float) -> list[Action]:
    if view.in_flight and not urgent(view):
        return []
    idle = [r for r in view.replicas if not r.busy]
    unstarted = [
        r
        for r in idle
        if r.ours and not r.started and r.status == "created" and r.failed is None and not r.parked
    ]
    if unstarted:
        return [Start(unstarted[0].id, "created but never started")]
    waiting = now < view.next_try
    blocked = view.degraded is not None
    count = len(counted(view)) + view.creating
    for replica in idle:
        if replica.failed is None or replica.held or blocked or view.in_flight:
            continue
        if view.desired is not None and count >= view.desired and view.heal == "replace":
            return [Discard(replica.id, f"{replica.failed}; the count is met without it")]
        if waiting:
            return []
        if view.heal == "replace" and view.refused is not None:
            return []
        return [Heal(replica.id, view.heal, replica.failed)]
    for replica in idle:
        since = replica.unhealthy_since
        if since is None or replica.held or replica.status != "running" or blocked:
            continue
        if view.in_flight:
            continue  # heals go one at a time, even when few are ready
        if now - since < grace:
            continue
        if waiting or (view.heal == "replace" and view.refused is not None):
            return []
        return [Heal(replica.id, view.heal, f"unhealthy for {now - since:.0f}s")]
    if view.desired is None:
        return []
    if count < view.desired:
        if waiting or blocked or view.refused is not None:
            return []
        missing = view.desired - count
        reason = f"{count} of {view.desired} replicas"
        parked = [r for r in idle if r.parked and r.failed is None]
        parked.sort(key=lambda r: -r.created)
        starts: list[Action] = [Start(r.id, f"{reason}: start a parked one") for r in parked]
        if view.park:  # autoscaled: every missing replica at once
            grow = missing
        elif urgent(view):
            grow = min(missing, max(1, math.ceil(view.desired / 2) - ready_count(view)))
        else:
            grow = 1
        template = _template(view)
        if template is None:
            return starts[:grow]
        return (starts + [Grow(template.id, reason)] * grow)[:grow]
    if count > view.desired and not view.in_flight:
        victims = [
            r for r in idle if not r.held and r.status in LIVE and (r.ours or r.status != "created")
        ]
        if not victims:
            return []
        # stablenet's own replicas first, then not ready ones, then the newest.
        victims.sort(key=lambda r: (not r.ours, r.ready, -r.created))
        victim = victims[0]
        reason = f"{count} replicas for a count of {view.desired}"
        if view.park:
            surplus = count - view.desired
            return [Park(v.id, reason) for v in victims[:surplus]]
        return [Shrink(victim.id, reason)]
    return []


def _template(view: View) -> Replica | None:
    """The replica to copy: the newest ready one, else the newest live, else any."""
    ranked = sorted(
        [r for r in view.replicas if not r.parked],
        key=lambda r: (r.ready, r.status in LIVE and r.failed is None, not r.ours, r.created),
        reverse=True,
    )
    return ranked[0] if ranked else None


def backoff_delay(streak: int, first: float, cap: float) -> float:
    """How long after a failure the next attempt waits: the first failure is acted on at once,
    then first, 2*first, 4*first ... capped (Kubernetes' CrashLoopBackOff)."""
    if streak <= 1:
        return 0.0
    return min(cap, first * float(2 ** (streak - 2)))


def next_attempt(
    streak: int, last_failure: float, now: float, first: float, cap: float, reset: float
) -> float:
    """When the next attempt may start (unix time; 0.0: at once). No wait after a first failure,
    even one recorded later than ``now`` (in the same reconcile pass); a streak whose last
    failure is older than ``reset`` is forgotten."""
    delay = backoff_delay(streak, first, cap)
    if not delay or now - last_failure > reset:
        return 0.0
    return last_failure + delay


def breaker_limit(desired: int | None, breaker: int) -> int:
    """Failed replacements in a row that trip the breaker: max(breaker, half the count)."""
    return max(breaker, math.ceil((desired or 0) / 2))
