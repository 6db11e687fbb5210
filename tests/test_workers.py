"""Proxy workers (workers.py): with proxy.workers = 2, requests through the proxy land on both
worker processes, /metrics shows their sum, and a worker killed with SIGKILL is replaced while
requests go on succeeding. Real processes, a real engine, wrk as the client."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from benchmarks.restarts import Bench, Wrk, replicas
from stablenet.model import Endpoint
from stablenet.registry import Registry, Snapshot
from stablenet.workers import Figures, encode, snapshot_message
from tests.test_handover import bench_metrics

CONNECTIONS = 8  # wrk's: at most this many requests are in flight at a kill


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def until_metrics(bench: Bench, check: object, within: float = 20.0) -> str:
    deadline = time.monotonic() + within
    while True:
        text = bench_metrics(bench)
        if callable(check) and check(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never satisfied the check:\n{text}")
        time.sleep(0.25)  # the workers report every 0.25 s: the next report


def worker_pids(bench: Bench) -> dict[int, int]:
    assert bench.running is not None
    pids: dict[int, int] = {}
    for line in bench.running.seen:
        if m := re.search(r"proxy worker (\d+) started: pid (\d+)", line):
            pids[int(m.group(1))] = int(m.group(2))
    return pids


def test_figures_add_up_counts_not_gauges() -> None:
    one = Figures(counters={"web": (3, 1, 0, 0, 0, 0)}, latency={"web": ([1, 2], 0.5)})
    one.inflight = {"c1": 4}
    two = Figures(counters={"web": (2, 0, 1, 0, 0, 0)}, latency={"web": ([0, 1], 0.25)})
    total = Figures()
    total.add_counts(one)
    total.add_counts(two)
    assert total.counters == {"web": (5, 1, 1, 0, 0, 0)}
    assert total.latency == {"web": ([1, 3], 0.75)}
    assert total.inflight == {}


def test_a_snapshot_of_a_thousand_endpoints_crosses_to_a_worker() -> None:
    endpoints = {
        f"c{i}": Endpoint(
            id=f"c{i}",
            name=f"web-{i}",
            service=f"svc{i % 50}",
            address=f"10.1.{i // 250}.{i % 250}",
            port=80,
            network="bridge",
        )
        for i in range(1000)
    }
    snap = Snapshot.build(7, endpoints, True, {})
    began = time.perf_counter()
    data = encode(snapshot_message(snap))
    encoded = time.perf_counter() - began
    registry = Registry()
    import pickle

    began = time.perf_counter()
    _, version, eps, synced, problems, fronted = pickle.loads(data[4:])
    registry.publish(Snapshot.build(version, eps, synced, problems, registry.prefer, fronted))
    decoded = time.perf_counter() - began
    print(
        f"1000 endpoints: {len(data)} bytes, encode {encoded * 1e3:.1f} ms, "
        f"decode+build {decoded * 1e3:.1f} ms"
    )
    assert registry.snapshot.version == 7
    assert len(registry.snapshot.services) == 50


@pytest.mark.timeout(300)
def test_two_workers_share_the_load_and_a_killed_one_is_replaced(
    docker_client: docker.DockerClient,
) -> None:
    with two_workers(docker_client) as running:
        bench = running.bench
        first = worker_pids(bench)
        assert sorted(first) == [0, 1]
        # One accept queue shared by both workers: fresh connections go to whichever
        # takes them first, so both serve.
        served = {0: 0.0, 1: 0.0}
        deadline = time.monotonic() + 20
        while not all(served.values()):
            assert time.monotonic() < deadline, f"not both workers served: {served}"
            for _ in range(20):
                assert fresh_request(bench).startswith(b"HTTP/1.1 200")
            text = bench_metrics(bench)
            served = {
                i: metric(text, "stablenet_proxy_worker_requests_total", worker=str(i))
                for i in served
            }
        wrk = running.load()
        until_metrics(
            bench,
            lambda text: (
                metric(text, "stablenet_proxy_requests_total") > sum(served.values()) + 500
            ),
        )
        os.kill(first[0], signal.SIGKILL)
        assert bench.running is not None
        bench.running.wait_line("proxy worker 0 (pid")  # seen exiting
        bench.running.wait_line("proxy worker 0 started")
        replaced = worker_pids(bench)
        assert replaced[0] != first[0] and replaced[1] == first[1]
        # wrk's kept-alive connections all reconnected to worker 1 meanwhile: fresh
        # connections show that the new worker 0 accepts and serves.
        deadline = time.monotonic() + 20
        while (
            metric(bench_metrics(bench), "stablenet_proxy_worker_requests_total", worker="0") == 0
        ):
            assert time.monotonic() < deadline, "the new worker 0 served nothing"
            for _ in range(20):
                assert fresh_request(bench).startswith(b"HTTP/1.1 200")
        load = wrk.stop()
        assert load.requests > 500
        assert load.failed <= CONNECTIONS, load  # only what worker 0 had in flight

        def all_counted(text: str) -> bool:
            # Up to 250 ms of the killed worker's requests (after its last report) are lost.
            return (
                metric(text, "stablenet_proxy_requests_total", service=bench.service)
                >= 0.9 * load.requests
            )

        text = until_metrics(bench, all_counted)
        summed = metric(text, "stablenet_proxy_requests_total", service=bench.service)
        per_worker = metric(text, "stablenet_proxy_worker_requests_total")
        # The sum keeps the killed worker's requests up to its last report.
        assert summed >= per_worker > 0
        assert metric(text, "stablenet_proxy_worker_restarts_total") == 1
        assert metric(text, "stablenet_proxy_workers") == 2
        ok = {"service": bench.service, "class": "2xx"}
        responses = metric(text, "stablenet_proxy_responses_total", **ok)
        assert responses >= 0.9 * (load.requests - load.failed)


def fresh_request(bench: Bench) -> bytes:
    with socket.create_connection(("127.0.0.1", bench.proxy_port), timeout=10) as conn:
        conn.sendall(f"GET / HTTP/1.0\r\nHost: {bench.host}\r\n\r\n".encode())
        return conn.recv(64)


def exited(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet (an orphan's new parent may not reap at once)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def worker_pids_in(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"proxy worker \d+ started: pid (\d+)", log)]


class Running:
    """A stablenet with two workers in front of two replicas, and wrk once started."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.wrk: Wrk | None = None
        self.log = ""

    def load(self) -> Wrk:
        self.wrk = Wrk(self.bench.proxy_port, self.bench.host, CONNECTIONS)
        return self.wrk


