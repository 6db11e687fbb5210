"""The daemon: wires config, registry, sources, servers and loops together and runs them with
ordered, bounded shutdown. Signals only set an event. No business logic lives here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client.core import Metric

from stablenet import __version__, native
from stablenet.admin import AdminServer
from stablenet.cluster import Cluster
from stablenet.config import Config
from stablenet.controller import Controller
from stablenet.controller.loop import never_busy, no_load
from stablenet.dns import DnsServer
from stablenet.docker.networks import engine_networks, network_subnets
from stablenet.docker.source import DockerSource
from stablenet.docker.translate import Settings
from stablenet.errors import StartupError
from stablenet.events import EventLog
from stablenet.handover import Offer, Predecessor, notify_systemd, path_for, take_over
from stablenet.health.checker import HealthChecker
from stablenet.lifecycle import run_on_uvloop
from stablenet.metrics import Collector, exposition
from stablenet.model import State
from stablenet.proxy import Proxy
from stablenet.proxy.server import DRAIN_GRACE, no_stable
from stablenet.registry import Registry, Snapshot
from stablenet.sockets import Key, Sockets, from_systemd
from stablenet.traffic import History, Sampler, read_figures
from stablenet.units import parse_hostport
from stablenet.vips import VipManager, remove_table
from stablenet.workers import Workers, worker_count

logger = logging.getLogger(__name__)
NR_OPEN = "/proc/sys/fs/nr_open"  # the kernel's ceiling for an unlimited RLIMIT_NOFILE
READY_TIMEOUT = 10.0  # seconds a start waits to sync with Docker before it serves regardless
SETTLE_TIMEOUT = 3.0  # further seconds for endpoints' first health checks once synced


def process_age() -> float:
    """Seconds since this process started (the kernel's start time: interpreter start and
    imports included), for the time-to-ready figure."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as stat:
            started = int(stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError):
        return 0.0


def settled(snap: Snapshot) -> bool:
    """Synced, and no endpoint waits for its first health check: serving now answers from
    the whole picture instead of holding requests for endpoints a moment from ready."""
    return snap.synced and not any(ep.state is State.STARTING for ep in snap.endpoints.values())


