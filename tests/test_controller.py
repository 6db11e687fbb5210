"""The controller against the real engine: healing a process killed from the host, replacing an
unhealthy replica (ready before the old one goes), backoff and breaker on a crash loop, the
operator's stop and removal respected, scaling that survives a restart, no duplicates after a
restart, unmanaged containers never touched, faithful replicas and refusals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import docker
import docker.errors
import pytest

from stablenet.admin import AdminServer
from stablenet.config import ControllerConfig, HealthConfig
from stablenet.controller import Controller
from stablenet.controller.engine import Engine
from stablenet.controller.loop import ServiceStatus, _member
from stablenet.controller.plan import Grow
from stablenet.docker.source import default_client
from stablenet.events import EventLog
from stablenet.health.checker import HealthChecker
from stablenet.model import State as EpState
from stablenet.registry import Registry
from tests.helpers import HTTPD, Containers, free_port, until

FAST = ControllerConfig(
    state_dir="/unused",
    unhealthy_grace=1.0,
    ready_timeout=15.0,
    drain_timeout=2.0,
    backoff=0.5,
    backoff_max=4.0,
    backoff_reset=600.0,
)
HEALTH = {
    "stablenet.port": "80",
    "stablenet.health.path": "/healthz",
    "stablenet.health.interval": "200ms",
    "stablenet.health.timeout": "200ms",
    "stablenet.health.fall": "1",
}
CRASH = ["sh", "-c", "sleep 0.2; exit 3"]


@dataclass
class Harness:
    registry: Registry
    client: docker.DockerClient
    containers: Containers
    state_dir: Path
    log: EventLog
    controller: Controller | None = None
    task: asyncio.Task[None] | None = None
    health: asyncio.Task[None] | None = None

    async def start(self, config: ControllerConfig | None = None) -> Controller:
        """A controller with its own state directory, once it follows the engine's events."""
        cfg = replace(config or FAST, state_dir=str(self.state_dir))
        ctl = Controller(self.registry, cfg, log=self.log)
        ctl.prepare()
        self.controller = ctl
        self.task = asyncio.get_running_loop().create_task(ctl.run())
        if self.health is None:
            checker = HealthChecker(self.registry, HealthConfig())
            self.health = asyncio.get_running_loop().create_task(checker.run())
        await self.settle(lambda c: c.passes >= 1, 20)
        return ctl

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    async def close(self) -> None:
        await self.stop()
        if self.health is not None:
            self.health.cancel()
            await asyncio.gather(self.health, return_exceptions=True)

    @property
    def ctl(self) -> Controller:
        assert self.controller is not None
        return self.controller

    def members(self, service: str, all: bool = True) -> list[Any]:
        found = self.client.containers.list(
            all=all, filters={"label": f"stablenet.service={service}"}
        )
        return sorted(found, key=lambda c: c.name)

    def running(self, service: str) -> list[str]:
        return [c.name for c in self.members(service, all=False)]

    async def settle(self, predicate: Callable[[Controller], bool], within: float) -> None:
        try:
            async with asyncio.timeout(within):
                await self.ctl.until(predicate)
        except TimeoutError:
            raise AssertionError(
                f"not settled in {within}s; controller saw {self.ctl.services()}; "
                f"events: {[e.as_dict() for e in self.log.since(0)]}"
            ) from None

    def messages(self, service: str) -> list[str]:
        return [e.message for e in self.log.since(0) if e.service == service]


def ready_names(registry: Registry, service: str) -> set[str]:
    return {ep.name for ep in registry.snapshot.ready.get(service, ())}


def status(ctl: Controller, service: str) -> Any:
    return ctl.status.get(service)


def at_count(service: str, ready: int, desired: int | None = None) -> Callable[[Controller], bool]:
    def check(ctl: Controller) -> bool:
        st = ctl.status.get(service)
        return (
            st is not None
            and st.ready == ready
            and st.in_flight == 0
            and (desired is None or st.desired == desired)
        )

    return check


@pytest.fixture
async def harness(
    registry: Registry,
    docker_client: docker.DockerClient,
    containers: Containers,
    tmp_path: Path,
) -> AsyncIterator[Harness]:
    h = Harness(registry, docker_client, containers, tmp_path / "state", EventLog(registry))
    yield h
    await h.close()
    for c in docker_client.containers.list(all=True, filters={"label": "stablenet.managed"}):
        if c.labels.get("stablenet.service", "").startswith(containers.prefix):
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True)


