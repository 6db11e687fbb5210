"""Descriptor exhaustion (#12): does a well-behaved client still get served while one source
floods the proxy with idle keep-alive connections and another holds DNS TCP connections?

    .venv/bin/python -m benchmarks.exhaustion
    .venv/bin/python -m benchmarks.exhaustion --flood 5000 --dns-holders 100 --rounds 10
    .venv/bin/python -m benchmarks.exhaustion --checkout /path/to/other/tree   # another build

One run: `stablenet run` (a subprocess, with a config written here, RLIMIT_NOFILE set to
--daemon-nofile as the host's default would give it) serves one service, a busybox httpd
container on the local engine. Then, in order:

1. baseline: --rounds sequential requests each of a well-behaved client: an HTTP GET through the
   proxy, a DNS query over TCP (dnspython) and GET /healthz on the admin API, each on a new
   connection from one of several loopback sources (127.0.0.2-6);
2. the flood: --flood connections from 127.0.0.1, each sends one GET (for an unknown host, so the
   proxy answers 404 itself) and then holds the connection idle; the flood processes raise their
   own RLIMIT_NOFILE to the hard limit, and there are as many of them as it takes to hold every
   connection (only CAP_SYS_RESOURCE could raise the hard limit);
3. the DNS holders: --dns-holders TCP connections to the DNS listener from a source that
   dns.allow does not allow: 10.253.N.2 in a network namespace made here with a veth pair to the
   host (10.253.N.1), run with `nsenter --net`; each asks a question every 3 s to stay open;
4. the well-behaved client again, with both floods held; then the daemon's metrics and its open
   descriptors.

Reported: success and latency per kind, before and under the floods; connections held, answered,
closed by stablenet after their answer (idle ones given up to make room) and refused (closed
before any answer); DNS holders held and refused. Traffic goes only to loopback, to the namespace
made here and its veth, and to the container started here; every loop is bounded in count and
time; processes are stopped by PID; the namespace and the container are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import docker
import docker.errors

from benchmarks.processes import stop
from tests.helpers import HTTPD, ensure_image, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SERVICE = "exh-web"
NAME = f"{SERVICE}.stablenet.internal"
POLITE = [f"127.0.0.{n}" for n in range(2, 7)]  # the well-behaved client's source addresses
STEP = 3.0  # seconds one well-behaved request may take
T = TypeVar("T")
KEEPALIVE_QUERY = 3.0  # seconds between a DNS holder's questions (the server drops after 10 s)


# ---------------------------------------------------------------- the well-behaved client


@dataclass
class Kind:
    """Outcomes of one kind of well-behaved request."""

    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    ms: list[float] = field(default_factory=list)

    def add(self, began: float, error: str | None) -> None:
        self.ms.append((time.perf_counter() - began) * 1000)
        if error is None:
            self.ok += 1
        else:
            self.failed[error] += 1

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "of": len(self.ms),
            "p50_ms": round(statistics.median(self.ms), 2) if self.ms else None,
            "max_ms": round(max(self.ms), 2) if self.ms else None,
            "failed": dict(self.failed),
        }


async def http_get(port: int, source: str, host: str, path: str = "/") -> int:
    """One GET on a new connection from ``source``; the status code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed before any answer")
        return int(line.split()[1])
    finally:
        writer.close()


@dataclass(frozen=True)
class Ports:
    proxy: int
    dns: int
    admin: int


async def ask(kind: str, ports: Ports, source: str) -> int:
    """One well-behaved request of a kind; 200 when it succeeded."""
    if kind == "http":
        return await http_get(ports.proxy, source, NAME)
    if kind == "dns_tcp":
        return await dns_tcp(ports.dns, source)
    return await http_get(ports.admin, "127.0.0.1", "admin", "/healthz")


async def polite(ports: Ports, rounds: int) -> dict[str, Any]:
    kinds = {"http": Kind(), "dns_tcp": Kind(), "healthz": Kind()}
    for n in range(rounds):
        for name, kind in kinds.items():
            began = time.perf_counter()
            try:
                async with asyncio.timeout(STEP):
                    result = await ask(name, ports, POLITE[n % len(POLITE)])
                error = None if result == 200 else f"status {result}"
            except TimeoutError:
                error = "timeout"
            except (OSError, EOFError, dns.exception.DNSException) as exc:
                error = type(exc).__name__
            kind.add(began, error)
    return {name: kind.summary() for name, kind in kinds.items()}


