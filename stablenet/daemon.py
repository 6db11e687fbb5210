"""The daemon: wires config, registry, sources, servers and loops together and runs them with
ordered, bounded shutdown. Signals only set an event. No business logic lives here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
from collections.abc import Callable, Coroutine, Iterable, Mapping
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
from stablenet.events import EventLog
from stablenet.health.checker import HealthChecker
from stablenet.metrics import Collector, exposition
from stablenet.proxy import Proxy
from stablenet.proxy.server import DRAIN_GRACE, no_stable
from stablenet.registry import Registry
from stablenet.traffic import History, Sampler, read_figures
from stablenet.vips import VipManager, remove_table

logger = logging.getLogger(__name__)
NR_OPEN = "/proc/sys/fs/nr_open"  # the kernel's ceiling for an unlimited RLIMIT_NOFILE


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

    def __init__(self, config: Config, registry: Registry | None = None) -> None:
        self.config = config
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
        self.vips = (
            VipManager(
                self.registry,
                config.vips.range,
                config.controller.state_dir,
                proxy=self.proxy is not None,
                on_addresses=self._vip_addresses,
                on_listeners=self.proxy.set_vip_listeners if self.proxy is not None else None,
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

    def _part_metrics(self) -> Iterable[Metric]:
        """Metrics of the parts that are on (virtual addresses, the cluster layer)."""
        if self.vips is not None:
            yield from self.vips.metrics()
        if self.cluster is not None:
            yield from self.cluster.metrics()

    def _requests(self, service: str) -> int:
        """A service's proxied requests so far (the autoscaler's sign of life)."""
        return self.proxy.count(service).requests if self.proxy is not None else 0

    def _desired(self) -> dict[str, int | None]:
        """Managed services' desired replicas, for the traffic charts."""
        if self.controller is None:
            return {}
        return {name: status.desired for name, status in self.controller.status.items()}

    def listeners(self) -> list[contextlib.AbstractAsyncContextManager[Any]]:
        """Servers in start order; they close in reverse (admin first, so it closes last)."""
        servers: list[contextlib.AbstractAsyncContextManager[Any]] = [self.admin]
        if self.dns is not None:
            servers.append(self.dns)
        if self.proxy is not None:
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

    async def run(self) -> None:
        """Start listeners, run the loops until ``stopping`` is set, then stop in order:
        listeners stop accepting and drain (in reverse start order), then loops are cancelled."""
        logger.info("stablenet %s starting (request path: %s)", __version__, native.describe())
        if self.controller is not None:
            self.controller.prepare()
        if self.vips is None:
            await remove_table(self.config.controller.state_dir)
        async with contextlib.AsyncExitStack() as listeners:
            for listener in self.listeners():
                await listeners.enter_async_context(listener)
            async with asyncio.TaskGroup() as tasks:
                running = [
                    tasks.create_task(loop(), name=name) for name, loop in self.loops().items()
                ]
                await self.stopping.wait()
                logger.info("stopping: closing listeners")
                await listeners.aclose()
                logger.info("stopping: cancelling background loops")
                for task in running:
                    task.cancel()
        logger.info("stopped")


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


async def serve(config: Config) -> None:
    """Run a daemon for this config until a signal stops it."""
    raise_descriptor_limit()  # before the proxy derives its connection budget from it
    daemon = Daemon(config)
    main = asyncio.current_task()
    assert main is not None
    install_signal_handlers(daemon, main)
    await daemon.run()


def run(config: Config) -> None:
    """Run ``serve`` on uvloop when available, else on the default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(config))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(config))
