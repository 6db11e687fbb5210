"""Event order: the pure rules of EventOrder (no I/O, time as a parameter), then DockerSource
against the scripted engine of tests/fake_engine.py, which decides exactly when each inspect
returns. The real-engine behaviour is in test_docker_source.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import pytest

from stablenet.config import DockerConfig, HealthConfig
from stablenet.docker.order import DEFAULT_STOP_TIMEOUT, EventOrder
from stablenet.docker.source import DockerSource
from stablenet.docker.translate import Action, Settings
from stablenet.model import Change, Drain, Endpoint, Remove, State, Undrain, Upsert
from stablenet.registry import Registry, Snapshot
from tests.conftest import start_source
from tests.fake_engine import FakeEngine
from tests.helpers import until

SETTINGS = Settings.from_config(DockerConfig(), HealthConfig())
WITHIN = 10.0  # bound for anything the fake engine does; it answers at once unless held
T0 = 1_000_000.0


def ep(cid: str = "c1", started_at: float = T0, **kw: object) -> Endpoint:
    return Endpoint(
        id=cid,
        name=f"n-{cid}",
        service="web",
        address="10.0.0.2",
        port=80,
        network="bridge",
        started_at=started_at,
        **kw,  # type: ignore[arg-type]
    )


# -- the pure rules ---------------------------------------------------------------------------


def inspecting(order: EventOrder, cid: str = "c1") -> None:
    """An inspect event arrives and its worker begins the inspect."""
    assert order.event(Action.INSPECT, cid, T0, "", None, now=T0).start_worker
    assert order.begin(cid)


def test_a_remove_while_an_inspect_runs_voids_its_result() -> None:
    order = EventOrder()
    inspecting(order)
    step = order.event(Action.REMOVE, "c1", T0 + 1, "", None, now=T0 + 1)
    assert step.changes == (Remove("c1", T0 + 1),)  # applied at once, not after the inspect
    assert order.finish("c1", Upsert(ep()), None, now=T0 + 2) == []
    assert not order.begin("c1")  # nothing more asked: the worker ends


def test_a_kill_read_before_the_inspect_begins_still_drains_its_result() -> None:
    """start then kill in one burst: the worker begins only after both were read."""
    order = EventOrder()
    assert order.event(Action.INSPECT, "c1", T0, "", None, now=T0).start_worker
    step = order.event(Action.DRAIN, "c1", T0 + 1, "", None, now=T0 + 1)
    assert step.changes == (Drain("c1", T0 + 1),)  # applied at once: a no-op, not registered
    assert order.begin("c1")
    assert order.finish("c1", Upsert(ep()), None, now=T0 + 2) == [
        Upsert(ep()),
        Drain("c1", T0 + 1),
    ]


def test_a_remove_read_before_the_inspect_begins_does_not_void_it() -> None:
    """kill, die and start again before the worker begins: the inspect finds the new
    incarnation, which is neither gone nor draining."""
    order = EventOrder()
    assert order.event(Action.INSPECT, "c1", T0, "", None, now=T0).start_worker
    order.event(Action.DRAIN, "c1", T0 + 1, "", None, now=T0 + 1)
    order.event(Action.REMOVE, "c1", T0 + 2, "", None, now=T0 + 2)
    order.event(Action.INSPECT, "c1", T0 + 3, "", None, now=T0 + 3)
    assert order.begin("c1")
    fresh = Upsert(ep(started_at=T0 + 3))
    assert order.finish("c1", fresh, None, now=T0 + 4) == [fresh]


def test_a_deadline_inspect_lost_with_the_connection_is_asked_again() -> None:
    order = EventOrder()
    order.event(Action.DRAIN, "c1", T0, "", ep(), now=T0)
    deadline = T0 + DEFAULT_STOP_TIMEOUT + order.margin
    draining = {"c1": ep(draining=True)}
    assert order.due(draining, now=deadline) == (["c1"], None)
    order.reset()  # the engine went away before the inspect answered
    assert order.due(draining, now=deadline + 1) == (["c1"], None)


def test_a_drain_while_an_inspect_runs_applies_on_top_of_its_result() -> None:
    order = EventOrder()
    inspecting(order)
    step = order.event(Action.DRAIN, "c1", T0 + 1, "15", None, now=T0 + 1)
    assert step.changes == (Drain("c1", T0 + 1),)
    assert order.finish("c1", Upsert(ep()), None, now=T0 + 2) == [
        Upsert(ep()),
        Drain("c1", T0 + 1),
    ]


def test_the_own_stop_signal_of_a_container_not_yet_registered_drains_it() -> None:
    order = EventOrder()
    inspecting(order)
    # Not a stop signal for a container we know nothing about yet...
    assert order.event(Action.SIGNAL, "c1", T0 + 1, "28", None, now=T0 + 1).changes == ()
    # ...but the inspect says WINCH (28) is this one's STOPSIGNAL.
    fresh = ep(stop_signal="SIGWINCH")
    assert order.finish("c1", Upsert(fresh), None, now=T0 + 2) == [
        Upsert(fresh),
        Drain("c1", T0 + 1),
    ]


def test_inspect_events_for_a_busy_container_coalesce_into_one_more_inspect() -> None:
    order = EventOrder()
    inspecting(order)
    for _ in range(3):
        assert not order.event(Action.INSPECT, "c1", T0, "", None, now=T0).start_worker
    assert order.finish("c1", Upsert(ep()), None, now=T0) == [Upsert(ep())]
    assert order.begin("c1")  # one more, after the first
    assert order.finish("c1", Upsert(ep()), None, now=T0) == [Upsert(ep())]
    assert not order.begin("c1")
    # Another container is not held up by this one: it gets a worker of its own.
    assert order.event(Action.INSPECT, "c2", T0, "", None, now=T0).start_worker


def drained_at(order: EventOrder, at: float, current: Endpoint) -> None:
    step = order.event(Action.DRAIN, current.id, at, "15", current, now=at)
    assert step.changes == (Drain(current.id, at),)


def test_a_drain_outlived_past_stop_timeout_and_margin_is_routed_again() -> None:
    order = EventOrder(margin=5.0)
    draining = ep(draining=True)  # the registry's entry after the drain
    drained_at(order, T0 + 100, ep())
    deadline = T0 + 100 + DEFAULT_STOP_TIMEOUT + 5.0
    # Before the deadline nothing is due; the next deadline is returned (time is a parameter).
    assert order.due({"c1": draining}, now=deadline - 0.1) == ([], deadline)
    # An inspect for another reason before the deadline leaves it draining.
    inspecting(order)
    assert order.finish("c1", Upsert(ep()), draining, now=deadline - 0.1) == [Upsert(ep())]
    assert not order.begin("c1")
    # At the deadline it is due once; the inspect (same StartedAt, running) routes it again.
    assert order.due({"c1": draining}, now=deadline) == (["c1"], None)
    assert order.due({"c1": draining}, now=deadline + 1) == ([], None)
    inspecting(order)
    assert order.finish("c1", Upsert(ep()), draining, now=deadline) == [
        Upsert(ep()),
        Undrain("c1", T0),
    ]


def test_the_containers_own_stop_timeout_sets_the_deadline() -> None:
    order = EventOrder(margin=0.5)
    drained_at(order, T0 + 100, ep(stop_timeout=2.0))
    assert order.due({"c1": ep(stop_timeout=2.0, draining=True)}, now=T0 + 100) == (
        [],
        T0 + 102.5,
    )


def test_no_route_again_for_another_incarnation_or_a_container_that_stopped() -> None:
    order = EventOrder(margin=5.0)
    draining = ep(draining=True)
    late = T0 + 1000
    drained_at(order, T0 + 100, ep())
    inspecting(order)
    restarted = ep(started_at=T0 + 500)  # not the container that was told to stop
    assert order.finish("c1", Upsert(restarted), draining, now=late) == [Upsert(restarted)]
    assert not order.begin("c1")
    inspecting(order)
    assert order.finish("c1", Remove("c1"), draining, now=late) == [Remove("c1")]
    assert not order.begin("c1")
    # A draining entry whose drain time is unknown (the record went with the stop) counts
    # from now.
    assert order.due({"c1": draining}, now=late) == ([], late + DEFAULT_STOP_TIMEOUT + 5.0)


def test_a_die_forgets_the_drain_and_a_resync_keeps_only_listed_ones() -> None:
    order = EventOrder(margin=1.0)
    drained_at(order, T0, ep("a"))
    drained_at(order, T0, ep("b"))
    order.event(Action.REMOVE, "a", T0 + 1, "", None, now=T0 + 1)
    order.retain({"c"})  # b is no longer listed either
    fresh = {"a": ep("a"), "b": ep("b")}  # registered again, not draining: nothing tracked
    assert order.due(fresh, now=T0 + 100) == ([], None)


# -- DockerSource against the scripted engine -------------------------------------------------


class Recording(Registry):
    """A registry that keeps every version it publishes, so a state that lasted a moment is
    still seen (watch() is level-triggered and may skip it)."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[Snapshot] = []

    def apply(self, changes: Iterable[Change]) -> Snapshot:
        before = self.snapshot
        snap = super().apply(changes)
        if snap is not before:
            self.history.append(snap)
        return snap


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    fake = FakeEngine()
    yield fake
    fake.release_all()


