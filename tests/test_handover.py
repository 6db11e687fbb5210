"""Restarts of stablenet under steady load (handover.py, sockets.py, the daemon's ordering):
graceful takeovers and upgrades fail nothing, SIGHUP starts a successor that takes over, a
SIGKILL fails only what was in flight when the sockets outlive the process (socket activation).
Real processes, a real engine, wrk as the client; benchmarks/restarts.py is the harness."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import docker
import pytest

from benchmarks.restarts import Bench, Wrk, kills, replicas, upgrade_copy
from stablenet.handover import take_over
from stablenet.sockets import Sockets, key_of

CONNECTIONS = 8  # wrk's: at most this many requests are in flight at a kill


def test_sockets_are_taken_once_and_listed_while_open() -> None:
    early = socket.socket()
    early.bind(("127.0.0.1", 0))
    early.listen()
    key = key_of(early)
    pool = Sockets([early])
    assert pool.take(*key) is early
    assert pool.live() == [early]
    early.close()
    assert pool.live() == []


def test_nothing_to_take_over_from_is_a_fresh_start(tmp_path: Path) -> None:
    stale = tmp_path / "handover.sock"
    with socket.socket(socket.AF_UNIX) as dead:  # a crashed process leaves its file behind
        dead.bind(str(stale))
    assert take_over(stale) is None
    assert take_over(tmp_path / "none.sock") is None


@pytest.mark.timeout(1200)  # 25 process starts: slow on a loaded 2-core machine
def test_twenty_takeovers_and_five_upgrades_fail_no_request(
    docker_client: docker.DockerClient,
) -> None:
    with tempfile.TemporaryDirectory(prefix="stablenet-handover-") as tmp:
        work = Path(tmp)
        bench = Bench(work, controller=True)  # the controller lock passes at each takeover
        with replicas(docker_client, bench.service):
            try:
                first = bench.first()
                wrk = Wrk(bench.proxy_port, bench.host, CONNECTIONS)
                versions = []
                for i in range(25):
                    # The last five alternate between a copy with another version and this
                    # tree: each is a different build from the one it takes over from.
                    build = upgrade_copy(work, f"0.1.0+up{i}") if i >= 20 and i % 2 == 0 else None
                    bench.take_over(build)
                    assert bench.running is not None
                    versions.append(bench.running.seen_line("starting (request path"))
                load = wrk.stop()
                assert first.proc.returncode == 0
                assert sum("+up" in line for line in versions) == 3
                assert load.requests > 1000
                assert load.failed == 0, load
                log = (work / "stablenet.log").read_text()
                assert log.count("took over from pid") == 25
                assert log.count("controller lock released for pid") == 25
                assert "Traceback" not in log
            finally:
                bench.close()


@dataclass
class Resolver:
    """A DNS client asking for one name over UDP in a loop, as a stub resolver does: each
    question is sent up to 3 times (300 ms apart) before it counts as lost."""

    port: int
    name: str
    answered: int = 0
    lost: int = 0
    wrong: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Resolver:
        self._thread = threading.Thread(target=self._run, name="dns-client", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            question = dns.message.make_query(self.name, "A")
            for _ in range(3):
                try:
                    reply = dns.query.udp(question, "127.0.0.1", port=self.port, timeout=0.3)
                except dns.exception.Timeout:
                    continue
                if reply.rcode() == dns.rcode.NOERROR and reply.answer:
                    self.answered += 1
                else:
                    self.wrong.append(dns.rcode.to_text(reply.rcode()))
                break
            else:
                self.lost += 1

    def stop(self) -> Resolver:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return self


def test_sighup_starts_a_successor_that_takes_over(docker_client: docker.DockerClient) -> None:
    """... and DNS answers every question a retrying client asks meanwhile."""
    with tempfile.TemporaryDirectory(prefix="stablenet-sighup-") as tmp:
        bench = Bench(Path(tmp))
        with replicas(docker_client, bench.service):
            try:
                first = bench.first()
                wrk = Wrk(bench.proxy_port, bench.host, CONNECTIONS)
                resolver = Resolver(bench.dns_port, bench.host).start()
                pids = {first.pid}
                for _ in range(3):
                    bench.take_over(how="sighup")
                    pids.add(first.pid)  # the pid now serving, whose log comes through here
                load = wrk.stop()
                asked = resolver.stop()
                assert asked.answered > 100
                assert asked.lost == 0 and asked.wrong == [], asked
                assert len(pids) == 4
                assert first.proc.returncode == 0  # the first one exited once drained
                assert load.requests > 100
                assert load.failed == 0, load
                os.kill(first.pid, 0)  # the last successor serves on
            finally:
                bench.close()


def test_sigkill_fails_only_requests_in_flight_and_reports_time_to_ready(
    docker_client: docker.DockerClient,
) -> None:
    with tempfile.TemporaryDirectory(prefix="stablenet-kill-") as tmp:
        bench = Bench(Path(tmp))
        with replicas(docker_client, bench.service):
            try:
                bench.first()
                phase = kills(bench, 2, activation=True)
                assert phase.load.requests > 100
                assert phase.load.failed <= 2 * CONNECTIONS, phase.load
                assert phase.load.non2xx == 0  # nothing answered before it knew the services
                assert all(0 < seconds < 30 for seconds in phase.ready_s), phase
                metrics = bench_metrics(bench)
                assert "stablenet_ready_seconds" in metrics
            finally:
                bench.close()


def bench_metrics(bench: Bench) -> str:
    with socket.create_connection(("127.0.0.1", bench.admin_port), timeout=10) as conn:
        conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()