async def dns_tcp(port: int, source: str) -> int:
    """One A query over TCP; 200 when answered NOERROR with an address, else the rcode name."""
    query = dns.message.make_query(NAME, "A")
    reply = await dns.asyncquery.tcp(query, "127.0.0.1", port=port, source=source, timeout=STEP)
    if reply.rcode() == dns.rcode.NOERROR and reply.answer:
        return 200
    raise OSError(f"rcode {dns.rcode.to_text(reply.rcode())}")


# ---------------------------------------------------------------- the flood


@dataclass
class Flood:
    opened: int = 0
    answered: int = 0
    closed_after_answer: int = 0  # idle connections stablenet gave up to make room
    refused: int = 0  # closed before any answer
    connect_failed: int = 0

    @property
    def held(self) -> int:
        return self.opened - self.closed_after_answer - self.refused


class FloodConnection(asyncio.Protocol):
    """Sends one GET, notes the answer, then holds the connection until stablenet closes it."""

    def __init__(self, flood: Flood, settled: asyncio.Future[None]) -> None:
        self.flood = flood
        self.settled = settled
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.flood.opened += 1
        request = b"GET / HTTP/1.1\r\nHost: nothing.example\r\n\r\n"
        transport.write(request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            self.flood.answered += 1
            if not self.settled.done():
                self.settled.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answered:
            self.flood.closed_after_answer += 1
        else:
            self.flood.refused += 1
        if not self.settled.done():
            self.settled.set_result(None)


async def flood(port: int, count: int, concurrency: int, seconds: float) -> tuple[Flood, list[Any]]:
    """Open ``count`` connections from 127.0.0.1, ``concurrency`` at a time, each waiting for its
    answer (or its end) before the worker opens the next."""
    loop = asyncio.get_running_loop()
    state = Flood()
    transports: list[Any] = []
    left = count
    deadline = loop.time() + seconds

    async def worker() -> None:
        nonlocal left
        while left > 0 and loop.time() < deadline:
            left -= 1
            settled: asyncio.Future[None] = loop.create_future()
            try:
                transport, _ = await loop.create_connection(
                    functools.partial(FloodConnection, state, settled), "127.0.0.1", port
                )
            except OSError:
                state.connect_failed += 1
                continue
            transports.append(transport)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STEP):
                    await settled

    async with asyncio.TaskGroup() as group:
        for n in range(concurrency):
            group.create_task(worker(), name=f"flood-{n}")
    return state, transports


