"""The loop that keeps the kernel in step with the registry: allocate an address for every new
service (persisted before use), plan the table from the routable endpoints of each snapshot,
apply the difference as one transaction, forget stale UDP flows, and tell DNS and the proxy
which addresses exist. Starts by checking the range and reconciling with what the kernel already
holds; leaves the table in place on stop, so the kernel keeps serving while stablenet is away."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from stablenet.errors import StartupError
from stablenet.histogram import Histogram
from stablenet.lifecycle import Server
from stablenet.model import Endpoint
from stablenet.registry import Registry, Snapshot
from stablenet.vips import alloc, kernel, rules, store
from stablenet.vips.labels import Mode, endpoint_ports, mode_of

logger = logging.getLogger(__name__)

Listeners = set[tuple[str, str, str, int]]  # (service, "http" | "tcp", address, port)
Signature = tuple[str, tuple[Endpoint, ...], tuple[Endpoint, ...]]  # address, endpoints, ready
EngineSubnets = Callable[[], Awaitable[list[tuple[str, str]]]]  # [(network name, subnet)]


def no_subnets() -> Awaitable[list[tuple[str, str]]]:
    async def none() -> list[tuple[str, str]]:
        return []

    return none()


@dataclasses.dataclass(slots=True)
class VipStats:
    updates: int = 0  # transactions applied after the first reconcile
    errors: int = 0  # transactions the kernel refused (each followed by a reconcile)
    reconciles: int = 0
    reconcile_seconds: float = 0.0  # the last one: read + plan + apply
    conntrack_deleted: int = 0
    update_seconds: Histogram = dataclasses.field(default_factory=Histogram)


class VipManager(Server):
    """Owns the virtual addresses of every service while stablenet runs."""

    def __init__(
        self,
        registry: Registry,
        network: str,
        state_dir: str,
        proxy: bool = True,
        on_addresses: Callable[[dict[str, str]], None] | None = None,
        on_listeners: Callable[[Listeners], None] | None = None,
        engine: EngineSubnets = no_subnets,
    ) -> None:
        super().__init__()
        self.registry = registry
        self.network = ipaddress.IPv4Network(network)
        self.state_dir = state_dir
        self.proxy = proxy
        self.on_addresses = on_addresses
        self.on_listeners = on_listeners
        self.engine = engine
        self.addresses: dict[str, str] = {}  # service -> address (the allocation file)
        self.modes: dict[str, Mode] = {}  # last data path seen per service
        self.table = rules.EMPTY  # what the kernel holds, as of the last transaction
        self._fragments: dict[str, tuple[Signature, rules.Table]] = {}  # per service
        self._services: dict[rules.Key, int] = {}  # the merged table, kept in step
        self._slots: dict[rules.SlotKey, rules.Target] = {}
        self._vips: set[str] = set()
        self._hairpin: set[str] = set()
        self._picks: set[int] = set()
        self._seen: Mapping[str, tuple[Endpoint, ...]] = {}  # the snapshot last planned from
        self._seen_ready: Mapping[str, tuple[Endpoint, ...]] = {}
        self._proxied: set[str] = set()  # services the proxy serves
        self.listeners: Listeners = set()
        self.stats = VipStats()
        self.ready = asyncio.Event()  # set once the first reconcile is done
        self._applied = asyncio.Event()  # set (and replaced) after every transaction
        self._nft: kernel.Nft | None = None
        self._warned: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        subnets = await self.engine()
        problem = alloc.range_problem(self.network, subnets, await kernel.host_routes())
        if problem is not None:
            raise StartupError(problem)
        if os.geteuid() != 0:
            raise StartupError(
                "vips.enabled: programming the kernel's NAT needs root; run stablenet as root "
                "or set vips.enabled = false"
            )
        try:
            self._nft = kernel.Nft()
            self.addresses = await asyncio.to_thread(store.load, self.state_dir)
        except (kernel.KernelError, store.StoreError) as exc:
            raise StartupError(str(exc)) from None
        self.addresses = alloc.assign((), self.network, self.addresses)
        if self.on_addresses is not None:
            self.on_addresses(dict(self.addresses))
        logger.info(
            "virtual addresses from %s (%d allocated, kept in %s)",
            self.network,
            len(self.addresses),
            os.path.join(self.state_dir, store.FILE),
        )
        self.spawn(self._follow(), name="vips")

    async def stop(self) -> None:
        await self.cancel_tasks()  # the table stays: the kernel keeps serving

    # -- the loop -------------------------------------------------------------------------------

    async def _follow(self) -> None:
        snap = await self.registry.until(lambda s: s.synced)
        await self.reconcile(snap)
        self.ready.set()
        async for later in self.registry.watch(snap.version):
            await self.update(later)

    async def reconcile(self, snap: Snapshot) -> None:
        """Read the kernel's table and bring it to this snapshot in one transaction."""
        nft = self._need()
        began = time.perf_counter()
        try:
            held = await nft.read()
        except (kernel.KernelError, rules.Unreadable) as exc:
            logger.warning("vips: rewriting table %s: %s", rules.TABLE, exc)
            held = None
        await self._allocate(snap.services)
        previous = held or rules.EMPTY
        fragments = {
            name: self._fragment(name, address, snap, previous)
            for name, address in self.addresses.items()
        }
        wanted = rules.merge(frag for _, frag in fragments.values())
        if held is None:
            cmds = [f"add table {rules.TABLE}", f"delete table {rules.TABLE}"]
            cmds += rules.reconcile(rules.EMPTY, wanted)
        else:
            cmds = rules.reconcile(held, wanted)
        await nft.run(cmds)
        self._fragments = fragments
        self._services = dict(wanted.services)
        self._slots = dict(wanted.slots)
        self._vips = set(wanted.vips)
        self._hairpin = set(wanted.hairpin)
        self._picks = set(wanted.services.values())
        self._seen, self._seen_ready = snap.services, snap.ready
        self._publish()
        self._listen(snap)
        self.stats.reconciles += 1
        self.stats.reconcile_seconds = time.perf_counter() - began
        logger.info(
            "vips: kernel table reconciled: %d service ports, %d addresses (%.1f ms)",
            len(wanted.services),
            len(wanted.vips),
            self.stats.reconcile_seconds * 1e3,
        )
        self.spawn(kernel.hairpin(wanted.hairpin), name="vips-hairpin")
        await self._forget([(previous, wanted)])

    async def update(self, snap: Snapshot) -> float | None:
        """Apply what changed since the last snapshot: only the services whose endpoints
        changed are planned again. Returns the seconds until the kernel held it (None when
        nothing changed)."""
        began = time.perf_counter()
        await self._allocate(snap.services)
        changes: list[tuple[str, rules.Table, rules.Table]] = []
        fresh: dict[str, tuple[Signature, rules.Table]] = {}
        # Services whose endpoints (or routable ones) differ from the last snapshot's, and
        # those gone from it: a comparison of tuples of the same objects, cheap per service.
        services, ready, seen, seen_ready = snap.services, snap.ready, self._seen, self._seen_ready
        touched = [n for n, e in services.items() if seen.get(n) != e or seen_ready[n] != ready[n]]
        touched += seen.keys() - services.keys()
        self._seen, self._seen_ready = services, ready
        for name in touched:
            address = self.addresses.get(name)
            if address is None:
                continue
            before = self._fragments.get(name)
            signature = (address, services.get(name, ()), ready.get(name, ()))
            if before is not None and before[0] == signature:
                continue
            old = before[1] if before is not None else rules.EMPTY
            fresh[name] = self._fragment(name, address, snap, old)
            changes.append((name, old, fresh[name][1]))
        if self._proxied or self.listeners:
            self._listen(snap)
        cmds: list[str] = []
        picks = set(self._picks)
        for _, old, new in changes:
            cmds += rules.diff(old, new, frozenset(picks))
            picks.update(new.services.values())
        if cmds:
            try:
                await self._need().run(cmds)
            except kernel.KernelError as exc:
                self.stats.errors += 1
                logger.error("vips: kernel refused an update (%s); reconciling", exc)
                await self.reconcile(snap)
                return None
        self._fragments.update(fresh)
        if not cmds:
            return None
        for _, old, _new in changes:
            for key in old.services:
                self._services.pop(key, None)
            for slot in old.slots:
                self._slots.pop(slot, None)
            self._vips -= old.vips
            self._hairpin -= old.hairpin
        for _, _, new in changes:
            self._services.update(new.services)
            self._slots.update(new.slots)
            self._vips |= new.vips
            self._hairpin |= new.hairpin
        self._picks = picks
        self._publish()
        took = time.perf_counter() - began
        self.stats.updates += 1
        self.stats.update_seconds.observe(took)
        added = {a for _, old, new in changes for a in new.hairpin - old.hairpin}
        if added:
            self.spawn(kernel.hairpin(added), name="vips-hairpin")
        await self._forget([(old, new) for _, old, new in changes])
        return took

    def _publish(self) -> None:
        """Make the merged table visible (a view over the live maps) and wake waiters."""
        self.table = rules.Table(
            self._services, self._slots, self._vips, self._hairpin, frozenset(self._picks)
        )
        woken, self._applied = self._applied, asyncio.Event()
        woken.set()

    async def until(self, predicate: Callable[[rules.Table], bool]) -> rules.Table:
        """The first table the kernel holds (the current one included) for which ``predicate``
        is true. Bound the wait with ``asyncio.timeout``."""
        while True:
            applied = self._applied
            if predicate(self.table):
                return self.table
            await applied.wait()

    def _need(self) -> kernel.Nft:
        if self._nft is None:
            self._nft = kernel.Nft()
        return self._nft

    # -- planning -------------------------------------------------------------------------------

    def _fragment(
        self, name: str, address: str, snap: Snapshot, previous: rules.Table
    ) -> tuple[Signature, rules.Table]:
        """One service's part of the table (empty when the proxy serves it), laid out against
        ``previous``, with the signature that tells when it must be planned again."""
        endpoints = snap.services.get(name, ())
        ready = snap.ready.get(name, ())
        if endpoints:
            self.modes[name] = self._mode(name, endpoints)
        signature = (address, endpoints, ready)
        if self.modes.get(name, Mode.KERNEL) is not Mode.KERNEL:
            self._proxied.add(name)
            return signature, rules.EMPTY
        self._proxied.discard(name)
        weights = _weights(ready)
        if not weights:
            return signature, rules.plan([], [address], previous)
        return signature, rules.plan([rules.ServicePlan(address, weights)], [], previous)

    def _listen(self, snap: Snapshot) -> None:
        """The proxy listeners of the services served by the proxy (kept while a service is
        momentarily without endpoints)."""
        listeners: Listeners = set()
        for name in self._proxied:
            mode = self.modes[name]
            address = self.addresses[name]
            endpoints = snap.services.get(name, ())
            if not endpoints:
                listeners.update(k for k in self.listeners if k[0] == name)
            kind = "tcp" if mode is Mode.PROXY_TCP else "http"
            for ep in endpoints:
                listeners.update(
                    (name, kind, address, p.service_port)
                    for p in endpoint_ports(ep)
                    if p.proto == "tcp"
                )
        if listeners != self.listeners:
            self.listeners = listeners
            if self.on_listeners is not None:
                self.on_listeners(set(listeners))

    def _mode(self, name: str, endpoints: Iterable[Endpoint]) -> Mode:
        mode = next((mode_of(ep) for ep in endpoints), Mode.KERNEL)
        if mode is not Mode.KERNEL and (not self.proxy or self.on_listeners is None):
            if name not in self._warned:
                self._warned.add(name)
                logger.warning(
                    "vips: service %s asks for the proxy data path, but the proxy is off "
                    "(proxy.enabled = false); serving it from the kernel",
                    name,
                )
            return Mode.KERNEL
        return mode

    async def _allocate(self, names: Iterable[str]) -> None:
        missing = [n for n in names if n not in self.addresses]
        if not missing:
            return
        try:
            fresh = alloc.assign(missing, self.network, self.addresses)
        except alloc.RangeFull as exc:
            logger.error("%s", exc)
            return
        await asyncio.to_thread(store.save, self.state_dir, fresh)  # before anyone sees one
        for name in sorted(set(fresh) - set(self.addresses)):
            logger.info("vips: service %s has virtual address %s", name, fresh[name])
        self.addresses = fresh
        if self.on_addresses is not None:
            self.on_addresses(dict(fresh))

    # -- stale UDP flows ------------------------------------------------------------------------

    async def _forget(self, changes: Iterable[tuple[rules.Table, rules.Table]]) -> None:
        """UDP conntrack entries that would keep a flow on an endpoint no longer in its slots,
        or untranslated from when its service had no endpoint, are deleted."""
        for old, new in changes:
            for key in set(old.services) | set(new.services):
                vip, proto, port = key
                if proto != "udp":
                    continue
                before = {t[0] for t in old.targets(key)}
                after = {t[0] for t in new.targets(key)}
                if after and not before:
                    self.stats.conntrack_deleted += await kernel.forget_udp(vip, port)
                for address in sorted(before - after):
                    self.stats.conntrack_deleted += await kernel.forget_udp(vip, port, address)

    # -- what others show -----------------------------------------------------------------------

    def info(self, service: str) -> dict[str, Any] | None:
        """The service's address and data path, for the admin API and the status page."""
        address = self.addresses.get(service)
        if address is None:
            return None
        mode = self.modes.get(service, Mode.KERNEL)
        if mode is not Mode.KERNEL:
            ports = sorted(
                {f"{kind}/{port}" for svc, kind, _, port in self.listeners if svc == service}
            )
            return {"address": address, "path": mode.value, "ports": ports}
        ports = []
        for key in sorted(k for k in self.table.services if k[0] == address):
            targets = sorted({f"{a}:{p}" for a, p in self.table.targets(key)})
            ports.append(f"{key[1]}/{key[2]}->{','.join(targets)}")
        return {"address": address, "path": mode.value, "ports": ports}

    def metrics(self) -> Iterable[Metric]:
        stats = self.stats
        yield _counter("stablenet_vip_updates", "Kernel table updates applied.", stats.updates)
        yield _counter(
            "stablenet_vip_update_errors",
            "Kernel table updates refused (each followed by a reconcile).",
            stats.errors,
        )
        yield _counter(
            "stablenet_vip_reconciles", "Full reconciles with the kernel.", stats.reconciles
        )
        yield _counter(
            "stablenet_vip_conntrack_deleted",
            "Stale UDP conntrack entries deleted.",
            stats.conntrack_deleted,
        )
        gauge = GaugeMetricFamily(
            "stablenet_vip_reconcile_seconds", "Duration of the last full reconcile."
        )
        gauge.add_metric([], stats.reconcile_seconds)
        yield gauge
        addresses = GaugeMetricFamily(
            "stablenet_vip_addresses", "Virtual addresses allocated, by data path.", labels=["path"]
        )
        counts: dict[str, int] = {m.value: 0 for m in Mode}
        for name in self.addresses:
            counts[self.modes.get(name, Mode.KERNEL).value] += 1
        for path, count in counts.items():
            addresses.add_metric([path], count)
        yield addresses
        hist = stats.update_seconds
        family = HistogramMetricFamily(
            "stablenet_vip_update_seconds", "Time to plan and apply one kernel table update."
        )
        family.add_metric([], hist.buckets(), hist.total)
        yield family


