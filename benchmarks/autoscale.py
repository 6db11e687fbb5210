"""Autoscaling under a load profile of steps, beside the same profile on a fixed replica count.

    .venv/bin/python -m benchmarks.autoscale
    .venv/bin/python -m benchmarks.autoscale --fixed 2,3 --low 35 --oscillate 96
    .venv/bin/python -m benchmarks.autoscale --fixed "" --oscillate 0     # the autoscaled run only

The backend: a small asyncio HTTP server (the host's python3.11 mounted read-only into a busybox
container, as DESIGN.md describes) that serves at most --cap requests at once, each taking
--work-ms; further requests wait in the replica (an application's worker pool). /healthz is
answered at once, outside that limit.

The load: an open loop (requests sent at a fixed rate whatever the answers do, so a slow backend
shows as latency, not as fewer requests; latency counts from when a request was due) through
stablenet's proxy on loopback, in phases: low, 4x low, low, idle, one request (a cold start from
zero when the service scaled to zero), then, for the autoscaled run, --oscillate seconds of
load switching between 4x and low every --half seconds.

Runs: `autoscaled` (stablenet.replicas.min=0, max, target, and windows shorter than the
defaults: stablenet.scale.window, down_window, idle from the flags) and, for each --fixed N, the
same profile on N replicas started up front with no autoscaling labels.

Reported per run: ready replicas sampled from /v1/services every --sample seconds (a table and an
SVG plot in benchmarks/results/), p50/p99/max latency and failures per phase, replica-seconds,
the time ready replicas took to settle after each step, scale-downs during the oscillation, and
the cold-start latency beside the container's own start-to-ready time (a stopped container of
the same image started again until /healthz answers, measured from here apart from the daemon).

Isolation: the run uses a private Docker engine on a bridge of its own (tests/helpers.py's
private_engine), so no other controller on a shared engine acts on its labelled containers and
its controller acts on nothing else; the daemon has its own controller.state_dir in a temporary
directory. Traffic goes to loopback and to this run's containers on that bridge only; every load
loop is bounded in count and time. Every container is removed at the end, the engine stopped by
its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import docker
import docker.errors

from benchmarks.failover import percentile
from benchmarks.processes import stop
from tests.helpers import ensure_image, free_port, private_engine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
ZONE = "stablenet.internal"
REQUEST_TIMEOUT = 30.0  # above the proxy's hold timeout: a held request is not a client timeout
HOLD_TIMEOUT = 20.0
MAX_OUTSTANDING = 2000  # requests in flight from the load loop at most (a bound, never reached)
PYTHON = "/usr/bin/python3.11"

# The backend, run as `python3.11 /app/server.py` in the container: HTTP/1.1 with keep-alive,
# CAP requests served at once, each WORK_MS long; the rest wait for a free slot.
SERVER = r"""
import asyncio, os, signal

CAP = int(os.environ.get("CAP", "4"))
WORK = float(os.environ.get("WORK_MS", "50")) / 1000


async def main():
    gate = asyncio.Semaphore(CAP)

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                request = lines[0].split()
                length, close = 0, request[-1:] == [b"HTTP/1.0"]
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"connection":
                        close = value.strip().lower() == b"close"
                if length:
                    await reader.readexactly(length)
                if request[1:2] != [b"/healthz"]:
                    async with gate:
                        await asyncio.sleep(WORK)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
                    + (b"Connection: close\r\n" if close else b"")
                    + b"\r\nok\n"
                )
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    server = await asyncio.start_server(handle, "0.0.0.0", 80, backlog=1024)
    async with server:
        await done.wait()


