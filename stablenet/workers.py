"""Proxy workers (``proxy.workers`` > 1): N processes that each run a Proxy on the same
listening sockets, so the request path uses every core while the rest of stablenet stays one
process.

The main process binds (or inherits, on a seamless restart) the proxy's listening sockets as
usual and passes them to each worker by descriptor inheritance: one socket, one accept queue,
shared by all workers, so a restart of the whole set hands over exactly what a single process
hands over. Listeners declared by labels or virtual addresses are bound by each worker itself
with SO_REUSEPORT. The main process keeps the Docker source, health checks, DNS, the admin API
and the controller; it sends every registry version to the workers and merges what they report
back into its own (never started) Proxy's counters, so the metrics, the traffic sampler and the
controller read one picture without knowing about workers:

* main -> worker: the config and listener descriptors, then each registry version, the
  endpoints with failures on record (whose successes the health checker wants to hear), the
  virtual-address listeners, and ``stop``;
* worker -> main: ``ready`` once it accepts, passive health outcomes and holds as they happen
  (batched per loop turn), and every REPORT_INTERVAL its counters, histograms, requests in
  flight per endpoint and requests held per service.

A worker that exits is started again (``stablenet_proxy_worker_restarts``); its counters up to
its last report are kept. Messages are length-prefixed pickles over a UNIX socket pair."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from stablenet import logs
from stablenet.config import Config
from stablenet.errors import StartupError
from stablenet.health.checker import HealthChecker
from stablenet.histogram import Histogram
from stablenet.lifecycle import Server, run_on_uvloop
from stablenet.model import Endpoint
from stablenet.proxy import Proxy, vip
from stablenet.proxy.dispatch import Counters
from stablenet.proxy.server import DRAIN_GRACE, DynamicKey
from stablenet.registry import Registry, Snapshot
from stablenet.sockets import Key, bind

logger = logging.getLogger(__name__)

REPORT_INTERVAL = 0.25  # seconds between a worker's counter reports
READY_TIMEOUT = 10.0  # seconds a worker gets to start accepting
RESTART_PAUSE = 1.0  # a worker that dies sooner than this after its start is restarted this late
HEADER = struct.Struct("!I")
COUNTED = ("requests", "retries", "holds", "errors", "bad_requests", "slow_clients")

Message = tuple[Any, ...]
ENTRY = "import sys; from stablenet.workers import main; main(sys.argv[1:])"


def worker_count(configured: int) -> int:
    """``proxy.workers`` resolved: 0 ("auto") is one per CPU this process may run on."""
    if configured:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def encode(message: Message) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


async def receive(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None at the end of the stream."""
    try:
        head = await reader.readexactly(HEADER.size)
        body = await reader.readexactly(HEADER.unpack(head)[0])
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    message = pickle.loads(body)
    assert isinstance(message, tuple)
    return message


def snapshot_message(snap: Snapshot) -> Message:
    """A registry version as plain data (the snapshot's mappings are read-only views, which
    pickle does not take); the worker builds the same snapshot from it."""
    return (
        "snapshot",
        snap.version,
        dict(snap.endpoints),
        snap.synced,
        dict(snap.problems),
        dict(snap.fronted),
    )


# -- the main process's side ----------------------------------------------------------------


@dataclass
class Figures:
    """One worker's last report (cumulative counts since it started, gauges as they stood)."""

    counters: dict[str, tuple[int, ...]] = field(default_factory=dict)
    internal_errors: int = 0
    responses: dict[tuple[str, str, str], int] = field(default_factory=dict)
    latency: dict[str, tuple[list[int], float]] = field(default_factory=dict)
    hold_time: dict[str, tuple[list[int], float]] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    connections: int = 0

    def add_counts(self, other: Figures) -> None:
        """Add another's cumulative counts (not its gauges) to these."""
        for service, values in other.counters.items():
            have = self.counters.get(service, (0,) * len(COUNTED))
            self.counters[service] = tuple(a + b for a, b in zip(have, values, strict=True))
        self.internal_errors += other.internal_errors
        for key, count in other.responses.items():
            self.responses[key] = self.responses.get(key, 0) + count
        for mine, theirs in ((self.latency, other.latency), (self.hold_time, other.hold_time)):
            for service, (counts, total) in theirs.items():
                old = mine.get(service)
                if old is None:
                    mine[service] = (list(counts), total)
                else:
                    mine[service] = (
                        [a + b for a, b in zip(old[0], counts, strict=True)],
                        old[1] + total,
                    )


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes]
    writer: asyncio.StreamWriter
    reader: asyncio.StreamReader
    started: float
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    figures: Figures = field(default_factory=Figures)