def static_listeners(config: Config) -> list[Key]:
    """The sockets a config listens on that are known before anything runs (dns.listen entries
    naming the Docker bridge are found later, from the engine)."""
    keys: list[Key] = []
    if config.admin.listen:
        keys.append(("tcp", *parse_hostport(config.admin.listen)))
    if config.dns.enabled:
        for entry in config.dns.listen:
            with contextlib.suppress(ValueError):
                host, port = parse_hostport(entry)
                keys += [("udp", host, port), ("tcp", host, port)]
    if config.proxy.enabled:
        keys.append(("tcp", *parse_hostport(config.proxy.listen)))
        for spec in config.proxy.listeners:
            with contextlib.suppress(ValueError):
                keys.append(("tcp", *parse_hostport(spec.partition("=")[2].partition(":")[2])))
    return [key for key in keys if key[2] != 0]


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (the proxy's connection budget is derived
    from it) and log the limit in force, which is returned."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open(NR_OPEN) as ceiling:
                target = int(ceiling.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        logger.info("descriptor limit (RLIMIT_NOFILE): %d", soft)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        logger.warning("descriptor limit (RLIMIT_NOFILE) stays %d: cannot raise it: %s", soft, exc)
        return soft
    logger.info("descriptor limit (RLIMIT_NOFILE) raised from %d to %d", soft, target)
    return target


class Daemon:
    """Everything one `stablenet run` owns."""

    def __init__(
        self, config: Config, registry: Registry | None = None, sockets: Sockets | None = None
    ) -> None:
        self.config = config
        self.sockets = sockets or Sockets()
        self.ready_seconds: float | None = None  # process start -> serving (metrics, log)
        self.successor: int | None = None  # the pid that took over, once it serves
        self.handover_path = path_for(config.controller.state_dir, config.admin.listen)
        self.registry = registry or Registry(config.cluster.prefer)
        self.source = DockerSource(
            self.registry,
            Settings.from_config(config.docker, config.health),
            resync_interval=config.docker.resync_interval,
        )
        self.health = HealthChecker(self.registry, config.health)
        self.dns = (
            DnsServer(self.registry, config.dns, engine=lambda: asyncio.to_thread(engine_networks))
            if config.dns.enabled
            else None
        )
        self.proxy = (
            Proxy(
                self.registry,
                config.proxy,
                zone=config.dns.zone,
                report=self.health.outcome,
                metrics=config.admin.metrics,
                # A service with a dedicated listener is answered in DNS with its address.
                on_stable=self._proxy_stable if self.dns is not None else no_stable,
            )
            if config.proxy.enabled
            else None
        )
        self._stable: dict[str, dict[str, tuple[str, ...]]] = {"proxy": {}, "vips": {}}
        # proxy.workers > 1: worker processes serve the proxy's listeners; self.proxy then
        # never listens and holds the sum of what they report (workers.py).
        workers = worker_count(config.proxy.workers)
        self.workers = (
            Workers(self.proxy, self.registry, config, self.health, workers)
            if self.proxy is not None and workers > 1
            else None
        )
        on_listeners = (
            self.workers.set_vip_listeners
            if self.workers is not None
            else self.proxy.set_vip_listeners
            if self.proxy is not None
            else None
        )
        self.vips = (
            VipManager(
                self.registry,
                config.vips.range,
                config.controller.state_dir,
                proxy=self.proxy is not None,
                on_addresses=self._vip_addresses,
                on_listeners=on_listeners,
                engine=lambda: asyncio.to_thread(network_subnets),
            )
            if config.vips.enabled
            else None
        )
        self.events = EventLog(self.registry)
        self.controller = (
            Controller(
                self.registry,
                config.controller,
                log=self.events,
                busy=self.proxy.in_flight if self.proxy is not None else never_busy,
                concurrency=self.proxy.concurrency if self.proxy is not None else no_load,
                requests=self._requests,
            )
            if config.controller.enabled
            else None
        )
        if self.controller is not None and self.proxy is not None:
            self.proxy.dispatcher.on_hold = self.controller.demand
        self.collector = Collector(
            self.registry,
            source=self.source,
            health=self.health,
            dns=self.dns,
            proxy=self.proxy,
            controller=self.controller,
            extra=(self._part_metrics,),
            ready=lambda: self.ready_seconds,
        )
        self.admin = AdminServer(
            self.registry,
            config.admin.listen,
            config.admin.token,
            events=self.events,
            metrics=lambda: exposition(self.collector),
            controller=self.controller,
            service_info={"vip": self.vips.info} if self.vips is not None else None,
        )
        self.cluster = (
            Cluster(self.registry, config.cluster, config.dns.zone, int(config.dns.ttl))
            if config.cluster.etcd
            else None
        )
        if self.cluster is not None:
            self.admin.status["cluster"] = self.cluster.status
        self.traffic = Sampler(
            History(config.admin.history),
            lambda: read_figures(self.registry, self.proxy, self._desired),
        )
        self.admin.serve_traffic(self.traffic.history)
        self.stopping = asyncio.Event()
        for server in self.listeners():
            server.sockets = self.sockets.take  # type: ignore[attr-defined]

    def _part_metrics(self) -> Iterable[Metric]:
        """Metrics of the parts that are on (virtual addresses, the cluster layer)."""
        if self.vips is not None:
            yield from self.vips.metrics()
        if self.cluster is not None:
            yield from self.cluster.metrics()
        if self.workers is not None:
            yield from self.workers.metrics()

    def _requests(self, service: str) -> int:
        """A service's proxied requests so far (the autoscaler's sign of life)."""
        return self.proxy.count(service).requests if self.proxy is not None else 0

    def _desired(self) -> dict[str, int | None]:
        """Managed services' desired replicas, for the traffic charts."""
        if self.controller is None:
            return {}
        return {name: status.desired for name, status in self.controller.status.items()}

    def listeners(self) -> list[contextlib.AbstractAsyncContextManager[Any]]:
        """The admin API, then the data path (DNS, proxy, virtual addresses). The data path
        starts first and closes first; the admin API starts once it serves, closes last."""
        servers: list[contextlib.AbstractAsyncContextManager[Any]] = [self.admin]
        if self.dns is not None:
            servers.append(self.dns)
        if self.workers is not None:
            servers.append(self.workers)
        elif self.proxy is not None:
            servers.append(self.proxy)
        if self.vips is not None:
            servers.append(self.vips)
        return servers

    def _proxy_stable(self, stable: Mapping[str, tuple[str, ...]]) -> None:
        self._stable["proxy"] = dict(stable)
        self._publish_stable()

    def _vip_addresses(self, addresses: Mapping[str, str]) -> None:
        self._stable["vips"] = {name: (address,) for name, address in addresses.items()}
        self._publish_stable()

    def _publish_stable(self) -> None:
        """DNS answers a service with its virtual address (long TTL) and its proxy listeners."""
        if self.dns is None:
            return
        vips, proxy = self._stable["vips"], self._stable["proxy"]
        merged = {
            name: tuple(dict.fromkeys((*vips.get(name, ()), *proxy.get(name, ()))))
            for name in {*vips, *proxy}
        }
        self.dns.set_stable_addresses(merged, frozenset(vips))

    def loops(self) -> dict[str, Callable[[], Coroutine[Any, Any, None]]]:
        """Long-lived loops, by name; each runs in the daemon's TaskGroup."""
        loops = {
            "docker-source": self.source.run,
            "health": self.health.run,
            "events": self.events.run,
            "traffic": self.traffic.run,
        }
        if self.controller is not None:
            loops["controller"] = self.controller.run
        if self.cluster is not None:
            loops["cluster"] = self.cluster.run
        return loops

    async def run(self, predecessor: Predecessor | None = None) -> None:
        """Run the loops; once the registry is synced (bounded), start the listeners on the
        sockets bound early or inherited, tell the predecessor, offer a handover, and run until
        ``stopping``; then stop in order: listeners stop accepting and drain (in reverse start
        order), then loops are cancelled. Until the listeners start, the kernel holds
        connections and datagrams on the bound sockets (or the predecessor serves them)."""
        logger.info("stablenet %s starting (request path: %s)", __version__, native.describe())
        if self.controller is not None:
            self.controller.prepare()
        if self.vips is None:
            await remove_table(self.config.controller.state_dir)
        failed: StartupError | None = None
        async with asyncio.TaskGroup() as tasks:
            running = {
                name: tasks.create_task(loop(), name=name) for name, loop in self.loops().items()
            }
            try:
                await self._serve(predecessor, running, tasks)
            except StartupError as exc:
                failed = exc
            logger.info("stopping: cancelling background loops")
            for task in running.values():
                task.cancel()
        if failed is not None:
            raise failed
        logger.info("stopped")

    async def _until_ready(self) -> bool:
        """Wait for the Docker sync (READY_TIMEOUT), then for first health checks
        (SETTLE_TIMEOUT). False when the sync did not come."""
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await self.registry.until(lambda snap: snap.synced)
        except TimeoutError:
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SETTLE_TIMEOUT):
                await self.registry.until(settled)
        return True

    async def _serve(
        self,
        predecessor: Predecessor | None,
        running: dict[str, asyncio.Task[None]],
        tasks: asyncio.TaskGroup,
    ) -> None:
        if not await self._until_ready():
            if predecessor is not None:
                predecessor.abandon()
                raise StartupError(
                    f"not synced with the Docker Engine within {READY_TIMEOUT:g}s; "
                    f"stablenet pid {predecessor.pid} goes on serving"
                )
            logger.warning(
                "not synced with the Docker Engine within %gs: serving what is known",
                READY_TIMEOUT,
            )
        # The admin API starts after the data path (its /readyz and services mean "serving")
        # and closes after it (the drain stays observable).
        async with contextlib.AsyncExitStack() as admin, contextlib.AsyncExitStack() as listeners:
            try:
                servers = self.listeners()
                for listener in servers[1:]:
                    await listeners.enter_async_context(listener)
                if self.proxy is not None and self.workers is None:
                    await self.proxy.sync_listeners()  # takes inherited label listeners
                await admin.enter_async_context(servers[0])
            except StartupError:
                if predecessor is not None:
                    predecessor.abandon()
                raise
            self.sockets.close_spare()
            self.ready_seconds = process_age()
            logger.info(
                "serving: ready %.3fs after start (%d endpoints, %s)",
                self.ready_seconds,
                len(self.registry.snapshot.endpoints),
                f"took over from pid {predecessor.pid}"
                if predecessor
                else "fresh sockets"
                if not self.sockets.inherited
                else "inherited sockets",
            )
            notify_systemd(f"READY=1\nMAINPID={os.getpid()}")
            if predecessor is not None:
                predecessor.ready()
                tasks.create_task(self._predecessor_exit(predecessor), name="predecessor")
            async with Offer(self.handover_path, self.sockets, self._hand_over):
                await self.stopping.wait()
            logger.info("stopping: closing listeners")
            if self.successor is not None:
                # The successor serves: stop acting on containers at once, so its controller
                # takes the lock (within its 2 s poll) while our connections drain.
                controller = running.get("controller")
                if controller is not None:
                    controller.cancel()
                    await asyncio.gather(controller, return_exceptions=True)
                    logger.info("controller lock released for pid %d", self.successor)
                if self.proxy is not None:
                    self.proxy.keep_addresses = True
            await listeners.aclose()

    async def _predecessor_exit(self, predecessor: Predecessor) -> None:
        began = time.monotonic()
        await predecessor.gone()
        logger.info(
            "stablenet pid %d drained and exited %.3fs after we took over",
            predecessor.pid,
            time.monotonic() - began,
        )

    def _hand_over(self, successor: int) -> None:
        """A successor serves on our sockets: drain and exit."""
        logger.info("stablenet pid %d serves now: handing over", successor)
        self.successor = successor
        self.stopping.set()

    def start_successor(self) -> None:
        """SIGHUP: start a fresh `stablenet run` from the code and config on disk now; it takes
        over through the handover socket like a second `stablenet run` would."""
        args = sys.argv[1:]
        if "--handover-from" in args:  # this process was a successor itself
            at = args.index("--handover-from")
            del args[at : at + 2]
        argv = [sys.executable, "-m", "stablenet", *args]
        argv += ["--handover-from", str(self.handover_path)]
        try:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        except OSError as exc:
            logger.error("SIGHUP: cannot start a successor: %s", exc)
            return
        logger.info("SIGHUP: started successor pid %d", child.pid)
        # Reap it if it fails before we exit; once we exit, it is reparented and serves on.
        threading.Thread(target=child.wait, name="successor", daemon=True).start()