asyncio.run(main())
"""


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    rate: float  # requests per second; 0: idle
    seconds: float
    single: bool = False  # one request, then wait out the phase


@dataclass(slots=True)
class Outcome:
    phase: str
    due: float  # seconds since the run's start
    latency: float  # seconds, from when the request was due
    ok: bool
    error: str = ""


@dataclass(slots=True)
class Sample:
    t: float  # seconds since the run's start
    ready: int  # endpoints the proxy routes to
    running: int  # endpoints registered (running containers, ready or starting)
    desired: int | None = None
    concurrency: float | None = None


@dataclass
class Settings:
    cap: int
    work_ms: float
    low: float
    target: float
    max: int
    window: float
    down_window: float
    idle: float
    phases: list[Phase]
    oscillate: float
    half: float
    sample: float
    health_interval: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


def profile(low: float, seconds: dict[str, float]) -> list[Phase]:
    return [
        Phase("low", low, seconds["low"]),
        Phase("4x", 4 * low, seconds["high"]),
        Phase("low again", low, seconds["low2"]),
        Phase("idle", 0.0, seconds["idle"]),
        Phase("one request", 0.0, seconds["one"], single=True),
    ]


def oscillation(low: float, total: float, half: float) -> list[Phase]:
    phases = []
    for i in range(max(0, math.floor(total / half))):
        high = i % 2 == 0
        phases.append(
            Phase("oscillate 4x" if high else "oscillate low", low * (4 if high else 1), half)
        )
    return phases


# ---------------------------------------------------------------- the backend and the daemon


class Backend:
    """The server script in a host directory, and how a container runs it."""

    def __init__(self, cap: int, work_ms: float) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="autoscale-app-", ignore_cleanup_errors=True)
        script = Path(self.dir.name) / "server.py"
        script.write_text(SERVER)
        script.chmod(0o644)
        Path(self.dir.name).chmod(0o755)
        ro = {"mode": "ro"}
        self.serve: dict[str, Any] = {
            "command": [PYTHON, "/app/server.py"],
            "environment": {"CAP": str(cap), "WORK_MS": str(work_ms)},
            "volumes": {
                self.dir.name: {"bind": "/app", **ro},
                PYTHON: {"bind": PYTHON, **ro},
                "/lib": {"bind": "/lib", **ro},
                "/lib64": {"bind": "/lib64", **ro},
                "/usr/lib": {"bind": "/usr/lib", **ro},
            },
            "init": True,
        }

    def close(self) -> None:
        self.dir.cleanup()


class Daemon:
    """`stablenet run` as a subprocess: proxy and admin on loopback, its own state directory."""

    def __init__(self, docker_host: str) -> None:
        self.admin_port = free_port()
        self.proxy_port = free_port()
        self.dns_port = free_port()
        self.docker_host = docker_host
        self.state = tempfile.TemporaryDirectory(prefix="autoscale-state-")
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept for reading after a failure
            prefix="stablenet-autoscale-", suffix=".log", delete=False
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    async def start(self) -> None:
        env = {
            **os.environ,
            "DOCKER_HOST": self.docker_host,
            "STABLENET_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
            "STABLENET_DNS_LISTEN": f"127.0.0.1:{self.dns_port}",
            "STABLENET_PROXY_LISTEN": f"127.0.0.1:{self.proxy_port}",
            "STABLENET_PROXY_HOLD_TIMEOUT": f"{HOLD_TIMEOUT:g}s",
            "STABLENET_CONTROLLER_STATE_DIR": self.state.name,
            "STABLENET_CONTROLLER_DRAIN_TIMEOUT": "10s",
        }
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [sys.executable, "-m", "stablenet", "run"],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        async with aiohttp.ClientSession() as http, asyncio.timeout(30):
            while True:
                self.check()
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{self.admin}/readyz") as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.1)

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"stablenet exited; log: {self.log.name}")

    async def service(self, http: aiohttp.ClientSession, name: str) -> dict[str, Any] | None:
        try:
            async with http.get(f"{self.admin}/v1/services/{name}") as r:
                if r.status != 200:
                    return None
                body: dict[str, Any] = await r.json()
                return body
        except aiohttp.ClientError:
            return None

    async def events(self, service: str) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as http, http.get(f"{self.admin}/v1/events") as r:
            events: list[dict[str, Any]] = (await r.json())["events"]
        return [e for e in events if e["service"] == service]

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc, grace=30)
            self.proc = None
        self.state.cleanup()
        self.log.close()


# ---------------------------------------------------------------- load and sampling


async def request(
    http: aiohttp.ClientSession, url: str, host: str, phase: str, due: float, t0: float
) -> Outcome:
    error = ""
    try:
        async with http.get(url + "/work", headers={"Host": host}) as resp:
            body = await resp.read()
            if resp.status != 200 or body != b"ok\n":
                error = f"{resp.status} {body[:60]!r}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = type(exc).__name__
    done = time.monotonic() - t0
    return Outcome(phase, due, done - due, not error, error)


async def drive(
    url: str, host: str, phases: list[Phase], t0: float, outcomes: list[Outcome]
) -> list[tuple[str, float, float, float]]:
    """Send the phases' requests, each at its due time (an open loop); return each phase's
    (name, start, end, rate) in seconds since t0. Bounded: every phase has a fixed count."""
    spans = []
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=MAX_OUTSTANDING, force_close=False)
    outstanding = 0

    async def one(phase: str, due: float) -> None:
        nonlocal outstanding
        outstanding += 1
        try:
            outcomes.append(await request(http, url, host, phase, due, t0))
        finally:
            outstanding -= 1

    start = time.monotonic() - t0
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        async with asyncio.TaskGroup() as tasks:
            for phase in phases:
                count = 1 if phase.single else round(phase.rate * phase.seconds)
                for i in range(count):
                    due = start + (0 if phase.single else i / phase.rate)
                    delay = due - (time.monotonic() - t0)
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if outstanding >= MAX_OUTSTANDING:
                        outcomes.append(Outcome(phase.name, due, 0.0, False, "client limit"))
                        continue
                    tasks.create_task(one(phase.name, due))
                end = start + phase.seconds
                spans.append(
                    (phase.name, start, end, 1 / phase.seconds if phase.single else phase.rate)
                )
                delay = end - (time.monotonic() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                start = end
    return spans


async def sample(
    daemon: Daemon,
    service: str,
    t0: float,
    every: float,
    stop_at: asyncio.Event,
    into: list[Sample],
) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while not stop_at.is_set():
            body = await daemon.service(http, service)
            if body is not None:
                ctl = body.get("controller") or {}
                auto = ctl.get("autoscale") or {}
                into.append(
                    Sample(
                        round(time.monotonic() - t0, 3),
                        int(body["ready"]),
                        len(body["endpoints"]),
                        ctl.get("desired"),
                        auto.get("concurrency"),
                    )
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_at.wait(), every)


async def wait_ready(daemon: Daemon, service: str, count: int, within: float) -> None:
    async with aiohttp.ClientSession() as http, asyncio.timeout(within):
        while True:
            daemon.check()
            body = await daemon.service(http, service)
            if body is not None and body["ready"] == count:
                return
            await asyncio.sleep(0.1)


# ---------------------------------------------------------------- the container's own start


def container_ready_times(
    client: docker.DockerClient, image: str, backend: Backend, prefix: str, samples: int
) -> dict[str, Any]:
    """A container of the same image and command, not labelled for stablenet: `docker start`
    of it stopped (as a parked replica is started) until its /healthz answers, polled every
    5 ms from here; the first sample is a fresh `docker run`."""
    import socket

    def healthz(ip: str) -> bool:
        try:
            with socket.create_connection((ip, 80), timeout=0.5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def until_ready(box: Any, began: float) -> float:
        box.reload()
        ip = box.attrs["NetworkSettings"]["IPAddress"]
        deadline = began + 30
        while time.monotonic() < deadline:
            if healthz(ip):
                return time.monotonic() - began
            time.sleep(0.005)
        raise RuntimeError("the backend container did not answer /healthz within 30 s")

    began = time.monotonic()
    box = client.containers.run(
        image, name=f"{prefix}-readiness", detach=True, labels={"stablenet.enable": "false"},
        **backend.serve,
    )  # fmt: skip
    try:
        fresh = until_ready(box, began)
        starts = []
        for _ in range(samples):
            box.stop(timeout=10)
            began = time.monotonic()
            box.start()
            starts.append(until_ready(box, began))
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            box.remove(force=True)
    return {
        "run_to_ready_s": round(fresh, 3),
        "start_to_ready_s": [round(s, 3) for s in starts],
        "start_to_ready_median_s": round(sorted(starts)[len(starts) // 2], 3),
    }


# ---------------------------------------------------------------- one run


def start_replica(
    client: docker.DockerClient, image: str, name: str, labels: dict[str, str], backend: Backend
) -> None:
    client.containers.run(image, name=name, detach=True, labels=labels, **backend.serve)


def cleanup(client: docker.DockerClient, service: str) -> None:
    """Every container of the service, the ones the controller created included."""
    for box in client.containers.list(all=True, filters={"label": f"stablenet.service={service}"}):
        with contextlib.suppress(docker.errors.NotFound):
            box.remove(force=True)


async def run(
    client: docker.DockerClient,
    docker_host: str,
    image: str,
    backend: Backend,
    prefix: str,
    settings: Settings,
    fixed: int | None,
) -> dict[str, Any]:
    label = "autoscaled" if fixed is None else f"fixed {fixed}"
    service = f"{prefix}-{'auto' if fixed is None else f'fixed{fixed}'}"
    labels = {
        "stablenet.service": service,
        "stablenet.port": "80",
        "stablenet.health.path": "/healthz",
        "stablenet.health.interval": f"{settings.health_interval:g}s",
    }
    if fixed is None:
        labels |= {
            "stablenet.replicas.min": "0",
            "stablenet.replicas.max": str(settings.max),
            "stablenet.scale.target": f"{settings.target:g}",
            "stablenet.scale.window": f"{settings.window:g}s",
            "stablenet.scale.down_window": f"{settings.down_window:g}s",
            "stablenet.scale.idle": f"{settings.idle:g}s",
        }
    phases = list(settings.phases)
    if fixed is None:
        phases += oscillation(settings.low, settings.oscillate, settings.half)
    daemon = Daemon(docker_host)
    try:
        await daemon.start()
        for i in range(fixed or 1):
            await asyncio.to_thread(
                start_replica, client, image, f"{service}-r{i}", labels, backend
            )
        await wait_ready(daemon, service, fixed or 1, 60)
        host = f"{service}.{ZONE}"
        outcomes: list[Outcome] = []
        samples: list[Sample] = []
        done = asyncio.Event()
        t0 = time.monotonic()
        wall0 = time.time()
        async with asyncio.TaskGroup() as tasks:
            sampler = tasks.create_task(sample(daemon, service, t0, settings.sample, done, samples))
            try:
                spans = await drive(daemon.url, host, phases, t0, outcomes)
            finally:
                done.set()
            await sampler
        events = [
            {"t": round(e["at"] - wall0, 3), "kind": e["kind"], "endpoint": e["endpoint"],
             "message": e["message"]}
            for e in await daemon.events(service)
        ]  # fmt: skip
        daemon.check()
    finally:
        daemon.close()
        await asyncio.to_thread(cleanup, client, service)
    return summarize(label, settings, spans, outcomes, samples, events)


# ---------------------------------------------------------------- figures


def summarize(
    label: str,
    settings: Settings,
    spans: list[tuple[str, float, float, float]],
    outcomes: list[Outcome],
    samples: list[Sample],
    events: list[dict[str, Any]],
) -> dict[str, Any]:
    phases = []
    for index, (name, start, end, rate) in enumerate(spans):
        mine = [o for o in outcomes if start <= o.due < end]
        ok = [o.latency * 1000 for o in mine if o.ok]
        during = [s for s in samples if start <= s.t < end]
        phases.append(
            {
                "index": index,
                "phase": name,
                "start_s": round(start, 3),
                "end_s": round(end, 3),
                "rate": rate,
                "requests": len(mine),
                "failed": len(mine) - len(ok),
                "errors": sorted({o.error for o in mine if not o.ok})[:5],
                "p50_ms": round(percentile(ok, 50), 1),
                "p99_ms": round(percentile(ok, 99), 1),
                "max_ms": round(max(ok, default=0.0), 1),
                "ready_min": min((s.ready for s in during), default=None),
                "ready_max": max((s.ready for s in during), default=None),
                "ready_end": during[-1].ready if during else None,
                "settled_after_s": settled(during, start),
            }
        )
    profile_end = sum(p.seconds for p in settings.phases)
    scale_events = [e for e in events if e["message"].startswith("scale ")]
    return {
        "run": label,
        "phases": phases,
        "requests": len(outcomes),
        "failed": sum(1 for o in outcomes if not o.ok),
        "replica_seconds": round(replica_seconds(samples, 0.0, profile_end), 1),
        "cold_start": cold_start(phases, outcomes, events),
        "oscillation": oscillating(phases, scale_events, settings),
        "samples": [asdict(s) for s in samples],
        "events": events,
    }


def settled(during: list[Sample], start: float) -> float | None:
    """Seconds from the phase's start until ready replicas reached the count they held to the
    phase's end (None without samples)."""
    if not during:
        return None
    final = during[-1].ready
    at = during[-1].t
    for s in reversed(during):
        if s.ready != final:
            break
        at = s.t
    return round(max(0.0, at - start), 2)


