"""Restarts of stablenet itself under steady load: graceful takeovers (a second `stablenet run`
with the same config, or SIGHUP), upgrades (a different build of the package takes over), and
SIGKILL followed by a fresh start, with wrk sending through the proxy all along.

    .venv/bin/python -m benchmarks.restarts --graceful 20 --upgrades 5 --kills 3
    .venv/bin/python -m benchmarks.restarts --graceful 20 --how sighup

Two busybox httpd replicas of one service on the test engine; wrk (`-t1 -c8`, keep-alive)
sends `GET /` with the service's Host through the proxy on loopback. Each phase runs its own wrk
and counts its requests, non-2xx answers and socket errors. Upgrades alternate between this tree
(compiled when its `.native` build is current) and a copy of the package with a bumped version
(which then runs as Python: its sources differ from the build's digest). A kill is SIGKILL of
the serving process, then a new `stablenet run` at once, as a restart policy does: measured
without and with socket activation (this harness holding the listening sockets as systemd does
and passing them in LISTEN_FDS), from the kill to the new process's "serving" line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import docker

from tests.helpers import HTTPD, ensure_image, free_port

ROOT = Path(__file__).resolve().parent.parent
READY = "serving: ready"


@dataclass
class Load:
    requests: int = 0
    non2xx: int = 0
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0

    @property
    def failed(self) -> int:
        return self.non2xx + self.connect + self.read + self.write + self.timeout


@dataclass
class Phase:
    name: str
    events: int
    load: Load
    ready_s: list[float] = field(default_factory=list)  # the daemon's own time to ready
    gap_s: list[float] = field(default_factory=list)  # kill (or start) -> new one serving
    drained_s: list[float] = field(default_factory=list)  # takeover -> old one exited


class Stablenet:
    """One `stablenet run` process; its log lines are kept and can be awaited."""

    def __init__(
        self,
        env: dict[str, str],
        cwd: Path,
        log: IO[str],
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        argv = [sys.executable, "-m", "stablenet", "run"]
        if pass_fds:  # socket activation: systemd's fds start at 3, LISTEN_PID is the daemon's
            dup = " ".join(f"{fd}>&{src}" for fd, src in enumerate(pass_fds, 3))
            argv = ["bash", "-c", f'LISTEN_PID=$$ LISTEN_FDS={len(pass_fds)} exec "$@" {dup}', "-"]
            argv += [sys.executable, "-m", "stablenet", "run"]
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=pass_fds,
        )
        self.pid = self.proc.pid  # the serving process: a SIGHUP successor takes over the pipe
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.pos = 0  # lines before this one were matched already
        self.ended = threading.Event()  # every process writing to the pipe exited
        self._log = log
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._log.write(line)
            self.lines.put(line)
        self.proc.stderr.close()
        self.lines.put(None)
        self.ended.set()

    def wait_line(self, needle: str, timeout: float = 30.0) -> str:
        """The next line containing ``needle`` after the last one matched."""
        deadline = time.monotonic() + timeout
        while True:
            for at in range(self.pos, len(self.seen)):
                if needle in self.seen[at]:
                    self.pos = at + 1
                    return self.seen[at]
            self.pos = len(self.seen)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"pid {self.pid}: no {needle!r} within {timeout}s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                tail = "".join(self.seen[-8:])
                raise RuntimeError(f"pid {self.pid} exited before {needle!r}:\n{tail}")
            self.seen.append(line)

    def seen_line(self, needle: str) -> str:
        """A line already read that contains ``needle`` (matched or not), else ''."""
        return next((line for line in self.seen if needle in line), "")

    def ready_seconds(self) -> float:
        match = re.search(r"ready ([0-9.]+)s after start", self.wait_line(READY))
        return float(match.group(1)) if match else float("nan")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        if self.pid == self.proc.pid:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        elif not self.ended.wait(timeout):  # a SIGHUP successor: not our child
            os.kill(self.pid, signal.SIGKILL)
        self.proc.poll()


class Wrk:
    """wrk in the background until stopped (SIGINT makes it print its summary)."""

    def __init__(self, port: int, host: str, connections: int = 8) -> None:
        argv = ["wrk", "-t1", f"-c{connections}", "-d600s", "--timeout", "30s"]
        argv += ["-H", f"Host: {host}"]
        self.proc = subprocess.Popen(
            [*argv, f"http://127.0.0.1:{port}/"],
            stdout=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> Load:
        os.kill(self.proc.pid, signal.SIGINT)
        out, _ = self.proc.communicate(timeout=30)
        load = Load()
        if m := re.search(r"(\d+) requests in", out):
            load.requests = int(m.group(1))
        if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
            load.non2xx = int(m.group(1))
        if m := re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
            load.connect, load.read, load.write, load.timeout = map(int, m.groups())
        return load


def upgrade_copy(work: Path, version: str) -> Path:
    """A copy of the package with another version: a different build of stablenet."""
    root = work / f"build-{version}"
    shutil.copytree(ROOT / "stablenet", root / "stablenet", ignore=shutil.ignore_patterns("*.so"))
    init = root / "stablenet" / "__init__.py"
    text = re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text())
    init.write_text(text)
    return root


@contextlib.contextmanager
def replicas(client: docker.DockerClient, service: str, count: int = 2) -> Iterator[None]:
    image = ensure_image(client)
    made = []
    try:
        for i in range(count):
            box = client.containers.run(
                image,
                HTTPD,
                name=f"{service}-{i}",
                labels={"stablenet.service": service, "stablenet.port": "80"},
                detach=True,
            )
            made.append(box)
        yield
    finally:
        for box in made:
            with contextlib.suppress(docker.errors.APIError):
                box.remove(force=True)


class Bench:
    """One service, its replicas, a config of loopback ports and a private state directory."""

    def __init__(self, work: Path, workers: int = 0, controller: bool = False) -> None:
        self.work = work
        self.service = f"rst-{uuid.uuid4().hex[:6]}"
        self.proxy_port, self.dns_port, self.admin_port = free_port(), free_port(), free_port()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "STABLENET_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
            "STABLENET_DNS_LISTEN": f"127.0.0.1:{self.dns_port}",
            "STABLENET_DNS_UPSTREAMS": "127.0.0.1:9",  # nothing is forwarded in this benchmark
            "STABLENET_PROXY_LISTEN": f"127.0.0.1:{self.proxy_port}",
            "STABLENET_CONTROLLER_STATE_DIR": str(work / "state"),
            # Off unless asked: on a shared engine it would act on others' labelled containers.
            "STABLENET_CONTROLLER_ENABLED": "true" if controller else "false",
        }
        if workers:
            self.env["STABLENET_PROXY_WORKERS"] = str(workers)
        self.log = (work / "stablenet.log").open("a", buffering=1)
        self.host = f"{self.service}.stablenet.internal"
        self.running: Stablenet | None = None

    def start(self, build: Path | None = None, pass_fds: tuple[int, ...] = ()) -> Stablenet:
        env = dict(self.env)
        if build is not None:
            env["PYTHONPATH"] = str(build)
        return Stablenet(env, self.work, self.log, pass_fds)

    def first(self, pass_fds: tuple[int, ...] = ()) -> Stablenet:
        self.running = self.start(pass_fds=pass_fds)
        self.running.wait_line(READY)
        self.wait_routed()
        return self.running

    def wait_routed(self, timeout: float = 30.0) -> None:
        """Until a request through the proxy is answered 200 (both replicas registered)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", self.proxy_port), timeout=5) as s:
                    s.sendall(f"GET / HTTP/1.0\r\nHost: {self.host}\r\n\r\n".encode())
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return
            time.sleep(0.1)
        raise TimeoutError("the service was never routed")

    def close(self) -> None:
        """Stop what runs and close the log."""
        if self.running is not None:
            self.running.stop()
            self.running.ended.wait(30)
            self.running.proc.wait(timeout=30)
        self.log.close()

    def take_over(self, build: Path | None = None, how: str = "run") -> tuple[float, float]:
        """Replace the running process gracefully; (new one's time to ready, old one's drain)."""
        old = self.running
        assert old is not None
        if how == "sighup":
            os.kill(old.pid, signal.SIGHUP)
            line = old.wait_line("SIGHUP: started successor pid")
            new_pid = int(line.rsplit(" ", 1)[1])
            ready = old.ready_seconds()
            began = time.monotonic()
            old.wait_line("stopped", timeout=60)  # the old one's last line
            drained = time.monotonic() - began
            if old.pid == old.proc.pid:
                old.proc.wait(timeout=10)
            old.pid = new_pid
            return ready, drained
        new = self.start(build)
        ready = new.ready_seconds()
        began = time.monotonic()
        if old.pid == old.proc.pid:
            old.proc.wait(timeout=60)
        else:
            old.ended.wait(60)
        drained = time.monotonic() - began
        self.running = new
        return ready, drained