class Workers(Server):
    """The main process's end: starts, feeds, watches and restarts the workers, and merges
    their reports into ``proxy`` (which never listens itself). The daemon stacks it where it
    would stack the proxy."""

    def __init__(
        self, proxy: Proxy, registry: Registry, config: Config, health: HealthChecker, count: int
    ) -> None:
        super().__init__()
        self.proxy = proxy
        self.registry = registry
        self.config = config
        self.health = health
        self.count = count
        self.workers: dict[int, Worker] = {}
        self.retired = Figures()  # counts of workers that exited, up to their last report
        self.restarts = 0
        self.listening: list[tuple[Key, socket.socket]] = []
        self._added: list[str] = []
        self._vips: frozenset[DynamicKey] = frozenset()
        self._suspects: frozenset[str] = frozenset()
        self._stopping = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        proxy = self.proxy
        for listener in proxy.listeners:
            if listener.host not in self._added and await vip.ensure_local(
                listener.host, listener.key
            ):
                self._added.append(listener.host)
            key: Key = ("tcp", listener.host, listener.port)
            sock = self.sockets(*key)
            if sock is None:
                try:
                    sock = bind(*key)
                except OSError as exc:
                    raise StartupError(
                        f"{listener.key}: cannot listen on {listener.host}:{listener.port}: "
                        f"{exc.strerror or exc}"
                    ) from None
            self.listening.append((key, sock))
            name = sock.getsockname()
            proxy.bound.append((str(name[0]), int(name[1])))
        try:
            started = [await self._spawn(index) for index in range(self.count)]
            async with asyncio.timeout(READY_TIMEOUT):
                for worker in started:
                    await worker.ready.wait()
        except TimeoutError:
            await self.stop()
            raise StartupError(f"proxy workers not accepting within {READY_TIMEOUT:g}s") from None
        logger.info(
            "proxy: %d workers accepting on %s",
            self.count,
            ", ".join(f"{host}:{port}" for host, port in proxy.bound),
        )
        self.spawn(self._feed(), name="workers-feed")

    async def stop(self) -> None:
        self._stopping = True
        for worker in self.workers.values():
            with contextlib.suppress(ConnectionError, RuntimeError):
                worker.writer.write(encode(("stop",)))
        deadline = time.monotonic() + DRAIN_GRACE + 2.0
        for worker in list(self.workers.values()):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await asyncio.to_thread(worker.process.wait)
            if worker.process.poll() is None:
                logger.warning("proxy worker %d did not drain in time: killed", worker.index)
                worker.process.kill()
                await asyncio.to_thread(worker.process.wait)
        await self.cancel_tasks()
        for worker in self.workers.values():
            worker.writer.close()
        self.workers.clear()
        for _key, sock in self.listening:
            sock.close()
        self.listening.clear()
        for host in self._added if not self.proxy.keep_addresses else ():
            await vip.remove(host)
        self._added.clear()

    async def _spawn(self, index: int) -> Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [sock.fileno() for _key, sock in self.listening]
        # Imported, not run as __main__, so what it pickles names this module's classes.
        argv = [sys.executable, "-c", ENTRY, str(theirs.fileno()), str(index)]
        try:
            process = subprocess.Popen(  # noqa: ASYNC220 - a fork and exec, not a wait
                argv, pass_fds=(theirs.fileno(), *fds), stdin=subprocess.DEVNULL
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        worker = Worker(index, process, writer, reader, time.monotonic())
        self.workers[index] = worker
        listeners = [(key, sock.fileno()) for key, sock in self.listening]
        level = logging.getLevelName(logging.getLogger().level).lower()
        handlers = logging.getLogger().handlers
        json = bool(handlers) and isinstance(handlers[0].formatter, logs.JsonFormatter)
        writer.write(encode(("hello", self.config, listeners, level, "json" if json else "text")))
        writer.write(encode(snapshot_message(self.registry.snapshot)))
        writer.write(encode(("vips", self._vips)))
        writer.write(encode(("suspects", self._suspects)))
        logger.info("proxy worker %d started: pid %d", index, process.pid)
        self.spawn(self._follow(worker), name=f"worker-{index}")
        return worker

    async def _follow(self, worker: Worker) -> None:
        """Read a worker's messages until it exits; then start another in its place."""
        while (message := await receive(worker.reader)) is not None:
            self._handle(worker, message)
        code = await asyncio.to_thread(worker.process.wait)
        self.retired.add_counts(worker.figures)
        worker.writer.close()
        if self._stopping or self.workers.get(worker.index) is not worker:
            return
        del self.workers[worker.index]
        self.restarts += 1
        logger.warning(
            "proxy worker %d (pid %d) exited with %s: starting another",
            worker.index,
            worker.process.pid,
            f"signal {-code}" if code < 0 else f"status {code}",
        )
        self._merge()
        lived = time.monotonic() - worker.started
        if lived < RESTART_PAUSE:
            await asyncio.sleep(RESTART_PAUSE - lived)
        if not self._stopping:
            await self._spawn(worker.index)

    def _handle(self, worker: Worker, message: Message) -> None:
        kind = message[0]
        if kind == "outcomes":
            for endpoint_id, address, ok, reason in message[1]:
                self.health.report(endpoint_id, address, ok, reason)
        elif kind == "holds":
            for service in message[1]:
                self.proxy.dispatcher.on_hold(service)
        elif kind == "figures":
            worker.figures = message[1]
            self._merge()
            self._share_suspects()
        elif kind == "ready":
            worker.ready.set()

    def _merge(self) -> None:
        """The proxy's counters, histograms and gauges as the sum of the workers'."""
        total = Figures()
        total.add_counts(self.retired)
        for worker in self.workers.values():
            total.add_counts(worker.figures)
        dispatcher = self.proxy.dispatcher
        counters: dict[str, Counters] = {}
        for service, values in total.counters.items():
            counters[service] = Counters(*values)
        dispatcher.counters.clear()
        dispatcher.counters.update(counters)
        dispatcher.internal_errors = total.internal_errors
        dispatcher.responses.clear()
        dispatcher.responses.update(total.responses)
        for mine, theirs in (
            (dispatcher.latency, total.latency),
            (dispatcher.hold_time, total.hold_time),
        ):
            mine.clear()
            for service, (counts, sum_) in theirs.items():
                mine[service] = Histogram(counts=counts, total=sum_)
        inflight: dict[str, int] = {}
        held: dict[str, int] = {}
        for worker in self.workers.values():
            for endpoint_id, n in worker.figures.inflight.items():
                inflight[endpoint_id] = inflight.get(endpoint_id, 0) + n
            for service, n in worker.figures.held.items():
                held[service] = held.get(service, 0) + n
        dispatcher.balancer.inflight.clear()
        dispatcher.balancer.inflight.update(inflight)
        # Held requests live in the workers: counted where the proxy counts held TCP
        # connections, which Proxy.held() adds to its own (always empty) waiters.
        dispatcher.tcp_waiting.clear()
        dispatcher.tcp_waiting.update(held)

    def _send_all(self, data: bytes) -> None:
        for worker in self.workers.values():
            with contextlib.suppress(ConnectionError, RuntimeError):
                worker.writer.write(data)

    async def _feed(self) -> None:
        """Every registry version to every worker (and the proxy's stable addresses, which
        DNS answers, kept from the main process's own Proxy)."""
        async for snap in self.registry.watch(-1):
            self.proxy.refresh(snap)
            self._send_all(encode(snapshot_message(snap)))

    def _share_suspects(self) -> None:
        """Tell the workers which endpoints have failures on record, when that changed: their
        successes are then reported too (checked at each worker's report, not per request)."""
        suspects = self.health.suspects()
        if suspects != self._suspects:
            self._suspects = suspects
            self._send_all(encode(("suspects", suspects)))

    def set_vip_listeners(self, keys: set[DynamicKey]) -> None:
        """Per-service virtual-address listeners, opened by every worker."""
        self._vips = frozenset(keys)
        self._send_all(encode(("vips", self._vips)))

    def metrics(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "stablenet_proxy_workers", "Proxy worker processes running.", value=len(self.workers)
        )
        yield CounterMetricFamily(
            "stablenet_proxy_worker_restarts",
            "Proxy workers started again after one exited.",
            value=self.restarts,
        )
        requests = CounterMetricFamily(
            "stablenet_proxy_worker_requests",
            "Requests received by each running proxy worker since it started.",
            labels=["worker"],
        )
        connections = GaugeMetricFamily(
            "stablenet_proxy_worker_connections",
            "Client connections open at each proxy worker.",
            labels=["worker"],
        )
        for index, worker in sorted(self.workers.items()):
            figures = worker.figures
            requests.add_metric([str(index)], sum(v[0] for v in figures.counters.values()))
            connections.add_metric([str(index)], figures.connections)
        yield requests
        yield connections


# -- the worker's side ----------------------------------------------------------------------


class Link:
    """A worker's messages to the main process: outcomes and holds batched per loop turn."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.suspects: frozenset[str] = frozenset()
        self.failed: set[str] = set()  # failures reported since the last suspects update
        self.outcomes: list[tuple[str, str, bool, str]] = []
        self.holds: list[str] = []
        self.flushing = False

    def outcome(self, endpoint: Endpoint, ok: bool, reason: str) -> None:
        """The proxy's OutcomeHook: returns at once for a success the health checker would
        ignore (nearly every request), like HealthChecker.outcome."""
        endpoint_id = endpoint.id
        if ok and endpoint_id not in self.suspects and endpoint_id not in self.failed:
            return
        if not ok:
            self.failed.add(endpoint_id)
        self.outcomes.append((endpoint_id, endpoint.address, ok, reason))
        self._schedule()

    def hold(self, service: str) -> None:
        self.holds.append(service)
        self._schedule()

    def _schedule(self) -> None:
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flushing = False
        if self.outcomes:
            self.send(("outcomes", self.outcomes))
            self.outcomes = []
        if self.holds:
            self.send(("holds", self.holds))
            self.holds = []

    def send(self, message: Message) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(message))


def figures_of(proxy: Proxy) -> Figures:
    dispatcher = proxy.dispatcher
    held = {name: len(waiting) for name, waiting in dispatcher.waiters.items() if waiting}
    for name, n in dispatcher.tcp_waiting.items():
        if n:
            held[name] = held.get(name, 0) + n
    return Figures(
        counters={
            service: tuple(getattr(c, attr) for attr in COUNTED)
            for service, c in dispatcher.counters.items()
        },
        internal_errors=dispatcher.internal_errors,
        responses=dict(dispatcher.responses),
        latency={s: (list(h.counts), h.total) for s, h in dispatcher.latency.items()},
        hold_time={s: (list(h.counts), h.total) for s, h in dispatcher.hold_time.items()},
        inflight={k: v for k, v in dispatcher.balancer.inflight.items() if v},
        held=held,
        connections=dispatcher.gate.budget.open,
    )


def reuseport_socket(kind: str, host: str, port: int) -> socket.socket | None:
    """A listener only workers bind (labels, virtual addresses): one per worker, SO_REUSEPORT."""
    import ipaddress

    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        return None
    return sock


async def work(channel: int, index: int) -> None:
    """One worker: a Proxy following the main process's registry until told to stop, the
    channel closes (the main process is gone) or SIGTERM; then it drains like a single
    process's proxy does."""
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=channel))
    hello = await receive(reader)
    if hello is None or hello[0] != "hello":
        writer.close()
        return
    _, config, listeners, level, fmt = hello
    assert isinstance(config, Config)
    logs.setup(level, fmt)
    inherited: dict[Key, socket.socket] = {key: socket.socket(fileno=fd) for key, fd in listeners}
    registry = Registry(config.cluster.prefer)
    link = Link(writer)
    proxy = Proxy(
        registry,
        config.proxy,
        zone=config.dns.zone,
        report=link.outcome,
        metrics=config.admin.metrics,
    )
    proxy.dispatcher.on_hold = link.hold
    proxy.keep_addresses = True  # the main process adds and removes listener addresses

    def sockets(kind: str, host: str, port: int) -> socket.socket | None:
        sock = inherited.pop((kind, host, port), None)
        return sock if sock is not None else reuseport_socket(kind, host, port)

    proxy.sockets = sockets
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the main process decides

    def handle(message: Message) -> None:
        kind = message[0]
        if kind == "snapshot":
            _, version, endpoints, synced, problems, fronted = message
            registry.publish(
                Snapshot.build(version, endpoints, synced, problems, registry.prefer, fronted)
            )
        elif kind == "suspects":
            link.suspects, link.failed = message[1], set()
        elif kind == "vips":
            proxy.set_vip_listeners(set(message[1]))
        elif kind == "stop":
            stop.set()

    async def listen() -> None:
        while (message := await receive(reader)) is not None:
            handle(message)
            if stop.is_set():
                return
        stop.set()

    async def report() -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            link.send(("figures", figures_of(proxy)))

    # Take the first registry version (queued right after the hello) before accepting.
    while True:
        message = await receive(reader)
        if message is None:
            return
        handle(message)
        if message[0] == "snapshot":
            break
    async with proxy:
        await proxy.sync_listeners()
        link.send(("ready",))
        proxy.spawn(listen(), name="worker-listen")  # both end with the proxy's drain
        proxy.spawn(report(), name="worker-report")
        await stop.wait()
    link.send(("figures", figures_of(proxy)))
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


def main(argv: list[str]) -> None:
    run_on_uvloop(work(int(argv[0]), int(argv[1])))
