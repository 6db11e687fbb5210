"""The controller: follows the managed containers (their labels, Docker's events, the
registry's health), tells an operator's stop from a crash, decides with ``plan.decide`` and
carries the actions out through the Engine API: create a replica, wait until it is ready, drain
and remove the one it replaces.

How a stop is told from a crash: Docker reports a ``kill`` event for every stop or kill that
goes through its API (docker stop/kill/rm -f, compose stop/down) before the ``die``. A ``die``
that no ``kill`` preceded since the container's last start (the process exited, was OOM-killed,
or was killed from outside Docker) is a failure; one preceded by a ``kill`` stablenet did not send
is the operator's, and is never undone."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors

from stablenet.config import ControllerConfig
from stablenet.controller.autoscale import (
    SAMPLE,
    Scaler,
    ScaleSpec,
    is_autoscaled,
    scale_spec,
)
from stablenet.controller.engine import Engine, EventQueue
from stablenet.controller.plan import (
    LIVE,
    Action,
    Discard,
    Grow,
    Heal,
    Park,
    Replica,
    Shrink,
    Start,
    View,
    backoff_delay,
    breaker_limit,
    counted,
    decide,
    next_attempt,
    ready_count,
)
from stablenet.controller.spec import (
    COMPOSE,
    MANAGED,
    Spec,
    creates_containers,
    is_managed,
    spec_of,
    unreplicable,
)
from stablenet.controller.state import ServiceState, State, StateDir
from stablenet.controller.template import replica_plan
from stablenet.docker.order import stop_timeout
from stablenet.docker.source import DockerLost, default_client, describe, unwrap
from stablenet.docker.translate import (
    STOP_SIGNALS,
    LabelError,
    event_time,
    front_names,
    service_of,
    stops,
)
from stablenet.errors import StartupError
from stablenet.events import EventLog
from stablenet.model import Drain, Front, SetFront
from stablenet.model import State as EpState
from stablenet.registry import Registry, Snapshot

logger = logging.getLogger(__name__)

_TICK = 1.0  # re-decide at least this often (graces and backoffs expire without an event)
_RECONNECT_CAP = 5.0
_LOCK_POLL = 2.0
_DRAIN_POLL = 0.05
_NAME_TRIES = 50
_PROBATION = 10.0  # seconds a new replica must stay up to count as a good replacement


def never_busy(cid: str) -> int:
    return 0


def no_load(service: str) -> int:
    return 0


@dataclass(slots=True)
class LastAction:
    action: str
    target: str
    reason: str
    at: float
    result: str = "running"

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "target": self.target,
            "reason": self.reason,
            "at": self.at,
            "result": self.result,
        }


@dataclass(slots=True)
class ServiceStatus:
    """What the admin API, the CLI and metrics show of a managed service."""

    name: str
    desired: int | None = None
    ready: int = 0
    replicas: int = 0  # counted: live, plus stopped by the operator
    heal: str = "replace"
    held: list[str] = field(default_factory=list)  # names of containers the operator stopped
    last: LastAction | None = None
    next_retry_at: float | None = None
    degraded: str | None = None
    refused: str | None = None
    problem: str | None = None
    in_flight: int = 0
    autoscale: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "managed": True,
            "desired": self.desired,
            "ready": self.ready,
            "replicas": self.replicas,
            "heal": self.heal,
            "held": list(self.held),
            "last_action": None if self.last is None else self.last.as_dict(),
            "next_retry_at": self.next_retry_at,
            "degraded": self.degraded,
            "refused": self.refused,
            "problem": self.problem,
            "in_flight": self.in_flight,
            "autoscale": self.autoscale,
        }


@dataclass(slots=True)
class _Member:
    """A listed container with what the controller derived about it."""

    id: str
    name: str
    service: str
    labels: Mapping[str, str]
    status: str
    status_text: str
    created: float


class Controller:
    """Runs in the daemon's task group; acts only while it holds the state directory's lock."""

    def __init__(
        self,
        registry: Registry,
        config: ControllerConfig,
        log: EventLog | None = None,
        busy: Callable[[str], int] = never_busy,
        client_factory: Callable[[], docker.APIClient] = default_client,
        concurrency: Callable[[str], int] = no_load,
        requests: Callable[[str], int] = no_load,
    ) -> None:
        self.registry = registry
        self.config = config
        self.log = log
        self.busy = busy
        self.concurrency = concurrency  # a service's requests in flight plus held
        self.requests = requests  # a service's requests so far (a counter)
        self._scalers: dict[str, Scaler] = {}
        self._wanted: set[str] = set()  # autoscaled services asked for with nothing ready
        # New replicas that got ready, until they have stayed up for _PROBATION: one that fails
        # sooner is a failed replacement for the breaker.
        self._probation: dict[str, tuple[str, float]] = {}
        # Containers (id or name) a new one from docker compose replaces (its label
        # com.docker.compose.replace): their removal lowers no count.
        self._replaced_by_compose: set[str] = set()
        self._seen_requests: dict[str, int] = {}
        self._recommended: dict[str, int] = {}
        self.dir = StateDir(config.state_dir)
        self.state = State()
        self.active = False  # holds the lock
        self.connected = False
        self.status: dict[str, ServiceStatus] = {}
        self.actions: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._client_factory = client_factory
        self._engine: Engine | None = None
        self._changed = asyncio.Event()  # replaced on every change; waiters wake
        self._acting: dict[str, str] = {}  # container id -> what stablenet is doing to it
        # Containers stablenet stopped to remove them: their kill/die/destroy events may arrive
        # after the call returned, and must not read as the operator's.
        self._retired: set[str] = set()
        self._replayed: set[tuple[Any, ...]] = set()  # events replayed, also on the live stream
        self._written = b""  # the state as last saved
        self._operator_kill: set[str] = set()  # killed through the API, not by stablenet
        self._oom: set[str] = set()
        self._failed: dict[str, str] = {}  # container id -> why it failed
        self._confirmed: set[str] = set()  # failures counted (Docker will not restart them)
        self._exited: dict[str, int] = {}  # container id -> exit code of its last die
        self._unhealthy_since: dict[str, float] = {}
        self._gone: set[str] = set()  # destroyed; a listing read before may still show them
        self._inspects: dict[str, Mapping[str, Any]] = {}
        self._in_flight: collections.Counter[str] = collections.Counter()
        # Replicas on their way, per service: launched creations whose container is not made
        # yet, and containers made but not yet seen in a listing. Both count toward the count.
        self._creating: collections.Counter[str] = collections.Counter()
        self._made: dict[str, set[str]] = {}
        self._reserved: set[str] = set()  # names of replicas being created
        self._members: dict[str, _Member] = {}
        self._ops: set[asyncio.Task[None]] = set()
        self._passed = asyncio.Event()  # replaced after every reconcile pass
        self.passes = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the state directory, or fail the start with the key and the fix."""
        if not self.config.enabled:
            return
        try:
            self.dir.prepare()
        except OSError as exc:
            raise StartupError(
                f"controller.state_dir: cannot create {self.config.state_dir!r}: "
                f"{exc.strerror or exc}; set controller.state_dir "
                "(STABLENET_CONTROLLER_STATE_DIR) to a writable directory, or "
                "controller.enabled = false"
            ) from None

    async def run(self) -> None:
        if not self.config.enabled:
            return
        try:
            await self._take_lock()
            self.state = self.dir.load()
            self._failed.update(self.state.failed)
            self._confirmed.update(self.state.failed)
            self._operator_kill.update(self.state.killed)
            await self._sessions()
        finally:
            for task in list(self._ops):
                task.cancel()
            self.dir.unlock()
            self.active = False

    async def _take_lock(self) -> None:
        warned = False
        while not self.dir.lock():
            if not warned:
                logger.warning(
                    "controller: another stablenet (pid %s) holds %s/controller.lock; this one "
                    "serves but does not act on containers until that one stops",
                    self.dir.holder(),
                    self.dir.path,
                )
                warned = True
            await asyncio.sleep(_LOCK_POLL)
        self.active = True
        if warned:
            logger.info("controller: lock taken; acting on labelled services")

    async def _sessions(self) -> None:
        backoff = 0.25
        while True:
            try:
                client = await asyncio.to_thread(self._client_factory)
                engine = Engine(client)
                try:
                    await self._session(engine)
                finally:
                    self._engine = None
                    self.connected = False
                    await engine.close()
            except Exception as exc:  # any failure ends the session; the loop reconnects
                cause = unwrap(exc)
                if not isinstance(cause, docker.errors.DockerException | OSError | DockerLost):
                    logger.error("controller failed; reconnecting", exc_info=cause)
                else:
                    logger.debug("controller: engine unreachable: %s", describe(cause))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RECONNECT_CAP)

    async def _session(self, engine: Engine) -> None:
        queue = await engine.follow()
        now = time.time()
        if self.state.seen_until:
            for event in await engine.past_events(self.state.seen_until, now):
                if event_time(event) > self.state.seen_until:
                    self._classify(event)
                    self._replayed.add(_event_key(event))
        self.state.seen_until = now
        self._save()
        self._engine = engine
        self.connected = True
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._consume(queue), name="controller-events")
            tasks.create_task(self._follow_registry(), name="controller-registry")
            tasks.create_task(self._sample(), name="controller-autoscale")
            while True:
                changed = self._changed
                await self._reconcile(engine)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_TICK):
                        await changed.wait()
                await asyncio.sleep(0.01)  # let a burst of events settle into one pass

    def _pulse(self) -> None:
        woken, self._changed = self._changed, asyncio.Event()
        woken.set()

    async def _follow_registry(self) -> None:
        async for _snap in self.registry.watch(self.registry.snapshot.version):
            self._pulse()

    async def _sample(self) -> None:
        """Every 100 ms, each autoscaled service's concurrency (and whether a request came)."""
        while True:
            await asyncio.sleep(SAMPLE)
            for service in list(self._scalers):
                self._take_sample(service)

    def _take_sample(self, service: str) -> None:
        scaler = self._scalers.get(service)
        if scaler is None:
            return
        load = self.concurrency(service)
        count = self.requests(service)
        active = count != self._seen_requests.get(service, count)
        self._seen_requests[service] = count
        scaler.sample(time.monotonic(), load, active)
        status = self.status.get(service)
        wanted = bool(load) and status is not None and not status.ready and not status.in_flight
        if wanted and service not in self._wanted:
            self._pulse()  # asked for with nothing ready: act now, not at the next tick
        self._wanted.discard(service)
        if wanted:
            self._wanted.add(service)

    def demand(self, service: str) -> None:
        """A request began waiting for a service with no ready endpoint (the proxy's hold
        hook): an autoscaled service scaled to zero starts a replica at once."""
        if service in self._scalers:
            self._take_sample(service)

    async def _consume(self, queue: EventQueue) -> None:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise DockerLost(describe(item))
            if self._replayed:
                # The stream began before the replay ended: what both carry counts once.
                if _event_key(item) in self._replayed:
                    continue
                self._replayed.clear()
            self._classify(item)

    # -- events: the operator's stops, crashes, removals ------------------------------------

    def _classify(self, event: Mapping[str, Any]) -> None:
        actor = event.get("Actor") or {}
        attrs: Mapping[str, str] = actor.get("Attributes") or {}
        cid = str(actor.get("ID") or "")
        if not cid or not is_managed(attrs):
            return
        name = str(attrs.get("name") or cid[:12])
        try:
            service = service_of(attrs, name)
        except LabelError:
            return
        verb = str(event.get("Action") or event.get("status") or "").split(":", 1)[0].strip()
        at = event_time(event)
        svc = self.state.service(service)
        if cid in svc.parked and verb in ("kill", "die", "stop"):
            pass  # stablenet parked it
        elif verb == "start":
            if cid in svc.parked:
                svc.parked.remove(cid)
            self._operator_kill.discard(cid)
            self._oom.discard(cid)
            self._failed.pop(cid, None)
            self._confirmed.discard(cid)
            self._exited.pop(cid, None)
            if cid in svc.held:
                svc.held.remove(cid)
                self._note(service, name, "started by the operator: counted again")
        elif verb == "kill" and not self._ours(cid):
            if self._stops(cid, str(attrs.get("signal") or "")):
                self._operator_kill.add(cid)
        elif verb == "oom":
            self._oom.add(cid)
        elif verb == "die":
            code = _int(attrs.get("exitCode"))
            self._exited[cid] = code
            if self._ours(cid):
                pass
            elif cid in self._operator_kill:
                if cid not in svc.held:
                    svc.held.append(cid)
                self._note(service, name, "stopped by the operator: left stopped")
            else:
                self._failed[cid] = _why_died(code, cid in self._oom)
        elif verb == "destroy":
            self._gone.add(cid)
            operator = not self._ours(cid) and (cid in svc.held or cid in self._operator_kill)
            if cid in svc.parked:
                svc.parked.remove(cid)
            for made in self._made.values():
                made.discard(cid)
            self._retired.discard(cid)
            if cid in svc.held:
                svc.held.remove(cid)
            for table in (self._operator_kill, self._oom, self._confirmed):
                table.discard(cid)
            for mapping in (self._failed, self._exited, self._unhealthy_since, self._inspects):
                mapping.pop(cid, None)
            # Compose names the container it replaces by id, name or "<service>-<n>".
            successor = {cid, name} | {
                v for v in self._replaced_by_compose if name.endswith("-" + v)
            }
            if successor & self._replaced_by_compose:
                self._replaced_by_compose -= successor  # its successor already counts
            elif operator:
                svc.released += 1
                self._note(service, name, "removed by the operator: the count is one lower")
        elif verb in ("rename", "update"):
            self._inspects.pop(cid, None)  # e.g. compose's temporary name, now the real one
        elif verb == "create" and attrs.get(MANAGED) != "true":
            replaces = str(attrs.get(COMPOSE + "replace") or "")
            if replaces:
                # docker compose up recreating a container: the new one is made before the old
                # one is removed, and takes its slot.
                self._replaced_by_compose.add(replaces)
            elif svc.released > 0:
                svc.released -= 1
            if svc.degraded is not None:
                svc.degraded = None
                svc.streak = svc.failed_replacements = 0
                self._note(service, name, "a new container from the operator: breaker reset")
        if at:
            self.state.seen_until = max(self.state.seen_until, at)
        self._pulse()

    def _remember(self, members: Mapping[str, _Member]) -> None:
        """Keep what events taught about the containers that still exist, for a restart."""
        self.state.failed = {
            cid: why
            for cid, why in self._failed.items()
            if cid in self._confirmed and cid in members
        }
        self.state.killed = sorted(cid for cid in self._operator_kill if cid in members)

    def _being_replaced(self, m: _Member) -> bool:
        """Whether docker compose is replacing this container with a new one (which names
        it, by id, name or ``<service>-<n>``, in its com.docker.compose.replace label)."""
        gone = self._replaced_by_compose
        if not gone or m.labels.get(COMPOSE + "replace"):  # the successor itself
            return False
        return m.id in gone or any(m.name == v or m.name.endswith("-" + v) for v in gone)

    def _stops(self, cid: str, signal: str) -> bool:
        """Whether a kill with ``signal`` stops the container: a stopping signal (TERM, KILL,
        INT, QUIT, or none named), or the container's own STOPSIGNAL (docker stop sends it).
        HUP, USR1 and the like (a reload) are not a stop."""
        if not signal or signal.upper() in STOP_SIGNALS:
            return True
        ep = self.registry.snapshot.endpoints.get(cid)
        own = ep.stop_signal if ep is not None else ""
        inspect = self._inspects.get(cid)
        if not own and inspect is not None:
            own = str((inspect.get("Config") or {}).get("StopSignal") or "")
        return stops(signal, own)

    def _ours(self, cid: str) -> bool:
        """Whether stablenet is acting (or acted, to remove it) on this container."""
        return cid in self._acting or cid in self._retired

    # -- reconcile ------------------------------------------------------------------------------

    async def _reconcile(self, engine: Engine) -> None:
        listed = await engine.managed()
        self._gone &= {str(item["Id"]) for item in listed}
        now = time.time()
        snap = self.registry.snapshot
        members: dict[str, _Member] = {}
        groups: dict[str, list[_Member]] = {}
        problems: dict[str, str] = {}
        for item in listed:
            member = _member(item)
            if isinstance(member, str):
                problems.setdefault(_fallback_service(item), member)
                continue
            members[member.id] = member
            groups.setdefault(member.service, []).append(member)
        self._members = members
        for member in members.values():
            if member.id in self._failed and member.id not in self._confirmed:
                await self._confirm_failure(engine, member)
            elif member.status == "running" and member.id not in self._inspects:
                await self._inspect(engine, member.id)  # once: its restart policy, its ports
        for service in set(self.state.services) - set(groups) - set(problems):
            if self._in_flight[service]:
                continue
            self.state.services.pop(service, None)
            self._stop_scaling(service)
            if self.status.pop(service, None) is not None:
                self._note(service, "", "every container is gone: no longer managed")
        for service, problem in problems.items():
            if service not in groups:
                self.status[service] = ServiceStatus(service, problem=problem)
        for service, group in sorted(groups.items()):
            group = [m for m in group if m.id not in self._retired]  # being removed
            try:
                await self._reconcile_service(engine, service, group, snap, now)
            except (docker.errors.DockerException, OSError, DockerLost):
                raise  # the engine: the session ends and reconnects
            except Exception:  # one service's bug must not stop the others being kept
                logger.exception("controller: service %s could not be reconciled", service)
        self._remember(members)
        for cid, (name, since) in list(self._probation.items()):
            kept = members.get(cid)
            if kept is None or time.monotonic() - since >= _PROBATION:
                del self._probation[cid]
                if kept is not None and kept.status == "running":
                    self.state.service(name).failed_replacements = 0
        for gone in set(self._inspects) - set(members):
            self._inspects.pop(gone, None)
        self._save()
        self.passes += 1
        passed, self._passed = self._passed, asyncio.Event()
        passed.set()

    async def until(self, predicate: Callable[[Controller], bool]) -> None:
        """Return once ``predicate`` holds after a reconcile pass (or already holds). Bound
        the wait with ``asyncio.timeout``."""
        while not predicate(self):
            await self._passed.wait()

    async def _confirm_failure(self, engine: Engine, member: _Member) -> None:
        """A container died on its own: a failure unless Docker's restart policy brings it
        back (then it is Docker's to handle). Its state comes from inspect, not the listing:
        right after ``die`` the listing may still say running (the engine updates it once the
        exit is handled; inspect waits for that, about a second), and no later event would
        prompt a look. A container whose restart policy is known (from an inspect taken while
        it ran) to be ``no`` needs no look at all: its die event says enough."""
        known = self._inspects.get(member.id)
        policy = ((known or {}).get("HostConfig") or {}).get("RestartPolicy") or {}
        if known is not None and (policy.get("Name") or "no") == "no":
            member.status = "exited"
        else:
            inspect = await engine.inspect(member.id)
            if inspect is None:
                return
            if _docker_restarts(inspect):
                self._failed.pop(member.id, None)
                return
            member.status = str((inspect.get("State") or {}).get("Status") or "exited")
        why = self._failed[member.id]
        self._confirmed.add(member.id)
        replacement = self._probation.pop(member.id, None) is not None
        logger.warning("controller: %s (service %s) %s", member.name, member.service, why)
        self._note(member.service, member.name, f"failed: {why}")
        self._count_failure(member.service, why, replacement)

    async def _reconcile_service(
        self, engine: Engine, service: str, group: list[_Member], snap: Snapshot, now: float
    ) -> None:
        # A container destroyed while this pass awaited is not counted (as stopped by the
        # operator, it would fill a slot: a failed replica discarded, or a good one removed).
        group = [m for m in group if m.id not in self._gone]
        if not group:
            return
        svc = self.state.service(service)
        lead = max(group, key=lambda m: (m.labels.get(MANAGED) != "true", m.created))
        status = self.status.setdefault(service, ServiceStatus(service))
        try:
            spec = spec_of(lead.labels, lead.name, self.config.heal)
        except LabelError as exc:
            status.problem = str(exc)
            return
        status.problem = None
        desired = spec.replicas if svc.scale is None else svc.scale
        if desired is not None:
            desired = max(0, desired - svc.released)
        replicas = tuple(self._replica(m, svc, snap, now) for m in group)
        scaling: ScaleSpec | None = None
        if is_autoscaled(lead.labels) and self.concurrency is no_load:
            status.problem = (
                "autoscaling needs stablenet's proxy (proxy.enabled = false): it scales on the "
                "requests the proxy sees; the service keeps its fixed count"
            )
            self._stop_scaling(service)
        elif is_autoscaled(lead.labels):
            try:
                scaling = scale_spec(lead.labels, lead.name, self.config)
            except LabelError as exc:
                status.problem = str(exc)
                return
            desired = self._autoscale(service, scaling, replicas, status)
            self._front(service, snap, replicas, lead.labels)
        else:
            self._stop_scaling(service)
        refused = await self._refusal(engine, spec, desired, replicas)
        if refused is not None and status.refused != refused:
            logger.warning("controller: service %s cannot be replicated: %s", service, refused)
        view = View(
            name=service,
            replicas=replicas,
            desired=desired,
            heal=spec.heal,
            in_flight=self._in_flight[service],
            creating=self._on_the_way(service, group),
            next_try=self._next_try(svc, now),
            degraded=svc.degraded,
            refused=refused,
            park=scaling is not None,
        )
        status.desired = desired
        status.heal = spec.heal
        status.ready = ready_count(view)
        status.replicas = len(counted(view))
        status.held = sorted(r.name for r in replicas if r.held)
        status.degraded = svc.degraded
        status.refused = refused
        status.next_retry_at = view.next_try if view.next_try > now else None
        for action in decide(view, now, self.config.unhealthy_grace):
            self._launch(service, action, group)
        status.in_flight = self._in_flight[service]

    def _on_the_way(self, service: str, group: list[_Member]) -> int:
        made = self._made.get(service)
        if made:
            made -= {m.id for m in group}  # listed now: counted as what it is
        return self._creating[service] + len(made or ())

    def _autoscale(
        self, service: str, spec: ScaleSpec, replicas: tuple[Replica, ...], status: ServiceStatus
    ) -> int:
        """The count the autoscaler recommends now; a change is an event with its reason."""
        now = time.monotonic()
        # A replica being parked runs until it has drained, but no longer counts: counted, it
        # would turn the step down just taken back into a step up.
        current = sum(
            1
            for r in replicas
            if r.status in LIVE
            and not r.failed
            and not r.parked
            and self._acting.get(r.id) != "park"
        )
        ready = sum(1 for r in replicas if r.ready)
        scaler = self._scalers.get(service)
        if scaler is None or scaler.spec != spec:
            scaler = self._scalers[service] = Scaler(spec, now, current)
        if self._in_flight[service]:
            current = max(current, self._recommended.get(service, current))
        rec = scaler.recommend(now, current, ready)
        previous = self._recommended.get(service)
        self._recommended[service] = rec.desired
        if previous is not None and rec.desired != previous:
            self._note(service, "", f"scale {previous} -> {rec.desired}: {rec.reason}")
            direction = "scale_up" if rec.desired > previous else "scale_down"
            kind = "idle" if "no request" in rec.reason else "panic" if rec.panicking else "load"
            self.actions[(service, direction, kind)] += 1
        status.autoscale = {
            "min": spec.min,
            "max": spec.max,
            "target": spec.target,
            "window": spec.window,
            "down_window": spec.down_window,
            "idle": spec.idle,
            "concurrency": round(rec.stable, 3),
            "panic_concurrency": round(rec.panic, 3),
            "panic": rec.panicking,
            "recommendation": rec.desired,
            "reason": rec.reason,
        }
        return rec.desired

    def _front(
        self,
        service: str,
        snap: Snapshot,
        replicas: tuple[Replica, ...],
        labels: Mapping[str, str],
    ) -> None:
        """Keep an autoscaled service routed, and answered with the proxy's address, with or
        without running replicas (names and listeners from its labels when none runs)."""
        endpoints = snap.services.get(service, ())
        if endpoints:
            hosts, listeners = endpoints[0].http_hosts, endpoints[0].listeners
        else:
            hosts, listeners = front_names(labels)
        parked = not any(r.status in LIVE and not r.parked for r in replicas)
        front = Front(tuple(hosts), tuple(listeners), parked)
        if front != snap.fronted.get(service):
            self.registry.apply([SetFront(service, front)])

    def _stop_scaling(self, service: str) -> None:
        self._scalers.pop(service, None)
        self._recommended.pop(service, None)
        self._seen_requests.pop(service, None)
        if service in self.registry.snapshot.fronted:
            self.registry.apply([SetFront(service, None)])

    def _replica(self, m: _Member, svc: ServiceState, snap: Snapshot, now: float) -> Replica:
        ep = snap.endpoints.get(m.id)
        unhealthy = m.status == "running" and (
            (ep is not None and ep.state is EpState.UNHEALTHY) or "(unhealthy)" in m.status_text
        )
        since: float | None = None
        if unhealthy:
            since = self._unhealthy_since.setdefault(m.id, now)
        else:
            self._unhealthy_since.pop(m.id, None)
        failed = self._failed.get(m.id) if m.id in self._confirmed else None
        found_stopped = (
            m.status in ("exited", "dead")
            and m.id not in self._failed
            and m.id not in self._acting
            and m.id not in svc.parked
        )
        starting = self._acting.get(m.id) == "start"  # a parked or unstarted one, starting
        return Replica(
            id=m.id,
            name=m.name,
            created=m.created,
            status="created" if starting else m.status,
            ready=self._ready(m, snap),
            unhealthy_since=since,
            held=m.id in svc.held or found_stopped,
            failed=failed,
            ours=m.labels.get(MANAGED) == "true",
            started=m.status != "created",
            busy=m.id in self._acting,
            parked=not starting and m.id in svc.parked and m.status in ("exited", "dead"),
            replaced=self._being_replaced(m),
        )

    def _ready(self, m: _Member, snap: Snapshot) -> bool:
        """Ready as the proxy sees it; for a container the registry does not carry (not
        exposed, or a label problem), running and not failing Docker's HEALTHCHECK."""
        if m.status != "running":
            return False
        ep = snap.endpoints.get(m.id)
        if ep is not None:
            return ep.state is EpState.READY
        if m.id in snap.problems or any(e.service == m.service for e in snap.endpoints.values()):
            return False
        return "(health: starting)" not in m.status_text and "(unhealthy)" not in m.status_text

    async def _refusal(
        self, engine: Engine, spec: Spec, desired: int | None, replicas: tuple[Replica, ...]
    ) -> str | None:
        if not creates_containers(Spec(desired, spec.heal)):
            return None
        for replica in sorted(replicas, key=lambda r: (r.ours, -r.created)):
            inspect = await self._inspect(engine, replica.id)
            if inspect is not None:
                return unreplicable(inspect)
        return None

    async def _inspect(self, engine: Engine, cid: str) -> Mapping[str, Any] | None:
        cached = self._inspects.get(cid)
        if cached is None:
            cached = await engine.inspect(cid)
            if cached is not None:
                self._inspects[cid] = cached
        return cached

    def _next_try(self, svc: ServiceState, now: float) -> float:
        cfg = self.config
        return next_attempt(
            svc.streak, svc.last_failure, now, cfg.backoff, cfg.backoff_max, cfg.backoff_reset
        )

    def _count_failure(self, service: str, why: str, replacement: bool = False) -> None:
        """One more failure in a row: the backoff grows. A replacement that never got ready
        also counts toward the breaker, which trips at max(breaker, half the count) of them
        in a row (one that gets ready starts that count again)."""
        svc = self.state.service(service)
        now = time.time()
        if now - svc.last_failure > self.config.backoff_reset:
            svc.streak = 0
        svc.streak += 1
        svc.last_failure = now
        status = self.status.get(service)
        desired = status.desired if status is not None else None
        limit = breaker_limit(desired, self.config.breaker)
        if replacement:
            svc.failed_replacements += 1
        if svc.failed_replacements >= limit and svc.degraded is None:
            svc.degraded = (
                f"{svc.failed_replacements} replacements failed in a row (last: {why}); the "
                "last broken container is kept for inspection; `stablenet scale` or a new "
                "container from the operator resets this"
            )
            logger.error("controller: service %s is degraded: %s", service, svc.degraded)
            self._note(service, "", f"degraded: {svc.degraded}")
        elif svc.streak > 1:
            delay = backoff_delay(svc.streak, self.config.backoff, self.config.backoff_max)
            self._note(service, "", f"failure {svc.streak} in a row: next attempt in {delay:g}s")
        self._save()

    # -- actions --------------------------------------------------------------------------------

    def _launch(self, service: str, action: Action, group: list[_Member]) -> None:
        kind = type(action).__name__.lower()
        target = action.template if isinstance(action, Grow) else action.target
        name = next((m.name for m in group if m.id == target), target[:12])
        if not isinstance(action, Grow):
            self._acting[target] = kind
        self._in_flight[service] += 1
        if isinstance(action, Grow) or (isinstance(action, Heal) and action.how == "replace"):
            self._creating[service] += 1  # until _grow has made the container
        last = LastAction(
            kind if not isinstance(action, Heal) else action.how, name, action.reason, time.time()
        )
        self.status[service].last = last
        self.actions[(service, last.action, _reason_kind(action.reason))] += 1
        logger.info(
            "controller: %s %s of service %s: %s", last.action, name, service, action.reason
        )
        task = asyncio.get_running_loop().create_task(
            self._operate(service, action, last), name=f"controller-{kind}-{service}"
        )
        self._ops.add(task)
        task.add_done_callback(self._ops.discard)

    async def _operate(self, service: str, action: Action, last: LastAction) -> None:
        engine = self._engine
        target = "" if isinstance(action, Grow) else action.target
        try:
            if engine is None:
                raise DockerLost("not connected")
            match action:
                case Start():
                    result = await self._start(engine, service, action.target)
                case Grow():
                    result = await self._grow(engine, service, action.template, None)
                case Heal(how="replace"):
                    result = await self._grow(engine, service, action.target, action.target)
                case Heal():
                    result = await self._restart(engine, service, action.target)
                case Shrink():
                    result = await self._retire(engine, action.target)
                case Park():
                    result = await self._park(service, engine, action.target)
                case Discard():
                    self._retired.add(action.target)
                    await engine.remove(action.target)
                    result = "removed"
        except asyncio.CancelledError:
            last.result = "interrupted"
            raise
        except Exception as exc:
            result = f"failed: {describe(unwrap(exc))}"
            logger.warning("controller: %s of service %s %s", last.action, service, result)
            if isinstance(unwrap(exc), docker.errors.APIError):
                self._count_failure(service, result)  # the engine refused: back off
        finally:
            self._in_flight[service] -= 1
            if target:
                self._acting.pop(target, None)
            self._pulse()
        last.result = result
        self._note(service, last.target, f"{last.action} ({last.reason}): {result}")

    async def _start(self, engine: Engine, service: str, cid: str) -> str:
        changed = self._changed
        await engine.start(cid)
        return await self._settle(engine, service, cid, changed, time.monotonic())

    async def _grow(self, engine: Engine, service: str, template: str, replaced: str | None) -> str:
        """Create a replica from ``template``; once it is ready, retire ``replaced``."""
        began = time.monotonic()
        try:
            inspect = await engine.inspect(template)
            if inspect is None:
                raise DockerLost(f"template container {template[:12]} is gone")
            plan = replica_plan(inspect, service)
            cid, name = await self._create(engine, service, plan)
            self._acting[cid] = "create"
            self._made.setdefault(service, set()).add(cid)
        finally:
            self._creating[service] -= 1  # taken at launch
        try:
            changed = self._changed
            try:
                await engine.start(cid)
            except docker.errors.APIError as exc:
                why = f"cannot start: {describe(exc)}"
                self._failed[cid] = why
                self._confirmed.add(cid)
                self._count_failure(service, why, replacement=True)
                return f"{name} {why}"
            outcome = await self._settle(engine, service, cid, changed, began)
        finally:
            self._acting.pop(cid, None)
        if not outcome.startswith("ready"):
            if replaced is not None and self._members.get(replaced, None) is not None:
                if self._members[replaced].status in ("exited", "dead"):
                    self._retired.add(replaced)
                    await engine.remove(replaced)  # keep only the newest broken container
            return f"{name} {outcome}"
        if replaced is not None:
            await self._retire(engine, replaced)
            return f"{name} {outcome}; replaced {self._name(replaced)}"
        return f"{name} {outcome}"

    async def _create(self, engine: Engine, service: str, plan: Any) -> tuple[str, str]:
        taken = {m.name for m in self._members.values()} | self._reserved
        number = 0
        for _ in range(_NAME_TRIES):
            number += 1
            while f"{service}-{number}" in taken:
                number += 1
            name = f"{service}-{number}"
            self._reserved.add(name)
            try:
                return await engine.create(plan, name), name
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: the name is taken by a container we don't list
                    raise
                taken.add(name)
            finally:
                self._reserved.discard(name)
        raise DockerLost(f"no free name {service}-N after {_NAME_TRIES} tries")

    async def _restart(self, engine: Engine, service: str, cid: str) -> str:
        began = time.monotonic()
        member = self._members.get(cid)
        if member is not None and member.status == "running":
            await self._drain(cid)
        changed = self._changed
        ep = self.registry.snapshot.endpoints.get(cid)
        await engine.restart(cid, stop_timeout(ep) if ep is not None else None)
        return await self._settle(engine, service, cid, changed, began)

    async def _settle(
        self, engine: Engine, service: str, cid: str, changed: asyncio.Event, began: float
    ) -> str:
        """Wait until the container is ready, or it dies, or controller.ready_timeout passes.
        A container that does not get ready counts as a failure and is left for healing."""
        deadline = began + self.config.ready_timeout
        while True:
            member = await self._fresh(engine, cid)
            if member is None:
                why = "was removed before it was ready"
                break
            if self._ready(member, self.registry.snapshot):
                # On probation: it counts as a good replacement once it has stayed up a while.
                self._probation[cid] = (service, time.monotonic())
                return f"ready in {time.monotonic() - began:.2f}s"
            if member.status in ("exited", "dead"):
                code = self._exited.get(cid)
                why = _why_died(code if code is not None else -1, cid in self._oom)
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = f"not ready after {self.config.ready_timeout:g}s"
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, _TICK)):
                    await changed.wait()
            changed = self._changed
        self._failed[cid] = why
        self._confirmed.add(cid)
        self._count_failure(service, why, replacement=True)
        return why

    async def _fresh(self, engine: Engine, cid: str) -> _Member | None:
        inspect = await engine.inspect(cid)
        if inspect is None:
            return None
        state = inspect.get("State") or {}
        health = (state.get("Health") or {}).get("Status")
        config = inspect.get("Config") or {}
        labels = config.get("Labels") or {}
        name = str(inspect.get("Name") or "").lstrip("/")
        text = "Up" if state.get("Running") else "Exited"
        if health == "starting":
            text += " (health: starting)"
        elif health:
            text += f" ({health})"
        known = self._members.get(cid)
        try:
            service = service_of(labels, name)
        except LabelError:
            service = known.service if known is not None else name
        member = _Member(
            cid, name, service, labels, str(state.get("Status") or ""), text,
            self._members[cid].created if cid in self._members else time.time(),
        )  # fmt: skip
        self._members[cid] = member
        return member

    async def _retire(self, engine: Engine, cid: str) -> str:
        """Drain (no new requests; in-flight ones finish, up to controller.drain_timeout),
        stop with the container's own stop timeout, remove."""
        self._acting.setdefault(cid, "retire")
        self._retired.add(cid)
        try:
            await self._drain(cid)
            ep = self.registry.snapshot.endpoints.get(cid)
            with contextlib.suppress(docker.errors.NotFound):
                await engine.stop(cid, stop_timeout(ep) if ep is not None else None)
            await engine.remove(cid)
        except BaseException:
            self._retired.discard(cid)  # not removed: seen (and decided on) again
            raise
        finally:
            self._acting.pop(cid, None)
        return "drained and removed"

    async def _park(self, service: str, engine: Engine, cid: str) -> str:
        """Drain and stop, but keep the container: starting it again is faster than a new one."""
        parked = self.state.service(service).parked
        if cid not in parked:
            parked.append(cid)  # before the stop: its events are stablenet's own
        self._save()
        await self._drain(cid)
        ep = self.registry.snapshot.endpoints.get(cid)
        with contextlib.suppress(docker.errors.NotFound):
            await engine.stop(cid, stop_timeout(ep) if ep is not None else None)
        return "drained and stopped (parked)"

    async def _drain(self, cid: str) -> None:
        if cid in self.registry.snapshot.endpoints:
            self.registry.apply([Drain(cid)])
        deadline = time.monotonic() + self.config.drain_timeout
        # The proxy's per-endpoint count has no notification; a short poll bounds the wait.
        while self.busy(cid) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_DRAIN_POLL)

    # -- the operator's count -----------------------------------------------------------------

    def scale(self, service: str, replicas: int) -> str | None:
        """Set a service's count (persisted); None, or why it cannot be done."""
        if not self.config.enabled:
            return "the controller is off (controller.enabled = false)"
        if not self.active:
            return (
                f"another stablenet (pid {self.dir.holder()}) acts on this engine; "
                "scale through its admin API"
            )
        if service not in self.status:
            return (
                f"no managed service named {service!r}; label its containers with "
                "stablenet.replicas=N or stablenet.heal"
            )
        if service in self._scalers:
            spec = self._scalers[service].spec
            return (
                f"service {service!r} is autoscaled between {spec.min} and {spec.max} replicas; "
                "change its stablenet.replicas.min / stablenet.replicas.max labels instead"
            )
        svc = self.state.service(service)
        svc.scale = replicas
        svc.released = 0
        svc.streak = svc.failed_replacements = 0
        svc.degraded = None
        self._save()
        self._note(service, "", f"count set to {replicas} by `stablenet scale`")
        self.actions[(service, "scale", "operator")] += 1
        self._pulse()
        return None

    # -- reporting ----------------------------------------------------------------------------

    def services(self) -> dict[str, dict[str, Any]]:
        return {name: status.as_dict() for name, status in sorted(self.status.items())}

    def _note(self, service: str, endpoint: str, message: str) -> None:
        logger.info("controller: %s%s: %s", service, f"/{endpoint}" if endpoint else "", message)
        if self.log is not None:
            self.log.add(service, endpoint, "controller", message)

    def _name(self, cid: str) -> str:
        member = self._members.get(cid)
        return member.name if member is not None else cid[:12]

    def _save(self) -> None:
        if not self.active:
            return
        data = self.state.encode()
        if data == self._written:
            return
        try:
            self.dir.save(data)
            self._written = data
        except OSError as exc:
            logger.error("controller: cannot write its state to %s: %s", self.dir.path, exc)