@dataclass
class Scene:
    """A DockerSource following the fake engine into a recording registry."""

    engine: FakeEngine
    registry: Recording
    source: DockerSource
    sentinel: str  # a container only ``handled`` uses

    async def handled(self) -> None:
        """Return once every event emitted so far has been handled: one consumer takes events
        in order, so when the sentinel's die (applied as it is read) shows, the rest came
        first. The sentinel is started again for the next call."""
        sentinel = self.sentinel
        self.engine.die(sentinel)
        await until(self.registry, lambda s: sentinel not in s.endpoints, WITHIN)
        self.engine.start(sentinel)
        await until(self.registry, lambda s: sentinel in s.endpoints, WITHIN)


@contextlib.asynccontextmanager
async def following(engine: FakeEngine, drain_margin: float = 5.0) -> AsyncIterator[Scene]:
    sentinel = engine.add("sentinel")
    registry = Recording()
    source, task = await start_source(
        registry, SETTINGS, client_factory=engine.client, drain_margin=drain_margin
    )
    try:
        yield Scene(engine, registry, source, sentinel)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def state(snap: Snapshot, cid: str) -> State | None:
    found = snap.endpoints.get(cid)
    return None if found is None else found.state


async def test_a_die_is_applied_while_another_containers_inspect_is_held(
    engine: FakeEngine,
) -> None:
    victim = engine.add("victim")
    slow = engine.add("slow")
    async with following(engine) as scene:
        registry = scene.registry
        assert {victim, slow} <= set(registry.snapshot.endpoints)
        hold = engine.hold(slow)
        engine.emit(slow, "health_status: healthy")
        await hold.begun()
        engine.die(victim)
        await until(registry, lambda s: victim not in s.endpoints, WITHIN)
        assert engine.in_flight[slow] == 1  # removed while the other inspect still waits


