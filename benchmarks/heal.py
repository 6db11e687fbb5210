"""Healing: how long a labelled service takes to be back at its count after a replica fails,
and how many requests through the proxy fail meanwhile; beside Docker's own
`--restart on-failure` for the one failure it handles, and a crash loop's attempts.

    .venv/bin/python -m benchmarks.heal --rounds 5
    .venv/bin/python -m benchmarks.heal --rounds 3 --kinds exit,docker-restart --crash-window 0

Every round starts a fresh service labelled `stablenet.replicas=2` (one container; the
controller creates the second), waits until both replicas are ready, puts --concurrency clients
on it (GET /cgi-bin/whoami through the proxy's virtual address: idempotent, so none may fail),
makes one replica fail, and waits until the service is back at 2 ready replicas and the failed
container is gone. A fresh service per round means every round is a first failure under the
controller's real backoff (the backoff and the breaker have their own row: the crash loop).
Failure kinds:

* `exit`: the replica's main process is SIGKILLed from the host (os.kill of State.Pid): Docker
  reports only `die`, no `kill`, and no restart policy brings it back.
* `health`: the file its check reads (`stablenet.health.path=/healthz`) is removed with an
  exec: it keeps running and serving, but fails its check; the controller replaces it once it
  has been unhealthy for `controller.unhealthy_grace` (--unhealthy-grace).
* `removed`: the replicas run with AutoRemove; the process is SIGKILLed from the host, so
  Docker reports `die` and then `destroy`: the service is below its count with nothing to heal.
* `docker-restart`: the same SIGKILL, on two unlabelled containers run with
  `--restart on-failure`: Docker restarts the failed one in place; the controller is not
  involved.

The victim alternates between the service's first container and the other one. Times come from
the engine's own events (`timeNano`: create, start, destroy) and stablenet's event log
(`/v1/events`: the registry's state changes, with the snapshot's time), against the moment the
benchmark sent the failure; `controller.ready` in `/v1/services` is polled every 50 ms as well.
The container's own start time, for the goal (back at count within it + 2 s), is `docker run`
of the round's first container (create and start through the Engine API) to its first ready.

Crash loop (--crash-window S, beside the rounds): a service with `stablenet.replicas=1` whose
command exits at once, under the controller's default backoff (10 s doubling) and breaker (3):
every attempt (a replica stablenet creates) within S seconds of the first failure, and whether
the breaker tripped (`controller.degraded`).

The engine: by default (--engine private) a dockerd of the benchmark's own (own data root, exec
root, socket and bridge; no iptables rules), so no other stablenet acting on a shared engine
can touch these services, and this one's controller touches nothing else. --engine shared uses
DOCKER_HOST as it is; other labelled services there are then acted on too.

Traffic goes only to loopback, to the virtual address stablenet adds on lo, and to containers
started here. Every wait is bounded; every container is removed at the end (replicas the
controller created included: they carry the benchmark's label), processes are stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import docker
import docker.errors

from benchmarks.admin import follow_events
from benchmarks.processes import stop as stop_process
from tests.helpers import HTTPD, ensure_image, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
ZONE = "stablenet.internal"
KINDS = ("exit", "health", "removed", "docker-restart")
MARK = "stablenet-bench.heal"  # label on every container started here, copied to replicas
HEALTH = {
    "stablenet.port": "80",
    "stablenet.health.path": "/healthz",
    "stablenet.health.interval": "500ms",
    "stablenet.health.timeout": "500ms",
    "stablenet.health.fall": "2",
}
CRASH = ["sh", "-c", "exit 3"]
REQUEST_TIMEOUT = 15.0
POLL = 0.05
ROUND_LIMIT = 90.0  # seconds a round may take before it is reported as not healed


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def top(values: list[float]) -> float | None:
    return round(max(values), 3) if values else None


# ---------------------------------------------------------------- the engine


class PrivateEngine:
    """A dockerd of the benchmark's own. Its default bridge is a bridge made here for it: with
    `--bridge=none` dockerd deletes the host's docker0, which another engine may be using. No
    iptables rules (`--iptables=false`): traffic is between the host and its containers only."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="heal-engine-"))
        self.bridge = f"snh{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.made_bridge = False

    @property
    def host(self) -> str:
        return f"unix://{self.dir}/docker.sock"

    def _free_subnet(self) -> ipaddress.IPv4Network:
        """A /24 in 10.231.0.0/16 that no route or address on this machine overlaps."""
        out = subprocess.run(
            ["ip", "-4", "route", "show", "table", "all"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        taken = []
        for line in out.splitlines():
            word = line.split()[0] if line.split() else ""
            if word in ("local", "broadcast", "unreachable", "prohibit", "blackhole"):
                word = line.split()[1]
            with contextlib.suppress(ValueError):
                taken.append(ipaddress.IPv4Network(word, strict=False))
        choices = list(range(1, 255))
        random.shuffle(choices)
        for third in choices:
            net = ipaddress.IPv4Network(f"10.231.{third}.0/24")
            if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
                return net
        raise RuntimeError("no free /24 in 10.231.0.0/16 for the private engine's bridge")

    def start(self) -> None:
        subnet = self._free_subnet()
        gateway = f"{next(subnet.hosts())}/{subnet.prefixlen}"
        subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True)
        self.made_bridge = True
        subprocess.run(["ip", "addr", "add", gateway, "dev", self.bridge], check=True)
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True)
        (self.dir / "data").mkdir()
        (self.dir / "exec").mkdir()
        log = (self.dir / "dockerd.log").open("wb")
        self.proc = subprocess.Popen(
            [
                "dockerd",
                "--data-root", str(self.dir / "data"),
                "--exec-root", str(self.dir / "exec"),
                "--pidfile", str(self.dir / "dockerd.pid"),
                "-H", self.host,
                "--bridge", self.bridge,
                "--iptables=false",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                client = docker.APIClient(base_url=self.host, version="auto", timeout=5)
                client.ping()
                client.close()
                return
            except (docker.errors.DockerException, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"private dockerd did not answer; see {self.dir}/dockerd.log"
                    ) from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=30)
            self.proc = None
        if self.made_bridge:
            subprocess.run(["ip", "link", "del", self.bridge], check=False)
            self.made_bridge = False
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- what the engine reports


@dataclass(frozen=True, slots=True)
class DockerEvent:
    at: float  # the engine's timeNano, in seconds
    action: str
    id: str
    name: str
    service: str
    managed: bool


class EngineEvents:
    """The engine's container events for the benchmark's containers, read in a thread."""

    def __init__(self, client: docker.DockerClient, prefix: str) -> None:
        self.items: list[DockerEvent] = []
        self._lock = threading.Condition()
        self._stream = client.api.events(
            decode=True, filters={"type": ["container"], "label": [f"{MARK}={prefix}"]}
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):
            for event in self._stream:
                attrs = event["Actor"].get("Attributes", {})
                item = DockerEvent(
                    event["timeNano"] / 1e9,
                    str(event.get("Action", "")).split(":", 1)[0],
                    event["Actor"]["ID"],
                    attrs.get("name", ""),
                    attrs.get("stablenet.service", ""),
                    attrs.get("stablenet.managed") == "true",
                )
                with self._lock:
                    self.items.append(item)
                    self._lock.notify_all()

    def of(self, service: str) -> list[DockerEvent]:
        with self._lock:
            return [e for e in self.items if e.service == service]

    def wait_for(self, service: str, action: str, within: float) -> DockerEvent:
        """The service's first ``action`` event, once the engine has reported it."""

        def found() -> DockerEvent | None:
            return next(
                (e for e in self.items if e.service == service and e.action == action), None
            )

        with self._lock:
            if not self._lock.wait_for(lambda: found() is not None, within):
                raise TimeoutError(f"no {action} event for {service} within {within}s")
            event = found()
        assert event is not None
        return event

    def close(self) -> None:
        self._stream.close()


# ---------------------------------------------------------------- stablenet


class Stablenet:
    """`stablenet run` as a subprocess: proxy on a virtual address it adds on lo, admin API
    and DNS on loopback, the controller's state in a directory of this run."""

    def __init__(self, docker_host: str, grace: float, work: Path) -> None:
        self.admin_port = free_port()
        self.vip = f"169.254.100.{random.randrange(100, 250)}"
        self.docker_host = docker_host
        self.grace = grace
        self.state_dir = work / "state"
        self.log_path = work / "stablenet.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.events: list[dict[str, Any]] = []

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def start(self) -> None:
        env = {
            **os.environ,
            "DOCKER_HOST": self.docker_host,
            "STABLENET_ADMIN_LISTEN": f"127.0.0.1:{self.admin_port}",
            "STABLENET_DNS_LISTEN": f"127.0.0.1:{free_port()}",
            "STABLENET_PROXY_LISTEN": f"{self.vip}:80",
            "STABLENET_CONTROLLER_STATE_DIR": str(self.state_dir),
            "STABLENET_CONTROLLER_UNHEALTHY_GRACE": f"{self.grace:g}s",
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-m", "stablenet", "run"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        async with aiohttp.ClientSession() as http, asyncio.timeout(60):
            while True:
                self.check_alive()
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{self.admin}/readyz") as r:
                        if r.status == 200 and await self._vip_is_local():
                            return
                await asyncio.sleep(0.1)

    async def _vip_is_local(self) -> bool:
        """Nothing is sent to the virtual address before the kernel routes it to lo."""
        out = await asyncio.to_thread(
            subprocess.run, ["ip", "route", "get", self.vip], capture_output=True, text=True
        )
        return out.stdout.startswith("local ")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"stablenet exited; log: {self.log_path}")

    async def service(self, http: aiohttp.ClientSession, name: str) -> dict[str, Any] | None:
        try:
            async with http.get(f"{self.admin}/v1/services/{name}") as r:
                return dict(await r.json()) if r.status == 200 else None
        except aiohttp.ClientError:
            return None

    async def all_services(self, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        async with http.get(f"{self.admin}/v1/services") as r:
            return list((await r.json())["services"])

    async def follow(self, stop: asyncio.Event) -> None:
        """Keep the admin API's recent events until ``stop``."""
        await follow_events(self.admin, self.events, stop)

    def of(self, service: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["service"] == service]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=30)
            self.proc = None


def ready_sets(events: list[dict[str, Any]]) -> list[tuple[float, frozenset[str]]]:
    """Replaying a service's registry events: after each, the names of its ready endpoints."""
    state: dict[str, str] = {}
    out = []
    for e in events:
        name, kind, message = e["endpoint"], e["kind"], e["message"]
        if kind == "added":
            state[name] = message.rsplit(", ", 1)[-1]
        elif kind == "state":
            state[name] = message.partition(" -> ")[2].partition(" ")[0]
        elif kind == "removed":
            state.pop(name, None)
        else:
            continue
        out.append((float(e["at"]), frozenset(n for n, s in state.items() if s == "ready")))
    return out


def became(events: list[dict[str, Any]], name: str, state: str, after: float) -> float | None:
    """When endpoint ``name`` first entered ``state`` after ``after`` (registry time)."""
    for e in events:
        if e["endpoint"] != name or float(e["at"]) < after:
            continue
        if e["kind"] == "added" and e["message"].endswith(", " + state):
            return float(e["at"])
        if e["kind"] == "state" and e["message"].partition(" -> ")[2].startswith(state + " "):
            return float(e["at"])
    return None


# ---------------------------------------------------------------- load


@dataclass(slots=True)
class Load:
    """--concurrency clients sending GET /cgi-bin/whoami to one service through the proxy."""

    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        return self.ok + sum(self.failed.values())

    async def run(self, vip: str, service: str, clients: int, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        connector = aiohttp.TCPConnector(limit=clients)
        url = f"http://{vip}/cgi-bin/whoami"
        headers = {"Host": f"{service}.{ZONE}"}
        deadline = time.monotonic() + 2 * ROUND_LIMIT  # bounded even if stop is never set

        async def client(http: aiohttp.ClientSession) -> None:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    async with http.get(url, headers=headers) as resp:
                        await resp.read()
                        if 200 <= resp.status < 300:
                            self.ok += 1
                        else:
                            self.failed[str(resp.status)] += 1
                except TimeoutError:
                    self.failed["timeout"] += 1
                except (aiohttp.ClientError, OSError):
                    self.failed["connection"] += 1

        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            async with asyncio.TaskGroup() as tasks:
                for _ in range(clients):
                    tasks.create_task(client(http))


# ---------------------------------------------------------------- rounds


@dataclass(slots=True)
class Bench:
    client: docker.DockerClient
    image: str
    prefix: str
    daemon: Stablenet
    engine_events: EngineEvents
    concurrency: int
    grace: float

    def run_container(self, name: str, labels: dict[str, str], **kwargs: Any) -> Any:
        box = self.client.containers.run(
            self.image,
            kwargs.pop("command", HTTPD),
            name=name,
            labels={MARK: self.prefix, **labels},
            detach=True,
            init=True,  # an init as PID 1 passes SIGTERM on: a stop takes no stop timeout
            **kwargs,
        )
        box.reload()
        return box

    def remove_service(self, service: str) -> None:
        for box in self.client.containers.list(
            all=True, filters={"label": f"stablenet.service={service}"}
        ):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                box.remove(force=True)

    async def at_count(
        self, http: aiohttp.ClientSession, service: str, managed: bool, count: int = 2
    ) -> dict[str, Any]:
        """Until the service has ``count`` ready endpoints (and, managed, the controller agrees
        and has nothing in flight)."""
        async with asyncio.timeout(60):
            while True:
                self.daemon.check_alive()
                body = await self.daemon.service(http, service)
                if body is not None:
                    ready = [e for e in body["endpoints"] if e["state"] == "ready"]
                    ctl = body.get("controller") or {}
                    if len(ready) == count and (
                        not managed or (ctl.get("ready") == count and ctl.get("in_flight") == 0)
                    ):
                        return body
                await asyncio.sleep(POLL)

    async def one_round(self, kind: str, index: int) -> dict[str, Any]:
        service = f"{self.prefix}-{kind.replace('-', '')}-{index}"
        managed = kind != "docker-restart"
        labels = {"stablenet.service": service, **HEALTH}
        boxes = []
        run_at = time.time()  # the first container's own start: `docker run` -> ready
        if managed:
            labels["stablenet.replicas"] = "2"
            boxes.append(
                await asyncio.to_thread(
                    self.run_container, f"{service}-t", labels, auto_remove=kind == "removed"
                )
            )
        else:
            for n in (1, 2):
                boxes.append(
                    await asyncio.to_thread(
                        self.run_container,
                        f"{service}-{n}",
                        labels,
                        restart_policy={"Name": "on-failure"},
                    )
                )
        async with aiohttp.ClientSession() as http:
            body = await self.at_count(http, service, managed)
            names = sorted(e["name"] for e in body["endpoints"])
            first = boxes[0].name
            victim_name = first if index % 2 == 0 else next(n for n in names if n != first)
            victim = await asyncio.to_thread(self.client.containers.get, victim_name)
            load = Load()
            stop = asyncio.Event()
            polls: list[tuple[float, int | None, frozenset[str]]] = []
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(load.run(self.daemon.vip, service, self.concurrency, stop))
                try:
                    await asyncio.sleep(1.0)  # steady load before the failure
                    failed_at = await self.fail(kind, victim)
                    healed = await self.watch(http, service, victim, managed, failed_at, polls)
                    await asyncio.sleep(0.5)  # and a little after
                finally:
                    stop.set()
        result = self.measure(kind, index, service, victim, first, failed_at, polls, managed)
        first_ready = became(self.daemon.of(service), first, "ready", run_at)
        own = round(first_ready - run_at, 3) if first_ready is not None else None
        total, waited = result["back_at_count_s"], result.pop("waited_s")
        result["own_run_to_ready_s"] = own
        result["beyond_own_start_s"] = (
            round(total - waited - own, 3) if total is not None and own is not None else None
        )
        result |= {"healed": healed, "requests": load.requests, "failed": dict(load.failed)}
        await asyncio.to_thread(self.remove_service, service)
        return result

    async def fail(self, kind: str, victim: Any) -> float:
        """Make the victim fail as ``kind`` says; when it was sent (unix time)."""
        await asyncio.to_thread(victim.reload)
        if kind == "health":
            at = time.time()
            await asyncio.to_thread(victim.exec_run, ["rm", "/www/healthz"])
            return at
        pid = int(victim.attrs["State"]["Pid"])
        at = time.time()
        os.kill(pid, signal.SIGKILL)  # from the host: Docker sees only `die`
        return at

    async def watch(
        self,
        http: aiohttp.ClientSession,
        service: str,
        victim: Any,
        managed: bool,
        failed_at: float,
        polls: list[tuple[float, int | None, frozenset[str]]],
    ) -> bool:
        """Poll /v1/services/{service} until it is back at 2 ready replicas (the victim not
        among them, unless Docker restarted it in place, after it went out) and, managed, the
        victim is gone and nothing is in flight. False if that takes over ROUND_LIMIT."""
        went_out = False
        deadline = failed_at + ROUND_LIMIT
        while time.time() < deadline:
            self.daemon.check_alive()
            body = await self.daemon.service(http, service)
            now = time.time()
            if body is not None:
                ctl = body.get("controller") or {}
                ready = frozenset(e["id"] for e in body["endpoints"] if e["state"] == "ready")
                polls.append((now, ctl.get("ready"), ready))
                went_out = went_out or victim.id not in ready
                if managed:
                    gone = any(
                        e.action == "destroy" and e.id == victim.id
                        for e in self.engine_events.of(service)
                    )
                    if (
                        len(ready - {victim.id}) >= 2
                        and ctl.get("ready") == 2
                        and ctl.get("in_flight") == 0
                        and gone
                    ):
                        return True
                elif went_out and len(ready) >= 2:
                    return True
            await asyncio.sleep(POLL)
        return False

    def measure(
        self,
        kind: str,
        index: int,
        service: str,
        victim: Any,
        first: str,
        failed_at: float,
        polls: list[tuple[float, int | None, frozenset[str]]],
        managed: bool,
    ) -> dict[str, Any]:
        engine = self.engine_events.of(service)
        registry = self.daemon.of(service)
        after = [e for e in engine if e.at >= failed_at]
        if managed:
            new = next((e for e in after if e.action == "create" and e.managed), None)
            replacement = new.name if new is not None else None
            new_id = new.id if new is not None else None
        else:
            new = None
            replacement, new_id = victim.name, victim.id
        started = next((e.at for e in after if e.action == "start" and e.id == new_id), None)
        ready = became(registry, replacement, "ready", failed_at) if replacement else None
        # Back at count in the registry: 2 ready endpoints, the victim not one of them (or, in
        # place, the victim ready again after it went out).
        back = None
        out = False
        # The registry's events name endpoints: a replica may take the name of the victim once
        # the victim has left the registry (removed containers free their names).
        left = next(
            (float(e["at"]) for e in registry
             if e["endpoint"] == victim.name and e["kind"] == "removed"
             and float(e["at"]) >= failed_at),
            None,
        )  # fmt: skip
        for at, names in ready_sets(registry):
            if at < failed_at:
                continue
            out = out or victim.name not in names
            old_one = {victim.name} if managed and (left is None or at < left) else set()
            healthy = names - old_one
            if out and len(healthy) >= 2:
                back = at
                break
        # The same, as the admin API showed it (polled).
        polled = None
        seen_out = False
        for at, ctl_ready, ids in polls:
            seen_out = seen_out or victim.id not in ids
            healthy = ids if not managed else ids - {victim.id}
            if seen_out and len(healthy) >= 2 and (not managed or ctl_ready == 2):
                polled = at
                break
        detected = (
            became(registry, victim.name, "unhealthy", failed_at)
            if kind == "health"
            else next(
                (float(e["at"]) for e in registry
                 if e["endpoint"] == victim.name and e["kind"] == "removed"
                 and float(e["at"]) >= failed_at),
                None,
            )
        )  # fmt: skip
        removed = next((e.at for e in after if e.action == "destroy" and e.id == victim.id), None)

        def since(at: float | None, origin: float | None = failed_at) -> float | None:
            return None if at is None or origin is None else round(at - origin, 3)

        waited = (since(detected) or 0.0) + self.grace if kind == "health" else 0.0
        return {
            "kind": kind,
            "round": index,
            "service": service,
            "victim": victim.name,
            "victim_is_first": victim.name == first,
            "replacement": replacement,
            "detected_s": since(detected),
            "replacement_created_s": since(new.at) if new is not None else None,
            "replacement_started_s": since(started),
            "replacement_ready_s": since(ready),
            "back_at_count_s": since(back),
            "back_at_count_polled_s": since(polled),
            "replacement_start_to_ready_s": since(ready, started),
            "waited_s": waited,  # health: detection and grace, before the controller may act
            "old_removed_s": since(removed),
        }

    async def crash_loop(self, window: float) -> dict[str, Any]:
        """A replicas=1 service whose command exits at once, watched for ``window`` seconds
        from its first failure: the controller's attempts and its breaker."""
        service = f"{self.prefix}-crash"
        await asyncio.to_thread(
            self.run_container,
            f"{service}-t",
            {"stablenet.service": service, "stablenet.replicas": "1"},
            command=CRASH,
        )
        first_die = (await asyncio.to_thread(self.engine_events.wait_for, service, "die", 30)).at
        await asyncio.sleep(max(0.0, first_die + window - time.time()))
        async with aiohttp.ClientSession() as http:
            body = await self.daemon.service(http, service) or {}
        ctl = body.get("controller") or {}
        events = self.engine_events.of(service)
        attempts = [
            round(e.at - first_die, 2)
            for e in events
            if e.action == "create" and e.managed and e.at <= first_die + window
        ]
        notes = [e for e in self.daemon.of(service) if e["kind"] == "controller"]
        tripped = next(
            (round(float(e["at"]) - first_die, 2) for e in notes
             if e["message"].startswith("degraded")),
            None,
        )  # fmt: skip
        kept = [(e.id, e.name) for e in events if e.action == "create"]
        gone = {e.id for e in events if e.action == "destroy"}
        await asyncio.to_thread(self.remove_service, service)
        return {
            "service": service,
            "command": CRASH,
            "window_s": window,
            "attempts": len(attempts),
            "attempt_times_s": attempts,
            "degraded": ctl.get("degraded"),
            "degraded_after_s": tripped,
            "next_retry_at": ctl.get("next_retry_at"),
            "containers_left": [name for cid, name in kept if cid not in gone],
            "controller_events": [e["message"] for e in notes],
        }


# ---------------------------------------------------------------- report


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def values(key: str) -> list[float]:
        return [r[key] for r in rounds if r.get(key) is not None]

    out: dict[str, Any] = {"rounds": len(rounds), "healed": sum(1 for r in rounds if r["healed"])}
    for key in (
        "detected_s",
        "replacement_created_s",
        "replacement_ready_s",
        "back_at_count_s",
        "back_at_count_polled_s",
        "replacement_start_to_ready_s",
        "own_run_to_ready_s",
        "beyond_own_start_s",
        "old_removed_s",
    ):
        out[key] = {"median": median(values(key)), "max": top(values(key))}
    out["within_goal"] = sum(1 for v in values("beyond_own_start_s") if v <= 2.0)
    out["requests"] = sum(r["requests"] for r in rounds)
    failed: Counter[str] = Counter()
    for r in rounds:
        failed.update(r["failed"])
    out["failed"] = dict(failed)
    return out


def table(result: dict[str, Any]) -> str:
    def pair(s: dict[str, Any], key: str) -> str:
        m = s[key]
        return "-" if m["median"] is None else f"{m['median']:.2f} / {m['max']:.2f}"

    head = (
        "failure",
        "healed by",
        "rounds healed",
        "detected",
        "replacement created",
        "back at 2 ready",
        "own `docker run` -> ready",
        "beyond own start (goal <= 2 s)",
        "failed one removed",
        "requests",
        "failed",
    )
    healer = {
        "exit": "controller (replace)",
        "health": f"controller (replace, grace {result['unhealthy_grace_s']:g} s)",
        "removed": "controller (new replica)",
        "docker-restart": "Docker (`--restart on-failure`, in place)",
    }
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, s in result["kinds"].items():
        failed = sum(s["failed"].values())
        lines.append(
            "| "
            + " | ".join(
                (
                    kind,
                    healer[kind],
                    f"{s['healed']} of {s['rounds']}",
                    pair(s, "detected_s"),
                    pair(s, "replacement_created_s"),
                    pair(s, "back_at_count_s"),
                    pair(s, "own_run_to_ready_s"),
                    pair(s, "beyond_own_start_s") + f" ({s['within_goal']} of {s['rounds']})",
                    pair(s, "old_removed_s"),
                    f"{s['requests']:,}",
                    f"**{failed}**" + (f" {s['failed']}" if failed else ""),
                )
            )
            + " |"
        )
    crash = result.get("crash_loop")
    if crash:
        lines += [
            "",
            "| crash loop | window | attempts (s after the first failure) | breaker |",
            "|---|---|---|---|",
            f"| replicas=1, `{' '.join(crash['command'])}` | {crash['window_s']:g} s | "
            f"{crash['attempts']} ({', '.join(f'{t:g}' for t in crash['attempt_times_s'])}) | "
            + (
                f"tripped after {crash['degraded_after_s']:g} s"
                if crash["degraded"]
                else "not tripped"
            )
            + " |",
        ]
    return "\n".join(lines)


async def run(args: argparse.Namespace, kinds: list[str]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="heal-bench-"))
    private = PrivateEngine() if args.engine == "private" else None
    prefix = f"hl{uuid.uuid4().hex[:6]}"
    daemon: Stablenet | None = None
    client: docker.DockerClient | None = None
    engine_events: EngineEvents | None = None
    try:
        if private is not None:
            await asyncio.to_thread(private.start)
            host = private.host
        else:
            host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        client = docker.DockerClient(base_url=host, version="auto", timeout=120)
        image = await asyncio.to_thread(ensure_image, client)
        engine_events = EngineEvents(client, prefix)
        daemon = Stablenet(host, args.unhealthy_grace, work)
        await daemon.start()
        bench = Bench(
            client, image, prefix, daemon, engine_events, args.concurrency, args.unhealthy_grace
        )
        stop = asyncio.Event()
        rounds: list[dict[str, Any]] = []
        crash: dict[str, Any] | None = None
        began = time.monotonic()
        load_before = os.getloadavg()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(daemon.follow(stop))
            crashing = (
                tasks.create_task(bench.crash_loop(args.crash_window))
                if args.crash_window > 0
                else None
            )
            try:
                for kind in kinds:
                    for index in range(args.rounds):
                        rounds.append(await bench.one_round(kind, index))
                        print(json.dumps(rounds[-1]), flush=True)
                if crashing is not None:
                    crash = await crashing
            finally:
                stop.set()
        async with aiohttp.ClientSession() as http:
            others = [
                s["name"]
                for s in await daemon.all_services(http)
                if s.get("controller") and not s["name"].startswith(prefix)
            ]
        return {
            "engine": args.engine,
            "docker_version": client.version().get("Version"),
            "unhealthy_grace_s": args.unhealthy_grace,
            "concurrency": args.concurrency,
            "seconds": round(time.monotonic() - began, 1),
            "load_average": {"before": load_before, "after": os.getloadavg()},
            "other_managed_services": others,
            "kinds": {k: summary([r for r in rounds if r["kind"] == k]) for k in kinds},
            "rounds": rounds,
            "crash_loop": crash,
        }
    finally:
        if daemon is not None:
            daemon.stop()  # first: its controller must not replace what is removed below
            RESULTS.mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copy(daemon.log_path, RESULTS / "heal-stablenet.log")
        if engine_events is not None:
            engine_events.close()
        if client is not None:
            for box in client.containers.list(all=True, filters={"label": f"{MARK}={prefix}"}):
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    box.remove(force=True)
            client.close()
        if private is not None:
            await asyncio.to_thread(private.stop)
        shutil.rmtree(work, ignore_errors=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="per failure kind")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--concurrency", type=int, default=8, help="load clients")
    parser.add_argument(
        "--unhealthy-grace", type=float, default=2.0, help="controller.unhealthy_grace, seconds"
    )
    parser.add_argument(
        "--crash-window",
        type=float,
        default=150.0,
        help="seconds to watch the crash loop after its first failure (0: no crash loop)",
    )
    parser.add_argument("--engine", choices=("private", "shared"), default="private")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    for kind in kinds:
        if kind not in KINDS:
            parser.error(f"--kinds: {kind!r} is not one of {', '.join(KINDS)}")
    result = await run(args, kinds)
    print(table(result))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "heal.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