def _member(item: Mapping[str, Any]) -> _Member | str:
    labels: Mapping[str, str] = item.get("Labels") or {}
    names = item.get("Names") or []
    name = str(names[0]).lstrip("/") if names else str(item["Id"])[:12]
    try:
        service = service_of(labels, name)
    except LabelError as exc:
        return str(exc)
    return _Member(
        id=str(item["Id"]),
        name=name,
        service=service,
        labels=labels,
        status=str(item.get("State") or ""),
        status_text=str(item.get("Status") or ""),
        created=float(item.get("Created") or 0),
    )


def _fallback_service(item: Mapping[str, Any]) -> str:
    names = item.get("Names") or []
    return str(names[0]).lstrip("/") if names else str(item["Id"])[:12]


def _event_key(event: Mapping[str, Any]) -> tuple[Any, ...]:
    actor = event.get("Actor") or {}
    return (event.get("timeNano"), actor.get("ID"), event.get("Action"))


def _docker_restarts(inspect: Mapping[str, Any]) -> bool:
    """Whether Docker's own restart policy brings this exited container back."""
    state = inspect.get("State") or {}
    if state.get("Restarting") or state.get("Running"):
        return True
    policy = (inspect.get("HostConfig") or {}).get("RestartPolicy") or {}
    name = policy.get("Name") or "no"
    if name in ("always", "unless-stopped"):
        return True
    if name == "on-failure" and _int(state.get("ExitCode")) != 0:
        limit = _int(policy.get("MaximumRetryCount"))
        return limit == 0 or _int(inspect.get("RestartCount")) < limit
    return False


def _why_died(code: int, oom: bool) -> str:
    if oom:
        return "OOM-killed"
    if code == 137:
        return "killed (SIGKILL from outside Docker)"
    if code > 128:
        return f"killed by signal {code - 128}"
    if code < 0:
        return "exited"
    return f"exited with code {code}"


def _reason_kind(reason: str) -> str:
    """A short, bounded label value for metrics."""
    for word, kind in (
        ("OOM", "oom"),
        ("killed", "killed"),
        ("exited", "exited"),
        ("unhealthy", "unhealthy"),
        ("cannot start", "start_failed"),
        ("not ready", "not_ready"),
        ("for a count", "above_count"),
        ("replicas", "below_count"),
        ("never started", "unstarted"),
        ("count is met", "surplus"),
    ):
        if word in reason:
            return kind
    return "other"


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
