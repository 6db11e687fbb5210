"""This host as a member of the cluster: publishes its local endpoints under its lease and merges
the other hosts' into the registry. The asyncio shell around layout.py (keys), view.py (merge and
failure rules) and etcd.py (the store); the decisions are made there.

Loops, all owned by ``run``'s TaskGroup:
* lease: grant one lease per host, refresh it every TTL/3; a lease etcd no longer has (this host
  was cut off longer than its TTL, or etcd lost it) is granted anew and everything republished.
* publish: on every registry version, the keys this host should hold are compared with those it
  wrote, and only the difference is written, in one transaction.
* watch: a full read of ``<prefix>/hosts/`` at start and after a compaction, then a watch from
  the next revision; each batch of events becomes one registry write of the remote layer.
* expiry: while etcd is out of reach, drops other hosts as their leases would expire."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from stablenet.cluster.etcd import (
    Compacted,
    Delete,
    EtcdClient,
    EtcdError,
    Op,
    Put,
    Unavailable,
    tls_context,
)
from stablenet.cluster.layout import Layout
from stablenet.cluster.view import Link, RemoteView
from stablenet.config import ClusterConfig
from stablenet.model import SetRemote
from stablenet.registry import Registry

logger = logging.getLogger(__name__)
RETRY_MIN = 0.2  # first retry after etcd could not be reached; doubles up to TTL/3


def plan(published: Mapping[str, bytes], desired: Mapping[str, bytes], lease: int) -> list[Op]:
    """The writes that turn what etcd holds (``published``) into ``desired``: puts for new or
    changed keys, deletes for keys no longer wanted."""
    ops: list[Op] = [
        Put(key, value, lease) for key, value in desired.items() if published.get(key) != value
    ]
    ops.extend(Delete(key) for key in published if key not in desired)
    return ops


def layout_for(config: ClusterConfig, zone: str, dns_ttl: int) -> Layout:
    return Layout(
        prefix=config.prefix,
        host=config.host_name or socket.gethostname(),
        host_address=config.host_address,
        ttl=int(config.lease_ttl),
        advertise=config.advertise,
        zone=zone,
        skydns_prefix=config.skydns_prefix if config.skydns else None,
        dns_ttl=dns_ttl,
    )


class Cluster:
    """Owns this host's lease, what it has written, and its view of the others."""

    def __init__(
        self,
        registry: Registry,
        config: ClusterConfig,
        zone: str = "stablenet.internal",
        dns_ttl: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.config = config
        self.layout = layout_for(config, zone, dns_ttl)
        self.view = RemoteView(self.layout.hosts, self.layout.host, self.layout.ttl)
        self.link = Link()
        self.lease = 0
        self.leases_granted = 0
        self.writes = 0  # transactions written
        self.full_reads = 0
        self.events_seen = 0
        self._clock = clock
        self._client: EtcdClient | None = None
        self.joined = asyncio.Event()  # set once etcd was reached with a lease granted
        self._published: dict[str, bytes] = {}
        self._desired: dict[str, bytes] | None = None  # None until Docker has been listed once
        self._dirty = asyncio.Event()
        self._lease_wanted = asyncio.Event()
        # One event per loop that waits on the link (watch, expiry): each clears its own.
        self._link_events = (asyncio.Event(), asyncio.Event())
        self._watch_guard: asyncio.Timeout | None = None
        self._dropped: frozenset[str] = frozenset()

    def client(self) -> EtcdClient:
        cfg = self.config
        tls = (
            tls_context(cfg.ca_file, cfg.cert_file, cfg.key_file)
            if cfg.etcd[0].startswith("https://")
            else None
        )
        return EtcdClient(cfg.etcd, cfg.timeout, tls, cfg.username, cfg.password)

    async def run(self) -> None:
        logger.info(
            "cluster: host %s (%s) on etcd %s, prefix %s",
            self.layout.host, self.layout.host_address, ",".join(self.config.etcd),
            self.config.prefix,
        )  # fmt: skip
        async with self.client() as client, asyncio.TaskGroup() as tasks:
            self._client = client
            tasks.create_task(self._lease_loop(client), name="cluster-lease")
            tasks.create_task(self._desire_loop(), name="cluster-desire")
            tasks.create_task(self._publish_loop(client), name="cluster-publish")
            tasks.create_task(self._watch_loop(client), name="cluster-watch")
            tasks.create_task(self._expiry_loop(), name="cluster-expiry")

    # -- link ---------------------------------------------------------------------------------

    def _reached(self) -> None:
        if self.lease:
            self.joined.set()
        was = self.link.connected
        self.link = Link(True, self._clock(), False)
        if not was:
            logger.info("cluster: etcd reached")
            self._changed_link()

    def _lost(self, exc: Unavailable) -> None:
        before = self.link
        self.link = Link(False, before.contact, exc.refused)
        if before.connected or before.refused != exc.refused:
            logger.warning("cluster: etcd %s: %s", self.link.describe(), exc)
            self._changed_link()
            if self._watch_guard is not None:  # a silent stream would hang: end it now
                self._watch_guard.reschedule(asyncio.get_running_loop().time())

    def _changed_link(self) -> None:
        for event in self._link_events:
            event.set()
        self._dirty.set()  # a write that failed is tried again

    @property
    def requests(self) -> int:
        """Requests sent to etcd so far (failed attempts included)."""
        return 0 if self._client is None else self._client.requests

    def status(self) -> dict[str, Any]:
        """For /readyz, the status page and metrics."""
        return {
            "host": self.layout.host,
            "etcd": self.link.describe(),
            "connected": self.link.connected,
            "lease": self.lease,
            "revision": self.view.revision,
            "hosts": sorted(h for h in self.view.hosts if h not in self._dropped),
            "dropped": sorted(self._dropped),
        }

    def metrics(self) -> Iterable[Metric]:
        """Prometheus families for the cluster layer (read at scrape time)."""
        yield GaugeMetricFamily(
            "stablenet_cluster_etcd_connected",
            "1 while etcd answers this host.",
            value=1 if self.link.connected else 0,
        )
        for name, doc, value in (
            ("stablenet_cluster_etcd_requests", "Requests sent to etcd.", self.requests),
            ("stablenet_cluster_writes", "Transactions written to etcd.", self.writes),
            ("stablenet_cluster_full_reads", "Full reads of the prefix.", self.full_reads),
            ("stablenet_cluster_watch_events", "Watch events received.", self.events_seen),
            ("stablenet_cluster_leases", "Leases granted to this host.", self.leases_granted),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        hosts = [h for h in self.view.hosts if h not in self._dropped]
        yield GaugeMetricFamily(
            "stablenet_cluster_hosts", "Other hosts whose endpoints are merged.", value=len(hosts)
        )
        remote = sum(1 for ep in self.registry.snapshot.endpoints.values() if ep.origin)
        yield GaugeMetricFamily(
            "stablenet_cluster_remote_endpoints", "Endpoints from other hosts.", value=remote
        )

    # -- lease --------------------------------------------------------------------------------

    async def _lease_loop(self, client: EtcdClient) -> None:
        period = self.layout.ttl / 3
        retry = RETRY_MIN
        while True:
            try:
                if not self.lease:
                    await self._new_lease(client)
                elif await client.keepalive(self.lease) <= 0:
                    logger.warning("cluster: lease %x expired; republishing everything", self.lease)
                    self.lease = 0
                    continue
                self._reached()
                wait, retry = period, RETRY_MIN
            except Unavailable as exc:
                self._lost(exc)
                wait, retry = retry, min(retry * 2, period)
            self._lease_wanted.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._lease_wanted.wait()
            except TimeoutError:
                pass

    async def _new_lease(self, client: EtcdClient) -> None:
        """Grant a lease, then take as written whatever this host has under its keys (left by an
        earlier run), so the next publish rewrites every key under the new lease and deletes the
        ones no longer wanted."""
        lease = await client.grant(self.layout.ttl)
        _, mine = await client.range_prefix(self.layout.own)
        held = {kv.key: kv.value for kv in mine}
        if self.layout.skydns_prefix is not None:
            _, records = await client.range_prefix(self.layout.skydns_prefix + "/")
            held.update(
                (kv.key, kv.value)
                for kv in records
                if kv.key.rpartition("/")[2].startswith(self.layout.host + "-")
            )
        # Every key counts as unwritten (value b""), so it is put again with the new lease.
        self._published = dict.fromkeys(held, b"")
        self.lease = lease
        self.leases_granted += 1
        logger.info("cluster: lease %x granted (ttl %ds)", lease, self.layout.ttl)
        self._dirty.set()

    # -- publish ------------------------------------------------------------------------------

    async def _desire_loop(self) -> None:
        async for snap in self.registry.watch():
            if self._desired is None and not snap.synced:
                continue  # publish nothing before Docker has been listed once
            desired = self.layout.desired(snap.endpoints)
            if desired != self._desired:
                self._desired = desired
                self._dirty.set()

    async def _publish_loop(self, client: EtcdClient) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            desired, lease = self._desired, self.lease
            if desired is None or not lease:
                continue
            ops = plan(self._published, desired, lease)
            if not ops:
                continue
            try:
                await client.txn(ops)
            except Unavailable as exc:
                self._lost(exc)
                continue  # tried again when etcd is reached (the link sets _dirty)
            except EtcdError as exc:
                logger.warning("cluster: write refused (%s); renewing the lease", exc)
                if self.lease == lease:
                    self.lease = 0
                    self._lease_wanted.set()
                continue
            self.writes += 1
            if self.lease == lease:
                self._published = dict(desired)
            self._reached()

    # -- merge --------------------------------------------------------------------------------

    def _merge(self) -> None:
        self.registry.apply([SetRemote(self.view.endpoints(self._dropped))])

    async def _watch_loop(self, client: EtcdClient) -> None:
        retry = RETRY_MIN
        failures = 0  # attempts in a row that ended before any answer
        start = 0  # 0: a full read first
        while True:
            if self._dropped:
                start = 0  # hosts were dropped while out of reach: only a full read restores
            try:
                if start == 0:
                    revision, kvs = await client.range_prefix(self.layout.hosts)
                    self.view.reset(revision, kvs)
                    self.full_reads += 1
                    start = revision + 1
                    self._dropped = frozenset()
                    self._reached()
                    self._merge()
                async with asyncio.timeout(None) as guard:
                    if not self.link.connected:
                        guard.reschedule(asyncio.get_running_loop().time())
                    self._watch_guard = guard
                    try:
                        async for revision, events in client.watch(self.layout.hosts, start):
                            self.view.apply(revision, events)
                            self.events_seen += len(events)
                            self._reached()
                            retry, failures = RETRY_MIN, 0
                            if events:  # (a message without events says nothing of history)
                                start = max(start, events[-1].mod_revision + 1)
                                self._merge()
                    finally:
                        self._watch_guard = None
            except Compacted as exc:
                logger.info("cluster: %s; reading everything again", exc)
                start = 0
                continue
            except Unavailable as exc:
                # One member's stream broke: the next member is tried. Whether etcd is out of
                # reach is for the lease loop to say (it asks every member).
                logger.info("cluster: watch ended (%s); watching again from %d", exc, start)
            except TimeoutError:
                pass  # the lease loop found etcd out of reach and ended the stream
            failures += 1
            if failures > 1 or not self.link.connected:  # the first retry goes at once
                await self._wait_link(retry)
                retry = min(retry * 2, self.layout.ttl / 3)

    async def _wait_link(self, wait: float) -> None:
        """Sleep ``wait`` seconds, or less when the link comes back."""
        changed = self._link_events[0]
        changed.clear()
        try:
            async with asyncio.timeout(wait):
                while not self.link.connected:
                    await changed.wait()
                    changed.clear()
        except TimeoutError:
            pass

    async def _expiry_loop(self) -> None:
        """While etcd is out of reach, drop each other host when its lease would have expired.
        Hosts come back only with a full read once etcd is reached again (see _watch_loop), so
        a host whose lease did expire meanwhile does not flash back."""
        changed = self._link_events[1]
        while True:
            changed.clear()
            dropped, upcoming = self.view.expired(self.link, self._clock())
            if not self.link.connected and not dropped <= self._dropped:
                for host in sorted(dropped - self._dropped):
                    logger.warning(
                        "cluster: host %s dropped: its lease would have expired while etcd is %s",
                        host, self.link.describe(),
                    )  # fmt: skip
                self._dropped |= dropped
                self._merge()
            timeout = None if upcoming is None else max(0.0, upcoming - self._clock())
            try:
                async with asyncio.timeout(timeout):
                    await changed.wait()
            except TimeoutError:
                pass