def install_signal_handlers(daemon: Daemon, main: asyncio.Task[Any]) -> None:
    """SIGTERM/SIGINT ask for an orderly stop; a second SIGINT cancels everything at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if daemon.stopping.is_set():
            if signum == signal.SIGINT:
                logger.warning("second interrupt: forcing exit")
                main.cancel()
            return
        logger.info("received %s", signal.Signals(signum).name)
        daemon.stopping.set()
        loop.call_later(DRAIN_GRACE * 2, main.cancel)  # twice the proxy's drain: stuck

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, daemon.start_successor)


async def serve(config: Config, handover_from: str | None = None) -> None:
    """Run a daemon for this config until a signal stops it. A stablenet already running with
    this config (or the one named by ``handover_from``, SIGHUP's) hands its sockets over."""
    raise_descriptor_limit()  # before the proxy derives its connection budget from it
    path = (
        Path(handover_from)
        if handover_from
        else path_for(config.controller.state_dir, config.admin.listen)
    )
    try:
        predecessor = take_over(path, required=handover_from is not None)
    except (OSError, ValueError, KeyError) as exc:
        raise StartupError(f"cannot take over from the stablenet at {path}: {exc}") from None
    sockets = Sockets(predecessor.sockets if predecessor is not None else from_systemd())
    sockets.prebind(static_listeners(config))  # the kernel queues connections from now on
    daemon = Daemon(config, sockets=sockets)
    main = asyncio.current_task()
    assert main is not None
    install_signal_handlers(daemon, main)
    await daemon.run(predecessor)


def run(config: Config, handover_from: str | None = None) -> None:
    """Run ``serve`` on uvloop when available, else on the default loop."""
    run_on_uvloop(serve(config, handover_from))
