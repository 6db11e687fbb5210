"""Health checking against real containers: busybox httpd whose /healthz file is removed and
restored with `docker exec`, Docker HEALTHCHECK, passive ejection, panic mode."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

import pytest

from stablenet.config import HealthConfig
from stablenet.health.checker import HealthChecker
from stablenet.health.probe import _judge, probe
from stablenet.health.state import Refusal
from stablenet.metrics import Collector
from stablenet.model import Endpoint, HealthSpec, Remove, State, Upsert
from stablenet.registry import Registry, Snapshot
from tests.helpers import Containers, off_loop, until

WAIT = 30
FAST = {
    "stablenet.port": "80",
    "stablenet.health.path": "/healthz",
    "stablenet.health.interval": "200ms",
    "stablenet.health.timeout": "200ms",
    "stablenet.health.fall": "2",
    "stablenet.health.rise": "2",
}


@pytest.fixture
async def checker(registry: Registry) -> AsyncIterator[HealthChecker]:
    config = HealthConfig(eject_after=3, eject_time=0.3, eject_max=5.0)
    health = HealthChecker(registry, config)
    task = asyncio.get_running_loop().create_task(health.run())
    yield health
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def state(snap: Snapshot, name: str) -> State | None:
    ep = snap.by_name.get(name)
    return ep.state if ep else None


async def record_states(registry: Registry, name: str, into: list[State | None]) -> None:
    async for snap in registry.watch(registry.snapshot.version):
        current = state(snap, name)
        if current is None and not into:
            continue  # other containers' changes before this one appears
        if not into or into[-1] is not current:
            into.append(current)


async def test_http_check_fall_and_rise_follow_healthz_file(
    registry: Registry, checker: HealthChecker, containers: Containers
) -> None:
    box = await off_loop(containers.run, "hc", labels={**FAST, "stablenet.service": "hc"})
    name = containers.name("hc")
    snap = await until(registry, lambda s: state(s, name) is State.READY, WAIT)
    assert snap.by_name[name].reason == "HTTP 200"
    assert [e.name for e in snap.ready["hc"]] == [name]

    await off_loop(box.exec_run, ["rm", "/www/healthz"])
    snap = await until(registry, lambda s: state(s, name) is State.UNHEALTHY, WAIT)
    assert snap.by_name[name].reason == "HTTP 404 (expected 200-399)"
    assert snap.ready["hc"] == ()
    status = checker.status(box.id)
    assert status is not None and status.failures >= 2

    await off_loop(box.exec_run, ["sh", "-c", "echo ok > /www/healthz"])
    snap = await until(registry, lambda s: state(s, name) is State.READY, WAIT)
    status = checker.status(box.id)
    assert status is not None and status.passes >= 2


async def test_new_endpoint_is_not_routed_before_first_pass(
    registry: Registry, checker: HealthChecker, containers: Containers
) -> None:
    name = containers.name("late")
    seen: list[State | None] = []
    watcher = asyncio.get_running_loop().create_task(record_states(registry, name, seen))
    await off_loop(
        containers.run,
        "late",
        labels=FAST,
        command=["sh", "-c", "sleep 1; exec httpd -f -p 80 -h /www"],
    )
    await until(registry, lambda s: state(s, name) is State.READY, WAIT)
    watcher.cancel()
    assert seen[0] is State.STARTING  # it was registered before it was routed
    assert State.UNHEALTHY not in seen


async def test_docker_healthcheck_goes_through_starting(
    registry: Registry, checker: HealthChecker, containers: Containers
) -> None:
    name = containers.name("dh")
    seen: list[State | None] = []
    watcher = asyncio.get_running_loop().create_task(record_states(registry, name, seen))
    ms = 1_000_000
    await off_loop(
        containers.run,
        "dh",
        labels={"stablenet.port": "80"},
        command=["sh", "-c", "sleep 1; touch /tmp/ok; exec httpd -f -p 80 -h /www"],
        healthcheck={
            "test": ["CMD", "test", "-f", "/tmp/ok"],
            "interval": 200 * ms,
            "timeout": 1000 * ms,
            "retries": 3,
        },
    )
    snap = await until(registry, lambda s: state(s, name) is State.READY, WAIT)
    watcher.cancel()
    assert seen[0] is State.STARTING
    assert snap.by_name[name].docker_health == "healthy"
    assert snap.by_name[name].reason == "Docker HEALTHCHECK says healthy"


async def test_passive_ejection_then_probe_brings_it_back(
    registry: Registry,
    checker: HealthChecker,
    containers: Containers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # No active check: routed at once, guarded by passive detection. Nothing listens in the
    # mute one yet; its replica serves.
    labels = {"stablenet.port": "80", "stablenet.service": containers.name("pass")}
    box = await off_loop(containers.run, "mute", labels=labels, command=["sleep", "3600"])
    await off_loop(containers.run, "good", labels=labels)
    name, good = containers.name("mute"), containers.name("good")
    snap = await until(registry, lambda s: state(s, name) is state(s, good) is State.READY, WAIT)
    ep = snap.by_name[name]
    for _ in range(3):  # what the proxy reports after three refused connections
        checker.report(ep.id, ep.address, ok=False, reason="connection refused")
    snap = registry.snapshot
    assert state(snap, name) is State.UNHEALTHY  # ejected at once, no check interval involved
    assert snap.by_name[name].reason.startswith("ejected after 3 failed requests")
    # Failures alone never take out the last ready endpoint: said once, counted once.
    caplog.set_level(logging.INFO, logger="stablenet.health.checker")
    last = snap.by_name[good]
    for _ in range(5):
        checker.report(last.id, last.address, ok=False, reason="HTTP 503")
    assert state(registry.snapshot, good) is State.READY
    said = [r.getMessage() for r in caplog.records if "not ejected" in r.getMessage()]
    assert said == [
        f"endpoint {last.id[:12]} at {last.address}:80: not ejected after 3 failed requests:"
        f" it is the last ready endpoint of service {containers.name('pass')}"
    ]
    assert checker.refused == {Refusal.LAST_READY: 1}
    # Probes after the ejection find nothing listening until httpd starts; then it is back.
    await off_loop(box.exec_run, ["httpd", "-p", "80", "-h", "/www"], detach=True)
    snap = await until(registry, lambda s: state(s, name) is State.READY, WAIT)
    assert "back after ejection" in snap.by_name[name].reason
    status = checker.status(ep.id)
    assert status is not None and status.ejections >= 1


async def test_a_request_that_fails_everywhere_ejects_no_more_than_the_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A "query of death" reported through the checker into a registry: three replicas, each
    request fails on all of them."""
    registry = Registry()
    replicas = [
        Endpoint(id=str(n) * 64, name=f"qod-{n}", service="qod", address=f"127.0.0.{n + 1}",
                 port=80, network="n")
        for n in (1, 2, 3)
    ]  # fmt: skip
    registry.apply([Upsert(ep) for ep in replicas])
    checker = HealthChecker(registry, HealthConfig(eject_after=2, eject_time=60.0))
    caplog.set_level(logging.INFO, logger="stablenet.health.checker")
    a, b, c = replicas
    crash = [(a, False, "connection reset"), (b, False, "HTTP 502"), (c, False, "HTTP 502")]

    def one_request(attempts: list[tuple[Endpoint, bool, str]]) -> None:
        for endpoint, ok, reason in attempts:
            checker.outcome(endpoint, ok, reason)

    one_request(crash)
    assert len(registry.snapshot.ready["qod"]) == 3  # one failure each
    for _ in range(3):
        one_request(crash)
    snap = registry.snapshot
    assert [e.name for e in snap.ready["qod"]] == ["qod-2", "qod-3"]
    assert snap.by_name["qod-1"].reason.startswith("ejected after 2 failed requests")
    said = [r.getMessage() for r in caplog.records if "not ejected" in r.getMessage()]
    assert said == [
        f"endpoint {ep.id[:12]} at {ep.address}:80: not ejected after 2 failed requests: 1 of"
        " the 3 endpoints of service qod are ejected already, the most"
        " health.max_ejection_percent=50 allows"
        for ep in (b, c)
    ]
    assert checker.refused == {Refusal.MAX_PERCENT: 2}
    (family,) = [
        m for m in Collector(registry, health=checker).collect()
        if m.name == "stablenet_health_ejections_refused"
    ]  # fmt: skip
    counted = {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert counted == {"last_ready": 0, "max_ejection_percent": 2}
    # A success ends the run: c must fail eject_after times again before anything is said.
    one_request([(c, True, "ok")])
    status = checker.status(c.id)
    assert status is not None and (status.request_failures, status.held_back) == (0, None)


async def test_ejected_endpoint_is_probed_at_once_when_its_service_empties() -> None:
    """A replica ejected on request failures alone waits out its backoff while others serve;
    when the others leave, it is probed at once (a real TCP probe) and routed if it answers."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    registry = Registry()
    lone = Endpoint(
        id="1" * 64, name="e-1", service="e", address="127.0.0.1", port=port, network="n"
    )
    other = dataclasses.replace(lone, id="2" * 64, name="e-2", address="127.0.0.2")  # fmt: skip
    registry.apply([Upsert(lone), Upsert(other)])
    checker = HealthChecker(registry, HealthConfig(eject_after=2, eject_time=60.0))
    try:
        async with asyncio.TaskGroup() as group:
            task = group.create_task(checker.run())
            for _ in range(2):
                checker.outcome(lone, False, "HTTP 502")
            assert [e.name for e in registry.snapshot.ready["e"]] == ["e-2"]
            registry.apply([Remove(other.id)])
            snap = await until(registry, lambda s: bool(s.ready.get("e")), 5)
            assert "back after ejection" in snap.by_name["e-1"].reason
            task.cancel()
    finally:
        server.close()


async def test_panic_mode_routes_to_all_when_none_is_ready(
    registry: Registry, checker: HealthChecker, containers: Containers
) -> None:
    labels = {
        **FAST,
        "stablenet.service": "panicky",
        "stablenet.health.panic": "true",
        "stablenet.health.path": "/missing",
    }
    await off_loop(containers.run, "p1", labels=labels)
    await off_loop(containers.run, "p2", labels=labels)
    names = {containers.name("p1"), containers.name("p2")}
    snap = await until(registry, lambda s: all(state(s, n) is State.UNHEALTHY for n in names), WAIT)
    assert {e.name for e in snap.ready["panicky"]} == names


def test_odd_status_lines_fail_the_check_without_raising() -> None:
    spec = HealthSpec("/", 1.0, 1.0, 1, 1)
    for line in (b"", b"\r", b"HTTP/1.1", "HTTP/1.1 \u00b2\u00b2\u00b2 OK".encode(), b"SSH-2.0-x"):
        result = _judge(line, spec)
        assert (result.passing, result.reason) == (
            False,
            "malformed response: not an HTTP status line",
        ), line


async def test_probe_reasons_against_a_local_server() -> None:
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            if b"GET /ok " in request and b"Host: svc.example" in request:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif b"GET /slow " in request:
                await done.wait()  # never answers while the probe waits
            else:
                writer.write(b"HTTP/1.1 500 Oops\r\n\r\n")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    spec = HealthSpec("/ok", 1.0, 1.0, 1, 1, host="svc.example")
    try:
        assert (await probe("127.0.0.1", port, spec, 1.0)).reason == "HTTP 204"
        bad = await probe("127.0.0.1", port, HealthSpec("/x", 1.0, 1.0, 1, 1), 1.0)
        assert (bad.passing, bad.reason) == (False, "HTTP 500 (expected 200-399)")
        slow = await probe("127.0.0.1", port, HealthSpec("/slow", 1.0, 0.2, 1, 1), 0.2)
        assert (slow.passing, slow.reason) == (False, "timeout after 0.2s")
        assert (await probe("127.0.0.1", port, None, 1.0)).reason == "TCP connect ok"
    finally:
        done.set()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0)  # let the released handler close its connection
    refused = await probe("127.0.0.1", port, None, 1.0)
    assert (refused.passing, refused.reason) == (False, "connection refused")