def run(args: argparse.Namespace) -> list[Phase]:
    client = docker.from_env()
    work = Path(tempfile.mkdtemp(prefix="stablenet-restarts-"))
    bench = Bench(work, args.workers, args.controller)
    phases: list[Phase] = []
    with replicas(client, bench.service):
        try:
            bench.first()
            if args.graceful:
                wrk = Wrk(bench.proxy_port, bench.host)
                phase = Phase(f"graceful ({args.how})", args.graceful, Load())
                for _ in range(args.graceful):
                    ready, drained = bench.take_over(how=args.how)
                    phase.ready_s.append(ready)
                    phase.drained_s.append(drained)
                phase.load = wrk.stop()
                phases.append(phase)
            if args.upgrades:
                wrk = Wrk(bench.proxy_port, bench.host)
                phase = Phase("upgrade (other build)", args.upgrades, Load())
                for i in range(args.upgrades):
                    build = upgrade_copy(work, f"0.1.0+up{i}") if i % 2 == 0 else None
                    ready, drained = bench.take_over(build)
                    phase.ready_s.append(ready)
                    phase.drained_s.append(drained)
                phase.load = wrk.stop()
                phases.append(phase)
            if args.kills:
                phases.append(kills(bench, args.kills, activation=False))
                phases.append(kills(bench, args.kills, activation=True))
        finally:
            bench.close()
    shutil.rmtree(work, ignore_errors=True)
    return phases