@contextlib.contextmanager
def two_workers(docker_client: docker.DockerClient) -> Iterator[Running]:
    """Started and routed; afterwards stopped, with no traceback logged and every worker gone
    with its main process."""
    with tempfile.TemporaryDirectory(prefix="stablenet-workers-") as tmp:
        running = Running(Bench(Path(tmp), workers=2))
        with replicas(docker_client, running.bench.service):
            try:
                running.bench.first()
                yield running
            finally:
                wrk = running.wrk
                if wrk is not None and wrk.proc.poll() is None:
                    wrk.proc.kill()
                    wrk.proc.wait()
                running.bench.close()
        running.log = (Path(tmp) / "stablenet.log").read_text()
        assert "Traceback" not in running.log
        # every worker exited with the main process
        assert all(exited(pid) for pid in worker_pids_in(running.log))


def test_a_worker_session_needs_a_hello() -> None:
    # A worker started with a closed channel ends at once instead of serving nothing.
    import asyncio

    from stablenet.workers import work

    ours, theirs = socket.socketpair()
    ours.close()
    asyncio.run(asyncio.wait_for(work(theirs.detach(), 0), 5))


@pytest.mark.timeout(300)
def test_takeovers_with_workers_fail_no_request(docker_client: docker.DockerClient) -> None:
    """The whole set restarts seamlessly: the successor's workers accept on the handed-over
    sockets before the old ones stop."""
    with two_workers(docker_client) as running:
        wrk = running.load()
        for _ in range(3):
            running.bench.take_over()
        load = wrk.stop()
        assert load.requests > 500
        assert load.failed == 0, load
    assert running.log.count("took over from pid") == 3


async def test_a_worker_reports_failures_and_holds_and_only_the_successes_that_count() -> None:
    import asyncio

    from stablenet.workers import Link, receive

    ours, theirs = socket.socketpair()
    reader, our_end = await asyncio.open_unix_connection(sock=ours)
    _, writer = await asyncio.open_unix_connection(sock=theirs)
    link = Link(writer)
    ep = Endpoint(id="c1", name="web-1", service="web", address="10.0.0.2", port=80, network="b")
    link.outcome(ep, True, "")  # nothing on record: the health checker would ignore it
    link.outcome(ep, False, "connect refused")
    link.hold("web")
    link.outcome(ep, True, "")  # after a failure, a success counts
    assert await receive(reader) == (
        "outcomes",
        [("c1", "10.0.0.2", False, "connect refused"), ("c1", "10.0.0.2", True, "")],
    )
    assert await receive(reader) == ("holds", ["web"])
    link.suspects, link.failed = frozenset(), set()  # the main process's next update
    link.outcome(ep, True, "")
    link.outcome(ep, False, "reset")
    assert await receive(reader) == ("outcomes", [("c1", "10.0.0.2", False, "reset")])
    writer.close()
    our_end.close()
    await writer.wait_closed()
    await our_end.wait_closed()


@pytest.mark.timeout(300)
def test_workers_of_a_killed_stablenet_exit_and_a_new_start_serves(
    docker_client: docker.DockerClient,
) -> None:
    """SIGKILL of the main process: its workers see their channel close, drain and exit, so the
    next start (a restart policy's) binds the listeners again and serves."""
    from benchmarks.restarts import READY

    with two_workers(docker_client) as running:
        bench = running.bench
        old = bench.running
        assert old is not None
        workers = worker_pids(bench)
        os.kill(old.pid, signal.SIGKILL)
        old.proc.wait(timeout=10)
        assert old.ended.wait(20)  # every process holding its log pipe (the workers) exited
        assert all(exited(pid) for pid in workers.values())
        bench.running = bench.start()
        bench.running.wait_line(READY)
        bench.wait_routed()
        assert fresh_request(bench).startswith(b"HTTP/1.1 200")
