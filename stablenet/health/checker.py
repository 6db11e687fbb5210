"""The health checker: runs active checks for endpoints that have one, takes passive outcomes
reported by the proxy, and writes verdicts into the registry when routing should change.

One small task per checked endpoint (a timer and a probe), owned by the checker's TaskGroup and
cancelled when the endpoint goes away or moves address. Verdicts are written only when the
health state changes, so steady checks never bump the registry version."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from stablenet.config import HealthConfig
from stablenet.health.probe import ProbeResult, probe
from stablenet.health.state import EndpointHealth, Health, Peers, Refusal, Thresholds
from stablenet.model import Endpoint, HealthSpec, SetVerdict, State, Verdict
from stablenet.registry import Registry, Snapshot

logger = logging.getLogger(__name__)

Probe = Callable[[str, int, HealthSpec | None, float], Awaitable[ProbeResult]]
START_GRACE_INTERVALS = 10  # a new endpoint fails for this many intervals before it is down
JITTER = 0.1  # checks fire at interval * (1 +/- JITTER) so they do not run in lockstep


@dataclass(frozen=True, slots=True)
class Target:
    """What a check task is bound to; a change of any field restarts the task."""

    id: str
    address: str
    port: int
    spec: HealthSpec | None
    started_at: float = 0.0  # a restarted container is checked afresh


class HealthChecker:
    """Owns per-endpoint health state; the only writer of verdicts into the registry."""

    def __init__(
        self,
        registry: Registry,
        config: HealthConfig,
        probe_fn: Probe = probe,
    ) -> None:
        self._registry = registry
        self._config = config
        self._limits = Thresholds(
            rise=config.rise,
            fall=config.fall,
            eject_after=config.eject_after,
            eject_time=config.eject_time,
            eject_max=config.eject_max,
            max_ejection_percent=config.max_ejection_percent,
        )
        self._probe = probe_fn
        self._states: dict[str, tuple[Target, EndpointHealth]] = {}
        self._tasks: dict[str, tuple[Target, asyncio.Task[None]]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._suspect: set[str] = set()  # endpoints with failed requests on record
        self.checks = 0
        self.transitions = 0
        self.refused: Counter[Refusal] = Counter()  # ejections refused, once per run of failures

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            try:
                async for snap in self._registry.watch(-1):
                    self._sync(snap)
            finally:
                self._group = None
                for _, task in self._tasks.values():
                    task.cancel()
                self._tasks.clear()

    def status(self, endpoint_id: str) -> EndpointHealth | None:
        entry = self._states.get(endpoint_id)
        return entry[1] if entry else None

    def _target(self, ep: Endpoint) -> Target | None:
        if ep.port is None:
            return None
        return Target(ep.id, ep.address, ep.port, ep.check, ep.started_at)

    def _sync(self, snap: Snapshot) -> None:
        """Start, restart or stop check tasks so they match the snapshot."""
        self._suspect.intersection_update(snap.endpoints)
        for cid in list(self._states):
            ep = snap.endpoints.get(cid)
            target = self._target(ep) if ep else None
            if target != self._states[cid][0]:
                del self._states[cid]
        for cid, (target, task) in list(self._tasks.items()):
            ep = snap.endpoints.get(cid)
            if ep is None or self._target(ep) != target:
                task.cancel()
                del self._tasks[cid]
        for ep in snap.endpoints.values():
            target = self._target(ep)
            if target is None or target.spec is None or ep.id in self._tasks:
                continue
            self._start(target)
        self._recall(snap)

    def _recall(self, snap: Snapshot) -> None:
        """Probe at once the endpoints ejected on request failures alone of a service that has
        no ready endpoint left (the others were removed or went down after the ejection)."""
        for service, ready in snap.ready.items():
            if ready:
                continue
            for ep in snap.services[service]:
                entry = self._states.get(ep.id)
                if entry is None or not entry[1].recall(self._now()):
                    continue
                target = entry[0]
                logger.info(
                    "endpoint %s at %s:%d: service %s has no ready endpoint left; probing it now",
                    target.id[:12],
                    target.address,
                    target.port,
                    service,
                )
                running = self._tasks.pop(ep.id, None)
                if running is not None:
                    running[1].cancel()  # it sleeps until the old deadline
                self._start(target)

    def _start(self, target: Target) -> None:
        if self._group is None:
            return
        task = self._group.create_task(self._loop(target), name=f"health-{target.id[:12]}")
        self._tasks[target.id] = (target, task)

    def _state(self, target: Target) -> EndpointHealth:
        entry = self._states.get(target.id)
        if entry is None or entry[0] != target:
            limits = self._limits
            if target.spec is not None:
                limits = dataclasses.replace(
                    limits,
                    rise=target.spec.rise,
                    fall=target.spec.fall,
                    start_grace=START_GRACE_INTERVALS * target.spec.interval,
                )
            entry = (target, EndpointHealth(limits))
            self._states[target.id] = entry
        return entry[1]

    async def _loop(self, target: Target) -> None:
        """Check one endpoint until cancelled (active checks) or until it is back (probes
        after a passive ejection of an endpoint that has no active check)."""
        state = self._state(target)
        spec = target.spec
        interval = spec.interval if spec else self._config.interval
        timeout = spec.timeout if spec else self._config.timeout
        # The first check of a new endpoint runs at once (it is not routed until it passes).
        delay = random.uniform(0, min(interval, 0.05)) if state.health is Health.UNKNOWN else 0.0
        if state.health is Health.EJECTED:
            delay = max(0.0, state.ejected_until - self._now())
        try:
            while True:
                await asyncio.sleep(delay)
                try:
                    result = await self._probe(target.address, target.port, spec, timeout)
                except Exception as exc:  # a probe bug must not take the checker down
                    logger.exception("health probe of %s failed", target.id[:12])
                    result = ProbeResult(False, f"probe error: {type(exc).__name__}")
                self.checks += 1
                now = self._now()
                before = state.health
                state.check_result(result.passing, result.reason, now)
                self._publish(target, state, before)
                if spec is None and state.health is not Health.EJECTED:
                    return  # probing after ejection is done; passive detection resumes
                due = state.next_check(interval, now)
                delay = max(0.0, due - now) * random.uniform(1 - JITTER, 1 + JITTER)
        finally:
            entry = self._tasks.get(target.id)
            if entry is not None and entry[1] is asyncio.current_task():
                del self._tasks[target.id]

    def suspects(self) -> frozenset[str]:
        """Endpoints with failed requests on record: the ones whose successes count too."""
        return frozenset(self._suspect)

    def outcome(self, endpoint: Endpoint, ok: bool, reason: str) -> None:
        """The proxy's OutcomeHook: ``report`` for an endpoint object, returning at once for a
        success on an endpoint with no failure on record (nearly every request)."""
        if ok and endpoint.id not in self._suspect:
            return
        self.report(endpoint.id, endpoint.address, ok, reason)

    def report(self, endpoint_id: str, address: str, ok: bool, reason: str = "") -> None:
        """A proxied request's outcome (ok, or a connection failure / 5xx). Cheap and
        synchronous: called on the data path, so a success for an endpoint with no failure on
        record returns at once."""
        if ok and endpoint_id not in self._suspect:
            return
        ep = self._registry.snapshot.endpoints.get(endpoint_id)
        if ep is None or ep.address != address:
            return
        target = self._target(ep)
        if target is None:
            return
        state = self._state(target)
        before, held = state.health, state.held_back
        if ok:
            state.request_ok()
        else:
            peers = self._peers(ep)
            state.request_failed(reason or "request failed", self._now(), peers)
            if state.held_back is not None and state.held_back is not held:
                self._held_back(ep, state.held_back, state.request_failures, peers)
        if state.request_failures:
            self._suspect.add(endpoint_id)
        else:
            self._suspect.discard(endpoint_id)
        if state.health is not before:
            self._publish(target, state, before)
            if state.health is Health.EJECTED and endpoint_id not in self._tasks:
                self._start(target)

    def _peers(self, ep: Endpoint) -> Peers:
        """``ep``'s service as passive ejection weighs it (see ``ejection_refusal``)."""
        members = [
            e for e in self._registry.snapshot.services.get(ep.service, ()) if not e.draining
        ]
        ejected = 0
        for member in members:
            status = self.status(member.id)
            ejected += status is not None and status.health is Health.EJECTED
        ready = sum(1 for e in members if e.id != ep.id and e.state is State.READY)
        return Peers(len(members), ejected, ready)

    def _held_back(self, ep: Endpoint, refusal: Refusal, failures: int, peers: Peers) -> None:
        """Log and count an ejection that was refused, once per run of failures."""
        self.refused[refusal] += 1
        if refusal is Refusal.LAST_READY:
            why = f"it is the last ready endpoint of service {ep.service}"
        else:
            why = (
                f"{peers.ejected} of the {peers.endpoints} endpoints of service {ep.service} are"
                f" ejected already, the most health.max_ejection_percent"
                f"={self._limits.max_ejection_percent} allows"
            )
        logger.info(
            "endpoint %s at %s:%s: not ejected after %d failed requests: %s",
            ep.id[:12],
            ep.address,
            ep.port,
            failures,
            why,
        )

    def _publish(self, target: Target, state: EndpointHealth, before: Health) -> None:
        if state.health is before:
            return
        if state.health is Health.UNKNOWN:
            return
        self.transitions += 1
        level = logging.INFO if state.health is Health.UP else logging.WARNING
        logger.log(
            level,
            "endpoint %s at %s:%d: %s -> %s (%s)",
            target.id[:12],
            target.address,
            target.port,
            before.value,
            state.health.value,
            state.reason,
        )
        verdict = Verdict(passing=state.routed, reason=state.reason, at=time.time())
        self._registry.apply([SetVerdict(target.id, target.address, verdict)])
