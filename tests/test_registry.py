"""Registry semantics without Docker or sockets: versions, no-op writes, watch(), resync."""

from __future__ import annotations

import asyncio

from stablenet.model import (
    Drain,
    Endpoint,
    HealthSpec,
    Problem,
    Remove,
    Resync,
    SetSynced,
    SetVerdict,
    State,
    Undrain,
    Upsert,
    Verdict,
)
from stablenet.registry import Registry

CHECK = HealthSpec(path="/healthz", interval=1.0, timeout=0.5, rise=1, fall=2)


def ep(cid: str, address: str = "10.0.0.2", service: str = "web", **kw: object) -> Endpoint:
    return Endpoint(
        id=cid,
        name=f"c-{cid}",
        service=service,
        address=address,
        port=80,
        network="bridge",
        addresses=(address,),
        **kw,  # type: ignore[arg-type]
    )


def state_of(reg: Registry, cid: str) -> State:
    return reg.snapshot.endpoints[cid].state


def test_versions_and_indexes() -> None:
    reg = Registry()
    assert reg.snapshot.version == 0
    snap = reg.apply(
        [Upsert(ep("a")), Upsert(ep("b", "10.0.0.3")), Upsert(ep("x", "10.0.1.9", "db"))]
    )
    assert snap.version == 1
    assert [e.id for e in snap.services["web"]] == ["a", "b"]
    assert list(snap.services) == ["db", "web"]
    assert snap.by_name["c-b"].address == "10.0.0.3"
    assert snap.by_address["10.0.1.9"].service == "db"
    assert [e.id for e in snap.ready["web"]] == ["a", "b"]


def test_noop_write_keeps_version() -> None:
    reg = Registry()
    reg.apply([Upsert(ep("a"))])
    before = reg.snapshot
    assert reg.apply([Upsert(ep("a"))]) is before
    assert reg.apply([Remove("absent"), Drain("absent")]) is before
    assert reg.snapshot.version == 1


def test_drain_then_remove() -> None:
    reg = Registry()
    reg.apply([Upsert(ep("a")), Upsert(ep("b", "10.0.0.3"))])
    snap = reg.apply([Drain("a")])
    assert snap.endpoints["a"].state is State.DRAINING
    assert [e.id for e in snap.ready["web"]] == ["b"]
    snap = reg.apply([Remove("a")])
    assert "a" not in snap.endpoints and "10.0.0.2" not in snap.by_address


def test_verdicts_drive_state_and_survive_reinspect_at_same_address() -> None:
    reg = Registry()
    reg.apply([Upsert(ep("a", check=CHECK))])
    assert state_of(reg, "a") is State.STARTING
    assert reg.snapshot.ready["web"] == ()
    reg.apply([SetVerdict("a", "10.0.0.2", Verdict(True, "200 OK", 1.0))])
    assert state_of(reg, "a") is State.READY
    # A fresh inspect (e.g. a rename event) keeps the verdict...
    reg.apply([Upsert(ep("a", check=CHECK))])
    assert state_of(reg, "a") is State.READY
    # ...but a new address starts over: it has not passed a check there.
    reg.apply([Upsert(ep("a", "10.0.0.9", check=CHECK))])
    assert state_of(reg, "a") is State.STARTING
    # A verdict for the old address is ignored.
    reg.apply([SetVerdict("a", "10.0.0.2", Verdict(True, "200 OK", 2.0))])
    assert state_of(reg, "a") is State.STARTING
    reg.apply([SetVerdict("a", "10.0.0.9", Verdict(False, "connection refused", 3.0))])
    assert state_of(reg, "a") is State.UNHEALTHY
    assert reg.snapshot.endpoints["a"].reason == "connection refused"


def test_resync_replaces_but_keeps_entries_touched_by_events() -> None:
    reg = Registry()
    reg.apply([Upsert(ep("a")), Upsert(ep("b", "10.0.0.3")), Upsert(ep("c", "10.0.0.4"))])
    reg.apply([Remove("b")])  # an event removed b while the listing ran (b listed as running)
    snap = reg.apply(
        [Resync((ep("a"), ep("b", "10.0.0.3"), ep("d", "10.0.0.5")), keep=frozenset({"b"}))]
    )
    assert set(snap.endpoints) == {"a", "d"}  # c vanished; b stays removed; d appeared


def test_problems_and_synced() -> None:
    reg = Registry()
    snap = reg.apply([Problem("bad", "container bad: label stablenet.port='abc' is not valid")])
    assert "bad" in snap.problems
    snap = reg.apply([Remove("bad")])
    assert snap.problems == {}
    snap = reg.apply([SetSynced(True)])
    assert snap.synced and snap.version == 3