def labels(service: str, **more: str) -> dict[str, str]:
    return {"stablenet.service": service, **more}


async def test_a_process_killed_from_the_host_is_replaced_and_the_count_kept(
    harness: Harness,
) -> None:
    svc = harness.containers.name("web")
    ctl = await harness.start()
    harness.containers.run("web", labels=labels(svc, **{"stablenet.replicas": "2"}))
    # An unmanaged container, killed the same way: never touched.
    stray = harness.containers.run("stray", labels={"stablenet.service": svc + "x"})
    await harness.settle(at_count(svc, 2, 2), 30)
    assert len(harness.running(svc)) == 2
    victim = harness.members(svc, all=False)[0]
    victim.reload()
    stray.reload()
    # SIGKILL from outside the Engine API: Docker reports only `die`, no `kill`.
    os.kill(int(victim.attrs["State"]["Pid"]), signal.SIGKILL)
    os.kill(int(stray.attrs["State"]["Pid"]), signal.SIGKILL)
    began = time.monotonic()
    await harness.settle(
        lambda c: at_count(svc, 2, 2)(c) and victim.name not in harness.running(svc), 30
    )
    healed = time.monotonic() - began
    names = [c.name for c in harness.members(svc)]
    assert victim.name not in names  # replaced, then removed
    assert len(names) == 2
    assert healed < 15
    assert any("killed (SIGKILL from outside Docker)" in m for m in harness.messages(svc))
    assert ctl.actions[(svc, "replace", "killed")] == 1
    stray.reload()
    assert stray.status == "exited"
    assert svc + "x" not in ctl.status
    assert harness.members(svc + "x") == [stray] or len(harness.members(svc + "x")) == 1


async def test_a_failure_is_confirmed_from_inspect_while_the_listing_says_running(
    harness: Harness,
) -> None:
    """Right after `die` the engine's listing can still say running; the failure is confirmed
    from inspect in that pass, not left for a later one that no event would prompt."""
    svc = harness.containers.name("stale")
    box = harness.containers.run("stale", labels=labels(svc, **{"stablenet.replicas": "2"}))
    ctl = Controller(harness.registry, replace(FAST, state_dir=str(harness.state_dir)))
    engine = Engine(default_client())
    try:
        listed = [m for m in await engine.managed() if m["Id"] == box.id]
        member = _member(listed[0])  # the listing as a pass read it, before the die
        assert not isinstance(member, str) and member.status == "running"
        os.kill(int(box.attrs["State"]["Pid"]), signal.SIGKILL)
        box.wait(timeout=20)
        ctl._failed[box.id] = "killed (SIGKILL from outside Docker)"
        await ctl._confirm_failure(engine, member)
    finally:
        await engine.close()
    assert box.id in ctl._confirmed
    assert member.status == "exited"
    assert ctl.state.service(svc).streak == 1


async def test_a_container_destroyed_while_a_pass_awaits_fills_no_slot(harness: Harness) -> None:
    """A pass reads the listing, then awaits; a container destroyed meanwhile is still in that
    listing, exited, its failure forgotten with the destroy: it must not count as one the
    operator stopped, or it fills a slot and a healthy replica is removed as one too many."""
    svc = harness.containers.name("gone")
    began = time.time()
    harness.containers.run("good", labels=labels(svc, **{"stablenet.replicas": "1"}))
    broken = harness.containers.run(
        "broken", labels=labels(svc, **{"stablenet.replicas": "1"}), command=CRASH
    )
    broken.wait(timeout=20)
    ctl = Controller(
        harness.registry, replace(FAST, state_dir=str(harness.state_dir)), log=harness.log
    )
    engine = Engine(default_client())
    try:
        members = [_member(item) for item in await engine.managed()]
        group = [m for m in members if not isinstance(m, str) and m.service == svc]
        assert sorted(m.status for m in group) == ["exited", "running"]
        broken.remove(force=True)
        for event in await engine.past_events(began - 1, time.time()):
            ctl._classify(event)  # every event of both, the broken one's die and destroy too
        await ctl._reconcile_service(engine, svc, group, harness.registry.snapshot, time.time())
    finally:
        for task in list(ctl._ops):
            task.cancel()
        await asyncio.gather(*ctl._ops, return_exceptions=True)
        await engine.close()
    assert not ctl.actions
    assert ctl.status[svc].desired == 1 and ctl.status[svc].replicas == 1