def replica_seconds(samples: list[Sample], start: float, end: float) -> float:
    """Running containers (ready or starting) integrated over time."""
    inside = [s for s in samples if start <= s.t <= end]
    return sum(a.running * (b.t - a.t) for a, b in zip(inside, inside[1:], strict=False))


def cold_start(
    phases: list[dict[str, Any]], outcomes: list[Outcome], events: list[dict[str, Any]]
) -> dict[str, Any] | None:
    single = next((p for p in phases if p["phase"] == "one request"), None)
    if single is None:
        return None
    request = next((o for o in outcomes if o.phase == "one request"), None)
    if request is None:
        return None
    before = next((p for p in phases if p["index"] == single["index"] - 1), None)
    after = [e for e in events if e["t"] >= request.due - 0.5]
    return {
        "from_zero": before is not None and before["ready_end"] == 0,
        "latency_ms": round(request.latency * 1000, 1),
        "ok": request.ok,
        "events": [f"+{(e['t'] - request.due) * 1000:.0f} ms {e['message']}" for e in after[:4]],
    }


def oscillating(
    phases: list[dict[str, Any]], scale_events: list[dict[str, Any]], settings: Settings
) -> dict[str, Any] | None:
    osc = [p for p in phases if p["phase"].startswith("oscillate")]
    if not osc:
        return None
    start, end = osc[0]["start_s"], osc[-1]["end_s"]
    inside = [e for e in scale_events if start <= e["t"] < end]
    downs = [e for e in inside if _direction(e["message"]) < 0]
    ups = [e for e in inside if _direction(e["message"]) > 0]
    span = end - start
    return {
        "seconds": span,
        "half_period_s": settings.half,
        "scale_ups": len(ups),
        "scale_downs": len(downs),
        # down_window stands for the default 5 minutes: the same count per down window.
        "scale_downs_per_down_window": round(len(downs) * settings.down_window / span, 2),
        "events": [f"{e['t']:.1f}s {e['message']}" for e in inside],
    }