def _counter(name: str, doc: str, value: int) -> Metric:
    family = CounterMetricFamily(name, doc)
    family.add_metric([], value)
    return family


def _weights(ready: Iterable[Endpoint]) -> Mapping[tuple[str, int], Mapping[rules.Target, int]]:
    """(protocol, service port) -> (endpoint address, container port) -> weight, over the
    routable IPv4 endpoints (the first mapping of a service port in an endpoint wins)."""
    out: dict[tuple[str, int], dict[rules.Target, int]] = {}
    for ep in ready:
        if ":" in ep.address or ep.address.startswith("127."):
            continue  # the table is IPv4; a host-network container cannot be translated to
        seen: set[tuple[str, int]] = set()
        for p in endpoint_ports(ep):
            port = (p.proto, p.service_port)
            if port in seen:
                continue
            seen.add(port)
            out.setdefault(port, {})[(ep.address, p.container_port)] = ep.weight
    return out


async def remove_table(state_dir: str) -> None:
    """VIPs are off: remove the table a run with them on left behind (only where one did: the
    allocation file says so; the file stays, so turning them on again gives the same
    addresses)."""
    if not await asyncio.to_thread(os.path.exists, os.path.join(state_dir, store.FILE)):
        return
    try:
        removed = await kernel.Nft().delete_table()
    except (kernel.KernelError, OSError) as exc:
        logger.warning("vips are off but table %s could not be removed: %s", rules.TABLE, exc)
        return
    if removed:
        logger.info("vips are off: table %s removed", rules.TABLE)
