"""The Docker source against a real engine: containers appear, move, drain, vanish; the
registry survives the engine going away and matches `docker ps` after it returns."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
from pathlib import Path

import docker
import pytest

from stablenet.config import DockerConfig, HealthConfig
from stablenet.docker.source import default_client
from stablenet.docker.translate import Settings
from stablenet.model import State
from stablenet.registry import Registry, Snapshot
from tests.conftest import start_source
from tests.helpers import Containers, ensure_image, ip_of, off_loop, private_engine, until

WAIT = 30  # generous bound for the engine; speed is measured in benchmarks/


def by_name(snap: Snapshot, name: str) -> State | None:
    ep = snap.by_name.get(name)
    return None if ep is None else ep.state


async def test_labelled_container_appears_with_ip_and_port(
    registry: Registry, containers: Containers
) -> None:
    box = await off_loop(
        containers.run, "web", labels={"stablenet.service": "web-a", "stablenet.port": "8080"}
    )
    name = containers.name("web")
    snap = await until(registry, lambda s: name in s.by_name, WAIT)
    ep = snap.by_name[name]
    assert ep.service == "web-a"
    assert ep.address == ip_of(box)
    assert ep.port == 8080
    assert ep.id == box.id
    assert ep.state is State.READY
    assert [e.name for e in snap.ready["web-a"]] == [name]


async def test_restart_with_ip_change_holds_only_new_ip(
    registry: Registry, containers: Containers
) -> None:
    # A network of the test's own, so no other container can take the freed address first.
    net = await off_loop(containers.network, "mv")
    first = await off_loop(
        containers.run, "a", labels={"stablenet.service": "moving"}, network=net.name
    )
    name = containers.name("a")
    old_ip = ip_of(first, net.name)
    await until(registry, lambda s: name in s.by_name, WAIT)

    seen: list[tuple[State | None, str | None]] = []

    async def record() -> None:
        """Every state the endpoint goes through, until it is back at another address."""
        async for snap in registry.watch(registry.snapshot.version):
            ep = snap.by_name.get(name)
            seen.append((by_name(snap, name), ep.address if ep else None))
            if ep is not None and ep.address != old_ip:
                return

    watcher = asyncio.get_running_loop().create_task(record())
    await off_loop(first.stop, timeout=2)
    # docker stop returns after `die`: the old address must already be gone, without a resync.
    await until(registry, lambda s: name not in s.by_name, WAIT)
    # Another container takes the freed address while the first is down.
    thief = await off_loop(
        containers.run, "thief", labels={"stablenet.service": "other"}, network=net.name
    )
    assert ip_of(thief, net.name) == old_ip
    await off_loop(first.start)
    async with asyncio.timeout(WAIT):
        await watcher
    snap = registry.snapshot
    new_ip = ip_of(first, net.name)
    assert new_ip != old_ip
    assert snap.by_name[name].address == new_ip
    assert [e.address for e in snap.services["moving"]] == [new_ip]
    assert snap.by_address[old_ip].name == containers.name("thief")
    # The stop was seen as draining before the endpoint was removed.
    states = [state for state, _ in seen]
    assert State.DRAINING in states
    assert states.index(State.DRAINING) < states.index(None)
    # The old address was gone before the new one appeared: never both, never stale.
    addresses = [addr for _, addr in seen]
    assert addresses[-1] == new_ip
    assert addresses.index(None) < addresses.index(new_ip)


async def test_draining_during_slow_stop(registry: Registry, containers: Containers) -> None:
    # sh ignores SIGTERM while `sleep` runs in the foreground: stop waits for its timeout.
    box = await off_loop(
        containers.run,
        "slow",
        labels={"stablenet.port": "80"},
        command=["sh", "-c", "trap '' TERM; while true; do sleep 1; done"],
    )
    name = containers.name("slow")
    await until(registry, lambda s: by_name(s, name) is State.READY, WAIT)
    stopping = asyncio.get_running_loop().run_in_executor(None, lambda: box.stop(timeout=3))
    snap = await until(registry, lambda s: by_name(s, name) is not State.READY, WAIT)
    assert by_name(snap, name) is State.DRAINING
    assert not stopping.done()  # drained while the container still runs
    assert snap.ready.get(snap.by_name[name].service, ()) == ()
    await stopping
    await until(registry, lambda s: name not in s.by_name, WAIT)


async def test_a_container_that_ignores_sigterm_is_routed_again_after_its_stop_timeout(
    containers: Containers, docker_client: docker.DockerClient, test_image: str
) -> None:
    """`docker kill -s TERM` to a PID 1 that ignores it: the container keeps running and keeps
    its address; once its StopTimeout (1 s here) and the margin have passed it is routed again."""
    reg = Registry()
    _, task = await start_source(
        reg, Settings.from_config(DockerConfig(), HealthConfig()), drain_margin=0.5
    )
    try:
        api = docker_client.api
        name = containers.name("stubborn")
        created = await off_loop(
            api.create_container,
            test_image,
            ["sh", "-c", "trap '' TERM; httpd -f -p 80 -h /www"],
            name=name,
            labels={"stablenet.port": "80"},
            stop_timeout=1,
        )
        cid = str(created["Id"])
        containers.created.append(cid)
        await off_loop(api.start, cid)
        ready = await until(reg, lambda s: by_name(s, name) is State.READY, WAIT)
        await off_loop(api.kill, cid, signal="TERM")
        await until(reg, lambda s: by_name(s, name) is State.DRAINING, WAIT)
        snap = await until(reg, lambda s: by_name(s, name) is State.READY, 15)
        assert snap.by_name[name].address == ready.by_name[name].address
        assert snap.by_name[name].started_at == ready.by_name[name].started_at
        assert (await off_loop(api.inspect_container, cid))["State"]["Running"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_an_images_own_stop_signal_drains(registry: Registry, containers: Containers) -> None:
    """docker stop sends the image's STOPSIGNAL (Apache's is SIGWINCH), not SIGTERM."""
    box = await off_loop(
        containers.run,
        "winch",
        labels={"stablenet.port": "80"},
        command=["sh", "-c", "trap 'sleep 1; exit 0' WINCH; while true; do sleep 0.1; done"],
        stop_signal="SIGWINCH",
    )
    name = containers.name("winch")
    await until(registry, lambda s: by_name(s, name) is State.READY, WAIT)
    stopping = asyncio.get_running_loop().run_in_executor(None, lambda: box.stop(timeout=5))
    snap = await until(registry, lambda s: by_name(s, name) is not State.READY, WAIT)
    assert by_name(snap, name) is State.DRAINING
    await stopping
    await until(registry, lambda s: name not in s.by_name, WAIT)


async def test_compose_replicas_form_one_service(
    registry: Registry, containers: Containers
) -> None:
    labels = {"com.docker.compose.project": "shop", "com.docker.compose.service": "api"}
    await off_loop(containers.run, "api-1", labels=labels)
    await off_loop(containers.run, "api-2", labels=labels)
    names = {containers.name("api-1"), containers.name("api-2")}
    snap = await until(registry, lambda s: names <= set(s.by_name), WAIT)
    assert {ep.name for ep in snap.services["api"]} == names
    assert all(ep.port == 80 or ep.port is None for ep in snap.services["api"])


def on_two_networks(name: str, snap: Snapshot) -> bool:
    return name in snap.by_name and len(snap.by_name[name].addresses) == 2


async def test_two_networks_choice_is_deterministic_and_label_wins(
    registry: Registry, containers: Containers, docker_client: docker.DockerClient
) -> None:
    net_b = await off_loop(containers.network, "bnet")
    net_a = await off_loop(containers.network, "anet")
    chosen: list[str] = []
    for run in range(3):
        box = await off_loop(
            containers.run,
            f"multi{run}",
            labels={"stablenet.service": f"multi{run}"},
            network=net_b.name,
        )
        await off_loop(net_a.connect, box)
        name = containers.name(f"multi{run}")
        snap = await until(registry, functools.partial(on_two_networks, name), WAIT)
        ep = snap.by_name[name]
        chosen.append(ep.network)
        assert ep.address == ip_of(box, ep.network)
    # The first network by sorted name, every time.
    assert chosen == [net_a.name] * 3

    labelled = await off_loop(
        containers.run, "pinned", labels={"stablenet.network": net_b.name}, network=net_a.name
    )
    await off_loop(net_b.connect, labelled)
    name = containers.name("pinned")
    async with asyncio.timeout(WAIT):
        snap = await registry.until(
            lambda s: name in s.by_name and s.by_name[name].network == net_b.name
        )
    assert snap.by_name[name].address == ip_of(labelled, net_b.name)


async def test_bad_labels_are_reported_and_skipped_others_keep_working(
    registry: Registry, containers: Containers
) -> None:
    bad_abc = await off_loop(containers.run, "abc", labels={"stablenet.port": "abc"})
    bad_big = await off_loop(containers.run, "big", labels={"stablenet.port": "70000"})
    await off_loop(containers.run, "good", labels={"stablenet.service": "fine"})
    good = containers.name("good")
    async with asyncio.timeout(WAIT):
        snap = await registry.until(
            lambda s: good in s.by_name and {bad_abc.id, bad_big.id} <= set(s.problems)
        )
    assert containers.name("abc") not in snap.by_name
    assert containers.name("big") not in snap.by_name
    assert snap.problems[bad_abc.id] == (
        f"container {containers.name('abc')}: label stablenet.port='abc' is not valid: "
        "expected a port number (1-65535)"
    )
    assert "'70000'" in snap.problems[bad_big.id]
    assert snap.by_name[good].state is State.READY


async def test_opt_out_and_exposed_by_default(containers: Containers) -> None:
    reg = Registry()
    settings = Settings.from_config(DockerConfig(exposed_by_default=False), HealthConfig())
    _, task = await start_source(reg, settings)
    try:
        await off_loop(containers.run, "plain")
        await off_loop(containers.run, "in", labels={"stablenet.enable": "true"})
        await off_loop(containers.run, "out", labels={"stablenet.enable": "false"})
        wanted = containers.name("in")
        snap = await until(reg, lambda s: wanted in s.by_name, WAIT)
        assert containers.name("plain") not in snap.by_name
        assert containers.name("out") not in snap.by_name
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_engine_outage_keeps_last_state_then_resyncs_exactly(tmp_path: Path) -> None:
    root = Path("/tmp") / f"snt-engine-{os.getpid()}-{tmp_path.name[-6:]}"
    with private_engine(root) as engine:
        client = engine.client()
        image = ensure_image(client)
        owned = Containers(client, image)
        survivor = owned.run("survivor", labels={"stablenet.service": "keep"})
        victim = owned.run("victim", labels={"stablenet.service": "lose"})
        victim_pid = int(victim.attrs["State"]["Pid"])

        reg = Registry()
        settings = Settings.from_config(DockerConfig(), HealthConfig())
        _, task = await start_source(
            reg, settings, client_factory=functools.partial(default_client, engine.host)
        )
        try:
            assert {ep.name for ep in reg.snapshot.endpoints.values()} == {
                owned.name("survivor"),
                owned.name("victim"),
            }
            before = reg.snapshot.endpoints
            await off_loop(engine.stop)
            snap = await until(reg, lambda s: not s.synced, WAIT)
            # Last known state is kept while the engine is gone (live-restore: they still run).
            assert dict(snap.endpoints) == dict(before)
            # The victim dies while nobody is watching.
            os.kill(victim_pid, signal.SIGKILL)
            await off_loop(engine.start)
            snap = await until(reg, lambda s: s.synced, WAIT)
            running = {c.id for c in await off_loop(client.containers.list)}
            assert set(snap.endpoints) == running
            assert survivor.id in snap.endpoints
            assert victim.id not in snap.endpoints
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            client.close()


@pytest.mark.parametrize("count", [20])
async def test_many_containers_initial_sync(containers: Containers, count: int) -> None:
    await asyncio.gather(
        *(
            off_loop(
                containers.run,
                f"n{i}",
                labels={"stablenet.service": "many"},
                command=["sleep", "3600"],
            )
            for i in range(count)
        )
    )
    reg = Registry()
    settings = Settings.from_config(DockerConfig(), HealthConfig())
    source, task = await start_source(reg, settings)
    try:
        assert len(reg.snapshot.services["many"]) == count
        assert source.stats.resyncs == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