async def test_a_start_inspect_returning_after_a_later_die_does_not_re_add(
    engine: FakeEngine,
) -> None:
    async with following(engine) as scene:
        registry = scene.registry
        box = engine.add("box")  # created after the listing: only its events tell
        old_address = engine.address(box)
        hold = engine.hold(box)
        engine.emit(box, "start")
        await hold.begun()  # the inspect has read "running at old_address"
        engine.die(box)
        await scene.handled()  # the die is handled while the inspect is still held
        after_die = len(registry.history)
        engine.unhold(box)  # the stale answer comes back now
        engine.start(box)  # restarted: the next inspect runs after the stale one
        new_address = engine.address(box)
        await until(registry, lambda s: box in s.endpoints, WITHIN)
        later = registry.history[after_die:]
        seen = [s.endpoints[box].address for s in later if box in s.endpoints]
        assert seen == [new_address]  # the stale result was discarded, never applied
        assert old_address not in registry.snapshot.by_address
        assert engine.most_in_flight[box] == 1


async def test_inspects_of_one_container_run_in_turn_while_others_proceed(
    engine: FakeEngine,
) -> None:
    busy = engine.add("busy")
    async with following(engine) as scene:
        registry = scene.registry
        first = engine.hold(busy)
        engine.emit(busy, "health_status: healthy")
        await first.begun()
        engine.emit(busy, "rename")
        engine.emit(busy, "update")
        other = engine.add("other")
        engine.emit(other, "start")
        # Another container is inspected and registered while this one's inspect is held.
        await until(registry, lambda s: other in s.endpoints, WITHIN)
        assert engine.inspects[busy] == 2  # the listing's, then the held one: none alongside
        second = engine.hold(busy)
        first.release()
        await second.begun()  # the two queued events made one more inspect, after the first
        assert engine.inspects[busy] == 3
        assert engine.most_in_flight[busy] == 1
        engine.unhold(busy)