async def test_watch_is_level_triggered_and_skips_versions() -> None:
    reg = Registry()
    seen: list[int] = []
    release = asyncio.Event()

    async def slow_consumer() -> None:
        async for snap in reg.watch(0):
            seen.append(snap.version)
            await release.wait()
            release.clear()
            if snap.version >= 3:
                return

    task = asyncio.get_running_loop().create_task(slow_consumer())
    reg.apply([Upsert(ep("a"))])
    await asyncio.sleep(0)  # let the consumer take version 1
    reg.apply([Upsert(ep("b", "10.0.0.3"))])
    reg.apply([Upsert(ep("c", "10.0.0.4"))])
    release.set()
    await asyncio.sleep(0)
    release.set()
    async with asyncio.timeout(5):
        await task
    assert seen == [1, 3]  # version 2 was skipped, not queued


async def settle() -> None:
    """Let every task that a write made ready run (a woken watcher runs on the next turn)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_noop_write_wakes_nobody() -> None:
    reg = Registry()
    reg.apply([Upsert(ep("a"))])
    woken: list[int] = []

    async def consumer() -> None:
        async for snap in reg.watch(reg.snapshot.version):
            woken.append(snap.version)
            return  # the first change is the one under test

    task = asyncio.get_running_loop().create_task(consumer())
    await settle()  # the consumer now waits for a change
    reg.apply([Upsert(ep("a"))])
    reg.apply([Remove("nobody")])
    reg.apply([Drain("nobody"), SetSynced(False)])
    await settle()
    # Counted inside watch(): a watcher that woke and found no new version still counts.
    assert reg.wakeups == 0
    assert woken == []
    reg.apply([Remove("a")])
    async with asyncio.timeout(5):
        await task
    assert woken == [2]
    assert reg.wakeups == 1


def test_events_about_an_earlier_incarnation_do_not_touch_a_restarted_one() -> None:
    """A kill/stop/die handled after the restarted container was already inspected (events
    queue behind a slow inspect) must not drain or remove the new incarnation."""
    reg = Registry()
    reg.apply([Upsert(ep("a", started_at=100.0))])
    reg.apply([Drain("a", at=150.0)])
    assert state_of(reg, "a") is State.DRAINING
    # The restarted container is inspected before the old incarnation's die/stop are handled.
    reg.apply([Upsert(ep("a", started_at=200.0))])
    assert state_of(reg, "a") is State.READY  # draining is not carried to a new incarnation
    reg.apply([Remove("a", at=190.0), Drain("a", at=191.0)])
    assert state_of(reg, "a") is State.READY
    # Events about the current incarnation still apply.
    reg.apply([Drain("a", at=250.0)])
    assert state_of(reg, "a") is State.DRAINING
    reg.apply([Remove("a", at=251.0)])
    assert "a" not in reg.snapshot.endpoints


def test_a_restarted_incarnation_needs_a_fresh_verdict() -> None:
    reg = Registry()
    reg.apply([Upsert(ep("a", check=CHECK, started_at=100.0))])
    reg.apply([SetVerdict("a", "10.0.0.2", Verdict(True, "HTTP 200", 101.0))])
    assert state_of(reg, "a") is State.READY
    reg.apply([Upsert(ep("a", check=CHECK, started_at=200.0))])
    assert state_of(reg, "a") is State.STARTING


def test_undrain_routes_the_same_incarnation_again_as_its_health_says() -> None:
    """A container that outlived its stop signal is routed again only if its checks pass."""
    reg = Registry()
    reg.apply([Upsert(ep("a", check=CHECK, started_at=100.0)), Upsert(ep("b", "10.0.0.3"))])
    reg.apply([SetVerdict("a", "10.0.0.2", Verdict(True, "HTTP 200", 101.0)), Drain("a")])
    assert state_of(reg, "a") is State.DRAINING
    before = reg.snapshot
    assert reg.apply([Undrain("a", started_at=99.0)]) is before  # another incarnation
    assert reg.apply([Undrain("b", started_at=0.0)]) is before  # not draining
    reg.apply([Undrain("a", started_at=100.0)])
    assert state_of(reg, "a") is State.READY
    assert [e.id for e in reg.snapshot.ready["web"]] == ["a", "b"]
    reg.apply([Drain("a"), SetVerdict("a", "10.0.0.2", Verdict(False, "HTTP 500", 102.0))])
    reg.apply([Undrain("a", started_at=100.0)])
    assert state_of(reg, "a") is State.UNHEALTHY
    assert [e.id for e in reg.snapshot.ready["web"]] == ["b"]