async def test_a_new_replica_is_counted_from_the_moment_its_operation_starts(
    harness: Harness,
) -> None:
    """While a grow reads its template (before it creates anything), the next pass must see the
    slot taken, or it grows a second replica for it (a new service's first pass runs while its
    template is still starting, when operations may run side by side)."""
    svc = harness.containers.name("slot")
    box = harness.containers.run("slot", labels=labels(svc, **{"stablenet.replicas": "2"}))
    ctl = Controller(
        harness.registry, replace(FAST, state_dir=str(harness.state_dir)), log=harness.log
    )
    engine = Engine(default_client())
    ctl._engine = engine
    ctl.status[svc] = ServiceStatus(svc)
    try:
        members = [_member(item) for item in await engine.managed()]
        group = [m for m in members if not isinstance(m, str) and m.service == svc]
        ctl._launch(svc, Grow(box.id, "1 of 2 replicas"), group)
        await asyncio.sleep(0)  # the operation's first step; its inspect is still out
        assert ctl._creating[svc] == 1
        async with asyncio.timeout(30):
            await asyncio.gather(*ctl._ops)
        assert ctl._creating[svc] == 0
        last = ctl.status[svc].last
        assert last is not None and "ready" in last.result
    finally:
        for task in list(ctl._ops):
            task.cancel()
        await engine.close()


async def test_an_unhealthy_replica_is_replaced_and_the_new_one_is_ready_first(
    harness: Harness,
) -> None:
    svc = harness.containers.name("api")
    await harness.start()
    sick = harness.containers.run(
        "api", labels=labels(svc, **HEALTH, **{"stablenet.replicas": "1"})
    )
    await until(harness.registry, lambda s: ready_names(harness.registry, svc) == {sick.name}, 30)
    seen: list[tuple[set[str], bool]] = []

    async def watch() -> None:
        async for snap in harness.registry.watch(harness.registry.snapshot.version):
            old = snap.endpoints.get(sick.id)
            routable = {ep.name for ep in snap.ready.get(svc, ())}
            seen.append((routable, old is not None and old.state is EpState.DRAINING))

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        sick.exec_run(["rm", "/www/healthz"])
        await harness.settle(
            lambda c: at_count(svc, 1, 1)(c) and sick.name not in harness.running(svc), 40
        )
    finally:
        watcher.cancel()
    fresh = [c.name for c in harness.members(svc)]
    assert len(fresh) == 1 and fresh[0] != sick.name
    # The replacement was routable before the unhealthy one was drained: never zero replicas
    # that could take a request once the new one was ready.
    drained_at = next(i for i, (_, draining) in enumerate(seen) if draining)
    ready_at = next(i for i, (names, _) in enumerate(seen) if fresh[0] in names)
    assert ready_at < drained_at
    assert any("unhealthy for" in m for m in harness.messages(svc))


async def test_a_crash_loop_backs_off_and_trips_the_breaker(harness: Harness) -> None:
    svc = harness.containers.name("crash")
    ctl = await harness.start()
    harness.containers.run(
        "crash", labels=labels(svc, **{"stablenet.replicas": "1"}), command=CRASH
    )
    await harness.settle(lambda c: bool(c.status.get(svc) and c.status[svc].degraded), 60)
    attempts = [
        e for e in harness.log.since(0) if e.service == svc and e.message.startswith("replace")
    ]
    assert len(attempts) == 3  # the first failure, then max(3, 1/2) failed replacements
    gaps = [b.at - a.at for a, b in zip(attempts, attempts[1:], strict=False)]
    assert gaps[0] >= FAST.backoff * 0.9 and gaps[1] >= FAST.backoff * 2 * 0.9
    # The last broken container is kept for inspection, and nothing more is tried.
    kept = harness.members(svc)
    assert len(kept) == 1 and kept[0].status == "exited"
    passes = ctl.passes
    await harness.settle(lambda c: c.passes >= passes + 3, 10)
    assert [c.id for c in harness.members(svc)] == [kept[0].id]
    assert "replacements failed in a row" in (ctl.status[svc].degraded or "")