def kills(bench: Bench, count: int, activation: bool) -> Phase:
    """SIGKILL the serving process, start a new one at once; with ``activation`` the sockets
    are held here and passed in as systemd passes them."""
    held: list[socket.socket] = []
    assert bench.running is not None
    if activation or bench.running.pid != bench.running.proc.pid:
        bench.running.stop()
    if activation:
        for kind, port in (("tcp", bench.admin_port), ("udp", bench.dns_port),
                           ("tcp", bench.dns_port), ("tcp", bench.proxy_port)):  # fmt: skip
            sock = socket.socket(
                socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
            )
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            if kind == "tcp":
                sock.listen(1024)
            held.append(sock)
    if bench.running.proc.poll() is not None:
        bench.first(tuple(s.fileno() for s in held))
    fds = tuple(s.fileno() for s in held)
    wrk = Wrk(bench.proxy_port, bench.host)
    phase = Phase("SIGKILL + start" + (", socket activation" if activation else ""), count, Load())
    for _ in range(count):
        time.sleep(1.0)  # steady load before each kill
        began = time.monotonic()
        os.kill(bench.running.proc.pid, signal.SIGKILL)
        bench.running.proc.wait()
        bench.running = bench.start(pass_fds=fds)
        phase.ready_s.append(bench.running.ready_seconds())
        phase.gap_s.append(time.monotonic() - began)
    time.sleep(1.0)
    phase.load = wrk.stop()
    if activation:
        bench.running.stop()
        for sock in held:
            sock.close()
        bench.first()
    return phase


def report(phases: list[Phase]) -> None:
    print(
        "| restart | count | requests | failed (non-2xx / connect / read / write / timeout) "
        "| new one ready after start, max | kill -> serving, max | old one exited after, max |"
    )
    print("|---|---|---|---|---|---|---|")
    for p in phases:
        l = p.load  # noqa: E741
        print(
            f"| {p.name} | {p.events} | {l.requests:,} | **{l.failed}** ({l.non2xx} / "
            f"{l.connect} / {l.read} / {l.write} / {l.timeout}) | "
            f"{max(p.ready_s, default=0):.2f} s | "
            f"{f'{max(p.gap_s):.2f} s' if p.gap_s else '-'} | "
            f"{f'{max(p.drained_s):.2f} s' if p.drained_s else '-'} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--graceful", type=int, default=20)
    parser.add_argument("--upgrades", type=int, default=5)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--how", choices=("run", "sighup"), default="run")
    parser.add_argument("--workers", type=int, default=0, help="proxy.workers (0: the default)")
    parser.add_argument("--controller", action="store_true", help="controller.enabled = true")
    args = parser.parse_args()
    phases = run(args)
    report(phases)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "restarts.json").write_text(json.dumps([asdict(p) for p in phases], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