async def test_a_kill_during_a_held_start_inspect_leaves_it_draining(engine: FakeEngine) -> None:
    async with following(engine) as scene:
        registry = scene.registry
        box = engine.add("box")
        hold = engine.hold(box)
        engine.emit(box, "start")
        await hold.begun()
        engine.kill(box, "15")  # the process ignores it and keeps running
        await scene.handled()
        engine.unhold(box)
        snap = await until(registry, lambda s: box in s.endpoints, WITHIN)
        assert state(snap, box) is State.DRAINING
        assert all(state(s, box) in (None, State.DRAINING) for s in registry.history)


async def test_resync_inspects_do_not_hold_up_event_inspects(engine: FakeEngine) -> None:
    listed = [engine.add(f"listed{i}") for i in range(6)]
    async with following(engine) as scene:
        registry, source = scene.registry, scene.source
        holds = [engine.hold(cid) for cid in listed]
        resync = asyncio.get_running_loop().create_task(source.resync(engine.client()))
        for hold in holds[:4]:  # the resync's pool is busy with held inspects
            await hold.begun()
        fresh = engine.add("fresh")
        engine.emit(fresh, "start")
        await until(registry, lambda s: fresh in s.endpoints, WITHIN)
        assert not resync.done()
        engine.release_all()
        async with asyncio.timeout(WITHIN):
            await resync
        assert set(registry.snapshot.endpoints) == {*listed, fresh, scene.sentinel}


async def test_a_container_that_ignores_its_stop_signal_is_routed_again(
    engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stablenet.docker.source")
    stubborn = engine.add("stubborn", stop_timeout=0)
    async with following(engine, drain_margin=0.2) as scene:
        registry = scene.registry
        engine.kill(stubborn, "15")
        await until(registry, lambda s: state(s, stubborn) is State.DRAINING, WITHIN)
        snap = await until(registry, lambda s: state(s, stubborn) is State.READY, WITHIN)
        assert snap.endpoints[stubborn].address == engine.address(stubborn)
        assert "ignored its stop signal, so it is routed again" in caplog.text
        # Told to stop again, it drains again; when it then dies it is removed for good.
        engine.kill(stubborn, "15")
        await until(registry, lambda s: state(s, stubborn) is State.DRAINING, WITHIN)
        engine.die(stubborn)
        await until(registry, lambda s: stubborn not in s.endpoints, WITHIN)