async def test_the_operator_stop_and_removal_are_never_undone(harness: Harness) -> None:
    svc = harness.containers.name("op")
    ctl = await harness.start()
    harness.containers.run("op", labels=labels(svc, **{"stablenet.replicas": "2"}))
    await harness.settle(at_count(svc, 2, 2), 30)
    first, second = harness.members(svc, all=False)
    first.stop(timeout=1)
    await harness.settle(lambda c: c.status[svc].held == [first.name], 20)
    passes = ctl.passes
    await harness.settle(lambda c: c.passes >= passes + 3, 10)
    first.reload()
    assert first.status == "exited"
    assert len(harness.members(svc)) == 2  # no replacement for a stopped container
    first.start()
    await harness.settle(lambda c: c.status[svc].held == [] and at_count(svc, 2)(c), 20)
    second.remove(force=True)
    await harness.settle(lambda c: c.status[svc].desired == 1, 20)
    passes = ctl.passes
    await harness.settle(lambda c: c.passes >= passes + 3, 10)
    assert [c.name for c in harness.members(svc)] == [first.name]
    assert any("removed by the operator" in m for m in harness.messages(svc))


async def test_scale_through_the_admin_api_survives_a_restart_without_duplicates(
    harness: Harness,
) -> None:
    svc = harness.containers.name("sc")
    ctl = await harness.start()
    harness.containers.run("sc", labels=labels(svc, **{"stablenet.replicas": "2"}))
    await harness.settle(at_count(svc, 2, 2), 30)
    admin = AdminServer(
        harness.registry, f"127.0.0.1:{free_port()}", token="s3cret", controller=ctl
    )
    async with admin, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{admin.port}/v1/services/{svc}/scale"
        auth = {"Authorization": "Bearer s3cret"}
        async with http.post(url, json={"replicas": 3}) as resp:
            assert resp.status == 401
        async with http.post(url, data="replicas=3", headers=auth) as resp:
            assert resp.status == 415  # not JSON: what a cross-site form could send
        async with http.post(url, json={"replicas": -1}, headers=auth) as resp:
            assert resp.status == 400
        async with http.post(url, json={"replicas": 3}, headers=auth) as resp:
            assert resp.status == 200, await resp.text()
        await harness.settle(at_count(svc, 3, 3), 30)
        async with http.post(url, json={"replicas": 1}, headers=auth) as resp:
            assert resp.status == 200
        await harness.settle(
            lambda c: at_count(svc, 1, 1)(c) and len(harness.members(svc)) == 1, 30
        )
        async with http.get(f"http://127.0.0.1:{admin.port}/v1/services/{svc}", headers=auth) as r:
            body = await r.json()
    assert body["controller"]["desired"] == 1 and body["controller"]["ready"] == 1
    survivor = harness.members(svc)[0].name
    assert survivor == harness.containers.name("sc")  # the newest went first
    # A restarted controller reads the count from the state directory, not the label (2).
    await harness.stop()
    ctl = await harness.start()
    await harness.settle(lambda c: c.passes >= 3 and at_count(svc, 1, 1)(c), 30)
    assert [c.name for c in harness.members(svc)] == [survivor]


async def test_a_restarted_controller_counts_before_it_acts(harness: Harness) -> None:
    svc = harness.containers.name("dup")
    await harness.start()
    harness.containers.run("dup", labels=labels(svc, **{"stablenet.replicas": "3"}))
    await harness.settle(at_count(svc, 3, 3), 40)
    before = sorted(c.id for c in harness.members(svc))
    await harness.stop()
    await harness.start()
    await harness.settle(lambda c: c.passes >= 5 and at_count(svc, 3, 3)(c), 30)
    assert sorted(c.id for c in harness.members(svc)) == before