async def flood_and_hold(port: int, count: int, concurrency: int, seconds: float) -> None:
    """The flood in a process of its own: print its counts once every connection is open (or
    refused), hold them until SIGTERM or ``seconds``, print the counts again."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    state, transports = await flood(port, count, concurrency, seconds)
    print(json.dumps({**asdict(state), "held": state.held}), flush=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await done.wait()
    print(json.dumps({**asdict(state), "held": state.held, "at_end": True}), flush=True)
    for transport in transports:
        transport.abort()


# ---------------------------------------------------------------- the DNS holders (in the netns)


async def hold_dns(target: str, count: int, seconds: float) -> None:
    """Open ``count`` DNS TCP connections and keep them open with a question every few
    seconds; print {"held", "refused"} once all are open, then again at the end."""
    host, _, port = target.rpartition(":")
    query = dns.message.make_query(NAME, "A").to_wire()
    framed = len(query).to_bytes(2, "big") + query
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    refused = 0

    async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            writer.write(framed)
            async with asyncio.timeout(STEP):
                size = int.from_bytes(await reader.readexactly(2), "big")
                await reader.readexactly(size)
            return True
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            return False

    for _ in range(count):
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            refused += 1
            continue
        if await ask(reader, writer):
            held.append((reader, writer))
        else:
            refused += 1
            writer.close()
    print(json.dumps({"held": len(held), "refused": refused}), flush=True)
    end = time.monotonic() + seconds
    while held and time.monotonic() < end:
        await asyncio.sleep(KEEPALIVE_QUERY)
        alive = []
        for reader, writer in held:
            if await ask(reader, writer):
                alive.append((reader, writer))
            else:
                writer.close()
        held = alive
    print(json.dumps({"held": len(held), "refused": refused, "at_end": True}), flush=True)


# ---------------------------------------------------------------- setup and teardown


@dataclass
class Namespace:
    """A network namespace joined to the host by a veth pair: host .1, namespace .2 of a /30."""

    name: str
    host_if: str
    subnet: int  # N in 10.253.N.0/30

    @property
    def host_address(self) -> str:
        return f"10.253.{self.subnet}.1"

    @property
    def inside_address(self) -> str:
        return f"10.253.{self.subnet}.2"

    @classmethod
    def create(cls) -> Namespace:
        tag = uuid.uuid4().hex[:6]
        used = subprocess.run(
            ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True
        ).stdout
        subnet = next(n for n in range(1, 255) if f" 10.253.{n}." not in used)
        ns = cls(f"snexh-{tag}", f"snx{tag}h", subnet)
        inside = f"snx{tag}n"
        for cmd in (
            ["ip", "netns", "add", ns.name],
            ["ip", "link", "add", ns.host_if, "type", "veth", "peer", "name", inside],
            ["ip", "link", "set", inside, "netns", ns.name],
            ["ip", "addr", "add", f"{ns.host_address}/30", "dev", ns.host_if],
            ["ip", "link", "set", ns.host_if, "up"],
            ["ip", "-n", ns.name, "addr", "add", f"{ns.inside_address}/30", "dev", inside],
            ["ip", "-n", ns.name, "link", "set", inside, "up"],
            ["ip", "-n", ns.name, "link", "set", "lo", "up"],
        ):
            try:
                subprocess.run(cmd, check=True, capture_output=True)
            except subprocess.CalledProcessError:
                ns.remove()
                raise
        return ns

    def enter(self) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.name}"]

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


def raise_own_limit(wanted: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (up to the hard limit, which
    only CAP_SYS_RESOURCE may raise); return what it was."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    if before[0] < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, before[1]), before[1]))
    return before


def daemon_config(ports: Ports, ns: Namespace) -> str:
    return (
        "[dns]\n"
        f'listen = ["127.0.0.1:{ports.dns}", "{ns.host_address}:{ports.dns}"]\n'
        'allow = ["127.0.0.0/8"]  # not the namespace\'s 10.253 address\n'
        "[proxy]\n"
        f'listen = "127.0.0.1:{ports.proxy}"\n'
        'idle_timeout = "5m"  # the flood stays idle for the whole run\n'
        "[admin]\n"
        f'listen = "127.0.0.1:{ports.admin}"\n'
    )


async def wait_routed(admin: int, proc: subprocess.Popen[bytes], log: str) -> None:
    async with aiohttp.ClientSession() as http, asyncio.timeout(60):
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"stablenet exited; log: {log}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{admin}/v1/services/{SERVICE}") as resp:
                    if resp.status == 200:
                        body = await resp.json()
                        if any(e["state"] == "ready" for e in body["endpoints"]):
                            return
            await asyncio.sleep(0.1)


async def scrape(admin: int) -> dict[str, float]:
    """The proxy's connection metrics (names starting stablenet_proxy_connections)."""
    out: dict[str, float] = {}
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with aiohttp.ClientSession() as http, asyncio.timeout(STEP):
            async with http.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                for line in (await resp.text()).splitlines():
                    if line.startswith("stablenet_proxy_connections"):
                        name, _, value = line.rpartition(" ")
                        out[name] = float(value)
    return out


def open_descriptors(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


# ---------------------------------------------------------------- the run


def helper(command: list[str], prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """This module run as a helper process (flood, hold-dns); its reports come on stdout."""
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "benchmarks.exhaustion", *command],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
    )


async def report(proc: subprocess.Popen[bytes], within: float) -> dict[str, Any]:
    """A helper's first report (an empty one if it ends without)."""
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), within)
    return dict(json.loads(line)) if line.strip() else {}