def _direction(message: str) -> int:
    """+1 for "scale 1 -> 3: ...", -1 for "scale 3 -> 2: ..."."""
    counts = message.split(":", 1)[0].removeprefix("scale ").split(" -> ")
    try:
        return (int(counts[1]) > int(counts[0])) - (int(counts[1]) < int(counts[0]))
    except (IndexError, ValueError):
        return 0


# ---------------------------------------------------------------- tables and the plot


def markdown(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(out)


def phase_table(results: list[dict[str, Any]]) -> str:
    rows = [["phase", "load req/s"]]
    for r in results:
        rows[0] += [f"{r['run']}: ready (settled after)", f"{r['run']}: p50 / p99 ms", "failed"]
    for i, phase in enumerate(results[0]["phases"]):
        if phase["phase"].startswith("oscillate"):
            continue
        row = [
            phase["phase"],
            f"{phase['rate']:g}" if phase["phase"] != "one request" else "1 request",
        ]
        for r in results:
            p = r["phases"][i]
            span = (
                f"{p['ready_min']}-{p['ready_max']}"
                if p["ready_min"] != p["ready_max"]
                else str(p["ready_min"])
            )
            row += [
                f"{span}, ends {p['ready_end']} ({p['settled_after_s']} s)",
                f"{p['p50_ms']} / {p['p99_ms']}" if p["requests"] else "-",
                f"{p['failed']} of {p['requests']}",
            ]
        rows.append(row)
    return markdown(rows)


def summary_table(results: list[dict[str, Any]], readiness: dict[str, Any]) -> str:
    rows = [["run", "requests", "failed", "p99 ms under 4x", "replica-seconds", "cold start ms"]]
    for r in results:
        high = next(p for p in r["phases"] if p["phase"] == "4x")
        cold = r["cold_start"]
        rows.append(
            [
                r["run"],
                str(r["requests"]),
                str(r["failed"]),
                str(high["p99_ms"]),
                str(r["replica_seconds"]),
                f"{cold['latency_ms']}" + ("" if cold["from_zero"] else " (not from zero)")
                if cold
                else "-",
            ]
        )
    return markdown(rows) + (
        f"\n\nThe backend container's own start-to-ready (docker start of a stopped one until "
        f"/healthz answers): median {readiness['start_to_ready_median_s'] * 1000:.0f} ms of "
        f"{readiness['start_to_ready_s']}; a fresh docker run: {readiness['run_to_ready_s']} s."
    )


def timeline_table(results: list[dict[str, Any]], step: float) -> str:
    rows = [["t s", "phase", "load req/s"] + [f"{r['run']}: ready" for r in results]]
    end = max(s["t"] for r in results for s in r["samples"])
    t = 0.0
    while t <= end:
        phase = next((p for p in results[0]["phases"] if p["start_s"] <= t < p["end_s"]), None)
        row = [f"{t:g}", phase["phase"] if phase else "", f"{phase['rate']:g}" if phase else ""]
        for r in results:
            at = [s for s in r["samples"] if s["t"] <= t]
            row.append(str(at[-1]["ready"]) if at and r["samples"][-1]["t"] >= t else "")
        rows.append(row)
        t += step
    return markdown(rows)


COLOURS = ("#1f77b4", "#d62728", "#7f7f7f", "#2ca02c", "#9467bd")


def svg(results: list[dict[str, Any]], note: str) -> str:
    """Ready replicas over time per run (steps), the offered load (grey area), phase edges."""
    width, height, left, right, top, bottom = 960, 440, 56, 64, 48, 64
    end = float(max(s["t"] for r in results for s in r["samples"]))
    top_count = max(max((s["ready"] for s in r["samples"]), default=1) for r in results) + 1
    top_rate = float(max(p["rate"] for p in results[0]["phases"])) * 1.25
    px = (width - left - right) / end
    py = (height - top - bottom) / top_count

    def x(t: float) -> float:
        return left + t * px

    def y(count: float) -> float:
        return height - bottom - count * py

    def y_rate(rate: float) -> float:
        return height - bottom - rate / top_rate * (height - top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    load = [f"{x(0):.1f},{y_rate(0):.1f}"]
    for p in results[0]["phases"]:
        rate = 0 if p["phase"] == "one request" else p["rate"]
        load += [
            f"{x(p['start_s']):.1f},{y_rate(rate):.1f}",
            f"{x(p['end_s']):.1f},{y_rate(rate):.1f}",
        ]
    load.append(f"{x(results[0]['phases'][-1]['end_s']):.1f},{y_rate(0):.1f}")
    parts.append(f'<polygon points="{" ".join(load)}" fill="#eeeeee" stroke="none"/>')
    for count in range(top_count + 1):
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y(count):.1f}" y2="{y(count):.1f}" '
            f'stroke="#dddddd"/><text x="{left - 8}" y="{y(count) + 4:.1f}" '
            f'text-anchor="end">{count}</text>'
        )
    for rate in range(0, int(top_rate) + 1, 50):
        parts.append(
            f'<text x="{width - right + 8}" y="{y_rate(rate) + 4:.1f}" fill="#999999">{rate}</text>'
        )
    shown = set()
    for p in results[0]["phases"]:
        name = "oscillate" if p["phase"].startswith("oscillate") else p["phase"]
        if name in shown and name == "oscillate":
            continue
        shown.add(name)
        parts.append(
            f'<line x1="{x(p["start_s"]):.1f}" x2="{x(p["start_s"]):.1f}" y1="{top}" '
            f'y2="{height - bottom}" stroke="#bbbbbb" stroke-dasharray="3,3"/>'
            f'<text x="{x(p["start_s"]) + 3:.1f}" y="{top - 8 - 10 * (len(shown) % 2 == 0)}">'
            f"{name}</text>"
        )
    for t in range(0, int(end) + 1, 30):
        parts.append(
            f'<text x="{x(t):.1f}" y="{height - bottom + 16}" text-anchor="middle">{t}</text>'
        )
    parts.append(
        f'<text x="{left + (width - left - right) / 2}" y="{height - bottom + 32}" '
        f'text-anchor="middle">seconds (grey area: offered load, req/s, right axis)</text>'
        f'<text x="14" y="{top + (height - top - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + (height - top - bottom) / 2})">ready replicas</text>'
    )
    for i, r in enumerate(results):
        points = []
        last = None
        for s in r["samples"]:
            if last is not None:
                points.append(f"{x(s['t']):.1f},{y(last):.1f}")
            points.append(f"{x(s['t']):.1f},{y(s['ready']):.1f}")
            last = s["ready"]
        colour = COLOURS[i % len(COLOURS)]
        dash = "" if i == 0 else ' stroke-dasharray="6,3"'
        parts.append(
            f'<polyline points="{" ".join(points)}" fill="none" stroke="{colour}" '
            f'stroke-width="{2 if i == 0 else 1.5}"{dash}/>'
        )
        parts.append(
            f'<text x="{left + 10 + 150 * i}" y="{height - 12}" fill="{colour}">— {r["run"]}</text>'
        )
    parts.append(f'<text x="{width - right}" y="12" text-anchor="end" fill="#666666">{note}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def engine(kind: str) -> Iterator[tuple[docker.DockerClient, str]]:
    if kind == "env":
        client = docker.from_env(version="auto", timeout=120)
        try:
            client.ping()
            yield client, os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        finally:
            client.close()
        return
    with tempfile.TemporaryDirectory(prefix="autoscale-engine-") as root:
        with private_engine(Path(root) / "engine") as private:
            client = docker.DockerClient(base_url=private.host, version="auto", timeout=120)
            try:
                yield client, private.host
            finally:
                client.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--fixed", default="2,3", help="fixed replica counts to run beside")
    parser.add_argument("--cap", type=int, default=4, help="requests a replica serves at once")
    parser.add_argument("--work-ms", type=float, default=50.0)
    parser.add_argument("--low", type=float, default=35.0, help="req/s of the low phases")
    parser.add_argument("--target", type=float, default=3.0, help="stablenet.scale.target")
    parser.add_argument("--max", type=int, default=6, help="stablenet.replicas.max")
    parser.add_argument("--window", type=float, default=10.0, help="stablenet.scale.window, s")
    parser.add_argument("--down-window", type=float, default=30.0)
    parser.add_argument("--idle", type=float, default=20.0, help="stablenet.scale.idle, s")
    parser.add_argument("--seconds", default="20,30,60,35,6", help="low,4x,low,idle,one")
    parser.add_argument("--oscillate", type=float, default=96.0, help="seconds (0: none)")
    parser.add_argument("--half", type=float, default=12.0, help="oscillation half-period, s")
    parser.add_argument("--sample", type=float, default=0.25, help="seconds between samples")
    parser.add_argument("--readiness-samples", type=int, default=5)
    parser.add_argument("--engine", choices=("private", "env"), default="private")
    parser.add_argument("--note", default="", help="said under the plot (e.g. the machine)")
    args = parser.parse_args()
    durations = [float(v) for v in args.seconds.split(",")]
    if len(durations) != 5:
        parser.error("--seconds: five durations: low,4x,low,idle,one")
    fixed = [int(v) for v in args.fixed.split(",") if v.strip()]
    settings = Settings(
        cap=args.cap,
        work_ms=args.work_ms,
        low=args.low,
        target=args.target,
        max=args.max,
        window=args.window,
        down_window=args.down_window,
        idle=args.idle,
        phases=profile(
            args.low, dict(zip(("low", "high", "low2", "idle", "one"), durations, strict=True))
        ),
        oscillate=args.oscillate,
        half=args.half,
        sample=args.sample,
    )
    prefix = f"as{uuid.uuid4().hex[:6]}"
    load_before = os.getloadavg()
    backend = Backend(args.cap, args.work_ms)
    results = []
    try:
        with engine(args.engine) as (client, host):
            image = await asyncio.to_thread(ensure_image, client)
            readiness = await asyncio.to_thread(
                container_ready_times, client, image, backend, prefix, args.readiness_samples
            )
            print(json.dumps({"container": readiness}), flush=True)
            for count in [None, *fixed]:
                result = await run(client, host, image, backend, prefix, settings, count)
                results.append(result)
                brief = {k: v for k, v in result.items() if k not in ("samples", "events")}
                print(json.dumps(brief), flush=True)
    finally:
        backend.close()
    print(phase_table(results))
    print()
    print(summary_table(results, readiness))
    print()
    print(timeline_table(results, 10.0))
    RESULTS.mkdir(exist_ok=True)
    loadavg = os.getloadavg()
    note = args.note or (
        f"{os.cpu_count()} cores shared with other work; load average {load_before[0]:.1f} "
        f"at the start, {loadavg[0]:.1f} at the end"
    )
    (RESULTS / "autoscale.svg").write_text(svg(results, note))
    out = {
        "settings": asdict(settings),
        "container": readiness,
        "loadavg_start": load_before,
        "loadavg_end": loadavg,
        "runs": results,
    }
    (RESULTS / "autoscale.json").write_text(json.dumps(out, indent=2))
    print(f"\nwrote {RESULTS / 'autoscale.json'} and {RESULTS / 'autoscale.svg'}")


if __name__ == "__main__":
    asyncio.run(main())