async def test_a_second_controller_on_the_same_state_waits(harness: Harness) -> None:
    first = await harness.start()
    await harness.settle(lambda c: c.active and c.passes >= 1, 20)
    second = Controller(harness.registry, replace(FAST, state_dir=str(harness.state_dir)))
    task = asyncio.get_running_loop().create_task(second.run())
    try:
        passes = first.passes
        await harness.settle(lambda c: c.passes >= passes + 2, 10)
        assert first.active and not second.active and second.passes == 0
        assert second.scale("anything", 2) is not None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_replica_is_faithful_to_its_template(
    harness: Harness, docker_client: docker.DockerClient
) -> None:
    svc = harness.containers.name("tpl")
    net = harness.containers.network("net", ipam=docker.types.IPAMConfig(
        pool_configs=[docker.types.IPAMPool(subnet="10.213.7.0/24")]
    ))  # fmt: skip
    volume = docker_client.volumes.create(harness.containers.name("vol"))
    await harness.start()
    # Made with both its networks before it starts, as compose makes it.
    tpl = harness.client.containers.create(
        harness.containers.image,
        HTTPD,
        name=harness.containers.name("tpl"),
        labels=labels(svc, **{"stablenet.replicas": "2", "com.docker.compose.project": "p"}),
        environment={"GREETING": "hello"},
        working_dir="/www",
        user="nobody",
        hostname="templatehost",
        volumes={volume.name: {"bind": "/named", "mode": "rw"}},
        mounts=[docker.types.Mount("/anon", None, type="volume")],
        restart_policy={"Name": "on-failure", "MaximumRetryCount": 2},
        mem_limit="64m",
        healthcheck={"test": ["CMD", "true"], "interval": 1_000_000_000},
        network=net.name,
    )
    harness.containers.created.append(str(tpl.id))
    other = harness.containers.network("other")
    other.connect(tpl, aliases=["tpl-alias"])
    tpl.start()
    await harness.settle(lambda c: len(harness.members(svc)) == 2 and at_count(svc, 2)(c), 40)
    replica = next(c for c in harness.members(svc) if c.id != tpl.id)
    tpl.reload()
    r, t = replica.attrs, tpl.attrs
    assert replica.name == f"{svc}-1"
    assert r["Image"] == t["Image"]
    assert "GREETING=hello" in r["Config"]["Env"]
    assert r["Config"]["WorkingDir"] == "/www" and r["Config"]["User"] == "nobody"
    assert r["Config"]["Hostname"] != "templatehost"
    assert r["Config"]["Labels"]["stablenet.managed"] == "true"
    assert "com.docker.compose.project" not in r["Config"]["Labels"]
    assert r["HostConfig"]["RestartPolicy"] == t["HostConfig"]["RestartPolicy"]
    assert r["HostConfig"]["Memory"] == 64 * 1024 * 1024
    assert r["Config"]["Healthcheck"]["Test"] == ["CMD", "true"]
    mounts = {m["Destination"]: m for m in r["Mounts"]}
    tmounts = {m["Destination"]: m for m in t["Mounts"]}
    assert mounts["/named"]["Name"] == volume.name  # shared
    assert mounts["/anon"]["Name"] != tmounts["/anon"]["Name"]  # fresh
    nets = r["NetworkSettings"]["Networks"]
    assert set(nets) == {net.name, other.name}
    assert "tpl-alias" in (nets[other.name]["Aliases"] or [])
    assert nets[net.name]["IPAddress"].startswith("10.213.7.")
    assert nets[net.name]["IPAddress"] != t["NetworkSettings"]["Networks"][net.name]["IPAddress"]
    for c in harness.members(svc):
        c.remove(force=True, v=True)
    with contextlib.suppress(docker.errors.APIError):
        volume.remove(force=True)


async def test_a_template_with_a_fixed_host_port_is_refused_with_the_reason(
    harness: Harness,
) -> None:
    svc = harness.containers.name("fixed")
    ctl = await harness.start()
    harness.containers.run(
        "fixed",
        labels=labels(svc, **{"stablenet.replicas": "2"}),
        ports={"80/tcp": ("127.0.0.1", 0)},
    )
    harness.containers.run(
        "fixed2",
        labels=labels(svc + "p", **{"stablenet.replicas": "2"}),
        ports={"80/tcp": ("127.0.0.1", free_port())},
    )
    await harness.settle(
        lambda c: bool(c.status.get(svc + "p") and c.status[svc + "p"].refused), 20
    )
    assert "fixed host port" in (ctl.status[svc + "p"].refused or "")
    # A random host port can be replicated.
    await harness.settle(at_count(svc, 2, 2), 30)
    assert len(harness.members(svc + "p")) == 1