def last_report(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Stop a helper by its PID and take its last report (its counts as it ended)."""
    stop(proc, grace=10)
    assert proc.stdout is not None
    lines = [line for line in proc.stdout.read().splitlines() if line.strip()]
    return dict(json.loads(lines[-1])) if lines else {}


def total(reports: list[dict[str, Any]]) -> dict[str, int]:
    keys = {k for r in reports for k, v in r.items() if type(v) is int}
    return {k: sum(int(r.get(k, 0)) for r in reports) for k in sorted(keys)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    checkout: Path = args.checkout
    client = docker.from_env(version="auto", timeout=60)
    box = client.containers.run(
        ensure_image(client),
        HTTPD,
        name=f"exh-{uuid.uuid4().hex[:6]}",
        labels={"stablenet.service": SERVICE},
        detach=True,
    )
    ns = Namespace.create()
    ports = Ports(free_port(), free_port(), free_port())
    workdir = Path(tempfile.mkdtemp(prefix="stablenet-exhaustion-"))
    config = workdir / "stablenet.toml"
    config.write_text(daemon_config(ports, ns))
    log = workdir / "stablenet.log"
    nofile = args.daemon_nofile or hard
    env = {k: v for k, v in os.environ.items() if not k.startswith("STABLENET_")}
    env["PYTHONPATH"] = str(checkout)
    # One process can hold at most its hard limit, which only CAP_SYS_RESOURCE may raise: the
    # flood comes from as many processes as that takes, all from 127.0.0.1.
    procs = max(1, -(-args.flood // max(1, hard - 512)))
    daemon: subprocess.Popen[bytes] | None = None
    helpers: list[subprocess.Popen[bytes]] = []
    try:
        with log.open("wb") as out:
            daemon = subprocess.Popen(  # noqa: ASYNC220 - started once, stopped by PID
                [sys.executable, "-m", "stablenet", "run", "--config", str(config)],
                cwd=checkout,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
            )
        await wait_routed(ports.admin, daemon, str(log))
        baseline = await polite(ports, args.rounds)

        began = time.perf_counter()
        floods = [
            helper(
                [
                    "flood",
                    str(ports.proxy),
                    "--count",
                    str(args.flood // procs + (n < args.flood % procs)),
                    "--concurrency",
                    str(max(1, args.concurrency // procs)),
                    "--seconds",
                    str(args.seconds),
                ]
            )
            for n in range(procs)
        ]
        helpers += floods
        flooded = total([await report(proc, args.seconds + 10) for proc in floods])
        flood_seconds = time.perf_counter() - began

        holder = helper(
            [
                "hold-dns",
                f"{ns.host_address}:{ports.dns}",
                "--count",
                str(args.dns_holders),
                "--seconds",
                str(args.seconds),
            ],
            prefix=tuple(ns.enter()),
        )
        helpers.append(holder)
        holders = await report(holder, args.seconds)

        under = await polite(ports, args.rounds)
        metrics = await scrape(ports.admin)
        descriptors = open_descriptors(daemon.pid)
        # The counts as measured: a flood process's first report predates later evictions.
        flooded = total([await asyncio.to_thread(last_report, proc) for proc in floods])
    finally:
        for proc in helpers:
            stop(proc, grace=5)
        if daemon is not None:
            stop(daemon)
        with contextlib.suppress(docker.errors.APIError):
            box.remove(force=True)
        client.close()
        ns.remove()
    lines = log.read_text(errors="replace").splitlines()
    return {
        "checkout": str(checkout),
        "daemon_nofile": nofile,
        "budget_log": [line for line in lines if "connection budget" in line],
        "warnings": sum("proxy connection limit reached" in line for line in lines),
        "emfile_lines": sum("Too many open files" in line for line in lines),
        "flood": {**flooded, "processes": procs, "seconds": round(flood_seconds, 1)},
        "dns_holders": {"asked": args.dns_holders, **holders},
        "baseline": baseline,
        "under_flood": under,
        "daemon_open_descriptors": descriptors,
        "metrics": metrics,
        "log": str(log),
    }


def table(result: dict[str, Any]) -> str:
    rows = ["| request | baseline ok | p50 ms | under floods ok | p50 ms | max ms | failures |"]
    rows.append("|---|---|---|---|---|---|---|")
    for kind in ("http", "dns_tcp", "healthz"):
        b, u = result["baseline"][kind], result["under_flood"][kind]
        rows.append(
            f"| {kind} | {b['ok']}/{b['of']} | {b['p50_ms']} | {u['ok']}/{u['of']} | "
            f"{u['p50_ms']} | {u['max_ms']} | {u['failed'] or '-'} |"
        )
    return "\n".join(rows)


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def helper_main(command: str, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog=f"benchmarks.exhaustion {command}")
    parser.add_argument("target", help="PORT on 127.0.0.1 (flood) or HOST:PORT (hold-dns)")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=120)
    args = parser.parse_args(argv)
    raise_own_limit(args.count + 256)
    if command == "flood":
        run_loop(flood_and_hold(int(args.target), args.count, args.concurrency, args.seconds))
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        run_loop(hold_dns(args.target, args.count, args.seconds))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("flood", "hold-dns"):
        helper_main(sys.argv[1], sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=20_000, help="idle connections to hold")
    parser.add_argument("--concurrency", type=int, default=64, help="flood connections opening")
    parser.add_argument("--dns-holders", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=20, help="well-behaved requests per kind")
    parser.add_argument("--daemon-nofile", type=int, default=0, help="default: the hard limit")
    parser.add_argument("--checkout", default="", help="run stablenet from this source tree")
    parser.add_argument("--seconds", type=float, default=120, help="bound on each phase")
    args = parser.parse_args()
    args.checkout = Path(args.checkout).resolve() if args.checkout else ROOT
    result = run_loop(asyncio.wait_for(run(args), args.seconds * 4))
    print(json.dumps(result, indent=2))
    print(table(result))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "exhaustion.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