async def test_a_crashed_replica_removed_with_it_is_replaced(harness: Harness) -> None:
    """AutoRemove: the crash is a die and a destroy with no kill, so the count is below."""
    svc = harness.containers.name("rm")
    ctl = await harness.start()
    harness.containers.run(
        "rm", labels=labels(svc, **{"stablenet.replicas": "2"}), auto_remove=True
    )
    await harness.settle(at_count(svc, 2, 2), 30)
    victim = next(c for c in harness.members(svc, all=False) if c.labels.get("stablenet.managed"))
    victim.reload()
    assert victim.attrs["HostConfig"]["AutoRemove"] is True  # copied from the template
    os.kill(int(victim.attrs["State"]["Pid"]), signal.SIGKILL)
    await harness.settle(
        lambda c: (
            at_count(svc, 2, 2)(c)
            and victim.id not in [m.id for m in harness.members(svc, all=False)]
        ),
        30,
    )
    assert len(harness.members(svc)) == 2
    assert ctl.status[svc].desired == 2  # not the operator's removal: the count stands
    assert any(action == "grow" for (_, action, _) in ctl.actions)


async def test_what_docker_restarts_itself_is_left_to_docker(harness: Harness) -> None:
    svc = harness.containers.name("always")
    ctl = await harness.start()
    box = harness.containers.run(
        "always",
        labels=labels(svc, **{"stablenet.replicas": "1"}),
        restart_policy={"Name": "always"},
    )
    await harness.settle(at_count(svc, 1, 1), 30)
    box.reload()
    first_pid = int(box.attrs["State"]["Pid"])
    os.kill(first_pid, signal.SIGKILL)

    def restarted(c: Controller) -> bool:
        box.reload()
        return bool(box.attrs["State"]["Running"]) and box.attrs["State"]["Pid"] != first_pid

    await harness.settle(restarted, 30)
    await harness.settle(lambda c: at_count(svc, 1, 1)(c), 30)
    assert [c.id for c in harness.members(svc)] == [box.id]
    assert not [key for key in ctl.actions if key[0] == svc]


async def test_heal_restart_restarts_in_place(harness: Harness) -> None:
    svc = harness.containers.name("db")
    ctl = await harness.start()
    box = harness.containers.run("db", labels=labels(svc, **{"stablenet.heal": "restart"}))
    await harness.settle(lambda c: at_count(svc, 1)(c) and c.status[svc].desired is None, 30)
    box.reload()
    os.kill(int(box.attrs["State"]["Pid"]), signal.SIGKILL)
    await harness.settle(
        lambda c: (
            bool(c.status[svc].last)
            and at_count(svc, 1)(c)
            and box.id in _running_ids(harness, svc)
        ),
        30,
    )
    assert [c.id for c in harness.members(svc)] == [box.id]  # the same container, restarted
    assert ctl.actions[(svc, "restart", "killed")] == 1


def _running_ids(harness: Harness, service: str) -> list[str]:
    return [c.id for c in harness.members(service, all=False)]


async def test_a_compose_recreation_keeps_the_count_and_touches_nothing(harness: Harness) -> None:
    """docker compose up recreating a container: the new one is created (naming the old one in
    com.docker.compose.replace) before the old one is stopped and removed, then renamed and
    started. Neither a lower count nor a spare replica may come of it."""
    svc = harness.containers.name("cmp")
    ctl = await harness.start()
    old = harness.containers.run("cmp", labels=labels(svc, **{"stablenet.replicas": "2"}))
    await harness.settle(at_count(svc, 2, 2), 30)
    before = dict(ctl.actions)
    replica = next(c for c in harness.members(svc) if c.id != old.id)
    new = harness.client.containers.create(
        harness.containers.image,
        HTTPD,
        name=f"{old.id[:12]}_{old.name}",
        labels=labels(svc, **{"stablenet.replicas": "2", "com.docker.compose.replace": old.name}),
    )
    harness.containers.created.append(str(new.id))
    old.stop(timeout=1)
    old.remove()
    new.rename(old.name)
    new.start()
    await harness.settle(lambda c: at_count(svc, 2, 2)(c) and c.passes > 0, 30)
    passes = ctl.passes
    await harness.settle(lambda c: c.passes >= passes + 3 and at_count(svc, 2, 2)(c), 20)
    assert sorted(c.id for c in harness.members(svc)) == sorted([new.id, replica.id])
    assert dict(ctl.actions) == before  # nothing created, nothing removed
    assert ctl.status[svc].desired == 2
